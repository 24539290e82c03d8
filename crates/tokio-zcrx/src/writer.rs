//! The write half of an attached connection.

use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;

use crate::buf::{ZcBatch, ZcBuf};
use crate::send::{ConnSends, Payload, SendCounters, SendPath, DEFAULT_SENDS_IN_FLIGHT};

/// Buffers per vectored write: as many `iovec`s as Tokio's `write_all_buf` passes, well
/// under the kernel's `IOV_MAX` (1024).
const BUFFERS_PER_WRITE: usize = 64;

/// The write half of a connection whose receive side belongs to tokio-zcrx, for replies.
///
/// Returned by [`Zcrx::attach`](crate::Zcrx::attach) and
/// [`ZcListener::accept`](crate::ZcListener::accept). It implements Tokio's [`AsyncWrite`],
/// so `tokio::io::AsyncWriteExt` works on it. Dropping it shuts the sending direction down
/// (like Tokio's `OwnedWriteHalf`); the connection closes once the receive side is done too.
///
/// ```no_run
/// use futures::StreamExt;
/// use tokio::io::AsyncWriteExt;
///
/// # async fn reply(zcrx: tokio_zcrx::Zcrx, socket: tokio::net::TcpStream) -> std::io::Result<()> {
/// let (mut stream, mut writer) = zcrx.attach(socket)?;
/// while let Some(buf) = stream.next().await {
///     let buf = buf?;
///     let reply = format!("{} bytes\n", buf.len());
///     drop(buf); // back to the kernel before waiting on the peer
///     writer.write_all(reply.as_bytes()).await?;
/// }
/// writer.shutdown().await?;
/// # Ok(())
/// # }
/// ```
///
/// # Sending received buffers without a copy
///
/// [`send_buf`](Self::send_buf), [`send_batch`](Self::send_batch) and
/// [`send_bytes`](Self::send_bytes) move buffers into a send and return once it is queued.
/// In the io_uring modes the runtime's driver sends them with `IORING_OP_SENDMSG_ZC`,
/// straight from the receive area (registered as a fixed buffer where the kernel allows),
/// and gives each buffer back to the kernel only after the send's notification says the
/// kernel no longer reads it; in copy mode (and where zero-copy sends are unavailable) the same calls
/// write normally. See [`send_buf`](Self::send_buf) for the rules.
pub struct ZcWriteHalf {
    inner: Inner,
    sends: Sends,
}

impl std::fmt::Debug for ZcWriteHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZcWriteHalf")
            .field("inner", &self.inner)
            .field("queued_sends", &self.sends.queued.as_ref().map(|q| &q.conn))
            .field("max_sends_in_flight", &self.sends.max_in_flight)
            .finish()
    }
}

/// The write half's side of its sends.
struct Sends {
    counters: Arc<SendCounters>,
    /// io_uring modes: the driver sends for this connection.
    queued: Option<QueuedSends>,
    max_in_flight: usize,
}

struct QueuedSends {
    path: Arc<dyn SendPath>,
    conn: Arc<ConnSends>,
}

#[derive(Debug)]
enum Inner {
    /// Copy mode: Tokio reads the socket too, so it stays registered for both directions.
    Tokio(OwnedWriteHalf),
    /// io_uring modes: the kernel receives, so Tokio's reactor watches the socket for
    /// writability only. Registered for reads as well, every arriving packet would wake a
    /// Tokio worker (an epoll event) for data it never reads.
    WriteOnly(WriteOnly),
}

/// The socket registered for writability; shuts the sending direction down when dropped,
/// as Tokio's `OwnedWriteHalf` does (once the queued sends are sent: the driver does it).
#[derive(Debug)]
struct WriteOnly(AsyncFd<Arc<std::net::TcpStream>>, Option<Arc<ConnSends>>);

impl std::ops::Deref for WriteOnly {
    type Target = AsyncFd<Arc<std::net::TcpStream>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for WriteOnly {
    fn drop(&mut self) {
        if self.1.as_ref().is_some_and(|conn| conn.defer_shutdown()) {
            // Sends are still queued: the driver shuts down after the last one.
            return;
        }
        // An error (already shut down, or reset) is moot.
        let _ = self.0.get_ref().shutdown(Shutdown::Write);
    }
}

impl ZcWriteHalf {
    /// Copy mode: writes go to Tokio's write half, sends are written by the caller.
    pub(crate) fn tokio(half: OwnedWriteHalf, counters: Arc<SendCounters>) -> ZcWriteHalf {
        ZcWriteHalf {
            inner: Inner::Tokio(half),
            sends: Sends {
                counters,
                queued: None,
                max_in_flight: DEFAULT_SENDS_IN_FLIGHT,
            },
        }
    }

    /// Registers `socket` (non-blocking, not registered elsewhere) for writability only;
    /// sends go through `path`. Panics outside a Tokio runtime (the caller checks).
    pub(crate) fn write_only(
        socket: Arc<std::net::TcpStream>,
        path: Arc<dyn SendPath>,
        counters: Arc<SendCounters>,
    ) -> io::Result<ZcWriteHalf> {
        // SAFETY: the `Arc` owns the socket, so its descriptor stays open (and the same)
        // for as long as the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
        let conn = Arc::new(ConnSends::new(Arc::clone(&counters)));
        Ok(ZcWriteHalf {
            inner: Inner::WriteOnly(WriteOnly(fd, Some(Arc::clone(&conn)))),
            sends: Sends {
                counters,
                queued: Some(QueuedSends { path, conn }),
                max_in_flight: DEFAULT_SENDS_IN_FLIGHT,
            },
        })
    }

    /// Tokio's write half, in copy mode (for `ZcConnection::into_tcp_stream`); itself in the
    /// io_uring modes, where the socket is registered for writes only.
    pub(crate) fn into_tokio(self) -> Result<OwnedWriteHalf, ZcWriteHalf> {
        let ZcWriteHalf { inner, sends } = self;
        match inner {
            Inner::Tokio(half) => Ok(half),
            inner @ Inner::WriteOnly(_) => Err(ZcWriteHalf { inner, sends }),
        }
    }

    /// Sends `buf`'s bytes (from its cursor on) without copying them, and returns once the
    /// send is queued; the buffer belongs to the send from now on.
    ///
    /// - **Zero-copy** (nic and nodev modes): the runtime's driver sends with
    ///   `IORING_OP_SENDMSG_ZC` (vectored, up to 64 buffers a request) from the receive
    ///   area, registered as a fixed buffer where the kernel allows. The kernel may read the
    ///   buffer until the send's *notification*, so the chunk goes back to the refill ring
    ///   only then (or after a result that announces no notification). Whether the kernel really sent without copying shows in
    ///   [`Stats::send_kernel_copied_bytes`](crate::Stats::send_kernel_copied_bytes)
    ///   (loopback always copies). Where the kernel refuses zero-copy sends, the driver falls
    ///   back to plain sends, logs it once and counts it.
    /// - **Copy mode**: the bytes are written with ordinary writes before this returns
    ///   (counted in [`Stats::send_plain_bytes`](crate::Stats::send_plain_bytes)).
    /// - **Pipelined**: up to [`max_sends_in_flight`](Self::max_sends_in_flight) sends per
    ///   connection are in flight (queued, or sent and waiting for their notifications);
    ///   beyond that, the call waits for the oldest. Sends go out in call order; a short
    ///   send resumes where it stopped (no byte lost or sent twice).
    /// - **Errors**: a send that fails (the peer reset, ...) returns its buffers, drops the
    ///   sends queued after it, and its error is returned by the next call (`send_*`,
    ///   `write`, [`flush`](tokio::io::AsyncWriteExt::flush)); every later call fails too,
    ///   since the byte stream has a gap.
    /// - **Ordering with writes**: `AsyncWrite` writes on this half wait until earlier sends
    ///   have completed, so bytes keep their order; [`flush`](tokio::io::AsyncWriteExt::flush)
    ///   waits for every send, notifications included (every buffer is back after it).
    /// - **Any connection** of the runtime can be the destination: one accepted by a
    ///   [`ZcListener`](crate::ZcListener), or any `TcpStream` handed to
    ///   [`Zcrx::attach`](crate::Zcrx::attach) (a proxy attaches its upstream connection).
    ///   A buffer from another runtime's area is sent too (without the fixed buffer).
    ///
    /// Dropping the write half with sends queued lets them finish; the sending direction is
    /// shut down after the last one. Not cancel safe only in the sense that a dropped
    /// future may or may not have queued the send (it then owns the buffer either way).
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use tokio::io::AsyncWriteExt;
    ///
    /// # async fn forward(zcrx: tokio_zcrx::Zcrx, client: tokio::net::TcpStream) -> std::io::Result<()> {
    /// let upstream = tokio::net::TcpStream::connect("10.0.0.2:6379").await?;
    /// let (mut from_client, _reply_half) = zcrx.attach(client)?;
    /// let (_replies, mut to_upstream) = zcrx.attach(upstream)?;
    /// while let Some(buf) = from_client.next().await {
    ///     to_upstream.send_buf(buf?).await?; // no copy; the chunk returns after the send
    /// }
    /// to_upstream.flush().await?; // every send done, every buffer back
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_buf(&mut self, buf: ZcBuf) -> io::Result<()> {
        self.send_payloads(vec![Payload::Buf(buf)]).await
    }

    /// Sends every buffer of `batch`, in order, as one send (see
    /// [`send_buf`](Self::send_buf)); the batch is left empty, with its allocation, for the
    /// next [`recv_many`](crate::ZcStream::recv_many).
    ///
    /// ```no_run
    /// # async fn forward(mut from: tokio_zcrx::ZcStream, mut to: tokio_zcrx::ZcWriteHalf) -> std::io::Result<()> {
    /// let mut batch = tokio_zcrx::ZcBatch::with_capacity(64);
    /// while from.recv_many(&mut batch, 64).await? > 0 {
    ///     to.send_batch(&mut batch).await?;
    /// }
    /// tokio::io::AsyncWriteExt::shutdown(&mut to).await?; // after every send
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_batch(&mut self, batch: &mut ZcBatch) -> io::Result<()> {
        if self.sends.queued.is_none() {
            return self.write_batch(batch).await;
        }
        let mut payloads = Vec::with_capacity(batch.len());
        batch.take_into_with(&mut payloads, Payload::Buf);
        self.send_payloads(payloads).await
    }

    /// Copy mode's `send_batch`: vectored writes straight from the batch (one `writev` per
    /// 64 buffers, no allocation), as `write_all_buffers` does; the batch is emptied (its
    /// buffers returned at once) when the future completes or is dropped, so, as with a
    /// queued send, the call owns the buffers either way.
    async fn write_batch(&mut self, batch: &mut ZcBatch) -> io::Result<()> {
        /// Empties the batch when dropped.
        struct Emptied<'a>(&'a mut ZcBatch);
        impl Drop for Emptied<'_> {
            fn drop(&mut self) {
                self.0.clear();
            }
        }
        let batch = Emptied(batch);
        let bytes = batch.0.len_bytes();
        if bytes == 0 {
            return Ok(());
        }
        SendCounters::add(&self.sends.counters.sends, 1);
        self.write_all_buffers(batch.0).await?;
        SendCounters::add(&self.sends.counters.plain_bytes, bytes as u64);
        Ok(())
    }

    /// Sends `bytes` as [`send_buf`](Self::send_buf) does: held, unchanged, until the kernel
    /// is done with it. Zero-copy for any `Bytes` (one made with
    /// [`ZcBuf::into_bytes`] keeps its chunk until then; any other is sent from its own
    /// memory, without the fixed buffer).
    pub async fn send_bytes(&mut self, bytes: bytes::Bytes) -> io::Result<()> {
        self.send_payloads(vec![Payload::Bytes(bytes)]).await
    }

    /// How many sends may be in flight on this connection before `send_*` waits (32 unless
    /// set).
    pub fn max_sends_in_flight(&self) -> usize {
        self.sends.max_in_flight
    }

    /// Sets how many sends may be in flight before `send_*` waits for the oldest (at least
    /// 1). More keeps a fast link busy while notifications come back; each in-flight send
    /// holds its buffers (area memory) until its notification.
    pub fn set_max_sends_in_flight(&mut self, max: usize) {
        self.sends.max_in_flight = max.max(1);
    }

    async fn send_payloads(&mut self, mut payloads: Vec<Payload>) -> io::Result<()> {
        payloads.retain(|payload| !payload.as_slice().is_empty());
        if payloads.is_empty() {
            return Ok(());
        }
        SendCounters::add(&self.sends.counters.sends, 1);
        let Some(queued) = &self.sends.queued else {
            // Copy mode: write them now.
            let bytes: usize = payloads.iter().map(|p| p.as_slice().len()).sum();
            for payload in &payloads {
                self.write_all(payload.as_slice()).await?;
            }
            SendCounters::add(&self.sends.counters.plain_bytes, bytes as u64);
            return Ok(());
        };
        let max = self.sends.max_in_flight;
        std::future::poll_fn(|cx| queued.conn.poll_reserve(cx, max)).await?;
        let pieces = queued.conn.pieces(payloads);
        let socket = match &self.inner {
            Inner::WriteOnly(fd) => fd.get_ref(),
            Inner::Tokio(_) => unreachable!("queued sends are set up with a WriteOnly socket"),
        };
        if let Err(e) = queued.path.queue(socket, &queued.conn, pieces) {
            queued.conn.not_queued();
            return Err(e);
        }
        Ok(())
    }

    /// Waits until earlier sends are sent (`released`: and their buffers back).
    fn poll_sends_idle(&self, cx: &mut Context<'_>, released: bool) -> Poll<io::Result<()>> {
        match &self.sends.queued {
            Some(queued) => queued.conn.poll_idle(cx, released),
            None => Poll::Ready(Ok(())),
        }
    }

    fn socket(&self) -> SocketRef<'_> {
        match &self.inner {
            Inner::Tokio(half) => SocketRef::Tokio(half),
            Inner::WriteOnly(fd) => SocketRef::Std(fd.get_ref()),
        }
    }

    /// The remote address of the connection.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self.socket() {
            SocketRef::Tokio(half) => half.peer_addr(),
            SocketRef::Std(socket) => socket.peer_addr(),
        }
    }

    /// Whether `TCP_NODELAY` is set (Nagle's algorithm off).
    pub fn nodelay(&self) -> io::Result<bool> {
        match self.socket() {
            SocketRef::Tokio(half) => half.as_ref().nodelay(),
            SocketRef::Std(socket) => socket.nodelay(),
        }
    }

    /// Sets `TCP_NODELAY`: small replies go out at once instead of waiting for an ACK.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self.socket() {
            SocketRef::Tokio(half) => half.as_ref().set_nodelay(nodelay),
            SocketRef::Std(socket) => socket.set_nodelay(nodelay),
        }
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.socket() {
            SocketRef::Tokio(half) => half.local_addr(),
            SocketRef::Std(socket) => socket.local_addr(),
        }
    }

    /// Writes the bytes of `buffers`, in order, with vectored writes: one `writev` for up
    /// to 64 buffers, so a batch goes back to the network (an echo, a proxy) in one system
    /// call where the socket takes it all. A partial write resumes where it stopped, inside
    /// a buffer if need be. Each buffer's bytes are those it derefs to (what is left after
    /// any [`bytes::Buf::advance`]).
    ///
    /// Takes a [`ZcBatch`](crate::ZcBatch) too (`&batch` derefs to `&[ZcBuf]`): the batch is
    /// not consumed, so after the write it is dropped or [`clear`](crate::ZcBatch::clear)ed
    /// and its buffers go back to the kernel at once. (`write_all_buf(&mut batch)` from
    /// `AsyncWriteExt` does the same through `Buf::chunks_vectored`, consuming the batch's
    /// cursor.)
    ///
    /// A connection that stops taking bytes (a write of 0) fails with
    /// [`WriteZero`](io::ErrorKind::WriteZero). Not cancel safe: if the future is dropped
    /// before it completes, an unknown prefix of the bytes has been sent.
    ///
    /// ```no_run
    /// # async fn echo(mut stream: tokio_zcrx::ZcStream, mut writer: tokio_zcrx::ZcWriteHalf) -> std::io::Result<()> {
    /// let mut batch = tokio_zcrx::ZcBatch::with_capacity(64);
    /// while stream.recv_many(&mut batch, 64).await? > 0 {
    ///     writer.write_all_buffers(&batch).await?;
    ///     batch.clear();
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write_all_buffers(&mut self, buffers: &[ZcBuf]) -> io::Result<()> {
        // The first buffer not written in full, and how much of it is written.
        let (mut index, mut offset) = (0, 0);
        loop {
            while buffers.get(index).is_some_and(|buf| offset == buf.len()) {
                index += 1;
                offset = 0;
            }
            if index == buffers.len() {
                return Ok(());
            }
            let written = if index + 1 == buffers.len() {
                // One buffer left (copy mode's usual batch): a plain write (`send`, as Tokio's
                // copies make), no array of slices to set up and no `iovec` for the kernel
                // to import.
                let rest = &buffers[index][offset..];
                std::future::poll_fn(|cx| Pin::new(&mut *self).poll_write(cx, rest)).await
            } else if buffers.len() - index <= 8 {
                // A few (copy mode's read of several buffers): a small array to set up.
                self.write_vectored_from::<8>(&buffers[index..], offset)
                    .await
            } else {
                self.write_vectored_from::<BUFFERS_PER_WRITE>(&buffers[index..], offset)
                    .await
            };
            let mut written = match written {
                Ok(written) => written,
                // As `write_all_buf` does: a signal is no reason to give up.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if written == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the connection took no more bytes (write returned 0)",
                ));
            }
            // Move past what was written: whole buffers, then into the next one.
            while written > 0 {
                let left = buffers[index].len() - offset;
                if written < left {
                    offset += written;
                    break;
                }
                written -= left;
                index += 1;
                offset = 0;
            }
        }
    }

    /// One vectored write of up to `N` of `buffers`, the first from `offset` on.
    async fn write_vectored_from<const N: usize>(
        &mut self,
        buffers: &[ZcBuf],
        offset: usize,
    ) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); N];
        slices[0] = IoSlice::new(&buffers[0][offset..]);
        let mut count = 1;
        for (slot, buf) in slices[1..].iter_mut().zip(&buffers[1..]) {
            *slot = IoSlice::new(buf);
            count += 1;
        }
        let slices = &slices[..count];
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_write_vectored(cx, slices)).await
    }

    /// Writes with `write` once the socket is writable, retrying on spurious readiness.
    fn poll_write_with(
        fd: &AsyncFd<Arc<std::net::TcpStream>>,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&std::net::TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            // `try_io` clears the readiness on WouldBlock, so the next poll waits for epoll.
            match guard.try_io(|fd| write(fd.get_ref())) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }
}

enum SocketRef<'a> {
    Tokio(&'a OwnedWriteHalf),
    Std(&'a std::net::TcpStream),
}

impl AsyncWrite for ZcWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Earlier sends first (their buffers back too: the bytes of a zero-copy send are
        // in the kernel's hands until then), so the byte stream keeps its order.
        ready!(self.poll_sends_idle(cx, true))?;
        match &mut self.get_mut().inner {
            Inner::Tokio(half) => Pin::new(half).poll_write(cx, buf),
            Inner::WriteOnly(fd) => Self::poll_write_with(fd, cx, |mut s| s.write(buf)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_sends_idle(cx, true))?;
        match &mut self.get_mut().inner {
            Inner::Tokio(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            Inner::WriteOnly(fd) => Self::poll_write_with(fd, cx, |mut s| s.write_vectored(bufs)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every queued send, notifications included: every buffer is back after a flush.
        ready!(self.poll_sends_idle(cx, true))?;
        match &mut self.get_mut().inner {
            Inner::Tokio(half) => Pin::new(half).poll_flush(cx),
            // TCP sends have no user-space buffer to flush.
            Inner::WriteOnly(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_sends_idle(cx, true))?;
        match &mut self.get_mut().inner {
            Inner::Tokio(half) => Pin::new(half).poll_shutdown(cx),
            Inner::WriteOnly(fd) => Poll::Ready(fd.get_ref().shutdown(Shutdown::Write)),
        }
    }
}

/// The connection's socket, e.g. for `socket2::SockRef` options. Reading from it would take
/// bytes from under the receive side.
impl AsFd for ZcWriteHalf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.socket() {
            SocketRef::Tokio(half) => half.as_ref().as_fd(),
            SocketRef::Std(socket) => socket.as_fd(),
        }
    }
}

impl AsRawFd for ZcWriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
