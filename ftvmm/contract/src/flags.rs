//! `ftvmm run`'s flags, as one type: ftvmm parses a command line into [`RunArgs`], ftd
//! builds a [`RunArgs`] and turns it into a command line with [`RunArgs::to_args`]. A
//! round-trip test keeps the two directions equal.

use crate::size::{parse_mem_size, parse_size};
use std::ffi::OsString;
use std::path::PathBuf;

/// A registers digest is logged every this many exits by default.
pub const DEFAULT_DIGEST_EVERY: u64 = 256;
/// A dirty-memory digest is logged every this many exits by default.
pub const DEFAULT_MEM_DIGEST_EVERY: u64 = 1024;

/// A replica's role in an FT pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PairRole {
    /// Runs the guest live and streams its log to the backup.
    Primary,
    /// Follows the primary's log.
    Backup,
}

impl PairRole {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            PairRole::Primary => "primary",
            PairRole::Backup => "backup",
        }
    }
}

/// What `ftvmm run` does with its system call filter (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Installed once the replica is set up: a call outside the allowed list ends the
    /// replica with a report naming it.
    Enforce,
    /// No filter (development only: a compromised replica could then call anything).
    Off,
}

impl SeccompMode {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Off => "off",
        }
    }
}

/// The default of `--console-max`.
pub const CONSOLE_MAX_DEFAULT: u64 = 16 << 20;

/// Parses `--console-max`: a size of at least 4 KiB.
pub fn parse_console_max(text: &str) -> Result<u64, String> {
    match parse_size(text) {
        Ok(bytes) if bytes >= 4096 => Ok(bytes),
        Ok(bytes) => Err(format!("{bytes} bytes is less than 4K")),
        Err(err) => Err(err.to_string()),
    }
}

fn parse_mem(text: &str) -> Result<u64, String> {
    parse_mem_size(text).map_err(|err| err.to_string())
}

/// `ftvmm run`: the flags of one replica. ftvmm parses them; ftd builds them (then
/// [`RunArgs::to_args`]).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    /// The guest: a static x86-64 ELF executable (see docs/machine.md).
    #[arg(long)]
    pub image: PathBuf,
    /// Guest RAM, e.g. 64M or 1G (2M..3G).
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Command line handed to the guest through the boot info page.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Where the guest console (COM1) goes: '-' for stdout, 'none', or a file path.
    #[arg(long, default_value = "-")]
    pub console: String,
    /// A console file is rotated (to `<path>.1`) at this size, e.g. 16M: a guest that
    /// floods its console costs the host at most twice this.
    #[arg(long, default_value = "16M", value_parser = parse_console_max)]
    pub console_max: u64,
    /// Print exit counters and memory use to stderr when the guest stops.
    #[arg(long)]
    pub stats: bool,
    /// Disk image for the virtio-blk device (a file, a multiple of 512 bytes).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Keep the disk's writes in this process until the guest flushes (what a host crash
    /// loses from the page cache): a testing aid for what a backup re-issues at go-live.
    #[arg(long, requires = "disk")]
    pub disk_cache_in_process: bool,
    /// The disk is this replica's own, not shared with its peer (docs/replay.md, "Private
    /// disks"): writes go to it at once (they are internal state, not outputs), a backup
    /// applies the logged writes to its own copy, the log carries a checksum of each read
    /// instead of its data (a backup reads its own copy and compares), and a clone copies
    /// the disk with the memory. Both replicas of a pair must say it.
    #[arg(long, requires = "disk", conflicts_with = "disk_cache_in_process")]
    pub disk_private: bool,
    /// TAP interface for the virtio-net device (must exist in ftvmm's network namespace).
    #[arg(long, requires = "mac")]
    pub tap: Option<String>,
    /// The guest NIC's MAC address, e.g. 52:54:00:12:34:56 (needs --tap, except on a
    /// backup, which has no TAP while it follows its primary).
    #[arg(long)]
    pub mac: Option<String>,
    /// The guest's IPv4 address and prefix, e.g. 10.77.0.2/24; passed to the guest as `ip=`.
    #[arg(long, value_parser = parse_cidr)]
    pub ip: Option<String>,
    /// The guest's default gateway; passed to the guest as `gw=`.
    #[arg(long)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Record every nondeterministic input to this log file (see `ftvmm replay`).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Role in an FT pair: a primary streams its log to the backup (--log-listen); a backup
    /// executes the same guest from that log as it arrives (--log-connect) and emits no
    /// output. Both must be given the same image, --mem, --cmdline, --disk, --mac and
    /// digest periods.
    #[arg(long, value_enum)]
    pub role: Option<PairRole>,
    /// Primary: the address the backup connects to for the log, e.g. 0.0.0.0:7700. The
    /// guest starts once the backup is connected.
    #[arg(long, value_name = "ADDR")]
    pub log_listen: Option<String>,
    /// Primary: how long to wait for the backup, in seconds (0: for ever). When none came,
    /// the primary claims the pair's go-live and, if it wins, runs its guest unprotected;
    /// if another replica holds the claim it halts (72), and if the arbiter cannot be
    /// reached it halts without output (73).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub backup_wait: u64,
    /// Backup: the primary's --log-listen address (tried for 10 s).
    #[arg(long, value_name = "ADDR")]
    pub log_connect: Option<String>,
    /// The VM's name: with --generation it scopes the go-live claim of the pair.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// The VM's unique id (one life of the name): scopes the go-live claims and the
    /// pair's identity on the wire, so a VM created again under the same name starts
    /// afresh.
    #[arg(long, value_name = "UID")]
    pub vm_uid: Option<String>,
    /// The pair's generation (a new pair made after a failover gets the next one).
    #[arg(long, default_value_t = 1)]
    pub generation: u64,
    /// Who decides which replica goes live when the other is lost: local:DIR (replicas on
    /// one machine) or etcd://HOST:PORT. Needed with --role and --clone-listen: there is no default, so that two hosts
    /// never each decide alone.
    #[arg(long, value_name = "SPEC")]
    pub arbiter: Option<String>,
    /// With --record or --role: log a registers digest every this many exits (0: only at
    /// the end).
    #[arg(long, default_value_t = DEFAULT_DIGEST_EVERY)]
    pub digest_every: u64,
    /// With --record or --role: log a digest of the pages the guest dirtied every this many
    /// exits (0: only the full memory digest at the end).
    #[arg(long, default_value_t = DEFAULT_MEM_DIGEST_EVERY)]
    pub mem_digest_every: u64,
    /// Serve the control socket here (requests `status`, `metrics`, `stop`; see
    /// docs/contract.md). A stale socket file is replaced; the file is removed at exit.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Take a snapshot of the machine at the first point between exits, with the guest
    /// running, at or after this exit ordinal (needs --snapshot-out); the guest then
    /// continues.
    #[arg(long, value_name = "ORDINAL", requires = "snapshot_out")]
    pub snapshot_at: Option<u64>,
    /// Where --snapshot-at writes the snapshot.
    #[arg(long, value_name = "PATH", requires = "snapshot_at")]
    pub snapshot_out: Option<PathBuf>,
    /// Record the run from the snapshot on to this log (replay it with `ftvmm replay
    /// --snapshot`).
    #[arg(long, value_name = "PATH", requires = "snapshot_at")]
    pub snapshot_record: Option<PathBuf>,
    /// Start the guest from this snapshot instead of booting it (the machine flags must be
    /// those of the snapshotted run).
    #[arg(long, value_name = "PATH")]
    pub restore: Option<PathBuf>,
    /// Accept a new backup here while this replica runs alone (no backup yet, or after
    /// its peer was lost): it is cloned from the running guest and the pair becomes
    /// generation --generation + 1. Needs --vm.
    #[arg(long, value_name = "ADDR")]
    pub clone_listen: Option<String>,
    /// Backup: become a clone of the running primary whose --clone-listen is ADDR, then
    /// follow its log (instead of --log-connect). --generation is the new pair's.
    #[arg(long, value_name = "ADDR")]
    pub clone_from: Option<String>,
    /// Once set up (guest memory, /dev/kvm, the TAP, the disk, sockets and files open),
    /// run as this user: a name, or UID[:GID]. Supplementary groups are dropped. Files the
    /// replica makes later (console rotation, the control socket's removal) need their
    /// directory to be this user's.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    /// The system call filter installed once the replica is set up (after --run-as).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::Enforce)]
    pub seccomp: SeccompMode,
    /// Mutual TLS on the log and clone channels: a directory with the cluster CA
    /// (ca.pem), this host's certificate (cert.pem) and its key (key.pem), read at start.
    /// A peer without a host certificate of that CA is refused before any byte of the
    /// protocol.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The log and clone channels in plaintext, unauthenticated: development on one
    /// machine only (anyone who reaches their ports is trusted).
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure: bool,
    /// etcd arbiter over TLS: a directory with etcd's CA (ca.pem) and, for client
    /// certificate authentication, a certificate (cert.pem) and key (key.pem).
    #[arg(long, value_name = "DIR")]
    pub etcd_tls_dir: Option<PathBuf>,
    /// etcd arbiter user (with --etcd-password-file).
    #[arg(long, value_name = "USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (read at start).
    #[arg(long, value_name = "PATH", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl RunArgs {
    /// Checks the flag combinations clap cannot express; the message is a usage error.
    pub fn check(&self) -> Result<(), &'static str> {
        match (self.role, &self.log_listen, &self.log_connect) {
            (Some(PairRole::Primary), None, _) => {
                return Err("--role primary needs --log-listen ADDR")
            }
            (Some(PairRole::Backup), _, None) if self.clone_from.is_none() => {
                return Err("--role backup needs --log-connect ADDR or --clone-from ADDR")
            }
            (Some(PairRole::Primary), _, Some(_)) => {
                return Err("--log-connect is for a backup, not for --role primary")
            }
            (Some(PairRole::Backup), Some(_), _) => {
                return Err("--log-listen is for a primary, not for --role backup")
            }
            (None, Some(_), _) => return Err("--log-listen needs --role primary"),
            (None, _, Some(_)) => return Err("--log-connect needs --role backup"),
            _ => {}
        }
        if self.clone_from.is_some() && self.role != Some(PairRole::Backup) {
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
        if self.mac.is_some() && self.tap.is_none() && self.role != Some(PairRole::Backup) {
            return Err("--mac needs --tap (only a backup has a NIC without a TAP)");
        }
        if (self.role.is_some() || self.clone_listen.is_some()) && self.arbiter.is_none() {
            return Err("--role and --clone-listen need --arbiter local:DIR or etcd://HOST:PORT (there is no default: two hosts must never decide alone)");
        }
        if (self.role.is_some() || self.clone_listen.is_some())
            && self.tls_dir.is_none()
            && !self.insecure
        {
            return Err("--role and --clone-listen need --tls-dir DIR (mutual TLS on the log and clone channels) or --insecure (plaintext, development only)");
        }
        if self.vm_uid.is_some() && self.vm.is_none() {
            return Err("--vm-uid needs --vm NAME");
        }
        if self
            .vm_uid
            .as_deref()
            .is_some_and(|uid| !crate::claims::valid_uid(uid))
        {
            return Err("--vm-uid must be 1 to 100 of a-z, 0-9, '.' and '-'");
        }
        Ok(())
    }
}

/// An IPv4 address with its prefix length, like 10.77.0.2/24.
pub fn parse_cidr(text: &str) -> Result<String, String> {
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

/// `ftvmm run`'s flags as a whole command line (without the program name or `run`).
#[derive(clap::Parser)]
#[command(no_binary_name = true)]
struct RunCommandLine {
    #[command(flatten)]
    run: RunArgs,
}

impl RunArgs {
    /// Parses the arguments of `ftvmm run` (the words after `run`), as ftvmm does: what
    /// reads back a command line that [`RunArgs::to_args`] wrote, or another process's.
    pub fn parse_args<I, T>(args: I) -> Result<RunArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        <RunCommandLine as clap::Parser>::try_parse_from(args).map(|parsed| parsed.run)
    }

    /// The arguments of `ftvmm run` that give these flags (the word `run` not included).
    /// Defaults are written out too, so the command line says everything.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            if name == "cmdline" {
                // Joined with '=': the guest's command line is free text and may start
                // with '-', which clap would take for a flag.
                let mut joined = OsString::from("--cmdline=");
                joined.push(&value);
                args.push(joined);
            } else {
                args.push(format!("--{name}").into());
                args.push(value);
            }
        };
        flag("image", self.image.clone().into());
        flag("mem", self.mem.to_string().into());
        flag("cmdline", self.cmdline.clone().into());
        flag("console", self.console.clone().into());
        flag("console-max", self.console_max.to_string().into());
        let path = |path: &Option<PathBuf>| path.clone().map(OsString::from);
        let text = |text: &Option<String>| text.clone().map(OsString::from);
        let optional: [(&str, Option<OsString>); 24] = [
            ("disk", path(&self.disk)),
            ("tap", text(&self.tap)),
            ("mac", text(&self.mac)),
            ("ip", text(&self.ip)),
            ("gateway", self.gateway.map(|gw| gw.to_string().into())),
            ("record", path(&self.record)),
            ("role", self.role.map(|role| role.as_str().into())),
            ("log-listen", text(&self.log_listen)),
            ("log-connect", text(&self.log_connect)),
            ("vm", text(&self.vm)),
            ("vm-uid", text(&self.vm_uid)),
            ("arbiter", text(&self.arbiter)),
            ("control", path(&self.control)),
            (
                "snapshot-at",
                self.snapshot_at.map(|at| at.to_string().into()),
            ),
            ("snapshot-out", path(&self.snapshot_out)),
            ("snapshot-record", path(&self.snapshot_record)),
            ("restore", path(&self.restore)),
            ("clone-listen", text(&self.clone_listen)),
            ("clone-from", text(&self.clone_from)),
            ("run-as", text(&self.run_as)),
            ("tls-dir", path(&self.tls_dir)),
            ("etcd-tls-dir", path(&self.etcd_tls_dir)),
            ("etcd-user", text(&self.etcd_user)),
            ("etcd-password-file", path(&self.etcd_password_file)),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                flag(name, value);
            }
        }
        flag("backup-wait", self.backup_wait.to_string().into());
        flag("generation", self.generation.to_string().into());
        flag("digest-every", self.digest_every.to_string().into());
        flag("mem-digest-every", self.mem_digest_every.to_string().into());
        flag("seccomp", self.seccomp.as_str().into());
        if self.stats {
            args.push("--stats".into());
        }
        if self.disk_cache_in_process {
            args.push("--disk-cache-in-process".into());
        }
        if self.disk_private {
            args.push("--disk-private".into());
        }
        if self.insecure {
            args.push("--insecure".into());
        }
        args
    }

    /// The flags of a replica running `image` with the defaults: what a builder starts
    /// from.
    pub fn for_image(image: impl Into<PathBuf>) -> RunArgs {
        RunArgs {
            image: image.into(),
            mem: 64 << 20,
            cmdline: String::new(),
            console: "-".into(),
            console_max: CONSOLE_MAX_DEFAULT,
            stats: false,
            disk: None,
            disk_cache_in_process: false,
            disk_private: false,
            tap: None,
            mac: None,
            ip: None,
            gateway: None,
            record: None,
            role: None,
            log_listen: None,
            backup_wait: 60,
            log_connect: None,
            vm: None,
            vm_uid: None,
            generation: 1,
            arbiter: None,
            digest_every: DEFAULT_DIGEST_EVERY,
            mem_digest_every: DEFAULT_MEM_DIGEST_EVERY,
            control: None,
            snapshot_at: None,
            snapshot_out: None,
            snapshot_record: None,
            restore: None,
            clone_listen: None,
            clone_from: None,
            run_as: None,
            seccomp: SeccompMode::Enforce,
            tls_dir: None,
            insecure: false,
            etcd_tls_dir: None,
            etcd_user: None,
            etcd_password_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[OsString]) -> RunArgs {
        RunArgs::parse_args(args).unwrap_or_else(|err| panic!("{err}: {args:?}"))
    }

    #[test]
    fn a_guest_command_line_that_looks_like_a_flag_parses_back() {
        // Found by the gRPC property test: `--cmdline -k...` was taken for a flag, so a
        // VM created with such a command line never started.
        for cmdline in ["-k", "--image /etc/shadow", "-", "", "a -b --c=d"] {
            let mut args = RunArgs::for_image("/srv/kv.elf");
            args.cmdline = cmdline.into();
            assert_eq!(parse(&args.to_args()), args, "{cmdline:?}");
        }
    }

    #[test]
    fn built_flags_parse_back_to_the_same_replica() {
        let defaults = RunArgs::for_image("/srv/kv.elf");
        assert_eq!(parse(&defaults.to_args()), defaults);
        let mut primary = RunArgs::for_image("/srv/kv.elf");
        primary.mem = 128 << 20;
        primary.cmdline = "a=1 b=two words".into();
        primary.console = "/var/lib/ftd/web1/console.log".into();
        primary.disk = Some("/srv/web1.img".into());
        primary.disk_private = true;
        primary.tap = Some("tap0".into());
        primary.mac = Some("52:54:00:12:34:56".into());
        primary.ip = Some("10.0.0.2/24".into());
        primary.gateway = Some("10.0.0.1".parse().unwrap());
        primary.role = Some(PairRole::Primary);
        primary.log_listen = Some("10.0.0.5:7800".into());
        primary.backup_wait = 30;
        primary.vm = Some("web1".into());
        primary.vm_uid = Some("18f-a-1".into());
        primary.generation = 3;
        primary.arbiter = Some("etcd://10.0.0.9:2379".into());
        primary.control = Some("/var/lib/ftd/web1/replica-3.sock".into());
        primary.clone_listen = Some("10.0.0.5:7801".into());
        primary.stats = true;
        primary.run_as = Some("ftvm-replica".into());
        primary.seccomp = SeccompMode::Off;
        primary.tls_dir = Some("/var/lib/ftd/tls".into());
        primary.etcd_tls_dir = Some("/etc/ftd/etcd".into());
        primary.etcd_user = Some("ftd".into());
        primary.etcd_password_file = Some("/etc/ftd/etcd.password".into());
        assert_eq!(parse(&primary.to_args()), primary);
        let mut backup = primary.clone();
        backup.role = Some(PairRole::Backup);
        backup.log_listen = None;
        backup.clone_listen = None;
        backup.clone_from = Some("10.0.0.5:7801".into());
        assert_eq!(parse(&backup.to_args()), backup);
        let mut insecure = backup.clone();
        insecure.tls_dir = None;
        insecure.insecure = true;
        assert_eq!(parse(&insecure.to_args()), insecure);
    }
}
