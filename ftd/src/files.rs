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

/// Makes `path` a file of `size` bytes holding a copy of the file `image` (at most `size`
/// bytes) from its start, atomically like [`write_atomic`]. The image's holes, and any
/// 64 KiB of zeros in it, stay holes.
pub fn create_copy(path: &Path, size: u64, image: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let source = std::fs::File::open(image)?;
    let len = source.metadata()?.len();
    if len > size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the image is {len} bytes, more than the disk's {size}"),
        ));
    }
    replace_with(path, |file| {
        file.set_len(size)?;
        let fd = source.as_raw_fd();
        let mut chunk = vec![0u8; 64 << 10];
        let mut at = 0u64;
        while at < len {
            // SAFETY: lseek on a descriptor this function owns; reads are positioned.
            let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            let start = match start {
                -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => break,
                // The filesystem cannot tell: copy the rest as data.
                -1 => at,
                start => start as u64,
            };
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
            let end = if end < 0 { len } else { (end as u64).min(len) };
            let mut offset = start;
            while offset < end {
                let n = ((end - offset) as usize).min(chunk.len());
                source.read_exact_at(&mut chunk[..n], offset)?;
                if chunk[..n].iter().any(|byte| *byte != 0) {
                    file.write_all_at(&chunk[..n], offset)?;
                }
                offset += n as u64;
            }
            at = end.max(start + 1);
        }
        Ok(())
    })
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
    fn a_copy_of_an_image_has_its_data_at_the_disks_size_and_keeps_its_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = ftvm_tests::temp_dir("ftd-disk-copy");
        let image = dir.join("base.img");
        let file = std::fs::File::create(&image).expect("image");
        file.set_len(32 << 20).expect("size");
        file.write_all_at(b"the kv log", 0).expect("write");
        file.write_all_at(&[7u8; 5000], 20 << 20).expect("write");
        drop(file);
        let disk = dir.join("disk.img");
        create_copy(&disk, 64 << 20, &image).expect("copy");
        let copy = std::fs::read(&disk).expect("read");
        assert_eq!(copy.len(), 64 << 20);
        assert_eq!(&copy[..10], b"the kv log");
        assert_eq!(&copy[20 << 20..(20 << 20) + 5000], &[7u8; 5000][..]);
        assert_eq!(copy.iter().filter(|byte| **byte != 0).count(), 10 + 5000);
        let allocated = std::fs::metadata(&disk).expect("stat").blocks() * 512;
        assert!(allocated <= 1 << 20, "{allocated} bytes allocated");
        // An image larger than the disk is refused, and nothing is left behind.
        let refused = create_copy(&dir.join("small.img"), 16 << 20, &image).expect_err("larger");
        assert!(
            refused.to_string().contains("more than the disk's"),
            "{refused}"
        );
        assert!(!dir.join("small.img").exists());
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
