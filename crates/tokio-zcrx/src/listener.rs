//! [`ZcListener`]: a TCP listener whose connections are received through a runtime.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, ToSocketAddrs};

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
