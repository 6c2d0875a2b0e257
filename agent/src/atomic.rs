//! Crash-safe file writes: write a temporary file beside the target, fsync it, rename it over
//! the target, fsync the directory. A reader sees the old content or the new, never a torn
//! file.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Atomically replaces `path` with `bytes`, with file mode `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    replace(path, bytes, mode, None)
}

/// Atomically replaces the existing file `path` with `bytes`, keeping its mode, owner and
/// group: a configuration edited in place stays readable by the service whose group it
/// belongs to (the packaged `controller.toml` is `root:unidesk 0640`).
pub fn rewrite_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    replace(
        path,
        bytes,
        meta.mode() & 0o7777,
        Some((meta.uid(), meta.gid())),
    )
}

fn replace(path: &Path, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some((uid, gid)) = owner {
            use std::os::unix::fs::MetadataExt;
            let made = file.metadata()?;
            if (made.uid(), made.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
        }
        // After the chown, which may clear set-id bits.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn rewrite_keeps_mode_owner_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        write_file(&path, b"old", 0o640).unwrap();
        // Root (the test machine) gives the file another group, as the package's tmpfiles
        // line does; anyone else keeps their own.
        let root = std::fs::metadata(dir.path()).unwrap().uid() == 0;
        let group = if root {
            1
        } else {
            std::fs::metadata(&path).unwrap().gid()
        };
        std::os::unix::fs::chown(&path, None, Some(group)).unwrap();
        let before = std::fs::metadata(&path).unwrap();

        rewrite_file(&path, b"new").unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_ne!(
            after.ino(),
            before.ino(),
            "a new file was renamed into place"
        );
        assert_eq!(after.mode() & 0o7777, 0o640);
        assert_eq!((after.uid(), after.gid()), (before.uid(), group));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");

        let missing = dir.path().join("missing.toml");
        let err = rewrite_file(&missing, b"x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(!missing.exists());
    }
}
