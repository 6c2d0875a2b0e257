//! A simulated agent for the launch benchmark: the wire behaviour of a real agent — TCP, TLS
//! pinned to the controller's CA, the WebSocket upgrade, Hello, Welcome, then a
//! `unidesk_link` session — without run directories or executors. It accepts every launch
//! at once (`Accepted { state: Started }`) and answers pings, so what is timed is the
//! controller and the link, not launch work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use unidesk_agent::config::AgentConfig;
use unidesk_link::{Closed, LinkConfig, Mode};
use unidesk_protocol::{
    AgentFrame, AgentId, Capability, ControllerFrame, Hello, LaunchState, Secret, Wire,
};

/// How long connecting and the Hello/Welcome exchange may take.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(20);

/// An established agent WebSocket, after the Welcome.
pub type AgentWs = WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The controller the simulated agents dial.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub url: String,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Target {
    /// The gateway at `addr`, trusting the CA named by an agent config (as a real agent).
    pub fn new(addr: SocketAddr, agent: &AgentConfig) -> anyhow::Result<Self> {
        let tls = unidesk_agent::conn::tls_config(agent)
            .map_err(anyhow::Error::msg)
            .context("building the agents' TLS configuration")?;
        Ok(Self {
            addr,
            url: format!("wss://{}:{}/agent", addr.ip(), addr.port()),
            tls,
        })
    }
}

/// What the simulated agents did, summed over all of them.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub pongs: AtomicU64,
}

/// Dials the controller as agent `id` and completes Hello/Welcome.
pub async fn connect(target: &Target, id: &AgentId, secret: &Secret) -> anyhow::Result<AgentWs> {
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::from(target.addr.ip());
        let tls = tokio_rustls::TlsConnector::from(target.tls.clone())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {}", target.addr))?;
        let material =
            unidesk_agent::conn::hello_keying_material(tls.get_ref().1).context("TLS exporter")?;
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            target.url.as_str(),
            tls,
            Some(unidesk_link::websocket_config()),
        )
        .await
        .context("WebSocket upgrade")?;
        let hello = AgentFrame::Hello(Hello {
            agent_id: id.clone(),
            agent_version: concat!("bench-", env!("CARGO_PKG_VERSION")).to_string(),
            capabilities: vec![Capability::Probe],
            credential: secret.clone(),
            session_proof: Hello::session_proof(secret, &material),
        });
        ws.send(Message::Binary(hello.encode()?.into()))
            .await
            .context("sending Hello")?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => match ControllerFrame::decode(&b)? {
                    ControllerFrame::Welcome(_) => return Ok(ws),
                    other => anyhow::bail!("expected Welcome, got {other:?}"),
                },
                Some(Ok(Message::Close(frame))) => {
                    anyhow::bail!("controller refused agent {id}: {frame:?}")
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).context("waiting for Welcome"),
                None => anyhow::bail!("closed before Welcome"),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_DEADLINE, handshake)
        .await
        .with_context(|| format!("agent {id}: handshake took longer than {HANDSHAKE_DEADLINE:?}"))?
}

/// Runs the session of a connected simulated agent until the link ends or `cancel` fires.
pub async fn serve(ws: AgentWs, counters: Arc<Counters>, cancel: CancellationToken) -> Closed {
    let link = unidesk_link::spawn::<_, ControllerFrame, AgentFrame>(
        ws,
        Mode::Client,
        &LinkConfig::default(),
        cancel.clone(),
    );
    let mut link = match link {
        Ok(l) => l,
        Err(e) => return Closed::Local(e.to_string()),
    };
    let mut closed = link.closed();
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => {
                link.close();
                return Closed::Local("benchmark finished".into());
            }
            reason = closed.wait() => return reason,
            f = link.incoming.recv() => f,
        };
        let answer = match frame {
            None => return closed.wait().await,
            Some(ControllerFrame::Launch(launch)) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                AgentFrame::Accepted {
                    launch_id: launch.launch_id,
                    state: LaunchState::Started,
                }
            }
            Some(ControllerFrame::Ping { nonce }) => {
                counters.pongs.fetch_add(1, Ordering::Relaxed);
                AgentFrame::Pong { nonce }
            }
            Some(_) => continue,
        };
        if link.outgoing.send(answer).await.is_err() {
            return closed.wait().await;
        }
    }
}
