//! `unidesk-agent`: parses the command line, sets up logging, runs the verb.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use unidesk_agent::config::{AgentConfig, DEFAULT_CONFIG};
use unidesk_protocol::Secret;

/// `unidesk-agent`
#[derive(Debug, Parser)]
#[command(
    name = "unidesk-agent",
    version,
    about = "Deploy agent for a UniDesk node",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The `--help` examples (also the EXTRA section of the man page).
const EXAMPLES: &str = "\
EXAMPLES:
  # Run under systemd (the packaged unit does this):
  unidesk-agent run --config /etc/unidesk/agent.toml
  # The secret from the environment instead of the file:
  UNIDESK_AGENT_SECRET=... unidesk-agent run
  # What this node can reach (Docker, containerd, k3s, controller):
  unidesk-agent check --config /etc/unidesk/agent.toml
  # Man pages and a bash completion script (what the package ships):
  unidesk-agent generate man --out target/man
  unidesk-agent generate completions bash --out target/completions";

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
        /// `json` (the default) or `text` (one line per component; coloured on a terminal
        /// unless NO_COLOR is set).
        #[arg(long, value_enum, default_value_t = Output::Json)]
        output: Output,
    },
    /// Write man pages or a shell completion script generated from these definitions.
    #[command(subcommand, hide = true)]
    Generate(unidesk_agent::manual::GenerateCommand),
}

/// How `check` prints its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Json,
    Text,
}

/// `check`'s report as lines: the outcome, the component and what was found.
fn check_text(reach: &[unidesk_protocol::Reach], colour: bool) -> String {
    let name = |r: &unidesk_protocol::Reach| {
        serde_json::to_value(r.component)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{:?}", r.component))
    };
    let width = reach.iter().map(|r| name(r).len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in reach {
        let (mark, tint) = if r.ok {
            ("ok    ", "\x1b[32m")
        } else {
            ("FAILED", "\x1b[31m")
        };
        let mark = if colour {
            format!("{tint}{mark}\x1b[0m")
        } else {
            mark.to_string()
        };
        out.push_str(&format!("{mark}  {:<width$}  {}\n", name(r), r.detail));
    }
    out
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
        Command::Check { config, output } => {
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
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "reach": reach}))?
                ),
                Output::Text => {
                    use std::io::IsTerminal;
                    let colour = std::io::stdout().is_terminal()
                        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
                    print!("{}", check_text(&reach, colour));
                }
            }
            Ok(if ok { 0 } else { 3 })
        }
        Command::Generate(what) => {
            let written = unidesk_agent::manual::generate(Cli::command(), &what)?;
            println!("{}", serde_json::json!({ "written": written }));
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unidesk_protocol::{Component, Reach};

    #[test]
    fn check_text_marks_each_component() {
        let reach = [
            Reach {
                component: Component::Docker,
                ok: true,
                detail: "Docker Engine 20.10 at /var/run/docker.sock".into(),
            },
            Reach {
                component: Component::Kubernetes,
                ok: false,
                detail: "kubeconfig /etc/rancher/k3s/k3s.yaml: No such file".into(),
            },
        ];
        assert_eq!(
            check_text(&reach, false),
            "ok      docker      Docker Engine 20.10 at /var/run/docker.sock\n\
             FAILED  kubernetes  kubeconfig /etc/rancher/k3s/k3s.yaml: No such file\n"
        );
        assert!(check_text(&reach, true).contains("\x1b[31mFAILED\x1b[0m"));
    }
}
