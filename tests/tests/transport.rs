//! The transport and launch plane across real processes: registry, probes, credentials,
//! exactly-once events across cut links and controller crashes, launch idempotency, and
//! garbage from a peer.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Relay, Setup, wait_for};

fn probe(setup: &Setup, agent: &str, lines: u32, wait_ms: Option<u64>) -> Value {
    let lines = lines.to_string();
    let mut args = vec!["probe", "--agent", agent, "--echo-lines", lines.as_str()];
    let wait;
    if let Some(ms) = wait_ms {
        wait = ms.to_string();
        args.extend(["--wait-ms", wait.as_str()]);
    }
    setup.cli_json(&args)
}

/// Asserts that a job's stored events are numbered 1..=n without gaps or repeats and that
/// the echo lines appear exactly once each, in order.
fn assert_exactly_once(setup: &Setup, job_id: &str, lines: u32) {
    let events = setup.job_events(job_id);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "event {i} of {job_id}: {e}"
        );
    }
    let echoed: Vec<String> = events
        .iter()
        .filter_map(|e| e["body"]["Log"]["line"].as_str())
        .filter(|l| l.starts_with("echo line "))
        .map(str::to_string)
        .collect();
    let expected: Vec<String> = (1..=lines)
        .map(|i| format!("echo line {i} of {lines}"))
        .collect();
    assert_eq!(
        echoed.len(),
        expected.len(),
        "echo lines stored for {job_id}"
    );
    assert!(
        echoed == expected,
        "echo lines of {job_id} out of order or duplicated"
    );
    let last = events.last().expect("events");
    assert!(
        last["body"]["Finished"].is_object(),
        "last event is Finished: {last}"
    );
}

#[test]
fn two_agents_register_and_answer_probes() {
    let setup = Setup::new(&["alpha", "beta"]);
    let _controller = setup.controller();
    let _a = setup.agent("alpha");
    let _b = setup.agent("beta");
    setup.wait_agents(&["alpha", "beta"]);
    let agents = setup.cli_json(&["agents"]);
    for a in agents.as_array().unwrap() {
        assert_eq!(a["version"], env!("CARGO_PKG_VERSION"));
        assert!(a["connectedSinceUnixMs"].as_u64().unwrap() > 0);
        assert!(
            a["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "Probe")
        );
    }
    for agent in ["alpha", "beta"] {
        let out = probe(&setup, agent, 3, Some(20_000));
        assert_eq!(out["ok"], true, "{out}");
        let job = &out["job"];
        assert_eq!(job["status"], "succeeded");
        let facts = &job["result"]["detail"]["probe"];
        assert_eq!(facts["agent_id"], agent);
        let reach = facts["reach"].as_array().unwrap();
        assert_eq!(reach.len(), 5, "{reach:?}");
        assert_exactly_once(&setup, job["jobId"].as_str().unwrap(), 3);
    }
}

#[test]
fn wrong_and_unknown_credentials_are_refused_with_growing_retry() {
    let setup = Setup::new(&["good"]);
    let controller = setup.controller();
    let wrong = setup.edit_agent("good", "agent-wrong", |text| {
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("secret =") {
                out.push_str("secret = \"not-the-secret\"\n");
            } else if line.starts_with("refused_backoff_ms")
                || line.starts_with("initial_backoff_ms")
            {
                let key = line.split('=').next().unwrap().trim();
                out.push_str(&format!("{key} = 200\n"));
            } else if line.starts_with("[dirs]") {
                out.push_str(line);
                out.push('\n');
            } else if line.starts_with("runs =") {
                out.push_str("runs = \"wrong/runs\"\n");
            } else if line.starts_with("listen =") {
                out.push_str(&format!(
                    "listen = \"127.0.0.1:{}\"\n",
                    crate::support::free_port()
                ));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    });
    let unknown = setup.edit_agent("good", "agent-unknown", |text| {
        text.replace("id = \"good\"", "id = \"stranger\"")
            .replace("runs = \"agent-good/runs\"", "runs = \"stranger/runs\"")
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
    let wrong_agent = setup.agent_with(&wrong);
    let unknown_agent = setup.agent_with(&unknown);
    let retries = wait_for("three refused retries", Duration::from_secs(30), || {
        let log = wrong_agent.log_text();
        let delays: Vec<u64> = log
            .lines()
            .filter_map(|l| l.split("retry_in_ms=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .collect();
        (delays.len() >= 3).then_some(delays)
    });
    // Jitter draws from the upper half of each doubling step, so the third delay always
    // exceeds the first.
    assert!(
        retries[2] > retries[0],
        "retry interval did not grow: {retries:?}"
    );
    let agent_log = wrong_agent.log_text();
    assert!(
        agent_log.contains("controller refused this agent")
            && agent_log.contains("agent good presented a wrong credential"),
        "{agent_log}"
    );
    wait_for(
        "the unknown agent's refusal",
        Duration::from_secs(20),
        || {
            unknown_agent
                .log_text()
                .contains("agent stranger is not known to this controller")
                .then_some(())
        },
    );
    let ctl = controller.log_text();
    assert!(
        ctl.contains("agent refused") && ctl.contains("wrong credential"),
        "{ctl}"
    );
    assert!(ctl.contains("agent stranger is not known"), "{ctl}");
    let agents = setup.cli_json(&["agents"]);
    assert_eq!(agents, serde_json::json!([]));
}

fn agent_via_relay(setup: &Setup, id: &str, relay: &Relay) -> std::path::PathBuf {
    let port = setup.gateway.port();
    let relay_port = relay.addr.port();
    setup.edit_agent(id, &format!("agent-{id}-relayed"), |text| {
        text.replace(
            &format!("127.0.0.1:{port}/agent"),
            &format!("127.0.0.1:{relay_port}/agent"),
        )
        .replace("initial_backoff_ms = 500", "initial_backoff_ms = 100")
    })
}

fn stored_count(setup: &Setup, job_id: &str) -> usize {
    setup.job_events(job_id).len()
}

#[test]
fn a_hundred_thousand_lines_survive_a_cut_connection() {
    let setup = Setup::new(&["cut"]);
    let _controller = setup.controller();
    let relay = Relay::start(setup.gateway);
    let _agent = setup.agent_with(&agent_via_relay(&setup, "cut", &relay));
    setup.wait_agents(&["cut"]);
    // Several seconds of stream at ~20k stored lines/s, so the cut lands mid-stream.
    let lines = 100_000;
    let job = probe(&setup, "cut", lines, None);
    let job_id = job["jobId"].as_str().unwrap().to_string();
    wait_for("some events stored", Duration::from_secs(30), || {
        (stored_count(&setup, &job_id) > 200).then_some(())
    });
    relay.cut_all();
    let cut_at = stored_count(&setup, &job_id);
    let done = wait_for(
        "the job to finish after the cut",
        Duration::from_secs(60),
        || {
            let job = setup.job(&job_id);
            (job["status"] == "succeeded").then_some(job)
        },
    );
    assert!(done["result"].is_object());
    assert!(
        cut_at < lines as usize,
        "the cut happened mid-stream ({cut_at} stored)"
    );
    assert_exactly_once(&setup, &job_id, lines);
}

#[test]
fn a_hundred_thousand_lines_survive_a_controller_crash() {
    let setup = Setup::new(&["crash"]);
    let mut controller = setup.controller();
    let _agent = setup.agent_with(&setup.edit_agent("crash", "agent-crash-fast", |t| {
        t.replace("initial_backoff_ms = 500", "initial_backoff_ms = 100")
    }));
    setup.wait_agents(&["crash"]);
    // Several seconds of stream at ~20k stored lines/s, so the kill lands mid-stream.
    let lines = 100_000;
    let job = probe(&setup, "crash", lines, None);
    let job_id = job["jobId"].as_str().unwrap().to_string();
    wait_for("some events stored", Duration::from_secs(30), || {
        (stored_count(&setup, &job_id) > 200).then_some(())
    });
    controller.kill();
    let killed_at = stored_count(&setup, &job_id);
    let _controller = setup.controller();
    let done = wait_for(
        "the job to finish after the restart",
        Duration::from_secs(60),
        || {
            let job = setup.job(&job_id);
            (job["status"] == "succeeded").then_some(job)
        },
    );
    assert!(done["result"].is_object());
    assert!(
        killed_at < lines as usize,
        "the kill happened mid-stream ({killed_at} stored)"
    );
    assert_exactly_once(&setup, &job_id, lines);
    // The restarted controller still answers for the job.
    let status = setup.cli_json(&["job", "status", &job_id]);
    assert_eq!(status["job"]["status"], "succeeded");
}

#[test]
fn the_same_launch_delivered_twice_runs_once() {
    let setup = Setup::new(&["twice"]);
    let _controller = setup.controller();
    let relay = Relay::start(setup.gateway);
    let agent = setup.agent_with(&agent_via_relay(&setup, "twice", &relay));
    setup.wait_agents(&["twice"]);
    // Several seconds of stream, so the cut lands while the launch is still open.
    let lines = 150_000;
    let job = probe(&setup, "twice", lines, None);
    let job_id = job["jobId"].as_str().unwrap().to_string();
    wait_for("the launch to start", Duration::from_secs(30), || {
        (stored_count(&setup, &job_id) > 10).then_some(())
    });
    // On reconnect the controller delivers every open launch again.
    relay.cut_all();
    wait_for("the job to finish", Duration::from_secs(60), || {
        (setup.job(&job_id)["status"] == "succeeded").then_some(())
    });
    wait_for(
        "the second delivery to be answered",
        Duration::from_secs(10),
        || {
            agent
                .log_text()
                .contains("launch delivered again; not rerun")
                .then_some(())
        },
    );
    let starts = setup
        .job_events(&job_id)
        .iter()
        .filter(|e| e["body"]["StepStarted"].is_object())
        .count();
    assert_eq!(starts, 1, "the probe step ran more than once");
    assert_exactly_once(&setup, &job_id, lines);
}

fn agent_proxy(setup: &Setup, id: &str) -> std::net::SocketAddr {
    unidesk_agent::config::AgentConfig::load(&setup.agent_config(id))
        .unwrap()
        .proxy
        .listen
}

/// Sends `CONNECT target` to the agent's proxy and returns the whole answer.
fn raw_connect(proxy: std::net::SocketAddr, target: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
fn git_fetches_through_the_tunnel_over_http_and_https_and_only_to_allowed_targets() {
    use crate::support::service::{SampleRepo, Served};
    use unidesk_agent::launch::materialize::{FetchNet, MirrorCache};

    let setup = Setup::new(&["git"]);
    let controller = setup.controller();
    let _agent = setup.agent("git");
    setup.wait_agents(&["git"]);
    let root = setup.dir.join("git-root");
    std::fs::create_dir_all(&root).unwrap();
    let repo = SampleRepo::create(&root, "fetched").unwrap();
    let commit = repo
        .commit("only commit", &[("README", "hello\n")])
        .unwrap();
    let http = Served::start(&root);
    let (https, ca) = Served::start_tls(&root);
    let proxy = format!("http://{}", agent_proxy(&setup, "git"));
    let cancel = tokio_util::sync::CancellationToken::new();

    for (name, server, extra_ca) in [("http", &http, None), ("https", &https, Some(ca.clone()))] {
        let cache = MirrorCache::new(setup.dir.join(format!("mirrors-{name}")));
        let url = server.server.url("fetched.git");
        let net = FetchNet {
            proxy: Some(proxy.clone()),
            extra_ca_pem: extra_ca.map(String::into_bytes),
        };
        let mirror = cache
            .fetch(&url, &net, &cancel, |_| {})
            .unwrap_or_else(|e| panic!("{name} fetch through the tunnel: {e}"));
        assert_eq!(mirror.resolve(&commit.to_string()[..7]).unwrap(), commit);
        // The controller made the outbound connection: the tunnel carried it.
        let port = server.server.addr().port();
        let seen = (0..50).any(|_| {
            let found = controller
                .log_text()
                .lines()
                .any(|l| l.contains("egress connected") && l.contains(&format!(":{port}")));
            if !found {
                std::thread::sleep(Duration::from_millis(100));
            }
            found
        });
        assert!(
            seen,
            "{name}: no egress to :{port} in the controller log:\n{}",
            controller.log_text()
        );
    }

    let net = FetchNet {
        proxy: Some(proxy.clone()),
        extra_ca_pem: None,
    };

    // A target outside the allowlist: the fetch fails, and the proxy's answer names the
    // target and the rule that refused it.
    let cache = MirrorCache::new(setup.dir.join("mirrors-refused"));
    let refused = cache.fetch("http://127.0.0.2:9/x.git", &net, &cancel, |_| {});
    let Err(err) = refused else {
        panic!("a fetch outside the allowlist must fail")
    };
    let err = err.to_string();
    assert!(err.contains("127.0.0.2:9"), "{err}");
    let answer = raw_connect(agent_proxy(&setup, "git"), "127.0.0.2:9");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("egress to 127.0.0.2:9 refused") && answer.contains("no rule"),
        "{answer}"
    );
    // The deploy's source probe (the step before every fetch) reports the same refusal.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (log, _lines) =
        unidesk_agent::launch::steplog::StepLog::channel(unidesk_protocol::Step::Materialize, 64);
    let probe_err = rt
        .block_on(unidesk_agent::launch::build::probe_proxy(
            &proxy,
            "127.0.0.2:9",
            Duration::from_secs(10),
            &log,
            "target_source_proxy_probe",
        ))
        .expect_err("the probe of a refused target fails")
        .to_string();
    assert!(
        probe_err.contains("egress to 127.0.0.2:9 refused") && probe_err.contains("no rule"),
        "{probe_err}"
    );
    let answer = raw_connect(agent_proxy(&setup, "git"), "10.1.2.3:443");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let ctl = controller.log_text();
    assert!(
        ctl.contains("egress refused") && ctl.contains("127.0.0.2:9"),
        "{ctl}"
    );
}

#[test]
fn probes_complete_while_a_gigabyte_flows_through_the_tunnel() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const TOTAL: u64 = 1 << 30;
    let setup = Setup::new(&["bulk"]);
    let _controller = setup.controller();
    let _agent = setup.agent("bulk");
    setup.wait_agents(&["bulk"]);

    let source = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let source_addr = source.local_addr().unwrap();
    // The source holds back its last chunk until the probes are done, so the transfer is
    // still running while they run however slow the machine is.
    let (finish, hold) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Ok((mut peer, _)) = source.accept() {
            let chunk = vec![0x5au8; 256 * 1024];
            let mut sent = 0;
            while sent < TOTAL {
                if sent + chunk.len() as u64 == TOTAL && hold.recv().is_err() {
                    return;
                }
                if peer.write_all(&chunk).is_err() {
                    return;
                }
                sent += chunk.len() as u64;
            }
        }
    });
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let proxy = agent_proxy(&setup, "bulk");
    let reader = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        write!(
            s,
            "CONNECT {source_addr} HTTP/1.1\r\nHost: {source_addr}\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    });
    wait_for(
        "the bulk transfer to start",
        Duration::from_secs(20),
        || (received.load(Ordering::Relaxed) > 16 << 20).then_some(()),
    );
    let mut probes = 0;
    while received.load(Ordering::Relaxed) < TOTAL * 3 / 4 && probes < 20 {
        let started = std::time::Instant::now();
        let out = probe(&setup, "bulk", 10, Some(20_000));
        assert_eq!(out["ok"], true, "{out}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "probe took {:?}",
            started.elapsed()
        );
        probes += 1;
    }
    let during = received.load(Ordering::Relaxed);
    assert!(probes >= 1, "no probe ran during the transfer");
    assert!(
        during < TOTAL,
        "probes completed while the transfer was still running"
    );
    finish.send(()).unwrap();
    reader.join().unwrap();
    assert_eq!(
        received.load(Ordering::Relaxed),
        TOTAL,
        "every byte arrived"
    );
}

#[test]
fn garbage_frames_close_only_their_own_connection() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use unidesk_protocol::{AgentFrame, Hello, Wire};

    let setup = Setup::new(&["steady", "raw"]);
    let controller = setup.controller();
    let _steady = setup.agent("steady");
    setup.wait_agents(&["steady"]);
    let raw = unidesk_agent::config::AgentConfig::load(&setup.agent_config("raw")).unwrap();
    let tls = unidesk_agent::conn::tls_config(&raw).unwrap();
    let (host, port) = unidesk_agent::conn::url_host_port(&raw.controller.url).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let make_hello = |session_proof: [u8; 32]| {
        AgentFrame::Hello(Hello {
            agent_id: raw.id.clone(),
            agent_version: "test".into(),
            capabilities: vec![],
            credential: raw.secret.clone().unwrap(),
            session_proof,
        })
        .encode()
        .unwrap()
    };
    let hello = make_hello([0; 32]);
    let mut wrong_version = hello.clone();
    wrong_version[1] = 99;
    let mut truncated = hello.clone();
    truncated.truncate(hello.len() / 2);
    let cases: Vec<(&str, bool, Vec<u8>, &str)> = vec![
        (
            "garbage first frame",
            false,
            vec![0xde, 0xad, 0xbe, 0xef],
            "protocol version",
        ),
        ("wrong version", false, wrong_version, "protocol version 99"),
        ("truncated Hello", false, truncated, "malformed agent frame"),
        (
            "garbage after Hello",
            true,
            [
                &unidesk_protocol::PROTOCOL_VERSION.to_be_bytes()[..],
                &[250, 1, 2],
            ]
            .concat(),
            "malformed agent frame",
        ),
        ("oversized frame", true, vec![0u8; 5 << 20], ""),
    ];
    for (name, say_hello, payload, expected) in cases {
        let reason = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .unwrap();
            let name_ = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name_, tcp)
                .await
                .unwrap();
            let (mut ws, _) = tokio_tungstenite::client_async(raw.controller.url.as_str(), tls)
                .await
                .unwrap();
            if say_hello {
                // A Hello bound to this connection (see security.rs for replays).
                let material =
                    unidesk_agent::conn::hello_keying_material(ws.get_ref().get_ref().1).unwrap();
                let secret = raw.secret.clone().unwrap();
                let hello = make_hello(Hello::session_proof(&secret, &material));
                ws.send(Message::Binary(hello.into())).await.unwrap();
                // Welcome
                let _ = ws.next().await;
            }
            let _ = ws.send(Message::Binary(payload.into())).await;
            let mut reason = None;
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                match m {
                    Ok(Message::Close(frame)) => {
                        reason = Some(frame.map(|f| f.reason.to_string()).unwrap_or_default());
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        reason = Some(String::new());
                        break;
                    }
                }
            }
            reason.unwrap_or_else(|| panic!("{name}: the connection was not closed"))
        });
        assert!(reason.contains(expected), "{name}: close reason {reason:?}");
        // The steady agent is unaffected.
        let out = probe(&setup, "steady", 1, Some(20_000));
        assert_eq!(out["ok"], true, "{name}: {out}");
    }
    let log = controller.log_text();
    assert!(log.contains("protocol version 99"), "{log}");
    assert!(log.contains("malformed agent frame"), "{log}");
}

#[test]
fn a_cancelled_launch_stops_and_says_why() {
    let setup = Setup::new(&["stop"]);
    let _controller = setup.controller();
    let _agent = setup.agent("stop");
    setup.wait_agents(&["stop"]);
    let job = probe(&setup, "stop", 50_000_000, None);
    let job_id = job["jobId"].as_str().unwrap().to_string();
    wait_for("the launch to run", Duration::from_secs(30), || {
        (stored_count(&setup, &job_id) > 100).then_some(())
    });
    let out = setup.cli_json(&[
        "job",
        "cancel",
        &job_id,
        "--reason",
        "operator changed their mind",
    ]);
    assert_eq!(out["ok"], true, "{out}");
    let done = wait_for("the job to end cancelled", Duration::from_secs(30), || {
        let job = setup.job(&job_id);
        (job["status"] == "cancelled").then_some(job)
    });
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("operator changed their mind"), "{done}");
    assert!(stored_count(&setup, &job_id) < 50_000_000, "stopped early");
    // A finished job cannot be cancelled again.
    let (code, _, err) = setup.cli(&["job", "cancel", &job_id]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already finished"), "{err}");
}

#[test]
fn agent_add_rotate_and_revoke_take_effect_without_a_controller_restart() {
    let setup = Setup::new(&["turn"]);
    let controller = setup.controller();
    // A copy of the agent's config keeps the secret `init` gave it.
    let old = setup.edit_agent("turn", "agent-turn-old", |text| text);
    let old_secret = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("secret = "))
            .map(|s| s.trim_matches('"').to_string())
            .unwrap()
    };
    let before = old_secret(&std::fs::read_to_string(&old).unwrap());

    let config = crate::support::path(&setup.agent_config("turn"));
    let out = setup.cli_json(&["agent", "rotate", "turn", "--agent-config", &config]);
    assert_eq!(out["ok"], true, "{out}");
    let secret = out["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64, "{out}");
    assert_ne!(secret, before);
    assert_eq!(
        old_secret(&std::fs::read_to_string(setup.agent_config("turn")).unwrap()),
        secret,
        "the agent config holds the new secret"
    );
    let controller_toml = std::fs::read_to_string(setup.controller_config()).unwrap();
    assert!(
        !controller_toml.contains(&secret),
        "only the hash is kept: {controller_toml}"
    );

    // The old secret is refused by the running controller, the new one connects.
    let old_agent = setup.agent_with(&old);
    wait_for("the old secret's refusal", Duration::from_secs(20), || {
        old_agent
            .log_text()
            .contains("agent turn presented a wrong credential")
            .then_some(())
    });
    drop(old_agent);
    let agent = setup.agent("turn");
    setup.wait_agents(&["turn"]);
    let out = probe(&setup, "turn", 1, Some(20_000));
    assert_eq!(out["ok"], true, "{out}");

    // Revoked while connected: the open session is cut within a heartbeat (5 s) and every
    // reconnection is refused, although the secret is right.
    let out = setup.cli_json(&["agent", "revoke", "turn"]);
    assert_eq!(out["revoked"], true, "{out}");
    wait_for(
        "the revoked agent's session to end and its reconnection to be refused",
        Duration::from_secs(20),
        || {
            let (code, out, _) = setup.cli(&["agents"]);
            let listed = code != 0 || out.contains("\"turn\"");
            let refused = agent
                .log_text()
                .matches("agent turn has a revoked credential")
                .count()
                >= 2;
            (!listed && refused).then_some(())
        },
    );
    let log = controller.log_text();
    assert!(
        log.contains("closing the session: its credential is no longer accepted"),
        "{log}"
    );
    // The agent was told why its open session ended (the close frame's reason).
    let told = agent.log_text();
    assert!(
        told.lines().any(|l| l.contains("link to controller ended")
            && l.contains("agent turn has a revoked credential")),
        "{told}"
    );
    drop(agent);

    // Enrolled while the controller runs: the written config connects at once.
    let added = setup.dir.join("agent-late.toml");
    let port = crate::support::free_port().to_string();
    let out = setup.cli_json(&[
        "agent",
        "add",
        "late",
        "--agent-config",
        &crate::support::path(&added),
        "--proxy-port",
        &port,
    ]);
    assert_eq!(out["agent"], "late", "{out}");
    let _late = setup.agent_with(&added);
    setup.wait_agents(&["late"]);
    let list = setup.cli_json(&["agent", "list"]);
    assert_eq!(
        list,
        serde_json::json!([
            {"id": "turn", "revoked": true, "connected": false},
            {"id": "late", "revoked": false, "connected": true},
        ])
    );
    // A second enrolment of the same id is bad input.
    let (code, _, err) = setup.cli(&["agent", "add", "late"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("agent late is listed already"), "{err}");
    let log = controller.log_text();
    assert!(log.contains("agent credentials re-read"), "{log}");
}
