//! `tunnel`: egress tunnel throughput through the real path — client → agent proxy
//! (`CONNECT`) → yamux stream over the agent's TLS WebSocket → controller → TCP to a
//! loopback source — against two references carrying the same bytes in the same run: one
//! direct rustls TLS connection and direct TCP, both on loopback.
//!
//! Controller and agent run in this process from their libraries (`serve::bind`/`run`,
//! `service::run`) with a setup written by `init`. Paths are run alternately, in rotating
//! order, for several rounds; the report gives the median, the spread and product/TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use unidesk_agent::egress::BoxedStream;
use unidesk_bench::report::{Machine, Table, mb_per_s, print, write_json};
use unidesk_bench::setup::{Setup, agent_ids, default_parent, free_port, process_cpu, target_dir};
use unidesk_bench::source::{self, Direction, Request};
use unidesk_bench::stats::Summary;
use unidesk_controller::config::TunnelConfig;

const MIB: u64 = 1 << 20;

/// The smallest per-stream receive window yamux gives each stream.
const STREAM_WINDOW: usize = 256 * 1024;

/// The longest one measured transfer (all its streams) may take.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// The product/TLS throughput ratio issue 2 asks for.
const GOAL_RATIO: f64 = 0.6;

/// Tunnel throughput: product vs direct TLS vs direct TCP on loopback.
#[derive(Debug, Parser)]
#[command(name = "tunnel")]
struct Args {
    /// Smaller transfers and fewer rounds: under a minute on 2 cores (release build).
    #[arg(long)]
    quick: bool,
    /// Controller `[tunnel] max_connection_window` in bytes (default: the product's). The
    /// controller's window bounds what it receives, so it shows in `--direction up`; the
    /// agent always uses `LinkConfig::default()`.
    #[arg(long, value_name = "BYTES")]
    window: Option<usize>,
    /// Which way the bytes flow: `down` (source → client, like a fetch) or `up`.
    #[arg(long, value_enum, default_value = "down")]
    direction: Direction,
    /// Rounds per path and stream count (default: 5 quick, 7 full).
    #[arg(long)]
    rounds: Option<usize>,
    /// MiB carried by the single stream (default: 128 quick, 1024 full).
    #[arg(long)]
    single_mib: Option<u64>,
    /// MiB carried by each concurrent stream (default: 32 quick, 256 full).
    #[arg(long)]
    per_stream_mib: Option<u64>,
    /// Number of concurrent streams.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Connection set-up samples per path (default: 50 quick, 200 full).
    #[arg(long)]
    setups: Option<usize>,
    /// Run only these paths (for profiling one of them); the product/TLS ratio needs both.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "product,direct-tls,direct-tcp"
    )]
    paths: Vec<Path>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Path {
    /// Agent proxy → tunnel → controller → source.
    Product,
    /// One direct rustls TLS connection per stream to a TLS source.
    DirectTls,
    /// Direct TCP to the source.
    DirectTcp,
}

const PATHS: [Path; 3] = [Path::Product, Path::DirectTls, Path::DirectTcp];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Product => "product (proxy → tunnel → controller)",
            Path::DirectTls => "direct rustls TLS",
            Path::DirectTcp => "direct TCP",
        }
    }
}

/// Where each path connects.
struct Endpoints {
    proxy: SocketAddr,
    source: SocketAddr,
    tls_source: SocketAddr,
    tls_client: Arc<rustls::ClientConfig>,
}

impl Endpoints {
    /// Opens a stream on `path`, ready for a request.
    async fn open(&self, path: Path) -> anyhow::Result<BoxedStream> {
        match path {
            Path::Product => {
                let mut tcp = TcpStream::connect(self.proxy)
                    .await
                    .with_context(|| format!("connecting to the agent proxy {}", self.proxy))?;
                tcp.set_nodelay(true)?;
                let target = self.source;
                let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
                tcp.write_all(head.as_bytes()).await?;
                let reply = read_head(&mut tcp).await?;
                if !reply.starts_with("HTTP/1.1 200") {
                    anyhow::bail!("the agent proxy answered CONNECT {target} with {reply:?}");
                }
                Ok(Box::new(tcp))
            }
            Path::DirectTls => {
                let tcp = TcpStream::connect(self.tls_source).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::from(self.tls_source.ip());
                let tls = tokio_rustls::TlsConnector::from(self.tls_client.clone())
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS with {}", self.tls_source))?;
                Ok(Box::new(tls))
            }
            Path::DirectTcp => {
                let tcp = TcpStream::connect(self.source).await?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(tcp))
            }
        }
    }

    /// Opens `streams` streams on `path`, then moves `bytes` on each at once; returns the
    /// aggregate throughput in MB/s, timed from the first request to the last byte, and the
    /// bytes moved per CPU-second this process (every end of the path) spent meanwhile.
    async fn measure(
        &self,
        path: Path,
        streams: usize,
        bytes: u64,
        direction: Direction,
    ) -> anyhow::Result<Sample> {
        let opened = futures::future::try_join_all((0..streams).map(|_| self.open(path)));
        let mut opened = tokio::time::timeout(RUN_DEADLINE, opened)
            .await
            .with_context(|| format!("{}: opening {streams} streams timed out", path.name()))??;
        let request = Request {
            direction,
            len: bytes,
        };
        let started = Instant::now();
        let cpu = process_cpu();
        let moved = futures::future::try_join_all(
            opened
                .iter_mut()
                .map(|stream| source::transfer(stream, request)),
        );
        tokio::time::timeout(RUN_DEADLINE, moved)
            .await
            .with_context(|| {
                format!(
                    "{}: transfer took longer than {RUN_DEADLINE:?}",
                    path.name()
                )
            })?
            .with_context(|| format!("{}: transfer failed", path.name()))?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu_seconds = process_cpu().saturating_sub(cpu).as_secs_f64();
        let total = bytes * streams as u64;
        Ok(Sample {
            mb_per_s: mb_per_s(total, seconds),
            mb_per_cpu_s: mb_per_s(total, cpu_seconds),
        })
    }

    /// Time to a stream ready for its request, in milliseconds.
    async fn setup_ms(&self, path: Path) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut stream = tokio::time::timeout(Duration::from_secs(10), self.open(path))
            .await
            .with_context(|| format!("{}: set-up took longer than 10 s", path.name()))??;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        // An empty request lets the source end the connection cleanly.
        let empty = Request {
            direction: Direction::Down,
            len: 0,
        };
        tokio::time::timeout(
            Duration::from_secs(10),
            source::transfer(&mut stream, empty),
        )
        .await
        .context("closing a set-up sample")??;
        Ok(ms)
    }
}

/// One measured transfer.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Aggregate throughput, MB per wall-clock second.
    mb_per_s: f64,
    /// MB moved per CPU-second of this process: the cost of a byte, which a busy machine
    /// disturbs less than the throughput.
    mb_per_cpu_s: f64,
}

/// Reads an HTTP response head byte by byte (nothing follows it until the request is sent).
async fn read_head(tcp: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            anyhow::bail!("the proxy's response head is longer than 16 KiB");
        }
        let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut byte))
            .await
            .context("no response from the agent proxy in 30 s")??;
        if n == 0 {
            anyhow::bail!(
                "the agent proxy closed after {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[derive(serde::Serialize)]
struct Row {
    streams: usize,
    bytes_per_stream: u64,
    path: Path,
    mb_per_s: Summary,
    samples: Vec<f64>,
    mb_per_cpu_s: Summary,
}

#[tokio::main]
async fn main() {
    unidesk_agent::logging::init("warn");
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let rounds = args.rounds.unwrap_or(if args.quick { 5 } else { 7 }).max(1);
    let single = args
        .single_mib
        .unwrap_or(if args.quick { 128 } else { 1024 })
        * MIB;
    let per_stream = args
        .per_stream_mib
        .unwrap_or(if args.quick { 32 } else { 256 })
        * MIB;
    let setups = args.setups.unwrap_or(if args.quick { 50 } else { 200 });
    let streams = args.streams.max(1);

    let target = target_dir()?;
    let cancel = CancellationToken::new();
    let setup = Setup::init(
        &default_parent(&target),
        &agent_ids(1)?,
        "127.0.0.1:0".parse()?,
        free_port()?,
    )?;
    let mut controller = setup.controller.clone();
    if let Some(window) = args.window {
        let max_streams = (window / STREAM_WINDOW).min(controller.tunnel.max_streams);
        if max_streams < streams {
            anyhow::bail!(
                "--window {window} leaves room for {max_streams} streams at yamux's 256 KiB \
                 minimum each; {streams} concurrent streams need at least {}",
                streams * STREAM_WINDOW
            );
        }
        controller.tunnel = TunnelConfig {
            max_connection_window: window,
            max_streams,
        };
        controller
            .tunnel
            .link()
            .validate()
            .with_context(|| format!("--window {window}"))?;
    }
    let tunnel = controller.tunnel.clone();
    let bound = unidesk_controller::serve::bind(&controller)
        .await
        .context("starting the controller")?;
    let hub = bound.hub.clone();
    let gateway = bound.gateway_addr;
    tokio::spawn(bound.run(cancel.child_token()));

    let (mut agent, secret) = setup.agent(0)?;
    agent.controller.url = format!("wss://{}:{}/agent", gateway.ip(), gateway.port());
    // Downloads are limited by the agent's receive window, uploads by the controller's.
    agent.tunnel = tunnel.clone();
    let proxy = agent.proxy.listen;
    let tls_client = unidesk_agent::conn::tls_config(&agent).map_err(anyhow::Error::msg)?;
    unidesk_bench::setup::start_agent(agent.clone(), secret, &hub, cancel.child_token()).await?;

    let server_tls = unidesk_controller::pki::server_config(
        &controller.path(&controller.gateway.cert),
        &controller.path(&controller.gateway.key),
    )?;
    let endpoints = Endpoints {
        proxy,
        source: source::spawn_tcp(cancel.child_token()).await?,
        tls_source: source::spawn_tls(server_tls, cancel.child_token()).await?,
        tls_client,
    };

    let paths: Vec<Path> = PATHS
        .into_iter()
        .filter(|p| args.paths.contains(p))
        .collect();
    // Warm-up, not counted: first connections, allocator growth, yamux's first window.
    for &path in &paths {
        endpoints
            .measure(path, 1, 16 * MIB, args.direction)
            .await
            .with_context(|| format!("warm-up on {}", path.name()))?;
    }

    let started = Instant::now();
    let scenarios = [(1usize, single), (streams, per_stream)];
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); paths.len()]; scenarios.len()];
    for round in 0..rounds {
        for (s, &(count, bytes)) in scenarios.iter().enumerate() {
            // Rotating the order each round spreads any drift over all paths.
            for k in 0..paths.len() {
                let p = (k + round) % paths.len();
                let sample = endpoints
                    .measure(paths[p], count, bytes, args.direction)
                    .await?;
                samples[s][p].push(sample);
            }
        }
    }
    let mut setup_samples: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for i in 0..setups {
        for k in 0..paths.len() {
            let p = (k + i) % paths.len();
            setup_samples[p].push(endpoints.setup_ms(paths[p]).await?);
        }
    }
    let elapsed = started.elapsed();
    cancel.cancel();

    let mut rows = Vec::new();
    let mut table = Table::new(&[
        "streams",
        "MiB per stream",
        "path",
        "median MB/s",
        "min–max MB/s",
        "spread",
        "÷ TLS",
        "MB per CPU-s",
        "÷ TLS",
    ]);
    let mut ratios = serde_json::Map::new();
    let mut verdicts = Vec::new();
    let tls_index = paths.iter().position(|&p| p == Path::DirectTls);
    let product_index = paths.iter().position(|&p| p == Path::Product);
    for (s, &(count, bytes)) in scenarios.iter().enumerate() {
        let of = |f: fn(&Sample) -> f64| -> anyhow::Result<Vec<Summary>> {
            samples[s]
                .iter()
                .map(|v| Summary::of(&v.iter().map(f).collect::<Vec<_>>()).context("no samples"))
                .collect()
        };
        let summaries = of(|x| x.mb_per_s)?;
        let cpu = of(|x| x.mb_per_cpu_s)?;
        let tls = tls_index.map(|i| summaries[i].median);
        let tls_cpu = tls_index.map(|i| cpu[i].median);
        for (p, summary) in summaries.iter().enumerate() {
            table.row(vec![
                count.to_string(),
                (bytes / MIB).to_string(),
                paths[p].name().to_string(),
                format!("{:.0}", summary.median),
                format!("{:.0}–{:.0}", summary.min, summary.max),
                format!("{:.0}%", summary.spread() * 100.0),
                tls.map_or_else(String::new, |t| format!("{:.2}", summary.median / t)),
                format!("{:.0}", cpu[p].median),
                tls_cpu.map_or_else(String::new, |t| format!("{:.2}", cpu[p].median / t)),
            ]);
            rows.push(Row {
                streams: count,
                bytes_per_stream: bytes,
                path: paths[p],
                mb_per_s: summary.clone(),
                samples: samples[s][p].iter().map(|x| x.mb_per_s).collect(),
                mb_per_cpu_s: cpu[p].clone(),
            });
        }
        if let (Some(tls), Some(product)) = (tls, product_index) {
            let ratio = summaries[product].median / tls;
            ratios.insert(format!("{count}"), serde_json::json!(ratio));
            verdicts.push(format!(
                "{count} stream{}: product/TLS = {ratio:.2} (goal ≥ {GOAL_RATIO}: {})",
                if count == 1 { "" } else { "s" },
                if ratio >= GOAL_RATIO {
                    "met"
                } else {
                    "NOT met"
                }
            ));
        }
    }
    let mut latency = Table::new(&["path", "set-up p50 ms", "set-up p99 ms", "samples"]);
    let mut latency_json = serde_json::Map::new();
    for (p, v) in setup_samples.iter().enumerate() {
        let Some(summary) = Summary::of(v) else {
            continue;
        };
        latency.row(vec![
            paths[p].name().to_string(),
            format!("{:.3}", summary.p50),
            format!("{:.3}", summary.p99),
            summary.count.to_string(),
        ]);
        let key = serde_json::to_value(paths[p])?;
        latency_json.insert(
            key.as_str().unwrap_or("path").to_string(),
            serde_json::to_value(&summary)?,
        );
    }

    let report = serde_json::json!({
        "benchmark": "tunnel",
        "machine": machine,
        "quick": args.quick,
        "direction": args.direction,
        "rounds": rounds,
        "controller_tunnel": {
            "max_connection_window": tunnel.max_connection_window,
            "max_streams": tunnel.max_streams,
        },
        "agent_link": "LinkConfig::default()",
        "mb": "10^6 bytes",
        "throughput": rows,
        "product_over_tls": ratios,
        "goal_product_over_tls": GOAL_RATIO,
        "setup_latency_ms": latency_json,
        "measured_seconds": elapsed.as_secs_f64(),
    });
    let json = write_json(&target, "tunnel", &report)?;
    print(&format!(
        "## Tunnel throughput ({}, {rounds} rounds, direction {:?})\n\n{}\n\
         controller [tunnel] max_connection_window = {} bytes, max_streams = {}; \
         agent LinkConfig::default()\n\n{}\n\n{}\n{}",
        if args.quick { "quick" } else { "full" },
        args.direction,
        machine.line(),
        tunnel.max_connection_window,
        tunnel.max_streams,
        table.render(),
        verdicts.join("\n"),
        latency.render(),
    ));
    print(&format!("written to {}", json.display()));
    Ok(())
}
