//! What ships in deploy/: the systemd unit is valid for systemd and hardened, the example
//! config loads (ftd's own tests check that).

use ftvm_tests::{binary, project_root, run};
use std::process::Command;

/// The unit as installed, with ftd where this build put it (verify checks the binary).
fn unit_for_this_build(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(project_root().join("deploy/systemd/ftd.service"))
        .expect("deploy/systemd/ftd.service");
    let path = dir.join("ftd.service");
    let ftd = binary("ftd");
    std::fs::write(
        &path,
        unit.replace("/usr/sbin/ftd", &ftd.display().to_string()),
    )
    .expect("write the unit");
    path
}

#[test]
fn the_systemd_unit_is_valid_and_hardened() {
    let dir = ftvm_tests::temp_dir("deploy-unit");
    let unit = unit_for_this_build(&dir);
    let analyze = |args: &[&str]| {
        let ran = run(Command::new("systemd-analyze").args(args).arg(&unit));
        assert!(
            ran.code.is_some(),
            "systemd-analyze (package systemd) cannot run: {ran:?}"
        );
        ran
    };
    let verified = analyze(&["verify"]);
    assert_eq!(verified.code, Some(0), "{verified:?}");
    assert!(verified.stderr.trim().is_empty(), "{}", verified.stderr);
    let security = analyze(&["security", "--offline=true", "--no-pager"]);
    let level: f64 = security
        .stdout
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for ftd.service: ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no exposure level: {security:?}"));
    eprintln!("systemd exposure level of ftd.service: {level}");
    // systemd rates 0 (locked down) .. 10 (unsafe); the plain unit was 9.6.
    assert!(
        level <= 5.0,
        "ftd.service exposure {level}: {}",
        security.stdout
    );
}

/// promtool (Debian package prometheus, installed by `cargo xtask setup`).
fn promtool(args: &[&str]) -> ftvm_tests::Ran {
    let ran = run(Command::new("promtool")
        .current_dir(project_root().join("deploy/prometheus"))
        .args(args));
    assert!(
        ran.code.is_some(),
        "promtool (package prometheus; `cargo xtask setup` installs it) cannot run: {ran:?}"
    );
    ran
}

#[test]
fn the_prometheus_config_and_alert_rules_are_valid() {
    let checked = promtool(&["check", "config", "prometheus.yml"]);
    assert_eq!(checked.code, Some(0), "{checked:?}");
    // The config loads the rules: an alert-less config would pass the check above.
    assert!(checked.stdout.contains("1 rule files found"), "{checked:?}");
    let rules = promtool(&["check", "rules", "rules.yml"]);
    assert_eq!(rules.code, Some(0), "{rules:?}");
}

#[test]
fn every_alert_fires_and_clears_in_the_rule_tests() {
    let tested = promtool(&["test", "rules", "rules_test.yml"]);
    assert_eq!(tested.code, Some(0), "{tested:?}");
    assert!(tested.stdout.contains("SUCCESS"), "{tested:?}");
    // Each alert of rules.yml has a test that expects it to fire.
    let rules = std::fs::read_to_string(project_root().join("deploy/prometheus/rules.yml"))
        .expect("rules.yml");
    let tests = std::fs::read_to_string(project_root().join("deploy/prometheus/rules_test.yml"))
        .expect("rules_test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        let firing = tests
            .split("alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(alert) && case.contains("exp_labels"))
            .count();
        assert!(firing > 0, "no test expects {alert} to fire");
    }
}

#[test]
fn the_dashboard_is_well_formed_and_uses_ftd_metrics() {
    let path = project_root().join("deploy/grafana/ftvm.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/ftvm.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64()), "duplicate id: {panel}");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if x + w <= 24),
            "off the 24 columns: {panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "a panel without queries: {panel}");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            assert!(
                !ftvm_tests::metric_names_in(expr).is_empty(),
                "a query on no ftd metric: {panel}"
            );
        }
    }
    // Every $variable a query or title uses is defined.
    for word in text.split('$').skip(1) {
        let name: String = word
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !name.starts_with("labels") && name != "value" {
            assert!(variables.contains(&name.as_str()), "${name} is not defined");
        }
    }
    // The names the rules and dashboards use are checked against a live cluster's
    // /metrics in tests/controlplane (a_test_failover_kills_the_primary_and_is_recorded).
    let used = ftvm_tests::deploy_metric_names();
    for name in [
        "ftd_vm_protected",
        "ftd_failovers_total",
        "ftvmm_backup_lag_seconds",
    ] {
        assert!(used.contains(name), "{name} not found in {used:?}");
    }
}

#[test]
fn ftd_logs_one_json_object_per_line_when_asked() {
    let dir = ftvm_tests::temp_dir("deploy-json-log");
    let stderr = dir.join("ftd.log");
    let mut ftd = Command::new(binary("ftd"))
        .args([
            "--host-name",
            "a",
            "--etcd",
            "memory",
            "--log-format",
            "json",
            "--insecure",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", ftvm_tests::free_port()),
        ])
        .args([
            "--metrics-listen",
            &format!("127.0.0.1:{}", ftvm_tests::free_port()),
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("log file"))
        .spawn()
        .expect("start ftd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&stderr).unwrap_or_default();
        if text.contains("ftd registered") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = ftd.kill();
    let _ = ftd.wait();
    assert!(text.contains("ftd registered"), "{text}");
    // Running without TLS is said loudly.
    assert!(text.contains("insecure: gRPC"), "{text}");
    for line in text.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"));
        assert!(
            event["level"].is_string() && event["fields"]["message"].is_string(),
            "{line}"
        );
    }
    let registered = text
        .lines()
        .find(|line| line.contains("ftd registered"))
        .expect("found above");
    let event: serde_json::Value = serde_json::from_str(registered).expect("JSON");
    assert_eq!(event["fields"]["host"], "a", "{registered}");
}

/// The Debian packages build from this build's binaries, lintian finds no error in them,
/// they install with dpkg into a scratch root, and what they install works: `--version`,
/// the man pages, the completions, the unit, the config as a conffile.
#[test]
fn the_debian_packages_build_pass_lintian_and_install() {
    let dir = ftvm_tests::temp_dir("deploy-package");
    let bin_dir = binary("ftd")
        .parent()
        .expect("the binaries' directory")
        .to_owned();
    let packages = ftvm_tests::package::build(&bin_dir, &dir.join("out"))
        .unwrap_or_else(|err| panic!("cannot build the packages: {err}"));
    for deb in [&packages.ftd, &packages.ftctl] {
        let lintian = run(Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(deb));
        assert!(
            lintian.code.is_some(),
            "lintian (package lintian, `cargo xtask setup`) cannot run: {lintian:?}"
        );
        assert_eq!(
            lintian.code,
            Some(0),
            "lintian on {}: {lintian:?}",
            deb.display()
        );
    }
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&packages.ftd));
    assert!(info.stdout.contains("Package: ftd"), "{info:?}");
    // The config is a conffile: an upgrade keeps the operator's edits.
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&packages.ftd)
        .arg("conffiles"));
    assert_eq!(
        conffiles.stdout.trim(),
        "/etc/ftvm/ftd.toml",
        "{conffiles:?}"
    );

    // dpkg into a scratch root (its own database; scripts run outside a chroot, with
    // DPKG_ROOT set, as for any foreign-root install).
    let root = dir.join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(sub)).expect("dpkg database");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("dpkg status");
    let installed = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-not-root",
            "--force-depends",
            "--force-script-chrootless",
            "--log=/dev/null",
            "-i",
        ])
        .arg(&packages.ftd)
        .arg(&packages.ftctl));
    assert_eq!(installed.code, Some(0), "{installed:?}");
    let listed = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "ftd", "ftctl"]));
    assert_eq!(
        listed
            .stdout
            .matches("Status: install ok installed")
            .count(),
        2,
        "{listed:?}"
    );
    for (binary, name) in [
        ("usr/sbin/ftd", "ftd"),
        ("usr/sbin/ftvmm", "ftvmm"),
        ("usr/bin/ftctl", "ftctl"),
    ] {
        let version = run(Command::new(root.join(binary)).arg("--version"));
        assert_eq!(
            version.stdout.trim(),
            format!("{name} {}", packages.version),
            "{version:?}"
        );
    }
    assert!(root.join("lib/systemd/system/ftd.service").is_file());
    assert!(root.join("etc/ftvm/ftd.toml").is_file());
    use std::os::unix::fs::PermissionsExt;
    let tls_mode = std::fs::metadata(root.join("etc/ftvm/tls"))
        .expect("postinst made /etc/ftvm/tls")
        .permissions()
        .mode();
    assert_eq!(tls_mode & 0o777, 0o700);
    for (page, needle) in [
        ("usr/share/man/man1/ftctl.1.gz", "certs"),
        ("usr/share/man/man8/ftd.8.gz", "tls-dir"),
        ("usr/share/man/man8/ftvmm.8.gz", "replay"),
    ] {
        let man = run(Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(root.join(page))
            .env("MANWIDTH", "100"));
        assert_eq!(man.code, Some(0), "man -l {page}: {man:?}");
        assert!(man.stdout.contains(needle), "man -l {page}: {}", man.stdout);
    }
    // bash takes the completions, and completes a subcommand.
    let completion = root.join("usr/share/bash-completion/completions/ftctl");
    let bash = run(Command::new("bash").arg("-c").arg(format!(
        "source {} && COMP_WORDS=(ftctl cer) COMP_CWORD=1 COMP_LINE='ftctl cer' COMP_POINT=9 && _ftctl ftctl cer ftctl && echo \"${{COMPREPLY[@]}}\"",
        completion.display()
    )));
    assert!(bash.stdout.contains("certs"), "{bash:?}");
}
