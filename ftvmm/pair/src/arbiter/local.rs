//! `local:DIR`: the arbiter for replicas on one machine. A claim creates
//! `DIR/<vm>.gen<n>.live` with O_EXCL (atomic on a local filesystem) holding the winner's
//! name, synced before the answer.

use super::{Arbiter, ArbiterError, PairId, Verdict};
use ftvm_contract::claims::{valid_uid, valid_vm_name};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// A directory of claim files.
pub struct LocalArbiter {
    dir: PathBuf,
}

impl LocalArbiter {
    /// An arbiter in `dir` (created if missing).
    pub fn new(dir: impl AsRef<Path>) -> Result<Self, ArbiterError> {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|source| ArbiterError::Local {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(LocalArbiter { dir })
    }

    fn path(&self, pair: &PairId) -> Result<PathBuf, ArbiterError> {
        if !valid_vm_name(&pair.vm) {
            return Err(ArbiterError::BadName(pair.vm.clone()));
        }
        Ok(self.dir.join(match &pair.uid {
            Some(uid) if valid_uid(uid) => format!("{}.{uid}.gen{}.live", pair.vm, pair.generation),
            Some(uid) => return Err(ArbiterError::BadName(uid.clone())),
            None => format!("{}.gen{}.live", pair.vm, pair.generation),
        }))
    }
}

fn local_error(path: &Path) -> impl FnOnce(std::io::Error) -> ArbiterError + '_ {
    move |source| ArbiterError::Local {
        path: path.display().to_string(),
        source,
    }
}

impl Arbiter for LocalArbiter {
    fn claim(&mut self, pair: &PairId, me: &str) -> Result<Verdict, ArbiterError> {
        let path = self.path(pair)?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(me.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(local_error(&path))?;
                Ok(Verdict::Won)
            }
            Err(err) if err.kind() == ErrorKind::AlreadyExists => {
                // The winner may still be writing its name: wait for it briefly.
                for _ in 0..100 {
                    match self.winner(pair)? {
                        Some(winner) if winner == me => return Ok(Verdict::Won),
                        Some(winner) => return Ok(Verdict::Lost { winner }),
                        None => std::thread::sleep(std::time::Duration::from_millis(1)),
                    }
                }
                Err(ArbiterError::Local {
                    path: path.display().to_string(),
                    source: std::io::Error::other("the claim file stays empty"),
                })
            }
            Err(err) => Err(local_error(&path)(err)),
        }
    }

    fn winner(&mut self, pair: &PairId) -> Result<Option<String>, ArbiterError> {
        let path = self.path(pair)?;
        match std::fs::read_to_string(&path) {
            Ok(name) if name.is_empty() => Ok(None),
            Ok(name) => Ok(Some(name)),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(local_error(&path)(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_arbiter_passes_the_arbiter_suite() {
        let dir = std::env::temp_dir().join(format!("ftvmm-arbiter-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let make = || Box::new(LocalArbiter::new(&dir).unwrap()) as Box<dyn Arbiter>;
        crate::arbiter::tests::suite(&make);
        std::fs::remove_dir_all(&dir).ok();
    }
}
