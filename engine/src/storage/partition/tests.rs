//! Storage tests on a real O_DIRECT-capable dir (`TIDELOG_TEST_DIR`, e.g. an
//! XFS mount, or target/test-data), inside a real glommio executor.

use std::rc::Rc;

use bytes::Bytes;
use tidelog_protocol::batch::{self, BatchHeader, ProducerFields, RecordRef};
use tidelog_protocol::{Epoch, Offset, PartitionId};

use super::*;
use crate::storage::segment::SegmentSettings;

fn settings(segment_bytes: u64) -> LogSettings {
    LogSettings {
        segment: SegmentSettings {
            index_interval_bytes: 256,
            preallocate_bytes: 64 * 1024,
            segment_bytes,
            flush_write_bytes_max: 8192,
        },
        roll_ms: u64::MAX / 2,
        cache_bytes_max: 0,
    }
}

fn make_batch(first: usize, n: usize, ts: i64) -> Bytes {
    let values: Vec<Vec<u8>> =
        (first..first + n).map(|i| format!("value-{i:06}-{}", "x".repeat(i % 50)).into_bytes()).collect();
    let recs: Vec<RecordRef<'_>> = values
        .iter()
        .map(|v| RecordRef { key: Some(b"k"), value: Some(v), headers: &[], timestamp_delta_ms: 0 })
        .collect();
    batch::build_batch(&recs, ts, ProducerFields::default())
}

use crate::run_on_executor as run;

async fn append(log: &SharedLog, b: &Bytes) -> (Offset, Offset) {
    let infos = batch::validate_record_set(b, usize::MAX).unwrap();
    let r = log.borrow_mut().append(b, &infos, Epoch(0));
    r
}

/// Every record value in `log` from offset 0, in order, read through `read`.
async fn read_all(log: &SharedLog) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut offset = Offset(0);
    loop {
        let r = read(log, offset, 3000, true).await.unwrap();
        if r.bytes == 0 {
            return out;
        }
        for chunk in r.chunks {
            let mut at = 0;
            while at < chunk.len() {
                let h = BatchHeader::parse(&chunk[at..]).unwrap();
                let size = h.size_bytes();
                batch::validate(&chunk[at..at + size], usize::MAX).unwrap();
                for (i, v) in record_values(&chunk[at..at + size]).into_iter().enumerate() {
                    let o = h.base_offset().0 + i as i64;
                    if o >= offset.0 {
                        out.push((o, v));
                    }
                }
                offset = h.last_offset().next();
                at += size;
            }
        }
    }
}

fn record_values(b: &[u8]) -> Vec<Vec<u8>> {
    let h = BatchHeader::parse(b).unwrap();
    let mut at = batch::BATCH_HEADER_BYTES;
    let mut out = Vec::new();
    for _ in 0..h.record_count() {
        let (len, n) = batch::get_varint(&b[at..]).unwrap();
        let body = &b[at + n..at + n + len as usize];
        let mut p = 1;
        for _ in 0..2 {
            let (_, k) = batch::get_varint(&body[p..]).unwrap();
            p += k;
        }
        let (klen, k) = batch::get_varint(&body[p..]).unwrap();
        p += k + klen.max(0) as usize;
        let (vlen, k) = batch::get_varint(&body[p..]).unwrap();
        p += k;
        out.push(body[p..p + vlen as usize].to_vec());
        at += n + len as usize;
    }
    out
}

fn expected(n: usize) -> Vec<(i64, Vec<u8>)> {
    (0..n).map(|i| (i as i64, format!("value-{i:06}-{}", "x".repeat(i % 50)).into_bytes())).collect()
}

#[test]
fn append_flush_read_roll_and_reopen() {
    let dir = crate::test_dir("partition-roll");
    run(move || async move {
        let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.clone(), settings(4096)).await.unwrap();
        let mut n = 0;
        for _ in 0..60 {
            let (first, last) = append(&log, &make_batch(n, 7, 1000 + n as i64)).await;
            assert_eq!((first.0, last.0), (n as i64, n as i64 + 6));
            n += 7;
        }
        assert_eq!(log.borrow().high_watermark, Offset(0), "nothing is visible before it is durable");
        assert!(read(&log, Offset(0), 1 << 20, true).await.unwrap().chunks.is_empty());
        flush(&log).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(n as i64));
        assert!(log.borrow().segment_count() > 3, "4 KiB segments must have rolled");
        assert_eq!(read_all(&log).await, expected(n));
        // Timestamp lookup lands on the first record at or after the time.
        let (o, ts) = offset_for_timestamp(&log, 1000 + 70).await.unwrap().unwrap();
        assert_eq!((o.0, ts), (70, 1070));
        assert!(offset_for_timestamp(&log, 1_000_000).await.unwrap().is_none());
        drop(log);
        let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.clone(), settings(4096)).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(n as i64));
        assert_eq!(read_all(&log).await, expected(n));
        let (first, _) = append(&log, &make_batch(n, 3, 5000)).await;
        assert_eq!(first.0, n as i64, "appends continue at the next offset after reopen");
        flush(&log).await.unwrap();
        assert_eq!(read_all(&log).await, expected(n + 3));
    });
}

/// Writes `batches` of 5 records, flushes, and returns the active segment path
/// and each batch's file position.
async fn write_batches(dir: &std::path::Path, batches: usize) -> (std::path::PathBuf, Vec<u64>) {
    let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.to_path_buf(), settings(1 << 30)).await.unwrap();
    let mut positions = Vec::new();
    let mut pos = 0u64;
    for i in 0..batches {
        let b = make_batch(i * 5, 5, 1000);
        positions.push(pos);
        pos += b.len() as u64;
        append(&log, &b).await;
        flush(&log).await.unwrap();
    }
    (crate::storage::segment::log_path(dir, Offset(0)), positions)
}

fn damage_and_reopen(name: &str, damage: impl FnOnce(&std::path::Path, &[u64]) + Send + 'static) {
    let dir = crate::test_dir(name);
    run(move || async move {
        let (path, positions) = write_batches(&dir, 10).await;
        damage(&path, &positions);
        let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.clone(), settings(1 << 30)).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(45), "batches 0..9 kept, batch 9 dropped");
        assert_eq!(read_all(&log).await, expected(45));
        let (first, _) = append(&log, &make_batch(45, 5, 1000)).await;
        assert_eq!(first, Offset(45));
        flush(&log).await.unwrap();
        assert_eq!(read_all(&log).await, expected(50));
    });
}

#[test]
fn recovery_truncates_a_zeroed_tail() {
    damage_and_reopen("torn-zero", |path, positions| {
        let data = std::fs::read(path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let from = positions[9] + 20;
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (data.len() as u64 - from) as usize], from).unwrap();
    });
}

#[test]
fn recovery_truncates_a_short_file() {
    damage_and_reopen("torn-truncate", |path, positions| {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(positions[9] + 30).unwrap();
    });
}

#[test]
fn recovery_drops_a_batch_with_a_bad_crc() {
    damage_and_reopen("torn-crc", |path, positions| {
        let mut data = std::fs::read(path).unwrap();
        let at = (positions[9] + 70) as usize;
        data[at] ^= 0x55;
        std::fs::write(path, &data).unwrap();
    });
}

#[test]
fn slow_flush_lines_are_rate_limited_per_shard_and_count_the_rest() {
    let t0 = std::time::Instant::now();
    assert_eq!(slow_flush_report(t0), Some(0));
    assert_eq!(slow_flush_report(t0 + std::time::Duration::from_secs(1)), None);
    assert_eq!(slow_flush_report(t0 + std::time::Duration::from_secs(2)), None);
    // The next line says how many it left out.
    assert_eq!(slow_flush_report(t0 + SLOW_FLUSH_LOG_EVERY), Some(2));
    assert_eq!(slow_flush_report(t0 + SLOW_FLUSH_LOG_EVERY), None);
}
