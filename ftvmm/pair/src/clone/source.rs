//! The running side of a clone: a listener thread takes requests (and hands a cloned
//! backup's reconnections to the log channel of the clone it belongs to), and the vCPU
//! thread, between two exits, starts the pre-copy, then stops the guest for the final
//! copy and makes the new pair (see the module doc of `crate::clone`).

use super::{CloneHeader, Precopied, Precopy};
use crate::arbiter::Failover;
use crate::channel::resume::Hello;
use crate::channel::{PrimaryChannel, Resumption, Resumptions};
use crate::golive::{GoLive, Role};
use crate::view::PairView;
use ftvm_machine::inputs::Recorder;
use ftvm_machine::vm::{VcpuHook, Vm};
use ftvm_tls::Socket;
use std::net::TcpListener;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where the clone listener hands reconnecting backups: the sender of the log channel of
/// the last clone made (none before).
type HandOff = Arc<Mutex<Option<Sender<Resumption>>>>;

/// How long the clone listener waits for a connection's hello.
const HELLO_PATIENCE: Duration = Duration::from_secs(1);

/// The claim this replica makes as the primary of a generation's pair.
pub type ClaimFor = Box<dyn Fn(u64) -> Option<Failover>>;

/// A machine that can be cloned into a new backup while it runs alone.
pub struct CloneSource {
    /// A new backup's connection and its hello, left by the listener thread.
    request: Arc<Mutex<Option<(Socket, Hello)>>>,
    /// Where the listener thread hands a cloned backup's reconnections.
    resumptions: HandOff,
    /// The generation of the next pair made (one more after each clone).
    generation: u64,
    /// The go-live claim of this replica as the primary of a generation.
    claim_for: ClaimFor,
    /// Where the new pair is published.
    view: Arc<PairView>,
    /// The pre-copy running, when the request was taken, and the claim of the pair it
    /// makes.
    precopy: Option<(Precopy, Instant, Failover)>,
    /// How the last clone went.
    stats: Option<super::CloneStats>,
}

impl CloneSource {
    /// Accepts clone requests on `listener` from now on: while the machine runs alone, a
    /// new backup that connects gets its state and then the log, and the pair is
    /// `generation` (the next clone's one more), claimed through `claim_for`.
    pub fn listen(
        listener: TcpListener,
        generation: u64,
        claim_for: ClaimFor,
        view: Arc<PairView>,
    ) -> std::io::Result<CloneSource> {
        let request = Arc::new(Mutex::new(None));
        let resumptions: HandOff = Arc::default();
        let (slot, handoff) = (request.clone(), resumptions.clone());
        std::thread::Builder::new()
            .name("ftvmm-clone-listen".into())
            .spawn(move || serve(&listener, &slot, &handoff))?;
        Ok(CloneSource {
            request,
            resumptions,
            generation,
            claim_for,
            view,
            precopy: None,
            stats: None,
        })
    }

    /// How the last clone went, if one was made.
    pub fn stats(&self) -> Option<&super::CloneStats> {
        self.stats.as_ref()
    }

    /// Starts a requested clone, or finishes the one whose pre-copy is over. A clone that
    /// fails leaves the machine running alone.
    fn step(&mut self, vm: &mut Vm) {
        if let Some((precopy, _, _)) = &self.precopy {
            if !precopy.is_finished() {
                if let Some(tracking) = precopy.tracking() {
                    tracking.serve(|pages| vm.harvest_written_pages(pages));
                }
                return;
            }
            let Some((precopy, requested, failover)) = self.precopy.take() else {
                return;
            };
            match precopy.join() {
                Ok(precopied) => self.finish(vm, precopied, requested, failover),
                Err(err) => tracing::error!(
                    "clone: aborted during the pre-copy ({}); running alone",
                    super::one_line(&err)
                ),
            }
            return;
        }
        let socket = self
            .request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((socket, hello)) = socket else {
            return;
        };
        let Some(failover) = (self.claim_for)(self.generation) else {
            tracing::error!(
                "clone: no go-live claim for generation {}: refused",
                self.generation
            );
            return;
        };
        if let Err(why) = hello.check_new(&failover.pair) {
            tracing::warn!("clone: {why}: refused");
            return;
        }
        if !vm.is_live() {
            // In a pair (a primary with its backup, or a backup not live yet): closing
            // tells the requester at once.
            tracing::warn!("clone: refused, this replica is not running alone");
            return;
        }
        let header = CloneHeader {
            generation: self.generation,
            machine: vm.identity().clone(),
        };
        let disk = vm
            .private_disk()
            .map(|disk| super::disk::DiskSender::new(disk, self.view.start_disk_copy()));
        let tracking = start_tracking(vm);
        match Precopy::start(socket, vm.memory().clone(), header, disk, tracking) {
            Ok(precopy) => self.precopy = Some((precopy, Instant::now(), failover)),
            Err(err) => tracing::error!(
                "clone: cannot start ({}); running alone",
                super::one_line(&err)
            ),
        }
    }

    /// The stop-and-copy, then the log channel to the new backup on the same socket: the
    /// new pair, with a go-live of its own.
    fn finish(
        &mut self,
        vm: &mut Vm,
        mut precopied: Precopied,
        requested: Instant,
        failover: Failover,
    ) {
        let paused = Instant::now();
        let generation = self.generation;
        // The new backup re-issues only what it sees complete from now on: the writes this
        // replica completed so far must not depend on its host's page cache. (A private
        // disk is copied instead: the new backup never reads this one.)
        let private = precopied.disk.is_some();
        if let Err(err) = if private { Ok(()) } else { vm.sync_disks() } {
            tracing::error!("clone: cannot sync the disk ({err}); running alone");
            return;
        }
        let resume = match vm.pause_for_copy() {
            Ok(resume) => resume,
            Err(err) => {
                tracing::error!("clone: cannot pause for the final copy ({err}); running alone");
                return;
            }
        };
        let machine = vm.identity().clone();
        let result = super::finish(vm.snapshot_parts(), &machine, resume, &mut precopied);
        let report = match result {
            Ok(report) => report,
            Err(err) => {
                tracing::error!(
                    "clone: aborted in the final copy ({}) after a pause of {:.1} ms; running alone",
                    super::one_line(&err),
                    paused.elapsed().as_secs_f64() * 1000.0
                );
                return;
            }
        };
        // Both sides start the log with no KVM mappings and the same carried dirty pages.
        let restarting = Instant::now();
        let restarted = vm.restart_memory_tracking();
        let restart = restarting.elapsed();
        if let Err(err) = restarted {
            tracing::error!("clone: cannot re-register guest memory: {err}; running alone");
            return;
        }
        // The new backup reconnects to the clone listener, which hands its connections
        // to this channel (and no longer to the channel of an earlier clone).
        let (handoff, resumptions) = std::sync::mpsc::channel();
        *self
            .resumptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(handoff);
        let golive = Arc::new(GoLive::new(Role::Primary, failover));
        let started = PrimaryChannel::start(
            precopied.socket,
            Some(Resumptions::Handed(resumptions)),
            vm.tap_for_pair(),
            golive.clone(),
        )
        .map_err(|err| err.to_string())
        .and_then(|(channel, writer)| {
            let source = channel.stats_source();
            Recorder::streaming(Box::new(channel), Box::new(writer), vm.identity().clone())
                .map(|recorder| (recorder, source))
                .map_err(|err| err.to_string())
        });
        let (recorder, source) = match started {
            Ok(started) => started,
            Err(err) => {
                tracing::error!("clone: cannot start the log channel ({err}); running alone");
                return;
            }
        };
        if let Err(err) = vm.record_to(recorder) {
            tracing::error!("clone: cannot stream the log ({err}); running alone");
            return;
        }
        self.view.join(golive, source, true);
        // A later clone (this backup lost, the primary alone again) is the next pair.
        self.generation += 1;
        let mut stats = precopied.stats;
        stats.pause = paused.elapsed();
        if let Some(disk) = &stats.disk {
            tracing::warn!(
                "clone: disk copied: pre-copy rounds {:?} blocks of {} KiB, {} blocks with the guest stopped ({:.1} ms), digest {:.1} ms, {} bytes",
                disk.round_blocks,
                ftvm_machine::devices::virtio::block::copy::COPY_BLOCK >> 10,
                disk.final_blocks,
                disk.final_pass.as_secs_f64() * 1000.0,
                disk.digest.as_secs_f64() * 1000.0,
                disk.bytes
            );
        }
        tracing::warn!(
            "clone: backup cloned at exit ordinal {} as generation {generation}: pause {:.1} ms (state {:.1}, final pass {:.1} {}, confirmation {:.1}, memory re-registered {:.1}), clone {:.1} ms, pre-copy {} rounds {:?} pages ({} of written pages, catch-up {:.1} ms), final {} pages, {} bytes",
            report.identity.exit_ordinal,
            stats.pause.as_secs_f64() * 1000.0,
            stats.state.as_secs_f64() * 1000.0,
            stats.final_pass.as_secs_f64() * 1000.0,
            if stats.final_tracked {
                "of written pages"
            } else {
                "of all RAM"
            },
            stats.confirm.as_secs_f64() * 1000.0,
            restart.as_secs_f64() * 1000.0,
            requested.elapsed().as_secs_f64() * 1000.0,
            stats.rounds,
            stats.round_pages,
            stats.tracked_rounds,
            stats.catch_up.as_secs_f64() * 1000.0,
            stats.final_pages,
            stats.bytes
        );
        self.stats = Some(stats);
    }
}

/// Starts tracking the pages written from here on (the first round reads all of RAM
/// after this), or `None` if KVM cannot log them: every round then reads all of RAM.
fn start_tracking(vm: &mut Vm) -> Option<Arc<super::Tracking>> {
    let mut before = ftvm_machine::memory::DirtyPages::default();
    let started = vm
        .enable_dirty_log()
        .and_then(|()| vm.harvest_written_pages(&mut before));
    match started {
        Ok(()) => Some(Arc::default()),
        Err(err) => {
            tracing::warn!(
                "clone: cannot track written pages ({}): every round reads all of RAM",
                super::one_line(&err)
            );
            None
        }
    }
}

impl VcpuHook for CloneSource {
    fn between_exits(&mut self, vm: &mut Vm) {
        self.step(vm);
    }
}

/// Connections whose hello is being read at once; more are closed at once.
const MAX_HELLOS_READ: usize = 16;

/// The listener thread: every connection says hello, a new backup asking for a clone or
/// the backup of the last clone resuming its broken log connection. Each hello is read on
/// a thread of its own, so a connection that says nothing delays nobody else.
fn serve(listener: &TcpListener, slot: &Arc<Mutex<Option<(Socket, Hello)>>>, handoff: &HandOff) {
    let reading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for socket in listener.incoming() {
        let Ok(socket) = socket else { continue };
        let Ok(peer) = socket.peer_addr() else {
            continue;
        };
        use std::sync::atomic::Ordering;
        if reading.load(Ordering::Acquire) >= MAX_HELLOS_READ {
            tracing::warn!("clone: {peer}: too many connections saying nothing yet: refused");
            continue;
        }
        reading.fetch_add(1, Ordering::AcqRel);
        let (slot, handoff, counted) = (slot.clone(), handoff.clone(), reading.clone());
        let spawned = std::thread::Builder::new()
            .name("ftvmm-clone-hello".into())
            .spawn(move || {
                let secured = crate::transport::accept(socket, HELLO_PATIENCE);
                let hello = secured
                    .as_ref()
                    .map_err(Clone::clone)
                    .and_then(|socket| crate::channel::read_hello(socket, HELLO_PATIENCE));
                counted.fetch_sub(1, Ordering::AcqRel);
                match secured {
                    Ok(socket) => take_hello(socket, peer, hello, &slot, &handoff),
                    Err(err) => tracing::warn!("clone: {peer}: {err}: refused"),
                }
            });
        if spawned.is_err() {
            reading.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("clone: {peer}: cannot start a thread to read its hello");
        }
    }
}

/// What a connection said: a new backup waits in `slot` (one at a time), a resuming one
/// goes to the log channel of the last clone.
fn take_hello(
    socket: Socket,
    peer: std::net::SocketAddr,
    hello: Result<Hello, String>,
    slot: &Mutex<Option<(Socket, Hello)>>,
    handoff: &HandOff,
) {
    let hello = match hello {
        Ok(hello @ Hello::New { .. }) => hello,
        Ok(hello) => {
            let handoff = handoff
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            match handoff {
                Some(handoff) => {
                    let _ = handoff.send((socket, peer, hello));
                }
                None => tracing::warn!(
                    "clone: {peer} resumes a log stream while no clone was made: refused"
                ),
            }
            return;
        }
        Err(err) => {
            tracing::warn!("clone: {peer}: {err}: refused");
            return;
        }
    };
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if slot.is_some() {
        // One clone at a time; this one is closed at once.
        tracing::warn!("clone: a request from {peer} while another waits: refused");
        return;
    }
    tracing::warn!("clone: new backup connected from {peer}");
    *slot = Some((socket, hello));
}
