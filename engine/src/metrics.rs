//! Metrics: shard-local counters and histograms, the plain-data snapshot a
//! scrape carries across cores, and its Prometheus text rendering.
//!
//! Every shard owns one `ShardMetrics` (inside its `Shard`): `Cell` and
//! `RefCell` only, no atomics, touched only from the shard's thread. A scrape
//! (see `http`) asks every shard over the controller channels for a
//! `ShardSnapshot` (plain `Send` data, built on the shard itself), and shard 0
//! renders them all. Nothing on the hot path waits for a scrape.
//!
//! Names follow Prometheus conventions: `tidelog_` prefix, unit last
//! (`_bytes`, `_seconds`), counters end in `_total`, histograms are
//! cumulative `_bucket{le=..}` plus `_sum` and `_count`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use tidelog_protocol::batch::{BatchHeader, BATCH_HEADER_BYTES};
use tidelog_protocol::messages::ApiKey;

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is implied.
pub const LATENCY_BUCKETS_S: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A fixed-bucket histogram of seconds (non-cumulative counts; the last slot
/// is `+Inf`).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum_s: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; LATENCY_BUCKETS_S.len() + 1], sum_s: 0.0, count: 0 }
    }
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS_S.partition_point(|b| *b < s);
        self.counts[i] += 1;
        self.sum_s += s;
        self.count += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_s += other.sum_s;
        self.count += other.count;
    }
}

/// Traffic counters of one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionCounters {
    pub produce_bytes: u64,
    pub produce_records: u64,
    pub fetch_bytes: u64,
    pub fetch_records: u64,
}

/// Work done by the log cleaners (retention and compaction) on one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanerCounters {
    pub retention_segments_deleted: u64,
    pub retention_bytes_deleted: u64,
    pub delete_records_segments_deleted: u64,
    pub compaction_runs: u64,
    pub compaction_records_removed: u64,
    pub compaction_bytes_reclaimed: u64,
    pub compaction_bytes_read: u64,
    pub compaction_bytes_written: u64,
    pub compaction_segments_cleaned: u64,
}

/// One shard's live metrics. Shard-local.
#[derive(Default)]
pub struct ShardMetrics {
    requests: RefCell<BTreeMap<i16, Histogram>>,
    errors: RefCell<BTreeMap<(i16, i16), u64>>,
    partitions: RefCell<HashMap<String, Vec<PartitionCounters>>>,
    flushes: Cell<u64>,
    flush_bytes: Cell<u64>,
    flush_latency: RefCell<Histogram>,
    pub cleaner: Cell<CleanerCounters>,
}

impl ShardMetrics {
    /// A finished request of `api` that took `elapsed`.
    pub fn request(&self, api: ApiKey, elapsed: Duration) {
        self.requests.borrow_mut().entry(api as i16).or_default().observe(elapsed);
    }

    /// A Kafka error code answered for `api` (per partition or resource).
    pub fn error(&self, api: ApiKey, code: i16) {
        if code != 0 {
            *self.errors.borrow_mut().entry((api as i16, code)).or_default() += 1;
        }
    }

    fn with_partition(&self, topic: &str, partition: i32, f: impl FnOnce(&mut PartitionCounters)) {
        let Ok(p) = usize::try_from(partition) else { return };
        let mut map = self.partitions.borrow_mut();
        let parts = match map.get_mut(topic) {
            Some(v) => v,
            None => map.entry(topic.to_string()).or_default(),
        };
        if parts.len() <= p {
            parts.resize(p + 1, PartitionCounters::default());
        }
        f(&mut parts[p]);
    }

    /// Record batches appended by a produce.
    pub fn produced(&self, topic: &str, partition: i32, bytes: u64, records: u64) {
        self.with_partition(topic, partition, |c| {
            c.produce_bytes += bytes;
            c.produce_records += records;
        });
    }

    /// Record data sent by a fetch.
    pub fn fetched(&self, topic: &str, partition: i32, bytes: u64, records: u64) {
        self.with_partition(topic, partition, |c| {
            c.fetch_bytes += bytes;
            c.fetch_records += records;
        });
    }

    /// One log's group-commit flush: bytes written and how long write+fdatasync took.
    pub fn flushed(&self, bytes: u64, elapsed: Duration) {
        self.flushes.set(self.flushes.get() + 1);
        self.flush_bytes.set(self.flush_bytes.get() + bytes);
        self.flush_latency.borrow_mut().observe(elapsed);
    }

    pub fn cleaner_add(&self, f: impl FnOnce(&mut CleanerCounters)) {
        let mut c = self.cleaner.get();
        f(&mut c);
        self.cleaner.set(c);
    }

    /// Forgets counters of a deleted topic.
    pub fn forget_topic(&self, topic: &str) {
        self.partitions.borrow_mut().remove(topic);
    }

    /// The counter part of a snapshot; gauges are filled in by the shard.
    pub fn snapshot(&self, shard: u32) -> ShardSnapshot {
        let counters = self.partitions.borrow();
        ShardSnapshot {
            shard,
            requests: self.requests.borrow().iter().map(|(k, h)| (*k, h.clone())).collect(),
            errors: self.errors.borrow().iter().map(|(k, n)| (k.0, k.1, *n)).collect(),
            partitions: counters
                .iter()
                .flat_map(|(t, parts)| {
                    parts.iter().enumerate().map(move |(p, c)| PartitionSnapshot {
                        topic: t.clone(),
                        partition: p as i32,
                        counters: *c,
                        ..Default::default()
                    })
                })
                .collect(),
            flushes: self.flushes.get(),
            flush_bytes: self.flush_bytes.get(),
            flush_latency: self.flush_latency.borrow().clone(),
            // Built on the shard's own thread, so this is the shard's count.
            storage_bytes_written: crate::storage::segment_bytes_written(),
            cleaner: self.cleaner.get(),
            ..Default::default()
        }
    }
}

/// Gauges and counters of one partition at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PartitionSnapshot {
    pub topic: String,
    pub partition: i32,
    pub counters: PartitionCounters,
    /// False for a partition that only has counters (not owned any more).
    pub open: bool,
    pub high_watermark: i64,
    /// Next offset read_committed consumers may read up to (KIP-98).
    pub last_stable_offset: i64,
    /// Transactions open on the partition.
    pub ongoing_txns: u64,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    pub segments: u64,
    pub segment_bytes: u64,
}

/// Everything one shard reports to a scrape. Plain data: crosses cores.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardSnapshot {
    pub shard: u32,
    pub requests: Vec<(i16, Histogram)>,
    pub errors: Vec<(i16, i16, u64)>,
    pub partitions: Vec<PartitionSnapshot>,
    pub flushes: u64,
    pub flush_bytes: u64,
    pub flush_latency: Histogram,
    /// Bytes of O_DIRECT segment writes (whole pages, rewritten tail pages
    /// included): what the shard asked the device to write for record data.
    pub storage_bytes_written: u64,
    pub cleaner: CleanerCounters,
    pub connections: u64,
    /// Fetch record bytes put in responses from memory / from segment files,
    /// and bytes read through user space to locate cold reads.
    pub fetch_memory_bytes: u64,
    pub fetch_file_bytes: u64,
    pub fetch_located_bytes: u64,
    /// Cold responses on this shard's send threads right now.
    pub cold_sends: u64,
    /// Seconds the shard's send threads slept on the cold-send budget.
    pub cold_throttle_seconds: f64,
    /// The broker-wide cold-send limit in force when scraped (0 = none).
    pub cold_limit_bytes_per_second: u64,
    /// Bytes held by this shard's logs in memory (recent-batch caches and
    /// appends waiting for the flusher).
    pub memory_bytes: u64,
    /// Request frame bytes held under `queued.max.request.bytes` now, and
    /// frames that waited for room so far.
    pub request_memory_bytes: u64,
    pub request_memory_waits: u64,
    /// Requests held read and not yet dispatched now (bounded by the
    /// shard's share of `queued.max.requests`), and frames that waited for
    /// a slot so far.
    pub queued_requests: u64,
    pub queued_requests_waits: u64,
    /// Record bytes appended and not yet written in online data directories
    /// (bounded by `log.unflushed.max.bytes`), and produce requests that
    /// waited for that bound so far.
    pub unflushed_bytes: u64,
    pub unflushed_waits: u64,
    /// Transactions this shard coordinates that are open now, and those it
    /// completed (markers written everywhere) so far, by outcome.
    pub txn_ongoing: u64,
    pub txn_committed: u64,
    pub txn_aborted: u64,
    /// `log.dirs` as this shard sees them (shared by all shards; rendered
    /// from the first snapshot): path, state, usable and total bytes.
    pub log_dirs: Vec<LogDirSnapshot>,
}

/// One data directory in a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogDirSnapshot {
    pub path: String,
    /// 0 online, 1 full (ENOSPC), 2 failed (I/O error).
    pub state: u8,
    pub usable_bytes: i64,
    pub total_bytes: i64,
}

impl ShardSnapshot {
    /// Merges log gauges into the partition list (adding logs without traffic yet).
    pub fn set_partition_gauges(&mut self, g: PartitionSnapshot) {
        match self.partitions.iter_mut().find(|p| p.topic == g.topic && p.partition == g.partition) {
            Some(p) => {
                let counters = p.counters;
                *p = PartitionSnapshot { counters, open: true, ..g };
            }
            None => self.partitions.push(PartitionSnapshot { open: true, ..g }),
        }
    }
}

/// Records and bytes in whole batches of `data` (a fetch's record set; a
/// trailing partial batch, which clients discard, is not counted).
pub fn count_batches(data: &[u8]) -> (u64, u64) {
    let (mut records, mut bytes, mut at) = (0u64, 0u64, 0usize);
    while at + BATCH_HEADER_BYTES <= data.len() {
        let Ok(h) = BatchHeader::parse(&data[at..]) else { break };
        let size = h.size_bytes();
        if at + size > data.len() {
            break;
        }
        records += h.record_count().max(0) as u64;
        bytes += size as u64;
        at += size;
    }
    (records, bytes)
}

/// Counts one Fetch response's record data per partition: bytes of every
/// part; records of the whole batches sent from memory (batches sent from a
/// segment file with sendfile are never read by the broker, so only their
/// bytes are counted).
pub fn account_fetch<'a>(
    metrics: &ShardMetrics,
    parts: impl Iterator<Item = ((&'a str, i32), &'a Vec<crate::storage::partition::RecordsPart>)>,
) {
    use crate::storage::partition::RecordsPart;
    for ((topic, partition), records) in parts {
        if records.is_empty() {
            continue;
        }
        let (mut bytes, mut count) = (0u64, 0u64);
        for r in records {
            match r {
                RecordsPart::Memory(b) => {
                    bytes += b.len() as u64;
                    count += count_batches(b).0;
                }
                RecordsPart::File { len, .. } => bytes += len,
            }
        }
        metrics.fetched(topic, partition, bytes, count);
    }
}

fn api_name(key: i16) -> String {
    ApiKey::try_from(key).map(|k| format!("{k:?}")).unwrap_or_else(|_| key.to_string())
}

/// Escapes a label value (`\`, `"`, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn shard_label(s: &ShardSnapshot) -> String {
    format!("shard=\"{}\"", s.shard)
}

/// One metric family with one sample per shard.
fn per_shard<V: std::fmt::Display>(
    out: &mut String,
    shards: &[ShardSnapshot],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&ShardSnapshot) -> V,
) {
    header(out, name, kind, help);
    for s in shards {
        let _ = writeln!(out, "{name}{{{}}} {}", shard_label(s), value(s));
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let mut cumulative = 0u64;
    for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
        cumulative += h.counts[i];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    cumulative += h.counts[LATENCY_BUCKETS_S.len()];
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_s);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Process-wide numbers that do not belong to a shard.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessInfo {
    pub resident_memory_bytes: u64,
    pub uptime_s: f64,
    /// User + system CPU time of the whole process (every thread, io_uring
    /// workers included), from /proc/self/stat.
    pub cpu_seconds: f64,
}

/// Cluster mode: this node's view of the controller quorum and of the cluster.
pub fn render_quorum(out: &mut String, status: &tidelog_quorum::QuorumStatus, image: &crate::metadata::MetadataImage) {
    header(
        out,
        "tidelog_controller_leader",
        "gauge",
        "Node id of the controller quorum leader as this node knows it (-1: none).",
    );
    let _ = writeln!(out, "tidelog_controller_leader {}", status.leader.map(|l| l as i64).unwrap_or(-1));
    header(out, "tidelog_controller_is_voter", "gauge", "1 when this node is a voter of the controller quorum.");
    let _ = writeln!(out, "tidelog_controller_is_voter {}", status.is_voter as u8);
    header(out, "tidelog_controller_term", "gauge", "Raft term of the controller quorum as this node knows it.");
    let _ = writeln!(out, "tidelog_controller_term {}", status.term);
    header(out, "tidelog_metadata_version", "gauge", "Metadata log index applied by every shard of this node.");
    let _ = writeln!(out, "tidelog_metadata_version {}", image.version);
    header(out, "tidelog_cluster_nodes", "gauge", "Registered nodes by state (unfenced or fenced).");
    let fenced = image.nodes.values().filter(|n| n.fenced).count();
    let _ = writeln!(out, "tidelog_cluster_nodes{{state=\"unfenced\"}} {}", image.nodes.len() - fenced);
    let _ = writeln!(out, "tidelog_cluster_nodes{{state=\"fenced\"}} {fenced}");
}

/// Resident set size from /proc/self/statm (0 if unreadable).
pub fn resident_memory_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = s.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// User + system CPU seconds of this process from /proc/self/stat (0 if unreadable).
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    cpu_ticks_of_stat(&stat).map(|t| t as f64 / ticks_per_s.max(1) as f64).unwrap_or(0.0)
}

/// utime + stime (clock ticks) of a /proc/<pid>/stat line. The command name
/// is in parentheses and may hold spaces or parentheses, so fields are
/// counted from the last `)`: utime and stime are fields 14 and 15.
fn cpu_ticks_of_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Renders every shard's snapshot in the Prometheus text format (0.0.4).
pub fn render(shards: &[ShardSnapshot], process: ProcessInfo) -> String {
    let mut out = String::with_capacity(16 << 10);

    header(&mut out, "tidelog_requests_total", "counter", "Requests answered, by shard and API.");
    for s in shards {
        for (api, h) in &s.requests {
            let _ =
                writeln!(out, "tidelog_requests_total{{{},api=\"{}\"}} {}", shard_label(s), api_name(*api), h.count);
        }
    }
    header(&mut out, "tidelog_request_errors_total", "counter", "Kafka error codes answered, by shard, API and error.");
    for s in shards {
        for (api, code, n) in &s.errors {
            let _ = writeln!(
                out,
                "tidelog_request_errors_total{{{},api=\"{}\",code=\"{code}\"}} {n}",
                shard_label(s),
                api_name(*api)
            );
        }
    }
    header(
        &mut out,
        "tidelog_request_latency_seconds",
        "histogram",
        "Time from decoding a request to its encoded response (includes durability and long-poll waits), by API.",
    );
    let mut by_api: BTreeMap<i16, Histogram> = BTreeMap::new();
    for s in shards {
        for (api, h) in &s.requests {
            by_api.entry(*api).or_default().merge(h);
        }
    }
    for (api, h) in &by_api {
        histogram(&mut out, "tidelog_request_latency_seconds", &format!("api=\"{}\"", api_name(*api)), h);
    }

    type Get = fn(&PartitionSnapshot) -> u64;
    let partition_counters: [(&str, &str, Get); 4] = [
        ("tidelog_produce_bytes_total", "Record batch bytes appended by Produce.", |p| p.counters.produce_bytes),
        ("tidelog_produce_records_total", "Records appended by Produce.", |p| p.counters.produce_records),
        ("tidelog_fetch_bytes_total", "Record bytes sent by Fetch (memory and sendfile).", |p| p.counters.fetch_bytes),
        (
            "tidelog_fetch_records_total",
            "Records sent by Fetch in batches served from memory (sendfile data is counted in bytes only).",
            |p| p.counters.fetch_records,
        ),
    ];
    for (name, help, get) in partition_counters {
        header(&mut out, name, "counter", help);
        for s in shards {
            for p in &s.partitions {
                let _ = writeln!(
                    out,
                    "{name}{{{},topic=\"{}\",partition=\"{}\"}} {}",
                    shard_label(s),
                    esc(&p.topic),
                    p.partition,
                    get(p)
                );
            }
        }
    }
    type GetI = fn(&PartitionSnapshot) -> i64;
    let partition_gauges: [(&str, &str, GetI); 7] = [
        ("tidelog_high_watermark", "High watermark (next offset visible to consumers).", |p| p.high_watermark),
        (
            "tidelog_last_stable_offset",
            "Last stable offset (read_committed consumers read below it; the high watermark without open transactions).",
            |p| p.last_stable_offset,
        ),
        ("tidelog_ongoing_transactions", "Transactions open on the partition.", |p| p.ongoing_txns as i64),
        ("tidelog_log_start_offset", "First offset of the log.", |p| p.log_start_offset),
        ("tidelog_log_end_offset", "Next offset to be assigned.", |p| p.log_end_offset),
        ("tidelog_log_segments", "Segment files of the partition.", |p| p.segments as i64),
        ("tidelog_log_size_bytes", "Bytes of the partition's segments.", |p| p.segment_bytes as i64),
    ];
    for (name, help, get) in partition_gauges {
        header(&mut out, name, "gauge", help);
        for s in shards {
            for p in s.partitions.iter().filter(|p| p.open) {
                let _ = writeln!(
                    out,
                    "{name}{{{},topic=\"{}\",partition=\"{}\"}} {}",
                    shard_label(s),
                    esc(&p.topic),
                    p.partition,
                    get(p)
                );
            }
        }
    }

    header(
        &mut out,
        "tidelog_fetch_response_bytes_total",
        "counter",
        "Record bytes put in Fetch responses, by path: memory (recent-batch cache, vectored send from the shard) \
         or sendfile (segment files, from the send threads).",
    );
    for s in shards {
        let l = shard_label(s);
        let _ = writeln!(out, "tidelog_fetch_response_bytes_total{{{l},path=\"memory\"}} {}", s.fetch_memory_bytes);
        let _ = writeln!(out, "tidelog_fetch_response_bytes_total{{{l},path=\"sendfile\"}} {}", s.fetch_file_bytes);
    }
    per_shard(
        &mut out,
        shards,
        "tidelog_fetch_located_bytes_total",
        "counter",
        "Bytes read through user space to find where cold Fetch reads start (batch headers, never record data sent).",
        |s| s.fetch_located_bytes,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_fetch_cold_sends",
        "gauge",
        "Cold Fetch responses on the shard's send threads now.",
        |s| s.cold_sends,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_fetch_sendfile_throttle_seconds_total",
        "counter",
        "Seconds the shard's send threads waited on the cold-send budget (fetch.sendfile.max.bytes.per.second, fetch.sendfile.writing.max.bytes.per.second).",
        |s| format!("{:.6}", s.cold_throttle_seconds),
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_fetch_sendfile_limit_bytes_per_second",
        "gauge",
        "Cold-send limit of the whole broker in force now (0 = none): the writing limit while a shard flushed produced data in the last 100 ms, else fetch.sendfile.max.bytes.per.second.",
        |s| s.cold_limit_bytes_per_second,
    );

    per_shard(
        &mut out,
        shards,
        "tidelog_flushes_total",
        "counter",
        "Per-log group-commit flushes (writes + fdatasync).",
        |s| s.flushes,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_flush_bytes_total",
        "counter",
        "Bytes of record batches made durable by the accumulator.",
        |s| s.flush_bytes,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_storage_bytes_written_total",
        "counter",
        "Bytes of O_DIRECT segment writes, whole 4 KiB pages: a tail page rewritten by each small flush counts every \
         time, so this over tidelog_flush_bytes_total is the broker's own write amplification (index, checkpoint \
         and compaction writes not included).",
        |s| s.storage_bytes_written,
    );
    header(
        &mut out,
        "tidelog_flush_latency_seconds",
        "histogram",
        "Time of one log's flush: O_DIRECT writes plus fdatasync.",
    );
    for s in shards {
        histogram(&mut out, "tidelog_flush_latency_seconds", &shard_label(s), &s.flush_latency);
    }

    type GetC = fn(&CleanerCounters) -> u64;
    let cleaner: [(&str, &str, GetC); 9] = [
        ("tidelog_retention_segments_deleted_total", "Segments deleted by time/size retention.", |c| {
            c.retention_segments_deleted
        }),
        ("tidelog_retention_bytes_deleted_total", "Bytes deleted by time/size retention.", |c| {
            c.retention_bytes_deleted
        }),
        (
            "tidelog_delete_records_segments_deleted_total",
            "Segments deleted below a DeleteRecords log start offset.",
            |c| c.delete_records_segments_deleted,
        ),
        ("tidelog_compaction_runs_total", "Compaction passes over a partition completed.", |c| c.compaction_runs),
        ("tidelog_compaction_segments_cleaned_total", "Segments rewritten by compaction.", |c| {
            c.compaction_segments_cleaned
        }),
        ("tidelog_compaction_read_bytes_total", "Bytes read by compaction.", |c| c.compaction_bytes_read),
        ("tidelog_compaction_written_bytes_total", "Bytes written by compaction.", |c| c.compaction_bytes_written),
        ("tidelog_compaction_records_removed_total", "Records dropped by compaction.", |c| {
            c.compaction_records_removed
        }),
        ("tidelog_compaction_bytes_reclaimed_total", "Bytes reclaimed by compaction.", |c| {
            c.compaction_bytes_reclaimed
        }),
    ];
    for (name, help, get) in cleaner {
        per_shard(&mut out, shards, name, "counter", help, |s| get(&s.cleaner));
    }

    per_shard(&mut out, shards, "tidelog_connections", "gauge", "Open client connections.", |s| s.connections);
    per_shard(
        &mut out,
        shards,
        "tidelog_log_memory_bytes",
        "gauge",
        "Record bytes held in memory by the shard's logs (tail caches and unflushed appends).",
        |s| s.memory_bytes,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_request_memory_bytes",
        "gauge",
        "Request frame bytes the shard holds while reading and dispatching them (its share of queued.max.request.bytes bounds it).",
        |s| s.request_memory_bytes,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_request_memory_waits_total",
        "counter",
        "Request frames whose connection waited for room under queued.max.request.bytes before reading them.",
        |s| s.request_memory_waits,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_queued_requests",
        "gauge",
        "Requests the shard holds read (or being read) and not yet dispatched (its share of queued.max.requests bounds it).",
        |s| s.queued_requests,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_queued_requests_waits_total",
        "counter",
        "Request frames whose connection waited for a slot under queued.max.requests before reading them.",
        |s| s.queued_requests_waits,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_unflushed_bytes",
        "gauge",
        "Record bytes appended and not yet written to disk in the shard's online data directories (log.unflushed.max.bytes bounds it).",
        |s| s.unflushed_bytes,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_unflushed_waits_total",
        "counter",
        "Produce requests and replica fetches that waited for the flusher because the shard held more than log.unflushed.max.bytes unflushed.",
        |s| s.unflushed_waits,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_transactions_ongoing",
        "gauge",
        "Open transactions of the transactional ids this shard coordinates.",
        |s| s.txn_ongoing,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_transactions_committed_total",
        "counter",
        "Transactions this shard coordinated that committed (every marker written).",
        |s| s.txn_committed,
    );
    per_shard(
        &mut out,
        shards,
        "tidelog_transactions_aborted_total",
        "counter",
        "Transactions this shard coordinated that aborted (by the producer, a new producer instance, or the timeout; every marker written).",
        |s| s.txn_aborted,
    );
    if let Some(first) = shards.first() {
        header(
            &mut out,
            "tidelog_log_dir_offline",
            "gauge",
            "1 when a log.dirs entry is offline: state=\"full\" (ENOSPC: produce refused until space is freed) or \"failed\" (I/O error: offline until restart).",
        );
        for d in &first.log_dirs {
            let state = match d.state {
                0 => "online",
                1 => "full",
                _ => "failed",
            };
            let _ = writeln!(
                out,
                "tidelog_log_dir_offline{{dir=\"{}\",state=\"{state}\"}} {}",
                esc(&d.path),
                u8::from(d.state != 0)
            );
        }
        header(
            &mut out,
            "tidelog_log_dir_usable_bytes",
            "gauge",
            "Bytes free for the broker in each log.dirs filesystem.",
        );
        for d in &first.log_dirs {
            let _ = writeln!(out, "tidelog_log_dir_usable_bytes{{dir=\"{}\"}} {}", esc(&d.path), d.usable_bytes);
        }
        header(&mut out, "tidelog_log_dir_total_bytes", "gauge", "Size of each log.dirs filesystem.");
        for d in &first.log_dirs {
            let _ = writeln!(out, "tidelog_log_dir_total_bytes{{dir=\"{}\"}} {}", esc(&d.path), d.total_bytes);
        }
    }
    header(&mut out, "tidelog_shards", "gauge", "Shards that answered this scrape.");
    let _ = writeln!(out, "tidelog_shards {}", shards.len());
    header(&mut out, "process_resident_memory_bytes", "gauge", "Resident memory of the broker process.");
    let _ = writeln!(out, "process_resident_memory_bytes {}", process.resident_memory_bytes);
    header(&mut out, "process_cpu_seconds_total", "counter", "User and system CPU time of the broker, in seconds.");
    let _ = writeln!(out, "process_cpu_seconds_total {:.3}", process.cpu_seconds);
    header(&mut out, "tidelog_uptime_seconds", "gauge", "Seconds since the broker started.");
    let _ = writeln!(out, "tidelog_uptime_seconds {:.3}", process.uptime_s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidelog_protocol::batch::{build_batch, ProducerFields, RecordRef};

    #[test]
    fn histogram_buckets_are_cumulative_and_complete() {
        let m = ShardMetrics::default();
        m.request(ApiKey::Produce, Duration::from_micros(50));
        m.request(ApiKey::Produce, Duration::from_millis(3));
        m.request(ApiKey::Produce, Duration::from_secs(20));
        m.error(ApiKey::Produce, 10);
        m.error(ApiKey::Produce, 0);
        m.produced("t", 1, 100, 4);
        m.produced("t", 1, 50, 1);
        let mut snap = m.snapshot(3);
        snap.set_partition_gauges(PartitionSnapshot {
            topic: "t".into(),
            partition: 1,
            high_watermark: 5,
            log_end_offset: 5,
            segments: 1,
            segment_bytes: 150,
            ..Default::default()
        });
        let text = render(&[snap], ProcessInfo::default());
        let lines: Vec<&str> = text.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("tidelog_requests_total{shard=\"3\",api=\"Produce\"} 3"), "{text}");
        assert!(has("tidelog_request_errors_total{shard=\"3\",api=\"Produce\",code=\"10\"} 1"), "{text}");
        assert!(!text.contains("code=\"0\""));
        assert!(has("tidelog_request_latency_seconds_bucket{api=\"Produce\",le=\"0.0001\"} 1"), "{text}");
        assert!(has("tidelog_request_latency_seconds_bucket{api=\"Produce\",le=\"0.0025\"} 1"), "{text}");
        assert!(has("tidelog_request_latency_seconds_bucket{api=\"Produce\",le=\"0.005\"} 2"), "{text}");
        assert!(has("tidelog_request_latency_seconds_bucket{api=\"Produce\",le=\"10\"} 2"), "{text}");
        assert!(has("tidelog_request_latency_seconds_bucket{api=\"Produce\",le=\"+Inf\"} 3"), "{text}");
        assert!(has("tidelog_request_latency_seconds_count{api=\"Produce\"} 3"), "{text}");
        assert!(has("tidelog_produce_bytes_total{shard=\"3\",topic=\"t\",partition=\"1\"} 150"), "{text}");
        assert!(has("tidelog_produce_records_total{shard=\"3\",topic=\"t\",partition=\"1\"} 5"), "{text}");
        assert!(has("tidelog_high_watermark{shard=\"3\",topic=\"t\",partition=\"1\"} 5"), "{text}");
        // Partition 0 only has (zero) counters, no gauges: it is not open here.
        assert!(has("tidelog_produce_bytes_total{shard=\"3\",topic=\"t\",partition=\"0\"} 0"), "{text}");
        assert!(!text.contains("tidelog_high_watermark{shard=\"3\",topic=\"t\",partition=\"0\"}"));
        // Every sample line belongs to a declared metric family.
        let families: Vec<&str> =
            lines.iter().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        for l in lines.iter().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(families.contains(&name) || families.contains(&base), "undeclared {name}");
        }
    }

    #[test]
    fn count_batches_counts_whole_batches_only() {
        let recs: Vec<RecordRef<'_>> = (0..3)
            .map(|_| RecordRef { key: Some(b"k"), value: Some(b"v"), headers: &[], timestamp_delta_ms: 0 })
            .collect();
        let b = build_batch(&recs, 1000, ProducerFields::default());
        let mut two = b.to_vec();
        two.extend_from_slice(&b);
        assert_eq!(count_batches(&two), (6, 2 * b.len() as u64));
        // A cut second batch is not counted.
        assert_eq!(count_batches(&two[..b.len() + 20]), (3, b.len() as u64));
        assert_eq!(count_batches(&[]), (0, 0));
    }

    #[test]
    fn cpu_ticks_are_fields_14_and_15_after_the_command_name() {
        // A command name with a space and a parenthesis must not shift fields.
        let stat = "4242 (tide log) x) S 1 4242 4242 0 -1 4194560 1200 0 3 0 \
                    250 75 0 0 20 0 9 0 100 123456 789 18446744073709551615";
        assert_eq!(cpu_ticks_of_stat(stat), Some(325));
        assert_eq!(cpu_ticks_of_stat("12 (x) S 1 2"), None);
        assert_eq!(cpu_ticks_of_stat("garbage"), None);
        // This process's own line parses (its value may still be 0 ticks).
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks_of_stat(&own).is_some(), "{own}");
        let s = process_cpu_seconds();
        assert!((0.0..1e6).contains(&s), "{s}");
    }

    #[test]
    fn process_and_storage_families_are_rendered() {
        let snap = ShardSnapshot { shard: 1, storage_bytes_written: 8192, ..Default::default() };
        let text = render(&[snap], ProcessInfo { cpu_seconds: 1.5, ..Default::default() });
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"process_cpu_seconds_total 1.500"), "{text}");
        assert!(lines.contains(&"# TYPE process_cpu_seconds_total counter"), "{text}");
        assert!(lines.contains(&"tidelog_storage_bytes_written_total{shard=\"1\"} 8192"), "{text}");
    }

    #[test]
    fn log_dir_gauges_render_state_and_space() {
        let dirs = vec![
            LogDirSnapshot { path: "/d/a".into(), state: 0, usable_bytes: 10, total_bytes: 20 },
            LogDirSnapshot { path: "/d/b".into(), state: 1, usable_bytes: 0, total_bytes: 20 },
        ];
        let snap = ShardSnapshot { shard: 0, log_dirs: dirs, ..Default::default() };
        let text = render(&[snap], ProcessInfo::default());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"tidelog_log_dir_offline{dir=\"/d/a\",state=\"online\"} 0"), "{text}");
        assert!(lines.contains(&"tidelog_log_dir_offline{dir=\"/d/b\",state=\"full\"} 1"), "{text}");
        assert!(lines.contains(&"tidelog_log_dir_usable_bytes{dir=\"/d/a\"} 10"), "{text}");
        assert!(lines.contains(&"tidelog_log_dir_total_bytes{dir=\"/d/b\"} 20"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
