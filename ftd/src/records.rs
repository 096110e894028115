//! Reading the cluster's state out of the store into typed records: the VMs (spec,
//! status, assignments, reports) and the live hosts. Shared by the leader's reconcile
//! loop, the supervisor and the read API.

use crate::keys::{self, VmKey};
use crate::model::{
    Assignment, HostName, HostRecord, ReplicaReport, Role, VmName, VmSpec, VmStatus,
};
use crate::store::{Store, StoreError};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};

/// Everything stored about one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmRecord {
    /// Desired state; `None` once the VM is being deleted.
    pub spec: Option<VmSpec>,
    /// Status the leader recorded.
    pub status: Option<VmStatus>,
    /// Where the leader placed each replica.
    pub assignments: BTreeMap<Role, Assignment>,
    /// What the hosts report about each replica, by replica number.
    pub reports: BTreeMap<u64, ReplicaReport>,
    /// The lives ([`VmSpec::uid`]) of the VM that have go-live claims stored.
    pub claimed_lives: BTreeSet<String>,
}

impl VmRecord {
    /// The assignment of `role` if it belongs to the current spec.
    pub fn current_assignment(&self, role: Role) -> Option<&Assignment> {
        let spec = self.spec.as_ref()?;
        self.assignments
            .get(&role)
            .filter(|assignment| assignment.uid == spec.uid)
    }

    /// The report about the replica of `assignment` (same incarnation, replica number and
    /// host).
    pub fn report_for(&self, assignment: &Assignment) -> Option<&ReplicaReport> {
        self.reports.get(&assignment.replica).filter(|report| {
            report.uid == assignment.uid
                && report.host == assignment.host
                && report.replica == assignment.replica
        })
    }

    /// The highest replica number this VM's assignments and reports use (a new replica
    /// gets the next).
    pub fn last_replica(&self) -> u64 {
        let assigned = self.assignments.values().map(|a| a.replica);
        let reported = self.reports.keys().copied();
        assigned.chain(reported).max().unwrap_or(0)
    }
}

/// Decodes a stored JSON value; a value this version cannot read is logged and skipped
/// (a newer ftd may have written it) rather than failing the whole read.
pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(decoded) => Some(decoded),
        Err(err) => {
            tracing::warn!(key, error = %err, "ignoring a stored value this ftd cannot read");
            None
        }
    }
}

/// Encodes a value for the store.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, enums) cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Every VM under `/ft/vms/`, or one VM when `only` is given.
pub async fn load_vms(
    store: &dyn Store,
    only: Option<&VmName>,
) -> Result<BTreeMap<VmName, VmRecord>, StoreError> {
    let prefix = only.map_or_else(|| keys::VMS.to_owned(), keys::vm_prefix);
    let mut vms: BTreeMap<VmName, VmRecord> = BTreeMap::new();
    for kv in store.list_prefix(&prefix).await? {
        let Some(parsed) = VmKey::parse(&kv.key) else {
            continue;
        };
        match parsed {
            VmKey::Spec(vm) => {
                if let Some(spec) = decode::<VmSpec>(&kv.key, &kv.value) {
                    vms.entry(vm).or_default().spec = Some(spec);
                }
            }
            VmKey::Status(vm) => {
                if let Some(status) = decode(&kv.key, &kv.value) {
                    vms.entry(vm).or_default().status = Some(status);
                }
            }
            VmKey::Assignment(vm, role) => {
                if let Some(assignment) = decode(&kv.key, &kv.value) {
                    vms.entry(vm)
                        .or_default()
                        .assignments
                        .insert(role, assignment);
                }
            }
            VmKey::Report(vm, replica) => {
                if let Some(report) = decode(&kv.key, &kv.value) {
                    vms.entry(vm).or_default().reports.insert(replica, report);
                }
            }
            VmKey::Claim { vm, uid, .. } => {
                vms.entry(vm).or_default().claimed_lives.insert(uid);
            }
        }
    }
    Ok(vms)
}

/// The hosts drained by `ftctl host drain` (live or not).
pub async fn load_drained(store: &dyn Store) -> Result<BTreeSet<HostName>, StoreError> {
    Ok(store
        .list_prefix(keys::DRAINED)
        .await?
        .iter()
        .filter_map(|kv| HostName::new(kv.key.strip_prefix(keys::DRAINED)?).ok())
        .collect())
}

/// The live hosts (those whose ftd holds its lease), by name.
pub async fn load_hosts(store: &dyn Store) -> Result<BTreeMap<HostName, HostRecord>, StoreError> {
    let mut hosts = BTreeMap::new();
    for kv in store.list_prefix(keys::HOSTS).await? {
        if let Some(record) = decode::<HostRecord>(&kv.key, &kv.value) {
            hosts.insert(record.name.clone(), record);
        }
    }
    Ok(hosts)
}
