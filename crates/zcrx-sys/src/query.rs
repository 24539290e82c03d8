//! Ring-less capability queries: `IORING_REGISTER_QUERY` (Linux 6.18).
//!
//! A query is a chain of [`io_uring_query_hdr`] entries linked by
//! [`next_entry`](io_uring_query_hdr::next_entry), each pointing to a result struct. It is run
//! with `io_uring_register(-1, IORING_REGISTER_QUERY, first_hdr, 0)`: no ring is needed.
//!
//! The kernel walks the chain entry by entry and reports each entry's outcome in that entry's
//! header ([`result`](io_uring_query_hdr::result): 0 or a negative errno, such as `EOPNOTSUPP`
//! for a query op the running kernel does not know; [`size`](io_uring_query_hdr::size): bytes
//! written). The system call itself fails only when the chain cannot be walked (`EFAULT`, `E2BIG`
//! for an entry `size` above a page, `ERANGE` after 1000 entries, `EINTR`) or `nr_args` is not
//! 0 (`EINVAL`). Kernels without the query interface fail the call with `EINVAL` (6.13 to
//! 6.17) or `EBADF` (before 6.13).
//!
//! Result structs only grow: fields the running kernel does not know are zeroed, so a zero
//! field can mean "not supported" or "not reported". The safe helpers here ([`query_opcodes`],
//! [`query_zcrx`], [`query_zcrx_event`], [`query_scq`]) run a one-entry chain.

use core::ffi::c_void;
use std::io;

use crate::register::io_uring_register;
use crate::ring::IORING_REGISTER_QUERY;

/// Query op: general io_uring capabilities, into [`io_uring_query_opcode`].
///
/// Available since Linux 6.18.
pub const IO_URING_QUERY_OPCODES: u32 = 0;

/// Query op: zcrx capabilities, into [`io_uring_query_zcrx`].
///
/// Available since Linux 6.19 (6.18 answers `EOPNOTSUPP` in the header's `result`).
pub const IO_URING_QUERY_ZCRX: u32 = 1;

/// Query op: SQ/CQ ring header size and alignment, into [`io_uring_query_scq`].
///
/// Available since Linux 6.19 (inferred: numbered between the 6.19 zcrx op and the 7.2 zcrx
/// events op).
pub const IO_URING_QUERY_SCQ: u32 = 2;

/// Query op: zcrx event and stats support, into [`io_uring_query_zcrx_event`].
///
/// Available since Linux 7.2.
pub const IO_URING_QUERY_ZCRX_EVENT: u32 = 3;

/// One entry of a query chain.
///
/// On input `result` and `__resv` must be zero and `size` non-zero (else the entry's `result`
/// is `-EINVAL`), so reset `result` before reusing a header.
///
/// Available since Linux 6.18.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_query_hdr {
    /// Address of the next header, or 0 to end the chain.
    pub next_entry: u64,
    /// Address of the result struct for this entry.
    pub query_data: u64,
    /// `IO_URING_QUERY_*` op.
    pub query_op: u32,
    /// In: size of the result struct (at most one page). Out: bytes the kernel wrote.
    pub size: u32,
    /// Out: 0, or a negative errno for this entry only.
    pub result: i32,
    /// Reserved; must be zero.
    pub __resv: [u32; 3],
}

kernel_layout!(layout_io_uring_query_hdr: io_uring_query_hdr, size 40, align 8 {
    next_entry: 0,
    query_data: 8,
    query_op: 16,
    size: 20,
    result: 24,
    __resv: 28,
});

impl io_uring_query_hdr {
    /// A single-entry header for `query_op`, with `data` as its result struct.
    ///
    /// Only records the address and size of `data`; running the query is [`query`]'s job, and
    /// `data` must still be valid (and not borrowed) then.
    pub fn for_data<T>(query_op: u32, data: &mut T) -> Self {
        io_uring_query_hdr {
            query_op,
            query_data: data as *mut T as u64,
            size: u32::try_from(size_of::<T>()).unwrap_or(u32::MAX),
            ..Default::default()
        }
    }

    /// This entry's outcome after [`query`]: the number of bytes written, or the entry's
    /// error.
    pub fn io_result(&self) -> io::Result<u32> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.size)
        }
    }
}

/// Result of [`IO_URING_QUERY_OPCODES`].
///
/// Available since Linux 6.18.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_query_opcode {
    /// Number of SQE opcodes (`IORING_OP_*`) the kernel knows; all below it exist.
    pub nr_request_opcodes: u32,
    /// Number of `io_uring_register` opcodes the kernel knows; all below it exist.
    pub nr_register_opcodes: u32,
    /// Supported `IORING_FEAT_*` bits.
    pub feature_flags: u64,
    /// Supported `IORING_SETUP_*` bits.
    pub ring_setup_flags: u64,
    /// Supported `IORING_ENTER_*` bits.
    pub enter_flags: u64,
    /// Supported `IOSQE_*` bits.
    pub sqe_flags: u64,
    /// Number of query ops (`IO_URING_QUERY_*`) the kernel knows.
    pub nr_query_opcodes: u32,
    /// Padding; zero.
    pub __pad: u32,
}

kernel_layout!(layout_io_uring_query_opcode: io_uring_query_opcode, size 48, align 8 {
    nr_request_opcodes: 0,
    nr_register_opcodes: 4,
    feature_flags: 8,
    ring_setup_flags: 16,
    enter_flags: 24,
    sqe_flags: 32,
    nr_query_opcodes: 40,
    __pad: 44,
});

/// Result of [`IO_URING_QUERY_ZCRX`].
///
/// Available since Linux 6.19.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_query_zcrx {
    /// Supported `ZCRX_REG_*` registration flags.
    pub register_flags: u64,
    /// Supported `IORING_ZCRX_AREA_*` area flags.
    pub area_flags: u64,
    /// Number of `ZCRX_CTRL_*` ops the kernel knows; all below it exist.
    pub nr_ctrl_opcodes: u32,
    /// Supported `ZCRX_FEATURE_*` bits.
    pub features: u32,
    /// Size of the refill ring header (head and tail) that precedes the entries.
    pub rq_hdr_size: u32,
    /// Alignment the refill ring header needs.
    pub rq_hdr_alignment: u32,
    /// Reserved; zero.
    pub __resv2: u64,
}

kernel_layout!(layout_io_uring_query_zcrx: io_uring_query_zcrx, size 40, align 8 {
    register_flags: 0,
    area_flags: 8,
    nr_ctrl_opcodes: 16,
    features: 20,
    rq_hdr_size: 24,
    rq_hdr_alignment: 28,
    __resv2: 32,
});

/// Result of [`IO_URING_QUERY_ZCRX_EVENT`].
///
/// Available since Linux 7.2.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_query_zcrx_event {
    /// Supported event types as a bit mask: `1 << ZCRX_EVENT_*`.
    pub event_flags: u32,
    /// Size of [`zcrx_stats`](crate::event::zcrx_stats).
    pub stats_size: u32,
    /// Alignment required of
    /// [`zcrx_event_desc::stats_offset`](crate::event::zcrx_event_desc::stats_offset).
    pub stats_off_alignment: u32,
    /// Reserved; zero.
    pub __resv1: u32,
    /// Reserved; zero.
    pub __resv2: [u64; 4],
}

kernel_layout!(layout_io_uring_query_zcrx_event: io_uring_query_zcrx_event, size 48, align 8 {
    event_flags: 0,
    stats_size: 4,
    stats_off_alignment: 8,
    __resv1: 12,
    __resv2: 16,
});

/// Result of [`IO_URING_QUERY_SCQ`].
///
/// Available since Linux 6.19 (inferred, see [`IO_URING_QUERY_SCQ`]).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_query_scq {
    /// Size of the SQ/CQ rings header.
    pub hdr_size: u64,
    /// Alignment the header needs.
    pub hdr_alignment: u64,
}

kernel_layout!(layout_io_uring_query_scq: io_uring_query_scq, size 16, align 8 {
    hdr_size: 0,
    hdr_alignment: 8,
});

/// Runs the query chain starting at `hdr`: `io_uring_register(-1, IORING_REGISTER_QUERY, hdr,
/// 0)`.
///
/// `Ok` means the chain was walked; each entry's own outcome is in its header (see
/// [`io_uring_query_hdr::io_result`]).
///
/// # Safety
///
/// For `hdr` and every header reachable through `next_entry` (which must be a valid
/// `io_uring_query_hdr` address or 0): `query_data` points to at least `size` bytes that are
/// readable and writable and hold a type for which any bytes are valid; none of that memory,
/// nor any header after the first, is borrowed elsewhere during the call.
pub unsafe fn query(hdr: &mut io_uring_query_hdr) -> io::Result<()> {
    let arg: *mut io_uring_query_hdr = hdr;
    // SAFETY: `arg` is an exclusive borrow of a header; the memory it and the rest of the
    // chain point to is vouched for by the caller. fd -1 selects the ring-less path.
    unsafe { io_uring_register(-1, IORING_REGISTER_QUERY, arg.cast::<c_void>(), 0) }?;
    Ok(())
}

/// The result structs this module's safe helpers may hand to the kernel: plain integers only,
/// so any bytes the kernel writes form a valid value.
trait QueryResult: Default {
    const OP: u32;
}

impl QueryResult for io_uring_query_opcode {
    const OP: u32 = IO_URING_QUERY_OPCODES;
}

impl QueryResult for io_uring_query_zcrx {
    const OP: u32 = IO_URING_QUERY_ZCRX;
}

impl QueryResult for io_uring_query_zcrx_event {
    const OP: u32 = IO_URING_QUERY_ZCRX_EVENT;
}

impl QueryResult for io_uring_query_scq {
    const OP: u32 = IO_URING_QUERY_SCQ;
}

fn query_single<T: QueryResult>() -> io::Result<T> {
    let mut data = T::default();
    let mut hdr = io_uring_query_hdr::for_data(T::OP, &mut data);
    // SAFETY: a one-entry chain (`next_entry` 0) whose `query_data` is `data`, a local of
    // exactly `size` bytes that nothing borrows during the call, and `QueryResult` types are
    // plain integers.
    unsafe { query(&mut hdr) }?;
    hdr.io_result()?;
    Ok(data)
}

/// Queries general io_uring capabilities ([`IO_URING_QUERY_OPCODES`]).
///
/// Available since Linux 6.18.
pub fn query_opcodes() -> io::Result<io_uring_query_opcode> {
    query_single()
}

/// Queries zcrx capabilities ([`IO_URING_QUERY_ZCRX`]); the entry's negative `result` becomes
/// the error (`EOPNOTSUPP` on 6.18).
///
/// Available since Linux 6.19.
pub fn query_zcrx() -> io::Result<io_uring_query_zcrx> {
    query_single()
}

/// Queries zcrx event and stats support ([`IO_URING_QUERY_ZCRX_EVENT`]); `EOPNOTSUPP` before
/// 7.2.
///
/// Available since Linux 7.2.
pub fn query_zcrx_event() -> io::Result<io_uring_query_zcrx_event> {
    query_single()
}

/// Queries the SQ/CQ ring header size and alignment ([`IO_URING_QUERY_SCQ`]).
///
/// Available since Linux 6.19 (inferred, see [`IO_URING_QUERY_SCQ`]).
pub fn query_scq() -> io::Result<io_uring_query_scq> {
    query_single()
}
