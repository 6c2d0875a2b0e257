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
    #[serde(default, rename = "agents")]
    pub agents: Vec<AgentCredential>,
    /// The directory the file was loaded from; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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

/// `[tunnel]`: multiplexer sizing, shared with the agent's configuration.
pub use unidesk_link::TunnelConfig;

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
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
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
