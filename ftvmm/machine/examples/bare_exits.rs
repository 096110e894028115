//! The baseline of `cargo xtask bench exits`: the same guest image on a bare KVM_RUN loop.
//!
//! It boots with ftvmm's own boot code, then answers exits with the least work that keeps
//! the `exits` guest running: console bytes to stdout, the clock, the power port, and a
//! timer interrupt at every HLT. The difference to `ftvmm run` on the same guest is the
//! cost of ftvmm's exit path (buses, devices, ordinal counting, interrupt bookkeeping).
//!
//! Usage: `bare_exits IMAGE CMDLINE`

use ftvm_machine::layout::{COM1_PORT, PLATFORM_MMIO, POWER_PORT, TIMER_VECTOR};
use ftvm_machine::vcpu;
use kvm_ioctls::VcpuExit;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(image), cmdline) = (args.next(), args.next().unwrap_or_default()) else {
        eprintln!("usage: bare_exits IMAGE [CMDLINE]");
        return ExitCode::from(64);
    };
    let mut machine = match ftvm_machine::vm::boot(image.as_ref(), 64 << 20, &cmdline, 0, false) {
        Ok(machine) => machine,
        Err(err) => {
            eprintln!("bare_exits: {err}");
            return ExitCode::from(71);
        }
    };
    let start = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let mut pending_tick = false;
    loop {
        match machine.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == COM1_PORT => {
                let _ = stdout.write_all(&data[..1]);
            }
            Ok(VcpuExit::IoOut(POWER_PORT, data)) => {
                let _ = stdout.flush();
                return ExitCode::from(data[0]);
            }
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let value = if addr == PLATFORM_MMIO {
                    start.elapsed().as_nanos() as u64
                } else {
                    0
                };
                let bytes = value.to_le_bytes();
                let len = data.len().min(8);
                data[..len].copy_from_slice(&bytes[..len]);
            }
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) => pending_tick = true,
            Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                eprintln!("bare_exits: unexpected exit {other:?}");
                return ExitCode::from(70);
            }
            Err(err) if err.errno() == libc::EINTR => {}
            Err(err) => {
                eprintln!("bare_exits: KVM_RUN failed: {err}");
                return ExitCode::from(71);
            }
        }
        if pending_tick {
            if vcpu::ready_for_interrupt(&mut machine.vcpu) {
                if let Err(err) = vcpu::inject_interrupt(&machine.vcpu, TIMER_VECTOR) {
                    eprintln!("bare_exits: {err}");
                    return ExitCode::from(71);
                }
                pending_tick = false;
            }
            vcpu::request_interrupt_window(&mut machine.vcpu, pending_tick);
        }
    }
}
