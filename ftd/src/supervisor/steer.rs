//! Steering a guest's traffic from the bridge's uplinks straight to its replica's TAP (a
//! `tc` filter on each uplink's ingress: frames for the guest's MAC are redirected to the
//! TAP), made with the TAP and removed before it.
//!
//! Why: a backup's host has learned the guest's MAC on its uplink (the primary's guest
//! broadcasts now and then), and its bridge drops a frame for the guest arriving there,
//! as it would go back out where it came from. When the primary's host dies, the switch
//! floods the guest's traffic to every port (the port it had learned went down): a
//! client's retransmissions then reach the backup's host, and with this filter its
//! standby TAP too, where the backup keeps them to hand to its guest when it goes live
//! (instead of the client retransmitting again 200 ms to seconds later, doubling). For a
//! live replica the filter sends to the TAP what the bridge would have sent there.
//!
//! Only a bridge without VLAN filtering is steered (on a VLAN-aware bridge the frames
//! would reach the guest still tagged). Failing to steer costs failover time, not
//! service: it is logged, and the TAP is used all the same.

use std::path::Path;
use std::process::Command;

/// The `tc` filter priorities ftd uses (one per steered TAP and uplink).
const FIRST_PREF: u32 = 40_000;
const PREFS: u32 = 20_000;

fn tc(args: &[&str]) -> Result<String, String> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run tc (package iproute2): {err}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut bytes = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut bytes {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(bytes)
}

/// The ports of `bridge` that lead off the host: every port that is not a TUN/TAP device.
fn uplinks(bridge: &str) -> Vec<String> {
    let Ok(ports) = std::fs::read_dir(Path::new("/sys/class/net").join(bridge).join("brif")) else {
        return Vec::new();
    };
    let mut uplinks: Vec<String> = ports
        .flatten()
        .map(|port| port.file_name().to_string_lossy().into_owned())
        // tun_flags exists only for TUN/TAP devices.
        .filter(|port| {
            !Path::new("/sys/class/net")
                .join(port)
                .join("tun_flags")
                .exists()
        })
        .collect();
    uplinks.sort();
    uplinks
}

/// Whether `bridge` filters VLANs.
fn vlan_aware(bridge: &str) -> bool {
    std::fs::read_to_string(
        Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge/vlan_filtering"),
    )
    .is_ok_and(|value| value.trim() != "0")
}

/// The `tc filter add` arguments after the device, direction and priority: the filter
/// matching frames for `mac`, redirected to `tap`.
pub fn filter_args(mac: [u8; 6], tap: &str) -> Vec<String> {
    // u32 matches at offsets from the network header: the destination MAC starts 14
    // bytes before it.
    let high = format!("0x{:02x}{:02x}", mac[0], mac[1]);
    let low = format!("0x{:02x}{:02x}{:02x}{:02x}", mac[2], mac[3], mac[4], mac[5]);
    [
        "protocol",
        "all",
        "u32",
        "match",
        "u16",
        &high,
        "0xffff",
        "at",
        "-14",
        "match",
        "u32",
        &low,
        "0xffffffff",
        "at",
        "-12",
        "action",
        "mirred",
        "egress",
        "redirect",
        "dev",
        tap,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The filters on `uplink`'s ingress, as (priority, the device they redirect to).
fn filters(uplink: &str) -> Vec<(u32, String)> {
    tc(&["filter", "show", "dev", uplink, "ingress"])
        .map(|shown| redirects_in(&shown))
        .unwrap_or_default()
}

/// The redirecting filters `tc filter show` printed in `shown`, as (priority, the
/// device they redirect to).
pub fn redirects_in(shown: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let mut pref = None;
    for line in shown.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"filter") {
            pref = words
                .iter()
                .position(|word| *word == "pref")
                .and_then(|at| words.get(at + 1))
                .and_then(|value| value.parse::<u32>().ok());
        }
        // "action order 1: mirred (Egress Redirect to device TAP) stolen"
        if let (Some(pref), Some(at)) = (pref, line.find("Redirect to device ")) {
            let device = line[at + "Redirect to device ".len()..]
                .split(')')
                .next()
                .unwrap_or_default();
            found.push((pref, device.to_owned()));
        }
    }
    found
}

/// Makes the uplinks of `bridge` send frames for `mac` straight to `tap` (see the module).
pub fn steer(tap: &str, bridge: &str, mac: &str) -> Result<(), String> {
    let mac = parse_mac(mac).ok_or_else(|| format!("'{mac}' is not a MAC address"))?;
    if vlan_aware(bridge) {
        return Err(format!(
            "the bridge {bridge} filters VLANs; its uplinks are not steered"
        ));
    }
    for uplink in uplinks(bridge) {
        let qdiscs = tc(&["qdisc", "show", "dev", &uplink])?;
        if !qdiscs.contains("qdisc clsact") {
            tc(&["qdisc", "add", "dev", &uplink, "clsact"])?;
        }
        let taken: Vec<u32> = filters(&uplink).into_iter().map(|(pref, _)| pref).collect();
        // A priority from the TAP's name, the next free one if taken.
        let start = tap.bytes().fold(0u32, |hash, byte| {
            hash.wrapping_mul(31).wrapping_add(u32::from(byte))
        }) % PREFS;
        let pref = (0..PREFS)
            .map(|step| FIRST_PREF + (start + step) % PREFS)
            .find(|pref| !taken.contains(pref))
            .ok_or_else(|| format!("no free tc priority on {uplink}"))?
            .to_string();
        let mut args: Vec<String> = ["filter", "add", "dev", &uplink, "ingress", "pref", &pref]
            .map(str::to_owned)
            .to_vec();
        args.extend(filter_args(mac, tap));
        tc(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// Removes the filters that redirect to `tap` from the uplinks of the bridge it is on.
/// Done before the TAP goes: a filter whose device is gone drops what it matches.
pub fn unsteer(tap: &str) -> Result<(), String> {
    let master = Path::new("/sys/class/net").join(tap).join("master");
    let Some(bridge) = std::fs::read_link(master)
        .ok()
        .and_then(|target| Some(target.file_name()?.to_string_lossy().into_owned()))
    else {
        return Ok(());
    };
    for uplink in uplinks(&bridge) {
        for (pref, _) in filters(&uplink)
            .into_iter()
            .filter(|(_, device)| device == tap)
        {
            let pref = pref.to_string();
            tc(&["filter", "del", "dev", &uplink, "ingress", "pref", &pref])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_filter_matches_the_whole_mac_and_redirects_to_the_tap() {
        let args = filter_args([0x52, 0x54, 0, 0x12, 0x34, 0x56], "ftv0123");
        let joined = args.join(" ");
        assert!(
            joined.contains("match u16 0x5254 0xffff at -14"),
            "{joined}"
        );
        assert!(
            joined.contains("match u32 0x00123456 0xffffffff at -12"),
            "{joined}"
        );
        assert!(
            joined.ends_with("mirred egress redirect dev ftv0123"),
            "{joined}"
        );
    }
}
