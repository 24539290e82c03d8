//! Completions: reaping the CQ, decoding each CQE (zcrx_core::completion) and handing it to
//! the stream it names, the event policy or the driver's own wake-up.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use zcrx_core::completion::{decode, Completion, Eof, InvalidCompletion, RawCompletion};
use zcrx_core::receive::{Request, RequestEnd, StreamReceive};
use zcrx_core::user_data::StreamId;

use super::super::ring::CompletionRing;
use super::super::StreamEnd;
use super::{sends, Driver};
use crate::event::EventKind;

impl<R: CompletionRing> Driver<R> {
    /// Takes every completion out of the CQ and handles it, then hands the streams their
    /// buffers and resubmits receives that found the CQ full.
    pub(super) fn reap(&mut self) -> io::Result<()> {
        self.reaped.clear();
        self.ring.reap(&mut self.reaped);
        self.cq_overflowed = false;
        let reaped = std::mem::take(&mut self.reaped);
        for raw in &reaped {
            match decode(raw, &self.layout, &self.streams) {
                Ok(Completion::Data {
                    stream,
                    area_offset,
                    len,
                    chunk,
                    area,
                    more,
                }) => {
                    self.on_data(stream, area, area_offset, len, chunk);
                    if !more {
                        // The request ended with this data and gave no reason (kernels up to
                        // 7.3 never do this): as after a final CQE, go on or finish.
                        self.on_end(stream, RequestEnd::Unexplained)?;
                    }
                }
                Ok(Completion::End { stream, result }) => {
                    let end = match result {
                        Ok(Eof) => RequestEnd::Eof,
                        Err(errno) => RequestEnd::Error(errno),
                    };
                    self.on_end(stream, end)?;
                }
                Ok(Completion::Event { kind }) => self.on_kernel_event(kind),
                Ok(Completion::Wake { .. }) => self.on_wake(raw)?,
                Ok(Completion::CancelDone { stream, res }) => self.on_cancel_done(stream, res)?,
                Ok(Completion::Internal {
                    payload,
                    res,
                    flags,
                }) => {
                    // Sends are the only Internal requests; anything else is ignored.
                    if let Some((slot, seq)) = sends::decode_send(payload) {
                        self.on_send_completion(slot, seq, res, flags)?;
                    }
                }
                Err(invalid) => self.on_invalid(&invalid)?,
            }
        }
        self.reaped = reaped;
        self.streams.deliver();
        self.grow_receive_buffers();
        self.check_memory_high_water();
        if std::mem::take(&mut self.cq_overflowed) {
            self.area
                .counters
                .resubmits_cq_overflow
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "tokio-zcrx: the completion queue overflowed; receives are resubmitted \
                 (Builder::cq_entries set higher avoids it)"
            );
            self.emit(EventKind::CqOverflowRecovered);
            for slot in self.streams.slots() {
                let resubmit = self
                    .streams
                    .get(slot)
                    .is_some_and(|e| e.receive.request() == Request::ResubmitAfterCq);
                if resubmit {
                    self.step(slot, StreamReceive::submit)?;
                }
            }
        }
        Ok(())
    }

    fn on_data(&mut self, stream: StreamId, area: u16, area_offset: u64, len: u32, chunk: u32) {
        let slot = stream.slot();
        let tag = self.streams.get(slot).expect("decode checked the slot").tag;
        let buf = self.buffer_refs.buffer(area, area_offset, len, chunk, tag);
        // Only this thread writes the counters: a plain load and store publishes them
        // without a locked read-modify-write per chunk.
        let counters = &self.area.counters;
        let bytes = counters.bytes.load(Ordering::Relaxed) + u64::from(len);
        counters.bytes.store(bytes, Ordering::Relaxed);
        let chunks = counters.chunks.load(Ordering::Relaxed) + 1;
        counters.chunks.store(chunks, Ordering::Relaxed);
        let entry = self.streams.get_mut(slot).expect("decode checked the slot");
        if let (Some(payload), chunks @ 1..) = (self.segment_payload, entry.rcvbuf_chunks) {
            // NIC mode: a receive buffer's worth received may let it grow (budgets.rs).
            let worth = chunks * u64::from(payload);
            let before = entry.received_since;
            entry.received_since += u64::from(len);
            if before < worth && entry.received_since >= worth {
                self.rcvbuf_growth.push(slot);
            }
        }
        if entry.receive.on_data(len) {
            self.streams.push_buffer(slot, buf);
        }
        // Otherwise nobody reads it any more: dropping the buffer returns the chunk.
    }

    /// Handles the end of a receive request (a final CQE, or data without `F_MORE`).
    fn on_end(&mut self, stream: StreamId, end: RequestEnd) -> io::Result<()> {
        // Deliver what came before the end first.
        self.streams.deliver();
        self.step(stream.slot(), |receive| receive.on_end(end))
    }

    /// The cancel request's own CQE: `-ENOENT` says the receive was no longer there to
    /// cancel, so a stream waiting for its final CQE goes now (zcrx_core::receive).
    fn on_cancel_done(&mut self, stream: StreamId, res: i32) -> io::Result<()> {
        self.step_stream(stream, |receive| receive.on_cancel_done(res))
    }

    /// A completion the decoder rejected. The reference the kernel took is given back where
    /// the decoder can tell it took one (never otherwise: returning a reference the kernel
    /// does not hold could free a chunk a live buffer reads, so a doubtful chunk is leaked
    /// and counted). The stream it names ends after the data delivered before it, since its
    /// byte stream would have a hole, and its request is cancelled.
    fn on_invalid(&mut self, invalid: &InvalidCompletion) -> io::Result<()> {
        tracing::warn!("tokio-zcrx: dropping {invalid}");
        self.area
            .counters
            .invalid_completions
            .fetch_add(1, Ordering::Relaxed);
        if let Some(rqe) = invalid.owed_refill() {
            self.area
                .counters
                .rejected_returns
                .fetch_add(1, Ordering::Relaxed);
            let _ = self.area.refill.push(rqe);
        }
        if invalid.may_leak_chunk() {
            self.area
                .counters
                .chunks_leaked
                .fetch_add(1, Ordering::Relaxed);
        }
        let Some(stream) = invalid.stream() else {
            return Ok(());
        };
        let named = self
            .streams
            .entry_mut(stream)
            .is_some_and(|e| !e.receive.is_finished());
        if !named {
            return Ok(());
        }
        self.streams.deliver();
        let entry = self.streams.get_mut(stream.slot()).expect("checked above");
        if entry.receive.finish() {
            entry.shared.finish(StreamEnd::Error(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tokio-zcrx: {invalid}"),
            )));
        }
        self.step(stream.slot(), StreamReceive::cancel)
    }

    fn on_wake(&mut self, raw: &RawCompletion) -> io::Result<()> {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd; EAGAIN (already
        // drained) is fine.
        let _ = unsafe {
            crate::sys::syscall!(read(
                self.shared.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                size_of::<u64>(),
            ))
        };
        if raw.flags & zcrx_sys::ring::IORING_CQE_F_MORE == 0 {
            // The multishot poll ended (e.g. on CQ overflow): poll again.
            self.arm_eventfd()?;
        }
        Ok(())
    }
}
