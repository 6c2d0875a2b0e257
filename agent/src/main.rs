//! `unidesk-agent`: parses the command line, sets up logging, runs the verb.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use unidesk_agent::config::{AgentConfig, DEFAULT_CONFIG};
use unidesk_protocol::Secret;

/// `unidesk-agent`
#[derive(Debug, Parser)]
#[command(
    name = "unidesk-agent",
    version,
    about = "Deploy agent for a UniDesk node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the controller and run launches until stopped.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Report which of Docker, containerd, Kubernetes, the proxy port and the controller
    /// this node can reach, and why not.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("info");
    let code = match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            // The environment wins over the file, so a secret need not be written to disk.
            let secret = std::env::var("UNIDESK_AGENT_SECRET")
                .ok()
                .map(Secret::new)
                .or_else(|| config.secret.clone())
                .context("no agent secret: set `secret` in the config or UNIDESK_AGENT_SECRET")?;
            let cancel = tokio_util::sync::CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down");
                stop.cancel();
            });
            let notifier = unidesk_agent::notify::Notifier::from_env();
            unidesk_agent::service::run(config, secret, notifier, cancel).await?;
            Ok(0)
        }
        Command::Check { config } => {
            let config = AgentConfig::load(&config)?;
            let controller = match unidesk_agent::conn::tls_config(&config) {
                Ok(_) => (
                    true,
                    format!("CA loads; controller at {}", config.controller.url),
                ),
                Err(e) => (false, e),
            };
            let reach = unidesk_agent::launch::probe::reach(&config, controller).await;
            let ok = reach.iter().all(|r| r.ok);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "reach": reach}))?
            );
            Ok(if ok { 0 } else { 3 })
        }
    }
}
