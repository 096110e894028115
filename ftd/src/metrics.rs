//! Every metric ftd exports, declared in one place (prefix `ftd_`, units in the name),
//! and the Prometheus exporter that serves them at `/metrics`.
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
//!
//!
//! After these, `/metrics` carries the `ftvmm_` metrics of docs/contract.md of every
//! replica running on this host, with `vm` and `replica` (primary or backup) labels added: they are asked of
//! each ftvmm's control socket when `/metrics` is scraped, each within
//! [`crate::supervisor::CONTROL_TIMEOUT`] (a replica that does not answer is left out), so
//! Prometheus scrapes only the ftds.

use crate::model::Protection;
use crate::supervisor::Supervisor;
use http_body_util::Full;
use hyper::body::Bytes;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;
use std::time::Duration;

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

/// Installs the global recorder; [`serve`] renders it. Every metric is described and set
/// to its initial value so that a scrape shows all of them from the start.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Serves `GET /metrics` on `listener` (HTTP/1.1): ftd's own metrics, then the `ftvmm_`
/// metrics of this host's replicas. Runs until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    supervisor: Arc<Supervisor>,
) {
    // Without the exporter's own listener, its upkeep (histogram maintenance) is ours.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "/metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handle, supervisor) = (handle.clone(), supervisor.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (handle, supervisor) = (handle.clone(), supervisor.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(respond(&request, &handle, &supervisor).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A client that holds the connection open is dropped after a while.
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        });
    }
}

async fn respond<B>(
    request: &hyper::Request<B>,
    handle: &PrometheusHandle,
    supervisor: &Supervisor,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, content_type: &str, body: String| {
        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(404, "text/plain", "not found: try /metrics\n".into());
    }
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return reply(405, "text/plain", "only GET\n".into());
    }
    let mut body = handle.render();
    body.push_str(&supervisor.replica_metrics().await);
    reply(200, "text/plain; version=0.0.4", body)
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
