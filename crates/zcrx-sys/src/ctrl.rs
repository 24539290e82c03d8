//! zcrx control operations: `IORING_REGISTER_ZCRX_CTRL` with a [`zcrx_ctrl`](struct@zcrx_ctrl) (Linux 6.19).
//!
//! The operation runs on the ring that owns the zcrx instance, so on a
//! [`IORING_SETUP_SINGLE_ISSUER`](crate::ring::IORING_SETUP_SINGLE_ISSUER) ring it must be
//! issued by the ring's owner thread (else `EEXIST`).
//!
//! Errors common to all operations: `EINVAL` before 6.19 (unknown register opcode) or when
//! `nr_args` is not 0; `EFAULT` when the header's `__resv` is not zero (the kernel reports that
//! one as a fault, not as `EINVAL`); `ENXIO` when no instance has that `zcrx_id`;
//! `EOPNOTSUPP` for an unknown `op`.

use core::ffi::c_void;
use core::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::register::io_uring_register;
use crate::ring::IORING_REGISTER_ZCRX_CTRL;
use crate::zcrx::io_uring_zcrx_area_reg;

/// [`zcrx_ctrl::op`](struct@zcrx_ctrl): make the kernel consume the refill ring now instead of when the NIC's
/// page pool next needs buffers. Required for
/// [`ZCRX_REG_NODEV`](crate::zcrx::ZCRX_REG_NODEV) instances, whose refill ring is consumed
/// only this way. Payload [`zcrx_ctrl_flush_rq`].
///
/// Available since Linux 6.19.
pub const ZCRX_CTRL_FLUSH_RQ: u32 = 0;

/// [`zcrx_ctrl::op`](struct@zcrx_ctrl): create an fd that keeps the instance alive and can be imported into
/// another ring with [`ZCRX_REG_IMPORT`](crate::zcrx::ZCRX_REG_IMPORT). Payload
/// [`zcrx_ctrl_export`]; the kernel writes the new fd (`O_CLOEXEC`) into it.
///
/// Available since Linux 6.19.
pub const ZCRX_CTRL_EXPORT: u32 = 1;

/// [`zcrx_ctrl::op`](struct@zcrx_ctrl): re-arm an event type that has fired, so it can fire again. Payload
/// [`zcrx_ctrl_arm_event`]. `EINVAL` if that type has not fired since it was last armed.
///
/// Available since Linux 7.2.
pub const ZCRX_CTRL_ARM_EVENT: u32 = 2;

/// [`zcrx_ctrl::op`](struct@zcrx_ctrl): add another receive area to an existing instance. Payload
/// [`zcrx_ctrl_add_area`]; the kernel writes the new area's `rq_area_token` back into the
/// [`io_uring_zcrx_area_reg`] it points to.
///
/// Available since Linux 7.3 (in the 7.3 uapi headers; the project's 7.2 notes lack it).
pub const ZCRX_CTRL_ADD_AREA: u32 = 3;

/// Payload of [`ZCRX_CTRL_FLUSH_RQ`]: nothing.
///
/// Available since Linux 6.19.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_ctrl_flush_rq {
    /// Reserved; must be zero.
    pub __resv: [u64; 6],
}

kernel_layout!(layout_zcrx_ctrl_flush_rq: zcrx_ctrl_flush_rq, size 48, align 8 {
    __resv: 0,
});

/// Payload of [`ZCRX_CTRL_EXPORT`].
///
/// Available since Linux 6.19.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_ctrl_export {
    /// Must be 0 on input; the exported fd on output.
    pub zcrx_fd: u32,
    /// Reserved; must be zero.
    pub __resv1: [u32; 11],
}

kernel_layout!(layout_zcrx_ctrl_export: zcrx_ctrl_export, size 48, align 4 {
    zcrx_fd: 0,
    __resv1: 4,
});

/// Payload of [`ZCRX_CTRL_ARM_EVENT`].
///
/// Available since Linux 7.2.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_ctrl_arm_event {
    /// Event type to re-arm: one `ZCRX_EVENT_*` index from [`event`](crate::event).
    pub event_type: u32,
    /// Reserved; must be zero.
    pub __resv: [u32; 11],
}

kernel_layout!(layout_zcrx_ctrl_arm_event: zcrx_ctrl_arm_event, size 48, align 4 {
    event_type: 0,
    __resv: 4,
});

/// Payload of [`ZCRX_CTRL_ADD_AREA`].
///
/// Available since Linux 7.3.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_ctrl_add_area {
    /// Address of an [`io_uring_zcrx_area_reg`] (read and written by the kernel).
    pub area_ptr: u64,
    /// Reserved; must be zero.
    pub __resv: [u64; 5],
}

kernel_layout!(layout_zcrx_ctrl_add_area: zcrx_ctrl_add_area, size 48, align 8 {
    area_ptr: 0,
    __resv: 8,
});

/// The operation-specific part of [`zcrx_ctrl`](struct@zcrx_ctrl); the kernel declares it as an anonymous union.
///
/// Every member is plain integers and the members have the same size, so reading any member
/// is sound whichever one was written; `unsafe` is only needed because Rust requires it for
/// union reads. Prefer the typed constructors on [`zcrx_ctrl`](struct@zcrx_ctrl), which fill it correctly.
#[repr(C)]
#[derive(Clone, Copy)]
pub union zcrx_ctrl_payload {
    /// [`ZCRX_CTRL_EXPORT`] payload.
    pub zc_export: zcrx_ctrl_export,
    /// [`ZCRX_CTRL_FLUSH_RQ`] payload.
    pub zc_flush: zcrx_ctrl_flush_rq,
    /// [`ZCRX_CTRL_ARM_EVENT`] payload.
    pub zc_arm_event: zcrx_ctrl_arm_event,
    /// [`ZCRX_CTRL_ADD_AREA`] payload.
    pub zc_area: zcrx_ctrl_add_area,
}

kernel_layout!(layout_zcrx_ctrl_payload: zcrx_ctrl_payload, size 48, align 8 {
    zc_export: 0,
    zc_flush: 0,
    zc_arm_event: 0,
    zc_area: 0,
});

impl zcrx_ctrl_payload {
    /// The payload as the six 64-bit words the kernel copies.
    pub fn as_words(&self) -> [u64; 6] {
        // SAFETY: `zc_flush` covers all 48 bytes of the union and every bit pattern is a valid
        // `[u64; 6]`; all members are plain integers with no padding, so no byte is uninit.
        unsafe { self.zc_flush.__resv }
    }
}

impl Default for zcrx_ctrl_payload {
    fn default() -> Self {
        zcrx_ctrl_payload {
            zc_flush: zcrx_ctrl_flush_rq::default(),
        }
    }
}

impl fmt::Debug for zcrx_ctrl_payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Which member is meant depends on `zcrx_ctrl::op`, so show the raw words.
        f.debug_tuple("zcrx_ctrl_payload")
            .field(&self.as_words())
            .finish()
    }
}

impl PartialEq for zcrx_ctrl_payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_words() == other.as_words()
    }
}

impl Eq for zcrx_ctrl_payload {}

/// Argument of [`IORING_REGISTER_ZCRX_CTRL`]: one control operation on one zcrx instance.
///
/// Available since Linux 6.19.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct zcrx_ctrl {
    /// Instance id, as written back into
    /// [`io_uring_zcrx_ifq_reg::zcrx_id`](crate::zcrx::io_uring_zcrx_ifq_reg::zcrx_id).
    pub zcrx_id: u32,
    /// `ZCRX_CTRL_*` operation.
    pub op: u32,
    /// Reserved; must be zero (`EFAULT` otherwise).
    pub __resv: [u64; 2],
    /// Operation-specific payload (the kernel's anonymous union).
    pub payload: zcrx_ctrl_payload,
}

kernel_layout!(layout_zcrx_ctrl: zcrx_ctrl, size 72, align 8 {
    zcrx_id: 0,
    op: 4,
    __resv: 8,
    payload: 24,
});

impl zcrx_ctrl {
    /// A [`ZCRX_CTRL_FLUSH_RQ`] request.
    pub fn flush_rq(zcrx_id: u32) -> Self {
        zcrx_ctrl {
            zcrx_id,
            op: ZCRX_CTRL_FLUSH_RQ,
            ..Default::default()
        }
    }

    /// A [`ZCRX_CTRL_EXPORT`] request.
    pub fn export(zcrx_id: u32) -> Self {
        zcrx_ctrl {
            zcrx_id,
            op: ZCRX_CTRL_EXPORT,
            ..Default::default()
        }
    }

    /// A [`ZCRX_CTRL_ARM_EVENT`] request for `event_type` (a `ZCRX_EVENT_*` index).
    pub fn arm_event(zcrx_id: u32, event_type: u32) -> Self {
        zcrx_ctrl {
            zcrx_id,
            op: ZCRX_CTRL_ARM_EVENT,
            payload: zcrx_ctrl_payload {
                zc_arm_event: zcrx_ctrl_arm_event {
                    event_type,
                    ..Default::default()
                },
            },
            ..Default::default()
        }
    }

    /// A [`ZCRX_CTRL_ADD_AREA`] request for the area described by `*area`.
    ///
    /// Only records the address; see [`zcrx_add_area`] for what it must point to.
    pub fn add_area(zcrx_id: u32, area: *mut io_uring_zcrx_area_reg) -> Self {
        zcrx_ctrl {
            zcrx_id,
            op: ZCRX_CTRL_ADD_AREA,
            payload: zcrx_ctrl_payload {
                zc_area: zcrx_ctrl_add_area {
                    area_ptr: area as u64,
                    ..Default::default()
                },
            },
            ..Default::default()
        }
    }
}

/// Runs a zcrx control operation: `io_uring_register(ring_fd, IORING_REGISTER_ZCRX_CTRL, ctrl,
/// 0)`.
///
/// `nr_args` is 0 because the kernel takes exactly one fixed-size [`zcrx_ctrl`](struct@zcrx_ctrl) and rejects
/// any other count with `EINVAL`. For [`ZCRX_CTRL_EXPORT`] the kernel writes the new fd into
/// `ctrl.payload.zc_export.zcrx_fd`; the caller then owns it.
///
/// # Safety
///
/// For [`ZCRX_CTRL_ADD_AREA`], `ctrl.payload.zc_area.area_ptr` must meet the requirements of
/// [`zcrx_add_area`]. For an `op` this crate does not know, the caller must know what the
/// running kernel reads and writes for it. Flush, export and arm-event need nothing beyond a
/// valid `ctrl`, which the reference guarantees; use the safe [`zcrx_flush_rq`],
/// [`zcrx_export`] and [`zcrx_arm_event`] for them.
pub unsafe fn zcrx_ctrl(ring_fd: BorrowedFd<'_>, ctrl: &mut zcrx_ctrl) -> io::Result<()> {
    let arg: *mut zcrx_ctrl = ctrl;
    // SAFETY: `arg` is an exclusive borrow of a correctly laid out `zcrx_ctrl`, which the
    // kernel reads and (for export) writes back; pointers in the payload are the caller's
    // responsibility as documented above.
    unsafe {
        io_uring_register(
            ring_fd.as_raw_fd(),
            IORING_REGISTER_ZCRX_CTRL,
            arg.cast::<c_void>(),
            0,
        )
    }?;
    Ok(())
}

/// Makes the kernel consume the refill ring of instance `zcrx_id` now ([`ZCRX_CTRL_FLUSH_RQ`]).
///
/// Available since Linux 6.19.
pub fn zcrx_flush_rq(ring_fd: BorrowedFd<'_>, zcrx_id: u32) -> io::Result<()> {
    let mut ctrl = zcrx_ctrl::flush_rq(zcrx_id);
    // SAFETY: flush reads only the `zcrx_ctrl` itself (and the refill ring the kernel already
    // owns); the payload holds no pointers.
    unsafe { zcrx_ctrl(ring_fd, &mut ctrl) }
}

/// Re-arms event type `event_type` (a `ZCRX_EVENT_*` index) of instance `zcrx_id`
/// ([`ZCRX_CTRL_ARM_EVENT`]).
///
/// Available since Linux 7.2.
pub fn zcrx_arm_event(ring_fd: BorrowedFd<'_>, zcrx_id: u32, event_type: u32) -> io::Result<()> {
    let mut ctrl = zcrx_ctrl::arm_event(zcrx_id, event_type);
    // SAFETY: arm-event reads only the `zcrx_ctrl` itself; the payload holds no pointers.
    unsafe { zcrx_ctrl(ring_fd, &mut ctrl) }
}

/// Exports instance `zcrx_id` as a new fd ([`ZCRX_CTRL_EXPORT`]) for
/// [`ZCRX_REG_IMPORT`](crate::zcrx::ZCRX_REG_IMPORT) on another ring. The instance stays alive
/// while the fd is open.
///
/// Available since Linux 6.19.
pub fn zcrx_export(ring_fd: BorrowedFd<'_>, zcrx_id: u32) -> io::Result<OwnedFd> {
    let mut ctrl = zcrx_ctrl::export(zcrx_id);
    // SAFETY: export reads the `zcrx_ctrl` and writes it back; the payload holds no pointers.
    unsafe { zcrx_ctrl(ring_fd, &mut ctrl) }?;
    // SAFETY: reading the member the kernel just wrote for this op; all members are plain
    // integers.
    let fd = unsafe { ctrl.payload.zc_export.zcrx_fd } as RawFd;
    // SAFETY: on success the kernel installed a new fd for this process and handed its
    // ownership to us; nothing else refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds the area described by `*area` to instance `zcrx_id` ([`ZCRX_CTRL_ADD_AREA`]). On
/// success the kernel has written the new area's token into `area.rq_area_token` (which must
/// be 0 on input).
///
/// Available since Linux 7.3.
///
/// # Safety
///
/// The area memory (`area.addr..area.addr + area.len`, unless it is a dma-buf) becomes the
/// kernel's to write into at any time until the ring and every exported handle are closed,
/// exactly as for the area passed to
/// [`register_zcrx_ifq`](crate::zcrx::register_zcrx_ifq): no Rust reference to it may exist
/// that assumes it does not change.
pub unsafe fn zcrx_add_area(
    ring_fd: BorrowedFd<'_>,
    zcrx_id: u32,
    area: &mut io_uring_zcrx_area_reg,
) -> io::Result<()> {
    let mut ctrl = zcrx_ctrl::add_area(zcrx_id, area);
    // SAFETY: `area_ptr` comes from an exclusive borrow that outlives the call, so the kernel
    // may read and write it; the memory it describes is vouched for by the caller.
    unsafe { zcrx_ctrl(ring_fd, &mut ctrl) }
}
