//! Idempotent producer state: per partition, each producer id's epoch, last
//! sequence and its last 5 batches (first/last sequence, base/last offset),
//! so a retried batch is answered with its original offsets instead of being
//! written twice, and a gap or an old epoch is refused as Kafka refuses it.
//! Also the per-shard producer id allocator.
//!
//! Transactions (KIP-98, Kafka's `ProducerStateManager`): a producer's
//! first transactional batch on this partition starts its ongoing
//! transaction (`txn_first_offset`); a marker (control batch, COMMIT or
//! ABORT, written by the coordinator through `PartitionLog::append_txn_marker`)
//! ends it. An ended transaction stays *unstable* until its marker is under
//! the high watermark; the first unstable offset bounds the last stable
//! offset (LSO) that read_committed consumers read up to. An ABORT adds
//! {producer, first offset, marker offset} to the aborted list, which
//! read_committed fetches return for the range they read. A marker with a
//! newer producer epoch bumps the producer's epoch here, fencing a zombie.
//! `replay` applies markers exactly as the live append does, so followers
//! and restarted brokers reach the same state.
//!
//! Shard-local: a `ProducerStateTable` is a field of its `PartitionLog` (on
//! the owning shard); a `PidAllocator` belongs to one shard.
//!
//! Durability: the table is rebuilt at open from a snapshot plus the batch
//! headers after it (`rebuild`). The snapshot
//! (`<partition dir>/producer-state.snapshot`) only ever describes durable
//! data: it is written when nothing is pending (periodically and at
//! shutdown) and ignored when it claims more than recovery kept. Without a
//! usable snapshot the whole log is scanned.
//!
//! ```text
//! snapshot = "TLPS" | u16 version (2) | i64 covered_to | u32 count | entries
//!            | u32 aborted count | aborted | u32 crc32c (of all before)
//! entry    = i64 pid | i16 epoch | i32 last seq | i64 last timestamp | u8 n | n x (i32 first seq
//!            | i32 last seq | i64 base offset | i64 last offset)
//!            | i32 coordinator epoch | i64 ongoing txn first offset (-1: none)     (v2 only)
//! aborted  = i64 pid | i64 first offset | i64 last offset (the marker) | i64 LSO when it ended
//! ```
//! Version 1 (no transaction fields, no aborted list) is still read.
//!
//! Producer ids: `shard << 40 | counter`, so shards never collide without
//! talking; the counter is reserved in blocks of 1000 in
//! `<log.dirs>/producer-ids-<shard>` (written durably before a block is
//! used), so ids are unique across restarts and crashes.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;

use bytes::{Buf, BufMut, BytesMut};
use tidelog_protocol::batch::{self, BatchHeader, BatchInfo, ControlType};
use tidelog_protocol::{ErrorCode, Offset, ProducerId, ShardId};

use super::partition::{self, SharedLog};

/// Batches remembered per producer for duplicate detection (Kafka's 5,
/// matching max.in.flight.requests.per.connection for idempotence).
pub const BATCHES_KEPT: usize = 5;
pub const SNAPSHOT_FILE: &str = "producer-state.snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"TLPS";
const SNAPSHOT_VERSION: u16 = 2;
const SNAPSHOT_VERSION_V1: u16 = 1;
/// Producers remembered per partition at most; the least recently active
/// are dropped beyond it.
pub const PRODUCERS_MAX: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: Offset,
    pub last_offset: Offset,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub last_seq: i32,
    pub last_timestamp_ms: i64,
    pub batches: VecDeque<BatchMeta>,
    /// The coordinator epoch of the last marker for this producer (-1: none);
    /// a marker from an older coordinator is refused.
    pub coordinator_epoch: i32,
    /// First offset of the producer's ongoing transaction on this partition.
    pub txn_first_offset: Option<Offset>,
}

impl ProducerEntry {
    fn new(epoch: i16, timestamp_ms: i64) -> ProducerEntry {
        ProducerEntry {
            epoch,
            last_seq: -1,
            last_timestamp_ms: timestamp_ms,
            batches: VecDeque::new(),
            coordinator_epoch: -1,
            txn_first_offset: None,
        }
    }
}

/// Where a batch starts: its segment (by base offset) and byte position in
/// that segment's file. Known for the first batch of every unstable
/// transaction, so that a read_committed read can stop in the middle of
/// durable data without reading headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPosition {
    pub segment_base: Offset,
    pub position: u64,
}

/// A transaction whose marker is written: unstable until the marker is
/// under the high watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletedTxn {
    pub pid: ProducerId,
    pub first_offset: Offset,
    /// The marker's offset.
    pub last_offset: Offset,
    pub position: Option<BatchPosition>,
}

/// An aborted transaction, as read_committed fetches report it (Kafka's
/// `AbortedTxn` of the transaction index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortedTxn {
    pub pid: ProducerId,
    pub first_offset: Offset,
    /// The ABORT marker's offset.
    pub last_offset: Offset,
    /// The LSO right after this transaction ended: every transaction that
    /// ends later starts at or after it (ends the overlap search early).
    pub last_stable_offset: Offset,
}

/// Ongoing transactions (first offset, producer, position) and the aborted list.
#[cfg(test)]
pub type TxnState = (Vec<(Offset, ProducerId, Option<BatchPosition>)>, Vec<AbortedTxn>);

/// What to do with an incoming batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Not idempotent, or next in sequence: append it.
    Append,
    /// A retry of a batch already in the log: answer with these offsets.
    Duplicate {
        base_offset: Offset,
        last_offset: Offset,
    },
    Reject(ErrorCode),
}

/// Kafka's sequence arithmetic: sequences wrap from i32::MAX to 0.
pub fn seq_add(seq: i32, delta: i32) -> i32 {
    if seq > i32::MAX - delta {
        delta - (i32::MAX - seq) - 1
    } else {
        seq + delta
    }
}

#[derive(Debug, Default)]
pub struct ProducerStateTable {
    producers: HashMap<ProducerId, ProducerEntry>,
    /// Ongoing transactions by first offset (and producer: a damaged log
    /// may repeat an offset), with where their first batch is.
    ongoing: BTreeMap<(Offset, ProducerId), Option<BatchPosition>>,
    /// Ended transactions whose marker may not be under the high watermark
    /// yet, in marker order (pruned by `on_high_watermark`).
    unstable: VecDeque<CompletedTxn>,
    /// Aborted transactions in marker order, down to the log start offset.
    aborted: VecDeque<AbortedTxn>,
    /// Changed since the last snapshot.
    pub dirty: bool,
}

impl ProducerStateTable {
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn get(&self, pid: ProducerId) -> Option<&ProducerEntry> {
        self.producers.get(&pid)
    }

    /// Kafka's checks for a non-transactional batch of `count` records
    /// from `pid`/`epoch` starting at sequence `first_seq`.
    pub fn check(&self, pid: ProducerId, epoch: i16, first_seq: i32, count: i32) -> Check {
        self.check_batch(pid, epoch, first_seq, count, false)
    }

    /// `check` for a batch that is `transactional` or not: a producer with an
    /// ongoing transaction here may only write transactional batches
    /// (INVALID_TXN_STATE otherwise, as Kafka's `ProducerAppendInfo`).
    pub fn check_batch(&self, pid: ProducerId, epoch: i16, first_seq: i32, count: i32, transactional: bool) -> Check {
        if pid.0 < 0 {
            return Check::Append;
        }
        let check = self.check_sequence(pid, epoch, first_seq, count);
        if check == Check::Append && !transactional {
            if let Some(e) = self.producers.get(&pid) {
                if e.txn_first_offset.is_some() {
                    return Check::Reject(ErrorCode::InvalidTxnState);
                }
            }
        }
        check
    }

    fn check_sequence(&self, pid: ProducerId, epoch: i16, first_seq: i32, count: i32) -> Check {
        let last_seq = seq_add(first_seq, count.max(1) - 1);
        let Some(e) = self.producers.get(&pid) else {
            // Unknown producer: it must start at 0 (KIP-360: else UNKNOWN_PRODUCER_ID,
            // and the client bumps its epoch and starts over).
            return if first_seq == 0 { Check::Append } else { Check::Reject(ErrorCode::UnknownProducerId) };
        };
        if epoch < e.epoch {
            return Check::Reject(ErrorCode::InvalidProducerEpoch);
        }
        if epoch > e.epoch {
            return if first_seq == 0 { Check::Append } else { Check::Reject(ErrorCode::OutOfOrderSequenceNumber) };
        }
        if let Some(b) = e.batches.iter().find(|b| b.first_seq == first_seq && b.last_seq == last_seq) {
            return Check::Duplicate { base_offset: b.base_offset, last_offset: b.last_offset };
        }
        if first_seq == seq_add(e.last_seq, 1) {
            Check::Append
        } else {
            Check::Reject(ErrorCode::OutOfOrderSequenceNumber)
        }
    }

    /// Records an appended batch (after `check` said Append, or on replay).
    pub fn record(&mut self, pid: ProducerId, epoch: i16, meta: BatchMeta, timestamp_ms: i64) {
        if pid.0 < 0 {
            return;
        }
        let e = self.entry_mut(pid, epoch, timestamp_ms);
        if epoch != e.epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
        e.last_seq = meta.last_seq;
        e.last_timestamp_ms = e.last_timestamp_ms.max(timestamp_ms);
        e.batches.push_back(meta);
        while e.batches.len() > BATCHES_KEPT {
            e.batches.pop_front();
        }
        self.dirty = true;
    }

    /// The entry of `pid`, created (at `epoch`) if it has none; the least
    /// recently active producer without an ongoing transaction makes room
    /// beyond `PRODUCERS_MAX`.
    fn entry_mut(&mut self, pid: ProducerId, epoch: i16, timestamp_ms: i64) -> &mut ProducerEntry {
        if !self.producers.contains_key(&pid) && self.producers.len() >= PRODUCERS_MAX {
            self.evict_oldest();
        }
        self.producers.entry(pid).or_insert_with(|| ProducerEntry::new(epoch, timestamp_ms))
    }

    /// A transactional (non-control) batch of `pid` at `first_offset` was
    /// appended (at `position`, when known): it starts the producer's
    /// transaction here unless one is ongoing. Sequence state is `record`'s.
    pub fn begin_txn_batch(
        &mut self,
        pid: ProducerId,
        epoch: i16,
        first_offset: Offset,
        timestamp_ms: i64,
        position: Option<BatchPosition>,
    ) {
        if pid.0 < 0 {
            return;
        }
        let e = self.entry_mut(pid, epoch, timestamp_ms);
        if e.txn_first_offset.is_none() {
            e.txn_first_offset = Some(first_offset);
            self.ongoing.insert((first_offset, pid), position);
            self.dirty = true;
        }
    }

    /// Whether a marker from `pid`/`epoch` written by a coordinator at
    /// `coordinator_epoch` may be appended: Kafka refuses an older producer
    /// epoch (INVALID_PRODUCER_EPOCH) and an older coordinator epoch
    /// (TRANSACTION_COORDINATOR_FENCED).
    pub fn check_marker(&self, pid: ProducerId, epoch: i16, coordinator_epoch: i32) -> Result<(), ErrorCode> {
        let Some(e) = self.producers.get(&pid) else { return Ok(()) };
        if epoch < e.epoch {
            return Err(ErrorCode::InvalidProducerEpoch);
        }
        if coordinator_epoch < e.coordinator_epoch {
            return Err(ErrorCode::TransactionCoordinatorFenced);
        }
        Ok(())
    }

    /// A marker of `pid` at `marker_offset` was appended: ends the
    /// producer's ongoing transaction (if any; a marker for a producer with
    /// none here is written all the same and changes only its epochs), and
    /// for an ABORT enters it in the aborted list. A newer producer epoch
    /// replaces the producer's (its remembered batches go, as Kafka's).
    /// Returns the transaction it ended.
    pub fn end_txn(
        &mut self,
        pid: ProducerId,
        epoch: i16,
        coordinator_epoch: i32,
        control: ControlType,
        marker_offset: Offset,
        timestamp_ms: i64,
    ) -> Option<CompletedTxn> {
        if pid.0 < 0 {
            return None;
        }
        self.dirty = true;
        let e = self.entry_mut(pid, epoch, timestamp_ms);
        if epoch > e.epoch {
            e.epoch = epoch;
            e.last_seq = -1;
            e.batches.clear();
        }
        e.coordinator_epoch = coordinator_epoch;
        e.last_timestamp_ms = e.last_timestamp_ms.max(timestamp_ms);
        let first_offset = e.txn_first_offset.take()?;
        let position = self.ongoing.remove(&(first_offset, pid)).flatten();
        let done = CompletedTxn { pid, first_offset, last_offset: marker_offset, position };
        self.unstable.push_back(done);
        if control == ControlType::Abort {
            let lso = self.ongoing.keys().next().map_or(marker_offset.next(), |k| k.0).min(marker_offset.next());
            self.aborted.push_back(AbortedTxn {
                pid,
                first_offset,
                last_offset: marker_offset,
                last_stable_offset: lso,
            });
        }
        Some(done)
    }

    /// The high watermark moved to `hw`: transactions whose marker is now
    /// under it are stable.
    pub fn on_high_watermark(&mut self, hw: Offset) {
        while self.unstable.front().is_some_and(|t| t.last_offset < hw) {
            self.unstable.pop_front();
        }
    }

    /// The log start offset moved to `start`: aborted transactions whose
    /// marker is below it are forgotten (retention, DeleteRecords).
    pub fn on_log_start(&mut self, start: Offset) {
        while self.aborted.front().is_some_and(|t| t.last_offset < start) {
            self.aborted.pop_front();
            self.dirty = true;
        }
        while self.unstable.front().is_some_and(|t| t.last_offset < start) {
            self.unstable.pop_front();
        }
    }

    /// The first offset not yet stable with the high watermark at `hw`:
    /// the first offset of the oldest ongoing transaction, or of the oldest
    /// ended one whose marker is not under `hw`; with where its batch is.
    pub fn first_unstable(&self, hw: Offset) -> Option<(Offset, Option<BatchPosition>)> {
        let ongoing = self.ongoing.iter().next().map(|(k, position)| (k.0, *position));
        let ended = self
            .unstable
            .iter()
            .filter(|t| t.last_offset >= hw)
            .map(|t| (t.first_offset, t.position))
            .min_by_key(|t| t.0);
        match (ongoing, ended) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// The transaction state, for tests to compare: ongoing transactions
    /// (first offset, producer, position) and the aborted list.
    #[cfg(test)]
    pub fn txn_state(&self) -> TxnState {
        (
            self.ongoing.iter().map(|(k, position)| (k.0, k.1, *position)).collect(),
            self.aborted.iter().copied().collect(),
        )
    }

    /// Transactions ongoing on this partition.
    pub fn ongoing_txns(&self) -> usize {
        self.ongoing.len()
    }

    /// Aborted transactions a read of `[from, upper)` must report, as Kafka's
    /// `collectAbortedTxns`: every one whose marker is at or after `from` and
    /// that starts before `upper`, oldest marker first.
    pub fn aborted_overlapping(&self, from: Offset, upper: Offset) -> Vec<AbortedTxn> {
        let start = self.aborted.partition_point(|t| t.last_offset < from);
        let mut out = Vec::new();
        for t in self.aborted.iter().skip(start) {
            if t.first_offset < upper {
                out.push(*t);
            }
            if t.last_stable_offset >= upper {
                break;
            }
        }
        out
    }

    /// The aborted list, oldest marker first.
    pub fn aborted(&self) -> impl Iterator<Item = &AbortedTxn> {
        self.aborted.iter()
    }

    /// First offsets of the unstable transactions (ongoing, and ended with
    /// the marker not yet under the high watermark) whose position is unknown.
    pub fn unpositioned_txns(&self) -> Vec<Offset> {
        let ongoing = self.ongoing.iter().filter(|(_, position)| position.is_none()).map(|(k, _)| k.0);
        ongoing.chain(self.unstable.iter().filter(|t| t.position.is_none()).map(|t| t.first_offset)).collect()
    }

    /// Records where the first batch of the transaction starting at `first_offset` is.
    pub fn set_txn_position(&mut self, first_offset: Offset, position: BatchPosition) {
        let at = (first_offset, ProducerId(i64::MIN))..=(first_offset, ProducerId(i64::MAX));
        for (_, p) in self.ongoing.range_mut(at) {
            *p = Some(position);
        }
        for t in self.unstable.iter_mut().filter(|t| t.first_offset == first_offset) {
            t.position = Some(position);
        }
    }

    /// Replays one batch header from the log (its position unknown).
    pub fn replay(&mut self, h: &BatchHeader<'_>) {
        self.replay_at(h, None)
    }

    /// Replays one batch from the log, as its append did: sequence state,
    /// the start of a transaction (at `position` when known), and markers.
    /// `h` must view the whole batch for a marker to be read.
    pub fn replay_at(&mut self, h: &BatchHeader<'_>, position: Option<BatchPosition>) {
        let pid = h.producer_id();
        if pid.0 < 0 {
            return;
        }
        if h.is_control() {
            // An unreadable control batch (not a marker, or emptied) changes nothing, as in Kafka.
            if let Some((control, coordinator_epoch)) = batch::control_record_type(h.as_bytes()) {
                let epoch = h.producer_epoch();
                self.end_txn(pid, epoch, coordinator_epoch, control, h.base_offset(), h.max_timestamp_ms());
            }
            return;
        }
        if h.is_transactional() {
            self.begin_txn_batch(pid, h.producer_epoch(), h.base_offset(), h.max_timestamp_ms(), position);
        }
        // Header fields off the disk or the wire: no overflow on hostile values.
        if h.last_offset_delta() < 0 {
            return;
        }
        let count = h.last_offset_delta().saturating_add(1);
        let meta = BatchMeta {
            first_seq: h.base_sequence(),
            last_seq: seq_add(h.base_sequence(), count - 1),
            base_offset: h.base_offset(),
            last_offset: h.last_offset(),
        };
        self.record(pid, h.producer_epoch(), meta, h.max_timestamp_ms());
    }

    /// Drops producers idle for longer than `expiration_ms` (producer.id.expiration.ms).
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) {
        let before = self.producers.len();
        // Kafka never expires a producer with an ongoing transaction.
        self.producers.retain(|_, e| e.txn_first_offset.is_some() || now_ms - e.last_timestamp_ms < expiration_ms);
        if self.producers.len() != before {
            self.dirty = true;
        }
    }

    fn evict_oldest(&mut self) {
        let idle = self.producers.iter().filter(|(_, e)| e.txn_first_offset.is_none());
        if let Some(pid) = idle.min_by_key(|(_, e)| e.last_timestamp_ms).map(|(p, _)| *p) {
            self.producers.remove(&pid);
        }
    }

    pub fn encode_snapshot(&self, covered_to: Offset) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_slice(SNAPSHOT_MAGIC);
        b.put_u16(SNAPSHOT_VERSION);
        b.put_i64(covered_to.0);
        b.put_u32(self.producers.len() as u32);
        let mut pids: Vec<&ProducerId> = self.producers.keys().collect();
        pids.sort();
        for pid in pids {
            let e = &self.producers[pid];
            b.put_i64(pid.0);
            b.put_i16(e.epoch);
            b.put_i32(e.last_seq);
            b.put_i64(e.last_timestamp_ms);
            b.put_u8(e.batches.len() as u8);
            for m in &e.batches {
                b.put_i32(m.first_seq);
                b.put_i32(m.last_seq);
                b.put_i64(m.base_offset.0);
                b.put_i64(m.last_offset.0);
            }
            b.put_i32(e.coordinator_epoch);
            b.put_i64(e.txn_first_offset.map_or(-1, |o| o.0));
        }
        b.put_u32(self.aborted.len() as u32);
        for t in &self.aborted {
            b.put_i64(t.pid.0);
            b.put_i64(t.first_offset.0);
            b.put_i64(t.last_offset.0);
            b.put_i64(t.last_stable_offset.0);
        }
        let crc = crc32c::crc32c(&b);
        b.put_u32(crc);
        b.to_vec()
    }

    /// Decodes a snapshot; `None` when it is damaged (it is then ignored).
    pub fn decode_snapshot(bytes: &[u8]) -> Option<(ProducerStateTable, Offset)> {
        if bytes.len() < 4 + 2 + 8 + 4 + 4 {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return None;
        }
        let mut b = body;
        if &b[..4] != SNAPSHOT_MAGIC {
            return None;
        }
        b.advance(4);
        let version = b.get_u16();
        if version != SNAPSHOT_VERSION && version != SNAPSHOT_VERSION_V1 {
            return None;
        }
        let v2 = version == SNAPSHOT_VERSION;
        let covered_to = Offset(b.get_i64());
        let count = b.get_u32() as usize;
        let mut table = ProducerStateTable::default();
        for _ in 0..count {
            if b.remaining() < 8 + 2 + 4 + 8 + 1 {
                return None;
            }
            let pid = ProducerId(b.get_i64());
            let epoch = b.get_i16();
            let last_seq = b.get_i32();
            let last_timestamp_ms = b.get_i64();
            let n = b.get_u8() as usize;
            if b.remaining() < n * 24 {
                return None;
            }
            let batches = (0..n)
                .map(|_| BatchMeta {
                    first_seq: b.get_i32(),
                    last_seq: b.get_i32(),
                    base_offset: Offset(b.get_i64()),
                    last_offset: Offset(b.get_i64()),
                })
                .collect();
            let mut entry =
                ProducerEntry { epoch, last_seq, last_timestamp_ms, batches, ..ProducerEntry::new(epoch, 0) };
            if v2 {
                if b.remaining() < 4 + 8 {
                    return None;
                }
                entry.coordinator_epoch = b.get_i32();
                let first = b.get_i64();
                if first >= 0 {
                    entry.txn_first_offset = Some(Offset(first));
                    table.ongoing.insert((Offset(first), pid), None);
                }
            }
            table.producers.insert(pid, entry);
        }
        if v2 {
            if b.remaining() < 4 {
                return None;
            }
            let n = b.get_u32() as usize;
            if b.remaining() != n.checked_mul(32)? {
                return None;
            }
            for _ in 0..n {
                table.aborted.push_back(AbortedTxn {
                    pid: ProducerId(b.get_i64()),
                    first_offset: Offset(b.get_i64()),
                    last_offset: Offset(b.get_i64()),
                    last_stable_offset: Offset(b.get_i64()),
                });
            }
        }
        (b.remaining() == 0).then_some((table, covered_to))
    }
}

/// The producer fields of an idempotent produce record set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdempotentBatch {
    pub pid: ProducerId,
    pub epoch: i16,
    pub first_seq: i32,
    pub count: i32,
    pub max_timestamp_ms: i64,
}

/// `Some` when the (validated) record set comes from an idempotent
/// producer. Like Kafka, such a record set must be exactly one batch.
pub fn idempotent_batch(records: &[u8], infos: &[BatchInfo]) -> Result<Option<IdempotentBatch>, String> {
    let Ok(h) = BatchHeader::parse(records) else { return Ok(None) };
    if h.producer_id().0 < 0 {
        return Ok(None);
    }
    if infos.len() != 1 {
        return Err(format!("an idempotent producer must send one batch per partition, got {}", infos.len()));
    }
    if h.base_sequence() < 0 {
        return Err(format!("idempotent batch with invalid base sequence {}", h.base_sequence()));
    }
    Ok(Some(IdempotentBatch {
        pid: h.producer_id(),
        epoch: h.producer_epoch(),
        first_seq: h.base_sequence(),
        count: infos[0].last_offset_delta + 1,
        max_timestamp_ms: infos[0].max_timestamp_ms,
    }))
}

/// Rebuilds a log's producer state (at open, and after a truncation): the
/// snapshot if it is usable, then every batch header from there to the
/// durable end, then the batches still pending.
pub async fn rebuild(log: &SharedLog) -> io::Result<()> {
    let (path, start, hw, visible) = {
        let l = log.borrow();
        (l.dir.join(SNAPSHOT_FILE), l.log_start_offset, l.durable_end, l.high_watermark)
    };
    let snapshot = glommio::executor()
        .spawn_blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
    let (mut table, offset) = match snapshot.as_deref().map(ProducerStateTable::decode_snapshot) {
        Some(Some((t, covered))) if covered <= hw && covered >= start => (t, covered),
        Some(_) => {
            log::warn!(
                "{}: producer state snapshot unusable; rebuilding from the whole log",
                log.borrow().dir.display()
            );
            (ProducerStateTable::default(), start)
        }
        None => (ProducerStateTable::default(), start),
    };
    // Aborted transactions whose marker retention or DeleteRecords removed since the snapshot.
    table.on_log_start(start);
    let from = offset;
    // Transactions whose marker is under the high watermark are stable:
    // dropping them as we go (at open, every durable one) keeps a whole-log
    // replay from holding, and then locating, each of them.
    let batches = if offset < hw {
        partition::for_each_durable_batch(log, offset, |h| {
            table.replay(h);
            table.on_high_watermark(visible);
        })
        .await?
    } else {
        0
    };
    table.dirty = batches > 0;
    {
        let mut l = log.borrow_mut();
        l.for_each_pending(|h| {
            table.replay(h);
            table.dirty = true;
        });
        if !table.is_empty() {
            log::info!(
                "{}-{}: producer state of {} producer(s) rebuilt ({batches} batch header(s) from offset {}; {} open transaction(s))",
                l.topic,
                l.partition.0,
                table.len(),
                from.0,
                table.ongoing_txns()
            );
        }
        l.producers = table;
    }
    // Replayed headers come without positions: find where each unstable transaction starts.
    partition::locate_txn_starts(log).await
}

/// Writes the snapshot of a log whose appends are all durable (skipped
/// otherwise: a snapshot must never describe data a crash can take back).
pub async fn snapshot(log: &SharedLog) -> io::Result<bool> {
    let (bytes, dir) = {
        let l = log.borrow();
        if !l.producers.dirty || l.needs_flush() || l.log_end_offset() != l.durable_end {
            return Ok(false);
        }
        (l.producers.encode_snapshot(l.durable_end), l.dir.clone())
    };
    log.borrow_mut().producers.dirty = false;
    let written = glommio::executor().spawn_blocking(move || write_durably(&dir, SNAPSHOT_FILE, &bytes)).await;
    if written.is_err() {
        log.borrow_mut().producers.dirty = true;
    }
    written.map(|_| true)
}

/// After a truncation to `end`: deletes the snapshot if it describes data
/// past `end` (blocking), so it is never applied to a log that grew back
/// with other batches. Returns whether it deleted it.
pub fn discard_snapshot_past(dir: &std::path::Path, end: Offset) -> io::Result<bool> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match ProducerStateTable::decode_snapshot(&bytes) {
        Some((_, covered_to)) if covered_to <= end => Ok(false),
        _ => {
            std::fs::remove_file(&path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(true)
        }
    }
}

/// temp file, fdatasync, rename, directory fsync. Blocking.
fn write_durably(dir: &std::path::Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Producer ids of one shard: `shard << 40 | counter`, reserved in blocks.
pub struct PidAllocator {
    shard: ShardId,
    path: PathBuf,
    next: Cell<i64>,
    reserved_to: Cell<i64>,
    loaded: Cell<bool>,
    /// Held while the counter file is read or a block is reserved.
    reserving: glommio::sync::Semaphore,
}

const PID_SHARD_SHIFT: u32 = 40;
const PID_BLOCK: i64 = 1000;

impl PidAllocator {
    pub fn new(shard: ShardId, log_dir: &std::path::Path) -> PidAllocator {
        PidAllocator {
            shard,
            path: log_dir.join(format!("producer-ids-{}", shard.0)),
            next: Cell::new(0),
            reserved_to: Cell::new(0),
            loaded: Cell::new(false),
            reserving: glommio::sync::Semaphore::new(1),
        }
    }

    /// A producer id never handed out before by this data dir.
    pub async fn allocate(&self) -> io::Result<ProducerId> {
        loop {
            let next = self.next.get();
            if self.loaded.get() && next < self.reserved_to.get() {
                self.next.set(next + 1);
                return Ok(ProducerId(((self.shard.0 as i64) << PID_SHARD_SHIFT) | next));
            }
            // One load or reservation at a time: two concurrent ones would
            // write the same temporary file and one rename would fail.
            let _permit = self
                .reserving
                .acquire_permit(1)
                .await
                .map_err(|e| io::Error::other(format!("producer id reservation: {e}")))?;
            if self.loaded.get() && self.next.get() < self.reserved_to.get() {
                continue;
            }
            if !self.loaded.get() {
                let path = self.path.clone();
                let stored = glommio::executor()
                    .spawn_blocking(move || match std::fs::read_to_string(&path) {
                        Ok(s) => s.trim().parse::<i64>().map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
                        }),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
                        Err(e) => Err(e),
                    })
                    .await?;
                self.next.set(stored);
                self.reserved_to.set(stored);
                self.loaded.set(true);
                continue;
            }
            let to = self.reserved_to.get() + PID_BLOCK;
            if to >= 1i64 << PID_SHARD_SHIFT {
                return Err(io::Error::other("producer id space of this shard is exhausted"));
            }
            let dir = self.path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            glommio::executor().spawn_blocking(move || write_durably(&dir, &name, to.to_string().as_bytes())).await?;
            self.reserved_to.set(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(first: i32, last: i32, base: i64) -> BatchMeta {
        BatchMeta {
            first_seq: first,
            last_seq: last,
            base_offset: Offset(base),
            last_offset: Offset(base + (last - first) as i64),
        }
    }

    #[test]
    fn sequence_checks_follow_kafka() {
        let mut t = ProducerStateTable::default();
        let p = ProducerId(7);
        assert_eq!(t.check(p, 0, 5, 1), Check::Reject(ErrorCode::UnknownProducerId));
        assert_eq!(t.check(p, 0, 0, 3), Check::Append);
        t.record(p, 0, meta(0, 2, 100), 1);
        // Retry of the same batch: its original offsets.
        assert_eq!(t.check(p, 0, 0, 3), Check::Duplicate { base_offset: Offset(100), last_offset: Offset(102) });
        assert_eq!(t.check(p, 0, 3, 2), Check::Append);
        assert_eq!(t.check(p, 0, 4, 2), Check::Reject(ErrorCode::OutOfOrderSequenceNumber));
        t.record(p, 0, meta(3, 4, 103), 2);
        // Older epoch fenced, newer epoch must restart at 0.
        assert_eq!(t.check(p, -1, 5, 1), Check::Reject(ErrorCode::InvalidProducerEpoch));
        assert_eq!(t.check(p, 1, 5, 1), Check::Reject(ErrorCode::OutOfOrderSequenceNumber));
        assert_eq!(t.check(p, 1, 0, 1), Check::Append);
        t.record(p, 1, meta(0, 0, 105), 3);
        assert_eq!(t.check(p, 0, 5, 1), Check::Reject(ErrorCode::InvalidProducerEpoch));
        assert_eq!(t.check(ProducerId(-1), -1, -1, 10), Check::Append);
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut t = ProducerStateTable::default();
        let p = ProducerId(1);
        for i in 0..7 {
            t.record(p, 0, meta(i, i, i as i64), 0);
        }
        assert_eq!(t.get(p).map(|e| e.batches.len()), Some(BATCHES_KEPT));
        assert!(matches!(t.check(p, 0, 6, 1), Check::Duplicate { .. }));
        assert!(matches!(t.check(p, 0, 2, 1), Check::Duplicate { .. }));
        // Older than the window: out of order (Kafka does the same).
        assert_eq!(t.check(p, 0, 1, 1), Check::Reject(ErrorCode::OutOfOrderSequenceNumber));
    }

    #[test]
    fn sequence_wraps() {
        assert_eq!(seq_add(i32::MAX, 1), 0);
        assert_eq!(seq_add(i32::MAX - 1, 3), 1);
        let mut t = ProducerStateTable::default();
        t.record(ProducerId(1), 0, meta(i32::MAX - 1, i32::MAX, 0), 0);
        assert_eq!(t.check(ProducerId(1), 0, 0, 1), Check::Append);
    }

    #[test]
    fn snapshot_roundtrip_and_damage() {
        let mut t = ProducerStateTable::default();
        t.record(ProducerId(3), 2, meta(0, 9, 50), 77);
        t.record(ProducerId(4), 0, meta(0, 0, 60), 78);
        let snap = t.encode_snapshot(Offset(61));
        let (back, covered) = ProducerStateTable::decode_snapshot(&snap).expect("valid");
        assert_eq!(covered, Offset(61));
        assert_eq!(back.get(ProducerId(3)), t.get(ProducerId(3)));
        assert_eq!(back.get(ProducerId(4)), t.get(ProducerId(4)));
        assert_eq!(back.len(), 2);
        let mut bad = snap.clone();
        bad[10] ^= 1;
        assert!(ProducerStateTable::decode_snapshot(&bad).is_none());
        assert!(ProducerStateTable::decode_snapshot(&snap[..snap.len() - 1]).is_none());
    }

    #[test]
    fn replay_from_batch_headers() {
        use tidelog_protocol::batch::{assign_offset, build_batch, ProducerFields, RecordRef};
        let recs: Vec<RecordRef<'_>> =
            (0..3).map(|_| RecordRef { key: None, value: Some(b"v"), headers: &[], timestamp_delta_ms: 0 }).collect();
        let mut b =
            build_batch(&recs, 5, ProducerFields { producer_id: 9, producer_epoch: 1, base_sequence: 10 }).to_vec();
        assign_offset(&mut b, Offset(40), tidelog_protocol::Epoch(0));
        let mut t = ProducerStateTable::default();
        t.replay(&BatchHeader::parse(&b).expect("header"));
        let e = t.get(ProducerId(9)).expect("entry");
        assert_eq!((e.epoch, e.last_seq), (1, 12));
        assert_eq!(
            t.check(ProducerId(9), 1, 10, 3),
            Check::Duplicate { base_offset: Offset(40), last_offset: Offset(42) }
        );
        assert_eq!(t.check(ProducerId(9), 1, 13, 1), Check::Append);
    }

    // -----------------------------------------------------------------
    // Transactions.

    const P1: ProducerId = ProducerId(1);
    const P2: ProducerId = ProducerId(2);

    fn at(segment_base: i64, position: u64) -> Option<BatchPosition> {
        Some(BatchPosition { segment_base: Offset(segment_base), position })
    }

    /// A transactional batch of `pid` appended at `base` as the produce path does it.
    fn txn_batch(t: &mut ProducerStateTable, pid: ProducerId, epoch: i16, seq: i32, base: i64, n: i32) {
        assert_eq!(t.check_batch(pid, epoch, seq, n, true), Check::Append);
        t.begin_txn_batch(pid, epoch, Offset(base), base, at(0, base as u64 * 100));
        t.record(pid, epoch, meta(seq, seq + n - 1, base), base);
    }

    #[test]
    fn transactions_start_end_and_stay_unstable_until_the_marker_is_under_the_high_watermark() {
        let mut t = ProducerStateTable::default();
        assert_eq!(t.first_unstable(Offset(0)), None);
        txn_batch(&mut t, P1, 0, 0, 10, 2);
        txn_batch(&mut t, P2, 0, 0, 12, 1);
        // A second batch of P1's transaction does not move its start.
        txn_batch(&mut t, P1, 0, 2, 13, 1);
        assert_eq!(t.ongoing_txns(), 2);
        assert_eq!(t.get(P1).and_then(|e| e.txn_first_offset), Some(Offset(10)));
        assert_eq!(t.first_unstable(Offset(20)), Some((Offset(10), at(0, 1000))));

        let done = t.end_txn(P1, 0, 3, ControlType::Commit, Offset(14), 14).expect("P1 had a transaction");
        assert_eq!((done.first_offset, done.last_offset), (Offset(10), Offset(14)));
        assert_eq!(t.get(P1).map(|e| (e.txn_first_offset, e.coordinator_epoch)), Some((None, 3)));
        assert_eq!(t.ongoing_txns(), 1);
        // Committed, but the marker is not under the high watermark: still unstable.
        assert_eq!(t.first_unstable(Offset(14)), Some((Offset(10), at(0, 1000))));
        // Once it is, P2's open transaction is the first unstable offset.
        assert_eq!(t.first_unstable(Offset(15)), Some((Offset(12), at(0, 1200))));
        t.on_high_watermark(Offset(15));
        assert_eq!(t.first_unstable(Offset(0)), Some((Offset(12), at(0, 1200))));
        assert!(t.aborted_overlapping(Offset(0), Offset(100)).is_empty(), "a commit is not aborted");

        let done = t.end_txn(P2, 0, 3, ControlType::Abort, Offset(15), 15).expect("P2 had a transaction");
        assert_eq!(done.first_offset, Offset(12));
        let aborted =
            AbortedTxn { pid: P2, first_offset: Offset(12), last_offset: Offset(15), last_stable_offset: Offset(16) };
        assert_eq!(t.aborted_overlapping(Offset(0), Offset(100)), vec![aborted]);
        assert_eq!(t.first_unstable(Offset(15)), Some((Offset(12), at(0, 1200))));
        assert_eq!(t.first_unstable(Offset(16)), None);
        assert_eq!(t.ongoing_txns(), 0);
        // Sequences go on across transactions of one epoch.
        assert_eq!(t.check_batch(P1, 0, 3, 1, true), Check::Append);
    }

    #[test]
    fn a_producer_in_a_transaction_may_only_write_transactional_batches() {
        let mut t = ProducerStateTable::default();
        txn_batch(&mut t, P1, 0, 0, 0, 1);
        assert_eq!(t.check_batch(P1, 0, 1, 1, false), Check::Reject(ErrorCode::InvalidTxnState));
        assert_eq!(t.check(P1, 0, 1, 1), Check::Reject(ErrorCode::InvalidTxnState));
        // A retry of a batch already in the log is still a duplicate.
        assert!(matches!(t.check_batch(P1, 0, 0, 1, false), Check::Duplicate { .. }));
        t.end_txn(P1, 0, 0, ControlType::Commit, Offset(1), 1);
        assert_eq!(t.check_batch(P1, 0, 1, 1, false), Check::Append);
    }

    #[test]
    fn markers_fence_older_producer_and_coordinator_epochs() {
        let mut t = ProducerStateTable::default();
        txn_batch(&mut t, P1, 2, 0, 0, 3);
        assert_eq!(t.check_marker(P1, 1, 0), Err(ErrorCode::InvalidProducerEpoch));
        assert_eq!(t.check_marker(P1, 2, 0), Ok(()));
        assert_eq!(t.check_marker(P1, 3, 0), Ok(()));
        assert_eq!(t.check_marker(ProducerId(99), 0, 0), Ok(()), "an unknown producer's marker is written");
        // The coordinator bumped the epoch while aborting (a zombie was fenced).
        t.end_txn(P1, 3, 5, ControlType::Abort, Offset(3), 3);
        let e = t.get(P1).expect("entry");
        assert_eq!((e.epoch, e.last_seq, e.batches.len(), e.coordinator_epoch), (3, -1, 0, 5));
        // The zombie's next write, and an older coordinator's marker, are refused.
        assert_eq!(t.check_batch(P1, 2, 3, 1, true), Check::Reject(ErrorCode::InvalidProducerEpoch));
        assert_eq!(t.check_marker(P1, 3, 4), Err(ErrorCode::TransactionCoordinatorFenced));
        assert_eq!(t.check_marker(P1, 2, 5), Err(ErrorCode::InvalidProducerEpoch));
        // The producer at the new epoch starts over at sequence 0.
        assert_eq!(t.check_batch(P1, 3, 0, 1, true), Check::Append);
        assert_eq!(t.check_batch(P1, 3, 3, 1, true), Check::Reject(ErrorCode::OutOfOrderSequenceNumber));
    }

    #[test]
    fn a_marker_without_a_transaction_changes_only_epochs() {
        let mut t = ProducerStateTable::default();
        t.record(P1, 0, meta(0, 4, 0), 1);
        assert_eq!(t.end_txn(P1, 0, 7, ControlType::Commit, Offset(5), 2), None);
        assert_eq!(t.end_txn(ProducerId(3), 4, 7, ControlType::Abort, Offset(6), 2), None);
        assert!(t.aborted_overlapping(Offset(0), Offset(100)).is_empty());
        assert_eq!(t.first_unstable(Offset(0)), None);
        assert_eq!(t.get(P1).map(|e| (e.epoch, e.last_seq, e.coordinator_epoch)), Some((0, 4, 7)));
        assert_eq!(t.get(ProducerId(3)).map(|e| (e.epoch, e.coordinator_epoch)), Some((4, 7)));
        assert_eq!(t.check(P1, 0, 5, 1), Check::Append, "same epoch: the sequence goes on");
    }

    #[test]
    fn aborted_transactions_overlapping_a_read() {
        let mut t = ProducerStateTable::default();
        // P1 aborts [10, 20], P2 aborts [15, 30] (P1's ended while P2's was open), P1 aborts [40, 41].
        txn_batch(&mut t, P1, 0, 0, 10, 1);
        txn_batch(&mut t, P2, 0, 0, 15, 1);
        t.end_txn(P1, 0, 0, ControlType::Abort, Offset(20), 0);
        t.end_txn(P2, 0, 0, ControlType::Abort, Offset(30), 0);
        txn_batch(&mut t, P1, 0, 1, 40, 1);
        t.end_txn(P1, 0, 0, ControlType::Abort, Offset(41), 0);
        let all: Vec<AbortedTxn> = t.aborted().copied().collect();
        assert_eq!(
            all.iter()
                .map(|a| (a.pid.0, a.first_offset.0, a.last_offset.0, a.last_stable_offset.0))
                .collect::<Vec<_>>(),
            vec![(1, 10, 20, 15), (2, 15, 30, 31), (1, 40, 41, 42)]
        );
        let firsts = |t: &ProducerStateTable, from: i64, upper: i64| -> Vec<i64> {
            t.aborted_overlapping(Offset(from), Offset(upper)).iter().map(|a| a.first_offset.0).collect()
        };
        assert_eq!(firsts(&t, 0, 100), vec![10, 15, 40]);
        assert_eq!(firsts(&t, 0, 10), Vec::<i64>::new(), "ends before the first aborted batch");
        assert_eq!(firsts(&t, 0, 11), vec![10]);
        assert_eq!(firsts(&t, 0, 16), vec![10, 15]);
        assert_eq!(firsts(&t, 20, 25), vec![10, 15], "marker offsets count as part of the transaction");
        assert_eq!(firsts(&t, 21, 25), vec![15]);
        assert_eq!(firsts(&t, 31, 40), Vec::<i64>::new());
        assert_eq!(firsts(&t, 31, 45), vec![40]);
        assert_eq!(firsts(&t, 42, 100), Vec::<i64>::new());
        // The log start passing a marker forgets that transaction.
        t.on_log_start(Offset(21));
        assert_eq!(firsts(&t, 0, 100), vec![15, 40]);
    }

    /// A damaged log can hold two batches at one offset: both transactions
    /// are tracked, and the snapshot still reads back (the fuzzer checks it).
    #[test]
    fn transactions_starting_at_the_same_offset_stay_apart() {
        let mut t = ProducerStateTable::default();
        t.begin_txn_batch(P1, 0, Offset(5), 0, None);
        t.begin_txn_batch(P2, 0, Offset(5), 0, None);
        assert_eq!(t.ongoing_txns(), 2);
        t.set_txn_position(Offset(5), BatchPosition { segment_base: Offset(0), position: 7 });
        assert_eq!(t.txn_state().0.iter().filter(|o| o.2.is_some()).count(), 2);
        let (back, _) = ProducerStateTable::decode_snapshot(&t.encode_snapshot(Offset(6))).expect("reads back");
        assert_eq!(back.ongoing_txns(), 2);
        t.end_txn(P1, 0, 0, ControlType::Abort, Offset(6), 0);
        assert_eq!(t.first_unstable(Offset(100)), Some((Offset(5), at(0, 7))), "P2's is still open");
        assert_eq!(t.aborted_overlapping(Offset(0), Offset(10)).len(), 1);
    }

    #[test]
    fn producers_with_open_transactions_never_expire() {
        let mut t = ProducerStateTable::default();
        txn_batch(&mut t, P1, 0, 0, 0, 1);
        t.record(P2, 0, meta(0, 0, 1), 1);
        t.expire(1_000_000, 5_000);
        assert!(t.get(P1).is_some() && t.get(P2).is_none());
    }

    /// A version 1 snapshot as the previous release wrote it.
    fn encode_v1(entries: &[(i64, i16, i32, i64, &[BatchMeta])], covered_to: i64) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_slice(SNAPSHOT_MAGIC);
        b.put_u16(1);
        b.put_i64(covered_to);
        b.put_u32(entries.len() as u32);
        for (pid, epoch, last_seq, ts, batches) in entries {
            b.put_i64(*pid);
            b.put_i16(*epoch);
            b.put_i32(*last_seq);
            b.put_i64(*ts);
            b.put_u8(batches.len() as u8);
            for m in batches.iter() {
                b.put_i32(m.first_seq);
                b.put_i32(m.last_seq);
                b.put_i64(m.base_offset.0);
                b.put_i64(m.last_offset.0);
            }
        }
        let crc = crc32c::crc32c(&b);
        b.put_u32(crc);
        b.to_vec()
    }

    #[test]
    fn snapshot_v2_carries_transactions_and_v1_is_still_read() {
        let mut t = ProducerStateTable::default();
        txn_batch(&mut t, P1, 1, 0, 10, 2);
        txn_batch(&mut t, P2, 0, 0, 12, 1);
        t.end_txn(P2, 0, 9, ControlType::Abort, Offset(13), 5);
        txn_batch(&mut t, ProducerId(5), 0, 0, 14, 1);
        let snap = t.encode_snapshot(Offset(15));
        let (back, covered) = ProducerStateTable::decode_snapshot(&snap).expect("valid");
        assert_eq!(covered, Offset(15));
        for pid in [P1, P2, ProducerId(5)] {
            assert_eq!(back.get(pid), t.get(pid), "{pid:?}");
        }
        let (ongoing, aborted) = back.txn_state();
        // Positions are not in the snapshot: `rebuild` locates them.
        assert_eq!(ongoing, vec![(Offset(10), P1, None), (Offset(14), ProducerId(5), None)]);
        assert_eq!(aborted, t.txn_state().1);
        assert_eq!(back.unpositioned_txns(), vec![Offset(10), Offset(14)]);
        assert_eq!(back.check_marker(P2, 0, 8), Err(ErrorCode::TransactionCoordinatorFenced));
        for n in [snap.len() - 5, snap.len() - 37] {
            let mut cut = snap[..n].to_vec();
            let crc = crc32c::crc32c(&cut);
            cut.put_u32(crc);
            assert!(ProducerStateTable::decode_snapshot(&cut).is_none(), "cut at {n}");
        }

        let v1 = encode_v1(&[(3, 2, 9, 77, &[meta(0, 9, 50)]), (4, 0, 0, 78, &[meta(0, 0, 60)])], 61);
        let (old, covered) = ProducerStateTable::decode_snapshot(&v1).expect("v1 is read");
        assert_eq!(covered, Offset(61));
        let e = old.get(ProducerId(3)).expect("entry");
        assert_eq!(
            (e.epoch, e.last_seq, e.last_timestamp_ms, e.coordinator_epoch, e.txn_first_offset),
            (2, 9, 77, -1, None)
        );
        assert_eq!(
            old.check(ProducerId(3), 2, 0, 10),
            Check::Duplicate { base_offset: Offset(50), last_offset: Offset(59) }
        );
        assert_eq!(old.txn_state(), (vec![], vec![]));
    }

    fn txn_header_batch(pid: i64, epoch: i16, seq: i32, n: usize, base: i64) -> Vec<u8> {
        use tidelog_protocol::batch::{
            assign_offset, build_batch_with_attributes, ProducerFields, RecordRef, ATTR_TRANSACTIONAL,
        };
        let recs: Vec<RecordRef<'_>> =
            (0..n).map(|_| RecordRef { key: None, value: Some(b"v"), headers: &[], timestamp_delta_ms: 0 }).collect();
        let fields = ProducerFields { producer_id: pid, producer_epoch: epoch, base_sequence: seq };
        let mut b = build_batch_with_attributes(&recs, 5, fields, ATTR_TRANSACTIONAL).to_vec();
        assign_offset(&mut b, Offset(base), tidelog_protocol::Epoch(0));
        b
    }

    fn marker_batch(pid: i64, epoch: i16, control: ControlType, coordinator_epoch: i32, base: i64) -> Vec<u8> {
        let mut b = batch::build_control_batch(control, pid, epoch, coordinator_epoch, 5).to_vec();
        batch::assign_offset(&mut b, Offset(base), tidelog_protocol::Epoch(0));
        b
    }

    #[test]
    fn replay_of_data_batches_and_markers_equals_the_live_state() {
        let mut live = ProducerStateTable::default();
        txn_batch(&mut live, P1, 0, 0, 0, 2);
        txn_batch(&mut live, P2, 0, 0, 2, 1);
        live.end_txn(P1, 0, 1, ControlType::Commit, Offset(3), 5);
        txn_batch(&mut live, P1, 0, 2, 4, 1);
        live.end_txn(P2, 1, 1, ControlType::Abort, Offset(5), 5);
        let log = [
            txn_header_batch(1, 0, 0, 2, 0),
            txn_header_batch(2, 0, 0, 1, 2),
            marker_batch(1, 0, ControlType::Commit, 1, 3),
            txn_header_batch(1, 0, 2, 1, 4),
            marker_batch(2, 1, ControlType::Abort, 1, 5),
        ];
        let mut replayed = ProducerStateTable::default();
        for (i, b) in log.iter().enumerate() {
            let base = BatchHeader::parse(b).unwrap().base_offset().0;
            let position = at(0, base as u64 * 100);
            replayed.replay_at(&BatchHeader::parse(b).unwrap(), position);
            assert!(i < 2 || replayed.get(P1).is_some());
        }
        assert_eq!(replayed.txn_state(), live.txn_state());
        for pid in [P1, P2] {
            let (r, l) = (replayed.get(pid).unwrap(), live.get(pid).unwrap());
            assert_eq!(
                (r.epoch, r.last_seq, r.coordinator_epoch, r.txn_first_offset),
                (l.epoch, l.last_seq, l.coordinator_epoch, l.txn_first_offset),
                "{pid:?}"
            );
        }
        assert_eq!(replayed.first_unstable(Offset(6)), live.first_unstable(Offset(6)));
        assert_eq!(replayed.first_unstable(Offset(6)), Some((Offset(4), at(0, 400))));
        assert_eq!(replayed.get(P2).map(|e| e.epoch), Some(1), "the abort bumped P2's epoch");
    }

    #[test]
    fn expiry_drops_idle_producers() {
        let mut t = ProducerStateTable::default();
        t.record(ProducerId(1), 0, meta(0, 0, 0), 1_000);
        t.record(ProducerId(2), 0, meta(0, 0, 1), 9_000);
        t.expire(10_000, 5_000);
        assert!(t.get(ProducerId(1)).is_none());
        assert!(t.get(ProducerId(2)).is_some());
    }
}
