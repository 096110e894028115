//! The replica's sandbox, entered once it is set up (guest memory mapped, /dev/kvm, the
//! TAP, the disk, the console, the log, clone and control sockets open): it may then run
//! as an unprivileged user (`--run-as`) and always, unless `--seccomp off`, under a system
//! call filter (seccompiler's BPF) that allows only what its threads need from then on.
//!
//! The guest is untrusted: should it ever take over the process, it finds no privilege
//! (with `--run-as`: no root, no capability, no supplementary group) and no way to call
//! what a VMM never calls (exec, ptrace, mount, namespaces, modules, bpf, raw or netlink
//! sockets, ...). A call outside the list raises SIGSYS; the handler writes one line that
//! names the call's number and ends the replica with [`exit::VMM_FAILED`], which ftd
//! treats as the replica failing (its peer takes over).
//!
//! What is not narrowed: `ioctl` requests (KVM's and the TAP's are many; the descriptors
//! are the ones opened before), `openat` paths (with `--run-as`, the file modes decide),
//! and `mmap` protections (glibc may map code for name lookups).

use ftvm_contract::exit;
use ftvm_contract::flags::SeccompMode;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::ffi::CString;

/// What can go wrong preparing or entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--run-as` names no user of this host.
    #[error("--run-as {0}: no such user (a name, or UID[:GID])")]
    NoSuchUser(String),
    /// `--run-as` names root: there would be nothing to drop.
    #[error("--run-as {0}: that is root; name an unprivileged user")]
    Root(String),
    /// The filter could not be built (a bug: the list is fixed).
    #[error("cannot build the system call filter: {0}")]
    Build(String),
    /// The user could not be taken on (not started as root, or refused).
    #[error("cannot run as {user}: {call} failed: {source}")]
    Drop {
        /// The user asked for.
        user: String,
        /// The call that failed.
        call: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the system call filter: {0}")]
    Install(String),
}

/// The user a replica switches to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    /// As `--run-as` named it, for messages.
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// The sandbox of one replica, made before setting up (so a bad `--run-as` is a usage
/// error before anything runs) and entered after.
pub struct Sandbox {
    user: Option<User>,
    /// The filters, in the order they are installed (see [`build_filters`]).
    filters: Vec<BpfProgram>,
}

impl Sandbox {
    /// Resolves `run_as` and builds the filter `seccomp` asks for.
    pub fn prepare(run_as: Option<&str>, seccomp: SeccompMode) -> Result<Sandbox, SandboxError> {
        let user = run_as.map(resolve_user).transpose()?;
        let filters = match seccomp {
            SeccompMode::Enforce => build_filters()?,
            SeccompMode::Off => Vec::new(),
        };
        Ok(Sandbox { user, filters })
    }

    /// Drops to the user (every thread: glibc applies set*id to all of them), then
    /// installs the filter on every thread of the process (TSYNC): the threads started
    /// during setup (log channel, clone listener, control socket) are covered too.
    pub fn enter(self) -> Result<(), SandboxError> {
        if let Some(user) = &self.user {
            drop_privileges(user)?;
        }
        if !self.filters.is_empty() {
            install_sigsys_handler().map_err(SandboxError::Handler)?;
        }
        for filter in &self.filters {
            seccompiler::apply_filter_all_threads(filter)
                .map_err(|err| SandboxError::Install(err.to_string()))?;
        }
        Ok(())
    }
}

/// A user name, or `UID[:GID]` (the group defaults to the user's number).
fn resolve_user(text: &str) -> Result<User, SandboxError> {
    let numeric = |part: &str| part.parse::<u32>().ok();
    let (uid, gid) = match text.split_once(':') {
        Some((uid, gid)) => match (numeric(uid), numeric(gid)) {
            (Some(uid), Some(gid)) => (uid, gid),
            _ => return Err(SandboxError::NoSuchUser(text.into())),
        },
        None => match numeric(text) {
            Some(uid) => (uid, uid),
            None => lookup_name(text).ok_or_else(|| SandboxError::NoSuchUser(text.into()))?,
        },
    };
    if uid == 0 {
        return Err(SandboxError::Root(text.into()));
    }
    Ok(User {
        name: text.into(),
        uid,
        gid,
    })
}

/// The uid and primary gid of the user `name` (the password database, through NSS).
fn lookup_name(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let name = CString::new(name).ok()?;
    let mut buffer = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero passwd is a valid value of this plain C struct.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to live memory of the stated size; getpwnam_r writes the
    // entry's strings into `buffer` and sets `found` to `&entry` or null.
    let ret = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    (ret == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
}

fn drop_privileges(user: &User) -> Result<(), SandboxError> {
    let failed = |call| {
        let source = std::io::Error::last_os_error();
        move || SandboxError::Drop {
            user: user.name.clone(),
            call,
            source,
        }
    };
    // SAFETY: setgroups with a count of 0 reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(failed("setgroups")());
    }
    // SAFETY: plain system calls on numbers.
    if unsafe { libc::setresgid(user.gid, user.gid, user.gid) } != 0 {
        return Err(failed("setresgid")());
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(user.uid, user.uid, user.uid) } != 0 {
        return Err(failed("setresuid")());
    }
    // Root cannot be had back: the saved set-user-ID is gone too.
    // SAFETY: as above.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(SandboxError::Drop {
            user: user.name.clone(),
            call: "setuid(0) (it succeeded: privileges were not dropped)",
            source: std::io::Error::other("root regained"),
        });
    }
    Ok(())
}

/// The system calls a running replica makes (x86-64): gathered with strace over the
/// replicas of the pair, clone, hostile and control tests (alone, recording, primary and
/// backup, failovers, clone source and receiver, console rotation) and by reading the code
/// paths, then checked by running the whole test suite under the filter (the etcd
/// arbiter, ftd-managed failovers and clones, one trial of every chaos fault).
const ALLOWED: &[libc::c_long] = &[
    // Files and descriptors already open (disk, TAP, console, log, sockets).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fchmod,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    // Files made later: snapshots, the local arbiter's claims, /proc/self reads; the
    // control socket removed at exit. File modes decide what may be opened.
    libc::SYS_openat,
    libc::SYS_access,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getcwd,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads, time, waiting.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    // Signals (stop handlers, the vCPU kick).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // Who am I.
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // Sockets: the log channel, clones, the control socket, etcd.
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
];

/// The filters, installed in this order (every call must pass all of them; the strictest
/// answer wins):
/// 1. a netlink socket fails with EAFNOSUPPORT, everything else passes: glibc's name
///    lookup asks netlink for the host's addresses when it sorts several answers (an etcd
///    endpoint given by name) and does without when refused;
/// 2. [`ALLOWED`] as is; `socket` only for UNIX, IPv4, IPv6 (and netlink, which filter 1
///    refuses quietly: no raw or packet socket); `tgkill` only within this process;
///    `prctl` only to name a thread. Anything else traps (SIGSYS). Filter 1 goes first
///    because installing a filter takes calls filter 2 does not allow.
fn build_filters() -> Result<Vec<BpfProgram>, SandboxError> {
    let build = |err: seccompiler::BackendError| SandboxError::Build(err.to_string());
    let equals = |arg: u8, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).map_err(build)
    };
    let only = |arg: u8, value: u64| -> Result<SeccompRule, SandboxError> {
        SeccompRule::new(vec![equals(arg, value)?]).map_err(build)
    };
    let no_netlink = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_socket, vec![only(0, libc::AF_NETLINK as u64)?])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EAFNOSUPPORT as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|call| (*call, Vec::new())).collect();
    rules.insert(
        libc::SYS_socket,
        [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ]
        .into_iter()
        .map(|family| only(0, family as u64))
        .collect::<Result<_, _>>()?,
    );
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    rules.insert(libc::SYS_tgkill, vec![only(0, pid as u64)?]);
    rules.insert(
        libc::SYS_prctl,
        vec![
            only(0, libc::PR_SET_NAME as u64)?,
            only(0, libc::PR_GET_NAME as u64)?,
        ],
    );
    let allowed = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    [no_netlink, allowed]
        .into_iter()
        .map(|filter| BpfProgram::try_from(filter).map_err(build))
        .collect()
}

/// Installs the handler that reports a refused call and ends the process.
fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value of this plain C struct.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the mask is live memory of the right type.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is a valid sigaction whose handler has the SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where the number of the refused call sits in the `siginfo_t` of a SIGSYS on x86-64:
/// after signo, errno, code and padding (16 bytes) and the call's address (8 bytes).
const SI_SYSCALL_OFFSET: usize = 24;

/// SIGSYS: writes `ftvmm: the sandbox refused system call N (x86-64 numbering)...` and
/// ends the process. Only async-signal-safe calls: write(2) and _exit(2), both allowed.
extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel hands a SIGSYS handler a valid siginfo_t, whose _sigsys member
    // holds the call's number as a 32-bit int at SI_SYSCALL_OFFSET.
    let number = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let take = bytes.len().min(line.len() - len);
        line[len..len + take].copy_from_slice(&bytes[..take]);
        len += take;
    };
    put(b"ftvmm: the sandbox refused system call ");
    let mut digits = [0u8; 12];
    put(format_number(number, &mut digits));
    put(b" (x86-64 numbering, see asm/unistd_64.h): the replica ends\n");
    // SAFETY: writes `len` initialized bytes of `line` to stderr, then ends the process
    // without running anything else (no destructor, no atexit handler).
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len);
        libc::_exit(i32::from(exit::VMM_FAILED));
    }
}

/// `number` in decimal, in `digits`, without allocating.
fn format_number(number: i32, digits: &mut [u8; 12]) -> &[u8] {
    let mut value = i64::from(number).unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    if number < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    &digits[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_named_or_numbered_and_root_is_refused() {
        assert_eq!(
            resolve_user("65534:65533").expect("numbers"),
            User {
                name: "65534:65533".into(),
                uid: 65534,
                gid: 65533
            }
        );
        assert_eq!(resolve_user("4000").expect("a uid").gid, 4000);
        assert_eq!(resolve_user("nobody").expect("nobody exists").uid, 65534);
        assert!(matches!(
            resolve_user("no-such-user-here"),
            Err(SandboxError::NoSuchUser(_))
        ));
        assert!(matches!(
            resolve_user("1:x"),
            Err(SandboxError::NoSuchUser(_))
        ));
        assert!(matches!(resolve_user("root"), Err(SandboxError::Root(_))));
        assert!(matches!(resolve_user("0:0"), Err(SandboxError::Root(_))));
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut digits = [0u8; 12];
        assert_eq!(format_number(0, &mut digits), b"0");
        assert_eq!(format_number(435, &mut digits), b"435");
        assert_eq!(format_number(i32::MIN, &mut digits), b"-2147483648");
    }

    /// Runs this test binary again as a child that enters the sandbox and then makes a
    /// call the filter refuses (`SANDBOX_CHILD` says which).
    fn child(case: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "sandbox::tests::child_side", "--nocapture"])
            .env("SANDBOX_CHILD", case)
            .output()
            .expect("run the test binary")
    }

    #[test]
    fn child_side() {
        let Ok(case) = std::env::var("SANDBOX_CHILD") else {
            return; // Only meaningful as the child of the tests below.
        };
        Sandbox::prepare(None, SeccompMode::Enforce)
            .and_then(Sandbox::enter)
            .expect("enter the sandbox");
        eprintln!("inside");
        match case.as_str() {
            // A thread, a file, a socket: what a replica does.
            "allowed" => {
                let thread = std::thread::spawn(|| std::fs::read("/proc/self/status"));
                let status = thread.join().expect("thread").expect("read status");
                let status = String::from_utf8_lossy(&status).into_owned();
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                drop(listener);
                eprintln!(
                    "{}",
                    status
                        .lines()
                        .find(|l| l.starts_with("Seccomp:"))
                        .unwrap_or("?")
                );
                std::process::exit(0);
            }
            // exec is never allowed.
            "exec" => {
                let program = CString::new("/bin/true").expect("a path");
                let argv = [program.as_ptr(), std::ptr::null()];
                // SAFETY: a NUL-terminated path and a null-terminated argument vector.
                unsafe { libc::execv(program.as_ptr(), argv.as_ptr()) };
            }
            // A name lookup (an etcd endpoint given by name) works; a netlink socket,
            // which could reconfigure the host's network, fails quietly.
            "lookup" => {
                use std::net::ToSocketAddrs;
                let found = ("localhost", 2379).to_socket_addrs().map(|a| a.count());
                // SAFETY: a plain system call; a descriptor it returned is not used.
                let netlink = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                eprintln!("lookup {found:?} netlink {netlink} errno {errno:?}");
                std::process::exit(0);
            }
            // A packet socket sees every frame of the host.
            _ => {
                // SAFETY: a plain system call; the descriptor is not used.
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            }
        }
        eprintln!("not refused");
        std::process::exit(0);
    }

    #[test]
    fn what_a_replica_does_is_allowed_and_the_rest_ends_it_with_a_report() {
        let allowed = child("allowed");
        let stderr = String::from_utf8_lossy(&allowed.stderr);
        assert_eq!(allowed.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("Seccomp:\t2"),
            "filter mode 2 is on: {stderr}"
        );
        let lookup = child("lookup");
        let stderr = String::from_utf8_lossy(&lookup.stderr);
        assert_eq!(lookup.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("lookup Ok(") && !stderr.contains("lookup Ok(0)"),
            "localhost resolves inside the filter: {stderr}"
        );
        assert!(
            stderr.contains(&format!("netlink -1 errno Some({})", libc::EAFNOSUPPORT)),
            "{stderr}"
        );
        for (case, number) in [("exec", libc::SYS_execve), ("packet", libc::SYS_socket)] {
            let refused = child(case);
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert_eq!(
                refused.status.code(),
                Some(i32::from(exit::VMM_FAILED)),
                "{case}: {stderr}"
            );
            assert!(stderr.contains("inside"), "{case}: {stderr}");
            assert!(!stderr.contains("not refused"), "{case}: {stderr}");
            assert!(
                stderr.contains(&format!("the sandbox refused system call {number} ")),
                "{case}: {stderr}"
            );
        }
    }
}
