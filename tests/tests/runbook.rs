//! `docs/runbook.md` runs as written: its fenced `sh` blocks, in order, in one `bash` with
//! `set -euo pipefail`, against a real controller and agent, a real Git server, Docker and
//! Compose — twice. From the binaries (installed by the runbook itself into a temporary bin
//! directory) on this machine; and from the Debian packages inside a container booted with
//! systemd ([`Booted`]), where a step's `# needs: package` block takes the place of its
//! build block (`dpkg -i`, `systemctl enable --now`, …). The runbook's `site` block runs
//! first; the test then sets its sandbox's values for the variables that block defines. Every
//! block runs in one of the two, and the test checks what each left behind.
#![allow(clippy::disallowed_methods)] // The runbook's shell and `kill` run as processes.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use crate::support::booted::{Booted, PACKAGES};
use crate::support::service::{
    ComposeService, ComposeSpec, SampleRepo, Served, dockerfile, health, require_docker,
    serve_previous_version,
};
use crate::support::{bin, free_port, path, wait_for};

/// The marker of a step's block for the packages, which replaces its build block there.
const NEEDS_PACKAGE: &str = "# needs: package";

/// One fenced `sh` block of the runbook.
#[derive(Debug, Clone)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The `# step: NAME` of the block, if it has one.
    step: Option<String>,
    needs_package: bool,
    text: String,
}

/// How the runbook is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Install {
    /// From a build, on this machine: the blocks without `# needs: package`.
    Binaries,
    /// From the `.deb` packages under systemd: a step's package block where it has one.
    Packages,
}

/// The blocks followed for `install`, in order.
fn followed(all: &[Block], install: Install) -> Vec<&Block> {
    all.iter()
        .filter(|b| match install {
            Install::Binaries => !b.needs_package,
            Install::Packages => {
                b.needs_package
                    || !all
                        .iter()
                        .any(|p| p.needs_package && p.step.is_some() && p.step == b.step)
            }
        })
        .collect()
}

fn runbook_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbook.md")
}

/// The `sh` blocks of a Markdown text, in order.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<(usize, Vec<&str>)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut open {
            None if line.trim_end() == "```sh" => open = Some((i + 1, Vec::new())),
            None => {}
            Some((start, lines)) if line.trim_end() == "```" => {
                let header: Vec<&str> = lines
                    .iter()
                    .take_while(|l| l.starts_with('#'))
                    .copied()
                    .collect();
                found.push(Block {
                    line: *start,
                    step: header
                        .iter()
                        .find_map(|l| l.strip_prefix("# step:"))
                        .map(|s| s.trim().to_string()),
                    needs_package: header.iter().any(|l| l.trim() == NEEDS_PACKAGE),
                    text: lines.join("\n"),
                });
                open = None;
            }
            Some((_, lines)) => lines.push(line),
        }
    }
    assert!(open.is_none(), "an unclosed ```sh block in the runbook");
    found
}

/// A `bash` reading its script from a pipe; each block's stdout and stderr go to files and a
/// marker line on bash's stdout says the block finished.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    dir: PathBuf,
    count: usize,
}

impl Shell {
    /// `bash` on this machine, in `dir`.
    fn start(dir: &Path) -> Shell {
        let mut bash = Command::new("bash");
        bash.current_dir(dir);
        Shell::start_with(bash, dir)
    }

    /// `bash` started by `command` (a `bash` or an `nsenter … bash`); `dir` must be the
    /// same path for it and for this test.
    fn start_with(mut command: Command, dir: &Path) -> Shell {
        let mut child = command
            .args(["--noprofile", "--norc", "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("bash.stderr")).unwrap())
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shell = Shell {
            child,
            stdin,
            lines,
            dir: dir.to_path_buf(),
            count: 0,
        };
        shell.send("set -euo pipefail\n");
        shell
    }

    fn send(&mut self, text: &str) {
        self.stdin
            .write_all(text.as_bytes())
            .and_then(|()| self.stdin.flush())
            .expect("write to bash");
    }

    /// Runs `script` in the shell (its variables stay set) and returns what it printed;
    /// fails the test, with that output, when it fails or outlasts `limit`.
    fn run(&mut self, name: &str, script: &str, limit: Duration) -> String {
        self.count += 1;
        let out = self.dir.join(format!("{:02}-{name}.out", self.count));
        let err = self.dir.join(format!("{:02}-{name}.err", self.count));
        let marker = format!("__runbook_block_{}_done__", self.count);
        // Braces, not a subshell, so assignments stay; stdin from /dev/null so no command
        // reads the script that bash is reading from the pipe.
        self.send(&format!(
            "{{\n{script}\n}} </dev/null >'{}' 2>'{}'\necho {marker}\n",
            out.display(),
            err.display()
        ));
        let stdout = || std::fs::read_to_string(&out).unwrap_or_default();
        let output = || {
            format!(
                "stdout:\n{}\nstderr:\n{}",
                stdout(),
                std::fs::read_to_string(&err).unwrap_or_default()
            )
        };
        match self.lines.recv_timeout(limit) {
            Ok(line) if line == marker => stdout(),
            Ok(other) => panic!("block {name}: unexpected shell output {other:?}"),
            Err(RecvTimeoutError::Timeout) => {
                panic!("block {name} still running after {limit:?}:\n{}", output())
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!(
                    "block {name} failed (bash exited {status:?}):\n{}\n{}",
                    output(),
                    std::fs::read_to_string(self.dir.join("bash.stderr")).unwrap_or_default()
                )
            }
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the processes the runbook started in the background (its pid files), also when the
/// test fails half way.
struct Background(PathBuf);

impl Drop for Background {
    fn drop(&mut self) {
        for name in ["agent.pid", "controller.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.0.join(name)) {
                let _ = Command::new("kill")
                    .args(["-9", pid.trim()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

#[test]
fn runbook_blocks_are_named_and_package_blocks_marked() {
    let text = std::fs::read_to_string(runbook_path()).unwrap();
    let all = blocks(&text);
    assert!(all.len() >= 10, "{all:#?}");
    for b in &all {
        assert!(
            b.step.is_some(),
            "the block at line {} has no `# step: NAME`",
            b.line
        );
    }
    assert_eq!(
        all[0].step.as_deref(),
        Some("site"),
        "the site block comes first"
    );
    for install in [Install::Binaries, Install::Packages] {
        let mut names = BTreeSet::new();
        for b in followed(&all, install) {
            let step = b.step.clone().unwrap();
            assert!(
                names.insert(step.clone()),
                "step {step} has two blocks for {install:?} (line {})",
                b.line
            );
        }
    }
    for b in all.iter().filter(|b| b.needs_package) {
        assert!(
            ["dpkg", "systemctl", "--packaged"]
                .iter()
                .any(|w| b.text.contains(w)),
            "a `needs: package` block at line {} that uses no package: {}",
            b.line,
            b.text
        );
    }
    // Every block is followed by one of the two.
    let both: BTreeSet<usize> = [Install::Binaries, Install::Packages]
        .into_iter()
        .flat_map(|i| followed(&all, i).into_iter().map(|b| b.line))
        .collect();
    assert_eq!(both.len(), all.len(), "{all:#?}");
}

/// The service the runbook deploys: a sample repository on the product's Git server, its
/// first version running under Compose, a catalog and a `deploy.json` naming a new commit.
struct Site {
    _repo: SampleRepo,
    _served: Served,
    _compose: ComposeService,
    port: u16,
    commit: String,
    catalog: PathBuf,
    deploy_json: PathBuf,
}

/// `tag` keeps the Compose projects of tests running at once apart.
fn site(dir: &Path, agent: &str, tag: &str) -> Site {
    require_docker();
    let git_root = dir.join("git");
    std::fs::create_dir_all(&git_root).unwrap();
    let repo = SampleRepo::create(&git_root, "runbook").unwrap();
    let served = Served::start(&git_root);
    let port = free_port();
    let project = format!("unidesk-test-runbook-{tag}-{}", std::process::id());
    let image = format!("{project}-web:latest");
    let compose = serve_previous_version(dir, &project, &image, port, Duration::from_secs(20));
    let commit = repo
        .commit(
            "runbook version",
            &[
                (
                    "Dockerfile",
                    &dockerfile(port, "$UNIDESK_DEPLOY_COMMIT", ""),
                ),
                ("index.html", "runbook"),
            ],
        )
        .unwrap()
        .to_string();
    let spec = ComposeSpec {
        id: "runbook-web",
        repo_url: &served.server.url("runbook.git"),
        node: agent,
        image: &image,
        project: &project,
        port,
        build_timeout_ms: 300_000,
    };
    let catalog = dir.join("config.json");
    spec.write_catalog(&catalog);
    let deploy_json = dir.join("deploy.json");
    spec.write_manifest(&deploy_json, &commit);
    Site {
        _repo: repo,
        _served: served,
        _compose: compose,
        port,
        commit,
        catalog,
        deploy_json,
    }
}

fn stored_events(job_dir: &Path) -> usize {
    std::fs::read_to_string(job_dir.join("events.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Where the test finds, on this machine, what the followed runbook left behind.
struct View {
    /// `$UNIDESK_ETC`: controller.toml, the agent configs `init` and `agent add` wrote.
    etc: PathBuf,
    /// `$AGENT_ETC`: the node's copy of its agent config.
    node_etc: PathBuf,
    /// The controller's job store.
    jobs: PathBuf,
    /// Where the install put the two binaries.
    installed: PathBuf,
}

/// The variables every install sets to the sandbox's values.
fn common_sandbox(agent: &str, dir: &Path, site: &Site) -> String {
    format!(
        "CONTROLLER_LISTEN='127.0.0.1:{listen}'\n\
         EGRESS_ALLOW=('127.0.0.1:*' 'localhost:*' 'cidr:127.0.0.0/8')\n\
         AGENT_ID='{agent}'\n\
         AGENT_PROXY_PORT='{proxy}'\n\
         UNIDESK_LOGS='{logs}'\n\
         DEPLOY_JSON='{deploy}'\n\
         CATALOG='{catalog}'\n",
        listen = free_port(),
        proxy = free_port(),
        logs = path(&dir.join("logs")),
        deploy = path(&site.deploy_json),
        catalog = path(&site.catalog),
    )
}

#[test]
fn every_runbook_command_runs_against_a_real_controller_agent_and_git() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agent = "node1";
    let site = site(dir, agent, "bin");
    let build_dir = bin("unidesk-controller").parent().unwrap().to_path_buf();
    bin("unidesk-agent");
    let etc = dir.join("etc");
    let _background = Background(dir.join("logs"));
    // The sandbox's values for the variables of the `site` block.
    let sandbox = format!(
        "{common}\
         UNIDESK_ETC='{etc}'\n\
         AGENT_ETC='{node}'\n\
         AGENT_RUNS=\"$AGENT_ETC/agent-$AGENT_ID/runs\"\n\
         UNIDESK_BUILD='{build}'\n\
         UNIDESK_BIN='{bin}'\n\
         CONFIG=\"$UNIDESK_ETC/controller.toml\"\n\
         PATH=\"$UNIDESK_BIN:$PATH\"\n",
        common = common_sandbox(agent, dir, &site),
        etc = path(&etc),
        node = path(&dir.join("node")),
        build = path(&build_dir),
        bin = path(&dir.join("bin")),
    );
    let view = View {
        jobs: etc.join("state/jobs"),
        node_etc: dir.join("node"),
        installed: dir.join("bin"),
        etc,
    };
    follow(
        Install::Binaries,
        Shell::start(dir),
        &sandbox,
        &view,
        &site,
        |_, _, _| {},
    );
}

#[test]
fn the_runbook_runs_from_the_packages_under_systemd() {
    let _only = PACKAGES.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agent = "node1";
    let site = site(dir, agent, "deb");
    // The packages of the binaries the tests run (as the packaging test makes them), in the
    // directory the runbook's `dpkg -i` runs in.
    let profile_dir = bin("unidesk-agent").parent().unwrap().to_path_buf();
    let profile = if profile_dir.ends_with("release") {
        "release"
    } else {
        "dev"
    };
    let packaged = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package"))
        .args(["--profile", profile, "--fast", "--no-build", "--out"])
        .arg(dir)
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .output()
        .expect("scripts/package");
    assert!(
        packaged.status.success(),
        "scripts/package: {}",
        String::from_utf8_lossy(&packaged.stderr)
    );

    let container = Booted::boot(&[dir]);
    let sandbox = format!(
        "{common}\
         UNIDESK_ETC=/etc/unidesk\n\
         AGENT_ETC=/etc/unidesk\n\
         AGENT_RUNS=/var/lib/unidesk-agent/runs\n\
         CONFIG=\"$UNIDESK_ETC/controller.toml\"\n",
        common = common_sandbox(agent, dir, &site),
    );
    let view = View {
        etc: container.host_path("/etc/unidesk"),
        node_etc: container.host_path("/etc/unidesk"),
        jobs: container.host_path("/var/lib/unidesk/jobs"),
        installed: container.host_path("/usr/bin"),
    };
    let shell = Shell::start_with(container.command(dir, "bash"), dir);
    follow(
        Install::Packages,
        shell,
        &sandbox,
        &view,
        &site,
        |shell, step, _| {
            // What systemd says of the units, beyond the runbook's own checks.
            let units = |shell: &mut Shell, name: &str| {
                shell.run(
                    name,
                    "systemctl show unidesk-controller unidesk-agent \
                     -p Id -p ActiveState -p SubState -p User -p NRestarts -p Type",
                    Duration::from_secs(30),
                )
            };
            match step {
                "controller-start" => {
                    let out = units(shell, "units-controller");
                    let unit = "unidesk-controller.service";
                    assert_eq!(unit_state(&out, unit, "ActiveState"), "active", "{out}");
                    assert_eq!(unit_state(&out, unit, "User"), "unidesk", "{out}");
                    assert_eq!(unit_state(&out, unit, "Type"), "notify", "{out}");
                }
                "agent-install" => {
                    let out = units(shell, "units-agent");
                    for (unit, user) in [
                        ("unidesk-controller.service", "unidesk"),
                        ("unidesk-agent.service", "unidesk-agent"),
                    ] {
                        assert_eq!(unit_state(&out, unit, "ActiveState"), "active", "{out}");
                        assert_eq!(unit_state(&out, unit, "SubState"), "running", "{out}");
                        assert_eq!(unit_state(&out, unit, "User"), user, "{out}");
                        assert_eq!(unit_state(&out, unit, "NRestarts"), "0", "{out}");
                    }
                }
                "stop" => {
                    let out = units(shell, "units-stopped");
                    for unit in ["unidesk-controller.service", "unidesk-agent.service"] {
                        assert_eq!(unit_state(&out, unit, "ActiveState"), "inactive", "{out}");
                    }
                }
                _ => {}
            }
        },
    );
    drop(container);
}

/// A property of one unit in `systemctl show` output (units separated by blank lines).
fn unit_state(show: &str, unit: &str, property: &str) -> String {
    show.split("\n\n")
        .find(|section| section.lines().any(|l| l == format!("Id={unit}")))
        .and_then(|section| {
            section
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{property}=")))
        })
        .unwrap_or_else(|| panic!("no {property} of {unit} in:\n{show}"))
        .to_string()
}

/// Follows the runbook's blocks for `install` in `shell`, checking after each step what it left
/// behind (`view`) and what `extra` checks for that install.
fn follow(
    install: Install,
    mut shell: Shell,
    sandbox: &str,
    view: &View,
    site: &Site,
    extra: impl Fn(&mut Shell, &str, &str),
) {
    let text = std::fs::read_to_string(runbook_path()).unwrap();
    let all = blocks(&text);
    let mut ran = BTreeSet::new();
    let mut stuck_job = String::new();
    for block in followed(&all, install) {
        let step = block
            .step
            .clone()
            .expect("named (checked by the other test)");
        let limit = if step == "deploy" {
            Duration::from_secs(600)
        } else {
            Duration::from_secs(120)
        };
        if step == "stuck-job" {
            // A job that stays running: a probe echoing more lines than it will ever finish.
            let out = shell.run(
                "stuck-probe",
                "unidesk-controller probe --agent \"$AGENT_ID\" --echo-lines 50000000 \
                 --config \"$CONFIG\"",
                limit,
            );
            let job: serde_json::Value = serde_json::from_str(&out).unwrap();
            stuck_job = job["jobId"].as_str().unwrap().to_string();
            let job_dir = view.jobs.join(&stuck_job);
            wait_for("the stuck job to run", Duration::from_secs(30), || {
                (stored_events(&job_dir) > 100).then_some(())
            });
            shell.run(
                "stuck-job-id",
                &format!("STUCK_JOB_ID='{stuck_job}'"),
                limit,
            );
        }
        let out = shell.run(&step, &block.text, limit);
        if step == "site" {
            shell.run("sandbox", sandbox, limit);
        }
        check_step(&step, &out, view, site, &stuck_job);
        extra(&mut shell, &step, &out);
        ran.insert(step);
    }
    let expected: BTreeSet<String> = [
        "site",
        "controller-install",
        "controller-init",
        "controller-start",
        "enrol",
        "agent-install",
        "agent-verify",
        "deploy",
        "read-result",
        "stuck-job",
        "rotate",
        "rotate-restart",
        "revoke",
        "stop",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        ran, expected,
        "the runbook's steps and the ones this test checks differ ({install:?})"
    );
}

/// What each step must have done, beyond exiting 0.
fn check_step(step: &str, out: &str, view: &View, site: &Site, stuck_job: &str) {
    let etc = &view.etc;
    let agent_config = etc.join("agent-node1.toml");
    match step {
        "controller-install" => assert!(view.installed.join("unidesk-controller").exists()),
        "controller-init" => {
            assert!(etc.join("controller.toml").exists(), "{out}");
            assert!(
                out.contains("gateway.listen") && out.contains("can be bound"),
                "{out}"
            );
        }
        "controller-start" => assert!(
            out.contains("served by the running controller")
                && out.contains("a controller answers on"),
            "{out}"
        ),
        "enrol" => {
            let value: serde_json::Value = serde_json::from_str(out).unwrap();
            let secret = value["secret"].as_str().unwrap();
            let written = std::fs::read_to_string(&agent_config).unwrap();
            assert!(written.contains(secret), "{written}");
            let controller = std::fs::read_to_string(etc.join("controller.toml")).unwrap();
            assert!(!controller.contains(secret), "{controller}");
        }
        "agent-install" => assert!(view.installed.join("unidesk-agent").exists()),
        "agent-verify" => {
            let row = out
                .lines()
                .find(|l| l.starts_with("node1 "))
                .unwrap_or_else(|| panic!("no node1 row: {out}"));
            assert!(row.contains("true"), "node1 connected: {out}");
            assert!(out.contains("controller"), "the agent's check ran: {out}");
        }
        "deploy" => {
            assert!(out.contains("job job-") && out.contains(" run "), "{out}");
            let body = health(site.port).unwrap_or_default();
            assert!(body.contains(&site.commit), "the new commit serves: {body}");
        }
        "read-result" => {
            assert!(out.contains("succeeded"), "{out}");
            assert!(out.contains(&site.commit), "{out}");
            assert!(
                out.contains("result.json") && out.contains("build.log"),
                "{out}"
            );
        }
        "stuck-job" => {
            let record: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(view.jobs.join(stuck_job).join("job.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(record["status"], "cancelled", "{record}");
            assert!(
                record["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("stuck: cancelled by the operator"),
                "{record}"
            );
        }
        "rotate" => {
            let value: serde_json::Value = serde_json::from_str(out).unwrap();
            let secret = value["secret"].as_str().unwrap();
            // The node's copy, which the agent runs with.
            let node = view.node_etc.join("agent-node1.toml");
            let written = std::fs::read_to_string(&node).unwrap();
            assert!(
                written.contains(secret),
                "{} has the new secret",
                node.display()
            );
        }
        "revoke" => {
            let row = out
                .lines()
                .find(|l| l.starts_with("main "))
                .unwrap_or_else(|| panic!("no main row: {out}"));
            assert!(row.contains("true"), "main revoked: {out}");
        }
        _ => {}
    }
}
