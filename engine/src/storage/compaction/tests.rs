//! Compaction tests on a real O_DIRECT-capable dir, inside a glommio executor:
//! key selection, rewritten batches, and recovery of a swap interrupted at
//! each step.

use bytes::Bytes;
use tidelog_protocol::batch::{ProducerFields, RecordRef};
use tidelog_protocol::{Epoch, PartitionId};

use super::*;
use crate::storage::partition::{self, LogSettings, PartitionLog};
use crate::storage::segment::SegmentSettings;

fn settings() -> LogSettings {
    LogSettings {
        segment: SegmentSettings {
            index_interval_bytes: 1,
            preallocate_bytes: 64 * 1024,
            // Every batch below is ~100 bytes: one batch per segment.
            segment_bytes: 150,
            flush_write_bytes_max: 8192,
        },
        roll_ms: u64::MAX / 2,
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
        // a@0 b@1 c@2 (c's latest is in the active segment), a@3 b@4.
        assert_eq!(done.records_removed, 5);
        assert_eq!(done.segments_cleaned, 2);
        assert!(done.bytes_reclaimed > 0);
        assert_eq!(read_all(&log).await, compacted(), "latest per key, tombstone kept, offsets kept");
        assert_eq!(log.borrow().high_watermark, Offset(10));
        let cp = read_checkpoint(&dir);
        assert_eq!(cp.len(), 3);
        assert_eq!(cp[&6], CleanedSegment { first_cleaned_at_ms: now, tombstones: 1 });

        // Nothing dirty, tombstones not due: no pass.
        assert_eq!(clean_log(&log, &params(now + 500), &never).await.unwrap(), None);
        // After delete.retention.ms the tombstone goes.
        let done = clean_log(&log, &params(now + 1_001), &never).await.unwrap().unwrap();
        assert_eq!(done.records_removed, 1);
        let expired = rows(&[(5, "d", Some("d1")), (7, "a", Some("a3")), (8, "c", Some("c2")), (9, "e", Some("e1"))]);
        assert_eq!(read_all(&log).await, expired);
        assert_eq!(read_checkpoint(&dir)[&6], CleanedSegment { first_cleaned_at_ms: now, tombstones: 0 });

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
        let (map, _) = build_key_map(&sources).unwrap();
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

#[test]
fn idempotent_batches_left_empty_keep_their_header() {
    run(|| async {
        let dir = crate::test_dir("compaction-pid");
        let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
        let p = ProducerFields { producer_id: 9, producer_epoch: 0, base_sequence: 0 };
        let p2 = ProducerFields { base_sequence: 2, ..p };
        let p3 = ProducerFields { base_sequence: 4, ..p };
        for b in [
            keyed(&[("a", Some("a1")), ("b", Some("b1"))], TS, p),
            keyed(&[("a", Some("a2")), ("b", Some("b2"))], TS, p2),
            keyed(&[("x", Some("x"))], TS, p3),
        ] {
            let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
            log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
            partition::flush(&log).await.unwrap();
        }
        let done = clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
        assert_eq!(done.records_removed, 2);
        assert_eq!(read_all(&log).await, rows(&[(2, "a", Some("a2")), (3, "b", Some("b2")), (4, "x", Some("x"))]));
        // The emptied batch is still there with its producer fields.
        let r = partition::read(&log, Offset(0), 1 << 20, true).await.unwrap();
        let h = BatchHeader::parse(&r.chunks[0]).unwrap();
        assert_eq!((h.base_offset().0, h.last_offset().0, h.record_count()), (0, 1, 0));
        assert_eq!((h.producer_id().0, h.base_sequence()), (9, 0));
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// A crash after each step of the swap of segment 3 (keys a2 b2 d1): the
/// reopened log holds either the old or the new segment, nothing is lost,
/// no `.log.cleaned` is left, and the next pass finishes the job.
#[test]
fn interrupted_swap_recovers_at_every_step() {
    run(|| async {
        for until in [None, Some(SwapStep::IndexRemoved), Some(SwapStep::Renamed), Some(SwapStep::Indexed)] {
            let dir = crate::test_dir("compaction-crash");
            let log = sample_log(&dir).await;
            let sources: Vec<(PathBuf, u64)> = log
                .borrow()
                .inactive_segments()
                .iter()
                .chain(std::iter::once(&log.borrow().active_segment_info()))
                .map(|s| (crate::storage::segment::log_path(&dir, s.base_offset), s.bytes))
                .collect();
            let (map, _) = build_key_map(&sources).unwrap();
            let path = crate::storage::segment::log_path(&dir, Offset(3));
            let r = rewrite_segment(&path, Offset(3), sources[1].1, &map, true, 1).unwrap();
            assert!(r.changed);
            assert_eq!(r.records_removed, 2);
            assert_eq!(stray_cleaned(&dir).len(), 1);
            if let Some(step) = until {
                install_cleaned(&path, &r.index, step).unwrap();
            }
            // "Crash": drop everything in memory and reopen from disk.
            drop(log);
            let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
            assert!(stray_cleaned(&dir).is_empty(), "{until:?}: stray .log.cleaned left");
            let committed = until.is_some_and(|s| s >= SwapStep::Renamed);
            let mut want = everything();
            if committed {
                want.retain(|(o, _, _)| *o != 3 && *o != 4);
            }
            assert_eq!(read_all(&log).await, want, "{until:?}");
            assert_eq!(log.borrow().high_watermark, Offset(10), "{until:?}");
            // A rescanned segment is sealed again by the next flush, then cleaned.
            partition::flush(&log).await.unwrap();
            assert!(log.borrow().inactive_segments().iter().all(|s| s.sealed), "{until:?}");
            clean_log(&log, &params(TS), &|| false).await.unwrap().unwrap();
            assert_eq!(read_all(&log).await, compacted(), "{until:?}");
            drop(log);
            let log = PartitionLog::open("t".into(), PartitionId(0), dir.clone(), settings()).await.unwrap();
            assert_eq!(read_all(&log).await, compacted(), "{until:?} after reopen");
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
    std::fs::remove_dir_all(dir).unwrap();
}
