//! Graceful stop on SIGTERM and SIGINT: the handler only records the signal; the vCPU loop
//! notices it before its next entry into the guest (a signal also interrupts KVM_RUN and
//! the halt wait, so that is soon).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The handlers are installed: the vCPU loop looks at STOP_SIGNAL.
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn record_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::Relaxed);
}

/// Installs the SIGTERM and SIGINT handlers (without SA_RESTART, so blocking calls return
/// EINTR and the loop sees the request).
pub fn install_stop_handlers() -> std::io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid starting value; we set a handler that only
        // does an atomic store (async-signal-safe) and pass valid pointers to sigaction.
        let ret = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = record_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// Records a stop request as if `signal` had been received (the control socket's `stop`).
/// Returns false, recording nothing, if the handlers are not installed yet: a signal
/// would then end the process at once, and nothing would look at the request.
pub fn request_stop(signal: i32) -> bool {
    if !INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    STOP_SIGNAL.store(signal, Ordering::Relaxed);
    true
}

/// The stop signal received, if any.
pub fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::Relaxed) {
        0 => None,
        signal => Some(signal),
    }
}
