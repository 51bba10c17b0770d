//! A NodeClass's `spec.provider.baremetal`, its inventory and its credentials, checked and
//! resolved once at build time (no network). Every error names the field or Secret key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube_node_crds::v1alpha1::BaremetalHost;
use kube_node_provider::{Credentials, ProviderError, ResolvedClass, Result};
use russh::keys::{PrivateKey, PublicKey};
use sha2::{Digest, Sha256};

use crate::ssh;

/// The default `shutdownTimeout`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// The inventory key of a referenced ConfigMap when none is named.
pub const DEFAULT_INVENTORY_KEY: &str = "hosts.yaml";

/// One host, resolved.
#[derive(Clone)]
pub struct Host {
    /// The inventory name.
    pub name: String,
    /// Where it came from, for messages (`spec.provider.baremetal.hosts[3] (rack-a-04)`).
    pub field: String,
    /// The configured Redfish URL (a system, or a BMC root).
    pub redfish_url: String,
    /// The claim key: derived from the normalised Redfish URL, so two NodeClasses naming one
    /// BMC system contend for one claim.
    pub claim_key: String,
    /// `host:port` of its SSH server.
    pub ssh_addr: String,
    /// Its address without the port (reported as InternalIP).
    pub address: String,
    /// The pinned SSH host key.
    pub host_key: PublicKey,
    /// The BMC login.
    pub bmc_username: String,
    /// The BMC password (never formatted).
    pub bmc_password: String,
    /// The SSH user key.
    pub ssh_key: Arc<PrivateKey>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

impl Host {
    /// The zone it reports (label `topology.kubernetes.io/zone`), else `default`.
    pub fn zone(&self) -> &str {
        self.labels
            .get("topology.kubernetes.io/zone")
            .map_or("default", String::as_str)
    }
}

/// The backend's configuration.
pub struct Config {
    /// The NodeClass.
    pub class: String,
    /// kube-node's cluster name.
    pub cluster: String,
    /// The hosts, in inventory order.
    pub hosts: Vec<Host>,
    /// The SSH user.
    pub ssh_user: String,
    /// Run before power-off on delete.
    pub wipe_command: Option<String>,
    /// Graceful shutdown before ForceOff.
    pub shutdown_timeout: Duration,
    /// How long a claimed host may take to come up and join.
    pub registration_timeout: Duration,
    /// Extra CA certificates (PEM) for the BMCs' HTTPS.
    pub redfish_ca: Option<Vec<u8>>,
    /// Where the JoinConfiguration goes on the host, when not where kube-node renders it.
    pub join_config_path: Option<String>,
}

/// The claim key of a Redfish URL: `bm-` and 16 hex digits of the SHA-256 of the URL with its
/// scheme and host lowercased, default ports and trailing slashes dropped.
pub fn claim_key(redfish_url: &str) -> String {
    let url = redfish_url.trim().trim_end_matches('/');
    let (origin, path) = crate::redfish::split_origin(url);
    let origin = origin
        .to_ascii_lowercase()
        .replace(":443", "")
        .replace(":80", "");
    let origin = origin
        .strip_prefix("https://")
        .or(origin.strip_prefix("http://"))
        .unwrap_or(&origin)
        .to_string();
    let digest = Sha256::digest(format!("{origin}{path}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("bm-{hex}")
}

fn secret<'a>(creds: &'a Credentials, host: &str, key: &str) -> Option<&'a str> {
    creds
        .get_str(&format!("{host}.{key}"))
        .or_else(|| creds.get_str(key))
        .filter(|v| !v.is_empty())
}

/// Reads the NodeClass into a [`Config`].
pub fn resolve(class: &ResolvedClass) -> Result<Config> {
    let spec = class.spec.provider.baremetal.as_ref().ok_or_else(|| {
        ProviderError::InvalidConfig(
            "spec.provider.baremetal: is required when spec.provider.type is baremetal".into(),
        )
    })?;
    let (hosts, base): (Vec<BaremetalHost>, String) = match &spec.inventory_ref {
        None => (spec.hosts.clone(), "spec.provider.baremetal.hosts".into()),
        Some(r) => {
            let key = r.key.as_deref().unwrap_or(DEFAULT_INVENTORY_KEY);
            let base = format!("ConfigMap {}/{} key {key}", r.namespace, r.name);
            let data = class.inventory.as_ref().ok_or_else(|| {
                ProviderError::InvalidConfig(format!(
                    "spec.provider.baremetal.inventoryRef: {base} was not resolved"
                ))
            })?;
            let text = data.get(key).ok_or_else(|| {
                ProviderError::InvalidConfig(format!(
                    "spec.provider.baremetal.inventoryRef: {base} does not exist"
                ))
            })?;
            let hosts = serde_yaml::from_str(text).map_err(|e| {
                ProviderError::InvalidConfig(format!(
                    "spec.provider.baremetal.inventoryRef: {base} is not a YAML list of hosts: {e}"
                ))
            })?;
            (hosts, base)
        }
    };
    if hosts.is_empty() {
        return Err(ProviderError::InvalidConfig(format!(
            "{base}: the inventory lists no host"
        )));
    }
    let creds = class.credentials.as_ref().ok_or_else(|| {
        ProviderError::Unauthorized(
            "spec.credentialsSecretRef: the baremetal backend needs a Secret with bmc-username, bmc-password and ssh-private-key".into(),
        )
    })?;
    let mut errors: Vec<String> = Vec::new();
    let mut names = BTreeSet::new();
    let mut keys = BTreeMap::new();
    let mut out = Vec::with_capacity(hosts.len());
    let mut parsed_keys: BTreeMap<String, Arc<PrivateKey>> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let field = format!("{base}[{i}]");
        if let Err(e) = h.validate(&field) {
            errors.push(e.to_string());
        }
        if !names.insert(h.name.clone()) {
            errors.push(format!("{field}.name: host {:?} is listed twice", h.name));
        }
        let key = claim_key(&h.redfish_url);
        if let Some(other) = keys.insert(key.clone(), h.name.clone()) {
            errors.push(format!(
                "{field}.redfishUrl: names the same Redfish system as host {other:?}"
            ));
        }
        let user = secret(creds, &h.name, "bmc-username");
        let pass = secret(creds, &h.name, "bmc-password");
        let ssh_pem = secret(creds, &h.name, "ssh-private-key");
        let host_key_line = h
            .ssh_host_key
            .as_deref()
            .or_else(|| creds.get_str(&format!("{}.ssh-host-key", h.name)));
        let (Some(user), Some(pass)) = (user, pass) else {
            return Err(ProviderError::Unauthorized(format!(
                "{field} ({}): the credentials Secret has no bmc-username/bmc-password (nor {0}.bmc-username/{0}.bmc-password)",
                h.name
            )));
        };
        let Some(ssh_pem) = ssh_pem else {
            return Err(ProviderError::Unauthorized(format!(
                "{field} ({}): the credentials Secret has no ssh-private-key (nor {0}.ssh-private-key)",
                h.name
            )));
        };
        let ssh_key = match parsed_keys.get(ssh_pem) {
            Some(k) => k.clone(),
            None => {
                let k = Arc::new(ssh::parse_private_key(ssh_pem).map_err(|m| {
                    ProviderError::InvalidConfig(format!(
                        "credentials Secret key ssh-private-key (host {}): {m}",
                        h.name
                    ))
                })?);
                parsed_keys.insert(ssh_pem.to_string(), k.clone());
                k
            }
        };
        let Some(line) = host_key_line else {
            errors.push(format!(
                "{field}.sshHostKey: no pinned SSH host key: set it here or as {}.ssh-host-key in the credentials Secret",
                h.name
            ));
            continue;
        };
        let host_key = match ssh::parse_public_key(line) {
            Ok(k) => k,
            Err(m) => {
                errors.push(format!("{field}.sshHostKey: {m}"));
                continue;
            }
        };
        let (address, ssh_addr) = match h.ssh_address.rsplit_once(':') {
            Some((a, p)) if p.parse::<u16>().is_ok() && !a.contains(':') => {
                (a.to_string(), h.ssh_address.clone())
            }
            _ => (h.ssh_address.clone(), format!("{}:22", h.ssh_address)),
        };
        out.push(Host {
            name: h.name.clone(),
            field: format!("{field} ({})", h.name),
            redfish_url: h.redfish_url.trim_end_matches('/').to_string(),
            claim_key: key,
            ssh_addr,
            address,
            host_key,
            bmc_username: user.to_string(),
            bmc_password: pass.to_string(),
            ssh_key,
            labels: h.labels.clone(),
        });
    }
    if !errors.is_empty() {
        // A thousand-host inventory with one systematic mistake must not make a huge condition.
        let more = errors.len().saturating_sub(5);
        let mut msg = errors.into_iter().take(5).collect::<Vec<_>>().join("; ");
        if more > 0 {
            msg.push_str(&format!("; and {more} more"));
        }
        return Err(ProviderError::InvalidConfig(msg));
    }
    let shutdown_timeout = spec
        .shutdown_timeout
        .map_or(DEFAULT_SHUTDOWN_TIMEOUT, Into::into);
    Ok(Config {
        class: class.name.clone(),
        cluster: class.cluster_name.clone(),
        hosts: out,
        ssh_user: spec.ssh_user.clone().unwrap_or_else(|| "root".into()),
        wipe_command: spec.wipe_command.clone(),
        shutdown_timeout,
        registration_timeout: class.spec.registration_timeout(),
        redfish_ca: creds.get_bytes("redfish-ca.crt").map(<[u8]>::to_vec),
        join_config_path: spec.join_config_path.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_keys_ignore_spelling() {
        let a = claim_key("https://BMC-1.example:443/redfish/v1/Systems/1/");
        assert_eq!(a, claim_key("https://bmc-1.example/redfish/v1/Systems/1"));
        assert_ne!(a, claim_key("https://bmc-2.example/redfish/v1/Systems/1"));
        assert!(a.starts_with("bm-") && a.len() == 19);
        assert!(kube_node_provider::claims::check_key(&a).is_ok());
    }
}
