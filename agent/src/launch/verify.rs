//! The verify step: a deploy succeeds only when the live service proves the requested commit.
//! [`judge`] is the decision, a pure function of what was expected and what was observed;
//! [`observe`] is the I/O edge that reads the container, its image's labels and the service's
//! health endpoint (a minimal HTTP/1.1 GET over loopback).
//!
//! It must not accept a healthy service at another commit, an image made by `docker commit`
//! or retagged by hand (the running image id must be the one the build produced), or change
//! anything it looks at.

use std::fmt;
use std::time::Duration;

use bollard::Docker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::build::{LABEL_SOURCE_COMMIT, parse_authority};

/// The largest health response read; a larger one is an error, not a bigger buffer.
pub const MAX_HEALTH_RESPONSE_BYTES: usize = 64 * 1024;

/// How long one health attempt may take.
const HEALTH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause between health attempts while the container starts.
const HEALTH_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// What the deploy asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// The service id, for messages.
    pub service_id: String,
    /// The requested full commit.
    pub commit: String,
    /// The image id the build produced.
    pub image_id: String,
}

/// What the live service shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The image id the container runs.
    pub container_image_id: String,
    /// The image's `unidesk.ai/source-commit` label.
    pub image_label_commit: Option<String>,
    /// `None`: no health URL configured; `Some(None)`: the health response has no
    /// `deploy.commit`; `Some(Some(c))`: it reports `c`.
    pub health_commit: Option<Option<String>>,
    /// Whether the container is running.
    pub container_running: bool,
}

/// Which evidence showed a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The running image's `unidesk.ai/source-commit` label.
    ImageLabel,
    /// The health endpoint's `deploy.commit`.
    Health,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Evidence::ImageLabel => write!(f, "image label {LABEL_SOURCE_COMMIT}"),
            Evidence::Health => write!(f, "health deploy.commit"),
        }
    }
}

/// Why the live service does not prove the requested commit, or could not be observed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The container is not running.
    #[error("live service {service} is not running, requested commit {requested}")]
    NotRunning { service: String, requested: String },
    /// The running image has no source-commit label.
    #[error(
        "live service {service} runs image {image_id} without a {LABEL_SOURCE_COMMIT} label, requested commit {requested}"
    )]
    LabelMissing {
        service: String,
        image_id: String,
        requested: String,
    },
    /// A piece of evidence shows another commit.
    #[error("live service {service} runs commit {live}, requested {requested} (from {evidence})")]
    WrongCommit {
        service: String,
        live: String,
        requested: String,
        evidence: Evidence,
    },
    /// A health URL is configured but the response has no `deploy.commit`.
    #[error("live service {service} health does not report deploy.commit, requested {requested}")]
    HealthWithoutCommit { service: String, requested: String },
    /// The container runs another image than the build produced (a `docker commit` image, a
    /// retag, an older build).
    #[error(
        "live service {service} runs image {running}, not image {built} built for commit {requested}"
    )]
    ImageMismatch {
        service: String,
        running: String,
        built: String,
        requested: String,
    },
    /// A Docker API call failed.
    #[error("docker {action} of {target} failed")]
    Docker {
        action: &'static str,
        target: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The health URL is not `http://host[:port]/path`.
    #[error("health url {url:?} is not http://host[:port]/path: {reason}")]
    InvalidHealthUrl { url: String, reason: &'static str },
    /// The health endpoint gave no usable answer before the deadline.
    #[error("health endpoint {url} gave no JSON answer before the deadline: {last}")]
    HealthUnreachable { url: String, last: String },
}

fn same_image_id(a: &str, b: &str) -> bool {
    let strip = |s: &str| s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    !a.is_empty() && strip(a) == strip(b)
}

fn same_commit(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Decides whether `observed` proves `expected`: the container runs, its image's
/// source-commit label and (when a health URL is configured) the health `deploy.commit` equal
/// the requested commit, and the running image id is the one the build produced. Commit
/// evidence is checked first, so a healthy old service fails naming both commits.
pub fn judge(expected: &Expectation, observed: &Observed) -> Result<(), VerifyError> {
    let service = || expected.service_id.clone();
    let requested = || expected.commit.clone();
    if !observed.container_running {
        return Err(VerifyError::NotRunning {
            service: service(),
            requested: requested(),
        });
    }
    match &observed.image_label_commit {
        None => {
            return Err(VerifyError::LabelMissing {
                service: service(),
                image_id: observed.container_image_id.clone(),
                requested: requested(),
            });
        }
        Some(live) if !same_commit(live, &expected.commit) => {
            return Err(VerifyError::WrongCommit {
                service: service(),
                live: live.clone(),
                requested: requested(),
                evidence: Evidence::ImageLabel,
            });
        }
        Some(_) => {}
    }
    match &observed.health_commit {
        None => {}
        Some(None) => {
            return Err(VerifyError::HealthWithoutCommit {
                service: service(),
                requested: requested(),
            });
        }
        Some(Some(live)) if !same_commit(live, &expected.commit) => {
            return Err(VerifyError::WrongCommit {
                service: service(),
                live: live.clone(),
                requested: requested(),
                evidence: Evidence::Health,
            });
        }
        Some(Some(_)) => {}
    }
    if !same_image_id(&observed.container_image_id, &expected.image_id) {
        return Err(VerifyError::ImageMismatch {
            service: service(),
            running: observed.container_image_id.clone(),
            built: expected.image_id.clone(),
            requested: requested(),
        });
    }
    Ok(())
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    host: String,
    port: u16,
    /// The authority as written, for the `Host` header.
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Result<HttpUrl, &'static str> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("the scheme must be http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.contains('#')
        || path
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_control())
    {
        return Err("the path has a fragment, space or control character");
    }
    let (host, port) = parse_authority(authority)?;
    Ok(HttpUrl {
        host,
        port,
        authority: authority.to_owned(),
        path: path.to_owned(),
    })
}

/// Status and body of a raw HTTP/1.1 response read to its end (`Connection: close`); handles
/// `Content-Length` and chunked bodies.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the response head is incomplete".to_owned()),
        Err(e) => return Err(format!("the response is not HTTP: {e}")),
    };
    let code = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = raw.get(head_len..).unwrap_or_default();
    if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        return Ok((code, dechunk(rest)?));
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| format!("content-length {len:?} is not a number"))?;
            let body = rest
                .get(..len)
                .ok_or_else(|| format!("the body ended after {} of {len} bytes", rest.len()))?;
            Ok((code, body.to_vec()))
        }
        None => Ok((code, rest.to_vec())),
    }
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut")?;
        let size_text = String::from_utf8_lossy(data.get(..line_end).unwrap_or_default());
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?} is not hex"))?;
        data = data.get(line_end + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(body);
        }
        let chunk = data.get(..size).ok_or("a chunk is cut")?;
        body.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("a chunk lacks its CRLF")?;
    }
}

/// The `deploy.commit` of a health JSON body.
fn health_commit(body: &[u8]) -> Result<Option<String>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    Ok(value
        .pointer("/deploy/commit")
        .and_then(|c| c.as_str())
        .map(str::to_owned))
}

/// One GET; the body when the status is 2xx.
async fn get(url: &HttpUrl) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        url.path, url.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            break;
        }
        if raw.len() + n > MAX_HEALTH_RESPONSE_BYTES {
            return Err(format!(
                "the response is larger than {MAX_HEALTH_RESPONSE_BYTES} bytes"
            ));
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    let (code, body) = parse_response(&raw)?;
    if !(200..300).contains(&code) {
        return Err(format!("status {code}"));
    }
    Ok(body)
}

/// Reads what the live service shows: the container's state and image id, that image's
/// source-commit label, and, when `health_url` is given, the health `deploy.commit` — retrying
/// the health GET until `deadline` while the container starts. Stops waiting early when the
/// container is not running.
#[tracing::instrument(skip(docker))]
pub async fn observe(
    docker: &Docker,
    container_id: &str,
    health_url: Option<&str>,
    deadline: Instant,
) -> Result<Observed, VerifyError> {
    let url = health_url
        .map(|u| {
            parse_url(u).map_err(|reason| VerifyError::InvalidHealthUrl {
                url: u.to_owned(),
                reason,
            })
        })
        .transpose()?;
    let (running, image_id) = loop {
        let container = docker
            .inspect_container(container_id, None)
            .await
            .map_err(|source| VerifyError::Docker {
                action: "container inspect",
                target: container_id.to_owned(),
                source,
            })?;
        let running = container
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        let image_id = container.image.unwrap_or_default();
        let Some(url) = &url else {
            break (running, image_id);
        };
        if !running {
            break (running, image_id);
        }
        let attempt =
            HEALTH_ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let last = match tokio::time::timeout(attempt, get(url)).await {
            Ok(Ok(body)) => match health_commit(&body) {
                Ok(commit) => {
                    let observed = finish(docker, running, image_id, Some(commit)).await?;
                    return Ok(observed);
                }
                Err(e) => e,
            },
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {attempt:?}"),
        };
        if Instant::now() + HEALTH_RETRY_PAUSE >= deadline {
            return Err(VerifyError::HealthUnreachable {
                url: health_url.unwrap_or_default().to_owned(),
                last,
            });
        }
        tracing::debug!(reason = %last, "health not ready; retrying");
        tokio::time::sleep(HEALTH_RETRY_PAUSE).await;
    };
    let health = url.map(|_| None);
    finish(docker, running, image_id, health).await
}

/// Adds the image's source-commit label to what was seen of the container.
async fn finish(
    docker: &Docker,
    running: bool,
    image_id: String,
    health_commit: Option<Option<String>>,
) -> Result<Observed, VerifyError> {
    let image = docker
        .inspect_image(&image_id)
        .await
        .map_err(|source| VerifyError::Docker {
            action: "image inspect",
            target: image_id.clone(),
            source,
        })?;
    let label = image
        .config
        .and_then(|c| c.labels)
        .and_then(|mut labels| labels.remove(LABEL_SOURCE_COMMIT));
    Ok(Observed {
        container_image_id: image_id,
        image_label_commit: label,
        health_commit,
        container_running: running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "1111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222";

    fn expected() -> Expectation {
        Expectation {
            service_id: "web".to_owned(),
            commit: NEW.to_owned(),
            image_id: "sha256:beef".to_owned(),
        }
    }

    fn good() -> Observed {
        Observed {
            container_image_id: "sha256:beef".to_owned(),
            image_label_commit: Some(NEW.to_owned()),
            health_commit: Some(Some(NEW.to_owned())),
            container_running: true,
        }
    }

    #[test]
    fn judge_table() {
        type Case = (&'static str, fn(&mut Observed), Option<&'static str>);
        let cases: [Case; 9] = [
            ("all evidence agrees", |_| {}, None),
            (
                "no health path configured",
                |o| o.health_commit = None,
                None,
            ),
            (
                "image id without the sha256 prefix",
                |o| o.container_image_id = "beef".to_owned(),
                None,
            ),
            (
                "healthy old service",
                |o| {
                    o.image_label_commit = Some(OLD.to_owned());
                    o.health_commit = Some(Some(OLD.to_owned()));
                    o.container_image_id = "sha256:0ld".to_owned();
                },
                Some(
                    "live service web runs commit 1111111111111111111111111111111111111111, requested 2222222222222222222222222222222222222222 (from image label unidesk.ai/source-commit)",
                ),
            ),
            (
                "health still at the old commit",
                |o| o.health_commit = Some(Some(OLD.to_owned())),
                Some(
                    "live service web runs commit 1111111111111111111111111111111111111111, requested 2222222222222222222222222222222222222222 (from health deploy.commit)",
                ),
            ),
            (
                "docker commit image with the right label",
                |o| o.container_image_id = "sha256:c0ffee".to_owned(),
                Some(
                    "live service web runs image sha256:c0ffee, not image sha256:beef built for commit 2222222222222222222222222222222222222222",
                ),
            ),
            (
                "health without deploy.commit",
                |o| o.health_commit = Some(None),
                Some(
                    "live service web health does not report deploy.commit, requested 2222222222222222222222222222222222222222",
                ),
            ),
            (
                "no label",
                |o| o.image_label_commit = None,
                Some(
                    "live service web runs image sha256:beef without a unidesk.ai/source-commit label, requested commit 2222222222222222222222222222222222222222",
                ),
            ),
            (
                "stopped container",
                |o| o.container_running = false,
                Some(
                    "live service web is not running, requested commit 2222222222222222222222222222222222222222",
                ),
            ),
        ];
        for (name, change, want) in cases {
            let mut observed = good();
            change(&mut observed);
            let got = judge(&expected(), &observed).map_err(|e| e.to_string());
            match want {
                None => assert_eq!(got, Ok(()), "{name}"),
                Some(msg) => assert_eq!(got, Err(msg.to_owned()), "{name}"),
            }
        }
    }

    #[test]
    fn urls_parse_to_host_port_and_path() {
        let url = parse_url("http://127.0.0.1:8080/api/health?x=1").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("127.0.0.1", 8080, "/api/health?x=1")
        );
        assert_eq!(parse_url("http://localhost").unwrap().path, "/");
        assert!(parse_url("https://127.0.0.1/").is_err());
        assert!(parse_url("http://127.0.0.1:1/a b").is_err());
        assert!(parse_url("http://:1/").is_err());
    }

    #[test]
    fn responses_parse_with_length_chunks_or_close() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcdEXTRA";
        assert_eq!(parse_response(raw).unwrap(), (200, b"abcd".to_vec()));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, b"abcde".to_vec()));
        let raw = b"HTTP/1.0 503 Busy\r\n\r\nlater";
        assert_eq!(parse_response(raw).unwrap(), (503, b"later".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn health_commit_reads_deploy_commit() {
        assert_eq!(
            health_commit(br#"{"ok":true,"deploy":{"commit":"abc","repo":"r"}}"#),
            Ok(Some("abc".to_owned()))
        );
        assert_eq!(health_commit(br#"{"ok":true}"#), Ok(None));
        assert_eq!(health_commit(br#"{"deploy":{"commit":7}}"#), Ok(None));
        assert!(health_commit(b"<html>").is_err());
    }

    #[tokio::test]
    async fn observe_gives_up_at_the_deadline_and_sees_a_stopped_container() {
        use crate::launch::build::test_support::{Cleanup, docker, free_port, unique};
        use bollard::models::{ContainerCreateBody, HostConfig};
        use bollard::query_parameters::{CreateContainerOptions, StopContainerOptions};

        let docker = docker().await;
        let name = unique("verify");
        let mut cleanup = Cleanup::default();
        cleanup.containers.push(name.clone());
        let body = ContainerCreateBody {
            image: Some("local/busybox:latest".to_owned()),
            cmd: Some(vec!["sleep".to_owned(), "60".to_owned()]),
            host_config: Some(HostConfig {
                network_mode: Some("host".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let id = docker
            .create_container(Some(options), body)
            .await
            .unwrap()
            .id;
        docker.start_container(&id, None).await.unwrap();

        // Nothing serves the health URL: observe retries until the deadline, then names it.
        let url = format!("http://127.0.0.1:{}/health", free_port());
        let deadline = Instant::now() + Duration::from_millis(1200);
        let err = observe(&docker, &id, Some(&url), deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(err, VerifyError::HealthUnreachable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&url), "{err}");
        assert!(Instant::now() >= deadline - HEALTH_RETRY_PAUSE);

        let stop = StopContainerOptions {
            t: Some(0),
            signal: None,
        };
        docker.stop_container(&id, Some(stop)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let observed = observe(&docker, &id, Some(&url), deadline).await.unwrap();
        assert!(!observed.container_running);
        assert_eq!(observed.image_label_commit, None);
        let err = judge(&expected(), &observed).unwrap_err();
        assert!(matches!(err, VerifyError::NotRunning { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn get_reads_a_loopback_health_endpoint() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap();
            let body = r#"{"deploy":{"commit":"abc"}}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let url = parse_url(&format!("http://{addr}/health")).unwrap();
        let body = get(&url).await.unwrap();
        assert_eq!(health_commit(&body), Ok(Some("abc".to_owned())));
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        assert!(request.contains(&format!("Host: {addr}\r\n")), "{request}");
    }
}
