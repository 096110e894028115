//! ftd's configuration, layered: built-in defaults < config file (`--config`, TOML) <
//! environment (`FTD_*`) < command-line flags. `deploy/ftd.example.toml` documents every
//! key.

use crate::model::HostName;
use crate::paths::PathPolicy;
use ftvm_contract::flags::SeccompMode;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Loading the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for ftd.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A value is invalid.
    #[error("invalid {key}: {message}")]
    Value {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// How ftd writes its log (stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event: time (left out under journald, which stamps lines itself),
    /// level, message, fields.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Command-line flags (each also read from its `FTD_*` environment variable).
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "ftd",
    version,
    about = "ftvm host daemon: registers this host in etcd, \
    elects a leader, places and supervises ftvmm replicas"
)]
pub struct Args {
    /// TOML config file (see deploy/ftd.example.toml).
    #[arg(long, env = "FTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// This host's name in the cluster [default: the kernel host name, lowercased].
    #[arg(long, env = "FTD_HOST_NAME")]
    pub host_name: Option<String>,
    /// gRPC listen address [default: 127.0.0.1:7700].
    #[arg(long, env = "FTD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address other ftds and ftctl use to reach this one [default: the listen address].
    #[arg(long, env = "FTD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Prometheus /metrics listen address [default: 127.0.0.1:9700].
    #[arg(long, env = "FTD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// etcd endpoints, comma-separated, or `memory` for a single-host in-process store
    /// [default: http://127.0.0.1:2379].
    #[arg(long, env = "FTD_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Directory for per-VM files (pid files, consoles, logs) [default: /var/lib/ftd].
    #[arg(long, env = "FTD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The ftvmm binary [default: ftvmm next to ftd, else `ftvmm` on PATH].
    #[arg(long, env = "FTD_FTVMM")]
    pub ftvmm: Option<PathBuf>,
    /// Host lease TTL in seconds: a host whose ftd is silent this long is down, and a dead
    /// leader is replaced within it [default: 10].
    #[arg(long, env = "FTD_LEASE_TTL")]
    pub lease_ttl: Option<u64>,
    /// Log level: error, warn, info, debug, trace [default: info].
    #[arg(long, env = "FTD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text (one line per event; without the time under journald) or json
    /// (one object per line) [default: text].
    #[arg(long, env = "FTD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// The address this host's primaries listen on for their backup's log channel
    /// (`ftvmm --log-listen`); backups on other hosts connect to it [default: 127.0.0.1].
    #[arg(long, env = "FTD_LOG_LISTEN_IP")]
    pub log_listen_ip: Option<IpAddr>,
    /// First TCP port for log channels: a pair gets `log_port_base + offset`, the offset
    /// chosen by the leader once per pair and stored in its assignments [default: 7800].
    #[arg(long, env = "FTD_LOG_PORT_BASE")]
    pub log_port_base: Option<u16>,
    /// Directories guest images may come from, comma-separated (a create naming an image
    /// elsewhere is refused) [default: /var/lib/ftvm/images].
    #[arg(long, env = "FTD_IMAGE_DIRS", value_delimiter = ',')]
    pub image_dirs: Option<Vec<PathBuf>>,
    /// Directories disk images may come from, comma-separated [default: /var/lib/ftvm/disks].
    #[arg(long, env = "FTD_DISK_DIRS", value_delimiter = ',')]
    pub disk_dirs: Option<Vec<PathBuf>>,
    /// The user replicas run as once set up (`ftvmm --run-as`: a name, or UID[:GID])
    /// [default: none, they stay root].
    #[arg(long, env = "FTD_REPLICA_USER")]
    pub replica_user: Option<String>,
    /// The replicas' system call filter (`ftvmm --seccomp`) [default: enforce].
    #[arg(long, env = "FTD_REPLICA_SECCOMP", value_enum)]
    pub replica_seccomp: Option<SeccompMode>,
    /// This host's credentials (`ftctl certs issue --host NAME`): ca.pem, cert.pem,
    /// key.pem. gRPC, forwarding and the replicas' log and clone channels then run over
    /// mutual TLS. Required unless insecure.
    #[arg(long, env = "FTD_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Run without TLS: anyone who reaches the ports may do anything (development on one
    /// machine only).
    #[arg(long, env = "FTD_INSECURE")]
    pub insecure: bool,
    /// etcd over TLS: a directory with etcd's CA (ca.pem) and, for etcd's client
    /// certificate authentication, cert.pem and key.pem. Used by ftd and handed to the
    /// replicas' etcd arbiter. The etcd endpoints are then https.
    #[arg(long, env = "FTD_ETCD_TLS_DIR")]
    pub etcd_tls_dir: Option<PathBuf>,
    /// etcd user (etcd's auth enabled), with etcd_password_file.
    #[arg(long, env = "FTD_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (first line; root-only).
    #[arg(long, env = "FTD_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// The bridge ftd puts the guests' TAPs on: for every replica of a VM whose NIC names
    /// no TAP, ftd makes one (`ftv` + 12 hex digits), attaches it here, and removes it
    /// when the replica goes. Without it such VMs are not placed on this host.
    #[arg(long, env = "FTD_BRIDGE")]
    pub bridge: Option<String>,
    /// The MTU of the TAPs ftd makes [default: the bridge's].
    #[arg(long, env = "FTD_TAP_MTU")]
    pub tap_mtu: Option<u32>,
    /// Print the man page or shell completions and exit (for packaging).
    #[arg(long, hide = true, value_enum, exclusive = true)]
    pub generate: Option<ftvm_contract::manual::Generated>,
}

/// The config file: the same settings as the flags, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_name: Option<String>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    metrics_listen: Option<SocketAddr>,
    etcd: Option<Vec<String>>,
    state_dir: Option<PathBuf>,
    ftvmm: Option<PathBuf>,
    lease_ttl: Option<u64>,
    log_level: Option<String>,
    log_format: Option<String>,
    log_listen_ip: Option<IpAddr>,
    log_port_base: Option<u16>,
    image_dirs: Option<Vec<PathBuf>>,
    disk_dirs: Option<Vec<PathBuf>>,
    replica_user: Option<String>,
    replica_seccomp: Option<String>,
    tls_dir: Option<PathBuf>,
    insecure: Option<bool>,
    etcd_tls_dir: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    bridge: Option<String>,
    tap_mtu: Option<u32>,
}

/// Where the coordination store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// etcd at these endpoints.
    Etcd(Vec<String>),
    /// The in-process store (one ftd only).
    Memory,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This host's name.
    pub host_name: HostName,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Address others use to reach this ftd's gRPC.
    pub advertise: String,
    /// /metrics listen address.
    pub metrics_listen: SocketAddr,
    /// The store.
    pub store: StoreConfig,
    /// Per-VM files.
    pub state_dir: PathBuf,
    /// The ftvmm binary.
    pub ftvmm: PathBuf,
    /// Host lease TTL.
    pub lease_ttl: Duration,
    /// Log level.
    pub log_level: tracing::Level,
    /// Log format.
    pub log_format: LogFormat,
    /// Where this host's primaries listen for their backups.
    pub log_listen_ip: IpAddr,
    /// First port of the log channels of the pairs whose primary runs here.
    pub log_port_base: u16,
    /// Where images and disks may come from.
    pub paths: PathPolicy,
    /// The user replicas run as once set up.
    pub replica_user: Option<String>,
    /// The replicas' system call filter.
    pub replica_seccomp: SeccompMode,
    /// Mutual TLS (`None`: insecure).
    pub tls: Option<TlsSetting>,
    /// How etcd is reached (TLS, user), for ftd and its replicas.
    pub etcd: EtcdSetting,
    /// The bridge of the TAPs ftd makes (`None`: it makes none).
    pub bridge: Option<String>,
    /// Their MTU (`None`: the bridge's).
    pub tap_mtu: Option<u32>,
}

/// How ftd and its replicas' etcd arbiter reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdSetting {
    /// etcd's CA (and a client certificate) directory.
    pub tls_dir: Option<PathBuf>,
    /// The etcd user.
    pub user: Option<String>,
    /// The file with its password.
    pub password_file: Option<PathBuf>,
    /// What was read from them.
    pub access: ftvm_tls::EtcdAccess,
}

/// ftd's TLS: the credentials directory and what was read from it.
#[derive(Debug, Clone)]
pub struct TlsSetting {
    /// The directory (handed to the replicas as `--tls-dir`; root-only files).
    pub dir: PathBuf,
    /// This host's certificate, key and the cluster CA.
    pub credentials: ftvm_tls::Credentials,
}

/// Reads this host's credentials and checks that they are a host certificate for this
/// host's name: a certificate of host a on host b would let b pose as a.
fn load_tls(dir: PathBuf, host_name: &HostName) -> Result<TlsSetting, ConfigError> {
    let credentials =
        ftvm_tls::TlsFiles::in_dir(&dir)
            .load()
            .map_err(|err| ConfigError::Value {
                key: "tls_dir",
                message: format!("{}: {}", dir.display(), crate::error_chain(&err)),
            })?;
    let identity = credentials.identity();
    if identity.role != ftvm_tls::Role::Host || identity.name != host_name.as_str() {
        return Err(ConfigError::Value {
            key: "tls_dir",
            message: format!(
                "{}: the certificate is for {identity}, not for host {host_name}",
                dir.display()
            ),
        });
    }
    Ok(TlsSetting { dir, credentials })
}

fn default_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_ascii_lowercase())
        .unwrap_or_else(|_| "localhost".to_owned())
}

fn default_ftvmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("ftvmm")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("ftvmm"))
}

impl Config {
    /// Builds the configuration from `args` (flags and environment, already merged by
    /// clap) over the config file over the defaults.
    pub fn load(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
        };
        let host_name = args
            .host_name
            .or(file.host_name)
            .unwrap_or_else(default_host_name);
        let host_name = HostName::new(&host_name).map_err(|err| ConfigError::Value {
            key: "host_name",
            message: err.to_string(),
        })?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700)));
        let advertise = args
            .advertise
            .or(file.advertise)
            .unwrap_or_else(|| listen.to_string());
        let metrics_listen = args
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9700)));
        let etcd = args
            .etcd
            .or(file.etcd)
            .unwrap_or_else(|| vec!["http://127.0.0.1:2379".to_owned()]);
        let store = match etcd.as_slice() {
            [only] if only == "memory" => StoreConfig::Memory,
            [] => {
                return Err(ConfigError::Value {
                    key: "etcd",
                    message: "no endpoint given".into(),
                })
            }
            endpoints => StoreConfig::Etcd(endpoints.to_vec()),
        };
        let lease_seconds = args.lease_ttl.or(file.lease_ttl).unwrap_or(10);
        if !(2..=300).contains(&lease_seconds) {
            return Err(ConfigError::Value {
                key: "lease_ttl",
                message: format!("{lease_seconds} s is outside 2..=300"),
            });
        }
        let level_text = args
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_owned());
        let dirs = |key: &'static str, given: Option<Vec<PathBuf>>, default: &str| {
            let dirs = given.unwrap_or_else(|| vec![PathBuf::from(default)]);
            match dirs.iter().find(|dir| !dir.is_absolute()) {
                Some(dir) => Err(ConfigError::Value {
                    key,
                    message: format!("{} is not an absolute path", dir.display()),
                }),
                None if dirs.is_empty() => Err(ConfigError::Value {
                    key,
                    message: "no directory given".into(),
                }),
                None => Ok(dirs),
            }
        };
        let paths = PathPolicy {
            image_dirs: dirs(
                "image_dirs",
                args.image_dirs.or(file.image_dirs),
                "/var/lib/ftvm/images",
            )?,
            disk_dirs: dirs(
                "disk_dirs",
                args.disk_dirs.or(file.disk_dirs),
                "/var/lib/ftvm/disks",
            )?,
        };
        let replica_seccomp = match (args.replica_seccomp, file.replica_seccomp.as_deref()) {
            (Some(mode), _) => mode,
            (None, None | Some("enforce")) => SeccompMode::Enforce,
            (None, Some("off")) => SeccompMode::Off,
            (None, Some(other)) => {
                return Err(ConfigError::Value {
                    key: "replica_seccomp",
                    message: format!("'{other}' is not enforce or off"),
                })
            }
        };
        let replica_user = args.replica_user.or(file.replica_user);
        if replica_user.as_deref().is_some_and(|user| {
            user.is_empty() || user.starts_with('-') || user.chars().any(char::is_whitespace)
        }) {
            return Err(ConfigError::Value {
                key: "replica_user",
                message: "a user name or UID[:GID]".into(),
            });
        }
        let log_level = level_text.parse().map_err(|_| ConfigError::Value {
            key: "log_level",
            message: format!("'{level_text}' is not one of error, warn, info, debug, trace"),
        })?;
        let log_format = match args.log_format.or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::Value {
                    key: "log_format",
                    message: format!("'{other}' is not one of text, json"),
                })
            }
        };
        let insecure = args.insecure || file.insecure.unwrap_or(false);
        let tls = match (args.tls_dir.or(file.tls_dir), insecure) {
            (Some(_), true) => {
                return Err(ConfigError::Value {
                    key: "tls_dir",
                    message: "cannot be combined with insecure".into(),
                })
            }
            (Some(dir), false) => Some(load_tls(dir, &host_name)?),
            (None, true) => None,
            (None, false) => {
                return Err(ConfigError::Value {
                    key: "tls_dir",
                    message: "not set: give this host's credentials (see `ftctl certs issue --host`), or insecure = true for development on one machine".into(),
                })
            }
        };
        let etcd = EtcdSetting {
            tls_dir: args.etcd_tls_dir.or(file.etcd_tls_dir),
            user: args.etcd_user.or(file.etcd_user),
            password_file: args.etcd_password_file.or(file.etcd_password_file),
            access: Default::default(),
        };
        let access = ftvm_tls::EtcdAccess::load(
            etcd.tls_dir.as_deref(),
            etcd.user.as_deref(),
            etcd.password_file.as_deref(),
        )
        .map_err(|err| ConfigError::Value {
            key: "etcd_tls_dir",
            message: crate::error_chain(&err),
        })?;
        if let StoreConfig::Etcd(endpoints) = &store {
            let scheme_mismatch = endpoints.iter().find(|endpoint| {
                if access.is_tls() {
                    endpoint.starts_with("http://")
                } else {
                    endpoint.starts_with("https://")
                }
            });
            if let Some(endpoint) = scheme_mismatch {
                return Err(ConfigError::Value {
                    key: "etcd",
                    message: format!(
                        "{endpoint}: https endpoints go with etcd_tls_dir, http ones without"
                    ),
                });
            }
        }
        let etcd = EtcdSetting { access, ..etcd };
        let bridge = args.bridge.or(file.bridge);
        if let Some(bridge) = &bridge {
            let ok = (1..=15).contains(&bridge.len())
                && bridge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(ConfigError::Value {
                    key: "bridge",
                    message: format!("'{bridge}' is not an interface name"),
                });
            }
        }
        let tap_mtu = args.tap_mtu.or(file.tap_mtu);
        if tap_mtu.is_some_and(|mtu| !(576..=65535).contains(&mtu)) {
            return Err(ConfigError::Value {
                key: "tap_mtu",
                message: "outside 576..=65535".into(),
            });
        }
        Ok(Config {
            bridge,
            tap_mtu,
            etcd,
            tls,
            host_name,
            listen,
            advertise,
            metrics_listen,
            store,
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/ftd")),
            ftvmm: args.ftvmm.or(file.ftvmm).unwrap_or_else(default_ftvmm),
            lease_ttl: Duration::from_secs(lease_seconds),
            log_level,
            log_format,
            log_listen_ip: args
                .log_listen_ip
                .or(file.log_listen_ip)
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            log_port_base: args.log_port_base.or(file.log_port_base).unwrap_or(7800),
            paths,
            replica_user,
            replica_seccomp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn write_config(text: &str) -> PathBuf {
        let dir = ftvm_tests::temp_dir("config");
        let path = dir.join("ftd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let path = write_config(
            "host_name = \"a\"\nlisten = \"127.0.0.1:7801\"\nlease_ttl = 5\ninsecure = true\n",
        );
        let args = Args::parse_from([
            "ftd",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:7802",
        ]);
        let config = Config::load(args).expect("valid config");
        assert_eq!(config.host_name.as_str(), "a");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7802");
        assert_eq!(config.advertise, "127.0.0.1:7802");
        assert_eq!(config.lease_ttl, Duration::from_secs(5));
        assert_eq!(config.metrics_listen.to_string(), "127.0.0.1:9700");
        assert_eq!(config.log_listen_ip.to_string(), "127.0.0.1");
        assert_eq!(config.log_port_base, 7800);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(
            config.store,
            StoreConfig::Etcd(vec!["http://127.0.0.1:2379".into()])
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let path = write_config("hostname = \"a\"\n");
        let args = Args {
            config: Some(path),
            ..Args::default()
        };
        assert!(matches!(Config::load(args), Err(ConfigError::Parse { .. })));
        let args = Args {
            host_name: Some("Not Valid".into()),
            ..Args::default()
        };
        assert!(matches!(
            Config::load(args),
            Err(ConfigError::Value {
                key: "host_name",
                ..
            })
        ));
        let args = Args {
            host_name: Some("a".into()),
            lease_ttl: Some(1),
            insecure: true,
            ..Args::default()
        };
        assert!(matches!(
            Config::load(args),
            Err(ConfigError::Value {
                key: "lease_ttl",
                ..
            })
        ));
        for (text, key) in [
            ("replica_seccomp = \"loose\"\n", "replica_seccomp"),
            ("replica_user = \"--help\"\n", "replica_user"),
            ("log_format = \"xml\"\n", "log_format"),
        ] {
            let args = Args {
                config: Some(write_config(text)),
                host_name: Some("a".into()),
                insecure: true,
                ..Args::default()
            };
            assert!(
                matches!(Config::load(args), Err(ConfigError::Value { key: k, .. }) if k == key),
                "{text}"
            );
        }
    }

    #[test]
    fn the_example_config_in_deploy_loads() {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ftd.example.toml");
        let text = std::fs::read_to_string(example).expect("the example config");
        let pki = ftvm_tests::Pki::new(&ftvm_tests::temp_dir("config-pki"));
        let host = pki.host("a");
        assert!(text.contains("tls_dir = \"/etc/ftvm/tls\""));
        let text = text.replace("/etc/ftvm/tls", host.to_str().expect("utf-8 path"));
        let config = Config::load(Args {
            config: Some(write_config(&text)),
            host_name: Some("a".into()),
            ..Args::default()
        })
        .expect("deploy/ftd.example.toml is a valid config");
        assert_eq!(config.listen.to_string(), "0.0.0.0:7700");
        assert_eq!(config.lease_ttl, Duration::from_secs(10));
        assert_eq!(config.replica_user.as_deref(), Some("nobody"));
        assert_eq!(config.replica_seccomp, SeccompMode::Enforce);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.tls.map(|tls| tls.dir), Some(host));
        let json = Config::load(Args {
            host_name: Some("a".into()),
            log_format: Some("json".into()),
            insecure: true,
            ..Args::default()
        })
        .expect("json is a log format");
        assert_eq!(json.log_format, LogFormat::Json);
    }

    #[test]
    fn tls_is_required_and_must_be_this_hosts() {
        let pki = ftvm_tests::Pki::new(&ftvm_tests::temp_dir("config-tls"));
        let load = |host: &str, tls_dir: Option<PathBuf>, insecure: bool| {
            Config::load(Args {
                host_name: Some(host.into()),
                tls_dir,
                insecure,
                ..Args::default()
            })
        };
        let refused = |result: Result<Config, ConfigError>| {
            matches!(result, Err(ConfigError::Value { key: "tls_dir", .. }))
        };
        assert!(refused(load("a", None, false)), "no TLS and not insecure");
        assert!(refused(load("a", Some(pki.host("a")), true)), "both");
        assert!(
            refused(load("b", Some(pki.host("a")), false)),
            "host a's certificate on b"
        );
        let operator = pki.issue(ftvm_tls::Role::Operator, "a");
        assert!(
            refused(load("a", Some(operator), false)),
            "an operator certificate"
        );
        let missing = pki.host("a").join("nowhere");
        assert!(
            refused(load("a", Some(missing), false)),
            "a missing directory"
        );
        let loaded = load("a", Some(pki.host("a")), false).expect("host a's own certificate");
        assert_eq!(
            loaded.tls.map(|tls| tls.credentials.identity().clone()),
            Some(ftvm_tls::Identity {
                role: ftvm_tls::Role::Host,
                name: "a".into()
            })
        );
        assert!(load("a", None, true).expect("insecure").tls.is_none());
    }
}
