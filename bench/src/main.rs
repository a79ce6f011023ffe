//! `tidelog-bench`: command-line front end. Parses flags (every flag is
//! documented in `--help`), merges them over a workload file, runs the
//! benchmark / baseline / compare, and writes the reports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use tidelog_bench::baseline::{self, Baseline, BaselineOptions};
use tidelog_bench::efficiency;
use tidelog_bench::hiccup;
use tidelog_bench::host::host_info;
use tidelog_bench::report::{self, SummaryInputs};
use tidelog_bench::run::{self, RunOptions};
use tidelog_bench::util::{parse_cores, wall_now_us};
use tidelog_bench::workload::{Assignor, Codec, ConsumerMode, KeyMode, SizeDist, StartAt, Workload};

#[derive(Parser, Debug)]
#[command(
    name = "tidelog-bench",
    version,
    about = "Kafka-protocol load generator with latency percentile reports and plots",
    long_about = "Kafka-protocol load generator with latency percentile reports and plots.\n\n\
Runs a workload (TOML file and/or flags) against any Kafka-compatible broker with its own client: one \
pinned thread per producer and consumer, per-producer accumulators (batch.size + linger.ms, sticky \
partitioning, murmur2 key hashing like Kafka's default partitioner), pipelined requests. Reports produce \
ack latency (per record and per batch), end-to-end latency, throughput over time and errors, as a \
terminal table, summary.json, .hgrm percentile files and SVG charts, next to a hardware baseline.\n\n\
Examples (bench/README.md has more):\n  tidelog-bench baseline --dir /var/lib/tidelog\n  \
tidelog-bench run --workload bench/workloads/max-throughput.toml --bootstrap 127.0.0.1:9092\n  \
tidelog-bench run --workload bench/workloads/fan-out-3-groups.toml\n  \
tidelog-bench run --topic backlog --no-create-topic --producers 0 --consumers 2 --start earliest --records 4000000\n  \
tidelog-bench compare results/run-a results/run-b"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a workload against a broker and write the reports.
    Run(Box<RunArgs>),
    /// Measure the hardware baseline: O_DIRECT sequential write bandwidth, fdatasync latency, loopback TCP.
    Baseline(BaselineArgs),
    /// Compare finished runs side by side: one table, one latency chart.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Workload file (TOML); flags below override its values. Without it, defaults plus flags.
    #[arg(short, long)]
    workload: Option<PathBuf>,
    /// Bootstrap broker host:port (any broker of the cluster).
    #[arg(short, long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// CPU cores to pin worker threads to, e.g. "0-3,6"; threads are assigned round-robin. Default: all cores.
    #[arg(long)]
    cores: Option<String>,
    /// Directory for the run's reports; default results/<workload>-<unix time>.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Name of this run in reports (default: the workload name).
    #[arg(long)]
    name: Option<String>,
    /// Label for the broker in reports and `compare` (e.g. "tidelog 0.1", "kafka 3.7").
    #[arg(long, default_value = "")]
    broker_label: String,
    /// Broker software version to record; the Kafka protocol does not report it.
    #[arg(long, default_value = "unknown")]
    broker_version: String,
    /// Load a baseline JSON written by `tidelog-bench baseline` instead of measuring one.
    #[arg(long, conflicts_with = "baseline_dir")]
    baseline: Option<PathBuf>,
    /// Measure a quick baseline (about 4 s) in this directory before the run (should be the broker's data dir filesystem).
    #[arg(long)]
    baseline_dir: Option<PathBuf>,
    /// Skip the baseline entirely (reports then have no ratios).
    #[arg(long, conflicts_with_all = ["baseline", "baseline_dir"])]
    no_baseline: bool,
    /// The broker's data directory, to record its filesystem in the host section (default: --baseline-dir or /var/tmp).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Check every consumed record: per-partition order, per-producer order, keyed records on the murmur2 partition, and per group that no offset was read twice or skipped.
    #[arg(long)]
    verify: bool,
    /// Exit non-zero when verification finds a problem or a group read other than it should (all produced records; with --producers 0, the backlog capped by --records).
    #[arg(long)]
    strict: bool,
    /// No live progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Host hiccup meter: one pinned thread per core sleeps this long (µs) in a loop and records how late it wakes, so a latency spike can be told apart from the host pausing (steal, interrupts, other load). Reported beside the latencies; 0 turns it off.
    #[arg(long, default_value_t = 1000)]
    hiccup_interval_us: u64,
    /// Seed for keys, partition choice and payloads.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Topic name (default: tidelog-bench-<workload name>).
    #[arg(long)]
    topic: Option<String>,
    /// Partitions of the topic (when created).
    #[arg(long)]
    partitions: Option<i32>,
    /// Replication factor of the topic (when created); more than 1 needs a cluster (scripts/cluster).
    #[arg(long)]
    replication_factor: Option<i16>,
    /// Do not create the topic; fail if it does not exist.
    #[arg(long)]
    no_create_topic: bool,
    /// Number of producer threads; 0 = consumer-only run reading what the topic holds (see --start, --records).
    #[arg(long)]
    producers: Option<usize>,
    /// Consumer threads per group.
    #[arg(long)]
    consumers: Option<usize>,
    /// Independent consumer groups (fan-out): each reads every record.
    #[arg(long)]
    groups: Option<usize>,
    /// Consumer mode: "assigned" (static partition split) or "group" (Kafka consumer groups: FindCoordinator, JoinGroup/SyncGroup, heartbeats, OffsetCommit, LeaveGroup).
    #[arg(long, value_parser = parse_mode)]
    consumer_mode: Option<ConsumerMode>,
    /// Group mode: partition assignment the group leader computes, "range" or "roundrobin".
    #[arg(long, value_parser = parse_assignor)]
    assignor: Option<Assignor>,
    /// Group mode: group ids are PREFIX-0, PREFIX-1, ...; default tidelog-bench-<workload>-<unix time> (fresh groups).
    #[arg(long)]
    group_id_prefix: Option<String>,
    /// Group mode: commit positions this often (they are also committed before each rebalance and at the end).
    #[arg(long)]
    commit_interval_ms: Option<u64>,
    /// Group mode: heartbeat interval; a rebalance is noticed within it.
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Group mode: session timeout a member must heartbeat within.
    #[arg(long)]
    session_timeout_ms: Option<i32>,
    /// Where consumers start: "latest" (only new records) or "earliest" (with --producers 0: read the topic's backlog).
    #[arg(long, value_parser = parse_start)]
    start: Option<StartAt>,
    /// Target total rate in records/s over all producers (0 = as fast as possible). Paced runs measure latency from the intended send time.
    #[arg(long)]
    rate_records: Option<f64>,
    /// Target total rate in MB/s (10^6 bytes of record values) over all producers.
    #[arg(long)]
    rate_mb: Option<f64>,
    /// Fixed record value size in bytes (>= 20: the value carries send time, producer and sequence).
    #[arg(long)]
    record_size: Option<usize>,
    /// Uniform record size range MIN-MAX in bytes, e.g. 100-2000 (overrides --record-size).
    #[arg(long)]
    record_size_range: Option<String>,
    /// Keys: "none" (sticky partitioning), "random" or "round-robin" over --key-count keys (murmur2 partitioning).
    #[arg(long, value_parser = parse_keys)]
    keys: Option<KeyMode>,
    /// Number of distinct keys.
    #[arg(long)]
    key_count: Option<u64>,
    /// acks, as Kafka spells it: all or -1 (all in-sync replicas), 1 (leader) or 0 (none; no ack latency).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_acks)]
    acks: Option<i16>,
    /// linger.ms: how long a batch waits for more records.
    #[arg(long)]
    linger_ms: Option<u64>,
    /// batch.size in bytes.
    #[arg(long)]
    batch_size: Option<usize>,
    /// compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, value_parser = parse_codec)]
    compression: Option<Codec>,
    /// max.in.flight.requests.per.connection: produce requests a producer keeps outstanding per broker connection.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Measured duration in seconds after warm-up (clears a record count from the workload file).
    #[arg(long, conflicts_with = "records")]
    duration_s: Option<f64>,
    /// Total records over all producers instead of a duration. With --producers 0: records each group reads from the existing topic (stopping early at the end of what it holds).
    #[arg(long)]
    records: Option<u64>,
    /// Warm-up seconds: traffic runs but histograms and rates ignore it. Bounded reads (--catch-up, and --producers 0 with --records) are measured whole.
    #[arg(long)]
    warmup_s: Option<f64>,
    /// After the producers stop, how long consumers may take to reach the end offsets.
    #[arg(long)]
    drain_timeout_s: Option<f64>,
    /// Produce everything first, then read the backlog (catch-up read).
    #[arg(long)]
    catch_up: bool,
    /// Broker process id(s) on this host, comma-separated (a local cluster: one per node), for broker CPU-s per GB and write amplification from /proc/PID/stat and /proc/PID/io. Default: the local processes listening on the brokers' ports. 0 turns the broker figures off.
    #[arg(long, value_delimiter = ',', conflicts_with = "metrics_url")]
    broker_pid: Vec<u32>,
    /// Transactional produce comparison instead of the usual run: transaction sizes in record batches, comma-separated, e.g. 1,10,100. First an idempotent producer (enable.idempotence, no transactions) writes, then for each size transactional producers (FindCoordinator, InitProducerId, then per transaction AddPartitionsToTxn, that many Produce batches, EndTxn commit), each run for --duration-s after --warmup-s (or --records, in whole transactions), all on one topic. Reports records and MB/s of committed records, commit latency (EndTxn round trip) and transaction latency (first Produce written to EndTxn answered) per size next to the idempotent run. Uses --producers, --partitions, --record-size, --batch-size, --compression, --max-in-flight; acks is always all, no consumers run; --verify reads everything back with read_committed. Writes txn-summary.json, report.txt, .hgrm files and latency.svg.
    #[arg(long, value_parser = parse_txn_sizes)]
    transactions: Option<TxnSizes>,
    /// With --transactions: transactional ids are PREFIX-<size>-<producer>. Default tidelog-bench-txn-<unix time>, fresh ids, so no earlier producer is fenced and no open transaction of an earlier run is recovered.
    #[arg(long, requires = "transactions")]
    transactional_id_prefix: Option<String>,
    /// With --transactions: transaction.timeout.ms sent in InitProducerId; the coordinator aborts a transaction open longer than this.
    #[arg(long, default_value_t = 60_000)]
    transaction_timeout_ms: i32,
    /// With --transactions: wait before retrying AddPartitionsToTxn or EndTxn answered CONCURRENT_TRANSACTIONS (the previous commit's markers are still being written) or COORDINATOR_LOAD_IN_PROGRESS. 20 is what Kafka's Java producer waits; smaller shows how soon the broker finishes a commit.
    #[arg(long, default_value_t = tidelog_bench::txn::TXN_RETRY_BACKOFF_MS_DEFAULT)]
    txn_retry_backoff_ms: u64,
    /// Prometheus endpoint(s) of the broker(s), e.g. http://127.0.0.1:9644/metrics, comma-separated: broker CPU from process_cpu_seconds_total and bytes written from tidelog_storage_bytes_written_total, summed (for a broker not on this host).
    #[arg(long, value_delimiter = ',')]
    metrics_url: Vec<String>,
}

#[derive(Args, Debug)]
struct BaselineArgs {
    /// Directory to measure (put it on the filesystem the broker uses); a scratch file is written and removed.
    #[arg(long)]
    dir: PathBuf,
    /// Where to write the baseline JSON (default DIR/../tidelog-bench-baseline.json is avoided: default ./results/baseline.json).
    #[arg(long, default_value = "results/baseline.json")]
    out: PathBuf,
    /// Seconds of sequential O_DIRECT writes.
    #[arg(long, default_value_t = 5.0)]
    write_seconds: f64,
    /// Cap on bytes written by the write test.
    #[arg(long, default_value_t = 2 << 30)]
    write_bytes_max: u64,
    /// Seconds for each O_DIRECT read test (one reader, then 4 in parallel) over the written file.
    #[arg(long, default_value_t = 3.0)]
    read_seconds: f64,
    /// Number of 4 KiB write + fdatasync rounds.
    #[arg(long, default_value_t = 1000)]
    fsyncs: usize,
    /// Seconds of loopback TCP streaming.
    #[arg(long, default_value_t = 2.0)]
    loopback_seconds: f64,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Run directories (each with summary.json and .hgrm files).
    #[arg(required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// Where to write the combined latency chart.
    #[arg(long, default_value = "compare.svg")]
    svg: PathBuf,
}

/// `--transactions`: batches per transaction, one run per size.
#[derive(Clone, Debug)]
struct TxnSizes(Vec<u32>);

fn parse_txn_sizes(s: &str) -> Result<TxnSizes, String> {
    tidelog_bench::txn::parse_sizes(s).map(TxnSizes)
}

fn parse_mode(s: &str) -> Result<ConsumerMode, String> {
    match s {
        "assigned" => Ok(ConsumerMode::Assigned),
        "group" => Ok(ConsumerMode::Group),
        _ => Err(format!("{s:?}: expected assigned or group")),
    }
}
fn parse_assignor(s: &str) -> Result<Assignor, String> {
    Assignor::from_protocol_name(s).ok_or_else(|| format!("{s:?}: expected range or roundrobin"))
}
fn parse_start(s: &str) -> Result<StartAt, String> {
    match s {
        "latest" => Ok(StartAt::Latest),
        "earliest" => Ok(StartAt::Earliest),
        _ => Err(format!("{s:?}: expected latest or earliest")),
    }
}
fn parse_keys(s: &str) -> Result<KeyMode, String> {
    match s {
        "none" => Ok(KeyMode::None),
        "random" => Ok(KeyMode::Random),
        "round-robin" => Ok(KeyMode::RoundRobin),
        _ => Err(format!("{s:?}: expected none, random or round-robin")),
    }
}
fn parse_acks(s: &str) -> Result<i16, String> {
    tidelog_bench::workload::parse_acks(s)
}
fn parse_codec(s: &str) -> Result<Codec, String> {
    match s {
        "none" => Ok(Codec::None),
        "gzip" => Ok(Codec::Gzip),
        "snappy" => Ok(Codec::Snappy),
        "lz4" => Ok(Codec::Lz4),
        "zstd" => Ok(Codec::Zstd),
        _ => Err(format!("{s:?}: expected none, gzip, snappy, lz4 or zstd")),
    }
}

fn build_workload(a: &RunArgs) -> anyhow::Result<Workload> {
    let mut w = match &a.workload {
        Some(p) => {
            Workload::from_toml(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => Workload::default(),
    };
    if let Some(v) = &a.topic {
        w.topic.name = v.clone();
    }
    if let Some(v) = a.partitions {
        w.topic.partitions = v;
    }
    if let Some(v) = a.replication_factor {
        w.topic.replication_factor = v;
    }
    if a.no_create_topic {
        w.topic.create = false;
    }
    let p = &mut w.producer;
    if let Some(v) = a.producers {
        p.count = v;
    }
    if let Some(v) = a.rate_records {
        p.rate_records_per_s = v;
        p.rate_mb_per_s = 0.0;
    }
    if let Some(v) = a.rate_mb {
        p.rate_mb_per_s = v;
        p.rate_records_per_s = 0.0;
    }
    if let Some(v) = a.record_size {
        p.record_size_bytes = v;
        p.record_size = None;
    }
    if let Some(r) = &a.record_size_range {
        let (lo, hi) = r.split_once('-').context("--record-size-range wants MIN-MAX")?;
        p.record_size = Some(SizeDist::Uniform { min_bytes: lo.trim().parse()?, max_bytes: hi.trim().parse()? });
    }
    if let Some(v) = a.keys {
        p.keys = v;
    }
    if let Some(v) = a.key_count {
        p.key_count = v;
    }
    if let Some(v) = a.acks {
        p.acks = v;
    }
    if let Some(v) = a.linger_ms {
        p.linger_ms = v;
    }
    if let Some(v) = a.batch_size {
        p.batch_size_bytes = v;
    }
    if let Some(v) = a.compression {
        p.compression = v;
    }
    if let Some(v) = a.max_in_flight {
        p.max_in_flight = v;
    }
    let c = &mut w.consumer;
    if let Some(v) = a.consumers {
        c.count = v;
    }
    if let Some(v) = a.groups {
        c.groups = v;
    }
    if let Some(v) = a.consumer_mode {
        c.mode = v;
    }
    if let Some(v) = a.start {
        c.start = v;
    }
    if let Some(v) = a.assignor {
        c.assignor = v;
    }
    if let Some(v) = &a.group_id_prefix {
        c.group_id_prefix = v.clone();
    }
    if let Some(v) = a.commit_interval_ms {
        c.commit_interval_ms = v;
    }
    if let Some(v) = a.heartbeat_interval_ms {
        c.heartbeat_interval_ms = v;
    }
    if let Some(v) = a.session_timeout_ms {
        c.session_timeout_ms = v;
    }
    let r = &mut w.run;
    if let Some(v) = a.duration_s {
        r.duration_s = v;
        r.records = 0;
    }
    if let Some(v) = a.records {
        r.records = v;
    }
    if let Some(v) = a.warmup_s {
        r.warmup_s = v;
    }
    if let Some(v) = a.drain_timeout_s {
        r.drain_timeout_s = v;
    }
    if a.catch_up {
        r.catch_up = true;
    }
    w.validate()?;
    Ok(w)
}

fn get_baseline(a: &RunArgs) -> anyhow::Result<Option<Baseline>> {
    if a.no_baseline {
        return Ok(None);
    }
    if let Some(p) = &a.baseline {
        return baseline::load(p).map(Some);
    }
    let default = Path::new("results/baseline.json");
    if a.baseline_dir.is_none() && default.exists() {
        eprintln!("using baseline {}", default.display());
        return baseline::load(default).map(Some);
    }
    let dir = a.baseline_dir.clone().or_else(|| a.data_dir.clone()).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    eprintln!("measuring a quick baseline in {} (pass --baseline FILE to reuse one)", dir.display());
    let b = baseline::measure(&BaselineOptions::quick(dir))?;
    eprint!("{}", baseline::render(&b));
    Ok(Some(b))
}

fn cmd_run(a: &RunArgs) -> anyhow::Result<bool> {
    let hiccup_interval = match a.hiccup_interval_us {
        0 => None,
        us if us < 100 => anyhow::bail!(
            "--hiccup-interval-us {us} would wake every core more than 10 000 times a second: use 0 (off) or at least 100"
        ),
        us => Some(Duration::from_micros(us)),
    };
    let w = build_workload(a)?;
    if let Some(sizes) = &a.transactions {
        return cmd_txn(a, w, &sizes.0, hiccup_interval);
    }
    let all_cores: Vec<usize> =
        core_affinity::get_core_ids().map(|v| v.into_iter().map(|c| c.id).collect()).unwrap_or_default();
    let cores = match &a.cores {
        Some(s) => parse_cores(s)?,
        None => all_cores.clone(),
    };
    let base = get_baseline(a)?;
    let data_dir = a.data_dir.clone().or_else(|| a.baseline_dir.clone()).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let started = wall_now_us() / 1_000_000;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("results/{}-{started}", w.name)));
    let efficiency = if a.broker_pid == [0] {
        efficiency::Source::Off
    } else if !a.broker_pid.is_empty() {
        efficiency::Source::Pids(a.broker_pid.clone())
    } else if !a.metrics_url.is_empty() {
        efficiency::Source::MetricsUrls(a.metrics_url.clone())
    } else {
        efficiency::Source::Auto
    };
    let opts = RunOptions {
        bootstrap: a.bootstrap.clone(),
        workload: w.clone(),
        cores,
        verify: a.verify,
        progress: !a.quiet,
        seed: a.seed,
        efficiency,
        data_dir: data_dir.clone(),
    };
    // Every core of the host, not only the bench's: the broker's cores matter most.
    let (outcome, hiccups) = hiccup::measure_during(&all_cores, hiccup_interval, || run::run(&opts))?;
    let mut summary = report::build_summary(
        SummaryInputs {
            name: a.name.clone().unwrap_or_else(|| w.name.clone()),
            started_at_unix_s: started,
            workload: &w,
            bootstrap: &a.bootstrap,
            broker_label: &a.broker_label,
            broker_version: &a.broker_version,
            host: host_info(&data_dir),
            baseline: base,
            hiccups,
        },
        &outcome,
    );
    let files = report::write_run_dir(&out, &mut summary, &outcome)?;
    print!("{}", report::render_table(&summary));
    println!("reports:");
    for f in files {
        println!("  {}", f.display());
    }
    let r = &summary.results;
    for n in &r.notes {
        eprintln!("{n}");
    }
    let mut ok = true;
    if a.strict {
        if !r.notes.is_empty() {
            ok = false;
        }
        if let Some(v) = &summary.verify {
            if v.problems() > 0 {
                eprintln!("verification failed: {}", v.first_problem.as_deref().unwrap_or("?"));
                ok = false;
            }
        }
        if let Some(want) = r.expected_per_group {
            if r.consumed_total_per_group.iter().any(|&c| c != want) {
                eprintln!("consumed per group {:?} != expected {want}", r.consumed_total_per_group);
                ok = false;
            }
        }
        if r.failed_records > 0 {
            eprintln!("{} records failed", r.failed_records);
            ok = false;
        }
    }
    Ok(ok)
}

/// `run --transactions`: the idempotent run and one transactional run per
/// size, one report.
fn cmd_txn(a: &RunArgs, w: Workload, sizes: &[u32], hiccup_interval: Option<Duration>) -> anyhow::Result<bool> {
    use tidelog_bench::txn;
    if w.consumer.count > 0 && a.consumers.is_some() {
        eprintln!("note: --transactions runs no consumers; --consumers is ignored");
    }
    let all_cores: Vec<usize> =
        core_affinity::get_core_ids().map(|v| v.into_iter().map(|c| c.id).collect()).unwrap_or_default();
    let base = get_baseline(a)?;
    let data_dir = a.data_dir.clone().or_else(|| a.baseline_dir.clone()).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let started = wall_now_us() / 1_000_000;
    let name = a.name.clone().unwrap_or_else(|| format!("{}-transactions", w.name));
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("results/{name}-{started}")));
    let opts = txn::TxnOptions {
        bootstrap: a.bootstrap.clone(),
        workload: w.clone(),
        sizes: sizes.to_vec(),
        transactional_id_prefix: a
            .transactional_id_prefix
            .clone()
            .unwrap_or_else(|| format!("tidelog-bench-txn-{started}")),
        transaction_timeout_ms: a.transaction_timeout_ms,
        txn_retry_backoff_ms: a.txn_retry_backoff_ms,
        verify: a.verify,
        progress: !a.quiet,
        seed: a.seed,
    };
    let (outcome, hiccups) = hiccup::measure_during(&all_cores, hiccup_interval, || txn::run_comparison(&opts))?;
    let mut summary = txn::build_summary(
        txn::TxnSummaryInputs {
            name,
            started_at_unix_s: started,
            workload: w,
            bootstrap: a.bootstrap.clone(),
            broker_label: a.broker_label.clone(),
            broker_version: a.broker_version.clone(),
            host: host_info(&data_dir),
            baseline: base,
            hiccups,
            transaction_timeout_ms: a.transaction_timeout_ms,
            txn_retry_backoff_ms: a.txn_retry_backoff_ms,
        },
        &outcome,
    );
    let files = txn::write_run_dir(&out, &mut summary, &outcome)?;
    print!("{}", txn::render_table(&summary));
    println!("reports:");
    for f in files {
        println!("  {}", f.display());
    }
    let mut ok = true;
    if a.strict {
        if !summary.notes.is_empty() {
            ok = false;
        }
        if let Some(v) = &summary.verify {
            if v.problems > 0 {
                eprintln!("verification failed: {}", v.first_problems.first().map(String::as_str).unwrap_or("?"));
                ok = false;
            }
        }
    }
    Ok(ok)
}

fn cmd_baseline(a: &BaselineArgs) -> anyhow::Result<()> {
    let opts = BaselineOptions {
        dir: a.dir.clone(),
        write_seconds: a.write_seconds,
        write_bytes_max: a.write_bytes_max,
        read_seconds: a.read_seconds,
        fsync_count: a.fsyncs,
        loopback_seconds: a.loopback_seconds,
    };
    let b = baseline::measure(&opts)?;
    print!("{}", baseline::render(&b));
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&b)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("written to {}", a.out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Baseline(a) => cmd_baseline(a).map(|_| true),
        Command::Compare(a) => report::compare(&a.runs, &a.svg).map(|t| {
            print!("{t}");
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
