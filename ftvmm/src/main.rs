//! `ftvmm`: command-line front end of the ftvm VMM. See `ftvmm --help`.

use clap::{Parser, Subcommand};
use ftvmm::channel::{ChannelError, ChannelStats};
use ftvmm::control::{ControlError, ControlServer, Identity, Role as ControlRole};
use ftvmm::devices::serial::Console;
use ftvmm::devices::virtio::block::BlockError;
use ftvmm::devices::virtio::net::MacAddress;
use ftvmm::devices::virtio::tap::TapError;
use ftvmm::ftlog::LogError;
use ftvmm::inputs::ReplayStop;
use ftvmm::loader::LoadError;
use ftvmm::replay::{backup_config, replay_config, ReplaySetupError};
use ftvmm::vm::{
    DigestConfig, DiskConfig, InputsConfig, NetConfig, Vm, VmConfig, VmError, VmOutcome,
};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status of a replay that diverged from its log.
const EXIT_DIVERGED: u8 = 1;
/// Exit status of a replay whose log ends without an end frame (all of it matched).
const EXIT_LOG_INCOMPLETE: u8 = 3;
/// Exit status for a usage error.
const EXIT_USAGE: u8 = 64;
/// Exit status for an image that is not a valid ELF for this machine.
const EXIT_BAD_IMAGE: u8 = 65;
/// Exit status for an input file that cannot be opened.
const EXIT_NO_INPUT: u8 = 66;
/// Exit status for a guest crash.
const EXIT_GUEST_CRASHED: u8 = 70;
/// Exit status for a VMM or host failure (and for a backup that diverged).
const EXIT_VMM_FAILED: u8 = 71;
/// Exit status of a backup whose primary was lost (no go-live yet: it stops there).
const EXIT_PRIMARY_LOST: u8 = 73;
/// Exit status of a replica that lost the go-live claim to its peer and halted.
const EXIT_LOST_GO_LIVE: u8 = 72;
/// Exit status of a new backup whose clone request was refused (the replica is not
/// running alone yet, or is busy with another clone): try again later.
const EXIT_CLONE_REFUSED: u8 = 75;

#[derive(Parser)]
#[command(
    name = "ftvmm",
    version,
    about = "Run one ftvm replica: a KVM VM with an FT-ready guest"
)]
struct Cli {
    /// Log level for ftvmm's own messages on stderr (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "FTVMM_LOG")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest image and run it until it powers off or crashes.
    Run(Box<RunArgs>),
    /// Re-execute a recorded run from its log and check that it is identical.
    Replay(ReplayArgs),
    /// Work with log files.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The guest image the log was recorded with.
    #[arg(long)]
    image: PathBuf,
    /// The log written by `ftvmm run --record`.
    #[arg(long)]
    log: PathBuf,
    /// A copy of the initial disk (optional: disk reads come from the log; never written).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Where the replayed guest's console goes: '-' for stdout, 'none', or a file path.
    #[arg(long, default_value = "none")]
    console: String,
    /// A registers digest is checked every this many exits (must match the recording).
    #[arg(long, default_value_t = DigestConfig::default().regs_every_exits)]
    digest_every: u64,
    /// A dirty-memory digest is checked every this many exits (must match the recording).
    #[arg(long, default_value_t = DigestConfig::default().mem_every_exits)]
    mem_digest_every: u64,
    /// Start from this snapshot (`run --snapshot-out`); the log is the continuation that
    /// `run --snapshot-record` wrote.
    #[arg(long, value_name = "PATH")]
    snapshot: Option<PathBuf>,
}

#[derive(Subcommand)]
enum LogCommand {
    /// Summarize a log: event counts and bytes by kind, ordinal range; optionally dump events.
    Inspect {
        /// The log file.
        log: PathBuf,
        /// Dump the events from this exit ordinal on.
        #[arg(long)]
        from: Option<u64>,
        /// Dump the events up to this exit ordinal.
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The guest: a static x86-64 ELF executable (see docs/machine.md).
    #[arg(long)]
    image: PathBuf,
    /// Guest RAM, e.g. 64M or 1G (2M..3G).
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    mem: u64,
    /// Command line handed to the guest through the boot info page.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Where the guest console (COM1) goes: '-' for stdout, 'none', or a file path.
    #[arg(long, default_value = "-")]
    console: String,
    /// Print exit counters and memory use to stderr when the guest stops.
    #[arg(long)]
    stats: bool,
    /// Disk image for the virtio-blk device (a file, a multiple of 512 bytes).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// TAP interface for the virtio-net device (must exist in ftvmm's network namespace).
    #[arg(long, requires = "mac")]
    tap: Option<String>,
    /// The guest NIC's MAC address, e.g. 52:54:00:12:34:56 (needs --tap, except on a
    /// backup, which has no TAP while it follows its primary).
    #[arg(long)]
    mac: Option<MacAddress>,
    /// The guest's IPv4 address and prefix, e.g. 10.77.0.2/24; passed to the guest as `ip=`.
    #[arg(long, value_parser = parse_cidr)]
    ip: Option<String>,
    /// The guest's default gateway; passed to the guest as `gw=`.
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Record every nondeterministic input to this log file (see `ftvmm replay`).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Role in an FT pair: a primary streams its log to the backup (--log-listen); a backup
    /// executes the same guest from that log as it arrives (--log-connect) and emits no
    /// output. Both must be given the same image, --mem, --cmdline, --disk, --mac and
    /// digest periods.
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// Primary: the address the backup connects to for the log, e.g. 0.0.0.0:7700. The
    /// guest starts once the backup is connected.
    #[arg(long, value_name = "ADDR")]
    log_listen: Option<String>,
    /// Primary: how long to wait for the backup, in seconds (0: for ever). When none came,
    /// the primary claims the pair's go-live and, if it wins, runs its guest unprotected;
    /// if another replica holds the claim it halts (72), and if the arbiter cannot be
    /// reached it halts without output (73).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    backup_wait: u64,
    /// Backup: the primary's --log-listen address (tried for 10 s).
    #[arg(long, value_name = "ADDR")]
    log_connect: Option<String>,
    /// The VM's name: with --generation it scopes the go-live claim of the pair.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The pair's generation (a new pair made after a failover gets the next one).
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// Who decides which replica goes live when the other is lost: local:DIR (replicas on
    /// one machine) or etcd://HOST:PORT.
    #[arg(long, default_value = "local:/run/ftvm/arbiter")]
    arbiter: String,
    /// With --record or --role: log a registers digest every this many exits (0: only at
    /// the end).
    #[arg(long, default_value_t = DigestConfig::default().regs_every_exits)]
    digest_every: u64,
    /// With --record or --role: log a digest of the pages the guest dirtied every this many
    /// exits (0: only the full memory digest at the end).
    #[arg(long, default_value_t = DigestConfig::default().mem_every_exits)]
    mem_digest_every: u64,
    /// Serve the control socket here (requests `status`, `metrics`, `stop`; see
    /// docs/contract.md). A stale socket file is replaced; the file is removed at exit.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Take a snapshot of the machine at the first point between exits, with the guest
    /// running, at or after this exit ordinal (needs --snapshot-out); the guest then
    /// continues.
    #[arg(long, value_name = "ORDINAL", requires = "snapshot_out")]
    snapshot_at: Option<u64>,
    /// Where --snapshot-at writes the snapshot.
    #[arg(long, value_name = "PATH", requires = "snapshot_at")]
    snapshot_out: Option<PathBuf>,
    /// Record the run from the snapshot on to this log (replay it with `ftvmm replay
    /// --snapshot`).
    #[arg(long, value_name = "PATH", requires = "snapshot_at")]
    snapshot_record: Option<PathBuf>,
    /// Start the guest from this snapshot instead of booting it (the machine flags must be
    /// those of the snapshotted run).
    #[arg(long, value_name = "PATH")]
    restore: Option<PathBuf>,
    /// Accept a new backup here while this replica runs alone (no backup yet, or after
    /// its peer was lost): it is cloned from the running guest and the pair becomes
    /// generation --generation + 1. Needs --vm.
    #[arg(long, value_name = "ADDR")]
    clone_listen: Option<String>,
    /// Backup: become a clone of the running primary whose --clone-listen is ADDR, then
    /// follow its log (instead of --log-connect). --generation is the new pair's.
    #[arg(long, value_name = "ADDR")]
    clone_from: Option<String>,
}

/// A replica's role in an FT pair.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// Runs the guest live and streams its log to the backup.
    Primary,
    /// Follows the primary's log.
    Backup,
}

impl RunArgs {
    /// Checks the flag combinations clap cannot express; the message is a usage error.
    fn check(&self) -> Result<(), &'static str> {
        match (self.role, &self.log_listen, &self.log_connect) {
            (Some(Role::Primary), None, _) => return Err("--role primary needs --log-listen ADDR"),
            (Some(Role::Backup), _, None) if self.clone_from.is_none() => {
                return Err("--role backup needs --log-connect ADDR or --clone-from ADDR")
            }
            (Some(Role::Primary), _, Some(_)) => {
                return Err("--log-connect is for a backup, not for --role primary")
            }
            (Some(Role::Backup), Some(_), _) => {
                return Err("--log-listen is for a primary, not for --role backup")
            }
            (None, Some(_), _) => return Err("--log-listen needs --role primary"),
            (None, _, Some(_)) => return Err("--log-connect needs --role backup"),
            _ => {}
        }
        if self.clone_from.is_some() && self.role != Some(Role::Backup) {
            return Err("--clone-from needs --role backup");
        }
        if self.clone_from.is_some() && self.log_connect.is_some() {
            return Err("--clone-from and --log-connect cannot be combined");
        }
        if self.clone_listen.is_some() && self.vm.is_none() {
            return Err(
                "--clone-listen needs --vm NAME (the new pair's go-live claim is scoped to it)",
            );
        }
        if self.clone_listen.is_some() && self.record.is_some() {
            return Err("--clone-listen cannot be combined with --record");
        }
        if self.role.is_some() && self.vm.is_none() {
            return Err("--role needs --vm NAME (the pair's go-live claim is scoped to it)");
        }
        if self.role.is_some() && self.record.is_some() {
            return Err(
                "--record cannot be combined with --role (the pair's log goes to the backup)",
            );
        }
        if (self.snapshot_at.is_some() || self.restore.is_some())
            && (self.role.is_some() || self.record.is_some())
        {
            return Err("--snapshot-at and --restore cannot be combined with --role or --record (use --snapshot-record for the log after a snapshot)");
        }
        if self.mac.is_some() && self.tap.is_none() && self.role != Some(Role::Backup) {
            return Err("--mac needs --tap (only a backup has a NIC without a TAP)");
        }
        Ok(())
    }
}

fn parse_cidr(text: &str) -> Result<String, String> {
    let bad = || format!("'{text}' is not an IPv4 address with prefix length, like 10.77.0.2/24");
    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
    addr.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?;
    prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(bad)?;
    Ok(text.to_owned())
}

fn parse_mem(text: &str) -> Result<u64, String> {
    ftvmm::size::parse_mem_size(text).map_err(|err| err.to_string())
}

fn open_console(target: &str) -> Result<Console, std::io::Error> {
    match target {
        "none" => Ok(Console::Sink),
        "-" => {
            use std::os::fd::AsFd;
            Ok(Console::File(
                std::io::stdout().as_fd().try_clone_to_owned()?.into(),
            ))
        }
        path => Ok(Console::File(std::fs::File::create(path)?)),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err)
            if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            let _ = err.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(err) => {
            // Clap spreads one error over several lines; keep the message, drop the usage.
            let rendered = err.to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            eprintln!(
                "ftvmm: {} (see 'ftvmm --help')",
                message.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Replay(args) => replay(args),
        Command::Log(LogCommand::Inspect { log, from, to }) => inspect_log(&log, from, to),
    }
}

fn run(args: RunArgs) -> ExitCode {
    if let Err(message) = args.check() {
        eprintln!("ftvmm: {message} (see 'ftvmm --help')");
        return ExitCode::from(EXIT_USAGE);
    }
    // Before anything slow (a primary waits for its backup while booting), so that the
    // socket answers `state=booting` then; removed when `control` is dropped.
    let control = match &args.control {
        Some(path) => match start_control(path, &args) {
            Ok(control) => Some(control),
            Err(err) => {
                eprintln!("ftvmm: {} (see 'ftvmm --help')", one_line(&err));
                return ExitCode::from(if matches!(err, ControlError::Spawn(_)) {
                    EXIT_VMM_FAILED
                } else {
                    EXIT_USAGE
                });
            }
        },
        None => None,
    };
    let console = match open_console(&args.console) {
        Ok(console) => console,
        Err(err) => {
            eprintln!("ftvmm: cannot open console {}: {err}", args.console);
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let mut cmdline = args.cmdline;
    for (key, value) in [
        ("ip", args.ip),
        ("gw", args.gateway.map(|gw| gw.to_string())),
    ] {
        if let Some(value) = value {
            cmdline = format!("{cmdline} {key}={value}").trim_start().to_owned();
        }
    }
    let inputs = match (&args.record, &args.log_listen) {
        (Some(path), _) => InputsConfig::Record(path.clone()),
        (None, Some(addr)) => match ftvmm::channel::listen(addr) {
            Ok(listener) => {
                let alone = match args.vm.as_deref() {
                    Some(name) => {
                        match failover(&args.arbiter, name, args.generation, Role::Primary) {
                            Ok(failover) => Some(failover),
                            Err(err) => {
                                eprintln!("ftvmm: {}", one_line(&err));
                                return ExitCode::from(EXIT_USAGE);
                            }
                        }
                    }
                    None => None,
                };
                InputsConfig::Primary(ftvmm::vm::PrimaryInputs {
                    listener,
                    backup_wait: (args.backup_wait > 0)
                        .then(|| std::time::Duration::from_secs(args.backup_wait)),
                    alone,
                })
            }
            Err(err) => {
                eprintln!("ftvmm: {}", one_line(&err));
                let malformed = matches!(&err, ChannelError::Listen { source, .. }
                    if source.kind() == std::io::ErrorKind::InvalidInput);
                return ExitCode::from(if malformed {
                    EXIT_USAGE
                } else {
                    EXIT_VMM_FAILED
                });
            }
        },
        (None, None) => InputsConfig::Live,
    };
    let mut config = VmConfig {
        image: args.image,
        mem_size: args.mem,
        cmdline,
        console,
        disk: args.disk.map(DiskConfig::File),
        net: args.mac.map(|mac| NetConfig {
            tap: args.tap.clone(),
            mac,
            standby: None,
        }),
        inputs,
        digests: DigestConfig {
            regs_every_exits: args.digest_every,
            mem_every_exits: args.mem_digest_every,
        },
    };
    let clone_listener = match &args.clone_listen {
        Some(addr) => match ftvmm::channel::listen(addr) {
            Ok(listener) => Some(listener),
            Err(err) => {
                eprintln!("ftvmm: {}", one_line(&err));
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => None,
    };
    if args.clone_from.is_some() {
        config = ftvmm::replay::clone_backup_config(config);
    }
    if let Some(addr) = &args.log_connect {
        config = match backup_config(config, addr) {
            Ok(config) => config,
            Err(err) => {
                eprintln!("ftvmm: {}", one_line(&err));
                return ExitCode::from(match err {
                    ReplaySetupError::Open { .. } | ReplaySetupError::Channel(_) => EXIT_NO_INPUT,
                    _ => EXIT_BAD_IMAGE,
                });
            }
        };
    }
    let started = std::time::Instant::now();
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(err) => return report_vmm_error(&err),
    };
    if let Some(addr) = &args.clone_from {
        let cloned = std::time::Instant::now();
        match vm.receive_clone(addr, args.generation) {
            Ok(report) => eprintln!("{}", snapshot_line("cloned", &report, cloned.elapsed())),
            Err(err) => {
                eprintln!("ftvmm: cloning from {addr}: {}", one_line(&err));
                return ExitCode::from(match err {
                    VmError::Channel(_) => EXIT_NO_INPUT,
                    VmError::Clone(ftvmm::clone::CloneError::Io(_)) => EXIT_PRIMARY_LOST,
                    VmError::Clone(ftvmm::clone::CloneError::Refused) => EXIT_CLONE_REFUSED,
                    VmError::Clone(_) => EXIT_BAD_IMAGE,
                    _ => EXIT_VMM_FAILED,
                });
            }
        }
    }
    if let (Some(listener), Some(name)) = (clone_listener, &args.vm) {
        let next = args.generation + 1;
        if let Err(err) = failover(&args.arbiter, name, next, Role::Primary) {
            eprintln!("ftvmm: {}", one_line(&err));
            return ExitCode::from(EXIT_USAGE);
        }
        let (arbiter, name) = (args.arbiter.clone(), name.clone());
        let claim_for = Box::new(move |generation| {
            failover(&arbiter, &name, generation, Role::Primary)
                .inspect_err(|err| tracing::error!("clone: no go-live claim: {err}"))
                .ok()
        });
        if let Err(err) = vm.accept_clones(listener, next, claim_for) {
            return report_vmm_error(&err);
        }
    }
    if let (Some(role), Some(name)) = (args.role, &args.vm) {
        let failover = match failover(&args.arbiter, name, args.generation, role) {
            Ok(failover) => failover,
            Err(err) => {
                eprintln!("ftvmm: {}", one_line(&err));
                return ExitCode::from(EXIT_USAGE);
            }
        };
        vm.set_failover(failover);
    }
    if let Some(control) = &control {
        control.set_memory(vm.memory().clone());
        vm.set_publisher(control.publisher());
    }
    if let Err(err) = ftvmm::signals::install_stop_handlers() {
        eprintln!("ftvmm: cannot install signal handlers: {err}");
        return ExitCode::from(EXIT_VMM_FAILED);
    }
    if let Some(path) = &args.restore {
        if let Err(code) = restore_snapshot(&mut vm, path) {
            return code;
        }
    }
    let outcome = match (args.snapshot_at, &args.snapshot_out) {
        (Some(at), Some(path)) => match vm.run_until(at) {
            Ok(Some(outcome)) => {
                eprintln!("ftvmm: the run ended at exit ordinal {} before the snapshot at {at}: no snapshot taken", vm.exit_ordinal());
                Ok(outcome)
            }
            Ok(None) => {
                if let Err(code) = save_snapshot(&mut vm, path, args.snapshot_record.as_deref()) {
                    return code;
                }
                vm.run()
            }
            Err(err) => Err(err),
        },
        _ => vm.run(),
    };
    if args.stats {
        print_stats(&vm, args.role);
    }
    if args.role == Some(Role::Backup) {
        return report_backup(&vm, outcome, started);
    }
    match outcome {
        Ok(VmOutcome::PowerOff(code)) => ExitCode::from(code),
        Ok(VmOutcome::Crashed(report)) => {
            eprintln!("ftvmm: {report}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::LostGoLive { winner })) => {
            eprintln!("ftvmm: the backup was lost and {winner} won the go-live claim: halting");
            ExitCode::from(EXIT_LOST_GO_LIVE)
        }
        Ok(VmOutcome::ReplayStopped(stop)) => {
            eprintln!("ftvmm: {stop}");
            ExitCode::from(EXIT_VMM_FAILED)
        }
        Ok(VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal)) => {
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Err(err) => report_vmm_error(&err),
    }
}

/// What a replay did, for the one-line verdicts of `replay` and of a backup.
fn replay_summary(vm: &Vm, started: std::time::Instant) -> String {
    let stats = vm.replay_stats();
    format!(
        "{} exits replayed, {} events applied, {} digests matched, {:.3} s",
        vm.exit_ordinal(),
        stats.events,
        stats.digests_matched,
        started.elapsed().as_secs_f64()
    )
}

/// A backup's verdict: the guest's outcome if it ended as on the primary, 73 if the
/// primary was lost (everything it sent was replayed), 71 on divergence.
fn report_backup(
    vm: &Vm,
    outcome: Result<VmOutcome, VmError>,
    started: std::time::Instant,
) -> ExitCode {
    let summary = replay_summary(vm, started);
    let outcome = match outcome {
        Ok(VmOutcome::ReplayStopped(_)) if ftvmm::signals::stop_requested().is_some() => Ok(
            VmOutcome::Signalled(ftvmm::signals::stop_requested().unwrap_or(0)),
        ),
        other => other,
    };
    if let Some(ordinal) = vm.went_live_at() {
        // After go-live this replica is the VM: report like a live run.
        let how = match &outcome {
            Ok(VmOutcome::PowerOff(code)) => format!("the guest powered off with code {code}"),
            Ok(other) => format!("{other:?}"),
            Err(err) => one_line(err),
        };
        eprintln!("ftvmm backup: WENT LIVE at exit ordinal {ordinal} after the primary was lost; then {how} ({summary})");
        return match outcome {
            Ok(VmOutcome::PowerOff(code)) => ExitCode::from(code),
            Ok(VmOutcome::Crashed(_)) => ExitCode::from(EXIT_GUEST_CRASHED),
            Ok(VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal)) => {
                ExitCode::from(128u8.saturating_add(signal as u8))
            }
            Ok(VmOutcome::ReplayStopped(_)) | Err(_) => ExitCode::from(EXIT_VMM_FAILED),
        };
    }
    match outcome {
        Ok(VmOutcome::PowerOff(code)) => {
            eprintln!("ftvmm backup: IDENTICAL: guest powered off with code {code} at the primary's exit, final state digest equal ({summary})");
            ExitCode::from(code)
        }
        Ok(VmOutcome::Crashed(report)) => {
            eprintln!("ftvmm backup: IDENTICAL: the guest crashed as on the primary: {report}, final state digest equal ({summary})");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Ok(VmOutcome::ReplayStopped(
            ReplayStop::LogEnded { .. }
            | ReplayStop::BadLog(LogError::Truncated { .. } | LogError::Io(_)),
        )) => {
            let why = vm
                .channel_stats()
                .and_then(|stats| stats.lost)
                .unwrap_or_else(|| "the log stream ended".into());
            eprintln!(
                "ftvmm backup: primary lost at exit ordinal {}: everything up to there replayed ({why}; {summary})",
                vm.exit_ordinal()
            );
            ExitCode::from(EXIT_PRIMARY_LOST)
        }
        Ok(VmOutcome::ReplayStopped(stop @ ReplayStop::LostGoLive { .. })) => {
            eprintln!("ftvmm backup: {stop} ({summary})");
            ExitCode::from(EXIT_LOST_GO_LIVE)
        }
        Ok(VmOutcome::ReplayStopped(stop @ ReplayStop::ArbiterUnreachable(_))) => {
            eprintln!("ftvmm backup: {stop} ({summary})");
            ExitCode::from(EXIT_PRIMARY_LOST)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::Diverged(divergence))) => {
            eprintln!("ftvmm backup: DIVERGED: {divergence} ({summary})");
            ExitCode::from(EXIT_VMM_FAILED)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::BadLog(err))) => {
            eprintln!("ftvmm backup: the primary's log: {err} ({summary})");
            ExitCode::from(EXIT_BAD_IMAGE)
        }
        Ok(VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal)) => {
            eprintln!("ftvmm backup: stopped by signal {signal} ({summary})");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Err(err) => report_vmm_error(&err),
    }
}

fn replay(args: ReplayArgs) -> ExitCode {
    let console = match open_console(&args.console) {
        Ok(console) => console,
        Err(err) => {
            eprintln!("ftvmm: cannot open console {}: {err}", args.console);
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let mut config = match replay_config(&args.image, &args.log, args.disk.as_deref(), console) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ftvmm: {}", one_line(&err));
            return ExitCode::from(match err {
                ReplaySetupError::Open { .. } => EXIT_NO_INPUT,
                _ => EXIT_BAD_IMAGE,
            });
        }
    };
    config.digests = DigestConfig {
        regs_every_exits: args.digest_every,
        mem_every_exits: args.mem_digest_every,
    };
    let started = std::time::Instant::now();
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(err) => return report_vmm_error(&err),
    };
    if let Some(path) = &args.snapshot {
        if let Err(code) = restore_snapshot(&mut vm, path) {
            return code;
        }
    }
    if let Err(err) = ftvmm::signals::install_stop_handlers() {
        eprintln!("ftvmm: cannot install signal handlers: {err}");
        return ExitCode::from(EXIT_VMM_FAILED);
    }
    let outcome = vm.run();
    let summary = replay_summary(&vm, started);
    match outcome {
        Ok(VmOutcome::ReplayStopped(ReplayStop::Diverged(divergence))) => {
            eprintln!("ftvmm replay: DIVERGED: {divergence} ({summary})");
            ExitCode::from(EXIT_DIVERGED)
        }
        Ok(VmOutcome::ReplayStopped(
            stop @ (ReplayStop::LostGoLive { .. } | ReplayStop::ArbiterUnreachable(_)),
        )) => {
            eprintln!("ftvmm replay: {stop} ({summary})");
            ExitCode::from(EXIT_VMM_FAILED)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::BadLog(err))) => {
            eprintln!("ftvmm replay: {err} ({summary})");
            ExitCode::from(EXIT_BAD_IMAGE)
        }
        Ok(VmOutcome::ReplayStopped(stop @ ReplayStop::LogEnded { .. })) => {
            eprintln!(
                "ftvmm replay: INCOMPLETE: {stop}; everything up to there matched ({summary})"
            );
            ExitCode::from(EXIT_LOG_INCOMPLETE)
        }
        Ok(VmOutcome::PowerOff(code)) => {
            eprintln!("ftvmm replay: IDENTICAL: guest powered off with code {code} at the recorded exit, final state digest equal ({summary})");
            ExitCode::SUCCESS
        }
        Ok(VmOutcome::Crashed(report)) => {
            eprintln!("ftvmm replay: IDENTICAL: the guest crashed as recorded: {report}, final state digest equal ({summary})");
            ExitCode::SUCCESS
        }
        Ok(VmOutcome::StoppedAsRecorded(signal)) => {
            eprintln!("ftvmm replay: IDENTICAL: the recorded run was stopped by signal {signal} at exit ordinal {}, and so was the replay; final state digest equal ({summary})", vm.exit_ordinal());
            ExitCode::SUCCESS
        }
        Ok(VmOutcome::Signalled(signal)) => {
            eprintln!("ftvmm replay: stopped by signal {signal} ({summary})");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Err(err) => report_vmm_error(&err),
    }
}

/// One line describing a snapshot saved or restored.
fn snapshot_line(
    what: &str,
    report: &ftvmm::snapshot::machine::SnapshotReport,
    took: std::time::Duration,
) -> String {
    let queued = report
        .interrupt_queued
        .map_or("none".to_owned(), |vector| vector.to_string());
    format!(
        "ftvmm snapshot: {what} exit_ordinal={} regs_digest={:#018x} mem_digest={:#018x} bytes={} pages={} interrupt_queued={queued} ms={:.3}",
        report.identity.exit_ordinal,
        report.identity.regs_digest,
        report.identity.mem_digest,
        report.bytes,
        report.pages,
        took.as_secs_f64() * 1000.0
    )
}

/// At a pause of the run: writes the snapshot to `path` and, with `record`, starts
/// recording the continuation there.
fn save_snapshot(
    vm: &mut Vm,
    path: &std::path::Path,
    record: Option<&std::path::Path>,
) -> Result<(), ExitCode> {
    let started = std::time::Instant::now();
    let file = std::fs::File::create(path).map_err(|err| {
        eprintln!("ftvmm: cannot create snapshot {}: {err}", path.display());
        ExitCode::from(EXIT_NO_INPUT)
    })?;
    let mut out = std::io::BufWriter::new(file);
    let report = vm
        .save_snapshot(&mut out)
        .map_err(|err| report_vmm_error(&err))?;
    eprintln!("{}", snapshot_line("saved", &report, started.elapsed()));
    if let Some(log) = record {
        vm.start_recording(log)
            .map_err(|err| report_vmm_error(&err))?;
    }
    Ok(())
}

/// Restores the snapshot at `path` into the freshly built `vm`.
fn restore_snapshot(vm: &mut Vm, path: &std::path::Path) -> Result<(), ExitCode> {
    let started = std::time::Instant::now();
    let file = std::fs::File::open(path).map_err(|err| {
        eprintln!("ftvmm: cannot open snapshot {}: {err}", path.display());
        ExitCode::from(EXIT_NO_INPUT)
    })?;
    let mut input = std::io::BufReader::new(file);
    let report = vm.restore_snapshot(&mut input).map_err(|err| {
        eprintln!("ftvmm: {}: {}", path.display(), one_line(&err));
        ExitCode::from(match err {
            VmError::Snapshot(
                ftvmm::snapshot::SnapshotError::Kvm { .. } | ftvmm::snapshot::SnapshotError::Io(_),
            ) => EXIT_VMM_FAILED,
            _ => EXIT_BAD_IMAGE,
        })
    })?;
    eprintln!("{}", snapshot_line("restored", &report, started.elapsed()));
    Ok(())
}

fn inspect_log(log: &std::path::Path, from: Option<u64>, to: Option<u64>) -> ExitCode {
    let dump =
        (from.is_some() || to.is_some()).then(|| (from.unwrap_or(0), to.unwrap_or(u64::MAX)));
    let summary = match ftvmm::replay::summarize(log, dump) {
        Ok(summary) => summary,
        Err(err) => {
            eprintln!("ftvmm: {}", one_line(&err));
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    if let Some(header) = &summary.header {
        println!(
            "log {} version {}: image crc {:#010x} ({} bytes), memory {} MiB, machine [{}], cmdline [{}]",
            log.display(),
            header.version,
            header.image_crc,
            header.image_len,
            header.mem_size >> 20,
            header.machine,
            header.cmdline
        );
    }
    match summary.ordinals {
        Some((first, last)) => println!("exit ordinals {first}..={last}, {} bytes", summary.bytes),
        None => println!("no events, {} bytes", summary.bytes),
    }
    println!("{:<12} {:>10} {:>12}", "kind", "frames", "bytes");
    for (kind, frames, bytes) in summary.by_kind() {
        println!("{kind:<12} {frames:>10} {bytes:>12}");
    }
    for frame in &summary.dumped {
        println!("{:>12} {:?}", frame.ordinal, frame.event);
    }
    match summary.error {
        Some(err) => {
            eprintln!("ftvmm: {err}");
            ExitCode::from(EXIT_BAD_IMAGE)
        }
        None => ExitCode::SUCCESS,
    }
}

/// Binds the control socket of this replica.
fn start_control(path: &std::path::Path, args: &RunArgs) -> Result<ControlServer, ControlError> {
    let role = match args.role {
        Some(Role::Primary) => ControlRole::Primary,
        Some(Role::Backup) => ControlRole::Backup,
        None => ControlRole::None,
    };
    ControlServer::start(
        path,
        Identity {
            vm: args.vm.clone(),
            generation: args.generation,
            role,
        },
    )
}

/// The go-live claim of this replica: `<role>@<hostname>/<pid>` for `vm`'s pair `generation`.
fn failover(
    arbiter: &str,
    vm: &str,
    generation: u64,
    role: Role,
) -> Result<ftvmm::arbiter::Failover, ftvmm::arbiter::ArbiterError> {
    if !ftvmm::arbiter::valid_vm_name(vm) {
        return Err(ftvmm::arbiter::ArbiterError::BadName(vm.to_owned()));
    }
    let role = match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    };
    Ok(ftvmm::arbiter::Failover {
        arbiter: ftvmm::arbiter::from_spec(arbiter)?,
        pair: ftvmm::arbiter::PairId {
            vm: vm.to_owned(),
            generation,
        },
        // The process too: two replicas on one host (a mistake, or a late duplicate)
        // must never both "win" as the same claimant.
        me: format!("{role}@{}/{}", host_name(), std::process::id()),
    })
}

/// This host's name (for claims and messages).
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `buffer.len()` bytes into the live buffer.
    let ret = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if ret != 0 {
        return "unknown".into();
    }
    let len = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}

/// An error and its causes on one line.
fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Prints the error and its causes on one line and picks the exit status.
fn report_vmm_error(err: &VmError) -> ExitCode {
    eprintln!("ftvmm: {}", one_line(err));
    let status = match err {
        VmError::Load(LoadError::Open { .. }) | VmError::Disk(BlockError::Open { .. }) => {
            EXIT_NO_INPUT
        }
        VmError::Disk(BlockError::Size { .. }) => EXIT_BAD_IMAGE,
        VmError::Tap(TapError::BadName(_)) => EXIT_USAGE,
        VmError::Load(_) => EXIT_BAD_IMAGE,
        VmError::Memory(ftvmm::memory::MemoryError::CmdlineTooLong { .. }) => EXIT_USAGE,
        VmError::AloneLost { .. } => EXIT_LOST_GO_LIVE,
        VmError::AloneNoArbiter(_) => EXIT_PRIMARY_LOST,
        _ => EXIT_VMM_FAILED,
    };
    ExitCode::from(status)
}

fn print_stats(vm: &Vm, role: Option<Role>) {
    let stats = vm.stats();
    let memory = vm.memory_use();
    let channel = vm
        .channel_stats()
        .map(|channel| format!(" {}", channel_words(vm, &channel, role)))
        .unwrap_or_default();
    eprintln!(
        "ftvmm stats: exit_ordinal={} pio_out={} pio_in={} mmio_read={} mmio_write={} hlt={} irq_window={} halt_not_ready={} host_caused={} injected={} unhandled={} halted_ms={} vmm_rss_bytes={} guest_resident_bytes={}{channel}",
        vm.exit_ordinal(),
        stats.pio_out,
        stats.pio_in,
        stats.mmio_read,
        stats.mmio_write,
        stats.hlt,
        stats.irq_window,
        stats.halt_not_ready,
        stats.host_caused,
        stats.injected,
        stats.unhandled,
        stats.halted.as_millis(),
        memory.vmm_rss_bytes,
        memory.guest_resident_bytes,
    );
}

/// The log channel's counters as `key=value` words: a primary's traffic and how far the
/// backup trails (bytes and frames sent but not acknowledged, exits as of the last
/// acknowledgement), or a backup's traffic.
fn channel_words(vm: &Vm, channel: &ChannelStats, role: Option<Role>) -> String {
    let lost = u8::from(channel.lost.is_some());
    if role == Some(Role::Backup) {
        return format!(
            "role=backup log_bytes_received={} log_frames_received={} log_heartbeats_received={} log_reconnects={} heartbeat_misses={} primary_lost={lost}",
            channel.bytes, channel.frames, channel.heartbeats, channel.reconnects, channel.heartbeat_misses
        );
    }
    format!(
        "role=primary log_bytes_sent={} log_frames_sent={} log_heartbeats_sent={} log_acked={} log_acked_frames={} log_acks={} backup_lag_bytes={} backup_lag_frames={} backup_exit_ordinal={} backup_lag_exits={} backup_lost={lost} output_held={} output_released={} output_unprotected={} output_dropped={} output_hold_us_max={} output_hold_us_avg={} backup_lag_ms={} throttled_ms={} throttles={} log_reconnects={} log_rtt_us={} log_rtt_min_us={}",
        channel.bytes,
        channel.frames,
        channel.heartbeats,
        channel.acked_bytes,
        channel.acked_frames,
        channel.acks,
        channel.bytes.saturating_sub(channel.acked_bytes),
        channel.frames.saturating_sub(channel.acked_frames),
        channel.backup_ordinal,
        vm.exit_ordinal().saturating_sub(channel.backup_ordinal),
        channel.outputs.held,
        channel.outputs.released,
        channel.outputs.unprotected,
        channel.outputs.dropped,
        channel.outputs.hold_us_max,
        channel
            .outputs
            .hold_us_total
            .checked_div(channel.outputs.released)
            .unwrap_or(0),
        channel.backup_lag_us / 1000,
        channel.throttled_us / 1000,
        channel.throttles,
        channel.reconnects,
        channel.ack_rtt_us,
        channel.ack_rtt_min_us,
    )
}
