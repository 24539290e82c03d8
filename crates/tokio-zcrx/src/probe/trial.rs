//! Register one zcrx instance and tear it down again: the probe's ground truth.
//!
//! A registration needs a ring set up the way zcrx requires, an area to receive into and a
//! refill region, all alive while the kernel holds them. [`Registration`] owns the three and
//! releases them in the right order; the runtime's own instance setup will grow from it.

use std::io;
use std::os::fd::AsFd;

use io_uring::{cqueue, squeue, IoUring};
use zcrx_sys::region::{io_uring_region_desc, IORING_MEM_REGION_TYPE_USER};
use zcrx_sys::zcrx::{
    io_uring_zcrx_area_reg, io_uring_zcrx_ifq_reg, register_zcrx_ifq, ZCRX_REG_NODEV,
};

use super::system::page_size;
use crate::sys::mem::Mapping;

/// Pages in the trial area: enough for the kernel to accept it, small enough to pin anywhere.
const TRIAL_AREA_PAGES: usize = 16;
/// Refill ring entries of a trial registration (the kernel rounds up to a power of two).
const TRIAL_RQ_ENTRIES: u32 = 64;
/// Size of one refill entry (`io_uring_zcrx_rqe`).
const RQE_SIZE: usize = 16;
/// SQ entries of the trial ring; it never submits anything.
const TRIAL_RING_ENTRIES: u32 = 8;

/// What a registration binds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A hardware receive queue of a network interface.
    Interface { ifindex: u32, rx_queue: u32 },
    /// No device (`ZCRX_REG_NODEV`, Linux 7.1+): the kernel copies every byte into the area.
    NoDevice,
}

/// Why a registration did not happen.
#[derive(Debug)]
pub(crate) enum TrialError {
    /// Preparing the registration failed (ring setup, memory); the kernel was never asked.
    Setup {
        step: &'static str,
        error: io::Error,
    },
    /// The kernel refused `IORING_REGISTER_ZCRX_IFQ`.
    Refused(io::Error),
}

/// A live zcrx registration with everything it uses.
///
/// Fields drop in declaration order, and that order matters: closing the ring destroys the
/// zcrx instance (and restarts the NIC queue), only then is its memory unmapped.
pub(crate) struct Registration {
    _ring: IoUring<squeue::Entry, cqueue::Entry32>,
    _refill_region: Mapping,
    _area: Mapping,
}

impl Registration {
    /// Sets up a ring the way zcrx requires (single issuer, deferred task running, 32-byte
    /// CQEs) and registers a small zcrx instance on `target`.
    pub(crate) fn register(target: Target) -> Result<Self, TrialError> {
        let ring = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(TRIAL_RING_ENTRIES)
            .map_err(|error| TrialError::Setup {
                step: "set up a zcrx ring (SINGLE_ISSUER | DEFER_TASKRUN | CQE32)",
                error,
            })?;

        let page = page_size();
        let area =
            Mapping::new(TRIAL_AREA_PAGES * page, false).map_err(|error| TrialError::Setup {
                step: "map the receive area",
                error,
            })?;
        // Before the zcrx query (6.19) the refill ring header size is not reported: a whole
        // page in front of the entries covers every kernel (the header is 64 bytes on 6.18+).
        let refill_len = align_up(TRIAL_RQ_ENTRIES as usize * RQE_SIZE + page, page);
        let refill_region = Mapping::new(refill_len, false).map_err(|error| TrialError::Setup {
            step: "map the refill region",
            error,
        })?;

        let mut area_reg = io_uring_zcrx_area_reg {
            addr: area.as_ptr() as u64,
            len: area.len() as u64,
            ..Default::default()
        };
        let mut region_desc = io_uring_region_desc {
            user_addr: refill_region.as_ptr() as u64,
            size: refill_len as u64,
            flags: IORING_MEM_REGION_TYPE_USER,
            ..Default::default()
        };
        let (if_idx, if_rxq, flags) = match target {
            Target::Interface { ifindex, rx_queue } => (ifindex, rx_queue, 0),
            Target::NoDevice => (0, 0, ZCRX_REG_NODEV),
        };
        let mut reg = io_uring_zcrx_ifq_reg {
            if_idx,
            if_rxq,
            rq_entries: TRIAL_RQ_ENTRIES,
            flags,
            area_ptr: &mut area_reg as *mut io_uring_zcrx_area_reg as u64,
            region_ptr: &mut region_desc as *mut io_uring_region_desc as u64,
            ..Default::default()
        };
        // SAFETY: `area_ptr` and `region_ptr` point to locals that outlive the call and are not
        // borrowed elsewhere while the kernel reads and writes them back; `event_desc` is 0.
        // The area and the refill region are fresh mappings dedicated to this instance: no
        // Rust reference to them exists, and `Registration` keeps them mapped until after
        // the ring (and with it the instance) is gone.
        unsafe { register_zcrx_ifq(ring.as_fd(), &mut reg) }.map_err(TrialError::Refused)?;

        Ok(Self {
            _ring: ring,
            _refill_region: refill_region,
            _area: area,
        })
    }

    /// Closes the ring, which destroys the zcrx instance, then unmaps its memory.
    pub(crate) fn tear_down(self) {
        drop(self);
    }
}

/// Registers on `target` and tears the instance down at once.
pub(crate) fn register_once(target: Target) -> Result<(), TrialError> {
    Registration::register(target).map(Registration::tear_down)
}

fn align_up(value: usize, alignment: usize) -> usize {
    value.div_ceil(alignment) * alignment
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_region_covers_header_and_entries() {
        assert_eq!(align_up(64 * 16 + 4096, 4096), 8192);
        assert_eq!(align_up(256 * 16 + 4096, 4096), 8192);
        assert_eq!(align_up(257 * 16 + 4096, 4096), 12288);
    }
}
