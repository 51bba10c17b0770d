//! How a new machine joins the cluster: a per-machine kubeadm bootstrap token, the hash of the
//! cluster CA's public key, and the cloud-init user-data that runs `kubeadm join`.
//!
//! Everything here is pure (no API calls) so it can be tested byte for byte; the controller
//! reads the CA ConfigMap and writes the token Secret around it.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube_node_crds::names::tags;
use kube_node_provider::Sensitive;
use rand::Rng;
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::der::{DecodePem, Encode};

/// The namespace bootstrap tokens live in (the API server's bootstrap authenticator only reads
/// this one).
pub const TOKEN_NAMESPACE: &str = "kube-system";
/// The Secret type of bootstrap tokens.
pub const TOKEN_SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// The group kubeadm's default RBAC lets join the cluster.
pub const TOKEN_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
/// The ConfigMap (present in every namespace) holding the cluster CA.
pub const CA_CONFIGMAP: &str = "kube-root-ca.crt";
/// The key of the CA certificate in [`CA_CONFIGMAP`].
pub const CA_KEY: &str = "ca.crt";
/// Where the JoinConfiguration is written on the machine.
pub const JOIN_CONFIG_PATH: &str = "/etc/kubernetes/kubeadm-join.yaml";

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The Secret (in kube-node's own namespace) holding the key bootstrap tokens are derived
/// from; kube-node creates it on first use.
pub const TOKEN_KEY_SECRET: &str = "kube-node-bootstrap-token-key";
/// The data key of the key in [`TOKEN_KEY_SECRET`].
pub const TOKEN_KEY_DATA: &str = "key";

/// The key a Node's bootstrap token is derived from (with the Node's UID and the token's
/// public id). Derivation is what lets a machine be launched before its token's Secret
/// exists: a successor after a restart derives the very token the machine's user-data holds
/// and creates its Secret, where a random token would be lost with the process that drew it.
/// `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The key stored in a Secret's data, when it is one (32 bytes).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The key as stored in its Secret.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The Secret holding this key.
    pub fn secret(&self, namespace: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(TOKEN_KEY_SECRET.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    tags::MANAGED_BY.to_string(),
                    tags::MANAGED_BY_VALUE.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_string()),
            data: Some(BTreeMap::from([(
                TOKEN_KEY_DATA.to_string(),
                ByteString(self.to_bytes()),
            )])),
            ..Secret::default()
        }
    }

    /// The key in a Secret made by [`TokenKey::secret`].
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        Self::from_bytes(&secret.data.as_ref()?.get(TOKEN_KEY_DATA)?.0)
    }
}

/// A kubeadm bootstrap token (`<id>.<secret>`). `Debug` hides the secret part.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// The public part, 6 characters of `[a-z0-9]`; it names the Secret.
    pub id: String,
    /// The secret part, 16 characters of `[a-z0-9]`.
    pub secret: Sensitive,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

impl BootstrapToken {
    /// A fresh random public id (6 of `[a-z0-9]`). Secret halves are never drawn: they are
    /// derived ([`BootstrapToken::derive`]).
    pub fn generate_id() -> String {
        let mut rng = rand::rng();
        (0..6)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect()
    }

    /// The token of Node `node_uid` under the public id `id` (when `id` is a valid one): its
    /// secret half is HMAC-SHA256(key, id, UID), mapped onto the token alphabet without bias.
    /// The same inputs give the same token in any process holding the key.
    pub fn derive(key: &TokenKey, id: &str, node_uid: &str) -> Option<Self> {
        let valid = id.len() == 6 && id.bytes().all(|b| ALPHABET.contains(&b));
        if !valid {
            return None;
        }
        let mut secret = String::with_capacity(16);
        let mut block: u32 = 0;
        while secret.len() < 16 {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).ok()?;
            mac.update(b"kube-node bootstrap token v1\0");
            mac.update(id.as_bytes());
            mac.update(b"\0");
            mac.update(node_uid.as_bytes());
            mac.update(&block.to_be_bytes());
            // Rejection sampling: 252 = 7 * 36, so the bytes kept are uniform over the alphabet.
            for b in mac.finalize().into_bytes() {
                if b < 252 && secret.len() < 16 {
                    secret.push(char::from(ALPHABET[usize::from(b % 36)]));
                }
            }
            block += 1;
        }
        Some(Self {
            id: id.to_string(),
            secret: Sensitive(secret),
        })
    }

    /// The name of the Secret holding this token.
    pub fn secret_name(&self) -> String {
        secret_name(&self.id)
    }

    /// Reads a token back from its Secret, if the Secret is a well-formed token.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let get = |k: &str| {
            data.get(k)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let id = get("token-id")?;
        let secret_part = get("token-secret")?;
        let valid = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
        (valid(&id, 6) && valid(&secret_part, 16)).then_some(Self {
            id,
            secret: Sensitive(secret_part),
        })
    }
}

/// The name of the Secret of token `id`.
pub fn secret_name(id: &str) -> String {
    format!("bootstrap-token-{id}")
}

/// The expiration written into a token Secret, if it is one of ours and parses.
pub fn secret_expiration(secret: &Secret) -> Option<jiff::Timestamp> {
    let raw = secret.data.as_ref()?.get("expiration")?;
    std::str::from_utf8(&raw.0).ok()?.parse().ok()
}

/// The bootstrap token Secret for the machine of Node `node_name` (UID `node_uid`).
pub fn token_secret(
    token: &BootstrapToken,
    node_name: &str,
    node_uid: &str,
    expiration: jiff::Timestamp,
) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("token-id", token.id.clone()),
        ("token-secret", token.secret.0.clone()),
        ("usage-bootstrap-authentication", "true".to_string()),
        ("usage-bootstrap-signing", "true".to_string()),
        ("auth-extra-groups", TOKEN_GROUP.to_string()),
        ("expiration", expiration.to_string()),
        (
            "description",
            format!("kube-node: joins the machine of Node {node_name}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(token.secret_name()),
            namespace: Some(TOKEN_NAMESPACE.to_string()),
            // The UID (36 characters) always fits a label value; a Node name may not.
            labels: Some(BTreeMap::from([
                (tags::NODE_UID.to_string(), node_uid.to_string()),
                (
                    tags::MANAGED_BY.to_string(),
                    tags::MANAGED_BY_VALUE.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Why the CA certificate could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaError(String);

/// kubeadm's CA pin: `sha256:<hex>` of the DER SubjectPublicKeyInfo of the first certificate
/// in `pem`.
pub fn ca_cert_hash(pem: &str) -> Result<String, CaError> {
    let cert = Certificate::from_pem(
        first_pem_block(pem).ok_or_else(|| CaError("no PEM certificate found".to_string()))?,
    )
    .map_err(|e| CaError(format!("cannot parse the CA certificate: {e}")))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| CaError(format!("cannot encode the CA public key: {e}")))?;
    let digest = Sha256::digest(&spki);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

/// The first `CERTIFICATE` block of a bundle (a CA bundle may hold several).
fn first_pem_block(pem: &str) -> Option<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let end = pem[start..].find(END)? + start + END.len();
    Some(&pem[start..end])
}

/// What goes into a machine's join payload.
#[derive(Clone, Debug)]
pub struct JoinParams<'a> {
    /// The Node's name: the kubelet registers onto this Node.
    pub node_name: &'a str,
    /// `host:port` of the API server.
    pub api_server_endpoint: &'a str,
    /// The token.
    pub token: &'a BootstrapToken,
    /// `sha256:<hex>` pins of the CA.
    pub ca_cert_hashes: &'a [String],
}

/// Renders the cloud-init user-data that runs `kubeadm join` onto the Node `node_name`.
pub fn render_user_data(p: &JoinParams<'_>) -> Result<Sensitive, serde_yaml::Error> {
    let join = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta3",
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": p.api_server_endpoint,
                "token": format!("{}.{}", p.token.id, p.token.secret.0),
                "caCertHashes": p.ca_cert_hashes,
            }
        },
        "nodeRegistration": { "name": p.node_name },
    });
    let cloud_config = serde_json::json!({
        "write_files": [{
            "path": JOIN_CONFIG_PATH,
            "owner": "root:root",
            "permissions": "0600",
            "content": serde_yaml::to_string(&join)?,
        }],
        "runcmd": [["kubeadm", "join", "--config", JOIN_CONFIG_PATH]],
    });
    Ok(Sensitive(format!(
        "#cloud-config\n{}",
        serde_yaml::to_string(&cloud_config)?
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = include_str!("../tests/fixtures/ca.pem");
    const CA_HASH: &str = "sha256:c9a175d841ba0e09674f89863ee24eb0dd0bac78b0bf96dfb0fcd6bd1bd3cd8f";

    #[test]
    fn ca_hash_matches_openssl() {
        // Computed with `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`.
        assert_eq!(ca_cert_hash(CA).expect("hash"), CA_HASH);
        let bundle = format!("{CA}\n{CA}");
        assert_eq!(ca_cert_hash(&bundle).expect("hash"), CA_HASH);
    }

    #[test]
    fn ca_hash_rejects_garbage() {
        assert!(ca_cert_hash("").is_err());
        assert!(
            ca_cert_hash("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----").is_err()
        );
    }

    #[test]
    fn token_shape() {
        let t = BootstrapToken::derive(&TokenKey::generate(), &BootstrapToken::generate_id(), "u")
            .expect("a generated id is valid");
        assert_eq!(t.id.len(), 6);
        assert_eq!(t.secret.0.len(), 16);
        assert!(format!("{t:?}").contains("<redacted>"));
        assert!(!format!("{t:?}").contains(&t.secret.0));
        let s = token_secret(
            &t,
            "n1",
            "uid-1",
            "2030-01-01T00:00:00Z".parse().expect("ts"),
        );
        assert_eq!(
            s.metadata.name.as_deref(),
            Some(format!("bootstrap-token-{}", t.id).as_str())
        );
        assert_eq!(s.type_.as_deref(), Some(TOKEN_SECRET_TYPE));
        assert_eq!(BootstrapToken::from_secret(&s), Some(t.clone()));
        assert_eq!(
            secret_expiration(&s),
            Some("2030-01-01T00:00:00Z".parse().expect("ts"))
        );
        let data = s.data.expect("data");
        assert_eq!(data["usage-bootstrap-authentication"].0, b"true");
        assert_eq!(data["usage-bootstrap-signing"].0, b"true");
        assert_eq!(data["auth-extra-groups"].0, TOKEN_GROUP.as_bytes());
        // The Secret's name and labels never carry the secret part.
        assert!(!s.metadata.name.expect("name").contains(&t.secret.0));
    }

    #[test]
    fn a_derived_token_depends_on_key_id_and_uid_and_nothing_else() {
        let key = TokenKey::generate();
        let t = BootstrapToken::derive(&key, "abc123", "uid-1").expect("valid id");
        assert_eq!(t.id, "abc123");
        assert_eq!(t.secret.0.len(), 16);
        assert!(t.secret.0.bytes().all(|b| ALPHABET.contains(&b)));
        // Another process holding the key (a successor after a restart) derives the same.
        let same = TokenKey::from_secret(&key.secret("kube-node-system")).expect("key back");
        assert_eq!(
            BootstrapToken::derive(&same, "abc123", "uid-1"),
            Some(t.clone())
        );
        for other in [
            BootstrapToken::derive(&TokenKey::generate(), "abc123", "uid-1"),
            BootstrapToken::derive(&key, "abc124", "uid-1"),
            BootstrapToken::derive(&key, "abc123", "uid-2"),
        ] {
            assert_ne!(other.expect("valid").secret, t.secret);
        }
        // A malformed id (from an annotation anyone can write) derives nothing.
        for bad in ["", "abc", "ABC123", "abc1234", "abc-12"] {
            assert_eq!(BootstrapToken::derive(&key, bad, "uid-1"), None, "{bad}");
        }
        assert!(TokenKey::from_bytes(b"short").is_none());
        assert_eq!(format!("{key:?}"), "TokenKey(<redacted>)");
    }

    #[test]
    fn derived_secrets_spread_over_the_alphabet() {
        let key = TokenKey::generate();
        let mut seen = [0u32; 36];
        for i in 0..2000 {
            let t = BootstrapToken::derive(&key, "abc123", &format!("uid-{i}")).expect("valid");
            for b in t.secret.0.bytes() {
                let at = ALPHABET
                    .iter()
                    .position(|a| *a == b)
                    .expect("in the alphabet");
                seen[at] += 1;
            }
        }
        // 32000 characters, ~889 each: every one appears, none twice as often as another.
        let (lo, hi) = (seen.iter().min().copied(), seen.iter().max().copied());
        assert!(
            lo.is_some_and(|l| l > 700) && hi.is_some_and(|h| h < 1100),
            "{seen:?}"
        );
    }

    #[test]
    fn user_data_parses_back() {
        let token = BootstrapToken::derive(&TokenKey::generate(), "abc123", "u").expect("valid");
        let hashes = vec![CA_HASH.to_string()];
        let ud = render_user_data(&JoinParams {
            node_name: "worker-a",
            api_server_endpoint: "10.0.0.1:6443",
            token: &token,
            ca_cert_hashes: &hashes,
        })
        .expect("render");
        assert!(ud.0.starts_with("#cloud-config\n"));
        assert_eq!(format!("{ud:?}"), "<redacted>");
        let doc: serde_yaml::Value = serde_yaml::from_str(&ud.0).expect("yaml");
        let file = &doc["write_files"][0];
        assert_eq!(file["path"].as_str(), Some(JOIN_CONFIG_PATH));
        let join: serde_yaml::Value =
            serde_yaml::from_str(file["content"].as_str().expect("content")).expect("join yaml");
        assert_eq!(join["kind"].as_str(), Some("JoinConfiguration"));
        assert_eq!(join["nodeRegistration"]["name"].as_str(), Some("worker-a"));
        let bt = &join["discovery"]["bootstrapToken"];
        assert_eq!(bt["apiServerEndpoint"].as_str(), Some("10.0.0.1:6443"));
        assert_eq!(
            bt["token"].as_str(),
            Some(format!("{}.{}", token.id, token.secret.0).as_str())
        );
        assert_eq!(bt["caCertHashes"][0].as_str(), Some(CA_HASH));
        let cmd: Vec<&str> = doc["runcmd"][0]
            .as_sequence()
            .expect("runcmd")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(cmd, ["kubeadm", "join", "--config", JOIN_CONFIG_PATH]);
    }
}
