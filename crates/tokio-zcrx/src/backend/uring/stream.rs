//! The io_uring backend's side of a stream: what the driver thread and the consumer task
//! share ([`StreamShared`]), and the consumer's end ([`UringStream`]).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::{Command, StreamKey, UringHandle};
use crate::backend::wake::wake_contained;
use crate::buf::ZcBuf;

/// Why a stream ended, as the driver reports it: the kernel's own error (its errno intact,
/// as copy mode gives it) or the runtime's reason.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    Eof,
    Error(io::Error),
    /// The receive failed with `EFAULT` because the socket holds net_iovs of another queue
    /// (its flow moved there): the socket, for the group to hand to that queue's driver
    /// (`hand_over_moved`; the stream's data so far has been delivered).
    Moved(Arc<std::net::TcpStream>),
}

impl StreamEnd {
    /// The runtime ended the stream (shutdown, a failed driver, ...).
    pub(crate) fn runtime(message: impl Into<String>) -> StreamEnd {
        StreamEnd::Error(io::Error::new(io::ErrorKind::BrokenPipe, message.into()))
    }
}

/// What the driver and the stream share.
#[derive(Debug, Default)]
pub(crate) struct StreamShared {
    state: Mutex<SharedState>,
}

#[derive(Debug, Default)]
struct SharedState {
    buffers: VecDeque<ZcBuf>,
    end: Option<StreamEnd>,
    waker: Option<Waker>,
    /// In limited mode: a request is running or was asked for.
    request_pending: bool,
    /// The driver paused the stream by its budget (`Driver::pause`) and has not resumed it.
    paused: bool,
    /// The reader was found waiting for more while the stream is paused (it said so with
    /// [`Command::ReaderWaiting`], or was waiting already when the driver paused it): the
    /// driver resumes it below its budget's high mark, not at its low mark
    /// (`zcrx_core::receive::StreamReceive::reader_waiting`). Once per pause.
    reader_waiting: bool,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // A panic while holding this lock cannot leave the queue inconsistent (pushes and
        // pops are single calls), so a poisoned lock is still usable.
        crate::sys::lock(&self.state)
    }

    /// Appends buffers delivered in one reap and wakes the consumer once.
    pub(crate) fn deliver(&self, buffers: &mut Vec<ZcBuf>) {
        let waker = {
            let mut state = self.lock();
            state.buffers.extend(buffers.drain(..));
            state.waker.take()
        };
        if let Some(waker) = waker {
            wake_contained(waker);
        }
    }

    /// Ends the stream (after buffers already delivered).
    pub(crate) fn finish(&self, end: StreamEnd) {
        let waker = {
            let mut state = self.lock();
            if state.end.is_none() {
                state.end = Some(end);
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            wake_contained(waker);
        }
    }

    /// The driver paused the stream by its budget. Returns whether its reader is waiting for
    /// more already: it has taken every buffer delivered and registered its waker since the
    /// last delivery (which takes the waker). Then the driver counts it as waiting at once,
    /// and the reader, whose next poll may never come, is not expected to say so.
    pub(crate) fn pause(&self) -> bool {
        let mut state = self.lock();
        state.paused = true;
        state.reader_waiting = state.buffers.is_empty() && state.waker.is_some();
        state.reader_waiting
    }

    /// The driver resumed the stream (or it ended while paused).
    pub(crate) fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        state.reader_waiting = false;
    }

    /// A limited request ended at its limit: the next one is made on demand.
    pub(crate) fn request_done(&self) {
        let waker = {
            let mut state = self.lock();
            state.request_pending = false;
            state.waker.take()
        };
        if let Some(waker) = waker {
            wake_contained(waker);
        }
    }
}

/// A stream fed by the io_uring driver.
#[derive(Debug)]
pub(crate) struct UringStream {
    shared: Arc<StreamShared>,
    /// Buffers taken from `shared` in one lock, handed out one by one.
    local: VecDeque<ZcBuf>,
    key: StreamKey,
    handle: UringHandle,
    limited: bool,
    done: bool,
    /// The socket of a stream whose flow moved to another queue (see [`StreamEnd::Moved`]),
    /// until [`UringStream::take_moved`] takes it.
    moved: Option<Arc<std::net::TcpStream>>,
}

impl UringStream {
    pub(crate) fn new(
        shared: Arc<StreamShared>,
        key: StreamKey,
        handle: UringHandle,
        limited: bool,
    ) -> UringStream {
        UringStream {
            shared,
            local: VecDeque::new(),
            key,
            handle,
            limited,
            done: false,
            moved: None,
        }
    }

    /// The socket, if this stream ended because its flow moved to another queue: the
    /// `EFAULT` error it yielded last is then not its end, for whoever hands it over.
    pub(crate) fn take_moved(&mut self) -> Option<Arc<std::net::TcpStream>> {
        self.moved.take()
    }
}

impl UringStream {
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<ZcBuf>>> {
        let this = self;
        if let Some(buf) = this.local.pop_front() {
            return Poll::Ready(Some(Ok(buf)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let mut state = this.shared.lock();
        if !state.buffers.is_empty() {
            std::mem::swap(&mut this.local, &mut state.buffers);
            drop(state);
            return Poll::Ready(this.local.pop_front().map(Ok));
        }
        if let Some(end) = state.end.take() {
            this.done = true;
            return Poll::Ready(match end {
                StreamEnd::Eof => None,
                StreamEnd::Error(error) => Some(Err(error)),
                StreamEnd::Moved(socket) => {
                    this.moved = Some(socket);
                    Some(Err(io::Error::from_raw_os_error(libc::EFAULT)))
                }
            });
        }
        let ask_for_more = this.limited && !state.request_pending;
        if ask_for_more {
            state.request_pending = true;
        }
        // Everything delivered is taken and the stream is paused: the driver must know that
        // its reader waits, or a reader holding less than its budget but more than the
        // budget's low mark would wait for bytes that only its own drops would let in.
        let say_waiting = state.paused && !state.reader_waiting;
        if say_waiting {
            state.reader_waiting = true;
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        drop(state);
        let commands = [
            ask_for_more.then_some(Command::ReadMore(this.key)),
            say_waiting.then_some(Command::ReaderWaiting(this.key)),
        ];
        for command in commands.into_iter().flatten() {
            if let Err(e) = this.handle.shared.send(command) {
                this.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
        }
        Poll::Pending
    }
}

impl UringStream {
    /// Moves buffers that have arrived into `out`, up to `max` in all, without waiting.
    pub(crate) fn take_ready(&mut self, out: &mut Vec<ZcBuf>, max: usize) {
        if self.local.is_empty() && out.len() < max {
            let mut state = self.shared.lock();
            std::mem::swap(&mut self.local, &mut state.buffers);
        }
        let take = (max - out.len()).min(self.local.len());
        out.extend(self.local.drain(..take));
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        // Always, also after EOF or an error: the driver's entry holds the socket and the
        // stream's slot until it hears the reader is gone (it cancels a running receive
        // first). An error means the driver is gone and has cleaned up already.
        let _ = self.handle.shared.send(Command::Close(self.key));
    }
}
