//! The k3s executor end to end: the real controller and agent, real Git (through the agent's
//! tunnel), real Docker builds, a real registry for the pause image and the real k3s-side
//! containerd for the import — and **KubeApiDouble**, the test double of the Kubernetes API
//! server (no API server can be installed here).
//!
//! The test plays the kubelet's part the double cannot: once the image is in k3s's containerd
//! it runs it there with `ctr run` (so the health the service proxy reaches comes from the
//! imported image itself), and only then lets the double report the rollout complete.
#![allow(clippy::disallowed_methods)] // ctr and docker are run as an operator would.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::kube_double::{KubeApiDouble, Scenario};
use crate::support::registry::Registry;
use crate::support::service::{
    SampleRepo, Served, build_image, dockerfile, require_docker, write_manifest,
};
use crate::support::{Proc, Setup, free_port, path, started_steps, wait_for};

const K3S_SOCK: &str = "/run/k3s/containerd/containerd.sock";
const NAMESPACE: &str = "unidesk-k3s-test";

fn ctr(args: &[&str]) -> (bool, String) {
    let out = Command::new("ctr")
        .args(["--address", K3S_SOCK, "-n", "k8s.io"])
        .args(args)
        .output()
        .expect("ctr is installed (scripts/testbed-up installs containerd)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().expect("docker");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A task the test started in k3s's containerd (the kubelet's part); removed on drop.
struct Pod {
    id: String,
}

impl Pod {
    fn run(image: &str, id: &str) -> Pod {
        let (ok, out) = ctr(&["run", "-d", "--net-host", image, id]);
        assert!(ok, "ctr run {image} {id}: {out}");
        Pod { id: id.to_string() }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", &self.id]);
        for _ in 0..50 {
            if ctr(&["task", "delete", &self.id]).0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = ctr(&["containers", "rm", &self.id]);
    }
}

struct Fixture {
    setup: Setup,
    _controller: Proc,
    _agent: Proc,
    double: KubeApiDouble,
    _registry: Registry,
    repo: SampleRepo,
    served: Served,
    catalog: PathBuf,
    service_id: String,
    image: String,
    port: u16,
    legacy: String,
    uid: String,
    /// k3s deploys on this machine run one at a time: one test runs a `rancher/k3s`
    /// container, which every other preflight would (rightly) refuse.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = ctr(&["images", "rm", &format!("docker.io/library/{}", self.image)]);
        let _ = docker(&["rm", "-f", &self.legacy]);
    }
}

fn manifest(service_id: &str) -> String {
    format!(
        "apiVersion: apps/v1\n\
         kind: Deployment\n\
         metadata:\n  name: web\n  namespace: {NAMESPACE}\n\
         spec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  \
         template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      \
         - name: web\n        image: \"{{{{UNIDESK_IMAGE}}}}\"\n        \
         env:\n        - name: BUILT_FROM\n          value: \"{{{{UNIDESK_COMMIT}}}}\"\n\
         ---\n\
         apiVersion: v1\n\
         kind: Service\n\
         metadata:\n  name: web\n  namespace: {NAMESPACE}\n  labels:\n    unidesk.ai/service-id: {service_id}\n\
         spec:\n  selector: {{app: web}}\n  ports:\n  - port: 8080\n\
         ---\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  name: someone-else\n  namespace: {NAMESPACE}\n\
         data: {{a: b}}\n"
    )
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        require_docker();
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let uid = format!("{name}-{}", std::process::id());
        let double = KubeApiDouble::start();
        // The sandbox image, served by a real registry on loopback and pulled through the tunnel.
        let registry = Registry::start();
        build_image(
            &format!("unidesk-test-pause:{uid}"),
            "FROM local/busybox:latest\nRUN cp /bin/busybox /pause\nENTRYPOINT [\"/pause\"]\n",
        );
        let pause = registry.push(
            &format!("unidesk-test-pause:{uid}"),
            "rancher/mirrored-pause:3.6",
        );

        let setup = Setup::new(&["node"]);
        let kubeconfig = double.kubeconfig.display().to_string();
        let config = setup.edit_agent("node", "node-k3s", |text| {
            text.replace("/etc/rancher/k3s/k3s.yaml", &kubeconfig)
                .replace("rancher/mirrored-pause:3.6", &pause)
        });
        let controller = setup.controller();
        let agent = setup.agent_with(&config);
        setup.wait_agents(&["node"]);

        let git_root = setup.dir.join("git");
        std::fs::create_dir_all(&git_root).unwrap();
        let repo = SampleRepo::create(&git_root, name).unwrap();
        let served = Served::start(&git_root);
        let port = free_port();
        let service_id = format!("{name}-svc");
        let image = format!("unidesk-k3s-{uid}:dev");
        // The legacy direct container the executor removes after a verified rollout.
        let legacy = format!("unidesk-legacy-{uid}");
        let (ok, out) = docker(&[
            "run",
            "-d",
            "--network",
            "host",
            "--name",
            &legacy,
            "local/busybox:latest",
            "sleep",
            "600",
        ]);
        assert!(ok, "legacy container: {out}");

        let catalog = setup.dir.join("config.json");
        let config = json!({
            "microservices": [{
                "id": service_id,
                "repository": { "url": served.server.url(&format!("{name}.git")) },
                "deployment": {
                    "mode": "k3sctl-managed",
                    "node": "node",
                    "dockerfile": "Dockerfile",
                    "context": ".",
                    "image": image,
                    "buildTimeoutMs": 300000,
                    "k8s": {
                        "manifest": "k8s/web.k8s.yaml",
                        "namespace": NAMESPACE,
                        "deployments": [{ "name": "web", "container": "web" }],
                        "health": { "service": "web", "port": 8080, "path": "/health" },
                        "rolloutTimeoutMs": 120000
                    },
                    "legacyContainer": legacy
                }
            }],
            "nodes": { "node": { "agent": "node", "egress": "tunnel" } }
        });
        std::fs::write(&catalog, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        Fixture {
            setup,
            _controller: controller,
            _agent: agent,
            double,
            _registry: registry,
            repo,
            served,
            catalog,
            service_id,
            image,
            port,
            legacy,
            uid,
            _serial: serial,
        }
    }

    fn commit(&self, message: &str, manifest_text: &str) -> String {
        self.repo
            .commit(
                message,
                &[
                    (
                        "Dockerfile",
                        &dockerfile(self.port, "$UNIDESK_DEPLOY_COMMIT", ""),
                    ),
                    ("k8s/web.k8s.yaml", manifest_text),
                    ("index.html", message),
                ],
            )
            .unwrap()
            .to_string()
    }

    /// `deploy apply --file … --wait-ms …` in a thread: exit code and JSON output.
    fn apply_in_background(&self, commit: &str) -> std::thread::JoinHandle<(i32, Value)> {
        let manifest = self.setup.dir.join(format!("deploy-{commit}.json"));
        let url = self.served.server.url(&format!(
            "{}",
            self.repo.path.file_name().unwrap().to_string_lossy()
        ));
        write_manifest(&manifest, &self.service_id, &url, commit);
        let args: Vec<String> = vec![
            "deploy".into(),
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
        let bin = crate::support::bin("unidesk-controller");
        let dir = self.setup.dir.clone();
        let config = self.setup.controller_config();
        std::thread::spawn(move || {
            let out = Command::new(bin)
                .args(&args)
                .arg("--config")
                .arg(config)
                .current_dir(dir)
                .output()
                .expect("run the CLI");
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            let value =
                serde_json::from_str(&stdout).unwrap_or_else(|_| json!({ "stderr": stderr }));
            (out.status.code().unwrap_or(-1), value)
        })
    }

    /// Plays the kubelet: waits for the image to be in k3s's containerd, runs it there, and
    /// routes the Service's proxy to it. Fails at once with the apply's output if the apply
    /// ends first.
    fn run_pod(&self, tag: &str, apply: &std::thread::JoinHandle<(i32, Value)>) -> Pod {
        let name = format!("docker.io/library/{}", self.image);
        let until = std::time::Instant::now() + Duration::from_secs(240);
        loop {
            let (ok, out) = ctr(&["images", "check", &format!("name=={name}")]);
            if ok && out.contains("complete") {
                break;
            }
            if apply.is_finished() {
                let jobs = self.setup.cli_json(&["job", "list"]);
                let job = jobs[0]["jobId"].as_str().unwrap_or_default().to_string();
                let (_, logs, _) = self.setup.cli(&["job", "logs", &job]);
                panic!("the apply ended before the image was imported: {jobs:#}\n{logs}");
            }
            assert!(
                std::time::Instant::now() < until,
                "timed out waiting for {name} in k3s's containerd"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let pod = Pod::run(&name, &format!("{}-{tag}", self.uid));
        let url = format!("http://127.0.0.1:{}", self.port);
        wait_for(
            "the imported image to serve its health file",
            Duration::from_secs(30),
            || crate::support::service::health(self.port),
        );
        self.double.register_backend(NAMESPACE, "web", 8080, &url);
        pod
    }

    fn events(&self, out: &Value) -> Vec<Value> {
        self.setup
            .job_events(out["jobs"][0]["job"]["jobId"].as_str().expect("job id"))
    }
}

#[test]
fn k3s_deploy_imports_applies_rolls_out_and_proves_the_commit() {
    let f = Fixture::new("k3sweb");
    let a = f.commit("version A", &manifest(&f.service_id));
    // Until the test has run the imported image, the rollout is not observed.
    f.double
        .set_scenario(NAMESPACE, "web", Scenario::NeverObserved);
    let apply = f.apply_in_background(&a);
    let pod = f.run_pod("a", &apply);
    f.double.set_scenario(NAMESPACE, "web", Scenario::Completes);
    let (code, out) = apply.join().unwrap();
    assert_eq!(code, 0, "{out:#}");
    let job = &out["jobs"][0]["job"];
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let steps = started_steps(&f.events(&out));
    assert_eq!(
        steps,
        [
            "preflight",
            "materialize",
            "build",
            "import",
            "apply",
            "rollout",
            "verify"
        ],
        "{steps:?}"
    );
    let k3s = &job["result"]["detail"]["deploy"]["k3s"];
    assert_eq!(k3s["api_server"], f.double.url(), "{k3s}");
    assert_eq!(k3s["ca_sha256"], f.double.ca_fingerprint.as_str(), "{k3s}");
    assert_eq!(k3s["legacy_removed"], f.legacy.as_str(), "{k3s}");

    // The Deployment as stored by the API server: stamped, the built image, never pulled.
    let d = f
        .double
        .object("apps/v1", "deployments", NAMESPACE, "web")
        .expect("the Deployment was applied");
    assert_eq!(
        d["metadata"]["annotations"]["unidesk.ai/deploy-commit"],
        a.as_str()
    );
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], f.image.as_str());
    assert_eq!(container["imagePullPolicy"], "Never");
    let env = container["env"].to_string();
    assert!(
        env.contains(&a) && env.contains("UNIDESK_DEPLOY_COMMIT"),
        "{env}"
    );
    // Only the service's own objects were applied: the unlabelled ConfigMap was not.
    assert!(
        f.double
            .object("v1", "configmaps", NAMESPACE, "someone-else")
            .is_none()
    );
    // A server-side dry run came before the real apply, with our field manager.
    let patches: Vec<_> = f
        .double
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert!(patches.len() >= 4, "{patches:?}");
    let first_real = patches.iter().position(|r| !r.dry_run).unwrap();
    assert!(first_real >= 2, "dry runs first: {patches:?}");
    assert!(
        patches
            .iter()
            .all(|r| r.field_manager.as_deref() == Some("unidesk-deploy")),
        "{patches:?}"
    );
    // The image is complete, unpacked and pinned in k3s's containerd.
    let (_, listing) = ctr(&[
        "images",
        "ls",
        &format!("name==docker.io/library/{}", f.image),
    ]);
    assert!(
        listing.contains("io.cri-containerd.pinned=pinned"),
        "{listing}"
    );
    // The legacy direct container is gone.
    let (exists, _) = docker(&["inspect", &f.legacy]);
    assert!(!exists, "the legacy container was removed");

    // The same commit again: the live service proves it, nothing is rebuilt.
    let (code, out) = f.apply_in_background(&a).join().unwrap();
    assert_eq!(code, 0, "{out:#}");
    assert_eq!(out["jobs"][0]["job"]["status"], "noop", "{out:#}");

    // A new commit whose pods never come up: the rollout fails with the pods' reason, and the
    // old pod keeps serving.
    let b = f.commit("version B", &manifest(&f.service_id));
    f.double
        .set_scenario(NAMESPACE, "web", Scenario::ErrImageNeverPull);
    let (code, out) = f.apply_in_background(&b).join().unwrap();
    assert_eq!(code, 1, "{out:#}");
    let job = &out["jobs"][0]["job"];
    assert_eq!(job["status"], "failed");
    assert!(
        job["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ErrImageNeverPull")),
        "{job:#}"
    );
    assert!(crate::support::service::health(f.port).is_some_and(|h| h.contains(&a)));

    // The rollout "completes" but the live service still reports A: verification fails.
    f.double.set_scenario(NAMESPACE, "web", Scenario::Completes);
    let (code, out) = f.apply_in_background(&b).join().unwrap();
    assert_eq!(code, 1, "{out:#}");
    let reason = out["jobs"][0]["job"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains(&a) && reason.contains(&b) && reason.contains("health"),
        "a healthy old commit fails verification: {reason}"
    );
    drop(pod);
}

#[test]
fn k3s_manifest_leaving_its_namespace_is_refused_before_any_change() {
    let f = Fixture::new("k3sbad");
    let bad = manifest(&f.service_id).replace(
        "kind: Service\nmetadata:\n  name: web\n  namespace: unidesk-k3s-test",
        "kind: Service\nmetadata:\n  name: web\n  namespace: kube-system",
    );
    assert_ne!(bad, manifest(&f.service_id));
    let c = f.commit("escapes", &bad);
    let (code, out) = f.apply_in_background(&c).join().unwrap();
    assert_eq!(code, 1, "{out:#}");
    let job = &out["jobs"][0]["job"];
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("kube-system") && reason.contains("namespace"),
        "{job:#}"
    );
    let steps = started_steps(&f.events(&out));
    assert_eq!(
        steps,
        ["preflight", "materialize"],
        "nothing built: {steps:?}"
    );
    assert!(
        f.double.requests().iter().all(|r| r.method == "GET"),
        "nothing was applied: {:?}",
        f.double.requests()
    );
    // The legacy container still runs: nothing changed.
    let (running, _) = docker(&["inspect", &f.legacy]);
    assert!(running);
}

#[test]
fn prewarm_imports_the_pause_and_foundation_images_and_refuses_a_fake_pause() {
    require_docker();
    let uid = format!("prewarm-{}", std::process::id());
    let registry = Registry::start();
    build_image(
        &format!("unidesk-test-pause:{uid}"),
        "FROM local/busybox:latest\nRUN cp /bin/busybox /pause\nENTRYPOINT [\"/pause\"]\n",
    );
    build_image(
        &format!("unidesk-test-fake-pause:{uid}"),
        "FROM local/busybox:latest\nENTRYPOINT [\"sleep\", \"3600\"]\n",
    );
    let pause = registry.push(
        &format!("unidesk-test-pause:{uid}"),
        &format!("{uid}/pause:3.6"),
    );
    let fake = registry.push(
        &format!("unidesk-test-fake-pause:{uid}"),
        &format!("{uid}/fake-pause:3.6"),
    );
    let foundation = format!("unidesk-test-foundation:{uid}");
    let (ok, out) = docker(&["tag", "local/busybox:latest", &foundation]);
    assert!(ok, "{out}");

    let setup = Setup::new(&["node"]);
    let good = setup.edit_agent("node", "node-good", |text| {
        text.replace("rancher/mirrored-pause:3.6", &pause).replace(
            "prewarm_images = []",
            &format!("prewarm_images = [\"{foundation}\"]"),
        )
    });
    let bad = setup.edit_agent("node", "node-bad", |text| {
        text.replace("rancher/mirrored-pause:3.6", &fake)
    });
    let _controller = setup.controller();

    let prewarm = || {
        setup.cli(&[
            "dev-env",
            "prewarm-images",
            "--agent",
            "node",
            "--wait-ms",
            "120000",
        ])
    };
    {
        let _agent = setup.agent_with(&bad);
        setup.wait_agents(&["node"]);
        let (code, out, err) = prewarm();
        assert_eq!(code, 1, "{err}\n{out}");
        assert!(
            out.contains("not a pause image") && out.contains("/pause"),
            "the refusal names the rule: {out}"
        );
        let (_, listing) = ctr(&["images", "ls", "-q"]);
        assert!(!listing.contains(&format!("{uid}/fake-pause")), "{listing}");
    }
    // The refused agent is gone; the next one (with a real pause image) connects afresh.
    let since = unidesk_controller::hub::now_ms();
    let _agent = setup.agent_with(&good);
    wait_for(
        "the second agent to connect",
        Duration::from_secs(60),
        || {
            let (_, out, _) = setup.cli(&["agents"]);
            let list: Value = serde_json::from_str(&out).ok()?;
            list.as_array()?
                .iter()
                .any(|a| {
                    a["id"] == "node"
                        && a["connectedSinceUnixMs"]
                            .as_u64()
                            .is_some_and(|t| t >= since)
                })
                .then_some(())
        },
    );
    let (code, out, err) = prewarm();
    assert_eq!(code, 0, "{err}\n{out}");
    for name in [pause.clone(), format!("docker.io/library/{foundation}")] {
        let (ok, out) = ctr(&["images", "check", &format!("name=={name}")]);
        assert!(ok && out.contains("complete"), "{name}: {out}");
        let _ = ctr(&["images", "rm", &name]);
    }
    let _ = docker(&["rmi", &foundation]);
}

#[test]
fn k3s_running_inside_docker_is_refused_by_the_preflight() {
    let f = Fixture::new("k3sindocker");
    let tag = format!("rancher/k3s:unidesk-test-{}", f.uid);
    let name = format!("k3s-in-docker-{}", f.uid);
    assert!(docker(&["tag", "local/busybox:latest", &tag]).0);
    let (ok, out) = docker(&[
        "run",
        "-d",
        "--network",
        "host",
        "--name",
        &name,
        &tag,
        "sleep",
        "600",
    ]);
    assert!(ok, "{out}");
    let c = f.commit("any", &manifest(&f.service_id));
    let (code, out) = f.apply_in_background(&c).join().unwrap();
    let _ = docker(&["rm", "-f", &name]);
    let _ = docker(&["rmi", &tag]);
    assert_eq!(code, 1, "{out:#}");
    let reason = out["jobs"][0]["job"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains(&name) && reason.contains("k3s in Docker is forbidden"),
        "the refusal names the container: {reason}"
    );
    assert_eq!(started_steps(&f.events(&out)), ["preflight"]);
}

#[test]
fn images_missing_from_k3s_containerd_fail_before_the_build() {
    let f = Fixture::new("k3smissing");
    let absent = format!("unidesk-absent-{}:1", f.uid);
    let commit_line = "          value: \"{{UNIDESK_COMMIT}}\"\n";
    let with_sidecar = manifest(&f.service_id).replacen(
        commit_line,
        &format!("{commit_line}      - name: sidecar\n        image: {absent}\n"),
        1,
    );
    assert_ne!(with_sidecar, manifest(&f.service_id));
    let c = f.commit("needs a sidecar", &with_sidecar);
    let (code, out) = f.apply_in_background(&c).join().unwrap();
    assert_eq!(code, 1, "{out:#}");
    let reason = out["jobs"][0]["job"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains(&absent) && reason.contains("dev-env prewarm-images"),
        "{reason}"
    );
    let steps = started_steps(&f.events(&out));
    assert!(!steps.contains(&"build".to_string()), "{steps:?}");
    assert!(f.double.requests().iter().all(|r| r.method == "GET"));
}
