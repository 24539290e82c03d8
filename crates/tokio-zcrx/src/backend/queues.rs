//! Several receive queues of one interface (`Builder::interface_queues`): one io_uring driver
//! per queue, each a complete single-queue runtime of its own (ring, zcrx instance, area,
//! thread), and the dispatch that hands each connection to the driver of the queue its flow
//! arrives on.
//!
//! # Dispatch
//!
//! At start the `netdev` family (`QUEUE_GET` dump) says which NAPI instance serves each
//! receive queue of the interface, bound or not. At attach the kernel says which NAPI
//! instance the socket's last packet came through (`SO_INCOMING_NAPI_ID`):
//!
//! - the id of a bound queue: the socket goes to that queue's driver;
//! - the id of a queue not bound here, or an id no queue of the interface has (after one
//!   look again, at most once a second: the device may have been reconfigured), or no id
//!   for a loopback socket, or none within `Builder::napi_wait`: the socket is *unmatched*
//!   and is received in copy mode on Tokio's reactor ([`CopyRuntime`]).
//!
//! Unmatched sockets never go to another queue's binding: a RECV_ZC on a ring whose zcrx
//! instance does not own the net_iovs of an skb fails with `EFAULT` (`io_zcrx_recv_frag`).
//! For a queue without any binding the kernel would copy instead, into that ring's area; copy
//! mode is preferred all the same, because it costs no area chunks and it stays correct if
//! the flow is later steered onto a bound queue (a changed RSS table), where a ring that is
//! not that queue's would fail.
//!
//! # Hot path
//!
//! Nothing is shared between queues on the hot path: each driver has its own ring, area,
//! refill ring, statistics and stream table, exactly as a one-queue runtime. The group's
//! own state (the NAPI map, the unmatched counter) is touched once per connection, at
//! attach. The drivers share one event channel, whose sends are rare (rate-limited events).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::copy::CopyRuntime;
use super::uring::{UringHandle, UringStream};
use super::StreamSource;
use crate::config::{CopyConfig, DriverCpus, StreamOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, EventKind, QueueStats, Stats};
use crate::sys::lock;
use crate::sys::netdev::{incoming_napi_id, NetdevNetlink};
use crate::writer::ZcWriteHalf;

/// Capacity of the group's event channel (as a single queue's).
const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// At most one look at the device's NAPI ids per interval, however many sockets arrive
/// with an id the runtime does not know.
const NAPI_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// What the kernel says about the NAPI instance a socket's packets came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// This NAPI id.
    Napi(u32),
    /// None yet: no packet has come through a NAPI instance since the handshake.
    NotYet,
    /// None will: a loopback socket, or one the kernel cannot answer for.
    Never,
}

/// Where NAPI ids come from: the kernel (`netdev` netlink, `SO_INCOMING_NAPI_ID`), or a
/// synthetic device in host tests.
pub(crate) trait NapiSource: Send + Sync + std::fmt::Debug {
    /// Every receive queue of the interface, with its NAPI id where it has one.
    fn queues(&self) -> io::Result<Vec<(u32, Option<u32>)>>;
    /// The NAPI instance the packets of `socket` (its local and peer addresses given)
    /// came through.
    fn incoming(
        &self,
        socket: BorrowedFd<'_>,
        local: Option<SocketAddr>,
        peer: Option<SocketAddr>,
    ) -> Incoming;
}

/// The kernel's answers for interface `ifindex`.
#[derive(Debug)]
pub(crate) struct KernelNapi {
    pub(crate) ifindex: u32,
}

impl NapiSource for KernelNapi {
    fn queues(&self) -> io::Result<Vec<(u32, Option<u32>)>> {
        let queues = NetdevNetlink::open()?.rx_queues(self.ifindex)?;
        Ok(queues.iter().map(|q| (q.id, q.napi_id)).collect())
    }

    fn incoming(
        &self,
        socket: BorrowedFd<'_>,
        local: Option<SocketAddr>,
        _peer: Option<SocketAddr>,
    ) -> Incoming {
        match incoming_napi_id(socket) {
            Ok(Some(id)) => Incoming::Napi(id),
            // Loopback delivers from the sender's context: no NAPI id, ever.
            Ok(None) if local.is_some_and(|a| a.ip().is_loopback()) => Incoming::Never,
            Ok(None) => Incoming::NotYet,
            Err(_) => Incoming::Never,
        }
    }
}

/// Where a NAPI id leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// `queues[index]`.
    Bound(usize),
    /// Receive queue `queue` of the interface, not bound here.
    Unbound(u32),
}

/// Why a connection is unmatched (logged; its queue goes into the event).
#[derive(Debug, Clone, Copy)]
enum Unmatched {
    UnboundQueue(u32),
    UnknownNapi(u32),
    NoNapiYet,
    NoNapi,
    DriverStopped(u32),
}

impl Unmatched {
    fn queue(self) -> Option<u32> {
        match self {
            Unmatched::UnboundQueue(queue) | Unmatched::DriverStopped(queue) => Some(queue),
            _ => None,
        }
    }
}

impl std::fmt::Display for Unmatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unmatched::UnboundQueue(queue) => {
                write!(f, "it arrives on rx queue {queue}, which is not bound")
            }
            Unmatched::UnknownNapi(id) => {
                write!(f, "NAPI id {id} belongs to no rx queue of the interface")
            }
            Unmatched::NoNapiYet => {
                f.write_str("no packet came through a NAPI instance within the NAPI wait")
            }
            Unmatched::NoNapi => f.write_str("loopback (no NAPI instance)"),
            Unmatched::DriverStopped(queue) => {
                write!(f, "the driver of rx queue {queue} has stopped")
            }
        }
    }
}

/// The decision for one socket.
#[derive(Debug, Clone, Copy)]
enum Decision {
    Bound(usize),
    Unmatched(Unmatched),
    NotYet,
}

/// A bound queue.
#[derive(Debug)]
pub(crate) struct BoundQueue {
    pub(crate) queue: u32,
    pub(crate) handle: UringHandle,
}

/// The NAPI id -> queue map, and when it was last read from the kernel.
#[derive(Debug)]
struct NapiMap {
    by_id: HashMap<u32, Place>,
    read_at: Instant,
}

/// Several queues of one interface, each with its driver; connections dispatched by NAPI id.
#[derive(Debug)]
pub(crate) struct QueueGroup {
    interface: String,
    queues: Vec<BoundQueue>,
    refused: Vec<(u32, String)>,
    /// Receives the unmatched connections.
    copy: Arc<CopyRuntime>,
    napi: Box<dyn NapiSource>,
    map: Mutex<NapiMap>,
    napi_wait: Duration,
    unmatched: AtomicU64,
    /// Streams handed to another queue's driver (`Stats::streams_moved`).
    moved: AtomicU64,
    /// The group's sender (unmatched-connection events); taken at shutdown.
    events: Mutex<Option<broadcast::Sender<Event>>>,
    stopped: CancellationToken,
    closed: AtomicBool,
}

/// What a group is started with.
#[derive(Debug, Clone)]
pub(crate) struct GroupSpec {
    /// The interface's name (for messages).
    pub(crate) interface: String,
    /// The queues to bind, ascending.
    pub(crate) queues: Vec<u32>,
    /// Every queue must bind (mode nic), or those that can (auto).
    pub(crate) required: bool,
    pub(crate) napi_wait: Duration,
    pub(crate) driver_cpus: DriverCpus,
    pub(crate) copy: CopyConfig,
}

/// How one queue of a group is started: its index, its position in the set, the CPUs for
/// its driver (`None`: anywhere), and the group's event channel.
pub(crate) type QueueStarter<'a> =
    dyn FnMut(u32, Option<Vec<usize>>, broadcast::Sender<Event>) -> Result<UringHandle> + 'a;

impl QueueGroup {
    /// Binds every queue of `spec` through `start_queue`; see [`GroupSpec::required`] for
    /// what a queue that cannot be bound does.
    pub(crate) fn start(
        spec: GroupSpec,
        napi: Box<dyn NapiSource>,
        start_queue: &mut QueueStarter<'_>,
    ) -> Result<QueueGroup> {
        let events = broadcast::channel(EVENT_CHANNEL_CAPACITY).0;
        // Dispatch needs the queues' NAPI ids: without them every connection would be
        // copied, which is no multi-queue runtime.
        let napi_ids = napi.queues().map_err(|error| {
            Error::new(
                ErrorKind::Kernel,
                format!(
                    "cannot read the NAPI ids of {}'s rx queues (netdev netlink, QUEUE_GET), \
                     which dispatching connections to several queues needs: {error}; bind one \
                     queue with .interface(NAME, QUEUE) instead",
                    spec.interface
                ),
            )
            .with_source(error)
        })?;
        let napi_of = |queue: u32| {
            napi_ids
                .iter()
                .find(|(q, _)| *q == queue)
                .and_then(|(_, id)| *id)
        };
        let mut queues: Vec<BoundQueue> = Vec::new();
        let mut refused = Vec::new();
        for (position, &queue) in spec.queues.iter().enumerate() {
            let cpus = placement(&spec.driver_cpus, position, napi_of(queue));
            match start_queue(queue, cpus, events.clone()) {
                Ok(handle) => {
                    let napi_id = napi_of(queue).unwrap_or(0);
                    handle.shared.napi_id.store(napi_id, Ordering::Relaxed);
                    queues.push(BoundQueue { queue, handle });
                }
                Err(error) if spec.required || is_callers_to_fix(&error) => {
                    // The queues bound so far are let go as their handles drop.
                    return Err(Error::new(
                        error.kind(),
                        format!(
                            "cannot bind rx queue {queue} of {} ({} of the {} queues asked \
                             for were bound before it): {error}",
                            spec.interface,
                            queues.len(),
                            spec.queues.len()
                        ),
                    ));
                }
                Err(error) => {
                    tracing::warn!(queue, %error, "tokio-zcrx: rx queue not bound");
                    refused.push((queue, error.to_string()));
                }
            }
        }
        if queues.is_empty() {
            let reasons: Vec<String> = refused
                .iter()
                .map(|(queue, why)| format!("queue {queue}: {why}"))
                .collect();
            return Err(Error::new(
                ErrorKind::Kernel,
                format!(
                    "no rx queue of {} could be bound ({})",
                    spec.interface,
                    reasons.join("; ")
                ),
            ));
        }
        let copy = CopyRuntime::with_events(&spec.copy, events.clone()).map_err(|e| {
            Error::new(
                ErrorKind::OutOfMemory,
                "cannot allocate the copy-mode buffer pool for connections on unbound queues",
            )
            .with_source(e)
        })?;
        let by_id = map_of(&napi_ids, &queues);
        Ok(QueueGroup {
            interface: spec.interface,
            queues,
            refused,
            copy: Arc::new(copy),
            napi,
            map: Mutex::new(NapiMap {
                by_id,
                read_at: Instant::now(),
            }),
            napi_wait: spec.napi_wait,
            unmatched: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            events: Mutex::new(Some(events)),
            stopped: CancellationToken::new(),
            closed: AtomicBool::new(false),
        })
    }

    pub(crate) fn bound(&self) -> Vec<u32> {
        self.queues.iter().map(|q| q.queue).collect()
    }

    pub(crate) fn refused(&self) -> &[(u32, String)] {
        &self.refused
    }

    /// What the kernel says of `socket`, and so where it goes.
    fn decide(&self, socket: &TcpStream) -> Decision {
        self.decide_fd(
            socket.as_fd(),
            socket.local_addr().ok(),
            socket.peer_addr().ok(),
        )
    }

    fn decide_fd(
        &self,
        socket: BorrowedFd<'_>,
        local: Option<SocketAddr>,
        peer: Option<SocketAddr>,
    ) -> Decision {
        let id = match self.napi.incoming(socket, local, peer) {
            Incoming::Napi(id) => id,
            Incoming::NotYet => return Decision::NotYet,
            Incoming::Never => return Decision::Unmatched(Unmatched::NoNapi),
        };
        let place = {
            let mut map = lock(&self.map);
            match map.by_id.get(&id) {
                Some(place) => Some(*place),
                None if map.read_at.elapsed() >= NAPI_REFRESH_INTERVAL => {
                    // A NAPI id never seen: the device may have been reconfigured (channels
                    // changed, down and up). Look again, at most once per interval.
                    map.read_at = Instant::now();
                    match self.napi.queues() {
                        Ok(ids) => {
                            tracing::debug!(napi_id = id, "tokio-zcrx: NAPI ids read again");
                            for bound in &self.queues {
                                let napi = ids
                                    .iter()
                                    .find(|(q, _)| *q == bound.queue)
                                    .and_then(|(_, id)| *id)
                                    .unwrap_or(0);
                                bound.handle.shared.napi_id.store(napi, Ordering::Relaxed);
                            }
                            map.by_id = map_of(&ids, &self.queues);
                        }
                        Err(error) => {
                            tracing::debug!(%error, "tokio-zcrx: cannot read the NAPI ids again")
                        }
                    }
                    map.by_id.get(&id).copied()
                }
                None => None,
            }
        };
        match place {
            Some(Place::Bound(index)) => {
                let bound = &self.queues[index];
                if bound.handle.check_running().is_err() {
                    Decision::Unmatched(Unmatched::DriverStopped(bound.queue))
                } else {
                    Decision::Bound(index)
                }
            }
            Some(Place::Unbound(queue)) => Decision::Unmatched(Unmatched::UnboundQueue(queue)),
            None => Decision::Unmatched(Unmatched::UnknownNapi(id)),
        }
    }

    /// Attaches `socket` where the kernel says now; a socket without a NAPI id yet is
    /// unmatched (this cannot wait: see [`QueueGroup::attach_async`]).
    pub(crate) fn attach(
        self: &Arc<Self>,
        socket: TcpStream,
        options: StreamOptions,
    ) -> io::Result<(StreamSource, ZcWriteHalf)> {
        let decision = match self.decide(&socket) {
            Decision::NotYet => Decision::Unmatched(Unmatched::NoNapiYet),
            decision => decision,
        };
        self.attach_to(decision, socket, options)
    }

    /// Attaches `socket`, first waiting up to the NAPI wait for its first packet if the
    /// kernel has not recorded its NAPI id yet.
    pub(crate) async fn attach_async(
        self: &Arc<Self>,
        socket: TcpStream,
        options: StreamOptions,
    ) -> io::Result<(StreamSource, ZcWriteHalf)> {
        let mut decision = self.decide(&socket);
        if matches!(decision, Decision::NotYet) && !self.napi_wait.is_zero() {
            let waited = Instant::now();
            // `peek`, not `readable`: Tokio may report a fresh socket readable before any
            // byte is there; a peek waits for one (or the end) and takes nothing.
            let mut byte = [0u8; 1];
            tokio::select! {
                _ = socket.peek(&mut byte) => {}
                () = deadline::sleep(self.napi_wait) => {}
            }
            decision = self.decide(&socket);
            tracing::trace!(
                waited_us = waited.elapsed().as_micros() as u64,
                ?decision,
                "tokio-zcrx: waited for a socket's first packet"
            );
        }
        if matches!(decision, Decision::NotYet) {
            decision = Decision::Unmatched(Unmatched::NoNapiYet);
        }
        self.attach_to(decision, socket, options)
    }

    fn attach_to(
        self: &Arc<Self>,
        decision: Decision,
        socket: TcpStream,
        options: StreamOptions,
    ) -> io::Result<(StreamSource, ZcWriteHalf)> {
        match decision {
            Decision::Bound(index) => {
                let (stream, writer) = self.queues[index].handle.attach(socket, options)?;
                let hand_over = HandOver {
                    group: Arc::downgrade(self),
                    queue: index,
                    options,
                    tried: Vec::new(),
                };
                Ok((
                    StreamSource::Uring(stream, Some(Box::new(hand_over))),
                    writer,
                ))
            }
            Decision::Unmatched(why) => self.attach_unmatched(why, socket, options),
            Decision::NotYet => self.attach_unmatched(Unmatched::NoNapiYet, socket, options),
        }
    }

    fn attach_unmatched(
        &self,
        why: Unmatched,
        socket: TcpStream,
        options: StreamOptions,
    ) -> io::Result<(StreamSource, ZcWriteHalf)> {
        self.copy.check_running()?;
        tracing::debug!(
            peer = ?socket.peer_addr().ok(),
            "tokio-zcrx: connection received in copy mode: {why}"
        );
        // A listener prepared for the bound queues bounds its connections' windows to a
        // few chunks until attach; this one's data is in ordinary pages: lift it.
        const LARGEST_TCP_WINDOW: u32 = 65535 << 14;
        let _ = crate::sys::set_tcp_window_clamp(socket.as_fd(), LARGEST_TCP_WINDOW);
        self.unmatched.fetch_add(1, Ordering::Relaxed);
        let (stream, writer) = self.copy.attach(socket, options);
        let stats = self.stats();
        if let Some(events) = &*lock(&self.events) {
            let _ = events.send(Event {
                kind: EventKind::UnmatchedConnection,
                stats,
                queue: why.queue(),
            });
        }
        Ok((StreamSource::Copy(stream), writer))
    }

    /// Bounds the TCP window of a listener's connections as the bound queues' drivers want
    /// (they share one configuration and interface, so the first one's answer is theirs).
    pub(crate) fn prepare_listener(&self, listener: BorrowedFd<'_>) -> io::Result<()> {
        self.queues[0].handle.prepare_listener(listener)
    }

    pub(crate) fn check_running(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::RuntimeGone,
                "the tokio-zcrx runtime has been shut down",
            ));
        }
        Ok(())
    }

    pub(crate) fn stopped_token(&self) -> CancellationToken {
        self.stopped.clone()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        match &*lock(&self.events) {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Every bound queue's statistics, in queue order.
    pub(crate) fn queue_stats(&self) -> Vec<QueueStats> {
        self.queues
            .iter()
            .filter_map(|bound| bound.handle.queue_stats())
            .collect()
    }

    /// The copy path's statistics (the unmatched connections').
    pub(crate) fn unmatched_stats(&self) -> Stats {
        let mut stats = self.copy.stats();
        stats.unmatched_connections = self.unmatched.load(Ordering::Relaxed);
        stats.streams_moved = self.moved.load(Ordering::Relaxed);
        stats
    }

    /// The driver to hand a stream to whose receive on `queues[from]` failed with `EFAULT`
    /// (net_iovs of another queue: its flow moved), having failed on `tried` already since
    /// it last received: the queue of the NAPI instance its last packet came through, else
    /// each other bound queue in turn (the buffers at the head of its socket are one bound
    /// queue's, and only that queue's ring can receive them).
    fn next_driver(
        &self,
        from: usize,
        socket: &std::net::TcpStream,
        tried: &[usize],
    ) -> Option<usize> {
        let usable = |index: usize| {
            !tried.contains(&index) && self.queues[index].handle.check_running().is_ok()
        };
        let decision = self.decide_fd(
            socket.as_fd(),
            socket.local_addr().ok(),
            socket.peer_addr().ok(),
        );
        if let Decision::Bound(index) = decision {
            if usable(index) {
                return Some(index);
            }
        }
        let count = self.queues.len();
        (1..count)
            .map(|step| (from + step) % count)
            .find(|&index| usable(index))
    }

    /// The total: every queue's, and the copy path's.
    pub(crate) fn stats(&self) -> Stats {
        let mut total = self.unmatched_stats();
        for bound in &self.queues {
            total.merge(&bound.handle.stats());
        }
        total
    }

    pub(crate) fn description(&self) -> String {
        let bound: Vec<String> = self.queues.iter().map(|q| q.queue.to_string()).collect();
        let mut text = format!(
            "{} rx queues {} (a driver each; connections on other queues in copy mode)",
            self.interface,
            bound.join(", ")
        );
        for (queue, why) in &self.refused {
            text.push_str(&format!("; queue {queue} not bound: {why}"));
        }
        text
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject_driver_panic(&self) {
        self.queues[0].handle.inject_panic();
    }

    /// Stops every driver (together) and the copy path.
    pub(crate) async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        self.copy.shut_down();
        lock(&self.events).take();
        let waits: Vec<_> = self
            .queues
            .iter()
            .filter_map(|q| q.handle.begin_shutdown())
            .collect();
        for wait in waits {
            let _ = wait.await;
        }
        self.stopped.cancel();
    }
}

/// A bounded wait that needs no Tokio timer (the runtime may be built without
/// `enable_time`): one thread for the whole process wakes each waiter at its deadline.
/// Waits are rare (a connection whose NAPI id is not known at accept) and short.
mod deadline {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    use crate::sys::lock;

    struct Timer {
        waiting: Mutex<Vec<(Instant, Waker)>>,
        changed: Condvar,
    }

    fn timer() -> &'static Timer {
        static TIMER: OnceLock<&'static Timer> = OnceLock::new();
        TIMER.get_or_init(|| {
            let timer: &'static Timer = Box::leak(Box::new(Timer {
                waiting: Mutex::new(Vec::new()),
                changed: Condvar::new(),
            }));
            let spawned = std::thread::Builder::new()
                .name("tokio-zcrx-timer".into())
                .spawn(move || timer.run());
            if let Err(error) = spawned {
                // Waits then end at the next readiness only; logged once.
                tracing::warn!(%error, "tokio-zcrx: cannot start the NAPI wait's timer thread");
            }
            timer
        })
    }

    impl Timer {
        fn run(&self) {
            let mut waiting = lock(&self.waiting);
            loop {
                let now = Instant::now();
                let mut due = Vec::new();
                waiting.retain(|(at, waker)| {
                    if *at <= now {
                        due.push(waker.clone());
                    }
                    *at > now
                });
                if !due.is_empty() {
                    drop(waiting);
                    due.into_iter().for_each(Waker::wake);
                    waiting = lock(&self.waiting);
                    continue;
                }
                let next = waiting.iter().map(|(at, _)| *at).min();
                waiting = match next {
                    Some(at) => {
                        self.changed
                            .wait_timeout(waiting, at.saturating_duration_since(now))
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    }
                    None => self
                        .changed
                        .wait(waiting)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                };
            }
        }
    }

    /// Completes `wait` from now.
    pub(super) fn sleep(wait: Duration) -> Sleep {
        Sleep {
            at: Instant::now() + wait,
            registered: false,
        }
    }

    pub(super) struct Sleep {
        at: Instant,
        registered: bool,
    }

    impl Future for Sleep {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            if !self.registered {
                // Registered once: the waker of a task does not change while it waits in
                // one select, and a spurious wake-up costs one poll.
                self.registered = true;
                let timer = timer();
                lock(&timer.waiting).push((self.at, cx.waker().clone()));
                timer.changed.notify_one();
            }
            Poll::Pending
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn sleeps_end_at_their_deadlines_without_a_tokio_timer() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let started = std::time::Instant::now();
            runtime.block_on(async {
                let long = super::sleep(std::time::Duration::from_millis(60));
                let short = super::sleep(std::time::Duration::from_millis(20));
                short.await;
                assert!(started.elapsed() >= std::time::Duration::from_millis(20));
                long.await;
            });
            let took = started.elapsed();
            assert!(took >= std::time::Duration::from_millis(60), "{took:?}");
            assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        }
    }
}

/// What a stream of a bound queue needs to be handed to another queue's driver when its flow
/// moves ([`StreamSource::Uring`]).
#[derive(Debug)]
pub(crate) struct HandOver {
    group: std::sync::Weak<QueueGroup>,
    /// The index (in the group) of the driver receiving it now.
    queue: usize,
    options: StreamOptions,
    /// Drivers whose ring refused it since it last received a buffer.
    tried: Vec<usize>,
}

impl HandOver {
    /// The stream received a buffer: the drivers refused before are worth trying again at
    /// its next move.
    #[inline]
    pub(crate) fn received(&mut self) {
        if !self.tried.is_empty() {
            self.tried.clear();
        }
    }

    /// Hands `socket`, whose receive failed with `EFAULT` on the current driver, to the
    /// driver that owns its buffers now; `EFAULT` if none is left to try (or the runtime is
    /// gone).
    pub(crate) fn hand_over(
        &mut self,
        socket: Arc<std::net::TcpStream>,
    ) -> io::Result<UringStream> {
        let efault = || io::Error::from_raw_os_error(libc::EFAULT);
        let Some(group) = self.group.upgrade() else {
            return Err(efault());
        };
        group.check_running()?;
        self.tried.push(self.queue);
        let Some(next) = group.next_driver(self.queue, &socket, &self.tried) else {
            let tried: Vec<u32> = self.tried.iter().map(|&i| group.queues[i].queue).collect();
            tracing::warn!(
                ?tried,
                "tokio-zcrx: no bound queue's ring can receive a stream whose flow moved \
                 (EFAULT): it ends"
            );
            return Err(efault());
        };
        tracing::info!(
            from = group.queues[self.queue].queue,
            to = group.queues[next].queue,
            "tokio-zcrx: a stream's flow moved to another rx queue; its driver takes it over"
        );
        let stream = group.queues[next]
            .handle
            .attach_socket(socket, self.options)?;
        group.moved.fetch_add(1, Ordering::Relaxed);
        self.queue = next;
        Ok(stream)
    }
}

/// NAPI id -> place, for every queue of the interface that has an id.
fn map_of(ids: &[(u32, Option<u32>)], bound: &[BoundQueue]) -> HashMap<u32, Place> {
    ids.iter()
        .filter_map(|(queue, napi)| {
            let napi = (*napi)?;
            let place = match bound.iter().position(|b| b.queue == *queue) {
                Some(index) => Place::Bound(index),
                None => Place::Unbound(*queue),
            };
            Some((napi, place))
        })
        .collect()
}

/// The CPUs for the driver of the queue at `position` in the set, whose NAPI id is
/// `napi_id`, under `policy`.
pub(crate) fn placement(
    policy: &DriverCpus,
    position: usize,
    napi_id: Option<u32>,
) -> Option<Vec<usize>> {
    match policy {
        DriverCpus::Anywhere => None,
        DriverCpus::Cpus(cpus) => Some(vec![cpus[position % cpus.len()]]),
        DriverCpus::NearInterrupt => {
            let irq = NetdevNetlink::open().ok()?.napi(napi_id?).ok()?.irq?;
            crate::sys::irq_cpus(irq)
        }
    }
}

/// Refusals no other queue or mode fixes (as `select::is_callers_to_fix`).
fn is_callers_to_fix(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidConfig | ErrorKind::InterfaceNotFound | ErrorKind::TooManyOpenFiles
    )
}
