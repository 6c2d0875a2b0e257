//! `unidesk-controller demo`: the embedded default, end to end on one machine.
//!
//! Generates TLS and credentials (`init`), starts a controller and an agent on loopback, makes
//! a sample service repository served over smart HTTP on loopback (reached by the agent only
//! through its egress tunnel), starts the service's first container as Compose would, then
//! deploys commit A by full SHA and commit B by a 7-character SHA through the same path as
//! `deploy apply`, verifies both, then takes the k3s path as far as this machine allows (the
//! image imported into k3s's containerd and checked complete and unpacked; apply and rollout
//! need a Kubernetes API server and are reported as not run), and prints the jobs, the run
//! directories and what to run next. Without Docker or containerd it says which is missing
//! and how to start it.

pub mod sample;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use tokio_util::sync::CancellationToken;
use unidesk_agent::config::AgentConfig;
use unidesk_protocol::AgentId;

use crate::cli::deploy::{ApplyOptions, apply};
use crate::cli::{CliError, output};
use crate::config::ControllerConfig;
use crate::desired::{catalog, manifest};
use crate::gitserve::GitServer;
use crate::hub::now_ms;
use sample::{BASE_IMAGE, SampleRepo, dockerfile};

const AGENT: &str = "demo-node";
const PROJECT: &str = "unidesk-demo";
const SERVICE: &str = "web";
const SERVICE_ID: &str = "demo-web";
const CONTAINER: &str = "unidesk-demo-web-1";
const IMAGE: &str = "unidesk-demo-web:latest";
const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// k3s's own containerd (the testbed's stand-in), where the k3s path imports images.
const K3S_CONTAINERD_SOCKET: &str = "/run/k3s/containerd/containerd.sock";
const JOB_WAIT: Duration = Duration::from_secs(600);

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CliError::Failed(anyhow!("no free loopback port: {e}")))
}

fn failed(e: impl Into<anyhow::Error>) -> CliError {
    CliError::Failed(e.into())
}

/// Checks that Docker (with the base image) and containerd are there, saying how to start
/// what is missing.
async fn preflight() -> Result<Docker, CliError> {
    let docker = unidesk_agent::launch::probe::docker(Path::new(DOCKER_SOCKET), 30)
        .await
        .map_err(|e| {
            CliError::Unreachable(anyhow!(
                "Docker Engine is not reachable: {e}. Start it with `bash scripts/testbed-up` \
                 (or `dockerd --containerd={CONTAINERD_SOCKET} --bridge=none --iptables=false &`)"
            ))
        })?;
    if tokio::net::UnixStream::connect(CONTAINERD_SOCKET)
        .await
        .is_err()
    {
        return Err(CliError::Unreachable(anyhow!(
            "containerd is not reachable at {CONTAINERD_SOCKET}. Start it with \
             `bash scripts/testbed-up` (or `containerd &`)"
        )));
    }
    if docker.inspect_image(BASE_IMAGE).await.is_err() {
        return Err(CliError::Unreachable(anyhow!(
            "the base image {BASE_IMAGE} is missing (nothing is pulled here). Make it with \
             `bash scripts/testbed-up`"
        )));
    }
    Ok(docker)
}

/// Runs the demo. `dir` keeps the setup; by default a new directory under /tmp.
pub async fn run(dir: Option<PathBuf>) -> Result<(), CliError> {
    let docker = preflight().await?;
    let dir = dir.unwrap_or_else(|| PathBuf::from(format!("/tmp/unidesk-demo-{}", now_ms())));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))
        .map_err(CliError::Input)?;
    let cancel = CancellationToken::new();
    let result = demo(&docker, &dir, &cancel).await;
    cancel.cancel();
    // The demo's service container goes; its images stay as the cache for the next run.
    let _ = docker
        .remove_container(
            CONTAINER,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    result
}

async fn demo(docker: &Docker, dir: &Path, cancel: &CancellationToken) -> Result<(), CliError> {
    let setup = dir.join("setup");
    let listen = format!("127.0.0.1:{}", free_port()?)
        .parse()
        .map_err(|e| failed(anyhow!("{e}")))?;
    let agent_id = AgentId::new(AGENT).map_err(failed)?;
    crate::init::init(&crate::init::InitPlan {
        dir: setup.clone(),
        layout: crate::init::Layout::Local,
        agents: vec![agent_id.clone()],
        listen,
        proxy_port: free_port()?,
        egress_allow: vec!["127.0.0.1:*".into(), "cidr:127.0.0.0/8".into()],
    })
    .map_err(|e| CliError::Input(e.into()))?;
    output::line(&format!("demo: setup written to {}", setup.display()));

    // The sample service: two commits of a repository served over smart HTTP on loopback.
    let git_root = dir.join("git");
    let repo = SampleRepo::create(&git_root, "sample").map_err(failed)?;
    let port = free_port()?;
    let health = "$UNIDESK_DEPLOY_COMMIT";
    let ignore = "notes/\n";
    let commit_a = repo
        .commit(
            "sample service, first version",
            &[
                ("Dockerfile", &dockerfile(port, health, "")),
                (".dockerignore", ignore),
                ("index.html", "version A\n"),
                ("notes/todo.md", "not part of the image\n"),
            ],
        )
        .map_err(failed)?;
    let commit_b = repo
        .commit(
            "sample service, second version",
            &[
                ("Dockerfile", &dockerfile(port, health, "")),
                (".dockerignore", ignore),
                ("index.html", "version B\n"),
                ("notes/todo.md", "still not part of the image\n"),
            ],
        )
        .map_err(failed)?;
    let server = GitServer::start(git_root, None).await.map_err(failed)?;
    let repo_url = server.url("sample.git");
    output::line(&format!(
        "demo: sample repository {repo_url} (commits {commit_a}, {commit_b})"
    ));

    let catalog_json = serde_json::json!({
        "microservices": [{
            "id": SERVICE_ID,
            "repository": { "url": repo_url },
            "deployment": {
                "mode": "unidesk-direct",
                "node": AGENT,
                "dockerfile": "Dockerfile",
                "context": ".",
                "image": IMAGE,
                "healthUrl": format!("http://127.0.0.1:{port}/health"),
                "compose": { "project": PROJECT, "service": SERVICE }
            }
        }],
        "nodes": { AGENT: { "agent": AGENT, "egress": "tunnel" } }
    });
    let catalog_path = dir.join("config.json");
    write_json(&catalog_path, &catalog_json)?;
    let catalog = catalog::load(&catalog_path)
        .map_err(|e| failed(anyhow!(e)))?
        .catalog;

    // The controller and the agent, in this process, on loopback.
    let config = ControllerConfig::load(&setup.join("controller.toml")).map_err(failed)?;
    let bound = crate::serve::bind(&config).await.map_err(CliError::Input)?;
    let hub = bound.hub.clone();
    tokio::spawn(bound.run(cancel.clone()));
    let agent_config =
        AgentConfig::load(&setup.join(format!("agent-{AGENT}.toml"))).map_err(failed)?;
    let secret = agent_config
        .secret
        .clone()
        .ok_or_else(|| failed(anyhow!("init wrote no agent secret")))?;
    let agent_cancel = cancel.clone();
    tokio::spawn(async move {
        if let Err(e) = unidesk_agent::service::run(
            agent_config,
            secret,
            unidesk_agent::notify::Notifier::default(),
            agent_cancel,
        )
        .await
        {
            tracing::error!("demo agent stopped: {e:#}");
        }
    });
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !hub.agents().iter().any(|a| a.id == agent_id) {
        if tokio::time::Instant::now() > until {
            return Err(CliError::Failed(anyhow!(
                "the demo agent did not connect within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    output::line(&format!("demo: agent {AGENT} connected"));

    start_first_container(docker, port).await?;
    output::line(&format!(
        "demo: service {SERVICE} of compose project {PROJECT} running (container {CONTAINER})"
    ));

    let mut jobs = Vec::new();
    for (label, commit) in [
        ("A (full SHA)", commit_a.to_string()),
        ("B (7-character SHA)", commit_b.to_string()[..7].to_string()),
    ] {
        let manifest_json = serde_json::json!({
            "schemaVersion": 1,
            "services": [{ "id": SERVICE_ID, "repo": repo_url, "commitId": commit }]
        });
        let manifest_path = dir.join("deploy.json");
        write_json(&manifest_path, &manifest_json)?;
        let manifest = manifest::load(&manifest_path).map_err(|e| CliError::Input(e.into()))?;
        output::line(&format!("demo: deploy apply {label}: commitId {commit}"));
        let submitted = apply(&config, &manifest, &catalog, &ApplyOptions::default()).await?;
        let store =
            crate::store::JobStore::open(&config.path(&config.store.dir)).map_err(failed)?;
        for job in submitted {
            let done = crate::cli::jobs::wait_for(&store, job.job_id.as_str(), JOB_WAIT).await?;
            let ok = done.result.as_ref().is_some_and(|r| r.status.is_ok());
            output::line(&format!(
                "demo:   job {} ended {:?}{}",
                done.job_id,
                done.status,
                done.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
            if !ok {
                let tail = store.tail_events(&done.job_id, 6000).unwrap_or_default();
                return Err(CliError::Failed(anyhow!(
                    "demo deploy {label} failed; last events:\n{tail}"
                )));
            }
            jobs.push(done);
        }
    }

    let k3s = k3s_import(docker, cancel).await?;

    let runs = setup.join(format!("agent-{AGENT}/runs"));
    let config_path = setup.join("controller.toml");
    output::json(&serde_json::json!({
        "ok": true,
        "service": SERVICE_ID,
        "commits": [commit_a.to_string(), commit_b.to_string()],
        "k3s": k3s,
        "jobs": jobs.iter().map(|j| serde_json::json!({
            "jobId": j.job_id,
            "status": j.status,
            "resolvedCommit": match &j.result.as_ref().map(|r| &r.detail) {
                Some(unidesk_protocol::ResultDetail::Deploy(d)) => d.resolved_commit.clone(),
                _ => None,
            },
            "resultDir": runs.join(j.run_id.as_str()),
        })).collect::<Vec<_>>(),
        "next": jobs.iter().flat_map(|j| [
            format!("unidesk-controller job status {} --config {}", j.job_id, config_path.display()),
            format!("unidesk-controller job logs {} --config {}", j.job_id, config_path.display()),
            format!("cat {}", runs.join(j.run_id.as_str()).join("result.json").display()),
        ]).collect::<Vec<_>>(),
    }));
    Ok(())
}

/// The k3s path as far as this machine allows: the deployed image streamed from Docker into
/// k3s's containerd, checked complete and unpacked there. Apply and rollout need a Kubernetes
/// API server, which the demo does not have; it says so instead of pretending.
async fn k3s_import(
    docker: &Docker,
    cancel: &CancellationToken,
) -> Result<serde_json::Value, CliError> {
    use unidesk_agent::launch::containerd::Containerd;
    use unidesk_agent::launch::steplog::StepLog;
    let socket = Path::new(K3S_CONTAINERD_SOCKET);
    let containerd = Containerd::connect(socket, "k8s.io", "overlayfs")
        .await
        .map_err(|e| {
            CliError::Unreachable(anyhow!(
                "{e}. Start k3s's containerd (or the testbed's stand-in) with \
                 `bash scripts/testbed-up`"
            ))
        })?;
    output::line(&format!(
        "demo: k3s path: importing {IMAGE} into k3s's containerd ({K3S_CONTAINERD_SOCKET}, \
         namespace k8s.io)"
    ));
    let (log, mut lines) = StepLog::channel(unidesk_protocol::Step::Import, 64);
    let printer = tokio::spawn(async move {
        while let Some(l) = lines.recv().await {
            output::line(&format!("demo:   [import] {}", l.line));
        }
    });
    let names = [IMAGE.to_string()];
    let imported = containerd
        .import_from_docker(docker, IMAGE, &names, &log, cancel)
        .await;
    drop(log);
    let _ = printer.await;
    let report = imported.map_err(|e| failed(anyhow!("k3s import of {IMAGE}: {e}")))?;
    let name = report.names.first().cloned().unwrap_or_default();
    let check = containerd
        .check(&name)
        .await
        .map_err(|e| failed(anyhow!("checking {name} in k3s's containerd: {e}")))?;
    if !(check.complete && check.unpacked) {
        return Err(failed(anyhow!(
            "{name} in k3s's containerd is not usable: complete={} ({}/{} blobs), unpacked={}",
            check.complete,
            check.present,
            check.required,
            check.unpacked
        )));
    }
    output::line(&format!(
        "demo: k3s path: {name} is complete ({}/{} blobs) and unpacked for overlayfs; {} blob(s) \
         written, {} already present",
        check.present, check.required, report.blobs_written, report.blobs_skipped
    ));
    let not_run = "apply and rollout need a Kubernetes API server (a kubeconfig), which this \
                   machine does not have; they were not run";
    output::line(&format!("demo: k3s path: {not_run}"));
    Ok(serde_json::json!({
        "containerd": K3S_CONTAINERD_SOCKET,
        "image": name,
        "manifestDigest": report.manifest_digest,
        "complete": check.complete,
        "unpacked": check.unpacked,
        "pinned": check.labels.get("io.cri-containerd.pinned").map(String::as_str) == Some("pinned"),
        "applyAndRollout": not_run,
        "next": format!(
            "ctr --address {K3S_CONTAINERD_SOCKET} -n k8s.io images check name=={name}"
        ),
    }))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CliError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(failed)?;
    unidesk_agent::atomic::write_file(path, &bytes, 0o644)
        .with_context(|| format!("writing {}", path.display()))
        .map_err(CliError::Failed)
}

async fn build_first_image(docker: &Docker, port: u16) -> Result<(), CliError> {
    use futures::StreamExt;
    let dockerfile = dockerfile(port, "none", "");
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .map_err(failed)?;
    let context = tar.into_inner().map_err(failed)?;
    let options = bollard::query_parameters::BuildImageOptions {
        t: Some(IMAGE.to_string()),
        networkmode: Some("host".into()),
        rm: true,
        ..Default::default()
    };
    let mut stream = docker.build_image(
        options,
        None,
        Some(http_body_util::Either::Left(http_body_util::Full::new(
            bytes::Bytes::from(context),
        ))),
    );
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| failed(anyhow!("building the demo's first image: {e}")))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(failed(anyhow!("building the demo's first image: {err}")));
        }
    }
    Ok(())
}

/// Starts the service's first container the way `docker compose up` labels it, serving a
/// health file that names no commit yet.
async fn start_first_container(docker: &Docker, port: u16) -> Result<(), CliError> {
    let _ = docker
        .remove_container(
            CONTAINER,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    // The service's previous version: its own image, with its own CMD and a health file that
    // names no commit, as it would run after a first `docker compose up`.
    build_first_image(docker, port).await?;
    let labels = HashMap::from([
        (
            "com.docker.compose.project".to_string(),
            PROJECT.to_string(),
        ),
        (
            "com.docker.compose.service".to_string(),
            SERVICE.to_string(),
        ),
        (
            "com.docker.compose.container-number".to_string(),
            "1".to_string(),
        ),
        ("com.docker.compose.oneoff".to_string(), "False".to_string()),
    ]);
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_string()),
        labels: Some(labels),
        host_config: Some(HostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(CONTAINER.to_string()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(|e| failed(anyhow!("creating the demo's first container: {e}")))?;
    docker
        .start_container(
            CONTAINER,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .map_err(|e| failed(anyhow!("starting the demo's first container: {e}")))?;
    Ok(())
}
