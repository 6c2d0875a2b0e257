//! The agent's TOML configuration: who it is, how it reaches the controller, where its
//! egress proxy listens, and where it keeps runs, work trees and mirrors.
//!
//! Paths are relative to the directory of the config file. Loading validates every key and
//! names the key and value that are wrong. Only `main` reads the environment (the secret may
//! come from `UNIDESK_AGENT_SECRET`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unidesk_protocol::{AgentId, Secret};

/// Default location of an agent configuration.
pub const DEFAULT_CONFIG: &str = "/etc/unidesk/agent.toml";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid agent configuration: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {key}={value:?} is not valid: {why}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        why: String,
    },
}

/// The whole agent configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: AgentId,
    /// The agent's secret. May be left out and given as `UNIDESK_AGENT_SECRET` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    pub controller: ControllerLink,
    #[serde(default)]
    pub proxy: ProxyConfig,
    pub dirs: Dirs,
    #[serde(default)]
    pub link: LinkTiming,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub tunnel: unidesk_link::TunnelConfig,
    /// Unacknowledged events held per launch before the launch waits for the controller.
    #[serde(default = "default_event_window")]
    pub event_window: usize,
    /// `[metrics]`: the Prometheus endpoint; absent means nothing listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_event_window() -> usize {
    8192
}

/// `[controller]`: where to dial and which CA to trust (pinned; system roots are not used).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControllerLink {
    /// `wss://host:port/agent`
    pub url: String,
    /// PEM file of the CA that signed the controller's certificate.
    pub ca: PathBuf,
}

/// How this node reaches the outside for Git fetches and builds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EgressMode {
    /// Through the loopback proxy and the controller's tunnel (provider nodes).
    #[default]
    Tunnel,
    /// Directly (the main server).
    Direct,
}

/// `[proxy]`: the loopback egress proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_proxy_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub egress: EgressMode,
    /// Extra CA (PEM) trusted for HTTPS Git remotes, besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ca: Option<PathBuf>,
}

fn default_proxy_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18789))
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: default_proxy_listen(),
            egress: EgressMode::default(),
            git_ca: None,
        }
    }
}

/// `[metrics]`: where the Prometheus text endpoint (`GET /metrics`) listens. Off unless the
/// section is present; loopback only, like every listener of the agent. The controller's
/// configuration uses the same section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl MetricsConfig {
    /// Why `listen` cannot be used, if it cannot: the endpoint is for a scraper on this host.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.listen.ip().is_loopback() {
            Ok(())
        } else {
            Err("the metrics endpoint listens on loopback only (127.0.0.0/8 or ::1)")
        }
    }
}

/// `[dirs]`: run directories (read by runbooks), work trees and mirrors, kept apart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dirs {
    pub runs: PathBuf,
    pub work: PathBuf,
    pub cache: PathBuf,
}

/// `[link]`: liveness and reconnect timing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkTiming {
    /// The link is declared dead after this long without hearing from the controller.
    pub dead_after_ms: u64,
    /// First reconnect delay; doubles (with jitter) up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Least delay after the controller refused the credential or the version.
    pub refused_backoff_ms: u64,
    pub connect_timeout_ms: u64,
}

impl Default for LinkTiming {
    fn default() -> Self {
        Self {
            dead_after_ms: 15_000,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            refused_backoff_ms: 10_000,
            connect_timeout_ms: 10_000,
        }
    }
}

/// `[runtime]`: the local daemons the agent drives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    pub docker_socket: PathBuf,
    /// k3s's own containerd, where images are imported (never Docker's).
    pub containerd_socket: PathBuf,
    /// The containerd namespace the kubelet reads images from.
    pub containerd_namespace: String,
    /// The snapshotter imported images are unpacked for.
    pub snapshotter: String,
    /// The native k3s kubeconfig; the only way the agent reaches the cluster.
    pub kubeconfig: PathBuf,
    /// The sandbox image every pod needs; pulled through the egress proxy when missing.
    pub pause_image: String,
    /// Images `dev-env prewarm-images` imports from the node's Docker into containerd.
    pub prewarm_images: Vec<String>,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            containerd_socket: PathBuf::from("/run/k3s/containerd/containerd.sock"),
            containerd_namespace: "k8s.io".to_owned(),
            snapshotter: "overlayfs".to_owned(),
            kubeconfig: PathBuf::from("/etc/rancher/k3s/k3s.yaml"),
            pause_image: "rancher/mirrored-pause:3.6".to_owned(),
            prewarm_images: Vec::new(),
        }
    }
}

impl AgentConfig {
    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
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
        let invalid = |key, value: String, why: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value,
            why: why.into(),
        };
        if !self.controller.url.starts_with("wss://") {
            return Err(invalid(
                "controller.url",
                self.controller.url.clone(),
                "must be a wss:// URL (the link is always TLS)",
            ));
        }
        if !self.proxy.listen.ip().is_loopback() {
            return Err(invalid(
                "proxy.listen",
                self.proxy.listen.to_string(),
                "the egress proxy listens on loopback only",
            ));
        }
        if let Err(e) = self.tunnel.link().validate() {
            return Err(invalid(
                "tunnel.max_connection_window",
                self.tunnel.max_connection_window.to_string(),
                &e.to_string(),
            ));
        }
        if let Some(metrics) = &self.metrics
            && let Err(why) = metrics.check()
        {
            return Err(invalid("metrics.listen", metrics.listen.to_string(), why));
        }
        if self.event_window == 0 {
            return Err(invalid("event_window", "0".into(), "must be at least 1"));
        }
        if self.link.dead_after_ms < 200 {
            return Err(invalid(
                "link.dead_after_ms",
                self.link.dead_after_ms.to_string(),
                "must be at least 200",
            ));
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
