//! `deploy apply|plan|check`: read the desired state, join it with `config.json`, guard, and
//! launch one deploy job per service on the agent of the service's node.
//!
//! The desired state comes from a local file (`--file`, the compatibility path) or, in
//! environment mode (`--env dev|prod`), from the environment's fixed ref of the desired-state
//! repository, fetched into a controller-side mirror; never from a local file then. Planning is
//! the pure `desired` module; this file only loads files, fetches, talks to the admin socket
//! (launches, and the live-state queries `plan` and `check` send to every node's agent at
//! once) and prints JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use unidesk_agent::launch::materialize::{FetchNet, MaterializeError, Mirror, MirrorCache};

use unidesk_protocol::{AgentId, LiveService, LiveTarget, Query, Reply};

use super::{CliError, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::desired::catalog::{self, Catalog};
use crate::desired::env as desired_env;
use crate::desired::manifest::{self, Environment, Manifest};
use crate::desired::plan::{self, LiveState, Plan, PlanError};
use crate::store::JobRecord;

/// How long after the build deadline a deploy job may still run (fetch, recreate, verify).
const DEPLOY_MARGIN: Duration = Duration::from_secs(600);

/// How long fetching the desired-state repository may take.
const FETCH_DEADLINE: Duration = Duration::from_secs(300);

/// How long one agent may take to answer a live-state query (the agent bounds its own answer
/// well inside this).
const LIVE_QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// `deploy plan` or `deploy check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanVerb {
    /// The live state and the action per service.
    Plan,
    /// The same, plus drift per service; exit 1 on drift, 3 when something could not be seen.
    Check,
}

/// Options of `deploy apply`.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    pub service: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    pub wait: Option<Duration>,
}

/// Where a deploy verb takes `deploy.json` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file (`--file`).
    File(PathBuf),
    /// The environment's fixed ref of the desired-state repository (`--env`); `repository`
    /// is the `--repository` flag, else `desired.repository` is used.
    Environment {
        env: Environment,
        repository: Option<String>,
    },
}

impl Source {
    /// The environment the verb runs for, if any.
    pub fn environment(&self) -> Option<Environment> {
        match self {
            Source::File(_) => None,
            Source::Environment { env, .. } => Some(*env),
        }
    }
}

/// Which commit and blob of which repository an environment's `deploy.json` came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestOrigin {
    /// The desired-state repository, without user info.
    pub repository: String,
    /// The fixed ref read (`origin/deploy/dev` or `origin/deploy/prod`).
    pub desired_ref: &'static str,
    /// Full SHA of the commit the ref pointed at.
    pub manifest_commit: String,
    /// Git blob id of `deploy.json` in that commit.
    pub manifest_blob: String,
}

/// The desired state as read, before planning.
#[derive(Debug, Clone)]
pub struct Desired {
    pub manifest: Manifest,
    /// `None` for a local file.
    pub environment: Option<Environment>,
    /// Set in environment mode.
    pub origin: Option<ManifestOrigin>,
}

/// Loads `config.json` from `--catalog` or the controller config's `desired.catalog`.
pub fn load_catalog(config: &ControllerConfig, flag: Option<&Path>) -> Result<Catalog, CliError> {
    load_catalog_file(&catalog_path(config, flag)?)
}

/// Where config.json is: `--catalog`, else `desired.catalog` of the controller config.
pub fn catalog_path(config: &ControllerConfig, flag: Option<&Path>) -> Result<PathBuf, CliError> {
    match (flag, &config.desired) {
        (Some(p), _) => Ok(p.to_path_buf()),
        (None, Some(d)) => Ok(config.path(&d.catalog)),
        (None, None) => Err(CliError::Input(anyhow!(
            "no config.json: pass --catalog or set desired.catalog in the controller config"
        ))),
    }
}

/// Loads config.json from `path`, logging its warnings.
pub fn load_catalog_file(path: &Path) -> Result<Catalog, CliError> {
    let parsed = catalog::load(path).map_err(|e| CliError::Input(e.into()))?;
    for warning in &parsed.warnings {
        tracing::warn!("{}: {warning}", path.display());
    }
    Ok(parsed.catalog)
}

/// Loads a local `deploy.json` (the `--file` compatibility path).
pub fn load_manifest(path: &Path) -> Result<Manifest, CliError> {
    manifest::load(path).map_err(|e| CliError::Input(e.into()))
}

/// Refuses `deploy apply --env prod` before anything is fetched or contacted. The program
/// itself disables it; no config value, flag or manifest field turns it on.
pub fn refuse_prod_apply(source: &Source) -> Result<(), CliError> {
    if source.environment() == Some(Environment::Prod) {
        return Err(CliError::Input(
            anyhow::Error::new(PlanError::ProdApplyDisabled)
                .context("refused by the program before fetching or contacting any agent"),
        ));
    }
    Ok(())
}

/// Reads the desired state from `source`: the local file, or the environment's fixed ref of
/// the desired-state repository fetched into `<store.dir>/mirrors`.
pub async fn load_desired(config: &ControllerConfig, source: &Source) -> Result<Desired, CliError> {
    let (env, flag) = match source {
        Source::File(path) => {
            return Ok(Desired {
                manifest: load_manifest(path)?,
                environment: None,
                origin: None,
            });
        }
        Source::Environment { env, repository } => (*env, repository.as_deref()),
    };
    let url = flag
        .or_else(|| config.desired.as_ref()?.repository.as_deref())
        .ok_or_else(|| {
            CliError::Input(anyhow!(
                "--env {env} reads {} of the desired-state repository, but none is set: pass \
                 --repository URL or set desired.repository in the controller config",
                env.desired_ref()
            ))
        })?
        .to_owned();
    let (repository, read) = fetch_desired(config, url, move |mirror| {
        desired_env::read_manifest(mirror, env).map_err(|e| CliError::Input(e.into()))
    })
    .await?;
    let manifest = manifest::parse(&read.bytes)
        .with_context(|| {
            format!(
                "deploy.json at {} ({}) of {repository}",
                env.desired_ref(),
                read.commit
            )
        })
        .map_err(CliError::Input)?;
    tracing::info!(
        desired_ref = env.desired_ref(),
        commit = %read.commit,
        blob = %read.blob,
        "read the desired state"
    );
    Ok(Desired {
        manifest,
        environment: Some(env),
        origin: Some(ManifestOrigin {
            repository,
            desired_ref: env.desired_ref(),
            manifest_commit: read.commit,
            manifest_blob: read.blob,
        }),
    })
}

/// A fetch that failed on the network is "unreachable" (exit 3); a bad URL or mirror is input.
/// Fetches the desired-state repository `url` into the controller's mirror and reads it with
/// `read`, in a blocking task (git2 blocks) under [`FETCH_DEADLINE`], which cancels the
/// transfer at its next progress callback. Returns the mirror's URL and what `read` made.
pub(crate) async fn fetch_desired<T: Send + 'static>(
    config: &ControllerConfig,
    url: String,
    read: impl FnOnce(&Mirror) -> Result<T, CliError> + Send + 'static,
) -> Result<(String, T), CliError> {
    let cache = MirrorCache::new(config.path(&config.store.dir).join("mirrors"));
    let cancel = CancellationToken::new();
    let fetch_cancel = cancel.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mirror = cache
            .fetch(&url, &FetchNet::default(), &fetch_cancel, |line| {
                tracing::info!("{line}");
            })
            .map_err(fetch_error)?;
        let value = read(&mirror)?;
        Ok::<_, CliError>((mirror.url().to_owned(), value))
    });
    match tokio::time::timeout(FETCH_DEADLINE, task).await {
        Ok(joined) => joined
            .context("the desired-state fetch task failed")
            .map_err(CliError::Failed)?,
        Err(_) => {
            cancel.cancel();
            Err(CliError::Unreachable(anyhow!(
                "fetching the desired-state repository took longer than {}s",
                FETCH_DEADLINE.as_secs()
            )))
        }
    }
}

fn fetch_error(e: MaterializeError) -> CliError {
    match e {
        MaterializeError::Fetch { .. } | MaterializeError::Cancelled { .. } => {
            CliError::Unreachable(e.into())
        }
        other => CliError::Input(other.into()),
    }
}

/// Plans the desired state against `catalog` without live state (the node is asked by the
/// launch). In environment mode the manifest must declare that environment.
pub fn plan_desired(
    desired: &Desired,
    catalog: &Catalog,
    service: Option<&str>,
) -> Result<Plan, CliError> {
    plan_for(
        &desired.manifest,
        desired.environment,
        catalog,
        service,
        &LiveState::default(),
    )
}

/// Plans a local `deploy.json` against `catalog` without live state.
pub fn plan_file(
    manifest: &Manifest,
    catalog: &Catalog,
    service: Option<&str>,
) -> Result<Plan, CliError> {
    plan_for(manifest, None, catalog, service, &LiveState::default())
}

fn plan_for(
    manifest: &Manifest,
    env: Option<Environment>,
    catalog: &Catalog,
    service: Option<&str>,
    live: &LiveState,
) -> Result<Plan, CliError> {
    let services = manifest
        .services_for(env)
        .map_err(|e| CliError::Input(e.into()))?;
    plan::plan(services, catalog, env, service, live).map_err(|e| CliError::Input(e.into()))
}

/// Plans the desired state against `catalog` and the live state asked from each node's agent:
/// a first plan says which agent runs what, every agent is asked at once through the admin
/// socket, and the answers (or why none came) make the live state of the final plan.
pub async fn plan_live(
    config: &ControllerConfig,
    desired: &Desired,
    catalog: &Catalog,
    service: Option<&str>,
) -> Result<Plan, CliError> {
    let first = plan_desired(desired, catalog, service)?;
    let queries = plan::live_queries(&first);
    if queries.is_empty() {
        return Ok(first);
    }
    let answers = futures::future::join_all(
        queries
            .iter()
            .map(|(agent, targets)| ask_live(config, agent, targets)),
    )
    .await;
    let mut live = LiveState::default();
    for ((agent, targets), answer) in queries.iter().zip(answers) {
        plan::observe_answer(&mut live, agent, targets, answer);
    }
    plan_for(
        &desired.manifest,
        desired.environment,
        catalog,
        service,
        &live,
    )
}

/// Asks `agent` for the live commits of `targets`; `Err` says why it could not be asked.
async fn ask_live(
    config: &ControllerConfig,
    agent: &AgentId,
    targets: &[LiveTarget],
) -> Result<Vec<LiveService>, String> {
    let request = AdminRequest::Query {
        agent: agent.clone(),
        query: Query::LiveState {
            services: targets.to_vec(),
        },
        timeout_ms: u64::try_from(LIVE_QUERY_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
    };
    let data = super::jobs::admin(config, &request)
        .await
        .map_err(admin_reason)?;
    match serde_json::from_value::<Reply>(data) {
        Ok(Reply::LiveState { services }) => Ok(services),
        Ok(other) => Err(format!(
            "agent {agent} answered the live-state query with {other:?}"
        )),
        Err(e) => Err(format!(
            "agent {agent} sent a malformed live-state answer: {e}"
        )),
    }
}

/// Why an admin request got no answer, as one sentence: the top-level message, which already
/// names its cause (the admin socket's errors embed their source).
pub(super) fn admin_reason(e: CliError) -> String {
    match e {
        CliError::Input(e) | CliError::Unreachable(e) | CliError::Failed(e) => e.to_string(),
    }
}

/// `deploy plan|check` as the CLI runs them: read, plan against the live state, print JSON.
/// `check` adds `inSync`, `drift` and `unknown`, and fails with exit 1 when any service
/// drifted, or 3 when none did but some could not be compared.
pub async fn plan_and_report(
    config: &ControllerConfig,
    source: &Source,
    catalog: Option<&Path>,
    service: Option<&str>,
    verb: PlanVerb,
) -> Result<(), CliError> {
    let catalog = load_catalog(config, catalog)?;
    let desired = load_desired(config, source).await?;
    let plan = plan_live(config, &desired, &catalog, service).await?;
    if verb == PlanVerb::Plan {
        print_plan(&desired, &plan);
        return Ok(());
    }
    let check = plan::check(&plan);
    output::json(&with_origin(
        &desired,
        json!({
            "ok": check.ok(),
            "plan": plan,
            "inSync": check.in_sync,
            "drift": check.drift,
            "unknown": check.unknown,
        }),
    ));
    if !check.drift.is_empty() {
        let drifted: Vec<String> = check
            .drift
            .iter()
            .map(|d| format!("{} ({})", d.id, d.reason))
            .collect();
        return Err(CliError::Failed(anyhow!(
            "deploy check: {} service(s) differ from deploy.json: {}",
            drifted.len(),
            drifted.join("; ")
        )));
    }
    if !check.unknown.is_empty() {
        let unknown: Vec<String> = check
            .unknown
            .iter()
            .map(|u| format!("{} ({})", u.id, u.reason))
            .collect();
        return Err(CliError::Unreachable(anyhow!(
            "deploy check: the live state of {} service(s) could not be compared: {}",
            unknown.len(),
            unknown.join("; ")
        )));
    }
    Ok(())
}

/// Plans a local `deploy.json`, guards, then submits one deploy launch per planned service.
/// Returns the job records.
pub async fn apply(
    config: &ControllerConfig,
    manifest: &Manifest,
    catalog: &Catalog,
    options: &ApplyOptions,
) -> Result<Vec<JobRecord>, CliError> {
    let plan = plan_file(manifest, catalog, options.service.as_deref())?;
    submit(config, None, &plan, catalog, options).await
}

/// Guards `plan` for `env` (the apply's `--env`, `None` for a file), then submits one deploy
/// launch per planned service: the one submit path of every apply. Returns the job records.
pub async fn submit(
    config: &ControllerConfig,
    env: Option<Environment>,
    plan: &Plan,
    catalog: &Catalog,
    options: &ApplyOptions,
) -> Result<Vec<JobRecord>, CliError> {
    plan::apply_guard(env, plan, catalog, options.service.as_deref())
        .map_err(|e| CliError::Input(e.into()))?;
    // Every spec is built before anything is sent, so one bad service stops the whole apply.
    let mut launches = Vec::new();
    for service in &plan.services {
        let spec = plan::deploy_spec(service, options.force, options.dry_run)
            .map_err(|e| CliError::Input(e.into()))?;
        let agent = service.agent.clone().ok_or_else(|| {
            CliError::Input(anyhow!(
                "service {} has no agent: its node is missing from config.json nodes",
                service.id
            ))
        })?;
        let deadline = Duration::from_millis(spec.build_timeout_ms) + DEPLOY_MARGIN;
        launches.push(AdminRequest::Launch {
            agent,
            spec: unidesk_protocol::LaunchSpec::Deploy(spec),
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
        });
    }
    let mut jobs = Vec::new();
    for request in &launches {
        let data = super::jobs::admin(config, request).await?;
        let record: JobRecord = serde_json::from_value(data)
            .context("the controller answered with a malformed job record")
            .map_err(CliError::Failed)?;
        jobs.push(record);
    }
    Ok(jobs)
}

/// `deploy apply` as the CLI runs it: plan, guard, submit, print, and optionally wait.
pub async fn apply_and_report(
    config: &ControllerConfig,
    desired: &Desired,
    catalog: &Catalog,
    options: &ApplyOptions,
) -> Result<Vec<JobRecord>, CliError> {
    let plan = plan_desired(desired, catalog, options.service.as_deref())?;
    let jobs = submit(config, desired.environment, &plan, catalog, options).await?;
    let Some(wait) = options.wait else {
        let config_path = config.base_dir.join("controller.toml");
        output::json(&with_origin(
            desired,
            json!({
                "ok": true,
                "jobs": jobs.iter().map(|j| json!({
                    "jobId": j.job_id,
                    "agent": j.agent,
                    "status": j.status,
                    "service": service_of(j),
                })).collect::<Vec<_>>(),
                "next": jobs.iter().map(|j| format!(
                    "unidesk-controller job status {} --config {}",
                    j.job_id,
                    config_path.display()
                )).collect::<Vec<_>>(),
            }),
        ));
        return Ok(jobs);
    };
    let store = super::jobs::store(config)?;
    let mut finished = Vec::new();
    for job in &jobs {
        finished.push(super::jobs::wait_for(&store, job.job_id.as_str(), wait).await?);
    }
    let ok = finished
        .iter()
        .all(|j| j.result.as_ref().is_some_and(|r| r.status.is_ok()));
    let mut rows = Vec::new();
    for j in &finished {
        rows.push(json!({
            "job": j,
            "logTail": store.tail_events(&j.job_id, 4000).unwrap_or_default(),
        }));
    }
    output::json(&with_origin(desired, json!({ "ok": ok, "jobs": rows })));
    if !ok {
        let failed: Vec<String> = finished
            .iter()
            .filter(|j| !j.result.as_ref().is_some_and(|r| r.status.is_ok()))
            .map(|j| {
                format!(
                    "{} ({}): {:?}{}",
                    j.job_id,
                    service_of(j).unwrap_or_default(),
                    j.status,
                    j.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        return Err(CliError::Failed(anyhow!(
            "deploy failed: {}",
            failed.join("; ")
        )));
    }
    Ok(finished)
}

fn service_of(job: &JobRecord) -> Option<String> {
    match &job.launch.spec {
        unidesk_protocol::LaunchSpec::Deploy(d) => Some(d.service_id.clone()),
        _ => None,
    }
}

/// `deploy plan`: the plan as JSON, with the manifest's origin in environment mode.
pub fn print_plan(desired: &Desired, plan: &Plan) {
    output::json(&with_origin(desired, json!({ "ok": true, "plan": plan })));
}

/// Adds `repository`, `desiredRef`, `manifestCommit` and `manifestBlob` to a top-level JSON
/// object in environment mode.
fn with_origin(desired: &Desired, mut out: Value) -> Value {
    if let (Some(origin), Value::Object(map)) = (&desired.origin, &mut out) {
        map.insert("repository".into(), json!(origin.repository));
        map.insert("desiredRef".into(), json!(origin.desired_ref));
        map.insert("manifestCommit".into(), json!(origin.manifest_commit));
        map.insert("manifestBlob".into(), json!(origin.manifest_blob));
    }
    out
}
