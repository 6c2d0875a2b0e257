//! `deploy`: issue 3's benchmarks of the target-side build and deploy.
//!
//! 1. **End to end.** `unidesk-controller deploy apply --wait-ms` of a sample service against
//!    the shell path it replaces, on the same repository and commit in the same run, the two
//!    alternating which goes first. The reference is a fresh `git clone --no-checkout`
//!    through the agent's egress proxy (`git -c http.proxy=…`), `git archive <commit> |
//!    docker build -`, and `docker-compose up -d --no-build --no-deps --force-recreate web`
//!    after pointing the service at the new tag. Warm: the agent's mirror and both sides'
//!    Docker cache are present (the product redeploys the same commit with `--force`). Cold:
//!    the agent's mirror directory is deleted, the reference clones afresh as always, and both
//!    build without cache: a new commit whose Dockerfile changes the layer right after `FROM`
//!    for the product (only the metadata-only `ARG` before it still comes from the cache),
//!    `--no-cache` for the reference. The build log's `Using cache` lines are counted per
//!    round on both sides, so the report shows what each build reused.
//! 2. **Agent peak memory** while streaming a large build context (1 GiB, 256 MiB with
//!    `--quick`) of incompressible generated files into the daemon, from a fresh agent
//!    process whose mirror already holds the commit; VmHWM from `/proc/<pid>/status`, and
//!    the anonymous and file-backed parts sampled every 10 ms.
//!
//! The controller (`unidesk-controller serve`) and the agent (`unidesk-agent run`) are the
//! release binaries found next to this one, each its own process; the product is timed as
//! the operator runs it, a `deploy apply` process. The Git server is the product's own
//! smart-HTTP server (`gitserve`) in this process. Every image, container and directory made
//! here is removed at the end; nothing is pulled.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use unidesk_agent::config::AgentConfig;
use unidesk_agent::launch::materialize::MirrorCache;
use unidesk_agent::rundir::RunResult;
use unidesk_bench::report::{Machine, Table, print, write_json};
use unidesk_bench::setup::{Setup, agent_ids, default_parent, free_port, target_dir};
use unidesk_bench::stats::Summary;
use unidesk_controller::admin::AdminRequest;
use unidesk_controller::demo::sample::{BASE_IMAGE, SampleRepo, dockerfile};
use unidesk_controller::gitserve::GitServer;
use unidesk_controller::store::{JobRecord, JobStatus};

/// Issue 3's goals.
const GOAL_WARM_RATIO: f64 = 0.8;
const GOAL_COLD_RATIO: f64 = 1.1;
const GOAL_PEAK_MIB: f64 = 64.0;

/// How long one deploy (either side) or one setup command may take.
const DEPLOY_LIMIT: Duration = Duration::from_secs(900);
const COMMAND_LIMIT: Duration = Duration::from_secs(300);
/// How long the reference's container may take to serve the new commit.
const HEALTH_LIMIT: Duration = Duration::from_secs(60);
/// How often the agent's memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

const SERVICE: &str = "web";
const WEB_ID: &str = "bench-web";
const BIG_ID: &str = "bench-big";

/// Deploy end to end against the shell path, and agent memory while streaming a big context.
#[derive(Debug, Parser)]
#[command(name = "deploy")]
struct Args {
    /// 2 rounds per case and a 256 MiB context: about 2 minutes on 2 cores (release build).
    #[arg(long)]
    quick: bool,
    /// Timed rounds per case, warm and cold (default: 5, or 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// MiB of generated files in the sample service's build context.
    #[arg(long, default_value_t = 4)]
    context_mib: usize,
    /// MiB of incompressible files in the memory case (default: 1024, or 256 with --quick).
    #[arg(long)]
    big_mib: Option<usize>,
    /// Size of each file of the memory case, MiB (the agent holds one blob at a time).
    #[arg(long, default_value_t = 8)]
    big_file_mib: usize,
    /// Skip the memory case.
    #[arg(long)]
    skip_memory: bool,
    /// Directory of `unidesk-controller` and `unidesk-agent` (default: next to this binary;
    /// build them with `cargo build --release -p unidesk-controller -p unidesk-agent`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for the setup, repositories, mirrors and clones (default: `target/bench/tmp`).
    #[arg(long)]
    setup_dir: Option<PathBuf>,
}

impl Args {
    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 2 } else { 5 }).max(1)
    }

    fn big_mib(&self) -> usize {
        self.big_mib.unwrap_or(if self.quick { 256 } else { 1024 })
    }
}

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("warn");
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn progress(message: &str) {
    eprintln!("deploy bench: {message}");
}

use unidesk_agent::events::now_ms;

// ---------------------------------------------------------------------------------------------
// Processes.

/// Every process this benchmark starts is made here. The shell path (`git`, `docker`,
/// `docker-compose`) is the reference being measured, and the product's binaries run as an
/// operator runs them; children are killed if their handle is dropped.
#[allow(clippy::disallowed_methods)]
fn command(program: impl AsRef<OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// The last part of a command's output, for error messages.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text.len().saturating_sub(2000);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text.get(start..).unwrap_or_default().to_string()
}

/// Runs `cmd` to completion within `limit`; fails naming `what` and its stderr.
async fn run_ok(
    cmd: &mut tokio::process::Command,
    what: &str,
    limit: Duration,
) -> anyhow::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{what} did not finish within {limit:?}"))?
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, tail(&out.stderr));
    }
    Ok(out)
}

/// `docker build -t <tag> -` of a Dockerfile alone (no context), as the first version of a
/// service; returns the image id.
async fn build_first_image(tag: &str, dockerfile: &str, run_label: &str) -> anyhow::Result<String> {
    let mut child = command("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args([
            "build",
            "--network",
            "host",
            "-q",
            "-t",
            tag,
            "--label",
            run_label,
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting docker build")?;
    let mut stdin = child.stdin.take().context("docker build has no stdin")?;
    stdin
        .write_all(dockerfile.as_bytes())
        .await
        .context("writing the Dockerfile to docker build")?;
    drop(stdin);
    let out = tokio::time::timeout(COMMAND_LIMIT, child.wait_with_output())
        .await
        .context("docker build of the first image timed out")??;
    if !out.status.success() {
        bail!("docker build -t {tag} failed: {}", tail(&out.stderr));
    }
    image_id(tag).await
}

async fn image_id(tag: &str) -> anyhow::Result<String> {
    let out = run_ok(
        command("docker").args(["image", "inspect", "--format", "{{.Id}}", tag]),
        &format!("docker image inspect {tag}"),
        COMMAND_LIMIT,
    )
    .await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A long-running child (controller or agent) with its stderr in a log file.
struct Proc {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
    name: String,
}

impl Proc {
    fn start(bin: &Path, args: &[&OsStr], log: PathBuf, name: &str) -> anyhow::Result<Proc> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("{} exited at once; see {}", bin.display(), log.display()))?;
        Ok(Proc {
            child,
            pid,
            log,
            name: name.to_string(),
        })
    }

    /// Fails when the process has exited, pointing at its log.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the {} exited with {status}; see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(self.pid)?) {
            // The process may be gone already; waiting below tells.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.context("killing")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Memory of a process.

/// Memory fields of `/proc/<pid>/status`, KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Mem {
    vm_rss: u64,
    rss_anon: u64,
    rss_file: u64,
    vm_hwm: u64,
}

fn read_mem(pid: u32) -> anyhow::Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok(Mem {
        vm_rss: field("VmRSS")?,
        rss_anon: field("RssAnon")?,
        rss_file: field("RssFile")?,
        vm_hwm: field("VmHWM")?,
    })
}

/// Peaks seen by a [`Sampler`], KiB.
#[derive(Debug, Clone, Default, Serialize)]
struct Peaks {
    samples: u64,
    vm_rss: u64,
    rss_anon: u64,
    rss_file: u64,
    /// RssAnon in the sample with the highest VmRSS.
    anon_at_peak: u64,
    /// The file mapping with the most resident memory, read from `/proc/<pid>/smaps` when
    /// RssFile had grown by [`SMAPS_STEP_KIB`] since the last look: what the file-backed
    /// part is.
    largest_file_mapping: Option<Mapping>,
}

/// Read smaps again when RssFile grew by this much (KiB) since the last read.
const SMAPS_STEP_KIB: u64 = 16 * 1024;

/// A mapped file and its resident KiB.
#[derive(Debug, Clone, Default, Serialize)]
struct Mapping {
    path: String,
    rss_kib: u64,
}

/// The file mapping of `pid` with the most resident memory.
fn largest_file_mapping(pid: u32) -> Option<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut best: Option<Mapping> = None;
    let mut path: Option<String> = None;
    for line in text.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if let Some(p) = &path
                && best.as_ref().is_none_or(|b| kib > b.rss_kib)
            {
                best = Some(Mapping {
                    path: p.clone(),
                    rss_kib: kib,
                });
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-'))
        {
            // A mapping's header: address range, perms, offset, device, inode, path.
            path = line
                .split_whitespace()
                .nth(5)
                .filter(|p| p.starts_with('/'))
                .map(str::to_string);
        }
    }
    best
}

/// Reads a process's memory every [`SAMPLE_EVERY`] until stopped.
struct Sampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Peaks>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut peaks = Peaks::default();
            let mut looked_at = read_mem(pid).map_or(0, |m| m.rss_file);
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Ok(m) = read_mem(pid) else { break };
                peaks.samples += 1;
                if m.vm_rss > peaks.vm_rss {
                    peaks.vm_rss = m.vm_rss;
                    peaks.anon_at_peak = m.rss_anon;
                }
                peaks.rss_anon = peaks.rss_anon.max(m.rss_anon);
                if m.rss_file >= looked_at + SMAPS_STEP_KIB {
                    looked_at = m.rss_file;
                    if let Some(found) = largest_file_mapping(pid) {
                        peaks.largest_file_mapping = Some(found);
                    }
                }
                peaks.rss_file = peaks.rss_file.max(m.rss_file);
            }
            peaks
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Peaks> {
        self.stop.cancel();
        self.task.await.context("the memory sampler panicked")
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Generated content.

/// A splitmix64 stream: fast, seedable, and incompressible to zlib.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// `bytes` of base64-alphabet text in 76-character lines (zlib keeps about 75%).
    fn text(&mut self, bytes: usize) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(bytes);
        while out.len() < bytes {
            let mut word = self.next();
            for _ in 0..10 {
                if out.len() % 77 == 76 {
                    out.push('\n');
                } else {
                    out.push(char::from(ALPHABET[(word & 63) as usize]));
                }
                word >>= 6;
            }
        }
        out.truncate(bytes);
        out
    }
}

/// The sample service's Dockerfile with one layer inserted right after `FROM`: it depends on
/// the build arg `BENCH_SIDE` (so the product's and the reference's builds never share cache
/// layers) and on `nonce` (a new nonce makes every layer after `FROM` a cache miss).
fn web_dockerfile(port: u16, nonce: &str) -> anyhow::Result<String> {
    let sample = dockerfile(port, "$UNIDESK_DEPLOY_COMMIT", "");
    let (from, rest) = sample
        .split_once('\n')
        .context("the sample Dockerfile has no FROM line")?;
    Ok(format!(
        "{from}\nARG BENCH_SIDE=product\nRUN echo \"$BENCH_SIDE {nonce}\" > /bench-early-layer\n{rest}"
    ))
}

/// The memory case's Dockerfile: the sample one copying only `index.html`, so the daemon
/// receives the whole context but the build stays quick.
fn big_dockerfile(port: u16) -> anyhow::Result<String> {
    let sample = dockerfile(port, "$UNIDESK_DEPLOY_COMMIT", "");
    if !sample.contains("COPY . /src\n") {
        bail!("the sample Dockerfile no longer has `COPY . /src`: {sample}");
    }
    Ok(sample.replace("COPY . /src\n", "COPY index.html /src/index.html\n"))
}

/// The sample service's repository: the generated files stay, the Dockerfile's nonce changes.
struct WebRepo {
    repo: SampleRepo,
    port: u16,
    generated: Vec<(String, String)>,
}

impl WebRepo {
    fn create(root: &Path, port: u16, context_mib: usize) -> anyhow::Result<WebRepo> {
        let repo = SampleRepo::create(root, "sample")?;
        let mut noise = Noise(0x5EED_0001);
        let part = 512 * 1024;
        let generated = (0..(context_mib * 2).max(1))
            .map(|i| (format!("generated/part-{i:03}.txt"), noise.text(part)))
            .collect();
        Ok(WebRepo {
            repo,
            port,
            generated,
        })
    }

    fn commit(&self, nonce: &str) -> anyhow::Result<String> {
        let dockerfile = web_dockerfile(self.port, nonce)?;
        let mut files: Vec<(&str, &str)> = vec![
            ("Dockerfile", &dockerfile),
            (".dockerignore", "notes/\n"),
            ("index.html", "the benchmark's sample service\n"),
            ("notes/todo.md", "not part of the image\n"),
        ];
        files.extend(self.generated.iter().map(|(p, c)| (p.as_str(), c.as_str())));
        Ok(self
            .repo
            .commit(&format!("sample service, {nonce}"), &files)?
            .to_string())
    }

    fn context_bytes(&self) -> usize {
        self.generated.iter().map(|(_, c)| c.len()).sum()
    }
}

/// Makes `<root>/big.git` with one commit of `files` incompressible files of `file_bytes`
/// each, written as streams (never whole in memory). The repository packs them stored, not
/// deflated, and never deltified, so serving it costs no compression.
fn big_repo(
    root: &Path,
    files: usize,
    file_bytes: usize,
    dockerfile: &str,
) -> anyhow::Result<String> {
    let sample = SampleRepo::create(root, "big")?;
    let repo = git2::Repository::open_bare(&sample.path)
        .with_context(|| format!("opening {}", sample.path.display()))?;
    let mut config = repo.config()?;
    config.set_i32("pack.compression", 0)?;
    config.set_str("core.bigFileThreshold", "1m")?;
    let mut noise = Noise(0x5EED_0002);
    let mut buf = vec![0u8; 1 << 20];
    let mut big = repo.treebuilder(None)?;
    for i in 0..files {
        let mut writer = repo.blob_writer(None)?;
        let mut left = file_bytes;
        while left > 0 {
            let n = left.min(buf.len());
            let chunk = buf.get_mut(..n).context("chunk within the buffer")?;
            noise.fill(chunk);
            writer.write_all(chunk)?;
            left -= n;
        }
        big.insert(format!("blob-{i:04}.bin"), writer.commit()?, 0o100644)?;
    }
    let big = big.write()?;
    let mut tree = repo.treebuilder(None)?;
    tree.insert("Dockerfile", repo.blob(dockerfile.as_bytes())?, 0o100644)?;
    tree.insert("index.html", repo.blob(b"big build context\n")?, 0o100644)?;
    tree.insert("big", big, 0o040000)?;
    let tree = repo.find_tree(tree.write()?)?;
    let sig = git2::Signature::now("unidesk bench", "bench@unidesk.invalid")?;
    let id = repo.commit(
        Some("refs/heads/master"),
        &sig,
        &sig,
        "big build context",
        &tree,
        &[],
    )?;
    Ok(id.to_string())
}

// ---------------------------------------------------------------------------------------------
// Docker objects made here, removed at the end.

#[derive(Debug, Default)]
struct Created {
    projects: Vec<String>,
    tags: Vec<String>,
    ids: Vec<String>,
}

impl Created {
    /// Removes the containers of every project, then every tag and image id; returns what
    /// could not be removed.
    async fn remove(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for project in &self.projects {
            let listed = run_ok(
                command("docker")
                    .args(["ps", "-aq", "--filter"])
                    .arg(format!("label=com.docker.compose.project={project}")),
                "docker ps",
                COMMAND_LIMIT,
            )
            .await;
            match listed {
                Ok(out) => {
                    let ids = String::from_utf8_lossy(&out.stdout).to_string();
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    if !ids.is_empty()
                        && let Err(e) = run_ok(
                            command("docker").args(["rm", "-f"]).args(&ids),
                            "docker rm -f",
                            COMMAND_LIMIT,
                        )
                        .await
                    {
                        problems.push(format!("containers of {project}: {e:#}"));
                    }
                }
                Err(e) => problems.push(format!("listing containers of {project}: {e:#}")),
            }
        }
        self.tags.sort();
        self.tags.dedup();
        let mut ids = std::mem::take(&mut self.ids);
        ids.sort();
        ids.dedup();
        for image in self.tags.iter().chain(ids.iter()) {
            let out = command("docker")
                .args(["rmi", image])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .await;
            match out {
                Ok(out) if out.status.success() => {}
                // A tag removed above may have taken its image with it.
                Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No such image") => {}
                Ok(out) => problems.push(format!("docker rmi {image}: {}", tail(&out.stderr))),
                Err(e) => problems.push(format!("docker rmi {image}: {e}")),
            }
        }
        problems
    }
}

// ---------------------------------------------------------------------------------------------
// The running product.

struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
}

impl Binaries {
    fn find(dir: Option<&Path>) -> anyhow::Result<Binaries> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()?
                .parent()
                .context("the benchmark binary has no directory")?
                .to_path_buf(),
        };
        let found = Binaries {
            controller: dir.join("unidesk-controller"),
            agent: dir.join("unidesk-agent"),
        };
        for bin in [&found.controller, &found.agent] {
            if !bin.is_file() {
                bail!(
                    "{} not found: build it first with `cargo build --release -p \
                     unidesk-controller -p unidesk-agent` (or pass --bin-dir)",
                    bin.display()
                );
            }
        }
        Ok(found)
    }

    /// The binaries older than a source file of the crates they are built from: the figures
    /// would then not be of the code in the tree.
    fn stale(&self) -> Vec<String> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let newest = ["agent", "controller", "protocol", "link"]
            .iter()
            .filter_map(|c| newest_mtime(&workspace.join(c).join("src")))
            .max();
        let Some(newest) = newest else {
            return Vec::new();
        };
        [&self.controller, &self.agent]
            .into_iter()
            .filter(|bin| {
                std::fs::metadata(bin)
                    .and_then(|m| m.modified())
                    .is_ok_and(|built| built < newest)
            })
            .map(|bin| {
                format!(
                    "{} is older than the sources; rebuild with `cargo build --release -p \
                     unidesk-controller -p unidesk-agent`",
                    bin.display()
                )
            })
            .collect()
    }
}

/// The newest modification time of a file under `dir`.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let time = if meta.is_dir() {
            newest_mtime(&entry.path())
        } else {
            meta.modified().ok()
        };
        newest = newest.max(time);
    }
    newest
}

/// A service of the catalog with its Compose project.
struct Service {
    id: &'static str,
    repo_url: String,
    port: u16,
    project: String,
    image: String,
}

/// Controller and agent processes over a generated setup, and the files `deploy apply` reads.
struct Stack {
    setup: Setup,
    bins: Binaries,
    controller: Proc,
    agent: Option<Proc>,
    agent_config_path: PathBuf,
    agent_config: AgentConfig,
    socket: PathBuf,
    catalog: PathBuf,
    work: PathBuf,
    agents_started: usize,
}

/// One `deploy apply --wait-ms` as the operator runs it.
struct Deployed {
    seconds: f64,
    result: RunResult,
    /// Build steps the daemon answered from its cache (`Using cache` in the run's build log).
    cached_steps: usize,
}

/// How many build steps of a legacy-builder output came from the cache.
fn cached_steps(build_output: &str) -> usize {
    build_output.matches("Using cache").count()
}

impl Stack {
    async fn start(parent: &Path, bins: Binaries) -> anyhow::Result<Stack> {
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let setup = Setup::init(parent, &agent_ids(1)?, listen, free_port()?)?;
        let work = setup.dir.path().join("work");
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let config = setup.report.controller_config.clone();
        let socket = setup.controller.path(&setup.controller.admin.socket);
        let mut controller = Proc::start(
            &bins.controller,
            &[
                OsStr::new("serve"),
                OsStr::new("--config"),
                config.as_os_str(),
            ],
            setup.dir.path().join("controller.log"),
            "controller",
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while unidesk_controller::admin::request(&socket, &AdminRequest::Agents)
            .await
            .is_err()
        {
            controller.check_alive()?;
            if Instant::now() > deadline {
                bail!("the controller's admin socket did not answer within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let agent_config_path = setup
            .report
            .agent_configs
            .first()
            .context("init wrote no agent config")?
            .clone();
        let (agent_config, _) = setup.agent(0)?;
        Ok(Stack {
            catalog: setup.dir.path().join("config.json"),
            setup,
            bins,
            controller,
            agent: None,
            agent_config_path,
            agent_config,
            socket,
            work,
            agents_started: 0,
        })
    }

    fn proxy(&self) -> String {
        format!("http://{}", self.agent_config.proxy.listen)
    }

    /// Starts a fresh agent process and waits until the controller has its new connection.
    async fn start_agent(&mut self) -> anyhow::Result<u32> {
        if let Some(old) = self.agent.take() {
            old.stop().await.context("stopping the previous agent")?;
        }
        self.agents_started += 1;
        let since = now_ms();
        let mut agent = Proc::start(
            &self.bins.agent,
            &[
                OsStr::new("run"),
                OsStr::new("--config"),
                self.agent_config_path.as_os_str(),
            ],
            self.setup
                .dir
                .path()
                .join(format!("agent-{}.log", self.agents_started)),
            "agent",
        )?;
        let id = self.agent_config.id.as_str().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Ok(Value::Array(list))) =
                unidesk_controller::admin::request(&self.socket, &AdminRequest::Agents).await
                && list.iter().any(|a| {
                    a["id"].as_str() == Some(id.as_str())
                        && a["connectedSinceUnixMs"].as_u64().unwrap_or(0) >= since
                })
            {
                break;
            }
            agent.check_alive()?;
            self.controller.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "agent {id} did not connect within 30 s; see {}",
                    agent.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = agent.pid;
        self.agent = Some(agent);
        Ok(pid)
    }

    async fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(agent) = self.agent.take() {
            agent.stop().await?;
        }
        Ok(())
    }

    fn write_catalog(&self, services: &[&Service]) -> anyhow::Result<()> {
        let node = "n1";
        let catalog = json!({
            "microservices": services.iter().map(|s| json!({
                "id": s.id,
                "repository": { "url": s.repo_url },
                "deployment": {
                    "mode": "unidesk-direct",
                    "node": node,
                    "dockerfile": "Dockerfile",
                    "context": ".",
                    "image": s.image,
                    "buildTimeoutMs": 600_000,
                    "healthUrl": format!("http://127.0.0.1:{}/health", s.port),
                    "compose": { "project": s.project, "service": SERVICE }
                }
            })).collect::<Vec<_>>(),
            "nodes": { node: { "agent": self.agent_config.id.as_str(), "egress": "tunnel" } }
        });
        std::fs::write(&self.catalog, serde_json::to_vec_pretty(&catalog)?)
            .with_context(|| format!("writing {}", self.catalog.display()))
    }

    /// The agent's mirror directory of `url`.
    fn mirror_dir(&self, url: &str) -> PathBuf {
        let cache = self.agent_config.path(&self.agent_config.dirs.cache);
        MirrorCache::new(cache.join("mirrors")).mirror_dir(url)
    }

    /// Runs `unidesk-controller deploy apply --wait-ms` for `service` at `commit` and times
    /// the process; fails unless the job succeeded.
    async fn deploy(
        &self,
        service: &Service,
        commit: &str,
        flags: &[&str],
    ) -> anyhow::Result<Deployed> {
        let manifest = self.work.join(format!("deploy-{}.json", service.id));
        let doc = json!({
            "schemaVersion": 1,
            "services": [{ "id": service.id, "repo": service.repo_url, "commitId": commit }]
        });
        std::fs::write(&manifest, serde_json::to_vec(&doc)?)
            .with_context(|| format!("writing {}", manifest.display()))?;
        let mut cmd = command(&self.bins.controller);
        cmd.arg("deploy")
            .arg("apply")
            .arg("--config")
            .arg(&self.setup.report.controller_config)
            .arg("--file")
            .arg(&manifest)
            .arg("--catalog")
            .arg(&self.catalog)
            .args(["--service", service.id, "--wait-ms"])
            .arg(DEPLOY_LIMIT.as_millis().to_string())
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let out = tokio::time::timeout(DEPLOY_LIMIT + Duration::from_secs(30), cmd.output())
            .await
            .context("deploy apply did not return")?
            .context("starting deploy apply")?;
        let seconds = started.elapsed().as_secs_f64();
        let what = format!(
            "deploy apply {} at {commit} {}",
            service.id,
            flags.join(" ")
        );
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{what}: output is not JSON ({}): {}",
                out.status,
                tail(&out.stderr)
            )
        })?;
        if !out.status.success() || report["ok"] != Value::Bool(true) {
            bail!(
                "{what} failed ({}): {}\n{}",
                out.status,
                tail(&out.stderr),
                tail(
                    report["jobs"][0]["logTail"]
                        .as_str()
                        .unwrap_or("")
                        .as_bytes()
                )
            );
        }
        let job: JobRecord = serde_json::from_value(report["jobs"][0]["job"].clone())
            .with_context(|| format!("{what}: no job record in the output"))?;
        if job.status != JobStatus::Succeeded {
            bail!("{what}: job {} ended {:?}", job.job_id, job.status);
        }
        let path = self
            .agent_config
            .path(&self.agent_config.dirs.runs)
            .join(job.run_id.as_str())
            .join("result.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let result: RunResult =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        // A no-op or dry run has no build log.
        let build_log = path.with_file_name("build.log");
        let cached = std::fs::read_to_string(&build_log).unwrap_or_default();
        Ok(Deployed {
            seconds,
            result,
            cached_steps: cached_steps(&cached),
        })
    }
}

/// Step durations of a run, seconds, by step name.
fn steps(result: &RunResult) -> BTreeMap<String, f64> {
    result
        .timings
        .iter()
        .map(|t| {
            (
                format!("{:?}", t.step).to_lowercase(),
                t.millis as f64 / 1e3,
            )
        })
        .collect()
}

/// A Compose project with one service on the host network, started by `docker-compose up`.
struct Compose {
    project: String,
    file: PathBuf,
    image_repo: String,
    command: Option<u16>,
}

impl Compose {
    fn write(&self, tag: &str) -> anyhow::Result<()> {
        let command = self
            .command
            .map(|port| {
                format!(
                    "    command: [\"busybox\", \"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \
                     \"-h\", \"/www\"]\n"
                )
            })
            .unwrap_or_default();
        // `init: true`: busybox httpd as PID 1 ignores SIGTERM, so each recreate would wait
        // out the 10 s stop timeout on both sides.
        let yaml = format!(
            "version: \"2.4\"\nservices:\n  {SERVICE}:\n    image: {}:{tag}\n    \
             network_mode: host\n    init: true\n{command}",
            self.image_repo
        );
        std::fs::write(&self.file, yaml).with_context(|| format!("writing {}", self.file.display()))
    }

    fn compose(&self) -> tokio::process::Command {
        let mut cmd = command("docker-compose");
        cmd.arg("-p").arg(&self.project).arg("-f").arg(&self.file);
        cmd
    }

    async fn up(&self) -> anyhow::Result<()> {
        run_ok(
            self.compose().args(["up", "-d"]),
            &format!("docker-compose up of {}", self.project),
            COMMAND_LIMIT,
        )
        .await
        .map(drop)
    }

    async fn recreate(&self) -> anyhow::Result<()> {
        run_ok(
            self.compose().args([
                "up",
                "-d",
                "--no-build",
                "--no-deps",
                "--force-recreate",
                SERVICE,
            ]),
            &format!("docker-compose up --force-recreate of {}", self.project),
            COMMAND_LIMIT,
        )
        .await
        .map(drop)
    }
}

/// GET `/health` on a loopback port; the body, if any.
async fn health(port: u16) -> Option<String> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        text.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

async fn wait_health(port: u16, want: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let body = health(port).await;
        if body.as_deref().is_some_and(|b| b.contains(want)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("port {port} did not serve commit {want} within {limit:?}; last answer {body:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: the shell path.

/// One round of the shell path, seconds from its start.
#[derive(Debug, Clone, Copy, Serialize)]
struct RefRound {
    clone: f64,
    build: f64,
    recreate: f64,
    /// The three commands: the figure compared with the product.
    total: f64,
    /// Until the new container serves the commit on its health path (polled every 20 ms).
    healthy: f64,
    /// Build steps the daemon answered from its cache.
    cached_steps: usize,
}

struct Reference {
    compose: Compose,
    port: u16,
    url: String,
    proxy: String,
    clones: PathBuf,
    rounds: usize,
}

impl Reference {
    async fn round(
        &mut self,
        sha: &str,
        cold: bool,
        created: &mut Created,
    ) -> anyhow::Result<RefRound> {
        self.rounds += 1;
        let dir = self.clones.join(format!("clone-{}", self.rounds));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let tag = sha.get(..12).unwrap_or(sha);
        let image = format!("{}:{tag}", self.compose.image_repo);
        let started = Instant::now();

        run_ok(
            command("git")
                .args(["-c", &format!("http.proxy={}", self.proxy)])
                .args(["clone", "--no-checkout", "--quiet", &self.url])
                .arg(&dir),
            "git clone",
            DEPLOY_LIMIT,
        )
        .await?;
        let clone = started.elapsed().as_secs_f64();

        let mut archive = command("git")
            .arg("-C")
            .arg(&dir)
            .args(["archive", "--format=tar", sha])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting git archive")?;
        let tar: Stdio = archive
            .stdout
            .take()
            .context("git archive has no stdout")?
            .try_into()
            .context("passing git archive's output on")?;
        let mut build = command("docker");
        build
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "--network", "host", "--force-rm", "-t", &image])
            .args(["--build-arg", "BENCH_SIDE=reference"])
            .args(["--build-arg", &format!("UNIDESK_DEPLOY_COMMIT={sha}")]);
        for key in unidesk_agent::launch::build::PROXY_ARGS {
            build.args(["--build-arg", &format!("{key}={}", self.proxy)]);
        }
        for (key, value) in [
            ("unidesk.ai/service-id", WEB_ID),
            ("unidesk.ai/source-repo", self.url.as_str()),
            ("unidesk.ai/source-commit", sha),
            ("unidesk.ai/dockerfile", "Dockerfile"),
            ("org.opencontainers.image.revision", sha),
            ("org.opencontainers.image.source", self.url.as_str()),
        ] {
            build.args(["--label", &format!("{key}={value}")]);
        }
        if cold {
            build.arg("--no-cache");
        }
        build.arg("-").stdin(tar);
        created.tags.push(image.clone());
        let built = run_ok(&mut build, "git archive | docker build -", DEPLOY_LIMIT).await;
        let archived = tokio::time::timeout(COMMAND_LIMIT, archive.wait_with_output())
            .await
            .context("git archive did not finish")??;
        let cached = cached_steps(&String::from_utf8_lossy(&built?.stdout));
        if !archived.status.success() {
            bail!("git archive {sha} failed: {}", tail(&archived.stderr));
        }
        let build = started.elapsed().as_secs_f64();

        self.compose.write(tag)?;
        self.compose.recreate().await?;
        let recreate = started.elapsed().as_secs_f64();
        wait_health(self.port, sha, HEALTH_LIMIT).await?;
        let healthy = started.elapsed().as_secs_f64();

        created.ids.push(image_id(&image).await?);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        Ok(RefRound {
            clone,
            build: build - clone,
            recreate: recreate - build,
            total: recreate,
            healthy,
            cached_steps: cached,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// One product round: the whole `deploy apply` process and the agent's step timings.
#[derive(Debug, Clone, Serialize)]
struct ProductRound {
    total: f64,
    steps: BTreeMap<String, f64>,
    cached_steps: usize,
}

impl ProductRound {
    fn of(deployed: &Deployed) -> ProductRound {
        ProductRound {
            total: deployed.seconds,
            steps: steps(&deployed.result),
            cached_steps: deployed.cached_steps,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Case {
    name: &'static str,
    product: Vec<ProductRound>,
    reference: Vec<RefRound>,
    /// Whether the product went first, per round.
    product_first: Vec<bool>,
}

impl Case {
    fn product_total(&self) -> anyhow::Result<Summary> {
        let v: Vec<f64> = self.product.iter().map(|r| r.total).collect();
        Summary::of(&v).context("no product rounds")
    }

    fn reference_total(&self) -> anyhow::Result<Summary> {
        let v: Vec<f64> = self.reference.iter().map(|r| r.total).collect();
        Summary::of(&v).context("no reference rounds")
    }

    fn reference_healthy(&self) -> anyhow::Result<Summary> {
        let v: Vec<f64> = self.reference.iter().map(|r| r.healthy).collect();
        Summary::of(&v).context("no reference rounds")
    }

    fn product_step(&self, step: &str) -> f64 {
        let v: Vec<f64> = self
            .product
            .iter()
            .map(|r| r.steps.get(step).copied().unwrap_or(0.0))
            .collect();
        Summary::of(&v).map_or(0.0, |s| s.median)
    }

    fn product_outside_steps(&self) -> f64 {
        let v: Vec<f64> = self
            .product
            .iter()
            .map(|r| r.total - r.steps.values().sum::<f64>())
            .collect();
        Summary::of(&v).map_or(0.0, |s| s.median)
    }

    fn reference_part(&self, part: fn(&RefRound) -> f64) -> f64 {
        let v: Vec<f64> = self.reference.iter().map(part).collect();
        Summary::of(&v).map_or(0.0, |s| s.median)
    }

    fn ratio(&self) -> anyhow::Result<f64> {
        Ok(self.product_total()?.median / self.reference_total()?.median)
    }
}

#[derive(Debug, Clone, Serialize)]
struct MemoryCase {
    context_mib: usize,
    file_mib: usize,
    files: usize,
    commit: String,
    make_repo_seconds: f64,
    /// A fresh agent fetching the commit into an empty mirror (`deploy apply --dry-run`).
    fetch_seconds: f64,
    fetch_vmhwm_kib: u64,
    fetch_peaks: Peaks,
    /// A fresh agent deploying it with the mirror present: the context streams to the daemon.
    idle_before: Mem,
    deploy_seconds: f64,
    deploy_steps: BTreeMap<String, f64>,
    deploy_vmhwm_kib: u64,
    deploy_peaks: Peaks,
}

struct Bench {
    warm: Case,
    cold: Case,
    first_product: ProductRound,
    first_reference: RefRound,
    memory: Option<MemoryCase>,
    context_bytes: usize,
    git_note: String,
}

async fn preflight() -> anyhow::Result<()> {
    let hint =
        "run `bash scripts/testbed-up` (starts containerd and dockerd, builds the base image)";
    run_ok(
        command("docker").args(["version", "--format", "{{.Server.Version}}"]),
        "docker version",
        COMMAND_LIMIT,
    )
    .await
    .with_context(|| format!("Docker Engine is not reachable: {hint}"))?;
    image_id(BASE_IMAGE)
        .await
        .with_context(|| format!("image {BASE_IMAGE} is missing: {hint}"))?;
    run_ok(
        command("docker-compose").arg("version"),
        "docker-compose version",
        COMMAND_LIMIT,
    )
    .await
    .with_context(|| format!("docker-compose is missing: {hint}"))?;
    run_ok(
        command("git").arg("--version"),
        "git --version",
        COMMAND_LIMIT,
    )
    .await?;
    Ok(())
}

async fn bench(
    args: &Args,
    bins: Binaries,
    parent: &Path,
    created: &mut Created,
) -> anyhow::Result<Bench> {
    let rounds = args.rounds();
    let run_id = format!("{}-{}", std::process::id(), now_ms());
    let run_label = format!("unidesk.bench.run={run_id}");
    let prefix = format!("ubench-deploy-{}", std::process::id());

    progress("starting the controller and the agent (release binaries)");
    let mut stack = Stack::start(parent, bins).await?;
    stack.start_agent().await?;

    let git_root = stack.setup.dir.path().join("git");
    std::fs::create_dir_all(&git_root)?;
    let web_port = free_port()?;
    let web = WebRepo::create(&git_root, web_port, args.context_mib)?;
    let server = GitServer::start(git_root.clone(), None).await?;

    // The product's service and its first container, started by docker-compose.
    let product_svc = Service {
        id: WEB_ID,
        repo_url: server.url("sample.git"),
        port: web_port,
        project: format!("{prefix}-p"),
        image: format!("{prefix}-p-web:latest"),
    };
    let product_compose = Compose {
        project: product_svc.project.clone(),
        file: stack.work.join("product-compose.yml"),
        image_repo: format!("{prefix}-p-web"),
        command: None,
    };
    created.projects.push(product_compose.project.clone());
    created.tags.push(product_svc.image.clone());
    created.ids.push(
        build_first_image(
            &product_svc.image,
            &dockerfile(web_port, "none", ""),
            &run_label,
        )
        .await?,
    );
    product_compose.write("latest")?;
    product_compose.up().await?;
    wait_health(web_port, "none", HEALTH_LIMIT).await?;

    // The reference's service: the same image but its own port, named by the compose file.
    let ref_port = free_port()?;
    let mut reference = Reference {
        compose: Compose {
            project: format!("{prefix}-r"),
            file: stack.work.join("reference-compose.yml"),
            image_repo: format!("{prefix}-r-web"),
            command: Some(ref_port),
        },
        port: ref_port,
        url: product_svc.repo_url.clone(),
        proxy: stack.proxy(),
        clones: stack.work.join("clones"),
        rounds: 0,
    };
    created.projects.push(reference.compose.project.clone());
    let initial = format!("{}:initial", reference.compose.image_repo);
    created.tags.push(initial.clone());
    created
        .ids
        .push(build_first_image(&initial, &dockerfile(ref_port, "none", ""), &run_label).await?);
    reference.compose.write("initial")?;
    reference.compose.up().await?;
    wait_health(ref_port, "none", HEALTH_LIMIT).await?;

    let mut services = vec![&product_svc];
    let big_port = free_port()?;
    let big_svc = Service {
        id: BIG_ID,
        repo_url: server.url("big.git"),
        port: big_port,
        project: format!("{prefix}-m"),
        image: format!("{prefix}-m-web:latest"),
    };
    if !args.skip_memory {
        services.push(&big_svc);
    }
    stack.write_catalog(&services)?;

    // First deploys of the warm commit fill the mirror and both sides' Docker cache.
    let warm_sha = web.commit("warm")?;
    progress(&format!(
        "first deploy of {warm_sha} ({} MiB of generated files in the context)",
        web.context_bytes() >> 20
    ));
    let first = stack.deploy(&product_svc, &warm_sha, &[]).await?;
    created.ids.extend(first.result.image_id.clone());
    let first_product = ProductRound::of(&first);
    let first_reference = reference.round(&warm_sha, false, created).await?;

    let mut warm = Case {
        name: "warm",
        product: Vec::new(),
        reference: Vec::new(),
        product_first: Vec::new(),
    };
    for round in 0..rounds {
        progress(&format!("warm round {}/{rounds}", round + 1));
        let product_first = round % 2 == 0;
        let mut product = None;
        for side in [product_first, !product_first] {
            if side {
                let deployed = stack.deploy(&product_svc, &warm_sha, &["--force"]).await?;
                created.ids.extend(deployed.result.image_id.clone());
                product = Some(ProductRound::of(&deployed));
            } else {
                warm.reference
                    .push(reference.round(&warm_sha, false, created).await?);
            }
        }
        warm.product.push(product.context("the product round ran")?);
        warm.product_first.push(product_first);
    }

    let mut cold = Case {
        name: "cold",
        product: Vec::new(),
        reference: Vec::new(),
        product_first: Vec::new(),
    };
    for round in 0..rounds {
        progress(&format!("cold round {}/{rounds}", round + 1));
        let sha = web.commit(&format!("cold-{round}-{run_id}"))?;
        let mirror = stack.mirror_dir(&product_svc.repo_url);
        if mirror.exists() {
            std::fs::remove_dir_all(&mirror)
                .with_context(|| format!("removing the mirror {}", mirror.display()))?;
        }
        let product_first = round % 2 == 0;
        let mut product = None;
        for side in [product_first, !product_first] {
            if side {
                let deployed = stack.deploy(&product_svc, &sha, &[]).await?;
                created.ids.extend(deployed.result.image_id.clone());
                product = Some(ProductRound::of(&deployed));
            } else {
                cold.reference
                    .push(reference.round(&sha, true, created).await?);
            }
        }
        cold.product.push(product.context("the product round ran")?);
        cold.product_first.push(product_first);
    }

    let memory = if args.skip_memory {
        None
    } else {
        Some(memory_case(args, &mut stack, &git_root, &big_svc, created, &run_label).await?)
    };
    stack.stop_agent().await?;
    drop(server);
    let git_note = run_ok(
        command("git").arg("--version"),
        "git --version",
        COMMAND_LIMIT,
    )
    .await
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default();
    Ok(Bench {
        warm,
        cold,
        first_product,
        first_reference,
        memory,
        context_bytes: web.context_bytes(),
        git_note,
    })
}

async fn memory_case(
    args: &Args,
    stack: &mut Stack,
    git_root: &Path,
    svc: &Service,
    created: &mut Created,
    run_label: &str,
) -> anyhow::Result<MemoryCase> {
    let file_mib = args.big_file_mib.max(1);
    let files = (args.big_mib() / file_mib).max(1);
    progress(&format!(
        "memory case: generating {files} files of {file_mib} MiB{}",
        if args.quick {
            " (quick: 256 MiB instead of 1 GiB)"
        } else {
            ""
        }
    ));
    let started = Instant::now();
    let dockerfile_text = big_dockerfile(svc.port)?;
    let root = git_root.to_path_buf();
    let commit = tokio::task::spawn_blocking(move || {
        big_repo(&root, files, file_mib << 20, &dockerfile_text)
    })
    .await
    .context("generating the big repository panicked")??;
    let make_repo_seconds = started.elapsed().as_secs_f64();

    let compose = Compose {
        project: svc.project.clone(),
        file: stack.work.join("big-compose.yml"),
        image_repo: svc.image.trim_end_matches(":latest").to_string(),
        command: None,
    };
    created.projects.push(compose.project.clone());
    created.tags.push(svc.image.clone());
    created
        .ids
        .push(build_first_image(&svc.image, &dockerfile(svc.port, "none", ""), run_label).await?);
    compose.write("latest")?;
    compose.up().await?;
    wait_health(svc.port, "none", HEALTH_LIMIT).await?;

    progress("memory case: fresh agent, dry run (fetches the commit into an empty mirror)");
    let pid = stack.start_agent().await?;
    let sampler = Sampler::start(pid);
    let fetched = stack.deploy(svc, &commit, &["--dry-run"]).await?;
    let fetch_peaks = sampler.finish().await?;
    let fetch_vmhwm_kib = read_mem(pid)?.vm_hwm;

    progress("memory case: fresh agent, deploy (the context streams from the mirror)");
    let pid = stack.start_agent().await?;
    // Let start-up settle before the idle figure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_before = read_mem(pid)?;
    let sampler = Sampler::start(pid);
    let deployed = stack.deploy(svc, &commit, &[]).await?;
    let deploy_peaks = sampler.finish().await?;
    let deploy_vmhwm_kib = read_mem(pid)?.vm_hwm;
    created.ids.extend(deployed.result.image_id.clone());
    Ok(MemoryCase {
        context_mib: files * file_mib,
        file_mib,
        files,
        commit,
        make_repo_seconds,
        fetch_seconds: fetched.seconds,
        fetch_vmhwm_kib,
        fetch_peaks,
        idle_before,
        deploy_seconds: deployed.seconds,
        deploy_steps: steps(&deployed.result),
        deploy_vmhwm_kib,
        deploy_peaks,
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

fn secs(s: &Summary) -> String {
    format!("{:.2} s (spread {:.0}%)", s.median, s.spread() * 100.0)
}

fn yes(ok: bool) -> String {
    if ok { "yes" } else { "NO" }.to_string()
}

fn render(args: &Args, machine: &Machine, b: &Bench) -> anyhow::Result<String> {
    let mut e2e = Table::new(&[
        "case",
        "product `deploy apply --wait-ms` (median)",
        "reference shell path (median)",
        "ratio",
        "goal",
        "met",
    ]);
    for (case, goal) in [(&b.warm, GOAL_WARM_RATIO), (&b.cold, GOAL_COLD_RATIO)] {
        let ratio = case.ratio()?;
        e2e.row(vec![
            format!("{} ({} rounds)", case.name, case.product.len()),
            secs(&case.product_total()?),
            secs(&case.reference_total()?),
            format!("{ratio:.2}"),
            format!("≤ {goal}"),
            yes(ratio <= goal),
        ]);
    }
    for case in [&b.warm, &b.cold] {
        let healthy = case.reference_healthy()?;
        e2e.row(vec![
            format!(
                "{}: reference until its health path shows the commit",
                case.name
            ),
            String::new(),
            secs(&healthy),
            format!("{:.2}", case.product_total()?.median / healthy.median),
            String::new(),
            String::new(),
        ]);
    }

    let mut parts = Table::new(&[
        "case",
        "product steps (agent's result.json, medians)",
        "reference commands (medians)",
        "build steps from cache per round (product; reference)",
    ]);
    for case in [&b.warm, &b.cold] {
        parts.row(vec![
            case.name.to_string(),
            format!(
                "materialize {:.2} + build {:.2} + recreate {:.2} + verify {:.2} + outside steps {:.2} s",
                case.product_step("materialize"),
                case.product_step("build"),
                case.product_step("recreate"),
                case.product_step("verify"),
                case.product_outside_steps(),
            ),
            format!(
                "clone {:.2} + archive into build {:.2} + compose recreate {:.2} s (+ health {:.2} s)",
                case.reference_part(|r| r.clone),
                case.reference_part(|r| r.build),
                case.reference_part(|r| r.recreate),
                case.reference_part(|r| r.healthy - r.total),
            ),
            format!(
                "{:?}; {:?}",
                case.product
                    .iter()
                    .map(|r| r.cached_steps)
                    .collect::<Vec<_>>(),
                case.reference
                    .iter()
                    .map(|r| r.cached_steps)
                    .collect::<Vec<_>>()
            ),
        ]);
    }
    parts.row(vec![
        "first deploy (untimed setup)".into(),
        format!("{:.2} s", b.first_product.total),
        format!("{:.2} s", b.first_reference.total),
    ]);

    let mut text = format!(
        "## Deploy: end to end and agent memory ({})\n\n{}\n\n\
         Sample service: {:.1} MiB of generated text in {} files plus the sample Dockerfile with \
         one layer after `FROM`; {}.\n\n{}\n{}",
        if args.quick { "quick" } else { "full" },
        machine.line(),
        b.context_bytes as f64 / 1048576.0,
        (args.context_mib * 2).max(1),
        b.git_note,
        e2e.render(),
        parts.render(),
    );
    if let Some(m) = &b.memory {
        let mut mem = Table::new(&["figure", "value", "goal", "met"]);
        let peak = mib(m.deploy_vmhwm_kib);
        mem.row(vec![
            format!(
                "agent VmHWM, deploy streaming a {} MiB context ({} × {} MiB incompressible){}",
                m.context_mib,
                m.files,
                m.file_mib,
                if args.quick {
                    " — quick, not 1 GiB"
                } else {
                    ""
                }
            ),
            format!("{peak:.1} MiB"),
            format!("≤ {GOAL_PEAK_MIB} MiB"),
            yes(peak <= GOAL_PEAK_MIB),
        ]);
        mem.row(vec![
            "  sampled peaks (every 10 ms): anonymous (RssAnon) / file-backed (RssFile)".into(),
            format!(
                "{:.1} / {:.1} MiB ({} samples)",
                mib(m.deploy_peaks.rss_anon),
                mib(m.deploy_peaks.rss_file),
                m.deploy_peaks.samples
            ),
            String::new(),
            String::new(),
        ]);
        if let Some(map) = &m.deploy_peaks.largest_file_mapping {
            let shown = map
                .path
                .find("mirrors/")
                .and_then(|i| map.path.get(i..))
                .unwrap_or(&map.path);
            mem.row(vec![
                "  largest file mapping, from /proc/<pid>/smaps".into(),
                format!("`{shown}`: {:.1} MiB resident", mib(map.rss_kib)),
                String::new(),
                String::new(),
            ]);
        }
        mem.row(vec![
            "  agent idle before (VmRSS, RssAnon)".into(),
            format!(
                "{:.1} MiB, {:.1} MiB",
                mib(m.idle_before.vm_rss),
                mib(m.idle_before.rss_anon)
            ),
            String::new(),
            String::new(),
        ]);
        let build = m.deploy_steps.get("build").copied().unwrap_or(0.0);
        mem.row(vec![
            "  deploy: total / build step (context upload and build)".into(),
            format!(
                "{:.1} s / {build:.1} s ({:.0} MB/s)",
                m.deploy_seconds,
                unidesk_bench::report::mb_per_s((m.context_mib as u64) << 20, build)
            ),
            String::new(),
            String::new(),
        ]);
        mem.row(vec![
            format!(
                "agent VmHWM, dry run fetching the {} MiB into an empty mirror",
                m.context_mib
            ),
            format!(
                "{:.1} MiB (RssAnon peak {:.1}, RssFile peak {:.1}), {:.1} s",
                mib(m.fetch_vmhwm_kib),
                mib(m.fetch_peaks.rss_anon),
                mib(m.fetch_peaks.rss_file),
                m.fetch_seconds
            ),
            String::new(),
            String::new(),
        ]);
        text.push('\n');
        text.push_str(&mem.render());
    }
    Ok(text)
}

fn case_json(case: &Case) -> anyhow::Result<Value> {
    Ok(json!({
        "rounds": case,
        "product_seconds": case.product_total()?,
        "reference_seconds": case.reference_total()?,
        "reference_until_healthy_seconds": case.reference_healthy()?,
        "ratio_of_medians": case.ratio()?,
    }))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let target = target_dir()?;
    let bins = Binaries::find(args.bin_dir.as_deref())?;
    preflight().await?;
    let parent = args
        .setup_dir
        .clone()
        .unwrap_or_else(|| default_parent(&target));
    let stale = bins.stale();
    for warning in &stale {
        eprintln!("warning: {warning}");
    }
    let binaries = json!({
        "controller": &bins.controller,
        "agent": &bins.agent,
        "stale": stale,
    });

    let started = Instant::now();
    let mut created = Created::default();
    let result = bench(&args, bins, &parent, &mut created).await;
    progress("removing the containers and images made here");
    for problem in created.remove().await {
        eprintln!("cleanup: {problem}");
    }
    let b = result?;
    let elapsed = started.elapsed();

    let report = json!({
        "benchmark": "deploy",
        "machine": machine,
        "quick": args.quick,
        "rounds": args.rounds(),
        "binaries": binaries,
        "context_bytes": b.context_bytes,
        "git": b.git_note,
        "method": {
            "product": "unidesk-controller deploy apply --file --catalog --service --wait-ms \
                        (a process) against unidesk-controller serve and unidesk-agent run \
                        (release binaries); warm rounds redeploy the same commit with --force; \
                        cold rounds delete the agent's mirror and deploy a new commit whose \
                        Dockerfile changes the layer after FROM",
            "reference": "git -c http.proxy=<agent proxy> clone --no-checkout; git archive \
                          <commit> | DOCKER_BUILDKIT=0 docker build --network host \
                          --build-arg BENCH_SIDE=reference (cold: --no-cache) -; rewrite the \
                          compose file's image tag; docker-compose up -d --no-build --no-deps \
                          --force-recreate web",
            "alternation": "product first in even rounds, reference first in odd rounds",
        },
        "warm": case_json(&b.warm)?,
        "cold": case_json(&b.cold)?,
        "first_product": b.first_product,
        "first_reference": b.first_reference,
        "goal_warm_ratio": GOAL_WARM_RATIO,
        "goal_cold_ratio": GOAL_COLD_RATIO,
        "memory": b.memory,
        "goal_peak_mib": GOAL_PEAK_MIB,
        "measured_seconds": elapsed.as_secs_f64(),
    });
    let path = write_json(&target, "deploy", &report)?;
    let mut text = render(&args, &machine, &b)?;
    for warning in &stale {
        text.push_str(&format!("\nWARNING: {warning}\n"));
    }
    print(&text);
    print(&format!(
        "measured in {:.0} s; written to {}",
        elapsed.as_secs_f64(),
        path.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_text_has_the_asked_size_and_lines() {
        let text = Noise(1).text(1000);
        assert_eq!(text.len(), 1000);
        assert!(text.lines().all(|l| l.len() <= 76));
        assert_ne!(Noise(1).text(64), Noise(2).text(64));
    }

    #[test]
    fn web_dockerfile_puts_the_side_layer_right_after_from() {
        let d = web_dockerfile(8080, "n1").unwrap();
        let lines: Vec<&str> = d.lines().collect();
        assert!(lines[0].starts_with("FROM "));
        assert_eq!(lines[1], "ARG BENCH_SIDE=product");
        assert!(lines[2].contains("n1"));
        assert!(d.contains("COPY . /src"));
    }

    #[test]
    fn big_dockerfile_copies_one_file() {
        let d = big_dockerfile(8080).unwrap();
        assert!(!d.contains("COPY . /src") && d.contains("COPY index.html"));
    }
}
