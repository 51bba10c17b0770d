//! The `kube-node` binary's library: flags, wiring of the controllers, the health and metrics
//! endpoint, and the `simulate` command that runs the real controllers against the embedded API.

pub mod cli;
pub mod harness;
pub mod http;
pub mod leader;
pub mod run;
pub mod simulate;
pub mod telemetry;

use anyhow::Context as _;

/// Runs one command of the binary to completion.
pub fn main(cli: cli::Cli) -> anyhow::Result<()> {
    // kube and every other TLS user must agree on one crypto provider; mixing ring and aws-lc
    // panics at client creation.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The simulation prints its own progress view; controller logs would drown it.
    let filter = match (&cli.command, std::env::var_os("KUBE_NODE_LOG")) {
        (cli::Command::Simulate(_), None) => "warn",
        _ => cli.log_filter.as_str(),
    };
    telemetry::init(cli.log_format, filter)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            cli::Command::Run(args) => run::run(*args).await,
            cli::Command::Crds => {
                print!("{}", kube_node_crds::crd_yaml()?);
                Ok(())
            }
            cli::Command::Simulate(args) => simulate::simulate(args).await,
        }
    })
}
