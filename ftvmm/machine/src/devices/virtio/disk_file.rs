//! The file behind a virtio-blk disk, optionally with a write cache kept in this process
//! until the guest flushes: what a host's page cache loses when the host dies, made
//! visible to tests (`ftvmm run --disk-cache-in-process`). Without the cache, writes go to
//! the file at once and a flush syncs it. An overlay (the replay of a private disk's log
//! on a copy of the disk) keeps every write in this process and never writes the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

/// Bytes of a cached sector.
const SECTOR: u64 = 512;

/// A disk image file (see the module doc).
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    /// Written sectors not yet flushed, by sector number, with the cache on.
    cache: Option<Mutex<BTreeMap<u64, Vec<u8>>>>,
    /// The cache is never written to the file (opened read-only).
    overlay: bool,
}

impl DiskFile {
    /// Opens `path` read-write; `cache_in_process` keeps writes here until [`DiskFile::sync`].
    pub fn open(path: &Path, cache_in_process: bool) -> std::io::Result<DiskFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(DiskFile {
            file,
            cache: cache_in_process.then(Mutex::default),
            overlay: false,
        })
    }

    /// Opens `path` read-only; writes stay in this process for good.
    pub fn open_overlay(path: &Path) -> std::io::Result<DiskFile> {
        Ok(DiskFile {
            file: File::open(path)?,
            cache: Some(Mutex::default()),
            overlay: true,
        })
    }

    /// The byte ranges `(start, end)` of the file that may hold data: its data extents,
    /// holes left out (the whole file where the filesystem cannot tell).
    pub fn data_extents(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let len = self.size()?;
        let fd = self.file.as_raw_fd();
        let mut extents = Vec::new();
        let mut at = 0u64;
        while at < len {
            // SAFETY: lseek on a descriptor this struct owns; it moves only the file offset,
            // which nothing here uses (reads and writes are positioned).
            let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if start < 0 {
                let err = std::io::Error::last_os_error();
                return match err.raw_os_error() {
                    // No data after `at`.
                    Some(libc::ENXIO) => Ok(extents),
                    // The filesystem cannot tell: everything may be data.
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, len)]),
                    _ => Err(err),
                };
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
            if end < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (start, end) = (start as u64, (end as u64).min(len));
            if end <= start {
                break;
            }
            extents.push((start, end));
            at = end;
        }
        Ok(extents)
    }

    /// Drops the file's contents and makes it `len` bytes of holes (a clone's receiver,
    /// before the copy arrives).
    pub fn discard(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.set_len(len)
    }

    /// The file's size in bytes.
    pub fn size(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Writes `data` at byte `offset` (whole sectors).
    pub fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let Some(cache) = &self.cache else {
            return self.file.write_all_at(data, offset);
        };
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        for (index, sector) in data.chunks(SECTOR as usize).enumerate() {
            cache.insert(offset / SECTOR + index as u64, sector.to_vec());
        }
        Ok(())
    }

    /// Reads `buffer.len()` bytes at byte `offset`, cached writes included.
    pub fn read_at(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buffer, offset)?;
        if let Some(cache) = &self.cache {
            let cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
            let first = offset / SECTOR;
            let last = (offset + buffer.len() as u64).div_ceil(SECTOR);
            for (sector, bytes) in cache.range(first..last) {
                let at = (sector * SECTOR - offset) as usize;
                let end = (at + bytes.len()).min(buffer.len());
                buffer[at..end].copy_from_slice(&bytes[..end - at]);
            }
        }
        Ok(())
    }

    /// Makes every completed write durable: the cached sectors go to the file, then the
    /// file's data is synced.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.overlay {
            return Ok(());
        }
        if let Some(cache) = &self.cache {
            let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
            for (sector, bytes) in cache.iter() {
                self.file.write_all_at(bytes, sector * SECTOR)?;
            }
            cache.clear();
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_writes_are_read_back_and_reach_the_file_only_at_a_sync() {
        let path = std::env::temp_dir().join(format!("ftvm-diskfile-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let disk = DiskFile::open(&path, true).unwrap();
        disk.write_at(&[7u8; 1024], 512).unwrap();
        let mut back = vec![0u8; 2048];
        disk.read_at(&mut back, 0).unwrap();
        assert_eq!(&back[..512], &[0u8; 512][..]);
        assert_eq!(&back[512..1536], &[7u8; 1024][..]);
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
        disk.sync().unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[512..1536], &[7u8; 1024][..]);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn an_overlay_reads_its_writes_and_never_writes_the_file() {
        let path = std::env::temp_dir().join(format!("ftvm-overlay-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let disk = DiskFile::open_overlay(&path).unwrap();
        disk.write_at(&[9u8; 512], 1024).unwrap();
        disk.sync().unwrap();
        let mut back = vec![0u8; 2048];
        disk.read_at(&mut back, 512).unwrap();
        assert_eq!(&back[..512], &[1u8; 512][..]);
        assert_eq!(&back[512..1024], &[9u8; 512][..]);
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 1));
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn data_extents_leave_out_holes_and_discard_makes_one_big_hole() {
        let path = std::env::temp_dir().join(format!("ftvm-extents-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[5u8; 4096], 8 << 20).unwrap();
        drop(file);
        let disk = DiskFile::open(&path, false).unwrap();
        let extents = disk.data_extents().unwrap();
        let covered: u64 = extents.iter().map(|(start, end)| end - start).sum();
        assert!(
            extents
                .iter()
                .any(|(start, end)| *start <= 8 << 20 && *end >= (8 << 20) + 4096),
            "{extents:?}"
        );
        assert!(covered < 64 << 20, "holes reported as data: {extents:?}");
        disk.discard(64 << 20).unwrap();
        assert_eq!(disk.size().unwrap(), 64 << 20);
        let mut back = vec![1u8; 4096];
        disk.read_at(&mut back, 8 << 20).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        std::fs::remove_file(&path).ok();
    }
}
