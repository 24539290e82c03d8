//! The copy pool: a recycled set of buffers (pre-allocated at the largest size, recycled
//! per size below it), elastic up to a memory cap, the streams waiting at that cap, and how a
//! [`ZcBuf`] made from a pool buffer goes back (crediting the stream that held it).

use std::alloc::Layout;
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::broadcast;
use zcrx_core::budget::BudgetPolicy;

use crate::buf::{BufferOwnerVtable, BufferSlot, ZcBuf};
use crate::config::CopyConfig;
use crate::event::{Event, EventKind, Stats};
use crate::sys::mem::Mapping;
use crate::sys::{clock_ns, clock_resolution_ns, lock};

/// The default memory cap, lowered to a quarter of the available memory where that is less.
const DEFAULT_MEMORY_LIMIT: u64 = 256 << 20;
/// The smallest read size class.
const SMALLEST_CLASS: usize = 4096;
/// Heap buffers are aligned to this, so the low bits of their address carry the size class.
const HEAP_ALIGN: usize = 64;
/// The class tag of a buffer of the pre-allocated mapping (the offset then holds its index).
const MAPPED_TAG: u64 = HEAP_ALIGN as u64 - 1;
/// At most one `StreamPaused` event per this interval.
const PAUSE_EVENT_INTERVAL: Duration = Duration::from_millis(100);
/// At most one `MemoryHighWater` event per this interval.
const HIGH_WATER_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The copy pool. Buffers come in size classes (powers of two from 4 KiB up to, and then
/// exactly, `buffer_size`); a stream asks for the class its recent reads call for.
///
/// Memory: `buffers` buffers of the largest class are mapped up front (the recycled set
/// that stays in the CPU cache, LIFO: the most recently returned is reused first); smaller
/// classes are allocated on demand and up to `buffers` of each are kept when returned. When
/// those are all out, buffers are allocated from the heap and freed when they come back.
/// Only the cap (`capacity`) on the bytes handed out at once makes a stream wait.
pub(crate) struct Pool {
    memory: Mapping,
    /// The number of mapped buffers (the mapping is rounded up to whole pages, so it may hold
    /// room for more), and of recycled buffers kept per smaller class.
    pub(super) buffers: u32,
    pub(super) buffer_size: usize,
    /// The read size classes in bytes, ascending; the last is `buffer_size`.
    pub(super) classes: Vec<usize>,
    /// The most bytes handed out at once (buffers held or being read into).
    pub(super) capacity: u64,
    /// Bytes handed out now (whole buffers of their class). Raised under the `state` lock
    /// only (so a stream that finds no room registers before anyone can miss it), lowered
    /// by returns outside it.
    held: AtomicU64,
    /// Free buffers and the streams waiting for room, under one lock so that a return never
    /// misses a stream that is about to wait.
    state: Mutex<PoolState>,
    bytes: AtomicU64,
    chunks: AtomicU64,
    /// Buffers dropped; `chunks - released` are outstanding (one counter per buffer each way
    /// instead of two on the way out).
    released: AtomicU64,
    /// Taken at shutdown, so that subscribers see the channel close.
    events: Mutex<Option<broadcast::Sender<Event>>>,
    /// When the last copy event went out (`CLOCK_MONOTONIC` nanoseconds; `u64::MAX`: never).
    last_event: AtomicU64,
    event_interval: Duration,
    /// The resolution of `CLOCK_MONOTONIC_COARSE` (one tick), `u64::MAX` if unknown.
    coarse_resolution: u64,
    /// When the last `StreamPaused` and `MemoryHighWater` events went out (as `last_event`).
    last_pause_event: AtomicU64,
    last_high_water_event: AtomicU64,
    /// A `MemoryHighWater` event may go out (set again once the holding fell below half).
    high_water_armed: AtomicBool,
    stream_pauses: AtomicU64,
    streams_paused: AtomicU64,
    /// Open copy streams, for the derived budget.
    pub(super) live_streams: AtomicUsize,
    /// How budgets are derived when not fixed (the cap shared out in `buffer_size` units).
    pub(super) budget_policy: BudgetPolicy,
    /// `Builder::stream_budget`, when fixed.
    pub(super) stream_budget: Option<u64>,
    /// Set by `Zcrx::shutdown` (under the `state` and `sockets` locks): streams end with an
    /// error at their next poll.
    pub(super) closed: AtomicBool,
    /// Open copy-mode streams by id, so shutdown can wake every stream (it shuts down their
    /// read side, which makes them readable, and wakes those paused by their budget), and
    /// statistics can find the largest holding. Touched on attach and drop only.
    pub(super) sockets: Mutex<HashMap<u64, Arc<StreamShare>>>,
    pub(super) next_stream: AtomicU64,
}

/// A pool buffer handed out for a read: where it is, its class, and whether it is one of
/// the mapped recycled set (by index) or a heap allocation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    pub(super) ptr: *mut u8,
    pub(super) class: u8,
    /// The index in the mapping, or `None` for a heap buffer.
    pub(super) mapped: Option<u32>,
}

impl Block {
    /// A placeholder for arrays of blocks to be filled.
    pub(super) const EMPTY: Block = Block {
        ptr: std::ptr::null_mut(),
        class: 0,
        mapped: None,
    };

    /// The slot offset a `ZcBuf` carries: the mapped index or the heap address, and the class
    /// in the low bits.
    fn encode(self) -> u64 {
        match self.mapped {
            Some(index) => (u64::from(index) * HEAP_ALIGN as u64) | MAPPED_TAG,
            None => self.ptr as u64 | u64::from(self.class),
        }
    }

    fn decode(pool: &Pool, offset: u64) -> Block {
        let tag = offset % HEAP_ALIGN as u64;
        if tag == MAPPED_TAG {
            let index = (offset / HEAP_ALIGN as u64) as u32;
            Block {
                ptr: pool.mapped_ptr(index),
                class: (pool.classes.len() - 1) as u8,
                mapped: Some(index),
            }
        } else {
            Block {
                ptr: (offset - tag) as *mut u8,
                class: tag as u8,
                mapped: None,
            }
        }
    }
}

/// What one copy stream shares with the buffers it handed out: the owner of its
/// [`ZcBuf`]s. A buffer's release credits the stream's holding and wakes the stream when it
/// was paused by its budget and may read again.
pub(crate) struct StreamShare {
    pub(super) pool: Arc<Pool>,
    pub(super) fd: RawFd,
    /// Bytes delivered in this stream's buffers and not yet dropped (what its budget counts:
    /// the bytes it was handed, not the size class they were read into, so that a read limit
    /// or small messages do not pause a stream that holds little data; the pool's cap bounds
    /// the memory).
    pub(super) held: AtomicU64,
    /// The stream is paused by its budget, until `held <= resume_at` (below its high mark:
    /// see `CopyStream::budget_allows`).
    pub(super) paused: AtomicBool,
    pub(super) resume_at: AtomicU64,
    /// The paused stream's waker.
    pub(super) waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for StreamShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamShare")
            .field("held", &self.held.load(Ordering::Relaxed))
            .field("paused", &self.paused.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StreamShare {
    /// Wakes the stream if it is paused (shutdown).
    pub(super) fn wake(&self) {
        if let Some(waker) = lock(&self.waker).take() {
            crate::backend::wake::wake_contained(waker);
        }
    }

    /// Takes back one of this stream's buffers, holding `len` bytes: to the pool, and off
    /// the stream's holding.
    fn release(&self, block: Block, len: u32) {
        // Release: a statistics reader that sees this sees the handout counted in `chunks`.
        self.pool.released.fetch_add(1, Ordering::Release);
        self.pool.give_back(block);
        self.credit(u64::from(len));
    }

    /// Takes back several of this stream's buffers at once (a batch returned whole): to
    /// the pool under one lock, off the stream's holding in one step.
    fn release_many(&self, slots: &[BufferSlot]) {
        self.pool
            .released
            .fetch_add(slots.len() as u64, Ordering::Release);
        self.pool.give_back_many(slots);
        self.credit(slots.iter().map(|slot| u64::from(slot.len)).sum());
    }

    /// `bytes` off the stream's holding; wakes it if that lets it resume.
    fn credit(&self, bytes: u64) {
        // SeqCst pairs with `CopyStream::pause`: either the stream sees this credit when it
        // checks its holding after pausing, or this sees `paused` and wakes it.
        let now = self.held.fetch_sub(bytes, Ordering::SeqCst) - bytes;
        if self.paused.load(Ordering::SeqCst) && now <= self.resume_at.load(Ordering::SeqCst) {
            self.wake();
        }
    }
}

/// How pool buffers go back: the owner pointer is the stream's [`StreamShare`], and each
/// buffer holds one strong reference of its `Arc`; the slot's offset is [`Block::encode`].
static POOL_BUFFERS: BufferOwnerVtable = BufferOwnerVtable {
    release_one: release_pool_buffer,
    release_run: release_pool_buffers,
    debug_fields: |debug, slot| {
        debug.field("pool_buffer", &format_args!("{:#x}", slot.offset));
    },
};

/// `release_one` of [`POOL_BUFFERS`].
///
/// # Safety
///
/// As `BufferOwnerVtable::release_one`: `owner` is the `StreamShare` of a live buffer made by
/// [`Pool::buffer`], whose buffer and strong reference the caller gives up.
unsafe fn release_pool_buffer(owner: NonNull<()>, slot: BufferSlot) {
    // SAFETY: the strong reference `Pool::buffer` leaked for this buffer, taken back once.
    let share = unsafe { Arc::from_raw(owner.cast::<StreamShare>().as_ptr()) };
    let block = Block::decode(&share.pool, slot.offset);
    share.release(block, slot.len);
}

/// `release_run` of [`POOL_BUFFERS`]: as dropping each would, with one pool lock and one
/// credit of the stream's holding for the run.
///
/// # Safety
///
/// As `BufferOwnerVtable::release_run`: every slot is that of a live buffer of the
/// `StreamShare` at `owner`, made by [`Pool::buffer`], which the caller gives up.
unsafe fn release_pool_buffers(owner: NonNull<()>, slots: &[BufferSlot]) {
    let Some(last) = slots.len().checked_sub(1) else {
        return;
    };
    let share = owner.cast::<StreamShare>().as_ptr();
    for _ in 0..last {
        // SAFETY: each buffer holds one strong reference (leaked by `Pool::buffer`) and the
        // run's buffers are given up, so their references are released here: all but one
        // now (the one left keeps the share alive for the release below)...
        unsafe { Arc::decrement_strong_count(share) };
    }
    // SAFETY: ... and the last one taken back, once, and dropped after the release.
    let share = unsafe { Arc::from_raw(share) };
    share.release_many(slots);
}

/// How room under the cap reaches waiting streams.
///
/// Room freed by a return is never reserved for a particular stream: a stream that waited
/// once and is then no longer polled (a `select!` that moved on, a task applying
/// backpressure) must not hold up memory that a readable, polled connection could use, and a
/// stream cannot tell us that it is no longer polled. So a return wakes *every* waiting
/// stream and the room goes to one that is polled; the others find the cap reached and wait
/// again. Each registration is woken once, so the extra polls are bounded by the number of
/// waits.
///
/// Fairness: the woken streams run in whatever order the scheduler picks (Tokio runs the
/// last one woken first), and a stream that did not wait, typically the task that returned
/// the buffer and polls again at once, would otherwise take it back before any of them runs.
/// So the streams woken by the latest return (the round) keep their waiting order: a stream
/// takes room only if more smallest-class buffers fit than older round members that have not
/// been polled since they were woken (a stream that did not wait counts as the youngest).
/// Otherwise it *defers* once: it yields instead of waiting, and takes the room on its next
/// poll if it is still there. A deferral is a yield, not a wait, so free room never waits for
/// a stream that is not polled, and waiting streams are served about in order.
#[derive(Debug)]
pub(super) struct PoolState {
    /// Indices of free mapped buffers, most recently returned last.
    pub(super) free: Vec<u32>,
    /// Free heap buffers of each class below the largest (addresses), at most `buffers` each.
    recycled: Vec<Vec<usize>>,
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
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// The read size classes for buffers of at most `buffer_size` bytes: 4 KiB, 8 KiB, ... below
/// it, then `buffer_size` itself.
fn size_classes(buffer_size: usize) -> Vec<usize> {
    let mut classes = Vec::new();
    let mut size = SMALLEST_CLASS;
    while size < buffer_size {
        classes.push(size);
        size *= 2;
    }
    classes.push(buffer_size);
    classes
}

/// The default memory cap: 256 MiB, or a quarter of the memory available to the process
/// where that is less; never less than the recycled set (which is allocated anyway).
fn default_memory_limit(recycled: u64) -> u64 {
    let quarter = available_memory().map_or(u64::MAX, |bytes| bytes as u64 / 4);
    DEFAULT_MEMORY_LIMIT.min(quarter).max(recycled)
}

/// What a stream got when it asked for room.
pub(super) enum Take {
    /// A buffer, and how many extra ones were reserved with it.
    Buffer(Block, usize),
    /// No room now; the stream's waker is registered (or it yields once).
    Pending,
    Closed,
    /// The heap refused the allocation.
    Failed(io::Error),
}

impl Pool {
    pub(crate) fn new(config: &CopyConfig, events: broadcast::Sender<Event>) -> io::Result<Pool> {
        let (buffers, buffer_size) = (config.buffers, config.buffer_size);
        let pool_bytes = pool_memory_needed(buffers, buffer_size)?;
        // The recycled set is populated up front (MAP_POPULATE does not fail when memory runs
        // out, the OOM killer acts instead), so check that it can be, and say so if not.
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
        let classes = size_classes(buffer_size);
        let recycled_bytes = u64::from(buffers) * buffer_size as u64;
        let capacity = config
            .memory_limit
            .unwrap_or_else(|| default_memory_limit(recycled_bytes));
        Ok(Pool {
            memory,
            buffers,
            buffer_size,
            capacity,
            held: AtomicU64::new(0),
            state: Mutex::new(PoolState {
                free,
                recycled: vec![Vec::new(); classes.len() - 1],
                waiters: Vec::new(),
                live_waiters: 0,
                generation: 0,
                unpolled: Vec::new(),
                unpolled_count: 0,
            }),
            classes,
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            released: AtomicU64::new(0),
            events: Mutex::new(Some(events)),
            last_event: AtomicU64::new(u64::MAX),
            event_interval: config.event_interval,
            coarse_resolution: clock_resolution_ns(libc::CLOCK_MONOTONIC_COARSE)
                .unwrap_or(u64::MAX),
            last_pause_event: AtomicU64::new(u64::MAX),
            last_high_water_event: AtomicU64::new(u64::MAX),
            high_water_armed: AtomicBool::new(true),
            stream_pauses: AtomicU64::new(0),
            streams_paused: AtomicU64::new(0),
            live_streams: AtomicUsize::new(0),
            budget_policy: BudgetPolicy::new(capacity, buffer_size as u64),
            stream_budget: config.stream_budget,
            closed: AtomicBool::new(false),
            sockets: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
        })
    }

    pub(super) fn lock_state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// Bytes handed out now.
    pub(super) fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// How many buffers of `class` still fit under the cap: the "free buffers" the waiting
    /// list's fairness counts. A stream waits for room for the size it asked for (a smaller
    /// buffer would read less than its reads call for, and at the cap it is the holders'
    /// returns, not a smaller read, that make progress).
    pub(super) fn room_units(&self, class: usize) -> usize {
        let room = self.capacity.saturating_sub(self.held());
        (room / self.classes[class] as u64).min(usize::MAX as u64) as usize
    }

    /// Whether a buffer of `class` fits under the cap: `room_units(class) > 0` without the
    /// division, for the check every read makes.
    pub(super) fn fits(&self, class: usize) -> bool {
        self.capacity.saturating_sub(self.held()) >= self.classes[class] as u64
    }

    /// Reserves room for a buffer of `class` (the caller checked that it fits), and takes its
    /// memory from the recycled set if it has one. Under the state lock.
    pub(super) fn reserve(&self, state: &mut PoolState, class: usize) -> Option<Block> {
        let size = self.classes[class] as u64;
        self.held.fetch_add(size, Ordering::SeqCst);
        let top = self.classes.len() - 1;
        if class == top {
            state.free.pop().map(|index| Block {
                ptr: self.mapped_ptr(index),
                class: class as u8,
                mapped: Some(index),
            })
        } else {
            state.recycled[class].pop().map(|address| Block {
                ptr: address as *mut u8,
                class: class as u8,
                mapped: None,
            })
        }
    }

    /// Reserves up to `out.len()` more buffers of the largest class for a read that already
    /// has one (several buffers filled by one system call), only from the recycled mapped
    /// set (never allocating), only while no stream waits for room or is owed it, and only
    /// while the pool holds at most half its cap afterwards: reading ahead this way never
    /// makes another stream wait. Returns how many it reserved. Under the state lock.
    pub(super) fn reserve_extra(&self, state: &mut PoolState, out: &mut [Block]) -> usize {
        if !state.waiters.is_empty() || state.unpolled_count > 0 {
            return 0;
        }
        let class = self.classes.len() - 1;
        let size = self.buffer_size as u64;
        let held = self.held();
        let mut count = 0;
        for slot in out.iter_mut() {
            if (held + (count as u64 + 1) * size) * 2 > self.capacity {
                break;
            }
            let Some(index) = state.free.pop() else {
                break;
            };
            *slot = Block {
                ptr: self.mapped_ptr(index),
                class: class as u8,
                mapped: Some(index),
            };
            count += 1;
        }
        // Raised under the lock, as `reserve` does.
        self.held.fetch_add(count as u64 * size, Ordering::SeqCst);
        count
    }

    /// Allocates a heap buffer of `class`, whose room is reserved; gives the room back if
    /// the heap refuses.
    pub(super) fn allocate(&self, class: usize) -> io::Result<Block> {
        let size = self.classes[class];
        let layout = Layout::from_size_align(size, HEAP_ALIGN).expect("a checked pool size");
        // SAFETY: the layout's size is at least 1 (validated buffer sizes are).
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            self.unreserve(size as u64);
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "allocating a copy buffer of {size} bytes failed; lower \
                     Builder::copy_memory_limit"
                ),
            ));
        }
        Ok(Block {
            ptr,
            class: class as u8,
            mapped: None,
        })
    }

    /// Gives back room for `size` bytes and wakes the streams waiting for it.
    fn unreserve(&self, size: u64) {
        let held = self.held.fetch_sub(size, Ordering::SeqCst) - size;
        self.rearm_high_water(held);
        let waiters = self.lock_state().take_waiters();
        wake_all(waiters);
    }

    /// Takes a buffer back (unused, or dropped by its `ZcBuf`): into the recycled set if it
    /// has room for it, freed otherwise; its room goes to the waiting streams.
    pub(super) fn give_back(&self, block: Block) {
        let class = block.class as usize;
        let size = self.classes[class];
        let waiters;
        let mut free_it = false;
        {
            let mut state = self.lock_state();
            match block.mapped {
                Some(index) => state.free.push(index),
                None if class + 1 < self.classes.len()
                    && state.recycled[class].len() < self.buffers as usize =>
                {
                    state.recycled[class].push(block.ptr as usize);
                }
                None => free_it = true,
            }
            // Lowered under the lock, where a stream that finds no room registers, so it
            // either sees this room or is among the waiters taken here.
            let held = self.held.fetch_sub(size as u64, Ordering::SeqCst) - size as u64;
            self.rearm_high_water(held);
            waiters = if state.waiters.is_empty() {
                Vec::new()
            } else {
                state.take_waiters()
            };
        }
        if free_it {
            // SAFETY: a heap block of this class, allocated by `allocate` with this layout,
            // given back once and no longer referenced.
            unsafe { dealloc(block.ptr, size) };
        }
        if !waiters.is_empty() {
            wake_all(waiters);
        }
    }

    /// [`give_back`](Pool::give_back) for the blocks of a run of buffers' slots, under one
    /// lock.
    fn give_back_many(&self, slots: &[BufferSlot]) {
        let mut total = 0u64;
        let mut heap_frees: [Option<Block>; 8] = [None; 8];
        let mut frees = 0;
        let waiters;
        {
            let mut state = self.lock_state();
            for slot in slots {
                let block = Block::decode(self, slot.offset);
                let class = block.class as usize;
                total += self.classes[class] as u64;
                match block.mapped {
                    Some(index) => state.free.push(index),
                    None if class + 1 < self.classes.len()
                        && state.recycled[class].len() < self.buffers as usize =>
                    {
                        state.recycled[class].push(block.ptr as usize);
                    }
                    // Freed after unlocking, a few at a time (rare: heap buffers beyond the
                    // recycled set).
                    None if frees < heap_frees.len() => {
                        heap_frees[frees] = Some(block);
                        frees += 1;
                    }
                    None => {
                        // SAFETY: as in `give_back`: a heap block of this class, given back
                        // once and no longer referenced.
                        unsafe { dealloc(block.ptr, self.classes[class]) };
                    }
                }
            }
            // Lowered under the lock, as in `give_back`.
            let held = self.held.fetch_sub(total, Ordering::SeqCst) - total;
            self.rearm_high_water(held);
            waiters = if state.waiters.is_empty() {
                Vec::new()
            } else {
                state.take_waiters()
            };
        }
        for block in heap_frees[..frees].iter().flatten() {
            // SAFETY: a heap block of its class, allocated by `allocate` with this layout,
            // given back once and no longer referenced.
            unsafe { dealloc(block.ptr, self.classes[block.class as usize]) };
        }
        if !waiters.is_empty() {
            wake_all(waiters);
        }
    }

    /// Hands out `block` holding `len` copied bytes, owned by `share` (the reading stream):
    /// it comes back to the pool, and off the stream's holding, when dropped.
    pub(super) fn buffer(&self, share: &Arc<StreamShare>, block: Block, len: u32) -> ZcBuf {
        self.on_copied(share, u64::from(len), 1);
        self.unaccounted_buffer(share, block, len)
    }

    /// [`buffer`](Pool::buffer) without counting it: for buffers counted together with
    /// [`on_copied`](Pool::on_copied) (those filled by one read).
    pub(super) fn unaccounted_buffer(
        &self,
        share: &Arc<StreamShare>,
        block: Block,
        len: u32,
    ) -> ZcBuf {
        let slot = BufferSlot {
            offset: block.encode(),
            len,
        };
        let owner = NonNull::from(&**share).cast::<()>();
        // Held by the buffer, released by `POOL_BUFFERS`.
        std::mem::forget(Arc::clone(share));
        // SAFETY: the block was reserved for this read, so nobody writes it until the buffer
        // is released (`StreamShare::release`), and it lies inside the mapping or its heap
        // allocation, which the strong reference just leaked keeps alive (the share holds the
        // pool); the share is `Sync`, so `POOL_BUFFERS` may run on any thread. The buffer
        // takes over the one release owed for `block`.
        unsafe { ZcBuf::from_raw_parts(block.ptr, slot, owner, &POOL_BUFFERS) }
    }

    fn mapped_ptr(&self, index: u32) -> *mut u8 {
        // SAFETY: `index` comes from the free list, so it is below the buffer count and the
        // buffer lies inside the mapping.
        unsafe { self.memory.as_ptr().add(index as usize * self.buffer_size) }
    }

    /// Counts `buffers` buffers of `bytes` in all handed out to `share`'s stream: its holding
    /// and the copy statistics.
    pub(super) fn on_copied(&self, share: &StreamShare, bytes: u64, buffers: u64) {
        share.held.fetch_add(bytes, Ordering::SeqCst);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.chunks.fetch_add(buffers, Ordering::Relaxed);
        // At most one CopyFallback event per interval, like re-armed kernel events.
        if self.due(&self.last_event, self.event_interval) {
            self.send(EventKind::CopyFallback);
        }
    }

    /// Whether an event rate-limited by `last` to one per `interval` may go out now; if so,
    /// `last` is now.
    fn due(&self, last: &AtomicU64, interval: Duration) -> bool {
        let interval = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        let before = last.load(Ordering::Relaxed);
        if before != u64::MAX {
            // Called for every buffer, and nearly always within the interval: the coarse
            // clock tells that for a third of the precise one's cost (11 ns against 32 ns
            // per read on the test machine). It lags the precise clock by at most its
            // resolution, so adding that keeps every "not yet" here true (a tick that comes
            // late can only delay an event); only a due event reads the precise clock, so
            // events never go out early.
            let coarse = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
            if coarse
                .saturating_add(self.coarse_resolution)
                .saturating_sub(before)
                < interval
            {
                return false;
            }
        }
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let due = before == u64::MAX || now.saturating_sub(before) >= interval;
        due && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn send(&self, kind: EventKind) {
        let stats = self.stats();
        if let Some(events) = &*lock(&self.events) {
            let _ = events.send(Event {
                queue: None,
                kind,
                stats,
            });
        }
    }

    /// A receiver of this pool's events; a closed one after [`Pool::close_events`].
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Event> {
        match &*lock(&self.events) {
            Some(events) => events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// No event goes out any more (shutdown): subscribers see the channel close once every
    /// other sender (a group's drivers) is gone too.
    pub(super) fn close_events(&self) {
        lock(&self.events).take();
    }

    /// After the holding fell to `held`: a `MemoryHighWater` event may go out again once it
    /// is below half the cap. (Stored only when it changes: every return comes here, and a
    /// store would take the cache line from the other cores each time.)
    fn rearm_high_water(&self, held: u64) {
        if u128::from(held) * 2 < u128::from(self.capacity)
            && !self.high_water_armed.load(Ordering::Relaxed)
        {
            self.high_water_armed.store(true, Ordering::Relaxed);
        }
    }

    /// After the holding rose to `held`: the high-water event, if due. Not under the state
    /// lock (the event's statistics take the sockets lock, which shutdown takes first).
    #[inline]
    pub(super) fn note_holding(&self, held: u64) {
        if u128::from(held) * 4 >= u128::from(self.capacity) * 3 {
            self.note_high_holding();
        }
    }

    #[cold]
    fn note_high_holding(&self) {
        if self.high_water_armed.load(Ordering::Relaxed)
            && self.due(&self.last_high_water_event, HIGH_WATER_EVENT_INTERVAL)
        {
            self.high_water_armed.store(false, Ordering::Relaxed);
            self.send(EventKind::MemoryHighWater);
        }
    }

    /// A stream paused by its budget: counted, and announced at most every 100 ms.
    pub(super) fn on_pause(&self) {
        self.stream_pauses.fetch_add(1, Ordering::Relaxed);
        self.streams_paused.fetch_add(1, Ordering::Relaxed);
        if self.due(&self.last_pause_event, PAUSE_EVENT_INTERVAL) {
            self.send(EventKind::StreamPaused);
        }
    }

    pub(super) fn on_resume(&self) {
        self.streams_paused.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> Stats {
        // `released` first: every buffer it counts is already in `chunks`.
        let released = self.released.load(Ordering::Acquire);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let chunks = self.chunks.load(Ordering::Relaxed);
        let largest_stream_held = lock(&self.sockets)
            .values()
            .map(|share| share.held.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Stats {
            copy_count: Some(chunks),
            copy_bytes: Some(bytes),
            bytes,
            chunks,
            buffers_outstanding: chunks.saturating_sub(released),
            memory_capacity: self.capacity,
            // Whole buffers of their class, as the area counts whole chunks (buffers being
            // read into included).
            memory_held: self.held.load(Ordering::Relaxed),
            largest_stream_held,
            streams_paused: self.streams_paused.load(Ordering::Relaxed),
            stream_pauses: self.stream_pauses.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (class, free) in state.recycled.iter().enumerate() {
            for &address in free {
                // SAFETY: a recycled heap block of this class, no longer referenced (the pool
                // is going away, so no buffer of it is out).
                unsafe { dealloc(address as *mut u8, self.classes[class]) };
            }
        }
    }
}

/// Frees a heap buffer of `size` bytes.
///
/// # Safety
///
/// `ptr` was allocated by [`Pool::allocate`] with `size`, and is not used afterwards.
unsafe fn dealloc(ptr: *mut u8, size: usize) {
    let layout = Layout::from_size_align(size, HEAP_ALIGN).expect("a checked pool size");
    // SAFETY: as this function's.
    unsafe { std::alloc::dealloc(ptr, layout) }
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

/// A pool of one mapped 4 KiB buffer and nothing beyond it, for tests of the cap.
#[cfg(test)]
pub(super) fn one_buffer_config() -> CopyConfig {
    CopyConfig {
        buffers: 1,
        buffer_size: 4096,
        memory_limit: Some(4096),
        event_interval: Duration::from_secs(1),
        stream_budget: None,
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use std::time::Instant;

    use super::*;

    /// The rate limit reads the coarse clock first: it must still let the first event out at
    /// once, no second one before the interval has passed (on the precise clock, and on
    /// times read here independently), and the next one once it has.
    #[test]
    fn events_keep_their_interval_with_the_coarse_clock_read_first() {
        let (events, _) = broadcast::channel(16);
        let pool = Pool::new(&one_buffer_config(), events).unwrap();
        let interval = Duration::from_millis(30);
        let last = AtomicU64::new(u64::MAX);
        assert!(
            pool.due(&last, interval),
            "the first event goes out at once"
        );
        for _ in 0..3 {
            // Times read here, independently of the clocks `due` reads: the previous event
            // went out before `went_out`, the next one after `asking`.
            let went_out = Instant::now();
            let before = last.load(Ordering::Relaxed);
            let mut asked = 0u64;
            let asking = loop {
                let asking = Instant::now();
                if pool.due(&last, interval) {
                    break asking;
                }
                asked += 1;
                assert!(
                    went_out.elapsed() < Duration::from_secs(10),
                    "not due 10 s after a 30 ms interval"
                );
                if asked % 1000 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            };
            let gap = asking.duration_since(went_out);
            // (A millisecond for the calls themselves; a coarse clock taken for the precise
            // one would be up to a tick, 1-10 ms, early.)
            assert!(
                gap + Duration::from_millis(1) >= interval,
                "due after {gap:?} of a {interval:?} interval"
            );
            let after = last.load(Ordering::Relaxed);
            assert!(after - before >= interval.as_nanos() as u64);
            assert!(asked > 0, "due again at once");
        }
        // A zero interval lets every event out.
        assert!(pool.due(&last, Duration::ZERO));
        assert!(pool.due(&last, Duration::ZERO));
    }
}

#[cfg(test)]
mod return_tests {
    use super::*;
    use crate::buf::ZcBatch;

    /// A batch returned whole goes back as one run (`release_pool_buffers`): mapped buffers
    /// to the free list, heap ones freed (more than the few freed after unlocking), the cap's
    /// holding, the stream's holding and the share's references all back to where they were.
    #[test]
    fn a_run_of_mapped_and_heap_buffers_goes_back_whole() {
        let (events, _) = broadcast::channel(16);
        let config = CopyConfig {
            buffers: 2,
            memory_limit: Some(4096 * 40),
            ..one_buffer_config()
        };
        let pool = Arc::new(Pool::new(&config, events).unwrap());
        let share = Arc::new(StreamShare {
            pool: Arc::clone(&pool),
            fd: -1,
            held: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            resume_at: AtomicU64::new(0),
            waker: Mutex::new(None),
        });
        let mut buffers = Vec::new();
        let mut bytes = 0;
        for i in 0..20u32 {
            let block = pool.reserve(&mut pool.lock_state(), 0);
            let block = block.unwrap_or_else(|| pool.allocate(0).unwrap());
            buffers.push(pool.buffer(&share, block, 100 + i));
            bytes += u64::from(100 + i);
        }
        assert_eq!(pool.held(), 20 * 4096);
        assert_eq!(share.held.load(Ordering::Relaxed), bytes);
        assert_eq!(Arc::strong_count(&share), 21);
        assert_eq!(pool.stats().buffers_outstanding, 20);
        drop(ZcBatch::from_vec(buffers));
        assert_eq!(pool.held(), 0);
        assert_eq!(share.held.load(Ordering::Relaxed), 0);
        assert_eq!(Arc::strong_count(&share), 1);
        assert_eq!(pool.stats().buffers_outstanding, 0);
        assert_eq!(pool.lock_state().free.len(), 2);
    }
}
