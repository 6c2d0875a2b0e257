//! The Prometheus endpoints of both binaries (issue 8, item 5): with `[metrics]` on, after a
//! real Compose deploy (Git through the tunnel, Docker, Compose), a prewarm into k3s's
//! containerd (a real import, the pause image pulled from a real registry) and an egress the
//! policy refuses, `GET /metrics` of each process shows every family with those live values.
//! Without the section neither process listens on anything beyond its usual socket.
#![allow(clippy::disallowed_methods)] // Tests drive docker and ctr as an operator would.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use unidesk_agent::metrics::sample as value;

use crate::support::registry::Registry;
use crate::support::service::{
    ComposeSpec, SampleRepo, Served, build_image, dockerfile, health, require_docker,
    serve_previous_version,
};
use crate::support::{Proc, Setup, free_port, path, wait_for};

const K3S_SOCK: &str = "/run/k3s/containerd/containerd.sock";

/// `GET /metrics` over a plain socket: asserts a 200 in the Prometheus text format and
/// returns the body.
fn scrape(addr: SocketAddr) -> String {
    let mut tcp = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("nothing answers on the metrics address {addr}: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).unwrap();
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer from {addr}: {reply}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// Asserts the exposition declares `family` with `kind`.
fn has_family(text: &str, family: &str, kind: &str) {
    assert!(
        text.contains(&format!("# TYPE {family} {kind}\n")),
        "family {family} ({kind}) missing:\n{text}"
    );
}

/// The TCP ports process `pid` listens on, from its socket fds and the kernel's socket tables.
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (hex addr:port), st field 3 (0A = LISTEN), inode 9.
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state == "0A" && inodes.contains(*inode) {
                let port = local.rsplit(':').next().unwrap_or_default();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Appends a `[metrics]` section listening on `port` to a TOML config.
fn with_metrics(text: &str, port: u16) -> String {
    format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// The agent's egress proxy port, as its configuration says.
fn proxy_port(config: &Path) -> u16 {
    unidesk_agent::config::AgentConfig::load(config)
        .unwrap()
        .proxy
        .listen
        .port()
}

/// Images imported into the test's own containerd namespace; removed on drop.
struct Imported {
    namespace: String,
    names: Vec<String>,
}

impl Drop for Imported {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = run(
                "ctr",
                &[
                    "--address",
                    K3S_SOCK,
                    "-n",
                    &self.namespace,
                    "images",
                    "rm",
                    name,
                ],
            );
        }
    }
}

#[test]
fn metrics_endpoints_show_live_values_after_a_deploy() {
    require_docker();
    let uid = format!("metrics-{}", std::process::id());

    // A pause image in a real registry (the prewarm pulls it through the tunnel) and a
    // foundation image in Docker (the prewarm imports it from there).
    let registry = Registry::start();
    build_image(
        &format!("unidesk-test-pause:{uid}"),
        "FROM local/busybox:latest\nRUN cp /bin/busybox /pause\nENTRYPOINT [\"/pause\"]\n",
    );
    let pause = registry.push(
        &format!("unidesk-test-pause:{uid}"),
        &format!("{uid}/pause:3.6"),
    );
    let foundation = format!("unidesk-test-foundation:{uid}");
    let (ok, out) = run("docker", &["tag", "local/busybox:latest", &foundation]);
    assert!(ok, "{out}");
    let _imported = Imported {
        namespace: uid.clone(),
        names: vec![pause.clone(), format!("docker.io/library/{foundation}")],
    };

    let setup = Setup::new(&["node"]);
    let controller_port = free_port();
    let agent_port = free_port();
    let controller_config = std::fs::read_to_string(setup.controller_config()).unwrap();
    std::fs::write(
        setup.controller_config(),
        with_metrics(&controller_config, controller_port),
    )
    .unwrap();
    let agent_config = setup.edit_agent("node", "node-metrics", |text| {
        assert!(text.contains("containerd_namespace = \"k8s.io\""), "{text}");
        let text = text
            .replace(
                "containerd_namespace = \"k8s.io\"",
                &format!("containerd_namespace = \"{uid}\""),
            )
            .replace("rancher/mirrored-pause:3.6", &pause)
            .replace(
                "prewarm_images = []",
                &format!("prewarm_images = [\"{foundation}\"]"),
            );
        with_metrics(&text, agent_port)
    });
    let controller = setup.controller();
    let agent = setup.agent_with(&agent_config);
    setup.wait_agents(&["node"]);

    // Each process listens on its usual port and the metrics port, nothing else.
    let gateway = setup.gateway.port();
    let proxy = proxy_port(&agent_config);
    assert_eq!(
        listening_ports(controller.child.id()),
        BTreeSet::from([gateway, controller_port])
    );
    assert_eq!(
        listening_ports(agent.child.id()),
        BTreeSet::from([proxy, agent_port])
    );

    // A real Compose deploy: Git through the tunnel, a Docker build, a recreate, a verify.
    let git_root = setup.dir.join("git");
    std::fs::create_dir_all(&git_root).unwrap();
    let repo = SampleRepo::create(&git_root, "metered").unwrap();
    let served = Served::start(&git_root);
    let port = free_port();
    let project = format!("unidesk-test-{uid}");
    let image = format!("{project}-web:latest");
    let _compose =
        serve_previous_version(&setup.dir, &project, &image, port, Duration::from_secs(20));
    let commit = repo
        .commit(
            "version A",
            &[(
                "Dockerfile",
                &dockerfile(port, "$UNIDESK_DEPLOY_COMMIT", ""),
            )],
        )
        .unwrap()
        .to_string();
    let spec = ComposeSpec {
        id: "metered-svc",
        repo_url: &served.server.url("metered.git"),
        node: "node",
        image: &image,
        project: &project,
        port,
        build_timeout_ms: 300_000,
    };
    let catalog = setup.dir.join("config.json");
    spec.write_catalog(&catalog);
    let manifest = setup.dir.join("deploy.json");
    spec.write_manifest(&manifest, &commit);
    let (code, out, err) = setup.cli(&[
        "deploy",
        "apply",
        "--file",
        &path(&manifest),
        "--catalog",
        &path(&catalog),
        "--service",
        "metered-svc",
        "--wait-ms",
        "300000",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");
    let deployed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(deployed["jobs"][0]["job"]["status"], "succeeded", "{out}");
    assert!(health(port).unwrap().contains(&commit));

    // A prewarm: the pause image pulled through the tunnel, the foundation image imported.
    let (code, out, err) = setup.cli(&[
        "dev-env",
        "prewarm-images",
        "--agent",
        "node",
        "--wait-ms",
        "120000",
    ]);
    assert_eq!(code, 0, "{err}\n{out}");

    // An egress the policy refuses: no rule names this host.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(b"CONNECT refused.invalid:443 HTTP/1.1\r\nHost: refused.invalid:443\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 512];
    let n = tcp.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // The controller's families, with what just happened.
    let c = scrape(SocketAddr::from(([127, 0, 0, 1], controller_port)));
    for (family, kind) in [
        ("unidesk_controller_agents_connected", "gauge"),
        ("unidesk_controller_launches_total", "counter"),
        ("unidesk_controller_job_duration_seconds", "histogram"),
        ("unidesk_controller_egress_bytes_total", "counter"),
        ("unidesk_controller_egress_refusals_total", "counter"),
        ("unidesk_controller_build_info", "gauge"),
    ] {
        has_family(&c, family, kind);
    }
    assert_eq!(value(&c, "unidesk_controller_agents_connected"), Some(1.0));
    assert_eq!(
        value(
            &c,
            r#"unidesk_controller_launches_total{kind="deploy",outcome="succeeded"}"#
        ),
        Some(1.0),
        "{c}"
    );
    assert_eq!(
        value(
            &c,
            r#"unidesk_controller_launches_total{kind="prewarm",outcome="succeeded"}"#
        ),
        Some(1.0),
        "{c}"
    );
    assert_eq!(
        value(
            &c,
            r#"unidesk_controller_job_duration_seconds_count{kind="deploy"}"#
        ),
        Some(1.0),
        "{c}"
    );
    let deploy_seconds = value(
        &c,
        r#"unidesk_controller_job_duration_seconds_sum{kind="deploy"}"#,
    )
    .unwrap();
    assert!(deploy_seconds > 0.0, "{c}");
    for direction in ["out", "in"] {
        let bytes = value(
            &c,
            &format!(r#"unidesk_controller_egress_bytes_total{{direction="{direction}"}}"#),
        )
        .unwrap_or(0.0);
        // At least a Git negotiation, a pack and a registry pull crossed the tunnel.
        assert!(bytes > 1000.0, "egress {direction}: {bytes}\n{c}");
    }
    assert_eq!(
        value(
            &c,
            r#"unidesk_controller_egress_refusals_total{reason="no-rule"}"#
        ),
        Some(1.0),
        "{c}"
    );
    assert_eq!(
        value(
            &c,
            &format!(
                r#"unidesk_controller_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{c}"
    );

    // The agent's families.
    let agent_addr = SocketAddr::from(([127, 0, 0, 1], agent_port));
    let a = scrape(agent_addr);
    for (family, kind) in [
        ("unidesk_agent_steps_total", "counter"),
        ("unidesk_agent_step_duration_seconds", "histogram"),
        ("unidesk_agent_import_bytes_total", "counter"),
        ("unidesk_agent_event_backlog", "gauge"),
        ("unidesk_agent_build_info", "gauge"),
    ] {
        has_family(&a, family, kind);
    }
    for step in ["materialize", "build", "recreate", "verify", "import"] {
        assert_eq!(
            value(
                &a,
                &format!(r#"unidesk_agent_steps_total{{step="{step}",outcome="ok"}}"#)
            ),
            Some(1.0),
            "step {step}:\n{a}"
        );
    }
    assert!(!a.contains(r#"outcome="failed""#), "no step failed:\n{a}");
    assert_eq!(
        value(
            &a,
            r#"unidesk_agent_step_duration_seconds_count{step="build"}"#
        ),
        Some(1.0),
        "{a}"
    );
    let imported = value(&a, "unidesk_agent_import_bytes_total").unwrap();
    // busybox alone is about a megabyte; both images went into containerd.
    assert!(imported > 500_000.0, "import bytes {imported}\n{a}");
    assert_eq!(
        value(
            &a,
            &format!(
                r#"unidesk_agent_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{a}"
    );
    // Every event of both launches is acknowledged once the jobs are final (the last ack may
    // trail the job record by a moment).
    wait_for(
        "the agent's event backlog to drain",
        Duration::from_secs(10),
        || (value(&scrape(agent_addr), "unidesk_agent_event_backlog") == Some(0.0)).then_some(()),
    );
    drop(agent);
    drop(controller);
    let _ = run("docker", &["rmi", &foundation]);
    let _ = run("docker", &["rmi", &format!("unidesk-test-pause:{uid}")]);
    let _ = run("docker", &["rmi", &pause]);
}

#[test]
fn without_a_metrics_section_nothing_more_listens() {
    let setup = Setup::new(&["node"]);
    let controller_text = std::fs::read_to_string(setup.controller_config()).unwrap();
    let agent_text = std::fs::read_to_string(setup.agent_config("node")).unwrap();
    assert!(!controller_text.contains("[metrics]") && !agent_text.contains("[metrics]"));
    let controller: Proc = setup.controller();
    let agent = setup.agent("node");
    setup.wait_agents(&["node"]);
    assert_eq!(
        listening_ports(controller.child.id()),
        BTreeSet::from([setup.gateway.port()]),
        "the controller listens only on its gateway"
    );
    assert_eq!(
        listening_ports(agent.child.id()),
        BTreeSet::from([proxy_port(&setup.agent_config("node"))]),
        "the agent listens only on its egress proxy"
    );
}
