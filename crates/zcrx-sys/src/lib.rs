//! Raw Linux io_uring zero-copy receive (zcrx) kernel interface.
//!
//! This crate declares the kernel's user-space ABI for zcrx, byte for byte, and wraps the one
//! system call it needs. It contains no policy: no ring management, no buffer accounting, no
//! feature fallbacks. Higher layers (the `tokio-zcrx` crate) build those on top.
//!
//! # Layers
//!
//! 1. **Declarations.** `#[repr(C)]` structs with the kernel's field names and constants with
//!    the kernel's names (final Linux 7.2+ names), one module per kernel concept:
//!    - [`ring`]: ring-level pieces the `io-uring` crate lacks or that zcrx depends on:
//!      `IORING_OP_RECV_ZC`, `IORING_RECV_MULTISHOT`, setup flags, CQE flags and the
//!      register opcodes.
//!    - [`region`]: [`io_uring_region_desc`](region::io_uring_region_desc), the memory region
//!      that holds the refill ring.
//!    - [`zcrx`]: registration ([`io_uring_zcrx_ifq_reg`](zcrx::io_uring_zcrx_ifq_reg)), area,
//!      refill ring entries, the receive CQE's extra half, registration flags and features.
//!    - [`event`]: event descriptor, event types and the shared-memory
//!      [`zcrx_stats`](event::zcrx_stats) (Linux 7.2).
//!    - [`ctrl`]: [`zcrx_ctrl`](struct@ctrl::zcrx_ctrl) and its operations (flush the refill ring,
//!      export, arm an event, add an area).
//!    - [`query`]: the ring-less `IORING_REGISTER_QUERY` interface and its result structs.
//!    - [`opcode_probe`]: `IORING_REGISTER_PROBE` for opcode support (not `tokio_zcrx::probe`,
//!      the capability probe, which uses it).
//! 2. **System call.** [`register::io_uring_register`] is the raw, `unsafe` syscall.
//! 3. **Typed wrappers.** Each concept module has thin wrappers over that syscall, safe where
//!    the kernel only reads memory the wrapper owns (e.g. [`query::query_zcrx`],
//!    [`ctrl::zcrx_flush_rq`], [`opcode_probe::probe_opcode_supported`]) and `unsafe` where
//!    the kernel follows caller-supplied pointers (e.g. [`zcrx::register_zcrx_ifq`], [`query::query`]).
//!
//! Every item notes the first Linux release that has it. Detect features at run time (probe,
//! then query) instead of comparing kernel versions: older kernels reject fields they do not
//! know with `EINVAL`.
//!
//! Layouts are checked at compile time against the x86-64 kernel layout (sizes and every field
//! offset) and again by unit tests that name the failing field.
//!
//! # Example
//!
//! Feature detection does not need a ring or privileges:
//!
//! ```
//! use std::io;
//! use zcrx_sys::query;
//! use zcrx_sys::zcrx::{ZCRX_FEATURE_EVENT, ZCRX_REG_NODEV};
//!
//! match query::query_zcrx() {
//!     Ok(caps) => {
//!         let nodev = caps.register_flags & u64::from(ZCRX_REG_NODEV) != 0;
//!         let events = caps.features & ZCRX_FEATURE_EVENT != 0;
//!         println!("zcrx query: nodev={nodev} events={events} ctrl ops={}", caps.nr_ctrl_opcodes);
//!     }
//!     // EOPNOTSUPP: the query interface exists (6.18) but has no zcrx entry.
//!     // EINVAL: no query interface at all (before 6.18).
//!     Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
//!         println!("this kernel cannot describe its zcrx support: {e}");
//!     }
//!     Err(e) => return Err(e),
//! }
//! # Ok::<(), io::Error>(())
//! ```
#![warn(missing_docs)]
// The kernel's names are kept verbatim so that the uapi headers can be read side by side.
#![allow(non_camel_case_types)]

/// Calls `libc::syscall` and turns the C convention (-1 and `errno`) into `io::Result<c_long>`.
///
/// Expands to an unsafe call: use it inside an `unsafe` block that states why the arguments
/// are valid for this system call.
macro_rules! syscall {
    ($nr:ident ( $($arg:expr),* $(,)? )) => {{
        let ret = libc::syscall(libc::$nr, $($arg),*);
        if ret == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }};
}

/// Declares the expected x86-64 layout of a kernel struct once, checked twice: as a
/// compile-time assertion, and as a unit test whose failure message names the field.
macro_rules! kernel_layout {
    ($test:ident: $ty:ty, size $size:literal, align $align:literal { $($field:ident: $off:literal),* $(,)? }) => {
        const _: () = {
            assert!(
                core::mem::size_of::<$ty>() == $size,
                concat!("size of ", stringify!($ty))
            );
            // 32-bit targets align `u64` to 4; sizes and offsets still match there.
            #[cfg(target_pointer_width = "64")]
            assert!(
                core::mem::align_of::<$ty>() == $align,
                concat!("alignment of ", stringify!($ty))
            );
            $(
                assert!(
                    core::mem::offset_of!($ty, $field) == $off,
                    concat!("offset of ", stringify!($ty), "::", stringify!($field))
                );
            )*
        };

        #[cfg(test)]
        #[test]
        fn $test() {
            assert_eq!(core::mem::size_of::<$ty>(), $size, "size of {}", stringify!($ty));
            #[cfg(target_pointer_width = "64")]
            assert_eq!(core::mem::align_of::<$ty>(), $align, "alignment of {}", stringify!($ty));
            $(
                assert_eq!(
                    core::mem::offset_of!($ty, $field),
                    $off,
                    "offset of {}::{}",
                    stringify!($ty),
                    stringify!($field)
                );
            )*
        }
    };
}

pub mod ctrl;
pub mod event;
pub mod opcode_probe;
pub mod query;
pub mod region;
pub mod register;
pub mod ring;
pub mod zcrx;
