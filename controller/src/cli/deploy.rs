//! `deploy apply|plan|check`: read the desired state, join it with `config.json`, guard, and
//! launch one deploy job per service on the agent of the service's node.
//!
//! Planning is the pure `desired` module; this file only loads files, talks to the admin
//! socket and prints JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::json;

use super::{CliError, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::desired::catalog::{self, Catalog};
use crate::desired::manifest::{self, Manifest};
use crate::desired::plan::{self, LiveState, Plan};
use crate::store::JobRecord;

/// How long after the build deadline a deploy job may still run (fetch, recreate, verify).
const DEPLOY_MARGIN: Duration = Duration::from_secs(600);

/// Options of `deploy apply`.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    pub service: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    pub wait: Option<Duration>,
}

/// Loads `config.json` from `--catalog` or the controller config's `desired.catalog`.
pub fn load_catalog(config: &ControllerConfig, flag: Option<&Path>) -> Result<Catalog, CliError> {
    let path: PathBuf = match (flag, &config.desired) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(d)) => config.path(&d.catalog),
        (None, None) => {
            return Err(CliError::Input(anyhow!(
                "no config.json: pass --catalog or set desired.catalog in the controller config"
            )));
        }
    };
    let parsed = catalog::load(&path).map_err(|e| CliError::Input(e.into()))?;
    for warning in &parsed.warnings {
        tracing::warn!("{}: {warning}", path.display());
    }
    Ok(parsed.catalog)
}

/// Loads a local `deploy.json` (the `--file` compatibility path).
pub fn load_manifest(path: &Path) -> Result<Manifest, CliError> {
    manifest::load(path).map_err(|e| CliError::Input(e.into()))
}

/// Plans `manifest` against `catalog` without live state (the node is asked by the launch).
pub fn plan_file(
    manifest: &Manifest,
    catalog: &Catalog,
    service: Option<&str>,
) -> Result<Plan, CliError> {
    let services = manifest
        .services_for(None)
        .map_err(|e| CliError::Input(e.into()))?;
    plan::plan(services, catalog, None, service, &LiveState::default())
        .map_err(|e| CliError::Input(e.into()))
}

/// Guards, then submits one deploy launch per planned service. Returns the job records.
pub async fn apply(
    config: &ControllerConfig,
    manifest: &Manifest,
    catalog: &Catalog,
    options: &ApplyOptions,
) -> Result<Vec<JobRecord>, CliError> {
    let plan = plan_file(manifest, catalog, options.service.as_deref())?;
    plan::apply_guard(None, &plan, catalog, options.service.as_deref())
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

/// `deploy apply` as the CLI runs it: submit, print, and optionally wait.
pub async fn apply_and_report(
    config: &ControllerConfig,
    manifest: &Manifest,
    catalog: &Catalog,
    options: &ApplyOptions,
) -> Result<Vec<JobRecord>, CliError> {
    let jobs = apply(config, manifest, catalog, options).await?;
    let Some(wait) = options.wait else {
        let config_path = config.base_dir.join("controller.toml");
        output::json(&json!({
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
        }));
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
    output::json(&json!({ "ok": ok, "jobs": rows }));
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

/// `deploy plan|check` for a local file: the plan as JSON. Live state is asked by each
/// deploy launch on its node, so lines stay `unknown` here until the live-state query lands.
pub fn print_plan(plan: &Plan) {
    output::json(&json!({ "ok": true, "plan": plan }));
}
