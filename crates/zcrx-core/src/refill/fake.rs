//! A refill ring in ordinary heap memory, with the kernel's side played by the test.

use core::fmt;
use std::sync::Arc;

use zcrx_sys::zcrx::io_uring_zcrx_rqe;

use super::{EntryCell, RefillRing, RingSizeError, MAX_RING_ENTRIES};
use crate::sync::{AtomicU32, CachePadded, Ordering};

/// Keeps a fake region's memory alive for as long as its producer or its consumer exists.
pub(super) type SharedMemory = Arc<FakeMemory>;

/// The memory the kernel would share: indices and slots. Head and tail sit on cache lines
/// of their own, as in the kernel's `struct zcrx_rq_hdr`, so that contention measured on the
/// fake is the contention the real ring has.
pub(super) struct FakeMemory {
    pub(super) head: CachePadded<AtomicU32>,
    pub(super) tail: CachePadded<AtomicU32>,
    pub(super) rqes: Box<[EntryCell]>,
}

// SAFETY: the slots are shared between the `RefillRing` and the `FakeRefillRegion` as kernel
// memory would be: each slot is accessed by one side at a time, handed over by release/acquire
// on head and tail (see `RefillRing::claim` and `FakeRefillRegion::consume_into`, the only
// code that touches slots; the latter takes `&mut self`, so there is one consumer).
unsafe impl Sync for FakeMemory {}

/// A heap-allocated refill ring whose owner plays the kernel: tests push through the
/// [`RefillRing`] it comes with and consume here.
///
/// Consuming follows the kernel's protocol: load-acquire the tail, read the entries from head
/// to tail, store-release the head. Every slot starts as, and every consumed slot is
/// overwritten with, [`FakeRefillRegion::POISON`], so a test that consumes an entry no producer
/// wrote sees `POISON` instead of a plausible old value.
///
/// ```
/// use zcrx_core::refill::{refill_entry, FakeRefillRegion, PushOutcome};
///
/// let (ring, mut kernel) = FakeRefillRegion::create(2).unwrap();
/// let entries: Vec<_> = (1..=3).map(|i| refill_entry(i * 4096, 4096, 0)).collect();
/// assert_eq!(ring.push(entries[0]), PushOutcome::InRing);
/// assert_eq!(ring.push(entries[1]), PushOutcome::InRing);
/// // Two slots, both unconsumed: the third return waits in the overflow list.
/// assert_eq!(ring.push(entries[2]), PushOutcome::Overflowed);
///
/// assert_eq!(kernel.consume(usize::MAX), &entries[..2]);
/// assert_eq!(ring.flush_overflow(), 1);
/// assert_eq!(kernel.consume(usize::MAX), &entries[2..]);
/// ```
pub struct FakeRefillRegion {
    pub(super) memory: SharedMemory,
    entries: u32,
}

impl FakeRefillRegion {
    /// The value of every slot no producer has written since it was last consumed. A
    /// non-zero `__pad` makes a real kernel skip such an entry.
    pub const POISON: io_uring_zcrx_rqe = io_uring_zcrx_rqe {
        off: u64::MAX,
        len: u32::MAX,
        __pad: u32::MAX,
    };

    /// Creates a ring of `entries` slots with head and tail at 0, and its producer.
    ///
    /// # Errors
    ///
    /// [`RingSizeError`] unless `entries` is a power of two up to
    /// [`MAX_RING_ENTRIES`](super::MAX_RING_ENTRIES).
    pub fn create(entries: u32) -> Result<(RefillRing, Self), RingSizeError> {
        Self::create_at(entries, 0)
    }

    /// As [`Self::create`], with head and tail starting at `start`: e.g. just below
    /// `u32::MAX` to exercise index wrap-around.
    ///
    /// # Errors
    ///
    /// As [`Self::create`].
    pub fn create_at(entries: u32, start: u32) -> Result<(RefillRing, Self), RingSizeError> {
        // Check before allocating `entries` slots.
        if !entries.is_power_of_two() || entries > MAX_RING_ENTRIES {
            return Err(RingSizeError { entries });
        }
        let memory = Arc::new(FakeMemory {
            head: CachePadded(AtomicU32::new(start)),
            tail: CachePadded(AtomicU32::new(start)),
            rqes: (0..entries).map(|_| EntryCell::new(Self::POISON)).collect(),
        });
        // SAFETY: the memory lives in an `Arc` the ring holds a clone of, so it outlives the
        // ring. Head and tail are atomics, written only by `consume_into` (forward, never past
        // the tail, release after reading) and by the ring respectively; `consume_into` reads
        // slots only between head and a load-acquired tail and is the only other accessor of
        // the slots.
        let ring = unsafe {
            RefillRing::from_cells(
                &*memory.head,
                &*memory.tail,
                memory.rqes.as_ptr(),
                entries,
                Some(Arc::clone(&memory)),
            )
        }?;
        Ok((ring, Self { memory, entries }))
    }

    /// Consumes up to `max` published entries, as the kernel would, and returns them in ring
    /// order.
    pub fn consume(&mut self, max: usize) -> Vec<io_uring_zcrx_rqe> {
        let mut consumed = Vec::new();
        self.consume_into(&mut consumed, max);
        consumed
    }

    /// As [`Self::consume`], appending to `out`; returns how many were consumed.
    ///
    /// # Panics
    ///
    /// If the tail is more than a ring ahead of the head: the producer broke the protocol.
    pub fn consume_into(&mut self, out: &mut Vec<io_uring_zcrx_rqe>, max: usize) -> usize {
        let memory = &*self.memory;
        let tail = memory.tail.load(Ordering::Acquire);
        // Only this consumer writes the head.
        let mut head = memory.head.load(Ordering::Relaxed);
        let available = tail.wrapping_sub(head);
        assert!(
            available <= self.entries,
            "refill ring tail {tail} is more than {} entries ahead of head {head}",
            self.entries
        );
        let count = max.min(available as usize);
        out.reserve(count);
        for _ in 0..count {
            let slot = &memory.rqes[(head & (self.entries - 1)) as usize];
            // SAFETY: the slot is between head and the tail we load-acquired, so its producer
            // has finished writing it (release on the tail), and no producer claims it again
            // before we store a head past it; `&mut self` excludes other consumers.
            out.push(slot.with(|p| unsafe { p.read() }));
            // SAFETY: as above.
            slot.with_mut(|p| unsafe { p.write(Self::POISON) });
            head = head.wrapping_add(1);
        }
        // Release: producers that see this head see our reads (and poison writes) done.
        memory.head.store(head, Ordering::Release);
        count
    }

    /// The consumer index.
    #[must_use]
    pub fn head(&self) -> u32 {
        self.memory.head.load(Ordering::Acquire)
    }

    /// The producer index, as published by the ring.
    #[must_use]
    pub fn tail(&self) -> u32 {
        self.memory.tail.load(Ordering::Acquire)
    }

    /// Entries published and not yet consumed.
    #[must_use]
    pub fn available(&self) -> u32 {
        let head = self.head();
        self.tail().wrapping_sub(head)
    }
}

impl fmt::Debug for FakeRefillRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeRefillRegion")
            .field("entries", &self.entries)
            .field("head", &self.head())
            .field("tail", &self.tail())
            .finish_non_exhaustive()
    }
}
