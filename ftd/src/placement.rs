//! Where replicas go. Pure functions: the leader passes the live hosts and their load.
//!
//! Rules: a host named in the spec is used if it is live (the first for the primary, the
//! second for the backup); otherwise the live host with the fewest replicas is picked
//! (ties by name). The backup never goes on the primary's host (anti-affinity).

use crate::model::HostName;
use std::collections::BTreeMap;

/// No host fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No ftd is registered at all.
    #[error("no live host")]
    NoLiveHost,
    /// The spec names a host whose ftd is not registered.
    #[error("host {0} is down")]
    HostDown(HostName),
    /// Every live host already runs the other replica.
    #[error("no live host other than {0}")]
    NoSecondHost(HostName),
}

/// Live hosts and how many replicas each is assigned.
pub type Load = BTreeMap<HostName, usize>;

fn least_loaded<'a>(load: &'a Load, except: Option<&HostName>) -> Option<&'a HostName> {
    load.iter()
        .filter(|(host, _)| Some(*host) != except)
        .min_by_key(|(host, count)| (**count, (*host).clone()))
        .map(|(host, _)| host)
}

/// The host for a primary.
pub fn place_primary(wanted: &[HostName], load: &Load) -> Result<HostName, PlacementError> {
    match wanted.first() {
        Some(host) if load.contains_key(host) => Ok(host.clone()),
        Some(host) => Err(PlacementError::HostDown(host.clone())),
        None => least_loaded(load, None)
            .cloned()
            .ok_or(PlacementError::NoLiveHost),
    }
}

/// The host for a backup, given the primary's host.
pub fn place_backup(
    wanted: &[HostName],
    load: &Load,
    primary: &HostName,
) -> Result<HostName, PlacementError> {
    match wanted.get(1) {
        Some(host) if host == primary => Err(PlacementError::NoSecondHost(primary.clone())),
        Some(host) if load.contains_key(host) => Ok(host.clone()),
        Some(host) => Err(PlacementError::HostDown(host.clone())),
        None => least_loaded(load, Some(primary))
            .cloned()
            .ok_or_else(|| PlacementError::NoSecondHost(primary.clone())),
    }
}

/// The host for a new backup of a running primary on `primary` (after a failover, or
/// when the last backup was lost): the first host the spec names that is live, not the
/// primary's and not `avoid`, else the least loaded such host; `avoid` (the host the last
/// failover came from: it may be failing, or its ftd may be dead while its lease runs
/// on) only when no other host is left. The spec's hosts are where the pair started, not
/// a limit: protection comes back on any host that can give it.
pub fn place_new_backup(
    wanted: &[HostName],
    load: &Load,
    primary: &HostName,
    avoid: Option<&HostName>,
) -> Result<HostName, PlacementError> {
    let preferred: Load = load
        .iter()
        .filter(|(host, _)| Some(*host) != avoid)
        .map(|(host, count)| (host.clone(), *count))
        .collect();
    for candidates in [&preferred, load] {
        let named = wanted
            .iter()
            .find(|host| *host != primary && candidates.contains_key(*host));
        if let Some(host) = named.or_else(|| least_loaded(candidates, Some(primary))) {
            return Ok(host.clone());
        }
    }
    Err(PlacementError::NoSecondHost(primary.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("valid host name")
    }

    fn load(entries: &[(&str, usize)]) -> Load {
        entries.iter().map(|(h, n)| (host(h), *n)).collect()
    }

    #[test]
    fn named_hosts_are_used_when_live() {
        let live = load(&[("a", 5), ("b", 5), ("c", 0)]);
        assert_eq!(place_primary(&[host("a"), host("b")], &live), Ok(host("a")));
        assert_eq!(
            place_backup(&[host("a"), host("b")], &live, &host("a")),
            Ok(host("b"))
        );
    }

    #[test]
    fn a_named_host_that_is_down_is_refused_not_replaced() {
        let live = load(&[("a", 0), ("c", 0)]);
        assert_eq!(
            place_primary(&[host("b")], &live),
            Err(PlacementError::HostDown(host("b")))
        );
        assert_eq!(
            place_backup(&[host("a"), host("b")], &live, &host("a")),
            Err(PlacementError::HostDown(host("b")))
        );
    }

    #[test]
    fn the_least_loaded_host_is_picked_when_none_is_named() {
        let live = load(&[("a", 2), ("b", 1), ("c", 1)]);
        assert_eq!(place_primary(&[], &live), Ok(host("b")));
        assert_eq!(place_backup(&[], &live, &host("b")), Ok(host("c")));
    }

    #[test]
    fn the_backup_never_shares_the_primary_host() {
        let live = load(&[("a", 0)]);
        assert_eq!(
            place_backup(&[], &live, &host("a")),
            Err(PlacementError::NoSecondHost(host("a")))
        );
        let live = load(&[("a", 0), ("b", 9)]);
        assert_eq!(place_backup(&[host("a")], &live, &host("a")), Ok(host("b")));
    }

    #[test]
    fn nothing_is_placed_without_live_hosts() {
        assert_eq!(
            place_primary(&[], &Load::new()),
            Err(PlacementError::NoLiveHost)
        );
    }

    #[test]
    fn a_new_backup_prefers_a_named_live_host_then_any_other() {
        let live = load(&[("a", 0), ("b", 1), ("c", 0)]);
        let named = [host("a"), host("b")];
        // After a restart-backup on b's primary: a, as the operator named it.
        assert_eq!(
            place_new_backup(&named, &live, &host("b"), None),
            Ok(host("a"))
        );
        // After a failover from a to b: not a while another host can take it.
        assert_eq!(
            place_new_backup(&named, &live, &host("b"), Some(&host("a"))),
            Ok(host("c"))
        );
        // With a down: any other live host.
        let without_a = load(&[("b", 1), ("c", 3)]);
        assert_eq!(
            place_new_backup(&named, &without_a, &host("b"), None),
            Ok(host("c"))
        );
        // The host to avoid when nothing else is left.
        let two = load(&[("a", 0), ("b", 1)]);
        assert_eq!(
            place_new_backup(&named, &two, &host("b"), Some(&host("a"))),
            Ok(host("a"))
        );
        assert_eq!(
            place_new_backup(&named, &load(&[("b", 1)]), &host("b"), None),
            Err(PlacementError::NoSecondHost(host("b")))
        );
    }
}
