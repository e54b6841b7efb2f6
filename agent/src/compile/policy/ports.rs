//! Port ranges as the prefixes a `POLICY` LPM key can hold.

/// Splits `first..=last` into the fewest aligned blocks `(start, bits)`, each covering the
/// ports whose top `bits` bits equal `start`'s (at most 30 blocks for any 16-bit range).
pub fn range_prefixes(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut at, end) = (u32::from(first), u32::from(last));
    while at <= end {
        // The largest aligned block starting at `at` that stays inside the range.
        let mut size = if at == 0 {
            1 << 16
        } else {
            1 << at.trailing_zeros()
        };
        while at + size - 1 > end {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros();
        out.push((at as u16, bits));
        at += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn covered(blocks: &[(u16, u32)]) -> Vec<u32> {
        let mut ports: Vec<u32> = blocks
            .iter()
            .flat_map(|&(start, bits)| {
                let size = 1u32 << (16 - bits);
                u32::from(start)..u32::from(start) + size
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    #[test]
    fn examples() {
        assert_eq!(range_prefixes(80, 80), [(80, 16)]);
        assert_eq!(range_prefixes(0, 65_535), [(0, 0)]);
        assert_eq!(range_prefixes(32_768, 65_535), [(32_768, 1)]);
        assert_eq!(range_prefixes(8080, 8083), [(8080, 14)]);
        assert_eq!(range_prefixes(1, 65_535).len(), 16);
    }

    proptest! {
        #[test]
        fn blocks_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let blocks = range_prefixes(first, last);
            prop_assert!(blocks.len() <= 30);
            let expected: Vec<u32> = (u32::from(first)..=u32::from(last)).collect();
            prop_assert_eq!(covered(&blocks), expected);
            for (start, bits) in blocks {
                // Aligned: the bits below the prefix are zero.
                prop_assert_eq!(u32::from(start) & ((1u32 << (16 - bits)) - 1), 0);
            }
        }
    }
}
