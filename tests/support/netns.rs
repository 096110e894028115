//! Network namespaces made by the tests, with a TAP for a guest NIC (or bridged TAPs for
//! a pair), and moving a thread into one.

use super::*;

/// A network namespace made by a test, with a TAP device for a guest NIC; removed on drop
/// together with every process started in it through [`NetNs::spawn`].
pub struct NetNs {
    /// The namespace name.
    pub name: String,
    children: Vec<std::process::Child>,
}

/// The host side of the test network: 10.77.0.1/24 on the TAP.
pub const HOST_IP: &str = "10.77.0.1";
/// The guest's address on the test network.
pub const GUEST_IP: &str = "10.77.0.2";
/// The guest's MAC address on the test network.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

impl NetNs {
    /// Creates namespace `ftvm-<tag>-<pid>` with loopback up and a TAP `tap0` carrying
    /// 10.77.0.1/24. Fails the test loudly if namespaces cannot be made (needs root and
    /// iproute2).
    pub fn with_tap(tag: &str) -> NetNs {
        let ns = NetNs::fresh(tag);
        ns.exec_ok(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
        ns.exec_ok(&["ip", "link", "set", "tap0", "up"]);
        ns
    }

    /// Namespace `ftvm-<tag>-<pid>`, made anew, with loopback up.
    pub(crate) fn fresh(tag: &str) -> NetNs {
        let name = format!("ftvm-{tag}-{}", std::process::id());
        // A leftover from a crashed earlier run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = NetNs {
            name,
            children: Vec::new(),
        };
        ns.ip(&["netns", "add", &ns.name]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let ran = run(Command::new("ip").args(args));
        assert_eq!(
            ran.code,
            Some(0),
            "`ip {}` failed (these tests need root and iproute2): {}",
            args.join(" "),
            ran.stderr
        );
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `args` in the namespace and fails the test unless it exits 0.
    pub fn exec_ok(&self, args: &[&str]) -> Ran {
        let ran = run(self.command(args[0]).args(&args[1..]));
        assert_eq!(
            ran.code,
            Some(0),
            "`{}` in {} failed: {ran:?}",
            args.join(" "),
            self.name
        );
        ran
    }

    /// Starts `command` (made by [`NetNs::command`]); it is killed when the namespace goes.
    pub fn spawn(&mut self, command: &mut Command) -> u32 {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills (SIGKILL) and reaps the child with `pid`.
    pub fn kill(&mut self, pid: u32) {
        if let Some(index) = self.children.iter().position(|child| child.id() == pid) {
            let mut child = self.children.remove(index);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (at most [`EXIT_PATIENCE`]) for the child with `pid` and returns its exit
    /// code; kills it and fails the test if it did not exit by then.
    pub fn wait(&mut self, pid: u32) -> Option<i32> {
        let index = self.children.iter().position(|child| child.id() == pid)?;
        let mut child = self.children.remove(index);
        wait_child(
            &mut child,
            EXIT_PATIENCE,
            &format!("process {pid} in namespace {}", self.name),
        )
        .code()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `work` on a thread that has joined network namespace `ns` (sockets it creates live
/// there), so a test can be a real client of a guest without leaving its namespaces.
pub fn in_netns<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&name);
        work()
    })
    .join()
    .unwrap_or_else(|_| panic!("the client thread in {ns} panicked"))
}

/// Moves the calling thread into network namespace `ns`: sockets it creates, and threads
/// it starts, live there.
pub fn enter_netns(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on an open namespace fd, affecting only this thread.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "setns into {path}: {}",
        std::io::Error::last_os_error()
    );
}

impl NetNs {
    /// Creates namespace `ftvm-<tag>-<pid>` with a bridge `br0` carrying 10.77.0.1/24 and
    /// the TAP devices `taps` enslaved to it: the two replicas of a pair on one L2
    /// segment, with clients on the bridge's address.
    pub fn with_bridged_taps(tag: &str, taps: &[&str]) -> NetNs {
        let ns = NetNs::fresh(tag);
        ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
        ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
        for tap in taps {
            ns.exec_ok(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"]);
            ns.exec_ok(&["ip", "link", "set", tap, "master", "br0"]);
            ns.exec_ok(&["ip", "link", "set", tap, "up"]);
        }
        ns
    }
}
