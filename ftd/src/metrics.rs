//! Every metric ftd exports, declared in one place (prefix `ftd_`, units in the name),
//! and the recorder that renders them. The daemon serves them at `/metrics`, followed by
//! the `ftvmm_` metrics of this host's replicas.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `ftd_hosts` | gauge | live hosts (registered ftds), as this ftd last saw them |
//! | `ftd_is_leader` | gauge | 1 on the leader, 0 elsewhere |
//! | `ftd_vms{protection}` | gauge | VMs by `protected`, `not_protected`, `down` (set by the leader; 0 elsewhere) |
//! | `ftd_vm_protected{vm}` | gauge | 1 when the VM is Protected, else 0 (leader only) |
//! | `ftd_failovers_total{vm}` | counter | failovers of the VM's life, kept in etcd so a new leader goes on counting (leader only) |
//! | `ftd_replicas_running` | gauge | ftvmm processes running on this host |
//! | `ftd_replica_starts_total{vm,role}` | counter | ftvmm starts this ftd attempted (failed ones too) |
//! | `ftd_reconcile_duration_seconds` | histogram | time of one leader reconcile pass |
//! | `ftd_events_total{kind}` | counter | events this ftd recorded |
//! | `ftd_etcd_errors_total{call}` | counter | store calls that failed for want of etcd (connection or etcd error) |
//! | `ftd_grpc_requests_total{method,code}` | counter | gRPC requests served, by method and status code name |
//! | `ftd_grpc_request_duration_seconds{method}` | histogram | time to answer a gRPC request |
//! | `ftd_build_info{version}` | gauge | always 1: the ftd version as a label |
//!
//! The per-VM series come from the leader's last reconcile pass and are rendered here
//! rather than by the recorder: a deleted VM's series go with it, and a follower
//! exports none (Prometheus sees one series per VM in the cluster, at the leader).

use crate::model::Protection;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// `ftd_hosts`.
pub const HOSTS: &str = "ftd_hosts";
/// `ftd_is_leader`.
pub const IS_LEADER: &str = "ftd_is_leader";
/// `ftd_vms{protection}`.
pub const VMS: &str = "ftd_vms";
/// `ftd_vm_protected{vm}`.
pub const VM_PROTECTED: &str = "ftd_vm_protected";
/// `ftd_failovers_total{vm}`.
pub const FAILOVERS_TOTAL: &str = "ftd_failovers_total";
/// `ftd_replicas_running`.
pub const REPLICAS_RUNNING: &str = "ftd_replicas_running";
/// `ftd_replica_starts_total{vm,role}`.
pub const REPLICA_STARTS_TOTAL: &str = "ftd_replica_starts_total";
/// `ftd_etcd_errors_total{call}`.
pub const ETCD_ERRORS_TOTAL: &str = "ftd_etcd_errors_total";
/// `ftd_grpc_requests_total{method,code}`.
pub const GRPC_REQUESTS_TOTAL: &str = "ftd_grpc_requests_total";
/// `ftd_grpc_request_duration_seconds{method}`.
pub const GRPC_REQUEST_DURATION_SECONDS: &str = "ftd_grpc_request_duration_seconds";
/// `ftd_build_info{version}`.
pub const BUILD_INFO: &str = "ftd_build_info";

/// The `call` label values of `ftd_etcd_errors_total`: the store's calls.
pub const ETCD_CALLS: [&str; 12] = [
    "get",
    "put",
    "create",
    "put_if_unchanged",
    "delete",
    "delete_prefix",
    "list_prefix",
    "watch_prefix",
    "grant_lease",
    "keep_alive",
    "revoke_lease",
    "commit",
];
/// `ftd_reconcile_duration_seconds`.
pub const RECONCILE_DURATION_SECONDS: &str = "ftd_reconcile_duration_seconds";
/// `ftd_events_total{kind}`.
pub const EVENTS_TOTAL: &str = "ftd_events_total";

/// Installs the global recorder; its handle renders it. Every metric is described and set
/// to its initial value so that a scrape shows all of them from the start.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?
        // Most answers take a few ms; a forwarded or waiting call up to the deadline.
        .set_buckets_for_metric(
            Matcher::Full(GRPC_REQUEST_DURATION_SECONDS.to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
            ],
        )?
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
    describe_gauge!(
        REPLICAS_RUNNING,
        Unit::Count,
        "ftvmm processes running on this host"
    );
    describe_counter!(
        REPLICA_STARTS_TOTAL,
        Unit::Count,
        "ftvmm starts this ftd attempted"
    );
    describe_counter!(
        ETCD_ERRORS_TOTAL,
        Unit::Count,
        "Store calls that failed for want of etcd"
    );
    describe_counter!(
        GRPC_REQUESTS_TOTAL,
        Unit::Count,
        "gRPC requests served, by method and status code"
    );
    describe_histogram!(
        GRPC_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to answer a gRPC request"
    );
    describe_gauge!(BUILD_INFO, "Always 1; the ftd version is a label");
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
    gauge!(REPLICAS_RUNNING).set(0.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Present from the first scrape, so that increase() sees the first error.
    for call in ETCD_CALLS {
        counter!(ETCD_ERRORS_TOTAL, "call" => call).absolute(0);
    }
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

/// What the leader last decided about one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmGauges {
    /// Protected.
    pub protected: bool,
    /// Failovers of the VM's life (`VmStatus::failovers`).
    pub failovers: u64,
}

/// The leader's last view, by VM name (empty on a follower).
static VM_VIEW: Mutex<BTreeMap<String, VmGauges>> = Mutex::new(BTreeMap::new());

fn vm_view() -> std::sync::MutexGuard<'static, BTreeMap<String, VmGauges>> {
    VM_VIEW
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Replaces the per-VM series with those of the leader's latest pass.
pub fn set_vm_view(view: BTreeMap<String, VmGauges>) {
    *vm_view() = view;
}

/// Drops the per-VM series (this ftd no longer leads).
pub fn clear_vm_view() {
    vm_view().clear();
}

/// `ftd_vm_protected{vm}` and `ftd_failovers_total{vm}` in the Prometheus text format,
/// for `/metrics` after the recorder's text.
pub fn render_vm_view() -> String {
    let view = vm_view();
    let mut text = String::new();
    if view.is_empty() {
        return text;
    }
    let mut family = |name: &str, kind: &str, help: &str, value: fn(&VmGauges) -> u64| {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} {kind}");
        for (vm, gauges) in view.iter() {
            let _ = writeln!(
                text,
                "{name}{{vm=\"{}\"}} {}",
                escape_label(vm),
                value(gauges)
            );
        }
    };
    family(
        VM_PROTECTED,
        "gauge",
        "1 when the VM is Protected, else 0 (set by the leader)",
        |gauges| u64::from(gauges.protected),
    );
    family(
        FAILOVERS_TOTAL,
        "counter",
        "Failovers of the VM's life (kept in etcd, set by the leader)",
        |gauges| gauges.failovers,
    );
    text
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Increments `ftd_replica_starts_total{vm,role}`.
pub fn replica_started(vm: &str, role: &str) {
    counter!(REPLICA_STARTS_TOTAL, "vm" => vm.to_owned(), "role" => role.to_owned()).increment(1);
}

/// Increments `ftd_etcd_errors_total{call}`.
pub fn etcd_error(call: &'static str) {
    counter!(ETCD_ERRORS_TOTAL, "call" => call).increment(1);
}

/// Records one gRPC request: `ftd_grpc_requests_total{method,code}` and
/// `ftd_grpc_request_duration_seconds{method}`.
pub fn grpc_request(method: &str, code: String, seconds: f64) {
    counter!(GRPC_REQUESTS_TOTAL, "method" => method.to_owned(), "code" => code).increment(1);
    histogram!(GRPC_REQUEST_DURATION_SECONDS, "method" => method.to_owned()).record(seconds);
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
