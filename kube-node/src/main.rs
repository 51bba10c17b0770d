//! The `kube-node` binary: parses flags and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = kube_node::cli::Cli::parse();
    match kube_node::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
