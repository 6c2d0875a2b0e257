//! `dev-env validate [--manifest PATH] [--catalog PATH] [--kubectl-dry-run --agent ID]`: the
//! static dev-environment checks of a manifest (the pure [`crate::desired::devenv`]) — without
//! `--manifest`, of the dev foundation manifest config.json names, against its allowed
//! objects — then, when asked and only when they pass, a server-side `dryRun=All` apply of
//! every object on the agent's node, sent as a typed query that carries the manifest as data.
//! Nothing is ever applied for real.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use serde::Serialize;
use serde_json::json;
use unidesk_protocol::{AgentId, DryRunObject, MAX_DRY_RUN_MANIFEST_BYTES, Query, Reply};

use super::{CliError, jobs, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::desired::{Environment, devenv};

/// How long the agent may take to answer the dry run (it bounds its own work well inside).
const DRY_RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// One object's dry-run verdict as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct DryRunLine {
    document: u32,
    object: String,
    namespace: Option<String>,
    ok: bool,
    error: Option<String>,
}

impl From<DryRunObject> for DryRunLine {
    fn from(o: DryRunObject) -> Self {
        DryRunLine {
            document: o.document,
            object: o.object,
            namespace: o.namespace,
            ok: o.result.is_ok(),
            error: o.result.err(),
        }
    }
}

/// Runs `dev-env validate`: prints the report, exit 2 on violations, a dry-run rejection or
/// unreadable input, 3 when the dry run's agent cannot be asked. `manifest` is `--manifest`;
/// without it, `catalog` (config.json) must name the dev foundation manifest. `catalog` also
/// gives the objects allowed host networking. `dry_run` is the controller config and the
/// agent for `--kubectl-dry-run`.
pub(super) async fn validate(
    manifest: Option<&Path>,
    catalog: Option<&Path>,
    namespace: &str,
    dry_run: Option<(ControllerConfig, AgentId)>,
) -> Result<(), CliError> {
    let dev = match catalog {
        Some(path) => {
            let catalog = super::deploy::load_catalog_file(path)?;
            let dev = catalog
                .environment(Environment::Dev)
                .cloned()
                .ok_or_else(|| {
                    CliError::Input(anyhow!(
                        "{}: no environments.dev to validate against",
                        path.display()
                    ))
                })?;
            Some((path, dev))
        }
        None => None,
    };
    let (manifest, allowed_objects): (PathBuf, Option<&[String]>) = match (manifest, &dev) {
        (Some(m), _) => (m.to_path_buf(), None),
        (None, Some((path, dev))) => {
            let foundation = dev.foundation.as_ref().ok_or_else(|| {
                CliError::Input(anyhow!(
                    "{}: environments.dev.foundation is not set, so there is no foundation                      manifest to check; pass --manifest PATH",
                    path.display()
                ))
            })?;
            // config.json sits at the repository root; its paths are relative to it.
            let root = path.parent().unwrap_or_else(|| Path::new("."));
            (
                root.join(&foundation.manifest),
                Some(foundation.allowed_objects.as_slice()),
            )
        }
        (None, None) => {
            return Err(CliError::Input(anyhow!(
                "pass --manifest PATH, or --catalog config.json naming environments.dev.foundation"
            )));
        }
    };
    let manifest = manifest.as_path();
    let policy = devenv::Policy {
        namespace,
        host_network_allowed: dev
            .as_ref()
            .map_or(&[], |(_, dev)| dev.host_network_allowed.as_slice()),
        allowed_objects,
    };
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| CliError::Input(anyhow!("cannot read {}: {e}", manifest.display())))?;
    let report = devenv::validate(&text, &policy)
        .map_err(|e| CliError::Input(anyhow!("{}: {e}", manifest.display())))?;
    let file = manifest.display().to_string();
    let violations: Vec<serde_json::Value> = report
        .violations
        .iter()
        .map(|v| {
            json!({
                "file": file,
                "document": v.document,
                "object": v.object,
                "rule": v.rule,
                "detail": v.detail,
            })
        })
        .collect();
    let mut out = json!({
        "ok": report.ok(),
        "manifest": file,
        "catalog": dev.as_ref().map(|(path, _)| path.display().to_string()),
        "namespace": report.namespace,
        "allowedObjects": allowed_objects,
        "hostNetworkAllowed": policy.host_network_allowed,
        "objects": report.objects,
        "violations": violations,
    });
    if !report.ok() {
        output::json(&out);
        return Err(CliError::Input(anyhow!(
            "{}: {} dev-env violation(s){}",
            manifest.display(),
            report.violations.len(),
            if dry_run.is_some() {
                "; the dry run was not sent"
            } else {
                ""
            }
        )));
    }
    let Some((config, agent)) = dry_run else {
        output::json(&out);
        return Ok(());
    };
    if text.len() > MAX_DRY_RUN_MANIFEST_BYTES {
        return Err(CliError::Input(anyhow!(
            "{}: {} bytes exceed the dry-run limit of {MAX_DRY_RUN_MANIFEST_BYTES} bytes",
            manifest.display(),
            text.len()
        )));
    }
    let (api_server, lines) = ask_dry_run(&config, &agent, text).await?;
    let rejected: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            l.error
                .as_ref()
                .map(|e| format!("document {} {}: {e}", l.document, l.object))
        })
        .collect();
    out["ok"] = json!(rejected.is_empty());
    out["dryRun"] = json!({
        "agent": agent,
        "apiServer": api_server,
        "objects": lines,
    });
    output::json(&out);
    if rejected.is_empty() {
        return Ok(());
    }
    Err(CliError::Input(anyhow!(
        "{}: the API server behind agent {agent} rejected {} object(s) in a dry run: {}",
        manifest.display(),
        rejected.len(),
        rejected.join("; ")
    )))
}

/// Sends the manifest to `agent` for a dry run; any failure to get verdicts is unreachable.
async fn ask_dry_run(
    config: &ControllerConfig,
    agent: &AgentId,
    manifest: String,
) -> Result<(String, Vec<DryRunLine>), CliError> {
    let request = AdminRequest::Query {
        agent: agent.clone(),
        query: Query::DryRunManifest { manifest },
        timeout_ms: u64::try_from(DRY_RUN_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
    };
    let unreachable = |why: String| {
        CliError::Unreachable(anyhow!("dry run on agent {agent} did not happen: {why}"))
    };
    let data = jobs::admin(config, &request)
        .await
        .map_err(|e| unreachable(super::deploy::admin_reason(e)))?;
    match serde_json::from_value::<Reply>(data) {
        Ok(Reply::DryRun {
            api_server,
            objects,
        }) => Ok((api_server, objects.into_iter().map(Into::into).collect())),
        Ok(other) => Err(unreachable(format!("unexpected answer {other:?}"))),
        Err(e) => Err(unreachable(format!("malformed answer: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_print_ok_and_error() {
        let ok: DryRunLine = DryRunObject {
            document: 1,
            object: "ConfigMap/c".into(),
            namespace: Some("unidesk-dev".into()),
            result: Ok(()),
        }
        .into();
        let bad: DryRunLine = DryRunObject {
            document: 2,
            object: "Deployment/d".into(),
            namespace: Some("unidesk-dev".into()),
            result: Err("spec.selector: Required value".into()),
        }
        .into();
        assert!(ok.ok && ok.error.is_none());
        let json = serde_json::to_value(&bad).unwrap();
        assert_eq!(
            json,
            json!({"document": 2, "object": "Deployment/d", "namespace": "unidesk-dev",
                   "ok": false, "error": "spec.selector: Required value"})
        );
    }
}
