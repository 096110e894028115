//! Starting a replica of a pair: a primary waits for its backup (or, after
//! `--backup-wait`, claims the pair and runs alone); a backup connects to its primary and
//! checks that the stream describes the machine it was given; a replica that will receive
//! a clone is built like a backup.

use crate::channel::{BackupChannel, ChannelError, Follower, PrimaryChannel, PEER_TIMEOUT};
use crate::golive::{GoLive, Halt, State};
use crate::view::PairView;
use ftvm_log::{LogError, LogReader};
use ftvm_machine::devices::virtio::block::SECTOR_SIZE;
use ftvm_machine::devices::virtio::net::Standby;
use ftvm_machine::inputs::Recorder;
use ftvm_machine::replay::{
    describe_mem, guest_ip, image_mismatch, parse_machine, ReplaySetupError,
};
use ftvm_machine::vm::{
    describe_machine, host_cpu, DiskConfig, DiskShape, InputsConfig, NetConfig, Vm, VmConfig,
    VmError,
};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

/// What a backup's NIC keeps of the frames arriving on its standby TAP, to hand to the
/// guest if it goes live: those since about when the primary was last heard from (it
/// goes live at least [`PEER_TIMEOUT`] after that when the primary falls silent), with
/// a margin for the frames in flight to a primary that was dying.
const STANDBY_KEEP: Duration = PEER_TIMEOUT.saturating_add(Duration::from_millis(50));

/// A replica of a pair cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The log channel cannot be set up (listen, accept, connect).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// An input file is missing or does not fit.
    #[error(transparent)]
    Replay(#[from] ReplaySetupError),
    /// The machine cannot start recording.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The primary's stream does not start with a usable header.
    #[error("the log from the primary at {addr}: {source}")]
    Stream {
        /// The primary's address.
        addr: String,
        /// What is wrong.
        #[source]
        source: LogError,
    },
    /// The primary runs another image or machine than this backup was given.
    #[error("the primary at {addr} runs {what}")]
    PrimaryMismatch {
        /// The primary's address.
        addr: String,
        /// What differs.
        what: String,
    },
    /// Receiving a clone failed.
    #[error(transparent)]
    Clone(#[from] crate::clone::CloneError),
    /// No backup connected in time and another replica holds the pair's go-live claim.
    #[error("no backup connected, and {winner} won the go-live claim: halting")]
    AloneLost {
        /// Who holds the claim.
        winner: String,
    },
    /// No backup connected in time and the arbiter could not be asked.
    #[error("no backup connected, and the arbiter cannot be reached ({0}): halting")]
    AloneNoArbiter(String),
}

/// Makes the live machine `vm` (built, not run) the primary of the pair `golive` belongs
/// to: waits on `listener` for the backup (for ever, or `backup_wait`), then streams its
/// log to it; held transmits leave on the machine's TAP. When no backup came in time the
/// primary claims the pair: won, it runs alone (unprotected) rather than never starting
/// its guest; lost or unanswered, it must halt.
pub fn start_primary(
    vm: &mut Vm,
    listener: &TcpListener,
    backup_wait: Option<Duration>,
    golive: Arc<GoLive>,
    view: &PairView,
) -> Result<(), SetupError> {
    match PrimaryChannel::accept(listener, vm.tap_for_pair(), backup_wait, golive.clone()) {
        Ok((channel, writer)) => {
            view.join(golive, channel.stats_source(), false);
            let recorder =
                Recorder::streaming(Box::new(channel), Box::new(writer), vm.identity().clone())
                    .map_err(VmError::Record)?;
            vm.record_to(recorder)?;
            Ok(())
        }
        Err(ChannelError::NoBackup { waited }) => {
            let why = format!("no backup connected within {} s", waited.as_secs());
            match golive.peer_lost(&why, false) {
                State::Live => Ok(()),
                State::Halted(Halt::LostTo(winner)) => Err(SetupError::AloneLost { winner }),
                State::Halted(Halt::Unreachable(why)) => Err(SetupError::AloneNoArbiter(why)),
                other => Err(SetupError::AloneNoArbiter(format!(
                    "the claim is {}",
                    other.as_str()
                ))),
            }
        }
        Err(err) => Err(err.into()),
    }
}

/// Turns `config` (the machine a replica was asked to run, as for a primary) into the
/// backup of the primary at `addr`: connects, reads the stream's header and checks that
/// it describes the same machine (image, memory, command line, devices); then the devices
/// replay (the disk is never opened, the NIC has no TAP) and inputs come from the stream.
pub fn backup_config(
    mut config: VmConfig,
    addr: &str,
    golive: Arc<GoLive>,
    view: &PairView,
) -> Result<VmConfig, SetupError> {
    let (channel, stream) = BackupChannel::connect(addr, golive.pair())?;
    let stream: Box<dyn std::io::Read + Send> = Box::new(stream);
    let reader = LogReader::new(stream).map_err(|source| SetupError::Stream {
        addr: addr.to_owned(),
        source,
    })?;
    let header = reader.header().clone();
    let mismatch = |what: String| SetupError::PrimaryMismatch {
        addr: addr.to_owned(),
        what,
    };
    if let Some(what) = image_mismatch(&config.image, &header)? {
        return Err(mismatch(what));
    }
    if header.mem_size != config.mem_size {
        return Err(mismatch(format!(
            "with {} of memory, not {}",
            describe_mem(header.mem_size),
            describe_mem(config.mem_size)
        )));
    }
    if header.cmdline != config.cmdline {
        return Err(mismatch(format!(
            "the command line [{}], not [{}]",
            header.cmdline, config.cmdline
        )));
    }
    let sectors = match &config.disk {
        Some(
            DiskConfig::File(path)
            | DiskConfig::CachedFile(path)
            | DiskConfig::Private(path)
            | DiskConfig::Overlay(path),
        ) => {
            let len = std::fs::metadata(path)
                .map_err(|source| ReplaySetupError::Open {
                    path: path.clone(),
                    source,
                })?
                .len();
            Some(len / SECTOR_SIZE)
        }
        Some(DiskConfig::Replay { sectors } | DiskConfig::Standby { sectors, .. }) => {
            Some(*sectors)
        }
        None => None,
    };
    // The guest must see the same CPU on both hosts, or the replay could diverge.
    let cpu = host_cpu()?;
    let theirs = parse_machine(&header).map_err(&mismatch)?.cpu;
    if let Some(theirs) = theirs.filter(|theirs| *theirs != cpu.word()) {
        return Err(mismatch(format!(
            "on another CPU ({theirs}); this host's guests see {cpu}"
        )));
    }
    let private = matches!(
        config.disk,
        Some(DiskConfig::Private(_) | DiskConfig::Overlay(_))
    );
    let machine = describe_machine(
        config.net.as_ref().map(|net| net.mac),
        sectors.map(|sectors| DiskShape { sectors, private }),
        Some(&cpu.word()),
    );
    if header.machine != machine {
        return Err(mismatch(format!(
            "the devices [{}], not [{machine}]",
            header.machine
        )));
    }
    // The backup replays without the shared disk and the TAP, and takes them over if it
    // goes live; a private disk is its own from the start.
    config.disk = match (sectors, config.disk.take()) {
        (_, Some(DiskConfig::Private(path))) => Some(DiskConfig::Private(path)),
        (Some(sectors), Some(DiskConfig::File(path) | DiskConfig::CachedFile(path))) => {
            Some(DiskConfig::Standby { sectors, path })
        }
        (Some(sectors), _) => Some(DiskConfig::Replay { sectors }),
        (None, _) => None,
    };
    let ip = guest_ip(&config.cmdline);
    config.net = config.net.map(|net| NetConfig {
        tap: None,
        mac: net.mac,
        standby: net.tap.map(|tap| Standby {
            tap,
            ip,
            keep: STANDBY_KEEP,
        }),
    });
    view.join(golive.clone(), channel.stats_source(), false);
    config.inputs = InputsConfig::Backup {
        reader,
        link: Box::new(Follower::new(channel, golive)),
    };
    Ok(config)
}

/// Turns `config` (the machine a replica was asked to run) into a machine ready to
/// receive a clone (`--clone-from`): devices as on a backup (the disk and the TAP taken
/// over only if it goes live), inputs live until the clone's log replaces them.
pub fn clone_backup_config(mut config: VmConfig) -> VmConfig {
    config.disk = match config.disk.take() {
        Some(DiskConfig::File(path) | DiskConfig::CachedFile(path)) => {
            let sectors = std::fs::metadata(&path).map_or(0, |meta| meta.len() / SECTOR_SIZE);
            Some(DiskConfig::Standby { sectors, path })
        }
        other => other,
    };
    let ip = guest_ip(&config.cmdline);
    config.net = config.net.map(|net| NetConfig {
        tap: None,
        mac: net.mac,
        standby: net.tap.map(|tap| Standby {
            tap,
            ip,
            keep: STANDBY_KEEP,
        }),
    });
    config.inputs = InputsConfig::Live;
    config
}
