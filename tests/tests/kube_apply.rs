//! The Kubernetes path against the API server double (`KubeApiDouble`, the one double this
//! project allows: no API server can be installed here). The agent library is called
//! directly: manifest narrowing and stamping, server-side apply (dry run first), rollout
//! judgement and verification through the service proxy. The last test runs against a real
//! cluster when `UNIDESK_TEST_KUBECONFIG` names one.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use unidesk_agent::launch::k8s::cluster::{Applied, Cluster, FIELD_MANAGER, RolloutError};
use unidesk_agent::launch::k8s::manifest::{
    self, DeploymentTarget, ManifestError, Object, Selection, Stamp,
};
use unidesk_agent::launch::k8s::verify::{HealthEvidence, health_commit, judge_verification};

use crate::support::kube_double::{HttpBackend, KubeApiDouble, Scenario, write_kubeconfig};

const NS: &str = "unidesk-dev";
const COMMIT: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
const OLD_COMMIT: &str = "d670460b4b4aece5915caf5c68d12f560a9fe3e4";

/// Decision Center as the seed describes it: a Deployment and a ClusterIP Service, with
/// placeholders kept in source control; plus another service's object that narrowing drops.
const DECISION_CENTER: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: decision-center
  namespace: unidesk-dev
  labels: {app: decision-center, unidesk.ai/service-id: decision-center}
spec:
  replicas: 1
  selector: {matchLabels: {app: decision-center}}
  template:
    metadata: {labels: {app: decision-center}}
    spec:
      containers:
        - name: decision-center
          image: "{{UNIDESK_IMAGE}}"
          env:
            - {name: DEPLOY_COMMIT, value: "{{UNIDESK_COMMIT}}"}
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: decision-center
  labels: {unidesk.ai/service-id: decision-center}
spec:
  selector: {app: decision-center}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: someone-elses-config, namespace: unidesk}
data: {A: b}
"#;

fn dc_selection() -> Selection {
    Selection {
        service_id: "decision-center".into(),
        namespace: NS.into(),
        deployments: vec![DeploymentTarget {
            name: "decision-center".into(),
            container: "decision-center".into(),
        }],
    }
}

fn stamp_for(service: &str, image: &str, commit: &str) -> Stamp {
    Stamp {
        image: image.into(),
        service_id: service.into(),
        repo: "https://git.example/unidesk/unidesk.git".into(),
        commit: commit.into(),
        requested_commit: commit[..12].into(),
    }
}

fn prepare(text: &str, selection: &Selection, stamp: &Stamp) -> Result<Vec<Object>, ManifestError> {
    let objects = manifest::narrow(manifest::parse(text)?, selection)?;
    manifest::stamp(objects, &selection.deployments, stamp)
}

/// Applies and waits for every listed Deployment; returns the applied objects and the
/// progress lines seen.
async fn apply_and_roll(
    cluster: &Cluster,
    objects: &[Object],
    selection: &Selection,
    wait: Duration,
) -> (Vec<Applied>, Result<(), RolloutError>, Vec<String>) {
    let applied = cluster.apply(objects, FIELD_MANAGER).await.expect("apply");
    let deadline = Instant::now() + wait;
    let mut progress = Vec::new();
    for target in &selection.deployments {
        let generation = applied
            .iter()
            .find(|a| a.kind == "Deployment" && a.name == target.name)
            .and_then(|a| a.generation)
            .expect("a Deployment has a generation");
        let result = cluster
            .wait_rollout(
                &selection.namespace,
                &target.name,
                generation,
                deadline,
                |p| progress.push(p.to_string()),
            )
            .await;
        if result.is_err() {
            return (applied, result, progress);
        }
    }
    (applied, Ok(()), progress)
}

fn patches(double: &KubeApiDouble) -> Vec<(String, bool)> {
    double
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| (r.path, r.dry_run))
        .collect()
}

#[tokio::test]
async fn kube_apply_happy_path_dry_run_apply_rollout_and_verify() {
    let double = KubeApiDouble::start();
    let backend = HttpBackend::start(json!({"ok": true, "deploy": {"commit": COMMIT}}));
    double.register_backend(NS, "decision-center", 8080, &backend.url());

    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    assert_eq!(cluster.api_server_url(), double.url());
    assert_eq!(
        cluster.ca_fingerprint(),
        Some(double.ca_fingerprint.as_str())
    );
    assert_eq!(cluster.version().await.unwrap(), "v1.33.0+kube-api-double");

    let selection = dc_selection();
    let stamp = stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT);
    let objects = prepare(DECISION_CENTER, &selection, &stamp).unwrap();
    assert_eq!(
        objects.len(),
        2,
        "the other service's ConfigMap is narrowed away"
    );
    let (applied, rolled, progress) =
        apply_and_roll(&cluster, &objects, &selection, Duration::from_secs(20)).await;
    rolled.unwrap();
    assert_eq!(applied.len(), 2);
    assert_eq!(applied[0].generation, Some(1));
    assert!(!progress.is_empty(), "the first poll reports progress");

    // Every object was dry-run before any was applied for real, all as unidesk-deploy.
    let deployment_path = "/apis/apps/v1/namespaces/unidesk-dev/deployments/decision-center";
    let service_path = "/api/v1/namespaces/unidesk-dev/services/decision-center";
    assert_eq!(
        patches(&double),
        [
            (deployment_path.to_string(), true),
            (service_path.to_string(), true),
            (deployment_path.to_string(), false),
            (service_path.to_string(), false),
        ]
    );
    for r in double.requests().iter().filter(|r| r.method == "PATCH") {
        assert_eq!(r.field_manager.as_deref(), Some(FIELD_MANAGER));
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
    }

    // The stored Deployment carries image, pull policy, env and annotations.
    let stored = double
        .object("apps/v1", "deployments", NS, "decision-center")
        .expect("stored");
    assert_eq!(
        stored["metadata"]["managedFields"][0]["manager"],
        FIELD_MANAGER
    );
    let container = &stored["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "unidesk-decision-center:d601");
    assert_eq!(container["imagePullPolicy"], "Never");
    let env = container["env"].as_array().unwrap();
    let env_value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(env_value("DEPLOY_COMMIT"), COMMIT);
    assert_eq!(env_value("UNIDESK_DEPLOY_SERVICE_ID"), "decision-center");
    assert_eq!(
        env_value("UNIDESK_DEPLOY_REPO"),
        "https://git.example/unidesk/unidesk.git"
    );
    assert_eq!(env_value("UNIDESK_DEPLOY_COMMIT"), COMMIT);
    assert_eq!(env_value("UNIDESK_DEPLOY_REQUESTED_COMMIT"), &COMMIT[..12]);
    for annotations in [
        &stored["metadata"]["annotations"],
        &stored["spec"]["template"]["metadata"]["annotations"],
    ] {
        assert_eq!(annotations["unidesk.ai/deploy-commit"], COMMIT);
        assert_eq!(annotations["unidesk.ai/service-id"], "decision-center");
    }
    let service = double
        .object("v1", "services", NS, "decision-center")
        .expect("stored service");
    assert_eq!(service["metadata"]["namespace"], NS, "namespace filled in");

    // Verification: annotation, env and health through the API server's service proxy.
    let annotation = cluster
        .deployment_annotation(NS, "decision-center", "unidesk.ai/deploy-commit")
        .await
        .unwrap();
    assert_eq!(annotation.as_deref(), Some(COMMIT));
    let evidence = cluster
        .deployment_evidence(NS, "decision-center", "decision-center")
        .await
        .unwrap();
    let health = cluster
        .service_health(NS, "decision-center", 8080, "/health")
        .await
        .unwrap();
    judge_verification(
        COMMIT,
        &[evidence],
        &[HealthEvidence {
            source: "service decision-center:8080/health".into(),
            commit: health_commit(&health),
        }],
    )
    .unwrap();
    assert_eq!(backend.paths(), ["/health"]);
    assert!(double.requests().iter().any(|r| r.method == "GET"
        && r.path == "/api/v1/namespaces/unidesk-dev/services/decision-center:8080/proxy/health"));

    // Applying the same objects again does not bump the generation (nothing changed) ...
    let again = cluster.apply(&objects, FIELD_MANAGER).await.unwrap();
    assert_eq!(again[0].generation, Some(1));
    // ... and a new commit does, which rolls the pods.
    let next = stamp_for(
        "decision-center",
        "unidesk-decision-center:d601",
        OLD_COMMIT,
    );
    let objects = prepare(DECISION_CENTER, &selection, &next).unwrap();
    let again = cluster.apply(&objects, FIELD_MANAGER).await.unwrap();
    assert_eq!(again[0].generation, Some(2));
}

#[tokio::test]
async fn kube_apply_frontend_route_health_goes_through_the_frontend_service_proxy() {
    let double = KubeApiDouble::start();
    let frontend = HttpBackend::start(json!({"deploy": {"commit": COMMIT}}));
    double.register_backend(NS, "frontend-dev", 3000, &frontend.url());
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let health = cluster
        .frontend_route_health(NS, "frontend-dev", 3000, "decision-center")
        .await
        .unwrap();
    assert_eq!(health_commit(&health).as_deref(), Some(COMMIT));
    assert_eq!(
        frontend.paths(),
        ["/api/microservices/decision-center/health"]
    );
    // A service without endpoints is an error naming the proxy path, not a fallback.
    let err = cluster
        .service_health(NS, "nobody", 80, "health")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/services/nobody:80/proxy/health") && err.contains("503"),
        "{err}"
    );
    // A service id that is not a plain name never becomes a proxy path.
    let err = cluster
        .frontend_route_health(NS, "frontend-dev", 3000, "x/../y")
        .await;
    assert!(err.is_err());
    assert_eq!(frontend.paths().len(), 1);
    // A backend error status is an error naming it.
    frontend.set(500, json!({"error": "down"}));
    let err = cluster
        .frontend_route_health(NS, "frontend-dev", 3000, "decision-center")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("500"), "{err}");
}

#[tokio::test]
async fn kube_apply_code_queue_three_deployments_all_stamped_and_rolled() {
    let double = KubeApiDouble::start();
    let mut text = String::new();
    for role in ["scheduler", "read", "write"] {
        text.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\n\
             metadata: {{name: code-queue-{role}-dev, namespace: unidesk-dev}}\n\
             spec:\n  selector: {{matchLabels: {{app: code-queue-{role}-dev}}}}\n  template:\n    \
             metadata: {{labels: {{app: code-queue-{role}-dev}}}}\n    spec:\n      containers:\n      \
             - {{name: code-queue, image: '{{{{UNIDESK_IMAGE}}}}', env: [{{name: CODE_QUEUE_SERVICE_ROLE, value: {role}}}],\n         \
             resources: {{limits: {{cpu: '1'}}}}}}\n\
             ---\napiVersion: v1\nkind: Service\n\
             metadata: {{name: code-queue-{role}-dev, labels: {{unidesk.ai/service-id: code-queue}}}}\n\
             spec: {{selector: {{app: code-queue-{role}-dev}}, ports: [{{port: 4222}}]}}\n"
        ));
    }
    let selection = Selection {
        service_id: "code-queue".into(),
        namespace: NS.into(),
        deployments: ["scheduler", "read", "write"]
            .iter()
            .map(|r| DeploymentTarget {
                name: format!("code-queue-{r}-dev"),
                container: "code-queue".into(),
            })
            .collect(),
    };
    let stamp = stamp_for("code-queue", "unidesk-code-queue:dev", COMMIT);
    let objects = prepare(&text, &selection, &stamp).unwrap();
    assert_eq!(objects.len(), 6);
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let (applied, rolled, _) =
        apply_and_roll(&cluster, &objects, &selection, Duration::from_secs(30)).await;
    rolled.unwrap();
    assert_eq!(applied.len(), 6);
    let dry: Vec<bool> = patches(&double).iter().map(|(_, d)| *d).collect();
    assert_eq!(
        dry,
        [true; 6].into_iter().chain([false; 6]).collect::<Vec<_>>()
    );
    for role in ["scheduler", "read", "write"] {
        let d = double
            .object(
                "apps/v1",
                "deployments",
                NS,
                &format!("code-queue-{role}-dev"),
            )
            .unwrap();
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"]["unidesk.ai/deploy-commit"],
            COMMIT
        );
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "unidesk-code-queue:dev");
        assert_eq!(c["env"][0]["value"], role, "the role env is kept");
        let evidence = cluster
            .deployment_evidence(NS, &format!("code-queue-{role}-dev"), "code-queue")
            .await
            .unwrap();
        judge_verification(COMMIT, &[evidence], &[]).unwrap();
    }
}

#[tokio::test]
async fn kube_apply_each_failure_reason_surfaces_in_the_error() {
    let double = KubeApiDouble::start();
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let cases = [
        (
            Scenario::ImagePullBackOff,
            "ImagePullBackOff: Back-off pulling image \"unidesk-decision-center:d601\"",
        ),
        (
            Scenario::ErrImageNeverPull,
            "ErrImageNeverPull: Container image \"unidesk-decision-center:d601\" is not present with pull policy of Never",
        ),
        (
            Scenario::CrashLoopBackOff,
            "container decision-center: CrashLoopBackOff after 4 restarts",
        ),
        (
            Scenario::Unschedulable,
            "is unschedulable: 0/1 nodes are available: 1 Insufficient memory.",
        ),
        (
            Scenario::FailedCreateQuota,
            "FailedCreate: pods \"decision-center-h1-x\" is forbidden: exceeded quota: unidesk-dev-quota",
        ),
    ];
    for (i, (scenario, expected)) in cases.into_iter().enumerate() {
        // One namespace per case, so each rollout starts fresh.
        let ns = format!("unidesk-dev-{i}");
        let selection = Selection {
            namespace: ns.clone(),
            ..dc_selection()
        };
        let text = DECISION_CENTER.replace("namespace: unidesk-dev", &format!("namespace: {ns}"));
        let stamp = stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT);
        let objects = prepare(&text, &selection, &stamp).unwrap();
        double.set_scenario(&ns, "decision-center", scenario);
        let started = Instant::now();
        let (_, rolled, _) =
            apply_and_roll(&cluster, &objects, &selection, Duration::from_secs(30)).await;
        let err = rolled.unwrap_err();
        assert!(
            matches!(err, RolloutError::Failed { .. }),
            "{scenario:?}: a terminal failure, not {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(expected),
            "{scenario:?}: {expected:?} not in {text:?}"
        );
        assert!(
            text.contains(&format!("Deployment {ns}/decision-center")),
            "{text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{scenario:?}: a terminal failure is reported without waiting for the deadline"
        );
    }
}

#[tokio::test]
async fn kube_apply_old_pods_still_serving_is_never_complete() {
    let double = KubeApiDouble::start();
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let selection = dc_selection();
    let objects = prepare(
        DECISION_CENTER,
        &selection,
        &stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT),
    )
    .unwrap();
    double.set_scenario(NS, "decision-center", Scenario::OldPodsStillServing);
    // 5 s at one poll per 500 ms: room for three polls however slow the machine is.
    let (_, rolled, progress) =
        apply_and_roll(&cluster, &objects, &selection, Duration::from_millis(5000)).await;
    let err = rolled.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RolloutError::Deadline { .. }), "{text}");
    assert!(text.contains("not complete by the deadline"), "{text}");
    assert!(
        text.contains("old pods") || text.contains("old pod"),
        "{text}"
    );
    assert!(text.contains("old ReplicaSet decision-center-h0"), "{text}");
    assert_eq!(
        progress.len(),
        1,
        "the same state is reported once: {progress:?}"
    );
    // Many polls happened, none judged complete.
    let gets = double
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/deployments/decision-center"))
        .count();
    assert!(gets >= 3, "{gets} polls");
}

#[tokio::test]
async fn kube_apply_never_observed_generation_hits_the_deadline() {
    let double = KubeApiDouble::start();
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let selection = dc_selection();
    let objects = prepare(
        DECISION_CENTER,
        &selection,
        &stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT),
    )
    .unwrap();
    double.set_scenario(NS, "decision-center", Scenario::NeverObserved);
    // Room for a poll or more on a loaded machine: the error reports what the last one saw.
    let (_, rolled, _) =
        apply_and_roll(&cluster, &objects, &selection, Duration::from_millis(3000)).await;
    let text = rolled.unwrap_err().to_string();
    assert!(text.contains("observe generation 1 (observed 0)"), "{text}");
}

#[tokio::test]
async fn kube_apply_healthy_old_commit_fails_verification() {
    let double = KubeApiDouble::start();
    let backend = HttpBackend::start(json!({"ok": true, "deploy": {"commit": OLD_COMMIT}}));
    double.register_backend(NS, "decision-center", 8080, &backend.url());
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let selection = dc_selection();
    let objects = prepare(
        DECISION_CENTER,
        &selection,
        &stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT),
    )
    .unwrap();
    let (_, rolled, _) =
        apply_and_roll(&cluster, &objects, &selection, Duration::from_secs(20)).await;
    rolled.unwrap();
    let evidence = cluster
        .deployment_evidence(NS, "decision-center", "decision-center")
        .await
        .unwrap();
    let health = cluster
        .service_health(NS, "decision-center", 8080, "health")
        .await
        .unwrap();
    let err = judge_verification(
        COMMIT,
        std::slice::from_ref(&evidence),
        &[HealthEvidence {
            source: "service unidesk-dev/decision-center:8080/health".into(),
            commit: health_commit(&health),
        }],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("health deploy.commit"), "{err}");
    assert!(err.contains(OLD_COMMIT) && err.contains(COMMIT), "{err}");

    // A Deployment stamped by someone else at the old commit fails on the annotation.
    double.put_object(
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "legacy", "namespace": NS,
                            "annotations": {"unidesk.ai/deploy-commit": OLD_COMMIT}},
               "spec": {"selector": {"matchLabels": {"app": "legacy"}},
                        "template": {"metadata": {"labels": {"app": "legacy"}},
                                     "spec": {"containers": [{"name": "legacy", "image": "l:1"}]}}}}),
        "kubectl",
    );
    let legacy = cluster
        .deployment_evidence(NS, "legacy", "legacy")
        .await
        .unwrap();
    let err = judge_verification(COMMIT, &[legacy], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("annotation unidesk.ai/deploy-commit shows commit"),
        "{err}"
    );
}

#[tokio::test]
async fn kube_apply_refused_manifest_sends_zero_requests() {
    let double = KubeApiDouble::start();
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    let selection = dc_selection();
    let stamp = stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT);
    let cases = [
        (
            DECISION_CENTER.replace(
                "  name: decision-center\n  namespace: unidesk-dev",
                "  name: decision-center\n  namespace: unidesk",
            ),
            "document 0 Deployment/decision-center: rule namespace",
        ),
        (
            DECISION_CENTER.replace(
                "spec:\n  selector: {app: decision-center}",
                "spec:\n  type: NodePort\n  selector: {app: decision-center}",
            ),
            "document 1 Service/decision-center: rule service-type: spec.type is NodePort",
        ),
        (
            DECISION_CENTER.replace(
                "ports: [{containerPort: 8080}]",
                "ports: [{containerPort: 8080, hostPort: 8080}]",
            ),
            "document 0 Deployment/decision-center: rule host-port",
        ),
        (
            DECISION_CENTER.replace(
                "    spec:\n      containers:",
                "    spec:\n      hostNetwork: true\n      containers:",
            ),
            "rule host-network",
        ),
    ];
    for (text, expected) in cases {
        let err = prepare(&text, &selection, &stamp).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ManifestError::Refused(_)), "{message}");
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
    }
    // connect sends nothing by itself; nothing reached the double.
    drop(cluster);
    assert_eq!(double.requests(), []);
}

#[tokio::test]
async fn kube_apply_schema_error_at_dry_run_changes_nothing() {
    let double = KubeApiDouble::start();
    let cluster = Cluster::connect(&double.kubeconfig).await.unwrap();
    // The Service is applied first in this manifest; the Deployment's selector does not
    // match its template, which only the server's validation sees.
    let text = format!(
        "{}\n---\n{}",
        DECISION_CENTER.split("---").nth(1).unwrap(),
        DECISION_CENTER.split("---").next().unwrap().replace(
            "selector: {matchLabels: {app: decision-center}}",
            "selector: {matchLabels: {app: other}}"
        )
    );
    let selection = dc_selection();
    let objects = prepare(
        &text,
        &selection,
        &stamp_for("decision-center", "unidesk-decision-center:d601", COMMIT),
    )
    .unwrap();
    let err = cluster.apply(&objects, FIELD_MANAGER).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("dry-run server-side apply of Deployment/decision-center"),
        "{message}"
    );
    assert!(
        message.contains("does not match template `labels`") && message.contains("422"),
        "{message}"
    );
    assert!(
        patches(&double).iter().all(|(_, dry)| *dry),
        "no real apply: {:?}",
        patches(&double)
    );
    assert!(
        double
            .object("v1", "services", NS, "decision-center")
            .is_none()
    );
}

#[tokio::test]
async fn kube_apply_connect_uses_only_the_given_kubeconfig() {
    // Two API servers; each kubeconfig file decides which one is asked.
    let first = KubeApiDouble::start();
    let second = KubeApiDouble::start();
    let a = Cluster::connect(&first.kubeconfig).await.unwrap();
    let b = Cluster::connect(&second.kubeconfig).await.unwrap();
    a.version().await.unwrap();
    assert_eq!(first.requests().len(), 1);
    assert_eq!(second.requests().len(), 0);
    b.version().await.unwrap();
    assert_eq!(first.requests().len(), 1);
    assert_eq!(second.requests().len(), 1);
    assert_ne!(a.ca_fingerprint(), b.ca_fingerprint());
    assert_eq!(b.ca_fingerprint(), Some(second.ca_fingerprint.as_str()));

    // The CA in the file is what is trusted: the first server's address with the second
    // server's CA fails TLS, and no request reaches the server.
    let dir = tempfile::tempdir().unwrap();
    let crossed = dir.path().join("crossed.yaml");
    write_kubeconfig(&crossed, &first.url(), &second.ca_pem);
    let c = Cluster::connect(&crossed).await.unwrap();
    let err = c.version().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("GET /version at {}", first.url())),
        "{err}"
    );
    assert_eq!(first.requests().len(), 1, "TLS refused before any request");

    // A missing file is an error naming it; no default path or KUBECONFIG is tried instead.
    let missing = dir.path().join("absent-kubeconfig.yaml");
    let err = Cluster::connect(&missing).await.unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

/// The real-cluster test (TESTBED.md "Kubernetes"): runs when `UNIDESK_TEST_KUBECONFIG`
/// names a kubeconfig, otherwise prints why it did not run — the one allowed skip.
#[tokio::test]
async fn kube_apply_real_cluster_busybox_rollout() {
    let Some(path) = std::env::var_os("UNIDESK_TEST_KUBECONFIG") else {
        eprintln!(
            "kube_apply_real_cluster_busybox_rollout did not run: UNIDESK_TEST_KUBECONFIG is not \
             set (no Kubernetes API server can run on the test machines; point it at a k3s \
             kubeconfig such as /etc/rancher/k3s/k3s.yaml to run it)"
        );
        return;
    };
    let image = std::env::var("UNIDESK_TEST_KUBE_IMAGE")
        .unwrap_or_else(|_| "rancher/mirrored-library-busybox:1.36.1".into());
    real_cluster(Path::new(&path), &image).await;
}

async fn real_cluster(kubeconfig: &Path, image: &str) {
    let cluster = Cluster::connect(kubeconfig).await.unwrap();
    let version = cluster.version().await.unwrap();
    eprintln!("real cluster {} ({version})", cluster.api_server_url());
    let ns = format!(
        "unidesk-test-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    cluster.create_namespace(&ns).await.unwrap();
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: busybox}
spec:
  replicas: 1
  selector: {matchLabels: {app: busybox}}
  template:
    metadata: {labels: {app: busybox}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: busybox
          image: "{{UNIDESK_IMAGE}}"
          command: [sh, -c, "sleep 3600"]
          resources: {limits: {cpu: 100m, memory: 32Mi}}
"#;
    let selection = Selection {
        service_id: "busybox".into(),
        namespace: ns.clone(),
        deployments: vec![DeploymentTarget {
            name: "busybox".into(),
            container: "busybox".into(),
        }],
    };
    let result = async {
        let objects = prepare(text, &selection, &stamp_for("busybox", image, COMMIT))
            .map_err(|e| e.to_string())?;
        let (_, rolled, _) =
            apply_and_roll(&cluster, &objects, &selection, Duration::from_secs(180)).await;
        rolled.map_err(|e| e.to_string())?;
        let evidence = cluster
            .deployment_evidence(&ns, "busybox", "busybox")
            .await
            .map_err(|e| e.to_string())?;
        judge_verification(COMMIT, &[evidence], &[]).map_err(|e| e.to_string())
    }
    .await;
    cluster.delete_namespace(&ns).await.unwrap();
    result.unwrap();
}
