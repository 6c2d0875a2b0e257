//! Verification of a k3s deploy (pure): the live Deployment and the service's health, read
//! through the API server, must all show the requested full commit. A healthy service that
//! reports another commit fails, naming what disagreed.

use serde_json::Value;

/// What the live Deployment shows (read back from the API server after the rollout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentEvidence {
    /// The Deployment's name.
    pub deployment: String,
    /// Its `unidesk.ai/deploy-commit` annotation.
    pub annotation_commit: Option<String>,
    /// The listed container's `UNIDESK_DEPLOY_COMMIT` env value.
    pub env_commit: Option<String>,
}

/// What one health endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvidence {
    /// Where it was read, e.g. `service unidesk-dev/backend-core-dev:8080/health`.
    pub source: String,
    /// `deploy.commit` of the answer; `None` when the answer has none.
    pub commit: Option<String>,
}

/// Why the live service does not prove the requested commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K8sVerifyError {
    /// The requested commit is not a full SHA; nothing can be proven against it.
    #[error("expected commit {0:?} is not a full 40-hex SHA")]
    NotFullSha(String),
    /// No Deployment evidence at all.
    #[error("no Deployment was read back, so nothing proves commit {expected}")]
    NoDeployment { expected: String },
    /// A piece of evidence is missing.
    #[error("{what} is missing, requested commit {expected}")]
    Missing { what: String, expected: String },
    /// A piece of evidence shows another commit.
    #[error("{what} shows commit {live}, requested {expected}")]
    WrongCommit {
        what: String,
        live: String,
        expected: String,
    },
}

/// `deploy.commit` of a health answer, if it has one.
pub fn health_commit(health: &Value) -> Option<String> {
    health
        .pointer("/deploy/commit")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn same_commit(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Decides whether the evidence proves `expected_full_sha`: every Deployment's annotation
/// and env, and every health answer's `deploy.commit`, must equal it. Commits are compared
/// as full SHAs (a short prefix is not proof).
pub fn judge_verification(
    expected_full_sha: &str,
    deployments: &[DeploymentEvidence],
    health: &[HealthEvidence],
) -> Result<(), K8sVerifyError> {
    let expected = expected_full_sha.to_owned();
    if expected.len() != 40 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(K8sVerifyError::NotFullSha(expected));
    }
    if deployments.is_empty() {
        return Err(K8sVerifyError::NoDeployment { expected });
    }
    let check = |what: String, live: &Option<String>| match live {
        None => Err(K8sVerifyError::Missing {
            what,
            expected: expected.clone(),
        }),
        Some(live) if !same_commit(live, &expected) => Err(K8sVerifyError::WrongCommit {
            what,
            live: live.clone(),
            expected: expected.clone(),
        }),
        Some(_) => Ok(()),
    };
    for d in deployments {
        check(
            format!(
                "Deployment {} annotation {}",
                d.deployment,
                super::manifest::ANNOTATION_DEPLOY_COMMIT
            ),
            &d.annotation_commit,
        )?;
        check(
            format!(
                "Deployment {} env {}",
                d.deployment,
                super::manifest::ENV_COMMIT
            ),
            &d.env_commit,
        )?;
    }
    for h in health {
        check(format!("health deploy.commit from {}", h.source), &h.commit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "0123456789abcdef0123456789abcdef01234567";
    const OLD: &str = "89abcdef0123456789abcdef0123456789abcdef";

    fn dep(annotation: Option<&str>, env: Option<&str>) -> DeploymentEvidence {
        DeploymentEvidence {
            deployment: "web".into(),
            annotation_commit: annotation.map(Into::into),
            env_commit: env.map(Into::into),
        }
    }

    fn health(commit: Option<&str>) -> HealthEvidence {
        HealthEvidence {
            source: "service unidesk-dev/web:8080/health".into(),
            commit: commit.map(Into::into),
        }
    }

    #[test]
    fn k8s_verify_all_evidence_agrees() {
        judge_verification(NEW, &[dep(Some(NEW), Some(NEW))], &[health(Some(NEW))]).unwrap();
        // Upper-case hex is the same commit.
        let upper = NEW.to_uppercase();
        judge_verification(NEW, &[dep(Some(&upper), Some(NEW))], &[]).unwrap();
    }

    #[test]
    fn k8s_verify_healthy_old_commit_fails() {
        let err = judge_verification(NEW, &[dep(Some(NEW), Some(NEW))], &[health(Some(OLD))])
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("health deploy.commit"), "{text}");
        assert!(text.contains(OLD) && text.contains(NEW), "{text}");
    }

    #[test]
    fn k8s_verify_names_what_disagreed() {
        let cases = [
            (
                dep(Some(OLD), Some(NEW)),
                vec![],
                "annotation unidesk.ai/deploy-commit shows",
            ),
            (
                dep(Some(NEW), Some(OLD)),
                vec![],
                "env UNIDESK_DEPLOY_COMMIT shows",
            ),
            (
                dep(None, Some(NEW)),
                vec![],
                "annotation unidesk.ai/deploy-commit is missing",
            ),
            (
                dep(Some(NEW), None),
                vec![],
                "env UNIDESK_DEPLOY_COMMIT is missing",
            ),
            (
                dep(Some(NEW), Some(NEW)),
                vec![health(None)],
                "health deploy.commit from service",
            ),
            (
                dep(Some(&NEW[..12]), Some(NEW)),
                vec![],
                "shows commit 0123456789ab,",
            ),
        ];
        for (d, h, fragment) in cases {
            let err = judge_verification(NEW, &[d], &h).unwrap_err().to_string();
            assert!(err.contains(fragment), "{fragment:?} not in {err:?}");
        }
        assert!(matches!(
            judge_verification(NEW, &[], &[]),
            Err(K8sVerifyError::NoDeployment { .. })
        ));
        assert!(matches!(
            judge_verification("abc", &[dep(Some("abc"), Some("abc"))], &[]),
            Err(K8sVerifyError::NotFullSha(_))
        ));
    }

    #[test]
    fn k8s_verify_health_commit_is_read_from_deploy_commit() {
        let v = serde_json::json!({"ok": true, "deploy": {"commit": NEW, "repo": "r"}});
        assert_eq!(health_commit(&v).as_deref(), Some(NEW));
        assert_eq!(health_commit(&serde_json::json!({"ok": true})), None);
        assert_eq!(
            health_commit(&serde_json::json!({"deploy": {"commit": 5}})),
            None
        );
    }
}
