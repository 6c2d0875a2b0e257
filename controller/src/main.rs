//! `unidesk-controller`: parses the command line, sets up logging, runs the verb.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("UNIDESK_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = unidesk_controller::cli::Cli::parse();
    if let Err(e) = unidesk_controller::cli::run(cli).await {
        tracing::error!("{e}");
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
