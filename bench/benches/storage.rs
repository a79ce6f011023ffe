//! Criterion micro-benchmarks of the broker's storage hot paths, on the
//! engine's own types:
//!
//! - `accumulator_append`: what a produce costs the accumulator per batch
//!   before any I/O: `Segment::append` (offset assignment, sparse offset and
//!   time index upkeep, queueing the batch as `Bytes`), alone and after the
//!   CRC validation every produced batch goes through.
//! - `accumulator_plan_flush`: turning the pending batches into page-aligned
//!   DMA buffers (one copy), inside a glommio executor because the buffers
//!   come from a `DmaFile`; nothing is written.
//! - `index_lookup`: `SegmentIndex::position_for` (fetch by offset) and
//!   `offset_for_time` (ListOffsets by time) over small and full segments.
//!
//! Needs the `engine-benches` feature (it links the engine):
//! `cargo bench -p tidelog-bench --features engine-benches` runs these with
//! the protocol benches.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidelog_engine::storage::index::{IndexEntry, SegmentIndex, TimeEntry};
use tidelog_engine::storage::segment::{Segment, SegmentSettings};
use tidelog_protocol::batch::{build_batch, validate, BatchInfo, ProducerFields, RecordRef};
use tidelog_protocol::Offset;

/// The broker's defaults (log.index.interval.bytes, log.preallocate.bytes,
/// log.segment.bytes, flush write size).
fn settings() -> SegmentSettings {
    SegmentSettings {
        index_interval_bytes: 4096,
        preallocate_bytes: 32 << 20,
        segment_bytes: 1 << 30,
        index_bytes_max: 10 << 20,
        flush_write_bytes_max: 1 << 20,
    }
}

fn batch_of(records: usize, value_bytes: usize) -> (Bytes, BatchInfo) {
    let value = vec![0x5au8; value_bytes];
    let recs: Vec<RecordRef<'_>> = (0..records)
        .map(|_| RecordRef { key: None, value: Some(&value), headers: &[], timestamp_delta_ms: 0 })
        .collect();
    let b = build_batch(&recs, 1_700_000_000_000, ProducerFields::default());
    let info = match validate(&b, usize::MAX) {
        Ok(i) => i,
        Err(e) => panic!("built batch does not validate: {e}"),
    };
    (b, info)
}

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("tidelog-bench-storage-{}", std::process::id()))
}

/// Times `iters` calls of `f`, on a fresh segment every 4096.
fn appends(dir: &Path, iters: u64, mut f: impl FnMut(&mut Segment)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(4096);
        let mut seg = Segment::new(dir, Offset(0), 0);
        let start = Instant::now();
        for _ in 0..n {
            f(&mut seg);
        }
        total += start.elapsed();
        black_box(&seg);
        left -= n;
    }
    total
}

fn bench_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("accumulator_append");
    let s = settings();
    let dir = scratch_dir();
    for (records, value) in [(1usize, 100usize), (16, 1024), (128, 1024)] {
        let (b, info) = batch_of(records, value);
        g.throughput(Throughput::Bytes(b.len() as u64));
        let id = format!("{records}x{value}B");
        // Appends run against one segment 4096 batches at a time, so the
        // pending queue and the indexes grow as they do in a real segment;
        // making and dropping segments is not timed.
        g.bench_with_input(BenchmarkId::new("segment_append", &id), &(&b, &info), |bench, (b, info)| {
            bench.iter_custom(|iters| appends(&dir, iters, |seg| seg.append(Bytes::clone(b), info, &s)))
        });
        g.bench_with_input(BenchmarkId::new("validate_and_append", &id), &b, |bench, b| {
            bench.iter_custom(|iters| {
                appends(&dir, iters, |seg| match validate(b, usize::MAX) {
                    Ok(info) => seg.append(Bytes::clone(b), &info, &s),
                    Err(e) => panic!("{e}"),
                })
            })
        });
    }
    g.finish();
}

fn bench_plan_flush(c: &mut Criterion) {
    let dir = scratch_dir();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("accumulator_plan_flush skipped: {}: {e}", dir.display());
        return;
    }
    let ex = match glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).io_memory(8 << 20).make() {
        Ok(ex) => ex,
        Err(e) => {
            eprintln!("accumulator_plan_flush skipped: no glommio executor here ({e})");
            return;
        }
    };
    ex.run(async {
        let path = dir.join("plan-flush.log");
        let file = match glommio::io::OpenOptions::new().read(true).write(true).create(true).dma_open(&path).await {
            Ok(f) => Rc::new(f),
            Err(e) => {
                eprintln!("accumulator_plan_flush skipped: {} cannot be opened O_DIRECT ({e})", path.display());
                return;
            }
        };
        let s = settings();
        let mut g = c.benchmark_group("accumulator_plan_flush");
        for (batches, records, value) in [(1usize, 16usize, 1024usize), (16, 64, 1024)] {
            let (b, info) = batch_of(records, value);
            let mut seg = Segment::new(&dir, Offset(0), 0);
            for _ in 0..batches {
                seg.append(b.clone(), &info, &s);
            }
            g.throughput(Throughput::Bytes(seg.end_bytes));
            g.bench_function(BenchmarkId::from_parameter(format!("{batches}x{}B", b.len())), |bench| {
                bench.iter(|| black_box(seg.plan_flush(file.clone(), &s)))
            });
        }
        g.finish();
        let _ = file.close_rc().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// An index as a segment of `log_bytes` written in 16 KiB batches of 16
/// records would have at the default index interval.
fn index_of(log_bytes: u64) -> SegmentIndex {
    let (batch_bytes, batch_records) = (16_384u64, 16u32);
    let mut idx = SegmentIndex::default();
    let (mut pos, mut rel, mut since) = (0u64, 0u32, u64::MAX);
    while pos < log_bytes {
        if since >= settings().index_interval_bytes {
            idx.offsets.push(IndexEntry { relative_offset: rel, position: pos as u32 });
            idx.times.push(TimeEntry { timestamp_ms: 1_700_000_000_000 + rel as i64, relative_offset: rel });
            since = 0;
        }
        since += batch_bytes;
        pos += batch_bytes;
        rel += batch_records;
    }
    idx
}

fn bench_index(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_lookup");
    for (name, log_bytes) in [("1MiB_segment", 1u64 << 20), ("1GiB_segment", 1 << 30)] {
        let idx = index_of(log_bytes);
        let last = idx.offsets.last().map(|e| e.relative_offset as i64).unwrap_or(0);
        // Spread targets over the whole segment (fixed stride, so every run
        // looks the same up the same entries).
        let targets: Vec<i64> = (0..1024).map(|i| (i * 7919) % (last + 1)).collect();
        let base = Offset(1_000_000);
        g.throughput(Throughput::Elements(targets.len() as u64));
        g.bench_function(BenchmarkId::new("position_for", format!("{name}_{}_entries", idx.offsets.len())), |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for &t in &targets {
                    sum = sum.wrapping_add(idx.position_for(base, Offset(base.0 + t)));
                }
                black_box(sum)
            })
        });
        g.bench_function(BenchmarkId::new("offset_for_time", format!("{name}_{}_entries", idx.times.len())), |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for &t in &targets {
                    sum = sum.wrapping_add(idx.offset_for_time(1_700_000_000_000 + t) as u64);
                }
                black_box(sum)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_append, bench_plan_flush, bench_index);
criterion_main!(benches);
