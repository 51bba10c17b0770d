//! `spec.provider.exec` checked and resolved: defaults applied, Secret values looked up.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use kube_node_provider::{ProviderError, ResolvedClass, Result};

use crate::redact::Redactor;

/// Default of `spec.provider.exec.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default of `spec.provider.exec.maxConcurrency`.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 4;
/// The environment variable telling the program the protocol version.
pub const PROTOCOL_VERSION_ENV: &str = "KUBE_NODE_PROTOCOL_VERSION";
/// Variables of kube-node's own environment passed on to the program (everything else is
/// cleared, so kube-node's service-account token paths, proxies and cloud credentials never
/// leak into a program that did not ask for them).
pub const INHERITED_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];

/// One environment variable of the program, resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
    /// Whether the value came from the credentials Secret (then `Debug` hides it).
    pub secret: bool,
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if self.secret {
            &"<redacted>"
        } else {
            &self.value
        };
        f.debug_struct("EnvVar")
            .field("name", &self.name)
            .field("value", value)
            .finish()
    }
}

/// `spec.provider.exec` resolved: what to run, how, and what to redact.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// The NodeClass's name.
    pub node_class: String,
    /// The cluster name.
    pub cluster_name: String,
    /// The program (`command[0]`).
    pub program: String,
    /// Its arguments before the operation (`command[1..]`).
    pub args: Vec<String>,
    /// The working directory, if set.
    pub working_dir: Option<PathBuf>,
    /// The configured environment, in order (later entries win).
    pub env: Vec<EnvVar>,
    /// How long one operation may run.
    pub timeout: Duration,
    /// How many operations may run at once.
    pub max_concurrency: u32,
    /// `spec.provider.exec.config`, or an empty object.
    pub config: serde_json::Value,
    pub(crate) redactor: Redactor,
}

fn invalid(field: impl fmt::Display, why: impl fmt::Display) -> ProviderError {
    ProviderError::InvalidConfig(format!("{field}: {why}"))
}

/// Checks `spec.provider.exec` of a resolved NodeClass and resolves it. Errors are
/// `InvalidConfig` naming the field; no message ever contains a Secret value.
pub fn validate_spec(class: &ResolvedClass) -> Result<ExecConfig> {
    const F: &str = "spec.provider.exec";
    let spec = class.spec.provider.exec.as_ref().ok_or_else(|| {
        invalid(
            F,
            "is required when spec.provider.type is exec (set command at least)",
        )
    })?;

    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| invalid(format!("{F}.command"), "must not be empty"))?;
    if program.is_empty() {
        return Err(invalid(format!("{F}.command[0]"), "must not be empty"));
    }
    for (i, arg) in spec.command.iter().enumerate() {
        if arg.contains('\0') {
            return Err(invalid(
                format!("{F}.command[{i}]"),
                "must not contain a NUL byte",
            ));
        }
    }

    let working_dir = match spec.working_dir.as_deref() {
        None => None,
        Some("") => return Err(invalid(format!("{F}.workingDir"), "must not be empty")),
        Some(d) if d.contains('\0') => {
            return Err(invalid(
                format!("{F}.workingDir"),
                "must not contain a NUL byte",
            ));
        }
        Some(d) => Some(PathBuf::from(d)),
    };

    let mut env = Vec::with_capacity(spec.env.len());
    for (i, var) in spec.env.iter().enumerate() {
        let field = format!("{F}.env[{i}]");
        if var.name.is_empty() || var.name.contains(['=', '\0']) {
            return Err(invalid(
                format!("{field}.name"),
                format!(
                    "{:?} is not a valid variable name (empty, or contains '=' or NUL)",
                    var.name
                ),
            ));
        }
        if var.name == PROTOCOL_VERSION_ENV {
            return Err(invalid(
                format!("{field}.name"),
                format!("{PROTOCOL_VERSION_ENV} is set by kube-node"),
            ));
        }
        let (value, secret) = match (&var.value, &var.secret_key) {
            (Some(v), None) => (v.clone(), false),
            (None, Some(key)) => (secret_value(class, &field, key)?, true),
            _ => {
                return Err(invalid(&field, "set exactly one of value and secretKey"));
            }
        };
        if value.contains('\0') {
            // Never echo the value: it may be a Secret.
            return Err(invalid(&field, "the value contains a NUL byte"));
        }
        env.push(EnvVar {
            name: var.name.clone(),
            value,
            secret,
        });
    }

    let timeout = match spec.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) if t.is_negative() => {
            return Err(invalid(format!("{F}.timeout"), "must be positive"));
        }
        Some(t) => {
            let t: Duration = t.into();
            if t.is_zero() {
                return Err(invalid(format!("{F}.timeout"), "must be positive"));
            }
            t
        }
    };

    let max_concurrency = match spec.max_concurrency {
        None => DEFAULT_MAX_CONCURRENCY,
        Some(0) => {
            return Err(invalid(format!("{F}.maxConcurrency"), "must be at least 1"));
        }
        Some(n) => n,
    };

    let config = match &spec.config {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(v @ serde_json::Value::Object(_)) => v.clone(),
        Some(_) => return Err(invalid(format!("{F}.config"), "must be an object")),
    };

    // Every value of the Secret is redacted, not only those passed as env: a program may read
    // the others through some other path (a mounted file, a config lookup).
    let redactor = Redactor::new(class.credentials.iter().flat_map(|c| c.values()));

    Ok(ExecConfig {
        node_class: class.name.clone(),
        cluster_name: class.cluster_name.clone(),
        program: program.clone(),
        args: args.to_vec(),
        working_dir,
        env,
        timeout,
        max_concurrency,
        config,
        redactor,
    })
}

fn secret_value(class: &ResolvedClass, field: &str, key: &str) -> Result<String> {
    let field = format!("{field}.secretKey");
    if class.spec.credentials_secret_ref.is_none() {
        return Err(invalid(
            field,
            format!(
                "takes key {key:?} from the credentials Secret, but spec.credentialsSecretRef is not set"
            ),
        ));
    }
    let Some(creds) = &class.credentials else {
        return Err(ProviderError::Unauthorized(format!(
            "{field}: the credentials Secret of spec.credentialsSecretRef was not read"
        )));
    };
    if !creds.0.contains_key(key) {
        return Err(invalid(
            field,
            format!("the credentials Secret has no key {key:?}"),
        ));
    }
    creds.get_str(key).map(str::to_string).ok_or_else(|| {
        invalid(
            field,
            format!("the value of key {key:?} in the credentials Secret is not UTF-8"),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube_node_crds::NodeClassSpec;
    use kube_node_crds::v1alpha1::{
        ExecEnvVar, ExecProviderSpec, ProviderSpec, ProviderType, SecretReference,
    };
    use kube_node_provider::Credentials;

    use super::*;

    fn class(spec: ExecProviderSpec, creds: Option<&[(&str, &[u8])]>) -> ResolvedClass {
        ResolvedClass {
            name: "lab".into(),
            generation: 1,
            spec: NodeClassSpec {
                provider: ProviderSpec {
                    type_: ProviderType::Exec,
                    simulated: None,
                    aws: None,
                    exec: Some(spec),
                    baremetal: None,
                    gke: None,
                },
                credentials_secret_ref: creds.map(|_| SecretReference {
                    name: "lab-creds".into(),
                    namespace: "kube-node".into(),
                }),
                labels: BTreeMap::new(),
                taints: vec![],
                capacity: BTreeMap::new(),
                allocatable: None,
                bootstrap: None,
                timeouts: None,
            },
            credentials: creds.map(|kv| {
                Credentials(
                    kv.iter()
                        .map(|(k, v)| (k.to_string(), v.to_vec()))
                        .collect(),
                )
            }),
            cluster_name: "test".into(),
            inventory: None,
            claims: None,
        }
    }

    fn spec(command: &[&str]) -> ExecProviderSpec {
        ExecProviderSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn plain(name: &str, value: &str) -> ExecEnvVar {
        ExecEnvVar {
            name: name.into(),
            value: Some(value.into()),
            secret_key: None,
        }
    }

    fn from_secret(name: &str, key: &str) -> ExecEnvVar {
        ExecEnvVar {
            name: name.into(),
            value: None,
            secret_key: Some(key.into()),
        }
    }

    fn err(c: &ResolvedClass) -> ProviderError {
        validate_spec(c).expect_err("invalid")
    }

    #[test]
    fn defaults() {
        let c = validate_spec(&class(spec(&["/bin/prog", "-v"]), None)).expect("valid");
        assert_eq!(c.program, "/bin/prog");
        assert_eq!(c.args, vec!["-v"]);
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.max_concurrency, DEFAULT_MAX_CONCURRENCY);
        assert_eq!(c.config, serde_json::json!({}));
    }

    #[test]
    fn empty_command_names_the_field() {
        let e = err(&class(spec(&[]), None));
        assert_eq!(
            e,
            ProviderError::InvalidConfig("spec.provider.exec.command: must not be empty".into())
        );
        let e = err(&class(spec(&[""]), None));
        assert!(
            e.message().starts_with("spec.provider.exec.command[0]:"),
            "{e}"
        );
    }

    #[test]
    fn missing_secret_key_names_the_field_without_values() {
        let mut s = spec(&["prog"]);
        s.env = vec![
            plain("A", "1"),
            from_secret("TOKEN", "token"),
            from_secret("OTHER", "absent"),
        ];
        let secret = b"super-secret-token-value";
        let e = err(&class(s, Some(&[("token", secret)])));
        assert_eq!(e.reason(), "InvalidConfig");
        assert!(
            e.message()
                .starts_with("spec.provider.exec.env[2].secretKey:"),
            "{e}"
        );
        assert!(!e.to_string().contains("super-secret"));
    }

    #[test]
    fn secret_values_resolve_and_are_hidden_from_debug() {
        let mut s = spec(&["prog"]);
        s.env = vec![from_secret("TOKEN", "token"), plain("PLAIN", "visible")];
        let c = validate_spec(&class(s, Some(&[("token", b"super-secret-token-value")])))
            .expect("valid");
        assert_eq!(c.env[0].value, "super-secret-token-value");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("super-secret"), "{dbg}");
        assert!(dbg.contains("visible"));
    }

    #[test]
    fn secret_key_without_secret_ref_is_invalid() {
        let mut s = spec(&["prog"]);
        s.env = vec![from_secret("TOKEN", "token")];
        let e = err(&class(s, None));
        assert!(
            e.message()
                .starts_with("spec.provider.exec.env[0].secretKey:"),
            "{e}"
        );
    }

    #[test]
    fn bad_fields() {
        let mut s = spec(&["prog"]);
        s.max_concurrency = Some(0);
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.maxConcurrency:")
        );
        let mut s = spec(&["prog"]);
        s.timeout = Some("0s".parse().expect("duration"));
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.timeout:")
        );
        let mut s = spec(&["prog"]);
        s.timeout = Some("-1s".parse().expect("duration"));
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.timeout:")
        );
        let mut s = spec(&["prog"]);
        s.config = Some(serde_json::json!([1]));
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.config:")
        );
        let mut s = spec(&["prog"]);
        s.env = vec![plain("A=B", "x")];
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.env[0].name:")
        );
        let mut s = spec(&["prog"]);
        s.env = vec![plain(PROTOCOL_VERSION_ENV, "v2")];
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.env[0].name:")
        );
        let mut s = spec(&["prog"]);
        s.env = vec![ExecEnvVar {
            name: "X".into(),
            value: Some("a".into()),
            secret_key: Some("b".into()),
        }];
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.env[0]:")
        );
        let mut s = spec(&["prog"]);
        s.working_dir = Some(String::new());
        assert!(
            err(&class(s, None))
                .message()
                .starts_with("spec.provider.exec.workingDir:")
        );
    }

    #[test]
    fn no_exec_section() {
        let mut c = class(spec(&["prog"]), None);
        c.spec.provider.exec = None;
        assert!(err(&c).message().starts_with("spec.provider.exec:"));
    }
}
