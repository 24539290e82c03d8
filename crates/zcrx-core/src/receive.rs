//! One stream's receive requests: when to submit, resubmit, cancel and finish.
//!
//! A stream's bytes arrive through multishot `RECV_ZC` requests, one at a time. Most of the
//! time one request runs until EOF, but a request also ends on an error the runtime answers
//! by resubmitting (`ENOSPC`, `ENOMEM`, `EINTR`: [`CqeErrno::recv_action`]), on a byte limit
//! (a *limited* stream asks the kernel for at most what its reader granted, and starts the
//! next request only when the reader asks again), on a cancel, or after data without
//! `IORING_CQE_F_MORE` with no reason given (no kernel up to 7.3 does that; the stream
//! goes on as after a final CQE).
//!
//! [`StreamReceive`] is that decision per stream, without I/O: the runtime feeds it what
//! happened (a completion, a command from the reader, shutdown) and carries out the
//! [`Action`] it returns: queue the SQE, tell the reader, drop the stream's entry. What the
//! runtime keeps for itself: the socket, the buffers, the slot table, and the area-wide
//! bookkeeping behind [`Action::WaitForBuffers`] and [`Action::ResubmitAfterCqDrained`].
//!
//! ```
//! use zcrx_core::completion::CqeErrno;
//! use zcrx_core::receive::{Action, Finish, RequestEnd, StreamReceive};
//!
//! // A stream whose reader grants 8 KiB at a time.
//! let mut stream = StreamReceive::new(Some(8192));
//! assert_eq!(stream.start(), Action::None); // limited: waits for the reader
//! assert_eq!(stream.read_more(), Action::Submit { len: 8192 });
//! assert!(stream.on_data(4096)); // hand it to the reader
//! // Interrupted: ask again, for the rest of the grant only.
//! let eintr = RequestEnd::Error(CqeErrno::new(libc::EINTR));
//! assert_eq!(stream.on_end(eintr), Action::Submit { len: 4096 });
//! assert!(stream.on_data(4096));
//! // The request ends at its limit: the reader is told, and asks for more when it wants.
//! assert_eq!(stream.on_end(RequestEnd::Eof), Action::GrantUsedUp);
//! assert_eq!(stream.read_more(), Action::Submit { len: 8192 });
//! // Now the peer closes.
//! assert_eq!(stream.on_end(RequestEnd::Eof), Action::Finish(Finish::Eof));
//! assert!(stream.is_finished());
//! // The reader drops the stream: no request runs, so the entry goes.
//! assert_eq!(stream.close(), Action::Remove { was_waiting_for_buffers: false });
//! ```

use crate::completion::{CqeErrno, RecvErrorAction};

/// Where a stream's receive request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// None running (a limited stream between requests, or not started).
    Idle,
    /// Running.
    Running,
    /// Cancel submitted, waiting for the final CQE.
    Cancelling,
    /// Ended with `ENOMEM`; resubmit once buffers come back.
    WaitingForBuffers,
    /// Ended with `ENOSPC`; resubmit after the CQ is drained.
    ResubmitAfterCq,
}

/// How a receive request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEnd {
    /// Final CQE with 0: EOF, or the byte limit reached.
    Eof,
    /// Data without `F_MORE`: the request ended after it, with no reason given.
    Unexplained,
    /// Final CQE with an error.
    Error(CqeErrno),
}

/// How a stream ended, for its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The peer closed the connection.
    Eof,
    /// The kernel's error, as it gave it (the reader sees the same `raw_os_error`).
    Error(CqeErrno),
}

/// What the runtime does next for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Nothing.
    None,
    /// Queue a `RECV_ZC` for the stream asking for `len` bytes (0: no limit).
    Submit {
        /// `sqe.len`.
        len: u32,
    },
    /// Queue a cancel of the stream's running receive; its final CQE follows.
    Cancel,
    /// The reader's grant is used up and no request runs: tell the reader, which asks again
    /// ([`StreamReceive::read_more`]) when it wants more.
    GrantUsedUp,
    /// The stream has ended: tell the reader how. The entry stays until the reader closes.
    Finish(Finish),
    /// No request runs and none will: drop the stream's entry and release its slot (telling
    /// the reader, if it has not been told it ended, that the runtime stopped).
    Remove {
        /// The stream was counted as waiting for buffers: it no longer is.
        was_waiting_for_buffers: bool,
    },
    /// The CQ overflowed (`ENOSPC`): resubmit ([`StreamReceive::submit`]) once it has been
    /// drained.
    ResubmitAfterCqDrained,
    /// The area ran out (`ENOMEM`): count the stream as waiting for buffers and resubmit
    /// ([`StreamReceive::submit`]) once buffers come back.
    WaitForBuffers,
}

/// One stream's receive requests; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct StreamReceive {
    /// The reader's grant per request, `None` for no limit.
    limit: Option<u32>,
    /// Bytes received since the reader last asked for more (limited streams): a request
    /// resubmitted after `ENOMEM`, `ENOSPC` or `EINTR` asks only for the rest of the limit.
    granted_used: u64,
    request: Request,
    /// The reader is gone: remove the entry once no request runs.
    closed: bool,
    /// The reader has been told the stream ended.
    finished: bool,
}

impl StreamReceive {
    /// A stream just attached, with no request yet; `limit` is the reader's grant per
    /// request (`None`: one request without a limit).
    #[must_use]
    pub fn new(limit: Option<u32>) -> Self {
        Self {
            limit,
            granted_used: 0,
            request: Request::Idle,
            closed: false,
            finished: false,
        }
    }

    /// The first request of a stream just attached: an unlimited stream starts at once, a
    /// limited one when its reader first asks ([`Self::read_more`]).
    pub fn start(&mut self) -> Action {
        match self.limit {
            None => self.submit(),
            Some(_) => Action::None,
        }
    }

    /// Submits the next request: [`Action::Submit`] with what is left of the grant, or, for
    /// a limited stream whose grant is already used up (a resubmission after its last byte
    /// arrived), [`Action::GrantUsedUp`]: it waits for the reader to ask again.
    pub fn submit(&mut self) -> Action {
        let len = match self.limit {
            None => 0,
            Some(limit) => match u64::from(limit).saturating_sub(self.granted_used) {
                0 => {
                    self.request = Request::Idle;
                    return Action::GrantUsedUp;
                }
                // At most `limit`, a u32.
                left => left as u32,
            },
        };
        self.request = Request::Running;
        Action::Submit { len }
    }

    /// The reader asks for more (a limited stream whose request is done): a fresh grant and
    /// a request, unless one runs already or the stream has ended.
    pub fn read_more(&mut self) -> Action {
        if self.request != Request::Idle || self.finished {
            return Action::None;
        }
        self.granted_used = 0;
        self.submit()
    }

    /// A data completion of `len` bytes. Returns whether it goes to the reader: not once the
    /// stream has ended or its reader is gone (dropping the buffer returns the chunk).
    #[must_use]
    pub fn on_data(&mut self, len: u32) -> bool {
        self.granted_used += u64::from(len);
        !(self.finished || self.closed)
    }

    /// The stream's receive request ended (a final CQE, or data without `F_MORE`). The
    /// runtime delivers the data that came before it first.
    pub fn on_end(&mut self, end: RequestEnd) -> Action {
        let was_cancelling = self.request == Request::Cancelling;
        self.request = Request::Idle;
        if self.closed || was_cancelling {
            return Action::Remove {
                was_waiting_for_buffers: false,
            };
        }
        if self.finished {
            // Ended already (an invalid completion): wait for the reader to let go.
            return Action::None;
        }
        let grant_used_up = self
            .limit
            .is_some_and(|limit| self.granted_used >= u64::from(limit));
        match end {
            RequestEnd::Eof | RequestEnd::Unexplained if grant_used_up => Action::GrantUsedUp,
            RequestEnd::Eof => {
                self.finished = true;
                Action::Finish(Finish::Eof)
            }
            // No reason given (kernels up to 7.3 never do this): go on.
            RequestEnd::Unexplained => self.submit(),
            RequestEnd::Error(errno) => match errno.recv_action() {
                RecvErrorAction::ResubmitAfterCqDrained => {
                    self.request = Request::ResubmitAfterCq;
                    Action::ResubmitAfterCqDrained
                }
                RecvErrorAction::ResubmitAfterRefill => {
                    self.request = Request::WaitingForBuffers;
                    Action::WaitForBuffers
                }
                RecvErrorAction::ResubmitNow => self.submit(),
                RecvErrorAction::Cancelled | RecvErrorAction::Fatal => {
                    self.finished = true;
                    Action::Finish(Finish::Error(errno))
                }
            },
        }
    }

    /// The cancel request's own CQE, with its `res`. `-ENOENT`: the receive was no longer
    /// there to cancel (it ended, and its final CQE was handled or will never come), so a
    /// stream still waiting for that confirmation goes now instead of holding its socket
    /// until shutdown. Anything else: the receive's final CQE follows.
    pub fn on_cancel_done(&mut self, res: i32) -> Action {
        if res == -libc::ENOENT && self.request == Request::Cancelling {
            self.request = Request::Idle;
            return Action::Remove {
                was_waiting_for_buffers: false,
            };
        }
        Action::None
    }

    /// The reader dropped the stream: cancel its request, or remove it if none runs.
    pub fn close(&mut self) -> Action {
        self.closed = true;
        self.cancel_or_remove()
    }

    /// Cancels a running request (the stream goes when its final CQE arrives) or removes a
    /// stream that has none.
    pub fn cancel_or_remove(&mut self) -> Action {
        match self.request {
            Request::Running => {
                self.request = Request::Cancelling;
                Action::Cancel
            }
            Request::Cancelling => Action::None,
            Request::Idle | Request::WaitingForBuffers | Request::ResubmitAfterCq => {
                Action::Remove {
                    was_waiting_for_buffers: self.request == Request::WaitingForBuffers,
                }
            }
        }
    }

    /// Cancels a running request and nothing else: the stream stays until its reader
    /// closes it (an invalid completion ended it).
    pub fn cancel(&mut self) -> Action {
        if self.request == Request::Running {
            self.cancel_or_remove()
        } else {
            Action::None
        }
    }

    /// Marks the stream ended for a reason of the runtime's (shutdown, an invalid completion,
    /// the driver's exit). Returns whether it had not ended yet, i.e. whether the runtime
    /// must tell the reader.
    #[must_use]
    pub fn finish(&mut self) -> bool {
        !std::mem::replace(&mut self.finished, true)
    }

    /// Whether the reader has been told the stream ended.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Where the stream's request is.
    #[must_use]
    pub fn request(&self) -> Request {
        self.request
    }

    /// Whether the kernel holds a request of this stream (running, or cancelled and not yet
    /// confirmed): its socket must stay open until it ends.
    #[must_use]
    pub fn request_is_live(&self) -> bool {
        matches!(self.request, Request::Running | Request::Cancelling)
    }
}

#[cfg(test)]
mod tests;
