//! The file behind a virtio-blk disk, optionally with a write cache kept in this process
//! until the guest flushes: what a host's page cache loses when the host dies, made
//! visible to tests (`ftvmm run --disk-cache-in-process`). Without the cache, writes go to
//! the file at once and a flush syncs it.

use std::collections::BTreeMap;
use std::fs::File;
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
        })
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
}
