//! A throwaway etcd for tests: Debian's `etcd` binary (package etcd-server) on
//! 127.0.0.1 with free ports and a temporary data directory, killed and removed on drop.
//!
//! A test that needs etcd must fail when it is missing, never skip: [`LocalEtcd::start`]
//! panics with the reason and the package to install.

use crate::{free_port, temp_dir};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd.
#[derive(Debug)]
pub struct LocalEtcd {
    child: Child,
    dir: PathBuf,
    /// Client URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl LocalEtcd {
    /// Starts etcd and waits until it answers on its client port. Panics (failing the
    /// test) if the binary is missing or it does not come up within 20 s.
    pub fn start() -> LocalEtcd {
        LocalEtcd::start_on(free_port())
    }

    /// [`LocalEtcd::start`] with its client URL on `client_port` (what clients started
    /// before it were told).
    pub fn start_on(client_port: u16) -> LocalEtcd {
        LocalEtcd::launch(client_port, None)
    }

    /// etcd serving https with the server certificate in `tls` (ca.pem, cert.pem,
    /// key.pem) and requiring a client certificate of the same CA.
    pub fn start_tls(tls: &std::path::Path) -> LocalEtcd {
        LocalEtcd::launch(free_port(), Some(tls))
    }

    fn launch(client_port: u16, tls: Option<&std::path::Path>) -> LocalEtcd {
        let binary = std::env::var("FTVM_ETCD").unwrap_or_else(|_| "etcd".to_owned());
        let dir = temp_dir("etcd");
        let peer_port = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client_port}");
        // Readiness is asked on a plain-http metrics port, TLS or not.
        let metrics_port = free_port();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.join("etcd.log"))
            .unwrap_or_else(|err| panic!("cannot create the etcd log in {}: {err}", dir.display()));
        let mut command = Command::new(&binary);
        if let Some(tls) = tls {
            command
                .arg(format!("--cert-file={}", tls.join("cert.pem").display()))
                .arg(format!("--key-file={}", tls.join("key.pem").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    tls.join("ca.pem").display()
                ))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name=ftvm-test")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{metrics_port}"
            ))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=ftvm-test={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "this test needs etcd and cannot run without it: cannot start `{binary}`: \
                     {err} (install it with `apt-get install etcd-server`, or `cargo xtask setup`)"
                )
            });
        let mut etcd = LocalEtcd {
            child,
            dir,
            endpoint,
        };
        etcd.wait_ready(metrics_port);
        etcd
    }

    fn wait_ready(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("/health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "etcd exited with {status} at start: see {}",
                    self.dir.join("etcd.log").display()
                );
            }
            if health_ok(port, &url) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd did not answer on 127.0.0.1:{port} within 20 s: see {}",
            self.dir.join("etcd.log").display()
        );
    }
}

impl LocalEtcd {
    /// The etcd process (to freeze it with SIGSTOP, as an outage would).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn health_ok(port: u16, request: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET {request}").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
