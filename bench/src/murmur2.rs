//! Kafka's default partitioner: murmur2 over the key bytes, exactly as
//! `org.apache.kafka.common.utils.Utils.murmur2`, and
//! `toPositive(murmur2(key)) % numPartitions` for keyed records.
//!
//! Pure functions, used by every producer thread and by the verifier.

const SEED: u32 = 0x9747_b28c;
const M: u32 = 0x5bd1_e995;
const R: u32 = 24;

/// Kafka's murmur2 (32-bit, seed 0x9747b28c), returned as Java's signed int.
pub fn murmur2(data: &[u8]) -> i32 {
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    // Java's switch falls through from case 3 to case 1.
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Kafka's `Utils.toPositive`: clears the sign bit (not `abs`).
pub fn to_positive(n: i32) -> i32 {
    n & 0x7fff_ffff
}

/// The partition Kafka's default partitioner picks for a keyed record.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    debug_assert!(partitions > 0, "partition count {partitions}");
    to_positive(murmur2(key)) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn kafka_vectors() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key.as_bytes()), want, "murmur2({key:?})");
        }
    }

    #[test]
    fn partition_choice_uses_to_positive_not_abs() {
        // murmur2("21") is negative: toPositive masks the sign bit.
        let h = murmur2(b"21");
        assert!(h < 0);
        assert_eq!(to_positive(h), h & 0x7fff_ffff);
        assert_eq!(partition_for_key(b"21", 7), (h & 0x7fff_ffff) % 7);
        assert_ne!(to_positive(h), h.wrapping_abs());
        // Stable across calls and within range.
        for n in 1..64 {
            let p = partition_for_key(b"foobar", n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for_key(b"foobar", n));
        }
        assert_eq!(partition_for_key(b"foobar", 1), 0);
        // -790332482 & 0x7fffffff = 1357151166; % 10 = 6
        assert_eq!(partition_for_key(b"foobar", 10), 6);
        assert_eq!(murmur2(b""), 275_646_681);
    }
}
