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
