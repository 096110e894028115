//! The new backup's side of a clone (`--clone-from`): a machine built from the backup's
//! flags, not run, receives the running primary's state, then follows its log as the
//! backup of the next generation.

use super::CloneError;
use crate::channel::resume::Hello;
use crate::channel::{BackupChannel, ChannelError, Follower};
use crate::golive::GoLive;
use crate::setup::SetupError;
use crate::view::PairView;
use ftvm_machine::snapshot::machine::{machine_mismatch, SnapshotReport};
use ftvm_machine::snapshot::SnapshotError;
use ftvm_machine::vm::{Vm, VmError};
use std::io::Write;
use std::sync::Arc;

/// Makes `vm` (freshly built, inputs live) the clone of the primary whose clone listener
/// is at `addr`, then the backup of its pair `generation`, going live as `golive` decides.
pub fn receive_clone(
    vm: &mut Vm,
    addr: &str,
    generation: u64,
    golive: Arc<GoLive>,
    view: &PairView,
) -> Result<SnapshotReport, SetupError> {
    if !vm.is_fresh() || !vm.is_live() {
        return Err(VmError::SnapshotRefused(
            "a clone is received only by a machine built for it that has not run",
        )
        .into());
    }
    let connect_error = |source| ChannelError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let mut socket = crate::channel::connect(addr)?;
    socket
        .write_all(&Hello::new_backup(golive.pair()).encode())
        .map_err(connect_error)?;
    if vm.digests().mem_every_exits > 0 {
        vm.enable_dirty_log()?;
    }
    let machine = vm.identity().clone();
    let disk = vm.private_disk();
    let (report, resume) = super::receive(
        vm.snapshot_parts(),
        &machine,
        generation,
        &mut socket,
        disk.as_ref(),
    )?;
    let session = crate::channel::read_session(&socket).map_err(connect_error)?;
    // A broken connection is re-established at the clone listener, which hands it to the
    // primary's log channel.
    let (channel, stream) = BackupChannel::start(socket, session, Some(addr.to_owned()))?;
    let reader = ftvm_log::LogReader::new(Box::new(stream) as Box<dyn std::io::Read + Send>)
        .map_err(|err| {
            CloneError::Snapshot(SnapshotError::Mismatch(format!(
                "the log after the clone: {err}"
            )))
        })?;
    if let Some(what) = machine_mismatch(reader.header(), &machine) {
        return Err(CloneError::Snapshot(SnapshotError::Mismatch(what)).into());
    }
    view.join(golive.clone(), channel.stats_source(), false);
    vm.follow(reader, Box::new(Follower::new(channel, golive)), resume);
    Ok(report)
}
