//! One connection read in copy mode: its budget, then readiness, then room under the pool's
//! cap for a buffer of the size its recent reads call for, then one read.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use zcrx_core::budget::Budget;

use super::pool::{Block, Pool, StreamShare, Take};
use crate::buf::ZcBuf;
use crate::sys::lock;

/// Reads below the next smaller size class in a row before a stream's reads shrink (as
/// hyper's adaptive read strategy: one small read is not a trend).
const SMALL_READS_TO_SHRINK: u8 = 2;

/// The most buffers one read fills (`readv`), for a caller that takes several at once
/// (`recv_many`, `next_batch`): 256 KiB per system call with the default 64 KiB buffers.
const MAX_BLOCKS: usize = 4;

/// One connection read in copy mode.
#[derive(Debug)]
pub(crate) struct CopyStream {
    id: u64,
    socket: OwnedReadHalf,
    pool: Arc<Pool>,
    /// What the stream's buffers credit when dropped; registered with the pool for shutdown.
    share: Arc<StreamShare>,
    read_limit: Option<u32>,
    /// This stream's fixed budget (`StreamOptions::budget`), if any.
    budget: Option<u64>,
    /// The size class of the next read, and the largest one the read limit allows.
    class: usize,
    max_class: usize,
    /// Reads in a row below the next smaller class, and the largest of them.
    small_reads: u8,
    small_max: usize,
    /// Paused by the budget (counted in the pool's `streams_paused`).
    paused: bool,
    /// Where this stream's waker sits in the pool's waiting list: the list's generation and
    /// the slot. Stale once the generation moved on (the stream was woken).
    waiting: Option<(u64, usize)>,
    /// The last poll deferred free room to streams woken before it (see
    /// [`PoolState`](super::pool::PoolState));
    /// this poll takes it.
    deferred: bool,
    /// The last read filled all it asked for, so Tokio kept the socket's readiness (it
    /// clears it only after a short read or `EAGAIN`): the next read skips the readiness
    /// check, which would find the socket ready anyway.
    full: bool,
    /// Buffers the next bulk read may fill with one system call (1 to [`MAX_BLOCKS`]):
    /// doubled after a read that filled all it asked for, back to 1 after a short one.
    blocks: usize,
    done: bool,
}

impl CopyStream {
    pub(crate) fn new(
        socket: OwnedReadHalf,
        pool: Arc<Pool>,
        read_limit: Option<u32>,
        budget: Option<u64>,
    ) -> Self {
        let id = pool.next_stream.fetch_add(1, Ordering::Relaxed);
        let share = Arc::new(StreamShare {
            pool: Arc::clone(&pool),
            fd: socket.as_ref().as_raw_fd(),
            held: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            resume_at: AtomicU64::new(0),
            waker: Mutex::new(None),
        });
        pool.live_streams.fetch_add(1, Ordering::Relaxed);
        lock(&pool.sockets).insert(id, Arc::clone(&share));
        let max_class = match read_limit {
            Some(limit) => pool
                .classes
                .iter()
                .position(|&size| size >= limit as usize)
                .unwrap_or(pool.classes.len() - 1),
            None => pool.classes.len() - 1,
        };
        CopyStream {
            id,
            socket,
            pool,
            share,
            read_limit,
            budget,
            // The smallest first: a connection's first buffer (often held for the whole
            // connection, e.g. to parse a header) takes little of the cap; a bulk stream
            // reaches the largest in a few reads.
            class: 0,
            max_class,
            small_reads: 0,
            small_max: 0,
            paused: false,
            waiting: None,
            deferred: false,
            full: false,
            blocks: 1,
            done: false,
        }
    }

    fn shut_down_error<T>(&mut self) -> Poll<Option<io::Result<T>>> {
        self.done = true;
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the tokio-zcrx runtime was shut down",
        ))))
    }

    /// This stream's budget now: fixed per stream or runtime, else derived from the cap and
    /// the number of open streams.
    fn budget(&self) -> Budget {
        match self.budget.or(self.pool.stream_budget) {
            Some(high) => Budget::new(high),
            None => self
                .pool
                .budget_policy
                .budget(self.pool.live_streams.load(Ordering::Relaxed)),
        }
    }

    /// Whether the budget lets the stream read now; if not, it is paused and will be woken
    /// when a release brings it below its high mark (or by shutdown).
    ///
    /// A copy stream reads only when its reader asks for the next buffer, so a paused copy
    /// stream's reader is always waiting for more, and it resumes as soon as it holds less
    /// than its budget (`zcrx_core::receive::StreamReceive::reader_waiting`, which the
    /// io_uring driver applies once its reader waits): the low mark would leave a reader
    /// that holds between the two marks and cannot drop more before it gets more (a decoder
    /// holding part of a message) waiting for good, with its stream waiting for its drops.
    fn budget_allows(&mut self, cx: &mut Context<'_>) -> bool {
        let held = self.share.held.load(Ordering::SeqCst);
        // A running stream that holds nothing is within every budget (each is at least one
        // byte), so the usual case (a reader that drops each buffer before it asks for the
        // next) skips working the budget out: a derived one costs three divisions per read.
        if !self.paused && held == 0 {
            return true;
        }
        let budget = self.budget();
        if self.paused {
            if !budget.exceeded(held) {
                self.resume();
                return true;
            }
        } else if budget.exceeded(held) {
            self.paused = true;
            self.pool.on_pause();
        } else {
            return true;
        }
        // Paused: register, then check again (SeqCst pairs with `StreamShare::release`, which
        // lowers `held` and then reads `paused`): either a release sees `paused` and wakes
        // us, or we see its credit here.
        *lock(&self.share.waker) = Some(cx.waker().clone());
        self.share
            .resume_at
            .store(budget.high.saturating_sub(1), Ordering::SeqCst);
        self.share.paused.store(true, Ordering::SeqCst);
        if !budget.exceeded(self.share.held.load(Ordering::SeqCst)) {
            self.resume();
            return true;
        }
        false
    }

    fn resume(&mut self) {
        self.paused = false;
        self.share.paused.store(false, Ordering::SeqCst);
        self.pool.on_resume();
    }

    /// Takes room for a buffer (and its memory), or registers to be woken when room is
    /// returned; with it, up to `extra.len()` more buffers of the largest class where the
    /// pool has them to spare ([`Pool::reserve_extra`]).
    fn take_buffer(&mut self, cx: &mut Context<'_>, extra: &mut [Block]) -> Take {
        let mut state = self.pool.lock_state();
        if self.pool.closed.load(Ordering::Relaxed) {
            return Take::Closed;
        }
        // The round members older than this stream that have not been polled since they
        // were woken; a stream that is not in the latest round counts as the youngest.
        let mut older_unpolled = state.unpolled_count;
        if let Some((generation, slot)) = self.waiting {
            if generation == state.generation {
                // Still in the list (polled for another reason): the slot is kept while the
                // cap is reached and cleared when room is taken.
                if !self.pool.fits(self.class) {
                    let entry = &mut state.waiters[slot];
                    if !entry.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *entry = Some(cx.waker().clone());
                    }
                    return Take::Pending;
                }
                state.leave_waiters(slot);
            } else if generation + 1 == state.generation {
                older_unpolled = state.mark_polled(slot);
            }
            self.waiting = None;
        }
        if !self.pool.fits(self.class) {
            self.deferred = false;
            self.waiting = Some((state.generation, state.waiters.len()));
            state.waiters.push(Some(cx.waker().clone()));
            state.live_waiters += 1;
            return Take::Pending;
        }
        // (Counting the free room, a division, only when some stream may be owed it.)
        if !self.deferred
            && older_unpolled > 0
            && self.pool.room_units(self.class) <= older_unpolled
        {
            self.deferred = true;
            // Not under the pool's lock: a waker may poll or drop a buffer inline.
            drop(state);
            cx.waker().wake_by_ref();
            return Take::Pending;
        }
        self.deferred = false;
        let (class, block) = (self.class, self.pool.reserve(&mut state, self.class));
        // Extra buffers only with a first one from the recycled set (none left: no extra).
        let extras = match (&block, extra.is_empty()) {
            (Some(_), false) => self.pool.reserve_extra(&mut state, extra),
            _ => 0,
        };
        drop(state);
        self.pool.note_holding(self.pool.held());
        match block {
            Some(block) => Take::Buffer(block, extras),
            None => match self.pool.allocate(class) {
                Ok(block) => Take::Buffer(block, 0),
                Err(e) => Take::Failed(e),
            },
        }
    }

    /// Adapts the next read's size to this one's: twice as large after a read that filled
    /// its buffer; after a few in a row that would have fit a smaller class, the smallest
    /// class that fits the largest of them.
    fn adapt(&mut self, block: &Block, read: usize, asked: usize) {
        let class = block.class as usize;
        let classes = &self.pool.classes;
        if read == asked && asked == classes[class] {
            self.class = (class + 1).min(self.max_class);
            self.small_reads = 0;
        } else if class > 0 && read <= classes[class - 1] {
            self.small_reads += 1;
            self.small_max = if self.small_reads == 1 {
                read
            } else {
                self.small_max.max(read)
            };
            if self.small_reads >= SMALL_READS_TO_SHRINK {
                let fits = classes.iter().position(|&size| size >= self.small_max);
                self.class = fits.unwrap_or(class).min(class);
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        let mut first = None;
        match std::task::ready!(self.poll_read(cx, 1, |buf| first = Some(buf))) {
            Some(Ok(())) => Poll::Ready(first.map(Ok)),
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }

    /// Reads once and appends what it read to `out`, at most `max` buffers (at least one):
    /// `Some(Ok(()))` with at least one buffer appended, `None` at the end of the stream.
    /// A bulk stream (its reads fill the largest buffers) fills several buffers with one
    /// system call here, where a caller takes several at once (`recv_many`).
    pub(crate) fn poll_next_into(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<ZcBuf>,
        max: usize,
    ) -> Poll<Option<io::Result<()>>> {
        self.poll_read(cx, max.clamp(1, MAX_BLOCKS), |buf| out.push(buf))
    }

    /// One read into up to `max_blocks` buffers, each delivered in order.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        max_blocks: usize,
        mut deliver: impl FnMut(ZcBuf),
    ) -> Poll<Option<io::Result<()>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.pool.closed.load(Ordering::Relaxed) {
            return self.shut_down_error();
        }
        // A stream over its budget leaves its data in the socket.
        if !self.budget_allows(cx) {
            // Shutdown sets `closed` before it wakes paused streams: seen here or woken.
            if self.pool.closed.load(Ordering::SeqCst) {
                return self.shut_down_error();
            }
            return Poll::Pending;
        }
        // Readiness first: a connection with nothing to read holds no buffer (and does not
        // wait for room under the cap). After a full read the socket is still ready in
        // Tokio's eyes, and most likely has more to read (a bulk transfer): the read's own
        // readiness check is enough then, and if the socket turns out drained after all, the
        // buffers go back at once below.
        if !self.full {
            if let Err(e) = std::task::ready!(self.socket.as_ref().poll_read_ready(cx)) {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        }
        // Several buffers only for a bulk stream (the last read filled the largest class)
        // without a read limit; extra buffers come only from the recycled set.
        let extra_wanted = if max_blocks > 1
            && self.full
            && self.class == self.pool.classes.len() - 1
            && self.read_limit.is_none()
        {
            self.blocks.min(max_blocks) - 1
        } else {
            0
        };
        let mut extra = [Block::EMPTY; MAX_BLOCKS - 1];
        let extra_wanted = self.extra_within_budget(extra_wanted);
        // That read goes around Tokio's `poll_read` (`try_io`), so it takes its turn in the
        // task's cooperative budget here, as Tokio's reads do.
        let coop = if extra_wanted > 0 {
            Some(std::task::ready!(tokio::task::coop::poll_proceed(cx)))
        } else {
            None
        };
        let (block, extras) = match self.take_buffer(cx, &mut extra[..extra_wanted]) {
            Take::Buffer(block, extras) => (block, extras),
            Take::Pending => return Poll::Pending,
            Take::Closed => return self.shut_down_error(),
            Take::Failed(e) => {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        };
        if extras > 0 {
            let read = self.poll_read_blocks(cx, block, &extra[..extras], deliver);
            if let (Poll::Ready(Some(Ok(()))), Some(coop)) = (&read, coop) {
                coop.made_progress();
            }
            return read;
        }
        // (An unused turn is given back when `coop` drops; Tokio's read takes its own.)
        drop(coop);
        let size = self.pool.classes[block.class as usize];
        let asked = self.read_limit.map_or(size, |l| (l as usize).min(size));
        // SAFETY: the block was reserved for this read, so nothing else reads or writes it
        // until it is given back; it is `size` bytes of the mapping or of its heap
        // allocation. `ReadBuf` only writes it (tokio does not read uninitialised bytes).
        let memory =
            unsafe { std::slice::from_raw_parts_mut(block.ptr.cast::<MaybeUninit<u8>>(), asked) };
        let mut read_buf = ReadBuf::uninit(memory);
        // Tokio's `poll_read` clears the socket's readiness after a short read (the socket
        // is drained), so the next poll waits for the kernel's next readiness instead of
        // making one more read that fails with EAGAIN.
        match Pin::new(&mut self.socket).poll_read(cx, &mut read_buf) {
            Poll::Pending => {
                // Spurious readiness (or drained after a full read): give the buffer back;
                // the waker is registered.
                self.pool.give_back(block);
                self.full = false;
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let read = read_buf.filled().len();
                if read == 0 {
                    self.pool.give_back(block);
                    self.done = true;
                    return Poll::Ready(None);
                }
                self.full = read == asked;
                self.blocks = if self.full { 2 } else { 1 };
                self.adapt(&block, read, asked);
                deliver(self.pool.buffer(&self.share, block, read as u32));
                Poll::Ready(Some(Ok(())))
            }
            Poll::Ready(Err(e)) => {
                self.pool.give_back(block);
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    /// How many of `wanted` extra buffers of the largest class the stream's budget leaves
    /// room for, next to the one every read takes (a bulk read stays within the budget
    /// instead of overshooting it by several buffers).
    fn extra_within_budget(&self, wanted: usize) -> usize {
        if wanted == 0 {
            return 0;
        }
        let budget = self.budget();
        if budget.is_unlimited() {
            return wanted;
        }
        let size = self.pool.buffer_size as u64;
        let room = budget.room(self.share.held.load(Ordering::SeqCst)) / size;
        (room.saturating_sub(1)).min(wanted as u64) as usize
    }

    /// The read of a bulk stream into `first` and `extra` (all of the largest class, from
    /// the recycled mapped set) with one `readv`; the buffers it did not reach go back.
    fn poll_read_blocks(
        &mut self,
        cx: &mut Context<'_>,
        first: Block,
        extra: &[Block],
        mut deliver: impl FnMut(ZcBuf),
    ) -> Poll<Option<io::Result<()>>> {
        let size = self.pool.buffer_size;
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_BLOCKS];
        let count = 1 + extra.len();
        for (iovec, block) in iovecs.iter_mut().zip(std::iter::once(&first).chain(extra)) {
            *iovec = libc::iovec {
                iov_base: block.ptr.cast(),
                iov_len: size,
            };
        }
        let asked = size * count;
        let fd = self.share.fd;
        // As Tokio's own reads: a read that stops short (the socket is drained) clears the
        // readiness too, so the next poll waits for the kernel instead of making a read that
        // fails with EAGAIN. `try_io` clears it (as of the readiness seen before the read, so
        // data arriving meanwhile is not missed) when the closure says `WouldBlock`; the
        // bytes read are kept aside for that case.
        let mut short = None;
        let result = self.socket.as_ref().try_io(Interest::READABLE, || {
            // SAFETY: the iovecs cover `count` blocks reserved for this read (nothing else
            // reads or writes them until they are given back), each `size` bytes inside the
            // pool's mapping; `fd` is this stream's open socket.
            let read = unsafe { libc::readv(fd, iovecs.as_ptr(), count as libc::c_int) };
            if read < 0 {
                return Err(io::Error::last_os_error());
            }
            let read = read as usize;
            if read > 0 && read < asked {
                short = Some(read);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(read)
        });
        let read = match (result, short) {
            (_, Some(read)) => read,
            (Ok(read), None) => read,
            (Err(e), None) => {
                self.pool.give_back(first);
                for &block in extra {
                    self.pool.give_back(block);
                }
                self.full = false;
                self.blocks = 1;
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                    // Drained after all (`try_io` cleared the readiness), or a signal: wait
                    // for readiness as any read does (or try again at once if it is back).
                    if self.socket.as_ref().poll_read_ready(cx).is_ready() {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        };
        if read == 0 {
            self.pool.give_back(first);
            for &block in extra {
                self.pool.give_back(block);
            }
            self.done = true;
            return Poll::Ready(None);
        }
        self.full = read == asked;
        self.blocks = if self.full {
            (count * 2).min(MAX_BLOCKS)
        } else {
            1
        };
        // Counted together, before any is handed out (a buffer's release credits them).
        let filled = read.div_ceil(size);
        self.pool.on_copied(&self.share, read as u64, filled as u64);
        let mut left = read;
        for &block in std::iter::once(&first).chain(extra) {
            if left == 0 {
                self.pool.give_back(block);
                continue;
            }
            let len = left.min(size);
            left -= len;
            deliver(self.pool.unaccounted_buffer(&self.share, block, len as u32));
        }
        // The size class stays the largest: these reads filled at least one whole buffer.
        Poll::Ready(Some(Ok(())))
    }
}

impl CopyStream {
    /// Stops being a stream and gives the socket's read half back (for
    /// `ZcConnection::into_tcp_stream`). Nothing is buffered here: every byte read from the
    /// socket was handed out.
    pub(crate) fn into_read_half(self) -> OwnedReadHalf {
        let mut stream = std::mem::ManuallyDrop::new(self);
        stream.leave_pool();
        // SAFETY: `stream` is never used or dropped again, so each field that needs a drop
        // is moved out exactly once: the socket to the caller, the pool and share references
        // here.
        unsafe {
            drop(std::ptr::read(&stream.pool));
            drop(std::ptr::read(&stream.share));
            std::ptr::read(&stream.socket)
        }
    }

    /// What a stream going away owes the pool: its place among the waiters, its pause, and
    /// its entry among the streams shutdown reaches.
    fn leave_pool(&mut self) {
        if let Some((generation, slot)) = self.waiting.take() {
            let mut state = self.pool.lock_state();
            if generation == state.generation {
                // Still waiting: leave the list without a waker to wake.
                state.leave_waiters(slot);
            } else if generation + 1 == state.generation {
                // Woken by the latest return but never polled: nobody should defer to it.
                state.mark_polled(slot);
            }
        }
        if self.paused {
            self.resume();
        }
        self.pool.live_streams.fetch_sub(1, Ordering::Relaxed);
        // Under the lock, so shutdown never touches a descriptor that was closed (and maybe
        // reused) after this point.
        lock(&self.pool.sockets).remove(&self.id);
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        self.leave_pool();
    }
}

#[cfg(test)]
mod waiting_list_tests {
    use std::task::Waker;

    use tokio::io::AsyncWriteExt;
    use tokio::sync::broadcast;

    use super::*;

    /// A connection with a byte to read, whose stream waits for a buffer of the empty pool.
    async fn waiting_stream(
        listener: &tokio::net::TcpListener,
        pool: &Arc<Pool>,
    ) -> (CopyStream, tokio::net::TcpStream) {
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(b"x").await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        socket.readable().await.unwrap();
        let (read, _write) = socket.into_split();
        let mut stream = CopyStream::new(read, Arc::clone(pool), None, None);
        assert!(stream
            .poll_next(&mut Context::from_waker(Waker::noop()))
            .is_pending());
        (stream, client)
    }

    /// While the pool is empty, streams that start waiting and are dropped (clients that
    /// time out, resets) must not grow the waiting list: it used to keep one dead slot per
    /// such stream until the next buffer came back (found in review).
    #[tokio::test]
    async fn streams_dropped_while_waiting_do_not_grow_the_waiting_list() {
        let (events, _) = broadcast::channel(16);
        let pool = Arc::new(Pool::new(&super::super::pool::one_buffer_config(), events).unwrap());
        // The whole cap handed out: streams wait.
        let held = pool.reserve(&mut pool.lock_state(), 0);
        let held = held.expect("the one mapped buffer");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut survivor = None;
        for i in 0..500 {
            let (stream, client) = waiting_stream(&listener, &pool).await;
            if i == 0 {
                // One stream keeps waiting throughout: the list may hold it and what came
                // after it, but shrinks to nothing once it goes too.
                survivor = Some((stream, client));
            }
        }
        let len = pool.lock_state().waiters.len();
        assert!(len <= 500, "{len}");
        drop(survivor);
        assert_eq!(pool.lock_state().waiters.len(), 0, "dead slots left behind");
        for _ in 0..500 {
            let (stream, client) = waiting_stream(&listener, &pool).await;
            drop((stream, client));
            assert_eq!(pool.lock_state().waiters.len(), 0);
        }
        pool.give_back(held);
        assert_eq!(pool.lock_state().free.len(), 1);
    }
}
