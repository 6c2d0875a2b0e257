//! The deploy launch: Compose services here (materialize → build → recreate → verify); k3s
//! services in [`super::k3s`], which reuses this module's materialize and build.
//!
//! Every step runs on this node: the commit is fetched into the node's mirror (through the
//! egress tunnel unless the node's egress is direct), resolved to its full SHA, its tree is
//! streamed as the build context into the local Docker Engine, the service's container is
//! recreated from the new image, and the live container and its health endpoint must show the
//! requested commit and the image this launch built. A healthy service at another commit fails.

use std::time::Duration;

use tokio::time::Instant;

use bollard::Docker;
use tokio_util::sync::CancellationToken;
use unidesk_protocol::{DeployOutcome, DeploySpec, ExecutorSpec, LaunchStatus, ResultDetail, Step};

use super::build::{self, BuildBase, BuildRequest};
use super::compose::{self, ServiceContainer};
use super::materialize::{FetchNet, MirrorCache, dockerfile_in_context};
use super::steplog::StepLog;
use super::verify::{self, Expectation};
use super::{Executor, Outputs, StepFailure};
use crate::config::EgressMode;

/// How long to wait for a proxy probe and for the health endpoint after recreate.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the build context may sit between the tar writer and the Docker upload.
const CONTEXT_BUFFER_CHUNKS: usize = 16;

pub(super) type Failed = (LaunchStatus, String);

pub(super) fn failed(f: StepFailure) -> Failed {
    (LaunchStatus::Failed, f.0)
}

/// `host:port` of an http(s) repository URL, for probing the tunnel towards it.
pub(super) fn repo_authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.contains(':') {
        Some(authority.to_string())
    } else {
        Some(format!("{authority}:{default}"))
    }
}

/// The egress proxy URL every fetch and build of this node goes through; `None` when the
/// node's egress is direct.
pub(super) fn proxy_url(config: &crate::config::AgentConfig) -> Option<String> {
    match config.proxy.egress {
        EgressMode::Tunnel => Some(format!("http://{}", config.proxy.listen)),
        EgressMode::Direct => None,
    }
}

/// Runs a deploy launch.
pub(super) async fn run(
    exec: &Executor,
    launch: &unidesk_protocol::Launch,
    spec: &DeploySpec,
    outputs: &mut Outputs,
    cancel: &CancellationToken,
) -> Result<LaunchStatus, Failed> {
    let (project, service) = match &spec.executor {
        ExecutorSpec::K3s(k3s) => {
            return super::k3s::run(exec, launch, spec, k3s, outputs, cancel).await;
        }
        ExecutorSpec::Compose { project, service } => (project, service),
    };
    let config = &exec.config;
    let proxy = proxy_url(config);
    let mut outcome = DeployOutcome {
        resolved_commit: None,
        image: None,
        image_id: None,
        container_id: None,
        k3s: None,
    };
    let docker_socket = config.path(&config.runtime.docker_socket);
    let docker = crate::launch::probe::docker(&docker_socket, 600)
        .await
        .map_err(|e| (LaunchStatus::Failed, e))?;

    // Materialize: mirror, fetch, resolve.
    let (mirror, commit) = exec
        .step(launch, Step::Materialize, outputs, |log| {
            materialize(exec, spec, proxy.clone(), log, cancel.clone())
        })
        .await
        .map_err(failed)?;
    let full = commit.to_string();
    outcome.resolved_commit = Some(full.clone());
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    let current = compose::find_service_container(&docker, project.as_deref(), service)
        .await
        .map_err(|e| (LaunchStatus::Failed, e.to_string()))?;

    // The image tag the service really runs is the one to build; config naming another one
    // means config and the running Compose service disagree, which is settled before any
    // build, not guessed.
    if current.image != spec.image {
        return Err((
            LaunchStatus::Failed,
            format!(
                "config.json says service {} runs image {}, but its running container {} \
                 (compose project {}, service {}) runs {}; fix config.json or the compose \
                 file before deploying",
                spec.service_id,
                spec.image,
                current.name,
                current.project,
                current.service,
                current.image
            ),
        ));
    }
    if !spec.force
        && let Some(status) = live_matches(&docker, &current, &full, spec).await
    {
        exec.note(launch, format!(
                "live service {} already runs commit {full}; nothing to do (use --force to rebuild)",
                spec.service_id
            ))
            .await;
        outcome.image = Some(current.image.clone());
        outcome.image_id = Some(current.image_id.clone());
        outcome.container_id = Some(current.id.clone());
        outputs.detail = Some(ResultDetail::Deploy(outcome));
        return Ok(status);
    }
    if spec.dry_run {
        exec.note(
            launch,
            format!(
                "dry run: would build {} at {full} and recreate {}; stopping before any change",
                current.image, current.name
            ),
        )
        .await;
        return Ok(LaunchStatus::Succeeded);
    }

    // Build: the context streams from the mirror into the daemon, tagged with the image the
    // service really runs.
    let image = current.image.clone();
    let built = exec
        .step(launch, Step::Build, outputs, |log| {
            build_image(
                &docker,
                spec,
                mirror,
                commit,
                image,
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

    // Recreate only this service's container; a failure restores the previous one.
    let deploy_env = vec![
        (
            "UNIDESK_DEPLOY_SERVICE_ID".to_string(),
            spec.service_id.clone(),
        ),
        ("UNIDESK_DEPLOY_REPO".to_string(), spec.repo_url.clone()),
        ("UNIDESK_DEPLOY_COMMIT".to_string(), full.clone()),
        (
            "UNIDESK_DEPLOY_REQUESTED_COMMIT".to_string(),
            spec.requested_commit.clone(),
        ),
    ];
    let recreated = exec
        .step(launch, Step::Recreate, outputs, |log| {
            let (docker, current, image) = (&docker, &current, &built.image);
            async move {
                compose::recreate(docker, current, image, &deploy_env, &log, cancel)
                    .await
                    .map_err(|e| StepFailure::chain(&e))
            }
        })
        .await
        .map_err(failed)?;
    outcome.container_id = Some(recreated.container_id.clone());
    outputs.detail = Some(ResultDetail::Deploy(outcome.clone()));

    // Verify: the live container runs the image built here, labelled with the commit, and the
    // health endpoint (when configured) reports the same commit.
    let expectation = Expectation {
        service_id: spec.service_id.clone(),
        commit: full.clone(),
        image_id: built.image_id.clone(),
    };
    let docker = &docker;
    exec.step(launch, Step::Verify, outputs, |log| async move {
        let observed = verify::observe(
            docker,
            &recreated.container_id,
            spec.health_url.as_deref(),
            Instant::now() + VERIFY_TIMEOUT,
        )
        .await
        .map_err(|e| StepFailure::chain(&e))?;
        verify::judge(&expectation, &observed).map_err(|e| StepFailure::chain(&e))?;
        log.line(format!(
            "verified: container {} runs image {} of commit {}",
            recreated.container_id, expectation.image_id, expectation.commit
        ))
        .await;
        Ok(())
    })
    .await
    .map_err(failed)?;
    Ok(LaunchStatus::Succeeded)
}

/// Whether the live service already runs `commit` from an image labelled with it (and, with a
/// health URL, reports it): then the deploy is a no-op.
async fn live_matches(
    docker: &Docker,
    current: &ServiceContainer,
    commit: &str,
    spec: &DeploySpec,
) -> Option<LaunchStatus> {
    let observed = verify::observe(
        docker,
        &current.id,
        spec.health_url.as_deref(),
        Instant::now() + Duration::from_secs(5),
    )
    .await
    .ok()?;
    let expectation = Expectation {
        service_id: spec.service_id.clone(),
        commit: commit.to_string(),
        image_id: current.image_id.clone(),
    };
    verify::judge(&expectation, &observed)
        .ok()
        .map(|()| LaunchStatus::Noop)
}

async fn probe(proxy: &str, target: &str, key: &str, log: &StepLog) -> Result<(), StepFailure> {
    build::probe_proxy(proxy, target, PROBE_TIMEOUT, log, key)
        .await
        .map_err(|e| StepFailure(format!("{e}; not falling back to a direct connection")))
}

pub(super) async fn materialize(
    exec: &Executor,
    spec: &DeploySpec,
    proxy: Option<String>,
    log: StepLog,
    cancel: CancellationToken,
) -> Result<(super::materialize::Mirror, git2::Oid), StepFailure> {
    match &proxy {
        Some(p) => {
            log.decision(
                "target_source_proxy",
                &format!("provider-gateway-ws-egress:{p}"),
            )
            .await;
            if let Some(target) = repo_authority(&spec.repo_url) {
                probe(p, &target, "target_source_proxy_probe", &log).await?;
            }
        }
        None => log.decision("target_source_proxy", "direct").await,
    }
    let extra_ca =
        match &exec.config.proxy.git_ca {
            Some(path) => {
                let path = exec.config.path(path);
                Some(std::fs::read(&path).map_err(|e| {
                    StepFailure(format!("cannot read git CA {}: {e}", path.display()))
                })?)
            }
            None => None,
        };
    let cache = MirrorCache::new(exec.config.path(&exec.config.dirs.cache).join("mirrors"));
    let url = spec.repo_url.clone();
    let requested = spec.requested_commit.clone();
    let net = FetchNet {
        proxy,
        extra_ca_pem: extra_ca,
    };
    let blocking_log = log.clone();
    let fetched = tokio::task::spawn_blocking(move || {
        let mirror = cache.fetch(&url, &net, &cancel, |line| blocking_log.blocking_line(line))?;
        let oid = mirror.resolve(&requested)?;
        Ok::<_, super::materialize::MaterializeError>((mirror, oid))
    })
    .await
    .map_err(|e| StepFailure(format!("fetch task failed: {e}")))?
    .map_err(|e| StepFailure::chain(&e))?;
    log.decision("resolved_commit", &fetched.1.to_string())
        .await;
    Ok(fetched)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn build_image(
    docker: &Docker,
    spec: &DeploySpec,
    mirror: super::materialize::Mirror,
    commit: git2::Oid,
    image: String,
    proxy: Option<String>,
    log: StepLog,
    cancel: &CancellationToken,
) -> Result<build::BuildOutput, StepFailure> {
    if let Some(p) = &proxy {
        let target =
            repo_authority(&spec.repo_url).unwrap_or_else(|| build::DEFAULT_PROBE_TARGET.into());
        probe(p, &target, "target_build_proxy_probe", &log).await?;
    }
    let dockerfile = dockerfile_in_context(&spec.context, &spec.dockerfile)
        .map_err(|e| StepFailure::chain(&e))?;
    let (mut writer, body) = build::context_channel(CONTEXT_BUFFER_CHUNKS);
    let context = spec.context.clone();
    let repo_dockerfile = spec.dockerfile.clone();
    let tar_log = log.clone();
    let tar = tokio::task::spawn_blocking(move || {
        let result = mirror
            .write_context_tar(commit, &context, &repo_dockerfile, &mut writer)
            .map_err(|e| StepFailure::chain(&e))
            // Only a finished writer ends the stream cleanly; dropping it aborts the upload,
            // so the daemon never builds from a cut context.
            .and_then(|stats| {
                writer
                    .finish()
                    .map(|()| stats)
                    .map_err(|e| StepFailure(format!("ending the build context stream: {e}")))
            });
        match &result {
            Ok(stats) => tar_log.blocking_line(format!(
                "context: {} files, {} bytes, {} excluded by .dockerignore or export-ignore",
                stats.files, stats.bytes, stats.excluded
            )),
            Err(e) => tar_log.blocking_line(format!("context stream failed: {}", e.0)),
        }
        result
    });
    let request = BuildRequest {
        service_id: spec.service_id.clone(),
        repo_url: spec.repo_url.clone(),
        commit: commit.to_string(),
        dockerfile,
        image,
        proxy,
        build_base: spec.build_base.as_ref().map(|b| BuildBase {
            arg: b.arg.clone(),
            candidates: b.candidates.clone(),
        }),
        timeout: Duration::from_millis(spec.build_timeout_ms),
    };
    let built = build::build(docker, &request, body, &log, cancel).await;
    let tarred = tar.await;
    let built = built.map_err(|e| StepFailure::chain(&e))?;
    match tarred {
        Ok(Ok(_)) => Ok(built),
        Ok(Err(e)) => Err(StepFailure(format!("build context: {}", e.0))),
        Err(e) => Err(StepFailure(format!("build context task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_authorities() {
        assert_eq!(
            repo_authority("https://github.com/a/b").as_deref(),
            Some("github.com:443")
        );
        assert_eq!(
            repo_authority("http://127.0.0.1:8080/x.git").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(repo_authority("https://u:p@h/x").as_deref(), Some("h:443"));
        assert_eq!(repo_authority("file:///srv/x"), None);
    }
}
