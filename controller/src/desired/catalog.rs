//! `config.json`, the service catalog: how each service id is built and run (repository,
//! deployment mode, node, Dockerfile, image, compose or Kubernetes target), which agent serves
//! each node, and what each environment is (namespace, database fingerprint, Provider identity,
//! services enabled for `--env` apply, per-environment deployments).
//!
//! It owns the strict parse and every cross-reference check; its JSON Schema is
//! `schemas/config.schema.json`. It must not carry versions: which commit runs is only
//! `deploy.json`'s to say, so `repository.commitId` is accepted for compatibility, dropped, and
//! reported as a warning. It does no I/O beyond [`load`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use unidesk_protocol::AgentId;
use unidesk_protocol::ids::check_label;

use super::document::{self, Cursor, DocumentError, Fields};
use super::manifest::Environment;

/// The largest `config.json` accepted; checked before parsing.
pub const MAX_CATALOG_BYTES: usize = 4 * 1024 * 1024;

/// The shortest build timeout: one second.
pub const MIN_BUILD_TIMEOUT_MS: u64 = 1_000;

/// The longest build timeout: four hours.
pub const MAX_BUILD_TIMEOUT_MS: u64 = 4 * 60 * 60 * 1_000;

/// The service that repairs k3s; it must never be deployed through k3s itself.
pub const K3SCTL_ADAPTER: &str = "k3sctl-adapter";

const DOCUMENT: &str = "config.json";
const ROOT_FIELDS: &[&str] = &["$schema", "microservices", "nodes", "environments"];
const SERVICE_FIELDS: &[&str] = &["id", "repository", "deployment"];
const REPOSITORY_FIELDS: &[&str] = &["url", "commitId"];
const DEPLOYMENT_FIELDS: &[&str] = &[
    "mode",
    "node",
    "dockerfile",
    "context",
    "image",
    "buildBase",
    "buildTimeoutMs",
    "healthUrl",
    "compose",
    "k8s",
    "legacyContainer",
    "imageTagByEnvironment",
];
const BUILD_BASE_FIELDS: &[&str] = &["arg", "candidates"];
const COMPOSE_FIELDS: &[&str] = &["project", "service"];
const K8S_FIELDS: &[&str] = &[
    "manifest",
    "namespace",
    "deployments",
    "health",
    "frontendRoute",
    "rolloutTimeoutMs",
];
const K8S_DEPLOYMENT_FIELDS: &[&str] = &["name", "container"];
const K8S_HEALTH_FIELDS: &[&str] = &["service", "port", "path"];
const K8S_ROUTE_FIELDS: &[&str] = &["service", "port"];

/// How long a rollout may take when config does not say: ten minutes.
pub const DEFAULT_ROLLOUT_TIMEOUT_MS: u64 = 10 * 60 * 1_000;
/// The longest rollout timeout: one hour.
pub const MAX_ROLLOUT_TIMEOUT_MS: u64 = 60 * 60 * 1_000;
const IMAGE_TAG_FIELDS: &[&str] = &["dev", "prod"];
const NODE_FIELDS: &[&str] = &["agent", "egress", "kubeconfig", "containerdSocket"];
const ENVIRONMENT_FIELDS: &[&str] = &[
    "namespace",
    "databaseFingerprint",
    "providerIdentity",
    "applyServices",
    "deployments",
    "foundation",
    "hostNetworkAllowed",
];
const FOUNDATION_FIELDS: &[&str] = &["manifest", "allowedObjects"];

/// A `config.json` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// Structure or a single bad value, with its JSON path.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// Two microservices share an id.
    #[error("config.json: duplicate microservice id {id:?} at {first} and {second}")]
    DuplicateService {
        id: String,
        first: String,
        second: String,
    },
    /// A block the deployment mode needs is absent.
    #[error("config.json: {path} is required when deployment.mode is {mode}")]
    ModeNeeds { path: String, mode: DeploymentMode },
    /// A block that belongs to another deployment mode is present.
    #[error("config.json: {path} must not be set when deployment.mode is {mode}")]
    ModeForbids { path: String, mode: DeploymentMode },
    /// The file could not be read.
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
}

impl CatalogError {
    /// The JSON path of the bad input, when the error is about one place in the document.
    pub fn path(&self) -> Option<&str> {
        match self {
            CatalogError::Document(e) => e.path(),
            CatalogError::DuplicateService { second: path, .. }
            | CatalogError::ModeNeeds { path, .. }
            | CatalogError::ModeForbids { path, .. } => Some(path),
            CatalogError::Read { .. } => None,
        }
    }
}

/// Something accepted but worth telling the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogWarning {
    /// JSON path of the ignored value.
    pub path: String,
    /// The ignored value.
    pub value: String,
    /// Why it is ignored.
    pub why: &'static str,
}

impl fmt::Display for CatalogWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config.json: {}={:?} is ignored: {}",
            self.path, self.value, self.why
        )
    }
}

/// How a service is replaced on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentMode {
    /// Built on the node, imported into native k3s containerd, applied from a k8s manifest.
    K3sctlManaged,
    /// A Compose service recreated from the new image (main server or a provider node).
    UnideskDirect,
    /// A private main-server sidecar, replaced like a direct Compose service.
    InternalSidecar,
}

impl DeploymentMode {
    /// The name used in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentMode::K3sctlManaged => "k3sctl-managed",
            DeploymentMode::UnideskDirect => "unidesk-direct",
            DeploymentMode::InternalSidecar => "internal-sidecar",
        }
    }

    /// Whether the service is a Docker Compose service (as opposed to a k3s Deployment).
    pub fn is_compose(self) -> bool {
        !matches!(self, DeploymentMode::K3sctlManaged)
    }
}

impl fmt::Display for DeploymentMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeploymentMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "k3sctl-managed" => Ok(DeploymentMode::K3sctlManaged),
            "unidesk-direct" => Ok(DeploymentMode::UnideskDirect),
            "internal-sidecar" => Ok(DeploymentMode::InternalSidecar),
            _ => Err(()),
        }
    }
}

/// How a node's agent reaches the Internet for fetches and builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Egress {
    /// Through the agent's egress proxy, tunnelled to the controller.
    Tunnel,
    /// The node's own network (the main server).
    Direct,
}

/// `microservices[].deployment.buildBase`: a warm build-base argument and its candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildBaseConfig {
    /// Dockerfile `ARG` that names the base image, e.g. `CODE_QUEUE_BASE_IMAGE`.
    pub arg: String,
    /// Images to try in order; the first present on the node is used.
    pub candidates: Vec<String>,
}

/// `microservices[].deployment.compose`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComposeConfig {
    /// Fixed Compose project; absent means "read it from the running container's labels".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Compose service name.
    pub service: String,
}

/// `microservices[].deployment.k8s`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct K8sConfig {
    /// Repository-relative path of the manifest, read at the deployed commit.
    pub manifest: String,
    pub namespace: String,
    /// The service's Deployments (Code Queue has three), each with the container that runs
    /// the built image.
    pub deployments: Vec<K8sDeployment>,
    /// Where the service reports `deploy.commit`, through the API server's service proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<K8sHealth>,
    /// The frontend Service whose `/api/microservices/<id>/health` route must report the
    /// commit too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend_route: Option<K8sServicePort>,
    pub rollout_timeout_ms: u64,
}

/// `k8s.deployments[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct K8sDeployment {
    pub name: String,
    pub container: String,
}

/// `k8s.health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct K8sHealth {
    pub service: String,
    pub port: u16,
    pub path: String,
}

/// `k8s.frontendRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct K8sServicePort {
    pub service: String,
    pub port: u16,
}

/// `microservices[].deployment.imageTagByEnvironment`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageTags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prod: Option<String>,
}

/// How one service is built and run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub mode: DeploymentMode,
    /// Key into `nodes`.
    pub node: String,
    /// Repository-relative Dockerfile; absent means the service cannot be built (unsupported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Repository-relative build context; `.` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Image name with tag; required with a Dockerfile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_base: Option<BuildBaseConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_timeout_ms: Option<u64>,
    /// Health endpoint that reports `deploy.commit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compose: Option<ComposeConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8sConfig>,
    /// A direct Docker container the k3s executor removes after rollout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legacy_container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_tag_by_environment: Option<ImageTags>,
}

impl Deployment {
    /// The image to build for `env`: `image` with its tag replaced by
    /// `imageTagByEnvironment.<env>` when both are set.
    pub fn image_for(&self, env: Option<Environment>) -> Option<String> {
        let image = self.image.as_deref()?;
        let tag = match (env, &self.image_tag_by_environment) {
            (Some(Environment::Dev), Some(tags)) => tags.dev.as_deref(),
            (Some(Environment::Prod), Some(tags)) => tags.prod.as_deref(),
            _ => None,
        };
        let Some(tag) = tag else {
            return Some(image.to_owned());
        };
        // A ':' after the last '/' starts the tag; one before it is a registry port.
        let name = match image.rfind(':') {
            Some(i) if !image[i..].contains('/') => &image[..i],
            _ => image,
        };
        Some(format!("{name}:{tag}"))
    }
}

/// `microservices[]`: one service of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogService {
    pub id: String,
    /// `repository.url`; `repository.commitId` is dropped (see the module docs).
    pub repository_url: String,
    /// The base deployment: production, and the local-file (`--file`) path.
    pub deployment: Deployment,
}

/// `nodes.<nodeId>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// The agent that serves this node.
    pub agent: AgentId,
    pub egress: Egress,
    /// Native k3s kubeconfig; the executor defaults to `/etc/rancher/k3s/k3s.yaml`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd_socket: Option<String>,
}

/// `environments.<dev|prod>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentConfig {
    pub namespace: String,
    pub database_fingerprint: String,
    pub provider_identity: String,
    /// Services `deploy apply --env` may touch. Always empty for prod.
    pub apply_services: Vec<String>,
    /// Per-service deployment used in this environment instead of the base one.
    pub deployments: BTreeMap<String, Deployment>,
    /// The environment's foundation manifest (namespace, database, runtime config), which
    /// `dev-env validate` checks when no `--manifest` is given.
    pub foundation: Option<Foundation>,
    /// `Kind/name` of the objects allowed host networking in this environment's manifests.
    pub host_network_allowed: Vec<String>,
}

/// `environments.<env>.foundation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Foundation {
    /// Path of the manifest, relative to the directory of `config.json` (the repository root).
    pub manifest: String,
    /// `Kind/name` of every object the manifest may create; anything else is a finding.
    pub allowed_objects: Vec<String>,
}

/// A validated `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Catalog {
    pub microservices: Vec<CatalogService>,
    pub nodes: BTreeMap<String, NodeConfig>,
    pub environments: BTreeMap<Environment, EnvironmentConfig>,
}

impl Catalog {
    /// The catalog entry of a service id.
    pub fn service(&self, id: &str) -> Option<&CatalogService> {
        self.microservices.iter().find(|s| s.id == id)
    }

    /// A node by id.
    pub fn node(&self, id: &str) -> Option<&NodeConfig> {
        self.nodes.get(id)
    }

    /// An environment's settings.
    pub fn environment(&self, env: Environment) -> Option<&EnvironmentConfig> {
        self.environments.get(&env)
    }

    /// The deployment of `id` in `env`. Dev has no fallback: the base deployments are the
    /// production runtime, so a service without a dev deployment has none (`None`). Prod and
    /// the local-file path (`None`) use the prod override if any, else the base deployment.
    pub fn deployment_for(&self, id: &str, env: Option<Environment>) -> Option<&Deployment> {
        let base = &self.service(id)?.deployment;
        match env {
            None => Some(base),
            Some(Environment::Dev) => self.environment(Environment::Dev)?.deployments.get(id),
            Some(Environment::Prod) => Some(
                self.environment(Environment::Prod)
                    .and_then(|e| e.deployments.get(id))
                    .unwrap_or(base),
            ),
        }
    }
}

/// A parsed catalog and what was accepted but ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCatalog {
    pub catalog: Catalog,
    pub warnings: Vec<CatalogWarning>,
}

/// Parses and validates `config.json` bytes.
pub fn parse(bytes: &[u8]) -> Result<ParsedCatalog, CatalogError> {
    let node = document::parse(DOCUMENT, bytes, MAX_CATALOG_BYTES)?;
    let root = Cursor::root(DOCUMENT, &node);
    let fields = root.object(ROOT_FIELDS)?;
    if let Some(schema) = fields.optional("$schema") {
        schema.str()?;
    }
    // Nodes first: deployments refer to them.
    let mut nodes = BTreeMap::new();
    for (id, at) in fields.required("nodes")?.map()? {
        if let Err(e) = check_label("node id", id) {
            return Err(at.invalid(id, e.why).into());
        }
        nodes.insert(id.to_owned(), parse_node(&at)?);
    }

    let mut warnings = Vec::new();
    let mut microservices: Vec<CatalogService> = Vec::new();
    let mut paths: Vec<String> = Vec::new();
    for at in fields.required("microservices")?.array()? {
        let service = parse_service(&at, &nodes, &mut warnings)?;
        if let Some(i) = microservices.iter().position(|s| s.id == service.id) {
            return Err(CatalogError::DuplicateService {
                id: service.id,
                first: paths.swap_remove(i),
                second: at.path(),
            });
        }
        paths.push(at.path());
        microservices.push(service);
    }

    let mut environments = BTreeMap::new();
    if let Some(envs) = fields.optional("environments") {
        for (name, at) in envs.map()? {
            let env = Environment::from_str(name)
                .map_err(|_| at.invalid(name, "environment names are only dev and prod"))?;
            let config = parse_environment(env, &at, &nodes, &microservices)?;
            environments.insert(env, config);
        }
    }
    Ok(ParsedCatalog {
        catalog: Catalog {
            microservices,
            nodes,
            environments,
        },
        warnings,
    })
}

/// Reads and parses a `config.json` file, reading at most one byte past the limit.
pub fn load(path: &Path) -> Result<ParsedCatalog, CatalogError> {
    let read_err = |e: std::io::Error| CatalogError::Read {
        path: path.to_owned(),
        why: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CATALOG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    parse(&bytes)
}

fn parse_node(at: &Cursor<'_>) -> Result<NodeConfig, CatalogError> {
    let fields = at.object(NODE_FIELDS)?;
    let agent_at = fields.required("agent")?;
    let agent_str = agent_at.str()?;
    let agent = AgentId::new(agent_str).map_err(|e| agent_at.invalid(agent_str, e.why))?;
    let egress_at = fields.required("egress")?;
    let egress = match egress_at.str()? {
        "tunnel" => Egress::Tunnel,
        "direct" => Egress::Direct,
        other => {
            return Err(egress_at
                .invalid(other, "egress is \"tunnel\" or \"direct\"")
                .into());
        }
    };
    Ok(NodeConfig {
        agent,
        egress,
        kubeconfig: absolute_path(&fields, "kubeconfig")?,
        containerd_socket: absolute_path(&fields, "containerdSocket")?,
    })
}

fn absolute_path(fields: &Fields<'_>, key: &str) -> Result<Option<String>, CatalogError> {
    let Some(value) = fields.optional_str(key)? else {
        return Ok(None);
    };
    if !value.starts_with('/') || value.split('/').any(|p| p == "..") {
        return Err(fields
            .required(key)?
            .invalid(value, "it must be an absolute path without '..'")
            .into());
    }
    Ok(Some(value.to_owned()))
}

fn parse_service(
    at: &Cursor<'_>,
    nodes: &BTreeMap<String, NodeConfig>,
    warnings: &mut Vec<CatalogWarning>,
) -> Result<CatalogService, CatalogError> {
    let fields = at.object(SERVICE_FIELDS)?;
    let id = fields.required_str("id")?;
    if let Err(e) = check_label("service id", id) {
        return Err(fields.required("id")?.invalid(id, e.why).into());
    }
    let repository = fields.required("repository")?.object(REPOSITORY_FIELDS)?;
    let url = repository.required_str("url")?;
    if let Err(why) = document::check_repo_url(url) {
        return Err(repository.required("url")?.invalid(url, why).into());
    }
    if let Some(commit) = repository.optional("commitId") {
        warnings.push(CatalogWarning {
            path: commit.path(),
            value: commit.str()?.to_owned(),
            why: "deploy.json commitId is the only deployment version",
        });
    }
    let deployment = parse_deployment(fields.required("deployment")?, nodes)?;
    if id == K3SCTL_ADAPTER && deployment.mode == DeploymentMode::K3sctlManaged {
        let mode = fields.required("deployment")?.object(DEPLOYMENT_FIELDS)?;
        return Err(mode
            .required("mode")?
            .invalid(
                deployment.mode.as_str(),
                "k3sctl-adapter is the bridge that inspects and repairs k3s; it must stay a \
                 direct service outside k3s",
            )
            .into());
    }
    Ok(CatalogService {
        id: id.to_owned(),
        repository_url: url.to_owned(),
        deployment,
    })
}

fn parse_deployment(
    at: &Cursor<'_>,
    nodes: &BTreeMap<String, NodeConfig>,
) -> Result<Deployment, CatalogError> {
    let fields = at.object(DEPLOYMENT_FIELDS)?;
    let mode_at = fields.required("mode")?;
    let mode_str = mode_at.str()?;
    let mode = DeploymentMode::from_str(mode_str).map_err(|()| {
        mode_at.invalid(
            mode_str,
            "unknown mode: expected k3sctl-managed, unidesk-direct or internal-sidecar",
        )
    })?;
    let node = fields.required_str("node")?;
    if !nodes.contains_key(node) {
        let known: Vec<&str> = nodes.keys().map(String::as_str).collect();
        return Err(fields
            .required("node")?
            .invalid(
                node,
                format!("no such node in nodes (known: {})", known.join(", ")),
            )
            .into());
    }
    let repo_path = |key: &str| -> Result<Option<String>, CatalogError> {
        let Some(value) = fields.optional(key) else {
            return Ok(None);
        };
        let s = value.str()?;
        document::check_repo_path(s).map_err(|why| value.invalid(s, why))?;
        Ok(Some(s.to_owned()))
    };
    let dockerfile = repo_path("dockerfile")?;
    let context = repo_path("context")?;
    let image = match fields.optional("image") {
        None => None,
        Some(at) => Some(image_name(at)?),
    };
    if dockerfile.is_some() && image.is_none() {
        return Err(DocumentError::Missing {
            document: DOCUMENT,
            path: format!("{}.image", at.path()),
        }
        .into());
    }
    let build_base = fields
        .optional("buildBase")
        .map(parse_build_base)
        .transpose()?;
    let build_timeout_ms = match fields.optional("buildTimeoutMs") {
        None => None,
        Some(t) => {
            let ms = t.u64()?;
            if !(MIN_BUILD_TIMEOUT_MS..=MAX_BUILD_TIMEOUT_MS).contains(&ms) {
                return Err(t
                    .invalid(
                        &ms.to_string(),
                        format!(
                            "it must be between {MIN_BUILD_TIMEOUT_MS} (1 s) and \
                             {MAX_BUILD_TIMEOUT_MS} (4 h)"
                        ),
                    )
                    .into());
            }
            Some(ms)
        }
    };
    let health_url = match fields.optional("healthUrl") {
        None => None,
        Some(h) => {
            let s = h.str()?;
            let http = s.starts_with("http://") || s.starts_with("https://");
            if !http || document::check_repo_url(s).is_err() {
                return Err(h
                    .invalid(s, "it must be an http:// or https:// URL with a host")
                    .into());
            }
            Some(s.to_owned())
        }
    };
    let compose = fields.optional("compose").map(parse_compose).transpose()?;
    let k8s = fields.optional("k8s").map(parse_k8s).transpose()?;
    let legacy_container = fields.optional_str("legacyContainer")?.map(str::to_owned);
    let image_tag_by_environment = fields
        .optional("imageTagByEnvironment")
        .map(parse_image_tags)
        .transpose()?;

    let block = |key: &str| format!("{}.{key}", at.path());
    if mode.is_compose() {
        if compose.is_none() {
            return Err(CatalogError::ModeNeeds {
                path: block("compose"),
                mode,
            });
        }
        if k8s.is_some() {
            return Err(CatalogError::ModeForbids {
                path: block("k8s"),
                mode,
            });
        }
    } else {
        if k8s.is_none() {
            return Err(CatalogError::ModeNeeds {
                path: block("k8s"),
                mode,
            });
        }
        if compose.is_some() {
            return Err(CatalogError::ModeForbids {
                path: block("compose"),
                mode,
            });
        }
    }
    Ok(Deployment {
        mode,
        node: node.to_owned(),
        dockerfile,
        context,
        image,
        build_base,
        build_timeout_ms,
        health_url,
        compose,
        k8s,
        legacy_container,
        image_tag_by_environment,
    })
}

/// An image reference as Docker accepts it in lower case: `[registry/]name[:tag]`.
fn image_name(at: &Cursor<'_>) -> Result<String, CatalogError> {
    let s = at.non_empty_str()?;
    let ok = s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
        })
        && !s.starts_with(['/', ':', '-', '.'])
        && !s.ends_with(['/', ':']);
    if !ok {
        return Err(at
            .invalid(s, "an image is [registry/]name[:tag] in lower-case letters, digits, '.', '_', '-', '/' and ':'")
            .into());
    }
    Ok(s.to_owned())
}

fn parse_build_base(at: &Cursor<'_>) -> Result<BuildBaseConfig, CatalogError> {
    let fields = at.object(BUILD_BASE_FIELDS)?;
    let arg = fields.required_str("arg")?;
    let valid_arg = arg
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_arg {
        return Err(fields
            .required("arg")?
            .invalid(
                arg,
                "a build argument is letters, digits and '_', not starting with a digit",
            )
            .into());
    }
    let list = fields.required("candidates")?;
    let items = list.array()?;
    if items.is_empty() {
        return Err(list
            .invalid("[]", "list at least one candidate image")
            .into());
    }
    let candidates = items.iter().map(image_name).collect::<Result<_, _>>()?;
    Ok(BuildBaseConfig {
        arg: arg.to_owned(),
        candidates,
    })
}

fn parse_compose(at: &Cursor<'_>) -> Result<ComposeConfig, CatalogError> {
    let fields = at.object(COMPOSE_FIELDS)?;
    let project = fields.optional_str("project")?.map(str::to_owned);
    let service = fields.required_str("service")?.to_owned();
    Ok(ComposeConfig { project, service })
}

fn parse_k8s(at: &Cursor<'_>) -> Result<K8sConfig, CatalogError> {
    let fields = at.object(K8S_FIELDS)?;
    let manifest_at = fields.required("manifest")?;
    let manifest = manifest_at.non_empty_str()?;
    document::check_repo_path(manifest).map_err(|why| manifest_at.invalid(manifest, why))?;
    let deployments_at = fields.required("deployments")?;
    let mut deployments: Vec<K8sDeployment> = Vec::new();
    for item in deployments_at.array()? {
        let d = item.object(K8S_DEPLOYMENT_FIELDS)?;
        let name = k8s_name(&d, "name")?;
        if deployments.iter().any(|known| known.name == name) {
            return Err(item.invalid(&name, "a Deployment is listed twice").into());
        }
        deployments.push(K8sDeployment {
            name,
            container: k8s_name(&d, "container")?,
        });
    }
    if deployments.is_empty() {
        return Err(deployments_at
            .invalid("[]", "a k3s service needs at least one Deployment")
            .into());
    }
    let health = match fields.optional("health") {
        Some(h) => {
            let h = h.object(K8S_HEALTH_FIELDS)?;
            let path_at = h.required("path")?;
            let path = path_at.non_empty_str()?;
            if !path.starts_with('/') || path.contains("..") || path.contains(char::is_whitespace) {
                return Err(path_at
                    .invalid(path, "must be an absolute URL path without '..' or spaces")
                    .into());
            }
            Some(K8sHealth {
                service: k8s_name(&h, "service")?,
                port: port(&h)?,
                path: path.to_owned(),
            })
        }
        None => None,
    };
    let frontend_route = match fields.optional("frontendRoute") {
        Some(r) => {
            let r = r.object(K8S_ROUTE_FIELDS)?;
            Some(K8sServicePort {
                service: k8s_name(&r, "service")?,
                port: port(&r)?,
            })
        }
        None => None,
    };
    let rollout_timeout_ms = match fields.optional("rolloutTimeoutMs") {
        Some(t) => {
            let ms = t.u64()?;
            if ms == 0 || ms > MAX_ROLLOUT_TIMEOUT_MS {
                return Err(t
                    .invalid(&ms.to_string(), "must be between 1 and 3600000 (one hour)")
                    .into());
            }
            ms
        }
        None => DEFAULT_ROLLOUT_TIMEOUT_MS,
    };
    Ok(K8sConfig {
        manifest: manifest.to_owned(),
        namespace: k8s_name(&fields, "namespace")?,
        deployments,
        health,
        frontend_route,
        rollout_timeout_ms,
    })
}

/// A required Kubernetes object name (a DNS label).
fn k8s_name(fields: &Fields<'_>, key: &str) -> Result<String, CatalogError> {
    let value = fields.required(key)?;
    let s = value.str()?;
    check_label("kubernetes name", s).map_err(|e| value.invalid(s, e.why))?;
    Ok(s.to_owned())
}

/// A required TCP port (1–65535) under `port`.
fn port(fields: &Fields<'_>) -> Result<u16, CatalogError> {
    let at = fields.required("port")?;
    let n = at.u64()?;
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
        at.invalid(&n.to_string(), "must be a TCP port, 1 to 65535")
            .into()
    })
}

fn parse_image_tags(at: &Cursor<'_>) -> Result<ImageTags, CatalogError> {
    let fields = at.object(IMAGE_TAG_FIELDS)?;
    let tag = |key: &str| -> Result<Option<String>, CatalogError> {
        let Some(value) = fields.optional(key) else {
            return Ok(None);
        };
        let s = value.str()?;
        let ok = !s.is_empty()
            && s.len() <= 128
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(value
                .invalid(
                    s,
                    "an image tag is letters, digits, '.', '_' and '-', at most 128",
                )
                .into());
        }
        Ok(Some(s.to_owned()))
    };
    Ok(ImageTags {
        dev: tag("dev")?,
        prod: tag("prod")?,
    })
}

fn parse_environment(
    env: Environment,
    at: &Cursor<'_>,
    nodes: &BTreeMap<String, NodeConfig>,
    microservices: &[CatalogService],
) -> Result<EnvironmentConfig, CatalogError> {
    let fields = at.object(ENVIRONMENT_FIELDS)?;
    let namespace_at = fields.required("namespace")?;
    let namespace = namespace_at.str()?;
    check_label("namespace", namespace).map_err(|e| namespace_at.invalid(namespace, e.why))?;
    let database_fingerprint = fields.required_str("databaseFingerprint")?.to_owned();
    let provider_identity = fields.required_str("providerIdentity")?.to_owned();
    let known = |id: &str| microservices.iter().any(|s| s.id == id);

    let mut deployments = BTreeMap::new();
    if let Some(map) = fields.optional("deployments") {
        for (id, d_at) in map.map()? {
            if !known(id) {
                return Err(d_at
                    .invalid(id, "no microservice with this id in microservices")
                    .into());
            }
            let deployment = parse_deployment(&d_at, nodes)?;
            let d_fields = d_at.object(DEPLOYMENT_FIELDS)?;
            if env == Environment::Dev && deployment.mode.is_compose() {
                // Compose services on a node are the production ones; dev lives in k3s only.
                return Err(d_fields
                    .required("mode")?
                    .invalid(
                        deployment.mode.as_str(),
                        "dev deployments must be k3sctl-managed in the dev namespace, \
                         never a node's (production) Compose service",
                    )
                    .into());
            }
            if id == K3SCTL_ADAPTER && deployment.mode == DeploymentMode::K3sctlManaged {
                return Err(d_fields
                    .required("mode")?
                    .invalid(
                        deployment.mode.as_str(),
                        "k3sctl-adapter must stay a direct service outside k3s",
                    )
                    .into());
            }
            if let Some(k8s) = &deployment.k8s
                && k8s.namespace != namespace
            {
                let ns = d_fields.required("k8s")?.object(K8S_FIELDS)?;
                return Err(ns
                    .required("namespace")?
                    .invalid(
                        &k8s.namespace,
                        format!("environments.{env} deployments must use namespace {namespace}"),
                    )
                    .into());
            }
            deployments.insert(id.to_owned(), deployment);
        }
    }

    let mut apply_services: Vec<String> = Vec::new();
    if let Some(list) = fields.optional("applyServices") {
        let items = list.array()?;
        if env == Environment::Prod && !items.is_empty() {
            let names: Vec<&str> = items.iter().filter_map(|i| i.str().ok()).collect();
            return Err(list
                .invalid(
                    &names.join(", "),
                    "deploy apply --env prod is disabled by the program; prod applyServices must \
                     be empty",
                )
                .into());
        }
        for item in &items {
            let id = item.non_empty_str()?;
            if !known(id) {
                return Err(item
                    .invalid(id, "no microservice with this id in microservices")
                    .into());
            }
            if apply_services.iter().any(|s| s == id) {
                return Err(item.invalid(id, "listed twice").into());
            }
            if !deployments.contains_key(id) {
                return Err(item
                    .invalid(
                        id,
                        format!("it has no environments.{env}.deployments entry to apply"),
                    )
                    .into());
            }
            apply_services.push(id.to_owned());
        }
    }
    let foundation = match fields.optional("foundation") {
        None => None,
        Some(at) => {
            let f = at.object(FOUNDATION_FIELDS)?;
            let manifest_at = f.required("manifest")?;
            let manifest = manifest_at.non_empty_str()?;
            document::check_repo_path(manifest)
                .map_err(|why| manifest_at.invalid(manifest, why))?;
            let allowed_objects = object_refs(f.required("allowedObjects")?)?;
            if allowed_objects.is_empty() {
                return Err(f
                    .required("allowedObjects")?
                    .invalid("[]", "a foundation manifest must be allowed some object")
                    .into());
            }
            Some(Foundation {
                manifest: manifest.to_owned(),
                allowed_objects,
            })
        }
    };
    let host_network_allowed = match fields.optional("hostNetworkAllowed") {
        None => Vec::new(),
        Some(at) => object_refs(at)?,
    };
    Ok(EnvironmentConfig {
        namespace: namespace.to_owned(),
        database_fingerprint,
        provider_identity,
        apply_services,
        deployments,
        foundation,
        host_network_allowed,
    })
}

/// A list of `Kind/name` object references, each well-formed and listed once.
fn object_refs(at: &Cursor<'_>) -> Result<Vec<String>, CatalogError> {
    let mut refs: Vec<String> = Vec::new();
    for item in at.array()? {
        let value = item.non_empty_str()?;
        let well_formed = value.split_once('/').is_some_and(|(kind, name)| {
            kind.starts_with(|c: char| c.is_ascii_uppercase())
                && kind.chars().all(|c| c.is_ascii_alphanumeric())
                && !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        });
        if !well_formed {
            return Err(item
                .invalid(
                    value,
                    "expected Kind/name, e.g. ConfigMap/unidesk-dev-runtime-config",
                )
                .into());
        }
        if refs.iter().any(|r| r == value) {
            return Err(item.invalid(value, "listed twice").into());
        }
        refs.push(value.to_owned());
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid config to mutate: one direct service, one k3s service, two nodes, dev and prod.
    fn base() -> serde_json::Value {
        serde_json::json!({
            "$schema": "./schemas/config.schema.json",
            "microservices": [
                {
                    "id": "web",
                    "repository": {"url": "https://github.com/x/web"},
                    "deployment": {
                        "mode": "unidesk-direct",
                        "node": "main-server",
                        "dockerfile": "Dockerfile",
                        "image": "web:latest",
                        "compose": {"project": "unidesk", "service": "web"}
                    }
                },
                {
                    "id": "api",
                    "repository": {"url": "https://github.com/x/api"},
                    "deployment": {
                        "mode": "k3sctl-managed",
                        "node": "d601",
                        "dockerfile": "api/Dockerfile",
                        "context": "api",
                        "image": "api:d601",
                        "k8s": {"manifest": "k3s/api.yaml", "namespace": "unidesk",
                                "deployments": [{"name": "api", "container": "api"}]}
                    }
                }
            ],
            "nodes": {
                "main-server": {"agent": "main-server", "egress": "direct"},
                "d601": {"agent": "d601", "egress": "tunnel",
                         "kubeconfig": "/etc/rancher/k3s/k3s.yaml"}
            },
            "environments": {
                "dev": {
                    "namespace": "unidesk-dev",
                    "databaseFingerprint": "postgres-dev/unidesk_dev",
                    "providerIdentity": "D601-dev",
                    "applyServices": ["api"],
                    "deployments": {
                        "api": {
                            "mode": "k3sctl-managed",
                            "node": "d601",
                            "dockerfile": "api/Dockerfile",
                            "image": "api:dev",
                            "k8s": {"manifest": "k3s/dev/api.yaml", "namespace": "unidesk-dev",
                                    "deployments": [{"name": "api-dev", "container": "api"}]}
                        }
                    }
                },
                "prod": {
                    "namespace": "unidesk",
                    "databaseFingerprint": "postgres/unidesk",
                    "providerIdentity": "D601"
                }
            }
        })
    }

    fn parse_value(v: &serde_json::Value) -> Result<ParsedCatalog, CatalogError> {
        parse(&serde_json::to_vec(v).unwrap())
    }

    /// Sets the value at a `/`-separated pointer, creating nothing.
    fn set(v: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
        *v.pointer_mut(pointer)
            .unwrap_or_else(|| panic!("no {pointer}")) = value;
    }

    /// Adds `key` to the object at `pointer`.
    fn insert(v: &mut serde_json::Value, pointer: &str, key: &str, value: serde_json::Value) {
        v.pointer_mut(pointer)
            .and_then(|o| o.as_object_mut())
            .unwrap_or_else(|| panic!("no object at {pointer}"))
            .insert(key.to_owned(), value);
    }

    fn remove(v: &mut serde_json::Value, pointer: &str, key: &str) {
        v.pointer_mut(pointer)
            .and_then(|o| o.as_object_mut())
            .and_then(|o| o.remove(key))
            .unwrap_or_else(|| panic!("no {pointer}/{key}"));
    }

    #[test]
    fn the_base_config_is_valid() {
        let parsed = parse_value(&base()).unwrap();
        assert!(parsed.warnings.is_empty());
        let c = parsed.catalog;
        assert_eq!(c.microservices.len(), 2);
        assert_eq!(c.node("d601").unwrap().egress, Egress::Tunnel);
        assert_eq!(
            c.environment(Environment::Dev).unwrap().apply_services,
            ["api"]
        );
        assert_eq!(
            c.deployment_for("api", Some(Environment::Dev))
                .unwrap()
                .k8s
                .as_ref()
                .unwrap()
                .namespace,
            "unidesk-dev"
        );
        assert_eq!(
            c.deployment_for("api", Some(Environment::Prod))
                .unwrap()
                .image
                .as_deref(),
            Some("api:d601")
        );
        // No dev deployment means none, never the production one.
        assert!(c.deployment_for("web", Some(Environment::Dev)).is_none());
        assert!(c.deployment_for("web", None).is_some());
        assert!(c.deployment_for("nope", None).is_none());
    }

    #[test]
    fn repository_commit_id_is_ignored_with_a_warning() {
        let mut v = base();
        set(
            &mut v,
            "/microservices/0/repository",
            serde_json::json!({"url": "https://github.com/x/web", "commitId": "abc123"}),
        );
        let parsed = parse_value(&v).unwrap();
        assert_eq!(parsed.warnings.len(), 1);
        assert_eq!(
            parsed.warnings[0].to_string(),
            "config.json: microservices[0].repository.commitId=\"abc123\" is ignored: \
             deploy.json commitId is the only deployment version"
        );
        assert_eq!(parsed.catalog, parse_value(&base()).unwrap().catalog);
    }

    #[test]
    fn image_tag_by_environment_replaces_the_tag() {
        let mut d = parse_value(&base()).unwrap().catalog.microservices[1]
            .deployment
            .clone();
        d.image_tag_by_environment = Some(ImageTags {
            dev: Some("dev".into()),
            prod: None,
        });
        assert_eq!(
            d.image_for(Some(Environment::Dev)).as_deref(),
            Some("api:dev")
        );
        assert_eq!(
            d.image_for(Some(Environment::Prod)).as_deref(),
            Some("api:d601")
        );
        assert_eq!(d.image_for(None).as_deref(), Some("api:d601"));
        d.image = Some("localhost:5000/team/api".into());
        assert_eq!(
            d.image_for(Some(Environment::Dev)).as_deref(),
            Some("localhost:5000/team/api:dev")
        );
    }

    /// Each invalid config with the JSON path and the words its error must carry.
    #[test]
    fn invalid_configs_name_path_and_reason() {
        use serde_json::json;
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit, &str, &str)> = vec![
            (
                "unknown mode",
                Box::new(|v| set(v, "/microservices/0/deployment/mode", json!("docker-run"))),
                "microservices[0].deployment.mode",
                "mode=\"docker-run\" is not valid: unknown mode",
            ),
            (
                "node not in nodes",
                Box::new(|v| set(v, "/microservices/1/deployment/node", json!("d999"))),
                "microservices[1].deployment.node",
                "no such node in nodes (known: d601, main-server)",
            ),
            (
                "k3sctl-adapter under k3s",
                Box::new(|v| set(v, "/microservices/1/id", json!("k3sctl-adapter"))),
                "microservices[1].deployment.mode",
                "must stay a direct service outside k3s",
            ),
            (
                "k3s without k8s block",
                Box::new(|v| remove(v, "/microservices/1/deployment", "k8s")),
                "microservices[1].deployment.k8s",
                "microservices[1].deployment.k8s is required when deployment.mode is k3sctl-managed",
            ),
            (
                "k8s deployment listed twice",
                Box::new(|v| {
                    set(
                        v,
                        "/microservices/1/deployment/k8s/deployments",
                        json!([{"name": "api", "container": "api"}, {"name": "api", "container": "x"}]),
                    )
                }),
                "microservices[1].deployment.k8s.deployments[1]",
                "a Deployment is listed twice",
            ),
            (
                "k8s without deployments",
                Box::new(|v| set(v, "/microservices/1/deployment/k8s/deployments", json!([]))),
                "microservices[1].deployment.k8s.deployments",
                "needs at least one Deployment",
            ),
            (
                "k8s health port out of range",
                Box::new(|v| {
                    insert(
                        v,
                        "/microservices/1/deployment/k8s",
                        "health",
                        json!({"service": "api", "port": 70000, "path": "/health"}),
                    )
                }),
                "microservices[1].deployment.k8s.health.port",
                "must be a TCP port",
            ),
            (
                "k8s health path escapes",
                Box::new(|v| {
                    insert(
                        v,
                        "/microservices/1/deployment/k8s",
                        "health",
                        json!({"service": "api", "port": 80, "path": "/../admin"}),
                    )
                }),
                "microservices[1].deployment.k8s.health.path",
                "without '..'",
            ),
            (
                "k8s rollout timeout too long",
                Box::new(|v| {
                    insert(
                        v,
                        "/microservices/1/deployment/k8s",
                        "rolloutTimeoutMs",
                        json!(7_200_000),
                    )
                }),
                "microservices[1].deployment.k8s.rolloutTimeoutMs",
                "between 1 and 3600000",
            ),
            (
                "k8s frontend route without port",
                Box::new(|v| {
                    insert(
                        v,
                        "/microservices/1/deployment/k8s",
                        "frontendRoute",
                        json!({"service": "frontend"}),
                    )
                }),
                "microservices[1].deployment.k8s.frontendRoute.port",
                "required",
            ),
            (
                "compose mode without compose block",
                Box::new(|v| remove(v, "/microservices/0/deployment", "compose")),
                "microservices[0].deployment.compose",
                "is required when deployment.mode is unidesk-direct",
            ),
            (
                "sidecar without compose block",
                Box::new(|v| {
                    set(
                        v,
                        "/microservices/0/deployment/mode",
                        json!("internal-sidecar"),
                    );
                    remove(v, "/microservices/0/deployment", "compose");
                }),
                "microservices[0].deployment.compose",
                "is required when deployment.mode is internal-sidecar",
            ),
            (
                "compose mode with k8s block",
                Box::new(|v| {
                    let k8s = v
                        .pointer("/microservices/1/deployment/k8s")
                        .unwrap()
                        .clone();
                    v.pointer_mut("/microservices/0/deployment")
                        .unwrap()
                        .as_object_mut()
                        .unwrap()
                        .insert("k8s".into(), k8s);
                }),
                "microservices[0].deployment.k8s",
                "must not be set when deployment.mode is unidesk-direct",
            ),
            (
                "duplicate ids",
                Box::new(|v| set(v, "/microservices/1/id", json!("web"))),
                "microservices[1]",
                "duplicate microservice id \"web\" at microservices[0] and microservices[1]",
            ),
            (
                "environment staging",
                Box::new(|v| {
                    let dev = v["environments"]["prod"].clone();
                    v["environments"]
                        .as_object_mut()
                        .unwrap()
                        .insert("staging".into(), dev);
                }),
                "environments.staging",
                "environment names are only dev and prod",
            ),
            (
                "prod apply services",
                Box::new(|v| {
                    set(
                        v,
                        "/environments/prod",
                        json!({
                    "namespace": "unidesk", "databaseFingerprint": "f", "providerIdentity": "p",
                    "applyServices": ["web"]}),
                    )
                }),
                "environments.prod.applyServices",
                "deploy apply --env prod is disabled by the program",
            ),
            (
                "dev apply service unknown",
                Box::new(|v| {
                    set(
                        v,
                        "/environments/dev/applyServices",
                        json!(["api", "ghost"]),
                    )
                }),
                "environments.dev.applyServices[1]",
                "applyServices[1]=\"ghost\" is not valid: no microservice with this id",
            ),
            (
                "dev apply service without dev deployment",
                Box::new(|v| set(v, "/environments/dev/applyServices", json!(["web"]))),
                "environments.dev.applyServices[0]",
                "it has no environments.dev.deployments entry to apply",
            ),
            (
                "dev deployment in the prod namespace",
                Box::new(|v| {
                    set(
                        v,
                        "/environments/dev/deployments/api/k8s/namespace",
                        json!("unidesk"),
                    )
                }),
                "environments.dev.deployments.api.k8s.namespace",
                "environments.dev deployments must use namespace unidesk-dev",
            ),
            (
                "foundation manifest escaping the repository",
                Box::new(|v| {
                    insert(
                        v,
                        "/environments/dev",
                        "foundation",
                        json!({"manifest": "../foundation.yaml", "allowedObjects": ["Namespace/unidesk-dev"]}),
                    )
                }),
                "environments.dev.foundation.manifest",
                "\"../foundation.yaml\"",
            ),
            (
                "foundation allowed object without a kind",
                Box::new(|v| {
                    insert(
                        v,
                        "/environments/dev",
                        "foundation",
                        json!({"manifest": "k3s/dev/foundation.yaml", "allowedObjects": ["Namespace/unidesk-dev", "postgres-dev"]}),
                    )
                }),
                "environments.dev.foundation.allowedObjects[1]",
                "expected Kind/name",
            ),
            (
                "foundation with no allowed object",
                Box::new(|v| {
                    insert(
                        v,
                        "/environments/dev",
                        "foundation",
                        json!({"manifest": "k3s/dev/foundation.yaml", "allowedObjects": []}),
                    )
                }),
                "environments.dev.foundation.allowedObjects",
                "must be allowed some object",
            ),
            (
                "foundation unknown field",
                Box::new(|v| {
                    insert(
                        v,
                        "/environments/dev",
                        "foundation",
                        json!({"manifest": "k3s/dev/foundation.yaml", "allowedObjects": ["Namespace/unidesk-dev"], "namespaces": ["unidesk"]}),
                    )
                }),
                "environments.dev.foundation.namespaces",
                "unknown field",
            ),
            (
                "host network allowance listed twice",
                Box::new(|v| {
                    insert(
                        v,
                        "/environments/dev",
                        "hostNetworkAllowed",
                        json!(["Deployment/egress-proxy-dev", "Deployment/egress-proxy-dev"]),
                    )
                }),
                "environments.dev.hostNetworkAllowed[1]",
                "listed twice",
            ),
            (
                "dev deployment on compose",
                Box::new(|v| {
                    let web = v["microservices"][0]["deployment"].clone();
                    set(v, "/environments/dev/deployments", json!({"web": web}));
                    set(v, "/environments/dev/applyServices", json!([]));
                }),
                "environments.dev.deployments.web.mode",
                "dev deployments must be k3sctl-managed",
            ),
            (
                "unknown deployment field",
                Box::new(|v| {
                    v["microservices"][0]["deployment"]
                        .as_object_mut()
                        .unwrap()
                        .insert("ports".into(), json!([80]));
                }),
                "microservices[0].deployment.ports",
                "unknown field microservices[0].deployment.ports (allowed here: mode, node,",
            ),
            (
                "unknown root field",
                Box::new(|v| {
                    v.as_object_mut()
                        .unwrap()
                        .insert("deployRefs".into(), json!({}));
                }),
                "deployRefs",
                "unknown field deployRefs",
            ),
            (
                "bad egress",
                Box::new(|v| set(v, "/nodes/d601/egress", json!("socks"))),
                "nodes.d601.egress",
                "egress is \"tunnel\" or \"direct\"",
            ),
            (
                "bad agent id",
                Box::new(|v| set(v, "/nodes/d601/agent", json!("D601"))),
                "nodes.d601.agent",
                "only lower-case letters",
            ),
            (
                "relative kubeconfig",
                Box::new(|v| set(v, "/nodes/d601/kubeconfig", json!("k3s.yaml"))),
                "nodes.d601.kubeconfig",
                "absolute path",
            ),
            (
                "dockerfile escapes the repository",
                Box::new(|v| {
                    set(
                        v,
                        "/microservices/0/deployment/dockerfile",
                        json!("../Dockerfile"),
                    )
                }),
                "microservices[0].deployment.dockerfile",
                "it must not contain '..'",
            ),
            (
                "dockerfile without image",
                Box::new(|v| remove(v, "/microservices/0/deployment", "image")),
                "microservices[0].deployment.image",
                "missing required field microservices[0].deployment.image",
            ),
            (
                "upper-case image",
                Box::new(|v| set(v, "/microservices/0/deployment/image", json!("Web:latest"))),
                "microservices[0].deployment.image",
                "an image is [registry/]name[:tag]",
            ),
            (
                "build timeout too long",
                Box::new(|v| {
                    v["microservices"][0]["deployment"]["buildTimeoutMs"] = json!(14_400_001);
                }),
                "microservices[0].deployment.buildTimeoutMs",
                "between 1000 (1 s) and 14400000 (4 h)",
            ),
            (
                "build base without candidates",
                Box::new(|v| {
                    v["microservices"][0]["deployment"]["buildBase"] =
                        json!({"arg": "BASE", "candidates": []});
                }),
                "microservices[0].deployment.buildBase.candidates",
                "list at least one candidate image",
            ),
            (
                "health url not http",
                Box::new(|v| {
                    v["microservices"][0]["deployment"]["healthUrl"] = json!("/health");
                }),
                "microservices[0].deployment.healthUrl",
                "http:// or https:// URL",
            ),
            (
                "k8s namespace not a label",
                Box::new(|v| {
                    set(
                        v,
                        "/microservices/1/deployment/k8s/namespace",
                        json!("Uni_Desk"),
                    )
                }),
                "microservices[1].deployment.k8s.namespace",
                "only lower-case letters",
            ),
            (
                "compose service wrong type",
                Box::new(|v| set(v, "/microservices/0/deployment/compose/service", json!(7))),
                "microservices[0].deployment.compose.service",
                "must be a string, found number 7",
            ),
            (
                "missing nodes",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("nodes");
                }),
                "nodes",
                "missing required field nodes",
            ),
            (
                "repository commit not a string",
                Box::new(|v| v["microservices"][0]["repository"]["commitId"] = json!(1)),
                "microservices[0].repository.commitId",
                "must be a string",
            ),
        ];
        for (name, edit, path, words) in cases {
            let mut v = base();
            edit(&mut v);
            let err = parse_value(&v)
                .err()
                .unwrap_or_else(|| panic!("{name}: accepted {v}"));
            assert_eq!(err.path(), Some(path), "{name}: {err}");
            let message = err.to_string();
            assert!(
                message.contains(words),
                "{name}: {message:?} lacks {words:?}"
            );
            assert!(!message.ends_with('.'), "{name}: {message}");
        }
    }

    /// The JSON Schema documents exactly the fields the parser accepts.
    #[test]
    fn schema_file_matches_the_parser() {
        let schema: serde_json::Value =
            serde_json::from_slice(include_bytes!("../../../schemas/config.schema.json")).unwrap();
        let keys = |pointer: &str| -> Vec<String> {
            let mut k: Vec<String> = schema
                .pointer(pointer)
                .and_then(|p| p.as_object())
                .unwrap_or_else(|| panic!("schema has no {pointer}"))
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        let sorted = |fields: &[&str]| -> Vec<String> {
            let mut k: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        for (pointer, fields) in [
            ("/properties", ROOT_FIELDS),
            ("/$defs/microservice/properties", SERVICE_FIELDS),
            ("/$defs/repository/properties", REPOSITORY_FIELDS),
            ("/$defs/deployment/properties", DEPLOYMENT_FIELDS),
            ("/$defs/buildBase/properties", BUILD_BASE_FIELDS),
            ("/$defs/compose/properties", COMPOSE_FIELDS),
            ("/$defs/k8s/properties", K8S_FIELDS),
            (
                "/$defs/k8s/properties/deployments/items/properties",
                K8S_DEPLOYMENT_FIELDS,
            ),
            ("/$defs/k8s/properties/health/properties", K8S_HEALTH_FIELDS),
            (
                "/$defs/k8s/properties/frontendRoute/properties",
                K8S_ROUTE_FIELDS,
            ),
            ("/$defs/imageTags/properties", IMAGE_TAG_FIELDS),
            ("/$defs/node/properties", NODE_FIELDS),
            ("/$defs/environment/properties", ENVIRONMENT_FIELDS),
        ] {
            assert_eq!(keys(pointer), sorted(fields), "{pointer}");
            let parent = pointer.trim_end_matches("/properties");
            let closed = schema
                .pointer(&format!("{parent}/additionalProperties"))
                .and_then(|v| v.as_bool());
            assert_eq!(
                closed,
                Some(false),
                "{parent} must forbid additional properties"
            );
        }
        let modes = schema
            .pointer("/$defs/deployment/properties/mode/enum")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(modes.len(), 3);
        for m in modes {
            assert!(DeploymentMode::from_str(m.as_str().unwrap()).is_ok());
        }
    }
}
