//! The WSS gateway agents dial: TLS (rustls), the WebSocket upgrade, the Hello/Welcome
//! handshake with version and credential checks, and one session loop per agent that feeds
//! the hub and serves the agent's egress tunnel streams.
//!
//! A bad peer (garbage, wrong version, wrong credential) loses only its own connection; the
//! reason is logged here and sent to the peer in the WebSocket close frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use unidesk_link::{Closed, LinkConfig, Mode, TunnelStream};
use unidesk_protocol::tunnel::{TunnelOpen, TunnelReply, encode_header};
use unidesk_protocol::{
    AgentFrame, ControllerFrame, Event, Hello, PROTOCOL_VERSION, Welcome, Wire,
};

use crate::egress::EgressPolicy;
use crate::hub::{AgentInfo, Hub, now_ms};

/// How long a new connection has to finish TLS, the upgrade and its Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a session needs besides its socket.
pub struct Gateway {
    pub hub: Arc<Hub>,
    pub credentials: crate::auth::Credentials,
    pub egress: EgressPolicy,
    pub egress_timeout: Duration,
    pub link: LinkConfig,
}

/// Accepts agent connections until `cancel` fires.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let gateway = gateway.clone();
        let acceptor = acceptor.clone();
        let cancel = cancel.child_token();
        tokio::spawn(
            async move { connection(gateway, acceptor, tcp, peer, cancel).await }
                .instrument(tracing::info_span!("conn", %peer)),
        );
    }
}

async fn connection(
    gateway: Arc<Gateway>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let handshake = async {
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let keying_material =
            hello_keying_material(tls.get_ref().1).map_err(|e| format!("TLS exporter: {e}"))?;
        let mut ws = tokio_tungstenite::accept_async_with_config(
            tls,
            Some(unidesk_link::websocket_config()),
        )
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
        let first = loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => break b,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    refuse(
                        &mut ws,
                        CloseCode::Protocol,
                        "expected a binary Hello frame",
                    )
                    .await;
                    return Err(format!("first message was not binary: {other:?}"));
                }
                Some(Err(e)) => return Err(format!("reading Hello: {e}")),
                None => return Err("closed before Hello".into()),
            }
        };
        let hello = match AgentFrame::decode(&first) {
            Ok(AgentFrame::Hello(h)) => h,
            Ok(_) => {
                refuse(
                    &mut ws,
                    CloseCode::Protocol,
                    "the first frame must be Hello",
                )
                .await;
                return Err("first frame was not Hello".into());
            }
            Err(e) => {
                let reason = e.to_string();
                refuse(&mut ws, CloseCode::Protocol, &reason).await;
                return Err(reason);
            }
        };
        Ok((ws, hello, keying_material))
    };
    let (mut ws, hello, keying_material) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(reason)) => {
                tracing::warn!(reason, "agent connection refused");
                return;
            }
            Err(_) => {
                tracing::warn!("agent connection refused: handshake took longer than 10 s");
                return;
            }
        };
    if let Err(e) = gateway
        .credentials
        .authenticate(&hello.agent_id, &hello.credential)
    {
        tracing::warn!(agent = %hello.agent_id, reason = %e, "agent refused");
        refuse(&mut ws, CloseCode::Policy, &e.to_string()).await;
        return;
    }
    // The secret is right; the proof says whether this Hello was made for this connection.
    if let Err(reason) = check_session_proof(&hello, &keying_material) {
        tracing::warn!(agent = %hello.agent_id, %reason, "agent refused");
        refuse(&mut ws, CloseCode::Policy, &reason).await;
        return;
    }
    let agent = hello.agent_id.clone();
    session(gateway, ws, hello, peer, cancel)
        .instrument(tracing::info_span!("agent", agent_id = %agent))
        .await;
}

/// This connection's TLS exporter keying material, as the agent derives it for its Hello.
fn hello_keying_material(
    tls: &rustls::ServerConnection,
) -> Result<[u8; Hello::EXPORTER_LEN], rustls::Error> {
    tls.export_keying_material([0u8; Hello::EXPORTER_LEN], Hello::EXPORTER_LABEL, None)
}

/// Refuses a Hello whose session proof was not made for this connection: a Hello
/// captured from another session and replayed, or one from a client that skipped the proof.
fn check_session_proof(hello: &Hello, keying_material: &[u8]) -> Result<(), String> {
    if hello.proves_session(keying_material) {
        Ok(())
    } else {
        Err(format!(
            "agent {} sent a Hello whose session proof does not match this TLS connection \
             (a replayed or forged Hello)",
            hello.agent_id
        ))
    }
}

async fn refuse<S>(ws: &mut WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: unidesk_link::truncate_reason(reason).to_string().into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.send(Message::Close(Some(frame))).await;
        // Let the close handshake finish so the peer reads the reason.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn session<S>(
    gateway: Arc<Gateway>,
    mut ws: WebSocketStream<S>,
    hello: Hello,
    peer: SocketAddr,
    cancel: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let hub = gateway.hub.clone();
    let agent = hello.agent_id.clone();
    let last_heard = Arc::new(AtomicU64::new(now_ms()));
    let info = AgentInfo {
        id: agent.clone(),
        version: hello.agent_version.clone(),
        capabilities: hello.capabilities.clone(),
        peer: peer.to_string(),
        connected_since_unix_ms: now_ms(),
        last_heard_unix_ms: now_ms(),
    };
    // The Welcome goes out before the session tasks start, so it is the first frame.
    let welcome = ControllerFrame::Welcome(Welcome {
        controller_version: env!("CARGO_PKG_VERSION").to_string(),
        heartbeat_ms: u32::try_from(hub.heartbeat().as_millis()).unwrap_or(u32::MAX),
        resume: hub.resume_points(&agent),
    });
    let sent = match welcome.encode() {
        Ok(bytes) => ws
            .send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot send Welcome");
        return;
    }
    let mut link = match unidesk_link::spawn::<_, AgentFrame, ControllerFrame>(
        ws,
        Mode::Server,
        &gateway.link,
        cancel.clone(),
    ) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot start session");
            return;
        }
    };
    let conn_id = hub.connect(info, last_heard.clone(), link.outgoing.clone());
    tracing::info!(version = %hello.agent_version, protocol = PROTOCOL_VERSION, "agent connected");
    for frame in hub.redeliveries(&agent) {
        if link.outgoing.send(frame).await.is_err() {
            break;
        }
    }

    let heartbeat = hub.heartbeat();
    let mut ping = tokio::time::interval(heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    let mut closed = link.closed();
    let reason = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Closed::Local("controller shutting down".into()),
            reason = closed.wait() => break reason,
            _ = ping.tick() => {
                // `agent revoke` and `agent rotate` end a session already open, within one
                // heartbeat: the credential it was let in with must still be accepted.
                if let Err(e) = gateway.credentials.authenticate(&agent, &hello.credential) {
                    tracing::warn!(reason = %e, "closing the session: its credential is no longer accepted");
                    link.close_with(e.to_string());
                    break Closed::Local(format!("credential no longer accepted: {e}"));
                }
                if link.silent_for() > heartbeat * 3 {
                    link.close();
                    break Closed::Local(format!("agent silent for {:?}", link.silent_for()));
                }
                nonce += 1;
                let _ = link.outgoing.try_send(ControllerFrame::Ping { nonce });
            }
            stream = link.inbound_streams.recv() => {
                if let Some(stream) = stream {
                    let gw = gateway.clone();
                    let agent = agent.clone();
                    tokio::spawn(async move { tunnel_stream(gw, agent, stream).await });
                }
            }
            frame = link.incoming.recv() => {
                let Some(frame) = frame else { continue };
                last_heard.store(now_ms(), Ordering::Relaxed);
                // Drain what else is waiting, so events are stored and acked in batches.
                let mut batch = vec![frame];
                while batch.len() < 1024 {
                    match link.incoming.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
                if let Err(reason) = handle_batch(&hub, &link.outgoing, batch).await {
                    tracing::warn!(reason, "closing session");
                    link.close();
                    break Closed::Protocol(reason);
                }
            }
        }
    };
    hub.disconnect(&agent, conn_id);
    tracing::info!(%reason, "agent disconnected");
}

async fn handle_batch(
    hub: &Hub,
    out: &tokio::sync::mpsc::Sender<ControllerFrame>,
    batch: Vec<AgentFrame>,
) -> Result<(), String> {
    let mut events: Vec<Event> = Vec::new();
    for frame in batch {
        if let AgentFrame::Event(e) = frame {
            if events.first().is_some_and(|f| f.launch_id != e.launch_id) {
                flush_events(hub, out, std::mem::take(&mut events)).await;
            }
            events.push(e);
            continue;
        }
        flush_events(hub, out, std::mem::take(&mut events)).await;
        match frame {
            AgentFrame::Event(_) => {}
            AgentFrame::Hello(_) => return Err("a second Hello on an open session".into()),
            AgentFrame::Pong { .. } => {}
            AgentFrame::Accepted { launch_id, state } => hub.accepted(&launch_id, &state),
            AgentFrame::Rejected { launch_id, reason } => hub.rejected(&launch_id, &reason),
            AgentFrame::Reply { query_id, reply } => hub.reply(query_id, reply),
            AgentFrame::Tunnel(_) => return Err("tunnel bytes outside the tunnel".into()),
        }
    }
    flush_events(hub, out, events).await;
    Ok(())
}

async fn flush_events(
    hub: &Hub,
    out: &tokio::sync::mpsc::Sender<ControllerFrame>,
    events: Vec<Event>,
) {
    if events.is_empty() {
        return;
    }
    if let Some((launch_id, seq)) = hub.store_events(events) {
        let _ = out.send(ControllerFrame::Ack { launch_id, seq }).await;
    }
}

/// Serves one egress stream: read the target, decide by policy, connect, splice.
async fn tunnel_stream(
    gateway: Arc<Gateway>,
    agent: unidesk_protocol::AgentId,
    mut stream: TunnelStream,
) {
    let open = unidesk_link::read_tunnel_header::<TunnelOpen, _>(&mut stream);
    let open = match tokio::time::timeout(HANDSHAKE_TIMEOUT, open).await {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            tracing::warn!(agent = %agent, error = %e, "bad tunnel header");
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %agent, "tunnel header not sent within 10 s");
            return;
        }
    };
    let target = format!("{}:{}", open.host, open.port);
    let dialed = crate::egress::dial(
        &gateway.egress,
        &open.host,
        open.port,
        gateway.egress_timeout,
    )
    .await;
    let (mut tcp, reply) = match dialed {
        Ok((tcp, addr)) => (
            Some(crate::metrics::count_egress(tcp)),
            TunnelReply::Connected {
                addr: addr.to_string(),
            },
        ),
        Err(e) => {
            crate::metrics::egress_refused(&e);
            tracing::warn!(agent = %agent, dest = %target, reason = %e, "egress refused");
            (
                None,
                TunnelReply::Refused {
                    reason: e.to_string(),
                },
            )
        }
    };
    let Ok(header) = encode_header(&reply) else {
        return;
    };
    if stream.write_all(&header).await.is_err() {
        return;
    }
    if let Some(tcp) = tcp.as_mut() {
        tracing::debug!(agent = %agent, dest = %target, "egress connected");
        let _ = tokio::io::copy_bidirectional(&mut stream, tcp).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use unidesk_protocol::{AgentId, Secret};

    use super::*;

    #[test]
    fn a_hello_proven_for_another_session_is_refused() {
        let secret = Secret::new("s3cret");
        let ours = [9u8; Hello::EXPORTER_LEN];
        let hello = |material: &[u8]| Hello {
            agent_id: AgentId::new("d601").unwrap(),
            agent_version: "t".into(),
            capabilities: vec![],
            credential: secret.clone(),
            session_proof: Hello::session_proof(&secret, material),
        };
        assert_eq!(check_session_proof(&hello(&ours), &ours), Ok(()));
        let err = check_session_proof(&hello(&[8u8; Hello::EXPORTER_LEN]), &ours).unwrap_err();
        assert_eq!(
            err,
            "agent d601 sent a Hello whose session proof does not match this TLS connection \
             (a replayed or forged Hello)"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
}
