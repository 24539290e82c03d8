//! Events and statistics: how monitoring code learns that the kernel copied instead of
//! zero-copying, or ran out of buffers.

use std::fmt;

/// What happened. With the `serde` feature it serializes as a snake_case string
/// (`"copy_fallback"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum EventKind {
    /// The kernel had to copy received data into the area instead of receiving it there
    /// directly (traffic on another queue, loopback, the device-less mode, header parts).
    /// Kernel event, Linux 7.2+; re-armed at most once per
    /// [`event_rearm_interval`](crate::Builder::event_rearm_interval).
    CopyFallback,
    /// The NIC's page pool found no free buffer: the NIC drops packets and TCP retransmits.
    /// Return buffers sooner or use a larger area. Kernel event, Linux 7.2+.
    AllocationFailure,
    /// A receive stopped because the area had no free chunk (the copy path's equivalent of
    /// an allocation failure). The runtime resumes it once buffers come back; no data is lost.
    AreaExhausted,
    /// The completion queue overflowed and receives were stopped by the kernel; the runtime
    /// resubmitted them. No data is lost; a larger [`cq_entries`](crate::Builder::cq_entries)
    /// avoids the extra work.
    CqOverflowRecovered,
    /// A stream reached its budget (see
    /// [`Builder::stream_budget`](crate::Builder::stream_budget)) and stopped receiving until
    /// its reader drops buffers; its data waits in its socket. At most one per 100 ms per
    /// runtime; [`Stats::stream_pauses`] counts them all.
    StreamPaused,
    /// The application holds three quarters or more of the shared memory (the area, or the
    /// copy pool's limit): streams may soon wait for memory. Reported again only after the
    /// holding fell below half, and at most once per second.
    MemoryHighWater,
    /// The receive memory grew by one kernel area
    /// ([`Builder::area_growth`](crate::Builder::area_growth), Linux 7.3+): receives that ran
    /// short of chunks have more. [`Stats::areas`] and [`Stats::memory_capacity`] tell the
    /// new size.
    AreaGrown,
    /// A connection arrived on a receive queue this runtime has not bound (or one whose
    /// queue could not be told: no NAPI id within
    /// [`Builder::napi_wait`](crate::Builder::napi_wait), or loopback), on a runtime of
    /// several queues ([`Builder::interface_queues`](crate::Builder::interface_queues)): it
    /// is received in copy mode on Tokio's reactor, never by another queue's binding (whose
    /// receives would fail with `EFAULT`). [`Event::queue`] names its queue where known;
    /// [`Stats::unmatched_connections`] counts them all. One event per connection.
    UnmatchedConnection,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::CopyFallback => "copy fallback",
            EventKind::AllocationFailure => "allocation failure",
            EventKind::AreaExhausted => "area exhausted",
            EventKind::CqOverflowRecovered => "CQ overflow recovered",
            EventKind::StreamPaused => "stream paused by its budget",
            EventKind::MemoryHighWater => "memory high water",
            EventKind::AreaGrown => "area grown",
            EventKind::UnmatchedConnection => {
                "connection on an unbound queue, received in copy mode"
            }
        })
    }
}

/// An event with the statistics as they were when it was reported.
///
/// Built by the runtime only; read its fields. (`#[non_exhaustive]`: an event may carry more
/// in a later version, e.g. the stream it concerns.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// A snapshot taken when the event was delivered: of the queue's statistics when the
    /// event concerns one bound queue, else of the runtime's.
    pub stats: Stats,
    /// The receive queue the event concerns: the queue of the driver that reported it, or
    /// the queue an unmatched connection arrived on; `None` where there is none (the
    /// device-less mode, copy mode) or it is not known.
    pub queue: Option<u32>,
}

/// Counters of one runtime. Kernel copy counters are `None` when the kernel has no zcrx
/// statistics (before 7.2, or events disabled).
///
/// The kernel updates its counters without synchronization; each is read atomically, but the
/// pair is not a consistent snapshot. The runtime's own counters are exact.
///
/// Read with [`Zcrx::stats`](crate::Zcrx::stats) or from an [`Event`]. New counters are
/// added as the runtime learns to count more (`#[non_exhaustive]`), so outside this crate a
/// `Stats` is read, not built; `Stats::default()` is all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Stats {
    /// Packet fragments the kernel copied instead of receiving in place (kernel counter).
    pub copy_count: Option<u64>,
    /// Bytes in those fragments (kernel counter). In the device-less mode every byte.
    pub copy_bytes: Option<u64>,
    /// Bytes delivered to streams.
    pub bytes: u64,
    /// Buffers (chunks) delivered to streams.
    pub chunks: u64,
    /// Buffers delivered and not yet dropped.
    pub buffers_outstanding: u64,
    /// Receives resubmitted after the completion queue overflowed.
    pub resubmits_cq_overflow: u64,
    /// Receives resubmitted after the area ran out of chunks.
    pub resubmits_area_exhausted: u64,
    /// Kernel events received (copy fallback and allocation failure).
    pub kernel_events: u64,
    /// Completions the runtime rejected as malformed (the stream they named ended with an
    /// `InvalidData` error; logged).
    pub invalid_completions: u64,
    /// Chunks the runtime did not return because a malformed completion left it unsure the
    /// kernel had lent them (returning a chunk the kernel did not lend could hand out memory
    /// a buffer still reads); they come back when the ring closes.
    pub chunks_leaked: u64,
    /// Optional kernel calls that failed and were carried on from (refill flushes, event
    /// re-arms, area additions under [`Builder::area_growth`](crate::Builder::area_growth)),
    /// plus `io_uring_enter` calls retried after EINTR, EAGAIN or EBUSY.
    pub faults_survived: u64,
    /// Bytes of the shared memory buffers are received into: the area (all its kernel areas,
    /// which grow under [`Builder::area_growth`](crate::Builder::area_growth)), or the copy
    /// pool's memory limit.
    pub memory_capacity: u64,
    /// Kernel areas the receive memory is made of: 1, more once it grew
    /// ([`Builder::area_growth`](crate::Builder::area_growth), Linux 7.3+); 0 in copy mode.
    pub areas: u32,
    /// Bytes of it the application holds: buffers delivered and not yet dropped (whole chunks
    /// in the area).
    pub memory_held: u64,
    /// The most bytes one stream holds (whole chunks in the area).
    pub largest_stream_held: u64,
    /// Streams stopped by their budget now.
    pub streams_paused: u64,
    /// Times a stream was stopped by its budget, in all.
    pub stream_pauses: u64,
    /// Sends queued with `ZcWriteHalf::send_buf`, `send_batch` or `send_bytes`.
    pub sends: u64,
    /// Bytes of those sends the kernel sent without copying (zero-copy sends whose
    /// notification did not report a copy).
    pub send_zero_copy_bytes: u64,
    /// Bytes of zero-copy sends the kernel copied after all (its notification said so:
    /// `IORING_NOTIF_USAGE_ZC_COPIED`; loopback and devices without scatter-gather always
    /// copy).
    pub send_kernel_copied_bytes: u64,
    /// Bytes of those sends written with plain writes: copy mode, or a fallback where the
    /// kernel refused zero-copy sends.
    pub send_plain_bytes: u64,
    /// Sends queued or waiting for their notifications now (their buffers are held).
    pub sends_in_flight: u64,
    /// Times the driver fell back to a lesser way of sending (unregistered `SEND_ZC`
    /// instead of the fixed buffer, or plain sends instead of `SEND_ZC`); each is logged
    /// once.
    pub send_fallbacks: u64,
    /// Connections received in copy mode because they arrived on a receive queue this
    /// runtime has not bound, or their queue could not be told
    /// ([`EventKind::UnmatchedConnection`]); their bytes count in `bytes` and `copy_bytes`
    /// of the runtime's total, not of any queue.
    pub unmatched_connections: u64,
    /// Streams handed to another queue's driver because their flow moved to that queue
    /// mid-connection (an RSS table changed; the old queue's ring cannot receive the new
    /// queue's buffers: its receive failed with `EFAULT`). No byte is lost or repeated.
    pub streams_moved: u64,
}

impl Stats {
    /// Adds `other`'s counters to these (the total of several queues): sums, except
    /// `largest_stream_held` (the largest). A kernel counter is `None` only if it is `None`
    /// in both.
    pub(crate) fn merge(&mut self, other: &Stats) {
        let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.copy_count = add(self.copy_count, other.copy_count);
        self.copy_bytes = add(self.copy_bytes, other.copy_bytes);
        self.bytes += other.bytes;
        self.chunks += other.chunks;
        self.buffers_outstanding += other.buffers_outstanding;
        self.resubmits_cq_overflow += other.resubmits_cq_overflow;
        self.resubmits_area_exhausted += other.resubmits_area_exhausted;
        self.kernel_events += other.kernel_events;
        self.invalid_completions += other.invalid_completions;
        self.chunks_leaked += other.chunks_leaked;
        self.faults_survived += other.faults_survived;
        self.memory_capacity += other.memory_capacity;
        self.areas += other.areas;
        self.memory_held += other.memory_held;
        self.largest_stream_held = self.largest_stream_held.max(other.largest_stream_held);
        self.streams_paused += other.streams_paused;
        self.stream_pauses += other.stream_pauses;
        self.sends += other.sends;
        self.send_zero_copy_bytes += other.send_zero_copy_bytes;
        self.send_kernel_copied_bytes += other.send_kernel_copied_bytes;
        self.send_plain_bytes += other.send_plain_bytes;
        self.sends_in_flight += other.sends_in_flight;
        self.send_fallbacks += other.send_fallbacks;
        self.unmatched_connections += other.unmatched_connections;
        self.streams_moved += other.streams_moved;
    }
}

/// One bound receive queue's statistics ([`Zcrx::queue_stats`](crate::Zcrx::queue_stats)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct QueueStats {
    /// The receive queue's index.
    pub queue: u32,
    /// Its NAPI instance, as the kernel reported it (`netdev` netlink) when the runtime
    /// started or last looked; `None` if the kernel did not say.
    pub napi_id: Option<u32>,
    /// Its binding's counters.
    pub stats: Stats,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in {} chunks, {} outstanding",
            self.bytes, self.chunks, self.buffers_outstanding
        )?;
        if let (Some(count), Some(bytes)) = (self.copy_count, self.copy_bytes) {
            write!(f, ", copied {bytes} bytes in {count} fragments")?;
        }
        if self.invalid_completions + self.faults_survived > 0 {
            write!(
                f,
                ", faults: {} invalid completions ({} chunks leaked), {} kernel calls retried \
                 or carried on from",
                self.invalid_completions, self.chunks_leaked, self.faults_survived
            )?;
        }
        if self.resubmits_cq_overflow + self.resubmits_area_exhausted > 0 {
            write!(
                f,
                ", resubmits: {} CQ overflow, {} area exhausted",
                self.resubmits_cq_overflow, self.resubmits_area_exhausted
            )?;
        }
        if self.unmatched_connections > 0 {
            write!(
                f,
                ", {} connections on unbound queues (copy mode)",
                self.unmatched_connections
            )?;
        }
        if self.sends > 0 {
            write!(
                f,
                ", sends: {} ({} bytes zero-copy, {} copied by the kernel, {} plain; {} in \
                 flight)",
                self.sends,
                self.send_zero_copy_bytes,
                self.send_kernel_copied_bytes,
                self.send_plain_bytes,
                self.sends_in_flight
            )?;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_stable_names() {
        let event = Event {
            queue: Some(2),
            kind: EventKind::CopyFallback,
            stats: Stats {
                copy_bytes: Some(4096),
                ..Stats::default()
            },
        };
        let json = serde_json::to_value(event).unwrap();
        assert_eq!(json["kind"], "copy_fallback");
        assert_eq!(json["queue"], 2);
        assert_eq!(json["stats"]["copy_bytes"], 4096);
        assert_eq!(json["stats"]["copy_count"], serde_json::Value::Null);
        let mode = serde_json::to_value(crate::ActiveMode::NoDevice).unwrap();
        assert_eq!(mode, "nodev");
    }
}
