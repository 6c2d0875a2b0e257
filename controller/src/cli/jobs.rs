//! Job verbs: `job status|list|logs|cancel`, and launching with an optional wait. Reading a
//! job needs only the job store's files, so it works while the controller is down.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::json;

use super::{CliError, JobCommand, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::store::{JobRecord, JobStore, StoreError, StoredEvent, render_event};
use unidesk_protocol::EventBody;

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
                for line in progress_lines(job_id, &events, shown) {
                    output::progress(&line);
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

/// The progress lines of the events after the first `from`: steps starting and finishing and
/// the end of the launch, not the log lines.
fn progress_lines(job_id: &str, events: &[StoredEvent], from: usize) -> Vec<String> {
    events
        .iter()
        .skip(from)
        .filter(|e| !matches!(e.body, EventBody::Log { .. }))
        .map(|e| format!("{job_id}: {}", render_event(e)))
        .collect()
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
    use unidesk_protocol::{Step, StepOutcome};

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
                "job-1: step=build started".to_string(),
                "job-1: step=build finished ok".to_string(),
            ]
        );
        assert_eq!(
            progress_lines("job-1", &events, 1),
            vec!["job-1: step=build finished ok".to_string()]
        );
        assert!(progress_lines("job-1", &events, 3).is_empty());
    }
}
