//! Mutual TLS for ftvm: who a certificate of the cluster CA speaks for, the files a
//! host or an operator keeps its credentials in, and the TLS configurations built from
//! them (rustls with ring; tonic uses the same).
//!
//! One CA per cluster issues every certificate. What a certificate may do is written in
//! its subject alternative names, as DNS names under `ftvm`:
//! - a **host** (an ftd and the replicas it starts): `NAME.host.ftvm` and [`SERVER_NAME`],
//!   the name every client of an ftd or of a replica's log or clone port checks;
//! - an **operator**: `NAME.operator.ftvm`; a **viewer**: `NAME.viewer.ftvm`.
//!
//! A peer's role is read only after rustls has verified its chain to the cluster CA, so
//! only the CA's holder decides who is what.

mod etcd;
#[cfg(feature = "issue")]
pub mod issue;
mod socket;

pub use etcd::EtcdAccess;
pub use socket::{Socket, TlsSide};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name every host certificate carries and every client of a host verifies.
pub const SERVER_NAME: &str = "ftd.ftvm";

/// The files of one credential set in a directory: [`CA_FILE`], [`CERT_FILE`],
/// [`KEY_FILE`].
pub const CA_FILE: &str = "ca.pem";
/// The certificate in a credentials directory.
pub const CERT_FILE: &str = "cert.pem";
/// The private key in a credentials directory (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// A TLS setting or handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The certificate names no ftvm role, or more than one.
    #[error("certificate has no single ftvm role: {0}")]
    Role(String),
    /// A certificate cannot be made.
    #[error("cannot issue the certificate: {0}")]
    Issue(String),
    /// rustls refused the configuration or the handshake.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier cannot be built from the CA.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    /// The handshake's socket failed (or timed out).
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    /// The peer is verified but not allowed here.
    #[error("peer {peer} may not connect here: a {expected} certificate is needed")]
    Forbidden {
        /// Who the peer is.
        peer: Identity,
        /// The role needed.
        expected: Role,
    },
}

/// What a certificate allows, least first: each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads the cluster's state: list, status, hosts, events.
    Viewer,
    /// Also changes it: create, delete, fail over, restart backups, drain.
    Operator,
    /// An ftd host (and its replicas): also the agent calls, forwarding, the log and clone
    /// channels.
    Host,
}

impl Role {
    /// The label in the certificate's DNS name (`NAME.<label>.ftvm`).
    pub fn label(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Host => "host",
        }
    }

    fn from_label(label: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Host]
            .into_iter()
            .find(|role| role.label() == label)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Who a verified certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// The host's, operator's or viewer's name.
    pub name: String,
}

impl Identity {
    /// The DNS name that carries this identity in a certificate.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.ftvm", self.name, self.role.label())
    }

    /// Whether `name` can be a certificate name: a DNS label (lowercase letters, digits,
    /// `-`, not at either end, at most 63 characters).
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 63
            && !name.starts_with('-')
            && !name.ends_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    /// The identity of a certificate (its role from its DNS names). Call only on a
    /// certificate whose chain was verified.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
        let parsed = webpki::EndEntityCert::try_from(cert)
            .map_err(|err| TlsError::Role(format!("unparsable certificate: {err}")))?;
        let mut found = None;
        for dns in parsed.valid_dns_names() {
            let Some(rest) = dns.strip_suffix(".ftvm") else {
                continue;
            };
            let Some((name, label)) = rest.rsplit_once('.') else {
                continue;
            };
            let Some(role) = Role::from_label(label) else {
                continue;
            };
            if !Identity::valid_name(name) {
                continue;
            }
            if found.is_some() {
                return Err(TlsError::Role(format!("more than one role name ({dns})")));
            }
            found = Some(Identity {
                role,
                name: name.to_owned(),
            });
        }
        found.ok_or_else(|| TlsError::Role("no NAME.ROLE.ftvm name".to_owned()))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Where one credential set is: the cluster CA, a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files of a credentials directory ([`CA_FILE`], [`CERT_FILE`], [`KEY_FILE`]).
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }

    /// Reads and checks the three files.
    pub fn load(&self) -> Result<Credentials, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let (ca_pem, cert_pem, key_pem) = (read(&self.ca)?, read(&self.cert)?, read(&self.key)?);
        // As ssh does with its keys: a key others may read is not this party's alone.
        let mode = std::fs::metadata(&self.key)
            .map_err(|source| TlsError::Read {
                path: self.key.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(TlsError::Pem {
                path: self.key.clone(),
                message: format!(
                    "the key is readable by others (mode {:o}): chmod 600 it",
                    mode & 0o777
                ),
            });
        }
        let certs = |path: &Path, pem: &[u8]| {
            let items = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| TlsError::Pem {
                    path: path.to_owned(),
                    message: format!("bad PEM certificate: {err}"),
                })?;
            if items.is_empty() {
                return Err(TlsError::Pem {
                    path: path.to_owned(),
                    message: "no certificate in it".to_owned(),
                });
            }
            Ok(items)
        };
        let roots = certs(&self.ca, &ca_pem)?;
        let chain = certs(&self.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::Pem {
            path: self.key.clone(),
            message: format!("no private key: {err}"),
        })?;
        let identity = Identity::of(&chain[0])?;
        let credentials = Credentials {
            roots,
            chain,
            key: Arc::new(key),
            identity,
            ca_pem,
            cert_pem,
            key_pem,
        };
        // Built once here so that a key that does not match its certificate, or a CA
        // rustls refuses, is reported when the files are loaded, not at the first peer.
        credentials.server_config()?;
        credentials.client_config()?;
        Ok(credentials)
    }
}

/// A loaded credential set.
#[derive(Clone)]
pub struct Credentials {
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: Identity,
    /// The CA certificate as read (PEM).
    pub ca_pem: Vec<u8>,
    /// The certificate as read (PEM).
    pub cert_pem: Vec<u8>,
    /// The key as read (PEM).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// ring, the provider tonic is built with here too: aws-lc-rs would add a long C build
/// (and cmake) for the post-quantum key exchange ring lacks, which is why rustls marks
/// this constructor deprecated.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// Who this certificate speaks for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn root_store(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut store = rustls::RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone())?;
        }
        Ok(store)
    }

    /// A server configuration: TLS 1.3, this certificate, and a client certificate of the
    /// cluster CA required. No session tickets (a resumed session would skip the client
    /// certificate check's freshness, and the links are long-lived anyway).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.root_store()?),
            provider(),
        )
        .build()
        .map_err(|err| TlsError::Verifier(err.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// A client configuration: TLS 1.3, servers verified against the cluster CA (as
    /// [`SERVER_NAME`]), this certificate presented.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// The identity of a peer whose certificate chain rustls verified: its first certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    match certs.and_then(|certs| certs.first()) {
        Some(cert) => Identity::of(cert),
        None => Err(TlsError::Role("the peer sent no certificate".to_owned())),
    }
}

#[cfg(test)]
mod tests;
