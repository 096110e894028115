//! `etcd://HOST:PORT[,HOST:PORT...]`: the cluster arbiter. A claim is one etcd
//! transaction on `/ft/vms/<vm>/gen/<n>/live`: if the key was never created, put the
//! claimant's name; otherwise read who is there. etcd's linearizable transactions make
//! exactly one claimant of a generation the winner, on whichever host it runs.
//!
//! ftvmm is synchronous, so the arbiter owns a current-thread tokio runtime and blocks on
//! each request. Each endpoint is tried in turn, starting with the last one that
//! answered, with a deadline of [`CONNECT_TIMEOUT`] + [`REQUEST_TIMEOUT`] per endpoint: a
//! dead or partitioned etcd gives [`ArbiterError::Etcd`] within seconds instead of
//! hanging the replica that is trying to go live. (One client balancing over all the
//! endpoints would not do: tonic's balanced channel sends some requests to a dead member
//! and fails them instead of trying another.)

use super::{Arbiter, ArbiterError, PairId, Verdict};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};
use ftvm_contract::claims::{valid_uid, valid_vm_name};
use ftvm_tls::EtcdAccess;
use std::future::Future;
use std::time::Duration;
use tokio::runtime::Runtime;

/// How long connecting to an etcd endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one request may take once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A client of an etcd cluster, answering claims with one transaction each.
///
/// The claim key has **no lease**: it lives as long as the generation it decides (a
/// rebuilt pair gets generation n+1 and a fresh key). A lease would expire once the
/// winner is dead and stops renewing it; a second claimant of the *same* generation (the
/// loser restarting, or a replica that was slow to notice the failure) would then find
/// the key absent and win too: two lives of one pair across time, with the second one
/// continuing from a state the first one has already diverged from. Keys of finished
/// generations are left for the control plane to clean up.
pub struct EtcdArbiter {
    // Declared before `runtime` so the clients (and the tasks of their channels) are
    // dropped while the runtime still exists.
    /// One client per endpoint, connected on first use and dropped after a failure.
    clients: Vec<Option<Client>>,
    runtime: Runtime,
    /// The endpoints as `http://HOST:PORT` (or https with TLS), for connecting.
    urls: Vec<String>,
    /// TLS and user credentials for etcd.
    access: EtcdAccess,
    /// The endpoint to try first: the last one that answered.
    preferred: usize,
    /// The endpoints as given (`HOST:PORT,HOST:PORT`), for error messages.
    endpoint: String,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl EtcdArbiter {
    /// An arbiter for the comma-separated `HOST:PORT` list of an `etcd://` spec (the part
    /// after `etcd://`), reached with `access` (TLS and/or a user). Nothing is contacted
    /// yet: etcd need only be up when a replica claims, and each call (re)connects as
    /// needed.
    pub fn new(endpoints: &str, access: EtcdAccess) -> Result<Self, ArbiterError> {
        let bad_spec = || ArbiterError::BadSpec(format!("etcd://{endpoints}"));
        let mut urls = Vec::new();
        for endpoint in endpoints.split(',') {
            let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad_spec)?;
            if host.is_empty()
                || host.contains(['/', '@', '?', '#'])
                || host.chars().any(char::is_whitespace)
                || port.parse::<u16>().is_err()
            {
                return Err(bad_spec());
            }
            urls.push(access.url(endpoint));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| ArbiterError::Etcd {
                endpoint: endpoints.to_owned(),
                message: format!("cannot start the tokio runtime: {err}"),
            })?;
        Ok(EtcdArbiter {
            clients: urls.iter().map(|_| None).collect(),
            runtime,
            urls,
            access,
            preferred: 0,
            endpoint: endpoints.to_owned(),
        })
    }

    /// Runs `request` on the first endpoint that answers it, each within the deadline.
    /// `request` may thus run more than once (on different members): it must be
    /// idempotent, which a claim is for a given claimant.
    fn call<T, F, Fut>(&mut self, what: &str, request: F) -> Result<T, ArbiterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut failures = Vec::new();
        for attempt in 0..self.urls.len() {
            let index = (self.preferred + attempt) % self.urls.len();
            let url = &self.urls[index];
            let cached = self.clients[index].take();
            let access = &self.access;
            let result = self.runtime.block_on(async {
                let work = async {
                    let client = match cached {
                        Some(client) => client,
                        None => {
                            let options = access.connect_options(
                                ConnectOptions::new()
                                    .with_connect_timeout(CONNECT_TIMEOUT)
                                    .with_timeout(REQUEST_TIMEOUT),
                            );
                            Client::connect([url], Some(options)).await?
                        }
                    };
                    // The client is a cheap handle on a shared channel.
                    let answer = request(client.clone()).await?;
                    Ok::<_, etcd_client::Error>((client, answer))
                };
                tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, work).await
            });
            match result {
                Ok(Ok((client, answer))) => {
                    self.clients[index] = Some(client);
                    self.preferred = index;
                    return Ok(answer);
                }
                // The client is dropped: the next call connects afresh.
                Ok(Err(err)) => failures.push(format!("{url}: {err}")),
                Err(_elapsed) => failures.push(format!(
                    "{url}: no answer within {} s",
                    (CONNECT_TIMEOUT + REQUEST_TIMEOUT).as_secs()
                )),
            }
        }
        Err(self.error(format!("{what}: {}", failures.join("; "))))
    }

    fn error(&self, message: String) -> ArbiterError {
        ArbiterError::Etcd {
            endpoint: self.endpoint.clone(),
            message,
        }
    }

    /// The claimant stored in a value read from etcd.
    fn name(&self, key: &str, value: &[u8]) -> Result<String, ArbiterError> {
        String::from_utf8(value.to_vec())
            .map_err(|_| self.error(format!("{key} holds a value that is not UTF-8")))
    }
}

/// The claim key of `pair` (`ftvm_contract::claims::go_live_key`).
fn key(pair: &PairId) -> Result<String, ArbiterError> {
    if !valid_vm_name(&pair.vm) {
        return Err(ArbiterError::BadName(pair.vm.clone()));
    }
    if let Some(uid) = pair.uid.as_deref().filter(|uid| !valid_uid(uid)) {
        return Err(ArbiterError::BadName(uid.to_owned()));
    }
    Ok(ftvm_contract::claims::go_live_key(
        &pair.vm,
        pair.uid.as_deref(),
        pair.generation,
    ))
}

impl Arbiter for EtcdArbiter {
    /// One transaction: if `create_revision(key) == 0` (never created) put `me`, else get
    /// the key. A claim whose answer was lost (timeout after etcd applied it) is safe to
    /// retry: the same claimant finds its own name and wins again.
    fn claim(&mut self, pair: &PairId, me: &str) -> Result<Verdict, ArbiterError> {
        let key = key(pair)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), me, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self.call("claim", |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })?;
        if response.succeeded() {
            return Ok(Verdict::Won);
        }
        let stored = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let Some(stored) = stored else {
            // Cannot happen: the compare failed because the key exists, and the get runs
            // in the same atomic transaction.
            return Err(self.error(format!("{key} exists but could not be read")));
        };
        let winner = self.name(&key, &stored)?;
        if winner == me {
            Ok(Verdict::Won)
        } else {
            Ok(Verdict::Lost { winner })
        }
    }

    fn winner(&mut self, pair: &PairId) -> Result<Option<String>, ArbiterError> {
        let key = key(pair)?;
        let response = self.call("winner", |mut client| {
            let key = key.clone();
            async move { client.get(key, None).await }
        })?;
        match response.kvs().first() {
            Some(kv) => self.name(&key, kv.value()).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_tests::{free_port, LocalEtcd};
    use std::time::Instant;

    #[test]
    fn etcd_arbiter_passes_the_arbiter_suite() {
        // Panics (fails the test) with the reason if etcd cannot be started.
        let etcd = LocalEtcd::start();
        let endpoints = etcd
            .endpoint
            .strip_prefix("http://")
            .expect("LocalEtcd gives an http:// endpoint")
            .to_owned();
        let spec = format!("etcd://{endpoints}");
        let make = || crate::arbiter::from_spec(&spec, &EtcdAccess::default()).unwrap();
        crate::arbiter::tests::suite(&make);

        // The key is the one the control plane reads (docs/control-plane.md).
        let mut arbiter = EtcdArbiter::new(&endpoints, EtcdAccess::default()).unwrap();
        let stored = arbiter
            .call("test get", |mut client| async move {
                client.get("/ft/vms/web1/gen/1/live", None).await
            })
            .unwrap();
        assert_eq!(stored.kvs()[0].value(), b"host-a");
        assert_eq!(stored.kvs()[0].lease(), 0, "the claim key has no lease");

        // A member that is down does not stop claims through a live one, whichever
        // comes first in the spec and however often it is asked.
        let dead = format!("127.0.0.1:{}", free_port());
        for (round, spec) in [format!("{dead},{endpoints}"), format!("{endpoints},{dead}")]
            .iter()
            .enumerate()
        {
            let mut arbiter = EtcdArbiter::new(spec, EtcdAccess::default()).unwrap();
            let pair = PairId {
                vm: "two-members".into(),
                uid: None,
                generation: round as u64,
            };
            for _ in 0..10 {
                assert_eq!(arbiter.claim(&pair, "host-a").unwrap(), Verdict::Won);
                assert_eq!(arbiter.winner(&pair).unwrap(), Some("host-a".into()));
                let mut other = EtcdArbiter::new(spec, EtcdAccess::default()).unwrap();
                assert_eq!(
                    other.claim(&pair, "host-b").unwrap(),
                    Verdict::Lost {
                        winner: "host-a".into()
                    }
                );
            }
        }
    }

    /// Asks `endpoint` for a claim and a winner; both must be [`ArbiterError::Etcd`]
    /// within 5 s.
    fn assert_fails_fast(endpoint: &str) {
        let mut arbiter = EtcdArbiter::new(endpoint, EtcdAccess::default()).unwrap();
        let pair = PairId {
            vm: "web1".into(),
            uid: None,
            generation: 1,
        };
        let start = Instant::now();
        let claim = arbiter.claim(&pair, "host-a");
        let took = start.elapsed();
        assert!(matches!(claim, Err(ArbiterError::Etcd { .. })), "{claim:?}");
        assert!(
            took < Duration::from_secs(5),
            "{endpoint}: claim took {took:?}"
        );
        let start = Instant::now();
        let winner = arbiter.winner(&pair);
        let took = start.elapsed();
        assert!(
            matches!(winner, Err(ArbiterError::Etcd { .. })),
            "{winner:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{endpoint}: winner took {took:?}"
        );
    }

    #[test]
    fn an_unreachable_etcd_is_an_error_within_seconds() {
        // Nobody listens: the connection is refused.
        assert_fails_fast(&format!("127.0.0.1:{}", free_port()));
        // Something accepts TCP (the kernel backlog) but never answers: the request
        // timeout has to end it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_fails_fast(&silent.local_addr().unwrap().to_string());
    }

    #[test]
    fn etcd_specs_are_checked() {
        for good in ["127.0.0.1:2379", "etcd-1:2379,etcd-2:2379", "[::1]:2379"] {
            assert!(
                EtcdArbiter::new(good, EtcdAccess::default()).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "",
            "127.0.0.1",
            ":2379",
            "127.0.0.1:",
            "127.0.0.1:x",
            "127.0.0.1:70000",
            "a:1,",
            "http://a:1",
            "a/b:1",
        ] {
            assert!(
                matches!(
                    EtcdArbiter::new(bad, EtcdAccess::default()),
                    Err(ArbiterError::BadSpec(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            crate::arbiter::from_spec("etcd://", &EtcdAccess::default()),
            Err(ArbiterError::BadSpec(_))
        ));
    }
}
