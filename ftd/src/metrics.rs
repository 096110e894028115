//! Every metric ftd exports, declared in one place (prefix `ftd_`, units in the name),
//! and the recorder that renders them. The daemon serves them at `/metrics`, followed by
//! the `ftvmm_` metrics of this host's replicas.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `ftd_hosts` | gauge | live hosts (registered ftds), as this ftd last saw them |
//! | `ftd_is_leader` | gauge | 1 on the leader, 0 elsewhere |
//! | `ftd_vms{protection}` | gauge | VMs by `protected`, `not_protected`, `down` (set by the leader; 0 elsewhere) |
//! | `ftd_failovers_total` | counter | failovers recorded by this ftd while leader |
//! | `ftd_replicas_running` | gauge | ftvmm processes running on this host |
//! | `ftd_reconcile_duration_seconds` | histogram | time of one leader reconcile pass |
//! | `ftd_events_total{kind}` | counter | events this ftd recorded |

use crate::model::Protection;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// `ftd_hosts`.
pub const HOSTS: &str = "ftd_hosts";
/// `ftd_is_leader`.
pub const IS_LEADER: &str = "ftd_is_leader";
/// `ftd_vms{protection}`.
pub const VMS: &str = "ftd_vms";
/// `ftd_failovers_total`.
pub const FAILOVERS_TOTAL: &str = "ftd_failovers_total";
/// `ftd_replicas_running`.
pub const REPLICAS_RUNNING: &str = "ftd_replicas_running";
/// `ftd_reconcile_duration_seconds`.
pub const RECONCILE_DURATION_SECONDS: &str = "ftd_reconcile_duration_seconds";
/// `ftd_events_total{kind}`.
pub const EVENTS_TOTAL: &str = "ftd_events_total";

/// Installs the global recorder; its handle renders it. Every metric is described and set
/// to its initial value so that a scrape shows all of them from the start.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(HOSTS, Unit::Count, "Live hosts (registered ftds)");
    describe_gauge!(IS_LEADER, "1 if this ftd is the elected leader");
    describe_gauge!(
        VMS,
        Unit::Count,
        "VMs by protection state (set by the leader)"
    );
    describe_counter!(
        FAILOVERS_TOTAL,
        Unit::Count,
        "Failovers recorded by this ftd as leader"
    );
    describe_gauge!(
        REPLICAS_RUNNING,
        Unit::Count,
        "ftvmm processes running on this host"
    );
    describe_histogram!(
        RECONCILE_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one reconcile pass"
    );
    describe_counter!(EVENTS_TOTAL, Unit::Count, "Events recorded by this ftd");
    gauge!(HOSTS).set(0.0);
    gauge!(IS_LEADER).set(0.0);
    for protection in Protection::ALL {
        gauge!(VMS, "protection" => protection.as_str()).set(0.0);
    }
    counter!(FAILOVERS_TOTAL).absolute(0);
    gauge!(REPLICAS_RUNNING).set(0.0);
}

/// Sets `ftd_hosts`.
pub fn set_hosts(count: usize) {
    gauge!(HOSTS).set(count as f64);
}

/// Sets `ftd_is_leader`.
pub fn set_leader(leader: bool) {
    gauge!(IS_LEADER).set(if leader { 1.0 } else { 0.0 });
}

/// Sets `ftd_vms{protection}` from counts per state.
pub fn set_vms(counts: &[(Protection, usize)]) {
    for (protection, count) in counts {
        gauge!(VMS, "protection" => protection.as_str()).set(*count as f64);
    }
}

/// Increments `ftd_failovers_total`.
pub fn failover() {
    counter!(FAILOVERS_TOTAL).increment(1);
}

/// Sets `ftd_replicas_running`.
pub fn set_replicas_running(count: usize) {
    gauge!(REPLICAS_RUNNING).set(count as f64);
}

/// Records one reconcile pass.
pub fn reconcile_duration(seconds: f64) {
    histogram!(RECONCILE_DURATION_SECONDS).record(seconds);
}

/// Increments `ftd_events_total{kind}`.
pub fn event(kind: &str) {
    counter!(EVENTS_TOTAL, "kind" => kind.to_owned()).increment(1);
}
