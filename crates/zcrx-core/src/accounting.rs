//! Buffer accounting: how many user references each chunk has outstanding.
//!
//! Every data CQE gives user space one reference on a chunk, and every reference must be
//! given back with exactly one refill entry. A chunk can legitimately be delivered in several
//! CQEs (several packets landing in one chunk), so it can have several references at once.
//! [`ChunkRefs`] counts them per chunk so that the runtime can catch its own bugs: a second
//! return of the same reference (which the kernel would silently ignore, leaving the
//! accounting wrong) is reported as [`AccountingError::DoubleReturn`].
//!
//! Each operation is one atomic read-modify-write on the chunk's own counter, so buffers can
//! be returned from any thread. Totals are computed by scanning (`O(chunks)`): they are for
//! diagnostics and tests, not for the per-chunk path.
//!
//! Order on return: call [`ChunkRefs::on_returned`] *before* pushing the refill entry. The
//! kernel may redeliver the chunk as soon as it sees the entry, and the driver's
//! [`ChunkRefs::on_delivered`] for that must not be overtaken by the decrement it replaces.

use core::fmt;

use crate::sync::{AtomicU32, Ordering};

/// A chunk-accounting violation: a runtime bug, never caused by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountingError {
    /// `chunk` was returned while it had no outstanding reference.
    DoubleReturn {
        /// The chunk index.
        chunk: u32,
    },
    /// `chunk` is not a chunk of this area.
    UnknownChunk {
        /// The chunk index.
        chunk: u32,
        /// Number of chunks in the area.
        chunks: u32,
    },
}

impl fmt::Display for AccountingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::DoubleReturn { chunk } => {
                write!(f, "chunk {chunk} returned with no outstanding reference")
            }
            Self::UnknownChunk { chunk, chunks } => {
                write!(f, "chunk {chunk} is outside the area's {chunks} chunks")
            }
        }
    }
}

impl std::error::Error for AccountingError {}

/// Per-chunk count of outstanding user references; `Sync`, one atomic per operation.
pub struct ChunkRefs {
    refs: Box<[AtomicU32]>,
}

impl ChunkRefs {
    /// Accounting for an area of `chunks` chunks, none outstanding.
    #[must_use]
    pub fn new(chunks: u32) -> Self {
        Self {
            refs: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Number of chunks accounted.
    #[must_use]
    pub fn chunks(&self) -> u32 {
        // Built from a `u32` count.
        self.refs.len() as u32
    }

    /// Records that a CQE delivered `chunk` (one more reference owed back).
    ///
    /// # Errors
    ///
    /// [`AccountingError::UnknownChunk`] if `chunk` is out of range.
    pub fn on_delivered(&self, chunk: u32) -> Result<(), AccountingError> {
        // Relaxed: the count is not used to order memory accesses; the data itself is handed
        // over through the CQ and the refill ring, which synchronise.
        self.counter(chunk)?.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records that one reference on `chunk` is being returned.
    ///
    /// # Errors
    ///
    /// [`AccountingError::DoubleReturn`] (nothing changed) if `chunk` has no outstanding
    /// reference, [`AccountingError::UnknownChunk`] if it is out of range.
    pub fn on_returned(&self, chunk: u32) -> Result<(), AccountingError> {
        self.counter(chunk)?
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |refs| {
                refs.checked_sub(1)
            })
            .map(drop)
            .map_err(|_| AccountingError::DoubleReturn { chunk })
    }

    /// Outstanding references on `chunk` (0 if out of range).
    #[must_use]
    pub fn outstanding(&self, chunk: u32) -> u32 {
        self.counter(chunk)
            .map_or(0, |refs| refs.load(Ordering::Relaxed))
    }

    /// Outstanding references over all chunks. `O(chunks)`.
    #[must_use]
    pub fn total_outstanding(&self) -> u64 {
        self.refs
            .iter()
            .map(|refs| u64::from(refs.load(Ordering::Relaxed)))
            .sum()
    }

    /// Chunks with at least one outstanding reference. `O(chunks)`.
    #[must_use]
    pub fn chunks_in_use(&self) -> u32 {
        self.refs
            .iter()
            .filter(|refs| refs.load(Ordering::Relaxed) != 0)
            .count() as u32
    }

    fn counter(&self, chunk: u32) -> Result<&AtomicU32, AccountingError> {
        self.refs
            .get(chunk as usize)
            .ok_or(AccountingError::UnknownChunk {
                chunk,
                chunks: self.chunks(),
            })
    }
}

impl fmt::Debug for ChunkRefs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkRefs")
            .field("chunks", &self.chunks())
            .field("chunks_in_use", &self.chunks_in_use())
            .field("total_outstanding", &self.total_outstanding())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn delivered_then_returned() {
        let refs = ChunkRefs::new(4);
        assert_eq!(refs.chunks(), 4);
        refs.on_delivered(2).unwrap();
        assert_eq!(refs.outstanding(2), 1);
        assert_eq!(refs.total_outstanding(), 1);
        refs.on_returned(2).unwrap();
        assert_eq!(refs.outstanding(2), 0);
        assert_eq!(refs.total_outstanding(), 0);
        assert_eq!(refs.chunks_in_use(), 0);
    }

    #[test]
    fn a_chunk_delivered_in_several_cqes_owes_several_returns() {
        let refs = ChunkRefs::new(2);
        for _ in 0..3 {
            refs.on_delivered(1).unwrap();
        }
        refs.on_delivered(0).unwrap();
        assert_eq!(refs.outstanding(1), 3);
        assert_eq!(refs.total_outstanding(), 4);
        assert_eq!(refs.chunks_in_use(), 2);
        for _ in 0..3 {
            refs.on_returned(1).unwrap();
        }
        assert_eq!(
            refs.on_returned(1),
            Err(AccountingError::DoubleReturn { chunk: 1 })
        );
        assert_eq!(refs.outstanding(1), 0, "a refused return changes nothing");
        assert_eq!(refs.chunks_in_use(), 1);
    }

    #[test]
    fn double_return_on_fresh_chunk() {
        let refs = ChunkRefs::new(1);
        assert_eq!(
            refs.on_returned(0),
            Err(AccountingError::DoubleReturn { chunk: 0 })
        );
        assert_eq!(refs.outstanding(0), 0);
    }

    #[test]
    fn out_of_range_chunks_are_errors() {
        let refs = ChunkRefs::new(3);
        let unknown = AccountingError::UnknownChunk {
            chunk: 3,
            chunks: 3,
        };
        assert_eq!(refs.on_delivered(3), Err(unknown));
        assert_eq!(refs.on_returned(3), Err(unknown));
        assert_eq!(refs.outstanding(3), 0);
        assert_eq!(
            refs.on_delivered(u32::MAX).unwrap_err().to_string(),
            "chunk 4294967295 is outside the area's 3 chunks"
        );
    }

    #[test]
    fn returns_from_many_threads_balance() {
        const CHUNKS: u32 = 64;
        const PER_CHUNK: u32 = 200;
        let refs = Arc::new(ChunkRefs::new(CHUNKS));
        for chunk in 0..CHUNKS {
            for _ in 0..PER_CHUNK {
                refs.on_delivered(chunk).unwrap();
            }
        }
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let refs = Arc::clone(&refs);
                std::thread::spawn(move || {
                    for round in 0..PER_CHUNK / 4 {
                        for chunk in 0..CHUNKS {
                            // Different threads walk the chunks in different orders.
                            let chunk = (chunk + t * 17 + round) % CHUNKS;
                            refs.on_returned(chunk).unwrap();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(refs.total_outstanding(), 0);
        assert!(refs.on_returned(0).is_err());
    }
}
