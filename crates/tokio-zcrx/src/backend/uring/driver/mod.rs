//! The driver thread: owns the ring, turns completions into buffers on streams, returns
//! what it must, re-arms events, and reacts to commands from handles.
//!
//! - here: the thread's entry ([`run`], [`drive`]), its loop, commands from handles,
//!   shutdown, and carrying out what a stream's receive state machine
//!   ([`zcrx_core::receive`]) decides;
//! - [`streams`]: the stream table;
//! - [`completions`]: reaping the CQ and handling each completion;
//! - [`returns`]: buffer returns, refill flushes, and receives waiting for the area;
//! - [`budgets`]: per-stream budgets (pausing and resuming streams) and memory pressure;
//! - [`events`]: zcrx kernel events in, their re-arming, and the public events out;
//! - [`growth`]: adding kernel areas under `Builder::area_growth` (Linux 7.3+).

mod budgets;
mod completions;
mod events;
mod growth;
mod returns;
mod sends;
mod streams;

pub(crate) use sends::FixedBuffer;
use sends::Sends;

use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use zcrx_core::budget::BudgetPolicy;
use zcrx_core::completion::{AreaLayout, AreaSet, RawCompletion};
use zcrx_core::events::EventRearm;
use zcrx_core::receive::{Action, Finish, StreamReceive};
use zcrx_core::user_data::{StreamId, UserData, UserDataKind};

use super::area::{Area, BufferRefs};
use super::instance::{self, Instance};
use super::ring::{Capabilities, CompletionRing, UringRing};
use super::{lock, Command, DriverShared, FAILED, STOPPING};
use super::{StreamEnd, StreamShared};
use crate::config::StreamOptions;
use crate::config::{GrowthPlan, UringConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
pub(crate) use growth::Growth;
#[cfg(test)]
pub(crate) use growth::PAGE_POOL_RESERVE_CHUNKS;
use streams::{StreamEntry, Streams};

/// The eventfd poll's `user_data` payload.
const WAKE_EVENTFD: u64 = 1;

/// How long shutdown waits for cancelled receives to confirm before closing the ring anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A receive that ran out of area is retried when buffers come back, or after this long in
/// any case: the returns may all have happened before the driver saw the exhaustion, and
/// chunks held in socket queues free up without any return.
const EXHAUSTION_RETRY: Duration = Duration::from_millis(5);

/// Entry point of the driver thread.
pub(super) fn run(config: UringConfig, shared: Arc<DriverShared>, ready: mpsc::Sender<Result<()>>) {
    if let Some(cpus) = &config.cpus {
        // Before registering: the ring and the kernel's structures for it are allocated
        // from this CPU's node.
        match crate::sys::pin_current_thread(cpus) {
            Ok(()) => tracing::debug!(?cpus, "tokio-zcrx: driver thread placed"),
            Err(error) => tracing::warn!(
                ?cpus,
                %error,
                "tokio-zcrx: cannot place the driver thread on its CPUs; it runs where the \
                 scheduler puts it"
            ),
        }
    }
    let instance = match instance::register(&config) {
        Ok(instance) => instance,
        Err(e) => {
            shared.state.store(FAILED, Ordering::Release);
            *lock(&shared.failure) = Some(e.to_string());
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Some(refused) = &instance.growth_refused {
        tracing::warn!("tokio-zcrx: {refused}; the area stays at its initial size");
        lock(&shared.unavailable).push(refused.clone());
    }
    let driver = match Driver::new(instance, &config, Arc::clone(&shared)) {
        Ok(driver) => driver,
        Err(e) => {
            shared.state.store(FAILED, Ordering::Release);
            *lock(&shared.failure) = Some(e.to_string());
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drive(driver, shared);
}

/// Runs a driver until shutdown or failure, then ends every stream and releases waiters.
pub(crate) fn drive<R: CompletionRing>(mut driver: Driver<R>, shared: Arc<DriverShared>) {
    let outcome = catch_unwind(AssertUnwindSafe(|| driver.run()));
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e}")),
        Err(panic) => Some(
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into()),
        ),
    };
    let final_state = match &failure {
        Some(reason) => {
            *lock(&shared.failure) = Some(reason.clone());
            FAILED
        }
        None => STOPPING,
    };
    driver.end_all_streams(failure.as_deref());
    driver.sends.abandon(match &failure {
        Some(_) => "the tokio-zcrx driver thread failed",
        None => "the tokio-zcrx runtime was shut down",
    });
    // Fail commands that raced with the end, and free whatever they carried.
    for command in shared.close_queue(final_state) {
        match command {
            Command::Attach { shared: stream, .. } => {
                stream.finish(StreamEnd::runtime("the tokio-zcrx runtime has stopped"))
            }
            Command::Send { conn, .. } => {
                conn.fail(io::Error::other("the tokio-zcrx runtime has stopped"), 1);
            }
            Command::Shutdown(Some(waiter)) => driver.shutdown_waiters.push(waiter),
            _ => {}
        }
    }
    // No event comes any more: subscribers see the channel close once the driver's sender
    // goes with it.
    lock(&shared.events).take();
    let waiters = std::mem::take(&mut driver.shutdown_waiters);
    // Closing the ring destroys the kernel's zcrx instance; the area stays mapped while
    // buffers refer to it.
    driver.close_ring();
    shared.stopped.cancel();
    for waiter in waiters {
        let _ = waiter.send(());
    }
}

pub(crate) struct Driver<R: CompletionRing> {
    ring: R,
    area: Arc<Area>,
    buffer_refs: BufferRefs,
    /// Every kernel area's layout, for the completion decoder.
    layout: AreaSet,
    /// `Builder::area_growth`, where the kernel can add areas.
    growth: Option<Growth>,
    shared: Arc<DriverShared>,
    nodev: bool,
    caps: Capabilities,
    events: EventRearm,
    /// The driver's sender of the event channel (dropped with the driver).
    events_tx: tokio::sync::broadcast::Sender<Event>,
    streams: Streams,
    /// A receive ended with `ENOSPC` in this reap: resubmit those once the CQ is drained.
    cq_overflowed: bool,
    /// Raw completions copied out of the CQ.
    reaped: Vec<RawCompletion>,
    /// `refill.stats().pushed` when a stream last ran out of area, and when.
    returns_at_exhaustion: u64,
    exhausted_at: Option<Instant>,
    waiting_for_buffers: usize,
    /// Next look at the overflow list, and the current back-off, while returns wait there.
    overflow_recheck: Option<(Instant, Duration)>,
    /// When the last AreaExhausted event went out.
    last_exhausted_event: Option<Instant>,
    /// Transient `io_uring_enter` errors in a row.
    transient_errors: u32,
    stopping: Option<Instant>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    /// How streams' budgets are derived from the area (see [`budgets`]).
    budget_policy: BudgetPolicy,
    /// Every stream's budget if fixed (`Builder::stream_budget`).
    stream_budget: Option<u64>,
    /// The bytes a chunk is expected to carry until a stream's own requests show it
    /// (`zcrx_core::receive::Holding::fill`): a quarter of a segment's payload on a NIC,
    /// else of a chunk.
    chunk_fill: u64,
    /// NIC mode: the most payload a segment of the interface carries, for the TCP windows
    /// of budgeted streams (`budgets.rs`); `None` in NODEV mode or if the MTU is unknown.
    segment_payload: Option<u32>,
    /// NIC mode: streams that received a receive buffer's worth this reap, and the chunks
    /// of all streams' receive buffers (`budgets.rs`).
    rcvbuf_growth: Vec<u32>,
    rcvbuf_total: u64,
    /// NIC mode: whether receive buffers may pass `net.core.rmem_max` (`budgets.rs`).
    rcvbuf_limit: budgets::ReceiveBufferLimit,
    /// Waiting for paused streams to resume before sleeping (`Driver::linger`).
    linger: Linger,
    /// Rate limits and hysteresis of the pressure events.
    pressure: budgets::PressureEvents,
    /// Write halves' queued sends (`sends.rs`).
    sends: Sends,
    /// `UringConfig::hand_over_moved`.
    hand_over_moved: bool,
}

impl Driver<UringRing> {
    fn new(
        instance: Instance,
        config: &UringConfig,
        shared: Arc<DriverShared>,
    ) -> Result<Driver<UringRing>> {
        let Instance {
            ring,
            fork_guard,
            area,
            region,
            layout: shared_layout,
            zcrx_id,
            nodev,
            caps,
            description,
            segment_payload,
            growth,
            growth_refused: _,
        } = instance;
        let area = Area::new(
            area,
            region,
            &shared_layout,
            Arc::clone(&shared),
            growth.map(|plan| (plan.max_areas, plan.step as u64)),
        )
        .map_err(|e| {
            Error::new(ErrorKind::Kernel, "the kernel's refill ring is unusable").with_source(e)
        })?;
        let layout = AreaLayout::new(area.len() as u64, area.chunk_size, shared_layout.area_token)
            .map_err(|e| Error::new(ErrorKind::Kernel, format!("unusable area layout: {e}")))?;
        *lock(&shared.description) = description;
        let fixed = register_area_buffer(&ring, &area, &shared);
        Driver::with_ring(
            UringRing::new(ring, fork_guard, zcrx_id),
            Arc::new(area),
            layout,
            nodev,
            caps,
            segment_payload,
            fixed,
            growth,
            config,
            shared,
        )
    }
}

impl<R: CompletionRing> Driver<R> {
    /// A driver over any completion source (the real ring, or a synthetic one).
    /// `segment_payload`: the most payload a segment of the bound interface carries (see
    /// [`Instance`]), if known.
    /// `fixed`: the area as registered for zero-copy sends, if it is.
    #[allow(clippy::too_many_arguments)] // each is a separate fact about the instance
    pub(crate) fn with_ring(
        ring: R,
        area: Arc<Area>,
        layout: AreaLayout,
        nodev: bool,
        caps: Capabilities,
        segment_payload: Option<u32>,
        fixed: Option<FixedBuffer>,
        growth: Option<GrowthPlan>,
        config: &UringConfig,
        shared: Arc<DriverShared>,
    ) -> Result<Driver<R>> {
        debug_assert!(
            growth.is_none() || caps.add_area,
            "growth needs ZCRX_CTRL_ADD_AREA"
        );
        debug_assert!(growth.is_none_or(|plan| plan.max_areas <= area.max_areas()));
        *lock(&shared.area) = Some(Arc::downgrade(&area));
        let events_tx = lock(&shared.events)
            .clone()
            .expect("the event channel lives until the driver exits");
        let budget_policy = BudgetPolicy::new(area.len() as u64, u64::from(area.chunk_size));
        // A stream's first request errs small (a quarter of a segment or chunk): its
        // segments are unknown, and one more request costs less than chunks taken beyond
        // its budget by segments smaller than expected (see `zcrx_core::receive`).
        let full = segment_payload.map_or(area.chunk_size, |payload| payload.min(area.chunk_size));
        let chunk_fill = (full / 4).max(1);
        // What one segment puts in a chunk at most.
        let segment_payload = segment_payload
            .filter(|_| !nodev)
            .map(|payload| payload.min(area.chunk_size));
        if let (Some(payload), false) = (segment_payload, config.stream_budget == Some(u64::MAX)) {
            // The largest budget a stream gets: the runtime's fixed one, or a stream's
            // derived budget alone on the largest area the growth policy allows.
            let capacity = growth.map_or(area.len(), |plan| plan.maximum.max(area.len()));
            let largest_budget = config.stream_budget.unwrap_or_else(|| {
                BudgetPolicy::new(capacity as u64, u64::from(area.chunk_size))
                    .budget(1)
                    .high
            });
            let window =
                budgets::listener_window(largest_budget, u64::from(area.chunk_size), payload);
            shared.listener_window.store(window, Ordering::Relaxed);
        }
        let sends = Sends::new(fixed, true, Arc::clone(&shared.send_counters));
        let mut driver = Driver {
            ring,
            buffer_refs: BufferRefs::new(&area),
            area,
            layout: AreaSet::new(layout),
            growth: growth.map(|plan| Growth::new(plan, config.custom_chunk)),
            shared,
            nodev,
            caps,
            events: EventRearm::new(config.event_rearm_interval),
            events_tx,
            streams: Streams::default(),
            cq_overflowed: false,
            reaped: Vec::with_capacity(config.cq_entries as usize),
            returns_at_exhaustion: 0,
            exhausted_at: None,
            waiting_for_buffers: 0,
            overflow_recheck: None,
            last_exhausted_event: None,
            transient_errors: 0,
            stopping: None,
            shutdown_waiters: Vec::new(),
            budget_policy,
            stream_budget: config.stream_budget,
            chunk_fill: u64::from(chunk_fill),
            segment_payload,
            rcvbuf_growth: Vec::new(),
            rcvbuf_total: 0,
            rcvbuf_limit: budgets::ReceiveBufferLimit::default(),
            linger: Linger {
                limit: config.linger,
                returns_at_pause: 0,
                misses: 0,
                skip: 0,
            },
            pressure: budgets::PressureEvents::default(),
            sends,
            hand_over_moved: config.hand_over_moved,
        };
        driver.arm_eventfd().map_err(|e| {
            Error::new(ErrorKind::Kernel, "cannot poll the driver's eventfd").with_source(e)
        })?;
        Ok(driver)
    }

    pub(crate) fn run(&mut self) -> io::Result<()> {
        loop {
            self.take_commands()?;
            if let Some(since) = self.stopping {
                // Returns seen so far: the wait below sleeps until the next one.
                self.returns_at_exhaustion = self.returns_seen();
                // Sends in the kernel finish first (their notifications give the buffers
                // back); bounded by the same grace.
                let settled = self.live_requests() == 0
                    && !self.sends.requests_in_kernel()
                    && !self.teardown_would_expose_buffers();
                if settled || since.elapsed() > SHUTDOWN_GRACE {
                    return Ok(());
                }
            }
            self.return_buffers();
            self.resume_waiting_streams()?;
            self.resume_paused_streams()?;
            self.rearm_events();
            // Requests submitted now may take their room before the next reap.
            self.grow_ahead_of_the_nic();
            self.submit_and_wait()?;
            self.reap()?;
        }
    }

    /// Whether closing the ring now could let the NIC write into a buffer someone holds:
    /// on 6.15-6.18 NIC queues, teardown hands user-held chunks back to the page pool of the
    /// still running queue before it stops it (later kernels stop the queue first, and NODEV
    /// has no page pool).
    fn teardown_would_expose_buffers(&self) -> bool {
        !self.nodev
            && !self.caps.teardown_stops_queue_first
            && self.area.stats().buffers_outstanding > 0
    }

    /// Closes the ring, or, where that would expose held buffers (see
    /// [`Self::teardown_would_expose_buffers`]), leaves it to the area, which closes it
    /// when the last buffer is dropped: the queue stays bound until then, and no buffer is
    /// ever read while the NIC may write into it.
    fn close_ring(self) {
        let expose = self.teardown_would_expose_buffers();
        let Driver {
            ring,
            area,
            buffer_refs,
            ..
        } = self;
        if expose {
            tracing::warn!(
                "tokio-zcrx: buffers are still held at shutdown on a kernel older than 6.19, \
                 which would hand them back to the running NIC queue; the queue stays bound \
                 until the last buffer is dropped"
            );
            area.close_with_last_buffer(Box::new(ring));
        } else {
            drop(ring);
        }
        drop(buffer_refs);
        drop(area);
    }

    /// Before sleeping with every stream paused by its budget while readers are dropping
    /// buffers: waits up to `Builder::driver_linger`, yielding the CPU, for the next
    /// stream to reach its resume mark (or a command), so that its resume costs neither a
    /// sleep nor the reader's eventfd wake-up. With two queues' drivers on two cores, the
    /// per-chunk benchmark's 64 streams read one buffer at a time woke their drivers 4-5
    /// times as often as one driver's (each driver with half the streams more often finds
    /// them all paused), at about 8 µs of CPU per wake-up.
    ///
    /// Only when every stream is paused (a running receive's completion would wake the
    /// driver anyway), not when no buffer came back since the driver last found them so
    /// (idle, or readers holding what they have: nothing will resume), nor while shutting
    /// down; after a linger that found nothing, the next 1, 2, 4, ... up to 64 sleeps do not
    /// linger, until one finds work again.
    fn linger(&mut self) {
        const MOST_SKIPPED: u32 = 64;
        // Every stream paused (so no receive runs, whose completion would wake the driver):
        // counted, so that the check costs nothing per turn whatever the number of streams.
        let streams = self.streams.len() as u64;
        if self.linger.limit.is_zero()
            || streams == 0
            || self.area.counters.streams_paused.load(Ordering::Relaxed) != streams
            || self.stopping.is_some()
            || self.waiting_for_buffers != 0
            || self.area.holdings.resumable()
        {
            return;
        }
        // Buffers came back since the last time every stream was paused like this: its
        // readers are at work (else the driver sleeps until one is).
        let returns = self.returns_seen();
        if std::mem::replace(&mut self.linger.returns_at_pause, returns) == returns {
            return;
        }
        if self.linger.skip > 0 {
            self.linger.skip -= 1;
            return;
        }
        let deadline = Instant::now() + self.linger.limit;
        loop {
            // Lets the readers run where they share this CPU; returns at once where not.
            std::thread::yield_now();
            if self.area.holdings.resumable() || !lock(&self.shared.commands).is_empty() {
                self.linger.misses = 0;
                self.area
                    .counters
                    .driver_lingers
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if Instant::now() >= deadline {
                self.linger.misses = (self.linger.misses * 2).clamp(1, MOST_SKIPPED);
                self.linger.skip = self.linger.misses;
                return;
            }
        }
    }

    fn live_requests(&self) -> usize {
        self.streams.live_requests()
    }

    fn arm_eventfd(&mut self) -> io::Result<()> {
        let user_data = UserData::new(UserDataKind::Wake, WAKE_EVENTFD)
            .expect("small payload")
            .as_u64();
        self.ring
            .poll_readable(self.shared.eventfd.as_raw_fd(), user_data)
    }

    fn take_commands(&mut self) -> io::Result<()> {
        let commands = std::mem::take(&mut *lock(&self.shared.commands));
        for command in commands {
            match command {
                Command::Attach {
                    key,
                    socket,
                    shared,
                    options,
                } => self.attach(key, socket, shared, options)?,
                Command::ReadMore(key) => {
                    if self.stopping.is_none() {
                        self.step_stream(key, StreamReceive::read_more)?;
                    }
                }
                Command::ReaderWaiting(key) => {
                    if self.stopping.is_none() {
                        self.reader_waiting(key)?;
                    }
                }
                Command::Close(key) => self.close(key)?,
                Command::Send {
                    socket,
                    conn,
                    pieces,
                } => self.queue_send(socket, conn, pieces)?,
                #[cfg(feature = "fault-injection")]
                Command::InjectPanic => panic!("injected driver panic (fault-injection)"),
                Command::Shutdown(waiter) => {
                    if let Some(waiter) = waiter {
                        self.shutdown_waiters.push(waiter);
                    }
                    if self.stopping.is_none() {
                        self.begin_shutdown()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn attach(
        &mut self,
        key: StreamId,
        socket: Arc<std::net::TcpStream>,
        shared: Arc<StreamShared>,
        options: StreamOptions,
    ) -> io::Result<()> {
        if self.stopping.is_some() {
            tracing::debug!("tokio-zcrx: a stream attached during shutdown is ended at once");
            shared.finish(StreamEnd::runtime(
                "the tokio-zcrx runtime is shutting down",
            ));
            lock(&self.shared.slots).release(key);
            return Ok(());
        }
        let tag = self.area.tags.tag(key.slot());
        self.area.holdings.begin_stream(tag);
        let fixed_budget = options.budget.or(self.stream_budget);
        self.streams.insert(StreamEntry::new(
            key,
            socket,
            shared,
            options.read_limit,
            fixed_budget,
            tag,
        ));
        if self.budget(key.slot()).is_none() {
            // Without a budget nothing bounds its window: lift a listener's.
            self.unclamp_window(key.slot());
        }
        // An unlimited stream starts now; a limited one when its reader first asks (ReadMore).
        self.step(key.slot(), StreamReceive::start)
    }

    fn close(&mut self, key: StreamId) -> io::Result<()> {
        self.step_stream(key, StreamReceive::close)
    }

    /// Runs one step of the receive state machine of the stream in `slot`, if there is one,
    /// and carries out what it decides. The machine is told first what the stream holds
    /// against its budget; the count of paused streams follows what it became.
    fn step(
        &mut self,
        slot: u32,
        step: impl FnOnce(&mut StreamReceive) -> Action,
    ) -> io::Result<()> {
        let holding = self.holding(slot);
        if let Some(holding) = holding {
            self.adjust_receive_buffer(slot, holding.budget, false);
        }
        let Some(entry) = self.streams.get_mut(slot) else {
            return Ok(());
        };
        entry.receive.set_holding(holding);
        let was_paused = entry.receive.is_paused();
        let action = step(&mut entry.receive);
        let result = self.act(slot, action);
        let entry = self.streams.get(slot);
        let is_paused = entry.is_some_and(|e| e.receive.is_paused());
        if let Some(entry) = entry.filter(|_| was_paused && !is_paused) {
            entry.shared.resume();
        }
        self.count_paused(was_paused, is_paused);
        result
    }

    /// [`Self::step`] for stream `key`, if its slot still holds it.
    fn step_stream(
        &mut self,
        key: StreamId,
        step: impl FnOnce(&mut StreamReceive) -> Action,
    ) -> io::Result<()> {
        if self.streams.entry_mut(key).is_none() {
            return Ok(());
        }
        self.step(key.slot(), step)
    }

    /// Carries out what the receive state machine of the stream in `slot` decided.
    fn act(&mut self, slot: u32, action: Action) -> io::Result<()> {
        const DECIDED: &str = "the action came from this entry";
        match action {
            Action::None => Ok(()),
            Action::Submit { len } => {
                let entry = self.streams.get(slot).expect(DECIDED);
                let (fd, user_data) = (entry.fd(), UserData::recv(entry.id).as_u64());
                self.ring.recv(fd, len, user_data)
            }
            Action::Cancel => {
                let id = self.streams.get(slot).expect(DECIDED).id;
                let (target, user_data) = (UserData::recv(id), UserData::cancel(id));
                self.ring.cancel(target.as_u64(), user_data.as_u64())
            }
            Action::GrantUsedUp => {
                let entry = self.streams.get(slot).expect(DECIDED);
                entry.shared.request_done();
                Ok(())
            }
            Action::Finish(finish) => {
                let entry = self.streams.get(slot).expect(DECIDED);
                let end = match finish {
                    Finish::Eof => StreamEnd::Eof,
                    // Net_iovs of another queue's instance: the flow moved. The group hands
                    // the socket to that queue's driver; the data so far is delivered.
                    Finish::Error(errno) if errno.raw() == libc::EFAULT && self.hand_over_moved => {
                        tracing::debug!(
                            "tokio-zcrx: EFAULT: the stream's flow moved to another queue"
                        );
                        StreamEnd::Moved(entry.socket_arc())
                    }
                    // The kernel's error as it gave it: raw_os_error() stays ECONNRESET etc.
                    Finish::Error(errno) => StreamEnd::Error(io::Error::from(errno)),
                };
                entry.shared.finish(end);
                Ok(())
            }
            Action::Remove {
                was_waiting_for_buffers,
            } => {
                if was_waiting_for_buffers {
                    self.stop_waiting_for_buffers();
                }
                self.remove(slot);
                Ok(())
            }
            Action::ResubmitAfterCqDrained => {
                self.cq_overflowed = true;
                Ok(())
            }
            Action::WaitForBuffers => {
                self.wait_for_buffers();
                Ok(())
            }
            Action::Pause => {
                self.pause(slot);
                Ok(())
            }
        }
    }

    fn remove(&mut self, slot: u32) {
        if let Some(entry) = self.streams.take(slot) {
            self.rcvbuf_total -= entry.rcvbuf_chunks;
            if !entry.receive.is_finished() {
                entry
                    .shared
                    .finish(StreamEnd::runtime("the tokio-zcrx runtime has stopped"));
            }
            lock(&self.shared.slots).release(entry.id);
        }
    }

    fn begin_shutdown(&mut self) -> io::Result<()> {
        self.stopping = Some(Instant::now());
        self.shared.state.store(STOPPING, Ordering::Release);
        for slot in self.streams.slots() {
            if let Some(entry) = self.streams.get_mut(slot) {
                if entry.receive.finish() {
                    entry
                        .shared
                        .finish(StreamEnd::runtime("the tokio-zcrx runtime was shut down"));
                }
                self.step(slot, StreamReceive::cancel_or_remove)?;
            }
        }
        if self.teardown_would_expose_buffers() {
            // Wait (bounded by SHUTDOWN_GRACE) for the buffers: their drops wake us.
            self.area
                .driver_waits_for_buffers
                .store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Ends every stream still open (driver exit). `failure` names the reason if it failed.
    fn end_all_streams(&mut self, failure: Option<&str>) {
        for entry in self.streams.iter_mut() {
            if entry.receive.finish() {
                let message = match failure {
                    Some(reason) => format!("the tokio-zcrx driver thread failed: {reason}"),
                    None => "the tokio-zcrx runtime was shut down".into(),
                };
                entry.shared.finish(StreamEnd::runtime(message));
            }
        }
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
        self.linger();
        // Announce sleep before the last look at the command queue: a handle that queues a
        // command after this point sees `sleeping` and writes the eventfd (SeqCst on both).
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let has_commands = !lock(&self.shared.commands).is_empty();
        // Last look at the returns, after an RMW every return also ends with: a drop after it
        // sees `sleeping` and `driver_waits_for_buffers` and wakes us, one before it is seen
        // here (zcrx_core::refill, "Waking the ring's owner"; loom_refill's handshake models).
        self.area.refill.synchronize_with_producers();
        let returns_pending = (self.overflow_recheck.is_none() && self.area.refill.has_overflow())
            || (self.area.driver_waits_for_buffers.load(Ordering::Relaxed)
                && self.returns_seen() != self.returns_at_exhaustion)
            || self.area.holdings.resumable();
        let timeout = if has_commands || returns_pending {
            // Still an enter that reaps: under DEFER_TASKRUN a plain submit runs no deferred
            // work, and no completion would reach any stream meanwhile.
            Some(Duration::ZERO)
        } else {
            [
                self.events.next_deadline(),
                self.stopping.map(|since| since + SHUTDOWN_GRACE),
                self.exhausted_at.map(|at| at + EXHAUSTION_RETRY),
                self.overflow_recheck.map(|(at, _)| at),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()))
        };
        let result = self.ring.submit_and_wait(timeout);
        self.shared.sleeping.store(false, Ordering::SeqCst);
        match result {
            // Transient: interrupted, no memory for the request right now, or CQ overflow
            // entries to reap first (the reap follows). Go round again; back off if it
            // persists, so a kernel that keeps answering this cannot make the driver spin.
            Err(e) if is_transient(&e) => {
                self.transient_errors += 1;
                self.area
                    .counters
                    .transient_enter_errors
                    .fetch_add(1, Ordering::Relaxed);
                if self.transient_errors > 3 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            }
            other => {
                self.transient_errors = 0;
                other
            }
        }
    }
}

/// `Driver::linger`'s state.
#[derive(Debug)]
struct Linger {
    /// `Builder::driver_linger`.
    limit: Duration,
    /// Returns seen (`Driver::returns_seen`) when the driver last found every stream
    /// paused and no receive running.
    returns_at_pause: u64,
    /// Sleeps to skip after the last linger that found nothing, doubling per miss.
    misses: u32,
    /// Sleeps still to skip.
    skip: u32,
}

/// Registers the first kernel area as fixed buffer 0 for zero-copy sends from it
/// (`IORING_REGISTER_BUFFERS`): the kernel then pins it once instead of per send. Where it
/// refuses (the locked-memory limit, `RLIMIT_MEMLOCK`, without `CAP_IPC_LOCK`), sends go
/// unregistered: logged once and counted.
///
/// Registered once and never updated while the ring lives: on 6.15-6.17 kernels without
/// f6041803a831 a vectored fixed-buffer send (`SENDMSG_ZC`) ties the buffer table node to
/// the request, not to its notification, so replacing the entry while a send is in flight
/// could free pages the NIC still reads.
fn register_area_buffer(
    ring: &crate::sys::registration::Ring,
    area: &Area,
    shared: &DriverShared,
) -> Option<FixedBuffer> {
    // The first kernel area only: areas added later (Builder::area_growth) are separate
    // mappings, and sends from them go unregistered (`FixedBuffer::contains` is false).
    let (base, len) = (area.data_ptr(0, 0), area.kernel_area_len(0));
    let iovec = libc::iovec {
        iov_base: base as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: the area stays mapped while the ring lives (the driver closes the ring before
    // it drops its area reference, and buffers keep the area beyond); the kernel only reads
    // it for sends.
    match unsafe { ring.submitter().register_buffers(&[iovec]) } {
        Ok(()) => Some(FixedBuffer {
            base: base as usize,
            len,
            index: 0,
        }),
        Err(e) => {
            shared
                .send_counters
                .fallbacks
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                "tokio-zcrx: cannot register the area as a fixed buffer for zero-copy \
                 sends (RLIMIT_MEMLOCK too low?); sending from it unregistered"
            );
            None
        }
    }
}

/// Errors of `io_uring_enter` that say "not now" rather than "broken".
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
    )
}
