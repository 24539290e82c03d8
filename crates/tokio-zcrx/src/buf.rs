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
            owner: Owner::Pool { pool, index },
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the buffer holds no bytes (never true for a delivered buffer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        // SAFETY: `ptr..ptr + len` lies inside the area (checked when the completion was
        // decoded) or the pool buffer, which stay mapped while `self.owner` holds them, and
        // nobody writes them until our drop returns them.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
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
        debug.field("len", &self.len);
        match &self.owner {
            Owner::Area { area_offset, .. } => debug.field("area_offset", area_offset),
            Owner::Pool { index, .. } => debug.field("pool_buffer", index),
        };
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
