//! The controller's TOML configuration: where the gateway listens, its TLS files, the admin
//! socket, the state directory, the egress allowlist and each agent's credential hash.
//!
//! Paths are relative to the directory of the config file. Loading validates every key and
//! names the key and value that are wrong; nothing else reads configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unidesk_protocol::AgentId;

/// Default location of the controller configuration.
pub const DEFAULT_CONFIG: &str = "/etc/unidesk/controller.toml";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid controller configuration: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {key}={value:?} is not valid: {why}")]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
}

/// The whole controller configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub gateway: GatewayConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub egress: EgressConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredConfig>,
    /// `[metrics]`: the Prometheus endpoint; absent means nothing listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(default, rename = "agents")]
    pub agents: Vec<AgentCredential>,
    /// The directory the file was loaded from; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file itself (empty when built in code); the gateway re-reads its `[[agents]]`.
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[gateway]`: the WSS endpoint agents dial.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u32,
}

fn default_heartbeat_ms() -> u32 {
    5_000
}

/// `[admin]`: the Unix socket the CLI talks to. Its file mode (0600) is the access control.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub socket: PathBuf,
}

/// `[store]`: where jobs are kept (`<dir>/jobs/<jobId>/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub dir: PathBuf,
}

/// `[egress]`: which targets the tunnel may reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// `host:port` patterns (`github.com:443`, `*.debian.org:80`, `127.0.0.1:*`) and
    /// `cidr:` entries that allow otherwise-refused private, loopback or link-local addresses.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

// Written out, not derived: a file without `[egress]` must get the same 10 s connect deadline
// as one with an empty `[egress]` (a derived Default gave 0 ms, failing every egress dial).
impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}

/// `[tunnel]`: multiplexer sizing, shared with the agent's configuration.
pub use unidesk_link::TunnelConfig;

/// `[metrics]`: where `GET /metrics` listens (loopback only), the same section as the agent's.
pub use unidesk_agent::config::MetricsConfig;

/// `[desired]`: where the service catalog (`config.json`) is, and which repository holds the
/// desired-state branches that `--env` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DesiredConfig {
    pub catalog: PathBuf,
    /// URL of the desired-state repository `deploy plan|apply --env` fetches (`--repository`
    /// overrides it). Only the repository is configurable: the refs read are fixed by the
    /// program (`deploy/dev`, `deploy/prod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
}

/// `[[agents]]`: one agent id and the SHA-256 of its secret. The secret itself is never kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentCredential {
    pub id: AgentId,
    pub secret_sha256: String,
    #[serde(default)]
    pub revoked: bool,
}

impl ControllerConfig {
    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: ControllerConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.file = path.to_path_buf();
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every key's value; the error names the key and value (`load` runs it).
    pub(crate) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, why: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            value,
            why: why.into(),
        };
        let mut seen = std::collections::HashSet::new();
        for agent in &self.agents {
            if !seen.insert(agent.id.clone()) {
                return Err(invalid(
                    "agents.id",
                    agent.id.to_string(),
                    "listed more than once",
                ));
            }
            if agent.secret_sha256.len() != 64
                || !agent.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(invalid(
                    "agents.secret_sha256",
                    agent.secret_sha256.clone(),
                    "must be 64 hex digits (the SHA-256 of the agent's secret)",
                ));
            }
        }
        if self.gateway.heartbeat_ms < 100 {
            return Err(invalid(
                "gateway.heartbeat_ms",
                self.gateway.heartbeat_ms.to_string(),
                "must be at least 100",
            ));
        }
        self.tunnel.link().validate().map_err(|e| {
            invalid(
                "tunnel.max_connection_window",
                self.tunnel.max_connection_window.to_string(),
                &e.to_string(),
            )
        })?;
        crate::egress::EgressPolicy::parse(&self.egress.allow).map_err(|e| {
            invalid(
                "egress.allow",
                format!("{:?}", self.egress.allow),
                &e.to_string(),
            )
        })?;
        if let Some(metrics) = &self.metrics
            && let Err(why) = metrics.check()
        {
            return Err(invalid("metrics.listen", metrics.listen.to_string(), why));
        }
        Ok(())
    }

    /// Resolves a configured path against the config file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// A change to the `[[agents]]` entries of a controller configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEdit {
    /// A new entry; refused when the id is listed already.
    Add { id: AgentId, secret_sha256: String },
    /// A new hash for a listed id; it also lifts a revocation.
    Rotate { id: AgentId, secret_sha256: String },
    /// Marks a listed id revoked; the hash stays, so the entry still names the agent.
    Revoke { id: AgentId },
}

impl AgentEdit {
    /// The agent the edit is about.
    pub fn id(&self) -> &AgentId {
        match self {
            AgentEdit::Add { id, .. } | AgentEdit::Rotate { id, .. } | AgentEdit::Revoke { id } => {
                id
            }
        }
    }
}

/// An `[[agents]]` edit that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum AgentEditError {
    #[error("{path}: agent {id} is listed already; `agent rotate {id}` gives it a new secret")]
    Exists { path: PathBuf, id: AgentId },
    #[error("{path}: agent {id} is not listed; `agent add {id}` enrols it")]
    Unknown { path: PathBuf, id: AgentId },
    #[error("{path}: {why}")]
    Shape { path: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Applies `edit` to `text`, the contents of the controller configuration at `path`, keeping
/// comments, key order and every other table as written. The result is validated as
/// [`ControllerConfig::load`] would, so an edit never produces a file the controller refuses.
pub fn edit_agents(path: &Path, text: &str, edit: &AgentEdit) -> Result<String, AgentEditError> {
    let shape = |why: String| AgentEditError::Shape {
        path: path.to_path_buf(),
        why,
    };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        reason: format!("{e}"),
    })?;
    let id = edit.id().as_str();
    let item = doc
        .entry("agents")
        .or_insert_with(|| toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()));
    let Some(entries) = item.as_array_of_tables_mut() else {
        return Err(shape(
            "`agents` is not written as `[[agents]]` tables; rewrite it that way to edit it here"
                .into(),
        ));
    };
    let position = entries
        .iter()
        .position(|t| t.get("id").and_then(toml_edit::Item::as_str) == Some(id));
    match (edit, position) {
        (AgentEdit::Add { secret_sha256, .. }, None) => {
            let mut table = toml_edit::Table::new();
            table["id"] = toml_edit::value(id);
            table["secret_sha256"] = toml_edit::value(secret_sha256.as_str());
            table["revoked"] = toml_edit::value(false);
            entries.push(table);
        }
        (AgentEdit::Add { .. }, Some(_)) => {
            return Err(AgentEditError::Exists {
                path: path.to_path_buf(),
                id: edit.id().clone(),
            });
        }
        (AgentEdit::Rotate { .. } | AgentEdit::Revoke { .. }, None) => {
            return Err(AgentEditError::Unknown {
                path: path.to_path_buf(),
                id: edit.id().clone(),
            });
        }
        (AgentEdit::Rotate { secret_sha256, .. }, Some(i)) => {
            let table = entries
                .get_mut(i)
                .ok_or_else(|| shape(format!("agents[{i}] vanished during the edit")))?;
            table["secret_sha256"] = toml_edit::value(secret_sha256.as_str());
            if table.contains_key("revoked") {
                table["revoked"] = toml_edit::value(false);
            }
        }
        (AgentEdit::Revoke { .. }, Some(i)) => {
            let table = entries
                .get_mut(i)
                .ok_or_else(|| shape(format!("agents[{i}] vanished during the edit")))?;
            table["revoked"] = toml_edit::value(true);
        }
    }
    let edited = doc.to_string();
    let config: ControllerConfig = toml::from_str(&edited).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    config.validate(path)?;
    Ok(edited)
}

/// Reads the controller configuration at `path`, applies `edit` and replaces the file
/// atomically with the same file mode. Returns the configuration as now written.
pub fn rewrite_agents(path: &Path, edit: &AgentEdit) -> Result<ControllerConfig, AgentEditError> {
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read)?;
    let edited = edit_agents(path, &text, edit)?;
    unidesk_agent::atomic::rewrite_file(path, edited.as_bytes()).map_err(|source| {
        AgentEditError::Write {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(ControllerConfig::load(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> String {
        format!(
            "# Written by hand; this comment must survive.\n\
             [gateway]\nlisten = \"127.0.0.1:7443\" # the WSS port\ncert = \"server.crt\"\n\
             key = \"server.key\"\n\n[admin]\nsocket = \"admin.sock\"\n\n[store]\ndir = \"state\"\n\n\
             # d601 is the CI node.\n[[agents]]\nid = \"d601\"\nsecret_sha256 = \"{}\"\n",
            hash('a')
        )
    }

    fn hash(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    fn parse(text: &str) -> ControllerConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn add_rotate_revoke_keep_comments_and_other_keys() {
        let path = Path::new("/etc/unidesk/controller.toml");
        let added = edit_agents(
            path,
            &text(),
            &AgentEdit::Add {
                id: id("d518"),
                secret_sha256: hash('b'),
            },
        )
        .unwrap();
        assert!(added.contains("# Written by hand; this comment must survive."));
        assert!(added.contains("# the WSS port"));
        assert!(added.contains("# d601 is the CI node."));
        let config = parse(&added);
        assert_eq!(config.agents.len(), 2);
        assert_eq!(config.agents[1].id, id("d518"));
        assert!(!config.agents[1].revoked);

        let revoked = edit_agents(path, &added, &AgentEdit::Revoke { id: id("d601") }).unwrap();
        let config = parse(&revoked);
        assert!(config.agents[0].revoked);
        assert_eq!(config.agents[0].secret_sha256, hash('a'));

        let rotated = edit_agents(
            path,
            &revoked,
            &AgentEdit::Rotate {
                id: id("d601"),
                secret_sha256: hash('b'),
            },
        )
        .unwrap();
        let config = parse(&rotated);
        assert!(!config.agents[0].revoked, "a rotation lifts the revocation");
        assert_eq!(config.agents[0].secret_sha256, hash('b'));
        assert_eq!(config.gateway.listen.port(), 7443);
        assert!(rotated.contains("# d601 is the CI node."));
    }

    #[test]
    fn the_first_agent_goes_into_a_file_without_any() {
        let path = Path::new("c.toml");
        let bare = text().split("# d601").next().unwrap().to_string();
        let added = edit_agents(
            path,
            &bare,
            &AgentEdit::Add {
                id: id("solo"),
                secret_sha256: hash('a'),
            },
        )
        .unwrap();
        assert_eq!(parse(&added).agents[0].id, id("solo"));
    }

    #[test]
    fn edits_name_the_agent_and_the_file_when_refused() {
        let path = Path::new("/etc/unidesk/controller.toml");
        let err = edit_agents(
            path,
            &text(),
            &AgentEdit::Add {
                id: id("d601"),
                secret_sha256: hash('b'),
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/unidesk/controller.toml: agent d601 is listed already; \
             `agent rotate d601` gives it a new secret"
        );
        for edit in [
            AgentEdit::Revoke { id: id("ghost") },
            AgentEdit::Rotate {
                id: id("ghost"),
                secret_sha256: hash('b'),
            },
        ] {
            let err = edit_agents(path, &text(), &edit).unwrap_err();
            assert!(
                err.to_string().contains("agent ghost is not listed"),
                "{err}"
            );
        }
        // A hash that is not one is refused by the same validation `load` does.
        let err = edit_agents(
            path,
            &text(),
            &AgentEdit::Rotate {
                id: id("d601"),
                secret_sha256: "short".into(),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("agents.secret_sha256"), "{err}");
        let inline = text().replace("[[agents]]\nid = \"d601\"", "agents = [{ id = \"d601\" }]");
        let inline = inline.split("secret_sha256").next().unwrap().to_string();
        let err = edit_agents(path, &inline, &AgentEdit::Revoke { id: id("d601") });
        assert!(err.is_err());
    }

    #[test]
    fn rewrite_keeps_the_file_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, text()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let config = rewrite_agents(&path, &AgentEdit::Revoke { id: id("d601") }).unwrap();
        assert!(config.agents[0].revoked);
        assert_eq!(config.file, path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
    }
}
