//! The receive area as shared by the driver, the streams and every buffer.
//!
//! An [`Area`] lives in an `Arc`: each buffer holds one, so the area and the refill region
//! stay mapped until the last buffer is gone, even after the ring (and with it the kernel's
//! zcrx instance) has been closed. Returns after that point are written into memory nobody
//! reads any more, which is harmless.
//!
//! The `Area` is the queue's receive memory as a whole: the refill ring and every *kernel
//! area* of the instance, one [`KernelArea`] each: the memory registered with the queue (id
//! 0) and each one the driver added with `ZCRX_CTRL_ADD_AREA` (Linux 7.3+,
//! `Builder::area_growth`), with its own token. Kernel areas are only ever added, never
//! removed (the kernel has no way to), and all stay mapped until the `Area` goes, i.e. until
//! the last buffer of any of them is dropped. A buffer names its kernel area by id in its
//! slot's offset (`holdings::SlotTags`).
//!
//! The area knows two things above it only through narrow seams: buffers through
//! [`BufferOwnerVtable`] (this file implements it, `buf.rs` names no backend), and the driver
//! through [`DriverLink`] (a wake-up and a place for the final statistics), so this file
//! imports nothing from the driver.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(debug_assertions)]
use zcrx_core::accounting::ChunkRefs;
use zcrx_core::refcount::{BulkRefCount, Credit};
use zcrx_core::refill::{PushOutcome, RefillRing};
use zcrx_sys::event::zcrx_stats;
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

use super::holdings::{Holdings, SlotTags, TaggedOffset};
use super::instance::SharedLayout;
use crate::buf::{BufferOwnerVtable, BufferSlot, ZcBuf};
use crate::event::Stats;
use crate::sys::lock;
use crate::sys::mem::Mapping;
use crate::sys::CachePadded;

/// What the area needs from the driver that owns it, and no more: the area holds it to wake
/// the driver when returned chunks need it, and leaves its statistics there when it is freed.
/// The driver's shared state implements it; a trait so that the area does not import the
/// driver (see `backend/uring/mod.rs`).
pub(crate) trait DriverLink: Send + Sync {
    /// Wakes the driver if it sleeps (or is about to). Cheap when it is awake; called on any
    /// thread, from buffer drops.
    fn wake(&self);
    /// The area's statistics as it is freed (the last buffer gone), for the handle's
    /// `stats()` from then on.
    fn area_freed(&self, final_stats: Stats);
}

/// Counters only the driver thread writes (relaxed: they are statistics).
#[derive(Debug, Default)]
pub(crate) struct DriverCounters {
    pub(crate) bytes: AtomicU64,
    pub(crate) chunks: AtomicU64,
    pub(crate) resubmits_cq_overflow: AtomicU64,
    pub(crate) resubmits_area_exhausted: AtomicU64,
    pub(crate) kernel_events: AtomicU64,
    /// Returns pushed for completions the decoder rejected (never delivered as buffers).
    pub(crate) rejected_returns: AtomicU64,
    /// Completions the decoder rejected (logged; their stream ended).
    pub(crate) invalid_completions: AtomicU64,
    /// Chunks not returned for malformed completions (see `Stats::chunks_leaked`).
    pub(crate) chunks_leaked: AtomicU64,
    /// Event re-arms the kernel refused with something other than EINVAL.
    pub(crate) failed_rearms: AtomicU64,
    /// `ZCRX_CTRL_FLUSH_RQ` calls the kernel refused (logged; never fatal).
    pub(crate) failed_flushes: AtomicU64,
    /// `ZCRX_CTRL_ADD_AREA` calls (or the mappings for them) that failed (logged; the area
    /// stays as it is).
    pub(crate) failed_area_additions: AtomicU64,
    /// `io_uring_enter` calls that failed with EINTR, EAGAIN or EBUSY (retried).
    pub(crate) transient_enter_errors: AtomicU64,
    /// Streams paused by their budget now.
    pub(crate) streams_paused: AtomicU64,
    /// Times a stream was paused by its budget.
    pub(crate) stream_pauses: AtomicU64,
    /// Lingers before a sleep that found a stream to resume (`Driver::linger`).
    pub(crate) driver_lingers: AtomicU64,
}

/// One area of the kernel's zcrx instance: its memory and the token the kernel gave it.
/// Kept apart per kernel area (rather than as one growing mapping) because each is a
/// registration of its own: its token, and whatever else the kernel may come to attach to an
/// area (a fixed-buffer index for sending from it, for example).
pub(crate) struct KernelArea {
    memory: Mapping,
    /// `rq_area_token`: the id at bit 48, as the kernel wrote it back.
    token: u64,
    /// References the kernel gave us per chunk, checked on every return in debug builds
    /// (and so in every test). Release builds rely on the types instead: a `ZcBuf` is not
    /// `Clone` and returns its chunk exactly once, in `Drop`; the per-chunk counters cost
    /// 10-30 ns per chunk in cross-core traffic (measured with the per-chunk benchmark).
    #[cfg(debug_assertions)]
    refs: ChunkRefs,
}

impl KernelArea {
    fn new(memory: Mapping, token: u64, chunk_size: u32) -> KernelArea {
        #[cfg(debug_assertions)]
        let chunks = (memory.len() / chunk_size as usize) as u32;
        let _ = chunk_size;
        KernelArea {
            #[cfg(debug_assertions)]
            refs: ChunkRefs::new(chunks),
            memory,
            token,
        }
    }
}

pub(crate) struct Area {
    /// Points into `_region`, so it is declared (and dropped) before it.
    pub(crate) refill: RefillRing,
    /// Every kernel area by id, set once each, in order (the driver adds them); as many
    /// places as the growth policy may fill (one without growth). Never moves, so a buffer
    /// drop finds its area without a lock.
    areas: Box<[OnceLock<KernelArea>]>,
    /// Kernel areas set so far.
    area_count: AtomicU32,
    /// Bytes in all of them.
    capacity: AtomicU64,
    // Kept mapped for `refill` and `stats`, which point into it.
    _region: Mapping,
    pub(crate) chunk_size: u32,
    stats: Option<*const zcrx_stats>,
    pub(crate) counters: DriverCounters,
    /// Set by the driver while a receive waits for chunks to come back; buffer drops then
    /// wake it. Otherwise drops never wake the driver.
    pub(crate) driver_waits_for_buffers: AtomicBool,
    driver: Arc<dyn DriverLink>,
    /// What each stream holds, for budgets (see `holdings.rs`); buffers carry their
    /// stream's tag above the area offset.
    pub(crate) holdings: Holdings,
    pub(crate) tags: SlotTags,
    /// One reference per delivered buffer plus the driver's credit (see [`BufferRefs`]).
    /// On a cache line of its own: every buffer drop writes it, and it must not slow down
    /// the reads of the fields around it.
    buffer_refs: CachePadded<BulkRefCount>,
    /// A ring the driver could not close safely at shutdown (6.15-6.18 NIC queues with
    /// buffers held): closed in `drop`, when the last buffer is gone, before the memory.
    ring_closed_with_last_buffer: Mutex<Option<Box<dyn Send>>>,
}

// SAFETY: the raw pointers point into `_region`, which the Area owns; the kernel's stats are
// only read with atomic loads, and the refill ring is built for concurrent producers.
unsafe impl Send for Area {}
// SAFETY: as above; all shared access goes through atomics or the RefillRing's own protocol.
unsafe impl Sync for Area {}

impl std::fmt::Debug for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Area")
            .field("len", &self.len())
            .field("areas", &self.area_count())
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

impl Area {
    /// Takes the memory out of a fresh instance (the ring stays with the driver). `growth`:
    /// how many kernel areas there may be in all, and the largest of them in bytes (for
    /// the buffer offsets' layout, `holdings::SlotTags`); `None` without growth.
    pub(crate) fn new(
        memory: Mapping,
        region: Mapping,
        layout: &SharedLayout,
        driver: Arc<impl DriverLink + 'static>,
        growth: Option<(u32, u64)>,
    ) -> std::io::Result<Area> {
        let base = region.as_ptr();
        // SAFETY: the kernel reported these offsets inside the region it validated, and
        // `register` checked that the ring fits. The region is owned by this Area and dropped
        // after `refill` (declaration order), so the pointers stay valid for its lifetime.
        let refill = unsafe {
            RefillRing::from_raw_parts(
                base.add(layout.rq_head_offset).cast::<AtomicU32>(),
                base.add(layout.rq_tail_offset).cast::<AtomicU32>(),
                base.add(layout.rqes_offset).cast::<io_uring_zcrx_rqe>(),
                layout.rq_entries,
            )
        }
        .map_err(std::io::Error::other)?;
        // SAFETY: the stats offset lies inside the region (it is a page past the ring).
        let stats = layout
            .stats_offset
            .map(|offset| unsafe { base.add(offset).cast::<zcrx_stats>() as *const zcrx_stats });
        let (max_areas, largest) = growth.unwrap_or((1, 0));
        let max_areas = max_areas.max(1);
        let tags = SlotTags::new(largest.max(memory.len() as u64), max_areas);
        let areas: Box<[OnceLock<KernelArea>]> = (0..max_areas).map(|_| OnceLock::new()).collect();
        let capacity = AtomicU64::new(memory.len() as u64);
        let first = KernelArea::new(memory, layout.area_token, layout.chunk_size);
        if areas[0].set(first).is_err() {
            unreachable!("a fresh OnceLock");
        }
        Ok(Area {
            refill,
            areas,
            area_count: AtomicU32::new(1),
            capacity,
            _region: region,
            chunk_size: layout.chunk_size,
            stats,
            counters: DriverCounters::default(),
            driver_waits_for_buffers: AtomicBool::new(false),
            driver,
            holdings: Holdings::new(),
            tags,
            buffer_refs: CachePadded(BulkRefCount::new()),
            ring_closed_with_last_buffer: Mutex::new(None),
        })
    }

    /// Bytes in all kernel areas.
    pub(crate) fn len(&self) -> usize {
        self.capacity.load(Ordering::Relaxed) as usize
    }

    /// Kernel areas registered so far.
    pub(crate) fn area_count(&self) -> u32 {
        self.area_count.load(Ordering::Acquire)
    }

    /// How many kernel areas there may be (the places in the table).
    pub(crate) fn max_areas(&self) -> u32 {
        self.areas.len() as u32
    }

    /// Kernel area `id`, if it has been added.
    pub(crate) fn kernel_area(&self, id: u16) -> Option<&KernelArea> {
        self.areas.get(usize::from(id))?.get()
    }

    /// Kernel area `id` of a buffer or a decoded completion: it exists (the decoder
    /// checked the id against the areas the driver added, which are never removed).
    fn area_of(&self, id: u16) -> &KernelArea {
        self.kernel_area(id)
            .expect("tokio-zcrx: a buffer names a kernel area that was never added")
    }

    /// Adds the kernel area the kernel just registered with `token` (driver thread), and
    /// returns its id; `Err` gives the memory back if its id has no place in the table.
    pub(crate) fn add_kernel_area(&self, memory: Mapping, token: u64) -> Result<u16, Mapping> {
        let id = token >> zcrx_sys::zcrx::IORING_ZCRX_AREA_SHIFT;
        let Some(place) = self.areas.get(id as usize) else {
            return Err(memory);
        };
        let len = memory.len() as u64;
        place
            .set(KernelArea::new(memory, token, self.chunk_size))
            .map_err(|area| area.memory)?;
        self.capacity.fetch_add(len, Ordering::Relaxed);
        self.area_count.fetch_max(id as u32 + 1, Ordering::Release);
        Ok(id as u16)
    }

    /// Bytes in kernel area `id` (0 if it has not been added).
    pub(crate) fn kernel_area_len(&self, id: u16) -> usize {
        self.kernel_area(id).map_or(0, |area| area.memory.len())
    }

    /// Pointer to `area_offset` of kernel area `area` (validated by the completion decoder
    /// to lie inside).
    pub(crate) fn data_ptr(&self, area: u16, area_offset: u64) -> *const u8 {
        let kernel_area = self.area_of(area);
        debug_assert!((area_offset as usize) < kernel_area.memory.len());
        // SAFETY: the decoder checked offset + len against the area's length.
        unsafe { kernel_area.memory.as_ptr().add(area_offset as usize) }
    }

    /// The refill entry that returns a chunk delivered at `area_offset` of kernel area
    /// `area` with `len` bytes: the offset with that area's token at bit 48.
    pub(crate) fn refill_entry(&self, area: u16, area_offset: u64, len: u32) -> io_uring_zcrx_rqe {
        io_uring_zcrx_rqe {
            off: area_offset | self.area_of(area).token,
            len,
            __pad: 0,
        }
    }

    /// The index of the chunk holding `area_offset` (the kernel puts data anywhere within its
    /// chunk; chunks are `chunk_size` apart, a power of two).
    fn chunk_of(&self, area_offset: u64) -> u32 {
        (area_offset / u64::from(self.chunk_size)) as u32
    }

    /// Counts one chunk reference the kernel handed us (driver thread).
    pub(crate) fn on_delivered(&self, area: u16, chunk: u32) {
        // The decoder checked the chunk index against the area.
        #[cfg(debug_assertions)]
        {
            let counted = self.area_of(area).refs.on_delivered(chunk);
            assert!(counted.is_ok(), "tokio-zcrx: {counted:?}");
        }
        let _ = (area, chunk);
    }

    /// Checks (debug builds) that the kernel lent the chunk a buffer returns.
    fn check_return(&self, at: &TaggedOffset) {
        #[cfg(debug_assertions)]
        if let Err(e) = self
            .area_of(at.area)
            .refs
            .on_returned(self.chunk_of(at.offset))
        {
            // A second return would let the kernel reuse a chunk someone still reads: never
            // pass it on. Reaching this is a bug in this crate.
            panic!("tokio-zcrx: {e:?}");
        }
        let _ = at;
    }

    /// Returns one chunk reference to the kernel, and credits the stream it was delivered
    /// to. Called on any thread, once per buffer, with the buffer's tagged offset.
    pub(crate) fn return_chunk(&self, offset: u64, len: u32) {
        let at = self.tags.decode(offset);
        self.check_return(&at);
        let outcome = self.refill.push(self.refill_entry(at.area, at.offset, len));
        let resumable = self.holdings.credit(at.tag, 1);
        // Read after the push returned: the push ended with the RMW the driver's last look
        // before sleeping synchronizes with (`RefillRing::synchronize_with_producers`), so
        // either the driver sees this return or we see its flags. Relaxed loads suffice.
        if outcome == PushOutcome::Overflowed || resumable {
            // Rare (more returns in flight than ring entries): the driver must move the
            // overflow into the ring once the kernel consumed some, so make sure it runs. A
            // paused stream that may resume needs it too.
            self.driver.wake();
        } else if self.driver_waits_for_buffers.load(Ordering::Relaxed) {
            self.driver.wake();
        }
    }

    /// Returns several chunk references at once (see `ZcBatch`): one claim and one
    /// publication in the refill ring per [`Self::RETURN_RUN`] of them.
    pub(crate) fn return_chunks(&self, slots: &[BufferSlot]) {
        #[cfg(debug_assertions)]
        for slot in slots {
            self.check_return(&self.tags.decode(slot.offset));
        }
        let mut entries = [io_uring_zcrx_rqe::default(); Self::RETURN_RUN];
        for run in slots.chunks(Self::RETURN_RUN) {
            // A batch is one stream's, so its tags are one run of equal tags (or a few):
            // one credit per run of them.
            let mut resumable = false;
            let mut credit = (0u64, 0u64);
            for (entry, slot) in entries.iter_mut().zip(run) {
                let TaggedOffset { area, offset, tag } = self.tags.decode(slot.offset);
                *entry = self.refill_entry(area, offset, slot.len);
                if tag != credit.0 {
                    resumable |= self.holdings.credit(credit.0, credit.1);
                    credit = (tag, 0);
                }
                credit.1 += 1;
            }
            let outcome = self.refill.push_batch(&entries[..run.len()]);
            resumable |= self.holdings.credit(credit.0, credit.1);
            // After the push, as in `return_chunk`.
            if outcome.overflowed > 0
                || resumable
                || self.driver_waits_for_buffers.load(Ordering::Relaxed)
            {
                self.driver.wake();
            }
        }
    }

    /// Refill entries published at once by [`Self::return_chunks`] (a batch's run is at most
    /// this long).
    const RETURN_RUN: usize = 64;

    /// The kernel's copy statistics, if registered with events.
    pub(crate) fn kernel_copies(&self) -> Option<(u64, u64)> {
        let stats = self.stats?;
        // SAFETY: the stats live in our region for as long as `self`; the kernel updates each
        // field non-atomically, so each is read with a relaxed atomic load (no torn reads of
        // an aligned u64 on the architectures the kernel supports zcrx on).
        unsafe {
            let count = &*(std::ptr::addr_of!((*stats).copy_count) as *const AtomicU64);
            let bytes = &*(std::ptr::addr_of!((*stats).copy_bytes) as *const AtomicU64);
            Some((count.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed)))
        }
    }

    /// Buffers delivered and not yet returned: delivered chunks minus returns, where returns
    /// are counted by the refill ring itself (no extra counter on the per-chunk path). Exact
    /// when nothing is in flight; a snapshot taken during traffic can lag by a few.
    fn buffers_outstanding(&self, delivered: u64) -> u64 {
        let returned = self
            .refill
            .stats()
            .pushed
            .saturating_sub(self.counters.rejected_returns.load(Ordering::Relaxed));
        delivered.saturating_sub(returned)
    }

    /// Bytes the application holds: outstanding buffers, in whole chunks.
    pub(crate) fn memory_held(&self) -> u64 {
        let chunks = self.counters.chunks.load(Ordering::Relaxed);
        self.buffers_outstanding(chunks) * u64::from(self.chunk_size)
    }

    pub(crate) fn stats(&self) -> Stats {
        let copies = self.kernel_copies();
        let chunks = self.counters.chunks.load(Ordering::Relaxed);
        let outstanding = self.buffers_outstanding(chunks);
        Stats {
            copy_count: copies.map(|c| c.0),
            copy_bytes: copies.map(|c| c.1),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
            chunks,
            buffers_outstanding: outstanding,
            resubmits_cq_overflow: self.counters.resubmits_cq_overflow.load(Ordering::Relaxed),
            resubmits_area_exhausted: self
                .counters
                .resubmits_area_exhausted
                .load(Ordering::Relaxed),
            kernel_events: self.counters.kernel_events.load(Ordering::Relaxed),
            invalid_completions: self.counters.invalid_completions.load(Ordering::Relaxed),
            chunks_leaked: self.counters.chunks_leaked.load(Ordering::Relaxed),
            faults_survived: self.counters.failed_flushes.load(Ordering::Relaxed)
                + self.counters.failed_rearms.load(Ordering::Relaxed)
                + self.counters.failed_area_additions.load(Ordering::Relaxed)
                + self.counters.transient_enter_errors.load(Ordering::Relaxed),
            memory_capacity: self.len() as u64,
            areas: self.area_count(),
            memory_held: outstanding * u64::from(self.chunk_size),
            largest_stream_held: self.holdings.largest() * u64::from(self.chunk_size),
            streams_paused: self.counters.streams_paused.load(Ordering::Relaxed),
            stream_pauses: self.counters.stream_pauses.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }
}

impl Area {
    /// Keeps `ring` open until the area is freed (the last buffer dropped).
    pub(crate) fn close_with_last_buffer(&self, ring: Box<dyn Send>) {
        *lock(&self.ring_closed_with_last_buffer) = Some(ring);
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // The ring first: its teardown returns the chunks while the memory is still mapped.
        drop(lock(&self.ring_closed_with_last_buffer).take());
        // Every buffer is gone; what the handle reports from now on.
        self.driver.area_freed(self.stats());
    }
}

/// Keeps an [`Area`] alive for its buffers without two atomic operations on one shared
/// reference count per buffer.
///
/// A plain `Arc` per buffer has the driver thread (clone) and the workers (drop) take turns
/// owning one cache line. Instead, the driver parks one strong `Arc` reference for all
/// buffers and counts buffers with `zcrx-core`'s loom-checked [`BulkRefCount`], adding
/// references in bulk from a [`Credit`]; each buffer drop gives one back. Whoever gives back
/// the last reference (the driver at exit, or the last buffer) releases the parked `Arc`.
pub(crate) struct BufferRefs {
    area: Arc<Area>,
    credit: Option<Credit>,
}

impl BufferRefs {
    const BATCH: usize = 64;

    /// Parks a strong reference of `area` for its buffers.
    pub(crate) fn new(area: &Arc<Area>) -> BufferRefs {
        // SAFETY: `area` is a live Arc; the extra strong count is released exactly once, by
        // whoever gives back the last buffer reference (see `release`).
        unsafe { Arc::increment_strong_count(Arc::as_ptr(area)) };
        BufferRefs {
            credit: Some(Credit::new(&area.buffer_refs, Self::BATCH)),
            area: Arc::clone(area),
        }
    }

    /// One reference for a new buffer.
    fn take(&mut self) -> NonNull<Area> {
        self.credit
            .as_mut()
            .expect("the credit lives as long as the driver")
            .take(&self.area.buffer_refs);
        NonNull::from(&*self.area)
    }

    /// Wraps one delivered chunk (validated by the completion decoder: `area_offset + len`
    /// lies inside kernel area `kernel_area`, `chunk` is its index there) in a buffer for
    /// the stream tagged `tag` (`SlotTags::tag`; 0 for none), whose holding the buffer's
    /// drop credits. The caller (the driver) owes exactly one refill entry for it, which the
    /// buffer's drop pays.
    pub(crate) fn buffer(
        &mut self,
        kernel_area: u16,
        area_offset: u64,
        len: u32,
        chunk: u32,
        tag: u64,
    ) -> ZcBuf {
        let area = self.take();
        // SAFETY: the reference just taken keeps the area alive.
        let area_ref = unsafe { area.as_ref() };
        let ptr = area_ref.data_ptr(kernel_area, area_offset);
        area_ref.on_delivered(kernel_area, chunk);
        debug_assert_eq!(area_ref.chunk_of(area_offset), chunk);
        area_ref.holdings.delivered(tag);
        let slot = BufferSlot {
            offset: area_ref.tags.encode(kernel_area, area_offset, tag),
            len,
        };
        // SAFETY: `ptr..ptr + len` lies inside the area (the decoder checked it), which stays
        // mapped while the buffer holds the reference just taken; the kernel does not write
        // the chunk until it comes back through the refill ring, which only the buffer's
        // release does. The area is `Sync`, so `AREA_BUFFERS` may run on any thread. The
        // buffer takes over the one refill entry and the one reference owed for the chunk.
        unsafe { ZcBuf::from_raw_parts(ptr, slot, area.cast(), &AREA_BUFFERS) }
    }
}

/// How buffers of an area go back: the owner pointer is the `Area`, and each buffer holds
/// one of its buffer references ([`BufferRefs`]); the slot is the chunk's offset (with the
/// stream's tag above it, see `holdings.rs`) and length.
static AREA_BUFFERS: BufferOwnerVtable = BufferOwnerVtable {
    release_one: release_area_buffer,
    release_run: release_area_buffers,
    debug_fields: |debug, slot| {
        // The area id and the tag are above the area's offsets (`holdings::SlotTags`), whose
        // size this function does not know: the raw value, named as such.
        debug.field("tagged_offset", &slot.offset);
    },
};

/// `release_one` of [`AREA_BUFFERS`].
///
/// # Safety
///
/// As `BufferOwnerVtable::release_one`: `owner` is the `Area` of a live buffer made by
/// [`BufferRefs::buffer`], whose chunk and reference the caller gives up.
unsafe fn release_area_buffer(owner: NonNull<()>, slot: BufferSlot) {
    let area = owner.cast::<Area>();
    // SAFETY: the buffer's reference keeps the area alive until `release`, after which it is
    // not touched; its chunk is returned once, here.
    unsafe {
        area.as_ref().return_chunk(slot.offset, slot.len);
        release(area.as_ptr());
    }
}

/// `release_run` of [`AREA_BUFFERS`]: one refill publication and one reference release for
/// the whole run.
///
/// # Safety
///
/// As `BufferOwnerVtable::release_run`: every slot is that of a live buffer of the `Area` at
/// `owner`, made by [`BufferRefs::buffer`], whose chunk and reference the caller gives up.
unsafe fn release_area_buffers(owner: NonNull<()>, slots: &[BufferSlot]) {
    let area = owner.cast::<Area>();
    // SAFETY: the run's buffers each owned one of the area's buffer references, which keep it
    // alive until `release_many` gives them all back; nothing touches the area afterwards.
    unsafe {
        area.as_ref().return_chunks(slots);
        release_many(area.as_ptr(), slots.len());
    }
}

impl Drop for BufferRefs {
    fn drop(&mut self) {
        let credit = self.credit.take().expect("dropped once");
        if credit.release(&self.area.buffer_refs) {
            // SAFETY: the parked reference from `new`, released once: the count just reached
            // zero, so no buffer holds a reference any more.
            unsafe { Arc::decrement_strong_count(Arc::as_ptr(&self.area)) };
        }
    }
}

/// Gives back one buffer reference of the area at `area`, releasing the parked strong
/// reference when it was the last.
///
/// # Safety
///
/// `area` points to a live `Area` owned by an `Arc` whose parked reference was taken by
/// [`BufferRefs::new`], and the caller owns one of its buffer references. The caller must
/// not touch the area through this pointer afterwards.
unsafe fn release(area: *const Area) {
    // SAFETY: as this function's.
    unsafe { release_many(area, 1) }
}

/// [`release`] for `n` buffer references at once.
///
/// # Safety
///
/// As [`release`], with the caller owning `n` buffer references.
unsafe fn release_many(area: *const Area, n: usize) {
    // SAFETY: the caller's references keep the area alive until this release.
    if unsafe { &*area }.buffer_refs.release(n) {
        // SAFETY: the parked strong reference, released once: only the holder of the last
        // buffer reference gets here (after the acquire fence in `release`).
        unsafe { Arc::decrement_strong_count(area) };
    }
}
