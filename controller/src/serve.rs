//! `unidesk-controller serve`: starts the gateway, the admin socket and the job-deadline
//! sweeper from one configuration, and stops them all when the token is cancelled.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ControllerConfig;
use crate::egress::EgressPolicy;
use crate::gateway::Gateway;
use crate::hub::{Hub, now_ms};
use crate::store::JobStore;

/// A controller bound to its addresses, ready to run.
pub struct Bound {
    pub hub: Arc<Hub>,
    pub gateway_addr: std::net::SocketAddr,
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: tokio::net::UnixListener,
    tls: Arc<rustls::ServerConfig>,
    metrics: Option<TcpListener>,
}

/// Opens the store and binds the gateway and the admin socket.
pub async fn bind(config: &ControllerConfig) -> anyhow::Result<Bound> {
    let store_dir = config.path(&config.store.dir);
    let store = JobStore::open(&store_dir)
        .with_context(|| format!("opening the job store in {}", store_dir.display()))?;
    let hub = Hub::open(store, config.gateway.heartbeat_ms).context("reopening open jobs")?;
    let tls = crate::pki::server_config(
        &config.path(&config.gateway.cert),
        &config.path(&config.gateway.key),
    )?;
    let listener = TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| format!("binding the gateway on {}", config.gateway.listen))?;
    let gateway_addr = listener.local_addr()?;
    let admin = crate::admin::bind(&config.path(&config.admin.socket))?;
    let metrics = crate::metrics::bind(config.metrics.as_ref()).await?;
    let egress = EgressPolicy::parse(&config.egress.allow)?;
    let gateway = Arc::new(Gateway {
        hub: hub.clone(),
        credentials: crate::auth::Credentials::following(config),
        egress,
        egress_timeout: Duration::from_millis(config.egress.connect_timeout_ms),
        link: config.tunnel.link(),
    });
    Ok(Bound {
        hub,
        gateway_addr,
        gateway,
        listener,
        admin,
        tls,
        metrics,
    })
}

impl Bound {
    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        tracing::info!(addr = %self.gateway_addr, "gateway listening");
        let sweeper = {
            let hub = self.hub.clone();
            let cancel = cancel.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => hub.expire(now_ms()),
                    }
                }
            }
        };
        tokio::join!(
            crate::gateway::serve(self.gateway, self.listener, self.tls, cancel.clone()),
            crate::admin::serve(self.hub.clone(), self.admin, cancel.clone()),
            crate::metrics::serve(self.metrics, self.hub.clone(), cancel.clone()),
            sweeper,
        );
    }
}
