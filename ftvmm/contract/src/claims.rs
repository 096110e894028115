//! The go-live claim: the key ftvmm's etcd arbiter creates for a pair's generation, the
//! names claimants write into it, and VM names (they become part of keys and files).

/// Whether `name` is a valid VM name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_vm_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Whether `uid` can be a VM's unique id in keys and file names: 1 to 100 of
/// `[a-z0-9.-]`.
pub fn valid_uid(uid: &str) -> bool {
    (1..=100).contains(&uid.len())
        && uid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// The key of the go-live claim of `vm`'s pair `generation` in etcd, holding the
/// claimant that won: `/ft/vms/<vm>/uid/<uid>/gen/<generation>/live` for the life `uid` of
/// the VM (a VM deleted and created again under its name is another life, whose claims
/// start afresh), `/ft/vms/<vm>/gen/<generation>/live` for a pair started without one.
pub fn go_live_key(vm: &str, uid: Option<&str>, generation: u64) -> String {
    match uid {
        Some(uid) => format!("/ft/vms/{vm}/uid/{uid}/gen/{generation}/live"),
        None => format!("/ft/vms/{vm}/gen/{generation}/live"),
    }
}

/// The prefix of every go-live claim of the life `uid` of `vm` (removed with it).
pub fn go_live_prefix(vm: &str, uid: &str) -> String {
    format!("/ft/vms/{vm}/uid/{uid}/")
}

/// A number that tells one pair from another on the wire (the log and clone hellos):
/// FNV-1a over `vm`, a separator and `uid`. Not a secret, only a guard against a replica
/// following another VM's stream on a reused port.
pub fn pair_tag(vm: &str, uid: Option<&str>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in vm
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(uid.unwrap_or("").bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Which replica of a pair made a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimantRole {
    /// The primary (its backup was lost, or never came).
    Primary,
    /// The backup (its primary was lost).
    Backup,
}

impl ClaimantRole {
    fn as_str(self) -> &'static str {
        match self {
            ClaimantRole::Primary => "primary",
            ClaimantRole::Backup => "backup",
        }
    }
}

/// A claimant's name: `<role>@<host>/<pid>`. The pid too: two replicas on one host (a
/// mistake, or a late duplicate) must never both "win" as the same claimant.
pub fn claimant(role: ClaimantRole, host: &str, pid: u32) -> String {
    format!("{}@{host}/{pid}", role.as_str())
}

/// The role of the claimant named `name`, if it is one.
pub fn claimant_role(name: &str) -> Option<ClaimantRole> {
    let (role, _) = name.split_once('@')?;
    match role {
        "primary" => Some(ClaimantRole::Primary),
        "backup" => Some(ClaimantRole::Backup),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_and_claimants() {
        assert!(valid_vm_name("web1"));
        assert!(valid_vm_name("a-b-9"));
        assert!(!valid_vm_name(""));
        assert!(!valid_vm_name("-x"));
        assert!(!valid_vm_name("Web"));
        assert!(!valid_vm_name("a/b"));
        assert!(!valid_vm_name(&"a".repeat(64)));
        assert_eq!(go_live_key("web1", None, 3), "/ft/vms/web1/gen/3/live");
        assert_eq!(
            go_live_key("web1", Some("18f-a-1"), 3),
            "/ft/vms/web1/uid/18f-a-1/gen/3/live"
        );
        assert!(go_live_key("web1", Some("u1"), 3).starts_with(&go_live_prefix("web1", "u1")));
        assert!(valid_uid("18f3a-host-a-4d2"));
        assert!(!valid_uid("") && !valid_uid("a/b") && !valid_uid("A"));
        assert_ne!(pair_tag("web1", Some("u1")), pair_tag("web1", Some("u2")));
        assert_ne!(pair_tag("web1", None), pair_tag("web2", None));
        let name = claimant(ClaimantRole::Backup, "hb", 42);
        assert_eq!(name, "backup@hb/42");
        assert_eq!(claimant_role(&name), Some(ClaimantRole::Backup));
        assert_eq!(claimant_role("primary@a/1"), Some(ClaimantRole::Primary));
        assert_eq!(claimant_role("someone"), None);
    }
}
