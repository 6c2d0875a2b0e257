//! `deploy.json`, the desired-state manifest: which service runs which repository commit, per
//! environment, and the dev CI declaration.
//!
//! It owns the strict parse (schema 1 and schema 2, unknown fields refused with their JSON
//! path), the fixed environment-to-ref mapping and the choice of the service list for an
//! `--env`. It must not know how a service is built or run (that is `config.json`, see
//! [`super::catalog`]), must not resolve commits (the node does) and does no I/O beyond
//! [`load`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::document::{self, Cursor, DocumentError};

/// The largest `deploy.json` accepted; checked before parsing.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// The shortest accepted `commitId` prefix.
pub const MIN_COMMIT_LEN: usize = 4;

/// The shortest CI timeout: one second.
pub const MIN_CI_TIMEOUT_MS: u64 = 1_000;

/// The longest CI timeout: four hours.
pub const MAX_CI_TIMEOUT_MS: u64 = 4 * 60 * 60 * 1_000;

const DOCUMENT: &str = "deploy.json";
const ROOT_V1_FIELDS: &[&str] = &["schemaVersion", "environment", "services"];
const ROOT_V2_FIELDS: &[&str] = &["schemaVersion", "environments"];
const DEV_FIELDS: &[&str] = &["ci", "services"];
const PROD_FIELDS: &[&str] = &["services"];
const CI_FIELDS: &[&str] = &["repo", "scriptPath", "timeoutMs"];
const SERVICE_FIELDS: &[&str] = &["id", "repo", "commitId"];

/// A `deploy.json` that cannot be used, or a request it cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Structure: size, syntax, unknown field, wrong type, bad value — with its JSON path.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// `schemaVersion` is neither 1 nor 2.
    #[error("deploy.json: schemaVersion={found} is not supported: only 1 and 2 exist")]
    UnsupportedSchema { found: u64 },
    /// Two services share an id.
    #[error("deploy.json: duplicate service id {id:?} at {first} and {second}")]
    DuplicateService {
        id: String,
        first: String,
        second: String,
    },
    /// Schema 1 under `--env` without a declared `environment`.
    #[error(
        "deploy.json declares no environment but --env {requested} was asked: \
         an environment manifest must declare \"environment\": \"{requested}\""
    )]
    EnvironmentNotDeclared { requested: Environment },
    /// Schema 1 whose declared `environment` differs from `--env`.
    #[error(
        "deploy.json declares environment={declared} but --env {requested} was asked: \
         refusing to mix environments"
    )]
    EnvironmentMismatch {
        requested: Environment,
        declared: Environment,
    },
    /// Schema 2 without `environments.<env>`.
    #[error("deploy.json has no environments.{requested} (it has: {present})")]
    EnvironmentMissing {
        requested: Environment,
        present: String,
    },
    /// Schema 2 read without `--env`.
    #[error("deploy.json is schema 2 with environments ({present}): choose one with --env")]
    EnvironmentRequired { present: String },
    /// No CI block for the environment.
    #[error("deploy.json has no {path} block")]
    CiMissing { path: String },
    /// The file could not be read.
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
}

impl ManifestError {
    /// The JSON path of the bad input, when the error is about one place in the document.
    pub fn path(&self) -> Option<&str> {
        match self {
            ManifestError::Document(e) => e.path(),
            ManifestError::DuplicateService { second, .. } => Some(second),
            ManifestError::UnsupportedSchema { .. } => Some("schemaVersion"),
            ManifestError::CiMissing { path } => Some(path),
            _ => None,
        }
    }
}

/// The only two environments. Anything else is refused wherever an environment is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Dev,
    Prod,
}

impl Environment {
    /// Both environments, in order.
    pub const ALL: [Environment; 2] = [Environment::Dev, Environment::Prod];

    /// The name used in files and flags: `dev` or `prod`.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Prod => "prod",
        }
    }

    /// The fixed desired-state ref of this environment. Not configurable, by design: a config
    /// value that could point dev at the prod ref would defeat the separation.
    pub fn desired_ref(self) -> &'static str {
        match self {
            Environment::Dev => "origin/deploy/dev",
            Environment::Prod => "origin/deploy/prod",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An environment name other than `dev` or `prod`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown environment {0:?}: only dev and prod exist")]
pub struct UnknownEnvironment(pub String);

impl FromStr for Environment {
    type Err = UnknownEnvironment;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dev" => Ok(Environment::Dev),
            "prod" => Ok(Environment::Prod),
            other => Err(UnknownEnvironment(other.chars().take(80).collect())),
        }
    }
}

/// One desired service: which repository commit it should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntry {
    /// Service id, joined with `config.json.microservices[].id`.
    pub id: String,
    /// Repository URL (`https://`, `http://` or `file://`).
    pub repo: String,
    /// Lower-case hex commit, 4 to 40 characters; resolved to a full SHA on the node.
    pub commit_id: String,
}

impl ServiceEntry {
    /// The commit when it is already a full 40-hex SHA.
    pub fn full_commit(&self) -> Option<&str> {
        (self.commit_id.len() == 40).then_some(self.commit_id.as_str())
    }
}

/// The dev smoke-CI declaration (`environments.dev.ci`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CiSpec {
    /// Repository holding the script (the manifest commit is used, not a branch).
    pub repo: String,
    /// `scripts/ci/<name>.sh`, nothing else.
    pub script_path: String,
    /// Whole-run deadline, 1 s to 4 h.
    pub timeout_ms: u64,
}

/// Whether two repository URLs name the same repository: scheme and host compared without
/// case, credentials, a default port, a trailing `/` and a trailing `.git` ignored.
pub fn same_repository(a: &str, b: &str) -> bool {
    fn key(url: &str) -> String {
        let url = url.trim().trim_end_matches('/');
        let url = url.strip_suffix(".git").unwrap_or(url);
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_owned();
        };
        let scheme = scheme.to_ascii_lowercase();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = host.to_ascii_lowercase();
        let host = match (scheme.as_str(), host.rsplit_once(':')) {
            ("https", Some((h, "443"))) | ("http", Some((h, "80"))) => h.to_owned(),
            _ => host,
        };
        format!("{scheme}://{host}/{path}")
    }
    key(a) == key(b)
}

/// One environment of a schema 2 manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvironmentManifest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<CiSpec>,
    pub services: Vec<ServiceEntry>,
}

/// A parsed, validated `deploy.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// Schema 1: one service list, optionally bound to an environment.
    V1 {
        environment: Option<Environment>,
        services: Vec<ServiceEntry>,
    },
    /// Schema 2: a service list (and CI block) per environment.
    V2 {
        environments: BTreeMap<Environment, EnvironmentManifest>,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct V1Repr<'a> {
    schema_version: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment: Option<Environment>,
    services: &'a [ServiceEntry],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct V2Repr<'a> {
    schema_version: u8,
    environments: &'a BTreeMap<Environment, EnvironmentManifest>,
}

impl Serialize for Manifest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Manifest::V1 {
                environment,
                services,
            } => V1Repr {
                schema_version: 1,
                environment: *environment,
                services,
            }
            .serialize(serializer),
            Manifest::V2 { environments } => V2Repr {
                schema_version: 2,
                environments,
            }
            .serialize(serializer),
        }
    }
}

impl Manifest {
    /// The schema version this manifest was written in.
    pub fn schema_version(&self) -> u8 {
        match self {
            Manifest::V1 { .. } => 1,
            Manifest::V2 { .. } => 2,
        }
    }

    /// The services to act on. `env` is the `--env` of the command (`None` for `--file`).
    ///
    /// Schema 1 with `--env` requires the declared `environment` to be that environment;
    /// schema 2 requires `--env` and picks `environments.<env>`.
    pub fn services_for(&self, env: Option<Environment>) -> Result<&[ServiceEntry], ManifestError> {
        match (self, env) {
            (Manifest::V1 { services, .. }, None) => Ok(services),
            (
                Manifest::V1 {
                    environment,
                    services,
                },
                Some(requested),
            ) => match environment {
                None => Err(ManifestError::EnvironmentNotDeclared { requested }),
                Some(declared) if *declared != requested => {
                    Err(ManifestError::EnvironmentMismatch {
                        requested,
                        declared: *declared,
                    })
                }
                Some(_) => Ok(services),
            },
            (Manifest::V2 { environments }, None) => Err(ManifestError::EnvironmentRequired {
                present: present(environments),
            }),
            (Manifest::V2 { environments }, Some(requested)) => environments
                .get(&requested)
                .map(|e| e.services.as_slice())
                .ok_or_else(|| ManifestError::EnvironmentMissing {
                    requested,
                    present: present(environments),
                }),
        }
    }

    /// The CI declaration of `env` (only schema 2 `environments.dev.ci` can hold one).
    pub fn ci(&self, env: Environment) -> Result<&CiSpec, ManifestError> {
        let path = format!("environments.{env}.ci");
        match self {
            Manifest::V1 { .. } => Err(ManifestError::CiMissing { path }),
            Manifest::V2 { environments } => environments
                .get(&env)
                .and_then(|e| e.ci.as_ref())
                .ok_or(ManifestError::CiMissing { path }),
        }
    }
}

fn present(environments: &BTreeMap<Environment, EnvironmentManifest>) -> String {
    if environments.is_empty() {
        return "none".to_owned();
    }
    environments
        .keys()
        .map(|e| e.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses and validates `deploy.json` bytes.
pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let node = document::parse(DOCUMENT, bytes, MAX_MANIFEST_BYTES)?;
    let root = Cursor::root(DOCUMENT, &node);
    // The version decides which keys exist, so it is read before the key check.
    let version_fields = root.map()?;
    let version = version_fields
        .iter()
        .find(|(k, _)| *k == "schemaVersion")
        .map(|(_, c)| c)
        .ok_or(DocumentError::Missing {
            document: DOCUMENT,
            path: "schemaVersion".to_owned(),
        })?
        .u64()?;
    match version {
        1 => parse_v1(&root),
        2 => parse_v2(&root),
        found => Err(ManifestError::UnsupportedSchema { found }),
    }
}

/// Reads and parses a `deploy.json` file, reading at most one byte past the limit.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let read_err = |e: std::io::Error| ManifestError::Read {
        path: path.to_owned(),
        why: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    parse(&bytes)
}

fn parse_v1(root: &Cursor<'_>) -> Result<Manifest, ManifestError> {
    let fields = root.object(ROOT_V1_FIELDS)?;
    let environment = fields
        .optional("environment")
        .map(parse_environment)
        .transpose()?;
    let services = parse_services(fields.required("services")?)?;
    Ok(Manifest::V1 {
        environment,
        services,
    })
}

fn parse_v2(root: &Cursor<'_>) -> Result<Manifest, ManifestError> {
    let fields = root.object(ROOT_V2_FIELDS)?;
    let mut environments = BTreeMap::new();
    for (name, at) in fields.required("environments")?.map()? {
        let env = Environment::from_str(name)
            .map_err(|_| at.invalid(name, "environment names are only dev and prod"))?;
        // Only dev carries the smoke-CI declaration; under prod `ci` is an unknown field.
        let allowed = match env {
            Environment::Dev => DEV_FIELDS,
            Environment::Prod => PROD_FIELDS,
        };
        let env_fields = at.object(allowed)?;
        let ci = env_fields.optional("ci").map(parse_ci).transpose()?;
        let services = parse_services(env_fields.required("services")?)?;
        environments.insert(env, EnvironmentManifest { ci, services });
    }
    Ok(Manifest::V2 { environments })
}

fn parse_environment(at: &Cursor<'_>) -> Result<Environment, ManifestError> {
    let name = at.str()?;
    Environment::from_str(name).map_err(|_| {
        at.invalid(name, "it must be exactly \"dev\" or \"prod\"")
            .into()
    })
}

fn parse_services(at: &Cursor<'_>) -> Result<Vec<ServiceEntry>, ManifestError> {
    let items = at.array()?;
    let mut services: Vec<ServiceEntry> = Vec::with_capacity(items.len());
    let mut paths: Vec<String> = Vec::with_capacity(items.len());
    for item in &items {
        let entry = parse_service(item)?;
        if let Some(i) = services.iter().position(|s| s.id == entry.id) {
            return Err(ManifestError::DuplicateService {
                id: entry.id,
                first: paths.swap_remove(i),
                second: item.path(),
            });
        }
        services.push(entry);
        paths.push(item.path());
    }
    Ok(services)
}

fn parse_service(at: &Cursor<'_>) -> Result<ServiceEntry, ManifestError> {
    let fields = at.object(SERVICE_FIELDS)?;
    let id = fields.required_str("id")?;
    if let Err(e) = unidesk_protocol::ids::check_label("service id", id) {
        return Err(fields.required("id")?.invalid(id, e.why).into());
    }
    let repo = fields.required_str("repo")?;
    if let Err(why) = document::check_repo_url(repo) {
        return Err(fields.required("repo")?.invalid(repo, why).into());
    }
    let commit = fields.required("commitId")?;
    let commit_id = commit.str()?;
    if let Err(why) = check_commit(commit_id) {
        return Err(commit.invalid(commit_id, why).into());
    }
    Ok(ServiceEntry {
        id: id.to_owned(),
        repo: repo.to_owned(),
        commit_id: commit_id.to_owned(),
    })
}

/// Checks a `commitId`: 4 to 40 lower-case hex digits.
pub fn check_commit(commit: &str) -> Result<(), &'static str> {
    const WHY: &str = "a commit id is 4 to 40 lower-case hex digits (0-9, a-f)";
    let hex = commit
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(MIN_COMMIT_LEN..=40).contains(&commit.len()) || !hex {
        return Err(WHY);
    }
    Ok(())
}

fn parse_ci(at: &Cursor<'_>) -> Result<CiSpec, ManifestError> {
    let fields = at.object(CI_FIELDS)?;
    let repo = fields.required_str("repo")?;
    if let Err(why) = document::check_repo_url(repo) {
        return Err(fields.required("repo")?.invalid(repo, why).into());
    }
    let script = fields.required("scriptPath")?;
    let script_path = script.str()?;
    if let Err(why) = check_script_path(script_path) {
        return Err(script.invalid(script_path, why).into());
    }
    let timeout = fields.required("timeoutMs")?;
    let timeout_ms = timeout.u64()?;
    if !(MIN_CI_TIMEOUT_MS..=MAX_CI_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(timeout
            .invalid(
                &timeout_ms.to_string(),
                format!(
                    "it must be between {MIN_CI_TIMEOUT_MS} (1 s) and {MAX_CI_TIMEOUT_MS} (4 h)"
                ),
            )
            .into());
    }
    Ok(CiSpec {
        repo: repo.to_owned(),
        script_path: script_path.to_owned(),
        timeout_ms,
    })
}

pub use unidesk_protocol::check_ci_script_path as check_script_path;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHA_A: &str = "0c3cdb4ee06a23361ed511a2da033d67b53d16f4";
    const REPO: &str = "https://github.com/pikasTech/unidesk";

    fn v1(extra: &str, services: &str) -> String {
        format!(r#"{{"schemaVersion":1{extra},"services":[{services}]}}"#)
    }

    fn svc(id: &str, commit: &str) -> String {
        format!(r#"{{"id":"{id}","repo":"{REPO}","commitId":"{commit}"}}"#)
    }

    #[test]
    fn accepts_the_seed_schema_1_example() {
        let m =
            parse(v1(r#","environment":"prod""#, &svc("code-queue", SHA_A)).as_bytes()).unwrap();
        assert_eq!(
            m,
            Manifest::V1 {
                environment: Some(Environment::Prod),
                services: vec![ServiceEntry {
                    id: "code-queue".into(),
                    repo: REPO.into(),
                    commit_id: SHA_A.into(),
                }],
            }
        );
        assert_eq!(m.schema_version(), 1);
    }

    #[test]
    fn accepts_short_commits_and_local_file_urls() {
        let text = r#"{"schemaVersion":1,"services":[
            {"id":"web","repo":"file:///srv/git/web.git","commitId":"0c3c"},
            {"id":"api","repo":"http://127.0.0.1:9418/api.git","commitId":"0c3cdb4"}]}"#;
        let m = parse(text.as_bytes()).unwrap();
        let services = m.services_for(None).unwrap();
        assert_eq!(services.len(), 2);
        assert_eq!(services[0].full_commit(), None);
    }

    #[test]
    fn accepts_the_seed_schema_2_example() {
        let text = format!(
            r#"{{"schemaVersion":2,"environments":{{"dev":{{
                "ci":{{"repo":"{REPO}","scriptPath":"scripts/ci/dev-e2e.sh","timeoutMs":1800000}},
                "services":[{},{},{}]}}}}}}"#,
            svc("backend-core", SHA_A),
            svc("frontend", SHA_A),
            svc("code-queue", SHA_A)
        );
        let m = parse(text.as_bytes()).unwrap();
        let ci = m.ci(Environment::Dev).unwrap();
        assert_eq!(ci.script_path, "scripts/ci/dev-e2e.sh");
        assert_eq!(ci.timeout_ms, 1_800_000);
        let ids: Vec<_> = m
            .services_for(Some(Environment::Dev))
            .unwrap()
            .iter()
            .map(|s| s.id.as_str())
            .collect();
        assert_eq!(ids, ["backend-core", "frontend", "code-queue"]);
    }

    /// Each invalid manifest with the JSON path and the words its error must carry.
    #[test]
    fn invalid_manifests_name_path_and_reason() {
        let good = svc("web", SHA_A);
        let v2 = |env: &str| format!(r#"{{"schemaVersion":2,"environments":{{{env}}}}}"#);
        let ci = |script: &str, timeout: &str| {
            v2(&format!(
                r#""dev":{{"ci":{{"repo":"{REPO}","scriptPath":"{script}","timeoutMs":{timeout}}},"services":[]}}"#
            ))
        };
        let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
            (
                "unknown service field",
                v1(
                    "",
                    &format!(r#"{{"id":"web","repo":"{REPO}","commitId":"{SHA_A}","ports":[80]}}"#),
                ),
                Some("services[0].ports"),
                "unknown field services[0].ports (allowed here: id, repo, commitId)",
            ),
            (
                "dockerfile in a service",
                v1(
                    "",
                    &format!(
                        r#"{},{{"id":"api","repo":"{REPO}","commitId":"{SHA_A}","dockerfile":"D"}}"#,
                        good
                    ),
                ),
                Some("services[1].dockerfile"),
                "unknown field services[1].dockerfile",
            ),
            (
                "provider at the root",
                v1(r#","providers":["D601"]"#, &good),
                Some("providers"),
                "unknown field providers",
            ),
            (
                "namespace in schema 2 environment",
                v2(r#""dev":{"namespace":"unidesk-dev","services":[]}"#),
                Some("environments.dev.namespace"),
                "unknown field environments.dev.namespace",
            ),
            (
                "environments in schema 1",
                v1(r#","environments":{}"#, &good),
                Some("environments"),
                "allowed here: schemaVersion, environment, services",
            ),
            (
                "health path under ci",
                v2(&format!(
                    r#""dev":{{"ci":{{"repo":"{REPO}","scriptPath":"scripts/ci/a.sh","timeoutMs":1000,"healthPath":"/h"}},"services":[]}}"#
                )),
                Some("environments.dev.ci.healthPath"),
                "unknown field",
            ),
            (
                "commit not hex",
                v1("", &svc("web", "main")),
                Some("services[0].commitId"),
                "services[0].commitId=\"main\" is not valid: a commit id is 4 to 40 lower-case hex digits (0-9, a-f)",
            ),
            (
                "commit upper case",
                v1("", &svc("web", "0C3CDB4E")),
                Some("services[0].commitId"),
                "4 to 40 lower-case hex digits",
            ),
            (
                "commit too long",
                v1("", &svc("web", &format!("{SHA_A}0"))),
                Some("services[0].commitId"),
                "4 to 40 lower-case hex digits",
            ),
            (
                "commit is a number",
                v1(
                    "",
                    &format!(r#"{{"id":"web","repo":"{REPO}","commitId":1234}}"#),
                ),
                Some("services[0].commitId"),
                "services[0].commitId must be a string, found number 1234",
            ),
            (
                "missing commit",
                v1("", &format!(r#"{{"id":"web","repo":"{REPO}"}}"#)),
                Some("services[0].commitId"),
                "missing required field services[0].commitId",
            ),
            (
                "ssh repo",
                v1(
                    "",
                    &format!(r#"{{"id":"web","repo":"git@github.com:a/b","commitId":"{SHA_A}"}}"#),
                ),
                Some("services[0].repo"),
                "https://, http:// or file:// URL",
            ),
            (
                "token in repo",
                v1(
                    "",
                    &format!(
                        r#"{{"id":"web","repo":"https://x:tok@github.com/a","commitId":"{SHA_A}"}}"#
                    ),
                ),
                Some("services[0].repo"),
                "credentials must not be written into the URL",
            ),
            (
                "bad service id",
                v1("", &svc("Web_1", SHA_A)),
                Some("services[0].id"),
                "only lower-case letters, digits and '-' are allowed",
            ),
            (
                "environment staging",
                v1(r#","environment":"staging""#, &good),
                Some("environment"),
                "environment=\"staging\" is not valid: it must be exactly \"dev\" or \"prod\"",
            ),
            (
                "environment key staging",
                v2(r#""staging":{"services":[]}"#),
                Some("environments.staging"),
                "environment names are only dev and prod",
            ),
            (
                "services not an array",
                v1("", "").replace("\"services\":[]", "\"services\":{}"),
                Some("services"),
                "services must be an array, found an object",
            ),
            (
                "schema version 3",
                r#"{"schemaVersion":3,"services":[]}"#.to_owned(),
                Some("schemaVersion"),
                "schemaVersion=3 is not supported",
            ),
            (
                "schema version string",
                r#"{"schemaVersion":"1","services":[]}"#.to_owned(),
                Some("schemaVersion"),
                "schemaVersion must be a non-negative integer, found string \"1\"",
            ),
            (
                "schema version missing",
                r#"{"services":[]}"#.to_owned(),
                Some("schemaVersion"),
                "missing required field schemaVersion",
            ),
            (
                "duplicate ids",
                v1(
                    "",
                    &[
                        svc("a", SHA_A),
                        svc("web", SHA_A),
                        svc("b", SHA_A),
                        svc("web", "abcd"),
                    ]
                    .join(","),
                ),
                Some("services[3]"),
                "duplicate service id \"web\" at services[1] and services[3]",
            ),
            (
                "duplicate ids in schema 2",
                v2(&format!(r#""dev":{{"services":[{good},{good}]}}"#)),
                Some("environments.dev.services[1]"),
                "at environments.dev.services[0] and environments.dev.services[1]",
            ),
            (
                "duplicate json key",
                format!(
                    r#"{{"schemaVersion":1,"services":[{{"id":"web","repo":"{REPO}","commitId":"{SHA_A}","commitId":"abcd"}}]}}"#
                ),
                Some("services[0].commitId"),
                "duplicate key services[0].commitId",
            ),
            (
                "ci script outside scripts/ci",
                ci("scripts/deploy.sh", "1000"),
                Some("environments.dev.ci.scriptPath"),
                "repo-relative scripts/ci/<name>.sh path",
            ),
            (
                "ci script with dot dot",
                ci("scripts/ci/../../x.sh", "1000"),
                Some("environments.dev.ci.scriptPath"),
                "scripts/ci/<name>.sh",
            ),
            (
                "ci script absolute",
                ci("/scripts/ci/a.sh", "1000"),
                Some("environments.dev.ci.scriptPath"),
                "scripts/ci/<name>.sh",
            ),
            (
                "ci script other extension",
                ci("scripts/ci/a.py", "1000"),
                Some("environments.dev.ci.scriptPath"),
                "scripts/ci/<name>.sh",
            ),
            (
                "ci script in a subdirectory",
                ci("scripts/ci/sub/a.sh", "1000"),
                Some("environments.dev.ci.scriptPath"),
                "scripts/ci/<name>.sh",
            ),
            (
                "ci timeout too small",
                ci("scripts/ci/a.sh", "999"),
                Some("environments.dev.ci.timeoutMs"),
                "between 1000 (1 s) and 14400000 (4 h)",
            ),
            (
                "ci timeout too large",
                ci("scripts/ci/a.sh", "14400001"),
                Some("environments.dev.ci.timeoutMs"),
                "between 1000 (1 s) and 14400000 (4 h)",
            ),
            (
                "ci timeout negative",
                ci("scripts/ci/a.sh", "-5"),
                Some("environments.dev.ci.timeoutMs"),
                "must be a non-negative integer, found number -5",
            ),
            (
                "ci under prod",
                v2(&format!(
                    r#""prod":{{"ci":{{"repo":"{REPO}","scriptPath":"scripts/ci/a.sh","timeoutMs":1000}},"services":[]}}"#
                )),
                Some("environments.prod.ci"),
                "unknown field environments.prod.ci (allowed here: services)",
            ),
            (
                "root is an array",
                "[]".to_owned(),
                Some("$"),
                "$ must be an object, found an array",
            ),
            (
                "not json",
                "{".to_owned(),
                None,
                "deploy.json is not valid JSON: EOF",
            ),
        ];
        for (name, text, path, words) in cases {
            let err = parse(text.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{name}: accepted {text}"));
            assert_eq!(err.path(), path, "{name}: {err}");
            let message = err.to_string();
            assert!(
                message.contains(words),
                "{name}: {message:?} lacks {words:?}"
            );
            assert!(!message.ends_with('.'), "{name}: {message}");
        }
    }

    #[test]
    fn size_limit_is_checked_before_parsing() {
        let mut text = v1("", &svc("web", SHA_A)).into_bytes();
        text.resize(MAX_MANIFEST_BYTES + 1, b' ');
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "deploy.json is 1048577 bytes, over the 1048576-byte limit"
        );
        // Whitespace padding up to the limit is still fine.
        text.truncate(MAX_MANIFEST_BYTES);
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn environment_refs_are_fixed() {
        assert_eq!(Environment::Dev.desired_ref(), "origin/deploy/dev");
        assert_eq!(Environment::Prod.desired_ref(), "origin/deploy/prod");
        assert_eq!("dev".parse::<Environment>(), Ok(Environment::Dev));
        assert_eq!(
            "staging".parse::<Environment>().unwrap_err().to_string(),
            "unknown environment \"staging\": only dev and prod exist"
        );
        assert!("Dev".parse::<Environment>().is_err());
    }

    #[test]
    fn schema_1_environment_must_match_the_requested_one() {
        let prod = parse(v1(r#","environment":"prod""#, &svc("web", SHA_A)).as_bytes()).unwrap();
        assert_eq!(
            prod.services_for(Some(Environment::Dev))
                .unwrap_err()
                .to_string(),
            "deploy.json declares environment=prod but --env dev was asked: refusing to mix environments"
        );
        assert_eq!(prod.services_for(Some(Environment::Prod)).unwrap().len(), 1);
        let dev = parse(v1(r#","environment":"dev""#, &svc("web", SHA_A)).as_bytes()).unwrap();
        assert!(matches!(
            dev.services_for(Some(Environment::Prod)),
            Err(ManifestError::EnvironmentMismatch {
                requested: Environment::Prod,
                declared: Environment::Dev
            })
        ));
        let undeclared = parse(v1("", &svc("web", SHA_A)).as_bytes()).unwrap();
        assert!(matches!(
            undeclared.services_for(Some(Environment::Dev)),
            Err(ManifestError::EnvironmentNotDeclared { .. })
        ));
        // The local-file path (no --env) accepts either.
        assert_eq!(prod.services_for(None).unwrap().len(), 1);
        assert_eq!(undeclared.services_for(None).unwrap().len(), 1);
    }

    #[test]
    fn schema_2_picks_the_requested_environment() {
        let text = format!(
            r#"{{"schemaVersion":2,"environments":{{"dev":{{"services":[{}]}},"prod":{{"services":[{},{}]}}}}}}"#,
            svc("web", SHA_A),
            svc("web", SHA_A),
            svc("api", SHA_A)
        );
        let m = parse(text.as_bytes()).unwrap();
        assert_eq!(m.services_for(Some(Environment::Dev)).unwrap().len(), 1);
        assert_eq!(m.services_for(Some(Environment::Prod)).unwrap().len(), 2);
        assert_eq!(
            m.services_for(None).unwrap_err().to_string(),
            "deploy.json is schema 2 with environments (dev, prod): choose one with --env"
        );
        assert_eq!(
            m.ci(Environment::Dev).unwrap_err().to_string(),
            "deploy.json has no environments.dev.ci block"
        );
        let only_dev =
            parse(br#"{"schemaVersion":2,"environments":{"dev":{"services":[]}}}"#).unwrap();
        assert_eq!(
            only_dev
                .services_for(Some(Environment::Prod))
                .unwrap_err()
                .to_string(),
            "deploy.json has no environments.prod (it has: dev)"
        );
    }

    #[test]
    fn same_repository_ignores_spelling_not_identity() {
        let base = "https://github.com/pikasTech/unidesk";
        for same in [
            "https://github.com/pikasTech/unidesk.git",
            "https://GitHub.com/pikasTech/unidesk/",
            "https://token@github.com:443/pikasTech/unidesk",
        ] {
            assert!(same_repository(base, same), "{same}");
        }
        for other in [
            "https://github.com/pikasTech/other",
            "https://github.com/PikasTech/unidesk",
            "http://github.com/pikasTech/unidesk",
            "https://github.com:8443/pikasTech/unidesk",
            "https://gitlab.com/pikasTech/unidesk",
        ] {
            assert!(!same_repository(base, other), "{other}");
        }
    }

    #[test]
    fn script_paths() {
        assert!(check_script_path("scripts/ci/dev-e2e.sh").is_ok());
        assert!(check_script_path("scripts/ci/a.b_c.sh").is_ok());
        for bad in [
            "scripts/ci/.sh",
            "scripts/ci/.hidden.sh",
            "scripts/ci/a..b.sh",
            "scripts/ci/a b.sh",
            "scripts/ci/a\\b.sh",
            "./scripts/ci/a.sh",
            "scripts/ci/a.sh\n",
            "scripts/cia.sh",
        ] {
            assert!(check_script_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn typed_serde_agrees_with_the_strict_parser() {
        // The derived Deserialize (used by other readers) also refuses unknown fields.
        let entry = format!(r#"{{"id":"web","repo":"{REPO}","commitId":"{SHA_A}","ports":1}}"#);
        assert!(serde_json::from_str::<ServiceEntry>(&entry).is_err());
    }

    fn arb_environment() -> impl Strategy<Value = Environment> {
        prop_oneof![Just(Environment::Dev), Just(Environment::Prod)]
    }

    fn arb_service() -> impl Strategy<Value = ServiceEntry> {
        (
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            prop_oneof![
                "https://[a-z]{1,10}\\.[a-z]{2,3}/[A-Za-z0-9_/.-]{0,20}",
                "http://127\\.0\\.0\\.1:[0-9]{2,5}/[a-z]{1,8}\\.git",
                "file:///[a-z]{1,8}/[a-z]{1,8}\\.git",
            ],
            "[0-9a-f]{4,40}",
        )
            .prop_map(|(id, repo, commit_id)| ServiceEntry {
                id,
                repo,
                commit_id,
            })
    }

    fn arb_services() -> impl Strategy<Value = Vec<ServiceEntry>> {
        proptest::collection::vec(arb_service(), 0..6).prop_map(|mut v| {
            let mut seen = std::collections::HashSet::new();
            v.retain(|s| seen.insert(s.id.clone()));
            v
        })
    }

    fn arb_ci() -> impl Strategy<Value = CiSpec> {
        (
            "[a-z0-9][a-z0-9_-]{0,15}",
            MIN_CI_TIMEOUT_MS..=MAX_CI_TIMEOUT_MS,
        )
            .prop_map(|(name, timeout_ms)| CiSpec {
                repo: REPO.to_owned(),
                script_path: format!("scripts/ci/{name}.sh"),
                timeout_ms,
            })
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        prop_oneof![
            (proptest::option::of(arb_environment()), arb_services()).prop_map(
                |(environment, services)| Manifest::V1 {
                    environment,
                    services
                }
            ),
            (
                proptest::option::of((proptest::option::of(arb_ci()), arb_services())),
                proptest::option::of(arb_services()),
            )
                .prop_map(|(dev, prod)| {
                    let mut environments = BTreeMap::new();
                    if let Some((ci, services)) = dev {
                        environments.insert(Environment::Dev, EnvironmentManifest { ci, services });
                    }
                    if let Some(services) = prod {
                        environments.insert(
                            Environment::Prod,
                            EnvironmentManifest { ci: None, services },
                        );
                    }
                    Manifest::V2 { environments }
                }),
        ]
    }

    proptest! {
        /// Every generated manifest is accepted, and serializing then parsing gives it back.
        #[test]
        fn accepted_manifests_round_trip(m in arb_manifest()) {
            let bytes = serde_json::to_vec(&m).unwrap();
            let parsed = parse(&bytes).unwrap();
            prop_assert_eq!(&parsed, &m);
            prop_assert_eq!(serde_json::to_vec(&parsed).unwrap(), bytes);
        }

        /// Mutated documents: whatever the parser accepts round-trips to the same value.
        #[test]
        fn anything_accepted_round_trips(
            m in arb_manifest(),
            cut in 0usize..400,
            insert in "[ -~]{0,6}",
        ) {
            let mut text = serde_json::to_string(&m).unwrap();
            let at = text.char_indices().map(|(i, _)| i).nth(cut).unwrap_or(text.len());
            text.insert_str(at, &insert);
            if let Ok(parsed) = parse(text.as_bytes()) {
                let again = parse(&serde_json::to_vec(&parsed).unwrap()).unwrap();
                prop_assert_eq!(again, parsed);
            }
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }
    }
}
