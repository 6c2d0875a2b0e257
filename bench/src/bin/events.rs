//! `events`: event stream throughput — log lines per second from an agent launch into the
//! controller's job log, acknowledged — and the lag at that rate, against the job store's own
//! append of the same lines with nothing in between.
//!
//! **Product.** Controller and agent run in this process from their libraries
//! (`serve::bind`/`run`, `service::run`) with a setup written by `init`, as in `tunnel`. A
//! Probe launch with `echo_lines: N` makes the agent emit N numbered log lines: each is
//! numbered by the launch's outbox, appended to the run's `events.jsonl` and step log, sent in
//! batches of at most 256 events, stored by the controller (append + fsync) and only then
//! acknowledged; a full outbox (`event_window`) makes the probe wait. A watcher subscribed to
//! the hub's change notifications records, after each stored batch, the wall clock and the
//! size of the job's `events.jsonl`; afterwards the file maps every size to the last event
//! stored by then.
//!
//! - **lines/s**: N ÷ (time the last echo line was stored − agent timestamp of the first echo
//!   line). Agent timestamps are `time_unix_ms` (whole milliseconds) of the same clock.
//! - **lag**: per stored batch, the wall clock when the hub announced it minus the agent's
//!   timestamp of the last event in it: emit → durable on the controller. Reported as p50,
//!   p99 and max over the batches, and for the last echo line alone.
//!
//! **Reference.** The same N events appended to a fresh job log with the controller's own
//! `JobStore::open_events` + `EventLog::append` (serialize, write, `fsync`) in batches of 256,
//! the largest batch the agent sends, in the same directory on the same disk: the floor of
//! what the job store must do for these lines, without agent, network or acknowledgements.
//! Rounds alternate which side goes first.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use unidesk_bench::report::{Machine, Table, print, write_json};
use unidesk_bench::setup::{Setup, agent_ids, default_parent, free_port, target_dir};
use unidesk_bench::stats::Summary;
use unidesk_controller::hub::Hub;
use unidesk_controller::store::{JobStore, StoredEvent};
use unidesk_protocol::{AgentId, Event, EventBody, LaunchId, LaunchSpec, ProbeSpec, Step};

/// The most events the agent puts in one transmission (`agent::conn`), and the reference's
/// batch size.
const BATCH: usize = 256;

/// How long one product round may take.
const ROUND_LIMIT: Duration = Duration::from_secs(300);

/// Event stream throughput and lag against the job store's own append.
#[derive(Debug, Parser)]
#[command(name = "events")]
struct Args {
    /// 5,000 lines and 2 rounds: a few seconds.
    #[arg(long)]
    quick: bool,
    /// Lines per launch (default: 50,000, or 5,000 with --quick).
    #[arg(long)]
    lines: Option<u32>,
    /// Rounds per side (default: 5, or 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
}

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("warn");
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Wall clock in milliseconds since the epoch, with fractions (agent timestamps are whole ms
/// of the same clock).
fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// One product round.
#[derive(Debug, Clone, Serialize)]
struct ProductRound {
    lines: u32,
    lines_per_s: f64,
    /// Agent timestamp of the first echo line → last echo line stored, seconds.
    stream_seconds: f64,
    /// `hub.submit` → the final job record, seconds (includes the probe's reach checks).
    submit_to_final_seconds: f64,
    /// Emit → stored lag of the last event of each observed batch, ms.
    batch_lag_ms: Summary,
    /// Emit → stored lag of the last echo line, ms.
    last_line_lag_ms: f64,
    /// Stored batches the watcher saw (notifications can coalesce when it falls behind).
    batches_observed: usize,
    events_stored: usize,
}

/// One reference round.
#[derive(Debug, Clone, Serialize)]
struct ReferenceRound {
    lines: u32,
    lines_per_s: f64,
    seconds: f64,
    batches: usize,
}

/// A stored-batch notification: when, and how long the job's log was then.
struct Seen {
    at_ms: f64,
    bytes: u64,
}

async fn product_round(hub: &Hub, agent: &AgentId, lines: u32) -> anyhow::Result<ProductRound> {
    let mut changes = hub.subscribe();
    let started = Instant::now();
    let record = hub
        .submit(
            agent,
            LaunchSpec::Probe(ProbeSpec { echo_lines: lines }),
            ROUND_LIMIT,
        )
        .await
        .with_context(|| format!("submitting a probe with {lines} lines to {agent}"))?;
    let job = record.job_id;
    let path = hub.store().events_path(&job);
    let deadline = tokio::time::Instant::now() + ROUND_LIMIT;
    let mut seen = Vec::new();
    loop {
        let changed = tokio::time::timeout_at(deadline, changes.recv())
            .await
            .with_context(|| format!("job {job} not finished after {ROUND_LIMIT:?}"))?;
        match changed {
            Ok(id) if id != job => continue,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => anyhow::bail!("the hub stopped publishing changes"),
        }
        let at_ms = wall_ms();
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        seen.push(Seen { at_ms, bytes });
        let status = hub.store().load(job.as_str())?.status;
        if status.is_final() {
            if !matches!(status, unidesk_controller::store::JobStatus::Succeeded) {
                anyhow::bail!("the probe {job} ended {status:?}");
            }
            break;
        }
    }
    let submit_to_final = started.elapsed().as_secs_f64();

    // Map each notification's file size to the events complete by then.
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut ends = Vec::new();
    let mut events = Vec::new();
    let mut offset = 0usize;
    for line in text.split_inclusive(|&b| b == b'\n') {
        offset += line.len();
        let event: StoredEvent = serde_json::from_slice(line)
            .with_context(|| format!("parsing {} at byte {offset}", path.display()))?;
        ends.push(offset as u64);
        events.push(event);
    }
    let is_echo = |e: &StoredEvent| matches!(&e.body, EventBody::Log { line, .. } if line.starts_with("echo line "));
    let first_echo = events
        .iter()
        .position(is_echo)
        .context("no echo line stored")?;
    let last_echo = events
        .iter()
        .rposition(is_echo)
        .context("no echo line stored")?;
    let echoed = events.iter().filter(|e| is_echo(e)).count();
    if echoed != lines as usize {
        anyhow::bail!("{echoed} echo lines stored, {lines} expected");
    }
    let mut lags = Vec::new();
    let mut last_stored_ms = None;
    for s in &seen {
        // Events whose line ends at or before the size seen were stored by then.
        let complete = ends.partition_point(|&end| end <= s.bytes);
        if complete == 0 {
            continue;
        }
        let last = &events[complete - 1];
        lags.push(s.at_ms - last.time_unix_ms as f64);
        if last_stored_ms.is_none() && complete > last_echo {
            last_stored_ms = Some(s.at_ms);
        }
    }
    let last_stored_ms = last_stored_ms.context("the last echo line was never seen stored")?;
    let stream_ms = last_stored_ms - events[first_echo].time_unix_ms as f64;
    Ok(ProductRound {
        lines,
        lines_per_s: f64::from(lines) / (stream_ms / 1e3),
        stream_seconds: stream_ms / 1e3,
        submit_to_final_seconds: submit_to_final,
        batch_lag_ms: Summary::of(&lags).context("no stored batch observed")?,
        last_line_lag_ms: last_stored_ms - events[last_echo].time_unix_ms as f64,
        batches_observed: seen.len(),
        events_stored: events.len(),
    })
}

/// The same lines through the job store's own append, in full batches.
fn reference_round(dir: &Path, round: usize, lines: u32) -> anyhow::Result<ReferenceRound> {
    let store = JobStore::open(dir).context("opening the reference job store")?;
    let id = LaunchId::new(format!("reference-{round}")).context("reference job id")?;
    let job_dir = store
        .events_path(&id)
        .parent()
        .context("event log without a directory")?
        .to_path_buf();
    std::fs::create_dir_all(&job_dir).with_context(|| format!("creating {}", job_dir.display()))?;
    let (mut log, _) = store.open_events(&id)?;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    let mut batches = 0;
    for i in 1..=lines {
        batch.push(Event {
            launch_id: id.clone(),
            seq: u64::from(i),
            time_unix_ms: unidesk_agent::events::now_ms(),
            body: EventBody::Log {
                step: Some(Step::Probe),
                line: format!("echo line {i} of {lines}"),
            },
        });
        if batch.len() == BATCH || i == lines {
            log.append(&batch)?;
            batch.clear();
            batches += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(log);
    std::fs::remove_dir_all(&job_dir).with_context(|| format!("removing {}", job_dir.display()))?;
    Ok(ReferenceRound {
        lines,
        lines_per_s: f64::from(lines) / seconds,
        seconds,
        batches,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let lines = args
        .lines
        .unwrap_or(if args.quick { 5_000 } else { 50_000 })
        .max(1);
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 5 }).max(1);
    let target = target_dir()?;
    let cancel = CancellationToken::new();
    let setup = Setup::init(
        &default_parent(&target),
        &agent_ids(1)?,
        "127.0.0.1:0".parse()?,
        free_port()?,
    )?;
    let bound = unidesk_controller::serve::bind(&setup.controller)
        .await
        .context("starting the controller")?;
    let hub = bound.hub.clone();
    let gateway = bound.gateway_addr;
    tokio::spawn(bound.run(cancel.child_token()));
    let (mut agent, secret) = setup.agent(0)?;
    agent.controller.url = format!("wss://{}:{}/agent", gateway.ip(), gateway.port());
    let agent_id = agent.id.clone();
    let event_window = agent.event_window;
    unidesk_bench::setup::start_agent(agent, secret, &hub, cancel.child_token()).await?;
    let reference_dir = setup.dir.path().join("reference");

    // Warm-up, not counted: first launch, run directory, allocator growth.
    product_round(&hub, &agent_id, lines.min(1_000)).await?;
    reference_round(&reference_dir, 0, lines.min(1_000))?;

    let started = Instant::now();
    let mut product = Vec::new();
    let mut reference = Vec::new();
    for round in 0..rounds {
        let product_first = round % 2 == 0;
        for side in 0..2 {
            if (side == 0) == product_first {
                product.push(product_round(&hub, &agent_id, lines).await?);
            } else {
                let dir = reference_dir.clone();
                let r =
                    tokio::task::spawn_blocking(move || reference_round(&dir, round + 1, lines))
                        .await
                        .context("the reference round panicked")??;
                reference.push(r);
            }
        }
    }
    let elapsed = started.elapsed();
    cancel.cancel();

    let summary = |v: Vec<f64>| Summary::of(&v).context("no rounds");
    let p_rate = summary(product.iter().map(|r| r.lines_per_s).collect())?;
    let r_rate = summary(reference.iter().map(|r| r.lines_per_s).collect())?;
    let lag_p50 = summary(product.iter().map(|r| r.batch_lag_ms.p50).collect())?;
    let lag_p99 = summary(product.iter().map(|r| r.batch_lag_ms.p99).collect())?;
    let lag_max = summary(product.iter().map(|r| r.batch_lag_ms.max).collect())?;
    let last_lag = summary(product.iter().map(|r| r.last_line_lag_ms).collect())?;
    let batches = summary(product.iter().map(|r| r.batches_observed as f64).collect())?;
    let ratio = p_rate.median / r_rate.median;

    let mut table = Table::new(&[
        "path",
        "median lines/s",
        "min–max lines/s",
        "spread",
        "÷ reference",
    ]);
    table.row(vec![
        "product: agent probe → WSS → controller job log (fsync, ack)".into(),
        format!("{:.0}", p_rate.median),
        format!("{:.0}–{:.0}", p_rate.min, p_rate.max),
        format!("{:.0}%", p_rate.spread() * 100.0),
        format!("**{ratio:.2}**"),
    ]);
    table.row(vec![
        format!("reference: JobStore EventLog::append, {BATCH}-event batches (fsync each)"),
        format!("{:.0}", r_rate.median),
        format!("{:.0}–{:.0}", r_rate.min, r_rate.max),
        format!("{:.0}%", r_rate.spread() * 100.0),
        "1.00".into(),
    ]);
    let mut lag = Table::new(&[
        "lag, emit → stored on the controller (median of rounds)",
        "ms",
    ]);
    lag.row(vec![
        "per stored batch p50".into(),
        format!("{:.1}", lag_p50.median),
    ]);
    lag.row(vec![
        "per stored batch p99".into(),
        format!("{:.1}", lag_p99.median),
    ]);
    lag.row(vec![
        "per stored batch max".into(),
        format!("{:.1}", lag_max.median),
    ]);
    lag.row(vec![
        "last echo line".into(),
        format!("{:.1}", last_lag.median),
    ]);
    lag.row(vec![
        "stored batches observed per launch".into(),
        format!("{:.0}", batches.median),
    ]);

    let report = serde_json::json!({
        "benchmark": "events",
        "machine": machine,
        "quick": args.quick,
        "lines": lines,
        "rounds": rounds,
        "event_window": event_window,
        "reference_batch": BATCH,
        "method": {
            "product": "in-process controller (serve::bind/run) and agent (service::run); \
                        hub.submit(Probe { echo_lines: N }); lines/s = N / (last echo line \
                        stored − agent timestamp of the first echo line)",
            "lag": "per stored batch: wall clock at the hub's change notification − agent \
                    time_unix_ms of the last event stored by then (1 ms resolution)",
            "reference": "JobStore::open_events + EventLog::append of the same N events in \
                          256-event batches (serialize, write, fsync) in the same directory",
            "alternation": "product first in even rounds, reference first in odd rounds",
        },
        "product_lines_per_s": p_rate,
        "reference_lines_per_s": r_rate,
        "ratio_of_medians": ratio,
        "batch_lag_ms_p50": lag_p50,
        "batch_lag_ms_p99": lag_p99,
        "batch_lag_ms_max": lag_max,
        "last_line_lag_ms": last_lag,
        "product_rounds": product,
        "reference_rounds": reference,
        "measured_seconds": elapsed.as_secs_f64(),
    });
    let json = write_json(&target, "events", &report)?;
    print(&format!(
        "## Event stream ({}, {lines} lines, {rounds} rounds)\n\n{}\nagent event_window = \
         {event_window}; setup under {}\n\n{}\n{}",
        if args.quick { "quick" } else { "full" },
        machine.line(),
        default_parent(&target).display(),
        table.render(),
        lag.render(),
    ));
    print(&format!("written to {}", json.display()));
    Ok(())
}
