//! zcrx instance registration, receive areas, the refill ring and the receive CQE.
//!
//! A zcrx instance ("interface queue", ifq) binds a NIC receive queue (or, with
//! [`ZCRX_REG_NODEV`], no device at all) to a user memory *area* the kernel receives into, and a
//! *refill ring* through which user space hands consumed chunks back. It is created with
//! [`register_zcrx_ifq`] and lives until its ring (and every exported handle) is closed.

use core::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::register::io_uring_register;
use crate::ring::IORING_REGISTER_ZCRX_IFQ;

/// Bit position where the area id starts inside a CQE or refill entry offset; the bits below
/// are the byte offset inside the area.
///
/// Available since Linux 6.15.
pub const IORING_ZCRX_AREA_SHIFT: u32 = 48;

/// Mask selecting the area-id bits of an offset: `off & !IORING_ZCRX_AREA_MASK` is the byte
/// offset inside the area, `off & IORING_ZCRX_AREA_MASK` the area's
/// [`rq_area_token`](io_uring_zcrx_area_reg::rq_area_token).
///
/// Available since Linux 6.15.
pub const IORING_ZCRX_AREA_MASK: u64 = !((1u64 << IORING_ZCRX_AREA_SHIFT) - 1);

/// [`io_uring_zcrx_area_reg::flags`]: the area is a dma-buf given by
/// [`dmabuf_fd`](io_uring_zcrx_area_reg::dmabuf_fd) instead of user memory at `addr`
/// (`addr` is then the offset into the dma-buf). Such an area is not readable by the kernel, so
/// it has no copy fallback.
///
/// Available since Linux 6.16.
pub const IORING_ZCRX_AREA_DMABUF: u32 = 1;

/// [`io_uring_zcrx_ifq_reg::flags`]: attach to an existing zcrx instance exported by
/// [`ZCRX_CTRL_EXPORT`](crate::ctrl::ZCRX_CTRL_EXPORT) instead of creating one; `if_idx`
/// carries the exported fd and `if_rxq`, `rq_entries`, `area_ptr`, `region_ptr` and
/// `event_desc` must be zero.
///
/// Available since Linux 6.19.
pub const ZCRX_REG_IMPORT: u32 = 1;

/// [`io_uring_zcrx_ifq_reg::flags`]: register without a network device (`if_idx` and `if_rxq`
/// must be 0). Every received byte goes through the copy path, so it works on any TCP socket,
/// loopback included; the refill ring is only consumed on
/// [`ZCRX_CTRL_FLUSH_RQ`](crate::ctrl::ZCRX_CTRL_FLUSH_RQ).
///
/// Available since Linux 7.1.
pub const ZCRX_REG_NODEV: u32 = 2;

/// Feature bit in [`io_uring_query_zcrx::features`](crate::query::io_uring_query_zcrx): the
/// kernel honours [`io_uring_zcrx_ifq_reg::rx_buf_len`] (chunks larger than a page).
///
/// Available since Linux 7.0.
pub const ZCRX_FEATURE_RX_PAGE_SIZE: u32 = 1 << 0;

/// Feature bit in [`io_uring_query_zcrx::features`](crate::query::io_uring_query_zcrx): the
/// kernel honours [`io_uring_zcrx_ifq_reg::event_desc`] (events and
/// [`zcrx_stats`](crate::event::zcrx_stats), see [`event`](crate::event)).
///
/// Available since Linux 7.2.
pub const ZCRX_FEATURE_EVENT: u32 = 1 << 1;

/// Refill ring entry: returns one reference on a chunk to the kernel.
///
/// Available since Linux 6.15.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_zcrx_rqe {
    /// Chunk offset within its area, or-ed with the area's
    /// [`rq_area_token`](io_uring_zcrx_area_reg::rq_area_token).
    pub off: u64,
    /// Length of the returned data; the kernel currently ignores it.
    pub len: u32,
    /// Must be zero; the kernel skips entries where it is not.
    pub __pad: u32,
}

kernel_layout!(layout_io_uring_zcrx_rqe: io_uring_zcrx_rqe, size 16, align 8 {
    off: 0,
    len: 8,
    __pad: 12,
});

/// Upper half of a 32-byte receive CQE: where the `cqe.res` bytes of data are.
///
/// Available since Linux 6.15.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_zcrx_cqe {
    /// Area id (above [`IORING_ZCRX_AREA_SHIFT`]) and byte offset of the data in that area.
    pub off: u64,
    /// Padding; zero.
    pub __pad: u64,
}

kernel_layout!(layout_io_uring_zcrx_cqe: io_uring_zcrx_cqe, size 16, align 8 {
    off: 0,
    __pad: 8,
});

/// Where the refill ring's parts sit inside its region, in bytes from the region start.
/// Written by the kernel on registration.
///
/// Available since Linux 6.15.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_zcrx_offsets {
    /// Offset of the `u32` consumer index, advanced by the kernel (store-release).
    pub head: u32,
    /// Offset of the `u32` producer index, advanced by user space (store-release).
    pub tail: u32,
    /// Offset of the [`io_uring_zcrx_rqe`] array (64 since Linux 6.18, 8 before).
    pub rqes: u32,
    /// Reserved; must be zero.
    pub __resv2: u32,
    /// Reserved; must be zero.
    pub __resv: [u64; 2],
}

kernel_layout!(layout_io_uring_zcrx_offsets: io_uring_zcrx_offsets, size 32, align 8 {
    head: 0,
    tail: 4,
    rqes: 8,
    __resv2: 12,
    __resv: 16,
});

/// Describes the memory the kernel receives into (the "area").
///
/// The kernel writes [`rq_area_token`](Self::rq_area_token) back on registration.
///
/// Available since Linux 6.15 (`dmabuf_fd` since 6.16).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_zcrx_area_reg {
    /// Page-aligned start of the area in user memory (or the offset into the dma-buf).
    pub addr: u64,
    /// Area length in bytes, a multiple of the chunk size.
    pub len: u64,
    /// Must be 0 on input; the kernel writes the value to or into refill entry offsets.
    pub rq_area_token: u64,
    /// 0 or [`IORING_ZCRX_AREA_DMABUF`].
    pub flags: u32,
    /// dma-buf fd when `flags` has [`IORING_ZCRX_AREA_DMABUF`].
    pub dmabuf_fd: u32,
    /// Reserved; must be zero.
    pub __resv2: [u64; 2],
}

kernel_layout!(layout_io_uring_zcrx_area_reg: io_uring_zcrx_area_reg, size 48, align 8 {
    addr: 0,
    len: 8,
    rq_area_token: 16,
    flags: 24,
    dmabuf_fd: 28,
    __resv2: 32,
});

/// Argument of [`IORING_REGISTER_ZCRX_IFQ`]: what to bind, with which memory.
///
/// The kernel writes it back on success: [`offsets`](Self::offsets),
/// [`zcrx_id`](Self::zcrx_id), `rq_entries` rounded up to a power of two and (7.0+)
/// the chunk size in [`rx_buf_len`](Self::rx_buf_len).
///
/// Available since Linux 6.15. Fields that were reserved on older kernels
/// (`rx_buf_len`: 7.0, `event_desc`: 7.2) must be zero there, or registration fails with
/// `EINVAL`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_zcrx_ifq_reg {
    /// Network interface index (0 with [`ZCRX_REG_NODEV`]; the exported fd with
    /// [`ZCRX_REG_IMPORT`]).
    pub if_idx: u32,
    /// Receive queue index on that interface (0 with [`ZCRX_REG_NODEV`]).
    pub if_rxq: u32,
    /// Number of refill ring entries requested; at most 32768 unless the ring was set up with
    /// [`IORING_SETUP_CLAMP`](crate::ring::IORING_SETUP_CLAMP).
    pub rq_entries: u32,
    /// `ZCRX_REG_*` flags.
    pub flags: u32,
    /// Address of an [`io_uring_zcrx_area_reg`] (read and written by the kernel).
    pub area_ptr: u64,
    /// Address of an [`io_uring_region_desc`](crate::region::io_uring_region_desc) for the
    /// refill ring (read and written by the kernel).
    pub region_ptr: u64,
    /// Refill ring layout inside the region; written by the kernel.
    pub offsets: io_uring_zcrx_offsets,
    /// Must be 0 on input; the kernel writes the instance id used in `sqe.zcrx_ifq_idx` and
    /// [`zcrx_ctrl::zcrx_id`](struct@crate::ctrl::zcrx_ctrl).
    pub zcrx_id: u32,
    /// Requested chunk size (a power of two, at least a page; 0 for one page). The kernel
    /// writes back the chunk size in use. Linux 7.0+.
    pub rx_buf_len: u32,
    /// Address of a [`zcrx_event_desc`](crate::event::zcrx_event_desc), or 0 for no events
    /// and no stats. Linux 7.2+.
    pub event_desc: u64,
    /// Reserved; must be zero.
    pub __resv: [u64; 2],
}

kernel_layout!(layout_io_uring_zcrx_ifq_reg: io_uring_zcrx_ifq_reg, size 96, align 8 {
    if_idx: 0,
    if_rxq: 4,
    rq_entries: 8,
    flags: 12,
    area_ptr: 16,
    region_ptr: 24,
    offsets: 32,
    zcrx_id: 64,
    rx_buf_len: 68,
    event_desc: 72,
    __resv: 80,
});

/// Registers a zcrx instance on a ring: `io_uring_register(ring_fd, IORING_REGISTER_ZCRX_IFQ,
/// reg, 1)`.
///
/// The ring must have been set up with
/// [`IORING_SETUP_DEFER_TASKRUN`](crate::ring::IORING_SETUP_DEFER_TASKRUN) and
/// [`IORING_SETUP_CQE32`](crate::ring::IORING_SETUP_CQE32) or
/// [`IORING_SETUP_CQE_MIXED`](crate::ring::IORING_SETUP_CQE_MIXED) (else `EINVAL`), and the
/// caller needs `CAP_NET_ADMIN` (else `EPERM`). On success the kernel has written back `reg`,
/// `*region_ptr` and `*area_ptr` (see their docs).
///
/// # Safety
///
/// Unless `reg.flags` has [`ZCRX_REG_IMPORT`] (then `area_ptr`, `region_ptr` and `event_desc`
/// must be 0 and nothing below applies except the last point):
///
/// - `reg.area_ptr` points to an [`io_uring_zcrx_area_reg`] and `reg.region_ptr` to an
///   [`io_uring_region_desc`](crate::region::io_uring_region_desc), both readable and writable
///   for the duration of the call and not borrowed elsewhere (the kernel writes them back).
/// - `reg.event_desc` is 0 or points to a readable
///   [`zcrx_event_desc`](crate::event::zcrx_event_desc).
/// - The area memory (`addr..addr + len`) and, for a
///   [`IORING_MEM_REGION_TYPE_USER`](crate::region::IORING_MEM_REGION_TYPE_USER) region, the
///   region memory are dedicated to this instance: the kernel (and the NIC, by DMA) writes
///   into them at any time until the ring and every exported handle are closed. No Rust
///   reference to that memory may exist that assumes it does not change; access it only through
///   raw pointers or atomics, and read a chunk only between the CQE that delivers it and the
///   refill entry that returns it. The kernel pins the pages, so unmapping them does not make
///   it write elsewhere, but the memory must stay mapped while user space may read it.
pub unsafe fn register_zcrx_ifq(
    ring_fd: BorrowedFd<'_>,
    reg: &mut io_uring_zcrx_ifq_reg,
) -> io::Result<()> {
    let arg: *mut io_uring_zcrx_ifq_reg = reg;
    // SAFETY: `arg` is a live, exclusive borrow of a correctly laid out struct (nr_args 1 = one
    // struct); the pointers inside it and the memory they describe are vouched for by the
    // caller as documented above.
    unsafe {
        io_uring_register(
            ring_fd.as_raw_fd(),
            IORING_REGISTER_ZCRX_IFQ,
            arg.cast::<c_void>(),
            1,
        )
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_mask_splits_token_from_offset() {
        let token = 3u64 << IORING_ZCRX_AREA_SHIFT;
        let off = token | 0x1234;
        assert_eq!(off & IORING_ZCRX_AREA_MASK, token);
        assert_eq!(off & !IORING_ZCRX_AREA_MASK, 0x1234);
        assert_eq!(IORING_ZCRX_AREA_MASK, 0xffff_0000_0000_0000);
    }
}
