//! A generated loopback setup for a benchmark — CA, certificates, `controller.toml` and one
//! `agent-<ID>.toml` per agent, written by the controller's own `init` — and the process
//! facts a benchmark needs: where the target directory is, a free loopback port, enough
//! file descriptors.
//!
//! The setup lives under `target/bench/tmp/` (not `/tmp`, which may be tmpfs), so the job
//! store's fsyncs hit the same disk as the build, as they would on a node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use unidesk_agent::config::AgentConfig;
use unidesk_controller::config::ControllerConfig;
use unidesk_controller::init::{InitPlan, InitReport};
use unidesk_protocol::{AgentId, Secret};

/// Runs the real agent (`service::run`) in this process until `cancel`, and waits up to 15 s
/// until `hub` lists it as connected.
pub async fn start_agent(
    agent: AgentConfig,
    secret: Secret,
    hub: &unidesk_controller::hub::Hub,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    tokio::spawn(async move {
        if let Err(e) = unidesk_agent::service::run(agent, secret, Default::default(), cancel).await
        {
            tracing::error!("agent stopped: {e:#}");
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while hub.agents().is_empty() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the agent did not connect to the controller within 15 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Egress rules of every benchmark setup: the byte source is on loopback.
pub const EGRESS_ALLOW: [&str; 2] = ["127.0.0.1:*", "cidr:127.0.0.0/8"];

/// A generated setup in a temporary directory, removed when dropped.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub report: InitReport,
    pub controller: ControllerConfig,
}

impl Setup {
    /// Runs `init` for `agents` with the gateway on `listen` and proxy ports from
    /// `proxy_port`, in a fresh directory under `parent` (see [`default_parent`]).
    pub fn init(
        parent: &Path,
        agents: &[AgentId],
        listen: SocketAddr,
        proxy_port: u16,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("setup-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
        let plan = InitPlan {
            dir: dir.path().to_path_buf(),
            layout: unidesk_controller::init::Layout::Local,
            agents: agents.to_vec(),
            listen,
            proxy_port,
            egress_allow: EGRESS_ALLOW.iter().map(|s| s.to_string()).collect(),
        };
        let report = unidesk_controller::init::init(&plan)
            .with_context(|| format!("init in {}", dir.path().display()))?;
        let controller = ControllerConfig::load(&report.controller_config)
            .with_context(|| format!("loading {}", report.controller_config.display()))?;
        Ok(Self {
            dir,
            report,
            controller,
        })
    }

    /// Loads the agent config `init` wrote for the `index`th agent, with its secret.
    pub fn agent(&self, index: usize) -> anyhow::Result<(AgentConfig, Secret)> {
        let path = self
            .report
            .agent_configs
            .get(index)
            .with_context(|| format!("no agent config number {index}"))?;
        let config =
            AgentConfig::load(path).with_context(|| format!("loading {}", path.display()))?;
        let secret = config
            .secret
            .clone()
            .with_context(|| format!("{} holds no secret", path.display()))?;
        Ok((config, secret))
    }
}

/// Where setups go unless a benchmark is told otherwise: `<target>/bench/tmp/`.
pub fn default_parent(target: &Path) -> PathBuf {
    target.join("bench").join("tmp")
}

/// Agent ids `a1` … `aN`.
pub fn agent_ids(n: usize) -> anyhow::Result<Vec<AgentId>> {
    (1..=n)
        .map(|i| AgentId::new(format!("a{i}")).with_context(|| format!("agent id a{i}")))
        .collect()
}

/// The Cargo target directory the running benchmark was built in: the binary sits in
/// `<target>/<profile>/`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the benchmark binary")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| format!("{} is not inside a target directory", exe.display()))
}

/// A loopback port that was free a moment ago (for addresses a config must name up front,
/// such as the agent's proxy port).
pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 for a port")?;
    Ok(listener.local_addr()?.port())
}

/// The open-file limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Nofile {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (up to the hard limit);
/// children started afterwards inherit it. Fails if the hard limit is below `want`.
pub fn raise_nofile(want: u64) -> anyhow::Result<Nofile> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if before >= want {
        return Ok(Nofile {
            before,
            after: before,
            hard,
        });
    }
    if hard < want {
        anyhow::bail!(
            "RLIMIT_NOFILE hard limit {hard} is below the {want} file descriptors this run needs; \
             raise it (for example `ulimit -Hn {want}` as root) or run fewer agents"
        );
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        },
    )
    .with_context(|| format!("raising RLIMIT_NOFILE from {before} to {want}"))?;
    Ok(Nofile {
        before,
        after: want,
        hard,
    })
}

/// CPU time (user and system, all threads) this process has used so far.
pub fn process_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(t.tv_nsec).unwrap_or(0);
    std::time::Duration::new(secs, nanos)
}
