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
/// NIC mode: a stream paused this long has stalled (see
/// `Driver::shrink_stalled_receive_buffers`).
const STALL_AFTER: Duration = Duration::from_millis(100);
/// NIC mode: what a stalled stream's socket may queue, in chunks.
const STALLED_RECEIVE_BUFFER_CHUNKS: u32 = 4;
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
    pub(super) fn budget(&self, slot: u32) -> Option<Budget> {
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

    /// NIC mode: bounds the TCP window of the stream in `slot` by its budget's chunks of
    /// segments (`TCP_WINDOW_CLAMP`), when attached and when its budget shrinks (more
    /// streams, memory pressure) to half or less.
    ///
    /// On a NIC queue bound to zcrx every byte the kernel queues for a socket is already in
    /// the area, read or not, and TCP never takes back a window it advertised. The clamp
    /// replaces the few chunks' window of a prepared listener's connections (so that they
    /// can start) and keeps a stream that does not read from opening its window wider.
    /// TCP's receive buffer autotuning raises the clamp again as a stream reads; what
    /// bounds a stream that stopped reading is [`Self::shrink_stalled_receive_buffers`].
    pub(super) fn adjust_window(&mut self, slot: u32, budget: Budget) {
        let Some(payload) = self.segment_payload else {
            return;
        };
        let chunk = u64::from(self.area.chunk_size);
        let Some(entry) = self.streams.get_mut(slot) else {
            return;
        };
        let chunks = (budget.high / chunk).max(2);
        let target = u32::try_from(chunks.saturating_mul(u64::from(payload))).unwrap_or(u32::MAX);
        let current = entry.window_clamp;
        if current != 0 && u64::from(target) * 2 > u64::from(current) {
            return;
        }
        entry.window_clamp = target;
        if let Err(error) = crate::sys::set_tcp_window_clamp(entry.socket(), target) {
            // A socket already closed by its peer, or not TCP (the synthetic kernel's).
            tracing::debug!("tokio-zcrx: TCP_WINDOW_CLAMP {target}: {error}");
        }
    }

    /// NIC mode: a stream paused for [`STALL_AFTER`] has stalled: its socket's receive
    /// buffer shrinks to a few chunks (`SO_RCVBUF`), so that what its peer sends beyond
    /// that is dropped by TCP (and sent again later) instead of taking chunks of the area
    /// while nobody reads it. A window clamp alone does not do it: the window already
    /// advertised stays open. A stream paused for less keeps its buffer (a brief pause must
    /// not cost retransmissions). Its buffer comes back when it resumes
    /// ([`Self::restore_receive_buffer`]).
    ///
    /// Not in NODEV mode: there the socket queues are the kernel's memory, not the area's,
    /// as with any TCP server; and shrinking a buffer that already holds more makes TCP
    /// collapse the queue (copying it) at every arrival, for no memory back.
    pub(super) fn shrink_stalled_receive_buffers(&mut self) {
        let now = Instant::now();
        if self.stall_check_at.is_none_or(|at| at > now) {
            return;
        }
        self.stall_check_at = None;
        let stalled_rcvbuf = STALLED_RECEIVE_BUFFER_CHUNKS * (self.area.chunk_size + 1024) / 2;
        for slot in self.streams.slots() {
            let Some(entry) = self.streams.get_mut(slot) else {
                continue;
            };
            let Some(paused_at) = entry.paused_at else {
                continue;
            };
            if entry.saved_rcvbuf.is_some() {
                continue;
            }
            let stalled_at = paused_at + STALL_AFTER;
            if stalled_at > now {
                self.stall_check_at = Some(
                    self.stall_check_at
                        .map_or(stalled_at, |at| at.min(stalled_at)),
                );
                continue;
            }
            match crate::sys::receive_buffer(entry.socket()) {
                Ok(rcvbuf) => {
                    entry.saved_rcvbuf = Some(rcvbuf);
                    if let Err(error) =
                        crate::sys::set_receive_buffer(entry.socket(), stalled_rcvbuf)
                    {
                        tracing::debug!("tokio-zcrx: SO_RCVBUF {stalled_rcvbuf}: {error}");
                    }
                }
                Err(error) => tracing::debug!("tokio-zcrx: SO_RCVBUF: {error}"),
            }
        }
    }

    /// The stream in `slot` is no longer paused: it gives back the receive buffer a stall
    /// took ([`Self::shrink_stalled_receive_buffers`]), as large as it was (the kernel
    /// reports twice what it is set to; its autotuning stays off for the socket).
    pub(super) fn restore_receive_buffer(&mut self, slot: u32) {
        let Some(entry) = self.streams.get_mut(slot) else {
            return;
        };
        entry.paused_at = None;
        if let Some(rcvbuf) = entry.saved_rcvbuf.take() {
            if let Err(error) = crate::sys::set_receive_buffer(entry.socket(), rcvbuf / 2) {
                tracing::debug!("tokio-zcrx: SO_RCVBUF {}: {error}", rcvbuf / 2);
            }
        }
    }

    /// NIC mode: lifts the window clamp a prepared listener gave the socket of the stream in
    /// `slot` (an unbudgeted stream): the largest window TCP has (1 GiB).
    pub(super) fn unclamp_window(&mut self, slot: u32) {
        const LARGEST_TCP_WINDOW: u32 = 65535 << 14;
        if self.segment_payload.is_none() {
            return;
        }
        if let Some(entry) = self.streams.get_mut(slot) {
            if let Err(error) = crate::sys::set_tcp_window_clamp(entry.socket(), LARGEST_TCP_WINDOW)
            {
                tracing::debug!("tokio-zcrx: TCP_WINDOW_CLAMP {LARGEST_TCP_WINDOW}: {error}");
            }
        }
    }

    /// Bounds every budgeted stream's window by its budget again (memory pressure began or
    /// ended, and derived budgets with it).
    fn clamp_all_windows(&mut self) {
        if self.segment_payload.is_none() {
            return;
        }
        for slot in self.streams.slots() {
            if let Some(budget) = self.budget(slot) {
                self.adjust_window(slot, budget);
            }
        }
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
        if self.segment_payload.is_some() {
            let now = Instant::now();
            let entry = self.streams.get_mut(slot).expect("looked up above");
            let paused_at = *entry.paused_at.get_or_insert(now);
            let stalled_at = paused_at + STALL_AFTER;
            self.stall_check_at = Some(
                self.stall_check_at
                    .map_or(stalled_at, |at| at.min(stalled_at)),
            );
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

    /// Resumes the paused streams whose holding fell to their low mark: only those a
    /// release marked (`Holdings::take_reached`), and nothing unless one did.
    ///
    /// Under memory pressure derived budgets are at their floor
    /// (`BudgetPolicy::budget_under`), and a stream paused then waits for a low mark of one
    /// chunk: when the pressure ends its normal budget may let it go on sooner, so while
    /// streams are paused under pressure every return wakes the driver to look at the
    /// pressure, and its end steps every paused stream once.
    pub(super) fn resume_paused_streams(&mut self) -> io::Result<()> {
        let pressure = self.budget_policy.under_pressure(self.area.memory_held());
        let paused = self.area.counters.streams_paused.load(Ordering::Relaxed) > 0;
        self.area.holdings.wake_on_every_return(pressure && paused);
        let was_under_pressure = std::mem::replace(&mut self.pressure.under_pressure, pressure);
        if was_under_pressure != pressure {
            self.clamp_all_windows();
        }
        // Derived budgets grew back with the end of the pressure: every paused stream may
        // go on sooner than its mark.
        let every_paused_stream = was_under_pressure && !pressure && paused;
        let some_reached = self.area.holdings.take_resumable();
        if self.stopping.is_some() || !(some_reached || every_paused_stream) {
            return Ok(());
        }
        for slot in self.streams.slots() {
            // Only the streams whose release reached their mark, unless every one may go
            // on: stepping all of them for one stream's release costs O(streams) per cycle.
            let step = self.streams.get(slot).is_some_and(|e| {
                e.receive.is_paused()
                    && (every_paused_stream || self.area.holdings.take_reached(e.tag))
            });
            if !step {
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
