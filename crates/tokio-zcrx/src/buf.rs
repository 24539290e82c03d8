//! [`ZcBuf`]: received bytes, borrowed from the kernel's receive area.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::copy::Pool;
use crate::runtime::area::{release, Area, BufferRefs};

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
