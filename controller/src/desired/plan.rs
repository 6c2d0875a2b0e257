//! The planner: `deploy.json` services joined with the `config.json` catalog and the observed
//! live state give, per service, what would happen (`noop`, `deploy`, `unsupported`, or
//! `unknown` with the reason), plus the guards an apply must pass and the typed launch spec.
//!
//! Everything here is a pure function of its arguments. It must not ask agents, read files,
//! fetch Git or resolve commits; the callers do, and pass the results in. It never chooses
//! `deploy` when it could not see the live state.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use unidesk_protocol::{
    AgentId, BuildBase, DeploySpec, ExecutorSpec, K3sDeployment, K3sHealth, K3sServicePort,
    K3sSpec, LiveLookup, LiveService, LiveTarget,
};

use super::catalog::{Catalog, Deployment, DeploymentMode, K8sConfig};
use super::manifest::{Environment, ServiceEntry};

/// Build deadline used when the catalog gives none: 30 minutes.
pub const DEFAULT_BUILD_TIMEOUT_MS: u64 = 30 * 60 * 1_000;

/// What an agent reported about one service, or why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The agent answered. `commit` is the full SHA the running service proves (image label
    /// or Deployment annotation); `None` when nothing runs or nothing is stamped.
    Live { commit: Option<String> },
    /// The node's agent could not be asked.
    Unreachable { reason: String },
    /// The agent was asked but could not read this service's live state.
    Failed { agent: AgentId, reason: String },
}

/// The live state of the services, by service id. A service absent here was not observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveState {
    pub services: BTreeMap<String, Observation>,
}

impl LiveState {
    /// Records what was observed for `service`.
    pub fn observe(&mut self, service: impl Into<String>, observation: Observation) {
        self.services.insert(service.into(), observation);
    }
}

/// The intended action for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Action {
    /// The live service already runs the requested commit.
    Noop,
    /// The live service runs another commit, or nothing.
    Deploy,
    /// The planner cannot manage the service (no Dockerfile, no deployment in this
    /// environment).
    Unsupported { reason: String },
    /// The live state could not be seen; never treated as `deploy`.
    Unknown { reason: String },
}

impl Action {
    /// The action's name as printed: `noop`, `deploy`, `unsupported` or `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Noop => "noop",
            Action::Deploy => "deploy",
            Action::Unsupported { .. } => "unsupported",
            Action::Unknown { .. } => "unknown",
        }
    }
}

/// One line of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedService {
    pub id: String,
    /// Repository from `deploy.json`, the version authority.
    pub repo: String,
    pub requested_commit: String,
    /// The full SHA when already known (a full `commitId`); short ones resolve on the node.
    pub resolved_commit: Option<String>,
    pub node: Option<String>,
    pub agent: Option<AgentId>,
    pub mode: Option<DeploymentMode>,
    /// The Kubernetes namespace a k3s service is applied to.
    pub namespace: Option<String>,
    /// The image that would be built.
    pub image: Option<String>,
    pub live_commit: Option<String>,
    #[serde(flatten)]
    pub action: Action,
    /// The environment this line was planned for (also on the [`Plan`]).
    #[serde(skip)]
    pub environment: Option<Environment>,
    /// The deployment this line uses, when there is one.
    #[serde(skip)]
    pub deployment: Option<Deployment>,
}

/// A whole plan: the environment facts and one line per service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub environment: Option<Environment>,
    /// The fixed desired-state ref of the environment.
    pub desired_ref: Option<&'static str>,
    pub namespace: Option<String>,
    pub database_fingerprint: Option<String>,
    pub provider_identity: Option<String>,
    pub services: Vec<PlannedService>,
}

/// One service an apply guard refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub service: String,
    pub why: String,
}

/// Refusals shown as `a (why); b (why)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusals(pub Vec<Refusal>);

impl fmt::Display for Refusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{} ({})", r.service, r.why)?;
        }
        Ok(())
    }
}

/// A plan or apply that cannot go ahead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `deploy.json` lists a service `config.json` does not describe.
    #[error("deploy.json {path}: service {id:?} is not in config.json microservices")]
    ServiceNotInConfig { id: String, path: String },
    /// `--service` names a service the manifest does not list.
    #[error("--service {id:?} is not in deploy.json (it lists: {listed})")]
    ServiceNotInManifest { id: String, listed: String },
    /// Any `--env prod` apply.
    #[error(
        "deploy apply --env prod is disabled: the production executor and authorization policy \
         do not exist yet, and no config value, flag or manifest field enables it"
    )]
    ProdApplyDisabled,
    /// The apply set holds services the guards refuse.
    #[error("{command} refused before any change: {refused}; narrow the set with --service")]
    ApplyRefused { command: String, refused: Refusals },
    /// The plan was made for another environment than the apply names.
    #[error("the plan is for {planned} but the apply is for {requested}")]
    EnvironmentMismatch { planned: String, requested: String },
    /// The service cannot be turned into a launch spec.
    #[error("service {service:?} cannot be deployed: {why}")]
    NotDeployable { service: String, why: String },
}

fn env_name(env: Option<Environment>) -> String {
    match env {
        Some(e) => format!("--env {e}"),
        None => "the local file".to_owned(),
    }
}

fn is_full_sha(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Plans `manifest_services` (already chosen for `env`) against `catalog` and `live`.
///
/// Every manifest service must be in the catalog, even when `filter` narrows the plan to one
/// service: an inconsistent manifest is an error, not a partial plan.
pub fn plan(
    manifest_services: &[ServiceEntry],
    catalog: &Catalog,
    env: Option<Environment>,
    filter: Option<&str>,
    live: &LiveState,
) -> Result<Plan, PlanError> {
    for (i, entry) in manifest_services.iter().enumerate() {
        if catalog.service(&entry.id).is_none() {
            return Err(PlanError::ServiceNotInConfig {
                id: entry.id.clone(),
                path: format!("services[{i}]"),
            });
        }
    }
    if let Some(id) = filter
        && !manifest_services.iter().any(|s| s.id == id)
    {
        return Err(not_in_manifest(
            id,
            manifest_services.iter().map(|s| s.id.as_str()),
        ));
    }
    let services = manifest_services
        .iter()
        .filter(|s| filter.is_none_or(|id| s.id == id))
        .map(|entry| plan_service(entry, catalog, env, live))
        .collect();
    let env_config = env.and_then(|e| catalog.environment(e));
    Ok(Plan {
        environment: env,
        desired_ref: env.map(Environment::desired_ref),
        namespace: env_config.map(|c| c.namespace.clone()),
        database_fingerprint: env_config.map(|c| c.database_fingerprint.clone()),
        provider_identity: env_config.map(|c| c.provider_identity.clone()),
        services,
    })
}

fn not_in_manifest<'a>(id: &str, listed: impl Iterator<Item = &'a str>) -> PlanError {
    let listed: Vec<&str> = listed.collect();
    PlanError::ServiceNotInManifest {
        id: id.to_owned(),
        listed: if listed.is_empty() {
            "nothing".to_owned()
        } else {
            listed.join(", ")
        },
    }
}

fn plan_service(
    entry: &ServiceEntry,
    catalog: &Catalog,
    env: Option<Environment>,
    live: &LiveState,
) -> PlannedService {
    let mut line = PlannedService {
        id: entry.id.clone(),
        repo: entry.repo.clone(),
        requested_commit: entry.commit_id.clone(),
        resolved_commit: entry.full_commit().map(str::to_owned),
        node: None,
        agent: None,
        mode: None,
        namespace: None,
        image: None,
        live_commit: None,
        action: Action::Deploy,
        environment: env,
        deployment: None,
    };
    let Some(deployment) = catalog.deployment_for(&entry.id, env) else {
        let env = env.map_or_else(|| "the base".to_owned(), |e| e.to_string());
        line.action = Action::Unsupported {
            reason: format!(
                "config.json has no {env} deployment for {id} (environments.{env}.deployments.{id})",
                id = entry.id
            ),
        };
        return line;
    };
    let node = catalog.node(&deployment.node);
    line.node = Some(deployment.node.clone());
    line.agent = node.map(|n| n.agent.clone());
    line.mode = Some(deployment.mode);
    line.namespace = deployment.k8s.as_ref().map(|k| k.namespace.clone());
    line.image = deployment.image_for(env);
    line.deployment = Some(deployment.clone());

    line.action = if deployment.dockerfile.is_none() {
        Action::Unsupported {
            reason: "no Dockerfile source artifact: an image-only service must be wrapped in a \
                     source repository with a Dockerfile before it can be built on its node"
                .to_owned(),
        }
    } else if node.is_none() {
        Action::Unknown {
            reason: format!("node {:?} is not in config.json nodes", deployment.node),
        }
    } else {
        match live.services.get(&entry.id) {
            None => Action::Unknown {
                reason: "the live state of this service was not observed".to_owned(),
            },
            Some(Observation::Unreachable { reason }) => Action::Unknown {
                reason: format!(
                    "node {} (agent {}) cannot be asked: {reason}",
                    deployment.node,
                    line.agent.as_ref().map_or("?", AgentId::as_str)
                ),
            },
            Some(Observation::Failed { agent, reason }) => Action::Unknown {
                reason: format!("agent {agent} could not read the live state: {reason}"),
            },
            Some(Observation::Live { commit: None }) => Action::Deploy,
            Some(Observation::Live {
                commit: Some(commit),
            }) => {
                line.live_commit = Some(commit.clone());
                if !is_full_sha(commit) {
                    Action::Unknown {
                        reason: format!("the live commit {commit:?} is not a full 40-hex SHA"),
                    }
                } else if commit.starts_with(&entry.commit_id) {
                    Action::Noop
                } else {
                    Action::Deploy
                }
            }
        }
    };
    line
}

/// What `deploy check|plan` asks each agent: per agent, the live-state targets of its plan
/// lines, in plan order. Lines that are unsupported, have no agent, or whose deployment names
/// no Compose service or k8s block are not asked (they stay unknown or unsupported).
pub fn live_queries(plan: &Plan) -> BTreeMap<AgentId, Vec<LiveTarget>> {
    let mut queries: BTreeMap<AgentId, Vec<LiveTarget>> = BTreeMap::new();
    for line in &plan.services {
        if matches!(line.action, Action::Unsupported { .. }) {
            continue;
        }
        let (Some(agent), Some(deployment)) = (&line.agent, &line.deployment) else {
            continue;
        };
        let lookup = match (deployment.mode, &deployment.compose, &deployment.k8s) {
            (DeploymentMode::K3sctlManaged, _, Some(k8s)) => LiveLookup::K3s {
                namespace: k8s.namespace.clone(),
                deployments: k3s_deployments(k8s),
            },
            (DeploymentMode::K3sctlManaged, _, None) => continue,
            (_, Some(compose), _) => LiveLookup::Compose {
                project: compose.project.clone(),
                service: compose.service.clone(),
            },
            (_, None, _) => continue,
        };
        queries.entry(agent.clone()).or_default().push(LiveTarget {
            service_id: line.id.clone(),
            lookup,
        });
    }
    queries
}

/// Records in `live` what `agent` answered for the targets it was `asked`: `Ok` with one
/// entry per service, or `Err` with why the agent could not be asked (not connected, no
/// controller, no answer in time). A service the answer leaves out is an agent failure.
pub fn observe_answer(
    live: &mut LiveState,
    agent: &AgentId,
    asked: &[LiveTarget],
    answer: Result<Vec<LiveService>, String>,
) {
    let answered = match answer {
        Ok(services) => services,
        Err(reason) => {
            for target in asked {
                live.observe(
                    target.service_id.clone(),
                    Observation::Unreachable {
                        reason: reason.clone(),
                    },
                );
            }
            return;
        }
    };
    for target in asked {
        let observation = match answered.iter().find(|s| s.service_id == target.service_id) {
            Some(LiveService {
                observed: Ok(commit),
                ..
            }) => Observation::Live {
                commit: commit.clone(),
            },
            Some(LiveService {
                observed: Err(reason),
                ..
            }) => Observation::Failed {
                agent: agent.clone(),
                reason: reason.clone(),
            },
            None => Observation::Failed {
                agent: agent.clone(),
                reason: "its answer has no entry for this service".to_owned(),
            },
        };
        live.observe(target.service_id.clone(), observation);
    }
}

/// One service whose live state differs from the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    pub id: String,
    pub node: Option<String>,
    pub requested_commit: String,
    /// `None` when nothing runs or nothing proves a commit.
    pub live_commit: Option<String>,
    pub reason: String,
}

/// One service whose live state could not be compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unchecked {
    pub id: String,
    pub node: Option<String>,
    pub reason: String,
}

/// `deploy check`: the plan's lines sorted into in sync, drifted and not comparable.
/// Unsupported lines are none of these (the plan says why).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub in_sync: Vec<String>,
    pub drift: Vec<Drift>,
    pub unknown: Vec<Unchecked>,
}

impl Check {
    /// Everything checked runs the desired commit, and nothing was left unchecked.
    pub fn ok(&self) -> bool {
        self.drift.is_empty() && self.unknown.is_empty()
    }
}

/// Compares live and desired state per line of `plan`: `noop` is in sync, `deploy` is drift
/// (another commit runs, or nothing does), `unknown` could not be compared.
pub fn check(plan: &Plan) -> Check {
    let mut out = Check::default();
    for line in &plan.services {
        match &line.action {
            Action::Noop => out.in_sync.push(line.id.clone()),
            Action::Deploy => out.drift.push(Drift {
                id: line.id.clone(),
                node: line.node.clone(),
                requested_commit: line.requested_commit.clone(),
                live_commit: line.live_commit.clone(),
                reason: match &line.live_commit {
                    Some(live) => format!(
                        "runs commit {live}, deploy.json asks for {}",
                        line.requested_commit
                    ),
                    None => format!(
                        "no running instance proves a commit, deploy.json asks for {}",
                        line.requested_commit
                    ),
                },
            }),
            Action::Unknown { reason } => out.unknown.push(Unchecked {
                id: line.id.clone(),
                node: line.node.clone(),
                reason: reason.clone(),
            }),
            Action::Unsupported { .. } => {}
        }
    }
    out
}

/// The checks an apply must pass before anything changes.
///
/// `--env prod` is always refused. Otherwise the set (the whole plan, or only `service`) must
/// hold no unsupported service, and under `--env dev` only services listed in
/// `environments.dev.applyServices`.
pub fn apply_guard(
    env: Option<Environment>,
    plan: &Plan,
    catalog: &Catalog,
    service: Option<&str>,
) -> Result<(), PlanError> {
    // First and unconditional: nothing in the plan, config or flags can enable prod apply.
    if env == Some(Environment::Prod) || plan.environment == Some(Environment::Prod) {
        return Err(PlanError::ProdApplyDisabled);
    }
    if plan.environment != env {
        return Err(PlanError::EnvironmentMismatch {
            planned: env_name(plan.environment),
            requested: env_name(env),
        });
    }
    let set: Vec<&PlannedService> = plan
        .services
        .iter()
        .filter(|s| service.is_none_or(|id| s.id == id))
        .collect();
    if let Some(id) = service
        && set.is_empty()
    {
        return Err(not_in_manifest(
            id,
            plan.services.iter().map(|s| s.id.as_str()),
        ));
    }
    let enabled: Option<&[String]> = env.map(|e| {
        catalog
            .environment(e)
            .map_or(&[][..], |c| c.apply_services.as_slice())
    });
    let mut refused = Vec::new();
    for line in set {
        let mut why = Vec::new();
        if let Action::Unsupported { reason } = &line.action {
            why.push(format!("unsupported: {reason}"));
        }
        if let (Some(e), Some(enabled)) = (env, enabled)
            && !enabled.contains(&line.id)
        {
            why.push(format!("not in config.json environments.{e}.applyServices"));
        }
        if !why.is_empty() {
            refused.push(Refusal {
                service: line.id.clone(),
                why: why.join(", "),
            });
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    let command = match env {
        Some(e) => format!("deploy apply --env {e}"),
        None => "deploy apply".to_owned(),
    };
    Err(PlanError::ApplyRefused {
        command,
        refused: Refusals(refused),
    })
}

/// The typed launch spec for one planned service: the Compose executor for `unidesk-direct` and
/// `internal-sidecar`, the k3s executor for `k3sctl-managed`. The caller decides whether a
/// `noop` line is launched at all (it is, with `force`).
pub fn deploy_spec(
    service: &PlannedService,
    force: bool,
    dry_run: bool,
) -> Result<DeploySpec, PlanError> {
    let refuse = |why: String| PlanError::NotDeployable {
        service: service.id.clone(),
        why,
    };
    if service.environment == Some(Environment::Prod) {
        return Err(PlanError::ProdApplyDisabled);
    }
    if let Action::Unsupported { reason } = &service.action {
        return Err(refuse(format!("unsupported: {reason}")));
    }
    let deployment = service
        .deployment
        .as_ref()
        .ok_or_else(|| refuse("it has no deployment in config.json".to_owned()))?;
    let executor = match (&deployment.mode, &deployment.compose, &deployment.k8s) {
        (DeploymentMode::K3sctlManaged, _, Some(k8s)) => ExecutorSpec::K3s(K3sSpec {
            manifest: k8s.manifest.clone(),
            namespace: k8s.namespace.clone(),
            deployments: k3s_deployments(k8s),
            health: k8s.health.as_ref().map(|h| K3sHealth {
                service: h.service.clone(),
                port: h.port,
                path: h.path.clone(),
            }),
            frontend_route: k8s.frontend_route.as_ref().map(|r| K3sServicePort {
                service: r.service.clone(),
                port: r.port,
            }),
            legacy_container: deployment.legacy_container.clone(),
            rollout_timeout_ms: k8s.rollout_timeout_ms,
        }),
        (DeploymentMode::K3sctlManaged, _, None) => {
            return Err(refuse("mode k3sctl-managed needs a k8s block".to_owned()));
        }
        (_, Some(compose), _) => ExecutorSpec::Compose {
            project: compose.project.clone(),
            service: compose.service.clone(),
        },
        (mode, None, _) => return Err(refuse(format!("mode {mode} needs a compose block"))),
    };
    let dockerfile = deployment
        .dockerfile
        .clone()
        .ok_or_else(|| refuse("no Dockerfile in config.json".to_owned()))?;
    let image = service
        .image
        .clone()
        .ok_or_else(|| refuse("no image in config.json".to_owned()))?;
    Ok(DeploySpec {
        service_id: service.id.clone(),
        repo_url: service.repo.clone(),
        requested_commit: service.requested_commit.clone(),
        dockerfile,
        context: deployment.context.clone().unwrap_or_else(|| ".".to_owned()),
        image,
        build_base: deployment.build_base.as_ref().map(|b| BuildBase {
            arg: b.arg.clone(),
            candidates: b.candidates.clone(),
        }),
        executor,
        health_url: deployment.health_url.clone(),
        force,
        dry_run,
        build_timeout_ms: deployment
            .build_timeout_ms
            .unwrap_or(DEFAULT_BUILD_TIMEOUT_MS),
    })
}

/// The Deployments (and their app containers) config names for a k3s service, as the wire
/// carries them to the agent — for a deploy and for a live-state query alike.
fn k3s_deployments(k8s: &K8sConfig) -> Vec<K3sDeployment> {
    k8s.deployments
        .iter()
        .map(|d| K3sDeployment {
            name: d.name.clone(),
            container: d.container.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::catalog;

    const SHA_A: &str = "0c3cdb4ee06a23361ed511a2da033d67b53d16f4";
    const SHA_B: &str = "9f1e2d3c4b5a69788796a5b4c3d2e1f00112233f";
    const REPO: &str = "https://github.com/pikasTech/unidesk";

    /// web and sidecar are Compose on main-server; api is k3s on d601 (with a dev
    /// deployment, dev-enabled); legacy has no Dockerfile; extra has a dev deployment but is
    /// not enabled for dev apply.
    fn catalog() -> Catalog {
        let text = serde_json::json!({
            "microservices": [
                {"id": "web", "repository": {"url": REPO}, "deployment": {
                    "mode": "unidesk-direct", "node": "main-server", "dockerfile": "web/Dockerfile",
                    "context": "web", "image": "unidesk-web:latest", "healthUrl": "http://127.0.0.1:8080/health",
                    "buildTimeoutMs": 600000,
                    "buildBase": {"arg": "WEB_BASE", "candidates": ["unidesk-web:latest-build-base"]},
                    "compose": {"project": "unidesk", "service": "web"}}},
                {"id": "sidecar", "repository": {"url": REPO}, "deployment": {
                    "mode": "internal-sidecar", "node": "main-server", "dockerfile": "Dockerfile",
                    "image": "sidecar:latest", "compose": {"service": "sidecar"}}},
                {"id": "api", "repository": {"url": REPO}, "deployment": {
                    "mode": "k3sctl-managed", "node": "d601", "dockerfile": "api/Dockerfile",
                    "image": "unidesk-api:d601",
                    "k8s": {"manifest": "k3s/api.yaml", "namespace": "unidesk",
                            "deployments": [{"name": "api", "container": "api"}]}}},
                {"id": "legacy", "repository": {"url": REPO}, "deployment": {
                    "mode": "unidesk-direct", "node": "d518", "image": "docker.io/vendor/legacy:1",
                    "compose": {"service": "legacy"}}},
                {"id": "extra", "repository": {"url": REPO}, "deployment": {
                    "mode": "k3sctl-managed", "node": "d601", "dockerfile": "Dockerfile",
                    "image": "extra:d601",
                    "k8s": {"manifest": "k3s/extra.yaml", "namespace": "unidesk",
                            "deployments": [{"name": "extra", "container": "extra"}]}}}
            ],
            "nodes": {
                "main-server": {"agent": "main-server", "egress": "direct"},
                "d601": {"agent": "d601", "egress": "tunnel"},
                "d518": {"agent": "d518", "egress": "tunnel"}
            },
            "environments": {
                "dev": {"namespace": "unidesk-dev", "databaseFingerprint": "postgres-dev/unidesk_dev",
                        "providerIdentity": "D601-dev", "applyServices": ["api"],
                        "deployments": {
                            "api": {"mode": "k3sctl-managed", "node": "d601", "dockerfile": "api/Dockerfile",
                                    "image": "unidesk-api:d601",
                                    "imageTagByEnvironment": {"dev": "dev"},
                                    "k8s": {"manifest": "k3s/dev/api.yaml", "namespace": "unidesk-dev",
                                            "deployments": [{"name": "api-dev", "container": "api"}]}},
                            "extra": {"mode": "k3sctl-managed", "node": "d601", "dockerfile": "Dockerfile",
                                      "image": "extra:dev",
                                      "k8s": {"manifest": "k3s/dev/extra.yaml", "namespace": "unidesk-dev",
                                              "deployments": [{"name": "extra-dev", "container": "extra"}]}}}},
                "prod": {"namespace": "unidesk", "databaseFingerprint": "postgres/unidesk",
                         "providerIdentity": "D601"}
            }
        });
        catalog::parse(text.to_string().as_bytes()).unwrap().catalog
    }

    fn entry(id: &str, commit: &str) -> ServiceEntry {
        ServiceEntry {
            id: id.to_owned(),
            repo: REPO.to_owned(),
            commit_id: commit.to_owned(),
        }
    }

    fn live(pairs: &[(&str, Observation)]) -> LiveState {
        let mut l = LiveState::default();
        for (id, o) in pairs {
            l.observe(*id, o.clone());
        }
        l
    }

    fn at(commit: &str) -> Observation {
        Observation::Live {
            commit: Some(commit.to_owned()),
        }
    }

    fn action_of<'a>(p: &'a Plan, id: &str) -> &'a Action {
        &p.services.iter().find(|s| s.id == id).unwrap().action
    }

    #[test]
    fn matching_live_commit_is_noop_for_full_and_short_requests() {
        let c = catalog();
        let services = [entry("web", SHA_A), entry("sidecar", &SHA_A[..7])];
        let p = plan(
            &services,
            &c,
            None,
            None,
            &live(&[("web", at(SHA_A)), ("sidecar", at(SHA_A))]),
        )
        .unwrap();
        assert_eq!(action_of(&p, "web"), &Action::Noop);
        assert_eq!(action_of(&p, "sidecar"), &Action::Noop);
        assert_eq!(p.services[0].resolved_commit.as_deref(), Some(SHA_A));
        assert_eq!(p.services[1].resolved_commit, None);
        assert_eq!(p.services[0].live_commit.as_deref(), Some(SHA_A));
    }

    #[test]
    fn other_or_absent_live_commit_is_deploy() {
        let c = catalog();
        let services = [entry("web", SHA_A), entry("sidecar", SHA_A)];
        let p = plan(
            &services,
            &c,
            None,
            None,
            &live(&[
                ("web", at(SHA_B)),
                ("sidecar", Observation::Live { commit: None }),
            ]),
        )
        .unwrap();
        assert_eq!(action_of(&p, "web"), &Action::Deploy);
        assert_eq!(action_of(&p, "sidecar"), &Action::Deploy);
    }

    #[test]
    fn a_short_live_commit_is_unknown_not_a_match() {
        let p = plan(
            &[entry("web", &SHA_A[..8])],
            &catalog(),
            None,
            None,
            &live(&[("web", at(&SHA_A[..10]))]),
        )
        .unwrap();
        assert!(
            matches!(action_of(&p, "web"), Action::Unknown { reason } if reason.contains("not a full 40-hex SHA"))
        );
    }

    #[test]
    fn unreachable_node_is_unknown_with_why() {
        let p = plan(
            &[entry("api", SHA_A)],
            &catalog(),
            None,
            None,
            &live(&[(
                "api",
                Observation::Unreachable {
                    reason: "agent d601 is not connected".to_owned(),
                },
            )]),
        )
        .unwrap();
        assert_eq!(
            action_of(&p, "api"),
            &Action::Unknown {
                reason: "node d601 (agent d601) cannot be asked: agent d601 is not connected"
                    .to_owned()
            }
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["services"][0]["action"], "unknown");
        assert_eq!(
            json["services"][0]["reason"],
            "node d601 (agent d601) cannot be asked: agent d601 is not connected"
        );
    }

    #[test]
    fn unobserved_service_is_unknown_never_deploy() {
        let p = plan(
            &[entry("web", SHA_A)],
            &catalog(),
            None,
            None,
            &LiveState::default(),
        )
        .unwrap();
        assert!(
            matches!(action_of(&p, "web"), Action::Unknown { reason } if reason.contains("not observed"))
        );
    }

    #[test]
    fn live_queries_group_lines_by_agent_with_their_lookups() {
        let c = catalog();
        let services = [
            entry("web", SHA_A),
            entry("sidecar", SHA_A),
            entry("api", SHA_A),
            entry("legacy", SHA_A),
        ];
        let p = plan(&services, &c, None, None, &LiveState::default()).unwrap();
        let queries = live_queries(&p);
        let agents: Vec<&str> = queries.keys().map(AgentId::as_str).collect();
        assert_eq!(
            agents,
            ["d601", "main-server"],
            "legacy (unsupported) is not asked"
        );
        let main = &queries[&AgentId::new("main-server").unwrap()];
        assert_eq!(
            main,
            &vec![
                LiveTarget {
                    service_id: "web".into(),
                    lookup: LiveLookup::Compose {
                        project: Some("unidesk".into()),
                        service: "web".into()
                    }
                },
                LiveTarget {
                    service_id: "sidecar".into(),
                    lookup: LiveLookup::Compose {
                        project: None,
                        service: "sidecar".into()
                    }
                },
            ]
        );
        assert_eq!(
            queries[&AgentId::new("d601").unwrap()],
            vec![LiveTarget {
                service_id: "api".into(),
                lookup: LiveLookup::K3s {
                    namespace: "unidesk".into(),
                    deployments: vec![K3sDeployment {
                        name: "api".into(),
                        container: "api".into()
                    }],
                },
            }]
        );
    }

    #[test]
    fn answers_become_observations_and_the_plan_acts_on_them() {
        let c = catalog();
        let services = [
            entry("web", SHA_A),
            entry("sidecar", SHA_A),
            entry("api", SHA_A),
        ];
        let first = plan(&services, &c, None, None, &LiveState::default()).unwrap();
        let queries = live_queries(&first);
        let main = AgentId::new("main-server").unwrap();
        let d601 = AgentId::new("d601").unwrap();
        let mut live = LiveState::default();
        observe_answer(
            &mut live,
            &main,
            &queries[&main],
            Ok(vec![LiveService {
                service_id: "web".into(),
                observed: Ok(Some(SHA_B.into())),
            }]),
        );
        observe_answer(
            &mut live,
            &d601,
            &queries[&d601],
            Err("agent d601 is not connected".into()),
        );
        let p = plan(&services, &c, None, None, &live).unwrap();
        assert_eq!(action_of(&p, "web"), &Action::Deploy);
        assert_eq!(p.services[0].live_commit.as_deref(), Some(SHA_B));
        assert_eq!(
            action_of(&p, "sidecar"),
            &Action::Unknown {
                reason: "agent main-server could not read the live state: its answer has no \
                         entry for this service"
                    .into()
            }
        );
        assert_eq!(
            action_of(&p, "api"),
            &Action::Unknown {
                reason: "node d601 (agent d601) cannot be asked: agent d601 is not connected"
                    .into()
            }
        );
        let mut live = LiveState::default();
        observe_answer(
            &mut live,
            &main,
            &queries[&main],
            Ok(vec![
                LiveService {
                    service_id: "sidecar".into(),
                    observed: Err("docker container list failed".into()),
                },
                LiveService {
                    service_id: "web".into(),
                    observed: Ok(None),
                },
            ]),
        );
        assert_eq!(
            live.services["sidecar"],
            Observation::Failed {
                agent: main.clone(),
                reason: "docker container list failed".into()
            }
        );
        assert_eq!(live.services["web"], Observation::Live { commit: None });
    }

    #[test]
    fn check_sorts_lines_into_in_sync_drift_and_unknown() {
        let c = catalog();
        let services = [
            entry("web", SHA_A),
            entry("sidecar", SHA_A),
            entry("api", SHA_A),
            entry("legacy", SHA_A),
        ];
        let p = plan(
            &services,
            &c,
            None,
            None,
            &live(&[
                ("web", at(SHA_A)),
                ("sidecar", at(SHA_B)),
                (
                    "api",
                    Observation::Unreachable {
                        reason: "no controller".into(),
                    },
                ),
            ]),
        )
        .unwrap();
        let report = check(&p);
        assert_eq!(report.in_sync, ["web"]);
        assert_eq!(
            report.drift,
            [Drift {
                id: "sidecar".into(),
                node: Some("main-server".into()),
                requested_commit: SHA_A.into(),
                live_commit: Some(SHA_B.into()),
                reason: format!("runs commit {SHA_B}, deploy.json asks for {SHA_A}"),
            }]
        );
        assert_eq!(report.unknown.len(), 1);
        assert_eq!(report.unknown[0].id, "api");
        assert!(!report.ok());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["drift"][0]["liveCommit"], SHA_B);
        assert_eq!(json["inSync"][0], "web");

        let p = plan(
            &[entry("web", &SHA_A[..7])],
            &c,
            None,
            None,
            &live(&[("web", at(SHA_A))]),
        )
        .unwrap();
        assert!(
            check(&p).ok(),
            "a short commitId matching the live commit is in sync"
        );
        let p = plan(
            &[entry("web", SHA_A)],
            &c,
            None,
            None,
            &live(&[("web", Observation::Live { commit: None })]),
        )
        .unwrap();
        let report = check(&p);
        assert_eq!(report.drift[0].live_commit, None);
        assert!(
            report.drift[0]
                .reason
                .starts_with("no running instance proves a commit"),
            "{report:?}"
        );
    }

    #[test]
    fn no_dockerfile_is_unsupported() {
        let p = plan(
            &[entry("legacy", SHA_A)],
            &catalog(),
            None,
            None,
            &live(&[("legacy", at(SHA_B))]),
        )
        .unwrap();
        assert!(
            matches!(action_of(&p, "legacy"), Action::Unsupported { reason } if reason.contains("no Dockerfile source artifact"))
        );
        assert_eq!(
            serde_json::to_value(&p).unwrap()["services"][0]["action"],
            "unsupported"
        );
    }

    #[test]
    fn service_missing_from_config_is_an_error() {
        let err = plan(
            &[entry("web", SHA_A), entry("ghost", SHA_A)],
            &catalog(),
            None,
            Some("web"),
            &LiveState::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "deploy.json services[1]: service \"ghost\" is not in config.json microservices"
        );
    }

    #[test]
    fn service_filter_narrows_and_must_be_in_the_manifest() {
        let c = catalog();
        let services = [entry("web", SHA_A), entry("api", SHA_A)];
        let p = plan(&services, &c, None, Some("api"), &LiveState::default()).unwrap();
        assert_eq!(p.services.len(), 1);
        assert_eq!(p.services[0].id, "api");
        let err = plan(&services, &c, None, Some("frontend"), &LiveState::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--service \"frontend\" is not in deploy.json (it lists: web, api)"
        );
    }

    #[test]
    fn dev_plan_uses_dev_deployments_and_reports_the_environment() {
        let c = catalog();
        let p = plan(
            &[entry("api", SHA_A), entry("web", SHA_A)],
            &c,
            Some(Environment::Dev),
            None,
            &live(&[("api", at(SHA_B)), ("web", at(SHA_B))]),
        )
        .unwrap();
        assert_eq!(p.desired_ref, Some("origin/deploy/dev"));
        assert_eq!(p.namespace.as_deref(), Some("unidesk-dev"));
        assert_eq!(
            p.database_fingerprint.as_deref(),
            Some("postgres-dev/unidesk_dev")
        );
        assert_eq!(p.provider_identity.as_deref(), Some("D601-dev"));
        let api = &p.services[0];
        assert_eq!(api.namespace.as_deref(), Some("unidesk-dev"));
        assert_eq!(api.image.as_deref(), Some("unidesk-api:dev"));
        assert_eq!(api.action, Action::Deploy);
        // web's only deployment is the production Compose service: unsupported in dev.
        assert!(
            matches!(&p.services[1].action, Action::Unsupported { reason }
            if reason.contains("environments.dev.deployments.web"))
        );
        assert_eq!(p.services[1].node, None);
    }

    #[test]
    fn prod_apply_is_always_refused() {
        let c = catalog();
        let p = plan(
            &[entry("web", SHA_A)],
            &c,
            Some(Environment::Prod),
            None,
            &live(&[("web", at(SHA_B))]),
        )
        .unwrap();
        for service in [None, Some("web")] {
            let err = apply_guard(Some(Environment::Prod), &p, &c, service).unwrap_err();
            assert_eq!(err, PlanError::ProdApplyDisabled);
            assert!(
                err.to_string()
                    .starts_with("deploy apply --env prod is disabled: ")
            );
        }
        // A prod plan cannot be smuggled through a non-prod apply, or turned into a spec.
        assert_eq!(
            apply_guard(None, &p, &c, None),
            Err(PlanError::ProdApplyDisabled)
        );
        assert_eq!(
            deploy_spec(&p.services[0], false, false),
            Err(PlanError::ProdApplyDisabled)
        );
    }

    #[test]
    fn dev_apply_refuses_unsupported_and_not_enabled_services_listing_them() {
        let c = catalog();
        let services = [
            entry("api", SHA_A),
            entry("web", SHA_A),
            entry("extra", SHA_A),
        ];
        let p = plan(
            &services,
            &c,
            Some(Environment::Dev),
            None,
            &LiveState::default(),
        )
        .unwrap();
        let err = apply_guard(Some(Environment::Dev), &p, &c, None).unwrap_err();
        let PlanError::ApplyRefused { refused, .. } = &err else {
            panic!("{err}")
        };
        let ids: Vec<_> = refused.0.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(ids, ["web", "extra"]);
        let text = err.to_string();
        assert!(
            text.starts_with(
                "deploy apply --env dev refused before any change: web (unsupported: "
            ),
            "{text}"
        );
        assert!(
            text.contains("not in config.json environments.dev.applyServices"),
            "{text}"
        );
        assert!(
            text.contains("extra (not in config.json environments.dev.applyServices)"),
            "{text}"
        );
        assert!(text.ends_with("; narrow the set with --service"), "{text}");
        // Narrowed to an enabled service it proceeds; narrowed to another it is refused.
        assert_eq!(
            apply_guard(Some(Environment::Dev), &p, &c, Some("api")),
            Ok(())
        );
        assert!(apply_guard(Some(Environment::Dev), &p, &c, Some("extra")).is_err());
        assert!(matches!(
            apply_guard(Some(Environment::Dev), &p, &c, Some("nope")),
            Err(PlanError::ServiceNotInManifest { .. })
        ));
    }

    #[test]
    fn file_apply_refuses_unsupported_unless_narrowed() {
        let c = catalog();
        let services = [entry("web", SHA_A), entry("legacy", SHA_A)];
        let p = plan(&services, &c, None, None, &LiveState::default()).unwrap();
        let err = apply_guard(None, &p, &c, None).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "deploy apply refused before any change: legacy (unsupported: no Dockerfile"
            ),
            "{err}"
        );
        assert_eq!(apply_guard(None, &p, &c, Some("web")), Ok(()));
    }

    #[test]
    fn apply_environment_must_match_the_plan() {
        let c = catalog();
        let p = plan(
            &[entry("api", SHA_A)],
            &c,
            None,
            None,
            &LiveState::default(),
        )
        .unwrap();
        assert_eq!(
            apply_guard(Some(Environment::Dev), &p, &c, None)
                .unwrap_err()
                .to_string(),
            "the plan is for the local file but the apply is for --env dev"
        );
    }

    #[test]
    fn compose_spec_carries_the_catalog_data() {
        let c = catalog();
        let p = plan(
            &[entry("web", &SHA_A[..7])],
            &c,
            None,
            None,
            &live(&[("web", at(SHA_B))]),
        )
        .unwrap();
        let spec = deploy_spec(&p.services[0], true, false).unwrap();
        assert_eq!(
            spec,
            DeploySpec {
                service_id: "web".into(),
                repo_url: REPO.into(),
                requested_commit: SHA_A[..7].into(),
                dockerfile: "web/Dockerfile".into(),
                context: "web".into(),
                image: "unidesk-web:latest".into(),
                build_base: Some(BuildBase {
                    arg: "WEB_BASE".into(),
                    candidates: vec!["unidesk-web:latest-build-base".into()],
                }),
                executor: ExecutorSpec::Compose {
                    project: Some("unidesk".into()),
                    service: "web".into(),
                },
                health_url: Some("http://127.0.0.1:8080/health".into()),
                force: true,
                dry_run: false,
                build_timeout_ms: 600_000,
            }
        );
        let p = plan(
            &[entry("sidecar", SHA_A)],
            &c,
            None,
            None,
            &LiveState::default(),
        )
        .unwrap();
        let spec = deploy_spec(&p.services[0], false, true).unwrap();
        assert_eq!(spec.context, ".");
        assert_eq!(spec.build_timeout_ms, DEFAULT_BUILD_TIMEOUT_MS);
        assert_eq!(
            spec.executor,
            ExecutorSpec::Compose {
                project: None,
                service: "sidecar".into()
            }
        );
        assert!(spec.dry_run);
    }

    #[test]
    fn k3s_services_get_the_k3s_executor_and_unsupported_ones_no_spec() {
        let c = catalog();
        let p = plan(
            &[entry("api", SHA_A), entry("legacy", SHA_A)],
            &c,
            None,
            None,
            &LiveState::default(),
        )
        .unwrap();
        let spec = deploy_spec(&p.services[0], false, false).unwrap();
        assert_eq!(
            spec.executor,
            ExecutorSpec::K3s(K3sSpec {
                manifest: "k3s/api.yaml".into(),
                namespace: "unidesk".into(),
                deployments: vec![K3sDeployment {
                    name: "api".into(),
                    container: "api".into()
                }],
                health: None,
                frontend_route: None,
                legacy_container: None,
                rollout_timeout_ms: crate::desired::catalog::DEFAULT_ROLLOUT_TIMEOUT_MS,
            })
        );
        let err = deploy_spec(&p.services[1], false, false).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("service \"legacy\" cannot be deployed: unsupported: no Dockerfile"),
            "{err}"
        );
    }
}
