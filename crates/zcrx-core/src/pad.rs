//! [`CachePadded`]: keeping contended data on cache lines of its own.

/// Aligns (and so pads) `T` to 128 bytes, so that it never shares a cache line, nor the
/// adjacent line that x86 prefetches in pairs, with data written by other threads.
///
/// 128 rather than 64: Intel's spatial prefetcher pulls 64-byte lines in pairs, so two
/// values 64 bytes apart still contend (crossbeam pads to 128 on x86-64 and aarch64 for the
/// same reason). The refill ring's indices and `tokio-zcrx`'s per-area reference count, both
/// written by every thread that drops a buffer, use it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_values_sit_a_line_pair_apart() {
        let pair = [CachePadded(1u8), CachePadded(2u8)];
        let distance = &pair[1] as *const _ as usize - &pair[0] as *const _ as usize;
        assert_eq!(distance, 128);
        assert_eq!(*pair[1], 2);
    }
}
