//! Fixtures of the exec backend's tests: temporary directories, NodeClass builders, throwaway
//! programs, and process checks for "no zombie, nothing left running".
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube_node_crds::NodeClassSpec;
use kube_node_crds::v1alpha1::{
    ExecEnvVar, ExecProviderSpec, ProviderSpec, ProviderType, SecretReference,
};
use kube_node_provider::{Credentials, ResolvedClass};

/// The cluster name of every test class.
pub const CLUSTER: &str = "exec-test";
/// The NodeClass name of every test class.
pub const CLASS: &str = "exec-lab";

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "kube-node-exec-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an executable `#!/bin/sh` script.
pub fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// The reference program shipped in examples/.
pub fn reference_program() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/exec-provider/machines.py")
}

/// An exec spec running `command`.
pub fn spec(command: &[&str]) -> ExecProviderSpec {
    ExecProviderSpec {
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The reference program against `state_dir`, with `config` merged into the config blob.
pub fn reference_spec(state_dir: &Path, config: serde_json::Value) -> ExecProviderSpec {
    let program = reference_program();
    let mut blob = serde_json::json!({ "stateDir": state_dir });
    if let (Some(b), serde_json::Value::Object(extra)) = (blob.as_object_mut(), config) {
        b.extend(extra);
    }
    ExecProviderSpec {
        command: vec!["python3".into(), program.display().to_string()],
        timeout: Some("60s".parse().expect("duration")),
        max_concurrency: Some(8),
        config: Some(blob),
        ..Default::default()
    }
}

pub fn plain(name: &str, value: &str) -> ExecEnvVar {
    ExecEnvVar {
        name: name.into(),
        value: Some(value.into()),
        secret_key: None,
    }
}

pub fn from_secret(name: &str, key: &str) -> ExecEnvVar {
    ExecEnvVar {
        name: name.into(),
        value: None,
        secret_key: Some(key.into()),
    }
}

/// A resolved NodeClass of the exec backend, with credentials when given.
pub fn class(spec: ExecProviderSpec, creds: Option<&[(&str, &str)]>) -> ResolvedClass {
    ResolvedClass {
        name: CLASS.into(),
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
                namespace: "kube-node".into(),
                name: "exec-creds".into(),
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
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            )
        }),
        cluster_name: CLUSTER.into(),
        inventory: None,
        claims: None,
    }
}

/// The machines the reference program keeps in `state_dir` (its `machines/<id>.json` files),
/// sorted by id. This is what an end-to-end test inspects: each has `id`, `providerId`,
/// `idempotencyKey` (the Node UID), `nodeName`, `tags`, `deleteRequestedUnix` (null unless a
/// delete is in progress with `deleteSeconds` > 0).
pub fn reference_machines(state_dir: &Path) -> Vec<serde_json::Value> {
    let dir = state_dir.join("machines");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<serde_json::Value> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("json"))
        .map(|p| {
            serde_json::from_slice(&std::fs::read(&p).expect("read machine"))
                .expect("machine file is JSON")
        })
        .collect();
    out.sort_by_key(|m| m["id"].as_str().unwrap_or_default().to_string());
    out
}

/// `(state, ppid)` of a process, from `/proc/<pid>/stat`; `None` when it does not exist.
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Reads a pid a test program wrote.
pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("a pid")
}

/// Asserts the test process's child `pid` was reaped: it is neither running nor a zombie of
/// ours. Called right after the provider call returned, without waiting: reaping is part of
/// the call.
pub fn assert_reaped(pid: i32) {
    let me = std::process::id() as i32;
    if let Some((state, ppid)) = proc_stat(pid) {
        assert!(
            ppid != me,
            "program {pid} is still a child of the test process (state {state})"
        );
    }
}

/// Waits (bounded) until `pid` is dead: gone, or a zombie that is not ours (a killed
/// grandchild is reparented to init, which reaps it when it gets to it).
pub async fn assert_dies(pid: i32) {
    let me = std::process::id() as i32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match proc_stat(pid) {
            None => return,
            Some(('Z', ppid)) if ppid != me => return,
            Some((state, ppid)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "process {pid} still alive after 10s (state {state}, ppid {ppid})"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) for a file a test program writes.
pub async fn wait_for_file(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
