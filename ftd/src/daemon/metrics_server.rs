//! `/metrics` over HTTP/1.1 (hyper, which tonic already builds): ftd's own metrics as
//! the recorder renders them, then the `ftvmm_` metrics (docs/contract.md) of every
//! replica running on this host with `vm` and `replica` (primary or backup) labels added.
//! Those are asked of each ftvmm's control socket when `/metrics` is scraped, each within
//! [`CONTROL_TIMEOUT`](crate::supervisor::CONTROL_TIMEOUT) (a replica that does not
//! answer is left out), so Prometheus scrapes only the ftds.

use crate::supervisor::Supervisor;
use http_body_util::Full;
use hyper::body::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;

/// Serves `GET /metrics` on `listener` (HTTP/1.1): ftd's own metrics, then the `ftvmm_`
/// metrics of this host's replicas. Runs until the task is dropped.
pub(super) async fn serve(
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
    body.push_str(&crate::metrics::render_vm_view());
    body.push_str(&supervisor.replica_metrics().await);
    reply(200, "text/plain; version=0.0.4", body)
}
