//! The bytes the load generator sends: reproducible from (seed, connection index) alone.
//!
//! Byte `i` of connection `c`'s payload is byte `i % 8` (little endian) of the 64-bit word
//! `mix(key + (i / 8 + 1) * GOLDEN)`, where `key = mix(seed ^ mix(c))` and `mix` is the
//! SplitMix64 finalizer. Being a counter stream, any range can be produced without the bytes
//! before it, which is how an echo is checked, and a receiver can recompute what it should
//! have got (or compare the CRC-32 the load generator reports).

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a bijective 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    key: u64,
}

impl Payload {
    /// The payload connection `index` sends under `seed`.
    pub fn new(seed: u64, index: u64) -> Payload {
        Payload {
            key: mix(seed ^ mix(index)),
        }
    }

    fn word(&self, block: u64) -> [u8; 8] {
        mix(self
            .key
            .wrapping_add(block.wrapping_add(1).wrapping_mul(GOLDEN)))
        .to_le_bytes()
    }

    /// Fills `out` with the payload bytes from `offset` on.
    pub fn fill(&self, offset: u64, out: &mut [u8]) {
        // Up to the next multiple of 8, then whole words, then what is left.
        let skip = (offset % 8) as usize;
        let head = ((8 - skip) % 8).min(out.len());
        let (first, rest) = out.split_at_mut(head);
        first.copy_from_slice(&self.word(offset / 8)[skip..skip + head]);
        let mut block = (offset + head as u64) / 8;
        let mut words = rest.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.word(block));
            block += 1;
        }
        let tail = words.into_remainder();
        let len = tail.len();
        tail.copy_from_slice(&self.word(block)[..len]);
    }

    /// A generator for the sizes of this connection's writes (independent of the bytes).
    pub fn write_sizes(&self, max: usize) -> WriteSizes {
        WriteSizes {
            state: self.key ^ 0x5752_4954_4553_495A, // "WRITESIZ"
            max: max.max(1) as u64,
        }
    }
}

/// Write sizes uniformly distributed in `1..=max` (SplitMix64; the tiny modulo bias does not
/// matter here).
#[derive(Debug, Clone)]
pub struct WriteSizes {
    state: u64,
    max: u64,
}

impl Iterator for WriteSizes {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        self.state = self.state.wrapping_add(GOLDEN);
        Some((1 + mix(self.state) % self.max) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_matches_the_whole_stream() {
        let payload = Payload::new(42, 3);
        let mut whole = vec![0; 1000];
        payload.fill(0, &mut whole);
        for (start, end) in [
            (0, 0),
            (0, 5),
            (3, 4),
            (5, 13),
            (7, 200),
            (8, 16),
            (9, 1000),
        ] {
            let mut part = vec![0; end - start];
            payload.fill(start as u64, &mut part);
            assert_eq!(part, whole[start..end], "{start}..{end}");
        }
    }

    #[test]
    fn connections_and_seeds_differ_and_repeat() {
        let bytes = |seed, index| {
            let mut out = [0; 32];
            Payload::new(seed, index).fill(0, &mut out);
            out
        };
        assert_eq!(bytes(1, 0), bytes(1, 0));
        assert_ne!(bytes(1, 0), bytes(1, 1));
        assert_ne!(bytes(1, 0), bytes(2, 0));
        // Pinned, so the stream never changes silently: it is part of the CLI contract.
        assert_eq!(
            crc32fast::hash(&{
                let mut out = vec![0; 1 << 16];
                Payload::new(1, 0).fill(0, &mut out);
                out
            }),
            PINNED_CRC
        );
    }

    /// zlib.crc32 of the first 64 KiB of (seed 1, connection 0), computed from the formula above.
    const PINNED_CRC: u32 = 1_551_274_214;

    #[test]
    fn write_sizes_stay_in_range() {
        let sizes: Vec<usize> = Payload::new(7, 0).write_sizes(10).take(1000).collect();
        assert!(sizes.iter().all(|&n| (1..=10).contains(&n)));
        assert!(sizes.contains(&1) && sizes.contains(&10));
        assert!(Payload::new(7, 0).write_sizes(0).take(10).all(|n| n == 1));
    }
}
