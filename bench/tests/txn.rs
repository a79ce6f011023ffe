//! Black-box: `run --transactions` against the real tidelog broker
//! (TIDELOG_BIN, or ../target/release/tidelog; skipped with a message when
//! it is not built). The idempotent comparison run is read back with
//! read_committed and counted; the transactional runs either complete and
//! verify (a broker with transactions) or fail before any run with the
//! reason (a broker without them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: a failed unwrap is a failed test

mod common;

use common::start_broker_or_skip;

use tidelog_bench::client::Conn;
use tidelog_bench::txn::{self, TxnOptions};
use tidelog_bench::workload::Workload;
use tidelog_protocol::messages::ApiKey;

fn options(bootstrap: &str, topic: &str, sizes: Vec<u32>) -> TxnOptions {
    let mut w = Workload::default();
    w.topic.name = topic.into();
    w.topic.partitions = 4;
    w.producer.count = 2;
    w.producer.record_size_bytes = 100;
    w.producer.batch_size_bytes = 4096;
    w.consumer.count = 0;
    w.run.records = 6_000;
    w.run.duration_s = 0.0;
    w.run.warmup_s = 0.0;
    TxnOptions {
        bootstrap: bootstrap.into(),
        workload: w,
        sizes,
        transactional_id_prefix: format!("bench-txn-it-{}", std::process::id()),
        transaction_timeout_ms: 60_000,
        txn_retry_backoff_ms: 20,
        verify: true,
        progress: false,
        seed: 7,
    }
}

#[test]
fn idempotent_run_reads_back_exactly_once_with_read_committed() {
    let Some(broker) = start_broker_or_skip("bench-txn") else { return };
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let o = txn::run_comparison(&options(&bootstrap, "txn-it-idem", Vec::new())).unwrap();
    assert_eq!(o.runs.len(), 1);
    let r = &o.runs[0].0;
    assert_eq!(r.label, "idempotent");
    assert!(!r.transactional);
    // 2 producers x 3000 records, rounded up to whole 4 KiB batches.
    assert!(r.records_total >= 6_000 && r.records_total < 6_000 + 2 * 40, "{}", r.records_total);
    assert_eq!(r.throughput.records, r.records_total, "no warm-up: everything is measured");
    assert_eq!(r.latency_us.produce_ack_batch.count, r.batches);
    assert_eq!(r.latency_us.commit.count, 0);
    let v = o.verify.as_ref().unwrap();
    assert_eq!(v.problems, 0, "{:?}", v.first_problems);
    assert_eq!((v.records_expected, v.records_read), (r.records_total, r.records_total));
    assert_eq!((v.missing, v.duplicates, v.unexpected, v.foreign_records), (0, 0, 0, 0));
    assert_eq!((v.commit_markers_expected, v.commit_markers_read, v.wrong_transactional_bit), (0, 0, 0));

    // The report: table, txn-summary.json and .hgrm files.
    let inputs = txn::TxnSummaryInputs {
        name: "txn-it".into(),
        started_at_unix_s: 0,
        workload: Workload::default(),
        bootstrap: bootstrap.clone(),
        broker_label: "tidelog".into(),
        broker_version: "test".into(),
        host: tidelog_bench::host::host_info(&broker.dir),
        baseline: None,
        hiccups: None,
        transaction_timeout_ms: 60_000,
        txn_retry_backoff_ms: 20,
    };
    let mut summary = txn::build_summary(inputs, &o);
    let dir = broker.dir.join("report");
    let files = txn::write_run_dir(&dir, &mut summary, &o).unwrap();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["idempotent-produce-ack-batch.hgrm", "latency.svg", "report.txt", "txn-summary.json"]);
    let table = std::fs::read_to_string(dir.join("report.txt")).unwrap();
    eprintln!("{table}");
    assert!(table.contains("idempotent produce ack (batch)"), "{table}");
    assert!(table.contains("verify (read_committed):") && table.contains("| OK"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("txn-summary.json")).unwrap()).unwrap();
    assert_eq!(json["schema"], "tidelog-bench/txn-summary/v1");
    assert_eq!(json["runs"][0]["label"], "idempotent");
    assert_eq!(json["runs"][0]["throughput"]["records"], r.records_total);
    assert_eq!(json["verify"]["problems"], 0);
}

#[test]
fn transactions_verify_or_fail_with_the_reason() {
    let Some(broker) = start_broker_or_skip("bench-txn") else { return };
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let versions = Conn::connect(&bootstrap, "probe").unwrap().versions;
    let supported = versions.broker_supports(ApiKey::AddPartitionsToTxn) && versions.broker_supports(ApiKey::EndTxn);
    // 40 batches per transaction: several requests of one producer to one
    // partition in flight at once, the first of them held for KIP-890
    // verification; their appends must stay in sequence order.
    let result = txn::run_comparison(&options(&bootstrap, "txn-it-txn", vec![1, 3, 40]));
    if !supported {
        let e = format!("{:#}", result.err().expect("a broker without AddPartitionsToTxn/EndTxn must fail the run"));
        assert!(e.contains("the broker does not support transactions"), "{e}");
        eprintln!("broker without transactions: {e}");
        return;
    }
    let o = result.unwrap();
    let labels: Vec<&str> = o.runs.iter().map(|r| r.0.label.as_str()).collect();
    assert_eq!(labels, ["idempotent", "txn-1", "txn-3", "txn-40"]);
    for (r, _) in &o.runs[1..] {
        assert!(r.transactional);
        assert!(r.transactions_total > 0);
        assert_eq!(r.latency_us.commit.count, r.transactions_total);
        assert_eq!(r.latency_us.transaction.count, r.transactions_total);
        assert_eq!(r.batches, r.transactions_total * u64::from(r.batches_per_transaction));
        assert_eq!(r.transactional_ids.len(), 2);
    }
    let v = o.verify.unwrap();
    assert_eq!(v.problems, 0, "{:?}", v.first_problems);
    let total: u64 = o.runs.iter().map(|r| r.0.records_total).sum();
    assert_eq!((v.records_expected, v.records_read), (total, total));
    assert!(v.commit_markers_expected > 0);
    assert_eq!(v.commit_markers_read, v.commit_markers_expected);
}
