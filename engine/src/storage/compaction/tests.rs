//! Compaction tests on a real O_DIRECT-capable dir, inside a glommio executor:
//! key selection, rewritten batches, and recovery of a swap interrupted at
//! each step.

use bytes::Bytes;
use tidelog_protocol::batch::{ProducerFields, RecordRef};
use tidelog_protocol::{Epoch, PartitionId, ProducerId};

use super::*;
use crate::storage::partition::{self, LogSettings, PartitionLog};
use crate::storage::segment::SegmentSettings;

fn settings() -> LogSettings {
    LogSettings {
        segment: SegmentSettings {
            index_interval_bytes: 1,
            preallocate_bytes: 64 * 1024,
            zero_ahead_bytes: 0,
            // Every batch below is ~100 bytes: one batch per segment.
            segment_bytes: 150,
            index_bytes_max: 10 << 20,
            flush_write_bytes_max: 8192,
        },
        roll_ms: u64::MAX / 2,
        roll_jitter_ms: 0,
        cache_bytes_max: 1 << 20,
    }
}

fn keyed(records: &[(&str, Option<&str>)], ts: i64, producer: ProducerFields) -> Bytes {
    let recs: Vec<RecordRef<'_>> = records
        .iter()
        .map(|(k, v)| RecordRef {
            key: Some(k.as_bytes()),
            value: v.map(|v| v.as_bytes()),
            headers: &[],
            timestamp_delta_ms: 0,
        })
        .collect();
    batch::build_batch(&recs, ts, producer)
}

use crate::run_on_executor as run;

type Row = (i64, String, Option<String>);

/// Every batch in `log` from offset 0, in order, each checked with its CRC.
async fn all_batches(log: &SharedLog) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut offset = Offset(0);
    loop {
        let r = partition::read(log, offset, 1 << 20, true).await.unwrap();
        if r.bytes == 0 {
            return out;
        }
        for chunk in &r.chunks {
            let mut at = 0;
            while at + BATCH_HEADER_BYTES <= chunk.len() {
                let h = BatchHeader::parse(&chunk[at..]).unwrap();
                let b = chunk.slice(at..at + h.size_bytes());
                batch::validate(&b, usize::MAX).unwrap();
                offset = h.last_offset().next();
                at += h.size_bytes();
                out.push(b);
            }
        }
    }
}

/// Every record in `log` from offset 0, in order.
async fn read_all(log: &SharedLog) -> Vec<Row> {
    let mut out = Vec::new();
    for b in all_batches(log).await {
        let plain = plain_view(&b).unwrap();
        for rec in parse_records(&plain).unwrap() {
            out.push((
                rec.offset.0,
                String::from_utf8(rec.key.unwrap().to_vec()).unwrap(),
                rec.value.map(|v| String::from_utf8(v.to_vec()).unwrap()),
            ));
        }
    }
    out
}

fn rows(expected: &[(i64, &str, Option<&str>)]) -> Vec<Row> {
    expected.iter().map(|(o, k, v)| (*o, k.to_string(), v.map(|v| v.to_string()))).collect()
}

const TS: i64 = 1_700_000_000_000;

/// `b` (uncompressed, as `keyed` builds it) with its records section
/// compressed by `codec` and the attributes' codec bits set, as a client
/// sends it. Built with kafka-protocol directly, not with the code under test.
fn compress(b: &[u8], codec: Compression) -> Bytes {
    use kafka_protocol::compression::{Compressor, Gzip, Lz4, Zstd};
    let records = &b[BATCH_HEADER_BYTES..];
    let fill = |buf: &mut bytes::BytesMut| {
        buf.extend_from_slice(records);
        Ok(())
    };
    let mut body = bytes::BytesMut::new();
    let (bits, done) = match codec {
        Compression::None => return Bytes::copy_from_slice(b),
        Compression::Gzip => (1i16, Gzip::compress(&mut body, fill)),
        Compression::Lz4 => (3, Lz4::compress(&mut body, fill)),
        Compression::Zstd => (4, Zstd::compress(&mut body, fill)),
        other => panic!("no test codec {other:?}"),
    };
    done.unwrap();
    let mut out = b[..BATCH_HEADER_BYTES].to_vec();
    out.extend_from_slice(&body);
    let attributes = i16::from_be_bytes([out[21], out[22]]) | bits;
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    let len = (out.len() - BATCH_LOG_OVERHEAD_BYTES) as i32;
    out[8..12].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c::crc32c(&out[21..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(out)
}

/// The records section of a compressed batch, decompressed by kafka-protocol.
fn decompress(b: &[u8]) -> Vec<u8> {
    use kafka_protocol::compression::{Decompressor, Gzip, Lz4, Zstd};
    let h = BatchHeader::parse(b).unwrap();
    let mut src = Bytes::copy_from_slice(&b[BATCH_HEADER_BYTES..h.size_bytes()]);
    let take = |r: &mut Bytes| Ok(r.to_vec());
    match h.compression() {
        Compression::None => src.to_vec(),
        Compression::Gzip => Gzip::decompress(&mut src, take).unwrap(),
        Compression::Lz4 => Lz4::decompress(&mut src, take).unwrap(),
        Compression::Zstd => Zstd::decompress(&mut src, take).unwrap(),
        other => panic!("no test codec {other:?}"),
    }
}

/// Offsets 0-2, 3-5, 6-7 in sealed segments; 8-9 in the active one.
async fn sample_log(dir: &Path) -> SharedLog {
    sample_log_with(dir, [Compression::None; 4]).await
}

/// `sample_log` with each of its four batches compressed by `codecs[i]`.
async fn sample_log_with(dir: &Path, codecs: [Compression; 4]) -> SharedLog {
    let log = PartitionLog::open("t".into(), PartitionId(0), dir.to_path_buf(), settings()).await.unwrap();
    let p = ProducerFields::default();
    let batches = [
        keyed(&[("a", Some("a1")), ("b", Some("b1")), ("c", Some("c1"))], TS, p),
        keyed(&[("a", Some("a2")), ("b", Some("b2")), ("d", Some("d1"))], TS, p),
        keyed(&[("b", None), ("a", Some("a3"))], TS, p),
        keyed(&[("c", Some("c2")), ("e", Some("e1"))], TS, p),
    ];
    for (b, codec) in batches.iter().zip(codecs) {
        let b = compress(b, codec);
        let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
        log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
        partition::flush(&log).await.unwrap();
    }
    partition::flush(&log).await.unwrap();
    log
}

fn everything() -> Vec<Row> {
    rows(&[
        (0, "a", Some("a1")),
        (1, "b", Some("b1")),
        (2, "c", Some("c1")),
        (3, "a", Some("a2")),
        (4, "b", Some("b2")),
        (5, "d", Some("d1")),
        (6, "b", None),
        (7, "a", Some("a3")),
        (8, "c", Some("c2")),
        (9, "e", Some("e1")),
    ])
}

fn compacted() -> Vec<Row> {
    rows(&[(5, "d", Some("d1")), (6, "b", None), (7, "a", Some("a3")), (8, "c", Some("c2")), (9, "e", Some("e1"))])
}

fn params(now_ms: i64) -> CleanParams {
    CleanParams {
        now_ms,
        min_compaction_lag_ms: 0,
        delete_retention_ms: 1_000,
        io_max_bytes_per_second: 0,
        min_cleanable_ratio: 0.5,
        max_compaction_lag_ms: i64::MAX,
        dedupe_buffer_bytes: 1 << 30,
    }
}

fn stray_cleaned(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(CLEANED_SUFFIX))
        .collect()
}

#[test]
fn keeps_latest_per_key_then_expires_tombstones() {
    run(|| async {
        let dir = crate::test_dir("compaction-keys");
        let log = sample_log(&dir).await;
        assert_eq!(log.borrow().segment_count(), 4);
        assert_eq!(read_all(&log).await, everything());
        let never = || false;

        // Inside min.compaction.lag.ms nothing is cleanable.
        let young = CleanParams { min_compaction_lag_ms: i64::MAX, ..params(TS) };
        assert_eq!(clean_log(&log, &young, &never).await.unwrap(), None);

        let now = TS + 10;
        let done = clean_log(&log, &params(now), &never).await.unwrap().unwrap();
        // a@0 b@1 c@2 (c's latest is in the active segment), a@3 b@4; what
        // is left of the three sealed segments fits segment.bytes: one file.
        assert_eq!(done.records_removed, 5);
        assert_eq!((done.segments_cleaned, done.segments_merged, done.steps), (3, 2, 1));
        assert!(done.bytes_reclaimed > 0);
        assert_eq!(read_all(&log).await, compacted(), "latest per key, tombstone kept, offsets kept");
        assert_eq!(log.borrow().high_watermark, Offset(10));
        assert_eq!(log.borrow().segment_count(), 2);
        let cp = read_checkpoint(&dir);
        assert_eq!(cp.len(), 1);
        assert_eq!(cp[&0], CleanedSegment { first_cleaned_at_ms: now, tombstones: 1 });

        // Nothing dirty, tombstones not due: no pass.
        assert_eq!(clean_log(&log, &params(now + 500), &never).await.unwrap(), None);
        // After delete.retention.ms the tombstone goes.
        let done = clean_log(&log, &params(now + 1_001), &never).await.unwrap().unwrap();
        assert_eq!(done.records_removed, 1);
        let expired = rows(&[(5, "d", Some("d1")), (7, "a", Some("a3")), (8, "c", Some("c2")), (9, "e", Some("e1"))]);
        assert_eq!(read_all(&log).await, expired);
        assert_eq!(read_checkpoint(&dir)[&0], CleanedSegment { first_cleaned_at_ms: now, tombstones: 0 });

        // Survives a reopen: sealed segments with their new indexes.
        drop(log);
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        assert_eq!(read_all(&log).await, expired);
        assert_eq!(log.borrow().high_watermark, Offset(10));
        assert!(log.borrow().inactive_segments().iter().all(|s| s.sealed));
        let b = keyed(&[("f", Some("f1"))], TS, ProducerFields::default());
        let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
        assert_eq!(log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0)), (Offset(10), Offset(10)));
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn rewritten_batch_validates_and_keeps_offsets_and_producer() {
    let producer = ProducerFields { producer_id: 7, producer_epoch: 1, base_sequence: 5 };
    let b = keyed(&[("k0", Some("v0")), ("k1", Some("v1")), ("k2", None), ("k3", Some("v3"))], TS, producer);
    let mut b = b.to_vec();
    batch::assign_offset(&mut b, Offset(100), Epoch(3));
    let records = parse_records(&b).unwrap();
    assert_eq!(records.iter().map(|r| r.offset.0).collect::<Vec<_>>(), vec![100, 101, 102, 103]);
    let kept: Vec<&[u8]> = vec![records[1].raw, records[2].raw];
    let out = rebuild_batch(&b, &kept);
    let info = batch::validate(&out, usize::MAX).expect("valid CRC and counts");
    assert_eq!(info.size_bytes, out.len());
    assert_eq!(info.record_count, 2);
    let h = BatchHeader::parse(&out).unwrap();
    assert_eq!((h.base_offset(), h.last_offset()), (Offset(100), Offset(103)));
    assert_eq!((h.producer_id().0, h.producer_epoch(), h.base_sequence()), (7, 1, 5));
    assert_eq!(h.leader_epoch(), Epoch(3));
    let again = parse_records(&out).unwrap();
    assert_eq!(again.iter().map(|r| r.offset.0).collect::<Vec<_>>(), vec![101, 102]);
    assert_eq!(again[0].key, Some(&b"k1"[..]));
    assert_eq!(again[0].value, Some(&b"v1"[..]));
    assert_eq!(again[1].value, None);
    // An empty rebuild is a valid header-only batch (producer state).
    let empty = rebuild_batch(&b, &[]);
    assert_eq!(batch::validate(&empty, usize::MAX).unwrap().record_count, 0);
    assert!(parse_records(&empty).unwrap().is_empty());
    // Garbage is refused, not panicked on.
    let mut bad = out.clone();
    bad[BATCH_HEADER_BYTES] = 0x7f;
    assert!(parse_records(&bad).is_err());
}

/// Codec of every batch in `log`, by base offset.
async fn codecs(log: &SharedLog) -> Vec<(i64, Compression)> {
    let mut out = Vec::new();
    for b in all_batches(log).await {
        let h = BatchHeader::parse(&b).unwrap();
        out.push((h.base_offset().0, h.compression()));
    }
    out
}

/// A log of gzip, lz4, plain and zstd batches compacts exactly like the
/// plain one: keys are read from every batch, rewritten batches keep their
/// codec, and tombstones expire (no compressed batch blocks them any more).
#[test]
fn compressed_batches_are_compacted_and_keep_their_codec() {
    run(|| async {
        use Compression::{Gzip, Lz4, Zstd};
        let dir = crate::test_dir("compaction-compressed");
        let log = sample_log_with(&dir, [Gzip, Lz4, Compression::None, Zstd]).await;
        assert_eq!(log.borrow().segment_count(), 4);
        assert_eq!(read_all(&log).await, everything());
        assert_eq!(codecs(&log).await, vec![(0, Gzip), (3, Lz4), (6, Compression::None), (8, Zstd)]);

        let sources: Vec<(PathBuf, u64)> = log
            .borrow()
            .inactive_segments()
            .iter()
            .chain(std::iter::once(&log.borrow().active_segment_info()))
            .map(|s| (crate::storage::segment::log_path(&dir, s.base_offset), s.bytes))
            .collect();
        let (map, _) = build_key_map(&sources, Offset(0), usize::MAX).unwrap();
        assert_eq!(map.opaque_batches, 0);
        let mut latest: Vec<(String, i64)> =
            map.latest.iter().map(|(k, o)| (String::from_utf8(k.clone()).unwrap(), o.0)).collect();
        latest.sort();
        let want: Vec<(String, i64)> =
            [("a", 7), ("b", 6), ("c", 8), ("d", 5), ("e", 9)].iter().map(|(k, o)| (k.to_string(), *o)).collect();
        assert_eq!(latest, want);

        let now = TS + 10;
        let done = clean_log(&log, &params(now), &|| false).await.unwrap().unwrap();
        assert_eq!(done.records_removed, 5);
        assert_eq!(done.segments_cleaned, 2);
        assert_eq!(read_all(&log).await, compacted());
        // Batch 0 (all removed, no producer id) is gone; batch 3 keeps lz4.
        assert_eq!(codecs(&log).await, vec![(3, Lz4), (6, Compression::None), (8, Zstd)]);

        let done = clean_log(&log, &params(now + 1_001), &|| false).await.unwrap().unwrap();
        assert_eq!(done.records_removed, 1, "the tombstone expires");
        let expired = rows(&[(5, "d", Some("d1")), (7, "a", Some("a3")), (8, "c", Some("c2")), (9, "e", Some("e1"))]);
        assert_eq!(read_all(&log).await, expired);
        drop(log);
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        assert_eq!(read_all(&log).await, expired);
        assert_eq!(log.borrow().high_watermark, Offset(10));
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn rewritten_compressed_batch_keeps_codec_header_and_kept_records() {
    let producer = ProducerFields { producer_id: 7, producer_epoch: 1, base_sequence: 5 };
    let plain = keyed(&[("k0", Some("v0")), ("k1", Some("v1")), ("k2", None), ("k3", Some("v3"))], TS, producer);
    for codec in [Compression::Gzip, Compression::Lz4, Compression::Zstd] {
        let mut b = compress(&plain, codec).to_vec();
        batch::assign_offset(&mut b, Offset(100), Epoch(3));
        batch::validate(&b, usize::MAX).unwrap();
        let view = plain_view(&b).unwrap();
        let records = parse_records(&view).unwrap();
        assert_eq!(records.iter().map(|r| r.offset.0).collect::<Vec<_>>(), vec![100, 101, 102, 103], "{codec:?}");
        let kept: Vec<&[u8]> = vec![records[1].raw, records[2].raw];
        let out = rebuild_batch(&b, &kept);
        let info = batch::validate(&out, usize::MAX).expect("valid CRC and counts");
        assert_eq!((info.size_bytes, info.record_count, info.compression), (out.len(), 2, codec));
        let (h, orig) = (BatchHeader::parse(&out).unwrap(), BatchHeader::parse(&b).unwrap());
        assert_eq!(h.attributes(), orig.attributes(), "{codec:?}");
        assert_eq!((h.base_offset(), h.last_offset()), (Offset(100), Offset(103)));
        assert_eq!((h.producer_id().0, h.producer_epoch(), h.base_sequence()), (7, 1, 5));
        assert_eq!((h.base_timestamp_ms(), h.max_timestamp_ms()), (orig.base_timestamp_ms(), orig.max_timestamp_ms()));
        assert_eq!(h.leader_epoch(), Epoch(3));
        // The records section decompresses to exactly the kept records.
        assert_eq!(decompress(&out), kept.concat(), "{codec:?}");
        let again_view = plain_view(&out).unwrap();
        let again = parse_records(&again_view).unwrap();
        assert_eq!(again.iter().map(|r| r.offset.0).collect::<Vec<_>>(), vec![101, 102]);
        assert_eq!((again[0].key, again[0].value), (Some(&b"k1"[..]), Some(&b"v1"[..])));
        assert_eq!((again[1].key, again[1].value), (Some(&b"k2"[..]), None));
        // Emptied: a bare header, codec bits cleared, producer fields kept.
        let empty = rebuild_batch(&b, &[]);
        let info = batch::validate(&empty, usize::MAX).unwrap();
        assert_eq!((info.record_count, info.compression, empty.len()), (0, Compression::None, BATCH_HEADER_BYTES));
        assert_eq!(BatchHeader::parse(&empty).unwrap().producer_id().0, 7);
    }
    // A codec that cannot be recompressed falls back to uncompressed, codec bits cleared.
    let mut odd = plain.to_vec();
    odd[22] |= 0x05;
    let records = parse_records(&plain).unwrap();
    let out = rebuild_batch(&odd, &[records[0].raw]);
    let info = batch::validate(&out, usize::MAX).unwrap();
    assert_eq!((info.record_count, info.compression), (1, Compression::None));
    assert_eq!(BatchHeader::parse(&out).unwrap().attributes() & 0x07, 0);
    assert_eq!(parse_records(&out).unwrap()[0].key, Some(&b"k0"[..]));
    // A corrupt compressed section is an error, not a panic.
    let mut bad = compress(&plain, Compression::Lz4).to_vec();
    bad[BATCH_HEADER_BYTES + 2] ^= 0xff;
    assert!(plain_view(&bad).is_err());
}

/// As Kafka: a batch of an idempotent producer left without records keeps
/// its bare header only while it is the producer's last batch (producer
/// state is rebuilt from batch headers); earlier emptied ones go.
#[test]
fn idempotent_batches_left_empty_keep_only_the_last_header() {
    run(|| async {
        let dir = crate::test_dir("compaction-pid");
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        let p9 = ProducerFields { producer_id: 9, producer_epoch: 0, base_sequence: 0 };
        let p11 = ProducerFields { producer_id: 11, producer_epoch: 3, base_sequence: 0 };
        for b in [
            keyed(&[("a", Some("a1")), ("b", Some("b1"))], TS, p9),
            keyed(&[("a", Some("a2"))], TS, ProducerFields { base_sequence: 2, ..p9 }),
            keyed(&[("b", Some("b2")), ("a", Some("a3"))], TS, p11),
            keyed(&[("x", Some("x"))], TS, ProducerFields { base_sequence: 2, ..p11 }),
        ] {
            let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
            log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
            partition::flush(&log).await.unwrap();
        }
        let done = clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
        assert_eq!(done.records_removed, 3);
        let want = rows(&[(3, "b", Some("b2")), (4, "a", Some("a3")), (5, "x", Some("x"))]);
        assert_eq!(read_all(&log).await, want);
        // Producer 9's first batch (offsets 0-1) is gone; its last (offset 2,
        // emptied) stays as a bare header with its sequence.
        let headers: Vec<(i64, i64, i32, i64, i32)> = all_batches(&log)
            .await
            .iter()
            .map(|b| {
                let h = BatchHeader::parse(b).unwrap();
                (h.base_offset().0, h.last_offset().0, h.record_count(), h.producer_id().0, h.base_sequence())
            })
            .collect();
        assert_eq!(headers, vec![(2, 2, 0, 9, 2), (3, 4, 2, 11, 0), (5, 5, 1, 11, 2)]);
        // A second pass changes nothing: the header is still producer 9's last.
        clean_log(&log, &params(TS + 1), &|| false).await.unwrap();
        assert_eq!(all_batches(&log).await.len(), 3);
        // Producer state rebuilt from the log alone (no snapshot) still knows producer 9.
        drop(log);
        let _ = std::fs::remove_file(dir.join(crate::storage::producer_state::SNAPSHOT_FILE));
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        let e = log.borrow().producers.get(tidelog_protocol::ProducerId(9)).cloned().expect("producer 9 known");
        assert_eq!((e.epoch, e.last_seq), (0, 2));
        assert_eq!(read_all(&log).await, want);
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

fn log_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".log") || n.ends_with(CLEANED_SUFFIX) || n.ends_with(SWAP_SUFFIX))
        .collect();
    out.sort();
    out
}

/// A log of `n` one-batch segments (the last one active), batch `i` holding
/// `key(i)` -> `v<i>` at offset `i`.
async fn one_batch_segments(dir: &Path, n: i64, key: impl Fn(i64) -> String) -> SharedLog {
    let log = PartitionLog::open("t".into(), PartitionId(0), dir.to_path_buf(), settings()).await.unwrap();
    log.borrow_mut().settings.segment.segment_bytes = 1;
    for i in 0..n {
        let (k, v) = (key(i), format!("v{i}"));
        let b = keyed(&[(k.as_str(), Some(v.as_str()))], TS, ProducerFields::default());
        let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
        log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
        partition::flush(&log).await.unwrap();
    }
    assert_eq!(log.borrow().segment_count(), n as usize);
    log
}

/// Small cleaned segments merge into one file per `segment.bytes`: the
/// sealed segments of a 3-key log become one, keeping the latest per key;
/// with nothing to remove, groups stop at `segment.bytes`.
#[test]
fn small_cleaned_segments_are_merged() {
    run(|| async {
        let dir = crate::test_dir("compaction-merge");
        let log = one_batch_segments(&dir, 12, |i| format!("k{}", i % 3)).await;
        assert_eq!(log_files(&dir).len(), 12);
        log.borrow_mut().settings.segment.segment_bytes = 1 << 20;
        let done = clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
        // Offsets 0-8 go (k0 k1 k2 written again later); 9 and 10 stay; 11 is active.
        assert_eq!((done.records_removed, done.segments_cleaned, done.segments_merged), (9, 11, 10));
        let want = rows(&[(9, "k0", Some("v9")), (10, "k1", Some("v10")), (11, "k2", Some("v11"))]);
        assert_eq!(read_all(&log).await, want);
        assert_eq!(log.borrow().segment_count(), 2);
        assert_eq!(log_files(&dir), vec![format!("{:020}.log", 0), format!("{:020}.log", 11)]);
        let info = log.borrow().inactive_segments();
        assert_eq!((info[0].base_offset, info[0].next_offset, info[0].sealed), (Offset(0), Offset(11), true));
        assert_eq!(read_checkpoint(&dir).keys().copied().collect::<Vec<_>>(), vec![0]);
        // Fetches from inside the merged range land on the next record.
        let r = partition::read(&log, Offset(4), 1 << 20, true).await.unwrap();
        assert_eq!(BatchHeader::parse(&r.chunks[0]).unwrap().base_offset(), Offset(9));
        drop(log);
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        assert_eq!(read_all(&log).await, want);
        assert_eq!((log.borrow().segment_count(), log.borrow().high_watermark), (2, Offset(12)));
        assert!(log.borrow().inactive_segments().iter().all(|s| s.sealed));
        drop(log);
        std::fs::remove_dir_all(&dir).unwrap();

        // Distinct keys: nothing removed, groups of 3 batches per segment.bytes.
        let dir = crate::test_dir("compaction-merge-limit");
        let log = one_batch_segments(&dir, 12, |i| format!("u{i:02}")).await;
        let sizes: Vec<u64> = log.borrow().inactive_segments().iter().map(|s| s.bytes).collect();
        let batch_bytes = sizes[0];
        log.borrow_mut().settings.segment.segment_bytes = 3 * batch_bytes + batch_bytes / 2;
        let done = clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
        // 11 sealed segments: groups 0-2, 3-5, 6-8, 9-10.
        assert_eq!((done.records_removed, done.segments_cleaned, done.segments_merged), (0, 11, 7));
        let bases: Vec<(i64, i64, u64)> =
            log.borrow().inactive_segments().iter().map(|s| (s.base_offset.0, s.next_offset.0, s.bytes)).collect();
        let b = |from: usize, to: usize| sizes[from..to].iter().sum::<u64>();
        assert_eq!(bases, vec![(0, 3, b(0, 3)), (3, 6, b(3, 6)), (6, 9, b(6, 9)), (9, 11, b(9, 11))]);
        let all: Vec<Row> = (0..12).map(|i| (i, format!("u{i:02}"), Some(format!("v{i}")))).collect();
        assert_eq!(read_all(&log).await, all);
        assert_eq!(log_files(&dir).len(), 5);
        // Nothing dirty: no pass; already full groups are not merged further.
        assert_eq!(clean_log(&log, &params(TS), &|| false).await.unwrap(), None);
        drop(log);
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        assert_eq!(read_all(&log).await, all);
        assert_eq!(log.borrow().segment_count(), 5);
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// A group stops before its offset index would pass its limit; the
/// segment that overflowed is cut off the file again.
#[test]
fn merged_group_stops_at_the_index_limit() {
    run(|| async {
        let dir = crate::test_dir("compaction-merge-index");
        let log = one_batch_segments(&dir, 6, |i| format!("u{i}")).await;
        let segments = log.borrow().inactive_segments();
        let members: Vec<Member> = segments
            .iter()
            .map(|s| Member { base: s.base_offset, next_offset: s.next_offset, bytes: s.bytes, keep_tombstones: true })
            .collect();
        let map = KeyMap::default();
        let limits = GroupLimits { bytes_max: 1 << 20, index_bytes_max: 2 * OFFSET_ENTRY_BYTES };
        // Index every batch: two entries fit, the third segment's does not.
        let r = rewrite_group(&dir, &members, &map, 1, limits).unwrap();
        assert!(r.changed);
        assert_eq!((r.segments, r.end, r.index.offsets.len(), r.records_removed), (2, Offset(2), 2, 0));
        assert_eq!((r.records_before, r.batches_after), (2, 2));
        assert_eq!(r.bytes_after, segments[0].bytes + segments[1].bytes);
        let cleaned = cleaned_path(&crate::storage::segment::log_path(&dir, Offset(0)));
        assert_eq!(std::fs::metadata(&cleaned).unwrap().len(), r.bytes_after, "the overflow is cut off the file");
        std::fs::remove_file(cleaned).unwrap();
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// Keys of `i`: 25 keys over 40 batches of 3 records, some tombstones.
async fn many_keys_log(dir: &Path) -> SharedLog {
    let log = PartitionLog::open("t".into(), PartitionId(0), dir.to_path_buf(), settings()).await.unwrap();
    for i in 0..40 {
        let recs: Vec<(String, Option<String>)> = (0..3)
            .map(|j| {
                let n = (i * 7 + j * 3) % 25;
                (format!("k{n:02}"), if (i + j) % 11 == 0 { None } else { Some(format!("v{i}.{j}")) })
            })
            .collect();
        let refs: Vec<(&str, Option<&str>)> = recs.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let b = keyed(&refs, TS, ProducerFields::default());
        let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
        log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
        partition::flush(&log).await.unwrap();
    }
    log
}

/// A key map bounded to a few keys cleans in several steps, never over its
/// bound, and leaves exactly what one unbounded step leaves, tombstone
/// expiry included.
#[test]
fn tiny_dedupe_buffer_gives_the_single_pass_result() {
    run(|| async {
        let (d1, d2) = (crate::test_dir("compaction-map-big"), crate::test_dir("compaction-map-tiny"));
        let (big, tiny) = (many_keys_log(&d1).await, many_keys_log(&d2).await);
        let original = read_all(&big).await;
        assert_eq!(original.len(), 120);
        assert_eq!(read_all(&tiny).await, original);

        // The map itself: never over its bound, and it says where it stopped.
        let sources: Vec<(PathBuf, u64)> = tiny
            .borrow()
            .inactive_segments()
            .iter()
            .map(|s| (crate::storage::segment::log_path(&d2, s.base_offset), s.bytes))
            .collect();
        const TINY: usize = 1000;
        let (map, _) = build_key_map(&sources, Offset(0), TINY).unwrap();
        assert!(map.memory_bytes() <= TINY, "{} > {TINY}", map.memory_bytes());
        let stop = map.covered_to.expect("25 keys do not fit in 1000 bytes");
        assert!(map.latest.len() >= 7 && map.latest.len() < 25, "{} keys", map.latest.len());
        assert!(map.latest.values().all(|o| *o < stop));
        let (whole, _) = build_key_map(&sources, Offset(0), usize::MAX).unwrap();
        assert_eq!(whole.latest.len(), 25);
        assert!(whole.memory_bytes() > TINY);
        assert!(whole.covered_to.is_none());

        let tiny_params = |now| CleanParams { dedupe_buffer_bytes: TINY, ..params(now) };
        let one = clean_log(&big, &params(TS), &|| false).await.unwrap().unwrap();
        let many = clean_log(&tiny, &tiny_params(TS), &|| false).await.unwrap().unwrap();
        assert_eq!(one.steps, 1);
        assert!(many.steps > 1, "{many:?}");
        let cleaned = read_all(&big).await;
        assert!(cleaned.len() < original.len() && cleaned.len() >= 25, "{} records", cleaned.len());
        assert_eq!(read_all(&tiny).await, cleaned, "several steps = one step");
        assert!(cleaned.iter().any(|(_, _, v)| v.is_none()), "some tombstones kept");
        // Every key's last record is the one of the original log.
        let last = |rows: &[Row]| {
            let mut m = std::collections::BTreeMap::new();
            for (o, k, v) in rows {
                m.insert(k.clone(), (*o, v.clone()));
            }
            m
        };
        assert_eq!(last(&cleaned), last(&original));

        // Tombstones expire the same way.
        let one = clean_log(&big, &params(TS + 1_001), &|| false).await.unwrap().unwrap();
        let many = clean_log(&tiny, &tiny_params(TS + 1_001), &|| false).await.unwrap().unwrap();
        assert_eq!(one.records_removed, many.records_removed);
        assert!(one.records_removed > 0);
        let expired = read_all(&big).await;
        assert_eq!(read_all(&tiny).await, expired);
        assert!(expired.iter().filter(|(o, _, _)| *o < 117).all(|(_, _, v)| v.is_some()));
        drop((big, tiny));
        std::fs::remove_dir_all(d1).unwrap();
        std::fs::remove_dir_all(d2).unwrap();
    });
}

/// A bound too small for one key is an error naming the setting, not a loop.
#[test]
fn dedupe_buffer_too_small_for_one_key_is_an_error() {
    run(|| async {
        let dir = crate::test_dir("compaction-map-none");
        let log = sample_log(&dir).await;
        let p = CleanParams { dedupe_buffer_bytes: 64, ..params(TS) };
        let e = clean_log(&log, &p, &|| false).await.unwrap_err();
        assert!(e.to_string().contains("log.cleaner.dedupe.buffer.size"), "{e}");
        assert_eq!(read_all(&log).await, everything());
        assert!(stray_cleaned(&dir).is_empty());
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// A crash after each step of the swap of the merged segments 0, 3 and 6
/// (into 0): the reopened log holds either the old segments or the merged
/// one, nothing is lost, no `.log.cleaned` or `.swap` is left, and the
/// next pass finishes the job.
#[test]
fn interrupted_swap_recovers_at_every_step() {
    run(|| async {
        let steps = [
            None,
            Some(SwapStep::Committed),
            Some(SwapStep::Replaced),
            Some(SwapStep::Renamed),
            Some(SwapStep::Indexed),
        ];
        for until in steps {
            let dir = crate::test_dir("compaction-crash");
            let log = sample_log(&dir).await;
            let segments = log.borrow().inactive_segments();
            let sources: Vec<(PathBuf, u64)> = segments
                .iter()
                .chain(std::iter::once(&log.borrow().active_segment_info()))
                .map(|s| (crate::storage::segment::log_path(&dir, s.base_offset), s.bytes))
                .collect();
            let (map, _) = build_key_map(&sources, Offset(0), usize::MAX).unwrap();
            let members: Vec<Member> = segments
                .iter()
                .map(|s| Member {
                    base: s.base_offset,
                    next_offset: s.next_offset,
                    bytes: s.bytes,
                    keep_tombstones: true,
                })
                .collect();
            let r = rewrite_group(&dir, &members, &map, 1, GroupLimits::for_segment_bytes(1 << 20)).unwrap();
            assert!(r.changed);
            assert_eq!((r.segments, r.end, r.records_removed, r.batches_dropped), (3, Offset(8), 5, 1));
            assert_eq!(stray_cleaned(&dir).len(), 1);
            if let Some(step) = until {
                install_cleaned(&dir, Offset(0), r.end, &r.index, step).unwrap();
            }
            let committed = until.is_some();
            // "Crash": drop everything in memory and reopen from disk.
            drop(log);
            let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
            let names = log_files(&dir);
            assert!(names.iter().all(|n| n.ends_with(".log")), "{until:?}: left behind: {names:?}");
            let want = if committed { compacted() } else { everything() };
            assert_eq!(read_all(&log).await, want, "{until:?}");
            assert_eq!(log.borrow().segment_count(), if committed { 2 } else { 4 }, "{until:?}");
            assert_eq!(log.borrow().high_watermark, Offset(10), "{until:?}");
            // A rescanned segment is sealed again by the next flush, then cleaned.
            partition::flush(&log).await.unwrap();
            assert!(log.borrow().inactive_segments().iter().all(|s| s.sealed), "{until:?}");
            log.borrow_mut().settings.segment.segment_bytes = 1 << 20;
            if clean_log(&log, &params(TS), &|| false).await.unwrap().is_none() {
                assert!(committed, "{until:?}: an uncleaned log must be cleaned");
            }
            assert_eq!(read_all(&log).await, compacted(), "{until:?}");
            assert_eq!(log.borrow().segment_count(), 2, "{until:?}");
            drop(log);
            let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
            assert_eq!(read_all(&log).await, compacted(), "{until:?} after reopen");
            assert_eq!(log_files(&dir), vec![format!("{:020}.log", 0), format!("{:020}.log", 8)], "{until:?}");
            drop(log);
            std::fs::remove_dir_all(dir).unwrap();
        }
    });
}

#[test]
fn cleanable_range_and_dirty_ratio() {
    let seg = |base: i64, next: i64, bytes: u64, ts: i64, sealed: bool| SegmentInfo {
        base_offset: Offset(base),
        next_offset: Offset(next),
        bytes,
        max_timestamp_ms: ts,
        first_timestamp_ms: ts - 500,
        sealed,
    };
    let inactive = [seg(0, 10, 100, 1_000, true), seg(10, 20, 100, 5_000, true), seg(20, 30, 100, 1_000, true)];
    let active = seg(30, 31, 10, 9_000, false);
    // Lag 2000 at now 6000: the second segment is too young, and so is everything after it.
    assert_eq!(cleanable(&inactive, &active, 6_000, 2_000).len(), 1);
    assert_eq!(cleanable(&inactive, &active, 6_000, 0).len(), 3);
    // The last sealed segment waits until its successor holds durable data.
    let empty_active = seg(30, 30, 0, -1, false);
    assert_eq!(cleanable(&inactive, &empty_active, 6_000, 0).len(), 2);
    let unsealed = [seg(0, 10, 100, 1, true), seg(10, 20, 100, 1, false)];
    assert_eq!(cleanable(&unsealed, &active, 6_000, 0).len(), 1);
    // Emptied sealed segments do not stop the range.
    let emptied = [seg(0, 10, 0, -1, true), seg(10, 20, 0, -1, true), seg(20, 30, 100, 1_000, true)];
    assert_eq!(cleanable(&emptied, &active, 6_000, 0).len(), 3);

    let p = params(10_000);
    let mut cp = Checkpoint::new();
    assert!(worth_cleaning(&inactive, &cp, &p), "all dirty");
    cp.insert(0, CleanedSegment { first_cleaned_at_ms: 9_500, tombstones: 3 });
    cp.insert(10, CleanedSegment { first_cleaned_at_ms: 9_500, tombstones: 0 });
    assert!(!worth_cleaning(&inactive, &cp, &p), "1/3 dirty, tombstones not due");
    assert!(worth_cleaning(&inactive, &cp, &params(10_501)), "tombstones due");
    cp.remove(&10);
    assert!(worth_cleaning(&inactive, &cp, &p), "2/3 dirty");

    // max.compaction.lag.ms: 1/3 dirty (the third segment, first batch at
    // 500) is cleaned once that batch is older than the lag, whatever the ratio.
    cp.insert(10, CleanedSegment { first_cleaned_at_ms: 9_500, tombstones: 0 });
    let lag = |lag_ms| CleanParams { max_compaction_lag_ms: lag_ms, ..p };
    assert!(!worth_cleaning(&inactive, &cp, &lag(9_500)), "first dirty batch 9500 ms old, lag 9500");
    assert!(worth_cleaning(&inactive, &cp, &lag(9_499)), "first dirty batch past a 9499 ms lag");
    // A lower min.cleanable.dirty.ratio starts it too.
    assert!(worth_cleaning(&inactive, &cp, &CleanParams { min_cleanable_ratio: 0.3, ..p }), "1/3 dirty, ratio 0.3");
}

#[test]
fn checkpoint_roundtrip_and_garbage() {
    let dir = crate::test_dir("compaction-cp");
    assert!(read_checkpoint(&dir).is_empty());
    let mut cp = Checkpoint::new();
    cp.insert(0, CleanedSegment { first_cleaned_at_ms: 5, tombstones: 2 });
    cp.insert(7_000_000_000, CleanedSegment { first_cleaned_at_ms: 6, tombstones: 0 });
    write_checkpoint(&dir, &cp).unwrap();
    assert_eq!(read_checkpoint(&dir), cp);
    std::fs::write(dir.join(CHECKPOINT_FILE), "0 1\n").unwrap();
    assert!(read_checkpoint(&dir).is_empty(), "malformed: everything dirty again");
    std::fs::write(dir.join("00000000000000000000.log.cleaned"), b"x").unwrap();
    assert_eq!(recover_dir(&dir).unwrap(), 1);
    assert!(stray_cleaned(&dir).is_empty());
    // A committed swap of segments 0 and 5 (ending at 9) is finished: the
    // old files go, the swap becomes segment 0, segment 9 is untouched.
    for (name, body) in [
        ("00000000000000000000.log", "old0"),
        ("00000000000000000000.index", ""),
        ("00000000000000000005.log", "old5"),
        ("00000000000000000005.timeindex", ""),
        ("00000000000000000009.log", "next"),
        ("00000000000000000000-00000000000000000009.swap", "merged"),
    ] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    assert_eq!(recover_dir(&dir).unwrap(), 1);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, vec!["00000000000000000000.log", "00000000000000000009.log", CHECKPOINT_FILE]);
    assert_eq!(std::fs::read_to_string(dir.join("00000000000000000000.log")).unwrap(), "merged");
    assert_eq!(recover_dir(&dir).unwrap(), 0, "idempotent");
    assert_eq!(parse_swap_name("00000000000000000009-00000000000000000009.swap"), None);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Transactions: nothing at or above the last stable offset is cleaned, and
/// transactional batches (aborted or not) and markers are kept as they are,
/// never used as a key's latest value.
#[test]
fn compaction_stops_at_the_last_stable_offset_and_keeps_transactions() {
    run(|| async {
        let dir = crate::test_dir("compaction-txn");
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.to_path_buf(), settings()).await.unwrap();
        log.borrow_mut().settings.segment.segment_bytes = 1;
        let append = |b: Bytes| {
            let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
            log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
        };
        // Offsets 0-11: k0 k1 k2 k0 ..., offset 4 is pid 9's open transaction writing k1.
        for i in 0..12i64 {
            let (k, v) = (format!("k{}", i % 3), format!("v{i}"));
            let rec =
                [RecordRef { key: Some(k.as_bytes()), value: Some(v.as_bytes()), headers: &[], timestamp_delta_ms: 0 }];
            let b = if i == 4 {
                let fields = ProducerFields { producer_id: 9, producer_epoch: 0, base_sequence: 0 };
                batch::build_batch_with_attributes(&rec, TS, fields, batch::ATTR_TRANSACTIONAL)
            } else {
                batch::build_batch(&rec, TS, ProducerFields::default())
            };
            append(b);
            partition::flush(&log).await.unwrap();
        }
        assert_eq!(log.borrow().last_stable_offset(), Offset(4));
        let all: Vec<Row> = (0..12).map(|i| (i, format!("k{}", i % 3), Some(format!("v{i}")))).collect();
        clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
        // 0-3 go (newer plain values of their keys); from the LSO on nothing is touched.
        assert_eq!(read_all(&log).await, all[4..].to_vec());

        // The transaction aborts: its record stays (not a latest value), the marker too.
        let marker = log.borrow_mut().append_txn_marker(ProducerId(9), 0, false, 0, Epoch(0)).unwrap();
        assert_eq!(marker, Offset(12));
        append(keyed(&[("k0", Some("v13"))], TS, ProducerFields::default()));
        partition::flush(&log).await.unwrap();
        assert_eq!(log.borrow().last_stable_offset(), Offset(14));
        let done = clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
        assert!(done.records_removed > 0);
        let kept: Vec<i64> = read_all(&log).await.iter().map(|r| r.0).collect();
        // 4 (aborted, kept as is), 10 and 11 the latest k1 and k2, 12 the marker, 13 active (9: an older k0).
        assert_eq!(kept, vec![4, 10, 11, 12, 13]);
        let batches = all_batches(&log).await;
        let marker_batch = batches.iter().find(|b| BatchHeader::parse(b).unwrap().base_offset() == Offset(12));
        assert!(marker_batch.is_some_and(|b| BatchHeader::parse(b).unwrap().is_control()), "the marker stays");
        // Reopened: the aborted transaction and the producer's state come back from the cleaned log.
        drop(log);
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        assert_eq!(log.borrow().aborted_txns(Offset(0), Offset(100)), vec![(ProducerId(9), Offset(4))]);
        assert_eq!(log.borrow().last_stable_offset(), Offset(14));
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}
