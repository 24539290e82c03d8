//! [`ZcBuf`]: received bytes, borrowed from the kernel's receive area.
//!
//! A buffer does not know which backend it came from. Its owner (the io_uring backend's
//! receive area, or the copy backend's pool) hands it out with a [`BufferOwnerVtable`], the
//! way `bytes::Bytes` and `std::task::RawWaker` do: a type-erased owner pointer, a few plain
//! integers the owner chose ([`BufferSlot`]), and the functions that take the buffer back.
//! So this module imports no backend, and a new backend (or a second area) needs no change
//! here.

use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;

/// Which of its owner's buffers a [`ZcBuf`] is, in plain integers the owner chose: the
/// io_uring area puts the data's offset in the area here (the chunk is the offset divided by
/// the chunk size), the copy pool the buffer's index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BufferSlot {
    /// An offset of the owner's choosing (the area: the data's offset in the area; the pool:
    /// the buffer's index).
    pub(crate) offset: u64,
    /// Number of bytes delivered in the buffer.
    pub(crate) len: u32,
}

/// How the owner of a [`ZcBuf`] takes its buffers back.
///
/// Each buffer is handed back exactly once, through `release_one` or as part of one
/// `release_run`, on any thread; the owner pointer is the one the buffer was created with.
pub(crate) struct BufferOwnerVtable {
    /// Takes back one buffer.
    ///
    /// # Safety
    ///
    /// `owner` and `slot` are those of one live buffer made with this vtable, which the
    /// caller gives up: neither the buffer's bytes nor `owner` are touched afterwards.
    pub(crate) release_one: unsafe fn(owner: NonNull<()>, slot: BufferSlot),
    /// Takes back several buffers of the same owner at once (see [`ZcBatch`]): for the area,
    /// one refill publication and one reference release for all of them.
    ///
    /// # Safety
    ///
    /// As `release_one`, for every slot in `slots`, all made with `owner` and this vtable;
    /// `slots` is not empty.
    pub(crate) release_run: unsafe fn(owner: NonNull<()>, slots: &[BufferSlot]),
    /// Adds the owner's view of a buffer to its `Debug` output.
    pub(crate) debug_fields: fn(debug: &mut fmt::DebugStruct<'_, '_>, slot: &BufferSlot),
}

/// Received bytes that live in the zcrx receive area, where the NIC put them.
///
/// A `ZcBuf` is cheap to move between tasks and threads (`Send + Sync + 'static`) and derefs
/// to `[u8]`. Dropping it, on any thread, returns its chunk to the kernel, exactly once. The
/// memory stays valid for as long as the buffer is held, even after its stream, the runtime
/// and the kernel's zcrx instance are gone.
///
/// It is also a [`bytes::Buf`], a cursor over its bytes, so it feeds `bytes` and
/// `tokio-util` code (decoders, `StreamReader`, `write_all_buf`) without a copy:
/// [`advance`](bytes::Buf::advance) moves the start forward, and the buffer then derefs to
/// (and [`len`](ZcBuf::len) counts) the bytes not consumed yet. Consuming does not return
/// memory early: the whole chunk goes back when the buffer is dropped.
///
/// ```no_run
/// # async fn demo(mut stream: tokio_zcrx::ZcStream) -> std::io::Result<()> {
/// use bytes::Buf;
/// use futures::StreamExt;
///
/// if let Some(buf) = stream.next().await {
///     let mut buf = buf?;
///     let tag = buf.get_u8(); // a cursor: the buffer now starts at the next byte
///     let rest: &[u8] = &buf; // the bytes not consumed yet
///     # let _ = (tag, rest);
/// }
/// # Ok(())
/// # }
/// ```
///
/// Hold buffers only as long as needed: the area is finite, and while it is full the kernel
/// has to copy or drop incoming data (see [`EventKind`](crate::EventKind)).
///
/// ```no_run
/// # async fn demo(mut stream: tokio_zcrx::ZcStream) -> std::io::Result<()> {
/// use futures::StreamExt;
///
/// while let Some(buf) = stream.next().await {
///     let buf = buf?;
///     let checksum: u32 = buf.iter().map(|&b| u32::from(b)).sum();
///     // Or hand it on without copying: the chunk returns when the last clone drops.
///     let bytes: bytes::Bytes = buf.into_bytes();
///     # let _ = (checksum, bytes);
/// }
/// # Ok(())
/// # }
/// ```
pub struct ZcBuf {
    ptr: *const u8,
    // The owner's `BufferSlot`, kept as loose fields so that `start` fits in what would be
    // the slot's padding: 40 bytes in all on 64-bit targets.
    /// `BufferSlot::offset`.
    offset: u64,
    /// `BufferSlot::len`: the delivered length, which the return to the owner needs.
    len: u32,
    /// Bytes consumed through [`bytes::Buf::advance`]: the buffer shows `start..len`.
    start: u32,
    /// Type-erased: what it points to, and what one buffer holds of it (the area: one of its
    /// buffer references; the pool: one strong `Arc` count), is the vtable's business.
    owner: NonNull<()>,
    vtable: &'static BufferOwnerVtable,
}
// SAFETY: the bytes are immutable while the buffer exists (the contract of `from_raw_parts`:
// the kernel does not write a chunk between delivering it and getting it back through the
// refill ring; a pool buffer is off the free list), and the owner's release functions may be
// called on any thread (also part of that contract).
unsafe impl Send for ZcBuf {}
// SAFETY: shared access only reads those immutable bytes and plain integers.
unsafe impl Sync for ZcBuf {}

impl ZcBuf {
    /// Wraps `slot.len` bytes at `ptr`, owned by `owner`, which `vtable` takes back when the
    /// buffer (or the batch it is in) drops.
    ///
    /// # Safety
    ///
    /// - `ptr..ptr + slot.len` is readable, and nobody writes it, until the buffer is handed
    ///   back through `vtable`;
    /// - `owner` stays valid until then (the buffer holds what keeps it alive), and `vtable`'s
    ///   functions may be called with it from any thread;
    /// - the caller gives the buffer's release to the `ZcBuf`: the owner expects exactly one
    ///   `release_one` (or one place in a `release_run`) for it.
    pub(crate) unsafe fn from_raw_parts(
        ptr: *const u8,
        slot: BufferSlot,
        owner: NonNull<()>,
        vtable: &'static BufferOwnerVtable,
    ) -> ZcBuf {
        ZcBuf {
            ptr,
            offset: slot.offset,
            len: slot.len,
            start: 0,
            owner,
            vtable,
        }
    }

    /// The owner's slot, as `from_raw_parts` got it.
    fn slot(&self) -> BufferSlot {
        BufferSlot {
            offset: self.offset,
            len: self.len,
        }
    }

    /// Number of bytes not consumed yet: all of them, unless the buffer was advanced as a
    /// [`bytes::Buf`].
    pub fn len(&self) -> usize {
        (self.len - self.start) as usize
    }

    /// Whether no byte is left (never true for a delivered buffer that was not advanced).
    pub fn is_empty(&self) -> bool {
        self.start == self.len
    }

    /// Converts into [`bytes::Bytes`] of the bytes not consumed yet, without copying; the
    /// chunk goes back to the kernel when the last clone of the `Bytes` is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }

    /// Copies the bytes not consumed yet into owned memory and returns the buffer to its
    /// owner at once: for code that must hold data for long (a cache, a queue for a slow
    /// peer), which would otherwise keep area chunks or pool memory from every stream and
    /// count against its stream's budget. One copy; prefer
    /// [`into_bytes`](ZcBuf::into_bytes) for data that is let go soon.
    ///
    /// ```no_run
    /// # async fn demo(mut stream: tokio_zcrx::ZcStream) -> std::io::Result<()> {
    /// use futures::StreamExt;
    ///
    /// let mut kept = Vec::new();
    /// while let Some(buf) = stream.next().await {
    ///     kept.push(buf?.detach()); // the buffer is back already
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn detach(self) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(&self)
    }
}

impl Deref for ZcBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is readable and not written while the buffer exists (the
        // contract of `from_raw_parts`; the owner checked it lies inside its memory), and
        // `start <= len` (`advance` checks).
        unsafe { std::slice::from_raw_parts(self.ptr.add(self.start as usize), self.len()) }
    }
}

/// A cursor over the buffer's bytes: `chunk` is the whole rest (it is contiguous), `advance`
/// consumes from the front. See [`ZcBuf`].
impl bytes::Buf for ZcBuf {
    fn remaining(&self) -> usize {
        self.len()
    }

    fn chunk(&self) -> &[u8] {
        self
    }

    /// Consumes `count` bytes. Panics if `count` exceeds [`remaining`](bytes::Buf::remaining),
    /// as `Bytes` does.
    fn advance(&mut self, count: usize) {
        assert!(
            count <= self.len(),
            "cannot advance a ZcBuf by {count} bytes: {} remain",
            self.len()
        );
        // No overflow: `start + count <= len`, a u32.
        self.start += count as u32;
    }
}

impl AsRef<[u8]> for ZcBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for ZcBuf {
    fn drop(&mut self) {
        // SAFETY: `owner`, `slot` and `vtable` are this buffer's, given by its owner in
        // `from_raw_parts`; this drop is the one release the owner expects (a batch that
        // releases a buffer in a run forgets it instead of dropping it), and the bytes are
        // not touched afterwards.
        unsafe { (self.vtable.release_one)(self.owner, self.slot()) }
    }
}

impl fmt::Debug for ZcBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ZcBuf");
        debug.field("len", &self.len()).field("start", &self.start);
        (self.vtable.debug_fields)(&mut debug, &self.slot());
        debug.finish()
    }
}

/// Buffers of one stream taken at once ([`ZcStream::next_batch`](crate::ZcStream::next_batch),
/// [`ZcStream::recv_many`](crate::ZcStream::recv_many)).
///
/// Derefs to `[ZcBuf]`. Dropping the batch (or [`clear`](ZcBatch::clear)ing it) returns every
/// buffer in it to the kernel with one refill-ring publication, instead of one per buffer:
/// for a consumer that handles a batch and then lets it go, the cheapest way to give the
/// area back. Buffers taken out (`into_iter`, `into_vec`) are returned one by one, when each
/// is dropped.
///
/// ```no_run
/// # async fn demo(mut stream: tokio_zcrx::ZcStream) -> std::io::Result<()> {
/// let mut total = 0;
/// while let Some(batch) = stream.next_batch(64).await {
///     let batch = batch?;
///     total += batch.len_bytes();
/// } // each batch goes back to the kernel here, all at once
/// # let _ = total;
/// # Ok(())
/// # }
/// ```
///
/// A batch is also a [`bytes::Buf`] over the bytes of all its buffers in order (with
/// [`chunks_vectored`](bytes::Buf::chunks_vectored), for one vectored write of all of them).
/// [`advance`](bytes::Buf::advance) consumes from the front: the batch then derefs to the
/// buffers not used up (the first possibly advanced itself), and
/// [`len_bytes`](ZcBatch::len_bytes) counts the bytes left. Used-up buffers stay in the batch,
/// so that they go back with the others in one publication.
pub struct ZcBatch {
    buffers: Vec<ZcBuf>,
    /// Buffers before this index are used up (through `Buf::advance`): hidden, but kept to be
    /// returned with the rest. Every buffer from here on has a byte left.
    first: usize,
    /// Bytes left in `buffers[first..]`, so that `Buf::remaining` is not a sum.
    remaining: usize,
}

impl ZcBatch {
    /// An empty batch, to be filled by [`ZcStream::recv_many`](crate::ZcStream::recv_many).
    pub fn new() -> ZcBatch {
        ZcBatch::from_vec(Vec::new())
    }

    /// An empty batch with room for `buffers` buffers before it allocates.
    pub fn with_capacity(buffers: usize) -> ZcBatch {
        ZcBatch::from_vec(Vec::with_capacity(buffers))
    }

    pub(crate) fn from_vec(buffers: Vec<ZcBuf>) -> ZcBatch {
        let mut batch = ZcBatch {
            buffers,
            first: 0,
            remaining: 0,
        };
        batch.count_appended(0);
        batch
    }

    /// Lets `append` add buffers at the end (a stream handing out what has arrived); returns
    /// how many it added, and what `append` returned.
    pub(crate) fn append_with<R>(
        &mut self,
        append: impl FnOnce(&mut Vec<ZcBuf>) -> R,
    ) -> (usize, R) {
        let before = self.buffers.len();
        let result = append(&mut self.buffers);
        if self.buffers.len() > before {
            self.count_appended(before);
        }
        (self.buffers.len() - before, result)
    }

    /// Accounts for the buffers from `from` on, which were just appended.
    fn count_appended(&mut self, from: usize) {
        self.remaining += self.buffers[from..].iter().map(ZcBuf::len).sum::<usize>();
        self.skip_used_up();
    }

    /// Moves `first` past empty buffers (a used-up one, or an empty one appended).
    fn skip_used_up(&mut self) {
        while self.buffers.get(self.first).is_some_and(ZcBuf::is_empty) {
            self.first += 1;
        }
    }

    /// Bytes left in the batch: in all its buffers, less what was consumed as a
    /// [`bytes::Buf`]. (`len()`, through `Deref`, counts buffers.)
    pub fn len_bytes(&self) -> usize {
        self.remaining
    }

    /// How many buffers the batch holds without allocating (used-up ones included): what
    /// [`clear`](ZcBatch::clear) keeps for the next
    /// [`recv_many`](crate::ZcStream::recv_many).
    pub fn capacity(&self) -> usize {
        self.buffers.capacity()
    }

    /// Returns every buffer to the kernel now, with one refill-ring publication, and keeps the
    /// allocation for the next [`recv_many`](crate::ZcStream::recv_many).
    pub fn clear(&mut self) {
        return_all(&mut self.buffers);
        self.first = 0;
        self.remaining = 0;
    }

    /// Moves the buffers not used up to the end of `out`, each wrapped with `wrap`, and
    /// empties the batch (used-up buffers are returned now), keeping its allocation for the
    /// next [`recv_many`](crate::ZcStream::recv_many).
    pub(crate) fn take_into_with<T>(&mut self, out: &mut Vec<T>, wrap: impl FnMut(ZcBuf) -> T) {
        out.extend(self.buffers.drain(self.first..).map(wrap));
        self.clear();
    }

    /// The buffers not used up, to be returned one by one as each is dropped. (Used-up
    /// buffers are returned now.)
    pub fn into_vec(mut self) -> Vec<ZcBuf> {
        // `self` then drops and returns the used-up buffers left in it, all at once.
        self.buffers.split_off(self.first)
    }
}

impl Default for ZcBatch {
    fn default() -> ZcBatch {
        ZcBatch::new()
    }
}

impl Deref for ZcBatch {
    type Target = [ZcBuf];

    /// The buffers not used up; the first may have been advanced (it shows what is left).
    fn deref(&self) -> &[ZcBuf] {
        &self.buffers[self.first..]
    }
}

/// The bytes of all buffers in order; see [`ZcBatch`].
impl bytes::Buf for ZcBatch {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.buffers.get(self.first).map_or(&[], |buf| &buf[..])
    }

    /// Consumes `count` bytes, across buffers. Panics if `count` exceeds
    /// [`remaining`](bytes::Buf::remaining), as `Bytes` does.
    fn advance(&mut self, mut count: usize) {
        assert!(
            count <= self.remaining,
            "cannot advance a ZcBatch by {count} bytes: {} remain",
            self.remaining
        );
        self.remaining -= count;
        while count > 0 {
            let buf = &mut self.buffers[self.first];
            let step = count.min(buf.len());
            buf.advance(step);
            count -= step;
            self.skip_used_up();
        }
    }

    fn chunks_vectored<'a>(&'a self, out: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, buf) in out.iter_mut().zip(&self.buffers[self.first..]) {
            *slot = std::io::IoSlice::new(buf);
            filled += 1;
        }
        filled
    }
}

impl IntoIterator for ZcBatch {
    type Item = ZcBuf;
    type IntoIter = std::vec::IntoIter<ZcBuf>;

    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a ZcBatch {
    type Item = &'a ZcBuf;
    type IntoIter = std::slice::Iter<'a, ZcBuf>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for ZcBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZcBatch")
            .field("buffers", &self.len())
            .field("len_bytes", &self.len_bytes())
            .finish()
    }
}

impl Drop for ZcBatch {
    fn drop(&mut self) {
        return_all(&mut self.buffers);
    }
}

/// Returns every buffer in `buffers`, in runs of consecutive buffers of the same owner: for
/// the area, each run costs one refill publication and one reference release; the pool takes
/// a run's buffers one by one. (Today a batch comes from one stream, so its buffers share one
/// owner; mixed input is handled all the same.)
fn return_all(buffers: &mut Vec<ZcBuf>) {
    match buffers.len() {
        // One buffer is one release either way: skip setting up a run.
        0 | 1 => buffers.clear(),
        // A few (copy mode's read of several buffers): a run array that costs little to set
        // up, instead of 64 slots (1 KiB) to zero for four buffers.
        2..=8 => return_runs::<8>(buffers),
        _ => return_runs::<64>(buffers),
    }
}

/// [`return_all`] in runs of at most `RUN` buffers.
fn return_runs<const RUN: usize>(buffers: &mut Vec<ZcBuf>) {
    type Owner = (NonNull<()>, &'static BufferOwnerVtable);
    let mut slots = [BufferSlot::default(); RUN];
    let mut run_len = 0;
    let mut run_owner: Option<Owner> = None;
    let flush = |(owner, vtable): Owner, slots: &[BufferSlot]| {
        // SAFETY: every slot of the run came from a live buffer of `owner` made with
        // `vtable`, which was not dropped (`ManuallyDrop` below), so the run is the one
        // release each of them is owed; nothing touches them afterwards.
        unsafe { (vtable.release_run)(owner, slots) }
    };
    for buffer in buffers.drain(..) {
        // Its release is owed by the run from here on, not by its drop.
        let buffer = std::mem::ManuallyDrop::new(buffer);
        if let Some((owner, vtable)) = run_owner {
            // A `static` vtable has one address, so comparing addresses is exact.
            let same_owner = owner == buffer.owner && std::ptr::eq(vtable, buffer.vtable);
            if !same_owner || run_len == RUN {
                flush((owner, vtable), &slots[..run_len]);
                run_len = 0;
            }
        }
        run_owner = Some((buffer.owner, buffer.vtable));
        slots[run_len] = buffer.slot();
        run_len += 1;
    }
    if let Some(run) = run_owner {
        flush(run, &slots[..run_len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_send_sync_and_no_bigger_than_before() {
        fn send_sync<T: Send + Sync + Unpin + 'static>() {}
        send_sync::<ZcBuf>();
        send_sync::<ZcBatch>();
        // Before the owner seam (an enum over the area and the pool) a `ZcBuf` took 40 bytes
        // on 64-bit targets, and so does it now (pointer, slot, cursor, owner, vtable); buffers sit in
        // batches and queues by the thousand, so it must not grow.
        let size = size_of::<ZcBuf>();
        #[cfg(target_pointer_width = "64")]
        assert!(size <= 40, "ZcBuf is {size} bytes");
        // The non-null owner leaves a niche: `Option<ZcBuf>` (what `next()` yields) is free.
        assert_eq!(size_of::<Option<ZcBuf>>(), size);
    }

    /// An owner that records how its buffers come back: (owner name, run length; 0 for a
    /// single release).
    struct RecordingOwner {
        name: &'static str,
        returns: std::sync::Mutex<Vec<(&'static str, usize)>>,
    }

    static BYTES: [u8; 16] = *b"0123456789abcdef";

    static RECORDING: BufferOwnerVtable = BufferOwnerVtable {
        release_one: |owner, _slot| {
            // SAFETY: the tests below make buffers only with `RecordingOwner`s.
            let owner = unsafe { owner.cast::<RecordingOwner>().as_ref() };
            owner.returns.lock().unwrap().push((owner.name, 0));
        },
        release_run: |owner, slots| {
            // SAFETY: as above.
            let owner = unsafe { owner.cast::<RecordingOwner>().as_ref() };
            owner
                .returns
                .lock()
                .unwrap()
                .push((owner.name, slots.len()));
        },
        debug_fields: |debug, slot| {
            debug.field("test_offset", &slot.offset);
        },
    };

    fn buffer(owner: &'static RecordingOwner, index: u32) -> ZcBuf {
        let slot = BufferSlot {
            offset: index.into(),
            len: 4,
        };
        // SAFETY: `BYTES` is static and immutable, the owner is static, and the recording
        // vtable may run on any thread.
        unsafe {
            ZcBuf::from_raw_parts(
                BYTES.as_ptr(),
                slot,
                NonNull::from(owner).cast(),
                &RECORDING,
            )
        }
    }

    #[test]
    fn a_batch_returns_runs_per_owner_and_a_buffer_returns_alone() {
        static A: RecordingOwner = RecordingOwner {
            name: "a",
            returns: std::sync::Mutex::new(Vec::new()),
        };
        static B: RecordingOwner = RecordingOwner {
            name: "b",
            returns: std::sync::Mutex::new(Vec::new()),
        };
        let mut buffers: Vec<ZcBuf> = (0..70).map(|i| buffer(&A, i)).collect();
        buffers.extend((0..3).map(|i| buffer(&B, i)));
        buffers.push(buffer(&A, 70));
        let single = buffer(&B, 3);
        assert_eq!(&*single, b"0123");
        assert_eq!(
            format!("{single:?}"),
            "ZcBuf { len: 4, start: 0, test_offset: 3 }"
        );
        drop(ZcBatch::from_vec(buffers));
        drop(single);
        assert_eq!(*A.returns.lock().unwrap(), [("a", 64), ("a", 6), ("a", 1)]);
        assert_eq!(*B.returns.lock().unwrap(), [("b", 3), ("b", 0)]);
    }
}
