//! Waking consumer tasks from a backend, with user code's panics contained.

use std::task::Waker;

/// Wakes a consumer task from the driver thread. A waker is user code (an executor's, or a
/// hand-written one): if it panics, that is this consumer's problem, not every stream's, so
/// the panic is contained and logged instead of ending the driver.
pub(crate) fn wake_contained(waker: Waker) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake())).is_err() {
        WAKER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!("tokio-zcrx: a task's waker panicked when woken; the driver carries on");
    }
}

/// Waker panics contained by [`wake_contained`], process-wide (tests read it).
pub(crate) static WAKER_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
