//! Child processes of the tests: running to completion, spawning with collected output,
//! waiting with patience, stopping and checking on them.

use super::*;
use std::process::Output;

/// The result of running a command, with its streams as text.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `command` to completion, capturing its output.
pub fn run(command: &mut Command) -> Ran {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    Ran {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// How long a test waits for a process it expects to exit (a guest told to power off, a
/// client run) before it kills it and fails.
pub const EXIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits at most `timeout` for `child` to exit; kills it and fails the test, naming
/// `what`, if it is still running then.
pub fn wait_child(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {timeout:?}: killed");
            }
            Err(err) => panic!("cannot wait for {what}: {err}"),
        }
    }
}

/// A child process whose stdout and stderr are collected by threads (a chatty child never
/// blocks on a full pipe); killed on drop if it is still running.
pub struct Spawned {
    child: std::process::Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Spawned {
    /// Starts `command` with its stdout and stderr captured.
    pub fn start(command: &mut Command) -> Spawned {
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        fn collect(
            stream: Option<impl std::io::Read + Send + 'static>,
        ) -> Option<std::thread::JoinHandle<String>> {
            let mut stream = stream?;
            Some(std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes);
                String::from_utf8_lossy(&bytes).into_owned()
            }))
        }
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        Spawned {
            child,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for the child to exit and returns what it printed; kills it and fails the
    /// test if it is still running after `timeout`.
    pub fn wait(mut self, timeout: std::time::Duration) -> Ran {
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Ok(None) => {
                    self.kill();
                    let _ = self.child.wait();
                    let ran = self.collect(None);
                    panic!("the child did not exit within {timeout:?}: {ran:?}");
                }
                Err(err) => panic!("cannot wait for the child: {err}"),
            }
        };
        self.collect(status.code())
    }

    fn collect(&mut self, code: Option<i32>) -> Ran {
        let text = |handle: Option<std::thread::JoinHandle<String>>| {
            handle.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        Ran {
            code,
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Spawned {
    /// Whether the child has not exited yet.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Sends `request` on the Unix socket at `path` (then ends writing) and reads the whole
/// response.
pub fn unix_request(path: &std::path::Path, request: &[u8]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    stream.write_all(request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        !matches!(state, Some("Z") | Some("X"))
    })
}

/// The pids in the `<vm>/replica-<n>.pid` files an ftd keeps under its state directory.
pub fn pid_files(state_dir: &std::path::Path) -> Vec<u32> {
    let Ok(vms) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    vms.flatten()
        .flat_map(|vm| std::fs::read_dir(vm.path()).into_iter().flatten().flatten())
        .filter(|file| file.path().extension().is_some_and(|ext| ext == "pid"))
        .filter_map(|file| {
            std::fs::read_to_string(file.path())
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Stops process `pid` with SIGSTOP and waits until every one of its threads is stopped
/// (state `T` in /proc), so that nothing it does afterwards can be mistaken for what it did
/// while running. Fails the test if that takes more than 5 s.
pub fn stop_process(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGSTOP);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            let (_, rest) = stat.rsplit_once(')')?;
                            rest.split_whitespace().next().map(|state| state == "T")
                        })
                        .unwrap_or(true)
                })
            })
            .unwrap_or(false);
        if stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not stop within 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
