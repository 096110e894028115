//! `ftvmm run`: one replica, alone, recording, or in a pair.

use crate::control::{ControlError, ControlServer, Identity, Publisher};
use crate::report::{
    one_line, print_stats, report_backup, report_setup_error, report_vmm_error, restore_snapshot,
    save_snapshot, snapshot_line,
};
use crate::sandbox::Sandbox;
use ftvm_contract::claims::{claimant, ClaimantRole};
use ftvm_contract::exit;
use ftvm_contract::flags::{PairRole, RunArgs};
use ftvm_contract::status::{DiskMode, ReplicaRole};
use ftvm_machine::devices::serial::Console;
use ftvm_machine::devices::virtio::net::MacAddress;
use ftvm_machine::outcome::ReplayStop;
use ftvm_machine::vm::{
    DigestConfig, DiskConfig, InputsConfig, NetConfig, VcpuHook, Vm, VmConfig, VmOutcome,
};
use ftvm_pair::arbiter::{ArbiterError, Failover, PairId};
use ftvm_pair::clone::source::CloneSource;
use ftvm_pair::golive::{GoLive, Role};
use ftvm_pair::setup;
use ftvm_pair::view::PairView;
use std::process::ExitCode;
use std::sync::Arc;

/// Opens the console target: `-` for stdout, `none`, or a file rotated at `max` bytes.
pub fn open_console(target: &str, max: u64) -> Result<Console, std::io::Error> {
    match target {
        "none" => Ok(Console::Sink),
        "-" => {
            use std::os::fd::AsFd;
            Ok(Console::File(
                std::io::stdout().as_fd().try_clone_to_owned()?.into(),
            ))
        }
        path => Console::rotating(std::path::Path::new(path), max),
    }
}

/// The work the vCPU thread does between exits for this replica: publishing to the
/// control socket, and serving clones.
#[derive(Default)]
struct Hooks {
    publisher: Option<Publisher>,
    clones: Option<CloneSource>,
}

impl VcpuHook for Hooks {
    fn between_exits(&mut self, vm: &mut Vm) {
        if let Some(clones) = &mut self.clones {
            clones.between_exits(vm);
        }
    }

    fn run_state(&mut self, vm: &Vm, state: ftvm_machine::vm::RunState, changed: bool) {
        if let Some(publisher) = &mut self.publisher {
            publisher.run_state(vm, state, changed);
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("ftvmm: {message} (see 'ftvmm --help')");
    ExitCode::from(exit::USAGE)
}

/// Runs one replica as `args` say.
pub fn run(args: RunArgs) -> ExitCode {
    if let Err(message) = args.check() {
        return usage(message);
    }
    // Resolved now, entered once everything is open: a bad --run-as is a usage error
    // before anything runs.
    let sandbox = match Sandbox::prepare(args.run_as.as_deref(), args.seccomp) {
        Ok(sandbox) => sandbox,
        Err(err) => return usage(&err.to_string()),
    };
    let mac = match args
        .mac
        .as_deref()
        .map(str::parse::<MacAddress>)
        .transpose()
    {
        Ok(mac) => mac,
        Err(message) => return usage(&format!("invalid value for '--mac': {message}")),
    };
    if let Err(code) = secure_channels(&args) {
        return code;
    }
    // Read now: the go-live claim may come after the sandbox closed the files.
    let etcd_access = match ftvm_tls::EtcdAccess::load(
        args.etcd_tls_dir.as_deref(),
        args.etcd_user.as_deref(),
        args.etcd_password_file.as_deref(),
    ) {
        Ok(access) => access,
        Err(err) => {
            eprintln!("ftvmm: etcd credentials: {}", one_line(&err));
            return ExitCode::from(exit::NO_INPUT);
        }
    };
    let view = Arc::new(PairView::default());
    // Before anything slow (a primary waits for its backup after booting), so that the
    // socket answers `state=booting` then; removed when `control` is dropped.
    let control = match &args.control {
        Some(path) => match start_control(path, &args, view.clone()) {
            Ok(control) => Some(control),
            Err(err) => {
                eprintln!("ftvmm: {} (see 'ftvmm --help')", one_line(&err));
                return ExitCode::from(if matches!(err, ControlError::Spawn(_)) {
                    exit::VMM_FAILED
                } else {
                    exit::USAGE
                });
            }
        },
        None => None,
    };
    let console = match open_console(&args.console, args.console_max) {
        Ok(console) => console,
        Err(err) => {
            eprintln!("ftvmm: cannot open console {}: {err}", args.console);
            return ExitCode::from(exit::NO_INPUT);
        }
    };
    let mut cmdline = args.cmdline.clone();
    for (key, value) in [
        ("ip", args.ip.clone()),
        ("gw", args.gateway.map(|gw| gw.to_string())),
    ] {
        if let Some(value) = value {
            cmdline = format!("{cmdline} {key}={value}").trim_start().to_owned();
        }
    }
    // The pair's go-live, made once: the arbiter spec and the name are checked here.
    let golive = match (args.role, &args.vm) {
        (Some(role), Some(vm)) => match failover(&args, &etcd_access, vm, args.generation, role) {
            Ok(failover) => Some(Arc::new(GoLive::new(golive_role(role), failover))),
            Err(err) => {
                eprintln!("ftvmm: {}", one_line(&err));
                return ExitCode::from(exit::USAGE);
            }
        },
        _ => None,
    };
    let listen =
        |addr: &Option<String>| addr.as_deref().map(ftvm_pair::channel::listen).transpose();
    let (log_listener, clone_listener) =
        match (listen(&args.log_listen), listen(&args.clone_listen)) {
            (Ok(log), Ok(clone)) => (log, clone),
            (Err(err), _) | (_, Err(err)) => return report_setup_error(&err.into()),
        };
    let mut config = VmConfig {
        image: args.image.clone(),
        mem_size: args.mem,
        cmdline,
        console,
        disk: args.disk.clone().map(if args.disk_private {
            DiskConfig::Private
        } else if args.disk_cache_in_process {
            DiskConfig::CachedFile
        } else {
            DiskConfig::File
        }),
        net: mac.map(|mac| NetConfig {
            tap: args.tap.clone(),
            mac,
            standby: None,
        }),
        inputs: match &args.record {
            Some(path) => InputsConfig::Record(path.clone()),
            None => InputsConfig::Live,
        },
        digests: DigestConfig {
            regs_every_exits: args.digest_every,
            mem_every_exits: args.mem_digest_every,
        },
    };
    if args.clone_from.is_some() {
        config = setup::clone_backup_config(config);
    }
    if let (Some(addr), Some(golive)) = (&args.log_connect, &golive) {
        config = match setup::backup_config(config, addr, golive.clone(), &view) {
            Ok(config) => config,
            Err(err) => return report_setup_error(&err),
        };
    }
    let started = std::time::Instant::now();
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(err) => return report_vmm_error(&err),
    };
    if let (Some(listener), Some(golive)) = (&log_listener, &golive) {
        let wait = (args.backup_wait > 0).then(|| std::time::Duration::from_secs(args.backup_wait));
        if let Err(err) = setup::start_primary(&mut vm, listener, wait, golive.clone(), &view) {
            return report_setup_error(&err);
        }
    }
    if let (Some(addr), Some(golive)) = (&args.clone_from, &golive) {
        let cloned = std::time::Instant::now();
        match ftvm_pair::clone::receive::receive_clone(
            &mut vm,
            addr,
            args.generation,
            golive.clone(),
            &view,
        ) {
            Ok(report) => eprintln!("{}", snapshot_line("cloned", &report, cloned.elapsed())),
            Err(err) => {
                eprint!("ftvmm: cloning from {addr}: ");
                return report_setup_error(&err);
            }
        }
    }
    let mut hooks = Hooks::default();
    if let (Some(listener), Some(vm_name)) = (clone_listener, &args.vm) {
        let next = args.generation + 1;
        if let Err(err) = failover(&args, &etcd_access, vm_name, next, PairRole::Primary) {
            eprintln!("ftvmm: {}", one_line(&err));
            return ExitCode::from(exit::USAGE);
        }
        let (claim_args, name) = (args.clone(), vm_name.clone());
        let claim_for = Box::new(move |generation| {
            failover(
                &claim_args,
                &etcd_access,
                &name,
                generation,
                PairRole::Primary,
            )
            .inspect_err(|err| tracing::error!("clone: no go-live claim: {err}"))
            .ok()
        });
        match CloneSource::listen(listener, next, claim_for, view.clone()) {
            Ok(source) => hooks.clones = Some(source),
            Err(err) => {
                eprintln!("ftvmm: cannot start the clone listener thread: {err}");
                return ExitCode::from(exit::VMM_FAILED);
            }
        }
    }
    if let Some(control) = &control {
        control.set_memory(vm.memory().clone());
        hooks.publisher = Some(control.publisher());
    }
    if let Err(err) = ftvm_machine::signals::install_stop_handlers() {
        eprintln!("ftvmm: cannot install signal handlers: {err}");
        return ExitCode::from(exit::VMM_FAILED);
    }
    if let Some(path) = &args.restore {
        if let Err(code) = restore_snapshot(&mut vm, path) {
            return code;
        }
    }
    if let Err(err) = sandbox.enter() {
        eprintln!("ftvmm: {err}");
        return ExitCode::from(exit::VMM_FAILED);
    }
    let outcome = match (args.snapshot_at, &args.snapshot_out) {
        (Some(at), Some(path)) => match vm.run_until(at, &mut hooks) {
            Ok(Some(outcome)) => {
                eprintln!("ftvmm: the run ended at exit ordinal {} before the snapshot at {at}: no snapshot taken", vm.exit_ordinal());
                Ok(outcome)
            }
            Ok(None) => {
                if let Err(code) = save_snapshot(&mut vm, path, args.snapshot_record.as_deref()) {
                    return code;
                }
                vm.run(&mut hooks)
            }
            Err(err) => Err(err),
        },
        _ => vm.run(&mut hooks),
    };
    if args.stats {
        print_stats(&vm, &view, args.role);
    }
    if args.role == Some(PairRole::Backup) {
        return report_backup(&vm, &view, outcome, started);
    }
    match outcome {
        Ok(VmOutcome::PowerOff(code)) => ExitCode::from(code),
        Ok(VmOutcome::Crashed(report)) => {
            eprintln!("ftvmm: {report}");
            ExitCode::from(exit::GUEST_CRASHED)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::LostGoLive { winner })) => {
            eprintln!("ftvmm: the backup was lost and {winner} won the go-live claim: halting");
            ExitCode::from(exit::LOST_GO_LIVE)
        }
        Ok(VmOutcome::ReplayStopped(stop)) => {
            eprintln!("ftvmm: {stop}");
            ExitCode::from(exit::VMM_FAILED)
        }
        Ok(VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal)) => {
            ExitCode::from(exit::signalled(signal))
        }
        Err(err) => report_vmm_error(&err),
    }
}

fn golive_role(role: PairRole) -> Role {
    match role {
        PairRole::Primary => Role::Primary,
        PairRole::Backup => Role::Backup,
    }
}

/// Binds the control socket of this replica.
fn start_control(
    path: &std::path::Path,
    args: &RunArgs,
    view: Arc<PairView>,
) -> Result<ControlServer, ControlError> {
    let role = match args.role {
        Some(PairRole::Primary) => ReplicaRole::Primary,
        Some(PairRole::Backup) => ReplicaRole::Backup,
        None => ReplicaRole::None,
    };
    ControlServer::start(
        path,
        Identity {
            vm: args.vm.clone(),
            generation: args.generation,
            role,
            disk: args.disk.as_ref().map(|_| {
                if args.disk_private {
                    DiskMode::Private
                } else {
                    DiskMode::Shared
                }
            }),
        },
        view,
    )
}

/// Reads the host certificate for the log and clone channels (before the sandbox takes
/// the files away) and secures every connection of the pair with it; or says loudly that
/// they run in plaintext.
fn secure_channels(args: &RunArgs) -> Result<(), ExitCode> {
    if args.role.is_none() && args.clone_listen.is_none() {
        return Ok(());
    }
    let credentials = match &args.tls_dir {
        Some(dir) => match ftvm_tls::TlsFiles::in_dir(dir).load() {
            Ok(credentials) if credentials.identity().role == ftvm_tls::Role::Host => {
                Some(credentials)
            }
            Ok(credentials) => {
                eprintln!(
                    "ftvmm: --tls-dir {}: the certificate is an {} one; replicas need a host certificate",
                    dir.display(),
                    credentials.identity()
                );
                return Err(ExitCode::from(exit::USAGE));
            }
            Err(err) => {
                eprintln!("ftvmm: --tls-dir {}: {}", dir.display(), one_line(&err));
                return Err(ExitCode::from(exit::NO_INPUT));
            }
        },
        None => {
            eprintln!("ftvmm: warning: --insecure: the log and clone channels run in plaintext, and anyone who reaches their ports is trusted");
            None
        }
    };
    ftvm_pair::transport::secure_with(credentials.as_ref()).map_err(|err| {
        eprintln!("ftvmm: TLS: {}", one_line(&err));
        ExitCode::from(exit::VMM_FAILED)
    })
}

/// The go-live claim of this replica as `role` of `vm`'s pair `generation`, through the
/// arbiter `args` name: the claimant is `<role>@<hostname>/<pid>`.
fn failover(
    args: &RunArgs,
    etcd_access: &ftvm_tls::EtcdAccess,
    vm: &str,
    generation: u64,
    role: PairRole,
) -> Result<Failover, ArbiterError> {
    if !ftvm_contract::claims::valid_vm_name(vm) {
        return Err(ArbiterError::BadName(vm.to_owned()));
    }
    let spec = args.arbiter.as_deref().unwrap_or_default();
    let role = match role {
        PairRole::Primary => ClaimantRole::Primary,
        PairRole::Backup => ClaimantRole::Backup,
    };
    Ok(Failover {
        arbiter: ftvm_pair::arbiter::from_spec(spec, etcd_access)?,
        pair: PairId {
            vm: vm.to_owned(),
            uid: args.vm_uid.clone(),
            generation,
        },
        me: claimant(role, &host_name(), std::process::id()),
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

#[cfg(test)]
mod tests {
    use ftvm_contract::flags::{DEFAULT_DIGEST_EVERY, DEFAULT_MEM_DIGEST_EVERY};
    use ftvm_machine::vm::DigestConfig;

    #[test]
    fn the_contracts_defaults_are_the_machines() {
        let machine = DigestConfig::default();
        assert_eq!(machine.regs_every_exits, DEFAULT_DIGEST_EVERY);
        assert_eq!(machine.mem_every_exits, DEFAULT_MEM_DIGEST_EVERY);
        assert_eq!(ftvm_contract::size::MEM_MIN, ftvm_machine::layout::MEM_MIN);
        assert_eq!(ftvm_contract::size::MEM_MAX, ftvm_machine::layout::MEM_MAX);
    }
}
