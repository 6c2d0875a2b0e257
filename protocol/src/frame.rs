//! The frames exchanged over the agent's WebSocket, in both directions.
//!
//! Everything here is data. A launch names a repository, a commit, paths inside that commit and
//! names of things on the node; there is no variant that carries a script body, a command
//! line or a shell fragment, and adding one is a design change, not a feature.

use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, LaunchId, RunId, Secret};

/// Frames an agent sends to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentFrame {
    /// The first frame of every connection.
    Hello(Hello),
    /// Answer to [`ControllerFrame::Ping`].
    Pong { nonce: u64 },
    /// The launch is (or already was) accepted; `state` says where it stands.
    Accepted {
        launch_id: LaunchId,
        state: LaunchState,
    },
    /// The launch was refused before anything ran.
    Rejected { launch_id: LaunchId, reason: String },
    /// One event of a launch; the controller acknowledges it with [`ControllerFrame::Ack`].
    Event(Event),
    /// Answer to [`ControllerFrame::Query`].
    Reply { query_id: u64, reply: Reply },
    /// Bytes of the multiplexed egress tunnel (a yamux byte stream).
    Tunnel(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// Frames the controller sends to an agent.
// Frames live for one send or receive; boxing the launch would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerFrame {
    /// The Hello was accepted.
    Welcome(Welcome),
    /// Liveness check; the agent answers with [`AgentFrame::Pong`].
    Ping { nonce: u64 },
    /// Run something, once.
    Launch(Launch),
    /// Stop a launch; the reason is recorded in its result.
    Cancel { launch_id: LaunchId, reason: String },
    /// Every event of `launch_id` up to and including `seq` is stored by the controller.
    Ack { launch_id: LaunchId, seq: u64 },
    /// Ask the agent something without launching anything.
    Query { query_id: u64, query: Query },
    /// Bytes of the multiplexed egress tunnel (a yamux byte stream).
    Tunnel(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// The agent introduces itself.
///
/// The Hello is bound to the TLS connection that carries it: `session_proof` is
/// HMAC-SHA256 keyed with the agent's secret over this connection's TLS exporter keying
/// material ([`Hello::EXPORTER_LABEL`], RFC 5705 / RFC 8446 7.5). Both ends derive the same
/// material from the one handshake and no other connection does, so a Hello captured from
/// one session and sent again on another is refused even though its secret is right.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_id: AgentId,
    pub agent_version: String,
    pub capabilities: Vec<Capability>,
    pub credential: Secret,
    pub session_proof: [u8; 32],
}

impl Hello {
    /// The TLS exporter label both ends use for [`Hello::session_proof`].
    pub const EXPORTER_LABEL: &'static [u8] = b"EXPORTER-unidesk-agent-hello";

    /// How many bytes of exporter keying material the proof is computed over.
    pub const EXPORTER_LEN: usize = 32;

    /// HMAC-SHA256(`credential`, `keying_material`): the proof that this Hello was made
    /// for the connection whose exporter gave `keying_material`.
    pub fn session_proof(credential: &Secret, keying_material: &[u8]) -> [u8; 32] {
        use hmac::Mac as _;
        hello_mac(credential, keying_material)
            .finalize()
            .into_bytes()
            .into()
    }

    /// True when [`Hello::session_proof`] was made with this Hello's credential for the
    /// connection whose exporter gave `keying_material`. Compared in constant time.
    pub fn proves_session(&self, keying_material: &[u8]) -> bool {
        use hmac::Mac as _;
        hello_mac(&self.credential, keying_material)
            .verify_slice(&self.session_proof)
            .is_ok()
    }
}

fn hello_mac(credential: &Secret, keying_material: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(credential.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(keying_material);
    mac
}

/// The controller accepts an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub controller_version: String,
    /// How often the controller pings; the agent declares the link dead after missing a few.
    pub heartbeat_ms: u32,
    /// For each launch of this agent whose events are not all stored: the last stored seq.
    /// The agent resends everything after it.
    pub resume: Vec<ResumePoint>,
}

/// Where event delivery of one launch resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub launch_id: LaunchId,
    pub acked_seq: u64,
}

/// What an agent can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Capability {
    Probe,
    Egress,
    ComposeDeploy,
    K3sDeploy,
    CiRun,
}

/// One launch: the unit the agent runs once per launch id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub launch_id: LaunchId,
    pub run_id: RunId,
    /// Wall-clock deadline (Unix milliseconds); past it the launch ends `timed-out`.
    pub deadline_unix_ms: u64,
    pub spec: LaunchSpec,
}

/// What to run. Data only: no variant carries a script or a command line.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchSpec {
    /// Report agent facts (version, capabilities, reachability) and echo `echo_lines`
    /// numbered log lines, which exercises the event plane without Docker.
    Probe(ProbeSpec),
    /// Build a service at a commit on this node and replace the running one.
    Deploy(DeploySpec),
    /// Make the node's k3s containerd hold the images its pods need before any rollout: the
    /// sandbox (pause) image and the foundation images listed in the agent's own config.
    Prewarm,
    /// Run the dev smoke CI script of one manifest commit on this node (the CI node): the
    /// script and `deploy.json` are read from that commit, never sent.
    Ci(CiRunSpec),
}

impl LaunchSpec {
    /// The short name used in logs and job records.
    pub fn kind(&self) -> LaunchKind {
        match self {
            LaunchSpec::Probe(_) => LaunchKind::Probe,
            LaunchSpec::Deploy(_) => LaunchKind::Deploy,
            LaunchSpec::Prewarm => LaunchKind::Prewarm,
            LaunchSpec::Ci(_) => LaunchKind::Ci,
        }
    }
}

/// The kind of a launch, without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchKind {
    Probe,
    Deploy,
    Prewarm,
    Ci,
}

/// The rule for a CI `scriptPath`: exactly `scripts/ci/<name>.sh`, where the name is letters,
/// digits, `.`, `_` and `-`, does not start with `.` and holds no `..`. Checked by the
/// controller before a launch and again by the agent before anything runs.
pub fn check_ci_script_path(path: &str) -> Result<(), &'static str> {
    const WHY: &str = "it must be a repo-relative scripts/ci/<name>.sh path";
    let name = path
        .strip_prefix("scripts/ci/")
        .and_then(|rest| rest.strip_suffix(".sh"))
        .ok_or(WHY)?;
    if name.is_empty()
        || name.starts_with('.')
        || name.contains("..")
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(WHY);
    }
    Ok(())
}

/// See [`LaunchSpec::Ci`]. The run id of the launch names the run, its work directory and the
/// temporary namespace `unidesk-ci-e2e-<runId>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiRunSpec {
    /// The desired-state repository the manifest commit was read from.
    pub repo_url: String,
    /// The full SHA of the `origin/master` commit that supplied `deploy.json`.
    pub manifest_commit: String,
    /// The desired ref as the script receives it (`master`).
    pub desired_ref: String,
    /// Repository-relative path of the manifest in that commit (`deploy.json`).
    pub manifest_path: String,
    /// Repository-relative `scripts/ci/<name>.sh` in that commit.
    pub script_path: String,
    /// The environment whose CI block this is (`dev`).
    pub environment: String,
    /// How long the script may run before its process group is killed.
    pub timeout_ms: u64,
    /// Leave the temporary namespace in place after the run.
    pub keep_namespace: bool,
    /// The Code Queue image the script tests, built (or reused) at its commit on the node.
    pub code_queue: CiImageSpec,
}

/// How the CI node builds the image the script runs: a repository commit and its Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiImageSpec {
    pub service_id: String,
    pub repo_url: String,
    /// A full 40-hex SHA (the controller refuses anything shorter).
    pub commit: String,
    pub dockerfile: String,
    pub context: String,
    /// The image name with tag to build or to give a reused image.
    pub image: String,
    pub build_base: Option<BuildBase>,
    pub build_timeout_ms: u64,
}

/// See [`LaunchSpec::Probe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSpec {
    pub echo_lines: u32,
}

/// See [`LaunchSpec::Deploy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub service_id: String,
    /// Repository URL as declared in `deploy.json`.
    pub repo_url: String,
    /// The commit as declared: a full SHA or a unique short SHA.
    pub requested_commit: String,
    /// Repository-relative path of the Dockerfile.
    pub dockerfile: String,
    /// Repository-relative build context directory (`.` for the root).
    pub context: String,
    /// Image name (with tag) to build; the compose executor may replace it with the image the
    /// running service really uses.
    pub image: String,
    /// Build argument that names a warm base image, and the candidates in fallback order.
    pub build_base: Option<BuildBase>,
    pub executor: ExecutorSpec,
    /// URL of the health endpoint that reports `deploy.commit`, if the service has one.
    pub health_url: Option<String>,
    /// Rebuild and replace even when the live commit already matches.
    pub force: bool,
    /// Resolve and plan only; change nothing.
    pub dry_run: bool,
    pub build_timeout_ms: u64,
}

/// A warm build-base argument (`CODE_QUEUE_BASE_IMAGE`) and its candidate images in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildBase {
    pub arg: String,
    pub candidates: Vec<String>,
}

/// How the service is replaced on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorSpec {
    /// Docker Compose service: recreated from the new image. `project` is fixed by config on
    /// the main server and read from the running container's labels elsewhere.
    Compose {
        project: Option<String>,
        service: String,
    },
    /// A Deployment (or several) on the node's native k3s: the image is imported into k3s's
    /// containerd, the service's objects from the manifest at the deployed commit are applied
    /// and rolled out, and the live Deployment must prove the commit.
    K3s(K3sSpec),
}

/// See [`ExecutorSpec::K3s`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sSpec {
    /// Repository-relative path of the multi-document manifest, read at the deployed commit.
    pub manifest: String,
    /// The one namespace this service may touch in this environment.
    pub namespace: String,
    /// The service's Deployments and the container of each that runs the built image.
    pub deployments: Vec<K3sDeployment>,
    /// Health through the API server's service proxy.
    pub health: Option<K3sHealth>,
    /// The UniDesk route the frontend serves (`/api/microservices/<id>/health`), through the
    /// frontend Service's proxy.
    pub frontend_route: Option<K3sServicePort>,
    /// A direct Docker container to stop and remove after a verified rollout.
    pub legacy_container: Option<String>,
    pub rollout_timeout_ms: u64,
}

/// One Deployment of a k3s service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sDeployment {
    pub name: String,
    pub container: String,
}

/// A Service port reached through the API server's service proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sServicePort {
    pub service: String,
    pub port: u16,
}

/// Where a k3s service reports `deploy.commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sHealth {
    pub service: String,
    pub port: u16,
    /// Path below the service, starting with `/`.
    pub path: String,
}

/// One event of a launch, numbered per launch from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub launch_id: LaunchId,
    pub seq: u64,
    pub time_unix_ms: u64,
    pub body: EventBody,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    Log {
        step: Option<Step>,
        line: String,
    },
    StepStarted {
        step: Step,
    },
    StepFinished {
        step: Step,
        outcome: StepOutcome,
    },
    /// The last event of every launch.
    Finished(LaunchResult),
}

/// A step of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Probe,
    Materialize,
    Build,
    Import,
    Apply,
    Rollout,
    Recreate,
    Verify,
    /// Checks before anything changes: the cluster answers, k3s is native, images present.
    Preflight,
    /// The CI script of a CI launch: its stdout and stderr lines.
    Script,
}

impl Step {
    /// The step's name as it appears in logs and file names.
    pub fn name(self) -> &'static str {
        match self {
            Step::Probe => "probe",
            Step::Materialize => "materialize",
            Step::Build => "build",
            Step::Import => "import",
            Step::Apply => "apply",
            Step::Rollout => "rollout",
            Step::Recreate => "recreate",
            Step::Verify => "verify",
            Step::Preflight => "preflight",
            Step::Script => "script",
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    Ok,
    Skipped { reason: String },
    Failed { reason: String },
}

/// How a launch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchStatus {
    Succeeded,
    Noop,
    Failed,
    Cancelled,
    TimedOut,
    /// The agent stopped (restart, crash) while the launch ran.
    Interrupted,
}

impl LaunchStatus {
    /// The status as it is written in results and job records.
    pub fn name(self) -> &'static str {
        match self {
            LaunchStatus::Succeeded => "succeeded",
            LaunchStatus::Noop => "noop",
            LaunchStatus::Failed => "failed",
            LaunchStatus::Cancelled => "cancelled",
            LaunchStatus::TimedOut => "timed-out",
            LaunchStatus::Interrupted => "interrupted",
        }
    }

    /// Whether the launch did what was asked.
    pub fn is_ok(self) -> bool {
        matches!(self, LaunchStatus::Succeeded | LaunchStatus::Noop)
    }
}

/// The final result of a launch, carried by [`EventBody::Finished`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchResult {
    pub status: LaunchStatus,
    pub error: Option<String>,
    pub detail: ResultDetail,
}

/// Launch-kind specific outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultDetail {
    None,
    Probe(AgentFacts),
    Deploy(DeployOutcome),
}

/// What a deploy produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOutcome {
    pub resolved_commit: Option<String>,
    pub image: Option<String>,
    pub image_id: Option<String>,
    pub container_id: Option<String>,
    /// What the k3s executor imported, applied and proved.
    pub k3s: Option<Box<K3sOutcome>>,
}

/// The k3s side of a deploy outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct K3sOutcome {
    /// The API server the node's kubeconfig names, and the SHA-256 of its CA (hex).
    pub api_server: Option<String>,
    pub ca_sha256: Option<String>,
    /// The image as containerd records it, and its manifest digest.
    pub image_ref: Option<String>,
    pub manifest_digest: Option<String>,
    /// The Deployments applied, with the generation that was rolled out.
    pub deployments: Vec<AppliedDeployment>,
    /// The legacy Docker container removed after the rollout.
    pub legacy_removed: Option<String>,
}

/// A Deployment and the generation the apply produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedDeployment {
    pub name: String,
    pub generation: i64,
}

/// Facts an agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFacts {
    pub agent_id: AgentId,
    pub agent_version: String,
    pub capabilities: Vec<Capability>,
    pub reach: Vec<Reach>,
}

/// Whether the agent can reach one component, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reach {
    pub component: Component,
    pub ok: bool,
    pub detail: String,
}

/// A component an agent depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    Docker,
    Containerd,
    Kubernetes,
    EgressProxy,
    Controller,
}

/// Where a launch stands, as reported with [`AgentFrame::Accepted`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchState {
    /// Newly accepted: it starts now.
    Started,
    /// Already accepted earlier (a second delivery); it has written events up to `last_seq`.
    Running { last_seq: u64 },
    /// Already finished earlier.
    Finished { status: LaunchStatus, last_seq: u64 },
}

/// A question to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The agent's facts, as a probe would report them.
    Facts,
    /// Read the tail of a file of a run directory, at most `max_bytes`.
    ReadRun {
        run_id: RunId,
        file: RunFile,
        max_bytes: u32,
    },
    /// What runs now for each listed service (`deploy check|plan`): the commit its running
    /// container's image label or its Deployments' annotation proves. Answered with
    /// [`Reply::LiveState`], one entry per service in the same order.
    LiveState { services: Vec<LiveTarget> },
    /// A server-side `dryRun=All` apply of every object of a multi-document Kubernetes
    /// manifest through the node's kubeconfig (`dev-env validate --kubectl-dry-run`). The
    /// manifest travels as data (YAML text, at most [`MAX_DRY_RUN_MANIFEST_BYTES`]); nothing is
    /// applied for real. Answered with [`Reply::DryRun`].
    DryRunManifest { manifest: String },
    /// The absolute path of a run's directory on the node (what runbooks open); answered with
    /// [`Reply::RunDirectory`].
    RunDirectory { run_id: RunId },
}

/// A file of a run directory. The set is closed: no path is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunFile {
    Result,
    Events,
    StepLog(Step),
    /// `launcher.log`: the agent's own decisions for a CI run.
    LauncherLog,
    /// `runner.log`: the CI script's stdout and stderr.
    RunnerLog,
    /// `pipelinerun.txt`: the PipelineRun name the CI script recorded.
    PipelineRun,
    /// The CI script's own `result.json` (in the run's `script/` result directory).
    ScriptResult,
}

/// An answer from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Facts(AgentFacts),
    RunFile {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// Whether the file was longer than `max_bytes` (the tail was returned).
        truncated: bool,
    },
    Error {
        reason: String,
    },
    /// Answer to [`Query::LiveState`]: one entry per asked service, in the order asked.
    LiveState {
        services: Vec<LiveService>,
    },
    /// Answer to [`Query::DryRunManifest`]: the API server asked and one entry per object.
    DryRun {
        api_server: String,
        objects: Vec<DryRunObject>,
    },
    /// Answer to [`Query::RunDirectory`].
    RunDirectory {
        path: String,
    },
}

/// The largest manifest a [`Query::DryRunManifest`] carries (512 KiB), well inside a frame
/// and the admin socket's request limit.
pub const MAX_DRY_RUN_MANIFEST_BYTES: usize = 512 * 1024;

/// One service whose live commit [`Query::LiveState`] asks for, with what the agent needs to
/// find it. Names of things on the node only; no paths, no commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTarget {
    pub service_id: String,
    pub lookup: LiveLookup,
}

/// Where a service runs on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveLookup {
    /// The running container labelled with this Compose service (and project, when config
    /// fixes one); its image's `unidesk.ai/source-commit` label is the live commit.
    Compose {
        project: Option<String>,
        service: String,
    },
    /// These Deployments of `namespace`; their `unidesk.ai/deploy-commit` annotation is the
    /// live commit (all of them must agree).
    K3s {
        namespace: String,
        deployments: Vec<K3sDeployment>,
    },
}

/// What the agent found for one [`LiveTarget`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveService {
    pub service_id: String,
    /// `Ok(Some(full SHA))` when the running service proves a commit, `Ok(None)` when nothing
    /// runs or nothing is stamped, `Err(why)` when the agent could not tell.
    pub observed: Result<Option<String>, String>,
}

/// The dry-run verdict on one object of a [`Query::DryRunManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunObject {
    /// 0-based YAML document index.
    pub document: u32,
    /// `Kind/name`.
    pub object: String,
    pub namespace: Option<String>,
    /// `Err` holds the API server's (or the agent's) reason for refusing the object.
    pub result: Result<(), String>,
}
