//! The build step: one `docker build` through bollard against the node's own Docker Engine,
//! from a tar context that streams in while it is being made (no temp file), on the host
//! network, with the proxy passed only as build args of this build, the image stamped with the
//! source labels, and the target's own image cache reused. Every decision is logged as the
//! seed's `key=value` line and every line of the daemon's output is logged as it arrives.
//!
//! It owns the context seam ([`context_channel`]: a blocking [`ChannelWriter`] for the tar
//! producer, a [`ContextBody`] stream for the request) and the build-proxy probe. It must not
//! shell out to `docker`, write daemon, shell or Docker CLI configuration, or fall back to
//! direct network access when a proxy was asked for.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::BuildImageOptions;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::steplog::StepLog;

/// Label naming the service an image was built for.
pub const LABEL_SERVICE_ID: &str = "unidesk.ai/service-id";
/// Label naming the repository an image was built from.
pub const LABEL_SOURCE_REPO: &str = "unidesk.ai/source-repo";
/// Label naming the full commit an image was built from; verification reads it back.
pub const LABEL_SOURCE_COMMIT: &str = "unidesk.ai/source-commit";
/// Label naming the Dockerfile (path within the context) an image was built from.
pub const LABEL_DOCKERFILE: &str = "unidesk.ai/dockerfile";
/// OCI label for the source revision.
pub const LABEL_OCI_REVISION: &str = "org.opencontainers.image.revision";
/// OCI label for the source repository.
pub const LABEL_OCI_SOURCE: &str = "org.opencontainers.image.source";

/// Build arg carrying the full commit into the Dockerfile (`ARG UNIDESK_DEPLOY_COMMIT`).
pub const ARG_DEPLOY_COMMIT: &str = "UNIDESK_DEPLOY_COMMIT";
/// The build args that carry the proxy into `RUN` steps of this build only.
pub const PROXY_ARGS: [&str; 5] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
];

/// How the seed names the proxy channel in `target_build_proxy=…`.
const PROXY_CHANNEL: &str = "provider-gateway-ws-egress";

/// The size of one context chunk sent to the daemon.
pub const CONTEXT_CHUNK_BYTES: usize = 64 * 1024;

/// Where the build-proxy probe connects through the proxy unless told otherwise.
pub const DEFAULT_PROBE_TARGET: &str = "github.com:443";

/// The longest proxy response head the probe reads.
const PROBE_HEAD_LIMIT: usize = 8 * 1024;

/// What to build: data from the launch spec plus the node's proxy setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// The service id (`unidesk.ai/service-id`).
    pub service_id: String,
    /// The repository URL the context came from (`unidesk.ai/source-repo`).
    pub repo_url: String,
    /// The full 40-hex commit the context is the tree of.
    pub commit: String,
    /// The Dockerfile's path within the context.
    pub dockerfile: String,
    /// The image to tag, `name:tag`; also the cache source when it exists already.
    pub image: String,
    /// The node-local egress proxy (`http://127.0.0.1:18789`), or `None` for a direct build.
    pub proxy: Option<String>,
    /// A warm build-base argument the Dockerfile exposes, if any.
    pub build_base: Option<BuildBase>,
    /// How long the build may take, context upload included.
    pub timeout: Duration,
}

/// A Dockerfile argument naming a base image, and the local images that may fill it, best
/// first (normally `<image>-build-base`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildBase {
    /// The `ARG` name, e.g. `CODE_QUEUE_BASE_IMAGE`.
    pub arg: String,
    /// Candidate images; the first that exists locally is used.
    pub candidates: Vec<String>,
}

/// What a successful build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// The tag that was built.
    pub image: String,
    /// The image id (`sha256:…`) the tag points at after the build.
    pub image_id: String,
}

/// Why a build or the build-proxy probe failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The daemon reported an error in the build output (a failing `RUN`, a missing file …).
    #[error("docker build of {image} failed: {message}")]
    Daemon { image: String, message: String },
    /// A Docker API call failed (daemon unreachable, context stream broken, image missing …).
    #[error("docker {action} for image {image} failed")]
    Docker {
        action: &'static str,
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The build ran past its deadline; the request was dropped.
    #[error("docker build of {image} did not finish within {timeout:?}")]
    Timeout { image: String, timeout: Duration },
    /// The launch was cancelled; the request was dropped.
    #[error("docker build of {image} was cancelled")]
    Cancelled { image: String },
    /// The build finished but the image it should have tagged has no id.
    #[error("docker build of {image} finished but the daemon reports no image id for it")]
    NoImageId { image: String },
    /// The proxy setting is not an `http://host:port` URL.
    #[error("build proxy {proxy:?} is not an http://host:port url: {reason}")]
    InvalidProxy { proxy: String, reason: &'static str },
    /// The probe through the proxy failed; the build must not fall back to direct access.
    #[error("build proxy probe through {proxy} to {target} failed: {reason}")]
    ProxyProbe {
        proxy: String,
        target: String,
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// The context seam.

/// Makes the seam between a blocking tar producer and the build request: the producer writes
/// into the [`ChannelWriter`] (from blocking code, e.g. `spawn_blocking`), the build sends the
/// [`ContextBody`]. At most `capacity` chunks of [`CONTEXT_CHUNK_BYTES`] are in flight, so
/// memory stays bounded whatever the context size; a slow daemon slows the producer.
pub fn context_channel(capacity: usize) -> (ChannelWriter, ContextBody) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let finished = Arc::new(AtomicBool::new(false));
    (
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CONTEXT_CHUNK_BYTES),
            finished: finished.clone(),
        },
        ContextBody {
            rx,
            finished,
            ended: false,
        },
    )
}

/// The blocking end of [`context_channel`]: a [`std::io::Write`] for the tar producer.
///
/// Call [`ChannelWriter::finish`] after the tar is complete. A writer dropped without it (the
/// producer failed) makes the body end with an error, so the daemon never builds from a cut
/// context. It blocks the calling thread while the channel is full: use it from blocking code
/// only (calling `write` from inside an async task panics).
#[derive(Debug)]
pub struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    finished: Arc<AtomicBool>,
}

impl ChannelWriter {
    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CONTEXT_CHUNK_BYTES),
        ));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "build context receiver closed: the build stopped reading the context",
            )
        })
    }

    /// Sends what is buffered and marks the context complete.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.finished.store(true, Ordering::Release);
        Ok(())
    }

    /// Ends the context with an error the build reports (the producer hit `reason`).
    pub fn abort(self, reason: io::Error) {
        // A closed receiver already stopped the build; nothing else to tell it.
        let _ = self.tx.blocking_send(Err(reason));
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CONTEXT_CHUNK_BYTES - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CONTEXT_CHUNK_BYTES {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// The async end of [`context_channel`]: the build context as a byte stream.
#[derive(Debug)]
pub struct ContextBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    finished: Arc<AtomicBool>,
    ended: bool,
}

impl Stream for ContextBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.is_err() {
                    self.ended = true;
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                self.ended = true;
                if self.finished.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "build context producer stopped before the tar was finished",
                    ))))
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions (pure).

/// What the node has locally that the build settings depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalImages {
    /// Whether `req.image` exists already (the cache source).
    current_exists: bool,
    /// The first build-base candidate that exists.
    build_base: Option<String>,
}

/// The build's args, labels, cache source and the decision lines to log, from the request and
/// what exists locally.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BuildSettings {
    build_args: HashMap<String, String>,
    labels: HashMap<String, String>,
    cache_from: Vec<String>,
    decisions: Vec<(&'static str, String)>,
}

fn settings(req: &BuildRequest, local: &LocalImages) -> BuildSettings {
    let mut build_args = HashMap::new();
    let mut decisions = Vec::new();
    build_args.insert(ARG_DEPLOY_COMMIT.to_owned(), req.commit.clone());
    // Inline cache metadata: the legacy builder ignores it, BuildKit writes it into the image.
    build_args.insert("BUILDKIT_INLINE_CACHE".to_owned(), "1".to_owned());
    match &req.proxy {
        Some(proxy) => {
            for key in PROXY_ARGS {
                build_args.insert(key.to_owned(), proxy.clone());
            }
            decisions.push(("target_build_proxy", format!("{PROXY_CHANNEL}:{proxy}")));
        }
        None => decisions.push(("target_build_proxy", "direct".to_owned())),
    }
    let cache_from = if local.current_exists {
        decisions.push(("target_build_cache_from", req.image.clone()));
        vec![req.image.clone()]
    } else {
        decisions.push(("target_build_cache_from", "none".to_owned()));
        Vec::new()
    };
    decisions.push(("target_build_cache_to", "inline".to_owned()));
    match (&req.build_base, &local.build_base) {
        (Some(base), Some(image)) => {
            build_args.insert(base.arg.clone(), image.clone());
            decisions.push(("target_build_base_image", image.clone()));
        }
        _ => decisions.push(("target_build_base_image", "none".to_owned())),
    }
    let labels = HashMap::from([
        (LABEL_SERVICE_ID.to_owned(), req.service_id.clone()),
        (LABEL_SOURCE_REPO.to_owned(), req.repo_url.clone()),
        (LABEL_SOURCE_COMMIT.to_owned(), req.commit.clone()),
        (LABEL_DOCKERFILE.to_owned(), req.dockerfile.clone()),
        (LABEL_OCI_REVISION.to_owned(), req.commit.clone()),
        (LABEL_OCI_SOURCE.to_owned(), req.repo_url.clone()),
    ]);
    BuildSettings {
        build_args,
        labels,
        cache_from,
        decisions,
    }
}

/// Splits the daemon's `stream` text into lines; a line longer than the step log keeps is
/// emitted in pieces, so the buffer stays bounded.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: String,
}

impl LineSplitter {
    fn push(&mut self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for piece in text.split_inclusive(['\n', '\r']) {
            self.pending.push_str(piece);
            if piece.ends_with(['\n', '\r']) {
                let line = std::mem::take(&mut self.pending);
                let line = line.trim_end_matches(['\n', '\r']);
                if !line.is_empty() {
                    out.push(line.to_owned());
                }
            } else if self.pending.len() >= super::steplog::MAX_LINE_BYTES {
                out.push(std::mem::take(&mut self.pending));
            }
        }
        out
    }

    fn finish(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.pending);
        (!line.is_empty()).then_some(line)
    }
}

// ---------------------------------------------------------------------------------------------
// The Docker edge.

fn is_not_found(err: &bollard::errors::Error) -> bool {
    matches!(
        err,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Whether `image` exists in the local image store.
async fn image_exists(docker: &Docker, image: &str) -> Result<bool, BuildError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(err) if is_not_found(&err) => Ok(false),
        Err(source) => Err(BuildError::Docker {
            action: "image inspect",
            image: image.to_owned(),
            source,
        }),
    }
}

/// Builds `req.image` from `context` (a tar) on the host network and returns its id.
///
/// Logs the proxy, cache and build-base decisions, then every line of the daemon's output as it
/// arrives. Does not probe the proxy: the executor calls [`probe_proxy`] first. On
/// timeout or cancellation the request is dropped, which makes the daemon stop the build.
#[tracing::instrument(skip_all, fields(image = %req.image, service = %req.service_id))]
pub async fn build(
    docker: &Docker,
    req: &BuildRequest,
    context: impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
    log: &StepLog,
    cancel: &CancellationToken,
) -> Result<BuildOutput, BuildError> {
    let deadline = Instant::now() + req.timeout;
    let current_exists = image_exists(docker, &req.image).await?;
    let mut build_base = None;
    if let Some(base) = &req.build_base {
        for candidate in &base.candidates {
            if image_exists(docker, candidate).await? {
                build_base = Some(candidate.clone());
                break;
            }
        }
    }
    let settings = settings(
        req,
        &LocalImages {
            current_exists,
            build_base,
        },
    );
    for (key, value) in &settings.decisions {
        log.decision(key, value).await;
    }

    let options = BuildImageOptions {
        dockerfile: req.dockerfile.clone(),
        t: Some(req.image.clone()),
        cachefrom: (!settings.cache_from.is_empty()).then(|| settings.cache_from.clone()),
        buildargs: Some(settings.build_args.clone()),
        labels: Some(settings.labels.clone()),
        networkmode: Some("host".to_owned()),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(bollard::body_try_stream(context)));
    let mut lines = LineSplitter::default();
    let mut reported_id = None;
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => {
                log.line("build cancelled; stopping the build request").await;
                return Err(BuildError::Cancelled { image: req.image.clone() });
            }
            _ = tokio::time::sleep_until(deadline) => {
                log.line(format!("build did not finish within {:?}; stopping it", req.timeout))
                    .await;
                return Err(BuildError::Timeout { image: req.image.clone(), timeout: req.timeout });
            }
            item = stream.next() => item,
        };
        let info = match item {
            None => break,
            Some(Ok(info)) => info,
            Some(Err(bollard::errors::Error::DockerStreamError { error })) => {
                if let Some(rest) = lines.finish() {
                    log.line(rest).await;
                }
                log.line(format!("error: {error}")).await;
                return Err(BuildError::Daemon {
                    image: req.image.clone(),
                    message: error,
                });
            }
            Some(Err(source)) => {
                return Err(BuildError::Docker {
                    action: "build",
                    image: req.image.clone(),
                    source,
                });
            }
        };
        if let Some(text) = &info.stream {
            for line in lines.push(text) {
                log.line(line).await;
            }
        }
        if let Some(status) = &info.status {
            match &info.id {
                Some(id) => log.line(format!("{id}: {status}")).await,
                None => log.line(status.clone()).await,
            }
        }
        if let Some(id) = info.aux.as_ref().and_then(|aux| aux.id.clone()) {
            reported_id = Some(id);
        }
    }
    if let Some(rest) = lines.finish() {
        log.line(rest).await;
    }

    // The tag is what the deploy runs; read its id back rather than trusting the stream alone.
    let inspected =
        docker
            .inspect_image(&req.image)
            .await
            .map_err(|source| BuildError::Docker {
                action: "image inspect",
                image: req.image.clone(),
                source,
            })?;
    let image_id = inspected
        .id
        .or(reported_id)
        .ok_or_else(|| BuildError::NoImageId {
            image: req.image.clone(),
        })?;
    tracing::info!(image_id = %image_id, "built");
    log.line(format!("built {} as {image_id}", req.image)).await;
    Ok(BuildOutput {
        image: req.image.clone(),
        image_id,
    })
}

// ---------------------------------------------------------------------------------------------
// The build-proxy probe.

/// `host` and `port` of an `http://host[:port][/]` proxy URL.
fn proxy_authority(proxy: &str) -> Result<(String, u16), &'static str> {
    let rest = proxy
        .strip_prefix("http://")
        .ok_or("the scheme must be http://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("only http://host:port is accepted (no path or query)");
    }
    parse_authority(authority)
}

/// `host` and `port` (80 when absent) of an HTTP authority `host[:port]` or `[v6][:port]`;
/// credentials are refused.
pub(crate) fn parse_authority(authority: &str) -> Result<(String, u16), &'static str> {
    if authority.contains('@') {
        return Err("credentials in the url are not accepted");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 host lacks its ']'")?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err("junk after the IPv6 host"),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing");
    }
    let port = match port {
        Some(port) => port
            .parse::<u16>()
            .map_err(|_| "the port is not a number 0-65535")?,
        None => 80,
    };
    Ok((host.to_owned(), port))
}

/// Checks that `proxy` tunnels to `target` (`host:port`, normally [`DEFAULT_PROBE_TARGET`]) with
/// one HTTP `CONNECT`, within `timeout`. Logs `target_build_proxy_probe=ok`, or
/// `target_build_proxy_probe=failed` and returns the cause; the caller must then not build
/// (there is no fallback to direct access).
#[tracing::instrument(skip(log))]
pub async fn probe_proxy(
    proxy: &str,
    target: &str,
    timeout: Duration,
    log: &StepLog,
    key: &str,
) -> Result<(), BuildError> {
    let result = match tokio::time::timeout(timeout, connect_probe(proxy, target)).await {
        Ok(result) => result,
        Err(_) => Err(BuildError::ProxyProbe {
            proxy: proxy.to_owned(),
            target: target.to_owned(),
            reason: format!("no answer within {timeout:?}"),
        }),
    };
    match &result {
        Ok(()) => log.decision(key, "ok").await,
        Err(err) => {
            log.decision(key, "failed").await;
            log.line(err.to_string()).await;
        }
    }
    result
}

async fn connect_probe(proxy: &str, target: &str) -> Result<(), BuildError> {
    let fail = |reason: String| BuildError::ProxyProbe {
        proxy: proxy.to_owned(),
        target: target.to_owned(),
        reason,
    };
    let (host, port) = proxy_authority(proxy).map_err(|reason| BuildError::InvalidProxy {
        proxy: proxy.to_owned(),
        reason,
    })?;
    let mut stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|err| fail(format!("connecting to the proxy: {err}")))?;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| fail(format!("sending CONNECT: {err}")))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|err| fail(format!("reading the proxy's answer: {err}")))?;
        if n == 0 {
            return Err(fail(
                "the proxy closed the connection without an answer".to_owned(),
            ));
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(head_len)) => {
                let code = response.code.unwrap_or(0);
                if (200..300).contains(&code) {
                    return Ok(());
                }
                let reason = response.reason.unwrap_or("").to_owned();
                // The proxy explains a refusal in the body (which rule, which target): keep it.
                let mut body = head[head_len..].to_vec();
                while body.len() < PROBE_HEAD_LIMIT {
                    match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                }
                let body = String::from_utf8_lossy(&body).trim().to_owned();
                let detail = if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                };
                return Err(fail(format!("the proxy answered {code} {reason}{detail}")));
            }
            Ok(httparse::Status::Partial) if head.len() < PROBE_HEAD_LIMIT => continue,
            Ok(httparse::Status::Partial) => {
                return Err(fail(format!(
                    "the proxy's answer head is longer than {PROBE_HEAD_LIMIT} bytes"
                )));
            }
            Err(err) => return Err(fail(format!("the proxy's answer is not HTTP: {err}"))),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Real-Docker helpers shared by the launch tests: a daemon handle that fails with the fix,
    //! unique names, tar contexts, free loopback ports and cleanup that also runs on panic.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use bollard::Docker;
    use bollard::query_parameters::{RemoveContainerOptions, RemoveImageOptions};

    /// The local Docker Engine, or a panic saying how to start it.
    pub(crate) async fn docker() -> Docker {
        let hint = "run `bash scripts/testbed-up` to start Docker and make local/busybox:latest";
        let docker = Docker::connect_with_local_defaults()
            .unwrap_or_else(|e| panic!("Docker Engine is not reachable ({e}); {hint}"));
        let docker = docker
            .negotiate_version()
            .await
            .unwrap_or_else(|e| panic!("Docker Engine is not reachable ({e}); {hint}"));
        docker
            .inspect_image("local/busybox:latest")
            .await
            .unwrap_or_else(|e| panic!("image local/busybox:latest is missing ({e}); {hint}"));
        docker
    }

    /// A name unique to this process and call.
    pub(crate) fn unique(what: &str) -> String {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        format!(
            "unidesk-test-{what}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A tar holding `files` (path, contents).
    pub(crate) fn tar_context(files: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, body) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, path, body.as_bytes())
                .unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// A context stream of one chunk.
    pub(crate) fn body(
        tar: Vec<u8>,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
        futures::stream::once(async move { Ok(bytes::Bytes::from(tar)) })
    }

    /// A loopback port that was free a moment ago.
    pub(crate) fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// The Dockerfile of the test service: health file with the commit, httpd on `port`.
    pub(crate) fn web_dockerfile(port: u16) -> String {
        format!(
            "FROM local/busybox:latest\n\
             ARG UNIDESK_DEPLOY_COMMIT\n\
             RUN mkdir -p /www && echo \"{{\\\"deploy\\\":{{\\\"commit\\\":\\\"$UNIDESK_DEPLOY_COMMIT\\\"}}}}\" > /www/health\n\
             CMD [\"busybox\", \"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"/www\"]\n"
        )
    }

    /// Containers and images removed when dropped, also after a failed assertion.
    #[derive(Default)]
    pub(crate) struct Cleanup {
        pub(crate) containers: Vec<String>,
        pub(crate) images: Vec<String>,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let containers = std::mem::take(&mut self.containers);
            let images = std::mem::take(&mut self.images);
            // Drop cannot await, and may run inside the test's runtime: use a thread of its own.
            let done = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let Ok(docker) = Docker::connect_with_local_defaults() else {
                        return;
                    };
                    let Ok(docker) = docker.negotiate_version().await else {
                        return;
                    };
                    for c in containers {
                        let opts = RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        };
                        let _ = docker.remove_container(&c, Some(opts)).await;
                    }
                    for i in images {
                        let opts = RemoveImageOptions {
                            force: true,
                            ..Default::default()
                        };
                        let _ = docker.remove_image(&i, Some(opts), None).await;
                    }
                });
            });
            let _ = done.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use unidesk_protocol::Step;

    use super::test_support::*;
    use super::*;
    use crate::launch::steplog::StepLine;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn request(image: &str) -> BuildRequest {
        BuildRequest {
            service_id: "web".to_owned(),
            repo_url: "http://127.0.0.1:1/web.git".to_owned(),
            commit: COMMIT.to_owned(),
            dockerfile: "Dockerfile".to_owned(),
            image: image.to_owned(),
            proxy: None,
            build_base: None,
            timeout: Duration::from_secs(120),
        }
    }

    /// Collects every line until the log's senders are gone.
    fn collect(mut rx: mpsc::Receiver<StepLine>) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(line) = rx.recv().await {
                lines.push(line.line);
            }
            lines
        })
    }

    #[test]
    fn settings_direct_without_local_images() {
        let req = request("web:t");
        let s = settings(
            &req,
            &LocalImages {
                current_exists: false,
                build_base: None,
            },
        );
        assert_eq!(
            s.decisions,
            vec![
                ("target_build_proxy", "direct".to_owned()),
                ("target_build_cache_from", "none".to_owned()),
                ("target_build_cache_to", "inline".to_owned()),
                ("target_build_base_image", "none".to_owned()),
            ]
        );
        assert!(s.cache_from.is_empty());
        assert_eq!(s.build_args[ARG_DEPLOY_COMMIT], COMMIT);
        assert_eq!(s.build_args["BUILDKIT_INLINE_CACHE"], "1");
        assert!(PROXY_ARGS.iter().all(|k| !s.build_args.contains_key(*k)));
        assert_eq!(s.labels[LABEL_SOURCE_COMMIT], COMMIT);
        assert_eq!(s.labels[LABEL_OCI_REVISION], COMMIT);
        assert_eq!(s.labels[LABEL_OCI_SOURCE], req.repo_url);
        assert_eq!(s.labels.len(), 6);
    }

    #[test]
    fn settings_with_proxy_cache_and_build_base() {
        let mut req = request("web:t");
        req.proxy = Some("http://127.0.0.1:18789".to_owned());
        req.build_base = Some(BuildBase {
            arg: "BASE".to_owned(),
            candidates: vec!["web:t-build-base".to_owned()],
        });
        let s = settings(
            &req,
            &LocalImages {
                current_exists: true,
                build_base: Some("web:t-build-base".to_owned()),
            },
        );
        assert!(s.decisions.contains(&(
            "target_build_proxy",
            "provider-gateway-ws-egress:http://127.0.0.1:18789".to_owned()
        )));
        assert!(
            s.decisions
                .contains(&("target_build_cache_from", "web:t".to_owned()))
        );
        assert!(
            s.decisions
                .contains(&("target_build_base_image", "web:t-build-base".to_owned()))
        );
        assert_eq!(s.cache_from, vec!["web:t".to_owned()]);
        assert_eq!(s.build_args["BASE"], "web:t-build-base");
        for key in PROXY_ARGS {
            assert_eq!(s.build_args[key], "http://127.0.0.1:18789");
        }
    }

    #[test]
    fn line_splitter_joins_pieces_and_bounds_lines() {
        let mut s = LineSplitter::default();
        assert_eq!(
            s.push("Step 1/2 : FROM x\n ---> ab"),
            vec!["Step 1/2 : FROM x"]
        );
        assert_eq!(s.push("c\n\nnext"), vec![" ---> abc"]);
        assert_eq!(s.finish().as_deref(), Some("next"));
        assert_eq!(s.finish(), None);
        let long = "x".repeat(super::super::steplog::MAX_LINE_BYTES + 10);
        let out = s.push(&long);
        assert_eq!(out.len(), 1);
        assert!(s.pending.len() < super::super::steplog::MAX_LINE_BYTES);
    }

    #[test]
    fn proxy_authority_accepts_only_http_host_port() {
        assert_eq!(
            proxy_authority("http://127.0.0.1:18789"),
            Ok(("127.0.0.1".to_owned(), 18789))
        );
        assert_eq!(
            proxy_authority("http://127.0.0.1:18789/"),
            Ok(("127.0.0.1".to_owned(), 18789))
        );
        assert_eq!(proxy_authority("http://[::1]:8"), Ok(("::1".to_owned(), 8)));
        assert_eq!(
            proxy_authority("http://proxy"),
            Ok(("proxy".to_owned(), 80))
        );
        assert!(proxy_authority("https://127.0.0.1:1").is_err());
        assert!(proxy_authority("http://u:p@127.0.0.1:1").is_err());
        assert!(proxy_authority("http://127.0.0.1:1/x").is_err());
        assert!(proxy_authority("http://127.0.0.1:99999").is_err());
        assert!(proxy_authority("http://").is_err());
    }

    #[tokio::test]
    async fn channel_writer_streams_chunks_and_flags_a_cut_context() {
        let (writer, body) = context_channel(2);
        let producer = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            writer
                .write_all(&vec![7u8; CONTEXT_CHUNK_BYTES * 2 + 5])
                .unwrap();
            writer.finish().unwrap();
        });
        let chunks: Vec<_> = body.collect().await;
        producer.await.unwrap();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, vec![CONTEXT_CHUNK_BYTES, CONTEXT_CHUNK_BYTES, 5]);

        let (writer, body) = context_channel(2);
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            writer.write_all(b"partial").unwrap();
            drop(writer); // the producer failed before finishing
        })
        .await
        .unwrap();
        let items: Vec<_> = body.collect().await;
        assert_eq!(
            items.len(),
            1,
            "unflushed bytes are not sent, only the error"
        );
        let err = items[0].as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn build_stamps_labels_logs_decisions_and_streams_lines_as_they_arrive() {
        let docker = docker().await;
        let image = format!("local/{}:v1", unique("build"));
        let mut cleanup = Cleanup::default();
        cleanup.images.push(image.clone());

        // The RUN step prints a marker, then waits for this listener; the listener answers only
        // after the marker came through the step log, so the build finishes only if lines are
        // streamed while it runs.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = format!("http://127.0.0.1:{port}");
        let dockerfile = format!(
            "FROM local/busybox:latest\n\
             ARG UNIDESK_DEPLOY_COMMIT\n\
             RUN echo early-marker proxy=$HTTPS_PROXY && wget -q -O /go http://127.0.0.1:{port}/go && cat /go && echo $UNIDESK_DEPLOY_COMMIT > /commit\n"
        );
        let context = tar_context(&[("Dockerfile", &dockerfile)]);
        let mut req = request(&image);
        req.proxy = Some(proxy.clone());

        let (log, mut rx) = StepLog::channel(Step::Build, 8);
        let build_task = {
            let docker = docker.clone();
            let req = req.clone();
            tokio::spawn(async move {
                build(
                    &docker,
                    &req,
                    body(context),
                    &log,
                    &CancellationToken::new(),
                )
                .await
            })
        };
        let mut lines = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("no build output within 60s")
                .expect("log closed before the marker arrived");
            lines.push(line.line.clone());
            if line.line.starts_with("early-marker") {
                break;
            }
        }
        assert!(!build_task.is_finished());
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut req_head = [0u8; 1024];
        let _ = conn.read(&mut req_head).await.unwrap();
        conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\ngo-signal\n")
            .await
            .unwrap();
        drop(conn);
        let rest = collect(rx);
        let out = build_task.await.unwrap().unwrap();
        lines.extend(rest.await.unwrap());

        assert!(
            lines.contains(&"target_build_cache_from=none".to_owned()),
            "{lines:#?}"
        );
        assert!(lines.contains(&"target_build_cache_to=inline".to_owned()));
        assert!(lines.contains(&"target_build_base_image=none".to_owned()));
        assert!(lines.contains(&format!(
            "target_build_proxy=provider-gateway-ws-egress:{proxy}"
        )));
        assert!(
            lines.contains(&format!("early-marker proxy={proxy}")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("Step 1/9 : FROM local/busybox:latest")),
            "{lines:#?}"
        );
        assert!(lines.iter().any(|l| l == "go-signal"), "{lines:#?}");

        let inspected = docker.inspect_image(&image).await.unwrap();
        assert_eq!(inspected.id.as_deref(), Some(out.image_id.as_str()));
        let config = inspected.config.unwrap();
        let labels = config.labels.unwrap();
        assert_eq!(labels[LABEL_SERVICE_ID], "web");
        assert_eq!(labels[LABEL_SOURCE_REPO], req.repo_url);
        assert_eq!(labels[LABEL_SOURCE_COMMIT], COMMIT);
        assert_eq!(labels[LABEL_DOCKERFILE], "Dockerfile");
        assert_eq!(labels[LABEL_OCI_REVISION], COMMIT);
        assert_eq!(labels[LABEL_OCI_SOURCE], req.repo_url);
        // The proxy reached RUN as a build arg only; it is not baked into the image.
        let env = config.env.unwrap_or_default();
        assert!(
            env.iter()
                .all(|e| !e.to_ascii_uppercase().contains("PROXY")),
            "{env:?}"
        );

        // A rebuild reuses the image it replaces as its cache source.
        let (log, rx) = StepLog::channel(Step::Build, 8);
        let rest = collect(rx);
        let context = tar_context(&[("Dockerfile", &dockerfile)]);
        let again = build(
            &docker,
            &request(&image),
            body(context),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        drop(log);
        let lines = rest.await.unwrap();
        assert!(
            lines.contains(&format!("target_build_cache_from={image}")),
            "{lines:#?}"
        );
        assert!(lines.contains(&"target_build_proxy=direct".to_owned()));
        assert_eq!(
            again.image_id, out.image_id,
            "every step came from the cache"
        );
    }

    #[tokio::test]
    async fn build_base_uses_the_first_local_candidate() {
        let docker = docker().await;
        let image = format!("local/{}:v1", unique("base"));
        let mut cleanup = Cleanup::default();
        cleanup.images.push(image.clone());
        let context = tar_context(&[(
            "build/Dockerfile",
            "ARG BASE_IMAGE=scratch\nFROM ${BASE_IMAGE}\nRUN echo base-ok\n",
        )]);
        let mut req = request(&image);
        req.dockerfile = "build/Dockerfile".to_owned();
        req.build_base = Some(BuildBase {
            arg: "BASE_IMAGE".to_owned(),
            candidates: vec![
                format!("{image}-build-base"),
                "local/busybox:latest".to_owned(),
            ],
        });
        let (log, rx) = StepLog::channel(Step::Build, 8);
        let lines = collect(rx);
        build(
            &docker,
            &req,
            body(context),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        drop(log);
        let lines = lines.await.unwrap();
        assert!(
            lines.contains(&"target_build_base_image=local/busybox:latest".to_owned()),
            "{lines:#?}"
        );
        assert!(lines.contains(&"base-ok".to_owned()));
        let labels = docker
            .inspect_image(&image)
            .await
            .unwrap()
            .config
            .unwrap()
            .labels
            .unwrap();
        assert_eq!(labels[LABEL_DOCKERFILE], "build/Dockerfile");
    }

    #[tokio::test]
    async fn failing_run_is_a_daemon_error_with_the_daemons_text() {
        let docker = docker().await;
        let image = format!("local/{}:v1", unique("fail"));
        let mut cleanup = Cleanup::default();
        cleanup.images.push(image.clone());
        let context = tar_context(&[(
            "Dockerfile",
            "FROM local/busybox:latest\nRUN echo about-to-fail && exit 3\n",
        )]);
        let (log, rx) = StepLog::channel(Step::Build, 8);
        let lines = collect(rx);
        let err = build(
            &docker,
            &request(&image),
            body(context),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        drop(log);
        let lines = lines.await.unwrap();
        match &err {
            BuildError::Daemon { image: i, message } => {
                assert_eq!(i, &image);
                assert!(message.contains("returned a non-zero code: 3"), "{message}");
            }
            other => panic!("expected a daemon error, got {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with(&format!("docker build of {image} failed: "))
        );
        assert!(lines.contains(&"about-to-fail".to_owned()), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("error: ")));
    }

    #[tokio::test]
    async fn cut_context_fails_the_build() {
        let docker = docker().await;
        let image = format!("local/{}:v1", unique("cut"));
        let mut cleanup = Cleanup::default();
        cleanup.images.push(image.clone());
        let (writer, context) = context_channel(4);
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let tar = tar_context(&[("Dockerfile", "FROM local/busybox:latest\n")]);
            writer.write_all(&tar[..700]).unwrap();
            writer.abort(io::Error::other("materialize failed"));
        });
        let (log, rx) = StepLog::channel(Step::Build, 8);
        let _lines = collect(rx);
        let err = build(
            &docker,
            &request(&image),
            context,
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                BuildError::Docker {
                    action: "build",
                    ..
                }
            ),
            "{err:?}"
        );
        // The producer's reason travels in the error's source chain.
        assert!(format!("{err:?}").contains("materialize failed"), "{err:?}");
        assert!(!image_exists(&docker, &image).await.unwrap());
    }

    #[tokio::test]
    async fn cancellation_and_timeout_stop_a_hanging_build() {
        let docker = docker().await;
        let image = format!("local/{}:v1", unique("hang"));
        let mut cleanup = Cleanup::default();
        cleanup.images.push(image.clone());
        // A listener that never answers keeps the RUN step waiting.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dockerfile = format!(
            "FROM local/busybox:latest\nRUN echo waiting && wget -q -O- http://127.0.0.1:{port}/\n"
        );

        let (log, mut rx) = StepLog::channel(Step::Build, 8);
        let cancel = CancellationToken::new();
        let task = {
            let (docker, cancel, image) = (docker.clone(), cancel.clone(), image.clone());
            let context = tar_context(&[("Dockerfile", &dockerfile)]);
            tokio::spawn(async move {
                build(&docker, &request(&image), body(context), &log, &cancel).await
            })
        };
        while let Some(line) = rx.recv().await {
            if line.line == "waiting" {
                break;
            }
        }
        cancel.cancel();
        let err = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("cancelled build did not return")
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, BuildError::Cancelled { .. }), "{err:?}");

        let (log, rx) = StepLog::channel(Step::Build, 8);
        let _lines = collect(rx);
        let mut req = request(&image);
        req.timeout = Duration::from_secs(2);
        let context = tar_context(&[("Dockerfile", &dockerfile)]);
        let err = build(
            &docker,
            &req,
            body(context),
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BuildError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("did not finish within 2s"));
        drop(listener);
    }

    /// A one-connection proxy double that answers CONNECT with `answer`.
    async fn connect_answering(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap();
            conn.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (proxy, task)
    }

    #[tokio::test]
    async fn probe_logs_ok_when_the_proxy_connects() {
        let (proxy, seen) = connect_answering("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let (log, rx) = StepLog::channel(Step::Probe, 8);
        let lines = collect(rx);
        probe_proxy(
            &proxy,
            "github.com:443",
            Duration::from_secs(5),
            &log,
            "target_build_proxy_probe",
        )
        .await
        .unwrap();
        drop(log);
        assert_eq!(lines.await.unwrap(), vec!["target_build_proxy_probe=ok"]);
        assert!(
            seen.await
                .unwrap()
                .starts_with("CONNECT github.com:443 HTTP/1.1\r\n")
        );
    }

    #[tokio::test]
    async fn probe_fails_with_the_cause_and_never_falls_back() {
        let (proxy, _seen) = connect_answering("HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let (log, rx) = StepLog::channel(Step::Probe, 8);
        let lines = collect(rx);
        let err = probe_proxy(
            &proxy,
            "github.com:443",
            Duration::from_secs(5),
            &log,
            "target_build_proxy_probe",
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("the proxy answered 403 Forbidden"),
            "{err}"
        );
        assert!(err.to_string().contains(&proxy));

        let closed = format!("http://127.0.0.1:{}", free_port());
        let err = probe_proxy(
            &closed,
            "github.com:443",
            Duration::from_secs(5),
            &log,
            "target_build_proxy_probe",
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("connecting to the proxy"), "{err}");

        let err = probe_proxy(
            "socks5://127.0.0.1:1",
            "x:1",
            Duration::from_secs(1),
            &log,
            "target_build_proxy_probe",
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BuildError::InvalidProxy { .. }), "{err:?}");
        drop(log);
        let lines = lines.await.unwrap();
        assert_eq!(
            lines
                .iter()
                .filter(|l| *l == "target_build_proxy_probe=failed")
                .count(),
            3
        );
    }
}
