//! What the driver asks of the kernel, as one small interface: [`CompletionRing`] (queue
//! requests, submit and wait, reap completions, a few zcrx controls).
//!
//! [`UringRing`] is the real thing: an io_uring with a registered zcrx queue. Keeping the
//! driver behind this trait lets the per-chunk benchmark run the whole runtime path (decode,
//! routing, waking, consuming, dropping, refill publication) against a synthetic completion
//! source at full speed, without a kernel ([`super::synthetic`]).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use zcrx_core::completion::RawCompletion;
use zcrx_core::query::QueryFeatures;
use zcrx_sys::ctrl::{zcrx_add_area, zcrx_arm_event, zcrx_flush_rq};
use zcrx_sys::ring::IORING_SEND_ZC_REPORT_USAGE;
use zcrx_sys::zcrx::io_uring_zcrx_area_reg;

use crate::sys::fork::RingForkGuard;
use crate::sys::registration::Ring;

/// What the kernel behind a driver can do beyond 6.15's RECV_ZC, detected once at
/// registration (the synthetic kernels state theirs). The driver never calls what is absent:
/// an optional call that fails must not end it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// `IORING_REGISTER_ZCRX_CTRL` exists (6.19+), so `flush_refill` works. Before it the
    /// kernel consumes the refill ring only when the page pool refills (NIC mode).
    pub(crate) ctrl: bool,
    /// Events and the shared copy statistics were registered (7.2+, if asked for).
    pub(crate) events: bool,
    /// Closing the ring stops the rx queue before it takes back user-held chunks (6.19+).
    /// On 6.15-6.18 NIC queues the chunks go back to the live page pool first, where the NIC
    /// may write into memory a `ZcBuf` still reads: such a ring must outlive every buffer.
    pub(crate) teardown_stops_queue_first: bool,
    /// `ZCRX_CTRL_ADD_AREA` exists (7.3+): areas can be added to the instance.
    pub(crate) add_area: bool,
}

impl Capabilities {
    /// What the driver may use on a kernel whose zcrx query answered `queried` (`None`:
    /// there is no query, before 6.19), with events registered or not. The one rule for the
    /// real kernel (`instance::register`) and the synthetic ones (`Personality`).
    pub(crate) fn detected(queried: Option<&QueryFeatures>, events: bool) -> Capabilities {
        Capabilities {
            ctrl: queried.is_some_and(|features| features.ctrl_flush_rq),
            events,
            // 6.19 changed the teardown order; the query arrived in the same release.
            teardown_stops_queue_first: queried.is_some(),
            add_area: queried.is_some_and(|features| features.ctrl_add_area),
        }
    }
}

/// How a send request reads its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendKind {
    /// `IORING_OP_SENDMSG_ZC` from the registered buffer of this index (every range inside
    /// it; vectored registered buffers arrived in 6.15, with zcrx).
    ZeroCopyFixed(u16),
    /// `IORING_OP_SENDMSG_ZC` from unregistered memory (pinned per send).
    ZeroCopy,
    /// `IORING_OP_SENDMSG`: the kernel copies at once.
    Plain,
}

/// The ranges one send request sends, as the kernel reads them: a `msghdr` and its
/// `iovec`s. Boxed by its owner so the addresses the SQE carries stay put until the
/// request's last CQE, however the owner moves.
///
/// Vectored because the kernel takes the socket lock, builds segments and pushes them
/// once per request: one request per received chunk (4 KiB) cost the proxy a
/// `lock_sock` per chunk, and in the guest most of its CPU went to spinning on that lock
/// against the softirq processing the same socket's ACKs.
pub(crate) struct SendMessage {
    header: libc::msghdr,
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers are the message's own `iov` (heap, owned) and, in the `iovec`s,
// ranges of pieces that the request's owner holds; nothing in it is tied to a thread.
unsafe impl Send for SendMessage {}

impl SendMessage {
    pub(crate) fn new() -> Box<SendMessage> {
        Box::new(SendMessage {
            // SAFETY: all-zero is a valid msghdr (no address, no iovecs, no control data);
            // zeroed rather than a literal because musl's has private padding fields.
            header: unsafe { std::mem::zeroed() },
            iov: Vec::new(),
        })
    }

    /// Adds `ptr..ptr + len` (which the owner keeps readable and unchanged until the
    /// request's last CQE).
    pub(crate) fn push(&mut self, ptr: *const u8, len: usize) {
        self.iov.push(libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        });
        self.header.msg_iov = self.iov.as_mut_ptr();
        self.header.msg_iovlen = self.iov.len() as _;
    }

    pub(crate) fn ranges(&self) -> usize {
        self.iov.len()
    }

    /// The ranges, in order (for the synthetic kernel, which sends them).
    #[cfg(any(test, feature = "bench-internals"))]
    pub(crate) fn segments(&self) -> impl Iterator<Item = (*const u8, usize)> + '_ {
        self.iov
            .iter()
            .map(|iov| (iov.iov_base.cast_const().cast::<u8>(), iov.iov_len))
    }

    fn header(&self) -> *const libc::msghdr {
        &self.header
    }
}

impl std::fmt::Debug for SendMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendMessage")
            .field("ranges", &self.iov.len())
            .finish()
    }
}

/// One send request (see `driver/sends.rs`).
#[derive(Debug)]
pub(crate) struct SendSqe {
    pub(crate) fd: RawFd,
    /// The request's ranges; the message and the memory it names stay unchanged until the
    /// request's last CQE.
    pub(crate) message: *const SendMessage,
    /// The bytes of its ranges, in all. The kernel takes them from the message; the
    /// synthetic kernel checks the two agree and cuts sends short by it.
    #[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
    pub(crate) len: u32,
    pub(crate) kind: SendKind,
    /// `IOSQE_IO_LINK`: the next request runs after this one, and is cancelled if this one
    /// fails or comes short.
    pub(crate) link: bool,
    pub(crate) user_data: u64,
}

pub(crate) trait CompletionRing: Send + 'static {
    /// Queues sends, in order (`MSG_WAITALL`; zero-copy ones with
    /// `IORING_SEND_ZC_REPORT_USAGE`); a chain linked with [`SendSqe::link`] is submitted
    /// whole.
    fn send_chain(&mut self, sqes: &[SendSqe]) -> io::Result<()>;
    /// Queues a multishot zero-copy receive on `fd` (`len` 0: no limit).
    fn recv(&mut self, fd: RawFd, len: u32, user_data: u64) -> io::Result<()>;
    /// Queues the cancellation of the request tagged `target`.
    fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()>;
    /// Queues a multishot poll for readability of `fd` (the driver's eventfd).
    fn poll_readable(&mut self, fd: RawFd, user_data: u64) -> io::Result<()>;
    /// Makes the kernel consume the refill ring now (`ZCRX_CTRL_FLUSH_RQ`).
    fn flush_refill(&mut self) -> io::Result<()>;
    /// Re-arms zcrx event type `event_type`.
    fn arm_event(&mut self, event_type: u32) -> io::Result<()>;
    /// Adds the area `area` describes to the instance (`ZCRX_CTRL_ADD_AREA`); the kernel
    /// writes its token into `area.rq_area_token`.
    ///
    /// # Safety
    ///
    /// `area.addr..area.addr + area.len` is memory that stays mapped until the kernel is
    /// done with it (the ring is closed) and that nothing reads as unchanging: the kernel
    /// writes into it from now on.
    unsafe fn add_area(&mut self, area: &mut io_uring_zcrx_area_reg) -> io::Result<()>;
    /// Submits what is queued and runs the kernel's deferred work (GETEVENTS: under
    /// DEFER_TASKRUN nothing completes without it), then waits for at least one completion
    /// or until `timeout`; `Some(Duration::ZERO)` does not wait.
    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Appends every available completion to `out`.
    fn reap(&mut self, out: &mut Vec<RawCompletion>);
}

/// The SQE of one send.
fn send_entry(sqe: &SendSqe) -> squeue::Entry {
    let fd = types::Fd(sqe.fd);
    // SAFETY: the caller keeps the message alive and unchanged until the request's last CQE
    // (`SendSqe::message`), so it is alive now.
    let msg = unsafe { &*sqe.message }.header();
    let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
    let entry = match sqe.kind {
        SendKind::Plain => opcode::SendMsg::new(fd, msg).flags(flags).build(),
        SendKind::ZeroCopy | SendKind::ZeroCopyFixed(_) => {
            let buf_index = match sqe.kind {
                SendKind::ZeroCopyFixed(index) => Some(index),
                _ => None,
            };
            opcode::SendMsgZc::new(fd, msg)
                .buf_index(buf_index)
                .flags(flags)
                .ioprio(IORING_SEND_ZC_REPORT_USAGE)
                .build()
        }
    };
    let entry = if sqe.link {
        entry.flags(squeue::Flags::IO_LINK)
    } else {
        entry
    };
    entry.user_data(sqe.user_data)
}

/// The io_uring with the registered zcrx queue.
pub(crate) struct UringRing {
    /// Before `ring`: leaves the fork handler's table before the descriptor is closed.
    _fork_guard: RingForkGuard,
    pub(crate) ring: Ring,
    pub(crate) zcrx_id: u32,
    /// SQEs that found the submission queue full, queued in order for the next enter: the
    /// driver never blocks or fails because it made more requests in one turn than the SQ
    /// holds (hundreds of streams attached at once). Each with whether it links to the next
    /// (`IOSQE_IO_LINK`): a linked chain goes into the SQ whole, never split across two
    /// submissions (the kernel would run the two parts independently).
    backlog: VecDeque<(squeue::Entry, bool)>,
}

impl UringRing {
    pub(crate) fn new(ring: Ring, fork_guard: RingForkGuard, zcrx_id: u32) -> UringRing {
        UringRing {
            _fork_guard: fork_guard,
            ring,
            zcrx_id,
            backlog: VecDeque::new(),
        }
    }

    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        if self.backlog.is_empty() {
            // SAFETY: every SQE the driver builds refers to fds it keeps open until the
            // request's final CQE (stream sockets, the eventfd), and sends to memory held
            // unchanged until then (`driver/sends.rs`: each request holds its message and
            // its pieces).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
        }
        self.backlog.push_back((sqe.clone(), false));
        Ok(())
    }

    /// Moves backlogged SQEs into the submission queue as far as it has room, whole chains
    /// at a time.
    fn drain_backlog(&mut self) {
        let mut sq = self.ring.submission();
        while !self.backlog.is_empty() {
            let chain = self
                .backlog
                .iter()
                .position(|(_, links)| !links)
                .map_or(self.backlog.len(), |last| last + 1);
            if sq.capacity() - sq.len() < chain {
                break;
            }
            for (sqe, _) in self.backlog.drain(..chain) {
                // SAFETY: as in `push`; the room was checked above.
                let pushed = unsafe { sq.push(&sqe) };
                debug_assert!(pushed.is_ok());
            }
        }
    }
}

impl CompletionRing for UringRing {
    fn send_chain(&mut self, sqes: &[SendSqe]) -> io::Result<()> {
        let entries: Vec<(squeue::Entry, bool)> =
            sqes.iter().map(|sqe| (send_entry(sqe), sqe.link)).collect();
        if self.backlog.is_empty() {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= entries.len() {
                for (entry, _) in &entries {
                    // SAFETY: as in `push`; the room was checked above.
                    let pushed = unsafe { sq.push(entry) };
                    debug_assert!(pushed.is_ok());
                }
                return Ok(());
            }
        }
        self.backlog.extend(entries);
        Ok(())
    }

    fn recv(&mut self, fd: RawFd, len: u32, user_data: u64) -> io::Result<()> {
        let sqe = opcode::RecvZc::new(types::Fd(fd), len)
            .ifq(self.zcrx_id)
            .build()
            .user_data(user_data);
        self.push(&sqe)
    }

    fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let sqe = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push(&sqe)
    }

    fn poll_readable(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push(&sqe)
    }

    fn flush_refill(&mut self) -> io::Result<()> {
        zcrx_flush_rq(self.ring.as_fd(), self.zcrx_id)
    }

    fn arm_event(&mut self, event_type: u32) -> io::Result<()> {
        zcrx_arm_event(self.ring.as_fd(), self.zcrx_id, event_type)
    }

    unsafe fn add_area(&mut self, area: &mut io_uring_zcrx_area_reg) -> io::Result<()> {
        // SAFETY: as this function's contract.
        unsafe { zcrx_add_area(self.ring.as_fd(), self.zcrx_id, area) }
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.drain_backlog();
        // With SQEs still backlogged, submit without waiting: the next turn queues the rest.
        let timeout = if self.backlog.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let result = match timeout {
            Some(wait) => {
                let ts = types::Timespec::new()
                    .sec(wait.as_secs())
                    .nsec(wait.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                // GETEVENTS with a timeout, even a zero one: the kernel runs deferred work
                // and posts completions before it returns ETIME.
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            other => other.map(drop),
        }
    }

    fn reap(&mut self, out: &mut Vec<RawCompletion>) {
        for cqe in self.ring.completion() {
            out.push(RawCompletion {
                user_data: cqe.user_data(),
                res: cqe.result(),
                flags: cqe.flags(),
                big_cqe: *cqe.big_cqe(),
            });
        }
    }
}
