//! Logging set-up for every binary of the project: `tracing` to stderr, filtered by
//! `UNIDESK_LOG` (an `EnvFilter` directive, `default` when unset), colours only on a terminal.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("UNIDESK_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
