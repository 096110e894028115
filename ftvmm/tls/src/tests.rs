use super::issue::{issue, new_ca, Issued};
use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A credentials directory for `identity`, signed by `ca`.
fn credentials(ca: &Issued, identity: &Identity) -> Credentials {
    let dir = std::env::temp_dir().join(format!(
        "ftvm-tls-{}-{}-{}",
        std::process::id(),
        identity.role,
        identity.name
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let leaf = issue(&ca.key_pem, identity, 30).unwrap();
    std::fs::write(dir.join(CA_FILE), &ca.cert_pem).unwrap();
    std::fs::write(dir.join(CERT_FILE), &leaf.cert_pem).unwrap();
    write_key(&dir.join(KEY_FILE), &leaf.key_pem);
    let loaded = TlsFiles::in_dir(&dir).load().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    loaded
}

fn host(name: &str) -> Identity {
    Identity {
        role: Role::Host,
        name: name.to_owned(),
    }
}

/// Connects a client with `client` credentials to a server with `server` credentials.
fn connect(
    server: &Credentials,
    client: &Credentials,
) -> (Result<Socket, TlsError>, Result<Socket, TlsError>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let side = TlsSide::Server(server.server_config().unwrap());
    let accepting = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        Socket::handshake(tcp, side, Duration::from_secs(5))
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let connected = Socket::handshake(
        tcp,
        TlsSide::Client(client.client_config().unwrap()),
        Duration::from_secs(5),
    );
    (accepting.join().unwrap(), connected)
}

#[test]
fn a_certificate_says_who_it_speaks_for() {
    let ca = new_ca(30).unwrap();
    for role in [Role::Host, Role::Operator, Role::Viewer] {
        let identity = Identity {
            role,
            name: "alice-1".to_owned(),
        };
        assert_eq!(credentials(&ca, &identity).identity(), &identity);
    }
    let bad = Identity {
        role: Role::Operator,
        name: "Alice".to_owned(),
    };
    assert!(matches!(
        issue(&ca.key_pem, &bad, 1),
        Err(TlsError::Issue(_))
    ));
}

#[test]
fn two_hosts_of_one_cluster_talk_both_ways_at_once() {
    let ca = new_ca(30).unwrap();
    let (a, b) = (credentials(&ca, &host("a")), credentials(&ca, &host("b")));
    let (server, client) = connect(&a, &b);
    let (server, client) = (server.unwrap(), client.unwrap());
    assert_eq!(server.peer_identity(), Some(&host("b")));
    assert_eq!(client.peer_identity(), Some(&host("a")));
    // Each side writes 8 MiB while another thread of it reads the other's 8 MiB: with
    // small socket buffers this only finishes if neither direction waits on the other.
    const TOTAL: usize = 8 << 20;
    let pattern = |i: usize| (i % 251) as u8;
    let mut threads = Vec::new();
    for link in [server, client] {
        let writer = link.try_clone().unwrap();
        threads.push(std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..65_536).map(pattern).collect();
            let mut sent = 0;
            while sent < TOTAL {
                (&writer).write_all(&chunk).unwrap();
                sent += chunk.len();
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut got = 0;
            let mut buf = vec![0u8; 10_000];
            while got < TOTAL {
                let n = (&link).read(&mut buf).unwrap();
                assert_ne!(n, 0, "stream ended at {got}");
                for (k, byte) in buf[..n].iter().enumerate() {
                    assert_eq!(*byte, pattern((got + k) % 65_536));
                }
                got += n;
            }
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn a_certificate_of_another_ca_is_refused_by_both_ends() {
    let (ours, theirs) = (new_ca(30).unwrap(), new_ca(30).unwrap());
    let a = credentials(&ours, &host("a"));
    let stranger = credentials(&theirs, &host("a"));
    let (server, _) = connect(&a, &stranger);
    assert!(server.is_err(), "server took a stranger's client");
    let (_, client) = connect(&stranger, &a);
    assert!(client.is_err(), "client took a stranger's server");
}

#[test]
fn an_operator_certificate_cannot_join_a_replica_channel() {
    let ca = new_ca(30).unwrap();
    let a = credentials(&ca, &host("a"));
    let operator = credentials(
        &ca,
        &Identity {
            role: Role::Operator,
            name: "alice".to_owned(),
        },
    );
    let (server, _) = connect(&a, &operator);
    assert!(
        matches!(server, Err(TlsError::Forbidden { ref peer, .. }) if peer.role == Role::Operator),
        "{server:?}"
    );
}

#[test]
fn a_silent_peer_fails_the_handshake_in_time() {
    let ca = new_ca(30).unwrap();
    let a = credentials(&ca, &host("a"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let started = std::time::Instant::now();
    let result = Socket::handshake(
        tcp,
        TlsSide::Server(a.server_config().unwrap()),
        Duration::from_millis(300),
    );
    assert!(matches!(result, Err(TlsError::Handshake(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_at_load() {
    let ca = new_ca(30).unwrap();
    let dir = std::env::temp_dir().join(format!("ftvm-tls-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let one = issue(&ca.key_pem, &host("a"), 1).unwrap();
    let other = issue(&ca.key_pem, &host("b"), 1).unwrap();
    std::fs::write(dir.join(CA_FILE), &ca.cert_pem).unwrap();
    std::fs::write(dir.join(CERT_FILE), &one.cert_pem).unwrap();
    write_key(&dir.join(KEY_FILE), &other.key_pem);
    let loaded = TlsFiles::in_dir(&dir).load();
    assert!(loaded.is_err(), "a mismatched key was accepted");
    // The right key, but readable by others.
    write_key(&dir.join(KEY_FILE), &one.key_pem);
    assert!(TlsFiles::in_dir(&dir).load().is_ok());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
    let loaded = TlsFiles::in_dir(&dir).load();
    assert!(
        matches!(&loaded, Err(TlsError::Pem { message, .. }) if message.contains("chmod 600")),
        "{loaded:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn etcd_access_reads_tls_and_a_user_and_refuses_half_given_credentials() {
    let ca = new_ca(30).unwrap();
    let dir = std::env::temp_dir().join(format!("ftvm-tls-etcd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CA_FILE), &ca.cert_pem).unwrap();
    let password = dir.join("password");
    std::fs::write(&password, "pw\nignored\n").unwrap();
    let none = EtcdAccess::load(None, None, None).unwrap();
    assert!(!none.is_tls());
    assert_eq!(none.url("https://10.0.0.1:2379"), "http://10.0.0.1:2379");
    let ca_only = EtcdAccess::load(Some(&dir), Some("ftd"), Some(&password)).unwrap();
    assert!(ca_only.is_tls() && ca_only.client.is_none());
    assert_eq!(ca_only.user, Some(("ftd".into(), "pw".into())));
    assert_eq!(ca_only.url("10.0.0.1:2379"), "https://10.0.0.1:2379");
    assert!(EtcdAccess::load(None, Some("ftd"), None).is_err());
    assert!(EtcdAccess::load(None, None, Some(&password)).is_err());
    // A certificate without its key.
    let leaf = issue(&ca.key_pem, &host("a"), 1).unwrap();
    std::fs::write(dir.join(CERT_FILE), &leaf.cert_pem).unwrap();
    assert!(EtcdAccess::load(Some(&dir), None, None).is_err());
    write_key(&dir.join(KEY_FILE), &leaf.key_pem);
    let with_client = EtcdAccess::load(Some(&dir), None, None).unwrap();
    assert!(with_client.client.is_some());
    // The password never shows in debug output.
    assert!(!format!("{ca_only:?}").contains("pw\""));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes a private key as `ftctl certs` does: readable by its owner only.
fn write_key(path: &std::path::Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).expect("write key.pem");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod key.pem");
}

/// Writes of every size, big records split across the reader's socket reads and small
/// ones after them, read back in small pieces: rustls must never be handed more than it
/// takes (it refuses input once 16 KiB of plaintext wait unread).
#[test]
fn records_of_mixed_sizes_come_through_whatever_the_read_sizes() {
    let ca = new_ca(30).unwrap();
    let (a, b) = (credentials(&ca, &host("a")), credentials(&ca, &host("b")));
    let (server, client) = connect(&a, &b);
    let (server, client) = (server.unwrap(), client.unwrap());
    // A fixed pseudo-random sequence of write sizes: 1 byte to 40 KB.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let sizes: Vec<usize> = (0..3000)
        .map(|_| match next() % 4 {
            0 => 1 + (next() % 40_000) as usize,
            _ => 1 + (next() % 64) as usize,
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let pattern = |i: usize| (i % 253) as u8;
    let writer = std::thread::spawn(move || {
        let mut at = 0;
        for size in sizes {
            let chunk: Vec<u8> = (at..at + size).map(pattern).collect();
            (&client).write_all(&chunk).unwrap();
            at += size;
        }
        client
    });
    // Let the writes pile up in the socket, so that reads come in large raw chunks.
    std::thread::sleep(Duration::from_millis(200));
    let mut got = 0;
    let mut buf = [0u8; 97];
    while got < total {
        let n = (&server).read(&mut buf).unwrap();
        assert_ne!(n, 0, "stream ended at {got} of {total}");
        for (k, byte) in buf[..n].iter().enumerate() {
            assert_eq!(*byte, pattern(got + k), "at {}", got + k);
        }
        got += n;
    }
    drop(writer.join().unwrap());
}
