//! Sans-IO core of io_uring zero-copy receive (zcrx).
//!
//! This crate holds the parts of a zcrx runtime that are pure logic over memory: no system
//! calls, no rings of its own, no clocks, no async. The runtime (`tokio-zcrx`) owns the
//! io_uring, the registered area and refill region, and the threads; it feeds this crate what
//! it reads and acts on what this crate tells it. Keeping that logic here makes it testable
//! without a kernel, and lets the lock-free part be model-checked with loom.
//!
//! | module | what | who calls it |
//! |---|---|---|
//! | [`refill`] | [`RefillRing`](refill::RefillRing): lock-free multi-producer writer of the kernel's refill ring, with an overflow list so no return is ever lost | every thread that drops a buffer; the driver flushes overflow |
//! | [`completion`] | [`decode`](completion::decode): a 32-byte CQE to a validated [`Completion`](completion::Completion) | the driver, per CQE |
//! | [`user_data`] | the `user_data` tagging scheme, stream slots with generations | the driver, per SQE and CQE |
//! | [`accounting`] | [`ChunkRefs`](accounting::ChunkRefs): outstanding references per chunk, catches double returns | the driver on delivery, any thread on return |
//! | [`events`] | [`EventRearm`](events::EventRearm): when to re-arm zcrx events, rate-limited | the driver |
//! | [`receive`] | [`StreamReceive`](receive::StreamReceive): one stream's receive requests, when to submit, resubmit, cancel and finish | the driver, per stream |
//! | [`budget`] | [`BudgetPolicy`](budget::BudgetPolicy): how many bytes one stream may hold before it stops receiving, derived from the shared memory and the number of streams | both backends, per stream |
//! | [`query`] | [`QueryFeatures`](query::QueryFeatures): the zcrx query's answer decoded into features | the runtime before it registers; the capability probe |
//! | [`region`] | [`RegionLayout`](region::RegionLayout): the refill region's size and parts, and the check of the offsets the kernel reports | both registrations (runtime and probe trial) |
//! | [`pad`] | [`CachePadded`](pad::CachePadded): contended data on cache lines of its own | the refill ring; the runtime's area |
//!
//! # How a runtime uses it
//!
//! One driver thread owns the ring (`SINGLE_ISSUER | DEFER_TASKRUN | CQE32`) and the zcrx
//! instance. For every CQE it reaps it calls [`completion::decode`]:
//!
//! - [`Completion::Data`](completion::Completion::Data): count the reference
//!   ([`ChunkRefs::on_delivered`](accounting::ChunkRefs::on_delivered)) and hand a buffer
//!   for `area + area_offset .. + len` to the stream's reader. Dropping that buffer, on any
//!   thread, calls [`ChunkRefs::on_returned`](accounting::ChunkRefs::on_returned) and then
//!   [`RefillRing::push`](refill::RefillRing::push) with
//!   [`AreaLayout::refill_entry`](completion::AreaLayout::refill_entry): exactly one entry per
//!   data CQE. The driver returns many at once with
//!   [`RefillRing::push_batch`](refill::RefillRing::push_batch).
//! - [`Completion::End`](completion::Completion::End): the multishot receive is over;
//!   [`StreamReceive::on_end`](receive::StreamReceive::on_end) says what next (resubmit,
//!   wait, finish, remove), from [`CqeErrno::recv_action`](completion::CqeErrno::recv_action).
//! - [`Completion::Event`](completion::Completion::Event): feed
//!   [`EventRearm::on_event`](events::EventRearm::on_event); re-arm what
//!   [`EventRearm::due_rearms`](events::EventRearm::due_rearms) returns, and bound the wait
//!   with [`EventRearm::next_deadline`](events::EventRearm::next_deadline).
//! - An [`InvalidCompletion`](completion::InvalidCompletion): log it, and push its
//!   [`owed_refill`](completion::InvalidCompletion::owed_refill) if any so the chunk is not
//!   leaked.
//!
//! On every loop the driver also calls
//! [`RefillRing::flush_overflow`](refill::RefillRing::flush_overflow) when
//! [`has_overflow`](refill::RefillRing::has_overflow) says returns are waiting for ring space,
//! and, for a NODEV instance (whose kernel reads the refill ring only on
//! `ZCRX_CTRL_FLUSH_RQ`), issues that flush when
//! [`take_unflushed`](refill::RefillRing::take_unflushed) is non-zero.
//!
//! # Example
//!
//! Buffers returned from several threads reach the "kernel" exactly once each:
//!
//! ```
//! use std::sync::Arc;
//! use zcrx_core::completion::AreaLayout;
//! use zcrx_core::refill::FakeRefillRegion;
//!
//! let area = AreaLayout::new(64 * 4096, 4096, 0)?;
//! let (ring, mut kernel) = FakeRefillRegion::create(32)?;
//! let ring = Arc::new(ring);
//!
//! let threads: Vec<_> = (0..4u64)
//!     .map(|t| {
//!         let ring = Arc::clone(&ring);
//!         std::thread::spawn(move || {
//!             for i in 0..8 {
//!                 let chunk = t * 8 + i;
//!                 // Each returned buffer owes one refill entry.
//!                 let _ = ring.push(area.refill_entry(chunk * 4096, 4096));
//!             }
//!         })
//!     })
//!     .collect();
//! for thread in threads {
//!     thread.join().unwrap();
//! }
//! ring.flush_overflow(); // nothing overflows here: 32 slots for 32 returns
//!
//! let mut returned: Vec<u64> = kernel.consume(usize::MAX).iter().map(|e| e.off).collect();
//! returned.sort_unstable();
//! assert_eq!(returned, (0..32).map(|c| c * 4096).collect::<Vec<_>>());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Model checking
//!
//! The refill protocol is checked with loom:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p zcrx-core --release --target-dir target/loom -- loom
//! ```
#![warn(missing_docs)]

pub mod accounting;
pub mod budget;
pub mod completion;
pub mod events;
pub mod pad;
pub mod query;
pub mod receive;
pub mod refcount;
pub mod refill;
pub mod region;
mod sync;
pub mod user_data;
