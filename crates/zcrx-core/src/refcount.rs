//! A reference count whose increments come in bulk.
//!
//! Buffers keep their receive area alive. An `Arc` per buffer makes the thread that creates
//! buffers (the driver) and the threads that drop them (Tokio workers) take turns owning one
//! cache line, twice per buffer. [`BulkRefCount`] lets the creator add references in batches
//! from a local [`Credit`], so per buffer only the drop touches the shared count. It is
//! `Arc`'s protocol otherwise: decrements release, and the holder that brings the count to
//! zero fences with acquire before it frees, so every other holder's accesses happen before.
//!
//! ```
//! use zcrx_core::refcount::{BulkRefCount, Credit};
//!
//! let count = BulkRefCount::new();
//! let mut credit = Credit::new(&count, 4);
//! credit.take(&count); // one reference for a buffer
//! credit.take(&count); // and another
//! assert!(!count.release(1)); // a buffer is dropped
//! assert!(!credit.release(&count)); // the creator is done; one buffer is still out
//! assert!(count.release(1)); // the last buffer: free the shared object now
//! ```

use crate::sync::{AtomicUsize, Ordering};

/// The shared count. Starts at zero; a [`Credit`] adds the first references.
#[derive(Debug)]
pub struct BulkRefCount {
    count: AtomicUsize,
}

impl Default for BulkRefCount {
    fn default() -> Self {
        Self::new()
    }
}

impl BulkRefCount {
    /// A count of zero.
    #[must_use]
    pub fn new() -> Self {
        Self {
            count: AtomicUsize::new(0),
        }
    }

    /// Gives back `n` references; `true` means they were the last ones, and the caller now
    /// owns the shared object exclusively (after an acquire fence, done here).
    #[must_use = "the holder of the last reference must free the shared object"]
    pub fn release(&self, n: usize) -> bool {
        let before = self.count.fetch_sub(n, Ordering::Release);
        debug_assert!(before >= n, "released {n} of {before} references");
        if before == n {
            #[cfg(loom)]
            loom::sync::atomic::fence(Ordering::Acquire);
            #[cfg(not(loom))]
            std::sync::atomic::fence(Ordering::Acquire);
            return true;
        }
        false
    }

    /// The references currently counted (for tests and statistics; racy by nature).
    #[must_use]
    pub fn current(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// References added to a [`BulkRefCount`] ahead of time by one thread, handed out one by one.
///
/// The credit never drops to zero while it exists: it tops up while it still holds one, so
/// the shared count cannot reach zero under the feet of its owner.
#[derive(Debug)]
pub struct Credit {
    left: usize,
    batch: usize,
}

impl Credit {
    /// Adds `batch` (at least 2) references to `count` for this credit.
    ///
    /// # Panics
    ///
    /// If `batch` is below 2.
    #[must_use]
    pub fn new(count: &BulkRefCount, batch: usize) -> Self {
        assert!(batch >= 2, "a credit batch must be at least 2");
        count.count.fetch_add(batch, Ordering::Relaxed);
        Self { left: batch, batch }
    }

    /// Takes one reference for a new holder (who gives it back with
    /// [`BulkRefCount::release`]).
    pub fn take(&mut self, count: &BulkRefCount) {
        if self.left == 1 {
            // Relaxed, like `Arc::clone`: we hold a reference, so the count cannot be zero.
            count.count.fetch_add(self.batch, Ordering::Relaxed);
            self.left += self.batch;
        }
        self.left -= 1;
    }

    /// Gives back what is left of the credit; `true` means those were the last references.
    #[must_use = "the holder of the last reference must free the shared object"]
    pub fn release(self, count: &BulkRefCount) -> bool {
        count.release(self.left)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn credit_tops_up_before_running_out() {
        let count = BulkRefCount::new();
        let mut credit = Credit::new(&count, 2);
        for _ in 0..10 {
            credit.take(&count);
        }
        // Ten holders plus what the credit keeps.
        assert!(count.current() >= 11);
        for _ in 0..10 {
            assert!(!count.release(1));
        }
        assert!(credit.release(&count));
        assert_eq!(count.current(), 0);
    }

    #[test]
    fn the_credit_can_be_last() {
        let count = BulkRefCount::new();
        let mut credit = Credit::new(&count, 8);
        credit.take(&count);
        assert!(!count.release(1));
        assert!(credit.release(&count));
    }
}
