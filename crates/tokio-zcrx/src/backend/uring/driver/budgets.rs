//! Per-stream budgets and memory pressure: what each stream may hold of the area, pausing a
//! stream that holds its budget and resuming it once its reader dropped buffers, and the
//! `StreamPaused` and `MemoryHighWater` events.
//!
//! A stream's budget is `BudgetPolicy::budget(attached streams)` over the area, unless fixed
//! per stream (`StreamOptions::budget`) or per runtime (`Builder::stream_budget`); `u64::MAX`
//! turns it off, and the stream keeps the one unlimited multishot request. A budgeted
//! stream's requests ask the kernel for at most its room, and when one ends at its limit
//! the receive state machine ([`zcrx_core::receive`]) goes on or pauses. What a stream holds
//! is counted per slot in the area (`holdings.rs`): the release of its last buffers past
//! the low mark wakes the driver, which resumes it here.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zcrx_core::budget::Budget;
use zcrx_core::receive::{Holding, StreamReceive};

use super::super::ring::CompletionRing;
use super::Driver;
use crate::event::EventKind;

/// At most one StreamPaused event per this interval.
const STREAM_PAUSED_EVENT_INTERVAL: Duration = Duration::from_millis(100);
/// At most one MemoryHighWater event per this interval.
const HIGH_WATER_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// When the pressure events last went out, and whether MemoryHighWater may go out again.
#[derive(Debug)]
pub(super) struct PressureEvents {
    last_stream_paused: Option<Instant>,
    last_high_water: Option<Instant>,
    /// Cleared by a MemoryHighWater event, set again once the holding is below half.
    high_water_armed: bool,
    /// The area was under pressure (`BudgetPolicy::under_pressure`) at the last look.
    under_pressure: bool,
}

impl Default for PressureEvents {
    fn default() -> Self {
        PressureEvents {
            last_stream_paused: None,
            last_high_water: None,
            high_water_armed: true,
            under_pressure: false,
        }
    }
}

impl<R: CompletionRing> Driver<R> {
    /// The budget of the stream in `slot` now, if any.
    fn budget(&self, slot: u32) -> Option<Budget> {
        let entry = self.streams.get(slot)?;
        if entry.tag == 0 {
            // Its slot does not fit in a buffer's tag: its holding cannot be counted.
            return None;
        }
        let budget = match entry.fixed_budget {
            Some(bytes) => Budget::new(bytes),
            None => self
                .budget_policy
                .budget_under(self.streams.len(), self.area.memory_held()),
        };
        (!budget.is_unlimited()).then_some(budget)
    }

    /// What the stream in `slot` holds against its budget, for its receive state machine
    /// (`None`: no budget).
    pub(super) fn holding(&self, slot: u32) -> Option<Holding> {
        let budget = self.budget(slot)?;
        let chunk = u64::from(self.area.chunk_size);
        let tag = self.streams.get(slot)?.tag;
        Some(Holding {
            budget,
            held: self.area.holdings.held(tag) * chunk,
            granule: chunk,
            fill: self.chunk_fill,
        })
    }

    /// Keeps `Stats::streams_paused` with what a step made of a stream.
    pub(super) fn count_paused(&mut self, was_paused: bool, is_paused: bool) {
        let paused = &self.area.counters.streams_paused;
        match (was_paused, is_paused) {
            (false, true) => {
                paused.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                paused.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The stream in `slot` holds its budget and no request runs for it: arm the wake-up
    /// at its low mark, count it and tell subscribers (rate-limited).
    pub(super) fn pause(&mut self, slot: u32) {
        let (Some(entry), Some(budget)) = (self.streams.get(slot), self.budget(slot)) else {
            return;
        };
        let low_chunks = budget.low / u64::from(self.area.chunk_size);
        if self.area.holdings.pause_until(entry.tag, low_chunks) {
            // Its reader dropped enough meanwhile: the next round resumes it.
            self.area.holdings.mark_resumable();
        }
        self.area
            .counters
            .stream_pauses
            .fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let due = self
            .pressure
            .last_stream_paused
            .is_none_or(|at| now.duration_since(at) >= STREAM_PAUSED_EVENT_INTERVAL);
        if due {
            self.pressure.last_stream_paused = Some(now);
            self.emit(EventKind::StreamPaused);
        }
    }

    /// Resumes the paused streams whose holding fell to their low mark, once a release
    /// said one did (no scan otherwise).
    ///
    /// Under memory pressure derived budgets are at their floor
    /// (`BudgetPolicy::budget_under`), and a stream paused then waits for a low mark of one
    /// chunk: when the pressure ends its normal budget may let it go on sooner, so while
    /// streams are paused under pressure every return wakes the driver to look again.
    pub(super) fn resume_paused_streams(&mut self) -> io::Result<()> {
        let pressure = self.budget_policy.under_pressure(self.area.memory_held());
        let paused = self.area.counters.streams_paused.load(Ordering::Relaxed) > 0;
        self.area.holdings.wake_on_every_return(pressure && paused);
        if std::mem::replace(&mut self.pressure.under_pressure, pressure) && !pressure && paused {
            self.area.holdings.mark_resumable();
        }
        if self.stopping.is_some() || !self.area.holdings.take_resumable() {
            return Ok(());
        }
        for slot in self.streams.slots() {
            let paused = self
                .streams
                .get(slot)
                .is_some_and(|e| e.receive.is_paused());
            if !paused {
                continue;
            }
            self.step(slot, StreamReceive::resume)?;
            // Still paused (not back at its mark yet, or its derived budget shrank): wait
            // for the mark again.
            let still_paused = self
                .streams
                .get(slot)
                .filter(|e| e.receive.is_paused())
                .map(|e| e.tag);
            if let (Some(tag), Some(budget)) = (still_paused, self.budget(slot)) {
                let low_chunks = budget.low / u64::from(self.area.chunk_size);
                if self.area.holdings.pause_until(tag, low_chunks) {
                    self.area.holdings.mark_resumable();
                }
            }
        }
        Ok(())
    }

    /// MemoryHighWater when the application holds 3/4 of the area or more, again only
    /// after it fell below half, at most once per [`HIGH_WATER_EVENT_INTERVAL`]. Once per
    /// reap (memory only grows by deliveries).
    pub(super) fn check_memory_high_water(&mut self) {
        let capacity = self.area.len() as u64;
        let held = self.area.memory_held();
        if !self.pressure.high_water_armed {
            if held < capacity / 2 {
                self.pressure.high_water_armed = true;
            }
            return;
        }
        if held < capacity / 4 * 3 {
            return;
        }
        let now = Instant::now();
        let due = self
            .pressure
            .last_high_water
            .is_none_or(|at| now.duration_since(at) >= HIGH_WATER_EVENT_INTERVAL);
        if due {
            self.pressure.last_high_water = Some(now);
            self.pressure.high_water_armed = false;
            self.emit(EventKind::MemoryHighWater);
        }
    }
}
