//! [`ZcStream`]: the received bytes of one TCP connection, as a stream of [`ZcBuf`]s.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::io::{AsyncRead, ReadBuf};

use crate::backend::StreamSource;
use crate::buf::{ZcBatch, ZcBuf};
use crate::sys::claim::SocketClaim;

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
        self.source.poll_next(cx)
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
