//! Agent credentials: each agent id has its own secret; the controller keeps only its
//! SHA-256. Secrets are 32 random bytes, so a plain hash is enough (no dictionary to guess).
//!
//! The decision is a pure function of the configured credentials and the Hello.

use sha2::{Digest, Sha256};
use unidesk_protocol::{AgentId, Secret};

use crate::config::AgentCredential;

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
}
