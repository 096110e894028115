//! The README's main command, as a test: the demo's whole path through the control plane
//! (ftd on three namespace hosts, etcd, `ftctl create` of the kv guest with a shared disk
//! and a NIC, a client writing over one connection, the primary's host dying, the backup
//! going live, a new backup cloned onto the third host) with every acknowledged write
//! read back; and planned switchovers under a client.

use ftvm_tests::cluster::{replica_of, Binaries};
use ftvm_tests::{binary, guest, require_kvm};

#[test]
fn the_demo_loses_no_acknowledged_write_and_ends_protected_by_a_clone_on_the_third_host() {
    require_kvm();
    let bins = Binaries {
        ftvmm: binary("ftvmm"),
        ftd: binary("ftd"),
        ftctl: binary("ftctl"),
    };
    let report = ftvm_tests::demo::run(bins, &guest("kv"), "dmt")
        .unwrap_or_else(|failure| panic!("the demo failed: {failure}"));
    assert!(report.lost.is_empty(), "lost: {:?}", report.lost);
    assert!(
        report.acked >= 590,
        "too few writes acknowledged: {report:?}"
    );
    let status = &report.final_status;
    assert_eq!(status["protection"], "protected", "{status}");
    let primary = replica_of(status, "primary").expect("a primary");
    let backup = replica_of(status, "backup").expect("a backup");
    assert_eq!(
        primary["host"], "b",
        "the backup that went live is the primary: {status}"
    );
    assert_eq!(
        backup["host"], "c",
        "the new backup is on the third host: {status}"
    );
    assert_eq!(backup["cloned"], true, "{status}");
    let when = |what: &str| {
        report
            .moments
            .iter()
            .find(|(moment, _)| moment.starts_with(what))
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("no '{what}' moment: {report:?}"))
    };
    assert!(when("failure injected") < when("backup live"), "{report:?}");
    assert!(
        when("backup live") <= when("clients served again"),
        "{report:?}"
    );
}

#[test]
fn switchovers_under_a_client_lose_nothing_and_keep_its_connection() {
    require_kvm();
    let bins = Binaries {
        ftvmm: binary("ftvmm"),
        ftd: binary("ftd"),
        ftctl: binary("ftctl"),
    };
    let report = ftvm_tests::switchover::run(bins, &guest("kv"), "swt", 3)
        .unwrap_or_else(|failure| panic!("the switchovers failed: {failure}"));
    eprintln!("{report:?}");
    assert!(report.lost.is_empty(), "lost: {:?}", report.lost);
    assert!(
        report.acked >= 100,
        "too few writes acknowledged: {report:?}"
    );
    // a -> b -> a -> b: the primary moves to where the backup was each time.
    assert_eq!(report.primary_hosts, ["b", "a", "b"], "{report:?}");
    assert_eq!(
        report.failovers, 0,
        "a switchover is no failover: {report:?}"
    );
    // One short pause, not a failover (a switchover waits out no peer timeout).
    for pause in &report.pauses {
        assert!(
            *pause < std::time::Duration::from_secs(2),
            "a write waited {pause:?}: {report:?}"
        );
    }
}

/// The `tc` filters on `host`'s uplink that redirect frames to a device, by device
/// name (ftd steers a guest's MAC to its replica's TAP this way).
fn redirects(host: &ftvm_tests::NetNs) -> Vec<String> {
    let shown = ftvm_tests::run(
        host.command("tc")
            .args(["filter", "show", "dev", "uplink", "ingress"]),
    );
    ftd::supervisor::steer::redirects_in(&shown.stdout)
        .into_iter()
        .map(|(_, device)| device)
        .collect()
}

/// TAPs ftd made for replicas it no longer knows (it crashed between making one and
/// recording its replica) are removed when it starts again, with the filters steering
/// to them; TAPs, interfaces and filters that are not its own stay. A VM's replicas get
/// their guest's frames steered from the uplink to their TAPs, until the VM is deleted.
#[test]
fn an_ftd_starting_again_removes_the_taps_it_made_and_nothing_else() {
    require_kvm();
    let bins = Binaries {
        ftvmm: binary("ftvmm"),
        ftd: binary("ftd"),
        ftctl: binary("ftctl"),
    };
    let dir = ftvm_tests::temp_dir("taps");
    let mut cluster = ftvm_tests::cluster::Cluster::start("tps", &["a", "b"], bins, &dir, 3)
        .unwrap_or_else(|failure| panic!("the cluster did not start: {failure}"));
    cluster.kill_ftd("b");
    let host = cluster.lan.host("b");
    // Left by ftd: a TAP named as it names them. Not ftd's: a TAP of another name, and
    // an interface of ftd's pattern that is no TAP.
    host.exec_ok(&[
        "ip",
        "tuntap",
        "add",
        "dev",
        "ftv0123456789ab",
        "mode",
        "tap",
    ]);
    host.exec_ok(&["ip", "tuntap", "add", "dev", "keepme0", "mode", "tap"]);
    host.exec_ok(&["ip", "link", "add", "ftvabcdefabcdef", "type", "bridge"]);
    // Both TAPs on the bridge, each with a filter steering a MAC to it, as ftd makes
    // them.
    for (pref, tap, mac) in [
        ("40001", "ftv0123456789ab", "52:54:00:00:00:01"),
        ("30001", "keepme0", "52:54:00:00:00:02"),
    ] {
        host.exec_ok(&["ip", "link", "set", tap, "master", "br0"]);
        host.exec_ok(&["tc", "qdisc", "replace", "dev", "uplink", "clsact"]);
        let mac = ftd::supervisor::steer::parse_mac(mac).expect("a MAC");
        let filter = ftd::supervisor::steer::filter_args(mac, tap);
        let mut args = vec![
            "tc", "filter", "add", "dev", "uplink", "ingress", "pref", pref,
        ];
        args.extend(filter.iter().map(String::as_str));
        host.exec_ok(&args);
    }
    assert_eq!(redirects(host), ["keepme0", "ftv0123456789ab"]);
    let links = |host: &ftvm_tests::NetNs| {
        ftvm_tests::run(host.command("ip").args(["-o", "link", "show"])).stdout
    };
    assert!(links(host).contains("ftv0123456789ab"));
    cluster
        .start_ftd("b")
        .unwrap_or_else(|failure| panic!("ftd b did not start: {failure}"));
    cluster
        .wait_for_hosts(2)
        .unwrap_or_else(|failure| panic!("ftd b did not come back: {failure}"));
    let host = cluster.lan.host("b");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while links(host).contains("ftv0123456789ab") {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale TAP is still there: {}",
            links(host)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = links(host);
    assert!(left.contains("keepme0"), "{left}");
    assert!(left.contains("ftvabcdefabcdef"), "{left}");
    assert_eq!(
        redirects(host),
        ["keepme0"],
        "only the stale TAP's filter goes"
    );

    // A VM's replicas: each host steers the guest's frames to the TAP it made.
    let create = cluster
        .kv_create_args("web1", &guest("kv"))
        .unwrap_or_else(|failure| panic!("{failure}"));
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    cluster
        .ftctl_ok("a", &create)
        .unwrap_or_else(|failure| panic!("{failure}"));
    let steered = |name: &str| {
        redirects(cluster.lan.host(name))
            .into_iter()
            .filter(|device| device.starts_with("ftv"))
            .count()
    };
    // Until each host steers `count` frames to ftd's TAPs.
    let wait_steered = |count: usize, what: &str| {
        ftvm_tests::cluster::wait_for(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(200),
            what,
            || (steered("a") == count && steered("b") == count).then_some(()),
        )
        .unwrap_or_else(|failure| {
            panic!(
                "{failure}: a {:?}, b {:?}",
                redirects(cluster.lan.host("a")),
                redirects(cluster.lan.host("b"))
            )
        })
    };
    wait_steered(1, "both replicas' TAPs to be steered to");
    cluster
        .ftctl_ok("a", &["delete", "web1"])
        .unwrap_or_else(|failure| panic!("{failure}"));
    wait_steered(0, "the replicas' filters to go with their TAPs");
    assert_eq!(redirects(cluster.lan.host("b")), ["keepme0"]);
}
