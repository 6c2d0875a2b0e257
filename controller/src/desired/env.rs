//! Environment mode's Git edge: reads `deploy.json` from an environment's fixed desired-state
//! ref in an already fetched bare mirror, and says which commit and blob it came from.
//!
//! It only reads a mirror the caller fetched (the CLI fetches with
//! `unidesk_agent::launch::materialize::MirrorCache`); it must not fetch, parse the manifest or
//! decide anything. The ref is never configurable: it is [`Environment::desired_ref`] mapped to
//! the branch the mirror keeps (`origin/deploy/dev` is `refs/heads/deploy/dev`).

use git2::{ObjectType, Oid};
use unidesk_agent::launch::materialize::{MaterializeError, Mirror};

use super::manifest::Environment;

/// The file environment mode reads at the root of the desired-state ref's commit.
pub const MANIFEST_PATH: &str = "deploy.json";

/// The largest `deploy.json` read from a desired-state ref.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// `deploy.json` as one desired-state ref holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredManifest {
    /// The full SHA of the commit the ref points at.
    pub commit: String,
    /// The Git blob id of `deploy.json` in that commit.
    pub blob: String,
    /// The file's content.
    pub bytes: Vec<u8>,
}

/// The desired-state manifest of an environment could not be read from the mirror.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The remote has no branch for the environment's fixed ref.
    #[error(
        "the desired-state repository {repo} has no {desired_ref} ({reference}): \
         push deploy.json for --env {env} to that branch"
    )]
    RefMissing {
        repo: String,
        env: Environment,
        desired_ref: &'static str,
        reference: String,
    },
    /// The remote has no `master` branch (the CI runner reads `origin/master`).
    #[error(
        "the desired-state repository {repo} has no origin/master ({reference}): push \
         deploy.json with environments.dev.ci to master"
    )]
    MasterMissing { repo: String, reference: String },
    /// The ref could not be read or does not lead to a commit.
    #[error("reading {reference} of the desired-state repository")]
    Ref {
        reference: String,
        // Boxed: the materialize error is large and this one travels by value.
        #[source]
        source: Box<MaterializeError>,
    },
    /// `deploy.json` is missing from the commit, not a file, or too large.
    #[error("reading {MANIFEST_PATH} from {desired_ref}")]
    Manifest {
        desired_ref: &'static str,
        // Boxed: the materialize error is large and this one travels by value.
        #[source]
        source: Box<MaterializeError>,
    },
}

/// The branch a mirror fetched with `+refs/heads/*:refs/heads/*` keeps for `env`'s fixed
/// desired-state ref: `origin/<branch>` is the remote's `refs/heads/<branch>`.
pub fn mirror_ref(env: Environment) -> String {
    let desired = env.desired_ref();
    let branch = desired.strip_prefix("origin/").unwrap_or(desired);
    format!("refs/heads/{branch}")
}

/// The ref the CI runner reads `deploy.json#environments.dev` from.
pub const CI_DESIRED_REF: &str = "origin/master";

/// Reads `deploy.json` at the commit `env`'s desired-state ref points at in `mirror`. Blocking.
pub fn read_manifest(mirror: &Mirror, env: Environment) -> Result<DesiredManifest, EnvError> {
    let reference = mirror_ref(env);
    let missing = || EnvError::RefMissing {
        repo: mirror.url().to_owned(),
        env,
        desired_ref: env.desired_ref(),
        reference: reference.clone(),
    };
    read_at(mirror, &reference, env.desired_ref(), missing)
}

/// Reads `deploy.json` at the commit `origin/master` points at in `mirror` (the CI runner's
/// source: never a local file, never an environment branch). Blocking.
pub fn read_master_manifest(mirror: &Mirror) -> Result<DesiredManifest, EnvError> {
    let reference = "refs/heads/master".to_owned();
    let missing = || EnvError::MasterMissing {
        repo: mirror.url().to_owned(),
        reference: reference.clone(),
    };
    read_at(mirror, &reference, CI_DESIRED_REF, missing)
}

fn read_at(
    mirror: &Mirror,
    reference: &str,
    desired_ref: &'static str,
    missing: impl FnOnce() -> EnvError,
) -> Result<DesiredManifest, EnvError> {
    let commit = mirror
        .ref_commit(reference)
        .map_err(|source| EnvError::Ref {
            reference: reference.to_owned(),
            source: Box::new(source),
        })?
        .ok_or_else(missing)?;
    let bytes = mirror
        .read_blob(commit, MANIFEST_PATH, MAX_MANIFEST_BYTES)
        .map_err(|source| EnvError::Manifest {
            desired_ref,
            source: Box::new(source),
        })?;
    // The id Git gives these bytes as a blob is the id of the tree entry just read.
    let blob = Oid::hash_object(ObjectType::Blob, &bytes).map_err(|source| EnvError::Manifest {
        desired_ref,
        source: Box::new(MaterializeError::Git {
            repo: mirror.url().to_owned(),
            what: MANIFEST_PATH.to_owned(),
            source,
        }),
    })?;
    Ok(DesiredManifest {
        commit: commit.to_string(),
        blob: blob.to_string(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{Repository, Signature};
    use unidesk_agent::launch::materialize::MirrorCache;

    /// Commits `files` on `branch` of the bare repository (a root commit each time).
    fn commit_on(repo: &Repository, branch: &str, files: &[(&str, &str)]) -> Oid {
        let mut builder = repo.treebuilder(None).unwrap();
        for (name, content) in files {
            let blob = repo.blob(content.as_bytes()).unwrap();
            builder.insert(name, blob, 0o100644).unwrap();
        }
        let tree = repo.find_tree(builder.write().unwrap()).unwrap();
        let sig = Signature::now("test", "test@example.invalid").unwrap();
        repo.commit(
            Some(&format!("refs/heads/{branch}")),
            &sig,
            &sig,
            branch,
            &tree,
            &[],
        )
        .unwrap()
    }

    /// Fetches `<dir>/origin.git` into a mirror under `<dir>/mirrors`.
    fn fetched(dir: &std::path::Path) -> Mirror {
        let url = format!("file://{}", dir.join("origin.git").display());
        MirrorCache::new(dir.join("mirrors"))
            .fetch(
                &url,
                &Default::default(),
                &tokio_util::sync::CancellationToken::new(),
                |_| {},
            )
            .unwrap()
    }

    #[test]
    fn the_mirror_ref_is_the_fixed_branch() {
        assert_eq!(mirror_ref(Environment::Dev), "refs/heads/deploy/dev");
        assert_eq!(mirror_ref(Environment::Prod), "refs/heads/deploy/prod");
    }

    #[test]
    fn reads_each_environment_from_its_own_ref() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("origin.git")).unwrap();
        commit_on(&origin, "master", &[("deploy.json", "master")]);
        let dev = commit_on(&origin, "deploy/dev", &[("deploy.json", "dev")]);
        let mirror = fetched(dir.path());

        let read = read_manifest(&mirror, Environment::Dev).unwrap();
        assert_eq!(read.commit, dev.to_string());
        assert_eq!(read.bytes, b"dev");
        let tree = origin.find_commit(dev).unwrap().tree().unwrap();
        assert_eq!(
            read.blob,
            tree.get_name("deploy.json").unwrap().id().to_string()
        );

        let err = read_manifest(&mirror, Environment::Prod).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, EnvError::RefMissing { .. }), "{text}");
        assert!(
            text.contains("origin/deploy/prod") && text.contains("refs/heads/deploy/prod"),
            "{text}"
        );
    }

    #[test]
    fn a_ref_without_deploy_json_names_the_ref() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Repository::init_bare(dir.path().join("origin.git")).unwrap();
        commit_on(&origin, "deploy/dev", &[("README", "no manifest here")]);
        let mirror = fetched(dir.path());
        let err = read_manifest(&mirror, Environment::Dev).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert!(
            chain.contains("origin/deploy/dev") && chain.contains("deploy.json does not exist"),
            "{chain}"
        );
    }
}
