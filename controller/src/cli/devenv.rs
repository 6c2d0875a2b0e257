//! `dev-env validate [--kubectl-dry-run --agent ID]`: the static dev-environment checks of a
//! manifest (the pure [`crate::desired::devenv`]), then, when asked and only when they pass,
//! a server-side `dryRun=All` apply of every object on the agent's node, sent as a typed
//! query that carries the manifest as data. Nothing is ever applied for real.

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use serde::Serialize;
use serde_json::json;
use unidesk_protocol::{AgentId, DryRunObject, MAX_DRY_RUN_MANIFEST_BYTES, Query, Reply};

use super::{CliError, jobs, output};
use crate::admin::AdminRequest;
use crate::config::ControllerConfig;
use crate::desired::devenv;

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
/// unreadable input, 3 when the dry run's agent cannot be asked. `dry_run` is the controller
/// config and the agent for `--kubectl-dry-run`.
pub(super) async fn validate(
    manifest: &Path,
    namespace: &str,
    dry_run: Option<(ControllerConfig, AgentId)>,
) -> Result<(), CliError> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| CliError::Input(anyhow!("cannot read {}: {e}", manifest.display())))?;
    let report = devenv::validate(&text, namespace)
        .map_err(|e| CliError::Input(anyhow!("{}: {e}", manifest.display())))?;
    let mut out = json!({
        "ok": report.ok(),
        "manifest": manifest.display().to_string(),
        "namespace": report.namespace,
        "objects": report.objects,
        "violations": report.violations,
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
