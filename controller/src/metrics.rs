//! The controller's Prometheus metrics: the families, the pure mapping from job records and
//! egress refusals to their labels, a byte-counting wrapper for egress connections, and the
//! start of the loopback `GET /metrics` endpoint (the HTTP part is the agent crate's
//! [`unidesk_agent::metrics::serve`]).
//!
//! Families (Prometheus text format 0.0.4): `unidesk_controller_agents_connected`,
//! `unidesk_controller_launches_total{kind,outcome}`,
//! `unidesk_controller_job_duration_seconds{kind}`,
//! `unidesk_controller_egress_bytes_total{direction}` (`out`: agent → target, `in`: target →
//! agent), `unidesk_controller_egress_refusals_total{reason}` and
//! `unidesk_controller_build_info{version}`.
//!
//! The registry is process-wide ([`global`]) for the reason the agent's is: the recording
//! points (the hub's job endings, every egress stream) are spread over the gateway's tasks,
//! and one controller runs per process. Agents connected is not recorded: it is read from the
//! hub's registry at each scrape, so a replaced connection can never make it drift.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use unidesk_agent::metrics::Render;
use unidesk_protocol::LaunchKind;

use crate::config::MetricsConfig;
use crate::egress::EgressRefusal;
use crate::hub::Hub;
use crate::store::{JobRecord, JobStatus};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LaunchLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The controller's metric families and their registry.
pub struct ControllerMetrics {
    registry: Registry,
    agents_connected: Gauge,
    launches: Family<LaunchLabels, Counter>,
    job_seconds: Family<KindLabel, Histogram>,
    egress_out: Counter,
    egress_in: Counter,
    refusals: Family<ReasonLabel, Counter>,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    /// A fresh registry with every family at zero (tests make their own; the controller uses
    /// [`global`]).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("unidesk_controller");
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents with an open session",
            agents_connected.clone(),
        );
        let launches = Family::<LaunchLabels, Counter>::default();
        registry.register(
            "launches",
            "Jobs that reached a final status, by launch kind and outcome",
            launches.clone(),
        );
        let job_seconds = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            // 100 ms to about 55 minutes.
            Histogram::new(exponential_buckets(0.1, 2.0, 16))
        });
        registry.register(
            "job_duration_seconds",
            "Time from a job's submission to its final status, by launch kind",
            job_seconds.clone(),
        );
        let egress = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "egress_bytes",
            "Bytes carried by egress connections: out = agent to target, in = target to agent",
            egress.clone(),
        );
        let refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "egress_refusals",
            "Egress streams refused or not connected, by reason",
            refusals.clone(),
        );
        registry.register(
            "build",
            "The controller's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Both directions exist from the start, so a scrape shows them at zero.
        let egress_out = egress
            .get_or_create(&DirectionLabel { direction: "out" })
            .clone();
        let egress_in = egress
            .get_or_create(&DirectionLabel { direction: "in" })
            .clone();
        Self {
            registry,
            agents_connected,
            launches,
            job_seconds,
            egress_out,
            egress_in,
            refusals,
        }
    }

    /// Counts a job that reached a final status, and its duration; a job still open is
    /// ignored.
    pub fn job_finished(&self, record: &JobRecord) {
        let Some(outcome) = outcome(record.status) else {
            return;
        };
        let kind = kind(record.kind);
        self.launches
            .get_or_create(&LaunchLabels { kind, outcome })
            .inc();
        let millis = record
            .updated_unix_ms
            .saturating_sub(record.created_unix_ms);
        // Milliseconds since submission; f64 holds them exactly for 285,000 years.
        self.job_seconds
            .get_or_create(&KindLabel { kind })
            .observe(millis as f64 / 1000.0);
    }

    /// Counts a refused or failed egress stream.
    pub fn egress_refused(&self, refusal: &EgressRefusal) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: refusal_reason(refusal),
            })
            .inc();
    }

    /// Wraps an egress connection so the bytes it carries are counted as they flow.
    pub fn count_egress<S>(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            out: self.egress_out.clone(),
            into: self.egress_in.clone(),
        }
    }

    /// The exposition text, with the number of connected agents as it is now.
    pub fn render(&self, agents_connected: usize) -> String {
        self.agents_connected
            .set(i64::try_from(agents_connected).unwrap_or(i64::MAX));
        unidesk_agent::metrics::encode(&self.registry)
    }
}

/// The `kind` label of a launch kind (as `job.json` writes it).
pub fn kind(kind: LaunchKind) -> &'static str {
    match kind {
        LaunchKind::Probe => "probe",
        LaunchKind::Deploy => "deploy",
        LaunchKind::Prewarm => "prewarm",
        LaunchKind::Ci => "ci",
    }
}

/// The `outcome` label of a final job status (as `job.json` writes it); `None` while open.
pub fn outcome(status: JobStatus) -> Option<&'static str> {
    Some(match status {
        JobStatus::Queued | JobStatus::Dispatched | JobStatus::Running => return None,
        JobStatus::Succeeded => "succeeded",
        JobStatus::Noop => "noop",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
        JobStatus::TimedOut => "timed-out",
        JobStatus::Interrupted => "interrupted",
        JobStatus::Rejected => "rejected",
    })
}

/// The `reason` label of an egress refusal: the policy's reasons (`no-rule`, `port-zero`,
/// `forbidden-address`, `no-address`) and the dial's (`resolve`, `timeout`, `connect`).
pub fn refusal_reason(refusal: &EgressRefusal) -> &'static str {
    match refusal {
        EgressRefusal::NoRule { .. } => "no-rule",
        EgressRefusal::PortZero { .. } => "port-zero",
        EgressRefusal::Forbidden { .. } => "forbidden-address",
        EgressRefusal::NoAddress { .. } => "no-address",
        EgressRefusal::Resolve { .. } => "resolve",
        EgressRefusal::Timeout { .. } => "timeout",
        EgressRefusal::Connect { .. } => "connect",
    }
}

static GLOBAL: LazyLock<ControllerMetrics> = LazyLock::new(ControllerMetrics::new);

/// The process-wide controller metrics.
pub fn global() -> &'static ControllerMetrics {
    &GLOBAL
}

/// Counts a finished job in the process-wide metrics.
pub fn job_finished(record: &JobRecord) {
    global().job_finished(record);
}

/// Counts an egress refusal in the process-wide metrics.
pub fn egress_refused(refusal: &EgressRefusal) {
    global().egress_refused(refusal);
}

/// Wraps an egress connection so the process-wide metrics count its bytes.
pub fn count_egress<S>(inner: S) -> Counted<S> {
    global().count_egress(inner)
}

/// Binds `[metrics] listen` if the section is present.
pub async fn bind(
    config: Option<&MetricsConfig>,
) -> Result<Option<TcpListener>, unidesk_agent::metrics::MetricsError> {
    match config {
        Some(config) => unidesk_agent::metrics::bind(config).await.map(Some),
        None => Ok(None),
    }
}

/// Serves the process-wide families, with `hub`'s connected agents, until `cancel` fires;
/// returns at once when nothing was bound.
pub async fn serve(listener: Option<TcpListener>, hub: Arc<Hub>, cancel: CancellationToken) {
    let Some(listener) = listener else {
        return;
    };
    let render: Render = Arc::new(move || global().render(hub.agents().len()));
    unidesk_agent::metrics::serve(listener, render, cancel).await;
}

/// An egress connection whose bytes are counted: written = `out`, read = `in`.
pub struct Counted<S> {
    inner: S,
    out: Counter,
    into: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = buf.filled().len().saturating_sub(before);
            self.into.inc_by(read as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.out.inc_by(written as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use unidesk_agent::metrics::sample;
    use unidesk_protocol::{AgentId, Launch, LaunchId, LaunchSpec, ProbeSpec, RunId};

    fn record(status: JobStatus, created: u64, updated: u64) -> JobRecord {
        let job_id = LaunchId::new("job-1").unwrap();
        JobRecord {
            schema: crate::store::JOB_SCHEMA,
            job_id: job_id.clone(),
            kind: LaunchKind::Probe,
            agent: AgentId::new("node").unwrap(),
            run_id: RunId::new("job-1").unwrap(),
            status,
            created_unix_ms: created,
            updated_unix_ms: updated,
            reason: None,
            cancel_requested: None,
            result: None,
            launch: Launch {
                launch_id: job_id,
                run_id: RunId::new("job-1").unwrap(),
                deadline_unix_ms: updated,
                spec: LaunchSpec::Probe(ProbeSpec { echo_lines: 0 }),
            },
        }
    }

    #[test]
    fn rendering_shows_every_family_with_what_was_recorded() {
        let m = ControllerMetrics::new();
        // A labelled family has no series (and is not written) until something is recorded;
        // both egress directions are created up front.
        let fresh = m.render(0);
        assert!(
            !fresh.contains("unidesk_controller_launches_total"),
            "{fresh}"
        );
        assert_eq!(
            sample(
                &fresh,
                r#"unidesk_controller_egress_bytes_total{direction="out"}"#
            ),
            Some(0.0)
        );
        m.job_finished(&record(JobStatus::Succeeded, 1_000, 3_500));
        m.job_finished(&record(JobStatus::Rejected, 1_000, 1_200));
        m.job_finished(&record(JobStatus::Running, 1_000, 9_000));
        m.egress_refused(&EgressRefusal::NoRule {
            target: "example.com:443".into(),
        });
        let text = m.render(2);
        for family in [
            "# TYPE unidesk_controller_agents_connected gauge",
            "# TYPE unidesk_controller_launches_total counter",
            "# TYPE unidesk_controller_job_duration_seconds histogram",
            "# TYPE unidesk_controller_egress_bytes_total counter",
            "# TYPE unidesk_controller_egress_refusals_total counter",
            "# TYPE unidesk_controller_build_info gauge",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        let at = |series: &str| sample(&text, series);
        assert_eq!(at("unidesk_controller_agents_connected"), Some(2.0));
        assert_eq!(
            at(r#"unidesk_controller_launches_total{kind="probe",outcome="succeeded"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            at(r#"unidesk_controller_launches_total{kind="probe",outcome="rejected"}"#),
            Some(1.0)
        );
        // A job still running is not counted.
        assert_eq!(
            at(r#"unidesk_controller_job_duration_seconds_count{kind="probe"}"#),
            Some(2.0)
        );
        assert_eq!(
            at(r#"unidesk_controller_job_duration_seconds_sum{kind="probe"}"#),
            Some(2.7)
        );
        assert_eq!(
            at(r#"unidesk_controller_egress_refusals_total{reason="no-rule"}"#),
            Some(1.0)
        );
    }

    #[tokio::test]
    async fn egress_bytes_are_counted_in_both_directions_as_they_flow() {
        let m = ControllerMetrics::new();
        let (near, mut far) = tokio::io::duplex(64);
        let mut counted = m.count_egress(near);
        counted.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 18];
        far.read_exact(&mut buf).await.unwrap();
        far.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let mut back = [0u8; 27];
        counted.read_exact(&mut back).await.unwrap();
        let text = m.render(0);
        assert_eq!(
            sample(
                &text,
                r#"unidesk_controller_egress_bytes_total{direction="out"}"#
            ),
            Some(18.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"unidesk_controller_egress_bytes_total{direction="in"}"#
            ),
            Some(27.0)
        );
    }

    #[test]
    fn refusal_reasons_are_classes_not_targets() {
        let target = || "10.0.0.1:22".to_string();
        let forbidden = EgressRefusal::Forbidden {
            target: target(),
            addr: "10.0.0.1".parse().unwrap(),
            class: crate::egress::AddressClass::Private,
        };
        assert_eq!(refusal_reason(&forbidden), "forbidden-address");
        let timeout = EgressRefusal::Timeout {
            target: target(),
            timeout: std::time::Duration::from_secs(1),
        };
        assert_eq!(refusal_reason(&timeout), "timeout");
    }

    fn load(extra: &str) -> Result<crate::config::ControllerConfig, crate::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(
            &path,
            format!(
                "[gateway]\nlisten = \"127.0.0.1:7443\"\ncert = \"s.crt\"\nkey = \"s.key\"\n\
                 [admin]\nsocket = \"admin.sock\"\n[store]\ndir = \"state\"\n{extra}"
            ),
        )
        .unwrap();
        crate::config::ControllerConfig::load(&path)
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_only() {
        assert_eq!(load("").unwrap().metrics, None);
        let on = load("[metrics]\nlisten = \"127.0.0.1:9465\"\n").unwrap();
        assert_eq!(
            on.metrics.map(|m| m.listen),
            Some("127.0.0.1:9465".parse().unwrap())
        );
        for addr in ["0.0.0.0:9465", "10.1.2.3:9465", "[::]:9465"] {
            let err = load(&format!("[metrics]\nlisten = \"{addr}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("metrics.listen=\"{addr}\" is not valid"))
                    && err.contains("loopback only"),
                "{err}"
            );
        }
    }
}
