//! Black-box: the bench binary against the real tidelog broker. Starts
//! `tidelog` (TIDELOG_BIN, or ../target/release/tidelog), runs a small keyed
//! workload (2 producers, 1 consumer, 20k records), then reads the topic
//! back with the bench's client and checks counts, per-partition order and
//! that every keyed record sits where Kafka's default partitioner puts it.
//! Skips with a message when the broker binary is not built.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: a failed unwrap is a failed test

mod common;

use common::{start_broker_or_skip, Broker};

use std::collections::HashMap;
use std::process::{Command, Stdio};

use tidelog_bench::client::{ensure_topic, list_offsets, Conn};
use tidelog_bench::murmur2::partition_for_key;
use tidelog_bench::records::for_each_fetched_record;
use tidelog_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use tidelog_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use tidelog_protocol::StrBytes;

#[test]
fn bench_against_real_broker_counts_order_and_key_placement() {
    let Some(broker) = start_broker_or_skip("bench-it") else { return };
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let out = broker.dir.join("run");
    let topic = "bench-it";
    let partitions = 6;
    let records = 20_000u64;
    let status = Command::new(env!("CARGO_BIN_EXE_tidelog-bench"))
        .args(["run", "--bootstrap", &bootstrap, "--no-baseline", "--quiet", "--verify", "--strict"])
        .args(["--topic", topic, "--partitions", &partitions.to_string()])
        .args(["--producers", "2", "--consumers", "1", "--records", &records.to_string()])
        .args(["--keys", "round-robin", "--key-count", "997", "--record-size", "64"])
        .args(["--warmup-s", "0", "--linger-ms", "2", "--batch-size", "16384", "--cores", "0-1"])
        .arg("--out")
        .arg(&out)
        .arg("--data-dir")
        .arg(&broker.dir)
        .status()
        .expect("run tidelog-bench");
    assert!(status.success(), "tidelog-bench run failed: {status}");

    // The bench's own accounting.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let r = &summary["results"];
    assert_eq!(r["produced_total"], records);
    assert_eq!(r["consumed_total_per_group"], serde_json::json!([records]));
    assert_eq!(r["failed_records"], 0);
    let v = &summary["verify"];
    assert_eq!(v["records"], records);
    assert_eq!(v["keyed_records"], records);
    assert_eq!(v["key_partition_mismatches"], 0);
    assert_eq!(v["producer_order_violations"], 0);
    assert_eq!(v["offset_regressions"], 0);
    assert!(r["latency_us"]["produce_ack_record"]["count"].as_u64().unwrap() == records);
    assert!(r["latency_us"]["end_to_end"]["count"].as_u64().unwrap() == records);
    // The host hiccup meter ran on every core for the whole run (1 ms sleeps)
    // and the report shows it beside the latencies.
    let h = &summary["hiccups"];
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(h["interval_us"], 1000);
    assert_eq!(h["per_cpu"].as_array().unwrap().len(), cores, "{h}");
    let run_s = h["seconds"].as_f64().unwrap();
    for c in h["per_cpu"].as_array().unwrap() {
        let wakeups = c["late_us"]["count"].as_f64().unwrap();
        assert!(wakeups > 0.0 && wakeups <= run_s * 1000.0 + 1.0, "{c} in {run_s} s");
    }
    let table = std::fs::read_to_string(out.join("report.txt")).unwrap();
    assert!(table.contains("host hiccup (cpu 0)") && table.contains("steal"), "{table}");

    // Broker efficiency: the broker was found by its listening port and
    // read from /proc over the produce window.
    let e = &r["efficiency"];
    assert_eq!(e["source"], "proc", "{e}");
    let detail = e["source_detail"].as_str().unwrap();
    assert!(detail.contains(&format!("pid {} (tidelog)", broker.child.id())), "{detail}");
    assert_efficiency_plausible(e, cores);
    let batch_bytes = e["produced_batch_bytes"].as_u64().unwrap();
    assert!(batch_bytes > records * 64, "batches hold the 64 B values and more: {e}");
    assert_eq!(e["produced_value_bytes"], records * 64, "{e}");
    assert_eq!(e["per_pid"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(e["per_pid"][0]["pid"], broker.child.id(), "{e}");
    assert!(
        table.contains("broker CPU-s per GB ingested") && table.contains("write amplification (broker)"),
        "{table}"
    );
    assert!(table.contains("device-wide"), "{table}");

    // Independently: read everything back and recompute.
    let (cluster, _) = ensure_topic(&bootstrap, topic, partitions, 1, false).unwrap();
    assert_eq!(cluster.partitions.len(), partitions as usize);
    let ends = list_offsets(&cluster, topic, -1).unwrap();
    assert_eq!(ends.iter().sum::<i64>() as u64, records, "end offsets {ends:?}");
    let mut total = 0u64;
    let mut keys_seen: HashMap<Vec<u8>, i32> = HashMap::new();
    for p in &cluster.partitions {
        let mut conn = Conn::connect(cluster.broker_addr(p.leader).unwrap(), "bench-it-reader").unwrap();
        let mut next = 0i64;
        let mut last_seq: HashMap<u32, u64> = HashMap::new();
        while next < ends[p.index as usize] {
            let req = FetchRequest::default().with_max_wait_ms(100).with_max_bytes(1 << 20).with_topics(vec![
                FetchTopic::default().with_topic(TopicName(StrBytes::from_static_str(topic))).with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(p.index)
                        .with_fetch_offset(next)
                        .with_partition_max_bytes(1 << 20),
                ]),
            ]);
            let resp: FetchResponse = conn.call(ApiKey::Fetch, &req).unwrap();
            let pd = &resp.responses[0].partitions[0];
            assert_eq!(pd.error_code, 0);
            let set = pd.records.clone().unwrap_or_default();
            let mut expect = next;
            let after = for_each_fetched_record(&set, true, |rec| {
                if rec.offset < expect {
                    return;
                }
                assert_eq!(rec.offset, expect, "offsets contiguous in partition {}", p.index);
                expect += 1;
                let key = rec.key.expect("keyed").to_vec();
                assert_eq!(partition_for_key(&key, partitions), p.index, "key {:?}", String::from_utf8_lossy(&key));
                if let Some(prev) = keys_seen.insert(key.clone(), p.index) {
                    assert_eq!(prev, p.index, "a key on two partitions");
                }
                let value = rec.value.unwrap();
                assert_eq!(value.len(), 64);
                let producer = u32::from_be_bytes(value[8..12].try_into().unwrap());
                let seq = u64::from_be_bytes(value[12..20].try_into().unwrap());
                if let Some(prev) = last_seq.insert(producer, seq) {
                    assert!(seq > prev, "producer {producer} out of order in partition {}", p.index);
                }
                total += 1;
            })
            .unwrap();
            next = after.expect("progress");
            assert_eq!(next, expect);
        }
        assert_eq!(last_seq.len(), 2, "both producers wrote to partition {}", p.index);
    }
    assert_eq!(total, records);
    assert_eq!(keys_seen.len(), 997);

    // Report files exist and the charts are well-formed.
    for f in ["latency.svg", "throughput.svg"] {
        roxmltree::Document::parse(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap();
    }
}

/// The efficiency figures of an acks=all run that wrote data: broker CPU per
/// GB above zero and no more than the host's cores could give; the broker
/// wrote at least about what it acknowledged (an ack means fdatasync'd).
fn assert_efficiency_plausible(e: &serde_json::Value, cores: usize) {
    let window_s = e["window_s"].as_f64().unwrap();
    assert!(window_s > 0.0, "{e}");
    let cpu_s = e["broker_cpu_s"].as_f64().unwrap();
    assert!(cpu_s >= 0.0 && cpu_s <= window_s * cores as f64 * 1.1 + 0.05, "broker CPU {cpu_s} s in {window_s} s: {e}");
    // /proc counts CPU time in clock ticks (10 ms): a window of a few
    // hundred milliseconds can honestly read zero, a longer one cannot.
    assert!(cpu_s > 0.0 || window_s < 0.5, "no broker CPU time over {window_s} s of acks=all produce: {e}");
    let per_gb = e["broker_cpu_s_per_gb"].as_f64().unwrap();
    let gb = e["produced_batch_bytes"].as_f64().unwrap() / 1e9;
    assert!(per_gb >= 0.0 && (per_gb * gb - cpu_s).abs() < 1e-6, "{e}");
    let wa = e["write_amplification"].as_f64().unwrap();
    assert!(wa >= 0.9, "acks=all: every acknowledged byte was written: {e}");
    let written = e["broker_bytes_written"].as_f64().unwrap();
    assert!((written / 1e9 / gb - wa).abs() < 1e-6, "{e}");
    assert!(e["cpu_unavailable"].is_null() && e["write_unavailable"].is_null(), "{e}");
    // Device-wide: a figure, or the reason there is none (e.g. not a block device).
    assert!(e["device_write_amplification"].is_f64() || e["device_unavailable"].is_string(), "{e}");
}

/// Runs `tidelog-bench run` against `broker` with `args`; returns summary.json.
fn bench_run(broker: &Broker, out: &str, args: &[&str]) -> serde_json::Value {
    let out = broker.dir.join(out);
    let output = Command::new(env!("CARGO_BIN_EXE_tidelog-bench"))
        .args(["run", "--bootstrap", &format!("127.0.0.1:{}", broker.port), "--quiet", "--cores", "0-1"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--data-dir")
        .arg(&broker.dir)
        .output()
        .expect("run tidelog-bench");
    assert!(
        output.status.success(),
        "tidelog-bench {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// Committed offsets of `group` for `topic`, by partition (OffsetFetch, no membership).
fn committed_offsets(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    use tidelog_protocol::messages::offset_fetch_request::{OffsetFetchRequestGroup, OffsetFetchRequestTopics};
    use tidelog_protocol::messages::{GroupId, OffsetFetchRequest, OffsetFetchResponse};
    let addr = tidelog_bench::group::find_coordinator(bootstrap, group, "bench-it-offsets").unwrap();
    let mut conn = Conn::connect(&addr, "bench-it-offsets").unwrap();
    assert!(conn.versions.get(ApiKey::OffsetFetch).unwrap() >= 8, "tidelog speaks OffsetFetch v8+");
    let req = OffsetFetchRequest::default().with_groups(vec![OffsetFetchRequestGroup::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_topics(Some(vec![OffsetFetchRequestTopics::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_indexes((0..partitions).collect())]))]);
    let resp: OffsetFetchResponse = conn.call(ApiKey::OffsetFetch, &req).unwrap();
    let mut out = vec![-1i64; partitions as usize];
    for p in &resp.groups[0].topics[0].partitions {
        assert_eq!(p.error_code, 0);
        out[p.partition_index as usize] = p.committed_offset;
    }
    out
}

#[test]
fn consumer_groups_read_every_record_once_per_group() {
    let Some(broker) = start_broker_or_skip("bench-it") else { return };
    let bootstrap = format!("127.0.0.1:{}", broker.port);
    let (topic, partitions, records) = ("bench-groups", 6, 60_000u64);
    // Paced, so all nine members are in their groups while records flow and
    // the joins of the later members rebalance the earlier ones mid-stream.
    let s = bench_run(
        &broker,
        "groups",
        &[
            "--no-baseline",
            "--verify",
            "--strict",
            "--topic",
            topic,
            "--partitions",
            "6",
            "--producers",
            "2",
            "--consumers",
            "3",
            "--groups",
            "3",
            "--consumer-mode",
            "group",
            "--assignor",
            "range",
            "--records",
            "60000",
            "--rate-records",
            "20000",
            "--record-size",
            "100",
            "--keys",
            "round-robin",
            "--key-count",
            "101",
            "--warmup-s",
            "0",
            "--commit-interval-ms",
            "200",
            "--heartbeat-interval-ms",
            "200",
        ],
    );
    let r = &s["results"];
    assert_eq!(r["produced_total"], records);
    assert_eq!(r["consumed_total_per_group"], serde_json::json!([records, records, records]));
    assert_eq!(r["expected_per_group"], records);
    let v = &s["verify"];
    assert_eq!(v["records"], 3 * records, "every group checked every record");
    assert_eq!(v["keyed_records"], 3 * records);
    assert_eq!(v["duplicate_offsets"], 0, "{v}");
    assert_eq!(v["missing_offsets"], 0, "{v}");
    assert_eq!(v["offset_regressions"], 0);
    assert_eq!(v["producer_order_violations"], 0);
    assert_eq!(v["key_partition_mismatches"], 0);
    let ids: Vec<String> = r["group_ids"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 3);
    assert!(r["group_generations"].as_u64().unwrap() >= 9, "each of the 9 members joined: {r}");
    assert!(r["group_commits"].as_u64().unwrap() > 0);

    // What the groups left behind: every partition committed at its end.
    let (cluster, _) = ensure_topic(&bootstrap, topic, partitions, 1, false).unwrap();
    let ends = list_offsets(&cluster, topic, -1).unwrap();
    assert_eq!(ends.iter().sum::<i64>() as u64, records);
    for g in &ids {
        assert_eq!(committed_offsets(&bootstrap, g, topic, partitions), ends, "group {g}");
    }
}

#[test]
fn consumer_only_run_reads_an_existing_backlog() {
    let Some(broker) = start_broker_or_skip("bench-it") else { return };
    let backlog = 50_000u64;
    let metrics_url = format!("http://127.0.0.1:{}/metrics", broker.metrics_port);
    let fill = bench_run(
        &broker,
        "fill",
        &[
            "--metrics-url",
            &metrics_url,
            "--acks",
            "all",
            "--no-baseline",
            "--topic",
            "backlog",
            "--partitions",
            "4",
            "--producers",
            "2",
            "--consumers",
            "0",
            "--records",
            "50000",
            "--record-size",
            "200",
            "--warmup-s",
            "0",
        ],
    );
    assert_eq!(fill["results"]["produced_total"], backlog);
    // Broker efficiency from the broker's own Prometheus counters.
    let e = &fill["results"]["efficiency"];
    assert_eq!(e["source"], "prometheus", "{e}");
    assert_eq!(e["source_detail"], metrics_url.as_str(), "{e}");
    assert_eq!(e["per_pid"], serde_json::json!([]), "{e}");
    assert_efficiency_plausible(e, std::thread::available_parallelism().unwrap().get());
    assert_eq!(fill["workload"]["producer"]["acks"], -1);

    // A quick baseline, so the read is reported against loopback.
    let baseline = broker.dir.join("baseline.json");
    let status = Command::new(env!("CARGO_BIN_EXE_tidelog-bench"))
        .args(["baseline", "--write-seconds", "0.2", "--fsyncs", "20", "--loopback-seconds", "0.2"])
        .arg("--dir")
        .arg(&broker.dir)
        .arg("--out")
        .arg(&baseline)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let baseline = baseline.to_str().unwrap();

    // Part of the backlog: exactly the budget, split over two consumers.
    let s = bench_run(
        &broker,
        "read-part",
        &[
            "--baseline",
            baseline,
            "--verify",
            "--strict",
            "--topic",
            "backlog",
            "--no-create-topic",
            "--producers",
            "0",
            "--consumers",
            "2",
            "--start",
            "earliest",
            "--records",
            "20000",
        ],
    );
    let r = &s["results"];
    assert_eq!(r["produced_total"], 0);
    assert_eq!(r["consumed_total_per_group"], serde_json::json!([20_000]));
    assert_eq!(r["consume"]["records"], 20_000, "the whole bounded read is measured (no warm-up)");
    assert_eq!(r["consume"]["bytes"], 20_000 * 200);
    assert!(r["consume"]["window_s"].as_f64().unwrap() > 0.0);
    assert!(r["consume"]["mb_per_s"].as_f64().unwrap() > 0.0);
    assert!(s["ratios"]["consume_mb_per_s_over_loopback"].as_f64().unwrap() > 0.0, "{}", s["ratios"]);
    assert_eq!(r["latency_us"]["end_to_end"]["count"], 0, "old records say nothing about e2e latency");
    assert_eq!(s["verify"]["records"], 20_000);
    assert_eq!(s["verify"]["duplicate_offsets"], 0);
    assert_eq!(s["verify"]["missing_offsets"], 0);
    assert_eq!(s["verify"]["producer_order_violations"], 0);

    // More than the backlog holds, through a consumer group: stops at the end
    // of the backlog, each record once.
    let s = bench_run(
        &broker,
        "read-all",
        &[
            "--baseline",
            baseline,
            "--verify",
            "--strict",
            "--topic",
            "backlog",
            "--no-create-topic",
            "--producers",
            "0",
            "--consumers",
            "3",
            "--consumer-mode",
            "group",
            "--assignor",
            "roundrobin",
            "--start",
            "earliest",
            "--records",
            "1000000",
        ],
    );
    let r = &s["results"];
    assert_eq!(r["expected_per_group"], backlog);
    assert_eq!(r["consumed_total_per_group"], serde_json::json!([backlog]));
    assert_eq!(r["consume"]["records"], backlog);
    assert_eq!(s["verify"]["records"], backlog);
    assert_eq!(s["verify"]["duplicate_offsets"], 0);
    assert_eq!(s["verify"]["missing_offsets"], 0);
}

#[test]
fn records_run_inside_its_warmup_says_nothing_was_measured() {
    let Some(broker) = start_broker_or_skip("bench-it") else { return };
    // 2000 records go out in well under the 30 s warm-up (records runs stop
    // at their count, whatever the warm-up).
    let args = ["--no-baseline", "--topic", "short", "--producers", "1", "--consumers", "1", "--records", "2000"];
    let s = bench_run(&broker, "short", &[&args[..], &["--warmup-s", "30", "--acks", "1"]].concat());
    let r = &s["results"];
    assert_eq!(r["produced_total"], 2000);
    assert_eq!(r["produce"]["records"], 0);
    assert_eq!(s["workload"]["producer"]["acks"], 1);
    let notes = r["notes"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = notes[0].as_str().unwrap();
    assert!(
        note.contains("NOTHING MEASURED") && note.contains("2000 records") && note.contains("--warmup-s 0"),
        "{note}"
    );
    let e = &r["efficiency"];
    assert!(e["broker_cpu_s"].is_null(), "{e}");
    assert!(e["cpu_unavailable"].as_str().unwrap().contains("warm-up"), "{e}");
    let table = std::fs::read_to_string(broker.dir.join("short/report.txt")).unwrap();
    assert!(table.contains("*** NOTHING MEASURED"), "{table}");
    assert!(table.contains("n/a (the run ended before its measured window opened"), "{table}");

    // --strict turns it into a failure; with the warm-up off the same run measures everything.
    let out = broker.dir.join("short-strict");
    let status = Command::new(env!("CARGO_BIN_EXE_tidelog-bench"))
        .args(["run", "--bootstrap", &format!("127.0.0.1:{}", broker.port), "--quiet", "--strict", "--no-baseline"])
        .args(["--topic", "short", "--no-create-topic", "--producers", "1", "--consumers", "0", "--records", "500"])
        .args(["--warmup-s", "30", "--hiccup-interval-us", "0"])
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2), "--strict fails a run that measured nothing");
    let s = bench_run(&broker, "short-whole", &[&args[..], &["--warmup-s", "0", "--acks", "-1"]].concat());
    assert_eq!(s["results"]["produce"]["records"], 2000);
    assert_eq!(s["results"]["notes"], serde_json::json!([]));
}
