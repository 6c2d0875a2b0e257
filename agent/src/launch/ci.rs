//! The CI launch (dev smoke CI on the CI node): preflight → materialize → build (or reuse) →
//! import → script → verify (isolation proof, namespace removal).
//!
//! Every input comes from one manifest commit: the script and `deploy.json` are read from that
//! commit's tree in the node's bare mirror (fetched through the egress proxy) and written as
//! plain files into `work/<runId>/`; a symlink entry is refused, never followed. The script runs
//! with exactly the seed's arguments and an explicit environment, in a process group of its
//! own that is killed as a whole at `timeoutMs`. Results go to `runs/<runId>/`: `launcher.log`
//! (this module's decisions), `runner.log` (the script's output), `script/` (the script's
//! `--result-dir`) and `result.json` (the agent's, keeping the script's valid fields).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListImagesOptions, TagImageOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use unidesk_protocol::{CiRunSpec, DeploySpec, ExecutorSpec, Launch, LaunchStatus, Step};

use super::build::LABEL_SOURCE_COMMIT;
use super::containerd::Containerd;
use super::deploy::{Failed, build_image, failed, materialize, proxy_url};
use super::k8s::cluster::Cluster;
use super::steplog::StepLog;
use super::{Executor, Outputs, StepFailure};
use crate::rundir::{CI_RESULT_DIR, CiRecord};

/// The largest script or manifest read from the commit.
const MAX_INPUT_BYTES: u64 = 4 * 1024 * 1024;
/// The largest script `result.json` the agent reads back.
const MAX_SCRIPT_RESULT_BYTES: u64 = 1024 * 1024;
/// The namespace the Tekton pipeline lives in, and the pipeline the script runs.
const TEKTON_NAMESPACE: &str = "unidesk-ci";
const TEKTON_PIPELINE: &str = "unidesk-dev-namespace-e2e";
/// The namespaces a CI run must not change.
const PROTECTED_NAMESPACES: [&str; 2] = ["unidesk", "unidesk-dev"];
/// What the isolation snapshot records: (apiVersion, kind, plural).
const SNAPSHOT_RESOURCES: [(&str, &str, &str); 5] = [
    ("apps/v1", "Deployment", "deployments"),
    ("apps/v1", "StatefulSet", "statefulsets"),
    ("v1", "Service", "services"),
    ("v1", "Secret", "secrets"),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
];
/// The only PATH the script gets.
const SCRIPT_PATH_ENV: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the output readers may take to drain after the process group is gone.
const DRAIN: Duration = Duration::from_secs(5);

/// The temporary namespace of a run.
pub(super) fn temporary_namespace(run_id: &str) -> String {
    format!("unidesk-ci-e2e-{run_id}")
}

/// Checks a CI `scriptPath` on the node too, with the protocol's one rule.
fn check_script_path(path: &str) -> Result<(), StepFailure> {
    unidesk_protocol::check_ci_script_path(path)
        .map_err(|why| StepFailure(format!("script path {path:?} refused: {why}")))
}

fn is_full_sha(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `launcher.log`: the agent's own decisions for this run, one line each.
#[derive(Clone)]
struct Launcher {
    path: PathBuf,
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl Launcher {
    fn open(path: PathBuf) -> Launcher {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(
                |e| tracing::warn!(path = %path.display(), error = %e, "cannot open launcher.log"),
            )
            .ok();
        Launcher {
            path,
            file: Arc::new(Mutex::new(file)),
        }
    }

    fn line(&self, line: &str) {
        tracing::info!(target: "ci", "{line}");
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = guard.as_mut()
            && let Err(e) = writeln!(f, "{line}").and_then(|()| f.sync_data())
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot append to launcher.log");
        }
    }

    async fn decision(&self, log: &StepLog, key: &str, value: &str) {
        self.line(&format!("{key}={value}"));
        log.decision(key, value).await;
    }
}

/// Runs a CI launch.
pub(super) async fn run(
    exec: &Executor,
    launch: &Launch,
    spec: &CiRunSpec,
    outputs: &mut Outputs,
    cancel: &CancellationToken,
) -> Result<LaunchStatus, Failed> {
    let config = &exec.config;
    let run_id = launch.run_id.as_str().to_owned();
    let run_dir = exec.events.runs().dir(&launch.run_id);
    let work_dir = config.path(&config.dirs.work).join(&run_id);
    let namespace = temporary_namespace(&run_id);
    let launcher = Launcher::open(run_dir.join("launcher.log"));
    let mut record = CiRecord {
        ci_status: "failed".into(),
        manifest_commit: spec.manifest_commit.clone(),
        pipeline_run: None,
        temporary_namespace: namespace.clone(),
        namespace_deleted: false,
        finished_at: finished_at(),
        exit_status: None,
        isolation_changes: Vec::new(),
        ci_image: None,
        ci_image_reused: None,
        script_result: None,
    };
    outputs.ci = Some(record.clone());
    launcher.line(&format!("ci_run_id={run_id}"));
    launcher.line(&format!("ci_manifest_commit={}", spec.manifest_commit));
    launcher.line(&format!("ci_result_dir={}", run_dir.display()));
    launcher.line(&format!("ci_work_dir={}", work_dir.display()));

    // Refused before anything runs: the controller checks the same, the node does not trust it.
    let refuse = |why: String| {
        launcher.line(&format!("ci_refused={why}"));
        Err((LaunchStatus::Failed, why))
    };
    if let Err(e) = check_script_path(&spec.script_path) {
        return refuse(e.0);
    }
    if !is_full_sha(&spec.manifest_commit) {
        return refuse(format!(
            "manifest commit {:?} is not a full 40-hex SHA",
            spec.manifest_commit
        ));
    }
    if !is_full_sha(&spec.code_queue.commit) {
        return refuse(format!(
            "{} commit {:?} is not a full 40-hex SHA",
            spec.code_queue.service_id, spec.code_queue.commit
        ));
    }
    if namespace.len() > 63 {
        return refuse(format!(
            "temporary namespace {namespace} is longer than 63 characters"
        ));
    }
    if spec.manifest_path != "deploy.json" {
        return refuse(format!(
            "manifest path {:?} refused: only deploy.json",
            spec.manifest_path
        ));
    }
    for dir in [&work_dir, &run_dir.join(CI_RESULT_DIR)] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return refuse(format!("cannot create {}: {e}", dir.display()));
        }
    }

    let proxy = proxy_url(config);
    let kubeconfig = config.path(&config.runtime.kubeconfig);
    let docker_socket = config.path(&config.runtime.docker_socket);
    let docker = crate::launch::probe::docker(&docker_socket, 600)
        .await
        .map_err(|e| (LaunchStatus::Failed, e))?;

    // Preflight: the native k3s API through the configured kubeconfig, the Tekton pipeline,
    // and the egress tunnel. A missing one fails the run now, naming it.
    let cluster = exec
        .step(launch, Step::Preflight, outputs, |log| {
            preflight(&kubeconfig, proxy.as_deref(), spec, &launcher, log)
        })
        .await
        .map_err(failed)?;

    // Materialize: the manifest commit through the proxy; the script and deploy.json from it.
    let manifest_fetch = fetch_spec(&spec.repo_url, &spec.manifest_commit);
    let script_file = work_dir.join("runner.sh");
    let manifest_file = work_dir.join("deploy.json");
    exec.step(launch, Step::Materialize, outputs, |log| {
        let (launcher, proxy) = (launcher.clone(), proxy.clone());
        let (script_file, manifest_file) = (script_file.clone(), manifest_file.clone());
        let manifest_fetch = &manifest_fetch;
        async move {
            let (mirror, commit) =
                materialize(exec, manifest_fetch, proxy, log.clone(), cancel.clone()).await?;
            if commit.to_string() != spec.manifest_commit {
                return Err(StepFailure(format!(
                    "manifest commit {} resolved to {commit}",
                    spec.manifest_commit
                )));
            }
            let script = read_regular_blob(&mirror, commit, &spec.script_path)?;
            let manifest = read_regular_blob(&mirror, commit, &spec.manifest_path)?;
            check_code_queue(&manifest, spec)?;
            crate::atomic::write_file(&script_file, &script, 0o700)
                .map_err(|e| StepFailure(format!("cannot write {}: {e}", script_file.display())))?;
            crate::atomic::write_file(&manifest_file, &manifest, 0o644).map_err(|e| {
                StepFailure(format!("cannot write {}: {e}", manifest_file.display()))
            })?;
            launcher
                .decision(&log, "ci_script", &format!("{commit}:{}", spec.script_path))
                .await;
            launcher
                .decision(
                    &log,
                    "ci_manifest",
                    &format!("{commit}:{}", spec.manifest_path),
                )
                .await;
            Ok(())
        }
    })
    .await
    .map_err(failed)?;

    // Build or reuse the Code Queue image of its commit.
    let image = &spec.code_queue.image;
    let (image_id, reused) = exec
        .step(launch, Step::Build, outputs, |log| {
            build_or_reuse(exec, &docker, spec, proxy.clone(), &launcher, log, cancel)
        })
        .await
        .map_err(failed)?;
    record.ci_image = Some(image.clone());
    record.ci_image_reused = Some(reused);
    outputs.ci = Some(record.clone());

    // Import into k3s's containerd (a no-op when it already holds that image).
    let runtime = &config.runtime;
    let socket = config.path(&runtime.containerd_socket);
    exec.step(launch, Step::Import, outputs, |log| {
        let (docker, image_id, launcher) = (&docker, &image_id, &launcher);
        async move {
            let containerd =
                Containerd::connect(&socket, &runtime.containerd_namespace, &runtime.snapshotter)
                    .await
                    .map_err(|e| StepFailure::chain(&e))?;
            let report = containerd
                .import_from_docker(docker, image_id, std::slice::from_ref(image), &log, cancel)
                .await
                .map_err(|e| StepFailure::chain(&e))?;
            launcher
                .decision(&log, "ci_image_imported", &report.manifest_digest)
                .await;
            // The smoke's foundation (the seed's postgres:16-alpine) must be in k3s's containerd
            // before the PipelineRun starts pods: nothing is pulled at rollout.
            super::k3s::import_foundation(
                &containerd,
                docker,
                &runtime.prewarm_images,
                &log,
                cancel,
            )
            .await?;
            for image in &runtime.prewarm_images {
                launcher.line(&format!("ci_foundation_imported={image}"));
            }
            Ok(())
        }
    })
    .await
    .map_err(failed)?;

    // The isolation snapshot before, the script, the snapshot after.
    let before = snapshot(&cluster).await.map_err(|e| {
        (
            LaunchStatus::Failed,
            format!("isolation snapshot before: {}", e.0),
        )
    })?;
    launcher.line(&format!("ci_isolation_snapshot_before={}", before.len()));
    let args = script_args(spec, &run_id, &manifest_file, &run_dir.join(CI_RESULT_DIR));
    let mut env = vec![
        ("KUBECONFIG".to_owned(), kubeconfig.display().to_string()),
        ("PATH".to_owned(), SCRIPT_PATH_ENV.to_owned()),
        ("UNIDESK_CI_IMAGE".to_owned(), image.clone()),
        ("UNIDESK_CI_RUN_ID".to_owned(), run_id.clone()),
    ];
    if let Some(p) = &proxy {
        for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((key.to_owned(), p.clone()));
        }
        for key in ["NO_PROXY", "no_proxy"] {
            env.push((key.to_owned(), "127.0.0.1,localhost".to_owned()));
        }
    }
    let ran = exec
        .step(launch, Step::Script, outputs, |log| {
            let runner_log = run_dir.join("runner.log");
            let (launcher, script_file, work_dir) = (&launcher, &script_file, &work_dir);
            let (args, env) = (&args, &env);
            async move {
                launcher
                    .decision(&log, "ci_script_args", &args.join(" "))
                    .await;
                let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
                launcher
                    .decision(&log, "ci_script_env", &names.join(","))
                    .await;
                let ran = run_script(
                    script_file,
                    work_dir,
                    args,
                    env,
                    &runner_log,
                    Duration::from_millis(spec.timeout_ms),
                    &log,
                )
                .await?;
                match ran {
                    Ran::Exited(code) => {
                        launcher
                            .decision(
                                &log,
                                "ci_script_exit",
                                &code.map_or("signal".into(), |c| c.to_string()),
                            )
                            .await
                    }
                    Ran::TimedOut => {
                        launcher
                            .decision(&log, "ci_script_timeout", &format!("{}ms", spec.timeout_ms))
                            .await
                    }
                }
                Ok(ran)
            }
        })
        .await;
    let ran = match ran {
        Ok(r) => r,
        Err(e) => {
            outputs.ci = Some(record);
            return Err(failed(e));
        }
    };

    // Verify: isolation, the script's own result, the namespace removal.
    let (status, error) = exec
        .step(launch, Step::Verify, outputs, |log| {
            let (launcher, cluster, before, record) = (&launcher, &cluster, &before, &mut record);
            let namespace = &namespace;
            let run_dir = &run_dir;
            async move {
                let after = snapshot(cluster).await?;
                record.isolation_changes = diff(before, &after);
                for change in &record.isolation_changes {
                    launcher
                        .decision(&log, "ci_isolation_changed", change)
                        .await;
                }
                let script_dir = run_dir.join(CI_RESULT_DIR);
                record.pipeline_run = std::fs::read_to_string(script_dir.join("pipelinerun.txt"))
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty());
                let script_result = read_script_result(&script_dir.join("result.json"));
                match &script_result {
                    Ok(v) => {
                        if let Some(p) = v.get("pipelineRun").and_then(|p| p.as_str()) {
                            record.pipeline_run = Some(p.to_owned());
                        }
                        record.script_result = Some(v.clone());
                        launcher.decision(&log, "ci_script_result", "valid").await;
                    }
                    Err(why) => {
                        launcher
                            .decision(&log, "ci_script_result", &format!("invalid: {why}"))
                            .await;
                    }
                }
                if let Ran::Exited(code) = ran {
                    record.exit_status = code;
                }
                let (status, error) = judge(ran, record, script_result.as_ref().err());
                record.ci_status = status.to_owned();
                if spec.keep_namespace {
                    launcher
                        .decision(&log, "ci_namespace_kept", namespace)
                        .await;
                } else {
                    match cluster.delete_namespace(namespace).await {
                        Ok(()) => {
                            record.namespace_deleted = true;
                            launcher
                                .decision(&log, "ci_namespace_deleted", namespace)
                                .await;
                        }
                        Err(e) => {
                            launcher
                                .decision(
                                    &log,
                                    "ci_namespace_delete_failed",
                                    &format!("{namespace}: {e}"),
                                )
                                .await;
                        }
                    }
                }
                Ok((status, error))
            }
        })
        .await
        .map_err(failed)?;
    record.finished_at = finished_at();
    launcher.line(&format!("ci_status={status}"));
    outputs.ci = Some(record);
    match (status, error) {
        ("succeeded", _) => Ok(LaunchStatus::Succeeded),
        ("timeout", e) => Err((
            LaunchStatus::TimedOut,
            e.unwrap_or_else(|| "the CI script timed out".into()),
        )),
        (_, e) => Err((
            LaunchStatus::Failed,
            e.unwrap_or_else(|| format!("the CI run ended {status}")),
        )),
    }
}

/// The CI status and the error that goes with it.
fn judge(
    ran: Ran,
    record: &CiRecord,
    script_result_error: Option<&String>,
) -> (&'static str, Option<String>) {
    if matches!(ran, Ran::TimedOut) {
        return (
            "timeout",
            Some("the CI script ran past timeoutMs; its process group was killed".into()),
        );
    }
    if !record.isolation_changes.is_empty() {
        return (
            "isolation-violated",
            Some(format!(
                "the run changed protected objects: {}",
                record.isolation_changes.join(", ")
            )),
        );
    }
    match record.exit_status {
        Some(0) => {}
        Some(code) => {
            return (
                "failed",
                Some(format!("the CI script exited with status {code}")),
            );
        }
        None => {
            return (
                "failed",
                Some("the CI script was killed by a signal".into()),
            );
        }
    }
    let Some(script) = &record.script_result else {
        return (
            "failed",
            Some(format!(
                "the CI script exited 0 without a valid result.json ({})",
                script_result_error.map_or("missing", String::as_str)
            )),
        );
    };
    let script_ok = script.get("ok").and_then(serde_json::Value::as_bool);
    let script_status = script.get("status").and_then(serde_json::Value::as_str);
    if script_ok == Some(true) && script_status.is_none_or(|s| s == "succeeded") {
        ("succeeded", None)
    } else {
        (
            "failed",
            Some(format!(
                "the CI script reported ok={} status={}",
                script_ok.map_or("missing".into(), |b| b.to_string()),
                script_status.unwrap_or("missing")
            )),
        )
    }
}

fn read_script_result(path: &Path) -> Result<serde_json::Value, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_SCRIPT_RESULT_BYTES {
        return Err(format!(
            "{} is larger than {MAX_SCRIPT_RESULT_BYTES} bytes",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(format!("{} is not a JSON object", path.display()))
    }
}

/// Now, RFC 3339 UTC (`finishedAt`).
pub(super) fn finished_at() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The script's arguments: exactly the seed's contract.
fn script_args(spec: &CiRunSpec, run_id: &str, manifest: &Path, result_dir: &Path) -> Vec<String> {
    let mut args = vec![
        "--run-id".to_owned(),
        run_id.to_owned(),
        "--repo-url".to_owned(),
        spec.repo_url.clone(),
        "--desired-ref".to_owned(),
        spec.desired_ref.clone(),
        "--manifest-commit".to_owned(),
        spec.manifest_commit.clone(),
        "--manifest-file".to_owned(),
        manifest.display().to_string(),
        "--environment".to_owned(),
        spec.environment.clone(),
        "--result-dir".to_owned(),
        result_dir.display().to_string(),
        "--timeout-ms".to_owned(),
        spec.timeout_ms.to_string(),
    ];
    if spec.keep_namespace {
        args.push("--keep-namespace".to_owned());
    }
    args
}

/// A fetch of `repo` at `commit` in the shape the shared materialize step takes.
fn fetch_spec(repo: &str, commit: &str) -> DeploySpec {
    DeploySpec {
        service_id: "ci".into(),
        repo_url: repo.to_owned(),
        requested_commit: commit.to_owned(),
        dockerfile: String::new(),
        context: ".".into(),
        image: String::new(),
        build_base: None,
        executor: ExecutorSpec::Compose {
            project: None,
            service: String::new(),
        },
        health_url: None,
        force: false,
        dry_run: false,
        build_timeout_ms: 0,
    }
}

/// Reads a regular file of `commit`; a symlink (or anything but a blob) is refused.
fn read_regular_blob(
    mirror: &super::materialize::Mirror,
    commit: git2::Oid,
    path: &str,
) -> Result<Vec<u8>, StepFailure> {
    let repo = git2::Repository::open_bare(mirror.path())
        .map_err(|e| StepFailure(format!("opening mirror {}: {e}", mirror.path().display())))?;
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| StepFailure(format!("reading commit {commit}: {e}")))?;
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|e| StepFailure(format!("{path} in commit {commit}: {e}")))?;
    let mode = entry.filemode();
    if mode != 0o100644 && mode != 0o100755 {
        return Err(StepFailure(format!(
            "{path} in commit {commit} is not a regular file (mode {mode:o}); symlinks and \
             other entries are refused"
        )));
    }
    mirror
        .read_blob(commit, path, MAX_INPUT_BYTES)
        .map_err(|e| StepFailure::chain(&e))
}

/// The extracted `deploy.json` must name the same full-SHA `code-queue` the launch builds.
fn check_code_queue(manifest: &[u8], spec: &CiRunSpec) -> Result<(), StepFailure> {
    let value: serde_json::Value = serde_json::from_slice(manifest)
        .map_err(|e| StepFailure(format!("deploy.json of the manifest commit: {e}")))?;
    let services = value
        .pointer(&format!("/environments/{}/services", spec.environment))
        .and_then(|s| s.as_array())
        .ok_or_else(|| {
            StepFailure(format!(
                "deploy.json has no environments.{}.services",
                spec.environment
            ))
        })?;
    let id = &spec.code_queue.service_id;
    let commit = services
        .iter()
        .find(|s| s.get("id").and_then(|i| i.as_str()) == Some(id))
        .and_then(|s| s.get("commitId"))
        .and_then(|c| c.as_str())
        .ok_or_else(|| StepFailure(format!("deploy.json declares no {id} service")))?;
    if !is_full_sha(commit) {
        return Err(StepFailure(format!(
            "{id} commit {commit:?} in deploy.json is not a full 40-hex SHA"
        )));
    }
    if commit != spec.code_queue.commit {
        return Err(StepFailure(format!(
            "{id} commit {commit} in deploy.json differs from the launch's {}",
            spec.code_queue.commit
        )));
    }
    Ok(())
}

async fn preflight(
    kubeconfig: &Path,
    proxy: Option<&str>,
    spec: &CiRunSpec,
    launcher: &Launcher,
    log: StepLog,
) -> Result<Cluster, StepFailure> {
    launcher
        .decision(&log, "ci_kubeconfig", &kubeconfig.display().to_string())
        .await;
    let cluster = Cluster::connect(kubeconfig)
        .await
        .map_err(|e| StepFailure(format!("k3s API: {}", StepFailure::chain(&e).0)))?;
    let version = cluster
        .version()
        .await
        .map_err(|e| StepFailure(format!("k3s API: {}", StepFailure::chain(&e).0)))?;
    launcher
        .decision(&log, "ci_api_server", cluster.api_server_url())
        .await;
    log.line(format!("kubernetes API answers: version {version}"))
        .await;
    let pipeline = cluster
        .exists(
            TEKTON_NAMESPACE,
            "tekton.dev/v1",
            "Pipeline",
            "pipelines",
            TEKTON_PIPELINE,
        )
        .await
        .map_err(|e| StepFailure(format!("Tekton pipeline: {}", StepFailure::chain(&e).0)))?;
    if !pipeline {
        return Err(StepFailure(format!(
            "Tekton pipeline {TEKTON_NAMESPACE}/{TEKTON_PIPELINE} is missing; not running the \
             CI script"
        )));
    }
    launcher
        .decision(
            &log,
            "ci_tekton_pipeline",
            &format!("{TEKTON_NAMESPACE}/{TEKTON_PIPELINE}"),
        )
        .await;
    match proxy {
        Some(p) => {
            launcher.decision(&log, "ci_egress_proxy", p).await;
            let target = super::deploy::repo_authority(&spec.repo_url)
                .unwrap_or_else(|| super::build::DEFAULT_PROBE_TARGET.into());
            super::build::probe_proxy(p, &target, Duration::from_secs(15), &log, "ci_egress_probe")
                .await
                .map_err(|e| {
                    StepFailure(format!(
                        "egress tunnel: {e}; not falling back to a direct connection"
                    ))
                })?;
        }
        None => launcher.decision(&log, "ci_egress_proxy", "direct").await,
    }
    Ok(cluster)
}

/// Reuses an image labelled with the Code Queue commit, or builds it at that commit.
async fn build_or_reuse(
    exec: &Executor,
    docker: &Docker,
    spec: &CiRunSpec,
    proxy: Option<String>,
    launcher: &Launcher,
    log: StepLog,
    cancel: &CancellationToken,
) -> Result<(String, bool), StepFailure> {
    let cq = &spec.code_queue;
    let mut filters = std::collections::HashMap::new();
    filters.insert(
        "label".to_owned(),
        vec![format!("{LABEL_SOURCE_COMMIT}={}", cq.commit)],
    );
    let found = docker
        .list_images(Some(ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| StepFailure(format!("listing Docker images: {e}")))?;
    if let Some(existing) = found.first() {
        let (repo, tag) = cq
            .image
            .rsplit_once(':')
            .unwrap_or((cq.image.as_str(), "latest"));
        docker
            .tag_image(
                &existing.id,
                Some(TagImageOptions {
                    repo: Some(repo.to_owned()),
                    tag: Some(tag.to_owned()),
                }),
            )
            .await
            .map_err(|e| StepFailure(format!("tagging {} as {}: {e}", existing.id, cq.image)))?;
        launcher
            .decision(
                &log,
                "ci_image_reused",
                &format!("{}={}", cq.image, existing.id),
            )
            .await;
        return Ok((existing.id.clone(), true));
    }
    let deploy = DeploySpec {
        service_id: cq.service_id.clone(),
        repo_url: cq.repo_url.clone(),
        requested_commit: cq.commit.clone(),
        dockerfile: cq.dockerfile.clone(),
        context: cq.context.clone(),
        image: cq.image.clone(),
        build_base: cq.build_base.clone(),
        executor: ExecutorSpec::Compose {
            project: None,
            service: String::new(),
        },
        health_url: None,
        force: true,
        dry_run: false,
        build_timeout_ms: cq.build_timeout_ms,
    };
    let (mirror, commit) =
        materialize(exec, &deploy, proxy.clone(), log.clone(), cancel.clone()).await?;
    let built = build_image(
        docker,
        &deploy,
        mirror,
        commit,
        cq.image.clone(),
        proxy,
        log.clone(),
        cancel,
    )
    .await?;
    launcher
        .decision(
            &log,
            "ci_image_built",
            &format!("{}={}", built.image, built.image_id),
        )
        .await;
    Ok((built.image_id, false))
}

/// `Kind namespace/name` → resourceVersion of every protected object.
async fn snapshot(cluster: &Cluster) -> Result<BTreeMap<String, String>, StepFailure> {
    let mut out = BTreeMap::new();
    for ns in PROTECTED_NAMESPACES {
        for (api_version, kind, plural) in SNAPSHOT_RESOURCES {
            let items = cluster
                .list_versions(ns, api_version, kind, plural)
                .await
                .map_err(|e| StepFailure::chain(&e))?;
            for (name, version) in items {
                out.insert(format!("{kind} {ns}/{name}"), version);
            }
        }
    }
    Ok(out)
}

/// What changed between two snapshots, one line per object.
fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut changes = Vec::new();
    for (key, v) in before {
        match after.get(key) {
            None => changes.push(format!("{key} deleted")),
            Some(w) if w != v => {
                changes.push(format!("{key} changed (resourceVersion {v} -> {w})"))
            }
            Some(_) => {}
        }
    }
    for key in after.keys() {
        if !before.contains_key(key) {
            changes.push(format!("{key} created"));
        }
    }
    changes
}

/// How the script ended.
#[derive(Debug, Clone, Copy)]
enum Ran {
    /// It exited; `None` when a signal ended it.
    Exited(Option<i32>),
    /// It ran past `timeoutMs`; its process group was killed.
    TimedOut,
}

/// Kills the script's process group when dropped (a cancelled launch included).
struct GroupGuard(Option<rustix::process::Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (the group is already gone) is the expected outcome after a clean exit.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn run_script(
    script: &Path,
    work_dir: &Path,
    args: &[String],
    env: &[(String, String)],
    runner_log: &Path,
    timeout: Duration,
    log: &StepLog,
) -> Result<Ran, StepFailure> {
    #[allow(clippy::disallowed_methods)]
    // The one place the agent starts a program: the CI script extracted from the manifest
    // commit, with the seed's fixed argument contract and an explicit environment.
    let mut command = tokio::process::Command::new(script);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| StepFailure(format!("cannot start {}: {e}", script.display())))?;
    let mut guard = GroupGuard(
        child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?)),
    );
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(runner_log)
        .map_err(|e| StepFailure(format!("cannot open {}: {e}", runner_log.display())))?;
    let file = Arc::new(Mutex::new(file));
    let mut readers = Vec::new();
    let streams: [(Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, &str); 2] = [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            "stdout",
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            "stderr",
        ),
    ];
    for (stream, _name) in streams {
        let Some(stream) = stream else { continue };
        let (file, log) = (file.clone(), log.clone());
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                {
                    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = writeln!(f, "{line}");
                }
                log.line(line).await;
            }
        }));
    }
    let ran = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Ran::Exited(status.code()),
        Ok(Err(e)) => {
            return Err(StepFailure(format!(
                "waiting for {}: {e}",
                script.display()
            )));
        }
        Err(_) => Ran::TimedOut,
    };
    // The whole group goes, background children of the script included.
    guard.kill();
    let _ = child.wait().await;
    for reader in readers {
        let _ = tokio::time::timeout(DRAIN, reader).await;
    }
    if let Ok(f) = file.lock() {
        let _ = f.sync_data();
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_paths() {
        assert!(check_script_path("scripts/ci/dev-e2e.sh").is_ok());
        for bad in [
            "../x.sh",
            "/tmp/x.sh",
            "scripts/other/x.sh",
            "scripts/ci/x.py",
            "scripts/ci/../x.sh",
            "scripts/ci/sub/x.sh",
            "scripts/ci/.sh",
        ] {
            assert!(check_script_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_diff_names_objects() {
        let before: BTreeMap<String, String> = [
            ("Deployment unidesk-dev/a".to_owned(), "1".to_owned()),
            ("Secret unidesk/s".to_owned(), "2".to_owned()),
        ]
        .into();
        let mut after = before.clone();
        after.insert("Deployment unidesk-dev/a".into(), "3".into());
        after.remove("Secret unidesk/s");
        after.insert("Service unidesk-dev/n".into(), "4".into());
        assert_eq!(
            diff(&before, &after),
            [
                "Deployment unidesk-dev/a changed (resourceVersion 1 -> 3)",
                "Secret unidesk/s deleted",
                "Service unidesk-dev/n created",
            ]
        );
    }

    #[test]
    fn namespace_of_a_job_id_fits() {
        let ns = temporary_namespace("job-20261126-091530-abcdef");
        assert!(ns.len() <= 63, "{ns}");
    }
}
