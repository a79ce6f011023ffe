//! Record batch v2 encoding and decoding for the bench client: records are
//! appended straight into a per-partition buffer (no per-record allocation),
//! and the batch header, optional compression and CRC-32C are added when the
//! batch is closed. The decoder walks fetched batches without copying
//! uncompressed record data.
//!
//! Thread-local: each producer/consumer thread owns its builders.

use std::borrow::Cow;
use std::io::{Read, Write};

use anyhow::{anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};
use tidelog_protocol::batch::{get_varint, put_varint, BatchHeader, Compression, BATCH_HEADER_BYTES};

use crate::workload::Codec;

const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;

/// Bytes a zig-zag varint of `value` takes.
pub fn varint_len(value: i64) -> usize {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Encoded size of a record body (without its length prefix).
fn record_body_len(ts_delta: i64, offset_delta: i64, key: Option<&[u8]>, value_len: usize) -> usize {
    let key_len = key.map(|k| varint_len(k.len() as i64) + k.len()).unwrap_or(1);
    1 + varint_len(ts_delta) + varint_len(offset_delta) + key_len + varint_len(value_len as i64) + value_len + 1
}

/// Attributes bit of a batch written inside a transaction (Kafka's
/// `RecordBatch.TRANSACTIONAL_FLAG_MASK`).
pub const TRANSACTIONAL_BIT: i16 = 0x10;

/// The attributes field of a batch a producer writes: compression codec in
/// bits 0-2, create time (bit 3 clear), the transactional bit, never the
/// control bit (0x20, broker-written markers only).
pub fn batch_attributes(codec: Codec, transactional: bool) -> i16 {
    codec.attribute_bits() | if transactional { TRANSACTIONAL_BIT } else { 0 }
}

/// Producer identity a batch carries; `NONE` (all -1) for a plain producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerStamp {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
}

impl ProducerStamp {
    pub const NONE: ProducerStamp =
        ProducerStamp { producer_id: -1, producer_epoch: -1, base_sequence: -1, transactional: false };
}

/// An open batch for one partition.
pub struct BatchBuilder {
    records: BytesMut,
    count: i32,
    base_ts_ms: i64,
    max_ts_ms: i64,
}

impl BatchBuilder {
    pub fn new(base_ts_ms: i64, capacity_bytes: usize) -> BatchBuilder {
        BatchBuilder { records: BytesMut::with_capacity(capacity_bytes), count: 0, base_ts_ms, max_ts_ms: base_ts_ms }
    }

    pub fn count(&self) -> i32 {
        self.count
    }

    /// Size of the batch if closed now, uncompressed.
    pub fn size_bytes(&self) -> usize {
        BATCH_HEADER_BYTES + self.records.len()
    }

    /// Bytes `append` would add for a record like this.
    pub fn record_size_bytes(&self, ts_ms: i64, key: Option<&[u8]>, value_len: usize) -> usize {
        let body = record_body_len(ts_ms - self.base_ts_ms, self.count as i64, key, value_len);
        varint_len(body as i64) + body
    }

    /// Appends one record whose value is `value_head` followed by `value_tail`.
    pub fn append(&mut self, ts_ms: i64, key: Option<&[u8]>, value_head: &[u8], value_tail: &[u8]) {
        let ts_delta = ts_ms - self.base_ts_ms;
        let value_len = value_head.len() + value_tail.len();
        let body = record_body_len(ts_delta, self.count as i64, key, value_len);
        let r = &mut self.records;
        put_varint(r, body as i64);
        r.put_i8(0);
        put_varint(r, ts_delta);
        put_varint(r, self.count as i64);
        match key {
            Some(k) => {
                put_varint(r, k.len() as i64);
                r.put_slice(k);
            }
            None => put_varint(r, -1),
        }
        put_varint(r, value_len as i64);
        r.put_slice(value_head);
        r.put_slice(value_tail);
        put_varint(r, 0);
        self.count += 1;
        self.max_ts_ms = self.max_ts_ms.max(ts_ms);
    }

    /// Closes the batch: compresses the records section and writes the header
    /// and CRC. Base offset is 0; the broker assigns it.
    pub fn finish(self, codec: Codec) -> anyhow::Result<Bytes> {
        self.finish_as(codec, ProducerStamp::NONE)
    }

    /// `finish` for an idempotent or transactional producer: the batch
    /// carries its producer id, epoch and base sequence, and the
    /// transactional attribute bit when `stamp.transactional`.
    pub fn finish_as(self, codec: Codec, stamp: ProducerStamp) -> anyhow::Result<Bytes> {
        let compressed;
        let body: &[u8] = match codec {
            Codec::None => &self.records,
            c => {
                compressed = compress(c, &self.records)?;
                &compressed
            }
        };
        let mut buf = BytesMut::with_capacity(BATCH_HEADER_BYTES + body.len());
        buf.put_i64(0);
        buf.put_i32((BATCH_HEADER_BYTES - 12 + body.len()) as i32);
        buf.put_i32(-1);
        buf.put_i8(2);
        buf.put_u32(0);
        buf.put_i16(batch_attributes(codec, stamp.transactional));
        buf.put_i32((self.count - 1).max(0));
        buf.put_i64(self.base_ts_ms);
        buf.put_i64(self.max_ts_ms);
        buf.put_i64(stamp.producer_id);
        buf.put_i16(stamp.producer_epoch);
        buf.put_i32(stamp.base_sequence);
        buf.put_i32(self.count);
        buf.put_slice(body);
        let crc = crc32c::crc32c(&buf[ATTRIBUTES_OFFSET..]);
        buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        Ok(buf.freeze())
    }
}

pub fn compress(codec: Codec, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    Ok(match codec {
        Codec::None => data.to_vec(),
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 2), flate2::Compression::fast());
            e.write_all(data)?;
            e.finish()?
        }
        Codec::Snappy => xerial_snappy(data)?,
        Codec::Lz4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(data.len() / 2));
            e.write_all(data)?;
            e.finish().map_err(|e| anyhow!("lz4: {e}"))?
        }
        Codec::Zstd => zstd::bulk::compress(data, 1)?,
    })
}

/// Kafka's Java client writes snappy in the xerial framing; plain raw snappy
/// blocks are also accepted by Kafka brokers, but xerial is what consumers of
/// every client library understand.
fn xerial_snappy(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    const HEADER: [u8; 16] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0, 0, 0, 0, 1, 0, 0, 0, 1];
    let mut out = Vec::with_capacity(data.len() / 2 + 32);
    out.extend_from_slice(&HEADER);
    let mut enc = snap::raw::Encoder::new();
    for chunk in data.chunks(32 * 1024) {
        let block = enc.compress_vec(chunk)?;
        out.extend_from_slice(&(block.len() as u32).to_be_bytes());
        out.extend_from_slice(&block);
    }
    Ok(out)
}

pub fn decompress(codec: Compression, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 2);
    match codec {
        Compression::None => out.extend_from_slice(data),
        Compression::Gzip => {
            flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
        }
        Compression::Lz4 => {
            lz4_flex::frame::FrameDecoder::new(data).read_to_end(&mut out)?;
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(data)?.read_to_end(&mut out)?;
        }
        Compression::Snappy => {
            if data.len() >= 16 && data[..8] == [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0] {
                let mut at = 16;
                while at + 4 <= data.len() {
                    let n = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
                    at += 4;
                    let block = data.get(at..at + n).ok_or_else(|| anyhow!("truncated xerial snappy block"))?;
                    out.extend_from_slice(&snap::raw::Decoder::new().decompress_vec(block)?);
                    at += n;
                }
            } else {
                out = snap::raw::Decoder::new().decompress_vec(data)?;
            }
        }
        Compression::Unknown(n) => bail!("unknown compression codec {n}"),
    }
    Ok(out)
}

/// One decoded record; slices borrow from the batch (or its decompressed copy).
#[derive(Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> anyhow::Result<i64> {
        let (v, n) = get_varint(&self.b[self.at.min(self.b.len())..]).ok_or_else(|| anyhow!("bad varint"))?;
        self.at += n;
        Ok(v)
    }
    fn bytes(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| anyhow!("record field past end of batch"))?;
        self.at += n;
        Ok(s)
    }
    fn opt_bytes(&mut self) -> anyhow::Result<Option<&'a [u8]>> {
        let n = self.varint()?;
        if n < 0 {
            Ok(None)
        } else {
            Ok(Some(self.bytes(n as usize)?))
        }
    }
}

/// Calls `f` for each record in `records` (the records section of a batch,
/// already decompressed). Checks every length against the buffer.
pub fn for_each_record<'a>(
    records: &'a [u8],
    count: i32,
    base_offset: i64,
    base_ts_ms: i64,
    mut f: impl FnMut(RecordView<'a>),
) -> anyhow::Result<()> {
    let mut c = Cursor { b: records, at: 0 };
    for _ in 0..count.max(0) {
        let len = c.varint()?;
        anyhow::ensure!(len >= 0, "negative record length");
        let end = c.at + len as usize;
        anyhow::ensure!(end <= records.len(), "record length {len} past end of batch");
        c.bytes(1)?;
        let ts_delta = c.varint()?;
        let offset_delta = c.varint()?;
        let key = c.opt_bytes()?;
        let value = c.opt_bytes()?;
        c.at = end; // skip headers
        f(RecordView { offset: base_offset + offset_delta, timestamp_ms: base_ts_ms + ts_delta, key, value });
    }
    Ok(())
}

/// Walks the whole batches in a fetched record set. Returns the offset after
/// the last complete batch (or `None` if there was none); a partial batch at
/// the end (fetch max bytes cut it) is left for the next fetch.
pub fn for_each_fetched_record(
    set: &[u8],
    check_crc: bool,
    mut f: impl FnMut(RecordView<'_>),
) -> anyhow::Result<Option<i64>> {
    for_each_fetched_batch(set, check_crc, |h, body| {
        if h.is_control() {
            return Ok(());
        }
        let records = batch_records(h, body)?;
        for_each_record(&records, h.record_count(), h.base_offset().0, h.base_timestamp_ms(), &mut f)
    })
}

/// Calls `f` with the header and the (maybe compressed) records section of
/// each whole batch in a fetched record set, after checking its CRC if
/// `check_crc`. Returns the offset after the last complete batch (or `None`
/// if there was none); a partial batch at the end (fetch max bytes cut it)
/// is left for the next fetch.
pub fn for_each_fetched_batch(
    set: &[u8],
    check_crc: bool,
    mut f: impl FnMut(&BatchHeader<'_>, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Option<i64>> {
    let mut at = 0;
    let mut next = None;
    while at + BATCH_HEADER_BYTES <= set.len() {
        let h = BatchHeader::parse(&set[at..]).map_err(|e| anyhow!("{e}"))?;
        let size = h.size_bytes();
        if at + size > set.len() {
            break;
        }
        let batch = &set[at..at + size];
        if check_crc {
            tidelog_protocol::batch::validate(batch, usize::MAX).map_err(|e| anyhow!("{e}"))?;
        }
        f(&h, &batch[BATCH_HEADER_BYTES..])?;
        next = Some(h.last_offset().0 + 1);
        at += size;
    }
    Ok(next)
}

/// A batch's records section, decompressed if it is compressed.
pub fn batch_records<'a>(h: &BatchHeader<'_>, body: &'a [u8]) -> anyhow::Result<Cow<'a, [u8]>> {
    Ok(match h.compression() {
        Compression::None => Cow::Borrowed(body),
        c => Cow::Owned(decompress(c, body)?),
    })
}

/// How many data records at or after offset `from` the complete batches of
/// a fetched record set hold, from the batch headers alone (nothing is
/// decompressed). Exact unless compaction left offset gaps inside a batch
/// that straddles `from`; then it may count a few too many.
pub fn records_from(set: &[u8], from: i64) -> anyhow::Result<u64> {
    let mut at = 0;
    let mut n = 0u64;
    while at + BATCH_HEADER_BYTES <= set.len() {
        let h = BatchHeader::parse(&set[at..]).map_err(|e| anyhow!("{e}"))?;
        let size = h.size_bytes();
        if at + size > set.len() {
            break;
        }
        let (first, last) = (h.base_offset().0, h.last_offset().0);
        if !h.is_control() && last >= from {
            n += if first >= from { h.record_count().max(0) as u64 } else { (last - from + 1) as u64 };
        }
        at += size;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidelog_protocol::batch::{build_batch, validate, ProducerFields, RecordRef};

    #[test]
    fn builder_matches_protocol_builder() {
        let mut b = BatchBuilder::new(1000, 1024);
        b.append(1000, Some(b"k1"), b"va", b"lue");
        b.append(1003, None, b"", b"x");
        let ours = b.finish(Codec::None).unwrap();
        let theirs = build_batch(
            &[
                RecordRef { key: Some(b"k1"), value: Some(b"value"), headers: &[], timestamp_delta_ms: 0 },
                RecordRef { key: None, value: Some(b"x"), headers: &[], timestamp_delta_ms: 3 },
            ],
            1000,
            ProducerFields::default(),
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn producer_stamp_matches_protocol_builder_and_sets_transactional_bit() {
        let records = [RecordRef { key: None, value: Some(b"value"), headers: &[], timestamp_delta_ms: 0 }];
        let fields = ProducerFields { producer_id: 4242, producer_epoch: 7, base_sequence: 300 };
        let theirs = build_batch(&records, 1000, fields);
        let build = |transactional| {
            let mut b = BatchBuilder::new(1000, 64);
            b.append(1000, None, b"val", b"ue");
            let stamp = ProducerStamp { producer_id: 4242, producer_epoch: 7, base_sequence: 300, transactional };
            b.finish_as(Codec::None, stamp).unwrap()
        };
        assert_eq!(build(false), theirs, "idempotent batch = the protocol crate's batch with the same fields");
        let txn = build(true);
        let h = BatchHeader::parse(&txn).unwrap();
        assert!(h.is_transactional() && !h.is_control());
        assert_eq!((h.producer_id().0, h.producer_epoch(), h.base_sequence()), (4242, 7, 300));
        assert_eq!(h.attributes(), 0x10);
        // Only the attributes (and so the CRC) differ from the idempotent batch.
        let diff: Vec<usize> = (0..txn.len()).filter(|&i| txn[i] != theirs[i]).collect();
        assert!(diff.iter().all(|&i| (CRC_OFFSET..ATTRIBUTES_OFFSET + 2).contains(&i)), "{diff:?}");
        validate(&txn, 1 << 20).unwrap();
    }

    #[test]
    fn attributes_combine_codec_and_transactional_bit() {
        assert_eq!(batch_attributes(Codec::None, false), 0);
        assert_eq!(batch_attributes(Codec::None, true), 0x10);
        assert_eq!(batch_attributes(Codec::Zstd, true), 0x14);
        assert_eq!(batch_attributes(Codec::Lz4, false), 0x03);
        for codec in [Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            let mut b = BatchBuilder::new(5, 256);
            b.append(5, None, &[9u8; 40], b"");
            let stamp = ProducerStamp { producer_id: 1, producer_epoch: 0, base_sequence: 0, transactional: true };
            let batch = b.finish_as(codec, stamp).unwrap();
            let h = BatchHeader::parse(&batch).unwrap();
            assert!(h.is_transactional(), "{codec:?}");
            assert_eq!(h.attributes() & 0x07, codec.attribute_bits(), "{codec:?}");
            validate(&batch, 1 << 20).unwrap();
        }
    }

    #[test]
    fn size_estimate_is_exact() {
        let mut b = BatchBuilder::new(5, 1024);
        for i in 0..200 {
            let before = b.size_bytes();
            let est = b.record_size_bytes(5 + i, Some(b"key"), 100 + i as usize);
            b.append(5 + i, Some(b"key"), &vec![1u8; 100 + i as usize], &[]);
            assert_eq!(b.size_bytes() - before, est);
        }
    }

    #[test]
    fn every_codec_roundtrips_and_validates() {
        for codec in [Codec::None, Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            let mut b = BatchBuilder::new(77, 1024);
            for i in 0..50u8 {
                b.append(77 + i as i64, Some(&[i]), &[i; 30], b"tail");
            }
            let batch = b.finish(codec).unwrap();
            let info = validate(&batch, 1 << 20).unwrap();
            assert_eq!(info.record_count, 50, "{codec:?}");
            let mut seen = Vec::new();
            let next = for_each_fetched_record(&batch, true, |r| {
                seen.push((r.offset, r.timestamp_ms, r.key.map(|k| k.to_vec()), r.value.map(|v| v.len())))
            })
            .unwrap();
            assert_eq!(next, Some(50));
            assert_eq!(seen.len(), 50);
            for (i, s) in seen.iter().enumerate() {
                assert_eq!(s, &(i as i64, 77 + i as i64, Some(vec![i as u8]), Some(34)), "{codec:?}");
            }
        }
    }

    #[test]
    fn records_from_counts_from_headers() {
        let five = |codec| {
            let mut b = BatchBuilder::new(0, 1024);
            for i in 0..5u8 {
                b.append(0, None, &[i; 8], b"");
            }
            b.finish(codec).unwrap()
        };
        let mut set = five(Codec::None).to_vec();
        let mut second = five(Codec::Lz4).to_vec();
        second[0..8].copy_from_slice(&5i64.to_be_bytes()); // base offset is outside the CRC
        set.extend_from_slice(&second);
        assert_eq!(records_from(&set, 0).unwrap(), 10);
        assert_eq!(records_from(&set, 3).unwrap(), 7);
        assert_eq!(records_from(&set, 5).unwrap(), 5);
        assert_eq!(records_from(&set, 10).unwrap(), 0);
        assert_eq!(records_from(&set[..set.len() - 1], 0).unwrap(), 5, "a partial batch is not counted");
        let mut seen = 0;
        for_each_fetched_record(&set, true, |_| seen += 1).unwrap();
        assert_eq!(seen, 10);
    }

    #[test]
    fn partial_trailing_batch_is_left_for_next_fetch() {
        let mut b = BatchBuilder::new(0, 64);
        b.append(0, None, b"abc", b"");
        let one = b.finish(Codec::None).unwrap();
        let mut set = one.to_vec();
        set.extend_from_slice(&one[..one.len() - 2]);
        let mut n = 0;
        assert_eq!(for_each_fetched_record(&set, true, |_| n += 1).unwrap(), Some(1));
        assert_eq!(n, 1);
        assert_eq!(for_each_fetched_record(&set[..10], true, |_| n += 1).unwrap(), None);
    }

    #[test]
    fn lying_lengths_are_errors_not_panics() {
        let mut b = BatchBuilder::new(0, 64);
        b.append(0, Some(b"k"), b"value", b"");
        let batch = b.finish(Codec::None).unwrap().to_vec();
        let body = &batch[BATCH_HEADER_BYTES..];
        assert!(for_each_record(body, 5, 0, 0, |_| {}).is_err(), "count larger than records");
        let mut bad = body.to_vec();
        bad[0] = 0x7e; // record length 63 > remaining bytes
        assert!(for_each_record(&bad, 1, 0, 0, |_| {}).is_err());
    }
}
