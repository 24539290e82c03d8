//! [`ZcBuf`]: received bytes, borrowed from the kernel's receive area.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::backend::copy::Pool;
use crate::backend::uring::area::{release, release_many, Area, BufferRefs};
use zcrx_sys::zcrx::io_uring_zcrx_rqe;

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
    len: u32,
    /// Bytes consumed through [`bytes::Buf::advance`]: the buffer shows `start..len`. `len`
    /// stays the delivered length, which the return to the kernel needs.
    start: u32,
    owner: Owner,
}

/// Where the bytes live, and so where they go back to.
enum Owner {
    /// A chunk of the zcrx area, returned through the refill ring.
    /// Holds one of the area's buffer references ([`BufferRefs`]), not an `Arc`.
    Area {
        area: std::ptr::NonNull<Area>,
        chunk: u32,
        area_offset: u64,
    },
    /// A copy-mode pool buffer, returned to the pool.
    Pool { pool: Arc<Pool>, index: u32 },
}

// SAFETY: the bytes are immutable while the buffer exists (the kernel does not write a chunk
// between delivering it and getting it back through the refill ring; a pool buffer is off the
// free list), and `Area` and `Pool` are Sync.
unsafe impl Send for ZcBuf {}
// SAFETY: shared access only reads those immutable bytes.
unsafe impl Sync for ZcBuf {}

impl ZcBuf {
    /// Wraps one delivered chunk reference. The caller (the driver) owes exactly one refill
    /// entry for it, which this buffer's drop pays.
    pub(crate) fn new(refs: &mut BufferRefs, area_offset: u64, len: u32, chunk: u32) -> ZcBuf {
        let area = refs.take();
        // SAFETY: the reference just taken keeps the area alive.
        let area_ref = unsafe { area.as_ref() };
        let ptr = area_ref.data_ptr(area_offset);
        area_ref.on_delivered(chunk);
        ZcBuf {
            ptr,
            len,
            start: 0,
            owner: Owner::Area {
                area,
                chunk,
                area_offset,
            },
        }
    }

    /// Wraps `len` bytes copied into pool buffer `index` (at `ptr`).
    pub(crate) fn from_pool(pool: Arc<Pool>, index: u32, ptr: *const u8, len: u32) -> ZcBuf {
        ZcBuf {
            ptr,
            len,
            start: 0,
            owner: Owner::Pool { pool, index },
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
}

impl Deref for ZcBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` lies inside the area (checked when the completion was
        // decoded) or the pool buffer, which stay mapped while `self.owner` holds them, and
        // nobody writes them until our drop returns them; `start <= len` (`advance` checks).
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
        match &self.owner {
            Owner::Area {
                area,
                chunk,
                area_offset,
            } => {
                // SAFETY: this buffer owns one of the area's buffer references, so the area is
                // alive until `release`, after which it is not touched.
                unsafe {
                    area.as_ref().return_chunk(*area_offset, self.len, *chunk);
                    release(area.as_ptr());
                }
            }
            Owner::Pool { pool, index } => pool.release_delivered(*index),
        }
    }
}

impl fmt::Debug for ZcBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ZcBuf");
        debug.field("len", &self.len()).field("start", &self.start);
        match &self.owner {
            Owner::Area { area_offset, .. } => debug.field("area_offset", area_offset),
            Owner::Pool { index, .. } => debug.field("pool_buffer", index),
        };
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
    /// how many it added.
    pub(crate) fn append_with(&mut self, append: impl FnOnce(&mut Vec<ZcBuf>)) -> usize {
        let before = self.buffers.len();
        append(&mut self.buffers);
        self.count_appended(before);
        self.buffers.len() - before
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

/// Returns every buffer in `buffers`: area chunks in runs per area, each run with one refill
/// publication and one reference release; pool buffers one by one. (Today a batch comes from
/// one stream, so its buffers share one area or are all pool buffers; mixed input is handled
/// all the same.)
fn return_all(buffers: &mut Vec<ZcBuf>) {
    const RUN: usize = 64;
    let mut entries: [io_uring_zcrx_rqe; RUN] = [io_uring_zcrx_rqe::default(); RUN];
    let mut chunks = [0u32; RUN];
    let mut run_area: Option<std::ptr::NonNull<Area>> = None;
    let mut run_len = 0;
    let flush = |area: std::ptr::NonNull<Area>,
                 len: usize,
                 entries: &[io_uring_zcrx_rqe],
                 chunks: &[u32]| {
        // SAFETY: the run's buffers each owned one of the area's buffer references, which
        // keep it alive until `release_many` gives them all back; nothing touches the area
        // afterwards.
        unsafe {
            area.as_ref().return_chunks(&entries[..len], &chunks[..len]);
            release_many(area.as_ptr(), len);
        }
    };
    for buffer in buffers.drain(..) {
        let Owner::Area {
            area,
            chunk,
            area_offset,
        } = buffer.owner
        else {
            drop(buffer); // a pool buffer
            continue;
        };
        if run_area.is_some_and(|run| run != area) || run_len == RUN {
            flush(
                run_area.expect("a run in progress"),
                run_len,
                &entries,
                &chunks,
            );
            run_len = 0;
        }
        run_area = Some(area);
        // SAFETY: the buffer's reference keeps the area alive (until the run is flushed).
        entries[run_len] = unsafe { area.as_ref() }.refill_entry(area_offset, buffer.len);
        chunks[run_len] = chunk;
        run_len += 1;
        // Its chunk and its reference are now owed by the run.
        std::mem::forget(buffer);
    }
    if let Some(area) = run_area {
        if run_len > 0 {
            flush(area, run_len, &entries, &chunks);
        }
    }
}
