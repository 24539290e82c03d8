//! Per-stream receive budgets: how many bytes one stream may hold before it stops receiving.
//!
//! A stream *holds* the bytes of every buffer delivered to it and not yet dropped. Every
//! stream of a runtime draws its buffers from one shared, finite memory (the zcrx area, or
//! the copy backend's pool), so a reader that stops dropping buffers (a peer that does not
//! read its replies while the handler holds a buffer across the write, a leaked buffer, a
//! slow consumer) would otherwise exhaust it for every connection. With a budget, such a
//! stream stops receiving once it holds [`Budget::high`] bytes, and resumes when it is back
//! at [`Budget::low`], or below `high` once its reader has taken everything and waits for
//! more (see [`crate::receive`]): its backlog waits in its own socket buffer, and TCP flow
//! control slows its peer, instead of the shared memory filling up.
//!
//! [`BudgetPolicy`] derives each stream's budget from the shared memory's size and the number
//! of open streams, unless the application fixed one:
//!
//! ```
//! use zcrx_core::budget::BudgetPolicy;
//!
//! // A 64 MiB area of 4 KiB chunks.
//! let policy = BudgetPolicy::new(64 << 20, 4096);
//! // Alone, a stream may hold a quarter of the area: a fast reader is not held back.
//! assert_eq!(policy.budget(1).high, 16 << 20);
//! // With 1,000 streams, half the area is shared out: 32 KiB each (a multiple of 4 KiB).
//! assert_eq!(policy.budget(1000).high, 32 << 10);
//! // With 100,000 streams, each may still hold two chunks, so every stream progresses.
//! assert_eq!(policy.budget(100_000).high, 8 << 10);
//! // Paused streams resume at half their budget.
//! assert_eq!(policy.budget(1000).low, 16 << 10);
//! ```

/// A stream's budget, in bytes held (delivered and not yet dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// A stream that holds this many bytes or more stops receiving.
    pub high: u64,
    /// A stopped stream receives again once it holds this many bytes or fewer (or, once its
    /// reader waits for more, as soon as it holds less than `high`).
    pub low: u64,
}

impl Budget {
    /// A budget of `high` bytes that resumes at half of it.
    pub fn new(high: u64) -> Budget {
        let high = high.max(1);
        Budget {
            high,
            low: high / 2,
        }
    }

    /// No limit: what a stream gets when budgets are turned off.
    pub const UNLIMITED: Budget = Budget {
        high: u64::MAX,
        low: u64::MAX,
    };

    /// Whether a stream holding `held` bytes must stop receiving.
    pub fn exceeded(&self, held: u64) -> bool {
        held >= self.high
    }

    /// How many more bytes a stream holding `held` may receive before it reaches the budget:
    /// what a byte-limited receive request may ask for. Zero when it must stop.
    pub fn room(&self, held: u64) -> u64 {
        self.high.saturating_sub(held)
    }

    /// Whether this is [`Budget::UNLIMITED`] (or as good as: nothing can hold `u64::MAX`
    /// bytes), so that a runtime can keep its unlimited receive path.
    pub fn is_unlimited(&self) -> bool {
        self.high == u64::MAX
    }

    /// What one byte-limited receive request of a stream holding `held` bytes asks for, or
    /// `None` for no limit (an unlimited budget): its [`room`](Self::room) in whole
    /// `granule`s (the area's chunks), at least one, times `fill`, the bytes one granule is
    /// expected to carry (at most a granule), and at most a `u32`.
    ///
    /// The kernel limits a request in bytes, but a stream's holding grows by whole chunks:
    /// every segment lands in a chunk of its own, so 1,448-byte segments in 4 KiB chunks
    /// would take nearly three times the room if the request asked for the room in bytes.
    /// A stream at or over its budget must not be asked for at all ([`Self::exceeded`]);
    /// this still answers one granule's worth for it.
    pub fn request_len(&self, held: u64, granule: u64, fill: u64) -> Option<u32> {
        if self.is_unlimited() {
            return None;
        }
        let granule = granule.max(1);
        let fill = fill.clamp(1, granule);
        let granules = (self.room(held) / granule).max(1);
        // At most u32::MAX, so the cast keeps the value.
        Some(granules.saturating_mul(fill).min(u64::from(u32::MAX)) as u32)
    }
}

/// How streams' budgets are chosen.
///
/// By default a stream's budget is the larger of two shares of the shared memory's
/// `capacity`: half of it divided among the open streams, and two granules (two chunks or
/// two buffers, so that a stream can always receive one while its reader holds another). A
/// single stream never gets more than a quarter of the capacity, so that the others always
/// find memory. Budgets are rounded down to whole granules. The sum of all budgets stays
/// within half the capacity as long as `streams × 2 granules` does: beyond that (more
/// stalled streams than the memory can give two granules each) the shared memory can still
/// run out, and a larger area or pool is the fix (the statistics and the
/// memory high-water event say so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetPolicy {
    capacity: u64,
    granule: u64,
    fixed: Option<u64>,
}

impl BudgetPolicy {
    /// Budgets derived from a shared memory of `capacity` bytes handed out in `granule`-byte
    /// units (the area's chunk size, or the pool's largest buffer).
    pub fn new(capacity: u64, granule: u64) -> BudgetPolicy {
        BudgetPolicy {
            capacity,
            granule: granule.max(1),
            fixed: None,
        }
    }

    /// Every stream gets `high` bytes, whatever the number of streams (at least one byte).
    pub fn fixed(self, high: u64) -> BudgetPolicy {
        BudgetPolicy {
            fixed: Some(high.max(1)),
            ..self
        }
    }

    /// The shared memory's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The budget of each stream while `streams` streams are open (counting itself).
    pub fn budget(&self, streams: usize) -> Budget {
        if let Some(high) = self.fixed {
            return Budget::new(high);
        }
        let streams = (streams.max(1)) as u64;
        let floor = 2 * self.granule;
        let ceiling = (self.capacity / 4).max(floor);
        let share = self.capacity / 2 / streams;
        let high = share.clamp(floor, ceiling);
        // Whole granules: a budget that ends inside a granule would stop a stream one granule
        // early or late depending on its buffers' sizes.
        Budget::new((high / self.granule).max(1) * self.granule)
    }

    /// [`Self::budget`] while the application holds `held_total` bytes of the shared
    /// memory: from a quarter of the capacity on (*pressure*), a derived budget is a quarter
    /// of what is *left* shared among the streams (whole granules, at least two, at most the
    /// normal budget). Budgets are derived from the streams open *now*, but what a stream
    /// took while there were fewer stays held: streams that stall one after the other (each
    /// holding what it got) would otherwise add up to more than the memory (a quarter, a
    /// quarter, a sixth, an eighth, ...). Under pressure the budgets add up to a quarter of
    /// what is left (what a stream holds, and in NIC mode as much again queued in its
    /// socket, with room to spare for the NIC to receive into), so the memory lasts as long
    /// as two granules per stream fit in it. A fixed
    /// budget stays fixed.
    pub fn budget_under(&self, streams: usize, held_total: u64) -> Budget {
        let normal = self.budget(streams);
        if self.fixed.is_some() || !self.under_pressure(held_total) {
            return normal;
        }
        let streams = (streams.max(1)) as u64;
        let share = self.capacity.saturating_sub(held_total) / 4 / streams;
        let high = share.clamp(2 * self.granule, normal.high.max(2 * self.granule));
        Budget::new(high / self.granule * self.granule)
    }

    /// Whether `held_total` bytes held put the shared memory under pressure (a quarter of
    /// it or more), where derived budgets shrink to their floor ([`Self::budget_under`]).
    pub fn under_pressure(&self, held_total: u64) -> bool {
        held_total >= self.capacity / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_stops_at_high_and_resumes_at_low() {
        // When a paused stream resumes (at `low`, or below `high` while its reader waits) is
        // `receive::StreamReceive::resume_mark`'s.
        let budget = Budget::new(64 << 10);
        assert!(!budget.exceeded((64 << 10) - 1));
        assert!(budget.exceeded(64 << 10));
        assert_eq!(budget.low, 32 << 10);
        assert_eq!(budget.room(60 << 10), 4 << 10);
        assert_eq!(budget.room(70 << 10), 0);
    }

    #[test]
    fn derived_budgets_shrink_with_streams_but_never_below_two_granules() {
        let policy = BudgetPolicy::new(64 << 20, 4096);
        let mut last = u64::MAX;
        for streams in [0, 1, 2, 3, 10, 100, 1000, 4095, 4096, 10_000, 1 << 20] {
            let budget = policy.budget(streams);
            assert!(budget.high <= last, "grew at {streams} streams");
            assert!(budget.high >= 8192, "{streams}: {budget:?}");
            assert!(budget.high <= 16 << 20, "{streams}: {budget:?}");
            assert_eq!(budget.high % 4096, 0, "{streams}: {budget:?}");
            // Half the capacity covers every stream's budget while two granules each fit.
            if streams as u64 * 8192 <= 32 << 20 {
                assert!(streams.max(1) as u64 * budget.high <= 32 << 20, "{streams}");
            }
            last = budget.high;
        }
    }

    #[test]
    fn requests_ask_for_the_room_in_chunks_times_what_a_chunk_carries() {
        let budget = Budget::new(64 << 10);
        // Full chunks: the room itself.
        assert_eq!(budget.request_len(0, 4096, 4096), Some(64 << 10));
        // 1,448-byte segments, a chunk each: 16 chunks of room ask for 16 segments.
        assert_eq!(budget.request_len(0, 4096, 1448), Some(16 * 1448));
        // Room rounded down to whole chunks.
        assert_eq!(budget.request_len(10_000, 4096, 4096), Some(13 << 12));
        // Less than a chunk of room, or none: still one chunk (the caller pauses first).
        assert_eq!(budget.request_len((64 << 10) - 100, 4096, 4096), Some(4096));
        assert_eq!(budget.request_len(1 << 30, 4096, 100), Some(100));
        // A chunk never carries more than itself, nor less than a byte.
        assert_eq!(budget.request_len(0, 4096, 1 << 20), Some(64 << 10));
        assert_eq!(budget.request_len(0, 4096, 0), Some(16));
        // Never more than a u32.
        let huge = Budget::new(1 << 40);
        assert_eq!(huge.request_len(0, 4096, 4096), Some(u32::MAX));
        // Off: no limit at all.
        assert!(Budget::UNLIMITED.is_unlimited());
        assert_eq!(Budget::UNLIMITED.request_len(1 << 40, 4096, 4096), None);
        assert_eq!(Budget::new(u64::MAX).request_len(0, 4096, 4096), None);
    }

    #[test]
    fn under_pressure_derived_budgets_shrink_to_the_floor() {
        let policy = BudgetPolicy::new(1 << 20, 4096);
        assert_eq!(policy.budget_under(1, 0), policy.budget(1));
        assert_eq!(policy.budget_under(1, (256 << 10) - 1).high, 256 << 10);
        assert!(policy.under_pressure(256 << 10));
        // A quarter of what is left, shared: 768 KiB left, one stream: 192 KiB; 64 streams:
        // 3 KiB each, so the floor; 512 KiB left, 2 streams: 64 KiB each.
        assert_eq!(policy.budget_under(1, 256 << 10), Budget::new(192 << 10));
        assert_eq!(policy.budget_under(64, 256 << 10).high, 8192);
        assert_eq!(policy.budget_under(2, 512 << 10).high, 64 << 10);
        // All of it held: the floor.
        assert_eq!(policy.budget_under(1, 1 << 20).high, 8192);
        assert_eq!(policy.budget_under(64, 1 << 20).high, 8192);
        // Fixed budgets are the application's.
        let fixed = policy.fixed(100_000);
        assert_eq!(fixed.budget_under(1, 1 << 20).high, 100_000);
    }

    #[test]
    fn a_fixed_budget_ignores_the_stream_count() {
        let policy = BudgetPolicy::new(64 << 20, 4096).fixed(100_000);
        assert_eq!(policy.budget(1), policy.budget(1 << 20));
        assert_eq!(policy.budget(1).high, 100_000);
        assert_eq!(policy.budget(1).low, 50_000);
    }

    #[test]
    fn a_tiny_memory_still_gives_every_stream_something() {
        let policy = BudgetPolicy::new(8192, 65536);
        let budget = policy.budget(1);
        assert!(budget.high >= 1 && budget.room(0) > 0, "{budget:?}");
    }
}
