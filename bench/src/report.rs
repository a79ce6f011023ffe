//! Reports of a finished run: the terminal table, `summary.json`, `.hgrm`
//! percentile files (HdrHistogram's percentile-distribution text format, in
//! milliseconds), and the SVG charts; plus `compare` over several run
//! directories. Runs on the main thread after the workers are joined.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::baseline::Baseline;
use crate::consumer::VerifyStats;
use crate::efficiency::{or_na, Efficiency};
use crate::hiccup::Hiccups;
use crate::host::HostInfo;
use crate::run::RunOutcome;
use crate::stats::{Percentiles, Slow, SLOW_US};
use crate::svg::{latency_by_percentile, throughput_over_time, Series, PALETTE};
use crate::workload::Workload;

pub const SUMMARY_SCHEMA: &str = "tidelog-bench/summary/v1";
pub const SUMMARY_FILE: &str = "summary.json";

/// The latency histograms a run writes, as (file stem, title).
pub const LATENCY_SERIES: [(&str, &str); 4] = [
    ("produce-ack-record", "produce ack (per record)"),
    ("produce-ack-batch", "produce ack (per batch)"),
    ("end-to-end", "end-to-end"),
    ("fetch", "fetch round trip (with records)"),
];

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BrokerInfo {
    pub bootstrap: String,
    pub label: String,
    /// From `--broker-version`; the Kafka protocol does not carry a broker
    /// software version, so "unknown" unless told.
    pub version: String,
    pub cluster_id: Option<String>,
    pub brokers: usize,
    /// api key name -> [min, max] as advertised in ApiVersions.
    pub api_versions: BTreeMap<String, [i16; 2]>,
    /// api key name -> version this client used.
    pub negotiated: BTreeMap<String, i16>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    /// Measured (after warm-up) records and value bytes.
    pub records: u64,
    pub bytes: u64,
    pub window_s: f64,
    pub records_per_s: f64,
    pub mb_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latencies {
    pub produce_ack_record: Percentiles,
    pub produce_ack_batch: Percentiles,
    pub end_to_end: Percentiles,
    /// Fetch request written to response read, for fetches that returned
    /// records (absent in summaries written before it was measured).
    #[serde(default)]
    pub fetch: Percentiles,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TimelinePoint {
    pub t_s: u64,
    pub produce_records_per_s: u64,
    pub produce_mb_per_s: f64,
    pub consume_records_per_s: u64,
    pub consume_mb_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Results {
    pub paced: bool,
    pub target_records_per_s: f64,
    pub elapsed_s: f64,
    pub produce: Throughput,
    pub consume: Throughput,
    /// Whole run, warm-up included: what verification compares.
    pub produced_total: u64,
    pub consumed_total_per_group: Vec<u64>,
    /// What each group should have read (produced records, or a consumer-only
    /// run's backlog capped by run.records); absent when open-ended.
    #[serde(default)]
    pub expected_per_group: Option<u64>,
    /// consumer.mode = "group": the group ids, generations joined (summed
    /// over members), commits, and codes answered to group calls.
    #[serde(default)]
    pub group_ids: Vec<String>,
    #[serde(default)]
    pub group_generations: u64,
    #[serde(default)]
    pub group_commits: u64,
    #[serde(default)]
    pub group_error_codes: BTreeMap<String, u64>,
    pub requests: u64,
    pub errors: u64,
    pub retries: u64,
    pub failed_records: u64,
    pub error_codes: BTreeMap<String, u64>,
    pub latency_us: Latencies,
    /// The slowest batch acks (at least `stats::SLOW_US`), with when they
    /// arrived, to line up with the host hiccups.
    #[serde(default)]
    pub slowest_batch_acks: Vec<Slow>,
    /// When the run's clock started, ms since the epoch (0 in older summaries).
    #[serde(default)]
    pub started_at_unix_ms: u64,
    pub timeline: Vec<TimelinePoint>,
    /// Broker CPU-seconds per GB produced and write amplification over the
    /// produce window (absent in summaries written before they existed).
    #[serde(default)]
    pub efficiency: Option<Efficiency>,
    /// What a reader must know to read the figures right (e.g. the run ended
    /// inside its warm-up, so nothing was measured).
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub schema: String,
    pub name: String,
    pub started_at_unix_s: u64,
    pub command_line: Vec<String>,
    pub workload: Workload,
    pub broker: BrokerInfo,
    pub host: HostInfo,
    pub baseline: Option<Baseline>,
    pub results: Results,
    /// Result / baseline, where that makes sense.
    pub ratios: BTreeMap<String, f64>,
    pub verify: Option<VerifyStats>,
    /// The host hiccup meter's findings (absent when it was off, and in
    /// summaries written before it existed).
    #[serde(default)]
    pub hiccups: Option<Hiccups>,
    pub files: Vec<String>,
}

pub struct SummaryInputs<'a> {
    pub name: String,
    pub started_at_unix_s: u64,
    pub workload: &'a Workload,
    pub bootstrap: &'a str,
    pub broker_label: &'a str,
    pub broker_version: &'a str,
    pub host: HostInfo,
    pub baseline: Option<Baseline>,
    pub hiccups: Option<Hiccups>,
}

pub fn build_summary(inp: SummaryInputs<'_>, o: &RunOutcome) -> Summary {
    use tidelog_protocol::messages::ApiKey;
    let name_of = |k: i16| ApiKey::try_from(k).map(|k| format!("{k:?}")).unwrap_or_else(|_| format!("api-{k}"));
    let s = &o.stats;
    let tp = |records: u64, bytes: u64, window_s: f64| Throughput {
        records,
        bytes,
        window_s,
        records_per_s: if window_s > 0.0 { records as f64 / window_s } else { 0.0 },
        mb_per_s: if window_s > 0.0 { bytes as f64 / 1e6 / window_s } else { 0.0 },
    };
    let n = s.produced.records.len().max(s.consumed.records.len());
    let timeline = (0..n)
        .map(|i| TimelinePoint {
            t_s: i as u64,
            produce_records_per_s: s.produced.records.get(i).copied().unwrap_or(0),
            produce_mb_per_s: s.produced.bytes.get(i).copied().unwrap_or(0) as f64 / 1e6,
            consume_records_per_s: s.consumed.records.get(i).copied().unwrap_or(0),
            consume_mb_per_s: s.consumed.bytes.get(i).copied().unwrap_or(0) as f64 / 1e6,
        })
        .collect();
    let results = Results {
        paced: inp.workload.is_paced(),
        target_records_per_s: inp.workload.producer.total_rate_records_per_s(),
        elapsed_s: o.elapsed_s,
        produce: tp(s.produced_records, s.produced_bytes, o.produce_window_s),
        consume: tp(s.consumed_records, s.consumed_bytes, o.consume_window_s),
        produced_total: o.produced_total,
        consumed_total_per_group: o.consumed_total_per_group.clone(),
        expected_per_group: o.expected_per_group,
        group_ids: o.group_ids.clone(),
        group_generations: s.group_generations,
        group_commits: s.group_commits,
        group_error_codes: s.group_error_codes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        requests: s.requests,
        errors: s.errors,
        retries: s.retries,
        failed_records: s.failed_records,
        error_codes: s.error_codes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        latency_us: Latencies {
            produce_ack_record: Percentiles::of(&s.ack_record_us),
            produce_ack_batch: Percentiles::of(&s.ack_batch_us),
            end_to_end: Percentiles::of(&s.end_to_end_us),
            fetch: Percentiles::of(&s.fetch_us),
        },
        slowest_batch_acks: s.slowest_batch_acks.clone(),
        started_at_unix_ms: o.wall_start_us / 1000,
        timeline,
        efficiency: Some(o.efficiency.clone()),
        notes: notes(inp.workload, o),
    };
    let broker = BrokerInfo {
        bootstrap: inp.bootstrap.to_string(),
        label: inp.broker_label.to_string(),
        version: inp.broker_version.to_string(),
        cluster_id: o.cluster.cluster_id.clone(),
        brokers: o.cluster.brokers.len(),
        api_versions: o.versions.broker.iter().map(|(k, v)| (name_of(*k), [v.0, v.1])).collect(),
        negotiated: o.versions.chosen.iter().map(|(k, v)| (name_of(*k), *v)).collect(),
    };
    let ratios = ratios(&results, inp.baseline.as_ref());
    Summary {
        schema: SUMMARY_SCHEMA.into(),
        name: inp.name,
        started_at_unix_s: inp.started_at_unix_s,
        command_line: std::env::args().collect(),
        workload: inp.workload.clone(),
        broker,
        host: inp.host,
        baseline: inp.baseline,
        results,
        ratios,
        verify: o.verify.clone(),
        hiccups: inp.hiccups,
        files: Vec::new(),
    }
}

/// Warnings about the run itself, printed above the table.
fn notes(w: &Workload, o: &RunOutcome) -> Vec<String> {
    let mut notes = Vec::new();
    if o.ended_in_warmup || (o.produced_total > 0 && o.stats.produced_records == 0 && w.producer.count > 0) {
        notes.push(format!(
            "NOTHING MEASURED: all {} records were acknowledged within the {} s warm-up, which the results leave out, \
             so the produce figures are zeros. Rerun with --warmup-s 0 (measure from the start) or more --records.",
            o.produced_total, w.run.warmup_s
        ));
    }
    notes
}

pub fn ratios(r: &Results, b: Option<&Baseline>) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let Some(b) = b else { return m };
    // Only for the sides that ran (a consumer-only run has no produce rate).
    let (produced, consumed) = (r.produce.records > 0, r.consume.records > 0);
    if b.o_direct_write_mb_per_s > 0.0 && produced {
        m.insert("produce_mb_per_s_over_o_direct_write".into(), r.produce.mb_per_s / b.o_direct_write_mb_per_s);
    }
    if b.loopback_mb_per_s > 0.0 {
        if produced {
            m.insert("produce_mb_per_s_over_loopback".into(), r.produce.mb_per_s / b.loopback_mb_per_s);
        }
        if consumed {
            m.insert("consume_mb_per_s_over_loopback".into(), r.consume.mb_per_s / b.loopback_mb_per_s);
        }
    }
    // Against the disk: what a cold catch-up read can at most get.
    if b.o_direct_read_mb_per_s > 0.0 && consumed {
        m.insert("consume_mb_per_s_over_o_direct_read".into(), r.consume.mb_per_s / b.o_direct_read_mb_per_s);
    }
    let f = &b.fdatasync_latency_us;
    let a = &r.latency_us.produce_ack_batch;
    if f.p50 > 0.0 && a.count > 0 {
        m.insert("ack_batch_p50_over_fdatasync_p50".into(), a.p50 / f.p50);
        m.insert("ack_batch_p99_over_fdatasync_p99".into(), a.p99 / f.p99.max(1.0));
    }
    m
}

/// HdrHistogram's percentile distribution text, values in milliseconds
/// (µs histogram scaled by 1000), 5 ticks per half distance, as
/// `Histogram.outputPercentileDistribution(out, 5, 1000.0)` prints it.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let scale = 1000.0;
    let mut out = String::new();
    let _ = writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    if !h.is_empty() {
        // TotalCount is cumulative up to the value, as in Java's output.
        let mut total: u64 = 0;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / scale;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
            } else {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let _ = writeln!(out, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", h.mean() / scale, h.stdev() / scale);
    let _ = writeln!(out, "#[Max     = {:12.3}, Total count    = {:12}]", h.max() as f64 / scale, h.len());
    let _ = writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), h.distinct_values());
    out
}

/// Reads the (percentile, value) points back from a `.hgrm` file.
pub fn parse_hgrm(text: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut pts = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with("Value") {
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        anyhow::ensure!(f.len() == 3 || f.len() == 4, "bad .hgrm line {line:?}");
        let value: f64 = f[0].parse().with_context(|| format!("value in {line:?}"))?;
        let q: f64 = f[1].parse().with_context(|| format!("percentile in {line:?}"))?;
        let _count: u64 = f[2].parse().with_context(|| format!("count in {line:?}"))?;
        anyhow::ensure!((0.0..=1.0).contains(&q), "percentile {q} out of range");
        pts.push((q, value));
    }
    Ok(pts)
}

/// The baseline line of a report: what the hardware can do.
pub fn render_baseline(b: &Baseline) -> String {
    format!(
        "baseline: {} write {:.1} MB/s | read {:.1} MB/s (x{} {:.1}) | fdatasync p50 {} ms p99 {} ms | loopback {:.1} MB/s ({})",
        if b.o_direct { "O_DIRECT" } else { "buffered" },
        b.o_direct_write_mb_per_s,
        b.o_direct_read_mb_per_s,
        crate::baseline::READ_PARALLEL,
        b.o_direct_read_parallel_mb_per_s,
        fmt_ms(b.fdatasync_latency_us.p50),
        fmt_ms(b.fdatasync_latency_us.p99),
        b.loopback_mb_per_s,
        b.dir
    )
}

/// A histogram's (percentile, ms) points for a latency chart.
pub fn hgrm_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(5)
        .map(|v| (v.quantile_iterated_to(), h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0))
        .filter(|(q, _)| *q < 1.0)
        .chain(std::iter::once((0.9999999, h.max() as f64 / 1000.0)))
        .collect()
}

fn fmt_ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// The terminal table.
pub fn render_table(s: &Summary) -> String {
    let r = &s.results;
    let mut out = String::new();
    let _ = writeln!(out, "== tidelog-bench: {} against {} ({}) ==", s.name, s.broker.bootstrap, s.broker.label);
    let _ = writeln!(
        out,
        "host: {} | {} cores | kernel {} | data dir {} ({})",
        s.host.cpu_model, s.host.cores, s.host.kernel, s.host.data_dir, s.host.filesystem
    );
    let _ = writeln!(
        out,
        "broker version: {} | {} brokers | negotiated Produce v{} Fetch v{}",
        s.broker.version,
        s.broker.brokers,
        s.broker.negotiated.get("Produce").copied().unwrap_or(-1),
        s.broker.negotiated.get("Fetch").copied().unwrap_or(-1)
    );
    let w = &s.workload;
    let _ = writeln!(
        out,
        "workload: {} partitions, {} producers, {}x{} consumers ({:?}), record {} B, keys {:?}, acks {}, linger {} ms, batch {} B, {:?}, in-flight {}, target {}",
        w.topic.partitions,
        w.producer.count,
        w.consumer.groups,
        w.consumer.count,
        w.consumer.mode,
        w.producer.mean_record_bytes(),
        w.producer.keys,
        if w.producer.acks == -1 { "all".to_string() } else { w.producer.acks.to_string() },
        w.producer.linger_ms,
        w.producer.batch_size_bytes,
        w.producer.compression,
        w.producer.max_in_flight,
        if r.paced { format!("{:.0} rec/s (latency from intended send time)", r.target_records_per_s) } else { "max".into() }
    );
    for n in &r.notes {
        let _ = writeln!(out, "\n*** {n}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<12} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "throughput", "records/s", "MB/s", "window s", "records", "/ loopback"
    );
    for (name, t, ratio) in [
        ("produce", &r.produce, "produce_mb_per_s_over_loopback"),
        ("consume", &r.consume, "consume_mb_per_s_over_loopback"),
    ] {
        let ratio = s.ratios.get(ratio).map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<12} {:>12.0} {:>12.2} {:>10.1} {:>12} {:>12}",
            name, t.records_per_s, t.mb_per_s, t.window_s, t.records, ratio
        );
    }
    if let Some(e) = &r.efficiency {
        render_efficiency(&mut out, e);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "latency (ms)", "p50", "p90", "p99", "p99.9", "p99.99", "max", "mean", "count"
    );
    let l = &r.latency_us;
    for (name, p) in [
        ("produce ack (record)", &l.produce_ack_record),
        ("produce ack (batch)", &l.produce_ack_batch),
        ("end-to-end", &l.end_to_end),
        ("fetch (with records)", &l.fetch),
    ] {
        latency_row(&mut out, name, p);
    }
    if let Some(h) = &s.hiccups {
        render_hiccups(&mut out, h, r.started_at_unix_ms);
    }
    if !r.slowest_batch_acks.is_empty() {
        let acks: Vec<String> = r
            .slowest_batch_acks
            .iter()
            .take(5)
            .map(|s| format!("{} ms {}", fmt_ms(s.us as f64), at_run_s(s, r.started_at_unix_ms)))
            .collect();
        let _ = writeln!(out, "slowest batch acks: {}", acks.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "requests {} | errors {} | retries {} | failed records {} | error codes {:?}",
        r.requests, r.errors, r.retries, r.failed_records, r.error_codes
    );
    if !r.group_ids.is_empty() {
        let _ = writeln!(
            out,
            "groups: {} ({:?} assignor) | generations joined {} | commits {} | group call codes {:?}",
            r.group_ids.join(", "),
            s.workload.consumer.assignor,
            r.group_generations,
            r.group_commits,
            r.group_error_codes
        );
    }
    match &s.baseline {
        Some(b) => {
            let _ = writeln!(out, "{}", render_baseline(b));
            let ratios: Vec<String> = s.ratios.iter().map(|(k, v)| format!("{k} = {v:.3}")).collect();
            let _ = writeln!(out, "ratios: {}", ratios.join(" | "));
        }
        None => {
            let _ = writeln!(out, "baseline: none (run `tidelog-bench baseline --dir DIR` or pass --baseline)");
        }
    }
    if let Some(v) = &s.verify {
        let _ = writeln!(
            out,
            "verify: produced {} consumed {:?} | checked {} ({} keyed) | key->partition mismatches {} | order violations {} | offset regressions {} | read twice {} | never read {} | {}",
            r.produced_total,
            r.consumed_total_per_group,
            v.records,
            v.keyed_records,
            v.key_partition_mismatches,
            v.producer_order_violations,
            v.offset_regressions,
            v.duplicate_offsets,
            v.missing_offsets,
            v.first_problem.as_deref().unwrap_or("ok")
        );
    }
    out
}

fn gb(bytes: u64) -> String {
    format!("{:.3} GB", bytes as f64 / 1e9)
}

/// The broker efficiency lines under the throughput table.
fn render_efficiency(out: &mut String, e: &Efficiency) {
    let source = match e.source.as_str() {
        "none" => "none".to_string(),
        s => format!("{s}: {}", e.source_detail),
    };
    let _ = writeln!(
        out,
        "broker efficiency over {:.1} s of {} produced ({source}):",
        e.window_s,
        gb(e.produced_batch_bytes)
    );
    let cpu = or_na(e.broker_cpu_s_per_gb.map(|v| format!("{v:.3}")), e.cpu_unavailable.as_deref());
    let wa = or_na(e.write_amplification.map(|v| format!("{v:.3}x")), e.write_unavailable.as_deref());
    let _ = writeln!(out, "  broker CPU-s per GB ingested     {cpu}");
    let _ = writeln!(out, "  write amplification (broker)     {wa}");
    if e.broker_cpu_s.is_some() || e.broker_bytes_written.is_some() {
        let _ = writeln!(
            out,
            "    broker CPU {} s, wrote {} | record batches acknowledged {} (values {})",
            e.broker_cpu_s.map(|c| format!("{c:.2}")).unwrap_or_else(|| "n/a".into()),
            e.broker_bytes_written.map(gb).unwrap_or_else(|| "n/a".into()),
            gb(e.produced_batch_bytes),
            gb(e.produced_value_bytes)
        );
    }
    if e.per_pid.len() > 1 {
        for p in &e.per_pid {
            let w = p.bytes_written.map(gb).unwrap_or_else(|| "n/a".into());
            let _ = writeln!(out, "    pid {} ({}): CPU {:.2} s, wrote {w}", p.pid, p.name, p.cpu_s);
        }
    }
    let dev = or_na(
        e.device_write_amplification.zip(e.device_bytes_written).map(|(a, b)| format!("{a:.3}x ({} written)", gb(b))),
        e.device_unavailable.as_deref(),
    );
    let _ = writeln!(
        out,
        "  write amplification (device-wide, {}, all writers) {dev}",
        e.device.as_deref().unwrap_or("no device")
    );
}

/// One row of the latency table: percentiles of a µs histogram, in ms.
fn latency_row(out: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        name,
        fmt_ms(p.p50),
        fmt_ms(p.p90),
        fmt_ms(p.p99),
        fmt_ms(p.p999),
        fmt_ms(p.p9999),
        fmt_ms(p.max),
        fmt_ms(p.mean),
        p.count
    );
}

/// The hiccup meter's rows under the latency table, in the same columns,
/// then steal time and the longest hiccups with when they happened.
/// The host hiccup meter's line of a report.
pub fn render_hiccups(out: &mut String, h: &Hiccups, started_ms: u64) {
    for c in &h.per_cpu {
        latency_row(out, &format!("host hiccup (cpu {})", c.cpu), &c.late_us);
    }
    let slowest: Vec<String> = h
        .slowest()
        .iter()
        .take(5)
        .map(|(cpu, s)| format!("{} ms on cpu {cpu} {}", fmt_ms(s.us as f64), at_run_s(s, started_ms)))
        .collect();
    let _ = writeln!(
        out,
        "host hiccups: a thread per core sleeping {} us; >1 ms {} | >10 ms {} | steal {:.0} ms | longest: {}",
        h.interval_us,
        h.per_cpu.iter().map(|c| c.over_1ms).sum::<u64>(),
        h.per_cpu.iter().map(|c| c.over_10ms).sum::<u64>(),
        h.steal_ms(),
        if slowest.is_empty() { format!("none over {} ms", SLOW_US / 1000) } else { slowest.join(", ") }
    );
}

/// "at 12.3 s" into the run (from when its clock started).
fn at_run_s(s: &Slow, started_ms: u64) -> String {
    format!("at {:.1} s", (s.at_unix_ms as f64 - started_ms as f64) / 1000.0)
}

/// Writes summary.json, report.txt, the .hgrm files and the SVGs into `dir`.
pub fn write_run_dir(dir: &Path, summary: &mut Summary, o: &RunOutcome) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let hists = [&o.stats.ack_record_us, &o.stats.ack_batch_us, &o.stats.end_to_end_us, &o.stats.fetch_us];
    let mut series = Vec::new();
    for (i, ((stem, title), h)) in LATENCY_SERIES.iter().zip(hists).enumerate() {
        let path = dir.join(format!("{stem}.hgrm"));
        std::fs::write(&path, hgrm(h))?;
        files.push(path);
        if !h.is_empty() {
            series.push(Series {
                name: title.to_string(),
                color: PALETTE[i].into(),
                dashed: i == 1,
                points: hgrm_points(h),
            });
        }
    }
    let title = format!(
        "{}: latency by percentile{}",
        summary.name,
        if summary.results.paced { " (from intended send time)" } else { "" }
    );
    let lat = dir.join("latency.svg");
    std::fs::write(&lat, latency_by_percentile(&title, &series))?;
    files.push(lat);
    let t = &summary.results.timeline;
    let tp_series = vec![
        Series {
            name: "produce".into(),
            color: PALETTE[0].into(),
            dashed: false,
            points: t.iter().map(|p| (p.t_s as f64, p.produce_mb_per_s)).collect(),
        },
        Series {
            name: "consume".into(),
            color: PALETTE[2].into(),
            dashed: false,
            points: t.iter().map(|p| (p.t_s as f64, p.consume_mb_per_s)).collect(),
        },
    ];
    let tput = dir.join("throughput.svg");
    std::fs::write(
        &tput,
        throughput_over_time(&format!("{}: throughput over time", summary.name), "MB/s", &tp_series),
    )?;
    files.push(tput);
    let table = render_table(summary);
    finish_run_dir(dir, files, &table, SUMMARY_FILE, summary, |s| &mut s.files)
}

/// The last files of a run directory: `table` as report.txt, then
/// `summary` as `json_name`, its file list (`listed`) set first to the
/// names of all the files, itself included. Returns `files` with both.
pub(crate) fn finish_run_dir<S: Serialize>(
    dir: &Path,
    mut files: Vec<PathBuf>,
    table: &str,
    json_name: &str,
    summary: &mut S,
    listed: impl FnOnce(&mut S) -> &mut Vec<String>,
) -> anyhow::Result<Vec<PathBuf>> {
    let report = dir.join("report.txt");
    std::fs::write(&report, table)?;
    files.push(report);
    let json_path = dir.join(json_name);
    *listed(summary) = files
        .iter()
        .chain(std::iter::once(&json_path))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    std::fs::write(&json_path, serde_json::to_string_pretty(summary)?)?;
    files.push(json_path);
    Ok(files)
}

pub fn load_summary(run_dir: &Path) -> anyhow::Result<Summary> {
    let path = run_dir.join(SUMMARY_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `compare`: a side-by-side table and one latency chart over all runs.
pub fn compare(run_dirs: &[PathBuf], svg_out: &Path) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for d in run_dirs {
        runs.push((d.clone(), load_summary(d)?));
    }
    let label = |d: &Path, s: &Summary| {
        let base = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if s.broker.label.is_empty() {
            base
        } else {
            format!("{} ({})", base, s.broker.label)
        }
    };
    let labels: Vec<String> = runs.iter().map(|(d, s)| label(d, s)).collect();
    let width = labels.iter().map(|l| l.len()).max().unwrap_or(10).clamp(12, 40);
    let mut out = String::new();
    let _ = write!(out, "{:<34}", "metric");
    for l in &labels {
        let _ = write!(out, " {:>width$}", l);
    }
    out.push('\n');
    type Getter = fn(&Summary) -> String;
    let rows: Vec<(&str, Getter)> = vec![
        ("workload", |s| s.workload.name.clone()),
        ("broker version", |s| s.broker.version.clone()),
        ("host cpu", |s| s.host.cpu_model.chars().take(30).collect()),
        ("produce records/s", |s| format!("{:.0}", s.results.produce.records_per_s)),
        ("produce MB/s", |s| format!("{:.2}", s.results.produce.mb_per_s)),
        ("consume MB/s", |s| format!("{:.2}", s.results.consume.mb_per_s)),
        ("ack/record p50 ms", |s| fmt_ms(s.results.latency_us.produce_ack_record.p50)),
        ("ack/record p99 ms", |s| fmt_ms(s.results.latency_us.produce_ack_record.p99)),
        ("ack/record p99.9 ms", |s| fmt_ms(s.results.latency_us.produce_ack_record.p999)),
        ("ack/record p99.99 ms", |s| fmt_ms(s.results.latency_us.produce_ack_record.p9999)),
        ("ack/record max ms", |s| fmt_ms(s.results.latency_us.produce_ack_record.max)),
        ("ack/batch p99 ms", |s| fmt_ms(s.results.latency_us.produce_ack_batch.p99)),
        ("e2e p50 ms", |s| fmt_ms(s.results.latency_us.end_to_end.p50)),
        ("e2e p99 ms", |s| fmt_ms(s.results.latency_us.end_to_end.p99)),
        ("e2e p99.9 ms", |s| fmt_ms(s.results.latency_us.end_to_end.p999)),
        ("e2e max ms", |s| fmt_ms(s.results.latency_us.end_to_end.max)),
        ("fetch p50 ms", |s| fmt_ms(s.results.latency_us.fetch.p50)),
        ("fetch p99 ms", |s| fmt_ms(s.results.latency_us.fetch.p99)),
        ("broker CPU-s / GB", |s| {
            let e = s.results.efficiency.as_ref();
            e.and_then(|e| e.broker_cpu_s_per_gb).map(|v| format!("{v:.3}")).unwrap_or("-".into())
        }),
        ("write amplification", |s| {
            let e = s.results.efficiency.as_ref();
            e.and_then(|e| e.write_amplification).map(|v| format!("{v:.3}")).unwrap_or("-".into())
        }),
        ("host hiccup max ms", |s| s.hiccups.as_ref().map(|h| fmt_ms(h.max_us())).unwrap_or("-".into())),
        ("host steal ms", |s| s.hiccups.as_ref().map(|h| format!("{:.0}", h.steal_ms())).unwrap_or("-".into())),
        ("errors / retries", |s| format!("{} / {}", s.results.errors, s.results.retries)),
        ("baseline write MB/s", |s| {
            s.baseline.as_ref().map(|b| format!("{:.1}", b.o_direct_write_mb_per_s)).unwrap_or("-".into())
        }),
        ("baseline fdatasync p99 ms", |s| {
            s.baseline.as_ref().map(|b| fmt_ms(b.fdatasync_latency_us.p99)).unwrap_or("-".into())
        }),
        ("produce MB/s / write MB/s", |s| {
            s.ratios.get("produce_mb_per_s_over_o_direct_write").map(|v| format!("{v:.3}")).unwrap_or("-".into())
        }),
    ];
    for (name, get) in rows {
        let _ = write!(out, "{:<34}", name);
        for (_, s) in &runs {
            let _ = write!(out, " {:>width$}", get(s));
        }
        out.push('\n');
    }
    let mut series = Vec::new();
    for (i, ((d, _), l)) in runs.iter().zip(&labels).enumerate() {
        for (stem, title, dashed) in [("produce-ack-record", "ack", false), ("end-to-end", "e2e", true)] {
            let path = d.join(format!("{stem}.hgrm"));
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let pts = parse_hgrm(&text).with_context(|| format!("parsing {}", path.display()))?;
            let pts: Vec<(f64, f64)> = pts.into_iter().map(|(q, v)| (q.min(0.9999999), v)).collect();
            if !pts.is_empty() {
                series.push(Series {
                    name: format!("{l} {title}"),
                    color: PALETTE[i % PALETTE.len()].into(),
                    dashed,
                    points: pts,
                });
            }
        }
    }
    std::fs::write(svg_out, latency_by_percentile("latency by percentile: comparison", &series))
        .with_context(|| format!("writing {}", svg_out.display()))?;
    let _ = writeln!(out, "\nchart: {}", svg_out.display());
    Ok(out)
}
