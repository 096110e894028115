//! Hosts on a LAN of network namespaces, with etcd on the LAN's router.

use super::*;
use std::path::Path;

/// Hosts on a LAN, each its own network namespace: a `lan` namespace holding the bridge
/// `lan0` (and etcd, on `<subnet>.1:2379`), one namespace per host and one for the
/// client, each joined to `lan0` by a veth pair. A host bridges its uplink and a TAP
/// `tap0` on `br0`, so a guest's NIC sits on the LAN. Everything (processes, namespaces,
/// the etcd data directory) goes on drop, also when the test panics.
pub struct Lan {
    // Dropped first: etcd is killed before its namespace goes.
    etcd: Option<Spawned>,
    etcd_dir: PathBuf,
    hosts: Vec<(String, NetNs)>,
    /// The client's namespace (`<subnet>.100`).
    pub client: NetNs,
    /// The namespace of the bridge and of etcd.
    pub lan: NetNs,
    subnet: String,
}

/// Steers frames for [`GUEST_MAC`] arriving on `ns`'s uplink straight to `tap0`, as ftd
/// does for the TAPs it makes (ftd/src/supervisor/steer.rs explains why: a backup's
/// standby TAP then gets what the LAN floods after the primary's host died).
fn steer_guest_to_tap(ns: &NetNs) {
    let mac: Vec<&str> = GUEST_MAC.split(':').collect();
    let high = format!("0x{}{}", mac[0], mac[1]);
    let low = format!("0x{}{}{}{}", mac[2], mac[3], mac[4], mac[5]);
    ns.exec_ok(&["tc", "qdisc", "add", "dev", "uplink", "clsact"]);
    ns.exec_ok(&[
        "tc",
        "filter",
        "add",
        "dev",
        "uplink",
        "ingress",
        "pref",
        "40000",
        "protocol",
        "all",
        "u32",
        "match",
        "u16",
        &high,
        "0xffff",
        "at",
        "-14",
        "match",
        "u32",
        &low,
        "0xffffffff",
        "at",
        "-12",
        "action",
        "mirred",
        "egress",
        "redirect",
        "dev",
        "tap0",
    ]);
}

/// Where a lan's etcd listens for clients.
const LAN_ETCD_PORT: u16 = 2379;

impl Lan {
    /// Builds the LAN for the test tagged `tag` (short: namespace names are global on
    /// the machine) with the hosts `hosts` (e.g. `["a", "b"]`, at `<subnet>.11`, `.12`,
    /// ...), and starts etcd in it. The /24 is unique within this test process; it needs
    /// no more, since every test's LAN is a separate set of namespaces. Fails the test
    /// loudly if namespaces, bridges, veths or etcd cannot be made.
    pub fn new(tag: &str, hosts: &[&str]) -> Lan {
        Lan::build(tag, hosts, true)
    }

    /// [`Lan::new`] without the TAPs: each host has its bridge `br0` on the LAN, for an
    /// ftd that makes its replicas' TAPs there itself.
    pub fn without_taps(tag: &str, hosts: &[&str]) -> Lan {
        Lan::build(tag, hosts, false)
    }

    fn build(tag: &str, hosts: &[&str], with_taps: bool) -> Lan {
        static NEXT_SUBNET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT_SUBNET.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 250;
        let subnet = format!("10.78.{n}");
        let lan = NetNs::fresh(&format!("{tag}-lan"));
        lan.exec_ok(&["ip", "link", "add", "lan0", "type", "bridge"]);
        lan.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            "lan0",
        ]);
        lan.exec_ok(&["ip", "link", "set", "lan0", "up"]);
        // Joins `ns` to lan0 by a veth: `v-<name>` on the lan side, `uplink` in `ns`.
        let join = |ns: &NetNs, name: &str| {
            let lan_end = format!("v-{name}");
            lan.exec_ok(&[
                "ip", "link", "add", &lan_end, "type", "veth", "peer", "name", "uplink", "netns",
                &ns.name,
            ]);
            lan.exec_ok(&["ip", "link", "set", &lan_end, "master", "lan0"]);
            lan.exec_ok(&["ip", "link", "set", &lan_end, "up"]);
        };
        // Host names share the namespace and veth names: none may be the client's or
        // the LAN's (a host `c` once took over a client namespace named `c`).
        for host in hosts {
            assert!(
                !["client", "lan"].contains(host),
                "a host may not be called {host}"
            );
        }
        let client = NetNs::fresh(&format!("{tag}-client"));
        join(&client, "client");
        client.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.100/24"),
            "dev",
            "uplink",
        ]);
        client.exec_ok(&["ip", "link", "set", "uplink", "up"]);
        let mut named = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let ns = NetNs::fresh(&format!("{tag}-{host}"));
            join(&ns, host);
            ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
            let ip = format!("{subnet}.{}/24", 11 + i);
            ns.exec_ok(&["ip", "addr", "add", &ip, "dev", "br0"]);
            let mut ports = vec!["uplink"];
            if with_taps {
                ns.exec_ok(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
                ports.push("tap0");
            }
            for port in ports {
                ns.exec_ok(&["ip", "link", "set", port, "master", "br0"]);
                ns.exec_ok(&["ip", "link", "set", port, "up"]);
            }
            ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
            if with_taps {
                steer_guest_to_tap(&ns);
            }
            named.push((host.to_string(), ns));
        }
        let etcd_dir = std::env::temp_dir().join(format!("{}-etcd", lan.name));
        let _ = std::fs::remove_dir_all(&etcd_dir);
        let mut built = Lan {
            etcd: None,
            etcd_dir,
            hosts: named,
            client,
            lan,
            subnet,
        };
        built.start_etcd();
        built
    }

    /// Starts etcd in the lan namespace on `<subnet>.1` (again, after [`Lan::stop_etcd`],
    /// on the same data directory), answering within 20 s or failing the test.
    pub fn start_etcd(&mut self) {
        let client_url = format!("http://{}", self.etcd());
        let peer_url = "http://127.0.0.1:2380";
        let etcd = Spawned::start(
            self.lan
                .command(std::env::var("FTVM_ETCD").unwrap_or_else(|_| "etcd".to_owned()))
                .arg("--name=lan")
                .arg(format!("--data-dir={}", self.etcd_dir.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=lan={peer_url}"))
                .arg("--log-level=warn"),
        );
        self.etcd = Some(etcd);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let health = self.etcdctl(&["endpoint", "health"]);
            if health.code == Some(0) {
                return;
            }
            let etcd = self.etcd.as_mut().expect("etcd started");
            if !etcd.running() || std::time::Instant::now() > deadline {
                let etcd = self.etcd.take().expect("etcd started");
                panic!(
                    "this test needs etcd (etcd-server, etcd-client) and it did not come up \
                     in {}: {health:?}; etcd: {:?}",
                    self.lan.name,
                    etcd.wait(std::time::Duration::from_secs(5))
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `etcdctl --endpoints <etcd> args...` in the lan namespace.
    fn etcdctl(&self, args: &[&str]) -> Ran {
        run(self
            .lan
            .command("etcdctl")
            .args(["--dial-timeout=2s", "--command-timeout=3s", "--endpoints"])
            .arg(self.etcd())
            .args(args))
    }

    /// etcd's client address, `<subnet>.1:2379` (for `--arbiter etcd://...`).
    pub fn etcd(&self) -> String {
        format!("{}.1:{LAN_ETCD_PORT}", self.subnet)
    }

    /// The value of `key` in etcd (`None` if absent); fails the test if etcd cannot be
    /// asked.
    pub fn etcd_get(&self, key: &str) -> Option<String> {
        let ran = self.etcdctl(&["get", "--print-value-only", key]);
        assert_eq!(ran.code, Some(0), "etcdctl get {key}: {ran:?}");
        let value = ran.stdout.trim_end();
        (!value.is_empty()).then(|| value.to_owned())
    }

    /// Kills etcd (SIGKILL): the arbiter is gone for everyone.
    pub fn stop_etcd(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            etcd.kill();
            let _ = etcd.wait(std::time::Duration::from_secs(10));
        }
    }

    /// The namespace of `host`.
    pub fn host(&self, host: &str) -> &NetNs {
        self.hosts
            .iter()
            .find(|(name, _)| name == host)
            .map(|(_, ns)| ns)
            .unwrap_or_else(|| panic!("no host {host} on this lan"))
    }

    /// Starts `command` (made with [`NetNs::command`] of `host`'s namespace) as a child
    /// of that host: it is killed when the LAN goes. Returns its pid.
    pub fn spawn_on(&mut self, host: &str, command: &mut Command) -> u32 {
        self.hosts
            .iter_mut()
            .find(|(name, _)| name == host)
            .map(|(_, ns)| ns.spawn(command))
            .unwrap_or_else(|| panic!("no host {host} on this lan"))
    }

    /// Kills (SIGKILL) and reaps the child `pid` started by [`Lan::spawn_on`] on `host`.
    pub fn kill_on(&mut self, host: &str, pid: u32) {
        if let Some((_, ns)) = self.hosts.iter_mut().find(|(name, _)| name == host) {
            ns.kill(pid);
        }
    }

    /// The LAN address of `host`.
    pub fn ip(&self, host: &str) -> String {
        let index = self
            .hosts
            .iter()
            .position(|(name, _)| name == host)
            .unwrap_or_else(|| panic!("no host {host} on this lan"));
        format!("{}.{}", self.subnet, 11 + index)
    }

    /// The guest's address on the LAN (`<subnet>.50`).
    pub fn guest_ip(&self) -> String {
        format!("{}.50", self.subnet)
    }

    /// The LAN's router address (the lan bridge, `<subnet>.1`), for `--gateway`.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// `ftvmm run` (`ftvmm`) of the kv guest (`kv`) on `host`'s TAP `tap0` as a replica
    /// of pair `vm`: the guest's MAC and an address on the LAN, the LAN's router as its
    /// gateway, `disk` (shared by the replicas), the LAN's etcd as the arbiter, the test
    /// certificates, then `role_flags` (none: one VM alone).
    pub fn kv_replica(
        &self,
        host: &str,
        (ftvmm, kv): (&Path, &Path),
        disk: &Path,
        vm: &str,
        role_flags: &[&str],
    ) -> Command {
        let mut command = self.host(host).command(ftvmm);
        command
            .args(["run", "--mem", "128M", "--console", "none"])
            .args(["--mac", GUEST_MAC, "--tap", "tap0"])
            .args(["--ip", &format!("{}/24", self.guest_ip())])
            .args(["--gateway", &self.gateway()])
            .arg("--disk")
            .arg(disk)
            .arg("--image")
            .arg(kv)
            .args(["--vm", vm, "--arbiter", &format!("etcd://{}", self.etcd())])
            .args(super::replica_tls())
            .args(role_flags);
        command
    }

    /// Cuts `host` off the LAN entirely: its uplink goes down.
    pub fn cut_off(&self, host: &str) {
        self.host(host)
            .exec_ok(&["ip", "link", "set", "uplink", "down"]);
    }

    /// Drops every TCP segment from or to `port` in `host`, both directions, with
    /// iptables (fails the test loudly if iptables is missing or refuses).
    pub fn drop_tcp_port(&self, host: &str, port: u16) {
        let port = port.to_string();
        for (chain, direction) in [
            ("INPUT", "--dport"),
            ("INPUT", "--sport"),
            ("OUTPUT", "--dport"),
            ("OUTPUT", "--sport"),
        ] {
            let ran = run(self
                .host(host)
                .command("iptables")
                .args(["-A", chain, "-p", "tcp", direction, &port, "-j", "DROP"]));
            assert_eq!(
                ran.code,
                Some(0),
                "iptables in {host} failed (install iptables): {ran:?}"
            );
        }
    }

    /// Packets the guest side wrote to `host`'s TAP (its `rx_packets`): nonzero once a
    /// replica on `host` emitted anything on the LAN.
    pub fn tap_packets_from_guest(&self, host: &str) -> u64 {
        let ran = self
            .host(host)
            .exec_ok(&["cat", "/sys/class/net/tap0/statistics/rx_packets"]);
        ran.stdout
            .trim()
            .parse()
            .unwrap_or_else(|err| panic!("rx_packets of tap0 in {host}: {err}: {ran:?}"))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.stop_etcd();
        let _ = std::fs::remove_dir_all(&self.etcd_dir);
    }
}
