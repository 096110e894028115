//! Files a replica writes that hold its guest's data (recordings, snapshots, the console):
//! readable and writable by their owner only, whatever the umask.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The permission bits of a replica's files.
pub const MODE: u32 = 0o600;

/// Creates (or truncates) `path`, readable and writable (a console is rotated by copying
/// it), mode [`MODE`]. A file that existed keeps its mode, so it is set again.
pub fn create(path: &Path) -> std::io::Result<File> {
    open(path, true)
}

/// Opens `path` for writing, mode [`MODE`], made if missing and kept as it is if not.
pub fn open_kept(path: &Path) -> std::io::Result<File> {
    open(path, false)
}

fn open(path: &Path, truncate: bool) -> std::io::Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(MODE)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_made_or_truncated_is_its_owners_alone() {
        let dir = std::env::temp_dir().join(format!("ftvm-private-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(super::create(&path).unwrap());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
