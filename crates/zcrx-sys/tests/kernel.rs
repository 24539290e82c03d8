//! Runs the wrappers against the running kernel and checks the outcome that kernel release
//! must produce. Written for the 6.18 development hosts (no zcrx-capable NIC, zcrx query
//! unsupported) and the 7.x VM tier (query answers, NODEV registration works as root).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::ptr;

use zcrx_sys::ctrl::{zcrx_arm_event, zcrx_export, zcrx_flush_rq};
use zcrx_sys::event::{
    zcrx_event_desc, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY, ZCRX_EVENT_DESC_FLAG_STATS,
};
use zcrx_sys::opcode_probe::probe_opcode_supported;
use zcrx_sys::query::{
    self, io_uring_query_hdr, io_uring_query_opcode, io_uring_query_zcrx, IO_URING_QUERY_OPCODES,
    IO_URING_QUERY_SCQ, IO_URING_QUERY_ZCRX, IO_URING_QUERY_ZCRX_EVENT,
};
use zcrx_sys::region::io_uring_region_desc;
use zcrx_sys::ring::{
    IORING_OP_RECV_ZC, IORING_REGISTER_QUERY, IORING_REGISTER_ZCRX_CTRL, IORING_SETUP_CQE32,
    IORING_SETUP_CQE_MIXED, IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER,
};
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_ifq_reg, register_zcrx_ifq, IORING_ZCRX_AREA_DMABUF,
    ZCRX_FEATURE_EVENT, ZCRX_FEATURE_RX_PAGE_SIZE, ZCRX_REG_IMPORT, ZCRX_REG_NODEV,
};

/// (major, minor) of the running kernel, from `uname -r`.
fn kernel() -> (u32, u32) {
    // SAFETY: `utsname` is plain bytes, so all-zero is a valid value for `uname` to overwrite.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable `utsname`.
    assert_eq!(unsafe { libc::uname(&mut uts) }, 0, "uname failed");
    // SAFETY: the kernel NUL-terminates `release` within the array.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) }
        .to_str()
        .expect("release is ASCII");
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok()).expect("major");
    let minor = parts.next().and_then(|p| p.parse().ok()).expect("minor");
    (major, minor)
}

fn at_least(major: u32, minor: u32) -> bool {
    kernel() >= (major, minor)
}

fn errno<T: std::fmt::Debug>(result: io::Result<T>) -> i32 {
    result
        .expect_err("expected an error")
        .raw_os_error()
        .expect("an errno")
}

/// A ring from raw `io_uring_setup`, without mapping its queues: registration needs only the
/// fd.
fn ring(flags: u32) -> OwnedFd {
    // `struct io_uring_params` is 120 bytes; `flags` is its third u32. Everything else zero.
    let mut params = [0u32; 30];
    params[2] = flags;
    // SAFETY: `params` is a writable buffer of the size the kernel reads and writes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            8 as libc::c_long,
            params.as_mut_ptr(),
        )
    };
    assert!(fd >= 0, "io_uring_setup: {}", io::Error::last_os_error());
    // SAFETY: io_uring_setup returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The flags a zcrx ring needs.
const ZCRX_RING: u32 = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQE32;

fn has_cap_net_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line");
    let caps = u64::from_str_radix(eff.trim(), 16).expect("hex caps");
    caps & (1 << 12) != 0 // CAP_NET_ADMIN
}

#[test]
fn probe_reports_recv_zc_from_6_15() {
    let ring = ring(0);
    assert_eq!(
        probe_opcode_supported(ring.as_fd(), IORING_OP_RECV_ZC).unwrap(),
        at_least(6, 15)
    );
    assert!(
        probe_opcode_supported(ring.as_fd(), 0).unwrap(),
        "IORING_OP_NOP"
    );
    assert!(!probe_opcode_supported(ring.as_fd(), 255).unwrap());
}

#[test]
fn opcodes_query_describes_the_kernel() {
    let result = query::query_opcodes();
    if !at_least(6, 18) {
        assert!(matches!(errno(result), libc::EINVAL | libc::EBADF));
        return;
    }
    let ops = result.unwrap();
    assert!(
        ops.nr_request_opcodes > u32::from(IORING_OP_RECV_ZC),
        "{ops:?}"
    );
    assert!(ops.nr_register_opcodes > IORING_REGISTER_QUERY, "{ops:?}");
    assert_eq!(
        ops.nr_register_opcodes > IORING_REGISTER_ZCRX_CTRL,
        at_least(6, 19),
        "{ops:?}"
    );
    assert_ne!(
        ops.ring_setup_flags & u64::from(IORING_SETUP_CQE_MIXED),
        0,
        "{ops:?}"
    );
    assert_ne!(
        ops.ring_setup_flags & u64::from(IORING_SETUP_DEFER_TASKRUN),
        0,
        "{ops:?}"
    );
    assert_ne!(ops.feature_flags, 0, "{ops:?}");
    assert!(ops.nr_query_opcodes > IO_URING_QUERY_OPCODES, "{ops:?}");
}

#[test]
fn zcrx_query_matches_kernel_release() {
    let result = query::query_zcrx();
    if !at_least(6, 18) {
        assert!(matches!(errno(result), libc::EINVAL | libc::EBADF));
        return;
    }
    if !at_least(6, 19) {
        assert_eq!(errno(result), libc::EOPNOTSUPP);
        return;
    }
    let zcrx = result.unwrap();
    assert_ne!(
        zcrx.register_flags & u64::from(ZCRX_REG_IMPORT),
        0,
        "{zcrx:?}"
    );
    assert_ne!(
        zcrx.area_flags & u64::from(IORING_ZCRX_AREA_DMABUF),
        0,
        "{zcrx:?}"
    );
    assert!(
        zcrx.nr_ctrl_opcodes >= 2,
        "FLUSH_RQ and EXPORT exist: {zcrx:?}"
    );
    assert!(zcrx.rq_hdr_size > 0, "{zcrx:?}");
    assert!(zcrx.rq_hdr_alignment.is_power_of_two(), "{zcrx:?}");
    assert_eq!(
        zcrx.features & ZCRX_FEATURE_RX_PAGE_SIZE != 0,
        at_least(7, 0),
        "{zcrx:?}"
    );
    assert_eq!(
        zcrx.register_flags & u64::from(ZCRX_REG_NODEV) != 0,
        at_least(7, 1),
        "{zcrx:?}"
    );
    assert_eq!(
        zcrx.features & ZCRX_FEATURE_EVENT != 0,
        at_least(7, 2),
        "{zcrx:?}"
    );
    if at_least(7, 2) {
        assert!(zcrx.nr_ctrl_opcodes >= 3, "ARM_EVENT exists: {zcrx:?}");
    }
}

#[test]
fn zcrx_event_query_matches_kernel_release() {
    let result = query::query_zcrx_event();
    if !at_least(6, 18) {
        assert!(matches!(errno(result), libc::EINVAL | libc::EBADF));
        return;
    }
    if !at_least(7, 2) {
        assert_eq!(errno(result), libc::EOPNOTSUPP);
        return;
    }
    let ev = result.unwrap();
    let both = (1 << ZCRX_EVENT_ALLOC_FAIL) | (1 << ZCRX_EVENT_COPY);
    assert_eq!(ev.event_flags & both, both, "{ev:?}");
    assert_eq!(ev.stats_size, 16, "{ev:?}");
    assert_eq!(ev.stats_off_alignment, 8, "{ev:?}");
}

/// Every op below the kernel's reported query op count answers; SCQ's release is inferred, so
/// this is where it gets checked.
#[test]
fn every_reported_query_op_answers() {
    if !at_least(6, 18) {
        return;
    }
    let ops = query::query_opcodes().unwrap();
    let supported = |op: u32| ops.nr_query_opcodes > op;
    assert_eq!(query::query_zcrx().is_ok(), supported(IO_URING_QUERY_ZCRX));
    assert_eq!(
        query::query_zcrx_event().is_ok(),
        supported(IO_URING_QUERY_ZCRX_EVENT)
    );
    match query::query_scq() {
        Ok(scq) => {
            assert!(supported(IO_URING_QUERY_SCQ));
            assert!(scq.hdr_size > 0, "{scq:?}");
            assert!(scq.hdr_alignment.is_power_of_two(), "{scq:?}");
        }
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
            assert!(!supported(IO_URING_QUERY_SCQ));
        }
    }
}

/// The kernel reports each entry's outcome in its own header and keeps walking the chain.
#[test]
fn query_chain_reports_per_entry_results() {
    if !at_least(6, 18) {
        return;
    }
    let mut opcodes = io_uring_query_opcode::default();
    let mut zcrx = io_uring_query_zcrx::default();
    let mut bad = io_uring_query_opcode::default();
    let mut second = io_uring_query_hdr::for_data(IO_URING_QUERY_ZCRX, &mut zcrx);
    // A non-zero `result` on input is rejected for that entry only.
    let mut third = io_uring_query_hdr::for_data(IO_URING_QUERY_OPCODES, &mut bad);
    third.result = 1;
    second.next_entry = ptr::addr_of_mut!(third) as u64;
    let mut first = io_uring_query_hdr::for_data(IO_URING_QUERY_OPCODES, &mut opcodes);
    first.next_entry = ptr::addr_of_mut!(second) as u64;

    // SAFETY: three live headers linked in a finite chain, each pointing to a local result
    // struct of the size it states; none is borrowed during the call.
    unsafe { query::query(&mut first) }.unwrap();

    assert_eq!(
        first.io_result().unwrap() as usize,
        size_of::<io_uring_query_opcode>()
    );
    assert!(opcodes.nr_request_opcodes > 0);
    let second_outcome = second.io_result();
    if at_least(6, 19) {
        assert_eq!(
            second_outcome.unwrap() as usize,
            size_of::<io_uring_query_zcrx>()
        );
    } else {
        assert_eq!(errno(second_outcome), libc::EOPNOTSUPP);
        assert_eq!(second.size, 0);
    }
    assert_eq!(errno(third.io_result()), libc::EINVAL);
    assert_eq!(bad, io_uring_query_opcode::default());
}

#[test]
fn zcrx_ctrl_without_an_instance_fails() {
    let ring = ring(ZCRX_RING);
    // Before 6.19 the register opcode does not exist; after, zcrx_id 0 names no instance.
    let expected = if at_least(6, 19) {
        libc::ENXIO
    } else {
        libc::EINVAL
    };
    assert_eq!(errno(zcrx_flush_rq(ring.as_fd(), 0)), expected);
    assert_eq!(
        errno(zcrx_arm_event(ring.as_fd(), 0, ZCRX_EVENT_COPY)),
        expected
    );
    assert_eq!(errno(zcrx_export(ring.as_fd(), 0)), expected);
}

#[test]
fn register_rejects_ring_without_defer_taskrun() {
    let ring = ring(0);
    let mut area = io_uring_zcrx_area_reg::default();
    let mut region = io_uring_region_desc::default();
    let mut reg = io_uring_zcrx_ifq_reg {
        rq_entries: 64,
        area_ptr: ptr::addr_of_mut!(area) as u64,
        region_ptr: ptr::addr_of_mut!(region) as u64,
        ..Default::default()
    };
    // SAFETY: area and region point to live locals not borrowed during the call; the kernel
    // rejects the ring before it would pin any memory (and the area is empty).
    let result = unsafe { register_zcrx_ifq(ring.as_fd(), &mut reg) };
    let expected = if at_least(6, 15) && !has_cap_net_admin() {
        libc::EPERM
    } else {
        libc::EINVAL
    };
    assert_eq!(errno(result), expected);
}

/// Anonymous memory handed to the kernel as a zcrx area; never referenced from Rust.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Mapping { addr, len }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; the kernel keeps its own pins.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// A device-less registration: rejected as an unknown flag before 7.1, a working instance after
/// (with events and stats on 7.2+). Needs CAP_NET_ADMIN to reach the flag checks.
#[test]
fn nodev_registration_matches_kernel_release() {
    if !at_least(6, 15) || !has_cap_net_admin() {
        return;
    }
    let page = 4096;
    let area_mem = Mapping::new(16 * page);
    let ring = ring(ZCRX_RING);
    let mut area = io_uring_zcrx_area_reg {
        addr: area_mem.addr as u64,
        len: area_mem.len as u64,
        ..Default::default()
    };
    // Kernel-allocated refill region: one page holds the header and 64 entries, with room for
    // the stats at 2048.
    let mut region = io_uring_region_desc {
        size: page as u64,
        ..Default::default()
    };
    let mut events = zcrx_event_desc {
        user_data: u64::MAX,
        type_mask: (1 << ZCRX_EVENT_ALLOC_FAIL) | (1 << ZCRX_EVENT_COPY),
        flags: ZCRX_EVENT_DESC_FLAG_STATS,
        stats_offset: 2048,
        ..Default::default()
    };
    let with_events = at_least(7, 2);
    let mut reg = io_uring_zcrx_ifq_reg {
        rq_entries: 60,
        flags: ZCRX_REG_NODEV,
        area_ptr: ptr::addr_of_mut!(area) as u64,
        region_ptr: ptr::addr_of_mut!(region) as u64,
        event_desc: if with_events {
            ptr::addr_of_mut!(events) as u64
        } else {
            0
        },
        ..Default::default()
    };
    // SAFETY: area, region and events are live locals not borrowed during the call; the area
    // memory is a private mapping nothing in Rust references, and it outlives the ring
    // (`ring` is dropped before `area_mem`).
    let result = unsafe { register_zcrx_ifq(ring.as_fd(), &mut reg) };
    if !at_least(7, 1) {
        assert_eq!(errno(result), libc::EINVAL);
        return;
    }
    result.unwrap();
    assert_eq!(reg.rq_entries, 64, "rounded up to a power of two");
    assert!(
        reg.offsets.rqes >= 8 && reg.offsets.head != reg.offsets.tail,
        "{reg:?}"
    );
    assert_eq!(area.rq_area_token, 0, "first area has id 0");
    assert_ne!(region.mmap_offset, 0, "kernel-allocated region is mappable");
    if at_least(7, 0) {
        assert_eq!(reg.rx_buf_len, page as u32);
    }

    zcrx_flush_rq(ring.as_fd(), reg.zcrx_id).unwrap();
    let exported = zcrx_export(ring.as_fd(), reg.zcrx_id).unwrap();
    drop(exported);
    // Nothing has fired, so there is nothing to re-arm (7.2+); before, the op is unknown.
    let arm = zcrx_arm_event(ring.as_fd(), reg.zcrx_id, ZCRX_EVENT_COPY);
    let expected = if with_events {
        libc::EINVAL
    } else {
        libc::EOPNOTSUPP
    };
    assert_eq!(errno(arm), expected);
    drop(ring);
    drop(area_mem);
}
