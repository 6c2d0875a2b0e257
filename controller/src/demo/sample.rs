//! The demo's sample service: a bare Git repository whose commits hold a Dockerfile that
//! makes a busybox image serving `{"deploy":{"commit":…}}` on a loopback port. Tests build
//! their fixtures with the same builder.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository, Signature};

/// The base image `scripts/testbed-up` makes from Debian's static busybox; nothing is pulled.
pub const BASE_IMAGE: &str = "local/busybox:latest";

/// A sample-repository operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("sample repository {path}: {what}: {source}")]
pub struct SampleError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: git2::Error,
}

/// The Dockerfile of the sample service. The health file reports `health_commit` (normally
/// `$UNIDESK_DEPLOY_COMMIT`, the build argument); `extra` adds Dockerfile lines before `CMD`.
pub fn dockerfile(port: u16, health_commit: &str, extra: &str) -> String {
    format!(
        "FROM {BASE_IMAGE}\n\
         ARG UNIDESK_DEPLOY_COMMIT=unknown\n\
         COPY . /src\n\
         RUN mkdir -p /www && echo \"{{\\\"deploy\\\":{{\\\"commit\\\":\\\"{health_commit}\\\"}}}}\" > /www/health\n\
         {extra}\
         CMD [\"busybox\", \"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"/www\"]\n"
    )
}

/// A bare repository that commits are added to, on `master`.
pub struct SampleRepo {
    pub path: PathBuf,
    repo: Repository,
}

impl SampleRepo {
    /// Creates `<root>/<name>.git`.
    pub fn create(root: &Path, name: &str) -> Result<SampleRepo, SampleError> {
        let path = root.join(format!("{name}.git"));
        let repo = Repository::init_bare(&path).map_err(|source| SampleError {
            path: path.clone(),
            what: "init",
            source,
        })?;
        Ok(SampleRepo { path, repo })
    }

    /// Commits exactly `files` (path, content) as the next commit of `master`.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> Result<Oid, SampleError> {
        let err = |what| {
            let path = self.path.clone();
            move |source| SampleError { path, what, source }
        };
        let mut index = git2::Index::new().map_err(err("index"))?;
        for (path, content) in files {
            let blob = self.repo.blob(content.as_bytes()).map_err(err("blob"))?;
            let entry = git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode: 0o100644,
                uid: 0,
                gid: 0,
                file_size: u32::try_from(content.len()).unwrap_or(u32::MAX),
                id: blob,
                flags: 0,
                flags_extended: 0,
                path: path.as_bytes().to_vec(),
            };
            index.add(&entry).map_err(err("index add"))?;
        }
        let tree_id = index.write_tree_to(&self.repo).map_err(err("write tree"))?;
        let tree = self.repo.find_tree(tree_id).map_err(err("find tree"))?;
        let sig =
            Signature::now("unidesk demo", "demo@unidesk.invalid").map_err(err("signature"))?;
        let parent = self
            .repo
            .refname_to_id("refs/heads/master")
            .ok()
            .and_then(|id| self.repo.find_commit(id).ok());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        self.repo
            .commit(
                Some("refs/heads/master"),
                &sig,
                &sig,
                message,
                &tree,
                &parents,
            )
            .map_err(err("commit"))
    }
}
