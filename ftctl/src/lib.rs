//! `ftctl`, the command-line client of the ftvm control plane. It speaks `ft.v1.FtControl`
//! to any ftd (a non-leader ftd forwards changes to the leader) and prints human tables
//! by default, JSON with `--json`.
//!
//! Exit status: 0 success, 1 the ftd refused or failed the request (the one-line message
//! says why), 2 usage error, 69 no ftd (or its etcd) reachable.

use clap::{Args, Parser, Subcommand};
use ftvm_proto::v1::ft_control_client::FtControlClient;
use ftvm_proto::v1::{
    CreateVmRequest as PbCreateVmRequest, DeleteVmRequest as PbDeleteVmRequest, Event as PbEvent,
    GetVmRequest as PbGetVmRequest, Host as PbHost, ListHostsRequest as PbListHostsRequest,
    ListVmsRequest as PbListVmsRequest, NetSpec as PbNetSpec, Protection as PbProtection,
    RestartBackupRequest as PbRestartBackupRequest, Role as PbRole,
    TestFailoverRequest as PbTestFailoverRequest, Vm as PbVm, VmSpec as PbVmSpec,
    WatchEventsRequest as PbWatchEventsRequest,
};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Default ftd address.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7700";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "ftctl",
    version,
    about = "Manage fault-tolerant VMs through any ftd"
)]
pub struct Cli {
    /// The ftd to talk to (host:port or http://host:port).
    #[arg(long, global = true, env = "FTCTL_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a VM: a primary on the first host, a backup on the second.
    Create(CreateArgs),
    /// List the VMs.
    List,
    /// Show one VM: protection, replicas, backup lag, last failover.
    Status {
        /// The VM.
        name: String,
    },
    /// List the live hosts.
    Hosts,
    /// Delete a VM (its replicas are stopped).
    Delete {
        /// The VM.
        name: String,
    },
    /// Kill the primary of a VM on purpose (a failover drill).
    Failover {
        /// The VM.
        name: String,
        /// Required: this is a test failover that kills the primary process.
        #[arg(long)]
        test: bool,
    },
    /// Replace the backup of a VM with a fresh one, cloned from the running primary.
    RestartBackup {
        /// The VM.
        name: String,
        /// Wait up to this many seconds until the VM is protected by the new backup (0:
        /// return at once).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait: u64,
    },
    /// Show the cluster's event log.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// How many past events to show first.
        #[arg(long, default_value_t = 20)]
        backlog: u32,
    },
}

/// `ftctl create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name: 1-63 of a-z, 0-9, '-'.
    #[arg(long)]
    pub vm: String,
    /// Hosts for primary and backup, comma-separated (default: the leader picks).
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Guest ELF (same path on every host; relative paths are made absolute here).
    #[arg(long)]
    pub image: PathBuf,
    /// Guest RAM, e.g. 128M or 1G.
    #[arg(long, default_value = "128M")]
    pub mem: String,
    /// Shared disk image.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Guest command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest NIC: tap=NAME,mac=MAC[,ip=ADDR/PREFIX].
    #[arg(long)]
    pub net: Option<String>,
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line is wrong in a way clap cannot see.
    #[error("{0}")]
    Usage(String),
    /// No ftd answers at the endpoint.
    #[error("cannot reach ftd at {endpoint}: {message}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The ftd answered with an error.
    #[error("{}", .0.message())]
    Rpc(tonic::Status),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// A wait ran out before the cluster got where it was asked to be.
    #[error("{0}")]
    Timeout(String),
}

impl CtlError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Usage(_) => ExitCode::from(2),
            CtlError::Connect { .. } => ExitCode::from(69),
            CtlError::Rpc(status) if status.code() == Code::Unavailable => ExitCode::from(69),
            CtlError::Rpc(_) | CtlError::Output(_) => ExitCode::from(1),
            CtlError::Timeout(_) => ExitCode::from(75),
        }
    }
}

impl From<tonic::Status> for CtlError {
    fn from(status: tonic::Status) -> Self {
        CtlError::Rpc(status)
    }
}

fn parse_size(text: &str) -> Result<u64, CtlError> {
    ftvm_contract::size::parse_size(text)
        .map_err(|_| CtlError::Usage(format!("--mem '{text}' is not a size (examples: 64M, 1G)")))
}

fn parse_net(text: &str) -> Result<PbNetSpec, CtlError> {
    let mut net = PbNetSpec::default();
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("tap", value)) => net.tap = value.to_owned(),
            Some(("mac", value)) => net.mac = value.to_owned(),
            Some(("ip", value)) => net.ip = value.to_owned(),
            _ => {
                return Err(CtlError::Usage(format!(
                    "--net '{text}': expected tap=NAME,mac=MAC[,ip=ADDR/PREFIX]"
                )))
            }
        }
    }
    if net.tap.is_empty() || net.mac.is_empty() {
        return Err(CtlError::Usage("--net needs tap= and mac=".into()));
    }
    Ok(net)
}

fn absolute(path: &std::path::Path) -> String {
    if path.is_absolute() {
        return path.display().to_string();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

async fn connect(endpoint: &str) -> Result<FtControlClient<Channel>, CtlError> {
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
async fn retry<T, F, Fut>(mut call: F) -> Result<T, CtlError>
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

/// A replica as printed.
#[derive(Debug, Serialize)]
pub struct ReplicaOut {
    /// primary or backup.
    pub role: &'static str,
    /// Host.
    pub host: String,
    /// pending, running, exited, lost.
    pub state: String,
    /// ftvmm pid.
    pub pid: u32,
    /// Pair generation.
    pub generation: u64,
    /// The replica's number within the VM (a new one for each process started).
    pub id: u64,
    /// Whether this backup was made by cloning the running primary.
    pub cloned: bool,
    /// How it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
}

/// A failover as printed.
#[derive(Debug, Serialize)]
pub struct FailoverOut {
    /// When (ms since the epoch).
    pub unix_ms: u64,
    /// Host lost.
    pub from_host: String,
    /// Host that went live.
    pub to_host: Option<String>,
    /// What happened.
    pub reason: String,
}

/// A VM as printed.
#[derive(Debug, Serialize)]
pub struct VmOut {
    /// Name.
    pub name: String,
    /// protected, not_protected, down.
    pub protection: &'static str,
    /// Why not protected.
    pub reason: String,
    /// Guest image.
    pub image: String,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Disk.
    pub disk: Option<String>,
    /// Hosts requested.
    pub hosts: Vec<String>,
    /// Replicas.
    pub replicas: Vec<ReplicaOut>,
    /// Where the backup would go.
    pub planned_backup_host: Option<String>,
    /// Backup lag in exits (unknown: null).
    pub backup_lag_exits: Option<u64>,
    /// Backup lag in milliseconds (unknown: null).
    pub backup_lag_ms: Option<u64>,
    /// Log bytes the primary sent so far (unknown: null).
    pub log_bytes_total: Option<u64>,
    /// Log bandwidth (unknown: null).
    pub log_bytes_per_second: Option<u64>,
    /// Last failover.
    pub last_failover: Option<FailoverOut>,
}

fn non_empty(text: String) -> Option<String> {
    Some(text).filter(|text| !text.is_empty())
}

impl VmOut {
    fn from_pb(vm: PbVm) -> VmOut {
        let spec = vm.spec.unwrap_or_default();
        let status = vm.status.unwrap_or_default();
        let protection = match PbProtection::try_from(status.protection) {
            Ok(PbProtection::Protected) => "protected",
            Ok(PbProtection::NotProtected) => "not_protected",
            _ => "down",
        };
        VmOut {
            name: spec.name,
            protection,
            reason: status.reason,
            image: spec.image,
            mem_bytes: spec.mem_bytes,
            disk: non_empty(spec.disk),
            hosts: spec.hosts,
            replicas: status
                .replicas
                .into_iter()
                .map(|replica| ReplicaOut {
                    role: match PbRole::try_from(replica.role) {
                        Ok(PbRole::Backup) => "backup",
                        _ => "primary",
                    },
                    host: replica.host,
                    state: replica.state,
                    pid: replica.pid,
                    generation: replica.generation,
                    id: replica.id,
                    cloned: replica.cloned,
                    exit: non_empty(replica.exit),
                })
                .collect(),
            planned_backup_host: non_empty(status.planned_backup_host),
            backup_lag_exits: status.backup_lag_exits,
            backup_lag_ms: status.backup_lag_ms,
            log_bytes_total: status.log_bytes_total,
            log_bytes_per_second: status.log_bytes_per_second,
            last_failover: status.last_failover.map(|failover| FailoverOut {
                unix_ms: failover.unix_ms,
                from_host: failover.from_host,
                to_host: non_empty(failover.to_host),
                reason: failover.reason,
            }),
        }
    }

    fn protection_text(&self) -> String {
        match self.protection {
            "protected" => "Protected".to_owned(),
            "not_protected" => format!("Not protected: {}", self.reason),
            _ => format!("Down: {}", self.reason),
        }
    }

    fn replica(&self, role: &str) -> Option<&ReplicaOut> {
        self.replicas.iter().find(|replica| replica.role == role)
    }
}

/// A host as printed.
#[derive(Debug, Serialize)]
pub struct HostOut {
    /// Name.
    pub name: String,
    /// gRPC address.
    pub grpc_address: String,
    /// /metrics address.
    pub metrics_address: String,
    /// Whether it leads.
    pub leader: bool,
    /// Replicas running there.
    pub replicas: u32,
    /// Whether its ftvmm can run a backup.
    pub backup_capable: bool,
    /// ftd version.
    pub version: String,
}

impl From<PbHost> for HostOut {
    fn from(host: PbHost) -> Self {
        HostOut {
            name: host.name,
            grpc_address: host.grpc_address,
            metrics_address: host.metrics_address,
            leader: host.leader,
            replicas: host.replicas,
            backup_capable: host.backup_capable,
            version: host.version,
        }
    }
}

/// An event as printed.
#[derive(Debug, Serialize)]
pub struct EventOut {
    /// Sequence number.
    pub seq: u64,
    /// When (ms since the epoch).
    pub unix_ms: u64,
    /// The VM, if any.
    pub vm: Option<String>,
    /// Kind.
    pub kind: String,
    /// Text.
    pub message: String,
}

impl From<PbEvent> for EventOut {
    fn from(event: PbEvent) -> Self {
        EventOut {
            seq: event.seq,
            unix_ms: event.unix_ms,
            vm: non_empty(event.vm),
            kind: event.kind,
            message: event.message,
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for milliseconds since the epoch.
pub fn format_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Prints rows as columns separated by two spaces.
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn json(out: &mut impl Write, value: &impl Serialize) -> Result<(), CtlError> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn replica_cell(replica: Option<&ReplicaOut>) -> String {
    match replica {
        Some(replica) => format!("{} ({})", replica.host, replica.state),
        None => "-".to_owned(),
    }
}

fn print_status(out: &mut impl Write, vm: &VmOut) -> std::io::Result<()> {
    writeln!(out, "vm:             {}", vm.name)?;
    writeln!(out, "protection:     {}", vm.protection_text())?;
    for role in ["primary", "backup"] {
        let text = match vm.replica(role) {
            Some(r) => {
                let mut text = format!("{} {}", r.host, r.state);
                if r.pid != 0 {
                    text.push_str(&format!(", pid {}", r.pid));
                }
                text.push_str(&format!(", generation {}, replica {}", r.generation, r.id));
                if r.cloned {
                    text.push_str(", cloned");
                }
                if let Some(exit) = &r.exit {
                    text.push_str(&format!(", {exit}"));
                }
                text
            }
            None if role == "backup" => match &vm.planned_backup_host {
                Some(host) => format!("none (would run on {host})"),
                None => "none".to_owned(),
            },
            None => "none".to_owned(),
        };
        writeln!(out, "{role}:{:width$}{text}", "", width = 15 - role.len())?;
    }
    let primary_runs = vm
        .replica("primary")
        .is_some_and(|primary| primary.state == "running");
    let unknown = if vm.replica("backup").is_none() {
        "n/a (no backup)"
    } else if !primary_runs {
        "n/a (no running primary)"
    } else {
        "unknown (the primary's control socket did not answer)"
    };
    match (vm.backup_lag_exits, vm.backup_lag_ms) {
        (Some(lag), Some(ms)) => writeln!(out, "backup lag:     {lag} exits, {ms} ms")?,
        (Some(lag), None) => writeln!(out, "backup lag:     {lag} exits")?,
        _ => writeln!(out, "backup lag:     {unknown}")?,
    }
    match (vm.log_bytes_per_second, vm.log_bytes_total) {
        (Some(rate), Some(total)) => {
            writeln!(out, "log bandwidth:  {rate} B/s ({total} bytes sent)")?
        }
        (Some(rate), None) => writeln!(out, "log bandwidth:  {rate} B/s")?,
        _ => writeln!(out, "log bandwidth:  {unknown}")?,
    }
    match &vm.last_failover {
        Some(f) => writeln!(
            out,
            "last failover:  {} UTC from {}{}: {}",
            format_utc(f.unix_ms),
            f.from_host,
            f.to_host
                .as_ref()
                .map(|to| format!(" to {to}"))
                .unwrap_or_default(),
            f.reason
        )?,
        None => writeln!(out, "last failover:  none")?,
    }
    writeln!(out, "image:          {}", vm.image)?;
    writeln!(out, "memory:         {} MiB", vm.mem_bytes >> 20)?;
    if let Some(disk) = &vm.disk {
        writeln!(out, "disk:           {disk}")?;
    }
    Ok(())
}

fn print_event(out: &mut impl Write, json_output: bool, event: PbEvent) -> Result<(), CtlError> {
    let event = EventOut::from(event);
    if json_output {
        serde_json::to_writer(&mut *out, &event).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{} UTC  #{:<5} {:<14} {:<12} {}",
            format_utc(event.unix_ms),
            event.seq,
            event.kind,
            event.vm.as_deref().unwrap_or("-"),
            event.message
        )?;
    }
    out.flush()?;
    Ok(())
}

/// One VM as the ftd answering sees it.
async fn get_vm(client: &mut FtControlClient<Channel>, name: &str) -> Result<VmOut, CtlError> {
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

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<(), CtlError> {
    let mut client = connect(&cli.endpoint).await?;
    match cli.command {
        Command::Create(args) => {
            let spec = PbVmSpec {
                name: args.vm,
                image: absolute(&args.image),
                mem_bytes: parse_size(&args.mem)?,
                cmdline: args.cmdline,
                disk: args.disk.as_deref().map(absolute).unwrap_or_default(),
                net: args.net.as_deref().map(parse_net).transpose()?,
                hosts: args.hosts,
            };
            let response = retry(|| {
                let mut client = client.clone();
                let spec = spec.clone();
                async move {
                    client
                        .create_vm(PbCreateVmRequest { spec: Some(spec) })
                        .await
                }
            })
            .await?;
            let vm = VmOut::from_pb(response.vm.unwrap_or_default());
            if cli.json {
                json(out, &vm)?;
            } else {
                writeln!(out, "created vm {}", vm.name)?;
            }
        }
        Command::List => {
            let vms: Vec<VmOut> = client
                .list_vms(PbListVmsRequest {})
                .await?
                .into_inner()
                .vms
                .into_iter()
                .map(VmOut::from_pb)
                .collect();
            if cli.json {
                json(out, &vms)?;
            } else {
                let rows: Vec<Vec<String>> = vms
                    .iter()
                    .map(|vm| {
                        vec![
                            vm.name.clone(),
                            vm.protection_text(),
                            replica_cell(vm.replica("primary")),
                            replica_cell(vm.replica("backup")),
                            vm.backup_lag_exits
                                .map_or_else(|| "-".to_owned(), |lag| lag.to_string()),
                            vm.log_bytes_per_second
                                .map_or_else(|| "-".to_owned(), |rate| rate.to_string()),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "NAME",
                        "PROTECTION",
                        "PRIMARY",
                        "BACKUP",
                        "LAG(EXITS)",
                        "LOG(B/S)",
                    ],
                    &rows,
                )?;
            }
        }
        Command::Status { name } => {
            let vm = get_vm(&mut client, &name).await?;
            if cli.json {
                json(out, &vm)?;
            } else {
                print_status(out, &vm)?;
            }
        }
        Command::Hosts => {
            let hosts: Vec<HostOut> = client
                .list_hosts(PbListHostsRequest {})
                .await?
                .into_inner()
                .hosts
                .into_iter()
                .map(HostOut::from)
                .collect();
            if cli.json {
                json(out, &hosts)?;
            } else {
                let rows: Vec<Vec<String>> = hosts
                    .iter()
                    .map(|host| {
                        vec![
                            host.name.clone(),
                            if host.leader { "yes" } else { "" }.to_owned(),
                            host.replicas.to_string(),
                            host.grpc_address.clone(),
                            host.metrics_address.clone(),
                            if host.backup_capable { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "HOST",
                        "LEADER",
                        "REPLICAS",
                        "GRPC",
                        "METRICS",
                        "BACKUP-CAPABLE",
                    ],
                    &rows,
                )?;
            }
        }
        Command::Delete { name } => {
            retry(|| {
                let mut client = client.clone();
                let name = name.clone();
                async move { client.delete_vm(PbDeleteVmRequest { name }).await }
            })
            .await?;
            if cli.json {
                json(out, &serde_json::json!({ "deleted": name }))?;
            } else {
                writeln!(out, "deleted vm {name}")?;
            }
        }
        Command::Failover { name, test } => {
            if !test {
                return Err(CtlError::Usage(
                    "only test failovers can be requested (they kill the primary): pass --test"
                        .into(),
                ));
            }
            let response = retry(|| {
                let mut client = client.clone();
                let name = name.clone();
                async move { client.test_failover(PbTestFailoverRequest { name }).await }
            })
            .await?;
            if cli.json {
                json(
                    out,
                    &serde_json::json!({ "vm": name, "killed_host": response.host, "killed_pid": response.pid }),
                )?;
            } else {
                writeln!(
                    out,
                    "killed the primary of {name} (pid {} on {})",
                    response.pid, response.host
                )?;
            }
        }
        Command::RestartBackup { name, wait } => {
            let started = std::time::Instant::now();
            let before = get_vm(&mut client, &name).await?;
            let old_backup = before.replica("backup").map(|backup| backup.id);
            let stopped = retry(|| {
                let mut client = client.clone();
                let name = name.clone();
                async move { client.restart_backup(PbRestartBackupRequest { name }).await }
            })
            .await?
            .stopped_host;
            if wait == 0 {
                if cli.json {
                    json(
                        out,
                        &serde_json::json!({ "vm": name, "stopped_host": non_empty(stopped) }),
                    )?;
                } else if stopped.is_empty() {
                    writeln!(out, "{name}: a new backup will be cloned from the primary")?;
                } else {
                    writeln!(out, "{name}: stopping the backup on {stopped}; a new one will be cloned from the primary")?;
                }
            } else {
                let deadline = started + std::time::Duration::from_secs(wait);
                let vm = loop {
                    let vm = get_vm(&mut client, &name).await?;
                    let renewed = vm
                        .replica("backup")
                        .is_some_and(|backup| Some(backup.id) != old_backup);
                    if renewed && vm.protection == "protected" {
                        break vm;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(CtlError::Timeout(format!(
                            "{name} is not protected by a new backup after {wait} s: {}",
                            vm.protection_text()
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                };
                let seconds = started.elapsed().as_secs_f64();
                let backup = vm.replica("backup");
                if cli.json {
                    json(
                        out,
                        &serde_json::json!({ "vm": name, "stopped_host": non_empty(stopped), "seconds": seconds, "backup": backup }),
                    )?;
                } else if let Some(backup) = backup {
                    writeln!(out, "{name} is protected again after {seconds:.2} s: backup on {} (replica {}, generation {})", backup.host, backup.id, backup.generation)?;
                }
            }
        }
        Command::Events { follow, backlog } => {
            let mut stream = client
                .watch_events(PbWatchEventsRequest { follow, backlog })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                print_event(out, cli.json, event)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_formatted_from_epoch_milliseconds() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn net_specs_need_tap_and_mac() {
        let net = parse_net("tap=tap0,mac=52:54:00:12:34:56,ip=10.0.0.2/24").expect("valid");
        assert_eq!((net.tap.as_str(), net.ip.as_str()), ("tap0", "10.0.0.2/24"));
        assert!(parse_net("tap=tap0").is_err());
        assert!(parse_net("tap=tap0,mac=x,color=red").is_err());
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("128M").ok(), Some(128 << 20));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn tables_align_columns() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["A", "B"],
            &[
                vec!["long-name".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        )
        .expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "A          B\nlong-name  x\ns          y\n"
        );
    }
}
