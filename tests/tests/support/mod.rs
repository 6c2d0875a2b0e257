//! Test support: a fresh setup directory per test (made by the real `init`), the real
//! binaries started as processes, a cuttable TCP relay, and waiting helpers with deadlines.
#![allow(clippy::disallowed_methods)] // Tests start the product's binaries as processes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod booted;
pub mod daemons;
pub mod kube_double;
pub mod registry;
pub mod service;

/// Where the workspace's binaries are: beside this test binary's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` \
         (scripts/test does this)",
        path.display()
    );
    path
}

/// Ports handed to tests come from below the kernel's ephemeral range (32768 up): the
/// kernel never picks one of these for another socket between the moment a test is handed
/// it and the moment its server binds it, and the counter keeps this run's tests apart.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// `n` consecutive loopback ports, each free when checked, none handed out before in this
/// run; the start depends on the process id, so two test runs on one machine rarely meet.
fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let offset = start.wrapping_add(NEXT.fetch_add(u32::from(n), Ordering::SeqCst)) % span;
        let Some(first) = u16::try_from(offset)
            .ok()
            .map(|o| PORTS.start + o)
            .filter(|f| f + n <= PORTS.end)
        else {
            continue;
        };
        if (first..first + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return first;
        }
    }
    panic!("no run of {n} free loopback ports in {PORTS:?}")
}

/// A free loopback port for a server a test starts.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// A path as a CLI argument.
pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The steps a job's events started, in order.
pub fn started_steps(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            e["body"]["StepStarted"]["step"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// Polls `f` until it returns `Some`, failing the test after `limit` with `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    wait_until(what, limit, || f().ok_or(()), |()| String::new())
}

/// Polls `poll` until it returns `Ok`, failing the test after `limit` with `what` and, from
/// the last `Err`, `describe`'s account of where things stood (computed only then).
pub fn wait_until<T, S>(
    what: &str,
    limit: Duration,
    mut poll: impl FnMut() -> Result<T, S>,
    describe: impl FnOnce(S) -> String,
) -> T {
    let until = Instant::now() + limit;
    loop {
        match poll() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= until => {
                panic!(
                    "timed out after {limit:?} waiting for {what}{}",
                    describe(last)
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Whether a stored job record is final, by the controller's own rule.
pub fn is_final(job: &Value) -> bool {
    serde_json::from_value::<unidesk_controller::store::JobStatus>(job["status"].clone())
        .is_ok_and(|s| s.is_final())
}

/// A running process whose stderr goes to a file; killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// The process's log so far, complete lines only (a line still being written is left out).
    pub fn log_text(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's setup: a controller config and agent configs made by `init`.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub gateway: SocketAddr,
}

/// `UNIDESK_TEST_KEEP=1` keeps a failed test's directory (configs, logs, job store, run
/// directories) for a post-mortem, and prints where it is.
impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("UNIDESK_TEST_KEEP").is_some() {
            self._dir.disable_cleanup(true);
            eprintln!("UNIDESK_TEST_KEEP: kept {}", self._dir.path().display());
        }
    }
}

impl Setup {
    /// Runs `unidesk-controller init` for `agents` on free ports, allowing egress to loopback.
    pub fn new(agents: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("setup");
        let gateway: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let proxy = free_ports(agents.len() as u16);
        let out = Command::new(bin("unidesk-controller"))
            .args(["init", "--dir"])
            .arg(&dir)
            .args(["--agents", &agents.join(",")])
            .args(["--listen", &gateway.to_string()])
            .args(["--proxy-port", &proxy.to_string()])
            .args([
                "--egress-allow",
                "127.0.0.1:*",
                "--egress-allow",
                "localhost:*",
            ])
            .args(["--egress-allow", "cidr:127.0.0.0/8"])
            .output()
            .expect("run init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Setup {
            _dir: tmp,
            dir,
            gateway,
        }
    }

    pub fn controller_config(&self) -> PathBuf {
        self.dir.join("controller.toml")
    }

    pub fn agent_config(&self, id: &str) -> PathBuf {
        self.dir.join(format!("agent-{id}.toml"))
    }

    /// Starts `unidesk-controller serve` and waits for its admin socket.
    pub fn controller(&self) -> Proc {
        let log = self.dir.join(format!("controller-{}.log", unique()));
        let child = Command::new(bin("unidesk-controller"))
            .args(["serve", "--config"])
            .arg(self.controller_config())
            .env("UNIDESK_LOG", "info,unidesk_controller=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start controller");
        let proc = Proc { child, log };
        wait_for("the controller to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(self.gateway).ok()
        });
        // The admin socket is bound after the gateway; a stale one from a killed
        // controller refuses, so only an answer says this controller serves it.
        wait_for(
            "the controller's admin socket",
            Duration::from_secs(20),
            || (self.cli(&["agents"]).0 == 0).then_some(()),
        );
        proc
    }

    /// Starts `unidesk-agent run` with the given config file.
    pub fn agent_with(&self, config: &Path) -> Proc {
        let log = self.dir.join(format!(
            "{}-{}.log",
            config.file_stem().unwrap().to_string_lossy(),
            unique()
        ));
        let child = Command::new(bin("unidesk-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env("UNIDESK_LOG", "info,unidesk_agent=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start agent");
        Proc { child, log }
    }

    pub fn agent(&self, id: &str) -> Proc {
        self.agent_with(&self.agent_config(id))
    }

    /// Runs a controller CLI verb with `--config` and returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("unidesk-controller"))
            .args(args)
            .arg("--config")
            .arg(self.controller_config())
            .output()
            .expect("run CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a CLI verb that prints JSON and parses it, failing the test on a bad exit.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "{args:?} exited {code}: {err}\n{out}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
    }

    /// Waits until `agents` lists every id in `ids`.
    pub fn wait_agents(&self, ids: &[&str]) {
        wait_for(
            &format!("agents {ids:?} to connect"),
            Duration::from_secs(30),
            || {
                let (code, out, _) = self.cli(&["agents"]);
                if code != 0 {
                    return None;
                }
                let list: Value = serde_json::from_str(&out).ok()?;
                let have: Vec<&str> = list
                    .as_array()?
                    .iter()
                    .filter_map(|a| a["id"].as_str())
                    .collect();
                ids.iter().all(|id| have.contains(id)).then_some(())
            },
        )
    }

    /// The events of a job as stored by the controller.
    pub fn job_events(&self, job_id: &str) -> Vec<Value> {
        let path = self
            .dir
            .join("state/jobs")
            .join(job_id)
            .join("events.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a job's stored record is final; the record. On timeout the failure shows
    /// the record and the job's last stored events.
    pub fn wait_final(&self, job_id: &str, limit: Duration) -> Value {
        wait_until(
            &format!("job {job_id} to end"),
            limit,
            || {
                let job = self.job(job_id);
                if is_final(&job) { Ok(job) } else { Err(job) }
            },
            |job| {
                let events = self.job_events(job_id);
                let last: Vec<String> = events[events.len().saturating_sub(5)..]
                    .iter()
                    .map(Value::to_string)
                    .collect();
                format!("; its record: {job}\nits last events:\n{}", last.join("\n"))
            },
        )
    }

    /// The job record as stored by the controller.
    pub fn job(&self, job_id: &str) -> Value {
        let path = self.dir.join("state/jobs").join(job_id).join("job.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
            .unwrap_or(Value::Null)
    }

    /// Rewrites one key of an agent config (a simple `key = value` line replace).
    pub fn edit_agent(&self, id: &str, new_name: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let text = std::fs::read_to_string(self.agent_config(id)).unwrap();
        let path = self.dir.join(format!("{new_name}.toml"));
        std::fs::write(&path, edit(text)).unwrap();
        path
    }
}

fn unique() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A name for something a test creates outside its temporary directory (an image, a
/// namespace, a daemon's state): `<prefix>-<pid>-<nanoseconds><n>`, apart from every other
/// test of this run and, by the clock, from what an earlier run with the same pid left.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos:x}{}", std::process::id(), unique())
}

/// A TCP relay on loopback whose connections can all be cut at once.
pub struct Relay {
    pub addr: SocketAddr,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    /// Relays connections on a new port to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let g = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let my_gen = g.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        use std::io::{Read, Write};
                        from.set_read_timeout(Some(Duration::from_millis(100))).ok();
                        loop {
                            if g.load(Ordering::SeqCst) != my_gen {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut =>
                                {
                                    continue;
                                }
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, generation }
    }

    /// Cuts every connection relayed so far (new ones still pass).
    pub fn cut_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}
