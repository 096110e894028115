//! `ftvmm replay` and `ftvmm log inspect`.

use crate::cli::ReplayArgs;
use crate::report::{one_line, replay_summary, report_vmm_error, restore_snapshot};
use ftvm_contract::exit;
use ftvm_machine::outcome::ReplayStop;
use ftvm_machine::replay::{replay_config, ReplaySetupError};
use ftvm_machine::vm::{DigestConfig, NoHook, Vm, VmOutcome};
use std::process::ExitCode;

/// Replays a log file and reports whether the run was identical.
pub fn replay(args: ReplayArgs) -> ExitCode {
    let console = match crate::run::open_console(&args.console, args.console_max) {
        Ok(console) => console,
        Err(err) => {
            eprintln!("ftvmm: cannot open console {}: {err}", args.console);
            return ExitCode::from(exit::NO_INPUT);
        }
    };
    let mut config = match replay_config(&args.image, &args.log, args.disk.as_deref(), console) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ftvmm: {}", one_line(&err));
            return ExitCode::from(match err {
                ReplaySetupError::Open { .. } => exit::NO_INPUT,
                _ => exit::BAD_IMAGE,
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
    if let Err(err) = ftvm_machine::signals::install_stop_handlers() {
        eprintln!("ftvmm: cannot install signal handlers: {err}");
        return ExitCode::from(exit::VMM_FAILED);
    }
    let outcome = vm.run(&mut NoHook);
    let summary = replay_summary(&vm, started);
    match outcome {
        Ok(VmOutcome::ReplayStopped(ReplayStop::Diverged(divergence))) => {
            eprintln!("ftvmm replay: DIVERGED: {divergence} ({summary})");
            ExitCode::from(exit::DIVERGED)
        }
        Ok(VmOutcome::ReplayStopped(
            stop @ (ReplayStop::LostGoLive { .. } | ReplayStop::ArbiterUnreachable(_)),
        )) => {
            eprintln!("ftvmm replay: {stop} ({summary})");
            ExitCode::from(exit::VMM_FAILED)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::BadLog(err))) => {
            eprintln!("ftvmm replay: {err} ({summary})");
            ExitCode::from(exit::BAD_IMAGE)
        }
        Ok(VmOutcome::ReplayStopped(stop @ ReplayStop::LogEnded { .. })) => {
            eprintln!(
                "ftvmm replay: INCOMPLETE: {stop}; everything up to there matched ({summary})"
            );
            ExitCode::from(exit::LOG_INCOMPLETE)
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
            ExitCode::from(exit::signalled(signal))
        }
        Err(err) => report_vmm_error(&err),
    }
}

/// Summarizes a log (and dumps the frames of an ordinal range).
pub fn inspect_log(log: &std::path::Path, from: Option<u64>, to: Option<u64>) -> ExitCode {
    let dump =
        (from.is_some() || to.is_some()).then(|| (from.unwrap_or(0), to.unwrap_or(u64::MAX)));
    let summary = match ftvm_log::summary::summarize(log, dump) {
        Ok(summary) => summary,
        Err(err) => {
            eprintln!("ftvmm: cannot open {}: {err}", log.display());
            return ExitCode::from(exit::NO_INPUT);
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
            ExitCode::from(exit::BAD_IMAGE)
        }
        None => ExitCode::SUCCESS,
    }
}
