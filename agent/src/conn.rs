//! The agent's link to the controller: dial out (TLS pinned to the controller's CA), say
//! Hello, wait for Welcome, then run the session — answer pings, accept launches, forward
//! events and acks, answer queries — until the link dies; then reconnect with capped,
//! jittered exponential backoff. A refused credential or version is logged with the
//! controller's reason and retried slowly, never in a tight loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use unidesk_link::{Mode, Opener};
use unidesk_protocol::tunnel::{TunnelOpen, TunnelReply, encode_header};
use unidesk_protocol::{AgentFrame, ControllerFrame, Hello, Query, Reply, Secret, Welcome, Wire};

use crate::config::AgentConfig;
use crate::egress::{BoxedStream, OpenError, TunnelOpener};
use crate::launch::Executor;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The controller refused this agent (credential, version); retry slowly.
    #[error("controller refused this agent: {0}")]
    Refused(String),
    /// The controller could not be reached or the handshake broke; retry with backoff.
    #[error("{0}")]
    Unreachable(String),
}

/// Capped exponential backoff with jitter: each delay is drawn from the upper half of the
/// current step, and the step doubles up to the cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The next delay, given a jitter fraction in `[0, 1)`.
    pub fn next_with(&mut self, jitter: f64) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// The next delay, with random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Back to the first step after a good connection.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }

    /// Raises the current step to at least `floor` (after a refusal).
    pub fn at_least(&mut self, floor: Duration) {
        self.step = self.step.max(floor).min(self.max.max(floor));
        self.max = self.max.max(floor);
    }
}

/// The current session's tunnel opener, if connected.
#[derive(Clone, Default)]
pub struct CurrentTunnel(Arc<Mutex<Option<Opener>>>);

impl CurrentTunnel {
    fn set(&self, opener: Option<Opener>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = opener;
    }

    fn get(&self) -> Option<Opener> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl TunnelOpener for CurrentTunnel {
    fn open(&self, host: String, port: u16) -> BoxFuture<'static, Result<BoxedStream, OpenError>> {
        let opener = self.get();
        Box::pin(async move {
            let target = format!("{host}:{port}");
            let opener = opener.ok_or_else(|| OpenError::TunnelDown {
                reason: "the agent is not connected to the controller".into(),
            })?;
            let down = |reason: String| OpenError::TunnelDown { reason };
            let mut stream = opener.open().await.map_err(|e| down(e.to_string()))?;
            let header =
                encode_header(&TunnelOpen { host, port }).map_err(|e| down(e.to_string()))?;
            stream
                .write_all(&header)
                .await
                .map_err(|e| down(e.to_string()))?;
            let answer = unidesk_link::read_tunnel_header::<TunnelReply, _>(&mut stream);
            let reply = tokio::time::timeout(Duration::from_secs(30), answer)
                .await
                .map_err(|_| {
                    down(format!(
                        "no answer from the controller for {target} within 30 s"
                    ))
                })?
                .map_err(down)?;
            match reply {
                TunnelReply::Connected { .. } => Ok(Box::new(stream) as BoxedStream),
                TunnelReply::Refused { reason } => Err(OpenError::Refused { target, reason }),
            }
        })
    }
}

/// Runs the link until `cancel` fires, reconnecting as needed.
pub async fn run(
    config: Arc<AgentConfig>,
    secret: Secret,
    executor: Arc<Executor>,
    tunnel: CurrentTunnel,
    cancel: CancellationToken,
) {
    let timing = &config.link;
    let mut backoff = Backoff::new(
        Duration::from_millis(timing.initial_backoff_ms),
        Duration::from_millis(timing.max_backoff_ms),
    );
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect(&config, &secret) => r,
        };
        match attempt {
            Ok((ws, welcome)) => {
                tracing::info!(url = %config.controller.url, "connected to controller");
                backoff.reset();
                session(&config, ws, welcome, &executor, &tunnel, &cancel).await;
                tunnel.set(None);
                executor.events.disconnected();
            }
            Err(ConnectError::Refused(reason)) => {
                backoff.at_least(Duration::from_millis(timing.refused_backoff_ms));
                tracing::error!(reason, "controller refused this agent");
            }
            Err(ConnectError::Unreachable(reason)) => {
                tracing::warn!(reason, "cannot reach controller");
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "reconnecting"
        );
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Client TLS configuration trusting only the controller's CA.
pub fn tls_config(config: &AgentConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca_path = config.path(&config.controller.ca);
    let pem = std::fs::read(&ca_path)
        .map_err(|e| format!("cannot read CA {}: {e}", ca_path.display()))?;
    let roots = crate::pem::roots(&pem).map_err(|e| format!("CA {}: {e}", ca_path.display()))?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// This connection's TLS exporter keying material for the Hello's session proof
/// ([`Hello::session_proof`]); the controller derives the same bytes from its side.
pub fn hello_keying_material(
    tls: &rustls::ClientConnection,
) -> Result<[u8; Hello::EXPORTER_LEN], rustls::Error> {
    tls.export_keying_material([0u8; Hello::EXPORTER_LEN], Hello::EXPORTER_LABEL, None)
}

/// The Hello this agent sends on the connection whose exporter gave `keying_material`.
pub fn hello(config: &AgentConfig, secret: &Secret, keying_material: &[u8]) -> Hello {
    Hello {
        agent_id: config.id.clone(),
        agent_version: crate::launch::probe::AGENT_VERSION.to_string(),
        capabilities: crate::launch::probe::capabilities(),
        credential: secret.clone(),
        session_proof: Hello::session_proof(secret, keying_material),
    }
}

/// `(host, port)` of a `wss://host:port/path` URL.
pub fn url_host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("wss://")
        .ok_or_else(|| format!("controller url {url:?} is not wss://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("controller url {url:?} has a bad port"))?,
        ),
        _ => (authority.to_string(), 443),
    };
    if host.is_empty() {
        return Err(format!("controller url {url:?} has no host"));
    }
    Ok((host, port))
}

async fn connect(config: &AgentConfig, secret: &Secret) -> Result<(Ws, Welcome), ConnectError> {
    let unreachable = ConnectError::Unreachable;
    let (host, port) = url_host_port(&config.controller.url).map_err(unreachable)?;
    let tls = tls_config(config).map_err(unreachable)?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| unreachable(format!("controller host {host:?}: {e}")))?;
    let timeout = Duration::from_millis(config.link.connect_timeout_ms);
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(format!("connect {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS with {host}:{port}: {e}")))?;
        // The Hello proves it was made for this TLS connection, so it cannot be replayed.
        let keying_material = hello_keying_material(tls.get_ref().1)
            .map_err(|e| unreachable(format!("TLS exporter with {host}:{port}: {e}")))?;
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            config.controller.url.as_str(),
            tls,
            Some(unidesk_link::websocket_config()),
        )
        .await
        .map_err(|e| unreachable(format!("WebSocket upgrade: {e}")))?;
        let hello = AgentFrame::Hello(hello(config, secret, &keying_material));
        let bytes = hello.encode().map_err(|e| unreachable(e.to_string()))?;
        ws.send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| unreachable(format!("sending Hello: {e}")))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => match ControllerFrame::decode(&b) {
                    Ok(ControllerFrame::Welcome(w)) => return Ok((ws, w)),
                    Ok(other) => {
                        return Err(unreachable(format!("expected Welcome, got {other:?}")));
                    }
                    Err(e) => {
                        return Err(ConnectError::Refused(format!(
                            "cannot read the Welcome: {e}"
                        )));
                    }
                },
                Some(Ok(Message::Close(frame))) => {
                    let reason =
                        frame.map_or_else(|| "no reason given".into(), |f| f.reason.to_string());
                    return Err(ConnectError::Refused(reason));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(unreachable(format!("waiting for Welcome: {e}"))),
                None => return Err(unreachable("closed before Welcome".into())),
            }
        }
    };
    let (ws, welcome) = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            unreachable(format!(
                "handshake with {host}:{port} took longer than {timeout:?}"
            ))
        })??;
    Ok((ws, welcome))
}

async fn session(
    config: &AgentConfig,
    ws: Ws,
    welcome: Welcome,
    executor: &Arc<Executor>,
    tunnel: &CurrentTunnel,
    cancel: &CancellationToken,
) {
    let link_config = config.tunnel.link();
    let mut link = match unidesk_link::spawn::<_, ControllerFrame, AgentFrame>(
        ws,
        Mode::Client,
        &link_config,
        cancel.clone(),
    ) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot start session");
            return;
        }
    };
    tunnel.set(Some(link.opener.clone()));
    executor.events.resume(&welcome.resume);
    let dead_after = Duration::from_millis(config.link.dead_after_ms);
    let mut liveness = tokio::time::interval(dead_after / 4);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed = link.closed();
    let reason = loop {
        // Send what is ready before waiting again.
        let events = executor.events.poll_transmit(256);
        let more = events.len() == 256;
        for event in events {
            if link.outgoing.send(AgentFrame::Event(event)).await.is_err() {
                break;
            }
        }
        if more {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                link.close();
                break "agent shutting down".to_string();
            }
            reason = closed.wait() => break reason.to_string(),
            _ = executor.events.ready.notified() => {}
            _ = liveness.tick() => {
                if link.silent_for() > dead_after {
                    link.close();
                    break format!("controller silent for {:?}", link.silent_for());
                }
            }
            frame = link.incoming.recv() => {
                let Some(frame) = frame else { continue };
                if let Some(answer) = handle(frame, executor, &link.outgoing).await {
                    let _ = link.outgoing.send(answer).await;
                }
            }
        }
    };
    tracing::warn!(reason, "link to controller ended");
}

/// One frame from the controller; what to answer at once, if anything.
async fn handle(
    frame: ControllerFrame,
    executor: &Arc<Executor>,
    outgoing: &tokio::sync::mpsc::Sender<AgentFrame>,
) -> Option<AgentFrame> {
    match frame {
        ControllerFrame::Ping { nonce } => Some(AgentFrame::Pong { nonce }),
        ControllerFrame::Launch(launch) => Some(executor.offer(launch)),
        ControllerFrame::Cancel { launch_id, reason } => {
            executor.cancel(&launch_id, &reason);
            None
        }
        ControllerFrame::Ack { launch_id, seq } => {
            executor.events.ack(&launch_id, seq);
            None
        }
        ControllerFrame::Query { query_id, query } => {
            // A query may take seconds (Docker, the API server); it is answered beside the
            // session loop so pings, acks, cancels and launches are not held up.
            let (executor, outgoing) = (executor.clone(), outgoing.clone());
            tokio::spawn(async move {
                let reply = answer(query, &executor).await;
                let _ = outgoing.send(AgentFrame::Reply { query_id, reply }).await;
            });
            None
        }
        ControllerFrame::Welcome(_) => {
            tracing::warn!("ignoring a second Welcome");
            None
        }
        ControllerFrame::Tunnel(_) => None,
    }
}

/// The most a run-file read returns, leaving room in the frame for its envelope.
const MAX_READ: u32 = (unidesk_protocol::MAX_FRAME_BYTES - 64 * 1024) as u32;

async fn answer(query: Query, executor: &Arc<Executor>) -> Reply {
    match query {
        Query::Facts => Reply::Facts(unidesk_protocol::AgentFacts {
            agent_id: executor.config.id.clone(),
            agent_version: crate::launch::probe::AGENT_VERSION.to_string(),
            capabilities: crate::launch::probe::capabilities(),
            reach: crate::launch::probe::reach(&executor.config, (true, "connected".into())).await,
        }),
        Query::ReadRun {
            run_id,
            file,
            max_bytes,
        } => match executor
            .events
            .runs()
            .read_tail(&run_id, file, max_bytes.min(MAX_READ))
        {
            Ok((bytes, truncated)) => Reply::RunFile { bytes, truncated },
            Err(e) => Reply::Error {
                reason: e.to_string(),
            },
        },
        Query::LiveState { services } => Reply::LiveState {
            services: crate::launch::live::live_state(&executor.config, services).await,
        },
        Query::DryRunManifest { manifest } => {
            crate::launch::live::dry_run(&executor.config, &manifest).await
        }
        Query::RunDirectory { run_id } => match executor.events.runs().locate(&run_id) {
            Ok(path) => Reply::RunDirectory {
                path: path.display().to_string(),
            },
            Err(e) => Reply::Error {
                reason: e.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<u128> = (0..6).map(|_| b.next_with(1.0).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_with(0.0).as_millis(), 50);
        b.at_least(Duration::from_millis(5000));
        assert_eq!(b.next_with(1.0).as_millis(), 5000);
    }

    #[test]
    fn url_parts() {
        assert_eq!(
            url_host_port("wss://127.0.0.1:7443/agent").unwrap(),
            ("127.0.0.1".into(), 7443)
        );
        assert_eq!(
            url_host_port("wss://ctl.example").unwrap(),
            ("ctl.example".into(), 443)
        );
        assert!(url_host_port("ws://x").is_err());
    }
}
