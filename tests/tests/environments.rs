//! Environment mode (`deploy plan|apply --env dev|prod`) against a real Git remote, the
//! product's smart-HTTP server, holding `master`, `deploy/dev` and `deploy/prod`: the manifest
//! comes from the environment's fixed ref and nowhere else, its commit and blob are reported,
//! and the apply guards stop before anything changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use git2::{Oid, Repository, Signature};
use serde_json::{Value, json};

use crate::support::kube_double::KubeApiDouble;
use crate::support::service::{BASE_IMAGE, ComposeService, Served, build_image, require_docker};
use crate::support::{Proc, Setup, bin, path};

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
    for line in out["plan"]["services"].as_array().unwrap() {
        let reason = line["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("agent d601") && reason.contains("not connected"),
            "the reason names the agent and why: {line}"
        );
    }
    // `deploy check` reads the same ref and reports the same lines, changing nothing; what it
    // could not compare makes it exit 3 (unreachable), never 0.
    let (code, check, err) = w.deploy("check", "dev", &[]);
    assert_eq!(code, 3, "{err}\n{check}");
    let check: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(check["plan"], out["plan"]);
    assert_eq!(check["manifestCommit"], out["manifestCommit"]);
    assert_eq!(check["ok"], false, "{check}");
    assert_eq!(check["drift"], json!([]), "{check}");
    assert_eq!(
        check["unknown"].as_array().map(Vec::len),
        Some(2),
        "{check}"
    );
    assert!(err.contains("could not be compared"), "{err}");
}

/// A full SHA other than [`COMMIT`]: what runs when the node has drifted.
const OTHER: &str = "9f1e2d3c4b5a69788796a5b4c3d2e1f00112233f";

/// A line of a plan by service id.
fn line<'a>(out: &'a Value, id: &str) -> &'a Value {
    out["plan"]["services"]
        .as_array()
        .expect("plan.services")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no plan line for {id}: {out}"))
}

/// Points agent `id` of `setup` at the Kubernetes API double instead of the node's k3s.
fn agent_on_double(setup: &Setup, id: &str, double: &KubeApiDouble) -> Proc {
    let kubeconfig = double.kubeconfig.display().to_string();
    let config = setup.edit_agent(id, &format!("{id}-k3s"), |text| {
        text.replace("/etc/rancher/k3s/k3s.yaml", &kubeconfig)
    });
    setup.agent_with(&config)
}

/// A Deployment the k3s executor would have stamped with `commit`.
fn stamped_deployment(name: &str, container: &str, commit: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "unidesk-dev",
                     "annotations": {"unidesk.ai/deploy-commit": commit}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": container, "image": "i:dev"}]}}}
    })
}

#[test]
fn compose_plan_and_check_read_the_live_commit_from_the_agent() {
    require_docker();
    let setup = Setup::new(&["node"]);
    let _controller = setup.controller();
    let _agent = setup.agent("node");
    setup.wait_agents(&["node"]);
    // A running Compose service whose image is labelled with COMMIT, as a deploy leaves it.
    let project = format!("unidesk-live-{}", std::process::id());
    let image = format!("{project}-web:latest");
    build_image(
        &image,
        &format!(
            "FROM {BASE_IMAGE}\nLABEL unidesk.ai/source-commit={COMMIT}\nCMD [\"sleep\", \"3600\"]\n"
        ),
    );
    let _compose = ComposeService::up(&setup.dir, &project, "web", &image);
    let catalog = setup.dir.join("config.json");
    let deployment = |service: &str| {
        json!({"mode": "unidesk-direct", "node": "node", "dockerfile": "Dockerfile",
               "image": image, "compose": {"project": project, "service": service}})
    };
    let config = json!({
        "microservices": [
            {"id": "web", "repository": {"url": "https://example.invalid/web.git"},
             "deployment": deployment("web")},
            {"id": "idle", "repository": {"url": "https://example.invalid/idle.git"},
             "deployment": deployment("idle")}
        ],
        "nodes": {"node": {"agent": "node", "egress": "tunnel"}}
    });
    std::fs::write(&catalog, serde_json::to_vec(&config).unwrap()).unwrap();
    let run = |verb: &str, web_commit: &str, extra: &[&str]| {
        let file = setup.dir.join("deploy.json");
        let doc = json!({"schemaVersion": 1, "services": [
            {"id": "web", "repo": "https://example.invalid/web.git", "commitId": web_commit},
            {"id": "idle", "repo": "https://example.invalid/idle.git", "commitId": COMMIT}
        ]});
        std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
        let (file, catalog) = (path(&file), path(&catalog));
        let mut args = vec!["deploy", verb, "--file", &file, "--catalog", &catalog];
        args.extend_from_slice(extra);
        let (code, out, err) = setup.cli(&args);
        let out: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("deploy {verb} printed no JSON ({e}): {out}\n{err}"));
        (code, out, err)
    };

    // The requested commit runs (asked by its short form too): noop.
    let (code, out, err) = run("plan", &COMMIT[..12], &[]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert_eq!(line(&out, "web")["action"], "noop", "{out}");
    assert_eq!(line(&out, "web")["liveCommit"], COMMIT, "{out}");
    // Nothing runs for `idle`: the agent answered, so it is `deploy`, not `unknown`.
    assert_eq!(line(&out, "idle")["action"], "deploy", "{out}");
    assert_eq!(line(&out, "idle")["liveCommit"], Value::Null, "{out}");

    // Another commit is wanted: deploy, with the live commit shown.
    let (code, out, err) = run("plan", OTHER, &[]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert_eq!(line(&out, "web")["action"], "deploy", "{out}");
    assert_eq!(line(&out, "web")["liveCommit"], COMMIT, "{out}");

    // check: drift is exit 1, naming the service and both commits.
    let (code, out, err) = run("check", OTHER, &["--service", "web"]);
    assert_eq!(code, 1, "{err}\n{out}");
    assert_eq!(out["ok"], false);
    assert_eq!(out["drift"][0]["id"], "web", "{out}");
    assert_eq!(out["drift"][0]["liveCommit"], COMMIT, "{out}");
    assert_eq!(out["drift"][0]["requestedCommit"], OTHER, "{out}");
    assert!(err.contains("web") && err.contains(OTHER), "{err}");

    // check in sync: exit 0.
    let (code, out, err) = run("check", COMMIT, &["--service", "web"]);
    assert_eq!(code, 0, "{err}\n{out}");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["inSync"], json!(["web"]), "{out}");
    assert_eq!(out["drift"], json!([]), "{out}");

    // The whole set: `idle` runs nothing, which is drift too.
    let (code, out, err) = run("check", COMMIT, &[]);
    assert_eq!(code, 1, "{err}\n{out}");
    assert_eq!(out["drift"][0]["id"], "idle", "{out}");
}

#[test]
fn k3s_plan_and_check_read_the_deploy_commit_annotation_through_the_agent() {
    let w = World::new(&manifest(Some("dev"), &["backend-core", "frontend"]));
    let double = KubeApiDouble::start();
    double.put_object(
        stamped_deployment("backend-core-dev", "backend-core", COMMIT),
        "unidesk-deploy",
    );
    double.put_object(
        stamped_deployment("frontend-dev", "frontend", OTHER),
        "unidesk-deploy",
    );
    let _controller = w.setup.controller();
    let _agent = agent_on_double(&w.setup, "d601", &double);
    w.setup.wait_agents(&["d601"]);

    let (code, out, err) = w.deploy("plan", "dev", &[]);
    assert_eq!(code, 0, "{err}\n{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    let backend = line(&out, "backend-core");
    assert_eq!(backend["action"], "noop", "{out}");
    assert_eq!(backend["liveCommit"], COMMIT, "{out}");
    let frontend = line(&out, "frontend");
    assert_eq!(frontend["action"], "deploy", "{out}");
    assert_eq!(frontend["liveCommit"], OTHER, "{out}");
    assert_eq!(out["manifestCommit"], w.dev.0.to_string());

    let (code, out, err) = w.deploy("check", "dev", &[]);
    assert_eq!(code, 1, "{err}\n{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["inSync"], json!(["backend-core"]), "{out}");
    assert_eq!(out["drift"][0]["id"], "frontend", "{out}");
    assert_eq!(out["drift"][0]["liveCommit"], OTHER, "{out}");
    let (code, out, err) = w.deploy("check", "dev", &["--service", "backend-core"]);
    assert_eq!(code, 0, "{err}\n{out}");

    // Asking changed nothing: the agent only read the Deployments.
    let requests = double.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with("/deployments/frontend-dev")),
        "{requests:?}"
    );
    assert!(
        requests.iter().all(|r| r.method == "GET"),
        "only reads: {requests:?}"
    );
}

/// The dev manifest fixture that passes the static checks (Namespace, ConfigMap, Deployment,
/// Service).
fn valid_dev_manifest() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../controller/tests-fixtures/devenv/valid.k8s.yaml"),
    )
    .unwrap()
}

#[test]
fn dev_env_kubectl_dry_run_sends_every_object_as_a_server_side_dry_run() {
    let setup = Setup::new(&["d601"]);
    let double = KubeApiDouble::start();
    let _controller = setup.controller();
    let _agent = agent_on_double(&setup, "d601", &double);
    setup.wait_agents(&["d601"]);
    let validate = |name: &str, text: &str| {
        let file = setup.dir.join(name);
        std::fs::write(&file, text).unwrap();
        let file = path(&file);
        let (code, out, err) = setup.cli(&[
            "dev-env",
            "validate",
            "--manifest",
            &file,
            "--kubectl-dry-run",
            "--agent",
            "d601",
        ]);
        let out: Value = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"))
        };
        (code, out, err)
    };

    let (code, out, err) = validate("valid.k8s.yaml", &valid_dev_manifest());
    assert_eq!(code, 0, "{err}\n{out}");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["dryRun"]["apiServer"], double.url(), "{out}");
    let objects: Vec<(&str, bool)> = out["dryRun"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["object"].as_str().unwrap(), o["ok"] == true))
        .collect();
    assert_eq!(
        objects,
        [
            ("Namespace/unidesk-dev", true),
            ("ConfigMap/unidesk-dev-runtime-config", true),
            ("Deployment/backend-core-dev", true),
            ("Service/backend-core-dev", true),
        ],
        "{out}"
    );
    let patches: Vec<_> = double
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 4, "{patches:?}");
    assert!(
        patches
            .iter()
            .all(|r| r.dry_run && r.field_manager.as_deref() == Some("unidesk-deploy")),
        "every apply was a dry run: {patches:?}"
    );
    assert!(
        double
            .object("apps/v1", "deployments", "unidesk-dev", "backend-core-dev")
            .is_none(),
        "nothing was applied for real"
    );

    // The API server refuses one object: exit 2, that object's reason, the others still ok.
    let broken = valid_dev_manifest().replace(
        "      labels:\n        app: backend-core-dev\n    spec:",
        "      labels:\n        app: something-else\n    spec:",
    );
    assert_ne!(broken, valid_dev_manifest(), "the fixture changed shape");
    let (code, out, err) = validate("broken.k8s.yaml", &broken);
    assert_eq!(code, 2, "{err}\n{out}");
    assert_eq!(out["ok"], false, "{out}");
    let deployment = &out["dryRun"]["objects"][2];
    assert_eq!(deployment["object"], "Deployment/backend-core-dev", "{out}");
    assert_eq!(deployment["ok"], false, "{out}");
    assert!(
        deployment["error"]
            .as_str()
            .is_some_and(|e| e.contains("selector") && e.contains("422")),
        "{out}"
    );
    assert_eq!(out["dryRun"]["objects"][3]["ok"], true, "{out}");
    assert!(err.contains("Deployment/backend-core-dev"), "{err}");

    // A static violation: nothing is sent to the agent.
    let before = double.requests().len();
    let (code, out, err) = validate(
        "host-port.k8s.yaml",
        &valid_dev_manifest().replace(
            "            - containerPort: 8081\n",
            "            - containerPort: 8081\n              hostPort: 8081\n",
        ),
    );
    assert_eq!(code, 2, "{err}\n{out}");
    assert_eq!(out["violations"][0]["rule"], "host-port", "{out}");
    assert!(out.get("dryRun").is_none(), "{out}");
    assert!(err.contains("the dry run was not sent"), "{err}");
    assert_eq!(
        double.requests().len(),
        before,
        "no request reached the API"
    );
}

#[test]
fn dev_env_kubectl_dry_run_with_the_agent_offline_is_unreachable() {
    let setup = Setup::new(&["d601"]);
    let _controller = setup.controller();
    let file = setup.dir.join("valid.k8s.yaml");
    std::fs::write(&file, valid_dev_manifest()).unwrap();
    let (code, out, err) = setup.cli(&[
        "dev-env",
        "validate",
        "--manifest",
        &path(&file),
        "--kubectl-dry-run",
        "--agent",
        "d601",
    ]);
    assert_eq!(code, 3, "{err}\n{out}");
    assert!(
        err.contains("agent d601") && err.contains("not connected"),
        "{err}"
    );
    // The flag without an agent is bad input.
    let (code, _, err) = setup.cli(&[
        "dev-env",
        "validate",
        "--manifest",
        &path(&file),
        "--kubectl-dry-run",
    ]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn dev_env_validate_without_a_manifest_checks_the_foundation_config_names() {
    let setup = Setup::new(&["d601"]);
    // A repository root: config.json (the project's own) and the foundation manifest at the
    // path it names.
    let repo = setup.dir.join("unidesk");
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config_text = std::fs::read_to_string(project.join("config.json")).unwrap();
    let config: Value = serde_json::from_str(&config_text).unwrap();
    let foundation = config["environments"]["dev"]["foundation"]["manifest"]
        .as_str()
        .unwrap();
    let manifest = repo.join(foundation);
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    std::fs::write(repo.join("config.json"), &config_text).unwrap();
    let fixture = std::fs::read_to_string(
        project.join("controller/tests-fixtures/devenv/foundation.k8s.yaml"),
    )
    .unwrap();
    std::fs::write(&manifest, &fixture).unwrap();
    let catalog = path(&repo.join("config.json"));

    let (code, out, err) = setup.cli(&["dev-env", "validate", "--catalog", &catalog]);
    assert_eq!(code, 0, "{err}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["manifest"], path(&manifest), "{report}");
    assert_eq!(report["objects"], 9, "{report}");
    assert_eq!(
        report["allowedObjects"],
        config["environments"]["dev"]["foundation"]["allowedObjects"]
    );

    // An object the foundation may not create, in the right namespace: a finding with file,
    // document, object and rule; exit 2.
    std::fs::write(
        &manifest,
        format!(
            "{fixture}---\nkind: Service\nmetadata: {{name: backend-core-dev, namespace: \
             unidesk-dev}}\nspec: {{ports: [{{port: 8080}}]}}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = setup.cli(&["dev-env", "validate", "--catalog", &catalog]);
    assert_eq!(code, 2, "{err}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["violations"],
        json!([{
            "file": path(&manifest),
            "document": 9,
            "object": "Service/backend-core-dev#9",
            "rule": "allowed-object",
            "detail": report["violations"][0]["detail"],
        }]),
        "{report}"
    );
    assert!(err.contains("1 dev-env violation"), "{err}");

    // No --manifest and nothing naming a foundation: bad input that says what to pass.
    let bare = setup.dir.join("no-foundation.json");
    let mut without = config.clone();
    without["environments"]["dev"]
        .as_object_mut()
        .unwrap()
        .remove("foundation");
    std::fs::write(&bare, serde_json::to_vec(&without).unwrap()).unwrap();
    let (code, _, err) = setup.cli(&["dev-env", "validate", "--catalog", &path(&bare)]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("environments.dev.foundation is not set") && err.contains("--manifest"),
        "{err}"
    );
}
