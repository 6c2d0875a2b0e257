//! A container booted with systemd, for what needs a real `systemctl`: the test machine's PID 1
//! is not systemd. `systemd-nspawn` boots the machine's own Debian from an overlay of `/` (its
//! writes land in a temporary upper directory, so `dpkg -i` inside changes nothing outside),
//! in the machine's network namespace (loopback servers of the test are reachable), with the
//! given directories and Docker's socket bound in at the same paths. Services of the machine
//! that the tests run themselves (Docker, containerd, PostgreSQL, the registry) are masked
//! inside.
#![allow(clippy::disallowed_methods)] // mount, nspawn and nsenter run as processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Units of the machine not to start inside: the tests' own daemons run outside.
const MASKED: &[&str] = &[
    "docker.service",
    "docker.socket",
    "containerd.service",
    "postgresql.service",
    "docker-registry.service",
    "console-getty.service",
];

/// A running container; dropping it kills it and unmounts its root.
pub struct Booted {
    dir: tempfile::TempDir,
    root: PathBuf,
    nspawn: Child,
    leader: u32,
}

/// Serializes the tests that install the packages: the packaging test installs them on this
/// machine, and the overlay a container boots from shows this machine's `/` underneath.
pub static PACKAGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Booted {
    /// Boots a container that sees `binds` (absolute directories) at their own paths.
    pub fn boot(binds: &[&Path]) -> Booted {
        let nspawn_present = Command::new("systemd-nspawn")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            nspawn_present,
            "systemd-nspawn is missing: install Debian's systemd-container package \
             (bash scripts/testbed-up does)"
        );
        crate::support::service::require_docker();
        let dir = tempfile::Builder::new()
            .prefix("unidesk-booted-")
            .tempdir()
            .unwrap();
        let (upper, work, root) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("root"),
        );
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).unwrap();
        }
        run(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir=/,upperdir={},workdir={}",
                    upper.display(),
                    work.display()
                ))
                .arg(&root),
            "mounting the container's overlay of /",
        );
        let machine = format!("unidesk-test-{}", std::process::id());
        let mut nspawn = Command::new("systemd-nspawn");
        nspawn
            .arg("--quiet")
            .arg(format!("--directory={}", root.display()))
            .args([
                "--register=no",
                "--keep-unit",
                "--link-journal=no",
                "--console=passive",
                "--boot",
            ])
            .arg(format!("--machine={machine}"))
            .arg("--bind=/run/docker.sock");
        for bind in binds {
            nspawn.arg(format!("--bind={}", bind.display()));
        }
        nspawn.arg("--");
        for unit in MASKED {
            nspawn.arg(format!("systemd.mask={unit}"));
        }
        let log = std::fs::File::create(dir.path().join("nspawn.log")).unwrap();
        let child = nspawn
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn");
        let mut booted = Booted {
            dir,
            root,
            leader: 0,
            nspawn: child,
        };
        booted.leader = booted.wait_for_leader();
        booted.wait_until_running();
        booted
    }

    /// This machine's path of `path` inside the container.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// `program` run inside the container as root, with a clean environment and working
    /// directory `wd` (a bound directory or one of the container's own).
    pub fn command(&self, wd: &Path, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("--target")
            .arg(self.leader.to_string())
            .args(["--all", "--"])
            .args(["env", "-i", "-C"])
            .arg(wd)
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "LANG=C.UTF-8",
            ])
            .arg(program);
        c
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nspawn.log")).unwrap_or_default()
    }

    /// The container's systemd: nspawn's child.
    fn wait_for_leader(&mut self) -> u32 {
        let pid = self.nspawn.id();
        let started = Instant::now();
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(child) = children.split_whitespace().next()
                && let Ok(child) = child.parse::<u32>()
                && std::fs::read_to_string(format!("/proc/{child}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            {
                return child;
            }
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) before booting:\n{}",
                    self.nspawn_log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the container's systemd did not start in 30 s:\n{}",
                self.nspawn_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the container's boot finished (`running`, or `degraded` with the failed
    /// units printed); any other state fails the test.
    fn wait_until_running(&self) {
        // systemctl fails to connect until the container's manager has made its socket.
        let started = Instant::now();
        let out = loop {
            let out = self
                .command(Path::new("/"), "timeout")
                .args(["60", "systemctl", "is-system-running", "--wait"])
                .output()
                .expect("nsenter");
            let connected = !String::from_utf8_lossy(&out.stderr).contains("Failed to connect");
            if connected || started.elapsed() > Duration::from_secs(30) {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let failed = || {
            self.command(Path::new("/"), "systemctl")
                .args(["--failed", "--no-pager"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        // `degraded`: booted, with some unit of the machine's own that cannot run in a
        // container; the tests judge their own units by name.
        if state == "degraded" {
            eprintln!("the container booted degraded:\n{}", failed());
            return;
        }
        if state != "running" {
            let failed = failed();
            panic!(
                "the container booted to {state:?}, not running ({}; {}):\n{failed}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.nspawn_log()
            );
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // Killing the container's init ends every process in its PID namespace; nspawn
        // then exits by itself.
        if self.leader != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.root).status();
    }
}
