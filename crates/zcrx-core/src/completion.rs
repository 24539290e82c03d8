//! Decoding and validating completions (32-byte CQEs) into [`Completion`]s.
//!
//! The driver copies each CQE's fields into a [`RawCompletion`] and calls [`decode`] with the
//! area's [`AreaLayout`] and its stream table. Everything the kernel (or a bug) could put in a
//! CQE decodes to either a [`Completion`] or an [`InvalidCompletion`]; nothing panics, and no
//! offset is trusted before it has been checked against the area:
//!
//! - the area token in the top 16 bits of the offset must be this area's: the kernel writes
//!   `offset_in_area + (area_id << IORING_ZCRX_AREA_SHIFT)`, and the token it wrote back at
//!   registration is exactly `area_id << IORING_ZCRX_AREA_SHIFT` (0 for the first area);
//! - the data must lie inside the area and inside one chunk (the kernel never delivers across
//!   a chunk boundary, it posts one CQE per chunk);
//! - a data CQE (one with `IORING_CQE_F_MORE`) carries at least one byte;
//! - the `user_data` must be one of the [`user_data`](crate::user_data) scheme's, and a
//!   stream's generation must be current.
//!
//! A rejected CQE may hold a kernel user reference on a chunk. Returning a reference the
//! kernel does not hold is the dangerous direction (it can free a chunk a live buffer still
//! reads), leaking one only costs a chunk, so [`InvalidCompletion::owed_refill`] returns an
//! entry only where the kernel provably took the reference: a well-formed data CQE whose
//! stream has gone (see its docs for the rule per [`InvalidReason`]).

use core::fmt;
use std::io;

use zcrx_sys::ring::IORING_CQE_F_MORE;
use zcrx_sys::zcrx::{io_uring_zcrx_rqe, IORING_ZCRX_AREA_MASK, IORING_ZCRX_AREA_SHIFT};

use crate::events::ZcrxEventType;
use crate::refill::refill_entry;
use crate::user_data::{StreamGenerations, StreamId, UserData, UserDataKind};

/// The fields of one 32-byte CQE, copied out of the CQ ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawCompletion {
    /// `cqe.user_data`.
    pub user_data: u64,
    /// `cqe.res`.
    pub res: i32,
    /// `cqe.flags`.
    pub flags: u32,
    /// The upper 16 bytes (`big_cqe`); for a receive, an
    /// [`io_uring_zcrx_cqe`](zcrx_sys::zcrx::io_uring_zcrx_cqe): `[off, __pad]`.
    pub big_cqe: [u64; 2],
}

impl RawCompletion {
    fn has_more(&self) -> bool {
        self.flags & IORING_CQE_F_MORE != 0
    }

    /// The receive offset (area token and byte offset).
    fn zcrx_off(&self) -> u64 {
        self.big_cqe[0]
    }
}

/// An invalid area description passed to [`AreaLayout::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AreaLayoutError {
    /// The chunk size is not a power of two.
    ChunkSize(u32),
    /// The area length is zero, not a multiple of the chunk size, beyond the 48 bits an
    /// offset can address, or more than `u32::MAX` chunks.
    Length(u64),
    /// The token has bits below [`IORING_ZCRX_AREA_SHIFT`].
    Token(u64),
}

impl fmt::Display for AreaLayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ChunkSize(size) => write!(f, "chunk size {size} is not a power of two"),
            Self::Length(len) => write!(
                f,
                "area length {len} is zero, not a multiple of the chunk size, or too large"
            ),
            Self::Token(token) => write!(f, "area token {token:#x} has offset bits set"),
        }
    }
}

impl std::error::Error for AreaLayoutError {}

/// Geometry and identity of a registered area: what receive offsets are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaLayout {
    size: u64,
    chunk_shift: u32,
    token: u64,
}

impl AreaLayout {
    /// An area of `size` bytes cut into `chunk_size`-byte chunks (the `rx_buf_len` the kernel
    /// wrote back, or the page size), with the `rq_area_token` the kernel wrote back.
    ///
    /// # Errors
    ///
    /// [`AreaLayoutError`] unless `chunk_size` is a power of two, `size` a non-zero multiple
    /// of it below `1 << IORING_ZCRX_AREA_SHIFT` with at most `u32::MAX` chunks, and `token`
    /// has no bits below `IORING_ZCRX_AREA_SHIFT`.
    pub fn new(size: u64, chunk_size: u32, token: u64) -> Result<Self, AreaLayoutError> {
        if !chunk_size.is_power_of_two() {
            return Err(AreaLayoutError::ChunkSize(chunk_size));
        }
        let chunk_shift = chunk_size.trailing_zeros();
        if size == 0
            || size % u64::from(chunk_size) != 0
            || size > 1 << IORING_ZCRX_AREA_SHIFT
            || size >> chunk_shift > u64::from(u32::MAX)
        {
            return Err(AreaLayoutError::Length(size));
        }
        if token & !IORING_ZCRX_AREA_MASK != 0 {
            return Err(AreaLayoutError::Token(token));
        }
        Ok(Self {
            size,
            chunk_shift,
            token,
        })
    }

    /// Area length in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    #[must_use]
    pub fn chunk_size(&self) -> u32 {
        1 << self.chunk_shift
    }

    /// Number of chunks.
    #[must_use]
    pub fn chunk_count(&self) -> u32 {
        // Checked in `new`.
        (self.size >> self.chunk_shift) as u32
    }

    /// The area token (`rq_area_token`).
    #[must_use]
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Index of the chunk holding byte `area_offset`, or `None` past the end.
    #[must_use]
    pub fn chunk_index(&self, area_offset: u64) -> Option<u32> {
        (area_offset < self.size).then(|| (area_offset >> self.chunk_shift) as u32)
    }

    /// The refill entry returning the reference a CQE took on the chunk at `area_offset`
    /// (`len` is the CQE's `res`).
    #[must_use]
    pub fn refill_entry(&self, area_offset: u64, len: u32) -> io_uring_zcrx_rqe {
        refill_entry(area_offset, len, self.token)
    }
}

/// A positive error number from a CQE's negative `res`: how a receive request ended.
///
/// Named for where it comes from, apart from `tokio_zcrx::probe::Errno` (an errno with its
/// symbolic name, as the capability probe reports system call answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CqeErrno(i32);

impl CqeErrno {
    /// Wraps a positive `errno` value.
    #[must_use]
    pub const fn new(errno: i32) -> Self {
        Self(errno)
    }

    /// The positive `errno` value.
    #[must_use]
    pub const fn raw(self) -> i32 {
        self.0
    }

    /// What the runtime should do with a stream whose receive request ended with this error.
    #[must_use]
    pub fn recv_action(self) -> RecvErrorAction {
        match self.0 {
            libc::ENOSPC => RecvErrorAction::ResubmitAfterCqDrained,
            libc::ENOMEM => RecvErrorAction::ResubmitAfterRefill,
            libc::EINTR => RecvErrorAction::ResubmitNow,
            libc::ECANCELED => RecvErrorAction::Cancelled,
            _ => RecvErrorAction::Fatal,
        }
    }
}

impl fmt::Display for CqeErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&io::Error::from_raw_os_error(self.0), f)
    }
}

impl std::error::Error for CqeErrno {}

impl From<CqeErrno> for io::Error {
    fn from(errno: CqeErrno) -> Self {
        io::Error::from_raw_os_error(errno.0)
    }
}

/// How to react to a receive request that ended with an error ([`CqeErrno::recv_action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvErrorAction {
    /// `ENOSPC`: the CQ ring was full, nothing is wrong with the stream. Resubmit after the
    /// CQ has been drained.
    ResubmitAfterCqDrained,
    /// `ENOMEM`: the copy path found no free chunk (area exhausted). Resubmit once buffers
    /// have been returned (and, for NODEV, flushed with `ZCRX_CTRL_FLUSH_RQ`); do not
    /// resubmit more waiting streams than there are free chunks.
    ResubmitAfterRefill,
    /// `EINTR`: interrupted by a signal; resubmit.
    ResubmitNow,
    /// `ECANCELED`: the runtime cancelled the request itself.
    Cancelled,
    /// Anything else (socket errors, `EFAULT`, bad requests): the stream has failed; report
    /// the error to its reader.
    Fatal,
}

/// The request ended without error: the peer closed the connection (EOF) or the request's
/// byte limit (`sqe.len`) was reached. The runtime knows whether it set a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eof;

/// A decoded, validated completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// `len` bytes for `stream` at `area_offset` of area `area`, inside chunk `chunk`. The
    /// runtime owes one refill entry ([`AreaLayout::refill_entry`] of that area) for it.
    Data {
        /// The receiving stream.
        stream: StreamId,
        /// Byte offset of the data in the area.
        area_offset: u64,
        /// Number of bytes (at least 1).
        len: u32,
        /// Index of the chunk holding the data, within its area.
        chunk: u32,
        /// The area holding the data: its id, the kernel's index (0 for the area registered
        /// with the queue, then one more per `ZCRX_CTRL_ADD_AREA`, Linux 7.3+).
        area: u16,
        /// Whether the request stays active. Always `true` from kernels up to 7.3; `false`
        /// would mean the request ended after this data, without a reason.
        more: bool,
    },
    /// `stream`'s receive request has ended (final CQE, no data).
    End {
        /// The stream.
        stream: StreamId,
        /// How it ended; see [`CqeErrno::recv_action`].
        result: Result<Eof, CqeErrno>,
    },
    /// A zcrx event (CQE with [`UserData::EVENT`]); see [`crate::events`].
    Event {
        /// The event type.
        kind: ZcrxEventType,
    },
    /// A wake request completed.
    Wake {
        /// The payload the runtime tagged it with.
        payload: u64,
        /// `cqe.res`.
        res: i32,
    },
    /// A cancellation of `stream`'s receive completed (the cancel request's own CQE: 0 found
    /// and cancelled, `-ENOENT` not found, `-EALREADY` already running). Not checked against
    /// the stream's generation.
    CancelDone {
        /// The stream whose receive was targeted.
        stream: StreamId,
        /// `cqe.res`.
        res: i32,
    },
    /// Another runtime request completed.
    Internal {
        /// The payload the runtime tagged it with.
        payload: u64,
        /// `cqe.res`.
        res: i32,
        /// `cqe.flags`.
        flags: u32,
    },
}

/// Why a completion was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// The `user_data` is not one this scheme produces (unknown kind, or an `Event` kind
    /// other than [`UserData::EVENT`]).
    UnknownUserData,
    /// The stream's slot is free or has a different generation now: a late completion of a
    /// closed stream.
    StaleStream {
        /// The slot's current generation, `None` if it is free.
        current_generation: Option<u32>,
    },
    /// The offset's area token names no registered area.
    ForeignAreaToken {
        /// The token found (the offset's top 16 bits, in place).
        found: u64,
        /// How many areas are registered (their tokens are `0..areas` shifted by
        /// [`IORING_ZCRX_AREA_SHIFT`]).
        areas: u32,
    },
    /// The data does not lie inside the area.
    OutOfArea {
        /// Offset in the area.
        area_offset: u64,
        /// Length.
        len: u32,
    },
    /// The data crosses a chunk boundary.
    StraddlesChunk {
        /// Offset in the area.
        area_offset: u64,
        /// Length.
        len: u32,
    },
    /// `IORING_CQE_F_MORE` with `res` 0: a data CQE without data.
    EmptyData,
    /// `IORING_CQE_F_MORE` with a negative `res`: an error that does not end the request.
    ErrorWithMore,
}

/// A completion [`decode`] rejected, with the raw fields for logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidCompletion {
    /// The CQE as read.
    pub raw: RawCompletion,
    /// What is wrong with it.
    pub reason: InvalidReason,
}

impl InvalidCompletion {
    /// The stream the completion names, if its `user_data` is a receive's or a cancel's.
    #[must_use]
    pub fn stream(&self) -> Option<StreamId> {
        let user_data = UserData::from_raw(self.raw.user_data);
        matches!(
            user_data.kind(),
            Some(UserDataKind::Recv | UserDataKind::Cancel)
        )
        .then(|| user_data.stream())
    }

    /// The refill entry that gives back the user reference this CQE took, when the kernel
    /// provably took one; `None` when it did not or when that cannot be known.
    ///
    /// The rule, per [`InvalidReason`], for an `InvalidCompletion` made by [`decode`]:
    ///
    /// | reason | returned? | why |
    /// |---|---|---|
    /// | [`StaleStream`](InvalidReason::StaleStream) with `res > 0` | yes | the data passed every check first (token, inside the area, inside one chunk, at least one byte): a well-formed data CQE, for which the kernel takes a reference whoever it is for |
    /// | [`StaleStream`](InvalidReason::StaleStream) with `res <= 0` | no | a final CQE carries no chunk |
    /// | [`ForeignAreaToken`](InvalidReason::ForeignAreaToken), [`OutOfArea`](InvalidReason::OutOfArea), [`StraddlesChunk`](InvalidReason::StraddlesChunk) | no | the offset does not name one chunk of this area: whatever the kernel holds, an entry built from it could name a chunk a live buffer reads |
    /// | [`EmptyData`](InvalidReason::EmptyData), [`ErrorWithMore`](InvalidReason::ErrorWithMore) | no | the kernel never posts these for data it lent out, so no reference is known to exist |
    /// | [`UnknownUserData`](InvalidReason::UnknownUserData) | no | not known to be a receive at all |
    ///
    /// Returning a reference the kernel does not hold would let it reuse a chunk that a live
    /// buffer still reads (the kernel's per-chunk user count guards only chunks not lent out
    /// again), while leaking one only costs a chunk of area until the ring is closed: where the
    /// reference is not proven, leak. [`Self::may_leak_chunk`] tells the runtime when to count
    /// such a leak.
    ///
    /// Do not read the data and do not count the returned entry in
    /// [`ChunkRefs`](crate::accounting::ChunkRefs).
    #[must_use]
    pub fn owed_refill(&self) -> Option<io_uring_zcrx_rqe> {
        let raw = &self.raw;
        let proven = matches!(self.reason, InvalidReason::StaleStream { .. })
            && raw.res > 0
            && self.is_recv();
        proven.then(|| io_uring_zcrx_rqe {
            off: raw.zcrx_off(),
            len: raw.res as u32,
            __pad: 0,
        })
    }

    /// Whether this CQE is shaped like receive data (a receive `user_data` and a positive
    /// `res`, or a non-negative one with `IORING_CQE_F_MORE`) but [`Self::owed_refill`]
    /// returns nothing for it: if the kernel did lend a chunk, it stays lent until the ring
    /// is closed. The runtime counts these so that a leak is visible.
    #[must_use]
    pub fn may_leak_chunk(&self) -> bool {
        let raw = &self.raw;
        let shaped_like_data = (raw.has_more() && raw.res >= 0) || raw.res > 0;
        self.is_recv() && shaped_like_data && self.owed_refill().is_none()
    }

    fn is_recv(&self) -> bool {
        UserData::from_raw(self.raw.user_data).kind() == Some(UserDataKind::Recv)
    }
}

impl fmt::Display for InvalidCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = &self.raw;
        write!(
            f,
            "invalid completion (user_data {:#x}, res {}, flags {:#x}, off {:#x}): ",
            raw.user_data, raw.res, raw.flags, raw.big_cqe[0]
        )?;
        match self.reason {
            InvalidReason::UnknownUserData => write!(f, "unknown user_data"),
            InvalidReason::StaleStream {
                current_generation: None,
            } => write!(f, "stream slot is free"),
            InvalidReason::StaleStream {
                current_generation: Some(generation),
            } => write!(f, "stale stream generation (slot is at {generation})"),
            InvalidReason::ForeignAreaToken { found, areas } => {
                write!(
                    f,
                    "area token {found:#x} names none of the {areas} registered areas"
                )
            }
            InvalidReason::OutOfArea { area_offset, len } => {
                write!(f, "{len} bytes at {area_offset:#x} are outside the area")
            }
            InvalidReason::StraddlesChunk { area_offset, len } => {
                write!(f, "{len} bytes at {area_offset:#x} cross a chunk boundary")
            }
            InvalidReason::EmptyData => write!(f, "data completion without data"),
            InvalidReason::ErrorWithMore => write!(f, "error with IORING_CQE_F_MORE"),
        }
    }
}

impl std::error::Error for InvalidCompletion {}

/// Decodes and validates one completion.
///
/// # Errors
///
/// [`InvalidCompletion`] for anything that does not fit the `user_data` scheme, the area, or
/// the current stream generations; see [`InvalidReason`] and
/// [`InvalidCompletion::owed_refill`].
///
/// ```
/// use zcrx_core::completion::{decode, AreaLayout, Completion, RawCompletion};
/// use zcrx_core::user_data::{StreamSlots, UserData};
/// use zcrx_sys::ring::IORING_CQE_F_MORE;
///
/// let area = AreaLayout::new(16 * 4096, 4096, 0).unwrap();
/// let mut streams = StreamSlots::new();
/// let stream = streams.allocate();
/// let cqe = RawCompletion {
///     user_data: UserData::recv(stream).as_u64(),
///     res: 1000,
///     flags: IORING_CQE_F_MORE,
///     big_cqe: [3 * 4096 + 96, 0],
/// };
/// match decode(&cqe, &area, &streams) {
///     Ok(Completion::Data { stream: s, area_offset, len, chunk, area, more }) => {
///         assert_eq!((s, area_offset, len, chunk, area, more), (stream, 3 * 4096 + 96, 1000, 3, 0, true));
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
pub fn decode(
    raw: &RawCompletion,
    area: &(impl Areas + ?Sized),
    streams: &(impl StreamGenerations + ?Sized),
) -> Result<Completion, InvalidCompletion> {
    let invalid = |reason| InvalidCompletion { raw: *raw, reason };
    let user_data = UserData::from_raw(raw.user_data);
    let kind = user_data
        .kind()
        .ok_or_else(|| invalid(InvalidReason::UnknownUserData))?;
    match kind {
        UserDataKind::Recv => decode_recv(raw, area, streams, user_data.stream()).map_err(invalid),
        UserDataKind::Event if user_data == UserData::EVENT => Ok(Completion::Event {
            // `res` is the type index; 0 is ALLOC_FAIL, not "no event".
            kind: ZcrxEventType::from_type_index(raw.res as u32),
        }),
        UserDataKind::Event => Err(invalid(InvalidReason::UnknownUserData)),
        UserDataKind::Wake => Ok(Completion::Wake {
            payload: user_data.payload(),
            res: raw.res,
        }),
        UserDataKind::Cancel => Ok(Completion::CancelDone {
            stream: user_data.stream(),
            res: raw.res,
        }),
        UserDataKind::Internal => Ok(Completion::Internal {
            payload: user_data.payload(),
            res: raw.res,
            flags: raw.flags,
        }),
    }
}

/// Decodes a receive CQE; validation of the data comes first, so that a corrupt CQE is
/// reported as such even for a stale stream.
fn decode_recv(
    raw: &RawCompletion,
    area: &(impl Areas + ?Sized),
    streams: &(impl StreamGenerations + ?Sized),
    stream: StreamId,
) -> Result<Completion, InvalidReason> {
    let more = raw.has_more();
    let completion = match raw.res {
        res if res > 0 => {
            let (area, area_offset, chunk) = validate_data(raw.zcrx_off(), res as u32, area)?;
            Completion::Data {
                stream,
                area_offset,
                len: res as u32,
                chunk,
                area,
                more,
            }
        }
        0 if more => return Err(InvalidReason::EmptyData),
        _ if more => return Err(InvalidReason::ErrorWithMore),
        0 => Completion::End {
            stream,
            result: Ok(Eof),
        },
        res => Completion::End {
            stream,
            // `saturating_neg`: i32::MIN has no positive counterpart; any value will do.
            result: Err(CqeErrno(res.saturating_neg())),
        },
    };
    match streams.current_generation(stream.slot()) {
        Some(generation) if generation == stream.generation() => Ok(completion),
        current_generation => Err(InvalidReason::StaleStream { current_generation }),
    }
}

/// Checks that `len` bytes at receive offset `off` are inside one chunk of the area its token
/// names; returns the area's id, the offset in the area and the chunk index.
fn validate_data(
    off: u64,
    len: u32,
    areas: &(impl Areas + ?Sized),
) -> Result<(u16, u64, u32), InvalidReason> {
    let found = off & IORING_ZCRX_AREA_MASK;
    let Some(area) = areas.by_token(found) else {
        return Err(InvalidReason::ForeignAreaToken {
            found,
            areas: areas.count(),
        });
    };
    let area_offset = off & !IORING_ZCRX_AREA_MASK;
    // No overflow: `area_offset < 2^48`.
    if area_offset + u64::from(len) > area.size {
        return Err(InvalidReason::OutOfArea { area_offset, len });
    }
    let chunk_mask = (1u64 << area.chunk_shift) - 1;
    if (area_offset & chunk_mask) + u64::from(len) > chunk_mask + 1 {
        return Err(InvalidReason::StraddlesChunk { area_offset, len });
    }
    let id = (found >> IORING_ZCRX_AREA_SHIFT) as u16;
    Ok((id, area_offset, (area_offset >> area.chunk_shift) as u32))
}

/// The registered areas a completion's offset may name, found by the token in its top 16
/// bits: one [`AreaLayout`], or an [`AreaSet`] that grows (`ZCRX_CTRL_ADD_AREA`, Linux 7.3+).
pub trait Areas {
    /// The area whose `rq_area_token` is `token` (the offset's top 16 bits, in place).
    fn by_token(&self, token: u64) -> Option<&AreaLayout>;
    /// How many areas there are.
    fn count(&self) -> u32;
}

impl Areas for AreaLayout {
    fn by_token(&self, token: u64) -> Option<&AreaLayout> {
        (token == self.token).then_some(self)
    }

    fn count(&self) -> u32 {
        1
    }
}

/// The most areas one zcrx instance takes (`ZCRX_MAX_AREAS` in io_uring/zcrx.c, Linux 7.3):
/// one more `ZCRX_CTRL_ADD_AREA` answers `EINVAL`.
pub const MAX_AREAS: u32 = 1024;

/// Why an area cannot join an [`AreaSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddAreaError {
    /// The kernel's token is not the next id in place: the kernel numbers areas 0, 1, 2...
    /// (`zcrx_next_area_id`), so anything else means the set and the kernel disagree.
    UnexpectedToken {
        /// The token the kernel wrote back.
        token: u64,
        /// The token the next area must have.
        expected: u64,
    },
    /// The chunk size differs from the first area's (the kernel keeps one per instance).
    ChunkSize {
        /// The new area's chunk size.
        found: u32,
        /// The instance's.
        expected: u32,
    },
    /// [`MAX_AREAS`] areas are registered already.
    Full,
}

impl fmt::Display for AddAreaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UnexpectedToken { token, expected } => write!(
                f,
                "the kernel gave the new area token {token:#x}, expected {expected:#x}"
            ),
            Self::ChunkSize { found, expected } => write!(
                f,
                "the new area has {found}-byte chunks, the instance {expected}-byte ones"
            ),
            Self::Full => write!(f, "{MAX_AREAS} areas are registered, the kernel's limit"),
        }
    }
}

impl std::error::Error for AddAreaError {}

/// Every area of one zcrx instance, indexed by id (the token's top 16 bits): the first one
/// registered with the queue, then each added with `ZCRX_CTRL_ADD_AREA` (Linux 7.3+).
///
/// ```
/// use zcrx_core::completion::{decode, AreaLayout, AreaSet, Completion, RawCompletion};
/// use zcrx_core::user_data::{StreamSlots, UserData};
/// use zcrx_sys::ring::IORING_CQE_F_MORE;
/// use zcrx_sys::zcrx::IORING_ZCRX_AREA_SHIFT;
///
/// let mut areas = AreaSet::new(AreaLayout::new(16 * 4096, 4096, 0).unwrap());
/// // The kernel wrote back `1 << IORING_ZCRX_AREA_SHIFT` for the second area.
/// let token = 1 << IORING_ZCRX_AREA_SHIFT;
/// areas.push(AreaLayout::new(8 * 4096, 4096, token).unwrap()).unwrap();
/// let mut streams = StreamSlots::new();
/// let stream = streams.allocate();
/// let cqe = RawCompletion {
///     user_data: UserData::recv(stream).as_u64(),
///     res: 100,
///     flags: IORING_CQE_F_MORE,
///     big_cqe: [token | (5 * 4096), 0],
/// };
/// match decode(&cqe, &areas, &streams) {
///     Ok(Completion::Data { area, chunk, .. }) => assert_eq!((area, chunk), (1, 5)),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaSet {
    areas: Vec<AreaLayout>,
}

impl AreaSet {
    /// A set of one area, the one registered with the queue.
    #[must_use]
    pub fn new(first: AreaLayout) -> Self {
        Self { areas: vec![first] }
    }

    /// Adds the area the kernel just added (with the token it wrote back).
    ///
    /// # Errors
    ///
    /// [`AddAreaError`] unless `area`'s token is the next id in place, its chunk size the
    /// first area's, and fewer than [`MAX_AREAS`] areas are registered.
    pub fn push(&mut self, area: AreaLayout) -> Result<u16, AddAreaError> {
        let next = self.areas.len() as u64;
        if next >= u64::from(MAX_AREAS) {
            return Err(AddAreaError::Full);
        }
        let expected = next << IORING_ZCRX_AREA_SHIFT;
        if area.token != expected {
            return Err(AddAreaError::UnexpectedToken {
                token: area.token,
                expected,
            });
        }
        if area.chunk_shift != self.areas[0].chunk_shift {
            return Err(AddAreaError::ChunkSize {
                found: area.chunk_size(),
                expected: self.areas[0].chunk_size(),
            });
        }
        self.areas.push(area);
        Ok(next as u16)
    }

    /// The area with id `id`.
    #[must_use]
    pub fn get(&self, id: u16) -> Option<&AreaLayout> {
        self.areas.get(usize::from(id))
    }

    /// Bytes in all areas.
    #[must_use]
    pub fn total_size(&self) -> u64 {
        self.areas.iter().map(AreaLayout::size).sum()
    }
}

impl Areas for AreaSet {
    fn by_token(&self, token: u64) -> Option<&AreaLayout> {
        let id = token >> IORING_ZCRX_AREA_SHIFT;
        self.areas.get(usize::try_from(id).ok()?)
    }

    fn count(&self) -> u32 {
        self.areas.len() as u32
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
