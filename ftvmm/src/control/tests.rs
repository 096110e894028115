use super::*;
use ftvm_pair::arbiter::{local::LocalArbiter, Failover, PairId};
use ftvm_pair::channel::{ChannelStats, StatsSource, HOLD_BUCKET_BOUNDS_US};
use ftvm_pair::golive::{GoLive, Role, State};

/// A go-live of `role` for `web1` generation `generation`, claims in `dir`; `won`: its
/// peer was lost and it won.
fn golive(dir: &Path, role: Role, generation: u64, won: bool) -> Arc<GoLive> {
    let failover = Failover {
        arbiter: Box::new(LocalArbiter::new(dir).expect("arbiter dir")),
        pair: PairId {
            vm: "web1".into(),
            uid: None,
            generation,
        },
        me: format!("{role:?}@test"),
    };
    let golive = Arc::new(GoLive::new(role, failover));
    if won {
        assert_eq!(golive.peer_lost("test", false), State::Live);
    }
    golive
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvmm-control-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn shared(role: ReplicaRole, snapshot: Snapshot, view: Arc<PairView>) -> Shared {
    Shared {
        identity: Identity {
            vm: Some("web 1".into()),
            generation: 2,
            role,
            disk: None,
        },
        started: Instant::now(),
        snapshot: Mutex::new(snapshot),
        memory: Mutex::default(),
        view,
        clients: AtomicUsize::new(0),
        // SAFETY: pthread_self has no preconditions.
        vcpu_thread: unsafe { libc::pthread_self() },
        path: PathBuf::new(),
    }
}

#[test]
fn status_names_a_backup_that_went_live_live() {
    let dir = scratch("live");
    let view = Arc::new(PairView::default());
    view.join(
        golive(&dir, Role::Backup, 2, true),
        StatsSource::fixed(ChannelStats::default()),
        false,
    );
    let snapshot = Snapshot {
        went_live_at: Some(7),
        ..Snapshot::default()
    };
    let line = status::report(&shared(ReplicaRole::Backup, snapshot, view)).to_string();
    assert!(line.starts_with("vm=web_1 pid="), "{line}");
    assert!(line.contains(" role=live "), "{line}");
    assert!(line.contains(" protected=0 "), "{line}");
    assert!(line.contains(" went_live_at=7 go_live_ms="), "{line}");
    assert!(!line.contains("backup_lag"), "a backup has no lag: {line}");
}

#[test]
fn a_live_backup_that_cloned_a_new_backup_is_that_pairs_protected_primary() {
    let dir = scratch("cloned");
    let view = Arc::new(PairView::default());
    view.join(
        golive(&dir, Role::Primary, 3, false),
        StatsSource::fixed(ChannelStats::default()),
        true,
    );
    let snapshot = Snapshot {
        went_live_at: Some(7),
        ..Snapshot::default()
    };
    let line = status::report(&shared(ReplicaRole::Backup, snapshot, view)).to_string();
    assert!(line.contains(" role=primary "), "{line}");
    assert!(line.contains(" generation=3 "), "{line}");
    assert!(line.contains(" protected=1 peer_lost=0 "), "{line}");
    assert!(line.contains(" backup_lag_exits="), "{line}");
}

#[test]
fn stop_backup_is_refused_by_a_backup_that_went_live() {
    let dir = scratch("refuse");
    let view = Arc::new(PairView::default());
    view.join(
        golive(&dir, Role::Backup, 2, true),
        StatsSource::fixed(ChannelStats::default()),
        false,
    );
    let shared = shared(ReplicaRole::Backup, Snapshot::default(), view);
    let (mut client, server) = UnixStream::pair().expect("a socket pair");
    client.write_all(b"stop-backup\n").expect("request");
    handle(server, &shared);
    let mut answer = String::new();
    client.read_to_string(&mut answer).expect("answer");
    assert_eq!(
        answer,
        "error: not stopping: this replica went live: it is the VM now (role=live)\n"
    );
}

#[test]
fn the_hold_histogram_is_cumulative_and_counts_every_release() {
    let mut channel = ChannelStats::default();
    channel.outputs.hold_buckets[0] = 2;
    channel.outputs.hold_buckets[3] = 1;
    channel.outputs.hold_buckets[HOLD_BUCKET_BOUNDS_US.len()] = 4;
    channel.outputs.hold_us_total = 1_500_000;
    let mut text = String::new();
    metrics::hold_histogram(&mut text, &channel);
    assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"0.00005\"} 2\n"));
    assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"0.0005\"} 3\n"));
    assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"0.25\"} 3\n"));
    assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"+Inf\"} 7\n"));
    assert!(text.contains("ftvmm_output_hold_seconds_sum 1.5\n"));
    assert!(text.contains("ftvmm_output_hold_seconds_count 7\n"));
}
