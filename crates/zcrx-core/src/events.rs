//! When to re-arm zcrx events: one-shot kernel events plus a rate limit.
//!
//! A zcrx event (Linux 7.2) fires once and stays silent until the ring's owner thread re-arms
//! it with `ZCRX_CTRL_ARM_EVENT`; re-arming a type that has not fired fails with `EINVAL`.
//! Re-arming right after every `COPY` event cost one event and one syscall per few hundred
//! KiB in NODEV mode, so re-arming is rate-limited: a kind that fired at `t` is due for
//! re-arming at `t + min_interval`. The events are wake-ups; the shared-memory stats are the
//! truth, so a delayed re-arm loses nothing but latency.
//!
//! [`EventRearm`] is that state machine per kind, without I/O or clocks: the driver passes
//! the time in.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use zcrx_core::events::{ZcrxEventType, EventRearm};
//!
//! let mut events = EventRearm::new(Duration::from_millis(10));
//! let t0 = Instant::now();
//! assert!(events.on_event(ZcrxEventType::Copy, t0)); // first since armed: react to it
//! assert_eq!(events.due_rearms(t0).count(), 0); // rate limited
//! assert_eq!(events.next_deadline(), Some(t0 + Duration::from_millis(10)));
//!
//! let later = t0 + Duration::from_millis(10);
//! for kind in events.due_rearms(later).collect::<Vec<_>>() {
//!     // ... ZCRX_CTRL_ARM_EVENT for kind.type_index() succeeded ...
//!     assert!(events.mark_rearmed(kind));
//! }
//! assert!(events.is_armed(ZcrxEventType::Copy));
//! assert_eq!(events.next_deadline(), None);
//! ```

use std::time::{Duration, Instant};

use zcrx_sys::event::{ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY};

/// A zcrx event type, as carried in an event CQE's `res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ZcrxEventType {
    /// [`ZCRX_EVENT_ALLOC_FAIL`]: the NIC's page pool found neither refill entries nor free
    /// chunks and drops packets until buffers come back.
    AllocFail,
    /// [`ZCRX_EVENT_COPY`]: packet data had to be copied instead of received in place.
    Copy,
    /// A type this crate does not know (a newer kernel); never re-armed.
    Unknown(u32),
}

impl ZcrxEventType {
    /// The kinds this crate can re-arm, in type-index order.
    pub const KNOWN: [ZcrxEventType; 2] = [ZcrxEventType::AllocFail, ZcrxEventType::Copy];

    /// The kind with kernel type index `index` (an event CQE's `res`).
    #[must_use]
    pub const fn from_type_index(index: u32) -> Self {
        match index {
            ZCRX_EVENT_ALLOC_FAIL => Self::AllocFail,
            ZCRX_EVENT_COPY => Self::Copy,
            other => Self::Unknown(other),
        }
    }

    /// The kernel type index (for `zcrx_ctrl_arm_event::event_type`).
    #[must_use]
    pub const fn type_index(self) -> u32 {
        match self {
            Self::AllocFail => ZCRX_EVENT_ALLOC_FAIL,
            Self::Copy => ZCRX_EVENT_COPY,
            Self::Unknown(index) => index,
        }
    }

    /// This kind's bit in `zcrx_event_desc::type_mask`; 0 if the index does not fit.
    #[must_use]
    pub const fn type_mask_bit(self) -> u32 {
        match 1u32.checked_shl(self.type_index()) {
            Some(bit) => bit,
            None => 0,
        }
    }

    /// Index into per-kind arrays, `None` for unknown kinds.
    const fn known_index(self) -> Option<usize> {
        match self {
            Self::AllocFail => Some(0),
            Self::Copy => Some(1),
            Self::Unknown(_) => None,
        }
    }
}

/// Counters kept by [`EventRearm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventStats {
    /// `ALLOC_FAIL` events seen.
    pub alloc_fail: u64,
    /// `COPY` events seen.
    pub copy: u64,
    /// Events of unknown types seen.
    pub unknown: u64,
    /// Known events seen while already fired (the kernel should not send them; counted, not
    /// acted on).
    pub unexpected: u64,
    /// Successful re-arms ([`EventRearm::mark_rearmed`]).
    pub rearms: u64,
    /// Failed re-arm attempts ([`EventRearm::rearm_failed`]).
    pub rearm_failures: u64,
}

/// Per-kind arm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArmState {
    /// The kernel will deliver the next event of this kind.
    Armed,
    /// Delivered; silent until re-armed. `due` is when re-arming is allowed, `None` for never
    /// (the interval overflowed `Instant`).
    Fired { due: Option<Instant> },
}

/// Re-arm state and rate limit for the known event kinds; see the [module docs](self).
///
/// Driver-thread state: every method takes the current time from the caller.
#[derive(Debug, Clone)]
pub struct EventRearm {
    min_interval: Duration,
    states: [ArmState; ZcrxEventType::KNOWN.len()],
    stats: EventStats,
}

impl EventRearm {
    /// Least delay before re-arming after a failed `ZCRX_CTRL_ARM_EVENT`, even with a zero
    /// `min_interval`, so that a persistent error does not become a syscall loop.
    pub const RETRY_FLOOR: Duration = Duration::from_millis(10);

    /// All known kinds armed (as registration leaves them), re-arming at most once per
    /// `min_interval` per kind (`Duration::ZERO`: as soon as an event arrives).
    #[must_use]
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            states: [ArmState::Armed; ZcrxEventType::KNOWN.len()],
            stats: EventStats::default(),
        }
    }

    /// The configured rate limit.
    #[must_use]
    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    /// Records an event CQE of `kind` received at `now`. Returns `true` if the kind was armed,
    /// i.e. this is the first event since it was (re-)armed; `false` for an unknown kind or
    /// one already fired (counted, otherwise ignored).
    pub fn on_event(&mut self, kind: ZcrxEventType, now: Instant) -> bool {
        let Some(index) = kind.known_index() else {
            self.stats.unknown += 1;
            return false;
        };
        match kind {
            ZcrxEventType::AllocFail => self.stats.alloc_fail += 1,
            _ => self.stats.copy += 1,
        }
        match self.states[index] {
            ArmState::Armed => {
                self.states[index] = ArmState::Fired {
                    due: now.checked_add(self.min_interval),
                };
                true
            }
            // Keep the earlier due time: the rate limit counts from the first event.
            ArmState::Fired { .. } => {
                self.stats.unexpected += 1;
                false
            }
        }
    }

    /// The kinds that have fired and whose re-arm time has come by `now`. Only these may be
    /// re-armed; the kernel rejects re-arming an armed kind.
    pub fn due_rearms(&self, now: Instant) -> impl Iterator<Item = ZcrxEventType> + '_ {
        ZcrxEventType::KNOWN
            .into_iter()
            .zip(self.states)
            .filter_map(move |(kind, state)| match state {
                ArmState::Fired { due: Some(due) } if due <= now => Some(kind),
                _ => None,
            })
    }

    /// Records that `kind` was re-armed: call after `ZCRX_CTRL_ARM_EVENT` succeeded (or
    /// failed with `EINVAL`, which means the kernel has it armed already). Returns `false`,
    /// changing nothing, if `kind` is not in the fired state (unknown, or never fired).
    pub fn mark_rearmed(&mut self, kind: ZcrxEventType) -> bool {
        match kind.known_index() {
            Some(index) if matches!(self.states[index], ArmState::Fired { .. }) => {
                self.states[index] = ArmState::Armed;
                self.stats.rearms += 1;
                true
            }
            _ => false,
        }
    }

    /// Records that re-arming `kind` failed at `now` for another reason than `EINVAL` (e.g.
    /// `EINTR`): it stays fired and is due again after `min_interval`, but at least
    /// [`Self::RETRY_FLOOR`]. Returns `false`, changing nothing, if `kind` is not fired.
    pub fn rearm_failed(&mut self, kind: ZcrxEventType, now: Instant) -> bool {
        match kind.known_index() {
            Some(index) if matches!(self.states[index], ArmState::Fired { .. }) => {
                let delay = self.min_interval.max(Self::RETRY_FLOOR);
                self.states[index] = ArmState::Fired {
                    due: now.checked_add(delay),
                };
                self.stats.rearm_failures += 1;
                true
            }
            _ => false,
        }
    }

    /// The earliest time a re-arm becomes due (possibly already past), or `None` if none ever
    /// will (nothing fired, or `min_interval` is too large to add to an `Instant`). The driver
    /// bounds its wait with it.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.states
            .iter()
            .filter_map(|state| match state {
                ArmState::Fired { due } => *due,
                ArmState::Armed => None,
            })
            .min()
    }

    /// Whether the kernel will deliver the next event of `kind` (always `false` for unknown
    /// kinds).
    #[must_use]
    pub fn is_armed(&self, kind: ZcrxEventType) -> bool {
        kind.known_index()
            .is_some_and(|index| self.states[index] == ArmState::Armed)
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> EventStats {
        self.stats
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn type_indices_match_the_kernel() {
        assert_eq!(ZcrxEventType::AllocFail.type_index(), 0);
        assert_eq!(ZcrxEventType::Copy.type_index(), 1);
        for kind in [
            ZcrxEventType::AllocFail,
            ZcrxEventType::Copy,
            ZcrxEventType::Unknown(7),
        ] {
            assert_eq!(ZcrxEventType::from_type_index(kind.type_index()), kind);
        }
        assert_eq!(ZcrxEventType::AllocFail.type_mask_bit(), 1);
        assert_eq!(ZcrxEventType::Copy.type_mask_bit(), 2);
        assert_eq!(ZcrxEventType::Unknown(40).type_mask_bit(), 0);
    }

    #[test]
    fn first_event_fires_then_rearm_is_rate_limited() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(10 * MS);
        assert!(events.is_armed(ZcrxEventType::Copy));
        assert_eq!(events.next_deadline(), None);
        assert_eq!(
            events.due_rearms(t0 + 1000 * MS).count(),
            0,
            "nothing fired"
        );

        assert!(events.on_event(ZcrxEventType::Copy, t0));
        assert!(!events.is_armed(ZcrxEventType::Copy));
        assert!(events.is_armed(ZcrxEventType::AllocFail));
        assert_eq!(events.next_deadline(), Some(t0 + 10 * MS));
        assert_eq!(events.due_rearms(t0 + 9 * MS).count(), 0);
        assert_eq!(
            events.due_rearms(t0 + 10 * MS).collect::<Vec<_>>(),
            [ZcrxEventType::Copy]
        );

        assert!(events.mark_rearmed(ZcrxEventType::Copy));
        assert!(events.is_armed(ZcrxEventType::Copy));
        assert_eq!(events.due_rearms(t0 + 1000 * MS).count(), 0);
        assert_eq!(events.next_deadline(), None);
        let stats = events.stats();
        assert_eq!((stats.copy, stats.rearms), (1, 1));
    }

    #[test]
    fn zero_interval_rearms_at_once() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(Duration::ZERO);
        assert!(events.on_event(ZcrxEventType::AllocFail, t0));
        assert_eq!(events.next_deadline(), Some(t0));
        assert_eq!(
            events.due_rearms(t0).collect::<Vec<_>>(),
            [ZcrxEventType::AllocFail]
        );
    }

    #[test]
    fn never_rearms_what_has_not_fired() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(Duration::ZERO);
        assert!(!events.mark_rearmed(ZcrxEventType::Copy));
        assert!(!events.mark_rearmed(ZcrxEventType::Unknown(9)));
        assert!(!events.rearm_failed(ZcrxEventType::Copy, t0));
        assert!(events.on_event(ZcrxEventType::Copy, t0));
        assert!(events.mark_rearmed(ZcrxEventType::Copy));
        assert!(
            !events.mark_rearmed(ZcrxEventType::Copy),
            "second re-arm refused"
        );
        assert_eq!(events.stats().rearms, 1);
    }

    #[test]
    fn kinds_are_independent() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(10 * MS);
        assert!(events.on_event(ZcrxEventType::AllocFail, t0));
        assert!(events.on_event(ZcrxEventType::Copy, t0 + 5 * MS));
        assert_eq!(events.next_deadline(), Some(t0 + 10 * MS));
        assert_eq!(
            events.due_rearms(t0 + 12 * MS).collect::<Vec<_>>(),
            [ZcrxEventType::AllocFail]
        );
        assert_eq!(
            events.due_rearms(t0 + 15 * MS).collect::<Vec<_>>(),
            [ZcrxEventType::AllocFail, ZcrxEventType::Copy]
        );
        assert!(events.mark_rearmed(ZcrxEventType::AllocFail));
        assert_eq!(events.next_deadline(), Some(t0 + 15 * MS));
    }

    #[test]
    fn repeated_and_unknown_events_are_counted_not_acted_on() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(10 * MS);
        assert!(events.on_event(ZcrxEventType::Copy, t0));
        assert!(!events.on_event(ZcrxEventType::Copy, t0 + 8 * MS));
        // The rate limit still counts from the first event.
        assert_eq!(events.next_deadline(), Some(t0 + 10 * MS));
        assert!(!events.on_event(ZcrxEventType::Unknown(5), t0));
        assert_eq!(events.due_rearms(t0 + 100 * MS).count(), 1);
        let stats = events.stats();
        assert_eq!((stats.copy, stats.unexpected, stats.unknown), (2, 1, 1));
    }

    #[test]
    fn failed_rearm_retries_after_the_floor() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(Duration::ZERO);
        assert!(events.on_event(ZcrxEventType::Copy, t0));
        assert!(events.rearm_failed(ZcrxEventType::Copy, t0));
        assert_eq!(events.due_rearms(t0).count(), 0);
        assert_eq!(events.next_deadline(), Some(t0 + EventRearm::RETRY_FLOOR));
        assert_eq!(events.due_rearms(t0 + EventRearm::RETRY_FLOOR).count(), 1);
        assert_eq!(events.stats().rearm_failures, 1);
    }

    #[test]
    fn huge_interval_means_never() {
        let t0 = Instant::now();
        let mut events = EventRearm::new(Duration::MAX);
        assert!(events.on_event(ZcrxEventType::Copy, t0));
        assert_eq!(events.next_deadline(), None);
        assert_eq!(events.due_rearms(t0 + 1000 * MS).count(), 0);
        assert!(!events.is_armed(ZcrxEventType::Copy));
    }
}
