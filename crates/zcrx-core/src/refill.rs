//! Multi-producer refill-ring producer: hands consumed chunks back to the kernel.
//!
//! The refill ring is a single-consumer ring in memory shared with the kernel: `entries`
//! [`io_uring_zcrx_rqe`] slots, a `head` the kernel advances (store-release) after reading
//! entries, and a `tail` user space advances (store-release) after writing them. The kernel
//! load-acquires `tail` and reads the slots between `head` and `tail`.
//!
//! The kernel knows only one producer, but buffers are dropped on any thread. [`RefillRing`]
//! lets any number of threads push concurrently without a lock:
//!
//! 1. **Claim.** A producer claims one slot (or a run of slots for a batch) with a CAS on a
//!    private 64-bit reserve counter, after checking space against the kernel's head
//!    (load-acquire, so that the kernel has finished reading the slot before it is
//!    overwritten): `reserved - head < entries`.
//! 2. **Write and commit.** It writes the entry into its slot, then stores the slot's position
//!    into a private per-slot *commit marker* (store-release). Markers carry the whole 32-bit
//!    position, not a flag, so a marker left over from the previous lap is never mistaken for a
//!    commit of the current one.
//! 3. **Publish.** It then asks for publication with an acquire-release increment of a
//!    request counter. The producer that finds the counter at zero becomes the *publisher*:
//!    from a private 64-bit published position it advances over the run of committed slots,
//!    stores the low 32 bits into the kernel-visible tail (store-release), and leaves by
//!    resetting the counter with a CAS from the value it last saw. A producer that finds a
//!    publisher at work returns at once: its increment makes the publisher's CAS fail, and
//!    the publisher looks again (acquiring the commit) before it leaves. The RMWs on the
//!    counter are totally ordered, so no commit is left unpublished once every push has
//!    returned, and no push waits for another to finish (though the publisher, while
//!    requests keep coming, publishes for the others before its push returns).
//!
//! The kernel therefore never sees an entry before it is completely written, whatever the
//! interleaving. The protocol is model-checked with loom (`tests/loom_refill.rs`).
//!
//! **No index wrap can fool it.** Claims and publication count in 64 bits; only the kernel
//! tail is 32 bits, and only the publisher (one thread at a time) writes it, with a plain
//! store of its own 64-bit position. A producer preempted anywhere, for any number of
//! pushes by others, therefore cannot publish a stale position: a CAS on a 32-bit tail could
//! be fooled after exactly 2^32 pushes during one preemption (ABA), a CAS on 64 bits cannot.
//! The claim reads the reserve before the head and then CASes the reserve, so its view of the
//! head is no older than the reserve it moves. The price of one publisher at a time: a
//! publisher preempted in the middle delays publication (not pushes) until it runs again, as
//! a producer preempted between claim and commit delays the entries behind its slot.
//!
//! **Nothing is ever dropped.** When the ring is full a push goes to an overflow list (a
//! mutex-protected `Vec`, the rare path) and reports [`PushOutcome::Overflowed`]. The owner of
//! the ring (the runtime's driver thread) moves overflowed entries into the ring with
//! [`RefillRing::flush_overflow`] once the kernel has made space; [`RefillRing::has_overflow`]
//! is a cheap check for that.
//!
//! **Waking the ring's owner.** Every push (and every overflow) ends with an acquire-release
//! RMW on the request counter. [`RefillRing::synchronize_with_producers`] performs one too: an
//! owner that is about to sleep announces it (e.g. sets a `sleeping` flag), calls it, and then
//! looks at [`RefillRing::has_overflow`] (or at [`RefillRing::stats`]). Of the two RMWs the
//! later acquires what came before the earlier: either the owner sees the push, or the
//! producer, reading the flag after its push returned, sees the announcement and wakes it. No
//! `SeqCst` store-buffering argument is needed, and the producer's hot path pays nothing for
//! it (`tests/loom_refill.rs` checks both the overflow and the waiting-for-returns case).
//!
//! The fast path (ring not full) takes no lock and allocates nothing: one CAS to claim, one
//! release store to commit, one increment, one store to the tail and one CAS to publish
//! (about 20 ns on one thread). Pushes from several threads at once pay for moving these cache
//! lines between cores (about 100 ns per push with two threads doing nothing else);
//! [`RefillRing::push_batch`] pays that once per batch.
//!
//! [`FakeRefillRegion`] is a heap-allocated ring whose owner plays the kernel, for tests.

mod fake;

use core::fmt;
use core::ptr;

use zcrx_sys::zcrx::{io_uring_zcrx_rqe, IORING_ZCRX_AREA_MASK};

use crate::sync::{lock, AtomicU32, AtomicU64, AtomicUsize, CachePadded, Mutex, Ordering};
pub use fake::FakeRefillRegion;

/// Largest ring this producer accepts (the kernel allows at most 32768 entries).
///
/// Kept far below 2^31 so that "this marker is from an older lap" and "from a newer lap" can be
/// told apart with a signed 32-bit difference.
pub const MAX_RING_ENTRIES: u32 = 1 << 24;

/// Builds the refill entry that returns the chunk a receive CQE delivered.
///
/// `cqe_off` is the CQE's [`io_uring_zcrx_cqe::off`](zcrx_sys::zcrx::io_uring_zcrx_cqe::off)
/// (or any byte offset inside the chunk: the kernel only uses the chunk index), `len` the CQE's
/// `res` (ignored by current kernels), `area_token` the area's
/// [`rq_area_token`](zcrx_sys::zcrx::io_uring_zcrx_area_reg::rq_area_token) as the kernel
/// wrote it back (already shifted into the top 16 bits). `__pad` must be zero: the kernel
/// skips entries where it is not.
///
/// ```
/// use zcrx_core::refill::refill_entry;
/// let token = 1u64 << 48;
/// let rqe = refill_entry(token | 0x2010, 100, token);
/// assert_eq!((rqe.off, rqe.len, rqe.__pad), (token | 0x2010, 100, 0));
/// ```
#[must_use]
pub const fn refill_entry(cqe_off: u64, len: u32, area_token: u64) -> io_uring_zcrx_rqe {
    io_uring_zcrx_rqe {
        off: (cqe_off & !IORING_ZCRX_AREA_MASK) | area_token,
        len,
        __pad: 0,
    }
}

/// A ring size this producer cannot work with: not a power of two, zero, or above
/// [`MAX_RING_ENTRIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSizeError {
    /// The rejected number of entries.
    pub entries: u32,
}

impl fmt::Display for RingSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refill ring size {} is not a power of two between 1 and {MAX_RING_ENTRIES}",
            self.entries
        )
    }
}

impl std::error::Error for RingSizeError {}

/// Where the kernel placed the refill ring in its region, checked: see [`RingLayout::validate`].
///
/// The kernel writes the offsets back at registration; nothing in the ABI bounds them, so they
/// are checked before any pointer is formed from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Offset of the kernel's `u32` head (consumer index).
    pub head: usize,
    /// Offset of the `u32` tail (producer index).
    pub tail: usize,
    /// Offset of the [`io_uring_zcrx_rqe`] array.
    pub rqes: usize,
    /// Number of entries, a power of two up to [`MAX_RING_ENTRIES`].
    pub entries: u32,
}

/// Why a refill ring layout was rejected by [`RingLayout::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLayoutError {
    /// The entry count is unusable (see [`RingSizeError`]).
    Entries(RingSizeError),
    /// A field is not aligned for its type (4 for the indices, 8 for the entries).
    Misaligned {
        /// `"head"`, `"tail"` or `"rqes"`.
        field: &'static str,
        /// The offset the kernel reported.
        offset: u64,
    },
    /// A field does not fit inside the region.
    OutsideRegion {
        /// `"head"`, `"tail"` or `"rqes"`.
        field: &'static str,
        /// The offset the kernel reported.
        offset: u64,
        /// Bytes the field needs from there.
        len: u64,
        /// The region's length.
        region_len: u64,
    },
    /// Two fields share bytes (head and tail, or an index and the entries).
    Overlap {
        /// The first field.
        first: &'static str,
        /// The second field.
        second: &'static str,
    },
}

impl fmt::Display for RingLayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Entries(e) => fmt::Display::fmt(&e, f),
            Self::Misaligned { field, offset } => {
                write!(f, "refill ring {field} at offset {offset} is misaligned")
            }
            Self::OutsideRegion {
                field,
                offset,
                len,
                region_len,
            } => write!(
                f,
                "refill ring {field} ({len} bytes at offset {offset}) does not fit in the \
                 {region_len}-byte region"
            ),
            Self::Overlap { first, second } => {
                write!(f, "refill ring {first} and {second} overlap")
            }
        }
    }
}

impl std::error::Error for RingLayoutError {}

impl RingLayout {
    /// Checks the offsets the kernel wrote back at registration against the region it was
    /// given (`region_len` bytes, page-aligned, so an aligned offset is an aligned address):
    /// `head` and `tail` 4-byte aligned `u32`s inside the region and apart, `rqes` 8-byte
    /// aligned (the entry's alignment) with all `entries` 16-byte entries inside the region,
    /// overlapping neither index, and `entries` a size [`RefillRing`] accepts.
    ///
    /// A layout that passes satisfies the memory part of [`RefillRing::from_raw_parts`]'s
    /// contract for a region of that length.
    ///
    /// # Errors
    ///
    /// [`RingLayoutError`] naming the first field that does not fit.
    ///
    /// ```
    /// use zcrx_core::refill::RingLayout;
    /// // What Linux 6.18 reports: head 0, tail 4, entries from 64.
    /// let layout = RingLayout::validate(0, 4, 64, 256, 4096 + 4096).unwrap();
    /// assert_eq!((layout.head, layout.tail, layout.rqes), (0, 4, 64));
    /// assert!(RingLayout::validate(0, 4, 64, 256, 4096).is_err()); // 64 + 256 * 16 > 4096
    /// ```
    pub fn validate(
        head: u32,
        tail: u32,
        rqes: u32,
        entries: u32,
        region_len: usize,
    ) -> Result<Self, RingLayoutError> {
        if !entries.is_power_of_two() || entries > MAX_RING_ENTRIES {
            return Err(RingLayoutError::Entries(RingSizeError { entries }));
        }
        let region = region_len as u64;
        let index_len = size_of::<u32>() as u64;
        let rqes_len = u64::from(entries) * size_of::<io_uring_zcrx_rqe>() as u64;
        let fields = [
            ("head", u64::from(head), index_len, 4),
            ("tail", u64::from(tail), index_len, 4),
            ("rqes", u64::from(rqes), rqes_len, 8),
        ];
        for (field, offset, len, align) in fields {
            if offset % align != 0 {
                return Err(RingLayoutError::Misaligned { field, offset });
            }
            // No overflow: both terms are below 2^32 * 16.
            if offset + len > region {
                return Err(RingLayoutError::OutsideRegion {
                    field,
                    offset,
                    len,
                    region_len: region,
                });
            }
        }
        for (i, &(first, a, a_len, _)) in fields.iter().enumerate() {
            for &(second, b, b_len, _) in &fields[i + 1..] {
                if a < b + b_len && b < a + a_len {
                    return Err(RingLayoutError::Overlap { first, second });
                }
            }
        }
        Ok(Self {
            head: head as usize,
            tail: tail as usize,
            rqes: rqes as usize,
            entries,
        })
    }
}

/// Where a pushed entry went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an overflowed entry reaches the kernel only after the driver calls flush_overflow"]
pub enum PushOutcome {
    /// Written into the ring; it is published to the kernel by this push or by a concurrent
    /// one.
    InRing,
    /// The ring was full: the entry waits in the overflow list until
    /// [`RefillRing::flush_overflow`] moves it. The runtime should make sure the driver will
    /// flush (wake it if it sleeps).
    Overflowed,
}

/// Where the entries of a [`RefillRing::push_batch`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use = "overflowed entries reach the kernel only after the driver calls flush_overflow"]
pub struct BatchOutcome {
    /// Entries written into the ring.
    pub in_ring: usize,
    /// Entries that found the ring full and went to the overflow list.
    pub overflowed: usize,
}

/// Counters of a [`RefillRing`], see [`RefillRing::stats`].
///
/// Each value is read separately while other threads may be pushing, so a snapshot taken
/// during concurrent pushes can be off by the pushes in flight; once pushes stop it is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefillStats {
    /// Entries accepted by [`RefillRing::push`] and [`RefillRing::push_batch`], wherever they
    /// went.
    pub pushed: u64,
    /// Entries made visible to the kernel by advancing the tail (including those that went
    /// through the overflow list first).
    pub published: u64,
    /// Entries that found the ring full and went to the overflow list (counted once, also
    /// after they have been flushed).
    pub overflowed: u64,
    /// Entries in the overflow list now.
    pub overflow_pending: usize,
    /// Entries published but not yet consumed by the kernel (`tail - head`).
    pub unconsumed: u32,
}

/// One refill-ring slot as this module accesses it: a cell, so that loom checks every access
/// (`UnsafeCell<T>` has `T`'s layout, so kernel memory can be viewed this way).
type EntryCell = crate::sync::UnsafeCell<io_uring_zcrx_rqe>;

/// Multi-producer, lock-free producer side of a zcrx refill ring. See the [module
/// docs](self) for the protocol.
///
/// `Sync`: share it (e.g. in an `Arc`) with every place that returns buffers.
pub struct RefillRing {
    /// Next ring position to hand out (the low 32 bits are ring positions, like `tail`).
    /// Every push CASes it, so it gets a cache line of its own.
    reserve: CachePadded<AtomicU64>,
    /// Publication state, see [`Self::publish`].
    publication: CachePadded<Publication>,
    /// Kernel-written consumer index.
    head: *const AtomicU32,
    /// Kernel-visible producer index, advanced by whichever producer publishes.
    tail: *const AtomicU32,
    /// The `entries` slots.
    rqes: *const EntryCell,
    /// Per slot, the position of the entry last committed to it (see [`Self::publish`]).
    committed: Box<[AtomicU32]>,
    /// Number of slots, a power of two.
    entries: u32,
    /// Value of `reserve` (and of the tail) when this producer was created.
    initial_position: u64,
    /// State touched only on the overflow path or by the driver.
    cold: CachePadded<ColdState>,
    /// Keeps a [`FakeRefillRegion`]'s memory alive; `None` for kernel memory.
    _memory: Option<fake::SharedMemory>,
}

/// Who publishes, and how far: the parts of a [`RefillRing`] that [`RefillRing::publish`]
/// writes.
struct Publication {
    /// Publication requests since the current publisher started; 0 when nobody publishes.
    /// Every push increments it (and the overflow path and the owner's
    /// [`RefillRing::synchronize_with_producers`] add 0 to it: see "Waking the ring's owner").
    /// A publisher stays in office for as long as requests keep arriving between its scans,
    /// which has no bound while the kernel keeps consuming, so the count has none either: 64
    /// bits, which no run can wrap (a wrap would elect a second publisher).
    requests: AtomicU64,
    /// Positions published so far, in 64 bits (the kernel tail holds the low 32). Written
    /// only by the publisher.
    published: AtomicU64,
}

/// The parts of a [`RefillRing`] that the fast path never writes.
struct ColdState {
    /// Entries that found the ring full.
    overflow: Mutex<Vec<io_uring_zcrx_rqe>>,
    /// `overflow.len()`, readable without the lock.
    overflow_len: AtomicUsize,
    /// Entries ever put into `overflow`.
    overflowed_total: AtomicU64,
    /// Entries ever moved from `overflow` into the ring.
    flushed_total: AtomicU64,
    /// Tail as of the last [`RefillRing::take_unflushed`].
    flush_mark: AtomicU32,
}

// SAFETY: the raw pointers refer to memory that `from_raw_parts`' caller (or the fake region
// held in `_memory`) keeps valid for the ring's lifetime, independent of any thread. All shared
// mutation goes through atomics, the mutex, or slots a thread has claimed exclusively (see
// `claim`), so the ring may be used from any thread and from several at once.
unsafe impl Send for RefillRing {}
// SAFETY: see `Send` above; `&self` methods synchronise through atomics and the mutex only.
unsafe impl Sync for RefillRing {}

impl RefillRing {
    /// Creates the producer for a ring in memory shared with the kernel (or anything playing
    /// it).
    ///
    /// `head`, `tail` and `rqes` are the region base plus the `offsets` the kernel wrote back
    /// at registration, `entries` the `rq_entries` it wrote back. The producer starts at the
    /// current tail, so entries already published stay published.
    ///
    /// # Errors
    ///
    /// [`RingSizeError`] unless `entries` is a power of two up to [`MAX_RING_ENTRIES`].
    ///
    /// # Safety
    ///
    /// For as long as the returned value (or anything borrowed from it) lives:
    ///
    /// - `head` and `tail` point to valid, 4-byte aligned `u32`s that are accessed only
    ///   atomically. `head` is written only by the consumer, which only moves it forward, never
    ///   past `tail`, and with release ordering after it has finished reading the entries it
    ///   passes. `tail` is written only through this `RefillRing`: there is no other
    ///   producer.
    /// - `rqes` points to `entries` valid, 8-byte aligned [`io_uring_zcrx_rqe`]s. The consumer
    ///   reads the slots between `head` and `tail` only after a load-acquire of `tail`, and
    ///   nothing but this `RefillRing` writes any slot.
    ///
    /// The memory must stay mapped while the kernel may still read it; this type does not
    /// unmap or free anything.
    pub unsafe fn from_raw_parts(
        head: *const AtomicU32,
        tail: *const AtomicU32,
        rqes: *mut io_uring_zcrx_rqe,
        entries: u32,
    ) -> Result<Self, RingSizeError> {
        // SAFETY: the caller's contract is this function's contract; `EntryCell` has the layout
        // of `io_uring_zcrx_rqe` (`repr(transparent)` over `core::cell::UnsafeCell`).
        unsafe { Self::from_cells(head, tail, rqes.cast::<EntryCell>(), entries, None) }
    }

    /// Shared constructor of [`Self::from_raw_parts`] and [`FakeRefillRegion`].
    ///
    /// # Safety
    ///
    /// As [`Self::from_raw_parts`].
    unsafe fn from_cells(
        head: *const AtomicU32,
        tail: *const AtomicU32,
        rqes: *const EntryCell,
        entries: u32,
        memory: Option<fake::SharedMemory>,
    ) -> Result<Self, RingSizeError> {
        if !entries.is_power_of_two() || entries > MAX_RING_ENTRIES {
            return Err(RingSizeError { entries });
        }
        // SAFETY: `tail` is valid and atomically accessed (caller contract).
        let start = unsafe { &*tail }.load(Ordering::Acquire);
        let mask = entries - 1;
        // Each slot's marker says "committed for the position one lap before the next one that
        // maps here", i.e. not committed for any position from `start` on.
        let committed = (0..entries)
            .map(|slot| {
                let next_position = start.wrapping_add(slot.wrapping_sub(start) & mask);
                AtomicU32::new(next_position.wrapping_sub(entries))
            })
            .collect();
        Ok(Self {
            reserve: CachePadded(AtomicU64::new(u64::from(start))),
            publication: CachePadded(Publication {
                requests: AtomicU64::new(0),
                published: AtomicU64::new(u64::from(start)),
            }),
            head,
            tail,
            rqes,
            committed,
            entries,
            initial_position: u64::from(start),
            cold: CachePadded(ColdState {
                overflow: Mutex::new(Vec::new()),
                overflow_len: AtomicUsize::new(0),
                overflowed_total: AtomicU64::new(0),
                flushed_total: AtomicU64::new(0),
                flush_mark: AtomicU32::new(start),
            }),
            _memory: memory,
        })
    }

    /// Number of slots in the ring.
    #[must_use]
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Returns one entry to the kernel; never blocks, never loses the entry.
    ///
    /// Lock-free unless the ring is full, in which case the entry goes to the overflow list
    /// (see [`PushOutcome::Overflowed`]).
    pub fn push(&self, entry: io_uring_zcrx_rqe) -> PushOutcome {
        let (first, claimed) = self.claim(1);
        if claimed == 0 {
            self.push_overflow(core::slice::from_ref(&entry));
            return PushOutcome::Overflowed;
        }
        self.write_and_commit(first, entry);
        self.publish();
        PushOutcome::InRing
    }

    /// Returns many entries at once: one claim and one publish per run of free slots instead
    /// of one per entry. What does not fit goes to the overflow list.
    pub fn push_batch(&self, entries: &[io_uring_zcrx_rqe]) -> BatchOutcome {
        let in_ring = self.push_into_ring(entries);
        let rest = &entries[in_ring..];
        if !rest.is_empty() {
            self.push_overflow(rest);
        }
        BatchOutcome {
            in_ring,
            overflowed: rest.len(),
        }
    }

    /// Moves overflowed entries into the ring as far as it has space; returns how many moved.
    ///
    /// Meant for the driver thread: call it whenever [`Self::has_overflow`] is true and the
    /// kernel may have consumed entries (after reaping completions, before a NODEV
    /// `ZCRX_CTRL_FLUSH_RQ`, on an `ALLOC_FAIL` event). Safe from any thread; it takes the
    /// overflow lock.
    pub fn flush_overflow(&self) -> usize {
        if !self.has_overflow() {
            return 0;
        }
        let mut overflow = lock(&self.cold.overflow);
        // Take from the end, so that what is left stays in place.
        let moved = self.push_into_ring_from_end(overflow.as_slice());
        let left = overflow.len() - moved;
        overflow.truncate(left);
        self.cold
            .overflow_len
            .store(overflow.len(), Ordering::Release);
        self.cold
            .flushed_total
            .fetch_add(moved as u64, Ordering::Relaxed);
        moved
    }

    /// Whether entries wait in the overflow list. One atomic load; the driver can call it on
    /// every loop.
    #[must_use]
    pub fn has_overflow(&self) -> bool {
        self.cold.overflow_len.load(Ordering::Acquire) != 0
    }

    /// Number of entries waiting in the overflow list.
    #[must_use]
    pub fn overflow_len(&self) -> usize {
        self.cold.overflow_len.load(Ordering::Acquire)
    }

    /// Number of entries published since the previous call (or since creation), and resets
    /// that count.
    ///
    /// For a NODEV instance, whose kernel consumes the ring only on `ZCRX_CTRL_FLUSH_RQ`: a
    /// non-zero value means a flush would return buffers. Meant for a single caller (the
    /// driver); concurrent callers split the count between them. [`Self::unconsumed`] is the
    /// stateless alternative (what the kernel has not consumed yet).
    pub fn take_unflushed(&self) -> u32 {
        let tail = self.tail().load(Ordering::Acquire);
        let previous = self.cold.flush_mark.swap(tail, Ordering::Relaxed);
        tail.wrapping_sub(previous)
    }

    /// Entries published but not yet consumed by the kernel (`tail - head`).
    #[must_use]
    pub fn unconsumed(&self) -> u32 {
        // Head first: the tail read afterwards is at least as new, so the difference does not
        // underflow.
        let head = self.head().load(Ordering::Acquire);
        self.tail().load(Ordering::Acquire).wrapping_sub(head)
    }

    /// A snapshot of the counters; see [`RefillStats`].
    #[must_use]
    pub fn stats(&self) -> RefillStats {
        let unconsumed = self.unconsumed();
        // Published before reserve: every published position was reserved first, so
        // `claimed - published` cannot underflow.
        let published = self.publication.published.load(Ordering::Acquire) - self.initial_position;
        let claimed = self.reserve.load(Ordering::Relaxed) - self.initial_position;
        let overflowed = self.cold.overflowed_total.load(Ordering::Relaxed);
        let flushed = self.cold.flushed_total.load(Ordering::Relaxed);
        RefillStats {
            pushed: (claimed + overflowed).saturating_sub(flushed),
            published,
            overflowed,
            overflow_pending: self.overflow_len(),
            unconsumed,
        }
    }

    fn head(&self) -> &AtomicU32 {
        // SAFETY: valid for our lifetime and only accessed atomically (constructor contract).
        unsafe { &*self.head }
    }

    fn tail(&self) -> &AtomicU32 {
        // SAFETY: as `head`.
        unsafe { &*self.tail }
    }

    fn marker(&self, position: u32) -> &AtomicU32 {
        &self.committed[(position & (self.entries - 1)) as usize]
    }

    /// Claims up to `want` consecutive positions. Returns the first and how many were claimed:
    /// 0 when the ring is full.
    ///
    /// The claimed slots belong to the caller until it commits them: the kernel has consumed
    /// them (acquire on head) and no other producer can claim them before the tail has passed
    /// them, which needs the caller's commit.
    fn claim(&self, want: u32) -> (u32, u32) {
        let mut reserved = self.reserve.load(Ordering::Relaxed);
        loop {
            // Reserve before head, and the CAS below succeeds only if the reserve has not
            // moved since: the head was then read while the reserve was `reserved`, when the
            // kernel's 64-bit head was within `entries` below it, so its low 32 bits cannot be
            // mistaken for a value 2^32 positions away however long we were preempted.
            let head = self.head().load(Ordering::Acquire);
            let used = (reserved as u32).wrapping_sub(head);
            if used > self.entries {
                // The head is ahead of our reserve: others claimed, published and had it
                // consumed since we read it. The acquire on the head makes the re-read newer.
                let now = self.reserve.load(Ordering::Relaxed);
                if now != reserved {
                    reserved = now;
                    continue;
                }
                // The consumer broke its contract (head beyond tail): treat that as full
                // rather than spin or overwrite unread entries.
                return (0, 0);
            }
            if used == self.entries {
                return (0, 0);
            }
            let count = want.min(self.entries - used);
            match self.reserve.compare_exchange_weak(
                reserved,
                reserved + u64::from(count),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return (reserved as u32, count),
                Err(now) => reserved = now,
            }
        }
    }

    /// Writes `entry` into the claimed slot for `position` and marks it committed.
    fn write_and_commit(&self, position: u32, entry: io_uring_zcrx_rqe) {
        let slot = (position & (self.entries - 1)) as usize;
        // SAFETY: `slot < entries`, so the pointer is inside the slot array (constructor
        // contract), and the slot is ours alone until committed (see `claim`): neither the
        // kernel nor another producer accesses it now.
        unsafe { (*self.rqes.add(slot)).with_mut(|p| ptr::write(p, entry)) };
        // Release: whoever sees the marker (and then publishes) sees the entry.
        self.marker(position).store(position, Ordering::Release);
    }

    /// Claims, writes and publishes as many of `entries` as fit, in order, returning how many.
    fn push_into_ring(&self, entries: &[io_uring_zcrx_rqe]) -> usize {
        let mut done = 0;
        while done < entries.len() {
            let want = u32::try_from(entries.len() - done).unwrap_or(u32::MAX);
            let (first, claimed) = self.claim(want);
            if claimed == 0 {
                break;
            }
            for (i, entry) in entries[done..done + claimed as usize].iter().enumerate() {
                self.write_and_commit(first.wrapping_add(i as u32), *entry);
            }
            done += claimed as usize;
            // Publish each run before claiming more: space only reappears once the kernel has
            // seen (and consumed) what we wrote.
            self.publish();
        }
        done
    }

    /// As [`Self::push_into_ring`], but takes entries from the end of the slice; returns how
    /// many of the last entries went into the ring.
    fn push_into_ring_from_end(&self, entries: &[io_uring_zcrx_rqe]) -> usize {
        let mut end = entries.len();
        while end > 0 {
            let want = u32::try_from(end).unwrap_or(u32::MAX);
            let (first, claimed) = self.claim(want);
            if claimed == 0 {
                break;
            }
            let run = &entries[end - claimed as usize..end];
            for (i, entry) in run.iter().enumerate() {
                self.write_and_commit(first.wrapping_add(i as u32), *entry);
            }
            end -= claimed as usize;
            self.publish();
        }
        entries.len() - end
    }

    /// Makes every committed entry visible to the kernel, now or through the publisher at
    /// work. Called after committing.
    ///
    /// The increment of `requests` elects the publisher (the one that finds 0). The publisher
    /// is the only writer of `published` and of the kernel tail until it resets `requests`,
    /// which it does only with a CAS from the last value it saw: a request that arrives
    /// meanwhile makes that CAS fail, and the failed CAS acquires the request (and so the
    /// requester's commit) before the publisher scans again. The requests' RMWs are totally
    /// ordered, so every commit is followed either by its own publication or by a scan of the
    /// publisher in office, and nothing stays unpublished once all pushes have returned.
    ///
    /// A marker from an older lap than the position means that slot is not committed yet; its
    /// producer asks for publication after committing. While the publisher scans, no position
    /// at or past `published` can be published, consumed and reused, so a marker is never
    /// from a newer lap, and the 32-bit markers cannot be confused across 2^32 positions.
    fn publish(&self) {
        let requests = &self.publication.requests;
        let mut seen = requests.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        if seen != 1 {
            // A publisher is at work: its CAS will fail on our increment and it scans again.
            return;
        }
        loop {
            // Ours alone while `requests` is non-zero; the acquire of our increment (or of the
            // last failed CAS) made the previous publisher's value visible.
            let start = self.publication.published.load(Ordering::Relaxed);
            let mut end = start;
            // Acquire: the entry written before each marker becomes ours to release below.
            while end - start < u64::from(self.entries)
                && self.marker(end as u32).load(Ordering::Acquire) == end as u32
            {
                end += 1;
            }
            if end != start {
                // Release: the kernel's load-acquire of the tail sees every entry up to `end`.
                // Only the publisher stores here, in the order of its positions, so the tail
                // never moves back.
                self.tail().store(end as u32, Ordering::Release);
                // Release: `stats` reads it with acquire after the tail it covers.
                self.publication.published.store(end, Ordering::Release);
            }
            // Leave only if no request arrived since `seen`; otherwise scan for it.
            match requests.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => seen = now,
            }
        }
    }

    /// An acquire-release read-modify-write that leaves the ring unchanged, on the word every
    /// push and every overflow ends with an RMW on; see "Waking the ring's owner" in the
    /// [module docs](self).
    ///
    /// The owner (the driver thread) calls it after announcing that it is about to sleep and
    /// before it looks at [`Self::has_overflow`] or [`Self::stats`] one last time: a push whose
    /// RMW came first is visible to that look; a push whose RMW comes later sees what the owner
    /// wrote before this call (its `sleeping` flag, a "waiting for returns" flag) when it reads
    /// them after the push has returned, and can wake the owner.
    pub fn synchronize_with_producers(&self) {
        self.publication.requests.fetch_add(0, Ordering::AcqRel);
    }

    fn push_overflow(&self, entries: &[io_uring_zcrx_rqe]) {
        let mut overflow = lock(&self.cold.overflow);
        overflow.extend_from_slice(entries);
        self.cold
            .overflowed_total
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.cold
            .overflow_len
            .store(overflow.len(), Ordering::Release);
        drop(overflow);
        // The owner's half of the wake-up handshake (`synchronize_with_producers`) orders
        // against this: either it sees the overflow, or our caller sees it is going to sleep.
        self.publication.requests.fetch_add(0, Ordering::AcqRel);
    }
}

impl fmt::Debug for RefillRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefillRing")
            .field("entries", &self.entries)
            .field("head", &self.head().load(Ordering::Relaxed))
            .field("tail", &self.tail().load(Ordering::Relaxed))
            .field("reserve", &self.reserve.load(Ordering::Relaxed))
            .field("overflow_len", &self.overflow_len())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
