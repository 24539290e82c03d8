//! The driver's stream table: one entry per attached stream, indexed by its slot, and the
//! buffers of the current reap waiting to be handed over.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use zcrx_core::receive::StreamReceive;
use zcrx_core::user_data::{StreamGenerations, StreamId};

use super::super::StreamShared;
use crate::buf::ZcBuf;

/// One attached stream, as the driver sees it.
pub(super) struct StreamEntry {
    pub(super) id: StreamId,
    /// Keeps the socket open while the kernel may use it.
    socket: Arc<std::net::TcpStream>,
    /// What the stream's reader sees: buffers, its end, whether its request is done.
    pub(super) shared: Arc<StreamShared>,
    /// Where its receive request is, and what to do next (zcrx_core::receive).
    pub(super) receive: StreamReceive,
    /// Buffers of the current reap, delivered in one lock.
    pending: Vec<ZcBuf>,
    /// Its budget in bytes if fixed (`StreamOptions::budget`, else `Builder::stream_budget`);
    /// `None`: derived from the area and the number of streams.
    pub(super) fixed_budget: Option<u64>,
    /// Its slot's tag in its buffers (`holdings.rs`; 0: untracked, no budget).
    pub(super) tag: u64,
    /// NIC mode: its socket's receive buffer in chunks (`budgets.rs`; 0: not set yet), and
    /// the bytes it received since it was last set.
    pub(super) rcvbuf_chunks: u64,
    pub(super) received_since: u64,
}

impl StreamEntry {
    pub(super) fn new(
        id: StreamId,
        socket: Arc<std::net::TcpStream>,
        shared: Arc<StreamShared>,
        read_limit: Option<u32>,
        fixed_budget: Option<u64>,
        tag: u64,
    ) -> StreamEntry {
        StreamEntry {
            id,
            socket,
            shared,
            receive: StreamReceive::new(read_limit),
            pending: Vec::new(),
            fixed_budget,
            tag,
            rcvbuf_chunks: 0,
            received_since: 0,
        }
    }

    /// Its socket, for socket options.
    pub(super) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.socket)
    }

    /// The socket itself (a stream handed over to another queue's driver takes it along).
    pub(super) fn socket_arc(&self) -> Arc<std::net::TcpStream> {
        Arc::clone(&self.socket)
    }

    pub(super) fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// The attached streams by slot (zcrx_core::user_data's slots, reused last-freed first, so
/// the table stays small and dense).
#[derive(Default)]
pub(super) struct Streams {
    slots: Vec<Option<StreamEntry>>,
    /// Slots with buffers in `pending` this reap.
    touched: Vec<u32>,
    /// Entries in `slots`.
    live: usize,
}

impl Streams {
    pub(super) fn insert(&mut self, entry: StreamEntry) {
        let slot = entry.id.slot() as usize;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        if self.slots[slot].replace(entry).is_none() {
            self.live += 1;
        }
    }

    /// The entry in `slot`, whichever stream it is.
    pub(super) fn get(&self, slot: u32) -> Option<&StreamEntry> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, slot: u32) -> Option<&mut StreamEntry> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// The entry of stream `key`: none if its slot holds another generation.
    pub(super) fn entry_mut(&mut self, key: StreamId) -> Option<&mut StreamEntry> {
        self.get_mut(key.slot()).filter(|e| e.id == key)
    }

    /// Takes the entry out of `slot`.
    pub(super) fn take(&mut self, slot: u32) -> Option<StreamEntry> {
        let entry = self.slots.get_mut(slot as usize).and_then(Option::take);
        self.live -= usize::from(entry.is_some());
        entry
    }

    /// Attached streams (what derived budgets are shared among).
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Every slot that may hold an entry, for loops that act on entries one by one.
    pub(super) fn slots(&self) -> std::ops::Range<u32> {
        0..self.slots.len() as u32
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut StreamEntry> {
        self.slots.iter_mut().flatten()
    }

    /// Receive requests the kernel still holds.
    pub(super) fn live_requests(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|e| e.receive.request_is_live())
            .count()
    }

    /// Queues `buf` for the stream in `slot` until [`Self::deliver`].
    pub(super) fn push_buffer(&mut self, slot: u32, buf: ZcBuf) {
        let entry = self.slots[slot as usize]
            .as_mut()
            .expect("the caller checked the slot");
        if entry.pending.is_empty() {
            self.touched.push(slot);
        }
        entry.pending.push(buf);
    }

    /// Hands each touched stream its buffers of this reap, one lock and one wake each.
    pub(super) fn deliver(&mut self) {
        for slot in self.touched.drain(..) {
            if let Some(entry) = self.slots[slot as usize].as_mut() {
                if !entry.pending.is_empty() {
                    entry.shared.deliver(&mut entry.pending);
                }
            }
        }
    }
}

/// What [`zcrx_core::completion::decode`] checks a completion's stream generation against.
impl StreamGenerations for Streams {
    fn current_generation(&self, slot: u32) -> Option<u32> {
        self.get(slot).map(|e| e.id.generation())
    }
}
