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
/// io_uring area puts the chunk's offset in the area and its index here, the copy pool the
/// buffer's index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BufferSlot {
    /// An offset of the owner's choosing (the area: the chunk's offset in the area).
    pub(crate) offset: u64,
    /// Number of bytes in the buffer.
    pub(crate) len: u32,
    /// An index of the owner's choosing (the area: the chunk; the pool: the buffer).
    pub(crate) index: u32,
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
    slot: BufferSlot,
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
// SAFETY: shared access only reads those immutable bytes and the plain integers of `slot`.
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
            slot,
            owner,
            vtable,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.slot.len as usize
    }

    /// Whether the buffer holds no bytes (never true for a delivered buffer).
    pub fn is_empty(&self) -> bool {
        self.slot.len == 0
    }

    /// Converts into [`bytes::Bytes`] without copying; the chunk goes back to the kernel when
    /// the last clone of the `Bytes` is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl Deref for ZcBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is readable and not written while the buffer exists (the
        // contract of `from_raw_parts`; the owner checked it lies inside its memory).
        unsafe { std::slice::from_raw_parts(self.ptr, self.slot.len as usize) }
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
        unsafe { (self.vtable.release_one)(self.owner, self.slot) }
    }
}

impl fmt::Debug for ZcBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ZcBuf");
        debug.field("len", &self.slot.len);
        (self.vtable.debug_fields)(&mut debug, &self.slot);
        debug.finish()
    }
}

/// Buffers of one stream taken at once ([`ZcStream::next_batch`](crate::ZcStream::next_batch)).
///
/// Derefs to `[ZcBuf]`. Dropping the batch returns every buffer still in it to the kernel
/// with one refill-ring publication, instead of one per buffer: for a consumer that handles
/// a batch and then lets it go, the cheapest way to give the area back. Buffers taken out
/// (`into_iter`, `into_vec`) are returned one by one, when each is dropped.
///
/// ```no_run
/// # async fn demo(mut stream: tokio_zcrx::ZcStream) -> std::io::Result<()> {
/// let mut total = 0;
/// while let Some(batch) = stream.next_batch(64).await {
///     let batch = batch?;
///     total += batch.iter().map(|buf| buf.len()).sum::<usize>();
/// } // each batch goes back to the kernel here, all at once
/// # let _ = total;
/// # Ok(())
/// # }
/// ```
pub struct ZcBatch {
    buffers: Vec<ZcBuf>,
}

impl ZcBatch {
    pub(crate) fn new(buffers: Vec<ZcBuf>) -> ZcBatch {
        ZcBatch { buffers }
    }

    /// Bytes in all buffers of the batch.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(ZcBuf::len).sum()
    }

    /// The buffers, to be returned one by one as each is dropped.
    pub fn into_vec(mut self) -> Vec<ZcBuf> {
        std::mem::take(&mut self.buffers)
    }
}

impl Deref for ZcBatch {
    type Target = [ZcBuf];

    fn deref(&self) -> &[ZcBuf] {
        &self.buffers
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
        self.buffers.iter()
    }
}

impl fmt::Debug for ZcBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZcBatch")
            .field("buffers", &self.buffers.len())
            .field("bytes", &self.bytes())
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
    const RUN: usize = 64;
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
        slots[run_len] = buffer.slot;
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
        // on 64-bit targets, and so does it now (pointer, slot, owner, vtable); buffers sit in
        // batches and queues by the thousand, so it must not grow.
        let size = std::mem::size_of::<ZcBuf>();
        #[cfg(target_pointer_width = "64")]
        assert!(size <= 40, "ZcBuf is {size} bytes");
        // The non-null owner leaves a niche: `Option<ZcBuf>` (what `next()` yields) is free.
        assert_eq!(std::mem::size_of::<Option<ZcBuf>>(), size);
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
            debug.field("test_index", &slot.index);
        },
    };

    fn buffer(owner: &'static RecordingOwner, index: u32) -> ZcBuf {
        let slot = BufferSlot {
            offset: 0,
            len: 4,
            index,
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
        assert_eq!(format!("{single:?}"), "ZcBuf { len: 4, test_index: 3 }");
        drop(ZcBatch::new(buffers));
        drop(single);
        assert_eq!(*A.returns.lock().unwrap(), [("a", 64), ("a", 6), ("a", 1)]);
        assert_eq!(*B.returns.lock().unwrap(), [("b", 3), ("b", 0)]);
    }
}
