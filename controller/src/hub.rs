//! The controller's shared state: who is connected (the registry), which jobs are open
//! (their inboxes and event logs), and the operations the admin API offers on them —
//! submit a launch, cancel it, ask an agent something.
//!
//! The gateway feeds it frames; the admin API calls it. It owns no sockets.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use unidesk_protocol::delivery::{Arrival, Inbox};
use unidesk_protocol::{
    AgentId, Capability, ControllerFrame, Event, EventBody, Launch, LaunchId, LaunchSpec,
    LaunchState, Query, Reply, ResumePoint, RunId, Step,
};

use crate::store::{EventLog, JOB_SCHEMA, JobRecord, JobStatus, JobStore, StoreError};

pub use unidesk_agent::events::now_ms;

/// A connected agent, as `agents` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    pub id: AgentId,
    pub version: String,
    pub capabilities: Vec<Capability>,
    pub peer: String,
    pub connected_since_unix_ms: u64,
    pub last_heard_unix_ms: u64,
}

struct Connected {
    conn_id: u64,
    info: AgentInfo,
    last_heard: Arc<AtomicU64>,
    tx: mpsc::Sender<ControllerFrame>,
}

struct OpenJob {
    record: JobRecord,
    inbox: Inbox,
    log: EventLog,
    progress: Progress,
}

/// Whether a job's log holds the start and end of every step it ran: the seed allows no
/// deploy to succeed with missing progress output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Progress {
    open: Vec<Step>,
    problems: Vec<String>,
}

impl Progress {
    /// Rebuilds the check from stored events.
    pub fn from_bodies<'a>(bodies: impl IntoIterator<Item = &'a EventBody>) -> Self {
        let mut p = Progress::default();
        for b in bodies {
            p.see(b);
        }
        p
    }

    /// Notes one event.
    pub fn see(&mut self, body: &EventBody) {
        match body {
            EventBody::StepStarted { step } => {
                if self.open.contains(step) {
                    self.problems
                        .push(format!("step {} started twice", step.name()));
                }
                self.open.push(*step);
            }
            EventBody::StepFinished { step, .. } => {
                match self.open.iter().position(|s| s == step) {
                    Some(i) => {
                        self.open.remove(i);
                    }
                    None => self
                        .problems
                        .push(format!("step {} finished without a start", step.name())),
                }
            }
            _ => {}
        }
    }

    /// `Err` with what is missing, if the log is incomplete.
    pub fn complete(&self) -> Result<(), String> {
        let mut problems = self.problems.clone();
        problems.extend(
            self.open
                .iter()
                .map(|s| format!("step {} started but never finished", s.name())),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("missing progress output: {}", problems.join("; ")))
        }
    }
}

/// A hub operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("agent {0} is not connected")]
    NotConnected(AgentId),
    #[error("agent {agent} did not answer within {waited_ms} ms")]
    NoAnswer { agent: AgentId, waited_ms: u64 },
    #[error("job {0} has already finished")]
    Finished(String),
}

/// The controller's shared state.
pub struct Hub {
    store: JobStore,
    agents: Mutex<HashMap<AgentId, Connected>>,
    jobs: Mutex<HashMap<LaunchId, OpenJob>>,
    queries: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    changes: broadcast::Sender<LaunchId>,
    heartbeat_ms: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock is a bug elsewhere; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// Opens the hub over a job store, reopening every unfinished job.
    pub fn open(store: JobStore, heartbeat_ms: u32) -> Result<Arc<Self>, StoreError> {
        let mut jobs = HashMap::new();
        for record in store.list()? {
            if record.status.is_final() {
                continue;
            }
            let (log, last_seq) = store.open_events(&record.job_id)?;
            let stored = store.read_events(&record.job_id)?;
            let progress = Progress::from_bodies(stored.iter().map(|e| &e.body));
            jobs.insert(
                record.job_id.clone(),
                OpenJob {
                    record,
                    inbox: Inbox::with_last_seq(last_seq),
                    log,
                    progress,
                },
            );
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            store,
            agents: Mutex::new(HashMap::new()),
            jobs: Mutex::new(jobs),
            queries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            changes,
            heartbeat_ms,
        }))
    }

    /// The job store.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// The configured heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(u64::from(self.heartbeat_ms))
    }

    /// Job ids whose state changed (new events, status).
    pub fn subscribe(&self) -> broadcast::Receiver<LaunchId> {
        self.changes.subscribe()
    }

    /// The connected agents, sorted by id.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let agents = lock(&self.agents);
        let mut list: Vec<AgentInfo> = agents
            .values()
            .map(|c| {
                let mut info = c.info.clone();
                info.last_heard_unix_ms = c.last_heard.load(Ordering::Relaxed);
                info
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// What the Welcome of `agent` must carry: for each of its open jobs, the last stored seq.
    pub fn resume_points(&self, agent: &AgentId) -> Vec<ResumePoint> {
        lock(&self.jobs)
            .values()
            .filter(|j| &j.record.agent == agent)
            .map(|j| ResumePoint {
                launch_id: j.record.job_id.clone(),
                acked_seq: j.inbox.last_seq(),
            })
            .collect()
    }

    /// Registers a connection; a previous connection of the same agent is replaced. Returns
    /// the connection id.
    pub fn connect(
        &self,
        info: AgentInfo,
        last_heard: Arc<AtomicU64>,
        tx: mpsc::Sender<ControllerFrame>,
    ) -> u64 {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.agents).insert(
            info.id.clone(),
            Connected {
                conn_id,
                info,
                last_heard,
                tx,
            },
        );
        conn_id
    }

    /// The frames to send right after the Welcome: every open launch of this agent again
    /// (launch ids make that safe) and any cancel that is still owed.
    pub fn redeliveries(&self, agent: &AgentId) -> Vec<ControllerFrame> {
        let mut jobs = lock(&self.jobs);
        let mut frames = Vec::new();
        let mut open: Vec<&mut OpenJob> = jobs
            .values_mut()
            .filter(|j| &j.record.agent == agent)
            .collect();
        open.sort_by_key(|j| j.record.created_unix_ms);
        for job in open {
            frames.push(ControllerFrame::Launch(job.record.launch.clone()));
            if let Some(reason) = &job.record.cancel_requested {
                frames.push(ControllerFrame::Cancel {
                    launch_id: job.record.job_id.clone(),
                    reason: reason.clone(),
                });
            }
            if job.record.status == JobStatus::Queued {
                job.record.status = JobStatus::Dispatched;
                job.record.updated_unix_ms = now_ms();
                if let Err(e) = self.store.save(&job.record) {
                    tracing::error!(job = %job.record.job_id, error = %e, "cannot save job");
                }
            }
        }
        frames
    }

    /// Unregisters a connection (unless a newer one replaced it).
    pub fn disconnect(&self, agent: &AgentId, conn_id: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(agent).is_some_and(|c| c.conn_id == conn_id) {
            agents.remove(agent);
        }
    }

    fn sender(&self, agent: &AgentId) -> Option<mpsc::Sender<ControllerFrame>> {
        lock(&self.agents).get(agent).map(|c| c.tx.clone())
    }

    /// Records a new job for `spec` on `agent` and sends it if the agent is connected.
    pub async fn submit(
        &self,
        agent: &AgentId,
        spec: LaunchSpec,
        deadline: Duration,
    ) -> Result<JobRecord, HubError> {
        let now = now_ms();
        // The connection is looked up and the job registered in one critical section of
        // `jobs`. A connection registered after the lookup gathers its `redeliveries` under
        // the same lock, so it finds this job; one registered before it is the one used here.
        // Otherwise a launch handed to a connection being replaced would reach no one.
        let (record, tx) = {
            let mut jobs = lock(&self.jobs);
            // Every open job's record is stored before it is registered, so the store
            // alone knows every id in use.
            let job_id = loop {
                let id = new_job_id(now);
                if !self.store.exists(&id) {
                    break id;
                }
            };
            let run_id = RunId::new(job_id.as_str()).map_err(|e| {
                HubError::Store(StoreError::Corrupt {
                    path: job_id.as_str().into(),
                    reason: e.to_string(),
                })
            })?;
            let launch = Launch {
                launch_id: job_id.clone(),
                run_id: run_id.clone(),
                deadline_unix_ms: now + u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX / 2),
                spec,
            };
            let tx = self.sender(agent);
            // One durable write: the record says whether the launch goes out now or waits.
            let record = JobRecord {
                schema: JOB_SCHEMA,
                job_id: job_id.clone(),
                kind: launch.spec.kind(),
                agent: agent.clone(),
                run_id,
                status: if tx.is_some() {
                    JobStatus::Dispatched
                } else {
                    JobStatus::Queued
                },
                created_unix_ms: now,
                updated_unix_ms: now,
                reason: None,
                cancel_requested: None,
                result: None,
                launch,
            };
            self.store.save(&record)?;
            let (log, _) = self.store.open_events(&job_id)?;
            jobs.insert(
                job_id,
                OpenJob {
                    record: record.clone(),
                    inbox: Inbox::default(),
                    log,
                    progress: Progress::default(),
                },
            );
            (record, tx)
        };
        if let Some(tx) = tx {
            // If the connection drops now, the launch is sent again on reconnect.
            let _ = tx
                .send(ControllerFrame::Launch(record.launch.clone()))
                .await;
        }
        tracing::info!(job = %record.job_id, agent = %agent, kind = ?record.kind, "job submitted");
        let _ = self.changes.send(record.job_id.clone());
        Ok(record)
    }

    /// Asks for a job to be cancelled.
    pub async fn cancel(&self, job_id: &str, reason: &str) -> Result<JobRecord, HubError> {
        let record = self.store.load(job_id)?;
        if record.status.is_final() {
            return Err(HubError::Finished(job_id.to_string()));
        }
        let updated = {
            let mut jobs = lock(&self.jobs);
            let Some(job) = jobs.get_mut(&record.job_id) else {
                return Err(HubError::Finished(job_id.to_string()));
            };
            job.record.cancel_requested = Some(reason.to_string());
            job.record.updated_unix_ms = now_ms();
            if job.record.status == JobStatus::Queued {
                // Never sent: nothing runs, so it ends here.
                job.record.status = JobStatus::Cancelled;
                job.record.reason = Some(format!("cancelled before dispatch: {reason}"));
            }
            self.store.save(&job.record)?;
            let record = job.record.clone();
            if record.status.is_final() {
                crate::metrics::job_finished(&record);
                jobs.remove(&record.job_id);
            }
            record
        };
        if !updated.status.is_final()
            && let Some(tx) = self.sender(&updated.agent)
        {
            let _ = tx
                .send(ControllerFrame::Cancel {
                    launch_id: updated.job_id.clone(),
                    reason: reason.to_string(),
                })
                .await;
        }
        let _ = self.changes.send(updated.job_id.clone());
        Ok(updated)
    }

    /// Ends queued or dispatched jobs whose deadline passed without the agent accepting them.
    pub fn expire(&self, now: u64) {
        let mut jobs = lock(&self.jobs);
        let expired: Vec<LaunchId> = jobs
            .values()
            .filter(|j| {
                matches!(j.record.status, JobStatus::Queued | JobStatus::Dispatched)
                    && now > j.record.launch.deadline_unix_ms
            })
            .map(|j| j.record.job_id.clone())
            .collect();
        for id in expired {
            if let Some(mut job) = jobs.remove(&id) {
                job.record.status = JobStatus::TimedOut;
                job.record.reason =
                    Some("the agent did not accept the launch before its deadline".into());
                job.record.updated_unix_ms = now;
                if let Err(e) = self.store.save(&job.record) {
                    tracing::error!(job = %id, error = %e, "cannot save job");
                }
                crate::metrics::job_finished(&job.record);
                tracing::warn!(job = %id, "job timed out waiting for its agent");
                let _ = self.changes.send(id);
            }
        }
    }

    /// Stores a batch of events of one launch and returns the seq to acknowledge.
    pub fn store_events(&self, events: Vec<Event>) -> Option<(LaunchId, u64)> {
        let first = events.first()?;
        let launch_id = first.launch_id.clone();
        let mut jobs = lock(&self.jobs);
        let Some(job) = jobs.get_mut(&launch_id) else {
            drop(jobs);
            return self.late_events(&launch_id, &events);
        };
        let mut fresh = Vec::new();
        let mut expected = job.inbox.last_seq() + 1;
        let mut gap = None;
        for event in events {
            if event.seq < expected {
                continue;
            }
            if event.seq > expected {
                gap = Some(event.seq);
                break;
            }
            expected += 1;
            fresh.push(event);
        }
        if let Some(seq) = gap {
            tracing::warn!(launch = %launch_id, expected, got = seq, "event gap; waiting for resend");
        }
        if !fresh.is_empty() {
            if let Err(e) = job.log.append(&fresh) {
                // Not acknowledged, so the agent keeps the events and resends them.
                tracing::error!(launch = %launch_id, error = %e, "cannot store events");
                return None;
            }
            for e in &fresh {
                job.progress.see(&e.body);
                match job.inbox.offer(e.seq) {
                    Arrival::Store => job.inbox.stored(e.seq),
                    other => tracing::error!(?other, "inbox disagrees with the batch filter"),
                }
            }
        }
        let ack = job.inbox.last_seq();
        let finished = fresh.iter().find_map(|e| match &e.body {
            EventBody::Finished(r) => Some(r.clone()),
            _ => None,
        });
        if !fresh.is_empty() && job.record.status == JobStatus::Dispatched {
            job.record.status = JobStatus::Running;
        }
        if let Some(result) = finished {
            job.record.status = JobStatus::from_launch(result.status);
            job.record.reason = result.error.clone();
            if result.status.is_ok()
                && let Err(missing) = job.progress.complete()
            {
                tracing::error!(job = %launch_id, missing, "refusing success without full progress");
                job.record.status = JobStatus::Failed;
                job.record.reason = Some(missing);
            }
            job.record.result = Some(result);
            job.record.updated_unix_ms = now_ms();
            if let Err(e) = self.store.save(&job.record) {
                tracing::error!(launch = %launch_id, error = %e, "cannot save job");
            }
            crate::metrics::job_finished(&job.record);
            tracing::info!(job = %launch_id, status = ?job.record.status, "job finished");
            jobs.remove(&launch_id);
        }
        drop(jobs);
        let _ = self.changes.send(launch_id.clone());
        Some((launch_id, ack))
    }

    /// Events for a job that is no longer open: acknowledge what is already stored (a lost
    /// ack), refuse to store anything new.
    fn late_events(&self, launch_id: &LaunchId, events: &[Event]) -> Option<(LaunchId, u64)> {
        let stored = self.store.read_events(launch_id).ok()?;
        let last = stored.last().map_or(0, |e| e.seq);
        if last == 0 {
            tracing::warn!(launch = %launch_id, count = events.len(), "events for an unknown job dropped");
            return None;
        }
        Some((launch_id.clone(), last))
    }

    /// The agent accepted a launch.
    pub fn accepted(&self, launch_id: &LaunchId, state: &LaunchState) {
        let mut jobs = lock(&self.jobs);
        if let Some(job) = jobs.get_mut(launch_id)
            && matches!(job.record.status, JobStatus::Queued | JobStatus::Dispatched)
        {
            job.record.status = JobStatus::Running;
            job.record.updated_unix_ms = now_ms();
            if let Err(e) = self.store.save(&job.record) {
                tracing::error!(launch = %launch_id, error = %e, "cannot save job");
            }
        }
        tracing::debug!(launch = %launch_id, ?state, "launch accepted");
        drop(jobs);
        let _ = self.changes.send(launch_id.clone());
    }

    /// The agent rejected a launch.
    pub fn rejected(&self, launch_id: &LaunchId, reason: &str) {
        let mut jobs = lock(&self.jobs);
        if let Some(mut job) = jobs.remove(launch_id) {
            job.record.status = JobStatus::Rejected;
            job.record.reason = Some(reason.to_string());
            job.record.updated_unix_ms = now_ms();
            crate::metrics::job_finished(&job.record);
            if let Err(e) = self.store.save(&job.record) {
                tracing::error!(launch = %launch_id, error = %e, "cannot save job");
            }
        }
        tracing::warn!(launch = %launch_id, reason, "launch rejected by agent");
        drop(jobs);
        let _ = self.changes.send(launch_id.clone());
    }

    /// Asks a connected agent a question.
    pub async fn query(
        &self,
        agent: &AgentId,
        query: Query,
        timeout: Duration,
    ) -> Result<Reply, HubError> {
        let tx = self
            .sender(agent)
            .ok_or_else(|| HubError::NotConnected(agent.clone()))?;
        let query_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.queries).insert(query_id, reply_tx);
        let no_answer = || HubError::NoAnswer {
            agent: agent.clone(),
            waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        if tx
            .send(ControllerFrame::Query { query_id, query })
            .await
            .is_err()
        {
            lock(&self.queries).remove(&query_id);
            return Err(HubError::NotConnected(agent.clone()));
        }
        let answer = tokio::time::timeout(timeout, reply_rx).await;
        lock(&self.queries).remove(&query_id);
        match answer {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err(no_answer()),
        }
    }

    /// Routes an agent's reply to whoever asked.
    pub fn reply(&self, query_id: u64, reply: Reply) {
        if let Some(waiter) = lock(&self.queries).remove(&query_id) {
            let _ = waiter.send(reply);
        }
    }
}

/// A new job id: `job-<utc timestamp>-<random>`, a valid DNS label.
fn new_job_id(now_ms: u64) -> LaunchId {
    let stamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year][month][day]-[hour][minute][second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| now_ms.to_string());
    let suffix: u32 = rand::random::<u32>() & 0xff_ffff;
    LaunchId::new(format!("job-{stamp}-{suffix:06x}"))
        .expect("a timestamp and hex digits form a valid DNS label")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_needs_every_step_started_and_finished() {
        use unidesk_protocol::StepOutcome;
        let start = |step| EventBody::StepStarted { step };
        let end = |step| EventBody::StepFinished {
            step,
            outcome: StepOutcome::Ok,
        };
        let ok = [
            start(Step::Build),
            end(Step::Build),
            start(Step::Verify),
            end(Step::Verify),
        ];
        assert_eq!(Progress::from_bodies(ok.iter()).complete(), Ok(()));
        let open = [start(Step::Build), end(Step::Build), start(Step::Verify)];
        assert_eq!(
            Progress::from_bodies(open.iter()).complete(),
            Err("missing progress output: step verify started but never finished".into())
        );
        let orphan = [end(Step::Recreate)];
        let err = Progress::from_bodies(orphan.iter()).complete().unwrap_err();
        assert!(
            err.contains("step recreate finished without a start"),
            "{err}"
        );
    }

    #[test]
    fn job_ids_are_dns_labels() {
        let id = new_job_id(1_800_000_000_000);
        assert!(id.as_str().starts_with("job-20270115-"), "{id}");
        RunId::new(id.as_str()).unwrap();
    }

    fn info(id: &AgentId) -> AgentInfo {
        AgentInfo {
            id: id.clone(),
            version: "test".into(),
            capabilities: Vec::new(),
            peer: "127.0.0.1:1".into(),
            connected_since_unix_ms: now_ms(),
            last_heard_unix_ms: now_ms(),
        }
    }

    fn launched(rx: &mut mpsc::Receiver<ControllerFrame>) -> Vec<LaunchId> {
        let mut ids = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            if let ControllerFrame::Launch(l) = frame {
                ids.push(l.launch_id);
            }
        }
        ids
    }

    /// A launch submitted while its agent reconnects reaches the new connection: either
    /// `submit` finds it, or its `redeliveries` carries the launch. Racing the two many
    /// times catches a submit that took the old connection but registered its job only
    /// after the new connection's redeliveries were gathered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_launch_submitted_during_a_reconnect_reaches_the_new_connection() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(JobStore::open(dir.path()).unwrap(), 5_000).unwrap();
        let agent = AgentId::new("racer").unwrap();
        let (tx, _old_rx) = mpsc::channel(1024);
        hub.connect(info(&agent), Arc::default(), tx);
        let mut missed = Vec::new();
        for _ in 0..200 {
            let (tx, mut rx) = mpsc::channel(1024);
            let reconnect = {
                let (hub, agent) = (hub.clone(), agent.clone());
                tokio::spawn(async move {
                    hub.connect(info(&agent), Arc::default(), tx.clone());
                    for frame in hub.redeliveries(&agent) {
                        tx.send(frame).await.unwrap();
                    }
                })
            };
            let job = hub
                .submit(
                    &agent,
                    LaunchSpec::Probe(unidesk_protocol::ProbeSpec { echo_lines: 1 }),
                    Duration::from_secs(600),
                )
                .await
                .unwrap();
            reconnect.await.unwrap();
            if !launched(&mut rx).contains(&job.job_id) {
                missed.push(job.job_id);
            }
        }
        assert!(
            missed.is_empty(),
            "launches that never reached the current connection: {missed:?}"
        );
    }
}
