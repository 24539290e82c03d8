//! zcrx events and shared-memory statistics (Linux 7.2).
//!
//! Registering with [`io_uring_zcrx_ifq_reg::event_desc`](crate::zcrx::io_uring_zcrx_ifq_reg)
//! pointing to a [`zcrx_event_desc`] asks the kernel to post an ordinary CQE on the
//! registering ring when something of interest happens: `user_data` as registered, `res` the
//! event type (an index such as [`ZCRX_EVENT_COPY`], not a bit), `flags` 0. Each type fires once
//! and then stays silent until re-armed with
//! [`ZCRX_CTRL_ARM_EVENT`](crate::ctrl::ZCRX_CTRL_ARM_EVENT); re-arming a type that has not
//! fired is `EINVAL`. Delivery is best effort, so treat events as wake-ups and [`zcrx_stats`]
//! as the truth.

/// Event type (index): the NIC's page pool found neither refill entries nor free chunks, so
/// the NIC drops packets until buffers come back. Not raised for
/// [`ZCRX_REG_NODEV`](crate::zcrx::ZCRX_REG_NODEV) instances, where exhaustion ends the receive
/// request with `-ENOMEM` instead.
///
/// Available since Linux 7.2.
pub const ZCRX_EVENT_ALLOC_FAIL: u32 = 0;

/// Event type (index): a packet fragment had to be copied into a chunk instead of being
/// received in place.
///
/// Available since Linux 7.2.
pub const ZCRX_EVENT_COPY: u32 = 1;

/// [`zcrx_event_desc::flags`]: [`stats_offset`](zcrx_event_desc::stats_offset) is valid and
/// the kernel maintains a [`zcrx_stats`] there.
///
/// Available since Linux 7.2.
pub const ZCRX_EVENT_DESC_FLAG_STATS: u32 = 1 << 0;

/// Which events to deliver and where to keep statistics. Read by the kernel at registration
/// only.
///
/// Available since Linux 7.2.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_event_desc {
    /// `user_data` of every event CQE; choose a value no request uses.
    pub user_data: u64,
    /// Bit mask of event types to deliver: `1 << ZCRX_EVENT_*`. Events are delivered only if
    /// this is non-zero.
    pub type_mask: u32,
    /// `ZCRX_EVENT_DESC_FLAG_*` flags.
    pub flags: u32,
    /// Offset of a [`zcrx_stats`] from the start of the refill ring region: 8-byte aligned
    /// (else `EINVAL`), at or past the end of the refill entries and inside the region (else
    /// `ERANGE`). Must be 0 without [`ZCRX_EVENT_DESC_FLAG_STATS`].
    pub stats_offset: u64,
    /// Reserved; must be zero.
    pub __resv2: [u64; 9],
}

kernel_layout!(layout_zcrx_event_desc: zcrx_event_desc, size 96, align 8 {
    user_data: 0,
    type_mask: 8,
    flags: 12,
    stats_offset: 16,
    __resv2: 24,
});

/// Copy-fallback counters the kernel keeps in the refill ring region (zeroed at
/// registration).
///
/// The kernel updates each field with plain (non-atomic) stores from whichever context copies;
/// read each one with a relaxed atomic load (`AtomicU64::from_ptr`), and do not expect the pair
/// to be a consistent snapshot. Copies of an skb's linear part are not counted.
///
/// Available since Linux 7.2.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_stats {
    /// Number of copied packet fragments (the header comment says CQEs, but the kernel counts
    /// once per fragment, which may span several CQEs).
    pub copy_count: u64,
    /// Number of bytes copied.
    pub copy_bytes: u64,
}

kernel_layout!(layout_zcrx_stats: zcrx_stats, size 16, align 8 {
    copy_count: 0,
    copy_bytes: 8,
});
