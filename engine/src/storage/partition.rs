//! A partition log: ordered segments, the last one active, plus a bounded
//! cache of recent durable batches for tail reads.
//!
//! Shard-local: lives in `Rc<RefCell<_>>` on its owning shard. No borrow is
//! held across an `.await`: async work (flush, disk reads) snapshots what it
//! needs, drops the borrow, does the I/O, then borrows again to publish.
//!
//! Offsets:
//! ```text
//!   log_start_offset <= high_watermark <= durable_end <= log_end_offset
//!                       (visible)         (fdatasync'd)   (appended)
//! ```
//! Without replication the high watermark is the durable end. A replicated
//! log's high watermark is also capped by `replication_bound` (what the
//! replicas in sync have made durable, set by the replication layer); it
//! never moves backwards except by `truncate_to`. Consumers read below the
//! high watermark; follower replicas are served up to the durable end
//! (`ReadLimit`).
//!
//! Transactions: the last stable offset (`last_stable_offset`) is the high
//! watermark, or lower: the first offset of the oldest transaction that is
//! ongoing or whose marker is not yet under the high watermark (producer
//! state knows them, and where each one's first batch is). read_committed
//! consumers read below it (`ReadLimit::LastStable`). Markers are appended
//! by `append_txn_marker`.
//!
//! Replication primitives: `append_replicated` (a follower appends the
//! leader's batches as they are), `truncate_to` (a follower drops its
//! diverged tail), and the leader epoch cache (`epochs`).
//!
//! Locks (async, never contended on the hot path): `io_lock` is held by
//! `flush` and `truncate_to`, so a truncation never races the writes of a
//! flush; `cleaner_lock` is held by `truncate_to`, by prefix deletions
//! (`checkpoint::truncate_prefix`) while they remove segments, and by
//! compaction while it swaps segments, so a rewrite made from data a
//! truncation removed is never installed and the segments it merges stay
//! put until it is.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use glommio::io::DmaBuffer;
use tidelog_protocol::batch::{
    self, BatchHeader, BatchInfo, Compression, BATCH_HEADER_BYTES, BATCH_LOG_OVERHEAD_BYTES,
};
use tidelog_protocol::{Epoch, ErrorCode, Offset, PartitionId, ProducerId};

use super::epochs::LeaderEpochCache;
use super::producer_state::BatchPosition;
use super::segment::{PendingBatch, Segment, SegmentSettings};

/// Per-log settings resolved from broker defaults and topic overrides.
#[derive(Clone, Copy, Debug)]
pub struct LogSettings {
    pub segment: SegmentSettings,
    pub roll_ms: u64,
    /// `segment.jitter.ms`: each segment rolls up to this much before
    /// `roll_ms` (its own share, from its base offset), so that partitions
    /// created together do not all roll at once.
    pub roll_jitter_ms: u64,
    pub cache_bytes_max: usize,
}

impl LogSettings {
    /// The age at which the segment based at `base` rolls.
    pub fn roll_ms_for(&self, base: Offset) -> u64 {
        if self.roll_jitter_ms == 0 {
            return self.roll_ms;
        }
        // A fixed pseudo-random share per segment (splitmix64 of the base).
        let mut x = (base.0 as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        self.roll_ms.saturating_sub(x % self.roll_jitter_ms.min(self.roll_ms).max(1))
    }
}

/// A durable batch kept in memory for tail fetches.
struct CachedBatch {
    base_offset: Offset,
    last_offset: Offset,
    bytes: Bytes,
}

pub struct PartitionLog {
    pub topic: Rc<str>,
    pub partition: PartitionId,
    pub dir: PathBuf,
    pub settings: LogSettings,
    segments: Vec<Segment>,
    pub log_start_offset: Offset,
    /// Records below it are visible to consumers: min(durable_end,
    /// replication_bound), never moving backwards except by `truncate_to`.
    pub high_watermark: Offset,
    /// End of the fdatasync'd log.
    pub durable_end: Offset,
    /// What the in-sync replicas have made durable (set by the replication
    /// layer); `None` when the log is not replicated.
    pub replication_bound: Option<Offset>,
    /// Leader epochs and their start offsets (`leader-epoch-checkpoint`).
    pub epochs: LeaderEpochCache,
    /// Durable batches not yet under the high watermark, oldest first, with
    /// their file positions: where consumers' reads stop. Empty when the
    /// high watermark is the durable end.
    above_hw: VecDeque<DurableBatch>,
    /// The front of `above_hw` is a coarse stand-in for the durable batches
    /// between a held-back high watermark and the durable end at open
    /// (`hold_high_watermark`) until `refine_above_hw` has read their
    /// positions: it stops consumers' reads at or below where they may go.
    above_hw_coarse: bool,
    /// The high watermark checkpoint as read at open (`None`: no file, or a
    /// damaged one), until the replication layer takes it (`take_hw_checkpoint`).
    hw_checkpoint_on_open: Option<Option<Offset>>,
    /// The high watermark last written to the checkpoint file.
    pub hw_checkpointed: Option<Offset>,
    /// Bumped by every `truncate_to` (compaction checks it before a swap).
    pub truncations: u64,
    pub(crate) io_lock: Rc<futures::lock::Mutex<()>>,
    pub(crate) cleaner_lock: Rc<futures::lock::Mutex<()>>,
    cache: VecDeque<CachedBatch>,
    cache_bytes: usize,
    /// The shard-wide bound on cached batches, shared by every log of a shard.
    pub cache_budget: Option<Rc<CacheBudget>>,
    /// The shard's count of unflushed bytes in this log's data directory
    /// (`log.unflushed.max.bytes`); `None` counts nothing.
    pub unflushed: Option<Rc<super::segment::Unflushed>>,
    /// Idempotent producers' sequence state (see `producer_state`).
    pub producers: super::producer_state::ProducerStateTable,
    /// Transaction markers appended since the log was opened: a produce
    /// that verified its transaction (KIP-890) while this moved may have
    /// raced the transaction's end, and is refused for a retry.
    pub markers_appended: u64,
    /// Most O_DIRECT writes of one segment in flight at once (`flush.writes.inflight.max`).
    pub writes_inflight_max: usize,
}

/// A durable batch at or above the high watermark: its segment and position.
#[derive(Clone, Copy, Debug)]
struct DurableBatch {
    base_offset: Offset,
    next_offset: Offset,
    segment_base: Offset,
    position: u64,
}

/// How far a read may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadLimit {
    /// Below the high watermark: what consumers and the broker's own
    /// readers see.
    HighWatermark,
    /// Below the durable end: what a follower replica is served.
    DurableEnd,
    /// Below the last stable offset: what read_committed consumers see.
    LastStable,
}

/// Why `append_replicated` refused a record set (nothing was appended).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaAppendError {
    #[error("no batches to append")]
    Empty,
    #[error("batch {index} starts at offset {found}, expected {expected} (the log end offset or the previous batch's last offset + 1)")]
    NotContiguous { index: usize, expected: Offset, found: Offset },
    #[error("batch {index} does not match its validation info: {why}")]
    Mismatch { index: usize, why: String },
}

/// A follower's check of the records a leader sent: the whole batches at
/// the start of `records`, each validated (lengths, magic, CRC-32C, at most
/// `limit_bytes`), with a last offset delta allowed beyond the record count
/// (batches compacted on the leader). A partial batch at the end (a fetch
/// response cut at its byte limit, which clients discard) is left out.
/// Returns those batches and their infos, for `append_replicated`.
pub fn replica_record_set(records: &Bytes, limit_bytes: usize) -> Result<(Bytes, Vec<BatchInfo>), batch::BatchError> {
    let mut infos = Vec::new();
    let mut at = 0;
    while records.len() - at >= BATCH_LOG_OVERHEAD_BYTES {
        let rest = &records[at..];
        let batch_length = i32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if batch_length >= 0 && batch_length as usize + BATCH_LOG_OVERHEAD_BYTES > rest.len() {
            break;
        }
        let info = batch::validate(rest, limit_bytes)?;
        at += info.size_bytes;
        infos.push(info);
    }
    Ok((records.slice(..at), infos))
}

/// `flush.writes.inflight.max` when a log is opened outside a shard (tests).
pub const WRITES_INFLIGHT_DEFAULT: usize = 32;

/// One cached batch in the shard-wide FIFO: its log, base offset and size.
type CacheEntry = (std::rc::Weak<RefCell<PartitionLog>>, Offset, usize);

/// The recent-batch cache bound of one shard: every log's cached batches in
/// one FIFO, evicted oldest first once their total passes `limit_bytes`.
pub struct CacheBudget {
    pub limit_bytes: usize,
    used_bytes: std::cell::Cell<usize>,
    fifo: RefCell<VecDeque<CacheEntry>>,
}

impl CacheBudget {
    pub fn new(limit_bytes: usize) -> Rc<CacheBudget> {
        Rc::new(CacheBudget { limit_bytes, used_bytes: Default::default(), fifo: Default::default() })
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes.get()
    }

    fn admit(&self, log: &SharedLog, batches: Vec<(Offset, usize)>) {
        let mut fifo = self.fifo.borrow_mut();
        for (base, len) in batches {
            fifo.push_back((Rc::downgrade(log), base, len));
            self.used_bytes.set(self.used_bytes.get() + len);
        }
        while self.used_bytes.get() > self.limit_bytes {
            let Some((weak, base, len)) = fifo.pop_front() else { break };
            self.used_bytes.set(self.used_bytes.get() - len);
            if let Some(owner) = weak.upgrade() {
                owner.borrow_mut().evict_cached(base);
            }
        }
    }
}

pub type SharedLog = Rc<RefCell<PartitionLog>>;

/// Batches read for a fetch: `Bytes` slices, either cache entries (no copy)
/// or one buffer read from disk.
#[derive(Default)]
pub struct ReadResult {
    pub chunks: Vec<Bytes>,
    pub bytes: usize,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn partition_dir(root: &Path, topic: &str, partition: PartitionId) -> PathBuf {
    root.join(partition_dir_name(topic, partition))
}

/// A partition's directory name inside a data directory: `<topic>-<n>`.
pub fn partition_dir_name(topic: &str, partition: PartitionId) -> String {
    format!("{topic}-{}", partition.0)
}

impl PartitionLog {
    /// Opens (recovering) or creates the log in `dir`.
    pub async fn open(
        topic: Rc<str>,
        partition: PartitionId,
        dir: PathBuf,
        settings: LogSettings,
    ) -> io::Result<SharedLog> {
        let d = dir.clone();
        let mut bases: Vec<i64> = glommio::executor()
            .spawn_blocking(move || -> io::Result<Vec<i64>> {
                std::fs::create_dir_all(&d)?;
                // Finish or discard a compaction swap a crash interrupted.
                super::compaction::recover_dir(&d)?;
                let mut out = Vec::new();
                for entry in std::fs::read_dir(&d)? {
                    let name = entry?.file_name();
                    let name = name.to_string_lossy();
                    if let Some(stem) = name.strip_suffix(".log") {
                        if stem.len() == 20 {
                            if let Ok(b) = stem.parse::<i64>() {
                                out.push(b);
                            }
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        bases.sort_unstable();
        let now = now_ms();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        for (i, base) in bases.iter().enumerate() {
            let next = bases.get(i + 1).map(|b| Offset(*b));
            let path = super::segment::log_path(&dir, Offset(*base));
            let (seg, report) = Segment::open(&path, Offset(*base), next, &settings.segment, now).await?;
            if report.valid_bytes < report.file_bytes {
                if report.damaged_tail {
                    log::warn!(
                        "{topic}-{} recovery: segment {} has a damaged tail after offset {} (position {}); \
                         truncated {} bytes, keeping {} valid batches",
                        partition.0,
                        path.display(),
                        seg.next_offset.0,
                        report.valid_bytes,
                        report.file_bytes - report.valid_bytes,
                        report.batches
                    );
                } else {
                    log::info!(
                        "{topic}-{} recovery: segment {} ends cleanly at offset {} (position {}, preallocated zeros trimmed)",
                        partition.0,
                        path.display(),
                        seg.next_offset.0,
                        report.valid_bytes
                    );
                }
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            segments.push(Segment::new(&dir, Offset(0), now));
        }
        let log_start_offset = segments.first().map(|s| s.base_offset).unwrap_or(Offset(0));
        let high_watermark = segments.last().map(|s| s.durable_next_offset).unwrap_or(Offset(0));
        let d = dir.clone();
        let saved_epochs = glommio::executor().spawn_blocking(move || super::epochs::read(&d)).await?;
        let d = dir.clone();
        let saved_hw = glommio::executor().spawn_blocking(move || super::checkpoint::read_high_watermark(&d)).await;
        let saved_hw = saved_hw.unwrap_or_else(|why| {
            log::warn!(
                "{topic}-{}: high watermark checkpoint unusable ({why}); treated as missing (a replicated \
                 partition then starts from its log start offset until its in-sync replicas confirm more)",
                partition.0
            );
            None
        });
        // A log whose last segment is sealed (crash right after a roll) continues in a new one.
        if segments.last().is_some_and(|s| s.seal_requested) {
            segments.push(Segment::new(&dir, high_watermark, now));
        }
        log::info!(
            "{topic}-{} opened: {} segment(s), log start offset {}, high watermark {}",
            partition.0,
            segments.len(),
            log_start_offset.0,
            high_watermark.0
        );
        let log = Rc::new(RefCell::new(PartitionLog {
            topic,
            partition,
            dir,
            settings,
            segments,
            log_start_offset,
            high_watermark,
            durable_end: high_watermark,
            replication_bound: None,
            epochs: LeaderEpochCache::default(),
            above_hw: VecDeque::new(),
            above_hw_coarse: false,
            hw_checkpoint_on_open: Some(saved_hw),
            hw_checkpointed: saved_hw,
            truncations: 0,
            io_lock: Rc::new(futures::lock::Mutex::new(())),
            cleaner_lock: Rc::new(futures::lock::Mutex::new(())),
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_budget: None,
            unflushed: None,
            writes_inflight_max: WRITES_INFLIGHT_DEFAULT,
            producers: Default::default(),
            markers_appended: 0,
        }));
        load_epochs(&log, saved_epochs).await?;
        super::producer_state::rebuild(&log).await?;
        Ok(log)
    }

    /// Caps the high watermark at `bound` (what the in-sync replicas have
    /// made durable), or lifts the cap with `None`. The high watermark never
    /// moves backwards: a bound below it only stops it moving.
    pub fn set_replication_bound(&mut self, bound: Option<Offset>) {
        self.replication_bound = bound;
        self.update_high_watermark();
    }

    /// HW = min(durable_end, replication_bound), never backwards.
    fn update_high_watermark(&mut self) {
        let target = match self.replication_bound {
            Some(bound) => bound.min(self.durable_end),
            None => self.durable_end,
        };
        if target > self.high_watermark {
            self.high_watermark = target;
        }
        self.producers.on_high_watermark(self.high_watermark);
        while self.above_hw.front().is_some_and(|b| b.next_offset <= self.high_watermark) {
            self.above_hw.pop_front();
            self.above_hw_coarse = false;
        }
    }

    /// The high watermark checkpoint read at open, once: the replication
    /// layer decides with it where a replicated log's watermark starts.
    pub fn take_hw_checkpoint(&mut self) -> Option<Option<Offset>> {
        self.hw_checkpoint_on_open.take()
    }

    /// After open, for a replicated log: brings the high watermark down to
    /// `offset` (clamped to [log start, durable end]; never up) and caps it
    /// there until the replication layer sets a bound, so records that the
    /// other replicas may not have stay invisible after a restart. Reads stop
    /// at once, at or below the batch holding the new watermark (a coarse
    /// stop from the sparse index); `refine_above_hw` then finds the exact
    /// batch positions. Returns the new high watermark.
    pub fn hold_high_watermark(&mut self, offset: Offset) -> Offset {
        let target = offset.max(self.log_start_offset).min(self.durable_end).min(self.high_watermark);
        self.replication_bound = Some(target);
        if target >= self.high_watermark {
            return self.high_watermark;
        }
        self.high_watermark = target;
        let i = self.segments.partition_point(|s| s.base_offset <= target).saturating_sub(1);
        let seg = &self.segments[i];
        let coarse = DurableBatch {
            base_offset: target,
            next_offset: self.durable_end,
            segment_base: seg.base_offset,
            position: seg.index.position_for(seg.base_offset, target).min(seg.durable_bytes),
        };
        self.above_hw.clear();
        self.above_hw.push_back(coarse);
        self.above_hw_coarse = true;
        // Cached batches are all durable, and reads from the cache stop at
        // the high watermark batch by batch, so the cache needs nothing.
        self.high_watermark
    }

    /// Where reads with `limit` stop (exclusive).
    pub fn read_upper(&self, limit: ReadLimit) -> Offset {
        match limit {
            ReadLimit::HighWatermark => self.high_watermark,
            ReadLimit::DurableEnd => self.durable_end,
            ReadLimit::LastStable => self.last_stable_offset(),
        }
    }

    /// The last stable offset (KIP-98): read_committed consumers read below
    /// it. The high watermark, or the first offset of the oldest transaction
    /// that is ongoing or whose marker is not under the high watermark yet
    /// (never below the log start offset), as Kafka's
    /// `fetchLastStableOffsetMetadata`. It only moves when the high
    /// watermark does (a marker's append does not move it), so the
    /// high-watermark wake-ups of long polls cover it.
    pub fn last_stable_offset(&self) -> Offset {
        self.first_unstable_below_hw().map_or(self.high_watermark, |(offset, _)| offset)
    }

    /// The first unstable offset when it is below the high watermark (and
    /// at least the log start offset), with the position of its batch.
    fn first_unstable_below_hw(&self) -> Option<(Offset, Option<BatchPosition>)> {
        let hw = self.high_watermark;
        self.producers.first_unstable(hw).filter(|(offset, _)| *offset < hw).map(|(offset, position)| {
            match offset < self.log_start_offset {
                true => (self.log_start_offset, None),
                false => (offset, position),
            }
        })
    }

    /// Transactions ongoing on this partition (for the shard's gauge).
    pub fn ongoing_txns(&self) -> usize {
        self.producers.ongoing_txns()
    }

    /// Aborted transactions a read_committed fetch of `[from, upper)` must
    /// report, as (producer id, first offset), oldest marker first.
    pub fn aborted_txns(&self, from: Offset, upper: Offset) -> Vec<(ProducerId, Offset)> {
        self.producers.aborted_overlapping(from, upper).into_iter().map(|t| (t.pid, t.first_offset)).collect()
    }

    /// Bytes of segment `i` that reads with `limit` may return: its durable
    /// size, or for consumers, up to the first durable batch not wholly
    /// under the high watermark (read_committed: nor under the last stable offset).
    fn readable_bytes(&self, i: usize, limit: ReadLimit) -> u64 {
        let seg = &self.segments[i];
        let hw_bytes = match (limit, self.above_hw.front()) {
            (ReadLimit::DurableEnd, _) | (_, None) => seg.durable_bytes,
            (_, Some(b)) if seg.base_offset < b.segment_base => seg.durable_bytes,
            (_, Some(b)) if seg.base_offset == b.segment_base => b.position,
            (_, Some(_)) => 0,
        };
        if limit != ReadLimit::LastStable {
            return hw_bytes;
        }
        let Some((offset, position)) = self.first_unstable_below_hw() else { return hw_bytes };
        // Without its exact position (only until `rebuild` has located it):
        // the index entry at or before the batch, which stops reads early.
        let at = position.unwrap_or_else(|| {
            let j = self.segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1);
            let s = &self.segments[j];
            BatchPosition { segment_base: s.base_offset, position: s.index.position_for(s.base_offset, offset) }
        });
        let lso_bytes = match seg.base_offset.cmp(&at.segment_base) {
            std::cmp::Ordering::Less => seg.durable_bytes,
            std::cmp::Ordering::Equal => at.position.min(seg.durable_bytes),
            std::cmp::Ordering::Greater => 0,
        };
        hw_bytes.min(lso_bytes)
    }

    /// OffsetForLeaderEpoch on this log: the largest epoch <= `epoch` and
    /// where it ends (the next epoch's start, or the log end offset).
    pub fn end_offset_for_epoch(&self, epoch: Epoch) -> Option<(Epoch, Offset)> {
        self.epochs.end_offset_for(epoch, self.log_end_offset())
    }

    pub fn log_end_offset(&self) -> Offset {
        self.active().next_offset
    }

    fn active(&self) -> &Segment {
        let last = self.segments.len() - 1;
        &self.segments[last]
    }

    fn active_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// Largest record timestamp in the log (-1 when empty).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.segments.iter().map(|s| s.max_timestamp_ms).max().unwrap_or(-1)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn needs_flush(&self) -> bool {
        self.segments.iter().any(|s| s.needs_flush())
    }

    /// Appends validated batches (the produce record set), assigning offsets
    /// in place: each batch is kept as a piece of `records` (no copy; the
    /// produce handler passes its own piece of the request frame). Synchronous:
    /// offsets are assigned in call order. Returns the first and last offsets
    /// assigned.
    pub fn append(&mut self, mut records: BytesMut, infos: &[BatchInfo], leader_epoch: Epoch) -> (Offset, Offset) {
        let first = self.log_end_offset();
        if !infos.is_empty() && self.epochs.is_newer(leader_epoch) {
            self.epochs.assign(leader_epoch, first);
        }
        let now = now_ms();
        for info in infos {
            self.maybe_roll(info.size_bytes, now);
            let mut batch = records.split_to(info.size_bytes.min(records.len()));
            let base = self.log_end_offset();
            batch::assign_offset(&mut batch, base, leader_epoch);
            self.note_txn_start(&batch, base);
            let settings = self.settings.segment;
            let charge = self.unflushed.as_ref().map(|u| u.charge(batch.len()));
            self.active_mut().append(batch.freeze(), info, &settings, charge);
        }
        (first, Offset(self.log_end_offset().0 - 1))
    }

    /// A transactional data batch about to be appended at `base` (in the
    /// active segment, at its end) starts its producer's transaction here
    /// unless one is ongoing. One header read and a bit test for the others.
    fn note_txn_start(&mut self, batch: &[u8], base: Offset) {
        let Ok(h) = BatchHeader::parse(batch) else { return };
        if !h.is_transactional() || h.is_control() || h.producer_id().0 < 0 {
            return;
        }
        let at = BatchPosition { segment_base: self.active().base_offset, position: self.active().end_bytes };
        self.producers.begin_txn_batch(h.producer_id(), h.producer_epoch(), base, h.max_timestamp_ms(), Some(at));
    }

    /// Appends a COMMIT (`commit`) or ABORT marker for `pid` at `epoch`,
    /// written by a transaction coordinator at `coordinator_epoch`, through
    /// the same path as `append` (so it is flushed and replicated like any
    /// batch), and ends the producer's transaction here. Kafka refuses a
    /// marker whose producer epoch is older than the producer's here with
    /// INVALID_PRODUCER_EPOCH, and one from an older coordinator epoch with
    /// TRANSACTION_COORDINATOR_FENCED; nothing is written then. A marker for a
    /// producer with no ongoing transaction here is written all the same.
    /// Returns the marker's offset. The caller marks the log dirty
    /// (`Shard::mark_dirty`), as after `append`, and waits for the high
    /// watermark to pass the offset; the last stable offset moves then.
    pub fn append_txn_marker(
        &mut self,
        pid: ProducerId,
        epoch: i16,
        commit: bool,
        coordinator_epoch: i32,
        leader_epoch: Epoch,
    ) -> Result<Offset, ErrorCode> {
        if pid.0 < 0 || epoch < 0 {
            return Err(ErrorCode::InvalidRequest);
        }
        self.producers.check_marker(pid, epoch, coordinator_epoch)?;
        let control = if commit { batch::ControlType::Commit } else { batch::ControlType::Abort };
        let now = now_ms();
        let marker = batch::build_control_batch(control, pid.0, epoch, coordinator_epoch, now);
        let info = batch::validate(&marker, usize::MAX).map_err(|e| {
            log::error!("{}-{}: built transaction marker is invalid: {e}", self.topic, self.partition.0);
            ErrorCode::UnknownServerError
        })?;
        let (offset, _) = self.append(BytesMut::from(&marker[..]), &[info], leader_epoch);
        self.producers.end_txn(pid, epoch, coordinator_epoch, control, offset, now);
        self.markers_appended += 1;
        Ok(offset)
    }

    /// A follower's append: batches fetched from the leader, stored as they
    /// are (the leader's base offsets and leader epochs, no offset
    /// assignment). The first must start at the log end offset and each next
    /// one right after the previous; otherwise nothing is appended. A new
    /// leader epoch in a batch is recorded in the epoch cache, and producer
    /// state follows each batch as it did on the leader. `infos` describe
    /// `records` batch by batch (`replica_record_set`). Returns the first
    /// and last offsets appended.
    pub fn append_replicated(
        &mut self,
        records: &Bytes,
        infos: &[BatchInfo],
    ) -> Result<(Offset, Offset), ReplicaAppendError> {
        if infos.is_empty() {
            return Err(ReplicaAppendError::Empty);
        }
        let first = self.log_end_offset();
        let mut expected = first;
        let mut at = 0;
        for (index, info) in infos.iter().enumerate() {
            let mismatch = |why: String| ReplicaAppendError::Mismatch { index, why };
            let Some(bytes) = records.get(at..at + info.size_bytes) else {
                return Err(mismatch(format!(
                    "{} bytes at position {at} run past the {} bytes of the record set",
                    info.size_bytes,
                    records.len()
                )));
            };
            let h = BatchHeader::parse(bytes).map_err(|e| mismatch(e.to_string()))?;
            if h.size_bytes() != info.size_bytes || h.last_offset_delta() != info.last_offset_delta {
                return Err(mismatch(format!(
                    "header says {} bytes and last offset delta {}, info {} and {}",
                    h.size_bytes(),
                    h.last_offset_delta(),
                    info.size_bytes,
                    info.last_offset_delta
                )));
            }
            if h.base_offset() != expected {
                return Err(ReplicaAppendError::NotContiguous { index, expected, found: h.base_offset() });
            }
            expected = h.last_offset().next();
            at += info.size_bytes;
        }
        let now = now_ms();
        let mut at = 0;
        for info in infos {
            self.maybe_roll(info.size_bytes, now);
            // A slice, not a copy: the fetch response buffer stays alive as
            // long as the log keeps these batches (pending, then cached).
            let bytes = records.slice(at..at + info.size_bytes);
            if let Ok(h) = BatchHeader::parse(&bytes) {
                let epoch = h.leader_epoch();
                if self.epochs.is_newer(epoch) {
                    self.epochs.assign(epoch, h.base_offset());
                }
                let at = BatchPosition { segment_base: self.active().base_offset, position: self.active().end_bytes };
                self.producers.replay_at(&h, Some(at));
            }
            let settings = self.settings.segment;
            let charge = self.unflushed.as_ref().map(|u| u.charge(bytes.len()));
            self.active_mut().append(bytes, info, &settings, charge);
            at += info.size_bytes;
        }
        debug_assert_eq!(self.log_end_offset(), expected);
        Ok((first, Offset(expected.0 - 1)))
    }

    fn maybe_roll(&mut self, size_bytes: usize, now: i64) {
        let settings = self.settings;
        let active = self.active();
        let too_old = active.end_bytes > 0
            && now.saturating_sub(active.created_at_ms) as u64 >= settings.roll_ms_for(active.base_offset);
        if active.is_full_for(size_bytes, &settings.segment) || too_old {
            let base = active.next_offset;
            log::info!(
                "{}-{} rolling segment {} at offset {} ({} bytes{})",
                self.topic,
                self.partition.0,
                active.base_offset.0,
                base.0,
                active.end_bytes,
                if too_old { ", log.roll.ms reached" } else { "" }
            );
            self.active_mut().seal_requested = true;
            let seg = Segment::new(&self.dir, base, now);
            self.segments.push(seg);
        }
    }

    /// Keeps newly durable batches for tail fetches; returns (base, bytes) of
    /// each, for the shard-wide budget.
    fn cache_durable(&mut self, batches: Vec<PendingBatch>) -> Vec<(Offset, usize)> {
        let admitted = batches.iter().map(|b| (b.base_offset, b.bytes.len())).collect();
        for b in batches {
            self.cache_bytes += b.bytes.len();
            self.cache.push_back(CachedBatch {
                base_offset: b.base_offset,
                last_offset: b.last_offset,
                bytes: b.bytes,
            });
        }
        while self.cache_bytes > self.settings.cache_bytes_max {
            match self.cache.pop_front() {
                Some(old) => self.cache_bytes -= old.bytes.len(),
                None => break,
            }
        }
        admitted
    }

    /// Drops the cached batch starting at `base` if it is still the oldest.
    fn evict_cached(&mut self, base: Offset) {
        if self.cache.front().is_some_and(|c| c.base_offset == base) {
            if let Some(old) = self.cache.pop_front() {
                self.cache_bytes -= old.bytes.len();
            }
        }
    }

    /// Whether the recent-batch cache holds `offset` (what `read_cached` serves).
    fn cache_holds(&self, offset: Offset) -> bool {
        self.cache.front().is_some_and(|b| offset >= b.base_offset)
    }

    /// Serves `offset..` from the recent-batch cache if it starts there:
    /// whole batches, each wholly below the `limit`.
    fn read_cached(
        &self,
        offset: Offset,
        max_bytes: usize,
        at_least_one: bool,
        limit: ReadLimit,
    ) -> Option<ReadResult> {
        let front = self.cache.front()?;
        if offset < front.base_offset {
            return None;
        }
        let upper = self.read_upper(limit);
        let start = self.cache.partition_point(|b| b.last_offset < offset);
        let mut out = ReadResult::default();
        for b in self.cache.iter().skip(start) {
            if b.last_offset >= upper {
                break;
            }
            if out.bytes + b.bytes.len() > max_bytes && !(at_least_one && out.chunks.is_empty()) {
                break;
            }
            out.bytes += b.bytes.len();
            out.chunks.push(b.bytes.clone());
        }
        Some(out)
    }
}

/// A flush that takes this long is logged, with where its time went.
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);
/// At most one slow-flush line per shard this often; the others are counted.
const SLOW_FLUSH_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    /// This shard's last slow-flush line, and slow flushes not logged since.
    static SLOW_FLUSH_LOGGED: std::cell::Cell<(Option<std::time::Instant>, u64)> =
        const { std::cell::Cell::new((None, 0)) };
}

/// Whether to log a slow flush now; returns the slow flushes left unlogged
/// since the last line.
fn slow_flush_report(now: std::time::Instant) -> Option<u64> {
    SLOW_FLUSH_LOGGED.with(|c| {
        let (last, skipped) = c.get();
        if last.is_some_and(|t| now.saturating_duration_since(t) < SLOW_FLUSH_LOG_EVERY) {
            c.set((last, skipped + 1));
            None
        } else {
            c.set((Some(now), 0));
            Some(skipped)
        }
    })
}

/// Writes and syncs everything pending in `log`, segment by segment in
/// order, and seals rolled segments. Moves the high watermark only after
/// fdatasync returned.
/// Returns the bytes of batches it made durable, including batches appended
/// while it ran (it keeps going until nothing is pending). A changed leader
/// epoch cache is checkpointed before each segment's writes, so a visible
/// batch's epoch is always on disk.
pub async fn flush(log: &SharedLog) -> io::Result<u64> {
    flush_notifying(log, &|_, _| {}).await
}

/// `flush`, calling `on_durable(bytes, took)` as soon as each round of
/// writes and fdatasync has moved the log's durable end (and high
/// watermark), so that waiting produces are answered then and not only
/// when the flush has also taken whatever arrived meanwhile.
pub async fn flush_notifying(log: &SharedLog, on_durable: &dyn Fn(u64, std::time::Duration)) -> io::Result<u64> {
    let lock = log.borrow().io_lock.clone();
    let _io = lock.lock().await;
    flush_segments(log, on_durable).await
}

async fn flush_segments(log: &SharedLog, on_durable: &dyn Fn(u64, std::time::Duration)) -> io::Result<u64> {
    let mut flushed_bytes = 0u64;
    loop {
        persist_epochs_locked(log).await?;
        let work = {
            let l = log.borrow();
            l.segments
                .iter()
                .position(|s| s.needs_flush())
                .map(|i| (l.segments[i].base_offset, l.segments[i].file.clone(), l.segments[i].path.clone()))
        };
        let Some((base, file, path)) = work else { return Ok(flushed_bytes) };
        let file = match file {
            Some(f) => f,
            None => {
                let f = Rc::new(super::segment::open_rw(&path, true).await?);
                with_segment(log, base, |s| s.file = Some(f.clone()));
                f
            }
        };
        let plan = {
            let l = log.borrow();
            let settings = l.settings.segment;
            l.segments.iter().find(|s| s.base_offset == base).and_then(|s| s.plan_flush(file.clone(), &settings))
        };
        if let Some(mut plan) = plan {
            let started = std::time::Instant::now();
            if let Some(to) = plan.preallocate_to {
                // Preallocation is an optimisation; a filesystem without it still works.
                if let Err(e) = file.pre_allocate(to, false).await {
                    log::debug!("{}: fallocate to {to} failed: {e}", path.display());
                }
            }
            let preallocated = std::time::Instant::now();
            // At most `writes_inflight_max` writes of this segment are on the
            // device at once (the queue depth iotune found best); they are
            // disjoint, so their order does not matter.
            let inflight_max = log.borrow().writes_inflight_max.max(1);
            // A round of one write (a small flush: the latency-bound case)
            // goes through the O_DSYNC handle and needs no fdatasync after it.
            let dsync = if plan.writes.len() == 1 {
                let open =
                    log.borrow().segments.iter().find(|s| s.base_offset == base).and_then(|s| s.dsync_file.clone());
                match open {
                    Some(f) => Some(f),
                    None => match super::segment::open_dsync(&path).await {
                        Ok(f) => {
                            let f = Rc::new(f);
                            with_segment(log, base, |s| s.dsync_file = Some(f.clone()));
                            Some(f)
                        }
                        Err(e) => {
                            log::debug!("{}: O_DSYNC open failed ({e}); write + fdatasync instead", path.display());
                            None
                        }
                    },
                }
            } else {
                None
            };
            let write_file = dsync.clone().unwrap_or_else(|| file.clone());
            let zero = plan.zero.take().map(|(pos, buf)| {
                let file = file.clone();
                let path = &path;
                async move {
                    let len = buf.len();
                    match file.write_rc_at(buf, pos).await {
                        Ok(n) => {
                            super::note_segment_write(n as u64);
                            (n == len).then_some(pos + len as u64)
                        }
                        // Zeros only save the next rounds a conversion: a
                        // failure here loses nothing (and a failing disk
                        // shows in the data writes).
                        Err(e) => {
                            log::debug!("{}: zero-ahead write at {pos} failed: {e}", path.display());
                            None
                        }
                    }
                }
            });
            let data = async {
                let mut writes = std::mem::take(&mut plan.writes).into_iter().peekable();
                while writes.peek().is_some() {
                    let wave: Vec<(u64, DmaBuffer)> = writes.by_ref().take(inflight_max).collect();
                    let results = join_all(wave.into_iter().map(|(pos, buf)| {
                        let file = write_file.clone();
                        async move {
                            let len = buf.len();
                            let n = file.write_at(buf, pos).await.map_err(io::Error::from)?;
                            if n != len {
                                return Err(io::Error::new(
                                    io::ErrorKind::WriteZero,
                                    format!("short write {n}/{len} at {pos}"),
                                ));
                            }
                            super::note_segment_write(n as u64);
                            Ok(())
                        }
                    }))
                    .await;
                    for r in results {
                        r?;
                    }
                }
                io::Result::Ok(())
            };
            let (data, zeroed_to) = match zero {
                Some(zero) => futures::join!(data, zero),
                None => (data.await, None),
            };
            data?;
            plan.zeroed_to = zeroed_to;
            let written = std::time::Instant::now();
            if dsync.is_none() {
                file.fdatasync().await.map_err(io::Error::from)?;
            }
            let synced = std::time::Instant::now();
            if let Some(unlogged) = (synced - started >= SLOW_FLUSH).then(|| slow_flush_report(synced)).flatten() {
                let l = log.borrow();
                log::warn!(
                    "{}-{}: slow flush of segment {} (next offset {}, position {}): {} ms (preallocate {} ms{}, writes {} ms, fdatasync {} ms); \
                     acks=all produces waited as long; {unlogged} more slow flush(es) on this shard since the last such line \
                     (check the disk: iostat -x, dmesg, other writers on the filesystem)",
                    l.topic,
                    l.partition.0,
                    base.0,
                    plan.next_offset.0,
                    plan.end_bytes,
                    (synced - started).as_millis(),
                    (preallocated - started).as_millis(),
                    match plan.preallocate_to {
                        Some(to) => format!(" to {to}"),
                        None => String::new(),
                    },
                    (written - preallocated).as_millis(),
                    (synced - written).as_millis(),
                );
            }
            let mut l = log.borrow_mut();
            let Some(i) = l.segments.iter().position(|s| s.base_offset == base) else { return Ok(flushed_bytes) };
            let mut position = l.segments[i].durable_bytes;
            let durable = l.segments[i].complete_flush(plan);
            let round_bytes = durable.iter().map(|b| b.bytes.len() as u64).sum::<u64>();
            flushed_bytes += round_bytes;
            if l.replication_bound.is_some() {
                for b in &durable {
                    let next_offset = b.last_offset.next();
                    if next_offset > l.high_watermark {
                        l.above_hw.push_back(DurableBatch {
                            base_offset: b.base_offset,
                            next_offset,
                            segment_base: base,
                            position,
                        });
                    }
                    position += b.bytes.len() as u64;
                }
            }
            // Segments flush in order, so every earlier segment is durable.
            let end = l.segments[i].durable_next_offset;
            if end > l.durable_end {
                l.durable_end = end;
            }
            l.update_high_watermark();
            let admitted = l.cache_durable(durable);
            let budget = l.cache_budget.clone();
            drop(l);
            if let Some(budget) = budget {
                budget.admit(log, admitted);
            }
            on_durable(round_bytes, started.elapsed());
            continue;
        }
        // Nothing pending: this segment only needs sealing.
        let segment = {
            let mut l = log.borrow_mut();
            let Some(i) = l.segments.iter().position(|s| s.base_offset == base) else { return Ok(flushed_bytes) };
            // Take it out while sealing so no borrow spans the await.
            std::mem::replace(&mut l.segments[i], Segment::new(Path::new(""), base, 0))
        };
        let mut segment = segment;
        let result = segment.seal().await;
        with_segment(log, base, |s| *s = segment);
        result?;
        log::debug!("{}: sealed", path.display());
    }
}

/// Writes the leader epoch checkpoint if the cache changed since the last
/// write. Waits for a running flush or truncation (they write it too).
pub async fn persist_epochs(log: &SharedLog) -> io::Result<()> {
    let lock = log.borrow().io_lock.clone();
    let _io = lock.lock().await;
    persist_epochs_locked(log).await
}

/// `persist_epochs` for a caller holding `io_lock`, which keeps two writes
/// of the checkpoint from racing.
async fn persist_epochs_locked(log: &SharedLog) -> io::Result<()> {
    let (dir, entries) = {
        let mut l = log.borrow_mut();
        if !l.epochs.dirty {
            return Ok(());
        }
        l.epochs.dirty = false;
        (l.dir.clone(), l.epochs.entries().to_vec())
    };
    let written = glommio::executor().spawn_blocking(move || super::epochs::write(&dir, &entries)).await;
    if written.is_err() {
        log.borrow_mut().epochs.dirty = true;
    }
    written
}

/// On open: the leader epoch cache from its checkpoint, without the entries
/// at or after the recovered log end (their batches did not survive). A
/// malformed checkpoint is rebuilt from the leader epochs of the batches.
async fn load_epochs(log: &SharedLog, saved: Option<Result<Vec<super::epochs::EpochEntry>, String>>) -> io::Result<()> {
    let entries = match saved {
        None => return Ok(()),
        Some(Ok(entries)) => entries,
        Some(Err(why)) => {
            let (name, start) = {
                let l = log.borrow();
                (format!("{}-{}", l.topic, l.partition.0), l.log_start_offset)
            };
            log::warn!("{name}: {} is malformed ({why}); rebuilding it from the log", super::epochs::CHECKPOINT_FILE);
            let mut cache = LeaderEpochCache::default();
            let batches = for_each_durable_batch(log, start, |h| {
                if cache.is_newer(h.leader_epoch()) {
                    cache.assign(h.leader_epoch(), h.base_offset());
                }
            })
            .await?;
            log::info!("{name}: leader epochs rebuilt from {batches} batch header(s): {:?}", cache.entries());
            cache.dirty = true;
            log.borrow_mut().epochs = cache;
            return Ok(());
        }
    };
    let mut l = log.borrow_mut();
    let mut cache = LeaderEpochCache::from_entries(entries);
    let end = l.log_end_offset();
    if cache.truncate_from_end(end) {
        log::info!(
            "{}-{}: leader epochs starting at or after the log end offset {} dropped; now {:?}",
            l.topic,
            l.partition.0,
            end.0,
            cache.entries()
        );
    }
    l.epochs = cache;
    Ok(())
}

/// Calls `f` with the header of every durable batch from `from` on, in
/// order (a recovery scan: whole batches are read into memory). Returns how
/// many it saw.
pub async fn for_each_durable_batch(
    log: &SharedLog,
    from: Offset,
    mut f: impl FnMut(&BatchHeader<'_>),
) -> io::Result<usize> {
    let mut offset = from;
    let mut batches = 0;
    loop {
        let r = read_with(log, offset, 4 << 20, true, ReadLimit::DurableEnd).await?;
        if r.bytes == 0 {
            return Ok(batches);
        }
        let mut next = offset;
        for chunk in &r.chunks {
            let mut at = 0;
            while at + BATCH_HEADER_BYTES <= chunk.len() {
                let Ok(h) = BatchHeader::parse(&chunk[at..]) else { break };
                if h.last_offset() >= offset {
                    f(&h);
                    batches += 1;
                }
                next = next.max(h.last_offset().next());
                at += h.size_bytes();
            }
        }
        if next <= offset {
            return Ok(batches);
        }
        offset = next;
    }
}

/// Where the batch holding `offset` starts (pending or durable); `None`
/// when the log does not hold it. Reads batch headers from the index
/// position on for a durable one.
pub async fn locate_batch(log: &SharedLog, offset: Offset) -> io::Result<Option<BatchPosition>> {
    let (dma, segment_base, pos, limit) = {
        let l = log.borrow();
        if offset < l.log_start_offset || offset >= l.log_end_offset() {
            return Ok(None);
        }
        let i = l.segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1);
        let seg = &l.segments[i];
        if offset >= seg.durable_next_offset {
            let mut position = seg.durable_bytes;
            for p in &seg.pending {
                if p.last_offset >= offset {
                    return Ok(Some(BatchPosition { segment_base: seg.base_offset, position }));
                }
                position += p.bytes.len() as u64;
            }
            return Ok(None);
        }
        let Some(dma) = seg.file.clone() else { return Ok(None) };
        (dma, seg.base_offset, seg.index.position_for(seg.base_offset, offset), seg.durable_bytes)
    };
    let (found, _) = find_batch(&dma, pos, limit, offset).await?;
    Ok(found.map(|f| BatchPosition { segment_base, position: f.position }))
}

/// Finds where the first batch of every unstable transaction whose
/// position producer state does not know is (after `producer_state::rebuild`,
/// which replays headers without positions), so read_committed reads stop
/// exactly at the last stable offset.
pub async fn locate_txn_starts(log: &SharedLog) -> io::Result<()> {
    let offsets = log.borrow().producers.unpositioned_txns();
    for offset in offsets {
        let truncations = log.borrow().truncations;
        let found = locate_batch(log, offset).await?;
        let mut l = log.borrow_mut();
        if let Some(at) = found.filter(|_| l.truncations == truncations) {
            l.producers.set_txn_position(offset, at);
        }
    }
    Ok(())
}

fn with_segment(log: &SharedLog, base: Offset, f: impl FnOnce(&mut Segment)) {
    let mut l = log.borrow_mut();
    if let Some(s) = l.segments.iter_mut().find(|s| s.base_offset == base) {
        f(s);
    }
}

/// Reads whole batches from `offset` up to `max_bytes` of durable data
/// (at least one batch when `at_least_one`) into memory: from the cache when
/// it holds `offset`, else copied out of the segment file with O_DIRECT reads.
/// For the broker's own readers (group and producer-state recovery, ListOffsets
/// by time); client fetches use `read_for_fetch`, which never copies data.
pub async fn read(log: &SharedLog, offset: Offset, max_bytes: usize, at_least_one: bool) -> io::Result<ReadResult> {
    read_with(log, offset, max_bytes, at_least_one, ReadLimit::HighWatermark).await
}

/// `read` up to `limit` (the durable end, for recovery of a follower's own state).
pub async fn read_with(
    log: &SharedLog,
    offset: Offset,
    max_bytes: usize,
    at_least_one: bool,
    read_limit: ReadLimit,
) -> io::Result<ReadResult> {
    let (file, mut pos, limit, next_segment_base) = {
        let l = log.borrow();
        if offset >= l.read_upper(read_limit) || offset < l.log_start_offset {
            return Ok(ReadResult::default());
        }
        if let Some(r) = l.read_cached(offset, max_bytes, at_least_one, read_limit) {
            return Ok(r);
        }
        let i = l.segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1);
        let seg = &l.segments[i];
        let Some(file) = seg.file.clone() else { return Ok(ReadResult::default()) };
        (
            file,
            seg.index.position_for(seg.base_offset, offset),
            l.readable_bytes(i, read_limit),
            l.segments.get(i + 1).map(|s| s.base_offset),
        )
    };
    let mut out = BytesMut::new();
    let window_min = max_bytes.clamp(64 << 10, 8 << 20);
    let mut taken = 0usize;
    'outer: while pos + (BATCH_LOG_OVERHEAD_BYTES as u64) <= limit {
        let want = window_min.min((limit - pos) as usize);
        let chunk = file.read_at(pos, want).await.map_err(io::Error::from)?;
        let mut at = 0usize;
        while at + BATCH_HEADER_BYTES <= chunk.len() {
            let Ok(header) = BatchHeader::parse(&chunk[at..]) else { break 'outer };
            let size = header.size_bytes();
            if header.last_offset() < offset {
                at += size;
                if at > chunk.len() {
                    // Skipped batch extends past the window: continue after it.
                    pos += at as u64;
                    continue 'outer;
                }
                continue;
            }
            if taken + size > max_bytes && !(at_least_one && taken == 0) {
                break 'outer;
            }
            if at + size > chunk.len() {
                if at == 0 {
                    // A single batch larger than the window: read it whole.
                    let whole = file.read_at(pos, size).await.map_err(io::Error::from)?;
                    if whole.len() < size {
                        break 'outer;
                    }
                    out.extend_from_slice(&whole[..size]);
                    taken += size;
                    pos += size as u64;
                    continue 'outer;
                }
                pos += at as u64;
                continue 'outer;
            }
            out.extend_from_slice(&chunk[at..at + size]);
            taken += size;
            at += size;
        }
        if at == 0 {
            break;
        }
        pos += at as u64;
    }
    if taken == 0 {
        // The offset may sit in a segment's tail with nothing readable (the
        // next batch lives in the following segment).
        if let Some(next) = next_segment_base {
            if next > offset {
                return Box::pin(read_with(log, next, max_bytes, at_least_one, read_limit)).await;
            }
        }
        return Ok(ReadResult::default());
    }
    Ok(ReadResult { chunks: vec![out.freeze()], bytes: taken })
}

/// A piece of a partition's records in a Fetch response.
pub enum RecordsPart {
    /// Batches held in memory (the recent-batch cache): sent as `Bytes`.
    Memory(Bytes),
    /// A region of a segment file: sent with sendfile, never read by us.
    File { file: Arc<std::fs::File>, position: u64, len: u64 },
}

/// What a Fetch sends for one partition.
#[derive(Default)]
pub struct FetchRead {
    pub parts: Vec<RecordsPart>,
    pub bytes: usize,
    /// Bytes read through user space to find the first batch (headers).
    pub located_bytes: usize,
}

/// Bytes read to find the first batch of a cold fetch (headers only matter).
const LOCATE_WINDOW_BYTES: usize = 16 << 10;

/// Where a Fetch from some offset starts: the I/O half of planning a read.
/// `locate` does the waiting (disk reads of batch headers, opening the read
/// fd); `plan` applies the byte limits without waiting, so a Fetch can
/// locate all its partitions at once and then share its `max_bytes` between
/// them in request order.
pub enum Located {
    /// Nothing durable at or after the offset.
    Empty,
    /// The recent-batch cache held the offset when it was located: `from`,
    /// which is past the offset asked for when that fell in a gap (records
    /// compaction removed at the end of a segment) before the cached ones.
    Cached { limit: ReadLimit, from: Offset },
    /// The batch holding the offset starts at `start` in `file` and is
    /// `first_size` bytes long; `limit` is the segment's durable size.
    File { file: Arc<std::fs::File>, start: u64, first_size: usize, limit: u64, located_bytes: usize },
}

/// The first batch of a segment file whose last offset reaches some offset.
#[derive(Clone, Copy, Debug)]
struct FoundBatch {
    position: u64,
    size_bytes: usize,
    base_offset: Offset,
}

/// Reads batch headers of `file` from `pos` (a batch boundary) up to `limit`
/// and returns the first batch whose last offset is >= `offset`, with the
/// bytes read to find it.
async fn find_batch(
    file: &glommio::io::DmaFile,
    mut pos: u64,
    limit: u64,
    offset: Offset,
) -> io::Result<(Option<FoundBatch>, usize)> {
    let mut read_bytes = 0usize;
    while pos + BATCH_HEADER_BYTES as u64 <= limit {
        let want = LOCATE_WINDOW_BYTES.min((limit - pos) as usize);
        let window = file.read_at(pos, want).await.map_err(io::Error::from)?;
        read_bytes += window.len();
        let mut at = 0usize;
        while at + BATCH_HEADER_BYTES <= window.len() {
            let Ok(h) = BatchHeader::parse(&window[at..]) else { return Ok((None, read_bytes)) };
            if h.last_offset() >= offset {
                let found =
                    FoundBatch { position: pos + at as u64, size_bytes: h.size_bytes(), base_offset: h.base_offset() };
                return Ok((Some(found), read_bytes));
            }
            at += h.size_bytes();
        }
        if at == 0 {
            break;
        }
        pos += at as u64;
    }
    Ok((None, read_bytes))
}

/// Every batch of `file` from `pos` (a batch boundary) up to `limit` bytes
/// whose base offset is below `end`: (position, base offset, next offset).
/// Only headers matter; reads go in `LOCATE_WINDOW_BYTES` windows.
async fn batch_positions(
    file: &glommio::io::DmaFile,
    mut pos: u64,
    limit: u64,
    end: Offset,
) -> io::Result<Vec<(u64, Offset, Offset)>> {
    let mut out = Vec::new();
    while pos + BATCH_HEADER_BYTES as u64 <= limit {
        let want = LOCATE_WINDOW_BYTES.min((limit - pos) as usize);
        let window = file.read_at(pos, want).await.map_err(io::Error::from)?;
        let mut at = 0usize;
        while at + BATCH_HEADER_BYTES <= window.len() && pos + (at as u64) < limit {
            let Ok(h) = BatchHeader::parse(&window[at..]) else { return Ok(out) };
            if h.base_offset() >= end {
                return Ok(out);
            }
            out.push((pos + at as u64, h.base_offset(), h.last_offset().next()));
            at += h.size_bytes();
        }
        if at == 0 {
            break;
        }
        pos += at as u64;
    }
    Ok(out)
}

/// Replaces the coarse stand-in `hold_high_watermark` put in front of
/// `above_hw` with the exact durable batches it covers (their positions read
/// from the segment files), so consumers' reads stop exactly at the high
/// watermark as it moves. Runs once after a hold; a truncation meanwhile
/// makes it start over. A no-op when there is nothing coarse left.
pub async fn refine_above_hw(log: &SharedLog) -> io::Result<()> {
    loop {
        let (coarse, truncations, segments) = {
            let l = log.borrow();
            let Some(coarse) = l.above_hw.front().copied().filter(|_| l.above_hw_coarse) else { return Ok(()) };
            let segments: Vec<(Offset, Option<Rc<glommio::io::DmaFile>>, u64)> = l
                .segments
                .iter()
                .filter(|s| s.base_offset >= coarse.segment_base && s.base_offset < coarse.next_offset)
                .map(|s| (s.base_offset, s.file.clone(), s.durable_bytes))
                .collect();
            (coarse, l.truncations, segments)
        };
        let mut exact: Vec<DurableBatch> = Vec::new();
        for (base, file, durable_bytes) in segments {
            let Some(file) = file else { continue };
            let from = if base == coarse.segment_base { coarse.position } else { 0 };
            for (position, base_offset, next_offset) in
                batch_positions(&file, from, durable_bytes, coarse.next_offset).await?
            {
                exact.push(DurableBatch { base_offset, next_offset, segment_base: base, position });
            }
        }
        let mut l = log.borrow_mut();
        if l.truncations != truncations {
            continue;
        }
        if !l.above_hw_coarse
            || l.above_hw.front().map(|b| (b.base_offset, b.next_offset))
                != Some((coarse.base_offset, coarse.next_offset))
        {
            return Ok(());
        }
        l.above_hw.pop_front();
        l.above_hw_coarse = false;
        let hw = l.high_watermark;
        for b in exact.into_iter().rev().filter(|b| b.next_offset > hw) {
            l.above_hw.push_front(b);
        }
        log::debug!(
            "{}-{}: {} durable batch(es) above the high watermark {} located",
            l.topic,
            l.partition.0,
            l.above_hw.len(),
            hw.0
        );
        return Ok(());
    }
}

/// Finds where a Fetch from `offset` starts: in the recent-batch cache, or at
/// the batch containing `offset` in a segment file. Only batch headers near
/// the index position are read (through O_DIRECT); the record data never
/// enters user space. Consumers' view: below the high watermark.
pub async fn locate(log: &SharedLog, offset: Offset) -> io::Result<Located> {
    locate_with(log, offset, ReadLimit::HighWatermark).await
}

/// `locate` for reads up to `read_limit` (`DurableEnd` for a follower's fetch).
pub async fn locate_with(log: &SharedLog, offset: Offset, read_limit: ReadLimit) -> io::Result<Located> {
    let mut offset = offset;
    loop {
        let (dma, reader, path, base, pos, limit, next_base) = {
            let l = log.borrow();
            if offset >= l.read_upper(read_limit) || offset < l.log_start_offset {
                return Ok(Located::Empty);
            }
            if l.cache_holds(offset) {
                return Ok(Located::Cached { limit: read_limit, from: offset });
            }
            let i = l.segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1);
            let seg = &l.segments[i];
            let Some(dma) = seg.file.clone() else { return Ok(Located::Empty) };
            (
                dma,
                seg.reader.clone(),
                seg.path.clone(),
                seg.base_offset,
                seg.index.position_for(seg.base_offset, offset),
                l.readable_bytes(i, read_limit),
                l.segments.get(i + 1).map(|s| s.base_offset),
            )
        };
        // Find the first batch whose last offset reaches `offset`.
        let (found, located_bytes) = find_batch(&dma, pos, limit, offset).await?;
        let Some(FoundBatch { position: start, size_bytes: first_size, .. }) = found else {
            // Nothing at or after `offset` in this segment: the next one has it.
            match next_base {
                Some(next) if next > offset => {
                    offset = next;
                    continue;
                }
                _ => return Ok(Located::Empty),
            }
        };
        let file = match reader {
            Some(r) => r,
            None => {
                let p = path.clone();
                let f = Arc::new(glommio::executor().spawn_blocking(move || super::segment::open_reader(&p)).await?);
                let mut l = log.borrow_mut();
                match l.segments.iter_mut().find(|s| s.base_offset == base) {
                    // Still the file the position was found in: keep the fd
                    // (or one another task opened meanwhile, before a
                    // compaction swap renamed a new file over this path).
                    Some(s) if s.file.as_ref().is_some_and(|f| Rc::ptr_eq(f, &dma)) => match &s.reader {
                        Some(r) => r.clone(),
                        None => {
                            s.reader = Some(f.clone());
                            f
                        }
                    },
                    // Swapped by compaction or deleted while we opened: locate again.
                    _ => continue,
                }
            }
        };
        return Ok(Located::File { file, start, first_size, limit, located_bytes });
    }
}

/// Plans the records for a Fetch from `offset` once it is located, as Kafka
/// does it: from the recent-batch cache as whole batches; otherwise as one
/// region of one segment file starting at the batch that contains `offset`
/// and running for up to `max_bytes` (so the last batch may be cut short,
/// which clients discard), or for the whole first batch when `at_least_one`
/// and it is larger (KIP-74). Only durable data is ever returned. `None` when
/// the cache no longer holds what `locate` saw there: locate again.
pub fn plan(
    log: &SharedLog,
    offset: Offset,
    located: Located,
    max_bytes: usize,
    at_least_one: bool,
) -> Option<FetchRead> {
    match located {
        Located::Empty => Some(FetchRead::default()),
        Located::Cached { limit, from } => {
            let r = log.borrow().read_cached(offset.max(from), max_bytes, at_least_one, limit)?;
            Some(FetchRead {
                bytes: r.bytes,
                parts: r.chunks.into_iter().map(RecordsPart::Memory).collect(),
                located_bytes: 0,
            })
        }
        Located::File { file, start, first_size, limit, located_bytes } => {
            if !at_least_one && first_size > max_bytes {
                return Some(FetchRead { located_bytes, ..Default::default() });
            }
            let wanted = if at_least_one { max_bytes.max(first_size) } else { max_bytes } as u64;
            let len = wanted.min(limit - start);
            Some(FetchRead {
                bytes: len as usize,
                parts: vec![RecordsPart::File { file, position: start, len }],
                located_bytes,
            })
        }
    }
}

/// `locate` then `plan`, for one partition on its own.
pub async fn read_for_fetch(
    log: &SharedLog,
    offset: Offset,
    max_bytes: usize,
    at_least_one: bool,
) -> io::Result<FetchRead> {
    read_for_fetch_with(log, offset, max_bytes, at_least_one, ReadLimit::HighWatermark).await
}

/// A follower replica's fetch: like `read_for_fetch`, up to the durable end
/// instead of the high watermark.
pub async fn read_for_replica(
    log: &SharedLog,
    offset: Offset,
    max_bytes: usize,
    at_least_one: bool,
) -> io::Result<FetchRead> {
    read_for_fetch_with(log, offset, max_bytes, at_least_one, ReadLimit::DurableEnd).await
}

/// `locate_with` then `plan`, for one partition on its own.
pub async fn read_for_fetch_with(
    log: &SharedLog,
    offset: Offset,
    max_bytes: usize,
    at_least_one: bool,
    limit: ReadLimit,
) -> io::Result<FetchRead> {
    loop {
        let located = locate_with(log, offset, limit).await?;
        if let Some(r) = plan(log, offset, located, max_bytes, at_least_one) {
            return Ok(r);
        }
    }
}

/// ListOffsets by timestamp: the first offset whose record timestamp is
/// >= `timestamp_ms`, with that timestamp; `None` when there is none.
pub async fn offset_for_timestamp(log: &SharedLog, timestamp_ms: i64) -> io::Result<Option<(Offset, i64)>> {
    let start = {
        let l = log.borrow();
        let Some(seg) = l.segments.iter().find(|s| s.max_timestamp_ms >= timestamp_ms && s.durable_bytes > 0) else {
            return Ok(None);
        };
        Offset(seg.base_offset.0 + seg.index.offset_for_time(timestamp_ms) as i64).max(l.log_start_offset)
    };
    let mut offset = start;
    loop {
        let r = read(log, offset, 1 << 20, true).await?;
        if r.bytes == 0 {
            return Ok(None);
        }
        for chunk in &r.chunks {
            let mut at = 0;
            while at + BATCH_HEADER_BYTES <= chunk.len() {
                let Ok(h) = BatchHeader::parse(&chunk[at..]) else { break };
                let size = h.size_bytes();
                if h.max_timestamp_ms() >= timestamp_ms && h.last_offset() >= offset {
                    // LogAppendTime batches carry one time for every record.
                    if !h.is_log_append_time() {
                        let batch = &chunk[at..at + size.min(chunk.len() - at)];
                        if let Some(found) = first_record_at_or_after(batch, timestamp_ms, offset) {
                            return Ok(Some(found));
                        }
                    }
                    return Ok(Some((h.base_offset().max(offset), h.max_timestamp_ms())));
                }
                offset = h.last_offset().next();
                at += size;
            }
        }
    }
}

/// The first record of `b` at offset >= `from` whose timestamp is >= the
/// target, decompressing the records of a compressed batch (the answer must be
/// the record, as Kafka gives it, not the batch).
fn first_record_at_or_after(b: &[u8], target_ms: i64, from: Offset) -> Option<(Offset, i64)> {
    let h = BatchHeader::parse(b).ok()?;
    let records = b.get(BATCH_HEADER_BYTES..h.size_bytes().min(b.len()))?;
    match h.compression() {
        Compression::None => walk_records(records, &h, target_ms, from),
        codec => {
            let plain = super::codec::decompress(records, codec, super::codec::DECOMPRESSED_MAX_BYTES).ok()?;
            walk_records(&plain, &h, target_ms, from)
        }
    }
}

fn walk_records(records: &[u8], h: &BatchHeader<'_>, target_ms: i64, from: Offset) -> Option<(Offset, i64)> {
    let mut at = 0;
    for _ in 0..h.record_count() {
        let (len, n) = batch::get_varint(records.get(at..)?)?;
        let body_start = at + n;
        let body = records.get(body_start..body_start + usize::try_from(len).ok()?)?;
        let (ts_delta, n1) = batch::get_varint(body.get(1..)?)?;
        let (off_delta, _) = batch::get_varint(body.get(1 + n1..)?)?;
        // Producer-written fields: saturate rather than overflow.
        let ts = h.base_timestamp_ms().saturating_add(ts_delta);
        let offset = Offset(h.base_offset().0.saturating_add(off_delta));
        if ts >= target_ms && offset >= from {
            return Some((offset, ts));
        }
        at = body_start + len as usize;
    }
    None
}

/// Lifecycle operations (log start offset, deleting old segments, stats),
/// used by DeleteRecords, retention and metrics.
impl PartitionLog {
    /// Size and memory figures for metrics and DescribeLogDirs.
    pub fn stats(&self) -> LogStats {
        LogStats {
            segments: self.segments.len() as u64,
            bytes: self.segments.iter().map(|s| s.end_bytes).sum(),
            cache_bytes: self.cache_bytes as u64,
            pending_bytes: self.pending_bytes(),
        }
    }

    /// Calls `f` with the header of every appended batch not yet durable, in order.
    pub fn for_each_pending(&self, mut f: impl FnMut(&BatchHeader<'_>)) {
        for p in self.segments.iter().flat_map(|s| s.pending.iter()) {
            if let Ok(h) = BatchHeader::parse(&p.bytes) {
                f(&h);
            }
        }
    }

    /// Bytes appended and not yet handed to the flusher's writes.
    pub fn pending_bytes(&self) -> u64 {
        self.segments.iter().flat_map(|s| s.pending.iter()).map(|p| p.bytes.len() as u64).sum()
    }

    /// What retention and DeleteRecords may look at: every segment but the
    /// active one, oldest first, as (base offset, bytes, max timestamp, sealed).
    pub fn inactive_segments(&self) -> Vec<SegmentInfo> {
        let n = self.segments.len().saturating_sub(1);
        self.segments[..n]
            .iter()
            .map(|s| SegmentInfo {
                base_offset: s.base_offset,
                next_offset: s.next_offset,
                bytes: s.end_bytes,
                max_timestamp_ms: s.max_timestamp_ms,
                first_timestamp_ms: s.index.times.first().map(|t| t.timestamp_ms).unwrap_or(-1),
                sealed: s.sealed,
            })
            .collect()
    }

    /// The active segment as compaction sees it: `bytes` is its durable size.
    pub fn active_segment_info(&self) -> SegmentInfo {
        let s = self.active();
        SegmentInfo {
            base_offset: s.base_offset,
            next_offset: s.durable_next_offset,
            bytes: s.durable_bytes,
            max_timestamp_ms: s.max_timestamp_ms,
            first_timestamp_ms: s.index.times.first().map(|t| t.timestamp_ms).unwrap_or(-1),
            sealed: s.sealed,
        }
    }

    /// Compaction: gives the sealed segment at `base` a buffered read fd for
    /// its current file if it has none, so fetches keep reading this inode
    /// after a cleaned file is renamed over its path.
    pub fn set_reader_if_none(&mut self, base: Offset, reader: Arc<std::fs::File>) {
        if let Some(s) = self.segments.iter_mut().find(|s| s.base_offset == base && s.sealed) {
            if s.reader.is_none() {
                s.reader = Some(reader);
            }
        }
    }

    /// Compaction: whether `bases` are consecutive sealed, inactive
    /// segments ending at `end` (the next segment's base).
    pub fn has_sealed_segments(&self, bases: &[Offset], end: Offset) -> bool {
        let n = self.segments.len().saturating_sub(1);
        let Some(i) = bases.first().and_then(|b| self.segments[..n].iter().position(|s| s.base_offset == *b)) else {
            return false;
        };
        let group = &self.segments[i..];
        group.len() > bases.len()
            && group.iter().zip(bases).all(|(s, b)| s.base_offset == *b && s.sealed)
            && group[bases.len() - 1].next_offset == end
            && group[bases.len()].base_offset == end
    }

    /// Compaction: swaps the sealed, inactive segments from `base` up to
    /// `end` (the next segment's base) for their cleaned, merged rewrite
    /// (already renamed over `base`'s path and indexed on disk): the first
    /// takes the new file, the others leave the log. Fetches holding an old
    /// file keep reading the old inode. Cached batches outside the active
    /// segment are dropped, since they may hold records the rewrite
    /// removed. `false` when a segment is gone.
    pub fn swap_cleaned_segments(
        &mut self,
        base: Offset,
        end: Offset,
        file: Rc<glommio::io::DmaFile>,
        bytes: u64,
        index: super::index::SegmentIndex,
        max_timestamp_ms: i64,
    ) -> bool {
        let n = self.segments.len().saturating_sub(1);
        let Some(i) = self.segments[..n].iter().position(|s| s.base_offset == base && s.sealed) else {
            return false;
        };
        let merged = self.segments[i + 1..n].iter().take_while(|s| s.base_offset < end).count();
        if self.segments[i + 1 + merged].base_offset != end || !self.segments[i..=i + merged].iter().all(|s| s.sealed) {
            return false;
        }
        self.segments.drain(i + 1..=i + merged);
        let s = &mut self.segments[i];
        s.file = Some(file);
        s.reader = None;
        s.end_bytes = bytes;
        s.durable_bytes = bytes;
        s.next_offset = end;
        s.durable_next_offset = end;
        s.index = index;
        s.max_timestamp_ms = max_timestamp_ms;
        let active_base = self.active().base_offset;
        while self.cache.front().is_some_and(|b| b.base_offset < active_base) {
            if let Some(old) = self.cache.pop_front() {
                self.cache_bytes -= old.bytes.len();
            }
        }
        true
    }

    /// Moves the log start offset forward (never back, never past the high
    /// watermark) and drops cached batches wholly below it.
    pub fn advance_log_start(&mut self, offset: Offset) -> Offset {
        let to = offset.min(self.high_watermark);
        if to > self.log_start_offset {
            self.log_start_offset = to;
            self.epochs.truncate_from_start(to);
            self.producers.on_log_start(to);
            while self.cache.front().is_some_and(|b| b.last_offset < to) {
                if let Some(old) = self.cache.pop_front() {
                    self.cache_bytes -= old.bytes.len();
                }
            }
        }
        self.log_start_offset
    }

    /// Removes the leading sealed segments that end at or below `offset` (the
    /// active segment is never removed) and returns their paths, for the
    /// caller to delete off the shard thread.
    pub fn remove_segments_below(&mut self, offset: Offset) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        while self.segments.len() > 1 {
            let s = &self.segments[0];
            if !(s.sealed && s.next_offset <= offset) {
                break;
            }
            let s = self.segments.remove(0);
            out.push((s.path.clone(), s.end_bytes));
        }
        out
    }
}

/// Sizes of one partition log.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogStats {
    pub segments: u64,
    pub bytes: u64,
    pub cache_bytes: u64,
    pub pending_bytes: u64,
}

/// An inactive segment as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base_offset: Offset,
    pub next_offset: Offset,
    pub bytes: u64,
    pub max_timestamp_ms: i64,
    /// The first batch's (max) timestamp, -1 when unknown: where
    /// `max.compaction.lag.ms` counts from, as Kafka's first-batch timestamp.
    pub first_timestamp_ms: i64,
    pub sealed: bool,
}

mod truncate;
pub use truncate::{truncate_fully, truncate_to};

#[cfg(test)]
mod tests;
