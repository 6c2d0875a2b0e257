//! Materialize: the Git edge of a launch. This module owns the persistent bare mirror of each
//! repository (one directory per URL under the cache root), fetching it with git2 through the
//! egress proxy, resolving a requested commit to its full SHA, reading files at a commit and
//! streaming a commit's tree as a Docker build context tar.
//!
//! It must not touch a working tree, shell out to `git`, or hold more than one blob in memory
//! at a time. Everything here blocks (libgit2 does network and disk I/O synchronously), so
//! async callers run it in `tokio::task::spawn_blocking`; fetches watch a
//! [`CancellationToken`] from libgit2's progress callbacks.
//!
//! The context tar is the file set of `git archive` of the commit restricted to the context
//! directory, minus what the context's `.dockerignore` excludes (see [`super::dockerignore`]).
//! `git archive`'s `export-ignore` attribute is read from the commit's own `.gitattributes`
//! files (top level and per directory), with these limits:
//! - only `export-ignore`, `-export-ignore` and `!export-ignore` are understood; the last is
//!   treated like `-export-ignore`, and macros (`[attr]`) are not expanded;
//! - quoted patterns (`"a b" export-ignore`) are skipped;
//! - `$GIT_DIR/info/attributes` and `export-subst` are not applied;
//! - submodules are written as empty directories, as `git archive` does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use git2::{
    AutotagOption, CertificateCheckStatus, ErrorCode, FetchOptions, ObjectType, Oid, ProxyOptions,
    RemoteCallbacks, Repository, Tree,
};
use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dockerignore::{DockerIgnore, DockerIgnoreError};

/// What every fetch asks for: all branches and tags, force-updated, so the mirror follows
/// the remote.
const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// The largest `.dockerignore` or `.gitattributes` read while building a context.
pub const MAX_CONTROL_FILE_BYTES: u64 = 1024 * 1024;

/// Tree entry modes, as Git writes them.
const MODE_TREE: i32 = 0o040000;
const MODE_FILE: i32 = 0o100644;
const MODE_FILE_GROUP_WRITABLE: i32 = 0o100664;
const MODE_EXECUTABLE: i32 = 0o100755;
const MODE_SYMLINK: i32 = 0o120000;
const MODE_GITLINK: i32 = 0o160000;

/// A materialize step that cannot go on. Repository URLs in errors have any user info removed.
#[derive(Debug, Error)]
pub enum MaterializeError {
    /// The repository URL is not one this agent fetches.
    #[error("repository url {url:?} is not supported: {reason}")]
    UnsupportedUrl { url: String, reason: &'static str },
    /// The mirror directory could not be created.
    #[error("cannot create mirror directory {}", path.display())]
    MirrorDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The mirror exists but libgit2 cannot open or initialise it.
    #[error("cannot open bare mirror of {repo} at {}", path.display())]
    OpenMirror {
        repo: String,
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    /// The extra CA certificates given for HTTPS fetches are unusable.
    #[error("extra CA certificates for fetching are not usable: {reason}")]
    ExtraCa { reason: String },
    /// The fetch failed (network, proxy, TLS or remote).
    #[error("fetching {repo} into {}", path.display())]
    Fetch {
        repo: String,
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    /// The fetch stopped because the launch was cancelled.
    #[error("fetching {repo} was cancelled")]
    Cancelled { repo: String },
    /// A requested commit that is not 4 to 40 hexadecimal characters.
    #[error("requested commit {requested:?} for {repo} is not 4 to 40 hexadecimal characters")]
    InvalidCommitId { repo: String, requested: String },
    /// No commit in the mirror has this id or prefix.
    #[error("no commit {requested} in {repo}")]
    CommitNotFound { repo: String, requested: String },
    /// A short SHA that more than one commit starts with.
    #[error("commit prefix {prefix} is ambiguous in {repo}: {}", candidates.join(", "))]
    AmbiguousCommit {
        repo: String,
        prefix: String,
        candidates: Vec<String>,
    },
    /// The full SHA names an object that is not a commit.
    #[error("{sha} in {repo} is a {kind}, not a commit")]
    NotACommit {
        repo: String,
        sha: String,
        kind: &'static str,
    },
    /// A repository-relative path that is absolute, climbs out with `..` or names nothing.
    #[error("path {path:?} is not a repository-relative path: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// Nothing at this path in the commit.
    #[error("{path} does not exist at commit {commit} of {repo}")]
    PathNotFound {
        repo: String,
        commit: String,
        path: String,
    },
    /// The path exists but is not a regular file.
    #[error("{path} at commit {commit} of {repo} is not a regular file")]
    NotAFile {
        repo: String,
        commit: String,
        path: String,
    },
    /// The path exists but is not a directory.
    #[error("{path} at commit {commit} of {repo} is not a directory")]
    NotADirectory {
        repo: String,
        commit: String,
        path: String,
    },
    /// A file larger than the caller allows.
    #[error("{path} at commit {commit} of {repo} is {size} bytes, more than the {max} allowed")]
    BlobTooLarge {
        repo: String,
        commit: String,
        path: String,
        size: u64,
        max: u64,
    },
    /// A path in the tree that is not UTF-8.
    #[error("{path:?} at commit {commit} of {repo} is not valid UTF-8")]
    NonUtf8Path {
        repo: String,
        commit: String,
        path: String,
    },
    /// A tree entry named `.`, `..` or holding a `/`: it would escape the build context.
    #[error(
        "tree entry {path:?} at commit {commit} of {repo} would escape the build context \
         (`.`, `..` and `/` are not allowed in an entry name)"
    )]
    UnsafeTreeEntry {
        repo: String,
        commit: String,
        path: String,
    },
    /// The Dockerfile is not below the build context.
    #[error("dockerfile {dockerfile} is outside the build context {context}")]
    DockerfileOutsideContext { dockerfile: String, context: String },
    /// `git archive` would leave this path out, so it cannot be used.
    #[error("{path} at commit {commit} of {repo} is export-ignored by .gitattributes")]
    ExportIgnored {
        repo: String,
        commit: String,
        path: String,
    },
    /// The context's `.dockerignore` is not valid.
    #[error("{path} at commit {commit} of {repo}")]
    DockerIgnore {
        repo: String,
        commit: String,
        path: String,
        #[source]
        source: DockerIgnoreError,
    },
    /// Writing the context tar failed (usually the reader went away).
    #[error("writing {path} of commit {commit} of {repo} to the context tar")]
    TarWrite {
        repo: String,
        commit: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// libgit2 failed reading the mirror.
    #[error("reading {what} in the mirror of {repo}")]
    Git {
        repo: String,
        what: String,
        #[source]
        source: git2::Error,
    },
}

type Result<T, E = MaterializeError> = std::result::Result<T, E>;

/// How fetches reach the network.
#[derive(Debug, Clone, Default)]
pub struct FetchNet {
    /// The HTTP proxy for fetches, e.g. `http://127.0.0.1:18789` (the node-local egress
    /// proxy); `None` fetches directly and never consults proxy environment variables.
    pub proxy: Option<String>,
    /// PEM CA certificates trusted for HTTPS remotes in addition to the system's.
    pub extra_ca_pem: Option<Vec<u8>>,
}

/// Counts of one context tar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextStats {
    /// Regular files and symlinks written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Tree entries left out by `export-ignore` or `.dockerignore` (a skipped directory
    /// counts once).
    pub excluded: u64,
}

/// The persistent bare mirrors, one directory per repository URL under `root`.
#[derive(Debug, Clone)]
pub struct MirrorCache {
    root: PathBuf,
}

/// One repository's bare mirror, opened.
pub struct Mirror {
    repo: Repository,
    url: String,
    path: PathBuf,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("url", &self.url)
            .field("path", &self.path)
            .finish()
    }
}

impl MirrorCache {
    /// A cache keeping its mirrors under `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> MirrorCache {
        MirrorCache { root: root.into() }
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The mirror directory for `url`: a readable slug of the URL (user info dropped) and a
    /// hash of the whole URL, so the name is safe and stable and never the raw URL.
    pub fn mirror_dir(&self, url: &str) -> PathBuf {
        self.root.join(mirror_name(url))
    }

    /// Opens the mirror of `url`, creating an empty bare repository if there is none yet.
    /// Does no network I/O. Blocking.
    pub fn open(&self, url: &str) -> Result<Mirror> {
        check_url(url)?;
        let path = self.mirror_dir(url);
        let shown = redact_url(url);
        std::fs::create_dir_all(&path).map_err(|source| MaterializeError::MirrorDir {
            path: path.clone(),
            source,
        })?;
        let repo = match Repository::open_bare(&path) {
            Ok(repo) => repo,
            Err(err) if err.code() == ErrorCode::NotFound => {
                info!(repo = %shown, path = %path.display(), "creating bare mirror");
                Repository::init_bare(&path).map_err(|source| MaterializeError::OpenMirror {
                    repo: shown.clone(),
                    path: path.clone(),
                    source,
                })?
            }
            Err(source) => {
                return Err(MaterializeError::OpenMirror {
                    repo: shown,
                    path,
                    source,
                });
            }
        };
        Ok(Mirror {
            repo,
            url: shown,
            path,
        })
    }

    /// Fetches all branches and tags of `url` into its mirror (creating it if needed) and
    /// returns the mirror. `progress` gets an occasional human-readable line. Blocking: run
    /// it in `spawn_blocking`; cancelling `cancel` aborts the transfer at the next progress
    /// callback. Concurrent fetches of the same URL must be serialised by the caller.
    pub fn fetch(
        &self,
        url: &str,
        net: &FetchNet,
        cancel: &CancellationToken,
        progress: impl FnMut(String),
    ) -> Result<Mirror> {
        let mut progress = progress;
        let mirror = self.open(url)?;
        if cancel.is_cancelled() {
            return Err(MaterializeError::Cancelled { repo: mirror.url });
        }
        let verifier = net.extra_ca_pem.as_deref().map(ca_verifier).transpose()?;
        // libgit2 sends plain-http requests meant for a proxy straight to the origin server
        // (libgit2 issue 5650), which would leave the tunnel: such remotes are fetched from
        // the proxy itself, with the upstream named in the path. https goes by CONNECT.
        let via_proxy = net
            .proxy
            .as_deref()
            .and_then(|proxy| crate::egress::path_named_url(proxy, url));
        let remote_url = via_proxy.as_deref().unwrap_or(url);
        let mut remote =
            mirror
                .repo
                .remote_anonymous(remote_url)
                .map_err(|source| MaterializeError::Fetch {
                    repo: mirror.url.clone(),
                    path: mirror.path.clone(),
                    source,
                })?;

        let mut callbacks = RemoteCallbacks::new();
        let mut last_tenth = None;
        let progress_ref = &mut progress;
        callbacks.transfer_progress(move |p| {
            if cancel.is_cancelled() {
                return false;
            }
            let total = p.total_objects();
            let tenth = (p.received_objects() * 10).checked_div(total).unwrap_or(0);
            if last_tenth != Some(tenth) {
                last_tenth = Some(tenth);
                progress_ref(format!(
                    "receiving objects: {}% ({}/{}), {} KiB",
                    tenth * 10,
                    p.received_objects(),
                    total,
                    p.received_bytes() / 1024
                ));
            }
            true
        });
        callbacks.sideband_progress(|_| !cancel.is_cancelled());
        if let Some(verifier) = verifier {
            callbacks.certificate_check(move |cert, host| Ok(check_cert(&verifier, cert, host)));
        }
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks);
        options.download_tags(AutotagOption::None);
        if let (Some(proxy), None) = (&net.proxy, &via_proxy) {
            let mut proxy_options = ProxyOptions::new();
            proxy_options.url(proxy);
            options.proxy_options(proxy_options);
        }
        info!(repo = %mirror.url, path = %mirror.path.display(), proxy = ?net.proxy, "fetching");
        let fetched = remote.fetch(&REFSPECS, Some(&mut options), None);
        drop(options);
        match fetched {
            Ok(()) => {}
            Err(_) if cancel.is_cancelled() => {
                return Err(MaterializeError::Cancelled { repo: mirror.url });
            }
            Err(source) => {
                return Err(MaterializeError::Fetch {
                    repo: mirror.url,
                    path: mirror.path,
                    source,
                });
            }
        }
        let stats = remote.stats();
        let line = format!(
            "fetched {}: {} objects received, {} KiB",
            mirror.url,
            stats.received_objects(),
            stats.received_bytes() / 1024
        );
        drop(remote);
        info!(repo = %mirror.url, "{line}");
        progress(line);
        Ok(mirror)
    }
}

impl Mirror {
    /// The repository URL, with any user info removed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The mirror directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The commit the mirror's ref `name` (e.g. `refs/heads/deploy/dev`) points at, or `None`
    /// when the mirror has no such ref.
    pub fn ref_commit(&self, name: &str) -> Result<Option<Oid>> {
        let git = |source| MaterializeError::Git {
            repo: self.url.clone(),
            what: format!("ref {name}"),
            source,
        };
        match self.repo.find_reference(name) {
            Ok(found) => found.peel_to_commit().map(|c| Some(c.id())).map_err(git),
            Err(err) if err.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(err) => Err(git(err)),
        }
    }

    /// Resolves a commit id as `deploy.json` gives it (4 to 40 hex characters, any case) to
    /// the full id of a commit in the mirror. A prefix matched by no commit or by several is
    /// an error naming the candidates. Refs and other revision syntax are refused.
    pub fn resolve(&self, requested: &str) -> Result<Oid> {
        if !(4..=40).contains(&requested.len()) || !requested.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(MaterializeError::InvalidCommitId {
                repo: self.url.clone(),
                requested: requested.to_owned(),
            });
        }
        let prefix = requested.to_ascii_lowercase();
        let not_found = || MaterializeError::CommitNotFound {
            repo: self.url.clone(),
            requested: requested.to_owned(),
        };
        let odb = self
            .repo
            .odb()
            .map_err(|e| self.git_err("the object database", e))?;
        let short = Oid::from_str(&prefix).map_err(|e| self.git_err(&prefix, e))?;
        // Fast path: libgit2 knows whether the prefix names one object, none or several.
        let candidates = match odb.exists_prefix(short, prefix.len()) {
            Ok(oid) => vec![oid],
            Err(err) if err.code() == ErrorCode::NotFound => return Err(not_found()),
            Err(err) if err.code() == ErrorCode::Ambiguous => self.commits_with_prefix(&prefix)?,
            Err(err) => return Err(self.git_err(&prefix, err)),
        };
        match candidates.as_slice() {
            [] => Err(not_found()),
            [oid] => {
                let (_, kind) = odb
                    .read_header(*oid)
                    .map_err(|e| self.git_err(&oid.to_string(), e))?;
                if kind == ObjectType::Commit {
                    info!(repo = %self.url, requested, commit = %oid, "resolved");
                    Ok(*oid)
                } else if prefix.len() == 40 {
                    Err(MaterializeError::NotACommit {
                        repo: self.url.clone(),
                        sha: oid.to_string(),
                        kind: kind.str(),
                    })
                } else {
                    Err(not_found())
                }
            }
            _ => Err(MaterializeError::AmbiguousCommit {
                repo: self.url.clone(),
                prefix,
                candidates: candidates.iter().map(Oid::to_string).collect(),
            }),
        }
    }

    /// Every commit whose id starts with `prefix` (lower-case hex), sorted.
    fn commits_with_prefix(&self, prefix: &str) -> Result<Vec<Oid>> {
        let odb = self
            .repo
            .odb()
            .map_err(|e| self.git_err("the object database", e))?;
        let mut matching = std::collections::BTreeSet::new();
        odb.foreach(|oid| {
            if oid_has_prefix(oid, prefix) {
                matching.insert(*oid);
            }
            true
        })
        .map_err(|e| self.git_err("the object database", e))?;
        let mut commits = Vec::new();
        for oid in matching {
            let (_, kind) = odb
                .read_header(oid)
                .map_err(|e| self.git_err(&oid.to_string(), e))?;
            if kind == ObjectType::Commit {
                commits.push(oid);
            }
        }
        Ok(commits)
    }

    /// The content of the regular file `path` (repository-relative) at `commit`, refused if
    /// larger than `max_bytes` before it is loaded.
    pub fn read_blob(&self, commit: Oid, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let path = clean_file_path(path)?;
        let root = self.commit_tree(commit)?;
        let entry = match root.get_path(Path::new(&path)) {
            Ok(entry) => entry,
            Err(err) if err.code() == ErrorCode::NotFound => {
                return Err(MaterializeError::PathNotFound {
                    repo: self.url.clone(),
                    commit: commit.to_string(),
                    path,
                });
            }
            Err(err) => return Err(self.git_err(&path, err)),
        };
        if !is_file_mode(entry.filemode()) {
            return Err(MaterializeError::NotAFile {
                repo: self.url.clone(),
                commit: commit.to_string(),
                path,
            });
        }
        self.bounded_blob(commit, entry.id(), &path, max_bytes)
    }

    /// Streams the build context for `dockerfile` (repository-relative, inside `context_dir`)
    /// at `commit` into `out` as a tar: the commit's files under `context_dir` (`.` for the
    /// root) that `git archive` would export and the context's `.dockerignore` keeps (the
    /// Dockerfile and `.dockerignore` are always kept), paths relative to the context, modes
    /// 0644/0755 from the tree, symlinks as symlinks, owner 0 and mtime 0, so one commit always
    /// gives the same bytes. Blocking.
    pub fn write_context_tar<W: Write>(
        &self,
        commit: Oid,
        context_dir: &str,
        dockerfile: &str,
        out: W,
    ) -> Result<ContextStats> {
        let context = clean_repo_path(context_dir)?;
        let dockerfile_path = clean_file_path(dockerfile)?;
        let dockerfile_rel = dockerfile_in_context(&context, &dockerfile_path)?;
        let root = self.commit_tree(commit)?;
        let sha = commit.to_string();

        // The Dockerfile must be a file that `git archive` exports.
        match root.get_path(Path::new(&dockerfile_path)) {
            Ok(entry) if is_file_mode(entry.filemode()) => {}
            Ok(_) => {
                return Err(MaterializeError::NotAFile {
                    repo: self.url.clone(),
                    commit: sha,
                    path: dockerfile_path,
                });
            }
            Err(err) if err.code() == ErrorCode::NotFound => {
                return Err(MaterializeError::PathNotFound {
                    repo: self.url.clone(),
                    commit: sha,
                    path: dockerfile_path,
                });
            }
            Err(err) => return Err(self.git_err(&dockerfile_path, err)),
        }
        if self.export_ignored_along(commit, &root, &dockerfile_path, false)? {
            return Err(MaterializeError::ExportIgnored {
                repo: self.url.clone(),
                commit: sha,
                path: dockerfile_path,
            });
        }

        // The context directory and the attribute files of its ancestors.
        let context_tree = if context.is_empty() {
            root.clone()
        } else {
            let entry = root.get_path(Path::new(&context)).map_err(|err| {
                if err.code() == ErrorCode::NotFound {
                    MaterializeError::PathNotFound {
                        repo: self.url.clone(),
                        commit: sha.clone(),
                        path: context.clone(),
                    }
                } else {
                    self.git_err(&context, err)
                }
            })?;
            if entry.filemode() != MODE_TREE {
                return Err(MaterializeError::NotADirectory {
                    repo: self.url.clone(),
                    commit: sha,
                    path: context,
                });
            }
            self.repo
                .find_tree(entry.id())
                .map_err(|e| self.git_err(&context, e))?
        };
        let mut layers = Vec::new();
        if !context.is_empty() {
            let mut tree = root.clone();
            let mut dir = String::new();
            for name in context.split('/') {
                if let Some(layer) = self.attr_layer(commit, &tree, &dir)? {
                    layers.push(layer);
                }
                let child = join(&dir, name);
                if export_ignored(&layers, &child, true) {
                    return Err(MaterializeError::ExportIgnored {
                        repo: self.url.clone(),
                        commit: sha,
                        path: child,
                    });
                }
                tree = self.subtree(&tree, name, &child)?;
                dir = child;
            }
        }

        let mut ignore = self.context_dockerignore(commit, &root, &context)?;
        ignore.keep(&dockerfile_rel);
        ignore.keep(".dockerignore");

        let mut walk = Walk {
            mirror: self,
            commit,
            sha,
            ignore,
            layers,
            tar: tar::Builder::new(out),
            stats: ContextStats::default(),
        };
        walk.tree(&context_tree, &context, "")?;
        let Walk {
            tar, stats, sha, ..
        } = walk;
        tar.into_inner()
            .map_err(|source| MaterializeError::TarWrite {
                repo: self.url.clone(),
                commit: sha,
                path: "(end of archive)".to_owned(),
                source,
            })?;
        info!(
            repo = %self.url, commit = %commit, context = %context, files = stats.files,
            bytes = stats.bytes, excluded = stats.excluded, "context written"
        );
        Ok(stats)
    }

    /// The parsed `.dockerignore` of the context, empty when there is none or `git archive`
    /// would not export it.
    fn context_dockerignore(
        &self,
        commit: Oid,
        root: &Tree<'_>,
        context: &str,
    ) -> Result<DockerIgnore> {
        let path = join(context, ".dockerignore");
        let entry = match root.get_path(Path::new(&path)) {
            Ok(entry) => entry,
            Err(err) if err.code() == ErrorCode::NotFound => return Ok(DockerIgnore::default()),
            Err(err) => return Err(self.git_err(&path, err)),
        };
        if !is_file_mode(entry.filemode()) {
            return Err(MaterializeError::NotAFile {
                repo: self.url.clone(),
                commit: commit.to_string(),
                path,
            });
        }
        if self.export_ignored_along(commit, root, &path, false)? {
            debug!(
                path,
                "the .dockerignore is export-ignored, so Docker would not see it"
            );
            return Ok(DockerIgnore::default());
        }
        let bytes = self.bounded_blob(commit, entry.id(), &path, MAX_CONTROL_FILE_BYTES)?;
        let text = String::from_utf8_lossy(&bytes);
        DockerIgnore::parse(&text).map_err(|source| MaterializeError::DockerIgnore {
            repo: self.url.clone(),
            commit: commit.to_string(),
            path,
            source,
        })
    }

    /// Whether `git archive` would leave out `path` (or one of its directories).
    fn export_ignored_along(
        &self,
        commit: Oid,
        root: &Tree<'_>,
        path: &str,
        is_dir: bool,
    ) -> Result<bool> {
        let names: Vec<&str> = path.split('/').collect();
        let mut layers = Vec::new();
        let mut tree = root.clone();
        let mut dir = String::new();
        for (index, name) in names.iter().enumerate() {
            if let Some(layer) = self.attr_layer(commit, &tree, &dir)? {
                layers.push(layer);
            }
            let child = join(&dir, name);
            let last = index + 1 == names.len();
            if export_ignored(&layers, &child, !last || is_dir) {
                return Ok(true);
            }
            if !last {
                tree = self.subtree(&tree, name, &child)?;
                dir = child;
            }
        }
        Ok(false)
    }

    /// The `export-ignore` rules of `tree`'s own `.gitattributes`, if it has one.
    fn attr_layer(&self, commit: Oid, tree: &Tree<'_>, dir: &str) -> Result<Option<AttrLayer>> {
        let Some(entry) = tree.get_name(".gitattributes") else {
            return Ok(None);
        };
        if !is_file_mode(entry.filemode()) {
            return Ok(None);
        }
        let path = join(dir, ".gitattributes");
        let bytes = self.bounded_blob(commit, entry.id(), &path, MAX_CONTROL_FILE_BYTES)?;
        Ok(Some(AttrLayer::parse(
            dir,
            &String::from_utf8_lossy(&bytes),
            &path,
        )))
    }

    fn subtree(&self, tree: &Tree<'_>, name: &str, path: &str) -> Result<Tree<'_>> {
        let entry = tree
            .get_name(name)
            .ok_or_else(|| self.git_err(path, git2::Error::from_str("no such entry")))?;
        self.repo
            .find_tree(entry.id())
            .map_err(|e| self.git_err(path, e))
    }

    fn commit_tree(&self, commit: Oid) -> Result<Tree<'_>> {
        let found = self.repo.find_commit(commit).map_err(|err| {
            if err.code() == ErrorCode::NotFound {
                MaterializeError::CommitNotFound {
                    repo: self.url.clone(),
                    requested: commit.to_string(),
                }
            } else {
                self.git_err(&commit.to_string(), err)
            }
        })?;
        found
            .tree()
            .map_err(|e| self.git_err(&format!("the tree of {commit}"), e))
    }

    /// Loads a blob after checking its size from the object header.
    fn bounded_blob(&self, commit: Oid, id: Oid, path: &str, max: u64) -> Result<Vec<u8>> {
        let odb = self
            .repo
            .odb()
            .map_err(|e| self.git_err("the object database", e))?;
        let (size, _) = odb.read_header(id).map_err(|e| self.git_err(path, e))?;
        let size = size as u64;
        if size > max {
            return Err(MaterializeError::BlobTooLarge {
                repo: self.url.clone(),
                commit: commit.to_string(),
                path: path.to_owned(),
                size,
                max,
            });
        }
        let blob = self.repo.find_blob(id).map_err(|e| self.git_err(path, e))?;
        Ok(blob.content().to_vec())
    }

    fn git_err(&self, what: &str, source: git2::Error) -> MaterializeError {
        MaterializeError::Git {
            repo: self.url.clone(),
            what: what.to_owned(),
            source,
        }
    }
}

/// One pass writing a context tar.
struct Walk<'m, W: Write> {
    mirror: &'m Mirror,
    commit: Oid,
    sha: String,
    ignore: DockerIgnore,
    /// The `.gitattributes` rules in scope, shallowest first.
    layers: Vec<AttrLayer>,
    tar: tar::Builder<W>,
    stats: ContextStats,
}

impl<W: Write> Walk<'_, W> {
    /// Writes `tree`, which is `repo_dir` in the repository and `ctx_dir` in the context.
    fn tree(&mut self, tree: &Tree<'_>, repo_dir: &str, ctx_dir: &str) -> Result<()> {
        let mirror = self.mirror;
        let layer = mirror.attr_layer(self.commit, tree, repo_dir)?;
        let pushed = layer.is_some();
        self.layers.extend(layer);
        for entry in tree.iter() {
            let Ok(name) = entry.name() else {
                return Err(MaterializeError::NonUtf8Path {
                    repo: mirror.url.clone(),
                    commit: self.sha.clone(),
                    path: join(repo_dir, &String::from_utf8_lossy(entry.name_bytes())),
                });
            };
            // Git never writes these names, but a crafted tree can; in the context they would
            // name something outside it.
            if matches!(name, "" | "." | "..") || name.contains('/') {
                return Err(MaterializeError::UnsafeTreeEntry {
                    repo: mirror.url.clone(),
                    commit: self.sha.clone(),
                    path: join(repo_dir, name),
                });
            }
            let repo_path = join(repo_dir, name);
            let ctx_path = join(ctx_dir, name);
            let mode = entry.filemode();
            let is_dir = mode == MODE_TREE || mode == MODE_GITLINK;
            if export_ignored(&self.layers, &repo_path, is_dir) {
                debug!(path = %repo_path, "export-ignored");
                self.stats.excluded += 1;
                continue;
            }
            match mode {
                MODE_TREE => {
                    if self.ignore.skip_dir(&ctx_path) {
                        debug!(path = %repo_path, "directory excluded by .dockerignore");
                        self.stats.excluded += 1;
                        continue;
                    }
                    let sub = mirror
                        .repo
                        .find_tree(entry.id())
                        .map_err(|e| mirror.git_err(&repo_path, e))?;
                    self.tree(&sub, &repo_path, &ctx_path)?;
                }
                MODE_GITLINK => {
                    if self.ignore.is_excluded(&ctx_path, true) {
                        self.stats.excluded += 1;
                        continue;
                    }
                    let mut header = self.header(tar::EntryType::Directory, 0o755, 0);
                    self.tar
                        .append_data(&mut header, format!("{ctx_path}/"), std::io::empty())
                        .map_err(|source| self.tar_err(&repo_path, source))?;
                }
                MODE_FILE | MODE_FILE_GROUP_WRITABLE | MODE_EXECUTABLE | MODE_SYMLINK => {
                    if self.ignore.is_excluded(&ctx_path, false) {
                        debug!(path = %repo_path, "excluded by .dockerignore");
                        self.stats.excluded += 1;
                        continue;
                    }
                    let blob = mirror
                        .repo
                        .find_blob(entry.id())
                        .map_err(|e| mirror.git_err(&repo_path, e))?;
                    let content = blob.content();
                    if mode == MODE_SYMLINK {
                        let target = std::str::from_utf8(content).map_err(|_| {
                            MaterializeError::NonUtf8Path {
                                repo: mirror.url.clone(),
                                commit: self.sha.clone(),
                                path: format!("{repo_path} (symlink target)"),
                            }
                        })?;
                        let mut header = self.header(tar::EntryType::Symlink, 0o777, 0);
                        self.tar
                            .append_link(&mut header, &ctx_path, target)
                            .map_err(|source| self.tar_err(&repo_path, source))?;
                    } else {
                        let perm = if mode == MODE_EXECUTABLE {
                            0o755
                        } else {
                            0o644
                        };
                        let len = content.len() as u64;
                        let mut header = self.header(tar::EntryType::Regular, perm, len);
                        self.tar
                            .append_data(&mut header, &ctx_path, content)
                            .map_err(|source| self.tar_err(&repo_path, source))?;
                        self.stats.bytes += len;
                    }
                    self.stats.files += 1;
                }
                other => {
                    warn!(path = %repo_path, mode = format!("{other:o}"), "skipping tree entry of unknown mode");
                }
            }
        }
        if pushed {
            self.layers.pop();
        }
        Ok(())
    }

    /// A header with everything fixed but type, permissions and size.
    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    fn tar_err(&self, path: &str, source: std::io::Error) -> MaterializeError {
        MaterializeError::TarWrite {
            repo: self.mirror.url.clone(),
            commit: self.sha.clone(),
            path: path.to_owned(),
            source,
        }
    }
}

/// The `export-ignore` rules of one `.gitattributes` file, scoped to its directory. Set and
/// unset are a gitignore's ignore and whitelist, so the last matching line decides.
struct AttrLayer {
    /// Repository-relative directory of the file, `""` at the root.
    dir: String,
    rules: Gitignore,
}

impl AttrLayer {
    fn parse(dir: &str, text: &str, path: &str) -> AttrLayer {
        let mut builder = GitignoreBuilder::new(".");
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('"') {
                warn!(
                    path,
                    line = index + 1,
                    "quoted .gitattributes patterns are not supported; line skipped"
                );
                continue;
            }
            let mut words = line.split_whitespace();
            let Some(pattern) = words.next() else {
                continue;
            };
            // Macro definitions and negative patterns (which Git forbids) set nothing here.
            if pattern.starts_with("[attr]") || pattern.starts_with('!') {
                continue;
            }
            let mut state = None;
            for word in words {
                match word {
                    "export-ignore" => state = Some(true),
                    "-export-ignore" | "!export-ignore" => state = Some(false),
                    _ => {}
                }
            }
            let rule = match state {
                None => continue,
                Some(true) => pattern.to_owned(),
                Some(false) => format!("!{pattern}"),
            };
            if let Err(err) = builder.add_line(None, &rule) {
                warn!(path, line = index + 1, %err, "unusable .gitattributes pattern skipped");
            }
        }
        let rules = builder.build().unwrap_or_else(|err| {
            warn!(path, %err, ".gitattributes export-ignore rules unusable; none applied");
            Gitignore::empty()
        });
        AttrLayer {
            dir: dir.to_owned(),
            rules,
        }
    }
}

/// Whether the deepest `.gitattributes` with an opinion on `path` sets `export-ignore`.
fn export_ignored(layers: &[AttrLayer], path: &str, is_dir: bool) -> bool {
    for layer in layers.iter().rev() {
        let relative = if layer.dir.is_empty() {
            path
        } else {
            match path
                .strip_prefix(layer.dir.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
            {
                Some(rest) => rest,
                None => continue,
            }
        };
        match layer.rules.matched(relative, is_dir) {
            Match::Ignore(_) => return true,
            Match::Whitelist(_) => return false,
            Match::None => {}
        }
    }
    false
}

/// The Dockerfile's path inside the context, as the builder is told it; both arguments are
/// repository-relative.
pub fn dockerfile_in_context(context_dir: &str, dockerfile: &str) -> Result<String> {
    let context = clean_repo_path(context_dir)?;
    let dockerfile = clean_file_path(dockerfile)?;
    if context.is_empty() {
        return Ok(dockerfile);
    }
    match dockerfile
        .strip_prefix(context.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
    {
        Some(rest) => Ok(rest.to_owned()),
        None => Err(MaterializeError::DockerfileOutsideContext {
            dockerfile,
            context,
        }),
    }
}

/// A repository-relative path without `.` or empty components (`""` is the root); absolute
/// paths and `..` are refused.
fn clean_repo_path(path: &str) -> Result<String> {
    let invalid = |reason| MaterializeError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.starts_with('/') {
        return Err(invalid("it is absolute"));
    }
    if path.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(invalid("it has a `..` component")),
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

/// [`clean_repo_path`] for a path that must name a file, not the root.
fn clean_file_path(path: &str) -> Result<String> {
    let cleaned = clean_repo_path(path)?;
    if cleaned.is_empty() {
        return Err(MaterializeError::InvalidPath {
            path: path.to_owned(),
            reason: "it names no file",
        });
    }
    Ok(cleaned)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn is_file_mode(mode: i32) -> bool {
    matches!(mode, MODE_FILE | MODE_FILE_GROUP_WRITABLE | MODE_EXECUTABLE)
}

/// Whether `oid`'s hex form starts with `prefix` (lower-case hex), without formatting it.
fn oid_has_prefix(oid: &Oid, prefix: &str) -> bool {
    let bytes = oid.as_bytes();
    prefix.bytes().enumerate().all(|(index, want)| {
        let Some(byte) = bytes.get(index / 2) else {
            return false;
        };
        let nibble = if index % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        };
        char::from_digit(u32::from(nibble), 16) == Some(char::from(want))
    })
}

fn check_url(url: &str) -> Result<()> {
    let unsupported = |reason| MaterializeError::UnsupportedUrl {
        url: redact_url(url),
        reason,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(unsupported(
            "it has no scheme (https://, http:// or file://)",
        ));
    };
    if !matches!(scheme, "https" | "http" | "file") {
        return Err(unsupported(
            "only https, http and file repositories are fetched",
        ));
    }
    if rest.is_empty() {
        return Err(unsupported("it names no repository"));
    }
    Ok(())
}

/// `url` without user info (`https://user:token@host/x` → `https://host/x`).
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// `<slug>-<hash>.git`: the slug is the tail of the redacted URL in `[a-z0-9._-]`, the hash
/// the first 16 hex digits of the SHA-1 of the whole URL.
fn mirror_name(url: &str) -> String {
    let shown = redact_url(url);
    let without_scheme = shown
        .split_once("://")
        .map_or(shown.as_str(), |(_, rest)| rest);
    let mut slug = String::new();
    for ch in without_scheme.chars() {
        let ch = ch.to_ascii_lowercase();
        if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' {
            slug.push(ch);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches(".git");
    let tail: String = {
        let chars: Vec<char> = slug.chars().collect();
        chars[chars.len().saturating_sub(48)..].iter().collect()
    };
    let tail = tail.trim_matches(|c| c == '-' || c == '.');
    let tail = if tail.is_empty() { "repo" } else { tail };
    // git2's object hash is a stable SHA-1; hashing cannot fail for an in-memory buffer, and
    // the zero id only makes the name less unique, never unsafe.
    let hash = Oid::hash_object(ObjectType::Blob, url.as_bytes()).unwrap_or(Oid::ZERO_SHA1);
    let hex = hash.to_string();
    format!("{tail}-{}.git", &hex[..16])
}

/// A verifier trusting exactly the certificates in `pem`.
fn ca_verifier(pem: &[u8]) -> Result<Arc<WebPkiServerVerifier>> {
    let roots = crate::pem::roots(pem).map_err(|reason| MaterializeError::ExtraCa { reason })?;
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|err| MaterializeError::ExtraCa {
        reason: err.to_string(),
    })
}

/// libgit2's certificate hook: a server certificate that chains to the extra CAs for `host`
/// is accepted; anything else is left to the system trust store.
fn check_cert(
    verifier: &WebPkiServerVerifier,
    cert: &git2::cert::Cert<'_>,
    host: &str,
) -> CertificateCheckStatus {
    let Some(x509) = cert.as_x509() else {
        return CertificateCheckStatus::CertificatePassthrough;
    };
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        return CertificateCheckStatus::CertificatePassthrough;
    };
    let der = CertificateDer::from(x509.data());
    match verifier.verify_server_cert(&der, &[], &name, &[], UnixTime::now()) {
        Ok(_) => {
            debug!(host, "server certificate chains to an extra CA");
            CertificateCheckStatus::CertificateOk
        }
        Err(err) => {
            debug!(host, %err, "server certificate not from an extra CA; system trust decides");
            CertificateCheckStatus::CertificatePassthrough
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{Signature, Time};
    use std::collections::BTreeMap;
    use std::io::Read;

    /// (path, content, mode)
    type FileSpec<'a> = (&'a str, &'a [u8], i32);
    type Files<'a> = [FileSpec<'a>];

    /// Writes nested trees for `files` (path, content, mode) and returns the root tree.
    fn build_tree(repo: &Repository, files: &Files<'_>) -> Oid {
        let mut builder = repo.treebuilder(None).unwrap();
        let mut dirs: BTreeMap<&str, Vec<FileSpec<'_>>> = BTreeMap::new();
        for (path, content, mode) in files {
            match path.split_once('/') {
                Some((dir, rest)) => dirs.entry(dir).or_default().push((rest, content, *mode)),
                None => {
                    let blob = repo.blob(content).unwrap();
                    builder.insert(path, blob, *mode).unwrap();
                }
            }
        }
        for (dir, entries) in dirs {
            let tree = build_tree(repo, &entries);
            builder.insert(dir, tree, MODE_TREE).unwrap();
        }
        builder.write().unwrap()
    }

    fn commit(repo: &Repository, files: &Files<'_>, message: &str, update: Option<&str>) -> Oid {
        let tree = repo.find_tree(build_tree(repo, files)).unwrap();
        let sig = Signature::new("Test", "test@example.com", &Time::new(0, 0)).unwrap();
        let parent = update
            .and_then(|name| repo.refname_to_id(name).ok())
            .map(|id| repo.find_commit(id).unwrap());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        repo.commit(update, &sig, &sig, message, &tree, &parents)
            .unwrap()
    }

    /// A bare repository used directly as a mirror.
    fn bare_mirror(dir: &Path) -> Mirror {
        Mirror {
            repo: Repository::init_bare(dir).unwrap(),
            url: "file:///test/repo".to_owned(),
            path: dir.to_owned(),
        }
    }

    #[derive(Debug, PartialEq)]
    struct Entry {
        kind: tar::EntryType,
        mode: u32,
        data: Vec<u8>,
    }

    fn entries(bytes: &[u8]) -> BTreeMap<String, Entry> {
        let mut archive = tar::Archive::new(bytes);
        let mut out = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            assert_eq!(header.mtime().unwrap(), 0);
            assert_eq!(header.uid().unwrap(), 0);
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let data = if header.entry_type() == tar::EntryType::Symlink {
                entry
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
                    .into_bytes()
            } else {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                data
            };
            out.insert(
                path,
                Entry {
                    kind: header.entry_type(),
                    mode: header.mode().unwrap(),
                    data,
                },
            );
        }
        out
    }

    fn context_tar(
        mirror: &Mirror,
        commit: Oid,
        context: &str,
        dockerfile: &str,
    ) -> (Vec<u8>, ContextStats) {
        let mut out = Vec::new();
        let stats = mirror
            .write_context_tar(commit, context, dockerfile, &mut out)
            .unwrap();
        (out, stats)
    }

    #[test]
    fn resolves_full_and_short_shas() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(&mirror.repo, &[("a", b"a", MODE_FILE)], "one", None);
        let sha = id.to_string();
        assert_eq!(mirror.resolve(&sha).unwrap(), id);
        assert_eq!(mirror.resolve(&sha.to_uppercase()).unwrap(), id);
        assert_eq!(mirror.resolve(&sha[..7]).unwrap(), id);
        assert_eq!(mirror.resolve(&sha[..4]).unwrap(), id);
    }

    #[test]
    fn unknown_commit_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(&mirror.repo, &[("a", b"a", MODE_FILE)], "one", None);
        // Flip the first digit so no object shares the prefix.
        let sha = id.to_string();
        let flipped = if sha.starts_with('0') { "1" } else { "0" };
        let short = format!("{flipped}{}", &sha[1..12]);
        match mirror.resolve(&short) {
            Err(MaterializeError::CommitNotFound { repo, requested }) => {
                assert_eq!(repo, "file:///test/repo");
                assert_eq!(requested, short);
            }
            other => panic!("expected CommitNotFound, got {other:?}"),
        }
        let full = format!("{flipped}{}", &sha[1..]);
        assert!(matches!(
            mirror.resolve(&full),
            Err(MaterializeError::CommitNotFound { requested, .. }) if requested == full
        ));
        let err = mirror.resolve(&full).unwrap_err().to_string();
        assert_eq!(err, format!("no commit {full} in file:///test/repo"));
    }

    #[test]
    fn a_tree_id_is_not_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(&mirror.repo, &[("a", b"a", MODE_FILE)], "one", None);
        let tree = mirror.repo.find_commit(id).unwrap().tree_id().to_string();
        assert!(matches!(
            mirror.resolve(&tree),
            Err(MaterializeError::NotACommit { sha, kind: "tree", .. }) if sha == tree
        ));
        // A short prefix of a non-commit is just not a commit.
        assert!(matches!(
            mirror.resolve(&tree[..10]),
            Err(MaterializeError::CommitNotFound { .. })
        ));
    }

    #[test]
    fn malformed_commit_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let long = "a".repeat(41);
        for bad in ["", "abc", "HEAD", "main", "g123", "12 34", long.as_str()] {
            match mirror.resolve(bad) {
                Err(MaterializeError::InvalidCommitId { requested, .. }) => {
                    assert_eq!(requested, bad)
                }
                other => panic!("{bad:?}: expected InvalidCommitId, got {other:?}"),
            }
        }
    }

    #[test]
    fn ambiguous_prefix_lists_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let blob = mirror.repo.blob(b"same").unwrap();
        let mut tree = mirror.repo.treebuilder(None).unwrap();
        tree.insert("f", blob, MODE_FILE).unwrap();
        let tree = mirror.repo.find_tree(tree.write().unwrap()).unwrap();
        let sig = Signature::new("Test", "test@example.com", &Time::new(0, 0)).unwrap();
        let mut seen: BTreeMap<String, Oid> = BTreeMap::new();
        let (first, second) = (0..)
            .find_map(|n| {
                let id = mirror
                    .repo
                    .commit(None, &sig, &sig, &format!("commit {n}"), &tree, &[])
                    .unwrap();
                let prefix = id.to_string()[..4].to_owned();
                seen.insert(prefix, id).map(|earlier| (earlier, id))
            })
            .unwrap();
        let prefix = first.to_string()[..4].to_owned();
        match mirror.resolve(&prefix.to_uppercase()) {
            Err(MaterializeError::AmbiguousCommit {
                repo,
                prefix: named,
                candidates,
            }) => {
                assert_eq!(repo, "file:///test/repo");
                assert_eq!(named, prefix);
                assert!(candidates.contains(&first.to_string()), "{candidates:?}");
                assert!(candidates.contains(&second.to_string()), "{candidates:?}");
                assert!(
                    candidates
                        .iter()
                        .all(|c| c.len() == 40 && c.starts_with(&prefix))
                );
            }
            other => panic!("expected AmbiguousCommit, got {other:?}"),
        }
        // The full ids still resolve.
        assert_eq!(mirror.resolve(&first.to_string()).unwrap(), first);
    }

    #[test]
    fn reads_files_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(
            &mirror.repo,
            &[
                ("deploy.json", b"{\"schema\":1}", MODE_FILE),
                ("k8s/app.yaml", b"kind: Deployment", MODE_FILE),
                ("link", b"deploy.json", MODE_SYMLINK),
            ],
            "one",
            None,
        );
        assert_eq!(
            mirror.read_blob(id, "deploy.json", 64).unwrap(),
            b"{\"schema\":1}"
        );
        assert_eq!(
            mirror.read_blob(id, "./k8s//app.yaml", 64).unwrap(),
            b"kind: Deployment"
        );
        assert!(matches!(
            mirror.read_blob(id, "deploy.json", 4),
            Err(MaterializeError::BlobTooLarge {
                size: 12,
                max: 4,
                ..
            })
        ));
        assert!(matches!(
            mirror.read_blob(id, "missing.json", 64),
            Err(MaterializeError::PathNotFound { path, .. }) if path == "missing.json"
        ));
        assert!(matches!(
            mirror.read_blob(id, "k8s", 64),
            Err(MaterializeError::NotAFile { .. })
        ));
        assert!(matches!(
            mirror.read_blob(id, "link", 64),
            Err(MaterializeError::NotAFile { .. })
        ));
        for bad in ["../deploy.json", "/deploy.json", "k8s/../../x", "."] {
            assert!(
                matches!(mirror.read_blob(id, bad, 64), Err(MaterializeError::InvalidPath { ref path, .. }) if path == bad),
                "{bad}"
            );
        }
    }

    /// The files of a service repository used by the context tests.
    const SERVICE: &Files<'static> = &[
        ("Dockerfile", b"FROM scratch\n", MODE_FILE),
        (
            ".dockerignore",
            b"*.log\nsecret\nDockerfile\n.dockerignore\n",
            MODE_FILE,
        ),
        (
            ".gitattributes",
            b"docs export-ignore\n*.tmp export-ignore\n",
            MODE_FILE,
        ),
        ("app/main.rs", b"fn main() {}\n", MODE_FILE),
        ("app/debug.log", b"nested log\n", MODE_FILE),
        ("app/scratch.tmp", b"tmp\n", MODE_FILE),
        ("build.log", b"root log\n", MODE_FILE),
        ("docs/guide.md", b"guide\n", MODE_FILE),
        ("run.sh", b"#!/bin/sh\n", MODE_EXECUTABLE),
        ("secret/key", b"k\n", MODE_FILE),
        ("current", b"app/main.rs", MODE_SYMLINK),
    ];

    #[test]
    fn context_tar_is_git_archive_minus_dockerignore() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(&mirror.repo, SERVICE, "service", None);
        let (bytes, stats) = context_tar(&mirror, id, ".", "Dockerfile");
        let got = entries(&bytes);
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        // `*.log` is root-only in Docker, so app/debug.log stays; Dockerfile and
        // .dockerignore are kept although the .dockerignore lists them.
        assert_eq!(
            names,
            [
                ".dockerignore",
                ".gitattributes",
                "Dockerfile",
                "app/debug.log",
                "app/main.rs",
                "current",
                "run.sh"
            ]
        );
        assert_eq!(got["run.sh"].mode, 0o755);
        assert_eq!(got["app/main.rs"].mode, 0o644);
        assert_eq!(got["app/main.rs"].data, b"fn main() {}\n");
        assert_eq!(got["current"].kind, tar::EntryType::Symlink);
        assert_eq!(got["current"].data, b"app/main.rs");
        // docs (one directory), app/scratch.tmp, build.log, secret (one directory).
        assert_eq!(stats.excluded, 4);
        assert_eq!(stats.files, 7);
        let content: u64 = got
            .values()
            .filter(|e| e.kind == tar::EntryType::Regular)
            .map(|e| e.data.len() as u64)
            .sum();
        assert_eq!(stats.bytes, content);
    }

    #[test]
    fn tree_entries_that_would_escape_the_context_are_refused() {
        // Git's own tools never write such trees, but a crafted remote can: entries named `..`
        // written straight into the object database.
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let odb = mirror.repo.odb().unwrap();
        let blob = odb.write(git2::ObjectType::Blob, b"escape\n").unwrap();
        let dockerfile = odb
            .write(git2::ObjectType::Blob, b"FROM scratch\n")
            .unwrap();
        let raw_tree = |entries: &[(&str, &str, Oid)]| {
            let mut bytes = Vec::new();
            for (mode, name, id) in entries {
                bytes.extend_from_slice(format!("{mode} {name}\0").as_bytes());
                bytes.extend_from_slice(id.as_bytes());
            }
            odb.write(git2::ObjectType::Tree, &bytes).unwrap()
        };
        let inner = raw_tree(&[("100644", "x", blob)]);
        let cases = [
            (
                "a file named ..",
                raw_tree(&[("100644", "..", blob), ("100644", "Dockerfile", dockerfile)]),
            ),
            (
                "a directory named ..",
                raw_tree(&[("40000", "..", inner), ("100644", "Dockerfile", dockerfile)]),
            ),
            (
                "a symlink named ..",
                raw_tree(&[("120000", "..", blob), ("100644", "Dockerfile", dockerfile)]),
            ),
        ];
        let sig = Signature::new("Test", "test@example.com", &Time::new(0, 0)).unwrap();
        for (what, tree) in cases {
            let tree = mirror.repo.find_tree(tree).unwrap();
            let id = mirror
                .repo
                .commit(None, &sig, &sig, what, &tree, &[])
                .unwrap();
            let mut out = Vec::new();
            let err = mirror
                .write_context_tar(id, ".", "Dockerfile", &mut out)
                .expect_err(what)
                .to_string();
            assert!(
                err.contains("would escape the build context") && err.contains(&id.to_string()),
                "{what}: {err}"
            );
            // Whatever streamed before the refusal names nothing outside the context.
            let mut archive = tar::Archive::new(&out[..]);
            if let Ok(written) = archive.entries() {
                for entry in written.flatten() {
                    let path = entry.path().unwrap().into_owned();
                    assert!(
                        !path
                            .components()
                            .any(|c| c == std::path::Component::ParentDir),
                        "{what}: {path:?} escaped"
                    );
                }
            }
        }
    }

    #[test]
    fn same_commit_gives_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(&mirror.repo, SERVICE, "service", None);
        let (first, _) = context_tar(&mirror, id, ".", "Dockerfile");
        let (second, _) = context_tar(&mirror, id, "./", "./Dockerfile");
        assert!(!first.is_empty());
        assert_eq!(first, second);
    }

    #[test]
    fn subdirectory_context_honours_ancestor_and_nested_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let files: &Files<'_> = &[
            (
                ".gitattributes",
                b"*.fixture export-ignore\n/svc/bench export-ignore\n",
                MODE_FILE,
            ),
            ("svc/docker/Dockerfile", b"FROM scratch\n", MODE_FILE),
            ("svc/.dockerignore", b"docker\n", MODE_FILE),
            ("svc/src/lib.rs", b"", MODE_FILE),
            ("svc/src/data.fixture", b"x", MODE_FILE),
            ("svc/bench/b.rs", b"", MODE_FILE),
            (
                "svc/keep/.gitattributes",
                b"*.fixture -export-ignore\n",
                MODE_FILE,
            ),
            ("svc/keep/wanted.fixture", b"y", MODE_FILE),
            ("svc/docker/other", b"z", MODE_FILE),
            ("other/x", b"", MODE_FILE),
        ];
        let id = commit(&mirror.repo, files, "mono", None);
        let (bytes, _) = context_tar(&mirror, id, "svc", "svc/docker/Dockerfile");
        let got = entries(&bytes);
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                ".dockerignore",
                "docker/Dockerfile",
                "keep/.gitattributes",
                "keep/wanted.fixture",
                "src/lib.rs"
            ]
        );
        assert_eq!(
            dockerfile_in_context("svc", "svc/docker/Dockerfile").unwrap(),
            "docker/Dockerfile"
        );
    }

    #[test]
    fn bad_context_and_dockerfile_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let id = commit(&mirror.repo, SERVICE, "service", None);
        let mut sink = Vec::new();
        match mirror.write_context_tar(id, "app", "Dockerfile", &mut sink) {
            Err(MaterializeError::DockerfileOutsideContext {
                dockerfile,
                context,
            }) => {
                assert_eq!(
                    (dockerfile.as_str(), context.as_str()),
                    ("Dockerfile", "app")
                );
            }
            other => panic!("expected DockerfileOutsideContext, got {other:?}"),
        }
        for bad in ["../up", "/abs", "app/../.."] {
            assert!(
                matches!(
                    mirror.write_context_tar(id, bad, "Dockerfile", &mut sink),
                    Err(MaterializeError::InvalidPath { ref path, .. }) if path == bad
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            mirror.write_context_tar(id, ".", "Missing.dockerfile", &mut sink),
            Err(MaterializeError::PathNotFound { path, .. }) if path == "Missing.dockerfile"
        ));
        assert!(matches!(
            mirror.write_context_tar(id, "docs", "docs/guide.md", &mut sink),
            Err(MaterializeError::ExportIgnored { path, .. }) if path == "docs/guide.md"
        ));
        assert!(matches!(
            mirror.write_context_tar(id, "run.sh", "run.sh/Dockerfile", &mut sink),
            Err(MaterializeError::PathNotFound { .. })
        ));
        assert!(
            sink.is_empty(),
            "nothing is written before the inputs are checked"
        );
    }

    #[test]
    fn a_bad_dockerignore_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = bare_mirror(dir.path());
        let files: &Files<'_> = &[
            ("Dockerfile", b"FROM scratch\n", MODE_FILE),
            (".dockerignore", b"ok\n[unclosed\n", MODE_FILE),
        ];
        let id = commit(&mirror.repo, files, "bad", None);
        let err = mirror
            .write_context_tar(id, ".", "Dockerfile", Vec::new())
            .unwrap_err();
        assert!(
            matches!(
                &err,
                MaterializeError::DockerIgnore { path, source: DockerIgnoreError::BadPattern { line: 2, .. }, .. }
                    if path == ".dockerignore"
            ),
            "{err:?}"
        );
    }

    #[test]
    fn fetch_reuses_the_mirror_and_never_sees_the_worktree() {
        let source_dir = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let source = Repository::init(source_dir.path()).unwrap();
        let first = commit(&source, SERVICE, "first", Some("HEAD"));
        std::fs::write(source_dir.path().join("untracked.txt"), "dirty").unwrap();
        std::fs::write(source_dir.path().join("Dockerfile"), "FROM dirty").unwrap();
        let url = format!("file://{}", source_dir.path().display());

        let cache = MirrorCache::new(cache_dir.path().join("mirrors"));
        let cancel = CancellationToken::new();
        let mut lines = Vec::new();
        let mirror = cache
            .fetch(&url, &FetchNet::default(), &cancel, |line| lines.push(line))
            .unwrap();
        assert!(lines.last().unwrap().starts_with("fetched "), "{lines:?}");
        assert_eq!(mirror.resolve(&first.to_string()[..8]).unwrap(), first);
        assert!(mirror.repo.is_bare());
        let (bytes, _) = context_tar(&mirror, first, ".", "Dockerfile");
        let got = entries(&bytes);
        assert!(!got.contains_key("untracked.txt"));
        assert_eq!(got["Dockerfile"].data, b"FROM scratch\n");
        let first_path = mirror.path().to_owned();
        drop(mirror);

        let second = commit(
            &source,
            &[("Dockerfile", b"FROM two\n", MODE_FILE)],
            "second",
            Some("HEAD"),
        );
        let mirror = cache
            .fetch(&url, &FetchNet::default(), &cancel, |_| {})
            .unwrap();
        assert_eq!(mirror.path(), first_path);
        assert_eq!(mirror.resolve(&second.to_string()).unwrap(), second);
        assert_eq!(
            mirror.read_blob(second, "Dockerfile", 64).unwrap(),
            b"FROM two\n"
        );
        let dirs: Vec<_> = std::fs::read_dir(cache.root()).unwrap().collect();
        assert_eq!(dirs.len(), 1);
        let name = first_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(!name.contains('/') && !name.contains(':'), "{name}");
    }

    #[test]
    fn cancelled_fetch_stops() {
        let source_dir = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let source = Repository::init(source_dir.path()).unwrap();
        commit(&source, SERVICE, "first", Some("HEAD"));
        let url = format!("file://{}", source_dir.path().display());
        let cache = MirrorCache::new(cache_dir.path());
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(matches!(
            cache.fetch(&url, &FetchNet::default(), &cancel, |_| {}),
            Err(MaterializeError::Cancelled { .. })
        ));
    }

    #[test]
    fn cancelling_during_the_transfer_aborts_it() {
        let source_dir = tempfile::tempdir().unwrap();
        let cache_dir = tempfile::tempdir().unwrap();
        let source = Repository::init(source_dir.path()).unwrap();
        let contents: Vec<(String, Vec<u8>)> = (0..200)
            .map(|n| (format!("f{n}"), format!("file {n}").into_bytes()))
            .collect();
        let files: Vec<FileSpec<'_>> = contents
            .iter()
            .map(|(name, data)| (name.as_str(), data.as_slice(), MODE_FILE))
            .collect();
        commit(&source, &files, "many", Some("HEAD"));
        let url = format!("file://{}", source_dir.path().display());
        let cache = MirrorCache::new(cache_dir.path());
        let cancel = CancellationToken::new();
        let mut lines = 0;
        let result = cache.fetch(&url, &FetchNet::default(), &cancel, |_| {
            lines += 1;
            cancel.cancel();
        });
        assert!(
            matches!(result, Err(MaterializeError::Cancelled { .. })),
            "{result:?}"
        );
        assert_eq!(lines, 1, "no progress after the cancel");
    }

    #[test]
    fn fetch_errors_name_the_repository() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = MirrorCache::new(cache_dir.path());
        let url = format!("file://{}/nowhere", cache_dir.path().display());
        match cache.fetch(
            &url,
            &FetchNet::default(),
            &CancellationToken::new(),
            |_| {},
        ) {
            Err(MaterializeError::Fetch { repo, .. }) => assert_eq!(repo, url),
            other => panic!("expected Fetch, got {other:?}"),
        }
        for bad in [
            "ssh://host/x.git",
            "/local/path",
            "git@github.com:o/r.git",
            "https://",
        ] {
            assert!(
                matches!(
                    cache.open(bad),
                    Err(MaterializeError::UnsupportedUrl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn extra_ca_must_hold_certificates() {
        let net = FetchNet {
            proxy: None,
            extra_ca_pem: Some(b"not a pem".to_vec()),
        };
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = MirrorCache::new(cache_dir.path());
        assert!(matches!(
            cache.fetch(
                "https://example.invalid/r.git",
                &net,
                &CancellationToken::new(),
                |_| {}
            ),
            Err(MaterializeError::ExtraCa { .. })
        ));
    }

    #[test]
    fn mirror_names_are_safe_stable_and_secret_free() {
        let url = "https://user:s3cret@GitHub.com/Org/My Repo.git";
        let name = mirror_name(url);
        assert_eq!(name, mirror_name(url));
        assert!(!name.contains("s3cret") && !name.contains("user"), "{name}");
        assert!(name.ends_with(".git"));
        assert!(name.starts_with("github.com-org-my-repo-"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c)),
            "{name}"
        );
        assert_ne!(
            mirror_name("https://github.com/org/a"),
            mirror_name("https://github.com/org/b")
        );
        assert_ne!(mirror_name("https://a@h/x"), mirror_name("https://b@h/x"));
        assert_eq!(redact_url(url), "https://GitHub.com/Org/My Repo.git");
        assert_eq!(redact_url("file:///a@b/c"), "file:///a@b/c");
    }

    #[test]
    fn dockerfile_paths_relative_to_the_context() {
        assert_eq!(
            dockerfile_in_context(".", "Dockerfile").unwrap(),
            "Dockerfile"
        );
        assert_eq!(
            dockerfile_in_context("", "a/Dockerfile").unwrap(),
            "a/Dockerfile"
        );
        assert_eq!(
            dockerfile_in_context("a/", "./a/b/Dockerfile").unwrap(),
            "b/Dockerfile"
        );
        assert!(matches!(
            dockerfile_in_context("ab", "a/Dockerfile"),
            Err(MaterializeError::DockerfileOutsideContext { .. })
        ));
        assert!(matches!(
            dockerfile_in_context("a", "ab/Dockerfile"),
            Err(MaterializeError::DockerfileOutsideContext { .. })
        ));
    }
}
