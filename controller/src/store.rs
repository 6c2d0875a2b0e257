//! The job store: `<store>/jobs/<jobId>/job.json` (the record, replaced atomically) and
//! `<store>/jobs/<jobId>/events.jsonl` (every event of the job's launch, one JSON object a
//! line, appended and fsynced before the controller acknowledges it).
//!
//! A job is one launch on one agent; the job id is the launch id. The store survives the
//! CLI exiting and the controller restarting: everything `job status` shows is read back from
//! these files. A torn last line (a crash mid-append) is cut off when the job is opened.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unidesk_agent::atomic::write_file;
use unidesk_protocol::{
    AgentId, Event, EventBody, Launch, LaunchId, LaunchKind, LaunchResult, LaunchStatus, RunId,
};

/// The job record format version.
pub const JOB_SCHEMA: u32 = 1;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0} does not exist")]
    NotFound(String),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid job record: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Recorded; the agent is not connected yet.
    Queued,
    /// Sent to the agent; not yet accepted.
    Dispatched,
    /// Accepted by the agent.
    Running,
    Succeeded,
    Noop,
    Failed,
    Cancelled,
    TimedOut,
    Interrupted,
    /// The agent refused it before anything ran.
    Rejected,
}

impl JobStatus {
    /// Whether the job can still change.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobStatus::Queued | JobStatus::Dispatched | JobStatus::Running
        )
    }

    /// The job status a finished launch gives.
    pub fn from_launch(status: LaunchStatus) -> Self {
        match status {
            LaunchStatus::Succeeded => JobStatus::Succeeded,
            LaunchStatus::Noop => JobStatus::Noop,
            LaunchStatus::Failed => JobStatus::Failed,
            LaunchStatus::Cancelled => JobStatus::Cancelled,
            LaunchStatus::TimedOut => JobStatus::TimedOut,
            LaunchStatus::Interrupted => JobStatus::Interrupted,
        }
    }
}

/// `job.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobRecord {
    pub schema: u32,
    pub job_id: LaunchId,
    pub kind: LaunchKind,
    pub agent: AgentId,
    pub run_id: RunId,
    pub status: JobStatus,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Why the job is in its status, when that needs saying (rejection, cancel request).
    pub reason: Option<String>,
    /// A cancel asked for and not yet answered by the agent's final event.
    pub cancel_requested: Option<String>,
    pub result: Option<LaunchResult>,
    pub launch: Launch,
}

/// One line of `events.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub body: EventBody,
}

/// The jobs directory.
#[derive(Debug, Clone)]
pub struct JobStore {
    root: PathBuf,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

impl JobStore {
    /// Opens (creating if needed) the store under `dir/jobs`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let root = dir.join("jobs");
        std::fs::create_dir_all(&root).map_err(io("create", &root))?;
        Ok(Self { root })
    }

    fn job_dir(&self, job_id: &LaunchId) -> PathBuf {
        self.root.join(job_id.as_str())
    }

    /// Whether anything is stored under this job id (a record, or a directory about to hold one).
    pub fn exists(&self, job_id: &LaunchId) -> bool {
        self.job_dir(job_id).exists()
    }

    /// The path of a job's event log.
    pub fn events_path(&self, job_id: &LaunchId) -> PathBuf {
        self.job_dir(job_id).join("events.jsonl")
    }

    /// Writes a job record (creating its directory on first write).
    pub fn save(&self, record: &JobRecord) -> Result<(), StoreError> {
        let dir = self.job_dir(&record.job_id);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let path = dir.join("job.json");
        let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_file(&path, &bytes, 0o644).map_err(io("write", &path))
    }

    /// Reads a job record.
    pub fn load(&self, job_id: &str) -> Result<JobRecord, StoreError> {
        let id = LaunchId::new(job_id).map_err(|_| StoreError::NotFound(job_id.to_string()))?;
        let path = self.job_dir(&id).join("job.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(job_id.to_string()));
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Every job record, oldest first.
    pub fn list(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io("list", &self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match self.load(&name) {
                Ok(job) => jobs.push(job),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => tracing::warn!(error = %e, "skipping unreadable job"),
            }
        }
        jobs.sort_by(|a, b| {
            (a.created_unix_ms, a.job_id.as_str()).cmp(&(b.created_unix_ms, b.job_id.as_str()))
        });
        Ok(jobs)
    }

    /// Opens a job's event log for appending, cutting a torn last line, and returns it with
    /// the last complete seq.
    pub fn open_events(&self, job_id: &LaunchId) -> Result<(EventLog, u64), StoreError> {
        let path = self.events_path(job_id);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io("read", &path))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            tracing::warn!(path = %path.display(), cut = text.len() - complete, "cutting a torn event line");
            file.set_len(complete as u64)
                .map_err(io("truncate", &path))?;
            file.seek(SeekFrom::End(0)).map_err(io("seek", &path))?;
        }
        let mut last = 0;
        for line in text[..complete]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            match serde_json::from_slice::<StoredEvent>(line) {
                Ok(e) => last = e.seq,
                Err(e) => {
                    return Err(StoreError::Corrupt {
                        path,
                        reason: format!("line after seq {last}: {e}"),
                    });
                }
            }
        }
        Ok((EventLog { file, path }, last))
    }

    /// Reads every stored event of a job.
    pub fn read_events(&self, job_id: &LaunchId) -> Result<Vec<StoredEvent>, StoreError> {
        let path = self.events_path(job_id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let mut events = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(io("read", &path))?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str(&line) {
                Ok(e) => events.push(e),
                // A torn last line is not an event yet.
                Err(_) => break,
            }
        }
        Ok(events)
    }

    /// The last `max_bytes` of a job's event log, starting at a line boundary.
    pub fn tail_events(&self, job_id: &LaunchId, max_bytes: u64) -> Result<String, StoreError> {
        let path = self.events_path(job_id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let len = file.metadata().map_err(io("stat", &path))?.len();
        let start = len.saturating_sub(max_bytes);
        file.seek(SeekFrom::Start(start))
            .map_err(io("seek", &path))?;
        let mut buf = Vec::new();
        file.take(max_bytes)
            .read_to_end(&mut buf)
            .map_err(io("read", &path))?;
        let from = if start > 0 {
            buf.iter()
                .position(|&b| b == b'\n')
                .map_or(buf.len(), |i| i + 1)
        } else {
            0
        };
        Ok(String::from_utf8_lossy(&buf[from..]).into_owned())
    }
}

/// An open event log.
#[derive(Debug)]
pub struct EventLog {
    file: File,
    path: PathBuf,
}

impl EventLog {
    /// Appends events and makes them durable; only then may they be acknowledged.
    pub fn append(&mut self, events: &[Event]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for e in events {
            let line = StoredEvent {
                seq: e.seq,
                time_unix_ms: e.time_unix_ms,
                body: e.body.clone(),
            };
            serde_json::to_writer(&mut buf, &line).map_err(|err| StoreError::Corrupt {
                path: self.path.clone(),
                reason: err.to_string(),
            })?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .map_err(io("append to", &self.path))?;
        self.file.sync_data().map_err(io("sync", &self.path))
    }
}

/// Renders one stored event as a human-readable log line.
pub fn render_event(e: &StoredEvent) -> String {
    match &e.body {
        EventBody::Log {
            step: Some(s),
            line,
        } => format!("[{}] {line}", s.name()),
        EventBody::Log { step: None, line } => line.clone(),
        EventBody::StepStarted { step } => format!("step={} started", step.name()),
        EventBody::StepFinished { step, outcome } => match outcome {
            unidesk_protocol::StepOutcome::Ok => format!("step={} finished ok", step.name()),
            unidesk_protocol::StepOutcome::Skipped { reason } => {
                format!("step={} skipped: {reason}", step.name())
            }
            unidesk_protocol::StepOutcome::Failed { reason } => {
                format!("step={} failed: {reason}", step.name())
            }
        },
        EventBody::Finished(r) => match &r.error {
            Some(err) => format!("finished status={} error={err}", r.status.name()),
            None => format!("finished status={}", r.status.name()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unidesk_protocol::{LaunchSpec, ProbeSpec};

    fn record(id: &str) -> JobRecord {
        let launch = Launch {
            launch_id: LaunchId::new(id).unwrap(),
            run_id: RunId::new(id).unwrap(),
            deadline_unix_ms: 5,
            spec: LaunchSpec::Probe(ProbeSpec { echo_lines: 1 }),
        };
        JobRecord {
            schema: JOB_SCHEMA,
            job_id: launch.launch_id.clone(),
            kind: LaunchKind::Probe,
            agent: AgentId::new("a").unwrap(),
            run_id: launch.run_id.clone(),
            status: JobStatus::Queued,
            created_unix_ms: 1,
            updated_unix_ms: 1,
            reason: None,
            cancel_requested: None,
            result: None,
            launch,
        }
    }

    fn event(id: &LaunchId, seq: u64) -> Event {
        Event {
            launch_id: id.clone(),
            seq,
            time_unix_ms: seq,
            body: EventBody::Log {
                step: None,
                line: format!("line {seq}"),
            },
        }
    }

    #[test]
    fn records_and_events_survive_reopen_and_torn_lines_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let job = record("job-1");
        store.save(&job).unwrap();
        assert_eq!(store.load("job-1").unwrap(), job);
        assert!(matches!(store.load("nope"), Err(StoreError::NotFound(_))));
        assert!(matches!(store.load("../etc"), Err(StoreError::NotFound(_))));

        let (mut log, last) = store.open_events(&job.job_id).unwrap();
        assert_eq!(last, 0);
        log.append(&[event(&job.job_id, 1), event(&job.job_id, 2)])
            .unwrap();
        drop(log);
        // A crash mid-append leaves half a line.
        let path = store.events_path(&job.job_id);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        let (_, last) = store.open_events(&job.job_id).unwrap();
        assert_eq!(last, 2);
        assert_eq!(store.read_events(&job.job_id).unwrap().len(), 2);
        let tail = store.tail_events(&job.job_id, 100).unwrap();
        assert!(
            tail.contains("line 2") && !tail.contains("line 1"),
            "{tail}"
        );
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
