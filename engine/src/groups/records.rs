//! The records of `__consumer_offsets`, in Kafka's own format, so Kafka's
//! tools can read our log and we could read theirs.
//!
//! ```text
//! offset commit   key   = i16 version (1) | string group | string topic | i32 partition
//!                 value = i16 version (3) | i64 offset | i32 leader epoch | string metadata
//!                         | i64 commit timestamp                       (null value: deleted)
//! group metadata  key   = i16 version (2) | string group
//!                 value = i16 version (3) | string protocol type | i32 generation
//!                         | nullable string protocol | nullable string leader
//!                         | i64 state timestamp | i32 count, then per member:
//!                           string member id | nullable string instance id | string client id
//!                           | string client host | i32 rebalance timeout | i32 session timeout
//!                           | bytes subscription | bytes assignment        (null value: deleted)
//! ```
//! Strings are i16 length + UTF-8 (-1 = null), bytes i32 length + data.
//! Pure functions; used by the coordinator of whichever shard owns the partition.

use bytes::{BufMut, Bytes, BytesMut};
use tidelog_protocol::batch::{self, BatchHeader, Compression, BATCH_HEADER_BYTES};

use super::group::{GroupSnapshot, MemberSnapshot};

/// A committed offset as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

/// One decoded `__consumer_offsets` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Offset { group: String, topic: String, partition: i32, value: Option<OffsetValue> },
    Group { group: String, value: Option<GroupSnapshot> },
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len().min(i16::MAX as usize) as i16);
    b.put_slice(&s.as_bytes()[..s.len().min(i16::MAX as usize)]);
}

fn put_opt_str(b: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => put_str(b, s),
        None => b.put_i16(-1),
    }
}

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_i32(v.len() as i32);
    b.put_slice(v);
}

pub fn offset_key(group: &str, topic: &str, partition: i32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(1);
    put_str(&mut b, group);
    put_str(&mut b, topic);
    b.put_i32(partition);
    b.freeze()
}

pub fn offset_value(v: &OffsetValue) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(3);
    b.put_i64(v.offset);
    b.put_i32(v.leader_epoch);
    put_str(&mut b, &v.metadata);
    b.put_i64(v.commit_timestamp_ms);
    b.freeze()
}

pub fn group_key(group: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(2);
    put_str(&mut b, group);
    b.freeze()
}

pub fn group_value(g: &GroupSnapshot) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(3);
    put_str(&mut b, &g.protocol_type);
    b.put_i32(g.generation);
    put_opt_str(&mut b, g.protocol.as_deref());
    put_opt_str(&mut b, g.leader.as_deref());
    b.put_i64(g.state_timestamp_ms);
    b.put_i32(g.members.len() as i32);
    for m in &g.members {
        put_str(&mut b, &m.id);
        put_opt_str(&mut b, m.instance_id.as_deref());
        put_str(&mut b, &m.client_id);
        put_str(&mut b, &m.client_host);
        b.put_i32(m.rebalance_timeout_ms);
        b.put_i32(m.session_timeout_ms);
        put_bytes(&mut b, &m.subscription);
        put_bytes(&mut b, &m.assignment);
    }
    b.freeze()
}

/// A bounds-checked big-endian reader over untrusted bytes.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|s| i16::from_be_bytes([s[0], s[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn i64(&mut self) -> Option<i64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Some(i64::from_be_bytes(a))
    }
    fn opt_str(&mut self) -> Option<Option<String>> {
        let n = self.i16()?;
        if n < 0 {
            return Some(None);
        }
        let s = self.take(n as usize)?;
        Some(Some(String::from_utf8_lossy(s).into_owned()))
    }
    fn str(&mut self) -> Option<String> {
        self.opt_str()?
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.i32()?;
        if n < 0 {
            return Some(Bytes::new());
        }
        Some(Bytes::copy_from_slice(self.take(n as usize)?))
    }
}

/// Decodes one record; `None` for a record we do not understand (skipped).
pub fn decode(key: &[u8], value: Option<&[u8]>) -> Option<Record> {
    let mut k = Reader { b: key };
    match k.i16()? {
        0 | 1 => {
            let group = k.str()?;
            let topic = k.str()?;
            let partition = k.i32()?;
            let value = match value {
                None => None,
                Some(v) => {
                    let mut r = Reader { b: v };
                    let version = r.i16()?;
                    let offset = r.i64()?;
                    let leader_epoch = if version >= 3 { r.i32()? } else { -1 };
                    let metadata = r.str()?;
                    let commit_timestamp_ms = r.i64()?;
                    Some(OffsetValue { offset, leader_epoch, metadata, commit_timestamp_ms })
                }
            };
            Some(Record::Offset { group, topic, partition, value })
        }
        2 => {
            let group = k.str()?;
            let value = match value {
                None => None,
                Some(v) => Some(decode_group_value(v)?),
            };
            Some(Record::Group { group, value })
        }
        _ => None,
    }
}

fn decode_group_value(v: &[u8]) -> Option<GroupSnapshot> {
    let mut r = Reader { b: v };
    let version = r.i16()?;
    let protocol_type = r.str()?;
    let generation = r.i32()?;
    let protocol = r.opt_str()?;
    let leader = r.opt_str()?;
    let state_timestamp_ms = if version >= 2 { r.i64()? } else { -1 };
    let count = r.i32()?;
    let mut members = Vec::new();
    for _ in 0..count.max(0) {
        let id = r.str()?;
        let instance_id = if version >= 3 { r.opt_str()? } else { None };
        let client_id = r.str()?;
        let client_host = r.str()?;
        let rebalance_timeout_ms = if version >= 1 { r.i32()? } else { 0 };
        let session_timeout_ms = r.i32()?;
        let subscription = r.bytes()?;
        let assignment = r.bytes()?;
        members.push(MemberSnapshot {
            id,
            instance_id,
            client_id,
            client_host,
            rebalance_timeout_ms,
            session_timeout_ms,
            subscription,
            assignment,
        });
    }
    Some(GroupSnapshot { protocol_type, generation, protocol, leader, state_timestamp_ms, members })
}

/// Builds one uncompressed batch of (key, value) records.
pub fn build(records: &[(Bytes, Option<Bytes>)], now_ms: i64) -> Bytes {
    let refs: Vec<batch::RecordRef<'_>> = records
        .iter()
        .map(|(k, v)| batch::RecordRef { key: Some(k), value: v.as_deref(), headers: &[], timestamp_delta_ms: 0 })
        .collect();
    batch::build_batch(&refs, now_ms, batch::ProducerFields::default())
}

/// A batch of `records` written as part of producer `pid`'s transaction
/// (TxnOffsetCommit): the transactional attribute set, CRC recomputed.
pub fn build_transactional(records: &[(Bytes, Option<Bytes>)], now_ms: i64, pid: i64, epoch: i16) -> Bytes {
    let refs: Vec<batch::RecordRef<'_>> = records
        .iter()
        .map(|(k, v)| batch::RecordRef { key: Some(k), value: v.as_deref(), headers: &[], timestamp_delta_ms: 0 })
        .collect();
    let producer = batch::ProducerFields { producer_id: pid, producer_epoch: epoch, base_sequence: -1 };
    let mut b = BytesMut::from(&batch::build_batch(&refs, now_ms, producer)[..]);
    // attributes at 21..23, CRC-32C of everything from them on at 17..21.
    const ATTRIBUTES: usize = 21;
    const TRANSACTIONAL: i16 = 0x10;
    let attributes = i16::from_be_bytes([b[ATTRIBUTES], b[ATTRIBUTES + 1]]) | TRANSACTIONAL;
    b[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&b[ATTRIBUTES..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b.freeze()
}

/// Calls `f(key, value)` for every record of the uncompressed data batches
/// in `chunk` (back-to-back batches as the log returns them). Compressed or
/// malformed batches are skipped with a warning. Returns the offset after
/// the last whole batch seen.
pub fn for_each_record(chunk: &[u8], mut f: impl FnMut(&[u8], Option<&[u8]>)) -> Option<i64> {
    for_each_batch(chunk, |h, _, records| {
        if !h.is_control() {
            walk_records(records, h.record_count(), &mut f);
        }
    })
}

/// What a control batch says (the key of its one record): commit or abort.
pub fn control_commits(h: &BatchHeader<'_>, records: &[u8]) -> Option<bool> {
    let mut kind = None;
    walk_records(records, h.record_count().min(1), &mut |k: &[u8], _| {
        if k.len() >= 4 {
            kind = Some(i16::from_be_bytes([k[2], k[3]]) == 1);
        }
    });
    kind
}

/// Calls `f(header, batch bytes, record bytes)` for every whole,
/// uncompressed batch in `chunk`; returns the offset after the last whole
/// batch seen.
pub fn for_each_batch(chunk: &[u8], mut f: impl FnMut(&BatchHeader<'_>, &[u8], &[u8])) -> Option<i64> {
    let mut at = 0;
    let mut next = None;
    while at + BATCH_HEADER_BYTES <= chunk.len() {
        let Ok(h) = BatchHeader::parse(&chunk[at..]) else { break };
        let size = h.size_bytes();
        if at + size > chunk.len() {
            break;
        }
        next = Some(h.last_offset().next().0);
        if h.compression() != Compression::None {
            log::warn!("internal topic: skipping a compressed batch at offset {}", h.base_offset().0);
        } else {
            f(&h, &chunk[at..at + size], &chunk[at + BATCH_HEADER_BYTES..at + size]);
        }
        at += size;
    }
    next
}

/// Calls `f(key, value)` for each keyed record of a batch's record bytes.
pub fn for_each_keyed(h: &BatchHeader<'_>, records: &[u8], mut f: impl FnMut(&[u8], Option<&[u8]>)) {
    walk_records(records, h.record_count(), &mut f);
}

fn walk_records(mut b: &[u8], count: i32, f: &mut impl FnMut(&[u8], Option<&[u8]>)) {
    for _ in 0..count.max(0) {
        let Some((len, n)) = batch::get_varint(b) else { return };
        let Some(body) = usize::try_from(len).ok().and_then(|l| b.get(n..n + l)) else { return };
        b = &b[n + body.len()..];
        let mut at = 1; // attributes
        let next_varint = |at: &mut usize| -> Option<i64> {
            let (v, n) = batch::get_varint(body.get(*at..)?)?;
            *at += n;
            Some(v)
        };
        let (Some(_ts), Some(_od)) = (next_varint(&mut at), next_varint(&mut at)) else { return };
        let Some(klen) = next_varint(&mut at) else { return };
        // Lengths come off the disk: checked, never trusted to fit.
        let key = if klen < 0 {
            None
        } else {
            let Some(k) = at.checked_add(klen as usize).and_then(|end| body.get(at..end)) else { return };
            at += k.len();
            Some(k)
        };
        let Some(vlen) = next_varint(&mut at) else { return };
        let value = if vlen < 0 { None } else { at.checked_add(vlen as usize).and_then(|end| body.get(at..end)) };
        if let Some(key) = key {
            f(key, value);
        }
    }
}

/// The topics of a consumer protocol subscription (any version: they all
/// start with i16 version, then an array of strings).
pub fn subscription_topics(metadata: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader { b: metadata };
    let _version = r.i16()?;
    let n = r.i32()?;
    if n < 0 || n as usize > metadata.len() {
        return None;
    }
    (0..n).map(|_| r.str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_records_roundtrip_through_a_batch() {
        let v = OffsetValue { offset: 42, leader_epoch: -1, metadata: "m".into(), commit_timestamp_ms: 7 };
        let recs = vec![
            (offset_key("g", "t", 3), Some(offset_value(&v))),
            (offset_key("g", "t", 4), None),
            (group_key("g"), None),
        ];
        let b = build(&recs, 1000);
        let mut out = Vec::new();
        let next = for_each_record(&b, |k, v| out.push(decode(k, v)));
        assert_eq!(next, Some(3));
        assert_eq!(
            out,
            vec![
                Some(Record::Offset { group: "g".into(), topic: "t".into(), partition: 3, value: Some(v) }),
                Some(Record::Offset { group: "g".into(), topic: "t".into(), partition: 4, value: None }),
                Some(Record::Group { group: "g".into(), value: None }),
            ]
        );
    }

    #[test]
    fn group_value_roundtrip_and_garbage_is_rejected() {
        let g = GroupSnapshot {
            protocol_type: "consumer".into(),
            generation: 9,
            protocol: Some("range".into()),
            leader: Some("m1".into()),
            state_timestamp_ms: 5,
            members: vec![MemberSnapshot {
                id: "m1".into(),
                instance_id: Some("i".into()),
                client_id: "c".into(),
                client_host: "/h".into(),
                rebalance_timeout_ms: 1,
                session_timeout_ms: 2,
                subscription: Bytes::from_static(b"sub"),
                assignment: Bytes::from_static(b"asg"),
            }],
        };
        let enc = group_value(&g);
        assert_eq!(decode(&group_key("x"), Some(&enc)), Some(Record::Group { group: "x".into(), value: Some(g) }));
        assert_eq!(decode(&group_key("x"), Some(&enc[..enc.len() - 1])), None);
        assert_eq!(decode(&[0, 9, 1], None), None);
        assert_eq!(decode(&[], None), None);
    }

    #[test]
    fn subscription_topics_are_read() {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_i32(2);
        put_str(&mut b, "a");
        put_str(&mut b, "bb");
        b.put_i32(-1);
        assert_eq!(subscription_topics(&b), Some(vec!["a".to_string(), "bb".to_string()]));
        assert_eq!(subscription_topics(&b[..5]), None);
    }

    /// Regression (fuzz/record_batch): a key length near usize::MAX in a
    /// `__consumer_offsets` record overflowed `at + klen`, and a batch whose
    /// last offset passes i64::MAX overflowed the next offset; both are
    /// skipped as damage now.
    #[test]
    fn hostile_lengths_and_offsets_are_skipped_not_overflowed() {
        // One record: attributes, timestamp delta 0, offset delta 0, key
        // length i64::MAX (zig-zag varint), no key bytes.
        let mut body = BytesMut::new();
        body.put_u8(0);
        batch::put_varint(&mut body, 0);
        batch::put_varint(&mut body, 0);
        batch::put_varint(&mut body, i64::MAX);
        let mut record = BytesMut::new();
        batch::put_varint(&mut record, body.len() as i64);
        record.put_slice(&body);
        let mut seen = 0;
        walk_records(&record, 1, &mut |_, _| seen += 1);
        assert_eq!(seen, 0);

        let mut b = build(&[(group_key("g"), None)], 0).to_vec();
        b[..8].copy_from_slice(&i64::MAX.to_be_bytes());
        let next = for_each_record(&b, |_, _| seen += 1);
        assert_eq!((next, seen), (Some(i64::MAX), 1));
    }
}
