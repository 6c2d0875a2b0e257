//! The operator CLI of `unidesk-controller`: argument parsing and one function per verb
//! group. Job, deploy and CI verbs print JSON on stdout; exit status says how it went
//! (0 ok, 1 the job failed, 2 bad input, 3 the controller or agent is unreachable).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use unidesk_protocol::AgentId;

use crate::config::{ControllerConfig, DEFAULT_CONFIG};

pub mod ci;
pub mod deploy;
pub(crate) mod jobs;
pub mod output;

/// A CLI failure with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments, config or input (exit 2).
    #[error("{0:#}")]
    Input(anyhow::Error),
    /// The controller or an agent cannot be reached (exit 3).
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    /// The operation ran and failed (exit 1).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl CliError {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Input(_) => 2,
            CliError::Unreachable(_) => 3,
        }
    }
}

/// `unidesk-controller`
#[derive(Debug, Parser)]
#[command(
    name = "unidesk-controller",
    version,
    about = "Deploy controller for UniDesk nodes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Controller configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> Result<ControllerConfig, CliError> {
        ControllerConfig::load(&self.config).map_err(|e| CliError::Input(e.into()))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a working loopback setup: CA, server certificate, controller and agent configs.
    Init {
        /// Directory to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Agent ids, comma separated (e.g. d601,d518).
        #[arg(long, value_delimiter = ',', required = true)]
        agents: Vec<AgentId>,
        /// Gateway listen address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: std::net::SocketAddr,
        /// Egress proxy port of the first agent; each further agent gets the next port.
        #[arg(long, default_value_t = 18789)]
        proxy_port: u16,
        /// Egress allowlist entry (repeatable), e.g. `github.com:443` or `cidr:127.0.0.0/8`.
        #[arg(long = "egress-allow")]
        egress_allow: Vec<String>,
    },
    /// Run the gateway, the admin socket and the job store.
    Serve(ConfigArg),
    /// List connected agents as JSON.
    Agents(ConfigArg),
    /// Launch a probe on an agent (facts and reachability; optionally echo log lines).
    Probe {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        agent: AgentId,
        /// Numbered log lines the agent echoes back as events.
        #[arg(long, default_value_t = 0)]
        echo_lines: u32,
        /// Wait up to this long for the job to finish.
        #[arg(long)]
        wait_ms: Option<u64>,
        /// Deadline of the launch.
        #[arg(long, default_value_t = 600_000)]
        deadline_ms: u64,
    },
    /// Inspect and control jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Desired-state deploys.
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Dev-environment checks and preparation.
    #[command(subcommand)]
    DevEnv(DevEnvCommand),
    /// The dev smoke CI runner: `run-dev-e2e` on the CI node, `logs <runId>`.
    #[command(subcommand)]
    Ci(ci::CiCommand),
    /// Run the embedded default end to end: a controller, an agent, a sample service in a
    /// local Git repository, two deploys and their verification.
    Demo {
        /// Directory for the demo's setup, repository and state (default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevEnvCommand {
    /// Check Kubernetes manifests for the dev environment: objects only in the dev namespace,
    /// no NodePort/LoadBalancer, no hostPort/hostNetwork, no production DATABASE_URL.
    /// Prints `{ok, manifest, objects, violations}`; exit 2 on any violation.
    Validate {
        /// The multi-document YAML manifest to check.
        #[arg(long)]
        manifest: PathBuf,
        /// The dev namespace every object must be in.
        #[arg(long, default_value = crate::desired::devenv::DEV_NAMESPACE)]
        namespace: String,
    },
    /// Import the images a node's pods need into its k3s containerd before any rollout: the
    /// pause image (pulled through the agent's egress proxy when missing, accepted only with
    /// entrypoint `/pause`) and the agent's `runtime.prewarm_images`, from the node's Docker.
    /// Prints the job as JSON.
    PrewarmImages {
        #[command(flatten)]
        config: ConfigArg,
        /// The node's agent.
        #[arg(long)]
        agent: AgentId,
        /// Wait up to this long for the job to finish.
        #[arg(long)]
        wait_ms: Option<u64>,
        /// Deadline of the launch.
        #[arg(long, default_value_t = 1_800_000)]
        deadline_ms: u64,
    },
}

/// Runs `dev-env validate`: prints the report, exit 2 on violations or unreadable input.
fn dev_env_validate(manifest: &std::path::Path, namespace: &str) -> Result<(), CliError> {
    use crate::desired::devenv;
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| CliError::Input(anyhow::anyhow!("cannot read {}: {e}", manifest.display())))?;
    let report = devenv::validate(&text, namespace)
        .map_err(|e| CliError::Input(anyhow::anyhow!("{}: {e}", manifest.display())))?;
    output::json(&serde_json::json!({
        "ok": report.ok(),
        "manifest": manifest.display().to_string(),
        "namespace": report.namespace,
        "objects": report.objects,
        "violations": report.violations,
    }));
    if report.ok() {
        Ok(())
    } else {
        Err(CliError::Input(anyhow::anyhow!(
            "{}: {} dev-env violation(s)",
            manifest.display(),
            report.violations.len()
        )))
    }
}

/// Where `deploy.json` comes from: exactly one of `--file` and `--env`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("desired_source").required(true).args(["file", "env"])))]
pub struct DesiredArgs {
    /// A local deploy.json (the compatibility path; environment mode reads fixed refs).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Environment mode: read deploy.json from the desired-state repository's fixed ref
    /// (dev: origin/deploy/dev, prod: origin/deploy/prod), never from a local file.
    #[arg(long, value_name = "dev|prod")]
    pub env: Option<crate::desired::Environment>,
    /// The desired-state repository URL for --env (default: `desired.repository` of the
    /// controller config).
    #[arg(long, value_name = "URL", requires = "env")]
    pub repository: Option<String>,
    /// config.json (default: `desired.catalog` of the controller config).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Only this service.
    #[arg(long)]
    pub service: Option<String>,
}

impl DesiredArgs {
    /// The source the flags name; clap's group guarantees exactly one of them.
    fn source(&self) -> Result<deploy::Source, CliError> {
        match (&self.file, self.env) {
            (Some(file), None) => Ok(deploy::Source::File(file.clone())),
            (None, Some(env)) => Ok(deploy::Source::Environment {
                env,
                repository: self.repository.clone(),
            }),
            _ => Err(CliError::Input(anyhow::anyhow!(
                "pass exactly one of --file PATH and --env dev|prod"
            ))),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Build and replace services on their nodes; prints job ids at once unless --wait-ms.
    Apply {
        #[command(flatten)]
        desired: DesiredArgs,
        /// Resolve and plan on the node, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rebuild and replace even when the live commit matches.
        #[arg(long)]
        force: bool,
        /// Wait up to this long for every job to finish.
        #[arg(long)]
        wait_ms: Option<u64>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The plan: desired commit, node and action per service.
    Plan {
        #[command(flatten)]
        desired: DesiredArgs,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The live state against the desired state, changing nothing. Until agents answer
    /// live-state queries this is the same dry-run plan as `plan` (the seed's `deploy check
    /// --env` is that plan too); lines whose live state is not known say `unknown`.
    Check {
        #[command(flatten)]
        desired: DesiredArgs,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// A job's record and the tail of its log.
    Status {
        job_id: String,
        #[arg(long, default_value_t = 30_000)]
        tail_bytes: u64,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Every job, oldest first.
    List(ConfigArg),
    /// A job's log as text.
    Logs {
        job_id: String,
        /// Keep printing new lines until the job ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ask the agent to stop a job.
    Cancel {
        job_id: String,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Runs one CLI invocation.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Init {
            dir,
            agents,
            listen,
            proxy_port,
            egress_allow,
        } => {
            let report = crate::init::init(&crate::init::InitPlan {
                dir,
                agents,
                listen,
                proxy_port,
                egress_allow,
            })
            .map_err(|e| CliError::Input(e.into()))?;
            output::json(&report);
            Ok(())
        }
        Command::Serve(c) => {
            let config = c.load()?;
            let bound = crate::serve::bind(&config).await.map_err(CliError::Input)?;
            let cancel = tokio_util::sync::CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                stop.cancel();
            });
            // Ready once the store is open and the gateway and admin socket are bound.
            let notifier = unidesk_agent::notify::Notifier::from_env();
            notifier.ready("controller serving", &cancel);
            bound.run(cancel).await;
            notifier.stopping();
            Ok(())
        }
        Command::Agents(c) => {
            let config = c.load()?;
            let data = jobs::admin(&config, &crate::admin::AdminRequest::Agents).await?;
            output::json(&data);
            Ok(())
        }
        Command::Probe {
            config,
            agent,
            echo_lines,
            wait_ms,
            deadline_ms,
        } => {
            let config = config.load()?;
            let request = crate::admin::AdminRequest::probe(agent, echo_lines, deadline_ms);
            jobs::launch(&config, &request, wait_ms.map(Duration::from_millis)).await
        }
        Command::Job(job) => jobs::run(job).await,
        Command::Deploy(DeployCommand::Apply {
            desired,
            dry_run,
            force,
            wait_ms,
            config,
        }) => {
            let source = desired.source()?;
            // First: no config, catalog or manifest is read, nothing fetched or contacted.
            deploy::refuse_prod_apply(&source)?;
            let config = config.load()?;
            let catalog = deploy::load_catalog(&config, desired.catalog.as_deref())?;
            let loaded = deploy::load_desired(&config, &source).await?;
            let options = deploy::ApplyOptions {
                service: desired.service,
                force,
                dry_run,
                wait: wait_ms.map(Duration::from_millis),
            };
            deploy::apply_and_report(&config, &loaded, &catalog, &options)
                .await
                .map(|_| ())
        }
        Command::Deploy(
            DeployCommand::Plan { desired, config } | DeployCommand::Check { desired, config },
        ) => {
            let source = desired.source()?;
            let config = config.load()?;
            let catalog = deploy::load_catalog(&config, desired.catalog.as_deref())?;
            let loaded = deploy::load_desired(&config, &source).await?;
            let plan = deploy::plan_desired(&loaded, &catalog, desired.service.as_deref())?;
            deploy::print_plan(&loaded, &plan);
            Ok(())
        }
        Command::DevEnv(DevEnvCommand::Validate {
            manifest,
            namespace,
        }) => dev_env_validate(&manifest, &namespace),
        Command::DevEnv(DevEnvCommand::PrewarmImages {
            config,
            agent,
            wait_ms,
            deadline_ms,
        }) => {
            let config = config.load()?;
            let request = crate::admin::AdminRequest::Launch {
                agent,
                spec: unidesk_protocol::LaunchSpec::Prewarm,
                deadline_ms,
            };
            jobs::launch(&config, &request, wait_ms.map(Duration::from_millis)).await
        }
        Command::Ci(command) => ci::run(command).await,
        Command::Demo { dir } => crate::demo::run(dir).await,
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
