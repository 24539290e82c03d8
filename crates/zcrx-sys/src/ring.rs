//! Ring-level io_uring constants that zcrx depends on.
//!
//! The `io-uring` crate covers most of the ring ABI; this module declares the pieces a zcrx
//! user needs that it lacks (CQE_MIXED, the query and control register opcodes) plus the
//! ones zcrx cannot work without, so that this crate is self-consistent on its own.

/// SQE opcode of a zero-copy receive request (`IORING_OP_RECV_ZC`).
///
/// Goes in `sqe.opcode`; the request also needs [`IORING_RECV_MULTISHOT`] in `sqe.ioprio` and
/// the zcrx instance id in `sqe.zcrx_ifq_idx`.
///
/// Available since Linux 6.15.
pub const IORING_OP_RECV_ZC: u8 = 58;

/// Receive flag for `sqe.ioprio`: keep the request armed and post one CQE per received chunk,
/// each with [`IORING_CQE_F_MORE`] until the final one.
///
/// Mandatory for [`IORING_OP_RECV_ZC`], even when `sqe.len` limits the request to a few bytes.
///
/// Available since Linux 6.0.
pub const IORING_RECV_MULTISHOT: u16 = 1 << 1;

/// Setup flag: clamp too-large sizes instead of failing with `EINVAL`; for zcrx this also
/// clamps `rq_entries` to the kernel maximum (32768).
///
/// Available since Linux 5.6.
pub const IORING_SETUP_CLAMP: u32 = 1 << 4;

/// Setup flag: 32-byte CQEs. A zcrx ring needs this or [`IORING_SETUP_CQE_MIXED`], because
/// each receive CQE carries an [`io_uring_zcrx_cqe`](crate::zcrx::io_uring_zcrx_cqe) in its
/// upper half.
///
/// Available since Linux 5.19.
pub const IORING_SETUP_CQE32: u32 = 1 << 11;

/// Setup flag: only one task submits and registers on this ring. Every `io_uring_enter` and
/// `io_uring_register` (including the zcrx control operations) must then come from the task
/// that created the ring, otherwise `EEXIST`.
///
/// Available since Linux 6.0.
pub const IORING_SETUP_SINGLE_ISSUER: u32 = 1 << 12;

/// Setup flag: run deferred completion work only when the owner task enters the ring to wait
/// for completions. Mandatory for zcrx registration (else `EINVAL`); requires
/// [`IORING_SETUP_SINGLE_ISSUER`].
///
/// Available since Linux 6.1.
pub const IORING_SETUP_DEFER_TASKRUN: u32 = 1 << 13;

/// Setup flag: the CQ ring holds both 16-byte and 32-byte CQEs; a 32-byte one has
/// [`IORING_CQE_F_32`] set. Accepted by zcrx registration in place of
/// [`IORING_SETUP_CQE32`].
///
/// Available since Linux 6.18.
pub const IORING_SETUP_CQE_MIXED: u32 = 1 << 18;

/// CQE flag: the request that produced this CQE stays active and will post more CQEs.
/// A multishot receive ends with a CQE that lacks it.
///
/// Available since Linux 5.13.
pub const IORING_CQE_F_MORE: u32 = 1 << 1;

/// CQE flag on a [`IORING_SETUP_CQE_MIXED`] ring: this CQE is padding (placed so that a
/// 32-byte CQE does not wrap around the end of the ring); skip it without interpreting it.
///
/// Available since Linux 6.18.
pub const IORING_CQE_F_SKIP: u32 = 1 << 5;

/// CQE flag on a [`IORING_SETUP_CQE_MIXED`] ring: this CQE is 32 bytes long, so the next one
/// starts two slots later.
///
/// Available since Linux 6.18.
pub const IORING_CQE_F_32: u32 = 1 << 15;

/// `io_uring_register` opcode: report which SQE opcodes the kernel supports, into an
/// [`io_uring_probe`](crate::opcode_probe::io_uring_probe).
///
/// Available since Linux 5.6.
pub const IORING_REGISTER_PROBE: u32 = 8;

/// `io_uring_register` opcode: register a zcrx interface queue (an "ifq") with
/// [`io_uring_zcrx_ifq_reg`](crate::zcrx::io_uring_zcrx_ifq_reg) as the argument, `nr_args` 1.
///
/// Available since Linux 6.15.
pub const IORING_REGISTER_ZCRX_IFQ: u32 = 32;

/// `io_uring_register` opcode: query kernel capabilities through a chain of
/// [`io_uring_query_hdr`](crate::query::io_uring_query_hdr); `fd` -1 (no ring), `nr_args` 0.
///
/// Available since Linux 6.18.
pub const IORING_REGISTER_QUERY: u32 = 35;

/// `io_uring_register` opcode: run a zcrx control operation described by
/// [`zcrx_ctrl`](struct@crate::ctrl::zcrx_ctrl); `nr_args` 0.
///
/// Available since Linux 6.19. Earlier kernels reject the opcode itself with `EINVAL`.
pub const IORING_REGISTER_ZCRX_CTRL: u32 = 36;

/// SQE opcode of a zero-copy send (`IORING_OP_SEND_ZC`): like `send(2)`, but the kernel
/// may read the buffer until it posts a notification CQE ([`IORING_CQE_F_NOTIF`]), so the
/// memory must stay unchanged until then.
///
/// Available since Linux 6.0.
pub const IORING_OP_SEND_ZC: u8 = 47;

/// Send flag for `sqe.ioprio` of [`IORING_OP_SEND_ZC`]: `sqe.buf_index` names a buffer
/// registered with `IORING_REGISTER_BUFFERS`, and `sqe.addr..sqe.addr + sqe.len` must lie
/// inside it (no per-send page pinning).
///
/// Available since Linux 6.0 (for `SEND_ZC`).
pub const IORING_RECVSEND_FIXED_BUF: u16 = 1 << 2;

/// Send flag for `sqe.ioprio` of [`IORING_OP_SEND_ZC`]: the notification's `res` carries
/// [`IORING_NOTIF_USAGE_ZC_COPIED`] if the kernel copied the bytes after all (loopback, a
/// device without scatter-gather), or sent none.
///
/// Available since Linux 6.2.
pub const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;

/// In the `res` of a [`IORING_CQE_F_NOTIF`] CQE of a send with
/// [`IORING_SEND_ZC_REPORT_USAGE`]: the kernel copied the data (or sent nothing).
///
/// Available since Linux 6.2.
pub const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// CQE flag: this CQE is the notification of a zero-copy send (same `user_data` as its
/// result CQE, which had [`IORING_CQE_F_MORE`] set): the kernel no longer reads the buffer.
///
/// Available since Linux 6.0.
pub const IORING_CQE_F_NOTIF: u32 = 1 << 3;
