//! [`SyntheticRing`]: the kernel's side of the ring, played in user space.
//!
//! Every active receive gets data completions for free chunks of a real area, filled with
//! the stream's byte pattern ([`super::pattern`]); chunks come back through the real refill
//! ring, which it parses like `io_uring/zcrx.c` does (area index from the token, chunk index
//! in range, one user reference per data CQE: a return for a chunk with none is skipped and
//! counted). When it consumes the ring, what it answers to control calls, which events it
//! posts and how it tears down follow its [`Personality`]. When nothing can be delivered it
//! sleeps on the driver's eventfd like `io_uring_enter` would; while zero-copy receives wait
//! for chunks it looks again with a back-off, as a NIC does when the next packet arrives.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zcrx_core::completion::RawCompletion;
use zcrx_core::user_data::{StreamId, UserData};
use zcrx_sys::event::zcrx_stats;
use zcrx_sys::ring::{IORING_CQE_F_MORE, IORING_CQE_F_NOTIF, IORING_NOTIF_USAGE_ZC_COPIED};
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_rqe, IORING_ZCRX_AREA_MASK, IORING_ZCRX_AREA_SHIFT,
};

use super::super::ring::{CompletionRing, SendKind, SendSqe};

/// A send request as this kernel keeps it: its ranges copied out of the `msghdr` at
/// submission (as `io_sendmsg_zc`'s prep imports the iovecs), read at answer time.
struct QueuedSend {
    fd: RawFd,
    segments: Vec<(*const u8, usize)>,
    len: u32,
    kind: SendKind,
    link: bool,
    user_data: u64,
}
use super::faults::{FaultInjector, Injected, Malformed, Rng, SendFault};
use super::pattern;
use super::personality::{Personality, Registration};

/// Data completions posted per reap, like a NIC's NAPI budget.
const COMPLETIONS_PER_REAP: usize = 64;

/// How long a zero-copy receive without chunks waits before the "NIC" looks at the refill
/// ring again, doubling up to the maximum (a retransmission's back-off, roughly).
const CHUNK_WAIT_MIN: Duration = Duration::from_millis(1);
const CHUNK_WAIT_MAX: Duration = Duration::from_millis(16);

/// `zcrx_event_type` indices.
const ALLOC_FAIL: usize = 0;
const COPY: usize = 1;

/// How a stream's bytes reach the area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// DMA into page-pool chunks (NIC mode, steered traffic): without a free chunk the
    /// NIC drops and the receive waits.
    ZeroCopy,
    /// The kernel copies into a free chunk (loopback, other queues, NODEV): without one
    /// the request ends with `-ENOMEM`.
    Copy,
}

/// The lengths of the data completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lengths {
    /// Whole chunks.
    Full,
    /// 1 to chunk-size bytes, from the kernel's PRNG.
    Varied,
    /// Segments of this many bytes, a chunk each (a NIC without receive offloads that merge
    /// segments: an MTU of 1,500 carries 1,448 bytes with TCP timestamps).
    Segments(u32),
}

/// What one connection receives.
#[derive(Debug, Clone)]
pub(crate) struct StreamPlan {
    /// The pattern's seed: the bytes are `pattern::fill(seed, position, ..)`.
    pub(crate) seed: u64,
    /// The stream position of the end (bytes before it, counting from 0).
    pub(crate) bytes: u64,
    /// Where in the stream this ring starts (a connection handed over from another queue's
    /// ring continues there); 0 for a new one.
    pub(crate) start: u64,
    pub(crate) path: Path,
    pub(crate) lengths: Lengths,
    /// The final CQE after the data: 0 (EOF) or a negative errno (e.g. `-ECONNRESET`).
    pub(crate) end: i32,
    /// Answer `-ENOSPC` (CQ overflow) once when the stream has received this many bytes.
    pub(crate) cq_overflow_at: Option<u64>,
}

impl StreamPlan {
    /// `bytes` of stream `seed`, whole chunks, zero-copy, then EOF.
    pub(crate) fn new(seed: u64, bytes: u64) -> StreamPlan {
        StreamPlan {
            seed,
            bytes,
            start: 0,
            path: Path::ZeroCopy,
            lengths: Lengths::Full,
            end: 0,
            cq_overflow_at: None,
        }
    }
}

/// What the kernel reports about itself, published after every enter and at teardown.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KernelReport {
    /// Chunks in all areas.
    pub(crate) chunks: u32,
    /// Areas: the first, and each `ZCRX_CTRL_ADD_AREA` added (7.3).
    pub(crate) areas: u32,
    /// `ZCRX_CTRL_ADD_AREA` calls refused.
    pub(crate) add_area_refused: u64,
    pub(crate) free: u32,
    /// `submit_and_wait` calls: an idle driver makes few.
    pub(crate) enters: u64,
    /// Chunks with at least one user reference (delivered, not yet returned).
    pub(crate) lent: u32,
    pub(crate) data_cqes: u64,
    /// Refill entries naming a chunk the user held no reference to (a second return).
    pub(crate) double_returns: u64,
    /// Refill entries skipped as out of range (foreign area index, chunk past the end).
    pub(crate) skipped_returns: u64,
    pub(crate) flushes: u64,
    pub(crate) flushes_refused: u64,
    pub(crate) arms: u64,
    pub(crate) arms_refused: u64,
    pub(crate) enomem_answers: u64,
    pub(crate) enospc_answers: u64,
    /// Events posted, by type index (ALLOC_FAIL, COPY).
    pub(crate) events: [u64; 2],
    pub(crate) copy_count: u64,
    pub(crate) copy_bytes: u64,
    /// Chunks still lent when the ring went away on a kernel that hands them back to the
    /// live page pool first (6.15-6.18 NIC): the NIC may write into them, and does here.
    pub(crate) scribbled_at_teardown: u32,
    pub(crate) injected: Injected,
    /// Send requests answered, by how: zero-copy from the fixed buffer, zero-copy
    /// unregistered, plain.
    pub(crate) sends_fixed: u64,
    pub(crate) sends_unregistered: u64,
    pub(crate) sends_plain: u64,
    /// Bytes written to sockets by sends.
    pub(crate) send_bytes: u64,
    /// Free chunks the "NIC" overwrote with 0xEE before reading a zero-copy send's bytes
    /// (returned chunks are free once consumed: a send reading one would read these).
    pub(crate) scribbled_for_sends: u64,
    /// The ring is gone (the kernel was dropped): this is the final report.
    pub(crate) torn_down: bool,
    /// CPU time of the driver thread spent polling for returned chunks with nothing to
    /// deliver ([`KernelSetup::full_speed_nic`] only): a real NIC's driver would sleep
    /// instead, so the benchmark can take it out of the runtime's cost.
    pub(crate) idle_poll_cpu: Duration,
}

/// What a test shares with a synthetic kernel: plans for connections to come, and the
/// kernel's report.
#[derive(Debug, Default)]
pub(crate) struct Control {
    plans: Mutex<HashMap<RawFd, StreamPlan>>,
    report: Mutex<KernelReport>,
    /// While set, zero-copy sends get their results but no notifications (the "NIC" is
    /// still reading them): their buffers stay held.
    pub(crate) hold_notifications: std::sync::atomic::AtomicBool,
}

impl Control {
    /// The plan for the next connection attached with socket `fd` (set before attaching).
    pub(crate) fn plan(&self, fd: RawFd, plan: StreamPlan) {
        super::super::lock(&self.plans).insert(fd, plan);
    }

    pub(crate) fn report(&self) -> KernelReport {
        *super::super::lock(&self.report)
    }
}

struct Receive {
    user_data: u64,
    /// Index of the connection's state in `SyntheticRing::states`.
    state: usize,
    /// `sqe->len`: 0 for no limit.
    limit: u32,
    received: u64,
}

struct StreamState {
    stream: StreamId,
    plan: StreamPlan,
    position: u64,
    cq_overflowed: bool,
}

/// The refill ring as the kernel sees it.
struct RefillView {
    head: *const AtomicU32,
    tail: *const AtomicU32,
    rqes: *const io_uring_zcrx_rqe,
    mask: u32,
}

/// Where the synthetic kernel finds the memory it shares with the driver.
pub(crate) struct SharedMemory {
    pub(crate) area: *mut u8,
    pub(crate) area_len: usize,
    pub(crate) head: *const AtomicU32,
    pub(crate) tail: *const AtomicU32,
    pub(crate) rqes: *const io_uring_zcrx_rqe,
    pub(crate) rq_entries: u32,
    pub(crate) stats: Option<*mut zcrx_stats>,
}

/// One area of the instance, as the kernel sees it.
struct KernelArea {
    base: *mut u8,
    len: usize,
    /// The index of its first chunk in `SyntheticRing::user_refs` (areas' chunks in order).
    first_chunk: u32,
}

/// `ZCRX_MAX_AREAS` in io_uring/zcrx.c (7.3).
const MAX_AREAS: usize = 1024;

/// How a synthetic kernel behaves, beyond its personality.
pub(crate) struct KernelSetup {
    pub(crate) personality: Personality,
    pub(crate) registration: Registration,
    pub(crate) chunk_size: u32,
    /// The plan of connections without one: `chunks_per_stream` whole chunks, seeded with
    /// the socket's fd.
    pub(crate) chunks_per_stream: u64,
    pub(crate) default_path: Path,
    /// Write the byte pattern into every chunk (off for the benchmark: it measures the
    /// runtime, not memset).
    pub(crate) write_pattern: bool,
    /// NIC mode, for the benchmark (it measures the runtime, not waits for a NIC): the page
    /// pool takes refill entries at every enter, as under steady traffic, and while
    /// zero-copy receives wait for chunks the kernel polls the refill ring (yielding)
    /// instead of sleeping, as an infinitely fast NIC would notice returns at once. This
    /// spins while the consumers hold every chunk, as the old synthetic kernel did; the
    /// tests never use it.
    pub(crate) full_speed_nic: bool,
    /// `SEND_ZC` fails with `-EOPNOTSUPP` (a socket without `SOCK_SUPPORT_ZC`), after its
    /// notification was allocated: `F_MORE` and a notification, as `io_sendrecv_fail` does.
    pub(crate) refuse_send_zc: bool,
    pub(crate) faults: Option<FaultInjector>,
}

pub(crate) struct SyntheticRing {
    setup: KernelSetup,
    memory: SharedMemory,
    refill: RefillView,
    /// Every area, by id (the first one: the registered area in `memory`).
    areas: Vec<KernelArea>,
    /// Free chunks, as the offsets a CQE carries (area token | offset in the area).
    free: Vec<u64>,
    /// User references per chunk, all areas' chunks in order (`KernelArea::first_chunk`).
    user_refs: Vec<u32>,
    receives: Vec<Receive>,
    /// Round-robin position over `receives`.
    next: usize,
    /// Completions that are not data (ends, cancels, events), posted at the next reap.
    pending: Vec<RawCompletion>,
    eventfd: Option<(RawFd, u64)>,
    eventfd_ready: bool,
    /// Per connection: where it is in its plan (it survives resubmissions).
    states: Vec<StreamState>,
    /// The state of the connection currently on each descriptor.
    by_fd: HashMap<RawFd, usize>,
    /// Armed event types; `None` without registered events.
    armed: Option<[bool; 2]>,
    lengths: Rng,
    control: Arc<Control>,
    report: KernelReport,
    /// Send SQEs not answered yet, in submission order.
    sends: VecDeque<QueuedSend>,
    /// A linked send failed or came short: the rest of its chain is cancelled.
    cancelling_chain: bool,
    /// Zero-copy sends answered in an earlier reap, waiting for their notification (this
    /// reap), and those answered in this one (the next).
    notifs_due: Vec<PendingNotif>,
    notifs_next: Vec<PendingNotif>,
    /// What sends put on the wire, in order: a zero-copy send's bytes are read from user
    /// memory only at its notification, when the "NIC" is done (as a real one reads them
    /// until then).
    wire: VecDeque<WireEntry>,
}

struct PendingNotif {
    user_data: u64,
    /// `WireEntry::id` of its bytes (none if it sent nothing).
    wire: Option<u64>,
    copied: bool,
}

struct WireEntry {
    id: u64,
    fd: RawFd,
    segments: Vec<(*const u8, usize)>,
    /// Bytes sent: the first `len` of `segments`.
    len: usize,
    /// The bytes, once read (plain sends at once, zero-copy ones at their notification).
    bytes: Option<Vec<u8>>,
}

// SAFETY: the raw pointers point into the area and the refill region, which the Area (kept
// alive by the driver that owns this kernel, and dropped after it) maps; only the driver
// thread uses the kernel.
unsafe impl Send for SyntheticRing {}

enum Step {
    Delivered,
    Ended,
    Waiting,
}

impl SyntheticRing {
    pub(crate) fn new(
        setup: KernelSetup,
        memory: SharedMemory,
        events: bool,
        control: Arc<Control>,
    ) -> SyntheticRing {
        let chunks = (memory.area_len / setup.chunk_size as usize) as u32;
        let refill = RefillView {
            head: memory.head,
            tail: memory.tail,
            rqes: memory.rqes,
            mask: memory.rq_entries - 1,
        };
        let seed = setup.faults.as_ref().map_or(0, |_| 1);
        SyntheticRing {
            free: (0..u64::from(chunks))
                .rev()
                .map(|c| c * u64::from(setup.chunk_size))
                .collect(),
            user_refs: vec![0; chunks as usize],
            areas: vec![KernelArea {
                base: memory.area,
                len: memory.area_len,
                first_chunk: 0,
            }],
            refill,
            memory,
            receives: Vec::new(),
            next: 0,
            pending: Vec::new(),
            eventfd: None,
            eventfd_ready: false,
            states: Vec::new(),
            by_fd: HashMap::new(),
            armed: events.then_some([true; 2]),
            lengths: Rng::new(seed),
            control,
            report: KernelReport {
                chunks,
                areas: 1,
                ..KernelReport::default()
            },
            setup,
            sends: VecDeque::new(),
            cancelling_chain: false,
            notifs_due: Vec::new(),
            notifs_next: Vec::new(),
            wire: VecDeque::new(),
        }
    }

    /// Answers every queued send, as `io_send_zc` / `io_send` do: a result with `F_MORE`
    /// for zero-copy sends (errors included, once the notification exists), the
    /// notification in the next reap; `-ECANCELED` for the rest of a chain after a failed
    /// or short link.
    fn answer_sends(&mut self, out: &mut Vec<RawCompletion>) {
        while let Some(sqe) = self.sends.pop_front() {
            let zero_copy = sqe.kind != SendKind::Plain;
            let link = sqe.link;
            let mut cqe = RawCompletion {
                user_data: sqe.user_data,
                res: 0,
                flags: if zero_copy { IORING_CQE_F_MORE } else { 0 },
                big_cqe: [0; 2],
            };
            let mut sent = 0usize;
            if self.cancelling_chain {
                cqe.res = -libc::ECANCELED;
            } else if let Some(errno) = self.send_refusal(&sqe) {
                cqe.res = -errno;
            } else {
                let fault = self.setup.faults.as_mut().and_then(|f| f.send());
                match fault {
                    // io_alloc_notif failed in prep: no notification, no F_MORE.
                    Some(SendFault::NoMemory) => {
                        cqe.res = -libc::ENOMEM;
                        cqe.flags = 0;
                    }
                    Some(SendFault::Error(errno)) => cqe.res = -errno,
                    // Nothing sent; the notification (allocated at this SQE's prep) follows.
                    Some(SendFault::LinkFailedAtPrep) => cqe.res = -libc::ECANCELED,
                    Some(SendFault::Short) if sqe.len > 1 => sent = sqe.len as usize / 2,
                    _ => sent = sqe.len as usize,
                }
                if cqe.res == 0 {
                    cqe.res = sent as i32;
                }
            }
            match sqe.kind {
                SendKind::ZeroCopyFixed(_) => self.report.sends_fixed += 1,
                SendKind::ZeroCopy => self.report.sends_unregistered += 1,
                SendKind::Plain => self.report.sends_plain += 1,
            }
            let wire = (sent > 0).then(|| {
                let id = self.report.sends_fixed
                    + self.report.sends_unregistered
                    + self.report.sends_plain;
                let mut entry = WireEntry {
                    id,
                    fd: sqe.fd,
                    segments: sqe.segments.clone(),
                    len: sent,
                    bytes: None,
                };
                if !zero_copy {
                    // A plain send copies into the socket buffer before it completes.
                    entry.bytes = Some(read_user(&entry.segments, entry.len));
                }
                self.wire.push_back(entry);
                id
            });
            // A link that failed or came short (MSG_WAITALL) fails the rest of the chain.
            let failed = cqe.res < 0 || sent < sqe.len as usize;
            if link {
                self.cancelling_chain |= failed;
            } else {
                self.cancelling_chain = false;
            }
            if cqe.flags & IORING_CQE_F_MORE != 0 {
                self.notifs_next.push(PendingNotif {
                    user_data: sqe.user_data,
                    wire,
                    // REPORT_USAGE: nothing sent counts as copied (zc_used stays false).
                    copied: sent == 0,
                });
            }
            out.push(cqe);
        }
        self.flush_wire();
    }

    /// Why the kernel refuses `sqe` before sending anything, if it does.
    fn send_refusal(&self, sqe: &QueuedSend) -> Option<i32> {
        if self.setup.refuse_send_zc && sqe.kind != SendKind::Plain {
            return Some(libc::EOPNOTSUPP);
        }
        if let SendKind::ZeroCopyFixed(index) = sqe.kind {
            let area = self.memory.area as usize;
            let inside = sqe.segments.iter().all(|&(ptr, len)| {
                let start = ptr as usize;
                start >= area && start + len <= area + self.memory.area_len
            });
            if index != 0 || !inside {
                // io_import_reg_buf: not in the registered buffer.
                return Some(libc::EFAULT);
            }
        }
        socket_error(sqe.fd)
    }

    /// Posts the notifications due: first the "NIC" reads each send's bytes. Returned
    /// chunks are consumed and, like any free chunk, overwritten by new packets first: a
    /// send whose chunk went back before its notification sends those bytes.
    fn post_notifications(&mut self, out: &mut Vec<RawCompletion>) {
        if self.notifs_due.is_empty() || self.notifs_held() {
            return;
        }
        if self.setup.write_pattern {
            self.consume_refills();
            for &offset in &self.free {
                // The offset carries its area's id (token): the chunk may be in any area.
                let (_, chunk) = self
                    .chunk_at(offset)
                    .expect("free chunks are inside their area");
                // SAFETY: a free chunk has no user reference: nobody may read it; it lies
                // inside its area, which outlives the kernel.
                unsafe { std::ptr::write_bytes(chunk, 0xEE, self.setup.chunk_size as usize) };
                self.report.scribbled_for_sends += 1;
            }
        }
        for notif in std::mem::take(&mut self.notifs_due) {
            if let Some(id) = notif.wire {
                if let Some(entry) = self.wire.iter_mut().find(|e| e.id == id) {
                    entry.bytes = Some(read_user(&entry.segments, entry.len));
                }
            }
            out.push(RawCompletion {
                user_data: notif.user_data,
                res: if notif.copied {
                    IORING_NOTIF_USAGE_ZC_COPIED as i32
                } else {
                    0
                },
                flags: IORING_CQE_F_NOTIF,
                big_cqe: [0; 2],
            });
        }
        self.flush_wire();
    }

    fn notifs_held(&self) -> bool {
        self.control.hold_notifications.load(Ordering::Relaxed)
    }

    /// Writes the wire's bytes to their sockets, in order, as far as they have been read.
    fn flush_wire(&mut self) {
        while self.wire.front().is_some_and(|e| e.bytes.is_some()) {
            let entry = self.wire.pop_front().expect("checked");
            let bytes = entry.bytes.expect("checked");
            self.report.send_bytes += write_fully(entry.fd, &bytes) as u64;
        }
    }

    /// The chunk a CQE offset (token | offset in the area) names: its index in `user_refs`
    /// and its address, if it is one.
    fn chunk_at(&self, off: u64) -> Option<(usize, *mut u8)> {
        let area = self.areas.get((off >> IORING_ZCRX_AREA_SHIFT) as usize)?;
        let offset = (off & !IORING_ZCRX_AREA_MASK) as usize;
        if offset >= area.len {
            return None;
        }
        let chunk = offset / self.setup.chunk_size as usize;
        // SAFETY (of the pointer's later use): inside the area, which outlives the kernel.
        Some((
            area.first_chunk as usize + chunk,
            area.base.wrapping_add(offset),
        ))
    }

    /// The CQE offset of chunk `index` of `user_refs` (the inverse of [`Self::chunk_at`]).
    fn offset_of(&self, index: usize) -> u64 {
        let id = self
            .areas
            .iter()
            .rposition(|area| area.first_chunk as usize <= index)
            .expect("area 0 starts at chunk 0");
        let within = (index - self.areas[id].first_chunk as usize) as u64;
        ((id as u64) << IORING_ZCRX_AREA_SHIFT) | (within * u64::from(self.setup.chunk_size))
    }

    /// Parses and takes every published refill entry, as `io_zcrx_ring_refill` does.
    fn consume_refills(&mut self) {
        // SAFETY: head and tail point into the live region; we are the only consumer.
        let (head, tail) = unsafe {
            (
                (*self.refill.head).load(Ordering::Relaxed),
                (*self.refill.tail).load(Ordering::Acquire),
            )
        };
        let mut position = head;
        while position != tail {
            // SAFETY: entries between head and tail were published (release on tail).
            let rqe = unsafe {
                self.refill
                    .rqes
                    .add((position & self.refill.mask) as usize)
                    .read()
            };
            position = position.wrapping_add(1);
            // The area by the token's index, then the chunk within it (io_parse_rqe).
            let Some((chunk, _)) = self.chunk_at(rqe.off).filter(|_| rqe.__pad == 0) else {
                self.report.skipped_returns += 1;
                continue;
            };
            let refs = &mut self.user_refs[chunk];
            if *refs == 0 {
                self.report.double_returns += 1;
                continue;
            }
            *refs -= 1;
            if *refs == 0 {
                self.report.lent -= 1;
                // The chunk's start, whatever offset within it the entry named.
                self.free.push(self.offset_of(chunk));
            }
        }
        // SAFETY: as above; release hands the slots back to the producers.
        unsafe { (*self.refill.head).store(tail, Ordering::Release) };
    }

    /// A NIC's page pool takes refill entries only when it needs buffers: here, when no
    /// chunk is free. NODEV queues have no page pool: only FLUSH_RQ consumes the ring.
    fn page_pool_refill(&mut self) {
        if self.setup.registration == Registration::Nic
            && (self.free.is_empty() || self.setup.full_speed_nic)
        {
            self.consume_refills();
        }
    }

    fn is_copy(&self, path: Path) -> bool {
        self.setup.registration == Registration::NoDevice || path == Path::Copy
    }

    fn receive_ready(&self, receive: &Receive) -> bool {
        let state = &self.states[receive.state];
        state.position >= state.plan.bytes
            || (receive.limit > 0 && receive.received >= u64::from(receive.limit))
            || self.is_copy(state.plan.path)
            || !self.free.is_empty()
    }

    fn can_deliver(&self) -> bool {
        !self.pending.is_empty()
            || !self.sends.is_empty()
            || (!self.notifs_held()
                && (!self.notifs_due.is_empty() || !self.notifs_next.is_empty()))
            || self.eventfd_ready
            // A free chunk serves any receive: the per-receive look only when there is none.
            || (!self.receives.is_empty()
                && (!self.free.is_empty() || self.receives.iter().any(|r| self.receive_ready(r))))
    }

    /// Sleeps until the eventfd is readable or `wait` (`None`: no limit) has passed.
    fn poll_eventfd(&mut self, wait: Option<Duration>) {
        let Some((fd, _)) = self.eventfd else {
            if let Some(wait) = wait {
                std::thread::sleep(wait);
            }
            return;
        };
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let timespec = wait.map(|w| libc::timespec {
            tv_sec: w.as_secs() as libc::time_t,
            tv_nsec: w.subsec_nanos() as libc::c_long,
        });
        let timeout = timespec
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: one valid pollfd and an optional live timespec for the duration of the call.
        let ready =
            unsafe { crate::sys::syscall!(ppoll(&mut pollfd, 1, timeout, std::ptr::null())) };
        // An interrupted or failed poll is a spurious wake-up: the driver loop looks again.
        if ready.is_ok_and(|ready| ready > 0) {
            self.eventfd_ready = true;
        }
    }

    fn fire(&mut self, event: usize) {
        if let Some(armed) = self.armed.as_mut() {
            if armed[event] {
                armed[event] = false;
                self.report.events[event] += 1;
                self.pending.push(RawCompletion {
                    user_data: UserData::EVENT.as_u64(),
                    res: event as i32,
                    flags: 0,
                    big_cqe: [0; 2],
                });
            }
        }
    }

    fn count_copy(&mut self, len: u32) {
        let Some(stats) = self.memory.stats else {
            return;
        };
        self.report.copy_count += 1;
        self.report.copy_bytes += u64::from(len);
        // SAFETY: the stats live in the region for as long as the kernel; the driver reads
        // each field with a relaxed atomic load, so store them the same way.
        unsafe {
            (*(std::ptr::addr_of_mut!((*stats).copy_count) as *const AtomicU64))
                .store(self.report.copy_count, Ordering::Relaxed);
            (*(std::ptr::addr_of_mut!((*stats).copy_bytes) as *const AtomicU64))
                .store(self.report.copy_bytes, Ordering::Relaxed);
        }
        self.fire(COPY);
    }

    fn end(&mut self, user_data: u64, res: i32) {
        self.pending.push(RawCompletion {
            user_data,
            res,
            ..RawCompletion::default()
        });
    }

    /// One step of receive `index`: a data CQE, its final CQE, or nothing yet.
    fn step(&mut self, index: usize, out: &mut Vec<RawCompletion>) -> Step {
        let (user_data, state_index, limit, received) = {
            let r = &self.receives[index];
            (r.user_data, r.state, r.limit, r.received)
        };
        let state = &mut self.states[state_index];
        if state.position >= state.plan.bytes {
            let end = state.plan.end;
            out.push(final_cqe(user_data, end));
            return Step::Ended;
        }
        if limit > 0 && received >= u64::from(limit) {
            out.push(final_cqe(user_data, 0));
            return Step::Ended;
        }
        if let Some(at) = state.plan.cq_overflow_at {
            if !state.cq_overflowed && state.position >= at {
                state.cq_overflowed = true;
                self.report.enospc_answers += 1;
                out.push(final_cqe(user_data, -libc::ENOSPC));
                return Step::Ended;
            }
        }
        let (seed, position, plan_bytes, lengths, path) = (
            state.plan.seed,
            state.position,
            state.plan.bytes,
            state.plan.lengths,
            state.plan.path,
        );
        if let Some(errno) = self.setup.faults.as_mut().and_then(|f| f.recv_error()) {
            out.push(final_cqe(user_data, -errno));
            return Step::Ended;
        }
        let copy = self.is_copy(path);
        if !copy && self.free.is_empty() {
            // The page pool takes returns from the refill ring before it finds no chunk
            // (io_pp_zc_alloc_netmems: the ring, then the free lists); the copy path takes
            // free chunks only.
            self.page_pool_refill();
        }
        let Some(offset) = self.free.pop() else {
            if copy {
                self.report.enomem_answers += 1;
                out.push(final_cqe(user_data, -libc::ENOMEM));
                return Step::Ended;
            }
            // The page pool found neither refill entries nor free chunks: the NIC drops.
            if self.setup.registration == Registration::Nic {
                self.fire(ALLOC_FAIL);
            }
            return Step::Waiting;
        };
        let chunk_size = self.setup.chunk_size;
        let rng = match self.setup.faults.as_mut() {
            Some(faults) => faults.rng(),
            None => &mut self.lengths,
        };
        let mut len = match lengths {
            Lengths::Full => chunk_size,
            Lengths::Varied => 1 + rng.below(u64::from(chunk_size)) as u32,
            Lengths::Segments(payload) => payload.clamp(1, chunk_size),
        };
        len = len.min((plan_bytes - position).min(u32::MAX as u64) as u32);
        if limit > 0 {
            len = len.min((u64::from(limit) - received) as u32);
        }
        let (chunk, data) = self
            .chunk_at(offset)
            .expect("free chunks are inside their area");
        let area_len = self.areas[(offset >> IORING_ZCRX_AREA_SHIFT) as usize].len;
        if self.setup.write_pattern {
            // SAFETY: the chunk is free (no user reference): nobody reads it; it lies inside
            // its area, which outlives the kernel.
            let data = unsafe { std::slice::from_raw_parts_mut(data, len as usize) };
            pattern::fill(seed, position, data);
        }
        if self.user_refs[chunk] == 0 {
            self.report.lent += 1;
        }
        self.user_refs[chunk] += 1;
        self.report.data_cqes += 1;
        if copy {
            self.count_copy(len);
        }
        let mut cqe = RawCompletion {
            user_data,
            res: len as i32,
            flags: IORING_CQE_F_MORE,
            big_cqe: [offset, 0],
        };
        let mut step = Step::Delivered;
        let mut advances = true;
        match self.setup.faults.as_mut().and_then(|f| f.malformed()) {
            None => {}
            Some(Malformed::BadToken) => cqe.big_cqe[0] |= 0x5a5a << IORING_ZCRX_AREA_SHIFT,
            Some(Malformed::OutsideArea) => cqe.big_cqe[0] += area_len as u64,
            Some(Malformed::CrossesChunk) => {
                cqe.big_cqe[0] += u64::from(chunk_size / 2);
                cqe.res = chunk_size as i32;
            }
            Some(Malformed::StaleUserData) => {
                // A late CQE of an older request in the same slot: not this stream's bytes.
                let stream = UserData::from_raw(user_data).stream();
                let older = StreamId::new(stream.slot(), stream.generation().wrapping_sub(1));
                cqe.user_data = UserData::recv(older).as_u64();
                advances = false;
            }
            Some(Malformed::DataWithoutMore) => {
                cqe.flags = 0;
                step = Step::Ended;
            }
        }
        if advances {
            self.states[state_index].position += u64::from(len);
            self.receives[index].received += u64::from(len);
        }
        out.push(cqe);
        step
    }

    fn publish(&mut self) {
        self.report.free = self.free.len() as u32;
        if let Some(faults) = &self.setup.faults {
            self.report.injected = faults.injected;
        }
        *super::super::lock(&self.control.report) = self.report;
    }
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Copies `len` bytes at `ptr`.
/// The first `len` bytes of a send's ranges.
fn read_user(segments: &[(*const u8, usize)], mut len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    for &(ptr, range) in segments {
        let take = range.min(len);
        // SAFETY: the driver holds the memory of a send unchanged until the send's last CQE
        // (`driver/sends.rs`), which this kernel posts only after reading it.
        bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, take) });
        len -= take;
    }
    bytes
}

/// A pending error on socket `fd` (the peer reset it, or it was shut down for writing),
/// as a send would find it.
fn socket_error(fd: RawFd) -> Option<i32> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; zero timeout.
    let ready = unsafe { crate::sys::syscall!(poll(&mut pollfd, 1, 0)) };
    if ready.is_err() || pollfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) == 0 {
        return None;
    }
    let mut error: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ERROR writes one c_int into the live `error`, whose size is in `len`.
    let _ = unsafe {
        crate::sys::syscall!(getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut error as *mut libc::c_int).cast(),
            &mut len,
        ))
    };
    Some(if error != 0 { error } else { libc::EPIPE })
}

/// Writes all of `bytes` to `fd` (waiting for room, up to 10 s per wait), or stops at an
/// error (the peer is gone: what a real kernel would drop too). Returns the bytes written.
fn write_fully(fd: RawFd, bytes: &[u8]) -> usize {
    let mut written = 0;
    while written < bytes.len() {
        let rest = &bytes[written..];
        // SAFETY: sends from a live slice; MSG_NOSIGNAL: no SIGPIPE on a closed peer.
        let sent = unsafe {
            crate::sys::syscall!(send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            ))
        };
        match sent {
            Ok(n) => written += n as usize,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pollfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready = unsafe { crate::sys::syscall!(poll(&mut pollfd, 1, 10_000)) };
                if matches!(ready, Ok(0)) {
                    tracing::warn!(fd, "synthetic kernel: a socket took nothing for 10 s");
                    return written;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return written,
        }
    }
    written
}

fn final_cqe(user_data: u64, res: i32) -> RawCompletion {
    RawCompletion {
        user_data,
        res,
        ..RawCompletion::default()
    }
}

impl CompletionRing for SyntheticRing {
    fn send_chain(&mut self, sqes: &[SendSqe]) -> io::Result<()> {
        self.sends.extend(sqes.iter().map(|sqe| {
            // SAFETY: the driver keeps the message alive until the request's last CQE.
            let message = unsafe { &*sqe.message };
            debug_assert_eq!(
                sqe.len as usize,
                message.segments().map(|(_, len)| len).sum::<usize>(),
                "a send SQE's length is its ranges' total"
            );
            QueuedSend {
                fd: sqe.fd,
                segments: message.segments().collect(),
                len: sqe.len,
                kind: sqe.kind,
                link: sqe.link,
                user_data: sqe.user_data,
            }
        }));
        Ok(())
    }

    fn recv(&mut self, fd: RawFd, len: u32, user_data: u64) -> io::Result<()> {
        let stream = UserData::from_raw(user_data).stream();
        let known = self
            .by_fd
            .get(&fd)
            .copied()
            .filter(|&i| self.states[i].stream == stream);
        let state = match known {
            Some(index) => index,
            None => {
                // A new connection on this descriptor: its plan, or the default one.
                let plan = super::super::lock(&self.control.plans)
                    .remove(&fd)
                    .unwrap_or_else(|| StreamPlan {
                        path: self.setup.default_path,
                        ..StreamPlan::new(
                            fd as u64,
                            self.setup.chunks_per_stream * u64::from(self.setup.chunk_size),
                        )
                    });
                self.states.push(StreamState {
                    stream,
                    position: plan.start,
                    plan,
                    cq_overflowed: false,
                });
                self.by_fd.insert(fd, self.states.len() - 1);
                self.states.len() - 1
            }
        };
        self.receives.push(Receive {
            user_data,
            state,
            limit: len,
            received: 0,
        });
        Ok(())
    }

    fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let before = self.receives.len();
        self.receives.retain(|r| r.user_data != target);
        let found = before != self.receives.len();
        if found {
            self.end(target, -libc::ECANCELED);
        }
        self.end(user_data, if found { 0 } else { -libc::ENOENT });
        Ok(())
    }

    fn poll_readable(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        self.eventfd = Some((fd, user_data));
        Ok(())
    }

    fn flush_refill(&mut self) -> io::Result<()> {
        if !self.setup.personality.has_ctrl() {
            // No IORING_REGISTER_ZCRX_CTRL before 6.19: an unknown register opcode.
            self.report.flushes_refused += 1;
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(errno) = self.setup.faults.as_mut().and_then(|f| f.ctrl()) {
            self.report.flushes_refused += 1;
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.report.flushes += 1;
        self.consume_refills();
        Ok(())
    }

    fn arm_event(&mut self, event_type: u32) -> io::Result<()> {
        let refuse = |report: &mut KernelReport, errno| {
            report.arms_refused += 1;
            Err(io::Error::from_raw_os_error(errno))
        };
        if !self.setup.personality.has_events() {
            return refuse(&mut self.report, libc::EINVAL);
        }
        if let Some(errno) = self.setup.faults.as_mut().and_then(|f| f.ctrl()) {
            return refuse(&mut self.report, errno);
        }
        let Some(armed) = self.armed.as_mut() else {
            return refuse(&mut self.report, libc::EINVAL);
        };
        match armed.get_mut(event_type as usize) {
            // Re-arming a type that has not fired: EINVAL.
            Some(true) | None => refuse(&mut self.report, libc::EINVAL),
            Some(slot) => {
                *slot = true;
                self.report.arms += 1;
                Ok(())
            }
        }
    }

    /// `ZCRX_CTRL_ADD_AREA` as 7.3's `zcrx_ctrl_add_area` answers it: EINVAL without
    /// `IORING_REGISTER_ZCRX_CTRL` (before 6.19), EOPNOTSUPP for an op the kernel does not
    /// know (before 7.3); EINVAL for a token that is not 0 on input, flags this area kind
    /// does not share with the first (a dma-buf), a length that is not whole chunks, or a
    /// 1025th area; EOPNOTSUPP for chunks larger than a page without a device (NODEV).
    /// Otherwise the token (`id << 48`) is written back and the area's chunks are free.
    unsafe fn add_area(&mut self, area: &mut io_uring_zcrx_area_reg) -> io::Result<()> {
        let refuse = |report: &mut KernelReport, errno| {
            report.add_area_refused += 1;
            Err(io::Error::from_raw_os_error(errno))
        };
        if !self.setup.personality.has_ctrl() {
            return refuse(&mut self.report, libc::EINVAL);
        }
        if !self.setup.personality.ctrl_ops().contains(&"ADD_AREA") {
            return refuse(&mut self.report, libc::EOPNOTSUPP);
        }
        if let Some(errno) = self.setup.faults.as_mut().and_then(|f| f.ctrl()) {
            return refuse(&mut self.report, errno);
        }
        let chunk = self.setup.chunk_size as u64;
        let page = crate::sys::page_size() as u64;
        if area.rq_area_token != 0
            || area.flags != 0
            || area.len == 0
            || area.len % chunk != 0
            || area.addr % page != 0
            || self.areas.len() >= MAX_AREAS
        {
            return refuse(&mut self.report, libc::EINVAL);
        }
        if self.setup.registration == Registration::NoDevice && chunk != page {
            return refuse(&mut self.report, libc::EOPNOTSUPP);
        }
        let id = self.areas.len() as u64;
        let chunks = (area.len / chunk) as u32;
        area.rq_area_token = id << IORING_ZCRX_AREA_SHIFT;
        self.areas.push(KernelArea {
            base: area.addr as *mut u8,
            len: area.len as usize,
            first_chunk: self.user_refs.len() as u32,
        });
        self.user_refs
            .resize(self.user_refs.len() + chunks as usize, 0);
        self.free.extend(
            (0..u64::from(chunks))
                .rev()
                .map(|c| area.rq_area_token | (c * chunk)),
        );
        self.report.chunks += chunks;
        self.report.areas += 1;
        Ok(())
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.report.enters += 1;
        if let Some(errno) = self.setup.faults.as_mut().and_then(|f| f.enter()) {
            self.publish();
            return Err(io::Error::from_raw_os_error(errno));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut chunk_wait = CHUNK_WAIT_MIN;
        // The thread's CPU time when its idle polling began (full_speed_nic).
        let mut polling_since = None;
        loop {
            self.page_pool_refill();
            if self.can_deliver() {
                break;
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining == Some(Duration::ZERO) {
                break;
            }
            // What the last reap and refill changed, visible before this thread sleeps.
            self.publish();
            if self.receives.is_empty() {
                // Nothing to deliver until the driver asks: sleep like io_uring_enter.
                self.poll_eventfd(remaining);
            } else {
                // Zero-copy receives wait for chunks, which come back through the refill
                // ring without a wake-up: look again after a back-off, as the NIC does when
                // the next packet (or retransmission) arrives.
                if self.setup.registration == Registration::Nic {
                    self.fire(ALLOC_FAIL);
                }
                if self.setup.full_speed_nic {
                    polling_since.get_or_insert_with(thread_cpu);
                    self.poll_eventfd(Some(Duration::ZERO));
                    std::thread::yield_now();
                    continue;
                }
                let wait = remaining.map_or(chunk_wait, |r| r.min(chunk_wait));
                chunk_wait = (chunk_wait * 2).min(CHUNK_WAIT_MAX);
                self.poll_eventfd(Some(wait));
            }
        }
        if let Some(since) = polling_since {
            self.report.idle_poll_cpu += thread_cpu().saturating_sub(since);
        }
        self.publish();
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<RawCompletion>) {
        if self.eventfd_ready {
            self.eventfd_ready = false;
            if let Some((_, user_data)) = self.eventfd {
                out.push(RawCompletion {
                    user_data,
                    res: 1,
                    flags: IORING_CQE_F_MORE,
                    big_cqe: [0; 2],
                });
            }
        }
        out.append(&mut self.pending);
        // Notifications of sends answered in an earlier reap, then this reap's sends.
        self.post_notifications(out);
        self.answer_sends(out);
        self.notifs_due.append(&mut self.notifs_next);
        let mut budget = COMPLETIONS_PER_REAP;
        let mut idle_visits = 0;
        while budget > 0 && !self.receives.is_empty() && idle_visits < self.receives.len() {
            self.next %= self.receives.len();
            match self.step(self.next, out) {
                Step::Delivered => {
                    idle_visits = 0;
                    budget -= 1;
                    self.next += 1;
                }
                Step::Ended => {
                    self.receives.swap_remove(self.next);
                    idle_visits = 0;
                    budget -= 1;
                }
                Step::Waiting => {
                    idle_visits += 1;
                    self.next += 1;
                }
            }
        }
        // Events fired while stepping (COPY, ALLOC_FAIL) go out with this reap.
        out.append(&mut self.pending);
        // Published before the driver hands these completions on: a reader that sees the
        // data sees the report that goes with it.
        self.publish();
    }
}

impl Drop for SyntheticRing {
    fn drop(&mut self) {
        // Closing the ring takes back every returned chunk.
        self.consume_refills();
        let hazard = self.setup.registration == Registration::Nic
            && !self
                .setup
                .personality
                .capabilities(false)
                .teardown_stops_queue_first;
        if hazard && self.report.lent > 0 {
            // 6.15-6.18: held chunks go back to the page pool of the still running queue,
            // and the NIC may DMA new packets into them before the queue stops. Do it.
            for chunk in 0..self.user_refs.len() {
                if self.user_refs[chunk] > 0 {
                    let (_, at) = self.chunk_at(self.offset_of(chunk)).expect("a chunk");
                    // SAFETY: inside its area, which outlives the kernel. This write is the
                    // hazard being modelled; tests only read held buffers after shutdown.
                    unsafe { std::ptr::write_bytes(at, 0xEE, self.setup.chunk_size as usize) };
                    self.report.scribbled_at_teardown += 1;
                }
            }
        }
        self.report.torn_down = true;
        self.publish();
    }
}
