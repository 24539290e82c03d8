//! io_uring memory regions, which hold the zcrx refill ring.

/// [`io_uring_region_desc::flags`] value: the region is user memory at
/// [`user_addr`](io_uring_region_desc::user_addr) (page aligned) instead of memory the kernel
/// allocates and the user then maps from the ring fd at
/// [`mmap_offset`](io_uring_region_desc::mmap_offset).
///
/// Available since Linux 6.13.
pub const IORING_MEM_REGION_TYPE_USER: u32 = 1;

/// Describes a memory region shared between user space and the kernel (for zcrx: the refill
/// ring, its head/tail header and, on 7.2+, the [`zcrx_stats`](crate::event::zcrx_stats)).
///
/// The kernel writes this struct back on successful registration, so it must be writable.
///
/// Available since Linux 6.13.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct io_uring_region_desc {
    /// Start of user memory when `flags` has [`IORING_MEM_REGION_TYPE_USER`]; else 0.
    pub user_addr: u64,
    /// Region size in bytes (a multiple of the page size).
    pub size: u64,
    /// [`IORING_MEM_REGION_TYPE_USER`] or 0 (kernel-allocated memory).
    pub flags: u32,
    /// Region id; written by the kernel.
    pub id: u32,
    /// Offset to pass to `mmap` on the ring fd to map a kernel-allocated region; written by
    /// the kernel.
    pub mmap_offset: u64,
    /// Reserved; must be zero.
    pub __resv: [u64; 4],
}

kernel_layout!(layout_io_uring_region_desc: io_uring_region_desc, size 64, align 8 {
    user_addr: 0,
    size: 8,
    flags: 16,
    id: 20,
    mmap_offset: 24,
    __resv: 32,
});
