//! `unidesk-controller`: parses the command line, sets up logging, runs the verb.

use clap::Parser;

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("info");
    let cli = unidesk_controller::cli::Cli::parse();
    // https://no-color.org: any non-empty value turns colour off.
    unidesk_controller::cli::output::set_no_color(
        std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    );
    if let Err(e) = unidesk_controller::cli::run(cli).await {
        tracing::error!("{e}");
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
