//! A smart-HTTP Git server on loopback for the demo and for tests: it serves the bare
//! repositories under one root directory over http or https.
//!
//! Each request runs `git-http-backend` as a CGI program: the request body is streamed to
//! its stdin and its stdout (CGI headers, then the body) is streamed back, so memory stays
//! bounded whatever the repository size. This module owns only that adaptation; it must not
//! listen on anything but 127.0.0.1, must not interpret Git data, and must not serve pushes
//! (the backend refuses `receive-pack` without an authenticated user, and none is set).

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Debian's `git-http-backend`, from the `git` package.
pub const HTTP_BACKEND: &str = "/usr/lib/git-core/git-http-backend";

/// The search path given to the backend, which runs `git upload-pack` through it. Fixed so
/// that the server does not depend on the caller's environment.
const BACKEND_PATH: &str = "/usr/lib/git-core:/usr/bin:/bin";

/// The largest CGI header block the backend may write before its body.
const MAX_CGI_HEAD: usize = 64 * 1024;

/// Read size for the backend's stdout; also the largest body chunk held in memory.
const BODY_CHUNK: usize = 16 * 1024;

/// How much of the backend's stderr is kept for the log.
const MAX_STDERR: u64 = 8 * 1024;

/// How long the backend may take to write its headers.
const CGI_HEAD_DEADLINE: Duration = Duration::from_secs(60);

/// The longest pause while streaming a request or response body.
const IO_IDLE_DEADLINE: Duration = Duration::from_secs(60);

/// The longest a single backend process may live.
const CGI_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// How long a client has to send its request head, and to finish a TLS handshake.
const CLIENT_HEAD_DEADLINE: Duration = Duration::from_secs(30);

/// How many client connections are served at once.
const MAX_CONNECTIONS: usize = 64;

/// The response body type: the backend's stdout, or a short text for errors.
type Body = BoxBody<Bytes, io::Error>;

/// A certificate chain and its private key, both PEM, for serving https.
#[derive(Clone)]
pub struct GitTls {
    /// The server certificate, followed by any intermediates.
    pub cert_pem: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

impl fmt::Debug for GitTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitTls")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The Git server could not start.
#[derive(Debug, thiserror::Error)]
pub enum GitServeError {
    /// The repository root is missing or not a directory.
    #[error("git server root {} is not a directory", root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: Option<io::Error>,
    },
    /// `git-http-backend` is not installed.
    #[error("git server needs {path}, which is missing; install the git package")]
    BackendMissing { path: &'static str },
    /// Binding 127.0.0.1:0 failed.
    #[error("git server could not listen on 127.0.0.1")]
    Bind {
        #[source]
        source: io::Error,
    },
    /// The TLS certificate or key PEM is unusable.
    #[error("git server tls {what} is unusable: {why}")]
    Tls { what: &'static str, why: String },
}

/// A running Git server; dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct GitServer {
    addr: SocketAddr,
    https: bool,
    cancel: CancellationToken,
}

impl GitServer {
    /// Serves the bare repositories under `root` on 127.0.0.1 at a free port, over https
    /// when `tls` is given.
    pub async fn start(root: PathBuf, tls: Option<GitTls>) -> Result<GitServer, GitServeError> {
        let root = match tokio::fs::metadata(&root).await {
            Ok(m) if m.is_dir() => {
                tokio::fs::canonicalize(&root)
                    .await
                    .map_err(|source| GitServeError::Root {
                        root: root.clone(),
                        source: Some(source),
                    })?
            }
            Ok(_) => return Err(GitServeError::Root { root, source: None }),
            Err(source) => {
                return Err(GitServeError::Root {
                    root,
                    source: Some(source),
                });
            }
        };
        if !tokio::fs::try_exists(HTTP_BACKEND).await.unwrap_or(false) {
            return Err(GitServeError::BackendMissing { path: HTTP_BACKEND });
        }
        let acceptor = tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|source| GitServeError::Bind { source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GitServeError::Bind { source })?;
        let cancel = CancellationToken::new();
        let https = acceptor.is_some();
        tracing::info!(%addr, https, root = %root.display(), "git server listening");
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            Arc::new(Site { root, addr, https }),
            cancel.clone(),
        ));
        Ok(GitServer {
            addr,
            https,
            cancel,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The clone URL of `repo` (a path under the root, such as `demo.git`). Over https the
    /// host is `localhost`, so a certificate issued for `localhost` validates.
    pub fn url(&self, repo: &str) -> String {
        let repo = repo.trim_start_matches('/');
        let port = self.addr.port();
        if self.https {
            format!("https://localhost:{port}/{repo}")
        } else {
            format!("http://127.0.0.1:{port}/{repo}")
        }
    }

    /// True when the server speaks https.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// Stops accepting and closes every connection; the same happens on drop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What every request handler needs to know about the server.
#[derive(Debug)]
struct Site {
    root: PathBuf,
    addr: SocketAddr,
    https: bool,
}

fn tls_acceptor(tls: &GitTls) -> Result<tokio_rustls::TlsAcceptor, GitServeError> {
    let certs = unidesk_agent::pem::certificates(tls.cert_pem.as_bytes()).map_err(|why| {
        GitServeError::Tls {
            what: "certificate",
            why,
        }
    })?;
    let key = unidesk_agent::pem::private_key(tls.key_pem.as_bytes())
        .map_err(|why| GitServeError::Tls { what: "key", why })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| GitServeError::Tls {
            what: "certificate and key",
            why: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    site: Arc<Site>,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "git server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let site = Arc::clone(&site);
        let cancel = cancel.clone();
        let acceptor = acceptor.clone();
        tracker.spawn(async move {
            match acceptor {
                None => serve_connection(tcp, peer, site, cancel).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(CLIENT_HEAD_DEADLINE, acceptor.accept(tcp)).await;
                    match handshake {
                        Ok(Ok(tls)) => serve_connection(tls, peer, site, cancel).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "git server tls handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "git server tls handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
    tracing::debug!(addr = %site.addr, "git server stopped");
}

async fn serve_connection<IO>(io: IO, peer: SocketAddr, site: Arc<Site>, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request_cancel = cancel.clone();
    let service = hyper::service::service_fn(move |req| {
        let site = Arc::clone(&site);
        let cancel = request_cancel.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, &site, cancel).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_HEAD_DEADLINE);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // A response still streaming is cut off after a short grace.
            tokio::time::timeout(Duration::from_secs(1), conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "git server connection ended with an error");
    }
}

/// Runs the backend for one request and streams its answer.
async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    site: &Site,
    cancel: CancellationToken,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match run_backend(req, peer, site, cancel).await {
        Ok(response) => {
            tracing::debug!(%peer, %method, path, status = %response.status(), "git request");
            response
        }
        Err(error) => {
            tracing::warn!(%peer, %method, path, %error, "git request failed");
            text_response(error.status(), format!("{error}\n"))
        }
    }
}

/// A request the backend could not answer.
#[derive(Debug, thiserror::Error)]
enum CgiError {
    #[error("could not start {HTTP_BACKEND}")]
    Spawn(#[source] io::Error),
    #[error("{HTTP_BACKEND} wrote no headers within {CGI_HEAD_DEADLINE:?}")]
    HeadTimeout,
    #[error("{HTTP_BACKEND} wrote a bad CGI header block: {0}")]
    BadHead(String),
    #[error("reading the output of {HTTP_BACKEND} failed")]
    Read(#[source] io::Error),
}

impl CgiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::HeadTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

async fn run_backend(
    req: Request<Incoming>,
    peer: SocketAddr,
    site: &Site,
    cancel: CancellationToken,
) -> Result<Response<Body>, CgiError> {
    let (parts, body) = req.into_parts();
    let mut env: Vec<(String, String)> = vec![
        ("GIT_PROJECT_ROOT".into(), site.root.display().to_string()),
        ("GIT_HTTP_EXPORT_ALL".into(), "1".into()),
        // Only the repositories under the root, not the serving user's config, decide.
        ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ("PATH".into(), BACKEND_PATH.into()),
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        ("SERVER_SOFTWARE".into(), "unidesk-gitserve".into()),
        ("SERVER_PROTOCOL".into(), format!("{:?}", parts.version)),
        ("SERVER_NAME".into(), site.addr.ip().to_string()),
        ("SERVER_PORT".into(), site.addr.port().to_string()),
        ("REQUEST_METHOD".into(), parts.method.as_str().into()),
        ("PATH_INFO".into(), parts.uri.path().into()),
        (
            "QUERY_STRING".into(),
            parts.uri.query().unwrap_or_default().into(),
        ),
        ("REMOTE_ADDR".into(), peer.ip().to_string()),
        ("REMOTE_PORT".into(), peer.port().to_string()),
    ];
    if site.https {
        env.push(("HTTPS".into(), "on".into()));
    }
    let chunked = parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
    for (name, value) in &parts.headers {
        let Ok(value) = value.to_str() else { continue };
        match name.as_str() {
            "content-type" => env.push(("CONTENT_TYPE".into(), value.into())),
            // Without CONTENT_LENGTH the backend reads its stdin to the end, which is what a
            // chunked body needs.
            "content-length" if !chunked => env.push(("CONTENT_LENGTH".into(), value.into())),
            // Never pass a client-chosen HTTP_PROXY to a child (httpoxy).
            "content-length" | "proxy" | "transfer-encoding" | "connection" => {}
            other => env.push((
                format!("HTTP_{}", other.to_ascii_uppercase().replace('-', "_")),
                value.into(),
            )),
        }
    }

    #[allow(clippy::disallowed_methods)]
    // git-http-backend is a CGI program: one process per request is its interface, and
    // libgit2 has no server side to call instead.
    let mut command = tokio::process::Command::new(HTTP_BACKEND);
    command
        .env_clear()
        .envs(env)
        .current_dir(&site.root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(CgiError::Spawn)?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(CgiError::Spawn(io::Error::other(
            "a child pipe was not created",
        )));
    };
    let path = parts.uri.path().to_owned();
    tokio::spawn(feed_stdin(body, stdin, path.clone()));
    tokio::spawn(async move {
        let stderr = read_stderr(stderr);
        let exit = async {
            tokio::select! {
                status = child.wait() => Some(status),
                _ = tokio::time::sleep(CGI_DEADLINE) => None,
                _ = cancel.cancelled() => None,
            }
        };
        let (stderr, exit) = tokio::join!(stderr, exit);
        match exit {
            Some(Ok(status)) if status.success() => {}
            Some(Ok(status)) => {
                tracing::warn!(path, %status, stderr, "git-http-backend failed")
            }
            Some(Err(error)) => tracing::warn!(path, %error, "waiting for git-http-backend failed"),
            None => {
                tracing::warn!(
                    path,
                    "git-http-backend killed: deadline passed or server stopping"
                );
                let _ = child.kill().await;
            }
        }
    });

    let (head, rest) = tokio::time::timeout(CGI_HEAD_DEADLINE, read_cgi_head(stdout))
        .await
        .map_err(|_| CgiError::HeadTimeout)??;
    let (stdout, leftover) = rest;
    let mut response = Response::builder().status(head.status);
    for (name, value) in head.headers {
        response = response.header(name, value);
    }
    let tail = futures::stream::unfold(
        ReaderStream::with_capacity(stdout, BODY_CHUNK),
        |mut s| async move {
            match tokio::time::timeout(IO_IDLE_DEADLINE, s.next()).await {
                Ok(Some(item)) => Some((item, s)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "git-http-backend output stalled",
                    )),
                    s,
                )),
            }
        },
    );
    let first = futures::stream::iter((!leftover.is_empty()).then(|| Ok(leftover)));
    let frames = first.chain(tail).map_ok(Frame::data);
    let body = BodyExt::boxed(StreamBody::new(frames));
    response
        .body(body)
        .map_err(|e| CgiError::BadHead(e.to_string()))
}

/// Streams the request body to the backend's stdin, then closes it.
async fn feed_stdin(mut body: Incoming, mut stdin: ChildStdin, path: String) {
    loop {
        let frame = match tokio::time::timeout(IO_IDLE_DEADLINE, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                tracing::debug!(path, %error, "git request body ended with an error");
                break;
            }
            Err(_) => {
                tracing::debug!(path, "git request body stalled");
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match tokio::time::timeout(IO_IDLE_DEADLINE, stdin.write_all(&data)).await {
            Ok(Ok(())) => {}
            // The backend stopped reading (it answered early); nothing more to feed.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = tokio::time::timeout(IO_IDLE_DEADLINE, stdin.shutdown()).await;
}

/// Keeps the first [`MAX_STDERR`] bytes of the backend's stderr for the log and drains the
/// rest so the backend never blocks on a full pipe.
async fn read_stderr(stderr: ChildStderr) -> String {
    let mut kept = Vec::new();
    let mut limited = stderr.take(MAX_STDERR);
    let _ = limited.read_to_end(&mut kept).await;
    let _ = tokio::io::copy(&mut limited.into_inner(), &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&kept).trim_end().to_owned()
}

/// The header block of a CGI response.
#[derive(Debug, PartialEq, Eq)]
struct CgiHead {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Reads the backend's header block; returns it with stdout and the body bytes that came
/// along in the same reads.
async fn read_cgi_head(
    mut stdout: ChildStdout,
) -> Result<(CgiHead, (ChildStdout, Bytes)), CgiError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((head, len)) = parse_cgi_head(&buf).map_err(CgiError::BadHead)? {
            let rest = Bytes::copy_from_slice(buf.get(len..).unwrap_or_default());
            return Ok((head, (stdout, rest)));
        }
        if buf.len() >= MAX_CGI_HEAD {
            return Err(CgiError::BadHead(format!(
                "no end of headers within {MAX_CGI_HEAD} bytes"
            )));
        }
        let n = stdout.read(&mut chunk).await.map_err(CgiError::Read)?;
        if n == 0 {
            return Err(CgiError::BadHead(format!(
                "output ended after {} bytes, before the end of headers",
                buf.len()
            )));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// Parses a CGI header block from the start of `buf`: `Ok(None)` when the blank line that
/// ends it has not arrived yet. Lines may end in `\r\n` or `\n`.
fn parse_cgi_head(buf: &[u8]) -> Result<Option<(CgiHead, usize)>, String> {
    let mut status = None;
    let mut headers = Vec::new();
    let mut pos = 0;
    loop {
        let Some(nl) = buf
            .get(pos..)
            .and_then(|b| b.iter().position(|&c| c == b'\n'))
        else {
            return Ok(None);
        };
        let line = buf.get(pos..pos + nl).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += nl + 1;
        if line.is_empty() {
            break;
        }
        let text = std::str::from_utf8(line).map_err(|_| {
            format!(
                "header line {:?} is not UTF-8",
                String::from_utf8_lossy(line)
            )
        })?;
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| format!("header line {text:?} has no colon"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            let code = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("status {value:?} has no valid code"))?;
            status = Some(code);
            continue;
        }
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("header name {name:?} is invalid"))?;
        // Framing is hyper's business, not the backend's.
        if name == hyper::header::CONNECTION || name == hyper::header::TRANSFER_ENCODING {
            continue;
        }
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("header {name} has an invalid value {value:?}"))?;
        headers.push((name, value));
    }
    let status = status.unwrap_or_else(|| {
        if headers.iter().any(|(n, _)| n == hyper::header::LOCATION) {
            StatusCode::FOUND
        } else {
            StatusCode::OK
        }
    });
    Ok(Some((CgiHead { status, headers }, pos)))
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let body = Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{CertificateCheckStatus, FetchOptions, RemoteCallbacks, Repository, Signature};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    /// A bare repository `demo.git` under a fresh root, with one commit on `main` holding
    /// `README` = `hello`.
    fn fixture() -> (tempfile::TempDir, git2::Oid) {
        let root = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(root.path().join("demo.git")).unwrap();
        let blob = repo.blob(b"hello\n").unwrap();
        let mut tree = repo.treebuilder(None).unwrap();
        tree.insert("README", blob, 0o100644).unwrap();
        let tree = repo.find_tree(tree.write().unwrap()).unwrap();
        let sig = Signature::new("Test", "test@example.test", &git2::Time::new(0, 0)).unwrap();
        let commit = repo
            .commit(Some("refs/heads/main"), &sig, &sig, "first", &tree, &[])
            .unwrap();
        repo.set_head("refs/heads/main").unwrap();
        (root, commit)
    }

    /// Fetches `main` from `url` into a fresh bare repository and returns the fetched commit.
    fn fetch_main(url: &str, ca_der: Option<Vec<u8>>) -> Result<git2::Oid, git2::Error> {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        let mut callbacks = RemoteCallbacks::new();
        if let Some(ca) = ca_der {
            callbacks.certificate_check(move |cert, host| {
                let Some(x509) = cert.as_x509() else {
                    return Ok(CertificateCheckStatus::CertificatePassthrough);
                };
                verify_against_ca(&ca, x509.data(), host)
                    .map(|()| CertificateCheckStatus::CertificateOk)
                    .map_err(|why| git2::Error::from_str(&format!("certificate rejected: {why}")))
            });
        }
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks);
        let mut remote = repo.remote_anonymous(url)?;
        remote.fetch(
            &["+refs/heads/main:refs/heads/main"],
            Some(&mut options),
            None,
        )?;
        let oid = repo.refname_to_id("refs/heads/main")?;
        Ok(oid)
    }

    /// Verifies a leaf certificate (DER) for `host` against one CA with rustls's webpki
    /// verifier.
    fn verify_against_ca(ca_der: &[u8], leaf_der: &[u8], host: &str) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(
                &CertificateDer::from(leaf_der.to_vec()),
                &[],
                &name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A CA and a `localhost` server certificate it signed: (CA DER, server TLS material).
    fn localhost_pki() -> (Vec<u8>, GitTls) {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gitserve test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let tls = GitTls {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        };
        (ca.der().to_vec(), tls)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn clone_over_http_gets_the_commit() {
        let (root, commit) = fixture();
        let server = GitServer::start(root.path().to_owned(), None)
            .await
            .unwrap();
        let url = server.url("demo.git");
        assert_eq!(
            url,
            format!("http://127.0.0.1:{}/demo.git", server.addr().port())
        );
        let cloned = tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::clone(&url, dir.path()).unwrap();
            let head = repo.head().unwrap().peel_to_commit().unwrap().id();
            let readme = std::fs::read_to_string(dir.path().join("README")).unwrap();
            (head, readme)
        })
        .await
        .unwrap();
        assert_eq!(cloned, (commit, "hello\n".to_owned()));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fetch_over_https_verifies_the_server_against_the_ca() {
        let (root, commit) = fixture();
        let (ca, tls) = localhost_pki();
        let server = GitServer::start(root.path().to_owned(), Some(tls))
            .await
            .unwrap();
        let url = server.url("demo.git");
        assert_eq!(
            url,
            format!("https://localhost:{}/demo.git", server.addr().port())
        );
        let fetched = tokio::task::spawn_blocking(move || fetch_main(&url, Some(ca)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fetched, commit);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fetch_over_https_refuses_a_server_from_another_ca() {
        let (root, _) = fixture();
        let (_, tls) = localhost_pki();
        let (other_ca, _) = localhost_pki();
        let server = GitServer::start(root.path().to_owned(), Some(tls))
            .await
            .unwrap();
        let url = server.url("demo.git");
        let err = tokio::task::spawn_blocking(move || fetch_main(&url, Some(other_ca)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.message().contains("certificate rejected"), "{err}");
    }

    /// Sends a raw HTTP/1.1 request (which must ask for `Connection: close`) and returns the
    /// status code and the body bytes, de-chunked.
    async fn raw_request(addr: SocketAddr, request: &[u8]) -> (u16, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(out[..end].to_vec()).unwrap();
        let status = head[9..12].parse().unwrap();
        let mut body = out[end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("\r\ntransfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, body)
    }

    fn dechunk(mut raw: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let nl = raw.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&raw[..nl]).unwrap(), 16).unwrap();
            if size == 0 {
                return body;
            }
            body.extend_from_slice(&raw[nl + 2..nl + 2 + size]);
            raw = &raw[nl + 2 + size + 2..];
        }
    }

    #[tokio::test]
    async fn chunked_upload_pack_request_is_streamed_to_the_backend() {
        let (root, commit) = fixture();
        let server = GitServer::start(root.path().to_owned(), None)
            .await
            .unwrap();
        // A protocol v0 stateless upload-pack request: want <commit>, flush, done.
        let want = format!("want {commit}\n");
        let pkt = format!("{:04x}{want}00000009done\n", want.len() + 4);
        let mut chunked = Vec::new();
        for part in pkt.as_bytes().chunks(7) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let mut request = b"POST /demo.git/git-upload-pack HTTP/1.1\r\nHost: x\r\n\
            Content-Type: application/x-git-upload-pack-request\r\n\
            Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
        request.extend_from_slice(&chunked);
        let (status, body) = raw_request(server.addr(), &request).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(
            body.starts_with(b"0008NAK\n"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            body.windows(4).any(|w| w == b"PACK"),
            "no pack in the answer"
        );
    }

    #[tokio::test]
    async fn missing_repository_is_404_and_stop_closes_the_port() {
        let (root, _) = fixture();
        let server = GitServer::start(root.path().to_owned(), None)
            .await
            .unwrap();
        let addr = server.addr();
        let (status, _) = raw_request(
            addr,
            b"GET /nope.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 404);
        let (status, body) = raw_request(
            addr,
            b"GET /demo.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert!(body.starts_with(b"001e# service=git-upload-pack\n"));
        drop(server);
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(refused.is_ok(), "port {addr} still accepts after drop");
    }

    #[tokio::test]
    async fn start_refuses_a_missing_root_and_bad_tls() {
        let err = GitServer::start(PathBuf::from("/nonexistent/gitserve-root"), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "git server root /nonexistent/gitserve-root is not a directory"
        );
        let root = tempfile::tempdir().unwrap();
        let bad = GitTls {
            cert_pem: "not a pem".into(),
            key_pem: String::new(),
        };
        let err = GitServer::start(root.path().to_owned(), Some(bad))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("git server tls certificate is unusable"),
            "{err}"
        );
    }

    #[test]
    fn cgi_head_parses_status_and_headers() {
        let input: &[u8] = b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\
            Expires: Fri, 01 Jan 1980 00:00:00 GMT\r\n\r\nbody";
        let (head, len) = parse_cgi_head(input).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::NOT_FOUND);
        assert_eq!(head.headers.len(), 2);
        assert_eq!(head.headers[0].0, hyper::header::CONTENT_TYPE);
        assert_eq!(head.headers[0].1, "text/plain");
        assert_eq!(&input[len..], b"body");

        let (head, len) = parse_cgi_head(b"Content-Type: x\n\nrest").unwrap().unwrap();
        assert_eq!((head.status, len), (StatusCode::OK, 17));
        let (head, _) = parse_cgi_head(b"Location: /x\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.status, StatusCode::FOUND);

        assert_eq!(parse_cgi_head(b"Content-Type: x\r\n").unwrap(), None);
        assert_eq!(parse_cgi_head(b"").unwrap(), None);
        let err = parse_cgi_head(b"no colon here\r\n\r\n").unwrap_err();
        assert!(err.contains("\"no colon here\" has no colon"), "{err}");
        let err = parse_cgi_head(b"Status: abc\r\n\r\n").unwrap_err();
        assert!(err.contains("status \"abc\" has no valid code"), "{err}");
    }

    #[test]
    fn tls_debug_redacts_the_key() {
        let tls = GitTls {
            cert_pem: "CERT".into(),
            key_pem: "SECRET".into(),
        };
        let shown = format!("{tls:?}");
        assert!(
            shown.contains("CERT") && !shown.contains("SECRET"),
            "{shown}"
        );
    }
}
