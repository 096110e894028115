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
        unit.replace("/usr/local/bin/ftd", &ftd.display().to_string()),
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
