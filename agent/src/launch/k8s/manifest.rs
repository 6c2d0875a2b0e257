//! The service's Kubernetes objects, decided before anything reaches the API server (pure).
//!
//! - [`parse`] reads multi-document YAML into [`Object`]s (a `List` contributes its items);
//!   an error names the document index and the field path.
//! - [`narrow`] keeps the service's own objects (the listed Deployments, and anything
//!   labelled `unidesk.ai/service-id: <id>`) and refuses, before anything is applied, any
//!   kept object that breaks a [`guard`] rule or is not one of the [`ALLOWED_KINDS`].
//! - [`stamp`] replaces the `{{UNIDESK_IMAGE}}` / `{{UNIDESK_COMMIT}}` placeholders in every
//!   string scalar (after parsing, never in the YAML text), pins the listed containers to the
//!   built image with `imagePullPolicy: Never`, and stamps the `UNIDESK_DEPLOY_*` env and the
//!   `unidesk.ai/deploy-*` annotations on the Deployment and its pod template.
//! - [`guard`] is the one implementation of the placement and exposure rules (namespace,
//!   NodePort/LoadBalancer/nodePort, hostPort, hostNetwork/hostPID/hostIPC, privileged);
//!   `dev-env validate` in the controller uses it too.

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize as _;
use serde_json::{Map, Value};

/// The label that marks an object as belonging to a service.
pub const LABEL_SERVICE_ID: &str = "unidesk.ai/service-id";
/// Annotation: the full commit that was deployed.
pub const ANNOTATION_DEPLOY_COMMIT: &str = "unidesk.ai/deploy-commit";
/// Annotation: the commit as `deploy.json` asked for it.
pub const ANNOTATION_DEPLOY_REQUESTED_COMMIT: &str = "unidesk.ai/deploy-requested-commit";
/// Annotation: the source repository.
pub const ANNOTATION_DEPLOY_REPO: &str = "unidesk.ai/deploy-repo";
/// Annotation: the service id.
pub const ANNOTATION_SERVICE_ID: &str = "unidesk.ai/service-id";
/// Env: the service id.
pub const ENV_SERVICE_ID: &str = "UNIDESK_DEPLOY_SERVICE_ID";
/// Env: the source repository.
pub const ENV_REPO: &str = "UNIDESK_DEPLOY_REPO";
/// Env: the full commit that was deployed.
pub const ENV_COMMIT: &str = "UNIDESK_DEPLOY_COMMIT";
/// Env: the commit as `deploy.json` asked for it.
pub const ENV_REQUESTED_COMMIT: &str = "UNIDESK_DEPLOY_REQUESTED_COMMIT";
/// Placeholder for the built image, replaced in every string scalar.
pub const PLACEHOLDER_IMAGE: &str = "{{UNIDESK_IMAGE}}";
/// Placeholder for the full commit, replaced in every string scalar.
pub const PLACEHOLDER_COMMIT: &str = "{{UNIDESK_COMMIT}}";
/// Every placeholder starts like this; one left after stamping is an error.
const PLACEHOLDER_PREFIX: &str = "{{UNIDESK_";

/// Rule: objects only in the allowed namespace; no cluster-scoped kinds.
pub const RULE_NAMESPACE: &str = "namespace";
/// Rule: no Service of type NodePort or LoadBalancer, no `nodePort`.
pub const RULE_SERVICE_TYPE: &str = "service-type";
/// Rule: no `hostPort` in container ports.
pub const RULE_HOST_PORT: &str = "host-port";
/// Rule: no `hostNetwork: true`.
pub const RULE_HOST_NETWORK: &str = "host-network";
/// Rule: no `hostPID: true`.
pub const RULE_HOST_PID: &str = "host-pid";
/// Rule: no `hostIPC: true`.
pub const RULE_HOST_IPC: &str = "host-ipc";
/// Rule: no privileged containers.
pub const RULE_PRIVILEGED: &str = "privileged";
/// Rule: only the [`ALLOWED_KINDS`] are applied.
pub const RULE_KIND: &str = "kind";
/// Rule: an object appears once.
pub const RULE_DUPLICATE: &str = "duplicate";

/// The `(apiVersion, kind)` pairs the executor applies; each maps to a fixed API resource.
pub const ALLOWED_KINDS: &[(&str, &str)] = &[
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"),
];

/// Kinds that are not namespaced (besides `Namespace`, which [`guard`] handles on its own).
pub const CLUSTER_SCOPED: &[&str] = &[
    "APIService",
    "CSIDriver",
    "CSINode",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
];

/// One Kubernetes object of a manifest, with the index of the YAML document it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// 0-based document index in the YAML stream.
    pub document: usize,
    /// The object as JSON (a mapping with `apiVersion`, `kind` and `metadata.name`).
    pub value: Value,
}

impl Object {
    fn str_at(&self, path: &[&str]) -> Option<&str> {
        path.iter()
            .try_fold(&self.value, |v, key| v.get(key))
            .and_then(Value::as_str)
    }

    /// `apiVersion` (checked by [`parse`]).
    pub fn api_version(&self) -> &str {
        self.str_at(&["apiVersion"]).unwrap_or_default()
    }

    /// `kind` (checked by [`parse`]).
    pub fn kind(&self) -> &str {
        self.str_at(&["kind"]).unwrap_or_default()
    }

    /// `metadata.name` (checked by [`parse`]).
    pub fn name(&self) -> &str {
        self.str_at(&["metadata", "name"]).unwrap_or_default()
    }

    /// `metadata.namespace`, if set.
    pub fn namespace(&self) -> Option<&str> {
        self.str_at(&["metadata", "namespace"])
    }

    /// A label value of `metadata.labels`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.value
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(|l| l.get(key))
            .and_then(Value::as_str)
    }

    /// `Kind/name`, for messages.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }
}

/// One listed Deployment and the container that runs the built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentTarget {
    pub name: String,
    pub container: String,
}

/// What [`narrow`] keeps and where it may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Objects labelled `unidesk.ai/service-id: <service_id>` are kept.
    pub service_id: String,
    /// The one namespace config allows for this service and environment.
    pub namespace: String,
    /// The Deployments that run the built image (kept, and required).
    pub deployments: Vec<DeploymentTarget>,
}

/// The values [`stamp`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The built image reference, e.g. `unidesk-decision-center:d601`.
    pub image: String,
    pub service_id: String,
    pub repo: String,
    /// The full 40-hex commit that was built.
    pub commit: String,
    /// The commit as `deploy.json` asked for it (possibly short).
    pub requested_commit: String,
}

/// One object refused by [`narrow`]: which document and object, which rule, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub document: usize,
    /// `Kind/name`.
    pub object: String,
    /// One of the `RULE_*` names.
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "document {} {}: rule {}: {}",
            self.document, self.object, self.rule, self.detail
        )
    }
}

/// A broken [`guard`] rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// One of the `RULE_*` names.
    pub rule: &'static str,
    pub detail: String,
}

/// Why a manifest cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The YAML document does not parse.
    #[error("document {document}: malformed YAML: {message}")]
    Malformed { document: usize, message: String },
    /// A document is not a Kubernetes object: `path` names the field.
    #[error("document {document}: {path}: {reason}")]
    NotAnObject {
        document: usize,
        path: String,
        reason: String,
    },
    /// Objects that must not be applied; nothing was applied.
    #[error("manifest refused: {}", join(.0))]
    Refused(Vec<Refusal>),
    /// A listed Deployment is not in the manifest.
    #[error("Deployment {name} is not in the manifest (service {service_id})")]
    MissingDeployment { name: String, service_id: String },
    /// A listed Deployment has no container of the listed name.
    #[error(
        "document {document} Deployment/{deployment}: no container {container:?} in \
         spec.template.spec.containers (has {available:?})"
    )]
    MissingContainer {
        document: usize,
        deployment: String,
        container: String,
        available: Vec<String>,
    },
    /// A `{{UNIDESK_…}}` placeholder that [`stamp`] does not know.
    #[error("document {document} {object}: {path}: unknown placeholder in {value:?}")]
    UnknownPlaceholder {
        document: usize,
        object: String,
        path: String,
        value: String,
    },
    /// The stamp itself is unusable (e.g. a commit that is not a full SHA).
    #[error("invalid stamp: {0}")]
    InvalidStamp(String),
}

fn join(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads multi-document YAML. Empty documents are skipped; a `List` contributes its items
/// (with the list's document index). Every object must have string `apiVersion`, `kind` and
/// `metadata.name`.
pub fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut objects = Vec::new();
    for (document, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|e| ManifestError::Malformed {
            document,
            message: e.to_string(),
        })?;
        match value {
            Value::Null => {}
            Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                let Some(items) = map.get("items") else {
                    continue;
                };
                let Value::Array(items) = items else {
                    return Err(not_object(document, "items", "is not a sequence"));
                };
                for (i, item) in items.iter().enumerate() {
                    objects.push(check_object(
                        document,
                        &format!("items[{i}]."),
                        item.clone(),
                    )?);
                }
            }
            other => objects.push(check_object(document, "", other)?),
        }
    }
    Ok(objects)
}

fn not_object(document: usize, path: &str, reason: &str) -> ManifestError {
    ManifestError::NotAnObject {
        document,
        path: if path.is_empty() {
            "(document)".into()
        } else {
            path.into()
        },
        reason: reason.into(),
    }
}

fn check_object(document: usize, prefix: &str, value: Value) -> Result<Object, ManifestError> {
    if !value.is_object() {
        let path = prefix.trim_end_matches('.');
        return Err(not_object(
            document,
            path,
            "is not a mapping (a Kubernetes object)",
        ));
    }
    for path in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
        let field = path.iter().try_fold(&value, |v, k| v.get(k));
        let full = format!("{prefix}{}", path.join("."));
        match field {
            None => return Err(not_object(document, &full, "is missing")),
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => return Err(not_object(document, &full, "must be a non-empty string")),
        }
    }
    match value.get("metadata").and_then(|m| m.get("namespace")) {
        None | Some(Value::String(_)) => {}
        Some(_) => {
            let full = format!("{prefix}metadata.namespace");
            return Err(not_object(document, &full, "must be a string"));
        }
    }
    Ok(Object { document, value })
}

/// The pod spec of a workload kind and its path, if the kind has one.
pub fn pod_spec<'a>(kind: &str, object: &'a Value) -> Option<(&'static str, &'a Value)> {
    let spec = object.get("spec")?;
    match kind {
        "Pod" => Some(("spec", spec)),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(("spec.template.spec", spec.get("template")?.get("spec")?))
        }
        "CronJob" => Some((
            "spec.jobTemplate.spec.template.spec",
            spec.get("jobTemplate")?
                .get("spec")?
                .get("template")?
                .get("spec")?,
        )),
        _ => None,
    }
}

/// The container lists of a pod spec, in the order they are checked.
pub const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];

/// Every container of a pod spec, in [`CONTAINER_LISTS`] order, with its list and its name
/// (`<no name>` when it has none).
pub fn containers(pod: &Value) -> impl Iterator<Item = (&'static str, &str, &Value)> {
    CONTAINER_LISTS.into_iter().flat_map(move |list| {
        let items = pod.get(list).and_then(Value::as_array);
        items.into_iter().flatten().map(move |container| {
            let name = container
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("<no name>");
            (list, name, container)
        })
    })
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The placement and exposure rules every applied or validated object must keep, for one
/// object (a JSON mapping) against the one allowed `namespace`:
///
/// - [`RULE_NAMESPACE`]: a namespaced object sits in `namespace` (a missing
///   `metadata.namespace` is a violation; [`narrow`] fills it in first); a `Namespace`
///   object may only be `namespace` itself; other cluster-scoped kinds are violations.
/// - [`RULE_SERVICE_TYPE`]: no Service of type NodePort or LoadBalancer, and no `nodePort`.
/// - [`RULE_HOST_PORT`], [`RULE_HOST_NETWORK`], [`RULE_HOST_PID`], [`RULE_HOST_IPC`],
///   [`RULE_PRIVILEGED`]: in any pod spec (Pod, Deployment, StatefulSet, DaemonSet,
///   ReplicaSet, Job, CronJob).
pub fn guard(object: &Value, namespace: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut flag = |rule: &'static str, detail: String| out.push(Violation { rule, detail });
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");

    // Namespace placement.
    let object_ns = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    if kind == "Namespace" {
        if name != namespace {
            flag(
                RULE_NAMESPACE,
                format!("Namespace {name:?} is not the allowed namespace {namespace:?}"),
            );
        }
    } else if CLUSTER_SCOPED.contains(&kind) {
        flag(
            RULE_NAMESPACE,
            format!("cluster-scoped kind {kind} is outside the namespace {namespace:?}"),
        );
    } else {
        match object_ns {
            Some(ns) if ns == namespace => {}
            Some(ns) => flag(
                RULE_NAMESPACE,
                format!("metadata.namespace is {ns:?}, not the allowed namespace {namespace:?}"),
            ),
            None => flag(
                RULE_NAMESPACE,
                format!("metadata.namespace is missing; it must be {namespace:?}"),
            ),
        }
    }

    // Service exposure.
    if kind == "Service" {
        let spec = object.get("spec");
        let service_type = spec.and_then(|s| s.get("type")).and_then(Value::as_str);
        if let Some(t @ ("NodePort" | "LoadBalancer")) = service_type {
            flag(
                RULE_SERVICE_TYPE,
                format!("spec.type is {t}; services must be ClusterIP"),
            );
        } else {
            let ports = spec.and_then(|s| s.get("ports")).and_then(Value::as_array);
            for (i, port) in ports.into_iter().flatten().enumerate() {
                if let Some(node_port) = port.get("nodePort") {
                    flag(
                        RULE_SERVICE_TYPE,
                        format!(
                            "spec.ports[{i}] declares nodePort {}",
                            scalar_text(node_port)
                        ),
                    );
                }
            }
        }
    }

    // Pod specs.
    let Some((path, pod)) = pod_spec(kind, object) else {
        return out;
    };
    for (field, rule) in [
        ("hostNetwork", RULE_HOST_NETWORK),
        ("hostPID", RULE_HOST_PID),
        ("hostIPC", RULE_HOST_IPC),
    ] {
        if pod.get(field).and_then(Value::as_bool) == Some(true) {
            flag(rule, format!("{path}.{field} is true"));
        }
    }
    for (list, cname, container) in containers(pod) {
        let ports = container.get("ports").and_then(Value::as_array);
        for port in ports.into_iter().flatten() {
            if let Some(host_port) = port.get("hostPort") {
                flag(
                    RULE_HOST_PORT,
                    format!(
                        "{path}.{list}[{cname}] declares hostPort {}",
                        scalar_text(host_port)
                    ),
                );
            }
        }
        let privileged = container
            .get("securityContext")
            .and_then(|s| s.get("privileged"))
            .and_then(Value::as_bool);
        if privileged == Some(true) {
            flag(
                RULE_PRIVILEGED,
                format!("{path}.{list}[{cname}].securityContext.privileged is true"),
            );
        }
    }
    out
}

fn is_target(object: &Object, selection: &Selection) -> bool {
    object.kind() == "Deployment"
        && selection
            .deployments
            .iter()
            .any(|d| d.name == object.name())
}

fn containers_of(object: &Object) -> Vec<String> {
    object
        .value
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Keeps the service's objects: the listed Deployments and every object labelled
/// `unidesk.ai/service-id: <service_id>`. An object without a namespace gets the allowed
/// one. Refuses (all at once, naming document, object and rule) every kept object that is
/// not an allowed kind, appears twice, or breaks a [`guard`] rule; then requires each listed
/// Deployment with its listed container.
pub fn narrow(objects: Vec<Object>, selection: &Selection) -> Result<Vec<Object>, ManifestError> {
    let mut kept: Vec<Object> = objects
        .into_iter()
        .filter(|o| {
            is_target(o, selection) || o.label(LABEL_SERVICE_ID) == Some(&selection.service_id)
        })
        .collect();
    let mut refusals = Vec::new();
    let mut seen = BTreeSet::new();
    for object in &mut kept {
        let kind = object.kind().to_owned();
        if object.namespace().is_none()
            && !CLUSTER_SCOPED.contains(&kind.as_str())
            && kind != "Namespace"
            && let Some(Value::Object(meta)) = object.value.get_mut("metadata")
        {
            meta.insert(
                "namespace".into(),
                Value::String(selection.namespace.clone()),
            );
        }
    }
    for object in &kept {
        let (api_version, kind) = (object.api_version(), object.kind());
        let mut refuse = |rule, detail: String| {
            refusals.push(Refusal {
                document: object.document,
                object: object.reference(),
                rule,
                detail,
            });
        };
        if !ALLOWED_KINDS.contains(&(api_version, kind)) {
            let allowed = ALLOWED_KINDS
                .iter()
                .map(|(v, k)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ");
            refuse(
                RULE_KIND,
                format!("{api_version} {kind} is not applied by the executor (allowed: {allowed})"),
            );
        }
        if !seen.insert((kind, object.namespace(), object.name())) {
            refuse(RULE_DUPLICATE, "the object appears more than once".into());
        }
        for v in guard(&object.value, &selection.namespace) {
            refuse(v.rule, v.detail);
        }
    }
    if !refusals.is_empty() {
        return Err(ManifestError::Refused(refusals));
    }
    for target in &selection.deployments {
        let Some(deployment) = kept
            .iter()
            .find(|o| o.kind() == "Deployment" && o.name() == target.name)
        else {
            return Err(ManifestError::MissingDeployment {
                name: target.name.clone(),
                service_id: selection.service_id.clone(),
            });
        };
        let available = containers_of(deployment);
        if !available.contains(&target.container) {
            return Err(ManifestError::MissingContainer {
                document: deployment.document,
                deployment: target.name.clone(),
                container: target.container.clone(),
                available,
            });
        }
    }
    Ok(kept)
}

fn is_full_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Replaces the placeholders in every string scalar below `value`; returns the path of the
/// first string that still holds an unknown `{{UNIDESK_…}}` placeholder.
fn replace_placeholders(
    value: &mut Value,
    stamp: &Stamp,
    path: &mut String,
) -> Option<(String, String)> {
    match value {
        Value::String(s) => {
            if s.contains(PLACEHOLDER_PREFIX) {
                *s = s
                    .replace(PLACEHOLDER_IMAGE, &stamp.image)
                    .replace(PLACEHOLDER_COMMIT, &stamp.commit);
                // The stamp values themselves are checked free of placeholders.
                if s.contains(PLACEHOLDER_PREFIX) {
                    return Some((path.clone(), s.clone()));
                }
            }
            None
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = replace_placeholders(item, stamp, path);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                let found = replace_placeholders(item, stamp, path);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        _ => None,
    }
}

fn map_at<'a>(value: &'a mut Value, path: &[&str]) -> Option<&'a mut Map<String, Value>> {
    let mut here = value;
    for key in path {
        let map = here.as_object_mut()?;
        here = map
            .entry((*key).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if here.is_null() {
            *here = Value::Object(Map::new());
        }
    }
    here.as_object_mut()
}

/// Stamps the narrowed objects: placeholders replaced everywhere; each target Deployment's
/// listed container runs `stamp.image` with `imagePullPolicy: Never` and the
/// `UNIDESK_DEPLOY_*` env (replacing entries of the same name); the `unidesk.ai/deploy-*`
/// and service-id annotations on the Deployment and its pod template (so a new commit rolls
/// the pods).
pub fn stamp(
    mut objects: Vec<Object>,
    targets: &[DeploymentTarget],
    stamp: &Stamp,
) -> Result<Vec<Object>, ManifestError> {
    if !is_full_sha(&stamp.commit) {
        return Err(ManifestError::InvalidStamp(format!(
            "commit {:?} is not a full 40-hex SHA",
            stamp.commit
        )));
    }
    for (what, v) in [
        ("image", &stamp.image),
        ("service id", &stamp.service_id),
        ("repo", &stamp.repo),
        ("requested commit", &stamp.requested_commit),
    ] {
        if v.is_empty() || v.contains(PLACEHOLDER_PREFIX) {
            return Err(ManifestError::InvalidStamp(format!(
                "{what} {v:?} is empty or a placeholder"
            )));
        }
    }
    for object in &mut objects {
        let mut path = String::new();
        if let Some((path, value)) = replace_placeholders(&mut object.value, stamp, &mut path) {
            return Err(ManifestError::UnknownPlaceholder {
                document: object.document,
                object: object.reference(),
                path,
                value,
            });
        }
    }
    let annotations = [
        (ANNOTATION_DEPLOY_COMMIT, &stamp.commit),
        (ANNOTATION_DEPLOY_REQUESTED_COMMIT, &stamp.requested_commit),
        (ANNOTATION_DEPLOY_REPO, &stamp.repo),
        (ANNOTATION_SERVICE_ID, &stamp.service_id),
    ];
    let env = [
        (ENV_SERVICE_ID, &stamp.service_id),
        (ENV_REPO, &stamp.repo),
        (ENV_COMMIT, &stamp.commit),
        (ENV_REQUESTED_COMMIT, &stamp.requested_commit),
    ];
    for target in targets {
        let Some(object) = objects
            .iter_mut()
            .find(|o| o.kind() == "Deployment" && o.name() == target.name)
        else {
            return Err(ManifestError::MissingDeployment {
                name: target.name.clone(),
                service_id: stamp.service_id.clone(),
            });
        };
        let document = object.document;
        let available = containers_of(object);
        for path in [
            &["metadata", "annotations"][..],
            &["spec", "template", "metadata", "annotations"],
        ] {
            let map =
                map_at(&mut object.value, path).ok_or_else(|| ManifestError::NotAnObject {
                    document,
                    path: path.join("."),
                    reason: "is not a mapping".into(),
                })?;
            for (key, value) in annotations {
                map.insert(key.into(), Value::String(value.clone()));
            }
        }
        let container = object
            .value
            .pointer_mut("/spec/template/spec/containers")
            .and_then(Value::as_array_mut)
            .and_then(|cs| {
                cs.iter_mut()
                    .find(|c| c.get("name").and_then(Value::as_str) == Some(&target.container))
            })
            .and_then(Value::as_object_mut);
        let Some(container) = container else {
            return Err(ManifestError::MissingContainer {
                document,
                deployment: target.name.clone(),
                container: target.container.clone(),
                available,
            });
        };
        container.insert("image".into(), Value::String(stamp.image.clone()));
        container.insert("imagePullPolicy".into(), Value::String("Never".into()));
        let list = container
            .entry("env")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !list.is_array() {
            *list = Value::Array(Vec::new());
        }
        if let Value::Array(list) = list {
            list.retain(|e| {
                let name = e.get("name").and_then(Value::as_str);
                !env.iter().any(|(n, _)| Some(*n) == name)
            });
            for (name, value) in env {
                list.push(serde_json::json!({ "name": name, "value": value }));
            }
        }
    }
    Ok(objects)
}

/// Every container and init container image the objects' pod specs reference.
pub fn referenced_images(objects: &[Object]) -> BTreeSet<String> {
    let mut images = BTreeSet::new();
    for object in objects {
        let Some((_, pod)) = pod_spec(object.kind(), &object.value) else {
            continue;
        };
        for (_, _, c) in containers(pod) {
            if let Some(image) = c.get("image").and_then(Value::as_str) {
                images.insert(image.to_owned());
            }
        }
    }
    images
}

#[cfg(test)]
mod tests;
