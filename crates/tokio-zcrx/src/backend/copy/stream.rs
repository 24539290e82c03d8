//! One connection read in copy mode: wait for readiness, take a pool buffer, copy into it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::tcp::OwnedReadHalf;

use super::pool::Pool;
use crate::buf::ZcBuf;
use crate::sys::lock;

/// One connection read in copy mode.
#[derive(Debug)]
pub(crate) struct CopyStream {
    id: u64,
    socket: OwnedReadHalf,
    pool: Arc<Pool>,
    read_limit: Option<u32>,
    /// Where this stream's waker sits in the pool's waiting list: the list's generation and
    /// the slot. Stale once the generation moved on (the stream was woken).
    waiting: Option<(u64, usize)>,
    /// The last poll deferred a free buffer to streams woken before it (see
    /// [`PoolState`](super::pool::PoolState));
    /// this poll takes it.
    deferred: bool,
    done: bool,
}

/// What a poll got from the pool.
enum Take {
    Buffer(u32),
    /// No buffer now; the stream's waker is registered (or it yields once).
    Pending,
    Closed,
}

impl CopyStream {
    pub(crate) fn new(socket: OwnedReadHalf, pool: Arc<Pool>, read_limit: Option<u32>) -> Self {
        let id = pool.next_stream.fetch_add(1, Ordering::Relaxed);
        lock(&pool.sockets).insert(id, socket.as_ref().as_raw_fd());
        CopyStream {
            id,
            socket,
            pool,
            read_limit,
            waiting: None,
            deferred: false,
            done: false,
        }
    }

    fn shut_down_error(&mut self) -> Poll<Option<io::Result<ZcBuf>>> {
        self.done = true;
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the tokio-zcrx runtime was shut down",
        ))))
    }

    /// Takes a free buffer, or registers to be woken when one is returned.
    fn take_buffer(&mut self, cx: &mut Context<'_>) -> Take {
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
                // pool is empty and cleared when a buffer is taken.
                if state.free.is_empty() {
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
        let free = state.free.len();
        if free == 0 {
            self.deferred = false;
            self.waiting = Some((state.generation, state.waiters.len()));
            state.waiters.push(Some(cx.waker().clone()));
            state.live_waiters += 1;
            return Take::Pending;
        }
        if !self.deferred && free <= older_unpolled {
            self.deferred = true;
            // Not under the pool's lock: a waker may poll or drop a buffer inline.
            drop(state);
            cx.waker().wake_by_ref();
            return Take::Pending;
        }
        self.deferred = false;
        Take::Buffer(state.free.pop().expect("checked that a buffer is free"))
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.pool.closed.load(Ordering::Relaxed) {
            return self.shut_down_error();
        }
        loop {
            // Readiness first: a connection with nothing to read holds no buffer.
            if let Err(e) = std::task::ready!(self.socket.as_ref().poll_read_ready(cx)) {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
            let index = match self.take_buffer(cx) {
                Take::Buffer(index) => index,
                Take::Pending => return Poll::Pending,
                Take::Closed => return self.shut_down_error(),
            };
            let limit = self.read_limit.map_or(self.pool.buffer_size, |l| {
                (l as usize).min(self.pool.buffer_size)
            });
            // SAFETY: the buffer came off the free list, so nothing else reads or writes it
            // until it is released; it lies inside the pool's mapping.
            let buffer =
                unsafe { std::slice::from_raw_parts_mut(self.pool.buffer_ptr(index), limit) };
            match self.socket.as_ref().try_read(buffer) {
                Ok(0) => {
                    self.pool.release(index);
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(n) => {
                    self.pool.on_copied(n);
                    let buf = Pool::buffer(&self.pool, index, n as u32);
                    return Poll::Ready(Some(Ok(buf)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Spurious readiness (cleared by try_read): give the buffer back, wait again.
                    self.pool.release(index);
                }
                Err(e) => {
                    self.pool.release(index);
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
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
        // is moved out exactly once: the socket to the caller, the pool reference here.
        unsafe {
            drop(std::ptr::read(&stream.pool));
            std::ptr::read(&stream.socket)
        }
    }

    /// What a stream going away owes the pool: its place among the waiters, and its entry
    /// among the sockets shutdown reaches.
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
    use std::time::Duration;

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
        let mut stream = CopyStream::new(read, Arc::clone(pool), None);
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
        let pool = Arc::new(Pool::new(1, 4096, events, Duration::from_secs(1)).unwrap());
        let held = pool.lock_state().free.pop().expect("one buffer");
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
        pool.release(held);
        assert_eq!(pool.lock_state().free.len(), 1);
    }
}
