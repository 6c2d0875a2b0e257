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
fn ten_thousand_lines_survive_a_cut_connection() {
    let setup = Setup::new(&["cut"]);
    let _controller = setup.controller();
    let relay = Relay::start(setup.gateway);
    let _agent = setup.agent_with(&agent_via_relay(&setup, "cut", &relay));
    setup.wait_agents(&["cut"]);
    let lines = 20_000;
    let job = probe(&setup, "cut", lines, None);
    let job_id = job["jobId"].as_str().unwrap().to_string();
    wait_for("some events stored", Duration::from_secs(30), || {
        (stored_count(&setup, &job_id) > 200).then_some(())
    });
    relay.cut_all();
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
        stored_count(&setup, &job_id) > 200,
        "the cut happened mid-stream"
    );
    assert_exactly_once(&setup, &job_id, lines);
}

#[test]
fn ten_thousand_lines_survive_a_controller_crash() {
    let setup = Setup::new(&["crash"]);
    let mut controller = setup.controller();
    let _agent = setup.agent_with(&setup.edit_agent("crash", "agent-crash-fast", |t| {
        t.replace("initial_backoff_ms = 500", "initial_backoff_ms = 100")
    }));
    setup.wait_agents(&["crash"]);
    let lines = 20_000;
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
    let job = probe(&setup, "twice", 50_000, None);
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
    assert_exactly_once(&setup, &job_id, 50_000);
}
