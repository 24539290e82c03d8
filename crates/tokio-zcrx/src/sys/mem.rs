//! Memory the kernel shares with us: the receive area and the refill region.

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

use super::{page_size, syscall};

/// A private anonymous read-write mapping, unmapped on drop.
///
/// The kernel (and, in zero-copy mode, the NIC by DMA) writes into these mappings at any time,
/// so no Rust reference to their contents is ever created for longer than the kernel promises
/// to leave a part alone; everything goes through raw pointers and atomics.
#[derive(Debug)]
pub(crate) struct Mapping {
    addr: NonNull<c_void>,
    len: usize,
}

// SAFETY: a mapping is plain memory owned by this value; which thread unmaps it does not
// matter, and all accesses to the contents go through raw pointers with their own rules.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only hands out the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (rounded up to whole pages), zero filled and populated, so the first
    /// receive does not fault pages in one by one. With `huge_pages`, the mapping uses 2 MiB
    /// pages (needed for chunks larger than a page).
    pub(crate) fn new(len: usize, huge_pages: bool) -> io::Result<Mapping> {
        let page = if huge_pages { 2 << 20 } else { page_size() };
        let len = len.div_ceil(page) * page;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        if huge_pages {
            flags |= libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT);
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; the result is checked for MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mapping { addr, len })
    }

    /// Maps `len` bytes (rounded up to 2 MiB) at a 2 MiB-aligned address, asks for
    /// transparent huge pages (`MADV_HUGEPAGE`) and writes to every page, so the kernel backs
    /// it with huge pages where it can. Whether it did is for the caller to check
    /// ([`anon_huge_bytes`](super::hugepages::anon_huge_bytes)): a fragmented machine falls
    /// back to small pages silently.
    pub(crate) fn new_transparent_huge(len: usize) -> io::Result<Mapping> {
        let huge = super::hugepages::HUGE_PAGE_SIZE;
        let len = len.div_ceil(huge) * huge;
        // One huge page more than needed, so that an aligned start lies inside.
        let span = len + huge;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; the result is checked for MAP_FAILED before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = addr as usize;
        let aligned = start.next_multiple_of(huge);
        let head = aligned - start;
        let tail = span - head - len;
        // SAFETY: both ranges lie inside the mapping made above, which nothing else knows of;
        // only the aligned middle is kept.
        unsafe {
            if head > 0 {
                syscall!(munmap(addr, head))?;
            }
            if tail > 0 {
                syscall!(munmap((aligned + len) as *mut c_void, tail))?;
            }
        }
        let addr = NonNull::new(aligned as *mut c_void)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // Owned from here: an error below unmaps it.
        let mapping = Mapping { addr, len };
        // SAFETY: advice on exactly the mapping this value owns.
        unsafe { syscall!(madvise(mapping.addr.as_ptr(), len, libc::MADV_HUGEPAGE))? };
        let page = page_size();
        for offset in (0..len).step_by(page) {
            // SAFETY: `offset` is inside the mapping, which is writable and not yet shared
            // with the kernel or any other thread; a volatile write so the fault happens now.
            unsafe { mapping.as_ptr().add(offset).write_volatile(0) };
        }
        Ok(mapping)
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr().cast()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr + len` is exactly the mapping this value created and owns, and no
        // reference into it outlives `self`. Pages the kernel still pins stay allocated until
        // it unpins them, so unmapping cannot make the kernel write elsewhere.
        let unmapped = unsafe { syscall!(munmap(self.addr.as_ptr(), self.len)) };
        // munmap of a whole mapping of ours cannot fail; if it did, leaking it is all we can do.
        debug_assert!(unmapped.is_ok(), "munmap: {unmapped:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_page_aligned_zeroed_and_rounded() {
        let mapping = Mapping::new(page_size() + 1, false).unwrap();
        assert_eq!(mapping.len(), 2 * page_size());
        assert_eq!(mapping.as_ptr() as usize % page_size(), 0);
        // SAFETY: fresh mapping of at least one page, not shared with any kernel object.
        let first = unsafe { std::slice::from_raw_parts(mapping.as_ptr(), 16) };
        assert!(first.iter().all(|&b| b == 0));
    }
}
