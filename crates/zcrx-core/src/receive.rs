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
//! A stream with a [`Budget`] (see [`crate::budget`]) asks each
//! request for at most its room ([`Budget::request_len`]:
//! its room in chunks times the bytes a chunk carried in its last request, or, before that,
//! what the runtime expects one to carry):
//! when a request ends at that limit, the next one is submitted for what room is left, or,
//! once the stream holds its budget's `high`, none: the stream is *paused*
//! ([`Action::Pause`]) until its reader has dropped enough buffers ([`StreamReceive::resume`]):
//! down to the budget's `low`, so that a reader dropping steadily resumes its stream once
//! per half budget, not once per buffer. A reader that has taken everything delivered and
//! waits for more ([`StreamReceive::reader_waiting`]) cannot be relied on to drop that far
//! (a decoder holding part of a message, waiting for the rest): its stream resumes as soon
//! as it holds less than `high` ([`StreamReceive::resume_mark`]), or both would wait forever.
//! The runtime tells it how much the stream holds before each step
//! ([`StreamReceive::set_holding`]); the smaller of a read limit's grant and the budget's
//! room wins.
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
//!
//! A budgeted stream (16 KiB, resuming at 8 KiB, in 4 KiB chunks):
//!
//! ```
//! use zcrx_core::budget::Budget;
//! use zcrx_core::receive::{Action, Holding, RequestEnd, StreamReceive};
//!
//! let holding = |held| {
//!     Some(Holding { budget: Budget::new(16384), held, granule: 4096, fill: 4096 })
//! };
//! let mut stream = StreamReceive::new(None);
//! stream.set_holding(holding(0));
//! assert_eq!(stream.start(), Action::Submit { len: 16384 });
//! for _ in 0..4 {
//!     assert!(stream.on_data(4096));
//! }
//! // The request ends at its limit; the reader still holds 8 KiB of it: ask for the rest.
//! stream.set_holding(holding(8192));
//! assert_eq!(stream.on_end(RequestEnd::Eof), Action::Submit { len: 8192 });
//! assert!(stream.on_data(8192));
//! // It ends again, the reader holds all 16 KiB: pause.
//! stream.set_holding(holding(16384));
//! assert_eq!(stream.on_end(RequestEnd::Eof), Action::Pause);
//! assert!(stream.is_paused());
//! // Dropping one chunk is not enough (12 KiB held); at 8 KiB it goes on.
//! stream.set_holding(holding(12288));
//! assert_eq!(stream.resume(), Action::None);
//! stream.set_holding(holding(8192));
//! assert_eq!(stream.resume(), Action::Submit { len: 8192 });
//!
//! // Paused again at 16 KiB. Its reader drops one chunk and waits for more: it may not
//! // drop another until it gets more, so the stream goes on below `high`, not at `low`.
//! assert!(stream.on_data(8192));
//! stream.set_holding(holding(16384));
//! assert_eq!(stream.on_end(RequestEnd::Eof), Action::Pause);
//! assert_eq!(stream.resume_mark(), Some(8192));
//! stream.set_holding(holding(12288));
//! assert_eq!(stream.reader_waiting(), Action::Submit { len: 4096 });
//! ```

use crate::budget::Budget;
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
    /// None running: the stream holds its budget; resubmit once it is back at its low mark
    /// ([`StreamReceive::resume`]).
    Paused,
}

/// What a budgeted stream holds, as the runtime tells [`StreamReceive`] before a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The stream's budget now (derived budgets change with the number of streams).
    pub budget: Budget,
    /// Bytes the stream holds: delivered and not yet dropped, in whole granules.
    pub held: u64,
    /// The unit memory is handed out in (the area's chunk size): requests ask for whole ones.
    pub granule: u64,
    /// The bytes one granule is expected to carry until the stream's own requests have
    /// shown what its chunks carry (a segment's payload, from the interface's MTU, or the
    /// chunk size): a request asks for its room in granules times this
    /// ([`Budget::request_len`]).
    pub fill: u64,
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
    /// The stream holds its budget: no request runs until it is back at the budget's low
    /// mark; then [`StreamReceive::resume`] submits.
    Pause,
}

/// One stream's receive requests; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct StreamReceive {
    /// The reader's grant per request, `None` for no limit.
    limit: Option<u32>,
    /// Bytes received since the reader last asked for more (limited streams): a request
    /// resubmitted after `ENOMEM`, `ENOSPC` or `EINTR` asks only for the rest of the limit.
    granted_used: u64,
    /// What the runtime last said the stream holds (`None`: no budget).
    holding: Option<Holding>,
    /// The running request's byte limit (0: none), and the bytes it has delivered: a request
    /// that ends at a budget's limit is followed by the next one, not by EOF.
    request_len: u32,
    request_used: u64,
    /// The data completions of the running request (each is a chunk, or the rest of one)
    /// and the length of its last one.
    request_chunks: u64,
    request_last_len: u32,
    /// What the stream's requests showed a chunk to carry: what the next request expects
    /// (see [`Holding::fill`] and [`Self::learn_fill`]).
    observed_fill: Option<u64>,
    request: Request,
    /// A paused stream's reader has taken everything delivered and waits for more
    /// ([`Self::reader_waiting`]): it resumes below `high`, not only at `low`. Cleared by the
    /// next request (a new pause starts without it).
    reader_waiting: bool,
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
            holding: None,
            request_len: 0,
            request_used: 0,
            request_chunks: 0,
            request_last_len: 0,
            observed_fill: None,
            request: Request::Idle,
            reader_waiting: false,
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
    ///
    /// A budgeted stream that holds its budget's `high` pauses instead ([`Action::Pause`]);
    /// otherwise its request asks for at most its room, or what is left of the grant if
    /// that is less.
    pub fn submit(&mut self) -> Action {
        self.reader_waiting = false;
        let grant_left = match self.limit {
            None => None,
            Some(limit) => match u64::from(limit).saturating_sub(self.granted_used) {
                0 => {
                    self.request = Request::Idle;
                    return Action::GrantUsedUp;
                }
                // At most `limit`, a u32.
                left => Some(left as u32),
            },
        };
        let room = match self.holding {
            Some(holding) if holding.budget.exceeded(holding.held) => {
                self.request = Request::Paused;
                return Action::Pause;
            }
            Some(holding) => {
                let fill = self.observed_fill.unwrap_or(holding.fill);
                holding
                    .budget
                    .request_len(holding.held, holding.granule, fill)
            }
            None => None,
        };
        let len = match (grant_left, room) {
            (Some(grant), Some(room)) => grant.min(room),
            (grant, room) => grant.or(room).unwrap_or(0),
        };
        self.request_len = len;
        self.request_used = 0;
        self.request_chunks = 0;
        self.request = Request::Running;
        Action::Submit { len }
    }

    /// Learns from the request that ended what a chunk of this stream carries: the average
    /// of its data completions, leaving out the last one if the request ended at its byte
    /// limit (`truncated`: the kernel cut that segment short). A request whose only data
    /// was cut short says only that chunks carry more: the estimate doubles, or grows to
    /// what that part carried if more (at most a granule). A request without data changes
    /// nothing.
    ///
    /// The average errs high for a stream whose segments vary, so a request may take more
    /// chunks than its room when its segments are smaller than those of the request before;
    /// the next request learns from that.
    fn learn_fill(&mut self, truncated: bool) {
        let (bytes, chunks) = if truncated && self.request_chunks > 0 {
            (
                self.request_used - u64::from(self.request_last_len),
                self.request_chunks - 1,
            )
        } else {
            (self.request_used, self.request_chunks)
        };
        if let Some(fill) = bytes.checked_div(chunks) {
            self.observed_fill = Some(fill.max(1));
        } else if truncated {
            let expected = self
                .observed_fill
                .or(self.holding.map(|holding| holding.fill))
                .unwrap_or(1);
            let cap = self.holding.map_or(u64::MAX, |holding| holding.granule);
            // It carried more than the part delivered, and more than expected.
            let more = expected.saturating_mul(2).max(self.request_used);
            self.observed_fill = Some(more.min(cap).max(1));
        }
    }

    /// Tells the stream what it holds now and its budget (`None`: no budget), before a step.
    pub fn set_holding(&mut self, holding: Option<Holding>) {
        self.holding = holding;
    }

    /// A paused stream's reader has dropped buffers: submit again if it is back at its
    /// resume mark ([`Self::resume_mark`], with what it holds as last told by
    /// [`Self::set_holding`]), else nothing. A stream that ended meanwhile stops being paused
    /// without a request.
    pub fn resume(&mut self) -> Action {
        if self.request != Request::Paused {
            return Action::None;
        }
        if self.finished {
            self.request = Request::Idle;
            return Action::None;
        }
        let may_resume = match (self.holding, self.resume_mark()) {
            (Some(holding), Some(mark)) => holding.held <= mark,
            _ => true,
        };
        if !may_resume {
            return Action::None;
        }
        self.request = Request::Idle;
        self.submit()
    }

    /// The reader of a paused stream has taken every buffer delivered and waits for more.
    /// It may be unable to drop another until it gets more (a decoder holding the first part
    /// of a message smaller than the budget), so until the stream receives again its resume
    /// mark is the budget's `high` less one byte instead of its `low`: resumes now if it
    /// holds less than `high` ([`Self::resume`]), else at the reader's next drop.
    ///
    /// Without this, a stream paused at `high` whose reader drops to between `low` and
    /// `high` and then waits would wait for a drop that never comes, and its reader for
    /// bytes that never come.
    pub fn reader_waiting(&mut self) -> Action {
        if self.request != Request::Paused {
            return Action::None;
        }
        self.reader_waiting = true;
        self.resume()
    }

    /// The most bytes a paused stream may hold and resume: its budget's `low`, or `high` less
    /// one byte while its reader waits ([`Self::reader_waiting`]). `None` without a budget
    /// (or when not paused). The runtime arms its wake-up on the reader's drops with it.
    #[must_use]
    pub fn resume_mark(&self) -> Option<u64> {
        let holding = self.holding.filter(|_| self.request == Request::Paused)?;
        Some(if self.reader_waiting {
            holding.budget.high.saturating_sub(1)
        } else {
            holding.budget.low
        })
    }

    /// Whether the stream is paused by its budget.
    #[must_use]
    pub fn is_paused(&self) -> bool {
        self.request == Request::Paused
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
        self.request_used += u64::from(len);
        self.request_chunks += 1;
        self.request_last_len = len;
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
        // The request's byte limit was reached: a grant's (above) or a budget's, after which
        // the stream goes on (or pauses) rather than ending.
        let limit_reached =
            self.request_len > 0 && self.request_used >= u64::from(self.request_len);
        self.learn_fill(limit_reached);
        match end {
            RequestEnd::Eof | RequestEnd::Unexplained if grant_used_up => Action::GrantUsedUp,
            RequestEnd::Eof | RequestEnd::Unexplained if limit_reached => self.submit(),
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
            Request::Idle
            | Request::WaitingForBuffers
            | Request::ResubmitAfterCq
            | Request::Paused => Action::Remove {
                was_waiting_for_buffers: self.request == Request::WaitingForBuffers,
            },
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
