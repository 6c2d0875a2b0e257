//! The agent's Prometheus metrics and the loopback `GET /metrics` endpoint that serves them
//! (the controller serves its own families through the same [`serve`]).
//!
//! Families (Prometheus text format 0.0.4): `unidesk_agent_steps_total{step,outcome}`,
//! `unidesk_agent_step_duration_seconds{step}`, `unidesk_agent_import_bytes_total`,
//! `unidesk_agent_event_backlog` and `unidesk_agent_build_info{version}`.
//!
//! The registry is process-wide ([`global`]): the code that records (the executor's step
//! wrapper, the containerd blob writer) sits deep in the launch code, and one agent runs per
//! process, so a handle threaded through every signature would buy nothing. Recording is an
//! atomic add whether or not the endpoint is on. The event backlog is not recorded at all: it
//! is read from the [`EventHub`] when the endpoint is scraped, so it cannot drift. This module
//! must not decide anything about launches; it only counts what the executor decided.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use unidesk_protocol::{Step, StepOutcome};

use crate::config::MetricsConfig;
use crate::events::EventHub;

/// The only path served.
pub const PATH: &str = "/metrics";
/// How long a scraper has to send its request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more wait for a slot (scrapers are few and local).
const MAX_CONNECTIONS: usize = 16;

/// What renders the exposition text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The metrics endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen={addr} is not valid: {why}")]
    NotLoopback { addr: SocketAddr, why: &'static str },
    #[error("cannot listen for metrics on {addr} (metrics.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StepName {
    step: &'static str,
}

/// The agent's metric families and their registry.
pub struct AgentMetrics {
    registry: Registry,
    steps: Family<StepLabels, Counter>,
    step_seconds: Family<StepName, Histogram>,
    import_bytes: Counter,
    event_backlog: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// A fresh registry with every family at zero (tests make their own; the agent uses
    /// [`global`]).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("unidesk_agent");
        let steps = Family::<StepLabels, Counter>::default();
        registry.register(
            "steps",
            "Steps finished, by step and outcome (ok, skipped, failed)",
            steps.clone(),
        );
        let step_seconds = Family::<StepName, Histogram>::new_with_constructor(|| {
            // 50 ms to about 27 minutes.
            Histogram::new(exponential_buckets(0.05, 2.0, 16))
        });
        registry.register(
            "step_duration_seconds",
            "Wall time of finished steps, by step",
            step_seconds.clone(),
        );
        let import_bytes = Counter::default();
        registry.register(
            "import_bytes",
            "Bytes written into containerd's content store by image imports",
            import_bytes.clone(),
        );
        let event_backlog = Gauge::default();
        registry.register(
            "event_backlog",
            "Events written to run directories and not yet acknowledged by the controller, \
             across launches",
            event_backlog.clone(),
        );
        registry.register(
            "build",
            "The agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry,
            steps,
            step_seconds,
            import_bytes,
            event_backlog,
        }
    }

    /// Counts a finished step and its wall time.
    pub fn step_finished(&self, step: Step, outcome: &StepOutcome, took: Duration) {
        let outcome = match outcome {
            StepOutcome::Ok => "ok",
            StepOutcome::Skipped { .. } => "skipped",
            StepOutcome::Failed { .. } => "failed",
        };
        let step = step.name();
        self.steps
            .get_or_create(&StepLabels { step, outcome })
            .inc();
        self.step_seconds
            .get_or_create(&StepName { step })
            .observe(took.as_secs_f64());
    }

    /// Counts bytes sent to containerd's content store.
    pub fn imported(&self, bytes: u64) {
        self.import_bytes.inc_by(bytes);
    }

    /// The exposition text, with the event backlog as it is now.
    pub fn render(&self, backlog: u64) -> String {
        self.event_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        encode(&self.registry)
    }
}

/// Encodes a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        .expect("writing into a String cannot fail");
    text
}

/// The value of the sample `series` (a metric name and its labels, exactly as the text format
/// writes them, e.g. `unidesk_agent_steps_total{step="build",outcome="ok"}`) in exposition
/// `text`, for the checks that read an endpoint back.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

static GLOBAL: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// The process-wide agent metrics.
pub fn global() -> &'static AgentMetrics {
    &GLOBAL
}

/// Counts a finished step in the process-wide metrics.
pub fn step_finished(step: Step, outcome: &StepOutcome, took: Duration) {
    global().step_finished(step, outcome, took);
}

/// Counts bytes written into containerd in the process-wide metrics.
pub fn imported(bytes: u64) {
    global().imported(bytes);
}

/// Starts the agent's endpoint for `[metrics]`: binds now (so a taken port fails the start),
/// then serves the process-wide families and `events`' backlog until `cancel` fires.
pub async fn start(
    config: &MetricsConfig,
    events: Arc<EventHub>,
    cancel: &CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    let listener = bind(config).await?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    let render: Render = Arc::new(move || global().render(events.backlog()));
    tokio::spawn(serve(listener, render, cancel.clone()));
    Ok(addr)
}

/// Binds `[metrics] listen`, refusing a non-loopback address here too (a config built in
/// code skips `validate`).
pub async fn bind(config: &MetricsConfig) -> Result<TcpListener, MetricsError> {
    let addr = config.listen;
    config
        .check()
        .map_err(|why| MetricsError::NotLoopback { addr, why })?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "metrics endpoint listening");
    Ok(listener)
}

/// Serves `GET /metrics` with `render`'s text until `cancel` fires.
pub async fn serve(listener: TcpListener, render: Render, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<_>| {
                let response = answer(req.method(), req.uri().path(), render.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_DEADLINE);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = conn => if let Err(error) = result {
                    tracing::debug!(%peer, %error, "metrics connection ended with an error");
                },
            }
            drop(permit);
        });
    }
}

/// The answer to one request: the exposition for `GET /metrics`, 405 for another method
/// there, 404 elsewhere.
pub fn answer(method: &Method, path: &str, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if path != PATH {
        (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("{path} is not served; metrics are at {PATH}\n"),
        )
    } else if method != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            format!("{method} {PATH} is not served; use GET\n"),
        )
    } else {
        (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            render(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    #[test]
    fn rendering_shows_every_family_with_what_was_recorded() {
        let m = AgentMetrics::new();
        // A labelled family has no series (and is not written) until something is recorded.
        let fresh = m.render(0);
        assert!(!fresh.contains("unidesk_agent_steps_total"), "{fresh}");
        assert_eq!(
            sample(&fresh, "unidesk_agent_import_bytes_total"),
            Some(0.0)
        );
        m.step_finished(Step::Build, &StepOutcome::Ok, Duration::from_millis(1500));
        m.step_finished(Step::Build, &StepOutcome::Ok, Duration::from_millis(100));
        m.step_finished(
            Step::Verify,
            &StepOutcome::Failed {
                reason: "health said another commit".into(),
            },
            Duration::from_millis(20),
        );
        m.imported(4096);
        m.imported(10);
        let text = m.render(7);
        for family in [
            "# TYPE unidesk_agent_steps_total counter",
            "# TYPE unidesk_agent_step_duration_seconds histogram",
            "# TYPE unidesk_agent_import_bytes_total counter",
            "# TYPE unidesk_agent_event_backlog gauge",
            "# TYPE unidesk_agent_build_info gauge",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        let at = |series: &str| sample(&text, series);
        assert_eq!(
            at(r#"unidesk_agent_steps_total{step="build",outcome="ok"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            at(r#"unidesk_agent_steps_total{step="verify",outcome="failed"}"#),
            Some(1.0)
        );
        assert_eq!(
            at(r#"unidesk_agent_step_duration_seconds_count{step="build"}"#),
            Some(2.0)
        );
        assert_eq!(
            at(r#"unidesk_agent_step_duration_seconds_sum{step="build"}"#),
            Some(1.6)
        );
        // 1.5 s falls in the 1.6 s bucket, 0.1 s in the 0.1 s one.
        assert_eq!(
            at(r#"unidesk_agent_step_duration_seconds_bucket{le="0.1",step="build"}"#).or_else(
                || at(r#"unidesk_agent_step_duration_seconds_bucket{step="build",le="0.1"}"#)
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(at("unidesk_agent_import_bytes_total"), Some(4106.0));
        assert_eq!(at("unidesk_agent_event_backlog"), Some(7.0));
        assert_eq!(
            at(&format!(
                r#"unidesk_agent_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )),
            Some(1.0)
        );
        // The backlog is what the hub says at each scrape, not a running sum.
        assert_eq!(
            sample(&m.render(0), "unidesk_agent_event_backlog"),
            Some(0.0)
        );
    }

    #[test]
    fn only_get_metrics_is_served() {
        let render = || "x_total 1\n".to_string();
        let ok = answer(&Method::GET, "/metrics", &render);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers()[hyper::header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(
            answer(&Method::GET, "/", &render).status(),
            StatusCode::NOT_FOUND
        );
        let post = answer(&Method::POST, "/metrics", &render);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[hyper::header::ALLOW], "GET");
    }

    fn load(extra: &str) -> Result<AgentConfig, crate::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "id = \"node\"\n{extra}\n[controller]\nurl = \"wss://127.0.0.1:7443/agent\"\n\
                 ca = \"ca.crt\"\n[dirs]\nruns = \"runs\"\nwork = \"work\"\ncache = \"cache\"\n"
            ),
        )
        .unwrap();
        AgentConfig::load(&path)
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_only() {
        assert_eq!(load("").unwrap().metrics, None);
        let on = load("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        assert_eq!(
            on.metrics.map(|m| m.listen),
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let v6 = load("[metrics]\nlisten = \"[::1]:9464\"\n").unwrap();
        assert!(v6.metrics.is_some());
        for addr in ["0.0.0.0:9464", "192.168.1.5:9464", "[::]:9464"] {
            let err = load(&format!("[metrics]\nlisten = \"{addr}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("metrics.listen=\"{addr}\" is not valid"))
                    && err.contains("loopback only"),
                "{err}"
            );
        }
        let err = load("[metrics]\nlisten = \"127.0.0.1:9464\"\npath = \"/m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `path`"), "{err}");
        let err = load("[metrics]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listen = \"localhost\"") && err.contains("invalid socket address"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_endpoint_answers_over_http_and_stops_on_cancel() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = MetricsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let listener = bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let render: Render = Arc::new(|| "probe_total 3\n".to_string());
        let server = tokio::spawn(serve(listener, render, cancel.clone()));
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        tcp.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nprobe_total 3\n"), "{reply}");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        let refused = bind(&MetricsConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
        })
        .await
        .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "metrics.listen=0.0.0.0:0 is not valid: the metrics endpoint listens on loopback \
             only (127.0.0.0/8 or ::1)"
        );
    }
}
