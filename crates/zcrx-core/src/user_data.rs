//! The `user_data` tagging scheme: what each completion belongs to.
//!
//! Every SQE the runtime submits, and the zcrx event descriptor it registers, carries a
//! [`UserData`]:
//!
//! ```text
//!  63      56 55                      32 31                             0
//! +----------+--------------------------+--------------------------------+
//! |   kind   |  generation (24 bits)    |          stream slot           |  Recv, Cancel
//! +----------+--------------------------+--------------------------------+
//! |   kind   |                 payload (56 bits)                         |  Wake, Internal
//! +----------+-----------------------------------------------------------+
//! |  Event   |                       0                                   |  the zcrx event
//! +----------+-----------------------------------------------------------+
//! ```
//!
//! Kind 0 is never used, so a zeroed `user_data` (a forgotten field, a stray NOP) is rejected
//! instead of being taken for stream 0.
//!
//! A stream's *slot* is reused after the stream closes; its *generation* changes on every
//! reuse, so a completion that arrives for a closed stream (e.g. the tail of a multishot
//! receive racing with its cancellation) is recognised as stale instead of being delivered to
//! the slot's next owner. [`StreamSlots`] hands out slots and generations; a runtime with its
//! own slab can instead implement [`StreamGenerations`].

use core::fmt;

/// Bit position of the kind tag in a `user_data`.
pub const KIND_SHIFT: u32 = 56;

/// The payload bits below the kind tag.
pub const PAYLOAD_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// What a `user_data` belongs to (its top byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum UserDataKind {
    /// A stream's multishot `RECV_ZC` request; the payload is a [`StreamId`].
    Recv = 1,
    /// The zcrx event descriptor's `user_data` ([`UserData::EVENT`]).
    Event = 2,
    /// A request that wakes the driver (e.g. an eventfd read or a `MSG_RING` target); the
    /// payload is the runtime's.
    Wake = 3,
    /// An `ASYNC_CANCEL` of a stream's receive; the payload is the target's [`StreamId`].
    Cancel = 4,
    /// Any other request of the runtime's (timeouts, closes, ...); the payload is the
    /// runtime's.
    Internal = 5,
}

impl UserDataKind {
    /// The kind with top-byte value `tag`, if any.
    #[must_use]
    pub const fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            1 => Self::Recv,
            2 => Self::Event,
            3 => Self::Wake,
            4 => Self::Cancel,
            5 => Self::Internal,
            _ => return None,
        })
    }

    /// This kind's top-byte value.
    #[must_use]
    pub const fn tag(self) -> u8 {
        self as u8
    }
}

/// A stream's identity in completions: a reusable slot plus the generation that tells its
/// successive users apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId {
    slot: u32,
    generation: u32,
}

impl StreamId {
    /// Number of generation bits carried in a `user_data`; generations wrap modulo
    /// `1 << GENERATION_BITS`.
    pub const GENERATION_BITS: u32 = 24;

    /// Mask of the generation bits.
    pub const GENERATION_MASK: u32 = (1 << Self::GENERATION_BITS) - 1;

    /// A stream id; `generation` is taken modulo `1 << GENERATION_BITS`.
    #[must_use]
    pub const fn new(slot: u32, generation: u32) -> Self {
        Self {
            slot,
            generation: generation & Self::GENERATION_MASK,
        }
    }

    /// The slot (index into the runtime's stream table).
    #[must_use]
    pub const fn slot(self) -> u32 {
        self.slot
    }

    /// The generation, below `1 << GENERATION_BITS`.
    #[must_use]
    pub const fn generation(self) -> u32 {
        self.generation
    }

    const fn to_payload(self) -> u64 {
        ((self.generation as u64) << 32) | self.slot as u64
    }

    const fn from_payload(payload: u64) -> Self {
        Self::new(payload as u32, (payload >> 32) as u32)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {}#{}", self.slot, self.generation)
    }
}

/// A tagged `user_data` value: kind in the top byte, payload below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserData(u64);

impl UserData {
    /// The `user_data` to register in
    /// [`zcrx_event_desc::user_data`](zcrx_sys::event::zcrx_event_desc::user_data): zcrx event
    /// CQEs carry it.
    pub const EVENT: Self = Self((UserDataKind::Event as u64) << KIND_SHIFT);

    /// `kind` with `payload`, or `None` if the payload does not fit in
    /// [`PAYLOAD_MASK`].
    #[must_use]
    pub const fn new(kind: UserDataKind, payload: u64) -> Option<Self> {
        if payload & !PAYLOAD_MASK != 0 {
            return None;
        }
        Some(Self(((kind as u64) << KIND_SHIFT) | payload))
    }

    /// The `user_data` of `stream`'s receive request.
    #[must_use]
    pub const fn recv(stream: StreamId) -> Self {
        Self(((UserDataKind::Recv as u64) << KIND_SHIFT) | stream.to_payload())
    }

    /// The `user_data` of a cancellation of `stream`'s receive request (the cancel SQE's
    /// own; its target is [`UserData::recv`]).
    #[must_use]
    pub const fn cancel(stream: StreamId) -> Self {
        Self(((UserDataKind::Cancel as u64) << KIND_SHIFT) | stream.to_payload())
    }

    /// Wraps a raw `user_data` read from a CQE.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw value for an SQE or event descriptor.
    #[must_use]
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The kind, or `None` for a top byte this scheme never produces.
    #[must_use]
    pub const fn kind(self) -> Option<UserDataKind> {
        UserDataKind::from_tag((self.0 >> KIND_SHIFT) as u8)
    }

    /// The payload bits.
    #[must_use]
    pub const fn payload(self) -> u64 {
        self.0 & PAYLOAD_MASK
    }

    /// The payload read as a [`StreamId`] (meaningful for [`UserDataKind::Recv`] and
    /// [`UserDataKind::Cancel`]).
    #[must_use]
    pub const fn stream(self) -> StreamId {
        StreamId::from_payload(self.0)
    }
}

/// Tells the completion decoder which generation each stream slot currently has.
pub trait StreamGenerations {
    /// The generation of the stream that owns `slot` now, or `None` if the slot is free.
    fn current_generation(&self, slot: u32) -> Option<u32>;
}

impl<F: Fn(u32) -> Option<u32>> StreamGenerations for F {
    fn current_generation(&self, slot: u32) -> Option<u32> {
        self(slot)
    }
}

/// Allocates stream slots and their generations (driver-thread state, not `Sync`).
///
/// Freed slots are reused last-freed first, so the runtime's per-stream state stays in few,
/// warm cache lines. Release a stream's slot only after its receive request's final CQE (the
/// one without `IORING_CQE_F_MORE`), or after the request was never submitted: until then
/// the kernel may still post data for it, which would decode as stale.
#[derive(Debug, Default)]
pub struct StreamSlots {
    /// Per slot: current generation and whether a stream owns it.
    slots: Vec<SlotState>,
    /// Free slots, most recently freed last.
    free: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct SlotState {
    generation: u32,
    live: bool,
}

impl StreamSlots {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a slot for a new stream.
    ///
    /// # Panics
    ///
    /// If all 2^32 slots are live.
    pub fn allocate(&mut self) -> StreamId {
        if let Some(slot) = self.free.pop() {
            let state = &mut self.slots[slot as usize];
            state.live = true;
            return StreamId::new(slot, state.generation);
        }
        let slot = u32::try_from(self.slots.len()).expect("more than 2^32 live streams");
        self.slots.push(SlotState {
            generation: 0,
            live: true,
        });
        StreamId::new(slot, 0)
    }

    /// Frees `stream`'s slot; its id (and every `user_data` made from it) is stale from now
    /// on. Returns `false`, changing nothing, if `stream` was not live.
    pub fn release(&mut self, stream: StreamId) -> bool {
        if !self.is_current(stream) {
            return false;
        }
        let state = &mut self.slots[stream.slot() as usize];
        state.live = false;
        state.generation = state.generation.wrapping_add(1) & StreamId::GENERATION_MASK;
        self.free.push(stream.slot());
        true
    }

    /// Whether `stream` is live (allocated and not released).
    #[must_use]
    pub fn is_current(&self, stream: StreamId) -> bool {
        self.current_generation(stream.slot()) == Some(stream.generation())
    }

    /// Number of live streams.
    #[must_use]
    pub fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl StreamGenerations for StreamSlots {
    fn current_generation(&self, slot: u32) -> Option<u32> {
        match self.slots.get(slot as usize) {
            Some(state) if state.live => Some(state.generation),
            _ => None,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn recv_user_data_round_trips() {
        let stream = StreamId::new(0xdead_beef, 0x00ab_cdef);
        let ud = UserData::recv(stream);
        assert_eq!(ud.kind(), Some(UserDataKind::Recv));
        assert_eq!(ud.stream(), stream);
        assert_eq!(ud.as_u64() >> KIND_SHIFT, 1);
        assert_eq!(UserData::from_raw(ud.as_u64()), ud);
        let cancel = UserData::cancel(stream);
        assert_eq!(cancel.kind(), Some(UserDataKind::Cancel));
        assert_eq!(cancel.stream(), stream);
    }

    #[test]
    fn generation_is_masked_to_its_bits() {
        let stream = StreamId::new(7, StreamId::GENERATION_MASK + 2);
        assert_eq!(stream.generation(), 1);
    }

    #[test]
    fn payload_must_fit() {
        assert!(UserData::new(UserDataKind::Wake, PAYLOAD_MASK).is_some());
        assert!(UserData::new(UserDataKind::Wake, PAYLOAD_MASK + 1).is_none());
        let ud = UserData::new(UserDataKind::Internal, 42).unwrap();
        assert_eq!(
            (ud.kind(), ud.payload()),
            (Some(UserDataKind::Internal), 42)
        );
    }

    #[test]
    fn zero_and_unknown_tags_have_no_kind() {
        assert_eq!(UserData::from_raw(0).kind(), None);
        assert_eq!(UserData::from_raw(6 << KIND_SHIFT).kind(), None);
        assert_eq!(UserData::from_raw(u64::MAX).kind(), None);
        assert_eq!(UserData::EVENT.kind(), Some(UserDataKind::Event));
    }

    #[test]
    fn slots_are_reused_with_a_new_generation() {
        let mut slots = StreamSlots::new();
        let a = slots.allocate();
        let b = slots.allocate();
        assert_eq!((a.slot(), b.slot()), (0, 1));
        assert_eq!(slots.live(), 2);
        assert!(slots.release(a));
        assert!(!slots.release(a), "double release is refused");
        assert!(!slots.is_current(a));
        assert_eq!(slots.current_generation(a.slot()), None);
        let c = slots.allocate();
        assert_eq!(c.slot(), a.slot());
        assert_ne!(c.generation(), a.generation());
        assert!(slots.is_current(c));
        assert!(!slots.is_current(a));
        assert_eq!(slots.current_generation(99), None);
    }

    #[test]
    fn generation_wraps() {
        let mut slots = StreamSlots::new();
        let mut id = slots.allocate();
        for _ in 0..=StreamId::GENERATION_MASK {
            assert!(slots.release(id));
            id = slots.allocate();
        }
        assert_eq!(id.slot(), 0);
        assert_eq!(id.generation(), 0, "wrapped after 2^24 reuses");
    }

    #[test]
    fn closures_can_supply_generations() {
        let lookup = |slot: u32| (slot == 3).then_some(5);
        assert_eq!(lookup.current_generation(3), Some(5));
        assert_eq!(lookup.current_generation(4), None);
    }
}
