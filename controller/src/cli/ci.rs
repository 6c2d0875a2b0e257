//! CI verbs: `ci run-dev-e2e` (a typed CI launch to the CI node's agent) and `ci logs <runId>`
//! (the run's files read through the agent with byte bounds).
//!
//! `run-dev-e2e` reads `deploy.json#environments.dev` from the pushed `origin/master` commit of
//! the desired-state repository (fetched into `<store.dir>/mirrors`, never a local file),
//! checks the `ci` block and the `code-queue` entry, and refuses (exit 2) before any launch.
//! The CI node is `--agent`, or else the node of the dev `code-queue` deployment in
//! `config.json`. The run id is the job id (`job-<yyyymmdd>-<hhmmss>-<6 hex>`, 26 characters),
//! so `unidesk-ci-e2e-<runId>` is a 41-character DNS label.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::{Value, json};
use unidesk_protocol::{
    AgentId, BuildBase, CiImageSpec, CiRunSpec, LaunchKind, LaunchSpec, Query, Reply, RunFile,
    RunId,
};

use super::{CliError, ConfigArg, jobs, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::desired::env as desired_env;
use crate::desired::manifest::{self, check_script_path};
use crate::desired::{Catalog, Environment};
use crate::store::{JobRecord, JobStatus};

/// The service whose image the CI script tests.
pub const CODE_QUEUE: &str = "code-queue";
/// The desired ref as the script receives it.
const DESIRED_REF: &str = "master";
/// How long the desired-state fetch may take.
/// Build time allowed on top of the script's timeout in the launch deadline.
const DEFAULT_BUILD_TIMEOUT_MS: u64 = 1_800_000;
/// Slack on top of build and script time before the launch itself times out.
const DEADLINE_SLACK_MS: u64 = 600_000;
/// How long one run-file query may take.
const QUERY_TIMEOUT_MS: u64 = 15_000;

#[derive(Debug, clap::Subcommand)]
pub enum CiCommand {
    /// Run the dev smoke CI of the pushed origin/master commit on the CI node. Prints
    /// `{ok, runId, jobId, agent, manifestCommit, temporaryNamespace, resultDir, next}`; returns
    /// once the agent accepted the launch unless --wait-ms.
    #[command(name = "run-dev-e2e")]
    RunDevE2e {
        /// Wait up to this long for the run to finish (exit 1 unless it succeeded).
        #[arg(long)]
        wait_ms: Option<u64>,
        /// Leave the temporary namespace `unidesk-ci-e2e-<runId>` in place.
        #[arg(long)]
        keep_namespace: bool,
        /// The desired-state repository URL (default: `desired.repository` of the config).
        #[arg(long, value_name = "URL")]
        repository: Option<String>,
        /// The CI node's agent (default: the node of the dev code-queue deployment).
        #[arg(long)]
        agent: Option<AgentId>,
        /// config.json (default: `desired.catalog` of the controller config).
        #[arg(long)]
        catalog: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The result, the PipelineRun name and the log tails of a CI run, read from the node.
    Logs {
        run_id: String,
        /// At most this many bytes of each file (its tail).
        #[arg(long, default_value_t = 16_384)]
        tail_bytes: u32,
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub(super) async fn run(command: CiCommand) -> Result<(), CliError> {
    match command {
        CiCommand::RunDevE2e {
            wait_ms,
            keep_namespace,
            repository,
            agent,
            catalog,
            config,
        } => {
            let config = config.load()?;
            let catalog = super::deploy::load_catalog(&config, catalog.as_deref())?;
            run_dev_e2e(
                &config,
                &catalog,
                repository,
                agent,
                keep_namespace,
                wait_ms.map(Duration::from_millis),
            )
            .await
        }
        CiCommand::Logs {
            run_id,
            tail_bytes,
            config,
        } => {
            let config = config.load()?;
            logs(&config, &run_id, tail_bytes).await
        }
    }
}

/// What `origin/master` says the CI run is.
struct Planned {
    repository: String,
    manifest_commit: String,
    spec: CiRunSpec,
    agent: AgentId,
}

fn input(e: impl Into<anyhow::Error>) -> CliError {
    CliError::Input(e.into())
}

async fn fetch_master(
    config: &ControllerConfig,
    repository: Option<String>,
) -> Result<(String, desired_env::DesiredManifest), CliError> {
    let url = repository
        .or_else(|| config.desired.as_ref()?.repository.clone())
        .ok_or_else(|| {
            input(anyhow!(
                "ci run-dev-e2e reads {} of the desired-state repository, but none is set: \
                 pass --repository URL or set desired.repository in the controller config",
                desired_env::CI_DESIRED_REF
            ))
        })?;
    super::deploy::fetch_desired(config, url, |mirror| {
        desired_env::read_master_manifest(mirror).map_err(input)
    })
    .await
}

/// Checks the manifest of the master commit and makes the launch; refusals are exit 2.
fn plan(
    repository: String,
    read: &desired_env::DesiredManifest,
    catalog: &Catalog,
    agent: Option<AgentId>,
    keep_namespace: bool,
) -> Result<Planned, CliError> {
    let at = format!(
        "deploy.json at {} ({}) of {repository}",
        desired_env::CI_DESIRED_REF,
        read.commit
    );
    let parsed = manifest::parse(&read.bytes)
        .with_context(|| at.clone())
        .map_err(CliError::Input)?;
    let ci = parsed
        .ci(Environment::Dev)
        .with_context(|| at.clone())
        .map_err(CliError::Input)?;
    // parse() checked these already; the CI runner states its own rule too.
    if let Err(why) = check_script_path(&ci.script_path) {
        return Err(input(anyhow!(
            "{at}: environments.dev.ci.scriptPath {:?}: {why}",
            ci.script_path
        )));
    }
    // The script is read from the manifest commit of this repository, so the declaration
    // must name it; a script in another repository would never be the one that runs.
    if !manifest::same_repository(&ci.repo, &repository) {
        return Err(input(anyhow!(
            "{at}: environments.dev.ci.repo {:?} is not the desired-state repository \
             {repository:?}; the CI script is taken from the manifest commit of that repository",
            ci.repo
        )));
    }
    let services = parsed
        .services_for(Some(Environment::Dev))
        .with_context(|| at.clone())
        .map_err(CliError::Input)?;
    let code_queue = services
        .iter()
        .find(|s| s.id == CODE_QUEUE)
        .ok_or_else(|| {
            input(anyhow!(
                "{at}: environments.dev.services has no {CODE_QUEUE}; the dev smoke CI requires it"
            ))
        })?;
    let commit = code_queue.full_commit().ok_or_else(|| {
        input(anyhow!(
            "{at}: {CODE_QUEUE} commitId {:?} is not a full 40-hex SHA; the dev smoke CI builds \
             exactly one commit",
            code_queue.commit_id
        ))
    })?;
    let deployment = catalog
        .deployment_for(CODE_QUEUE, Some(Environment::Dev))
        .ok_or_else(|| input(anyhow!("config.json has no dev deployment of {CODE_QUEUE}")))?;
    let dockerfile = deployment
        .dockerfile
        .clone()
        .ok_or_else(|| input(anyhow!("config.json: {CODE_QUEUE} has no dockerfile")))?;
    let base_image = deployment
        .image
        .clone()
        .ok_or_else(|| input(anyhow!("config.json: {CODE_QUEUE} has no image")))?;
    let agent = match agent {
        Some(a) => a,
        None => catalog
            .node(&deployment.node)
            .ok_or_else(|| {
                input(anyhow!(
                    "config.json: node {} of {CODE_QUEUE} is not in nodes; pass --agent",
                    deployment.node
                ))
            })?
            .agent
            .clone(),
    };
    let repo_part = base_image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map_or(base_image.as_str(), |(r, _)| r);
    let image = format!("{repo_part}:ci-{}", &commit[..12]);
    let spec = CiRunSpec {
        repo_url: repository.clone(),
        manifest_commit: read.commit.clone(),
        desired_ref: DESIRED_REF.into(),
        manifest_path: desired_env::MANIFEST_PATH.into(),
        script_path: ci.script_path.clone(),
        environment: Environment::Dev.as_str().into(),
        timeout_ms: ci.timeout_ms,
        keep_namespace,
        code_queue: CiImageSpec {
            service_id: CODE_QUEUE.into(),
            repo_url: code_queue.repo.clone(),
            commit: commit.to_owned(),
            dockerfile,
            context: deployment.context.clone().unwrap_or_else(|| ".".into()),
            image,
            build_base: deployment.build_base.as_ref().map(|b| BuildBase {
                arg: b.arg.clone(),
                candidates: b.candidates.clone(),
            }),
            build_timeout_ms: deployment
                .build_timeout_ms
                .unwrap_or(DEFAULT_BUILD_TIMEOUT_MS),
        },
    };
    Ok(Planned {
        repository,
        manifest_commit: read.commit.clone(),
        spec,
        agent,
    })
}

async fn run_dev_e2e(
    config: &ControllerConfig,
    catalog: &Catalog,
    repository: Option<String>,
    agent: Option<AgentId>,
    keep_namespace: bool,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    let (repository, read) = fetch_master(config, repository).await?;
    let planned = plan(repository, &read, catalog, agent, keep_namespace)?;
    tracing::info!(
        desired_ref = desired_env::CI_DESIRED_REF,
        commit = %planned.manifest_commit,
        blob = %read.blob,
        "read the CI declaration"
    );
    let deadline_ms =
        planned.spec.timeout_ms + planned.spec.code_queue.build_timeout_ms + DEADLINE_SLACK_MS;
    let request = AdminRequest::Launch {
        agent: planned.agent.clone(),
        spec: LaunchSpec::Ci(planned.spec.clone()),
        deadline_ms,
    };
    let data = jobs::admin(config, &request).await?;
    let record: JobRecord = serde_json::from_value(data)
        .context("the controller answered with a malformed job record")
        .map_err(CliError::Failed)?;
    let store = jobs::store(config)?;
    let run_id = record.run_id.as_str().to_owned();
    // Without --wait-ms: until the agent has accepted (or refused) the launch.
    let record = match wait {
        Some(wait) => jobs::wait_for(&store, record.job_id.as_str(), wait).await?,
        None => wait_accepted(&store, record.job_id.as_str()).await?,
    };
    let config_path = config
        .base_dir
        .join("controller.toml")
        .display()
        .to_string();
    // The node's own absolute path, asked from its agent; `null` with the reason when the
    // agent cannot answer now (the run still goes on).
    let (result_dir, result_dir_error) =
        match run_directory(config, &planned.agent, &record.run_id).await {
            Ok(path) => (json!(path), None),
            Err(why) => (Value::Null, Some(why)),
        };
    let finished = record.status.is_final();
    let ok = match wait {
        Some(_) => record.result.as_ref().is_some_and(|r| r.status.is_ok()),
        None => !finished || record.result.as_ref().is_some_and(|r| r.status.is_ok()),
    };
    output::json(&json!({
        "ok": ok,
        "runId": run_id,
        "jobId": record.job_id,
        "agent": planned.agent,
        "status": record.status,
        "repository": planned.repository,
        "desiredRef": desired_env::CI_DESIRED_REF,
        "manifestCommit": planned.manifest_commit,
        "scriptPath": planned.spec.script_path,
        "timeoutMs": planned.spec.timeout_ms,
        "codeQueueCommit": planned.spec.code_queue.commit,
        "ciImage": planned.spec.code_queue.image,
        "temporaryNamespace": format!("unidesk-ci-e2e-{run_id}"),
        "resultDir": result_dir,
        "resultDirError": result_dir_error,
        "result": record.result,
        "next": [
            format!("unidesk-controller ci logs {run_id} --config {config_path}"),
            format!("unidesk-controller job status {} --config {config_path}", record.job_id),
        ],
    }));
    if wait.is_some() && !finished {
        return Err(CliError::Failed(anyhow!(
            "CI run {run_id} is still {:?} after the wait",
            record.status
        )));
    }
    if !ok {
        return Err(CliError::Failed(anyhow!(
            "CI run {run_id} ended {:?}{}",
            record.status,
            record
                .reason
                .as_deref()
                .or(record.result.as_ref().and_then(|r| r.error.as_deref()))
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )));
    }
    Ok(())
}

/// Waits until the job left `queued`/`dispatched`: the agent accepted (or refused) it.
async fn wait_accepted(
    store: &crate::store::JobStore,
    job_id: &str,
) -> Result<JobRecord, CliError> {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let record = jobs::wait_for(store, job_id, Duration::ZERO).await?;
        let waiting = matches!(record.status, JobStatus::Queued | JobStatus::Dispatched);
        if !waiting || std::time::Instant::now() >= until {
            return Ok(record);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks `agent` where the directory of `run` is on its node.
async fn run_directory(
    config: &ControllerConfig,
    agent: &AgentId,
    run: &RunId,
) -> Result<String, String> {
    let request = AdminRequest::Query {
        agent: agent.clone(),
        query: Query::RunDirectory {
            run_id: run.clone(),
        },
        timeout_ms: QUERY_TIMEOUT_MS,
    };
    let data = jobs::admin(config, &request)
        .await
        .map_err(|e| e.to_string())?;
    match serde_json::from_value::<Reply>(data) {
        Ok(Reply::RunDirectory { path }) => Ok(path),
        Ok(Reply::Error { reason }) => Err(reason),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(format!("malformed reply: {e}")),
    }
}

/// The files `ci logs` shows, by the name it prints.
const LOG_FILES: [(&str, RunFile); 5] = [
    ("result", RunFile::Result),
    ("scriptResult", RunFile::ScriptResult),
    ("pipelineRun", RunFile::PipelineRun),
    ("launcherLog", RunFile::LauncherLog),
    ("runnerLog", RunFile::RunnerLog),
];

async fn logs(config: &ControllerConfig, run_id: &str, tail_bytes: u32) -> Result<(), CliError> {
    let run = RunId::new(run_id).map_err(|e| input(anyhow!("run id {run_id:?}: {e}")))?;
    let store = jobs::store(config)?;
    let jobs = store.list().map_err(|e| CliError::Failed(e.into()))?;
    let record = jobs
        .iter()
        .rev()
        .find(|j| j.run_id == run && j.kind == LaunchKind::Ci)
        .ok_or_else(|| input(anyhow!("no CI run {run_id} in the job store")))?;
    let mut files = serde_json::Map::new();
    let mut reached = false;
    let mut last_error = None;
    for (name, file) in LOG_FILES {
        let request = AdminRequest::Query {
            agent: record.agent.clone(),
            query: Query::ReadRun {
                run_id: run.clone(),
                file,
                max_bytes: tail_bytes,
            },
            timeout_ms: QUERY_TIMEOUT_MS,
        };
        let entry = match jobs::admin(config, &request).await {
            Ok(data) => {
                reached = true;
                match serde_json::from_value::<Reply>(data) {
                    Ok(Reply::RunFile { bytes, truncated }) => {
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        let parsed = match file {
                            RunFile::Result | RunFile::ScriptResult if !truncated => {
                                serde_json::from_str::<Value>(&text).ok()
                            }
                            _ => None,
                        };
                        match (file, parsed) {
                            (RunFile::PipelineRun, _) => json!(text.trim()),
                            (_, Some(v)) => v,
                            _ => json!({"tail": text, "truncated": truncated}),
                        }
                    }
                    Ok(other) => json!({"error": format!("unexpected reply {other:?}")}),
                    Err(e) => json!({"error": format!("malformed reply: {e}")}),
                }
            }
            Err(CliError::Unreachable(e)) => return Err(CliError::Unreachable(e)),
            Err(e) => {
                let text = e.to_string();
                last_error = Some(text.clone());
                Value::Null
            }
        };
        files.insert(name.to_owned(), entry);
    }
    if !reached {
        return Err(CliError::Unreachable(anyhow!(
            "agent {} did not answer for run {run_id}: {}",
            record.agent,
            last_error.unwrap_or_default()
        )));
    }
    let pipeline_run = files.get("pipelineRun").cloned().unwrap_or(Value::Null);
    output::json(&json!({
        "ok": true,
        "runId": run_id,
        "jobId": record.job_id,
        "agent": record.agent,
        "jobStatus": record.status,
        "pipelineRun": pipeline_run,
        "files": files,
        "missing": files.iter().filter(|(_, v)| v.is_null()).map(|(k, _)| k.clone()).collect::<Vec<_>>(),
    }));
    Ok(())
}
