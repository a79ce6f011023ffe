//! `compression.type` on a topic: batches that arrive compressed otherwise
//! are rewritten with the topic's codec and level before they are appended
//! (Kafka's LogValidator does the same; `producer`, the default, keeps every
//! batch as it came and costs nothing).
//!
//! Only the records section changes: it is decompressed and compressed
//! again, byte for byte the same records, so offsets, timestamps, keys,
//! values, headers (duplicates included) and the producer fields stay as the
//! producer wrote them. The header gets the new codec bits, length and CRC.
//! Control batches are never rewritten (clients cannot send them anyway).

use std::io::Write;

use tidelog_protocol::batch::{BatchHeader, BatchInfo, Compression};

use super::compaction::decompress_records;

/// Bytes of a v2 batch header (up to and including the record count).
const HEADER_BYTES: usize = 61;
/// The codec bits of a batch's attributes.
const CODEC_MASK: i16 = 0x7;

/// A topic's `compression.type` with the level of its codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `producer`: keep each batch as it is.
    Producer,
    /// Rewrite batches compressed otherwise to `codec` at `level` (the
    /// codec's own default when None; `Compression::None` is `uncompressed`).
    Codec { codec: Compression, level: Option<i32> },
}

impl Target {
    /// From the topic's `compression.type` and its `compression.<codec>.level`
    /// (-1, gzip's "default", is None).
    pub fn from_config(compression_type: &str, level: impl Fn(&str) -> i64) -> Target {
        let (codec, level_name) = match compression_type.trim() {
            "uncompressed" => (Compression::None, None),
            "gzip" => (Compression::Gzip, Some("compression.gzip.level")),
            "snappy" => (Compression::Snappy, None),
            "lz4" => (Compression::Lz4, Some("compression.lz4.level")),
            "zstd" => (Compression::Zstd, Some("compression.zstd.level")),
            _ => return Target::Producer,
        };
        let level = level_name.map(level).filter(|l| *l != -1).and_then(|l| i32::try_from(l).ok());
        Target::Codec { codec, level }
    }
}

/// `records` compressed with `codec` at `level` (the codec's default when None).
pub fn compress(records: &[u8], codec: Compression, level: Option<i32>) -> Result<Vec<u8>, String> {
    let fail = |e: std::io::Error| format!("cannot compress with {codec:?}: {e}");
    match codec {
        Compression::None => Ok(records.to_vec()),
        Compression::Gzip => {
            let level = level.map(|l| flate2::Compression::new(l.clamp(1, 9) as u32)).unwrap_or_default();
            let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(records.len() / 2 + 64), level);
            e.write_all(records).map_err(fail)?;
            e.finish().map_err(fail)
        }
        Compression::Snappy => {
            // Kafka's snappy framing (xerial), as kafka-protocol writes it.
            use kafka_protocol::compression::{Compressor, Snappy};
            let mut out = bytes::BytesMut::with_capacity(records.len() / 2 + 64);
            Snappy::compress(&mut out, |b: &mut bytes::BytesMut| {
                b.extend_from_slice(records);
                Ok(())
            })
            .map_err(|e| format!("cannot compress with Snappy: {e:#}"))?;
            Ok(out.to_vec())
        }
        Compression::Lz4 => {
            // The LZ4 frame format with independent blocks, as Kafka's clients read it.
            let mut e = lz4::EncoderBuilder::new()
                .level(level.unwrap_or(9).clamp(1, 17) as u32)
                .block_mode(lz4::BlockMode::Independent)
                .build(Vec::with_capacity(records.len() / 2 + 64))
                .map_err(fail)?;
            e.write_all(records).map_err(fail)?;
            let (out, done) = e.finish();
            done.map_err(fail)?;
            Ok(out)
        }
        Compression::Zstd => zstd::stream::encode_all(records, level.unwrap_or(3)).map_err(fail),
        Compression::Unknown(n) => Err(format!("unknown compression codec {n}")),
    }
}

/// The batch `b` (whole, CRC checked) with its records under `codec` at
/// `level`; None when it needs no rewrite (already that codec, or a
/// control batch).
pub fn recompress_batch(b: &[u8], codec: Compression, level: Option<i32>) -> Result<Option<Vec<u8>>, String> {
    let h = BatchHeader::parse(b).map_err(|e| e.to_string())?;
    if h.is_control() || h.compression() == codec {
        return Ok(None);
    }
    let end = h.size_bytes();
    let records = decompress_records(&b[..end], h.compression())?;
    let body = compress(&records, codec, level)?;
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&b[..HEADER_BYTES]);
    out.extend_from_slice(&body);
    let attributes = (i16::from_be_bytes([out[21], out[22]]) & !CODEC_MASK) | codec_bits(codec);
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    let len = i32::try_from(out.len() - 12).map_err(|_| "recompressed batch too large".to_string())?;
    out[8..12].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&out[21..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(Some(out))
}

fn codec_bits(codec: Compression) -> i16 {
    match codec {
        Compression::None => 0,
        Compression::Gzip => 1,
        Compression::Snappy => 2,
        Compression::Lz4 => 3,
        Compression::Zstd => 4,
        Compression::Unknown(n) => i16::from(n) & CODEC_MASK,
    }
}

/// The record set `records` (its batches `infos`, validated) under
/// `target`; None when no batch needs a rewrite (the usual case: nothing
/// is copied).
pub fn recompress_set(records: &[u8], infos: &[BatchInfo], target: Target) -> Result<Option<Vec<u8>>, String> {
    let Target::Codec { codec, level } = target else { return Ok(None) };
    let mut out: Option<Vec<u8>> = None;
    let mut at = 0;
    for info in infos {
        let b = &records[at..at + info.size_bytes];
        match recompress_batch(b, codec, level)? {
            Some(new) => {
                // The first rewrite copies the batches before it once.
                let o = out.get_or_insert_with(|| {
                    let mut v = Vec::with_capacity(records.len());
                    v.extend_from_slice(&records[..at]);
                    v
                });
                o.extend_from_slice(&new);
            }
            None => {
                if let Some(o) = out.as_mut() {
                    o.extend_from_slice(b);
                }
            }
        }
        at += info.size_bytes;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use tidelog_protocol::batch::{self, ProducerFields, RecordRef};

    use super::*;

    fn values(set: &[u8]) -> Vec<(Compression, Vec<Vec<u8>>)> {
        let infos = batch::validate_record_set(set, usize::MAX).expect("valid record set");
        let mut at = 0;
        let mut out = Vec::new();
        for info in infos {
            let b = &set[at..at + info.size_bytes];
            let h = BatchHeader::parse(b).unwrap();
            let plain = super::super::compaction::plain_view(b).unwrap();
            let recs = super::super::compaction::parse_records(&plain).unwrap();
            out.push((h.compression(), recs.iter().map(|r| r.value.unwrap_or_default().to_vec()).collect()));
            at += info.size_bytes;
        }
        out
    }

    #[test]
    fn every_codec_round_trips_the_same_records() {
        let vals: Vec<Vec<u8>> = (0..50).map(|i| format!("value-{i}-{}", "z".repeat(i)).into_bytes()).collect();
        let recs: Vec<RecordRef<'_>> = vals
            .iter()
            .map(|v| RecordRef { key: Some(b"k"), value: Some(v), headers: &[], timestamp_delta_ms: 3 })
            .collect();
        let plain = batch::build_batch(&recs, 1_000, ProducerFields::default());
        let want: Vec<Vec<u8>> = vals.clone();
        let mut set = plain.to_vec();
        for (codec, level) in [
            (Compression::Gzip, Some(9)),
            (Compression::Lz4, Some(12)),
            (Compression::Zstd, Some(19)),
            (Compression::Snappy, None),
            (Compression::Gzip, None),
            (Compression::None, None),
        ] {
            let infos = batch::validate_record_set(&set, usize::MAX).unwrap();
            let next = recompress_set(&set, &infos, Target::Codec { codec, level }).unwrap().expect("rewritten");
            assert_eq!(values(&next), vec![(codec, want.clone())], "{codec:?}");
            let h = BatchHeader::parse(&next).unwrap();
            let h0 = BatchHeader::parse(&plain).unwrap();
            assert_eq!(
                (h.base_offset(), h.last_offset(), h.max_timestamp_ms(), h.record_count()),
                (h0.base_offset(), h0.last_offset(), h0.max_timestamp_ms(), h0.record_count())
            );
            // Already under the target codec: nothing to do.
            let infos = batch::validate_record_set(&next, usize::MAX).unwrap();
            assert_eq!(recompress_set(&next, &infos, Target::Codec { codec, level }).unwrap(), None);
            set = next;
        }
        let infos = batch::validate_record_set(&set, usize::MAX).unwrap();
        assert_eq!(recompress_set(&set, &infos, Target::Producer).unwrap(), None);
    }

    #[test]
    fn target_from_config() {
        let levels = |name: &str| if name == "compression.gzip.level" { -1 } else { 7 };
        assert_eq!(Target::from_config("producer", levels), Target::Producer);
        assert_eq!(Target::from_config("gzip", levels), Target::Codec { codec: Compression::Gzip, level: None });
        assert_eq!(Target::from_config("zstd", levels), Target::Codec { codec: Compression::Zstd, level: Some(7) });
        assert_eq!(
            Target::from_config("uncompressed", levels),
            Target::Codec { codec: Compression::None, level: None }
        );
    }
}
