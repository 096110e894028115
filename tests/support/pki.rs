//! A throwaway cluster CA and the credentials it issues, for tests: the same files
//! `ftctl certs` writes (ca.pem, cert.pem, key.pem per directory).

use ftvm_tls::issue::{issue, issue_server, new_ca, Issued};
use ftvm_tls::{Identity, Role, CA_FILE, CERT_FILE, KEY_FILE};
use std::path::{Path, PathBuf};

/// A cluster CA kept in a directory; [`Pki::issue`] writes credentials beside it.
pub struct Pki {
    dir: PathBuf,
    ca: Issued,
}

impl Pki {
    /// A new CA whose credentials go under `dir`.
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("PKI directory");
        Pki {
            dir: dir.to_owned(),
            ca: new_ca(30).expect("a test CA"),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// Credentials for `name` in `role` (made once; later calls return the same
    /// directory).
    pub fn issue(&self, role: Role, name: &str) -> PathBuf {
        let out = self.dir.join(format!("{}-{name}", role.label()));
        if out.join(KEY_FILE).is_file() {
            return out;
        }
        std::fs::create_dir_all(&out).expect("credentials directory");
        let identity = Identity {
            role,
            name: name.to_owned(),
        };
        let leaf = issue(&self.ca.key_pem, &identity, 30).expect("a test certificate");
        self.write(&out, &leaf);
        out
    }

    /// Credentials for another server (an etcd member) reached at `names`.
    pub fn server(&self, name: &str, names: &[&str]) -> PathBuf {
        let out = self.dir.join(format!("server-{name}"));
        std::fs::create_dir_all(&out).expect("credentials directory");
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let leaf = issue_server(&self.ca.key_pem, name, &names, 30).expect("a server certificate");
        self.write(&out, &leaf);
        out
    }

    /// Writes a credentials directory: the CA, `leaf` and its key.
    fn write(&self, out: &Path, leaf: &Issued) {
        std::fs::write(out.join(CA_FILE), &self.ca.cert_pem).expect("write ca.pem");
        std::fs::write(out.join(CERT_FILE), &leaf.cert_pem).expect("write cert.pem");
        write_key(&out.join(KEY_FILE), &leaf.key_pem);
    }

    /// A host's credentials.
    pub fn host(&self, name: &str) -> PathBuf {
        self.issue(Role::Host, name)
    }
}

/// Writes a private key as `ftctl certs` does: readable by its owner only.
fn write_key(path: &std::path::Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).expect("write key.pem");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key.pem");
}
