//! The vCPU loop: a small state machine (`VcpuState`): `Running` enters the guest and
//! handles one exit, `Halted` waits in the VMM for something to inject, `Stopped` ends the
//! run. Exit handling returns an `ExitOutcome` and never blocks.
//!
//! Determinism rule: only guest-caused exits (port I/O, MMIO, HLT, interrupt window) are
//! counted in the exit ordinal, and interrupts are injected only at those exits.

use super::{Devices, Vm, VmError};
use crate::devices::StopRequest;
use crate::layout::TIMER_VECTOR;
use crate::outcome::{CrashReason, CrashReport, VmOutcome};
use crate::vcpu;
use ftvm_log::EndState;
use kvm_ioctls::VcpuExit;
use std::time::{Duration, Instant};

/// How long a stop request waits for a computing guest to reach its next exit (where the
/// recorded run can end with a state its replay can check).
const STOP_PATIENCE: Duration = Duration::from_secs(2);

/// Where the run stands, as the vCPU thread tells its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// The vCPU runs the guest.
    Running,
    /// The guest waits in HLT.
    Halted,
    /// The run ended; the log channel is being closed.
    Stopping,
}

/// Work the vCPU thread does for others, with the guest stopped. Every method has a
/// default that does nothing.
pub trait VcpuHook {
    /// Between two exits (every event of the last one handled, the guest stopped): `vm`
    /// may be changed here (a clone's final copy, new inputs).
    fn between_exits(&mut self, _vm: &mut Vm) {}
    /// The run's state changed (`changed`), or it goes on in `state` and counters may be
    /// due for publishing.
    fn run_state(&mut self, _vm: &Vm, _state: RunState, _changed: bool) {}
}

/// A hook that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl VcpuHook for NoHook {}

/// Where the vCPU loop stands.
#[derive(Debug)]
enum VcpuState {
    Running,
    Halted,
    Stopped(VmOutcome),
}

/// What handling one KVM_RUN return produced.
enum ExitOutcome {
    /// A guest-caused exit was handled; go on.
    GuestExit,
    /// The guest executed HLT.
    Halt,
    /// The host interrupted KVM_RUN; not a guest event.
    HostCaused,
    /// The run is over.
    Stop(VmOutcome),
}

impl Vm {
    /// Runs the guest until it powers off or crashes; `hook` is called between exits.
    pub fn run(&mut self, hook: &mut dyn VcpuHook) -> Result<VmOutcome, VmError> {
        match self.run_loop(None, hook)? {
            Some(outcome) => Ok(outcome),
            // Without a pause ordinal the loop only returns with an outcome.
            None => Err(VmError::SnapshotRefused(
                "the run paused without being asked to",
            )),
        }
    }

    /// Runs the guest until the first point between exits at or after exit `ordinal`
    /// where it is running (not halted), and returns `None` there with every event of the
    /// exit handled: a point to take a snapshot at. Returns the outcome if the run ends
    /// first. [`Vm::run`] or `run_until` continue from the pause.
    pub fn run_until(
        &mut self,
        ordinal: u64,
        hook: &mut dyn VcpuHook,
    ) -> Result<Option<VmOutcome>, VmError> {
        self.run_loop(Some(ordinal), hook)
    }

    fn run_loop(
        &mut self,
        pause_at: Option<u64>,
        hook: &mut dyn VcpuHook,
    ) -> Result<Option<VmOutcome>, VmError> {
        let mut state = VcpuState::Running;
        let mut live_announced = self.went_live_at().is_some();
        hook.run_state(self, RunState::Running, true);
        loop {
            state = match state {
                VcpuState::Running if self.finished_ordinal < self.exit_ordinal => {
                    match self.finish_exit()? {
                        Some(outcome) => VcpuState::Stopped(outcome),
                        None if pause_at.is_some_and(|at| self.exit_ordinal >= at) => {
                            return Ok(None);
                        }
                        None => {
                            hook.between_exits(self);
                            hook.run_state(self, RunState::Running, false);
                            VcpuState::Running
                        }
                    }
                }
                // Where a recorder stops on a signal (below), a replay of its log stops too.
                VcpuState::Running | VcpuState::Halted
                    if self.devices.state.inputs.logged_stop_now().is_some() =>
                {
                    let signal = self.devices.state.inputs.logged_stop_now().unwrap_or(0);
                    VcpuState::Stopped(VmOutcome::StoppedAsRecorded(signal))
                }
                VcpuState::Running | VcpuState::Halted
                    if crate::signals::stop_requested().is_some()
                        && self.may_stop_now(matches!(state, VcpuState::Halted)) =>
                {
                    let signal = crate::signals::stop_requested().unwrap_or(0);
                    VcpuState::Stopped(VmOutcome::Signalled(signal))
                }
                VcpuState::Running => match self.run_once()? {
                    ExitOutcome::GuestExit => {
                        self.deliver_interrupts()?;
                        VcpuState::Running
                    }
                    ExitOutcome::Halt => {
                        if self.deliver_interrupts()? {
                            VcpuState::Running
                        } else {
                            VcpuState::Halted
                        }
                    }
                    ExitOutcome::HostCaused => {
                        self.ran_past_exit = true;
                        VcpuState::Running
                    }
                    ExitOutcome::Stop(outcome) => VcpuState::Stopped(outcome),
                },
                VcpuState::Halted => {
                    hook.run_state(self, RunState::Halted, false);
                    self.wait_while_halted()?
                }
                VcpuState::Stopped(outcome) => {
                    hook.run_state(self, RunState::Stopping, true);
                    return self.end_run(outcome).map(Some);
                }
            };
            if !live_announced && self.went_live_at().is_some() {
                live_announced = true;
                hook.run_state(self, RunState::Running, true);
            }
        }
    }

    /// Whether a requested stop may happen now. A recording to a file ends with the stop
    /// (its end frame), so the guest must be where a replay can stop too: halted, or just
    /// past a handled exit. A guest interrupted mid-computation runs on to its next exit,
    /// for at most [`STOP_PATIENCE`]; after that the log ends without an end frame.
    fn may_stop_now(&mut self, halted: bool) -> bool {
        if halted || !self.ran_past_exit || !self.devices.state.inputs.is_recording_to_file() {
            return true;
        }
        let since = *self.stop_waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() < STOP_PATIENCE {
            return false;
        }
        tracing::warn!(
            "the guest reached no exit within {} ms of the stop request: the log ends without an end frame",
            STOP_PATIENCE.as_millis()
        );
        self.stop_unlogged = true;
        true
    }

    /// After the last input of an exit was taken (just before the next entry): digests, and
    /// in replay the check that every logged event of the exit was consumed.
    fn finish_exit(&mut self) -> Result<Option<VmOutcome>, VmError> {
        self.finished_ordinal = self.exit_ordinal;
        let every = self.digests.regs_every_exits;
        if every > 0 && self.exit_ordinal.is_multiple_of(every) {
            let (rip, hash) = vcpu::state_digest(&self.machine.vcpu)?;
            self.devices.state.inputs.regs_digest(rip, hash);
        }
        let every = self.digests.mem_every_exits;
        if every > 0
            && self.exit_ordinal.is_multiple_of(every)
            && !self.devices.state.inputs.is_live()
        {
            let (pages, hash) =
                crate::memory::dirty_digest(&self.machine.vm, &self.machine.mem, &mut self.dirty)
                    .map_err(VmError::DirtyLog)?;
            self.devices.state.inputs.mem_digest(pages, hash);
        }
        let inputs = &mut self.devices.state.inputs;
        inputs.finish_exit();
        if let Some(err) = inputs.take_record_error() {
            return Err(VmError::Record(err));
        }
        Ok(inputs.replay_stop().cloned().map(VmOutcome::ReplayStopped))
    }

    /// Logs (or, in replay, checks) how the run ended, with final digests, and closes the
    /// log channel if there is one (a primary waits a bounded time for the backup's
    /// acknowledgement of the whole log).
    fn end_run(&mut self, outcome: VmOutcome) -> Result<VmOutcome, VmError> {
        let ended = self.log_end(outcome);
        self.devices.state.inputs.close_channel();
        ended
    }

    fn log_end(&mut self, outcome: VmOutcome) -> Result<VmOutcome, VmError> {
        // A recording to a file ends with the stop, so that its replay stops at the same
        // point and checks the final state. A pair's primary does not: its backup goes
        // live when the stream ends without an end frame. A replay stopped by a signal of
        // its own has nothing to check.
        let ends_log_here = self.devices.state.inputs.is_recording_to_file() && !self.stop_unlogged;
        if matches!(outcome, VmOutcome::Signalled(_)) && !ends_log_here {
            let inputs = &mut self.devices.state.inputs;
            inputs.flush();
            return match inputs.take_record_error() {
                Some(err) => Err(VmError::Record(err)),
                None => Ok(outcome),
            };
        }
        let inputs = &self.devices.state.inputs;
        if matches!(outcome, VmOutcome::ReplayStopped(_))
            || !(inputs.is_recording() || inputs.is_replay())
        {
            return Ok(outcome);
        }
        let (outcome_kind, code) = match &outcome {
            VmOutcome::PowerOff(code) => (ftvm_log::END_POWER_OFF, *code),
            VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal) => (
                ftvm_log::END_STOPPED,
                u8::try_from(*signal).unwrap_or(u8::MAX),
            ),
            _ => (ftvm_log::END_CRASH, 0),
        };
        let (_, regs_hash) = vcpu::state_digest(&self.machine.vcpu)?;
        let end = EndState {
            outcome: outcome_kind,
            code,
            regs_hash,
            mem_hash: crate::memory::memory_digest(&self.machine.mem),
        };
        let inputs = &mut self.devices.state.inputs;
        inputs.end(end);
        inputs.flush();
        if let Some(err) = inputs.take_record_error() {
            return Err(VmError::Record(err));
        }
        Ok(match inputs.replay_stop() {
            Some(stop) => VmOutcome::ReplayStopped(stop.clone()),
            None => outcome,
        })
    }

    /// Enters the guest once and handles the exit.
    fn run_once(&mut self) -> Result<ExitOutcome, VmError> {
        let Devices { pio, mmio, state } = &mut self.devices;
        let mut ctx = state.context(&self.machine.mem);
        let stats = &mut self.stats;
        let exit = match self.machine.vcpu.run() {
            Ok(exit) => exit,
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                stats.host_caused += 1;
                return Ok(ExitOutcome::HostCaused);
            }
            Err(err) => return Err(VmError::Run(err)),
        };
        let guest_caused = matches!(
            exit,
            VcpuExit::IoOut(..)
                | VcpuExit::IoIn(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..)
                | VcpuExit::Hlt
                | VcpuExit::IrqWindowOpen
        );
        if guest_caused {
            // Ordinals are 1-based: every input this exit consumes is stamped with it.
            self.exit_ordinal += 1;
            self.ran_past_exit = false;
            ctx.inputs.set_ordinal(self.exit_ordinal);
        }
        let outcome = match exit {
            VcpuExit::IoOut(port, data) => {
                stats.pio_out += 1;
                if !pio.write(u64::from(port), data, &mut ctx) {
                    tracing::debug!(port, ?data, "write to unassigned port");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::IoIn(port, data) => {
                stats.pio_in += 1;
                if !pio.read(u64::from(port), data, 0xFF, &mut ctx) {
                    tracing::debug!(port, "read from unassigned port");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::MmioRead(addr, data) => {
                stats.mmio_read += 1;
                if !mmio.read(addr, data, 0xFF, &mut ctx) {
                    tracing::debug!(addr, "read from unassigned MMIO");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::MmioWrite(addr, data) => {
                stats.mmio_write += 1;
                if !mmio.write(addr, data, &mut ctx) {
                    tracing::debug!(addr, ?data, "write to unassigned MMIO");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::Hlt => {
                stats.hlt += 1;
                ExitOutcome::Halt
            }
            VcpuExit::IrqWindowOpen => {
                stats.irq_window += 1;
                ExitOutcome::GuestExit
            }
            VcpuExit::Intr => {
                stats.host_caused += 1;
                return Ok(ExitOutcome::HostCaused);
            }
            VcpuExit::Shutdown => ExitOutcome::Stop(self.crash(CrashReason::TripleFault)),
            VcpuExit::InternalError => {
                let suberror = vcpu::internal_error_suberror(&mut self.machine.vcpu);
                ExitOutcome::Stop(self.crash(CrashReason::InternalError { suberror }))
            }
            VcpuExit::FailEntry(reason, _) => {
                ExitOutcome::Stop(self.crash(CrashReason::FailEntry { reason }))
            }
            other => {
                let kind = format!("{other:?}");
                ExitOutcome::Stop(self.crash(CrashReason::UnexpectedExit(kind)))
            }
        };
        match self.devices.state.stop.take() {
            Some(StopRequest::PowerOff(code)) => Ok(ExitOutcome::Stop(VmOutcome::PowerOff(code))),
            Some(StopRequest::GuestFault(vector)) => {
                let regs = self.machine.vcpu.get_regs().unwrap_or_default();
                let reason = CrashReason::GuestFault {
                    vector,
                    error_code: regs.rdi,
                    fault_rip: regs.rsi,
                    cr2: regs.rcx,
                };
                Ok(ExitOutcome::Stop(self.crash(reason)))
            }
            None => Ok(outcome),
        }
    }

    /// A crash report at the current RIP and exit ordinal.
    fn crash(&self, reason: CrashReason) -> VmOutcome {
        VmOutcome::Crashed(CrashReport {
            reason,
            rip: vcpu::current_rip(&self.machine.vcpu),
            exit_ordinal: self.exit_ordinal,
        })
    }

    /// At a guest-caused exit: samples the timer, injects the lowest pending vector if the
    /// guest can take it, and asks for an interrupt window if more remain. Returns whether
    /// a vector was injected.
    fn deliver_interrupts(&mut self) -> Result<bool, VmError> {
        let Devices { mmio, state, .. } = &mut self.devices;
        let (timer, clock) = (&mut state.timer, &mut state.clock);
        if state
            .inputs
            .timer_tick(|| timer.take_due_tick(clock.monotonic_ns()))
        {
            state.pending.raise(TIMER_VECTOR);
        }
        mmio.poll_all(&mut state.context(&self.machine.mem));
        let vcpu = &mut self.machine.vcpu;
        let mut injected = false;
        if let Some(vector) = state.pending.lowest() {
            if vcpu::ready_for_interrupt(vcpu) {
                vcpu::inject_interrupt(vcpu, vector)?;
                state.inputs.injected(vector);
                state.pending.clear(vector);
                self.stats.injected += 1;
                injected = true;
            }
        }
        // No interrupt-window exit is requested for what stays pending: on this platform
        // the STI shadow may not survive a host-caused exit between `sti` and `hlt`, so a
        // window exit could come before the HLT on one replica and after it on the other.
        // What stays pending is injected at the next guest-caused exit that can take it.
        Ok(injected)
    }

    /// The guest is in HLT with nothing injected: wait for the next timer deadline or a
    /// device backend, or report a hang if nothing can ever wake it.
    fn wait_while_halted(&mut self) -> Result<VcpuState, VmError> {
        if !vcpu::interrupts_enabled(&mut self.machine.vcpu) {
            return Ok(VcpuState::Stopped(
                self.crash(CrashReason::HaltedWithInterruptsDisabled),
            ));
        }
        if !self.devices.state.pending.is_empty() {
            // Pending but not injectable (interrupt shadow): the guest goes on and takes it
            // at its next exit (an idle guest halts again at once).
            self.stats.halt_not_ready += 1;
            return Ok(VcpuState::Running);
        }
        if self.devices.state.inputs.is_replay() {
            // What woke the recorded guest is in the log, at this same ordinal. Each round
            // must take at least one event, or the replay would wait forever.
            let before = self.devices.state.inputs.replay_stats().events;
            if self.devices.state.inputs.has_event_now() && self.deliver_interrupts()? {
                return Ok(VcpuState::Running);
            }
            if self.devices.state.inputs.replay_stats().events == before {
                if self.devices.state.inputs.halted_without_input() {
                    // The log ended and this backup went live: wait like a live VM.
                    return Ok(VcpuState::Halted);
                }
                return Ok(VcpuState::Running);
            }
            return Ok(VcpuState::Halted);
        }
        let deadline = self.devices.state.timer.next_deadline_ns();
        let mut fds: Vec<libc::pollfd> = self
            .devices
            .mmio
            .wake_fds()
            .into_iter()
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if deadline.is_none() && fds.is_empty() {
            return Ok(VcpuState::Stopped(
                self.crash(CrashReason::HaltedWithNoWakeSource),
            ));
        }
        let now = self.devices.state.clock.monotonic_ns();
        // Sleep unless the deadline already passed.
        if deadline.is_none_or(|deadline| deadline > now) {
            // An idle guest is the moment to push recorded frames out of the buffer.
            self.devices.state.inputs.flush();
            let started = std::time::Instant::now();
            let wait = deadline.map(|deadline| {
                let ns = deadline.saturating_sub(now);
                libc::timespec {
                    tv_sec: (ns / 1_000_000_000) as libc::time_t,
                    tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                }
            });
            let timeout = wait
                .as_ref()
                .map_or(std::ptr::null(), |wait| wait as *const libc::timespec);
            // SAFETY: `fds` is a live array of `fds.len()` pollfd (possibly empty), `timeout`
            // is null or points to `wait`, which outlives the call; no signal mask change.
            let ret = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout,
                    std::ptr::null(),
                )
            };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(VmError::Poll(err));
                }
            }
            self.stats.halted += started.elapsed();
        }
        // Still the same HLT exit: what arrived takes effect at its ordinal.
        if self.deliver_interrupts()? {
            Ok(VcpuState::Running)
        } else {
            Ok(VcpuState::Halted)
        }
    }
}
