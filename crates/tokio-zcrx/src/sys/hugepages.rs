//! 2 MiB huge pages for receive areas of chunks larger than a page: what this machine has
//! (reserved hugetlb pages, transparent huge pages), and the check that a transparent huge
//! page mapping really is backed by huge pages.
//!
//! The kernel wants every chunk physically contiguous (with `rx_buf_len` larger than a page it
//! refuses an area whose pinned pages are not, with ERANGE): 2 MiB pages make every chunk up
//! to 2 MiB contiguous.

use std::io;

/// The huge page size areas of large chunks are backed with.
pub(crate) const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Where the 2 MiB pool is described in sysfs (also when the default huge page size differs).
const POOL_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
/// The transparent huge page policy: `always [madvise] never`.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The transparent huge page policy (`/sys/kernel/mm/transparent_hugepage/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThpMode {
    /// Every anonymous mapping may get huge pages.
    Always,
    /// Mappings that ask with `madvise(MADV_HUGEPAGE)` get them (what the area does).
    Madvise,
    /// Disabled by the administrator.
    Never,
    /// The kernel has no transparent huge pages (no such file).
    Missing,
}

impl ThpMode {
    /// Whether an area that asks with `MADV_HUGEPAGE` may get transparent huge pages.
    pub(crate) fn allowed(self) -> bool {
        matches!(self, ThpMode::Always | ThpMode::Madvise)
    }

    /// The policy as the sysfs file names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ThpMode::Always => "always",
            ThpMode::Madvise => "madvise",
            ThpMode::Never => "never",
            ThpMode::Missing => "not built into this kernel",
        }
    }
}

/// The 2 MiB hugetlb pool: reserved pages (`vm.nr_hugepages`), free, and promised to
/// mappings but not yet faulted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct HugePagePool {
    pub(crate) total: u64,
    pub(crate) free: u64,
    pub(crate) reserved: u64,
}

impl HugePagePool {
    /// Pages a new mapping can still get (free ones not promised to another mapping).
    pub(crate) fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
}

/// What this machine offers for a huge-page backed area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HugePageFacts {
    /// The 2 MiB hugetlb pool; `None` when the kernel has none (no hugetlbfs, or 2 MiB is
    /// not a huge page size here).
    pub(crate) pool: Option<HugePagePool>,
    pub(crate) thp: ThpMode,
}

impl HugePageFacts {
    /// Reads `/proc/meminfo` (whose `HugePages_*` lines describe the 2 MiB pool when that is
    /// the default size), else the pool's sysfs directory, and the THP policy.
    pub(crate) fn read() -> HugePageFacts {
        let pool = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| parse_meminfo(&text))
            .or_else(read_pool_sysfs);
        let thp = match std::fs::read_to_string(THP_ENABLED) {
            Ok(text) => parse_thp_enabled(&text),
            Err(_) => ThpMode::Missing,
        };
        HugePageFacts { pool, thp }
    }
}

/// The 2 MiB pool from `/proc/meminfo` text, if its `Hugepagesize` is 2048 kB.
pub(crate) fn parse_meminfo(text: &str) -> Option<HugePagePool> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    if field("Hugepagesize")? != (HUGE_PAGE_SIZE as u64 >> 10) {
        return None;
    }
    let total = field("HugePages_Total")?;
    Some(HugePagePool {
        total,
        free: field("HugePages_Free")?,
        reserved: plausible_reserved(field("HugePages_Rsvd").unwrap_or(0), total),
    })
}

/// The kernel's count of promised pages can wrap below zero (seen on 7.3 after a pinned
/// private hugetlb area was unmapped while io_uring still held it): a count above the pool's
/// size promises nothing.
fn plausible_reserved(reserved: u64, total: u64) -> u64 {
    if reserved > total {
        0
    } else {
        reserved
    }
}

fn read_pool_sysfs() -> Option<HugePagePool> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{POOL_DIR}/{name}"))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    Some(HugePagePool {
        total: read("nr_hugepages")?,
        free: read("free_hugepages")?,
        reserved: plausible_reserved(read("resv_hugepages").unwrap_or(0), read("nr_hugepages")?),
    })
}

/// The policy marked `[...]` in `always [madvise] never`.
pub(crate) fn parse_thp_enabled(text: &str) -> ThpMode {
    let chosen = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('[')?.strip_suffix(']'));
    match chosen {
        Some("always") => ThpMode::Always,
        Some("madvise") => ThpMode::Madvise,
        Some("never") => ThpMode::Never,
        _ => ThpMode::Missing,
    }
}

/// The `AnonHugePages` bytes of the mapping that starts at `start`, from `/proc/self/smaps`
/// text; `None` if no mapping starts there.
pub(crate) fn parse_anon_huge_bytes(smaps: &str, start: usize) -> Option<u64> {
    let header = format!("{start:x}-");
    let mut lines = smaps.lines();
    lines.find(|line| line.starts_with(&header))?;
    for line in lines {
        if let Some(rest) = line.strip_prefix("AnonHugePages:") {
            let kb = rest.split_whitespace().next()?.parse::<u64>().ok()?;
            return Some(kb << 10);
        }
        // The next mapping's header: its fields are not ours.
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            return None;
        }
    }
    None
}

/// How many bytes of the mapping at `start` the kernel backs with transparent huge pages now.
pub(crate) fn anon_huge_bytes(start: usize) -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    parse_anon_huge_bytes(&smaps, start).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no mapping at {start:#x} in /proc/self/smaps"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_describes_the_2mib_pool_only() {
        let text = "MemTotal: 2000000 kB\nHugePages_Total:      16\nHugePages_Free:       12\n\
                    HugePages_Rsvd:        2\nHugePages_Surp:        0\nHugepagesize:       2048 kB\n";
        let pool = parse_meminfo(text).unwrap();
        assert_eq!(
            pool,
            HugePagePool {
                total: 16,
                free: 12,
                reserved: 2
            }
        );
        assert_eq!(pool.available(), 10);
        let wrapped = text.replace("Rsvd:        2", "Rsvd: 18446744073709551608");
        assert_eq!(parse_meminfo(&wrapped).unwrap().available(), 12);
        let gigantic = text.replace("2048 kB", "1048576 kB");
        assert_eq!(parse_meminfo(&gigantic), None);
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn thp_policy_is_the_bracketed_word() {
        assert_eq!(
            parse_thp_enabled("always [madvise] never\n"),
            ThpMode::Madvise
        );
        assert_eq!(
            parse_thp_enabled("[always] madvise never\n"),
            ThpMode::Always
        );
        assert_eq!(
            parse_thp_enabled("always madvise [never]\n"),
            ThpMode::Never
        );
        assert_eq!(parse_thp_enabled(""), ThpMode::Missing);
        assert!(ThpMode::Madvise.allowed() && ThpMode::Always.allowed());
        assert!(!ThpMode::Never.allowed() && !ThpMode::Missing.allowed());
    }

    #[test]
    fn smaps_gives_the_huge_bytes_of_one_mapping() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n\
Size:               4096 kB\n\
AnonHugePages:      2048 kB\n\
7f0000600000-7f0000a00000 rw-p 00000000 00:00 0 \n\
Size:               4096 kB\n\
AnonHugePages:      4096 kB\n\
7f0000c00000-7f0000c01000 rw-p 00000000 00:00 0 [stack]\n\
Size:                  4 kB\n";
        assert_eq!(
            parse_anon_huge_bytes(smaps, 0x7f00_0000_0000),
            Some(2 << 20)
        );
        assert_eq!(
            parse_anon_huge_bytes(smaps, 0x7f00_0060_0000),
            Some(4 << 20)
        );
        assert_eq!(parse_anon_huge_bytes(smaps, 0x7f00_00c0_0000), None);
        assert_eq!(parse_anon_huge_bytes(smaps, 0x1000), None);
    }

    #[test]
    fn this_machine_is_described() {
        // Whatever the host has, reading it works and is consistent.
        let facts = HugePageFacts::read();
        if let Some(pool) = facts.pool {
            assert!(pool.free <= pool.total, "{pool:?}");
        }
    }
}
