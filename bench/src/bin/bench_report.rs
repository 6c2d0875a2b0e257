//! `bench_report`: gathers the JSON every benchmark wrote (`<dir>/<name>.json`) into one
//! `<dir>/report.json` and `<dir>/report.md` (also printed). `scripts/bench` runs it last.
//!
//! Every row is one figure with the product's value, the reference's value measured in the
//! same run, `ratio` = product ÷ reference (whichever way is better for the unit), the goal
//! from the issues as text, and `goal_met` (`null` when there is no goal, or when the run was
//! not the goal's setting, such as fewer agents than the goal names). `raw` is the part of the
//! benchmark's own JSON the row comes from.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use unidesk_bench::report::{Machine, Table, print};

/// One report from the benchmarks' JSON files.
#[derive(Debug, Parser)]
#[command(name = "bench_report")]
struct Args {
    /// Directory holding `<name>.json` and receiving `report.json` and `report.md`.
    #[arg(long)]
    dir: PathBuf,
    /// `quick` or `full`.
    #[arg(long)]
    mode: String,
    /// Cargo profile the benchmarks were built with (`debug` or `release`).
    #[arg(long)]
    profile: String,
    /// Benchmarks that ran, in order, as `NAME=ok` or `NAME=failed` (a failed one has no
    /// figures; its log is named in the report).
    #[arg(long = "ran", value_name = "NAME=STATUS")]
    ran: Vec<String>,
    /// Wall time of the whole harness so far, seconds.
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    product: Option<f64>,
    reference: Option<f64>,
    ratio: Option<f64>,
    unit: String,
    goal: Option<String>,
    goal_met: Option<bool>,
    /// Which benchmark binary wrote the figure.
    source: String,
    raw: Value,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut at = v;
    for key in path {
        at = at.get(key)?;
    }
    at.as_f64()
}

fn ratio(product: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (product, reference) {
        (Some(p), Some(r)) if r != 0.0 => Some(p / r),
        _ => None,
    }
}

struct Rows(Vec<Row>);

impl Rows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        source: &str,
        name: String,
        product: Option<f64>,
        reference: Option<f64>,
        unit: &str,
        goal: Option<&str>,
        goal_met: Option<bool>,
        raw: Value,
    ) {
        self.0.push(Row {
            name,
            product,
            reference,
            ratio: ratio(product, reference),
            unit: unit.into(),
            goal: goal.map(str::to_string),
            goal_met,
            source: source.into(),
            raw,
        });
    }
}

fn tunnel(v: &Value, rows: &mut Rows) {
    let entries = v["throughput"].as_array().cloned().unwrap_or_default();
    let mut counts: Vec<u64> = entries
        .iter()
        .filter_map(|e| e["streams"].as_u64())
        .collect();
    counts.dedup();
    for count in counts {
        let of = |path: &str| {
            entries
                .iter()
                .find(|e| e["streams"].as_u64() == Some(count) && e["path"] == path)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let (p, t, c) = (of("product"), of("direct-tls"), of("direct-tcp"));
        let product = num(&p, &["mb_per_s", "median"]);
        let reference = num(&t, &["mb_per_s", "median"]);
        let goal = num(v, &["goal_product_over_tls"]).unwrap_or(0.6);
        rows.push(
            "tunnel",
            format!(
                "tunnel throughput, {count} stream{} (vs direct rustls TLS)",
                if count == 1 { "" } else { "s" }
            ),
            product,
            reference,
            "MB/s",
            Some(&format!("ratio ≥ {goal}")),
            ratio(product, reference).map(|r| r >= goal),
            json!({ "product": p, "direct_tls": t, "direct_tcp": c }),
        );
    }
    let lat = &v["setup_latency_ms"];
    rows.push(
        "tunnel",
        "tunnel connection set-up p50 (vs direct rustls TLS)".into(),
        num(lat, &["product", "p50"]),
        num(lat, &["direct-tls", "p50"]),
        "ms",
        None,
        None,
        lat.clone(),
    );
}

fn launch_rtt(v: &Value, rows: &mut Rows) {
    let agents = v["agents"].as_u64().unwrap_or(0);
    let goal_ms = num(v, &["goal_p99_ms"]).unwrap_or(10.0);
    let p99 = num(v, &["round_trip_ms", "p99"]);
    rows.push(
        "launch_rtt",
        format!("launch round trip p99, {agents} agents (vs one crash-safe 1 KiB write p99)"),
        p99,
        num(v, &["reference_atomic_write_ms", "p99"]),
        "ms",
        Some(&format!("p99 ≤ {goal_ms} ms with 1,000 agents")),
        // The goal names 1,000 agents; other counts are shown but not judged.
        p99.filter(|_| agents == 1000).map(|p| p <= goal_ms),
        json!({
            "agents": agents,
            "launches": v["launches"],
            "round_trip_ms": v["round_trip_ms"],
            "reference_atomic_write_ms": v["reference_atomic_write_ms"],
        }),
    );
    if let Some(per) = num(v, &["memory", "per_idle_agent_kib"]) {
        let goal = num(v, &["goal_kib_per_agent"]).unwrap_or(64.0);
        // With few agents the difference of two RSS readings is mostly noise.
        rows.push(
            "launch_rtt",
            format!("controller memory per idle agent, {agents} agents"),
            Some(per),
            None,
            "KiB",
            Some(&format!("≤ {goal} KiB (judged from 200 agents)")),
            (agents >= 200).then_some(per <= goal),
            v["memory"].clone(),
        );
    }
}

fn deploy(v: &Value, rows: &mut Rows) {
    for (case, key) in [("warm", "goal_warm_ratio"), ("cold", "goal_cold_ratio")] {
        let c = &v[case];
        let product = num(c, &["product_seconds", "median"]);
        let reference = num(c, &["reference_seconds", "median"]);
        let goal = num(v, &[key]);
        rows.push(
            "deploy",
            format!("deploy apply end to end, {case} (vs git clone | git archive | docker build | docker-compose up)"),
            product,
            reference,
            "s",
            goal.map(|g| format!("ratio ≤ {g}")).as_deref(),
            ratio(product, reference).zip(goal).map(|(r, g)| r <= g),
            json!({
                "product_seconds": c["product_seconds"],
                "reference_seconds": c["reference_seconds"],
                "ratio_of_medians": c["ratio_of_medians"],
            }),
        );
    }
    if let Some(kib) = num(v, &["memory", "deploy_vmhwm_kib"]) {
        let goal = num(v, &["goal_peak_mib"]).unwrap_or(64.0);
        let mib = kib / 1024.0;
        rows.push(
            "deploy",
            format!(
                "agent peak memory (VmHWM) streaming a {} MiB context",
                v["memory"]["context_mib"]
            ),
            Some(mib),
            None,
            "MiB",
            Some(&format!("≤ {goal} MiB")),
            Some(mib <= goal),
            v["memory"]["deploy_peaks"].clone(),
        );
    }
}

fn import(v: &Value, rows: &mut Rows) {
    let product = num(v, &["product_seconds", "median"]);
    let reference = num(v, &["reference_seconds", "median"]);
    let goal = num(v, &["goal_ratio"]).unwrap_or(1.25);
    let mib = num(v, &["image_bytes"]).map_or(0.0, |b| b / 1048576.0);
    rows.push(
        "import",
        format!("containerd import of a {mib:.0} MiB image (vs docker save | ctr images import)"),
        product,
        reference,
        "s",
        Some(&format!(
            "ratio ≤ {:.2} (reference ≥ {goal} × product)",
            1.0 / goal
        )),
        ratio(product, reference).map(|r| r <= 1.0 / goal),
        json!({
            "rounds": v["rounds"],
            "product_seconds": v["product_seconds"],
            "reference_seconds": v["reference_seconds"],
            "product_mib_per_s": v["product_mib_per_s"],
            "reference_mib_per_s": v["reference_mib_per_s"],
        }),
    );
    if let Some(peak) = num(v, &["product_peak_mib"]) {
        let goal = num(v, &["goal_peak_mib"]).unwrap_or(64.0);
        rows.push(
            "import",
            "import peak memory (VmHWM of the importing process)".into(),
            Some(peak),
            None,
            "MiB",
            Some(&format!("≤ {goal} MiB")),
            Some(peak <= goal),
            json!({ "product_peak_mib": peak }),
        );
    }
}

fn events(v: &Value, rows: &mut Rows) {
    let lines = v["lines"].as_u64().unwrap_or(0);
    rows.push(
        "events",
        format!(
            "event stream, {lines} lines agent → controller job log (vs JobStore append, 256-line fsync batches)"
        ),
        num(v, &["product_lines_per_s", "median"]),
        num(v, &["reference_lines_per_s", "median"]),
        "lines/s",
        None,
        None,
        json!({
            "product_lines_per_s": v["product_lines_per_s"],
            "reference_lines_per_s": v["reference_lines_per_s"],
        }),
    );
    rows.push(
        "events",
        "event lag at that rate, emit → stored, per-batch p99".into(),
        num(v, &["batch_lag_ms_p99", "median"]),
        None,
        "ms",
        None,
        None,
        json!({
            "batch_lag_ms_p50": v["batch_lag_ms_p50"],
            "batch_lag_ms_p99": v["batch_lag_ms_p99"],
            "batch_lag_ms_max": v["batch_lag_ms_max"],
            "last_line_lag_ms": v["last_line_lag_ms"],
        }),
    );
}

fn plan(v: &Value, rows: &mut Rows) {
    for size in v["sizes"].as_array().cloned().unwrap_or_default() {
        rows.push(
            "plan",
            format!(
                "deploy plan, {} services (vs serde_json parse of the same documents)",
                size["services"]
            ),
            num(&size, &["product_us", "median"]),
            num(&size, &["reference_us", "median"]),
            "µs",
            None,
            None,
            size.clone(),
        );
    }
}

fn cell(v: Option<f64>) -> String {
    match v {
        None => String::new(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let machine = Machine::detect();
    let mut rows = Rows(Vec::new());
    let mut failed = Vec::new();
    let mut ran = Vec::new();
    for entry in &args.ran {
        let (name, status) = entry
            .split_once('=')
            .with_context(|| format!("--ran {entry:?} is not NAME=STATUS"))?;
        ran.push(json!({ "name": name, "status": status }));
        if status != "ok" {
            failed.push(name.to_string());
            continue;
        }
        let path = args.dir.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{name} ran but wrote no {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        match name {
            "tunnel" => tunnel(&v, &mut rows),
            // `launch_rtt` and its runs at other agent counts (`launch_rtt_<agents>`).
            n if n == "launch_rtt" || n.starts_with("launch_rtt_") => launch_rtt(&v, &mut rows),
            "deploy" => deploy(&v, &mut rows),
            "import" => import(&v, &mut rows),
            "events" => events(&v, &mut rows),
            "plan" => plan(&v, &mut rows),
            other => anyhow::bail!("unknown benchmark {other:?}"),
        }
    }
    let debug = args.profile != "release";
    if debug {
        // A debug build's figures are not the product's: no verdict on them.
        for r in rows.0.iter_mut() {
            r.goal_met = None;
        }
    }
    let note = if !debug {
        "release build".to_string()
    } else {
        format!(
            "{} build: these figures only prove the harness runs; they are not the product's \
             speed (run `scripts/bench` without --quick for a release build)",
            args.profile
        )
    };
    let report = json!({
        "machine": machine,
        "date": machine.date,
        "commit": machine.commit,
        "mode": args.mode,
        "profile": args.profile,
        "note": note,
        "ratio": "product ÷ reference, both measured in this run",
        "ran": ran,
        "failed": failed,
        "harness_seconds": args.seconds,
        "benchmarks": rows.0,
    });
    let mut text = serde_json::to_string_pretty(&report).context("encoding the report")?;
    text.push('\n');
    let json_path = args.dir.join("report.json");
    std::fs::write(&json_path, text).with_context(|| format!("writing {}", json_path.display()))?;

    let mut table = Table::new(&[
        "benchmark",
        "product",
        "reference",
        "unit",
        "product ÷ reference",
        "goal",
        "met",
    ]);
    for r in &rows.0 {
        table.row(vec![
            // A `|` inside a cell would end it.
            r.name.replace('|', "\\|"),
            cell(r.product),
            cell(r.reference),
            r.unit.clone(),
            r.ratio.map_or_else(String::new, |x| format!("{x:.2}")),
            r.goal.clone().unwrap_or_default(),
            match r.goal_met {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => String::new(),
            },
        ]);
    }
    for name in &failed {
        table.row(vec![
            format!("**{name}: could not run** (see {name}.log)"),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    let markdown = format!(
        "# Benchmark report ({} mode)\n\n{}\n\n{note}.{}\n\n{}",
        args.mode,
        machine.line(),
        args.seconds
            .map_or_else(String::new, |s| format!(" Harness wall time {s:.0} s.")),
        table.render()
    );
    let md_path = args.dir.join("report.md");
    std::fs::write(&md_path, &markdown)
        .with_context(|| format!("writing {}", md_path.display()))?;
    print(&markdown);
    print(&format!(
        "written to {} and {}",
        json_path.display(),
        md_path.display()
    ));
    Ok(())
}
