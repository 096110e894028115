//! The gRPC front end: `ft.v1.FtControl` and `ft.v1.FtAgent` over [`Cluster`].
//!
//! Handlers only validate (through the domain constructors), convert ([`convert`]) and
//! delegate. Errors become a `tonic::Status` in exactly one place
//! (`impl From<ClusterError> for Status` below).
//!
//! Leader forwarding: a non-leader ftd forwards the calls that change desired state
//! (CreateVm, DeleteVm, TestFailover, RestartBackup, Switchover, SetHostDrain) to the
//! leader it finds in the election, marking the call with the `x-ftd-forwarded` header;
//! a forwarded call that arrives at a non-leader (leadership just moved) fails with
//! UNAVAILABLE and the client retries. Clients therefore need only one ftd's address.

pub mod convert;
pub mod observe;

use crate::cluster::{AgentError, Agents, Cluster, ClusterError};
use crate::model::{Role, VmName};
use crate::replica_control::LiveStats;
use crate::supervisor::SupervisorError;
use async_trait::async_trait;
use ftvm_proto::v1::ft_agent_client::FtAgentClient;
use ftvm_proto::v1::ft_agent_server::{FtAgent, FtAgentServer};
use ftvm_proto::v1::ft_control_client::FtControlClient;
use ftvm_proto::v1::ft_control_server::{FtControl, FtControlServer};
use ftvm_proto::v1::{
    CreateVmRequest as PbCreateVmRequest, CreateVmResponse as PbCreateVmResponse,
    DeleteVmRequest as PbDeleteVmRequest, DeleteVmResponse as PbDeleteVmResponse, Event as PbEvent,
    GetVmRequest as PbGetVmRequest, GetVmResponse as PbGetVmResponse, ImageChunk as PbImageChunk,
    ListHostsRequest as PbListHostsRequest, ListHostsResponse as PbListHostsResponse,
    ListVmsRequest as PbListVmsRequest, ListVmsResponse as PbListVmsResponse,
    ReplicaStatsRequest as PbReplicaStatsRequest, ReplicaStatsResponse as PbReplicaStatsResponse,
    RestartBackupRequest as PbRestartBackupRequest,
    RestartBackupResponse as PbRestartBackupResponse, Role as PbRole,
    SetHostDrainRequest as PbSetHostDrainRequest, SetHostDrainResponse as PbSetHostDrainResponse,
    StopReplicaRequest as PbStopReplicaRequest, StopReplicaResponse as PbStopReplicaResponse,
    SwitchoverRequest as PbSwitchoverRequest, SwitchoverResponse as PbSwitchoverResponse,
    TestFailoverRequest as PbTestFailoverRequest, TestFailoverResponse as PbTestFailoverResponse,
    UploadImageResponse as PbUploadImageResponse, WatchEventsRequest as PbWatchEventsRequest,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Largest request accepted (all requests are small; this bounds untrusted input).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The header that marks a call forwarded to the leader.
pub const FORWARDED: &str = "x-ftd-forwarded";
/// Past events sent when a client asks for none in particular.
const DEFAULT_BACKLOG: usize = 20;

impl From<ClusterError> for Status {
    fn from(err: ClusterError) -> Status {
        let code = match &err {
            ClusterError::Invalid(_) => Code::InvalidArgument,
            ClusterError::NotFound(_) => Code::NotFound,
            ClusterError::Image(crate::images::ImageError::Invalid(_)) => Code::InvalidArgument,
            ClusterError::Image(crate::images::ImageError::Unknown(_)) => Code::FailedPrecondition,
            ClusterError::Image(crate::images::ImageError::Store(_)) => Code::Unavailable,
            ClusterError::Image(_) => Code::DataLoss,
            ClusterError::AlreadyExists(_)
            | ClusterError::DiskInUse { .. }
            | ClusterError::NetInUse { .. } => Code::AlreadyExists,
            ClusterError::Path(crate::paths::PathError::Outside { .. }) => Code::PermissionDenied,
            ClusterError::HostDown(_)
            | ClusterError::NoLiveHost
            | ClusterError::Path(crate::paths::PathError::Missing { .. })
            | ClusterError::NoPrimary(_)
            | ClusterError::NotProtected { .. }
            | ClusterError::SwitchoverUnderWay(_)
            | ClusterError::BadTarget(_)
            | ClusterError::NoBridge(_)
            | ClusterError::NoBridgeAnywhere(_)
            | ClusterError::Supervisor(SupervisorError::NotRunning { .. }) => {
                Code::FailedPrecondition
            }
            // A feature the VMM lacks is a precondition the cluster cannot meet yet.
            ClusterError::Unsupported(_) => Code::FailedPrecondition,
            ClusterError::NotLeader
            | ClusterError::NoLeader
            | ClusterError::Store(_)
            | ClusterError::Agent { .. } => Code::Unavailable,
            ClusterError::WatchEnded => Code::Unavailable,
            ClusterError::Supervisor(_) | ClusterError::BadAddress(_) => Code::Internal,
        };
        let message = match &err {
            ClusterError::NotLeader => {
                "leadership is moving between ftds; retry in a moment".to_owned()
            }
            _ => crate::error_chain(&err),
        };
        match retry_after(&err) {
            // google.rpc.RetryInfo: what a client acts on (ftctl retries), not the text.
            Some(delay) => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            None => Status::new(code, message),
        }
    }
}

/// How long a client should wait before it tries again, for errors that pass by
/// themselves and left nothing half done: leadership moving or not yet elected. (A store
/// error may come after some of a call's writes: retrying it is the caller's choice.)
fn retry_after(err: &ClusterError) -> Option<Duration> {
    match err {
        ClusterError::NotLeader | ClusterError::NoLeader => Some(RETRY_DELAY),
        _ => None,
    }
}

/// The delay [`retry_after`] suggests: about the time a new leader needs to settle.
pub const RETRY_DELAY: Duration = Duration::from_millis(500);

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// How this ftd reaches other ftds (the leader it forwards to, the agents it asks): with
/// its host certificate over mutual TLS, or in plaintext when insecure.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<ClientTlsConfig>,
}

impl Dialer {
    /// A dialer presenting `credentials` (a host certificate) and trusting their CA;
    /// `None`: plaintext.
    pub fn new(credentials: Option<&ftvm_tls::Credentials>) -> Dialer {
        Dialer {
            tls: credentials.map(|credentials| {
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
                    .identity(Identity::from_pem(
                        &credentials.cert_pem,
                        &credentials.key_pem,
                    ))
                    .domain_name(ftvm_tls::SERVER_NAME)
            }),
        }
    }

    fn endpoint(&self, address: &str) -> Result<Endpoint, ClusterError> {
        let bad = || ClusterError::BadAddress(address.to_owned());
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|_| bad())?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|_| bad())?;
        }
        Ok(endpoint)
    }
}

/// `ft.v1.FtControl` on a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ControlService {
    cluster: Arc<Cluster>,
    /// How the leader is reached to forward a change.
    dialer: Dialer,
}

impl ControlService {
    /// The service, ready to be added to a tonic server.
    pub fn server(cluster: Arc<Cluster>, dialer: Dialer) -> FtControlServer<ControlService> {
        FtControlServer::new(ControlService { cluster, dialer })
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// A client of the leader when this ftd is not it (`None` when it is).
    async fn leader_client(
        &self,
        metadata: &MetadataMap,
    ) -> Result<Option<FtControlClient<Channel>>, Status> {
        if self.cluster.is_leader() {
            return Ok(None);
        }
        if metadata.contains_key(FORWARDED) {
            return Err(ClusterError::NotLeader.into());
        }
        let leader = self.cluster.leader().await?.ok_or(ClusterError::NoLeader)?;
        let channel = self.dialer.endpoint(&leader.grpc_address)?.connect_lazy();
        Ok(Some(FtControlClient::new(channel)))
    }
}

#[tonic::async_trait]
impl FtControl for ControlService {
    async fn create_vm(
        &self,
        request: Request<PbCreateVmRequest>,
    ) -> Result<Response<PbCreateVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client(request.metadata()).await? {
            return leader.create_vm(forwarded(request.into_inner())).await;
        }
        let vm_request =
            convert::vm_request(request.into_inner().spec).map_err(ClusterError::from)?;
        let vm = self.cluster.create_vm(&vm_request).await?;
        Ok(Response::new(PbCreateVmResponse {
            vm: Some(convert::vm(&vm)),
        }))
    }

    async fn delete_vm(
        &self,
        request: Request<PbDeleteVmRequest>,
    ) -> Result<Response<PbDeleteVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client(request.metadata()).await? {
            return leader.delete_vm(forwarded(request.into_inner())).await;
        }
        self.cluster.delete_vm(&request.into_inner().name).await?;
        Ok(Response::new(PbDeleteVmResponse {}))
    }

    async fn list_vms(
        &self,
        _request: Request<PbListVmsRequest>,
    ) -> Result<Response<PbListVmsResponse>, Status> {
        let vms = self.cluster.list_vms().await?;
        Ok(Response::new(PbListVmsResponse {
            vms: vms.iter().map(convert::vm).collect(),
        }))
    }

    async fn get_vm(
        &self,
        request: Request<PbGetVmRequest>,
    ) -> Result<Response<PbGetVmResponse>, Status> {
        let vm = self.cluster.get_vm(&request.into_inner().name).await?;
        Ok(Response::new(PbGetVmResponse {
            vm: Some(convert::vm(&vm)),
        }))
    }

    async fn list_hosts(
        &self,
        _request: Request<PbListHostsRequest>,
    ) -> Result<Response<PbListHostsResponse>, Status> {
        let hosts = self.cluster.list_hosts().await?;
        Ok(Response::new(PbListHostsResponse {
            hosts: hosts.iter().map(convert::host).collect(),
        }))
    }

    async fn test_failover(
        &self,
        request: Request<PbTestFailoverRequest>,
    ) -> Result<Response<PbTestFailoverResponse>, Status> {
        if let Some(mut leader) = self.leader_client(request.metadata()).await? {
            return leader.test_failover(forwarded(request.into_inner())).await;
        }
        let (host, pid) = self
            .cluster
            .test_failover(&request.into_inner().name)
            .await?;
        Ok(Response::new(PbTestFailoverResponse {
            host: host.to_string(),
            pid,
        }))
    }

    async fn restart_backup(
        &self,
        request: Request<PbRestartBackupRequest>,
    ) -> Result<Response<PbRestartBackupResponse>, Status> {
        if let Some(mut leader) = self.leader_client(request.metadata()).await? {
            return leader.restart_backup(forwarded(request.into_inner())).await;
        }
        let request = request.into_inner();
        let to = Some(request.to_host.as_str()).filter(|to| !to.is_empty());
        let stopped = self.cluster.restart_backup(&request.name, to).await?;
        Ok(Response::new(PbRestartBackupResponse {
            stopped_host: stopped.map(|host| host.to_string()).unwrap_or_default(),
        }))
    }

    async fn switchover(
        &self,
        request: Request<PbSwitchoverRequest>,
    ) -> Result<Response<PbSwitchoverResponse>, Status> {
        if let Some(mut leader) = self.leader_client(request.metadata()).await? {
            return leader.switchover(forwarded(request.into_inner())).await;
        }
        let (from, to) = self.cluster.switchover(&request.into_inner().name).await?;
        Ok(Response::new(PbSwitchoverResponse {
            from_host: from.to_string(),
            to_host: to.to_string(),
        }))
    }

    async fn set_host_drain(
        &self,
        request: Request<PbSetHostDrainRequest>,
    ) -> Result<Response<PbSetHostDrainResponse>, Status> {
        if let Some(mut leader) = self.leader_client(request.metadata()).await? {
            return leader.set_host_drain(forwarded(request.into_inner())).await;
        }
        let request = request.into_inner();
        self.cluster
            .set_host_drain(&request.host, request.drained)
            .await?;
        Ok(Response::new(PbSetHostDrainResponse {}))
    }

    type WatchEventsStream = ReceiverStream<Result<PbEvent, Status>>;

    async fn upload_image(
        &self,
        request: Request<tonic::Streaming<PbImageChunk>>,
    ) -> Result<Response<PbUploadImageResponse>, Status> {
        // Taken by the ftd that receives it (the store's keys depend only on the bytes):
        // no forwarding to the leader.
        let mut chunks = request.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            if (bytes.len() + chunk.data.len()) as u64 > crate::images::MAX_IMAGE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the image is larger than the {} MiB allowed",
                    crate::images::MAX_IMAGE_BYTES >> 20
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let sha256 = self.cluster.upload_image(&bytes).await?;
        Ok(Response::new(PbUploadImageResponse {
            sha256,
            size: bytes.len() as u64,
        }))
    }

    async fn watch_events(
        &self,
        request: Request<PbWatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let request = request.into_inner();
        let backlog = match request.backlog {
            0 => DEFAULT_BACKLOG,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        // Watch first, then read the backlog, so nothing falls between the two; events
        // seen twice are skipped by sequence number.
        let mut watch = if request.follow {
            Some(self.cluster.watch_events().await?)
        } else {
            None
        };
        let recent = self.cluster.recent_events(backlog).await?;
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = 0;
            for event in &recent {
                last = event.seq;
                if sender.send(Ok(convert::event(event))).await.is_err() {
                    return;
                }
            }
            let Some(watch) = watch.as_mut() else { return };
            loop {
                tokio::select! {
                    () = sender.closed() => return,
                    event = watch.next() => {
                        let Some(event) = event else {
                            let _ = sender
                                .send(Err(ClusterError::WatchEnded.into()))
                                .await;
                            return;
                        };
                        if event.seq > last {
                            last = event.seq;
                            if sender.send(Ok(convert::event(&event))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// `ft.v1.FtAgent` on a [`Cluster`].
#[derive(Debug, Clone)]
pub struct AgentService {
    cluster: Arc<Cluster>,
}

impl AgentService {
    /// The service, ready to be added to a tonic server.
    pub fn server(cluster: Arc<Cluster>) -> FtAgentServer<AgentService> {
        FtAgentServer::new(AgentService { cluster }).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl FtAgent for AgentService {
    async fn stop_replica(
        &self,
        request: Request<PbStopReplicaRequest>,
    ) -> Result<Response<PbStopReplicaResponse>, Status> {
        let request = request.into_inner();
        let role = convert::role(request.role).map_err(ClusterError::from)?;
        let pid = self.cluster.stop_local_replica(&request.vm, role).await?;
        Ok(Response::new(PbStopReplicaResponse { pid }))
    }

    async fn replica_stats(
        &self,
        request: Request<PbReplicaStatsRequest>,
    ) -> Result<Response<PbReplicaStatsResponse>, Status> {
        let request = request.into_inner();
        let role = convert::role(request.role).map_err(ClusterError::from)?;
        let stats = self.cluster.local_replica_stats(&request.vm, role)?;
        Ok(Response::new(stats.map_or_else(
            PbReplicaStatsResponse::default,
            convert::replica_stats,
        )))
    }
}

/// [`Agents`] over gRPC to the other ftds.
#[derive(Debug, Default, Clone)]
pub struct GrpcAgents(pub Dialer);

#[async_trait]
impl Agents for GrpcAgents {
    async fn stop_replica(
        &self,
        address: &str,
        vm: &VmName,
        role: Role,
    ) -> Result<u32, AgentError> {
        let failed = |status: Status| AgentError {
            message: status.message().to_owned(),
            not_running: status.code() == Code::FailedPrecondition,
        };
        let channel = self
            .0
            .endpoint(address)
            .map_err(|err| AgentError {
                message: err.to_string(),
                not_running: false,
            })?
            .connect_lazy();
        let role = match role {
            Role::Primary => PbRole::Primary,
            Role::Backup => PbRole::Backup,
        };
        let response = FtAgentClient::new(channel)
            .stop_replica(PbStopReplicaRequest {
                vm: vm.to_string(),
                role: role.into(),
            })
            .await
            .map_err(failed)?;
        Ok(response.into_inner().pid)
    }

    async fn replica_stats(
        &self,
        address: &str,
        vm: &VmName,
        role: Role,
    ) -> Result<Option<LiveStats>, AgentError> {
        let failed = |message: String| AgentError {
            message,
            not_running: false,
        };
        let channel = self
            .0
            .endpoint(address)
            .map_err(|err| failed(err.to_string()))?
            .connect_lazy();
        let role = match role {
            Role::Primary => PbRole::Primary,
            Role::Backup => PbRole::Backup,
        };
        let stats = FtAgentClient::new(channel)
            .replica_stats(PbReplicaStatsRequest {
                vm: vm.to_string(),
                role: role.into(),
            })
            .await
            .map_err(|status| failed(status.message().to_owned()))?
            .into_inner();
        Ok(convert::live_stats(stats))
    }
}
