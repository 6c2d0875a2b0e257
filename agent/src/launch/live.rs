//! Questions about what runs on this node, answered without a launch: the live commit of each
//! service `deploy check|plan` asks about ([`live_state`]) and the server-side dry run of a
//! manifest `dev-env validate --kubectl-dry-run` sends ([`dry_run`]).
//!
//! A Compose service's live commit is the `unidesk.ai/source-commit` label of the image its
//! one running container runs (found by its compose labels, as the Compose executor finds
//! it); a k3s service's is the `unidesk.ai/deploy-commit` annotation the k3s executor stamps
//! on its Deployments, which must all agree. Nothing here changes the node: the dry run is
//! `dryRun=All` only. Every answer is bounded in time, because the session loop waits for it;
//! a failure for one service or object is that entry's error, never the whole answer's.

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;
use unidesk_protocol::{
    DryRunObject, K3sDeployment, LiveLookup, LiveService, LiveTarget, MAX_DRY_RUN_MANIFEST_BYTES,
    Reply,
};

use super::compose::{self, ComposeError};
use super::k8s::cluster::{Cluster, FIELD_MANAGER};
use super::k8s::manifest;
use super::verify;
use crate::config::AgentConfig;

/// How long the whole live-state answer may take.
pub const LIVE_DEADLINE: Duration = Duration::from_secs(6);

/// How long the whole dry-run answer may take; objects not tried by then say so.
pub const DRY_RUN_DEADLINE: Duration = Duration::from_secs(10);

/// The per-request timeout of the Docker connection used for live lookups (seconds).
const DOCKER_TIMEOUT_SECS: u64 = 5;

/// Answers [`unidesk_protocol::Query::LiveState`]: one entry per target, in order. Docker and
/// the cluster are connected once, and only when a target needs them.
pub async fn live_state(config: &AgentConfig, targets: Vec<LiveTarget>) -> Vec<LiveService> {
    let deadline = Instant::now() + LIVE_DEADLINE;
    let needs_docker = targets
        .iter()
        .any(|t| matches!(t.lookup, LiveLookup::Compose { .. }));
    let needs_cluster = targets
        .iter()
        .any(|t| matches!(t.lookup, LiveLookup::K3s { .. }));
    let docker = match needs_docker {
        true => Some(
            super::probe::docker(
                &config.path(&config.runtime.docker_socket),
                DOCKER_TIMEOUT_SECS,
            )
            .await,
        ),
        false => None,
    };
    let cluster = match needs_cluster {
        true => Some(
            Cluster::connect(&config.path(&config.runtime.kubeconfig))
                .await
                .map_err(|e| e.to_string()),
        ),
        false => None,
    };
    let lookups = targets.into_iter().map(|target| {
        let docker = docker.as_ref();
        let cluster = cluster.as_ref();
        async move {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let observed = match tokio::time::timeout(
                remaining,
                observe(&target.lookup, docker, cluster, deadline),
            )
            .await
            {
                Ok(observed) => observed,
                Err(_) => Err(format!(
                    "no answer from {} within {LIVE_DEADLINE:?}",
                    where_it_runs(&target.lookup)
                )),
            };
            LiveService {
                service_id: target.service_id,
                observed,
            }
        }
    });
    join_all(lookups).await
}

/// What a lookup reads, for messages.
fn where_it_runs(lookup: &LiveLookup) -> String {
    match lookup {
        LiveLookup::Compose { project, service } => format!(
            "compose service {service} (project {})",
            project.as_deref().unwrap_or("any")
        ),
        LiveLookup::K3s {
            namespace,
            deployments,
        } => format!(
            "Deployments {} of namespace {namespace}",
            deployments
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn observe(
    lookup: &LiveLookup,
    docker: Option<&Result<bollard::Docker, String>>,
    cluster: Option<&Result<Cluster, String>>,
    deadline: Instant,
) -> Result<Option<String>, String> {
    match lookup {
        LiveLookup::Compose { project, service } => {
            let docker = docker
                .ok_or("Docker was not connected")?
                .as_ref()
                .map_err(Clone::clone)?;
            compose_commit(docker, project.as_deref(), service, deadline).await
        }
        LiveLookup::K3s {
            namespace,
            deployments,
        } => {
            let cluster = cluster
                .ok_or("the cluster was not connected")?
                .as_ref()
                .map_err(Clone::clone)?;
            let mut seen = Vec::with_capacity(deployments.len());
            for K3sDeployment { name, container } in deployments {
                let annotation = match cluster
                    .deployment_evidence(namespace, name, container)
                    .await
                {
                    Ok(evidence) => evidence.annotation_commit,
                    Err(e) if e.code() == Some(404) => None,
                    Err(e) => return Err(e.to_string()),
                };
                seen.push((name.clone(), annotation));
            }
            agreed_commit(namespace, &seen)
        }
    }
}

/// The commit of the image the one running container of compose `service` runs; `None` when
/// no container of the service runs or its image carries no source-commit label.
async fn compose_commit(
    docker: &bollard::Docker,
    project: Option<&str>,
    service: &str,
    deadline: Instant,
) -> Result<Option<String>, String> {
    let container = match compose::find_service_container(docker, project, service).await {
        Ok(c) => c,
        Err(ComposeError::NotRunning { .. }) => return Ok(None),
        Err(e) => return Err(super::StepFailure::chain(&e).0),
    };
    let observed = verify::observe(docker, &container.id, None, deadline)
        .await
        .map_err(|e| super::StepFailure::chain(&e).0)?;
    Ok(observed.image_label_commit)
}

/// The live commit of a k3s service from each Deployment's `unidesk.ai/deploy-commit`
/// annotation (`None` for a Deployment that is absent or unstamped): the one value they all
/// show, or an error naming each when they disagree (a half-finished deploy).
pub fn agreed_commit(
    namespace: &str,
    seen: &[(String, Option<String>)],
) -> Result<Option<String>, String> {
    let Some((_, first)) = seen.first() else {
        return Ok(None);
    };
    if seen.iter().all(|(_, c)| c == first) {
        return Ok(first.clone());
    }
    Err(format!(
        "the Deployments of namespace {namespace} show different {} annotations: {}",
        manifest::ANNOTATION_DEPLOY_COMMIT,
        seen.iter()
            .map(|(name, c)| format!("{name}={}", c.as_deref().unwrap_or("none")))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Answers [`unidesk_protocol::Query::DryRunManifest`]: parses the manifest and sends each
/// object as a `dryRun=All` server-side apply through the node's kubeconfig, one verdict per
/// object. A manifest that is too large, does not parse, or a cluster that cannot be reached
/// is a [`Reply::Error`] naming it.
pub async fn dry_run(config: &AgentConfig, text: &str) -> Reply {
    let kubeconfig = config.path(&config.runtime.kubeconfig);
    match dry_run_at(&kubeconfig, text).await {
        Ok(reply) => reply,
        Err(reason) => Reply::Error { reason },
    }
}

async fn dry_run_at(kubeconfig: &Path, text: &str) -> Result<Reply, String> {
    if text.len() > MAX_DRY_RUN_MANIFEST_BYTES {
        return Err(format!(
            "the manifest of {} bytes exceeds the dry-run limit of {MAX_DRY_RUN_MANIFEST_BYTES} bytes",
            text.len()
        ));
    }
    let objects = manifest::parse(text).map_err(|e| format!("manifest: {e}"))?;
    let cluster = Cluster::connect(kubeconfig)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + DRY_RUN_DEADLINE;
    let mut verdicts = Vec::with_capacity(objects.len());
    for object in &objects {
        let result = match tokio::time::timeout_at(
            deadline,
            cluster.dry_run_apply(object, FIELD_MANAGER),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "not tried: the dry run of the whole manifest ran out of its {DRY_RUN_DEADLINE:?}"
            )),
        };
        verdicts.push(DryRunObject {
            document: u32::try_from(object.document).unwrap_or(u32::MAX),
            object: object.reference(),
            namespace: object.namespace().map(str::to_owned),
            result,
        });
    }
    Ok(Reply::DryRun {
        api_server: cluster.api_server_url().to_owned(),
        objects: verdicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn seen(pairs: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        pairs
            .iter()
            .map(|(n, c)| ((*n).to_owned(), c.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn deployments_that_agree_give_their_commit() {
        assert_eq!(
            agreed_commit("ns", &seen(&[("a", Some(A)), ("b", Some(A))])),
            Ok(Some(A.to_owned()))
        );
        assert_eq!(agreed_commit("ns", &seen(&[("a", None)])), Ok(None));
        assert_eq!(agreed_commit("ns", &[]), Ok(None));
    }

    #[test]
    fn deployments_that_disagree_are_named() {
        let err =
            agreed_commit("unidesk-dev", &seen(&[("a", Some(A)), ("b", Some(B))])).unwrap_err();
        assert_eq!(
            err,
            format!(
                "the Deployments of namespace unidesk-dev show different unidesk.ai/deploy-commit \
                 annotations: a={A}, b={B}"
            )
        );
        let err = agreed_commit("ns", &seen(&[("a", Some(A)), ("b", None)])).unwrap_err();
        assert!(err.ends_with(&format!("a={A}, b=none")), "{err}");
    }

    #[tokio::test]
    async fn a_manifest_over_the_limit_or_malformed_is_refused_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        // No kubeconfig exists: reaching the connect step would name it instead.
        let kubeconfig = dir.path().join("kubeconfig");
        let big = "#".repeat(MAX_DRY_RUN_MANIFEST_BYTES + 1);
        let err = dry_run_at(&kubeconfig, &big).await.unwrap_err();
        assert!(err.contains("exceeds the dry-run limit"), "{err}");
        let err = dry_run_at(&kubeconfig, "a: [unclosed\n").await.unwrap_err();
        assert!(err.starts_with("manifest: document 0"), "{err}");
        let err = dry_run_at(
            &kubeconfig,
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        )
        .await
        .unwrap_err();
        assert!(err.contains("kubeconfig"), "{err}");
    }

    #[test]
    fn lookups_are_named_for_messages() {
        assert_eq!(
            where_it_runs(&LiveLookup::Compose {
                project: None,
                service: "web".into()
            }),
            "compose service web (project any)"
        );
        assert_eq!(
            where_it_runs(&LiveLookup::K3s {
                namespace: "unidesk-dev".into(),
                deployments: vec![
                    K3sDeployment {
                        name: "a".into(),
                        container: "c".into()
                    },
                    K3sDeployment {
                        name: "b".into(),
                        container: "c".into()
                    },
                ],
            }),
            "Deployments a, b of namespace unidesk-dev"
        );
    }
}
