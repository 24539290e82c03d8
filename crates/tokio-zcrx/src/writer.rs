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
///     writer.write_all(&buf?).await?;
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
    WriteOnly(AsyncFd<Arc<std::net::TcpStream>>),
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
            inner: Inner::WriteOnly(fd),
        })
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

impl Drop for ZcWriteHalf {
    fn drop(&mut self) {
        // As Tokio's OwnedWriteHalf does; an error (already shut down, or reset) is moot.
        if let Inner::WriteOnly(fd) = &self.inner {
            let _ = fd.get_ref().shutdown(Shutdown::Write);
        }
    }
}
