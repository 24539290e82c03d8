//! [`ZcStream`]: the received bytes of one TCP connection, as a stream of [`ZcBuf`]s.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio_util::io::StreamReader;

use crate::backend::StreamSource;
use crate::buf::{ZcBatch, ZcBuf};
use crate::sys::claim::SocketClaim;

#[cfg(doc)]
use tokio::io::{AsyncBufRead, AsyncRead};

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
    source: StreamSource,
    /// Keeps the socket from being attached twice while this stream lives (dropped after
    /// `source`, which has stopped receiving by then).
    _claim: SocketClaim,
}

impl ZcStream {
    pub(crate) fn new(source: StreamSource, claim: SocketClaim) -> ZcStream {
        ZcStream {
            source,
            _claim: claim,
        }
    }

    /// Waits for data, then takes up to `max` buffers that have arrived (at least one):
    /// `None` at EOF, one `Err` if the connection fails, as with `next()`. It does not wait
    /// for more, and may hand out fewer than have arrived (those come with the next call).
    /// Each call allocates its batch; [`recv_many`](ZcStream::recv_many) reuses one.
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
        self.source.take_ready(&mut buffers, max);
        Poll::Ready(Some(Ok(ZcBatch::from_vec(buffers))))
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
        let first = match std::task::ready!(Pin::new(&mut *self).poll_next(cx)) {
            None => return Poll::Ready(Ok(0)),
            Some(Err(e)) => return Poll::Ready(Err(e)),
            Some(Ok(buf)) => buf,
        };
        let appended = batch.append_with(|buffers| {
            let max = buffers.len() + limit;
            buffers.push(first);
            self.source.take_ready(buffers, max);
        });
        Poll::Ready(Ok(appended))
    }

    /// Converts into an [`AsyncRead`] and zero-copy [`AsyncBufRead`], for code written
    /// against `tokio::io` (codecs, parsers, `tokio::io::copy`).
    ///
    /// The reader is Tokio's [`StreamReader`] over this stream: `poll_fill_buf` hands out
    /// the current buffer's bytes in place (no copy), and `consume` advances it as a
    /// [`bytes::Buf`]; `poll_read` copies into the caller's buffer, as `AsyncRead` must. A
    /// buffer is returned to the kernel when it is used up and the reader moves to the next
    /// (or when the reader is dropped). A connection error is reported once, then the reader
    /// is at EOF. [`StreamReader::into_inner_with_chunk`] gives the stream back with the
    /// buffer in use, if any.
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
    pub fn into_async_read(self) -> StreamReader<ZcStream, ZcBuf> {
        StreamReader::new(self)
    }
}

impl Stream for ZcStream {
    type Item = io::Result<ZcBuf>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.source.poll_next(cx)
    }
}
