//! The dev CI runner (`ci run-dev-e2e`, `ci logs`) end to end: the real controller and agent,
//! real Git (the product's smart-HTTP server, fetched through the agent's tunnel), a real Docker
//! build and the real k3s-side containerd for the import — and **KubeApiDouble** for the
//! Kubernetes API (the Tekton Pipeline the preflight asks for, and the `unidesk-dev` objects the
//! isolation snapshot records).
//!
//! The CI scripts are committed to the test repository; every input the agent uses comes from
//! the pushed `master` commit.
#![allow(clippy::disallowed_methods)] // docker, ctr and the CLI are run as an operator would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::kube_double::KubeApiDouble;
use crate::support::service::{SampleRepo, Served, dockerfile, require_docker};
use crate::support::{Proc, Setup, bin, free_port, path, wait_for};

const K3S_SOCK: &str = "/run/k3s/containerd/containerd.sock";
/// A foundation image the CI node imports before the script (any image the testbed's Docker holds).
const FOUNDATION: &str = "local/busybox:latest";

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// The CLI with `--config`, run from `cwd` (which may hold a dirty `deploy.json`).
fn cli_in(setup: &Setup, cwd: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(bin("unidesk-controller"))
        .args(args)
        .arg("--config")
        .arg(setup.controller_config())
        .current_dir(cwd)
        .output()
        .expect("run the CLI");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        value,
        format!("{stdout}\n{stderr}"),
    )
}

/// The repository, the catalog and (optionally) the processes of one CI test.
struct Fixture {
    setup: Setup,
    procs: Vec<Proc>,
    double: Option<KubeApiDouble>,
    repo: SampleRepo,
    served: Served,
    catalog: PathBuf,
    image: String,
    uid: String,
    code_commit: String,
    repo_name: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let prefix = self.image.split(':').next().unwrap_or_default().to_owned();
        let (_, list) = run(
            "ctr",
            &["--address", K3S_SOCK, "-n", "k8s.io", "images", "ls", "-q"],
        );
        for name in list.lines().filter(|l| l.contains(&prefix)) {
            let _ = run(
                "ctr",
                &["--address", K3S_SOCK, "-n", "k8s.io", "images", "rm", name],
            );
        }
        let (_, images) = run(
            "docker",
            &["images", "--format", "{{.Repository}}:{{.Tag}}", &prefix],
        );
        for image in images.lines() {
            let _ = run("docker", &["rmi", "-f", image]);
        }
    }
}

impl Fixture {
    /// `with_nodes`: also start the controller and the CI agent (against the double).
    fn new(name: &str, with_nodes: bool) -> Fixture {
        Self::with(name, with_nodes, true)
    }

    /// `pipeline`: the double holds the Tekton Pipeline the preflight asks for.
    fn with(name: &str, with_nodes: bool, pipeline: bool) -> Fixture {
        let uid = format!("{name}-{}", std::process::id());
        let setup = Setup::new(&["ci"]);
        let mut procs = Vec::new();
        let mut double = None;
        if with_nodes {
            require_docker();
            let d = KubeApiDouble::start();
            if pipeline {
                d.put_object(
                    json!({"apiVersion": "tekton.dev/v1", "kind": "Pipeline",
                       "metadata": {"name": "unidesk-dev-namespace-e2e", "namespace": "unidesk-ci"},
                       "spec": {"tasks": []}}),
                    "test",
                );
            }
            d.put_object(
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "code-queue-read-dev", "namespace": "unidesk-dev"},
                       "spec": {"ports": [{"port": 8080}]}}),
                "test",
            );
            d.put_object(
                json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": "postgres-dev", "namespace": "unidesk-dev"},
                       "data": {"a": "Yg=="}}),
                "test",
            );
            let kubeconfig = d.kubeconfig.display().to_string();
            // The testbed's busybox stands in for the smoke's foundation (postgres:16-alpine).
            let config = setup.edit_agent("ci", "ci-k3s", |text| {
                text.replace("/etc/rancher/k3s/k3s.yaml", &kubeconfig)
                    .replace(
                        "prewarm_images = []",
                        &format!("prewarm_images = [\"{FOUNDATION}\"]"),
                    )
            });
            procs.push(setup.controller());
            procs.push(setup.agent_with(&config));
            setup.wait_agents(&["ci"]);
            double = Some(d);
        }
        let git_root = setup.dir.join("git");
        std::fs::create_dir_all(&git_root).expect("git root");
        let repo_name = format!("ci-{name}");
        let repo = SampleRepo::create(&git_root, &repo_name).expect("repo");
        let served = Served::start(&git_root);
        let image = format!("unidesk-ci-test-{uid}:dev");
        // The Code Queue commit: a tiny image, unique to this test.
        let code_commit = repo
            .commit(
                "code-queue",
                &[
                    (
                        "Dockerfile",
                        &dockerfile(free_port(), "$UNIDESK_DEPLOY_COMMIT", ""),
                    ),
                    ("index.html", &uid),
                ],
            )
            .expect("commit")
            .to_string();
        let mut catalog_doc: Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.json"))
                .expect("config.json"),
        )
        .expect("config.json is JSON");
        let cq = &mut catalog_doc["environments"]["dev"]["deployments"]["code-queue"];
        cq["node"] = json!("ci-node");
        cq["dockerfile"] = json!("Dockerfile");
        cq["image"] = json!(image);
        cq["buildTimeoutMs"] = json!(300_000);
        if let Some(o) = cq.as_object_mut() {
            o.remove("buildBase");
        }
        catalog_doc["nodes"]["ci-node"] = json!({"agent": "ci", "egress": "tunnel"});
        let catalog = setup.dir.join("config.json");
        std::fs::write(
            &catalog,
            serde_json::to_vec_pretty(&catalog_doc).expect("json"),
        )
        .expect("write catalog");
        Fixture {
            setup,
            procs,
            double,
            repo,
            served,
            catalog,
            image,
            uid,
            code_commit,
            repo_name,
        }
    }

    fn url(&self) -> String {
        self.served.server.url(&format!("{}.git", self.repo_name))
    }

    fn deploy_json(&self, script_path: &str, timeout_ms: u64, code_queue: Option<&str>) -> String {
        let mut services = vec![json!({"id": "backend-core", "repo": self.url(),
                                       "commitId": self.code_commit})];
        if let Some(commit) = code_queue {
            services.push(json!({"id": "code-queue", "repo": self.url(), "commitId": commit}));
        }
        serde_json::to_string_pretty(&json!({
            "schemaVersion": 2,
            "environments": {"dev": {
                "ci": {"repo": self.url(), "scriptPath": script_path, "timeoutMs": timeout_ms},
                "services": services
            }}
        }))
        .expect("json")
    }

    /// Pushes a master commit holding the Code Queue files, `deploy.json` and `script`.
    fn push(&self, deploy_json: &str, script_path: &str, script: &str) -> String {
        self.repo
            .commit(
                "desired state",
                &[
                    (
                        "Dockerfile",
                        &dockerfile(free_port(), "$UNIDESK_DEPLOY_COMMIT", ""),
                    ),
                    ("index.html", &self.uid),
                    ("deploy.json", deploy_json),
                    (script_path, script),
                ],
            )
            .expect("commit")
            .to_string()
    }

    /// Pushes a master commit whose `script_path` is a symlink to `target`.
    fn push_symlink(&self, deploy_json: &str, script_path: &str, target: &str) -> String {
        let repo = git2::Repository::open_bare(&self.repo.path).expect("open repo");
        let parent = repo
            .find_commit(repo.refname_to_id("refs/heads/master").expect("master"))
            .expect("commit");
        let mut index = git2::Index::new().expect("index");
        for (p, content, mode) in [
            ("deploy.json", deploy_json, 0o100644),
            (script_path, target, 0o120000),
        ] {
            let blob = repo.blob(content.as_bytes()).expect("blob");
            index
                .add(&git2::IndexEntry {
                    ctime: git2::IndexTime::new(0, 0),
                    mtime: git2::IndexTime::new(0, 0),
                    dev: 0,
                    ino: 0,
                    mode,
                    uid: 0,
                    gid: 0,
                    file_size: 0,
                    id: blob,
                    flags: 0,
                    flags_extended: 0,
                    path: p.as_bytes().to_vec(),
                })
                .expect("index add");
        }
        let tree = repo
            .find_tree(index.write_tree_to(&repo).expect("tree"))
            .expect("find tree");
        let sig = git2::Signature::now("t", "t@example.invalid").expect("sig");
        repo.commit(
            Some("refs/heads/master"),
            &sig,
            &sig,
            "symlinked script",
            &tree,
            &[&parent],
        )
        .expect("commit")
        .to_string()
    }

    fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "ci".into(),
            "run-dev-e2e".into(),
            "--repository".into(),
            self.url(),
            "--catalog".into(),
            path(&self.catalog),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn run_dev_e2e(&self, extra: &[&str]) -> (i32, Value, String) {
        // A dirty local deploy.json in the working directory must not matter.
        let cwd = self.setup.dir.join("checkout");
        std::fs::create_dir_all(&cwd).expect("checkout");
        std::fs::write(
            cwd.join("deploy.json"),
            self.deploy_json("scripts/ci/local-dirty.sh", 5_000, Some(&"f".repeat(40))),
        )
        .expect("dirty deploy.json");
        let args = self.run_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_in(&self.setup, &cwd, &args)
    }

    fn run_dir(&self, run_id: &str) -> PathBuf {
        self.setup.dir.join("agent-ci/runs").join(run_id)
    }

    fn result(&self, run_id: &str) -> Value {
        let text = std::fs::read_to_string(self.run_dir(run_id).join("result.json"))
            .unwrap_or_else(|e| panic!("result.json of {run_id}: {e}"));
        serde_json::from_str(&text).expect("result.json is JSON")
    }

    fn launcher_log(&self, run_id: &str) -> String {
        std::fs::read_to_string(self.run_dir(run_id).join("launcher.log")).unwrap_or_default()
    }

    fn jobs(&self) -> usize {
        std::fs::read_dir(self.setup.dir.join("state/jobs"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Runs one CI run to its end and returns (exit code, run id, result.json).
    fn run_to_end(&self, extra: &[&str]) -> (i32, String, Value) {
        let mut args = vec!["--wait-ms", "240000"];
        args.extend_from_slice(extra);
        let (code, out, text) = self.run_dev_e2e(&args);
        let run_id = out["runId"]
            .as_str()
            .unwrap_or_else(|| panic!("no runId: {text}"))
            .to_owned();
        // The node's own absolute path of the run directory, as its agent reports it.
        assert_eq!(
            out["resultDir"].as_str().map(PathBuf::from),
            Some(std::path::absolute(self.run_dir(&run_id)).expect("absolute")),
            "{text}"
        );
        let result = self.result(&run_id);
        (code, run_id, result)
    }
}

const HAPPY: &str = r#"#!/bin/sh
set -eu
echo "args: $*"
env | sort | sed 's/^/env: /'
while [ $# -gt 0 ]; do
  case "$1" in
    --run-id) run_id=$2; shift 2 ;;
    --manifest-commit) commit=$2; shift 2 ;;
    --manifest-file) manifest=$2; shift 2 ;;
    --result-dir) dir=$2; shift 2 ;;
    --keep-namespace) shift ;;
    *) shift 2 ;;
  esac
done
grep -q schemaVersion "$manifest"
echo "pr-$run_id" > "$dir/pipelinerun.txt"
echo "{\"ok\": true, \"status\": \"succeeded\", \"runId\": \"$run_id\", \"manifestCommit\": \"$commit\", \"pipelineRun\": \"pr-$run_id\", \"smoke\": \"passed\"}" > "$dir/result.json"
echo done
"#;

#[test]
fn ci_run_dev_e2e_end_to_end() {
    let mut f = Fixture::new("e2e", true);
    let double = f.double.as_ref().expect("double");

    // 1. The happy path, waited for: built, imported, run, isolated, namespace removed.
    let script = "scripts/ci/dev-e2e.sh";
    let pushed = f.push(
        &f.deploy_json(script, 60_000, Some(&f.code_commit)),
        script,
        HAPPY,
    );
    let (code, run1, result) = f.run_to_end(&[]);
    let log1 = f.launcher_log(&run1);
    assert_eq!(code, 0, "{result:#}\n{log1}");
    assert!(
        log1.contains(&format!("ci_foundation_imported={FOUNDATION}")),
        "the foundation image is imported before the script runs:\n{log1}"
    );
    assert_eq!(result["ok"], json!(true), "{result:#}");
    assert_eq!(result["status"], json!("succeeded"));
    assert_eq!(result["manifestCommit"], json!(pushed));
    assert_eq!(result["pipelineRun"], json!(format!("pr-{run1}")));
    assert_eq!(result["scriptResult"]["smoke"], json!("passed"));
    assert_eq!(result["exitStatus"], json!(0));
    assert_eq!(result["namespaceDeleted"], json!(true));
    let namespace = format!("unidesk-ci-e2e-{run1}");
    assert_eq!(result["temporaryNamespace"], json!(namespace));
    assert!(namespace.len() <= 63);
    assert!(
        double
            .requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.path == format!("/api/v1/namespaces/{namespace}")),
        "the temporary namespace was not deleted"
    );
    assert!(log1.contains("ci_image_built="), "{log1}");
    let runner = std::fs::read_to_string(f.run_dir(&run1).join("runner.log")).expect("runner.log");
    let expected_args = format!(
        "args: --run-id {run1} --repo-url {} --desired-ref master --manifest-commit {pushed} \
         --manifest-file {} --environment dev --result-dir {} --timeout-ms 60000",
        f.url(),
        path(
            &f.setup
                .dir
                .join("agent-ci/work")
                .join(&run1)
                .join("deploy.json")
        ),
        path(&f.run_dir(&run1).join("script")),
    );
    assert!(
        runner.contains(&expected_args),
        "{runner}\nexpected {expected_args}"
    );
    let env_keys: Vec<&str> = runner
        .lines()
        .filter_map(|l| l.strip_prefix("env: "))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for key in [
        "KUBECONFIG",
        "UNIDESK_CI_IMAGE",
        "UNIDESK_CI_RUN_ID",
        "HTTP_PROXY",
        "PATH",
    ] {
        assert!(env_keys.contains(&key), "{key} missing from {env_keys:?}");
    }
    for key in &env_keys {
        assert!(
            [
                "KUBECONFIG",
                "UNIDESK_CI_IMAGE",
                "UNIDESK_CI_RUN_ID",
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "http_proxy",
                "https_proxy",
                "NO_PROXY",
                "no_proxy",
                "PATH",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD",
            ]
            .contains(key),
            "unexpected environment variable {key} in {env_keys:?}"
        );
    }

    // `ci logs` reads the same files through the agent.
    let (code, logs, text) = cli_in(&f.setup, &f.setup.dir, &["ci", "logs", &run1]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(logs["pipelineRun"], json!(format!("pr-{run1}")), "{logs:#}");
    assert_eq!(logs["files"]["result"]["status"], json!("succeeded"));
    assert!(
        logs["files"]["runnerLog"]["tail"]
            .as_str()
            .unwrap_or_default()
            .contains("done"),
        "{logs:#}"
    );
    assert!(
        logs["files"]["launcherLog"]["tail"]
            .as_str()
            .unwrap_or_default()
            .contains("ci_manifest_commit="),
        "{logs:#}"
    );

    // 2. Without --wait-ms the CLI returns once accepted; a script that exits non-zero without
    //    writing a result ends ok:false with its exit status. The image is reused.
    let pushed2 = f.push(
        &f.deploy_json(script, 60_000, Some(&f.code_commit)),
        script,
        "#!/bin/sh\necho failing on purpose\nexit 3\n",
    );
    let (code, out, text) = f.run_dev_e2e(&[]);
    assert_eq!(code, 0, "{text}");
    let run2 = out["runId"].as_str().expect("runId").to_owned();
    assert_eq!(out["manifestCommit"], json!(pushed2));
    assert!(
        out["next"][0]
            .as_str()
            .unwrap_or_default()
            .contains("ci logs")
    );
    wait_for("run 2 to finish", Duration::from_secs(120), || {
        f.run_dir(&run2).join("result.json").exists().then_some(())
    });
    let result = f.result(&run2);
    assert_eq!(result["ok"], json!(false), "{result:#}");
    assert_eq!(result["status"], json!("failed"));
    assert_eq!(result["exitStatus"], json!(3));
    assert_eq!(result["scriptResult"], Value::Null);
    assert!(
        f.launcher_log(&run2).contains("ci_image_reused="),
        "{}",
        f.launcher_log(&run2)
    );

    // 3. A script that outlives timeoutMs: `timeout`, and its whole process group is gone.
    let marker = format!("ci-marker-{}", f.uid);
    let sleeper = format!("#!/bin/sh\nsh -c 'sleep 600; : {marker}' &\necho sleeping\nsleep 600\n");
    f.push(
        &f.deploy_json(script, 2_000, Some(&f.code_commit)),
        script,
        &sleeper,
    );
    let started = Instant::now();
    let (code, run3, result) = f.run_to_end(&[]);
    assert_eq!(code, 1);
    assert_eq!(result["status"], json!("timeout"), "{result:#}");
    assert_eq!(result["launchStatus"], json!("timed-out"), "{result:#}");
    assert_eq!(result["ok"], json!(false));
    assert!(started.elapsed() < Duration::from_secs(100));
    wait_for(
        "the script's process group to be gone",
        Duration::from_secs(10),
        || {
            let alive = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .any(|p| {
                    std::fs::read(p.path().join("cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                        .unwrap_or(false)
                });
            (!alive).then_some(())
        },
    );
    assert!(f.launcher_log(&run3).contains("ci_script_timeout="));

    // 4. A script that is a symlink in the commit is refused, not followed.
    f.push_symlink(
        &f.deploy_json(script, 60_000, Some(&f.code_commit)),
        script,
        "/etc/passwd",
    );
    let (code, run_link, result) = f.run_to_end(&[]);
    assert_eq!(code, 1);
    assert_eq!(result["ok"], json!(false), "{result:#}");
    assert!(
        result["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not a regular file"),
        "{result:#}"
    );
    assert!(!f.run_dir(&run_link).join("runner.log").exists());

    // 5. A change to a `unidesk-dev` object while the script runs: isolation-violated.
    let go = f.setup.dir.join(format!("go-{}", f.uid));
    let waiter = format!(
        "#!/bin/sh\necho ready\ni=0\nwhile [ ! -f {} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n",
        path(&go)
    );
    f.push(
        &f.deploy_json(script, 60_000, Some(&f.code_commit)),
        script,
        &waiter,
    );
    let handle = {
        let args = f.run_args(&["--wait-ms", "240000", "--keep-namespace"]);
        let bin = bin("unidesk-controller");
        let config = f.setup.controller_config();
        std::thread::spawn(move || {
            Command::new(bin)
                .args(&args)
                .arg("--config")
                .arg(config)
                .output()
                .expect("run the CLI")
        })
    };
    let runs = f.setup.dir.join("agent-ci/runs");
    let running = wait_for(
        "the waiting script to start",
        Duration::from_secs(120),
        || {
            std::fs::read_dir(&runs).ok()?.flatten().find_map(|d| {
                let log = std::fs::read_to_string(d.path().join("runner.log")).ok()?;
                (log.contains("ready") && !d.path().join("result.json").exists())
                    .then(|| d.file_name().to_string_lossy().into_owned())
            })
        },
    );
    // While it runs, `ci logs` shows what exists so far.
    let (code, logs, text) = cli_in(&f.setup, &f.setup.dir, &["ci", "logs", &running]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(logs["jobStatus"], json!("running"), "{logs:#}");
    assert_eq!(logs["files"]["result"], Value::Null, "{logs:#}");
    assert!(
        logs["files"]["runnerLog"]["tail"]
            .as_str()
            .unwrap_or_default()
            .contains("ready"),
        "{logs:#}"
    );
    double.put_object(
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "postgres-dev", "namespace": "unidesk-dev"},
               "data": {"a": "Yw=="}}),
        "someone",
    );
    std::fs::write(&go, b"").expect("go");
    let out = handle.join().expect("CLI thread");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(out.status.code(), Some(1), "{printed:#}");
    let run4 = printed["runId"].as_str().expect("runId").to_owned();
    let result = f.result(&run4);
    assert_eq!(result["status"], json!("isolation-violated"), "{result:#}");
    let changes = result["isolationChanges"].to_string();
    assert!(
        changes.contains("Secret unidesk-dev/postgres-dev"),
        "{changes}"
    );
    assert_eq!(result["namespaceDeleted"], json!(false));
    assert_eq!(run4, running);

    // 6. After a controller restart, `ci logs` still finds the first run (the job store knows
    //    its agent) and reads it from the node.
    f.procs[0].kill();
    f.procs[0] = f.setup.controller();
    f.setup.wait_agents(&["ci"]);
    let (code, logs, text) = cli_in(
        &f.setup,
        &f.setup.dir,
        &["ci", "logs", &run1, "--tail-bytes", "64"],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(logs["pipelineRun"], json!(format!("pr-{run1}")), "{logs:#}");
    assert_eq!(
        logs["files"]["runnerLog"]["truncated"],
        json!(true),
        "{logs:#}"
    );
}

#[test]
fn ci_refuses_bad_declarations_before_any_launch() {
    let f = Fixture::new("refuse", false);
    let good_script = "scripts/ci/dev-e2e.sh";
    let cases: Vec<(String, String)> = vec![
        (
            "../x.sh".into(),
            f.deploy_json("../x.sh", 60_000, Some(&f.code_commit)),
        ),
        (
            "/tmp/x.sh".into(),
            f.deploy_json("/tmp/x.sh", 60_000, Some(&f.code_commit)),
        ),
        (
            "scripts/other/x.sh".into(),
            f.deploy_json("scripts/other/x.sh", 60_000, Some(&f.code_commit)),
        ),
        (
            "scripts/ci/x.py".into(),
            f.deploy_json("scripts/ci/x.py", 60_000, Some(&f.code_commit)),
        ),
        (
            "missing code-queue".into(),
            f.deploy_json(good_script, 60_000, None),
        ),
        (
            "short code-queue".into(),
            f.deploy_json(good_script, 60_000, Some(&f.code_commit[..12])),
        ),
        (
            "timeoutMs too large".into(),
            f.deploy_json(good_script, 5 * 60 * 60 * 1000, Some(&f.code_commit)),
        ),
        ("ci.repo naming another repository".into(), {
            let doc = f.deploy_json(good_script, 60_000, Some(&f.code_commit));
            let mut doc: Value = serde_json::from_str(&doc).expect("json");
            doc["environments"]["dev"]["ci"]["repo"] = json!("https://example.invalid/other.git");
            doc.to_string()
        }),
    ];
    for (what, doc) in cases {
        f.push(&doc, good_script, HAPPY);
        let (code, _, text) = f.run_dev_e2e(&[]);
        assert_eq!(code, 2, "{what}: {text}");
        if what.starts_with("ci.repo") {
            assert!(
                text.contains("is not the desired-state repository"),
                "{text}"
            );
        }
        assert_eq!(f.jobs(), 0, "{what}: a job was recorded");
    }
}

#[test]
fn ci_preflight_names_a_missing_tekton_pipeline() {
    let f = Fixture::with("preflight", true, false);
    let script = "scripts/ci/dev-e2e.sh";
    f.push(
        &f.deploy_json(script, 60_000, Some(&f.code_commit)),
        script,
        HAPPY,
    );
    let (code, run_id, result) = f.run_to_end(&[]);
    assert_eq!(code, 1);
    assert_eq!(result["ok"], json!(false), "{result:#}");
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Tekton pipeline unidesk-ci/unidesk-dev-namespace-e2e is missing"),
        "{result:#}"
    );
    let launcher = f.launcher_log(&run_id);
    assert!(!launcher.contains("ci_image_"), "{launcher}");
    assert!(!f.run_dir(&run_id).join("runner.log").exists());
    assert!(
        !f.setup
            .dir
            .join("agent-ci/work")
            .join(&run_id)
            .join("runner.sh")
            .exists()
    );
}
