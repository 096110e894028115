//! The one test suite every [`Store`]/[`Election`] implementation must pass. Each check is
//! an async function over a [`Backend`]; `backend_tests!` runs all of them against the
//! in-memory store and against a real etcd started for the test (which fails loudly when
//! etcd is missing).

use super::etcd::{EtcdElection, EtcdStore};
use super::memory::{MemElection, MemStore};
use super::{Election, Store, StoreError, WatchEvent, Write};
use ftvm_tests::LocalEtcd;
use std::sync::Arc;
use std::time::Duration;

/// A store, a way to make election handles on it, and whatever keeps it alive.
pub(crate) struct Backend {
    pub store: Arc<dyn Store>,
    pub election: Box<dyn Fn() -> Arc<dyn Election> + Send + Sync>,
    _etcd: Option<LocalEtcd>,
}

pub(crate) fn memory() -> Backend {
    let store = MemStore::new();
    let for_election = store.clone();
    Backend {
        store: Arc::new(store),
        election: Box::new(move || Arc::new(MemElection::new(for_election.clone(), "/t/leader"))),
        _etcd: None,
    }
}

pub(crate) async fn etcd() -> Backend {
    let etcd = LocalEtcd::start();
    let access = ftvm_tls::EtcdAccess::default();
    let store = EtcdStore::connect(
        std::slice::from_ref(&etcd.endpoint),
        &access,
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|err| panic!("cannot connect to the test etcd: {err}"));
    let election = EtcdElection::connect(
        std::slice::from_ref(&etcd.endpoint),
        &access,
        Duration::from_secs(5),
        "/t/leader",
    )
    .await
    .unwrap_or_else(|err| panic!("cannot connect to the test etcd: {err}"));
    Backend {
        store: Arc::new(store),
        election: Box::new(move || Arc::new(election.clone())),
        _etcd: Some(etcd),
    }
}

fn value(kv: Option<super::KeyValue>) -> Option<String> {
    kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

pub(crate) async fn put_get_delete_round_trip(b: Backend) {
    let s = &b.store;
    assert_eq!(s.get("/t/a").await.expect("get"), None);
    s.put("/t/a", b"1".to_vec(), None).await.expect("put");
    assert_eq!(value(s.get("/t/a").await.expect("get")), Some("1".into()));
    s.put("/t/a", b"2".to_vec(), None).await.expect("put");
    assert_eq!(value(s.get("/t/a").await.expect("get")), Some("2".into()));
    assert!(s.delete("/t/a").await.expect("delete"));
    assert!(!s.delete("/t/a").await.expect("delete"));
    assert_eq!(s.get("/t/a").await.expect("get"), None);
}

pub(crate) async fn create_only_succeeds_when_the_key_is_absent(b: Backend) {
    let s = &b.store;
    assert!(s
        .create("/t/c", b"first".to_vec(), None)
        .await
        .expect("create"));
    assert!(!s
        .create("/t/c", b"second".to_vec(), None)
        .await
        .expect("create"));
    assert_eq!(
        value(s.get("/t/c").await.expect("get")),
        Some("first".into())
    );
}

pub(crate) async fn concurrent_creates_have_exactly_one_winner(b: Backend) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = b.store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create("/t/race", format!("{i}").into_bytes(), None)
                .await
                .expect("create")
        }));
    }
    let mut winners = 0;
    for task in tasks {
        if task.await.expect("join") {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

pub(crate) async fn list_prefix_returns_only_the_prefix_sorted(b: Backend) {
    let s = &b.store;
    for key in ["/t/l/b", "/t/l/a", "/t/lx", "/t/m"] {
        s.put(key, key.as_bytes().to_vec(), None)
            .await
            .expect("put");
    }
    let keys: Vec<String> = s
        .list_prefix("/t/l/")
        .await
        .expect("list")
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/t/l/a", "/t/l/b"]);
    assert_eq!(s.delete_prefix("/t/l/").await.expect("delete prefix"), 2);
    assert!(s.list_prefix("/t/l/").await.expect("list").is_empty());
    assert!(s.get("/t/lx").await.expect("get").is_some());
}

pub(crate) async fn put_if_unchanged_detects_a_concurrent_change(b: Backend) {
    let s = &b.store;
    s.put("/t/v", b"1".to_vec(), None).await.expect("put");
    let seen = s.get("/t/v").await.expect("get").expect("present");
    assert!(s
        .put_if_unchanged("/t/v", b"2".to_vec(), seen.mod_revision)
        .await
        .expect("cas"));
    assert!(!s
        .put_if_unchanged("/t/v", b"3".to_vec(), seen.mod_revision)
        .await
        .expect("cas"));
    assert_eq!(value(s.get("/t/v").await.expect("get")), Some("2".into()));
}

pub(crate) async fn watch_sees_puts_and_deletes_under_its_prefix_only(b: Backend) {
    let s = &b.store;
    let mut watch = s.watch_prefix("/t/w/").await.expect("watch");
    s.put("/t/other", b"x".to_vec(), None).await.expect("put");
    s.put("/t/w/1", b"a".to_vec(), None).await.expect("put");
    s.delete("/t/w/1").await.expect("delete");
    let first = tokio::time::timeout(Duration::from_secs(5), watch_next(&mut watch))
        .await
        .expect("a watch event within 5 s");
    assert!(
        matches!(&first, WatchEvent::Put(kv) if kv.key == "/t/w/1" && kv.value == b"a"),
        "{first:?}"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a watch event within 5 s");
    assert_eq!(second, Some(WatchEvent::Delete("/t/w/1".into())));
}

async fn watch_next(watch: &mut super::Watch) -> WatchEvent {
    watch.next().await.expect("the watch ended early")
}

pub(crate) async fn revoking_a_lease_deletes_its_keys(b: Backend) {
    let s = &b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    s.put("/t/lease/a", b"1".to_vec(), Some(lease))
        .await
        .expect("put");
    assert!(s
        .create("/t/lease/b", b"1".to_vec(), Some(lease))
        .await
        .expect("create"));
    s.keep_alive(lease).await.expect("keep alive");
    s.revoke_lease(lease).await.expect("revoke");
    assert!(s.list_prefix("/t/lease/").await.expect("list").is_empty());
    let refreshed = s.keep_alive(lease).await;
    assert!(
        matches!(refreshed, Err(StoreError::LeaseExpired(id)) if id == lease),
        "{refreshed:?}"
    );
    assert!(matches!(
        s.put("/t/lease/c", b"1".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseExpired(_))
    ));
}

pub(crate) async fn keys_vanish_when_their_lease_is_not_kept_alive(b: Backend) {
    let s = &b.store;
    let kept = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
    let dropped = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
    s.put("/t/ttl/kept", b"1".to_vec(), Some(kept))
        .await
        .expect("put");
    s.put("/t/ttl/dropped", b"1".to_vec(), Some(dropped))
        .await
        .expect("put");
    let mut watch = s.watch_prefix("/t/ttl/").await.expect("watch");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut deleted = None;
    while deleted.is_none() && tokio::time::Instant::now() < deadline {
        s.keep_alive(kept).await.expect("keep alive");
        if let Ok(Some(WatchEvent::Delete(key))) =
            tokio::time::timeout(Duration::from_millis(500), watch.next()).await
        {
            deleted = Some(key);
        }
    }
    assert_eq!(deleted.as_deref(), Some("/t/ttl/dropped"));
    assert!(s.get("/t/ttl/kept").await.expect("get").is_some());
}

pub(crate) async fn the_first_candidate_leads_until_its_lease_ends(b: Backend) {
    let s = &b.store;
    let one = (b.election)();
    let two = (b.election)();
    assert_eq!(one.leader().await.expect("leader"), None);
    let lease_one = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let lease_two = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let won = one
        .campaign(b"one".to_vec(), lease_one)
        .await
        .expect("campaign");
    let leader = one.leader().await.expect("leader").expect("a leader");
    assert_eq!(
        (leader.key.as_str(), leader.value.as_slice()),
        (won.key.as_str(), &b"one"[..])
    );

    let waiting = tokio::spawn(async move { two.campaign(b"two".to_vec(), lease_two).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a second candidate must wait while the first leads"
    );
    s.revoke_lease(lease_one).await.expect("revoke");
    let second = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the second candidate leads within 5 s of the first lease's end")
        .expect("join")
        .expect("campaign");
    let leader = one.leader().await.expect("leader").expect("a leader");
    assert_eq!(leader.key, second.key);
    assert_eq!(leader.value, b"two");
}

pub(crate) async fn a_leader_that_resigns_leaves_no_leader(b: Backend) {
    let s = &b.store;
    let election = (b.election)();
    let lease = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let won = election
        .campaign(b"x".to_vec(), lease)
        .await
        .expect("campaign");
    election.resign(&won).await.expect("resign");
    assert_eq!(election.leader().await.expect("leader"), None);
}

pub(crate) async fn fenced_writes_fail_once_the_leadership_key_is_gone_or_anothers(b: Backend) {
    let s = &b.store;
    let election = (b.election)();
    let lease = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let won = election
        .campaign(b"one".to_vec(), lease)
        .await
        .expect("campaign");
    let fence = won.fence();
    let put = |key: &str, value: &str| Write::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    };
    // While it leads: applied at once, or not at all when a write's condition fails.
    assert!(s
        .commit(
            &fence,
            &[
                put("/t/f/a", "1"),
                Write::Create {
                    key: "/t/f/b".into(),
                    value: b"2".to_vec()
                }
            ]
        )
        .await
        .expect("commit"));
    assert_eq!(value(s.get("/t/f/a").await.expect("get")), Some("1".into()));
    let refused = s
        .commit(
            &fence,
            &[
                put("/t/f/a", "changed"),
                Write::Create {
                    key: "/t/f/b".into(),
                    value: b"again".to_vec(),
                },
            ],
        )
        .await;
    assert!(matches!(refused, Ok(false)), "{refused:?}");
    assert!(matches!(
        s.commit(
            &fence,
            &[Write::DeleteExisting {
                key: "/t/f/none".into()
            }]
        )
        .await,
        Ok(false)
    ));
    assert_eq!(value(s.get("/t/f/a").await.expect("get")), Some("1".into()));
    assert!(s
        .commit(
            &fence,
            &[
                Write::DeleteExisting {
                    key: "/t/f/b".into()
                },
                Write::DeletePrefix {
                    prefix: "/t/f/".into()
                }
            ]
        )
        .await
        .expect("commit"));
    assert!(s.list_prefix("/t/f/").await.expect("list").is_empty());

    // The key is made again (another term under the same name): refused.
    s.delete(&fence.key).await.expect("delete");
    s.put(&fence.key, b"one".to_vec(), None).await.expect("put");
    let late = s.commit(&fence, &[put("/t/f/late", "x")]).await;
    assert!(
        matches!(&late, Err(StoreError::Fenced { key }) if *key == fence.key),
        "{late:?}"
    );
    // The key is gone, another candidate leads: refused, nothing written.
    s.delete(&fence.key).await.expect("delete");
    let other_lease = s.grant_lease(Duration::from_secs(30)).await.expect("grant");
    let other = (b.election)()
        .campaign(b"two".to_vec(), other_lease)
        .await
        .expect("campaign");
    assert_ne!(other.fence(), fence);
    let late = s
        .commit(
            &fence,
            &[Write::DeletePrefix {
                prefix: "/t/".into(),
            }],
        )
        .await;
    assert!(matches!(late, Err(StoreError::Fenced { .. })), "{late:?}");
    assert_eq!(s.get("/t/f/late").await.expect("get"), None);
    assert!(s.get(&other.key).await.expect("get").is_some());
    assert!(s
        .commit(&other.fence(), &[put("/t/f/new", "y")])
        .await
        .expect("the new leader writes"));
}

/// Runs every check of the suite against one backend.
macro_rules! backend_tests {
    ($backend:ident: $($check:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::$backend().await).await;
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($check:ident),* $(,)?) => {
        mod memory_backend {
            pub(crate) async fn memory() -> super::Backend {
                super::memory()
            }
            use super::*;
            backend_tests!(memory: $($check),*);
        }
        mod etcd_backend {
            pub(crate) async fn etcd() -> super::Backend {
                super::etcd().await
            }
            use super::*;
            backend_tests!(etcd: $($check),*);
        }
    };
}

all_backends!(
    put_get_delete_round_trip,
    create_only_succeeds_when_the_key_is_absent,
    concurrent_creates_have_exactly_one_winner,
    list_prefix_returns_only_the_prefix_sorted,
    put_if_unchanged_detects_a_concurrent_change,
    watch_sees_puts_and_deletes_under_its_prefix_only,
    revoking_a_lease_deletes_its_keys,
    keys_vanish_when_their_lease_is_not_kept_alive,
    the_first_candidate_leads_until_its_lease_ends,
    a_leader_that_resigns_leaves_no_leader,
    fenced_writes_fail_once_the_leadership_key_is_gone_or_anothers,
);
