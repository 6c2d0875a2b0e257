//! KubeApiDouble: the one test double of this project, a thin stand-in for the Kubernetes API
//! server (no API server can be installed on the test machines; TESTBED.md "Kubernetes").
//!
//! It serves HTTPS on 127.0.0.1 with a certificate from a CA it generates, and writes a
//! kubeconfig (`certificate-authority-data`, a bearer token) pointing at itself, so the agent
//! reaches it exactly as it reaches k3s. What it does, and nothing more:
//!
//! - `GET /version`;
//! - server-side apply (`PATCH`, `application/apply-patch+yaml`, `fieldManager` required),
//!   honouring `dryRun=All` by not storing, bumping `metadata.generation` when `spec`
//!   changes, refusing (422) a Deployment without selector/containers/images like the real
//!   schema validation would;
//! - `GET` and `LIST` (with `labelSelector` equality terms) of stored objects; Namespace
//!   create, server-side apply and delete (which drops the namespace's objects);
//! - the service proxy `GET /api/v1/namespaces/{ns}/services/{svc}:{port}/proxy/{path}`,
//!   forwarded to a backend URL the test registers (a real local HTTP server).
//!
//! Rollouts are a test-chosen [`Scenario`] per Deployment: on reads the double synthesizes
//! the Deployment status, its ReplicaSets and Pods the way the Deployment controller and
//! kubelet would report that situation. Every request is recorded ([`Recorded`]) so tests
//! can assert order and absence. Judgement stays in the agent's pure functions.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The bearer token the double's kubeconfig carries and the double requires.
pub const TOKEN: &str = "kube-api-double-token";

/// How a Deployment's rollout behaves in the double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Progressing on the first read after an apply, complete from the second.
    Completes,
    /// The new pod's container waits in `ImagePullBackOff`.
    ImagePullBackOff,
    /// The new pod's container waits in `ErrImageNeverPull` (image not imported).
    ErrImageNeverPull,
    /// The new pod's container crash-loops after restarts.
    CrashLoopBackOff,
    /// The new pod cannot be scheduled (insufficient memory).
    Unschedulable,
    /// The new ReplicaSet cannot create pods (namespace quota exceeded).
    FailedCreateQuota,
    /// New replicas are available but an old ReplicaSet's pod keeps serving.
    OldPodsStillServing,
    /// The Deployment controller never observes the applied generation.
    NeverObserved,
}

/// One request as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// `dryRun=All` was given.
    pub dry_run: bool,
    pub field_manager: Option<String>,
    pub content_type: Option<String>,
}

type Key = (String, String, String, String); // (group/version, resource, namespace, name)

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    scenarios: HashMap<(String, String), Scenario>,
    /// Reads of each Deployment since its spec last changed.
    polls: HashMap<(String, String), u32>,
    backends: HashMap<(String, String, u16), String>,
    requests: Vec<Recorded>,
    next_uid: u64,
    resource_version: u64,
}

/// The running double; stops when dropped.
pub struct KubeApiDouble {
    pub addr: SocketAddr,
    /// The kubeconfig file that points at the double.
    pub kubeconfig: PathBuf,
    /// sha256 (hex) of the double's CA certificate DER.
    pub ca_fingerprint: String,
    /// The CA certificate (PEM), for tests that write their own kubeconfig.
    pub ca_pem: String,
    state: Arc<Mutex<State>>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Drop for KubeApiDouble {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Standard base64 (the kubeconfig's `*-data` fields).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_params(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn plural(kind: &str) -> String {
    format!("{}s", kind.to_ascii_lowercase())
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn labels_match(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .unwrap_or((term, ""));
        object
            .pointer("/metadata/labels")
            .and_then(|l| l.get(k.trim()))
            .and_then(Value::as_str)
            == Some(v.trim())
    })
}

impl KubeApiDouble {
    /// Starts the double on a free loopback port, on a runtime of its own.
    pub fn start() -> KubeApiDouble {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = unidesk_controller::pki::generate(&["127.0.0.1".to_string()]).expect("pki");
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert, &pki.server_cert_pem).expect("write cert");
        std::fs::write(&key, &pki.server_key_pem).expect("write key");
        let tls = unidesk_controller::pki::server_config(&cert, &key).expect("tls config");
        let ca_der = CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).expect("CA PEM");
        let ca_fingerprint = hex::encode(Sha256::digest(ca_der.as_ref()));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        // Bound here (no `block_on`: the caller may itself be inside a runtime).
        let std_listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let serve_state = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = serve_state.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        let kubeconfig = dir.path().join("kubeconfig.yaml");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: double\n\
                 clusters:\n- name: double\n  cluster:\n    server: https://{addr}\n    \
                 certificate-authority-data: {}\n\
                 contexts:\n- name: double\n  context: {{cluster: double, user: double, namespace: default}}\n\
                 users:\n- name: double\n  user: {{token: {TOKEN}}}\n",
                base64(pki.ca_cert_pem.as_bytes())
            ),
        )
        .expect("write kubeconfig");
        KubeApiDouble {
            addr,
            kubeconfig,
            ca_fingerprint,
            ca_pem: pki.ca_cert_pem,
            state,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    /// The API server URL the kubeconfig names.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Chooses how the rollout of Deployment `namespace/name` behaves (default: Completes).
    pub fn set_scenario(&self, namespace: &str, name: &str, scenario: Scenario) {
        lock(&self.state)
            .scenarios
            .insert((namespace.into(), name.into()), scenario);
    }

    /// Routes the service proxy of `namespace/service:port` to `base_url` (`http://host:port`).
    pub fn register_backend(&self, namespace: &str, service: &str, port: u16, base_url: &str) {
        lock(&self.state).backends.insert(
            (namespace.into(), service.into(), port),
            base_url.trim_end_matches('/').into(),
        );
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// A stored object (`group_version` like `apps/v1` or `v1`, `resource` plural).
    pub fn object(
        &self,
        group_version: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        lock(&self.state)
            .objects
            .get(&(
                group_version.into(),
                resource.into(),
                namespace.into(),
                name.into(),
            ))
            .cloned()
    }

    /// Stores an object as if it had been applied earlier (by `manager`).
    pub fn put_object(&self, mut object: Value, manager: &str) {
        let gv = object["apiVersion"]
            .as_str()
            .expect("apiVersion")
            .to_owned();
        let resource = plural(object["kind"].as_str().expect("kind"));
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let mut state = lock(&self.state);
        state.next_uid += 1;
        state.resource_version += 1;
        let meta = &mut object["metadata"];
        meta["uid"] = json!(format!("uid-{}", state.next_uid));
        meta["resourceVersion"] = json!(state.resource_version.to_string());
        meta["generation"] = json!(1);
        meta["managedFields"] =
            json!([{"manager": manager, "operation": "Apply", "apiVersion": gv}]);
        state.objects.insert((gv, resource, ns, name), object);
    }
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let params = query_params(&query);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    lock(state).requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        dry_run: params.get("dryRun").map(String::as_str) == Some("All"),
        field_manager: params.get("fieldManager").cloned(),
        content_type: content_type.clone(),
    });
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (code, body, json_type) = if !authorized {
        let (c, v) = status(401, "Unauthorized", "Unauthorized");
        (c, v.to_string().into_bytes(), true)
    } else {
        match route(
            state,
            &method,
            &path,
            &params,
            content_type.as_deref(),
            &body,
        )
        .await
        {
            Routed::Json(code, value) => (code, value.to_string().into_bytes(), true),
            Routed::Raw(code, bytes) => (code, bytes, false),
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if json_type {
        response.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    response
}

enum Routed {
    Json(u16, Value),
    Raw(u16, Vec<u8>),
}

impl From<(u16, Value)> for Routed {
    fn from((code, value): (u16, Value)) -> Self {
        Routed::Json(code, value)
    }
}

async fn route(
    state: &Mutex<State>,
    method: &str,
    path: &str,
    params: &HashMap<String, String>,
    content_type: Option<&str>,
    body: &[u8],
) -> Routed {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (gv, rest): (String, &[&str]) = match segments.as_slice() {
        ["version"] if method == "GET" => {
            return Routed::Json(
                200,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0+kube-api-double",
                       "gitCommit": "0000000000000000000000000000000000000000",
                       "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                       "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        ["api", "v1", rest @ ..] => ("v1".into(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => {
            return status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            )
            .into();
        }
    };
    match (method, rest) {
        ("POST", ["namespaces"]) if gv == "v1" => create_namespace(state, body).into(),
        ("DELETE", ["namespaces", name]) if gv == "v1" => delete_namespace(state, name).into(),
        ("GET", ["namespaces", name]) if gv == "v1" => {
            get(state, "v1", "namespaces", "", name).into()
        }
        // Server-side apply of a Namespace (cluster-scoped), e.g. a dev manifest's dry run.
        ("PATCH", ["namespaces", name]) if gv == "v1" => apply(
            state,
            "v1",
            "namespaces",
            "",
            name,
            params,
            content_type,
            body,
        )
        .into(),
        ("GET", ["namespaces", ns, "services", target, "proxy", tail @ ..]) if gv == "v1" => {
            proxy(state, ns, target, &tail.join("/")).await
        }
        ("GET", ["namespaces", ns, resource]) => list(
            state,
            &gv,
            resource,
            ns,
            params.get("labelSelector").map_or("", String::as_str),
        )
        .into(),
        ("GET", ["namespaces", ns, resource, name]) => get(state, &gv, resource, ns, name).into(),
        ("PATCH", ["namespaces", ns, resource, name]) => {
            apply(state, &gv, resource, ns, name, params, content_type, body).into()
        }
        _ => status(
            405,
            "MethodNotAllowed",
            &format!("{method} {path} is not served by the double"),
        )
        .into(),
    }
}

fn create_namespace(state: &Mutex<State>, body: &[u8]) -> (u16, Value) {
    let Ok(mut ns) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    let Some(name) = ns
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    let mut s = lock(state);
    let key = (
        "v1".into(),
        "namespaces".into(),
        String::new(),
        name.clone(),
    );
    if s.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("namespaces \"{name}\" already exists"),
        );
    }
    s.next_uid += 1;
    ns["metadata"]["uid"] = json!(format!("uid-{}", s.next_uid));
    ns["status"] = json!({"phase": "Active"});
    s.objects.insert(key, ns.clone());
    (201, ns)
}

fn delete_namespace(state: &Mutex<State>, name: &str) -> (u16, Value) {
    let mut s = lock(state);
    let existed = s
        .objects
        .remove(&("v1".into(), "namespaces".into(), String::new(), name.into()))
        .is_some();
    let before = s.objects.len();
    s.objects.retain(|(_, _, ns, _), _| ns != name);
    if !existed && before == s.objects.len() {
        return status(404, "NotFound", &format!("namespaces \"{name}\" not found"));
    }
    (
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
               "details": {"name": name, "kind": "namespaces"}}),
    )
}

fn get(state: &Mutex<State>, gv: &str, resource: &str, ns: &str, name: &str) -> (u16, Value) {
    let mut s = lock(state);
    let key = (
        gv.to_owned(),
        resource.to_owned(),
        ns.to_owned(),
        name.to_owned(),
    );
    let Some(object) = s.objects.get(&key).cloned() else {
        return status(404, "NotFound", &format!("{resource} \"{name}\" not found"));
    };
    if resource == "deployments" {
        let counter = s.polls.entry((ns.into(), name.into())).or_insert(0);
        *counter += 1;
        let polls = *counter;
        let scenario = scenario_of(&s, ns, name);
        return (200, synthesize(&object, scenario, polls).0);
    }
    (200, object)
}

fn scenario_of(s: &State, ns: &str, name: &str) -> Scenario {
    s.scenarios
        .get(&(ns.to_owned(), name.to_owned()))
        .copied()
        .unwrap_or(Scenario::Completes)
}

fn list(state: &Mutex<State>, gv: &str, resource: &str, ns: &str, selector: &str) -> (u16, Value) {
    let s = lock(state);
    let mut items: Vec<Value> = Vec::new();
    if resource == "replicasets" || resource == "pods" {
        for ((_, r, dns, dname), d) in &s.objects {
            if r != "deployments" || dns != ns {
                continue;
            }
            let polls = s
                .polls
                .get(&(dns.clone(), dname.clone()))
                .copied()
                .unwrap_or(0);
            let (_, sets, pods) = synthesize(d, scenario_of(&s, dns, dname), polls);
            items.extend(if resource == "pods" { pods } else { sets });
        }
    } else {
        items.extend(
            s.objects
                .iter()
                .filter(|((g, r, n, _), _)| g == gv && r == resource && n == ns)
                .map(|(_, v)| v.clone()),
        );
    }
    items.retain(|o| labels_match(o, selector));
    let kind = match resource {
        "replicasets" => "ReplicaSetList".to_string(),
        "pods" => "PodList".to_string(),
        other => format!("{other}List"),
    };
    (
        200,
        json!({"apiVersion": gv, "kind": kind, "metadata": {"resourceVersion": s.resource_version.to_string()},
               "items": items}),
    )
}

/// What the real schema validation would refuse in a Deployment (a small subset).
fn invalid_deployment(d: &Value) -> Option<String> {
    let name = d
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let selector = d
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object);
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Some(format!(
            "Deployment.apps \"{name}\" is invalid: spec.selector: Required value"
        ));
    };
    let labels = d.pointer("/spec/template/metadata/labels");
    for (k, v) in selector {
        if labels.and_then(|l| l.get(k)) != Some(v) {
            return Some(format!(
                "Deployment.apps \"{name}\" is invalid: spec.template.metadata.labels: Invalid value: \
                 `selector` does not match template `labels`"
            ));
        }
    }
    let containers = d
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        return Some(format!(
            "Deployment.apps \"{name}\" is invalid: spec.template.spec.containers: Required value"
        ));
    };
    for (i, c) in containers.iter().enumerate() {
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Some(format!(
                "Deployment.apps \"{name}\" is invalid: spec.template.spec.containers[{i}].image: Required value"
            ));
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn apply(
    state: &Mutex<State>,
    gv: &str,
    resource: &str,
    ns: &str,
    name: &str,
    params: &HashMap<String, String>,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    if content_type != Some("application/apply-patch+yaml") {
        return status(
            415,
            "UnsupportedMediaType",
            &format!("the double serves only server-side apply, not {content_type:?}"),
        );
    }
    let Some(manager) = params.get("fieldManager").filter(|m| !m.is_empty()) else {
        return status(
            400,
            "BadRequest",
            "PATCH apply requires the fieldManager query parameter",
        );
    };
    let dry_run = params.get("dryRun").map(String::as_str) == Some("All");
    // The apply body is YAML; kube sends JSON, which is YAML.
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "apply body is not JSON");
    };
    let kind = object["kind"].as_str().unwrap_or("").to_owned();
    if object["apiVersion"].as_str() != Some(gv) || plural(&kind) != resource {
        return status(
            400,
            "BadRequest",
            &format!("{gv} {resource} cannot hold a {kind}"),
        );
    }
    if object.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
        return status(
            400,
            "BadRequest",
            "the name of the object does not match the URL",
        );
    }
    match object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        None => object["metadata"]["namespace"] = json!(ns),
        Some(n) if n == ns => {}
        Some(_) => {
            return status(
                400,
                "BadRequest",
                "the namespace of the object does not match the URL",
            );
        }
    }
    if kind == "Deployment"
        && let Some(message) = invalid_deployment(&object)
    {
        return status(422, "Invalid", &message);
    }
    let mut s = lock(state);
    let key = (
        gv.to_owned(),
        resource.to_owned(),
        ns.to_owned(),
        name.to_owned(),
    );
    let existing = s.objects.get(&key).cloned();
    let spec_changed = existing
        .as_ref()
        .is_none_or(|e| e.get("spec") != object.get("spec"));
    let generation = match &existing {
        None => 1,
        Some(e) => {
            let g = e
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            if spec_changed { g + 1 } else { g }
        }
    };
    let uid = match existing
        .as_ref()
        .and_then(|e| e.pointer("/metadata/uid"))
        .cloned()
    {
        Some(uid) => uid,
        None => {
            s.next_uid += 1;
            json!(format!("uid-{}", s.next_uid))
        }
    };
    let meta = &mut object["metadata"];
    meta["uid"] = uid;
    meta["generation"] = json!(generation);
    meta["resourceVersion"] = json!((s.resource_version + 1).to_string());
    meta["managedFields"] = json!([{"manager": manager, "operation": "Apply", "apiVersion": gv}]);
    if !dry_run {
        s.resource_version += 1;
        if spec_changed {
            s.polls.remove(&(ns.to_owned(), name.to_owned()));
        }
        s.objects.insert(key, object.clone());
    }
    (if existing.is_some() { 200 } else { 201 }, object)
}

/// The Deployment with a synthesized status, its ReplicaSets and Pods, under `scenario`.
fn synthesize(d: &Value, scenario: Scenario, polls: u32) -> (Value, Vec<Value>, Vec<Value>) {
    let name = d
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = d
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let uid = d.pointer("/metadata/uid").cloned().unwrap_or(json!(""));
    let generation = d
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let desired = d
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let labels = d
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    let first = d
        .pointer("/spec/template/spec/containers/0")
        .cloned()
        .unwrap_or(json!({}));
    let container = first["name"].as_str().unwrap_or("app").to_owned();
    let image = first["image"].as_str().unwrap_or("").to_owned();

    let rs = |revision: i64, available: i64, conditions: Value| {
        let hash = format!("h{revision}");
        let mut l = labels.clone();
        l["pod-template-hash"] = json!(hash);
        json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": format!("{name}-{hash}"), "namespace": ns, "labels": l,
                "annotations": {"deployment.kubernetes.io/revision": revision.to_string()},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                      "uid": uid, "controller": true}]},
            "spec": {"replicas": available},
            "status": {"replicas": available, "availableReplicas": available,
                       "readyReplicas": available, "conditions": conditions}
        })
    };
    let pod = |revision: i64, index: i64, ready: bool, status: Value| {
        let hash = format!("h{revision}");
        let mut l = labels.clone();
        l["pod-template-hash"] = json!(hash);
        let mut st = json!({"phase": if ready { "Running" } else { "Pending" },
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]});
        if let (Some(st), Some(extra)) = (st.as_object_mut(), status.as_object()) {
            for (k, v) in extra {
                st.insert(k.clone(), v.clone());
            }
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{hash}-{index}"), "namespace": ns, "labels": l,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": format!("{name}-{hash}"), "uid": format!("rs-{hash}"), "controller": true}]},
            "status": st
        })
    };
    let waiting = |reason: &str, message: String, restarts: i64| {
        json!({"containerStatuses": [{"name": container, "image": image, "imageID": "",
            "ready": false, "restartCount": restarts,
            "state": {"waiting": {"reason": reason, "message": message}}}]})
    };
    let running = json!({"containerStatuses": [{"name": container, "image": image,
        "imageID": "", "ready": true, "restartCount": 0,
        "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]});

    let mut status = json!({"observedGeneration": generation, "replicas": desired,
        "updatedReplicas": desired, "readyReplicas": 0, "availableReplicas": 0,
        "unavailableReplicas": desired});
    let mut sets = Vec::new();
    let mut pods = Vec::new();
    let failing = |reason: &str, message: String, restarts: i64| {
        (0..desired)
            .map(|i| {
                pod(
                    generation,
                    i,
                    false,
                    waiting(reason, message.clone(), restarts),
                )
            })
            .collect::<Vec<_>>()
    };
    match scenario {
        Scenario::Completes if polls >= 2 => {
            status = json!({"observedGeneration": generation, "replicas": desired,
                "updatedReplicas": desired, "readyReplicas": desired,
                "availableReplicas": desired});
            sets.push(rs(generation, desired, json!([])));
            pods.extend((0..desired).map(|i| pod(generation, i, true, running.clone())));
        }
        Scenario::Completes => {
            sets.push(rs(generation, 0, json!([])));
            pods.extend(failing("ContainerCreating", String::new(), 0));
        }
        Scenario::ImagePullBackOff => {
            sets.push(rs(generation, 0, json!([])));
            pods.extend(failing(
                "ImagePullBackOff",
                format!("Back-off pulling image \"{image}\""),
                0,
            ));
        }
        Scenario::ErrImageNeverPull => {
            sets.push(rs(generation, 0, json!([])));
            pods.extend(failing(
                "ErrImageNeverPull",
                format!("Container image \"{image}\" is not present with pull policy of Never"),
                0,
            ));
        }
        Scenario::CrashLoopBackOff => {
            sets.push(rs(generation, 0, json!([])));
            pods.extend(failing(
                "CrashLoopBackOff",
                format!("back-off 40s restarting failed container={container}"),
                4,
            ));
        }
        Scenario::Unschedulable => {
            sets.push(rs(generation, 0, json!([])));
            pods.extend((0..desired).map(|i| {
                pod(
                    generation,
                    i,
                    false,
                    json!({"conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/1 nodes are available: 1 Insufficient memory."}]}),
                )
            }));
        }
        Scenario::FailedCreateQuota => {
            status["updatedReplicas"] = json!(0);
            status["replicas"] = json!(0);
            sets.push(rs(
                generation,
                0,
                json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                    "message": format!("pods \"{name}-h{generation}-x\" is forbidden: exceeded quota: \
                        unidesk-dev-quota, requested: limits.cpu=2, used: limits.cpu=4, limited: limits.cpu=4")}]),
            ));
        }
        Scenario::OldPodsStillServing => {
            status = json!({"observedGeneration": generation, "replicas": desired + 1,
                "updatedReplicas": desired, "readyReplicas": desired + 1,
                "availableReplicas": desired + 1});
            sets.push(rs(generation, desired, json!([])));
            sets.push(rs(generation - 1, 1, json!([])));
            pods.extend((0..desired).map(|i| pod(generation, i, true, running.clone())));
            pods.push(pod(generation - 1, 0, true, running.clone()));
        }
        Scenario::NeverObserved => {
            status = json!({"observedGeneration": generation - 1, "replicas": desired,
                "updatedReplicas": desired, "readyReplicas": desired,
                "availableReplicas": desired});
        }
    }
    let mut deployment = d.clone();
    deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"] =
        json!(generation.to_string());
    deployment["status"] = status;
    (deployment, sets, pods)
}

async fn proxy(state: &Mutex<State>, ns: &str, target: &str, tail: &str) -> Routed {
    let (service, port) = target.split_once(':').unwrap_or((target, ""));
    let Ok(port) = port.parse::<u16>() else {
        return status(
            400,
            "BadRequest",
            "the double proxies only service:<port number>",
        )
        .into();
    };
    let backend = lock(state)
        .backends
        .get(&(ns.into(), service.into(), port))
        .cloned();
    let Some(base) = backend else {
        return status(
            503,
            "ServiceUnavailable",
            &format!("no endpoints available for service \"{service}\""),
        )
        .into();
    };
    let url = format!("{base}/{tail}");
    let fetched = tokio::task::spawn_blocking(move || http_get(&url)).await;
    match fetched {
        Ok(Ok((code, body))) => Routed::Raw(code, body),
        Ok(Err(e)) => status(
            503,
            "ServiceUnavailable",
            &format!("error trying to reach service: {e}"),
        )
        .into(),
        Err(e) => status(500, "InternalError", &e.to_string()).into(),
    }
}

/// A minimal blocking HTTP/1.0 GET of `http://host:port/path`: (status, body).
pub fn http_get(url: &str) -> Result<(u16, Vec<u8>), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// backends")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream =
        TcpStream::connect(authority).map_err(|e| format!("dial tcp {authority}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        stream,
        "GET /{path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((code, raw[split + 4..].to_vec()))
}

/// A real local HTTP server standing behind a Service: answers every GET with its current
/// body (JSON) and records the paths asked.
pub struct HttpBackend {
    pub addr: SocketAddr,
    body: Arc<Mutex<(u16, String)>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl HttpBackend {
    /// Starts serving `body` with status 200 on a free loopback port.
    pub fn start(body: Value) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Mutex::new((200, body.to_string())));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (b, p) = (shared.clone(), paths.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
                p.lock().unwrap_or_else(|e| e.into_inner()).push(path);
                let (code, body) = b.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HttpBackend {
            addr,
            body: shared,
            paths,
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what is served.
    pub fn set(&self, code: u16, body: Value) {
        *self.body.lock().unwrap_or_else(|e| e.into_inner()) = (code, body.to_string());
    }

    /// The request paths served so far.
    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Writes a kubeconfig for `server` (with the double's CA and token) at `path`.
pub fn write_kubeconfig(path: &Path, server: &str, ca_pem: &str) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters:\n- name: k\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\n\
             contexts:\n- name: c\n  context: {{cluster: k, user: u}}\n\
             users:\n- name: u\n  user: {{token: {TOKEN}}}\n",
            base64(ca_pem.as_bytes())
        ),
    )
    .expect("write kubeconfig");
}

#[test]
fn kube_apply_double_base64_and_percent_decoding() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(percent_decode("app%3Dweb%2Cx%3Dy"), "app=web,x=y");
    assert_eq!(percent_decode("a+b%"), "a b%");
}
