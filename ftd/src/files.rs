//! Files ftd keeps in its state directory (a replica's pid and json, the cluster id) are
//! written whole or not at all: to a temporary file in the same directory, flushed to
//! disk, then renamed over the old one, and the directory flushed. A reader, or an ftd
//! restarted after a crash in the middle, sees the old file or the new one, never a part.
//! They, and the directories they are in, are ftd's user's alone (0600, 0700). A private
//! disk is made the same way: whole at its size, or not there.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `contents` atomically (see the module doc).
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    replace_with(path, |file| file.write_all(contents))
}

/// Makes `path` a file of `size` bytes with no data (sparse: only metadata is allocated,
/// and every byte reads as zero), atomically like [`write_atomic`], replacing what is
/// there.
pub fn create_sparse(path: &Path, size: u64) -> std::io::Result<()> {
    replace_with(path, |file| file.set_len(size))
}

/// Fills a new temporary file next to `path` with `fill`, flushes it and renames it over
/// `path`, then flushes the directory (see the module doc).
fn replace_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path");
    let dir = path.parent().ok_or_else(invalid)?;
    let name = path.file_name().ok_or_else(invalid)?;
    // Hidden, and unique per process and call, so that two writers never share one.
    let temporary = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            fill(&mut file)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    // The rename itself is durable once the directory is.
    std::fs::File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?
    .sync_all()
}

/// Whether `name` is a temporary file [`write_atomic`] leaves behind when it is killed
/// between creating and renaming it.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Makes `dir` (and its parents) if missing, and makes it its owner's alone (0700): the
/// state directory and each VM's directory hold consoles, logs and control sockets.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_by_a_rename_and_no_temporary_is_left() {
        let dir = ftvm_tests::temp_dir("ftd-files");
        let path = dir.join("state.json");
        write_atomic(&path, b"one").expect("write");
        let inode = |path: &Path| {
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("stat"))
        };
        let first = inode(&path);
        write_atomic(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_ne!(inode(&path), first, "a new file, renamed into place");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
        assert!(is_temporary(".state.json.1.2.tmp") && !is_temporary("state.json"));
        // A directory that does not exist: an error, nothing written.
        assert!(write_atomic(&dir.join("no/such/file"), b"x").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_sparse_file_has_its_size_and_no_data() {
        use std::os::unix::fs::MetadataExt;
        let dir = ftvm_tests::temp_dir("ftd-sparse");
        let path = dir.join("disk.img");
        create_sparse(&path, 64 << 20).expect("create");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), 64 << 20);
        // st_blocks counts 512-byte units: at most a block of metadata, no data.
        assert!(meta.blocks() * 512 <= 4096, "{} blocks", meta.blocks());
        assert_eq!(meta.mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(names, ["disk.img"], "no temporary left");
        let _ = std::fs::remove_dir_all(dir);
    }
}
