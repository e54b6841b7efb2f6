//! Seals on map values that programs read while the agent may replace them.
//!
//! An element of a hash map can be reused for another write as soon as it is replaced or
//! deleted (preallocated maps always did; the others since Linux 6.1), while a program that
//! looked it up still reads it: the program can see a value half of one write and half of another, or another key's
//! value whole. `SERVICES` and `ENDPOINTS` values therefore carry a seal, a hash of their key
//! and their content that the agent computes when it writes them. A program copies the value
//! (one volatile read), checks the seal against the key it looked up, and looks up again on a
//! mismatch; what stays torn fails safe. A torn copy passes the check only if the 32-bit hash of
//! a mix of two writes equals the seal of one of them.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// Folds one word into the hash (MurmurHash3's block step).
#[inline(always)]
pub const fn mix(hash: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (hash ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// The final avalanche (MurmurHash3's `fmix32`), with the number of words folded.
#[inline(always)]
pub const fn finish(hash: u32, words: u32) -> u32 {
    let mut h = hash ^ words;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Seeds tell the maps apart: a value of one map never seals for another.
pub const SEED_SERVICES: u32 = 0x5345_5256;
pub const SEED_ENDPOINTS: u32 = 0x454e_4450;
pub const SEED_FLOWS: u32 = 0x464c_4f57;
pub const SEED_OUTLIER: u32 = 0x4f55_544c;

#[cfg(test)]
mod tests {
    use crate::{
        policy::EndpointInfo,
        svc::{Outlier, ServiceKey, ServiceValue},
    };

    fn key(n: u32) -> ServiceKey {
        ServiceKey {
            addr: [n, 0, 0, 0],
            port: 80u16.to_be(),
            protocol: 6,
            family: 4,
        }
    }

    fn words(v: &ServiceValue) -> [u32; 5] {
        [
            v.service_id,
            v.revision,
            v.count,
            v.affinity_timeout_s,
            v.seal,
        ]
    }

    fn from_words(w: [u32; 5]) -> ServiceValue {
        ServiceValue {
            service_id: w[0],
            revision: w[1],
            count: w[2],
            affinity_timeout_s: w[3],
            seal: w[4],
        }
    }

    /// Every mix of two writes, word by word (what a reader overlapping a reuse can copy),
    /// fails the seal for the key it looked up, unless it is one of the writes whole.
    #[test]
    fn a_torn_service_value_is_never_taken_for_its_key() {
        let a = ServiceValue {
            service_id: 7,
            revision: 100,
            count: 3,
            affinity_timeout_s: 0,
            seal: 0,
        }
        .sealed(&key(1));
        let b = ServiceValue {
            service_id: 9,
            revision: 101,
            count: 1,
            affinity_timeout_s: 10_800,
            seal: 0,
        };
        for b in [b.sealed(&key(1)), b.sealed(&key(2))] {
            let (wa, wb) = (words(&a), words(&b));
            for mask in 0u32..32 {
                let torn = from_words(core::array::from_fn(|i| {
                    if mask & (1 << i) == 0 { wa[i] } else { wb[i] }
                }));
                if torn != a && torn != b {
                    assert!(!torn.is_sealed_for(&key(1)), "mask {mask:05b}");
                    assert!(!torn.is_sealed_for(&key(2)), "mask {mask:05b}");
                }
            }
        }
        // Another key's value, whole, is not this key's.
        assert!(!a.is_sealed_for(&key(2)));
    }

    /// A torn health-checking value is never taken for its frontend's.
    #[test]
    fn a_torn_outlier_value_is_never_taken_for_its_key() {
        let words = |o: &Outlier| {
            [
                o.consecutive,
                o.base_ejection_ms,
                o.max_ejection_ms,
                o.interval_ms,
                u32::from(o.max_ejection_percent) | u32::from(o.min_health_percent) << 8,
                o.connect_timeout_ms,
                o.seal,
            ]
        };
        let from_words = |w: [u32; 7]| Outlier {
            consecutive: w[0],
            base_ejection_ms: w[1],
            max_ejection_ms: w[2],
            interval_ms: w[3],
            max_ejection_percent: w[4] as u8,
            min_health_percent: (w[4] >> 8) as u8,
            _pad: 0,
            connect_timeout_ms: w[5],
            seal: w[6],
        };
        let a = Outlier {
            consecutive: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            interval_ms: 10_000,
            max_ejection_percent: 10,
            min_health_percent: 0,
            _pad: 0,
            connect_timeout_ms: 0,
            seal: 0,
        }
        .sealed(1);
        let b = Outlier {
            consecutive: 3,
            base_ejection_ms: 2_000,
            max_ejection_ms: 300_000,
            interval_ms: 1_000,
            max_ejection_percent: 50,
            min_health_percent: 20,
            _pad: 0,
            connect_timeout_ms: 200,
            seal: 0,
        };
        for b in [b.sealed(1), b.sealed(2)] {
            let (wa, wb) = (words(&a), words(&b));
            for mask in 0u32..128 {
                let torn = from_words(core::array::from_fn(|i| {
                    if mask & (1 << i) == 0 { wa[i] } else { wb[i] }
                }));
                if torn != a && torn != b {
                    assert!(!torn.is_sealed_for(1), "mask {mask:07b}");
                    assert!(!torn.is_sealed_for(2), "mask {mask:07b}");
                }
            }
        }
        assert!(!a.is_sealed_for(2));
    }

    #[test]
    fn an_endpoint_value_seals_for_its_cgroup_only() {
        let e = EndpointInfo {
            endpoint_id: 4,
            policy_set: 12,
            identity: 300,
            flags: 3,
            ip4: 0x0b00_000a,
            seal: 0,
            ip6: [1, 2, 3, 4],
            authz_table: 5,
        };
        let sealed = e.sealed(77);
        assert!(sealed.is_sealed_for(77));
        assert!(!sealed.is_sealed_for(78));
        assert!(!e.is_sealed_for(77), "an unsealed value");
        let mut torn = sealed;
        torn.policy_set = 13;
        assert!(!torn.is_sealed_for(77));
        let mut torn = sealed;
        torn.authz_table = 6;
        assert!(!torn.is_sealed_for(77), "the plaintext table is sealed too");
    }
}
