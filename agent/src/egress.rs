//! The agent's loopback HTTP proxy front: it accepts local clients (Git, Docker builds),
//! reads one request head, asks a [`TunnelOpener`] for a byte stream to the target and
//! splices the client onto it.
//!
//! It understands exactly two request shapes: `CONNECT host:port` (used for https) and an
//! absolute-form request such as `GET http://host/path` (plain http), which it rewrites to
//! origin form. It must not decide egress policy (the controller does, on the resolved
//! address), must not open TCP connections itself, and must never listen on anything but
//! loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod request;

use request::authority;
pub use request::{MAX_HEAD, ORIGIN_PREFIX, ProxyError, ProxyRequest, parse_head, path_named_url};

/// How long a client has to send its whole request head, however it trickles it in: a
/// slowloris-style client holds one of [`MAX_CLIENTS`] slots for at most this long. Git and
/// Docker send their heads at once.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(10);

/// How long opening a tunnel stream may take before the client gets 504.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// How long writing an error reply or a forwarded head may take.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// After an error reply, how long and how much unread client input is drained before closing.
const LINGER_DEADLINE: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// How many clients are served at once; further clients wait in the listen backlog.
const MAX_CLIENTS: usize = 256;

/// A byte stream in both directions, such as a tunnel stream or a TCP connection.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite {}

impl<T: AsyncRead + AsyncWrite + ?Sized> AsyncReadWrite for T {}

/// A stream to the proxy's target, as handed out by a [`TunnelOpener`].
pub type BoxedStream = Box<dyn AsyncReadWrite + Send + Unpin>;

/// Opens a byte stream to `host:port` on the far side of the tunnel.
pub trait TunnelOpener: Send + Sync {
    /// Opens a stream to `host:port`; the stream carries raw bytes once this resolves.
    fn open(&self, host: String, port: u16) -> BoxFuture<'static, Result<BoxedStream, OpenError>>;
}

/// Why a tunnel stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The controller refused the target; `reason` is its explanation, which the client
    /// receives as the body of a 403.
    #[error("egress to {target} was refused by the controller: {reason}")]
    Refused { target: String, reason: String },
    /// The tunnel itself is not available (not connected, stream failed); the client gets
    /// a 502.
    #[error("the egress tunnel is down: {reason}")]
    TunnelDown { reason: String },
}

/// The proxy listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The configured proxy address is not a loopback address.
    #[error(
        "egress proxy address {addr} is not loopback: the proxy must only be reachable from this host"
    )]
    NotLoopback { addr: SocketAddr },
    /// Binding the loopback address failed.
    #[error("could not listen on egress proxy address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the proxy's listening socket, refusing any address that is not loopback.
///
/// The listener is already non-blocking, ready for `tokio::net::TcpListener::from_std`.
pub fn bind_loopback(addr: SocketAddr) -> Result<std::net::TcpListener, EgressError> {
    if !addr.ip().is_loopback() {
        return Err(EgressError::NotLoopback { addr });
    }
    let bind = |source| EgressError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    Ok(listener)
}

/// Serves proxy clients from `listener` until `cancel` fires, then closes every client
/// connection and returns once their tasks have ended.
pub async fn serve(
    listener: TcpListener,
    opener: Arc<dyn TunnelOpener>,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        // Waiting for a slot before accepting keeps excess clients in the kernel backlog.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Usually out of file descriptors; pause rather than spin.
                tracing::warn!(%error, "egress proxy accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let opener = Arc::clone(&opener);
        let cancel = cancel.child_token();
        tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = handle_client(client, peer, opener.as_ref()) => {}
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one client connection from head to close.
async fn handle_client(mut client: TcpStream, peer: SocketAddr, opener: &dyn TunnelOpener) {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(HEAD_DEADLINE, read_head(&mut client, &mut buf)).await;
    let (request, head_len) = match head {
        Err(_) => {
            tracing::debug!(%peer, "proxy client sent no request head in time");
            reply(
                &mut client,
                "408 Request Timeout",
                "request head not received in time\n",
            )
            .await;
            return;
        }
        Ok(Err(HeadRead::Closed)) => return,
        Ok(Err(HeadRead::Io(error))) => {
            tracing::debug!(%peer, %error, "reading proxy request head failed");
            return;
        }
        Ok(Err(HeadRead::Bad(error))) => {
            tracing::info!(%peer, %error, "bad proxy request");
            reply(&mut client, error.status(), &format!("{error}\n")).await;
            return;
        }
        Ok(Ok(parsed)) => parsed,
    };
    // Bytes the client sent after its head (a TLS hello, a request body) go upstream first.
    let rest = buf.get(head_len..).unwrap_or_default();
    let (host, port) = match &request {
        ProxyRequest::Connect { host, port } | ProxyRequest::Forward { host, port, .. } => {
            (host.clone(), *port)
        }
    };
    let target = authority(&host, port);
    let opened = tokio::time::timeout(OPEN_DEADLINE, opener.open(host, port)).await;
    let mut upstream = match opened {
        Ok(Ok(stream)) => stream,
        Ok(Err(OpenError::Refused { target, reason })) => {
            tracing::warn!(%peer, %target, %reason, "egress refused");
            reply(&mut client, "403 Forbidden", &format!("{reason}\n")).await;
            return;
        }
        Ok(Err(OpenError::TunnelDown { reason })) => {
            tracing::warn!(%peer, %target, %reason, "egress tunnel down");
            reply(
                &mut client,
                "502 Bad Gateway",
                &format!("egress tunnel is down: {reason}\n"),
            )
            .await;
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %target, "egress tunnel did not open in time");
            let body = format!("opening {target} did not finish within {OPEN_DEADLINE:?}\n");
            reply(&mut client, "504 Gateway Timeout", &body).await;
            return;
        }
    };
    let prelude = match &request {
        ProxyRequest::Connect { .. } => {
            let established = b"HTTP/1.1 200 Connection Established\r\n\r\n";
            if !write_within(&mut client, established).await {
                return;
            }
            rest.to_vec()
        }
        ProxyRequest::Forward { head, .. } => [head.as_slice(), rest].concat(),
    };
    if !prelude.is_empty() && !write_within(&mut upstream, &prelude).await {
        tracing::debug!(%peer, %target, "writing to the egress stream failed");
        return;
    }
    tracing::debug!(%peer, %target, "egress spliced");
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(%peer, %target, up, down, "egress closed"),
        Err(error) => tracing::debug!(%peer, %target, %error, "egress ended with an error"),
    }
}

/// Why no request could be read.
enum HeadRead {
    /// The client closed before sending anything.
    Closed,
    Io(std::io::Error),
    Bad(ProxyError),
}

/// Reads into `buf` until a complete request head parses, and returns it with the head's
/// length; `buf` may hold further bytes after the head.
async fn read_head(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(ProxyRequest, usize), HeadRead> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = client.read(&mut chunk).await.map_err(HeadRead::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadRead::Closed
            } else {
                HeadRead::Bad(ProxyError::Malformed(
                    "connection closed before the head ended".into(),
                ))
            });
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match parse_head(buf) {
            Ok(Some(parsed)) => return Ok(parsed),
            Ok(None) if buf.len() >= MAX_HEAD => {
                return Err(HeadRead::Bad(ProxyError::HeadTooLarge));
            }
            Ok(None) => {}
            Err(e) => return Err(HeadRead::Bad(e)),
        }
    }
}

/// Writes all of `bytes` within [`WRITE_DEADLINE`]; false when that failed.
async fn write_within<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> bool {
    let write = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    matches!(
        tokio::time::timeout(WRITE_DEADLINE, write).await,
        Ok(Ok(()))
    )
}

/// Sends an error reply with a plain-text body and closes the client's write side.
async fn reply(client: &mut TcpStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if !write_within(client, response.as_bytes()).await {
        return;
    }
    let _ = tokio::time::timeout(WRITE_DEADLINE, client.shutdown()).await;
    // Closing with unread input makes the kernel send a reset, which can destroy the reply
    // before the client reads it; so read (and drop) what the client still sends, briefly.
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_DEADLINE, drain).await;
}

#[cfg(test)]
mod tests {
    use super::request::split_authority;
    use super::*;

    /// A test double standing in for the tunnel: it connects straight to the target with TCP
    /// on this host, as the controller would after allowing it.
    struct DirectTcpOpenerStandingInForTunnel;

    impl TunnelOpener for DirectTcpOpenerStandingInForTunnel {
        fn open(
            &self,
            host: String,
            port: u16,
        ) -> BoxFuture<'static, Result<BoxedStream, OpenError>> {
            Box::pin(async move {
                let stream = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| OpenError::Refused {
                        target: authority(&host, port),
                        reason: e.to_string(),
                    })?;
                Ok(Box::new(stream) as BoxedStream)
            })
        }
    }

    /// Refuses every target the way the controller's policy would, or reports the tunnel down.
    struct RefusingOpener {
        down: bool,
    }

    impl TunnelOpener for RefusingOpener {
        fn open(
            &self,
            host: String,
            port: u16,
        ) -> BoxFuture<'static, Result<BoxedStream, OpenError>> {
            let target = authority(&host, port);
            let err = if self.down {
                OpenError::TunnelDown {
                    reason: "the agent is not connected to the controller".into(),
                }
            } else {
                OpenError::Refused {
                    reason: format!("egress to {target} refused: no rule matched {target}"),
                    target,
                }
            };
            Box::pin(async move { Err(err) })
        }
    }

    /// A running proxy on 127.0.0.1:0; dropping it stops the proxy.
    struct Proxy {
        addr: SocketAddr,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    async fn proxy(opener: impl TunnelOpener + 'static) -> Proxy {
        let std = bind_loopback("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, Arc::new(opener), cancel.clone()));
        Proxy { addr, cancel, task }
    }

    /// An echo server that serves one connection.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        addr
    }

    /// A tiny HTTP server: reads one request head (and a body of `Content-Length`), hands
    /// the raw request back through the channel, answers `hello` and closes.
    async fn http_server() -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            let body_len = loop {
                let n = s.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0, "client closed early");
                got.extend_from_slice(&chunk[..n]);
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                if let httparse::Status::Complete(len) = req.parse(&got).unwrap() {
                    let cl = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |h| {
                            std::str::from_utf8(h.value).unwrap().parse().unwrap()
                        });
                    break len + cl;
                }
            };
            while got.len() < body_len {
                let n = s.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0, "client closed before the body ended");
                got.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                .await
                .unwrap();
            s.shutdown().await.unwrap();
            tx.send(String::from_utf8(got).unwrap()).unwrap();
        });
        (addr, rx)
    }

    /// Sends `request` to the proxy and reads until it closes.
    async fn exchange(proxy: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn connect_splices_to_an_echo_server() {
        let echo = echo_server().await;
        let p = proxy(DirectTcpOpenerStandingInForTunnel).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        // Bytes pipelined after the head must reach the target too.
        let req = format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\nearly;");
        s.write_all(req.as_bytes()).await.unwrap();
        let established = b"HTTP/1.1 200 Connection Established\r\n\r\n";
        let mut got = vec![0u8; established.len() + "early;".len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..established.len()], established);
        assert_eq!(&got[established.len()..], b"early;");
        s.write_all(b"ping").await.unwrap();
        let mut ping = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ping))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&ping, b"ping");
    }

    #[tokio::test]
    async fn absolute_get_is_rewritten_to_origin_form() {
        let (server, request) = http_server().await;
        let p = proxy(DirectTcpOpenerStandingInForTunnel).await;
        let port = server.port();
        let req = format!(
            "POST http://127.0.0.1:{port}/repo.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\nProxy-Authorization: Basic c2VjcmV0\r\n\
             Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nbody"
        );
        let response = exchange(p.addr, req.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nhello"), "{response}");
        let seen = request.await.unwrap();
        assert!(
            seen.starts_with("POST /repo.git/info/refs?service=git-upload-pack HTTP/1.1\r\n"),
            "{seen}"
        );
        assert!(
            seen.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{seen}"
        );
        assert!(seen.contains("\r\nConnection: close\r\n"), "{seen}");
        assert!(!seen.to_ascii_lowercase().contains("proxy-"), "{seen}");
        assert!(!seen.contains("keep-alive"), "{seen}");
        assert!(seen.ends_with("\r\n\r\nbody"), "{seen}");
    }

    #[tokio::test]
    async fn absolute_get_without_port_or_host_header_defaults() {
        let req = b"GET http://example.test HTTP/1.1\r\nAccept: */*\r\n\r\n";
        let (parsed, len) = parse_head(req).unwrap().unwrap();
        assert_eq!(len, req.len());
        let ProxyRequest::Forward { host, port, head } = parsed else {
            panic!("not forwarded: {parsed:?}");
        };
        assert_eq!((host.as_str(), port), ("example.test", 80));
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET / HTTP/1.1\r\nAccept: */*\r\nHost: example.test:80\r\nConnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn refusal_yields_403_with_the_reason() {
        let p = proxy(RefusingOpener { down: false }).await;
        let response = exchange(p.addr, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{response}"
        );
        assert!(
            response.ends_with(
                "\r\n\r\negress to evil.example:443 refused: no rule matched evil.example:443\n"
            ),
            "{response}"
        );
    }

    #[tokio::test]
    async fn tunnel_down_yields_502() {
        let p = proxy(RefusingOpener { down: true }).await;
        let response = exchange(p.addr, b"GET http://example.test/ HTTP/1.1\r\n\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{response}"
        );
        assert!(
            response.contains("not connected to the controller"),
            "{response}"
        );
    }

    #[tokio::test]
    async fn garbage_yields_400() {
        let p = proxy(DirectTcpOpenerStandingInForTunnel).await;
        for req in [
            &b"\x16\x03\x01\x02\x00garbage\r\n\r\n"[..],
            b"GET /relative HTTP/1.1\r\n\r\n",
            b"GET https://example.test/ HTTP/1.1\r\n\r\n",
            b"CONNECT example.test HTTP/1.1\r\n\r\n",
            b"CONNECT user@example.test:443 HTTP/1.1\r\n\r\n",
        ] {
            let response = exchange(p.addr, req).await;
            assert!(
                response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{:?} -> {response}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[tokio::test]
    async fn oversized_head_yields_431() {
        let p = proxy(DirectTcpOpenerStandingInForTunnel).await;
        let long = format!("X-Filler: {}\r\n", "a".repeat(1000));
        let many = "X-Filler: a\r\n";
        for (filler, why) in [
            (long.as_str(), "request head exceeds 16384 bytes"),
            (many, "request head has more than 100 headers"),
        ] {
            let mut req = b"GET http://example.test/ HTTP/1.1\r\n".to_vec();
            while req.len() <= MAX_HEAD {
                req.extend_from_slice(filler.as_bytes());
            }
            let response = exchange(p.addr, &req).await;
            assert!(
                response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
                "{response}"
            );
            assert!(
                response.ends_with(&format!("\r\n\r\n{why}\n")),
                "{response}"
            );
        }
    }

    #[tokio::test]
    async fn cancel_stops_the_proxy() {
        let echo = echo_server().await;
        let mut p = proxy(DirectTcpOpenerStandingInForTunnel).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(format!("CONNECT {echo} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut established = [0u8; 39];
        s.read_exact(&mut established).await.unwrap();
        p.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), &mut p.task)
            .await
            .unwrap()
            .unwrap();
        // The spliced client is closed and no new client is accepted.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(TcpStream::connect(p.addr).await.is_err());
    }

    /// A client that trickles its head one byte a second gets 408 at the head deadline,
    /// not later, and the proxy holds at most `MAX_HEAD` plus one read of it.
    #[tokio::test(start_paused = true)]
    async fn slowloris_head_is_cut_at_the_deadline() {
        let p = proxy(DirectTcpOpenerStandingInForTunnel).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let started = tokio::time::Instant::now();
        let trickle = b"GET http://example.test/ HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        for byte in trickle {
            s.write_all(&[*byte]).await.unwrap();
            // Wait a second for an answer before the next byte.
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut chunk)).await {
                Err(_) => {}
                Ok(Ok(n)) => {
                    answer.extend_from_slice(&chunk[..n]);
                    break;
                }
                Ok(Err(e)) => panic!("reading the answer: {e}"),
            }
        }
        let elapsed = started.elapsed();
        let _ = s.read_to_end(&mut answer).await;
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );
        assert!(
            elapsed >= HEAD_DEADLINE && elapsed < HEAD_DEADLINE + Duration::from_secs(5),
            "answered after {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn adversarial_heads_get_400_naming_the_fault() {
        let p = proxy(RefusingOpener { down: false }).await;
        for (req, why) in [
            (
                &b"CONNECT example.test:https HTTP/1.1\r\n\r\n"[..],
                "port is not 1-65535",
            ),
            (
                b"CONNECT example.test:0 HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (
                b"CONNECT example.test: HTTP/1.1\r\n\r\n",
                "port is not 1-65535",
            ),
            (b"CONNECT example.test HTTP/1.1\r\n\r\n", "port missing"),
            (
                b"GET http://user:pw@example.test/ HTTP/1.1\r\n\r\n",
                "credentials in the request target",
            ),
            (b"\x00\x01\x02\x03\r\n\r\n", "malformed request head"),
            (b"GET  HTTP/1.1\r\n\r\n", "malformed request head"),
            (b"GET http://a/ HTTP/9.9\r\n\r\n", "malformed request head"),
        ] {
            let response = exchange(p.addr, req).await;
            assert!(
                response.starts_with("HTTP/1.1 400 Bad Request\r\n") && response.contains(why),
                "{:?} -> {response}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn bind_loopback_refuses_non_loopback() {
        for addr in ["0.0.0.0:18789", "192.0.2.1:18789", "[::]:18789"] {
            let err = bind_loopback(addr.parse().unwrap()).unwrap_err();
            assert!(matches!(err, EgressError::NotLoopback { .. }), "{err:?}");
            assert!(
                err.to_string().contains(&format!("{addr} is not loopback")),
                "{err}"
            );
        }
        let ok = bind_loopback("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(ok.local_addr().unwrap().ip().is_loopback());
    }

    #[test]
    fn split_authority_cases() {
        assert_eq!(
            split_authority("github.com:443", None),
            Ok(("github.com".into(), 443))
        );
        assert_eq!(
            split_authority("[::1]:8080", None),
            Ok(("::1".into(), 8080))
        );
        assert_eq!(split_authority("[::1]", Some(80)), Ok(("::1".into(), 80)));
        assert_eq!(split_authority("host", Some(80)), Ok(("host".into(), 80)));
        assert!(split_authority("host", None).is_err());
        assert!(split_authority("host:0", None).is_err());
        assert!(split_authority("host:99999", None).is_err());
        assert!(split_authority(":443", None).is_err());
        assert!(split_authority("ho st:443", None).is_err());
        assert!(split_authority("[::1", None).is_err());
        assert!(split_authority("::1:443", None).is_err());
        assert!(split_authority("[::1]x", None).is_err());
    }

    #[test]
    fn upstream_named_in_the_path_is_forwarded_with_its_own_host() {
        let url =
            path_named_url("http://127.0.0.1:18789", "http://git.example:8080/a/b.git").unwrap();
        assert_eq!(
            url,
            "http://127.0.0.1:18789/.unidesk-egress/git.example:8080/a/b.git"
        );
        assert_eq!(
            path_named_url("http://127.0.0.1:18789/", "http://h/x").unwrap(),
            "http://127.0.0.1:18789/.unidesk-egress/h:80/x"
        );
        assert_eq!(path_named_url("http://127.0.0.1:1", "https://h/x"), None);
        let head = b"GET /.unidesk-egress/git.example:8080/a/b.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1:18789\r\n\r\n";
        let (request, _) = parse_head(head).unwrap().unwrap();
        let ProxyRequest::Forward { host, port, head } = request else {
            panic!("expected a forward")
        };
        assert_eq!((host.as_str(), port), ("git.example", 8080));
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("GET /a/b.git/info/refs?service=git-upload-pack HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Host: git.example:8080\r\n") && !head.contains("18789"),
            "{head}"
        );
        assert!(parse_head(b"GET /.unidesk-egress/bad host/x HTTP/1.1\r\n\r\n").is_err());
    }
}
