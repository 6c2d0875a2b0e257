//! A sample service for deploy tests: a Git repository (built with git2) whose Dockerfile
//! makes a busybox image that serves `{"deploy":{"commit":…}}` on a loopback port, served by
//! the product's own smart-HTTP Git server, and a first running instance started by the real
//! `docker-compose`.
#![allow(clippy::disallowed_methods)] // Tests drive docker-compose and docker as an operator would.

use std::path::{Path, PathBuf};
use std::process::Command;

use unidesk_controller::gitserve::GitServer;

pub use unidesk_controller::demo::sample::{BASE_IMAGE, SampleRepo, dockerfile};

/// Fails the test, saying what to start, when Docker is not reachable.
pub fn require_docker() {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "Docker Engine is not reachable: run `bash scripts/testbed-up` (starts containerd and dockerd)"
    );
    let base = Command::new("docker")
        .args(["image", "inspect", BASE_IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        base,
        "image {BASE_IMAGE} is missing: run `bash scripts/testbed-up` (it builds it from busybox)"
    );
}

/// Starts the product's Git server over `root` in a runtime of its own.
pub struct Served {
    pub server: GitServer,
    _rt: tokio::runtime::Runtime,
}

impl Served {
    pub fn start(root: &Path) -> Served {
        Self::start_with(root, None)
    }

    /// Serves over HTTPS with a certificate for `localhost` signed by the returned CA.
    pub fn start_tls(root: &Path) -> (Served, String) {
        let pki = unidesk_controller::pki::generate(&["localhost".to_string()]).expect("pki");
        let tls = unidesk_controller::gitserve::GitTls {
            cert_pem: pki.server_cert_pem.clone(),
            key_pem: pki.server_key_pem.clone(),
        };
        (Self::start_with(root, Some(tls)), pki.ca_cert_pem)
    }

    fn start_with(root: &Path, tls: Option<unidesk_controller::gitserve::GitTls>) -> Served {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = rt
            .block_on(GitServer::start(root.to_path_buf(), tls))
            .expect("start git server");
        Served { server, _rt: rt }
    }
}

/// A Compose project with one service, started with the real `docker-compose`.
pub struct ComposeService {
    pub project: String,
    pub service: String,
    pub file: PathBuf,
}

impl ComposeService {
    /// Starts `service` of `project` from `image` (which brings its own CMD) on the host
    /// network.
    pub fn up(dir: &Path, project: &str, service: &str, image: &str) -> ComposeService {
        let file = dir.join(format!("{project}-compose.yml"));
        let yaml = format!(
            "version: \"3\"\nservices:\n  {service}:\n    image: {image}\n    network_mode: host\n"
        );
        std::fs::write(&file, yaml).expect("compose file");
        let out = Command::new("docker-compose")
            .args(["-p", project, "-f"])
            .arg(&file)
            .args(["up", "-d"])
            .output()
            .expect("run docker-compose (apt-get install docker-compose; scripts/testbed-up does)");
        assert!(
            out.status.success(),
            "docker-compose up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ComposeService {
            project: project.to_string(),
            service: service.to_string(),
            file,
        }
    }

    /// `docker` CLI output for the running container of this service.
    pub fn container_id(&self) -> String {
        let out = Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!("label=com.docker.compose.project={}", self.project))
            .args(["--filter"])
            .arg(format!("label=com.docker.compose.service={}", self.service))
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs a command in the service's container and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .arg("exec")
            .arg(self.container_id())
            .args(args)
            .output()
            .expect("docker exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A label of the image the service's container runs.
    pub fn image_label(&self, label: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.Image}}"])
            .arg(self.container_id())
            .output()
            .expect("docker inspect");
        let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let out = Command::new("docker")
            .args(["image", "inspect", "--format"])
            .arg(format!("{{{{index .Config.Labels \"{label}\"}}}}"))
            .arg(&image)
            .output()
            .expect("docker image inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for ComposeService {
    fn drop(&mut self) {
        let _ = Command::new("docker-compose")
            .args(["-p", &self.project, "-f"])
            .arg(&self.file)
            .args(["down", "--rmi", "local"])
            .output();
        // Containers recreated by the agent keep the compose labels; remove any left.
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=com.docker.compose.project={}", self.project))
            .output();
        if let Ok(out) = out {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

/// GET `http://127.0.0.1:<port>/health` with a plain socket; the body, if any.
pub fn health(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split("\r\n\r\n").nth(1).map(str::to_string)
}

/// Builds `tag` from a Dockerfile alone (no context) with the docker CLI, on the host network.
pub fn build_image(tag: &str, dockerfile: &str) {
    use std::io::Write;
    let mut child = Command::new("docker")
        .args(["build", "--network", "host", "-t", tag, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("docker build");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(dockerfile.as_bytes())
        .expect("write Dockerfile");
    let out = child.wait_with_output().expect("docker build");
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One Compose service (`unidesk-direct`) the deploy tests deploy: its config.json entry on
/// agent `node` and the deploy.json that asks for a commit of it.
pub struct ComposeSpec<'a> {
    pub id: &'a str,
    pub repo_url: &'a str,
    pub node: &'a str,
    pub image: &'a str,
    pub project: &'a str,
    /// The port its `/health` answers on.
    pub port: u16,
    pub build_timeout_ms: u64,
}

impl ComposeSpec<'_> {
    /// Writes a config.json holding this service (Compose service `web`) and its node,
    /// egress through the tunnel.
    pub fn write_catalog(&self, path: &Path) {
        let config = serde_json::json!({
            "microservices": [{
                "id": self.id,
                "repository": { "url": self.repo_url },
                "deployment": {
                    "mode": "unidesk-direct",
                    "node": self.node,
                    "dockerfile": "Dockerfile",
                    "context": ".",
                    "image": self.image,
                    "buildTimeoutMs": self.build_timeout_ms,
                    "healthUrl": format!("http://127.0.0.1:{}/health", self.port),
                    "compose": { "project": self.project, "service": "web" }
                }
            }],
            "nodes": { self.node: { "agent": self.node, "egress": "tunnel" } }
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    }

    /// Writes a schema-1 deploy.json asking for `commit` of this service.
    pub fn write_manifest(&self, path: &Path, commit: &str) {
        write_manifest(path, self.id, self.repo_url, commit);
    }
}

/// Writes a schema-1 deploy.json asking for `commit` of service `id` from `repo_url`.
pub fn write_manifest(path: &Path, id: &str, repo_url: &str, commit: &str) {
    let doc = serde_json::json!({
        "schemaVersion": 1,
        "services": [{ "id": id, "repo": repo_url, "commitId": commit }]
    });
    std::fs::write(path, serde_json::to_vec(&doc).unwrap()).unwrap();
}

/// The version a deploy replaces: `image` built to report commit `none` on `port`, started
/// by docker-compose as service `web` of `project`, serving within `limit`.
pub fn serve_previous_version(
    dir: &Path,
    project: &str,
    image: &str,
    port: u16,
    limit: std::time::Duration,
) -> ComposeService {
    build_image(image, &dockerfile(port, "none", ""));
    let compose = ComposeService::up(dir, project, "web", image);
    crate::support::wait_for("the previous version to serve", limit, || {
        health(port).filter(|b| b.contains("none"))
    });
    compose
}
