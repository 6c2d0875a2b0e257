//! `unidesk-controller`: parses the command line, sets up logging, runs the verb.

use clap::Parser;

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("info");
    let cli = unidesk_controller::cli::Cli::parse();
    if let Err(e) = unidesk_controller::cli::run(cli).await {
        tracing::error!("{e}");
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
