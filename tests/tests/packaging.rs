//! Packaging: the binaries speak systemd's notify protocol (`Type=notify`: `READY=1` once they
//! can work, `WATCHDOG=1` at half of `WATCHDOG_USEC`), and the shipped units, sysusers and
//! tmpfiles snippets pass systemd's own checks.
#![allow(clippy::disallowed_methods)] // The binaries and systemd's tools run as processes.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

    let sysusers = packaging("unidesk.sysusers").canonicalize().unwrap();
    let out = Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(&sysusers)
        .output()
        .expect("systemd-sysusers is installed");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("ignoring") && !said.contains("Failed"),
        "sysusers accepts every line: {said}"
    );
    let tmpfiles = std::fs::read_to_string(packaging("unidesk.tmpfiles")).unwrap();
    for dir in [
        "/etc/unidesk",
        "/var/lib/unidesk ",
        "/var/lib/unidesk-agent",
    ] {
        assert!(tmpfiles.contains(dir), "tmpfiles makes {dir}");
    }
}
