//! Produce: validate each partition's record set, append it on this shard,
//! answer per partition; acks=-1 waits for the high watermark.
//!
//! Produce v0–v2 (clients of Kafka 0.9/0.10) carry a magic 0/1 MessageSet:
//! `convert_legacy` turns it into one v2 batch first (`storage::legacy`),
//! so every later check and the log see v2 only; the answer goes out in
//! the old shape (`encode_response`).
//!
//! Transactions (KIP-98): a transactional batch must come from an idempotent
//! producer in a request that carries its transactional id; clients never
//! write control batches (markers come from the coordinator through
//! `PartitionLog::append_txn_marker`). The log notes where each
//! transaction starts as it appends; a producer with a transaction open on
//! the partition may only write transactional batches there. With
//! `transaction.partition.verification.enable` (KIP-890), a producer's
//! first transactional batch on a partition is held until the transaction
//! coordinator confirms the partition is in its open transaction (see
//! `verify_first_batches`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use tidelog_protocol::batch::{self, BatchError, BatchInfo};
use tidelog_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use tidelog_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use tidelog_protocol::{Epoch, ErrorCode, Offset};

use super::{encode, ready, str_bytes, Pending};
use crate::replication::Replication;
use crate::shard::Shard;
use crate::storage::log_dirs::DirState;
use crate::storage::partition::SharedLog;
use crate::storage::producer_state::{self, BatchMeta, Check};
use crate::storage::recompress::Target;

struct Waiting {
    topic: usize,
    partition: usize,
    log: SharedLog,
    last: Offset,
    /// The leader epoch the records were appended at.
    leader_epoch: i32,
}

fn error_for(e: &BatchError) -> ErrorCode {
    match e {
        BatchError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        BatchError::BadMagic(_) => ErrorCode::UnsupportedForMessageFormat,
        _ => ErrorCode::CorruptMessage,
    }
}

/// Where one partition's record set is.
enum RecordsAt {
    Absent,
    /// This range of the request frame.
    Frame(Range<usize>),
    /// Not inside the frame (never so for a decoded request; handled anyway).
    Elsewhere(Bytes),
}

struct PartitionInput {
    index: i32,
    records: RecordsAt,
}

struct TopicInput {
    name: String,
    partitions: Vec<PartitionInput>,
}

/// The request without its record bytes: each record set as a range of the
/// frame, so that the decoded request can be dropped and the frame is again
/// owned by this handler alone.
/// Returns the topics and the request's transactional id.
fn locate_records(req: ProduceRequest, frame: &Bytes) -> (Vec<TopicInput>, Option<String>) {
    let base = frame.as_ptr() as usize;
    let mut next = 0usize;
    let topics = req
        .topic_data
        .into_iter()
        .map(|t| TopicInput {
            name: t.name.0.to_string(),
            partitions: t
                .partition_data
                .into_iter()
                .map(|p| {
                    let records = match p.records {
                        None => RecordsAt::Absent,
                        Some(b) => {
                            let start = (b.as_ptr() as usize).wrapping_sub(base);
                            // In frame order, as a decoder leaves them: the
                            // frame is then cut front to back with no copy.
                            if start <= frame.len() && b.len() <= frame.len() - start && start >= next {
                                next = start + b.len();
                                RecordsAt::Frame(start..start + b.len())
                            } else {
                                RecordsAt::Elsewhere(b)
                            }
                        }
                    };
                    PartitionInput { index: p.index, records }
                })
                .collect(),
        })
        .collect();
    (topics, req.transactional_id.map(|t| t.0.to_string()))
}

/// Hands out the request's record sets as mutable pieces of the frame, front
/// to back. With the frame's only reference (the usual case) a piece is the
/// frame's own memory: offsets are assigned in place and the log keeps it,
/// so the bytes are copied once in user space, into the DMA buffers. If
/// something else still shares the frame, each piece is a copy.
struct FrameCutter {
    frame: Result<BytesMut, Bytes>,
    at: usize,
}

impl FrameCutter {
    fn new(frame: Bytes) -> FrameCutter {
        FrameCutter { frame: frame.try_into_mut(), at: 0 }
    }

    fn take(&mut self, records: RecordsAt) -> BytesMut {
        match (records, &mut self.frame) {
            (RecordsAt::Absent, _) => BytesMut::new(),
            (RecordsAt::Elsewhere(b), _) => BytesMut::from(&b[..]),
            (RecordsAt::Frame(range), Err(shared)) => BytesMut::from(&shared[range]),
            (RecordsAt::Frame(range), Ok(rest)) => {
                // `locate_records` only hands out ascending, disjoint ranges.
                let skip = range.start.saturating_sub(self.at).min(rest.len());
                rest.advance(skip);
                self.at = range.end;
                rest.split_to(range.len().min(rest.len()))
            }
        }
    }
}

/// The record rules of `topic` at `now_ms` (see `RecordRules`).
fn record_rules(
    shard: &Shard,
    image: &crate::metadata::MetadataImage,
    topic: &crate::metadata::TopicMeta,
    log_append_time: bool,
    now_ms: i64,
) -> RecordRules {
    let config = &shard.config;
    let timestamps = (!log_append_time).then(|| {
        let before = crate::topic_config::topic_i64(config, image, topic, "message.timestamp.before.max.ms");
        let after = crate::topic_config::topic_i64(config, image, topic, "message.timestamp.after.max.ms");
        // Kafka's "no limit" is i64::MAX: any past (or future) is fine.
        let earliest = if before >= now_ms { i64::MIN } else { now_ms - before };
        (earliest, now_ms.saturating_add(after))
    });
    RecordRules { require_keys: crate::topic_config::policy_has(config, image, topic, "compact"), timestamps }
}

/// Produce v0–v2 carry a legacy MessageSet (magic 0/1): it becomes one v2
/// batch here (`storage::legacy`), before any other check, so that
/// everything after (record rules, LogAppendTime, the append) sees v2 only.
/// A v2 batch in an old request is INVALID_RECORD, as Kafka answers.
fn convert_legacy(version: i16, records: &mut BytesMut, max_bytes: usize) -> Result<(), (ErrorCode, String)> {
    if version >= 3 || records.is_empty() {
        return Ok(());
    }
    if tidelog_protocol::legacy::magic_of(records).is_some_and(|m| m >= 2) {
        return Err((
            ErrorCode::InvalidRecord,
            format!("produce v{version} may only carry message format v0 or v1, not record batches v2"),
        ));
    }
    *records = crate::storage::legacy::message_set_to_v2(records, max_bytes)?;
    Ok(())
}

/// The checks of one partition's record set that need no shard state:
/// whole, CRC-valid v2 batches within `max_bytes`, none of them empty.
fn check_record_set(records: &[u8], max_bytes: usize) -> Result<Vec<BatchInfo>, (ErrorCode, String)> {
    let infos = batch::validate_record_set(records, max_bytes).map_err(|e| (error_for(&e), e.to_string()))?;
    if let Some(info) = infos.iter().find(|i| i.record_count == 0) {
        return Err((ErrorCode::CorruptMessage, format!("empty record batch of {} bytes", info.size_bytes)));
    }
    Ok(infos)
}

/// Kafka's transaction rules for a record set (LogValidator, KafkaApis):
/// clients never write control batches (INVALID_RECORD); a transactional
/// batch comes from an idempotent producer (INVALID_RECORD otherwise) in a
/// request that names a transactional id (else
/// TRANSACTIONAL_ID_AUTHORIZATION_FAILED, as Kafka answers). Returns whether
/// the record set is transactional. Reads one header per batch, allocates
/// nothing.
fn check_txn_rules(records: &[u8], infos: &[BatchInfo], has_txn_id: bool) -> Result<bool, (ErrorCode, String)> {
    let mut at = 0;
    let mut transactional = false;
    for info in infos {
        let Some(Ok(h)) = records.get(at..).map(batch::BatchHeader::parse) else { break };
        if h.is_control() {
            return Err((ErrorCode::InvalidRecord, "clients may not write control records".into()));
        }
        if h.is_transactional() {
            if h.producer_id().0 < 0 {
                return Err((ErrorCode::InvalidRecord, "a transactional batch needs a producer id".into()));
            }
            if !has_txn_id {
                return Err((
                    ErrorCode::TransactionalIdAuthorizationFailed,
                    "transactional records in a produce request without a transactional id".into(),
                ));
            }
            transactional = true;
        }
        at += info.size_bytes;
    }
    Ok(transactional)
}

/// Record-level rules of a topic that Produce enforces (Kafka's
/// LogValidator): keys on compacted topics, timestamps near the broker's
/// clock with CreateTime.
#[derive(Clone, Copy, Debug)]
pub struct RecordRules {
    /// `cleanup.policy` has compact: every record needs a key.
    pub require_keys: bool,
    /// CreateTime: (earliest, latest) timestamp accepted, from
    /// `message.timestamp.before.max.ms` / `after.max.ms` and the clock.
    pub timestamps: Option<(i64, i64)>,
}

/// A record set refused by `RecordRules`: the partition's error code and
/// message, and each offending record (its index in the record set) with
/// why: Produce v8+'s `record_errors` (KIP-467), so a client fails exactly
/// those records and can tell the others they were only caught up in it.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordsRefused {
    pub code: ErrorCode,
    pub message: String,
    pub records: Vec<(i32, String)>,
}

/// Checks every record against `rules`. Cheap where it can be: a batch whose
/// header timestamps already satisfy the rules (and no keys are required)
/// is not walked; with the default (unbounded) past limit only the batch's
/// max timestamp needs checking. Compressed batches are decompressed only
/// when their records must be walked.
pub fn check_record_rules(records: &[u8], infos: &[BatchInfo], rules: &RecordRules) -> Result<(), RecordsRefused> {
    let before_unbounded = rules.timestamps.is_none_or(|(earliest, _)| earliest == i64::MIN);
    let mut missing_keys = Vec::new();
    let mut bad_times = Vec::new();
    let mut at = 0;
    let mut index = 0i32;
    for info in infos {
        let b = &records[at..at + info.size_bytes];
        at += info.size_bytes;
        let first = index;
        index = index.saturating_add(info.record_count);
        let Ok(header) = batch::BatchHeader::parse(b) else { continue };
        let times_ok = match rules.timestamps {
            None => true,
            Some((earliest, latest)) => {
                header.max_timestamp_ms() <= latest && (before_unbounded || header.base_timestamp_ms() >= earliest)
            }
        };
        // With a bounded past, a record may sit below the base timestamp
        // (negative delta): walk the batch to be sure.
        if !rules.require_keys && times_ok && before_unbounded {
            continue;
        }
        let decompressed;
        let body: &[u8] = if info.compression == batch::Compression::None {
            &b[batch::BATCH_HEADER_BYTES..]
        } else {
            match crate::storage::compaction::decompress_records(b, info.compression) {
                Ok(v) => {
                    decompressed = v;
                    &decompressed
                }
                Err(e) => {
                    return Err(RecordsRefused { code: ErrorCode::CorruptMessage, message: e, records: Vec::new() });
                }
            }
        };
        let facts = batch::record_facts(body, info.record_count, header.base_timestamp_ms()).map_err(|e| {
            RecordsRefused { code: ErrorCode::CorruptMessage, message: e.to_string(), records: Vec::new() }
        })?;
        for (i, f) in facts.iter().enumerate() {
            let i = first.saturating_add(i as i32);
            if rules.require_keys && !f.has_key {
                missing_keys.push(i);
            }
            if let Some((earliest, latest)) = rules.timestamps {
                if f.timestamp_ms < earliest || f.timestamp_ms > latest {
                    bad_times.push((i, f.timestamp_ms, earliest, latest));
                }
            }
        }
    }
    if bad_times.is_empty() && missing_keys.is_empty() {
        return Ok(());
    }
    let mut errors: Vec<(i32, String)> = missing_keys
        .iter()
        .map(|&i| (i, "a compacted topic refuses records without a key".to_string()))
        .chain(bad_times.iter().map(|&(i, ts, earliest, latest)| {
            (i, format!("timestamp {ts} is outside [{earliest}, {latest}] (message.timestamp.before/after.max.ms)"))
        }))
        .collect();
    errors.sort_by_key(|(i, _)| *i);
    // As Kafka: a bad timestamp makes it INVALID_TIMESTAMP, else INVALID_RECORD.
    let code = if bad_times.is_empty() { ErrorCode::InvalidRecord } else { ErrorCode::InvalidTimestamp };
    let shown: Vec<String> = errors.iter().take(3).map(|(i, m)| format!("record {i}: {m}")).collect();
    let message = format!("{} record(s) refused, so the whole batch was: {}", errors.len(), shown.join("; "));
    Err(RecordsRefused { code, message, records: errors })
}

/// What Produce's validation layer decided for one partition (see `validate_only`).
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub topic: String,
    pub partition: i32,
    /// The batches that would be appended, or the error code the partition
    /// would be answered with.
    pub outcome: Result<Vec<BatchInfo>, ErrorCode>,
}

/// Runs everything `produce` does to a request before it touches a log,
/// without a shard: the frame is cut as `produce` cuts it, each record set
/// goes through `check_record_set`, LogAppendTime stamping (when
/// `log_append_time_ms` is set) and the idempotent-producer checks against
/// `producers` (accepted batches are recorded there at made-up offsets, so
/// a sequence of requests exercises duplicates and sequence gaps). For the
/// fuzzer (fuzz/) and tests; the broker calls `produce`.
pub fn validate_only(
    version: i16,
    req: ProduceRequest,
    frame: Bytes,
    max_bytes: usize,
    log_append_time_ms: Option<i64>,
    producers: &mut producer_state::ProducerStateTable,
) -> Vec<Verdict> {
    let (topics, txn_id) = locate_records(req, &frame);
    let has_txn_id = txn_id.is_some();
    let mut frame = FrameCutter::new(frame);
    let mut out = Vec::new();
    let mut next_offset = 0i64;
    for topic in topics {
        for p in topic.partitions {
            let mut records = frame.take(p.records);
            let outcome = {
                let converted = convert_legacy(version, &mut records, max_bytes);
                converted.and_then(|()| check_record_set(&records, max_bytes)).map_err(|(code, _)| code).and_then(
                    |mut infos| {
                        if let Some(now_ms) = log_append_time_ms {
                            crate::storage::timestamps::stamp_log_append_time(&mut records, &mut infos, now_ms);
                        }
                        let txn = check_txn_rules(&records, &infos, has_txn_id).map_err(|(code, _)| code)?;
                        let producer =
                            producer_state::idempotent_batch(&records, &infos).map_err(|_| ErrorCode::InvalidRecord)?;
                        if let Some(b) = producer {
                            match producers.check_batch(b.pid, b.epoch, b.first_seq, b.count, txn) {
                                Check::Append => {
                                    let count = infos.iter().map(|i| i64::from(i.last_offset_delta) + 1).sum::<i64>();
                                    let meta = BatchMeta {
                                        first_seq: b.first_seq,
                                        last_seq: producer_state::seq_add(b.first_seq, b.count - 1),
                                        base_offset: Offset(next_offset),
                                        last_offset: Offset(next_offset + count - 1),
                                    };
                                    if txn {
                                        let first = Offset(next_offset);
                                        producers.begin_txn_batch(b.pid, b.epoch, first, b.max_timestamp_ms, None);
                                    }
                                    next_offset += count;
                                    producers.record(b.pid, b.epoch, meta, b.max_timestamp_ms);
                                }
                                Check::Duplicate { .. } => {}
                                Check::Reject(code) => return Err(code),
                            }
                        }
                        Ok(infos)
                    },
                )
            };
            out.push(Verdict { topic: topic.name.clone(), partition: p.index, outcome });
        }
    }
    out
}

/// A Produce request whose record sets are located in its frame.
struct Located {
    version: i16,
    cid: i32,
    acks: i16,
    timeout_ms: i32,
    topics: Vec<TopicInput>,
    has_txn_id: bool,
    frame: Bytes,
}

impl Located {
    /// The record set of partition `p`, where it lies: in the frame or
    /// decompressed elsewhere; None when the request carried none.
    fn records_of<'a>(&'a self, p: &'a PartitionInput) -> Option<&'a [u8]> {
        match &p.records {
            RecordsAt::Absent => None,
            RecordsAt::Frame(range) => self.frame.get(range.clone()),
            RecordsAt::Elsewhere(b) => Some(b),
        }
    }
}

/// A producer's first transactional batch on a partition, to verify.
struct FirstBatch {
    pid: i64,
    epoch: i16,
    topic: String,
    partition: i32,
    /// The log's `markers_appended` before verifying: if a marker is
    /// appended meanwhile, the transaction may have ended under us.
    markers: u64,
}

/// A partition refused before its records are looked at.
struct Refused {
    topic: String,
    partition: i32,
    code: ErrorCode,
    message: String,
}

/// The Produce requests of one transactional producer on this shard that
/// wait their turn: tickets are handed out at dispatch, in arrival order,
/// and served strictly in that order.
#[derive(Default)]
struct Turns {
    next_ticket: Cell<u64>,
    serving: Cell<u64>,
    /// Tickets whose request went away (its connection closed) before its
    /// turn: skipped when the turn comes.
    abandoned: RefCell<std::collections::BTreeSet<u64>>,
    changed: crate::notify::Notify,
}

thread_local! {
    /// Transactional producers (by producer id) with a Produce of this
    /// shard waiting for KIP-890 verification (see `produce`).
    static VERIFYING: RefCell<HashMap<i64, Rc<Turns>>> = RefCell::new(HashMap::new());
}

/// One request's place in its producer's `Turns`. Dropping it (done, or
/// the request dropped with its connection) hands the turn on, so a
/// closed connection never holds up the producer's other requests.
struct Turn {
    turns: Rc<Turns>,
    ticket: u64,
    pid: i64,
}

impl Turn {
    fn take(pid: i64) -> Turn {
        let turns = VERIFYING.with(|v| v.borrow_mut().entry(pid).or_default().clone());
        let ticket = turns.next_ticket.get();
        turns.next_ticket.set(ticket + 1);
        Turn { turns, ticket, pid }
    }

    async fn wait(&self) {
        while self.turns.serving.get() != self.ticket {
            let changed = self.turns.changed.notified();
            if self.turns.serving.get() == self.ticket {
                break;
            }
            changed.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let t = &self.turns;
        if t.serving.get() != self.ticket {
            t.abandoned.borrow_mut().insert(self.ticket);
            return;
        }
        let mut next = self.ticket + 1;
        while t.abandoned.borrow_mut().remove(&next) {
            next += 1;
        }
        t.serving.set(next);
        if t.next_ticket.get() == next {
            // Nobody behind: the producer's later requests go straight in.
            VERIFYING.with(|v| {
                let mut v = v.borrow_mut();
                if v.get(&self.pid).is_some_and(|cur| Rc::ptr_eq(cur, t)) {
                    v.remove(&self.pid);
                }
            });
        } else {
            t.changed.notify_all();
        }
    }
}

pub fn produce(shard: &Rc<Shard>, version: i16, cid: i32, req: ProduceRequest, frame: Bytes) -> Pending {
    let (acks, timeout_ms) = (req.acks, req.timeout_ms);
    let (topics, txn_id) = locate_records(req, &frame);
    let request = Located { version, cid, acks, timeout_ms, topics, has_txn_id: txn_id.is_some(), frame };
    let Some(id) = txn_id.filter(|_| shard.txns.settings.verify_partitions) else {
        return produce_located(shard, request, Vec::new());
    };
    let Some(pid) = transactional_producer(&request) else {
        return produce_located(shard, request, Vec::new());
    };
    // A producer pipelines its requests (up to 5 in flight), and its
    // sequence numbers only go in order: once one of its requests waits for
    // verification, every later one of it on this shard takes a ticket
    // behind it (here, at dispatch, in arrival order), so none appends
    // ahead of an earlier one.
    let busy = VERIFYING.with(|v| v.borrow().contains_key(&pid));
    if !busy && first_txn_batches(shard, &request).is_empty() {
        return produce_located(shard, request, Vec::new());
    }
    let turn = Turn::take(pid);
    let shard = shard.clone();
    Box::pin(async move {
        turn.wait().await;
        // Earlier requests of this producer have appended by now: only
        // partitions still without its transaction need verifying.
        let first = first_txn_batches(&shard, &request);
        let refused = if first.is_empty() { Vec::new() } else { verify_first_batches(&shard, &id, first).await };
        let pending = produce_located(&shard, request, refused);
        drop(turn);
        pending.await
    })
}

/// The producer id of the request's first transactional batch (a request
/// carries one producer's batches).
fn transactional_producer(request: &Located) -> Option<i64> {
    request.topics.iter().flat_map(|t| &t.partitions).find_map(|p| {
        let h = batch::BatchHeader::parse(request.records_of(p)?).ok()?;
        (h.is_transactional() && !h.is_control() && h.producer_id().0 >= 0).then(|| h.producer_id().0)
    })
}

/// KIP-890's verification guard: a marker appended to the partition while
/// its first batch was verified may have ended the very transaction the
/// coordinator confirmed (a client that gave up on this request and
/// aborted). Appending then would open a transaction no one ends, so the
/// batch is refused with a retriable error; the retry verifies again.
fn raced_marker(shard: &Shard, first: &FirstBatch) -> Option<Refused> {
    let log = shard.log(&first.topic, first.partition)?;
    let moved = log.borrow().markers_appended != first.markers;
    moved.then(|| Refused {
        topic: first.topic.clone(),
        partition: first.partition,
        code: ErrorCode::NotEnoughReplicas,
        message: format!(
            "a transaction marker was written to {}-{} while producer {}'s first batch was being verified; retry",
            first.topic, first.partition, first.pid
        ),
    })
}

/// The partitions of this shard where the request's record set starts with
/// a transactional batch of a producer that has no transaction open there
/// yet. Only these need KIP-890 verification; later batches of the same
/// transaction find it open.
fn first_txn_batches(shard: &Shard, request: &Located) -> Vec<FirstBatch> {
    let mut out = Vec::new();
    for t in &request.topics {
        for p in &t.partitions {
            let Some(Ok(h)) = request.records_of(p).map(batch::BatchHeader::parse) else { continue };
            let pid = h.producer_id();
            if !h.is_transactional() || h.is_control() || pid.0 < 0 {
                continue;
            }
            let Some(log) = shard.log(&t.name, p.index) else { continue };
            let l = log.borrow();
            let epoch = h.producer_epoch();
            // Open here at this very epoch; a transaction of an older epoch
            // is not this producer's to continue.
            if l.producers.get(pid).is_none_or(|e| e.txn_first_offset.is_none() || e.epoch != epoch) {
                out.push(FirstBatch {
                    pid: pid.0,
                    epoch,
                    topic: t.name.clone(),
                    partition: p.index,
                    markers: l.markers_appended,
                });
            }
        }
    }
    out
}

/// Asks the transaction coordinator of `id` whether each partition of
/// `first` is in its producer's open transaction (one question per producer
/// id and epoch, normally one). Refused: a partition that is not
/// (INVALID_TXN_STATE, as Kafka), a fenced producer (INVALID_PRODUCER_EPOCH:
/// Produce has no PRODUCER_FENCED), and partitions whose coordinator could
/// not answer (NOT_ENOUGH_REPLICAS with the reason, which every client
/// retries: Kafka's KAFKA-15459 mapping).
/// The refused include those whose partition got a marker meanwhile
/// (`raced_marker`): the caller appends right after, with no await between.
async fn verify_first_batches(shard: &Rc<Shard>, id: &str, mut first: Vec<FirstBatch>) -> Vec<Refused> {
    first.sort_by_key(|x| (x.pid, x.epoch));
    let mut refused = Vec::new();
    for group in first.chunk_by(|a, b| (a.pid, a.epoch) == (b.pid, b.epoch)) {
        let (pid, epoch) = (group[0].pid, group[0].epoch);
        let parts: Vec<(String, i32)> = group.iter().map(|x| (x.topic.clone(), x.partition)).collect();
        let outcome = crate::txn::verify_partitions(shard, id, pid, epoch, &parts).await;
        for (i, (topic, partition)) in parts.into_iter().enumerate() {
            let (code, message) = match &outcome {
                Ok(included) if included.get(i).copied().unwrap_or(false) => continue,
                Ok(_) => (
                    ErrorCode::InvalidTxnState,
                    format!(
                        "{topic}-{partition} is not in the open transaction of transactional id {id} \
                         (producer {pid} epoch {epoch}): AddPartitionsToTxn must come first"
                    ),
                ),
                Err(ErrorCode::ProducerFenced | ErrorCode::InvalidProducerEpoch) => (
                    ErrorCode::InvalidProducerEpoch,
                    format!("producer {pid} epoch {epoch} of transactional id {id} is fenced"),
                ),
                Err(
                    e @ (ErrorCode::NotCoordinator
                    | ErrorCode::CoordinatorNotAvailable
                    | ErrorCode::CoordinatorLoadInProgress
                    | ErrorCode::ConcurrentTransactions),
                ) => (
                    ErrorCode::NotEnoughReplicas,
                    format!("could not verify the transaction of {id} with its coordinator ({}); retry", e.name()),
                ),
                Err(e) => (*e, format!("verifying the transaction of {id} with its coordinator: {}", e.name())),
            };
            refused.push(Refused { topic, partition, code, message });
        }
    }
    // Checked after every question is answered, so that nothing awaits
    // between this check and the append.
    for x in &first {
        if !refused.iter().any(|r| r.topic == x.topic && r.partition == x.partition) {
            refused.extend(raced_marker(shard, x));
        }
    }
    refused
}

fn produce_located(shard: &Rc<Shard>, request: Located, refused: Vec<Refused>) -> Pending {
    let Located { version, cid, acks, timeout_ms, topics, has_txn_id, frame } = request;
    let image = shard.image();
    let mut frame = FrameCutter::new(frame);
    let mut responses = Vec::with_capacity(topics.len());
    let mut waiting = Vec::new();
    // One clock reading per request: the timestamp rules and LogAppendTime.
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    for (ti, topic) in topics.into_iter().enumerate() {
        let name: &str = &topic.name;
        let topic_meta = image.topics.get(name);
        // The topic's settings, resolved once for all its partitions.
        let max_bytes = topic_meta
            .and_then(|t| {
                usize::try_from(crate::topic_config::topic_i64(&shard.config, &image, t, "max.message.bytes")).ok()
            })
            .unwrap_or(shard.config.message_max_bytes);
        // LogAppendTime topics: the broker's clock goes into each batch (and the response).
        let log_append_time = topic_meta.is_some_and(|t| {
            crate::topic_config::topic_value(&shard.config, &image, t, "message.timestamp.type") == "LogAppendTime"
        });
        let rules = topic_meta.map(|t| record_rules(shard, &image, t, log_append_time, now_ms));
        let recompress = topic_meta.map_or(Target::Producer, |t| {
            let value = |name: &str| crate::topic_config::topic_value(&shard.config, &image, t, name);
            Target::from_config(&value("compression.type"), |level| {
                crate::topic_config::topic_i64(&shard.config, &image, t, level)
            })
        });
        let mut parts = Vec::with_capacity(topic.partitions.len());
        for (pi, p) in topic.partitions.into_iter().enumerate() {
            let mut r = PartitionProduceResponse::default().with_index(p.index);
            let fail = |r: PartitionProduceResponse, code: ErrorCode, msg: String| {
                log::warn!("produce {name}-{}: {} ({msg})", p.index, code.name());
                shard.metrics.error(ApiKey::Produce, code.code());
                let r = r.with_error_code(code.code()).with_base_offset(-1);
                if version >= 8 {
                    r.with_error_message(Some(str_bytes(&msg)))
                } else {
                    r
                }
            };
            if !(acks == 0 || acks == 1 || acks == -1) {
                parts.push(fail(r, ErrorCode::InvalidRequiredAcks, format!("acks={acks} must be 0, 1 or -1")));
                continue;
            }
            let owner = image.owner(name, p.index);
            match owner {
                None => {
                    let code = if topic_meta.is_none() && crate::metadata::validate_topic_name(name).is_err() {
                        ErrorCode::InvalidTopicException
                    } else {
                        ErrorCode::UnknownTopicOrPartition
                    };
                    parts.push(fail(r, code, format!("no partition {name}-{}", p.index)));
                    continue;
                }
                Some(o) if o != shard.id => {
                    shard.metrics.error(ApiKey::Produce, ErrorCode::NotLeaderOrFollower.code());
                    r = r.with_error_code(ErrorCode::NotLeaderOrFollower.code()).with_base_offset(-1);
                    parts.push(r);
                    continue;
                }
                Some(_) => {}
            }
            let Some(log) = shard.log(name, p.index) else {
                parts.push(fail(r, ErrorCode::LeaderNotAvailable, "partition is not open yet".into()));
                continue;
            };
            if shard.dir_state(&log) != DirState::Online {
                // Not `fail`: producers retry this until space returns, and
                // the shard logged the directory going offline once.
                let msg = format!("{name}-{}: log dir offline ({})", p.index, shard.describe_offline_dirs());
                log::debug!("produce {msg}: KAFKA_STORAGE_ERROR");
                shard.metrics.error(ApiKey::Produce, ErrorCode::KafkaStorageError.code());
                r = r.with_error_code(ErrorCode::KafkaStorageError.code()).with_base_offset(-1);
                if version >= 8 {
                    r = r.with_error_message(Some(str_bytes(&msg)));
                }
                parts.push(r);
                continue;
            }
            if let Some(x) = refused.iter().find(|x| x.topic == name && x.partition == p.index) {
                parts.push(fail(r, x.code, x.message.clone()));
                continue;
            }
            if acks == -1 {
                if let Err(msg) = crate::replication::Replication::check_min_isr(shard, &image, name, p.index) {
                    // Not `fail`: a producer retries this for as long as the
                    // ISR is short, so one warning per request would flood the log.
                    log::debug!("produce {msg}: NOT_ENOUGH_REPLICAS");
                    shard.metrics.error(ApiKey::Produce, ErrorCode::NotEnoughReplicas.code());
                    r = r.with_error_code(ErrorCode::NotEnoughReplicas.code()).with_base_offset(-1);
                    if version >= 8 {
                        r = r.with_error_message(Some(str_bytes(&msg)));
                    }
                    parts.push(r);
                    continue;
                }
            }
            let mut records = frame.take(p.records);
            if let Err((code, msg)) = convert_legacy(version, &mut records, max_bytes) {
                parts.push(fail(r, code, msg));
                continue;
            }
            let mut infos = match check_record_set(&records, max_bytes) {
                Ok(infos) => infos,
                Err((code, msg)) => {
                    parts.push(fail(r, code, msg));
                    continue;
                }
            };
            if let Some(rules) = &rules {
                if let Err(refused) = check_record_rules(&records, &infos, rules) {
                    let mut r = fail(r, refused.code, refused.message);
                    if version >= 8 {
                        r = r.with_record_errors(
                            refused
                                .records
                                .into_iter()
                                .map(|(i, m)| {
                                    BatchIndexAndErrorMessage::default()
                                        .with_batch_index(i)
                                        .with_batch_index_error_message(Some(str_bytes(&m)))
                                })
                                .collect(),
                        );
                    }
                    parts.push(r);
                    continue;
                }
            }
            // compression.type other than `producer`: batches under another
            // codec are rewritten with the topic's before anything else.
            match crate::storage::recompress::recompress_set(&records, &infos, recompress) {
                Ok(None) => {}
                Ok(Some(rewritten)) => {
                    records = BytesMut::from(&rewritten[..]);
                    infos = match check_record_set(&records, max_bytes) {
                        Ok(infos) => infos,
                        Err((code, msg)) => {
                            parts.push(fail(r, code, format!("after recompressing: {msg}")));
                            continue;
                        }
                    };
                }
                Err(msg) => {
                    parts.push(fail(r, ErrorCode::CorruptMessage, msg));
                    continue;
                }
            }
            if log_append_time {
                crate::storage::timestamps::stamp_log_append_time(&mut records, &mut infos, now_ms);
                r = r.with_log_append_time_ms(now_ms);
            }
            let txn = match check_txn_rules(&records, &infos, has_txn_id) {
                Ok(txn) => txn,
                Err((code, msg)) => {
                    parts.push(fail(r, code, msg));
                    continue;
                }
            };
            // Idempotent producers: Kafka's epoch and sequence checks before the append.
            let producer = match producer_state::idempotent_batch(&records, &infos) {
                Ok(p) => p,
                Err(msg) => {
                    parts.push(fail(r, ErrorCode::InvalidRecord, msg));
                    continue;
                }
            };
            if let Some(b) = &producer {
                let check = log.borrow().producers.check_batch(b.pid, b.epoch, b.first_seq, b.count, txn);
                match check {
                    Check::Append => {}
                    Check::Duplicate { base_offset, last_offset } => {
                        log::debug!(
                            "produce {name}-{}: producer {} seq {} is a retry of offsets {}..={}",
                            p.index,
                            b.pid.0,
                            b.first_seq,
                            base_offset.0,
                            last_offset.0
                        );
                        r = r.with_base_offset(base_offset.0);
                        if version >= 5 {
                            r = r.with_log_start_offset(log.borrow().log_start_offset.0);
                        }
                        if acks == -1 {
                            // In the log already: acknowledged once replicated under the current leadership.
                            let leader_epoch = image.leader_epoch(name, p.index).max(0);
                            let log = log.clone();
                            waiting.push(Waiting { topic: ti, partition: pi, log, last: last_offset, leader_epoch });
                        }
                        parts.push(r);
                        continue;
                    }
                    Check::Reject(code) => {
                        let mut msg = format!("producer {} epoch {} sequence {}", b.pid.0, b.epoch, b.first_seq);
                        if code == ErrorCode::InvalidTxnState {
                            msg += ": its transaction is open on this partition, so only transactional batches";
                        }
                        parts.push(fail(r, code, msg));
                        continue;
                    }
                }
            }
            let record_bytes = records.len() as u64;
            let leader_epoch = image.leader_epoch(name, p.index).max(0);
            let (first, last) = {
                let mut l = log.borrow_mut();
                let (first, last) = l.append(records, &infos, Epoch(leader_epoch));
                if let Some(b) = &producer {
                    let meta = BatchMeta {
                        first_seq: b.first_seq,
                        last_seq: producer_state::seq_add(b.first_seq, b.count - 1),
                        base_offset: first,
                        last_offset: last,
                    };
                    l.producers.record(b.pid, b.epoch, meta, b.max_timestamp_ms);
                }
                r = r.with_base_offset(first.0);
                if version >= 5 {
                    r = r.with_log_start_offset(l.log_start_offset.0);
                }
                (first, last)
            };
            // Counted once appended: rejected batches and retried duplicates are not "in".
            shard.metrics.produced(
                name,
                p.index,
                record_bytes,
                infos.iter().map(|i| i.record_count.max(0) as u64).sum(),
            );
            log::trace!("produce {name}-{}: offsets {}..={}", p.index, first.0, last.0);
            shard.mark_dirty(&log);
            if acks == -1 {
                waiting.push(Waiting { topic: ti, partition: pi, log, last, leader_epoch });
            }
            parts.push(r);
        }
        let name = TopicName(tidelog_protocol::StrBytes::from_string(topic.name));
        responses.push(TopicProduceResponse::default().with_name(name).with_partition_responses(parts));
    }
    if acks == 0 {
        return ready(Ok(None));
    }
    let resp = ProduceResponse::default().with_responses(responses);
    if waiting.is_empty() {
        return ready(encode_response(version, cid, &resp));
    }
    let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
    let shard = shard.clone();
    Box::pin(async move {
        let mut resp = resp;
        let deadline = Instant::now() + timeout;
        loop {
            let notified = shard.hw_notify.notified();
            // Leadership lost (or lost and won back) since the append: the
            // records may have been truncated, and the watermark now covers
            // other records at their offsets. Never acknowledged.
            let image = shard.image();
            waiting.retain(|w| {
                let t = &mut resp.responses[w.topic];
                let p = &mut t.partition_responses[w.partition];
                if Replication::leads_at_epoch(&image, shard.id, &t.name.0, p.index, w.leader_epoch) {
                    return true;
                }
                p.error_code = ErrorCode::NotLeaderOrFollower.code();
                if version >= 8 {
                    p.error_message = Some(str_bytes(
                        "this broker lost the partition's leadership before the records were replicated; \
                         they may have been truncated",
                    ));
                }
                false
            });
            // A data directory that went offline answers now rather than at
            // the timeout, so that partitions elsewhere in the same request
            // are not held up. Failed (EIO): these records are not written.
            // Full: they stay queued and are written once space returns,
            // which an idempotent producer's retry then finds as a duplicate.
            waiting.retain(|w| {
                let state = shard.dir_state(&w.log);
                if w.log.borrow().high_watermark > w.last || state == DirState::Online {
                    return true;
                }
                let p = &mut resp.responses[w.topic].partition_responses[w.partition];
                p.error_code = ErrorCode::KafkaStorageError.code();
                if version >= 8 {
                    p.error_message = Some(str_bytes(if state == DirState::Failed {
                        "the partition's log dir failed; the records were not written"
                    } else {
                        "the partition's log dir is full; the records are written once space is freed \
                         (a retry may duplicate them unless the producer is idempotent)"
                    }));
                }
                false
            });
            if waiting.iter().all(|w| w.log.borrow().high_watermark > w.last) {
                // Kafka: replicated to the ISR, but the ISR shrank below
                // min.insync.replicas meanwhile.
                let image = shard.image();
                for w in &waiting {
                    let short = {
                        let t = &resp.responses[w.topic];
                        let index = t.partition_responses[w.partition].index;
                        crate::replication::Replication::check_min_isr(&shard, &image, &t.name.0, index).err()
                    };
                    if let Some(msg) = short {
                        let p = &mut resp.responses[w.topic].partition_responses[w.partition];
                        p.error_code = ErrorCode::NotEnoughReplicasAfterAppend.code();
                        if version >= 8 {
                            p.error_message = Some(str_bytes(&msg));
                        }
                    }
                }
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                for w in waiting.iter().filter(|w| w.log.borrow().high_watermark <= w.last) {
                    let p = &mut resp.responses[w.topic].partition_responses[w.partition];
                    p.error_code = ErrorCode::RequestTimedOut.code();
                    if version >= 8 {
                        p.error_message =
                            Some(str_bytes("not durable within timeout_ms; the write will still complete"));
                    }
                }
                break;
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                notified.await;
                Ok(())
            })
            .await;
        }
        encode_response(version, cid, &resp)
    })
}

/// The response in the request's version: v0–v2 in their legacy shapes.
fn encode_response(version: i16, cid: i32, resp: &ProduceResponse) -> super::Response {
    if tidelog_protocol::legacy::is_legacy(ApiKey::Produce, version) {
        let frame = tidelog_protocol::legacy::encode_produce_response(version, cid, resp);
        return Ok(Some(super::Outgoing::Frame(frame)));
    }
    encode(ApiKey::Produce, version, cid, resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidelog_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use tidelog_protocol::messages::TransactionalId;
    use tidelog_protocol::{Decodable, Encodable};

    fn request_frame(sets: &[(&str, i32, &[u8])]) -> Bytes {
        let topics = sets
            .iter()
            .map(|(name, index, records)| {
                TopicProduceData::default().with_name(TopicName(str_bytes(name))).with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(*index)
                        .with_records(Some(Bytes::copy_from_slice(records))),
                ])
            })
            .collect();
        let req = ProduceRequest::default().with_acks(-1).with_topic_data(topics);
        let mut buf = BytesMut::new();
        req.encode(&mut buf, 9).expect("encode");
        buf.freeze()
    }

    #[test]
    fn record_sets_are_cut_from_the_frame_without_a_copy() {
        let frame = request_frame(&[("a", 0, b"first record set"), ("b", 3, b"second one")]);
        let start = frame.as_ptr() as usize;
        let end = start + frame.len();
        let mut body = frame.clone();
        let req = ProduceRequest::decode(&mut body, 9).expect("decode");
        drop(body);
        let (topics, transactional_id) = locate_records(req, &frame);
        assert!(transactional_id.is_none());
        let mut cutter = FrameCutter::new(frame);
        assert!(cutter.frame.is_ok(), "the handler should own the frame alone");
        let mut got = Vec::new();
        for t in topics {
            for p in t.partitions {
                let piece = cutter.take(p.records);
                let at = piece.as_ptr() as usize;
                assert!(at >= start && at + piece.len() <= end, "{}-{} was copied", t.name, p.index);
                got.push((t.name.clone(), p.index, piece.to_vec()));
            }
        }
        assert_eq!(
            got,
            vec![("a".to_string(), 0, b"first record set".to_vec()), ("b".to_string(), 3, b"second one".to_vec())]
        );
    }

    #[test]
    fn a_shared_frame_is_copied() {
        let frame = request_frame(&[("a", 0, b"records")]);
        let mut body = frame.clone();
        let req = ProduceRequest::decode(&mut body, 9).expect("decode");
        let (topics, _) = locate_records(req, &frame);
        let mut cutter = FrameCutter::new(frame);
        assert!(cutter.frame.is_err(), "`body` still shares the frame");
        let p = topics.into_iter().next().and_then(|t| t.partitions.into_iter().next()).expect("partition");
        assert_eq!(&cutter.take(p.records)[..], b"records");
        drop(body);
    }

    #[test]
    fn validate_only_reports_each_partition_as_produce_would() {
        let recs = [batch::RecordRef { key: None, value: Some(b"v"), headers: &[], timestamp_delta_ms: 0 }];
        let good = batch::build_batch(&recs, 1, batch::ProducerFields::default());
        let idempotent =
            batch::build_batch(&recs, 1, batch::ProducerFields { producer_id: 7, producer_epoch: 0, base_sequence: 0 });
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let frame = request_frame(&[("a", 0, &good), ("a", 1, &bad), ("b", 0, &idempotent), ("b", 1, &idempotent)]);
        let mut body = frame.clone();
        let req = ProduceRequest::decode(&mut body, 9).expect("decode");
        drop(body);
        let mut producers = producer_state::ProducerStateTable::default();
        let verdicts = validate_only(9, req, frame, 1 << 20, Some(5), &mut producers);
        let outcomes: Vec<_> =
            verdicts.iter().map(|v| (v.topic.as_str(), v.partition, v.outcome.as_ref().map(|i| i.len()))).collect();
        assert_eq!(
            outcomes,
            vec![("a", 0, Ok(1)), ("a", 1, Err(&ErrorCode::CorruptMessage)), ("b", 0, Ok(1)), ("b", 1, Ok(1))]
        );
        assert_eq!(verdicts[0].outcome.as_ref().map(|i| i[0].max_timestamp_ms), Ok(5), "stamped");
        assert_eq!(producers.len(), 1, "the retry is a duplicate of the first append");
    }

    fn decoded(frame: &Bytes, txn_id: Option<&str>) -> (ProduceRequest, Bytes) {
        let mut body = frame.clone();
        let req = ProduceRequest::decode(&mut body, 9).expect("decode");
        drop(body);
        let req = req.with_transactional_id(txn_id.map(|t| TransactionalId(str_bytes(t))));
        (req, frame.clone())
    }

    #[test]
    fn transactional_produce_rules() {
        let recs = [batch::RecordRef { key: None, value: Some(b"v"), headers: &[], timestamp_delta_ms: 0 }];
        let fields = |pid, seq| batch::ProducerFields { producer_id: pid, producer_epoch: 0, base_sequence: seq };
        let txn = |pid, seq| batch::build_batch_with_attributes(&recs, 1, fields(pid, seq), batch::ATTR_TRANSACTIONAL);
        let marker = batch::build_control_batch(batch::ControlType::Commit, 7, 0, 0, 1);
        let plain_idempotent = batch::build_batch(&recs, 1, fields(7, 2));
        let frame = request_frame(&[
            ("t", 0, &txn(7, 0)),
            ("t", 1, &txn(-1, -1)),
            ("t", 2, &marker),
            ("t", 0, &txn(7, 1)),
            ("t", 0, &plain_idempotent),
        ]);
        let outcomes = |txn_id| {
            let (req, frame) = decoded(&frame, txn_id);
            let mut producers = producer_state::ProducerStateTable::default();
            let verdicts = validate_only(9, req, frame, 1 << 20, None, &mut producers);
            verdicts.into_iter().map(|v| v.outcome.map(|i| i.len())).collect::<Vec<_>>()
        };
        assert_eq!(
            outcomes(Some("app")),
            vec![
                Ok(1),
                Err(ErrorCode::InvalidRecord),
                Err(ErrorCode::InvalidRecord),
                Ok(1),
                // Producer 7's transaction is open on t-0: only transactional batches.
                Err(ErrorCode::InvalidTxnState),
            ]
        );
        assert_eq!(outcomes(None)[0], Err(ErrorCode::TransactionalIdAuthorizationFailed));
        assert_eq!(outcomes(None)[2], Err(ErrorCode::InvalidRecord), "control batches are refused either way");
    }
}
