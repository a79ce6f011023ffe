//! Storage tests on a real O_DIRECT-capable dir (`TIDELOG_TEST_DIR`, e.g. an
//! XFS mount, or target/test-data), inside a real glommio executor.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use tidelog_protocol::batch::{self, BatchHeader, BatchInfo, ProducerFields, RecordRef};
use tidelog_protocol::{Epoch, Offset, PartitionId, ProducerId};

use super::*;
use crate::storage::producer_state::{BatchMeta, Check};
use crate::storage::segment::SegmentSettings;

fn settings(segment_bytes: u64) -> LogSettings {
    LogSettings {
        segment: SegmentSettings {
            index_interval_bytes: 256,
            preallocate_bytes: 64 * 1024,
            zero_ahead_bytes: 16 * 1024,
            segment_bytes,
            index_bytes_max: 10 << 20,
            flush_write_bytes_max: 8192,
        },
        roll_ms: u64::MAX / 2,
        roll_jitter_ms: 0,
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
    let r = log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
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

// ---------------------------------------------------------------------------
// Replication primitives: high watermark bound, follower append, truncation,
// leader epochs.

async fn append_at(log: &SharedLog, b: &Bytes, epoch: i32) -> (Offset, Offset) {
    let infos = batch::validate_record_set(b, usize::MAX).unwrap();
    let r = log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(epoch));
    r
}

/// The bytes a fetch plan would send.
fn materialize(r: FetchRead) -> Vec<u8> {
    let mut out = Vec::new();
    for part in r.parts {
        match part {
            RecordsPart::Memory(b) => out.extend_from_slice(&b),
            RecordsPart::File { file, position, len } => {
                let mut buf = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, position).unwrap();
                out.extend_from_slice(&buf);
            }
        }
    }
    assert_eq!(out.len(), r.bytes);
    out
}

/// (base offset, last offset, leader epoch) of each whole batch in `b`.
fn batches_of(b: &[u8]) -> Vec<(i64, i64, i32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + batch::BATCH_HEADER_BYTES <= b.len() {
        let h = BatchHeader::parse(&b[at..]).unwrap();
        if at + h.size_bytes() > b.len() {
            break;
        }
        out.push((h.base_offset().0, h.last_offset().0, h.leader_epoch().0));
        at += h.size_bytes();
    }
    out
}

/// Everything fetches from `offset` on return with `limit`, fetch after
/// fetch (one fetch reads from one segment), as raw batches.
async fn fetch_all(log: &SharedLog, mut offset: Offset, limit: ReadLimit) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let got = materialize(read_for_fetch_with(log, offset, 64 << 20, true, limit).await.unwrap());
        let Some(&(_, last, _)) = batches_of(&got).last() else { return out };
        out.extend_from_slice(&got);
        offset = Offset(last + 1);
    }
}

/// Everything a follower would be served from `offset`.
async fn replica_bytes(log: &SharedLog, offset: Offset) -> Vec<u8> {
    fetch_all(log, offset, ReadLimit::DurableEnd).await
}

/// Everything a consumer would be served from `offset`.
async fn consumer_bytes(log: &SharedLog, offset: Offset) -> Vec<u8> {
    fetch_all(log, offset, ReadLimit::HighWatermark).await
}

fn cached(mut s: LogSettings) -> LogSettings {
    s.cache_bytes_max = 1 << 20;
    s
}

fn open_log(dir: &std::path::Path, s: LogSettings) -> impl std::future::Future<Output = SharedLog> {
    let dir = dir.to_path_buf();
    async move { PartitionLog::open(Rc::from("t"), PartitionId(0), dir, s).await.unwrap() }
}

fn high_watermark_capped_by_replication(s: LogSettings, name: &str) {
    let dir = crate::test_dir(name);
    run(move || async move {
        let log = open_log(&dir, s).await;
        log.borrow_mut().set_replication_bound(Some(Offset(0)));
        for i in 0..3 {
            append(&log, &make_batch(i * 5, 5, 1000)).await;
        }
        flush(&log).await.unwrap();
        {
            let l = log.borrow();
            assert_eq!((l.durable_end, l.high_watermark, l.log_end_offset()), (Offset(15), Offset(0), Offset(15)));
        }
        // Consumers see nothing yet; a follower is served the durable log.
        assert!(consumer_bytes(&log, Offset(0)).await.is_empty());
        assert!(read_all(&log).await.is_empty());
        assert_eq!(batches_of(&replica_bytes(&log, Offset(0)).await), vec![(0, 4, 0), (5, 9, 0), (10, 14, 0)]);
        assert_eq!(batches_of(&replica_bytes(&log, Offset(7)).await), vec![(5, 9, 0), (10, 14, 0)]);

        // The followers made 0..5 durable.
        log.borrow_mut().set_replication_bound(Some(Offset(5)));
        assert_eq!(log.borrow().high_watermark, Offset(5));
        assert_eq!(batches_of(&consumer_bytes(&log, Offset(0)).await), vec![(0, 4, 0)]);
        assert!(consumer_bytes(&log, Offset(5)).await.is_empty());
        assert_eq!(read_all(&log).await, expected(5));

        // A bound inside a batch shows only the whole batches below it.
        log.borrow_mut().set_replication_bound(Some(Offset(7)));
        assert_eq!(log.borrow().high_watermark, Offset(7));
        assert_eq!(batches_of(&consumer_bytes(&log, Offset(0)).await), vec![(0, 4, 0)]);

        // Never backwards.
        log.borrow_mut().set_replication_bound(Some(Offset(3)));
        assert_eq!(log.borrow().high_watermark, Offset(7));

        // More appends: durable, served to followers, not visible.
        append(&log, &make_batch(15, 5, 1000)).await;
        flush(&log).await.unwrap();
        assert_eq!(log.borrow().durable_end, Offset(20));
        assert_eq!(log.borrow().high_watermark, Offset(7));
        assert_eq!(batches_of(&replica_bytes(&log, Offset(15)).await), vec![(15, 19, 0)]);
        assert!(consumer_bytes(&log, Offset(15)).await.is_empty());

        log.borrow_mut().set_replication_bound(Some(Offset(15)));
        assert_eq!(batches_of(&consumer_bytes(&log, Offset(0)).await), vec![(0, 4, 0), (5, 9, 0), (10, 14, 0)]);
        assert_eq!(read_all(&log).await, expected(15));

        // A bound past the durable end: the durable end.
        log.borrow_mut().set_replication_bound(Some(Offset(100)));
        assert_eq!(log.borrow().high_watermark, Offset(20));
        assert_eq!(read_all(&log).await, expected(20));

        // Not replicated any more: the durable end, as before replication.
        log.borrow_mut().set_replication_bound(Some(Offset(20)));
        append(&log, &make_batch(20, 5, 1000)).await;
        flush(&log).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(20));
        log.borrow_mut().set_replication_bound(None);
        assert_eq!(log.borrow().high_watermark, Offset(25));
        assert_eq!(read_all(&log).await, expected(25));
        append(&log, &make_batch(25, 5, 1000)).await;
        flush(&log).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(30));
        assert_eq!(read_all(&log).await, expected(30));
    });
}

#[test]
fn high_watermark_is_capped_by_the_replication_bound_file_reads() {
    high_watermark_capped_by_replication(settings(1 << 30), "hw-bound-file");
}

#[test]
fn high_watermark_is_capped_by_the_replication_bound_cached_reads() {
    high_watermark_capped_by_replication(cached(settings(1 << 30)), "hw-bound-cache");
}

#[test]
fn high_watermark_bound_across_segments() {
    let dir = crate::test_dir("hw-bound-segments");
    run(move || async move {
        let log = open_log(&dir, settings(4096)).await;
        log.borrow_mut().set_replication_bound(Some(Offset(0)));
        let mut n = 0;
        for _ in 0..40 {
            append(&log, &make_batch(n, 7, 1000)).await;
            n += 7;
        }
        flush(&log).await.unwrap();
        assert!(log.borrow().segment_count() >= 3);
        assert!(read_all(&log).await.is_empty());
        // A bound in a later segment: everything below it and nothing more.
        for bound in [7, 70, 140, 203, n as i64] {
            log.borrow_mut().set_replication_bound(Some(Offset(bound)));
            assert_eq!(read_all(&log).await, expected(bound as usize), "bound {bound}");
            let batches = batches_of(&consumer_bytes(&log, Offset(0)).await);
            assert_eq!(batches.last().map(|b| b.1), Some(bound - 1), "bound {bound}");
            assert_eq!(batches.len() as i64, bound / 7);
        }
    });
}

/// The leader's batches as a follower receives them: fetched with
/// `read_for_replica`, cut at `max_bytes` (a partial last batch).
async fn fetch_as_follower(leader: &SharedLog, offset: Offset, max_bytes: usize) -> (Bytes, Vec<BatchInfo>) {
    let raw = Bytes::from(materialize(read_for_replica(leader, offset, max_bytes, true).await.unwrap()));
    replica_record_set(&raw, usize::MAX).unwrap()
}

#[test]
fn follower_appends_leader_batches_unchanged() {
    let dir = crate::test_dir("replica-append");
    run(move || async move {
        let leader = open_log(&dir.join("leader"), settings(4096)).await;
        let follower = open_log(&dir.join("follower"), settings(4096)).await;
        let mut n = 0;
        for epoch in [1, 1, 1, 3, 3, 4] {
            for _ in 0..5 {
                append_at(&leader, &make_batch(n, 5, 1000 + n as i64), epoch).await;
                n += 5;
            }
        }
        // An idempotent producer's batch, recorded as the produce path does.
        let idem = batch::build_batch(
            &[RecordRef { key: Some(b"k"), value: Some(b"idem"), headers: &[], timestamp_delta_ms: 0 }],
            5000,
            ProducerFields { producer_id: 77, producer_epoch: 2, base_sequence: 0 },
        );
        let (first, last) = append_at(&leader, &idem, 4).await;
        leader.borrow_mut().producers.record(
            ProducerId(77),
            2,
            BatchMeta { first_seq: 0, last_seq: 0, base_offset: first, last_offset: last },
            5000,
        );
        flush(&leader).await.unwrap();
        let leo = leader.borrow().log_end_offset();
        assert_eq!(leo, Offset(n as i64 + 1));

        // Fetch in small pieces, as a follower with a small max bytes would.
        let mut fetches = 0;
        while follower.borrow().log_end_offset() < leo {
            let at = follower.borrow().log_end_offset();
            let (records, infos) = fetch_as_follower(&leader, at, 700).await;
            assert!(!infos.is_empty());
            let (f, l) = follower.borrow_mut().append_replicated(&records, &infos).unwrap();
            assert_eq!(f, at);
            assert_eq!(l, Offset(follower.borrow().log_end_offset().0 - 1));
            flush(&follower).await.unwrap();
            fetches += 1;
        }
        assert!(fetches > 3, "fetches cut at 700 bytes");
        assert!(follower.borrow().segment_count() > 1, "the follower rolls its own segments");
        // Byte for byte the leader's log: offsets, epochs, producer fields, CRCs.
        assert_eq!(replica_bytes(&follower, Offset(0)).await, replica_bytes(&leader, Offset(0)).await);
        assert_eq!(read_all(&follower).await, read_all(&leader).await);
        let expect_epochs = vec![(Epoch(1), Offset(0)), (Epoch(3), Offset(75)), (Epoch(4), Offset(125))];
        let entries =
            |l: &SharedLog| l.borrow().epochs.entries().iter().map(|e| (e.epoch, e.start_offset)).collect::<Vec<_>>();
        assert_eq!(entries(&leader), expect_epochs);
        assert_eq!(entries(&follower), expect_epochs);
        // Producer state as on the leader: a retry would be a duplicate.
        assert_eq!(
            follower.borrow().producers.check(ProducerId(77), 2, 0, 1),
            Check::Duplicate { base_offset: first, last_offset: last }
        );
        assert_eq!(follower.borrow().producers.check(ProducerId(77), 2, 1, 1), Check::Append);

        // Refused, and nothing appended: a gap, a repeat, an empty set.
        let end = follower.borrow().log_end_offset();
        append_at(&leader, &make_batch(n + 1, 5, 1000), 4).await;
        append_at(&leader, &make_batch(n + 6, 5, 1000), 4).await;
        flush(&leader).await.unwrap();
        let (records, infos) = fetch_as_follower(&leader, end, 1 << 20).await;
        assert_eq!(infos.len(), 2);
        let second = records.slice(infos[0].size_bytes..);
        let err = follower.borrow_mut().append_replicated(&second, &infos[1..]).unwrap_err();
        assert_eq!(err, ReplicaAppendError::NotContiguous { index: 0, expected: end, found: Offset(end.0 + 5) });
        let (old, old_infos) = fetch_as_follower(&leader, Offset(0), 1).await;
        let err = follower.borrow_mut().append_replicated(&old, &old_infos).unwrap_err();
        assert_eq!(err, ReplicaAppendError::NotContiguous { index: 0, expected: end, found: Offset(0) });
        // Batches 1 and 3 of a set: the second is out of place.
        let mut skipping = BytesMut::from(&records[..infos[0].size_bytes]);
        skipping.extend_from_slice(&old);
        let skipping = skipping.freeze();
        let skip_infos = vec![infos[0], old_infos[0]];
        let err = follower.borrow_mut().append_replicated(&skipping, &skip_infos).unwrap_err();
        assert_eq!(err, ReplicaAppendError::NotContiguous { index: 1, expected: Offset(end.0 + 5), found: Offset(0) });
        assert!(err.to_string().contains("expected"), "{err}");
        assert_eq!(follower.borrow_mut().append_replicated(&records, &[]).unwrap_err(), ReplicaAppendError::Empty);
        assert_eq!(follower.borrow().log_end_offset(), end);
        assert_eq!(follower.borrow().pending_bytes(), 0);
        // The right ones go in.
        follower.borrow_mut().append_replicated(&records, &infos).unwrap();
        flush(&follower).await.unwrap();
        assert_eq!(replica_bytes(&follower, Offset(0)).await, replica_bytes(&leader, Offset(0)).await);

        // Reopened, the follower has the same log and epochs.
        drop(follower);
        let follower = open_log(&dir.join("follower"), settings(4096)).await;
        assert_eq!(replica_bytes(&follower, Offset(0)).await, replica_bytes(&leader, Offset(0)).await);
        assert_eq!(entries(&follower), expect_epochs);
    });
}

#[test]
fn replica_record_set_drops_a_partial_last_batch_and_refuses_corruption() {
    let a = make_batch(0, 5, 1000);
    let b = make_batch(5, 5, 1000);
    let mut both = BytesMut::from(&a[..]);
    both.extend_from_slice(&b);
    let both = both.freeze();
    let (whole, infos) = replica_record_set(&both, usize::MAX).unwrap();
    assert_eq!((whole.len(), infos.len()), (both.len(), 2));
    for cut in [a.len() + 1, a.len() + 11, a.len() + 12, a.len() + 70, both.len() - 1] {
        let (prefix, infos) = replica_record_set(&both.slice(..cut), usize::MAX).unwrap();
        assert_eq!((prefix.len(), infos.len()), (a.len(), 1), "cut at {cut}");
    }
    let (none, infos) = replica_record_set(&Bytes::new(), usize::MAX).unwrap();
    assert!(none.is_empty() && infos.is_empty());
    let mut bad = BytesMut::from(&both[..]);
    bad[a.len() + 70] ^= 0x55;
    assert!(replica_record_set(&bad.freeze(), usize::MAX).is_err(), "a whole batch with a bad CRC");
}

/// Appends `batches` batches of 5 records at the given epochs, flushing
/// after each; returns nothing, the layout is read back from the log.
async fn fill(log: &SharedLog, from: usize, batches: usize, epoch: impl Fn(usize) -> i32) {
    for i in 0..batches {
        let first = from + i * 5;
        append_at(log, &make_batch(first, 5, 1000 + first as i64), epoch(i)).await;
        flush(log).await.unwrap();
    }
}

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.retain(|n| n.ends_with(".log") || n.ends_with(".index") || n.ends_with(".timeindex"));
    names.sort();
    names
}

#[test]
fn truncate_into_a_sealed_segment_then_append_and_reopen() {
    let dir = crate::test_dir("truncate-sealed");
    run(move || async move {
        let log = open_log(&dir, settings(4096)).await;
        // 60 batches of 5 over several 4 KiB segments; epochs 1, then 2 from batch 30.
        fill(&log, 0, 60, |i| if i < 30 { 1 } else { 2 }).await;
        let bases: Vec<Offset> = {
            let l = log.borrow();
            assert!(l.segment_count() >= 4, "{} segments", l.segment_count());
            l.inactive_segments().iter().map(|s| s.base_offset).collect()
        };
        assert_eq!(log.borrow().epochs.entries().len(), 2);
        let epoch2 = Offset(150);
        // Inside a batch in the middle of the second segment: the cut is at that batch's base.
        let (second, third) = (bases[1], bases[2]);
        let batch_base = Offset(second.0 + ((third.0 - second.0) / 10) * 5);
        let target = Offset(batch_base.0 + 2);
        assert!(target < third);
        truncate_to(&log, target).await.unwrap();
        let cut = batch_base;
        {
            let l = log.borrow();
            assert_eq!(l.log_end_offset(), cut);
            assert_eq!(l.high_watermark, cut);
            assert_eq!(l.durable_end, cut);
            assert_eq!(l.segment_count(), 2);
            assert!(l.inactive_segments().iter().all(|s| s.base_offset < second));
            assert!(l.epochs.entries().iter().all(|e| e.start_offset < cut));
            assert_eq!(l.end_offset_for_epoch(Epoch(2)), if cut > epoch2 { Some((Epoch(2), cut)) } else { None });
        }
        let files = segment_files(&dir);
        assert!(!files.iter().any(|f| f.starts_with(&format!("{:020}", third.0))), "{files:?}");
        assert!(files.contains(&format!("{:020}.log", second.0)), "{files:?}");
        assert!(!files.contains(&format!("{:020}.index", second.0)), "the cut segment is active again: {files:?}");
        assert_eq!(read_all(&log).await, expected(cut.0 as usize));
        assert_eq!(batches_of(&replica_bytes(&log, Offset(0)).await).last().map(|b| b.1), Some(cut.0 - 1));
        assert!(consumer_bytes(&log, cut).await.is_empty());

        // Appends continue at the cut, in a new epoch.
        let (first, _) = append_at(&log, &make_batch(cut.0 as usize, 5, 9000), 7).await;
        assert_eq!(first, cut);
        fill(&log, cut.0 as usize + 5, 30, |_| 7).await;
        let end = cut.0 as usize + 5 + 150;
        assert_eq!(log.borrow().log_end_offset(), Offset(end as i64));
        assert_eq!(read_all(&log).await, expected(end));
        let epochs_before = log.borrow().epochs.entries().to_vec();
        assert_eq!(epochs_before.last().map(|e| (e.epoch, e.start_offset)), Some((Epoch(7), cut)));

        // Recovery from disk yields the same log.
        let bytes_before = replica_bytes(&log, Offset(0)).await;
        drop(log);
        let log = open_log(&dir, settings(4096)).await;
        assert_eq!(log.borrow().log_end_offset(), Offset(end as i64));
        assert_eq!(log.borrow().high_watermark, Offset(end as i64));
        assert_eq!(replica_bytes(&log, Offset(0)).await, bytes_before);
        assert_eq!(read_all(&log).await, expected(end));
        assert_eq!(log.borrow().epochs.entries(), &epochs_before[..]);
    });
}

#[test]
fn truncate_then_reopen_without_appending_keeps_the_prefix() {
    let dir = crate::test_dir("truncate-reopen");
    run(move || async move {
        let log = open_log(&dir, cached(settings(4096))).await;
        fill(&log, 0, 60, |_| 1).await;
        let third = log.borrow().inactive_segments()[2].base_offset;
        // At a segment's base: that segment stays, empty, as the active one.
        truncate_to(&log, third).await.unwrap();
        assert_eq!(log.borrow().log_end_offset(), third);
        assert_eq!(log.borrow().segment_count(), 3);
        assert_eq!(read_all(&log).await, expected(third.0 as usize));
        drop(log);
        let log = open_log(&dir, cached(settings(4096))).await;
        assert_eq!(log.borrow().log_end_offset(), third);
        assert_eq!(read_all(&log).await, expected(third.0 as usize));
        // To zero: an empty log that starts again at 0.
        truncate_to(&log, Offset(0)).await.unwrap();
        assert_eq!(log.borrow().log_end_offset(), Offset(0));
        assert_eq!(log.borrow().segment_count(), 1);
        assert!(log.borrow().epochs.entries().is_empty());
        assert!(read_all(&log).await.is_empty());
        // Past the end: nothing happens.
        truncate_to(&log, Offset(10)).await.unwrap();
        fill(&log, 0, 3, |_| 2).await;
        assert_eq!(read_all(&log).await, expected(15));
        drop(log);
        let log = open_log(&dir, cached(settings(4096))).await;
        assert_eq!(read_all(&log).await, expected(15));
    });
}

#[test]
fn truncate_into_pending_and_unreplicated_data() {
    let dir = crate::test_dir("truncate-pending");
    run(move || async move {
        let log = open_log(&dir, cached(settings(1 << 30))).await;
        log.borrow_mut().set_replication_bound(Some(Offset(0)));
        fill(&log, 0, 4, |_| 1).await;
        log.borrow_mut().set_replication_bound(Some(Offset(10)));
        // Not yet flushed: 20..35.
        for i in 4..7 {
            append(&log, &make_batch(i * 5, 5, 1000)).await;
        }
        assert!(log.borrow().pending_bytes() > 0);
        // Inside the pending part: the durable part stays.
        truncate_to(&log, Offset(27)).await.unwrap();
        {
            let l = log.borrow();
            assert_eq!((l.log_end_offset(), l.durable_end, l.high_watermark), (Offset(25), Offset(20), Offset(10)));
        }
        flush(&log).await.unwrap();
        assert_eq!(batches_of(&replica_bytes(&log, Offset(0)).await).len(), 5);
        // Into the durable but not yet visible part, with a consumer's view below it.
        truncate_to(&log, Offset(15)).await.unwrap();
        {
            let l = log.borrow();
            assert_eq!((l.log_end_offset(), l.durable_end, l.high_watermark), (Offset(15), Offset(15), Offset(10)));
        }
        assert_eq!(read_all(&log).await, expected(10));
        assert_eq!(batches_of(&replica_bytes(&log, Offset(0)).await), vec![(0, 4, 1), (5, 9, 1), (10, 14, 1)]);
        // Below the high watermark: it comes down too.
        truncate_to(&log, Offset(5)).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(5));
        assert_eq!(read_all(&log).await, expected(5));
        log.borrow_mut().set_replication_bound(None);
        fill(&log, 5, 2, |_| 1).await;
        assert_eq!(read_all(&log).await, expected(15));
        drop(log);
        let log = open_log(&dir, cached(settings(1 << 30))).await;
        assert_eq!(read_all(&log).await, expected(15));
    });
}

#[test]
fn truncation_rebuilds_producer_state() {
    let dir = crate::test_dir("truncate-producers");
    run(move || async move {
        let log = open_log(&dir, settings(1 << 30)).await;
        let idem = |seq: i32, first: usize| {
            let v = format!("value-{first:06}-{}", "x".repeat(first % 50));
            batch::build_batch(
                &[RecordRef { key: Some(b"k"), value: Some(v.as_bytes()), headers: &[], timestamp_delta_ms: 0 }],
                1000,
                ProducerFields { producer_id: 9, producer_epoch: 0, base_sequence: seq },
            )
        };
        for seq in 0..4 {
            let b = idem(seq, seq as usize);
            let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
            // As a follower: the producer state follows the batches.
            let (first, _) = log.borrow_mut().append(bytes::BytesMut::from(&b[..]), &infos, Epoch(0));
            assert_eq!(first, Offset(seq as i64));
            log.borrow_mut().producers.replay(&BatchHeader::parse(&b).unwrap());
            flush(&log).await.unwrap();
        }
        assert!(crate::storage::producer_state::snapshot(&log).await.unwrap());
        assert_eq!(log.borrow().producers.get(ProducerId(9)).map(|e| e.last_seq), Some(3));
        truncate_to(&log, Offset(2)).await.unwrap();
        assert_eq!(log.borrow().producers.get(ProducerId(9)).map(|e| e.last_seq), Some(1));
        assert_eq!(log.borrow().producers.check(ProducerId(9), 0, 2, 1), Check::Append);
        assert!(!dir.join(crate::storage::producer_state::SNAPSHOT_FILE).exists(), "the snapshot covered offset 4");
        drop(log);
        let log = open_log(&dir, settings(1 << 30)).await;
        assert_eq!(log.borrow().producers.get(ProducerId(9)).map(|e| e.last_seq), Some(1));
    });
}

#[test]
fn leader_epoch_checkpoint_is_written_loaded_and_rebuilt() {
    let dir = crate::test_dir("epoch-checkpoint");
    run(move || async move {
        let path = dir.join(crate::storage::epochs::CHECKPOINT_FILE);
        let log = open_log(&dir, settings(4096)).await;
        assert!(log.borrow().epochs.entries().is_empty());
        fill(&log, 0, 4, |_| 2).await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n1\n2 0\n");
        fill(&log, 20, 4, |i| if i == 0 { 5 } else { 6 }).await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n3\n2 0\n5 20\n6 25\n");
        // A lower epoch than the latest is not a new epoch.
        fill(&log, 40, 1, |_| 3).await;
        assert_eq!(log.borrow().epochs.entries().len(), 3);
        {
            let l = log.borrow();
            assert_eq!(l.end_offset_for_epoch(Epoch(2)), Some((Epoch(2), Offset(20))));
            assert_eq!(l.end_offset_for_epoch(Epoch(4)), Some((Epoch(2), Offset(20))));
            assert_eq!(l.end_offset_for_epoch(Epoch(6)), Some((Epoch(6), Offset(45))));
            assert_eq!(l.end_offset_for_epoch(Epoch(7)), None);
        }
        drop(log);
        let log = open_log(&dir, settings(4096)).await;
        let entries = log.borrow().epochs.entries().to_vec();
        assert_eq!(crate::storage::epochs::encode(&entries), "0\n3\n2 0\n5 20\n6 25\n");
        drop(log);

        // An entry past the recovered log end (its batch did not survive) is dropped on open.
        std::fs::write(&path, "0\n4\n2 0\n5 20\n6 25\n8 45\n").unwrap();
        let log = open_log(&dir, settings(4096)).await;
        assert_eq!(log.borrow().epochs.entries(), &entries[..]);
        drop(log);

        // Malformed: rebuilt from the batches' leader epochs (and written back at the next flush).
        std::fs::write(&path, "0\n3\n2 0\n").unwrap();
        let log = open_log(&dir, settings(4096)).await;
        assert_eq!(log.borrow().epochs.entries(), &entries[..]);
        flush(&log).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n3\n2 0\n5 20\n6 25\n");
        drop(log);

        // Missing: empty, the next epoch starts it again.
        std::fs::remove_file(&path).unwrap();
        let log = open_log(&dir, settings(4096)).await;
        assert!(log.borrow().epochs.entries().is_empty());
        fill(&log, 45, 1, |_| 9).await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n1\n9 45\n");
        assert_eq!(read_all(&log).await, expected(50));
    });
}

#[test]
fn log_start_moves_the_first_epoch_up() {
    let dir = crate::test_dir("epoch-log-start");
    run(move || async move {
        let path = dir.join(crate::storage::epochs::CHECKPOINT_FILE);
        let log = open_log(&dir, settings(4096)).await;
        fill(&log, 0, 40, |i| if i < 20 { 1 } else { 4 }).await;
        crate::storage::checkpoint::truncate_prefix(&log, Offset(30), "test").await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n2\n1 30\n4 100\n");
        crate::storage::checkpoint::truncate_prefix(&log, Offset(120), "test").await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n1\n4 120\n");
    });
}

#[test]
fn truncate_fully_restarts_the_log_at_an_offset() {
    let dir = crate::test_dir("truncate-fully");
    run(move || async move {
        let log = open_log(&dir, cached(settings(4096))).await;
        fill(&log, 0, 40, |_| 3).await;
        assert!(log.borrow().segment_count() > 2);
        truncate_fully(&log, Offset(1000)).await.unwrap();
        {
            let l = log.borrow();
            assert_eq!(
                (l.log_start_offset, l.high_watermark, l.durable_end),
                (Offset(1000), Offset(1000), Offset(1000))
            );
            assert_eq!((l.log_end_offset(), l.segment_count()), (Offset(1000), 1));
            assert!(l.epochs.entries().is_empty());
            assert!(l.producers.is_empty());
        }
        assert_eq!(segment_files(&dir), vec![format!("{:020}.log", 1000)]);
        assert!(read(&log, Offset(0), 1 << 20, true).await.unwrap().chunks.is_empty());
        // Reopened before any append: still an empty log at 1000.
        drop(log);
        let log = open_log(&dir, cached(settings(4096))).await;
        crate::storage::checkpoint::restore(&log).await.unwrap();
        assert_eq!((log.borrow().log_start_offset, log.borrow().log_end_offset()), (Offset(1000), Offset(1000)));
        let (first, _) = append_at(&log, &make_batch(0, 5, 1000), 8).await;
        assert_eq!(first, Offset(1000));
        flush(&log).await.unwrap();
        assert_eq!(batches_of(&replica_bytes(&log, Offset(1000)).await), vec![(1000, 1004, 8)]);
        drop(log);
        let log = open_log(&dir, cached(settings(4096))).await;
        crate::storage::checkpoint::restore(&log).await.unwrap();
        assert_eq!((log.borrow().log_start_offset, log.borrow().log_end_offset()), (Offset(1000), Offset(1005)));
        assert_eq!(batches_of(&replica_bytes(&log, Offset(1000)).await), vec![(1000, 1004, 8)]);
        assert_eq!(log.borrow().end_offset_for_epoch(Epoch(8)), Some((Epoch(8), Offset(1005))));
    });
}

/// Offsets of the batches a consumer is served from 0.
async fn visible_batches(log: &SharedLog) -> Vec<(i64, i64)> {
    batches_of(&consumer_bytes(log, Offset(0)).await).into_iter().map(|(b, l, _)| (b, l)).collect()
}

fn fives(until: i64) -> Vec<(i64, i64)> {
    (0..until / 5).map(|i| (i * 5, i * 5 + 4)).collect()
}

#[test]
fn high_watermark_held_at_the_checkpoint_after_reopen() {
    let dir = crate::test_dir("partition-hw-hold");
    run(move || async move {
        let log = open_log(&dir, settings(1024)).await;
        for i in 0..12 {
            append(&log, &make_batch(i * 5, 5, 1000)).await;
        }
        flush(&log).await.unwrap();
        assert!(log.borrow().segment_count() > 2, "several segments, so the hold crosses segment ends");
        assert_eq!(log.borrow_mut().take_hw_checkpoint(), Some(None), "no checkpoint written yet");
        drop(log);
        crate::storage::checkpoint::write_high_watermark(&dir, Offset(23)).unwrap();

        let log = open_log(&dir, settings(1024)).await;
        {
            let mut l = log.borrow_mut();
            // Opening alone changes nothing (a single node keeps its whole log visible).
            assert_eq!((l.high_watermark, l.durable_end), (Offset(60), Offset(60)));
            assert_eq!(l.hw_checkpointed, Some(Offset(23)));
            assert_eq!(l.take_hw_checkpoint(), Some(Some(Offset(23))));
            assert_eq!(l.take_hw_checkpoint(), None, "taken once");
            assert_eq!(l.hold_high_watermark(Offset(23)), Offset(23));
        }
        // Before the batch positions are read: a prefix of what is allowed.
        let coarse = visible_batches(&log).await;
        assert!(coarse.iter().all(|&(_, last)| last < 23), "{coarse:?}");
        refine_above_hw(&log).await.unwrap();
        assert_eq!(visible_batches(&log).await, fives(20), "exactly the whole batches below 23");
        assert_eq!(read_all(&log).await, expected(20));
        // A follower is still served the whole durable log.
        assert_eq!(batches_of(&replica_bytes(&log, Offset(0)).await).len(), 12);

        // The bound set by replication moves it up, never past the durable end.
        log.borrow_mut().set_replication_bound(Some(Offset(40)));
        assert_eq!(visible_batches(&log).await, fives(40));
        append(&log, &make_batch(60, 5, 1000)).await;
        flush(&log).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(40), "new durable data stays above it");
        assert_eq!(visible_batches(&log).await, fives(40));
        log.borrow_mut().set_replication_bound(Some(Offset(1000)));
        assert_eq!(log.borrow().high_watermark, Offset(65));
        assert_eq!(read_all(&log).await, expected(65));
        // Never up, and never below the log start.
        assert_eq!(log.borrow_mut().hold_high_watermark(Offset(500)), Offset(65));
        drop(log);

        // A damaged checkpoint: logged, treated as none, no panic.
        std::fs::write(dir.join(crate::storage::checkpoint::HW_CHECKPOINT_FILE), b"4\x00garbage").unwrap();
        let log = open_log(&dir, settings(1024)).await;
        assert_eq!(log.borrow_mut().take_hw_checkpoint(), Some(None));
        assert_eq!(log.borrow().high_watermark, Offset(65));
        // Held at the log start (what a replicated log without a checkpoint
        // gets), then truncated before the positions are read: the rescan
        // sees the truncation.
        assert_eq!(log.borrow_mut().hold_high_watermark(Offset(-7)), Offset(0));
        assert!(visible_batches(&log).await.is_empty());
        truncate_to(&log, Offset(30)).await.unwrap();
        refine_above_hw(&log).await.unwrap();
        assert!(visible_batches(&log).await.is_empty());
        log.borrow_mut().set_replication_bound(Some(Offset(12)));
        assert_eq!(visible_batches(&log).await, fives(10));
        log.borrow_mut().set_replication_bound(Some(Offset(1000)));
        assert_eq!(log.borrow().high_watermark, Offset(30));
        assert_eq!(read_all(&log).await, expected(30));
        drop(log);
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

// ---------------------------------------------------------------------------
// Transactions: markers, the last stable offset, read_committed reads,
// rebuild and replication of transaction state.

/// A transactional batch of `pid` with the values `make_batch` gives.
fn txn_batch(pid: i64, epoch: i16, seq: i32, first: usize, n: usize) -> Bytes {
    let values: Vec<Vec<u8>> =
        (first..first + n).map(|i| format!("value-{i:06}-{}", "x".repeat(i % 50)).into_bytes()).collect();
    let recs: Vec<RecordRef<'_>> = values
        .iter()
        .map(|v| RecordRef { key: Some(b"k"), value: Some(v), headers: &[], timestamp_delta_ms: 0 })
        .collect();
    let fields = ProducerFields { producer_id: pid, producer_epoch: epoch, base_sequence: seq };
    batch::build_batch_with_attributes(&recs, 1000, fields, batch::ATTR_TRANSACTIONAL)
}

/// Appends a transactional batch and records its sequences, as produce does.
async fn append_txn(log: &SharedLog, pid: i64, epoch: i16, seq: i32, first: usize, n: usize) -> (Offset, Offset) {
    let (f, l) = append(log, &txn_batch(pid, epoch, seq, first, n)).await;
    let meta = BatchMeta { first_seq: seq, last_seq: seq + n as i32 - 1, base_offset: f, last_offset: l };
    log.borrow_mut().producers.record(ProducerId(pid), epoch, meta, 1000);
    (f, l)
}

fn marker(log: &SharedLog, pid: i64, epoch: i16, commit: bool) -> Offset {
    log.borrow_mut().append_txn_marker(ProducerId(pid), epoch, commit, 0, Epoch(0)).expect("marker appended")
}

/// Everything a read_committed consumer would be served from `offset`.
async fn committed_bytes(log: &SharedLog, offset: Offset) -> Vec<u8> {
    fetch_all(log, offset, ReadLimit::LastStable).await
}

/// (base, last) offsets of the batches a read_committed fetch and an
/// in-memory read up to the LSO return from 0; asserts both agree.
async fn committed_batches(log: &SharedLog) -> Vec<(i64, i64)> {
    let fetched: Vec<(i64, i64)> =
        batches_of(&committed_bytes(log, Offset(0)).await).iter().map(|b| (b.0, b.1)).collect();
    let mut read_back = Vec::new();
    let mut offset = Offset(0);
    loop {
        let r = read_with(log, offset, 1 << 20, true, ReadLimit::LastStable).await.unwrap();
        if r.bytes == 0 {
            break;
        }
        for chunk in &r.chunks {
            for (b, l, _) in batches_of(chunk) {
                read_back.push((b, l));
                offset = Offset(l + 1);
            }
        }
    }
    assert_eq!(fetched, read_back, "fetch and read agree");
    fetched
}

fn last_stable_follows_markers_under_the_high_watermark(s: LogSettings, name: &str) {
    let dir = crate::test_dir(name);
    run(move || async move {
        let log = open_log(&dir, s).await;
        log.borrow_mut().set_replication_bound(Some(Offset(0)));
        append(&log, &make_batch(0, 5, 1000)).await;
        assert_eq!(append_txn(&log, 7, 0, 0, 5, 5).await, (Offset(5), Offset(9)));
        append(&log, &make_batch(10, 5, 1000)).await;
        flush(&log).await.unwrap();
        assert_eq!(log.borrow().last_stable_offset(), Offset(0), "nothing is under the high watermark yet");
        log.borrow_mut().set_replication_bound(Some(Offset(15)));
        assert_eq!((log.borrow().high_watermark, log.borrow().last_stable_offset()), (Offset(15), Offset(5)));
        assert_eq!(log.borrow().ongoing_txns(), 1);
        // read_uncommitted sees everything under the high watermark, read_committed stops at the open transaction.
        assert_eq!(batches_of(&consumer_bytes(&log, Offset(0)).await).len(), 3);
        assert_eq!(committed_batches(&log).await, vec![(0, 4)]);
        assert!(committed_bytes(&log, Offset(5)).await.is_empty());
        assert!(committed_bytes(&log, Offset(12)).await.is_empty());

        // The commit marker: written, durable, but not under the high watermark: still unstable.
        assert_eq!(marker(&log, 7, 0, true), Offset(15));
        assert_eq!(log.borrow().ongoing_txns(), 0);
        flush(&log).await.unwrap();
        assert_eq!((log.borrow().durable_end, log.borrow().last_stable_offset()), (Offset(16), Offset(5)));
        assert_eq!(committed_batches(&log).await, vec![(0, 4)]);
        log.borrow_mut().set_replication_bound(Some(Offset(16)));
        assert_eq!(log.borrow().last_stable_offset(), Offset(16));
        assert_eq!(committed_batches(&log).await, vec![(0, 4), (5, 9), (10, 14), (15, 15)]);
        assert!(log.borrow().aborted_txns(Offset(0), Offset(16)).is_empty());

        // Two open transactions; the older one aborts, then the other commits.
        append_txn(&log, 8, 0, 0, 16, 5).await;
        append(&log, &make_batch(21, 5, 1000)).await;
        append_txn(&log, 7, 0, 5, 26, 5).await;
        flush(&log).await.unwrap();
        log.borrow_mut().set_replication_bound(Some(Offset(31)));
        assert_eq!(log.borrow().last_stable_offset(), Offset(16));
        assert_eq!(log.borrow().ongoing_txns(), 2);
        assert_eq!(marker(&log, 8, 0, false), Offset(31));
        flush(&log).await.unwrap();
        log.borrow_mut().set_replication_bound(Some(Offset(32)));
        assert_eq!(log.borrow().last_stable_offset(), Offset(26), "pid 7's transaction is still open");
        assert_eq!(committed_batches(&log).await.last(), Some(&(21, 25)));
        assert_eq!(log.borrow().aborted_txns(Offset(0), Offset(26)), vec![(ProducerId(8), Offset(16))]);
        assert_eq!(log.borrow().aborted_txns(Offset(0), Offset(16)), vec![]);
        assert_eq!(log.borrow().aborted_txns(Offset(32), Offset(40)), vec![]);
        assert_eq!(marker(&log, 7, 0, true), Offset(32));
        flush(&log).await.unwrap();
        log.borrow_mut().set_replication_bound(None);
        assert_eq!(log.borrow().last_stable_offset(), Offset(33));
        assert_eq!(committed_batches(&log).await.len(), 9);
        assert_eq!(committed_bytes(&log, Offset(0)).await, consumer_bytes(&log, Offset(0)).await);
        // The markers are control batches of the producer, at its epoch.
        let bytes = consumer_bytes(&log, Offset(31)).await;
        let h = BatchHeader::parse(&bytes).unwrap();
        assert!(h.is_control() && h.is_transactional());
        assert_eq!((h.producer_id(), h.producer_epoch(), h.base_offset()), (ProducerId(8), 0, Offset(31)));
        assert_eq!(batch::control_record_type(&bytes), Some((batch::ControlType::Abort, 0)));
    });
}

#[test]
fn last_stable_offset_follows_markers_under_the_high_watermark_file_reads() {
    last_stable_follows_markers_under_the_high_watermark(settings(1 << 30), "txn-lso-file");
}

#[test]
fn last_stable_offset_follows_markers_under_the_high_watermark_cached_reads() {
    last_stable_follows_markers_under_the_high_watermark(cached(settings(1 << 30)), "txn-lso-cache");
}

/// A log of small segments with an open transaction in the middle of a later
/// segment, then reopened (with or without a producer state snapshot): the
/// read_committed reads stop exactly before the transaction, before and after.
fn read_committed_stops_mid_segment(snapshot: bool, name: &str) {
    let dir = crate::test_dir(name);
    run(move || async move {
        let log = open_log(&dir, settings(4096)).await;
        let mut n = 0;
        while log.borrow().segment_count() < 3 {
            append(&log, &make_batch(n, 7, 1000)).await;
            n += 7;
        }
        append(&log, &make_batch(n, 7, 1000)).await;
        n += 7;
        // An aborted transaction, then an open one in the middle of a segment.
        let aborted_at = n as i64;
        append_txn(&log, 3, 0, 0, n, 7).await;
        n += 7;
        assert_eq!(marker(&log, 3, 0, false), Offset(n as i64));
        n += 1;
        append(&log, &make_batch(n, 7, 1000)).await;
        n += 7;
        let open_at = n as i64;
        append_txn(&log, 9, 2, 0, n, 7).await;
        n += 7;
        for _ in 0..5 {
            append(&log, &make_batch(n, 7, 1000)).await;
            n += 7;
        }
        flush(&log).await.unwrap();
        assert!(log.borrow().segment_count() >= 3);
        let segment_of_txn =
            log.borrow().segments.iter().rev().find(|s| s.base_offset.0 <= open_at).map(|s| s.base_offset);
        assert!(segment_of_txn.is_some_and(|b| b.0 < open_at), "the transaction starts inside a segment");
        assert_eq!(log.borrow().last_stable_offset(), Offset(open_at));
        let before = committed_batches(&log).await;
        assert_eq!(before.last().map(|b| b.1), Some(open_at - 1));
        let live_state = log.borrow().producers.txn_state();
        assert_eq!(live_state.0.len(), 1);
        assert!(live_state.0[0].2.is_some(), "the live append knows where the transaction starts");
        assert_eq!(live_state.1.len(), 1);
        if snapshot {
            assert!(crate::storage::producer_state::snapshot(&log).await.unwrap());
        }
        let consumer_before = consumer_bytes(&log, Offset(0)).await;
        drop(log);

        let log = open_log(&dir, settings(4096)).await;
        assert_eq!(log.borrow().producers.txn_state(), live_state, "rebuilt as it was live (positions too)");
        assert_eq!(log.borrow().last_stable_offset(), Offset(open_at));
        assert_eq!(committed_batches(&log).await, before);
        assert_eq!(log.borrow().aborted_txns(Offset(0), Offset(open_at)), vec![(ProducerId(3), Offset(aborted_at))]);
        // The epoch of the open transaction's producer survives: a zombie marker is refused, nothing written.
        let end = log.borrow().log_end_offset();
        let zombie = log.borrow_mut().append_txn_marker(ProducerId(9), 1, true, 0, Epoch(0));
        assert_eq!(zombie, Err(tidelog_protocol::ErrorCode::InvalidProducerEpoch));
        assert_eq!(log.borrow().log_end_offset(), end);
        assert_eq!(marker(&log, 9, 2, true), end);
        flush(&log).await.unwrap();
        let all = committed_bytes(&log, Offset(0)).await;
        assert_eq!(&all[..consumer_before.len()], &consumer_before[..]);
        assert_eq!(all, consumer_bytes(&log, Offset(0)).await);
        assert_eq!(log.borrow().last_stable_offset(), log.borrow().log_end_offset());
    });
}

#[test]
fn read_committed_stops_mid_segment_and_after_reopen() {
    read_committed_stops_mid_segment(false, "txn-mid-segment");
}

#[test]
fn read_committed_stops_mid_segment_after_reopen_from_a_snapshot() {
    read_committed_stops_mid_segment(true, "txn-mid-segment-snapshot");
}

#[test]
fn follower_replays_transactions_as_the_leader_wrote_them() {
    let dir = crate::test_dir("txn-follower");
    run(move || async move {
        let leader = open_log(&dir.join("leader"), settings(4096)).await;
        let follower = open_log(&dir.join("follower"), settings(4096)).await;
        let mut n = 0;
        for round in 0..6 {
            append_txn(&leader, 5, 0, round * 3, n, 3).await;
            n += 3;
            append(&leader, &make_batch(n, 4, 1000)).await;
            n += 4;
            if round < 5 {
                marker(&leader, 5, 0, round % 2 == 0);
                n += 1;
            }
        }
        // A marker that bumps the epoch of a producer without a transaction here.
        leader.borrow_mut().append_txn_marker(ProducerId(6), 4, false, 2, Epoch(0)).unwrap();
        flush(&leader).await.unwrap();
        let leo = leader.borrow().log_end_offset();
        while follower.borrow().log_end_offset() < leo {
            let at = follower.borrow().log_end_offset();
            let (records, infos) = fetch_as_follower(&leader, at, 500).await;
            follower.borrow_mut().append_replicated(&records, &infos).unwrap();
            flush(&follower).await.unwrap();
        }
        assert_eq!(replica_bytes(&follower, Offset(0)).await, replica_bytes(&leader, Offset(0)).await);
        let (l, f) = (leader.borrow(), follower.borrow());
        assert_eq!(f.producers.txn_state(), l.producers.txn_state());
        assert_eq!(l.producers.txn_state().1.len(), 2, "rounds 1 and 3 abort");
        assert_eq!(f.last_stable_offset(), l.last_stable_offset());
        for pid in [ProducerId(5), ProducerId(6)] {
            assert_eq!(f.producers.get(pid), l.producers.get(pid), "{pid:?}");
        }
        assert_eq!(
            f.producers.check_marker(ProducerId(6), 3, 2),
            Err(tidelog_protocol::ErrorCode::InvalidProducerEpoch)
        );
    });
}

/// `(logical start, length, unwritten)` of each extent of `path` that
/// overlaps `[start, start + len)`, from FIEMAP (synced first).
fn extents(path: &std::path::Path, start: u64, len: u64) -> Vec<(u64, u64, bool)> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 0x1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
    const MAX: usize = 64;
    // struct fiemap (32 bytes) followed by MAX struct fiemap_extent (56 bytes each).
    let mut buf = vec![0u64; (32 + 56 * MAX) / 8];
    buf[0] = start;
    buf[1] = len;
    // SAFETY: the buffer is u64-aligned and sized for the header and MAX extents.
    let header = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u32, 8) };
    header[4] = FIEMAP_FLAG_SYNC;
    header[6] = MAX as u32;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: FS_IOC_FIEMAP reads and fills the struct laid out above.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    assert_eq!(rc, 0, "FIEMAP on {}: {}", path.display(), std::io::Error::last_os_error());
    let mapped = (buf[2] >> 32) as usize;
    (0..mapped.min(MAX))
        .map(|i| {
            let e = &buf[4 + i * 7..4 + (i + 1) * 7];
            let flags = e[5] as u32;
            (e[0], e[2], flags & FIEMAP_EXTENT_UNWRITTEN != 0)
        })
        .collect()
}

#[test]
fn zero_ahead_writes_zeros_past_the_log_end_and_never_over_it() {
    let dir = crate::test_dir("partition-zero-ahead");
    run(move || async move {
        // 64 KiB preallocated (unwritten), 16 KiB kept zeroed ahead by small rounds.
        let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.clone(), settings(1 << 30)).await.unwrap();
        let mut data = Vec::new();
        let mut n = 0;
        // Small rounds, one batch each, across several zero-ahead windows.
        while data.len() < 40 * 1024 {
            let b = make_batch(n, 3, 1000);
            data.extend_from_slice(&b);
            append(&log, &b).await;
            flush(&log).await.unwrap();
            n += 3;
        }
        let path = crate::storage::segment::log_path(&dir, Offset(0));
        let file = std::fs::read(&path).unwrap();
        let end = data.len();
        // Every batch is intact (CRC) at its place, with its offsets.
        let mut at = 0;
        let mut next = 0i64;
        while at < end {
            let h = BatchHeader::parse(&file[at..]).unwrap();
            let size = h.size_bytes();
            assert!(batch::validate(&file[at..at + size], usize::MAX).is_ok(), "batch at {at} damaged");
            assert_eq!(h.base_offset().0, next, "batch at {at}");
            next = h.last_offset().next().0;
            at += size;
        }
        assert_eq!((at, next), (end, n as i64), "the file holds exactly the log");
        let data_end = crate::storage::align_up(end as u64);
        // The file past the log's end reads zeros, and the next rounds' pages
        // are written blocks, not unwritten extents.
        assert!(file[end..].iter().all(|b| *b == 0), "bytes past the log end are zeros");
        let ahead = extents(&path, data_end, 8 * 1024);
        assert!(!ahead.is_empty(), "the 8 KiB past the log end are allocated: {ahead:?}");
        for (start, len, unwritten) in &ahead {
            if *start < data_end + 8 * 1024 && start + len > data_end {
                assert!(!unwritten, "extent {start}+{len} past the log end is still unwritten: {ahead:?}");
            }
        }
        // Recovery reads the zeros as the end of the log, and appends go on.
        drop(log);
        let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.clone(), settings(1 << 30)).await.unwrap();
        assert_eq!(log.borrow().high_watermark, Offset(n as i64));
        assert_eq!(read_all(&log).await, expected(n));
        append(&log, &make_batch(n, 3, 1000)).await;
        flush(&log).await.unwrap();
        assert_eq!(read_all(&log).await, expected(n + 3));
    });
}

#[test]
fn segment_jitter_takes_a_fixed_share_off_the_roll_age() {
    let mut s = settings(1 << 30);
    s.roll_ms = 10_000;
    assert_eq!(s.roll_ms_for(Offset(7)), 10_000, "no jitter");
    s.roll_jitter_ms = 1_000;
    let ages: Vec<u64> = (0..64).map(|b| s.roll_ms_for(Offset(b * 1000))).collect();
    assert!(ages.iter().all(|a| (9_001..=10_000).contains(a)), "{ages:?}");
    assert!(ages.iter().collect::<std::collections::HashSet<_>>().len() > 16, "segments get different shares");
    assert_eq!(s.roll_ms_for(Offset(5000)), s.roll_ms_for(Offset(5000)), "the same segment, the same share");
    // Jitter larger than the roll age never makes it zero or wrap.
    s.roll_jitter_ms = u64::MAX;
    assert!((0..64).all(|b| s.roll_ms_for(Offset(b)) <= 10_000));
}

#[test]
fn a_full_offset_index_rolls_the_segment() {
    let dir = crate::test_dir("partition-index-full");
    run(move || async move {
        // Room for 4 index entries (32 bytes), one entry per batch (interval 256).
        let mut s = settings(1 << 30);
        s.segment.index_bytes_max = 32;
        let log = PartitionLog::open(Rc::from("t"), PartitionId(0), dir.clone(), s).await.unwrap();
        for i in 0..20 {
            append(&log, &make_batch(i * 3, 3, 1000)).await;
            flush(&log).await.unwrap();
        }
        {
            let l = log.borrow();
            assert!(l.segments.len() >= 3, "segments {:?}", l.inactive_segments());
            for seg in &l.segments {
                let entries = seg.index.offsets.len();
                assert!(entries <= 4, "segment {} has {entries} index entries", seg.base_offset.0);
            }
        }
        assert_eq!(read_all(&log).await, expected(60));
    });
}
