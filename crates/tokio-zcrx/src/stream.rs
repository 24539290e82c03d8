//! [`ZcStream`]: the received bytes of one TCP connection, as a stream of [`ZcBuf`]s.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, ToSocketAddrs};

use crate::buf::{ZcBatch, ZcBuf};
use crate::copy::CopyStream;
use crate::runtime::{Command, StreamKey, UringHandle};
use crate::writer::ZcWriteHalf;
use crate::Zcrx;

/// How a stream reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamOptions {
    /// At most this many bytes per receive request (the kernel's `len`); the next request is
    /// made only when the consumer has taken everything delivered. `None` (the default) keeps
    /// one receive running until EOF, the fastest way. A limit is backpressure: a slow consumer
    /// then holds at most about `limit` bytes of the area.
    pub read_limit: Option<u32>,
}

/// Why a stream ended, as the driver reports it: the kernel's own error (its errno intact,
/// as copy mode gives it) or the runtime's reason.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    Eof,
    Error(io::Error),
}

impl StreamEnd {
    /// The runtime ended the stream (shutdown, a failed driver, ...).
    pub(crate) fn runtime(message: impl Into<String>) -> StreamEnd {
        StreamEnd::Error(io::Error::new(io::ErrorKind::BrokenPipe, message.into()))
    }
}

/// Wakes a consumer task from the driver thread. A waker is user code (an executor's, or a
/// hand-written one): if it panics, that is this consumer's problem, not every stream's, so
/// the panic is contained and logged instead of ending the driver.
pub(crate) fn wake_contained(waker: Waker) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake())).is_err() {
        WAKER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!("tokio-zcrx: a task's waker panicked when woken; the driver carries on");
    }
}

/// Waker panics contained by [`wake_contained`], process-wide (tests read it).
pub(crate) static WAKER_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What the driver and the stream share.
#[derive(Debug, Default)]
pub(crate) struct StreamShared {
    state: Mutex<SharedState>,
}

#[derive(Debug, Default)]
struct SharedState {
    buffers: VecDeque<ZcBuf>,
    end: Option<StreamEnd>,
    waker: Option<Waker>,
    /// In limited mode: a request is running or was asked for.
    request_pending: bool,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // A panic while holding this lock cannot leave the queue inconsistent (pushes and
        // pops are single calls), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends buffers delivered in one reap and wakes the consumer once.
    pub(crate) fn deliver(&self, buffers: &mut Vec<ZcBuf>) {
        let waker = {
            let mut state = self.lock();
            state.buffers.extend(buffers.drain(..));
            state.waker.take()
        };
        if let Some(waker) = waker {
            wake_contained(waker);
        }
    }

    /// Ends the stream (after buffers already delivered).
    pub(crate) fn finish(&self, end: StreamEnd) {
        let waker = {
            let mut state = self.lock();
            if state.end.is_none() {
                state.end = Some(end);
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            wake_contained(waker);
        }
    }

    /// A limited request ended at its limit: the next one is made on demand.
    pub(crate) fn request_done(&self) {
        let waker = {
            let mut state = self.lock();
            state.request_pending = false;
            state.waker.take()
        };
        if let Some(waker) = waker {
            wake_contained(waker);
        }
    }
}

/// The received bytes of one TCP connection, as buffers in the zcrx area.
///
/// A [`Stream`] of `io::Result<ZcBuf>`: it yields buffers in order, ends with `None` at EOF,
/// and yields one `Err` (then `None`) if the connection fails (e.g. reset by the peer) or the
/// runtime stops. It can be polled from any task of any Tokio runtime; buffers can be sent to
/// other tasks and threads.
///
/// Obtain one with [`Zcrx::attach`] or [`ZcListener::accept`]. Dropping it stops receiving
/// on the connection (buffers already handed out stay valid).
///
/// ```no_run
/// use futures::StreamExt;
/// use tokio::io::AsyncWriteExt;
///
/// # async fn echo(zcrx: tokio_zcrx::Zcrx, socket: tokio::net::TcpStream) -> std::io::Result<()> {
/// let (mut stream, mut writer) = zcrx.attach(socket)?;
/// while let Some(buf) = stream.next().await {
///     writer.write_all(&buf?).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ZcStream {
    inner: Inner,
    /// Keeps the socket from being attached twice while this stream lives (set by attach;
    /// dropped after `inner`, which has stopped receiving by then).
    pub(crate) claim: Option<crate::runtime::SocketClaim>,
}

#[derive(Debug)]
enum Inner {
    Uring(UringStream),
    Copy(CopyStream),
}

/// A stream fed by the io_uring driver.
#[derive(Debug)]
struct UringStream {
    shared: Arc<StreamShared>,
    /// Buffers taken from `shared` in one lock, handed out one by one.
    local: VecDeque<ZcBuf>,
    key: StreamKey,
    handle: UringHandle,
    limited: bool,
    done: bool,
}

impl ZcStream {
    pub(crate) fn uring(
        shared: Arc<StreamShared>,
        key: StreamKey,
        handle: UringHandle,
        limited: bool,
    ) -> Self {
        ZcStream {
            inner: Inner::Uring(UringStream {
                shared,
                local: VecDeque::new(),
                key,
                handle,
                limited,
                done: false,
            }),
            claim: None,
        }
    }

    pub(crate) fn copy(stream: CopyStream) -> Self {
        ZcStream {
            inner: Inner::Copy(stream),
            claim: None,
        }
    }

    /// Waits for data, then takes up to `max` buffers that have arrived (at least one):
    /// `None` at EOF, one `Err` if the connection fails, as with `next()`. It does not wait
    /// for more, and may hand out fewer than have arrived (those come with the next call).
    ///
    /// Dropping a [`ZcBatch`] returns all its buffers to the kernel with one refill-ring
    /// publication instead of one per buffer, which is the cheaper way for a consumer that
    /// handles buffers in bursts anyway. In copy mode a batch holds one buffer.
    ///
    /// Cancel safe: buffers are taken only when the future completes, so it can be a
    /// `tokio::select!` branch.
    pub async fn next_batch(&mut self, max: usize) -> Option<io::Result<ZcBatch>> {
        std::future::poll_fn(|cx| self.poll_next_batch(cx, max)).await
    }

    /// The poll form of [`next_batch`](ZcStream::next_batch).
    pub fn poll_next_batch(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Option<io::Result<ZcBatch>>> {
        let max = max.max(1);
        let first = match std::task::ready!(Pin::new(&mut *self).poll_next(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            Some(Ok(buf)) => buf,
        };
        let mut buffers = vec![first];
        if let Inner::Uring(stream) = &mut self.inner {
            stream.take_ready(&mut buffers, max);
        }
        Poll::Ready(Some(Ok(ZcBatch::new(buffers))))
    }

    /// Converts into an [`AsyncRead`] (copies out of the buffers; use the stream itself where
    /// you can).
    pub fn into_async_read(self) -> ZcReader {
        ZcReader {
            stream: self,
            current: None,
            position: 0,
            pending_error: None,
        }
    }
}

impl Stream for ZcStream {
    type Item = io::Result<ZcBuf>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.inner {
            Inner::Uring(stream) => stream.poll_next(cx),
            Inner::Copy(stream) => stream.poll_next(cx),
        }
    }
}

impl UringStream {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        let this = self;
        if let Some(buf) = this.local.pop_front() {
            return Poll::Ready(Some(Ok(buf)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let mut state = this.shared.lock();
        if !state.buffers.is_empty() {
            std::mem::swap(&mut this.local, &mut state.buffers);
            drop(state);
            return Poll::Ready(this.local.pop_front().map(Ok));
        }
        if let Some(end) = state.end.take() {
            this.done = true;
            return Poll::Ready(match end {
                StreamEnd::Eof => None,
                StreamEnd::Error(error) => Some(Err(error)),
            });
        }
        let ask_for_more = this.limited && !state.request_pending;
        if ask_for_more {
            state.request_pending = true;
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        drop(state);
        if ask_for_more {
            if let Err(e) = this.handle.shared.send(Command::ReadMore(this.key)) {
                this.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
        }
        Poll::Pending
    }
}

impl UringStream {
    /// Moves buffers that have arrived into `out`, up to `max` in all, without waiting.
    fn take_ready(&mut self, out: &mut Vec<ZcBuf>, max: usize) {
        if self.local.is_empty() && out.len() < max {
            let mut state = self.shared.lock();
            std::mem::swap(&mut self.local, &mut state.buffers);
        }
        let take = (max - out.len()).min(self.local.len());
        out.extend(self.local.drain(..take));
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        // Always, also after EOF or an error: the driver's entry holds the socket and the
        // stream's slot until it hears the reader is gone (it cancels a running receive
        // first). An error means the driver is gone and has cleaned up already.
        let _ = self.handle.shared.send(Command::Close(self.key));
    }
}

/// An [`AsyncRead`] over a [`ZcStream`], for code that needs `tokio::io` traits. It copies
/// each buffer into the caller's; the zero-copy path is the stream itself.
#[derive(Debug)]
pub struct ZcReader {
    stream: ZcStream,
    current: Option<ZcBuf>,
    position: usize,
    /// An error that arrived after some bytes were copied in the same call: reported next.
    pending_error: Option<io::Error>,
}

impl AsyncRead for ZcReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.pending_error.take() {
            return Poll::Ready(Err(e));
        }
        let start = out.filled().len();
        while out.remaining() > 0 {
            if let Some(buf) = &this.current {
                let rest = &buf[this.position..];
                let n = rest.len().min(out.remaining());
                out.put_slice(&rest[..n]);
                this.position += n;
                if this.position == buf.len() {
                    this.current = None;
                    this.position = 0;
                }
                continue;
            }
            let nothing_yet = out.filled().len() == start;
            match Pin::new(&mut this.stream).poll_next(cx) {
                Poll::Ready(Some(Ok(buf))) => this.current = Some(buf),
                Poll::Ready(Some(Err(e))) if nothing_yet => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Err(e))) => {
                    this.pending_error = Some(e);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending if nothing_yet => return Poll::Pending,
                Poll::Pending => return Poll::Ready(Ok(())),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A TCP listener whose connections are received through a [`Zcrx`] runtime.
#[derive(Debug)]
pub struct ZcListener {
    listener: TcpListener,
    zcrx: Zcrx,
}

impl ZcListener {
    /// Binds a listener. Must be called within a Tokio runtime (else
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig)).
    pub async fn bind(zcrx: &Zcrx, addr: impl ToSocketAddrs) -> io::Result<ZcListener> {
        crate::runtime::require_tokio("ZcListener::bind")?;
        Ok(ZcListener {
            listener: TcpListener::bind(addr).await?,
            zcrx: zcrx.clone(),
        })
    }

    /// Wraps an existing Tokio listener.
    pub fn from_tokio(zcrx: &Zcrx, listener: TcpListener) -> ZcListener {
        ZcListener {
            listener,
            zcrx: zcrx.clone(),
        }
    }

    /// Accepts a connection: its receive stream, the write half for replies, and the peer.
    /// After [`Zcrx::shutdown`] it fails with
    /// [`ErrorKind::RuntimeGone`](crate::ErrorKind::RuntimeGone) without waiting.
    pub async fn accept(&self) -> io::Result<(ZcStream, ZcWriteHalf, SocketAddr)> {
        self.zcrx.check_running()?;
        let (socket, peer) = tokio::select! {
            biased;
            // Shut down while waiting: a server's accept loop ends instead of hanging.
            () = self.zcrx.stopped() => {
                self.zcrx.check_running()?;
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the tokio-zcrx runtime has stopped"));
            }
            accepted = self.listener.accept() => accepted?,
        };
        let (stream, writer) = self.zcrx.attach(socket)?;
        Ok((stream, writer, peer))
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
