//! What the driver asks of the kernel, as one small interface.
//!
//! [`UringKernel`] is the real thing: an io_uring with a registered zcrx queue. Keeping the
//! driver behind this trait lets the per-chunk benchmark run the whole runtime path (decode,
//! routing, waking, consuming, dropping, refill publication) against a synthetic completion
//! source at full speed, without a kernel ([`super::synthetic`]).

use std::io;
use std::os::fd::{AsFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use zcrx_core::completion::RawCompletion;
use zcrx_sys::ctrl::{zcrx_arm_event, zcrx_flush_rq};

use super::instance::Ring;

pub(crate) trait Kernel {
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
    /// Submits what is queued without waiting.
    fn submit(&mut self) -> io::Result<()>;
    /// Submits and waits for at least one completion, or until `timeout`.
    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Appends every available completion to `out`.
    fn reap(&mut self, out: &mut Vec<RawCompletion>);
}

/// The io_uring with the registered zcrx queue.
pub(crate) struct UringKernel {
    pub(crate) ring: Ring,
    pub(crate) zcrx_id: u32,
}

impl UringKernel {
    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every SQE the driver builds refers to fds it keeps open until the
            // request's final CQE (stream sockets, the eventfd) and to no user memory.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }
}

impl Kernel for UringKernel {
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

    fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match timeout {
            Some(wait) => {
                let ts = types::Timespec::new()
                    .sec(wait.as_secs())
                    .nsec(wait.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
                    other => other.map(drop),
                }
            }
            None => self.ring.submit_and_wait(1).map(drop),
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
