//! The backends: what receives for a [`Zcrx`](crate::Zcrx), and every `match` over them.
//!
//! # The contract
//!
//! A backend turns connected TCP sockets into streams of [`ZcBuf`]s and owns whatever the
//! bytes live in. Each one promises:
//!
//! - **Attach**: [`Backend::attach`] takes a connected, claimed socket and gives back the
//!   stream's source and a write half; the socket's reads belong to the backend from then on.
//! - **Order and ends**: a source yields buffers in the order of the byte stream, then either
//!   `None` (EOF) or one `Err` carrying the kernel's errno (`ECONNRESET`, ...) or the
//!   runtime's reason, then `None` forever.
//! - **Buffers**: a [`ZcBuf`] stays valid while held, on any thread, after the stream, the
//!   runtime and the backend are gone; its drop gives the memory back exactly once, through
//!   the owner seam in [`crate::buf`] (buffers know no backend).
//! - **Shutdown**: [`Backend::shutdown`] ends every stream with an error, wakes every waiter,
//!   and completes when the backend has stopped; later calls fail with `RuntimeGone`.
//! - **Observability**: [`Backend::stats`] and [`Backend::subscribe`] report the same
//!   [`Stats`] and [`Event`]s in every backend, with the fields a backend has no use for at 0.
//!
//! Backends: [`uring`] (nic and nodev modes: a driver thread owns an io_uring with a zcrx
//! queue) and [`copy`] (copy mode: Tokio's reactor and a buffer pool). [`queues`] joins
//! several [`uring`] drivers (one per NIC queue) and a [`copy`] runtime for connections on
//! queues not bound, dispatching each connection by its NAPI id. [`select`] starts one for a
//! builder's mode.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::buf::ZcBuf;
use crate::config::StreamOptions;
use crate::error::Result;
use crate::event::QueueStats;
use crate::event::{Event, Stats};
use crate::writer::ZcWriteHalf;
use copy::{CopyRuntime, CopyStream};
use queues::QueueGroup;
use uring::{UringHandle, UringStream};

pub(crate) mod copy;
#[cfg(test)]
mod queue_tests;
pub(crate) mod queues;
pub(crate) mod select;
pub(crate) mod uring;
pub(crate) mod wake;

#[derive(Clone)]
pub(crate) enum Backend {
    Uring(UringHandle),
    Copy(Arc<CopyRuntime>),
    Queues(Arc<QueueGroup>),
}

impl Backend {
    /// Cancelled when the backend stops by itself (a failed driver); copy mode never does.
    pub(crate) fn stopped_token(&self) -> CancellationToken {
        match self {
            Backend::Uring(handle) => handle.stopped_token(),
            Backend::Copy(_) => CancellationToken::new(),
            Backend::Queues(group) => group.stopped_token(),
        }
    }

    /// `RuntimeGone` once the backend has shut down (or its driver failed).
    pub(crate) fn check_running(&self) -> Result<()> {
        match self {
            Backend::Uring(handle) => handle.check_running(),
            Backend::Copy(copy) => copy.check_running(),
            Backend::Queues(group) => group.check_running(),
        }
    }

    /// Takes over a connected, claimed socket: the source of its stream and its write half.
    pub(crate) fn attach(
        &self,
        socket: TcpStream,
        options: StreamOptions,
    ) -> io::Result<(StreamSource, ZcWriteHalf)> {
        match self {
            Backend::Uring(handle) => {
                let (stream, writer) = handle.attach(socket, options)?;
                Ok((StreamSource::Uring(stream, None), writer))
            }
            Backend::Copy(copy) => {
                let (stream, writer) = copy.attach(socket, options);
                Ok((StreamSource::Copy(stream), writer))
            }
            Backend::Queues(group) => group.attach(socket, options),
        }
    }

    /// [`Backend::attach`], waiting (bounded) where the backend needs to know more of the
    /// socket first (several queues: its NAPI id).
    pub(crate) async fn attach_async(
        &self,
        socket: TcpStream,
        options: StreamOptions,
    ) -> io::Result<(StreamSource, ZcWriteHalf)> {
        match self {
            Backend::Queues(group) => group.attach_async(socket, options).await,
            other => other.attach(socket, options),
        }
    }

    /// Prepares a listener whose connections will be attached (see
    /// `Zcrx::prepare_listener`).
    pub(crate) fn prepare_listener(&self, listener: BorrowedFd<'_>) -> io::Result<()> {
        match self {
            Backend::Uring(handle) => handle.prepare_listener(listener),
            Backend::Copy(_) => Ok(()),
            Backend::Queues(group) => group.prepare_listener(listener),
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        match self {
            Backend::Uring(handle) => handle.subscribe(),
            Backend::Copy(copy) => copy.subscribe(),
            Backend::Queues(group) => group.subscribe(),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        match self {
            Backend::Uring(handle) => handle.stats(),
            Backend::Copy(copy) => copy.stats(),
            Backend::Queues(group) => group.stats(),
        }
    }

    /// Each bound NIC queue's statistics (none in nodev and copy modes).
    pub(crate) fn queue_stats(&self) -> Vec<QueueStats> {
        match self {
            Backend::Uring(handle) => handle.queue_stats().into_iter().collect(),
            Backend::Copy(_) => Vec::new(),
            Backend::Queues(group) => group.queue_stats(),
        }
    }

    pub(crate) fn description(&self) -> String {
        match self {
            Backend::Uring(handle) => handle.description(),
            Backend::Copy(copy) => copy.description(),
            Backend::Queues(group) => group.description(),
        }
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject_driver_panic(&self) {
        match self {
            Backend::Uring(handle) => handle.inject_panic(),
            Backend::Queues(group) => group.inject_driver_panic(),
            Backend::Copy(_) => {}
        }
    }

    pub(crate) async fn shutdown(&self) {
        match self {
            Backend::Uring(handle) => handle.shutdown().await,
            Backend::Copy(copy) => copy.shut_down(),
            Backend::Queues(group) => group.shutdown().await,
        }
    }
}

/// Where a stream's buffers come from.
#[derive(Debug)]
pub(crate) enum StreamSource {
    /// An io_uring driver's stream; with several queues, what it takes to hand the stream
    /// to another queue's driver if its flow moves ([`queues::HandOver`]).
    Uring(UringStream, Option<Box<queues::HandOver>>),
    Copy(CopyStream),
}

impl StreamSource {
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        match self {
            StreamSource::Uring(stream, None) => stream.poll_next(cx),
            StreamSource::Uring(stream, Some(hand_over)) => loop {
                let next = stream.poll_next(cx);
                match &next {
                    Poll::Ready(Some(Ok(_))) => hand_over.received(),
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(socket) = stream.take_moved() {
                            // Its flow moved to another queue: the data so far has been
                            // delivered; that queue's driver goes on from there.
                            match hand_over.hand_over(socket) {
                                Ok(next_stream) => {
                                    *stream = next_stream;
                                    continue;
                                }
                                Err(error) => return Poll::Ready(Some(Err(error))),
                            }
                        }
                    }
                    _ => {}
                }
                return next;
            },
            StreamSource::Copy(stream) => stream.poll_next(cx),
        }
    }

    /// Whether this is a copy-mode source, which reads through a Tokio read half.
    pub(crate) fn is_copy(&self) -> bool {
        matches!(self, StreamSource::Copy(_))
    }

    /// A copy-mode source's Tokio read half (the socket goes back to its owner); the source
    /// itself in the io_uring modes, whose driver owns the receive.
    pub(crate) fn into_copy_read_half(self) -> Result<OwnedReadHalf, StreamSource> {
        match self {
            StreamSource::Copy(stream) => Ok(stream.into_read_half()),
            uring @ StreamSource::Uring(..) => Err(uring),
        }
    }

    /// Waits for data, then appends what has arrived to `out`, at least one buffer and up to
    /// `max` in `out` in all (`out.len() < max` on entry): `Some(Ok(()))` with buffers
    /// appended, `None` at the end of the stream. In the io_uring modes the first buffer
    /// and those already delivered after it; in copy mode one read, which fills several
    /// buffers for a bulk stream.
    pub(crate) fn poll_next_into(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<ZcBuf>,
        max: usize,
    ) -> Poll<Option<io::Result<()>>> {
        match self {
            StreamSource::Copy(stream) => {
                stream.poll_next_into(cx, out, max.saturating_sub(out.len()))
            }
            StreamSource::Uring(..) => match std::task::ready!(self.poll_next(cx)) {
                Some(Ok(first)) => {
                    out.push(first);
                    if let StreamSource::Uring(stream, _) = self {
                        stream.take_ready(out, max);
                    }
                    Poll::Ready(Some(Ok(())))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(e))),
                None => Poll::Ready(None),
            },
        }
    }
}
