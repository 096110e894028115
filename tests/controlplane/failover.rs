//! Pairs through ftd: protection, failover, promotion, backups cloned anew, a VM
//! deleted and created again, an etcd outage.

use super::*;

#[test]
fn a_pair_is_protected_and_its_backup_goes_live_when_the_primary_dies() {
    let cluster = TestCluster::start();
    let primary = cluster.create_web1();

    let vm = cluster.wait_protected();
    // Protected is the primary's own word: its control socket says protected=1.
    let primary_status = unix_request(&control_socket(&cluster, "a", 1), b"status\n")
        .expect("the primary answers on its control socket");
    assert!(
        primary_status.contains(" role=primary ") && primary_status.contains(" protected=1 "),
        "{primary_status}"
    );
    let events = cluster.ftctl_at(2, &["events", "--backlog", "50"]);
    assert!(
        events.stdout.contains("web1 is protected"),
        "{}",
        events.stdout
    );
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup process on b");
    assert_eq!(
        replica(&vm, "backup").expect("a backup replica")["pid"].as_u64(),
        Some(u64::from(backup)),
        "{vm}"
    );
    let primary_cmdline = cmdline(primary);
    let backup_cmdline = cmdline(backup);
    for (text, role, endpoint) in [
        (&primary_cmdline, "primary", "--log-listen"),
        (&backup_cmdline, "backup", "--log-connect"),
    ] {
        assert!(
            flag(text, "--vm") == Some("web1")
                && flag(text, "--generation") == Some("1")
                && flag(text, "--arbiter")
                    .is_some_and(|spec| spec.starts_with("etcd://127.0.0.1:"))
                && flag(text, "--role") == Some(role)
                && flag(text, endpoint).is_some_and(|addr| addr.starts_with("127.0.0.1:"))
                && flag(text, "--clone-listen").is_some_and(|addr| addr.starts_with("127.0.0.1:"))
                // The channels run under mutual TLS with the host's own credentials.
                && flag(text, "--tls-dir").is_some_and(|dir| dir.ends_with("host-a") || dir.ends_with("host-b"))
                && !text.contains("--insecure"),
            "{text}"
        );
    }
    assert!(replica_pid(&cluster, "c", "primary").is_none());

    // The primary's control socket says how far the backup trails and how fast the log
    // flows; ftd c runs neither replica, so it asks host a's ftd.
    let live = cluster.wait_for(Duration::from_secs(15), "lag and bandwidth", || {
        let vm = cluster.ftctl_json(2, &["status", "web1"])?;
        (vm["log_bytes_per_second"].as_u64()? > 0).then_some(vm)
    });
    assert!(live["backup_lag_exits"].is_u64(), "{live}");
    assert!(live["backup_lag_ms"].is_u64(), "{live}");
    assert!(live["log_bytes_total"].as_u64() > Some(0), "{live}");
    let human = cluster.ftctl_at(0, &["status", "web1"]);
    assert!(human.stdout.contains(" B/s ("), "{human:?}");
    // Each host's /metrics re-exports its replica's ftvmm_ metrics with vm and replica
    // labels, as valid Prometheus text next to ftd's own.
    for (host, role) in [("a", "primary"), ("b", "backup")] {
        let text = http_get(cluster.ftd(host).metrics_port, "/metrics").expect("/metrics");
        let samples = parse_prometheus(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        let labels = format!("vm=\"web1\",replica=\"{role}\",role=\"{role}\"");
        assert_eq!(sample(&samples, "ftvmm_role", &labels), Some(1.0), "{text}");
        let bytes = format!("vm=\"web1\",replica=\"{role}\"");
        assert!(
            sample(&samples, "ftvmm_log_bytes_total", &bytes).is_some_and(|n| n > 0.0),
            "{text}"
        );
        assert!(
            sample(&samples, "ftd_replicas_running", "") == Some(1.0),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE ftvmm_role ").count(), 1, "{text}");
    }
    let a_metrics = http_get(cluster.ftd("a").metrics_port, "/metrics").expect("/metrics");
    assert!(
        a_metrics.contains(
            "ftvmm_output_hold_seconds_bucket{vm=\"web1\",replica=\"primary\",le=\"+Inf\"}"
        ),
        "{a_metrics}"
    );
    // Kill the primary's ftvmm (not its ftd): the backup wins the claim and runs on.
    let _ = Command::new("kill")
        .args(["-9", &primary.to_string()])
        .status();
    let b_log = cluster.ftd("b").state_dir.join("web1/ftvmm.log");
    cluster.wait_for(Duration::from_secs(20), "the backup to go live", || {
        std::fs::read_to_string(&b_log)
            .ok()?
            .contains("won the go-live claim")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(backup), "the backup must run on as the VM");
    let vm = cluster.wait_for(
        Duration::from_secs(10),
        "the failover to be recorded",
        || {
            let vm = cluster.ftctl_json(1, &["status", "web1"])?;
            (vm["last_failover"]["to_host"] == "b").then_some(vm)
        },
    );
    assert!(
        vm["last_failover"]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("the backup on b went live")),
        "{vm}"
    );
    let events = cluster.ftctl_at(2, &["events", "--backlog", "50"]);
    assert!(
        events
            .stdout
            .contains("web1: primary exited on a (signal 9); the backup on b went live"),
        "{}",
        events.stdout
    );
    // The replica that went live is the primary now (the same process), and goes on
    // serving: the leader clones a new backup from it next (see the test below).
    let b_metrics = cluster.wait_for(
        Duration::from_secs(10),
        "b's replica relabelled primary",
        || {
            let text = http_get(cluster.ftd("b").metrics_port, "/metrics")?;
            text.contains("ftvmm_go_live_seconds{vm=\"web1\",replica=\"primary\"}")
                .then_some(text)
        },
    );
    assert!(alive(backup), "{b_metrics}");
}

#[test]
fn a_stalled_backup_is_not_protection_though_both_processes_run() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup process on b");
    // Frozen, the backup still runs as far as its ftd can see, but it follows nothing:
    // the primary declares it lost after the peer timeout of silence and runs on alone.
    let stopped = run(Command::new("kill").args(["-STOP", &backup.to_string()]));
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    let vm = cluster.wait_for(Duration::from_secs(15), "web1 not protected", || {
        let vm = cluster.ftctl_json(1, &["status", "web1"])?;
        (vm["protection"] == "not_protected").then_some(vm)
    });
    let _ = run(Command::new("kill").args(["-KILL", &backup.to_string()]));
    assert_eq!(
        vm["reason"], "need secondary: the primary on a lost its backup on b",
        "{vm}"
    );
    assert_eq!(
        replica(&vm, "backup").expect("a backup replica")["state"],
        "running",
        "the backup process was still there: {vm}"
    );
    let human = cluster.ftctl_at(0, &["status", "web1"]);
    assert!(
        human
            .stdout
            .contains("protection:     Not protected: need secondary"),
        "{human:?}"
    );
    let events = cluster.ftctl_at(2, &["events", "--backlog", "50"]);
    assert!(
        events
            .stdout
            .contains("web1 is not protected: need secondary"),
        "{}",
        events.stdout
    );
}

#[test]
fn after_each_failover_a_new_backup_is_cloned_from_the_survivor() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();

    // First failover: the primary on a is killed; b's replica goes live, the leader makes
    // it the primary (the same process, replica 2) and clones a new backup from it as
    // generation 2 onto c (a new backup avoids the host the failover came from).
    let killed = cluster.ftctl_at(2, &["failover", "web1", "--test"]);
    assert_eq!(killed.code, Some(0), "{killed:?}");
    let vm = protected_by_a_clone(&cluster, "b", "c");
    let primary = replica(&vm, "primary").expect("primary");
    let backup = replica(&vm, "backup").expect("backup");
    assert_eq!(
        (primary["id"].as_u64(), primary["generation"].as_u64()),
        (Some(2), Some(2)),
        "{vm}"
    );
    assert_eq!(
        (backup["id"].as_u64(), backup["generation"].as_u64()),
        (Some(3), Some(2)),
        "{vm}"
    );
    assert_eq!(vm["last_failover"]["from_host"], "a", "{vm}");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    let clone = replica_pid(&cluster, "c", "backup").expect("the clone runs on c");
    let clone_cmdline = cmdline(clone);
    assert!(
        flag(&clone_cmdline, "--generation") == Some("2")
            && flag(&clone_cmdline, "--role") == Some("backup")
            && flag(&clone_cmdline, "--clone-from")
                .is_some_and(|addr| addr.starts_with("127.0.0.1:"))
            && flag(&clone_cmdline, "--clone-listen")
                .is_some_and(|addr| addr.starts_with("127.0.0.1:")),
        "{clone_cmdline}"
    );
    // The primary on b says so itself: generation 2, protected.
    let b_socket = control_socket(&cluster, "b", 2);
    let b_status = unix_request(&b_socket, b"status\n").expect("b's replica answers");
    assert!(
        b_status.contains(" role=primary ")
            && b_status.contains(" generation=2 ")
            && b_status.contains(" protected=1 "),
        "{b_status}"
    );
    let events = cluster.ftctl_at(1, &["events", "--backlog", "100"]);
    for kind in ["failover", "promoted", "backup-placed", "protected"] {
        assert!(
            events.stdout.contains(&format!(" {kind} ")),
            "{kind}: {}",
            events.stdout
        );
    }

    // Second failover: the clone on c takes over (claim of generation 2) and a new backup
    // is cloned from it onto a (named in --hosts; b is where the failover came from),
    // generation 3. The guest never stopped running.
    let before = exit_ordinal(&b_socket).expect("b's exit ordinal");
    let killed = cluster.ftctl_at(0, &["failover", "web1", "--test"]);
    assert_eq!(killed.code, Some(0), "{killed:?}");
    assert!(killed.stdout.contains(" on b)"), "{killed:?}");
    let vm = protected_by_a_clone(&cluster, "c", "a");
    let primary = replica(&vm, "primary").expect("primary");
    let backup = replica(&vm, "backup").expect("backup");
    assert_eq!(
        (primary["id"].as_u64(), primary["generation"].as_u64()),
        (Some(3), Some(3)),
        "{vm}"
    );
    assert_eq!(
        (backup["id"].as_u64(), backup["generation"].as_u64()),
        (Some(4), Some(3)),
        "{vm}"
    );
    assert_eq!(vm["last_failover"]["from_host"], "b", "{vm}");
    let after = exit_ordinal(&control_socket(&cluster, "c", 3)).expect("c's exit ordinal");
    assert!(after > before, "the guest ran on: {before} -> {after}");
    // b runs only the new backup: the killed replica's files are gone.
    assert!(
        !cluster
            .ftd("b")
            .state_dir
            .join("web1/replica-2.pid")
            .exists(),
        "the dead replica 2 is forgotten on b"
    );
}

/// The private disk files of `vm` in a state directory: (replica number, path).
fn private_disks(state_dir: &std::path::Path, vm: &str) -> Vec<(u64, PathBuf)> {
    let mut disks: Vec<(u64, PathBuf)> = std::fs::read_dir(state_dir.join("disks"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let replica = name
                .strip_prefix(&format!("{vm}-"))?
                .strip_suffix(".img")?
                .rsplit_once("-r")?
                .1
                .parse()
                .ok()?;
            Some((replica, entry.path()))
        })
        .collect();
    disks.sort();
    disks
}

/// The bytes of a kv guest's disk up to its last non-zero byte (its append-only log
/// starts at byte 0).
fn disk_data(path: &std::path::Path) -> Vec<u8> {
    let mut data = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let end = data
        .iter()
        .rposition(|byte| *byte != 0)
        .map_or(0, |last| last + 1);
    data.truncate(end);
    data
}

/// Private disks end to end, on three namespace hosts with the kv guest: each replica
/// of the pair runs on a disk its host made, the client's writes reach both, the
/// primary's process dies under the client, the backup goes live on its own disk, a new
/// backup is cloned onto the third host with a copy of it, and every acknowledged write
/// reads back, from the guest and from the disks themselves. The dead primary's disk
/// goes once the leader has moved on, the others with the VM.
#[test]
fn a_vm_with_private_disks_fails_over_and_is_cloned_anew_with_its_disk() {
    use ftvm_tests::cluster::{replica_of, Binaries, Cluster};
    const WRITES: u32 = 400;
    const FAIL_AT: u32 = 200;
    require_kvm();
    let _one_at_a_time = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bins = Binaries {
        ftvmm: binary("ftvmm"),
        ftd: binary("ftd"),
        ftctl: binary("ftctl"),
    };
    let dir = temp_dir("private-disks");
    let cluster = Cluster::start("pdk", &["a", "b", "c"], bins, &dir, LEASE_TTL)
        .unwrap_or_else(|failure| panic!("the cluster did not start: {failure}"));
    let fail = |what: String| -> ! { panic!("{what}\n{}", cluster.logs()) };
    let state = |host: &str| {
        cluster
            .state_dir(host)
            .unwrap_or_else(|failure| panic!("{failure}"))
    };
    let status = || cluster.ftctl_json("c", &["status", "web1"]);
    let wait = |what: &str, seconds: u64, check: &mut dyn FnMut() -> Option<Value>| {
        ftvm_tests::cluster::wait_for(
            Duration::from_secs(seconds),
            Duration::from_millis(100),
            what,
            check,
        )
        .unwrap_or_else(|failure| fail(failure.to_string()))
    };

    let create = cluster.kv_private_create_args("web1", &guest("kv"), "64M");
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    cluster
        .ftctl_ok("c", &create)
        .unwrap_or_else(|failure| fail(failure.to_string()));
    let vm = wait("web1 protected", 30, &mut || {
        let vm = status()?;
        (vm["protection"] == "protected").then_some(vm)
    });
    assert_eq!(
        (&vm["disk_mode"], &vm["disk_size_bytes"], &vm["disk"]),
        (
            &Value::from("private"),
            &Value::from(64u64 << 20),
            &Value::Null
        ),
        "{vm}"
    );
    // The primary says so itself on its control socket.
    wait("the primary to report its private disk", 10, &mut || {
        let vm = status()?;
        (vm["primary_disk_mode"] == "private").then_some(vm)
    });
    let shown = cluster
        .ftctl_ok("c", &["status", "web1"])
        .unwrap_or_else(|failure| fail(failure.to_string()));
    assert!(
        shown.contains("disk:           private, 64.0 MiB per replica"),
        "{shown}"
    );

    // Each host made its replica's disk, empty at the size asked for, and started it on
    // that file, private.
    for (host, role, replica) in [("a", "primary", 1), ("b", "backup", 2)] {
        let disks = private_disks(&state(host), "web1");
        assert_eq!(
            disks.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [replica],
            "{host}: {disks:?}"
        );
        let disk = &disks[0].1;
        let size = std::fs::metadata(disk).map(|meta| meta.len()).ok();
        assert_eq!(size, Some(64 << 20), "{}", disk.display());
        let pid = replica_of(&vm, role).expect("a replica")["pid"]
            .as_u64()
            .expect("a pid");
        let line = cmdline(u32::try_from(pid).expect("a pid"));
        assert!(
            flag(&line, "--disk") == Some(&*disk.display().to_string())
                && line.contains(" --disk-private"),
            "{line}"
        );
    }

    // The client writes over one connection; just before write FAIL_AT the primary's
    // process dies (SIGKILL: a crashed VMM; its host and ftd live on).
    let guest_ip = cluster.lan.guest_ip();
    let mut writes = ftvm_tests::AckedWrites::connect(
        &cluster.lan.client.name,
        &format!("{guest_ip}:6379"),
        "pd",
    )
    // Values of one length: none is a part of another, so each can be found on a disk.
    .with_value_len(24);
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let result = writes.write_many(WRITES, |n| {
            if n == FAIL_AT {
                let _ = reached_tx.send(());
                let _ = go_rx.recv();
            }
        });
        (writes, result)
    });
    reached_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| fail(format!("the client did not reach write {FAIL_AT}")));
    let killed = cluster.kill_replicas("a");
    assert_eq!(killed.len(), 1, "one replica ran on a: {killed:?}");
    let _ = go_tx.send(());

    // b's replica goes live on its own disk and becomes the primary; a new backup is
    // cloned from it onto c (not a, where the failover came from), disk included.
    let mut clone_disk_seen = None;
    let vm = wait(
        "web1 protected by a clone on c of the primary on b",
        90,
        &mut || {
            let vm = status()?;
            if clone_disk_seen.is_none() && !vm["clone_disk"].is_null() {
                clone_disk_seen = Some(vm["clone_disk"].clone());
            }
            let (primary, backup) = (replica_of(&vm, "primary")?, replica_of(&vm, "backup")?);
            (vm["protection"] == "protected"
                && primary["host"] == "b"
                && backup["host"] == "c"
                && backup["cloned"] == true)
                .then_some(vm)
        },
    );
    assert_eq!(vm["last_failover"]["from_host"], "a", "{vm}");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    assert_eq!(vm["disk_mode"], "private", "{vm}");
    println!("clone disk copy seen in ftctl status: {clone_disk_seen:?}");

    let (mut writes, result) = writer.join().expect("the client thread");
    result.unwrap_or_else(|err| fail(format!("the client's connection broke: {err}")));
    assert_eq!(writes.acked(), WRITES as usize);
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");

    // The disks: b's (the live replica's, written as the backup until the failover and
    // as the primary since) and c's (the clone's copy) hold every acknowledged write and
    // are the same once the guest is idle. a's, the dead primary's, is stale by design:
    // a's ftd deleted it once the leader promoted b.
    let live = private_disks(&state("b"), "web1");
    let copy = private_disks(&state("c"), "web1");
    assert_eq!(
        live.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [2],
        "{live:?}"
    );
    assert_eq!(
        copy.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [3],
        "{copy:?}"
    );
    let (live, copy) = (live[0].1.clone(), copy[0].1.clone());
    let mut data = Vec::new();
    wait("the clone's disk to be the live replica's", 10, &mut || {
        data = disk_data(&live);
        (data == disk_data(&copy)).then_some(Value::Null)
    });
    let missing: Vec<&str> = writes
        .acked_writes()
        .iter()
        .map(|(_, value)| value.as_str())
        .filter(|value| {
            !data
                .windows(value.len())
                .any(|window| window == value.as_bytes())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes not on the live replica's disk ({} bytes of data): {missing:?}",
        data.len()
    );
    wait("a's ftd to delete the dead primary's disk", 20, &mut || {
        private_disks(&state("a"), "web1")
            .is_empty()
            .then_some(Value::Null)
    });

    // A planned switchover and a backup restart go the same way on private disks: the
    // backup on c, whose disk is a clone's copy, takes over as the primary; each new
    // backup is cloned with its disk; nothing acknowledged is lost.
    cluster
        .ftctl_ok("c", &["switchover", "web1", "--wait", "60"])
        .unwrap_or_else(|failure| fail(failure.to_string()));
    let vm = wait("web1 protected with its primary on c", 90, &mut || {
        let vm = status()?;
        let (primary, backup) = (replica_of(&vm, "primary")?, replica_of(&vm, "backup")?);
        (vm["protection"] == "protected" && primary["host"] == "c" && backup["cloned"] == true)
            .then_some(vm)
    });
    let backup_host = replica_of(&vm, "backup").expect("a backup")["host"]
        .as_str()
        .expect("a host")
        .to_owned();
    let switched_backup = replica_of(&vm, "backup").expect("a backup")["id"].clone();
    cluster
        .ftctl_ok("c", &["restart-backup", "web1", "--wait", "60"])
        .unwrap_or_else(|failure| fail(failure.to_string()));
    let vm = wait("web1 protected by a restarted backup", 90, &mut || {
        let vm = status()?;
        let backup = replica_of(&vm, "backup")?;
        (vm["protection"] == "protected"
            && replica_of(&vm, "primary")?["host"] == "c"
            && backup["cloned"] == true
            && backup["id"] != switched_backup)
            .then_some(vm)
    });
    let lost = writes.lost();
    assert!(
        lost.is_empty(),
        "lost after the switchover and the restart: {lost:?}"
    );
    // The primary's disk and its restarted backup's are the same once the guest is idle.
    let backup_host = replica_of(&vm, "backup").expect("a backup")["host"]
        .as_str()
        .map_or(backup_host, str::to_owned);
    wait(
        "the restarted backup's disk to be the primary's",
        20,
        &mut || {
            let (primary, backup) = (
                private_disks(&state("c"), "web1"),
                private_disks(&state(&backup_host), "web1"),
            );
            let (primary, backup) = (primary.last()?, backup.last()?);
            (disk_data(&primary.1) == disk_data(&backup.1)).then_some(Value::Null)
        },
    );

    // The primary's disk, idle, is the image a new VM's private disks start from.
    let seed = dir.join("web1-seed.img");
    let primary_disk = private_disks(&state("c"), "web1")
        .last()
        .map(|(_, path)| path.clone())
        .expect("the primary's disk on c");
    std::fs::copy(&primary_disk, &seed).expect("copy the primary's disk");

    // Deleted: every replica stops, and its host deletes its disk once it has.
    cluster
        .ftctl_ok("c", &["delete", "web1"])
        .unwrap_or_else(|failure| fail(failure.to_string()));
    wait("the disks of web1 to go with it", 30, &mut || {
        ["a", "b", "c"]
            .iter()
            .all(|host| private_disks(&state(host), "web1").is_empty())
            .then_some(Value::Null)
    });

    // web2's private disks start as copies of that image: its kv has every key web1 had.
    let mut create = cluster.kv_private_create_args("web2", &guest("kv"), "64M");
    create.extend(["--disk-image".to_owned(), seed.display().to_string()]);
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    cluster
        .ftctl_ok("c", &create)
        .unwrap_or_else(|failure| fail(failure.to_string()));
    wait("web2 protected", 30, &mut || {
        let vm = cluster.ftctl_json("c", &["status", "web2"])?;
        (vm["protection"] == "protected").then_some(vm)
    });
    let shown = cluster
        .ftctl_ok("c", &["status", "web2"])
        .unwrap_or_else(|failure| fail(failure.to_string()));
    assert!(
        shown.contains(&format!(
            "per replica (each on its own host), from {}",
            seed.display()
        )),
        "{shown}"
    );
    for (key, value) in writes.acked_writes().iter().step_by(40) {
        assert_eq!(
            &ftvm_tests::redis_cli_at(&cluster.lan.client, &guest_ip, &["GET", key]),
            value,
            "{key} is not on web2's disk"
        );
    }
    cluster
        .ftctl_ok("c", &["delete", "web2"])
        .unwrap_or_else(|failure| fail(failure.to_string()));
    // Passed: the scratch directory goes once the cluster has (kept after a failure).
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restart_backup_clones_a_fresh_backup_from_the_running_primary() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let old_backup = replica_pid(&cluster, "b", "backup").expect("a backup on b");

    let ran = cluster.ftctl_at(2, &["restart-backup", "web1", "--wait", "60"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("web1 is protected again after")
            && ran.stdout.contains("backup on b (replica 3, generation 2)"),
        "{ran:?}"
    );
    let vm = protected_by_a_clone(&cluster, "a", "b");
    assert_eq!(replica(&vm, "primary").expect("primary")["id"], 1, "{vm}");
    assert!(
        vm["last_failover"].is_null(),
        "a restart is not a failover: {vm}"
    );
    cluster.wait_for(Duration::from_secs(10), "the old backup to end", || {
        (!alive(old_backup)).then_some(())
    });
    let events = cluster.ftctl_at(0, &["events", "--backlog", "100"]);
    assert!(
        events.stdout.contains(" backup-restart "),
        "{}",
        events.stdout
    );

    // The operator chooses the host: c, not where placement would put it (b again).
    let ran = cluster.ftctl_at(0, &["restart-backup", "web1", "--to", "c", "--wait", "60"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("backup on c (replica 4"), "{ran:?}");
    protected_by_a_clone(&cluster, "a", "c");
    // Not onto the primary's own host, nor onto a host that is not there.
    for (to, why) in [
        ("a", "host a runs the primary"),
        ("zz", "host zz is not registered"),
    ] {
        let refused = cluster.ftctl_at(0, &["restart-backup", "web1", "--to", to]);
        assert_eq!(refused.code, Some(1), "{refused:?}");
        assert!(refused.stderr.contains(why), "{refused:?}");
    }
    assert_eq!(
        replica(&cluster.wait_protected(), "backup").expect("a backup")["host"],
        "c"
    );

    // An unknown VM is a one-line error.
    let unknown = cluster.ftctl_at(1, &["restart-backup", "nope"]);
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.stderr.contains("nope"), "{unknown:?}");
}

#[test]
fn when_the_backups_host_dies_a_new_backup_is_cloned_onto_another_host() {
    let mut cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup on b");

    // Host b dies: its ftd and its replica, nothing cleaned up. The primary loses its
    // backup at once; the leader sees host b down when its lease ends, and clones a new
    // backup from the running primary onto c, the only other live host.
    cluster.ftd_mut("b").kill();
    let _ = run(Command::new("kill").args(["-KILL", &backup.to_string()]));
    let vm = protected_by_a_clone(&cluster, "a", "c");
    let backup = replica(&vm, "backup").expect("backup");
    assert_eq!(
        (backup["id"].as_u64(), backup["generation"].as_u64()),
        (Some(3), Some(2)),
        "{vm}"
    );
    assert!(
        vm["last_failover"].is_null(),
        "a lost backup is not a failover: {vm}"
    );
    let events = cluster.ftctl_at(0, &["events", "--backlog", "100"]);
    assert!(
        events
            .stdout
            .contains("web1: new backup on c, cloned from the running primary on a"),
        "{}",
        events.stdout
    );
}

#[test]
fn a_vm_deleted_after_a_failover_and_created_again_fails_over_as_a_new_life() {
    let cluster = TestCluster::start();
    cluster.create_vm("w1");
    cluster.wait_vm_protected("w1");
    let old_uid = spec_uid(&cluster, "w1");
    let old_claims = format!("/ft/vms/w1/uid/{old_uid}/");

    // One failover: the backup on b wins generation 1's claim and a clone on c follows it.
    let killed = cluster.ftctl_at(2, &["failover", "w1", "--test"]);
    assert_eq!(killed.code, Some(0), "{killed:?}");
    vm_protected_by_a_clone(&cluster, "w1", "b", "c");
    assert!(
        !cluster.keys_under(&old_claims).is_empty(),
        "the first life's go-live claim is stored"
    );

    // Deleted: gone from the API, then everything of that life, its claims included.
    let ran = cluster.ftctl_at(0, &["delete", "w1"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    cluster.wait_for(Duration::from_secs(20), "w1 to be gone", || {
        (cluster.ftctl_at(1, &["status", "w1"]).code == Some(1)).then_some(())
    });
    cluster.wait_for(
        Duration::from_secs(20),
        "every key of the deleted w1 to be removed",
        || cluster.keys_under("/ft/vms/w1/").is_empty().then_some(()),
    );
    let deleted_at = cluster
        .events()
        .iter()
        .rev()
        .find(|event| event["kind"] == "vm-deleted" && event["vm"] == "w1")
        .and_then(|event| event["seq"].as_u64())
        .expect("a vm-deleted event");

    // Created again: a new life, whose pair claims afresh.
    let primary = cluster.create_vm("w1");
    cluster.wait_vm_protected("w1");
    let new_uid = spec_uid(&cluster, "w1");
    assert_ne!(new_uid, old_uid);
    let before_kill = events_of_after(&cluster.events(), "w1", deleted_at);
    for event in &before_kill {
        assert!(
            !["failover", "promoted", "backup-placed"]
                .contains(&event["kind"].as_str().unwrap_or("")),
            "nothing of the old life may act on the new one: {before_kill:?}"
        );
    }

    // kill -9 of the new primary: the backup on b goes live, is promoted and gets a clone.
    let _ = Command::new("kill")
        .args(["-9", &primary.to_string()])
        .status();
    let vm = vm_protected_by_a_clone(&cluster, "w1", "b", "c");
    assert_eq!(vm["last_failover"]["from_host"], "a", "{vm}");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    let after = events_of_after(&cluster.events(), "w1", deleted_at);
    let failovers: Vec<&Value> = after
        .iter()
        .filter(|event| event["kind"] == "failover")
        .collect();
    assert_eq!(failovers.len(), 1, "{after:?}");
    assert!(
        failovers[0]["message"].as_str().is_some_and(
            |text| text.contains("primary exited on a (signal 9); the backup on b went live")
        ),
        "{after:?}"
    );
    let promoted: Vec<&Value> = after
        .iter()
        .filter(|event| event["kind"] == "promoted")
        .collect();
    assert_eq!(promoted.len(), 1, "{after:?}");
    assert!(
        promoted[0]["message"]
            .as_str()
            .is_some_and(|text| text.ends_with("(generation 1)")),
        "the new life's pair starts at generation 1: {after:?}"
    );
    assert!(
        cluster.keys_under(&old_claims).is_empty(),
        "no claim of the old life is back"
    );
    assert!(
        !cluster
            .keys_under(&format!("/ft/vms/w1/uid/{new_uid}/"))
            .is_empty(),
        "the new life's claim is stored"
    );
}

#[test]
fn an_etcd_outage_is_not_taken_for_host_deaths() {
    const FREEZE: Duration = Duration::from_secs(15);
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let primary = replica_pid(&cluster, "a", "primary").expect("the primary on a");
    let backup = replica_pid(&cluster, "b", "backup").expect("the backup on b");
    let assignments = ["primary", "backup"]
        .map(|role| stored(&cluster, &format!("/ft/vms/web1/replicas/{role}")));
    let last_before = cluster
        .events()
        .last()
        .and_then(|event| event["seq"].as_u64())
        .expect("events");

    let health = cluster.ftctl_at(0, &["health"]);
    assert_eq!(
        (health.code, health.stdout.as_str()),
        (Some(0), "serving\n"),
        "{health:?}"
    );

    // etcd freezes for 15 s: every lease (TTL 3 s) runs out meanwhile.
    let etcd = cluster.etcd.pid().to_string();
    let stopped = run(Command::new("kill").args(["-STOP", &etcd]));
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    let frozen = Instant::now();
    // Its calls to etcd time out after 5 s: then ftd's health check says so.
    std::thread::sleep(Duration::from_secs(10));
    let health = cluster.ftctl_at(0, &["health"]);
    assert_eq!(
        (health.code, health.stdout.as_str()),
        (Some(69), "not serving\n"),
        "the gRPC health check during an etcd freeze: {health:?}"
    );
    std::thread::sleep(FREEZE.saturating_sub(frozen.elapsed()));
    let resumed = run(Command::new("kill").args(["-CONT", &etcd]));
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    let back = Instant::now();

    // The cluster answers again with its three hosts and a leader.
    cluster.wait_for(
        Duration::from_secs(30),
        "three hosts and a leader again",
        || {
            let hosts = cluster.hosts(0)?;
            (hosts.len() == 3 && leader_of(&hosts).is_some()).then_some(())
        },
    );
    let settled = back.elapsed();
    cluster.wait_for(Duration::from_secs(10), "ftd serving again", || {
        (cluster.ftctl_at(0, &["health"]).code == Some(0)).then_some(())
    });
    // Time for a wrong conclusion to show: three lease TTLs more.
    std::thread::sleep(Duration::from_secs(3 * LEASE_TTL));
    let events: Vec<Value> = cluster
        .events()
        .into_iter()
        .filter(|event| event["seq"].as_u64() > Some(last_before))
        .collect();
    eprintln!(
        "etcd frozen {:?}; cluster answering {settled:?} after SIGCONT; events since the freeze:",
        back - frozen
    );
    for event in &events {
        eprintln!(
            "  {} {:<12} {}",
            event["seq"],
            event["kind"].as_str().unwrap_or(""),
            event["message"].as_str().unwrap_or("")
        );
    }
    let named: Vec<&Value> = events
        .iter()
        .filter(|event| {
            event["message"]
                .as_str()
                .is_some_and(|text| text.contains("etcd unavailable for"))
        })
        .collect();
    assert!(
        named.len() == 1 && named[0]["kind"] == "store-outage",
        "the outage has one event of its own: {events:#?}"
    );
    for event in &events {
        let kind = event["kind"].as_str().unwrap_or("");
        assert!(
            ![
                "host-down",
                "failover",
                "promoted",
                "backup-placed",
                "unprotected"
            ]
            .contains(&kind),
            "an etcd outage is no host death: {event}\n{events:#?}"
        );
    }
    let vm = cluster.ftctl_json(0, &["status", "web1"]).expect("status");
    assert_eq!(vm["protection"], "protected", "{vm}");
    assert!(vm["last_failover"].is_null(), "{vm}");
    assert_eq!(
        ["primary", "backup"]
            .map(|role| stored(&cluster, &format!("/ft/vms/web1/replicas/{role}"))),
        assignments,
        "the assignments (hosts, replica numbers, generation) are unchanged"
    );
    assert_eq!(replica_pid(&cluster, "a", "primary"), Some(primary));
    assert_eq!(replica_pid(&cluster, "b", "backup"), Some(backup));
    assert!(alive(primary) && alive(backup));
}

#[test]
fn a_switchover_swaps_the_roles_without_a_failover_and_clones_a_new_backup() {
    let cluster = TestCluster::start();
    let old_primary = cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("the backup on b");
    let b_socket = control_socket(&cluster, "b", 2);
    let before = exit_ordinal(&b_socket).expect("b's exit ordinal");
    let last_before = cluster
        .events()
        .last()
        .and_then(|event| event["seq"].as_u64())
        .expect("events");

    // Asked of host c (forwarded to the leader); the primary on a hands over to b.
    let ran = cluster.ftctl_at(2, &["switchover", "web1", "--wait", "30"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout
            .contains("web1 switched over and is protected again after")
            && ran.stdout.contains("primary on b (replica 2), backup on a"),
        "{ran:?}"
    );
    let vm = protected_by_a_clone(&cluster, "b", "a");
    // The backup process itself took over (no restart), the old primary is gone.
    assert_eq!(
        replica(&vm, "primary").expect("a primary")["pid"].as_u64(),
        Some(u64::from(backup)),
        "{vm}"
    );
    cluster.wait_for(Duration::from_secs(10), "the old primary to end", || {
        (!alive(old_primary)).then_some(())
    });
    assert!(
        exit_ordinal(&b_socket).is_some_and(|now| now > before),
        "the guest runs on from where it was"
    );
    // A planned swap: no failover counted or recorded.
    assert_eq!(vm["failovers"], 0, "{vm}");
    assert!(vm["last_failover"].is_null(), "{vm}");
    let events = events_of_after(&cluster.events(), "web1", last_before);
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|event| event["kind"].as_str())
        .collect();
    for kind in [
        "switchover-requested",
        "switchover",
        "promoted",
        "backup-placed",
        "protected",
    ] {
        assert!(kinds.contains(&kind), "no {kind} event: {events:#?}");
    }
    assert!(!kinds.contains(&"failover"), "{events:#?}");

    // And back: the clone on a is the primary again.
    let ran = cluster.ftctl_at(0, &["switchover", "web1", "--wait", "30"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let vm = cluster.wait_protected();
    assert_eq!(
        replica(&vm, "primary").expect("a primary")["host"],
        "a",
        "{vm}"
    );
    assert_eq!(vm["failovers"], 0, "{vm}");

    // A switchover needs protection: refused while a backup is being cloned.
    let ran = cluster.ftctl_at(0, &["switchover", "web1"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let again = cluster.ftctl_at(0, &["switchover", "web1"]);
    assert_eq!(again.code, Some(1), "{again:?}");
    assert!(
        again
            .stderr
            .contains("a switchover of vm web1 is under way")
            || again
                .stderr
                .contains("a switchover needs a backup that follows"),
        "{again:?}"
    );
}

#[test]
fn draining_a_host_moves_its_replicas_away_and_places_none_there() {
    let cluster = TestCluster::start();
    // w1: primary on a, backup on b; w2: primary on b, backup on a.
    cluster.create_hello(1, "w1", Some("a,b"));
    cluster.create_hello(1, "w2", Some("b,a"));
    for vm in ["w1", "w2"] {
        cluster.wait_vm_protected(vm);
    }

    let ran = cluster.ftctl_at(2, &["host", "drain", "a", "--wait", "60"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("host a is drained")
            && ran.stdout.contains("w1: switching over")
            && ran.stdout.contains("w2: the backup on a is replaced")
            && ran.stdout.contains("host a is empty after"),
        "{ran:?}"
    );
    for vm in ["w1", "w2"] {
        let status = cluster.wait_vm_protected(vm);
        let replicas = status["replicas"].as_array().expect("replicas");
        assert!(
            replicas
                .iter()
                .all(|replica| replica["host"] != "a" || replica["state"] == "exited"),
            "{vm} still on a: {status}"
        );
        assert_eq!(status["failovers"], 0, "{status}");
    }
    let hosts = cluster.hosts(0).expect("hosts");
    let a = hosts.iter().find(|host| host["name"] == "a").expect("a");
    assert_eq!(a["drained"], true, "{hosts:?}");
    // Every host says what CPU its guests see (one machine here: the same everywhere).
    let cpus: BTreeSet<&str> = hosts
        .iter()
        .filter_map(|host| host["cpu"].as_str()?.split_whitespace().next())
        .collect();
    assert!(
        cpus.len() == 1 && cpus.iter().all(|cpu| cpu.starts_with("cpu=")),
        "{hosts:?}"
    );
    let table = cluster.ftctl_at(0, &["hosts"]);
    assert!(
        table.stdout.contains(" CPU")
            && table
                .stdout
                .contains(cpus.first().expect("a cpu").trim_start_matches("cpu=")),
        "{table:?}"
    );

    // A VM that names the drained host waits for it, saying why.
    cluster.create_hello(0, "w3", Some("a,c"));
    cluster.wait_for(Duration::from_secs(10), "w3 waiting for a", || {
        let status = cluster.ftctl_json(0, &["status", "w3"])?;
        status["reason"]
            .as_str()?
            .contains("host a is drained")
            .then_some(())
    });
    // Undrained, a takes it.
    let ran = cluster.ftctl_at(0, &["host", "undrain", "a"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let w3 = cluster.wait_vm_protected("w3");
    assert_eq!(
        replica(&w3, "primary").expect("a primary")["host"],
        "a",
        "{w3}"
    );
}

/// etcd over TLS with client certificates and a user whose role reaches only /ft/: the
/// ftds keep the cluster there, and the replicas' arbiter claims the go-live there with
/// the same credentials (ftd hands them on), so a failover works end to end.
#[test]
fn etcd_over_tls_with_a_user_carries_the_cluster_and_the_go_live_claim() {
    require_kvm();
    let mut ftds = three_ftds();
    let pki = ftds[0].pki.clone();
    let ca = pki.join("ca");
    certs(&[
        "issue",
        "--dir",
        ca.to_str().expect("utf-8 path"),
        "--server",
        "etcd",
        "--san",
        "127.0.0.1",
        "--out",
        pki.join("etcd").to_str().expect("utf-8 path"),
    ]);
    let password = pki.join("etcd-password");
    std::fs::write(&password, "s3cret-ftd\n").expect("password file");
    // etcdctl as root, over TLS (any certificate of the CA gets through TLS; the user
    // decides what it may do once auth is on).
    let etcdctl = |endpoint: &str, user: Option<&str>, args: &[&str]| {
        let client = pki.join("host-a");
        let mut command = Command::new("etcdctl");
        command
            .args(["--endpoints", endpoint])
            .arg(format!("--cacert={}", client.join("ca.pem").display()))
            .arg(format!("--cert={}", client.join("cert.pem").display()))
            .arg(format!("--key={}", client.join("key.pem").display()))
            .env("ETCDCTL_API", "3");
        if let Some(user) = user {
            command.arg(format!("--user={user}"));
        }
        run(command.args(args))
    };
    let etcd_tls = pki.join("etcd");
    let start_etcd = || {
        let etcd = LocalEtcd::start_tls(&etcd_tls);
        let ok = |ran: Ran| assert_eq!(ran.code, Some(0), "{ran:?}");
        let endpoint = etcd.endpoint.as_str();
        for args in [
            &["user", "add", "root", "--new-user-password=root-pw"][..],
            &["role", "add", "ftvm"],
            &[
                "role",
                "grant-permission",
                "ftvm",
                "--prefix=true",
                "readwrite",
                "/ft/",
            ],
            &["user", "add", "ftd", "--new-user-password=s3cret-ftd"],
            &["user", "grant-role", "ftd", "ftvm"],
            &["auth", "enable"],
        ] {
            ok(etcdctl(endpoint, None, args));
        }
        etcd
    };
    for ftd in &mut ftds {
        ftd.extra = vec![
            "--etcd-tls-dir".into(),
            pki.join(format!("host-{}", ftd.name)).into(),
            "--etcd-user".into(),
            "ftd".into(),
            "--etcd-password-file".into(),
            password.clone().into(),
        ];
    }
    let cluster = TestCluster::start_with(ftds, start_etcd);
    let endpoint = cluster.etcd.endpoint.clone();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    // Auth is on: without the user, or outside /ft/, nothing is read.
    let anonymous = etcdctl(&endpoint, None, &["get", "--prefix", "/ft/"]);
    assert_ne!(anonymous.code, Some(0), "{anonymous:?}");
    let elsewhere = etcdctl(&endpoint, Some("ftd:s3cret-ftd"), &["put", "/other", "x"]);
    assert_ne!(elsewhere.code, Some(0), "{elsewhere:?}");
    let hosts = etcdctl(
        &endpoint,
        Some("ftd:s3cret-ftd"),
        &["get", "--prefix", "--keys-only", "/ft/hosts/"],
    );
    assert!(hosts.stdout.contains("/ft/hosts/a"), "{hosts:?}");

    let primary = cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup process on b");
    let backup_cmdline = cmdline(backup);
    assert!(
        flag(&backup_cmdline, "--arbiter").is_some_and(|spec| spec.starts_with("etcd://"))
            && flag(&backup_cmdline, "--etcd-user") == Some("ftd")
            && flag(&backup_cmdline, "--etcd-tls-dir").is_some_and(|dir| dir.ends_with("host-b")),
        "{backup_cmdline}"
    );
    let _ = Command::new("kill")
        .args(["-9", &primary.to_string()])
        .status();
    let vm = cluster.wait_for(Duration::from_secs(20), "the failover to b", || {
        let vm = cluster.ftctl_json(1, &["status", "web1"])?;
        (vm["last_failover"]["to_host"] == "b").then_some(vm)
    });
    assert!(alive(backup), "{vm}");
    // The claim the backup won is in etcd, under the VM's generation.
    let claims = etcdctl(
        &endpoint,
        Some("ftd:s3cret-ftd"),
        &["get", "--prefix", "/ft/vms/web1/"],
    );
    assert!(claims.stdout.contains("/live"), "{claims:?}");
}

/// `ftctl create --image FILE` uploads the guest once: the cluster keeps it by its
/// SHA-256, the hosts that run replicas fetch a verified copy, and a host whose copy was
/// changed on disk does not run it: it fetches the image again and says so.
#[test]
fn an_uploaded_image_runs_on_every_host_and_a_tampered_copy_is_not_used() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    let vm = cluster.wait_protected();
    let original = std::fs::read(guest("hello")).expect("the hello guest");
    let sha256 = vm["image"]
        .as_str()
        .and_then(|image| image.strip_prefix("sha256:"))
        .unwrap_or_else(|| panic!("the image is not by hash: {vm}"))
        .to_owned();
    assert_eq!(sha256.len(), 64, "{vm}");
    assert!(
        cluster
            .keys_under("/ft/images/")
            .contains(&format!("/ft/images/{sha256}/meta")),
        "the image is not in the store"
    );
    let copy = |host: &str| {
        cluster
            .ftd(host)
            .state_dir
            .join("images")
            .join(format!("{sha256}.elf"))
    };
    for host in ["a", "b"] {
        assert_eq!(
            std::fs::read(copy(host)).ok().as_deref(),
            Some(&original[..]),
            "host {host}'s copy"
        );
    }
    assert!(!copy("c").exists(), "c runs no replica: it needs no copy");
    // A changed copy on c (the next backup's host): not used, fetched again.
    let mut tampered = original.clone();
    tampered[200] ^= 0xff;
    std::fs::create_dir_all(copy("c").parent().expect("a directory")).expect("images dir");
    std::fs::write(copy("c"), &tampered).expect("tamper");
    let ran = cluster.ftctl_at(0, &["restart-backup", "web1", "--to", "c", "--wait", "60"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let vm = cluster.wait_protected();
    assert_eq!(
        replica(&vm, "backup").expect("a backup")["host"],
        "c",
        "{vm}"
    );
    assert_eq!(
        std::fs::read(copy("c")).ok().as_deref(),
        Some(&original[..])
    );
    let log = cluster.ftd("c").log_text();
    assert!(
        log.contains("did not have its hash"),
        "ftd c did not say its copy was bad:\n{log}"
    );
}
