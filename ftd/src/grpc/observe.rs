//! The tower layers in front of ftd's gRPC services: [`ObserveLayer`] counts and times
//! every request (`ftd_grpc_requests_total{method,code}`,
//! `ftd_grpc_request_duration_seconds{method}`) and logs it at debug level; the server
//! (`daemon`) stacks it over a load shedder, a global concurrency limit and a per-call
//! timeout.
//!
//! With TLS on, [`ObserveLayer`] also authorizes: the caller's role comes from its client
//! certificate (verified by the TLS layer against the cluster CA) and each method needs
//! one ([`required_role`]); a call without it is answered PERMISSION_DENIED before any
//! handler runs.
//!
//! A request refused by a layer below (overloaded, timed out) is turned into its gRPC
//! status here (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), so that it is counted with its
//! code like any handler's error.

use crate::metrics;
use ftvm_tls::{Identity, Role};
use hyper::http;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::layer::util::{Identity as NoLayer, Stack};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;
use tower::{BoxError, Layer, Service, ServiceBuilder};

/// The wait an overloaded ftd suggests to its clients.
const OVERLOADED_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The layers of [`layers`], outermost first.
pub type Layers = ServiceBuilder<
    Stack<
        TimeoutLayer,
        Stack<GlobalConcurrencyLimitLayer, Stack<LoadShedLayer, Stack<ObserveLayer, NoLayer>>>,
    >,
>;

/// Who may call what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everyone may call everything (no TLS: `insecure = true`).
    Open,
    /// Each method needs a role ([`required_role`]) from the caller's certificate.
    ByRole,
}

/// The role a method needs. Reading is for viewers, changing for operators, the agent
/// service (one ftd asking another to stop or sample a replica) for hosts; a method this
/// table does not know needs an operator.
pub fn required_role(path: &str) -> Role {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("ft.v1.FtAgent", _) => Role::Host,
        ("grpc.health.v1.Health", _) => Role::Viewer,
        ("ft.v1.FtControl", "ListVms" | "GetVm" | "ListHosts" | "WatchEvents") => Role::Viewer,
        _ => Role::Operator,
    }
}

/// Who made a request: the identity in its verified client certificate.
fn caller(request: &http::Request<Body>) -> Result<Identity, Status> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs);
    ftvm_tls::peer_identity(certs.as_deref().map(Vec::as_slice))
        .map_err(|err| Status::unauthenticated(format!("no usable client certificate: {err}")))
}

/// Whether the request may go on: `Ok(caller)` (none when access is open).
fn authorize(access: Access, request: &http::Request<Body>) -> Result<Option<Identity>, Status> {
    if access == Access::Open {
        return Ok(None);
    }
    let identity = caller(request)?;
    let needed = required_role(request.uri().path());
    if identity.role < needed {
        return Err(Status::permission_denied(format!(
            "{identity} may not call {}: it needs a {needed} certificate",
            request.uri().path().trim_start_matches('/')
        )));
    }
    Ok(Some(identity))
}

/// What the server allows a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest a call may take before it is answered DEADLINE_EXCEEDED (a client's
    /// shorter `grpc-timeout` wins).
    pub timeout: std::time::Duration,
    /// Calls served at once, over all connections; more are refused at once with
    /// RESOURCE_EXHAUSTED rather than queued (a stream counts until its first answer).
    pub concurrency: usize,
}

impl Limits {
    /// ftd's: 45 s (above the 30 s a forwarded call may wait for the leader), 64 calls.
    pub const SERVER: Limits = Limits {
        timeout: std::time::Duration::from_secs(45),
        concurrency: 64,
    };
}

/// Everything in front of ftd's gRPC services, outermost first: [`ObserveLayer`] (counts,
/// times, turns refusals into statuses), a load shedder (a call beyond the limit is
/// refused at once rather than queued), the limit of calls at once over all connections,
/// and the deadline per call.
pub fn layers(limits: Limits, access: Access) -> Layers {
    ServiceBuilder::new()
        .layer(ObserveLayer { limits, access })
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(limits.concurrency))
        .layer(TimeoutLayer::new(limits.timeout))
}

/// Adds [`Observe`] around a service.
#[derive(Debug, Clone, Copy)]
pub struct ObserveLayer {
    /// The limits of the layers below, for the refusals' messages.
    limits: Limits,
    /// Who may call what.
    access: Access,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            limits: self.limits,
            access: self.access,
            not_ready: None,
        }
    }
}

/// Counts, times and logs each request to `inner`; errors become gRPC statuses.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    limits: Limits,
    access: Access,
    /// `inner` failed to become ready: the next call is answered with this status.
    not_ready: Option<Status>,
}

/// The gRPC status for an error of the layers below (or of a handler's service).
fn status_of(err: BoxError, limits: Limits) -> Status {
    if err.is::<tower::timeout::error::Elapsed>() {
        return Status::deadline_exceeded(format!(
            "ftd did not answer within {:.1} s",
            limits.timeout.as_secs_f64()
        ));
    }
    if err.is::<tower::load_shed::error::Overloaded>() {
        return Status::with_error_details(
            Code::ResourceExhausted,
            format!(
                "ftd is busy: more than {} requests at once; try again",
                limits.concurrency
            ),
            ErrorDetails::with_retry_info(Some(OVERLOADED_RETRY_DELAY)),
        );
    }
    Status::from_error(err)
}

/// The request path's method part ("FtControl/CreateVm") for labels: paths of methods
/// that do not exist are all "unknown", so a client cannot make new series at will.
fn method_label(path: &str, code: Code) -> String {
    if code == Code::Unimplemented {
        return "unknown".to_owned();
    }
    let path = path.trim_start_matches('/');
    // "ft.v1.FtControl/CreateVm" -> "FtControl/CreateVm"
    match path.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        }
        None => "unknown".to_owned(),
    }
}

/// The gRPC status code of a response: in its headers when the answer is an error
/// ("trailers-only"), else OK (a success's status travels in the trailers).
fn response_code(response: &http::Response<Body>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// A `Code`'s name as gRPC spells it in CamelCase ("NotFound").
fn code_label(code: Code) -> String {
    format!("{code:?}")
}

impl<S> Service<http::Request<Body>> for Observe<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A service that cannot become ready is not called: the next request gets its
        // error as a status instead.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => {
                self.not_ready = Some(status_of(err.into(), self.limits));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let limits = self.limits;
        let answer = match (self.not_ready.take(), authorize(self.access, &request)) {
            (Some(status), _) | (None, Err(status)) => Err(status),
            (None, Ok(caller)) => {
                if let Some(caller) = caller.filter(|_| required_role(&path) >= Role::Operator) {
                    // Changes are logged with who asked, for the record.
                    tracing::info!(caller = %caller, method = %path, "gRPC call");
                }
                Ok(self.inner.call(request))
            }
        };
        Box::pin(async move {
            let response = match answer {
                Ok(answer) => match answer.await {
                    Ok(response) => response,
                    Err(err) => status_of(err.into(), limits).into_http(),
                },
                Err(status) => status.into_http(),
            };
            let code = response_code(&response);
            let method = method_label(&path, code);
            let seconds = started.elapsed().as_secs_f64();
            metrics::grpc_request(&method, code_label(code), seconds);
            tracing::debug!(%method, code = ?code, ms = seconds * 1e3, "gRPC request");
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_read_operators_change_and_only_hosts_use_the_agent() {
        for (path, role) in [
            ("/ft.v1.FtControl/ListVms", Role::Viewer),
            ("/ft.v1.FtControl/GetVm", Role::Viewer),
            ("/ft.v1.FtControl/ListHosts", Role::Viewer),
            ("/ft.v1.FtControl/WatchEvents", Role::Viewer),
            ("/grpc.health.v1.Health/Check", Role::Viewer),
            ("/ft.v1.FtControl/CreateVm", Role::Operator),
            ("/ft.v1.FtControl/DeleteVm", Role::Operator),
            ("/ft.v1.FtControl/TestFailover", Role::Operator),
            ("/ft.v1.FtControl/RestartBackup", Role::Operator),
            ("/ft.v1.FtControl/Switchover", Role::Operator),
            ("/ft.v1.FtControl/SetHostDrain", Role::Operator),
            ("/ft.v1.FtControl/UploadImage", Role::Operator),
            ("/ft.v1.FtAgent/StopReplica", Role::Host),
            ("/ft.v1.FtAgent/ReplicaStats", Role::Host),
            // Unknown methods (and services) need at least an operator.
            ("/ft.v1.FtControl/SomethingNew", Role::Operator),
            ("/other.Service/ListVms", Role::Operator),
            ("garbage", Role::Operator),
        ] {
            assert_eq!(required_role(path), role, "{path}");
        }
    }

    #[tokio::test]
    async fn without_a_client_certificate_nothing_passes_when_access_is_by_role() {
        use tower::ServiceExt;
        let request = || {
            http::Request::builder()
                .uri("/ft.v1.FtControl/ListVms")
                .body(Body::default())
                .expect("a request")
        };
        let service =
            layers(Limits::SERVER, Access::ByRole).service(slow(std::time::Duration::ZERO));
        let answer = service.oneshot(request()).await.expect("an answer");
        assert_eq!(response_code(&answer), Code::Unauthenticated);
        let service = layers(Limits::SERVER, Access::Open).service(slow(std::time::Duration::ZERO));
        let answer = service.oneshot(request()).await.expect("an answer");
        assert_eq!(response_code(&answer), Code::Ok);
    }

    #[test]
    fn methods_are_labelled_by_service_and_name_and_unknown_ones_alike() {
        assert_eq!(
            method_label("/ft.v1.FtControl/CreateVm", Code::Ok),
            "FtControl/CreateVm"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check", Code::NotFound),
            "Health/Check"
        );
        assert_eq!(
            method_label("/ft.v1.FtControl/NoSuchCall", Code::Unimplemented),
            "unknown"
        );
        assert_eq!(method_label("/nonsense", Code::Ok), "unknown");
    }

    #[test]
    fn a_code_in_the_headers_is_the_answer_else_ok() {
        let ok = http::Response::new(Body::default());
        assert_eq!(response_code(&ok), Code::Ok);
        let refused = Status::resource_exhausted("busy").into_http::<Body>();
        assert_eq!(response_code(&refused), Code::ResourceExhausted);
        assert_eq!(code_label(Code::ResourceExhausted), "ResourceExhausted");
    }

    /// A service that answers OK after `delay`.
    fn slow(
        delay: std::time::Duration,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Future<Output = Result<http::Response<Body>, std::convert::Infallible>> + Send,
    > + Clone
           + Send
           + 'static {
        tower::service_fn(move |_request: http::Request<Body>| async move {
            tokio::time::sleep(delay).await;
            Ok(http::Response::new(Body::default()))
        })
    }

    #[tokio::test]
    async fn calls_beyond_the_limit_are_refused_at_once_and_slow_ones_time_out() {
        use tower::ServiceExt;
        let request = || {
            http::Request::builder()
                .uri("/ft.v1.FtControl/GetVm")
                .body(Body::default())
                .expect("a request")
        };
        // Two at once allowed: of three concurrent calls, one is refused.
        let service = layers(
            Limits {
                timeout: std::time::Duration::from_secs(5),
                concurrency: 2,
            },
            Access::Open,
        )
        .service(slow(std::time::Duration::from_millis(300)));
        let started = std::time::Instant::now();
        let calls = (0..3).map(|_| service.clone().oneshot(request()));
        let mut codes: Vec<Code> = futures_codes(calls).await;
        codes.sort_by_key(|code| *code as i32);
        assert_eq!(codes, [Code::Ok, Code::Ok, Code::ResourceExhausted]);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // A call slower than the deadline is answered DEADLINE_EXCEEDED.
        let service = layers(
            Limits {
                timeout: std::time::Duration::from_millis(50),
                concurrency: 2,
            },
            Access::Open,
        )
        .service(slow(std::time::Duration::from_secs(5)));
        let answer = service.oneshot(request()).await.expect("an answer");
        assert_eq!(response_code(&answer), Code::DeadlineExceeded);
    }

    /// Runs `calls` concurrently; their gRPC codes.
    async fn futures_codes<F>(calls: impl Iterator<Item = F>) -> Vec<Code>
    where
        F: Future<Output = Result<http::Response<Body>, std::convert::Infallible>> + Send + 'static,
    {
        let handles: Vec<_> = calls.map(tokio::spawn).collect();
        let mut codes = Vec::new();
        for handle in handles {
            let answer = handle.await.expect("joined").expect("infallible");
            codes.push(response_code(&answer));
        }
        codes
    }

    #[test]
    fn refusals_of_the_layers_below_get_their_own_codes() {
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(
            status_of(elapsed, Limits::SERVER).code(),
            Code::DeadlineExceeded
        );
        let overloaded: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        let status = status_of(overloaded, Limits::SERVER);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("busy"), "{status:?}");
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(OVERLOADED_RETRY_DELAY));
    }
}
