//! How ftd and the etcd arbiter of a replica authenticate to etcd: TLS with etcd's CA
//! (and, for etcd's `--client-cert-auth`, a client certificate), and/or an etcd user.
//! Read once at start (a replica reads them before its sandbox closes the files).

use crate::{TlsError, CA_FILE, CERT_FILE, KEY_FILE};
use std::path::Path;

/// Credentials for etcd; the default is none (plain http, no user).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// etcd's CA certificate (PEM): connections use https.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// An etcd user and its password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl EtcdAccess {
    /// Reads `tls_dir` (ca.pem, and cert.pem with key.pem if both are there) and the
    /// password of `user` from `password_file` (its first line).
    pub fn load(
        tls_dir: Option<&Path>,
        user: Option<&str>,
        password_file: Option<&Path>,
    ) -> Result<EtcdAccess, TlsError> {
        let mut access = EtcdAccess::default();
        if let Some(dir) = tls_dir {
            access.ca_pem = Some(read(&dir.join(CA_FILE))?);
            let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
            match (cert.exists(), key.exists()) {
                (true, true) => access.client = Some((read(&cert)?, read(&key)?)),
                (false, false) => {}
                _ => {
                    return Err(TlsError::Pem {
                        path: dir.to_owned(),
                        message: "cert.pem and key.pem go together".into(),
                    })
                }
            }
        }
        match (user, password_file) {
            (Some(user), Some(file)) => {
                let text = String::from_utf8(read(file)?).map_err(|_| TlsError::Pem {
                    path: file.to_owned(),
                    message: "the password is not UTF-8".into(),
                })?;
                let password = text.lines().next().unwrap_or_default().to_owned();
                if user.is_empty() || password.is_empty() {
                    return Err(TlsError::Pem {
                        path: file.to_owned(),
                        message: "an empty etcd user or password".into(),
                    });
                }
                access.user = Some((user.to_owned(), password));
            }
            (None, None) => {}
            (_, None) => {
                return Err(TlsError::Pem {
                    path: Default::default(),
                    message: "an etcd user needs a password file".into(),
                })
            }
            (None, Some(file)) => {
                return Err(TlsError::Pem {
                    path: file.to_owned(),
                    message: "a password file needs an etcd user".into(),
                })
            }
        }
        Ok(access)
    }

    /// `options` with this TLS (etcd's CA, a client certificate) and user.
    #[cfg(feature = "etcd")]
    pub fn connect_options(
        &self,
        mut options: etcd_client::ConnectOptions,
    ) -> etcd_client::ConnectOptions {
        if let Some(ca) = &self.ca_pem {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.client {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        options
    }

    /// Whether connections to etcd use TLS.
    pub fn is_tls(&self) -> bool {
        self.ca_pem.is_some()
    }

    /// The URL of `endpoint` (`HOST:PORT`, or a URL whose scheme is replaced): https with
    /// TLS, else http.
    pub fn url(&self, endpoint: &str) -> String {
        let bare = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
            .unwrap_or(endpoint);
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{bare}")
    }
}
