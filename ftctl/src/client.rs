//! Reaching an ftd: connecting, retrying what an unreachable or leaderless control plane
//! refuses for a moment, and reading one VM.

use super::output::VmOut;
use super::CtlError;
use ftvm_proto::v1::ft_control_client::FtControlClient;
use ftvm_proto::v1::{GetVmRequest as PbGetVmRequest, ListVmsRequest as PbListVmsRequest};
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

/// A channel to the ftd at `endpoint` (`host:port`): under mutual TLS with the
/// credentials in `tls_dir`, or in plaintext when `insecure`.
pub(crate) async fn connect(
    endpoint: &str,
    tls_dir: Option<&Path>,
    insecure: bool,
) -> Result<Channel, CtlError> {
    let failed = |message: String| CtlError::Connect {
        endpoint: endpoint.to_owned(),
        message,
    };
    let address = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .unwrap_or(endpoint);
    let mut builder = match (tls_dir, insecure) {
        (Some(dir), _) => {
            let credentials = ftvm_tls::TlsFiles::in_dir(dir)
                .load()
                .map_err(|err| CtlError::Usage(format!("--tls-dir {}: {err}", dir.display())))?;
            Endpoint::from_shared(format!("https://{address}"))
                .map_err(|err| failed(err.to_string()))?
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
                        .identity(Identity::from_pem(
                            &credentials.cert_pem,
                            &credentials.key_pem,
                        ))
                        .domain_name(ftvm_tls::SERVER_NAME),
                )
                .map_err(|err| failed(err.to_string()))?
        }
        (None, true) => Endpoint::from_shared(format!("http://{address}"))
            .map_err(|err| failed(err.to_string()))?,
        (None, false) => {
            return Err(CtlError::Usage(
                "no credentials: give --tls-dir DIR (or FTCTL_TLS_DIR; see `ftctl certs`), or --insecure for an ftd without TLS".into(),
            ))
        }
    };
    builder = builder
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    let channel = builder.connect().await.map_err(|err| {
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !message.contains(&cause_text) {
                message = format!("{message}: {cause_text}");
            }
            source = cause.source();
        }
        failed(message)
    })?;
    Ok(channel)
}

/// Attempts [`retry`] makes before it gives up.
const ATTEMPTS: u32 = 10;
/// The longest wait between attempts, whatever the ftd suggests.
const LONGEST_WAIT: Duration = Duration::from_secs(2);

/// Calls that change state are retried while the ftd says the error passes by itself
/// (its status carries google.rpc.RetryInfo: leadership moving, no leader yet, etcd
/// briefly away, too busy), after the delay it suggests.
pub(crate) async fn retry<T, F, Fut>(mut call: F) -> Result<T, CtlError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempts = 1;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => match retry_delay(&status) {
                Some(delay) if attempts < ATTEMPTS => {
                    attempts += 1;
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(status.into()),
            },
        }
    }
}

/// The wait the ftd suggests before trying again, if the error passes by itself.
fn retry_delay(status: &tonic::Status) -> Option<Duration> {
    let info = status.get_details_retry_info()?;
    Some(info.retry_delay.unwrap_or(LONGEST_WAIT).min(LONGEST_WAIT))
}

/// Reads `name` every `every` until `reached` holds (returns that state) or `deadline`
/// passes (a timeout error: `what` it was waiting for, and the VM's protection then).
pub(crate) async fn wait_for_vm(
    client: &mut FtControlClient<Channel>,
    name: &str,
    deadline: std::time::Instant,
    every: Duration,
    what: &str,
    reached: impl Fn(&VmOut) -> bool,
) -> Result<VmOut, CtlError> {
    loop {
        let vm = get_vm(client, name).await?;
        if reached(&vm) {
            return Ok(vm);
        }
        if std::time::Instant::now() >= deadline {
            return Err(CtlError::Timeout(format!(
                "{what}: {}",
                vm.protection_text()
            )));
        }
        tokio::time::sleep(every).await;
    }
}

/// Every VM as the ftd answering sees it.
pub(crate) async fn list_vms(
    client: &mut FtControlClient<Channel>,
) -> Result<Vec<VmOut>, CtlError> {
    Ok(client
        .list_vms(PbListVmsRequest {})
        .await?
        .into_inner()
        .vms
        .into_iter()
        .map(VmOut::from_pb)
        .collect())
}

/// One VM as the ftd answering sees it.
pub(crate) async fn get_vm(
    client: &mut FtControlClient<Channel>,
    name: &str,
) -> Result<VmOut, CtlError> {
    let vm = client
        .get_vm(PbGetVmRequest {
            name: name.to_owned(),
        })
        .await?
        .into_inner()
        .vm
        .unwrap_or_default();
    Ok(VmOut::from_pb(vm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::ErrorDetails;

    #[test]
    fn only_statuses_with_retry_info_are_retried_within_a_bound() {
        let moving = tonic::Status::with_error_details(
            Code::Unavailable,
            "leadership is moving",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(500))),
        );
        assert_eq!(retry_delay(&moving), Some(Duration::from_millis(500)));
        let slow = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "busy",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(60))),
        );
        assert_eq!(retry_delay(&slow), Some(LONGEST_WAIT));
        // The same words without the detail are not a reason to retry.
        let plain = tonic::Status::unavailable("leadership is moving; no leader");
        assert_eq!(retry_delay(&plain), None);
    }

    #[tokio::test]
    async fn a_call_is_retried_until_it_succeeds_or_the_attempts_run_out() {
        let mut calls = 0;
        let answer = retry(|| {
            calls += 1;
            let call = calls;
            async move {
                if call < 3 {
                    Err(tonic::Status::with_error_details(
                        Code::Unavailable,
                        "no leader",
                        ErrorDetails::with_retry_info(Some(Duration::from_millis(1))),
                    ))
                } else {
                    Ok(tonic::Response::new(call))
                }
            }
        })
        .await;
        assert_eq!(answer.ok(), Some(3));
        let mut calls = 0;
        let answer: Result<(), CtlError> = retry(|| {
            calls += 1;
            async {
                Err(tonic::Status::with_error_details(
                    Code::Unavailable,
                    "no leader",
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(1))),
                ))
            }
        })
        .await;
        assert!(answer.is_err());
        assert_eq!(calls, ATTEMPTS);
    }
}
