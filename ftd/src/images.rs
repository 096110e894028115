//! Guest images stored by content: `ftctl create --image FILE` uploads the file once
//! (to any ftd); it is kept in the cluster's store under its SHA-256, and every ftd that
//! starts a replica of a VM made from it keeps a verified copy in
//! `<state_dir>/images/<sha256>.elf`.
//!
//! In the store an image is chunks of at most [`CHUNK_BYTES`] (under etcd's default
//! request limit) at `/ft/images/<sha256>/chunk/<n>`, then `/ft/images/<sha256>/meta`
//! (its size and chunk count), written last: an image whose meta is there is whole. The
//! keys depend only on the bytes, so any ftd may write them, any number of times.
//!
//! A local copy is checked against its hash before each use: a copy that changed on
//! disk (tampered with, or corrupt) is not used; it is fetched again from the store, and
//! the store's bytes are checked too before they are written.

use crate::model::valid_sha256;
use crate::records::{decode, encode};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The largest image accepted (FT-ready guests are small static executables).
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// Bytes per stored chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Prefix of the stored images.
pub const PREFIX: &str = "/ft/images/";

/// An image cannot be stored, found or checked.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No image with this hash was uploaded.
    #[error("no image sha256:{0} was uploaded (ftctl create --image FILE uploads one)")]
    Unknown(String),
    /// The bytes are not what their hash says.
    #[error("image sha256:{sha256}: {what}")]
    Corrupt {
        /// The hash asked for.
        sha256: String,
        /// What is wrong.
        what: String,
    },
    /// Too large, empty, or not a hash.
    #[error("{0}")]
    Invalid(String),
    /// The local copy cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What `/ft/images/<sha256>/meta` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Bytes.
    pub size: u64,
    /// Chunks.
    pub chunks: u64,
}

/// The SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn meta_key(sha256: &str) -> String {
    format!("{PREFIX}{sha256}/meta")
}

fn chunk_key(sha256: &str, index: u64) -> String {
    format!("{PREFIX}{sha256}/chunk/{index:06}")
}

/// Keeps `bytes` in the store; its hash.
pub async fn upload(store: &dyn Store, bytes: &[u8]) -> Result<String, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Invalid("the image is empty".into()));
    }
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(ImageError::Invalid(format!(
            "the image is {} bytes, more than the {} MiB allowed",
            bytes.len(),
            MAX_IMAGE_BYTES >> 20
        )));
    }
    let sha256 = sha256_hex(bytes);
    if meta(store, &sha256).await?.is_some() {
        return Ok(sha256);
    }
    let mut chunks = 0;
    for chunk in bytes.chunks(CHUNK_BYTES) {
        store
            .put(&chunk_key(&sha256, chunks), chunk.to_vec(), None)
            .await?;
        chunks += 1;
    }
    let meta = ImageMeta {
        size: bytes.len() as u64,
        chunks,
    };
    store.put(&meta_key(&sha256), encode(&meta), None).await?;
    Ok(sha256)
}

/// The meta of image `sha256`, if it was uploaded whole.
pub async fn meta(store: &dyn Store, sha256: &str) -> Result<Option<ImageMeta>, ImageError> {
    Ok(store
        .get(&meta_key(sha256))
        .await?
        .and_then(|kv| decode::<ImageMeta>(&meta_key(sha256), &kv.value)))
}

/// The bytes of image `sha256` from the store, checked against the hash.
pub async fn download(store: &dyn Store, sha256: &str) -> Result<Vec<u8>, ImageError> {
    let meta = meta(store, sha256)
        .await?
        .ok_or_else(|| ImageError::Unknown(sha256.to_owned()))?;
    let corrupt = |what: String| ImageError::Corrupt {
        sha256: sha256.to_owned(),
        what,
    };
    if meta.size > MAX_IMAGE_BYTES {
        return Err(corrupt(format!("its meta says {} bytes", meta.size)));
    }
    let mut bytes = Vec::with_capacity(meta.size as usize);
    for index in 0..meta.chunks {
        let chunk = store
            .get(&chunk_key(sha256, index))
            .await?
            .ok_or_else(|| corrupt(format!("chunk {index} is missing in the store")))?;
        bytes.extend_from_slice(&chunk.value);
        if bytes.len() as u64 > meta.size {
            return Err(corrupt("more bytes than its meta says".into()));
        }
    }
    if bytes.len() as u64 != meta.size || sha256_hex(&bytes) != sha256 {
        return Err(corrupt("the stored bytes do not have this hash".into()));
    }
    Ok(bytes)
}

/// What [`LocalImages::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The copy was there and had the right hash.
    Present,
    /// There was none: fetched from the store.
    Fetched,
    /// The copy did not have its hash: replaced by the store's.
    Replaced,
}

/// This host's copies of the images, in `<state_dir>/images`.
#[derive(Debug, Clone)]
pub struct LocalImages {
    dir: PathBuf,
}

impl LocalImages {
    /// The copies under `state_dir`.
    pub fn new(state_dir: &Path) -> LocalImages {
        LocalImages {
            dir: state_dir.join("images"),
        }
    }

    /// Where this host keeps image `sha256`.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.elf"))
    }

    /// A verified local copy of image `sha256`: the one there if its hash is right,
    /// else the store's, written anew.
    pub async fn ensure(
        &self,
        store: &dyn Store,
        sha256: &str,
    ) -> Result<(PathBuf, Ensured), ImageError> {
        if !valid_sha256(sha256) {
            return Err(ImageError::Invalid(format!("{sha256:?} is not a SHA-256")));
        }
        let path = self.path(sha256);
        let how = match std::fs::read(&path) {
            Ok(bytes) if sha256_hex(&bytes) == sha256 => return Ok((path, Ensured::Present)),
            Ok(_) => Ensured::Replaced,
            Err(_) => Ensured::Fetched,
        };
        let bytes = download(store, sha256).await?;
        let failed = |source| ImageError::Write {
            path: path.clone(),
            source,
        };
        crate::files::private_dir(&self.dir).map_err(failed)?;
        crate::files::write_atomic(&path, &bytes).map_err(failed)?;
        Ok((path, how))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;

    #[tokio::test]
    async fn an_image_goes_in_by_chunks_and_comes_out_verified_once_per_host() {
        let store = MemStore::new();
        let image: Vec<u8> = (0..(CHUNK_BYTES * 2 + 1234))
            .map(|i| (i % 251) as u8)
            .collect();
        let sha256 = upload(&store, &image).await.expect("uploaded");
        assert_eq!(sha256, sha256_hex(&image));
        assert_eq!(
            meta(&store, &sha256).await.expect("meta"),
            Some(ImageMeta {
                size: image.len() as u64,
                chunks: 3
            })
        );
        // Again: nothing new.
        assert_eq!(upload(&store, &image).await.expect("uploaded"), sha256);
        let dir = ftvm_tests::temp_dir("images");
        let local = LocalImages::new(&dir);
        let (path, how) = local.ensure(&store, &sha256).await.expect("fetched");
        assert_eq!(how, Ensured::Fetched);
        assert_eq!(std::fs::read(&path).expect("the copy"), image);
        assert_eq!(
            local.ensure(&store, &sha256).await.expect("there").1,
            Ensured::Present
        );
        // A copy changed on disk is not used: the store's replaces it.
        let mut tampered = image.clone();
        tampered[100] ^= 1;
        std::fs::write(&path, &tampered).expect("tamper");
        assert_eq!(
            local.ensure(&store, &sha256).await.expect("replaced").1,
            Ensured::Replaced
        );
        assert_eq!(std::fs::read(&path).expect("the copy"), image);
        // A chunk changed in the store is caught too.
        store
            .put(&chunk_key(&sha256, 1), vec![0; CHUNK_BYTES], None)
            .await
            .expect("put");
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(
            local.ensure(&store, &sha256).await,
            Err(ImageError::Corrupt { .. })
        ));
        assert!(!path.exists(), "a corrupt image was written");
        // Unknown, empty and oversized images.
        let unknown = "0".repeat(64);
        assert!(matches!(
            local.ensure(&store, &unknown).await,
            Err(ImageError::Unknown(_))
        ));
        assert!(matches!(
            upload(&store, &[]).await,
            Err(ImageError::Invalid(_))
        ));
        assert!(matches!(
            local.ensure(&store, "../../etc/passwd").await,
            Err(ImageError::Invalid(_))
        ));
    }
}
