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
//! - [`RULE_SERVICE_URL`]: no other `*_URL` value (`CORE_INTERNAL_URL`, …) that points at
//!   the production namespace, the production database or the production egress gateway.
//! - [`RULE_ALLOWED_OBJECT`]: with an allowed-object list (a foundation manifest's, from
//!   config), every object is on it.
//! - [`RULE_OBJECT`]: a document that is not a Kubernetes object (no `kind` or name).
//!
//! Host networking is allowed to the objects config lists by name
//! ([`Policy::host_network_allowed`]).
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
/// The production namespace, as the last label of a short service host (`backend-core.unidesk`).
const PROD_NAMESPACE: &str = "unidesk";
/// The production TCP egress gateway (the seed: dev must not use it).
const PROD_EGRESS_GATEWAY: &str = "d601-tcp-egress-gateway";

/// Rule: no production-looking `DATABASE_URL`.
pub const RULE_DATABASE_URL: &str = "database-url";
/// Rule: every document is a Kubernetes object with a kind and a name.
pub const RULE_OBJECT: &str = "object";
/// Rule: no service URL pointing at production.
pub const RULE_SERVICE_URL: &str = "service-url";
/// Rule: only the objects a foundation manifest is allowed to create.
pub const RULE_ALLOWED_OBJECT: &str = "allowed-object";

/// What a manifest is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The namespace every namespaced object must sit in.
    pub namespace: &'a str,
    /// `Kind/name` of the objects allowed host networking.
    pub host_network_allowed: &'a [String],
    /// When set, the only `Kind/name` objects the manifest may hold.
    pub allowed_objects: Option<&'a [String]>,
}

impl<'a> Policy<'a> {
    /// The rules for `namespace` alone: no host networking for anyone, any object.
    pub fn namespace(namespace: &'a str) -> Policy<'a> {
        Policy {
            namespace,
            host_network_allowed: &[],
            allowed_objects: None,
        }
    }
}

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
    /// The YAML document the object is in (0-based, in stream order).
    pub document: usize,
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
pub fn validate(yaml_text: &str, policy: &Policy<'_>) -> Result<Report, DevEnvError> {
    let mut report = Report {
        namespace: policy.namespace.to_owned(),
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
                    check_object(item, index, policy, &mut report);
                }
            }
            other => check_object(&other, index, policy, &mut report),
        }
    }
    Ok(report)
}

fn kind_of(value: &Value) -> Option<&str> {
    value.get("kind").and_then(Value::as_str)
}

fn check_object(object: &Value, index: usize, policy: &Policy<'_>, report: &mut Report) {
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
            document: index,
            object: label.clone(),
            rule,
            detail,
        });
    };
    let (Some(kind), Some(name)) = (kind, name) else {
        flag(
            RULE_OBJECT,
            "not a Kubernetes object: kind and metadata.name are required".into(),
        );
        return;
    };
    let reference = format!("{kind}/{name}");
    if let Some(allowed) = policy.allowed_objects
        && !allowed.contains(&reference)
    {
        flag(
            RULE_ALLOWED_OBJECT,
            format!(
                "{reference} is not one of the objects this manifest may create ({})",
                allowed.join(", ")
            ),
        );
    }

    // Placement and exposure: the shared guard; host networking where config allows it.
    let host_network_ok = policy.host_network_allowed.contains(&reference);
    for violation in manifest::guard(object, policy.namespace) {
        if violation.rule == RULE_HOST_NETWORK && host_network_ok {
            continue;
        }
        flag(violation.rule, violation.detail);
    }

    // DATABASE_URL kept in a ConfigMap or Secret.
    if matches!(kind, "ConfigMap" | "Secret") {
        for section in ["data", "stringData"] {
            // Secret `data` is base64; only literal text is checked.
            if kind == "Secret" && section == "data" {
                continue;
            }
            let entries = object.get(section).and_then(Value::as_object);
            for (key, value) in entries.into_iter().flatten() {
                if let Some((rule, reason)) = value.as_str().and_then(|v| production_url(key, v)) {
                    flag(rule, format!("{section}.{key} {reason}"));
                }
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
            let Some(key) = var.get("name").and_then(Value::as_str) else {
                continue;
            };
            let value = var.get("value").and_then(Value::as_str);
            if let Some((rule, reason)) = value.and_then(|v| production_url(key, v)) {
                flag(rule, format!("{path}.{list}[{cname}] env {key} {reason}"));
            }
        }
    }
}

/// The rule a literal `key: value` breaks, and why: `DATABASE_URL` must name the dev
/// database on a dev host; any other `*_URL` must not point at the production namespace,
/// the production database or the production egress gateway.
fn production_url(key: &str, value: &str) -> Option<(&'static str, String)> {
    if key == "DATABASE_URL" {
        return production_database_url(value).map(|why| (RULE_DATABASE_URL, why));
    }
    if !key.ends_with("_URL") {
        return None;
    }
    production_service_url(value).map(|why| (RULE_SERVICE_URL, why))
}

/// Why a service URL points at production, or `None`.
fn production_service_url(url: &str) -> Option<String> {
    if url.contains(PROD_SERVICE_DOMAIN) {
        return Some(format!(
            "names the production namespace ({PROD_SERVICE_DOMAIN})"
        ));
    }
    if url.contains(PROD_EGRESS_GATEWAY) {
        return Some(format!(
            "names the production egress gateway {PROD_EGRESS_GATEWAY}"
        ));
    }
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host_port.split(':').next().unwrap_or("");
    if host.rsplit('.').next() == Some(PROD_NAMESPACE) && host.contains('.') {
        return Some(format!(
            "names host {host:?} in the production namespace {PROD_NAMESPACE:?}"
        ));
    }
    if scheme.starts_with("postgres") {
        return production_database_url(url);
    }
    None
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
        validate(text, &Policy::namespace(DEV_NAMESPACE)).expect("fixture parses")
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
        let prod = validate(WRONG_NAMESPACE, &Policy::namespace("unidesk")).unwrap();
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
        let err = validate(MALFORMED, &Policy::namespace(DEV_NAMESPACE)).unwrap_err();
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

    const FOUNDATION: &str = include_str!("../../tests-fixtures/devenv/foundation.k8s.yaml");

    /// The project's own config.json's dev environment.
    fn project_dev() -> crate::desired::catalog::EnvironmentConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.json");
        let catalog = crate::desired::catalog::load(&path).unwrap().catalog;
        catalog
            .environment(crate::desired::Environment::Dev)
            .unwrap()
            .clone()
    }

    #[test]
    fn devenv_foundation_passes_with_the_projects_allowed_objects_and_flags_any_other() {
        let dev = project_dev();
        let foundation = dev
            .foundation
            .as_ref()
            .expect("config.json names the foundation");
        assert!(
            foundation
                .manifest
                .ends_with("unidesk-dev-foundation.k8s.yaml")
        );
        let policy = Policy {
            namespace: &dev.namespace,
            host_network_allowed: &dev.host_network_allowed,
            allowed_objects: Some(&foundation.allowed_objects),
        };
        let report = validate(FOUNDATION, &policy).unwrap();
        assert_eq!(report.violations, [], "the seed's foundation passes");
        assert_eq!(report.objects, foundation.allowed_objects.len());

        // A Deployment in the right namespace is still not the foundation's to create.
        let more = format!(
            "{FOUNDATION}---\nkind: Deployment\nmetadata: {{name: backend-core-dev, namespace: \
             unidesk-dev}}\nspec: {{template: {{spec: {{containers: [{{name: c}}]}}}}}}\n"
        );
        let report = validate(&more, &policy).unwrap();
        assert_eq!(
            pairs(&report),
            [("Deployment/backend-core-dev#9", RULE_ALLOWED_OBJECT)]
        );
        assert_eq!(report.violations[0].document, 9);
        assert!(
            report.violations[0]
                .detail
                .contains("Deployment/backend-core-dev is not one of the objects"),
            "{}",
            report.violations[0].detail
        );
        // Without the list (an explicit --manifest) any object in the namespace passes.
        assert!(
            validate(&more, &Policy::namespace(DEV_NAMESPACE))
                .unwrap()
                .ok()
        );
    }

    #[test]
    fn devenv_host_network_only_for_objects_config_allows() {
        let allowed = vec!["CronJob/dev-cleanup".to_string()];
        let policy = Policy {
            namespace: DEV_NAMESPACE,
            host_network_allowed: &allowed,
            allowed_objects: None,
        };
        assert!(validate(HOST_NETWORK, &policy).unwrap().ok());
        let other = vec!["CronJob/another".to_string()];
        let policy = Policy {
            host_network_allowed: &other,
            ..policy
        };
        assert_eq!(
            pairs(&validate(HOST_NETWORK, &policy).unwrap()),
            [("CronJob/dev-cleanup#0", RULE_HOST_NETWORK)]
        );
    }

    #[test]
    fn devenv_service_urls_pointing_at_production_are_flagged() {
        for (value, why) in [
            (
                "http://backend-core.unidesk.svc.cluster.local:8080",
                ".unidesk.svc",
            ),
            (
                "http://backend-core.unidesk:8080",
                "production namespace \"unidesk\"",
            ),
            (
                "http://d601-tcp-egress-gateway.unidesk-dev:3128",
                "egress gateway",
            ),
            ("postgres://u@postgres:5432/unidesk", "\"postgres\""),
        ] {
            let text = format!(
                "kind: Deployment\nmetadata: {{name: frontend-dev, namespace: unidesk-dev}}\n\
                 spec: {{template: {{spec: {{containers: [{{name: web, env: \
                 [{{name: CORE_INTERNAL_URL, value: '{value}'}}]}}]}}}}}}\n"
            );
            let report = run(&text);
            assert_eq!(
                pairs(&report),
                [("Deployment/frontend-dev#0", RULE_SERVICE_URL)],
                "{value}"
            );
            let detail = &report.violations[0].detail;
            assert!(detail.contains("env CORE_INTERNAL_URL"), "{detail}");
            assert!(detail.contains(why), "{value}: {detail}");
        }
        for fine in [
            "http://backend-core-dev.unidesk-dev.svc.cluster.local:8080",
            "http://backend-core-dev:8080",
            "https://github.com/unidesk",
        ] {
            assert_eq!(production_service_url(fine), None, "{fine}");
        }
        // In a ConfigMap too; names other than *_URL are not URLs to judge.
        let text = "kind: ConfigMap\nmetadata: {name: c, namespace: unidesk-dev}\n\
                    data: {PROVIDER_URL: 'http://provider-ingress.unidesk:8081', \
                    NOTE: 'see http://backend-core.unidesk:8080'}\n";
        let report = run(text);
        assert_eq!(pairs(&report), [("ConfigMap/c#0", RULE_SERVICE_URL)]);
        assert!(
            report.violations[0]
                .detail
                .starts_with("data.PROVIDER_URL ")
        );
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
