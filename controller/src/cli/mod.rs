//! The operator CLI of `unidesk-controller`: argument parsing and one function per verb
//! group. Job, deploy and CI verbs print JSON on stdout; exit status says how it went
//! (0 ok, 1 the job failed, 2 bad input, 3 the controller or agent is unreachable).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use unidesk_protocol::AgentId;

use crate::config::{ControllerConfig, DEFAULT_CONFIG};

pub mod agent;
pub mod ci;
pub mod deploy;
mod devenv;
mod generate;
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
    about = "Deploy controller for UniDesk nodes",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// How results are printed: `json` (the default; what scripts parse) or `text` (lines
    /// and tables; coloured on a terminal unless NO_COLOR is set). Log lines stay text.
    #[arg(long, global = true, value_enum, default_value_t = output::Format::Json)]
    pub output: output::Format,
    #[command(subcommand)]
    pub command: Command,
}

/// The `--help` examples (also the EXTRA section of the man page).
const EXAMPLES: &str = "\
EXAMPLES:
  # A working setup: CA, server certificate, controller.toml and
  # one agent-<ID>.toml per agent:
  unidesk-controller init --dir /etc/unidesk --agents d601,d518 \\
      --listen 0.0.0.0:7443 --egress-allow github.com:443
  # Run under systemd (the packaged unit does this):
  unidesk-controller serve --config /etc/unidesk/controller.toml
  # Who is connected, and a probe of one agent:
  unidesk-controller agents
  unidesk-controller probe --agent d601 --wait-ms 10000
  # Plan, then deploy the dev environment and wait for the jobs:
  unidesk-controller deploy plan --env dev
  unidesk-controller deploy apply --env dev --wait-ms 600000
  # A job's record and log:
  unidesk-controller job status JOB_ID
  unidesk-controller job logs JOB_ID --follow

Exit status: 0 ok, 1 the job failed, 2 bad input,
3 the controller or an agent is unreachable.";

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
        /// Lay out for the Debian packages' units: state in /var/lib/unidesk, the admin socket
        /// in /run/unidesk, agents' directories in /var/lib/unidesk-agent; replaces the
        /// package's default controller.toml while it is unchanged.
        #[arg(long)]
        packaged: bool,
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
    /// Validate the config and what it names: TLS files, CA, state directory, admin socket,
    /// gateway address, desired state, agent entries, egress allowlist. One `{name, ok,
    /// detail}` per item; exit 0 all ok, 2 the config is wrong, 3 something is unreachable.
    #[command(
        after_help = "EXAMPLES:\n  unidesk-controller check --config /etc/unidesk/controller.toml\n  \
                      unidesk-controller check --output text"
    )]
    Check(ConfigArg),
    /// Agent credentials: enrol, rotate, revoke, list. A new secret is printed once; the
    /// controller config keeps only its hash.
    #[command(
        subcommand,
        after_help = "EXAMPLES:\n  unidesk-controller agent add d602 --agent-config /etc/unidesk/agent-d602.toml\n  \
                      unidesk-controller agent rotate d601 --agent-config /etc/unidesk/agent-d601.toml\n  \
                      unidesk-controller agent revoke d518\n  \
                      unidesk-controller agent list --output text"
    )]
    Agent(agent::AgentCommand),
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
    /// Write man pages or a shell completion script generated from these definitions.
    #[command(subcommand, hide = true)]
    Generate(unidesk_agent::manual::GenerateCommand),
}

#[derive(Debug, Subcommand)]
pub enum DevEnvCommand {
    /// Check Kubernetes manifests for the dev environment: objects only in the dev namespace,
    /// no NodePort/LoadBalancer, no hostPort/hostNetwork, no production DATABASE_URL.
    /// Prints `{ok, manifest, objects, violations}` (and `dryRun` with --kubectl-dry-run);
    /// exit 2 on any violation or dry-run rejection, 3 when the agent cannot be asked.
    Validate {
        /// The multi-document YAML manifest to check. Without it: the dev foundation manifest
        /// config.json names (`environments.dev.foundation`), against its allowed objects.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// config.json, for the objects allowed host networking and the dev foundation
        /// (default without --manifest: `desired.catalog` of the controller config).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// The dev namespace every object must be in.
        #[arg(long, default_value = crate::desired::devenv::DEV_NAMESPACE)]
        namespace: String,
        /// After the static checks pass, have --agent send every object to its node's API
        /// server as a server-side apply with dryRun=All (through its kubeconfig); nothing is
        /// applied. Prints each object's verdict.
        #[arg(long, requires = "agent")]
        kubectl_dry_run: bool,
        /// The agent whose node runs the dry run.
        #[arg(long, requires = "kubectl_dry_run")]
        agent: Option<AgentId>,
        #[command(flatten)]
        config: ConfigArg,
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
    /// The live state, asked from each node's agent, against the desired state, changing
    /// nothing: the plan plus `inSync`, `drift` and `unknown` per service. Exit 1 when a
    /// service drifted, 3 when none did but some could not be compared.
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
    output::set_format(cli.output);
    match cli.command {
        Command::Init {
            dir,
            agents,
            listen,
            proxy_port,
            egress_allow,
            packaged,
        } => {
            let report = crate::init::init(&crate::init::InitPlan {
                dir,
                layout: crate::init::Layout::packaged(packaged),
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
        Command::Check(c) => {
            let report = crate::check::run(&c.config).await;
            output::print(&report);
            match report.exit_code() {
                0 => Ok(()),
                code => {
                    let failed = report.failed().join(", ");
                    let e = anyhow::anyhow!("{}: check failed: {failed}", c.config.display());
                    Err(if code == 2 {
                        CliError::Input(e)
                    } else {
                        CliError::Unreachable(e)
                    })
                }
            }
        }
        Command::Agent(command) => agent::run(command).await,
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
        Command::Deploy(DeployCommand::Plan { desired, config }) => {
            let source = desired.source()?;
            let config = config.load()?;
            let (catalog, service) = (desired.catalog.as_deref(), desired.service.as_deref());
            deploy::plan_and_report(&config, &source, catalog, service, deploy::PlanVerb::Plan)
                .await
        }
        Command::Deploy(DeployCommand::Check { desired, config }) => {
            let source = desired.source()?;
            let config = config.load()?;
            let (catalog, service) = (desired.catalog.as_deref(), desired.service.as_deref());
            deploy::plan_and_report(&config, &source, catalog, service, deploy::PlanVerb::Check)
                .await
        }
        Command::DevEnv(DevEnvCommand::Validate {
            manifest,
            catalog,
            namespace,
            kubectl_dry_run,
            agent,
            config,
        }) => {
            let dry_run = match (kubectl_dry_run, agent) {
                (true, Some(agent)) => Some((config.load()?, agent)),
                _ => None,
            };
            // The controller config is read only when it is needed to find config.json.
            let catalog = match (catalog, &manifest) {
                (Some(path), _) => Some(path),
                (None, Some(_)) => None,
                (None, None) => Some(deploy::catalog_path(&config.load()?, None)?),
            };
            devenv::validate(manifest.as_deref(), catalog.as_deref(), &namespace, dry_run).await
        }
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
        Command::Generate(what) => generate::run(&what),
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
