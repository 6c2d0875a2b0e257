//! `unidesk-controller init`: writes a working loopback setup — a CA, a server certificate,
//! `controller.toml` and one `agent-<ID>.toml` per agent with its own secret — that runs with
//! no hand edits. The controller file keeps only each secret's hash.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use unidesk_agent::config::{
    AgentConfig, ControllerLink, Dirs, EgressMode, LinkTiming, ProxyConfig, Runtime,
};
use unidesk_protocol::{AgentId, Secret};

use crate::auth::{hash_secret, new_secret};
use crate::config::{
    AdminConfig, AgentCredential, ControllerConfig, EgressConfig, GatewayConfig, StoreConfig,
    TunnelConfig,
};
use unidesk_agent::atomic::write_file;

/// Where an installation keeps what its configs name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Layout {
    /// Everything beside the config file: state, admin socket, the agents' directories. What a
    /// binary install or a test directory uses.
    #[default]
    Local,
    /// Where the Debian packages' units expect it: the controller's state in
    /// `/var/lib/unidesk` and its admin socket in `/run/unidesk` (the unit's `StateDirectory`
    /// and `RuntimeDirectory`), an agent's directories in `/var/lib/unidesk-agent`, the only
    /// places `ProtectSystem=strict` lets them write. Certificates stay beside the config.
    Packaged,
}

impl Layout {
    /// The layout a `--packaged` flag asks for.
    pub fn packaged(packaged: bool) -> Layout {
        if packaged {
            Layout::Packaged
        } else {
            Layout::Local
        }
    }

    fn store_dir(self) -> PathBuf {
        match self {
            Layout::Local => PathBuf::from("state"),
            Layout::Packaged => PathBuf::from("/var/lib/unidesk"),
        }
    }

    fn admin_socket(self) -> PathBuf {
        match self {
            Layout::Local => PathBuf::from("admin.sock"),
            Layout::Packaged => PathBuf::from("/run/unidesk/admin.sock"),
        }
    }

    fn agent_dirs(self, id: &AgentId) -> Dirs {
        let root = match self {
            Layout::Local => PathBuf::from(format!("agent-{id}")),
            Layout::Packaged => PathBuf::from("/var/lib/unidesk-agent"),
        };
        Dirs {
            runs: root.join("runs"),
            work: root.join("work"),
            cache: root.join("cache"),
        }
    }
}

/// The `controller.toml` the `unidesk-controller` package installs. `init --packaged` replaces
/// it when it is still exactly this; any other existing file is the operator's and is kept.
pub const PACKAGED_CONTROLLER_CONFIG: &str =
    include_str!("../../packaging/etc/unidesk/controller.toml");

/// What `init` should write.
#[derive(Debug, Clone)]
pub struct InitPlan {
    pub dir: PathBuf,
    pub layout: Layout,
    pub agents: Vec<AgentId>,
    pub listen: SocketAddr,
    /// The first agent's proxy port; each further agent gets the next one.
    pub proxy_port: u16,
    /// Egress allowlist entries for the controller.
    pub egress_allow: Vec<String>,
}

/// `init` could not write the setup.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{0} already holds a controller.toml; refusing to overwrite it (only `init --packaged` \
         replaces one, and only the package's unchanged default)"
    )]
    Exists(PathBuf),
    #[error("agent {0} is listed twice")]
    DuplicateAgent(AgentId),
    #[error("no agent ids given")]
    NoAgents,
    #[error("too many agents for proxy ports from {0}")]
    Ports(u16),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialize {what}: {reason}")]
    Serialize { what: String, reason: String },
}

/// What `init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    pub controller_config: PathBuf,
    /// The package's default `controller.toml` was there and was replaced.
    pub replaced_packaged_default: bool,
    pub agent_configs: Vec<PathBuf>,
    pub ca: PathBuf,
}

/// The agent configuration `init` writes for `id`: the controller at `listen` (loopback when
/// it listens on every address), `ca.crt` beside the file, the directories of `layout`, the
/// egress proxy on `proxy_port`. `agent add --agent-config` writes the same.
pub fn agent_config(
    id: &AgentId,
    secret: Secret,
    listen: SocketAddr,
    proxy_port: u16,
    layout: Layout,
) -> AgentConfig {
    let ip = listen.ip();
    let connect_host = if ip.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        ip.to_string()
    };
    AgentConfig {
        id: id.clone(),
        secret: Some(secret),
        controller: ControllerLink {
            url: format!("wss://{connect_host}:{}/agent", listen.port()),
            ca: PathBuf::from("ca.crt"),
        },
        proxy: ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            egress: EgressMode::Tunnel,
            git_ca: None,
        },
        dirs: layout.agent_dirs(id),
        link: LinkTiming::default(),
        runtime: Runtime::default(),
        tunnel: Default::default(),
        event_window: 8192,
        metrics: None,
        base_dir: PathBuf::new(),
    }
}

/// Writes an agent configuration as TOML, readable only by its owner (it holds the secret).
pub fn write_agent_config(path: &Path, agent: &AgentConfig) -> Result<(), InitError> {
    let text = toml::to_string(agent).map_err(|e| InitError::Serialize {
        what: format!("agent {} config", agent.id),
        reason: e.to_string(),
    })?;
    write_file(path, text.as_bytes(), 0o600).map_err(|source| InitError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the setup described by `plan`.
pub fn init(plan: &InitPlan) -> Result<InitReport, InitError> {
    if plan.agents.is_empty() {
        return Err(InitError::NoAgents);
    }
    let controller_path = plan.dir.join("controller.toml");
    let replaced_packaged_default = match std::fs::read(&controller_path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Ok(existing)
            if plan.layout == Layout::Packaged
                && existing == PACKAGED_CONTROLLER_CONFIG.as_bytes() =>
        {
            true
        }
        _ => return Err(InitError::Exists(plan.dir.clone())),
    };
    let mut seen = std::collections::HashSet::new();
    for a in &plan.agents {
        if !seen.insert(a) {
            return Err(InitError::DuplicateAgent(a.clone()));
        }
    }
    let write = |path: &Path, bytes: &[u8], mode: u32| {
        write_file(path, bytes, mode).map_err(|source| InitError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(&plan.dir).map_err(|source| InitError::Write {
        path: plan.dir.clone(),
        source,
    })?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ip = plan.listen.ip();
    if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
        names.push(ip.to_string());
    }
    let pki = crate::pki::generate(&names)?;
    write(&plan.dir.join("ca.crt"), pki.ca_cert_pem.as_bytes(), 0o644)?;
    write(&plan.dir.join("ca.key"), pki.ca_key_pem.as_bytes(), 0o600)?;
    write(
        &plan.dir.join("server.crt"),
        pki.server_cert_pem.as_bytes(),
        0o644,
    )?;
    write(
        &plan.dir.join("server.key"),
        pki.server_key_pem.as_bytes(),
        0o600,
    )?;

    let mut credentials = Vec::new();
    let mut agent_configs = Vec::new();
    for (i, id) in plan.agents.iter().enumerate() {
        let port = u16::try_from(i)
            .ok()
            .and_then(|i| plan.proxy_port.checked_add(i))
            .ok_or(InitError::Ports(plan.proxy_port))?;
        let secret = new_secret();
        credentials.push(AgentCredential {
            id: id.clone(),
            secret_sha256: hash_secret(&secret),
            revoked: false,
        });
        let path = plan.dir.join(format!("agent-{id}.toml"));
        write_agent_config(
            &path,
            &agent_config(id, secret, plan.listen, port, plan.layout),
        )?;
        agent_configs.push(path);
    }

    let controller = ControllerConfig {
        gateway: GatewayConfig {
            listen: plan.listen,
            cert: PathBuf::from("server.crt"),
            key: PathBuf::from("server.key"),
            heartbeat_ms: 5_000,
        },
        admin: AdminConfig {
            socket: plan.layout.admin_socket(),
        },
        store: StoreConfig {
            dir: plan.layout.store_dir(),
        },
        egress: EgressConfig {
            allow: plan.egress_allow.clone(),
            connect_timeout_ms: 10_000,
        },
        tunnel: TunnelConfig::default(),
        desired: None,
        metrics: None,
        agents: credentials,
        base_dir: PathBuf::new(),
        file: PathBuf::new(),
    };
    let text = toml::to_string(&controller).map_err(|e| InitError::Serialize {
        what: "controller config".into(),
        reason: e.to_string(),
    })?;
    write(&controller_path, text.as_bytes(), 0o600)?;
    Ok(InitReport {
        controller_config: controller_path,
        replaced_packaged_default,
        agent_configs,
        ca: plan.dir.join("ca.crt"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_output_loads_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let plan = InitPlan {
            dir: dir.path().join("setup"),
            layout: Layout::Local,
            agents: vec![AgentId::new("d601").unwrap(), AgentId::new("d518").unwrap()],
            listen: "127.0.0.1:7443".parse().unwrap(),
            proxy_port: 18789,
            egress_allow: vec!["127.0.0.1:*".into(), "cidr:127.0.0.0/8".into()],
        };
        let report = init(&plan).unwrap();
        let controller = ControllerConfig::load(&report.controller_config).unwrap();
        assert_eq!(controller.agents.len(), 2);
        assert!(
            !std::fs::read_to_string(&report.controller_config)
                .unwrap()
                .contains("secret =")
        );
        let agent = AgentConfig::load(&report.agent_configs[1]).unwrap();
        assert_eq!(agent.proxy.listen.port(), 18790);
        let secret = agent.secret.clone().unwrap();
        assert_eq!(hash_secret(&secret), controller.agents[1].secret_sha256);
        let again = toml::to_string(&agent).unwrap();
        assert_eq!(
            again,
            std::fs::read_to_string(&report.agent_configs[1]).unwrap()
        );
        assert!(matches!(init(&plan), Err(InitError::Exists(_))));
    }

    #[test]
    fn packaged_layout_replaces_only_the_packages_unchanged_default() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc-unidesk");
        std::fs::create_dir_all(&etc).unwrap();
        let controller_path = etc.join("controller.toml");
        std::fs::write(&controller_path, PACKAGED_CONTROLLER_CONFIG).unwrap();
        let plan = InitPlan {
            dir: etc.clone(),
            layout: Layout::Packaged,
            agents: vec![AgentId::new("d601").unwrap()],
            listen: "0.0.0.0:7443".parse().unwrap(),
            proxy_port: 18789,
            egress_allow: vec![],
        };
        // Without --packaged the package's default is an existing file like any other.
        let local = InitPlan {
            layout: Layout::Local,
            ..plan.clone()
        };
        let err = init(&local).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");

        let report = init(&plan).unwrap();
        assert!(report.replaced_packaged_default);
        let text = std::fs::read_to_string(&controller_path).unwrap();
        let controller = ControllerConfig::load(&controller_path).unwrap();
        assert_eq!(
            controller.store.dir,
            PathBuf::from("/var/lib/unidesk"),
            "{text}"
        );
        assert_eq!(
            controller.admin.socket,
            PathBuf::from("/run/unidesk/admin.sock"),
            "{text}"
        );
        assert_eq!(
            controller.path(&controller.gateway.cert),
            etc.join("server.crt")
        );
        let agent = AgentConfig::load(&report.agent_configs[0]).unwrap();
        assert_eq!(
            agent.dirs.runs,
            PathBuf::from("/var/lib/unidesk-agent/runs")
        );
        assert_eq!(
            agent.dirs.cache,
            PathBuf::from("/var/lib/unidesk-agent/cache")
        );
        assert_eq!(agent.path(&agent.controller.ca), etc.join("ca.crt"));

        // Now the file is the operator's: a second run refuses and leaves it as it is.
        let err = init(&plan).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read_to_string(&controller_path).unwrap(), text);
    }
}
