//! The bytes a synthetic kernel writes: a pattern derived from the stream's seed and each
//! byte's position in the stream, so a test can check every byte and its order from the
//! buffer alone.

/// The 8 pattern bytes at stream positions `8 * word .. 8 * word + 8`.
fn word(seed: u64, word: u64) -> [u8; 8] {
    // splitmix64's finaliser: every bit of seed and position reaches every byte.
    let mut z = seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Writes the pattern of stream `seed` for positions `position..position + out.len()`.
pub(crate) fn fill(seed: u64, position: u64, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        let at = position + i as u64;
        *byte = word(seed, at / 8)[(at % 8) as usize];
    }
}

/// Checks `data` against the pattern of stream `seed` from `position`; on a mismatch,
/// returns the stream position of the first wrong byte.
pub(crate) fn verify(seed: u64, position: u64, data: &[u8]) -> Result<(), u64> {
    let mut expected = [0u8; 8];
    let mut current_word = u64::MAX;
    for (i, &byte) in data.iter().enumerate() {
        let at = position + i as u64;
        if at / 8 != current_word {
            current_word = at / 8;
            expected = word(seed, current_word);
        }
        if byte != expected[(at % 8) as usize] {
            return Err(at);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_checks_itself_and_catches_shifts_and_other_streams() {
        let mut data = vec![0u8; 1000];
        fill(7, 13, &mut data);
        assert_eq!(verify(7, 13, &data), Ok(()));
        assert_eq!(
            verify(7, 18, &data[5..]),
            Ok(()),
            "a slice checks at its own position"
        );
        assert!(
            verify(7, 13, &data[5..]).is_err(),
            "a slice checks at the start"
        );
        assert!(verify(7, 14, &data).is_err(), "a shifted position passes");
        assert!(verify(8, 13, &data).is_err(), "another stream's bytes pass");
        data[500] ^= 1;
        assert_eq!(verify(7, 13, &data), Err(513));
    }
}
