//! Helpers for the real-kernel tests, which run inside the QEMU guest (`cargo xtask vm-test`).
//!
//! [`RawZcrx`] drives one zcrx interface queue with nothing but the kernel-interface crate
//! (`zcrx-sys`) and the io-uring crate's ring: it is deliberately the plainest possible user of
//! the kernel ABI, so these tests check the kernel facts the runtime is built on.
//!
//! It repeats on purpose what `tokio-zcrx` does to register (ring flags, area and refill
//! region, offsets) instead of calling the library's `sys::registration`: a test oracle must not
//! share the code it checks, or a mistake in that code would be made on both sides and pass.
//!
//! The guest's network (see vm/guest/init) is described by environment variables:
//! `TZX_NIC` (the zcrx-capable netdevsim port in this namespace), `TZX_NIC_ADDR`,
//! `TZX_PEER_NETNS` (the namespace holding the linked peer port) and `TZX_PEER_ADDR`.

use std::ffi::CString;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;

pub mod procfs;
pub mod support;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use zcrx_sys::ctrl::{zcrx_arm_event, zcrx_flush_rq};
use zcrx_sys::event::{zcrx_event_desc, zcrx_stats, ZCRX_EVENT_DESC_FLAG_STATS};
use zcrx_sys::region::{io_uring_region_desc, IORING_MEM_REGION_TYPE_USER};
use zcrx_sys::ring::IORING_CQE_F_MORE;
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_cqe, io_uring_zcrx_ifq_reg, io_uring_zcrx_offsets,
    io_uring_zcrx_rqe, register_zcrx_ifq, IORING_ZCRX_AREA_MASK, ZCRX_REG_NODEV,
};

/// user_data of zcrx event CQEs; no request uses it.
pub const EVENT_USER_DATA: u64 = u64::MAX - 1;

const PAGE: usize = 4096;

/// The guest kernel and what differs between the kernels the real-kernel tier runs on
/// (Debian's 7.2.x and 7.3.x; see docs/testing.md, "Kernel matrix"). Tests assert the
/// kernel's answer for each, they do not skip: a 7.2 kernel must refuse what only 7.3 has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestKernel {
    /// `(major, minor)` of `uname -r`, e.g. `(7, 3)`.
    pub series: (u32, u32),
}

impl GuestKernel {
    /// The running kernel, from `/proc/sys/kernel/osrelease` (`uname -r`).
    pub fn running() -> GuestKernel {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .expect("/proc/sys/kernel/osrelease (the guest mounts /proc)");
        GuestKernel::parse(release.trim())
            .unwrap_or_else(|| panic!("kernel release `{release}` is not X.Y.Z..."))
    }

    /// `"7.3.4+deb13-amd64"` -> `(7, 3)`.
    pub fn parse(release: &str) -> Option<GuestKernel> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(GuestKernel {
            series: (major, minor),
        })
    }

    /// Events and shared-memory stats (`ZCRX_FEATURE_EVENT`, `ZCRX_CTRL_ARM_EVENT`): 7.2+.
    pub fn has_events(self) -> bool {
        self.series >= (7, 2)
    }

    /// `ZCRX_CTRL_ADD_AREA`: 7.3+. On 7.2 the control op answers EOPNOTSUPP.
    pub fn has_add_area(self) -> bool {
        self.series >= (7, 3)
    }

    /// The number of `ZCRX_CTRL` opcodes the zcrx query reports: 3 on 7.2 (FLUSH_RQ,
    /// EXPORT, ARM_EVENT), 4 on 7.3 (ADD_AREA).
    pub fn nr_ctrl_opcodes(self) -> u32 {
        if self.has_add_area() {
            4
        } else {
            3
        }
    }

    /// The refill ring's header, as `(head, tail, rqes)` offsets and the query's
    /// `rq_hdr_size`: 7.3's `struct zcrx_rq_hdr` puts head and tail on their own cache
    /// lines (0, 64; entries at 128, header 128 bytes); before, `struct io_uring` packed them
    /// (0, 4; entries at 64, header 8 bytes).
    pub fn refill_header(self) -> RefillHeader {
        if self.series >= (7, 3) {
            RefillHeader {
                head: 0,
                tail: 64,
                rqes: 128,
                rq_hdr_size: 128,
            }
        } else {
            RefillHeader {
                head: 0,
                tail: 4,
                rqes: 64,
                rq_hdr_size: 8,
            }
        }
    }
}

/// Where a kernel puts the refill ring's head, tail and entries (x86-64, 64-byte lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefillHeader {
    pub head: u32,
    pub tail: u32,
    pub rqes: u32,
    pub rq_hdr_size: u32,
}

/// The guest's test network. Panics with a clear message outside the guest.
#[derive(Debug, Clone)]
pub struct GuestNet {
    pub nic: String,
    pub nic_addr: String,
    pub peer_netns: String,
    pub peer_addr: String,
}

impl GuestNet {
    pub fn from_env() -> GuestNet {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: this is a real-kernel test; run it with \
                     `cargo xtask vm-test`, which boots a zcrx kernel in QEMU"
                )
            })
        };
        GuestNet {
            nic: var("TZX_NIC"),
            nic_addr: var("TZX_NIC_ADDR"),
            peer_netns: var("TZX_PEER_NETNS"),
            peer_addr: var("TZX_PEER_ADDR"),
        }
    }

    pub fn nic_ifindex(&self) -> u32 {
        ifindex(&self.nic).unwrap_or_else(|e| panic!("no interface {}: {e}", self.nic))
    }
}

pub fn ifindex(name: &str) -> io::Result<u32> {
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(idx)
}

/// Runs `ethtool` with the given arguments and panics if it fails.
pub fn ethtool(args: &[&str]) {
    let status = std::process::Command::new("ethtool")
        .args(args)
        .status()
        .expect("running ethtool");
    assert!(status.success(), "ethtool {args:?} failed: {status}");
}

/// The byte at stream position `pos` of every test payload: position-dependent, so a chunk
/// delivered twice, out of order or at the wrong offset is caught.
#[inline]
pub fn pattern_byte(pos: u64) -> u8 {
    (pos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Index of the first byte of `data` that differs from the pattern at `start`.
pub fn first_mismatch(start: u64, data: &[u8]) -> Option<usize> {
    data.iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern_byte(start + i as u64))
        .map(|(i, _)| i)
}

/// A connection from the peer namespace `peer_netns` to `addr` that sends `bytes` bytes of
/// 0xFF (which marks it: every pattern stream starts with `pattern_byte(0) == 0`), waits
/// `after` and resets.
pub fn spawn_resetter(
    peer_netns: &str,
    addr: SocketAddr,
    bytes: usize,
    after: std::time::Duration,
) -> JoinHandle<()> {
    let peer_netns = peer_netns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&peer_netns);
        let socket = TcpStream::connect(addr).unwrap();
        (&socket).write_all(&vec![0xFF; bytes]).unwrap();
        std::thread::sleep(after);
        reset_on_close(&socket);
        drop(socket);
    })
}

/// Sends `total` pattern bytes to `addr` from a thread, optionally from inside a network
/// namespace (the peer port lives in its own namespace).
pub fn spawn_sender(addr: SocketAddr, total: u64, netns: Option<String>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            enter_netns(&ns);
        }
        let mut stream = TcpStream::connect(addr).expect("sender: connect");
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern_byte(sent + i as u64);
            }
            stream.write_all(&buf[..n]).expect("sender: write");
            sent += n as u64;
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("sender: shutdown");
        sent
    })
}

/// Moves the calling thread into the network namespace at `path` (e.g. /run/netns/nsb).
pub fn enter_netns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns takes a valid fd (kept open by `file`) and a namespace type; it only
    // changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
}

/// Binds a listener on `ip` with a kernel-chosen port.
pub fn listen(ip: &str) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    pub fn new(len: usize) -> io::Result<Mmap> {
        // SAFETY: a fresh anonymous mapping aliases nothing; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned NULL"),
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping we own; nothing borrows it past drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Which queue to register.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A NIC rx queue.
    Nic { ifindex: u32, rxq: u32 },
    /// Device-less mode (7.1+): every byte is copied by the kernel into the area.
    Nodev,
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub target: Target,
    pub area_bytes: usize,
    pub rq_entries: u32,
    pub cq_entries: u32,
    /// Register the 7.2 event descriptor with shared-memory stats.
    pub events: bool,
}

/// One registered zcrx interface queue on its own ring, used from a single thread.
pub struct RawZcrx {
    // Field order is drop order: the ring (and with it the ifq) goes before the memory.
    pub ring: IoUring<squeue::Entry, cqueue::Entry32>,
    area: Mmap,
    region: Mmap,
    pub zcrx_id: u32,
    /// The refill ring's offsets as the kernel reported them at registration.
    pub offsets: io_uring_zcrx_offsets,
    area_token: u64,
    rq_head: *const AtomicU32,
    rq_tail: *const AtomicU32,
    rqes: *mut io_uring_zcrx_rqe,
    rq_mask: u32,
    rq_local_tail: u32,
    stats: Option<*const zcrx_stats>,
    target: Target,
    /// Refill entries written since the last flush (NODEV consumes them only on a flush).
    unflushed: u32,
}

impl std::fmt::Debug for RawZcrx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawZcrx")
            .field("ring_fd", &self.ring.as_raw_fd())
            .field("zcrx_id", &self.zcrx_id)
            .field("target", &self.target)
            .field("rq_entries", &self.rq_entries())
            .finish_non_exhaustive()
    }
}

/// One completion, decoded.
#[derive(Debug, Clone, Copy)]
pub enum Completion {
    /// `len` bytes at `area_offset`; one refill entry is owed for it.
    Data {
        user_data: u64,
        area_offset: u64,
        len: u32,
        more: bool,
    },
    /// A request ended (res 0 = EOF or limit, negative = -errno).
    End { user_data: u64, res: i32 },
    /// A zcrx event CQE: `res` is the event type index.
    Event { event_type: u32 },
}

impl RawZcrx {
    pub fn register(config: Config) -> io::Result<RawZcrx> {
        let ring = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_submit_all()
            .setup_cqsize(config.cq_entries)
            .build(64)?;
        let area = Mmap::new(config.area_bytes)?;
        let ring_bytes = round_up(config.rq_entries as usize * 16 + PAGE, PAGE);
        // One extra page after the refill ring holds the event statistics.
        let region = Mmap::new(ring_bytes + PAGE)?;
        let mut area_reg = io_uring_zcrx_area_reg {
            addr: area.as_ptr() as u64,
            len: area.len() as u64,
            ..Default::default()
        };
        let mut region_desc = io_uring_region_desc {
            user_addr: region.as_ptr() as u64,
            size: region.len() as u64,
            flags: IORING_MEM_REGION_TYPE_USER,
            ..Default::default()
        };
        let event_desc = zcrx_event_desc {
            user_data: EVENT_USER_DATA,
            type_mask: (1 << zcrx_sys::event::ZCRX_EVENT_ALLOC_FAIL)
                | (1 << zcrx_sys::event::ZCRX_EVENT_COPY),
            flags: ZCRX_EVENT_DESC_FLAG_STATS,
            stats_offset: ring_bytes as u64,
            ..Default::default()
        };
        let (if_idx, if_rxq, flags) = match config.target {
            Target::Nic { ifindex, rxq } => (ifindex, rxq, 0),
            Target::Nodev => (0, 0, ZCRX_REG_NODEV),
        };
        let mut reg = io_uring_zcrx_ifq_reg {
            if_idx,
            if_rxq,
            rq_entries: config.rq_entries,
            flags,
            area_ptr: &mut area_reg as *mut _ as u64,
            region_ptr: &mut region_desc as *mut _ as u64,
            event_desc: if config.events {
                &event_desc as *const _ as u64
            } else {
                0
            },
            ..Default::default()
        };
        // SAFETY: area_reg, region_desc and event_desc live across the call; the area and
        // region mappings are owned by the returned value and outlive the ring (field order),
        // and are only accessed through raw pointers and atomics below.
        unsafe { register_zcrx_ifq(ring.as_fd(), &mut reg)? };
        let base = region.as_ptr();
        let offsets = reg.offsets;
        // SAFETY: the kernel reported these offsets inside the region it validated.
        let (rq_head, rq_tail, rqes) = unsafe {
            (
                base.add(offsets.head as usize).cast::<AtomicU32>(),
                base.add(offsets.tail as usize).cast::<AtomicU32>(),
                base.add(offsets.rqes as usize).cast::<io_uring_zcrx_rqe>(),
            )
        };
        assert!(
            offsets.rqes as usize + reg.rq_entries as usize * 16 <= ring_bytes,
            "kernel's refill ring exceeds the space reserved for it"
        );
        // SAFETY: the stats page is inside the region (stats_offset < region.len()).
        let stats = config
            .events
            .then(|| unsafe { base.add(ring_bytes).cast::<zcrx_stats>() as *const zcrx_stats });
        Ok(RawZcrx {
            ring,
            zcrx_id: reg.zcrx_id,
            offsets,
            area_token: area_reg.rq_area_token,
            rq_head,
            rq_tail,
            rqes,
            rq_mask: reg.rq_entries - 1,
            // SAFETY: rq_tail points into the live region; the kernel never writes the tail.
            rq_local_tail: unsafe { (*rq_tail).load(Ordering::Relaxed) },
            stats,
            target: config.target,
            unflushed: 0,
            area,
            region,
        })
    }

    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    pub fn rq_entries(&self) -> u32 {
        self.rq_mask + 1
    }

    /// Submits a multishot RECV_ZC on `fd` (len 0 = unlimited).
    pub fn submit_recv(&mut self, fd: RawFd, len: u32, user_data: u64) -> io::Result<()> {
        let sqe = opcode::RecvZc::new(types::Fd(fd), len)
            .ifq(self.zcrx_id)
            .build()
            .user_data(user_data);
        // SAFETY: the SQE refers to no user memory; the fd stays open while the test runs.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        self.ring.submit()?;
        Ok(())
    }

    /// Waits for at least one completion and decodes every available one.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.ring.submit_and_wait(1)?;
        for cqe in self.ring.completion() {
            let res = cqe.result();
            let user_data = cqe.user_data();
            if user_data == EVENT_USER_DATA {
                out.push(Completion::Event {
                    event_type: res as u32,
                });
                continue;
            }
            let more = cqe.flags() & IORING_CQE_F_MORE != 0;
            if res > 0 {
                let zcqe = io_uring_zcrx_cqe {
                    off: cqe.big_cqe()[0],
                    __pad: cqe.big_cqe()[1],
                };
                out.push(Completion::Data {
                    user_data,
                    area_offset: zcqe.off & !IORING_ZCRX_AREA_MASK,
                    len: res as u32,
                    more,
                });
                if !more {
                    // A data CQE without MORE would end the request with bytes: not expected.
                    out.push(Completion::End { user_data, res: 0 });
                }
            } else {
                out.push(Completion::End { user_data, res });
            }
        }
        Ok(())
    }

    /// The bytes of a delivered chunk.
    pub fn chunk(&self, area_offset: u64, len: u32) -> &[u8] {
        let end = area_offset as usize + len as usize;
        assert!(
            end <= self.area.len(),
            "completion points outside the area: offset {area_offset} len {len}"
        );
        // SAFETY: the range is inside the area; the kernel handed this chunk to user space
        // and will not write it until we return it through the refill ring.
        unsafe {
            std::slice::from_raw_parts(self.area.as_ptr().add(area_offset as usize), len as usize)
        }
    }

    /// Free refill slots right now.
    pub fn refill_space(&self) -> u32 {
        // SAFETY: rq_head points into the live region; the kernel store-releases it.
        let head = unsafe { (*self.rq_head).load(Ordering::Acquire) };
        self.rq_entries() - self.rq_local_tail.wrapping_sub(head)
    }

    /// Queues one buffer return; false (nothing written) if the ring is full.
    pub fn try_refill(&mut self, area_offset: u64, len: u32) -> bool {
        if self.refill_space() == 0 {
            return false;
        }
        let index = (self.rq_local_tail & self.rq_mask) as usize;
        // SAFETY: index < rq_entries, inside the refill ring; the kernel does not read this
        // slot until the tail is published past it.
        unsafe {
            self.rqes.add(index).write(io_uring_zcrx_rqe {
                off: area_offset | self.area_token,
                len,
                __pad: 0,
            });
        }
        self.rq_local_tail = self.rq_local_tail.wrapping_add(1);
        self.unflushed += 1;
        true
    }

    /// Publishes queued returns to the kernel.
    pub fn publish_refills(&mut self) {
        // SAFETY: rq_tail points into the live region; release orders the entry writes.
        unsafe { (*self.rq_tail).store(self.rq_local_tail, Ordering::Release) };
    }

    /// Publishes returns and, in NODEV mode, makes the kernel take them now.
    pub fn flush(&mut self) -> io::Result<()> {
        self.publish_refills();
        if matches!(self.target, Target::Nodev) && self.unflushed > 0 {
            zcrx_flush_rq(self.ring.as_fd(), self.zcrx_id)?;
            self.unflushed = 0;
        }
        Ok(())
    }

    pub fn arm_event(&self, event_type: u32) -> io::Result<()> {
        zcrx_arm_event(self.ring.as_fd(), self.zcrx_id, event_type)
    }

    /// The kernel's shared copy statistics (copy_count, copy_bytes).
    pub fn stats(&self) -> (u64, u64) {
        let stats = self.stats.expect("registered without events: no stats");
        // SAFETY: the stats live in our region; the kernel updates them non-atomically, so
        // each field is read with a relaxed atomic load.
        unsafe {
            let count = &*(std::ptr::addr_of!((*stats).copy_count) as *const AtomicU64);
            let bytes = &*(std::ptr::addr_of!((*stats).copy_bytes) as *const AtomicU64);
            (count.load(Ordering::Relaxed), bytes.load(Ordering::Relaxed))
        }
    }

    /// The region mapping, kept alive for the ring; exposed for layout checks.
    pub fn region_len(&self) -> usize {
        self.region.len()
    }
}

/// What [`receive_all`] or [`receive_streams`] saw.
#[derive(Debug, Default)]
pub struct ReceiveReport {
    /// Bytes received, all streams together.
    pub bytes: u64,
    /// Bytes received per stream, in the order the streams were given.
    pub stream_bytes: Vec<u64>,
    pub data_cqes: u64,
    pub copy_events: u64,
    pub alloc_fail_events: u64,
    pub resubmits_enospc: u64,
    pub resubmits_enomem: u64,
    pub rearms: u64,
}

/// Receives one connection to EOF with multishot RECV_ZC, verifying every byte against the
/// pattern, returning every buffer, resubmitting on -ENOSPC/-ENOMEM, and re-arming the COPY
/// event once after it first fires.
pub fn receive_all(zcrx: &mut RawZcrx, fd: RawFd, expect: u64) -> ReceiveReport {
    let report = receive_streams(zcrx, &[fd], |_, position, data| {
        if let Some(i) = first_mismatch(position, data) {
            panic!("byte {} of the stream is wrong", position + i as u64);
        }
    });
    assert_eq!(report.bytes, expect, "stream length");
    report
}

/// Receives several connections on one zcrx queue to EOF, one multishot RECV_ZC each on the
/// one ring (user_data = the stream's index): `check(stream, position, chunk)` sees every
/// chunk in order before its buffer is returned. Returns every buffer, resubmits a stream's
/// request on -ENOSPC/-ENOMEM, and re-arms the COPY event once after it first fires.
pub fn receive_streams(
    zcrx: &mut RawZcrx,
    fds: &[RawFd],
    mut check: impl FnMut(usize, u64, &[u8]),
) -> ReceiveReport {
    let mut report = ReceiveReport {
        stream_bytes: vec![0; fds.len()],
        ..ReceiveReport::default()
    };
    let mut pending: Vec<(u64, u32)> = Vec::new();
    let mut completions = Vec::new();
    let mut resubmit = Vec::new();
    for (index, &fd) in fds.iter().enumerate() {
        zcrx.submit_recv(fd, 0, index as u64)
            .expect("submit RECV_ZC");
    }
    let mut live = fds.len();
    while live > 0 {
        completions.clear();
        zcrx.wait(&mut completions).expect("io_uring_enter");
        for c in completions.drain(..) {
            match c {
                Completion::Data {
                    user_data,
                    area_offset,
                    len,
                    ..
                } => {
                    let stream = user_data as usize;
                    let position = report.stream_bytes[stream];
                    check(stream, position, zcrx.chunk(area_offset, len));
                    report.stream_bytes[stream] += u64::from(len);
                    report.bytes += u64::from(len);
                    report.data_cqes += 1;
                    pending.push((area_offset, len));
                }
                Completion::Event { event_type } => match event_type {
                    zcrx_sys::event::ZCRX_EVENT_COPY => {
                        report.copy_events += 1;
                        if report.rearms == 0 {
                            zcrx.arm_event(event_type).expect("re-arm COPY");
                            report.rearms += 1;
                        }
                    }
                    zcrx_sys::event::ZCRX_EVENT_ALLOC_FAIL => report.alloc_fail_events += 1,
                    other => panic!("unknown zcrx event type {other}"),
                },
                Completion::End { user_data, res } => {
                    let stream = user_data as usize;
                    match res {
                        0 => live -= 1,
                        res if res == -libc::ENOSPC => {
                            report.resubmits_enospc += 1;
                            resubmit.push(stream);
                        }
                        res if res == -libc::ENOMEM => {
                            report.resubmits_enomem += 1;
                            resubmit.push(stream);
                        }
                        res => panic!(
                            "RECV_ZC of stream {stream} ended with {} after {} bytes",
                            io::Error::from_raw_os_error(-res),
                            report.stream_bytes[stream]
                        ),
                    }
                }
            }
        }
        // Return every buffer; what does not fit now waits for the kernel to make room.
        pending.retain(|&(off, len)| !zcrx.try_refill(off, len));
        zcrx.flush().expect("publish/flush refills");
        // Resubmitted after the returns, which give the kernel room again.
        for stream in resubmit.drain(..) {
            zcrx.submit_recv(fds[stream], 0, stream as u64)
                .expect("resubmit after ENOSPC/ENOMEM");
        }
    }
    assert!(
        pending.is_empty(),
        "{} buffer returns never fit",
        pending.len()
    );
    report
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Makes the socket's close send a reset (SO_LINGER with a zero timeout).
pub fn reset_on_close(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a live linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_misplaced_chunks() {
        let chunk: Vec<u8> = (4096..8192).map(pattern_byte).collect();
        assert_eq!(first_mismatch(4096, &chunk), None);
        assert!(first_mismatch(0, &chunk).is_some());
        assert!(first_mismatch(8192, &chunk).is_some());
    }
}
