//! Model checks of the refill-ring protocol with loom.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p zcrx-core --release --target-dir target/loom -- loom
//! ```
//!
//! Producers push concurrently while a fake kernel consumes. In every interleaving loom
//! explores (with the memory orderings the code uses):
//!
//! - every pushed entry is consumed exactly once, once the driver has flushed the overflow
//!   list (multiset equality);
//! - the kernel never reads a slot that is being written: loom reports any unsynchronised
//!   access to a slot as a data race, and consumed slots are poisoned, so reading one that
//!   was published but never rewritten shows up as `POISON`;
//! - nothing stays unpublished once all pushes have returned: the final consume takes no
//!   driver help except `flush_overflow`.
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use zcrx_core::accounting::{AccountingError, ChunkRefs};
use zcrx_core::refill::{FakeRefillRegion, PushOutcome, RefillRing};
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

/// Runs `f` under loom with a preemption bound, so that each model finishes in seconds; the
/// bound can be raised with `LOOM_MAX_PREEMPTIONS`.
fn check(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}

fn entry(id: u64) -> io_uring_zcrx_rqe {
    io_uring_zcrx_rqe {
        off: id,
        len: id as u32,
        __pad: 0,
    }
}

/// What one producer thread does.
#[derive(Clone, Copy)]
enum Pushes {
    /// `push` each id.
    Single(&'static [u64]),
    /// One `push_batch` of all ids.
    Batch(&'static [u64]),
}

impl Pushes {
    fn ids(self) -> &'static [u64] {
        match self {
            Self::Single(ids) | Self::Batch(ids) => ids,
        }
    }

    fn run(self, ring: &RefillRing) {
        match self {
            Self::Single(ids) => {
                for &id in ids {
                    let _ = ring.push(entry(id));
                }
            }
            Self::Batch(ids) => {
                let entries: Vec<_> = ids.iter().map(|&id| entry(id)).collect();
                let _ = ring.push_batch(&entries);
            }
        }
    }
}

/// Producers push concurrently with a kernel thread that consumes `kernel_rounds` times; then
/// the driver flushes overflow and the kernel drains. Checks exactly-once delivery.
fn producers_and_kernel(ring_entries: u32, start: u32, producers: &[Pushes], kernel_rounds: usize) {
    let (ring, kernel) = FakeRefillRegion::create_at(ring_entries, start).unwrap();
    let ring = Arc::new(ring);
    let threads: Vec<_> = producers
        .iter()
        .map(|&pushes| {
            let ring = Arc::clone(&ring);
            thread::spawn(move || pushes.run(&ring))
        })
        .collect();
    // The kernel runs concurrently only if it has rounds to do: an idle thread still costs
    // loom interleavings.
    let kernel_thread = if kernel_rounds > 0 {
        Ok(thread::spawn(move || {
            let mut kernel = kernel;
            let mut consumed = Vec::new();
            for _ in 0..kernel_rounds {
                kernel.consume_into(&mut consumed, usize::MAX);
            }
            (kernel, consumed)
        }))
    } else {
        Err(kernel)
    };
    for thread in threads {
        thread.join().unwrap();
    }
    let (mut kernel, mut consumed) = match kernel_thread {
        Ok(thread) => thread.join().unwrap(),
        Err(kernel) => (kernel, Vec::new()),
    };

    // All pushes have returned: what is in the ring must be published already. Drain it, then
    // let the driver move the overflow in, as many times as needed.
    loop {
        kernel.consume_into(&mut consumed, usize::MAX);
        if ring.flush_overflow() == 0 {
            break;
        }
    }
    assert!(!ring.has_overflow());
    assert_eq!(kernel.available(), 0);

    let mut got: Vec<u64> = consumed
        .iter()
        .map(|e| {
            assert_ne!(
                *e,
                FakeRefillRegion::POISON,
                "kernel read an unwritten slot"
            );
            assert_eq!(u64::from(e.len), e.off, "torn entry {e:?}");
            e.off
        })
        .collect();
    got.sort_unstable();
    let mut expected: Vec<u64> = producers.iter().flat_map(|p| p.ids()).copied().collect();
    expected.sort_unstable();
    assert_eq!(got, expected, "entries lost or duplicated");

    let stats = ring.stats();
    assert_eq!(stats.pushed, expected.len() as u64);
    assert_eq!(stats.published, expected.len() as u64);
}

#[test]
fn loom_two_producers_race_for_neighbouring_slots() {
    // Room for everything: checks claim, commit and cooperative publishing.
    check(|| {
        producers_and_kernel(4, 0, &[Pushes::Single(&[1, 2]), Pushes::Single(&[3, 4])], 1);
    });
}

#[test]
fn loom_three_producers_one_push_each() {
    // Three-way races on claim and publish; the kernel reads only after the pushes returned
    // (a fourth concurrent thread makes the model too large).
    check(|| {
        producers_and_kernel(
            4,
            0,
            &[
                Pushes::Single(&[1]),
                Pushes::Single(&[2]),
                Pushes::Single(&[3]),
            ],
            0,
        );
    });
}

#[test]
fn loom_full_ring_overflows_then_flush_loses_nothing() {
    // Two slots, four entries: some overflow unless the kernel consumes in between, and slots
    // are reused across laps (stale-tail path).
    check(|| {
        producers_and_kernel(2, 0, &[Pushes::Single(&[1, 2]), Pushes::Single(&[3, 4])], 2);
    });
}

#[test]
fn loom_batch_and_single_push_with_wrap_around() {
    // Indices cross u32::MAX during the run.
    check(|| {
        producers_and_kernel(
            2,
            u32::MAX,
            &[Pushes::Batch(&[1, 2, 3]), Pushes::Single(&[4])],
            1,
        );
    });
}

#[test]
fn loom_flush_races_with_producers_and_kernel() {
    // The driver flushes while a producer pushes into a full ring and the kernel consumes.
    check(|| {
        let (ring, mut kernel) = FakeRefillRegion::create(2).unwrap();
        let ring = Arc::new(ring);
        // Fill the ring and overflow one entry before the race starts.
        for id in 1..=3 {
            let _ = ring.push(entry(id));
        }
        let producer = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                let _ = ring.push(entry(4));
                let _ = ring.push(entry(5));
            })
        };
        let flusher = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || ring.flush_overflow())
        };
        // This thread is the kernel meanwhile.
        let mut consumed = kernel.consume(1);
        kernel.consume_into(&mut consumed, usize::MAX);
        producer.join().unwrap();
        flusher.join().unwrap();
        loop {
            kernel.consume_into(&mut consumed, usize::MAX);
            if ring.flush_overflow() == 0 {
                break;
            }
        }
        assert!(!ring.has_overflow());
        let mut got: Vec<u64> = consumed.iter().map(|e| e.off).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3, 4, 5]);
    });
}

#[test]
fn loom_double_return_is_detected_exactly_once() {
    check(|| {
        let refs = Arc::new(ChunkRefs::new(1));
        refs.on_delivered(0).unwrap();
        let other = {
            let refs = Arc::clone(&refs);
            thread::spawn(move || refs.on_returned(0))
        };
        let mine = refs.on_returned(0);
        let theirs = other.join().unwrap();
        let errors = [mine, theirs].iter().filter(|r| r.is_err()).count();
        assert_eq!(errors, 1);
        assert!(matches!(
            mine.or(theirs),
            Ok(()) | Err(AccountingError::DoubleReturn { chunk: 0 })
        ));
        assert_eq!(refs.outstanding(0), 0);
    });
}

/// The runtime's wake-up handshake around the refill ring, reduced to its atomics: the
/// driver's `sleeping` flag and `driver_waits_for_buffers` flag, a buffer drop on another
/// thread (`tokio-zcrx` `Area::return_chunk`: push, then wake the driver if the push
/// overflowed or the driver waits for buffers, writing the eventfd only if it sleeps), and
/// the driver's last look before it blocks (`Driver::submit_and_wait`: announce sleep,
/// `synchronize_with_producers`, then sleep only if no overflow arrived and no return came
/// while it waits for buffers).
///
/// The property: the driver never blocks while a return it must act on is pending and no
/// eventfd write is coming (a lost wake-up).
struct Handshake {
    ring: RefillRing,
    sleeping: AtomicBool,
    waits_for_buffers: AtomicBool,
    eventfd_written: AtomicBool,
}

impl Handshake {
    /// `DriverShared::wake`.
    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.eventfd_written.store(true, Ordering::Relaxed);
        }
    }

    /// `Area::return_chunk`.
    fn return_chunk(&self, id: u64) {
        let outcome = self.ring.push(entry(id));
        if outcome == PushOutcome::Overflowed || self.waits_for_buffers.load(Ordering::Relaxed) {
            self.wake();
        }
    }
}

/// Runs one return against the driver's last look before sleeping. `ring_full`: the return
/// overflows (the driver must flush it); `waiting`: the driver waits for any return.
fn wake_up_handshake(ring_full: bool, waiting: bool) {
    check(move || {
        let (ring, _kernel) = FakeRefillRegion::create(1).unwrap();
        if ring_full {
            // The kernel has not consumed this one: the next return overflows.
            assert_eq!(ring.push(entry(1)), PushOutcome::InRing);
        }
        let shared = Arc::new(Handshake {
            ring,
            sleeping: AtomicBool::new(false),
            waits_for_buffers: AtomicBool::new(false),
            eventfd_written: AtomicBool::new(false),
        });
        // Before the race, the driver saw no overflow (`return_buffers`) and counted the
        // returns so far (`resume_waiting_streams`).
        let returns_before = shared.ring.stats().pushed;
        let dropper = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || shared.return_chunk(2))
        };
        // The driver: nothing came back yet, so it asks drops to wake it ...
        if waiting {
            shared.waits_for_buffers.store(true, Ordering::Relaxed);
        }
        // ... announces sleep, and takes its last look.
        shared.sleeping.store(true, Ordering::SeqCst);
        shared.ring.synchronize_with_producers();
        let overflow_pending = shared.ring.has_overflow();
        let return_pending = waiting && shared.ring.stats().pushed != returns_before;
        let blocks = !overflow_pending && !return_pending;
        dropper.join().unwrap();
        if blocks {
            let must_be_woken = ring_full || waiting;
            assert!(
                !must_be_woken || shared.eventfd_written.load(Ordering::Relaxed),
                "lost wake-up: the driver sleeps with a return pending and no eventfd write \
                 (overflow {}, returns {})",
                shared.ring.has_overflow(),
                shared.ring.stats().pushed - returns_before,
            );
        }
    });
}

#[test]
fn loom_overflow_wakes_a_driver_about_to_sleep() {
    wake_up_handshake(true, false);
}

#[test]
fn loom_return_wakes_a_driver_waiting_for_buffers() {
    wake_up_handshake(false, true);
}

#[test]
fn loom_overflow_wakes_a_driver_waiting_for_buffers() {
    wake_up_handshake(true, true);
}
