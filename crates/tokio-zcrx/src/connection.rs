//! [`ZcConnection`]: a connection's receive stream and write half as one `AsyncRead +
//! AsyncBufRead + AsyncWrite` value, for code that takes one I/O object (hyper, TLS, codecs,
//! proxies).

use std::fmt;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::buf::ZcBuf;
use crate::stream::{ZcReader, ZcStream};
use crate::writer::ZcWriteHalf;

/// One attached connection as a single I/O object: reads come from its [`ZcStream`]
/// (through a [`ZcReader`]: `AsyncRead`, and `AsyncBufRead` without a copy), writes go to its
/// [`ZcWriteHalf`].
///
/// Libraries that take one `AsyncRead + AsyncWrite` value take this: hyper (through
/// `hyper_util::rt::TokioIo`), TLS (`tokio_rustls::TlsAcceptor::accept`), tokio-util's
/// `Framed`, `tokio::io::copy_bidirectional`. [`ZcListener::incoming`] yields them; from
/// [`Zcrx::attach`] or [`ZcListener::accept`], join the two halves with
/// [`ZcConnection::new`].
///
/// ```no_run
/// use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
/// use tokio_zcrx::ZcConnection;
///
/// # async fn demo(zcrx: tokio_zcrx::Zcrx, socket: tokio::net::TcpStream) -> std::io::Result<()> {
/// let (stream, writer) = zcrx.attach(socket)?;
/// let mut connection = ZcConnection::new(stream, writer)?;
/// let mut line = String::new();
/// while connection.read_line(&mut line).await? > 0 {
///     connection.write_all(line.as_bytes()).await?; // a line echo
///     line.clear();
/// }
/// # Ok(())
/// # }
/// ```
///
/// # With hyper
///
/// hyper 1.x reads and writes through its own I/O traits; `hyper_util::rt::TokioIo` adapts a
/// Tokio I/O object, and a `ZcConnection` is one:
///
/// ```ignore
/// // hyper = { version = "1", features = ["server", "http1"] }, hyper-util = { features = ["tokio"] }
/// use futures::StreamExt;
/// use hyper_util::rt::TokioIo;
///
/// let mut incoming = listener.incoming();
/// while let Some(connection) = incoming.next().await {
///     let io = TokioIo::new(connection?);
///     tokio::spawn(async move {
///         let served = hyper::server::conn::http1::Builder::new()
///             .serve_connection(io, hyper::service::service_fn(handle))
///             .await;
///         if let Err(e) = served {
///             eprintln!("connection: {e}");
///         }
///     });
/// }
/// ```
///
/// hyper copies request bodies out of the buffers into its own (it reads with `poll_read`);
/// the receive itself is still zero copy in NIC mode.
///
/// # With TLS
///
/// `tokio_rustls::TlsAcceptor::accept` takes any `AsyncRead + AsyncWrite + Unpin`:
///
/// ```ignore
/// // tokio-rustls = "0.26"
/// let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_config));
/// let tls = acceptor.accept(connection).await?; // TlsStream<ZcConnection>
/// // Use `tls` as any TLS stream; hyper takes `TokioIo::new(tls)`.
/// ```
///
/// Decryption reads the ciphertext in place from the zcrx area and writes the plaintext into
/// the TLS library's buffer: one copy, which TLS needs anyway.
///
/// # With tokio-util codecs
///
/// `FramedRead` over the connection (or over [`ZcStream::into_async_read`]) hands the
/// decoder the received bytes; for a decoder that can work from [`bytes::Buf`]s, the buffers
/// themselves are `Buf`s (see [`ZcBuf`]):
///
/// ```no_run
/// use futures::StreamExt;
/// use tokio_util::codec::{FramedRead, LinesCodec};
///
/// # async fn demo(connection: tokio_zcrx::ZcConnection) -> Result<(), Box<dyn std::error::Error>> {
/// let mut lines = FramedRead::new(connection, LinesCodec::new());
/// while let Some(line) = lines.next().await {
///     println!("{}", line?);
/// }
/// # Ok(())
/// # }
/// ```
///
/// [`ZcListener::incoming`]: crate::ZcListener::incoming
/// [`ZcListener::accept`]: crate::ZcListener::accept
/// [`Zcrx::attach`]: crate::Zcrx::attach
#[derive(Debug)]
pub struct ZcConnection {
    reader: ZcReader,
    writer: ZcWriteHalf,
}

impl ZcConnection {
    /// Joins the stream and the write half of one connection, as [`Zcrx::attach`] and
    /// [`ZcListener::accept`] return them. Fails, giving both back, if they belong to
    /// different connections.
    ///
    /// [`ZcListener::accept`]: crate::ZcListener::accept
    /// [`Zcrx::attach`]: crate::Zcrx::attach
    // The error gives both halves back, as Tokio's `ReuniteError` does; it is no larger than
    // the connection the `Ok` holds.
    #[allow(clippy::result_large_err)]
    pub fn new(stream: ZcStream, writer: ZcWriteHalf) -> Result<ZcConnection, ReuniteError> {
        ZcConnection::reunite(stream.into_async_read(), writer)
    }

    /// Joins halves from [`into_split`](ZcConnection::into_split) again (or a reader from
    /// [`ZcStream::into_async_read`] and its write half). Fails, giving both back, if they
    /// belong to different connections.
    // The error gives both halves back, as Tokio's `ReuniteError` does; it is no larger than
    // the connection the `Ok` holds.
    #[allow(clippy::result_large_err)]
    pub fn reunite(reader: ZcReader, writer: ZcWriteHalf) -> Result<ZcConnection, ReuniteError> {
        if reader.get_ref().is_socket(writer.as_fd()) {
            Ok(ZcConnection { reader, writer })
        } else {
            Err(ReuniteError(reader, writer))
        }
    }

    /// The reader and the writer, to be used by different tasks. Bytes left in the buffer
    /// being read stay with the reader.
    pub fn into_split(self) -> (ZcReader, ZcWriteHalf) {
        (self.reader, self.writer)
    }

    /// Borrows the reader and the writer at once, e.g. to read and write concurrently in one
    /// task (`tokio::join!`, `tokio::io::copy_buf(reader, &mut other)`). (Not `split`, the
    /// name Tokio's `TcpStream` uses: `AsyncBufReadExt::split` would shadow it.)
    pub fn halves_mut(&mut self) -> (&mut ZcReader, &mut ZcWriteHalf) {
        (&mut self.reader, &mut self.writer)
    }

    /// The receive stream (through the reader).
    pub fn stream(&self) -> &ZcStream {
        self.reader.get_ref()
    }

    /// The write half.
    pub fn writer(&self) -> &ZcWriteHalf {
        &self.writer
    }

    /// The remote address of the connection.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.writer.peer_addr()
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// Stops receiving through tokio-zcrx and gives the Tokio socket back, with the bytes
    /// already read from it but not consumed (at most one buffer; they came before anything
    /// the socket will return), e.g. for a proxy that looked at a header and hands the rest
    /// of the connection on.
    ///
    /// Only in copy mode, where Tokio reads the socket anyway. In the io_uring modes (`nic`,
    /// `nodev`) the socket belongs to a receive the driver thread keeps running in the
    /// kernel: it cannot be handed back, and this fails with an [`IntoTcpStreamError`] that
    /// gives the connection back unchanged. The socket may be attached again later.
    // The error gives the connection back unchanged (a refusal loses nothing).
    #[allow(clippy::result_large_err)]
    pub fn into_tcp_stream(self) -> Result<(TcpStream, Option<ZcBuf>), IntoTcpStreamError> {
        // Checked before anything is taken apart, so that a refusal loses nothing.
        if !self.reader.get_ref().is_copy_mode() {
            return Err(IntoTcpStreamError { connection: self });
        }
        let (stream, unread) = self.reader.into_parts();
        let read_half = stream
            .into_copy_read_half()
            .expect("checked: a copy-mode stream");
        let write_half = self
            .writer
            .into_tokio()
            .expect("copy mode writes through Tokio's write half");
        let socket = read_half
            .reunite(write_half)
            .expect("copy mode splits one TcpStream into these two halves");
        Ok((socket, unread))
    }
}

impl AsyncRead for ZcConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, out)
    }
}

impl AsyncBufRead for ZcConnection {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().reader).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amount: usize) {
        Pin::new(&mut self.reader).consume(amount)
    }
}

impl AsyncWrite for ZcConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.writer.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// The connection's socket, e.g. for `socket2::SockRef` options (see [`ZcWriteHalf`]'s).
impl AsFd for ZcConnection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.writer.as_fd()
    }
}

impl AsRawFd for ZcConnection {
    fn as_raw_fd(&self) -> RawFd {
        self.writer.as_raw_fd()
    }
}

/// A reader and a write half of different connections, given back
/// ([`ZcConnection::new`], [`ZcConnection::reunite`]).
#[derive(Debug)]
pub struct ReuniteError(pub ZcReader, pub ZcWriteHalf);

impl fmt::Display for ReuniteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "tried to join the reader and the write half of two different connections into one \
             ZcConnection",
        )
    }
}

impl std::error::Error for ReuniteError {}

impl From<ReuniteError> for io::Error {
    fn from(err: ReuniteError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, err)
    }
}

/// [`ZcConnection::into_tcp_stream`] in an io_uring mode: the socket cannot be handed back.
/// The connection is unchanged; [`into_connection`](IntoTcpStreamError::into_connection)
/// returns it.
#[derive(Debug)]
pub struct IntoTcpStreamError {
    connection: ZcConnection,
}

impl IntoTcpStreamError {
    /// The connection, still receiving as before.
    pub fn into_connection(self) -> ZcConnection {
        self.connection
    }
}

impl fmt::Display for IntoTcpStreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the socket cannot be handed back in the io_uring modes (nic, nodev): the kernel \
             receives it into the zcrx area for a driver thread that owns the receive; only \
             copy mode can give the TcpStream back",
        )
    }
}

impl std::error::Error for IntoTcpStreamError {}
