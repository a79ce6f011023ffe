//! Transactional produce against idempotent produce (`run --transactions
//! 1,10,100`): one idempotent run, then one run per transaction size, each
//! with the same producers, record sizes and batch sizes, one after the
//! other in one invocation, on one topic.
//!
//! Life of a transaction (one producer thread, `batches` = N):
//!
//! ```text
//!   FindCoordinator(key_type TRANSACTION) -> coordinator connection      once
//!   InitProducerId(transactional_id, timeout) -> producer id, epoch      once
//!   loop:
//!     AddPartitionsToTxn(v0-3: the partitions the N batches go to)   "add partitions"
//!     build N batches (transactional bit, per-partition sequences)
//!     Produce x N batches, pipelined, acks=all  ---------+ "transaction":
//!     EndTxn(committed) ----- "commit" -----------------+ first Produce
//!                                                          written to EndTxn
//!                                                          answered
//! ```
//!
//! The idempotent run skips the coordinator: InitProducerId without a
//! transactional id, then the same batches (sequences, no transactional bit)
//! with up to `max_in_flight` requests outstanding per connection and no
//! pause at transaction boundaries: what a non-transactional producer with
//! `enable.idempotence=true` does.
//!
//! Each producer runs on its own thread with its own connections (data path
//! non-blocking and pipelined like `producer`, coordinator calls blocking);
//! the main thread prints progress and merges the threads' figures after
//! joining them. With `--verify` every record is read back afterwards with
//! Fetch isolation_level=1 (read_committed) and counted.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tidelog_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use tidelog_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use tidelog_protocol::messages::{
    AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey, EndTxnRequest, EndTxnResponse, FetchRequest,
    FetchResponse, FindCoordinatorRequest, FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse,
    ProducerId, TopicName, TransactionalId,
};
use tidelog_protocol::{ErrorCode, StrBytes};

use crate::baseline::Baseline;
use crate::client::{ensure_topic, is_retriable, list_offsets, Cluster, Conn, Versions};
use crate::hiccup::Hiccups;
use crate::host::HostInfo;
use crate::producer::{connect_leaders, poll_leaders, produce_request, InFlight, Leader, QueuedBatch, RETRY_BACKOFF};
use crate::records::{batch_records, for_each_fetched_batch, for_each_record, BatchBuilder, ProducerStamp};
use crate::report::{finish_run_dir, hgrm, hgrm_points, render_baseline, render_hiccups, BrokerInfo, Throughput};
use crate::run::RunClock;
use crate::stats::{new_latency_histogram, record_us, Percentiles};
use crate::svg::{latency_by_percentile, Series, PALETTE};
use crate::util::{wall_now_us, Rng};
use crate::workload::{payload_filler, payload_header, payload_tail, Workload, PAYLOAD_HEADER_BYTES};

pub const TXN_SUMMARY_SCHEMA: &str = "tidelog-bench/txn-summary/v1";
pub const TXN_SUMMARY_FILE: &str = "txn-summary.json";

/// FindCoordinator's key type for a transactional id.
const KEY_TYPE_TRANSACTION: i8 = 1;
/// How long coordinator discovery and InitProducerId retry transient answers
/// (a Kafka broker creates `__transaction_state` on the first request).
const COORDINATOR_WAIT: Duration = Duration::from_secs(15);
/// Kafka's producer backs off this little on CONCURRENT_TRANSACTIONS
/// (`TransactionManager.ADD_PARTITIONS_RETRY_BACKOFF_MS`): the previous
/// EndTxn's markers are usually written within milliseconds.
pub const TXN_RETRY_BACKOFF_MS_DEFAULT: u64 = 20;
/// Largest transaction size accepted, in batches (a 100 000-batch
/// transaction of 128 KiB batches would hold 13 GB in memory).
pub const TXN_BATCHES_MAX: u32 = 10_000;
/// Upper bits of the "producer index" field in the values this mode writes,
/// so verification tells its records from a plain run's (producer 0, 1, ..).
const STREAM_TAG: u32 = 0x7478_0000;
/// Verification gives up on a partition that stops advancing this long.
const VERIFY_STALL: Duration = Duration::from_secs(15);

// Kafka error codes this module acts on.
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const NOT_COORDINATOR: i16 = 16;
const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
const CONCURRENT_TRANSACTIONS: i16 = 51;
const OPERATION_NOT_ATTEMPTED: i16 = 55;

/// Kafka's name for an error code, with the number.
pub fn error_name(code: i16) -> String {
    let name = match code {
        COORDINATOR_LOAD_IN_PROGRESS => "COORDINATOR_LOAD_IN_PROGRESS",
        COORDINATOR_NOT_AVAILABLE => "COORDINATOR_NOT_AVAILABLE",
        NOT_COORDINATOR => "NOT_COORDINATOR",
        OUT_OF_ORDER_SEQUENCE_NUMBER => "OUT_OF_ORDER_SEQUENCE_NUMBER",
        DUPLICATE_SEQUENCE_NUMBER => "DUPLICATE_SEQUENCE_NUMBER",
        47 => "INVALID_PRODUCER_EPOCH",
        48 => "INVALID_TXN_STATE",
        49 => "INVALID_PRODUCER_ID_MAPPING",
        50 => "INVALID_TRANSACTION_TIMEOUT",
        CONCURRENT_TRANSACTIONS => "CONCURRENT_TRANSACTIONS",
        53 => "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        OPERATION_NOT_ATTEMPTED => "OPERATION_NOT_ATTEMPTED",
        59 => "UNKNOWN_PRODUCER_ID",
        90 => "PRODUCER_FENCED",
        120 => "TRANSACTION_ABORTABLE",
        _ => "",
    };
    if !name.is_empty() {
        return format!("{name} ({code})");
    }
    match ErrorCode::from_code(code) {
        ErrorCode::UnknownServerError if code != -1 => format!("error code {code}"),
        e => format!("{} ({code})", e.name()),
    }
}

/// Transaction sizes from `--transactions`, e.g. "1,10,100": batches per
/// transaction, each 1..=TXN_BATCHES_MAX, no repeats, in the order given.
pub fn parse_sizes(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let n: u32 = part.parse().map_err(|_| format!("{part:?} is not a number of batches (e.g. 1,10,100)"))?;
        if n == 0 || n > TXN_BATCHES_MAX {
            return Err(format!("{n} batches per transaction: expected 1..={TXN_BATCHES_MAX}"));
        }
        if out.contains(&n) {
            return Err(format!("{n} is listed twice"));
        }
        out.push(n);
    }
    Ok(out)
}

/// What a run produces with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// enable.idempotence=true, no transactions: the comparison.
    Idempotent,
    /// Transactions of this many record batches each.
    Transactional { batches: u32 },
}

impl Mode {
    pub fn label(self) -> String {
        match self {
            Mode::Idempotent => "idempotent".into(),
            Mode::Transactional { batches } => format!("txn-{batches}"),
        }
    }
}

/// Kafka's `DefaultRecordBatch.incrementSequence`: sequences wrap from
/// i32::MAX to 0.
pub fn next_sequence(base: i32, records: i32) -> i32 {
    debug_assert!(base >= 0 && records > 0, "base {base} records {records}");
    if base > i32::MAX - records {
        records - (i32::MAX - base) - 1
    } else {
        base + records
    }
}

/// Per-partition sequence numbers of one producer id and epoch: each batch
/// takes the next `records` numbers of its partition, starting at 0.
#[derive(Clone, Debug)]
pub struct Sequences {
    next: Vec<i32>,
}

impl Sequences {
    pub fn new(partitions: usize) -> Sequences {
        Sequences { next: vec![0; partitions] }
    }

    /// Reserves the sequences of a batch of `records`; returns its base.
    pub fn take(&mut self, partition: usize, records: i32) -> i32 {
        let base = self.next[partition];
        self.next[partition] = next_sequence(base, records);
        base
    }

    pub fn next(&self, partition: usize) -> i32 {
        self.next[partition]
    }
}

/// Where a batch put back for a retry goes in a leader's ready queue, given
/// the (partition, base sequence) of what is queued: before the first
/// batch of its partition with a later sequence, else after the last one
/// of its partition, else at the front. Batches of one partition must go
/// out in sequence order, or the broker answers OUT_OF_ORDER_SEQUENCE_NUMBER.
pub fn requeue_position(queued: impl IntoIterator<Item = (i32, i32)>, partition: i32, base_sequence: i32) -> usize {
    let mut after_last = None;
    for (i, (p, s)) in queued.into_iter().enumerate() {
        if p != partition {
            continue;
        }
        if s > base_sequence {
            return i;
        }
        after_last = Some(i + 1);
    }
    after_last.unwrap_or(0)
}

/// Partitions the batches of one transaction go to: `batches` partitions
/// round-robin from `cursor`. Returns (partition per batch, the distinct
/// partitions sorted, the next cursor).
pub fn plan_partitions(cursor: usize, batches: usize, partitions: usize) -> (Vec<usize>, Vec<usize>, usize) {
    let per_batch: Vec<usize> = (0..batches).map(|i| (cursor + i) % partitions).collect();
    let mut distinct = per_batch.clone();
    distinct.sort_unstable();
    distinct.dedup();
    (per_batch, distinct, (cursor + batches) % partitions)
}

pub struct TxnOptions {
    pub bootstrap: String,
    pub workload: Workload,
    pub sizes: Vec<u32>,
    pub transactional_id_prefix: String,
    pub transaction_timeout_ms: i32,
    /// Backoff before retrying a coordinator call (CONCURRENT_TRANSACTIONS ...).
    pub txn_retry_backoff_ms: u64,
    pub verify: bool,
    pub progress: bool,
    pub seed: u64,
}

/// Latency histograms of one run, µs.
pub struct ModeHistograms {
    pub commit: Histogram<u64>,
    pub transaction: Histogram<u64>,
    pub add_partitions: Histogram<u64>,
    pub ack_batch: Histogram<u64>,
}

impl ModeHistograms {
    fn new() -> ModeHistograms {
        ModeHistograms {
            commit: new_latency_histogram(),
            transaction: new_latency_histogram(),
            add_partitions: new_latency_histogram(),
            ack_batch: new_latency_histogram(),
        }
    }

    fn merge(&mut self, o: &ModeHistograms) {
        let _ = self.commit.add(&o.commit);
        let _ = self.transaction.add(&o.transaction);
        let _ = self.add_partitions.add(&o.add_partitions);
        let _ = self.ack_batch.add(&o.ack_batch);
    }

    /// (file stem, title, histogram) of each series, for .hgrm files.
    fn series(&self) -> [(&'static str, &'static str, &Histogram<u64>); 4] {
        [
            ("commit", "commit (EndTxn)", &self.commit),
            ("transaction", "transaction", &self.transaction),
            ("add-partitions", "AddPartitionsToTxn", &self.add_partitions),
            ("produce-ack-batch", "produce ack (batch)", &self.ack_batch),
        ]
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TxnLatencies {
    /// EndTxn(committed) written to its answer, retries included.
    pub commit: Percentiles,
    /// First Produce of the transaction written to EndTxn answered.
    pub transaction: Percentiles,
    /// AddPartitionsToTxn round trip (before the transaction's first Produce).
    pub add_partitions: Percentiles,
    /// A Produce request written to the answer for its batch.
    pub produce_ack_batch: Percentiles,
}

/// One run (idempotent, or one transaction size) in the summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ModeResult {
    /// "idempotent" or "txn-N".
    pub label: String,
    pub transactional: bool,
    /// 0 for the idempotent run.
    pub batches_per_transaction: u32,
    pub transactional_ids: Vec<String>,
    /// "host:port" of each producer's transaction coordinator.
    pub coordinators: Vec<String>,
    /// After warm-up: committed (or, idempotent, acknowledged) records,
    /// value bytes, per second over the measured window.
    pub throughput: Throughput,
    pub transactions: u64,
    pub batches: u64,
    /// Whole run, warm-up included: what verification expects.
    pub records_total: u64,
    pub transactions_total: u64,
    pub latency_us: TxnLatencies,
    pub requests: u64,
    pub retries: u64,
    /// Error name -> count of answers with it (retried ones included).
    pub error_codes: BTreeMap<String, u64>,
    /// This run's MB/s over the idempotent run's, and over loopback.
    pub ratios: BTreeMap<String, f64>,
    pub notes: Vec<String>,
}

/// `--verify`: what a read_committed read of the runs' offsets found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TxnVerify {
    pub records_expected: u64,
    pub records_read: u64,
    /// Records read more than once (counted once per extra copy).
    pub duplicates: u64,
    /// Records committed (or acknowledged) but never read.
    pub missing: u64,
    /// Records with a sequence the producer never reported done.
    pub unexpected: u64,
    /// Commit markers (control batches, type COMMIT) the EndTxn calls
    /// should have written: one per partition per transaction.
    pub commit_markers_expected: u64,
    pub commit_markers_read: u64,
    pub abort_markers_read: u64,
    /// Aborted transactions the broker listed in Fetch answers.
    pub aborted_transactions_listed: u64,
    /// Transactional runs' records in batches without the transactional
    /// bit, or the idempotent run's with it.
    pub wrong_transactional_bit: u64,
    /// Records of other writers inside the runs' offsets (skipped).
    pub foreign_records: u64,
    pub problems: u64,
    pub first_problems: Vec<String>,
}

impl TxnVerify {
    fn problem(&mut self, what: String) {
        self.problems += 1;
        if self.first_problems.len() < 10 {
            self.first_problems.push(what);
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TxnSummary {
    pub schema: String,
    pub name: String,
    pub started_at_unix_s: u64,
    pub command_line: Vec<String>,
    pub workload: Workload,
    pub topic: String,
    pub broker: BrokerInfo,
    pub host: HostInfo,
    pub baseline: Option<Baseline>,
    pub transaction_timeout_ms: i32,
    #[serde(default)]
    pub txn_retry_backoff_ms: u64,
    pub runs: Vec<ModeResult>,
    pub verify: Option<TxnVerify>,
    pub hiccups: Option<Hiccups>,
    pub notes: Vec<String>,
    pub files: Vec<String>,
}

/// What `run_comparison` hands to the report.
pub struct TxnOutcome {
    pub topic: String,
    pub cluster: Cluster,
    pub versions: Versions,
    pub runs: Vec<(ModeResult, ModeHistograms)>,
    pub verify: Option<TxnVerify>,
}

/// Counters the progress line reads.
struct TxnLive {
    stop: AtomicBool,
    records: AtomicU64,
    bytes: AtomicU64,
    transactions: AtomicU64,
    errors: AtomicU64,
    commit: Mutex<Histogram<u64>>,
}

impl TxnLive {
    fn new() -> TxnLive {
        TxnLive {
            stop: AtomicBool::new(false),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            commit: Mutex::new(new_latency_histogram()),
        }
    }
}

/// Connection to a transaction coordinator.
struct Coordinator {
    conn: Conn,
    addr: String,
}

fn not_supported(txn_id: &str, request: &str, detail: Option<&str>) -> anyhow::Error {
    anyhow!(
        "the broker does not support transactions (COORDINATOR_NOT_AVAILABLE for transactional id {txn_id:?} from {request}, \
         retried for {} s{})",
        COORDINATOR_WAIT.as_secs(),
        detail.map(|d| format!(": {d}")).unwrap_or_default()
    )
}

/// Fails early, with the reason, when the broker's ApiVersions lacks what a
/// transactional producer needs.
pub fn require_transaction_apis(v: &Versions) -> anyhow::Result<()> {
    let missing: Vec<String> =
        [ApiKey::FindCoordinator, ApiKey::InitProducerId, ApiKey::AddPartitionsToTxn, ApiKey::EndTxn]
            .into_iter()
            .filter(|k| !v.broker_supports(*k))
            .map(|k| format!("{k:?}"))
            .collect();
    if !missing.is_empty() {
        bail!("the broker does not support transactions (its ApiVersions does not list {})", missing.join(", "));
    }
    for k in [ApiKey::FindCoordinator, ApiKey::InitProducerId, ApiKey::AddPartitionsToTxn, ApiKey::EndTxn] {
        v.get(k)?;
    }
    Ok(())
}

/// FindCoordinator(key_type TRANSACTION) through `bootstrap`, retrying
/// COORDINATOR_NOT_AVAILABLE / COORDINATOR_LOAD_IN_PROGRESS for up to
/// `COORDINATOR_WAIT`; connects to the coordinator.
fn find_coordinator(bootstrap: &str, txn_id: &str, client_id: &str) -> anyhow::Result<Coordinator> {
    let deadline = Instant::now() + COORDINATOR_WAIT;
    let mut conn = Conn::connect(bootstrap, client_id)?;
    require_transaction_apis(&conn.versions)?;
    let version = conn.versions.get(ApiKey::FindCoordinator)?;
    let key = StrBytes::from_string(txn_id.to_string());
    loop {
        let req = if version >= 4 {
            FindCoordinatorRequest::default()
                .with_key_type(KEY_TYPE_TRANSACTION)
                .with_coordinator_keys(vec![key.clone()])
        } else {
            FindCoordinatorRequest::default().with_key_type(KEY_TYPE_TRANSACTION).with_key(key.clone())
        };
        let resp: FindCoordinatorResponse = conn.call(ApiKey::FindCoordinator, &req)?;
        let (code, message, host, port) = if version >= 4 {
            let c = resp
                .coordinators
                .first()
                .ok_or_else(|| anyhow!("FindCoordinator v{version} for {txn_id:?}: no coordinator in the answer"))?;
            (c.error_code, c.error_message.as_ref().map(|m| m.to_string()), c.host.to_string(), c.port)
        } else {
            (resp.error_code, resp.error_message.as_ref().map(|m| m.to_string()), resp.host.to_string(), resp.port)
        };
        match code {
            0 => {
                let addr = format!("{host}:{port}");
                let conn = Conn::connect(&addr, client_id)
                    .with_context(|| format!("connecting to the transaction coordinator of {txn_id:?}"))?;
                require_transaction_apis(&conn.versions)?;
                return Ok(Coordinator { conn, addr });
            }
            COORDINATOR_NOT_AVAILABLE | COORDINATOR_LOAD_IN_PROGRESS if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            COORDINATOR_NOT_AVAILABLE => return Err(not_supported(txn_id, "FindCoordinator", message.as_deref())),
            c => bail!(
                "FindCoordinator (key type TRANSACTION) for transactional id {txn_id:?}: {}{}",
                error_name(c),
                message.map(|m| format!(": {m}")).unwrap_or_default()
            ),
        }
    }
}

/// A transactional producer's coordinator side.
struct TxnSession {
    coord: Coordinator,
    bootstrap: String,
    client_id: String,
    txn_id: String,
    producer_id: i64,
    epoch: i16,
    retry_backoff: Duration,
}

impl TxnSession {
    /// FindCoordinator + InitProducerId with the transactional id.
    fn init(bootstrap: &str, txn_id: &str, timeout_ms: i32, client_id: &str) -> anyhow::Result<TxnSession> {
        let deadline = Instant::now() + COORDINATOR_WAIT;
        let mut coord = find_coordinator(bootstrap, txn_id, client_id)?;
        loop {
            let req = InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_string(txn_id.to_string()))))
                .with_transaction_timeout_ms(timeout_ms)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
            let resp: InitProducerIdResponse = coord.conn.call(ApiKey::InitProducerId, &req)?;
            let code = resp.error_code;
            match code {
                0 => {
                    return Ok(TxnSession {
                        coord,
                        bootstrap: bootstrap.to_string(),
                        client_id: client_id.to_string(),
                        txn_id: txn_id.to_string(),
                        producer_id: resp.producer_id.0,
                        epoch: resp.producer_epoch,
                        retry_backoff: Duration::from_millis(TXN_RETRY_BACKOFF_MS_DEFAULT),
                    })
                }
                COORDINATOR_LOAD_IN_PROGRESS | CONCURRENT_TRANSACTIONS if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                NOT_COORDINATOR | COORDINATOR_NOT_AVAILABLE if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                    coord = find_coordinator(bootstrap, txn_id, client_id)?;
                }
                COORDINATOR_NOT_AVAILABLE => return Err(not_supported(txn_id, "InitProducerId", None)),
                c if is_retriable(c) && Instant::now() < deadline => {
                    eprintln!(
                        "note: InitProducerId for {txn_id:?} at {} answered {}; retrying",
                        coord.addr,
                        error_name(c)
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                c => bail!(
                    "InitProducerId for transactional id {txn_id:?} (transaction timeout {timeout_ms} ms) at {}: {}",
                    coord.addr,
                    error_name(c)
                ),
            }
        }
    }

    /// Runs a coordinator call until it answers 0: CONCURRENT_TRANSACTIONS
    /// and COORDINATOR_LOAD_IN_PROGRESS are retried after a short backoff,
    /// NOT_COORDINATOR and COORDINATOR_NOT_AVAILABLE after finding the
    /// coordinator again, for up to `timeout`. Returns the retries taken.
    fn call_until_ok(
        &mut self,
        what: &str,
        timeout: Duration,
        stats: &mut WorkerStats,
        mut call: impl FnMut(&mut Conn) -> anyhow::Result<i16>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            stats.requests += 1;
            let code = call(&mut self.coord.conn).with_context(|| format!("{what} at {}", self.coord.addr))?;
            if code == 0 {
                return Ok(());
            }
            stats.count_error(code);
            let retriable =
                matches!(code, CONCURRENT_TRANSACTIONS | COORDINATOR_LOAD_IN_PROGRESS | OPERATION_NOT_ATTEMPTED);
            let rediscover = matches!(code, NOT_COORDINATOR | COORDINATOR_NOT_AVAILABLE);
            if !(retriable || rediscover) || Instant::now() >= deadline {
                bail!(
                    "{what} for transactional id {:?} (producer id {}, epoch {}) at {}: {}{}",
                    self.txn_id,
                    self.producer_id,
                    self.epoch,
                    self.coord.addr,
                    error_name(code),
                    if retriable || rediscover {
                        format!(", still after {} ms of retries", timeout.as_millis())
                    } else {
                        String::new()
                    }
                );
            }
            stats.retries += 1;
            std::thread::sleep(self.retry_backoff);
            if rediscover {
                self.coord = find_coordinator(&self.bootstrap, &self.txn_id, &self.client_id)?;
            }
        }
    }

    fn add_partitions(
        &mut self,
        topic: &TopicName,
        partitions: &[usize],
        timeout: Duration,
        stats: &mut WorkerStats,
    ) -> anyhow::Result<()> {
        let req = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_string(self.txn_id.clone())))
            .with_v3_and_below_producer_id(ProducerId(self.producer_id))
            .with_v3_and_below_producer_epoch(self.epoch)
            .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(topic.clone())
                .with_partitions(partitions.iter().map(|&p| p as i32).collect())]);
        let wanted = partitions.len();
        self.call_until_ok("AddPartitionsToTxn", timeout, stats, |conn| {
            let resp: AddPartitionsToTxnResponse = conn.call(ApiKey::AddPartitionsToTxn, &req)?;
            let codes: Vec<i16> = resp
                .results_by_topic_v3_and_below
                .iter()
                .flat_map(|t| t.results_by_partition.iter().map(|p| p.partition_error_code))
                .collect();
            anyhow::ensure!(codes.len() == wanted, "answered for {} partitions, asked for {wanted}", codes.len());
            // OPERATION_NOT_ATTEMPTED only says another partition failed.
            Ok(codes
                .iter()
                .copied()
                .find(|&c| c != 0 && c != OPERATION_NOT_ATTEMPTED)
                .or_else(|| codes.iter().copied().find(|&c| c != 0))
                .unwrap_or(0))
        })
    }

    fn commit(&mut self, timeout: Duration, stats: &mut WorkerStats) -> anyhow::Result<()> {
        let req = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(self.txn_id.clone())))
            .with_producer_id(ProducerId(self.producer_id))
            .with_producer_epoch(self.epoch)
            .with_committed(true);
        self.call_until_ok("EndTxn(commit)", timeout, stats, |conn| {
            let resp: EndTxnResponse = conn.call(ApiKey::EndTxn, &req)?;
            Ok(resp.error_code)
        })
    }
}

/// InitProducerId without a transactional id (an idempotent producer).
fn init_idempotent(bootstrap: &str, timeout_ms: i32, client_id: &str) -> anyhow::Result<(i64, i16)> {
    let deadline = Instant::now() + COORDINATOR_WAIT;
    let mut conn = Conn::connect(bootstrap, client_id)?;
    conn.versions.get(ApiKey::InitProducerId).context("an idempotent producer needs InitProducerId")?;
    loop {
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(timeout_ms)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let resp: InitProducerIdResponse = conn.call(ApiKey::InitProducerId, &req)?;
        match resp.error_code {
            0 => return Ok((resp.producer_id.0, resp.producer_epoch)),
            c if (is_retriable(c)
                || matches!(c, COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE | NOT_COORDINATOR))
                && Instant::now() < deadline =>
            {
                // Kafka's producer retries retriable InitProducerId errors too.
                eprintln!("note: InitProducerId (idempotent) at {bootstrap} answered {}; retrying", error_name(c));
                std::thread::sleep(Duration::from_millis(100))
            }
            c => bail!("InitProducerId (idempotent, no transactional id) at {bootstrap}: {}", error_name(c)),
        }
    }
}

struct Batch {
    partition: i32,
    base_sequence: i32,
    bytes: Bytes,
    records: u32,
    value_bytes: u64,
    attempts: u32,
}

impl QueuedBatch for Batch {
    fn partition(&self) -> i32 {
        self.partition
    }

    fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// One producer thread's figures.
struct WorkerStats {
    hist: ModeHistograms,
    measured_records: u64,
    measured_bytes: u64,
    measured_transactions: u64,
    measured_batches: u64,
    records_total: u64,
    transactions_total: u64,
    requests: u64,
    retries: u64,
    error_codes: BTreeMap<i16, u64>,
    /// Transactions committed per partition (= commit markers expected).
    committed_per_partition: Vec<u64>,
    last_done: Option<Instant>,
}

impl WorkerStats {
    fn new(partitions: usize) -> WorkerStats {
        WorkerStats {
            hist: ModeHistograms::new(),
            measured_records: 0,
            measured_bytes: 0,
            measured_transactions: 0,
            measured_batches: 0,
            records_total: 0,
            transactions_total: 0,
            requests: 0,
            retries: 0,
            error_codes: BTreeMap::new(),
            committed_per_partition: vec![0; partitions],
            last_done: None,
        }
    }

    fn count_error(&mut self, code: i16) {
        *self.error_codes.entry(code).or_default() += 1;
    }
}

struct WorkerCfg {
    mode: Mode,
    stream: u32,
    bootstrap: String,
    topic: String,
    cluster: Cluster,
    workload: Workload,
    transactional_id: Option<String>,
    transaction_timeout_ms: i32,
    txn_retry_backoff_ms: u64,
    records_max: Option<u64>,
    live: Arc<TxnLive>,
    seed: u64,
}

struct Worker {
    cfg: WorkerCfg,
    produce_version: i16,
    leaders: Vec<Leader<Batch>>,
    leader_of: Vec<usize>,
    partitions: usize,
    session: Option<TxnSession>,
    producer_id: i64,
    epoch: i16,
    seqs: Sequences,
    topic_name: TopicName,
    rng: Rng,
    filler: Vec<u8>,
    next_record: u64,
    cursor: usize,
    unacked: usize,
    /// Records and value bytes of the open transaction acknowledged so far.
    txn_records: u64,
    txn_bytes: u64,
    stats: WorkerStats,
    clock: Option<RunClock>,
    last_live_merge: Instant,
    live_commit: Histogram<u64>,
}

impl Worker {
    fn init(cfg: WorkerCfg) -> anyhow::Result<Worker> {
        let client_id = format!("tidelog-bench-{}-{}", cfg.mode.label(), cfg.stream & 0xff);
        let (leaders, leader_of) = connect_leaders(&cfg.cluster, &cfg.topic, &client_id)?;
        let partitions = leader_of.len();
        let produce_version = leaders[0].conn.versions.get(ApiKey::Produce)?;
        let (session, producer_id, epoch) = match &cfg.transactional_id {
            Some(id) => {
                let mut s = TxnSession::init(&cfg.bootstrap, id, cfg.transaction_timeout_ms, &client_id)?;
                s.retry_backoff = Duration::from_millis(cfg.txn_retry_backoff_ms);
                let (pid, epoch) = (s.producer_id, s.epoch);
                (Some(s), pid, epoch)
            }
            None => {
                let (pid, epoch) = init_idempotent(&cfg.bootstrap, cfg.transaction_timeout_ms, &client_id)?;
                (None, pid, epoch)
            }
        };
        anyhow::ensure!(
            producer_id >= 0 && epoch >= 0,
            "InitProducerId answered producer id {producer_id} epoch {epoch}"
        );
        let mut rng = Rng::new(cfg.seed ^ u64::from(cfg.stream));
        let filler = payload_filler(cfg.workload.producer.size_dist(), &mut rng);
        Ok(Worker {
            topic_name: TopicName(StrBytes::from_string(cfg.topic.clone())),
            cursor: (cfg.stream & 0xff) as usize % partitions.max(1),
            stats: WorkerStats::new(partitions),
            cfg,
            produce_version,
            leaders,
            leader_of,
            partitions,
            session,
            producer_id,
            epoch,
            seqs: Sequences::new(partitions),
            rng,
            filler,
            next_record: 0,
            unacked: 0,
            txn_records: 0,
            txn_bytes: 0,
            clock: None,
            last_live_merge: Instant::now(),
            live_commit: new_latency_histogram(),
        })
    }

    fn clock(&self) -> anyhow::Result<RunClock> {
        self.clock.ok_or_else(|| anyhow!("run clock not set"))
    }

    fn stopping(&self, now: Instant) -> anyhow::Result<bool> {
        if self.cfg.live.stop.load(Ordering::Relaxed) {
            return Ok(true);
        }
        Ok(match self.cfg.records_max {
            Some(max) => self.next_record >= max,
            None => now >= self.clock()?.end,
        })
    }

    /// Builds one full batch (batch.size) for `partition` and queues it.
    fn queue_batch(&mut self, partition: usize) -> anyhow::Result<()> {
        let batch_max = self.cfg.workload.producer.batch_size_bytes;
        let ts_us = wall_now_us();
        let ts_ms = (ts_us / 1000) as i64;
        let mut b = BatchBuilder::new(ts_ms, batch_max);
        let mut value_bytes = 0u64;
        loop {
            let len = self.cfg.workload.producer.size_dist().draw(&mut self.rng);
            if b.count() > 0 && b.size_bytes() + b.record_size_bytes(ts_ms, None, len) > batch_max {
                break;
            }
            let header = payload_header(ts_us, self.cfg.stream, self.next_record);
            b.append(ts_ms, None, &header, payload_tail(&self.filler, self.next_record, len));
            self.next_record += 1;
            value_bytes += len as u64;
        }
        let records = b.count();
        let base_sequence = self.seqs.take(partition, records);
        let stamp = ProducerStamp {
            producer_id: self.producer_id,
            producer_epoch: self.epoch,
            base_sequence,
            transactional: self.session.is_some(),
        };
        let bytes = b.finish_as(self.cfg.workload.producer.compression, stamp)?;
        self.leaders[self.leader_of[partition]].ready.push_back(Batch {
            partition: partition as i32,
            base_sequence,
            bytes,
            records: records as u32,
            value_bytes,
            attempts: 0,
        });
        self.unacked += 1;
        Ok(())
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let clock = self.clock()?;
        std::thread::sleep(clock.start.saturating_duration_since(Instant::now()));
        match self.cfg.mode {
            Mode::Idempotent => self.run_idempotent(),
            Mode::Transactional { batches } => self.run_transactions(batches as usize),
        }?;
        self.merge_live(true);
        Ok(())
    }

    fn run_idempotent(&mut self) -> anyhow::Result<()> {
        // Enough queued to keep every partition's pipeline full.
        let target = self.partitions.max(1) * self.cfg.workload.producer.max_in_flight.max(1);
        loop {
            let now = Instant::now();
            if self.stopping(now)? {
                break;
            }
            while self.unacked < target && !self.stopping(Instant::now())? {
                let p = self.cursor;
                self.cursor = (self.cursor + 1) % self.partitions;
                self.queue_batch(p)?;
            }
            self.send_ready()?;
            self.wait_and_read()?;
        }
        while self.unacked > 0 {
            self.send_ready()?;
            self.wait_and_read()?;
        }
        Ok(())
    }

    fn run_transactions(&mut self, batches: usize) -> anyhow::Result<()> {
        let timeout = Duration::from_millis(self.cfg.workload.producer.request_timeout_ms.max(1000) as u64);
        let clock = self.clock()?;
        while !self.stopping(Instant::now())? {
            let (per_batch, distinct, next) = plan_partitions(self.cursor, batches, self.partitions);
            self.cursor = next;
            let Some(session) = self.session.as_mut() else { bail!("transactional run without a session") };
            let t_add = Instant::now();
            session.add_partitions(&self.topic_name, &distinct, timeout, &mut self.stats)?;
            let add_us = t_add.elapsed().as_micros() as u64;
            for &p in &per_batch {
                self.queue_batch(p)?;
            }
            self.txn_records = 0;
            self.txn_bytes = 0;
            let t_first = Instant::now();
            while self.unacked > 0 {
                self.send_ready()?;
                self.wait_and_read()?;
            }
            let t_commit = Instant::now();
            let Some(session) = self.session.as_mut() else { bail!("transactional run without a session") };
            session.commit(timeout, &mut self.stats)?;
            let done = Instant::now();
            let s = &mut self.stats;
            s.transactions_total += 1;
            s.records_total += self.txn_records;
            for &p in &distinct {
                s.committed_per_partition[p] += 1;
            }
            if done >= clock.warmup_end {
                let commit_us = done.saturating_duration_since(t_commit).as_micros() as u64;
                record_us(&mut s.hist.commit, commit_us);
                record_us(&mut self.live_commit, commit_us);
                record_us(&mut s.hist.transaction, done.saturating_duration_since(t_first).as_micros() as u64);
                record_us(&mut s.hist.add_partitions, add_us);
                s.measured_transactions += 1;
                s.measured_batches += batches as u64;
                s.measured_records += self.txn_records;
                s.measured_bytes += self.txn_bytes;
                s.last_done = Some(done);
            }
            let live = &self.cfg.live;
            live.records.fetch_add(self.txn_records, Ordering::Relaxed);
            live.bytes.fetch_add(self.txn_bytes, Ordering::Relaxed);
            live.transactions.fetch_add(1, Ordering::Relaxed);
            self.merge_live(false);
        }
        Ok(())
    }

    fn merge_live(&mut self, force: bool) {
        if force || self.last_live_merge.elapsed() >= Duration::from_millis(500) {
            if let Ok(mut h) = self.cfg.live.commit.lock() {
                let _ = h.add(&self.live_commit);
            }
            self.live_commit.reset();
            self.last_live_merge = Instant::now();
        }
    }

    fn send_ready(&mut self) -> anyhow::Result<()> {
        let max_in_flight = self.cfg.workload.producer.max_in_flight.max(1);
        let transactional_id = self.session.as_ref().map(|s| TransactionalId(StrBytes::from_string(s.txn_id.clone())));
        for li in 0..self.leaders.len() {
            let leader = &mut self.leaders[li];
            // Queue order is sequence order per partition: keep it.
            while let Some(batches) = leader.next_request(Some(max_in_flight), true) {
                let req = produce_request(
                    &self.topic_name,
                    -1,
                    self.cfg.workload.producer.request_timeout_ms,
                    transactional_id.clone(),
                    &batches,
                );
                let cid = leader.conn.queue(ApiKey::Produce, self.produce_version, &req)?;
                leader.conn.flush()?;
                leader.in_flight.push_back(InFlight { correlation_id: cid, sent: Instant::now(), batches });
                self.stats.requests += 1;
            }
        }
        Ok(())
    }

    fn wait_and_read(&mut self) -> anyhow::Result<()> {
        // Wake for a backoff's end too.
        let now = Instant::now();
        let wait = self
            .leaders
            .iter()
            .filter_map(|l| l.backoff_until)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        for li in poll_leaders(&mut self.leaders, wait)? {
            self.handle_responses(li)?;
        }
        Ok(())
    }

    fn handle_responses(&mut self, li: usize) -> anyhow::Result<()> {
        while let Some((now, inflight, codes)) = self.leaders[li].next_produce_response(self.produce_version)? {
            for b in inflight.batches {
                let code = codes.get(b.partition);
                if code != 0 {
                    self.stats.count_error(code);
                    self.cfg.live.errors.fetch_add(1, Ordering::Relaxed);
                }
                if code == 0 || code == DUPLICATE_SEQUENCE_NUMBER {
                    self.acked(&b, inflight.sent, now)?;
                    continue;
                }
                let leader = &self.leaders[li];
                // After a retriable failure the batches behind it on the
                // same partition are refused as out of order: retry them too.
                let behind_a_retry = code == OUT_OF_ORDER_SEQUENCE_NUMBER
                    && leader.ready.iter().any(|r| r.partition == b.partition && r.base_sequence < b.base_sequence);
                if (is_retriable(code) || behind_a_retry) && b.attempts < self.cfg.workload.producer.retries {
                    self.stats.retries += 1;
                    let mut b = b;
                    b.attempts += 1;
                    let leader = &mut self.leaders[li];
                    let at = requeue_position(
                        leader.ready.iter().map(|r| (r.partition, r.base_sequence)),
                        b.partition,
                        b.base_sequence,
                    );
                    leader.ready.insert(at, b);
                    leader.backoff_until = Some(now + RETRY_BACKOFF);
                    continue;
                }
                bail!(
                    "Produce to {}-{} (producer id {}, epoch {}, base sequence {}{}, attempt {}) at {}: {}",
                    self.cfg.topic,
                    b.partition,
                    self.producer_id,
                    self.epoch,
                    b.base_sequence,
                    self.session.as_ref().map(|s| format!(", transactional id {:?}", s.txn_id)).unwrap_or_default(),
                    b.attempts + 1,
                    leader.conn.addr,
                    error_name(code)
                );
            }
        }
        Ok(())
    }

    fn acked(&mut self, b: &Batch, sent: Instant, now: Instant) -> anyhow::Result<()> {
        let clock = self.clock()?;
        self.unacked = self.unacked.saturating_sub(1);
        let s = &mut self.stats;
        if now >= clock.warmup_end {
            record_us(&mut s.hist.ack_batch, now.saturating_duration_since(sent).as_micros() as u64);
        }
        if self.session.is_some() {
            // Counted when the transaction commits.
            self.txn_records += u64::from(b.records);
            self.txn_bytes += b.value_bytes;
            return Ok(());
        }
        s.records_total += u64::from(b.records);
        if now >= clock.warmup_end {
            s.measured_records += u64::from(b.records);
            s.measured_bytes += b.value_bytes;
            s.measured_batches += 1;
            s.last_done = Some(now);
        }
        self.cfg.live.records.fetch_add(u64::from(b.records), Ordering::Relaxed);
        self.cfg.live.bytes.fetch_add(b.value_bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// What one finished worker reports.
struct WorkerDone {
    stream: u32,
    transactional_id: Option<String>,
    coordinator: Option<String>,
    stats: WorkerStats,
}

/// The stream id (the "producer index" in each value) of worker `w` of
/// run `run`.
fn stream_id(run: usize, w: usize) -> u32 {
    STREAM_TAG | ((run as u32 & 0xff) << 8) | (w as u32 & 0xff)
}

fn run_mode(
    opts: &TxnOptions,
    topic: &str,
    cluster: &Cluster,
    mode: Mode,
    run_index: usize,
    id_stamp: &str,
) -> anyhow::Result<(ModeResult, ModeHistograms, Vec<WorkerDone>)> {
    let w = &opts.workload;
    let n = w.producer.count.max(1);
    let live = Arc::new(TxnLive::new());
    let barrier = Arc::new(Barrier::new(n + 1));
    let clock_cell: Arc<OnceLock<RunClock>> = Arc::new(OnceLock::new());
    let records_max = (w.run.records > 0).then(|| w.run.records.div_ceil(n as u64));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = WorkerCfg {
            mode,
            stream: stream_id(run_index, i),
            bootstrap: opts.bootstrap.clone(),
            topic: topic.to_string(),
            cluster: cluster.clone(),
            workload: w.clone(),
            transactional_id: match mode {
                Mode::Idempotent => None,
                Mode::Transactional { batches } => Some(format!("{id_stamp}-{batches}-{i}")),
            },
            transaction_timeout_ms: opts.transaction_timeout_ms,
            txn_retry_backoff_ms: opts.txn_retry_backoff_ms,
            records_max,
            live: live.clone(),
            seed: opts.seed.wrapping_add(run_index as u64 * 1000 + i as u64),
        };
        let (barrier, clock_cell, live) = (barrier.clone(), clock_cell.clone(), live.clone());
        let handle = std::thread::Builder::new().name(format!("txn-{}-{i}", mode.label())).spawn(
            move || -> anyhow::Result<WorkerDone> {
                let stream = cfg.stream;
                let transactional_id = cfg.transactional_id.clone();
                let worker = Worker::init(cfg);
                if worker.is_err() {
                    live.stop.store(true, Ordering::Relaxed);
                }
                barrier.wait(); // every worker has its producer id
                barrier.wait(); // the clock is set
                let mut worker = worker?;
                worker.clock = clock_cell.get().copied();
                if let Err(e) = worker.run() {
                    live.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                let coordinator = worker.session.as_ref().map(|s| s.coord.addr.clone());
                Ok(WorkerDone { stream, transactional_id, coordinator, stats: worker.stats })
            },
        )?;
        handles.push(handle);
    }
    barrier.wait();
    let start = Instant::now() + Duration::from_millis(50);
    let warmup_end = start + Duration::from_secs_f64(w.run.warmup_s);
    let end = if w.run.records > 0 {
        start + Duration::from_secs(365 * 86_400)
    } else {
        warmup_end + Duration::from_secs_f64(w.run.duration_s)
    };
    let wall_start_us = wall_now_us() + 50_000;
    let clock = RunClock { start, wall_start_us, warmup_end, end, drain_timeout_s: w.run.drain_timeout_s };
    let _ = clock_cell.set(clock);
    barrier.wait();
    let mut progress = TxnProgress::new(opts.progress, mode, clock, w.run.records, live.clone());
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        progress.tick();
    }
    progress.finish();
    let mut done = Vec::with_capacity(n);
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(d)) => done.push(d),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow!("a producer thread panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.context(format!("{} run", mode.label())));
    }
    let result = summarize_mode(mode, w, clock, &done);
    let mut hist = ModeHistograms::new();
    for d in &done {
        hist.merge(&d.stats.hist);
    }
    let mut result = result;
    result.latency_us = TxnLatencies {
        commit: Percentiles::of(&hist.commit),
        transaction: Percentiles::of(&hist.transaction),
        add_partitions: Percentiles::of(&hist.add_partitions),
        produce_ack_batch: Percentiles::of(&hist.ack_batch),
    };
    Ok((result, hist, done))
}

fn summarize_mode(mode: Mode, w: &Workload, clock: RunClock, done: &[WorkerDone]) -> ModeResult {
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| done.iter().map(|d| f(&d.stats)).sum::<u64>();
    let last = done.iter().filter_map(|d| d.stats.last_done).max();
    let window_s = last.map(|l| l.saturating_duration_since(clock.warmup_end).as_secs_f64()).unwrap_or(0.0);
    let (records, bytes) = (sum(&|s| s.measured_records), sum(&|s| s.measured_bytes));
    let mut error_codes = BTreeMap::new();
    for d in done {
        for (c, n) in &d.stats.error_codes {
            *error_codes.entry(error_name(*c)).or_default() += n;
        }
    }
    let mut notes = Vec::new();
    let records_total = sum(&|s| s.records_total);
    if records == 0 && records_total > 0 {
        notes.push(format!(
            "NOTHING MEASURED: all {records_total} records of the {} run were done within the {} s warm-up. \
             Rerun with --warmup-s 0 or more --records.",
            mode.label(),
            w.run.warmup_s
        ));
    }
    ModeResult {
        label: mode.label(),
        transactional: mode != Mode::Idempotent,
        batches_per_transaction: match mode {
            Mode::Idempotent => 0,
            Mode::Transactional { batches } => batches,
        },
        transactional_ids: done.iter().filter_map(|d| d.transactional_id.clone()).collect(),
        coordinators: done.iter().filter_map(|d| d.coordinator.clone()).collect(),
        throughput: Throughput {
            records,
            bytes,
            window_s,
            records_per_s: if window_s > 0.0 { records as f64 / window_s } else { 0.0 },
            mb_per_s: if window_s > 0.0 { bytes as f64 / 1e6 / window_s } else { 0.0 },
        },
        transactions: sum(&|s| s.measured_transactions),
        batches: sum(&|s| s.measured_batches),
        records_total,
        transactions_total: sum(&|s| s.transactions_total),
        latency_us: TxnLatencies::default(),
        requests: sum(&|s| s.requests),
        retries: sum(&|s| s.retries),
        error_codes,
        ratios: BTreeMap::new(),
        notes,
    }
}

/// What verification expects of one producer's stream.
struct Expect {
    records: u64,
    transactional: bool,
}

/// Runs the idempotent run and one run per transaction size, then verifies
/// when asked.
pub fn run_comparison(opts: &TxnOptions) -> anyhow::Result<TxnOutcome> {
    let w = &opts.workload;
    w.validate()?;
    anyhow::ensure!(
        w.producer.acks == -1,
        "--transactions needs acks=all (idempotent and transactional producers require it); got acks {}",
        w.producer.acks
    );
    anyhow::ensure!(w.producer.count > 0, "--transactions needs at least one producer (--producers)");
    anyhow::ensure!(w.producer.count <= 255, "--transactions runs at most 255 producers");
    anyhow::ensure!(!w.is_paced(), "--transactions runs unpaced: drop --rate-records / --rate-mb");
    anyhow::ensure!(opts.sizes.len() < 255, "too many transaction sizes");
    let topic = w.topic_name();
    let (cluster, versions) =
        ensure_topic(&opts.bootstrap, &topic, w.topic.partitions, w.topic.replication_factor, w.topic.create)?;
    // Fail before the idempotent run rather than after it.
    if !opts.sizes.is_empty() {
        require_transaction_apis(&versions)?;
        let probe = format!("{}-{}-0", opts.transactional_id_prefix, opts.sizes[0]);
        find_coordinator(&opts.bootstrap, &probe, "tidelog-bench-txn-probe")?;
    }
    let start_offsets = if opts.verify { Some(list_offsets(&cluster, &topic, -1)?) } else { None };
    let modes: Vec<Mode> = std::iter::once(Mode::Idempotent)
        .chain(opts.sizes.iter().map(|&batches| Mode::Transactional { batches }))
        .collect();
    let mut runs = Vec::new();
    let mut expect: HashMap<u32, Expect> = HashMap::new();
    let mut markers_expected = vec![0u64; cluster.partitions.len()];
    for (i, &mode) in modes.iter().enumerate() {
        if opts.progress {
            eprintln!("-- {} ({}/{})", describe(mode, w), i + 1, modes.len());
        }
        let (result, hist, done) = run_mode(opts, &topic, &cluster, mode, i, &opts.transactional_id_prefix)?;
        for d in &done {
            expect.insert(d.stream, Expect { records: d.stats.records_total, transactional: mode != Mode::Idempotent });
            for (p, n) in d.stats.committed_per_partition.iter().enumerate() {
                if let Some(m) = markers_expected.get_mut(p) {
                    *m += n;
                }
            }
        }
        runs.push((result, hist));
    }
    let base_mb = runs.first().map(|r| r.0.throughput.mb_per_s).unwrap_or(0.0);
    for (r, _) in runs.iter_mut() {
        if base_mb > 0.0 {
            r.ratios.insert("mb_per_s_over_idempotent".into(), r.throughput.mb_per_s / base_mb);
        }
    }
    let verify = match start_offsets {
        Some(start) => {
            if opts.progress {
                eprintln!("-- verifying: reading everything back with read_committed");
            }
            Some(verify(&cluster, &topic, &start, &expect, &markers_expected)?)
        }
        None => None,
    };
    Ok(TxnOutcome { topic, cluster, versions, runs, verify })
}

fn describe(mode: Mode, w: &Workload) -> String {
    let how = if w.run.records > 0 {
        format!("{} records", w.run.records)
    } else {
        format!("{} s after {} s warm-up", w.run.duration_s, w.run.warmup_s)
    };
    match mode {
        Mode::Idempotent => format!("idempotent producer, no transactions, {how}"),
        Mode::Transactional { batches } => format!("transactions of {batches} batches, {how}"),
    }
}

/// Reads [start, high watermark) of every partition with read_committed and
/// counts each stream's records.
fn verify(
    cluster: &Cluster,
    topic: &str,
    start: &[i64],
    expect: &HashMap<u32, Expect>,
    markers_expected: &[u64],
) -> anyhow::Result<TxnVerify> {
    let end = list_offsets(cluster, topic, -1)?;
    let mut v = TxnVerify {
        records_expected: expect.values().map(|e| e.records).sum(),
        commit_markers_expected: markers_expected.iter().sum(),
        ..TxnVerify::default()
    };
    // Times each (stream, sequence) was read, capped at 255.
    let mut seen: HashMap<u32, Vec<u8>> = expect.iter().map(|(s, e)| (*s, vec![0u8; e.records as usize])).collect();
    let topic_name = TopicName(StrBytes::from_string(topic.to_string()));
    for p in &cluster.partitions {
        let idx = p.index as usize;
        let (Some(&from), Some(&to)) = (start.get(idx), end.get(idx)) else { continue };
        let mut conn = Conn::connect(cluster.broker_addr(p.leader)?, "tidelog-bench-txn-verify")?;
        conn.versions.get(ApiKey::Fetch)?; // v4+ (the client's minimum) has isolation_level
        let mut next = from;
        let mut last_progress = Instant::now();
        let mut markers = (0u64, 0u64);
        let want = markers_expected.get(idx).copied().unwrap_or(0);
        // EndTxn is answered once the commit is decided; a broker may append
        // the markers after that (Kafka does), so read on past `to` until
        // they are all there or nothing comes for VERIFY_STALL.
        while next < to || markers.0 < want {
            let req = FetchRequest::default()
                .with_max_wait_ms(200)
                .with_min_bytes(1)
                .with_max_bytes(16 << 20)
                .with_isolation_level(1)
                .with_topics(vec![FetchTopic::default().with_topic(topic_name.clone()).with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(p.index)
                        .with_fetch_offset(next)
                        .with_partition_max_bytes(8 << 20),
                ])]);
            let resp: FetchResponse = conn.call(ApiKey::Fetch, &req)?;
            anyhow::ensure!(resp.error_code == 0, "Fetch {topic}-{}: {}", p.index, error_name(resp.error_code));
            let mut lso = -1;
            let mut advanced = false;
            for part in resp.responses.iter().flat_map(|t| t.partitions.iter()) {
                anyhow::ensure!(
                    part.error_code == 0,
                    "Fetch (read_committed) {topic}-{} at {next}: {}",
                    p.index,
                    error_name(part.error_code)
                );
                lso = part.last_stable_offset;
                if let Some(aborted) = &part.aborted_transactions {
                    v.aborted_transactions_listed += aborted.len() as u64;
                    for a in aborted {
                        v.problem(format!(
                            "{topic}-{}: the broker lists an aborted transaction of producer {} from offset {}, \
                             but every transaction was committed",
                            p.index, a.producer_id.0, a.first_offset
                        ));
                    }
                }
                let Some(records) = &part.records else { continue };
                let after = walk_batches(records, |batch| match batch {
                    BatchItem::Marker { commit } => {
                        if commit {
                            markers.0 += 1;
                        } else {
                            markers.1 += 1;
                        }
                    }
                    BatchItem::Record { offset, transactional, value } => {
                        if offset < next || offset >= to {
                            return;
                        }
                        check_value(&mut v, &mut seen, expect, topic, p.index, offset, transactional, value);
                    }
                })
                .with_context(|| format!("{topic}-{} at offset {next}", p.index))?;
                if let Some(a) = after.filter(|&a| a > next) {
                    next = a;
                    advanced = true;
                }
            }
            if advanced {
                last_progress = Instant::now();
            } else if last_progress.elapsed() > VERIFY_STALL && next >= to {
                break; // the marker count below says what is missing
            } else if last_progress.elapsed() > VERIFY_STALL {
                v.problem(format!(
                    "{topic}-{}: read_committed stopped at offset {next}, below the high watermark {to} \
                     (last stable offset {lso}): a transaction left open, or markers not written?",
                    p.index
                ));
                break;
            }
        }
        v.commit_markers_read += markers.0;
        v.abort_markers_read += markers.1;
        if markers.0 != want {
            v.problem(format!(
                "{topic}-{}: {} commit markers read, {want} expected (one per committed transaction that wrote the partition)",
                p.index, markers.0
            ));
        }
        if markers.1 > 0 {
            v.problem(format!("{topic}-{}: {} abort markers, but nothing was aborted", p.index, markers.1));
        }
    }
    for (stream, counts) in &seen {
        let mut missing = 0u64;
        let mut first_missing = None;
        for (seq, &c) in counts.iter().enumerate() {
            match c {
                0 => {
                    missing += 1;
                    first_missing.get_or_insert(seq);
                }
                1 => {}
                n => v.duplicates += u64::from(n) - 1,
            }
        }
        v.missing += missing;
        if let Some(seq) = first_missing {
            v.problem(format!("stream {stream:#x}: {missing} committed records never read, the first is #{seq}"));
        }
    }
    if v.duplicates > 0 {
        v.problem(format!("{} records read more than once", v.duplicates));
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn check_value(
    v: &mut TxnVerify,
    seen: &mut HashMap<u32, Vec<u8>>,
    expect: &HashMap<u32, Expect>,
    topic: &str,
    partition: i32,
    offset: i64,
    transactional: bool,
    value: &[u8],
) {
    if value.len() < PAYLOAD_HEADER_BYTES {
        v.foreign_records += 1;
        return;
    }
    let stream = u32::from_be_bytes([value[8], value[9], value[10], value[11]]);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&value[12..20]);
    let seq = u64::from_be_bytes(seq_bytes);
    let (Some(e), Some(counts)) = (expect.get(&stream), seen.get_mut(&stream)) else {
        v.foreign_records += 1;
        return;
    };
    v.records_read += 1;
    if e.transactional != transactional {
        v.wrong_transactional_bit += 1;
        if v.wrong_transactional_bit == 1 {
            v.problem(format!(
                "{topic}-{partition} offset {offset}: record of stream {stream:#x} in a batch with the transactional bit {}",
                if transactional { "set" } else { "clear" }
            ));
        }
    }
    match counts.get_mut(seq as usize) {
        Some(c) => *c = c.saturating_add(1),
        None => {
            v.unexpected += 1;
            if v.unexpected == 1 {
                v.problem(format!(
                    "{topic}-{partition} offset {offset}: record #{seq} of stream {stream:#x}, which reported only {} records done",
                    e.records
                ));
            }
        }
    }
}

enum BatchItem<'a> {
    Marker { commit: bool },
    Record { offset: i64, transactional: bool, value: &'a [u8] },
}

/// Walks the complete batches of a fetched record set: control batches as
/// markers (their record key: version i16, type i16; 0 = abort, 1 =
/// commit), data batches record by record. Returns the offset after the
/// last complete batch.
fn walk_batches(set: &[u8], mut f: impl FnMut(BatchItem<'_>)) -> anyhow::Result<Option<i64>> {
    for_each_fetched_batch(set, true, |h, body| {
        let records = batch_records(h, body)?;
        let transactional = h.is_transactional();
        if h.is_control() {
            let mut commit = None;
            for_each_record(&records, h.record_count(), h.base_offset().0, h.base_timestamp_ms(), |r| {
                if let Some(k) = r.key.filter(|k| k.len() >= 4) {
                    commit = Some(i16::from_be_bytes([k[2], k[3]]) == 1);
                }
            })?;
            f(BatchItem::Marker { commit: commit.ok_or_else(|| anyhow!("control batch without a marker key"))? });
        } else {
            for_each_record(&records, h.record_count(), h.base_offset().0, h.base_timestamp_ms(), |r| {
                f(BatchItem::Record { offset: r.offset, transactional, value: r.value.unwrap_or(&[]) })
            })?;
        }
        Ok(())
    })
}

/// The live progress line on stderr, once a second.
struct TxnProgress {
    enabled: bool,
    mode: Mode,
    clock: RunClock,
    records_target: u64,
    live: Arc<TxnLive>,
    last: Instant,
    last_counts: (u64, u64, u64),
    printed: bool,
}

impl TxnProgress {
    fn new(enabled: bool, mode: Mode, clock: RunClock, records_target: u64, live: Arc<TxnLive>) -> TxnProgress {
        TxnProgress {
            enabled,
            mode,
            clock,
            records_target,
            live,
            last: Instant::now(),
            last_counts: (0, 0, 0),
            printed: false,
        }
    }

    fn tick(&mut self) {
        let dt = self.last.elapsed().as_secs_f64();
        if !self.enabled || dt < 1.0 {
            return;
        }
        let l = &self.live;
        let c = (
            l.records.load(Ordering::Relaxed),
            l.bytes.load(Ordering::Relaxed),
            l.transactions.load(Ordering::Relaxed),
        );
        let now = Instant::now();
        let rate = (c.0 - self.last_counts.0) as f64 / dt;
        let left = if self.records_target > 0 {
            if rate > 0.0 {
                format!("~{:.0}s", self.records_target.saturating_sub(c.0) as f64 / rate)
            } else {
                "?".into()
            }
        } else {
            format!("{:.0}s", self.clock.end.saturating_duration_since(now).as_secs_f64())
        };
        let warm = if now < self.clock.warmup_end { " (warm-up)" } else { "" };
        let p99 = l.commit.lock().map(|h| if h.is_empty() { 0 } else { h.value_at_quantile(0.99) }).unwrap_or(0);
        let txn = if self.mode == Mode::Idempotent {
            String::new()
        } else {
            format!(
                " | {:>6.0} txn/s | p99 commit {:>7.2} ms",
                (c.2 - self.last_counts.2) as f64 / dt,
                p99 as f64 / 1000.0
            )
        };
        let line = format!(
            "[{}{warm}] {:>9.0} rec/s {:>8.1} MB/s{txn} | errors {} | left {left}",
            self.mode.label(),
            rate,
            (c.1 - self.last_counts.1) as f64 / dt / 1e6,
            l.errors.load(Ordering::Relaxed),
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line:<120}");
        let _ = err.flush();
        self.printed = true;
        self.last = now;
        self.last_counts = c;
    }

    fn finish(&self) {
        if self.printed {
            eprintln!();
        }
    }
}

pub struct TxnSummaryInputs {
    pub name: String,
    pub started_at_unix_s: u64,
    pub workload: Workload,
    pub bootstrap: String,
    pub broker_label: String,
    pub broker_version: String,
    pub host: HostInfo,
    pub baseline: Option<Baseline>,
    pub hiccups: Option<Hiccups>,
    pub transaction_timeout_ms: i32,
    pub txn_retry_backoff_ms: u64,
}

pub fn build_summary(inp: TxnSummaryInputs, o: &TxnOutcome) -> TxnSummary {
    let name_of = |k: i16| ApiKey::try_from(k).map(|k| format!("{k:?}")).unwrap_or_else(|_| format!("api-{k}"));
    let broker = BrokerInfo {
        bootstrap: inp.bootstrap,
        label: inp.broker_label,
        version: inp.broker_version,
        cluster_id: o.cluster.cluster_id.clone(),
        brokers: o.cluster.brokers.len(),
        api_versions: o.versions.broker.iter().map(|(k, v)| (name_of(*k), [v.0, v.1])).collect(),
        negotiated: o.versions.chosen.iter().map(|(k, v)| (name_of(*k), *v)).collect(),
    };
    let mut runs: Vec<ModeResult> = o.runs.iter().map(|r| r.0.clone()).collect();
    if let Some(b) = &inp.baseline {
        for r in runs.iter_mut().filter(|r| r.throughput.records > 0 && b.loopback_mb_per_s > 0.0) {
            r.ratios.insert("mb_per_s_over_loopback".into(), r.throughput.mb_per_s / b.loopback_mb_per_s);
        }
    }
    let notes = runs.iter().flat_map(|r| r.notes.iter().cloned()).collect();
    TxnSummary {
        schema: TXN_SUMMARY_SCHEMA.into(),
        name: inp.name,
        started_at_unix_s: inp.started_at_unix_s,
        command_line: std::env::args().collect(),
        workload: inp.workload,
        topic: o.topic.clone(),
        broker,
        host: inp.host,
        baseline: inp.baseline,
        transaction_timeout_ms: inp.transaction_timeout_ms,
        txn_retry_backoff_ms: inp.txn_retry_backoff_ms,
        runs,
        verify: o.verify.clone(),
        hiccups: inp.hiccups,
        notes,
        files: Vec::new(),
    }
}

fn fmt_ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

fn latency_row(out: &mut String, name: &str, p: &Percentiles) {
    if p.count == 0 {
        let _ = writeln!(out, "{name:<34} {:>9}", "-");
        return;
    }
    let _ = writeln!(
        out,
        "{name:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        fmt_ms(p.p50),
        fmt_ms(p.p90),
        fmt_ms(p.p99),
        fmt_ms(p.p999),
        fmt_ms(p.max),
        fmt_ms(p.mean),
        p.count
    );
}

/// The terminal table.
pub fn render_table(s: &TxnSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== tidelog-bench transactions: {} against {} ({}) ==",
        s.name, s.broker.bootstrap, s.broker.label
    );
    let _ = writeln!(
        out,
        "host: {} | {} cores | kernel {} | data dir {} ({})",
        s.host.cpu_model, s.host.cores, s.host.kernel, s.host.data_dir, s.host.filesystem
    );
    let v = |k: &str| s.broker.negotiated.get(k).map(|v| format!("v{v}")).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "broker version: {} | {} brokers | negotiated Produce {} FindCoordinator {} InitProducerId {} AddPartitionsToTxn {} EndTxn {} Fetch {}",
        s.broker.version,
        s.broker.brokers,
        v("Produce"),
        v("FindCoordinator"),
        v("InitProducerId"),
        v("AddPartitionsToTxn"),
        v("EndTxn"),
        v("Fetch")
    );
    let w = &s.workload;
    let per_run = if w.run.records > 0 {
        format!("{} records per run (whole transactions)", w.run.records)
    } else {
        format!("{} s per run after {} s warm-up", w.run.duration_s, w.run.warmup_s)
    };
    let _ = writeln!(
        out,
        "workload: topic {}, {} partitions, {} producers, record {} B, batch {} B, {:?}, in-flight {}, acks all, transaction timeout {} ms, coordinator retry backoff {} ms, {per_run}",
        s.topic,
        w.topic.partitions,
        w.producer.count,
        w.producer.mean_record_bytes(),
        w.producer.batch_size_bytes,
        w.producer.compression,
        w.producer.max_in_flight,
        s.transaction_timeout_ms,
        s.txn_retry_backoff_ms
    );
    for n in &s.notes {
        let _ = writeln!(out, "\n*** {n}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<12} {:>12} {:>10} {:>9} {:>11} {:>8} {:>9} {:>13} {:>11}",
        "throughput", "records/s", "MB/s", "window s", "records", "txns", "txn/s", "/ idempotent", "/ loopback"
    );
    for r in &s.runs {
        let ratio = |k: &str| r.ratios.get(k).map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        let t = &r.throughput;
        let txn_rate = if r.transactional && t.window_s > 0.0 {
            format!("{:.1}", r.transactions as f64 / t.window_s)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<12} {:>12.0} {:>10.2} {:>9.1} {:>11} {:>8} {:>9} {:>13} {:>11}",
            r.label,
            t.records_per_s,
            t.mb_per_s,
            t.window_s,
            t.records,
            if r.transactional { r.transactions.to_string() } else { "-".into() },
            txn_rate,
            ratio("mb_per_s_over_idempotent"),
            ratio("mb_per_s_over_loopback")
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "mean", "count"
    );
    for r in &s.runs {
        let l = &r.latency_us;
        if r.transactional {
            latency_row(&mut out, &format!("{} commit (EndTxn)", r.label), &l.commit);
            latency_row(&mut out, &format!("{} transaction", r.label), &l.transaction);
            latency_row(&mut out, &format!("{} AddPartitionsToTxn", r.label), &l.add_partitions);
        }
        latency_row(&mut out, &format!("{} produce ack (batch)", r.label), &l.produce_ack_batch);
    }
    if let Some(h) = &s.hiccups {
        let started_ms = s.started_at_unix_s * 1000;
        render_hiccups(&mut out, h, started_ms);
    }
    let _ = writeln!(out);
    for r in &s.runs {
        let _ = writeln!(
            out,
            "{}: requests {} | retries {} | error codes {:?}{}",
            r.label,
            r.requests,
            r.retries,
            r.error_codes,
            if r.coordinators.is_empty() {
                String::new()
            } else {
                let mut c = r.coordinators.clone();
                c.dedup();
                format!(" | coordinator {}", c.join(", "))
            }
        );
    }
    match &s.verify {
        Some(v) => {
            let _ = writeln!(
                out,
                "verify (read_committed): {} of {} records read | {} missing | {} duplicates | {} unexpected | commit markers {} of {} | abort markers {} | aborted transactions listed {} | wrong transactional bit {} | other writers' records {} | {}",
                v.records_read,
                v.records_expected,
                v.missing,
                v.duplicates,
                v.unexpected,
                v.commit_markers_read,
                v.commit_markers_expected,
                v.abort_markers_read,
                v.aborted_transactions_listed,
                v.wrong_transactional_bit,
                v.foreign_records,
                if v.problems == 0 { "OK".to_string() } else { format!("{} PROBLEMS", v.problems) }
            );
            for p in &v.first_problems {
                let _ = writeln!(out, "  problem: {p}");
            }
        }
        None => {
            let _ = writeln!(out, "verify: off (--verify reads every record back with read_committed)");
        }
    }
    match &s.baseline {
        Some(b) => {
            let _ = writeln!(out, "{}", render_baseline(b));
        }
        None => {
            let _ = writeln!(out, "baseline: none (ratios need --baseline FILE or --baseline-dir)");
        }
    }
    out
}

/// Writes txn-summary.json, report.txt, the .hgrm files and latency.svg.
pub fn write_run_dir(dir: &Path, summary: &mut TxnSummary, o: &TxnOutcome) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let mut series = Vec::new();
    for (i, (r, hist)) in o.runs.iter().enumerate() {
        for (stem, title, h) in hist.series() {
            if !r.transactional && stem != "produce-ack-batch" {
                continue;
            }
            let path = dir.join(format!("{}-{stem}.hgrm", r.label));
            std::fs::write(&path, hgrm(h))?;
            files.push(path);
            // The chart: each run's commit latency, the idempotent run's acks.
            let charted = if r.transactional { stem == "commit" } else { stem == "produce-ack-batch" };
            if charted && !h.is_empty() {
                series.push(Series {
                    name: format!("{} {title}", r.label),
                    color: PALETTE[i % PALETTE.len()].into(),
                    dashed: !r.transactional,
                    points: hgrm_points(h),
                });
            }
        }
    }
    let lat = dir.join("latency.svg");
    std::fs::write(
        &lat,
        latency_by_percentile(
            &format!("{}: commit latency by percentile (idempotent: batch ack)", summary.name),
            &series,
        ),
    )?;
    files.push(lat);
    let table = render_table(summary);
    finish_run_dir(dir, files, &table, TXN_SUMMARY_FILE, summary, |s| &mut s.files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_order_and_reject_nonsense() {
        assert_eq!(parse_sizes("1,10,100").unwrap(), vec![1, 10, 100]);
        assert_eq!(parse_sizes(" 5 , 2").unwrap(), vec![5, 2]);
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("1,1").is_err());
        assert!(parse_sizes("ten").is_err());
        assert!(parse_sizes("").is_err());
        assert!(parse_sizes(&(TXN_BATCHES_MAX + 1).to_string()).is_err());
    }

    #[test]
    fn sequences_count_per_partition_from_zero() {
        let mut s = Sequences::new(3);
        assert_eq!(s.take(0, 10), 0);
        assert_eq!(s.take(0, 5), 10);
        assert_eq!(s.take(2, 7), 0);
        assert_eq!(s.take(0, 1), 15);
        assert_eq!((s.next(0), s.next(1), s.next(2)), (16, 0, 7));
    }

    #[test]
    fn sequences_wrap_like_kafka() {
        assert_eq!(next_sequence(0, 1), 1);
        assert_eq!(next_sequence(i32::MAX - 5, 5), i32::MAX);
        // From i32::MAX - 4, six records take MAX-4 ..= MAX and 0: next is 1.
        assert_eq!(next_sequence(i32::MAX - 4, 6), 1);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        let mut s = Sequences::new(1);
        s.next[0] = i32::MAX - 1;
        assert_eq!(s.take(0, 3), i32::MAX - 1);
        assert_eq!(s.take(0, 2), 1);
    }

    #[test]
    fn retried_batches_go_back_in_sequence_order() {
        // Queue: p0 seq 20, p1 seq 0, p0 seq 30.
        let q = [(0, 20), (1, 0), (0, 30)];
        assert_eq!(requeue_position(q, 0, 10), 0, "before p0's later batches");
        assert_eq!(requeue_position(q, 0, 25), 2, "between p0 20 and 30");
        assert_eq!(requeue_position(q, 1, 5), 2, "after p1's last");
        assert_eq!(requeue_position(q, 2, 0), 0, "no batch of p2: front");
        assert_eq!(requeue_position([], 0, 0), 0);
        // Two failures of one response put back in order stay in order.
        let mut ready: Vec<(i32, i32)> = vec![(0, 40)];
        for b in [(0, 10), (0, 20)] {
            let at = requeue_position(ready.iter().copied(), b.0, b.1);
            ready.insert(at, b);
        }
        assert_eq!(ready, vec![(0, 10), (0, 20), (0, 40)]);
    }

    #[test]
    fn transaction_partitions_round_robin() {
        let (per, distinct, next) = plan_partitions(4, 3, 6);
        assert_eq!(per, vec![4, 5, 0]);
        assert_eq!(distinct, vec![0, 4, 5]);
        assert_eq!(next, 1);
        let (per, distinct, next) = plan_partitions(0, 10, 3);
        assert_eq!(per.len(), 10);
        assert_eq!(distinct, vec![0, 1, 2]);
        assert_eq!(next, 1);
        let (_, distinct, next) = plan_partitions(2, 1, 3);
        assert_eq!((distinct, next), (vec![2], 0));
    }

    #[test]
    fn stream_ids_are_tagged_and_distinct() {
        assert_ne!(stream_id(0, 0), 0);
        assert_ne!(stream_id(0, 1), stream_id(1, 0));
        assert_eq!(stream_id(2, 3) & 0xffff_0000, STREAM_TAG);
    }

    #[test]
    fn error_names() {
        assert_eq!(error_name(51), "CONCURRENT_TRANSACTIONS (51)");
        assert_eq!(error_name(15), "COORDINATOR_NOT_AVAILABLE (15)");
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION (3)");
        assert_eq!(error_name(9999), "error code 9999");
    }

    #[test]
    fn walk_reads_markers_and_the_transactional_bit() {
        use tidelog_protocol::batch::{build_batch, ProducerFields, RecordRef};
        let mut set = Vec::new();
        // A transactional data batch of two records...
        let mut b = BatchBuilder::new(0, 256);
        let mut value = [0u8; PAYLOAD_HEADER_BYTES];
        value[8..12].copy_from_slice(&stream_id(1, 0).to_be_bytes());
        b.append(0, None, &value, b"");
        value[19] = 1;
        b.append(0, None, &value, b"");
        let stamp = ProducerStamp { producer_id: 9, producer_epoch: 0, base_sequence: 0, transactional: true };
        set.extend_from_slice(&b.finish_as(crate::workload::Codec::None, stamp).unwrap());
        // ... then its commit marker at offset 2: a control batch.
        let key = [0u8, 0, 0, 1];
        let marker_value = [0u8, 0, 0, 0, 0, 0];
        let mut marker = build_batch(
            &[RecordRef { key: Some(&key), value: Some(&marker_value), headers: &[], timestamp_delta_ms: 0 }],
            0,
            ProducerFields { producer_id: 9, producer_epoch: 0, base_sequence: -1 },
        )
        .to_vec();
        marker[0..8].copy_from_slice(&2i64.to_be_bytes());
        // attributes: transactional | control; CRC covers them.
        marker[21..23].copy_from_slice(&0x30i16.to_be_bytes());
        let crc = crc32c::crc32c(&marker[21..]);
        marker[17..21].copy_from_slice(&crc.to_be_bytes());
        set.extend_from_slice(&marker);
        let mut items = Vec::new();
        let next = walk_batches(&set, |i| {
            items.push(match i {
                BatchItem::Marker { commit } => format!("marker commit={commit}"),
                BatchItem::Record { offset, transactional, value } => {
                    format!("record {offset} txn={transactional} seq={}", value[19])
                }
            })
        })
        .unwrap();
        assert_eq!(items, vec!["record 0 txn=true seq=0", "record 1 txn=true seq=1", "marker commit=true"]);
        assert_eq!(next, Some(3));
    }

    #[test]
    fn verify_counts_duplicates_missing_and_unexpected() {
        let stream = stream_id(1, 0);
        let expect: HashMap<u32, Expect> = [(stream, Expect { records: 3, transactional: true })].into();
        let mut seen: HashMap<u32, Vec<u8>> = [(stream, vec![0u8; 3])].into();
        let mut v = TxnVerify::default();
        let value = |seq: u64| {
            let mut b = [0u8; PAYLOAD_HEADER_BYTES];
            b[8..12].copy_from_slice(&stream.to_be_bytes());
            b[12..20].copy_from_slice(&seq.to_be_bytes());
            b
        };
        for (off, seq) in [(0, 0), (1, 1), (2, 1), (3, 7)] {
            check_value(&mut v, &mut seen, &expect, "t", 0, off, true, &value(seq));
        }
        check_value(&mut v, &mut seen, &expect, "t", 0, 4, false, b"short");
        assert_eq!((v.records_read, v.unexpected, v.foreign_records), (4, 1, 1));
        assert_eq!(seen[&stream], vec![1, 2, 0]);
        check_value(&mut v, &mut seen, &expect, "t", 0, 5, false, &value(2));
        assert_eq!(v.wrong_transactional_bit, 1);
        assert_eq!(v.problems, 2);
    }
}
