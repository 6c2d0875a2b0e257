//! `unidesk-controller check`: is a controller configuration valid, and can what it names be
//! used? One item per thing (the file, TLS, the CA, the state directory, the admin socket, the
//! gateway address, the desired state, the agent entries, the egress allowlist), each
//! `{name, ok, detail}` saying exactly what is wrong.
//!
//! The judgements on data are pure functions (`agents_item`, `egress_item`, `tls_item`,
//! `exit_code`); [`run`] does the I/O (files, a bind, the admin socket, a Git fetch). It must
//! not start a controller or change the configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{AgentCredential, ControllerConfig};

/// How long the admin socket may take to answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a failed item fails: a wrong configuration (exit 2) or something it names cannot be
/// reached or used (exit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Invalid,
    Unreachable,
}

/// One checked thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckItem {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// How a failure counts; `None` when the item passed.
    #[serde(skip)]
    pub failure: Option<Failure>,
}

impl CheckItem {
    fn pass(name: &str, detail: impl Into<String>) -> CheckItem {
        CheckItem {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            failure: None,
        }
    }

    fn fail(name: &str, failure: Failure, detail: impl Into<String>) -> CheckItem {
        CheckItem {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            failure: Some(failure),
        }
    }
}

/// What `check` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub config: PathBuf,
    pub checks: Vec<CheckItem>,
}

impl CheckReport {
    fn new(config: &Path, checks: Vec<CheckItem>) -> CheckReport {
        CheckReport {
            ok: checks.iter().all(|c| c.ok),
            config: config.to_path_buf(),
            checks,
        }
    }

    /// 0 when every item passed, 2 when the configuration is wrong, else 3.
    pub fn exit_code(&self) -> i32 {
        exit_code(&self.checks)
    }

    /// The names of the failed items, for the one-line error.
    pub fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// 0 when every item passed; 2 when any item says the configuration is wrong (it wins: fix
/// the file first); 3 when only reachability failed.
pub fn exit_code(items: &[CheckItem]) -> i32 {
    if items.iter().any(|c| c.failure == Some(Failure::Invalid)) {
        2
    } else if items.iter().any(|c| c.failure.is_some()) {
        3
    } else {
        0
    }
}

/// Every `[[agents]]` entry: a 64-hex hash, listed once. Names each bad entry, not only the
/// first.
pub fn agents_item(agents: &[AgentCredential]) -> CheckItem {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, agent) in agents.iter().enumerate() {
        if !seen.insert(agent.id.as_str()) {
            problems.push(format!(
                "agents[{i}] id {} is listed more than once",
                agent.id
            ));
        }
        if agent.secret_sha256.len() != 64
            || !agent.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            problems.push(format!(
                "agents[{i}] ({}) secret_sha256={:?} is not 64 hex digits",
                agent.id, agent.secret_sha256
            ));
        }
    }
    if !problems.is_empty() {
        return CheckItem::fail("agents", Failure::Invalid, problems.join("; "));
    }
    if agents.is_empty() {
        return CheckItem::fail(
            "agents",
            Failure::Invalid,
            "no [[agents]] entry: no agent can connect; enrol one with `unidesk-controller agent add ID`",
        );
    }
    let active: Vec<&str> = agents
        .iter()
        .filter(|a| !a.revoked)
        .map(|a| a.id.as_str())
        .collect();
    let revoked: Vec<&str> = agents
        .iter()
        .filter(|a| a.revoked)
        .map(|a| a.id.as_str())
        .collect();
    let mut detail = format!("{} enrolled: {}", active.len(), active.join(", "));
    if !revoked.is_empty() {
        detail.push_str(&format!("; revoked: {}", revoked.join(", ")));
    }
    CheckItem::pass("agents", detail)
}

/// The egress allowlist parses; the error names the entry.
pub fn egress_item(allow: &[String]) -> CheckItem {
    match crate::egress::EgressPolicy::parse(allow) {
        Ok(_) if allow.is_empty() => CheckItem::pass(
            "egress.allow",
            "empty: agents' tunnels may reach nothing outside",
        ),
        Ok(_) => CheckItem::pass(
            "egress.allow",
            format!("{} entries parse: {}", allow.len(), allow.join(", ")),
        ),
        Err(e) => CheckItem::fail(
            "egress.allow",
            Failure::Invalid,
            format!("egress.allow: {e}"),
        ),
    }
}

/// The server certificate and key load and belong together.
pub fn tls_item(cert: &Path, key: &Path) -> CheckItem {
    match crate::pki::server_config(cert, key) {
        Ok(_) => CheckItem::pass(
            "gateway.tls",
            format!(
                "certificate {} and key {} load and match",
                cert.display(),
                key.display()
            ),
        ),
        Err(e) => CheckItem::fail("gateway.tls", Failure::Invalid, e.to_string()),
    }
}

/// The name agents use for the gateway, for checking the certificate: the listen address,
/// or `localhost` when it listens on every address.
fn gateway_name(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        "localhost".into()
    } else {
        listen.ip().to_string()
    }
}

/// `ca.crt` beside the configuration (what `init` writes and agents pin) loads and signed the
/// server certificate for the gateway's name. Without one there is nothing to check.
pub fn ca_item(ca: &Path, cert: &Path, name: &str) -> CheckItem {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    if !ca.exists() {
        return CheckItem::pass(
            "ca",
            format!(
                "no {} beside the config: agents must pin the CA that signed {}",
                ca.display(),
                cert.display()
            ),
        );
    }
    let verdict = (|| {
        let store =
            unidesk_agent::pem::roots(&read(ca)?).map_err(|e| format!("{}: {e}", ca.display()))?;
        let chain = unidesk_agent::pem::certificates(&read(cert)?)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| format!("{} holds no certificate", cert.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("gateway name {name:?}: {e}"))?;
        verifier
            .verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now())
            .map_err(|e| {
                format!(
                    "{} does not verify against {} for {name}: {e}",
                    cert.display(),
                    ca.display()
                )
            })?;
        Ok::<_, String>(())
    })();
    match verdict {
        Ok(()) => CheckItem::pass(
            "ca",
            format!(
                "{} loads and signed {} for {name}",
                ca.display(),
                cert.display()
            ),
        ),
        Err(detail) => CheckItem::fail("ca", Failure::Invalid, detail),
    }
}

/// A directory exists (or can be made) and takes a file.
fn writable_dir(name: &str, dir: &Path) -> CheckItem {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return CheckItem::fail(
            name,
            Failure::Unreachable,
            format!("cannot create {}: {e}", dir.display()),
        );
    }
    let probe = dir.join(format!(".unidesk-check-{}", std::process::id()));
    match std::fs::write(&probe, b"check") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            CheckItem::pass(name, format!("{} is writable", dir.display()))
        }
        Err(e) => CheckItem::fail(
            name,
            Failure::Unreachable,
            format!("cannot write in {}: {e}", dir.display()),
        ),
    }
}

/// Whether a controller answers on the admin socket.
async fn admin_answers(socket: &Path) -> bool {
    matches!(
        tokio::time::timeout(
            ADMIN_TIMEOUT,
            crate::admin::request(socket, &crate::admin::AdminRequest::Agents),
        )
        .await,
        Ok(Ok(Ok(_)))
    )
}

async fn admin_item(socket: &Path, serving: bool) -> CheckItem {
    let name = "admin.socket";
    if serving {
        return CheckItem::pass(
            name,
            format!("a controller answers on {}", socket.display()),
        );
    }
    let Some(dir) = socket.parent() else {
        return CheckItem::fail(
            name,
            Failure::Invalid,
            format!("{} has no directory", socket.display()),
        );
    };
    let mut item = writable_dir(name, dir);
    if item.ok {
        item.detail = if socket.exists() {
            format!(
                "{} is writable; {} is left from a controller that stopped (serve replaces it)",
                dir.display(),
                socket.display()
            )
        } else {
            format!(
                "{} is writable; serve creates {} (mode 0600)",
                dir.display(),
                socket.display()
            )
        };
    }
    item
}

async fn gateway_item(listen: SocketAddr, serving: bool) -> CheckItem {
    let name = "gateway.listen";
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            drop(listener);
            CheckItem::pass(name, format!("{listen} can be bound"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && serving => CheckItem::pass(
            name,
            format!("{listen} is served by the running controller"),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => CheckItem::fail(
            name,
            Failure::Unreachable,
            format!(
                "{listen} is in use by another process (no controller answers on the admin socket)"
            ),
        ),
        Err(e) => CheckItem::fail(
            name,
            Failure::Unreachable,
            format!("cannot bind {listen}: {e}"),
        ),
    }
}

fn catalog_item(path: &Path) -> CheckItem {
    match crate::desired::catalog::load(path) {
        Ok(parsed) => {
            let mut detail = format!(
                "{} loads: {} services",
                path.display(),
                parsed.catalog.microservices.len()
            );
            if !parsed.warnings.is_empty() {
                let warnings: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
                detail.push_str(&format!("; warnings: {}", warnings.join("; ")));
            }
            CheckItem::pass("desired.catalog", detail)
        }
        Err(e) => CheckItem::fail("desired.catalog", Failure::Invalid, e.to_string()),
    }
}

async fn repository_item(config: &ControllerConfig, url: &str) -> CheckItem {
    use crate::desired::{Environment, env};
    let name = "desired.repository";
    let fetched = crate::cli::deploy::fetch_desired(config, url.to_string(), |mirror| {
        Ok(Environment::ALL
            .iter()
            .map(|e| match env::read_manifest(mirror, *e) {
                Ok(read) => format!("{}: {}", e.desired_ref(), read.commit),
                Err(err) => format!("{}: {err}", e.desired_ref()),
            })
            .collect::<Vec<_>>())
    })
    .await;
    match fetched {
        Ok((repository, refs)) => {
            CheckItem::pass(name, format!("{repository} fetched; {}", refs.join("; ")))
        }
        Err(crate::cli::CliError::Unreachable(e)) => {
            CheckItem::fail(name, Failure::Unreachable, format!("{url}: {e:#}"))
        }
        Err(e) => CheckItem::fail(name, Failure::Invalid, format!("{url}: {e}")),
    }
}

/// Checks the configuration at `path` and what it names.
pub async fn run(path: &Path) -> CheckReport {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let item = CheckItem::fail(
                "config",
                Failure::Invalid,
                format!("cannot read {}: {e}", path.display()),
            );
            return CheckReport::new(path, vec![item]);
        }
    };
    // Parsed without the load's validation, so every item below still runs and speaks for
    // itself when a value is wrong.
    let mut config: ControllerConfig = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            let item = CheckItem::fail(
                "config",
                Failure::Invalid,
                format!(
                    "{} is not valid controller configuration: {e}",
                    path.display()
                ),
            );
            return CheckReport::new(path, vec![item]);
        }
    };
    config.base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    config.file = path.to_path_buf();
    let mut checks = vec![match config.validate(path) {
        Ok(()) => CheckItem::pass("config", format!("{} parses and validates", path.display())),
        Err(e) => CheckItem::fail("config", Failure::Invalid, e.to_string()),
    }];
    let cert = config.path(&config.gateway.cert);
    let key = config.path(&config.gateway.key);
    checks.push(tls_item(&cert, &key));
    checks.push(ca_item(
        &config.base_dir.join("ca.crt"),
        &cert,
        &gateway_name(config.gateway.listen),
    ));
    checks.push(writable_dir("store.dir", &config.path(&config.store.dir)));
    let socket = config.path(&config.admin.socket);
    let serving = admin_answers(&socket).await;
    checks.push(admin_item(&socket, serving).await);
    checks.push(gateway_item(config.gateway.listen, serving).await);
    match &config.desired {
        None => checks.push(CheckItem::pass(
            "desired",
            "no [desired] table: deploy verbs need --catalog (and --repository for --env)",
        )),
        Some(desired) => {
            checks.push(catalog_item(&config.path(&desired.catalog)));
            if let Some(url) = &desired.repository {
                checks.push(repository_item(&config, url).await);
            }
        }
    }
    checks.push(agents_item(&config.agents));
    checks.push(egress_item(&config.egress.allow));
    CheckReport::new(path, checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use unidesk_protocol::AgentId;

    fn agent(id: &str, hash: &str, revoked: bool) -> AgentCredential {
        AgentCredential {
            id: AgentId::new(id).unwrap(),
            secret_sha256: hash.into(),
            revoked,
        }
    }

    #[test]
    fn agents_name_every_bad_entry() {
        let good = "a".repeat(64);
        let item = agents_item(&[
            agent("d601", &good, false),
            agent("d601", &good, false),
            agent("d518", "xyz", false),
        ]);
        assert!(!item.ok);
        assert_eq!(item.failure, Some(Failure::Invalid));
        assert_eq!(
            item.detail,
            "agents[1] id d601 is listed more than once; \
             agents[2] (d518) secret_sha256=\"xyz\" is not 64 hex digits"
        );
        let item = agents_item(&[agent("d601", &good, false), agent("old", &good, true)]);
        assert!(item.ok, "{item:?}");
        assert_eq!(item.detail, "1 enrolled: d601; revoked: old");
        assert!(!agents_item(&[]).ok);
    }

    #[test]
    fn egress_errors_name_the_entry() {
        let item = egress_item(&["github.com:443".into(), "cidr:300.0.0.0/8".into()]);
        assert!(!item.ok);
        assert!(item.detail.contains("300.0.0.0/8"), "{}", item.detail);
        assert!(egress_item(&["github.com:443".into()]).ok);
    }

    #[test]
    fn invalid_wins_over_unreachable_in_the_exit_code() {
        let ok = CheckItem::pass("a", "");
        let gone = CheckItem::fail("b", Failure::Unreachable, "");
        let bad = CheckItem::fail("c", Failure::Invalid, "");
        assert_eq!(exit_code(std::slice::from_ref(&ok)), 0);
        assert_eq!(exit_code(&[ok.clone(), gone.clone()]), 3);
        assert_eq!(exit_code(&[gone, bad, ok]), 2);
    }

    #[test]
    fn tls_and_ca_say_which_file_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let other = crate::pki::generate(&["localhost".into()]).unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.crt"), &pki.ca_cert_pem).unwrap();
        std::fs::write(p("other-ca.crt"), &other.ca_cert_pem).unwrap();
        std::fs::write(p("server.crt"), &pki.server_cert_pem).unwrap();
        std::fs::write(p("server.key"), &pki.server_key_pem).unwrap();
        std::fs::write(p("other.key"), &other.server_key_pem).unwrap();
        assert!(tls_item(&p("server.crt"), &p("server.key")).ok);
        let mismatch = tls_item(&p("server.crt"), &p("other.key"));
        assert!(!mismatch.ok);
        assert!(
            mismatch.detail.contains("server.crt"),
            "{}",
            mismatch.detail
        );
        assert!(ca_item(&p("ca.crt"), &p("server.crt"), "127.0.0.1").ok);
        let wrong_ca = ca_item(&p("other-ca.crt"), &p("server.crt"), "127.0.0.1");
        assert!(!wrong_ca.ok);
        assert!(
            wrong_ca.detail.contains("does not verify against"),
            "{}",
            wrong_ca.detail
        );
        let wrong_name = ca_item(&p("ca.crt"), &p("server.crt"), "10.0.0.9");
        assert!(!wrong_name.ok, "{wrong_name:?}");
        assert!(ca_item(&p("missing.crt"), &p("server.crt"), "localhost").ok);
    }

    #[tokio::test]
    async fn an_init_setup_checks_clean_and_a_broken_one_names_the_items() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let report = crate::init::init(&crate::init::InitPlan {
            dir: dir.path().join("setup"),
            layout: crate::init::Layout::Local,
            agents: vec![AgentId::new("node").unwrap()],
            listen,
            proxy_port: 18789,
            egress_allow: vec!["github.com:443".into()],
        })
        .unwrap();
        let clean = run(&report.controller_config).await;
        assert!(clean.ok, "{clean:#?}");
        assert_eq!(clean.exit_code(), 0);

        // Another process on the gateway port, with no controller behind the admin socket.
        let squatter = std::net::TcpListener::bind(listen).unwrap();
        let busy = run(&report.controller_config).await;
        assert_eq!(busy.failed(), vec!["gateway.listen"], "{busy:#?}");
        assert_eq!(busy.exit_code(), 3);
        drop(squatter);

        let text = std::fs::read_to_string(&report.controller_config).unwrap();
        std::fs::write(
            &report.controller_config,
            text.replace("github.com:443", "cidr:nonsense"),
        )
        .unwrap();
        std::fs::remove_file(dir.path().join("setup/server.key")).unwrap();
        let broken = run(&report.controller_config).await;
        assert_eq!(
            broken.failed(),
            vec!["config", "gateway.tls", "egress.allow"],
            "{broken:#?}"
        );
        assert_eq!(broken.exit_code(), 2);
        let missing = run(&dir.path().join("nope.toml")).await;
        assert_eq!(missing.exit_code(), 2);
        assert!(missing.checks[0].detail.contains("nope.toml"));
    }
}
