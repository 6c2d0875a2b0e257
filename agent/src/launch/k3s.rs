//! The deploy launch for k3s services (`k3sctl-managed`):
//! preflight → materialize → build → import → apply → rollout → verify.
//!
//! The cluster is the node's native k3s, reached only through the kubeconfig file in the agent's
//! config; images go from the local Docker Engine straight into k3s's containerd (no registry);
//! the service's objects come from the manifest at the deployed commit, narrowed to the service
//! and refused before anything is applied when they leave its namespace or expose host ports.
//! The deploy succeeds only when every Deployment, the image and the health endpoints prove the
//! requested commit.

use std::collections::BTreeSet;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use unidesk_protocol::{
    AppliedDeployment, DeployOutcome, DeploySpec, K3sSpec, LaunchStatus, ResultDetail, Step,
};

use super::build::LABEL_SOURCE_COMMIT;
use super::containerd::Containerd;
use super::deploy::{Failed, build_image, failed, materialize, proxy_url};
use super::k8s::cluster::{Cluster, FIELD_MANAGER};
use super::k8s::manifest::{self, DeploymentTarget, Object, Selection, Stamp};
use super::k8s::verify::{self as kverify, HealthEvidence};
use super::steplog::StepLog;
use super::{Executor, Outputs, StepFailure};

/// The largest manifest the agent reads from a commit.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// How long a live-state read may take when deciding whether a deploy is a no-op.
const LIVE_CHECK: Duration = Duration::from_secs(10);

/// What the preflight found: the cluster and containerd to deploy to.
struct Target {
    cluster: Cluster,
    containerd: Containerd,
}

/// Runs a k3s deploy launch.
pub(super) async fn run(
    exec: &Executor,
    launch: &unidesk_protocol::Launch,
    spec: &DeploySpec,
    k3s: &K3sSpec,
    outputs: &mut Outputs,
    cancel: &CancellationToken,
) -> Result<LaunchStatus, Failed> {
    let config = &exec.config;
    let proxy = proxy_url(config);
    let mut outcome = DeployOutcome {
        resolved_commit: None,
        image: None,
        image_id: None,
        container_id: None,
        k3s: Some(Box::default()),
    };
    let docker_socket = config.path(&config.runtime.docker_socket);
    let docker = crate::launch::probe::docker(&docker_socket, 600)
        .await
        .map_err(|e| (LaunchStatus::Failed, e))?;

    // Preflight: native k3s answers through the configured kubeconfig, its containerd is there,
    // and no k3s runs inside Docker.
    let target = exec
        .step(launch, Step::Preflight, outputs, |log| {
            preflight(exec, &docker, log)
        })
        .await
        .map_err(failed)?;
    if let Some(k) = outcome.k3s.as_mut() {
        k.api_server = Some(target.cluster.api_server_url().to_owned());
        k.ca_sha256 = target.cluster.ca_fingerprint().map(str::to_owned);
    }
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    // Materialize, then read and narrow the manifest at that commit before anything is built,
    // so a manifest that leaves the namespace is refused before any change.
    let (mirror, commit, objects) = exec
        .step(launch, Step::Materialize, outputs, |log| {
            let proxy = proxy.clone();
            async move {
                let (mirror, commit) =
                    materialize(exec, spec, proxy, log.clone(), cancel.clone()).await?;
                let bytes = mirror
                    .read_blob(commit, &k3s.manifest, MAX_MANIFEST_BYTES)
                    .map_err(|e| StepFailure::chain(&e))?;
                let objects = narrowed_manifest(bytes, commit, spec, k3s, &log).await?;
                Ok((mirror, commit, objects))
            }
        })
        .await
        .map_err(failed)?;
    let full = commit.to_string();
    outcome.resolved_commit = Some(full.clone());
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    // Every image the narrowed objects run must already be in k3s's containerd (or be the one
    // this launch imports): no pull at rollout time.
    check_images_present(&target.containerd, &objects, &spec.image)
        .await
        .map_err(failed)?;

    if !spec.force
        && let Some(done) = live_matches(&target, spec, k3s, &full).await
    {
        exec.note(
            launch,
            format!(
                "live service {} already runs commit {full} ({done}); nothing to do (use --force \
                 to rebuild)",
                spec.service_id
            ),
        )
        .await;
        outcome.image = Some(spec.image.clone());
        outputs.detail = Some(ResultDetail::Deploy(outcome));
        return Ok(LaunchStatus::Noop);
    }
    if spec.dry_run {
        exec.note(
            launch,
            format!(
                "dry run: would build {} at {full}, import it into {} and apply {} object(s) \
                 to namespace {}; stopping before any change",
                spec.image,
                target.containerd.socket().display(),
                objects.len(),
                k3s.namespace
            ),
        )
        .await;
        return Ok(LaunchStatus::Succeeded);
    }

    // Build with the local Docker Engine.
    let built = exec
        .step(launch, Step::Build, outputs, |log| {
            build_image(
                &docker,
                spec,
                mirror,
                commit,
                spec.image.clone(),
                proxy.clone(),
                log,
                cancel,
            )
        })
        .await
        .map_err(failed)?;
    outcome.image = Some(built.image.clone());
    outcome.image_id = Some(built.image_id.clone());
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    // Import: the sandbox image first, then the built image, straight into k3s's containerd.
    let pause_image = config.runtime.pause_image.clone();
    let imported = exec
        .step(launch, Step::Import, outputs, |log| {
            let (containerd, docker, built, proxy) =
                (&target.containerd, &docker, &built, proxy.clone());
            async move {
                containerd
                    .ensure_pause(&pause_image, proxy.as_deref(), &log)
                    .await
                    .map_err(|e| StepFailure::chain(&e))?;
                containerd
                    .import_from_docker(
                        docker,
                        &built.image_id,
                        std::slice::from_ref(&built.image),
                        &log,
                        cancel,
                    )
                    .await
                    .map_err(|e| StepFailure::chain(&e))
            }
        })
        .await
        .map_err(failed)?;
    if let Some(k) = outcome.k3s.as_mut() {
        k.image_ref = imported.names.first().cloned();
        k.manifest_digest = Some(imported.manifest_digest.clone());
    }
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    // Apply: stamp the narrowed objects, server-side dry run, then the real apply.
    let targets = deployment_targets(k3s);
    let stamp = Stamp {
        image: built.image.clone(),
        service_id: spec.service_id.clone(),
        repo: spec.repo_url.clone(),
        commit: full.clone(),
        requested_commit: spec.requested_commit.clone(),
    };
    let applied = exec
        .step(launch, Step::Apply, outputs, |log| {
            let (cluster, targets, stamp) = (&target.cluster, &targets, &stamp);
            async move {
                let stamped =
                    manifest::stamp(objects, targets, stamp).map_err(|e| StepFailure::chain(&e))?;
                log.line(format!(
                    "server-side apply of {} object(s) to {} as field manager {FIELD_MANAGER} \
                     (dry run first)",
                    stamped.len(),
                    cluster.api_server_url()
                ))
                .await;
                let applied = cluster
                    .apply(&stamped, FIELD_MANAGER)
                    .await
                    .map_err(|e| StepFailure::chain(&e))?;
                for a in &applied {
                    log.line(format!(
                        "applied {} {}/{}{}",
                        a.kind,
                        a.namespace,
                        a.name,
                        a.generation
                            .map(|g| format!(" generation {g}"))
                            .unwrap_or_default()
                    ))
                    .await;
                }
                Ok(applied)
            }
        })
        .await
        .map_err(failed)?;
    let rolled: Vec<AppliedDeployment> = targets
        .iter()
        .map(|t| {
            let generation = applied
                .iter()
                .find(|a| a.kind == "Deployment" && a.name == t.name)
                .and_then(|a| a.generation)
                .unwrap_or(1);
            AppliedDeployment {
                name: t.name.clone(),
                generation,
            }
        })
        .collect();
    if let Some(k) = outcome.k3s.as_mut() {
        k.deployments = rolled.clone();
    }
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    // Rollout: every Deployment reaches its new generation within the deadline.
    let deadline = Instant::now() + Duration::from_millis(k3s.rollout_timeout_ms);
    exec.step(launch, Step::Rollout, outputs, |log| {
        let (cluster, rolled, ns) = (&target.cluster, &rolled, &k3s.namespace);
        async move {
            for d in rolled {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let forward = {
                    let log = log.clone();
                    let name = d.name.clone();
                    tokio::spawn(async move {
                        while let Some(line) = rx.recv().await {
                            log.line(format!("{name}: {line}")).await;
                        }
                    })
                };
                let waited = tokio::select! {
                    r = cluster.wait_rollout(ns, &d.name, d.generation, deadline, |p| {
                        let _ = tx.send(p.to_owned());
                    }) => r,
                    () = cancel.cancelled() => {
                        return Err(StepFailure(format!("rollout of {ns}/{} cancelled", d.name)));
                    }
                };
                drop(tx);
                let _ = forward.await;
                waited.map_err(|e| StepFailure::chain(&e))?;
                log.line(format!(
                    "rollout of {ns}/{} complete at generation {}",
                    d.name, d.generation
                ))
                .await;
            }
            Ok(())
        }
    })
    .await
    .map_err(failed)?;

    // Verify: annotations and env of every Deployment, the image's commit label, and the
    // health endpoints through the API server all show the requested commit.
    exec.step(launch, Step::Verify, outputs, |log| {
        let target = &target;
        let full = &full;
        let image = &built.image;
        async move {
            let proof = prove(target, spec, k3s, full, Some(image))
                .await
                .map_err(StepFailure)?;
            log.line(format!("verified: {proof}")).await;
            Ok(())
        }
    })
    .await
    .map_err(failed)?;

    // Legacy container: after a verified rollout the direct Docker copy goes, so two
    // schedulers never run side by side.
    if let Some(name) = &k3s.legacy_container {
        let removed = remove_legacy(&docker, name).await.map_err(failed)?;
        exec.note(launch, removed.clone()).await;
        if let Some(k) = outcome.k3s.as_mut() {
            k.legacy_removed = Some(name.clone());
        }
        outputs.detail = Some(ResultDetail::Deploy(outcome));
    }
    Ok(LaunchStatus::Succeeded)
}

/// Imports the node's foundation images (`runtime.prewarm_images`, e.g. the dev Postgres) from
/// its Docker into k3s's containerd; images already there cost no writes. A missing one fails
/// the step naming it.
pub(super) async fn import_foundation(
    containerd: &Containerd,
    docker: &Docker,
    images: &[String],
    log: &StepLog,
    cancel: &CancellationToken,
) -> Result<(), StepFailure> {
    for image in images {
        let report = containerd
            .import_from_docker(docker, image, std::slice::from_ref(image), log, cancel)
            .await
            .map_err(|e| {
                StepFailure(format!(
                    "foundation image {image}: {}",
                    StepFailure::chain(&e).0
                ))
            })?;
        log.line(format!(
            "prewarmed {image}: {} blob(s) written, {} already present",
            report.blobs_written, report.blobs_skipped
        ))
        .await;
        log.decision("foundation_image_imported", image).await;
    }
    Ok(())
}

/// Runs a prewarm launch: the pause image (pulled through the egress proxy when missing) and
/// every image of `runtime.prewarm_images`, taken from the node's Docker, into k3s's
/// containerd.
pub(super) async fn prewarm(
    exec: &Executor,
    launch: &unidesk_protocol::Launch,
    outputs: &mut Outputs,
    cancel: &CancellationToken,
) -> Result<LaunchStatus, Failed> {
    let config = &exec.config;
    let runtime = &config.runtime;
    let proxy = proxy_url(config);
    let docker_socket = config.path(&runtime.docker_socket);
    let docker = crate::launch::probe::docker(&docker_socket, 600)
        .await
        .map_err(|e| (LaunchStatus::Failed, e))?;
    exec.step(launch, Step::Import, outputs, |log| {
        let docker = &docker;
        async move {
            let socket = config.path(&runtime.containerd_socket);
            let containerd =
                Containerd::connect(&socket, &runtime.containerd_namespace, &runtime.snapshotter)
                    .await
                    .map_err(|e| StepFailure::chain(&e))?;
            containerd
                .ensure_pause(&runtime.pause_image, proxy.as_deref(), &log)
                .await
                .map_err(|e| StepFailure::chain(&e))?;
            import_foundation(&containerd, docker, &runtime.prewarm_images, &log, cancel).await?;
            log.line(format!(
                "k3s's containerd ({}) holds the pause image and {} foundation image(s)",
                socket.display(),
                runtime.prewarm_images.len()
            ))
            .await;
            Ok(())
        }
    })
    .await
    .map_err(failed)?;
    Ok(LaunchStatus::Succeeded)
}

fn deployment_targets(k3s: &K3sSpec) -> Vec<DeploymentTarget> {
    k3s.deployments
        .iter()
        .map(|d| DeploymentTarget {
            name: d.name.clone(),
            container: d.container.clone(),
        })
        .collect()
}

async fn preflight(exec: &Executor, docker: &Docker, log: StepLog) -> Result<Target, StepFailure> {
    let runtime = &exec.config.runtime;
    let kubeconfig = exec.config.path(&runtime.kubeconfig);
    log.decision("target_kubeconfig", &kubeconfig.display().to_string())
        .await;
    let cluster = Cluster::connect(&kubeconfig)
        .await
        .map_err(|e| StepFailure::chain(&e))?;
    let version = cluster
        .version()
        .await
        .map_err(|e| StepFailure::chain(&e))?;
    log.decision("target_api_server", cluster.api_server_url())
        .await;
    log.decision(
        "target_api_server_ca_sha256",
        cluster.ca_fingerprint().unwrap_or("none"),
    )
    .await;
    log.line(format!("kubernetes API answers: version {version}"))
        .await;

    let socket = exec.config.path(&runtime.containerd_socket);
    log.decision("target_containerd", &socket.display().to_string())
        .await;
    let containerd =
        Containerd::connect(&socket, &runtime.containerd_namespace, &runtime.snapshotter)
            .await
            .map_err(|e| StepFailure::chain(&e))?;

    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        }))
        .await
        .map_err(|e| StepFailure(format!("listing Docker containers: {e}")))?;
    let running: Vec<(String, String)> = containers
        .iter()
        .map(|c| {
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_owned())
                .or_else(|| c.id.clone())
                .unwrap_or_default();
            (name, c.image.clone().unwrap_or_default())
        })
        .collect();
    if let Some((name, image)) = k3s_in_docker(&running) {
        return Err(StepFailure(format!(
            "k3s runs inside Docker (container {name}, image {image}); k3s in Docker is \
             forbidden for UniDesk nodes: stop and remove that container and use the native k3s"
        )));
    }
    log.decision("target_k3s_native", "ok").await;
    Ok(Target {
        cluster,
        containerd,
    })
}

/// The first running container whose image is `rancher/k3s`, if any.
fn k3s_in_docker(running: &[(String, String)]) -> Option<(String, String)> {
    running
        .iter()
        .find(|(_, image)| {
            let repo = image.split([':', '@']).next().unwrap_or(image);
            let repo = repo
                .strip_prefix("docker.io/")
                .unwrap_or(repo)
                .trim_start_matches("library/");
            repo == "rancher/k3s"
        })
        .cloned()
}

async fn narrowed_manifest(
    bytes: Vec<u8>,
    commit: git2::Oid,
    spec: &DeploySpec,
    k3s: &K3sSpec,
    log: &StepLog,
) -> Result<Vec<Object>, StepFailure> {
    let text = String::from_utf8(bytes).map_err(|_| {
        StepFailure(format!(
            "manifest {} at {commit} is not UTF-8 text",
            k3s.manifest
        ))
    })?;
    let objects = manifest::parse(&text)
        .map_err(|e| StepFailure(format!("manifest {} at {commit}: {e}", k3s.manifest)))?;
    let all = objects.len();
    let selection = Selection {
        service_id: spec.service_id.clone(),
        namespace: k3s.namespace.clone(),
        deployments: deployment_targets(k3s),
    };
    let narrowed = manifest::narrow(objects, &selection)
        .map_err(|e| StepFailure(format!("manifest {} at {commit}: {e}", k3s.manifest)))?;
    log.line(format!(
        "manifest {}: {} of {all} object(s) belong to {} in namespace {}: {}",
        k3s.manifest,
        narrowed.len(),
        spec.service_id,
        k3s.namespace,
        narrowed
            .iter()
            .map(Object::reference)
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;
    Ok(narrowed)
}

/// Fails, naming them, when images the objects run are neither in k3s's containerd nor the
/// one this launch imports.
async fn check_images_present(
    containerd: &Containerd,
    objects: &[Object],
    building: &str,
) -> Result<(), StepFailure> {
    let building = super::containerd::reference::normalize(building)
        .map_err(|e| StepFailure(e.to_string()))?;
    let mut missing = BTreeSet::new();
    for image in manifest::referenced_images(objects) {
        if image.contains(manifest::PLACEHOLDER_IMAGE) {
            continue;
        }
        let normalized = match super::containerd::reference::normalize(&image) {
            Ok(n) => n,
            Err(e) => return Err(StepFailure(format!("manifest image {image:?}: {e}"))),
        };
        if normalized == building {
            continue;
        }
        let present = containerd
            .has_image(&normalized)
            .await
            .map_err(|e| StepFailure::chain(&e))?;
        if !present {
            missing.insert(normalized);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(StepFailure(format!(
        "image(s) the manifest runs are not in k3s's containerd ({}, namespace {}): {}; nothing \
         is pulled at rollout time — run `unidesk-controller dev-env prewarm-images` first",
        containerd.socket().display(),
        containerd.namespace(),
        missing.into_iter().collect::<Vec<_>>().join(", ")
    )))
}

/// Whether the live service already proves `full` (then the deploy is a no-op), and a
/// summary of the proof.
async fn live_matches(
    target: &Target,
    spec: &DeploySpec,
    k3s: &K3sSpec,
    full: &str,
) -> Option<String> {
    tokio::time::timeout(
        LIVE_CHECK,
        prove(target, spec, k3s, full, Some(&spec.image)),
    )
    .await
    .ok()?
    .ok()
}

/// Reads the live evidence and judges it; `Ok` carries a summary, `Err` what disagreed.
async fn prove(
    target: &Target,
    spec: &DeploySpec,
    k3s: &K3sSpec,
    full: &str,
    image: Option<&str>,
) -> Result<String, String> {
    let cluster = &target.cluster;
    let mut deployments = Vec::new();
    for d in &k3s.deployments {
        deployments.push(
            cluster
                .deployment_evidence(&k3s.namespace, &d.name, &d.container)
                .await
                .map_err(|e| StepFailure::chain(&e).0)?,
        );
    }
    let mut health = Vec::new();
    if let Some(h) = &k3s.health {
        let answer = cluster
            .service_health(&k3s.namespace, &h.service, h.port, &h.path)
            .await
            .map_err(|e| StepFailure::chain(&e).0)?;
        health.push(HealthEvidence {
            source: format!(
                "service {}/{}:{}{} (API server service proxy)",
                k3s.namespace, h.service, h.port, h.path
            ),
            commit: kverify::health_commit(&answer),
        });
    }
    if let Some(r) = &k3s.frontend_route {
        let answer = cluster
            .frontend_route_health(&k3s.namespace, &r.service, r.port, &spec.service_id)
            .await
            .map_err(|e| StepFailure::chain(&e).0)?;
        health.push(HealthEvidence {
            source: format!(
                "frontend route /api/microservices/{}/health via {}/{}:{}",
                spec.service_id, k3s.namespace, r.service, r.port
            ),
            commit: kverify::health_commit(&answer),
        });
    }
    kverify::judge_verification(full, &deployments, &health).map_err(|e| e.to_string())?;
    if let Some(image) = image {
        let normalized =
            super::containerd::reference::normalize(image).map_err(|e| e.to_string())?;
        let labels = target
            .containerd
            .config_labels(&normalized)
            .await
            .map_err(|e| StepFailure::chain(&e).0)?;
        match labels.get(LABEL_SOURCE_COMMIT) {
            Some(c) if c.eq_ignore_ascii_case(full) => {}
            Some(c) => {
                return Err(format!(
                    "image {normalized} in k3s's containerd has label {LABEL_SOURCE_COMMIT}={c}, \
                     requested {full}"
                ));
            }
            None => {
                return Err(format!(
                    "image {normalized} in k3s's containerd has no {LABEL_SOURCE_COMMIT} label, \
                     requested {full}"
                ));
            }
        }
    }
    Ok(format!(
        "Deployment(s) {} annotated and running commit {full}{}{}",
        k3s.deployments
            .iter()
            .map(|d| format!("{}/{}", k3s.namespace, d.name))
            .collect::<Vec<_>>()
            .join(", "),
        image
            .map(|i| format!(", image {i} labelled with it"))
            .unwrap_or_default(),
        if health.is_empty() {
            String::new()
        } else {
            format!(
                ", health reports it ({})",
                health
                    .iter()
                    .map(|h| h.source.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    ))
}

/// Stops and removes the legacy direct Docker container; absent is fine (already migrated).
async fn remove_legacy(docker: &Docker, name: &str) -> Result<String, StepFailure> {
    let options = RemoveContainerOptions {
        force: true,
        v: false,
        link: false,
    };
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(format!(
            "legacy Docker container {name} stopped and removed after the verified rollout"
        )),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(format!("legacy Docker container {name} is already gone")),
        Err(e) => Err(StepFailure(format!(
            "the rollout is verified but the legacy Docker container {name} could not be \
             removed: {e}; remove it by hand so two copies never run"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3s_in_docker_is_found_by_image_repository() {
        let running = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, i)| (n.to_string(), i.to_string()))
                .collect()
        };
        assert_eq!(
            k3s_in_docker(&running(&[
                ("web", "nginx:1"),
                ("k3s-server", "rancher/k3s:v1.30.2-k3s1")
            ])),
            Some(("k3s-server".into(), "rancher/k3s:v1.30.2-k3s1".into()))
        );
        assert!(k3s_in_docker(&running(&[("x", "docker.io/rancher/k3s@sha256:abc")])).is_some());
        assert_eq!(
            k3s_in_docker(&running(&[
                ("pause", "rancher/mirrored-pause:3.6"),
                ("k3sctl", "unidesk-k3sctl-adapter:latest"),
                ("other", "rancher/k3s-upgrade:v1")
            ])),
            None
        );
    }
}
