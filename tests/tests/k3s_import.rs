//! Import into a real containerd (the k3s stand-in at /run/k3s/containerd/containerd.sock,
//! namespace `k8s.io`): images streamed out of the real Docker Engine, the sandbox image
//! pulled from a real registry through the agent's egress tunnel, and checked with the real
//! `ctr` the way an operator would.
#![allow(clippy::disallowed_methods)] // Tests drive docker and ctr as an operator would.

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use unidesk_agent::launch::containerd::{Containerd, ContainerdError, normalize};
use unidesk_agent::launch::steplog::StepLog;
use unidesk_protocol::Step;

use crate::support::registry::Registry;
use crate::support::service::{BASE_IMAGE, build_image, require_docker};
use crate::support::{Setup, unique_name};

const SOCKET: &str = "/run/k3s/containerd/containerd.sock";
const NAMESPACE: &str = "k8s.io";
/// How long one import or pull may take in these tests.
const LIMIT: Duration = Duration::from_secs(180);

/// Fails the test, saying what to start, when the k3s stand-in containerd is not reachable.
fn require_containerd() {
    let ok = Path::new(SOCKET).exists()
        && Command::new("ctr")
            .args(["--address", SOCKET, "version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    assert!(
        ok,
        "containerd is not reachable at {SOCKET} (or `ctr` is missing): run `bash \
         scripts/testbed-up` (it starts the k3s stand-in containerd)"
    );
}

/// Runs `ctr --address SOCKET -n k8s.io ARGS`; (success, stdout, stderr).
fn ctr(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ctr")
        .args(["--address", SOCKET, "-n", NAMESPACE])
        .args(args)
        .output()
        .expect("run ctr");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A name no other test (or earlier run) uses.
fn fake_commit(seed: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(seed.as_bytes()))[..40].to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `f` with a deadline, failing the test with `what` when it passes.
fn within<T>(rt: &tokio::runtime::Runtime, what: &str, f: impl Future<Output = T>) -> T {
    rt.block_on(async {
        tokio::time::timeout(LIMIT, f)
            .await
            .unwrap_or_else(|_| panic!("{what} took longer than {LIMIT:?}"))
    })
}

/// A step log whose lines are collected (and can trigger something when a line appears).
fn collecting_log(
    rt: &tokio::runtime::Runtime,
    on_line: impl Fn(&str) + Send + 'static,
) -> (StepLog, Arc<Mutex<Vec<String>>>) {
    let (log, mut rx) = StepLog::channel(Step::Import, 64);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    rt.spawn(async move {
        while let Some(line) = rx.recv().await {
            on_line(&line.line);
            sink.lock().unwrap().push(line.line);
        }
    });
    (log, lines)
}

/// Waits (briefly: the lines are collected by a task) until the log holds `needle`; the
/// whole log, for messages.
fn log_with(lines: &Arc<Mutex<Vec<String>>>, needle: &str) -> String {
    let text = || lines.lock().unwrap().join("\n");
    let found = (0..100).any(|_| {
        if text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
        false
    });
    assert!(found, "the step log never said {needle:?}:\n{}", text());
    text()
}

/// Removes the Docker tags and containerd image records a test made.
struct Cleanup {
    docker: Vec<String>,
    containerd: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.containerd {
            let _ = ctr(&["images", "rm", name]);
        }
        for tag in &self.docker {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
    }
}

fn connect(rt: &tokio::runtime::Runtime) -> Containerd {
    within(
        rt,
        "connecting to containerd",
        Containerd::connect(Path::new(SOCKET), NAMESPACE, "overlayfs"),
    )
    .expect("connect to containerd")
}

/// The row of `ctr images check` for `name`.
fn ctr_check_row(name: &str) -> String {
    let (ok, out, err) = ctr(&["images", "check", &format!("name=={name}")]);
    assert!(ok, "ctr images check failed: {err}");
    out.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("ctr images check does not list {name}:\n{out}"))
        .to_string()
}

#[test]
fn docker_image_is_streamed_into_containerd_unpacked_runnable_and_pinned() {
    require_docker();
    require_containerd();
    let id = unique_name("unidesk-import-t1");
    let tag = format!("{id}:v1");
    let commit = fake_commit(&id);
    // Layers: the health file; then a file, its removal and the same file again, so the third
    // and fifth layers are identical and Docker's export holds a symlinked layer.tar.
    let dockerfile = format!(
        "FROM {BASE_IMAGE}\n\
         RUN mkdir -p /www && printf '{{\"deploy\":{{\"commit\":\"{commit}\"}}}}' > /www/health\n\
         RUN echo {id} > /same && touch -d @0 /same\n\
         RUN rm /same\n\
         RUN echo {id} > /same && touch -d @0 /same\n\
         LABEL unidesk.ai/source-commit={commit}\n"
    );
    build_image(&tag, &dockerfile);
    let name = normalize(&tag).unwrap();
    let _cleanup = Cleanup {
        docker: vec![tag.clone()],
        containerd: vec![name.clone()],
    };
    let diff_ids: Vec<String> = serde_json::from_str(&docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RootFS.Layers}}",
        &tag,
    ]))
    .unwrap();
    let unique_layers: std::collections::HashSet<&String> = diff_ids.iter().collect();
    assert!(
        unique_layers.len() < diff_ids.len(),
        "expected two identical layers in {diff_ids:?}"
    );

    let rt = runtime();
    let cd = connect(&rt);
    let docker_api = bollard::Docker::connect_with_local_defaults().unwrap();
    let (log, lines) = collecting_log(&rt, |_| {});
    let report = within(
        &rt,
        "the import",
        cd.import_from_docker(
            &docker_api,
            &tag,
            std::slice::from_ref(&tag),
            &log,
            &CancellationToken::new(),
        ),
    )
    .unwrap_or_else(|e| panic!("import failed: {e}"));
    assert_eq!(report.names, vec![name.clone()]);
    assert!(report.exported);
    assert_eq!(report.layers, diff_ids.len());
    assert_eq!(
        report.blobs_written + report.blobs_skipped,
        unique_layers.len() + 2,
        "{report:?}"
    );
    // The health and /same layers hold this test's id, so they are new, and so are the config
    // and manifest (the base layer may be there from earlier imports).
    assert!(report.blobs_written >= 4, "{report:?}");
    assert!(report.bytes_written > 0);
    assert!(report.layers_unpacked >= diff_ids.len() - 1, "{report:?}");
    let text = log_with(&lines, "imported ");
    assert!(text.contains("writing"), "no progress lines:\n{text}");
    assert!(text.contains("written ("), "no per-layer lines:\n{text}");
    assert!(text.contains("unpacked"), "no unpack lines:\n{text}");
    assert!(
        text.contains("symlink"),
        "the symlinked layer was not seen:\n{text}"
    );
    assert!(text.contains("import_export=streaming"), "{text}");

    // The operator's view: complete, unpacked, runnable, pinned.
    let row = ctr_check_row(&name);
    assert!(row.contains("complete ("), "not complete: {row}");
    assert!(row.trim_end().ends_with("true"), "not unpacked: {row}");
    let (ok, out, err) = ctr(&[
        "run",
        "--rm",
        &name,
        &unique_name("unidesk-import-run"),
        "cat",
        "/www/health",
    ]);
    assert!(ok, "ctr run failed: {err}");
    assert_eq!(
        out.trim(),
        format!("{{\"deploy\":{{\"commit\":\"{commit}\"}}}}")
    );
    let (ok, out, err) = ctr(&["images", "ls", &format!("name=={name}")]);
    assert!(ok, "ctr images ls failed: {err}");
    assert!(
        out.contains("io.cri-containerd.pinned=pinned")
            && out.contains("io.cri-containerd.image=managed"),
        "labels missing: {out}"
    );

    // The product's own view agrees, and the config proves the commit.
    let check = within(&rt, "check", cd.check(&tag)).unwrap();
    assert!(check.complete && check.unpacked, "{check:?}");
    assert_eq!(check.target, report.manifest_digest);
    assert_eq!(check.labels["io.cri-containerd.pinned"], "pinned");
    let labels = within(&rt, "config labels", cd.config_labels(&tag)).unwrap();
    assert_eq!(labels["unidesk.ai/source-commit"], commit);

    // A second import transfers nothing and does not even read Docker's export.
    let (log2, lines2) = collecting_log(&rt, |_| {});
    let again = within(
        &rt,
        "the re-import",
        cd.import_from_docker(
            &docker_api,
            &tag,
            std::slice::from_ref(&tag),
            &log2,
            &CancellationToken::new(),
        ),
    )
    .unwrap();
    assert_eq!(again.blobs_written, 0, "{again:?}");
    assert_eq!(again.bytes_written, 0, "{again:?}");
    assert_eq!(again.layers_unpacked, 0, "{again:?}");
    assert!(!again.exported, "{again:?}");
    assert_eq!(again.manifest_digest, report.manifest_digest);
    log_with(&lines2, "import_export=skipped-all-present");
}

#[test]
fn cancelled_import_leaves_no_image_record() {
    require_docker();
    require_containerd();
    let id = unique_name("unidesk-import-cancel");
    let tag = format!("{id}:v1");
    // Incompressible layers large enough that the import is still streaming when cancelled.
    build_image(
        &tag,
        &format!(
            "FROM {BASE_IMAGE}\nRUN head -c 48m /dev/urandom > /a\nRUN head -c 48m /dev/urandom > /b\n"
        ),
    );
    let name = normalize(&tag).unwrap();
    let _cleanup = Cleanup {
        docker: vec![tag.clone()],
        containerd: vec![name.clone()],
    };
    let rt = runtime();
    let cd = connect(&rt);
    let docker_api = bollard::Docker::connect_with_local_defaults().unwrap();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    // Cancel as soon as the first layer starts streaming.
    let (log, lines) = collecting_log(&rt, move |line| {
        if line.ends_with(": writing") {
            trigger.cancel();
        }
    });
    let result = within(
        &rt,
        "the cancelled import",
        cd.import_from_docker(&docker_api, &tag, std::slice::from_ref(&tag), &log, &cancel),
    );
    let text = log_with(&lines, "import failed");
    assert!(
        matches!(result, Err(ContainerdError::Cancelled { .. })),
        "expected a cancelled import, got {result:?}\n{text}"
    );
    assert!(
        text.contains(": writing"),
        "it never started streaming:\n{text}"
    );
    assert!(
        !within(&rt, "has_image", cd.has_image(&tag)).unwrap(),
        "an image record was made for a cancelled import"
    );
    let (ok, out, _) = ctr(&["images", "ls", "-q", &format!("name=={name}")]);
    assert!(ok && out.trim().is_empty(), "ctr lists {name}: {out}");
}

#[test]
fn pause_image_is_pulled_through_the_tunnel_and_judged_by_its_entrypoint() {
    require_docker();
    require_containerd();
    let registry = Registry::start();
    let id = unique_name("unidesk-pause");
    let fake_local = format!("{id}-fake:build");
    let good_local = format!("{id}-good:build");
    build_image(
        &fake_local,
        &format!("FROM {BASE_IMAGE}\nENTRYPOINT [\"sleep\",\"3600\"]\n"),
    );
    // A layer of its own (the id), so nothing of it is in containerd from an earlier run.
    build_image(
        &good_local,
        &format!(
            "FROM {BASE_IMAGE}\nRUN cp /bin/busybox /pause && echo {id} > /id\n\
             ENTRYPOINT [\"/pause\"]\n"
        ),
    );
    let fake = registry.push(&fake_local, &format!("{id}/fake-pause:3.6"));
    let good = registry.push(&good_local, &format!("{id}/pause:3.6"));
    let _cleanup = Cleanup {
        docker: vec![fake_local, good_local, fake.clone(), good.clone()],
        containerd: vec![normalize(&fake).unwrap(), normalize(&good).unwrap()],
    };

    // The agent's egress proxy, whose tunnel's controller allows 127.0.0.0/8.
    let setup = Setup::new(&["node"]);
    let controller = setup.controller();
    let _agent = setup.agent("node");
    setup.wait_agents(&["node"]);
    let proxy = format!(
        "http://{}",
        unidesk_agent::config::AgentConfig::load(&setup.agent_config("node"))
            .unwrap()
            .proxy
            .listen
    );

    let rt = runtime();
    let cd = connect(&rt);
    let (log, lines) = collecting_log(&rt, |_| {});
    let refused = within(
        &rt,
        "the fake pull",
        cd.ensure_pause(&fake, Some(&proxy), &log),
    );
    match &refused {
        Err(e @ ContainerdError::NotPause { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("[\"sleep\",\"3600\"]") && text.contains("/pause"),
                "{text}"
            );
        }
        other => panic!("the fake pause image was not refused: {other:?}"),
    }
    assert!(
        !within(&rt, "has_image", cd.has_image(&fake)).unwrap(),
        "the fake pause image was recorded"
    );

    let report = within(
        &rt,
        "the pause pull",
        cd.ensure_pause(&good, Some(&proxy), &log),
    )
    .unwrap_or_else(|e| {
        panic!(
            "pull failed: {e}\ncontroller log:\n{}",
            controller.log_text()
        )
    });
    assert!(!report.already_present);
    assert!(report.blobs_written >= 3, "{report:?}");
    let check = within(&rt, "check", cd.check(&good)).unwrap();
    assert!(check.complete && check.unpacked, "{check:?}");
    assert_eq!(check.labels["io.cri-containerd.pinned"], "pinned");
    let row = ctr_check_row(&normalize(&good).unwrap());
    assert!(
        row.contains("complete (") && row.trim_end().ends_with("true"),
        "{row}"
    );
    // The bytes came through the tunnel: the controller dialled the registry.
    let clog = controller.log_text();
    assert!(
        clog.contains("egress connected") && clog.contains(&registry.addr),
        "the controller never dialled the registry {}:\n{clog}",
        registry.addr
    );
    // Present now: nothing is pulled again.
    let again = within(
        &rt,
        "the second ensure",
        cd.ensure_pause(&good, Some(&proxy), &log),
    )
    .unwrap();
    assert!(again.already_present, "{again:?}");
    log_with(&lines, "pause_image=present");
}
