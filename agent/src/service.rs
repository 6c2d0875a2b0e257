//! `unidesk-agent run`: wires the pieces together — run directories, the event hub, the
//! executor, the loopback egress proxy and the controller link — under one cancel token.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use unidesk_protocol::Secret;

use crate::config::{AgentConfig, EgressMode};
use crate::conn::CurrentTunnel;
use crate::events::EventHub;
use crate::launch::Executor;
use crate::rundir::Runs;

/// Starts the agent and runs it until `cancel` fires.
pub async fn run(
    config: AgentConfig,
    secret: Secret,
    notifier: crate::notify::Notifier,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let runs_dir = config.path(&config.dirs.runs);
    let runs = Runs::open(&runs_dir)
        .with_context(|| format!("opening run directory {}", runs_dir.display()))?;
    let events = Arc::new(EventHub::new(runs, config.event_window));
    if let Some(metrics) = &config.metrics {
        crate::metrics::start(metrics, events.clone(), &cancel).await?;
    }
    let executor = Executor::start(config.clone(), events, cancel.clone())
        .context("reading back earlier runs")?;
    let tunnel = CurrentTunnel::default();
    if config.proxy.egress == EgressMode::Tunnel {
        let listener = crate::egress::bind_loopback(config.proxy.listen)
            .context("starting the egress proxy")?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(addr = %config.proxy.listen, "egress proxy listening");
        let opener: Arc<dyn crate::egress::TunnelOpener> = Arc::new(tunnel.clone());
        tokio::spawn(crate::egress::serve(listener, opener, cancel.clone()));
    }
    // Ready: earlier runs are read back and the proxy listens; the controller link may still
    // be dialling (it retries for as long as the agent runs).
    notifier.ready(
        &format!("agent {} dialling {}", config.id, config.controller.url),
        &cancel,
    );
    crate::conn::run(Arc::new(config), secret, executor, tunnel, cancel).await;
    notifier.stopping();
    Ok(())
}
