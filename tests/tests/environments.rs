//! Environment mode (`deploy plan|apply --env dev|prod`) against a real Git remote, the
//! product's smart-HTTP server, holding `master`, `deploy/dev` and `deploy/prod`: the manifest
//! comes from the environment's fixed ref and nowhere else, its commit and blob are reported,
//! and the apply guards stop before anything changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use git2::{Oid, Repository, Signature};
use serde_json::{Value, json};

use crate::support::service::Served;
use crate::support::{Proc, Setup, bin};

/// A full SHA used as every service's `commitId`: planning never resolves it.
const COMMIT: &str = "0c3cdb4aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// A desired-state repository served over HTTP, with a branch per environment.
struct DesiredRepo {
    repo: Repository,
    _served: Served,
    url: String,
}

impl DesiredRepo {
    fn new(setup: &Setup) -> DesiredRepo {
        let root = setup.dir.join("git");
        std::fs::create_dir_all(&root).unwrap();
        let repo = Repository::init_bare(root.join("desired.git")).unwrap();
        let served = Served::start(&root);
        let url = served.server.url("desired.git");
        DesiredRepo {
            repo,
            _served: served,
            url,
        }
    }

    /// Commits `deploy.json` with `manifest` as the next commit of `branch`; returns the
    /// commit and the blob id.
    fn commit(&self, branch: &str, manifest: &Value) -> (Oid, Oid) {
        let bytes = serde_json::to_vec_pretty(manifest).unwrap();
        let blob = self.repo.blob(&bytes).unwrap();
        let mut tree = self.repo.treebuilder(None).unwrap();
        tree.insert("deploy.json", blob, 0o100644).unwrap();
        let tree = self.repo.find_tree(tree.write().unwrap()).unwrap();
        let refname = format!("refs/heads/{branch}");
        let parent = self
            .repo
            .find_reference(&refname)
            .ok()
            .map(|r| r.peel_to_commit().unwrap());
        let sig = Signature::now("test", "test@example.invalid").unwrap();
        let commit = self
            .repo
            .commit(
                Some(&refname),
                &sig,
                &sig,
                &format!("{branch}: deploy.json"),
                &tree,
                &parent.iter().collect::<Vec<_>>(),
            )
            .unwrap();
        (commit, blob)
    }
}

/// A schema-1 manifest for `environment` (none when `None`) listing `ids`.
fn manifest(environment: Option<&str>, ids: &[&str]) -> Value {
    let services: Vec<Value> = ids
        .iter()
        .map(|id| json!({ "id": id, "repo": "https://github.com/pikasTech/unidesk", "commitId": COMMIT }))
        .collect();
    let mut doc = json!({ "schemaVersion": 1, "services": services });
    if let Some(env) = environment {
        doc["environment"] = json!(env);
    }
    doc
}

/// One test's world: a setup for the repository's own nodes' agents, the repository's own
/// `config.json` as the catalog, and a desired-state repository with all three branches.
struct World {
    setup: Setup,
    desired: DesiredRepo,
    catalog: PathBuf,
    dev: (Oid, Oid),
}

impl World {
    fn new(dev_manifest: &Value) -> World {
        let setup = Setup::new(&["d601", "main-server"]);
        let catalog = setup.dir.join("config.json");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.json"),
            &catalog,
        )
        .unwrap();
        let desired = DesiredRepo::new(&setup);
        desired.commit("master", &manifest(None, &["frontend"]));
        desired.commit("deploy/prod", &manifest(Some("prod"), &["frontend"]));
        // A first dev commit, then the one the ref points at: the newest is read.
        desired.commit("deploy/dev", &manifest(Some("dev"), &["frontend"]));
        let dev = desired.commit("deploy/dev", dev_manifest);
        World {
            setup,
            desired,
            catalog,
            dev,
        }
    }

    /// Sets `[desired]` in the controller config, so `--repository` is not needed.
    fn configure_repository(&self) {
        let path = self.setup.controller_config();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "\n[desired]\ncatalog = {:?}\nrepository = {:?}\n",
            self.catalog.display().to_string(),
            self.desired.url
        ));
        std::fs::write(&path, text).unwrap();
    }

    /// Runs the controller CLI in `cwd` with `--config`: (exit code, stdout, stderr).
    #[allow(clippy::disallowed_methods)] // The CLI runs as the operator runs it.
    fn cli_in(&self, cwd: &Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("unidesk-controller"))
            .current_dir(cwd)
            .args(args)
            .arg("--config")
            .arg(self.setup.controller_config())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `deploy <verb> --env <env> --repository … --catalog …` plus `extra`.
    fn deploy(&self, verb: &str, env: &str, extra: &[&str]) -> (i32, String, String) {
        let catalog = self.catalog.display().to_string();
        let mut args = vec![
            "deploy",
            verb,
            "--env",
            env,
            "--repository",
            &self.desired.url,
            "--catalog",
            &catalog,
        ];
        args.extend_from_slice(extra);
        self.cli_in(&self.setup.dir, &args)
    }

    fn jobs(&self) -> Vec<Value> {
        let list = self.setup.cli_json(&["job", "list"]);
        list.as_array().expect("job list is an array").clone()
    }

    fn mirrors(&self) -> PathBuf {
        self.setup.dir.join("state/mirrors")
    }
}

fn services(out: &Value) -> Vec<&str> {
    out["plan"]["services"]
        .as_array()
        .expect("plan.services")
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect()
}

#[test]
fn dev_plan_reads_the_ref_not_a_local_file() {
    let w = World::new(&manifest(Some("dev"), &["backend-core", "code-queue"]));
    // A different deploy.json where an operator would run the command.
    let cwd = w.setup.dir.join("checkout");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(
        cwd.join("deploy.json"),
        serde_json::to_vec(&manifest(Some("dev"), &["frontend"])).unwrap(),
    )
    .unwrap();
    w.configure_repository();

    let (code, out, err) = w.cli_in(&cwd, &["deploy", "plan", "--env", "dev"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(services(&out), ["backend-core", "code-queue"], "{out}");
    assert_eq!(out["manifestCommit"], w.dev.0.to_string(), "{out}");
    assert_eq!(out["manifestBlob"], w.dev.1.to_string(), "{out}");
    assert_eq!(out["desiredRef"], "origin/deploy/dev");
    assert_eq!(out["repository"], w.desired.url.as_str());
    assert_eq!(out["plan"]["environment"], "dev");
    assert_eq!(out["plan"]["namespace"], "unidesk-dev");
    assert!(
        w.mirrors().is_dir(),
        "the mirror lives under store.dir/mirrors"
    );

    // The ref moves: the next plan reads the new commit from the same mirror.
    let next = w
        .desired
        .commit("deploy/dev", &manifest(Some("dev"), &["frontend"]));
    let (code, out, err) = w.cli_in(&cwd, &["deploy", "plan", "--env", "dev"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["manifestCommit"], next.0.to_string(), "{out}");
    assert_eq!(services(&out), ["frontend"]);
}

#[test]
fn file_and_env_are_exclusive_and_one_is_required() {
    let w = World::new(&manifest(Some("dev"), &["backend-core"]));
    let local = w.setup.dir.join("deploy.json");
    std::fs::write(
        &local,
        serde_json::to_vec(&manifest(None, &["frontend"])).unwrap(),
    )
    .unwrap();
    let local = local.display().to_string();
    let (code, _, err) = w.deploy("plan", "dev", &["--file", &local]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--file") && err.contains("--env"), "{err}");
    let (code, _, err) = w.cli_in(&w.setup.dir, &["deploy", "plan"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = w.deploy("plan", "staging", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("staging"), "{err}");
}

#[test]
fn a_prod_manifest_on_the_dev_ref_is_refused() {
    let w = World::new(&manifest(Some("prod"), &["backend-core"]));
    let (code, out, err) = w.deploy("plan", "dev", &[]);
    assert_eq!(code, 2, "{err}\n{out}");
    assert!(
        err.contains("environment=prod") && err.contains("--env dev"),
        "both environments named: {err}"
    );
    assert!(out.is_empty(), "no plan printed: {out}");
}

#[test]
fn a_missing_environment_ref_is_named() {
    let w = World::new(&manifest(Some("dev"), &["backend-core"]));
    w.desired
        .repo
        .find_reference("refs/heads/deploy/dev")
        .unwrap()
        .delete()
        .unwrap();
    let (code, out, err) = w.deploy("plan", "dev", &[]);
    assert_eq!(code, 2, "{err}\n{out}");
    assert!(err.contains("origin/deploy/dev"), "{err}");
}

#[test]
fn prod_apply_is_refused_before_contacting_anything() {
    let w = World::new(&manifest(Some("dev"), &["backend-core"]));
    w.configure_repository();
    let _controller: Proc = w.setup.controller();
    let _agent = w.setup.agent("d601");
    w.setup.wait_agents(&["d601"]);

    let (code, out, err) = w.deploy("apply", "prod", &["--wait-ms", "10000"]);
    assert_eq!(code, 2, "{err}\n{out}");
    assert!(
        err.contains("deploy apply --env prod is disabled") && err.contains("by the program"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
    assert!(w.jobs().is_empty(), "no job was created");
    assert!(!w.mirrors().exists(), "nothing was fetched");
}

#[test]
fn dev_apply_listing_code_queue_mgr_fails_before_any_change() {
    let w = World::new(&manifest(Some("dev"), &["backend-core", "code-queue-mgr"]));
    let _controller = w.setup.controller();
    let _agent = w.setup.agent("d601");
    w.setup.wait_agents(&["d601"]);

    let (code, out, err) = w.deploy("apply", "dev", &[]);
    assert_eq!(code, 2, "{err}\n{out}");
    assert!(
        err.contains("deploy apply --env dev refused before any change")
            && err.contains("code-queue-mgr"),
        "{err}"
    );
    assert!(
        !err.contains("backend-core ("),
        "only the refused one: {err}"
    );
    assert!(w.jobs().is_empty(), "no job was created");

    // Narrowed to an enabled service the guard passes and the launch goes to d601's k3s
    // executor, whose preflight finds no native k3s on this machine (no kubeconfig file): the
    // job fails there, naming the kubeconfig, before anything is fetched or built.
    let (code, out, err) = w.deploy(
        "apply",
        "dev",
        &["--service", "backend-core", "--wait-ms", "60000"],
    );
    assert_eq!(code, 1, "{err}\n{out}");
    assert!(!err.contains("code-queue-mgr"), "{err}");
    let jobs = w.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job_id = jobs[0]["jobId"].as_str().unwrap();
    let job = w.setup.job(job_id);
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["reason"]
            .as_str()
            .is_some_and(|r| r.contains("/etc/rancher/k3s/k3s.yaml")),
        "the failure names the kubeconfig: {job}"
    );
    let events = serde_json::to_string(&w.setup.job_events(job_id)).unwrap();
    assert!(events.contains("preflight"), "{events}");
    assert!(
        !events.contains("materialize"),
        "nothing was fetched before the preflight failed: {events}"
    );
}

#[test]
fn dev_plan_with_the_agent_offline_reports_unknown() {
    let w = World::new(&manifest(Some("dev"), &["backend-core", "frontend"]));
    // The controller runs; the d601 agent never connects.
    let _controller = w.setup.controller();
    let (code, out, err) = w.deploy("plan", "dev", &[]);
    assert_eq!(code, 0, "{err}\n{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    for line in out["plan"]["services"].as_array().unwrap() {
        assert_eq!(line["action"], "unknown", "{line}");
        assert_eq!(line["node"], "d601", "{line}");
        assert!(
            !line["reason"].as_str().unwrap_or_default().is_empty(),
            "{line}"
        );
    }
    assert_eq!(out["manifestCommit"], w.dev.0.to_string());
    // `deploy check` reads the same ref and reports the same lines, changing nothing.
    let (code, check, err) = w.deploy("check", "dev", &[]);
    assert_eq!(code, 0, "{err}\n{check}");
    let check: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(check["plan"], out["plan"]);
    assert_eq!(check["manifestCommit"], out["manifestCommit"]);
}
