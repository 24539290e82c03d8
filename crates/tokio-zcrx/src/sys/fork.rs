//! Keeping forked children from holding on to zcrx instances.
//!
//! A child made by `fork()` that does not `exec` would inherit the ring's descriptor and
//! mappings (keeping the kernel's zcrx instance, and so the NIC queue binding, alive after
//! the parent closed it) and a copy-on-write view of the pinned receive area. So the area,
//! the refill region and the ring's own mappings are `MADV_DONTFORK` (the child does not get
//! them at all), and the ring descriptors are closed in the child by a `pthread_atfork`
//! handler. A child that touches a `ZcBuf` it inherited faults: buffers belong to the
//! process that received them.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use super::mem::Mapping;
use super::syscall;

/// Ring descriptors the child handler closes; -1 is a free slot. A fixed array of atomics:
/// the handler runs in the child right after fork, where no lock may be taken.
static RING_FDS: [AtomicI32; 256] = [const { AtomicI32::new(-1) }; 256];
static INSTALL_HANDLER: Once = Once::new();

extern "C" fn close_rings_in_child() {
    for slot in &RING_FDS {
        let fd = slot.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: close is async-signal-safe (and so is reading errno on failure); `fd`
            // was one of our ring descriptors in the parent, inherited by this child, and
            // nothing in the child owns it. A failed close leaves nothing to undo.
            let _ = unsafe { syscall!(close(fd)) };
        }
    }
}

/// Keeps `mapping` out of children made by `fork()`.
pub(crate) fn exclude_mapping(mapping: &Mapping) -> io::Result<()> {
    exclude_range(mapping.as_ptr() as usize, mapping.len())
}

fn exclude_range(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise only changes how fork treats the range; the range is a mapping of ours.
    unsafe {
        syscall!(madvise(
            start as *mut libc::c_void,
            len,
            libc::MADV_DONTFORK
        ))
    }?;
    Ok(())
}

/// The io_uring mappings of this process, as (start, end) from /proc/self/maps.
fn io_uring_mappings() -> Vec<(usize, usize)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    maps.lines()
        .filter(|line| line.contains("io_uring"))
        .filter_map(|line| {
            let range = line.split_whitespace().next()?;
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

/// A ring's registration in the fork handler; dropped before the ring is closed, so the
/// handler never closes a descriptor number that has been reused.
#[derive(Debug)]
pub(crate) struct RingForkGuard {
    slot: Option<usize>,
    /// The mappings made `MADV_DONTFORK`.
    #[cfg(test)]
    excluded: Vec<(usize, usize)>,
}

impl Drop for RingForkGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            RING_FDS[slot].store(-1, Ordering::Relaxed);
        }
    }
}

/// Creates a ring with `create` and keeps it out of forked children: its mappings (those
/// that appeared while it was created) become `MADV_DONTFORK` and its descriptor is closed
/// in the child. Best effort beyond the ring's creation: a failure is logged, not fatal.
pub(crate) fn create_ring<T>(
    create: impl FnOnce() -> io::Result<T>,
    fd_of: impl Fn(&T) -> RawFd,
) -> io::Result<(T, RingForkGuard)> {
    let before = io_uring_mappings();
    let ring = create()?;
    let new: Vec<(usize, usize)> = io_uring_mappings()
        .into_iter()
        .filter(|range| !before.contains(range))
        .collect();
    for &(start, end) in &new {
        if let Err(e) = exclude_range(start, end - start) {
            tracing::warn!(error = %e, "tokio-zcrx: MADV_DONTFORK on the ring failed");
        }
    }
    // SAFETY: registers a function with the signature pthread_atfork expects; it only
    // touches atomics and calls close.
    INSTALL_HANDLER.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(close_rings_in_child));
    });
    let fd = fd_of(&ring);
    let slot = RING_FDS.iter().position(|slot| {
        slot.compare_exchange(-1, fd, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    });
    if slot.is_none() {
        tracing::warn!("tokio-zcrx: more than 256 rings; a forked child keeps this one open");
    }
    #[cfg(not(test))]
    drop(new);
    Ok((
        ring,
        RingForkGuard {
            slot,
            #[cfg(test)]
            excluded: new,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Forks; the child runs `child` and exits with its result as the status.
    fn in_child(child: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child only runs `child` (reads of memory and /proc) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = child();
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn an_excluded_mapping_is_not_in_the_child() {
        let mapping = Mapping::new(4096, false).unwrap();
        exclude_mapping(&mapping).unwrap();
        let address = mapping.as_ptr() as usize;
        let status = in_child(move || {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let present = maps.lines().any(|line| {
                let (start, end) = line
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .split_once('-')
                    .unwrap();
                let (start, end) = (
                    usize::from_str_radix(start, 16).unwrap(),
                    usize::from_str_radix(end, 16).unwrap(),
                );
                (start..end).contains(&address)
            });
            i32::from(present)
        });
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the child has the area mapped"
        );
    }

    #[test]
    fn a_ring_is_closed_and_unmapped_in_the_child() {
        let (ring, guard) = create_ring(
            || io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::new(8),
            |ring| ring.as_raw_fd(),
        )
        .unwrap();
        let fd = ring.as_raw_fd();
        assert!(!guard.excluded.is_empty(), "no ring mapping found");
        let excluded = guard.excluded.clone();
        let status = in_child(move || {
            // SAFETY: fcntl on a descriptor number; EBADF is the expected answer.
            let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            let mapped = io_uring_mappings()
                .iter()
                .any(|range| excluded.contains(range));
            i32::from(open) | (i32::from(mapped) << 1)
        });
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "in the child: bit 0 = the ring fd is open, bit 1 = ring memory is mapped"
        );
    }
}
