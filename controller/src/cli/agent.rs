//! Agent credential verbs: `agent add|rotate|revoke|list`. A new secret is printed once on
//! stdout and never stored by the controller: `controller.toml` gets only its SHA-256, through
//! one atomic rewrite that keeps the rest of the file (comments included) as written. A
//! running controller reads the changed entries at the next Hello; a session already open
//! stays open until that agent reconnects.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::json;
use unidesk_protocol::{AgentId, Secret};

use super::{CliError, ConfigArg, output};
use crate::auth::{hash_secret, new_secret};
use crate::config::{AgentEdit, AgentEditError, ControllerConfig, rewrite_agents};

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Enrol an agent: a new secret, printed once; the controller config keeps its hash.
    Add {
        id: AgentId,
        /// Also write a ready agent config here (refused if the file exists): the controller's
        /// gateway, `ca.crt` and directories beside it, the secret.
        #[arg(long, value_name = "PATH")]
        agent_config: Option<PathBuf>,
        /// Egress proxy port for the written agent config.
        #[arg(long, default_value_t = 18789)]
        proxy_port: u16,
        /// Write the agent config for the unidesk-agent package's unit: its directories in
        /// /var/lib/unidesk-agent instead of beside the file.
        #[arg(long, requires = "agent_config")]
        packaged: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Give an agent a new secret (printed once); the old one is refused from the next Hello.
    /// Also lifts a revocation.
    Rotate {
        id: AgentId,
        /// Also put the new secret into this agent config (its `id` must match).
        #[arg(long, value_name = "PATH")]
        agent_config: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Refuse an agent's secret from the next Hello on; the entry stays (rotate re-admits it).
    Revoke {
        id: AgentId,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The enrolled agents: id, revoked, connected (null when the controller is not running).
    List(ConfigArg),
}

fn edit_error(e: AgentEditError) -> CliError {
    match e {
        AgentEditError::Write { .. } => CliError::Failed(e.into()),
        other => CliError::Input(other.into()),
    }
}

/// The agent config named by `--agent-config` for `rotate`: its text, after checking it is
/// that agent's.
fn read_agent_config(path: &Path, id: &AgentId) -> Result<toml_edit::DocumentMut, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(anyhow!("cannot read {}: {e}", path.display())))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| CliError::Input(anyhow!("{} is not TOML: {e}", path.display())))?;
    match doc.get("id").and_then(toml_edit::Item::as_str) {
        Some(found) if found == id.as_str() => Ok(doc),
        found => Err(CliError::Input(anyhow!(
            "{} is the config of agent {:?}, not of {id}",
            path.display(),
            found.unwrap_or("<no id>")
        ))),
    }
}

/// Replaces `secret` in an agent config, keeping the rest of the file, its mode, owner and
/// group.
fn write_agent_secret(
    path: &Path,
    mut doc: toml_edit::DocumentMut,
    secret: &Secret,
) -> Result<(), CliError> {
    doc["secret"] = toml_edit::value(secret.expose());
    unidesk_agent::atomic::rewrite_file(path, doc.to_string().as_bytes())
        .map_err(|e| CliError::Failed(anyhow!("cannot write {}: {e}", path.display())))
}

/// Runs one `agent` verb.
pub(super) async fn run(command: AgentCommand) -> Result<(), CliError> {
    match command {
        AgentCommand::Add {
            id,
            agent_config,
            proxy_port,
            packaged,
            config,
        } => {
            let controller = config.load()?;
            if let Some(path) = &agent_config
                && path.exists()
            {
                return Err(CliError::Input(anyhow!(
                    "{} exists; refusing to overwrite an agent config",
                    path.display()
                )));
            }
            let secret = new_secret();
            let edit = AgentEdit::Add {
                id: id.clone(),
                secret_sha256: hash_secret(&secret),
            };
            rewrite_agents(&config.config, &edit).map_err(edit_error)?;
            if let Some(path) = &agent_config {
                let agent = crate::init::agent_config(
                    &id,
                    secret.clone(),
                    controller.gateway.listen,
                    proxy_port,
                    crate::init::Layout::packaged(packaged),
                );
                crate::init::write_agent_config(path, &agent)
                    .map_err(|e| CliError::Failed(e.into()))?;
            }
            tracing::info!(agent = %id, "agent enrolled");
            output::print(&json!({
                "ok": true,
                "agent": id,
                "secret": secret.expose(),
                "controllerConfig": config.config,
                "agentConfig": agent_config,
                "next": [
                    "keep the secret in the agent's config (`secret`) or in UNIDESK_AGENT_SECRET; it is not shown again",
                    format!("unidesk-agent run --config {}", agent_config.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| format!("/etc/unidesk/agent-{id}.toml"))),
                ],
            }));
            Ok(())
        }
        AgentCommand::Rotate {
            id,
            agent_config,
            config,
        } => {
            config.load()?;
            let doc = agent_config
                .as_deref()
                .map(|p| read_agent_config(p, &id))
                .transpose()?;
            let secret = new_secret();
            let edit = AgentEdit::Rotate {
                id: id.clone(),
                secret_sha256: hash_secret(&secret),
            };
            rewrite_agents(&config.config, &edit).map_err(edit_error)?;
            if let (Some(path), Some(doc)) = (&agent_config, doc) {
                write_agent_secret(path, doc, &secret)?;
            }
            tracing::info!(agent = %id, "agent secret rotated");
            output::print(&json!({
                "ok": true,
                "agent": id,
                "secret": secret.expose(),
                "controllerConfig": config.config,
                "agentConfig": agent_config,
                "next": [
                    "the old secret is refused from the agent's next connection; restart the agent with the new one",
                ],
            }));
            Ok(())
        }
        AgentCommand::Revoke { id, config } => {
            config.load()?;
            rewrite_agents(&config.config, &AgentEdit::Revoke { id: id.clone() })
                .map_err(edit_error)?;
            tracing::info!(agent = %id, "agent revoked");
            output::print(&json!({
                "ok": true,
                "agent": id,
                "revoked": true,
                "controllerConfig": config.config,
                "next": [
                    format!("a session open now stays open until {id} reconnects: restart the controller to end it"),
                    format!("unidesk-controller agent rotate {id} re-admits it with a new secret"),
                ],
            }));
            Ok(())
        }
        AgentCommand::List(config) => {
            let controller = config.load()?;
            let connected = connected(&controller).await;
            let rows: Vec<_> = controller
                .agents
                .iter()
                .map(|a| {
                    json!({
                        "id": a.id,
                        "revoked": a.revoked,
                        "connected": connected.as_ref().map(|c| c.contains(&a.id.to_string())),
                    })
                })
                .collect();
            output::print(&rows);
            Ok(())
        }
    }
}

/// The ids connected now, or `None` when no controller answers on the admin socket.
async fn connected(config: &ControllerConfig) -> Option<Vec<String>> {
    let data = super::jobs::admin(config, &crate::admin::AdminRequest::Agents)
        .await
        .ok()?;
    Some(
        data.as_array()?
            .iter()
            .filter_map(|a| a["id"].as_str().map(str::to_string))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotate_refuses_another_agents_config_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-d601.toml");
        std::fs::write(
            &path,
            "# node D601\nid = \"d601\"\nsecret = \"old\"\n\n[controller]\nurl = \"wss://x/agent\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let other = AgentId::new("d518").unwrap();
        let err = read_agent_config(&path, &other).unwrap_err();
        assert!(
            err.to_string()
                .contains("config of agent \"d601\", not of d518"),
            "{err}"
        );
        let doc = read_agent_config(&path, &AgentId::new("d601").unwrap()).unwrap();
        write_agent_secret(&path, doc, &Secret::new("new-secret")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# node D601\n"), "{text}");
        assert!(text.contains("secret = \"new-secret\""), "{text}");
        assert!(text.contains("url = \"wss://x/agent\""), "{text}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
    }
}
