//! The copy pool: a bounded, pre-allocated mapping of equal buffers, their free list, the
//! streams waiting for one, and how a [`ZcBuf`] made from a pool buffer goes back.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::buf::{BufferOwnerVtable, BufferSlot, ZcBuf};
use crate::event::{Event, EventKind, Stats};
use crate::sys::lock;
use crate::sys::mem::Mapping;

/// Buffers of the copy pool, LIFO: the most recently returned buffer is reused first, while
/// it is still in the CPU cache.
pub(crate) struct Pool {
    memory: Mapping,
    /// The number of buffers (the mapping is rounded up to whole pages, so it may hold room
    /// for more).
    pub(super) buffers: u32,
    pub(super) buffer_size: usize,
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
    pub(super) closed: AtomicBool,
    /// Open copy-mode sockets by stream id, so shutdown can wake every stream (it shuts down
    /// their read side, which makes them readable). Touched on attach and drop only.
    pub(super) sockets: Mutex<HashMap<u64, RawFd>>,
    pub(super) next_stream: AtomicU64,
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
pub(super) struct PoolState {
    /// Indices of free buffers, most recently returned last.
    pub(super) free: Vec<u32>,
    /// Waiting streams' wakers in the order they started waiting; a stream that is dropped
    /// (or takes a buffer) clears its slot. All are woken and the list is emptied at once.
    pub(super) waiters: Vec<Option<Waker>>,
    /// The `Some` entries of `waiters`. When the last one goes, the list is emptied, so
    /// streams that wait and are dropped while no buffer comes back cannot grow it.
    pub(super) live_waiters: usize,
    /// Counts the times `waiters` was emptied, so a stream can tell whether its slot is
    /// still in the list (same generation) or in the latest round (the one before).
    pub(super) generation: u64,
    /// The latest round: one bit per slot of the emptied list, set while that stream has not
    /// been polled since it was woken.
    unpolled: Vec<u64>,
    pub(super) unpolled_count: usize,
}

impl PoolState {
    /// Empties the waiting list into a new round; the caller wakes the returned wakers
    /// after unlocking. Without waiters the current round stays.
    pub(super) fn take_waiters(&mut self) -> Vec<Option<Waker>> {
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
    pub(super) fn leave_waiters(&mut self, slot: usize) {
        if self.waiters[slot].take().is_some() {
            self.live_waiters -= 1;
            if self.live_waiters == 0 {
                self.waiters.clear();
            }
        }
    }

    /// Marks `slot` of the latest round as polled (or gone); returns how many older members
    /// of the round are still unpolled.
    pub(super) fn mark_polled(&mut self, slot: usize) -> usize {
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if self.unpolled[word] & bit != 0 {
            self.unpolled[word] &= !bit;
            self.unpolled_count -= 1;
        }
        let whole: u32 = self.unpolled[..word].iter().map(|w| w.count_ones()).sum();
        whole as usize + (self.unpolled[word] & (bit - 1)).count_ones() as usize
    }
}

pub(super) fn wake_all(waiters: Vec<Option<Waker>>) {
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

    pub(super) fn lock_state(&self) -> std::sync::MutexGuard<'_, PoolState> {
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
    pub(super) fn buffer(pool: &Arc<Pool>, index: u32, len: u32) -> ZcBuf {
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

    pub(super) fn buffer_ptr(&self, index: u32) -> *mut u8 {
        // SAFETY: `index` comes from the free list, so it is below the buffer count and the
        // buffer lies inside the mapping.
        unsafe { self.memory.as_ptr().add(index as usize * self.buffer_size) }
    }

    pub(super) fn on_copied(&self, len: usize) {
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
            memory_capacity: self.memory.len() as u64,
            // Whole buffers, as the area counts whole chunks.
            memory_held: self.outstanding.load(Ordering::Relaxed) * self.buffer_size as u64,
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
