//! Whose store is it: the cluster marker `/ft/cluster` (a [`ClusterRecord`]) is written
//! once, by the first ftd that finds the store without one, and each ftd remembers the id
//! it joined (`<state_dir>/cluster-id`). A pass of the supervisor only starts or stops
//! replicas while the store holds that id: an emptied etcd, or another cluster's, answers
//! without it, and its lack of VMs is no evidence that this host's replicas were deleted.

use super::{Supervisor, SupervisorError};
use crate::keys;
use crate::model::{now_unix_ms, ClusterRecord};
use crate::records::{decode, encode};
use std::sync::atomic::Ordering;

/// What the store says about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Membership {
    /// It holds this host's cluster id.
    Ours,
    /// It holds no marker, or another cluster's (the id it holds, if any).
    Foreign(Option<String>),
}

impl Supervisor {
    fn remembered_cluster(&self) -> Result<Option<String>, SupervisorError> {
        let Some(path) = &self.config.cluster_id_file else {
            return Ok(self.current_cluster());
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text.trim().to_owned()).filter(|id| !id.is_empty())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SupervisorError::StateDir {
                path: path.clone(),
                source,
            }),
        }
    }

    fn current_cluster(&self) -> Option<String> {
        self.cluster_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn stored_cluster(&self) -> Result<Option<ClusterRecord>, SupervisorError> {
        Ok(self
            .store
            .get(keys::CLUSTER)
            .await?
            .and_then(|kv| decode::<ClusterRecord>(&kv.key, &kv.value)))
    }

    /// Finds out which cluster this host belongs to (call once, before the first pass):
    /// the one it remembers; else the one the store names; else a new one, whose marker
    /// this ftd writes (create-if-absent: one ftd wins). An ftd that remembers a cluster
    /// never writes a marker: a store without it is not trusted (logged), until an
    /// operator removes `cluster-id` from the state directory.
    pub async fn join_cluster(&self) -> Result<(), SupervisorError> {
        let remembered = self.remembered_cluster()?;
        let stored = self.stored_cluster().await?;
        let id = match (remembered, stored) {
            (Some(mine), Some(stored)) if mine == stored.id => mine,
            (Some(mine), stored) => {
                tracing::error!(cluster = %mine, store = ?stored.map(|record| record.id), "the store does not hold this host's cluster id: it is empty or another cluster's; replicas here are neither started nor stopped until it does (remove {} if the cluster was made anew on purpose)", self.config.cluster_id_file.as_ref().map_or_else(String::new, |path| path.display().to_string()));
                mine
            }
            (None, Some(stored)) => stored.id,
            (None, None) => {
                let record = ClusterRecord {
                    id: format!(
                        "{:x}-{}-{:x}",
                        now_unix_ms(),
                        self.config.host,
                        std::process::id()
                    ),
                    created_unix_ms: now_unix_ms(),
                };
                if self
                    .store
                    .create(keys::CLUSTER, encode(&record), None)
                    .await?
                {
                    tracing::info!(cluster = %record.id, "new cluster: marker written");
                    record.id
                } else {
                    // Another ftd wrote it meanwhile.
                    self.stored_cluster()
                        .await?
                        .map_or(record.id, |stored| stored.id)
                }
            }
        };
        if let Some(path) = &self.config.cluster_id_file {
            // (The state directory may not exist yet on a new host.)
            let dir = path.parent().unwrap_or(&self.config.state_dir);
            crate::files::private_dir(dir)
                .and_then(|()| crate::files::write_atomic(path, format!("{id}\n").as_bytes()))
                .map_err(|source| SupervisorError::StateDir {
                    path: path.clone(),
                    source,
                })?;
        }
        tracing::info!(cluster = %id, "this host belongs to cluster {id}");
        *self
            .cluster_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id);
        Ok(())
    }

    /// Whether the store holds this host's cluster id now (logged when that changes).
    pub(super) async fn membership(&self) -> Result<Membership, SupervisorError> {
        let stored = self.stored_cluster().await?.map(|record| record.id);
        let mine = self.current_cluster();
        let membership = match (&mine, stored) {
            (Some(mine), Some(stored)) if *mine == stored => Membership::Ours,
            (_, stored) => Membership::Foreign(stored),
        };
        let foreign = membership != Membership::Ours;
        if self.foreign_store.swap(foreign, Ordering::SeqCst) != foreign {
            match &membership {
                Membership::Ours => {
                    tracing::warn!(cluster = ?mine, "the store holds this host's cluster id again")
                }
                Membership::Foreign(stored) => {
                    tracing::error!(cluster = ?mine, store = ?stored, "the store does not hold this host's cluster id (emptied, or another cluster's): replicas here are neither started nor stopped")
                }
            }
        }
        Ok(membership)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Bench;
    use super::*;

    #[tokio::test]
    async fn the_first_ftd_writes_the_marker_and_an_ftd_that_remembers_one_never_does() {
        let bench = Bench::new("ftd-marker");
        // A new host: not even its state directory exists yet.
        std::fs::remove_dir_all(bench.state_dir()).expect("remove");
        let first = bench.supervisor();
        first.join_cluster().await.expect("join");
        let id = first.current_cluster().expect("an id");
        let file = std::fs::read_to_string(bench.state_dir().join("cluster-id")).expect("read");
        assert_eq!(file.trim(), id);
        assert_eq!(
            first.membership().await.expect("membership"),
            Membership::Ours
        );
        // Restarted: the same cluster.
        let again = bench.supervisor();
        again.join_cluster().await.expect("join");
        assert_eq!(again.current_cluster(), Some(id.clone()));
        // The store emptied: a restarted ftd does not make it its cluster's again.
        bench.store.delete(keys::CLUSTER).await.expect("delete");
        let after = bench.supervisor();
        after.join_cluster().await.expect("join");
        assert_eq!(after.current_cluster(), Some(id));
        assert_eq!(bench.store.get(keys::CLUSTER).await.expect("get"), None);
        assert_eq!(
            after.membership().await.expect("membership"),
            Membership::Foreign(None)
        );
    }
}
