//! Register one zcrx instance and tear it down again: the probe's ground truth.
//!
//! The registration itself is the runtime's (`crate::sys::registration`: ring, area and refill region,
//! released in the right order), with the smallest sizes the kernel accepts; this file only
//! picks the sizes and turns a failure into what the probe reports.

use std::io;

use crate::sys::page_size;
use crate::sys::registration::{
    AreaBacking, QueueBinding, RegisterError, ZcrxInstance, ZcrxRequest, ZcrxRing,
};

/// Pages in the trial area: enough for the kernel to accept it, small enough to pin anywhere.
const TRIAL_AREA_PAGES: usize = 16;
/// Refill ring entries of a trial registration (the kernel rounds up to a power of two).
const TRIAL_RQ_ENTRIES: u32 = 64;
/// CQ entries of the trial ring; it never submits anything.
const TRIAL_CQ_ENTRIES: u32 = 16;

/// Why a trial registration did not happen.
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

/// Registers a small zcrx instance on `binding` and tears it down at once: closing the ring
/// destroys the instance (and restarts the NIC queue), then its memory is unmapped.
pub(crate) fn register_once(binding: QueueBinding) -> Result<(), TrialError> {
    let ring = ZcrxRing::new(TRIAL_CQ_ENTRIES).map_err(|error| TrialError::Setup {
        step: "set up a zcrx ring (SINGLE_ISSUER | DEFER_TASKRUN | CQE32)",
        error,
    })?;
    let request = ZcrxRequest {
        binding,
        area_size: TRIAL_AREA_PAGES * page_size(),
        backing: AreaBacking::Pages,
        refill_entries: TRIAL_RQ_ENTRIES,
        rx_buf_len: 0,
        event_user_data: None,
    };
    match ZcrxInstance::register(ring, &request) {
        Ok(instance) => {
            drop(instance);
            Ok(())
        }
        Err(RegisterError::Setup { step, error }) => Err(TrialError::Setup {
            step: step.describe(),
            error,
        }),
        Err(RegisterError::Refused(error)) => Err(TrialError::Refused(error)),
        // Only transparent huge page areas are checked; the trial's area is of small pages.
        Err(RegisterError::NotHugeBacked { .. }) => Err(TrialError::Setup {
            step: "back the area with huge pages",
            error: io::Error::from_raw_os_error(libc::ENOMEM),
        }),
    }
}
