//! Private daemons and filesystems a fault test may break without touching anyone else's: a
//! dockerd and a containerd with their own sockets, roots and state in a temporary directory,
//! killed (SIGKILL, as a crash would) and restarted on demand, and a small tmpfs mounted for a
//! disk-full case. The shared dockerd and containerd are never stopped: their sockets are not
//! used here except as the containerd a private dockerd runs its containers in (under its own
//! namespaces).
#![allow(clippy::disallowed_methods)] // The daemons are real processes, started as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Proc, wait_for};

/// The shared containerd a private dockerd runs its containers in (each under its own
/// namespace, so nothing collides with the shared dockerd's `moby` namespace).
const SHARED_CONTAINERD: &str = "/run/containerd/containerd.sock";

/// Runs a program and returns (success, stdout, stderr).
pub fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lazily unmounts every mount point under `dir`, deepest first (what a killed daemon left).
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).output();
    }
}

/// Kills and removes whatever a private dockerd left in its namespace of the shared
/// containerd (when it could not be restarted to do so itself), then the namespace.
fn clear_namespace(ns: &str) {
    let ctr = |args: &[&str]| {
        let mut all = vec!["--address", SHARED_CONTAINERD, "-n", ns];
        all.extend_from_slice(args);
        run("ctr", &all)
    };
    let (_, tasks, _) = ctr(&["tasks", "ls", "-q"]);
    for id in tasks.split_whitespace() {
        let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        let _ = ctr(&["tasks", "rm", "-f", id]);
    }
    let (_, containers, _) = ctr(&["containers", "ls", "-q"]);
    for id in containers.split_whitespace() {
        let _ = ctr(&["containers", "rm", id]);
    }
    let _ = run(
        "ctr",
        &["--address", SHARED_CONTAINERD, "namespaces", "rm", ns],
    );
}

/// A dockerd of this test only: `--host unix://<dir>/docker.sock`, its own data root, exec
/// root and pidfile, no bridge and no iptables, `--live-restore` so its containers (the "old
/// service") outlive a crash of the daemon, as they do on a node with that setting.
pub struct PrivateDockerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    namespace: String,
    proc: Option<Proc>,
}

impl PrivateDockerd {
    /// Starts it and waits until it answers; fails naming what to start when the shared
    /// containerd it runs containers in is missing.
    pub fn start() -> PrivateDockerd {
        assert!(
            Path::new(SHARED_CONTAINERD).exists(),
            "containerd is not running at {SHARED_CONTAINERD}: run `bash scripts/testbed-up`"
        );
        let dir = tempfile::Builder::new()
            .prefix("ud-dockerd")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let socket = dir.path().join("docker.sock");
        let namespace = super::unique_name("faults-dockerd");
        let mut me = PrivateDockerd {
            dir,
            socket,
            namespace,
            proc: None,
        };
        me.restart();
        me
    }

    /// `unix://…`, for `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// (Re)starts the daemon on the same directories and waits until it answers.
    pub fn restart(&mut self) {
        let d = self.dir.path();
        let log = d.join(format!("dockerd-{}.log", super::unique()));
        let host = self.host();
        let args: Vec<String> = vec![
            format!("--host={host}"),
            format!("--data-root={}", d.join("data").display()),
            format!("--exec-root={}", d.join("exec").display()),
            format!("--pidfile={}", d.join("docker.pid").display()),
            format!("--containerd={SHARED_CONTAINERD}"),
            format!("--containerd-namespace={}", self.namespace),
            format!("--containerd-plugins-namespace={}-plugins", self.namespace),
            "--bridge=none".into(),
            "--iptables=false".into(),
            "--ip-forward=false".into(),
            "--ip-masq=false".into(),
            "--live-restore".into(),
        ];
        let child = Command::new("dockerd")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start dockerd (apt-get install docker.io; scripts/testbed-up does)");
        let proc = Proc { child, log };
        wait_for(
            "the private dockerd to answer",
            Duration::from_secs(40),
            || self.docker(&["version"]).0.then_some(()),
        );
        self.proc = Some(proc);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Runs `docker -H <private> ARGS`; (success, stdout, stderr).
    pub fn docker(&self, args: &[&str]) -> (bool, String, String) {
        let host = self.host();
        let mut all = vec!["-H", host.as_str()];
        all.extend_from_slice(args);
        run("docker", &all)
    }

    /// Copies an image of the shared Docker into this one (`docker save | docker load`).
    pub fn load_from_shared(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker save");
        let out = Command::new("docker")
            .args(["-H", &self.host(), "load"])
            .stdin(save.stdout.take().expect("docker save's stdout"))
            .output()
            .expect("docker load");
        let saved = save.wait().expect("docker save");
        assert!(saved.success(), "docker save {image} failed");
        assert!(
            out.status.success(),
            "loading {image} into the private dockerd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // Containers must not outlive the test: with a live daemon remove them, then stop the
        // daemon gracefully so it unmounts its layers before the directory goes.
        if self.proc.is_none() && !std::thread::panicking() {
            self.restart_quietly();
        }
        let (_, ids, _) = self.docker(&["ps", "-aq"]);
        for id in ids.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        if let Some(p) = self.proc.take() {
            let pid = p.child.id();
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .output();
            let mut p = p;
            let until = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < until {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            p.kill();
        }
        // dockerd leaves its data root and network namespace mounted; let go of them so the
        // directory can be removed, and drop the containerd namespaces it made.
        unmount_under(self.dir.path());
        for ns in [
            self.namespace.clone(),
            format!("{}-plugins", self.namespace),
        ] {
            clear_namespace(&ns);
        }
    }
}

impl PrivateDockerd {
    fn restart_quietly(&mut self) {
        let restart = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.restart()));
        if restart.is_err() {
            self.proc = None;
        }
    }
}

/// A containerd of this test only, standing in for k3s's: its own socket, root, state and
/// config (no CRI plugin, no debug or metrics listener).
pub struct PrivateContainerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
}

impl PrivateContainerd {
    /// Starts it and waits until `ctr version` answers.
    pub fn start() -> PrivateContainerd {
        let dir = tempfile::Builder::new()
            .prefix("ud-ctrd")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n\
                 [metrics]\n  address = \"\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = socket.display(),
            ),
        )
        .expect("containerd config");
        let mut me = PrivateContainerd {
            dir,
            socket,
            config,
            proc: None,
        };
        me.restart();
        me
    }

    /// (Re)starts it on the same root and state and waits until it answers.
    pub fn restart(&mut self) {
        let log = self
            .dir
            .path()
            .join(format!("containerd-{}.log", super::unique()));
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start containerd (apt-get install containerd; scripts/testbed-up does)");
        let proc = Proc { child, log };
        wait_for(
            "the private containerd to answer",
            Duration::from_secs(30),
            || self.ctr(&["version"]).0.then_some(()),
        );
        self.proc = Some(proc);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Runs `ctr --address <private> -n k8s.io ARGS`; (success, stdout, stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String, String) {
        let address = self.socket.display().to_string();
        let mut all = vec!["--address", address.as_str(), "-n", "k8s.io"];
        all.extend_from_slice(args);
        run("ctr", &all)
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        self.kill();
        // Unpacked snapshots may still be mounted under the root; let go of them.
        unmount_under(self.dir.path());
    }
}

/// A tmpfs of `size_mib` mounted over `dir` (created), unmounted on drop.
pub struct TmpfsMount {
    pub dir: PathBuf,
}

impl TmpfsMount {
    pub fn mount(dir: &Path, size_mib: u32) -> TmpfsMount {
        std::fs::create_dir_all(dir).expect("mount point");
        let (ok, _, err) = run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0755"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        );
        assert!(
            ok,
            "cannot mount a tmpfs at {} (the test runs as root): {err}",
            dir.display()
        );
        TmpfsMount {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes a file until the filesystem is full; its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("fill");
        let mut f = std::fs::File::create(&path).expect("fill file");
        let chunk = vec![0x66u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    assert_eq!(
                        e.raw_os_error(),
                        Some(libc::ENOSPC),
                        "filling {}: {e}",
                        path.display()
                    );
                    break;
                }
            }
        }
        // Small tail writes until not even one byte fits.
        while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
        path
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}
