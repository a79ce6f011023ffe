//! One transactional id's state and its record in `__transaction_state`.
//!
//! The record format is Kafka's (`TransactionLogKey` v0 and
//! `TransactionLogValue` v0, non-flexible), so the log reads the same as
//! Kafka's to anyone who decodes it:
//!
//! ```text
//! key   = i16 version (0) | string transactional_id
//! value = i16 version (0) | i64 producer_id | i16 producer_epoch | i32 timeout_ms | i8 state
//!         | i32 n | n x (string topic | i32 m | m x i32 partition)
//!         | i64 last_update_ms | i64 start_ms
//! ```
//!
//! A null value (tombstone) forgets the id (`transactional.id.expiration.ms`).

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};

/// Kafka's `TransactionState`, with its wire/log numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxnState {
    Empty = 0,
    Ongoing = 1,
    PrepareCommit = 2,
    PrepareAbort = 3,
    CompleteCommit = 4,
    CompleteAbort = 5,
    Dead = 6,
    PrepareEpochFence = 7,
}

impl TxnState {
    pub fn from_i8(v: i8) -> Option<TxnState> {
        use TxnState::*;
        Some(match v {
            0 => Empty,
            1 => Ongoing,
            2 => PrepareCommit,
            3 => PrepareAbort,
            4 => CompleteCommit,
            5 => CompleteAbort,
            6 => Dead,
            7 => PrepareEpochFence,
            _ => return None,
        })
    }

    /// The name DescribeTransactions and ListTransactions use.
    pub fn name(self) -> &'static str {
        use TxnState::*;
        match self {
            Empty => "Empty",
            Ongoing => "Ongoing",
            PrepareCommit => "PrepareCommit",
            PrepareAbort => "PrepareAbort",
            CompleteCommit => "CompleteCommit",
            CompleteAbort => "CompleteAbort",
            Dead => "Dead",
            PrepareEpochFence => "PrepareEpochFence",
        }
    }

    /// A decision is written and its markers are still being sent.
    pub fn is_preparing(self) -> bool {
        matches!(self, TxnState::PrepareCommit | TxnState::PrepareAbort | TxnState::PrepareEpochFence)
    }
}

/// What the coordinator knows of one transactional id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnMeta {
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// The epoch before the last bump, so a producer retrying an
    /// InitProducerId whose answer it lost is recognised (KIP-360). Not
    /// stored (-1 after a load), as in Kafka's v0 record.
    pub last_producer_epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    pub partitions: BTreeSet<(String, i32)>,
    pub last_update_ms: i64,
    /// When the current transaction started (its first AddPartitions), -1 when none.
    pub start_ms: i64,
}

impl TxnMeta {
    /// Whether the open transaction has run past its timeout at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.state == TxnState::Ongoing
            && self.start_ms >= 0
            && now_ms.saturating_sub(self.start_ms) > self.timeout_ms as i64
    }
}

pub fn key(transactional_id: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + transactional_id.len());
    b.put_i16(0);
    put_str(&mut b, transactional_id);
    b.freeze()
}

pub fn value(m: &TxnMeta) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_i16(0);
    b.put_i64(m.producer_id);
    b.put_i16(m.producer_epoch);
    b.put_i32(m.timeout_ms);
    b.put_i8(m.state as i8);
    // Grouped by topic, as Kafka writes them.
    let mut topics: Vec<(&str, Vec<i32>)> = Vec::new();
    for (t, p) in &m.partitions {
        match topics.last_mut() {
            Some((last, ps)) if *last == t.as_str() => ps.push(*p),
            _ => topics.push((t.as_str(), vec![*p])),
        }
    }
    b.put_i32(topics.len() as i32);
    for (t, ps) in topics {
        put_str(&mut b, t);
        b.put_i32(ps.len() as i32);
        for p in ps {
            b.put_i32(p);
        }
    }
    b.put_i64(m.last_update_ms);
    b.put_i64(m.start_ms);
    b.freeze()
}

/// Decodes a key; `None` when it is not a transaction log key.
pub fn decode_key(key: &[u8]) -> Option<String> {
    let mut r = Reader { b: key };
    if r.i16()? != 0 {
        return None;
    }
    r.str()
}

/// Decodes a value (versions 0 and 1; v1's tagged fields are ignored).
/// `None` when it is damaged.
pub fn decode_value(value: &[u8]) -> Option<TxnMeta> {
    let mut r = Reader { b: value };
    let version = r.i16()?;
    if !(0..=1).contains(&version) {
        return None;
    }
    let flexible = version >= 1;
    let producer_id = r.i64()?;
    let producer_epoch = r.i16()?;
    let timeout_ms = r.i32()?;
    let state = TxnState::from_i8(r.i8()?)?;
    let mut partitions = BTreeSet::new();
    let n = if flexible { r.uvarint()? as i64 - 1 } else { r.i32()? as i64 };
    // Every entry takes at least 6 bytes: a count cannot exceed what is left.
    if n > r.b.len() as i64 {
        return None;
    }
    for _ in 0..n.max(0) {
        let topic = if flexible { r.compact_str()? } else { r.str()? };
        let m = if flexible { r.uvarint()? as i64 - 1 } else { r.i32()? as i64 };
        if m > r.b.len() as i64 {
            return None;
        }
        for _ in 0..m.max(0) {
            partitions.insert((topic.clone(), r.i32()?));
        }
        if flexible {
            r.skip_tags()?;
        }
    }
    let last_update_ms = r.i64()?;
    let start_ms = r.i64()?;
    Some(TxnMeta {
        producer_id,
        producer_epoch,
        last_producer_epoch: -1,
        timeout_ms,
        state,
        partitions,
        last_update_ms,
        start_ms,
    })
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len().min(i16::MAX as usize) as i16);
    b.put_slice(&s.as_bytes()[..s.len().min(i16::MAX as usize)]);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn i8(&mut self) -> Option<i8> {
        self.take(1).map(|b| b[0] as i8)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes)
    }
    fn str(&mut self) -> Option<String> {
        let n = self.i16()?;
        if n < 0 {
            return None;
        }
        self.take(n as usize).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string)
    }
    fn uvarint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..35).step_by(7) {
            let b = self.take(1)?[0];
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn compact_str(&mut self) -> Option<String> {
        let n = self.uvarint()?.checked_sub(1)?;
        self.take(n as usize).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string)
    }
    fn skip_tags(&mut self) -> Option<()> {
        for _ in 0..self.uvarint()? {
            let _tag = self.uvarint()?;
            let len = self.uvarint()?;
            self.take(len as usize)?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(state: TxnState, parts: &[(&str, i32)]) -> TxnMeta {
        TxnMeta {
            producer_id: (7 << 40) | 3,
            producer_epoch: 4,
            last_producer_epoch: -1,
            timeout_ms: 60_000,
            state,
            partitions: parts.iter().map(|(t, p)| (t.to_string(), *p)).collect(),
            last_update_ms: 1_700_000_000_123,
            start_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn records_roundtrip_in_kafkas_v0_layout() {
        let m = meta(TxnState::Ongoing, &[("a", 1), ("a", 0), ("b", 5)]);
        let v = value(&m);
        // version, pid, epoch, timeout, state, 2 topics
        assert_eq!(&v[..2], &[0, 0]);
        assert_eq!(v[2 + 8 + 2 + 4], 1);
        assert_eq!(&v[17..21], &2i32.to_be_bytes());
        assert_eq!(decode_value(&v), Some(m));
        assert_eq!(decode_key(&key("my-txn")).as_deref(), Some("my-txn"));
        for s in 0..8 {
            let st = TxnState::from_i8(s).unwrap();
            assert_eq!(decode_value(&value(&meta(st, &[]))).map(|m| m.state), Some(st));
        }
    }

    #[test]
    fn damaged_values_are_refused_without_panicking() {
        let v = value(&meta(TxnState::PrepareCommit, &[("t", 0)]));
        for cut in 0..v.len() {
            assert_eq!(decode_value(&v[..cut]), None, "cut at {cut}");
        }
        let mut huge = v.to_vec();
        huge[17..21].copy_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(decode_value(&huge), None);
        let mut bad_state = v.to_vec();
        bad_state[16] = 42;
        assert_eq!(decode_value(&bad_state), None);
        assert_eq!(decode_key(&[0, 1]), None);
        assert_eq!(decode_key(&[0, 9, 0, 1, b'x']), None);
    }

    #[test]
    fn expiry_counts_from_the_transaction_start() {
        let m = meta(TxnState::Ongoing, &[("t", 0)]);
        assert!(!m.expired(m.start_ms + 60_000));
        assert!(m.expired(m.start_ms + 60_001));
        assert!(!meta(TxnState::CompleteCommit, &[]).expired(i64::MAX));
    }
}
