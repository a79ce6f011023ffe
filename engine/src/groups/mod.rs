//! The consumer group coordinator of one shard: the groups whose
//! `__consumer_offsets` partition this shard owns, their committed offsets,
//! and the durable log of both.
//!
//! Lives on its shard only (a field of `Shard`, `RefCell`s, no cross-core
//! calls). Which shard coordinates a group is Kafka's rule:
//! `partition = abs(java_string_hash(group_id)) % partitions of __consumer_offsets`,
//! and the coordinator is that partition's owning shard. `__consumer_offsets`
//! is created at start-up with one partition per shard, partition p on shard
//! p, so every commit is an append to a partition of the shard that received
//! it (see `internal_placement`).
//!
//! Lifecycle: `run` waits until the shard's `__consumer_offsets` partitions
//! are open, replays them from the log start (committed offsets, group
//! metadata, tombstones), marks the coordinator loaded (until then group
//! requests get COORDINATOR_LOAD_IN_PROGRESS), then ticks every 100 ms to
//! expire sessions, rebalance timeouts and offsets of long-empty groups.
//! Record format: `records`. State machine: `group`.

pub mod group;
pub mod records;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidelog_protocol::{Epoch, ErrorCode, Offset};

use crate::config::Config;
use crate::shard::{NewTopic, Shard};
use crate::storage::partition;
use group::{Group, GroupLimits, GroupState};
use records::{OffsetValue, Record};

/// The internal topic holding committed offsets and group metadata.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// How often sessions and rebalance timeouts are checked.
const TICK: Duration = Duration::from_millis(100);
/// Bytes read per step while replaying `__consumer_offsets` at start-up.
const LOAD_READ_BYTES: usize = 4 << 20;

/// Java's `String.hashCode` (over UTF-16 code units), which Kafka uses to
/// map a group id to its `__consumer_offsets` partition.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

/// Kafka's `partitionFor(groupId)`: `Utils.abs(hash) % partitions`.
pub fn partition_for(group_id: &str, partitions: usize) -> i32 {
    let h = java_string_hash(group_id);
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    (abs as i64 % partitions.max(1) as i64) as i32
}

/// Placement of internal topics: `__consumer_offsets` partition p on shard
/// p (mod the shard count). `None` for every other topic.
pub fn internal_placement(name: &str, partitions: usize, num_shards: usize) -> Option<Vec<u32>> {
    (name == OFFSETS_TOPIC).then(|| (0..partitions).map(|p| (p % num_shards.max(1)) as u32).collect())
}

/// A committed offset and where its record sits in `__consumer_offsets`
/// (commits that become durable out of order are applied by log position).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub value: OffsetValue,
    pub log_offset: i64,
}

/// Settings read from the broker config (`group.*`, `offset*`).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub limits: GroupLimits,
    pub metadata_max_bytes: usize,
    pub offsets_retention: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        let num = |name: &str, default: i64| -> i64 {
            config.values.get(name).and_then(|(v, _)| v.trim().parse::<i64>().ok()).unwrap_or(default)
        };
        Settings {
            limits: GroupLimits {
                min_session_timeout_ms: num("group.min.session.timeout.ms", 6000).clamp(1, i32::MAX as i64) as i32,
                max_session_timeout_ms: num("group.max.session.timeout.ms", 1_800_000).clamp(1, i32::MAX as i64) as i32,
                initial_rebalance_delay_ms: num("group.initial.rebalance.delay.ms", 0).max(0) as u64,
                max_size: num("group.max.size", 1000).max(1) as usize,
            },
            metadata_max_bytes: num("offset.metadata.max.bytes", 4096).max(0) as usize,
            offsets_retention: Duration::from_secs(num("offsets.retention.minutes", 10080).max(1) as u64 * 60),
        }
    }
}

/// Offsets a transaction commits for one group: (topic, partition, value).
pub type TxnOffsets = Vec<(String, i32, OffsetValue)>;

/// One group's committed offsets by (topic, partition).
pub type GroupOffsets = BTreeMap<(String, i32), Committed>;

pub struct Coordinator {
    pub settings: Settings,
    pub groups: RefCell<HashMap<String, Group>>,
    /// Committed offsets: group -> (topic, partition) -> offset.
    pub offsets: RefCell<HashMap<String, GroupOffsets>>,
    loaded: Cell<bool>,
    /// `__consumer_offsets` partitions whose groups this shard serves (it
    /// leads them and has loaded them).
    serving: RefCell<std::collections::BTreeSet<i32>>,
    /// The latest group-metadata record written for each group, not yet
    /// known durable: answers that reveal that state wait for it
    /// (`wait_persisted`).
    persisting: RefCell<HashMap<String, (partition::SharedLog, Offset)>>,
    /// Transactional offset commits (TxnOffsetCommit) whose transaction has
    /// no marker yet: producer id -> group -> offsets. They become the
    /// group's committed offsets when the COMMIT marker is written to the
    /// group's partition, and are dropped on ABORT.
    pending_txn: RefCell<HashMap<i64, HashMap<String, TxnOffsets>>>,
}

/// What a change to a group looked like before, to tell whether it must be persisted.
pub type GroupMark = Option<(i32, GroupState, Vec<String>)>;

impl Coordinator {
    pub fn new(config: &Config) -> Coordinator {
        Coordinator {
            settings: Settings::from_config(config),
            groups: RefCell::new(HashMap::new()),
            offsets: RefCell::new(HashMap::new()),
            loaded: Cell::new(false),
            serving: RefCell::new(Default::default()),
            persisting: RefCell::new(HashMap::new()),
            pending_txn: RefCell::new(HashMap::new()),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.get()
    }

    /// The `__consumer_offsets` partition of `group_id` and the shard of this
    /// node that leads it (`NO_SHARD` when another node does), if that topic exists.
    pub fn partition_of(shard: &Shard, group_id: &str) -> Option<(i32, u32)> {
        let image = shard.image();
        let t = image.topics.get(OFFSETS_TOPIC)?;
        let p = partition_for(group_id, t.owners.len());
        Some((p, image.owner(OFFSETS_TOPIC, p)?.0))
    }

    /// The broker id leading `group_id`'s `__consumer_offsets` partition
    /// (its coordinator), if that topic exists and the partition has a leader.
    pub fn coordinator_broker(shard: &Shard, group_id: &str) -> Option<i32> {
        let image = shard.image();
        let t = image.topics.get(OFFSETS_TOPIC)?;
        let p = partition_for(group_id, t.owners.len());
        let leader = image.partition_state(t, p as usize)?.leader;
        (leader >= 0).then_some(leader)
    }

    /// Whether this shard may serve `group_id` now: NOT_COORDINATOR when
    /// another shard owns it, COORDINATOR_LOAD_IN_PROGRESS while loading.
    pub fn check(&self, shard: &Shard, group_id: &str) -> Result<(), ErrorCode> {
        if group_id.is_empty() {
            return Err(ErrorCode::InvalidGroupId);
        }
        let Some((_, owner)) = Self::partition_of(shard, group_id) else {
            return Err(ErrorCode::CoordinatorNotAvailable);
        };
        if owner != shard.id.0 {
            return Err(ErrorCode::NotCoordinator);
        }
        let Some((p, _)) = Self::partition_of(shard, group_id) else {
            return Err(ErrorCode::CoordinatorNotAvailable);
        };
        // Led here but not loaded yet (start-up, or a leadership that just
        // moved here): the client retries.
        if !self.loaded.get() || !self.serving.borrow().contains(&p) {
            return Err(ErrorCode::CoordinatorLoadInProgress);
        }
        Ok(())
    }

    pub fn mark(&self, group_id: &str) -> GroupMark {
        let groups = self.groups.borrow();
        let g = groups.get(group_id)?;
        let mut ids: Vec<String> = g.members.keys().cloned().collect();
        ids.sort();
        Some((g.generation, g.state, ids))
    }

    /// Persists the group's metadata when a change settled it (Stable or
    /// Empty) differently from `before`. The append is not waited for here,
    /// so the state change and the record stay one step with no await in
    /// between; every JoinGroup, SyncGroup and LeaveGroup answer then waits
    /// for it with `wait_persisted`, as Kafka answers a SyncGroup only once
    /// the group's assignment is stored.
    pub fn persist_if_changed(&self, shard: &Rc<Shard>, group_id: &str, before: GroupMark) {
        let after = self.mark(group_id);
        if after == before {
            return;
        }
        let Some((_, state, _)) = &after else { return };
        if !matches!(state, GroupState::Stable | GroupState::Empty) {
            return;
        }
        let snapshot = self.groups.borrow().get(group_id).map(|g| g.snapshot(now_ms()));
        if let Some(s) = snapshot {
            let recs = vec![(records::group_key(group_id), Some(records::group_value(&s)))];
            match append_records(shard, group_id, &recs) {
                Ok(written) => {
                    self.persisting.borrow_mut().insert(group_id.to_string(), written);
                }
                Err(e) => log::warn!("group {group_id}: cannot persist group metadata: {}", e.name()),
            }
        }
    }

    /// Waits until the group's latest metadata record (if one is pending)
    /// is durable, so that no member is told of a generation, assignment or
    /// departure that a crash could take back. NOT_COORDINATOR when it
    /// cannot become durable (its log dir failed).
    pub async fn wait_persisted(&self, shard: &Rc<Shard>, group_id: &str) -> Result<(), ErrorCode> {
        loop {
            let notified = shard.hw_notify.notified();
            let pending = self.persisting.borrow().get(group_id).cloned();
            let Some((log, last)) = pending else { return Ok(()) };
            if log.borrow().high_watermark > last {
                let mut persisting = self.persisting.borrow_mut();
                if persisting.get(group_id).is_some_and(|(l, o)| Rc::ptr_eq(l, &log) && *o == last) {
                    persisting.remove(group_id);
                }
                return Ok(());
            }
            if shard.dir_state(&log) == crate::storage::log_dirs::DirState::Failed {
                return Err(ErrorCode::NotCoordinator);
            }
            notified.await;
        }
    }

    /// Applies offsets that are now durable at `log_offset`.
    pub fn apply_commits(&self, group_id: &str, commits: Vec<(String, i32, OffsetValue)>, log_offset: i64) {
        let mut offsets = self.offsets.borrow_mut();
        let per_group = offsets.entry(group_id.to_string()).or_default();
        for (topic, partition, value) in commits {
            let e = per_group.entry((topic, partition)).or_insert(Committed { value: value.clone(), log_offset });
            if log_offset >= e.log_offset {
                *e = Committed { value, log_offset };
            }
        }
    }

    /// Remembers transactional offset commits of producer `pid` until its
    /// transaction's marker.
    pub fn add_pending_txn(&self, pid: i64, group_id: &str, commits: Vec<(String, i32, OffsetValue)>) {
        let mut pending = self.pending_txn.borrow_mut();
        let per_group = pending.entry(pid).or_default().entry(group_id.to_string()).or_default();
        for c in commits {
            per_group.retain(|(t, p, _)| !(t == &c.0 && *p == c.1));
            per_group.push(c);
        }
    }

    /// Whether a transaction has an offset for (topic, partition) of the
    /// group pending (OffsetFetch with require_stable: UNSTABLE_OFFSET_COMMIT).
    pub fn has_pending_txn_offset(&self, group_id: &str, topic: &str, partition: i32) -> bool {
        self.pending_txn
            .borrow()
            .values()
            .any(|groups| groups.get(group_id).is_some_and(|v| v.iter().any(|(t, p, _)| t == topic && *p == partition)))
    }

    /// A marker of producer `pid` was written (durably) at `marker_offset`
    /// to `__consumer_offsets-partition` (of `partitions`): its pending
    /// offsets for the groups of that partition are applied (commit) or
    /// dropped (abort).
    pub fn complete_txn(&self, partition: i32, partitions: usize, pid: i64, commit: bool, marker_offset: i64) {
        let done: Vec<(String, TxnOffsets)> = {
            let mut pending = self.pending_txn.borrow_mut();
            let Some(groups) = pending.get_mut(&pid) else { return };
            let ids: Vec<String> =
                groups.keys().filter(|g| partition_for(g, partitions) == partition).cloned().collect();
            let done = ids.into_iter().filter_map(|g| groups.remove_entry(&g)).collect();
            if groups.is_empty() {
                pending.remove(&pid);
            }
            done
        };
        for (group, offsets) in done {
            log::debug!(
                "group {group}: transactional offsets of producer {pid} {} ({} partition(s))",
                if commit { "committed" } else { "aborted" },
                offsets.len()
            );
            if commit {
                self.apply_commits(&group, offsets, marker_offset);
            }
        }
    }

    /// Replays one record from `__consumer_offsets`.
    fn replay(&self, record: Record, log_offset: i64, now: Instant) {
        match record {
            Record::Offset { group, topic, partition, value: Some(v) } => {
                self.groups.borrow_mut().entry(group.clone()).or_insert_with(|| Group::new(&group, now));
                self.apply_commits(&group, vec![(topic, partition, v)], log_offset);
            }
            Record::Offset { group, topic, partition, value: None } => {
                if let Some(o) = self.offsets.borrow_mut().get_mut(&group) {
                    o.remove(&(topic, partition));
                }
            }
            Record::Group { group, value: Some(s) } => {
                self.groups.borrow_mut().insert(group.clone(), Group::restore(&group, s, now));
            }
            Record::Group { group, value: None } => {
                self.groups.borrow_mut().remove(&group);
                self.offsets.borrow_mut().remove(&group);
            }
        }
    }

    /// Removes a group and its offsets, writing the tombstones. The caller
    /// checked that it may be deleted.
    pub async fn delete_group(&self, shard: &Rc<Shard>, group_id: &str) -> Result<(), ErrorCode> {
        let mut recs: Vec<(Bytes, Option<Bytes>)> = self
            .offsets
            .borrow()
            .get(group_id)
            .map(|o| o.keys().map(|(t, p)| (records::offset_key(group_id, t, *p), None)).collect())
            .unwrap_or_default();
        recs.push((records::group_key(group_id), None));
        if let Some(g) = self.groups.borrow_mut().get_mut(group_id) {
            g.kill(Instant::now());
        }
        let result = append_and_wait(shard, group_id, &recs).await;
        self.groups.borrow_mut().remove(group_id);
        self.offsets.borrow_mut().remove(group_id);
        result.map(|_| ())
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Appends records to the group's `__consumer_offsets` partition on this
/// shard; returns the log and the last offset to wait for.
fn append_records(
    shard: &Rc<Shard>,
    group_id: &str,
    recs: &[(Bytes, Option<Bytes>)],
) -> Result<(partition::SharedLog, Offset), ErrorCode> {
    let (p, owner) = Coordinator::partition_of(shard, group_id).ok_or(ErrorCode::CoordinatorNotAvailable)?;
    if owner != shard.id.0 {
        return Err(ErrorCode::NotCoordinator);
    }
    let log = shard.log(OFFSETS_TOPIC, p).ok_or(ErrorCode::CoordinatorNotAvailable)?;
    let batch = records::build(recs, now_ms());
    let last = append_batch(shard, &log, &batch)?;
    Ok((log, last))
}

/// Appends and waits until the records are durable (the high watermark
/// passed them). Returns their last offset.
pub async fn append_and_wait(
    shard: &Rc<Shard>,
    group_id: &str,
    recs: &[(Bytes, Option<Bytes>)],
) -> Result<i64, ErrorCode> {
    let (log, last) = append_records(shard, group_id, recs)?;
    wait_durable(shard, &log, last).await
}

/// Waits until the high watermark of `log` passes `last`. NOT_COORDINATOR
/// when it cannot (its log dir failed).
pub async fn wait_durable(shard: &Rc<Shard>, log: &partition::SharedLog, last: Offset) -> Result<i64, ErrorCode> {
    loop {
        let notified = shard.hw_notify.notified();
        if log.borrow().high_watermark > last {
            return Ok(last.0);
        }
        if shard.dir_state(log) == crate::storage::log_dirs::DirState::Failed {
            return Err(ErrorCode::NotCoordinator);
        }
        notified.await;
    }
}

/// Appends one batch built by the broker itself to an internal topic's
/// partition led here (`__transaction_state`, transactional offset
/// commits) and waits until it is durable. Returns its last offset.
pub async fn append_batch_and_wait(
    shard: &Rc<Shard>,
    log: &partition::SharedLog,
    batch: &[u8],
) -> Result<i64, ErrorCode> {
    let last = append_batch(shard, log, batch)?;
    wait_durable(shard, log, last).await
}

/// Appends one broker-built batch (not waiting). NOT_COORDINATOR when the
/// partition's log dir is offline.
pub fn append_batch(shard: &Rc<Shard>, log: &partition::SharedLog, batch: &[u8]) -> Result<Offset, ErrorCode> {
    if shard.dir_state(log) != crate::storage::log_dirs::DirState::Online {
        let l = log.borrow();
        log::debug!("{}-{} is in an offline log dir: NOT_COORDINATOR", l.topic, l.partition.0);
        return Err(ErrorCode::NotCoordinator);
    }
    let infos = tidelog_protocol::batch::validate_record_set(batch, usize::MAX).map_err(|e| {
        log::error!("built an invalid batch: {e}");
        ErrorCode::UnknownServerError
    })?;
    let (_, last) = {
        let mut l = log.borrow_mut();
        let epoch = Epoch(shard.image().leader_epoch(&l.topic, l.partition.0).max(0));
        // A transactional offset commit opens its producer's transaction
        // in the partition's producer state (`append` notes it).
        l.append(bytes::BytesMut::from(batch), &infos, epoch)
    };
    shard.mark_dirty(log);
    Ok(last)
}

/// Shard 0 at start-up: creates `__consumer_offsets` (compacted) if it does
/// not exist yet: on a single node one partition per shard; in a cluster one
/// per broker (shard) of the nodes alive once the quorum has as many as
/// `offsets.topic.replication.factor` asks for (or every voter has
/// registered), replicated on that many nodes.
pub async fn ensure_offsets_topic(shard: Rc<Shard>) {
    let (partitions, replication_factor) = loop {
        let image = shard.image();
        if image.topics.contains_key(OFFSETS_TOPIC) || shard.stopping.get() {
            return;
        }
        if !image.clustered() {
            break (shard.num_shards as i32, 1);
        }
        let alive: Vec<_> = image.nodes.values().filter(|n| !n.fenced).collect();
        let voters = shard.config.cluster.as_ref().map(|c| c.voters.len()).unwrap_or(1);
        let wanted = (shard.config.offsets_topic_replication_factor.max(1) as usize).min(voters.max(1));
        if alive.len() >= wanted {
            let brokers: u32 = alive.iter().map(|n| n.num_shards).sum();
            break (brokers.max(1) as i32, wanted as i16);
        }
        glommio::timer::sleep(Duration::from_millis(200)).await;
    };
    let mut configs = BTreeMap::new();
    configs.insert("cleanup.policy".to_string(), "compact".to_string());
    configs.insert("segment.bytes".to_string(), "104857600".to_string());
    let topic =
        NewTopic { name: OFFSETS_TOPIC.to_string(), partitions, replication_factor, assignments: Vec::new(), configs };
    for (name, r) in shard.create_topics(vec![topic]).await {
        match r {
            Ok(meta) => log::info!(
                "created {name} with {} partition(s), replication factor {replication_factor}",
                meta.owners.len()
            ),
            Err((ErrorCode::TopicAlreadyExists, _)) => {}
            Err((code, msg)) => log::error!(
                "cannot create {name}: {} ({msg}); consumer groups are unavailable until it exists",
                code.name()
            ),
        }
    }
}

/// The coordinator's task on its shard: load, then tick.
pub async fn run(shard: Rc<Shard>) {
    let owned = loop {
        if shard.stopping.get() {
            return;
        }
        let image = shard.image();
        if let Some(t) = image.topics.get(OFFSETS_TOPIC) {
            // Partitions this shard leads (on a single node: owns).
            let owned: Vec<i32> =
                (0..t.owners.len() as i32).filter(|p| image.owner(OFFSETS_TOPIC, *p) == Some(shard.id)).collect();
            if owned.iter().all(|p| shard.log(OFFSETS_TOPIC, *p).is_some()) {
                break owned;
            }
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    };
    let started = Instant::now();
    let mut records = 0usize;
    for p in &owned {
        let Some(log) = shard.log(OFFSETS_TOPIC, *p) else { continue };
        records += load_partition(&shard, &log).await;
        shard.groups.serving.borrow_mut().insert(*p);
    }
    shard.groups.loaded.set(true);
    log::info!(
        "shard {}: group coordinator loaded {} group(s) from {records} record(s) of {OFFSETS_TOPIC} partition(s) {owned:?} in {:?}",
        shard.id.0,
        shard.groups.groups.borrow().len(),
        started.elapsed()
    );
    let mut last_retention_check = Instant::now();
    while !shard.stopping.get() {
        glommio::timer::sleep(TICK).await;
        follow_leadership(&shard).await;
        tick(&shard);
        if last_retention_check.elapsed() >= Duration::from_secs(60) {
            last_retention_check = Instant::now();
            expire_offsets(&shard).await;
        }
    }
}

/// One item of `__consumer_offsets` met while loading.
enum Loaded {
    Plain(Record),
    /// A transactional offset commit of a producer.
    Txn(i64, Record),
    Marker {
        pid: i64,
        commit: bool,
    },
}

async fn load_partition(shard: &Rc<Shard>, log: &partition::SharedLog) -> usize {
    // The whole durable log, as Kafka loads to the log end: a leader's high
    // watermark may still be held (after a restart, at its checkpoint)
    // below records it keeps and that become committed.
    let (mut offset, end) = {
        let l = log.borrow();
        (l.log_start_offset, l.durable_end)
    };
    let now = Instant::now();
    let mut count = 0usize;
    while offset < end {
        let r = match partition::read_with(log, offset, LOAD_READ_BYTES, true, partition::ReadLimit::DurableEnd).await {
            Ok(r) => r,
            Err(e) => {
                log::error!(
                    "shard {}: reading {OFFSETS_TOPIC} at {}: {e}; stopping the load there",
                    shard.id.0,
                    offset.0
                );
                break;
            }
        };
        if r.bytes == 0 {
            break;
        }
        let mut next = offset;
        let partitions = shard.image().topics.get(OFFSETS_TOPIC).map(|t| t.owners.len()).unwrap_or(1);
        let p = log.borrow().partition.0;
        for chunk in &r.chunks {
            let mut found: Vec<(i64, Loaded)> = Vec::new();
            if let Some(n) = records::for_each_batch(chunk, |h, _, body| {
                let at = h.base_offset().0;
                let pid = h.producer_id().0;
                if h.is_control() {
                    if let Some(commit) = records::control_commits(h, body) {
                        found.push((at, Loaded::Marker { pid, commit }));
                    }
                } else {
                    let txn = h.is_transactional() && pid >= 0;
                    records::for_each_keyed(h, body, |k, v| {
                        if let Some(rec) = records::decode(k, v) {
                            found.push((at, if txn { Loaded::Txn(pid, rec) } else { Loaded::Plain(rec) }));
                        }
                    });
                }
            }) {
                next = Offset(n);
            }
            count += found.len();
            for (at, item) in found {
                match item {
                    Loaded::Plain(rec) => shard.groups.replay(rec, at, now),
                    Loaded::Txn(pid, Record::Offset { group, topic, partition, value: Some(v) }) => {
                        shard.groups.add_pending_txn(pid, &group, vec![(topic, partition, v)]);
                    }
                    Loaded::Txn(..) => {}
                    Loaded::Marker { pid, commit } => shard.groups.complete_txn(p, partitions, pid, commit, at),
                }
            }
        }
        if next <= offset {
            break;
        }
        offset = next;
    }
    count
}

/// In a cluster the `__consumer_offsets` leaders move (failover, controlled
/// shutdown): takes over the groups of partitions this shard now leads by
/// loading them from the log (their records were replicated here), and drops
/// the groups of partitions another broker now leads.
async fn follow_leadership(shard: &Rc<Shard>) {
    let image = shard.image();
    let Some(t) = image.topics.get(OFFSETS_TOPIC) else { return };
    let partitions = t.owners.len();
    let led: std::collections::BTreeSet<i32> =
        (0..partitions as i32).filter(|p| image.owner(OFFSETS_TOPIC, *p) == Some(shard.id)).collect();
    let serving = shard.groups.serving.borrow().clone();
    if led == serving {
        return;
    }
    let coord = &shard.groups;
    let in_partition =
        |gone: &std::collections::BTreeSet<i32>, group: &str| gone.contains(&partition_for(group, partitions));
    let lost: std::collections::BTreeSet<i32> = serving.difference(&led).copied().collect();
    let gained: Vec<i32> = led.difference(&serving).copied().collect();
    // A partition being taken over starts from what its log says, so groups
    // of a partition this shard served before are dropped first too.
    let reset: std::collections::BTreeSet<i32> = lost.iter().chain(gained.iter()).copied().collect();
    coord.groups.borrow_mut().retain(|g, _| !in_partition(&reset, g));
    coord.offsets.borrow_mut().retain(|g, _| !in_partition(&reset, g));
    for groups in coord.pending_txn.borrow_mut().values_mut() {
        groups.retain(|g, _| !in_partition(&reset, g));
    }
    coord.pending_txn.borrow_mut().retain(|_, groups| !groups.is_empty());
    for p in &lost {
        coord.serving.borrow_mut().remove(p);
        log::info!("shard {}: no longer the group coordinator of {OFFSETS_TOPIC}-{p} (led elsewhere now)", shard.id.0);
    }
    for p in gained {
        let Some(log) = shard.log(OFFSETS_TOPIC, p) else { continue };
        let started = Instant::now();
        let records = load_partition(shard, &log).await;
        // Leadership may have moved on while loading.
        if shard.image().owner(OFFSETS_TOPIC, p) == Some(shard.id) {
            coord.serving.borrow_mut().insert(p);
            log::info!(
                "shard {}: group coordinator of {OFFSETS_TOPIC}-{p} now: loaded {records} record(s) in {:?}",
                shard.id.0,
                started.elapsed()
            );
        }
    }
}

fn tick(shard: &Rc<Shard>) {
    let coord = &shard.groups;
    let now = Instant::now();
    let ids: Vec<String> = coord.groups.borrow().keys().cloned().collect();
    for id in ids {
        let before = coord.mark(&id);
        if let Some(g) = coord.groups.borrow_mut().get_mut(&id) {
            g.tick(now, &coord.settings.limits);
        }
        coord.persist_if_changed(shard, &id, before);
    }
}

/// Deletes groups (and their offsets) that have been empty longer than
/// `offsets.retention.minutes`.
async fn expire_offsets(shard: &Rc<Shard>) {
    let coord = &shard.groups;
    let retention = coord.settings.offsets_retention;
    let expired: Vec<String> = coord
        .groups
        .borrow()
        .values()
        .filter(|g| g.state == GroupState::Empty && g.empty_since.is_some_and(|t| t.elapsed() >= retention))
        .map(|g| g.id.clone())
        .collect();
    for id in expired {
        log::info!("group {id}: empty for longer than offsets.retention.minutes; deleting its offsets");
        if let Err(e) = coord.delete_group(shard, &id).await {
            log::warn!("group {id}: expiring offsets failed: {}", e.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_for_matches_kafka() {
        // Values from Java: "my-group".hashCode() == 1025521858 ... checked by hand:
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("ab"), 97 * 31 + 98);
        // Java: "polygenelubricants".hashCode() == Integer.MIN_VALUE -> Utils.abs gives 0.
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
        assert_eq!(partition_for("polygenelubricants", 50), 0);
        // Negative hashes use the absolute value.
        let h = java_string_hash("consumer-group-1");
        assert_eq!(partition_for("consumer-group-1", 50), (h.unsigned_abs() % 50) as i32);
        assert!((0..2).contains(&partition_for("x", 2)));
    }

    #[test]
    fn internal_topics_are_placed_on_their_shard() {
        assert_eq!(internal_placement(OFFSETS_TOPIC, 4, 4), Some(vec![0, 1, 2, 3]));
        assert_eq!(internal_placement(OFFSETS_TOPIC, 4, 2), Some(vec![0, 1, 0, 1]));
        assert_eq!(internal_placement("orders", 4, 4), None);
    }
}
