//! Carries out a [`Decision`] against the store and the event log, action by action in
//! its order, then records the VM's status if it changed. Every write is fenced by the
//! leadership the pass runs under ([`Fenced`]): once this ftd no longer leads, the next
//! write fails and the pass ends without having changed anything more. A failed write
//! ends the pass (the next pass decides again from what is stored). The writes of one
//! action go in one transaction.

use super::decide::{Action, Decision};
use super::PassSummary;
use crate::events::EventLog;
use crate::keys;
use crate::metrics;
use crate::model::{Role, VmName};
use crate::records::encode;
use crate::store::{Fenced, StoreError, Write};

fn put(key: String, value: Vec<u8>) -> Write {
    Write::Put { key, value }
}

/// Carries out `decision` for `vm`, counting what it did in `summary`.
pub(super) async fn apply(
    store: &Fenced<'_>,
    events: &EventLog,
    vm: &VmName,
    decision: &Decision,
    summary: &mut PassSummary,
) -> Result<(), StoreError> {
    for action in &decision.actions {
        match action {
            Action::DropAssignment { role } => {
                store.delete(&keys::assignment(vm, *role)).await?;
            }
            Action::Place { primary, backup } => {
                let mut writes = Vec::new();
                if let Some(backup) = backup {
                    writes.push(put(keys::assignment(vm, Role::Backup), encode(backup)));
                }
                writes.push(put(keys::assignment(vm, Role::Primary), encode(primary)));
                store.commit(&writes).await?;
                summary.placed += 1 + usize::from(backup.is_some());
            }
            Action::PlaceClone { primary, backup } => {
                store
                    .commit(&[
                        put(keys::assignment(vm, Role::Primary), encode(primary)),
                        put(keys::assignment(vm, Role::Backup), encode(backup)),
                    ])
                    .await?;
                summary.placed += 1;
            }
            Action::RecordFailover => summary.failovers += 1,
            Action::Promote { assignment } => {
                store
                    .commit(&[
                        put(keys::assignment(vm, Role::Primary), encode(assignment)),
                        Write::Delete {
                            key: keys::assignment(vm, Role::Backup),
                        },
                    ])
                    .await?;
            }
            Action::Event { kind, message } => {
                event(store, events, Some(vm), kind, message.clone()).await?;
            }
            Action::CleanUp { replicas } => {
                // Key by key, never the whole prefix: a VM of the same name may be created
                // while this runs, and its spec must survive.
                let mut writes = vec![Write::Delete {
                    key: keys::status(vm),
                }];
                writes.extend(replicas.iter().map(|replica| Write::Delete {
                    key: keys::report(vm, *replica),
                }));
                for chunk in writes.chunks(64) {
                    store.commit(chunk).await?;
                }
                summary.removed += 1;
            }
            Action::RemoveClaims { uid } => {
                // Only a valid uid: its prefix then names one life's claims and nothing
                // else (never the spec of a VM created again under the name).
                if ftvm_contract::claims::valid_uid(uid) {
                    store
                        .delete_prefix(&ftvm_contract::claims::go_live_prefix(vm.as_str(), uid))
                        .await?;
                }
            }
        }
    }
    if let Some(status) = &decision.status {
        store.put(&keys::status(vm), encode(status)).await?;
    }
    Ok(())
}

/// Appends an event, fenced like every write of the pass, and counts it in
/// `ftd_events_total`.
pub(super) async fn event(
    store: &Fenced<'_>,
    events: &EventLog,
    vm: Option<&VmName>,
    kind: &str,
    message: String,
) -> Result<(), StoreError> {
    events.append(store.fence(), vm, kind, message).await?;
    metrics::event(kind);
    Ok(())
}
