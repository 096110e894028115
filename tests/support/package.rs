//! Debian packages of ftvm, laid out from built binaries (`cargo xtask package` uses the
//! release build; tests/deploy.rs the debug one): `ftd` (ftd and ftvmm, the systemd unit,
//! the config, man pages and completions) and `ftctl`.
//!
//! Man pages and completions come from the binaries themselves (their hidden `generate`),
//! so they match the flags of the build that is packaged.

use crate::project_root;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The maintainer field of the packages.
const MAINTAINER: &str = "ftvm developers <maintainers@ftvm.example.org>";

/// The packages made, and their version.
#[derive(Debug, Clone)]
pub struct Packages {
    /// ftd_VERSION_amd64.deb: the host daemon and the VMM.
    pub ftd: PathBuf,
    /// ftctl_VERSION_amd64.deb: the operator's CLI.
    pub ftctl: PathBuf,
    /// The version (from `ftd --version`).
    pub version: String,
}

fn failed(what: &str, err: impl std::fmt::Display) -> String {
    format!("{what}: {err}")
}

fn output(command: &mut Command) -> Result<Vec<u8>, String> {
    let shown = format!("{command:?}");
    let out = command.output().map_err(|err| failed(&shown, err))?;
    if !out.status.success() {
        return Err(format!(
            "{shown}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| failed(&dir.display().to_string(), err))?;
    }
    std::fs::write(path, contents).map_err(|err| failed(&path.display().to_string(), err))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|err| failed(&path.display().to_string(), err))
}

/// gzip -9n: reproducible (no name, no time stamp), as Debian wants man pages and
/// changelogs.
fn gzip(contents: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| failed("gzip", err))?;
    let mut stdin = child.stdin.take().ok_or("gzip: no stdin")?;
    let input = contents.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|err| failed("gzip", err))?;
    feeder
        .join()
        .map_err(|_| "gzip: the writer panicked".to_owned())?
        .map_err(|err| failed("gzip", err))?;
    if !out.status.success() {
        return Err(format!("gzip: {}", out.status));
    }
    Ok(out.stdout)
}

/// One binary into the package tree at `dest` (stripped, 0755), with its man page in
/// `section` and its completions.
fn install_binary(root: &Path, binary: &Path, dest: &str, section: u8) -> Result<(), String> {
    let name = binary
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| format!("{}: no file name", binary.display()))?;
    let target = root.join(dest.trim_start_matches('/')).join(name);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(|err| failed(&dir.display().to_string(), err))?;
    }
    std::fs::copy(binary, &target).map_err(|err| failed(&binary.display().to_string(), err))?;
    output(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(&target),
    )?;
    write(
        &target,
        &std::fs::read(&target).map_err(|err| failed("read back", err))?,
        0o755,
    )?;
    let generate = |what: &str| {
        let mut command = Command::new(binary);
        if name == "ftd" {
            command.args(["--generate", what]);
        } else {
            command.args(["generate", what]);
        }
        output(&mut command)
    };
    write(
        &root.join(format!("usr/share/man/man{section}/{name}.{section}.gz")),
        &gzip(&generate("man")?)?,
        0o644,
    )?;
    write(
        &root.join(format!("usr/share/bash-completion/completions/{name}")),
        &generate("bash")?,
        0o644,
    )?;
    write(
        &root.join(format!("usr/share/zsh/vendor-completions/_{name}")),
        &generate("zsh")?,
        0o644,
    )?;
    write(
        &root.join(format!("usr/share/fish/vendor_completions.d/{name}.fish")),
        &generate("fish")?,
        0o644,
    )
}

/// copyright and changelog.gz (a native package's) of package `name`.
fn install_docs(root: &Path, name: &str, version: &str) -> Result<(), String> {
    let doc = root.join(format!("usr/share/doc/{name}"));
    write(
        &doc.join("copyright"),
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
          Upstream-Name: ftvm\n\
          \n\
          Files: *\n\
          Copyright: 2026 ftvm developers\n\
          License: Apache-2.0\n \
          On Debian systems, the full text of the Apache License, Version 2.0 can be\n \
          found in the file /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;
    let changelog = format!(
        "{name} ({version}) unstable; urgency=medium\n\n  * Built from the ftvm source tree.\n\n -- {MAINTAINER}  Sat, 05 Dec 2026 00:00:00 +0000\n"
    );
    write(
        &doc.join("changelog.gz"),
        &gzip(changelog.as_bytes())?,
        0o644,
    )
}

/// DEBIAN/control (with the installed size) and md5sums; then `dpkg-deb --build`.
fn build_deb(
    root: &Path,
    out: &Path,
    control: &str,
    conffiles: &[&str],
) -> Result<PathBuf, String> {
    let mut sums = String::new();
    let mut kib = 0u64;
    let mut stack = vec![root.to_path_buf()];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|err| failed("read_dir", err))? {
            let path = entry.map_err(|err| failed("read_dir", err))?.path();
            if path == root.join("DEBIAN") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in &files {
        let relative = path.strip_prefix(root).map_err(|err| failed("path", err))?;
        kib += std::fs::metadata(path).map_or(0, |meta| meta.len().div_ceil(1024));
        let sum = output(Command::new("md5sum").arg(path))?;
        let sum = String::from_utf8_lossy(&sum);
        let hash = sum.split_whitespace().next().unwrap_or_default();
        sums.push_str(&format!("{hash}  {}\n", relative.display()));
    }
    let debian = root.join("DEBIAN");
    write(
        &debian.join("control"),
        format!("{control}Installed-Size: {kib}\n").as_bytes(),
        0o644,
    )?;
    write(&debian.join("md5sums"), sums.as_bytes(), 0o644)?;
    if !conffiles.is_empty() {
        write(
            &debian.join("conffiles"),
            format!("{}\n", conffiles.join("\n")).as_bytes(),
            0o644,
        )?;
    }
    output(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(root)
            .arg(out),
    )?;
    Ok(out.to_path_buf())
}

/// Builds both packages from the binaries in `bin_dir` into `out_dir`.
pub fn build(bin_dir: &Path, out_dir: &Path) -> Result<Packages, String> {
    let bin = |name: &str| {
        let path = bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{} is missing: build it first", path.display()))
        }
    };
    let (ftd, ftvmm, ftctl) = (bin("ftd")?, bin("ftvmm")?, bin("ftctl")?);
    let version_line = String::from_utf8_lossy(&output(Command::new(&ftd).arg("--version"))?)
        .trim()
        .to_owned();
    let version = version_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("cannot read a version in {version_line:?}"))?
        .to_owned();
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::create_dir_all(out_dir).map_err(|err| failed("out dir", err))?;
    let deploy = project_root().join("deploy");
    let read = |path: PathBuf| {
        std::fs::read(&path).map_err(|err| failed(&path.display().to_string(), err))
    };

    let host = out_dir.join("ftd-root");
    install_binary(&host, &ftd, "/usr/sbin", 8)?;
    install_binary(&host, &ftvmm, "/usr/sbin", 8)?;
    write(
        &host.join("lib/systemd/system/ftd.service"),
        &read(deploy.join("systemd/ftd.service"))?,
        0o644,
    )?;
    write(
        &host.join("etc/ftvm/ftd.toml"),
        &read(deploy.join("ftd.example.toml"))?,
        0o644,
    )?;
    install_docs(&host, "ftd", &version)?;
    write(
        &host.join("DEBIAN/postinst"),
        b"#!/bin/sh\nset -e\n\
          # The host's credentials (ftctl certs issue --host) go here, root's alone.\n\
          # DPKG_ROOT: an installation into another root (dpkg --root, chrootless).\n\
          if [ \"$1\" = configure ]; then\n\
          \tinstall -d -m 0700 \"${DPKG_ROOT:-}/etc/ftvm/tls\" \"${DPKG_ROOT:-}/var/lib/ftd\"\n\
          fi\n",
        0o755,
    )?;
    let ftd_deb = build_deb(
        &host,
        &out_dir.join(format!("ftd_{version}_amd64.deb")),
        &format!(
            "Package: ftd\nVersion: {version}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
             Section: admin\nPriority: optional\nDepends: libc6 (>= 2.34)\n\
             Recommends: etcd-client\n\
             Description: fault-tolerant virtual machines: host daemon and VMM\n \
             ftd runs on every hypervisor host of an ftvm cluster: it registers the host\n \
             in etcd, elects a leader, places the primary and backup replicas of each\n \
             fault-tolerant VM and supervises the ftvmm processes that run them. ftvmm\n \
             is the KVM VMM of one replica, recording or replaying the guest's\n \
             nondeterministic inputs.\n"
        ),
        &["/etc/ftvm/ftd.toml"],
    )?;

    let cli = out_dir.join("ftctl-root");
    install_binary(&cli, &ftctl, "/usr/bin", 1)?;
    install_docs(&cli, "ftctl", &version)?;
    let ftctl_deb = build_deb(
        &cli,
        &out_dir.join(format!("ftctl_{version}_amd64.deb")),
        &format!(
            "Package: ftctl\nVersion: {version}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
             Section: admin\nPriority: optional\nDepends: libc6 (>= 2.34)\n\
             Description: fault-tolerant virtual machines: operator's command line\n \
             ftctl manages the fault-tolerant VMs of an ftvm cluster through any of its\n \
             ftd hosts: create, status, failover drills, switchovers, host drains, and\n \
             the cluster's certificates.\n"
        ),
        &[],
    )?;
    Ok(Packages {
        ftd: ftd_deb,
        ftctl: ftctl_deb,
        version,
    })
}
