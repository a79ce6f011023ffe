//! Orchestrates one benchmark run on the main thread: topic setup, start
//! offsets, one pinned thread per producer and consumer, the live progress
//! line, the drain at the end, and merging what the threads measured.
//!
//! The only state shared with the worker threads is `Live` (atomic counters
//! and two mutex-guarded histograms merged into twice a second). The broker
//! efficiency probe (`efficiency`) reads the broker's counters from this
//! thread when the measured window opens and when it closes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use hdrhistogram::Histogram;
use tidelog_protocol::messages::ApiKey;

use crate::client::{ensure_topic, list_offsets, Cluster, Versions};
use crate::consumer::{run_consumer, ConsumerConfig, ConsumerResult, Membership, VerifyStats};
use crate::efficiency::{self, Efficiency, Probe};
use crate::group::GroupSettings;
use crate::producer::{run_producer, ProducerConfig};
use crate::stats::{new_latency_histogram, ThreadStats};
use crate::util::wall_now_us;
use crate::workload::{ConsumerMode, StartAt, Workload};

/// Times every thread agrees on.
#[derive(Clone, Copy, Debug)]
pub struct RunClock {
    pub start: Instant,
    pub wall_start_us: u64,
    pub warmup_end: Instant,
    /// When producers stop generating (duration mode).
    pub end: Instant,
    pub drain_timeout_s: f64,
}

/// Counters the progress line reads while the run goes on.
pub struct Live {
    pub stop: AtomicBool,
    pub produced_records: AtomicU64,
    pub produced_bytes: AtomicU64,
    /// Record-batch bytes acknowledged (values plus keys, headers, framing).
    pub produced_batch_bytes: AtomicU64,
    pub consumed_records: AtomicU64,
    pub consumed_bytes: AtomicU64,
    /// Records read per consumer group (index = group).
    pub consumed_per_group: Vec<AtomicU64>,
    pub acked_total: AtomicU64,
    pub errors: AtomicU64,
    ack: Mutex<Histogram<u64>>,
    e2e: Mutex<Histogram<u64>>,
}

impl Live {
    pub fn new(groups: usize) -> Live {
        Live {
            stop: AtomicBool::new(false),
            produced_records: AtomicU64::new(0),
            produced_bytes: AtomicU64::new(0),
            produced_batch_bytes: AtomicU64::new(0),
            consumed_records: AtomicU64::new(0),
            consumed_bytes: AtomicU64::new(0),
            consumed_per_group: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            acked_total: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ack: Mutex::new(new_latency_histogram()),
            e2e: Mutex::new(new_latency_histogram()),
        }
    }

    pub fn merge_latency(&self, h: &Histogram<u64>) {
        if let Ok(mut g) = self.ack.lock() {
            let _ = g.add(h);
        }
    }
    pub fn merge_e2e(&self, h: &Histogram<u64>) {
        if let Ok(mut g) = self.e2e.lock() {
            let _ = g.add(h);
        }
    }
    /// (batch bytes, value bytes) acknowledged so far.
    fn produced(&self) -> efficiency::Produced {
        (self.produced_batch_bytes.load(Ordering::Relaxed), self.produced_bytes.load(Ordering::Relaxed))
    }

    fn p99_ms(&self) -> (f64, f64) {
        let a = self.ack.lock().map(|h| if h.is_empty() { 0 } else { h.value_at_quantile(0.99) }).unwrap_or(0);
        let e = self.e2e.lock().map(|h| if h.is_empty() { 0 } else { h.value_at_quantile(0.99) }).unwrap_or(0);
        (a as f64 / 1000.0, e as f64 / 1000.0)
    }
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub bootstrap: String,
    pub workload: Workload,
    pub cores: Vec<usize>,
    pub verify: bool,
    pub progress: bool,
    pub seed: u64,
    /// Where the broker's CPU time and bytes written come from.
    pub efficiency: efficiency::Source,
    /// The broker's data directory, whose block device is read device-wide.
    pub data_dir: std::path::PathBuf,
}

/// What a finished run hands to the report.
pub struct RunOutcome {
    pub cluster: Cluster,
    pub versions: Versions,
    pub stats: ThreadStats,
    /// Records acknowledged over the whole run (warm-up included).
    pub produced_total: u64,
    /// Records consumed per group over the whole run.
    pub consumed_total_per_group: Vec<u64>,
    /// What each group should read: `produced_total`, or for a consumer-only
    /// run the backlog (capped by `run.records`); `None` when open-ended.
    pub expected_per_group: Option<u64>,
    /// Group ids used (consumer.mode = "group").
    pub group_ids: Vec<String>,
    pub verify: Option<VerifyStats>,
    pub produce_window_s: f64,
    pub consume_window_s: f64,
    pub elapsed_s: f64,
    /// Wall-clock time of `RunClock::start`, in µs since the epoch.
    pub wall_start_us: u64,
    /// Broker CPU and bytes written over the produce window (the read
    /// window for a consumer-only run).
    pub efficiency: Efficiency,
    /// Producers finished before the warm-up ended: nothing was measured.
    pub ended_in_warmup: bool,
}

fn spawn_pinned<T: Send + 'static>(
    name: String,
    core: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
    Ok(std::thread::Builder::new().name(name).spawn(move || {
        if let Some(id) = core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                eprintln!("warning: could not pin thread to core {id}");
            }
        }
        f()
    })?)
}

fn join<T>(h: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join().map_err(|_| anyhow!("worker thread panicked"))?
}

/// What a run does, decided once from the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Producers and consumers together (consumers may be absent).
    Live,
    /// Produce everything, then read the backlog (`run.catch_up`).
    CatchUp,
    /// No producers: read what the topic holds, up to `run.records` per
    /// group (stopping at the end of the backlog), or for `run.duration_s`.
    ReadOnly,
}

pub fn run(opts: &RunOptions) -> anyhow::Result<RunOutcome> {
    let w = &opts.workload;
    w.validate()?;
    let topic = w.topic_name();
    let (cluster, versions) =
        ensure_topic(&opts.bootstrap, &topic, w.topic.partitions, w.topic.replication_factor, w.topic.create)?;
    let broker_addrs: Vec<String> =
        std::iter::once(opts.bootstrap.clone()).chain(cluster.brokers.values().cloned()).collect();
    let mut probe = Probe::new(&opts.efficiency, &broker_addrs, &opts.data_dir);
    let groups = if w.consumer.count > 0 { w.consumer.groups.max(1) } else { 0 };
    let consumers_total = w.consumer.count * groups;
    let shape = if w.producer.count == 0 {
        Shape::ReadOnly
    } else if w.run.catch_up {
        Shape::CatchUp
    } else {
        Shape::Live
    };
    if consumers_total > 0 && w.consumer.mode == ConsumerMode::Group {
        for key in [ApiKey::FindCoordinator, ApiKey::JoinGroup, ApiKey::SyncGroup, ApiKey::OffsetCommit] {
            if let Err(e) = versions.get(key) {
                bail!("{e:#}; use consumer.mode = \"assigned\" with this broker");
            }
        }
    }
    let latest = list_offsets(&cluster, &topic, -1)?;
    let start_offsets = match (shape, w.consumer.start) {
        (Shape::CatchUp, _) | (_, StartAt::Latest) => latest.clone(),
        (_, StartAt::Earliest) => list_offsets(&cluster, &topic, -2)?,
    };
    let backlog: u64 = latest.iter().zip(&start_offsets).map(|(l, s)| (l - s).max(0) as u64).sum();
    let group_records_max = if shape == Shape::ReadOnly { w.run.records } else { 0 };
    if shape == Shape::ReadOnly && consumers_total > 0 {
        if w.run.records > backlog {
            eprintln!(
                "note: {topic} holds {backlog} records after the start offsets, fewer than --records {}; reading those",
                w.run.records
            );
        }
        if backlog == 0 && w.run.records > 0 {
            bail!("{topic} has nothing to read from the {:?} offsets (use --start earliest?)", w.consumer.start);
        }
    }
    let stamp = wall_now_us() / 1_000_000;
    let group_ids: Vec<String> = if w.consumer.mode == ConsumerMode::Group {
        let prefix = if w.consumer.group_id_prefix.is_empty() {
            format!("tidelog-bench-{}-{stamp}", w.name)
        } else {
            w.consumer.group_id_prefix.clone()
        };
        (0..groups).map(|g| format!("{prefix}-{g}")).collect()
    } else {
        Vec::new()
    };

    let live = Arc::new(Live::new(groups));
    let begin = Instant::now() + Duration::from_millis(200);
    let warmup_end = begin + Duration::from_secs_f64(w.run.warmup_s);
    let clock = RunClock {
        start: begin,
        wall_start_us: wall_now_us() + 200_000,
        warmup_end,
        end: if w.run.records > 0 {
            begin + Duration::from_secs(365 * 24 * 3600)
        } else {
            warmup_end + Duration::from_secs_f64(w.run.duration_s)
        },
        drain_timeout_s: w.run.drain_timeout_s,
    };
    let end_offsets: Arc<OnceLock<Vec<i64>>> = Arc::new(OnceLock::new());
    if shape == Shape::ReadOnly && w.run.records > 0 {
        // A bounded read of what is there now.
        let _ = end_offsets.set(latest.clone());
    }
    let mut next_core = 0usize;
    let mut core = || {
        let c = opts.cores.get(next_core % opts.cores.len().max(1)).copied();
        next_core += 1;
        c
    };

    // Bounded reads (catch-up, read-only with a record count) are measured
    // whole from when the consumers start; warm-up only applies to runs
    // that go on for a duration.
    let bounded_read = shape == Shape::CatchUp || (shape == Shape::ReadOnly && w.run.records > 0);
    let spawn_consumers = |core: &mut dyn FnMut() -> Option<usize>| -> anyhow::Result<(Vec<_>, Instant)> {
        let measure_from = if bounded_read { Instant::now() } else { clock.warmup_end };
        let mut handles = Vec::new();
        let parts: Vec<i32> = cluster.partitions.iter().map(|p| p.index).collect();
        for g in 0..groups {
            for c in 0..w.consumer.count {
                let membership = match w.consumer.mode {
                    ConsumerMode::Assigned => Membership::Assigned(
                        parts.iter().copied().filter(|p| *p as usize % w.consumer.count == c).collect(),
                    ),
                    ConsumerMode::Group => Membership::Group {
                        bootstrap: opts.bootstrap.clone(),
                        settings: GroupSettings {
                            group_id: group_ids.get(g).cloned().unwrap_or_default(),
                            client_id: format!("tidelog-bench-consumer-{g}-{c}"),
                            assignor: w.consumer.assignor,
                            session_timeout_ms: w.consumer.session_timeout_ms,
                            rebalance_timeout_ms: w.consumer.rebalance_timeout_ms,
                            heartbeat_interval_ms: w.consumer.heartbeat_interval_ms,
                            commit_interval_ms: w.consumer.commit_interval_ms,
                        },
                    },
                };
                let cfg = ConsumerConfig {
                    group: g,
                    index: c,
                    spec: w.consumer.clone(),
                    topic: topic.clone(),
                    cluster: cluster.clone(),
                    membership,
                    start_offsets: start_offsets.clone(),
                    end_offsets: end_offsets.clone(),
                    measure_from,
                    group_records_max,
                    record_e2e: shape != Shape::ReadOnly,
                    clock,
                    live: live.clone(),
                    verify: opts.verify,
                };
                handles.push(spawn_pinned(format!("consumer-{g}-{c}"), core(), move || run_consumer(cfg))?);
            }
        }
        Ok((handles, measure_from))
    };

    let mut consumers = Vec::new();
    let mut consume_from = clock.warmup_end;
    if shape != Shape::CatchUp {
        (consumers, consume_from) = spawn_consumers(&mut core)?;
    }
    let mut producers = Vec::new();
    let n_prod = w.producer.count as u64;
    let rate_each = w.producer.total_rate_records_per_s() / n_prod.max(1) as f64;
    for i in 0..n_prod {
        let records_max = (w.run.records > 0).then(|| w.run.records / n_prod + u64::from(i < w.run.records % n_prod));
        let cfg = ProducerConfig {
            index: i as u32,
            spec: w.producer.clone(),
            topic: topic.clone(),
            cluster: cluster.clone(),
            rate_per_s: rate_each,
            records_max,
            clock,
            live: live.clone(),
            seed: opts.seed.wrapping_add(i * 7919),
        };
        producers.push(spawn_pinned(format!("producer-{i}"), core(), move || run_producer(cfg))?);
    }

    let records_target = if shape == Shape::ReadOnly { w.run.records.min(backlog) } else { w.run.records };
    let mut progress = Progress::new(opts.progress, clock, records_target, shape == Shape::ReadOnly, live.clone());
    let mut merged = ThreadStats::default();
    let mut first_error: Option<anyhow::Error> = None;
    // The efficiency window is the produce window (warm-up end to the
    // producers' end), or for a consumer-only run the read window.
    let window_from = if shape == Shape::ReadOnly { consume_from } else { clock.warmup_end };
    let open_window = |probe: &mut Probe| {
        if !probe.started() && Instant::now() >= window_from {
            probe.start(live.produced());
        }
    };
    let nap = |probe: &Probe| {
        let until_window = window_from.saturating_duration_since(Instant::now());
        let d = if probe.started() { Duration::from_millis(100) } else { until_window.min(Duration::from_millis(100)) };
        std::thread::sleep(d.max(Duration::from_millis(1)));
    };
    while producers.iter().any(|h| !h.is_finished()) {
        open_window(&mut probe);
        progress.tick("producing");
        nap(&probe);
    }
    let producers_done = Instant::now();
    let ended_in_warmup = shape != Shape::ReadOnly && producers_done < clock.warmup_end;
    let mut efficiency = None;
    if shape != Shape::ReadOnly {
        efficiency = Some(probe.finish(live.produced()));
    }
    for h in producers {
        match join(h) {
            Ok(s) => merged.merge(&s),
            Err(e) => {
                live.stop.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
    }
    if first_error.is_some() || consumers_total == 0 {
        live.stop.store(true, Ordering::Relaxed);
    } else if shape != Shape::ReadOnly {
        let ends = list_offsets(&cluster, &topic, -1)?;
        let _ = end_offsets.set(ends);
        if shape == Shape::CatchUp {
            (consumers, consume_from) = spawn_consumers(&mut core)?;
        }
    }
    while consumers.iter().any(|h| !h.is_finished()) {
        if shape == Shape::ReadOnly && w.run.records == 0 && Instant::now() >= clock.end {
            live.stop.store(true, Ordering::Relaxed);
        }
        if shape == Shape::ReadOnly {
            open_window(&mut probe);
        }
        progress.tick(if shape == Shape::ReadOnly { "reading" } else { "draining" });
        nap(&probe);
    }
    progress.finish();
    let consumers_done = Instant::now();
    let efficiency = efficiency.unwrap_or_else(|| probe.finish(live.produced()));
    let mut per_group = vec![0u64; groups];
    let mut per_group_verify: Vec<VerifyStats> = vec![VerifyStats::default(); groups];
    for h in consumers {
        match join(h) {
            Ok(ConsumerResult { group, stats, verify: v }) => {
                if let Some(slot) = per_group.get_mut(group) {
                    *slot += stats.consumed.records.iter().sum::<u64>();
                }
                merged.merge(&stats);
                if let Some(slot) = per_group_verify.get_mut(group) {
                    slot.merge(&v);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let verify = opts.verify.then(|| {
        let mut all = VerifyStats::default();
        for (g, mut v) in per_group_verify.into_iter().enumerate() {
            // A read stopped by its record budget ends short of the end
            // offsets on purpose; only overlaps and holes count then.
            let budget_hit = group_records_max > 0 && per_group[g] >= group_records_max;
            let ends = end_offsets.get().filter(|_| !budget_hit).map(|e| e.as_slice());
            v.check_coverage(g, &start_offsets, ends);
            v.ranges.clear();
            all.merge(&v);
        }
        all
    });
    let expected_per_group = match shape {
        Shape::ReadOnly if w.run.records > 0 => Some(w.run.records.min(backlog)),
        Shape::ReadOnly => None,
        _ => Some(live.acked_total.load(Ordering::Relaxed)),
    };
    let produce_window_s = producers_done.saturating_duration_since(clock.warmup_end).as_secs_f64();
    let consume_window_s = consumers_done.saturating_duration_since(consume_from).as_secs_f64();
    Ok(RunOutcome {
        cluster,
        versions,
        stats: merged,
        produced_total: live.acked_total.load(Ordering::Relaxed),
        consumed_total_per_group: per_group,
        expected_per_group,
        group_ids,
        verify,
        produce_window_s: if shape == Shape::ReadOnly { 0.0 } else { produce_window_s },
        consume_window_s,
        elapsed_s: consumers_done.saturating_duration_since(clock.start).as_secs_f64(),
        wall_start_us: clock.wall_start_us,
        efficiency,
        ended_in_warmup,
    })
}

/// The live progress line on stderr, once a second.
struct Progress {
    enabled: bool,
    clock: RunClock,
    records_target: u64,
    /// Consumer-only run: progress is records read by a group, not acked.
    reading: bool,
    live: Arc<Live>,
    last: Instant,
    last_produced: (u64, u64),
    last_consumed: (u64, u64),
    printed: bool,
}

impl Progress {
    fn new(enabled: bool, clock: RunClock, records_target: u64, reading: bool, live: Arc<Live>) -> Progress {
        Progress {
            enabled,
            clock,
            records_target,
            reading,
            live,
            last: Instant::now(),
            last_produced: (0, 0),
            last_consumed: (0, 0),
            printed: false,
        }
    }

    fn tick(&mut self, phase: &str) {
        let dt = self.last.elapsed().as_secs_f64();
        if !self.enabled || dt < 1.0 {
            return;
        }
        let l = &self.live;
        let p = (l.produced_records.load(Ordering::Relaxed), l.produced_bytes.load(Ordering::Relaxed));
        let c = (l.consumed_records.load(Ordering::Relaxed), l.consumed_bytes.load(Ordering::Relaxed));
        let now = Instant::now();
        let left = if self.records_target > 0 {
            // Progress of the slowest side that has a target: acks, or for a
            // read-only run, records read per group.
            let (done, rate) = if self.reading {
                let groups = l.consumed_per_group.len().max(1) as f64;
                let done = l.consumed_per_group.iter().map(|c| c.load(Ordering::Relaxed)).min().unwrap_or(0);
                (done, (c.0 - self.last_consumed.0) as f64 / dt / groups)
            } else {
                (l.acked_total.load(Ordering::Relaxed), (p.0 - self.last_produced.0) as f64 / dt)
            };
            if rate > 0.0 {
                format!("~{:.0}s", self.records_target.saturating_sub(done) as f64 / rate)
            } else {
                "?".into()
            }
        } else {
            format!("{:.0}s", self.clock.end.saturating_duration_since(now).as_secs_f64())
        };
        let warm = if now < self.clock.warmup_end { " (warm-up)" } else { "" };
        let (ack_p99, e2e_p99) = l.p99_ms();
        let line = format!(
            "[{phase}{warm}] produce {:>9.0} rec/s {:>8.1} MB/s | consume {:>9.0} rec/s {:>8.1} MB/s | p99 ack {:>7.2} ms e2e {:>7.2} ms | errors {} | left {left}",
            (p.0 - self.last_produced.0) as f64 / dt,
            (p.1 - self.last_produced.1) as f64 / dt / 1e6,
            (c.0 - self.last_consumed.0) as f64 / dt,
            (c.1 - self.last_consumed.1) as f64 / dt / 1e6,
            ack_p99,
            e2e_p99,
            l.errors.load(Ordering::Relaxed),
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line:<150}");
        let _ = err.flush();
        self.printed = true;
        self.last = now;
        self.last_produced = p;
        self.last_consumed = c;
    }

    fn finish(&self) {
        if self.printed {
            eprintln!();
        }
    }
}
