//! Model checks of the bulk reference count with loom.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p zcrx-core --release --test loom_refcount
//! ```
//!
//! A creator hands references to holders on other threads, then drops its credit. In every
//! interleaving exactly one release reports "last", and the data every holder touched is
//! visible to it (loom reports a race otherwise).
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use zcrx_core::refcount::{BulkRefCount, Credit};

struct Shared {
    count: BulkRefCount,
    data: UnsafeCell<u64>,
    lasts: AtomicUsize,
}

fn last(shared: &Shared) {
    // The "free": must see every holder's write, or loom reports a data race.
    shared.data.with_mut(|p| unsafe { *p = 0 });
    shared.lasts.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn loom_exactly_one_last_release_after_every_holder() {
    loom::model(|| {
        let shared = Arc::new(Shared {
            count: BulkRefCount::new(),
            data: UnsafeCell::new(0),
            lasts: AtomicUsize::new(0),
        });
        let mut credit = Credit::new(&shared.count, 2);
        let holders: Vec<_> = (0..2)
            .map(|i| {
                credit.take(&shared.count);
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    // Holders only read the data; the creator initialised it.
                    shared
                        .data
                        .with(|p| unsafe { std::hint::black_box(*p + i) });
                    if shared.count.release(1) {
                        last(&shared);
                    }
                })
            })
            .collect();
        if credit.release(&shared.count) {
            last(&shared);
        }
        for holder in holders {
            holder.join().unwrap();
        }
        assert_eq!(shared.lasts.load(Ordering::Relaxed), 1);
        assert_eq!(shared.count.current(), 0);
    });
}
