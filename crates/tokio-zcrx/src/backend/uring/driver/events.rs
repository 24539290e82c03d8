//! Events: the kernel's zcrx events in (Linux 7.2+), their rate-limited re-arming, and the
//! public [`Event`]s out to subscribers.

use std::sync::atomic::Ordering;
use std::time::Instant;

use zcrx_core::events::ZcrxEventType;

use super::super::ring::CompletionRing;
use super::growth::GrowthTrigger;
use super::Driver;
use crate::event::{Event, EventKind};

impl<R: CompletionRing> Driver<R> {
    /// Re-arms the zcrx events whose time has come (rate-limited by [`EventRearm`](zcrx_core::events::EventRearm)).
    pub(super) fn rearm_events(&mut self) {
        if !self.caps.events {
            return;
        }
        let now = Instant::now();
        let due: Vec<ZcrxEventType> = self.events.due_rearms(now).collect();
        for kind in due {
            match self.ring.arm_event(kind.type_index()) {
                // EINVAL: the kernel thinks it is armed already (it never fired for it).
                Ok(()) => {
                    self.events.mark_rearmed(kind);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.events.mark_rearmed(kind);
                }
                Err(e) => {
                    self.area
                        .counters
                        .failed_rearms
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "tokio-zcrx: re-arming a zcrx event failed");
                    self.events.rearm_failed(kind, now);
                }
            }
        }
    }

    /// A zcrx event CQE: counted, noted for re-arming, and passed on as a public event.
    pub(super) fn on_kernel_event(&mut self, kind: ZcrxEventType) {
        self.area
            .counters
            .kernel_events
            .fetch_add(1, Ordering::Relaxed);
        self.events.on_event(kind, Instant::now());
        match kind {
            ZcrxEventType::Copy => self.emit(EventKind::CopyFallback),
            ZcrxEventType::AllocFail => {
                self.emit(EventKind::AllocationFailure);
                self.grow(GrowthTrigger::AllocationFailure);
            }
            // A kernel newer than this library: counted above, nothing more to do with it.
            ZcrxEventType::Unknown(code) => {
                tracing::debug!(
                    code,
                    "tokio-zcrx: ignoring a zcrx event type this version does not know"
                )
            }
        }
    }

    /// Sends a public event with the current statistics.
    pub(super) fn emit(&self, kind: EventKind) {
        tracing::debug!(event = %kind, "tokio-zcrx: event");
        // No subscriber is fine: events are wake-ups, the statistics are the record.
        let mut stats = self.area.stats();
        self.shared.send_counters.fill(&mut stats);
        let _ = self.events_tx.send(Event {
            kind,
            stats,
            queue: self.shared.queue,
        });
    }
}
