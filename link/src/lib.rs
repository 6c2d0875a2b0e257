//! The I/O half of the protocol: one WebSocket session between an agent and the controller,
//! carrying typed control frames and the yamux byte stream of the egress tunnel.
//!
//! The session owns three tasks: a reader that decodes frames (tunnel bytes go to yamux,
//! everything else to the application), a writer that always sends queued control frames
//! before the next tunnel chunk (so a bulk download never delays a launch or an ack), and the
//! yamux driver. Per-stream flow control is yamux's; this crate hand-writes no windows.
//!
//! It knows nothing about launches, credentials or egress policy: the controller and agent
//! crates decide; this crate only moves frames and streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;
use unidesk_protocol::{AgentFrame, ControllerFrame, MAX_FRAME_BYTES, Wire};

pub use yamux::Mode;

/// A yamux stream adapted to tokio's I/O traits.
pub type TunnelStream = tokio_util::compat::Compat<yamux::Stream>;

/// The largest chunk of tunnel bytes put in one frame.
const TUNNEL_CHUNK: usize = 64 * 1024;

/// Tuning of one session.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Upper bound of the summed receive windows of all tunnel streams (yamux auto-tunes each
    /// stream's window from 256 KiB towards the bandwidth-delay product, up to this).
    pub max_connection_window: usize,
    /// Most tunnel streams open at once.
    pub max_streams: usize,
    /// Control frames queued for sending before senders wait.
    pub control_queue: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            max_connection_window: 256 << 20,
            max_streams: 256,
            control_queue: 1024,
        }
    }
}

/// A setting of [`LinkConfig`] that yamux would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tunnel max_connection_window={window} is below 256 KiB x max_streams={streams}; raise the window or lower the streams"
)]
pub struct LinkConfigError {
    pub window: usize,
    pub streams: usize,
}

impl LinkConfig {
    /// Checks the settings yamux asserts on, so a bad config is an error, not a panic.
    pub fn validate(&self) -> Result<(), LinkConfigError> {
        let min = self.max_streams.saturating_mul(256 * 1024);
        if self.max_connection_window < min || self.max_streams == 0 {
            return Err(LinkConfigError {
                window: self.max_connection_window,
                streams: self.max_streams,
            });
        }
        Ok(())
    }

    fn yamux(&self) -> Result<yamux::Config, LinkConfigError> {
        self.validate()?;
        let mut cfg = yamux::Config::default();
        // Order matters: yamux checks the pair on each call.
        cfg.set_max_connection_receive_window(Some(self.max_connection_window.max(1 << 30)));
        cfg.set_max_num_streams(self.max_streams);
        cfg.set_max_connection_receive_window(Some(self.max_connection_window));
        Ok(cfg)
    }
}

/// `[tunnel]` of both configuration files: the multiplexer's sizing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Summed receive window of all streams; each stream auto-tunes from 256 KiB up to it.
    pub max_connection_window: usize,
    /// Streams open at once.
    pub max_streams: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        let link = LinkConfig::default();
        Self {
            max_connection_window: link.max_connection_window,
            max_streams: link.max_streams,
        }
    }
}

impl TunnelConfig {
    /// The link settings these values give.
    pub fn link(&self) -> LinkConfig {
        LinkConfig {
            max_connection_window: self.max_connection_window,
            max_streams: self.max_streams,
            ..LinkConfig::default()
        }
    }
}

/// WebSocket limits matching the protocol's frame limit, for both ends' handshakes.
pub fn websocket_config() -> WebSocketConfig {
    let mut cfg = WebSocketConfig::default();
    cfg.max_message_size = Some(MAX_FRAME_BYTES);
    cfg.max_frame_size = Some(MAX_FRAME_BYTES);
    // tungstenite keeps (and zero-fills) its whole read buffer per connection; the 128 KiB
    // default costs an idle agent's session that much on the controller. 8 KiB reads keep
    // tunnel throughput (measured with bench/tunnel) at a fraction of the memory.
    cfg.read_buffer_size = 8 * 1024;
    cfg
}

/// A frame type that can carry tunnel bytes.
pub trait Carrier: Wire + Send + 'static {
    /// Wraps tunnel bytes.
    fn tunnel(bytes: Vec<u8>) -> Self;
    /// Unwraps tunnel bytes, or gives the frame back.
    fn into_tunnel(self) -> Result<Vec<u8>, Self>;
}

impl Carrier for AgentFrame {
    fn tunnel(bytes: Vec<u8>) -> Self {
        AgentFrame::Tunnel(bytes)
    }
    fn into_tunnel(self) -> Result<Vec<u8>, Self> {
        match self {
            AgentFrame::Tunnel(b) => Ok(b),
            other => Err(other),
        }
    }
}

impl Carrier for ControllerFrame {
    fn tunnel(bytes: Vec<u8>) -> Self {
        ControllerFrame::Tunnel(bytes)
    }
    fn into_tunnel(self) -> Result<Vec<u8>, Self> {
        match self {
            ControllerFrame::Tunnel(b) => Ok(b),
            other => Err(other),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed, with its reason if it gave one.
    ByPeer(String),
    /// The peer sent something this side refuses; the session was closed with this reason.
    Protocol(String),
    /// The transport failed.
    Transport(String),
    /// This side closed it (shutdown or liveness timeout).
    Local(String),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::ByPeer(r) => write!(f, "closed by peer: {r}"),
            Closed::Protocol(r) => write!(f, "protocol error: {r}"),
            Closed::Transport(r) => write!(f, "transport error: {r}"),
            Closed::Local(r) => write!(f, "closed locally: {r}"),
        }
    }
}

/// A tunnel stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot open tunnel stream: {0}")]
pub struct OpenStreamError(pub String);

/// Opens outbound tunnel streams on a session. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Opener {
    tx: mpsc::Sender<oneshot::Sender<Result<TunnelStream, OpenStreamError>>>,
}

impl Opener {
    /// Opens a new stream to the peer.
    pub async fn open(&self) -> Result<TunnelStream, OpenStreamError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| OpenStreamError("the session is closed".into()))?;
        rx.await
            .map_err(|_| OpenStreamError("the session closed while opening".into()))?
    }
}

/// A running session.
pub struct Link<In, Out> {
    /// Decoded control frames from the peer. Ends when the session ends.
    pub incoming: mpsc::Receiver<In>,
    /// Control frames to the peer; they go before any queued tunnel bytes.
    pub outgoing: mpsc::Sender<Out>,
    /// Opens tunnel streams towards the peer.
    pub opener: Opener,
    /// Tunnel streams the peer opened.
    pub inbound_streams: mpsc::Receiver<TunnelStream>,
    closed: watch::Receiver<Option<Closed>>,
    closed_tx: Arc<watch::Sender<Option<Closed>>>,
    heard: Arc<AtomicU64>,
    started: Instant,
    cancel: CancellationToken,
}

impl<In, Out> Link<In, Out> {
    /// How long ago anything (any frame, tunnel bytes included) arrived from the peer.
    pub fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.heard.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(heard)
    }

    /// Ends the session.
    pub fn close(&self) {
        self.cancel.cancel();
    }

    /// Ends the session and tells the peer why: `reason` goes in the WebSocket close frame
    /// (the peer logs it) unless the session had already ended for another reason.
    pub fn close_with(&self, reason: impl Into<String>) {
        record_first(&self.closed_tx, Closed::Local(reason.into()));
        self.cancel.cancel();
    }

    /// A handle that resolves when the session has ended, with the reason.
    pub fn closed(&self) -> ClosedWatch {
        ClosedWatch(self.closed.clone())
    }
}

/// Waits for a session to end.
#[derive(Debug, Clone)]
pub struct ClosedWatch(watch::Receiver<Option<Closed>>);

impl ClosedWatch {
    /// Resolves with the reason once the session has ended.
    pub async fn wait(&mut self) -> Closed {
        loop {
            if let Some(reason) = self.0.borrow().clone() {
                return reason;
            }
            if self.0.changed().await.is_err() {
                return Closed::Local("session dropped".into());
            }
        }
    }
}

/// Starts a session over an established WebSocket. `mode` is yamux's client or server role
/// (the agent is the client). The session ends when either side closes, on a protocol error,
/// or when `cancel` fires.
pub fn spawn<S, In, Out>(
    ws: WebSocketStream<S>,
    mode: Mode,
    config: &LinkConfig,
    cancel: CancellationToken,
) -> Result<Link<In, Out>, LinkConfigError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    In: Carrier,
    Out: Carrier,
{
    let yamux_cfg = config.yamux()?;
    let cancel = cancel.child_token();
    let (in_tx, in_rx) = mpsc::channel::<In>(config.control_queue);
    let (out_tx, out_rx) = mpsc::channel::<Out>(config.control_queue);
    let (open_tx, open_rx) = mpsc::channel(16);
    let (inbound_tx, inbound_rx) = mpsc::channel(64);
    let (closed_tx, closed_rx) = watch::channel(None);
    let heard = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    // yamux runs over one end of an in-memory pipe; the session pumps the other end.
    let (mux_end, pump_end) = tokio::io::duplex(4 * TUNNEL_CHUNK);
    let (pump_read, pump_write) = tokio::io::split(pump_end);
    let connection = yamux::Connection::new(mux_end.compat(), yamux_cfg, mode);
    let (ws_sink, ws_stream) = ws.split();

    let closed_tx = Arc::new(closed_tx);
    let finish = {
        let closed_tx = closed_tx.clone();
        let cancel = cancel.clone();
        move |reason: Closed| {
            record_first(&closed_tx, reason);
            cancel.cancel();
        }
    };

    tokio::spawn(read_loop(
        ws_stream,
        in_tx,
        pump_write,
        heard.clone(),
        started,
        cancel.clone(),
        finish.clone(),
    ));
    tokio::spawn(write_loop::<_, Out>(
        ws_sink,
        out_rx,
        pump_read,
        cancel.clone(),
        closed_tx.subscribe(),
        finish.clone(),
    ));
    tokio::spawn(drive_mux(
        connection,
        open_rx,
        inbound_tx,
        cancel.clone(),
        finish,
    ));

    Ok(Link {
        incoming: in_rx,
        outgoing: out_tx,
        opener: Opener { tx: open_tx },
        inbound_streams: inbound_rx,
        closed: closed_rx,
        closed_tx,
        heard,
        started,
        cancel,
    })
}

/// Keeps the first reason a session ended for; later ones are consequences of it.
fn record_first(closed: &watch::Sender<Option<Closed>>, reason: Closed) {
    closed.send_if_modified(|slot| {
        if slot.is_none() {
            *slot = Some(reason);
            true
        } else {
            false
        }
    });
}

type WsStream<S> = futures::stream::SplitStream<WebSocketStream<S>>;
type WsSink<S> = futures::stream::SplitSink<WebSocketStream<S>, Message>;

async fn read_loop<S, In>(
    mut ws: WsStream<S>,
    to_app: mpsc::Sender<In>,
    mut to_mux: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    heard: Arc<AtomicU64>,
    started: Instant,
    cancel: CancellationToken,
    finish: impl Fn(Closed),
) where
    S: AsyncRead + AsyncWrite + Unpin,
    In: Carrier,
{
    let reason = loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break Closed::Local("cancelled".into()),
            m = ws.next() => m,
        };
        let message = match message {
            None => break Closed::Transport("connection ended without a close frame".into()),
            Some(Err(e)) => break Closed::Transport(e.to_string()),
            Some(Ok(m)) => m,
        };
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        heard.store(millis, Ordering::Relaxed);
        let bytes = match message {
            Message::Binary(b) => b,
            Message::Close(frame) => {
                break Closed::ByPeer(
                    frame.map_or_else(|| "no reason given".into(), |f| f.reason.to_string()),
                );
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Text(_) => break Closed::Protocol("text message on a binary protocol".into()),
        };
        let frame = match In::decode(&bytes) {
            Ok(f) => f,
            Err(e) => break Closed::Protocol(e.to_string()),
        };
        match frame.into_tunnel() {
            Ok(chunk) => {
                let wrote = tokio::select! {
                    _ = cancel.cancelled() => break Closed::Local("cancelled".into()),
                    r = to_mux.write_all(&chunk) => r,
                };
                if let Err(e) = wrote {
                    break Closed::Transport(format!("tunnel pipe: {e}"));
                }
            }
            Err(frame) => {
                let sent = tokio::select! {
                    _ = cancel.cancelled() => break Closed::Local("cancelled".into()),
                    r = to_app.send(frame) => r,
                };
                if sent.is_err() {
                    break Closed::Local("application stopped reading".into());
                }
            }
        }
    };
    finish(reason);
}

async fn write_loop<S, Out>(
    mut ws: WsSink<S>,
    mut from_app: mpsc::Receiver<Out>,
    mut from_mux: tokio::io::ReadHalf<tokio::io::DuplexStream>,
    cancel: CancellationToken,
    mut closed: watch::Receiver<Option<Closed>>,
    finish: impl Fn(Closed),
) where
    S: AsyncRead + AsyncWrite + Unpin,
    Out: Carrier,
{
    // Starts small so an idle session costs little; grows to a full chunk once the tunnel
    // carries bulk data.
    let mut buf = vec![0u8; 4 * 1024];
    let mut mux_open = true;
    let outcome: Result<(), Closed> = loop {
        let frame = tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ok(()),
            f = from_app.recv() => match f {
                Some(f) => f,
                None => break Ok(()),
            },
            n = from_mux.read(&mut buf), if mux_open => match n {
                Ok(0) | Err(_) => { mux_open = false; continue; }
                Ok(n) => {
                    let frame = Out::tunnel(buf[..n].to_vec());
                    if n == buf.len() && buf.len() < TUNNEL_CHUNK {
                        buf.resize(TUNNEL_CHUNK, 0);
                    }
                    frame
                }
            },
        };
        let bytes = match frame.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "dropping a frame that cannot be encoded");
                continue;
            }
        };
        if let Err(e) = ws.send(Message::Binary(bytes.into())).await {
            break Err(Closed::Transport(e.to_string()));
        }
    };
    match outcome {
        Err(reason) => finish(reason),
        Ok(()) => {
            // Say why, when the reader found a protocol error; the peer logs the reason.
            let reason = closed.borrow_and_update().clone();
            let text = match &reason {
                Some(Closed::Protocol(r)) | Some(Closed::Local(r)) => r.clone(),
                _ => String::new(),
            };
            let code = match reason {
                Some(Closed::Protocol(_)) => {
                    tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Protocol
                }
                _ => tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            };
            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code,
                reason: truncate_reason(&text).into(),
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Close(Some(frame))))
                    .await;
            finish(Closed::Local("session ended".into()));
        }
    }
}

/// Reads the length-prefixed header that opens a tunnel stream (a `TunnelOpen` from the agent,
/// the controller's `TunnelReply`), as `unidesk_protocol::tunnel` frames it. The error says
/// what failed: the read, the length (bounded before anything is allocated) or the decode.
pub async fn read_tunnel_header<T, S>(stream: &mut S) -> Result<T, String>
where
    T: serde::de::DeserializeOwned,
    S: AsyncRead + Unpin,
{
    use unidesk_protocol::tunnel::{decode_header, header_len};
    let mut prefix = [0u8; 2];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = header_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    decode_header::<T>(&body).map_err(|e| e.to_string())
}

/// Close reasons are limited to 123 bytes by the WebSocket protocol.
pub fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

type Mux = yamux::Connection<tokio_util::compat::Compat<tokio::io::DuplexStream>>;

async fn drive_mux(
    mut connection: Mux,
    mut open_rx: mpsc::Receiver<oneshot::Sender<Result<TunnelStream, OpenStreamError>>>,
    inbound_tx: mpsc::Sender<TunnelStream>,
    cancel: CancellationToken,
    finish: impl Fn(Closed),
) {
    let mut pending_open: Option<oneshot::Sender<Result<TunnelStream, OpenStreamError>>> = None;
    let mut opens_closed = false;
    let driven = futures::future::poll_fn(|cx| {
        loop {
            if pending_open.is_some() {
                match connection.poll_new_outbound(cx) {
                    Poll::Ready(result) => {
                        let result = result
                            .map(|s| s.compat())
                            .map_err(|e| OpenStreamError(e.to_string()));
                        if let Some(waiter) = pending_open.take() {
                            let _ = waiter.send(result);
                        }
                        continue;
                    }
                    Poll::Pending => break,
                }
            }
            if opens_closed {
                break;
            }
            match open_rx.poll_recv(cx) {
                Poll::Ready(Some(waiter)) => pending_open = Some(waiter),
                Poll::Ready(None) => opens_closed = true,
                Poll::Pending => break,
            }
        }
        loop {
            match connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if inbound_tx.try_send(stream.compat()).is_err() {
                        tracing::warn!("dropping an inbound tunnel stream: too many waiting");
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    tokio::select! {
        _ = cancel.cancelled() => {}
        result = driven => match result {
            Ok(()) => finish(Closed::Local("tunnel multiplexer ended".into())),
            Err(e) => finish(Closed::Protocol(format!("tunnel multiplexer: {e}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use unidesk_protocol::{LaunchId, RunId};

    async fn pair() -> (
        Link<AgentFrame, ControllerFrame>,
        Link<ControllerFrame, AgentFrame>,
    ) {
        let (a, b) = duplex(1 << 20);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config()));
        let client = WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config()));
        let (server, client) = tokio::join!(server, client);
        let cfg = LinkConfig::default();
        let c = spawn(server, Mode::Server, &cfg, CancellationToken::new()).unwrap();
        let a = spawn(client, Mode::Client, &cfg, CancellationToken::new()).unwrap();
        (c, a)
    }

    #[tokio::test]
    async fn control_frames_and_streams_share_one_session() {
        let (mut controller, mut agent) = pair().await;
        let launch = ControllerFrame::Cancel {
            launch_id: LaunchId::new("l").unwrap(),
            reason: "test".into(),
        };
        controller.outgoing.send(launch.clone()).await.unwrap();
        assert_eq!(agent.incoming.recv().await.unwrap(), launch);

        let mut out = agent.opener.open().await.unwrap();
        out.write_all(b"hello").await.unwrap();
        let mut inbound = controller.inbound_streams.recv().await.unwrap();
        let mut got = [0u8; 5];
        inbound.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let _ = RunId::new("r").unwrap();
    }

    #[tokio::test]
    async fn control_frames_pass_a_stalled_bulk_stream() {
        let (mut controller, agent) = pair().await;
        // A stream whose reader never reads: yamux's window fills and the writer stalls.
        let mut bulk = agent.opener.open().await.unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if bulk.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let _stalled = controller.inbound_streams.recv().await.unwrap();
        for i in 0..100u64 {
            agent
                .outgoing
                .send(AgentFrame::Pong { nonce: i })
                .await
                .unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), controller.incoming.recv())
                .await
                .expect("control frame delayed behind a stalled stream");
            assert_eq!(got, Some(AgentFrame::Pong { nonce: i }));
        }
        writer.abort();
    }

    #[tokio::test]
    async fn garbage_closes_the_session_with_a_reason() {
        let (a, b) = duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config()));
        let client = WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config()));
        let (server, mut client) = tokio::join!(server, client);
        let link: Link<AgentFrame, ControllerFrame> = spawn(
            server,
            Mode::Server,
            &LinkConfig::default(),
            CancellationToken::new(),
        )
        .unwrap();
        // This side's version, then bytes that are no frame.
        let mut garbage = unidesk_protocol::PROTOCOL_VERSION.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[250, 3]);
        client.send(Message::Binary(garbage.into())).await.unwrap();
        let reason = link.closed().wait().await;
        assert!(
            matches!(&reason, Closed::Protocol(r) if r.contains("malformed agent frame")),
            "{reason:?}"
        );
        // The peer is told why.
        let mut told = None;
        while let Some(Ok(m)) = client.next().await {
            if let Message::Close(Some(f)) = m {
                told = Some(f.reason.to_string());
                break;
            }
        }
        assert!(told.unwrap_or_default().contains("malformed agent frame"));
    }

    #[test]
    fn window_below_streams_is_a_config_error() {
        let cfg = LinkConfig {
            max_connection_window: 1 << 20,
            max_streams: 256,
            control_queue: 8,
        };
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("max_connection_window=1048576"));
    }
}
