//! Where a VM's image and disk may come from. ftd runs ftvmm on them with its own rights,
//! so a client must not name any file it likes: only files inside the directories the
//! host's config allows (after symbolic links are followed), and a disk no other VM uses.

use std::path::{Path, PathBuf};

/// The directories images and disks may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPolicy {
    /// Where guest images may be.
    pub image_dirs: Vec<PathBuf>,
    /// Where disk images may be.
    pub disk_dirs: Vec<PathBuf>,
}

/// A path a request named is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// No such file (or not a regular file).
    #[error("the {what} {path} is not a file on {host}")]
    Missing {
        /// image or disk.
        what: &'static str,
        /// As the request named it.
        path: String,
        /// The host that looked.
        host: String,
    },
    /// The file is outside every allowed directory (symbolic links followed).
    #[error("the {what} {path} is outside the {what} directories this cluster allows ({dirs}){resolved}")]
    Outside {
        /// image or disk.
        what: &'static str,
        /// As the request named it.
        path: String,
        /// The allowed directories.
        dirs: String,
        /// Where the path leads, when a symbolic link took it elsewhere.
        resolved: String,
    },
}

impl PathPolicy {
    /// The real path of the `what` (image or disk) a request names, if it is allowed.
    pub fn check(&self, what: &'static str, path: &str, host: &str) -> Result<PathBuf, PathError> {
        let missing = || PathError::Missing {
            what,
            path: path.to_owned(),
            host: host.to_owned(),
        };
        let real = std::fs::canonicalize(path).map_err(|_| missing())?;
        if !real.is_file() {
            return Err(missing());
        }
        let dirs = if what == "disk" {
            &self.disk_dirs
        } else {
            &self.image_dirs
        };
        let inside = dirs
            .iter()
            .any(|dir| std::fs::canonicalize(dir).is_ok_and(|dir| real.starts_with(dir)));
        if inside {
            return Ok(real);
        }
        Err(PathError::Outside {
            what,
            path: path.to_owned(),
            dirs: dirs
                .iter()
                .map(|dir| dir.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            resolved: if Path::new(path) == real {
                String::new()
            } else {
                format!("; it leads to {}", real.display())
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_inside_the_allowed_directories_pass_and_links_out_do_not() {
        let root = ftvm_tests::temp_dir("paths");
        let (images, disks, elsewhere) =
            (root.join("images"), root.join("disks"), root.join("etc"));
        for dir in [&images, &disks, &elsewhere] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(images.join("kv.elf"), b"elf").unwrap();
        std::fs::write(disks.join("web1.img"), b"disk").unwrap();
        std::fs::write(elsewhere.join("shadow"), b"secret").unwrap();
        std::os::unix::fs::symlink(elsewhere.join("shadow"), disks.join("sneaky.img")).unwrap();
        let policy = PathPolicy {
            image_dirs: vec![images.clone()],
            disk_dirs: vec![disks.clone()],
        };
        let text = |path: PathBuf| path.display().to_string();
        assert!(policy
            .check("image", &text(images.join("kv.elf")), "a")
            .is_ok());
        assert!(policy
            .check("disk", &text(disks.join("web1.img")), "a")
            .is_ok());
        // An image is not a disk, and the other way round.
        assert!(matches!(
            policy.check("disk", &text(images.join("kv.elf")), "a"),
            Err(PathError::Outside { .. })
        ));
        let sneaky = policy.check("disk", &text(disks.join("sneaky.img")), "a");
        assert!(
            matches!(&sneaky, Err(PathError::Outside { resolved, .. }) if resolved.contains("shadow")),
            "{sneaky:?}"
        );
        let dotted = text(disks.join("../etc/shadow"));
        assert!(matches!(
            policy.check("disk", &dotted, "a"),
            Err(PathError::Outside { .. })
        ));
        assert!(matches!(
            policy.check("disk", &text(disks.join("none.img")), "a"),
            Err(PathError::Missing { .. })
        ));
        assert!(matches!(
            policy.check("disk", &text(disks.clone()), "a"),
            Err(PathError::Missing { .. })
        ));
    }
}
