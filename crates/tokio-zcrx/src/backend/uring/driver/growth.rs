//! Growing the receive memory under load (`Builder::area_growth`, Linux 7.3+): the driver
//! adds a kernel area with `ZCRX_CTRL_ADD_AREA` when receives run short of chunks, up to the
//! policy's maximum.
//!
//! What makes it grow, and why these:
//! - an `ALLOC_FAIL` event (NIC mode, 7.2+): the page pool found no chunk, so the NIC is
//!   dropping packets now; the kernel's refill path takes chunks from every area, so a new
//!   one ends the drops at once;
//! - a receive ending with `ENOMEM` while the application holds half the memory or more:
//!   the copy path (all of NODEV mode, and loopback or other-queue traffic on a NIC) found no
//!   free chunk in any area, and it would otherwise wait for the application to return
//!   buffers. With less held, the chunks are on their way back (returned, not yet taken by
//!   the kernel, which in NODEV mode takes them only on a flush): the receive waits for the
//!   flush instead, as without the policy;
//! - memory pressure: the application holds three quarters of the memory (as
//!   `MemoryHighWater`), counting in NIC mode the receive buffers the runtime gave budgeted
//!   sockets (what they queue is in the area too). Growing here comes before either failure:
//!   the other two are late signals (a drop has happened, or a receive has stopped). Without
//!   budgets TCP sizes the sockets' buffers itself, unseen, and a drop may come first;
//! - NIC mode, what the kernel may take before the driver looks again
//!   ([`Driver::grow_ahead_of_the_nic`]): what the application holds, the room of every
//!   running budgeted receive, the sockets' receive buffers, and the page pool's reserve
//!   ([`PAGE_POOL_RESERVE_CHUNKS`]) must fit in the memory. Holdings are only seen once a
//!   reap has delivered them, and one reap can deliver a stream's whole room (seen in the
//!   guest: 0 to 228 chunks held in one reap, on a 256-chunk area): looking at holdings
//!   alone, the area grew after the NIC had found no chunk.
//!
//! A failed addition (no memory to map, the kernel's answer) is logged, counted in
//! `Stats::faults_survived`, and not retried for [`RETRY_AFTER_FAILURE`]: the area stays as
//! it is, which is how it would be without the policy.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zcrx_core::budget::BudgetPolicy;
use zcrx_core::completion::AreaLayout;
use zcrx_sys::zcrx::io_uring_zcrx_area_reg;

use super::super::ring::CompletionRing;
use super::Driver;
use crate::config::GrowthPlan;
use crate::event::EventKind;
use crate::sys::fork;
use crate::sys::mem::Mapping;

/// After an addition failed, the next try waits this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// NIC mode: chunks the NIC's page pool may hold that neither the application nor a socket
/// does. When its cache runs empty the kernel refills it with up to `PP_ALLOC_CACHE_REFILL`
/// (64 on 4 KiB pages) chunks at once, from the refill ring or else the areas' free lists
/// (`io_pp_zc_alloc_netmems`, io_uring/zcrx.c; include/net/page_pool/types.h), and the
/// driver takes them from that cache one per buffer of a packet (a packet needs up to
/// `MAX_SKB_FRAGS`, 17). A NIC whose pool finds no chunk drops the packet. One refill
/// batch stays free beyond what the application and the sockets may take.
pub(crate) const PAGE_POOL_RESERVE_CHUNKS: u64 = 64;

/// The growth policy in force (`None` in the driver without one, or on a kernel without
/// `ZCRX_CTRL_ADD_AREA`).
#[derive(Debug)]
pub(crate) struct Growth {
    plan: GrowthPlan,
    /// Areas of chunks larger than a page are backed by huge pages, as the first.
    huge_pages: bool,
    /// After a failure: no try before this.
    retry_at: Option<Instant>,
}

impl Growth {
    pub(crate) fn new(plan: GrowthPlan, huge_pages: bool) -> Growth {
        Growth {
            plan,
            huge_pages,
            retry_at: None,
        }
    }
}

/// Why the driver grows the memory (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GrowthTrigger {
    /// The kernel's `ALLOC_FAIL` event.
    AllocationFailure,
    /// A receive ended with `ENOMEM`.
    ReceiveOutOfMemory,
    /// The application holds three quarters of the memory.
    Pressure,
    /// NIC mode: what the kernel may take before the driver looks again does not leave the
    /// page pool its reserve.
    NicReserve,
}

impl<R: CompletionRing> Driver<R> {
    /// NIC mode, under a growth policy with room left: adds areas until what the kernel may
    /// take before the driver looks again leaves the NIC's page pool its reserve, or the
    /// maximum is reached.
    ///
    /// What the kernel may take: the chunks the application holds; for every budgeted stream
    /// with a running receive, the rest of its budget (the kernel delivers up to the
    /// request's limit without the driver seeing it, and the stream's socket refills as it
    /// does); the receive buffers the runtime gave the sockets (`Driver::rcvbuf_total`). And
    /// [`PAGE_POOL_RESERVE_CHUNKS`] on top for the page pool. An unbudgeted stream's window
    /// is TCP's, unseen: only what it holds counts.
    ///
    /// Called before each submission (a request's room counts from then on) and after each
    /// reap; O(streams), and only while the policy may still add an area.
    pub(super) fn grow_ahead_of_the_nic(&mut self) {
        if self.nodev || self.stopping.is_some() || !self.may_grow() {
            return;
        }
        let chunk = u64::from(self.area.chunk_size);
        let mut committed = self.area.memory_held() / chunk + self.rcvbuf_total;
        for slot in self.streams.slots() {
            let Some(entry) = self.streams.get(slot) else {
                continue;
            };
            if !entry.receive.request_is_live() {
                continue;
            }
            if let Some(budget) = self.budget(slot) {
                let held = self.area.holdings.held(entry.tag);
                committed += (budget.high.div_ceil(chunk)).saturating_sub(held);
            }
        }
        let needed = committed + PAGE_POOL_RESERVE_CHUNKS;
        while needed > self.area.len() as u64 / chunk {
            if !self.grow(GrowthTrigger::NicReserve) {
                return;
            }
        }
    }

    /// Whether the policy may still add an area (now: no failure too recent).
    fn may_grow(&self) -> bool {
        let Some(growth) = &self.growth else {
            return false;
        };
        growth.retry_at.is_none_or(|at| Instant::now() >= at)
            && self.area.len() + self.area.chunk_size as usize <= growth.plan.maximum
            && self.area.area_count() < self.area.max_areas()
    }

    /// Adds one kernel area if the policy has room for it and no failure is too recent;
    /// returns whether it did.
    pub(super) fn grow(&mut self, trigger: GrowthTrigger) -> bool {
        let Some(growth) = &self.growth else {
            return false;
        };
        let now = Instant::now();
        if growth.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        let chunk = self.area.chunk_size as usize;
        let room = growth.plan.maximum.saturating_sub(self.area.len());
        // The last step may be smaller, but an area holds at least one chunk.
        let len = growth.plan.step.min(room) / chunk * chunk;
        if len == 0 || self.area.area_count() >= self.area.max_areas() {
            return false;
        }
        let huge_pages = growth.huge_pages;
        match self.add_area(len, huge_pages) {
            Ok(id) => {
                self.budget_policy =
                    BudgetPolicy::new(self.area.len() as u64, u64::from(self.area.chunk_size));
                tracing::info!(
                    ?trigger,
                    area = id,
                    bytes = len,
                    capacity = self.area.len(),
                    areas = self.area.area_count(),
                    "tokio-zcrx: the receive area grew"
                );
                self.emit(EventKind::AreaGrown);
                true
            }
            Err(e) => {
                self.area
                    .counters
                    .failed_area_additions
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    ?trigger,
                    error = %e,
                    bytes = len,
                    capacity = self.area.len(),
                    "tokio-zcrx: could not add a receive area (ZCRX_CTRL_ADD_AREA); the area \
                     stays as it is, next try in {RETRY_AFTER_FAILURE:?}"
                );
                if let Some(growth) = &mut self.growth {
                    growth.retry_at = Some(now + RETRY_AFTER_FAILURE);
                }
                false
            }
        }
    }

    /// Maps `len` bytes, registers them with the kernel and makes them the next kernel
    /// area; returns its id.
    fn add_area(&mut self, len: usize, huge_pages: bool) -> io::Result<u16> {
        let memory = Mapping::new(len, huge_pages)?;
        // The kernel writes into the area for the instance's lifetime: a forked child must
        // not get a copy-on-write copy of it (as for the first area, sys/registration.rs).
        fork::exclude_mapping(&memory)?;
        let mut reg = io_uring_zcrx_area_reg {
            addr: memory.as_ptr() as u64,
            len: memory.len() as u64,
            ..Default::default()
        };
        // SAFETY: on success the mapping moves into the `Area` (or is leaked, below), which
        // outlives the ring: the driver drops the ring before its `Area` reference, and an
        // `Area` that keeps the ring closes it before its memory (`close_with_last_buffer`).
        // No reference to the fresh mapping's bytes exists.
        unsafe { self.ring.add_area(&mut reg) }?;
        let token = reg.rq_area_token;
        let checked = AreaLayout::new(memory.len() as u64, self.area.chunk_size, token);
        // Into the area's table first, then into the decoder's set: a completion is only
        // accepted for an area whose memory the table has.
        let id = match self.area.add_kernel_area(memory, token) {
            Ok(id) => id,
            Err(memory) => {
                // The kernel has it and may write into it until the ring closes: it must
                // stay mapped, unused (its completions are rejected as a foreign token).
                std::mem::forget(memory);
                return Err(io::Error::other(format!(
                    "the kernel gave the new area token {token:#x}, beyond the {} areas \
                     planned or already taken",
                    self.area.max_areas()
                )));
            }
        };
        let pushed = checked
            .map_err(|e| e.to_string())
            .and_then(|layout| self.layout.push(layout).map_err(|e| e.to_string()));
        match pushed {
            Ok(pushed) if pushed == id => Ok(id),
            Ok(pushed) => Err(io::Error::other(format!(
                "the new area is {pushed} for the decoder, {id} for the table"
            ))),
            // Kept mapped in the table; its completions are rejected (and counted).
            Err(e) => Err(io::Error::other(format!("the kernel's new area: {e}"))),
        }
    }
}
