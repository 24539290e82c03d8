//! Sends: write halves' queued sends, carried out on the driver's ring.
//!
//! Each connection with sends has a [`SendConn`]: its queue (sends in order, the front one
//! possibly partly sent) and the requests it has in the kernel. The driver submits a
//! connection's queued bytes as a *chain*: up to [`CHAIN_MAX`] vectored send SQEs
//! (`SENDMSG_ZC`/`SENDMSG`), each with up to [`RANGES_MAX`] buffers of one kind, linked
//! with `IOSQE_IO_LINK` so that the kernel runs them one after the other, each with
//! `MSG_WAITALL` (the kernel retries a short send itself; one that still comes up short
//! fails the link, and the rest of the chain ends with `-ECANCELED`). Vectored, because
//! each request costs the kernel a socket lock and a push of segments: with one request
//! per 4 KiB chunk, forwarding spent most of its CPU contending for that lock. One chain
//! per connection at a time: the next starts when every result of the last one is in, at
//! the first byte not reported sent, so no byte is lost or sent twice.
//!
//! Zero-copy sends (`IORING_OP_SENDMSG_ZC`) post a result (bytes sent, `IORING_CQE_F_MORE`
//! if a notification follows) and later a notification (`IORING_CQE_F_NOTIF`): the kernel
//! reads the buffers until then. Each request holds its message (boxed: the SQE names it)
//! and an `Arc` of each [`Piece`] it reads, so a buffer
//! goes back to its owner (a zcrx chunk to the refill ring) only when the last request
//! reading it has its notification (or a result without `F_MORE`), and the queue is done
//! with it. Plain sends (`IORING_OP_SENDMSG`) are done at their result.
//!
//! How the driver sends, best first, falling back (logged once, counted) when the kernel
//! refuses: `SENDMSG_ZC` from the area registered as a fixed buffer
//! (`IORING_RECVSEND_FIXED_BUF` + its index, 6.15+; other memory is sent unregistered),
//! `SENDMSG_ZC` unregistered, plain `SENDMSG`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use zcrx_core::user_data::{UserData, UserDataKind};
use zcrx_sys::ring::{IORING_CQE_F_MORE, IORING_CQE_F_NOTIF, IORING_NOTIF_USAGE_ZC_COPIED};

use super::super::ring::{CompletionRing, SendKind, SendMessage, SendSqe};
use super::Driver;
use crate::send::{AfterSent, ConnSends, Piece, SendCounters};

/// Send SQEs per chain (per connection at a time).
const CHAIN_MAX: usize = 16;
/// Buffers per send SQE (the kernel takes up to `UIO_MAXIOV`, 1024): 64 chunks of 4 KiB
/// are 256 KiB per request, four times what a 64 KiB `write` moves.
const RANGES_MAX: usize = 64;
/// The most bytes one send SQE takes (the result is an `i32`; a `Bytes` may be longer).
const OP_MAX: usize = 1 << 30;

/// An `Internal` user_data payload with this bit is a send; below it, the connection's slot
/// (31 bits) and the request's sequence number (24 bits).
const SEND_TAG: u64 = 1 << 55;
const SLOT_SHIFT: u32 = 24;
const SEQ_MASK: u32 = (1 << SLOT_SHIFT) - 1;

fn send_user_data(slot: u32, seq: u32) -> u64 {
    let payload = SEND_TAG | (u64::from(slot) << SLOT_SHIFT) | u64::from(seq & SEQ_MASK);
    UserData::new(UserDataKind::Internal, payload)
        .expect("slot and sequence fit in the payload")
        .as_u64()
}

/// The slot and sequence of a send's `Internal` payload, if it is one.
pub(super) fn decode_send(payload: u64) -> Option<(u32, u32)> {
    (payload & SEND_TAG != 0).then(|| {
        let rest = payload & !SEND_TAG;
        ((rest >> SLOT_SHIFT) as u32, (rest as u32) & SEQ_MASK)
    })
}

/// The receive area as registered with `IORING_REGISTER_BUFFERS`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FixedBuffer {
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) index: u16,
}

impl FixedBuffer {
    fn contains(&self, ptr: usize, len: usize) -> bool {
        ptr >= self.base && ptr + len <= self.base + self.len
    }
}

/// One queued send: its pieces not fully sent, and how much of the first one is.
struct QueuedSend {
    pieces: VecDeque<Arc<Piece>>,
    offset: usize,
}

/// One send SQE in the kernel.
struct Op {
    seq: u32,
    /// Held until the kernel no longer reads them.
    _pieces: Vec<Arc<Piece>>,
    /// The ranges of `_pieces` the SQE names; at a fixed address (boxed) until the last CQE.
    message: Box<SendMessage>,
    len: u32,
    kind: SendKind,
    /// Bytes its result reported.
    sent: u32,
}

struct SendConn {
    socket: Arc<std::net::TcpStream>,
    conn: Arc<ConnSends>,
    queue: VecDeque<QueuedSend>,
    /// Submitted, result not seen yet, in submission order.
    chain: VecDeque<Op>,
    /// A result in the current chain came short or failed: the rest of it ends with
    /// `-ECANCELED` and sends nothing.
    chain_broken: bool,
    /// Result seen, notification not yet.
    notifying: Vec<Op>,
    /// A send failed: the queue is dropped and new sends fail.
    failed: bool,
}

impl SendConn {
    fn is_done(&self) -> bool {
        self.queue.is_empty() && self.chain.is_empty() && self.notifying.is_empty()
    }

    /// The queue's first `n` bytes were sent.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            let piece_left = front.pieces[0].bytes().len() - front.offset;
            let take = n.min(piece_left);
            front.offset += take;
            n -= take;
            if take == piece_left {
                front.pieces.pop_front();
                front.offset = 0;
                if front.pieces.is_empty() {
                    self.queue.pop_front();
                    let after = self.conn.sent();
                    self.after_sent(after);
                }
            }
        }
    }

    /// Gives up on the queue: its sends fail with `error` (the first error is what the
    /// write half sees); the pieces in the kernel stay held until their notifications.
    fn fail(&mut self, error: io::Error) {
        self.failed = true;
        let unsent = self.queue.len();
        self.queue.clear();
        let after = self.conn.fail(error, unsent);
        self.after_sent(after);
    }

    fn after_sent(&self, after: AfterSent) {
        if after == AfterSent::ShutDownWrite {
            // The write half is gone and its last send is done: shut down as its drop
            // would have. An error (reset, already shut) is moot.
            let _ = self.socket.shutdown(Shutdown::Write);
        }
    }
}

/// The driver's sends (see the module docs).
pub(crate) struct Sends {
    conns: Vec<Option<SendConn>>,
    /// The next request's sequence number, for every connection: a slot used again by a
    /// new connection does not start again at 0, so a CQE the kernel posts late for the
    /// slot's last user (an extra notification) cannot name a new request and release
    /// its buffers while the kernel still reads them.
    next_seq: u32,
    free: Vec<u32>,
    /// Slot by `Arc::as_ptr` of the connection's [`ConnSends`].
    by_conn: HashMap<usize, u32>,
    fixed: Option<FixedBuffer>,
    zero_copy: bool,
    counters: Arc<SendCounters>,
}

impl Sends {
    /// `fixed`: the area as registered (`None` if registration failed or was not tried);
    /// `zero_copy`: whether to try zero-copy sends at all.
    pub(crate) fn new(
        fixed: Option<FixedBuffer>,
        zero_copy: bool,
        counters: Arc<SendCounters>,
    ) -> Sends {
        Sends {
            conns: Vec::new(),
            next_seq: 0,
            free: Vec::new(),
            by_conn: HashMap::new(),
            fixed,
            zero_copy,
            counters,
        }
    }

    /// Whether any request is in the kernel (shutdown waits for these).
    pub(crate) fn requests_in_kernel(&self) -> bool {
        self.conns
            .iter()
            .flatten()
            .any(|c| !c.chain.is_empty() || !c.notifying.is_empty())
    }

    fn slot_of(&mut self, socket: &Arc<std::net::TcpStream>, conn: &Arc<ConnSends>) -> u32 {
        let key = Arc::as_ptr(conn) as usize;
        if let Some(&slot) = self.by_conn.get(&key) {
            return slot;
        }
        let entry = SendConn {
            socket: Arc::clone(socket),
            conn: Arc::clone(conn),
            queue: VecDeque::new(),
            chain: VecDeque::new(),
            chain_broken: false,
            notifying: Vec::new(),
            failed: false,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.conns.push(Some(entry));
                (self.conns.len() - 1) as u32
            }
        };
        self.by_conn.insert(key, slot);
        slot
    }

    fn remove_if_done(&mut self, slot: u32) {
        let done = self.conns[slot as usize]
            .as_ref()
            .is_some_and(SendConn::is_done);
        if done {
            let entry = self.conns[slot as usize].take().expect("checked");
            self.by_conn.remove(&(Arc::as_ptr(&entry.conn) as usize));
            self.free.push(slot);
        }
    }

    /// The driver stops for good: sends still queued fail; requests still in the kernel
    /// after the shutdown grace keep their buffers forever (leaked, logged), since the
    /// kernel may still read them.
    pub(crate) fn abandon(&mut self, reason: &str) {
        let mut leaked = 0usize;
        for conn in self.conns.iter_mut().flatten() {
            let in_kernel = conn.chain.len() + conn.notifying.len();
            if !conn.queue.is_empty() || in_kernel > 0 {
                // Also for sends only waiting for notifications: their write half's flush
                // would wait for buffers that never come back.
                conn.fail(io::Error::other(reason.to_string()));
            }
            for op in conn.chain.drain(..).chain(conn.notifying.drain(..)) {
                leaked += 1;
                std::mem::forget(op);
            }
        }
        if leaked > 0 {
            tracing::warn!(
                requests = leaked,
                "tokio-zcrx: sends still in the kernel when the driver stopped; their \
                 buffers are kept (leaked), since the kernel may still read them"
            );
        }
        self.conns.clear();
        self.by_conn.clear();
        self.free.clear();
    }
}

impl<R: CompletionRing> Driver<R> {
    /// A write half queued a send.
    pub(super) fn queue_send(
        &mut self,
        socket: Arc<std::net::TcpStream>,
        conn: Arc<ConnSends>,
        pieces: Vec<Arc<Piece>>,
    ) -> io::Result<()> {
        if self.stopping.is_some() {
            let after = conn.fail(
                io::Error::other("the tokio-zcrx runtime is shutting down"),
                1,
            );
            if after == AfterSent::ShutDownWrite {
                // The write half is gone and this was its last send: shut down as its drop
                // would have (an error, e.g. a reset, is moot).
                let _ = socket.shutdown(Shutdown::Write);
            }
            return Ok(());
        }
        let slot = self.sends.slot_of(&socket, &conn);
        let entry = self.sends.conns[slot as usize]
            .as_mut()
            .expect("slot_of made it");
        if entry.failed || conn.is_broken() {
            // The write half saw the failure or will: this send cannot follow a gap. If the
            // write half is gone and this was its last send, the connection is shut down
            // now: a send queued before the failure but handled after it was the last
            // thing the deferred shutdown waited for (without this, the peer never saw EOF).
            let after = entry.conn.fail(
                io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "an earlier send on this connection failed",
                ),
                1,
            );
            entry.after_sent(after);
            self.sends.remove_if_done(slot);
            return Ok(());
        }
        entry.queue.push_back(QueuedSend {
            pieces: pieces.into(),
            offset: 0,
        });
        self.submit_chain(slot)
    }

    /// Submits the next chain of connection `slot` if it has none in the kernel.
    fn submit_chain(&mut self, slot: u32) -> io::Result<()> {
        let sends = &mut self.sends;
        let Some(conn) = sends.conns[slot as usize].as_mut() else {
            return Ok(());
        };
        if conn.failed || !conn.chain.is_empty() {
            return Ok(());
        }
        let mut ops: Vec<Op> = Vec::new();
        'queue: for send in &conn.queue {
            for (index, piece) in send.pieces.iter().enumerate() {
                let bytes = piece.bytes();
                let mut start = if index == 0 { send.offset } else { 0 };
                while start < bytes.len() {
                    let ptr = bytes[start..].as_ptr();
                    let whole = (bytes.len() - start).min(OP_MAX);
                    let kind = if !sends.zero_copy {
                        SendKind::Plain
                    } else {
                        match sends.fixed {
                            Some(fixed) if fixed.contains(ptr as usize, whole) => {
                                SendKind::ZeroCopyFixed(fixed.index)
                            }
                            _ => SendKind::ZeroCopy,
                        }
                    };
                    // Into the last request if it is of the same kind and has room.
                    let room = ops
                        .last()
                        .filter(|op| op.kind == kind && op.message.ranges() < RANGES_MAX)
                        .map_or(0, |op| OP_MAX - op.len as usize);
                    if room == 0 {
                        if ops.len() == CHAIN_MAX {
                            break 'queue;
                        }
                        let seq = sends.next_seq & SEQ_MASK;
                        sends.next_seq = sends.next_seq.wrapping_add(1);
                        ops.push(Op {
                            seq,
                            _pieces: Vec::new(),
                            message: SendMessage::new(),
                            len: 0,
                            kind,
                            sent: 0,
                        });
                    }
                    let op = ops.last_mut().expect("pushed above if there was none");
                    let len = whole.min(OP_MAX - op.len as usize);
                    op.message.push(ptr, len);
                    op.len += len as u32;
                    if !op._pieces.last().is_some_and(|p| Arc::ptr_eq(p, piece)) {
                        op._pieces.push(Arc::clone(piece));
                    }
                    start += len;
                }
            }
        }
        conn.chain_broken = false;
        if ops.is_empty() {
            return Ok(());
        }
        let last = ops.len() - 1;
        let fd = conn.socket.as_raw_fd();
        // Sound by construction: each message and the ranges it names (in pieces its `Op`
        // holds) stay alive and unchanged until the request's last CQE (the result without
        // F_MORE, or the notification): the `Op` lives in `chain`, then `notifying`, until
        // then, and nobody writes a piece's bytes.
        let sqes: Vec<SendSqe> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| SendSqe {
                fd,
                message: &*op.message,
                len: op.len,
                kind: op.kind,
                link: i != last,
                user_data: send_user_data(slot, op.seq),
            })
            .collect();
        conn.chain.extend(ops);
        self.ring.send_chain(&sqes)
    }

    /// A send request's CQE (`Completion::Internal` with the send tag).
    pub(super) fn on_send_completion(
        &mut self,
        slot: u32,
        seq: u32,
        res: i32,
        flags: u32,
    ) -> io::Result<()> {
        let counters = Arc::clone(&self.sends.counters);
        let Some(conn) = self
            .sends
            .conns
            .get_mut(slot as usize)
            .and_then(Option::as_mut)
        else {
            tracing::warn!(
                slot,
                seq,
                res,
                "tokio-zcrx: a send CQE for no connection; ignored"
            );
            return Ok(());
        };
        if flags & IORING_CQE_F_NOTIF != 0 {
            let Some(at) = conn.notifying.iter().position(|op| op.seq == seq) else {
                tracing::warn!(slot, seq, "tokio-zcrx: a notification for no send; ignored");
                return Ok(());
            };
            let op = conn.notifying.swap_remove(at);
            let copied = res as u32 & IORING_NOTIF_USAGE_ZC_COPIED != 0;
            let counter = if copied {
                &counters.kernel_copied_bytes
            } else {
                &counters.zero_copy_bytes
            };
            SendCounters::add(counter, u64::from(op.sent));
            // Dropping `op` lets its piece go: the kernel no longer reads it.
            drop(op);
            self.sends.remove_if_done(slot);
            return Ok(());
        }
        let Some(at) = conn.chain.iter().position(|op| op.seq == seq) else {
            tracing::warn!(
                slot,
                seq,
                res,
                "tokio-zcrx: a send result for no request; ignored"
            );
            return Ok(());
        };
        if at != 0 {
            tracing::warn!(
                slot,
                seq,
                "tokio-zcrx: send results out of submission order"
            );
        }
        let mut op = conn.chain.remove(at).expect("found above");
        let more = flags & IORING_CQE_F_MORE != 0;
        let mut fallback = None;
        if res >= 0 {
            op.sent = res as u32;
            if conn.chain_broken {
                if res > 0 {
                    // Bytes after a gap: the kernel broke the link's order.
                    conn.fail(io::Error::other(
                        "the kernel sent bytes after a failed send in the same chain",
                    ));
                }
            } else {
                conn.advance(res as usize);
                if op.sent < op.len {
                    conn.chain_broken = true;
                }
            }
        } else {
            let errno = -res;
            let zero_copy = op.kind != SendKind::Plain;
            match errno {
                libc::ECANCELED if conn.chain_broken => {}
                // Cancelled with nothing before it failing: a later SQE of this chain failed
                // at prep and the kernel failed the link from its head
                // (`io_submit_fail_init`). Nothing was sent: the next chain sends it again.
                libc::ECANCELED => conn.chain_broken = true,
                // Not now: send the same bytes again with the next chain.
                libc::EAGAIN | libc::EINTR | libc::ENOMEM | libc::ENOBUFS => {
                    conn.chain_broken = true;
                }
                // The socket or the kernel does not do zero-copy sends (EOPNOTSUPP: the
                // socket lacks SOCK_SUPPORT_ZC; EINVAL without a notification: an opcode
                // or flag the kernel does not know).
                libc::EOPNOTSUPP | libc::EINVAL if zero_copy && !more => {
                    fallback = Some(Fallback::Plain);
                    conn.chain_broken = true;
                }
                libc::EOPNOTSUPP if zero_copy => {
                    fallback = Some(Fallback::Plain);
                    conn.chain_broken = true;
                }
                // The fixed buffer was refused (unregistered, or an index it does not know).
                libc::EFAULT | libc::EINVAL if matches!(op.kind, SendKind::ZeroCopyFixed(_)) => {
                    fallback = Some(Fallback::Unregistered);
                    conn.chain_broken = true;
                }
                _ => {
                    conn.chain_broken = true;
                    conn.fail(io::Error::from_raw_os_error(errno));
                }
            }
        }
        if more && op.kind != SendKind::Plain {
            conn.notifying.push(op);
        } else {
            if op.kind == SendKind::Plain {
                SendCounters::add(&counters.plain_bytes, u64::from(op.sent));
            }
            drop(op);
        }
        let chain_done = conn.chain.is_empty();
        if let Some(fallback) = fallback {
            self.fall_back(fallback);
        }
        if chain_done {
            self.submit_chain(slot)?;
        }
        self.sends.remove_if_done(slot);
        Ok(())
    }

    fn fall_back(&mut self, fallback: Fallback) {
        let sends = &mut self.sends;
        let changed = match fallback {
            Fallback::Unregistered => sends.fixed.take().is_some(),
            Fallback::Plain => std::mem::replace(&mut sends.zero_copy, false),
        };
        if changed {
            sends.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            match fallback {
                Fallback::Unregistered => tracing::warn!(
                    "tokio-zcrx: the kernel refused a zero-copy send from the registered \
                     area; sending without the fixed buffer from now on"
                ),
                Fallback::Plain => tracing::warn!(
                    "tokio-zcrx: the kernel or socket refused zero-copy sends \
                     (IORING_OP_SENDMSG_ZC); sending with plain sends (a copy) from now on"
                ),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fallback {
    Unregistered,
    Plain,
}
