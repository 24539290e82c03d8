//! The copy-mode backend: the same API without io_uring.
//!
//! Where zcrx cannot run (older kernels, NICs without header split, containers that forbid
//! io_uring, loopback), streams read with Tokio's readiness-based I/O into buffers from a
//! bounded, pre-allocated [`Pool`], handed out as [`ZcBuf`]s and returned to the pool when
//! dropped. Each stream's task does its own copying, so the copies spread over Tokio's
//! workers (one io_uring thread copying everything tops out near one core's bandwidth).
//!
//! A connection holds no buffer while it has nothing to read: it waits for readiness first,
//! then takes a buffer. When the pool is empty, streams wait for returns; nothing is lost and
//! nothing grows. Every byte counts as copied in the statistics, and copying is announced
//! with [`EventKind::CopyFallback`] events, so monitoring code needs no special case.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::PollSemaphore;

use crate::buf::ZcBuf;
use crate::error::{Error, ErrorKind};
use crate::event::{Event, EventKind, Stats};
use crate::mem::Mapping;

/// Buffers of the copy pool, LIFO: the most recently returned buffer is reused first, while
/// it is still in the CPU cache.
pub(crate) struct Pool {
    memory: Mapping,
    buffer_size: usize,
    /// Indices of free buffers, most recently returned last.
    free: Mutex<Vec<u32>>,
    /// One permit per free buffer. Waiting streams queue here in order; a stream that is
    /// dropped while waiting gives its place up, so no returned buffer is left unclaimed
    /// while others wait, and no more streams are woken than there are buffers.
    permits: Arc<Semaphore>,
    bytes: AtomicU64,
    chunks: AtomicU64,
    outstanding: AtomicU64,
    events: broadcast::Sender<Event>,
    /// Nanoseconds since `epoch` when the last copy event went out.
    last_event: AtomicU64,
    event_interval: Duration,
    epoch: Instant,
    /// Set by `Zcrx::shutdown`: streams end with an error at their next poll.
    closed: AtomicBool,
    /// Open copy-mode sockets by stream id, so shutdown can wake every stream (it shuts down
    /// their read side, which makes them readable). Touched on attach and drop only.
    sockets: Mutex<HashMap<u64, RawFd>>,
    next_stream: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("buffers", &(self.memory.len() / self.buffer_size))
            .field("buffer_size", &self.buffer_size)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(
        buffers: u32,
        buffer_size: usize,
        events: broadcast::Sender<Event>,
        event_interval: Duration,
    ) -> io::Result<Pool> {
        let memory = Mapping::new(buffers as usize * buffer_size, false)?;
        Ok(Pool {
            memory,
            buffer_size,
            free: Mutex::new((0..buffers).rev().collect()),
            permits: Arc::new(Semaphore::new(buffers as usize)),
            bytes: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            outstanding: AtomicU64::new(0),
            events,
            last_event: AtomicU64::new(u64::MAX),
            event_interval,
            epoch: Instant::now(),
            closed: AtomicBool::new(false),
            sockets: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
        })
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        lock(&self.free)
    }

    /// Takes a free buffer; the caller holds a permit (forgotten), so one is there.
    fn take(&self) -> u32 {
        self.lock_free()
            .pop()
            .expect("a permit guarantees a free buffer")
    }

    /// Puts a buffer back (unused, or dropped by its `ZcBuf`), then its permit.
    pub(crate) fn release(&self, index: u32) {
        self.lock_free().push(index);
        self.permits.add_permits(1);
    }

    pub(crate) fn release_delivered(&self, index: u32) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.release(index);
    }

    fn buffer_ptr(&self, index: u32) -> *mut u8 {
        // SAFETY: `index` comes from the free list, so it is below the buffer count and the
        // buffer lies inside the mapping.
        unsafe { self.memory.as_ptr().add(index as usize * self.buffer_size) }
    }

    fn on_copied(&self, len: usize) {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        // At most one CopyFallback event per interval, like re-armed kernel events.
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.last_event.load(Ordering::Relaxed);
        let due =
            last == u64::MAX || now.saturating_sub(last) >= self.event_interval.as_nanos() as u64;
        if due
            && self
                .last_event
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self.events.send(Event {
                kind: EventKind::CopyFallback,
                stats: self.stats(),
            });
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let chunks = self.chunks.load(Ordering::Relaxed);
        Stats {
            copy_count: Some(chunks),
            copy_bytes: Some(bytes),
            bytes,
            chunks,
            buffers_outstanding: self.outstanding.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }
}

/// One connection read in copy mode.
#[derive(Debug)]
pub(crate) struct CopyStream {
    id: u64,
    socket: OwnedReadHalf,
    pool: Arc<Pool>,
    permits: PollSemaphore,
    read_limit: Option<u32>,
    /// `permits` has a request in the semaphore's queue (its last poll was pending).
    queued: bool,
    done: bool,
}

impl CopyStream {
    pub(crate) fn new(socket: OwnedReadHalf, pool: Arc<Pool>, read_limit: Option<u32>) -> Self {
        let id = pool.next_stream.fetch_add(1, Ordering::Relaxed);
        lock(&pool.sockets).insert(id, socket.as_ref().as_raw_fd());
        CopyStream {
            id,
            socket,
            permits: PollSemaphore::new(Arc::clone(&pool.permits)),
            pool,
            read_limit,
            queued: false,
            done: false,
        }
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.pool.closed.load(Ordering::Relaxed) {
            self.done = true;
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tokio-zcrx runtime was shut down",
            ))));
        }
        let socket = self.socket.as_ref();
        loop {
            // Readiness first: a connection with nothing to read holds no buffer.
            if let Err(e) = std::task::ready!(socket.poll_read_ready(cx)) {
                self.done = true;
                return Poll::Ready(Some(Err(e)));
            }
            // A free buffer goes to waiting streams first (the semaphore hands released
            // permits to its queue), so a stream that is not queued may take one without
            // queueing; that saves the two reference-count updates of PollSemaphore's owned
            // permit per read. A queued stream must take its permit through the queue: a
            // permit handed to its queued request would otherwise sit there unused.
            let fast = !self.queued && self.pool.permits.try_acquire().map(|p| p.forget()).is_ok();
            if !fast {
                self.queued = true;
                let Some(permit) = std::task::ready!(self.permits.poll_acquire(cx)) else {
                    unreachable!("the pool's semaphore is never closed");
                };
                self.queued = false;
                permit.forget();
            }
            let index = self.pool.take();
            let limit = self.read_limit.map_or(self.pool.buffer_size, |l| {
                (l as usize).min(self.pool.buffer_size)
            });
            // SAFETY: the buffer came off the free list, so nothing else reads or writes it
            // until it is released; it lies inside the pool's mapping.
            let buffer =
                unsafe { std::slice::from_raw_parts_mut(self.pool.buffer_ptr(index), limit) };
            match socket.try_read(buffer) {
                Ok(0) => {
                    self.pool.release(index);
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(n) => {
                    self.pool.on_copied(n);
                    let buf = ZcBuf::from_pool(
                        Arc::clone(&self.pool),
                        index,
                        self.pool.buffer_ptr(index),
                        n as u32,
                    );
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

impl Drop for CopyStream {
    fn drop(&mut self) {
        // Under the lock, so shutdown never touches a descriptor that was closed (and maybe
        // reused) after this point.
        lock(&self.pool.sockets).remove(&self.id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The copy-mode runtime: a pool and an event channel, no thread.
#[derive(Debug)]
pub(crate) struct CopyRuntime {
    pub(crate) pool: Arc<Pool>,
    pub(crate) events: broadcast::Sender<Event>,
}

impl CopyRuntime {
    pub(crate) fn new(builder: &crate::Builder) -> io::Result<CopyRuntime> {
        let events = broadcast::channel(1024).0;
        let pool = Pool::new(
            builder.copy_buffers,
            builder.copy_buffer_size,
            events.clone(),
            builder.event_rearm_interval,
        )?;
        Ok(CopyRuntime {
            pool: Arc::new(pool),
            events,
        })
    }

    pub(crate) fn stats(&self) -> Stats {
        self.pool.stats()
    }

    pub(crate) fn description(&self) -> String {
        format!(
            "copy mode ({} buffers of {} bytes)",
            self.pool.memory.len() / self.pool.buffer_size,
            self.pool.buffer_size
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
    pub(crate) fn shut_down(&self) {
        self.pool.closed.store(true, Ordering::Relaxed);
        for &fd in lock(&self.pool.sockets).values() {
            // SAFETY: the fd belongs to a live CopyStream (entries are removed under this lock
            // before the socket closes); shutdown(2) does not close or free it.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
    }
}
