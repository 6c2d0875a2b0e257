//! The fault suite: the real controller and agent on loopback, real Git, Docker and containerd,
//! and one fault per test — the WebSocket cut mid-build and mid-import, the agent SIGKILLed
//! mid-build, a private dockerd killed mid-build, a private containerd killed mid-import, the
//! agent's run disk full, a controller that stops acknowledging, a build past its deadline and
//! 200 launches at once. Each test states what must hold and checks it: no event lost or
//! repeated, no job left `running`, run directories and job records that read back, the
//! previous service still serving where there is one.
//!
//! Every test ends by itself: each wait has a deadline, each loop a bound. Each prints one
//! `fault-figures` line (stderr) with its wall time, events stored and events lost, which
//! `docs/RELIABILITY.md` quotes.
#![allow(clippy::disallowed_methods)] // The tests drive docker, ctr and kill as an operator would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::daemons::{PrivateContainerd, PrivateDockerd, TmpfsMount, run};
use crate::support::service::{
    BASE_IMAGE, ComposeService, ComposeSpec, SampleRepo, Served, build_image, dockerfile, health,
    require_docker, serve_previous_version, write_manifest,
};
use crate::support::unique_name;
use crate::support::{Relay, Setup, free_port, is_final, path, started_steps, wait_for};

/// The stored events of a job, checked: numbered 1..=n with no gap or repeat, and exactly
/// one `Finished`, the last.
fn exactly_once(setup: &Setup, job_id: &str) -> Vec<Value> {
    let events = setup.job_events(job_id);
    assert!(!events.is_empty(), "job {job_id} stored no events");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "event {i} of {job_id} is out of sequence: {e}"
        );
    }
    let finished = events
        .iter()
        .filter(|e| e["body"]["Finished"].is_object())
        .count();
    assert_eq!(finished, 1, "Finished events of {job_id}");
    assert!(
        events.last().unwrap()["body"]["Finished"].is_object(),
        "the last event of {job_id} is its Finished"
    );
    events
}

fn log_lines(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["body"]["Log"]["line"].as_str().map(str::to_string))
        .collect()
}

/// The numbers `i` of lines reading `<marker> i of <n>`, in stored order.
fn numbered(events: &[Value], marker: &str) -> Vec<u32> {
    log_lines(events)
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Asserts every numbered line 1..=n is stored once, in order; the number lost (0).
fn assert_numbered_once(events: &[Value], marker: &str, n: u32, job: &str) -> u32 {
    let seen = numbered(events, marker);
    let expected: Vec<u32> = (1..=n).collect();
    let distinct: std::collections::BTreeSet<u32> = seen.iter().copied().collect();
    let lost = n - u32::try_from(distinct.len()).unwrap();
    assert!(
        seen == expected,
        "{job}: `{marker}` lines out of order, repeated or lost ({lost} lost): {seen:?}"
    );
    lost
}

/// Every run directory under `runs` reads back: `launch.json`, `result.json` when present,
/// and every line of `events.jsonl` parse; no temporary file of `result.json` or `launch.json`
/// is left.
/// The results found.
fn check_run_dirs(runs: &Path) -> Vec<Value> {
    let mut results = Vec::new();
    for entry in std::fs::read_dir(runs).unwrap().flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let Ok(launch) = std::fs::read(dir.join("launch.json")) else {
            continue;
        };
        serde_json::from_slice::<Value>(&launch)
            .unwrap_or_else(|e| panic!("{}/launch.json is torn: {e}", dir.display()));
        if let Ok(bytes) = std::fs::read(dir.join("result.json")) {
            results.push(
                serde_json::from_slice::<Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{}/result.json is torn: {e}", dir.display())),
            );
        }
        let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
        for (i, line) in events.lines().enumerate() {
            serde_json::from_str::<Value>(line).unwrap_or_else(|e| {
                panic!("{}/events.jsonl line {} is torn: {e}", dir.display(), i + 1)
            });
        }
        for f in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            // `delivered` may be being written right now; result.json is written before the
            // Finished event, so a temporary file of it is a leftover.
            assert!(
                !(name.starts_with(".result.json.tmp-") || name.starts_with(".launch.json.tmp-")),
                "{}: a temporary file of an atomic write is left: {name}",
                dir.display()
            );
        }
    }
    results
}

/// The one line of figures a test reports (stderr; `--nocapture` shows it).
/// Counts, across every job the test's controller stored, the events, the sequence numbers
/// missing from its log (lost) and the jobs not in a final status (left running) — and fails
/// the test when any job is left running.
fn figures(test: &str, started: Instant, setup: &Setup, extra: Value) {
    let (mut events, mut lost, mut running) = (0u64, 0u64, Vec::new());
    for entry in std::fs::read_dir(setup.dir.join("state/jobs"))
        .unwrap()
        .flatten()
    {
        let id = entry.file_name().to_string_lossy().into_owned();
        let stored = setup.job_events(&id);
        let seqs: std::collections::BTreeSet<u64> =
            stored.iter().filter_map(|e| e["seq"].as_u64()).collect();
        events += stored.len() as u64;
        lost += seqs.last().copied().unwrap_or(0) - seqs.len() as u64;
        let job = setup.job(&id);
        if !is_final(&job) {
            running.push(format!("{id}: {}", job["status"]));
        }
    }
    assert!(
        running.is_empty(),
        "{test}: jobs left unfinished: {running:?}"
    );
    assert_eq!(lost, 0, "{test}: events missing from the controller's logs");
    let mut all = json!({
        "test": test, "wallMs": started.elapsed().as_millis() as u64,
        "events": events, "lost": lost, "jobsRunning": running.len(),
    });
    if let (Some(all), Some(extra)) = (all.as_object_mut(), extra.as_object()) {
        all.extend(extra.clone());
    }
    eprintln!("fault-figures {all}");
}

/// An agent config derived from `id`'s with `(from, to)` text replacements.
fn agent_config(setup: &Setup, id: &str, name: &str, edits: &[(String, String)]) -> PathBuf {
    setup.edit_agent(id, name, |mut text| {
        for (from, to) in edits {
            assert!(text.contains(from.as_str()), "agent config has no {from:?}");
            text = text.replace(from.as_str(), to);
        }
        text
    })
}

/// The edits that send an agent's link through `relay` and make it redial quickly.
fn via_relay(setup: &Setup, relay: &Relay) -> Vec<(String, String)> {
    vec![
        (
            format!("127.0.0.1:{}/agent", setup.gateway.port()),
            format!("127.0.0.1:{}/agent", relay.addr.port()),
        ),
        (
            "initial_backoff_ms = 500".into(),
            "initial_backoff_ms = 100".into(),
        ),
    ]
}

fn runs_dir(setup: &Setup, id: &str) -> PathBuf {
    setup.dir.join(format!("agent-{id}/runs"))
}

/// A Compose service under test: its repository served over smart HTTP, its catalog entry,
/// and the previous version's image and container (started by the test).
struct Site {
    setup: Setup,
    repo: SampleRepo,
    served: Served,
    port: u16,
    catalog: PathBuf,
    service_id: String,
    image: String,
    project: String,
    uid: String,
}

impl Site {
    fn new(name: &str, build_timeout_ms: u64) -> Site {
        let setup = Setup::new(&["node"]);
        let git_root = setup.dir.join("git");
        std::fs::create_dir_all(&git_root).unwrap();
        let repo = SampleRepo::create(&git_root, name).unwrap();
        let served = Served::start(&git_root);
        let port = free_port();
        let uid = unique_name(name);
        let project = format!("unidesk-faults-{name}-{}", std::process::id());
        let image = format!("{project}-web:latest");
        let service_id = format!("{name}-svc");
        let catalog = setup.dir.join("config.json");
        ComposeSpec {
            id: &service_id,
            repo_url: &served.server.url(&format!("{name}.git")),
            node: "node",
            image: &image,
            project: &project,
            port,
            build_timeout_ms,
        }
        .write_catalog(&catalog);
        Site {
            setup,
            repo,
            served,
            port,
            catalog,
            service_id,
            image,
            project,
            uid,
        }
    }

    /// The previous version on the shared Docker, started by docker-compose; it reports
    /// commit `none`.
    fn old_service(&self) -> OldService {
        let compose = serve_previous_version(
            &self.setup.dir,
            &self.project,
            &self.image,
            self.port,
            Duration::from_secs(30),
        );
        OldService(compose, self.image.clone())
    }

    fn wait_old_healthy(&self) {
        wait_for(
            "the previous version to serve",
            Duration::from_secs(30),
            || health(self.port).filter(|b| b.contains("none")),
        );
    }

    /// Commits a Dockerfile with `extra` lines; the content is unique to this test run, so no
    /// build step after `COPY` comes from Docker's cache.
    fn commit(&self, message: &str, extra: &str) -> String {
        self.repo
            .commit(
                message,
                &[
                    (
                        "Dockerfile",
                        &dockerfile(self.port, "$UNIDESK_DEPLOY_COMMIT", extra),
                    ),
                    ("index.html", &format!("{message} {}", self.uid)),
                ],
            )
            .unwrap()
            .to_string()
    }

    fn manifest(&self, commit: &str) -> PathBuf {
        let manifest = self.setup.dir.join("deploy.json");
        let url = self.served.server.url(&format!(
            "{}",
            self.repo.path.file_name().unwrap().to_string_lossy()
        ));
        write_manifest(&manifest, &self.service_id, &url, commit);
        manifest
    }

    /// `deploy apply` without waiting: the job id.
    fn apply(&self, commit: &str) -> String {
        let manifest = self.manifest(commit);
        let out = self.setup.cli_json(&[
            "deploy",
            "apply",
            "--file",
            &path(&manifest),
            "--catalog",
            &path(&self.catalog),
            "--service",
            &self.service_id,
        ]);
        out["jobs"][0]["jobId"]
            .as_str()
            .unwrap_or_else(|| panic!("deploy apply printed no job id: {out}"))
            .to_string()
    }

    /// Waits until the job's stored events hold a log line containing `needle`.
    fn wait_line(&self, job_id: &str, needle: &str, limit: Duration) {
        wait_for(&format!("{needle:?} in {job_id}"), limit, || {
            log_lines(&self.setup.job_events(job_id))
                .iter()
                .any(|l| l.contains(needle))
                .then_some(())
        });
    }
}

/// The previous version's Compose service. Its containers are removed at once when the test
/// ends (busybox httpd ignores SIGTERM, so `docker-compose down` alone waits 10 s per
/// container), and its image tag with them.
struct OldService(ComposeService, String);

impl Drop for OldService {
    fn drop(&mut self) {
        let label = format!("label=com.docker.compose.project={}", self.0.project);
        let (_, ids, _) = run("docker", &["ps", "-aq", "--filter", &label]);
        for id in ids.split_whitespace() {
            let _ = run("docker", &["rm", "-f", id]);
        }
        // The service's tag (old or new version): `down --rmi local` keeps tagged images.
        let _ = run("docker", &["rmi", "-f", &self.1]);
    }
}

/// A `RUN` that prints `n` numbered lines, one every `every_ms`.
fn slow_run(marker: &str, n: u32, every_ms: u32) -> String {
    format!(
        "RUN for i in $(seq 1 {n}); do echo \"{marker} $i of {n}\"; sleep {}; done\n",
        f64::from(every_ms) / 1000.0
    )
}

/// Fault: the WebSocket is cut while a Compose build streams its output.
#[test]
fn a_cut_connection_mid_build_loses_no_build_line() {
    let started = Instant::now();
    require_docker();
    let site = Site::new("cutbuild", 300_000);
    let _controller = site.setup.controller();
    let relay = Relay::start(site.setup.gateway);
    let config = agent_config(
        &site.setup,
        "node",
        "node-relayed",
        &via_relay(&site.setup, &relay),
    );
    let _agent = site.setup.agent_with(&config);
    site.setup.wait_agents(&["node"]);
    let _old = site.old_service();
    let n = 40;
    let commit = site.commit("slow build", &slow_run("slow build line", n, 150));
    let job_id = site.apply(&commit);
    site.wait_line(&job_id, "slow build line 5 of", Duration::from_secs(120));
    let at_cut = numbered(&site.setup.job_events(&job_id), "slow build line ");
    relay.cut_all();
    let job = site.setup.wait_final(&job_id, Duration::from_secs(180));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        at_cut.len() < n as usize,
        "the cut happened mid-build ({} lines stored before it)",
        at_cut.len()
    );
    let events = exactly_once(&site.setup, &job_id);
    let lost = assert_numbered_once(&events, "slow build line ", n, &job_id);
    assert!(health(site.port).is_some_and(|b| b.contains(&commit)));
    check_run_dirs(&runs_dir(&site.setup, "node"));
    figures(
        "a_cut_connection_mid_build_loses_no_build_line",
        started,
        &site.setup,
        json!({ "linesBeforeCut": at_cut.len(), "buildLinesLost": lost }),
    );
}

/// The sandbox image every prewarm needs, as the agent's config names it.
const PAUSE_REF: &str = "faults.local/unidesk-pause:3.6";

/// A private containerd standing in for k3s's, holding a pause image, and a Docker image big
/// enough that streaming it into containerd takes seconds.
struct ImportSite {
    containerd: PrivateContainerd,
    pause: String,
    big: String,
    big_name: String,
}

impl ImportSite {
    fn new(mib: u32) -> ImportSite {
        require_docker();
        let containerd = PrivateContainerd::start();
        // The pause image, imported in-process the way the agent imports (entrypoint /pause).
        let pause = format!("{}:v1", unique_name("unidesk-test-faults-pause"));
        build_image(
            &pause,
            &format!("FROM {BASE_IMAGE}\nRUN cp /bin/busybox /pause\nENTRYPOINT [\"/pause\"]\n"),
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use unidesk_agent::launch::containerd::{Containerd, normalize};
            let cd = Containerd::connect(&containerd.socket, "k8s.io", "overlayfs")
                .await
                .expect("connect to the private containerd");
            let docker = bollard::Docker::connect_with_local_defaults().unwrap();
            let (log, mut rx) = unidesk_agent::launch::steplog::StepLog::channel(
                unidesk_protocol::Step::Import,
                64,
            );
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            let name = normalize(PAUSE_REF).unwrap();
            tokio::time::timeout(
                Duration::from_secs(120),
                cd.import_from_docker(
                    &docker,
                    &pause,
                    &[name],
                    &log,
                    &tokio_util::sync::CancellationToken::new(),
                ),
            )
            .await
            .expect("the pause import within 2 minutes")
            .expect("import the pause image");
        });
        // A layer unique to this run (so nothing is already in containerd), then `mib` MiB of
        // random bytes.
        let id = unique_name("unidesk-faults-big");
        let big = format!("{id}:v1");
        build_image(
            &big,
            &format!(
                "FROM {BASE_IMAGE}\nRUN echo {id} > /id\n\
                 RUN dd if=/dev/urandom of=/big bs=1M count={mib} 2>/dev/null\n"
            ),
        );
        let big_name = unidesk_agent::launch::containerd::normalize(&big).unwrap();
        ImportSite {
            containerd,
            pause,
            big,
            big_name,
        }
    }

    fn agent_edits(&self) -> Vec<(String, String)> {
        vec![
            (
                "containerd_socket = \"/run/k3s/containerd/containerd.sock\"".into(),
                format!(
                    "containerd_socket = \"{}\"",
                    self.containerd.socket.display()
                ),
            ),
            (
                "pause_image = \"rancher/mirrored-pause:3.6\"".into(),
                format!("pause_image = \"{PAUSE_REF}\""),
            ),
            (
                "prewarm_images = []".into(),
                format!("prewarm_images = [\"{}\"]", self.big),
            ),
        ]
    }

    fn prewarm(setup: &Setup) -> String {
        let out = setup.cli_json(&["dev-env", "prewarm-images", "--agent", "node"]);
        out["jobId"]
            .as_str()
            .or_else(|| out["job"]["jobId"].as_str())
            .unwrap_or_else(|| panic!("prewarm-images printed no job id: {out}"))
            .to_string()
    }

    /// Waits until the import reports writing a blob of at least 32 MiB (the big layer).
    fn wait_big_layer_writing(setup: &Setup, job_id: &str) {
        wait_for(
            "the big layer's import to start",
            Duration::from_secs(120),
            || {
                let events = setup.job_events(job_id);
                assert!(
                    !events.iter().any(|e| e["body"]["Finished"].is_object()),
                    "the prewarm ended before its big layer was written: {:?}",
                    log_lines(&events)
                );
                log_lines(&events)
                    .iter()
                    .any(|l| {
                        l.ends_with("MiB): writing")
                            && l.rsplit('(')
                                .next()
                                .and_then(|s| s.split_whitespace().next())
                                .and_then(|v| v.parse::<f64>().ok())
                                .is_some_and(|v| v >= 32.0)
                    })
                    .then_some(())
            },
        );
    }
}

impl Drop for ImportSite {
    fn drop(&mut self) {
        let _ = run("docker", &["rmi", "-f", &self.big, &self.pause]);
    }
}

/// Fault: the WebSocket is cut while a prewarm streams a big image into containerd.
#[test]
fn a_cut_connection_mid_import_loses_no_event() {
    let started = Instant::now();
    let site = ImportSite::new(192);
    let setup = Setup::new(&["node"]);
    let _controller = setup.controller();
    let relay = Relay::start(setup.gateway);
    let mut edits = via_relay(&setup, &relay);
    edits.extend(site.agent_edits());
    let _agent = setup.agent_with(&agent_config(&setup, "node", "node-import", &edits));
    setup.wait_agents(&["node"]);
    let job_id = ImportSite::prewarm(&setup);
    ImportSite::wait_big_layer_writing(&setup, &job_id);
    let before = setup.job_events(&job_id).len();
    let cut_at = unidesk_controller::hub::now_ms();
    relay.cut_all();
    let job = setup.wait_final(&job_id, Duration::from_secs(180));
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = exactly_once(&setup, &job_id);
    let import_end = events
        .iter()
        .find(|e| e["body"]["StepFinished"]["step"] == "import")
        .and_then(|e| e["timeUnixMs"].as_u64())
        .expect("the import step finished");
    assert!(
        import_end > cut_at,
        "the cut happened mid-import (import ended at {import_end}, cut at {cut_at})"
    );
    let lines = log_lines(&events);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("prewarmed {}", site.big))),
        "{lines:#?}"
    );
    let (ok, out, err) =
        site.containerd
            .ctr(&["images", "check", &format!("name=={}", site.big_name)]);
    assert!(ok && out.contains("complete"), "{out}{err}");
    check_run_dirs(&runs_dir(&setup, "node"));
    figures(
        "a_cut_connection_mid_import_loses_no_event",
        started,
        &setup,
        json!({
            "eventsBeforeCut": before,
            "importEndedMsAfterCut": import_end - cut_at,
        }),
    );
}

/// Fault: the agent is SIGKILLed mid-build and restarted.
#[test]
fn an_agent_killed_mid_build_ends_the_job_interrupted() {
    let started = Instant::now();
    require_docker();
    let site = Site::new("agentkill", 300_000);
    let _controller = site.setup.controller();
    let config = agent_config(
        &site.setup,
        "node",
        "node-fast",
        &[(
            "initial_backoff_ms = 500".into(),
            "initial_backoff_ms = 100".into(),
        )],
    );
    let mut agent = site.setup.agent_with(&config);
    site.setup.wait_agents(&["node"]);
    let _old = site.old_service();
    let n = 200;
    let commit = site.commit("killed build", &slow_run("killed build line", n, 100));
    let job_id = site.apply(&commit);
    site.wait_line(&job_id, "killed build line 3 of", Duration::from_secs(120));
    agent.kill();
    let stored_at_kill = site.setup.job_events(&job_id).len();
    let _agent = site.setup.agent_with(&config);
    let job = site.setup.wait_final(&job_id, Duration::from_secs(60));
    assert_eq!(job["status"], "interrupted", "{job}");
    let reason = job["result"]["error"]
        .as_str()
        .or_else(|| job["reason"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("agent restarted during build"),
        "the reason names the step: {job}"
    );
    let events = exactly_once(&site.setup, &job_id);
    let seen = numbered(&events, "killed build line ");
    let expected: Vec<u32> = (1..=u32::try_from(seen.len()).unwrap()).collect();
    assert_eq!(
        seen, expected,
        "build lines stored once, in order, up to the kill"
    );
    assert!(seen.len() < n as usize, "the kill happened mid-build");
    assert_eq!(
        started_steps(&events).last().map(String::as_str),
        Some("build")
    );
    // The job and the run directory stay readable.
    let status = site.setup.cli_json(&["job", "status", &job_id]);
    assert_eq!(status["job"]["status"], "interrupted", "{status}");
    let results = check_run_dirs(&runs_dir(&site.setup, "node"));
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "interrupted", "{}", results[0]);
    // The previous version still serves.
    assert!(health(site.port).is_some_and(|b| b.contains("none")));
    figures(
        "an_agent_killed_mid_build_ends_the_job_interrupted",
        started,
        &site.setup,
        json!({ "storedAtKill": stored_at_kill }),
    );
}

/// Fault: a private dockerd is SIGKILLed while it builds.
#[test]
fn docker_killed_mid_build_fails_naming_docker_and_keeps_the_old_service() {
    let started = Instant::now();
    require_docker();
    let mut dockerd = PrivateDockerd::start();
    dockerd.load_from_shared(BASE_IMAGE);
    let site = Site::new("dockerkill", 300_000);
    // The previous version, in the private daemon, with the labels Compose gives it.
    let build = {
        use std::io::Write;
        let mut child = std::process::Command::new("docker")
            .args(["-H", &dockerd.host(), "build", "--network", "host", "-t"])
            .arg(&site.image)
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(dockerfile(site.port, "none", "").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let (ok, _, err) = dockerd.docker(&[
        "run",
        "-d",
        "--network",
        "host",
        "--name",
        &format!("{}-web-1", site.project),
        "--label",
        &format!("com.docker.compose.project={}", site.project),
        "--label",
        "com.docker.compose.service=web",
        &site.image,
    ]);
    assert!(ok, "{err}");
    site.wait_old_healthy();

    let _controller = site.setup.controller();
    let config = agent_config(
        &site.setup,
        "node",
        "node-private-docker",
        &[(
            "docker_socket = \"/var/run/docker.sock\"".into(),
            format!("docker_socket = \"{}\"", dockerd.socket.display()),
        )],
    );
    let _agent = site.setup.agent_with(&config);
    site.setup.wait_agents(&["node"]);
    let n = 200;
    let commit = site.commit("docker dies", &slow_run("doomed build line", n, 100));
    let job_id = site.apply(&commit);
    site.wait_line(&job_id, "doomed build line 3 of", Duration::from_secs(120));
    dockerd.kill();
    let job = site.setup.wait_final(&job_id, Duration::from_secs(60));
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["result"]["error"]
        .as_str()
        .or_else(|| job["reason"].as_str())
        .unwrap_or_default()
        .to_lowercase();
    assert!(reason.contains("docker"), "the failure names Docker: {job}");
    let events = exactly_once(&site.setup, &job_id);
    assert_eq!(
        started_steps(&events).last().map(String::as_str),
        Some("build")
    );
    let results = check_run_dirs(&runs_dir(&site.setup, "node"));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "failed");
    // The old container outlived its daemon (live restore) and is still the one serving.
    assert!(
        health(site.port).is_some_and(|b| b.contains("none")),
        "the previous version still serves"
    );
    dockerd.restart();
    let (_, running, _) = dockerd.docker(&[
        "ps",
        "--filter",
        &format!("label=com.docker.compose.project={}", site.project),
        "--format",
        "{{.Image}}",
    ]);
    assert_eq!(
        running.trim(),
        site.image,
        "the old container, after the restart"
    );
    figures(
        "docker_killed_mid_build_fails_naming_docker_and_keeps_the_old_service",
        started,
        &site.setup,
        json!({ "reason": reason }),
    );
}

/// Fault: a private containerd (the k3s stand-in) is SIGKILLed mid-import.
#[test]
fn containerd_killed_mid_import_fails_naming_it_and_records_no_half_image() {
    let started = Instant::now();
    let mut site = ImportSite::new(192);
    let setup = Setup::new(&["node"]);
    let _controller = setup.controller();
    let _agent = setup.agent_with(&agent_config(
        &setup,
        "node",
        "node-import",
        &site.agent_edits(),
    ));
    setup.wait_agents(&["node"]);
    let job_id = ImportSite::prewarm(&setup);
    ImportSite::wait_big_layer_writing(&setup, &job_id);
    site.containerd.kill();
    let job = setup.wait_final(&job_id, Duration::from_secs(120));
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["result"]["error"]
        .as_str()
        .or_else(|| job["reason"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("containerd")
            && reason.contains(&site.containerd.socket.display().to_string()),
        "the failure names containerd and its socket: {job}"
    );
    exactly_once(&setup, &job_id);
    let results = check_run_dirs(&runs_dir(&setup, "node"));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "failed");
    site.containerd.restart();
    let (ok, listing, err) = site.containerd.ctr(&["images", "ls", "-q"]);
    assert!(ok, "{err}");
    assert!(
        !listing.contains(&site.big_name),
        "no image record of the interrupted import: {listing}"
    );
    assert!(
        listing.contains("unidesk-pause"),
        "the earlier import is intact: {listing}"
    );
    figures(
        "containerd_killed_mid_import_fails_naming_it_and_records_no_half_image",
        started,
        &setup,
        json!({ "reason": reason }),
    );
}

/// Fault: the agent's run disk is full.
#[test]
fn a_full_run_disk_fails_the_launch_naming_it_and_the_agent_keeps_serving() {
    let started = Instant::now();
    let setup = Setup::new(&["full"]);
    let mount = TmpfsMount::mount(&runs_dir(&setup, "full"), 8);
    let _controller = setup.controller();
    let _agent = setup.agent("full");
    setup.wait_agents(&["full"]);
    let fill = mount.fill();
    let (code, out, err) = setup.cli(&[
        "probe",
        "--agent",
        "full",
        "--echo-lines",
        "5",
        "--wait-ms",
        "30000",
    ]);
    assert_ne!(
        code, 0,
        "a launch on a full disk cannot succeed: {out}{err}"
    );
    let out: Value = serde_json::from_str(&out).unwrap_or_else(|_| json!({ "stderr": err }));
    let job_id = out["job"]["jobId"]
        .as_str()
        .or_else(|| out["jobId"].as_str())
        .unwrap_or_else(|| panic!("no job id: {out}"))
        .to_string();
    let job = setup.wait_final(&job_id, Duration::from_secs(30));
    assert_ne!(job["status"], "succeeded", "{job}");
    let reason = job["reason"]
        .as_str()
        .or_else(|| job["result"]["error"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("No space left on device")
            && reason.contains(&runs_dir(&setup, "full").display().to_string()),
        "the failure names ENOSPC and the path: {job}"
    );
    check_run_dirs(&mount.dir);
    // Space back: the same agent serves the next launch in full.
    std::fs::remove_file(&fill).unwrap();
    let again = setup.cli_json(&[
        "probe",
        "--agent",
        "full",
        "--echo-lines",
        "5",
        "--wait-ms",
        "30000",
    ]);
    assert_eq!(again["job"]["status"], "succeeded", "{again}");
    let again_id = again["job"]["jobId"].as_str().unwrap();
    let events = exactly_once(&setup, again_id);
    assert_eq!(numbered(&events, "echo line ").len(), 5);
    let results = check_run_dirs(&mount.dir);
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "succeeded");
    figures(
        "a_full_run_disk_fails_the_launch_naming_it_and_the_agent_keeps_serving",
        started,
        &setup,
        json!({ "reason": reason }),
    );
}

/// Fault: the agent's run disk fills up while a launch writes its events.
#[test]
fn a_run_disk_filling_up_mid_launch_fails_it_without_a_torn_line() {
    let started = Instant::now();
    let setup = Setup::new(&["filling"]);
    let mount = TmpfsMount::mount(&runs_dir(&setup, "filling"), 8);
    let _controller = setup.controller();
    let agent = setup.agent("filling");
    setup.wait_agents(&["filling"]);
    // Leave 256 KiB: the run directory and its first events fit, 20,000 lines do not.
    let fill = mount.fill();
    let len = std::fs::metadata(&fill).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fill)
        .unwrap()
        .set_len(len - 256 * 1024)
        .unwrap();
    let lines = 20_000u32;
    let (code, out, err) = setup.cli(&[
        "probe",
        "--agent",
        "filling",
        "--echo-lines",
        &lines.to_string(),
        "--wait-ms",
        "60000",
    ]);
    assert_eq!(code, 1, "the launch fails: {out}{err}");
    let out: Value = serde_json::from_str(&out).unwrap();
    let job_id = out["job"]["jobId"].as_str().unwrap().to_string();
    let job = setup.wait_final(&job_id, Duration::from_secs(30));
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["result"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("No space left on device")
            && reason.contains(&runs_dir(&setup, "filling").display().to_string()),
        "the failure names ENOSPC and the path: {job}"
    );
    // The controller still got every event: its log is the complete one.
    let events = exactly_once(&setup, &job_id);
    let lost = assert_numbered_once(&events, "echo line ", lines, &job_id);
    // The agent's copy stops short, but without a torn line; no result.json was torn.
    check_run_dirs(&mount.dir);
    let run = std::fs::read_dir(&mount.dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("launch.json").exists())
        .expect("the run directory");
    let on_disk = std::fs::read_to_string(run.join("events.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        on_disk < events.len(),
        "the disk filled mid-launch ({on_disk} written)"
    );
    assert!(
        agent.log_text().contains("No space left on device"),
        "the agent logged the failed writes"
    );
    std::fs::remove_file(&fill).unwrap();
    let again = setup.cli_json(&[
        "probe",
        "--agent",
        "filling",
        "--echo-lines",
        "5",
        "--wait-ms",
        "30000",
    ]);
    assert_eq!(again["job"]["status"], "succeeded", "{again}");
    figures(
        "a_run_disk_filling_up_mid_launch_fails_it_without_a_torn_line",
        started,
        &setup,
        json!({
            "writtenOnDisk": on_disk, "echoLinesLost": lost,
            "reason": reason,
        }),
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sends `signal` to a process with kill(1) (the crate forbids unsafe code, so no libc::kill).
fn signal(pid: u32, signal: &str) {
    let (ok, _, err) = run("kill", &[&format!("-{signal}"), &pid.to_string()]);
    assert!(ok, "kill -{signal} {pid}: {err}");
}

/// Resumes a stopped process however the test ends.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = run("kill", &["-CONT", &self.0.to_string()]);
    }
}

/// Fault: the controller stops acknowledging (SIGSTOP) while a launch streams.
#[test]
fn a_stalled_controller_bounds_the_agent_backlog_and_memory_and_loses_nothing() {
    let started = Instant::now();
    let window = 512;
    let setup = Setup::new(&["slow"]);
    let controller = setup.controller();
    let config = agent_config(
        &setup,
        "slow",
        "slow-window",
        &[(
            "event_window = 8192".into(),
            format!("event_window = {window}"),
        )],
    );
    let agent = setup.agent_with(&config);
    setup.wait_agents(&["slow"]);
    // Seconds of stream, so the stop lands long before the last line.
    let lines = 100_000u32;
    let job = setup.cli_json(&[
        "probe",
        "--agent",
        "slow",
        "--echo-lines",
        &lines.to_string(),
    ]);
    let job_id = job["jobId"].as_str().unwrap().to_string();
    wait_for("some events stored", Duration::from_secs(30), || {
        (setup.job_events(&job_id).len() > 1000).then_some(())
    });
    let agent_pid = agent.child.id();
    let rss_before = rss_kib(agent_pid);
    signal(controller.child.id(), "STOP");
    let resume = Resume(controller.child.id());
    let stored = setup.job_events(&job_id).len() as u64;
    let run = std::fs::read_dir(runs_dir(&setup, "slow"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("launch.json").exists())
        .expect("the probe's run directory");
    let written = || {
        std::fs::read_to_string(run.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .count() as u64
    };
    let mut max_backlog = 0;
    let mut max_rss = rss_before;
    let mut samples = Vec::new();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let w = written();
        max_backlog = max_backlog.max(w.saturating_sub(stored));
        max_rss = max_rss.max(rss_kib(agent_pid));
        samples.push(w);
    }
    let plateau = written();
    assert!(
        plateau < u64::from(lines),
        "the launch waited for acks instead of running ahead ({plateau} written)"
    );
    assert!(
        max_backlog <= window as u64,
        "agent backlog {max_backlog} beyond its window {window} (stored {stored}, samples {samples:?})"
    );
    assert!(
        max_rss < 256 * 1024,
        "agent RSS grew to {max_rss} KiB while the controller was stalled"
    );
    drop(resume);
    let done = setup.wait_final(&job_id, Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    let events = exactly_once(&setup, &job_id);
    let seen = log_lines(&events)
        .iter()
        .filter(|l| l.starts_with("echo line "))
        .count() as u32;
    assert_eq!(seen, lines, "every echo line stored");
    assert_numbered_once(&events, "echo line ", lines, &job_id);
    figures(
        "a_stalled_controller_bounds_the_agent_backlog_and_memory_and_loses_nothing",
        started,
        &setup,
        json!({
            "echoLinesLost": lines - seen,
            "window": window, "maxBacklog": max_backlog, "storedAtStop": stored,
            "rssBeforeKiB": rss_before, "maxRssKiB": max_rss,
        }),
    );
}

/// Fault: a build hangs past its deadline, and a launch runs past its own.
#[test]
fn a_hanging_build_is_stopped_at_its_deadline_and_says_so() {
    let started = Instant::now();
    require_docker();
    // Long enough for the steps before the hanging one on a loaded machine (a cold build of
    // them takes ~3 s here), so the deadline lands while the marker step runs.
    let site = Site::new("hang", 20_000);
    let _controller = site.setup.controller();
    let _agent = site.setup.agent("node");
    site.setup.wait_agents(&["node"]);
    let _old = site.old_service();
    let marker = format!("hanging-{}", site.uid);
    let commit = site.commit("hangs", &format!("RUN echo {marker} && sleep 300\n"));
    let job_id = site.apply(&commit);
    let job = site.setup.wait_final(&job_id, Duration::from_secs(120));
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["result"]["error"]
        .as_str()
        .or_else(|| job["reason"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("did not finish within 20s"),
        "the result says the deadline: {job}"
    );
    let events = exactly_once(&site.setup, &job_id);
    assert!(
        log_lines(&events).iter().any(|l| l.contains(&marker)),
        "the build ran until the deadline"
    );
    // The daemon stopped the build: no container still runs the hanging step.
    wait_for(
        "the hanging build container to go",
        Duration::from_secs(30),
        || {
            let (_, ps, _) = run("docker", &["ps", "--no-trunc", "--format", "{{.Command}}"]);
            (!ps.contains(&marker)).then_some(())
        },
    );
    assert!(health(site.port).is_some_and(|b| b.contains("none")));

    // The launch deadline itself: a probe that would stream for minutes, given 5 s (time
    // enough for the agent to accept it on a loaded machine; the controller ends a launch
    // not accepted by its deadline with another reason).
    let probe = site.setup.cli_json(&[
        "probe",
        "--agent",
        "node",
        "--echo-lines",
        "50000000",
        "--deadline-ms",
        "5000",
    ]);
    let probe_id = probe["jobId"].as_str().unwrap();
    let done = site.setup.wait_final(probe_id, Duration::from_secs(60));
    assert_eq!(done["status"], "timed-out", "{done}");
    let why = done["result"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("deadline passed"), "{done}");
    exactly_once(&site.setup, probe_id);
    check_run_dirs(&runs_dir(&site.setup, "node"));
    figures(
        "a_hanging_build_is_stopped_at_its_deadline_and_says_so",
        started,
        &site.setup,
        json!({}),
    );
}

/// Fault: 200 launches queued at once across two agents.
#[test]
fn two_hundred_launches_across_two_agents_all_finish_while_the_controller_answers() {
    let started = Instant::now();
    let setup = Setup::new(&["many-a", "many-b"]);
    let _controller = setup.controller();
    let _a = setup.agent("many-a");
    let _b = setup.agent("many-b");
    setup.wait_agents(&["many-a", "many-b"]);
    let total = 200usize;
    let lines = 3u32;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (ids, (agents_max, status_max, queries)) = std::thread::scope(|s| {
        let launchers: Vec<_> = (0..4)
            .map(|t| {
                let setup = &setup;
                s.spawn(move || {
                    (0..total / 4)
                        .map(|i| {
                            let agent = if (t + i) % 2 == 0 { "many-a" } else { "many-b" };
                            let out = setup.cli_json(&[
                                "probe",
                                "--agent",
                                agent,
                                "--echo-lines",
                                &lines.to_string(),
                            ]);
                            out["jobId"].as_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let watcher = {
            let setup = &setup;
            let done = &done;
            s.spawn(move || {
                let (mut agents_max, mut status_max, mut n) =
                    (Duration::ZERO, Duration::ZERO, 0u32);
                let mut known: Option<String> = None;
                // Bounded: at most 2,000 rounds, ending when the launches are all done.
                while !done.load(std::sync::atomic::Ordering::SeqCst) && n < 2000 {
                    let t = Instant::now();
                    let agents = setup.cli_json(&["agents"]);
                    agents_max = agents_max.max(t.elapsed());
                    assert_eq!(agents.as_array().map(Vec::len), Some(2), "{agents}");
                    if known.is_none() {
                        // A job's directory exists a moment before its record is
                        // written; ask only about a job whose record is there.
                        known = std::fs::read_dir(setup.dir.join("state/jobs"))
                            .ok()
                            .into_iter()
                            .flatten()
                            .filter_map(|e| e.ok())
                            .find(|e| e.path().join("job.json").is_file())
                            .map(|e| e.file_name().to_string_lossy().into_owned());
                    }
                    if let Some(id) = &known {
                        let t = Instant::now();
                        let status = setup.cli_json(&["job", "status", id]);
                        status_max = status_max.max(t.elapsed());
                        assert!(status["job"]["status"].is_string(), "{status}");
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                (agents_max, status_max, n)
            })
        };
        let ids: Vec<String> = launchers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        for id in &ids {
            setup.wait_final(id, Duration::from_secs(120));
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (ids, watcher.join().unwrap())
    });
    assert_eq!(ids.len(), total);
    let mut not_ok = Vec::new();
    for id in &ids {
        let job = setup.job(id);
        if job["status"] != "succeeded" {
            not_ok.push(format!("{id}: {}", job["status"]));
        }
        let stored = exactly_once(&setup, id);
        assert_numbered_once(&stored, "echo line ", lines, id);
    }
    assert!(
        not_ok.is_empty(),
        "launches that did not succeed: {not_ok:?}"
    );
    assert!(
        queries > 0,
        "the controller was queried while the launches ran"
    );
    for id in ["many-a", "many-b"] {
        assert_eq!(check_run_dirs(&runs_dir(&setup, id)).len(), total / 2);
    }
    figures(
        "two_hundred_launches_across_two_agents_all_finish_while_the_controller_answers",
        started,
        &setup,
        json!({
            "launches": total,
            "agentsMaxMs": agents_max.as_millis() as u64,
            "jobStatusMaxMs": status_max.as_millis() as u64, "queries": queries,
        }),
    );
}
