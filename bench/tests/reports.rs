//! Report files from a synthetic run: summary.json parses and has the
//! expected keys, .hgrm files follow HdrHistogram's percentile-distribution
//! format, SVGs are well-formed XML with the expected series, and `compare`
//! reads two run directories back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: a failed unwrap is a failed test

use std::path::PathBuf;

use tidelog_bench::client::{Cluster, Versions};
use tidelog_bench::efficiency::Efficiency;
use tidelog_bench::report::{self, parse_hgrm, SummaryInputs};
use tidelog_bench::run::RunOutcome;
use tidelog_bench::stats::{record_us, ThreadStats};
use tidelog_bench::workload::Workload;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tidelog-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn synthetic_outcome(scale_us: u64) -> RunOutcome {
    let mut stats = ThreadStats::default();
    for i in 1..=10_000u64 {
        record_us(&mut stats.ack_record_us, scale_us + i % 997);
        record_us(&mut stats.end_to_end_us, 2 * scale_us + i % 1999);
        if i % 10 == 0 {
            record_us(&mut stats.ack_batch_us, scale_us + i % 500);
        }
    }
    for s in 0..10 {
        stats.produced.add(s, 1000, 1_000_000);
        stats.consumed.add(s, 1000, 1_000_000);
    }
    stats.produced_records = 10_000;
    stats.produced_bytes = 10_000_000;
    stats.consumed_records = 10_000;
    stats.consumed_bytes = 10_000_000;
    RunOutcome {
        cluster: Cluster::default(),
        versions: Versions::default(),
        stats,
        produced_total: 10_000,
        consumed_total_per_group: vec![10_000],
        expected_per_group: Some(10_000),
        group_ids: Vec::new(),
        verify: None,
        produce_window_s: 10.0,
        consume_window_s: 10.0,
        elapsed_s: 10.5,
        wall_start_us: 1_000_000,
        efficiency: Efficiency {
            source: "proc".into(),
            source_detail: "auto: pid 7 (tidelog) listens on 127.0.0.1:9092".into(),
            window_s: 10.0,
            produced_batch_bytes: 10_400_000,
            produced_value_bytes: 10_000_000,
            broker_cpu_s: Some(0.026),
            broker_cpu_s_per_gb: Some(2.5),
            broker_bytes_written: Some(15_600_000),
            write_amplification: Some(1.5),
            device: Some("vda (253:0)".into()),
            device_unavailable: Some("no device here".into()),
            ..Default::default()
        },
        ended_in_warmup: false,
    }
}

fn write_run(dir: &std::path::Path, scale_us: u64, label: &str) -> Vec<PathBuf> {
    let w = Workload::default();
    let o = synthetic_outcome(scale_us);
    let mut s = report::build_summary(
        SummaryInputs {
            name: "synthetic".into(),
            started_at_unix_s: 1,
            workload: &w,
            bootstrap: "127.0.0.1:9092",
            broker_label: label,
            broker_version: "unknown",
            host: tidelog_bench::host::host_info(std::path::Path::new("/")),
            baseline: None,
            hiccups: None,
        },
        &o,
    );
    report::write_run_dir(dir, &mut s, &o).unwrap()
}

#[test]
fn run_directory_files_parse() {
    let dir = scratch("reports");
    let files = write_run(&dir, 1000, "a");
    for name in [
        "summary.json",
        "report.txt",
        "latency.svg",
        "throughput.svg",
        "produce-ack-record.hgrm",
        "produce-ack-batch.hgrm",
        "end-to-end.hgrm",
        "fetch.hgrm",
    ] {
        assert!(files.iter().any(|f| f.ends_with(name)), "{name} not written");
    }

    // JSON: the keys a reader relies on.
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(v["schema"], "tidelog-bench/summary/v1");
    for key in ["workload", "broker", "host", "baseline", "results", "ratios", "files"] {
        assert!(v.get(key).is_some(), "summary.json lacks {key}");
    }
    let r = &v["results"];
    for key in ["produce", "consume", "latency_us", "timeline", "errors", "retries", "produced_total"] {
        assert!(r.get(key).is_some(), "results lacks {key}");
    }
    for series in ["produce_ack_record", "produce_ack_batch", "end_to_end", "fetch"] {
        for p in ["p50", "p90", "p99", "p999", "p9999", "max", "count"] {
            assert!(r["latency_us"][series][p].is_number(), "{series}.{p}");
        }
    }
    assert_eq!(r["latency_us"]["produce_ack_record"]["count"], 10_000);
    assert_eq!(r["produce"]["mb_per_s"], 1.0);
    assert_eq!(r["timeline"].as_array().unwrap().len(), 10);
    let e = &r["efficiency"];
    assert_eq!(e["broker_cpu_s_per_gb"], 2.5);
    assert_eq!(e["write_amplification"], 1.5);
    assert_eq!(e["device_unavailable"], "no device here");
    assert_eq!(r["notes"], serde_json::json!([]));
    let table = std::fs::read_to_string(dir.join("report.txt")).unwrap();
    let line = |start: &str| table.lines().find(|l| l.trim_start().starts_with(start)).unwrap_or("").to_string();
    assert!(line("broker CPU-s per GB ingested").ends_with(" 2.500"), "{table}");
    assert!(line("write amplification (broker)").ends_with(" 1.500x"), "{table}");
    assert!(line("write amplification (device-wide, vda (253:0)").ends_with("n/a (no device here)"), "{table}");
    assert!(table.contains("acks all"), "{table}");
    for key in ["cpu_model", "cores", "kernel", "filesystem"] {
        assert!(v["host"].get(key).is_some(), "host lacks {key}");
    }
    assert!(v["broker"].get("version").is_some());
    // And it loads back as a typed summary.
    let s = report::load_summary(&dir).unwrap();
    assert_eq!(s.results.produced_total, 10_000);

    // .hgrm: header, value/percentile/count/1/(1-p) lines, footer.
    let text = std::fs::read_to_string(dir.join("produce-ack-record.hgrm")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].split_whitespace().eq(["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]));
    assert!(lines.iter().any(|l| l.starts_with("#[Mean    =")));
    assert!(lines.iter().any(|l| l.starts_with("#[Max     =") && l.contains("Total count")));
    let pts = parse_hgrm(&text).unwrap();
    assert!(pts.len() > 20);
    assert_eq!(pts.first().map(|p| p.0), Some(0.0));
    assert_eq!(pts.last().map(|p| p.0), Some(1.0));
    assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "monotone");
    let body: Vec<&str> = lines.iter().copied().filter(|l| !l.is_empty() && !l.starts_with('#')).skip(1).collect();
    let last = body.last().unwrap();
    assert_eq!(last.split_whitespace().count(), 3, "the 100% line has no 1/(1-p) column");
    assert!(body[..body.len() - 1].iter().all(|l| l.split_whitespace().count() == 4));
    // TotalCount is cumulative and ends at the histogram's count.
    let counts: Vec<u64> = body.iter().map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(counts.last(), Some(&10_000));
    // values are in ms: 1000 µs + up to 996 µs
    let max_ms = pts.last().unwrap().1;
    assert!((1.9..=2.1).contains(&max_ms), "max {max_ms} ms");

    // SVG: well-formed, with the expected series.
    let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let series: Vec<&str> = doc.descendants().filter_map(|n| n.attribute("data-series")).collect();
    assert_eq!(series, ["produce ack (per record)", "produce ack (per batch)", "end-to-end"]);
    assert!(doc.descendants().any(|n| n.text() == Some("99.9%")), "log percentile axis labels");
    let tput = std::fs::read_to_string(dir.join("throughput.svg")).unwrap();
    let doc = roxmltree::Document::parse(&tput).unwrap();
    let series: Vec<&str> = doc.descendants().filter_map(|n| n.attribute("data-series")).collect();
    assert_eq!(series, ["produce", "consume"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compare_two_runs() {
    let a = scratch("cmp-a");
    let b = scratch("cmp-b");
    write_run(&a, 1000, "tidelog");
    write_run(&b, 3000, "other");
    let svg = scratch("cmp").with_extension("svg");
    let table = report::compare(&[a.clone(), b.clone()], &svg).unwrap();
    assert!(table.contains("(tidelog)") && table.contains("(other)"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("ack/record p99 ms")));
    let row = table.lines().find(|l| l.starts_with("broker CPU-s / GB")).unwrap_or("");
    assert_eq!(row.split_whitespace().filter(|v| *v == "2.500").count(), 2, "{table}");
    assert!(table.lines().any(|l| l.starts_with("write amplification") && l.contains("1.500")), "{table}");
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let series: Vec<&str> = doc.descendants().filter_map(|n| n.attribute("data-series")).collect();
    assert_eq!(series.len(), 4, "{series:?}");
    assert!(series.iter().any(|s| s.contains("tidelog") && s.ends_with("ack")));
    assert!(series.iter().any(|s| s.contains("other") && s.ends_with("e2e")));
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_file(svg);
}
