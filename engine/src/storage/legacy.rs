//! Conversion between legacy MessageSets (magic 0/1) and record batch v2,
//! for clients that speak Produce v0–v2 and Fetch v0–v3 (Kafka 0.9/0.10).
//! Pure functions over bytes, called by the Produce and Fetch handlers of
//! whichever shard owns the partition; storage only ever holds v2.
//!
//! Produce (`message_set_to_v2`): each partition's MessageSet becomes one
//! v2 batch, non-transactional (producer id -1), as Kafka's LogValidator
//! converts it: compressed wrappers are opened (one level only: a wrapper
//! inside a wrapper is CORRUPT_MESSAGE), inner messages' offsets are
//! ignored (the log assigns them), timestamps are kept (magic 0 has none:
//! NO_TIMESTAMP, -1) and the batch keeps the wrapper's codec. LogAppendTime
//! topics are stamped afterwards by the normal produce path.
//!
//! Fetch (`down_convert`): stored v2 batches become uncompressed messages of
//! magic 1 (Fetch v2–v3) or 0 (v0–v1) with their offsets and timestamps
//! (magic 1; LogAppendTime batches set the attribute bit and carry the
//! batch's append time). Record headers have no place in magic 0/1 and are
//! dropped, as Kafka drops them. Control batches and the records of aborted
//! transactions are not returned (an old client cannot filter them). The
//! output is bounded by the partition's byte budget, so down-conversion
//! holds at most one decompressed batch plus the budget in memory.

use bytes::BytesMut;

use tidelog_protocol::batch::{self, BatchHeader, Compression, RecordRef, BATCH_HEADER_BYTES};
use tidelog_protocol::legacy::{self as wire, Message, MessageSetError, NO_TIMESTAMP};
use tidelog_protocol::ErrorCode;

use super::compaction;

/// Decompresses a legacy wrapper's value. LZ4 in magic 0 may carry Kafka
/// 0.8/0.9's wrong frame header checksum (KAFKA-3160): on failure the frame
/// is retried with the checksum repaired.
fn decompress(value: &[u8], codec: Compression, magic: i8) -> Result<Vec<u8>, String> {
    if matches!(codec, Compression::None | Compression::Unknown(_)) {
        return Err(format!("no decompression for codec {codec:?}"));
    }
    let run = |bytes: &[u8]| super::codec::decompress(bytes, codec, super::codec::DECOMPRESSED_MAX_BYTES);
    match run(value) {
        Ok(v) => Ok(v),
        Err(e) if codec == Compression::Lz4 && magic == 0 => match wire::fix_lz4_header_checksum(value) {
            Some(fixed) => run(&fixed).map_err(|e| format!("cannot decompress an LZ4 message: {e}")),
            None => Err(format!("cannot decompress an LZ4 message: {e}")),
        },
        Err(e) => Err(e),
    }
}

/// An owned inner message (the decompressed set's messages borrow from a
/// buffer that must outlive them).
struct Flat {
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

fn flat(m: &Message<'_>, timestamp_ms: i64) -> Flat {
    Flat { timestamp_ms, key: m.key.map(<[u8]>::to_vec), value: m.value.map(<[u8]>::to_vec) }
}

/// Converts a producer's MessageSet (magic 0/1) into one v2 record batch
/// (base offset 0, assigned on append). Errors are Kafka's: a bad CRC, a
/// truncated set, a nested or undecodable wrapper are CORRUPT_MESSAGE; a
/// magic above 1 is UNSUPPORTED_FOR_MESSAGE_FORMAT; an empty set is
/// CORRUPT_MESSAGE as for v2. `max_bytes` bounds what a wrapper may
/// decompress to (MESSAGE_TOO_LARGE past it), so a small compressed request
/// cannot make the shard hold an unbounded batch.
pub fn message_set_to_v2(records: &[u8], max_bytes: usize) -> Result<BytesMut, (ErrorCode, String)> {
    let refused = |e: MessageSetError| match e {
        MessageSetError::BadMagic(_) => (ErrorCode::UnsupportedForMessageFormat, e.to_string()),
        MessageSetError::Corrupt(_) => (ErrorCode::CorruptMessage, e.to_string()),
    };
    let outer = wire::parse_message_set(records).map_err(refused)?;
    let mut codec = Compression::None;
    let mut msgs: Vec<Flat> = Vec::with_capacity(outer.len());
    let mut decompressed_bytes = 0usize;
    for m in &outer {
        match m.codec() {
            Compression::None => msgs.push(flat(m, m.timestamp_ms)),
            c @ Compression::Unknown(_) => {
                return Err((ErrorCode::CorruptMessage, format!("unknown compression codec {c:?}")));
            }
            Compression::Zstd => {
                return Err((ErrorCode::UnsupportedForMessageFormat, "zstd needs message format v2".into()));
            }
            c => {
                codec = c;
                let value =
                    m.value.ok_or((ErrorCode::CorruptMessage, "a compressed message without a value".into()))?;
                let inner = decompress(value, c, m.magic).map_err(|e| (ErrorCode::CorruptMessage, e))?;
                decompressed_bytes = decompressed_bytes.saturating_add(inner.len());
                if decompressed_bytes > max_bytes.saturating_mul(4) {
                    return Err((
                        ErrorCode::MessageTooLarge,
                        format!("compressed messages expand past {} bytes", max_bytes.saturating_mul(4)),
                    ));
                }
                for i in wire::parse_message_set(&inner).map_err(refused)? {
                    if i.codec() != Compression::None {
                        return Err((ErrorCode::CorruptMessage, "a compressed message inside a compressed one".into()));
                    }
                    // A magic-1 wrapper with LogAppendTime speaks for its
                    // inner messages (only a broker writes that); otherwise
                    // each inner message keeps its own timestamp.
                    let ts = if m.is_log_append_time() { m.timestamp_ms } else { i.timestamp_ms };
                    msgs.push(flat(&i, ts));
                }
            }
        }
    }
    if msgs.is_empty() {
        return Err((ErrorCode::CorruptMessage, "empty message set".into()));
    }
    let base_ts = msgs[0].timestamp_ms;
    let refs: Vec<RecordRef<'_>> = msgs
        .iter()
        .map(|f| RecordRef {
            key: f.key.as_deref(),
            value: f.value.as_deref(),
            headers: &[],
            timestamp_delta_ms: if base_ts == NO_TIMESTAMP || f.timestamp_ms == NO_TIMESTAMP {
                0
            } else {
                f.timestamp_ms.saturating_sub(base_ts)
            },
        })
        .collect();
    let plain = batch::build_batch(&refs, base_ts, batch::ProducerFields::default());
    if codec == Compression::None {
        return Ok(BytesMut::from(&plain[..]));
    }
    // Keep the producer's codec, as Kafka does: mark the batch and let the
    // compactor's rebuild recompress its records (it keeps the batch
    // uncompressed should compression fail).
    let mut marked = plain.to_vec();
    let attributes = i16::from_be_bytes([marked[21], marked[22]]) | codec_bits(codec);
    marked[21..23].copy_from_slice(&attributes.to_be_bytes());
    let raws: Vec<&[u8]> = compaction::parse_records(&plain)
        .map_err(|e| (ErrorCode::CorruptMessage, e.to_string()))?
        .iter()
        .map(|r| r.raw)
        .collect();
    Ok(BytesMut::from(&compaction::rebuild_batch(&marked, &raws)[..]))
}

fn codec_bits(c: Compression) -> i16 {
    match c {
        Compression::Gzip => 1,
        Compression::Snappy => 2,
        Compression::Lz4 => 3,
        Compression::Zstd => 4,
        Compression::None | Compression::Unknown(_) => 0,
    }
}

/// Down-converts a run of stored v2 batches (`batches`, whole batches as a
/// fetch reads them) into a MessageSet of `magic` (0 or 1) holding the
/// records at or after `from_offset`, at most `budget_bytes` of it (at
/// least one message when `at_least_one`, so a large message still makes
/// progress). `aborted` are the partition's aborted transactions that
/// overlap the read, as (producer id, first offset): their records are
/// skipped, as a read_committed consumer skips them. Batches past a
/// malformed one are not returned (the fetch answers what came before).
pub fn down_convert(
    batches: &[u8],
    magic: i8,
    from_offset: i64,
    budget_bytes: usize,
    at_least_one: bool,
    aborted: &[(i64, i64)],
) -> BytesMut {
    let mut out = BytesMut::new();
    let mut aborted: Vec<(i64, i64)> = aborted.to_vec();
    aborted.sort_by_key(|(_, first)| std::cmp::Reverse(*first));
    let mut aborting: Vec<i64> = Vec::new();
    let mut at = 0usize;
    'batches: while at < batches.len() {
        let Ok(h) = BatchHeader::parse(&batches[at..]) else { break };
        let size = h.size_bytes();
        let Some(b) = batches.get(at..at + size) else { break };
        at += size;
        // Kafka's consumer-side filter: a transaction becomes aborted from
        // its first offset; its ABORT marker ends it.
        while aborted.last().is_some_and(|(_, first)| *first <= h.last_offset().0) {
            if let Some((pid, _)) = aborted.pop() {
                aborting.push(pid);
            }
        }
        let pid = h.producer_id().0;
        if h.is_control() {
            if let Some((batch::ControlType::Abort, _)) = batch::control_record_type(b) {
                aborting.retain(|p| *p != pid);
            }
            continue;
        }
        if h.is_transactional() && aborting.contains(&pid) {
            continue;
        }
        if h.last_offset().0 < from_offset {
            continue;
        }
        let plain = match compaction::plain_view(b) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("down-conversion at offset {}: {e}", h.base_offset().0);
                break;
            }
        };
        let Ok(records) = wire::v2_records(&plain[BATCH_HEADER_BYTES..], h.record_count()) else {
            log::warn!("down-conversion at offset {}: malformed records", h.base_offset().0);
            break;
        };
        let log_append_time = h.is_log_append_time();
        for r in records {
            let offset = h.base_offset().0.saturating_add(r.offset_delta);
            if offset < from_offset {
                continue;
            }
            let size = wire::message_size(magic, r.key, r.value);
            if out.len() + size > budget_bytes && !(at_least_one && out.is_empty()) {
                break 'batches;
            }
            let (attributes, ts) = if log_append_time {
                (wire::ATTR_LOG_APPEND_TIME, h.max_timestamp_ms())
            } else if h.base_timestamp_ms() == NO_TIMESTAMP {
                (0, NO_TIMESTAMP)
            } else {
                (0, h.base_timestamp_ms().saturating_add(r.timestamp_delta_ms))
            };
            let attributes = if magic == 0 { 0 } else { attributes };
            wire::write_message(&mut out, magic, offset, attributes, ts, r.key, r.value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::compression::{Gzip, Lz4};
    use tidelog_protocol::Offset;

    /// (key, value, timestamp delta)
    type Rec<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, i64);

    fn v2(records: &[Rec<'_>], base_ts: i64, base_offset: i64) -> Vec<u8> {
        let headers: &[(&[u8], Option<&[u8]>)] = &[(b"h", Some(b"x"))];
        let refs: Vec<RecordRef<'_>> =
            records.iter().map(|(k, v, d)| RecordRef { key: *k, value: *v, headers, timestamp_delta_ms: *d }).collect();
        let mut b = batch::build_batch(&refs, base_ts, batch::ProducerFields::default()).to_vec();
        batch::assign_offset(&mut b, Offset(base_offset), tidelog_protocol::Epoch(0));
        b
    }

    #[test]
    fn v2_to_v1_to_v2_keeps_offsets_keys_values_and_timestamps() {
        let mut stored = v2(&[(Some(b"k1"), Some(b"v1"), 0), (None, Some(b"v2"), 5)], 1_000, 10);
        stored.extend(v2(&[(Some(b"k3"), None, 0)], 2_000, 12));
        let v1 = down_convert(&stored, 1, 0, 1 << 20, true, &[]);
        let msgs = wire::parse_message_set(&v1).expect("v1 parses");
        let seen: Vec<_> = msgs.iter().map(|m| (m.offset, m.key, m.value, m.timestamp_ms, m.magic)).collect();
        assert_eq!(
            seen,
            vec![
                (10, Some(&b"k1"[..]), Some(&b"v1"[..]), 1_000, 1),
                (11, None, Some(&b"v2"[..]), 1_005, 1),
                (12, Some(&b"k3"[..]), None, 2_000, 1),
            ]
        );
        // And back: one v2 batch with the same records (headers are gone).
        let back = message_set_to_v2(&v1, 1 << 20).expect("convert");
        let info = batch::validate(&back, 1 << 20).expect("valid v2");
        assert_eq!(info.record_count, 3);
        let h = BatchHeader::parse(&back).expect("header");
        assert_eq!((h.base_timestamp_ms(), h.max_timestamp_ms(), h.producer_id().0), (1_000, 2_000, -1));
        let recs = wire::v2_records(&back[BATCH_HEADER_BYTES..], 3).expect("records");
        let got: Vec<_> = recs.iter().map(|r| (r.key, r.value, r.timestamp_delta_ms, r.header_count)).collect();
        assert_eq!(
            got,
            vec![
                (Some(&b"k1"[..]), Some(&b"v1"[..]), 0, 0),
                (None, Some(&b"v2"[..]), 5, 0),
                (Some(&b"k3"[..]), None, 1_000, 0)
            ]
        );
    }

    #[test]
    fn magic_0_has_no_timestamps_and_offsets_filter() {
        let stored = v2(&[(None, Some(b"a"), 0), (None, Some(b"b"), 1), (None, Some(b"c"), 2)], 7, 0);
        let v0 = down_convert(&stored, 0, 1, 1 << 20, true, &[]);
        let msgs = wire::parse_message_set(&v0).expect("v0 parses");
        assert_eq!(
            msgs.iter().map(|m| (m.offset, m.magic, m.timestamp_ms)).collect::<Vec<_>>(),
            vec![(1, 0, NO_TIMESTAMP), (2, 0, NO_TIMESTAMP)]
        );
        let back = message_set_to_v2(&v0, 1 << 20).expect("convert");
        assert_eq!(BatchHeader::parse(&back).expect("h").base_timestamp_ms(), NO_TIMESTAMP);
    }

    #[test]
    fn budget_bounds_the_output_but_one_message_always_goes() {
        let big = vec![7u8; 1000];
        let stored = v2(&[(None, Some(&big), 0), (None, Some(&big), 0)], 1, 0);
        let one = down_convert(&stored, 1, 0, 100, true, &[]);
        assert_eq!(wire::parse_message_set(&one).expect("parse").len(), 1);
        assert!(down_convert(&stored, 1, 0, 100, false, &[]).is_empty());
        let both = down_convert(&stored, 1, 0, 1 << 20, false, &[]);
        assert_eq!(wire::parse_message_set(&both).expect("parse").len(), 2);
    }

    #[test]
    fn compressed_wrappers_open_and_keep_the_codec() {
        let mut inner = BytesMut::new();
        wire::write_message(&mut inner, 1, 0, 0, 100, Some(b"k"), Some(b"one"));
        wire::write_message(&mut inner, 1, 1, 0, 101, None, Some(b"two"));
        let mut compressed = BytesMut::new();
        use kafka_protocol::compression::Compressor;
        Gzip::compress(&mut compressed, |b: &mut BytesMut| {
            b.extend_from_slice(&inner);
            Ok(())
        })
        .expect("gzip");
        let mut set = BytesMut::new();
        wire::write_message(&mut set, 1, 1, 1, 101, None, Some(&compressed));
        let v2b = message_set_to_v2(&set, 1 << 20).expect("convert");
        let info = batch::validate(&v2b, 1 << 20).expect("valid");
        assert_eq!((info.record_count, info.compression), (2, Compression::Gzip));
        let mut stored = v2b.to_vec();
        batch::assign_offset(&mut stored, Offset(40), tidelog_protocol::Epoch(0));
        let back = down_convert(&stored, 1, 0, 1 << 20, true, &[]);
        let msgs = wire::parse_message_set(&back).expect("parse");
        assert_eq!(
            msgs.iter().map(|m| (m.offset, m.value, m.timestamp_ms)).collect::<Vec<_>>(),
            vec![(40, Some(&b"one"[..]), 100), (41, Some(&b"two"[..]), 101)]
        );
        // A wrapper inside a wrapper is refused.
        let mut nested = BytesMut::new();
        let mut c2 = BytesMut::new();
        Gzip::compress(&mut c2, |b: &mut BytesMut| {
            b.extend_from_slice(&set);
            Ok(())
        })
        .expect("gzip");
        wire::write_message(&mut nested, 1, 0, 1, 0, None, Some(&c2));
        assert_eq!(message_set_to_v2(&nested, 1 << 20).map_err(|e| e.0).err(), Some(ErrorCode::CorruptMessage));
    }

    /// Kafka 0.8/0.9 (and librdkafka for magic 0) wrote the LZ4 frame
    /// header checksum over the magic number too (KAFKA-3160).
    #[test]
    fn magic_0_lz4_with_kafkas_old_header_checksum_is_read() {
        use kafka_protocol::compression::Compressor;
        let mut inner = BytesMut::new();
        wire::write_message(&mut inner, 0, 0, 0, NO_TIMESTAMP, Some(b"k"), Some(b"lz4 v0"));
        let mut frame = BytesMut::new();
        Lz4::compress(&mut frame, |b: &mut BytesMut| {
            b.extend_from_slice(&inner);
            Ok(())
        })
        .expect("lz4");
        let mut broken = frame.to_vec();
        let flg = broken[4];
        let end = 6 + if flg & 0x08 != 0 { 8 } else { 0 } + if flg & 0x01 != 0 { 4 } else { 0 };
        let wrong = ((wire::xxh32(&broken[..end], 0) >> 8) & 0xff) as u8;
        assert_ne!(wrong, broken[end], "the test needs a checksum that differs");
        broken[end] = wrong;
        let mut set = BytesMut::new();
        wire::write_message(&mut set, 0, 0, 3, NO_TIMESTAMP, None, Some(&broken));
        let v2b = message_set_to_v2(&set, 1 << 20).expect("magic 0 lz4 with the old checksum");
        let plain = compaction::plain_view(&v2b).expect("plain");
        let recs = wire::v2_records(&plain[BATCH_HEADER_BYTES..], 1).expect("records");
        assert_eq!(recs[0].value, Some(&b"lz4 v0"[..]));
        // The repaired checksum is the one the standard encoder wrote.
        assert_eq!(wire::fix_lz4_header_checksum(&broken).as_deref(), Some(&frame[..]));
    }

    #[test]
    fn bad_input_is_refused() {
        let mut set = BytesMut::new();
        wire::write_message(&mut set, 1, 0, 0, 5, None, Some(b"x"));
        let mut bad = set.to_vec();
        bad[14] ^= 0xff; // the CRC
        assert_eq!(message_set_to_v2(&bad, 1 << 20).map_err(|e| e.0).err(), Some(ErrorCode::CorruptMessage));
        assert_eq!(
            message_set_to_v2(&set[..set.len() - 1], 1 << 20).map_err(|e| e.0).err(),
            Some(ErrorCode::CorruptMessage)
        );
        assert_eq!(message_set_to_v2(&[], 1 << 20).map_err(|e| e.0).err(), Some(ErrorCode::CorruptMessage));
    }

    #[test]
    fn control_batches_and_aborted_records_are_skipped() {
        let pid = 9;
        let recs = [RecordRef { key: None, value: Some(b"t"), headers: &[], timestamp_delta_ms: 0 }];
        let fields = batch::ProducerFields { producer_id: pid, producer_epoch: 0, base_sequence: 0 };
        let mut aborted_batch =
            batch::build_batch_with_attributes(&recs, 1, fields, batch::ATTR_TRANSACTIONAL).to_vec();
        batch::assign_offset(&mut aborted_batch, Offset(0), tidelog_protocol::Epoch(0));
        let mut marker = batch::build_control_batch(batch::ControlType::Abort, pid, 0, 0, 1).to_vec();
        batch::assign_offset(&mut marker, Offset(1), tidelog_protocol::Epoch(0));
        let mut stored = aborted_batch.clone();
        stored.extend(&marker);
        stored.extend(v2(&[(None, Some(b"plain"), 0)], 1, 2));
        let out = down_convert(&stored, 1, 0, 1 << 20, true, &[(pid, 0)]);
        let msgs = wire::parse_message_set(&out).expect("parse");
        assert_eq!(msgs.iter().map(|m| (m.offset, m.value)).collect::<Vec<_>>(), vec![(2, Some(&b"plain"[..]))]);
        // Without the aborted list the transactional record is returned.
        let out = down_convert(&stored, 1, 0, 1 << 20, true, &[]);
        assert_eq!(wire::parse_message_set(&out).expect("parse").len(), 2);
    }
}
