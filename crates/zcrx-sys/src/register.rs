//! The raw `io_uring_register(2)` system call.
//!
//! Typed wrappers for each zcrx use live next to the structs they take:
//! [`zcrx::register_zcrx_ifq`](crate::zcrx::register_zcrx_ifq),
//! [`ctrl::zcrx_ctrl`](crate::ctrl::zcrx_ctrl()), [`query::query`](crate::query::query),
//! [`opcode_probe::probe_opcode_supported`](crate::opcode_probe::probe_opcode_supported).

use core::ffi::{c_long, c_void};
use std::io;
use std::os::fd::RawFd;

/// Calls `io_uring_register(fd, opcode, arg, nr_args)` and returns its non-negative result.
///
/// `fd` is a ring fd, or -1 for the opcodes that need no ring (such as
/// [`IORING_REGISTER_QUERY`](crate::ring::IORING_REGISTER_QUERY)). Errors come back as the
/// `errno` the kernel returned.
///
/// # Safety
///
/// `arg` and `nr_args` must be what the kernel expects for `opcode`: `arg` must be valid for
/// every read and write the kernel performs for that opcode, including through pointers stored
/// in the memory `arg` points to. Some opcodes make the kernel keep using memory after the call
/// returns (registered buffers, zcrx areas and refill rings): that memory must then stay valid
/// for as long as the kernel may touch it, and must not be aliased by Rust references that
/// assume it does not change.
pub unsafe fn io_uring_register(
    fd: RawFd,
    opcode: u32,
    arg: *mut c_void,
    nr_args: u32,
) -> io::Result<i32> {
    // SAFETY: the syscall takes plain integers and one pointer, which the caller vouches for;
    // every argument is widened to `c_long` because `syscall` is variadic.
    let ret = unsafe {
        syscall!(SYS_io_uring_register(
            fd as c_long,
            opcode as c_long,
            arg as c_long,
            nr_args as c_long,
        ))
    }?;
    // The kernel's io_uring_register returns an `int`; the truncation only drops sign-extension.
    Ok(ret as i32)
}
