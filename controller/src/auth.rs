//! Agent credentials: each agent id has its own secret; the controller keeps only its
//! SHA-256. Secrets are 32 random bytes, so a plain hash is enough (no dictionary to guess).
//!
//! The decision is a pure function of the configured credentials and the Hello.
//! [`Credentials`] is the gateway's view of them: the entries of the controller's
//! configuration file, read again when the file was replaced, so `agent add|rotate|revoke`
//! take effect at the next Hello without a restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use unidesk_protocol::{AgentId, Secret};

use crate::config::{AgentCredential, ControllerConfig};

/// Why an agent was refused. The text is sent to the agent and logged on both sides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("agent {0} is not known to this controller")]
    UnknownAgent(AgentId),
    #[error("agent {0} presented a wrong credential")]
    WrongCredential(AgentId),
    #[error("agent {0} has a revoked credential")]
    Revoked(AgentId),
}

/// The hex SHA-256 of a secret, as stored in the controller config.
pub fn hash_secret(secret: &Secret) -> String {
    hex::encode(Sha256::digest(secret.expose().as_bytes()))
}

/// A new random secret (32 bytes, hex).
pub fn new_secret() -> Secret {
    let bytes: [u8; 32] = rand::random();
    Secret::new(hex::encode(bytes))
}

/// Checks an agent's credential against the configured ones.
pub fn authenticate(
    credentials: &[AgentCredential],
    agent: &AgentId,
    secret: &Secret,
) -> Result<(), AuthError> {
    let Some(entry) = credentials.iter().find(|c| &c.id == agent) else {
        return Err(AuthError::UnknownAgent(agent.clone()));
    };
    let presented = hash_secret(secret);
    // Compare in constant time so timing does not reveal how much of the hash matched.
    let same = presented.len() == entry.secret_sha256.len()
        && presented
            .bytes()
            .zip(entry.secret_sha256.to_ascii_lowercase().bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(AuthError::WrongCredential(agent.clone()));
    }
    if entry.revoked {
        return Err(AuthError::Revoked(agent.clone()));
    }
    Ok(())
}

/// Identifies one version of a file: a rewrite through `atomic::write_file` makes a new inode,
/// an edit in place changes the size or the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified_ns: i128,
}

impl Stamp {
    fn of(path: &std::path::Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(Stamp {
            inode: meta.ino(),
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

/// The agent credentials the gateway checks each Hello against.
#[derive(Debug)]
pub struct Credentials {
    /// The configuration file to follow; `None` keeps the entries given at start.
    file: Option<PathBuf>,
    cached: Mutex<(Option<Stamp>, Arc<Vec<AgentCredential>>)>,
}

impl Credentials {
    /// Credentials that never change.
    pub fn fixed(entries: Vec<AgentCredential>) -> Credentials {
        Credentials {
            file: None,
            cached: Mutex::new((None, Arc::new(entries))),
        }
    }

    /// The entries of `config`, followed in the file it was loaded from (when it was).
    pub fn following(config: &ControllerConfig) -> Credentials {
        if config.file.as_os_str().is_empty() {
            return Credentials::fixed(config.agents.clone());
        }
        let stamp = Stamp::of(&config.file).ok();
        Credentials {
            file: Some(config.file.clone()),
            cached: Mutex::new((stamp, Arc::new(config.agents.clone()))),
        }
    }

    /// The entries now: a stat of the file per call, a parse only when it changed. A file
    /// that no longer loads keeps the last good entries and says why in the log.
    pub fn current(&self) -> Arc<Vec<AgentCredential>> {
        let mut cached = match self.cached.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(file) = &self.file else {
            return cached.1.clone();
        };
        let stamp = match Stamp::of(file) {
            Ok(stamp) => stamp,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot stat the controller config; keeping the agent credentials read before");
                return cached.1.clone();
            }
        };
        if cached.0 == Some(stamp) {
            return cached.1.clone();
        }
        match ControllerConfig::load(file) {
            Ok(config) => {
                tracing::info!(file = %file.display(), agents = config.agents.len(), "agent credentials re-read");
                *cached = (Some(stamp), Arc::new(config.agents));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the controller config no longer loads; keeping the agent credentials read before");
                // Remember the stamp so a broken file is reported once, not at every Hello.
                cached.0 = Some(stamp);
            }
        }
        cached.1.clone()
    }

    /// Checks an agent's credential against the current entries.
    pub fn authenticate(&self, agent: &AgentId, secret: &Secret) -> Result<(), AuthError> {
        authenticate(&self.current(), agent, secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(id: &str, secret: &Secret, revoked: bool) -> AgentCredential {
        AgentCredential {
            id: AgentId::new(id).unwrap(),
            secret_sha256: hash_secret(secret),
            revoked,
        }
    }

    #[test]
    fn right_wrong_unknown_and_revoked() {
        let s = new_secret();
        let creds = vec![cred("a", &s, false), cred("r", &s, true)];
        let a = AgentId::new("a").unwrap();
        assert_eq!(authenticate(&creds, &a, &s), Ok(()));
        assert_eq!(
            authenticate(&creds, &a, &Secret::new("nope")),
            Err(AuthError::WrongCredential(a.clone()))
        );
        let b = AgentId::new("b").unwrap();
        assert_eq!(
            authenticate(&creds, &b, &s).unwrap_err().to_string(),
            "agent b is not known to this controller"
        );
        let r = AgentId::new("r").unwrap();
        assert_eq!(authenticate(&creds, &r, &s), Err(AuthError::Revoked(r)));
    }

    #[test]
    fn followed_credentials_change_with_the_file() {
        use crate::config::{AgentEdit, rewrite_agents};
        let dir = tempfile::tempdir().unwrap();
        let report = crate::init::init(&crate::init::InitPlan {
            dir: dir.path().join("setup"),
            layout: crate::init::Layout::Local,
            agents: vec![AgentId::new("node").unwrap()],
            listen: "127.0.0.1:7443".parse().unwrap(),
            proxy_port: 18789,
            egress_allow: vec![],
        })
        .unwrap();
        let config = ControllerConfig::load(&report.controller_config).unwrap();
        let agent = unidesk_agent::config::AgentConfig::load(&report.agent_configs[0]).unwrap();
        let old = agent.secret.clone().unwrap();
        let node = AgentId::new("node").unwrap();
        let credentials = Credentials::following(&config);
        assert_eq!(credentials.authenticate(&node, &old), Ok(()));

        let new = new_secret();
        rewrite_agents(
            &config.file,
            &AgentEdit::Rotate {
                id: node.clone(),
                secret_sha256: hash_secret(&new),
            },
        )
        .unwrap();
        assert_eq!(
            credentials.authenticate(&node, &old),
            Err(AuthError::WrongCredential(node.clone()))
        );
        assert_eq!(credentials.authenticate(&node, &new), Ok(()));

        rewrite_agents(&config.file, &AgentEdit::Revoke { id: node.clone() }).unwrap();
        assert_eq!(
            credentials.authenticate(&node, &new),
            Err(AuthError::Revoked(node.clone()))
        );

        // A file broken by hand keeps the last good entries.
        std::fs::write(&config.file, "not toml [").unwrap();
        assert_eq!(
            credentials.authenticate(&node, &new),
            Err(AuthError::Revoked(node.clone()))
        );
        let fixed = Credentials::fixed(config.agents.clone());
        assert_eq!(fixed.authenticate(&node, &old), Ok(()));
    }
}
