//! Packaging: the binaries speak systemd's notify protocol (`Type=notify`: `READY=1` once they
//! can work, `WATCHDOG=1` at half of `WATCHDOG_USEC`), and the shipped units, sysusers and
//! tmpfiles snippets pass systemd's own checks. The default configurations load with the real
//! loaders and hold the defaults, and the README documents every key; the `.deb` packages
//! build, install into this machine with `dpkg -i`, put every file where the units expect it,
//! and purge clean.
#![allow(clippy::disallowed_methods)] // The binaries and systemd's tools run as processes.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use unidesk_agent::config::{AgentConfig, DEFAULT_CONFIG as DEFAULT_AGENT_CONFIG};
use unidesk_controller::config::{ControllerConfig, DEFAULT_CONFIG as DEFAULT_CONTROLLER_CONFIG};

use crate::support::{Proc, Setup, bin};

/// Where the packaging files are, from the tests crate.
fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(name)
}

/// Starts `binary args…` with a notify socket and a 200 ms watchdog, and collects what it
/// sends for up to `limit` or until it has sent READY=1 and two watchdog pings.
fn notifications(binary: &str, args: &[&str], dir: &Path, limit: Duration) -> Vec<String> {
    let socket_path = dir.join(format!("{binary}-notify.sock"));
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.join(format!("{binary}.log"));
    let child = Command::new(bin(binary))
        .args(args)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the binary");
    let mut proc = Proc { child, log };
    let mut seen = Vec::new();
    let until = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        let ready = seen.iter().any(|m| m.contains("READY=1"));
        let pings = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
        if ready && pings >= 2 {
            break;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!(
                "{binary} exited ({status}) before notifying: {}",
                proc.log_text()
            );
        }
    }
    proc.kill();
    seen
}

fn assert_ready_then_pings(binary: &str, seen: &[String]) {
    let ready = seen
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("{binary} never sent READY=1: {seen:?}"));
    let pings_after = seen[ready..]
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        pings_after >= 2,
        "{binary} sent {pings_after} watchdog pings after READY=1: {seen:?}"
    );
    assert!(
        seen[..ready].iter().all(|m| !m.contains("WATCHDOG=1")),
        "no watchdog ping before readiness: {seen:?}"
    );
}

#[test]
fn agent_notifies_readiness_then_pings_the_watchdog() {
    let setup = Setup::new(&["node"]);
    // No controller runs: the agent is ready once its proxy listens, and keeps dialling.
    let config = setup.agent_config("node");
    let seen = notifications(
        "unidesk-agent",
        &["run", "--config", config.to_str().unwrap()],
        &setup.dir,
        Duration::from_secs(20),
    );
    assert_ready_then_pings("unidesk-agent", &seen);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=agent node")),
        "{seen:?}"
    );
}

/// The agent's stderr for its first seconds of `run` (no controller: it logs its dialling),
/// with `env` set and `UNIDESK_LOG_FORMAT`/`JOURNAL_STREAM` otherwise removed.
fn agent_log_lines(setup: &Setup, name: &str, env: &[(&str, &str)]) -> Vec<String> {
    let log = setup.dir.join(format!("agent-{name}.log"));
    let config = setup.agent_config("node");
    let mut cmd = Command::new(bin("unidesk-agent"));
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .env_remove("UNIDESK_LOG_FORMAT")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut proc = Proc {
        child: cmd.spawn().expect("start the agent"),
        log,
    };
    let until = Instant::now() + Duration::from_secs(20);
    while proc.log_text().lines().count() < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    proc.kill();
    let lines: Vec<String> = proc.log_text().lines().map(str::to_owned).collect();
    assert!(lines.len() >= 2, "{name}: the agent logged {lines:?}");
    lines
}

#[test]
fn log_lines_follow_the_requested_format_and_suit_the_journal_under_systemd() {
    let setup = Setup::new(&["node"]);
    for line in agent_log_lines(&setup, "json", &[("UNIDESK_LOG_FORMAT", "json")]) {
        let value: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object a line ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
    // systemd sets JOURNAL_STREAM when stderr is the journal; the journal stamps lines itself.
    for line in agent_log_lines(&setup, "journal", &[("JOURNAL_STREAM", "8:12345")]) {
        assert!(
            !line.starts_with("20"),
            "a timestamp in a journal line: {line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "colours in a journal line: {line:?}"
        );
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG"]
                .iter()
                .any(|l| line.trim_start().starts_with(l)),
            "{line}"
        );
    }
    for line in agent_log_lines(&setup, "human", &[]) {
        assert!(
            line.starts_with("20"),
            "a human line starts with its time: {line}"
        );
    }
    // A format nobody knows is named, and the agent still logs.
    let lines = agent_log_lines(&setup, "unknown", &[("UNIDESK_LOG_FORMAT", "xml")]);
    assert!(
        lines[0].contains("UNIDESK_LOG_FORMAT=\"xml\" is not `human` or `json`"),
        "{lines:?}"
    );
}

#[test]
fn controller_notifies_readiness_then_pings_the_watchdog() {
    let setup = Setup::new(&["node"]);
    let config = setup.controller_config();
    let seen = notifications(
        "unidesk-controller",
        &["serve", "--config", config.to_str().unwrap()],
        &setup.dir,
        Duration::from_secs(20),
    );
    assert_ready_then_pings("unidesk-controller", &seen);
}

#[test]
fn units_sysusers_and_tmpfiles_pass_systemds_checks() {
    let dir = tempfile::tempdir().unwrap();
    for (unit, binary) in [
        ("unidesk-agent.service", "unidesk-agent"),
        ("unidesk-controller.service", "unidesk-controller"),
    ] {
        let text = std::fs::read_to_string(packaging(unit)).unwrap();
        for directive in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "ReadWritePaths=",
            "ProtectHome=true",
            "PrivateTmp=true",
            "ProtectKernelTunables=true",
            "ProtectKernelModules=true",
            "RestrictAddressFamilies=",
        ] {
            assert!(text.contains(directive), "{unit} lacks {directive}");
        }
        // The packaged path is /usr/bin; verify against the binary this build made.
        let path = dir.path().join(unit);
        std::fs::write(
            &path,
            text.replace(&format!("/usr/bin/{binary}"), bin(binary).to_str().unwrap()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze is installed (Debian's systemd package)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{unit}: {said}");
        assert!(
            !said.contains(unit),
            "systemd-analyze has remarks on {unit}: {said}"
        );
    }
    let agent = std::fs::read_to_string(packaging("unidesk-agent.service")).unwrap();
    assert!(agent.contains("SupplementaryGroups=docker"));
    assert!(agent.contains("User=unidesk-agent"));

    for package in ["unidesk-agent", "unidesk-controller"] {
        let sysusers = packaging(&format!("{package}.sysusers"))
            .canonicalize()
            .unwrap();
        let out = Command::new("systemd-sysusers")
            .arg("--dry-run")
            .arg(&sysusers)
            .output()
            .expect("systemd-sysusers is installed");
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{package}: {said}");
        assert!(
            !said.contains("ignoring") && !said.contains("Failed"),
            "sysusers accepts every line of {package}.sysusers: {said}"
        );
    }
    let agent_tmpfiles = std::fs::read_to_string(packaging("unidesk-agent.tmpfiles")).unwrap();
    assert!(agent_tmpfiles.contains("d /var/lib/unidesk-agent "));
    assert!(agent_tmpfiles.contains("z /etc/unidesk/agent.toml 0640 root unidesk-agent"));
    let controller_tmpfiles =
        std::fs::read_to_string(packaging("unidesk-controller.tmpfiles")).unwrap();
    assert!(controller_tmpfiles.contains("d /var/lib/unidesk "));
    assert!(controller_tmpfiles.contains("z /etc/unidesk/controller.toml 0640 root unidesk"));
}

// ---------------------------------------------------------------------------------------------
// Default configurations (packaging/etc/unidesk/) and the README's key tables.

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A config as JSON, so two loads compare on what they hold (not where they were loaded from).
fn as_json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap()
}

/// Every key of a loaded config, dotted (`link.dead_after_ms`; tables in an array are
/// `agents[].id`).
fn keys_of(value: &serde_json::Value) -> BTreeSet<String> {
    fn walk(prefix: &str, value: &serde_json::Value, keys: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, keys);
                }
            }
            serde_json::Value::Array(items) if items.iter().any(|i| i.is_object()) => {
                for item in items {
                    walk(&format!("{prefix}[]"), item, keys);
                }
            }
            _ => {
                keys.insert(prefix.to_owned());
            }
        }
    }
    let mut keys = BTreeSet::new();
    walk("", value, &mut keys);
    keys
}

/// The keys a TOML file names, set or commented out (`# key = …` under `[table]` or
/// `# [table]`), dotted like [`keys_of`].
fn keys_in_file(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            table = format!("{name}[]");
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" = ")
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            keys.insert(if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    keys
}

/// The keys in the first column of the README table under the heading `### \`{file}\``.
fn readme_keys(file: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let heading = format!("### `{file}`");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README.md has no heading {heading}"));
    let mut keys = BTreeSet::new();
    for line in readme[start + heading.len()..].lines() {
        if line.starts_with('#') {
            break;
        }
        let Some(first) = line
            .strip_prefix("| `")
            .map(|l| l.split(" |").next().unwrap_or(""))
        else {
            continue;
        };
        for (i, part) in format!("`{first}").split('`').enumerate() {
            if i % 2 == 1 {
                keys.insert(part.to_owned());
            }
        }
    }
    keys
}

#[test]
fn packaged_agent_config_loads_and_every_value_in_it_is_the_default() {
    let path = packaging("etc/unidesk/agent.toml");
    let full = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    // Only the keys without a default: whatever the loader fills in must equal the file.
    let dir = tempfile::tempdir().unwrap();
    let minimal = dir.path().join("agent.toml");
    std::fs::write(
        &minimal,
        format!(
            "id = \"{}\"\n[controller]\nurl = \"{}\"\nca = \"{}\"\n\
             [dirs]\nruns = \"{}\"\nwork = \"{}\"\ncache = \"{}\"\n",
            full.id,
            full.controller.url,
            full.controller.ca.display(),
            full.dirs.runs.display(),
            full.dirs.work.display(),
            full.dirs.cache.display(),
        ),
    )
    .unwrap();
    let defaults = AgentConfig::load(&minimal).unwrap();
    assert_eq!(as_json(&full), as_json(&defaults));
    // The places the unit lets the agent write, and the CA beside the config.
    let unit = std::fs::read_to_string(packaging("unidesk-agent.service")).unwrap();
    let writable = unit_values(&unit, "ReadWritePaths");
    for dir in [&full.dirs.runs, &full.dirs.work, &full.dirs.cache] {
        assert!(
            writable.iter().any(|w| dir.starts_with(w)),
            "{} is outside the unit's ReadWritePaths {writable:?}",
            dir.display()
        );
    }
    assert!(full.controller.ca.starts_with("/etc/unidesk"));
    assert!(unit.contains(&format!("--config {}", DEFAULT_AGENT_CONFIG)));
}

#[test]
fn packaged_controller_config_loads_and_every_value_in_it_is_the_default() {
    let path = packaging("etc/unidesk/controller.toml");
    let full = ControllerConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let minimal = dir.path().join("controller.toml");
    std::fs::write(
        &minimal,
        format!(
            "[gateway]\nlisten = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [admin]\nsocket = \"{}\"\n[store]\ndir = \"{}\"\n",
            full.gateway.listen,
            full.gateway.cert.display(),
            full.gateway.key.display(),
            full.admin.socket.display(),
            full.store.dir.display(),
        ),
    )
    .unwrap();
    let defaults = ControllerConfig::load(&minimal).unwrap();
    assert_eq!(as_json(&full), as_json(&defaults));
    // The job store is where the unit may write; the admin socket is in its runtime directory.
    let unit = std::fs::read_to_string(packaging("unidesk-controller.service")).unwrap();
    let writable = unit_values(&unit, "ReadWritePaths");
    assert!(
        writable.iter().any(|w| full.store.dir.starts_with(w)),
        "store.dir {} is outside the unit's ReadWritePaths {writable:?}",
        full.store.dir.display()
    );
    let runtime = unit_values(&unit, "RuntimeDirectory");
    assert!(
        runtime
            .iter()
            .any(|r| full.admin.socket.parent() == Some(&Path::new("/run").join(r))),
        "admin.socket {} is not in the unit's RuntimeDirectory {runtime:?}",
        full.admin.socket.display()
    );
    assert!(unit.contains(&format!("--config {}", DEFAULT_CONTROLLER_CONFIG)));
}

#[test]
fn readme_and_packaged_configs_name_every_key_the_loaders_accept() {
    let dir = tempfile::tempdir().unwrap();
    // The packaged files with the optional keys they leave commented out set as well.
    let agent_text = std::fs::read_to_string(packaging("etc/unidesk/agent.toml")).unwrap();
    let agent_path = dir.path().join("agent.toml");
    std::fs::write(
        &agent_path,
        format!("secret = \"s3cret\"\n{agent_text}").replace(
            "[proxy]\n",
            "[proxy]\ngit_ca = \"/etc/unidesk/git-ca.crt\"\n",
        ),
    )
    .unwrap();
    let agent = AgentConfig::load(&agent_path).unwrap_or_else(|e| panic!("{e}"));
    let controller_text =
        std::fs::read_to_string(packaging("etc/unidesk/controller.toml")).unwrap();
    let controller_path = dir.path().join("controller.toml");
    std::fs::write(
        &controller_path,
        format!(
            "{controller_text}\n[desired]\ncatalog = \"config.json\"\nrepository = \"https://x\"\n\
             [[agents]]\nid = \"d601\"\nsecret_sha256 = \"{}\"\nrevoked = false\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let controller = ControllerConfig::load(&controller_path).unwrap_or_else(|e| panic!("{e}"));

    for (file, text, keys) in [
        ("agent.toml", &agent_text, keys_of(&as_json(&agent))),
        (
            "controller.toml",
            &controller_text,
            keys_of(&as_json(&controller)),
        ),
    ] {
        let in_readme = readme_keys(file);
        let missing: Vec<_> = keys.difference(&in_readme).collect();
        assert!(
            missing.is_empty(),
            "README's {file} table lacks {missing:?}"
        );
        let in_file = keys_in_file(text);
        let missing: Vec<_> = keys.difference(&in_file).collect();
        assert!(
            missing.is_empty(),
            "packaging/etc/unidesk/{file} does not name {missing:?}"
        );
    }
}

/// The values of `key=` lines in a unit, split on spaces.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The .deb packages, built by scripts/package, installed into this machine and purged.

/// What each package installs and runs: package (= binary and unit name), its config loader,
/// and a subcommand whose man page must be there.
const PACKAGES: [(&str, &str); 2] = [
    ("unidesk-agent", "unidesk-agent-run"),
    ("unidesk-controller", "unidesk-controller-deploy-apply"),
];

/// Runs `cmd`; panics naming `what`, the status and the output when it fails. Gives stdout.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Fails, saying what to install, when `program args…` does not run successfully.
fn require(program: &str, args: &[&str], install: &str) {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{program} {}` failed ({}): {}; {install}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("`{program}` cannot run ({e}); {install}"),
    }
}

/// dpkg's status word for `package` (`installed`, `config-files`, …), or `None` when dpkg
/// knows nothing of it.
fn dpkg_status(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .expect("dpkg-query runs");
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !status.is_empty() && status != "not-installed").then_some(status)
}

fn user_exists(user: &str) -> bool {
    Command::new("getent")
        .args(["passwd", user])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Purges the packages (and the system users they created, which Debian's purge keeps) when
/// the test ends, passed or not, so the machine is left as it was.
struct Installed {
    new_users: Vec<&'static str>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .arg("--purge")
            .args(PACKAGES.map(|(p, _)| p))
            .output();
        for user in &self.new_users {
            let _ = Command::new("userdel").arg(user).output();
            let _ = Command::new("groupdel").arg(user).output();
        }
    }
}

#[test]
fn packages_build_install_where_the_units_expect_and_purge_clean() {
    // Not while the runbook test boots a container from an overlay of this machine's `/`.
    let _only = crate::support::booted::PACKAGES
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    require(
        "dpkg",
        &["--version"],
        "install Debian's dpkg (this test installs the packages with dpkg -i)",
    );
    require(
        "cargo",
        &["deb", "--version"],
        "install cargo-deb: bash scripts/testbed-up (or cargo install cargo-deb --locked)",
    );
    require(
        "systemd-analyze",
        &["--version"],
        "install Debian's systemd package",
    );
    for (package, _) in PACKAGES {
        assert_eq!(
            dpkg_status(package),
            None,
            "{package} is on this machine already; this test installs and purges it, so \
             remove it first: dpkg --purge {package}"
        );
    }
    for config in [DEFAULT_AGENT_CONFIG, DEFAULT_CONTROLLER_CONFIG] {
        assert!(
            !Path::new(config).exists(),
            "{config} exists: the package would take it over and the purge remove it; move it \
             away before running this test"
        );
    }
    let etc_existed = Path::new("/etc/unidesk").exists();

    // Package the binaries the tests run, from the same target directory, without building:
    // they are there already (`cargo build --workspace --bins`), and a cargo build started
    // from this process would see cargo test's CARGO_MANIFEST_DIR, rebuild ring and all above
    // it, and relink the binaries the other tests are starting at that moment. A release build of both would add about 15 minutes of CPU on the 2-core
    // test machine; the dev-profile package, stripped, holds the same files.
    let profile_dir = bin("unidesk-agent").parent().unwrap().to_path_buf();
    let target = profile_dir.parent().unwrap();
    let profile = if profile_dir.ends_with("release") {
        "release"
    } else {
        "dev"
    };
    let out = tempfile::tempdir().unwrap();
    let built = Instant::now();
    let debs = run_ok(
        Command::new("bash")
            .arg(root().join("scripts/package"))
            .args(["--profile", profile, "--fast", "--no-build", "--out"])
            .arg(out.path())
            .env("CARGO_TARGET_DIR", target),
        "scripts/package",
    );
    eprintln!("scripts/package --profile {profile}: {:?}", built.elapsed());
    let debs: Vec<PathBuf> = debs.lines().map(PathBuf::from).collect();
    assert_eq!(
        debs.len(),
        2,
        "scripts/package prints both packages: {debs:?}"
    );
    for ((package, _), deb) in PACKAGES.iter().zip(&debs) {
        let name = deb.file_name().unwrap().to_string_lossy();
        assert!(
            name.starts_with(&format!("{package}_")),
            "{}",
            deb.display()
        );
        assert!(deb.is_file(), "{} was not written", deb.display());
    }

    let guard = Installed {
        new_users: ["unidesk-agent", "unidesk"]
            .into_iter()
            .filter(|u| !user_exists(u))
            .collect(),
    };
    run_ok(Command::new("dpkg").arg("-i").args(&debs), "dpkg -i");

    let scratch = tempfile::tempdir().unwrap();
    for (package, subcommand_page) in PACKAGES {
        assert_eq!(dpkg_status(package).as_deref(), Some("installed"));
        let unit_path = PathBuf::from(format!("/usr/lib/systemd/system/{package}.service"));
        let unit = std::fs::read_to_string(&unit_path)
            .unwrap_or_else(|e| panic!("{package} installs {}: {e}", unit_path.display()));

        // ExecStart's binary is there and runs; its --config is the packaged conffile and
        // loads with the real loader.
        let exec: Vec<String> = unit_values(&unit, "ExecStart");
        let binary = Path::new(&exec[0]);
        assert_eq!(binary, Path::new("/usr/bin").join(package));
        let version = run_ok(Command::new(binary).arg("--version"), "--version");
        assert_eq!(
            version.trim(),
            format!("{package} {}", env!("CARGO_PKG_VERSION"))
        );
        let config = exec
            .iter()
            .position(|a| a == "--config")
            .map(|i| PathBuf::from(&exec[i + 1]))
            .unwrap_or_else(|| panic!("ExecStart names no --config: {exec:?}"));
        if package == "unidesk-agent" {
            AgentConfig::load(&config).unwrap_or_else(|e| panic!("{e}"));
        } else {
            ControllerConfig::load(&config).unwrap_or_else(|e| panic!("{e}"));
        }
        let conffiles = run_ok(
            Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", package]),
            "dpkg-query conffiles",
        );
        assert!(
            conffiles.contains(&config.display().to_string()),
            "{} is a conffile of {package}: {conffiles}",
            config.display()
        );

        // The unit's user exists (sysusers ran) and can read its config; nobody else can.
        let user = unit_values(&unit, "User").remove(0);
        let gid: u32 = run_ok(Command::new("id").args(["-g", &user]), "id -g")
            .trim()
            .parse()
            .unwrap();
        let meta = std::fs::metadata(&config).unwrap();
        assert_eq!(
            (meta.mode() & 0o777, meta.uid(), meta.gid()),
            (0o640, 0, gid),
            "{} is 0640 root:{user}",
            config.display()
        );
        run_ok(
            Command::new("setpriv")
                .args(["--reuid", &user, "--regid", &user, "--init-groups", "cat"])
                .arg(&config),
            &format!("{user} reading {}", config.display()),
        );
        for group in unit_values(&unit, "SupplementaryGroups") {
            let groups = run_ok(Command::new("id").args(["-nG", &user]), "id -nG");
            assert!(
                groups.split_whitespace().any(|g| g == group),
                "{user} is in {group}: {groups}"
            );
        }
        // Its state directory exists (tmpfiles ran), owned by it, and is what the unit may write.
        for state in unit_values(&unit, "StateDirectory") {
            let dir = Path::new("/var/lib").join(&state);
            let meta =
                std::fs::metadata(&dir).unwrap_or_else(|e| panic!("{} exists: {e}", dir.display()));
            assert_eq!(meta.mode() & 0o777, 0o750, "{}", dir.display());
            assert_eq!(meta.gid(), gid, "{} belongs to {user}", dir.display());
            assert!(unit_values(&unit, "ReadWritePaths").contains(&dir.display().to_string()));
        }

        // systemd's own check of the installed unit, binary path and all.
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{}: {said}", unit_path.display());
        assert!(
            !said.contains(&format!("{package}.service")),
            "systemd-analyze has remarks on the installed {package}.service: {said}"
        );

        // A man page per visible (sub)command, as the installed binary generates them.
        let generated = scratch.path().join(package);
        run_ok(
            Command::new(binary)
                .args(["generate", "man", "--out"])
                .arg(&generated),
            "generate man",
        );
        let mut pages: Vec<String> = std::fs::read_dir(&generated)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert!(pages.contains(&format!("{subcommand_page}.1")), "{pages:?}");
        for page in &pages {
            let installed = Path::new("/usr/share/man/man1").join(format!("{page}.gz"));
            assert!(installed.is_file(), "{} is installed", installed.display());
        }
        let top = run_ok(
            Command::new("zcat").arg(format!("/usr/share/man/man1/{package}.1.gz")),
            "zcat",
        );
        assert!(top.contains(&format!(".TH {package} 1")), "{top}");
        assert!(
            top.contains("EXAMPLES:"),
            "the man page has the examples: {top}"
        );

        // Completions where bash-completion, zsh and fish look for them; bash takes its own.
        let bash = format!("/usr/share/bash-completion/completions/{package}");
        let spec = run_ok(
            Command::new("bash").args(["-c", &format!("source {bash} && complete -p {package}")]),
            "sourcing the bash completion",
        );
        assert!(spec.contains(package), "{spec}");
        let zsh = std::fs::read_to_string(format!("/usr/share/zsh/vendor-completions/_{package}"))
            .unwrap();
        assert!(zsh.starts_with(&format!("#compdef {package}")), "{zsh}");
        let fish = std::fs::read_to_string(format!(
            "/usr/share/fish/vendor_completions.d/{package}.fish"
        ))
        .unwrap();
        assert!(fish.contains(&format!("complete -c {package}")), "{fish}");
    }

    // Purge: everything the packages put down is gone again.
    run_ok(
        Command::new("dpkg")
            .arg("--purge")
            .args(PACKAGES.map(|(p, _)| p)),
        "dpkg --purge",
    );
    for (package, _) in PACKAGES {
        assert_eq!(dpkg_status(package), None, "{package} is purged");
        for path in [
            format!("/usr/bin/{package}"),
            format!("/usr/lib/systemd/system/{package}.service"),
            format!("/usr/lib/sysusers.d/{package}.conf"),
            format!("/usr/lib/tmpfiles.d/{package}.conf"),
            format!("/usr/share/man/man1/{package}.1.gz"),
            format!("/usr/share/bash-completion/completions/{package}"),
            format!("/usr/share/doc/{package}"),
        ] {
            assert!(!Path::new(&path).exists(), "{path} is left after the purge");
        }
    }
    for path in [
        DEFAULT_AGENT_CONFIG,
        DEFAULT_CONTROLLER_CONFIG,
        "/var/lib/unidesk",
        "/var/lib/unidesk-agent",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after the purge");
    }
    if !etc_existed {
        assert!(!Path::new("/etc/unidesk").exists(), "/etc/unidesk is left");
    }
    drop(guard);
}
