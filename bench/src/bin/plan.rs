//! `plan`: `deploy plan` time for 50 and 500 services, against parsing the same two documents
//! with `serde_json` alone.
//!
//! Inputs are generated: a schema 1 `deploy.json` with N services (full and short commits)
//! and a `config.json` catalog describing them on three nodes, a third each Compose
//! (`unidesk-direct`), sidecar (`internal-sidecar`) and k3s (`k3sctl-managed`, with a k8s
//! block of two Deployments), every tenth without a Dockerfile (planned `unsupported`).
//!
//! - **Product**: what `deploy plan --file --catalog` does after reading the files, with the
//!   controller's own pure functions: `manifest::parse` + `catalog::parse` (the strict
//!   document parsers: positions in errors, unknown keys refused, every field checked) +
//!   `services_for` + `plan::plan` with no live state, as the CLI calls it.
//! - **Reference**: `serde_json::from_slice::<Value>` of the same two documents: the cost of
//!   reading the JSON at all, with no checks and no plan. The two alternate, round by round.
//! - **jq** (when `jq` is on `PATH`): `jq -c length deploy.json config.json` as a process, for
//!   scale only — it includes a process start, so it is not the ratio's reference.
//!
//! Times are the median of the rounds, in microseconds.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use unidesk_bench::report::{Machine, Table, print, write_json};
use unidesk_bench::setup::{default_parent, target_dir};
use unidesk_bench::stats::Summary;
use unidesk_controller::desired::catalog;
use unidesk_controller::desired::manifest;
use unidesk_controller::desired::plan::{self, LiveState};

const REPO: &str = "https://github.com/pikasTech/unidesk";
const NODES: [&str; 3] = ["main-server", "d601", "d518"];

/// `deploy plan` time against a plain JSON parse of the same documents.
#[derive(Debug, Parser)]
#[command(name = "plan")]
struct Args {
    /// 20 rounds per size instead of 200.
    #[arg(long)]
    quick: bool,
    /// Service counts.
    #[arg(long, value_delimiter = ',', default_value = "50,500")]
    services: Vec<usize>,
    /// Timed rounds per size and side (default: 200, or 20 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Rounds of the jq process per size (default: 20, or 3 with --quick).
    #[arg(long)]
    jq_rounds: Option<usize>,
}

fn main() {
    unidesk_agent::logging::init("warn");
    if let Err(e) = run(&Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A 40-hex commit derived from `i`.
fn sha(i: usize) -> String {
    format!(
        "{:040x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
}

/// `deploy.json` (schema 1) and `config.json` with `n` services.
fn documents(n: usize) -> (Vec<u8>, Vec<u8>) {
    let services: Vec<Value> = (0..n)
        .map(|i| {
            let commit = sha(i + 1);
            let commit = if i % 4 == 0 {
                commit[..12].to_string()
            } else {
                commit
            };
            json!({ "id": format!("svc-{i:04}"), "repo": REPO, "commitId": commit })
        })
        .collect();
    let manifest = json!({ "schemaVersion": 1, "services": services });
    let microservices: Vec<Value> = (0..n)
        .map(|i| {
            let id = format!("svc-{i:04}");
            let node = NODES[i % NODES.len()];
            let mut deployment = match i % 3 {
                0 => json!({
                    "mode": "unidesk-direct", "node": node,
                    "dockerfile": format!("src/{id}/Dockerfile"), "context": ".",
                    "image": format!("unidesk-{id}:latest"),
                    "healthUrl": format!("http://127.0.0.1:{}/health", 8000 + i),
                    "buildTimeoutMs": 600_000,
                    "compose": { "project": "unidesk", "service": id },
                }),
                1 => json!({
                    "mode": "internal-sidecar", "node": node, "dockerfile": "Dockerfile",
                    "image": format!("{id}:latest"), "compose": { "service": id },
                }),
                _ => json!({
                    "mode": "k3sctl-managed", "node": node,
                    "dockerfile": format!("src/{id}/Dockerfile"), "context": ".",
                    "image": format!("unidesk-{id}:d601"),
                    "buildBase": { "arg": "BASE_IMAGE",
                                   "candidates": [format!("unidesk-{id}:d601-build-base")] },
                    "k8s": { "manifest": format!("k3s/{id}.k8s.yaml"), "namespace": "unidesk",
                             "deployments": [
                                 { "name": format!("{id}-read"), "container": id },
                                 { "name": format!("{id}-write"), "container": id },
                             ] },
                }),
            };
            if i % 10 == 9
                && let Some(d) = deployment.as_object_mut()
            {
                d.remove("dockerfile");
                d.remove("context");
                d.remove("buildBase");
                d.remove("buildTimeoutMs");
                d.insert("image".into(), json!(format!("docker.io/vendor/{id}:1")));
            }
            json!({ "id": id, "repository": { "url": REPO }, "deployment": deployment })
        })
        .collect();
    let nodes: serde_json::Map<String, Value> = NODES
        .iter()
        .map(|n| {
            let egress = if *n == "main-server" {
                "direct"
            } else {
                "tunnel"
            };
            (n.to_string(), json!({ "agent": n, "egress": egress }))
        })
        .collect();
    let config = json!({ "microservices": microservices, "nodes": nodes });
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    (pretty(&manifest), pretty(&config))
}

/// The product: parse both documents with the controller's parsers and plan, as
/// `deploy plan --file --catalog` does. Returns the planned lines.
fn product(deploy: &[u8], config: &[u8]) -> anyhow::Result<usize> {
    let manifest = manifest::parse(deploy).context("deploy.json")?;
    let parsed = catalog::parse(config).context("config.json")?;
    let services = manifest.services_for(None).context("services")?;
    let plan =
        plan::plan(services, &parsed.catalog, None, None, &LiveState::default()).context("plan")?;
    Ok(plan.services.len())
}

/// The reference: both documents parsed as plain JSON values.
fn reference(deploy: &[u8], config: &[u8]) -> anyhow::Result<usize> {
    let d: Value = serde_json::from_slice(deploy).context("deploy.json")?;
    let c: Value = serde_json::from_slice(config).context("config.json")?;
    Ok(d["services"].as_array().map_or(0, Vec::len) + usize::from(c.is_object()))
}

/// `jq -c length deploy.json config.json` as a process, in microseconds; `None` without jq.
// jq is a reference tool run as its own process, for scale.
#[allow(clippy::disallowed_methods)]
fn jq_us(deploy: &Path, config: &Path) -> anyhow::Result<Option<f64>> {
    let started = Instant::now();
    let out = match std::process::Command::new("jq")
        .args(["-c", "length"])
        .arg(deploy)
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running jq"),
    };
    let us = started.elapsed().as_secs_f64() * 1e6;
    if !out.status.success() {
        anyhow::bail!("jq failed with {}", out.status);
    }
    Ok(Some(us))
}

#[derive(Debug, Serialize)]
struct SizeResult {
    services: usize,
    deploy_json_bytes: usize,
    config_json_bytes: usize,
    planned: usize,
    product_us: Summary,
    reference_us: Summary,
    ratio_of_medians: f64,
    jq_process_us: Option<Summary>,
}

fn measure(args: &Args, n: usize, dir: &Path) -> anyhow::Result<SizeResult> {
    let (deploy, config) = documents(n);
    let planned = product(&deploy, &config)?;
    if planned != n {
        anyhow::bail!("the plan has {planned} lines for {n} services");
    }
    reference(&deploy, &config)?;
    let rounds = args
        .rounds
        .unwrap_or(if args.quick { 20 } else { 200 })
        .max(1);
    // Warm-up, not counted.
    for _ in 0..rounds.div_ceil(10) {
        std::hint::black_box(product(&deploy, &config)?);
        std::hint::black_box(reference(&deploy, &config)?);
    }
    let mut p = Vec::with_capacity(rounds);
    let mut r = Vec::with_capacity(rounds);
    for round in 0..rounds {
        for side in 0..2 {
            let started = Instant::now();
            if (side == 0) == (round % 2 == 0) {
                std::hint::black_box(product(&deploy, &config)?);
                p.push(started.elapsed().as_secs_f64() * 1e6);
            } else {
                std::hint::black_box(reference(&deploy, &config)?);
                r.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let product_us = Summary::of(&p).context("no product rounds")?;
    let reference_us = Summary::of(&r).context("no reference rounds")?;

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let deploy_path = dir.join(format!("deploy-{n}.json"));
    let config_path = dir.join(format!("config-{n}.json"));
    std::fs::write(&deploy_path, &deploy)?;
    std::fs::write(&config_path, &config)?;
    let jq_rounds = args.jq_rounds.unwrap_or(if args.quick { 3 } else { 20 });
    let mut jq = Vec::new();
    for _ in 0..jq_rounds {
        match jq_us(&deploy_path, &config_path)? {
            Some(us) => jq.push(us),
            None => break,
        }
    }
    let _ = std::fs::remove_file(&deploy_path);
    let _ = std::fs::remove_file(&config_path);
    Ok(SizeResult {
        services: n,
        deploy_json_bytes: deploy.len(),
        config_json_bytes: config.len(),
        planned,
        ratio_of_medians: product_us.median / reference_us.median,
        product_us,
        reference_us,
        jq_process_us: Summary::of(&jq),
    })
}

fn run(args: &Args) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let target = target_dir()?;
    let dir = default_parent(&target).join(format!("plan-{}", std::process::id()));
    let started = Instant::now();
    let mut results = Vec::new();
    for &n in &args.services {
        results.push(measure(args, n.max(1), &dir)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let elapsed = started.elapsed();

    let mut table = Table::new(&[
        "services",
        "deploy.json + config.json",
        "product: parse + plan, median µs",
        "p99 µs",
        "reference: serde_json parse, median µs",
        "÷ reference",
        "jq process, median µs",
    ]);
    for r in &results {
        table.row(vec![
            r.services.to_string(),
            format!(
                "{:.0} + {:.0} KiB",
                r.deploy_json_bytes as f64 / 1024.0,
                r.config_json_bytes as f64 / 1024.0
            ),
            format!("{:.0}", r.product_us.median),
            format!("{:.0}", r.product_us.p99),
            format!("{:.0}", r.reference_us.median),
            format!("{:.2}", r.ratio_of_medians),
            r.jq_process_us
                .as_ref()
                .map_or_else(|| "no jq".to_string(), |s| format!("{:.0}", s.median)),
        ]);
    }
    let report = json!({
        "benchmark": "plan",
        "machine": machine,
        "quick": args.quick,
        "method": {
            "product": "manifest::parse + catalog::parse + services_for(None) + plan::plan with \
                        LiveState::default(), in process, as `deploy plan --file --catalog`",
            "reference": "serde_json::from_slice::<Value> of the same two documents",
            "jq": "jq -c length deploy.json config.json as a process (includes process start; \
                   for scale only)",
            "alternation": "product first in even rounds, reference first in odd rounds",
        },
        "sizes": results,
        "measured_seconds": elapsed.as_secs_f64(),
    });
    let json = write_json(&target, "plan", &report)?;
    print(&format!(
        "## deploy plan ({})\n\n{}\n\n{}",
        if args.quick { "quick" } else { "full" },
        machine.line(),
        table.render(),
    ));
    print(&format!("written to {}", json.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_documents_plan_every_service() {
        let (deploy, config) = documents(30);
        assert_eq!(product(&deploy, &config).unwrap(), 30);
        assert_eq!(reference(&deploy, &config).unwrap(), 31);
    }
}
