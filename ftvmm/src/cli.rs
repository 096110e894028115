//! The command line: `ftvmm run` (flags from `ftvm_contract::flags`), `ftvmm replay`,
//! `ftvmm log inspect`.

use clap::{Parser, Subcommand};
use ftvm_contract::flags::{RunArgs, DEFAULT_DIGEST_EVERY, DEFAULT_MEM_DIGEST_EVERY};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ftvmm",
    version,
    about = "Run one ftvm replica: a KVM VM with an FT-ready guest"
)]
pub struct Cli {
    /// Log level for ftvmm's own messages on stderr (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "FTVMM_LOG")]
    pub log_level: tracing::Level,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a guest image and run it until it powers off or crashes.
    Run(Box<RunArgs>),
    /// Re-execute a recorded run from its log and check that it is identical.
    Replay(ReplayArgs),
    /// Work with log files.
    #[command(subcommand)]
    Log(LogCommand),
    /// Print the CPU a guest of this host sees, as one line of `key=value` words
    /// (`cpu=<hash> vendor= family= model= xsave=`): both replicas of a VM must see the same
    /// `cpu` (ftd places backups by it).
    Cpu,
    /// Print this command's man page or shell completions (for packaging).
    #[command(hide = true)]
    Generate {
        /// What to print.
        #[arg(value_enum)]
        what: ftvm_contract::manual::Generated,
    },
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The guest image the log was recorded with.
    #[arg(long)]
    pub image: PathBuf,
    /// The log written by `ftvmm run --record`.
    #[arg(long)]
    pub log: PathBuf,
    /// A copy of the disk as it was when the recording started: optional for a shared
    /// disk (its reads are in the log), needed for a private one (`--disk-private`: the
    /// log has only checksums of its reads). Never written.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Where the replayed guest's console goes: '-' for stdout, 'none', or a file path.
    #[arg(long, default_value = "none")]
    pub console: String,
    /// A console file is rotated (to `<path>.1`) at this size.
    #[arg(long, default_value = "16M", value_parser = ftvm_contract::flags::parse_console_max)]
    pub console_max: u64,
    /// A registers digest is checked every this many exits (must match the recording).
    #[arg(long, default_value_t = DEFAULT_DIGEST_EVERY)]
    pub digest_every: u64,
    /// A dirty-memory digest is checked every this many exits (must match the recording).
    #[arg(long, default_value_t = DEFAULT_MEM_DIGEST_EVERY)]
    pub mem_digest_every: u64,
    /// Start from this snapshot (`run --snapshot-out`); the log is the continuation that
    /// `run --snapshot-record` wrote.
    #[arg(long, value_name = "PATH")]
    pub snapshot: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum LogCommand {
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

/// The exit status of a usage error.
const USAGE: u8 = ftvm_contract::exit::USAGE;

/// Parses the command line; `Err` is the exit status after --help, --version or a usage
/// error (reported on one line).
pub fn parse() -> Result<Cli, std::process::ExitCode> {
    use std::process::ExitCode;
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            Err(ExitCode::SUCCESS)
        }
        Err(err)
            if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            let _ = err.print();
            Err(ExitCode::from(USAGE))
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
            Err(ExitCode::from(USAGE))
        }
    }
}
