//! One cluster at a time: creating a VM, the leader, ftd restarts, the failover test
//! command, bad requests, ftds that start before etcd.

use super::*;

#[test]
fn create_runs_the_primary_on_the_first_host_and_the_backup_on_the_second() {
    let cluster = TestCluster::start();
    let pid = cluster.create_web1();

    assert!(alive(pid));
    let a_state = cluster.ftd("a").state_dir.display().to_string();
    assert!(
        cmdline(pid).contains(&format!("--console {a_state}/web1/console.log")),
        "the primary must be host a's ftvmm: {}",
        cmdline(pid)
    );
    let pid_file = std::fs::read_to_string(cluster.ftd("a").state_dir.join("web1/replica-1.pid"))
        .expect("host a records the primary's pid (replica 1)");
    assert_eq!(pid_file.trim(), pid.to_string());
    assert!(
        pid_files(&cluster.ftd("c").state_dir).is_empty(),
        "no replica may run on c"
    );

    // Any ftd answers, in words and in JSON.
    let status = cluster.wait_for(Duration::from_secs(20), "web1 protected", || {
        let status = cluster.ftctl_at(2, &["status", "web1"]);
        status
            .stdout
            .contains("protection:     Protected")
            .then_some(status)
    });
    assert_eq!(status.code, Some(0), "{status:?}");
    assert!(
        status.stdout.contains(&format!("a running, pid {pid}")),
        "{}",
        status.stdout
    );
    let vm = cluster
        .ftctl_json(2, &["status", "web1"])
        .expect("status --json");
    assert_eq!(vm["protection"], "protected");
    assert_eq!(replica(&vm, "backup").expect("a backup")["host"], "b");

    let list = cluster.ftctl_at(0, &["list"]);
    assert!(
        list.stdout.contains("web1") && list.stdout.contains("a (running)"),
        "{list:?}"
    );

    // The console shows the guest booted.
    let console = cluster.wait_for(Duration::from_secs(10), "guest console output", || {
        std::fs::read_to_string(cluster.ftd("a").state_dir.join("web1/console.log"))
            .ok()
            .filter(|text| !text.is_empty())
    });
    assert!(!console.is_empty());
}

#[test]
fn killing_the_leader_elects_another_within_the_lease_ttl() {
    let mut cluster = TestCluster::start();
    let hosts = cluster.hosts(0).expect("hosts");
    let old = leader_of(&hosts).expect("a leader");
    let survivor = cluster
        .ftds
        .iter()
        .position(|ftd| ftd.name != old)
        .expect("another ftd");

    cluster.ftd_mut(&old).kill();
    let killed = Instant::now();
    let new = cluster.wait_for(Duration::from_secs(LEASE_TTL + 10), "a new leader", || {
        leader_of(&cluster.hosts(survivor)?).filter(|leader| *leader != old)
    });
    let took = killed.elapsed();
    eprintln!("leader {old} killed; {new} leads after {took:?} (lease TTL {LEASE_TTL} s)");
    assert!(
        took <= Duration::from_millis(LEASE_TTL * 1000 + 1000),
        "a new leader took {took:?}, more than the {LEASE_TTL} s lease TTL (+1 s polling)"
    );

    // The new leader takes changes; the dead host disappears from the host list.
    let image = guest("hello");
    let ran = cluster.ftctl_at(
        survivor,
        &[
            "create",
            "--vm",
            "after",
            "--image",
            image.to_str().expect("utf-8"),
            "--mem",
            "8M",
            "--cmdline",
            "ticks=1",
        ],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let hosts = cluster.hosts(survivor).expect("hosts");
    assert!(
        hosts.iter().all(|host| host["name"] != old.as_str()),
        "{hosts:?}"
    );
}

#[test]
fn a_restarted_ftd_readopts_its_running_replica() {
    let mut cluster = TestCluster::start();
    let pid = cluster.create_web1();
    let etcd = cluster.etcd.endpoint.clone();

    // Crash host a's ftd and bring it back: the guest must not notice.
    cluster.ftd_mut("a").kill();
    assert!(alive(pid), "ftvmm must survive its ftd");
    cluster.ftd_mut("a").start(&etcd);
    cluster.wait_for(Duration::from_secs(20), "host a to re-adopt web1", || {
        cluster
            .ftd("a")
            .log_text()
            .contains("re-adopted running replica")
            .then_some(())
    });

    assert!(alive(pid), "ftvmm must keep running across the ftd restart");
    let vm = cluster.wait_for(
        Duration::from_secs(10),
        "web1 running with the same pid",
        || {
            let vm = cluster.ftctl_json(0, &["status", "web1"])?;
            let primary = replica(&vm, "primary")?;
            (primary["state"] == "running" && primary["pid"].as_u64() == Some(u64::from(pid)))
                .then_some(vm)
        },
    );
    assert!(
        vm["last_failover"].is_null(),
        "an ftd restart is not a failover: {vm}"
    );
    let a_console = format!("{}/web1/console.log", cluster.ftd("a").state_dir.display());
    let copies = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid) && cmdline(*pid).contains(&a_console))
        .count();
    assert_eq!(copies, 1, "the restarted ftd must not start a second ftvmm");
    // The re-adopted replica answers the restarted ftd on its control socket.
    let metrics = cluster.wait_for(
        Duration::from_secs(10),
        "the re-adopted replica's metrics",
        || {
            let text = http_get(cluster.ftd("a").metrics_port, "/metrics")?;
            text.contains("ftvmm_exit_ordinal{vm=\"web1\",replica=\"primary\"}")
                .then_some(text)
        },
    );
    parse_prometheus(&metrics).unwrap_or_else(|err| panic!("{err}\n{metrics}"));
}

/// The `/proc/PID/status` lines a sandboxed replica must show: no root, no capability,
/// no group, no way back, the filter on.
fn assert_sandboxed(pid: u32, what: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("{what} (pid {pid}): {err}"));
    let line = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{what}: no {key} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("Uid:"), "65534 65534 65534 65534", "{what}: {status}");
    assert_eq!(line("Gid:"), "65534 65534 65534 65534", "{what}: {status}");
    assert_eq!(line("Groups:"), "", "{what}: {status}");
    assert_eq!(line("CapEff:"), "0000000000000000", "{what}: {status}");
    assert_eq!(line("CapPrm:"), "0000000000000000", "{what}: {status}");
    assert_eq!(line("NoNewPrivs:"), "1", "{what}: {status}");
    assert_eq!(line("Seccomp:"), "2", "{what}: {status}");
}

/// With `--replica-user` (as every ftd of these tests runs), both replicas, and the
/// backup cloned after a failover, run as that user under the system call filter; the
/// failover between them works as it does as root.
#[test]
fn replicas_run_unprivileged_under_the_system_call_filter() {
    let cluster = TestCluster::start();
    let primary = cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("the backup's pid on b");
    assert_sandboxed(primary, "the primary on a");
    assert_sandboxed(backup, "the backup on b");
    assert!(
        cmdline(primary).contains(&format!("--run-as {REPLICA_USER}")),
        "{}",
        cmdline(primary)
    );

    let ran = cluster.ftctl_at(0, &["failover", "web1", "--test"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let clone = cluster.wait_for(
        Duration::from_secs(30),
        "a new backup cloned from the backup that went live",
        || {
            let vm = cluster.ftctl_json(0, &["status", "web1"])?;
            let host = replica(&vm, "backup")?["host"].as_str()?.to_owned();
            (vm["protection"] == "protected" && replica(&vm, "primary")?["host"] == "b")
                .then_some(host)
        },
    );
    assert!(alive(backup), "the backup that went live runs on");
    assert_sandboxed(backup, "the backup that went live");
    let cloned = replica_pid(&cluster, &clone, "backup").expect("the clone's pid");
    assert_sandboxed(cloned, "the cloned backup");
    // The console of the live replica still grows: its files need no right it dropped.
    let console = cluster.ftd("b").state_dir.join("web1/console.log");
    assert!(
        std::fs::metadata(&console).map_or(0, |meta| meta.len()) > 0,
        "{}",
        console.display()
    );
}

#[test]
fn a_test_failover_is_refused_while_the_vm_is_not_protected() {
    let mut cluster = TestCluster::start();
    // Hosts b and c are gone: web1's primary runs on a alone, with no backup to take over.
    cluster.ftd_mut("b").kill();
    cluster.ftd_mut("c").kill();
    cluster.wait_for(
        Duration::from_secs(LEASE_TTL + 15),
        "a alone and leading",
        || {
            let hosts = cluster.hosts(0)?;
            (hosts.len() == 1 && leader_of(&hosts).as_deref() == Some("a")).then_some(())
        },
    );
    cluster.create_hello(0, "web1", None);
    let pid = cluster.wait_for(Duration::from_secs(15), "the primary on a", || {
        replica_pid(&cluster, "a", "primary")
    });
    let vm = cluster.wait_for(
        Duration::from_secs(LEASE_TTL + 15),
        "web1 running alone",
        || {
            let vm = cluster.ftctl_json(0, &["status", "web1"])?;
            (vm["protection"] == "not_protected").then_some(vm)
        },
    );
    let ran = cluster.ftctl_at(0, &["failover", "web1", "--test"]);
    assert_eq!(ran.code, Some(1), "{ran:?}\n{vm}");
    assert!(
        ran.stderr.contains("web1 is not protected")
            && ran.stderr.contains("a test failover would take it down"),
        "{ran:?}"
    );
    assert_eq!(ran.stderr.lines().count(), 1, "{ran:?}");
    assert!(alive(pid), "the primary must run on");
    let events = cluster.ftctl_at(0, &["events", "--backlog", "50"]);
    assert!(!events.stdout.contains("failover"), "{}", events.stdout);
}

#[test]
fn a_test_failover_kills_the_primary_and_is_recorded() {
    let mut cluster = TestCluster::start();
    let pid = cluster.create_web1();
    cluster.wait_protected();

    // Asked of host c, which forwards to the leader, which asks host a.
    let ran = cluster.ftctl_at(2, &["failover", "web1", "--test"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains(&format!("pid {pid} on a")),
        "{}",
        ran.stdout
    );
    cluster.wait_for(Duration::from_secs(10), "the primary to die", || {
        (!alive(pid)).then_some(())
    });

    let vm = cluster.wait_for(
        Duration::from_secs(10),
        "the failover to be recorded",
        || {
            let vm = cluster.ftctl_json(1, &["status", "web1"])?;
            (!vm["last_failover"].is_null()).then_some(vm)
        },
    );
    assert_eq!(vm["last_failover"]["from_host"], "a");
    assert_eq!(vm["failovers"], 1, "{vm}");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    assert!(
        vm["last_failover"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("signal 9")),
        "{vm}"
    );
    let events = cluster.ftctl_at(0, &["events", "--backlog", "50"]);
    assert!(events.stdout.contains("failover-test"), "{}", events.stdout);
    assert!(
        events.stdout.contains("the backup on b"),
        "{}",
        events.stdout
    );

    // The leader exports the VM's failovers and, once a clone protects it again, its
    // protection; the other ftds export no per-VM series.
    let (leader, metrics) = cluster.wait_for(
        Duration::from_secs(15),
        "the failover and protection again in the leader's metrics",
        || {
            cluster.ftds.iter().find_map(|ftd| {
                let text = http_get(ftd.metrics_port, "/metrics")?;
                (text.contains("ftd_is_leader 1")
                    && text.contains("ftd_failovers_total{vm=\"web1\"} 1\n")
                    && text.contains("ftd_vm_protected{vm=\"web1\"} 1\n"))
                .then_some((ftd.name, text))
            })
        },
    );
    assert!(
        metrics.contains("ftd_vms{protection=\"down\"} 0"),
        "the backup runs on as the VM: {metrics}"
    );
    parse_prometheus(&metrics).unwrap_or_else(|err| panic!("{err}\n{metrics}"));
    let mut exported: BTreeSet<String> = parse_prometheus(&metrics)
        .expect("parsed above")
        .into_iter()
        .map(|sample| sample.name)
        .collect();
    for ftd in cluster.ftds.iter().filter(|ftd| ftd.name != leader) {
        let text = http_get(ftd.metrics_port, "/metrics").expect("/metrics");
        assert!(
            !text.contains("ftd_vm_protected") && !text.contains("ftd_failovers_total{"),
            "{} is not the leader: {text}",
            ftd.name
        );
        let samples = parse_prometheus(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        exported.extend(samples.into_iter().map(|sample| sample.name));
    }
    // A protected pair runs: every metric the shipped alert rules and dashboard use is
    // one some ftd exports now.
    let used = deploy_metric_names();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "deploy/ uses metrics no ftd exports: {missing:?}\nexported: {exported:?}"
    );

    // The count is kept in etcd: the next leader goes on from it.
    let killed = Instant::now();
    cluster.ftd_mut(leader).kill();
    let survivor = cluster
        .ftds
        .iter()
        .position(|ftd| ftd.name != leader)
        .expect("another ftd");
    let next = cluster.wait_for(
        Duration::from_secs(LEASE_TTL + 15),
        "a new leader exporting the failover count",
        || {
            cluster
                .ftds
                .iter()
                .filter(|ftd| ftd.name != leader)
                .find_map(|ftd| {
                    let text = http_get(ftd.metrics_port, "/metrics")?;
                    (text.contains("ftd_is_leader 1")
                        && text.contains("ftd_failovers_total{vm=\"web1\"} 1\n"))
                    .then_some(ftd.metrics_port)
                })
        },
    );
    eprintln!(
        "leader {leader} killed; the next exports the count after {:?}",
        killed.elapsed()
    );

    // Deleting the VM removes it everywhere, its series too.
    let ran = cluster.ftctl_at(survivor, &["delete", "web1"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    cluster.wait_for(Duration::from_secs(10), "web1 to be gone", || {
        (cluster.ftctl_at(survivor, &["status", "web1"]).code == Some(1)).then_some(())
    });
    // (ftd_replica_starts_total{vm="web1"} stays: a counter lives as long as its ftd.)
    cluster.wait_for(Duration::from_secs(10), "web1's series to go", || {
        let text = http_get(next, "/metrics")?;
        text.lines()
            .all(|line| {
                !(line.starts_with("ftvmm_")
                    || line.starts_with("ftd_vm_protected")
                    || line.starts_with("ftd_failovers_total"))
                    || !line.contains("vm=\"web1\"")
            })
            .then_some(())
    });
}

#[test]
fn bad_requests_fail_with_one_line_errors_and_nonzero_exits() {
    let cluster = TestCluster::start();
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 7] = [
        (&["status", "nope"], "vm nope not found"),
        (&["delete", "nope"], "vm nope not found"),
        (&["status", "Bad_Name"], "invalid VM name 'Bad_Name'"),
        (
            &["create", "--vm", "x", "--image-on-hosts", "/no/such.elf"],
            "the image /no/such.elf is not a file on",
        ),
        (
            &["create", "--vm", "x", "--hosts", "a,zz", "--image", image],
            "host zz is not registered",
        ),
        (
            &["create", "--vm", "x", "--hosts", "a,a", "--image", image],
            "at most 2 distinct hosts",
        ),
        (
            &["create", "--vm", "x", "--mem", "1M", "--image", image],
            "guest memory 1048576 bytes",
        ),
    ];
    for (args, expected) in cases {
        let ran = cluster.ftctl_at(1, args);
        assert_eq!(ran.code, Some(1), "ftctl {args:?}: {ran:?}");
        assert!(
            ran.stderr.starts_with("ftctl: ") && ran.stderr.contains(expected),
            "ftctl {args:?}: {ran:?}"
        );
        assert_eq!(
            ran.stderr.trim_end().lines().count(),
            1,
            "one line: {ran:?}"
        );
    }

    // Disk flags that do not go together: usage errors (exit 2), nothing sent.
    let disk_cases: [(&[&str], &str); 3] = [
        (
            &["--disk-mode", "private"],
            "--disk-mode private needs --disk-size",
        ),
        (
            &["--disk-size", "8G"],
            "--disk-size is for --disk-mode private",
        ),
        (
            &[
                "--disk-mode",
                "private",
                "--disk-size",
                "8G",
                "--disk",
                "/d.img",
            ],
            "--disk is for --disk-mode shared",
        ),
    ];
    for (disk, expected) in disk_cases {
        let mut args = vec!["create", "--vm", "x", "--image", image];
        args.extend_from_slice(disk);
        let ran = cluster.ftctl_at(1, &args);
        assert_eq!(ran.code, Some(2), "ftctl {args:?}: {ran:?}");
        assert!(
            ran.stderr.starts_with("ftctl: ")
                && ran.stderr.contains(expected)
                && ran.stderr.trim_end().lines().count() == 1,
            "ftctl {args:?}: {ran:?}"
        );
    }
    assert_eq!(
        cluster.ftctl_at(1, &["status", "x"]).code,
        Some(1),
        "no VM x was made"
    );

    // Nothing listens on this port: exit 69 (unavailable).
    let ran = run(Command::new(binary("ftctl"))
        .args(["--endpoint", &format!("127.0.0.1:{}", free_port()), "list"])
        .arg("--tls-dir")
        .arg(cluster.credentials("operator")));
    assert_eq!(ran.code, Some(69), "{ran:?}");
    assert!(
        ran.stderr.starts_with("ftctl: cannot reach ftd at"),
        "{ran:?}"
    );

    // Concurrent creates of one name: exactly one wins.
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let endpoint = cluster.ftds[i].endpoint();
            let image = image.to_owned();
            let operator = cluster.credentials("operator");
            std::thread::spawn(move || {
                run(Command::new(binary("ftctl"))
                    .arg("--tls-dir")
                    .arg(operator)
                    .args([
                        "--endpoint",
                        &endpoint,
                        "create",
                        "--vm",
                        "race",
                        "--image",
                        &image,
                        "--mem",
                        "8M",
                        "--cmdline",
                        "ticks=1",
                    ]))
            })
        })
        .collect();
    let results: Vec<Ran> = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .collect();
    let winners = results.iter().filter(|ran| ran.code == Some(0)).count();
    assert_eq!(winners, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|ran| ran.code != Some(0))
            .all(|ran| ran.stderr.contains("vm race already exists")),
        "{results:?}"
    );

    // That guest (ticks=1) powers off at once: a clean stop, not a failover.
    let vm = cluster.wait_for(Duration::from_secs(20), "race to power off", || {
        let vm = cluster.ftctl_json(0, &["status", "race"])?;
        vm["reason"]
            .as_str()?
            .contains("the guest powered off")
            .then_some(vm)
    });
    assert!(
        vm["last_failover"].is_null(),
        "a power-off is not a failover: {vm}"
    );
}

#[test]
fn ftds_started_before_etcd_wait_for_it_and_then_form_the_cluster() {
    let lock = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Where etcd will be, once it is started: nothing answers there yet.
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut ftds = three_ftds();
    for ftd in &mut ftds {
        ftd.start(&endpoint);
    }
    std::thread::sleep(Duration::from_secs(2));
    for ftd in &mut ftds {
        let running = ftd
            .child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        assert!(
            running,
            "ftd {} gave up without etcd:\n{}",
            ftd.name,
            ftd.log_text()
        );
        assert!(
            ftd.log_text().contains("trying again"),
            "{}",
            ftd.log_text()
        );
    }
    let cluster = TestCluster {
        etcd: LocalEtcd::start_on(port),
        ftds,
        _lock: lock,
    };
    cluster.wait_for(
        Duration::from_secs(20),
        "three hosts and a leader once etcd is up",
        || {
            let hosts = cluster.hosts(0)?;
            (hosts.len() == 3 && leader_of(&hosts).is_some()).then_some(())
        },
    );
}

/// A host's state directory holds consoles, logs and control sockets: they are ftd's
/// user's alone (directories 0700, files and sockets 0600).
#[test]
fn a_hosts_state_directory_is_its_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let mut checked = 0;
    let mut pending = vec![cluster.ftd("a").state_dir.clone()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            for entry in std::fs::read_dir(&path).expect("read dir").flatten() {
                pending.push(entry.path());
            }
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        checked += 1;
    }
    // The state directory, web1's, its console, log, control socket, state files.
    assert!(checked >= 6, "only {checked} entries");
}

/// ftd runs ftvmm on the files a create names: only files inside the directories its
/// config allows (symbolic links followed), and never one disk for two VMs.
#[test]
fn create_refuses_files_outside_the_allowed_directories_and_a_disk_in_use() {
    let cluster = TestCluster::start();
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    // The test ftds allow disks in the cluster's scratch directory.
    let allowed = cluster
        .ftd("a")
        .state_dir
        .parent()
        .expect("scratch")
        .to_owned();
    let outside = temp_dir("outside-disks");
    let disk = |dir: &std::path::Path, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("disk");
        path.display().to_string()
    };
    let good = disk(&allowed, "d1.img");
    let foreign = disk(&outside, "foreign.img");
    let link = allowed.join("link.img");
    std::os::unix::fs::symlink(&foreign, &link).expect("symlink");
    let link = link.display().to_string();
    let foreign_image = outside.join("hello.elf");
    std::fs::copy(image, &foreign_image).expect("copy the image");
    let foreign_image = foreign_image.display().to_string();
    let create = |vm: &str, image: &str, disk: &str| {
        cluster.ftctl_at(
            1,
            &[
                "create",
                "--vm",
                vm,
                "--image-on-hosts",
                image,
                "--disk",
                disk,
                "--cmdline",
                FOREVER,
            ],
        )
    };
    for (image, disk, expected) in [
        (image, foreign.as_str(), "outside the disk directories"),
        (image, link.as_str(), "it leads to"),
        (
            foreign_image.as_str(),
            good.as_str(),
            "outside the image directories",
        ),
    ] {
        let ran = create("d0", image, disk);
        assert_eq!(ran.code, Some(1), "{ran:?}");
        assert!(ran.stderr.contains(expected), "{expected}: {ran:?}");
        assert_eq!(ran.stderr.trim_end().lines().count(), 1, "{ran:?}");
    }
    let first = create("d1", image, &good);
    assert_eq!(first.code, Some(0), "{first:?}");
    let second = create("d2", image, &good);
    assert_eq!(second.code, Some(1), "{second:?}");
    assert!(second.stderr.contains("in use by vm d1"), "{second:?}");
    // Nothing was stored for the refused creates.
    let vms = cluster.ftctl_json(0, &["list"]).expect("list");
    let names: Vec<&str> = vms
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|vm| vm["name"].as_str())
        .collect();
    assert_eq!(names, ["d1"], "{vms}");
}

/// Mutual TLS and roles: a viewer reads but changes nothing, an operator changes, a
/// certificate of another CA or no certificate gets nowhere, and a replica pair started
/// through the cluster protects its VM over TLS channels.
#[test]
fn only_the_clusters_certificates_get_in_and_roles_limit_what_they_do() {
    let cluster = TestCluster::start();
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    let create: &[&str] = &[
        "create",
        "--vm",
        "rbac",
        "--image",
        image,
        "--mem",
        "8M",
        "--cmdline",
        "ticks=1",
    ];
    for index in 0..3 {
        // Reading is allowed to viewers, on the leader and on the others alike.
        for args in [&["list"][..], &["hosts"], &["health"], &["events"]] {
            let ran = cluster.ftctl_as("viewer", index, args);
            assert_eq!(ran.code, Some(0), "viewer {args:?} at {index}: {ran:?}");
        }
        // Changing is not, refused before the request reaches the leader.
        for args in [create, &["delete", "rbac"], &["failover", "rbac", "--test"]] {
            let ran = cluster.ftctl_as("viewer", index, args);
            assert_eq!(ran.code, Some(1), "viewer {args:?} at {index}: {ran:?}");
            assert!(
                ran.stderr.contains("viewer watcher may not call")
                    && ran.stderr.contains("needs a operator certificate"),
                "{ran:?}"
            );
        }
    }
    assert_eq!(
        cluster.ftctl_json(1, &["list"]),
        Some(Value::Array(Vec::new())),
        "a viewer's create went through"
    );

    // Another cluster's CA: the same names, refused in the TLS handshake.
    let foreign = temp_dir("foreign-pki");
    make_credentials(&foreign);
    let ran = run(Command::new(binary("ftctl"))
        .args(["--endpoint", &cluster.ftds[0].endpoint(), "list"])
        .arg("--tls-dir")
        .arg(foreign.join("operator")));
    assert_eq!(ran.code, Some(69), "a foreign certificate: {ran:?}");
    // Plaintext against a TLS ftd, and no credentials at all.
    let ran = run(Command::new(binary("ftctl"))
        .args([
            "--endpoint",
            &cluster.ftds[0].endpoint(),
            "--insecure",
            "list",
        ])
        .env_remove("FTCTL_TLS_DIR"));
    assert_ne!(ran.code, Some(0), "plaintext got in: {ran:?}");
    let ran = run(Command::new(binary("ftctl"))
        .args(["--endpoint", &cluster.ftds[0].endpoint(), "list"])
        .env_remove("FTCTL_TLS_DIR")
        .env_remove("FTCTL_INSECURE"));
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("no credentials"), "{ran:?}");
    // A host certificate with its key swapped for another's is refused at load.
    let mixed = temp_dir("mixed-credentials");
    for (file, from) in [
        ("ca.pem", "host-a"),
        ("cert.pem", "host-a"),
        ("key.pem", "host-b"),
    ] {
        std::fs::copy(cluster.credentials(from).join(file), mixed.join(file)).expect("copy");
    }
    let ran = run(Command::new(binary("ftctl"))
        .args(["--endpoint", &cluster.ftds[0].endpoint(), "list"])
        .arg("--tls-dir")
        .arg(&mixed));
    assert_eq!(ran.code, Some(2), "{ran:?}");

    // The operator's create is forwarded by a follower to the leader (host to host over
    // TLS), and the pair it makes connects over TLS: the VM becomes protected.
    cluster.create_hello(1, "rbac", Some("a,b"));
    cluster.wait_for(Duration::from_secs(30), "rbac to be protected", || {
        let vm = cluster.ftctl_json(2, &["status", "rbac"])?;
        (vm["protection"] == "protected").then_some(())
    });
    let ftds_log = cluster.ftd("a").log_text();
    assert!(
        !ftds_log.contains("insecure"),
        "ftd a runs insecure:\n{ftds_log}"
    );
}

/// A NIC's MAC or IP address in use by another VM is refused at create, and a NIC that
/// names no TAP is refused when no host makes TAPs (these ftds have no bridge).
#[test]
fn a_mac_or_ip_in_use_and_a_nic_no_host_can_make_are_refused_at_create() {
    let cluster = TestCluster::start();
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    let create = |vm: &str, net: &str| {
        cluster.ftctl_at(
            1,
            &[
                "create",
                "--vm",
                vm,
                "--image",
                image,
                "--mem",
                "8M",
                "--cmdline",
                "ticks=1",
                "--net",
                net,
            ],
        )
    };
    let first = create("nic1", "tap=tapnic1,mac=52:54:00:00:ab:01,ip=10.99.0.2/24");
    assert_eq!(first.code, Some(0), "{first:?}");
    for (vm, net, expected) in [
        (
            "nic2",
            "tap=tapnic2,mac=52:54:00:00:ab:01",
            "the MAC 52:54:00:00:ab:01 is in use by vm nic1",
        ),
        // Another case is not another MAC.
        (
            "nic2",
            "tap=tapnic2,mac=52:54:00:00:AB:01",
            "the MAC 52:54:00:00:ab:01 is in use by vm nic1",
        ),
        (
            "nic3",
            "tap=tapnic3,mac=52:54:00:00:ab:03,ip=10.99.0.2/16",
            "the IP address 10.99.0.2 is in use by vm nic1",
        ),
        (
            "nic4",
            "mac=52:54:00:00:ab:04",
            "names no TAP and no live host makes one",
        ),
    ] {
        let ran = create(vm, net);
        assert_eq!(ran.code, Some(1), "{net}: {ran:?}");
        assert!(ran.stderr.contains(expected), "{net}: {ran:?}");
    }
    let vms = cluster.ftctl_json(0, &["list"]).expect("list");
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms}");
}
