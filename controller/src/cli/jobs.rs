//! Job verbs: `job status|list|logs|cancel`, and launching with an optional wait. Reading a
//! job needs only the job store's files, so it works while the controller is down.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::json;

use super::{CliError, JobCommand, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::store::{JobRecord, JobStore, StoreError, StoredEvent, render_event};
use unidesk_protocol::{EventBody, Step};

pub(super) fn store(config: &ControllerConfig) -> Result<JobStore, CliError> {
    JobStore::open(&config.path(&config.store.dir)).map_err(|e| CliError::Input(e.into()))
}

fn load(store: &JobStore, job_id: &str) -> Result<JobRecord, CliError> {
    store.load(job_id).map_err(|e| match e {
        StoreError::NotFound(_) => CliError::Input(e.into()),
        other => CliError::Failed(other.into()),
    })
}

/// Sends an admin request; a refused request is bad input, no answer is unreachable.
pub(super) async fn admin(
    config: &ControllerConfig,
    request: &AdminRequest,
) -> Result<serde_json::Value, CliError> {
    let socket = config.path(&config.admin.socket);
    match crate::admin::request(&socket, request).await {
        Ok(Ok(data)) => Ok(data),
        Ok(Err(error)) => Err(CliError::Input(anyhow!(error))),
        Err(e) => Err(CliError::Unreachable(e.into())),
    }
}

/// Submits a launch and prints the job; with `wait`, waits for the job to end and exits 1
/// unless it succeeded.
pub(super) async fn launch(
    config: &ControllerConfig,
    request: &AdminRequest,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    let data = admin(config, request).await?;
    let record: JobRecord = serde_json::from_value(data)
        .context("the controller answered with a malformed job record")
        .map_err(CliError::Failed)?;
    let Some(wait) = wait else {
        output::json(&json!({
            "ok": true,
            "jobId": record.job_id,
            "status": record.status,
            "next": [format!("unidesk-controller job status {} --config {}", record.job_id, config_hint(config))],
        }));
        return Ok(());
    };
    let store = store(config)?;
    let record = wait_for(&store, record.job_id.as_str(), wait).await?;
    finish(&store, &record, 4000)
}

fn config_hint(config: &ControllerConfig) -> String {
    config
        .base_dir
        .join("controller.toml")
        .display()
        .to_string()
}

/// Waits up to `wait` for a job to end. On a terminal, its steps are shown on stderr as they
/// arrive (the log lines stay in `job logs`).
pub(crate) async fn wait_for(
    store: &JobStore,
    job_id: &str,
    wait: Duration,
) -> Result<JobRecord, CliError> {
    let until = Instant::now() + wait;
    let progress = output::progress_enabled();
    let mut shown = 0usize;
    loop {
        let record = load(store, job_id)?;
        if progress {
            // A job's events may not be readable yet; progress is best effort.
            if let Ok(events) = store.read_events(&record.job_id) {
                for item in progress_lines(job_id, &events, shown) {
                    match item {
                        Progress::Line(line) => output::progress(&line),
                        Progress::Bar(bar) => output::progress_bar(&bar),
                    }
                }
                shown = shown.max(events.len());
            }
        }
        if record.status.is_final() || Instant::now() >= until {
            return Ok(record);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `--wait` shows on a terminal for one event.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// A step started or finished, or the launch ended: a line of its own.
    Line(String),
    /// How far a build or an import is: redrawn in place.
    Bar(String),
}

/// The progress of the events after the first `from`: steps starting and finishing and the
/// end of the launch as lines, the build's `Step i/n` and the import's `layer i/n` log lines as
/// a bar; other log lines stay in `job logs`.
fn progress_lines(job_id: &str, events: &[StoredEvent], from: usize) -> Vec<Progress> {
    events
        .iter()
        .skip(from)
        .filter_map(|e| match &e.body {
            EventBody::Log {
                step: Some(step @ (Step::Build | Step::Import)),
                line,
            } => fraction(line).map(|(done, total)| {
                Progress::Bar(format!(
                    "{job_id}: step={} {}",
                    step.name(),
                    bar(done, total)
                ))
            }),
            EventBody::Log { .. } => None,
            _ => Some(Progress::Line(format!("{job_id}: {}", render_event(e)))),
        })
        .collect()
}

/// `i/n` of a build line (`Step 3/7 : RUN …`) or an import line (`layer 2/5 …`).
fn fraction(line: &str) -> Option<(u64, u64)> {
    let rest = line
        .strip_prefix("Step ")
        .or_else(|| line.strip_prefix("layer "))?;
    let word = rest.split([' ', ':']).next()?;
    let (done, total) = word.split_once('/')?;
    let (done, total) = (done.parse().ok()?, total.parse().ok()?);
    (done <= total && total > 0).then_some((done, total))
}

/// `[#########-----------] 3/7`, 20 cells wide.
fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    let full = done * WIDTH / total;
    format!(
        "[{}{}] {done}/{total}",
        "#".repeat(full as usize),
        "-".repeat((WIDTH - full) as usize)
    )
}

fn finish(store: &JobStore, record: &JobRecord, tail_bytes: u64) -> Result<(), CliError> {
    let tail = store
        .tail_events(&record.job_id, tail_bytes)
        .map_err(|e| CliError::Failed(e.into()))?;
    let ok = record.status.is_final() && record.result.as_ref().is_some_and(|r| r.status.is_ok());
    output::json(&json!({
        "ok": ok,
        "job": record,
        "logTail": tail,
    }));
    if !record.status.is_final() {
        return Err(CliError::Failed(anyhow!(
            "job {} is still {:?} after the wait",
            record.job_id,
            record.status
        )));
    }
    if !ok {
        return Err(CliError::Failed(anyhow!(
            "job {} ended {:?}{}",
            record.job_id,
            record.status,
            record
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )));
    }
    Ok(())
}

pub(super) async fn run(command: JobCommand) -> Result<(), CliError> {
    match command {
        JobCommand::Status {
            job_id,
            tail_bytes,
            config,
        } => {
            let config = config.load()?;
            let store = store(&config)?;
            let record = load(&store, &job_id)?;
            let tail = store
                .tail_events(&record.job_id, tail_bytes)
                .map_err(|e| CliError::Failed(e.into()))?;
            output::json(&json!({
                "ok": true,
                "job": record,
                "logTail": tail,
            }));
            Ok(())
        }
        JobCommand::List(config) => {
            let config = config.load()?;
            let store = store(&config)?;
            let jobs = store.list().map_err(|e| CliError::Failed(e.into()))?;
            let rows: Vec<_> = jobs
                .iter()
                .map(|j| {
                    json!({
                        "jobId": j.job_id,
                        "kind": j.kind,
                        "agent": j.agent,
                        "status": j.status,
                        "createdUnixMs": j.created_unix_ms,
                        "updatedUnixMs": j.updated_unix_ms,
                    })
                })
                .collect();
            output::json(&rows);
            Ok(())
        }
        JobCommand::Logs {
            job_id,
            follow,
            config,
        } => {
            let config = config.load()?;
            let store = store(&config)?;
            let mut printed = 0usize;
            loop {
                let record = load(&store, &job_id)?;
                let events = store
                    .read_events(&record.job_id)
                    .map_err(|e| CliError::Failed(e.into()))?;
                for e in events.iter().skip(printed) {
                    output::line(&render_event(e));
                }
                printed = printed.max(events.len());
                if !follow || record.status.is_final() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        JobCommand::Cancel {
            job_id,
            reason,
            config,
        } => {
            let config = config.load()?;
            let data = admin(
                &config,
                &AdminRequest::Cancel {
                    job_id: job_id.clone(),
                    reason,
                },
            )
            .await?;
            output::json(&json!({"ok": true, "job": data}));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unidesk_protocol::StepOutcome;

    fn event(seq: u64, body: EventBody) -> StoredEvent {
        StoredEvent {
            seq,
            time_unix_ms: 0,
            body,
        }
    }

    #[test]
    fn progress_shows_steps_not_log_lines_and_each_once() {
        let events = vec![
            event(1, EventBody::StepStarted { step: Step::Build }),
            event(
                2,
                EventBody::Log {
                    step: Some(Step::Build),
                    line: "RUN make".into(),
                },
            ),
            event(
                3,
                EventBody::StepFinished {
                    step: Step::Build,
                    outcome: StepOutcome::Ok,
                },
            ),
        ];
        assert_eq!(
            progress_lines("job-1", &events, 0),
            vec![
                Progress::Line("job-1: step=build started".into()),
                Progress::Line("job-1: step=build finished ok".into()),
            ]
        );
        assert_eq!(
            progress_lines("job-1", &events, 1),
            vec![Progress::Line("job-1: step=build finished ok".into())]
        );
        assert!(progress_lines("job-1", &events, 3).is_empty());
    }

    #[test]
    fn builds_and_imports_show_a_bar_other_lines_do_not() {
        let log = |seq, step, line: &str| {
            event(
                seq,
                EventBody::Log {
                    step: Some(step),
                    line: line.into(),
                },
            )
        };
        let events = vec![
            log(1, Step::Build, "Step 3/4 : RUN make"),
            log(
                2,
                Step::Import,
                "layer 2/2 sha256:ab written (1 MiB in 0.1 s)",
            ),
            log(3, Step::Build, "Step 9/4 : nonsense"),
            log(4, Step::Verify, "Step 1/2 : not a build"),
            log(5, Step::Build, "layer x/y"),
        ];
        assert_eq!(
            progress_lines("j", &events, 0),
            vec![
                Progress::Bar("j: step=build [###############-----] 3/4".into()),
                Progress::Bar("j: step=import [####################] 2/2".into()),
            ]
        );
        assert_eq!(fraction("Step 0/0 : x"), None);
        assert_eq!(bar(0, 7), "[--------------------] 0/7");
    }
}
