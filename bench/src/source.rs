//! The byte source the tunnel benchmark carries, and the client side of one transfer.
//!
//! A client opens a byte stream (through the agent's proxy, a direct TLS connection or
//! direct TCP — the same exchange on all three) and sends a 9-byte request: a direction and
//! a length. `Down`: the source sends that many bytes. `Up`: the client sends them and the
//! source answers one byte once all have arrived, so the client's clock stops only when the
//! far end has everything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bytes per read and write.
const CHUNK: usize = 128 * 1024;

/// How long one connection may sit without finishing its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From the source to the client (a download: `git fetch`, an image pull).
    Down,
    /// From the client to the source (an upload).
    Up,
}

/// What a client asks of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub direction: Direction,
    pub len: u64,
}

/// A request the source cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request direction byte {0} is neither 0 nor 1")]
pub struct BadRequest(pub u8);

impl Request {
    /// The request's wire form: direction byte, then the length big-endian.
    pub fn encode(&self) -> [u8; 9] {
        let mut out = [0u8; 9];
        out[0] = match self.direction {
            Direction::Down => 0,
            Direction::Up => 1,
        };
        out[1..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Reads a request's wire form.
    pub fn decode(bytes: [u8; 9]) -> Result<Self, BadRequest> {
        let direction = match bytes[0] {
            0 => Direction::Down,
            1 => Direction::Up,
            other => return Err(BadRequest(other)),
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[1..]);
        Ok(Self {
            direction,
            len: u64::from_be_bytes(len),
        })
    }
}

/// Serves one request on `stream` and closes it.
pub async fn serve_one<S>(mut stream: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 9];
    tokio::time::timeout(REQUEST_DEADLINE, stream.read_exact(&mut head))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in 30 s"))??;
    let request = Request::decode(head)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    match request.direction {
        Direction::Down => send(&mut stream, request.len).await?,
        Direction::Up => {
            receive(&mut stream, request.len).await?;
            stream.write_all(&[1]).await?;
        }
    }
    stream.flush().await?;
    // A client that has all its bytes may close first; that is a normal end, not an error.
    let _ = stream.shutdown().await;
    Ok(())
}

/// Runs one transfer as the client, returning once the last byte has arrived at the far end.
pub async fn transfer<S>(stream: &mut S, request: Request) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&request.encode()).await?;
    stream.flush().await?;
    match request.direction {
        Direction::Down => receive(stream, request.len).await,
        Direction::Up => {
            send(stream, request.len).await?;
            stream.flush().await?;
            let mut done = [0u8; 1];
            stream.read_exact(&mut done).await?;
            Ok(())
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, len: u64) -> std::io::Result<()> {
    let chunk = vec![0xa5u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

async fn receive<S: AsyncRead + Unpin>(stream: &mut S, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream ended {left} of {len} bytes short"),
            ));
        }
        left -= n as u64;
    }
    Ok(())
}

/// Serves plain TCP clients on a fresh loopback port until `cancel` fires.
pub async fn spawn_tcp(cancel: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let _ = tcp.set_nodelay(true);
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = serve_one(tcp) => if let Err(e) = r {
                        tracing::warn!(error = %e, "tcp source");
                    },
                }
            });
        }
    });
    Ok(addr)
}

/// Serves TLS clients (with `config`) on a fresh loopback port until `cancel` fires.
pub async fn spawn_tls(
    config: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let served = async {
                    let tls = tokio::time::timeout(REQUEST_DEADLINE, acceptor.accept(tcp))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake")
                        })??;
                    serve_one(tls).await
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = served => if let Err(e) = r {
                        tracing::warn!(error = %e, "tls source");
                    },
                }
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        for direction in [Direction::Down, Direction::Up] {
            let r = Request {
                direction,
                len: 0x0102_0304_0506,
            };
            assert_eq!(Request::decode(r.encode()), Ok(r));
        }
        let mut bad = [0u8; 9];
        bad[0] = 9;
        assert_eq!(Request::decode(bad), Err(BadRequest(9)));
    }

    #[tokio::test]
    async fn both_directions_over_a_pipe() {
        for direction in [Direction::Down, Direction::Up] {
            let (mut client, server) = tokio::io::duplex(4096);
            let served = tokio::spawn(serve_one(server));
            let len = 3 * CHUNK as u64 + 17;
            transfer(&mut client, Request { direction, len })
                .await
                .unwrap();
            served.await.unwrap().unwrap();
        }
    }
}
