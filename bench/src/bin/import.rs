//! `import`: the k3s executor's image import against the shell path it replaces.
//!
//! An image of incompressible layers (`FROM local/busybox:latest` plus `--layers` ×
//! `RUN head -c … /dev/urandom`, 512 MiB by default; built once and kept, cached by tag) is
//! imported into the k3s stand-in containerd, alternately by
//!
//! - **the product**: `Containerd::import_from_docker` (Docker export streamed over gRPC,
//!   unpacked while streaming), run in a child process (this binary re-executed with a hidden
//!   subcommand) so its peak memory is its own: the child reports `VmHWM` from
//!   `/proc/self/status` at the end;
//! - **the reference**: `docker save IMAGE | ctr --address SOCK -n NS images import -`, the real
//!   tools in one shell pipeline.
//!
//! Each import goes into a fresh namespace, so nothing is skipped or shared; after each one the
//! namespace's images are removed with `ctr images rm --sync` (containerd collects the content
//! and snapshots) and the namespace is removed, so the next import finds no blob in the shared
//! content store. The two sides alternate which goes first. Times are wall-clock times of the
//! whole child process or pipeline.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use unidesk_agent::launch::containerd::Containerd;
use unidesk_agent::launch::steplog::StepLog;
use unidesk_bench::report::{Machine, Table, print, write_json};
use unidesk_bench::setup::target_dir;
use unidesk_bench::stats::Summary;
use unidesk_controller::demo::sample::BASE_IMAGE;
use unidesk_protocol::Step;

/// The goals of the import issue.
const GOAL_RATIO: f64 = 1.25;
const GOAL_PEAK_MIB: f64 = 64.0;
const DEFAULT_SOCKET: &str = "/run/k3s/containerd/containerd.sock";

/// Streaming import into containerd against `docker save | ctr images import -`.
#[derive(Debug, Parser)]
#[command(name = "import")]
struct Args {
    /// Timed rounds per side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB of incompressible data in the image, split over `--layers` layers.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Layers of random data.
    #[arg(long, default_value_t = 4)]
    layers: u64,
    /// The containerd socket (the k3s stand-in).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    child: Option<ChildCommand>,
}

#[derive(Debug, Subcommand)]
enum ChildCommand {
    /// The product's import in a process of its own (used by the benchmark itself).
    #[command(hide = true)]
    Child {
        #[arg(long)]
        image: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.child {
        Some(ChildCommand::Child {
            image,
            namespace,
            socket,
        }) => child(image, namespace, socket),
        None => run(&args),
    }
}

/// Every process this benchmark starts is made here: docker and ctr are the reference, and
/// the product's import runs as a child process of this binary.
#[allow(clippy::disallowed_methods)]
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ctr(socket: &Path, ns: &str) -> Command {
    let mut c = command("ctr");
    c.arg("--address").arg(socket).args(["-n", ns]);
    c
}

/// The hidden child: one product import, then a JSON line with its time and peak memory.
fn child(image: &str, namespace: &str, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let started = Instant::now();
    let report = rt.block_on(async {
        let cd = Containerd::connect(socket, namespace, "overlayfs").await?;
        let docker = bollard::Docker::connect_with_local_defaults()?;
        let (log, mut rx) = StepLog::channel(Step::Import, 256);
        let drain = tokio::spawn(async move {
            let mut lines = 0usize;
            while rx.recv().await.is_some() {
                lines += 1;
            }
            lines
        });
        let report = cd
            .import_from_docker(
                &docker,
                image,
                &[image.to_string()],
                &log,
                &CancellationToken::new(),
            )
            .await?;
        drop(log);
        let lines = drain.await.unwrap_or(0);
        anyhow::Ok((report, lines))
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let (report, lines) = report;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    print(
        &json!({
            "seconds": seconds,
            "vm_hwm_kib": hwm_kib,
            "log_lines": lines,
            "layers": report.layers,
            "blobs_written": report.blobs_written,
            "blobs_skipped": report.blobs_skipped,
            "bytes_written": report.bytes_written,
            "layers_unpacked": report.layers_unpacked,
            "exported": report.exported,
        })
        .to_string(),
    );
    Ok(())
}

/// Builds the benchmark image unless a Docker image of that tag exists; returns its size.
fn ensure_image(tag: &str, size_mib: u64, layers: u64) -> anyhow::Result<u64> {
    let exists = command("docker")
        .args(["image", "inspect", tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !exists {
        let per = size_mib.div_ceil(layers.max(1));
        let mut dockerfile = format!("FROM {BASE_IMAGE}\n");
        for i in 0..layers {
            dockerfile.push_str(&format!("RUN head -c {per}m /dev/urandom > /l{i}\n"));
        }
        eprintln!("building {tag} ({layers} × {per} MiB of random data)…");
        let mut child = command("docker")
            .args(["build", "--network", "host", "-q", "-t", tag, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("docker build")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("docker build stdin")?;
            stdin.write_all(dockerfile.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "docker build {tag}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let size = output(
        command("docker").args(["image", "inspect", "--format", "{{.Size}}", tag]),
        "docker image inspect",
    )?;
    size.trim()
        .parse()
        .with_context(|| format!("image size {size:?}"))
}

/// Removes everything in namespace `ns` and the namespace itself.
fn drop_namespace(socket: &Path, ns: &str) -> anyhow::Result<()> {
    let names = output(
        ctr(socket, ns).args(["images", "ls", "-q"]),
        "ctr images ls",
    )?;
    for name in names.split_whitespace() {
        output(
            ctr(socket, ns).args(["images", "rm", "--sync", name]),
            "ctr images rm",
        )?;
    }
    let mut last = String::new();
    for _ in 0..40 {
        let out = command("ctr")
            .arg("--address")
            .arg(socket)
            .args(["namespaces", "rm", ns])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() && err.trim().is_empty() {
            return Ok(());
        }
        last = err;
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    bail!("namespace {ns} could not be removed: {}", last.trim())
}

/// One product import in a child process: (seconds, peak MiB, report JSON).
fn product_round(
    image: &str,
    socket: &Path,
    ns: &str,
) -> anyhow::Result<(f64, f64, serde_json::Value)> {
    let exe = std::env::current_exe().context("this binary")?;
    let started = Instant::now();
    let out = output(
        command(exe)
            .args(["child", "--image", image, "--namespace", ns, "--socket"])
            .arg(socket),
        "the product's import",
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let line: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("the child printed {out:?}"))?;
    let peak = line["vm_hwm_kib"].as_f64().unwrap_or(0.0) / 1024.0;
    Ok((seconds, peak, line))
}

/// One reference import: `docker save | ctr images import -`.
fn reference_round(image: &str, socket: &Path, ns: &str) -> anyhow::Result<f64> {
    let script = format!(
        "docker save {image} | ctr --address {} -n {ns} images import -",
        socket.display()
    );
    let started = Instant::now();
    output(
        command("bash").args(["-o", "pipefail", "-c", &script]),
        "docker save | ctr images import -",
    )?;
    Ok(started.elapsed().as_secs_f64())
}

/// Fails unless `ns` holds `image` complete and unpacked, as `ctr images check` says.
fn verify(socket: &Path, ns: &str, who: &str) -> anyhow::Result<()> {
    let out = output(
        ctr(socket, ns).args(["images", "check"]),
        "ctr images check",
    )?;
    let rows: Vec<&str> = out
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    if rows.is_empty()
        || !rows
            .iter()
            .all(|r| r.contains("complete (") && r.trim_end().ends_with("true"))
    {
        bail!("{who}'s import is not complete and unpacked:\n{out}");
    }
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    if !args.socket.exists() {
        bail!(
            "no containerd at {}: run `bash scripts/testbed-up`",
            args.socket.display()
        );
    }
    let machine = Machine::detect();
    let tag = format!("unidesk-bench-import:{}m-{}l", args.size_mib, args.layers);
    let bytes = ensure_image(&tag, args.size_mib, args.layers)?;
    eprintln!("{}", machine.line());
    eprintln!(
        "image {tag}: {:.0} MiB; {} rounds per side",
        bytes as f64 / 1048576.0,
        args.rounds
    );
    let pid = std::process::id();
    let mut product = Vec::new();
    let mut peaks = Vec::new();
    let mut reference = Vec::new();
    let mut reports = Vec::new();
    for round in 0..args.rounds {
        let p_ns = format!("unidesk-bench-p{round}-{pid}");
        let r_ns = format!("unidesk-bench-r{round}-{pid}");
        let order = if round % 2 == 0 {
            ["product", "reference"]
        } else {
            ["reference", "product"]
        };
        for side in order {
            if side == "product" {
                let (s, peak, rep) = product_round(&tag, &args.socket, &p_ns)?;
                verify(&args.socket, &p_ns, "the product")?;
                if rep["blobs_skipped"].as_u64() != Some(0) {
                    bail!("the product skipped blobs in a fresh namespace: {rep}");
                }
                drop_namespace(&args.socket, &p_ns)?;
                eprintln!("round {round}: product {s:.2} s, peak {peak:.1} MiB");
                product.push(s);
                peaks.push(peak);
                reports.push(rep);
            } else {
                let s = reference_round(&tag, &args.socket, &r_ns)?;
                verify(&args.socket, &r_ns, "the reference")?;
                drop_namespace(&args.socket, &r_ns)?;
                eprintln!("round {round}: reference {s:.2} s");
                reference.push(s);
            }
        }
    }
    let p = Summary::of(&product).context("no product rounds")?;
    let r = Summary::of(&reference).context("no reference rounds")?;
    let peak = peaks.iter().copied().fold(0.0, f64::max);
    let mib = bytes as f64 / 1048576.0;
    let ratio = r.median / p.median;
    let mut table = Table::new(&[
        "path",
        "median s",
        "min s",
        "max s",
        "spread",
        "MiB/s (median)",
        "peak memory MiB",
    ]);
    table.row(vec![
        "product: Containerd::import_from_docker (child process)".into(),
        format!("{:.2}", p.median),
        format!("{:.2}", p.min),
        format!("{:.2}", p.max),
        format!("{:.0}%", p.spread() * 100.0),
        format!("{:.0}", mib / p.median),
        format!("{peak:.1} (goal ≤ {GOAL_PEAK_MIB})"),
    ]);
    table.row(vec![
        "reference: docker save | ctr images import -".into(),
        format!("{:.2}", r.median),
        format!("{:.2}", r.min),
        format!("{:.2}", r.max),
        format!("{:.0}%", r.spread() * 100.0),
        format!("{:.0}", mib / r.median),
        String::new(),
    ]);
    print(&format!(
        "## import: {tag} ({mib:.0} MiB, {} layers of random data), {} rounds per side\n\n{}\n{}\nratio = reference / product = {ratio:.2} (goal ≥ {GOAL_RATIO})\n",
        args.layers,
        args.rounds,
        machine.line(),
        table.render()
    ));
    let value = json!({
        "bench": "import",
        "machine": machine,
        "image": tag,
        "image_bytes": bytes,
        "rounds": args.rounds,
        "product_seconds": p,
        "product_spread": p.spread(),
        "reference_seconds": r,
        "reference_spread": r.spread(),
        "product_mib_per_s": mib / p.median,
        "reference_mib_per_s": mib / r.median,
        "ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "product_peak_mib": peak,
        "goal_peak_mib": GOAL_PEAK_MIB,
        "product_reports": reports,
    });
    print(&value.to_string());
    let path = write_json(&target_dir()?, "import", &value)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
