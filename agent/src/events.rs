//! Event delivery on the agent: every event of every launch is numbered by its outbox,
//! appended to its run directory, and only then made available to the connection to send.
//! Acks free room; a full outbox makes the launch wait (bounded memory and disk backlog).
//!
//! Survives reconnects (the controller's Welcome says where to resume) and agent restarts
//! (unacknowledged events are read back from `events.jsonl`).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;
use unidesk_protocol::delivery::Outbox;
use unidesk_protocol::{Event, EventBody, LaunchId, ResumePoint};

use crate::rundir::{RunDirError, RunWriter, Runs, read_events};

/// Events were emitted for a launch that has no open event log (a bug in the caller).
#[derive(Debug, Clone, thiserror::Error)]
#[error("launch {0} has no open event log")]
pub struct NotOpen(pub LaunchId);

struct Open {
    outbox: Outbox,
    writer: RunWriter,
    /// The launch has written its final event; once delivered, it is closed.
    finished: bool,
    /// The first failure to write an event into the run directory (a full disk, say): the
    /// event was still sent, and the launch's result must say its run directory is incomplete.
    write_error: Option<String>,
}

/// The outboxes of all launches with undelivered events.
pub struct EventHub {
    runs: Runs,
    window: usize,
    open: Mutex<HashMap<LaunchId, Open>>,
    /// Woken when events are ready to send.
    pub ready: Notify,
    room: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The time now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl EventHub {
    /// A hub writing into `runs`, holding at most `window` unacknowledged events per launch.
    pub fn new(runs: Runs, window: usize) -> Self {
        Self {
            runs,
            window,
            open: Mutex::new(HashMap::new()),
            ready: Notify::new(),
            room: Notify::new(),
        }
    }

    /// The run directories.
    pub fn runs(&self) -> &Runs {
        &self.runs
    }

    /// Starts delivering events of a new launch written by `writer`.
    pub fn open(&self, launch_id: LaunchId, writer: RunWriter) {
        lock(&self.open).insert(
            launch_id.clone(),
            Open {
                outbox: Outbox::new(launch_id, self.window),
                writer,
                finished: false,
                write_error: None,
            },
        );
    }

    /// Numbers, writes and queues one event; waits while the launch's outbox is full.
    pub async fn emit(&self, launch_id: &LaunchId, body: EventBody) -> Result<Event, NotOpen> {
        let finished = matches!(body, EventBody::Finished(_));
        loop {
            let room = self.room.notified();
            {
                let mut open = lock(&self.open);
                let Some(run) = open.get_mut(launch_id) else {
                    return Err(NotOpen(launch_id.clone()));
                };
                if run.outbox.has_room() {
                    let event = run
                        .outbox
                        .push(body, now_ms())
                        .expect("room was checked under the same lock");
                    if let Err(e) = run.writer.append(&event) {
                        // The event is numbered but not on disk: it is still sent, and the
                        // failure is reported; the run directory is what failed.
                        tracing::error!(launch = %launch_id, error = %e, "cannot write event");
                        run.write_error.get_or_insert_with(|| e.to_string());
                    }
                    if finished {
                        run.finished = true;
                    }
                    drop(open);
                    self.ready.notify_one();
                    return Ok(event);
                }
            }
            room.await;
        }
    }

    /// The events to send now, at most `max`.
    pub fn poll_transmit(&self, max: usize) -> Vec<Event> {
        let mut open = lock(&self.open);
        let mut out = Vec::new();
        for run in open.values_mut() {
            while out.len() < max {
                match run.outbox.poll_transmit() {
                    Some(e) => out.push(e),
                    None => break,
                }
            }
        }
        out
    }

    /// The controller stored events of `launch_id` up to `seq`.
    pub fn ack(&self, launch_id: &LaunchId, seq: u64) {
        let mut open = lock(&self.open);
        let Some(run) = open.get_mut(launch_id) else {
            return;
        };
        if let Err(e) = run.outbox.on_ack(seq) {
            tracing::warn!(error = %e, "ignoring ack");
            return;
        }
        if run.finished && run.outbox.is_delivered() {
            if let Err(e) = run.writer.mark_delivered() {
                tracing::warn!(launch = %launch_id, error = %e, "cannot mark run delivered");
            }
            open.remove(launch_id);
        }
        drop(open);
        self.room.notify_waiters();
    }

    /// Events written and not yet acknowledged, across launches (the metrics' event backlog).
    pub fn backlog(&self) -> u64 {
        let open = lock(&self.open);
        open.values()
            .map(|run| run.outbox.last_written() - run.outbox.acked())
            .sum()
    }

    /// Why the run directory of an open launch could not be written (its first failure).
    pub fn write_error(&self, launch_id: &LaunchId) -> Option<String> {
        lock(&self.open)
            .get(launch_id)
            .and_then(|run| run.write_error.clone())
    }

    /// The connection dropped.
    pub fn disconnected(&self) {
        for run in lock(&self.open).values_mut() {
            run.outbox.on_disconnect();
        }
    }

    /// A new connection's Welcome: resume each listed launch after the controller's seq,
    /// reading back launches this process does not hold (it restarted). Launches not listed
    /// are resent from their last ack; the controller acknowledges what it already has.
    pub fn resume(&self, points: &[ResumePoint]) {
        let mut open = lock(&self.open);
        for point in points {
            if let Some(run) = open.get_mut(&point.launch_id) {
                if let Err(e) = run.outbox.resume(point.acked_seq) {
                    tracing::warn!(error = %e, "controller is ahead of this agent's log");
                }
                continue;
            }
            match self.restore(point) {
                Ok(Some(run)) => {
                    open.insert(point.launch_id.clone(), run);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(launch = %point.launch_id, error = %e, "cannot restore events")
                }
            }
        }
        for run in open.values_mut() {
            if !points
                .iter()
                .any(|p| &p.launch_id == run.outbox.launch_id())
            {
                run.outbox.on_disconnect();
            }
        }
        drop(open);
        self.ready.notify_one();
    }

    fn restore(&self, point: &ResumePoint) -> Result<Option<Open>, RunDirError> {
        let Some(run) = self
            .runs
            .scan()?
            .into_iter()
            .find(|r| r.launch.launch_id == point.launch_id)
        else {
            tracing::warn!(launch = %point.launch_id, "controller resumes a launch this agent has no run for");
            return Ok(None);
        };
        let events = read_events(&run.dir, point.acked_seq)?
            .into_iter()
            .map(|l| Event {
                launch_id: point.launch_id.clone(),
                seq: l.seq,
                time_unix_ms: l.time_unix_ms,
                body: l.body,
            });
        let outbox = Outbox::restore(
            point.launch_id.clone(),
            self.window,
            point.acked_seq,
            events,
        )
        .map_err(|e| RunDirError::Malformed {
            path: run.dir.join("events.jsonl"),
            reason: e.to_string(),
        })?;
        Ok(Some(Open {
            outbox,
            writer: RunWriter::open(run.dir)?,
            finished: run.result.is_some(),
            write_error: None,
        }))
    }

    /// Appends `result.json` for a launch.
    pub fn write_result(
        &self,
        launch_id: &LaunchId,
        result: &crate::rundir::RunResult,
    ) -> Result<(), RunDirError> {
        let open = lock(&self.open);
        match open.get(launch_id) {
            Some(run) => run.writer.write_result(result),
            None => RunWriter::open(self.runs.dir(&result.run_id))?.write_result(result),
        }
    }
}
