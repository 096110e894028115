//! `ftctl certs`: the cluster CA and the certificates it issues, as files. Nothing here
//! talks to an ftd.
//!
//! A CA directory holds `ca.pem` (give it to everyone) and `ca.key` (keep it offline: who
//! holds it decides who is a host, an operator or a viewer). A credentials directory holds
//! `ca.pem`, `cert.pem` and `key.pem`: what ftd's `tls_dir`, `ftvmm --tls-dir` and
//! `ftctl --tls-dir` read.

use crate::cli::CertsAction;
use crate::CtlError;
use ftvm_tls::issue::{issue, issue_server, new_ca, Issued};
use ftvm_tls::{Identity, Role, CA_FILE, CERT_FILE, KEY_FILE};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The CA's key in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

fn failed(what: &str, path: &Path, err: impl std::fmt::Display) -> CtlError {
    CtlError::Usage(format!("{what} {}: {err}", path.display()))
}

/// Writes a new file (never over an existing one: a CA or key overwritten by mistake
/// would cut a cluster off).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CtlError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|err| failed("cannot create", path, err))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|err| failed("cannot write", path, err))
}

fn make_dir(dir: &Path) -> Result<(), CtlError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|err| failed("cannot create directory", dir, err))
}

/// Writes a credentials directory: key.pem (0600), cert.pem, ca.pem.
fn write_issued(target: &Path, ca_pem: &str, issued: &Issued) -> Result<(), CtlError> {
    make_dir(target)?;
    write_new(&target.join(KEY_FILE), issued.key_pem.as_bytes(), 0o600)?;
    write_new(&target.join(CERT_FILE), issued.cert_pem.as_bytes(), 0o644)?;
    write_new(&target.join(CA_FILE), ca_pem.as_bytes(), 0o644)
}

/// Runs a `certs` action, saying what it wrote.
pub fn run(action: CertsAction, out: &mut impl Write) -> Result<(), CtlError> {
    match action {
        CertsAction::Init { dir, days } => {
            make_dir(&dir)?;
            let ca = new_ca(days).map_err(|err| CtlError::Usage(err.to_string()))?;
            // The key first: a CA certificate without its key would be useless.
            write_new(&dir.join(CA_KEY_FILE), ca.key_pem.as_bytes(), 0o600)?;
            write_new(&dir.join(CA_FILE), ca.cert_pem.as_bytes(), 0o644)?;
            writeln!(
                out,
                "cluster CA made in {} ({CA_FILE}: give to every host and user; {CA_KEY_FILE}: keep offline), valid {days} days",
                dir.display()
            )?;
        }
        CertsAction::Issue {
            dir,
            host,
            operator,
            viewer,
            server,
            san,
            out: target,
            days,
        } => {
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read_to_string(&path).map_err(|err| failed("cannot read", &path, err))
            };
            if let Some(server) = server {
                if host.is_some() || operator.is_some() || viewer.is_some() {
                    return Err(CtlError::Usage(
                        "give exactly one of --host, --operator, --viewer, --server".into(),
                    ));
                }
                let (ca_pem, ca_key) = (read(CA_FILE)?, read(CA_KEY_FILE)?);
                let issued = issue_server(&ca_key, &server, &san, days)
                    .map_err(|err| CtlError::Usage(err.to_string()))?;
                write_issued(&target, &ca_pem, &issued)?;
                writeln!(
                    out,
                    "server {server} ({}) issued in {}, valid {days} days",
                    san.join(", "),
                    target.display()
                )?;
                return Ok(());
            }
            let identity = match (host, operator, viewer) {
                (Some(name), None, None) => Identity {
                    role: Role::Host,
                    name,
                },
                (None, Some(name), None) => Identity {
                    role: Role::Operator,
                    name,
                },
                (None, None, Some(name)) => Identity {
                    role: Role::Viewer,
                    name,
                },
                _ => {
                    return Err(CtlError::Usage(
                        "give exactly one of --host, --operator, --viewer, --server".into(),
                    ))
                }
            };
            let (ca_pem, ca_key) = (read(CA_FILE)?, read(CA_KEY_FILE)?);
            let issued =
                issue(&ca_key, &identity, days).map_err(|err| CtlError::Usage(err.to_string()))?;
            write_issued(&target, &ca_pem, &issued)?;
            // Loaded back: a CA key that is not the CA certificate's, or anything else
            // that would fail at the first connection, fails here instead.
            let target_files = ftvm_tls::TlsFiles::in_dir(&target);
            target_files
                .load()
                .map_err(|err| CtlError::Usage(format!("the issued files do not work: {err}")))?;
            writeln!(
                out,
                "{identity} ({}) issued in {}, valid {days} days",
                identity.dns_name(),
                target.display()
            )?;
        }
    }
    Ok(())
}
