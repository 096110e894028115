//! `ftvmm`: command-line front end of the ftvm VMM. See `ftvmm --help`.

use clap::{Parser, Subcommand};
use ftvmm::devices::serial::Console;
use ftvmm::devices::virtio::block::BlockError;
use ftvmm::devices::virtio::net::MacAddress;
use ftvmm::devices::virtio::tap::TapError;
use ftvmm::inputs::ReplayStop;
use ftvmm::loader::LoadError;
use ftvmm::replay::{replay_config, ReplaySetupError};
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
/// Exit status for a VMM or host failure.
const EXIT_VMM_FAILED: u8 = 71;

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
    Run(RunArgs),
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
    /// The guest NIC's MAC address, e.g. 52:54:00:12:34:56.
    #[arg(long, requires = "tap")]
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
    /// With --record: log a registers digest every this many exits (0: only at the end).
    #[arg(long, default_value_t = DigestConfig::default().regs_every_exits)]
    digest_every: u64,
    /// With --record: log a digest of the pages the guest dirtied every this many exits
    /// (0: only the full memory digest at the end).
    #[arg(long, default_value_t = DigestConfig::default().mem_every_exits)]
    mem_digest_every: u64,
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
        Command::Run(args) => run(args),
        Command::Replay(args) => replay(args),
        Command::Log(LogCommand::Inspect { log, from, to }) => inspect_log(&log, from, to),
    }
}

fn run(args: RunArgs) -> ExitCode {
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
    let config = VmConfig {
        image: args.image,
        mem_size: args.mem,
        cmdline,
        console,
        disk: args.disk.map(DiskConfig::File),
        net: args.tap.zip(args.mac).map(|(tap, mac)| NetConfig {
            tap: Some(tap),
            mac,
        }),
        inputs: match args.record {
            Some(path) => InputsConfig::Record(path),
            None => InputsConfig::Live,
        },
        digests: DigestConfig {
            regs_every_exits: args.digest_every,
            mem_every_exits: args.mem_digest_every,
        },
    };
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(err) => return report_vmm_error(&err),
    };
    if let Err(err) = ftvmm::signals::install_stop_handlers() {
        eprintln!("ftvmm: cannot install signal handlers: {err}");
        return ExitCode::from(EXIT_VMM_FAILED);
    }
    let outcome = vm.run();
    if args.stats {
        print_stats(&vm);
    }
    match outcome {
        Ok(VmOutcome::PowerOff(code)) => ExitCode::from(code),
        Ok(VmOutcome::Crashed(report)) => {
            eprintln!("ftvmm: {report}");
            ExitCode::from(EXIT_GUEST_CRASHED)
        }
        Ok(VmOutcome::ReplayStopped(stop)) => {
            eprintln!("ftvmm: {stop}");
            ExitCode::from(EXIT_VMM_FAILED)
        }
        Ok(VmOutcome::Signalled(signal)) => ExitCode::from(128u8.saturating_add(signal as u8)),
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
    if let Err(err) = ftvmm::signals::install_stop_handlers() {
        eprintln!("ftvmm: cannot install signal handlers: {err}");
        return ExitCode::from(EXIT_VMM_FAILED);
    }
    let outcome = vm.run();
    let stats = vm.replay_stats();
    let summary = format!(
        "{} exits replayed, {} events applied, {} digests matched, {:.3} s",
        vm.exit_ordinal(),
        stats.events,
        stats.digests_matched,
        started.elapsed().as_secs_f64()
    );
    match outcome {
        Ok(VmOutcome::ReplayStopped(ReplayStop::Diverged(divergence))) => {
            eprintln!("ftvmm replay: DIVERGED: {divergence} ({summary})");
            ExitCode::from(EXIT_DIVERGED)
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
        Ok(VmOutcome::Signalled(signal)) => {
            eprintln!("ftvmm replay: stopped by signal {signal} ({summary})");
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Err(err) => report_vmm_error(&err),
    }
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
        _ => EXIT_VMM_FAILED,
    };
    ExitCode::from(status)
}

fn print_stats(vm: &Vm) {
    let stats = vm.stats();
    let memory = ftvmm::vm::memory_use(vm);
    eprintln!(
        "ftvmm stats: exit_ordinal={} pio_out={} pio_in={} mmio_read={} mmio_write={} hlt={} irq_window={} host_caused={} injected={} unhandled={} halted_ms={} vmm_rss_bytes={} guest_resident_bytes={}",
        vm.exit_ordinal(),
        stats.pio_out,
        stats.pio_in,
        stats.mmio_read,
        stats.mmio_write,
        stats.hlt,
        stats.irq_window,
        stats.host_caused,
        stats.injected,
        stats.unhandled,
        stats.halted.as_millis(),
        memory.vmm_rss_bytes,
        memory.guest_resident_bytes,
    );
}
