//! The driver thread: owns the ring, turns completions into buffers on streams, returns
//! what it must, re-arms events, and reacts to commands from handles.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use zcrx_core::completion::{
    decode, AreaLayout, Completion, Eof, InvalidCompletion, RawCompletion, RecvErrorAction,
};
use zcrx_core::events::{EventKind as KernelEvent, EventRearm};
use zcrx_core::user_data::{StreamId, UserData, UserDataKind};

use super::area::{Area, BufferRefs};
use super::instance::{self, Instance};
use super::kernel::{Capabilities, Kernel, UringKernel};
use super::{lock, Command, DriverShared, FAILED, STOPPING};
use super::{StreamEnd, StreamShared};
use crate::buf::ZcBuf;
use crate::config::StreamOptions;
use crate::config::Validated;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, EventKind};
use crate::sys::syscall;

/// The eventfd poll's `user_data` payload.
const WAKE_EVENTFD: u64 = 1;

/// How long shutdown waits for cancelled receives to confirm before closing the ring anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A receive that ran out of area is retried when buffers come back, or after this long in
/// any case: the returns may all have happened before the driver saw the exhaustion, and
/// chunks held in socket queues free up without any return.
const EXHAUSTION_RETRY: Duration = Duration::from_millis(5);

/// While returns wait in the overflow list for ring space, the driver looks again after
/// this long, doubling up to [`OVERFLOW_RECHECK_MAX`] while nothing changes: a NIC consumes
/// the ring only when its page pool refills (and kernels before 6.19 have no flush), so the
/// wait can be long, and an idle driver must not spin meanwhile.
/// At most one AreaExhausted event per this interval.
const AREA_EXHAUSTED_EVENT_INTERVAL: Duration = Duration::from_millis(100);

const OVERFLOW_RECHECK_MIN: Duration = Duration::from_millis(1);
const OVERFLOW_RECHECK_MAX: Duration = Duration::from_millis(100);

/// Entry point of the driver thread.
pub(super) fn run(config: Validated, shared: Arc<DriverShared>, ready: mpsc::Sender<Result<()>>) {
    let instance = match instance::register(&config) {
        Ok(instance) => instance,
        Err(e) => {
            shared.state.store(FAILED, Ordering::Release);
            *lock(&shared.failure) = Some(e.to_string());
            let _ = ready.send(Err(e));
            return;
        }
    };
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
pub(crate) fn drive<K: Kernel>(mut driver: Driver<K>, shared: Arc<DriverShared>) {
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
    // Fail commands that raced with the end, and free whatever they carried.
    for command in shared.close_queue(final_state) {
        match command {
            Command::Attach { shared: stream, .. } => {
                stream.finish(StreamEnd::runtime("the tokio-zcrx runtime has stopped"))
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

/// How a receive request ended.
enum RequestEnd {
    /// Final CQE with 0: EOF, or the byte limit reached.
    Eof,
    /// Data without `F_MORE`: the request ended after it, with no reason given.
    Unexplained,
    /// Final CQE with an error.
    Error(zcrx_core::completion::CqeErrno),
}

/// Where a stream's receive request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// None running (limited stream between requests, or not started).
    Idle,
    /// Running.
    Running,
    /// Cancel submitted, waiting for the final CQE.
    Cancelling,
    /// Ended with ENOMEM; resubmit once buffers come back.
    WaitingForBuffers,
    /// Ended with ENOSPC; resubmit after the CQ is drained.
    ResubmitAfterCq,
}

struct StreamEntry {
    id: StreamId,
    /// Keeps the socket open while the kernel may use it.
    socket: Arc<std::net::TcpStream>,
    shared: Arc<StreamShared>,
    limit: Option<u32>,
    /// Bytes received since the reader last asked for more (limited streams): a request
    /// resubmitted after ENOMEM, ENOSPC or EINTR asks only for the rest of the limit.
    granted_used: u64,
    request: Request,
    /// The reader is gone: remove the entry once no request runs.
    closed: bool,
    /// The stream has been told it ended.
    finished: bool,
    /// Buffers of the current reap, delivered in one lock.
    pending: Vec<ZcBuf>,
}

impl StreamEntry {
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

pub(crate) struct Driver<K: Kernel> {
    kernel: K,
    area: Arc<Area>,
    buffer_refs: BufferRefs,
    layout: AreaLayout,
    shared: Arc<DriverShared>,
    nodev: bool,
    caps: Capabilities,
    events: EventRearm,
    /// The driver's sender of the event channel (dropped with the driver).
    events_tx: tokio::sync::broadcast::Sender<Event>,
    streams: Vec<Option<StreamEntry>>,
    /// Slots with buffers in `pending` this reap.
    touched: Vec<u32>,
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
}

impl Driver<UringKernel> {
    fn new(
        instance: Instance,
        config: &Validated,
        shared: Arc<DriverShared>,
    ) -> Result<Driver<UringKernel>> {
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
        } = instance;
        let area = Area::new(area, region, &shared_layout, Arc::clone(&shared)).map_err(|e| {
            Error::new(ErrorKind::Kernel, "the kernel's refill ring is unusable").with_source(e)
        })?;
        let layout = AreaLayout::new(area.len() as u64, area.chunk_size, shared_layout.area_token)
            .map_err(|e| Error::new(ErrorKind::Kernel, format!("unusable area layout: {e}")))?;
        *lock(&shared.description) = description;
        Driver::with_kernel(
            UringKernel::new(ring, fork_guard, zcrx_id),
            Arc::new(area),
            layout,
            nodev,
            caps,
            config,
            shared,
        )
    }
}

impl<K: Kernel> Driver<K> {
    /// A driver over any completion source (the real ring, or a synthetic one).
    pub(crate) fn with_kernel(
        kernel: K,
        area: Arc<Area>,
        layout: AreaLayout,
        nodev: bool,
        caps: Capabilities,
        config: &Validated,
        shared: Arc<DriverShared>,
    ) -> Result<Driver<K>> {
        *lock(&shared.area) = Some(Arc::downgrade(&area));
        let events_tx = lock(&shared.events)
            .clone()
            .expect("the event channel lives until the driver exits");
        let mut driver = Driver {
            kernel,
            buffer_refs: BufferRefs::new(&area),
            area,
            layout,
            shared,
            nodev,
            caps,
            events: EventRearm::new(config.event_rearm_interval),
            events_tx,
            streams: Vec::new(),
            touched: Vec::new(),
            reaped: Vec::with_capacity(config.cq_entries as usize),
            returns_at_exhaustion: 0,
            exhausted_at: None,
            waiting_for_buffers: 0,
            overflow_recheck: None,
            last_exhausted_event: None,
            transient_errors: 0,
            stopping: None,
            shutdown_waiters: Vec::new(),
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
                let settled = self.live_requests() == 0 && !self.teardown_would_expose_buffers();
                if settled || since.elapsed() > SHUTDOWN_GRACE {
                    return Ok(());
                }
            }
            self.return_buffers();
            self.resume_waiting_streams()?;
            self.rearm_events();
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
            kernel,
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
            area.close_with_last_buffer(Box::new(kernel));
        } else {
            drop(kernel);
        }
        drop(buffer_refs);
        drop(area);
    }

    fn live_requests(&self) -> usize {
        self.streams
            .iter()
            .flatten()
            .filter(|s| matches!(s.request, Request::Running | Request::Cancelling))
            .count()
    }

    fn arm_eventfd(&mut self) -> io::Result<()> {
        let user_data = UserData::new(UserDataKind::Wake, WAKE_EVENTFD)
            .expect("small payload")
            .as_u64();
        self.kernel
            .poll_readable(self.shared.eventfd.as_raw_fd(), user_data)
    }

    fn submit_recv(&mut self, slot: u32) -> io::Result<()> {
        let Some(entry) = self.streams.get_mut(slot as usize).and_then(Option::as_mut) else {
            return Ok(());
        };
        // 0 asks for no limit; a limited stream asks for what is left of its grant, and a
        // grant already used up (a resubmission after the last byte arrived) waits for the
        // reader to ask again.
        let len = match entry.limit {
            None => 0,
            Some(limit) => match u64::from(limit).saturating_sub(entry.granted_used) {
                0 => {
                    entry.request = Request::Idle;
                    entry.shared.request_done();
                    return Ok(());
                }
                left => left as u32,
            },
        };
        entry.request = Request::Running;
        let (fd, user_data) = (entry.fd(), UserData::recv(entry.id).as_u64());
        self.kernel.recv(fd, len, user_data)
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
                    let slot = key.slot();
                    let idle = self
                        .entry(key)
                        .is_some_and(|e| e.request == Request::Idle && !e.finished);
                    if idle && self.stopping.is_none() {
                        if let Some(entry) = self.streams[slot as usize].as_mut() {
                            entry.granted_used = 0;
                        }
                        self.submit_recv(slot)?;
                    }
                }
                Command::Close(key) => self.close(key)?,
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

    fn entry(&self, key: StreamId) -> Option<&StreamEntry> {
        self.streams
            .get(key.slot() as usize)
            .and_then(Option::as_ref)
            .filter(|e| e.id == key)
    }

    fn attach(
        &mut self,
        key: StreamId,
        socket: Arc<std::net::TcpStream>,
        shared: Arc<StreamShared>,
        options: StreamOptions,
    ) -> io::Result<()> {
        if self.stopping.is_some() {
            shared.finish(StreamEnd::runtime(
                "the tokio-zcrx runtime is shutting down",
            ));
            lock(&self.shared.slots).release(key);
            return Ok(());
        }
        let slot = key.slot() as usize;
        if self.streams.len() <= slot {
            self.streams.resize_with(slot + 1, || None);
        }
        self.streams[slot] = Some(StreamEntry {
            id: key,
            socket,
            shared,
            limit: options.read_limit,
            granted_used: 0,
            request: Request::Idle,
            closed: false,
            finished: false,
            pending: Vec::new(),
        });
        if options.read_limit.is_none() {
            self.submit_recv(key.slot())?;
        }
        // A limited stream starts when its reader first asks (ReadMore).
        Ok(())
    }

    fn close(&mut self, key: StreamId) -> io::Result<()> {
        let slot = key.slot() as usize;
        let Some(entry) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        if entry.id != key {
            return Ok(());
        }
        entry.closed = true;
        self.cancel_or_remove(slot)
    }

    /// Cancels a running request (the entry goes when its final CQE arrives) or removes an
    /// entry that has none.
    fn cancel_or_remove(&mut self, slot: usize) -> io::Result<()> {
        let Some(entry) = self.streams[slot].as_mut() else {
            return Ok(());
        };
        match entry.request {
            Request::Running => {
                entry.request = Request::Cancelling;
                let target = UserData::recv(entry.id).as_u64();
                let user_data = UserData::cancel(entry.id).as_u64();
                self.kernel.cancel(target, user_data)
            }
            Request::Cancelling => Ok(()),
            Request::Idle | Request::WaitingForBuffers | Request::ResubmitAfterCq => {
                if entry.request == Request::WaitingForBuffers {
                    self.stop_waiting_for_buffers();
                }
                self.remove(slot);
                Ok(())
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(entry) = self.streams[slot].take() {
            if !entry.finished {
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
        for slot in 0..self.streams.len() {
            if let Some(entry) = self.streams[slot].as_mut() {
                if !entry.finished {
                    entry.finished = true;
                    entry
                        .shared
                        .finish(StreamEnd::runtime("the tokio-zcrx runtime was shut down"));
                }
                self.cancel_or_remove(slot)?;
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
        for entry in self.streams.iter_mut().flatten() {
            if !entry.finished {
                entry.finished = true;
                let message = match failure {
                    Some(reason) => format!("the tokio-zcrx driver thread failed: {reason}"),
                    None => "the tokio-zcrx runtime was shut down".into(),
                };
                entry.shared.finish(StreamEnd::runtime(message));
            }
        }
    }

    /// Moves returns that found the refill ring full into it, and makes the kernel take them
    /// where it would not by itself: in NODEV mode it consumes the ring only on FLUSH_RQ, and
    /// on a NIC queue only when the page pool refills, so a receive that ran out of area on
    /// the copy path (loopback or other-queue traffic) would wait forever without a flush.
    ///
    /// Kernels before 6.19 have no FLUSH_RQ: there the page pool's own refill and the retry
    /// timers have to do. A flush that fails is logged and counted, never fatal.
    fn return_buffers(&mut self) {
        let mut moved = self.area.refill.flush_overflow();
        let flush_needed =
            self.nodev || self.waiting_for_buffers > 0 || self.area.refill.has_overflow();
        // Entries published but not consumed count too: a flush that failed took the
        // unflushed count with it, and in NODEV mode nothing else would ever consume them.
        if self.caps.ctrl
            && flush_needed
            && (self.area.refill.take_unflushed() > 0 || self.area.refill.unconsumed() > 0)
        {
            match self.kernel.flush_refill() {
                Ok(()) => moved += self.area.refill.flush_overflow(),
                Err(e) => {
                    // Keep flushing: the query reported ZCRX_CTRL, so a refusal is not
                    // "unsupported", and in NODEV mode the flush is the only way chunks go
                    // back. The returns it did not flush stay unconsumed and are retried.
                    let failures = self
                        .area
                        .counters
                        .failed_flushes
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            error = %e,
                            failures,
                            "tokio-zcrx: ZCRX_CTRL_FLUSH_RQ failed; retrying on the next \
                             return or timer"
                        );
                    }
                }
            }
        }
        self.overflow_recheck = if self.area.refill.has_overflow() {
            let now = Instant::now();
            Some(match self.overflow_recheck {
                // Progress, or a new episode: look again soon.
                _ if moved > 0 => (now + OVERFLOW_RECHECK_MIN, OVERFLOW_RECHECK_MIN),
                None => (now + OVERFLOW_RECHECK_MIN, OVERFLOW_RECHECK_MIN),
                Some((at, backoff)) if now < at => (at, backoff),
                Some((_, backoff)) => {
                    let backoff = (backoff * 2).min(OVERFLOW_RECHECK_MAX);
                    (now + backoff, backoff)
                }
            })
        } else {
            None
        };
    }

    /// A count that moves whenever a return is claimed or published: claims alone would let
    /// a push that returned before an elected publisher stored the tail make the driver
    /// resubmit, see `-ENOMEM` again and then wait for the retry timer although the entries
    /// reached the kernel just after (zcrx_core::refill, "Publish").
    fn returns_seen(&self) -> u64 {
        let stats = self.area.refill.stats();
        stats.pushed.wrapping_add(stats.published)
    }

    /// One fewer stream waits for area: when none does any more, the exhaustion bookkeeping
    /// goes, so the driver sleeps again and buffer drops stop waking it.
    fn stop_waiting_for_buffers(&mut self) {
        self.waiting_for_buffers -= 1;
        if self.waiting_for_buffers == 0 {
            self.exhausted_at = None;
            self.area
                .driver_waits_for_buffers
                .store(false, Ordering::Relaxed);
        }
    }

    /// Resubmits streams that ran out of area once buffers have come back.
    fn resume_waiting_streams(&mut self) -> io::Result<()> {
        if self.waiting_for_buffers == 0 {
            return Ok(());
        }
        let returned = self.returns_seen();
        let retry_due = self
            .exhausted_at
            .is_some_and(|at| at.elapsed() >= EXHAUSTION_RETRY);
        if returned == self.returns_at_exhaustion && !retry_due {
            // Nothing came back yet: let drops (or the retry timer) wake us.
            self.area
                .driver_waits_for_buffers
                .store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.area
            .driver_waits_for_buffers
            .store(false, Ordering::Relaxed);
        self.returns_at_exhaustion = returned;
        self.exhausted_at = None;
        for slot in 0..self.streams.len() as u32 {
            let waiting = self.streams[slot as usize]
                .as_ref()
                .is_some_and(|e| e.request == Request::WaitingForBuffers);
            if waiting {
                self.stop_waiting_for_buffers();
                self.area
                    .counters
                    .resubmits_area_exhausted
                    .fetch_add(1, Ordering::Relaxed);
                self.submit_recv(slot)?;
            }
        }
        Ok(())
    }

    fn rearm_events(&mut self) {
        if !self.caps.events {
            return;
        }
        let now = Instant::now();
        let due: Vec<KernelEvent> = self.events.due_rearms(now).collect();
        for kind in due {
            match self.kernel.arm_event(kind.type_index()) {
                // EINVAL: the kernel thinks it is armed already (it never fired for it).
                Ok(()) => {
                    self.events.mark_rearmed(kind);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.events.mark_rearmed(kind);
                }
                Err(e) => {
                    self.area
                        .counters
                        .failed_rearms
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "tokio-zcrx: re-arming a zcrx event failed");
                    self.events.rearm_failed(kind, now);
                }
            }
        }
    }

    fn submit_and_wait(&mut self) -> io::Result<()> {
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
                && self.returns_seen() != self.returns_at_exhaustion);
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
        let result = self.kernel.submit_and_wait(timeout);
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

    fn reap(&mut self) -> io::Result<()> {
        self.reaped.clear();
        self.kernel.reap(&mut self.reaped);
        let mut cq_overflowed = false;
        let reaped = std::mem::take(&mut self.reaped);
        for raw in &reaped {
            let streams = &self.streams;
            let generation = |slot: u32| {
                streams
                    .get(slot as usize)
                    .and_then(Option::as_ref)
                    .map(|e| e.id.generation())
            };
            match decode(raw, &self.layout, &generation) {
                Ok(Completion::Data {
                    stream,
                    area_offset,
                    len,
                    chunk,
                    more,
                }) => {
                    self.on_data(stream, area_offset, len, chunk);
                    if !more {
                        // The request ended with this data and gave no reason (kernels up to
                        // 7.3 never do this): as after a final CQE, go on or finish.
                        cq_overflowed |= self.on_end(stream, RequestEnd::Unexplained)?;
                    }
                }
                Ok(Completion::End { stream, result }) => {
                    let end = match result {
                        Ok(Eof) => RequestEnd::Eof,
                        Err(errno) => RequestEnd::Error(errno),
                    };
                    cq_overflowed |= self.on_end(stream, end)?;
                }
                Ok(Completion::Event { kind }) => self.on_kernel_event(kind),
                Ok(Completion::Wake { .. }) => self.on_wake(raw)?,
                Ok(Completion::CancelDone { stream, res }) => self.on_cancel_done(stream, res),
                Ok(Completion::Internal { .. }) => {}
                Err(invalid) => self.on_invalid(&invalid)?,
            }
        }
        self.reaped = reaped;
        self.deliver();
        if cq_overflowed {
            self.area
                .counters
                .resubmits_cq_overflow
                .fetch_add(1, Ordering::Relaxed);
            self.emit(EventKind::CqOverflowRecovered);
            for slot in 0..self.streams.len() as u32 {
                let resubmit = self.streams[slot as usize]
                    .as_ref()
                    .is_some_and(|e| e.request == Request::ResubmitAfterCq);
                if resubmit {
                    self.submit_recv(slot)?;
                }
            }
        }
        Ok(())
    }

    fn on_data(&mut self, stream: StreamId, area_offset: u64, len: u32, chunk: u32) {
        let buf = ZcBuf::new(&mut self.buffer_refs, area_offset, len, chunk);
        // Only this thread writes the counters: a plain load and store publishes them
        // without a locked read-modify-write per chunk.
        let counters = &self.area.counters;
        let bytes = counters.bytes.load(Ordering::Relaxed) + u64::from(len);
        counters.bytes.store(bytes, Ordering::Relaxed);
        let chunks = counters.chunks.load(Ordering::Relaxed) + 1;
        counters.chunks.store(chunks, Ordering::Relaxed);
        let entry = self.streams[stream.slot() as usize]
            .as_mut()
            .expect("decode checked the slot");
        entry.granted_used += u64::from(len);
        if entry.finished || entry.closed {
            // Nobody reads it any more: dropping the buffer returns the chunk.
            return;
        }
        if entry.pending.is_empty() {
            self.touched.push(stream.slot());
        }
        entry.pending.push(buf);
    }

    /// Handles the end of a receive request. Returns whether it was a CQ overflow.
    fn on_end(&mut self, stream: StreamId, end: RequestEnd) -> io::Result<bool> {
        let slot = stream.slot() as usize;
        // Deliver what came before the end first.
        self.deliver();
        let entry = self.streams[slot]
            .as_mut()
            .expect("decode checked the slot");
        let was_cancelling = entry.request == Request::Cancelling;
        entry.request = Request::Idle;
        if entry.closed || was_cancelling {
            self.remove(slot);
            return Ok(false);
        }
        if entry.finished {
            // Ended already (an invalid completion): wait for the reader to let go.
            return Ok(false);
        }
        let grant_used_up = entry
            .limit
            .is_some_and(|limit| entry.granted_used >= u64::from(limit));
        match end {
            RequestEnd::Eof | RequestEnd::Unexplained if grant_used_up => {
                entry.shared.request_done();
                Ok(false)
            }
            RequestEnd::Eof => {
                entry.finished = true;
                entry.shared.finish(StreamEnd::Eof);
                Ok(false)
            }
            RequestEnd::Unexplained => {
                self.submit_recv(slot as u32)?;
                Ok(false)
            }
            RequestEnd::Error(errno) => match errno.recv_action() {
                RecvErrorAction::ResubmitAfterCqDrained => {
                    entry.request = Request::ResubmitAfterCq;
                    Ok(true)
                }
                RecvErrorAction::ResubmitAfterRefill => {
                    entry.request = Request::WaitingForBuffers;
                    let now = Instant::now();
                    if self.waiting_for_buffers == 0 {
                        self.returns_at_exhaustion = self.returns_seen();
                        self.exhausted_at = Some(now);
                    }
                    self.waiting_for_buffers += 1;
                    // One event per episode at most every AREA_EXHAUSTED_EVENT_INTERVAL: a
                    // burst of streams running out together is one fact, and the statistics
                    // (resubmits_area_exhausted) count every occurrence.
                    let due = self
                        .last_exhausted_event
                        .is_none_or(|at| now.duration_since(at) >= AREA_EXHAUSTED_EVENT_INTERVAL);
                    if due {
                        self.last_exhausted_event = Some(now);
                        self.emit(EventKind::AreaExhausted);
                    }
                    Ok(false)
                }
                RecvErrorAction::ResubmitNow => {
                    self.submit_recv(slot as u32)?;
                    Ok(false)
                }
                RecvErrorAction::Cancelled | RecvErrorAction::Fatal => {
                    entry.finished = true;
                    // The kernel's error as it gave it: raw_os_error() stays ECONNRESET etc.
                    entry
                        .shared
                        .finish(StreamEnd::Error(io::Error::from(errno)));
                    Ok(false)
                }
            },
        }
    }

    /// The cancel request's own CQE. `-ENOENT`: the receive was no longer there to cancel
    /// (it ended, and its final CQE was handled or will never come), so an entry still
    /// waiting for that confirmation goes now instead of holding its socket until shutdown.
    fn on_cancel_done(&mut self, stream: StreamId, res: i32) {
        if res != -libc::ENOENT {
            return;
        }
        let slot = stream.slot() as usize;
        let cancelling = self
            .streams
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.id == stream && e.request == Request::Cancelling);
        if cancelling {
            self.streams[slot].as_mut().expect("checked above").request = Request::Idle;
            self.remove(slot);
        }
    }

    /// A completion the decoder rejected. The reference the kernel took is given back where
    /// the decoder can tell it took one (never otherwise: returning a reference the kernel
    /// does not hold could free a chunk a live buffer reads, so a doubtful chunk is leaked
    /// and counted). The stream it names ends after the data delivered before it, since its
    /// byte stream would have a hole, and its request is cancelled.
    fn on_invalid(&mut self, invalid: &InvalidCompletion) -> io::Result<()> {
        tracing::warn!("tokio-zcrx: dropping {invalid}");
        self.area
            .counters
            .invalid_completions
            .fetch_add(1, Ordering::Relaxed);
        if let Some(rqe) = invalid.owed_refill() {
            self.area
                .counters
                .rejected_returns
                .fetch_add(1, Ordering::Relaxed);
            let _ = self.area.refill.push(rqe);
        }
        if invalid.may_leak_chunk() {
            self.area
                .counters
                .chunks_leaked
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some(stream) = invalid.stream() else {
            return Ok(());
        };
        let slot = stream.slot() as usize;
        let named = self
            .streams
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.id == stream && !e.finished);
        if !named {
            return Ok(());
        }
        self.deliver();
        let entry = self.streams[slot].as_mut().expect("checked above");
        entry.finished = true;
        entry.shared.finish(StreamEnd::Error(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("tokio-zcrx: {invalid}"),
        )));
        if entry.request == Request::Running {
            self.cancel_or_remove(slot)?;
        }
        Ok(())
    }

    fn on_kernel_event(&mut self, kind: KernelEvent) {
        self.area
            .counters
            .kernel_events
            .fetch_add(1, Ordering::Relaxed);
        self.events.on_event(kind, Instant::now());
        match kind {
            KernelEvent::Copy => self.emit(EventKind::CopyFallback),
            KernelEvent::AllocFail => self.emit(EventKind::AllocationFailure),
            KernelEvent::Unknown(_) => {}
        }
    }

    fn on_wake(&mut self, raw: &RawCompletion) -> io::Result<()> {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd; EAGAIN (already
        // drained) is fine.
        let _ = unsafe {
            syscall!(read(
                self.shared.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            ))
        };
        if raw.flags & zcrx_sys::ring::IORING_CQE_F_MORE == 0 {
            // The multishot poll ended (e.g. on CQ overflow): poll again.
            self.arm_eventfd()?;
        }
        Ok(())
    }

    fn emit(&self, kind: EventKind) {
        // No subscriber is fine: events are wake-ups, the statistics are the record.
        let _ = self.events_tx.send(Event {
            kind,
            stats: self.area.stats(),
        });
    }

    /// Hands each touched stream its buffers of this reap, one lock and one wake each.
    fn deliver(&mut self) {
        for slot in self.touched.drain(..) {
            if let Some(entry) = self.streams[slot as usize].as_mut() {
                if !entry.pending.is_empty() {
                    entry.shared.deliver(&mut entry.pending);
                }
            }
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
