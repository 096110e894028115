//! `ftctl host drain`: the host is marked drained (the leader places nothing new there),
//! then its replicas are moved one VM at a time: a backup there is replaced by a clone
//! elsewhere (restart-backup), a primary there hands over to its backup (switchover),
//! whose new backup then lands elsewhere too. Only protected VMs are touched, each once
//! per replica; the others are waited for (they are healing, or cannot be moved: the
//! wait runs out and says which). Like `kubectl drain`, it runs in the client: run it
//! again to go on after an interruption.

use super::client::{list_vms, retry};
use super::output::VmOut;
use super::CtlError;
use ftvm_proto::v1::ft_control_client::FtControlClient;
use ftvm_proto::v1::{
    RestartBackupRequest as PbRestartBackupRequest, SetHostDrainRequest as PbSetHostDrainRequest,
    SwitchoverRequest as PbSwitchoverRequest,
};
use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// Marks `host` drained or not.
pub(crate) async fn set(
    client: &mut FtControlClient<Channel>,
    host: &str,
    drained: bool,
) -> Result<(), CtlError> {
    retry(|| {
        let mut client = client.clone();
        let host = host.to_owned();
        async move {
            client
                .set_host_drain(PbSetHostDrainRequest { host, drained })
                .await
        }
    })
    .await
    .map(|_| ())
}

/// The VMs with a replica on `host`, and which.
fn on_host<'a>(vms: &'a [VmOut], host: &str) -> Vec<(&'a VmOut, &'static str)> {
    vms.iter()
        .flat_map(|vm| {
            vm.replicas
                .iter()
                .filter(move |replica| replica.host == host && replica.state != "exited")
                .map(move |replica| (vm, replica.role))
        })
        .collect()
}

/// Drains `host`: marks it, then moves its replicas until none is left or `wait` runs
/// out; prints a line for each step.
pub(crate) async fn drain(
    client: &mut FtControlClient<Channel>,
    host: &str,
    wait: Duration,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    set(client, host, true).await?;
    writeln!(out, "host {host} is drained: no new replica goes there")?;
    if wait.is_zero() {
        return Ok(());
    }
    let started = Instant::now();
    // (vm, replica number) already asked to move: asked once.
    let mut asked: BTreeSet<(String, u64)> = BTreeSet::new();
    loop {
        let vms = list_vms(client).await?;
        let left = on_host(&vms, host);
        if left.is_empty() {
            writeln!(
                out,
                "host {host} is empty after {:.1} s: no replica runs there",
                started.elapsed().as_secs_f64()
            )?;
            out.flush()?;
            return Ok(());
        }
        if started.elapsed() >= wait {
            let names: Vec<String> = left
                .iter()
                .map(|(vm, role)| format!("{} ({role}, {})", vm.name, vm.protection_text()))
                .collect();
            return Err(CtlError::Timeout(format!(
                "replicas still on {host} after {} s: {}",
                wait.as_secs(),
                names.join(", ")
            )));
        }
        for (vm, role) in left {
            let Some(replica) = vm.replica(role) else {
                continue;
            };
            if vm.protection != "protected" || !asked.insert((vm.name.clone(), replica.id)) {
                continue;
            }
            let name = vm.name.clone();
            let moved = if role == "primary" {
                let answer = retry(|| {
                    let mut client = client.clone();
                    let name = name.clone();
                    async move { client.switchover(PbSwitchoverRequest { name }).await }
                })
                .await;
                answer.map(|moved| {
                    format!(
                        "{name}: switching over: the primary on {host} hands over to the backup on {}",
                        moved.to_host
                    )
                })
            } else {
                retry(|| {
                    let mut client = client.clone();
                    let name = name.clone();
                    async move {
                        client
                            .restart_backup(PbRestartBackupRequest {
                                name,
                                to_host: String::new(),
                            })
                            .await
                    }
                })
                .await
                .map(|_| format!("{name}: the backup on {host} is replaced by a clone elsewhere"))
            };
            match moved {
                Ok(line) => writeln!(out, "{line}")?,
                // Changed under us (healing, another switchover): looked at again later.
                Err(CtlError::Rpc(status)) if status.code() == Code::FailedPrecondition => {
                    asked.remove(&(name, replica.id));
                }
                Err(err) => return Err(err),
            }
            out.flush()?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
