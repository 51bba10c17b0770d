//! The test rack: sushy-tools (Redfish) and openssh-server (the hosts' OS), as started by
//! `tests/emulators/sushy.sh` and `tests/emulators/sshd.sh`.
//!
//! `tests/run.sh` starts both once per run and exports their `KUBE_NODE_SUSHY_*` and
//! `KUBE_NODE_SSHD_*` variables; a test process started without them (`cargo nextest run -p
//! kube-node-provider-baremetal`) starts its own through the same scripts, and a watchdog
//! stops them when the process exits. The emulator has 48 systems; every test takes its own
//! slice of them ([`Lab::hosts`]), so tests running at once never power each other's hosts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use kube_node_crds::v1alpha1::BaremetalHost;
use kube_node_provider::Credentials;

/// The rack of one test run.
#[derive(Clone, Debug)]
pub struct Lab {
    /// `http://127.0.0.1:PORT` of sushy-emulator.
    pub redfish_endpoint: String,
    /// Its login.
    pub redfish_username: String,
    /// Its per-run password.
    pub redfish_password: String,
    /// Its system ids, in name order (`host-00`, ...).
    pub systems: Vec<String>,
    /// `127.0.0.1:PORT` of sshd.
    pub ssh_addr: String,
    /// The SSH login.
    pub ssh_user: String,
    /// The host key sshd presents.
    pub host_key: String,
    /// A host key sshd never presents ("the host's key changed").
    pub other_host_key: String,
    /// The client key (OpenSSH PEM).
    pub client_key: String,
    /// Where the test `kubeadm` records its calls.
    pub kubeadm_log: PathBuf,
}

/// One call of the test `kubeadm`.
#[derive(Clone, Debug)]
pub struct KubeadmCall {
    /// Its arguments, space-joined.
    pub args: String,
    /// The JoinConfiguration it was given (`join --config`), if any.
    pub config: Option<String>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Runs `script start RUN` and reads its `export K=V` lines.
fn start(script: &str, run: &str) -> Result<BTreeMap<String, String>, String> {
    let root = repo_root();
    let path = root.join("tests/emulators").join(script);
    let install = Command::new(&path)
        .arg("install")
        .current_dir(&root)
        .status()
        .map_err(|e| format!("{script} install: {e}"))?;
    if !install.success() {
        return Err(format!("{script} install failed"));
    }
    let out = Command::new(&path)
        .args(["start", run])
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{script} start: {e}"))?;
    if !out.status.success() {
        return Err(format!("{script} start failed"));
    }
    let mut vars = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
            vars.insert(k.to_string(), v.trim_matches('\'').to_string());
        }
    }
    Ok(vars)
}

/// A process that stops this run's emulators when the test process exits (its stdin closes).
fn watchdog(run: &str) -> Option<std::process::ChildStdin> {
    let root = repo_root();
    let cmd =
        format!("read _; tests/emulators/sushy.sh stop {run}; tests/emulators/sshd.sh stop {run}");
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()
}

impl Lab {
    /// The run's rack: from the environment, or started for this process.
    pub fn shared() -> &'static Lab {
        static LAB: OnceLock<(Lab, Option<std::sync::Mutex<std::process::ChildStdin>>)> =
            OnceLock::new();
        &LAB.get_or_init(|| {
            if let Some(lab) = Self::from_env(&|k| var(k)) {
                return (lab, None);
            }
            let run = format!("baremetal-test-{}", std::process::id());
            let guard = watchdog(&run);
            let mut vars = start("sushy.sh", &run).unwrap_or_else(|e| panic!("{e}"));
            vars.extend(start("sshd.sh", &run).unwrap_or_else(|e| panic!("{e}")));
            let lab = Self::from_env(&|k| vars.get(k).cloned())
                .unwrap_or_else(|| panic!("the emulator scripts printed no usable variables"));
            (lab, guard.map(std::sync::Mutex::new))
        })
        .0
    }

    fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Option<Lab> {
        let key_path = get("KUBE_NODE_SSHD_CLIENT_KEY")?;
        Some(Lab {
            redfish_endpoint: get("KUBE_NODE_SUSHY_ENDPOINT")?,
            redfish_username: get("KUBE_NODE_SUSHY_USERNAME")?,
            redfish_password: get("KUBE_NODE_SUSHY_PASSWORD")?,
            systems: get("KUBE_NODE_SUSHY_SYSTEMS")?
                .split(',')
                .map(str::to_string)
                .collect(),
            ssh_addr: get("KUBE_NODE_SSHD_ADDR")?,
            ssh_user: get("KUBE_NODE_SSHD_USER")?,
            host_key: get("KUBE_NODE_SSHD_HOST_KEY")?,
            other_host_key: get("KUBE_NODE_SSHD_OTHER_HOST_KEY")?,
            client_key: std::fs::read_to_string(&key_path).ok()?,
            kubeadm_log: PathBuf::from(get("KUBE_NODE_SSHD_KUBEADM_LOG")?),
        })
    }

    /// The system URL of emulated host `i`.
    pub fn system_url(&self, i: usize) -> String {
        format!(
            "{}/redfish/v1/Systems/{}",
            self.redfish_endpoint, self.systems[i]
        )
    }

    /// Inventory entries for emulated hosts `first..first + n`, named `<prefix>-<i>`.
    pub fn hosts(&self, prefix: &str, first: usize, n: usize) -> Vec<BaremetalHost> {
        (first..first + n)
            .map(|i| BaremetalHost {
                name: format!("{prefix}-{i:02}"),
                redfish_url: self.system_url(i),
                ssh_address: self.ssh_addr.clone(),
                ssh_host_key: Some(self.host_key.clone()),
                labels: BTreeMap::from([(
                    "topology.kubernetes.io/zone".to_string(),
                    "rack-a".to_string(),
                )]),
            })
            .collect()
    }

    /// The credentials Secret's data: the shared BMC login and SSH key.
    pub fn credentials(&self) -> Credentials {
        Credentials(BTreeMap::from([
            (
                "bmc-username".into(),
                self.redfish_username.clone().into_bytes(),
            ),
            (
                "bmc-password".into(),
                self.redfish_password.clone().into_bytes(),
            ),
            (
                "ssh-private-key".into(),
                self.client_key.clone().into_bytes(),
            ),
        ]))
    }

    /// A `joinConfigPath` in this run's directory for `name` (so that no test writes the
    /// JoinConfiguration to `/etc/kubernetes` of the machine running the tests).
    pub fn join_config_path(&self, name: &str) -> String {
        let dir = self
            .kubeadm_log
            .parent()
            .map_or_else(|| self.kubeadm_log.clone(), Path::to_path_buf);
        dir.join("join")
            .join(format!("{name}.yaml"))
            .display()
            .to_string()
    }

    /// Holds `node`'s next `kubeadm join` for `secs` seconds after it recorded its
    /// JoinConfiguration (see `tests/emulators/sshd.sh`).
    pub fn hold_join(&self, node: &str, secs: u32) -> std::io::Result<()> {
        let dir = self
            .kubeadm_log
            .parent()
            .map_or_else(|| self.kubeadm_log.clone(), Path::to_path_buf)
            .join("delay");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(node), format!("{secs}\n"))
    }

    /// Whether a `kubeadm join` of `node` is running now (recorded its JoinConfiguration, not
    /// done yet).
    pub fn join_running(&self, node: &str) -> bool {
        let needle = format!("name: {node}\n");
        std::fs::read_dir(&self.kubeadm_log)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "args"))
                    .any(|p| {
                        std::fs::read_to_string(p.with_extension("config"))
                            .is_ok_and(|c| c.contains(&needle))
                    })
            })
            .unwrap_or(false)
    }

    /// Every `kubeadm` call recorded so far, oldest first.
    pub fn kubeadm_calls(&self) -> Vec<KubeadmCall> {
        read_calls(&self.kubeadm_log)
    }

    /// The `kubeadm join` calls whose JoinConfiguration names `node`.
    pub fn joins_of(&self, node: &str) -> Vec<KubeadmCall> {
        let needle = format!("name: {node}\n");
        self.kubeadm_calls()
            .into_iter()
            .filter(|c| {
                c.args.starts_with("join")
                    && c.config.as_deref().is_some_and(|s| s.contains(&needle))
            })
            .collect()
    }

    /// An emulated host's power state, read directly through Redfish (test checks).
    pub fn power_state(&self, i: usize) -> Option<String> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys,json,urllib.request,base64\nr=urllib.request.Request(sys.argv[1])\nr.add_header('Authorization','Basic '+base64.b64encode(sys.argv[2].encode()).decode())\nprint(json.load(urllib.request.urlopen(r,timeout=5))['PowerState'])",
                &self.system_url(i),
                &format!("{}:{}", self.redfish_username, self.redfish_password),
            ])
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
    }

    /// Sends a `ComputerSystem.Reset` to an emulated host directly (test setup).
    pub fn reset(&self, i: usize, reset_type: &str) -> bool {
        Command::new("python3")
            .args([
                "-c",
                "import sys,json,urllib.request,base64\nr=urllib.request.Request(sys.argv[1]+'/Actions/ComputerSystem.Reset',data=json.dumps({'ResetType':sys.argv[3]}).encode(),headers={'Content-Type':'application/json'})\nr.add_header('Authorization','Basic '+base64.b64encode(sys.argv[2].encode()).decode())\nurllib.request.urlopen(r,timeout=5)",
                &self.system_url(i),
                &format!("{}:{}", self.redfish_username, self.redfish_password),
                reset_type,
            ])
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn read_calls(dir: &Path) -> Vec<KubeadmCall> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs.into_iter()
        .map(|p| KubeadmCall {
            args: std::fs::read_to_string(&p)
                .unwrap_or_default()
                .trim()
                .to_string(),
            config: std::fs::read_to_string(p.with_extension("config")).ok(),
        })
        .collect()
}
