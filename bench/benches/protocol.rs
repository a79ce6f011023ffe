//! Criterion micro-benchmarks of the protocol hot paths the broker runs per
//! request: record batch validation with CRC-32C, request header decoding,
//! and the bench client's own batch building and murmur2 partitioning.
//!
//! `cargo bench -p tidelog-bench --features engine-benches` runs these and
//! the storage benches (benches/storage.rs) in one go; without the feature,
//! only these.

use bytes::{Buf, Bytes};
use criterion::{black_box, criterion_group, BenchmarkId, Criterion, Throughput};
use tidelog_bench::murmur2::partition_for_key;
use tidelog_bench::records::BatchBuilder;
use tidelog_bench::workload::Codec;
use tidelog_protocol::batch::{build_batch, validate, ProducerFields, RecordRef};
use tidelog_protocol::header::{decode_request_header, encode_request};
use tidelog_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use tidelog_protocol::messages::{ApiKey, FetchRequest, ProduceRequest, RequestHeader, TopicName};
use tidelog_protocol::StrBytes;

fn batch_of(records: usize, value_bytes: usize) -> Bytes {
    let value = vec![0x5au8; value_bytes];
    let recs: Vec<RecordRef<'_>> = (0..records)
        .map(|_| RecordRef { key: None, value: Some(&value), headers: &[], timestamp_delta_ms: 0 })
        .collect();
    build_batch(&recs, 1_700_000_000_000, ProducerFields::default())
}

fn bench_validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_validate_crc");
    for (records, value) in [(1usize, 100usize), (100, 1024), (1000, 1024)] {
        let b = batch_of(records, value);
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("{records}x{value}B")), &b, |bench, b| {
            bench.iter(|| validate(black_box(b), usize::MAX))
        });
    }
    g.finish();
}

fn frame_for(header: &RequestHeader, body: &impl tidelog_protocol::Encodable) -> Bytes {
    let mut f = match encode_request(header, body) {
        Ok(f) => f.freeze(),
        Err(e) => panic!("encode: {e}"),
    };
    f.advance(4);
    f
}

fn bench_header_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_header_decode");
    let client = Some(StrBytes::from_static_str("tidelog-bench-producer-0"));
    let produce = ProduceRequest::default().with_acks(-1).with_timeout_ms(30_000).with_topic_data(vec![
        TopicProduceData::default().with_name(TopicName(StrBytes::from_static_str("bench"))).with_partition_data(vec![
            PartitionProduceData::default().with_index(0).with_records(Some(batch_of(10, 100))),
        ]),
    ]);
    for (name, key, version) in [("produce_v9_flexible", ApiKey::Produce, 9i16), ("produce_v8", ApiKey::Produce, 8)] {
        let h = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(client.clone());
        let frame = frame_for(&h, &produce);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut f = frame.clone();
                decode_request_header(black_box(&mut f))
            })
        });
    }
    let h = RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(12)
        .with_correlation_id(9)
        .with_client_id(client);
    let frame = frame_for(&h, &FetchRequest::default());
    g.bench_function("fetch_v12_flexible", |b| {
        b.iter(|| {
            let mut f = frame.clone();
            decode_request_header(black_box(&mut f))
        })
    });
    g.finish();
}

fn bench_client(c: &mut Criterion) {
    let value = vec![1u8; 1024];
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch_build_100x1KiB", |b| {
        b.iter(|| {
            let mut bb = BatchBuilder::new(1_700_000_000_000, 128 * 1024);
            for i in 0..100 {
                bb.append(1_700_000_000_000 + i, None, &value[..20], &value[20..]);
            }
            bb.finish(Codec::None)
        })
    });
    g.finish();
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    c.bench_function("murmur2_partition_1000_keys", |b| {
        b.iter(|| keys.iter().map(|k| partition_for_key(k.as_bytes(), 64)).sum::<i32>())
    });
}

criterion_group!(benches, bench_validate, bench_header_decode, bench_client);

fn main() {
    if !cfg!(feature = "engine-benches") {
        eprintln!(
            "note: the storage benches (accumulator append, index lookup) are off; \
             `cargo bench -p tidelog-bench --features engine-benches` runs every bench"
        );
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
