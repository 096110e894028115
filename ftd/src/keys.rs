//! The key layout in etcd. Every key the control plane uses is built here.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/ft/cluster` | [`ClusterRecord`](crate::model::ClusterRecord): the cluster's id, written once | none |
//! | `/ft/hosts/<host>` | [`HostRecord`](crate::model::HostRecord) | the host's |
//! | `/ft/leader/<id>` | [`LeaderRecord`](crate::model::LeaderRecord) (election) | the candidate's |
//! | `/ft/vms/<vm>/spec` | [`VmSpec`](crate::model::VmSpec) | none |
//! | `/ft/vms/<vm>/status` | [`VmStatus`](crate::model::VmStatus) | none |
//! | `/ft/vms/<vm>/replicas/<role>` | [`Assignment`](crate::model::Assignment) | none |
//! | `/ft/vms/<vm>/uid/<uid>/gen/<n>/live` | the claimant that won generation `<n>`'s go-live in the life `<uid>` of the VM (written by ftvmm's etcd arbiter, read here, removed with that life) | none |
//! | `/ft/vms/<vm>/reports/<replica>` | [`ReplicaReport`](crate::model::ReplicaReport) of replica number `<replica>` | the reporting host's |
//! | `/ft/drained/<host>` | when the host was drained (ms since the epoch, text): no new replica goes there | none |
//! | `/ft/events/<seq>` | [`Event`](crate::model::Event), seq zero-padded to 20 digits | none |
//! | `/ft/images/<sha256>/chunk/<n>`, `.../meta` | an uploaded guest image, in chunks, then its [`ImageMeta`](crate::images::ImageMeta) (written last) | none |

use crate::model::{Role, VmName};

/// Prefix of every key.
pub const ROOT: &str = "/ft/";
/// The cluster marker.
pub const CLUSTER: &str = "/ft/cluster";
/// Prefix of host registrations.
pub const HOSTS: &str = "/ft/hosts/";
/// The election name (candidates are keys under it).
pub const LEADER: &str = "/ft/leader";
/// Prefix of everything about VMs.
pub const VMS: &str = "/ft/vms/";
/// Prefix of the drained hosts.
pub const DRAINED: &str = "/ft/drained/";
/// Prefix of the event log.
pub const EVENTS: &str = "/ft/events/";

/// `/ft/vms/<vm>/uid/<uid>/gen/<generation>/live`: the go-live claim of the pair's
/// `generation` in the life `uid` of the VM, created by the replica that won it (the key
/// is the contract's: ftvmm's etcd arbiter writes it).
pub fn go_live_claim(vm: &VmName, uid: &str, generation: u64) -> String {
    let uid = ftvm_contract::claims::valid_uid(uid).then_some(uid);
    ftvm_contract::claims::go_live_key(vm.as_str(), uid, generation)
}

/// `/ft/drained/<host>`.
pub fn drained(name: &str) -> String {
    format!("{DRAINED}{name}")
}

/// `/ft/hosts/<host>`.
pub fn host(name: &str) -> String {
    format!("{HOSTS}{name}")
}

/// `/ft/vms/<vm>/` (everything about one VM).
pub fn vm_prefix(vm: &VmName) -> String {
    format!("{VMS}{vm}/")
}

/// `/ft/vms/<vm>/spec`.
pub fn spec(vm: &VmName) -> String {
    format!("{VMS}{vm}/spec")
}

/// `/ft/vms/<vm>/status`.
pub fn status(vm: &VmName) -> String {
    format!("{VMS}{vm}/status")
}

/// `/ft/vms/<vm>/replicas/<role>`.
pub fn assignment(vm: &VmName, role: Role) -> String {
    format!("{VMS}{vm}/replicas/{role}")
}

/// `/ft/vms/<vm>/reports/<replica>`: per replica process rather than per role, so a
/// backup made primary keeps reporting under the same key.
pub fn report(vm: &VmName, replica: u64) -> String {
    format!("{VMS}{vm}/reports/{replica}")
}

/// `/ft/events/<seq>` with the sequence number zero-padded so keys sort by it.
pub fn event(seq: u64) -> String {
    format!("{EVENTS}{seq:020}")
}

/// What a key under [`VMS`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmKey {
    /// `/ft/vms/<vm>/spec`.
    Spec(VmName),
    /// `/ft/vms/<vm>/status`.
    Status(VmName),
    /// `/ft/vms/<vm>/replicas/<role>`.
    Assignment(VmName, Role),
    /// `/ft/vms/<vm>/reports/<replica>`.
    Report(VmName, u64),
    /// `/ft/vms/<vm>/uid/<uid>/gen/<generation>/live`: a go-live claim of the life `uid`.
    Claim {
        /// The VM.
        vm: VmName,
        /// The life of the VM ([`crate::model::VmSpec::uid`]) whose pair claimed.
        uid: String,
        /// The pair's generation.
        generation: u64,
    },
}

impl VmKey {
    /// Parses a key under [`VMS`]; `None` for anything else (ignored by readers, so the
    /// layout can grow).
    pub fn parse(key: &str) -> Option<VmKey> {
        let rest = key.strip_prefix(VMS)?;
        let (vm, rest) = rest.split_once('/')?;
        let vm = VmName::new(vm).ok()?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["spec"] => Some(VmKey::Spec(vm)),
            ["status"] => Some(VmKey::Status(vm)),
            ["replicas", role] => Some(VmKey::Assignment(vm, Role::parse(role).ok()?)),
            ["reports", replica] => Some(VmKey::Report(vm, replica.parse().ok()?)),
            ["uid", uid, "gen", generation, "live"] if ftvm_contract::claims::valid_uid(uid) => {
                Some(VmKey::Claim {
                    vm,
                    uid: (*uid).to_owned(),
                    generation: generation.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_keys_round_trip_through_parse() {
        let vm = VmName::new("web1").expect("valid name");
        assert_eq!(VmKey::parse(&spec(&vm)), Some(VmKey::Spec(vm.clone())));
        assert_eq!(VmKey::parse(&status(&vm)), Some(VmKey::Status(vm.clone())));
        assert_eq!(
            VmKey::parse(&assignment(&vm, Role::Backup)),
            Some(VmKey::Assignment(vm.clone(), Role::Backup))
        );
        assert_eq!(
            VmKey::parse(&report(&vm, 3)),
            Some(VmKey::Report(vm.clone(), 3))
        );
        assert_eq!(
            VmKey::parse(&go_live_claim(&vm, "u-1", 4)),
            Some(VmKey::Claim {
                vm,
                uid: "u-1".into(),
                generation: 4
            })
        );
        assert_eq!(VmKey::parse("/ft/vms/web1/uid/U/gen/1/live"), None);
        assert_eq!(VmKey::parse("/ft/vms/web1/reports/x"), None);
        assert_eq!(VmKey::parse("/ft/vms/Bad/spec"), None);
        assert_eq!(VmKey::parse("/ft/vms/web1/other"), None);
    }

    #[test]
    fn event_keys_sort_by_sequence() {
        assert!(event(9) < event(10));
        assert!(event(99) < event(100_000));
    }
}
