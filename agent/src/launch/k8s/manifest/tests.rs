use super::*;
use proptest::prelude::*;
use serde_json::json;

const NS: &str = "unidesk-dev";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// The dev core manifest as the seed describes it: backend-core-dev and frontend-dev
/// Deployment/Service pairs with placeholders, plus a foundation object of another service.
const CORE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: backend-core-dev
  namespace: unidesk-dev
  labels: {app: backend-core-dev, unidesk.ai/service-id: backend-core}
spec:
  replicas: 1
  selector: {matchLabels: {app: backend-core-dev}}
  template:
    metadata:
      labels: {app: backend-core-dev}
    spec:
      initContainers:
        - name: wait-db
          image: rancher/mirrored-library-busybox:1.36.1
      containers:
        - name: backend-core
          image: "{{UNIDESK_IMAGE}}"
          env:
            - {name: UNIDESK_ENV, value: dev}
            - {name: UNIDESK_DEPLOY_COMMIT, value: stale}
            - {name: BUILD_COMMIT, value: "commit-{{UNIDESK_COMMIT}}"}
        - name: log-shipper
          image: busybox:1.36
---
apiVersion: v1
kind: Service
metadata:
  name: backend-core-dev
  labels: {unidesk.ai/service-id: backend-core}
spec:
  selector: {app: backend-core-dev}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: frontend-dev
  namespace: unidesk-dev
  labels: {unidesk.ai/service-id: frontend}
spec:
  selector: {matchLabels: {app: frontend-dev}}
  template:
    metadata: {labels: {app: frontend-dev}}
    spec:
      containers:
        - name: frontend
          image: "{{UNIDESK_IMAGE}}"
          ports: [{containerPort: 3000, hostPort: 3000}]
---
apiVersion: v1
kind: Namespace
metadata: {name: unidesk}
"#;

fn target(name: &str, container: &str) -> DeploymentTarget {
    DeploymentTarget {
        name: name.into(),
        container: container.into(),
    }
}

fn selection(service: &str, deployments: Vec<DeploymentTarget>) -> Selection {
    Selection {
        service_id: service.into(),
        namespace: NS.into(),
        deployments,
    }
}

fn backend() -> Selection {
    selection(
        "backend-core",
        vec![target("backend-core-dev", "backend-core")],
    )
}

fn the_stamp() -> Stamp {
    Stamp {
        image: "unidesk-backend-core:dev".into(),
        service_id: "backend-core".into(),
        repo: "https://git.example/unidesk.git".into(),
        commit: SHA.into(),
        requested_commit: "0123456".into(),
    }
}

fn refusals(err: ManifestError) -> Vec<(usize, String, &'static str)> {
    match err {
        ManifestError::Refused(r) => r
            .into_iter()
            .map(|r| (r.document, r.object, r.rule))
            .collect(),
        other => panic!("expected a refusal, got {other}"),
    }
}

fn one(kind: &str, extra: &str) -> String {
    format!(
        "apiVersion: {}\nkind: {kind}\nmetadata:\n  name: x\n  namespace: unidesk-dev\n  \
         labels: {{unidesk.ai/service-id: backend-core}}\n{extra}",
        if kind == "Deployment" {
            "apps/v1"
        } else {
            "v1"
        }
    )
}

#[test]
fn k8s_manifest_parse_reads_documents_and_lists() {
    let objects = parse(CORE).unwrap();
    assert_eq!(objects.len(), 4);
    assert_eq!(objects[1].reference(), "Service/backend-core-dev");
    assert_eq!(objects[1].document, 1);
    assert_eq!(objects[1].namespace(), None);
    let list = "---\n---\napiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n  - {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n";
    let objects = parse(list).unwrap();
    assert_eq!(objects.len(), 2);
    assert!(objects.iter().all(|o| o.document == 1), "{objects:?}");
}

#[test]
fn k8s_manifest_parse_errors_name_document_and_field() {
    let err =
        parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: [\n").unwrap_err();
    assert!(
        matches!(err, ManifestError::Malformed { document: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("document 1: malformed YAML"),
        "{err}"
    );

    let cases = [
        (
            "apiVersion: v1\nmetadata: {name: a}\n",
            "document 0: kind: is missing",
        ),
        (
            "kind: ConfigMap\nmetadata: {name: a}\n",
            "document 0: apiVersion: is missing",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
            "document 0: metadata.name: is missing",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: 3}\n",
            "metadata.name: must be a non-empty string",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: [x]}\n",
            "metadata.namespace: must be a string",
        ),
        (
            "---\n---\n- a\n",
            "document 1: (document): is not a mapping",
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n  - {kind: ConfigMap}\n",
            "document 0: items[0].apiVersion: is missing",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}

#[test]
fn k8s_manifest_narrow_keeps_listed_deployments_and_labelled_objects() {
    let kept = narrow(parse(CORE).unwrap(), &backend()).unwrap();
    let refs: Vec<String> = kept.iter().map(Object::reference).collect();
    assert_eq!(
        refs,
        ["Deployment/backend-core-dev", "Service/backend-core-dev"]
    );
    // The Service without a namespace got the allowed one.
    assert_eq!(kept[1].namespace(), Some(NS));
    // A listed Deployment without the label is kept too.
    let text = CORE.replace(
        "labels: {app: backend-core-dev, unidesk.ai/service-id: backend-core}",
        "labels: {app: backend-core-dev}",
    );
    let kept = narrow(parse(&text).unwrap(), &backend()).unwrap();
    assert_eq!(kept.len(), 2);
}

#[test]
fn k8s_manifest_narrow_requires_listed_deployment_and_container() {
    let sel = selection("backend-core", vec![target("backend-core-dev", "backend")]);
    let err = narrow(parse(CORE).unwrap(), &sel).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ManifestError::MissingContainer { document: 0, .. }),
        "{text}"
    );
    assert!(
        text.contains("\"backend\"") && text.contains("log-shipper"),
        "{text}"
    );

    let sel = selection(
        "backend-core",
        vec![
            target("backend-core-dev", "backend-core"),
            target("worker-dev", "w"),
        ],
    );
    let err = narrow(parse(CORE).unwrap(), &sel).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Deployment worker-dev is not in the manifest (service backend-core)"
    );
}

#[test]
fn k8s_manifest_narrow_refuses_kept_objects_that_break_a_rule() {
    // frontend's Deployment declares a hostPort; narrowing to frontend refuses it.
    let sel = selection("frontend", vec![target("frontend-dev", "frontend")]);
    let got = refusals(narrow(parse(CORE).unwrap(), &sel).unwrap_err());
    assert_eq!(
        got,
        [(2, "Deployment/frontend-dev".to_string(), RULE_HOST_PORT)]
    );

    let cases: Vec<(String, &str)> = vec![
        (one("ConfigMap", "").replace("namespace: unidesk-dev", "namespace: unidesk"), RULE_NAMESPACE),
        (one("Service", "spec: {type: NodePort, ports: [{port: 80}]}\n"), RULE_SERVICE_TYPE),
        (one("Service", "spec: {type: LoadBalancer, ports: [{port: 80}]}\n"), RULE_SERVICE_TYPE),
        (one("Service", "spec: {ports: [{port: 80, nodePort: 30080}]}\n"), RULE_SERVICE_TYPE),
        (one("Deployment", "spec: {template: {spec: {hostNetwork: true, containers: []}}}\n"), RULE_HOST_NETWORK),
        (one("Deployment", "spec: {template: {spec: {hostPID: true, containers: []}}}\n"), RULE_HOST_PID),
        (one("Deployment", "spec: {template: {spec: {hostIPC: true, containers: []}}}\n"), RULE_HOST_IPC),
        (one("Deployment", "spec: {template: {spec: {containers: [{name: c, securityContext: {privileged: true}}]}}}\n"), RULE_PRIVILEGED),
        (one("Deployment", "spec: {template: {spec: {initContainers: [{name: i, ports: [{containerPort: 1, hostPort: 1}]}]}}}\n"), RULE_HOST_PORT),
        (one("StatefulSet", "").replace("apiVersion: v1", "apiVersion: apps/v1"), RULE_KIND),
        (one("Namespace", ""), RULE_KIND),
        ("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: r, labels: {unidesk.ai/service-id: backend-core}}\n".into(), RULE_NAMESPACE),
        (format!("{}---\n{}", one("ConfigMap", ""), one("ConfigMap", "")), RULE_DUPLICATE),
    ];
    for (text, rule) in cases {
        let err = narrow(parse(&text).unwrap(), &selection("backend-core", vec![])).unwrap_err();
        let message = err.to_string();
        let got = refusals(err);
        assert!(got.iter().any(|(_, _, r)| *r == rule), "{rule}: {message}");
        assert!(
            message.contains("document ") && message.contains("rule "),
            "{message}"
        );
    }
}

#[test]
fn k8s_manifest_refusals_are_all_reported_and_name_document_kind_name_rule() {
    let text = format!(
        "{}---\n{}",
        one("Service", "spec: {type: NodePort}\n"),
        one("ConfigMap", "")
            .replace("name: x", "name: y")
            .replace("namespace: unidesk-dev", "namespace: prod")
    );
    let err = narrow(parse(&text).unwrap(), &selection("backend-core", vec![])).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("document 0 Service/x: rule service-type: spec.type is NodePort"),
        "{message}"
    );
    assert!(
        message.contains("document 1 ConfigMap/y: rule namespace: metadata.namespace is \"prod\""),
        "{message}"
    );
}

#[test]
fn k8s_manifest_objects_of_other_services_are_dropped_not_judged() {
    // frontend's hostPort and the prod Namespace are not backend-core's objects.
    let kept = narrow(parse(CORE).unwrap(), &backend()).unwrap();
    assert!(kept.iter().all(|o| o.name() == "backend-core-dev"));
}

#[test]
fn k8s_manifest_guard_rules() {
    let svc = json!({"kind": "Service", "metadata": {"name": "s", "namespace": NS},
                     "spec": {"type": "NodePort", "ports": [{"port": 1, "nodePort": 30001}]}});
    // NodePort with a nodePort is one violation, not two.
    assert_eq!(guard(&svc, NS).len(), 1);
    let ns = json!({"kind": "Namespace", "metadata": {"name": NS}});
    assert_eq!(guard(&ns, NS), []);
    let ns = json!({"kind": "Namespace", "metadata": {"name": "unidesk"}});
    assert_eq!(guard(&ns, NS)[0].rule, RULE_NAMESPACE);
    let missing = json!({"kind": "ConfigMap", "metadata": {"name": "c"}});
    assert!(guard(&missing, NS)[0].detail.contains("missing"));
    let cron = json!({"kind": "CronJob", "metadata": {"name": "c", "namespace": NS},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {"hostNetwork": true}}}}}});
    assert_eq!(
        guard(&cron, NS)[0].detail,
        "spec.jobTemplate.spec.template.spec.hostNetwork is true"
    );
}

#[test]
fn k8s_manifest_stamp_sets_image_env_annotations_and_placeholders() {
    let kept = narrow(parse(CORE).unwrap(), &backend()).unwrap();
    let stamped = stamp(kept, &backend().deployments, &the_stamp()).unwrap();
    let d = &stamped[0].value;
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "unidesk-backend-core:dev");
    assert_eq!(container["imagePullPolicy"], "Never");
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("UNIDESK_ENV", "dev"),
        ("BUILD_COMMIT", &*format!("commit-{SHA}")),
        (ENV_SERVICE_ID, "backend-core"),
        (ENV_REPO, "https://git.example/unidesk.git"),
        (ENV_COMMIT, SHA),
        (ENV_REQUESTED_COMMIT, "0123456"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(env, expected);
    // The other container is left alone.
    let other = &d["spec"]["template"]["spec"]["containers"][1];
    assert_eq!(other["image"], "busybox:1.36");
    assert!(other.get("env").is_none() && other.get("imagePullPolicy").is_none());
    for annotations in [
        &d["metadata"]["annotations"],
        &d["spec"]["template"]["metadata"]["annotations"],
    ] {
        assert_eq!(annotations[ANNOTATION_DEPLOY_COMMIT], SHA);
        assert_eq!(annotations[ANNOTATION_DEPLOY_REQUESTED_COMMIT], "0123456");
        assert_eq!(
            annotations[ANNOTATION_DEPLOY_REPO],
            "https://git.example/unidesk.git"
        );
        assert_eq!(annotations[ANNOTATION_SERVICE_ID], "backend-core");
    }
}

#[test]
fn k8s_manifest_stamp_is_not_textual_substitution() {
    // A placeholder-looking value that would break YAML if substituted as text.
    let stamp_value = Stamp {
        image: "img: {weird}\n- x".into(),
        ..the_stamp()
    };
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: unidesk-dev}\ndata:\n  image: '{{UNIDESK_IMAGE}}'\n  '{{UNIDESK_COMMIT}}': key-stays\n";
    let stamped = stamp(parse(text).unwrap(), &[], &stamp_value).unwrap();
    assert_eq!(stamped[0].value["data"]["image"], "img: {weird}\n- x");
    // Keys are not scalars that get replaced.
    assert_eq!(stamped[0].value["data"]["{{UNIDESK_COMMIT}}"], "key-stays");
}

#[test]
fn k8s_manifest_stamp_rejects_unknown_placeholders_and_short_commits() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: unidesk-dev}\ndata: {a: ok, b: ['{{UNIDESK_TAG}}']}\n";
    let err = stamp(parse(text).unwrap(), &[], &the_stamp())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "document 0 ConfigMap/c: data.b[0]: unknown placeholder in \"{{UNIDESK_TAG}}\""
    );
    let short = Stamp {
        commit: "0123456".into(),
        ..the_stamp()
    };
    let err = stamp(parse(text).unwrap(), &[], &short).unwrap_err();
    assert!(matches!(err, ManifestError::InvalidStamp(_)), "{err}");
    let err = stamp(Vec::new(), &backend().deployments, &the_stamp()).unwrap_err();
    assert!(
        matches!(err, ManifestError::MissingDeployment { .. }),
        "{err}"
    );
}

#[test]
fn k8s_manifest_three_deployments_are_all_stamped() {
    let mut text = String::new();
    for role in ["scheduler", "read", "write"] {
        text.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: code-queue-{role}-dev, namespace: unidesk-dev}}\n\
             spec:\n  selector: {{matchLabels: {{app: cq-{role}}}}}\n  template:\n    metadata: {{labels: {{app: cq-{role}}}}}\n    \
             spec: {{containers: [{{name: code-queue, image: '{{{{UNIDESK_IMAGE}}}}'}}]}}\n"
        ));
    }
    let targets: Vec<_> = ["scheduler", "read", "write"]
        .iter()
        .map(|r| target(&format!("code-queue-{r}-dev"), "code-queue"))
        .collect();
    let sel = selection("code-queue", targets.clone());
    let kept = narrow(parse(&text).unwrap(), &sel).unwrap();
    let stamped = stamp(
        kept,
        &targets,
        &Stamp {
            service_id: "code-queue".into(),
            ..the_stamp()
        },
    )
    .unwrap();
    assert_eq!(stamped.len(), 3);
    for o in &stamped {
        assert_eq!(
            o.value["spec"]["template"]["metadata"]["annotations"][ANNOTATION_DEPLOY_COMMIT],
            SHA
        );
        assert_eq!(
            o.value["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "Never"
        );
    }
}

#[test]
fn k8s_manifest_referenced_images() {
    let kept = narrow(parse(CORE).unwrap(), &backend()).unwrap();
    let stamped = stamp(kept, &backend().deployments, &the_stamp()).unwrap();
    let images: Vec<String> = referenced_images(&stamped).into_iter().collect();
    assert_eq!(
        images,
        [
            "busybox:1.36",
            "rancher/mirrored-library-busybox:1.36.1",
            "unidesk-backend-core:dev"
        ]
    );
}

fn arb_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z{}_ ]{0,12}",
        Just(PLACEHOLDER_IMAGE.to_string()),
        Just(PLACEHOLDER_COMMIT.to_string()),
        "[a-z]{0,4}".prop_map(|s| format!("{s}{PLACEHOLDER_COMMIT}{s}")),
    ]
}

proptest! {
    #[test]
    fn k8s_manifest_prop_stamp_leaves_no_placeholder_and_is_idempotent(
        values in proptest::collection::vec(arb_scalar(), 0..6),
        namespace in prop_oneof![Just(None), Just(Some(NS.to_string())), "[a-z]{1,8}".prop_map(Some)],
    ) {
        let mut data = serde_json::Map::new();
        for (i, v) in values.iter().enumerate() {
            data.insert(format!("k{i}"), Value::String(v.clone()));
        }
        let mut meta = json!({"name": "c", "labels": {LABEL_SERVICE_ID: "svc"}});
        if let Some(ns) = &namespace {
            meta["namespace"] = json!(ns);
        }
        let object = Object { document: 0, value: json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}) };
        let sel = selection("svc", vec![]);
        match narrow(vec![object], &sel) {
            Ok(kept) => {
                // Whatever is kept sits in the allowed namespace.
                prop_assert!(kept.iter().all(|o| o.namespace() == Some(NS)));
                let once = stamp(kept, &[], &the_stamp()).unwrap();
                let text: String = once.iter().map(|o| o.value.to_string()).collect();
                prop_assert!(!text.contains(PLACEHOLDER_PREFIX));
                let twice = stamp(once.clone(), &[], &the_stamp()).unwrap();
                prop_assert_eq!(once, twice);
            }
            Err(e) => prop_assert!(namespace.is_some_and(|n| n != NS), "{}", e),
        }
    }
}
