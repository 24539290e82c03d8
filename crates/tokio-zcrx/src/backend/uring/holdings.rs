//! What each stream holds of the area, for budgets: chunks delivered to it and chunks its
//! buffers gave back, per stream slot.
//!
//! A buffer carries its stream's *tag* (the slot index plus one; 0 for none) in the high
//! bits of its `BufferSlot::offset`, above the largest area offset ([`SlotTags`]), since
//! `ZcBuf` has no room for another field. Its release, on any thread, adds to the
//! `returned` counter of that slot ([`Holdings::credit`]); the driver adds to `delivered`
//! as it hands buffers over. The table grows in segments as slots appear and never
//! shrinks or moves, so a release reads it without a lock.
//!
//! Slots are reused by new streams while the buffers of the slot's earlier streams may
//! still be held. A new stream starts by *inheriting* what its slot's earlier streams still
//! held ([`Holdings::begin_stream`]), which is subtracted from its holding; when those
//! late buffers come back they are credited to the slot like any other, so the new stream's
//! holding reads low by at most what its predecessors held. That errs on the side of
//! letting a stream receive, never of stalling one for buffers that are not its own.
//!
//! A paused stream sets its slot's `resume_at`: the release that brings `returned` to it
//! raises [`Holdings::take_resumable`] and wakes the driver, once; other releases only
//! compare two numbers on a cache line they write anyway.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use crate::sys::CachePadded;

/// How an area buffer's `BufferSlot::offset` holds three things, from the low bits up:
///
/// ```text
///  63 ........................ shift | shift-1 ..... area_shift | area_shift-1 ..... 0
///  stream tag (slot + 1; 0: none)    | area id (0 with one area) | offset in that area
/// ```
///
/// `area_shift` is the bits of the largest area's offsets, and the area id takes the bits
/// of the most areas the runtime may add (`Builder::area_growth`; none without growth), so
/// the tag keeps as many bits as the memory allows. This is the runtime's own packing, not
/// the kernel's: the kernel puts the area id at bit 48 ([`IORING_ZCRX_AREA_SHIFT`]) of its
/// completion offsets and refill entries, which the area builds from the id and offset
/// (`Area::refill_entry`); with the kernel's layout no bit would be left for the tag.
///
/// [`IORING_ZCRX_AREA_SHIFT`]: zcrx_sys::zcrx::IORING_ZCRX_AREA_SHIFT
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotTags {
    /// Offsets in an area are below `1 << area_shift`.
    area_shift: u32,
    /// Area ids are below `1 << (shift - area_shift)`; the tag starts here.
    shift: u32,
}

/// An area buffer's `BufferSlot::offset`, unpacked (see [`SlotTags`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaggedOffset {
    /// The area's id (the kernel's index).
    pub(crate) area: u16,
    /// The byte offset in that area.
    pub(crate) offset: u64,
    /// The stream's tag (0: none).
    pub(crate) tag: u64,
}

impl SlotTags {
    /// Tags for areas of at most `largest_area` bytes, at most `max_areas` of them (offsets
    /// up to 48 bits, checked by the decoder; at most 1024 areas, the kernel's limit).
    pub(crate) fn new(largest_area: u64, max_areas: u32) -> SlotTags {
        let bits = |n: u64| u64::BITS - n.saturating_sub(1).leading_zeros();
        let area_shift = bits(largest_area).max(1);
        SlotTags {
            area_shift,
            shift: area_shift + bits(u64::from(max_areas.max(1))),
        }
    }

    /// The tag of `slot`, or 0 (untracked) if it does not fit above the area ids or in the
    /// table.
    pub(crate) fn tag(&self, slot: u32) -> u64 {
        let tag = u64::from(slot) + 1;
        let bits = u64::BITS - self.shift;
        if tag >> bits.min(63) != 0 || tag > Holdings::CAPACITY as u64 {
            0
        } else {
            tag
        }
    }

    /// `offset` in area `area`, with `tag` above both.
    pub(crate) fn encode(&self, area: u16, offset: u64, tag: u64) -> u64 {
        debug_assert!(offset >> self.area_shift == 0);
        debug_assert!(u64::from(area) >> (self.shift - self.area_shift) == 0);
        offset | (u64::from(area) << self.area_shift) | tag.checked_shl(self.shift).unwrap_or(0)
    }

    /// The area, offset and tag of an encoded offset.
    pub(crate) fn decode(&self, encoded: u64) -> TaggedOffset {
        let below = |bits: u32| encoded & ((1u64 << bits) - 1);
        TaggedOffset {
            area: (below(self.shift) >> self.area_shift) as u16,
            offset: below(self.area_shift),
            tag: encoded.checked_shr(self.shift).unwrap_or(0),
        }
    }
}

/// One slot's counters, in chunks.
#[derive(Default)]
pub(crate) struct SlotHolding {
    /// Written by the driver only; read by statistics.
    driver: CachePadded<DriverSide>,
    /// Written by releases on any thread.
    released: CachePadded<ReleaseSide>,
}

#[derive(Default)]
struct DriverSide {
    /// Chunks delivered to the slot's streams, all of them.
    delivered: AtomicU64,
    /// What the slot's earlier streams held when its current stream began.
    inherited: AtomicU64,
}

struct ReleaseSide {
    /// Chunks the slot's buffers gave back, all of them.
    returned: AtomicU64,
    /// When `returned` reaches this, the paused stream may resume: wake the driver
    /// (`u64::MAX`: not paused).
    resume_at: AtomicU64,
    /// `returned` reached `resume_at`: the driver steps this stream (and no other paused
    /// one) when it looks ([`Holdings::take_reached`]).
    reached: AtomicBool,
}

impl Default for ReleaseSide {
    fn default() -> Self {
        ReleaseSide {
            returned: AtomicU64::new(0),
            resume_at: AtomicU64::new(u64::MAX),
            reached: AtomicBool::new(false),
        }
    }
}

/// The segments hold `FIRST << k` slots each.
const FIRST: usize = 64;
const SEGMENTS: usize = 20;

/// Every slot's counters; see the module docs.
pub(crate) struct Holdings {
    segments: [AtomicPtr<SlotHolding>; SEGMENTS],
    /// Slots allocated so far (driver only).
    allocated: AtomicU64,
    /// A paused stream's holding reached its resume mark.
    resumable: AtomicBool,
    /// Every return wakes the driver (paused streams under memory pressure).
    wake_on_every_return: AtomicBool,
}

impl Holdings {
    /// The most slots the table holds (about 67 million).
    pub(crate) const CAPACITY: usize = FIRST * ((1 << SEGMENTS) - 1);

    pub(crate) fn new() -> Holdings {
        Holdings {
            segments: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            allocated: AtomicU64::new(0),
            resumable: AtomicBool::new(false),
            wake_on_every_return: AtomicBool::new(false),
        }
    }

    /// Segment and index within it of tag `tag` (slot `tag - 1`).
    fn locate(tag: u64) -> (usize, usize) {
        // Slot s lives in segment k where FIRST * (2^k - 1) <= s < FIRST * (2^(k+1) - 1).
        let scaled = (tag as usize - 1) / FIRST + 1;
        let segment = (usize::BITS - 1 - scaled.leading_zeros()) as usize;
        let start = FIRST * ((1 << segment) - 1);
        (segment, tag as usize - 1 - start)
    }

    fn get(&self, tag: u64) -> Option<&SlotHolding> {
        if tag == 0 || tag > Holdings::CAPACITY as u64 {
            return None;
        }
        let (segment, index) = Self::locate(tag);
        let base = self.segments[segment].load(Ordering::Acquire);
        if base.is_null() {
            return None;
        }
        // SAFETY: a non-null segment holds `FIRST << segment` slots, allocated once and
        // freed only with `self`; `index` is below that by construction of `locate`.
        Some(unsafe { &*base.add(index) })
    }

    /// Makes sure the slot of `tag` exists (driver thread only).
    pub(crate) fn allocate(&self, tag: u64) {
        if tag == 0 || tag > Holdings::CAPACITY as u64 {
            return;
        }
        let (segment, _) = Self::locate(tag);
        for k in 0..=segment {
            if self.segments[k].load(Ordering::Relaxed).is_null() {
                let slots: Box<[SlotHolding]> =
                    (0..FIRST << k).map(|_| SlotHolding::default()).collect();
                let base = Box::into_raw(slots).cast::<SlotHolding>();
                self.segments[k].store(base, Ordering::Release);
                self.allocated
                    .store((FIRST * ((2 << k) - 1)) as u64, Ordering::Relaxed);
            }
        }
    }

    /// Slot `tag`'s next stream begins: it inherits what the slot's earlier streams still
    /// hold (driver thread).
    pub(crate) fn begin_stream(&self, tag: u64) {
        self.allocate(tag);
        if let Some(holding) = self.get(tag) {
            let delivered = holding.driver.delivered.load(Ordering::Relaxed);
            let returned = holding.released.returned.load(Ordering::Relaxed);
            holding
                .driver
                .inherited
                .store(delivered.saturating_sub(returned), Ordering::Relaxed);
            holding
                .released
                .resume_at
                .store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// One chunk delivered to slot `tag` (driver thread; a plain load and store).
    pub(crate) fn delivered(&self, tag: u64) {
        if let Some(holding) = self.get(tag) {
            let delivered = &holding.driver.delivered;
            delivered.store(delivered.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// Chunks the current stream of slot `tag` holds (see the module docs on inheritance).
    pub(crate) fn held(&self, tag: u64) -> u64 {
        self.get(tag).map_or(0, Self::held_by)
    }

    fn held_by(holding: &SlotHolding) -> u64 {
        let delivered = holding.driver.delivered.load(Ordering::Relaxed);
        let inherited = holding.driver.inherited.load(Ordering::Relaxed);
        let returned = holding.released.returned.load(Ordering::Relaxed);
        delivered.saturating_sub(returned).saturating_sub(inherited)
    }

    /// The most chunks any slot holds (statistics: a scan of the table).
    pub(crate) fn largest(&self) -> u64 {
        let allocated = self.allocated.load(Ordering::Relaxed);
        (1..=allocated)
            .filter_map(|tag| self.get(tag))
            .map(Self::held_by)
            .max()
            .unwrap_or(0)
    }

    /// The stream of slot `tag` paused: wake the driver once it holds `low` chunks or fewer.
    /// Returns whether it already does (then nothing is armed).
    pub(crate) fn pause_until(&self, tag: u64, low: u64) -> bool {
        let Some(holding) = self.get(tag) else {
            return true;
        };
        let delivered = holding.driver.delivered.load(Ordering::Relaxed);
        let inherited = holding.driver.inherited.load(Ordering::Relaxed);
        // held <= low  <=>  returned >= delivered - inherited - low
        let target = delivered.saturating_sub(inherited).saturating_sub(low);
        // A mark reached before (the stream went on meanwhile) is not this one's.
        holding.released.reached.store(false, Ordering::Relaxed);
        // SeqCst with `credit`'s: either its release sees the mark, or this load sees its
        // return.
        holding.released.resume_at.store(target, Ordering::SeqCst);
        if holding.released.returned.load(Ordering::SeqCst) >= target {
            holding
                .released
                .resume_at
                .store(u64::MAX, Ordering::Relaxed);
            holding.released.reached.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether the stream of slot `tag` reached its resume mark since it paused (clearing
    /// it): the driver steps only those, not every paused stream, when a release wakes it.
    pub(crate) fn take_reached(&self, tag: u64) -> bool {
        self.get(tag).is_some_and(|holding| {
            holding.released.reached.load(Ordering::Relaxed)
                && holding.released.reached.swap(false, Ordering::Relaxed)
        })
    }

    /// `n` chunks of slot `tag` came back (any thread). Returns whether a paused stream may
    /// now resume, i.e. whether the caller must wake the driver.
    pub(crate) fn credit(&self, tag: u64, n: u64) -> bool {
        let Some(holding) = self.get(tag) else {
            return false;
        };
        let released = &holding.released;
        let returned = released.returned.fetch_add(n, Ordering::SeqCst) + n;
        let reached = returned >= released.resume_at.load(Ordering::SeqCst)
            && released.resume_at.swap(u64::MAX, Ordering::SeqCst) != u64::MAX;
        if reached {
            released.reached.store(true, Ordering::Relaxed);
            // Publishes `reached` to the driver's `take_resumable`.
            self.resumable.store(true, Ordering::SeqCst);
            return true;
        }
        // Under pressure: wake the driver to see whether it ended (no stream to step).
        self.wake_on_every_return.load(Ordering::Relaxed)
    }

    /// Whether a paused stream reached its resume mark since the last call (driver).
    pub(crate) fn take_resumable(&self) -> bool {
        self.resumable.load(Ordering::SeqCst) && self.resumable.swap(false, Ordering::SeqCst)
    }

    /// Sets whether every return wakes the driver (to look at its paused streams).
    pub(crate) fn wake_on_every_return(&self, on: bool) {
        if self.wake_on_every_return.load(Ordering::Relaxed) != on {
            self.wake_on_every_return.store(on, Ordering::Relaxed);
        }
    }

    /// Makes the driver look at its paused streams on its next round.
    pub(crate) fn mark_resumable(&self) {
        self.resumable.store(true, Ordering::SeqCst);
    }

    /// Whether one did, without taking it (the driver's last look before sleeping).
    pub(crate) fn resumable(&self) -> bool {
        self.resumable.load(Ordering::SeqCst)
    }
}

impl Drop for Holdings {
    fn drop(&mut self) {
        for (k, segment) in self.segments.iter_mut().enumerate() {
            let base = *segment.get_mut();
            if !base.is_null() {
                // SAFETY: allocated in `allocate` as a boxed slice of `FIRST << k` slots, and
                // freed once, here.
                drop(unsafe {
                    Box::from_raw(std::ptr::slice_from_raw_parts_mut(base, FIRST << k))
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_above_the_area_offsets() {
        let tags = SlotTags::new(1 << 20, 1);
        let tag = tags.tag(5);
        assert_eq!(tag, 6);
        let encoded = tags.encode(0, (1 << 20) - 1, tag);
        let decoded = tags.decode(encoded);
        assert_eq!(
            (decoded.area, decoded.offset, decoded.tag),
            (0, (1 << 20) - 1, 6)
        );
        assert_eq!(tags.decode(4096).tag, 0);
        // A 2^48-byte area leaves 16 bits: slot 65534 is the last that fits.
        let tags = SlotTags::new(1 << 48, 1);
        assert_eq!(tags.tag(65534), 65535);
        assert_eq!(tags.tag(65535), 0);
    }

    #[test]
    fn area_ids_sit_between_the_offsets_and_the_tag() {
        // 256 KiB areas, up to 1024 of them (the kernel's limit): 18 + 10 bits, 36 for tags.
        let tags = SlotTags::new(256 << 10, 1024);
        for (area, offset, slot) in [(0, 0, 0), (1, 4096, 7), (1023, (256 << 10) - 1, 1 << 20)] {
            let tag = tags.tag(slot);
            assert_eq!(tag, u64::from(slot) + 1);
            let decoded = tags.decode(tags.encode(area, offset, tag));
            assert_eq!(
                decoded,
                TaggedOffset { area, offset, tag },
                "{area} {offset} {slot}"
            );
        }
        // Three areas take two bits; growth with a large area and many areas leaves fewer
        // bits for tags: 2^40-byte areas, 1024 of them, leave 14 bits.
        let tags = SlotTags::new(1 << 40, 1024);
        assert_eq!(tags.tag((1 << 14) - 2), (1 << 14) - 1);
        assert_eq!(tags.tag((1 << 14) - 1), 0, "no room: untracked");
        let decoded = tags.decode(tags.encode(1023, (1 << 40) - 1, (1 << 14) - 1));
        assert_eq!((decoded.area, decoded.offset), (1023, (1 << 40) - 1));
        let three = SlotTags::new(1 << 20, 3);
        assert_eq!(
            three.decode(three.encode(2, 5, 9)),
            TaggedOffset {
                area: 2,
                offset: 5,
                tag: 9
            }
        );
        assert_eq!(three.encode(2, 5, 9), 5 | (2 << 20) | (9 << 22));
    }

    #[test]
    fn segments_cover_every_slot_once() {
        let mut seen = std::collections::HashSet::new();
        for tag in 1..=(FIRST * 15) as u64 {
            let (segment, index) = Holdings::locate(tag);
            assert!(index < FIRST << segment, "{tag}");
            assert!(seen.insert((segment, index)));
        }
        assert_eq!(Holdings::locate(1), (0, 0));
        assert_eq!(Holdings::locate(FIRST as u64 + 1), (1, 0));
    }

    #[test]
    fn holdings_inherit_and_wake_once_at_the_resume_mark() {
        let holdings = Holdings::new();
        holdings.begin_stream(200);
        for _ in 0..10 {
            holdings.delivered(200);
        }
        assert_eq!(holdings.held(200), 10);
        assert_eq!(holdings.largest(), 10);
        assert!(!holdings.pause_until(200, 4));
        assert!(!holdings.credit(200, 5));
        assert!(holdings.credit(200, 1), "held 4: resume");
        assert!(holdings.take_resumable());
        assert!(!holdings.take_resumable());
        assert!(!holdings.credit(200, 1), "no second wake");
        // A new stream in the slot inherits the 3 still held, and is not charged for them.
        holdings.begin_stream(200);
        assert_eq!(holdings.held(200), 0);
        holdings.delivered(200);
        assert_eq!(holdings.held(200), 1);
        // A late return of the old stream's errs towards the new one.
        holdings.credit(200, 1);
        assert_eq!(holdings.held(200), 0);
        // Already at the mark: nothing armed.
        assert!(holdings.pause_until(200, 1));
    }
}
