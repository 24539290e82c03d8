//! The write half of an attached connection.

use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, Interest};
use tokio::net::tcp::OwnedWriteHalf;

use crate::buf::ZcBuf;

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
#[derive(Debug)]
pub struct ZcWriteHalf {
    inner: Inner,
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
/// as Tokio's `OwnedWriteHalf` does.
#[derive(Debug)]
struct WriteOnly(AsyncFd<Arc<std::net::TcpStream>>);

impl std::ops::Deref for WriteOnly {
    type Target = AsyncFd<Arc<std::net::TcpStream>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for WriteOnly {
    fn drop(&mut self) {
        // An error (already shut down, or reset) is moot.
        let _ = self.0.get_ref().shutdown(Shutdown::Write);
    }
}

impl ZcWriteHalf {
    pub(crate) fn tokio(half: OwnedWriteHalf) -> ZcWriteHalf {
        ZcWriteHalf {
            inner: Inner::Tokio(half),
        }
    }

    /// Registers `socket` (non-blocking, not registered elsewhere) for writability only.
    /// Panics outside a Tokio runtime (the caller checks).
    pub(crate) fn write_only(socket: Arc<std::net::TcpStream>) -> io::Result<ZcWriteHalf> {
        // SAFETY: the `Arc` owns the socket, so its descriptor stays open (and the same)
        // for as long as the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(ZcWriteHalf {
            inner: Inner::WriteOnly(WriteOnly(fd)),
        })
    }

    /// Tokio's write half, in copy mode (for `ZcConnection::into_tcp_stream`); itself in the
    /// io_uring modes, where the socket is registered for writes only.
    pub(crate) fn into_tokio(self) -> Result<OwnedWriteHalf, ZcWriteHalf> {
        match self.inner {
            Inner::Tokio(half) => Ok(half),
            inner @ Inner::WriteOnly(_) => Err(ZcWriteHalf { inner }),
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
            let mut slices = [IoSlice::new(&[]); BUFFERS_PER_WRITE];
            slices[0] = IoSlice::new(&buffers[index][offset..]);
            let mut count = 1;
            for (slot, buf) in slices[1..].iter_mut().zip(&buffers[index + 1..]) {
                *slot = IoSlice::new(buf);
                count += 1;
            }
            let slices = &slices[..count];
            let written =
                std::future::poll_fn(|cx| Pin::new(&mut *self).poll_write_vectored(cx, slices))
                    .await;
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
        match &mut self.get_mut().inner {
            Inner::Tokio(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            Inner::WriteOnly(fd) => Self::poll_write_with(fd, cx, |mut s| s.write_vectored(bufs)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Tokio(half) => Pin::new(half).poll_flush(cx),
            // TCP sends have no user-space buffer to flush.
            Inner::WriteOnly(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
