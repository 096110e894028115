//! Reaching an ftd: connecting, retrying what an unreachable or leaderless control plane
//! refuses for a moment, and reading one VM.

use super::output::VmOut;
use super::CtlError;
use ftvm_proto::v1::ft_control_client::FtControlClient;
use ftvm_proto::v1::GetVmRequest as PbGetVmRequest;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

pub(crate) async fn connect(endpoint: &str) -> Result<FtControlClient<Channel>, CtlError> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let failed = |message: String| CtlError::Connect {
        endpoint: endpoint.to_owned(),
        message,
    };
    let channel = Endpoint::from_shared(url)
        .map_err(|err| failed(err.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|err| {
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
    Ok(FtControlClient::new(channel))
}

/// Calls that change state are retried for a few seconds while leadership moves.
pub(crate) async fn retry<T, F, Fut>(mut call: F) -> Result<T, CtlError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempts = 0;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if status.code() == Code::Unavailable
                    && (status.message().contains("leadership is moving")
                        || status.message().contains("no leader"))
                    && attempts < 10 =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
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
