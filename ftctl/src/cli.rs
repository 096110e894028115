//! The command line (clap) and the parsing of its values.

use super::CtlError;
use clap::{Args, Parser, Subcommand};
use ftvm_proto::v1::{DiskMode as PbDiskMode, NetSpec as PbNetSpec};
use std::path::PathBuf;

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
    /// The ftd to talk to (host:port).
    #[arg(long, global = true, env = "FTCTL_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Credentials: a directory with the cluster CA (ca.pem), an operator's or viewer's
    /// certificate (cert.pem) and key (key.pem), from `ftctl certs issue`.
    #[arg(long, global = true, env = "FTCTL_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Talk to an ftd that runs without TLS (`insecure = true`: development only).
    #[arg(
        long,
        global = true,
        env = "FTCTL_INSECURE",
        conflicts_with = "tls_dir"
    )]
    pub insecure: bool,
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
        /// Put the new backup on this host (live, able to run backups, not drained, not
        /// the primary's) instead of where placement would.
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
    },
    /// Swap the roles of a protected VM's replicas (planned: nothing lost, one short
    /// pause): the primary stops, the backup takes over, a new backup is cloned.
    Switchover {
        /// The VM.
        name: String,
        /// Wait up to this many seconds until the VM is protected again with its primary
        /// where the backup was (0: return at once).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait: u64,
    },
    /// Drain a host before maintenance (move its replicas away, place none there) or let
    /// it take replicas again.
    Host {
        /// What to do.
        #[command(subcommand)]
        action: HostAction,
    },
    /// Ask an ftd whether it serves (the standard gRPC health check): "serving" and exit
    /// 0, or "not serving" (it cannot reach etcd) and exit 69.
    Health,
    /// Make the cluster CA and issue certificates (files only; no ftd is asked).
    Certs {
        /// What to do.
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Print shell completions for ftctl (e.g. `ftctl completions bash >
    /// /etc/bash_completion.d/ftctl`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print this command's man page or completions (for packaging).
    #[command(hide = true)]
    Generate {
        /// What to print.
        #[arg(value_enum)]
        what: ftvm_contract::manual::Generated,
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

/// A shell `ftctl completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    /// bash.
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
}

/// `ftctl certs ...`.
#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Make a cluster CA in DIR: ca.pem (for everyone) and ca.key (keep it offline).
    Init {
        /// The CA directory (made 0700; existing files are never overwritten).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// How long the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate with the CA in --dir, into --out: ca.pem, cert.pem, key.pem.
    Issue {
        /// The CA directory (`certs init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A host: its ftd serves gRPC and forwards, its replicas run the log and clone
        /// channels (the name is the host's cluster name).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// An operator: may also create, delete, fail over, switch over, restart
        /// backups and drain hosts.
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// A viewer: may list, status, hosts, events and health.
        #[arg(long, value_name = "NAME")]
        viewer: Option<String>,
        /// Another server of the cluster, e.g. an etcd member (with --san): a server
        /// and client certificate without an ftvm role.
        #[arg(long, value_name = "NAME", requires = "san")]
        server: Option<String>,
        /// With --server: a DNS name or IP address it is reached at (repeat for more).
        #[arg(long, value_name = "NAME_OR_IP", requires = "server")]
        san: Vec<String>,
        /// Where the credentials go (made 0700; existing files are never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// `ftctl host ...`.
#[derive(Debug, Subcommand)]
pub enum HostAction {
    /// No new replica goes to HOST; its backups are replaced by clones elsewhere and its
    /// primaries switch over, one VM at a time, until no replica runs there.
    Drain {
        /// The host.
        host: String,
        /// Give up (exit 75) if replicas still run there after this many seconds; 0:
        /// only mark it drained.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        wait: u64,
    },
    /// HOST takes new replicas again.
    Undrain {
        /// The host.
        host: String,
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
    /// Guest ELF to upload: the cluster keeps it by its SHA-256 and every host runs a
    /// verified copy.
    #[arg(long, value_name = "FILE", required_unless_present = "image_on_hosts")]
    pub image: Option<PathBuf>,
    /// Instead of --image: a guest ELF already at this path on every host (under their
    /// image_dirs; relative paths are made absolute here).
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub image_on_hosts: Option<PathBuf>,
    /// Guest RAM, e.g. 128M or 1G.
    #[arg(long, default_value = "128M")]
    pub mem: String,
    /// Shared disk image: a file at this path on every host that may run a replica
    /// (--disk-mode shared).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// shared: one disk file both replicas open (--disk); private: each replica has its
    /// own, made empty at --disk-size by its host's ftd (a new backup gets a copy by
    /// cloning).
    #[arg(long, value_enum, default_value_t = DiskModeArg::Shared)]
    pub disk_mode: DiskModeArg,
    /// With --disk-mode private: the size of each replica's disk, e.g. 64M or 8G (a
    /// multiple of 512).
    #[arg(long, value_name = "SIZE")]
    pub disk_size: Option<String>,
    /// With --disk-mode private: each replica's disk starts as a copy of this image (a
    /// file at this path on the hosts of the first pair, at most --disk-size; holes stay
    /// holes). Without it the disks start empty.
    #[arg(long, value_name = "PATH")]
    pub disk_image: Option<PathBuf>,
    /// Guest command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest NIC: mac=MAC[,ip=ADDR/PREFIX][,tap=NAME]. Without tap=, every host's ftd
    /// makes a TAP per replica on its bridge; with it, a TAP of that name must exist on
    /// every host that may run a replica.
    #[arg(long)]
    pub net: Option<String>,
}

/// `--disk-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskModeArg {
    /// One disk file both replicas open at the same path.
    Shared,
    /// Each replica's own disk on its own host.
    Private,
}

/// The size `text` that `flag` gives.
pub(crate) fn parse_size(flag: &str, text: &str) -> Result<u64, CtlError> {
    ftvm_contract::size::parse_size(text)
        .map_err(|_| CtlError::Usage(format!("{flag} '{text}' is not a size (examples: 64M, 1G)")))
}

/// The disk fields of a VM spec from `--disk`, `--disk-mode`, `--disk-size` and
/// `--disk-image`: a shared disk's path (absolute), or a private disk's size and the image
/// it starts from (absolute, or empty). ftd checks them again.
pub(crate) fn disk_spec(args: &CreateArgs) -> Result<(String, PbDiskMode, u64, String), CtlError> {
    let (disk, mode, size) = disk_mode_and_size(args)?;
    let image =
        match (mode, &args.disk_image) {
            (_, None) => String::new(),
            (PbDiskMode::Private, Some(image)) => absolute(image),
            (_, Some(_)) => return Err(CtlError::Usage(
                "--disk-image is for --disk-mode private: a shared disk is the file --disk names"
                    .into(),
            )),
        };
    Ok((disk, mode, size, image))
}

fn disk_mode_and_size(args: &CreateArgs) -> Result<(String, PbDiskMode, u64), CtlError> {
    let usage = |text: &str| Err(CtlError::Usage(text.to_owned()));
    match (args.disk_mode, &args.disk, &args.disk_size) {
        (DiskModeArg::Shared, _, Some(_)) => usage(
            "--disk-size is for --disk-mode private: a shared disk is the file --disk names",
        ),
        (DiskModeArg::Shared, disk, None) => Ok((
            disk.as_deref().map(absolute).unwrap_or_default(),
            PbDiskMode::Shared,
            0,
        )),
        (DiskModeArg::Private, Some(_), _) => usage(
            "--disk is for --disk-mode shared: each host makes the private disks of its replicas (give --disk-size)",
        ),
        (DiskModeArg::Private, None, None) => {
            usage("--disk-mode private needs --disk-size (e.g. --disk-size 8G)")
        }
        (DiskModeArg::Private, None, Some(text)) => {
            let size = parse_size("--disk-size", text)?;
            if size == 0 || size % 512 != 0 {
                return Err(CtlError::Usage(format!(
                    "--disk-size '{text}' must be a positive multiple of 512 bytes"
                )));
            }
            Ok((String::new(), PbDiskMode::Private, size))
        }
    }
}

pub(crate) fn parse_net(text: &str) -> Result<PbNetSpec, CtlError> {
    let mut net = PbNetSpec::default();
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("tap", value)) => net.tap = value.to_owned(),
            Some(("mac", value)) => net.mac = value.to_owned(),
            Some(("ip", value)) => net.ip = value.to_owned(),
            _ => {
                return Err(CtlError::Usage(format!(
                    "--net '{text}': expected mac=MAC[,ip=ADDR/PREFIX][,tap=NAME]"
                )))
            }
        }
    }
    if net.mac.is_empty() {
        return Err(CtlError::Usage("--net needs mac=".into()));
    }
    Ok(net)
}

pub(crate) fn absolute(path: &std::path::Path) -> String {
    if path.is_absolute() {
        return path.display().to_string();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}
