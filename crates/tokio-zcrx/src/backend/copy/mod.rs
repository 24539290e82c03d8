//! The copy-mode backend: the same API without io_uring.
//!
//! Where zcrx cannot run (older kernels, NICs without header split, containers that forbid
//! io_uring, loopback), streams read with Tokio's readiness-based I/O into buffers from an
//! elastic [`Pool`] (a pre-allocated recycled set, heap buffers beyond it up to a memory
//! cap), handed out as [`ZcBuf`](crate::buf::ZcBuf)s and returned to the pool when dropped. Each stream's task does its own copying, so the copies
//! spread over Tokio's workers (one io_uring thread copying everything tops out near one
//! core's bandwidth). There is no driver thread: the runtime is the pool and an event channel.
//!
//! How it meets the backend contract (see [`crate::backend`]):
//!
//! - **Attach**: [`CopyRuntime::attach`] splits the socket; the read half becomes a
//!   [`CopyStream`], the write half goes straight to Tokio.
//! - **Order and ends**: a [`CopyStream`] reads the socket itself, one `read` per buffer
//!   (Tokio's `poll_read`, which clears readiness after a short read, so no read is wasted
//!   on EAGAIN), into a buffer sized to its recent reads; a bulk stream read in batches
//!   (`recv_many`, `next_batch`) fills up to four buffers of the largest size with one
//!   `readv` (extra buffers only from the recycled set, within its budget, and only while no
//!   stream waits for room and the pool holds under half its cap), and clears readiness
//!   after a short one the same way. So buffers come in byte-stream order; EOF is `None`, a
//!   read error (or the runtime's shutdown) is the one `Err`, and the stream is done after
//!   either.
//! - **Buffers**: each buffer holds a strong reference to its stream's share (which holds
//!   the [`Pool`]) and goes back through the pool's owner vtable when dropped, however long
//!   after the stream and runtime are gone: to the recycled set, or freed if it is beyond it.
//! - **Backpressure**: a connection holds no buffer while it has nothing to read: it waits
//!   for readiness first, then takes a buffer. No stream waits because others hold buffers
//!   until the memory cap (`Builder::copy_memory_limit`) is reached; then streams wait for
//!   returns, and a return goes to a stream that is being polled, about in waiting order,
//!   never to one that waited once and was then left alone (see
//!   [`PoolState`](pool::PoolState)). A stream that holds its budget (bytes delivered and
//!   not dropped) stops reading until its buffers' releases bring it to the low mark; its
//!   data waits in its socket.
//! - **Shutdown**: [`CopyRuntime::shut_down`] marks the pool closed, wakes the streams
//!   waiting for a buffer and those paused by their budget, and shuts down every socket's
//!   read side, so each stream sees an
//!   error at its next poll, which happens at once.
//! - **Observability**: every byte counts as copied in the statistics, and copying is
//!   announced with [`EventKind::CopyFallback`](crate::event::EventKind::CopyFallback)
//!   events, so monitoring code needs no special case.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::config::{CopyConfig, StreamOptions};
use crate::error::{Error, ErrorKind};
use crate::event::{Event, Stats};
use crate::send::SendCounters;
use crate::sys::{lock, syscall};
use crate::writer::ZcWriteHalf;
use pool::{wake_all, Pool};
pub(crate) use stream::CopyStream;

mod pool;
mod stream;

/// The copy-mode runtime: a pool and an event channel, no thread.
#[derive(Debug)]
pub(crate) struct CopyRuntime {
    pool: Arc<Pool>,
    /// Sends are plain writes here, counted all the same.
    send_counters: Arc<SendCounters>,
}

impl CopyRuntime {
    pub(crate) fn new(config: &CopyConfig) -> io::Result<CopyRuntime> {
        CopyRuntime::with_events(config, broadcast::channel(1024).0)
    }

    /// A runtime that reports on `events` (a channel shared with a group's drivers).
    pub(crate) fn with_events(
        config: &CopyConfig,
        events: broadcast::Sender<Event>,
    ) -> io::Result<CopyRuntime> {
        let pool = Pool::new(config, events)?;
        Ok(CopyRuntime {
            pool: Arc::new(pool),
            send_counters: Arc::default(),
        })
    }

    /// A receiver of this runtime's events; a closed one after shutdown.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.pool.subscribe()
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut stats = self.pool.stats();
        self.send_counters.fill(&mut stats);
        stats
    }

    /// Splits a connected socket: reads through the pool, writes straight to Tokio.
    pub(crate) fn attach(
        &self,
        socket: tokio::net::TcpStream,
        options: StreamOptions,
    ) -> (CopyStream, ZcWriteHalf) {
        let (read_half, write_half) = socket.into_split();
        let stream = CopyStream::new(
            read_half,
            Arc::clone(&self.pool),
            options.read_limit,
            options.budget,
        );
        (
            stream,
            ZcWriteHalf::tokio(write_half, Arc::clone(&self.send_counters)),
        )
    }

    pub(crate) fn description(&self) -> String {
        format!(
            "copy mode ({} buffers of {} bytes)",
            self.pool.buffers, self.pool.buffer_size
        )
    }

    pub(crate) fn check_running(&self) -> Result<(), Error> {
        if self.pool.closed.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::RuntimeGone,
                "the tokio-zcrx runtime has been shut down",
            ));
        }
        Ok(())
    }

    /// Ends every stream: each sees an error at its next poll, and shutting down the read
    /// side of its socket makes that poll happen now.
    ///
    /// Streams waiting for readiness are woken by the shutdown of their socket's read side;
    /// streams waiting for a buffer are woken here. Both locks are held while `closed` is set,
    /// so a stream attached or starting to wait concurrently either is woken here or sees
    /// `closed` at its next poll. Buffers still held stay valid (each holds the pool) and
    /// return to the free list as usual.
    pub(crate) fn shut_down(&self) {
        let sockets = lock(&self.pool.sockets);
        let waiters = {
            let mut state = self.pool.lock_state();
            self.pool.closed.store(true, Ordering::Relaxed);
            state.take_waiters()
        };
        for share in sockets.values() {
            // SAFETY: the fd belongs to a live CopyStream (entries are removed under this lock
            // before the socket closes); shutdown(2) does not close or free it.
            // A socket that is already shut down or disconnected answers ENOTCONN: its
            // reader ends either way, so the result is not needed.
            let _ = unsafe { syscall!(shutdown(share.fd, libc::SHUT_RD)) };
            // A stream paused by its budget waits for no readiness: wake it directly.
            share.wake();
        }
        drop(sockets);
        wake_all(waiters);
        self.pool.close_events();
    }
}
