//! The ftd process: wires the store, the host registration, the election, the leader's
//! reconcile loop, the supervisor, the gRPC server and the `/metrics` server
//! (`metrics_server`) together, and runs them until SIGTERM or SIGINT. The leases and the
//! leadership are `election`'s.

mod election;
mod metrics_server;

use crate::cluster::{Cluster, Leadership};
use crate::config::{Config, StoreConfig};
use crate::events::EventLog;
use crate::grpc::observe::Access;
use crate::grpc::{AgentService, ControlService, Dialer, GrpcAgents};
use crate::keys;
use crate::metrics;
use crate::model::{now_unix_ms, HostRecord, LeaderRecord};
use crate::reconcile::{OutageRules, Reconciler};
use crate::records::encode;
use crate::store::etcd::{EtcdElection, EtcdStore};
use crate::store::health::{Monitored, StoreHealth};
use crate::store::memory::{MemElection, MemStore};
use crate::store::{Election, Store, StoreError};
use crate::supervisor::{
    probe_backup_capable, probe_cpu, Supervisor, SupervisorConfig, SupervisorError,
};
use election::{elect, keep_leases, register, Elector, Leases, Renewal};
use ftvm_tls::EtcdAccess;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// How often the loops run when nothing wakes them.
const TICK: Duration = Duration::from_secs(1);

/// How often the supervisor loop runs while a replica's pair is still connecting.
const SETTLING_TICK: Duration = Duration::from_millis(200);

/// ftd could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The /metrics exporter could not start.
    #[error("cannot serve /metrics")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// The store is unreachable.
    #[error("cannot use the store")]
    Store(#[from] StoreError),
    /// The supervisor could not start.
    #[error("cannot start the supervisor")]
    Supervisor(#[from] SupervisorError),
    /// The gRPC listen address cannot be bound.
    #[error("cannot listen on {address}")]
    Listen {
        /// The listen address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server's TLS cannot be set up.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The gRPC server failed.
    #[error("gRPC server on {address} failed")]
    Serve {
        /// The listen address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Wakes the loops whenever anything under /ft/vms/ or /ft/hosts/ changes.
async fn watch_changes(store: Arc<dyn Store>, wakes: [Arc<Notify>; 2]) {
    loop {
        let mut watches = Vec::new();
        for prefix in [keys::VMS, keys::HOSTS] {
            match store.watch_prefix(prefix).await {
                Ok(watch) => watches.push(watch),
                Err(err) => tracing::warn!(error = %err, "cannot watch {prefix}"),
            }
        }
        if watches.len() == 2 {
            let (first, second) = watches.split_at_mut(1);
            loop {
                let changed = tokio::select! {
                    event = first[0].next() => event.is_some(),
                    event = second[0].next() => event.is_some(),
                };
                if !changed {
                    break;
                }
                for wake in &wakes {
                    wake.notify_one();
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop ftd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping (replicas keep running)"),
        _ = int.recv() => tracing::info!("SIGINT: stopping (replicas keep running)"),
    }
}

/// Deletes election candidate keys a previous run of this ftd left behind (after a crash
/// they stay until their lease ends). Without this, a crashed-and-restarted leader would
/// still look like the leader for up to a lease TTL while not acting as one.
async fn remove_stale_candidacy(store: &dyn Store, config: &Config) -> Result<(), StoreError> {
    for kv in store.list_prefix(&format!("{}/", keys::LEADER)).await? {
        let ours = crate::records::decode::<LeaderRecord>(&kv.key, &kv.value)
            .is_some_and(|record| record.host == config.host_name);
        if ours {
            tracing::info!(
                key = kv.key,
                "removing this host's candidacy from a previous run"
            );
            store.delete(&kv.key).await?;
        }
    }
    Ok(())
}

/// The `--arbiter` ftvmm replicas use: this ftd's etcd (`etcd://HOST:PORT,...`, the
/// endpoints without their `http://`), or with the in-process store a directory under the
/// state directory (`local:DIR`, enough when both replicas run on this machine).
fn arbiter_spec(config: &Config) -> String {
    match &config.store {
        StoreConfig::Etcd(endpoints) => format!(
            "etcd://{}",
            endpoints
                .iter()
                // The scheme goes: the replica's arbiter uses https when it is given
                // etcd's TLS (as ftd hands on its own), else http.
                .map(|endpoint| {
                    endpoint
                        .strip_prefix("https://")
                        .or_else(|| endpoint.strip_prefix("http://"))
                        .unwrap_or(endpoint)
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
        StoreConfig::Memory => format!("local:{}", config.state_dir.join("arbiter").display()),
    }
}

/// Connects to etcd, trying again until it answers: at boot etcd may come up after ftd,
/// or be briefly unreachable; replicas keep running meanwhile and nothing is decided.
async fn connect_etcd(endpoints: &[String], access: &EtcdAccess) -> (EtcdStore, EtcdElection) {
    let mut pause = Duration::from_millis(250);
    loop {
        let connected = async {
            let store = EtcdStore::connect(endpoints, access, Duration::from_secs(5)).await?;
            let election =
                EtcdElection::connect(endpoints, access, Duration::from_secs(5), keys::LEADER)
                    .await?;
            Ok::<_, StoreError>((store, election))
        };
        match connected.await {
            Ok(connected) => return connected,
            Err(err) => {
                tracing::warn!(
                    "{}; trying again in {} ms",
                    crate::error_chain(&err),
                    pause.as_millis()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs ftd until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let metrics_handle = metrics::install()?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| DaemonError::Listen {
            address: config.metrics_listen,
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            address: config.listen,
            source,
        })?;
    let (store, election): (Arc<dyn Store>, Arc<dyn Election>) = match &config.store {
        StoreConfig::Etcd(endpoints) => {
            let (store, election) = tokio::select! {
                connected = connect_etcd(endpoints, &config.etcd.access) => connected,
                () = shutdown_signal() => return Ok(()),
            };
            (Arc::new(store), Arc::new(election))
        }
        StoreConfig::Memory => {
            let store = MemStore::new();
            let election = MemElection::new(store.clone(), keys::LEADER);
            (Arc::new(store), Arc::new(election))
        }
    };
    // Every call this ftd makes to the store is watched: the leader tells an etcd outage
    // from host deaths by what its own calls saw.
    let health = Arc::new(StoreHealth::new());
    let store: Arc<dyn Store> = Arc::new(Monitored::new(store, health.clone()));
    let store_health = health.clone();
    remove_stale_candidacy(&*store, &config).await?;
    let host_lease = store.grant_lease(config.lease_ttl).await?;
    let granted = tokio::time::Instant::now();
    let election_lease = store.grant_lease(config.lease_ttl).await?;
    let (host_tx, host_rx) = watch::channel(host_lease);
    let (election_tx, election_rx) = watch::channel(election_lease);
    let (renewed_tx, renewed_rx) = watch::channel(Renewal {
        lease: election_lease,
        sent: granted,
    });

    let wake_reconcile = Arc::new(Notify::new());
    let wake_supervisor = Arc::new(Notify::new());
    let supervisor = Arc::new(Supervisor::new(
        SupervisorConfig {
            host: config.host_name.clone(),
            state_dir: config.state_dir.clone(),
            ftvmm: config.ftvmm.clone(),
            arbiter: arbiter_spec(&config),
            // With the in-process store, the cluster lives as long as this process.
            cluster_id_file: match config.store {
                StoreConfig::Etcd(_) => Some(config.state_dir.join("cluster-id")),
                StoreConfig::Memory => None,
            },
            replica_user: config.replica_user.clone(),
            replica_seccomp: config.replica_seccomp,
            replica_tls_dir: config.tls.as_ref().map(|tls| tls.dir.clone()),
            replica_etcd: config.etcd.clone(),
            bridge: config
                .bridge
                .clone()
                .map(|bridge| crate::supervisor::taps::Bridge {
                    name: bridge,
                    mtu: config.tap_mtu,
                }),
            paths: config.paths.clone(),
        },
        store.clone(),
        host_rx,
        wake_supervisor.clone(),
    ));
    supervisor.join_cluster().await?;
    let adopted = supervisor.adopt().await?;
    // Adopted replicas answer on their control sockets too: sample them at once.
    supervisor.sample_controls().await;

    let record = HostRecord {
        name: config.host_name.clone(),
        grpc_address: config.advertise.clone(),
        metrics_address: config.metrics_listen.to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        backup_capable: probe_backup_capable(&config.ftvmm),
        log_listen_ip: Some(config.log_listen_ip.to_string()),
        log_port_base: Some(config.log_port_base),
        started_unix_ms: now_unix_ms(),
        cpu: probe_cpu(&config.ftvmm),
        bridge: config.bridge.clone(),
    };
    register(&*store, &record, host_lease).await?;
    if let Ok(hosts) = crate::records::load_hosts(&*store).await {
        for warning in crate::cluster::host_warnings(&record, &hosts) {
            tracing::warn!("this host {warning}");
        }
    }
    tracing::info!(
        host = %config.host_name,
        grpc = %config.advertise,
        metrics = %config.metrics_listen,
        adopted,
        "ftd registered"
    );

    let events = Arc::new(EventLog::new(store.clone()));
    let leadership = Arc::new(Leadership::new(election.clone()));
    leadership.step_down();
    let reconciler = Arc::new(
        Reconciler::new(store.clone(), events.clone()).settling_after_outages(
            health,
            config.host_name.clone(),
            OutageRules::for_lease_ttl(config.lease_ttl),
        ),
    );
    if config.tls.is_none() {
        tracing::warn!(
            "insecure: gRPC, forwarding and the replicas' log and clone channels run in plaintext; anyone who reaches their ports may do anything"
        );
    }
    let dialer = Dialer::new(config.tls.as_ref().map(|tls| &tls.credentials));
    let cluster = Arc::new(Cluster::new(
        store.clone(),
        events.clone(),
        &config,
        leadership.clone(),
        supervisor.clone(),
        Arc::new(GrpcAgents(dialer.clone())),
        wake_reconcile.clone(),
    ));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(keep_leases(
        store.clone(),
        Leases {
            host: host_tx,
            election: election_tx,
            renewed: renewed_tx,
        },
        record,
        config.lease_ttl,
    ));
    let leader_value = encode(&LeaderRecord {
        host: config.host_name.clone(),
        grpc_address: config.advertise.clone(),
    });
    tasks.spawn(elect(Elector {
        election: election.clone(),
        leadership: leadership.clone(),
        lease: election_rx.clone(),
        renewed: renewed_rx,
        ttl: config.lease_ttl,
        value: leader_value,
        events: events.clone(),
        reconciler: reconciler.clone(),
        wake: wake_reconcile.clone(),
        me: config.host_name.to_string(),
    }));
    {
        let (leadership, wake) = (leadership.clone(), wake_reconcile.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(TICK) => {}
                }
                // Each pass writes under the leadership it started with: once that ends,
                // its writes are refused.
                if let Some(fence) = leadership.fence() {
                    if let Err(err) = reconciler.pass(&fence).await {
                        tracing::warn!(error = %err, "reconcile pass failed");
                    }
                    // A pass that ended after the leadership did must not leave its
                    // per-VM series on a follower.
                    if leadership.fence().is_none() {
                        metrics::clear_vm_view();
                    }
                }
            }
        });
    }
    {
        let (supervisor, wake, store) =
            (supervisor.clone(), wake_supervisor.clone(), store.clone());
        tasks.spawn(async move {
            loop {
                // While a pair connects, its protection is read again soon rather than a
                // whole tick later.
                let tick = if supervisor.settling().await {
                    SETTLING_TICK
                } else {
                    TICK
                };
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(tick) => {}
                }
                // Sampled first, so that the reports written next say how each pair is.
                supervisor.sample_controls().await;
                if let Err(err) = supervisor.sync().await {
                    tracing::warn!(error = %err, "supervisor pass failed");
                }
                if let Ok(hosts) = crate::records::load_hosts(&*store).await {
                    metrics::set_hosts(hosts.len());
                }
            }
        });
    }
    tasks.spawn(metrics_server::serve(
        metrics_listener,
        metrics_handle,
        supervisor.clone(),
    ));
    tasks.spawn(watch_changes(
        store.clone(),
        [wake_reconcile.clone(), wake_supervisor.clone()],
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tasks.spawn(report_health(health_reporter, store_health));
    let mut server = tonic::transport::Server::builder();
    let access = match &config.tls {
        Some(tls) => {
            server = server
                .tls_config(
                    ServerTlsConfig::new()
                        .identity(Identity::from_pem(
                            &tls.credentials.cert_pem,
                            &tls.credentials.key_pem,
                        ))
                        .client_ca_root(Certificate::from_pem(&tls.credentials.ca_pem))
                        // A client that connects and says nothing holds no slot for long.
                        .timeout(Duration::from_secs(5)),
                )
                .map_err(|err| DaemonError::Tls(err.to_string()))?;
            Access::ByRole
        }
        None => Access::Open,
    };
    let served = server
        .layer(crate::grpc::observe::layers(
            crate::grpc::observe::Limits::SERVER,
            access,
        ))
        .add_service(health_service)
        .add_service(ControlService::server(cluster.clone(), dialer))
        .add_service(AgentService::server(cluster))
        .serve_with_incoming_shutdown(
            // Accepted here, not by tonic, so its TCP_NODELAY setting does not apply:
            // without it a reply's last frames wait for the client's delayed ACK (40 ms).
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |accepted| {
                    accepted.inspect(|stream| {
                        if let Err(err) = stream.set_nodelay(true) {
                            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
                        }
                    })
                },
            ),
            shutdown_signal(),
        )
        .await;
    tasks.abort_all();
    // Step down at once so that another ftd leads without waiting for the TTL; the host
    // lease stays so that a restart within the TTL goes unnoticed.
    let election_lease = *election_rx.borrow();
    if let Err(err) = store.revoke_lease(election_lease).await {
        tracing::warn!(error = %err, "cannot revoke the election lease");
    }
    served.map_err(|source| DaemonError::Serve {
        address: config.listen,
        source,
    })
}

/// Keeps the standard gRPC health service (`grpc.health.v1.Health`) true: ftd serves
/// while its calls to etcd are answered, and says NOT_SERVING while they fail (it can
/// then neither change nor report the cluster's state reliably).
async fn report_health(reporter: tonic_health::server::HealthReporter, health: Arc<StoreHealth>) {
    let mut serving = None;
    loop {
        let now = !health.troubled();
        if serving != Some(now) {
            let status = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in ["", "ft.v1.FtControl", "ft.v1.FtAgent"] {
                reporter.set_service_status(service, status).await;
            }
            serving = Some(now);
        }
        tokio::time::sleep(TICK).await;
    }
}
