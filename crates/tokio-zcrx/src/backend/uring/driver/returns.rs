//! Buffer returns and the area running out: moving returns into the refill ring, making the
//! kernel take them, and resubmitting receives that waited for buffers.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zcrx_core::receive::{Request, StreamReceive};

use super::super::ring::CompletionRing;
use super::growth::GrowthTrigger;
use super::{Driver, EXHAUSTION_RETRY};
use crate::event::EventKind;

/// At most one AreaExhausted event per this interval.
const AREA_EXHAUSTED_EVENT_INTERVAL: Duration = Duration::from_millis(100);

/// While returns wait in the overflow list for ring space, the driver looks again after
/// this long, doubling up to [`OVERFLOW_RECHECK_MAX`] while nothing changes: a NIC consumes
/// the ring only when its page pool refills (and kernels before 6.19 have no flush), so the
/// wait can be long, and an idle driver must not spin meanwhile.
const OVERFLOW_RECHECK_MIN: Duration = Duration::from_millis(1);
const OVERFLOW_RECHECK_MAX: Duration = Duration::from_millis(100);

impl<R: CompletionRing> Driver<R> {
    /// Moves returns that found the refill ring full into it, and makes the kernel take them
    /// where it would not by itself: in NODEV mode it consumes the ring only on FLUSH_RQ, and
    /// on a NIC queue only when the page pool refills, so a receive that ran out of area on
    /// the copy path (loopback or other-queue traffic) would wait forever without a flush.
    ///
    /// Kernels before 6.19 have no FLUSH_RQ: there the page pool's own refill and the retry
    /// timers have to do. A flush that fails is logged and counted, never fatal.
    pub(super) fn return_buffers(&mut self) {
        let mut moved = self.area.refill.flush_overflow();
        let flush_needed =
            self.nodev || self.waiting_for_buffers > 0 || self.area.refill.has_overflow();
        // Entries published but not consumed count too: a flush that failed took the
        // unflushed count with it, and in NODEV mode nothing else would ever consume them.
        if self.caps.ctrl
            && flush_needed
            && (self.area.refill.take_unflushed() > 0 || self.area.refill.unconsumed() > 0)
        {
            match self.ring.flush_refill() {
                Ok(()) => moved += self.area.refill.flush_overflow(),
                Err(e) => {
                    // Keep flushing: the query reported ZCRX_CTRL, so a refusal is not
                    // "unsupported", and in NODEV mode the flush is the only way chunks go
                    // back. The returns it did not flush stay unconsumed and are retried.
                    let failures = self
                        .area
                        .counters
                        .failed_flushes
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if failures.is_power_of_two() {
                        tracing::warn!(
                            error = %e,
                            failures,
                            "tokio-zcrx: ZCRX_CTRL_FLUSH_RQ failed; retrying on the next \
                             return or timer"
                        );
                    }
                }
            }
        }
        self.overflow_recheck = if self.area.refill.has_overflow() {
            let now = Instant::now();
            Some(match self.overflow_recheck {
                // Progress, or a new episode: look again soon.
                _ if moved > 0 => (now + OVERFLOW_RECHECK_MIN, OVERFLOW_RECHECK_MIN),
                None => (now + OVERFLOW_RECHECK_MIN, OVERFLOW_RECHECK_MIN),
                Some((at, backoff)) if now < at => (at, backoff),
                Some((_, backoff)) => {
                    let backoff = (backoff * 2).min(OVERFLOW_RECHECK_MAX);
                    (now + backoff, backoff)
                }
            })
        } else {
            None
        };
    }

    /// A count that moves whenever a return is claimed or published: claims alone would let
    /// a push that returned before an elected publisher stored the tail make the driver
    /// resubmit, see `-ENOMEM` again and then wait for the retry timer although the entries
    /// reached the kernel just after (zcrx_core::refill, "Publish").
    pub(super) fn returns_seen(&self) -> u64 {
        let stats = self.area.refill.stats();
        stats.pushed.wrapping_add(stats.published)
    }

    /// One fewer stream waits for area: when none does any more, the exhaustion bookkeeping
    /// goes, so the driver sleeps again and buffer drops stop waking it.
    pub(super) fn stop_waiting_for_buffers(&mut self) {
        self.waiting_for_buffers -= 1;
        if self.waiting_for_buffers == 0 {
            self.exhausted_at = None;
            self.area
                .driver_waits_for_buffers
                .store(false, Ordering::Relaxed);
        }
    }

    /// A stream's receive ran out of area (`ENOMEM`): it waits for buffers to come back, or
    /// for [`EXHAUSTION_RETRY`], whichever is first ([`Self::resume_waiting_streams`]).
    pub(super) fn wait_for_buffers(&mut self) {
        let now = Instant::now();
        if self.waiting_for_buffers == 0 {
            self.returns_at_exhaustion = self.returns_seen();
            self.exhausted_at = Some(now);
        }
        self.waiting_for_buffers += 1;
        // One event per episode at most every AREA_EXHAUSTED_EVENT_INTERVAL: a
        // burst of streams running out together is one fact, and the statistics
        // (resubmits_area_exhausted) count every occurrence.
        let due = self
            .last_exhausted_event
            .is_none_or(|at| now.duration_since(at) >= AREA_EXHAUSTED_EVENT_INTERVAL);
        if due {
            self.last_exhausted_event = Some(now);
            self.emit(EventKind::AreaExhausted);
        }
        // Only if the application holds half the memory or more: otherwise the chunks are on
        // their way back (returned, not yet taken by the kernel: in NODEV mode only a flush
        // takes them), and growing would add memory nobody needs (measured in the guest:
        // NODEV grew to its maximum while the reader held nothing).
        let capacity = self.area.len() as u64;
        if self.area.memory_held() >= capacity / 2 && self.grow(GrowthTrigger::ReceiveOutOfMemory) {
            // More chunks now: resubmit on this turn rather than wait for returns.
            self.exhausted_at = Some(now.checked_sub(EXHAUSTION_RETRY).unwrap_or(now));
        }
    }

    /// Resubmits streams that ran out of area once buffers have come back.
    pub(super) fn resume_waiting_streams(&mut self) -> io::Result<()> {
        if self.waiting_for_buffers == 0 {
            return Ok(());
        }
        let returned = self.returns_seen();
        let retry_due = self
            .exhausted_at
            .is_some_and(|at| at.elapsed() >= EXHAUSTION_RETRY);
        if returned == self.returns_at_exhaustion && !retry_due {
            // Nothing came back yet: let drops (or the retry timer) wake us.
            self.area
                .driver_waits_for_buffers
                .store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.area
            .driver_waits_for_buffers
            .store(false, Ordering::Relaxed);
        self.returns_at_exhaustion = returned;
        self.exhausted_at = None;
        for slot in self.streams.slots() {
            let waiting = self
                .streams
                .get(slot)
                .is_some_and(|e| e.receive.request() == Request::WaitingForBuffers);
            if waiting {
                self.stop_waiting_for_buffers();
                self.area
                    .counters
                    .resubmits_area_exhausted
                    .fetch_add(1, Ordering::Relaxed);
                self.step(slot, StreamReceive::submit)?;
            }
        }
        Ok(())
    }
}
