//! The security suite across real processes: a replayed Hello, a controller outside the
//! pinned CA, secrets in logs and job output, the admin socket against another user, egress
//! to loopback, private and link-local targets however they are spelled, one agent reaching
//! another through the tunnel, adversarial bytes at the agent's proxy, and hostile launch
//! specs that must not make the agent run anything.
#![allow(clippy::disallowed_methods)] // Tests start the product's binaries and setpriv.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use unidesk_agent::config::AgentConfig;
use unidesk_protocol::{AgentFrame, ControllerFrame, Wire};

use crate::support::{Proc, Setup, bin, wait_for};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens a TLS WebSocket to the controller the way the agent does (its CA, its URL), and
/// returns it with this connection's exporter keying material.
async fn open_as_agent(agent: &AgentConfig) -> (Ws, [u8; 32]) {
    let tls = unidesk_agent::conn::tls_config(agent).unwrap();
    let (host, port) = unidesk_agent::conn::url_host_port(&agent.controller.url).unwrap();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let material = unidesk_agent::conn::hello_keying_material(tls.get_ref().1).unwrap();
    let (ws, _) = tokio_tungstenite::client_async(agent.controller.url.as_str(), tls)
        .await
        .unwrap();
    (ws, material)
}

/// Sends `hello` as the first frame and returns `Ok(())` on a Welcome or `Err(reason)` when
/// the controller closes the connection.
async fn say_hello(ws: &mut Ws, hello: Vec<u8>) -> Result<(), String> {
    ws.send(Message::Binary(hello.into())).await.unwrap();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the controller answers the Hello within 10 s");
        match next {
            Some(Ok(Message::Binary(b))) => match ControllerFrame::decode(&b) {
                Ok(ControllerFrame::Welcome(_)) => return Ok(()),
                other => panic!("expected Welcome, got {other:?}"),
            },
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|f| f.reason.to_string()).unwrap_or_default());
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("connection error: {e}")),
            None => return Err("closed without a reason".into()),
        }
    }
}

#[test]
fn a_replayed_hello_is_refused() {
    let setup = Setup::new(&["replay"]);
    let controller = setup.controller();
    let agent = AgentConfig::load(&setup.agent_config("replay")).unwrap();
    let secret = agent.secret.clone().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Session 1: exactly the Hello the agent sends, captured as bytes. It is accepted.
        let (mut ws, material) = open_as_agent(&agent).await;
        let captured = AgentFrame::Hello(unidesk_agent::conn::hello(&agent, &secret, &material))
            .encode()
            .unwrap();
        say_hello(&mut ws, captured.clone())
            .await
            .expect("the first Hello is welcomed");
        let _ = ws.close(None).await;

        // Session 2: the same bytes, verbatim, on a fresh connection.
        let (mut ws, other_material) = open_as_agent(&agent).await;
        assert_ne!(
            material, other_material,
            "two TLS sessions share keying material"
        );
        let reason = say_hello(&mut ws, captured.clone())
            .await
            .expect_err("a replayed Hello must be refused");
        assert!(
            reason.contains("agent replay sent a Hello whose session proof does not match"),
            "close reason: {reason:?}"
        );

        // The right secret with no proof at all is refused the same way.
        let (mut ws, _) = open_as_agent(&agent).await;
        let mut unproven = unidesk_agent::conn::hello(&agent, &secret, &material);
        unproven.session_proof = [0; 32];
        let reason = say_hello(&mut ws, AgentFrame::Hello(unproven).encode().unwrap())
            .await
            .expect_err("a Hello without a proof must be refused");
        assert!(reason.contains("session proof"), "{reason:?}");

        // The agent itself is not locked out: a Hello made for its own connection passes.
        let (mut ws, material) = open_as_agent(&agent).await;
        let fresh = AgentFrame::Hello(unidesk_agent::conn::hello(&agent, &secret, &material));
        say_hello(&mut ws, fresh.encode().unwrap())
            .await
            .expect("a fresh Hello is welcomed");
        let _ = ws.close(None).await;
    });
    let log = controller.log_text();
    let refusals = log
        .lines()
        .filter(|l| l.contains("agent refused") && l.contains("replayed or forged Hello"))
        .count();
    assert_eq!(refusals, 2, "controller log:\n{log}");
}

#[test]
fn the_agent_refuses_a_controller_outside_its_pinned_ca() {
    let setup = Setup::new(&["pinned"]);
    let controller = setup.controller();
    // A second CA, as an impostor controller would have.
    let impostor = unidesk_controller::pki::generate(&["127.0.0.1".to_string()]).unwrap();
    let impostor_ca = setup.dir.join("impostor-ca.crt");
    std::fs::write(&impostor_ca, &impostor.ca_cert_pem).unwrap();
    let config = setup.edit_agent("pinned", "agent-pinned-impostor", |text| {
        text.replace(
            "ca = \"ca.crt\"",
            &format!("ca = \"{}\"", impostor_ca.display()),
        )
        .replace("initial_backoff_ms = 500", "initial_backoff_ms = 100")
    });
    let agent = setup.agent_with(&config);
    wait_for(
        "the agent to refuse the controller's certificate",
        Duration::from_secs(20),
        || {
            let log = agent.log_text();
            (log.contains("TLS with 127.0.0.1") && log.contains("invalid peer certificate"))
                .then_some(())
        },
    );
    let log = agent.log_text();
    assert!(!log.contains("connected to controller"), "{log}");
    wait_for(
        "the controller to log the failed handshake",
        Duration::from_secs(10),
        || {
            controller
                .log_text()
                .lines()
                .any(|l| l.contains("agent connection refused") && l.contains("TLS handshake"))
                .then_some(())
        },
    );
    assert_eq!(setup.cli_json(&["agents"]), serde_json::json!([]));
    // Its own CA again: it connects, so the refusal above was the pinning.
    drop(agent);
    let _agent = setup.agent("pinned");
    setup.wait_agents(&["pinned"]);
}

/// Starts a binary with debug logging for every crate, stderr to a file.
fn spawn_logged(dir: &Path, name: &str, binary: &str, args: &[&str]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin(binary))
        .args(args)
        .env("UNIDESK_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

#[test]
fn the_secret_never_appears_in_logs_or_job_status() {
    let setup = Setup::new(&["tell"]);
    let controller_config = setup.controller_config();
    let controller = spawn_logged(
        &setup.dir,
        "controller-debug",
        "unidesk-controller",
        &[
            "serve",
            "--config",
            &controller_config.display().to_string(),
        ],
    );
    wait_for("the controller to listen", Duration::from_secs(20), || {
        TcpStream::connect(setup.gateway).ok()
    });
    let agent_config = setup.agent_config("tell");
    let secret = AgentConfig::load(&agent_config)
        .unwrap()
        .secret
        .unwrap()
        .expose()
        .to_string();
    let wrong_secret = "0123456789abcdef-wrong-secret-fedcba9876543210";
    let wrong = setup.edit_agent("tell", "agent-tell-wrong", |text| {
        text.replace(&secret, wrong_secret)
            .replace("runs = \"agent-tell/runs\"", "runs = \"wrong/runs\"")
            .lines()
            .map(|l| {
                if l.starts_with("listen =") {
                    format!("listen = \"127.0.0.1:{}\"", crate::support::free_port())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let agent = spawn_logged(
        &setup.dir,
        "agent-debug",
        "unidesk-agent",
        &["run", "--config", &agent_config.display().to_string()],
    );
    let wrong_agent = spawn_logged(
        &setup.dir,
        "agent-wrong-debug",
        "unidesk-agent",
        &["run", "--config", &wrong.display().to_string()],
    );
    setup.wait_agents(&["tell"]);
    let probe = setup.cli_json(&[
        "probe",
        "--agent",
        "tell",
        "--echo-lines",
        "5",
        "--wait-ms",
        "20000",
    ]);
    assert_eq!(probe["ok"], true, "{probe}");
    let job_id = probe["job"]["jobId"].as_str().unwrap().to_string();
    wait_for(
        "the wrong secret to be refused",
        Duration::from_secs(20),
        || {
            wrong_agent
                .log_text()
                .contains("presented a wrong credential")
                .then_some(())
        },
    );
    let (code, status, status_err) = setup.cli(&["job", "status", &job_id]);
    assert_eq!(code, 0, "{status_err}");
    let (_, agents, _) = setup.cli(&["agents"]);
    let stored = |name: &str| {
        std::fs::read_to_string(setup.dir.join("state/jobs").join(&job_id).join(name))
            .unwrap_or_default()
    };
    let places = [
        ("controller log", controller.log_text()),
        ("agent log", agent.log_text()),
        ("refused agent log", wrong_agent.log_text()),
        ("job status", format!("{status}{status_err}")),
        ("agents", agents),
        ("job.json", stored("job.json")),
        ("events.jsonl", stored("events.jsonl")),
    ];
    // The logs are the real ones: the handshake, the probe and the refusal are in them.
    assert!(places[0].1.contains("agent connected"), "{}", places[0].1);
    assert!(places[0].1.contains("wrong credential"), "{}", places[0].1);
    assert!(
        places[1].1.contains("connected to controller"),
        "{}",
        places[1].1
    );
    assert!(status.contains(&job_id), "{status}");
    for (place, text) in &places {
        for (what, value) in [
            ("the secret", secret.as_str()),
            ("a wrong secret", wrong_secret),
        ] {
            assert!(
                !text.contains(value),
                "{what} appears in the {place}:\n{text}"
            );
        }
    }
}

#[test]
fn the_admin_socket_is_0600_and_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        is_root(),
        "this test runs the CLI as `nobody` with setpriv: run the tests as root (scripts/test does)"
    );
    let setup = Setup::new(&["admin"]);
    let _controller = setup.controller();
    let socket = setup.dir.join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    // Let `nobody` reach the config and the socket's directory, so that only the socket's
    // own mode stands between it and the controller.
    for dir in [setup._dir.path(), setup.dir.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        setup.controller_config(),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(bin("unidesk-controller"))
        .args(["agents", "--config"])
        .arg(setup.controller_config())
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "as nobody: {stderr}");
    assert!(
        stderr.contains(&format!("{}", socket.display())) && stderr.contains("Permission denied"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Its owner is served.
    assert_eq!(setup.cli_json(&["agents"]), serde_json::json!([]));
}

/// True when this process runs as root (effective uid 0).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Replaces the controller's egress allowlist.
fn set_egress(setup: &Setup, entries: &[&str]) {
    let path = setup.controller_config();
    let text = std::fs::read_to_string(&path).unwrap();
    let list = entries
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("allow = ") {
                format!("allow = [{list}]")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
}

fn agent_proxy(setup: &Setup, id: &str) -> SocketAddr {
    AgentConfig::load(&setup.agent_config(id))
        .unwrap()
        .proxy
        .listen
}

/// Sends raw bytes to a proxy and returns everything it answers until it closes.
fn raw(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The proxy may answer and close before all of a large request is written.
    let _ = s.write_all(bytes);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// CONNECTs through a proxy; on 200, checks an echo round trip and returns the status line.
fn connect_through(proxy: SocketAddr, target: &str) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        s.write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        s.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"ping", "{target}");
        return head;
    }
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    head + &rest
}

/// An echo server on `ip`; returns its address and a counter of accepted connections.
fn echo_on(ip: &str) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[test]
fn egress_to_loopback_private_and_link_local_spellings_is_refused_unless_a_cidr_lists_them() {
    let setup = Setup::new(&["spell"]);
    let (loop1, loop1_accepted) = echo_on("127.0.0.1");
    let (loop2, _) = echo_on("127.0.0.2");
    let (p, q) = (loop1.port(), loop2.port());
    // Every spelling has a host rule, so only the address decides; only 127.0.0.2 is listed
    // by a cidr entry.
    set_egress(
        &setup,
        &[
            "localhost:*",
            "127.0.0.1:*",
            "2130706433:*",
            "0x7f000001:*",
            "127.1:*",
            "017700000001:*",
            "[::1]:*",
            "[::ffff:127.0.0.1]:*",
            "[0:0:0:0:0:0:0:1]:*",
            "0:*",
            "169.254.169.254:*",
            "[fe80::1]:*",
            "10.0.0.1:*",
            "172.16.0.1:*",
            "192.168.1.1:*",
            "100.64.0.1:*",
            "[fd00::1]:*",
            "[64:ff9b::7f00:1]:*",
            "127.0.0.2:*",
            "2130706434:*",
            "[::ffff:127.0.0.2]:*",
            "cidr:127.0.0.2/32",
        ],
    );
    let _controller = setup.controller();
    let _agent = setup.agent("spell");
    setup.wait_agents(&["spell"]);
    let proxy = agent_proxy(&setup, "spell");
    let refused = [
        (format!("localhost:{p}"), "address 127.0.0.1 is loopback"),
        (format!("127.0.0.1:{p}"), "address 127.0.0.1 is loopback"),
        (format!("2130706433:{p}"), "address 127.0.0.1 is loopback"),
        (format!("0x7f000001:{p}"), "address 127.0.0.1 is loopback"),
        (format!("127.1:{p}"), "address 127.0.0.1 is loopback"),
        (format!("017700000001:{p}"), "address 127.0.0.1 is loopback"),
        (format!("[::1]:{p}"), "address ::1 is loopback"),
        (format!("[::ffff:127.0.0.1]:{p}"), "is loopback"),
        (format!("[0:0:0:0:0:0:0:1]:{p}"), "address ::1 is loopback"),
        (format!("[64:ff9b::7f00:1]:{p}"), "is loopback"),
        (format!("0:{p}"), "address 0.0.0.0 is unspecified"),
        ("169.254.169.254:80".into(), "is link-local"),
        ("[fe80::1]:80".into(), "is link-local"),
        ("10.0.0.1:80".into(), "is private"),
        ("172.16.0.1:80".into(), "is private"),
        ("192.168.1.1:80".into(), "is private"),
        ("100.64.0.1:80".into(), "is private"),
        ("[fd00::1]:80".into(), "is private"),
        // Listed by no host rule at all.
        (format!("127.0.0.3:{p}"), "no rule matched"),
    ];
    for (target, why) in &refused {
        let answer = connect_through(proxy, target);
        assert!(
            answer.starts_with("HTTP/1.1 403 Forbidden"),
            "{target}: {answer}"
        );
        assert!(answer.contains(why), "{target}: {answer:?} lacks {why:?}");
    }
    assert_eq!(
        loop1_accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused target was connected to"
    );
    // The cidr entry lets its own address through, in each spelling.
    for target in [
        format!("127.0.0.2:{q}"),
        format!("2130706434:{q}"),
        format!("[::ffff:127.0.0.2]:{q}"),
    ] {
        let answer = connect_through(proxy, &target);
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
    }
}

#[test]
fn one_agent_cannot_reach_another_agents_proxy_or_the_controller_through_the_tunnel() {
    let setup = Setup::new(&["alpha", "beta"]);
    // A production-like allowlist: loopback names are listed, no cidr exempts loopback.
    set_egress(
        &setup,
        &[
            "127.0.0.1:*",
            "localhost:*",
            "[::1]:*",
            "[::ffff:127.0.0.1]:*",
        ],
    );
    let _controller = setup.controller();
    let _alpha = setup.agent("alpha");
    let _beta = setup.agent("beta");
    setup.wait_agents(&["alpha", "beta"]);
    let alpha = agent_proxy(&setup, "alpha");
    let beta = agent_proxy(&setup, "beta");
    let port = beta.port();
    let gateway = setup.gateway.port();
    for target in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("127.0.0.1:{gateway}"),
    ] {
        let answer = connect_through(alpha, &target);
        assert!(
            answer.starts_with("HTTP/1.1 403 Forbidden") && answer.contains("is loopback"),
            "alpha -> {target}: {answer}"
        );
    }
    // Beta's proxy is alive and answers its own clients.
    let answer = connect_through(beta, "127.0.0.9:1");
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("no rule matched"),
        "{answer}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn adversarial_bytes_at_a_running_agents_proxy_are_refused_and_bounded() {
    let setup = Setup::new(&["front"]);
    let _controller = setup.controller();
    let mut agent = setup.agent("front");
    setup.wait_agents(&["front"]);
    let proxy = agent_proxy(&setup, "front");
    let rss_before = rss_kib(agent.child.id());
    let long_header = format!(
        "GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let many_headers = format!(
        "GET http://127.0.0.1/ HTTP/1.1\r\n{}\r\n",
        "X: y\r\n".repeat(200)
    );
    let endless = vec![b'A'; 8 << 20];
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "non-HTTP garbage",
            b"\x16\x03\x01\x00\xff\x01\x00\x00\xfb\r\n\r\n".to_vec(),
            "400",
            "malformed request head",
        ),
        (
            "request line without target",
            b"GET\r\n\r\n".to_vec(),
            "400",
            "malformed request head",
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            "400",
            "malformed request head",
        ),
        (
            "CONNECT to a non-port",
            b"CONNECT 127.0.0.1:http HTTP/1.1\r\n\r\n".to_vec(),
            "400",
            "port is not 1-65535",
        ),
        (
            "CONNECT to port 0",
            b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n".to_vec(),
            "400",
            "port is not 1-65535",
        ),
        (
            "CONNECT without a port",
            b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n".to_vec(),
            "400",
            "port missing",
        ),
        (
            "absolute-form with userinfo",
            b"GET http://user:secret@127.0.0.1:9/ HTTP/1.1\r\n\r\n".to_vec(),
            "400",
            "credentials in the request target",
        ),
        (
            "a 64 KiB header",
            long_header.into_bytes(),
            "431",
            "request head exceeds 16384 bytes",
        ),
        (
            "200 headers",
            many_headers.into_bytes(),
            "431",
            "more than 100 headers",
        ),
        (
            "8 MiB without a line end",
            endless,
            "431",
            "request head exceeds 16384 bytes",
        ),
    ];
    for (name, bytes, status, why) in cases {
        let answer = raw(proxy, &bytes);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")) && answer.contains(why),
            "{name}: {answer:?}"
        );
    }

    // A slowloris client: one byte a second never completes a head; the proxy answers 408
    // at its head deadline and closes, however the bytes keep coming.
    let deadline = unidesk_agent::egress::HEAD_DEADLINE;
    let mut slow = TcpStream::connect(proxy).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    for byte in b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Slow: ".iter().cycle() {
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        let mut chunk = [0u8; 1024];
        match slow.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                break;
            }
            Err(_) => {}
        }
        assert!(
            started.elapsed() < deadline + Duration::from_secs(10),
            "no answer to a trickled head after {:?}",
            started.elapsed()
        );
    }
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        elapsed >= deadline - Duration::from_secs(1)
            && elapsed < deadline + Duration::from_secs(10),
        "408 after {elapsed:?}, deadline {deadline:?}"
    );

    // The agent is still up, still serving, and did not keep what it was sent.
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent died");
    let (echo, _) = echo_on("127.0.0.1");
    let ok = connect_through(proxy, &echo.to_string());
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let rss_after = rss_kib(agent.child.id());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "agent RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    agent.kill();
}

/// Hostile values for free-text fields: each would create `marker` if any shell ran it.
fn hostile(marker: &Path, i: usize) -> String {
    let m = marker.display();
    match i % 6 {
        0 => format!("x; touch {m}"),
        1 => format!("$(touch {m})"),
        2 => format!("`touch {m}`"),
        3 => format!("../../../../{m} && touch {m}"),
        4 => format!("x\ntouch {m}"),
        _ => format!("x|touch {m}"),
    }
}

/// Launches `spec` through the admin socket (so it reaches the agent as a real Launch
/// frame) and waits for the job to end; returns the final job record.
fn launch_and_wait(setup: &Setup, rt: &tokio::runtime::Runtime, spec: Value) -> Value {
    let request = serde_json::json!({
        "op": "launch",
        "agent": "hostile",
        "spec": spec,
        "deadline_ms": 60_000u64,
    });
    let request: unidesk_controller::admin::AdminRequest = serde_json::from_value(request).unwrap();
    let data = rt
        .block_on(unidesk_controller::admin::request(
            &setup.dir.join("admin.sock"),
            &request,
        ))
        .unwrap()
        .unwrap();
    let job_id = data["jobId"]
        .as_str()
        .unwrap_or_else(|| panic!("no jobId in {data}"))
        .to_string();
    setup.wait_final(&job_id, Duration::from_secs(90))
}

/// Whether a hostile field's value must be named in the failure: fields the agent checks
/// before using them are named; the others are never reached because an earlier step
/// (the Compose container lookup, the k3s or CI preflight) fails first, which the test
/// records but cannot make name the field.
#[derive(Clone, Copy, PartialEq)]
enum Named {
    Yes,
    NotReached,
}

#[test]
fn no_launch_frame_makes_the_agent_run_a_command() {
    use crate::support::service::{SampleRepo, Served};
    let setup = Setup::new(&["hostile"]);
    let _controller = setup.controller();
    let agent = setup.agent("hostile");
    setup.wait_agents(&["hostile"]);
    // A real repository at a real commit, so a Deploy gets past the fetch and on to the
    // fields it uses next.
    let git_root = setup.dir.join("git-root");
    std::fs::create_dir_all(&git_root).unwrap();
    let repo = SampleRepo::create(&git_root, "sec").unwrap();
    let commit = repo
        .commit(
            "only",
            &[("Dockerfile", "FROM scratch\n"), ("README", "x\n")],
        )
        .unwrap()
        .to_string();
    let served = Served::start(&git_root);
    let repo_url = served.server.url("sec.git");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let marker = markers.path().join("ran");
    let sha = "a".repeat(40);
    let deploy = |executor: Value| {
        serde_json::json!({
            "service_id": "sec-web",
            "repo_url": repo_url,
            "requested_commit": commit,
            "dockerfile": "Dockerfile",
            "context": ".",
            "image": "unidesk-sec:latest",
            "build_base": {"arg": "BASE", "candidates": ["busybox:latest"]},
            "executor": executor,
            "health_url": "http://127.0.0.1:9/health",
            "force": false,
            "dry_run": false,
            "build_timeout_ms": 10_000u64,
        })
    };
    let compose = serde_json::json!({"Compose": {"project": "unidesk-sec", "service": "web"}});
    let k3s = serde_json::json!({"K3s": {
        "manifest": "k8s/web.yaml",
        "namespace": "unidesk-dev",
        "deployments": [{"name": "web", "container": "web"}],
        "health": {"service": "web", "port": 80, "path": "/health"},
        "frontend_route": {"service": "frontend", "port": 80},
        "legacy_container": "web-old",
        "rollout_timeout_ms": 10_000u64,
    }});
    let ci = serde_json::json!({
        "repo_url": repo_url,
        "manifest_commit": sha,
        "desired_ref": "master",
        "manifest_path": "deploy.json",
        "script_path": "scripts/ci/dev-e2e.sh",
        "environment": "dev",
        "timeout_ms": 10_000u64,
        "keep_namespace": false,
        "code_queue": {
            "service_id": "code-queue",
            "repo_url": repo_url,
            "commit": sha,
            "dockerfile": "Dockerfile",
            "context": ".",
            "image": "cq:ci",
            "build_base": {"arg": "BASE", "candidates": ["busybox:latest"]},
            "build_timeout_ms": 10_000u64,
        },
    });
    use Named::{NotReached, Yes};
    // Every free-text field of every spec, as a JSON pointer into that spec.
    let mut cases: Vec<(String, Value, &str, Named)> = Vec::new();
    for (field, named) in [
        ("/repo_url", Yes),
        ("/requested_commit", Yes),
        // Checked at the build step (unit test B18), after the container lookup.
        ("/dockerfile", NotReached),
        ("/context", NotReached),
        ("/executor/Compose/service", Yes),
        ("/executor/Compose/project", Yes),
        ("/service_id", NotReached),
        ("/image", NotReached),
        ("/build_base/arg", NotReached),
        ("/build_base/candidates/0", NotReached),
        ("/health_url", NotReached),
    ] {
        cases.push((
            format!("Deploy(Compose){field}"),
            deploy(compose.clone()),
            field,
            named,
        ));
    }
    for field in [
        "/executor/K3s/manifest",
        "/executor/K3s/namespace",
        "/executor/K3s/deployments/0/name",
        "/executor/K3s/deployments/0/container",
        "/executor/K3s/health/service",
        "/executor/K3s/health/path",
        "/executor/K3s/frontend_route/service",
        "/executor/K3s/legacy_container",
    ] {
        cases.push((
            format!("Deploy(K3s){field}"),
            deploy(k3s.clone()),
            field,
            NotReached,
        ));
    }
    for (field, named) in [
        ("/manifest_commit", Yes),
        ("/manifest_path", Yes),
        ("/script_path", Yes),
        ("/code_queue/commit", Yes),
        ("/repo_url", NotReached),
        ("/desired_ref", NotReached),
        ("/environment", NotReached),
        ("/code_queue/service_id", NotReached),
        ("/code_queue/repo_url", NotReached),
        ("/code_queue/dockerfile", NotReached),
        ("/code_queue/context", NotReached),
        ("/code_queue/image", NotReached),
        ("/code_queue/build_base/arg", NotReached),
        ("/code_queue/build_base/candidates/0", NotReached),
    ] {
        cases.push((format!("Ci{field}"), ci.clone(), field, named));
    }
    assert_eq!(cases.len(), 33);
    for (i, (name, mut body, field, named)) in cases.into_iter().enumerate() {
        // Path fields get the `../` form: that is what their check is for.
        let value = if field == "/dockerfile" || field == "/context" {
            hostile(&marker, 3)
        } else {
            hostile(&marker, i)
        };
        *body
            .pointer_mut(field)
            .unwrap_or_else(|| panic!("{name}: no field")) = Value::String(value.clone());
        let spec = if name.starts_with("Ci") {
            serde_json::json!({"Ci": body})
        } else {
            serde_json::json!({"Deploy": body})
        };
        let job = launch_and_wait(&setup, &rt, spec);
        let status = job["status"].as_str().unwrap_or_default();
        assert!(
            ["failed", "rejected"].contains(&status),
            "{name}: a hostile launch ended {status}: {job}"
        );
        let error = job["result"]["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "{name}: no reason recorded: {job}");
        if named == Yes {
            // Errors quote values with {:?}, so a newline shows as \n.
            let quoted = format!("{value:?}");
            let quoted = quoted.trim_matches('"');
            assert!(
                error.contains(&value) || error.contains(quoted),
                "{name}: the error does not name {value:?}: {error}"
            );
        }
        assert!(!marker.exists(), "{name}: {value:?} ran a command");
    }
    // The data-only specs carry no free text to abuse; a Probe runs as data.
    let probe = launch_and_wait(&setup, &rt, serde_json::json!({"Probe": {"echo_lines": 1}}));
    assert_eq!(probe["status"], "succeeded", "{probe}");
    assert!(!marker.exists());
    // No child of the agent is left running from any of it.
    let pid = agent.child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert!(children.trim().is_empty(), "agent children: {children}");
}
