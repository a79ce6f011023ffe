//! Fetch: sessionless, long-polling reads of durable data, sent without
//! copying record data in user space.
//!
//! Limits as Kafka applies them: `partition_max_bytes` per partition,
//! `max_bytes` for the response, and at least one whole batch from the first
//! partition that has data even when it is larger than both (KIP-74), so a
//! client always makes progress. Waits up to `max_wait_ms` for `min_bytes`,
//! woken whenever a high watermark on this shard moves; an idle waiting fetch
//! costs one waker.
//!
//! Hot reads (the offset is in the partition's recent-batch cache) are `Bytes`
//! slices of the cached batches; cold reads are file regions of one segment.
//! The response is framed by `tidelog_protocol::fetch` (sizes known up front)
//! and written by the connection's writer: inline pieces and memory batches
//! with one vectored `sendmsg`, file regions with `sendfile` (see
//! `server::send_parts` for why that runs on the shard's blocking pool).
//!
//! From v13 topics are addressed by id (KIP-516): an id this broker does not
//! know answers UNKNOWN_TOPIC_ID. From v15 a follower names itself in
//! `replica_state` with its broker epoch (KIP-903), which the leader checks
//! before taking it back into the ISR. A partition asked of the wrong broker
//! gets its `current_leader` (v12+) and, from v16, the leader's endpoint in
//! `node_endpoints` (KIP-951), so the client need not ask Metadata first.
//!
//! Isolation (KIP-98): a read_committed consumer (isolation_level 1) reads
//! below the partition's last stable offset only (whole batches; cold reads
//! stay sendfile regions, cut at the byte position of the first unstable
//! transaction's batch), and gets the aborted transactions that overlap
//! what it read, so it can drop their records. Every fetch reports the real
//! last stable offset. min_bytes and long-poll wake-ups count only what the
//! fetcher may read; the LSO moves only with the high watermark, whose
//! moves wake waiting fetches.
//!
//! Legacy versions (v0–v3, clients of Kafka 0.9/0.10 that cannot read
//! record batch v2): each partition's batches are read as for any consumer
//! (below the last stable offset), then copied into memory and
//! down-converted to magic 0 (v0–v1) or magic 1 (v2–v3) messages by
//! `storage::legacy::down_convert`, within the partition's byte budget.
//! This is the copying path: converted bytes are not the file's bytes, so
//! the zero-copy sendfile path cannot serve them. Control batches and
//! aborted transactions' records are left out.
//!
//! A partition that carries `last_fetched_epoch` (v12, KIP-320) is checked
//! against the leader epoch cache first (`replication::check_fetch_epoch`):
//! a fetcher whose log diverged gets `diverging_epoch`, error NONE and no
//! records, at once.

use std::rc::Rc;
use std::time::{Duration, Instant};

use tidelog_protocol::fetch::{encode_fetch_frame, NodeEndpoint, PartitionHeader, TopicHeader};
use tidelog_protocol::messages::FetchRequest;
use tidelog_protocol::{ErrorCode, Offset};

use super::{OutPart, Outgoing, Response};
use crate::shard::Shard;
use crate::storage::partition::{self, ReadLimit, RecordsPart};

pub async fn fetch(shard: Rc<Shard>, version: i16, cid: i32, req: FetchRequest) -> Response {
    let max_wait = Duration::from_millis(req.max_wait_ms.max(0) as u64)
        .min(Duration::from_millis(shard.config.fetch_max_wait_ms_max));
    let deadline = Instant::now() + max_wait;
    let min_bytes = req.min_bytes.max(0) as usize;
    let max_bytes = if req.max_bytes <= 0 { i32::MAX as usize } else { req.max_bytes as usize };
    loop {
        let notified = shard.hw_notify.notified();
        let collected = collect(&shard, version, &req, max_bytes).await;
        let now = Instant::now();
        if collected.bytes >= min_bytes || collected.any_error || now >= deadline || collected.bytes >= max_bytes {
            return Ok(Some(frame(&shard, version, cid, collected)));
        }
        drop(collected);
        let _ = glommio::timer::timeout(deadline - now, async {
            notified.await;
            Ok(())
        })
        .await;
    }
}

/// The planned response: headers plus each partition's record parts.
struct Collected {
    topics: Vec<TopicHeader>,
    records: Vec<Vec<RecordsPart>>,
    bytes: usize,
    any_error: bool,
}

fn frame(shard: &Shard, version: i16, cid: i32, c: Collected) -> Outgoing {
    let endpoints = if version >= 16 { leader_endpoints(shard, &c.topics) } else { Vec::new() };
    let frame = encode_fetch_frame(version, cid, 0, &c.topics, &endpoints);
    let names = c.topics.iter().flat_map(|t| t.partitions.iter().map(move |p| (&*t.name, p.partition_index)));
    crate::metrics::account_fetch(&shard.metrics, names.zip(c.records.iter()));
    let mut parts = Vec::with_capacity(frame.inline.len() + c.records.len());
    let mut inline = frame.inline.into_iter();
    for records in c.records {
        if let Some(head) = inline.next() {
            parts.push(OutPart::Inline(head));
        }
        for r in records {
            match r {
                RecordsPart::Memory(b) => {
                    shard.fetch_stats.memory_bytes.set(shard.fetch_stats.memory_bytes.get() + b.len() as u64);
                    parts.push(OutPart::Inline(b));
                }
                RecordsPart::File { file, position, len } => {
                    shard.fetch_stats.file_bytes.set(shard.fetch_stats.file_bytes.get() + len);
                    parts.push(OutPart::File { file, position, len });
                }
            }
        }
    }
    parts.extend(inline.map(OutPart::Inline));
    Outgoing::Parts(parts)
}

/// KIP-951: where each `current_leader` of the response is, once per broker.
fn leader_endpoints(shard: &Shard, topics: &[TopicHeader]) -> Vec<NodeEndpoint> {
    let mut leaders: Vec<i32> =
        topics.iter().flat_map(|t| t.partitions.iter().filter_map(|p| p.current_leader.map(|(id, _)| id))).collect();
    if leaders.is_empty() {
        return Vec::new();
    }
    leaders.sort_unstable();
    leaders.dedup();
    let image = shard.image();
    image
        .brokers(&shard.config, shard.num_shards)
        .into_iter()
        .filter(|b| leaders.binary_search(&b.id).is_ok())
        .map(|b| NodeEndpoint { node_id: b.id, host: b.host, port: b.port, rack: b.rack })
        .collect()
}

/// Who is fetching: a consumer, or a follower replica (broker id) with its
/// broker epoch (v15+, KIP-903; -1 before), whose fetch offsets tell the
/// leader how far it has durably got.
fn fetching_replica(version: i16, req: &FetchRequest) -> Option<(i32, i64)> {
    let (id, epoch) = if version >= 15 {
        (req.replica_state.replica_id.0, req.replica_state.replica_epoch)
    } else {
        (req.replica_id.0, -1)
    };
    (id >= 0).then_some((id, epoch))
}

/// Kafka's leader epoch fencing of a fetch (KIP-320): an older epoch than
/// the leader's is FENCED_LEADER_EPOCH, a newer one UNKNOWN_LEADER_EPOCH
/// (the client's metadata is ahead of ours). -1: not checked.
fn epoch_error(current: i32, requested: i32) -> Option<ErrorCode> {
    if requested < 0 || requested == current {
        None
    } else if requested < current {
        Some(ErrorCode::FencedLeaderEpoch)
    } else {
        Some(ErrorCode::UnknownLeaderEpoch)
    }
}

/// A requested partition after the checks that need no I/O: an error (or a
/// diverging epoch) to answer at once, or a log to read from `offset`.
enum Slot {
    Failed(PartitionHeader),
    Read { header: PartitionHeader, log: partition::SharedLog, offset: Offset },
}

/// Plans the response in two steps: first every partition is located at once
/// (the disk reads of batch headers for cold partitions overlap, so one slow
/// partition costs one read, not one per partition in turn), then the byte
/// limits are applied in request order without waiting.
async fn collect(shard: &Rc<Shard>, version: i16, req: &FetchRequest, max_bytes: usize) -> Collected {
    let image = shard.image();
    let replica = fetching_replica(version, req);
    let replica_id = replica.map(|(id, _)| id);
    // Followers replicate everything; isolation is the consumers'. Legacy
    // versions read as read_committed would (see `legacy_read`).
    let legacy = version < 4;
    let read_committed = replica.is_none() && (req.isolation_level == 1 || legacy);
    let limit = if read_committed { ReadLimit::LastStable } else { ReadLimit::HighWatermark };
    let mut c =
        Collected { topics: Vec::with_capacity(req.topics.len()), records: Vec::new(), bytes: 0, any_error: false };
    let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(req.topics.len());
    // Each requested topic's name: from v13 looked up by id ("" when the
    // id is unknown here, which no topic is named).
    let names: Vec<Rc<str>> = req
        .topics
        .iter()
        .map(|t| {
            if version >= 13 {
                shard.topic_name_by_id(&t.topic_id).unwrap_or_else(|| Rc::from(""))
            } else {
                Rc::from(&*t.topic.0)
            }
        })
        .collect();
    for (t, name) in req.topics.iter().zip(&names) {
        let name: &str = name;
        let mut topic_slots = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let mut header = PartitionHeader {
                partition_index: p.partition,
                high_watermark: -1,
                last_stable_offset: -1,
                log_start_offset: -1,
                ..Default::default()
            };
            let code = match image.owner(name, p.partition) {
                None if version >= 13 && name.is_empty() => Some(ErrorCode::UnknownTopicId),
                None => Some(ErrorCode::UnknownTopicOrPartition),
                Some(owner) if owner != shard.id => Some(ErrorCode::NotLeaderOrFollower),
                Some(_) if image.clustered() => {
                    epoch_error(image.leader_epoch(name, p.partition), p.current_leader_epoch)
                }
                Some(_) => None,
            };
            let log = if code.is_none() { shard.log(name, p.partition) } else { None };
            let Some(log) = log else {
                let code = code.unwrap_or(ErrorCode::LeaderNotAvailable);
                if matches!(code, ErrorCode::NotLeaderOrFollower | ErrorCode::FencedLeaderEpoch) {
                    header.current_leader = image
                        .topics
                        .get(name)
                        .and_then(|t| image.partition_state(t, usize::try_from(p.partition).ok()?))
                        .filter(|s| s.leader >= 0)
                        .map(|s| (s.leader, s.leader_epoch));
                }
                header.error_code = code.code();
                topic_slots.push(Slot::Failed(header));
                continue;
            };
            let (hw, lso, leo, start) = {
                let l = log.borrow();
                (l.high_watermark, l.last_stable_offset(), l.log_end_offset(), l.log_start_offset)
            };
            let offset = Offset(p.fetch_offset);
            // KIP-320: a fetcher that says which epoch its log ends in is
            // checked against our epochs first; a diverged one is told where
            // to truncate, and its offset does not count as replicated.
            let epoch_check = if offset >= start {
                crate::replication::check_fetch_epoch(&log, p.last_fetched_epoch, offset)
            } else {
                crate::replication::FetchEpochCheck::Consistent
            };
            if let crate::replication::FetchEpochCheck::Diverging { epoch, end_offset } = epoch_check {
                log::info!(
                    "fetch {name}-{} from {}: offset {} with last fetched epoch {} diverges; our epoch {epoch} ends at {}",
                    p.partition,
                    replica_id.map(|b| format!("broker {b}")).unwrap_or_else(|| "a consumer".to_string()),
                    offset.0,
                    p.last_fetched_epoch,
                    end_offset.0
                );
                header.high_watermark = hw.0;
                header.last_stable_offset = lso.0;
                header.log_start_offset = start.0;
                header.diverging_epoch = Some((epoch, end_offset.0));
                topic_slots.push(Slot::Failed(header));
                continue;
            }
            // No epoch of ours at or below theirs: out of range for a
            // follower (Kafka 3.x). A consumer reads on: its position is
            // checked by offset alone, as before epochs were kept (a log
            // from then has batches but no epoch cache).
            let epoch_undefined = epoch_check == crate::replication::FetchEpochCheck::Undefined && replica.is_some();
            if let Some((broker, broker_epoch)) =
                replica.filter(|_| offset >= start && offset <= leo && !epoch_undefined)
            {
                let key = (name.to_string(), p.partition);
                let seen = crate::replication::Replication::on_replica_fetch(
                    shard,
                    &key,
                    crate::replication::ReplicaFetch {
                        broker,
                        broker_epoch,
                        fetch_offset: offset,
                        leader_epoch: p.current_leader_epoch,
                    },
                );
                if let Err(code) = seen {
                    header.error_code = code.code();
                    topic_slots.push(Slot::Failed(header));
                    continue;
                }
            }
            if offset < start || offset > leo || epoch_undefined {
                log::info!(
                    "fetch {name}-{}: offset {} out of range [{}, {}]{}",
                    p.partition,
                    offset.0,
                    start.0,
                    leo.0,
                    if epoch_undefined {
                        format!(" or last fetched epoch {} older than every epoch here", p.last_fetched_epoch)
                    } else {
                        String::new()
                    }
                );
                header.high_watermark = hw.0;
                header.last_stable_offset = lso.0;
                header.log_start_offset = start.0;
                header.error_code = ErrorCode::OffsetOutOfRange.code();
                topic_slots.push(Slot::Failed(header));
                continue;
            }
            topic_slots.push(Slot::Read { header, log, offset });
        }
        slots.push(topic_slots);
    }
    let located = futures::future::join_all(slots.iter().flatten().map(|slot| async move {
        match slot {
            Slot::Read { log, offset, .. } => Some(match replica {
                Some(_) => crate::replication::locate_for_replica(log, *offset).await,
                None => partition::locate_with(log, *offset, limit).await,
            }),
            Slot::Failed(_) => None,
        }
    }))
    .await;
    let mut located = located.into_iter();
    for ((t, name), topic_slots) in req.topics.iter().zip(names).zip(slots) {
        let mut partitions = Vec::with_capacity(topic_slots.len());
        for (p, slot) in t.partitions.iter().zip(topic_slots) {
            let found = located.next().flatten();
            let (mut header, log, offset) = match slot {
                Slot::Failed(header) => {
                    c.any_error = true;
                    partitions.push(header);
                    c.records.push(Vec::new());
                    continue;
                }
                Slot::Read { header, log, offset } => (header, log, offset),
            };
            let mut budget = (p.partition_max_bytes.max(0) as usize).min(max_bytes.saturating_sub(c.bytes));
            let mut at_least_one = c.bytes == 0;
            // A replica throttled on this leader (reassignment) gets no
            // records while leader.replication.throttled.rate is spent.
            let throttle = replica.and_then(|(follower, _)| {
                let meta = image.topics.get(&*name)?;
                let side = crate::replication::throttle::Side::Leader;
                crate::replication::throttle::rate_for(shard, &image, meta, p.partition, side, follower)
            });
            if throttle.is_some_and(|rate| shard.replication.leader_throttle.spent(rate, std::time::Instant::now())) {
                (budget, at_least_one) = (0, false);
            }
            let read = if budget == 0 && !at_least_one {
                Ok(partition::FetchRead::default())
            } else {
                match found {
                    Some(Ok(l)) => match partition::plan(&log, offset, l, budget, at_least_one) {
                        Some(r) => Ok(r),
                        // The cache moved on since locating: this partition alone, again.
                        None if replica.is_some() => {
                            crate::replication::read_for_replica(&log, offset, budget, at_least_one).await
                        }
                        None => partition::read_for_fetch_with(&log, offset, budget, at_least_one, limit).await,
                    },
                    Some(Err(e)) => Err(e),
                    None => Ok(partition::FetchRead::default()),
                }
            };
            // Read after the read: the data planned is all below these
            // watermarks (they only move up), and the aborted transactions
            // cover it.
            {
                let l = log.borrow();
                let lso = l.last_stable_offset();
                header.high_watermark = l.high_watermark.0;
                header.last_stable_offset = lso.0;
                header.log_start_offset = l.log_start_offset.0;
                if read_committed && read.as_ref().is_ok_and(|r| r.bytes > 0) {
                    // Kafka's bound is an index entry at or past the end of
                    // what was read; the LSO is one too (extra entries past
                    // the records are ignored by clients).
                    header.aborted_transactions =
                        l.aborted_txns(offset, lso).into_iter().map(|(pid, first)| (pid.0, first.0)).collect();
                }
            }
            let read = match read {
                Ok(r) if legacy && replica.is_none() => {
                    let aborted = std::mem::take(&mut header.aborted_transactions);
                    let magic = if version >= 2 { 1 } else { 0 };
                    let want = LegacyRead { offset, budget, at_least_one, magic, limit };
                    legacy_read(&log, r, want, &aborted).await
                }
                other => other,
            };
            match read {
                Ok(r) => {
                    let stats = &shard.fetch_stats.located_bytes;
                    stats.set(stats.get() + r.located_bytes as u64);
                    c.bytes += r.bytes;
                    header.records_bytes = r.bytes;
                    if let Some(rate) = throttle {
                        shard.replication.leader_throttle.take(r.bytes, rate, std::time::Instant::now());
                    }
                    c.records.push(r.parts);
                }
                Err(e) => {
                    log::error!("fetch {name}-{} at offset {}: read failed: {e}", p.partition, offset.0);
                    c.any_error = true;
                    header.error_code = ErrorCode::KafkaStorageError.code();
                    c.records.push(Vec::new());
                }
            }
            partitions.push(header);
        }
        c.topics.push(TopicHeader { name, id: *t.topic_id.as_bytes(), partitions });
    }
    c
}

/// What a legacy (v0–v3) fetch of one partition asks for.
struct LegacyRead {
    offset: Offset,
    budget: usize,
    at_least_one: bool,
    magic: i8,
    limit: ReadLimit,
}

/// How many v2 reads one legacy partition may take to find a record an
/// old client can see (past aborted transactions and markers) before it
/// answers with none.
const LEGACY_READS_MAX: usize = 8;

/// The copying path of Fetch v0–v3: `first` (a v2 read at `want.offset`)
/// is brought into memory and down-converted (`storage::legacy`) to
/// `want.magic`. The converted bytes cannot go out with sendfile, so this
/// is never the zero-copy path; memory per partition is the v2 read (at
/// most the budget, or one batch) plus the converted output (at most the
/// budget, or one message). When everything read was filtered out
/// (control batches, aborted records) the next batches are read, a few
/// times at most, so an old consumer is not stuck behind them.
async fn legacy_read(
    log: &partition::SharedLog,
    first: partition::FetchRead,
    mut want: LegacyRead,
    aborted: &[(i64, i64)],
) -> std::io::Result<partition::FetchRead> {
    let mut read = first;
    let mut located_bytes = 0;
    for attempt in 0..LEGACY_READS_MAX {
        if attempt > 0 {
            read = partition::read_for_fetch_with(log, want.offset, want.budget, want.at_least_one, want.limit).await?;
        }
        located_bytes += read.located_bytes;
        if read.bytes == 0 {
            break;
        }
        let raw = materialize(std::mem::take(&mut read.parts), read.bytes).await?;
        let converted = crate::storage::legacy::down_convert(
            &raw,
            want.magic,
            want.offset.0,
            want.budget,
            want.at_least_one,
            aborted,
        );
        if !converted.is_empty() {
            let bytes = converted.len();
            return Ok(partition::FetchRead {
                parts: vec![RecordsPart::Memory(converted.freeze())],
                bytes,
                located_bytes,
            });
        }
        // Nothing an old client may see: read on from past these batches.
        let Some(next) = last_offset(&raw).map(|o| Offset(o + 1)) else { break };
        if next <= want.offset {
            break;
        }
        want.offset = next;
    }
    Ok(partition::FetchRead { parts: Vec::new(), bytes: 0, located_bytes })
}

/// The last offset of the last whole batch in `raw`.
fn last_offset(raw: &[u8]) -> Option<i64> {
    let mut at = 0;
    let mut last = None;
    while let Some(Ok(h)) = raw.get(at..).map(tidelog_protocol::batch::BatchHeader::parse) {
        if h.size_bytes() == 0 || at + h.size_bytes() > raw.len() {
            break;
        }
        last = Some(h.last_offset().0);
        at += h.size_bytes();
    }
    last
}

/// The bytes of a read's parts, in order: memory parts copied, file
/// regions read with pread on the executor's blocking pool (a cold region
/// may be a disk read, which a shard thread must not wait on).
async fn materialize(parts: Vec<RecordsPart>, bytes: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes);
    for p in parts {
        match p {
            RecordsPart::Memory(b) => out.extend_from_slice(&b),
            RecordsPart::File { file, position, len } => {
                let region = glommio::executor()
                    .spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                        let len = usize::try_from(len).map_err(|_| std::io::Error::other("region too large"))?;
                        let mut buf = vec![0u8; len];
                        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, position)?;
                        Ok(buf)
                    })
                    .await?;
                out.extend_from_slice(&region);
            }
        }
    }
    Ok(out)
}
