//! Opcode support: `IORING_REGISTER_PROBE` (Linux 5.6).

use core::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::register::io_uring_register;
use crate::ring::IORING_REGISTER_PROBE;

/// [`io_uring_probe_op::flags`]: the kernel supports this opcode.
///
/// Available since Linux 5.6.
pub const IO_URING_OP_SUPPORTED: u16 = 1 << 0;

/// Support information for one SQE opcode.
///
/// Available since Linux 5.6.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_probe_op {
    /// The opcode.
    pub op: u8,
    /// Reserved; zero.
    pub resv: u8,
    /// `IO_URING_OP_*` flags.
    pub flags: u16,
    /// Reserved; zero.
    pub resv2: u32,
}

kernel_layout!(layout_io_uring_probe_op: io_uring_probe_op, size 8, align 4 {
    op: 0,
    resv: 1,
    flags: 2,
    resv2: 4,
});

/// Header of the `IORING_REGISTER_PROBE` argument, followed in memory by `nr_args`
/// [`io_uring_probe_op`] entries (the kernel's flexible array member). The whole buffer must
/// be zero on input (else `EINVAL`).
///
/// Available since Linux 5.6.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_probe {
    /// Highest opcode the kernel knows.
    pub last_op: u8,
    /// Number of entries the kernel filled in `ops`.
    pub ops_len: u8,
    /// Reserved; zero.
    pub resv: u16,
    /// Reserved; zero.
    pub resv2: [u32; 3],
    /// Start of the entries that follow the header.
    pub ops: [io_uring_probe_op; 0],
}

kernel_layout!(layout_io_uring_probe: io_uring_probe, size 16, align 4 {
    last_op: 0,
    ops_len: 1,
    resv: 2,
    resv2: 4,
    ops: 16,
});

/// The kernel clamps larger counts to its own opcode count and rejects more than 256.
const PROBE_OPS: usize = 256;

#[repr(C)]
struct ProbeBuffer {
    header: io_uring_probe,
    ops: [io_uring_probe_op; PROBE_OPS],
}

/// Reports whether the kernel behind `ring_fd` supports SQE opcode `opcode` (e.g.
/// [`IORING_OP_RECV_ZC`](crate::ring::IORING_OP_RECV_ZC)).
///
/// Opcode support is a property of the kernel, but the probe is only available on a ring.
///
/// Available since Linux 5.6.
pub fn probe_opcode_supported(ring_fd: BorrowedFd<'_>, opcode: u8) -> io::Result<bool> {
    let mut probe = ProbeBuffer {
        header: io_uring_probe::default(),
        ops: [io_uring_probe_op::default(); PROBE_OPS],
    };
    let arg: *mut ProbeBuffer = &mut probe;
    // SAFETY: `arg` points to a zeroed header followed directly (repr(C), no padding: header
    // is 16 bytes, entries are 4-aligned) by `PROBE_OPS` entries, which is the `nr_args` the
    // kernel may write; `probe` is not otherwise borrowed during the call.
    unsafe {
        io_uring_register(
            ring_fd.as_raw_fd(),
            IORING_REGISTER_PROBE,
            arg.cast::<c_void>(),
            PROBE_OPS as u32,
        )
    }?;
    let filled = usize::from(probe.header.ops_len).min(PROBE_OPS);
    Ok(probe.ops[..filled]
        .get(usize::from(opcode))
        .is_some_and(|op| op.flags & IO_URING_OP_SUPPORTED != 0))
}
