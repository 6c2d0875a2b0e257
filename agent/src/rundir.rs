//! Run directories: `runs/<runId>/` holds what runbooks read after the fact.
//!
//! Format version [`RUNDIR_FORMAT`] (documented in the README):
//! - `launch.json` — the launch as received (written once, atomically);
//! - `events.jsonl` — every event, one JSON object a line (`seq`, `timeUnixMs`, `body`),
//!   appended before the event is sent;
//! - `<step>.log` — the plain log lines of each step;
//! - `result.json` — the final result (written once, atomically);
//! - `delivered` — present once the controller acknowledged every event;
//! - CI runs also: `launcher.log` (the agent's own decisions), `runner.log` (the script's
//!   stdout and stderr) and `script/` (the `--result-dir` the script writes `pipelinerun.txt`
//!   and its own `result.json` into; the agent's `result.json` keeps its valid fields).
//!
//! The run id is a validated DNS label, so it cannot name anything outside `runs/`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use unidesk_protocol::{
    Event, EventBody, Launch, LaunchId, LaunchKind, LaunchStatus, RunFile, RunId, Step,
};

use crate::atomic::write_file;

/// The directory of a CI run the script writes into (its `--result-dir`).
pub const CI_RESULT_DIR: &str = "script";

/// The version of the run directory format. Format 2: a CI run's `result.json` carries the CI
/// status in `status` and the launch status in `launchStatus` (format 1 had them in
/// `ciStatus` and `status`); both read back.
pub const RUNDIR_FORMAT: u32 = 2;

/// A run directory operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("run {0} does not exist")]
    NotFound(RunId),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + use<> {
    let path = path.to_path_buf();
    move |source| RunDirError::Io {
        action,
        path,
        source,
    }
}

/// One line of `events.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub body: EventBody,
}

/// `result.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ResultFile", try_from = "ResultFile")]
pub struct RunResult {
    pub format: u32,
    pub ok: bool,
    pub status: LaunchStatus,
    pub run_id: RunId,
    pub launch_id: LaunchId,
    pub kind: LaunchKind,
    pub service: Option<String>,
    pub requested_commit: Option<String>,
    pub resolved_commit: Option<String>,
    pub image: Option<String>,
    pub image_id: Option<String>,
    /// Milliseconds each step took, in the order they ran.
    pub timings: Vec<StepTiming>,
    pub error: Option<String>,
    pub finished_unix_ms: u64,
    /// What a CI run proved, at the top level of `result.json` (CI launches only).
    pub ci: Option<CiRecord>,
}

/// `result.json` as written: `status` is the CI status for CI runs (the seed's field) and the
/// launch status otherwise; `launchStatus` keeps the launch status of CI runs.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultFile {
    format: u32,
    ok: bool,
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    launch_status: Option<LaunchStatus>,
    run_id: RunId,
    launch_id: LaunchId,
    kind: LaunchKind,
    service: Option<String>,
    requested_commit: Option<String>,
    resolved_commit: Option<String>,
    image: Option<String>,
    image_id: Option<String>,
    timings: Vec<StepTiming>,
    error: Option<String>,
    finished_unix_ms: u64,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    ci: Option<CiRecord>,
}

impl From<RunResult> for ResultFile {
    fn from(r: RunResult) -> Self {
        let (status, launch_status) = match &r.ci {
            Some(ci) => (ci.ci_status.clone(), Some(r.status)),
            None => (r.status.name().to_owned(), None),
        };
        ResultFile {
            format: r.format,
            ok: r.ok,
            status,
            launch_status,
            run_id: r.run_id,
            launch_id: r.launch_id,
            kind: r.kind,
            service: r.service,
            requested_commit: r.requested_commit,
            resolved_commit: r.resolved_commit,
            image: r.image,
            image_id: r.image_id,
            timings: r.timings,
            error: r.error,
            finished_unix_ms: r.finished_unix_ms,
            ci: r.ci,
        }
    }
}

impl TryFrom<ResultFile> for RunResult {
    type Error = String;

    fn try_from(f: ResultFile) -> Result<Self, String> {
        // Format 2 CI results name the launch status apart; everything else has it in `status`.
        let status = match f.launch_status {
            Some(s) => s,
            None => serde_json::from_value(serde_json::Value::String(f.status.clone()))
                .map_err(|_| format!("status {:?} is not a launch status", f.status))?,
        };
        let ci = f.ci.map(|mut ci| {
            // Format 1 wrote `ciStatus`; format 2 writes the CI status in `status`.
            if ci.ci_status.is_empty() {
                ci.ci_status = f.status.clone();
            }
            ci
        });
        Ok(RunResult {
            format: f.format,
            ok: f.ok,
            status,
            run_id: f.run_id,
            launch_id: f.launch_id,
            kind: f.kind,
            service: f.service,
            requested_commit: f.requested_commit,
            resolved_commit: f.resolved_commit,
            image: f.image,
            image_id: f.image_id,
            timings: f.timings,
            error: f.error,
            finished_unix_ms: f.finished_unix_ms,
            ci,
        })
    }
}

/// The CI part of `result.json`: the seed's fields (`ok` and `runId` are the common ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiRecord {
    /// `succeeded`, `failed`, `timeout` or `isolation-violated`; written as the top-level
    /// `status` (format 1 wrote it as `ciStatus`, which still reads back).
    #[serde(default, skip_serializing)]
    pub ci_status: String,
    pub manifest_commit: String,
    pub pipeline_run: Option<String>,
    pub temporary_namespace: String,
    /// Whether the agent deleted the temporary namespace (false with `--keep-namespace`).
    pub namespace_deleted: bool,
    /// RFC 3339 UTC.
    pub finished_at: String,
    /// The script's exit status (`None` when it was killed or never started).
    pub exit_status: Option<i32>,
    /// Objects of `unidesk`/`unidesk-dev` that changed while the script ran.
    pub isolation_changes: Vec<String>,
    /// The Code Queue image the script was given, and whether an existing one was reused.
    pub ci_image: Option<String>,
    pub ci_image_reused: Option<bool>,
    /// The script's own `result.json` when it wrote a valid JSON object.
    pub script_result: Option<serde_json::Value>,
}

/// How long one step took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepTiming {
    pub step: Step,
    pub millis: u64,
    pub ok: bool,
}

/// The runs directory.
#[derive(Debug, Clone)]
pub struct Runs {
    root: PathBuf,
}

impl Runs {
    /// Opens (creating) the runs directory.
    pub fn open(root: &Path) -> Result<Self, RunDirError> {
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The directory of one run.
    pub fn dir(&self, run: &RunId) -> PathBuf {
        self.root.join(run.as_str())
    }

    /// Creates a run directory and records its launch.
    pub fn create(&self, launch: &Launch) -> Result<RunWriter, RunDirError> {
        let dir = self.dir(&launch.run_id);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let path = dir.join("launch.json");
        let bytes = serde_json::to_vec_pretty(launch).map_err(|e| RunDirError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_file(&path, &bytes, 0o644).map_err(io("write", &path))?;
        RunWriter::open(dir)
    }

    /// Every run on disk with its launch, result (if finished) and last event seq.
    pub fn scan(&self) -> Result<Vec<RunOnDisk>, RunDirError> {
        let mut runs = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io("list", &self.root))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let launch_path = dir.join("launch.json");
            let Ok(bytes) = std::fs::read(&launch_path) else {
                continue;
            };
            let launch: Launch = match serde_json::from_slice(&bytes) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(path = %launch_path.display(), error = %e, "skipping malformed run");
                    continue;
                }
            };
            let result = read_json::<RunResult>(&dir.join("result.json"))?;
            let last_seq = read_events(&dir, 0)?.last().map_or(0, |e| e.seq);
            runs.push(RunOnDisk {
                delivered: dir.join("delivered").exists(),
                launch,
                result,
                last_seq,
                dir,
            });
        }
        Ok(runs)
    }

    /// The absolute directory of an existing run (one that recorded its launch).
    pub fn locate(&self, run: &RunId) -> Result<PathBuf, RunDirError> {
        let dir = self.dir(run);
        if !dir.join("launch.json").exists() {
            return Err(RunDirError::NotFound(run.clone()));
        }
        std::path::absolute(&dir).map_err(io("resolve", &dir))
    }

    /// Reads the tail of one file of a run, at most `max_bytes`.
    pub fn read_tail(
        &self,
        run: &RunId,
        file: RunFile,
        max_bytes: u32,
    ) -> Result<(Vec<u8>, bool), RunDirError> {
        let dir = self.locate(run)?;
        let name = match file {
            RunFile::Result => "result.json".to_string(),
            RunFile::Events => "events.jsonl".to_string(),
            RunFile::StepLog(step) => format!("{}.log", step.name()),
            RunFile::LauncherLog => "launcher.log".to_string(),
            RunFile::RunnerLog => "runner.log".to_string(),
            RunFile::PipelineRun => format!("{CI_RESULT_DIR}/pipelinerun.txt"),
            RunFile::ScriptResult => format!("{CI_RESULT_DIR}/result.json"),
        };
        let path = dir.join(name);
        let mut f = File::open(&path).map_err(io("open", &path))?;
        let len = f.metadata().map_err(io("stat", &path))?.len();
        let start = len.saturating_sub(u64::from(max_bytes));
        f.seek(SeekFrom::Start(start)).map_err(io("seek", &path))?;
        let mut buf = Vec::new();
        f.take(u64::from(max_bytes))
            .read_to_end(&mut buf)
            .map_err(io("read", &path))?;
        Ok((buf, start > 0))
    }
}

/// What a scan found of one run.
#[derive(Debug, Clone)]
pub struct RunOnDisk {
    pub dir: PathBuf,
    pub launch: Launch,
    pub result: Option<RunResult>,
    pub last_seq: u64,
    pub delivered: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, RunDirError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RunDirError::Malformed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// The events of a run after `after_seq`, stopping at a torn last line.
pub fn read_events(dir: &Path, after_seq: u64) -> Result<Vec<EventLine>, RunDirError> {
    let path = dir.join("events.jsonl");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("open", &path)(e)),
    };
    let mut events = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io("read", &path))?;
        let Ok(event) = serde_json::from_str::<EventLine>(&line) else {
            break;
        };
        if event.seq > after_seq {
            events.push(event);
        }
    }
    Ok(events)
}

/// The step a run was in when its events stop: the last step started and not finished.
/// `None` when every started step finished (or none started). Pure; an agent restart uses it
/// to say what the restart interrupted.
pub fn unfinished_step(events: &[EventLine]) -> Option<Step> {
    let mut current = None;
    for event in events {
        match &event.body {
            EventBody::StepStarted { step } => current = Some(*step),
            EventBody::StepFinished { step, .. } if current == Some(*step) => current = None,
            _ => {}
        }
    }
    current
}

/// Appends to one run's files.
#[derive(Debug)]
pub struct RunWriter {
    dir: PathBuf,
    events: File,
}

impl RunWriter {
    /// Opens the files of an existing run directory for appending, cutting a torn last line.
    pub fn open(dir: PathBuf) -> Result<Self, RunDirError> {
        let path = dir.join("events.jsonl");
        let mut events = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut text = Vec::new();
        events.read_to_end(&mut text).map_err(io("read", &path))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            events
                .set_len(complete as u64)
                .map_err(io("truncate", &path))?;
        }
        Ok(Self { dir, events })
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one event (and, for a step's log line, the step log). Written before sending.
    pub fn append(&mut self, event: &Event) -> Result<(), RunDirError> {
        let line = EventLine {
            seq: event.seq,
            time_unix_ms: event.time_unix_ms,
            body: event.body.clone(),
        };
        let path = self.dir.join("events.jsonl");
        let mut bytes = serde_json::to_vec(&line).map_err(|e| RunDirError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        // A failed append (a full disk) must not leave a torn line that later lines follow:
        // cut the file back to where it was.
        let before = self.events.metadata().map(|m| m.len());
        if let Err(e) = self.events.write_all(&bytes) {
            if let Ok(len) = before {
                let _ = self.events.set_len(len);
            }
            return Err(io("append to", &path)(e));
        }
        if let EventBody::Log {
            step: Some(step),
            line,
        } = &event.body
        {
            let path = self.dir.join(format!("{}.log", step.name()));
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .map_err(io("open", &path))?;
            f.write_all(format!("{line}\n").as_bytes())
                .map_err(io("append to", &path))?;
        }
        Ok(())
    }

    /// Writes `result.json` atomically.
    pub fn write_result(&self, result: &RunResult) -> Result<(), RunDirError> {
        let path = self.dir.join("result.json");
        let mut bytes = serde_json::to_vec_pretty(result).map_err(|e| RunDirError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        self.events.sync_data().map_err(io("sync", &path))?;
        write_file(&path, &bytes, 0o644).map_err(io("write", &path))
    }

    /// Marks every event as acknowledged by the controller.
    pub fn mark_delivered(&self) -> Result<(), RunDirError> {
        let path = self.dir.join("delivered");
        write_file(&path, b"", 0o644).map_err(io("write", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unidesk_protocol::{LaunchSpec, ProbeSpec};

    #[test]
    fn ci_fields_sit_at_the_top_of_result_json_and_read_back() {
        let base = RunResult {
            format: RUNDIR_FORMAT,
            ok: false,
            status: LaunchStatus::TimedOut,
            run_id: RunId::new("r1").unwrap(),
            launch_id: LaunchId::new("l1").unwrap(),
            kind: LaunchKind::Ci,
            service: None,
            requested_commit: None,
            resolved_commit: None,
            image: None,
            image_id: None,
            timings: Vec::new(),
            error: None,
            finished_unix_ms: 1,
            ci: None,
        };
        let plain = serde_json::to_value(&base).unwrap();
        assert_eq!(plain["status"], "timed-out");
        assert!(plain.get("ciStatus").is_none());
        assert!(plain.get("launchStatus").is_none());
        assert_eq!(serde_json::from_value::<RunResult>(plain).unwrap(), base);
        let ci = RunResult {
            ci: Some(CiRecord {
                ci_status: "timeout".into(),
                manifest_commit: "a".repeat(40),
                pipeline_run: Some("pr".into()),
                temporary_namespace: "unidesk-ci-e2e-r1".into(),
                namespace_deleted: true,
                finished_at: "2026-01-01T00:00:00Z".into(),
                exit_status: None,
                isolation_changes: Vec::new(),
                ci_image: None,
                ci_image_reused: None,
                script_result: Some(serde_json::json!({"ok": false})),
            }),
            ..base.clone()
        };
        let value = serde_json::to_value(&ci).unwrap();
        // The seed's vocabulary in `status`; the launch's own beside it.
        assert_eq!(value["status"], "timeout");
        assert_eq!(value["launchStatus"], "timed-out");
        assert!(value.get("ciStatus").is_none());
        assert_eq!(value["manifestCommit"], "a".repeat(40));
        assert_eq!(value["temporaryNamespace"], "unidesk-ci-e2e-r1");
        assert_eq!(
            serde_json::from_value::<RunResult>(value.clone()).unwrap(),
            ci
        );

        // A format 1 CI result (`ciStatus` beside the launch `status`) still reads back.
        let mut v1 = value;
        let fields = v1.as_object_mut().unwrap();
        fields.insert("format".into(), 1.into());
        fields.insert("status".into(), "timed-out".into());
        fields.insert("ciStatus".into(), "timeout".into());
        fields.remove("launchStatus");
        let old = serde_json::from_value::<RunResult>(v1).unwrap();
        assert_eq!((old.status, old.ci), (LaunchStatus::TimedOut, ci.ci));

        // A status that is neither is named.
        let mut bad = serde_json::to_value(&base).unwrap();
        bad["status"] = "exploded".into();
        let err = serde_json::from_value::<RunResult>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"exploded\" is not a launch status"), "{err}");
    }

    #[test]
    fn a_run_reads_back_after_a_torn_append() {
        let dir = tempfile::tempdir().unwrap();
        let runs = Runs::open(dir.path()).unwrap();
        let launch = Launch {
            launch_id: LaunchId::new("l1").unwrap(),
            run_id: RunId::new("r1").unwrap(),
            deadline_unix_ms: 1,
            spec: LaunchSpec::Probe(ProbeSpec { echo_lines: 0 }),
        };
        let mut w = runs.create(&launch).unwrap();
        for seq in 1..=3 {
            w.append(&Event {
                launch_id: launch.launch_id.clone(),
                seq,
                time_unix_ms: 0,
                body: EventBody::Log {
                    step: Some(Step::Probe),
                    line: format!("l{seq}"),
                },
            })
            .unwrap();
        }
        drop(w);
        let path = runs.dir(&launch.run_id).join("events.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,").unwrap();
        let scan = runs.scan().unwrap();
        assert_eq!(scan.len(), 1);
        assert_eq!(scan[0].last_seq, 3);
        assert!(scan[0].result.is_none());
        let _w = RunWriter::open(runs.dir(&launch.run_id)).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
        let (tail, cut) = runs
            .read_tail(&launch.run_id, RunFile::StepLog(Step::Probe), 3)
            .unwrap();
        assert_eq!((tail, cut), (b"l3\n".to_vec(), true));
        let missing = RunId::new("nope").unwrap();
        assert!(matches!(
            runs.read_tail(&missing, RunFile::Result, 10),
            Err(RunDirError::NotFound(_))
        ));
    }

    #[test]
    fn the_unfinished_step_is_the_last_started_and_not_finished() {
        let line = |seq, body| EventLine {
            seq,
            time_unix_ms: 0,
            body,
        };
        let materialize = line(
            1,
            EventBody::StepStarted {
                step: Step::Materialize,
            },
        );
        let done = line(
            2,
            EventBody::StepFinished {
                step: Step::Materialize,
                outcome: unidesk_protocol::StepOutcome::Ok,
            },
        );
        let build = line(3, EventBody::StepStarted { step: Step::Build });
        let log = line(
            4,
            EventBody::Log {
                step: Some(Step::Build),
                line: "RUN".into(),
            },
        );
        assert_eq!(unfinished_step(&[]), None);
        assert_eq!(
            unfinished_step(std::slice::from_ref(&materialize)),
            Some(Step::Materialize)
        );
        assert_eq!(unfinished_step(&[materialize.clone(), done.clone()]), None);
        assert_eq!(
            unfinished_step(&[materialize, done, build, log]),
            Some(Step::Build)
        );
    }
}
