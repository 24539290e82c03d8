//! Synchronisation primitives, swapped for [loom](https://docs.rs/loom)'s model-checked ones
//! when built with `RUSTFLAGS="--cfg loom"`.
//!
//! Every atomic, lock and shared cell that crosses threads in this crate comes from here, so
//! that loom explores every interleaving and weak-memory outcome of the real code, not of a copy.
//! [`UnsafeCell`] has loom's closure-based API (`with`, `with_mut`) in both builds: under loom it
//! reports data races on the cell, such as the fake kernel reading a refill entry that a producer
//! is still writing.

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Mutex;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;

/// `core::cell::UnsafeCell` with loom's access API.
///
/// `repr(transparent)`, so a pointer to kernel-shared `T`s can be cast to a pointer to
/// `UnsafeCell<T>`s.
#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a pointer for reading the value.
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with a pointer for writing the value.
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

pub(crate) use crate::pad::CachePadded;

/// Locks `mutex`, ignoring poisoning: the data behind our locks (lists of refill entries)
/// stays consistent whatever a panicking holder did, and must never be dropped.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> impl core::ops::DerefMut<Target = T> + '_ {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
