//! [`ZcStream`]: the received bytes of one TCP connection, as a stream of [`ZcBuf`]s.

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio_util::io::StreamReader;

use crate::backend::StreamSource;
use crate::buf::{ZcBatch, ZcBuf};
use crate::sys::claim::SocketClaim;

/// The received bytes of one TCP connection, as buffers in the zcrx area.
///
/// A [`Stream`] of `io::Result<ZcBuf>`: it yields buffers in order, ends with `None` at EOF,
/// and yields one `Err` (then `None`) if the connection fails (e.g. reset by the peer) or the
/// runtime stops. Buffers can be sent to other tasks and threads.
///
/// The stream can be moved to and polled from any task, on any thread, while the Tokio
/// runtime it was attached in keeps running: in copy mode it reads through that runtime's
/// I/O driver, as the [`ZcWriteHalf`](crate::ZcWriteHalf) does in every mode, and once that
/// runtime shuts down both fail with an error. (In the io_uring modes the stream itself needs
/// no runtime: the driver thread wakes it.)
///
/// Obtain one with [`Zcrx::attach`](crate::Zcrx::attach) or
/// [`ZcListener::accept`](crate::ZcListener::accept). Dropping it stops receiving
/// on the connection (buffers already handed out stay valid).
///
/// An echo: what has arrived goes back in one vectored write, and the whole batch returns to
/// the kernel once written. While a slow peer makes the write wait, the stream holds the
/// batch, and its budget ([`Builder::stream_budget`](crate::Builder::stream_budget); see
/// docs/holding-buffers.md) stops it receiving more, so other connections are not starved.
///
/// ```no_run
/// # async fn echo(zcrx: tokio_zcrx::Zcrx, socket: tokio::net::TcpStream) -> std::io::Result<()> {
/// let (mut stream, mut writer) = zcrx.attach(socket)?;
/// let mut batch = tokio_zcrx::ZcBatch::with_capacity(64);
/// while stream.recv_many(&mut batch, 64).await? > 0 {
///     writer.write_all_buffers(&batch).await?;
///     batch.clear(); // all back to the kernel at once; the allocation is kept
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ZcStream {
    source: StreamSource,
    /// Keeps the socket from being attached twice while this stream lives (dropped after
    /// `source`, which has stopped receiving by then).
    claim: SocketClaim,
    /// Taken at attach: in the io_uring modes the stream holds no socket to ask.
    addresses: Addresses,
}

/// A connection's addresses as `getsockname`/`getpeername` gave them at attach (they do not
/// change while it is connected), or their errno.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addresses {
    local: Result<SocketAddr, i32>,
    peer: Result<SocketAddr, i32>,
}

impl Addresses {
    pub(crate) fn of(socket: &tokio::net::TcpStream) -> Addresses {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::ENOTCONN);
        Addresses {
            local: socket.local_addr().map_err(errno),
            peer: socket.peer_addr().map_err(errno),
        }
    }
}

impl ZcStream {
    pub(crate) fn new(source: StreamSource, claim: SocketClaim, addresses: Addresses) -> ZcStream {
        ZcStream {
            source,
            claim,
            addresses,
        }
    }

    /// The remote address of the connection.
    ///
    /// Read when the connection was attached; for a connection that was reset before that,
    /// the error `getpeername` gave then (`NotConnected`).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.addresses.peer.map_err(io::Error::from_raw_os_error)
    }

    /// The local address of the connection (read when it was attached).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.addresses.local.map_err(io::Error::from_raw_os_error)
    }

    /// Whether `socket` (a descriptor of any connection) is this stream's connection.
    pub(crate) fn is_socket(&self, socket: BorrowedFd<'_>) -> bool {
        self.claim.is_socket(socket)
    }

    /// Whether the stream reads through Tokio (copy mode), so its socket can be handed back.
    pub(crate) fn is_copy_mode(&self) -> bool {
        self.source.is_copy()
    }

    /// The Tokio read half of a copy-mode stream, which stops being a stream; the stream
    /// itself in the io_uring modes, where the kernel receives and no read half exists.
    // The error is the stream itself, given back.
    #[allow(clippy::result_large_err)]
    pub(crate) fn into_copy_read_half(self) -> Result<tokio::net::tcp::OwnedReadHalf, ZcStream> {
        let ZcStream {
            source,
            claim,
            addresses,
        } = self;
        // The claim goes with the stream: the caller owns the socket again.
        source.into_copy_read_half().map_err(|source| ZcStream {
            source,
            claim,
            addresses,
        })
    }

    /// Waits for data, then takes up to `max` buffers that have arrived (at least one):
    /// `None` at EOF, one `Err` if the connection fails, as with `next()`. It does not wait
    /// for more, and may hand out fewer than have arrived (those come with the next call).
    /// Each call allocates its batch; [`recv_many`](ZcStream::recv_many) reuses one.
    ///
    /// Dropping a [`ZcBatch`] returns all its buffers to the kernel with one refill-ring
    /// publication instead of one per buffer, which is the cheaper way for a consumer that
    /// handles buffers in bursts anyway. In copy mode a batch holds what one read filled: one
    /// buffer, or up to four (one `readv`) once a bulk stream's reads fill the largest ones.
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
        let mut buffers = Vec::new();
        match std::task::ready!(self.source.poll_next_into(cx, &mut buffers, max)) {
            None => Poll::Ready(None),
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            Some(Ok(())) => Poll::Ready(Some(Ok(ZcBatch::from_vec(buffers)))),
        }
    }

    /// Waits for data, then appends up to `limit` buffers that have arrived (at least one) to
    /// `batch`, and returns how many it appended; as Tokio's `mpsc::Receiver::recv_many`:
    ///
    /// - `Ok(0)` means EOF (or a `limit` of 0, which returns at once);
    /// - a connection failure (reset by the peer, runtime shut down) is returned once as
    ///   `Err`, with the kernel's error as [`next`](futures_core::Stream) gives it; later calls
    ///   return `Ok(0)`;
    /// - buffers already in `batch` stay there: [`ZcBatch::clear`] between calls returns them
    ///   all to the kernel in one publication and keeps the allocation, so a receive loop
    ///   allocates nothing once the batch has grown to `limit`.
    ///
    /// It does not wait for more than one buffer. Cancel safe, as
    /// [`next_batch`](ZcStream::next_batch).
    ///
    /// ```no_run
    /// # async fn demo(mut stream: tokio_zcrx::ZcStream) -> std::io::Result<()> {
    /// use tokio_zcrx::ZcBatch;
    ///
    /// let mut batch = ZcBatch::with_capacity(64);
    /// let mut total = 0;
    /// while stream.recv_many(&mut batch, 64).await? > 0 {
    ///     total += batch.len_bytes();
    ///     batch.clear(); // all 64 back to the kernel at once; the Vec stays
    /// }
    /// # let _ = total;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn recv_many(&mut self, batch: &mut ZcBatch, limit: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_recv_many(cx, batch, limit)).await
    }

    /// The poll form of [`recv_many`](ZcStream::recv_many).
    pub fn poll_recv_many(
        &mut self,
        cx: &mut Context<'_>,
        batch: &mut ZcBatch,
        limit: usize,
    ) -> Poll<io::Result<usize>> {
        if limit == 0 {
            return Poll::Ready(Ok(0));
        }
        let (appended, result) = batch.append_with(|buffers| {
            let max = buffers.len() + limit;
            self.source.poll_next_into(cx, buffers, max)
        });
        match std::task::ready!(result) {
            None => Poll::Ready(Ok(0)),
            Some(Err(e)) => Poll::Ready(Err(e)),
            Some(Ok(())) => Poll::Ready(Ok(appended)),
        }
    }

    /// Converts into an [`AsyncRead`] and zero-copy [`AsyncBufRead`] ([`ZcReader`]), for
    /// code written against `tokio::io` (codecs, parsers, `tokio::io::copy_buf`).
    ///
    /// ```no_run
    /// # async fn demo(zcrx: tokio_zcrx::Zcrx, socket: tokio::net::TcpStream) -> std::io::Result<()> {
    /// use tokio::io::AsyncBufReadExt;
    ///
    /// let (stream, _writer) = zcrx.attach(socket)?;
    /// let mut reader = stream.into_async_read();
    /// let mut line = String::new();
    /// while reader.read_line(&mut line).await? > 0 {
    ///     print!("{line}");
    ///     line.clear();
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_async_read(self) -> ZcReader {
        ZcReader {
            inner: Some(StreamReader::new(self)),
            unconsumed: 0,
        }
    }
}

impl Stream for ZcStream {
    type Item = io::Result<ZcBuf>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.source.poll_next(cx)
    }
}

/// A [`ZcStream`] as an [`AsyncRead`] and a zero-copy [`AsyncBufRead`]
/// ([`ZcStream::into_async_read`]).
///
/// It is `tokio_util`'s [`StreamReader`] over the stream, with one addition: a buffer goes
/// back to the kernel as soon as it is consumed, not when the next one arrives (an idle
/// connection must not hold a chunk of the area; thousands of idle keep-alive connections
/// would otherwise fill it).
///
/// - `poll_fill_buf` hands out the current buffer's bytes in place, no copy (the slice
///   points into the zcrx area or the copy pool), and `consume` advances it as a
///   [`bytes::Buf`];
/// - `poll_read` copies into the caller's buffer, as `AsyncRead` must: where the code
///   allows it, use `AsyncBufRead` (`fill_buf`/`consume`, `copy_buf`, `read_line`,
///   `FramedRead`'s decoder sees the bytes as they arrive) or the stream itself;
/// - a connection error is returned once, then the reader is at EOF.
///
/// ```no_run
/// # async fn demo(zcrx: tokio_zcrx::Zcrx, socket: tokio::net::TcpStream) -> std::io::Result<()> {
/// use tokio::io::AsyncBufReadExt;
///
/// let (stream, _writer) = zcrx.attach(socket)?;
/// let mut reader = stream.into_async_read();
/// loop {
///     let bytes = reader.fill_buf().await?; // in the zcrx area: no copy
///     if bytes.is_empty() {
///         break; // EOF
///     }
///     let n = bytes.len();
///     reader.consume(n); // the buffer goes back to the kernel here
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ZcReader {
    /// `None` only inside `release_used_up`.
    inner: Option<StreamReader<ZcStream, ZcBuf>>,
    /// Bytes of the slice `poll_fill_buf` last handed out that were not consumed yet: at
    /// 0 after a `consume`, the buffer is used up.
    unconsumed: usize,
}

impl ZcReader {
    fn reader(&mut self) -> &mut StreamReader<ZcStream, ZcBuf> {
        self.inner
            .as_mut()
            .expect("only taken inside release_used_up")
    }

    /// The stream.
    pub fn get_ref(&self) -> &ZcStream {
        self.inner
            .as_ref()
            .expect("only taken inside release_used_up")
            .get_ref()
    }

    /// The stream. Reading from it directly skips the bytes left in the current buffer.
    pub fn get_mut(&mut self) -> &mut ZcStream {
        self.reader().get_mut()
    }

    /// The stream, and the buffer being read if bytes are left in it (advanced past what
    /// was consumed), so that nothing read from the connection is lost.
    pub fn into_parts(mut self) -> (ZcStream, Option<ZcBuf>) {
        self.inner
            .take()
            .expect("only taken inside release_used_up")
            .into_inner_with_chunk()
    }

    /// Drops the current buffer, now used up, so it returns to the kernel at once.
    fn release_used_up(&mut self) {
        let reader = self.inner.take().expect("not reentrant");
        // No bytes are left in it, so it comes back as `None` and drops.
        let (stream, rest) = reader.into_inner_with_chunk();
        debug_assert!(rest.is_none());
        self.inner = Some(StreamReader::new(stream));
    }
}

impl AsyncRead for ZcReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let bytes = std::task::ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = bytes.len().min(out.remaining());
        out.put_slice(&bytes[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncBufRead for ZcReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        let bytes = std::task::ready!(Pin::new(
            this.inner
                .as_mut()
                .expect("only taken inside release_used_up")
        )
        .poll_fill_buf(cx))?;
        this.unconsumed = bytes.len();
        Poll::Ready(Ok(bytes))
    }

    fn consume(self: Pin<&mut Self>, amount: usize) {
        let this = self.get_mut();
        if amount == 0 {
            return;
        }
        Pin::new(this.reader()).consume(amount);
        // A buffer's bytes are one contiguous chunk, all handed out by `poll_fill_buf`.
        this.unconsumed = this.unconsumed.saturating_sub(amount);
        if this.unconsumed == 0 {
            this.release_used_up();
        }
    }
}
