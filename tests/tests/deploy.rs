//! Target-side build and deploy against real Git (the product's smart-HTTP server, reached
//! only through the agent's tunnel), real Docker and real Compose: deploy, replace by short
//! SHA, no-op, force, bad SHAs, a failing build, a lying health endpoint, and the job store
//! across a controller restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::service::{
    ComposeService, ComposeSpec, SampleRepo, Served, dockerfile, health, require_docker,
    serve_previous_version, write_manifest,
};
use crate::support::{Proc, Setup, free_port, path, started_steps};

/// One service under test: its repository, its Compose project, its agent and controller.
struct Fixture {
    setup: Setup,
    _controller: Proc,
    _agent: Proc,
    repo: SampleRepo,
    served: Served,
    compose: ComposeService,
    port: u16,
    catalog: PathBuf,
    service_id: String,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        require_docker();
        let setup = Setup::new(&["node"]);
        let controller = setup.controller();
        let agent = setup.agent("node");
        setup.wait_agents(&["node"]);
        let git_root = setup.dir.join("git");
        std::fs::create_dir_all(&git_root).unwrap();
        let repo = SampleRepo::create(&git_root, name).unwrap();
        let served = Served::start(&git_root);
        let port = free_port();
        let project = format!("unidesk-test-{name}-{}", std::process::id());
        let image = format!("{project}-web:latest");
        // The previous version: an image with its own CMD and a health file naming no commit.
        let compose =
            serve_previous_version(&setup.dir, &project, &image, port, Duration::from_secs(20));
        let service_id = format!("{name}-svc");
        let catalog = setup.dir.join("config.json");
        ComposeSpec {
            id: &service_id,
            repo_url: &served.server.url(&format!("{name}.git")),
            node: "node",
            image: &image,
            project: &project,
            port,
            build_timeout_ms: 300_000,
        }
        .write_catalog(&catalog);
        Fixture {
            setup,
            _controller: controller,
            _agent: agent,
            repo,
            served,
            compose,
            port,
            catalog,
            service_id,
        }
    }

    fn commit(&self, message: &str, health_commit: &str, extra: &str) -> String {
        self.repo
            .commit(
                message,
                &[
                    ("Dockerfile", &dockerfile(self.port, health_commit, extra)),
                    (".dockerignore", "secret.txt\n"),
                    ("index.html", message),
                    ("secret.txt", "must not reach the image\n"),
                ],
            )
            .unwrap()
            .to_string()
    }

    /// `deploy apply --file … --wait-ms …`: exit code and JSON output.
    fn apply(&self, commit: &str, extra: &[&str]) -> (i32, Value) {
        let manifest = self.setup.dir.join("deploy.json");
        let url = self.served.server.url(&format!(
            "{}",
            self.repo.path.file_name().unwrap().to_string_lossy()
        ));
        write_manifest(&manifest, &self.service_id, &url, commit);
        let mut args = vec![
            "deploy".to_string(),
            "apply".into(),
            "--file".into(),
            path(&manifest),
            "--catalog".into(),
            path(&self.catalog),
            "--service".into(),
            self.service_id.clone(),
            "--wait-ms".into(),
            "300000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = self.setup.cli(&args);
        let value = serde_json::from_str(&out).unwrap_or_else(|_| json!({ "stderr": err }));
        (code, value)
    }

    fn job<'a>(&self, out: &'a Value) -> &'a Value {
        &out["jobs"][0]["job"]
    }

    fn events(&self, out: &Value) -> Vec<Value> {
        self.setup
            .job_events(self.job(out)["jobId"].as_str().expect("job id"))
    }
}

fn log_lines(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["body"]["Log"]["line"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn deploy_by_full_then_short_sha_then_noop_then_force() {
    let f = Fixture::new("cycle");
    let a = f.commit("version A", "$UNIDESK_DEPLOY_COMMIT", "");
    let b = f.commit("version B", "$UNIDESK_DEPLOY_COMMIT", "");

    let (code, out) = f.apply(&a, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(f.job(&out)["status"], "succeeded");
    assert!(health(f.port).unwrap().contains(&a));
    assert_eq!(f.compose.image_label("unidesk.ai/source-commit"), a);
    assert_eq!(
        f.compose.image_label("org.opencontainers.image.revision"),
        a
    );
    let lines = log_lines(&f.events(&out));
    for expected in [
        "target_source_proxy=provider-gateway-ws-egress:http://127.0.0.1:",
        "target_source_proxy_probe=ok",
        "target_build_proxy_probe=ok",
        "target_build_proxy=provider-gateway-ws-egress:http://127.0.0.1:",
        "target_build_base_image=none",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "no line {expected}: {lines:#?}"
        );
    }
    // .dockerignore'd files never reach the image; tracked ones do.
    let files = f.compose.exec(&["ls", "/src"]);
    assert!(
        files.contains("index.html") && !files.contains("secret.txt"),
        "{files}"
    );
    let first = f.compose.container_id();

    let (code, out) = f.apply(&b[..7], &[]);
    assert_eq!(code, 0, "{out}");
    let result = &f.job(&out)["result"]["detail"]["deploy"];
    assert_eq!(result["resolved_commit"], b.as_str());
    assert!(health(f.port).unwrap().contains(&b));
    assert_ne!(
        f.compose.container_id(),
        first,
        "the container was replaced"
    );

    let (code, out) = f.apply(&b[..7], &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(f.job(&out)["status"], "noop", "{out}");
    assert!(!started_steps(&f.events(&out)).contains(&"build".to_string()));

    let (code, out) = f.apply(&b, &["--force"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(f.job(&out)["status"], "succeeded");
    let lines = log_lines(&f.events(&out));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("target_build_cache_from=") && !l.ends_with("=none")),
        "the forced rebuild used the current image as cache: {lines:#?}"
    );
    assert!(health(f.port).unwrap().contains(&b));

    // The job store answers after the controller restarts.
    let job_id = f.job(&out)["jobId"].as_str().unwrap().to_string();
    drop(f._controller);
    let status = f.setup.cli_json(&["job", "status", &job_id]);
    assert_eq!(status["job"]["status"], "succeeded");
    let _controller = f.setup.controller();
    let status = f.setup.cli_json(&["job", "status", &job_id]);
    assert_eq!(status["job"]["status"], "succeeded");
    assert!(status["logTail"].as_str().unwrap().contains("Finished"));
}

#[test]
fn missing_and_ambiguous_short_shas_fail_before_any_build() {
    let f = Fixture::new("shas");
    let a = f.commit("version A", "$UNIDESK_DEPLOY_COMMIT", "");
    let (code, out) = f.apply(&a, &[]);
    assert_eq!(code, 0, "{out}");
    let running = f.compose.container_id();

    // Make commits until two share their first 4 hex digits.
    let mut seen = std::collections::HashMap::new();
    let mut pair = None;
    for i in 0..5000 {
        let sha = f.commit(&format!("filler {i}"), "$UNIDESK_DEPLOY_COMMIT", "");
        if let Some(other) = seen.insert(sha[..4].to_string(), sha.clone()) {
            pair = Some((other, sha));
            break;
        }
    }
    let (one, two) = pair.expect("a 4-digit prefix collision within 5000 commits");
    let (code, out) = f.apply(&one[..4], &[]);
    assert_eq!(code, 1, "{out}");
    let reason = f.job(&out)["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains(&one) && reason.contains(&two),
        "candidates listed: {reason}"
    );
    assert!(!started_steps(&f.events(&out)).contains(&"build".to_string()));

    let (code, out) = f.apply("deadbee", &[]);
    assert_eq!(code, 1, "{out}");
    let reason = f.job(&out)["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("deadbee"), "{reason}");
    assert!(!started_steps(&f.events(&out)).contains(&"build".to_string()));

    assert_eq!(
        f.compose.container_id(),
        running,
        "the running service was untouched"
    );
    assert!(health(f.port).unwrap().contains(&a));
}

#[test]
fn a_failing_build_keeps_the_old_service_running() {
    let f = Fixture::new("broken");
    let a = f.commit("version A", "$UNIDESK_DEPLOY_COMMIT", "");
    let (code, out) = f.apply(&a, &[]);
    assert_eq!(code, 0, "{out}");
    let running = f.compose.container_id();
    let bad = f.commit(
        "broken",
        "$UNIDESK_DEPLOY_COMMIT",
        "RUN echo about to fail && exit 3\n",
    );
    let (code, out) = f.apply(&bad, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(f.job(&out)["status"], "failed");
    let lines = log_lines(&f.events(&out)).join("\n");
    assert!(
        lines.contains("about to fail"),
        "build output streamed: {lines}"
    );
    let reason = f.job(&out)["reason"].as_str().unwrap();
    assert!(
        reason.contains("non-zero code: 3"),
        "daemon error in the job: {reason}"
    );
    assert_eq!(f.compose.container_id(), running);
    assert!(
        health(f.port).unwrap().contains(&a),
        "old service still healthy"
    );
}

#[test]
fn a_service_reporting_another_commit_fails_verification() {
    let f = Fixture::new("liar");
    let stale = "1111111111111111111111111111111111111111";
    let c = f.commit("reports a stale commit", stale, "");
    let (code, out) = f.apply(&c, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(f.job(&out)["status"], "failed");
    let reason = f.job(&out)["reason"].as_str().unwrap();
    assert!(
        reason.contains(stale) && reason.contains(&c),
        "both commits named: {reason}"
    );
}

#[test]
#[allow(clippy::disallowed_methods)] // The demo runs as the operator runs it: a process.
fn the_demo_runs_end_to_end() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::support::bin("unidesk-controller"))
        .args(["demo", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find("{\n").expect("the demo prints a JSON summary");
    let summary: Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(summary["ok"], true);
    let jobs = summary["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for (job, commit) in jobs.iter().zip(summary["commits"].as_array().unwrap()) {
        assert_eq!(job["status"], "succeeded");
        assert_eq!(&job["resolvedCommit"], commit);
        let result: Value = serde_json::from_slice(
            &std::fs::read(Path::new(job["resultDir"].as_str().unwrap()).join("result.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(result["ok"], true);
        assert_eq!(&result["resolvedCommit"], commit);
    }
    // The k3s path as far as this machine allows: imported, complete, unpacked, pinned — and
    // apply/rollout reported as not run, never as done.
    let k3s = &summary["k3s"];
    assert_eq!(k3s["complete"], true, "{k3s}");
    assert_eq!(k3s["unpacked"], true, "{k3s}");
    assert_eq!(k3s["pinned"], true, "{k3s}");
    assert!(
        k3s["applyAndRollout"]
            .as_str()
            .is_some_and(|s| s.contains("were not run")),
        "{k3s}"
    );
    assert!(stdout.contains("need a Kubernetes API server"), "{stdout}");
}

#[test]
fn config_disagreeing_with_the_running_service_fails_before_the_build() {
    let f = Fixture::new("disagree");
    let a = f.commit("version A", "$UNIDESK_DEPLOY_COMMIT", "");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&f.catalog).unwrap()).unwrap();
    config["microservices"][0]["deployment"]["image"] = json!("somebody-else:latest");
    std::fs::write(&f.catalog, serde_json::to_vec(&config).unwrap()).unwrap();
    let running = f.compose.container_id();
    let (code, out) = f.apply(&a, &[]);
    assert_eq!(code, 1, "{out}");
    let reason = f.job(&out)["reason"].as_str().unwrap();
    assert!(
        reason.contains("somebody-else:latest") && reason.contains("unidesk-test-disagree"),
        "both images named: {reason}"
    );
    assert!(!started_steps(&f.events(&out)).contains(&"build".to_string()));
    assert_eq!(f.compose.container_id(), running);
}
