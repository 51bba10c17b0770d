//! What `kube-node` writes into files: plain text, no ANSI colour codes (`kube-node simulate >
//! out.txt`, `kube-node run 2>log`). Colour is only for terminals, and never with `NO_COLOR`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kube-node");

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("kube-node-plain-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A command with a clean kube-node environment (no inherited `KUBE_NODE_*`, `NO_COLOR`).
fn kube_node() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("KUBE_NODE_")
            || k.starts_with("POD_")
            || k == "KUBECONFIG"
            || k == "NO_COLOR"
        {
            c.env_remove(k);
        }
    }
    c
}

fn assert_plain(what: &str, text: &str) {
    assert!(
        !text.contains('\u{1b}'),
        "{what} holds ANSI escape sequences:\n{}",
        text.escape_debug()
    );
}

const TINY_SCENARIO: &str = r#"description: a tiny scenario
steps:
  - name: create a NodeClass and a NodeSet of 1
    apply:
      - apiVersion: kube-node.io/v1alpha1
        kind: NodeClass
        metadata: {name: tiny}
        spec:
          provider: {type: simulated, simulated: {bootDelay: 0s, deleteDelay: 0s}}
      - apiVersion: kube-node.io/v1alpha1
        kind: NodeSet
        metadata: {name: tiny}
        spec:
          replicas: 1
          selector: {matchLabels: {kube-node.io/nodeset: tiny}}
          template:
            metadata: {labels: {kube-node.io/nodeset: tiny}}
            spec: {nodeClassName: tiny}
    expect: {nodeSet: tiny, readyReplicas: 1, nodes: 1, machines: 1}
    timeout: 60s
"#;

#[test]
fn simulate_writes_plain_text_into_files() {
    let dir = TempDir::new("simulate");
    let scenario = dir.path("tiny.yaml");
    std::fs::write(&scenario, TINY_SCENARIO).expect("scenario");
    let (out, err) = (dir.path("out.txt"), dir.path("err.txt"));
    let status = kube_node()
        // Controller logs on stderr too, so both streams carry log lines.
        .env("KUBE_NODE_LOG", "info")
        .args(["simulate", scenario.to_str().expect("utf-8")])
        .stdout(std::fs::File::create(&out).expect("out.txt"))
        .stderr(std::fs::File::create(&err).expect("err.txt"))
        .status()
        .expect("run kube-node simulate");
    let stdout = std::fs::read_to_string(&out).expect("out.txt");
    let stderr = std::fs::read_to_string(&err).expect("err.txt");
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("total"), "{stdout}");
    assert!(
        stderr.contains("INFO"),
        "log lines expected on stderr:\n{stderr}"
    );
    assert_plain("stdout", &stdout);
    assert_plain("stderr", &stderr);
}

#[test]
fn run_writes_plain_log_lines_into_a_file() {
    let dir = TempDir::new("run");
    // An API server that is not there: `run` logs and then fails; the log lines are the test.
    let kubeconfig = dir.path("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .expect("kubeconfig");
    let log = dir.path("log");
    let mut child = kube_node()
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBE_NODE_LOG", "debug")
        .args(["run", "--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start kube-node run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("DEBUG") || text.contains("INFO"),
        "log lines expected:\n{text}"
    );
    assert_plain("the log file", &text);
}
