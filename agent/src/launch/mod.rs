//! Launch execution: one module per step. The executor (this module) owns ordering, events,
//! deadlines and cancellation; the steps own their I/O edge (Git, Docker).
//!
//! A launch id runs once: the executor asks the launch table, creates the run directory,
//! runs the steps under the launch's deadline and cancel token, and always ends with a
//! `Finished` event and `result.json` — also when the agent restarts mid-launch
//! (`interrupted`).

pub mod build;
mod ci;
pub mod compose;
pub mod containerd;
mod deploy;
pub mod dockerignore;
pub mod k3s;
pub mod k8s;
pub mod live;
pub mod materialize;
pub mod probe;
pub mod steplog;
pub mod verify;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use unidesk_protocol::launches::{LaunchTable, Offer};
use unidesk_protocol::{
    AgentFrame, Event, EventBody, Launch, LaunchId, LaunchResult, LaunchSpec, LaunchState,
    LaunchStatus, ResultDetail, Step, StepOutcome,
};

use crate::config::AgentConfig;
use crate::events::{EventHub, now_ms};
use crate::rundir::{RUNDIR_FORMAT, RunResult, RunWriter, StepTiming};
use steplog::StepLog;

/// A step failed; the text says what, where and why.
#[derive(Debug, Clone)]
pub struct StepFailure(pub String);

impl StepFailure {
    /// The error and every error under it, so the cause reaches the job log.
    pub fn chain(err: &dyn std::error::Error) -> StepFailure {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        StepFailure(text)
    }
}

/// Runs launches and remembers which ones it ran.
pub struct Executor {
    pub config: AgentConfig,
    pub events: Arc<EventHub>,
    table: Mutex<LaunchTable>,
    /// Running launches: their cancel token and, once cancelled, why.
    running: Mutex<HashMap<LaunchId, (CancellationToken, Option<String>)>>,
    root_cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a launch produced besides its status.
#[derive(Debug, Default)]
struct Outputs {
    detail: Option<ResultDetail>,
    timings: Vec<StepTiming>,
    /// The CI part of `result.json` (CI launches only).
    ci: Option<crate::rundir::CiRecord>,
}

impl Executor {
    /// Builds the executor, reading back every run on disk. Runs that were still going when
    /// the agent stopped are finished as `interrupted`.
    pub fn start(
        config: AgentConfig,
        events: Arc<EventHub>,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, crate::rundir::RunDirError> {
        let mut table = LaunchTable::default();
        for run in events.runs().scan()? {
            let mut last_seq = run.last_seq;
            let status = match &run.result {
                Some(result) => result.status,
                None => {
                    let mut writer = RunWriter::open(run.dir.clone())?;
                    let events = crate::rundir::read_events(&run.dir, 0)?;
                    let result = LaunchResult {
                        status: LaunchStatus::Interrupted,
                        error: Some(interrupted_reason(&events)),
                        detail: ResultDetail::None,
                    };
                    last_seq += 1;
                    writer.append(&Event {
                        launch_id: run.launch.launch_id.clone(),
                        seq: last_seq,
                        time_unix_ms: now_ms(),
                        body: EventBody::Finished(result.clone()),
                    })?;
                    writer.write_result(&run_result(&run.launch, &result, Vec::new()))?;
                    tracing::warn!(launch = %run.launch.launch_id, "launch interrupted by an agent restart");
                    LaunchStatus::Interrupted
                }
            };
            table.insert(run.launch, Some(status), last_seq);
        }
        Ok(Arc::new(Self {
            config,
            events,
            table: Mutex::new(table),
            running: Mutex::new(HashMap::new()),
            root_cancel: cancel,
        }))
    }

    /// Handles a delivered launch and returns the answer frame.
    pub fn offer(self: &Arc<Self>, launch: Launch) -> AgentFrame {
        let offer = lock(&self.table).offer(&launch);
        match offer {
            Offer::Duplicate(state) => {
                tracing::info!(launch = %launch.launch_id, ?state, "launch delivered again; not rerun");
                AgentFrame::Accepted {
                    launch_id: launch.launch_id,
                    state,
                }
            }
            Offer::Conflict(reason) => AgentFrame::Rejected {
                launch_id: launch.launch_id,
                reason,
            },
            Offer::Start => match self.events.runs().create(&launch) {
                Err(e) => AgentFrame::Rejected {
                    launch_id: launch.launch_id,
                    reason: format!("cannot create the run directory: {e}"),
                },
                Ok(writer) => {
                    self.events.open(launch.launch_id.clone(), writer);
                    let cancel = self.root_cancel.child_token();
                    lock(&self.running).insert(launch.launch_id.clone(), (cancel.clone(), None));
                    let this = self.clone();
                    let launch_id = launch.launch_id.clone();
                    // The span follows the task wherever it is polled (a guard held across
                    // an await would tag other tasks' lines on the same thread instead).
                    let span = tracing::info_span!("launch", launch_id = %launch_id, run_id = %launch.run_id);
                    tokio::spawn(async move { this.run(launch, cancel).await }.instrument(span));
                    AgentFrame::Accepted {
                        launch_id,
                        state: LaunchState::Started,
                    }
                }
            },
        }
    }

    /// Stops a running launch; the reason ends up in its result.
    pub fn cancel(&self, launch_id: &LaunchId, reason: &str) {
        if let Some((token, why)) = lock(&self.running).get_mut(launch_id) {
            tracing::info!(launch = %launch_id, reason, "cancelling launch");
            *why = Some(reason.to_string());
            token.cancel();
        }
    }

    async fn run(self: Arc<Self>, launch: Launch, cancel: CancellationToken) {
        let launch_id = launch.launch_id.clone();
        let remaining = launch.deadline_unix_ms.saturating_sub(now_ms());
        let mut outputs = Outputs::default();
        let work = self.execute(&launch, &mut outputs, &cancel);
        let outcome = tokio::select! {
            r = work => r,
            _ = cancel.cancelled() => Err((LaunchStatus::Cancelled, format!(
                "cancelled: {}",
                lock(&self.running)
                    .get(&launch_id)
                    .and_then(|(_, why)| why.clone())
                    .unwrap_or_else(|| "the agent is shutting down".into())
            ))),
            _ = tokio::time::sleep(Duration::from_millis(remaining)) => Err((LaunchStatus::TimedOut, format!(
                "deadline passed ({} ms after the launch was accepted)", remaining
            ))),
        };
        let mut result = match outcome {
            Ok(status) => LaunchResult {
                status,
                error: None,
                detail: outputs.detail.take().unwrap_or(ResultDetail::None),
            },
            Err((status, error)) => LaunchResult {
                status,
                error: Some(error),
                detail: outputs.detail.take().unwrap_or(ResultDetail::None),
            },
        };
        if let Some(e) = self.events.write_error(&launch_id) {
            incomplete_run_dir(&mut result, &e);
        }
        let mut record = run_result(&launch, &result, outputs.timings);
        record.ci = outputs.ci.take().map(|mut ci| {
            ci.finished_at = ci::finished_at();
            ci
        });
        if let Err(e) = self.events.write_result(&launch_id, &record) {
            tracing::error!(error = %e, "cannot write result.json");
            incomplete_run_dir(&mut result, &e.to_string());
        }
        match self
            .events
            .emit(&launch_id, EventBody::Finished(result.clone()))
            .await
        {
            Ok(event) => lock(&self.table).progressed(&launch_id, event.seq),
            Err(e) => tracing::error!(error = %e, "cannot emit the final event"),
        }
        lock(&self.table).finished(&launch_id, result.status);
        lock(&self.running).remove(&launch_id);
        tracing::info!(status = result.status.name(), "launch finished");
    }

    async fn execute(
        &self,
        launch: &Launch,
        outputs: &mut Outputs,
        cancel: &CancellationToken,
    ) -> Result<LaunchStatus, (LaunchStatus, String)> {
        match &launch.spec {
            LaunchSpec::Probe(spec) => {
                let facts = self
                    .step(launch, Step::Probe, outputs, |log| {
                        probe::run(&self.config, spec.echo_lines, log)
                    })
                    .await
                    .map_err(|f| (LaunchStatus::Failed, f.0))?;
                outputs.detail = Some(ResultDetail::Probe(facts));
                Ok(LaunchStatus::Succeeded)
            }
            LaunchSpec::Deploy(spec) => deploy::run(self, launch, spec, outputs, cancel).await,
            LaunchSpec::Prewarm => k3s::prewarm(self, launch, outputs, cancel).await,
            LaunchSpec::Ci(spec) => ci::run(self, launch, spec, outputs, cancel).await,
        }
    }

    /// Writes a log line that belongs to no step.
    async fn note(&self, launch: &Launch, line: String) {
        let id = &launch.launch_id;
        if let Ok(event) = self
            .events
            .emit(id, EventBody::Log { step: None, line })
            .await
        {
            lock(&self.table).progressed(id, event.seq);
        }
    }

    /// Runs one step: emits its start, forwards its log lines as events in order, emits its
    /// end, and records its timing.
    async fn step<T, F, Fut>(
        &self,
        launch: &Launch,
        step: Step,
        outputs: &mut Outputs,
        f: F,
    ) -> Result<T, StepFailure>
    where
        F: FnOnce(StepLog) -> Fut,
        Fut: Future<Output = Result<T, StepFailure>>,
    {
        let id = &launch.launch_id;
        let _ = self.events.emit(id, EventBody::StepStarted { step }).await;
        let started = Instant::now();
        let (log, mut rx) = StepLog::channel(step, 256);
        let forward = async {
            while let Some(line) = rx.recv().await {
                let body = EventBody::Log {
                    step: Some(line.step),
                    line: line.line,
                };
                if let Ok(event) = self.events.emit(id, body).await {
                    lock(&self.table).progressed(id, event.seq);
                }
            }
        };
        let (result, ()) = tokio::join!(f(log), forward);
        let outcome = match &result {
            Ok(_) => StepOutcome::Ok,
            Err(e) => StepOutcome::Failed {
                reason: e.0.clone(),
            },
        };
        crate::metrics::step_finished(step, &outcome, started.elapsed());
        outputs.timings.push(StepTiming {
            step,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ok: result.is_ok(),
        });
        if let Ok(event) = self
            .events
            .emit(id, EventBody::StepFinished { step, outcome })
            .await
        {
            lock(&self.table).progressed(id, event.seq);
        }
        result
    }
}

/// A launch whose run directory could not be written (a full disk) did not do all it was
/// asked: runbooks read that directory. It fails, and the reason names the write that failed.
fn incomplete_run_dir(result: &mut LaunchResult, error: &str) {
    let note = format!("the run directory could not be written: {error}");
    result.error = Some(match result.error.take() {
        Some(earlier) => format!("{earlier}; {note}"),
        None => note,
    });
    if result.status.is_ok() {
        result.status = LaunchStatus::Failed;
    }
}

/// Why a run found without `result.json` at start ended: the step the restart cut short.
fn interrupted_reason(events: &[crate::rundir::EventLine]) -> String {
    match crate::rundir::unfinished_step(events) {
        Some(step) => format!("agent restarted during {}", step.name()),
        None => "agent restarted between the steps of this launch".to_string(),
    }
}

fn run_result(launch: &Launch, result: &LaunchResult, timings: Vec<StepTiming>) -> RunResult {
    let (service, requested) = match &launch.spec {
        LaunchSpec::Deploy(d) => (Some(d.service_id.clone()), Some(d.requested_commit.clone())),
        LaunchSpec::Ci(c) => (
            Some(c.code_queue.service_id.clone()),
            Some(c.manifest_commit.clone()),
        ),
        LaunchSpec::Probe(_) | LaunchSpec::Prewarm => (None, None),
    };
    let (resolved, image, image_id) = match &result.detail {
        ResultDetail::Deploy(d) => (
            d.resolved_commit.clone(),
            d.image.clone(),
            d.image_id.clone(),
        ),
        _ => (None, None, None),
    };
    RunResult {
        format: RUNDIR_FORMAT,
        ok: result.status.is_ok(),
        status: result.status,
        run_id: launch.run_id.clone(),
        launch_id: launch.launch_id.clone(),
        kind: launch.spec.kind(),
        service,
        requested_commit: requested,
        resolved_commit: resolved,
        image,
        image_id,
        timings,
        error: result.error.clone(),
        finished_unix_ms: now_ms(),
        ci: None,
    }
}
