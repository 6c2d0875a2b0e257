//! `dev-env validate`: static checks of Kubernetes manifests meant for the dev environment
//! (seed sections "D601 Dev Foundation" and "D601 Dev Core").
//!
//! [`validate`] is a pure function over multi-document YAML text. Each rule that an object
//! breaks becomes one [`Violation`] naming the object (`Kind/name` and its document index)
//! and the rule. The placement and exposure rules are the agent's
//! [`manifest::guard`](unidesk_agent::launch::k8s::manifest::guard) — the same check the k3s
//! executor applies before anything reaches the cluster — so there is one implementation:
//!
//! - [`RULE_NAMESPACE`]: every namespaced object sits in the dev namespace; a `Namespace`
//!   object may only be that namespace itself; other cluster-scoped kinds are not allowed.
//! - [`RULE_SERVICE_TYPE`]: no `Service` of type `NodePort` or `LoadBalancer`, no `nodePort`.
//! - [`RULE_HOST_PORT`]: no `hostPort` in any container port of a pod spec.
//! - [`RULE_HOST_NETWORK`], [`RULE_HOST_PID`], [`RULE_HOST_IPC`]: no host namespaces in a
//!   pod spec; [`RULE_PRIVILEGED`]: no privileged containers.
//!
//! Rules of this validator only:
//!
//! - [`RULE_DATABASE_URL`]: no production-looking literal `DATABASE_URL` (container env,
//!   or a `ConfigMap`/`Secret` key of that name).
//! - [`RULE_OBJECT`]: a document that is not a Kubernetes object (no `kind` or name).
//!
//! Malformed YAML is not a violation but a [`DevEnvError`] naming the document index.

use serde::Serialize;
use serde::de::Deserialize as _;
use serde_json::Value;
use unidesk_agent::launch::k8s::manifest;

pub use unidesk_agent::launch::k8s::manifest::{
    RULE_HOST_IPC, RULE_HOST_NETWORK, RULE_HOST_PID, RULE_HOST_PORT, RULE_NAMESPACE,
    RULE_PRIVILEGED, RULE_SERVICE_TYPE,
};

/// The dev namespace `dev-env validate` checks against by default.
pub const DEV_NAMESPACE: &str = "unidesk-dev";
/// The only database a dev `DATABASE_URL` may name.
pub const DEV_DATABASE: &str = "unidesk_dev";
/// The production namespace's service domain; a dev URL must never contain it.
const PROD_SERVICE_DOMAIN: &str = ".unidesk.svc";

/// Rule: no production-looking `DATABASE_URL`.
pub const RULE_DATABASE_URL: &str = "database-url";
/// Rule: every document is a Kubernetes object with a kind and a name.
pub const RULE_OBJECT: &str = "object";

/// A manifest that cannot be read as YAML.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DevEnvError {
    /// The YAML document at `document` (0-based, in stream order) does not parse.
    #[error("document {document}: malformed YAML: {message}")]
    Malformed { document: usize, message: String },
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `Kind/name#document`, e.g. `Service/frontend-dev#2`.
    pub object: String,
    /// One of the `RULE_*` names.
    pub rule: &'static str,
    /// What exactly is wrong.
    pub detail: String,
}

/// The result of [`validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The namespace checked against.
    pub namespace: String,
    /// Objects seen (empty documents are not counted; `List` items are).
    pub objects: usize,
    /// Every broken rule, in document order.
    pub violations: Vec<Violation>,
}

impl Report {
    /// True when no rule is broken.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Checks multi-document Kubernetes YAML against the dev-environment rules.
pub fn validate(yaml_text: &str, namespace: &str) -> Result<Report, DevEnvError> {
    let mut report = Report {
        namespace: namespace.to_owned(),
        objects: 0,
        violations: Vec::new(),
    };
    for (index, document) in serde_yaml_ng::Deserializer::from_str(yaml_text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| DevEnvError::Malformed {
            document: index,
            message: e.to_string(),
        })?;
        match value {
            Value::Null => {}
            Value::Object(_) if kind_of(&value) == Some("List") => {
                let items = value.get("items").and_then(Value::as_array);
                for item in items.into_iter().flatten() {
                    check_object(item, index, namespace, &mut report);
                }
            }
            other => check_object(&other, index, namespace, &mut report),
        }
    }
    Ok(report)
}

fn kind_of(value: &Value) -> Option<&str> {
    value.get("kind").and_then(Value::as_str)
}

fn check_object(object: &Value, index: usize, namespace: &str, report: &mut Report) {
    report.objects += 1;
    let kind = kind_of(object);
    let metadata = object.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let label = format!(
        "{}/{}#{index}",
        kind.unwrap_or("<no kind>"),
        name.unwrap_or("<no name>")
    );
    let mut flag = |rule: &'static str, detail: String| {
        report.violations.push(Violation {
            object: label.clone(),
            rule,
            detail,
        });
    };
    let (Some(kind), Some(_)) = (kind, name) else {
        flag(
            RULE_OBJECT,
            "not a Kubernetes object: kind and metadata.name are required".into(),
        );
        return;
    };

    // Placement and exposure: the shared guard.
    for violation in manifest::guard(object, namespace) {
        flag(violation.rule, violation.detail);
    }

    // DATABASE_URL kept in a ConfigMap or Secret.
    if matches!(kind, "ConfigMap" | "Secret") {
        for section in ["data", "stringData"] {
            // Secret `data` is base64; only literal text is checked.
            if kind == "Secret" && section == "data" {
                continue;
            }
            let url = object
                .get(section)
                .and_then(|d| d.get("DATABASE_URL"))
                .and_then(Value::as_str);
            if let Some(reason) = url.and_then(production_database_url) {
                flag(
                    RULE_DATABASE_URL,
                    format!("{section}.DATABASE_URL {reason}"),
                );
            }
        }
    }

    // DATABASE_URL in container env.
    let Some((path, pod)) = manifest::pod_spec(kind, object) else {
        return;
    };
    for (list, cname, container) in manifest::containers(pod) {
        let env = container.get("env").and_then(Value::as_array);
        for var in env.into_iter().flatten() {
            if var.get("name").and_then(Value::as_str) != Some("DATABASE_URL") {
                continue;
            }
            let value = var.get("value").and_then(Value::as_str);
            if let Some(reason) = value.and_then(production_database_url) {
                flag(
                    RULE_DATABASE_URL,
                    format!("{path}.{list}[{cname}] env DATABASE_URL {reason}"),
                );
            }
        }
    }
}

/// Why a literal `DATABASE_URL` looks like production, or `None` when it names the dev
/// database on a dev host.
fn production_database_url(url: &str) -> Option<String> {
    if url.contains(PROD_SERVICE_DOMAIN) {
        return Some(format!(
            "names the production namespace ({PROD_SERVICE_DOMAIN})"
        ));
    }
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host_port.split(':').next().unwrap_or("");
    let first_label = host.split('.').next().unwrap_or("");
    if first_label == "postgres" {
        return Some(format!(
            "names host {host:?} (production postgres; dev uses postgres-dev)"
        ));
    }
    let database = path.split(['?', '#']).next().unwrap_or("");
    if database != DEV_DATABASE {
        return Some(format!(
            "names database {database:?}, not the dev database {DEV_DATABASE:?}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = include_str!("../../tests-fixtures/devenv/valid.k8s.yaml");
    const WRONG_NAMESPACE: &str =
        include_str!("../../tests-fixtures/devenv/wrong-namespace.k8s.yaml");
    const SERVICE_TYPE: &str = include_str!("../../tests-fixtures/devenv/service-type.k8s.yaml");
    const HOST_PORT: &str = include_str!("../../tests-fixtures/devenv/host-port.k8s.yaml");
    const HOST_NETWORK: &str = include_str!("../../tests-fixtures/devenv/host-network.k8s.yaml");
    const DATABASE_URL: &str = include_str!("../../tests-fixtures/devenv/database-url.k8s.yaml");
    const MALFORMED: &str = include_str!("../../tests-fixtures/devenv/malformed.k8s.yaml");

    fn run(text: &str) -> Report {
        validate(text, DEV_NAMESPACE).expect("fixture parses")
    }

    /// (object, rule) pairs, in order.
    fn pairs(report: &Report) -> Vec<(&str, &str)> {
        report
            .violations
            .iter()
            .map(|v| (v.object.as_str(), v.rule))
            .collect()
    }

    #[test]
    fn devenv_valid_manifest_passes() {
        let report = run(VALID);
        assert_eq!(report.violations, []);
        assert!(report.ok());
        assert_eq!(report.objects, 4);
    }

    #[test]
    fn devenv_flags_objects_outside_the_dev_namespace() {
        let report = run(WRONG_NAMESPACE);
        assert_eq!(
            pairs(&report),
            [
                ("Namespace/unidesk#0", RULE_NAMESPACE),
                ("ConfigMap/prod-config#1", RULE_NAMESPACE),
                ("Secret/no-namespace-secret#2", RULE_NAMESPACE),
                ("ClusterRole/dev-cluster-reader#3", RULE_NAMESPACE),
            ]
        );
        assert!(report.violations[1].detail.contains("\"unidesk\""));
        assert!(report.violations[2].detail.contains("missing"));
        // The same objects pass when the namespace asked for is theirs... except the ones
        // that are not in it at all.
        let prod = validate(WRONG_NAMESPACE, "unidesk").unwrap();
        assert_eq!(
            pairs(&prod),
            [
                ("Secret/no-namespace-secret#2", RULE_NAMESPACE),
                ("ClusterRole/dev-cluster-reader#3", RULE_NAMESPACE),
            ]
        );
    }

    #[test]
    fn devenv_flags_nodeport_and_loadbalancer_services() {
        let report = run(SERVICE_TYPE);
        assert_eq!(
            pairs(&report),
            [
                ("Service/frontend-dev#0", RULE_SERVICE_TYPE),
                ("Service/backend-core-dev-lb#1", RULE_SERVICE_TYPE),
            ]
        );
        assert!(report.violations[0].detail.contains("NodePort"));
        assert!(report.violations[1].detail.contains("LoadBalancer"));
    }

    #[test]
    fn devenv_flags_host_ports() {
        let report = run(HOST_PORT);
        assert_eq!(
            pairs(&report),
            [("DaemonSet/egress-proxy-dev#0", RULE_HOST_PORT)]
        );
        assert!(report.violations[0].detail.contains("[proxy]"));
        assert!(report.violations[0].detail.contains("3128"));
    }

    #[test]
    fn devenv_flags_host_network() {
        let report = run(HOST_NETWORK);
        assert_eq!(
            pairs(&report),
            [("CronJob/dev-cleanup#0", RULE_HOST_NETWORK)]
        );
        assert!(
            report.violations[0]
                .detail
                .starts_with("spec.jobTemplate.spec.template.spec")
        );
    }

    #[test]
    fn devenv_flags_production_database_urls() {
        let report = run(DATABASE_URL);
        assert_eq!(
            pairs(&report),
            [
                ("Job/unidesk-dev-db-migrate#0", RULE_DATABASE_URL),
                ("StatefulSet/code-queue-dev#1", RULE_DATABASE_URL),
                ("Pod/debug-dev#2", RULE_DATABASE_URL),
            ]
        );
        assert!(report.violations[0].detail.contains("\"postgres\""));
        assert!(report.violations[1].detail.contains("\"unidesk\""));
        assert!(report.violations[2].detail.contains(".unidesk.svc"));
    }

    #[test]
    fn devenv_database_url_classification() {
        let dev = "postgres://u:p@postgres-dev.unidesk-dev.svc.cluster.local:5432/unidesk_dev";
        assert_eq!(production_database_url(dev), None);
        assert_eq!(
            production_database_url("postgresql://postgres-dev/unidesk_dev?sslmode=disable"),
            None
        );
        for prod in [
            "postgres://u:p@postgres:5432/unidesk_dev",
            "postgres://postgres.unidesk-dev/unidesk_dev",
            "postgres://u:p@postgres-dev:5432/unidesk",
            "postgres://u:p@db.unidesk.svc.cluster.local/unidesk_dev",
            "postgres://u:p@postgres-dev:5432/",
        ] {
            assert!(production_database_url(prod).is_some(), "{prod}");
        }
    }

    #[test]
    fn devenv_config_map_database_url_is_checked() {
        let text = "kind: ConfigMap\nmetadata: {name: c, namespace: unidesk-dev}\n\
                    data: {DATABASE_URL: 'postgres://postgres:5432/unidesk'}\n";
        assert_eq!(pairs(&run(text)), [("ConfigMap/c#0", RULE_DATABASE_URL)]);
    }

    #[test]
    fn devenv_malformed_yaml_names_the_document() {
        let err = validate(MALFORMED, DEV_NAMESPACE).unwrap_err();
        let DevEnvError::Malformed { document, .. } = &err;
        assert_eq!(*document, 1);
        assert!(err.to_string().starts_with("document 1: malformed YAML"));
    }

    #[test]
    fn devenv_non_objects_and_lists() {
        let text = "---\n---\n- a\n---\nkind: List\nitems:\n  - kind: Service\n    \
                    metadata: {name: s, namespace: unidesk-dev}\n    spec: {type: NodePort}\n";
        let report = run(text);
        assert_eq!(
            pairs(&report),
            [
                ("<no kind>/<no name>#1", RULE_OBJECT),
                ("Service/s#2", RULE_SERVICE_TYPE)
            ]
        );
        assert_eq!(report.objects, 2);
    }

    #[test]
    fn devenv_uses_the_executor_guard_rules() {
        let text = "kind: Service\nmetadata: {name: s, namespace: unidesk-dev}\n\
                    spec: {ports: [{port: 80, nodePort: 30080}]}\n---\n\
                    kind: Pod\nmetadata: {name: p, namespace: unidesk-dev}\n\
                    spec: {hostPID: true, hostIPC: true, containers: \
                    [{name: c, securityContext: {privileged: true}}]}\n";
        assert_eq!(
            pairs(&run(text)),
            [
                ("Service/s#0", RULE_SERVICE_TYPE),
                ("Pod/p#1", RULE_HOST_PID),
                ("Pod/p#1", RULE_HOST_IPC),
                ("Pod/p#1", RULE_PRIVILEGED),
            ]
        );
    }
}
