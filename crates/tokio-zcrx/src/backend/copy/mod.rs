//! The copy-mode backend: the same API without io_uring.
//!
//! Where zcrx cannot run (older kernels, NICs without header split, containers that forbid
//! io_uring, loopback), streams read with Tokio's readiness-based I/O into buffers from a
//! bounded, pre-allocated [`Pool`], handed out as [`ZcBuf`]s and returned to the pool when
//! dropped. Each stream's task does its own copying, so the copies spread over Tokio's
//! workers (one io_uring thread copying everything tops out near one core's bandwidth).
//!
//! A connection holds no buffer while it has nothing to read: it waits for readiness first,
//! then takes a buffer. When the pool is empty, streams wait for returns; nothing is lost and
//! nothing grows. A returned buffer goes to a stream that is being polled, about in waiting
//! order, never to one that waited once and was then left alone (see [`PoolState`]). Every byte counts as copied in the statistics, and copying is announced
//! with [`EventKind::CopyFallback`] events, so monitoring code needs no special case.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::broadcast;

use crate::buf::{BufferOwnerVtable, BufferSlot, ZcBuf};
use crate::config::{CopyConfig, StreamOptions};
use crate::error::{Error, ErrorKind};
use crate::event::{Event, EventKind, Stats};
use crate::sys::mem::Mapping;
use crate::sys::{lock, syscall};
use crate::writer::ZcWriteHalf;

/// Buffers of the copy pool, LIFO: the most recently returned buffer is reused first, while
/// it is still in the CPU cache.
pub(crate) struct Pool {
    memory: Mapping,
    /// The number of buffers (the mapping is rounded up to whole pages, so it may hold room
    /// for more).
    buffers: u32,
    buffer_size: usize,
    /// Free buffers and the streams waiting for one, under one lock so that a return never
    /// misses a stream that is about to wait.
    state: Mutex<PoolState>,
    bytes: AtomicU64,
    chunks: AtomicU64,
    outstanding: AtomicU64,
    events: broadcast::Sender<Event>,
    /// Nanoseconds since `epoch` when the last copy event went out.
    last_event: AtomicU64,
    event_interval: Duration,
    epoch: Instant,
    /// Set by `Zcrx::shutdown` (under the `state` and `sockets` locks): streams end with an
    /// error at their next poll.
    closed: AtomicBool,
    /// Open copy-mode sockets by stream id, so shutdown can wake every stream (it shuts down
    /// their read side, which makes them readable). Touched on attach and drop only.
    sockets: Mutex<HashMap<u64, RawFd>>,
    next_stream: AtomicU64,
}

/// How pool buffers go back: the owner pointer is the `Pool`, and each buffer holds one strong
/// reference of its `Arc`; the slot's offset is the buffer's index.
static POOL_BUFFERS: BufferOwnerVtable = BufferOwnerVtable {
    release_one: release_pool_buffer,
    release_run: release_pool_buffers,
    debug_fields: |debug, slot| {
        debug.field("pool_buffer", &slot.offset);
    },
};

/// `release_one` of [`POOL_BUFFERS`].
///
/// # Safety
///
/// As `BufferOwnerVtable::release_one`: `owner` is the `Pool` of a live buffer made by
/// [`Pool::buffer`], whose buffer and strong reference the caller gives up.
unsafe fn release_pool_buffer(owner: NonNull<()>, slot: BufferSlot) {
    // SAFETY: the strong reference `Pool::buffer` leaked for this buffer, taken back once.
    let pool = unsafe { Arc::from_raw(owner.cast::<Pool>().as_ptr()) };
    // The slot's offset is the buffer's index (`Pool::buffer`), so it fits in a u32.
    pool.release_delivered(slot.offset as u32);
}

/// `release_run` of [`POOL_BUFFERS`]: one by one, as dropping each would.
///
/// # Safety
///
/// As `BufferOwnerVtable::release_run`: every slot is that of a live buffer of the `Pool` at
/// `owner`, made by [`Pool::buffer`], which the caller gives up.
unsafe fn release_pool_buffers(owner: NonNull<()>, slots: &[BufferSlot]) {
    for &slot in slots {
        // SAFETY: as this function's, one buffer at a time.
        unsafe { release_pool_buffer(owner, slot) };
    }
}

/// How free buffers reach waiting streams.
///
/// A returned buffer is never reserved for a particular stream: a stream that waited once
/// and is then no longer polled (a `select!` that moved on, a task applying backpressure)
/// must not hold up a buffer that a readable, polled connection could use, and a stream
/// cannot tell us that it is no longer polled. So a return wakes *every* waiting stream and
/// the buffer goes to one that is polled; the others find the pool empty and wait again.
/// Each registration is woken once, so the extra polls are bounded by the number of waits.
///
/// Fairness: the woken streams run in whatever order the scheduler picks (Tokio runs the
/// last one woken first), and a stream that did not wait, typically the task that returned
/// the buffer and polls again at once, would otherwise take it back before any of them runs.
/// So the streams woken by the latest return (the round) keep their waiting order: a stream
/// takes a free buffer only if more are free than older round members that have not been
/// polled since they were woken (a stream that did not wait counts as the youngest).
/// Otherwise it *defers* once: it yields instead of waiting, and takes the buffer on its
/// next poll if it is still free. A deferral is a yield, not a wait, so a free buffer never
/// waits for a stream that is not polled, and waiting streams are served about in order.
#[derive(Debug)]
struct PoolState {
    /// Indices of free buffers, most recently returned last.
    free: Vec<u32>,
    /// Waiting streams' wakers in the order they started waiting; a stream that is dropped
    /// (or takes a buffer) clears its slot. All are woken and the list is emptied at once.
    waiters: Vec<Option<Waker>>,
    /// The `Some` entries of `waiters`. When the last one goes, the list is emptied, so
    /// streams that wait and are dropped while no buffer comes back cannot grow it.
    live_waiters: usize,
    /// Counts the times `waiters` was emptied, so a stream can tell whether its slot is
    /// still in the list (same generation) or in the latest round (the one before).
    generation: u64,
    /// The latest round: one bit per slot of the emptied list, set while that stream has not
    /// been polled since it was woken.
    unpolled: Vec<u64>,
    unpolled_count: usize,
}

impl PoolState {
    /// Empties the waiting list into a new round; the caller wakes the returned wakers
    /// after unlocking. Without waiters the current round stays.
    fn take_waiters(&mut self) -> Vec<Option<Waker>> {
        if self.waiters.is_empty() {
            return Vec::new();
        }
        self.generation += 1;
        self.live_waiters = 0;
        let waiters = std::mem::take(&mut self.waiters);
        self.unpolled.clear();
        self.unpolled.resize(waiters.len().div_ceil(64), 0);
        self.unpolled_count = 0;
        for (slot, waiter) in waiters.iter().enumerate() {
            if waiter.is_some() {
                self.unpolled[slot / 64] |= 1 << (slot % 64);
                self.unpolled_count += 1;
            }
        }
        waiters
    }

    /// Leaves the waiting list (the caller's slot of the current generation). No stream
    /// refers to a slot of this generation once none is `Some`, so the list can be emptied
    /// without starting a new generation.
    fn leave_waiters(&mut self, slot: usize) {
        if self.waiters[slot].take().is_some() {
            self.live_waiters -= 1;
            if self.live_waiters == 0 {
                self.waiters.clear();
            }
        }
    }

    /// Marks `slot` of the latest round as polled (or gone); returns how many older members
    /// of the round are still unpolled.
    fn mark_polled(&mut self, slot: usize) -> usize {
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if self.unpolled[word] & bit != 0 {
            self.unpolled[word] &= !bit;
            self.unpolled_count -= 1;
        }
        let whole: u32 = self.unpolled[..word].iter().map(|w| w.count_ones()).sum();
        whole as usize + (self.unpolled[word] & (bit - 1)).count_ones() as usize
    }
}

fn wake_all(waiters: Vec<Option<Waker>>) {
    // A panicking waker must not keep the streams after it asleep (or unwind into the
    // task that returned a buffer).
    for waker in waiters.into_iter().flatten() {
        crate::backend::wake::wake_contained(waker);
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("buffers", &self.buffers)
            .field("buffer_size", &self.buffer_size)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(
        buffers: u32,
        buffer_size: usize,
        events: broadcast::Sender<Event>,
        event_interval: Duration,
    ) -> io::Result<Pool> {
        let pool_bytes = pool_memory_needed(buffers, buffer_size)?;
        // The pool is populated up front (MAP_POPULATE does not fail when memory runs out, the
        // OOM killer acts instead), so check that it can be, and say so if not.
        if let Some(available) = available_memory() {
            if pool_bytes > available {
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!(
                        "a copy pool of {buffers} buffers of {buffer_size} bytes needs {} of \
                         memory, but only {} is available; pass fewer or smaller buffers to \
                         Builder::copy_pool (the default is 64 of 64 KiB)",
                        human_bytes(pool_bytes),
                        human_bytes(available)
                    ),
                ));
            }
        }
        let mut free = Vec::new();
        free.try_reserve_exact(buffers as usize).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "cannot allocate the free list of a copy pool of {buffers} buffers; pass \
                     fewer buffers to Builder::copy_pool"
                ),
            )
        })?;
        free.extend((0..buffers).rev());
        let memory = Mapping::new(buffers as usize * buffer_size, false).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mapping a copy pool of {buffers} buffers of {buffer_size} bytes ({} in \
                     all) failed ({e}); pass fewer or smaller buffers to Builder::copy_pool, or \
                     raise the limit that refused it (RLIMIT_AS, RLIMIT_DATA)",
                    human_bytes(pool_bytes)
                ),
            )
        })?;
        Ok(Pool {
            memory,
            buffers,
            buffer_size,
            state: Mutex::new(PoolState {
                free,
                waiters: Vec::new(),
                live_waiters: 0,
                generation: 0,
                unpolled: Vec::new(),
                unpolled_count: 0,
            }),
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            events,
            last_event: AtomicU64::new(u64::MAX),
            event_interval,
            epoch: Instant::now(),
            closed: AtomicBool::new(false),
            sockets: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// Puts a buffer back (unused, or dropped by its `ZcBuf`) and wakes the waiting streams.
    pub(crate) fn release(&self, index: u32) {
        let waiters = {
            let mut state = self.lock_state();
            state.free.push(index);
            state.take_waiters()
        };
        wake_all(waiters);
    }

    /// Hands out pool buffer `index` (taken off the free list) holding `len` copied bytes;
    /// it comes back to the pool when dropped.
    fn buffer(pool: &Arc<Pool>, index: u32, len: u32) -> ZcBuf {
        let ptr = pool.buffer_ptr(index);
        let slot = BufferSlot {
            offset: index.into(),
            len,
        };
        let owner = NonNull::from(&**pool).cast::<()>();
        // Held by the buffer, released by `POOL_BUFFERS`.
        std::mem::forget(Arc::clone(pool));
        // SAFETY: the buffer is off the free list, so nobody writes it until the buffer is
        // released (`release_delivered`), and it lies inside the mapping, which the strong
        // reference just leaked keeps alive; the pool is `Sync`, so `POOL_BUFFERS` may run on
        // any thread. The buffer takes over the one release owed for `index`.
        unsafe { ZcBuf::from_raw_parts(ptr, slot, owner, &POOL_BUFFERS) }
    }

    fn release_delivered(&self, index: u32) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.release(index);
    }

    fn buffer_ptr(&self, index: u32) -> *mut u8 {
        // SAFETY: `index` comes from the free list, so it is below the buffer count and the
        // buffer lies inside the mapping.
        unsafe { self.memory.as_ptr().add(index as usize * self.buffer_size) }
    }

    fn on_copied(&self, len: usize) {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        // At most one CopyFallback event per interval, like re-armed kernel events.
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.last_event.load(Ordering::Relaxed);
        let due =
            last == u64::MAX || now.saturating_sub(last) >= self.event_interval.as_nanos() as u64;
        if due
            && self
                .last_event
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self.events.send(Event {
                kind: EventKind::CopyFallback,
                stats: self.stats(),
            });
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let chunks = self.chunks.load(Ordering::Relaxed);
        Stats {
            copy_count: Some(chunks),
            copy_bytes: Some(bytes),
            bytes,
            chunks,
            buffers_outstanding: self.outstanding.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }
}

/// The memory a pool of `buffers` buffers of `buffer_size` bytes takes: the buffers (whole
/// pages, as mapped) and the free list. An error if it does not fit the address space.
fn pool_memory_needed(buffers: u32, buffer_size: usize) -> io::Result<usize> {
    let page = crate::sys::page_size();
    (buffers as usize)
        .checked_mul(buffer_size)
        .and_then(|bytes| bytes.checked_next_multiple_of(page))
        .and_then(|bytes| bytes.checked_add(buffers as usize * size_of::<u32>()))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "a copy pool of {buffers} buffers of {buffer_size} bytes is larger than the \
                     address space; pass fewer or smaller buffers to Builder::copy_pool"
                ),
            )
        })
}

/// Memory this process can populate without swapping or meeting the OOM killer: the
/// kernel's `MemAvailable`, lowered to what the process's cgroup (v2) still allows. `None`
/// when neither can be read (no check then; the mapping itself still fails if the kernel
/// refuses it).
fn available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
    let cgroup = cgroup_memory_headroom();
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `memory.max - memory.current` of this process's cgroup v2, if it has a limit.
fn cgroup_memory_headroom() -> Option<usize> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: usize = read("memory.max")?.trim().parse().ok()?; // "max" (no limit) fails here
    let current: usize = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
    }
}

/// One connection read in copy mode.
#[derive(Debug)]
pub(crate) struct CopyStream {
    id: u64,
    socket: OwnedReadHalf,
    pool: Arc<Pool>,
    read_limit: Option<u32>,
    /// Where this stream's waker sits in the pool's waiting list: the list's generation and
    /// the slot. Stale once the generation moved on (the stream was woken).
    waiting: Option<(u64, usize)>,
    /// The last poll deferred a free buffer to streams woken before it (see [`PoolState`]);
    /// this poll takes it.
    deferred: bool,
    done: bool,
}

/// What a poll got from the pool.
enum Take {
    Buffer(u32),
    /// No buffer now; the stream's waker is registered (or it yields once).
    Pending,
    Closed,
}

impl CopyStream {
    pub(crate) fn new(socket: OwnedReadHalf, pool: Arc<Pool>, read_limit: Option<u32>) -> Self {
        let id = pool.next_stream.fetch_add(1, Ordering::Relaxed);
        lock(&pool.sockets).insert(id, socket.as_ref().as_raw_fd());
        CopyStream {
            id,
            socket,
            pool,
            read_limit,
            waiting: None,
            deferred: false,
            done: false,
        }
    }

    fn shut_down_error(&mut self) -> Poll<Option<io::Result<ZcBuf>>> {
        self.done = true;
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the tokio-zcrx runtime was shut down",
        ))))
    }

    /// Takes a free buffer, or registers to be woken when one is returned.
    fn take_buffer(&mut self, cx: &mut Context<'_>) -> Take {
        let mut state = self.pool.lock_state();
        if self.pool.closed.load(Ordering::Relaxed) {
            return Take::Closed;
        }
        // The round members older than this stream that have not been polled since they
        // were woken; a stream that is not in the latest round counts as the youngest.
        let mut older_unpolled = state.unpolled_count;
        if let Some((generation, slot)) = self.waiting {
            if generation == state.generation {
                // Still in the list (polled for another reason): the slot is kept while the
                // pool is empty and cleared when a buffer is taken.
                if state.free.is_empty() {
                    let entry = &mut state.waiters[slot];
                    if !entry.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *entry = Some(cx.waker().clone());
                    }
                    return Take::Pending;
                }
                state.leave_waiters(slot);
            } else if generation + 1 == state.generation {
                older_unpolled = state.mark_polled(slot);
            }
            self.waiting = None;
        }
        let free = state.free.len();
        if free == 0 {
            self.deferred = false;
            self.waiting = Some((state.generation, state.waiters.len()));
            state.waiters.push(Some(cx.waker().clone()));
            state.live_waiters += 1;
            return Take::Pending;
        }
        if !self.deferred && free <= older_unpolled {
            self.deferred = true;
            // Not under the pool's lock: a waker may poll or drop a buffer inline.
            drop(state);
            cx.waker().wake_by_ref();
            return Take::Pending;
        }
        self.deferred = false;
        Take::Buffer(state.free.pop().expect("checked that a buffer is free"))
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.pool.closed.load(Ordering::Relaxed) {
            return self.shut_down_error();
        }
        loop {
            // Readiness first: a connection with nothing to read holds no buffer.
            if let Err(e) = std::task::ready!(self.socket.as_ref().poll_read_ready(cx)) {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
            let index = match self.take_buffer(cx) {
                Take::Buffer(index) => index,
                Take::Pending => return Poll::Pending,
                Take::Closed => return self.shut_down_error(),
            };
            let limit = self.read_limit.map_or(self.pool.buffer_size, |l| {
                (l as usize).min(self.pool.buffer_size)
            });
            // SAFETY: the buffer came off the free list, so nothing else reads or writes it
            // until it is released; it lies inside the pool's mapping.
            let buffer =
                unsafe { std::slice::from_raw_parts_mut(self.pool.buffer_ptr(index), limit) };
            match self.socket.as_ref().try_read(buffer) {
                Ok(0) => {
                    self.pool.release(index);
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(n) => {
                    self.pool.on_copied(n);
                    let buf = Pool::buffer(&self.pool, index, n as u32);
                    return Poll::Ready(Some(Ok(buf)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Spurious readiness (cleared by try_read): give the buffer back, wait again.
                    self.pool.release(index);
                }
                Err(e) => {
                    self.pool.release(index);
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl CopyStream {
    /// Stops being a stream and gives the socket's read half back (for
    /// `ZcConnection::into_tcp_stream`). Nothing is buffered here: every byte read from the
    /// socket was handed out.
    pub(crate) fn into_read_half(self) -> OwnedReadHalf {
        let mut stream = std::mem::ManuallyDrop::new(self);
        stream.leave_pool();
        // SAFETY: `stream` is never used or dropped again, so each field that needs a drop
        // is moved out exactly once: the socket to the caller, the pool reference here.
        unsafe {
            drop(std::ptr::read(&stream.pool));
            std::ptr::read(&stream.socket)
        }
    }

    /// What a stream going away owes the pool: its place among the waiters, and its entry
    /// among the sockets shutdown reaches.
    fn leave_pool(&mut self) {
        if let Some((generation, slot)) = self.waiting.take() {
            let mut state = self.pool.lock_state();
            if generation == state.generation {
                // Still waiting: leave the list without a waker to wake.
                state.leave_waiters(slot);
            } else if generation + 1 == state.generation {
                // Woken by the latest return but never polled: nobody should defer to it.
                state.mark_polled(slot);
            }
        }
        // Under the lock, so shutdown never touches a descriptor that was closed (and maybe
        // reused) after this point.
        lock(&self.pool.sockets).remove(&self.id);
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        self.leave_pool();
    }
}

/// The copy-mode runtime: a pool and an event channel, no thread.
#[derive(Debug)]
pub(crate) struct CopyRuntime {
    pub(crate) pool: Arc<Pool>,
    pub(crate) events: broadcast::Sender<Event>,
}

impl CopyRuntime {
    pub(crate) fn new(config: &CopyConfig) -> io::Result<CopyRuntime> {
        let events = broadcast::channel(1024).0;
        let pool = Pool::new(
            config.buffers,
            config.buffer_size,
            events.clone(),
            config.event_interval,
        )?;
        Ok(CopyRuntime {
            pool: Arc::new(pool),
            events,
        })
    }

    pub(crate) fn stats(&self) -> Stats {
        self.pool.stats()
    }

    /// Splits a connected socket: reads through the pool, writes straight to Tokio.
    pub(crate) fn attach(
        &self,
        socket: tokio::net::TcpStream,
        options: StreamOptions,
    ) -> (CopyStream, ZcWriteHalf) {
        let (read_half, write_half) = socket.into_split();
        let stream = CopyStream::new(read_half, Arc::clone(&self.pool), options.read_limit);
        (stream, ZcWriteHalf::tokio(write_half))
    }

    pub(crate) fn description(&self) -> String {
        format!(
            "copy mode ({} buffers of {} bytes)",
            self.pool.buffers, self.pool.buffer_size
        )
    }

    pub(crate) fn check_running(&self) -> Result<(), Error> {
        if self.pool.closed.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::RuntimeGone,
                "the tokio-zcrx runtime has been shut down",
            ));
        }
        Ok(())
    }

    /// Ends every stream: each sees an error at its next poll, and shutting down the read
    /// side of its socket makes that poll happen now.
    ///
    /// Streams waiting for readiness are woken by the shutdown of their socket's read side;
    /// streams waiting for a buffer are woken here. Both locks are held while `closed` is set,
    /// so a stream attached or starting to wait concurrently either is woken here or sees
    /// `closed` at its next poll. Buffers still held stay valid (each holds the pool) and
    /// return to the free list as usual.
    pub(crate) fn shut_down(&self) {
        let sockets = lock(&self.pool.sockets);
        let waiters = {
            let mut state = self.pool.lock_state();
            self.pool.closed.store(true, Ordering::Relaxed);
            state.take_waiters()
        };
        for &fd in sockets.values() {
            // SAFETY: the fd belongs to a live CopyStream (entries are removed under this lock
            // before the socket closes); shutdown(2) does not close or free it.
            // A socket that is already shut down or disconnected answers ENOTCONN: its
            // reader ends either way, so the result is not needed.
            let _ = unsafe { syscall!(shutdown(fd, libc::SHUT_RD)) };
        }
        drop(sockets);
        wake_all(waiters);
    }
}

#[cfg(test)]
mod waiting_list_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A connection with a byte to read, whose stream waits for a buffer of the empty pool.
    async fn waiting_stream(
        listener: &tokio::net::TcpListener,
        pool: &Arc<Pool>,
    ) -> (CopyStream, tokio::net::TcpStream) {
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(b"x").await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        socket.readable().await.unwrap();
        let (read, _write) = socket.into_split();
        let mut stream = CopyStream::new(read, Arc::clone(pool), None);
        assert!(stream
            .poll_next(&mut Context::from_waker(Waker::noop()))
            .is_pending());
        (stream, client)
    }

    /// While the pool is empty, streams that start waiting and are dropped (clients that
    /// time out, resets) must not grow the waiting list: it used to keep one dead slot per
    /// such stream until the next buffer came back (found in review).
    #[tokio::test]
    async fn streams_dropped_while_waiting_do_not_grow_the_waiting_list() {
        let (events, _) = broadcast::channel(16);
        let pool = Arc::new(Pool::new(1, 4096, events, Duration::from_secs(1)).unwrap());
        let held = pool.lock_state().free.pop().expect("one buffer");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut survivor = None;
        for i in 0..500 {
            let (stream, client) = waiting_stream(&listener, &pool).await;
            if i == 0 {
                // One stream keeps waiting throughout: the list may hold it and what came
                // after it, but shrinks to nothing once it goes too.
                survivor = Some((stream, client));
            }
        }
        let len = pool.lock_state().waiters.len();
        assert!(len <= 500, "{len}");
        drop(survivor);
        assert_eq!(pool.lock_state().waiters.len(), 0, "dead slots left behind");
        for _ in 0..500 {
            let (stream, client) = waiting_stream(&listener, &pool).await;
            drop((stream, client));
            assert_eq!(pool.lock_state().waiters.len(), 0);
        }
        pool.release(held);
        assert_eq!(pool.lock_state().free.len(), 1);
    }
}
