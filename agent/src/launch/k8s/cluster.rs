//! The I/O edge of the k3s executor: the API server named by one kubeconfig file.
//!
//! [`Cluster::connect`] reads exactly the given kubeconfig — never `KUBECONFIG`, never a
//! default context path, never `HTTPS_PROXY` — so a deploy cannot land on whatever cluster a
//! shell happens to point at. Apply is server-side apply of every object with `dryRun=All`
//! first (schema and admission errors surface before anything changes), then for real.
//! The rollout is polled and judged by the pure [`rollout::judge`]; health is read through
//! the API server's service proxy (never a NodePort or a host port).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Selector;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::codegen::http;

use super::manifest::{ANNOTATION_DEPLOY_COMMIT, ENV_COMMIT, Object};
use super::rollout::{self, Rollout};
use super::verify::DeploymentEvidence;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "unidesk-deploy";

/// The pause between rollout polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest health answer accepted.
pub const MAX_HEALTH_BYTES: usize = 64 * 1024;

/// A Kubernetes API failure; the text names the kubeconfig or the API server and the action.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file cannot be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    /// An API request failed; `detail` carries the server's status message when it sent one.
    #[error("{action} at {server} failed: {detail}")]
    Api {
        action: String,
        server: String,
        /// The HTTP status code when the server answered.
        code: Option<u16>,
        detail: String,
    },
    /// An object kind the executor has no fixed API resource for.
    #[error("{object}: {api_version} {kind} has no known API resource")]
    UnknownKind {
        object: String,
        api_version: String,
        kind: String,
    },
    /// An answer that is not what the request expects.
    #[error("{what} at {server}: {reason}")]
    BadAnswer {
        what: String,
        server: String,
        reason: String,
    },
}

impl KubeError {
    /// The HTTP status of an API failure, when the server answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api { code, .. } => *code,
            _ => None,
        }
    }
}

/// Why a rollout did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A terminal failure the judge recognised.
    #[error("rollout of Deployment {namespace}/{deployment} failed: {}", .reasons.join("; "))]
    Failed {
        namespace: String,
        deployment: String,
        reasons: Vec<String>,
    },
    /// The deadline passed first.
    #[error(
        "rollout of Deployment {namespace}/{deployment} not complete by the deadline; \
         last state: {last}{}",
        seen_text(.seen)
    )]
    Deadline {
        namespace: String,
        deployment: String,
        /// The last progress description.
        last: String,
        /// Earlier distinct progress descriptions (bounded), oldest first.
        seen: Vec<String>,
    },
    /// The API server could not be asked (the Deployment is gone, access refused, …).
    #[error(transparent)]
    Api(#[from] KubeError),
}

fn seen_text(seen: &[String]) -> String {
    if seen.is_empty() {
        String::new()
    } else {
        format!("; seen before: {}", seen.join(" | "))
    }
}

/// One applied object and what the server made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` after the apply (Deployments always have one).
    pub generation: Option<i64>,
}

/// A connection to the API server of one kubeconfig file.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    kubeconfig: PathBuf,
    server: String,
    ca_fingerprint: Option<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("kubeconfig", &self.kubeconfig)
            .field("server", &self.server)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

/// The resource of `kind` (plural `plural`) in `api_version` (`v1` or `group/version`).
fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// The fixed API resource of an allowed `(apiVersion, kind)` (no discovery).
pub fn api_resource(api_version: &str, kind: &str) -> Option<ApiResource> {
    let ar = match (api_version, kind) {
        ("apps/v1", "Deployment") => ApiResource::erase::<Deployment>(&()),
        ("v1", "Service") => ApiResource::erase::<Service>(&()),
        ("v1", "ConfigMap") => ApiResource::erase::<ConfigMap>(&()),
        ("v1", "Secret") => ApiResource::erase::<Secret>(&()),
        ("v1", "ServiceAccount") => ApiResource::erase::<ServiceAccount>(&()),
        ("v1", "PersistentVolumeClaim") => ApiResource::erase::<PersistentVolumeClaim>(&()),
        _ => return None,
    };
    Some(ar)
}

/// The fixed API resource of a kind a dry run may send, and whether it is namespaced: the
/// executor's [`api_resource`] kinds, `Namespace`, and the workload, policy and RBAC kinds a
/// dev foundation manifest holds. No discovery: an unlisted kind is refused by name.
pub fn dry_run_resource(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota};
    use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    if let Some(ar) = api_resource(api_version, kind) {
        return Some((ar, true));
    }
    let namespaced = |ar| Some((ar, true));
    match (api_version, kind) {
        ("v1", "Namespace") => Some((ApiResource::erase::<Namespace>(&()), false)),
        ("v1", "LimitRange") => namespaced(ApiResource::erase::<LimitRange>(&())),
        ("v1", "ResourceQuota") => namespaced(ApiResource::erase::<ResourceQuota>(&())),
        ("apps/v1", "StatefulSet") => namespaced(ApiResource::erase::<StatefulSet>(&())),
        ("apps/v1", "DaemonSet") => namespaced(ApiResource::erase::<DaemonSet>(&())),
        ("batch/v1", "Job") => namespaced(ApiResource::erase::<Job>(&())),
        ("batch/v1", "CronJob") => namespaced(ApiResource::erase::<CronJob>(&())),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            namespaced(ApiResource::erase::<NetworkPolicy>(&()))
        }
        ("networking.k8s.io/v1", "Ingress") => namespaced(ApiResource::erase::<Ingress>(&())),
        ("rbac.authorization.k8s.io/v1", "Role") => namespaced(ApiResource::erase::<Role>(&())),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            namespaced(ApiResource::erase::<RoleBinding>(&()))
        }
        ("policy/v1", "PodDisruptionBudget") => {
            namespaced(ApiResource::erase::<PodDisruptionBudget>(&()))
        }
        _ => None,
    }
}

fn describe(err: &kube::Error) -> (Option<u16>, String) {
    match err {
        kube::Error::Api(status) if status.code == 0 => (None, format!("{status:?}")),
        kube::Error::Api(status) => {
            let mut text = status.message.clone();
            if !status.reason.is_empty() {
                text = format!("{} ({}, HTTP {})", text, status.reason, status.code);
            } else {
                text = format!("{} (HTTP {})", text, status.code);
            }
            (Some(status.code), text)
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let c = cause.to_string();
                if !text.contains(&c) {
                    text.push_str(": ");
                    text.push_str(&c);
                }
                source = cause.source();
            }
            (None, text)
        }
    }
}

/// The cluster entry of the kubeconfig's current context.
fn current_cluster(config: &Kubeconfig) -> Option<&kube::config::Cluster> {
    let context_name = config.current_context.as_ref()?;
    let context = config
        .contexts
        .iter()
        .find(|c| &c.name == context_name)?
        .context
        .as_ref()?;
    config
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)?
        .cluster
        .as_ref()
}

impl Cluster {
    /// Connects to the API server of `kubeconfig_path` (its current context), reading that
    /// file and nothing else. Does not send a request; see [`Cluster::version`].
    pub async fn connect(kubeconfig_path: &Path) -> Result<Cluster, KubeError> {
        let path = kubeconfig_path.display().to_string();
        let bad = |reason: String| KubeError::Kubeconfig {
            path: path.clone(),
            reason,
        };
        let kubeconfig = Kubeconfig::read_from(kubeconfig_path).map_err(|e| bad(e.to_string()))?;
        if let Some(proxy) = current_cluster(&kubeconfig).and_then(|c| c.proxy_url.clone())
            && !proxy.is_empty()
        {
            return Err(bad(format!(
                "proxy-url {proxy:?} is not supported: the API server must be reached directly"
            )));
        }
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| bad(e.to_string()))?;
        // `from_custom_kubeconfig` also honours HTTPS_PROXY from the environment; the API
        // server is local to the node and only the file decides how to reach it.
        config.proxy_url = None;
        config.read_timeout = Some(REQUEST_TIMEOUT);
        // No silent retry of 429/503/504: the rollout loop retries on its own schedule and a
        // health probe's 503 ("no endpoints") must reach the caller as it is.
        config.default_retry = false;
        let https = config.cluster_url.scheme_str() == Some("https");
        let ca_fingerprint = match (&config.root_cert, https && !config.accept_invalid_certs) {
            (Some(certs), true) => certs.first().map(|der| hex::encode(Sha256::digest(der))),
            _ => None,
        };
        let server = config.cluster_url.to_string();
        let server = server.trim_end_matches('/').to_owned();
        let client = kube::Client::try_from(config).map_err(|e| bad(describe(&e).1))?;
        Ok(Cluster {
            client,
            kubeconfig: kubeconfig_path.to_path_buf(),
            server,
            ca_fingerprint,
        })
    }

    /// The kubeconfig file this connection came from.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL, as the kubeconfig gives it.
    pub fn api_server_url(&self) -> &str {
        &self.server
    }

    /// sha256 (hex) of the DER of the kubeconfig's CA certificate; `None` for plain http or
    /// `insecure-skip-tls-verify`.
    pub fn ca_fingerprint(&self) -> Option<&str> {
        self.ca_fingerprint.as_deref()
    }

    fn api_err(&self, action: impl Into<String>, err: &kube::Error) -> KubeError {
        let (code, detail) = describe(err);
        KubeError::Api {
            action: action.into(),
            server: self.server.clone(),
            code,
            detail,
        }
    }

    async fn bounded<T>(
        &self,
        action: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.api_err(action, &e)),
            Err(_) => Err(KubeError::Api {
                action: action.into(),
                server: self.server.clone(),
                code: None,
                detail: format!("no answer within {REQUEST_TIMEOUT:?}"),
            }),
        }
    }

    /// `GET /version`: the server's `gitVersion`, proving the API answers.
    pub async fn version(&self) -> Result<String, KubeError> {
        let info = self
            .bounded("GET /version", self.client.apiserver_version())
            .await?;
        Ok(info.git_version)
    }

    /// `object` as kube's dynamic object.
    fn dynamic_object(&self, object: &Object) -> Result<DynamicObject, KubeError> {
        serde_json::from_value(object.value.clone()).map_err(|e| KubeError::BadAnswer {
            what: object.reference(),
            server: self.server.clone(),
            reason: format!("is not a Kubernetes object: {e}"),
        })
    }

    fn dynamic_api(
        &self,
        object: &Object,
    ) -> Result<(Api<DynamicObject>, DynamicObject), KubeError> {
        let ar = api_resource(object.api_version(), object.kind()).ok_or_else(|| {
            KubeError::UnknownKind {
                object: object.reference(),
                api_version: object.api_version().into(),
                kind: object.kind().into(),
            }
        })?;
        let namespace = object.namespace().ok_or_else(|| KubeError::BadAnswer {
            what: object.reference(),
            server: self.server.clone(),
            reason: "has no namespace (narrow the manifest first)".into(),
        })?;
        let dynamic = self.dynamic_object(object)?;
        Ok((
            Api::namespaced_with(self.client.clone(), namespace, &ar),
            dynamic,
        ))
    }

    /// Server-side applies `objects` as `field_manager` (forcing ownership of conflicting
    /// fields): first every object with `dryRun=All`, and only when all of them pass, for
    /// real. Returns what the server made of each object, in order.
    pub async fn apply(
        &self,
        objects: &[Object],
        field_manager: &str,
    ) -> Result<Vec<Applied>, KubeError> {
        let mut prepared = Vec::with_capacity(objects.len());
        for object in objects {
            prepared.push((object, self.dynamic_api(object)?));
        }
        let params = PatchParams::apply(field_manager).force();
        for (object, (api, dynamic)) in &prepared {
            let action = format!(
                "dry-run server-side apply of {} in {}",
                object.reference(),
                object.namespace().unwrap_or_default()
            );
            self.bounded(
                &action,
                api.patch(
                    object.name(),
                    &params.clone().dry_run(),
                    &Patch::Apply(dynamic),
                ),
            )
            .await?;
        }
        let mut applied = Vec::with_capacity(prepared.len());
        for (object, (api, dynamic)) in &prepared {
            let action = format!(
                "server-side apply of {} in {}",
                object.reference(),
                object.namespace().unwrap_or_default()
            );
            let result = self
                .bounded(
                    &action,
                    api.patch(object.name(), &params, &Patch::Apply(dynamic)),
                )
                .await?;
            applied.push(Applied {
                api_version: object.api_version().into(),
                kind: object.kind().into(),
                namespace: object.namespace().unwrap_or_default().into(),
                name: object.name().into(),
                generation: result.metadata.generation,
            });
        }
        Ok(applied)
    }

    /// Server-side applies one object with `dryRun=All` only — never for real — as
    /// `field_manager` (`dev-env validate --kubectl-dry-run`). Besides the kinds the executor
    /// applies, the dev foundation's kinds have a fixed resource here ([`dry_run_resource`]);
    /// any other kind is refused without a request, naming it.
    pub async fn dry_run_apply(
        &self,
        object: &Object,
        field_manager: &str,
    ) -> Result<(), KubeError> {
        let (ar, namespaced) =
            dry_run_resource(object.api_version(), object.kind()).ok_or_else(|| {
                KubeError::UnknownKind {
                    object: object.reference(),
                    api_version: object.api_version().into(),
                    kind: object.kind().into(),
                }
            })?;
        let api: Api<DynamicObject> = match (namespaced, object.namespace()) {
            (false, _) => Api::all_with(self.client.clone(), &ar),
            (true, Some(namespace)) => Api::namespaced_with(self.client.clone(), namespace, &ar),
            (true, None) => {
                return Err(KubeError::BadAnswer {
                    what: object.reference(),
                    server: self.server.clone(),
                    reason: "has no metadata.namespace".into(),
                });
            }
        };
        let dynamic = self.dynamic_object(object)?;
        let params = PatchParams::apply(field_manager).force().dry_run();
        let action = match object.namespace() {
            Some(ns) if namespaced => {
                format!(
                    "dry-run server-side apply of {} in {ns}",
                    object.reference()
                )
            }
            _ => format!("dry-run server-side apply of {}", object.reference()),
        };
        self.bounded(
            &action,
            api.patch(object.name(), &params, &Patch::Apply(&dynamic)),
        )
        .await?;
        Ok(())
    }

    async fn observe_rollout(
        &self,
        namespace: &str,
        deployment: &str,
        applied_generation: i64,
    ) -> Result<Rollout, KubeError> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let d = self
            .bounded(
                &format!("GET Deployment {namespace}/{deployment}"),
                deployments.get(deployment),
            )
            .await?;
        let selector = d
            .spec
            .as_ref()
            .map(|s| s.selector.clone())
            .unwrap_or_default();
        let selector = Selector::try_from(selector).map_err(|e| KubeError::BadAnswer {
            what: format!("Deployment {namespace}/{deployment} spec.selector"),
            server: self.server.clone(),
            reason: e.to_string(),
        })?;
        let params = ListParams::default().labels_from(&selector);
        let sets: Api<ReplicaSet> = Api::namespaced(self.client.clone(), namespace);
        let sets = self
            .bounded(
                &format!("LIST ReplicaSets of {namespace}/{deployment}"),
                sets.list(&params),
            )
            .await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pods = self
            .bounded(
                &format!("LIST Pods of {namespace}/{deployment}"),
                pods.list(&params),
            )
            .await?;
        Ok(rollout::judge(
            applied_generation,
            &d,
            &sets.items,
            &pods.items,
        ))
    }

    /// Polls the Deployment, its ReplicaSets and Pods every [`POLL_INTERVAL`] until the
    /// rollout of `applied_generation` is complete, has failed, or `deadline` passes. Each
    /// new progress description is passed to `on_progress`. API errors other than "not
    /// found" / "forbidden" are retried until the deadline (and reported as progress).
    pub async fn wait_rollout(
        &self,
        namespace: &str,
        deployment: &str,
        applied_generation: i64,
        deadline: tokio::time::Instant,
        mut on_progress: impl FnMut(&str),
    ) -> Result<(), RolloutError> {
        const MAX_SEEN: usize = 8;
        let mut last = String::from("not observed yet");
        let mut seen: Vec<String> = Vec::new();
        loop {
            let observed = tokio::time::timeout_at(
                deadline,
                self.observe_rollout(namespace, deployment, applied_generation),
            )
            .await;
            let why = match observed {
                Err(_) => None,
                Ok(Ok(Rollout::Complete)) => return Ok(()),
                Ok(Ok(Rollout::Failed { reasons })) => {
                    return Err(RolloutError::Failed {
                        namespace: namespace.into(),
                        deployment: deployment.into(),
                        reasons,
                    });
                }
                Ok(Ok(Rollout::Progressing { why })) => Some(why),
                Ok(Err(e)) if matches!(e.code(), Some(401 | 403 | 404)) => {
                    return Err(RolloutError::Api(e));
                }
                Ok(Err(e)) => Some(format!("API error (retrying): {e}")),
            };
            if let Some(why) = why
                && why != last
            {
                on_progress(&why);
                let previous = std::mem::replace(&mut last, why);
                if previous != "not observed yet" && !seen.contains(&previous) {
                    seen.push(previous);
                    if seen.len() > MAX_SEEN {
                        seen.remove(0);
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(RolloutError::Deadline {
                    namespace: namespace.into(),
                    deployment: deployment.into(),
                    last,
                    seen,
                });
            }
            tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)).await;
        }
    }

    /// Reads one annotation of a live Deployment (`None` when it is not set).
    pub async fn deployment_annotation(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, KubeError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let d = self
            .bounded(&format!("GET Deployment {namespace}/{name}"), api.get(name))
            .await?;
        Ok(d.metadata.annotations.and_then(|mut a| a.remove(key)))
    }

    /// What the live Deployment shows of the deployed commit: its
    /// `unidesk.ai/deploy-commit` annotation and `container`'s `UNIDESK_DEPLOY_COMMIT`.
    pub async fn deployment_evidence(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<DeploymentEvidence, KubeError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let d = self
            .bounded(&format!("GET Deployment {namespace}/{name}"), api.get(name))
            .await?;
        let annotation_commit = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_DEPLOY_COMMIT))
            .cloned();
        let env_commit = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.iter().find(|c| c.name == container))
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().find(|e| e.name == ENV_COMMIT))
            .and_then(|e| e.value.clone());
        Ok(DeploymentEvidence {
            deployment: format!("{namespace}/{name}"),
            annotation_commit,
            env_commit,
        })
    }

    /// `GET path` of a service, through the API server's service proxy
    /// (`/api/v1/namespaces/{ns}/services/{service}:{port}/proxy/{path}`), parsed as JSON.
    pub async fn service_health(
        &self,
        namespace: &str,
        service: &str,
        port: u16,
        path: &str,
    ) -> Result<Value, KubeError> {
        for (what, part) in [("namespace", namespace), ("service", service)] {
            if part.is_empty()
                || !part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(KubeError::BadAnswer {
                    what: format!("{what} {part:?}"),
                    server: self.server.clone(),
                    reason: "is not a DNS name".into(),
                });
            }
        }
        let path = path.trim_start_matches('/');
        let url = format!("/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy/{path}");
        let action = format!("GET {url}");
        let request = http::Request::get(&url)
            .body(kube::client::Body::from(Vec::new()))
            .map_err(|e| KubeError::BadAnswer {
                what: action.clone(),
                server: self.server.clone(),
                reason: e.to_string(),
            })?;
        // `send`, not `request_text`: the proxied service's own status code and body are the
        // answer (kube would read a non-Status error body as an empty Status).
        let response = self.bounded(&action, self.client.send(request)).await?;
        let code = response.status().as_u16();
        let body = self
            .bounded(&action, response.into_body().collect_bytes())
            .await?;
        if body.len() > MAX_HEALTH_BYTES {
            return Err(KubeError::BadAnswer {
                what: action,
                server: self.server.clone(),
                reason: format!("answer of {} bytes exceeds {MAX_HEALTH_BYTES}", body.len()),
            });
        }
        let text = String::from_utf8_lossy(&body);
        if !(200..300).contains(&code) {
            let detail = serde_json::from_str::<kube::core::Status>(&text)
                .ok()
                .filter(|s| !s.message.is_empty())
                .map_or_else(|| format!("{:.300}", text.trim()), |s| s.message);
            return Err(KubeError::Api {
                action,
                server: self.server.clone(),
                code: Some(code),
                detail: format!("HTTP {code}: {detail}"),
            });
        }
        serde_json::from_str(&text).map_err(|e| KubeError::BadAnswer {
            what: action,
            server: self.server.clone(),
            reason: format!("answer is not JSON ({e}): {:.200}", text),
        })
    }

    /// The service's health as the frontend routes it: `/api/microservices/<id>/health`
    /// through the frontend service's proxy — the path UniDesk users reach it by.
    pub async fn frontend_route_health(
        &self,
        namespace: &str,
        frontend_service: &str,
        port: u16,
        service_id: &str,
    ) -> Result<Value, KubeError> {
        if service_id.is_empty()
            || !service_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(KubeError::BadAnswer {
                what: format!("service id {service_id:?}"),
                server: self.server.clone(),
                reason: "is not a plain name".into(),
            });
        }
        self.service_health(
            namespace,
            frontend_service,
            port,
            &format!("api/microservices/{service_id}/health"),
        )
        .await
    }

    /// Creates a namespace (for a temporary CI namespace); one that exists is fine.
    pub async fn create_namespace(&self, name: &str) -> Result<(), KubeError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .map_err(|e| KubeError::BadAnswer {
            what: format!("Namespace {name}"),
            server: self.server.clone(),
            reason: e.to_string(),
        })?;
        match self
            .bounded(
                &format!("create Namespace {name}"),
                api.create(&PostParams::default(), &ns),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Name and `resourceVersion` of every object of one resource in `namespace` (the CI
    /// runner's isolation snapshot). `api_version` is `v1` or `group/version`.
    pub async fn list_versions(
        &self,
        namespace: &str,
        api_version: &str,
        kind: &str,
        plural: &str,
    ) -> Result<Vec<(String, String)>, KubeError> {
        let ar = resource(api_version, kind, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        let list = self
            .bounded(
                &format!("list {plural} in {namespace}"),
                api.list(&ListParams::default()),
            )
            .await?;
        Ok(list
            .items
            .into_iter()
            .map(|o| {
                (
                    o.metadata.name.unwrap_or_default(),
                    o.metadata.resource_version.unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Whether one namespaced object exists (e.g. the Tekton Pipeline the CI script runs).
    pub async fn exists(
        &self,
        namespace: &str,
        api_version: &str,
        kind: &str,
        plural: &str,
        name: &str,
    ) -> Result<bool, KubeError> {
        let ar = resource(api_version, kind, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        match self
            .bounded(&format!("get {plural} {namespace}/{name}"), api.get(name))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes a namespace and everything in it (background); one that is gone is fine.
    pub async fn delete_namespace(&self, name: &str) -> Result<(), KubeError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match self
            .bounded(
                &format!("delete Namespace {name}"),
                api.delete(name, &DeleteParams::background()),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_every_allowed_kind_has_a_fixed_api_resource() {
        for (api_version, kind) in super::super::manifest::ALLOWED_KINDS {
            let ar = api_resource(api_version, kind).expect("mapped");
            assert_eq!(&ar.api_version, api_version);
            assert_eq!(&ar.kind, kind);
        }
        assert_eq!(
            api_resource("apps/v1", "Deployment").unwrap().plural,
            "deployments"
        );
        assert!(api_resource("rbac.authorization.k8s.io/v1", "ClusterRole").is_none());
        assert!(api_resource("extensions/v1beta1", "Deployment").is_none());
    }

    #[test]
    fn k8s_dry_run_resources_are_fixed_and_scoped() {
        let (ns, namespaced) = dry_run_resource("v1", "Namespace").expect("Namespace");
        assert_eq!((ns.plural.as_str(), namespaced), ("namespaces", false));
        for (api_version, kind, plural) in [
            ("apps/v1", "Deployment", "deployments"),
            ("apps/v1", "StatefulSet", "statefulsets"),
            ("v1", "LimitRange", "limitranges"),
            ("networking.k8s.io/v1", "Ingress", "ingresses"),
            ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
            (
                "rbac.authorization.k8s.io/v1",
                "RoleBinding",
                "rolebindings",
            ),
        ] {
            let (ar, namespaced) = dry_run_resource(api_version, kind).expect(kind);
            assert_eq!((ar.plural.as_str(), namespaced), (plural, true), "{kind}");
            assert_eq!(ar.api_version, api_version);
        }
        assert!(dry_run_resource("rbac.authorization.k8s.io/v1", "ClusterRole").is_none());
        assert!(dry_run_resource("example.com/v1", "Widget").is_none());
    }

    #[tokio::test]
    async fn k8s_connect_names_the_kubeconfig_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-kubeconfig.yaml");
        let err = Cluster::connect(&missing).await.unwrap_err().to_string();
        assert!(err.contains("no-such-kubeconfig.yaml"), "{err}");

        let proxied = dir.path().join("proxied.yaml");
        std::fs::write(
            &proxied,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', proxy-url: 'http://proxy:3128'}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\nusers: [{name: u, user: {}}]\n",
        )
        .unwrap();
        let err = Cluster::connect(&proxied).await.unwrap_err().to_string();
        assert!(
            err.contains("proxied.yaml") && err.contains("proxy-url"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn k8s_connect_plain_http_has_no_ca_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\nusers: [{name: u, user: {}}]\n",
        )
        .unwrap();
        let cluster = Cluster::connect(&path).await.unwrap();
        assert_eq!(cluster.api_server_url(), "http://127.0.0.1:1");
        assert_eq!(cluster.ca_fingerprint(), None);
        assert_eq!(cluster.kubeconfig_path(), path);
        let err = cluster.version().await.unwrap_err().to_string();
        assert!(err.contains("GET /version at http://127.0.0.1:1"), "{err}");
    }
}
