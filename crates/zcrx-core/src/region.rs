//! How large the refill region handed to the kernel at registration is, and where its parts
//! go: the refill ring (header and entries) first, then, with events, the kernel's
//! statistics.
//!
//! Both registrations in `tokio-zcrx` (the runtime's and the probe's trial) size their
//! region here, and check the offsets the kernel writes back with
//! [`RegionLayout::validate_ring`].

use crate::refill::{RingLayout, RingLayoutError};
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

/// The refill region's size and parts, for a ring of `entries` entries on a machine with
/// `page`-byte pages.
///
/// Before the zcrx query (6.19) the kernel does not report the refill ring header's size, so
/// a whole page in front of the entries covers every kernel (the header is 64 bytes on 6.18,
/// 128 on 7.3). The ring's part is rounded up to whole pages; the statistics, when wanted,
/// take one more page after it (they are 8-aligned, and far smaller than a page).
///
/// ```
/// use zcrx_core::region::RegionLayout;
/// let layout = RegionLayout::new(64, 4096, false);
/// assert_eq!((layout.ring_len, layout.len, layout.stats_offset), (8192, 8192, None));
/// let layout = RegionLayout::new(4096, 4096, true);
/// assert_eq!((layout.ring_len, layout.len), (69632, 73728));
/// assert_eq!(layout.stats_offset, Some(69632));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegionLayout {
    /// Bytes of the region that belong to the refill ring: the offsets the kernel reports
    /// must fall inside them.
    pub ring_len: usize,
    /// Where the kernel's `zcrx_stats` go, when statistics were asked for.
    pub stats_offset: Option<usize>,
    /// The whole region's length, a multiple of the page size.
    pub len: usize,
}

impl RegionLayout {
    /// The layout for `entries` refill entries (as requested; the kernel may round up to a
    /// power of two, which the page of headroom covers), `page`-byte pages, and room for
    /// the statistics if `stats`.
    pub fn new(entries: u32, page: usize, stats: bool) -> Self {
        let entry_len = size_of::<io_uring_zcrx_rqe>();
        let ring_len = (entries as usize * entry_len + page).div_ceil(page) * page;
        Self {
            ring_len,
            stats_offset: stats.then_some(ring_len),
            len: if stats { ring_len + page } else { ring_len },
        }
    }

    /// Checks the offsets the kernel wrote back at registration against the ring's part of
    /// the region: see [`RingLayout::validate`].
    ///
    /// # Errors
    ///
    /// [`RingLayoutError`] naming the first field that does not fit.
    pub fn validate_ring(
        &self,
        head: u32,
        tail: u32,
        rqes: u32,
        entries: u32,
    ) -> Result<RingLayout, RingLayoutError> {
        RingLayout::validate(head, tail, rqes, entries, self.ring_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_part_covers_a_header_page_and_the_entries() {
        assert_eq!(RegionLayout::new(64, 4096, false).len, 8192);
        assert_eq!(RegionLayout::new(256, 4096, false).len, 8192);
        assert_eq!(RegionLayout::new(257, 4096, false).len, 12288);
        assert_eq!(RegionLayout::new(32768, 4096, false).len, 528384);
        assert_eq!(RegionLayout::new(64, 65536, false).len, 131072);
    }

    #[test]
    fn statistics_take_the_page_after_the_ring() {
        let layout = RegionLayout::new(256, 4096, true);
        assert_eq!(layout.stats_offset, Some(8192));
        assert_eq!(layout.len, 8192 + 4096);
        assert_eq!(RegionLayout::new(256, 4096, false).stats_offset, None);
    }

    #[test]
    fn kernel_offsets_are_checked_against_the_ring_part_only() {
        let layout = RegionLayout::new(256, 4096, true);
        // 6.18: head 0, tail 4, entries from 64.
        let ring = layout.validate_ring(0, 4, 64, 256).unwrap();
        assert_eq!(
            (ring.head, ring.tail, ring.rqes, ring.entries),
            (0, 4, 64, 256)
        );
        // Entries running into the statistics page are refused.
        assert!(matches!(
            layout.validate_ring(0, 4, 4160, 256),
            Err(RingLayoutError::OutsideRegion { field: "rqes", .. })
        ));
        assert!(layout.validate_ring(0, 4, 64, 300).is_err());
    }
}
