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

/// The key of the go-live claim of `vm`'s pair `generation` in etcd:
/// `/ft/vms/<vm>/gen/<generation>/live`, holding the claimant that won.
pub fn go_live_key(vm: &str, generation: u64) -> String {
    format!("/ft/vms/{vm}/gen/{generation}/live")
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
        assert_eq!(go_live_key("web1", 3), "/ft/vms/web1/gen/3/live");
        let name = claimant(ClaimantRole::Backup, "hb", 42);
        assert_eq!(name, "backup@hb/42");
        assert_eq!(claimant_role(&name), Some(ClaimantRole::Backup));
        assert_eq!(claimant_role("primary@a/1"), Some(ClaimantRole::Primary));
        assert_eq!(claimant_role("someone"), None);
    }
}
