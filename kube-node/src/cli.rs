//! Command-line flags. Every flag has an environment-variable fallback (`KUBE_NODE_*`).
//!
//! Boolean flags follow the Kubernetes (pflag) convention: `--flag` alone means true and
//! `--flag=true|false` sets it explicitly. The value must be attached with `=`, as in
//! kube-controller-manager, so `--quiet scenario.yaml` never reads the scenario as the value.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// kube-node: Kubernetes controllers that let a cluster manage its own machines.
#[derive(Debug, Parser)]
#[command(name = "kube-node", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "KUBE_NODE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(
        long,
        env = "KUBE_NODE_LOG",
        default_value = "info,kube_runtime=warn,kube_client=warn",
        global = true
    )]
    pub log_filter: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers against the cluster in KUBECONFIG (or the in-cluster config).
    Run(Box<RunArgs>),
    /// Print the CRD YAML (`kube-node crds | kubectl apply -f -`).
    Crds,
    /// Run the real controllers against an embedded API with the simulated provider.
    Simulate(SimulateArgs),
}

/// Flags of `kube-node run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// The name of this cluster; every machine is tagged with it, and the orphan collector only
    /// ever touches machines carrying it.
    #[arg(long, env = "KUBE_NODE_CLUSTER_NAME", default_value = "kube-node")]
    pub cluster_name: String,
    /// Where to serve /live, /ready and /metrics.
    #[arg(long, env = "KUBE_NODE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub controllers: ControllerArgs,
    #[command(flatten)]
    pub leader: LeaderArgs,
    #[command(flatten)]
    pub autoscaler: AutoscalerArgs,
    /// How long in-flight reconciles and provider calls may take to finish on SIGTERM.
    #[arg(long, env = "KUBE_NODE_SHUTDOWN_TIMEOUT", default_value = "30s")]
    pub shutdown_timeout: kube::core::Duration,
    /// Play the kubelet for machines of the simulated backend (register them onto their Nodes
    /// and keep their Leases fresh). Only meaningful with `simulated` NodeClasses.
    #[arg(
        long,
        env = "KUBE_NODE_SIMULATED_KUBELET",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub simulated_kubelet: bool,
}

/// The cluster-autoscaler `externalgrpc` server.
#[derive(Clone, Debug, Args)]
pub struct AutoscalerArgs {
    /// Serve cluster-autoscaler's externalgrpc CloudProvider on this address (off when unset).
    #[arg(long, env = "KUBE_NODE_AUTOSCALER_GRPC_ADDR")]
    pub autoscaler_grpc_addr: Option<SocketAddr>,
    /// The server certificate (PEM) of the gRPC server.
    #[arg(
        long,
        env = "KUBE_NODE_AUTOSCALER_TLS_CERT",
        requires = "autoscaler_tls_key"
    )]
    pub autoscaler_tls_cert: Option<PathBuf>,
    /// The server key (PEM).
    #[arg(
        long,
        env = "KUBE_NODE_AUTOSCALER_TLS_KEY",
        requires = "autoscaler_tls_cert"
    )]
    pub autoscaler_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs cluster-autoscaler's client certificate.
    #[arg(
        long,
        env = "KUBE_NODE_AUTOSCALER_TLS_CLIENT_CA",
        requires = "autoscaler_tls_cert"
    )]
    pub autoscaler_tls_client_ca: Option<PathBuf>,
    /// Serve without TLS; only allowed on a loopback address.
    #[arg(
        long,
        env = "KUBE_NODE_AUTOSCALER_ALLOW_PLAINTEXT",
        default_value_t = false,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub autoscaler_allow_plaintext: bool,
}

impl AutoscalerArgs {
    /// The server's configuration, when it is enabled.
    pub fn config(&self) -> Option<kube_node_autoscaler::Config> {
        let addr = self.autoscaler_grpc_addr?;
        let tls = match (
            &self.autoscaler_tls_cert,
            &self.autoscaler_tls_key,
            &self.autoscaler_tls_client_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(kube_node_autoscaler::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            }),
            _ => None,
        };
        Some(kube_node_autoscaler::Config {
            addr,
            tls,
            allow_plaintext: self.autoscaler_allow_plaintext,
        })
    }
}

/// Leader election.
#[derive(Clone, Debug, Args)]
pub struct LeaderArgs {
    /// Campaign for a Lease and act only while holding it (run two replicas safely).
    #[arg(
        long,
        env = "KUBE_NODE_LEADER_ELECT",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub leader_elect: bool,
    /// The Lease's namespace (default: the pod's namespace, else kube-node-system).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-node-system")]
    pub leader_election_namespace: String,
    /// The Lease's name.
    #[arg(
        long,
        env = "KUBE_NODE_LEADER_ELECTION_ID",
        default_value = "kube-node"
    )]
    pub leader_election_id: String,
    /// This replica's identity (default: the pod name, else host name and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub leader_identity: Option<String>,
    /// How long a Lease stays valid after its last renewal.
    #[arg(long, env = "KUBE_NODE_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: kube::core::Duration,
    /// How often the leader renews its Lease.
    #[arg(long, env = "KUBE_NODE_LEASE_RENEW_INTERVAL", default_value = "5s")]
    pub lease_renew_interval: kube::core::Duration,
}

/// Kubernetes client settings.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// Client-side rate limit: requests per second to the API server, per controller (each
    /// controller has its own client and token bucket, as in kube-controller-manager).
    #[arg(long, env = "KUBE_NODE_KUBE_QPS", default_value_t = 200.0)]
    pub kube_qps: f64,
    /// Client-side rate limit: burst above the steady rate, per controller.
    #[arg(long, env = "KUBE_NODE_KUBE_BURST", default_value_t = 400)]
    pub kube_burst: u32,
}

/// Controller tuning.
#[derive(Clone, Debug, Args)]
pub struct ControllerArgs {
    /// Parallel Node reconciles.
    #[arg(long, env = "KUBE_NODE_NODE_CONCURRENCY", default_value_t = 32)]
    pub node_concurrency: u16,
    /// Parallel NodeSet reconciles.
    #[arg(long, env = "KUBE_NODE_NODESET_CONCURRENCY", default_value_t = 16)]
    pub nodeset_concurrency: u16,
    /// A machine with no Node is collected only once it is older than this (so an in-flight
    /// create is never touched).
    #[arg(long, env = "KUBE_NODE_ORPHAN_MIN_AGE", default_value = "10m")]
    pub orphan_min_age: kube::core::Duration,
    /// The orphan collector pauses when more than this share of a NodeClass's machines would
    /// be deleted at once.
    #[arg(long, env = "KUBE_NODE_ORPHAN_MAX_FRACTION", default_value_t = 0.2)]
    pub orphan_max_fraction: f64,
    /// How often the orphan collector runs.
    #[arg(long, env = "KUBE_NODE_ORPHAN_GC_INTERVAL", default_value = "60s")]
    pub orphan_gc_interval: kube::core::Duration,
    /// The API server endpoint machines join when their NodeClass names none (default: the
    /// server kube-node talks to).
    #[arg(long, env = "KUBE_NODE_API_SERVER_ENDPOINT")]
    pub api_server_endpoint: Option<String>,
}

/// Flags of `kube-node simulate`.
#[derive(Clone, Debug, Args)]
pub struct SimulateArgs {
    /// The scenario file; default: examples/scenario-default.yaml's built-in copy.
    #[arg(env = "KUBE_NODE_SCENARIO")]
    pub scenario: Option<PathBuf>,
    /// Print a progress line this often.
    #[arg(long, env = "KUBE_NODE_PROGRESS_INTERVAL", default_value = "1s")]
    pub progress_interval: kube::core::Duration,
    /// Delay watch events by this much, to show the controllers do not overshoot on a stale
    /// cache.
    #[arg(long, env = "KUBE_NODE_WATCH_LAG", default_value = "0s")]
    pub watch_lag: kube::core::Duration,
    /// Print no progress lines, only the summary.
    #[arg(
        long,
        env = "KUBE_NODE_QUIET",
        default_value_t = false,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub quiet: bool,
    #[command(flatten)]
    pub controllers: ControllerArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> RunArgs {
        let argv = ["kube-node", "run"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Run(r)) => *r,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn simulate(args: &[&str]) -> SimulateArgs {
        let argv = ["kube-node", "simulate"]
            .into_iter()
            .chain(args.iter().copied());
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Simulate(s)) => s,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn boolean_flags_accept_the_bare_form_and_an_attached_value() {
        // Defaults.
        let d = run(&[]);
        assert!(d.leader.leader_elect && d.simulated_kubelet);
        assert!(!d.autoscaler.autoscaler_allow_plaintext);
        assert!(!simulate(&[]).quiet);
        // The bare form means true, as for every Kubernetes component.
        assert!(run(&["--leader-elect"]).leader.leader_elect);
        assert!(run(&["--simulated-kubelet"]).simulated_kubelet);
        assert!(
            run(&["--autoscaler-allow-plaintext"])
                .autoscaler
                .autoscaler_allow_plaintext
        );
        assert!(simulate(&["--quiet"]).quiet);
        // `--flag=false` and `--flag=true`.
        assert!(!run(&["--leader-elect=false"]).leader.leader_elect);
        assert!(run(&["--leader-elect=true"]).leader.leader_elect);
        assert!(!run(&["--simulated-kubelet=false"]).simulated_kubelet);
        assert!(
            run(&["--autoscaler-allow-plaintext=true"])
                .autoscaler
                .autoscaler_allow_plaintext
        );
        assert!(!simulate(&["--quiet=false"]).quiet);
        // strconv.ParseBool spellings.
        assert!(!run(&["--leader-elect=0"]).leader.leader_elect);
        // A bare boolean never swallows the next word.
        let s = simulate(&["--quiet", "my-scenario.yaml"]);
        assert!(s.quiet);
        assert_eq!(s.scenario, Some(PathBuf::from("my-scenario.yaml")));
        let r = run(&["--leader-elect", "--cluster-name", "prod"]);
        assert!(r.leader.leader_elect);
        assert_eq!(r.cluster_name, "prod");
    }

    #[test]
    fn a_bad_boolean_value_is_an_error_naming_the_flag() {
        let err = Cli::try_parse_from(["kube-node", "run", "--leader-elect=maybe"])
            .expect_err("not a boolean");
        assert!(err.to_string().contains("--leader-elect"), "{err}");
    }
}
