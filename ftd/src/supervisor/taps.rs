//! The TAPs ftd makes for its replicas: a VM whose NIC names no TAP gets one per
//! replica, made before the replica starts, on the bridge of ftd's config, and removed
//! when the replica goes (and, after a crash of ftd, at its next start: [`remove_stale`]).
//!
//! A TAP is named after the replica, not the VM: `ftv` + 12 hex digits of a hash of the
//! VM's uid and the replica's number (interface names are at most 15 bytes), so that
//! two replicas of one VM on one host (a retiring backup beside its replacement) never
//! share one. The TAP is persistent (it outlives an ftvmm that dies, until ftd removes
//! it) and made with iproute2's `ip`, as an operator would.

use std::path::Path;
use std::process::Command;

/// The prefix of every TAP ftd makes (and the only ones it ever removes).
pub const PREFIX: &str = "ftv";

/// The bridge of a host's TAPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// Its interface name.
    pub name: String,
    /// The TAPs' MTU (`None`: the bridge's).
    pub mtu: Option<u32>,
}

/// FNV-1a of `bytes`: stable across builds and hosts (std's hasher is neither).
fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The TAP of replica `replica` of the VM life `uid`.
pub fn name(uid: &str, replica: u64) -> String {
    let hash = fnv(uid.bytes().chain([b'/']).chain(replica.to_le_bytes()));
    format!("{PREFIX}{:012x}", hash >> 16)
}

/// The TAP's own MAC address (not the guest's): `fe:` and five bytes of its name's hash.
/// A Linux bridge takes the lowest MAC of its ports as its own unless one was set; a
/// TAP with a random (possibly lower) MAC joining it would change the address of the
/// host's IP on the bridge under its neighbours' ARP caches, and cut the host off the
/// LAN until they expire. No MAC starting with fe is ever the lowest (libvirt does the
/// same).
pub fn host_side_mac(name: &str) -> String {
    let hash = fnv(name.bytes()).to_be_bytes();
    format!(
        "fe:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        hash[0], hash[1], hash[2], hash[3], hash[4]
    )
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run ip (package iproute2): {err}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Makes TAP `name` on `bridge` for a guest whose MAC is `guest_mac`, brings it up and
/// steers the guest's traffic from the bridge's uplinks to it ([`super::steer`]); one
/// left over (from a replica of the same number whose removal was missed) is made again.
pub fn create(name: &str, bridge: &Bridge, guest_mac: &str) -> Result<(), String> {
    if !exists(&bridge.name) {
        return Err(format!("the bridge {} does not exist", bridge.name));
    }
    if exists(name) {
        remove(name)?;
    }
    ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    let configured = ip(&["link", "set", "dev", name, "address", &host_side_mac(name)])
        .and_then(|()| ip(&["link", "set", "dev", name, "master", &bridge.name]))
        .and_then(|()| match bridge.mtu {
            Some(mtu) => ip(&["link", "set", "dev", name, "mtu", &mtu.to_string()]),
            None => Ok(()),
        });
    let up = configured.and_then(|()| ip(&["link", "set", "dev", name, "up"]));
    if let Err(err) = up {
        let _ = remove(name);
        return Err(err);
    }
    if let Err(err) = super::steer::steer(name, &bridge.name, guest_mac) {
        tracing::warn!(
            "TAP {name}: the guest's traffic is not steered to it ({err}); after a host failure, its clients wait for their next retransmission"
        );
    }
    Ok(())
}

/// Removes TAP `name` and the filters steering to it (nothing to do when it is gone).
pub fn remove(name: &str) -> Result<(), String> {
    if !exists(name) {
        return Ok(());
    }
    if let Err(err) = super::steer::unsteer(name) {
        tracing::warn!("TAP {name}: cannot remove the filters steering to it: {err}");
    }
    ip(&["link", "del", "dev", name])
}

/// Removes every TAP ftd made ([`PREFIX`], a TAP) that no replica in `in_use` needs:
/// those of replicas that ended while ftd was down. Returns the names removed.
pub fn remove_stale(in_use: &std::collections::BTreeSet<String>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.len() == PREFIX.len() + 12
            && name.starts_with(PREFIX)
            && name[PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
            // tun_flags exists only for TUN/TAP devices.
            && entry.path().join("tun_flags").exists();
        if ours && !in_use.contains(&name) {
            match remove(&name) {
                Ok(()) => removed.push(name),
                Err(err) => tracing::warn!("cannot remove the stale TAP {name}: {err}"),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_and_differ_per_replica_and_life() {
        let a = name("18f0-a", 1);
        assert_eq!(a.len(), 15);
        assert!(a.starts_with(PREFIX));
        assert_eq!(a, name("18f0-a", 1), "stable");
        assert_ne!(a, name("18f0-a", 2));
        assert_ne!(a, name("18f0-b", 1));
        let mac = host_side_mac(&a);
        assert!(mac.starts_with("fe:") && mac.len() == 17, "{mac}");
        assert_ne!(mac, host_side_mac(&name("18f0-a", 2)));
    }
}
