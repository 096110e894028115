//! Carries out a [`Decision`] against the store and the event log, action by action in
//! its order, then records the VM's status if it changed. A failed write ends the pass
//! (the next pass decides again from what is stored).

use super::decide::{Action, Decision};
use super::PassSummary;
use crate::events::EventLog;
use crate::keys;
use crate::metrics;
use crate::model::{Role, VmName};
use crate::records::encode;
use crate::store::{Store, StoreError};

/// Carries out `decision` for `vm`, counting what it did in `summary`.
pub(super) async fn apply(
    store: &dyn Store,
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
                if let Some(backup) = backup {
                    store
                        .put(&keys::assignment(vm, Role::Backup), encode(backup), None)
                        .await?;
                }
                store
                    .put(&keys::assignment(vm, Role::Primary), encode(primary), None)
                    .await?;
                summary.placed += 1 + usize::from(backup.is_some());
            }
            Action::PlaceClone { primary, backup } => {
                store
                    .put(&keys::assignment(vm, Role::Primary), encode(primary), None)
                    .await?;
                store
                    .put(&keys::assignment(vm, Role::Backup), encode(backup), None)
                    .await?;
                summary.placed += 1;
            }
            Action::RecordFailover => {
                summary.failovers += 1;
                metrics::failover();
            }
            Action::Promote { assignment } => {
                store
                    .put(
                        &keys::assignment(vm, Role::Primary),
                        encode(assignment),
                        None,
                    )
                    .await?;
                store.delete(&keys::assignment(vm, Role::Backup)).await?;
            }
            Action::Event { kind, message } => {
                event(events, Some(vm), kind, message.clone()).await?;
            }
            Action::CleanUp { replicas } => {
                // Key by key, never the whole prefix: a VM of the same name may be created
                // while this runs, and its spec must survive.
                store.delete(&keys::status(vm)).await?;
                for replica in replicas {
                    store.delete(&keys::report(vm, *replica)).await?;
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
        store.put(&keys::status(vm), encode(status), None).await?;
    }
    Ok(())
}

/// Appends an event and counts it in `ftd_events_total`.
pub(super) async fn event(
    events: &EventLog,
    vm: Option<&VmName>,
    kind: &str,
    message: String,
) -> Result<(), StoreError> {
    events.append(vm, kind, message).await?;
    metrics::event(kind);
    Ok(())
}
