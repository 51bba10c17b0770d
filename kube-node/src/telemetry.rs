//! Logging set-up.

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Whether log lines may carry ANSI colour codes: only on a terminal, and never when
/// `NO_COLOR` is set to a non-empty value (<https://no-color.org>). `kube-node run 2>log` or a
/// container runtime's log file must hold plain text.
pub fn colour(stream_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stream_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Installs the global tracing subscriber. Logs go to stderr so `kube-node crds` output stays
/// clean.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None), "a file or a pipe gets plain text");
        assert!(!colour(true, Some(OsStr::new("1"))), "NO_COLOR=1");
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
