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
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zcrx_core::budget::Budget;
use zcrx_core::receive::{Action, Holding, StreamReceive};
use zcrx_core::user_data::StreamId;

use super::super::ring::CompletionRing;
use super::growth::GrowthTrigger;
use super::Driver;
use crate::event::EventKind;

/// At most one StreamPaused event per this interval.
const STREAM_PAUSED_EVENT_INTERVAL: Duration = Duration::from_millis(100);
/// NIC mode: a stream's receive buffer when attached, in chunks (see
/// `Driver::adjust_receive_buffer`): about 11 KiB of window on a 1,500-byte MTU, doubling
/// as its reader keeps up.
const INITIAL_RECEIVE_BUFFER_CHUNKS: u64 = 8;
/// NIC mode: the smallest receive buffer, in chunks.
const MIN_RECEIVE_BUFFER_CHUNKS: u64 = 4;
/// What the kernel charges a socket for a chunk beyond its size (the skb around it).
const SKB_OVERHEAD: u64 = 1024;
/// At most one MemoryHighWater event per this interval.
const HIGH_WATER_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The largest TCP window (65,535 bytes scaled by the largest window scale, 14).
const LARGEST_TCP_WINDOW: u32 = 65535 << 14;

/// NIC mode: the TCP window clamp `Zcrx::prepare_listener` gives a listener: the largest
/// window the runtime gives an attached stream (`Driver::adjust_receive_buffer`'s ceiling
/// for a stream whose budget is `largest_budget`, in segments of `payload` bytes), rounded
/// up to a power of two.
///
/// TCP fixes a connection's window scale at the handshake, from the listener's clamp
/// (`tcp_openreq_init_rwin` and `tcp_select_initial_window`: `ilog2(clamp) - 15`, at least
/// 0). The clamp used to be four chunks of segments, to bound what connections waiting to
/// be accepted queue in the area; it negotiated no window scaling at all, so every
/// budgeted NIC stream was held to a 64 KiB window for its life, whatever receive buffer the
/// runtime gave it (in the 4-queue guest benchmark: an acknowledgement per packet, twice the
/// wake-ups, and 1.6-3.0x the receive CPU of an unbudgeted stream). This clamp lets the
/// handshake negotiate the scale the largest window needs; a connection waiting to be
/// accepted is bounded by its initial receive buffer instead (`net.ipv4.tcp_rmem[1]`, 128
/// KiB by default), which TCP grows only as the application reads.
pub(super) fn listener_window(largest_budget: u64, chunk: u64, payload: u32) -> u32 {
    let ceiling = receive_buffer_ceiling(largest_budget, chunk);
    let window = ceiling
        .saturating_mul(u64::from(payload))
        .next_power_of_two();
    u32::try_from(window).map_or(LARGEST_TCP_WINDOW, |w| w.min(LARGEST_TCP_WINDOW))
}

/// The most chunks a stream's receive buffer grows to under a budget of `high` bytes: half
/// its chunks, never fewer than [`MIN_RECEIVE_BUFFER_CHUNKS`]. One formula for the buffer
/// (`Driver::adjust_receive_buffer`) and the listener's window ([`listener_window`]).
fn receive_buffer_ceiling(high: u64, chunk: u64) -> u64 {
    (high / chunk.max(1) / 2).max(MIN_RECEIVE_BUFFER_CHUNKS)
}

/// NIC mode: how far the runtime can size receive buffers (`Driver::adjust_receive_buffer`).
#[derive(Debug)]
pub(super) struct ReceiveBufferLimit {
    /// `SO_RCVBUFFORCE` was not refused yet (the process has `CAP_NET_ADMIN`).
    force: bool,
    /// The most chunks a plain `SO_RCVBUF` gives (`net.core.rmem_max`), once one was cut
    /// short: no stream asks for more from then on.
    cap_chunks: Option<u64>,
}

impl Default for ReceiveBufferLimit {
    fn default() -> Self {
        ReceiveBufferLimit {
            force: true,
            cap_chunks: None,
        }
    }
}

impl ReceiveBufferLimit {
    /// Sets the receive buffer of `socket` to `chunks` chunks of `chunk` bytes; answers the
    /// chunks it got (fewer where `net.core.rmem_max` cut a plain `SO_RCVBUF` short).
    fn apply(&mut self, socket: BorrowedFd<'_>, chunks: u64, chunk: u64) -> u64 {
        // The kernel keeps twice the value, and charges each chunk its size and the skb's.
        let per_chunk = chunk + SKB_OVERHEAD;
        let bytes = u32::try_from(chunks * per_chunk / 2).unwrap_or(u32::MAX / 2);
        if self.force {
            match crate::sys::force_receive_buffer(socket, bytes) {
                Ok(()) => return chunks,
                Err(error) if error.raw_os_error() == Some(libc::EPERM) => self.force = false,
                Err(error) => {
                    // A socket already closed by its peer, or not TCP (the synthetic
                    // kernel's).
                    tracing::debug!("tokio-zcrx: SO_RCVBUFFORCE {bytes}: {error}");
                    return chunks;
                }
            }
        }
        if let Err(error) = crate::sys::set_receive_buffer(socket, bytes) {
            tracing::debug!("tokio-zcrx: SO_RCVBUF {bytes}: {error}");
            return chunks;
        }
        let kept = match crate::sys::receive_buffer(socket) {
            Ok(kept) => u64::from(kept),
            Err(_) => return chunks,
        };
        if kept >= 2 * u64::from(bytes) {
            return chunks;
        }
        let cap = (kept / per_chunk).max(MIN_RECEIVE_BUFFER_CHUNKS);
        if self.cap_chunks.is_none() {
            tracing::warn!(
                "tokio-zcrx: receive buffers stop at net.core.rmem_max ({} bytes, {cap} \
                 chunks) without CAP_NET_ADMIN, below what stream budgets allow (a stream \
                 asked for {chunks} chunks): fast streams get less TCP window and send more \
                 acknowledgements; raise it with `sysctl -w net.core.rmem_max={}`",
                kept / 2,
                u64::from(bytes).next_power_of_two().max(4 << 20),
            );
        }
        self.cap_chunks = Some(cap);
        cap.min(chunks)
    }
}

/// When the pressure events last went out, and whether MemoryHighWater may go out again.
#[derive(Debug)]
pub(super) struct PressureEvents {
    last_stream_paused: Option<Instant>,
    last_high_water: Option<Instant>,
    /// Cleared by a MemoryHighWater event, set again once the holding is below half.
    high_water_armed: bool,
    /// The area was under pressure (`BudgetPolicy::under_pressure`) at the last look.
    under_pressure: bool,
    /// The derived budget (`BudgetPolicy::budget`, `high`) at the last look: it grows when
    /// streams go away.
    derived_high: u64,
}

impl Default for PressureEvents {
    fn default() -> Self {
        PressureEvents {
            last_stream_paused: None,
            last_high_water: None,
            high_water_armed: true,
            under_pressure: false,
            derived_high: 0,
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

    /// NIC mode: sizes the receive buffer of the stream in `slot` (`SO_RCVBUF`), in chunks.
    ///
    /// On a NIC queue bound to zcrx every byte the kernel queues for a socket is already in
    /// the area, read or not (in order or waiting behind a hole), and TCP charges it to the
    /// socket's receive buffer. TCP's own autotuning grows that buffer to megabytes for a
    /// stream that reads fast, and a stream that then stops reading keeps it all: a few such
    /// streams take the area. So the runtime sizes the buffer itself, as autotuning would
    /// but within bounds: [`INITIAL_RECEIVE_BUFFER_CHUNKS`] when attached (the window a
    /// prepared listener gave the connection is lifted then), doubled each time the stream
    /// received a buffer's worth while holding no more than its budget's low mark
    /// (`may_grow`: its reader keeps up), up to half its budget's chunks, and only while all
    /// streams' buffers and what the application holds stay within three quarters of the
    /// area: the last quarter is the NIC's to receive into. A buffer never shrinks: TCP would
    /// drop what its window had already let the peer send, and the peer, once read again,
    /// would wait for its backed-off retransmission timer (seconds).
    ///
    /// The buffer is set with `SO_RCVBUFFORCE` while the process has `CAP_NET_ADMIN`: the
    /// bytes a socket queues here are in the area the runtime sized, so the system-wide cap
    /// for plain `SO_RCVBUF` (`net.core.rmem_max`, 208 KiB on a stock system: about 80
    /// chunks, a 120 KiB window) would only hold fast streams back (in the 4-queue guest
    /// benchmark every budgeted stream stopped there and sent 1.5x the acknowledgements of an
    /// unbudgeted one). Without the capability (after `Zcrx::drop_privileges`) buffers stop
    /// at that cap: [`ReceiveBufferLimit`].
    pub(super) fn adjust_receive_buffer(&mut self, slot: u32, budget: Budget, may_grow: bool) {
        let Some(payload) = self.segment_payload else {
            return;
        };
        let chunk = u64::from(self.area.chunk_size);
        let area_chunks = self.area.len() as u64 / chunk;
        let held_chunks = self.area.memory_held() / chunk;
        let room = (area_chunks / 4 * 3).saturating_sub(held_chunks + self.rcvbuf_total);
        let Some(entry) = self.streams.get(slot) else {
            return;
        };
        let stream_held = self.area.holdings.held(entry.tag) * chunk;
        let ceiling = receive_buffer_ceiling(budget.high, chunk)
            .min(self.rcvbuf_limit.cap_chunks.unwrap_or(u64::MAX));
        let current = entry.rcvbuf_chunks;
        let target = if current == 0 {
            ceiling.min(INITIAL_RECEIVE_BUFFER_CHUNKS)
        } else if may_grow
            && entry.received_since >= current * u64::from(payload)
            && stream_held <= budget.low
        {
            ceiling.min(current * 2).min(current + room).max(current)
        } else {
            current
        };
        let entry = self.streams.get_mut(slot).expect("looked up above");
        if target == current {
            return;
        }
        let target = self
            .rcvbuf_limit
            .apply(entry.socket(), target, chunk)
            .max(current);
        entry.received_since = 0;
        entry.rcvbuf_chunks = target;
        self.rcvbuf_total += target - current;
        if current == 0 {
            // The receive buffer bounds the window from now on: lift a prepared listener's
            // clamp, which the buffer's (now fixed) size would never raise again.
            if let Err(error) = crate::sys::set_tcp_window_clamp(entry.socket(), LARGEST_TCP_WINDOW)
            {
                tracing::debug!("tokio-zcrx: TCP_WINDOW_CLAMP: {error}");
            }
        }
    }

    /// NIC mode: lifts the window clamp a prepared listener gave the socket of the stream in
    /// `slot` (an unbudgeted stream, whose receive buffer TCP tunes as usual).
    pub(super) fn unclamp_window(&mut self, slot: u32) {
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

    /// Lets the receive buffers of the streams that received a buffer's worth this reap
    /// grow (see [`Self::adjust_receive_buffer`]).
    pub(super) fn grow_receive_buffers(&mut self) {
        let mut slots = std::mem::take(&mut self.rcvbuf_growth);
        for slot in slots.drain(..) {
            if let Some(budget) = self.budget(slot) {
                self.adjust_receive_buffer(slot, budget, true);
            }
        }
        self.rcvbuf_growth = slots;
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
    /// at its resume mark, count it and tell subscribers (rate-limited).
    pub(super) fn pause(&mut self, slot: u32) {
        let Some(entry) = self.streams.get_mut(slot) else {
            return;
        };
        if entry.shared.pause() {
            // Its reader waits already: it resumes below its high mark (at its next drop:
            // it holds its budget now).
            let action = entry.receive.reader_waiting();
            debug_assert_eq!(action, Action::None, "paused for holding its budget");
        }
        self.arm_resume(slot);
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

    /// Arms the wake-up of the paused stream in `slot` at its resume mark
    /// (`StreamReceive::resume_mark`: its budget's low mark, or below its high mark while
    /// its reader waits): the release that brings it there wakes the driver.
    fn arm_resume(&mut self, slot: u32) {
        let Some((tag, mark)) = self
            .streams
            .get(slot)
            .and_then(|e| Some((e.tag, e.receive.resume_mark()?)))
        else {
            return;
        };
        if self
            .area
            .holdings
            .pause_until(tag, mark / u64::from(self.area.chunk_size))
        {
            // Its reader dropped enough meanwhile: the next round resumes it.
            self.area.holdings.mark_resumable();
        }
    }

    /// The reader of stream `key` took everything delivered and waits for more: if the
    /// stream is paused it resumes below its budget's high mark from now on
    /// (`StreamReceive::reader_waiting`), now if it holds less, else at its reader's next
    /// drop.
    pub(super) fn reader_waiting(&mut self, key: StreamId) -> io::Result<()> {
        self.step_stream(key, StreamReceive::reader_waiting)?;
        if self
            .streams
            .entry_mut(key)
            .is_some_and(|e| e.receive.is_paused())
        {
            self.arm_resume(key.slot());
        }
        Ok(())
    }

    /// Resumes the paused streams whose holding fell to their resume mark: only those a
    /// release marked (`Holdings::take_reached`), and nothing unless one did.
    ///
    /// Under memory pressure derived budgets share out what is left
    /// (`BudgetPolicy::budget_under`), and a stream paused then waits for a low mark that
    /// may be small: when the pressure ends its normal budget may let it go on sooner, so while
    /// streams are paused under pressure every return wakes the driver to look at the
    /// pressure, and its end steps every paused stream once.
    ///
    /// Derived budgets also grow when streams go away, and a paused stream's mark is its
    /// budget's low mark *when it paused*: when the derived budget grew, every paused stream
    /// is stepped once, resuming those at or below their new low mark and moving the mark
    /// of the others. A stream must not wait for its reader to drop buffers its budget now
    /// allows it to hold: the reader may itself be waiting for what only this stream's
    /// next bytes bring (an echo handler blocked in a write whose peer's window updates
    /// TCP only takes once the peer's retransmissions get into this stream's socket).
    pub(super) fn resume_paused_streams(&mut self) -> io::Result<()> {
        let pressure = self.budget_policy.under_pressure(self.area.memory_held());
        let paused = self.area.counters.streams_paused.load(Ordering::Relaxed) > 0;
        self.area.holdings.wake_on_every_return(pressure && paused);
        let was_under_pressure = std::mem::replace(&mut self.pressure.under_pressure, pressure);
        let derived_high = self.budget_policy.budget(self.streams.len()).high;
        let budget_grew =
            derived_high > std::mem::replace(&mut self.pressure.derived_high, derived_high);
        // Derived budgets grew back with the end of the pressure, or with fewer streams:
        // every paused stream may go on sooner than its mark.
        let every_paused_stream = paused && ((was_under_pressure && !pressure) || budget_grew);
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
            self.arm_resume(slot);
        }
        Ok(())
    }

    /// MemoryHighWater when the application holds 3/4 of the area or more, again only
    /// after it fell below half, at most once per [`HIGH_WATER_EVENT_INTERVAL`]. Once per
    /// reap (memory only grows by deliveries).
    pub(super) fn check_memory_high_water(&mut self) {
        let mut capacity = self.area.len() as u64;
        let held = self.area.memory_held();
        // Under a growth policy, pressure adds an area before anything fails (growth.rs).
        // In NIC mode what the sockets may queue is in the area too (the receive buffers the
        // runtime sized, `adjust_receive_buffer`): counted, so the area grows before the
        // NIC finds no chunk.
        let queued = self.rcvbuf_total * u64::from(self.area.chunk_size);
        if held + queued >= capacity / 4 * 3 && self.grow(GrowthTrigger::Pressure) {
            capacity = self.area.len() as u64;
        }
        // NIC mode: what the kernel may take before the next look, with the page pool's
        // reserve (growth.rs).
        self.grow_ahead_of_the_nic();
        capacity = capacity.max(self.area.len() as u64);
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn rmem_max() -> u64 {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn tcp_socket() -> (std::net::TcpListener, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (listener, client)
    }

    #[test]
    fn receive_buffers_pass_rmem_max_where_they_may_and_stop_there_otherwise() {
        const CHUNK: u64 = 4096;
        let per_chunk = CHUNK + SKB_OVERHEAD;
        // Four times what rmem_max lets a plain SO_RCVBUF keep.
        let wanted = 8 * rmem_max() / per_chunk;
        let (_listener, client) = tcp_socket();
        let socket = client.as_fd();

        // As root (CAP_NET_ADMIN), the runtime's size is the socket's.
        let mut limit = ReceiveBufferLimit::default();
        if limit.apply(socket, wanted, CHUNK) == wanted && limit.force {
            let kept = u64::from(crate::sys::receive_buffer(socket).unwrap());
            assert_eq!(kept, wanted * per_chunk / 2 * 2);
            assert_eq!(limit.cap_chunks, None);
        }

        // Without the capability (as after `Zcrx::drop_privileges`; the first EPERM turns
        // `force` off): the socket keeps what rmem_max allows and the runtime counts that,
        // and the cap holds for every later stream.
        let (_listener, client) = tcp_socket();
        let socket = client.as_fd();
        let mut limit = ReceiveBufferLimit {
            force: false,
            cap_chunks: None,
        };
        let got = limit.apply(socket, wanted, CHUNK);
        let cap = 2 * rmem_max() / per_chunk;
        assert_eq!(got, cap);
        assert_eq!(limit.cap_chunks, Some(cap));
        assert_eq!(
            u64::from(crate::sys::receive_buffer(socket).unwrap()),
            2 * rmem_max()
        );
        // A size below the cap is taken as asked.
        let (_listener, client) = tcp_socket();
        assert_eq!(limit.apply(client.as_fd(), 8, CHUNK), 8);
        assert_eq!(
            u64::from(crate::sys::receive_buffer(client.as_fd()).unwrap()),
            8 * per_chunk / 2 * 2
        );
    }
}
