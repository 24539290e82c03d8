//! [`ZcListener`]: a TCP listener whose connections are received through a runtime.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::net::{TcpListener, ToSocketAddrs};

use crate::connection::ZcConnection;
use crate::stream::ZcStream;
use crate::writer::ZcWriteHalf;
use crate::zcrx::Zcrx;

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
        crate::zcrx::require_tokio("ZcListener::bind")?;
        let listener = TcpListener::bind(addr).await?;
        zcrx.prepare_listener(&listener)?;
        Ok(ZcListener {
            listener,
            zcrx: zcrx.clone(),
        })
    }

    /// Wraps an existing Tokio listener, preparing it as [`Zcrx::prepare_listener`] does
    /// (a failure to is logged: the listener works, its connections' windows are only
    /// bounded from attach on).
    pub fn from_tokio(zcrx: &Zcrx, listener: TcpListener) -> ZcListener {
        if let Err(error) = zcrx.prepare_listener(&listener) {
            tracing::warn!(
                "tokio-zcrx: cannot bound the TCP window of a listener's connections: {error}"
            );
        }
        ZcListener {
            listener,
            zcrx: zcrx.clone(),
        }
    }

    /// Accepts a connection: its receive stream, the write half for replies, and the peer.
    /// It is attached with [`Zcrx::attach_async`]: with several queues, a connection whose
    /// NAPI id is not known yet is held up to [`Builder::napi_wait`](crate::Builder::napi_wait)
    /// before this returns. After [`Zcrx::shutdown`] it fails with
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
        // With several queues, a connection whose queue is not known yet waits (bounded)
        // for its first packet.
        let (stream, writer) = self.zcrx.attach_async(socket).await?;
        Ok((stream, writer, peer))
    }

    /// The connections to come, as a [`Stream`] of [`ZcConnection`]s (the stream and the
    /// write half of each, joined; `peer_addr` gives the peer).
    ///
    /// An error accepting or attaching one connection (a descriptor limit, a connection
    /// reset before it was attached) is yielded as an `Err` and the stream goes on, so a
    /// server loop logs it and continues. Once the runtime has stopped
    /// ([`Zcrx::shutdown`]), it yields one
    /// [`ErrorKind::RuntimeGone`](crate::ErrorKind::RuntimeGone) error, then ends.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use tokio::io::AsyncWriteExt;
    ///
    /// # async fn serve(listener: tokio_zcrx::ZcListener) {
    /// let mut incoming = listener.incoming();
    /// while let Some(connection) = incoming.next().await {
    ///     let mut connection = match connection {
    ///         Ok(connection) => connection,
    ///         Err(e) => {
    ///             eprintln!("accept: {e}");
    ///             continue; // the stream ends by itself when the runtime stops
    ///         }
    ///     };
    ///     tokio::spawn(async move {
    ///         let (reader, writer) = connection.halves_mut();
    ///         let _ = tokio::io::copy_buf(reader, writer).await; // an echo
    ///         let _ = connection.shutdown().await;
    ///     });
    /// }
    /// # }
    /// ```
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            listener: self,
            accepting: None,
            ended: false,
        }
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// The connections a [`ZcListener`] accepts, as a [`Stream`]: see
/// [`ZcListener::incoming`].
pub struct Incoming<'a> {
    listener: &'a ZcListener,
    /// The accept in progress (kept across polls, so that a connection taken from the
    /// kernel's queue is never dropped).
    accepting: Option<Pin<Box<dyn Future<Output = io::Result<ZcConnection>> + Send + 'a>>>,
    ended: bool,
}

impl std::fmt::Debug for Incoming<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", self.listener)
            .field("accepting", &self.accepting.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl Stream for Incoming<'_> {
    type Item = io::Result<ZcConnection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let listener = self.listener;
        let accepting = self.accepting.get_or_insert_with(|| {
            Box::pin(async move {
                let (stream, writer, _peer) = listener.accept().await?;
                Ok(ZcConnection::new(stream, writer)?)
            })
        });
        let accepted = std::task::ready!(accepting.as_mut().poll(cx));
        self.accepting = None;
        if accepted.is_err() && listener.zcrx.check_running().is_err() {
            self.ended = true; // this was the runtime's end: yielded once
        }
        Poll::Ready(Some(accepted))
    }
}
