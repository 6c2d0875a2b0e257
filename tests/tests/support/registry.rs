//! A Docker registry (Debian's `docker-registry`) on loopback, for registry-pull tests: its
//! own config and storage in a temporary directory, a free port on 127.0.0.1, plain HTTP,
//! killed on drop. Docker pushes to it without extra configuration because the daemon treats
//! registries on 127.0.0.0/8 as insecure.
#![allow(clippy::disallowed_methods)] // The registry is a real process, started as an operator would.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Proc, free_port, wait_for};

/// Where Debian installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry.
pub struct Registry {
    /// `127.0.0.1:<port>`, the registry part of image references.
    pub addr: String,
    pub port: u16,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits until `GET /v2/` answers.
    pub fn start() -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: `apt-get install docker-registry` \
             (`bash scripts/testbed-up` installs it)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .expect("registry config");
        let log = dir.path().join("registry.log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start docker-registry");
        let proc = Proc { child, log };
        let registry = Registry {
            addr,
            port,
            proc,
            _dir: dir,
        };
        wait_for(
            "the registry to answer GET /v2/",
            Duration::from_secs(30),
            || registry.v2_ok().then_some(()),
        );
        registry
    }

    /// Whether `GET /v2/` answers 200.
    fn v2_ok(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
    }

    /// The registry's log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Tags the local Docker image `image` as `<addr>/<repo_tag>` and pushes it; returns the
    /// pushed reference.
    pub fn push(&self, image: &str, repo_tag: &str) -> String {
        let target = format!("{}/{repo_tag}", self.addr);
        let docker = |args: &[&str]| {
            let out = Command::new("docker")
                .args(args)
                .output()
                .expect("run docker");
            assert!(
                out.status.success(),
                "docker {args:?} failed: {}\nregistry log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        };
        docker(&["tag", image, &target]);
        docker(&["push", &target]);
        target
    }
}
