//! The one zcrx registration: a ring set up the way zcrx requires, an area to receive into
//! and a refill region, registered with `IORING_REGISTER_ZCRX_IFQ` and released in the
//! order the kernel needs.
//!
//! The runtime's instance setup (`backend/uring/instance.rs`) and the probe's trial
//! registration (`probe/trial.rs`) both register through here. They differ only in the sizes
//! they ask for and in what they make of a failure: the runtime turns it into an error that
//! says what to do, the probe into a reported outcome. The pure parts (the refill region's
//! size, the check of the offsets the kernel writes back) are in `zcrx_core::region`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use io_uring::{cqueue, squeue, IoUring};
use zcrx_core::refill::{RingLayout, RingLayoutError};
use zcrx_core::region::RegionLayout;
use zcrx_sys::event::{
    zcrx_event_desc, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY, ZCRX_EVENT_DESC_FLAG_STATS,
};
use zcrx_sys::region::{io_uring_region_desc, IORING_MEM_REGION_TYPE_USER};
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_ifq_reg, io_uring_zcrx_offsets, register_zcrx_ifq,
    ZCRX_REG_NODEV,
};

use super::fork::{self, RingForkGuard};
use super::hugepages;
use super::mem::Mapping;
use super::page_size;

/// The ring type zcrx needs: 32-byte CQEs carry the receive offset.
pub(crate) type Ring = IoUring<squeue::Entry, cqueue::Entry32>;

/// Largest SQ: a zcrx ring submits one request per stream start and a few control entries.
/// The kernel wants the CQ at least as large, so small CQs get a smaller SQ.
const MAX_SQ_ENTRIES: u32 = 256;

/// A ring set up for zcrx, not yet registered.
///
/// Fields drop in declaration order: the fork handler forgets the descriptor before the
/// ring closes it, so the handler never closes a descriptor number that has been reused.
pub(crate) struct ZcrxRing {
    pub(crate) fork_guard: RingForkGuard,
    pub(crate) ring: Ring,
}

impl ZcrxRing {
    /// Creates a ring the way zcrx requires (single issuer, deferred task running, 32-byte
    /// CQEs) with `cq_entries` completion entries, kept out of forked children.
    pub(crate) fn new(cq_entries: u32) -> io::Result<ZcrxRing> {
        let (ring, fork_guard) = fork::create_ring(
            || {
                Ring::builder()
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_coop_taskrun()
                    // With COOP_TASKRUN the kernel flags pending deferred work in the SQ ring
                    // instead of interrupting; the driver enters with GETEVENTS every turn.
                    .setup_taskrun_flag()
                    .setup_submit_all()
                    .setup_cqsize(cq_entries)
                    .build(MAX_SQ_ENTRIES.min(cq_entries))
            },
            |ring| ring.as_raw_fd(),
        )?;
        Ok(ZcrxRing { fork_guard, ring })
    }
}

/// What a registration binds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueBinding {
    /// A hardware receive queue of a network interface.
    Interface { ifindex: u32, rx_queue: u32 },
    /// No device (`ZCRX_REG_NODEV`, Linux 7.1+): the kernel copies every byte into the area.
    NoDevice,
}

/// What memory backs the receive area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AreaBacking {
    /// Ordinary pages (one-page chunks).
    Pages,
    /// Reserved 2 MiB hugetlb pages (`MAP_HUGETLB`), from `vm.nr_hugepages`.
    HugeTlb,
    /// Transparent huge pages (`MADV_HUGEPAGE` on a 2 MiB-aligned mapping), checked to be
    /// backed by huge pages before registering.
    Transparent,
}

/// What to register.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZcrxRequest {
    pub(crate) binding: QueueBinding,
    /// Bytes of receive area (rounded up to whole pages of the mapping).
    pub(crate) area_size: usize,
    /// What memory backs the area (chunks larger than a page need 2 MiB pages).
    pub(crate) backing: AreaBacking,
    /// Refill ring entries to ask for (the kernel rounds up to a power of two).
    pub(crate) refill_entries: u32,
    /// Chunk size to ask for; 0 leaves the kernel's default (one page).
    pub(crate) rx_buf_len: u32,
    /// With `Some(user_data)`, ask for zcrx events (tagged with it) and the kernel's
    /// statistics in the refill region.
    pub(crate) event_user_data: Option<u64>,
}

/// Which preparation step failed before the kernel was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetupStep {
    MapArea,
    MapRegion,
    ExcludeFromFork,
}

impl SetupStep {
    /// The step in words, as in "could not {step}".
    pub(crate) fn describe(self) -> &'static str {
        match self {
            SetupStep::MapArea => "map the receive area",
            SetupStep::MapRegion => "map the refill region",
            SetupStep::ExcludeFromFork => "keep the area and refill region out of forked children",
        }
    }
}

/// Why a registration did not happen.
#[derive(Debug)]
pub(crate) enum RegisterError {
    /// Preparing the registration failed; the kernel was never asked.
    Setup { step: SetupStep, error: io::Error },
    /// The kernel refused `IORING_REGISTER_ZCRX_IFQ`.
    Refused(io::Error),
    /// A transparent huge page area the kernel backed with huge pages only in part
    /// (`backed` bytes of the area): its chunks would not be physically contiguous.
    NotHugeBacked { backed: u64 },
}

/// A live zcrx instance with everything it uses.
///
/// Fields drop in declaration order, and that order matters: the fork handler forgets the
/// ring first (see [`ZcrxRing`]); closing the ring destroys the zcrx instance (and restarts
/// the NIC queue); only then is its memory unmapped. The runtime takes the fields apart and
/// keeps the same order itself (its area outlives the ring).
pub(crate) struct ZcrxInstance {
    pub(crate) fork_guard: RingForkGuard,
    pub(crate) ring: Ring,
    pub(crate) region: Mapping,
    pub(crate) area: Mapping,
    /// The refill region's parts as requested.
    pub(crate) region_layout: RegionLayout,
    /// What the kernel wrote back: where the refill ring is in the region.
    pub(crate) offsets: io_uring_zcrx_offsets,
    /// Refill ring entries the kernel allocated (the request rounded up).
    pub(crate) rq_entries: u32,
    /// The token refill entries carry to name the area.
    pub(crate) area_token: u64,
    /// The chunk size the kernel uses; 0 if it did not say (the default: one page).
    pub(crate) rx_buf_len: u32,
    pub(crate) zcrx_id: u32,
}

impl ZcrxInstance {
    /// Registers `request` on `ring`: maps the area and the refill region, keeps both out of
    /// forked children (the kernel pins the area and writes both for the instance's
    /// lifetime), and asks the kernel.
    pub(crate) fn register(
        ring: ZcrxRing,
        request: &ZcrxRequest,
    ) -> Result<ZcrxInstance, RegisterError> {
        let setup = |step| move |error| RegisterError::Setup { step, error };
        let area = match request.backing {
            AreaBacking::Pages => Mapping::new(request.area_size, false),
            AreaBacking::HugeTlb => Mapping::new(request.area_size, true),
            AreaBacking::Transparent => Mapping::new_transparent_huge(request.area_size),
        }
        .map_err(setup(SetupStep::MapArea))?;
        if request.backing == AreaBacking::Transparent {
            let backed = hugepages::anon_huge_bytes(area.as_ptr() as usize)
                .map_err(setup(SetupStep::MapArea))?;
            if backed < area.len() as u64 {
                return Err(RegisterError::NotHugeBacked { backed });
            }
        }
        let region_layout = RegionLayout::new(
            request.refill_entries,
            page_size(),
            request.event_user_data.is_some(),
        );
        let region = Mapping::new(region_layout.len, false).map_err(setup(SetupStep::MapRegion))?;
        for mapping in [&area, &region] {
            fork::exclude_mapping(mapping).map_err(setup(SetupStep::ExcludeFromFork))?;
        }

        let mut area_reg = io_uring_zcrx_area_reg {
            addr: area.as_ptr() as u64,
            len: area.len() as u64,
            ..Default::default()
        };
        let mut region_desc = io_uring_region_desc {
            user_addr: region.as_ptr() as u64,
            size: region.len() as u64,
            flags: IORING_MEM_REGION_TYPE_USER,
            ..Default::default()
        };
        let event_desc = request.event_user_data.map(|user_data| zcrx_event_desc {
            user_data,
            type_mask: (1 << ZCRX_EVENT_ALLOC_FAIL) | (1 << ZCRX_EVENT_COPY),
            flags: ZCRX_EVENT_DESC_FLAG_STATS,
            stats_offset: region_layout.ring_len as u64,
            ..Default::default()
        });
        let (if_idx, if_rxq, flags) = match request.binding {
            QueueBinding::Interface { ifindex, rx_queue } => (ifindex, rx_queue, 0),
            QueueBinding::NoDevice => (0, 0, ZCRX_REG_NODEV),
        };
        let mut reg = io_uring_zcrx_ifq_reg {
            if_idx,
            if_rxq,
            rq_entries: request.refill_entries,
            flags,
            area_ptr: &mut area_reg as *mut io_uring_zcrx_area_reg as u64,
            region_ptr: &mut region_desc as *mut io_uring_region_desc as u64,
            rx_buf_len: request.rx_buf_len,
            event_desc: event_desc
                .as_ref()
                .map_or(0, |desc| desc as *const zcrx_event_desc as u64),
            ..Default::default()
        };
        // SAFETY: `area_reg`, `region_desc` and `event_desc` are locals that outlive the
        // call and are not borrowed elsewhere while the kernel reads and writes them. The
        // area and region are fresh mappings dedicated to this instance: no Rust reference to
        // them exists, everything reaches them through raw pointers and atomics, and
        // `ZcrxInstance` (or the runtime's area, after it) keeps them mapped until the ring,
        // and with it the instance, is gone.
        unsafe { register_zcrx_ifq(ring.ring.as_fd(), &mut reg) }
            .map_err(RegisterError::Refused)?;
        Ok(ZcrxInstance {
            fork_guard: ring.fork_guard,
            ring: ring.ring,
            region,
            area,
            region_layout,
            offsets: reg.offsets,
            rq_entries: reg.rq_entries,
            area_token: area_reg.rq_area_token,
            rx_buf_len: reg.rx_buf_len,
            zcrx_id: reg.zcrx_id,
        })
    }

    /// The refill ring's layout as the kernel reported it, checked against the region
    /// before any pointer is made from it: the offsets are the kernel's word.
    pub(crate) fn ring_layout(&self) -> Result<RingLayout, RingLayoutError> {
        self.region_layout.validate_ring(
            self.offsets.head,
            self.offsets.tail,
            self.offsets.rqes,
            self.rq_entries,
        )
    }
}
