//! Legacy wire forms for clients that speak Kafka 0.8/0.9/0.10: the request
//! and response bodies of Produce v0–v2, Fetch v0–v3, ListOffsets v0,
//! OffsetCommit v0–v1 and OffsetFetch v0, and the magic v0/v1 MessageSet.
//!
//! The vendored decoder (kafka-protocol, generated from Kafka 4.x's specs)
//! starts at Produce v3, Fetch v4 and ListOffsets v1. Each older request body
//! is a near subset of that first version, so `upgrade_request` rewrites it
//! into that version's bytes (one copy of the body, bounded by the frame) and
//! the ordinary decoder reads it; the handlers see the old version number and
//! answer in the old shape (`encode_produce_response`, `encode_list_offsets_v0`).
//!
//! MessageSet (magic 0 and 1), as Kafka 0.10 wrote it:
//!
//! ```text
//! offset i64 | message_size i32 | crc u32 (IEEE, over magic..end) | magic i8
//! | attributes i8 (bits 0-2 codec, bit 3 LogAppendTime: magic 1 only)
//! | timestamp i64 (magic 1 only) | key bytes (i32 len, -1 null) | value bytes
//! ```
//!
//! A compressed message is a wrapper whose value is a compressed MessageSet
//! of inner messages (magic 1 inner offsets are relative, 0..n-1). Pure: no
//! I/O and no codecs here (the engine decompresses); every length is checked
//! against the bytes present before it is used.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ListOffsetsResponse, ProduceResponse};

use crate::batch;

/// The first version of `key` the vendored decoder reads, when tidelog
/// answers older ones through this module.
pub fn first_modern_version(key: ApiKey) -> Option<i16> {
    match key {
        ApiKey::Produce => Some(3),
        ApiKey::Fetch => Some(4),
        ApiKey::ListOffsets => Some(1),
        ApiKey::OffsetCommit => Some(2),
        ApiKey::OffsetFetch => Some(1),
        _ => None,
    }
}

/// The version a handler answers a legacy request in: for OffsetCommit
/// v0–v1 and OffsetFetch v0 the response is exactly that of the first
/// modern version (OffsetCommit gained throttle time only in v3; OffsetFetch
/// v0 and v1 differ only in where Kafka 0.8 stored the offsets, ZooKeeper or
/// Kafka: tidelog keeps every commit in `__consumer_offsets`, as for v1).
/// Produce, Fetch and ListOffsets keep their own version (their shapes
/// differ; the handlers encode them).
pub fn answer_version(key: ApiKey, version: i16) -> i16 {
    match key {
        ApiKey::OffsetCommit | ApiKey::OffsetFetch if is_legacy(key, version) => {
            first_modern_version(key).unwrap_or(version)
        }
        _ => version,
    }
}

/// Whether `key` v`version` is a legacy version read through this module.
pub fn is_legacy(key: ApiKey, version: i16) -> bool {
    first_modern_version(key).is_some_and(|first| (0..first).contains(&version))
}

/// A cursor over an untrusted body: every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or("body truncated")?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// An array count that cannot claim more elements than the bytes left
    /// could hold at `min_element_bytes` each.
    fn count(&mut self, min_element_bytes: usize) -> Result<usize, String> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(0);
        }
        let n = n as usize;
        if n.saturating_mul(min_element_bytes) > self.buf.len() - self.at {
            return Err(format!("array of {n} elements in {} bytes", self.buf.len() - self.at));
        }
        Ok(n)
    }
}

/// Rewrites a legacy request body into the bytes of the first version the
/// vendored decoder reads; returns that version and the body. `None` when
/// `key` v`version` is not a legacy form.
///
/// - Produce v0–v2 → v3: v3 only adds the leading `transactional_id` (null).
/// - Fetch v0–v3 → v4: v3 adds `max_bytes` (v0–v2: no limit), v4 adds
///   `isolation_level` (0, read_uncommitted) after it; the rest is equal.
/// - ListOffsets v0 → v1: v0 partitions carry `max_num_offsets` after the
///   timestamp, which v1 dropped (tidelog answers one offset, as clients ask).
/// - OffsetCommit v0 → v2: v0 has no generation or member (a commit from
///   outside any group generation: -1 and ""), v1 adds them and a
///   per-partition commit timestamp (dropped: the broker's clock is used),
///   v2 adds `retention_time_ms` (-1: the broker's default).
/// - OffsetFetch v0 → v1: the same body.
pub fn upgrade_request(key: ApiKey, version: i16, body: &[u8]) -> Option<Result<(i16, Bytes), String>> {
    if !is_legacy(key, version) {
        return None;
    }
    Some(match key {
        ApiKey::Produce => {
            let mut out = BytesMut::with_capacity(body.len() + 2);
            out.put_i16(-1);
            out.put_slice(body);
            Ok((3, out.freeze()))
        }
        ApiKey::Fetch => upgrade_fetch(version, body).map(|b| (4, b)),
        ApiKey::ListOffsets => upgrade_list_offsets_v0(body).map(|b| (1, b)),
        ApiKey::OffsetCommit => upgrade_offset_commit(version, body).map(|b| (2, b)),
        ApiKey::OffsetFetch => Ok((1, Bytes::copy_from_slice(body))),
        _ => Err(format!("{key:?} v{version} has no legacy form")),
    })
}

fn upgrade_fetch(version: i16, body: &[u8]) -> Result<Bytes, String> {
    // replica_id, max_wait_ms, min_bytes
    let head = body.get(..12).ok_or("fetch body truncated")?;
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_slice(head);
    let rest = if version >= 3 {
        out.put_slice(body.get(12..16).ok_or("fetch body truncated")?);
        &body[16..]
    } else {
        out.put_i32(i32::MAX);
        &body[12..]
    };
    out.put_i8(0);
    out.put_slice(rest);
    Ok(out.freeze())
}

fn upgrade_list_offsets_v0(body: &[u8]) -> Result<Bytes, String> {
    let mut r = Reader { buf: body, at: 0 };
    let mut out = BytesMut::with_capacity(body.len());
    out.put_i32(r.i32()?); // replica_id
    let topics = r.count(6)?;
    out.put_i32(topics as i32);
    for _ in 0..topics {
        let name_len = r.i16()?;
        out.put_i16(name_len);
        out.put_slice(r.take(name_len.max(0) as usize)?);
        let partitions = r.count(16)?;
        out.put_i32(partitions as i32);
        for _ in 0..partitions {
            out.put_slice(r.take(4 + 8)?); // partition, timestamp
            r.i32()?; // max_num_offsets
        }
    }
    out.put_slice(&body[r.at..]);
    Ok(out.freeze())
}

fn upgrade_offset_commit(version: i16, body: &[u8]) -> Result<Bytes, String> {
    let mut r = Reader { buf: body, at: 0 };
    let mut out = BytesMut::with_capacity(body.len() + 16);
    let group_len = r.i16()?;
    out.put_i16(group_len);
    out.put_slice(r.take(group_len.max(0) as usize)?);
    if version == 0 {
        out.put_i32(-1); // generation
        out.put_i16(0); // member id ""
        out.put_i64(-1); // retention_time_ms
        out.put_slice(&body[r.at..]);
        return Ok(out.freeze());
    }
    out.put_i32(r.i32()?); // generation
    let member_len = r.i16()?;
    out.put_i16(member_len);
    out.put_slice(r.take(member_len.max(0) as usize)?);
    out.put_i64(-1); // retention_time_ms
    let topics = r.count(6)?;
    out.put_i32(topics as i32);
    for _ in 0..topics {
        let name_len = r.i16()?;
        out.put_i16(name_len);
        out.put_slice(r.take(name_len.max(0) as usize)?);
        let partitions = r.count(4 + 8 + 8 + 2)?;
        out.put_i32(partitions as i32);
        for _ in 0..partitions {
            out.put_slice(r.take(4 + 8)?); // partition, offset
            r.take(8)?; // commit timestamp
            let metadata_len = r.i16()?;
            out.put_i16(metadata_len);
            out.put_slice(r.take(metadata_len.max(0) as usize)?);
        }
    }
    out.put_slice(&body[r.at..]);
    Ok(out.freeze())
}

/// A Produce response of v0–v2: the v3 shape without what each older
/// version lacks (v2 is v3's exact shape; v1 drops `log_append_time_ms`;
/// v0 also drops `throttle_time_ms`). Response header v0. The whole frame,
/// length prefix included.
pub fn encode_produce_response(version: i16, correlation_id: i32, resp: &ProduceResponse) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    buf.put_i32(correlation_id);
    buf.put_i32(resp.responses.len() as i32);
    for t in &resp.responses {
        put_str(&mut buf, &t.name.0);
        buf.put_i32(t.partition_responses.len() as i32);
        for p in &t.partition_responses {
            buf.put_i32(p.index);
            buf.put_i16(p.error_code);
            buf.put_i64(p.base_offset);
            if version >= 2 {
                buf.put_i64(p.log_append_time_ms);
            }
        }
    }
    if version >= 1 {
        buf.put_i32(resp.throttle_time_ms);
    }
    patch_length(&mut buf);
    buf
}

/// A ListOffsets v0 response: per partition the error and an array of
/// offsets (`old_style_offsets`): the one offset found, or none.
pub fn encode_list_offsets_v0(correlation_id: i32, resp: &ListOffsetsResponse) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_i32(0);
    buf.put_i32(correlation_id);
    buf.put_i32(resp.topics.len() as i32);
    for t in &resp.topics {
        put_str(&mut buf, &t.name.0);
        buf.put_i32(t.partitions.len() as i32);
        for p in &t.partitions {
            buf.put_i32(p.partition_index);
            buf.put_i16(p.error_code);
            if p.error_code == 0 && p.offset >= 0 {
                buf.put_i32(1);
                buf.put_i64(p.offset);
            } else {
                buf.put_i32(0);
            }
        }
    }
    patch_length(&mut buf);
    buf
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_i16(s.len() as i16);
    buf.put_slice(s.as_bytes());
}

fn patch_length(buf: &mut BytesMut) {
    let len = (buf.len() - crate::frame::LENGTH_PREFIX_BYTES) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
}

// ---------------------------------------------------------------------------
// MessageSet v0/v1

/// Bytes of a message before its key: offset, size, crc, magic, attributes.
pub const MESSAGE_V0_HEADER_BYTES: usize = 8 + 4 + 4 + 1 + 1;
/// Attribute bits of the codec.
pub const CODEC_MASK: i8 = 0x07;
/// Magic 1: the timestamp is the broker's append time.
pub const ATTR_LOG_APPEND_TIME: i8 = 0x08;
/// Kafka's "no timestamp" (magic 0 messages, and what they convert to).
pub const NO_TIMESTAMP: i64 = -1;

/// One message of a legacy MessageSet, borrowed from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub offset: i64,
    pub magic: i8,
    pub attributes: i8,
    /// `NO_TIMESTAMP` for magic 0.
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

impl Message<'_> {
    pub fn codec(&self) -> batch::Compression {
        match self.attributes & CODEC_MASK {
            0 => batch::Compression::None,
            1 => batch::Compression::Gzip,
            2 => batch::Compression::Snappy,
            3 => batch::Compression::Lz4,
            4 => batch::Compression::Zstd,
            n => batch::Compression::Unknown(n as u8),
        }
    }
    pub fn is_log_append_time(&self) -> bool {
        self.magic >= 1 && self.attributes & ATTR_LOG_APPEND_TIME != 0
    }
}

/// Why a MessageSet was refused (all CORRUPT_MESSAGE to the client, except
/// a magic that is not 0 or 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageSetError {
    Corrupt(String),
    BadMagic(i8),
}

impl std::fmt::Display for MessageSetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageSetError::Corrupt(m) => write!(f, "corrupt message set: {m}"),
            MessageSetError::BadMagic(m) => write!(f, "message magic {m} in a v0/v1 message set"),
        }
    }
}

/// The magic byte of a record set (v2 batches and legacy messages keep it
/// at the same place), if it is long enough to have one.
pub fn magic_of(records: &[u8]) -> Option<i8> {
    records.get(16).map(|m| *m as i8)
}

/// Parses a whole MessageSet as a producer sends it: every message complete
/// and CRC-valid, magic 0 or 1. A trailing partial message is an error here
/// (a producer never sends one; only fetch responses are cut).
pub fn parse_message_set(bytes: &[u8]) -> Result<Vec<Message<'_>>, MessageSetError> {
    let corrupt = |m: String| MessageSetError::Corrupt(m);
    let mut out = Vec::with_capacity((bytes.len() / 26).min(4096));
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 12 {
            return Err(corrupt(format!("{} bytes left after message {}, a partial header", rest.len(), out.len())));
        }
        let offset = i64::from_be_bytes(rest[0..8].try_into().map_err(|_| corrupt("offset".into()))?);
        let size = i32::from_be_bytes(rest[8..12].try_into().map_err(|_| corrupt("size".into()))?);
        let size = usize::try_from(size).map_err(|_| corrupt(format!("negative message size {size}")))?;
        if size < 4 + 1 + 1 + 4 + 4 {
            return Err(corrupt(format!("message size {size} is below the minimum")));
        }
        let end = 12usize.checked_add(size).filter(|e| *e <= rest.len()).ok_or_else(|| {
            corrupt(format!("message {} of {size} bytes runs past the {} bytes left", out.len(), rest.len() - 12))
        })?;
        let msg = &rest[12..end];
        let crc = u32::from_be_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let computed = crc32_ieee(&msg[4..]);
        if crc != computed {
            return Err(corrupt(format!(
                "message {} at offset {offset}: crc {crc:#x}, computed {computed:#x}",
                out.len()
            )));
        }
        let magic = msg[4] as i8;
        let attributes = msg[5] as i8;
        let mut r = Reader { buf: msg, at: 6 };
        let timestamp_ms = match magic {
            0 => NO_TIMESTAMP,
            1 => {
                let b = r.take(8).map_err(corrupt)?;
                i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            m => return Err(MessageSetError::BadMagic(m)),
        };
        let key = read_bytes(&mut r).map_err(corrupt)?;
        let value = read_bytes(&mut r).map_err(corrupt)?;
        if r.at != msg.len() {
            return Err(corrupt(format!("{} bytes after the value of message {}", msg.len() - r.at, out.len())));
        }
        out.push(Message { offset, magic, attributes, timestamp_ms, key, value });
        at += end;
    }
    Ok(out)
}

fn read_bytes<'a>(r: &mut Reader<'a>) -> Result<Option<&'a [u8]>, String> {
    let len = r.i32()?;
    if len < 0 {
        return Ok(None);
    }
    r.take(len as usize).map(Some)
}

/// The bytes `write_message` produces for these fields.
pub fn message_size(magic: i8, key: Option<&[u8]>, value: Option<&[u8]>) -> usize {
    MESSAGE_V0_HEADER_BYTES
        + if magic >= 1 { 8 } else { 0 }
        + 4
        + key.map_or(0, <[u8]>::len)
        + 4
        + value.map_or(0, <[u8]>::len)
}

/// Appends one message (uncompressed unless `attributes` says otherwise)
/// with its CRC.
pub fn write_message(
    out: &mut BytesMut,
    magic: i8,
    offset: i64,
    attributes: i8,
    timestamp_ms: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let size = message_size(magic, key, value) - 12;
    out.reserve(size + 12);
    out.put_i64(offset);
    out.put_i32(size as i32);
    let crc_at = out.len();
    out.put_u32(0);
    out.put_i8(magic);
    out.put_i8(attributes);
    if magic >= 1 {
        out.put_i64(timestamp_ms);
    }
    for field in [key, value] {
        match field {
            None => out.put_i32(-1),
            Some(b) => {
                out.put_i32(b.len() as i32);
                out.put_slice(b);
            }
        }
    }
    let crc = crc32_ieee(&out[crc_at + 4..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32_TABLE: [u32; 256] = crc32_table();

/// CRC-32 (IEEE, as zlib), the checksum of magic 0/1 messages.
pub fn crc32_ieee(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for b in bytes {
        c = CRC32_TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// xxHash32 of a short input (an LZ4 frame descriptor): used to repair the
/// header checksum Kafka 0.8/0.9 wrote wrongly in magic-0 LZ4 messages.
pub fn xxh32(input: &[u8], seed: u32) -> u32 {
    const P1: u32 = 2_654_435_761;
    const P2: u32 = 2_246_822_519;
    const P3: u32 = 3_266_489_917;
    const P4: u32 = 668_265_263;
    const P5: u32 = 374_761_393;
    let mut rest = input;
    let mut h = if input.len() >= 16 {
        let mut v = [seed.wrapping_add(P1).wrapping_add(P2), seed.wrapping_add(P2), seed, seed.wrapping_sub(P1)];
        while rest.len() >= 16 {
            for (i, lane) in v.iter_mut().enumerate() {
                let w = u32::from_le_bytes([rest[i * 4], rest[i * 4 + 1], rest[i * 4 + 2], rest[i * 4 + 3]]);
                *lane = lane.wrapping_add(w.wrapping_mul(P2)).rotate_left(13).wrapping_mul(P1);
            }
            rest = &rest[16..];
        }
        v[0].rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18))
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(input.len() as u32);
    while rest.len() >= 4 {
        let w = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        h = h.wrapping_add(w.wrapping_mul(P3)).rotate_left(17).wrapping_mul(P4);
        rest = &rest[4..];
    }
    for b in rest {
        h = h.wrapping_add(u32::from(*b).wrapping_mul(P5)).rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 15;
    h = h.wrapping_mul(P2);
    h ^= h >> 13;
    h = h.wrapping_mul(P3);
    h ^= h >> 16;
    h
}

/// Kafka's magic-0 LZ4 quirk (KAFKA-3160): 0.8/0.9 computed the LZ4 frame
/// header checksum over the magic number too. Returns the frame with the
/// descriptor's checksum byte recomputed as the LZ4 spec has it, so a
/// standard decoder accepts it; `None` when it is not an LZ4 frame.
pub fn fix_lz4_header_checksum(frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() < 7 || frame[..4] != [0x04, 0x22, 0x4d, 0x18] {
        return None;
    }
    let flg = frame[4];
    let mut descriptor_end = 6; // FLG, BD
    if flg & 0x08 != 0 {
        descriptor_end += 8; // content size
    }
    if flg & 0x01 != 0 {
        descriptor_end += 4; // dictionary id
    }
    if frame.len() <= descriptor_end {
        return None;
    }
    let mut fixed = frame.to_vec();
    fixed[descriptor_end] = ((xxh32(&frame[4..descriptor_end], 0) >> 8) & 0xff) as u8;
    Some(fixed)
}

// ---------------------------------------------------------------------------
// Record batch v2 records, as down-conversion reads them

/// One record of an uncompressed v2 records section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V2Record<'a> {
    pub offset_delta: i64,
    pub timestamp_delta_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub header_count: i64,
}

fn varint(body: &[u8], at: &mut usize) -> Result<i64, &'static str> {
    let (v, n) = batch::get_varint(body.get(*at..).ok_or("record truncated")?).ok_or("bad varint")?;
    *at += n;
    Ok(v)
}

fn varbytes<'a>(body: &'a [u8], at: &mut usize) -> Result<Option<&'a [u8]>, &'static str> {
    let len = varint(body, at)?;
    if len < 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| "bad length")?;
    let end = at.checked_add(len).filter(|e| *e <= body.len()).ok_or("field runs past the record")?;
    let v = &body[*at..end];
    *at = end;
    Ok(Some(v))
}

/// The records of an uncompressed v2 records section (`count` of them).
pub fn v2_records(section: &[u8], count: i32) -> Result<Vec<V2Record<'_>>, &'static str> {
    let count = usize::try_from(count).map_err(|_| "negative record count")?;
    let mut out = Vec::with_capacity(count.min(section.len() / 7));
    let mut at = 0usize;
    for _ in 0..count {
        let len = varint(section, &mut at)?;
        let len = usize::try_from(len).map_err(|_| "negative record length")?;
        let end = at.checked_add(len).filter(|e| *e <= section.len()).ok_or("record runs past the batch")?;
        let body = &section[at..end];
        let mut r = 1usize; // attributes
        let timestamp_delta_ms = varint(body, &mut r)?;
        let offset_delta = varint(body, &mut r)?;
        let key = varbytes(body, &mut r)?;
        let value = varbytes(body, &mut r)?;
        let header_count = varint(body, &mut r)?;
        out.push(V2Record { offset_delta, timestamp_delta_ms, key, value, header_count });
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_ieee(b""), 0);
    }

    #[test]
    fn xxh32_known_values() {
        assert_eq!(xxh32(b"", 0), 0x02CC_5D05);
        assert_eq!(xxh32(b"a", 0), 0x550D_7456);
        assert_eq!(xxh32(b"abc", 0), 0x32D1_53FF);
        assert_eq!(xxh32(b"Nobody inspects the spammish repetition", 0), 0xE229_3B2F);
    }

    #[test]
    fn messages_round_trip_and_crc_is_checked() {
        let mut set = BytesMut::new();
        write_message(&mut set, 1, 0, 0, 1_700_000_000_000, Some(b"k"), Some(b"v1"));
        write_message(&mut set, 1, 1, 0, 1_700_000_000_001, None, Some(b"v2"));
        write_message(&mut set, 0, 2, 0, NO_TIMESTAMP, Some(b"k0"), None);
        let msgs = parse_message_set(&set).expect("parse");
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].key, Some(&b"k"[..]));
        assert_eq!(msgs[1].timestamp_ms, 1_700_000_000_001);
        assert_eq!(msgs[2].magic, 0);
        assert_eq!(msgs[2].timestamp_ms, NO_TIMESTAMP);
        assert_eq!(msgs[2].value, None);
        let mut bad = set.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(parse_message_set(&bad), Err(MessageSetError::Corrupt(_))));
        assert!(matches!(parse_message_set(&set[..set.len() - 3]), Err(MessageSetError::Corrupt(_))));
    }

    #[test]
    fn legacy_requests_upgrade() {
        // Fetch v2: replica, wait, min, one topic "t" with one partition.
        let mut b = BytesMut::new();
        b.put_i32(-1);
        b.put_i32(100);
        b.put_i32(1);
        b.put_i32(1);
        put_str(&mut b, "t");
        b.put_i32(1);
        b.put_i32(0);
        b.put_i64(5);
        b.put_i32(1024);
        let (v, body) = upgrade_request(ApiKey::Fetch, 2, &b).expect("legacy").expect("upgrade");
        assert_eq!(v, 4);
        let mut body = body;
        let req = crate::request::decode_request(ApiKey::Fetch, 4, &mut body).expect("decode");
        let crate::request::Request::Fetch(f) = req else { panic!("not a fetch") };
        assert_eq!(f.max_bytes, i32::MAX);
        assert_eq!(f.topics[0].partitions[0].fetch_offset, 5);
        // ListOffsets v0 drops max_num_offsets.
        let mut b = BytesMut::new();
        b.put_i32(-1);
        b.put_i32(1);
        put_str(&mut b, "t");
        b.put_i32(1);
        b.put_i32(3);
        b.put_i64(-2);
        b.put_i32(1);
        let (v, mut body) = upgrade_request(ApiKey::ListOffsets, 0, &b).expect("legacy").expect("upgrade");
        let req = crate::request::decode_request(ApiKey::ListOffsets, v, &mut body).expect("decode");
        let crate::request::Request::ListOffsets(l) = req else { panic!("not list offsets") };
        assert_eq!((l.topics[0].partitions[0].partition_index, l.topics[0].partitions[0].timestamp), (3, -2));
        // OffsetCommit v1: the per-partition timestamp goes, retention comes.
        let mut b = BytesMut::new();
        put_str(&mut b, "g");
        b.put_i32(3);
        put_str(&mut b, "m");
        b.put_i32(1);
        put_str(&mut b, "t");
        b.put_i32(1);
        b.put_i32(2);
        b.put_i64(42);
        b.put_i64(1_700_000_000_000);
        put_str(&mut b, "meta");
        let (v, mut body) = upgrade_request(ApiKey::OffsetCommit, 1, &b).expect("legacy").expect("upgrade");
        let req = crate::request::decode_request(ApiKey::OffsetCommit, v, &mut body).expect("decode");
        let crate::request::Request::OffsetCommit(c) = req else { panic!("not an offset commit") };
        assert_eq!((c.generation_id_or_member_epoch, &*c.member_id, c.retention_time_ms), (3, "m", -1));
        let p = &c.topics[0].partitions[0];
        assert_eq!((p.partition_index, p.committed_offset, p.committed_metadata.as_deref()), (2, 42, Some("meta")));
        // OffsetCommit v0: no generation or member.
        let mut b = BytesMut::new();
        put_str(&mut b, "g");
        b.put_i32(1);
        put_str(&mut b, "t");
        b.put_i32(1);
        b.put_i32(0);
        b.put_i64(7);
        put_str(&mut b, "");
        let mut body = Bytes::from(b.to_vec());
        let req = crate::request::decode_request(ApiKey::OffsetCommit, 0, &mut body).expect("decode");
        let crate::request::Request::OffsetCommit(c) = req else { panic!("not an offset commit") };
        assert_eq!((c.generation_id_or_member_epoch, &*c.member_id), (-1, ""));
        assert_eq!(c.topics[0].partitions[0].committed_offset, 7);
        assert_eq!(answer_version(ApiKey::OffsetCommit, 0), 2);
        assert_eq!(answer_version(ApiKey::OffsetFetch, 0), 1);
        assert_eq!(answer_version(ApiKey::Produce, 1), 1);
        // A count larger than the body can hold is refused before allocating.
        let mut b = BytesMut::new();
        b.put_i32(-1);
        b.put_i32(i32::MAX);
        assert!(upgrade_request(ApiKey::ListOffsets, 0, &b).expect("legacy").is_err());
    }
}
