//! Record batch v2: view, validator, in-place base offset rewrite, builder.
//!
//! ```text
//!  offset  size  field
//!       0     8  base offset            <- rewritten by the broker
//!       8     4  batch length           (bytes after this field)
//!      12     4  partition leader epoch <- rewritten by the broker
//!      16     1  magic (= 2)
//!      17     4  crc (CRC-32C of bytes 21..end)
//!      21     2  attributes             (bits 0-2 compression, 3 timestamp type,
//!                                        4 transactional, 5 control)
//!      23     4  last offset delta
//!      27     8  base timestamp
//!      35     8  max timestamp
//!      43     8  producer id
//!      51     2  producer epoch
//!      53     4  base sequence
//!      57     4  record count
//!      61     .  records (possibly compressed)
//! ```
//!
//! The CRC does not cover base offset or leader epoch, so the broker assigns
//! offsets by rewriting 8 bytes and stores and serves the batch as received.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::{Epoch, Offset, ProducerId};

pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes before and including the batch length field.
pub const BATCH_LOG_OVERHEAD_BYTES: usize = 12;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;
const CRC_COVERED_FROM: usize = ATTRIBUTES_OFFSET;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("record batch truncated: {available_bytes} bytes available, {needed_bytes} needed")]
    Truncated { available_bytes: usize, needed_bytes: usize },
    #[error("record batch length {0} is invalid")]
    BadLength(i32),
    #[error("record batch magic {0} is not 2 (only record batch v2 is supported)")]
    BadMagic(i8),
    #[error("record batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("record batch of {size_bytes} bytes exceeds max {limit_bytes}")]
    TooLarge { size_bytes: usize, limit_bytes: usize },
    #[error("record batch record count {count} does not match last offset delta {last_offset_delta}")]
    BadCount { count: i32, last_offset_delta: i32 },
    #[error("record set is empty")]
    Empty,
    #[error("record {index} of the batch is malformed: {reason}")]
    InvalidRecord { index: i32, reason: &'static str },
}

/// Compression codec from the attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
    Unknown(u8),
}

/// A read-only view of a batch header. Constructed only after the bounds
/// have been checked, so the accessors cannot read past the slice.
#[derive(Clone, Copy, Debug)]
pub struct BatchHeader<'a> {
    bytes: &'a [u8],
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    be_i32(b, at) as u32
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

impl<'a> BatchHeader<'a> {
    /// Views the header at the start of `bytes`; checks only that the header
    /// fits and that the declared length is sane (not the CRC).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BatchError> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated { available_bytes: bytes.len(), needed_bytes: BATCH_HEADER_BYTES });
        }
        let batch_length = be_i32(bytes, 8);
        if batch_length < (BATCH_HEADER_BYTES - BATCH_LOG_OVERHEAD_BYTES) as i32 {
            return Err(BatchError::BadLength(batch_length));
        }
        Ok(BatchHeader { bytes })
    }

    pub fn base_offset(&self) -> Offset {
        Offset(be_i64(self.bytes, 0))
    }
    /// Whole batch size including base offset and length fields.
    pub fn size_bytes(&self) -> usize {
        be_i32(self.bytes, 8) as usize + BATCH_LOG_OVERHEAD_BYTES
    }
    pub fn leader_epoch(&self) -> Epoch {
        Epoch(be_i32(self.bytes, 12))
    }
    pub fn magic(&self) -> i8 {
        self.bytes[MAGIC_OFFSET] as i8
    }
    pub fn crc(&self) -> u32 {
        be_u32(self.bytes, CRC_OFFSET)
    }
    pub fn attributes(&self) -> i16 {
        be_i16(self.bytes, ATTRIBUTES_OFFSET)
    }
    pub fn compression(&self) -> Compression {
        match self.attributes() & 0x7 {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            n => Compression::Unknown(n as u8),
        }
    }
    pub fn is_log_append_time(&self) -> bool {
        self.attributes() & 0x8 != 0
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & 0x10 != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & 0x20 != 0
    }
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(self.bytes, 23)
    }
    /// Base offset plus last offset delta, saturating: the fields are read
    /// off the wire or a disk, and a batch claiming offsets past i64::MAX
    /// must not overflow (callers that care refuse it: see the recovery
    /// scan in the engine's `segment::consume_batches`).
    pub fn last_offset(&self) -> Offset {
        Offset(self.base_offset().0.saturating_add(self.last_offset_delta() as i64))
    }
    pub fn base_timestamp_ms(&self) -> i64 {
        be_i64(self.bytes, 27)
    }
    pub fn max_timestamp_ms(&self) -> i64 {
        be_i64(self.bytes, 35)
    }
    pub fn producer_id(&self) -> ProducerId {
        ProducerId(be_i64(self.bytes, 43))
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(self.bytes, 51)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(self.bytes, 53)
    }
    pub fn record_count(&self) -> i32 {
        be_i32(self.bytes, 57)
    }
    /// The bytes this header was parsed from (the batch, or a prefix of it,
    /// and whatever follows it in the caller's buffer).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// What the broker needs to know about one validated batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    pub size_bytes: usize,
    pub last_offset_delta: i32,
    pub record_count: i32,
    pub max_timestamp_ms: i64,
    pub compression: Compression,
}

/// Checks the batch at the start of `bytes`: length within `bytes` and
/// `limit_bytes`, magic 2, CRC-32C, count consistent with the offset delta.
pub fn validate(bytes: &[u8], limit_bytes: usize) -> Result<BatchInfo, BatchError> {
    let header = BatchHeader::parse(bytes)?;
    let size_bytes = header.size_bytes();
    if size_bytes > limit_bytes {
        return Err(BatchError::TooLarge { size_bytes, limit_bytes });
    }
    if size_bytes > bytes.len() {
        return Err(BatchError::Truncated { available_bytes: bytes.len(), needed_bytes: size_bytes });
    }
    if header.magic() != 2 {
        return Err(BatchError::BadMagic(header.magic()));
    }
    let computed = crc32c::crc32c(&bytes[CRC_COVERED_FROM..size_bytes]);
    if computed != header.crc() {
        return Err(BatchError::BadCrc { stored: header.crc(), computed });
    }
    let count = header.record_count();
    let last_offset_delta = header.last_offset_delta();
    if count < 0 || last_offset_delta < 0 || (count > 0 && last_offset_delta < count - 1) {
        return Err(BatchError::BadCount { count, last_offset_delta });
    }
    Ok(BatchInfo {
        size_bytes,
        last_offset_delta,
        record_count: count,
        max_timestamp_ms: header.max_timestamp_ms(),
        compression: header.compression(),
    })
}

/// Checks a produce request's record set: one or more whole batches, each
/// valid and at most `limit_bytes`, nothing after the last one. Produce
/// batches must have contiguous offsets (count == last offset delta + 1).
pub fn validate_record_set(bytes: &[u8], limit_bytes: usize) -> Result<Vec<BatchInfo>, BatchError> {
    if bytes.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut infos = Vec::with_capacity(1);
    let mut at = 0;
    while at < bytes.len() {
        let info = validate(&bytes[at..], limit_bytes)?;
        if info.record_count != info.last_offset_delta + 1 {
            return Err(BatchError::BadCount { count: info.record_count, last_offset_delta: info.last_offset_delta });
        }
        if info.compression == Compression::None {
            validate_records(&bytes[at..at + info.size_bytes])?;
        }
        at += info.size_bytes;
        infos.push(info);
    }
    Ok(infos)
}

/// Walks the records of an uncompressed batch (already length- and
/// CRC-checked): each record's length, offset delta (must be 0, 1, 2, ...),
/// key, value and headers must fit exactly, and the records must end exactly
/// where the batch does. Compressed batches are stored opaque, as the design
/// says; their records are not inspected.
pub fn validate_records(batch: &[u8]) -> Result<(), BatchError> {
    let header = BatchHeader::parse(batch)?;
    let end = header.size_bytes().min(batch.len());
    let mut at = BATCH_HEADER_BYTES;
    for index in 0..header.record_count() {
        let bad = |reason| BatchError::InvalidRecord { index, reason };
        let (len, n) = get_varint(batch.get(at..end).unwrap_or(&[])).ok_or(bad("record length is not a varint"))?;
        let len = usize::try_from(len).map_err(|_| bad("negative record length"))?;
        let start = at + n;
        let record =
            batch.get(start..start + len).filter(|_| start + len <= end).ok_or(bad("record runs past the batch"))?;
        let mut r = Reader { bytes: record, at: 1 };
        if record.is_empty() {
            return Err(bad("empty record"));
        }
        r.varint().ok_or(bad("bad timestamp delta"))?;
        if r.varint().ok_or(bad("bad offset delta"))? != index as i64 {
            return Err(bad("offset deltas are not 0, 1, 2, ..."));
        }
        r.bytes_field().ok_or(bad("bad key"))?;
        r.bytes_field().ok_or(bad("bad value"))?;
        let headers = r.varint().ok_or(bad("bad header count"))?;
        if headers < 0 {
            return Err(bad("negative header count"));
        }
        for _ in 0..headers {
            match r.bytes_field() {
                Some(Some(_)) => {}
                _ => return Err(bad("bad header key")),
            }
            r.bytes_field().ok_or(bad("bad header value"))?;
        }
        if r.at != record.len() {
            return Err(bad("record length does not match its fields"));
        }
        at = start + len;
    }
    if at != end {
        return Err(BatchError::InvalidRecord { index: header.record_count(), reason: "bytes after the last record" });
    }
    Ok(())
}

/// What the broker checks of each record beyond its framing: its timestamp
/// (the batch's base plus its delta) and whether it has a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordFacts {
    pub timestamp_ms: i64,
    pub has_key: bool,
}

/// The facts of each of `count` records in a batch's records section
/// (`records`: the bytes after the header, decompressed for a compressed
/// batch), or why they do not parse.
pub fn record_facts(records: &[u8], count: i32, base_timestamp_ms: i64) -> Result<Vec<RecordFacts>, &'static str> {
    let count = usize::try_from(count).map_err(|_| "negative record count")?;
    let mut out = Vec::with_capacity(count.min(records.len() / 7 + 1));
    let mut at = 0;
    for _ in 0..count {
        let (len, n) = get_varint(records.get(at..).unwrap_or(&[])).ok_or("record length is not a varint")?;
        let len = usize::try_from(len).map_err(|_| "negative record length")?;
        let start = at + n;
        let record = records.get(start..start.saturating_add(len)).ok_or("record runs past the batch")?;
        let mut r = Reader { bytes: record, at: 1 };
        let delta = r.varint().ok_or("bad timestamp delta")?;
        r.varint().ok_or("bad offset delta")?;
        let key = r.bytes_field().ok_or("bad key")?;
        out.push(RecordFacts { timestamp_ms: base_timestamp_ms.saturating_add(delta), has_key: key.is_some() });
        at = start + len;
    }
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<i64> {
        let (v, n) = get_varint(self.bytes.get(self.at..)?)?;
        self.at += n;
        Some(v)
    }

    /// A varint length then that many bytes; `Some(None)` for length -1.
    fn bytes_field(&mut self) -> Option<Option<&'a [u8]>> {
        let len = self.varint()?;
        if len == -1 {
            return Some(None);
        }
        let len = usize::try_from(len).ok()?;
        let v = self.bytes.get(self.at..self.at + len)?;
        self.at += len;
        Some(Some(v))
    }
}

/// Rewrites base offset and leader epoch in place (neither is under the CRC).
pub fn assign_offset(batch: &mut [u8], base_offset: Offset, leader_epoch: Epoch) {
    debug_assert!(batch.len() >= BATCH_HEADER_BYTES, "batch of {} bytes", batch.len());
    batch[0..8].copy_from_slice(&base_offset.0.to_be_bytes());
    batch[12..16].copy_from_slice(&leader_epoch.0.to_be_bytes());
}

/// Scans a buffer of back-to-back batches (a segment, or a prefix of one) and
/// returns the length of the valid prefix and the batches in it. Stops at the
/// first batch that is truncated, zeroed or fails its CRC: recovery truncates
/// there.
pub fn scan_valid_prefix(bytes: &[u8]) -> (usize, Vec<(usize, BatchInfo, Offset)>) {
    let mut at = 0;
    let mut found = Vec::new();
    while at + BATCH_LOG_OVERHEAD_BYTES <= bytes.len() {
        match validate(&bytes[at..], usize::MAX) {
            Ok(info) => {
                let base = Offset(be_i64(bytes, at));
                found.push((at, info, base));
                at += info.size_bytes;
            }
            Err(_) => break,
        }
    }
    (at, found)
}

// ---------------------------------------------------------------------------
// Builder: uncompressed v2 batches. Used by the bench client and tests.

pub fn put_varint(buf: &mut BytesMut, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Reads a zig-zag varint; returns the value and the bytes consumed.
pub fn get_varint(bytes: &[u8]) -> Option<(i64, usize)> {
    let mut v: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(10) {
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Some((((v >> 1) as i64) ^ -((v & 1) as i64), i + 1));
        }
    }
    None
}

/// One record to build: key, value, headers.
pub struct RecordRef<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a [u8], Option<&'a [u8]>)],
    pub timestamp_delta_ms: i64,
}

/// Producer identity fields of a batch; all -1 for a plain producer.
#[derive(Clone, Copy, Debug)]
pub struct ProducerFields {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl Default for ProducerFields {
    fn default() -> Self {
        ProducerFields { producer_id: -1, producer_epoch: -1, base_sequence: -1 }
    }
}

/// Builds an uncompressed record batch v2 with base offset 0.
pub fn build_batch(records: &[RecordRef<'_>], base_timestamp_ms: i64, producer: ProducerFields) -> Bytes {
    build_batch_with_attributes(records, base_timestamp_ms, producer, 0)
}

/// `build_batch` with `attributes` (compression bits aside: the records are
/// never compressed), e.g. `ATTR_TRANSACTIONAL` for a transactional batch.
pub fn build_batch_with_attributes(
    records: &[RecordRef<'_>],
    base_timestamp_ms: i64,
    producer: ProducerFields,
    attributes: i16,
) -> Bytes {
    let mut body = BytesMut::new();
    let mut max_ts = base_timestamp_ms;
    for (i, r) in records.iter().enumerate() {
        let mut rec = BytesMut::new();
        rec.put_i8(0);
        put_varint(&mut rec, r.timestamp_delta_ms);
        put_varint(&mut rec, i as i64);
        put_opt_bytes(&mut rec, r.key);
        put_opt_bytes(&mut rec, r.value);
        put_varint(&mut rec, r.headers.len() as i64);
        for (k, v) in r.headers {
            put_varint(&mut rec, k.len() as i64);
            rec.put_slice(k);
            put_opt_bytes(&mut rec, *v);
        }
        put_varint(&mut body, rec.len() as i64);
        body.put_slice(&rec);
        max_ts = max_ts.max(base_timestamp_ms.saturating_add(r.timestamp_delta_ms));
    }
    let mut buf = BytesMut::with_capacity(BATCH_HEADER_BYTES + body.len());
    buf.put_i64(0);
    buf.put_i32((BATCH_HEADER_BYTES - BATCH_LOG_OVERHEAD_BYTES + body.len()) as i32);
    buf.put_i32(-1);
    buf.put_i8(2);
    buf.put_u32(0);
    buf.put_i16(attributes);
    buf.put_i32(records.len().saturating_sub(1) as i32);
    buf.put_i64(base_timestamp_ms);
    buf.put_i64(max_ts);
    buf.put_i64(producer.producer_id);
    buf.put_i16(producer.producer_epoch);
    buf.put_i32(producer.base_sequence);
    buf.put_i32(records.len() as i32);
    buf.put_slice(&body);
    let crc = crc32c::crc32c(&buf[CRC_COVERED_FROM..]);
    buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    buf.freeze()
}

// ---------------------------------------------------------------------------
// Control batches: transaction markers (KIP-98).
//
// A marker is a batch with the transactional and control attribute bits, the
// producer's id and epoch, base sequence -1, and one record:
//   key   = i16 version (0) | i16 type (0 ABORT, 1 COMMIT)
//   value = i16 version (0) | i32 coordinator epoch

/// Attributes bit: the batch belongs to a transaction.
pub const ATTR_TRANSACTIONAL: i16 = 0x10;
/// Attributes bit: the batch holds control records (transaction markers).
pub const ATTR_CONTROL: i16 = 0x20;
/// Bytes of a marker's key and of its value.
const CONTROL_KEY_BYTES: usize = 4;
const MARKER_VALUE_BYTES: usize = 6;

/// The end of a transaction a marker writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlType {
    Abort,
    Commit,
}

impl ControlType {
    /// The type in the control record's key (Kafka's `ControlRecordType`).
    pub fn code(self) -> i16 {
        match self {
            ControlType::Abort => 0,
            ControlType::Commit => 1,
        }
    }
}

/// Builds a transaction marker for `producer_id`/`producer_epoch` written by
/// the coordinator at `coordinator_epoch` (base offset 0, to be assigned).
pub fn build_control_batch(
    control: ControlType,
    producer_id: i64,
    producer_epoch: i16,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> Bytes {
    let mut key = [0u8; CONTROL_KEY_BYTES];
    key[2..4].copy_from_slice(&control.code().to_be_bytes());
    let mut value = [0u8; MARKER_VALUE_BYTES];
    value[2..6].copy_from_slice(&coordinator_epoch.to_be_bytes());
    let record = RecordRef { key: Some(&key), value: Some(&value), headers: &[], timestamp_delta_ms: 0 };
    build_batch_with_attributes(
        &[record],
        timestamp_ms,
        ProducerFields { producer_id, producer_epoch, base_sequence: -1 },
        ATTR_TRANSACTIONAL | ATTR_CONTROL,
    )
}

/// The marker a control batch holds: its type and coordinator epoch. `None`
/// for anything else: not a control batch, compressed, no record, another
/// control type (Kafka's KRaft records), or a malformed record. Reads only
/// within `batch` and the batch's own length; never panics.
pub fn control_record_type(batch: &[u8]) -> Option<(ControlType, i32)> {
    let h = BatchHeader::parse(batch).ok()?;
    if !h.is_control() || h.compression() != Compression::None || h.record_count() < 1 {
        return None;
    }
    let records = batch.get(BATCH_HEADER_BYTES..h.size_bytes().min(batch.len()))?;
    let (len, n) = get_varint(records)?;
    let len = usize::try_from(len).ok()?;
    let record = records.get(n..n.checked_add(len)?)?;
    // attributes (1 byte), timestamp delta, offset delta, key, value.
    let mut r = Reader { bytes: record, at: 1 };
    r.varint()?;
    r.varint()?;
    let key = r.bytes_field()??;
    let value = r.bytes_field()?;
    if key.len() < CONTROL_KEY_BYTES {
        return None;
    }
    // Kafka reads newer key and value versions with the fields it knows.
    let control = match be_i16(key, 2) {
        0 => ControlType::Abort,
        1 => ControlType::Commit,
        _ => return None,
    };
    let value = value.filter(|v| v.len() >= MARKER_VALUE_BYTES)?;
    Some((control, be_i32(value, 2)))
}

fn put_opt_bytes(buf: &mut BytesMut, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            put_varint(buf, v.len() as i64);
            buf.put_slice(v);
        }
        None => put_varint(buf, -1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Bytes {
        let values: Vec<Vec<u8>> = (0..n).map(|i| format!("value-{i}").into_bytes()).collect();
        let recs: Vec<RecordRef<'_>> = values
            .iter()
            .map(|v| RecordRef { key: Some(b"k"), value: Some(v), headers: &[], timestamp_delta_ms: 1 })
            .collect();
        build_batch(&recs, 1_700_000_000_000, ProducerFields::default())
    }

    /// Regression (fuzz/request_sequence): a base timestamp near i64::MAX
    /// plus a positive delta overflowed computing the max timestamp.
    #[test]
    fn build_batch_saturates_extreme_timestamps() {
        let recs = [RecordRef { key: None, value: Some(b"v"), headers: &[], timestamp_delta_ms: 1_000 }];
        let b = build_batch(&recs, i64::MAX - 10, ProducerFields::default());
        assert_eq!(BatchHeader::parse(&b).unwrap().max_timestamp_ms(), i64::MAX);
        let facts = record_facts(&b[BATCH_HEADER_BYTES..], 1, i64::MAX - 10).unwrap();
        assert_eq!(facts[0].timestamp_ms, i64::MAX);
    }

    #[test]
    fn record_facts_reads_timestamps_and_keys() {
        let recs = [
            RecordRef { key: Some(b"a"), value: Some(b"1"), headers: &[], timestamp_delta_ms: 0 },
            RecordRef { key: None, value: Some(b"2"), headers: &[(b"h", Some(b"v"))], timestamp_delta_ms: 5 },
            RecordRef { key: Some(b""), value: None, headers: &[], timestamp_delta_ms: -3 },
        ];
        let b = build_batch(&recs, 1_000, ProducerFields::default());
        let facts = record_facts(&b[BATCH_HEADER_BYTES..], 3, 1_000).unwrap();
        let got: Vec<(i64, bool)> = facts.iter().map(|f| (f.timestamp_ms, f.has_key)).collect();
        assert_eq!(got, vec![(1_000, true), (1_005, false), (997, true)]);
        assert!(record_facts(&b[BATCH_HEADER_BYTES..b.len() - 2], 3, 0).is_err(), "truncated");
        assert!(record_facts(&b[BATCH_HEADER_BYTES..], 4, 0).is_err(), "more records claimed than there are");
    }

    #[test]
    fn built_batch_validates() {
        let b = sample(3);
        let info = validate(&b, 1 << 20).expect("valid");
        assert_eq!(info.record_count, 3);
        assert_eq!(info.last_offset_delta, 2);
        assert_eq!(info.size_bytes, b.len());
        assert_eq!(info.max_timestamp_ms, 1_700_000_000_001);
        assert_eq!(info.compression, Compression::None);
    }

    /// Regression (fuzz/record_batch): a header whose base offset plus last
    /// offset delta passes i64::MAX overflowed `last_offset` (a panic in
    /// debug builds, a negative offset in release).
    #[test]
    fn last_offset_of_a_hostile_header_saturates() {
        let mut b = sample(3).to_vec();
        b[..8].copy_from_slice(&(i64::MAX - 1).to_be_bytes());
        let h = BatchHeader::parse(&b).expect("header");
        assert_eq!(h.last_offset(), Offset(i64::MAX));
        assert_eq!(h.last_offset().next(), Offset(i64::MAX));
    }

    #[test]
    fn bad_crc_detected_anywhere_in_covered_range() {
        let b = sample(2);
        for at in [CRC_COVERED_FROM, 40, b.len() - 1] {
            let mut m = b.to_vec();
            m[at] ^= 0x40;
            assert!(matches!(validate(&m, 1 << 20), Err(BatchError::BadCrc { .. })), "flip at {at}");
        }
    }

    #[test]
    fn offset_rewrite_keeps_crc_valid() {
        let mut m = sample(2).to_vec();
        assign_offset(&mut m, Offset(1234), Epoch(7));
        let h = BatchHeader::parse(&m).expect("header");
        assert_eq!(h.base_offset(), Offset(1234));
        assert_eq!(h.last_offset(), Offset(1235));
        assert_eq!(h.leader_epoch(), Epoch(7));
        assert!(validate(&m, 1 << 20).is_ok());
    }

    #[test]
    fn limits_and_truncation() {
        let b = sample(2);
        assert!(matches!(validate(&b, 10), Err(BatchError::TooLarge { .. })));
        assert!(matches!(validate(&b[..b.len() - 1], 1 << 20), Err(BatchError::Truncated { .. })));
        assert!(matches!(validate(&b[..20], 1 << 20), Err(BatchError::Truncated { .. })));
        let mut m = b.to_vec();
        m[16] = 1;
        assert!(matches!(validate(&m, 1 << 20), Err(BatchError::BadMagic(1))));
        assert_eq!(validate_record_set(&[], 100), Err(BatchError::Empty));
    }

    #[test]
    fn negative_or_huge_length_is_rejected_without_reading_past() {
        let mut m = sample(1).to_vec();
        m[8..12].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(matches!(validate(&m, 1 << 20), Err(BatchError::BadLength(-1))));
        m[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(validate(&m, usize::MAX), Err(BatchError::Truncated { .. })));
    }

    #[test]
    fn record_set_and_scan() {
        let a = sample(2);
        let b = sample(5);
        let mut set = a.to_vec();
        set.extend_from_slice(&b);
        let infos = validate_record_set(&set, 1 << 20).expect("valid set");
        assert_eq!(infos.len(), 2);
        // zeroed tail after the batches is a clean end
        set.extend_from_slice(&[0u8; 4096]);
        let (valid, found) = scan_valid_prefix(&set);
        assert_eq!(valid, a.len() + b.len());
        assert_eq!(found.len(), 2);
        // a torn second batch: only the first survives
        let torn = &set[..a.len() + b.len() - 3];
        assert_eq!(scan_valid_prefix(torn).0, a.len());
    }

    #[test]
    fn truncated_or_padded_records_are_rejected() {
        let b = sample(3);
        assert!(validate_records(&b).is_ok());
        // Cut the last record short but keep length and CRC consistent.
        let mut cut = b[..b.len() - 2].to_vec();
        let len = (cut.len() - BATCH_LOG_OVERHEAD_BYTES) as i32;
        cut[8..12].copy_from_slice(&len.to_be_bytes());
        let crc = crc32c::crc32c(&cut[CRC_COVERED_FROM..]);
        cut[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(validate(&cut, 1 << 20).is_ok(), "CRC and length alone accept it");
        assert!(matches!(validate_record_set(&cut, 1 << 20), Err(BatchError::InvalidRecord { index: 2, .. })));
        // Trailing garbage after the last record.
        let mut padded = b.to_vec();
        padded.extend_from_slice(&[0, 0]);
        let len = (padded.len() - BATCH_LOG_OVERHEAD_BYTES) as i32;
        padded[8..12].copy_from_slice(&len.to_be_bytes());
        let crc = crc32c::crc32c(&padded[CRC_COVERED_FROM..]);
        padded[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(validate_record_set(&padded, 1 << 20), Err(BatchError::InvalidRecord { .. })));
    }

    #[test]
    fn control_batch_roundtrip() {
        for (control, ce) in [(ControlType::Commit, 7), (ControlType::Abort, -1), (ControlType::Commit, i32::MAX)] {
            let b = build_control_batch(control, 42, 3, ce, 1_700_000_000_000);
            let info = validate(&b, 1 << 20).expect("a valid batch");
            assert_eq!((info.record_count, info.last_offset_delta), (1, 0));
            assert!(validate_record_set(&b, 1 << 20).is_ok(), "its record is well formed");
            let h = BatchHeader::parse(&b).unwrap();
            assert!(h.is_control() && h.is_transactional());
            assert_eq!(h.attributes(), ATTR_TRANSACTIONAL | ATTR_CONTROL);
            assert_eq!((h.producer_id(), h.producer_epoch(), h.base_sequence()), (ProducerId(42), 3, -1));
            assert_eq!((h.base_timestamp_ms(), h.max_timestamp_ms()), (1_700_000_000_000, 1_700_000_000_000));
            assert_eq!(control_record_type(&b), Some((control, ce)));
            // The marker's record as Kafka lays it out.
            let facts = record_facts(&b[BATCH_HEADER_BYTES..], 1, 0).unwrap();
            assert!(facts[0].has_key);
            let mut moved = b.to_vec();
            assign_offset(&mut moved, Offset(99), Epoch(4));
            assert_eq!(control_record_type(&moved), Some((control, ce)));
        }
    }

    #[test]
    fn control_record_type_refuses_other_batches_without_panicking() {
        assert_eq!(control_record_type(&sample(1)), None, "a data batch");
        let b = build_control_batch(ControlType::Abort, 1, 0, 5, 0).to_vec();
        // Every prefix, and every single-byte change, parses or is refused.
        for n in 0..b.len() {
            let _ = control_record_type(&b[..n]);
        }
        for at in 0..b.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut m = b.clone();
                m[at] = v;
                let _ = control_record_type(&m);
            }
        }
        // Another control type (KRaft's LeaderChange = 2).
        let mut other = b.clone();
        let key_type_at = b.len() - 1 - MARKER_VALUE_BYTES - 1 - 2;
        assert_eq!(&other[key_type_at..key_type_at + 2], &[0, 0]);
        other[key_type_at + 1] = 2;
        assert_eq!(control_record_type(&other), None);
        other[key_type_at + 1] = 1;
        assert_eq!(control_record_type(&other), Some((ControlType::Commit, 5)));
        // Compressed control batches are not read.
        let mut gz = b.clone();
        gz[ATTRIBUTES_OFFSET + 1] |= 1;
        assert_eq!(control_record_type(&gz), None);
    }

    #[test]
    fn varint_roundtrip() {
        for v in [0i64, 1, -1, 63, -64, 64, 300, -300, i32::MAX as i64, i64::MIN, i64::MAX] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(get_varint(&b), Some((v, b.len())), "{v}");
        }
    }
}
