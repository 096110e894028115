//! `ftctl`, the command-line client of the ftvm control plane. It speaks `ft.v1.FtControl`
//! to any ftd (a non-leader ftd forwards changes to the leader) and prints human tables
//! by default, JSON with `--json`.
//!
//! Exit status: 0 success, 1 the ftd refused or failed the request (the one-line message
//! says why), 2 usage error, 69 no ftd (or its etcd) reachable.

mod certs;
mod cli;
mod client;
mod drain;
mod output;

pub use cli::{CertsAction, Cli, Command, CreateArgs, DiskModeArg, HostAction, DEFAULT_ENDPOINT};
pub use output::{
    format_bytes, format_utc, CloneDiskOut, EventOut, FailoverOut, HostOut, ReplicaOut, VmOut,
};

use cli::{absolute, disk_spec, parse_net, parse_size};
use client::{connect, get_vm, list_vms, retry, wait_for_vm};
use ftvm_contract::manual::Generated;
use ftvm_proto::v1::ft_control_client::FtControlClient;
use ftvm_proto::v1::{
    CreateVmRequest as PbCreateVmRequest, DeleteVmRequest as PbDeleteVmRequest,
    ImageChunk as PbImageChunk, ListHostsRequest as PbListHostsRequest,
    RestartBackupRequest as PbRestartBackupRequest, SwitchoverRequest as PbSwitchoverRequest,
    TestFailoverRequest as PbTestFailoverRequest, VmSpec as PbVmSpec,
    WatchEventsRequest as PbWatchEventsRequest,
};
use output::{json, non_empty, print_event, print_status, replica_cell, table};
use std::io::Write;
use std::process::ExitCode;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

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
    /// The ftd answers but says it does not serve (it cannot reach etcd).
    #[error("ftd at {0} is not serving (it cannot reach etcd)")]
    NotServing(String),
}

impl CtlError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Usage(_) => ExitCode::from(2),
            CtlError::Connect { .. } | CtlError::NotServing(_) => ExitCode::from(69),
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

/// Writes ftctl's man page or completions to `out`.
fn generated(what: Generated, out: &mut impl Write) -> Result<(), CtlError> {
    use clap::CommandFactory;
    out.write_all(&ftvm_contract::manual::generate(Cli::command(), what, "1")?)?;
    Ok(())
}

/// Bytes of an image per upload message (under the ftd's 64 KiB request limit).
const UPLOAD_CHUNK: usize = 60 << 10;

/// Uploads the guest image `file` through the ftd of `client`; its SHA-256, checked
/// against the one computed here.
async fn upload_image(
    client: &FtControlClient<tonic::transport::Channel>,
    file: &std::path::Path,
) -> Result<String, CtlError> {
    let bytes = std::fs::read(file)
        .map_err(|err| CtlError::Usage(format!("--image {}: {err}", file.display())))?;
    let ours: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let chunks: Vec<PbImageChunk> = bytes
        .chunks(UPLOAD_CHUNK)
        .map(|data| PbImageChunk {
            data: data.to_vec(),
        })
        .collect();
    let answer = client
        .clone()
        .upload_image(tokio_stream::iter(chunks))
        .await?
        .into_inner();
    if answer.sha256 != ours || answer.size != bytes.len() as u64 {
        return Err(CtlError::Usage(format!(
            "the ftd stored {} bytes with sha256 {}, not {} bytes with sha256 {ours}",
            answer.size,
            answer.sha256,
            bytes.len()
        )));
    }
    Ok(ours)
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<(), CtlError> {
    let command = match cli.command {
        Command::Certs { action } => return certs::run(action, out),
        Command::Completions { shell } => {
            let what = match shell {
                cli::CompletionShell::Bash => Generated::Bash,
                cli::CompletionShell::Zsh => Generated::Zsh,
                cli::CompletionShell::Fish => Generated::Fish,
            };
            return generated(what, out);
        }
        Command::Generate { what } => return generated(what, out),
        command => command,
    };
    let channel = connect(&cli.endpoint, cli.tls_dir.as_deref(), cli.insecure).await?;
    let mut client = FtControlClient::new(channel.clone());
    match command {
        Command::Create(args) => {
            // Usage errors before the image goes up.
            let (disk, disk_mode, disk_size_bytes, disk_image) = disk_spec(&args)?;
            let mem_bytes = parse_size("--mem", &args.mem)?;
            let (image, image_sha256) = match (&args.image, &args.image_on_hosts) {
                (Some(file), _) => (String::new(), upload_image(&client, file).await?),
                (None, Some(path)) => (absolute(path), String::new()),
                (None, None) => return Err(CtlError::Usage("--image FILE is required".into())),
            };
            let spec = PbVmSpec {
                name: args.vm,
                image,
                image_sha256,
                mem_bytes,
                cmdline: args.cmdline,
                disk,
                net: args.net.as_deref().map(parse_net).transpose()?,
                hosts: args.hosts,
                disk_mode: disk_mode.into(),
                disk_size_bytes,
                disk_image,
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
            let vms = list_vms(&mut client).await?;
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
                            if host.drained { "yes" } else { "" }.to_owned(),
                            host.cpu_cell(),
                            host.bridge.clone().unwrap_or_else(|| "-".to_owned()),
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
                        "DRAINED",
                        "CPU",
                        "BRIDGE",
                    ],
                    &rows,
                )?;
                for host in &hosts {
                    for warning in &host.warnings {
                        writeln!(out, "warning: host {}: {warning}", host.name)?;
                    }
                }
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
        Command::RestartBackup { name, wait, to } => {
            let started = std::time::Instant::now();
            let before = get_vm(&mut client, &name).await?;
            let old_backup = before.replica("backup").map(|backup| backup.id);
            let to_host = to.clone().unwrap_or_default();
            let stopped = retry(|| {
                let mut client = client.clone();
                let (name, to_host) = (name.clone(), to_host.clone());
                async move {
                    client
                        .restart_backup(PbRestartBackupRequest { name, to_host })
                        .await
                }
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
                let vm = wait_for_vm(
                    &mut client,
                    &name,
                    started + std::time::Duration::from_secs(wait),
                    std::time::Duration::from_millis(100),
                    &format!("{name} is not protected by a new backup after {wait} s"),
                    |vm| {
                        let renewed = vm.replica("backup").is_some_and(|backup| {
                            Some(backup.id) != old_backup
                                && to.as_ref().is_none_or(|to| *to == backup.host)
                        });
                        renewed && vm.protection == "protected"
                    },
                )
                .await?;
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
        Command::Switchover { name, wait } => {
            let started = std::time::Instant::now();
            let before = get_vm(&mut client, &name).await?;
            let old_primary = before.replica("primary").map(|primary| primary.id);
            let old_backup = before.replica("backup").map(|backup| backup.id);
            let moved = retry(|| {
                let mut client = client.clone();
                let name = name.clone();
                async move { client.switchover(PbSwitchoverRequest { name }).await }
            })
            .await?;
            let (from, to) = (moved.from_host, moved.to_host);
            if wait == 0 {
                if cli.json {
                    json(
                        out,
                        &serde_json::json!({ "vm": name, "from_host": from, "to_host": to }),
                    )?;
                } else {
                    writeln!(
                        out,
                        "{name}: switching over: the primary on {from} hands over to the backup on {to}"
                    )?;
                }
            } else {
                let vm = wait_for_vm(
                    &mut client,
                    &name,
                    started + std::time::Duration::from_secs(wait),
                    std::time::Duration::from_millis(50),
                    &format!("{name} is not protected with its primary on {to} after {wait} s"),
                    |vm| {
                        let moved = vm.replica("primary").is_some_and(|primary| {
                            Some(primary.id) != old_primary && primary.host == to
                        });
                        // Protected by the new backup cloned after the switchover, not a
                        // protection recorded for the pair before it.
                        let new_backup = vm.replica("backup").is_some_and(|backup| {
                            ![old_primary, old_backup].contains(&Some(backup.id))
                                && backup.state == "running"
                        });
                        moved && new_backup && vm.protection == "protected"
                    },
                )
                .await?;
                let seconds = started.elapsed().as_secs_f64();
                let (primary, backup) = (vm.replica("primary"), vm.replica("backup"));
                if cli.json {
                    json(
                        out,
                        &serde_json::json!({ "vm": name, "from_host": from, "to_host": to, "seconds": seconds, "primary": primary, "backup": backup }),
                    )?;
                } else if let (Some(primary), Some(backup)) = (primary, backup) {
                    writeln!(out, "{name} switched over and is protected again after {seconds:.2} s: primary on {} (replica {}), backup on {} (replica {}, generation {})", primary.host, primary.id, backup.host, backup.id, backup.generation)?;
                }
            }
        }
        Command::Host { action } => match action {
            HostAction::Drain { host, wait } => {
                drain::drain(
                    &mut client,
                    &host,
                    std::time::Duration::from_secs(wait),
                    out,
                )
                .await?
            }
            HostAction::Undrain { host } => {
                drain::set(&mut client, &host, false).await?;
                writeln!(out, "host {host} takes replicas again")?;
            }
        },
        Command::Health => {
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            let serving = answer.status() == ServingStatus::Serving;
            let text = if serving { "serving" } else { "not serving" };
            if cli.json {
                json(out, &serde_json::json!({ "status": text }))?;
            } else {
                writeln!(out, "{text}")?;
            }
            if !serving {
                out.flush()?;
                return Err(CtlError::NotServing(cli.endpoint));
            }
        }
        Command::Certs { .. } | Command::Completions { .. } | Command::Generate { .. } => {
            unreachable!("handled before connecting")
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
    fn net_specs_need_a_mac_and_may_name_a_tap() {
        let net = parse_net("tap=tap0,mac=52:54:00:12:34:56,ip=10.0.0.2/24").expect("valid");
        assert_eq!((net.tap.as_str(), net.ip.as_str()), ("tap0", "10.0.0.2/24"));
        let managed = parse_net("mac=52:54:00:12:34:56").expect("valid");
        assert_eq!(managed.tap, "", "no tap: the hosts' ftds make them");
        assert!(parse_net("tap=tap0").is_err());
        assert!(parse_net("tap=tap0,mac=x,color=red").is_err());
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("--mem", "128M").ok(), Some(128 << 20));
        let bad = parse_size("--disk-size", "lots").expect_err("not a size");
        assert!(bad.to_string().starts_with("--disk-size 'lots'"), "{bad}");
    }

    /// The disk fields `ftctl create ARGS` would send, or its usage error.
    fn disk_of(args: &[&str]) -> Result<(String, ftvm_proto::v1::DiskMode, u64), String> {
        disk_and_image_of(args).map(|(disk, mode, size, _)| (disk, mode, size))
    }

    /// [`disk_of`] with the private disks' image.
    fn disk_and_image_of(
        args: &[&str],
    ) -> Result<(String, ftvm_proto::v1::DiskMode, u64, String), String> {
        use clap::Parser;
        let mut line = vec!["ftctl", "create", "--vm", "web1", "--image", "/kv.elf"];
        line.extend_from_slice(args);
        let cli = Cli::try_parse_from(line).map_err(|err| err.to_string())?;
        let Command::Create(create) = cli.command else {
            panic!("not a create")
        };
        disk_spec(&create).map_err(|err| {
            assert_eq!(err.exit_code(), ExitCode::from(2), "a usage error");
            err.to_string()
        })
    }

    #[test]
    fn private_disks_may_start_from_an_image_and_shared_ones_may_not() {
        use ftvm_proto::v1::DiskMode;
        assert_eq!(
            disk_and_image_of(&[
                "--disk-mode",
                "private",
                "--disk-size",
                "8G",
                "--disk-image",
                "/disks/base.img"
            ]),
            Ok((
                String::new(),
                DiskMode::Private,
                8 << 30,
                "/disks/base.img".to_owned()
            ))
        );
        let refused = disk_of(&[
            "--disk",
            "/disks/web1.img",
            "--disk-image",
            "/disks/base.img",
        ])
        .expect_err("an image for a shared disk");
        assert!(
            refused.contains("--disk-image is for --disk-mode private"),
            "{refused}"
        );
    }

    #[test]
    fn a_private_disk_takes_a_size_and_a_shared_one_a_path() {
        use ftvm_proto::v1::DiskMode;
        assert_eq!(
            disk_of(&["--disk-mode", "private", "--disk-size", "8G"]),
            Ok((String::new(), DiskMode::Private, 8 << 30))
        );
        assert_eq!(
            disk_of(&["--disk", "/disks/web1.img"]),
            Ok(("/disks/web1.img".to_owned(), DiskMode::Shared, 0))
        );
        assert_eq!(
            disk_of(&["--disk-mode", "shared"]),
            Ok((String::new(), DiskMode::Shared, 0)),
            "no disk at all"
        );
        for (args, why) in [
            (
                &["--disk-mode", "private"][..],
                "--disk-mode private needs --disk-size",
            ),
            (
                &[
                    "--disk-mode",
                    "private",
                    "--disk",
                    "/d.img",
                    "--disk-size",
                    "8G",
                ],
                "--disk is for --disk-mode shared",
            ),
            (
                &["--disk-size", "8G"],
                "--disk-size is for --disk-mode private",
            ),
            (
                &["--disk", "/d.img", "--disk-size", "8G"],
                "--disk-size is for --disk-mode private",
            ),
            (
                &["--disk-mode", "private", "--disk-size", "1000"],
                "a positive multiple of 512",
            ),
            (
                &["--disk-mode", "private", "--disk-size", "0"],
                "a positive multiple of 512",
            ),
            (
                &["--disk-mode", "private", "--disk-size", "big"],
                "--disk-size 'big' is not a size",
            ),
            (&["--disk-mode", "mirrored"], "invalid value 'mirrored'"),
        ] {
            let refused = disk_of(args).expect_err("refused");
            assert!(refused.contains(why), "{args:?}: {refused}");
        }
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
