//! Queued sends: what a write half shares with the backend that sends for it.
//!
//! [`ZcWriteHalf::send_buf`](crate::ZcWriteHalf::send_buf) and its siblings move received
//! buffers into a send and return once it is queued. The bytes then belong to the send until
//! the kernel is done reading them: for a zero-copy send (`IORING_OP_SENDMSG_ZC`) that is its
//! notification CQE, not its result. This module holds the pieces both sides need, and no
//! backend:
//!
//! - [`Piece`]: one buffer's bytes in a send (a [`ZcBuf`] or a [`bytes::Bytes`]), shared by
//!   the send's queue entry and every request that reads it; the buffer goes back to its
//!   owner when the last of them lets go, so never before the last notification.
//! - [`ConnSends`]: one connection's sends as its write half sees them: how many are queued
//!   and not yet sent, how many still hold buffers, the first error, a waker.
//! - [`SendPath`]: how a write half hands a send to a backend (the io_uring driver
//!   implements it; copy mode has none and writes itself).
//! - [`SendCounters`]: the runtime's send statistics.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::buf::ZcBuf;
use crate::event::Stats;
use crate::sys::lock;

/// Sends a connection may have in flight (queued, or sent and waiting for their
/// notifications) unless its write half says otherwise.
pub(crate) const DEFAULT_SENDS_IN_FLIGHT: usize = 32;

/// The bytes of one buffer handed to a send.
#[derive(Debug)]
pub(crate) enum Payload {
    /// A received buffer: its bytes from its cursor on.
    Buf(ZcBuf),
    /// Immutable bytes (possibly a `ZcBuf` inside, through `ZcBuf::into_bytes`).
    Bytes(bytes::Bytes),
}

impl Payload {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Buf(buf) => buf,
            Payload::Bytes(bytes) => bytes,
        }
    }
}

/// One buffer of a send, shared (`Arc`) by the send's queue entry and each request that
/// reads from it. Its bytes stay put and unchanged while it lives: a `ZcBuf`'s chunk is not
/// returned, a `Bytes` is immutable. Dropping the last reference returns the buffer and
/// releases the send's ticket.
#[derive(Debug)]
pub(crate) struct Piece {
    payload: Payload,
    _ticket: Arc<Ticket>,
}

impl Piece {
    pub(crate) fn bytes(&self) -> &[u8] {
        self.payload.as_slice()
    }
}

/// Held by every piece of one send: when the last piece goes (its buffers are back), the
/// send no longer counts as in flight.
#[derive(Debug)]
struct Ticket {
    conn: Arc<ConnSends>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.conn.released();
    }
}

/// The runtime's send statistics (relaxed atomics; read into [`Stats`]).
#[derive(Debug, Default)]
pub(crate) struct SendCounters {
    pub(crate) sends: AtomicU64,
    pub(crate) zero_copy_bytes: AtomicU64,
    pub(crate) kernel_copied_bytes: AtomicU64,
    pub(crate) plain_bytes: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
}

impl SendCounters {
    /// Writes the send fields of `stats`.
    pub(crate) fn fill(&self, stats: &mut Stats) {
        stats.sends = self.sends.load(Ordering::Relaxed);
        stats.send_zero_copy_bytes = self.zero_copy_bytes.load(Ordering::Relaxed);
        stats.send_kernel_copied_bytes = self.kernel_copied_bytes.load(Ordering::Relaxed);
        stats.send_plain_bytes = self.plain_bytes.load(Ordering::Relaxed);
        stats.sends_in_flight = self.in_flight.load(Ordering::Relaxed);
        stats.send_fallbacks = self.fallbacks.load(Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One connection's queued sends, shared by its write half and the backend.
pub(crate) struct ConnSends {
    state: Mutex<ConnState>,
    pub(crate) counters: Arc<SendCounters>,
}

#[derive(Default)]
struct ConnState {
    /// Sends queued whose bytes are not all sent yet.
    unsent: usize,
    /// Sends whose buffers are not all back yet (`unsent` included).
    in_flight: usize,
    /// The first error, until the write half reports it.
    error: Option<io::Error>,
    /// Set once a send failed: the byte stream has a hole, so later sends fail too.
    broken: Option<io::ErrorKind>,
    /// The write half waits for a change.
    waker: Option<Waker>,
    /// The write half was dropped with sends unsent: shut the sending direction down once
    /// they are sent (or failed).
    shutdown_when_sent: bool,
}

impl fmt::Debug for ConnSends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("ConnSends")
            .field("unsent", &state.unsent)
            .field("in_flight", &state.in_flight)
            .field("broken", &state.broken)
            .finish_non_exhaustive()
    }
}

/// What [`ConnSends::sent`] and [`ConnSends::fail`] tell the backend to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterSent {
    Nothing,
    /// The write half is gone and nothing is left to send: shut the sending direction down.
    ShutDownWrite,
}

impl ConnSends {
    pub(crate) fn new(counters: Arc<SendCounters>) -> ConnSends {
        ConnSends {
            state: Mutex::new(ConnState::default()),
            counters,
        }
    }

    /// Waits until fewer than `max` sends are in flight and takes a place for one more;
    /// fails with the connection's error if a send failed.
    pub(crate) fn poll_reserve(&self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<()>> {
        let mut state = lock(&self.state);
        state.check()?;
        if state.in_flight >= max.max(1) {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        state.in_flight += 1;
        state.unsent += 1;
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }

    /// Wraps the payloads of a send whose place [`Self::poll_reserve`] took: the place is
    /// given back when the last piece is dropped.
    pub(crate) fn pieces(self: &Arc<Self>, payloads: Vec<Payload>) -> Vec<Arc<Piece>> {
        let ticket = Arc::new(Ticket {
            conn: Arc::clone(self),
        });
        payloads
            .into_iter()
            .map(|payload| {
                Arc::new(Piece {
                    payload,
                    _ticket: Arc::clone(&ticket),
                })
            })
            .collect()
    }

    /// A send whose place was taken was never queued (the runtime is gone): it is not
    /// unsent any more (its pieces, dropped, release the rest).
    pub(crate) fn not_queued(&self) {
        lock(&self.state).unsent -= 1;
    }

    /// Waits until every send is sent, then reports a failure if there was one (at once if
    /// one failed). With `released`, until every send's buffers are back too (flush).
    pub(crate) fn poll_idle(&self, cx: &mut Context<'_>, released: bool) -> Poll<io::Result<()>> {
        let mut state = lock(&self.state);
        let busy = if released {
            state.in_flight
        } else {
            state.unsent
        };
        // A failure is reported at once: the sends still in the kernel after it finish on
        // their own (their buffers come back at their notifications).
        if busy > 0 && state.broken.is_none() {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(state.check())
    }

    /// The backend sent all bytes of one send.
    pub(crate) fn sent(&self) -> AfterSent {
        let mut state = lock(&self.state);
        state.unsent -= 1;
        let after = state.after_sent();
        state.wake();
        after
    }

    /// The backend gave up on `unsent` sends (this connection's failure, or its runtime's
    /// end): their bytes are not all sent. The first error is kept for the write half.
    pub(crate) fn fail(&self, error: io::Error, unsent: usize) -> AfterSent {
        let mut state = lock(&self.state);
        state.unsent -= unsent;
        if state.broken.is_none() {
            state.broken = Some(error.kind());
            state.error = Some(error);
        }
        let after = state.after_sent();
        state.wake();
        after
    }

    /// The write half is dropped: whether the backend shuts the sending direction down
    /// once its sends are sent (`true`), or the caller does now.
    pub(crate) fn defer_shutdown(&self) -> bool {
        let mut state = lock(&self.state);
        state.shutdown_when_sent = state.unsent > 0;
        state.shutdown_when_sent
    }

    /// Whether a send failed: later ones must not follow the gap.
    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.state).broken.is_some()
    }

    /// A send's buffers are all back.
    fn released(&self) {
        let mut state = lock(&self.state);
        state.in_flight -= 1;
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        state.wake();
    }
}

impl ConnState {
    fn check(&mut self) -> io::Result<()> {
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        match self.broken {
            Some(kind) => Err(io::Error::new(
                kind,
                "an earlier send on this connection failed, so the byte stream has a gap; \
                 close the connection",
            )),
            None => Ok(()),
        }
    }

    fn after_sent(&mut self) -> AfterSent {
        if self.unsent == 0 && std::mem::take(&mut self.shutdown_when_sent) {
            AfterSent::ShutDownWrite
        } else {
            AfterSent::Nothing
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// How a write half hands a send to the backend that sends for it.
pub(crate) trait SendPath: Send + Sync {
    /// Queues `pieces` (one send, in order) on `socket` for `conn`. Fails if the backend has
    /// stopped; the pieces are dropped then.
    fn queue(
        &self,
        socket: &Arc<std::net::TcpStream>,
        conn: &Arc<ConnSends>,
        pieces: Vec<Arc<Piece>>,
    ) -> io::Result<()>;
}
