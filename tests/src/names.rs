//! Short, unique, reproducible names for test resources.
//!
//! Interface names are limited to 15 bytes and BPF object names to 15, so a test's name is
//! reduced to a short tag plus a hash of the full name and the process id.

/// A tag for a test: up to 8 sanitized characters of its name and 6 hex digits of a hash of
/// the name and the pid (so two tests with the same prefix, or two runs, never collide).
pub fn tag(test: &str) -> String {
    let mut prefix: String = test
        .rsplit("::")
        .next()
        .unwrap_or(test)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    if prefix.is_empty() {
        prefix.push('t');
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in test.bytes().chain(std::process::id().to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}-{:06x}", h & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_short_and_distinct() {
        let a = tag("tests::byte_counts_are_exact");
        let b = tag("tests::byte_counts_are_exactly_other");
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("bytecoun-"), "{a}");
        assert!(
            a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'),
            "{a}"
        );
    }
}
