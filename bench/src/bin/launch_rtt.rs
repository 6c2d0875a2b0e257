//! `launch_rtt`: the launch round trip with many agent connections held by one controller,
//! and the controller's memory per idle agent.
//!
//! Round trip: a controller runs in this process (`serve::bind`/`run`, holding its `Hub`)
//! and N simulated agents (`unidesk_bench::sim_agent`) connect to it over TLS WebSockets.
//! Each launch is timed from the call of `hub.submit` until the job record read back from
//! the job store says `running` — the agent's `Accepted` has arrived and been stored, which
//! is what `job status` would show. Launches go round-robin over the agents.
//!
//! Memory: the controller binary (`unidesk-controller serve`, found next to this binary)
//! runs as its own process, so the simulated agents are not counted; its VmRSS is read
//! before and after N agents connect, and the difference is divided by N.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use unidesk_bench::report::{Machine, Table, print, write_json};
use unidesk_bench::setup::{
    Nofile, Setup, agent_ids, default_parent, free_port, raise_nofile, target_dir,
};
use unidesk_bench::sim_agent::{self, Counters, Target};
use unidesk_bench::stats::Summary;
use unidesk_controller::admin::AdminRequest;
use unidesk_controller::hub::Hub;
use unidesk_controller::store::JobStatus;
use unidesk_protocol::{AgentId, LaunchSpec, ProbeSpec, Secret};

/// Issue 2's goals.
const GOAL_P99_MS: f64 = 10.0;
const GOAL_KIB_PER_AGENT: f64 = 64.0;

/// How long one launch may take to reach `running` before the run fails.
const LAUNCH_DEADLINE: Duration = Duration::from_secs(10);

/// First proxy port `init` assigns (the simulated agents open no proxy).
const PROXY_PORT_BASE: u16 = 20000;

/// Launch round trip and controller memory per idle agent.
#[derive(Debug, Parser)]
#[command(name = "launch_rtt")]
struct Args {
    /// 200 agents instead of 1000: under a minute on 2 cores (release build).
    #[arg(long)]
    quick: bool,
    /// Simulated agents (default: 1000, or 200 with --quick).
    #[arg(long)]
    agents: Option<usize>,
    /// Timed launches, spread round-robin over the agents.
    #[arg(long, default_value_t = 1000)]
    launches: usize,
    /// Untimed launches before the timed ones (default: 50, or 20 with --quick).
    #[arg(long)]
    warmup: Option<usize>,
    /// Agents connecting at the same time.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
    /// The controller binary for the memory measurement (default: `unidesk-controller` next
    /// to this binary; build it with `cargo build --release -p unidesk-controller`).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Seconds the agents sit idle before the controller's memory is read (one heartbeat
    /// is 5 s, so the default lets a ping and pong pass on every connection).
    #[arg(long, default_value_t = 6)]
    idle_secs: u64,
    /// Skip the memory measurement (no separate controller process).
    #[arg(long)]
    skip_memory: bool,
    /// Directory for the generated setups and the job store (default: `target/bench/tmp`).
    /// Point it at a tmpfs such as `/dev/shm` to see the round trip without disk flushes.
    #[arg(long)]
    setup_dir: Option<PathBuf>,
    /// Name of the JSON report (`<target>/bench/<name>.json`), so runs with several agent
    /// counts can sit side by side.
    #[arg(long, default_value = "launch_rtt")]
    name: String,
}

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("warn");
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The credentials of every simulated agent, read from the configs `init` wrote.
fn credentials(setup: &Setup, n: usize) -> anyhow::Result<Vec<(AgentId, Secret)>> {
    (0..n)
        .map(|i| setup.agent(i).map(|(config, secret)| (config.id, secret)))
        .collect()
}

/// Connects every agent (at most `concurrency` handshakes at once) and starts its session.
/// Returns how long connecting all of them took.
async fn connect_all(
    target: &Target,
    agents: &[(AgentId, Secret)],
    concurrency: usize,
    counters: &Arc<Counters>,
    cancel: &CancellationToken,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut connecting = futures::stream::iter(agents)
        .map(|(id, secret)| async move { sim_agent::connect(target, id, secret).await })
        .buffer_unordered(concurrency.max(1));
    while let Some(ws) = connecting.next().await {
        let ws = ws?;
        let counters = counters.clone();
        let cancel = cancel.child_token();
        tokio::spawn(async move {
            let reason = sim_agent::serve(ws, counters, cancel).await;
            tracing::debug!(%reason, "simulated agent ended");
        });
    }
    Ok(started.elapsed())
}

/// Waits until `count()` reaches `want`, polling, for at most `limit`.
async fn wait_for<F, Fut>(what: &str, want: usize, limit: Duration, count: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let deadline = Instant::now() + limit;
    loop {
        let have = count().await;
        if have >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: {have} of {want} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One launch: submit, then wait until the stored job record says `running`. Returns the
/// submit call's duration and the whole round trip.
async fn launch(hub: &Hub, agent: &AgentId) -> anyhow::Result<(Duration, Duration)> {
    let mut changes = hub.subscribe();
    let started = Instant::now();
    let record = hub
        .submit(
            agent,
            LaunchSpec::Probe(ProbeSpec { echo_lines: 0 }),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("submitting a probe to {agent}"))?;
    let submitted = started.elapsed();
    let job = record.job_id;
    let deadline = tokio::time::Instant::now() + LAUNCH_DEADLINE;
    loop {
        let changed = tokio::time::timeout_at(deadline, changes.recv())
            .await
            .with_context(|| {
                format!("job {job} on {agent} not running after {LAUNCH_DEADLINE:?}")
            })?;
        match changed {
            Ok(id) if id != job => continue,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => anyhow::bail!("the hub stopped publishing changes"),
        }
        let status = hub.store().load(job.as_str())?.status;
        match status {
            JobStatus::Running => return Ok((submitted, started.elapsed())),
            JobStatus::Queued | JobStatus::Dispatched => continue,
            other => anyhow::bail!("job {job} on {agent} ended {other:?} instead of running"),
        }
    }
}

/// The reference: one crash-safe write of a job-record-sized file (write, fsync, rename,
/// fsync the directory) with the store's own function, on the same disk, between launches.
async fn atomic_write(path: &std::path::Path) -> anyhow::Result<Duration> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let bytes = vec![b' '; 1024];
        let started = Instant::now();
        unidesk_agent::atomic::write_file(&path, &bytes, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(started.elapsed())
    })
    .await
    .context("the reference write panicked")?
}

fn warmup(args: &Args) -> usize {
    args.warmup.unwrap_or(if args.quick { 20 } else { 50 })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct RttResult {
    total: Summary,
    write: Summary,
    submit: Summary,
    after_submit: Summary,
    connect_all: Duration,
    accepted: u64,
}

async fn measure_rtt(
    args: &Args,
    n: usize,
    target_dir: &std::path::Path,
) -> anyhow::Result<RttResult> {
    let setup = Setup::init(
        target_dir,
        &agent_ids(n)?,
        "127.0.0.1:0".parse()?,
        PROXY_PORT_BASE,
    )?;
    let agents = credentials(&setup, n)?;
    let cancel = CancellationToken::new();
    let bound = unidesk_controller::serve::bind(&setup.controller)
        .await
        .context("starting the controller")?;
    let hub = bound.hub.clone();
    let (first, _) = setup.agent(0)?;
    let target = Target::new(bound.gateway_addr, &first)?;
    tokio::spawn(bound.run(cancel.child_token()));

    let counters = Arc::new(Counters::default());
    let took = connect_all(
        &target,
        &agents,
        args.connect_concurrency,
        &counters,
        &cancel,
    )
    .await?;
    wait_for("agents registered", n, Duration::from_secs(30), || {
        let hub = hub.clone();
        async move { hub.agents().len() }
    })
    .await?;

    let mut total = Vec::with_capacity(args.launches);
    let mut submit = Vec::with_capacity(args.launches);
    let mut after = Vec::with_capacity(args.launches);
    let mut write = Vec::with_capacity(args.launches);
    let reference = setup.dir.path().join("reference.json");
    let warmup = warmup(args);
    for i in 0..warmup + args.launches {
        let (agent, _) = &agents[i % n];
        let (s, t) = launch(&hub, agent).await?;
        let w = atomic_write(&reference).await?;
        if i >= warmup {
            submit.push(ms(s));
            total.push(ms(t));
            after.push(ms(t.saturating_sub(s)));
            write.push(ms(w));
        }
    }
    let accepted = counters.accepted.load(Ordering::Relaxed);
    cancel.cancel();
    Ok(RttResult {
        total: Summary::of(&total).context("no launches timed")?,
        write: Summary::of(&write).context("no launches timed")?,
        submit: Summary::of(&submit).context("no launches timed")?,
        after_submit: Summary::of(&after).context("no launches timed")?,
        connect_all: took,
        accepted,
    })
}

struct MemoryResult {
    before_kib: u64,
    after_kib: u64,
    peak_kib: u64,
    per_agent_kib: f64,
    binary: PathBuf,
}

/// A `kB` field of `/proc/<pid>/status`.
fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no {field}"))
}

// The memory figure must not include the simulated agents, so the controller is its own
// process: the benchmark's one spawned child, killed by its handle when measured.
#[allow(clippy::disallowed_methods)]
async fn measure_memory(
    args: &Args,
    n: usize,
    parent: &std::path::Path,
) -> anyhow::Result<MemoryResult> {
    let binary = match &args.controller_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .join("unidesk-controller"),
    };
    if !binary.is_file() {
        anyhow::bail!(
            "{} not found: build it first with `cargo build --release -p unidesk-controller` \
             (or pass --controller-bin, or --skip-memory)",
            binary.display()
        );
    }
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let setup = Setup::init(parent, &agent_ids(n)?, listen, PROXY_PORT_BASE)?;
    let agents = credentials(&setup, n)?;
    let config = setup.report.controller_config.clone();
    let socket = setup.controller.path(&setup.controller.admin.socket);
    let log_path = setup.dir.path().join("controller.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = tokio::process::Command::new(&binary)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id().context("the controller exited at once")?;

    let registered = || {
        let socket = socket.clone();
        async move {
            match unidesk_controller::admin::request(&socket, &AdminRequest::Agents).await {
                Ok(Ok(serde_json::Value::Array(list))) => list.len(),
                _ => 0,
            }
        }
    };
    let ready = async {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if unidesk_controller::admin::request(&socket, &AdminRequest::Agents)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "the controller exited with {status}; see {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!("the controller's admin socket did not answer within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    ready.await?;
    // Let start-up allocations settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kib = proc_status_kib(pid, "VmRSS")?;

    let cancel = CancellationToken::new();
    let (first, _) = setup.agent(0)?;
    let target = Target::new(listen, &first)?;
    let counters = Arc::new(Counters::default());
    connect_all(
        &target,
        &agents,
        args.connect_concurrency,
        &counters,
        &cancel,
    )
    .await?;
    wait_for("agents registered", n, Duration::from_secs(30), registered).await?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    wait_for(
        "agents still registered",
        n,
        Duration::from_secs(5),
        registered,
    )
    .await?;
    let after_kib = proc_status_kib(pid, "VmRSS")?;
    let peak_kib = proc_status_kib(pid, "VmHWM")?;
    cancel.cancel();
    child.kill().await.context("stopping the controller")?;
    Ok(MemoryResult {
        before_kib,
        after_kib,
        peak_kib,
        per_agent_kib: after_kib.saturating_sub(before_kib) as f64 / n as f64,
        binary,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let n = args
        .agents
        .unwrap_or(if args.quick { 200 } else { 1000 })
        .max(1);
    let target_dir = target_dir()?;
    // Both ends of every connection may be in this process (the round trip), plus one open
    // event log per launched job and the runtime's own files.
    let want = u64::try_from(2 * n + args.launches + warmup(&args) + 1024)?;
    let nofile: Nofile = raise_nofile(want)?;

    let parent = args
        .setup_dir
        .clone()
        .unwrap_or_else(|| default_parent(&target_dir));

    let started = Instant::now();
    let rtt = measure_rtt(&args, n, &parent).await?;
    let memory = if args.skip_memory {
        None
    } else {
        Some(measure_memory(&args, n, &parent).await?)
    };
    let elapsed = started.elapsed();

    let mut table = Table::new(&["figure", "value", "goal", "met"]);
    let yes = |ok: bool| if ok { "yes" } else { "NO" }.to_string();
    table.row(vec![
        format!(
            "launch round trip p50 ({} launches, {n} agents)",
            rtt.total.count
        ),
        format!("{:.2} ms", rtt.total.p50),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        "launch round trip p99".into(),
        format!("{:.2} ms", rtt.total.p99),
        format!("≤ {GOAL_P99_MS} ms"),
        yes(rtt.total.p99 <= GOAL_P99_MS),
    ]);
    table.row(vec![
        "  of which `submit` call p50 / p99".into(),
        format!("{:.2} / {:.2} ms", rtt.submit.p50, rtt.submit.p99),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        "  of which submit returned → running p50 / p99".into(),
        format!(
            "{:.2} / {:.2} ms",
            rtt.after_submit.p50, rtt.after_submit.p99
        ),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        "reference: one crash-safe 1 KiB write (fsync) p50 / p99".into(),
        format!("{:.2} / {:.2} ms", rtt.write.p50, rtt.write.p99),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        "launch round trip max".into(),
        format!("{:.2} ms", rtt.total.max),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        format!("connecting {n} agents (TCP+TLS+WebSocket+Hello)"),
        format!("{:.2} s", rtt.connect_all.as_secs_f64()),
        String::new(),
        String::new(),
    ]);
    if let Some(m) = &memory {
        table.row(vec![
            format!("controller VmRSS idle → {n} idle agents"),
            format!(
                "{:.1} → {:.1} MiB (peak {:.1})",
                m.before_kib as f64 / 1024.0,
                m.after_kib as f64 / 1024.0,
                m.peak_kib as f64 / 1024.0
            ),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            "controller memory per idle agent".into(),
            format!("{:.1} KiB", m.per_agent_kib),
            format!("≤ {GOAL_KIB_PER_AGENT} KiB"),
            yes(m.per_agent_kib <= GOAL_KIB_PER_AGENT),
        ]);
    }

    let report = serde_json::json!({
        "benchmark": "launch_rtt",
        "machine": machine,
        "quick": args.quick,
        "agents": n,
        "launches": args.launches,
        "warmup": warmup(&args),
        "measure": "hub.submit call → job record in the store reads `running`",
        "setup_dir": parent,
        "round_trip_ms": rtt.total,
        "submit_call_ms": rtt.submit,
        "after_submit_ms": rtt.after_submit,
        "reference_atomic_write_ms": rtt.write,
        "accepted_by_agents": rtt.accepted,
        "connect_all_seconds": rtt.connect_all.as_secs_f64(),
        "goal_p99_ms": GOAL_P99_MS,
        "memory": memory.as_ref().map(|m| serde_json::json!({
            "controller_binary": m.binary,
            "vmrss_before_kib": m.before_kib,
            "vmrss_after_kib": m.after_kib,
            "vmhwm_kib": m.peak_kib,
            "per_idle_agent_kib": m.per_agent_kib,
            "idle_secs": args.idle_secs,
        })),
        "goal_kib_per_agent": GOAL_KIB_PER_AGENT,
        "rlimit_nofile": nofile,
        "measured_seconds": elapsed.as_secs_f64(),
    });
    let json = write_json(&target_dir, &args.name, &report)?;
    let raised = if nofile.after > nofile.before {
        format!("RLIMIT_NOFILE raised {} → {}", nofile.before, nofile.after)
    } else {
        format!("RLIMIT_NOFILE {} (enough)", nofile.before)
    };
    print(&format!(
        "## Launch round trip and controller memory ({})\n\n{}\n{raised}; job store under {}\n\n{}",
        if args.quick { "quick" } else { "full" },
        machine.line(),
        parent.display(),
        table.render(),
    ));
    print(&format!("written to {}", json.display()));
    Ok(())
}
