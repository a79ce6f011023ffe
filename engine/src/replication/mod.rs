//! Partition replication, Kafka's way: followers fetch from the leader, the
//! leader tracks how far each follower has durably got, keeps the ISR and
//! moves the high watermark only over records every ISR member has on disk.
//!
//! ```text
//!  node A, shard i (leader of t-p)              node B, shard j (follower of t-p)
//!  ┌──────────────────────────────┐   Fetch    ┌──────────────────────────────┐
//!  │ PartitionLog (storage)       │◀─replica──│ fetcher task for leader A/i   │
//!  │ Leading: follower progress,  │   id=B/j   │  append_replicated, flush,    │
//!  │  ISR, HW bound               │──records──▶│  then fetch from the durable  │
//!  │ AlterPartition ──▶ quorum    │  + leader  │  end (that offset is what the │
//!  └──────────────────────────────┘     HW     │  leader counts as replicated) │
//!                                               └──────────────────────────────┘
//! ```
//!
//! Ownership: everything here is shard-local. A partition's leader state
//! lives on the shard that owns its leader replica; a follower's fetcher runs
//! on the shard that owns the follower replica and connects straight to the
//! leader shard's port, so replication never crosses cores. The only other
//! party is the controller quorum: ISR changes go to it as AlterPartition
//! commands, and leadership arrives from it as metadata images (`reconcile`).
//!
//! Durability: a follower fetches from its fdatasync'd end offset, so the
//! leader's view of a follower is always what that follower has on disk;
//! the high watermark, acks=all and what consumers may read all wait for
//! every ISR member's disk, not its page cache (stronger than Kafka).
//!
//! Divergence: a follower's Fetch carries the epoch its log ends in
//! (KIP-320); a leader that does not have that epoch, or on which it ends
//! before the fetch offset, answers `diverging_epoch` instead of records
//! (`check_fetch_epoch`) and the follower truncates (`truncation_offset`,
//! the same rule as after OffsetForLeaderEpoch on becoming follower).
//!
//! Restarts: the high watermark of every replicated partition is written to
//! `replication-offset-checkpoint` in its directory every
//! `replica.high.watermark.checkpoint.interval.ms` and at clean shutdown; a
//! reopened replica starts from it (`restore_high_watermark`), never from its
//! log end, so it cannot show consumers records the other ISR members lack.
//!
//! The partition log knows nothing of this beyond `replication_bound` (the
//! cap this module puts on its high watermark), `hold_high_watermark`,
//! `append_replicated` and `truncate_to`.

mod fetcher;
mod log_api;
pub mod throttle;
pub mod wire;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tidelog_protocol::{ErrorCode, Offset, ShardId};
use tidelog_quorum::{MetadataCommand, QuorumHandle};

use crate::metadata::{broker_id, MetadataImage};
use crate::shard::Shard;
use crate::storage::partition::SharedLog;

/// Pause after a refused or failed AlterPartition before the next one.
const ALTER_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// A partition by topic name and index.
pub type PartitionKey = (String, i32);

/// How far one follower has got, as its fetches tell the leader.
#[derive(Clone, Debug)]
struct Progress {
    /// The follower's durable log end (its last fetch offset); -1 unknown.
    end: Offset,
    /// When its fetch offset last reached the leader's log end as it was at
    /// the follower's previous fetch (Kafka's definition of caught up).
    last_caught_up: Instant,
    /// The leader's log end when this follower last fetched.
    leader_end_at_last_fetch: Offset,
    /// Why this caught-up follower was last kept out of the ISR (logged
    /// once per reason, not once per fetch).
    isr_refusal: Option<String>,
}

/// One follower fetch of one partition, as the leader sees it.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaFetch {
    /// The follower's broker id.
    pub broker: i32,
    /// Its broker epoch (Fetch v15+ `replica_state`, KIP-903); -1 not sent.
    pub broker_epoch: i64,
    pub fetch_offset: Offset,
    /// The leader epoch the follower believes in; -1 not checked.
    pub leader_epoch: i32,
}

/// Whether a caught-up follower may join the ISR (KIP-841, KIP-903): its
/// node is registered and not fenced, and the broker epoch its fetch
/// carried is its current registration's, or -1 (a fetcher that does not
/// send one). A fetch from an earlier run of the node (a delayed request,
/// or a process that was replaced) must not put the new run, which may have
/// lost its disk, into the ISR.
pub(crate) fn isr_eligible(image: &MetadataImage, broker: i32, fetch_broker_epoch: i64) -> Result<(), String> {
    let (node, _) = crate::metadata::split_broker_id(broker);
    let Some(registration) = image.nodes.get(&node) else {
        return Err(format!("node {node} is not registered"));
    };
    if registration.fenced {
        return Err(format!("node {node} is fenced"));
    }
    if fetch_broker_epoch >= 0 && fetch_broker_epoch != registration.broker_epoch {
        return Err(format!(
            "its fetch carries broker epoch {fetch_broker_epoch}, node {node} is registered with {}",
            registration.broker_epoch
        ));
    }
    Ok(())
}

/// A partition this shard leads.
struct Leading {
    log: SharedLog,
    leader_epoch: i32,
    partition_epoch: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
    followers: HashMap<i32, Progress>,
    /// An AlterPartition is on its way to the quorum.
    alter_in_flight: Rc<Cell<bool>>,
    /// The ISR that AlterPartition proposes, while it is on its way.
    /// The high watermark counts `isr` and this together (Kafka's "maximal
    /// ISR", KIP-497): a replica being added may be in the ISR the moment
    /// the quorum commits it, so from the moment it is proposed nothing it
    /// lacks may be acknowledged.
    alter_pending_isr: Rc<std::cell::RefCell<Vec<i32>>>,
    /// No new AlterPartition before this (after a refusal or a failure).
    alter_not_before: Rc<Cell<Option<Instant>>>,
}

/// A partition this shard follows.
#[derive(Clone)]
pub(crate) struct Following {
    pub log: SharedLog,
    pub leader: i32,
    pub leader_epoch: i32,
    /// Cleared once the fetcher has checked our tail against the leader
    /// (OffsetForLeaderEpoch) after this epoch began.
    pub truncation_checked: Rc<Cell<bool>>,
}

/// The replication state of one shard.
pub struct Replication {
    my_broker: i32,
    quorum: Option<QuorumHandle>,
    leading: RefCell<HashMap<PartitionKey, Leading>>,
    following: RefCell<HashMap<PartitionKey, Following>>,
    /// Leader broker ids with a running fetcher task.
    fetchers: RefCell<HashMap<i32, Rc<crate::notify::Notify>>>,
    lag_max: Duration,
    /// `leader.replication.throttled.rate` spent serving throttled replicas.
    pub leader_throttle: throttle::Bucket,
    /// `follower.replication.throttled.rate` spent fetching throttled replicas.
    pub follower_throttle: throttle::Bucket,
}

impl Replication {
    pub fn new(my_broker: i32, quorum: Option<QuorumHandle>, lag_max: Duration) -> Replication {
        Replication {
            my_broker,
            quorum,
            leading: RefCell::new(HashMap::new()),
            following: RefCell::new(HashMap::new()),
            fetchers: RefCell::new(HashMap::new()),
            lag_max,
            leader_throttle: throttle::Bucket::default(),
            follower_throttle: throttle::Bucket::default(),
        }
    }

    pub fn my_broker(&self) -> i32 {
        self.my_broker
    }

    /// The controller quorum (cluster mode only).
    pub fn quorum(&self) -> Option<&QuorumHandle> {
        self.quorum.as_ref()
    }

    /// Partitions this shard follows from `leader`.
    pub(crate) fn following_from(&self, leader: i32) -> Vec<(PartitionKey, Following)> {
        self.following
            .borrow()
            .iter()
            .filter(|(_, f)| f.leader == leader)
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect()
    }

    /// Takes the roles `image` gives this shard's replicas: becomes leader
    /// or follower of each, starts fetchers for new leaders, forgets
    /// partitions that left. Called after the shard applied the image.
    pub fn reconcile(shard: &Rc<Shard>, image: &MetadataImage) {
        if !image.clustered() {
            return;
        }
        let me = &shard.replication;
        let mut seen: Vec<PartitionKey> = Vec::new();
        for t in image.topics.values() {
            for (p, owner) in t.owners.iter().enumerate() {
                if *owner != shard.id.0 {
                    continue;
                }
                let (Some(state), Some(log)) = (t.partitions.get(p), shard.log(&t.name, p as i32)) else { continue };
                let key: PartitionKey = (t.name.clone(), p as i32);
                seen.push(key.clone());
                let saved_hw = log.borrow_mut().take_hw_checkpoint();
                if let Some(saved) = saved_hw.filter(|_| state.replicas.len() > 1) {
                    restore_high_watermark(shard, &key, &log, saved);
                }
                if state.leader == me.my_broker {
                    me.following.borrow_mut().remove(&key);
                    me.lead(shard, &key, log, state);
                } else {
                    me.leading.borrow_mut().remove(&key);
                    me.follow(shard, &key, log, state.leader, state.leader_epoch);
                }
            }
        }
        me.leading.borrow_mut().retain(|k, _| seen.contains(k));
        me.following.borrow_mut().retain(|k, _| seen.contains(k));
        for notify in me.fetchers.borrow().values() {
            notify.notify_all();
        }
        // acks=all produces waiting here check whether they still lead
        // (`leads_at_epoch`): a deposed leader answers them now.
        shard.hw_notify.notify_all();
    }

    fn lead(&self, shard: &Rc<Shard>, key: &PartitionKey, log: SharedLog, state: &crate::metadata::PartitionState) {
        let mut leading = self.leading.borrow_mut();
        let now = Instant::now();
        let fresh = leading.get(key).is_none_or(|l| l.leader_epoch != state.leader_epoch);
        if fresh {
            let leo = log.borrow().log_end_offset();
            log::info!(
                "shard {}: {}-{}: leader at epoch {} (log end {}, replicas {:?}, isr {:?})",
                shard.id.0,
                key.0,
                key.1,
                state.leader_epoch,
                leo.0,
                state.replicas,
                state.isr
            );
            let followers = state
                .replicas
                .iter()
                .filter(|r| **r != self.my_broker)
                .map(|r| {
                    let progress = Progress {
                        end: Offset(-1),
                        last_caught_up: now,
                        leader_end_at_last_fetch: leo,
                        isr_refusal: None,
                    };
                    (*r, progress)
                })
                .collect();
            leading.insert(
                key.clone(),
                Leading {
                    log,
                    leader_epoch: state.leader_epoch,
                    partition_epoch: state.partition_epoch,
                    replicas: state.replicas.clone(),
                    isr: state.isr.clone(),
                    followers,
                    alter_in_flight: Rc::new(Cell::new(false)),
                    alter_pending_isr: Rc::default(),
                    alter_not_before: Rc::new(Cell::new(None)),
                },
            );
        } else if let Some(l) = leading.get_mut(key) {
            for r in state.replicas.iter().filter(|r| **r != self.my_broker) {
                l.followers.entry(*r).or_insert(Progress {
                    end: Offset(-1),
                    last_caught_up: now,
                    leader_end_at_last_fetch: l.log.borrow().log_end_offset(),
                    isr_refusal: None,
                });
            }
            l.followers.retain(|r, _| state.replicas.contains(r));
            l.partition_epoch = state.partition_epoch;
            l.replicas = state.replicas.clone();
            l.isr = state.isr.clone();
        }
        if let Some(l) = leading.get(key) {
            update_high_watermark(shard, l);
        }
    }

    fn follow(&self, shard: &Rc<Shard>, key: &PartitionKey, log: SharedLog, leader: i32, leader_epoch: i32) {
        let fresh = {
            let mut following = self.following.borrow_mut();
            let fresh = following.get(key).is_none_or(|f| f.leader != leader || f.leader_epoch != leader_epoch);
            if fresh {
                log::info!(
                    "shard {}: {}-{}: follower of broker {leader} at epoch {leader_epoch} (log end {})",
                    shard.id.0,
                    key.0,
                    key.1,
                    log.borrow().log_end_offset().0
                );
                // A follower's high watermark only moves with the leader's.
                let hw = log.borrow().high_watermark;
                log_api::set_bound(&log, Some(hw));
                following.insert(
                    key.clone(),
                    Following { log, leader, leader_epoch, truncation_checked: Rc::new(Cell::new(false)) },
                );
            }
            fresh
        };
        if fresh && leader >= 0 && !self.fetchers.borrow().contains_key(&leader) {
            let notify = Rc::new(crate::notify::Notify::default());
            self.fetchers.borrow_mut().insert(leader, notify.clone());
            glommio::spawn_local(fetcher::run(shard.clone(), leader, notify)).detach();
        }
    }

    /// Whether `key` still follows broker `leader` at `leader_epoch`. A
    /// fetcher's answer comes back after an await, during which the
    /// partition may have moved to another leader or epoch: what the old
    /// leader sent (records, its high watermark, where to truncate) must not
    /// be applied then.
    pub(crate) fn follows(&self, key: &PartitionKey, leader: i32, leader_epoch: i32) -> bool {
        self.following.borrow().get(key).is_some_and(|f| f.leader == leader && f.leader_epoch == leader_epoch)
    }

    /// The fetcher for `leader` found nothing left to fetch and stops.
    pub(crate) fn fetcher_stopped(&self, leader: i32) {
        self.fetchers.borrow_mut().remove(&leader);
    }

    /// A follower fetched `key` from `fetch_offset` (its durable log end)
    /// at `epoch`: records its progress, moves the high watermark, and asks
    /// the quorum to take it back into the ISR once it has caught up.
    pub fn on_replica_fetch(shard: &Rc<Shard>, key: &PartitionKey, fetch: ReplicaFetch) -> Result<(), ErrorCode> {
        let me = &shard.replication;
        let ReplicaFetch { broker: replica, broker_epoch, fetch_offset, leader_epoch: epoch } = fetch;
        let mut leading = me.leading.borrow_mut();
        let Some(l) = leading.get_mut(key) else { return Err(ErrorCode::NotLeaderOrFollower) };
        if epoch >= 0 && epoch < l.leader_epoch {
            return Err(ErrorCode::FencedLeaderEpoch);
        }
        if epoch > l.leader_epoch {
            return Err(ErrorCode::UnknownLeaderEpoch);
        }
        let (leo, hw) = {
            let log = l.log.borrow();
            (log.log_end_offset(), log.high_watermark)
        };
        let Some(progress) = l.followers.get_mut(&replica) else {
            log::warn!("{}-{}: fetch from broker {replica}, which is not a replica {:?}", key.0, key.1, l.replicas);
            return Err(ErrorCode::NotLeaderOrFollower);
        };
        let now = Instant::now();
        if fetch_offset >= progress.leader_end_at_last_fetch || fetch_offset >= leo {
            progress.last_caught_up = now;
        }
        progress.end = fetch_offset;
        progress.leader_end_at_last_fetch = leo;
        let mut rejoin = !l.isr.contains(&replica) && fetch_offset >= hw;
        if rejoin {
            match isr_eligible(&shard.image(), replica, broker_epoch) {
                Ok(()) => progress.isr_refusal = None,
                Err(why) => {
                    if progress.isr_refusal.as_deref() != Some(why.as_str()) {
                        log::warn!(
                            "{}-{}: broker {replica} caught up to offset {} but stays out of the ISR: {why}",
                            key.0,
                            key.1,
                            fetch_offset.0
                        );
                        progress.isr_refusal = Some(why);
                    }
                    rejoin = false;
                }
            }
        }
        update_high_watermark(shard, l);
        if rejoin {
            let mut isr = l.isr.clone();
            isr.push(replica);
            let reason = format!("broker {replica} caught up to offset {} (high watermark {})", fetch_offset.0, hw.0);
            alter_isr(shard, key, l, isr, reason);
        }
        Ok(())
    }

    /// The ISR and min.insync.replicas check before an acks=all append:
    /// NOT_ENOUGH_REPLICAS when fewer replicas than required are in sync.
    pub fn check_min_isr(shard: &Shard, image: &MetadataImage, topic: &str, partition: i32) -> Result<(), String> {
        let Some(t) = image.topics.get(topic) else { return Ok(()) };
        // Borrowed, not `partition_state`: this runs for every acks=all
        // partition of every produce request. A single node's ISR is its one replica.
        let isr: &[i32] = match usize::try_from(partition).ok().and_then(|p| t.partitions.get(p)) {
            Some(state) => &state.isr,
            None => &[],
        };
        let isr_len = if t.partitions.is_empty() { 1 } else { isr.len() };
        let min = crate::topic_config::topic_i64(&shard.config, image, t, "min.insync.replicas").max(1) as usize;
        if isr_len < min {
            return Err(format!(
                "{topic}-{partition}: {isr_len} in-sync replica(s) {isr:?}, min.insync.replicas is {min}"
            ));
        }
        Ok(())
    }

    /// Whether records this shard appended to `topic`-`partition` as its
    /// leader at `leader_epoch` may still be acknowledged: `image` (the
    /// shard's current one) still has this shard leading it at that epoch.
    /// A leader never truncates its log within one epoch; one that lost the
    /// leadership (deposed while cut off from the quorum, say) truncates
    /// what only it had as soon as it follows, and the high watermark it
    /// then takes from the new leader covers other records at the same
    /// offsets. An acks=all produce still waiting for its records then must
    /// fail with NOT_LEADER_OR_FOLLOWER (as Kafka's DelayedProduce does),
    /// never succeed on the strength of that watermark; so must one whose
    /// shard leads again at a later epoch (its records may be gone too).
    pub fn leads_at_epoch(
        image: &MetadataImage,
        shard: ShardId,
        topic: &str,
        partition: i32,
        leader_epoch: i32,
    ) -> bool {
        image.owner(topic, partition) == Some(shard) && image.leader_epoch(topic, partition).max(0) == leader_epoch
    }

    /// Shrinks the ISR of every partition this shard leads whose followers
    /// have not caught up for `replica.lag.time.max.ms`. Runs on every shard.
    pub async fn run_isr_checks(shard: Rc<Shard>) {
        let period = (shard.replication.lag_max / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        while !shard.stopping.get() {
            glommio::timer::sleep(period).await;
            let now = Instant::now();
            let mut leading = shard.replication.leading.borrow_mut();
            for (key, l) in leading.iter_mut() {
                let lagging: Vec<i32> = l
                    .isr
                    .iter()
                    .filter(|r| **r != shard.replication.my_broker)
                    .filter(|r| {
                        l.followers
                            .get(r)
                            .is_some_and(|p| now.duration_since(p.last_caught_up) > shard.replication.lag_max)
                    })
                    .copied()
                    .collect();
                if lagging.is_empty() {
                    continue;
                }
                let isr: Vec<i32> = l.isr.iter().filter(|r| !lagging.contains(r)).copied().collect();
                let reason = format!(
                    "broker(s) {lagging:?} not caught up for replica.lag.time.max.ms={}",
                    shard.replication.lag_max.as_millis()
                );
                alter_isr(&shard, key, l, isr, reason);
            }
        }
    }
}

/// A replicated log just opened (a restart, or a new replica here): its
/// high watermark starts at the checkpointed one (or, with none, at the log
/// start offset), not at its durable end, since the records past it may be
/// on no other replica and could be truncated away once another replica
/// leads. It then moves only by the usual rule: as leader, when every ISR
/// member has a record (and the leader has it on disk); as follower, with
/// the leader's. A single node or an RF 1 partition never comes here: its
/// high watermark is its durable end, as it always was.
fn restore_high_watermark(shard: &Shard, key: &PartitionKey, log: &SharedLog, saved: Option<Offset>) {
    let (start, durable_end, before) = {
        let l = log.borrow();
        (l.log_start_offset, l.durable_end, l.high_watermark)
    };
    let target = saved.unwrap_or(start);
    let hw = log.borrow_mut().hold_high_watermark(target);
    log::info!(
        "shard {}: {}-{}: high watermark starts at {} ({}; log start {}, durable end {})",
        shard.id.0,
        key.0,
        key.1,
        hw.0,
        match saved {
            Some(o) => format!("checkpoint {}", o.0),
            None => "no checkpoint: the log start offset".to_string(),
        },
        start.0,
        durable_end.0
    );
    if hw < before {
        let (log, key, shard_id) = (log.clone(), key.clone(), shard.id.0);
        glommio::spawn_local(async move {
            if let Err(e) = crate::storage::partition::refine_above_hw(&log).await {
                log::error!(
                    "shard {shard_id}: {}-{}: cannot locate the batches above the high watermark: {e}; \
                     consumers' reads stay stopped short of it until it passes the old durable end",
                    key.0,
                    key.1
                );
            }
        })
        .detach();
    }
}

impl Replication {
    /// Every `replica.high.watermark.checkpoint.interval.ms`, writes the high
    /// watermark of each replicated partition this shard holds whose
    /// watermark moved since its last checkpoint. Cluster mode only.
    pub async fn run_hw_checkpoints(shard: Rc<Shard>) {
        let interval = Duration::from_millis(shard.config.replica_high_watermark_checkpoint_interval_ms.max(1));
        while !shard.stopping.get() {
            glommio::timer::sleep(interval).await;
            Self::checkpoint_high_watermarks(&shard).await;
        }
    }

    /// Writes the high watermark checkpoint of every replicated partition
    /// this shard holds (leader with RF > 1, or follower) whose watermark
    /// changed since it was last written; also called at clean shutdown.
    /// A failed write is logged and tried again next time.
    pub async fn checkpoint_high_watermarks(shard: &Shard) {
        let me = &shard.replication;
        let mut logs: Vec<(PartitionKey, SharedLog)> = me
            .leading
            .borrow()
            .iter()
            .filter(|(_, l)| l.replicas.len() > 1)
            .map(|(k, l)| (k.clone(), l.log.clone()))
            .collect();
        logs.extend(me.following.borrow().iter().map(|(k, f)| (k.clone(), f.log.clone())));
        for (key, log) in logs {
            let (dir, hw) = {
                let l = log.borrow();
                if l.hw_checkpointed == Some(l.high_watermark) {
                    continue;
                }
                (l.dir.clone(), l.high_watermark)
            };
            let written = glommio::executor()
                .spawn_blocking(move || crate::storage::checkpoint::write_high_watermark(&dir, hw))
                .await;
            match written {
                Ok(()) => log.borrow_mut().hw_checkpointed = Some(hw),
                Err(e) => log::warn!(
                    "shard {}: {}-{}: cannot write the high watermark checkpoint ({}): {e}; retrying next interval",
                    shard.id.0,
                    key.0,
                    key.1,
                    hw.0
                ),
            }
        }
    }
}

/// Caps the leader's high watermark at the lowest durable end among the
/// other members of the maximal ISR (no cap when the leader is the only one).
fn update_high_watermark(shard: &Shard, l: &Leading) {
    let before = l.log.borrow().high_watermark;
    let pending = l.alter_pending_isr.borrow();
    let bound = hw_bound(&l.isr, &pending, shard.replication.my_broker, before, |r| {
        l.followers.get(&r).map(|p| p.end).unwrap_or(Offset(-1))
    });
    drop(pending);
    log_api::set_bound(&l.log, bound);
    if l.log.borrow().high_watermark != before {
        shard.hw_notify.notify_all();
    }
}

/// The replication bound of the high watermark: the lowest durable end
/// among the members of `isr` and of a `pending` proposal other than `me`
/// (None when there is no other). An unknown end (-1) holds the watermark
/// at `before`.
fn hw_bound(isr: &[i32], pending: &[i32], me: i32, before: Offset, end_of: impl Fn(i32) -> Offset) -> Option<Offset> {
    let mut members: Vec<i32> = isr.iter().chain(pending).copied().filter(|r| *r != me).collect();
    members.sort_unstable();
    members.dedup();
    let bound = members.into_iter().map(end_of).min()?;
    Some(if bound.0 < 0 { before } else { bound })
}

/// Sends an ISR change to the quorum (one at a time per partition); the
/// committed result comes back as a metadata image.
fn alter_isr(shard: &Rc<Shard>, key: &PartitionKey, l: &Leading, isr: Vec<i32>, reason: String) {
    let Some(quorum) = shard.replication.quorum.clone() else { return };
    let now = Instant::now();
    if l.alter_in_flight.get() || isr.is_empty() || l.alter_not_before.get().is_some_and(|t| now < t) {
        return;
    }
    l.alter_in_flight.set(true);
    *l.alter_pending_isr.borrow_mut() = isr.clone();
    let pending = l.alter_pending_isr.clone();
    let in_flight = l.alter_in_flight.clone();
    let not_before = l.alter_not_before.clone();
    let command = MetadataCommand::AlterPartition {
        topic: key.0.clone(),
        partition: key.1,
        leader_epoch: l.leader_epoch,
        partition_epoch: l.partition_epoch,
        isr: isr.clone(),
    };
    let (old, key, shard_id) = (l.isr.clone(), key.clone(), shard.id.0);
    let shard = shard.clone();
    glommio::spawn_local(async move {
        // A refused or failed change is not retried for a second.
        not_before.set(Some(Instant::now() + ALTER_RETRY_BACKOFF));
        match quorum.submit(command).await {
            Ok((index, results)) => match results.into_iter().find_map(|(_, r)| r.err()) {
                None => {
                    not_before.set(None);
                    log::info!("shard {shard_id}: {}-{}: ISR {old:?} -> {isr:?} ({reason})", key.0, key.1);
                    // The proposal counts until this shard runs on the
                    // image that carries it (it then is the ISR).
                    loop {
                        let applied = shard.image_notify.notified();
                        if shard.image().version >= index || shard.stopping.get() {
                            break;
                        }
                        applied.await;
                    }
                }
                Some(refused) => log::info!(
                    "shard {shard_id}: {}-{}: ISR change {old:?} -> {isr:?} refused: {} ({})",
                    key.0,
                    key.1,
                    ErrorCode::from_code(refused.code).name(),
                    refused.message
                ),
            },
            Err(e) => {
                log::warn!("shard {shard_id}: {}-{}: ISR change {old:?} -> {isr:?} not committed: {e}", key.0, key.1)
            }
        }
        // Committed and applied, refused, or failed: `isr` alone counts now.
        pending.borrow_mut().clear();
        in_flight.set(false);
    })
    .detach();
}

/// Where a follower's fetch from `offset` starts: like a consumer's, but
/// over the leader's whole durable log, not only up to the high watermark
/// (which cannot pass what the followers have).
pub async fn locate_for_replica(
    log: &SharedLog,
    offset: Offset,
) -> std::io::Result<crate::storage::partition::Located> {
    log_api::locate_for_replica(log, offset).await
}

/// `locate_for_replica` then `plan`, for one partition on its own.
pub async fn read_for_replica(
    log: &SharedLog,
    offset: Offset,
    max_bytes: usize,
    at_least_one: bool,
) -> std::io::Result<crate::storage::partition::FetchRead> {
    crate::storage::partition::read_for_replica(log, offset, max_bytes, at_least_one).await
}

/// Kafka's OffsetForLeaderEpoch on a leader: the largest epoch at or below
/// `epoch` in this log's epoch cache and where it ends. An epoch newer than
/// the latest entry answers the latest and the log end: a leader records its
/// epoch at its first append, not at election as Kafka does, so the epochs
/// between wrote nothing here and the latest one still runs to the log end.
pub fn epoch_end_offset(log: &SharedLog, epoch: i32) -> Option<(i32, Offset)> {
    log_api::leader_epoch_end_for(log, epoch)
}

/// A fetch's `last_fetched_epoch` (KIP-320) checked against the leader's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchEpochCheck {
    /// The fetcher's log agrees with ours up to its fetch offset: read on.
    Consistent,
    /// It diverged: answer `diverging_epoch` (the largest epoch of ours at
    /// or below its last fetched epoch and where that ends), error NONE and
    /// no records; it truncates there and fetches again.
    Diverging { epoch: i32, end_offset: Offset },
    /// No epoch of ours is at or below it: OFFSET_OUT_OF_RANGE, as Kafka 3.x
    /// answers ("could not determine the end offset of the last fetched epoch").
    Undefined,
}

/// Kafka's rule (`Partition.readRecords`): with `found` = OffsetForLeaderEpoch
/// of `last_fetched_epoch` on the leader's log, the fetch diverges when the
/// leader does not have that epoch (it answered a smaller one) or that epoch
/// ends before `fetch_offset` on the leader.
pub fn fetch_epoch_check(
    found: Option<(i32, Offset)>,
    last_fetched_epoch: i32,
    fetch_offset: Offset,
) -> FetchEpochCheck {
    if last_fetched_epoch < 0 {
        return FetchEpochCheck::Consistent;
    }
    match found {
        None => FetchEpochCheck::Undefined,
        Some((epoch, end)) if epoch < 0 || end.0 < 0 => FetchEpochCheck::Undefined,
        Some((epoch, end_offset)) if epoch < last_fetched_epoch || end_offset < fetch_offset => {
            FetchEpochCheck::Diverging { epoch, end_offset }
        }
        Some(_) => FetchEpochCheck::Consistent,
    }
}

/// `fetch_epoch_check` against `log`'s epoch cache.
pub fn check_fetch_epoch(log: &SharedLog, last_fetched_epoch: i32, fetch_offset: Offset) -> FetchEpochCheck {
    if last_fetched_epoch < 0 {
        return FetchEpochCheck::Consistent;
    }
    fetch_epoch_check(epoch_end_offset(log, last_fetched_epoch), last_fetched_epoch, fetch_offset)
}

/// Where a follower truncates once the leader answered `(leader_epoch,
/// leader_end)` for its latest epoch, by OffsetForLeaderEpoch or a Fetch's
/// `diverging_epoch` (Kafka's `getOffsetTruncationState`, KIP-101/279).
/// `own` is the follower's own OffsetForLeaderEpoch of `leader_epoch`; `leo`
/// and `hw` its log end and high watermark. Never past `leo`.
pub fn truncation_offset(
    leader_epoch: i32,
    leader_end: i64,
    own: Option<(i32, Offset)>,
    leo: Offset,
    hw: Offset,
) -> Offset {
    if leader_end < 0 {
        // The leader knows no epoch of ours: keep what both have for sure.
        return hw.min(leo);
    }
    let leader_end = Offset(leader_end);
    if leader_epoch < 0 {
        return leader_end.min(leo);
    }
    match own {
        // We do not have the leader's epoch: cut to the end of our largest
        // smaller one; the next fetch (with that as its last fetched
        // epoch) asks again from there (KIP-279).
        Some((epoch, end)) if epoch != leader_epoch => end.min(leo),
        Some((_, end)) => end.min(leader_end).min(leo),
        // No epochs of ours at or below it (a log from before epochs were
        // kept): the leader's end is where the shared prefix stops.
        None => leader_end.min(leo),
    }
}

/// Broker id of `shard` on this node.
pub fn my_broker_id(config: &crate::config::Config, shard: u32) -> i32 {
    broker_id(config.node_id, shard)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_high_watermark_counts_a_replica_being_added_to_the_isr() {
        use super::hw_bound;
        use tidelog_protocol::Offset;
        let ends = |r: i32| {
            Offset(match r {
                2 => 100,
                3 => 40,
                _ => -1,
            })
        };
        // Leader 1, ISR {1, 2}: bounded by 2.
        assert_eq!(hw_bound(&[1, 2], &[], 1, Offset(10), ends), Some(Offset(100)));
        // 3 proposed for the ISR: it bounds the watermark from now on.
        assert_eq!(hw_bound(&[1, 2], &[1, 2, 3], 1, Offset(10), ends), Some(Offset(40)));
        // A shrink proposal keeps the larger ISR until it is committed.
        assert_eq!(hw_bound(&[1, 2, 3], &[1, 2], 1, Offset(10), ends), Some(Offset(40)));
        // Alone: no bound. An unknown end holds the watermark where it is.
        assert_eq!(hw_bound(&[1], &[], 1, Offset(10), ends), None);
        assert_eq!(hw_bound(&[1, 4], &[], 1, Offset(10), ends), Some(Offset(10)));
    }

    use std::rc::Rc;

    use bytes::{Bytes, BytesMut};
    use tidelog_protocol::batch::{self, ProducerFields, RecordRef};
    use tidelog_protocol::{Epoch, Offset, PartitionId};

    use super::*;
    use crate::storage::partition::{self, LogSettings, PartitionLog, ReadLimit};
    use crate::storage::segment::SegmentSettings;

    fn o(v: i64) -> Offset {
        Offset(v)
    }

    #[test]
    fn isr_eligibility_checks_fencing_and_the_broker_epoch() {
        let mut image = MetadataImage::default();
        let node = |id: u32, epoch: i64, fenced: bool| crate::metadata::NodeRegistration {
            node_id: id,
            incarnation: format!("run-{epoch}"),
            host: "h".into(),
            port: 9092,
            num_shards: 2,
            rack: None,
            fenced,
            broker_epoch: epoch,
        };
        image.nodes.insert(2, node(2, 40, false));
        image.nodes.insert(3, node(3, 41, true));
        let shard1_of_node2 = broker_id(2, 1);
        // The current epoch, or none sent (Fetch before v15): eligible.
        assert_eq!(isr_eligible(&image, shard1_of_node2, 40), Ok(()));
        assert_eq!(isr_eligible(&image, shard1_of_node2, -1), Ok(()));
        // A fetch from an earlier run of node 2 (KIP-903).
        let stale = isr_eligible(&image, shard1_of_node2, 12).unwrap_err();
        assert!(stale.contains("broker epoch 12") && stale.contains("40"), "{stale}");
        // Fenced or unknown nodes never (KIP-841).
        assert!(isr_eligible(&image, broker_id(3, 0), 41).unwrap_err().contains("fenced"));
        assert!(isr_eligible(&image, broker_id(4, 0), -1).unwrap_err().contains("not registered"));
    }

    /// An acks=all produce waiting on an isolated leader: the shard that
    /// appended at epoch 4 may acknowledge only while its image still has
    /// it leading at epoch 4; deposed (another node's broker leads at 5), or
    /// leading again at 6 (its epoch-4 tail may have been truncated
    /// meanwhile), it may not. A single node has no epochs: always its own.
    #[test]
    fn produce_acks_need_the_leadership_they_appended_under() {
        use crate::metadata::{PartitionState, TopicMeta};
        let image_with = |leader: i32, leader_epoch: i32| {
            let mut image = MetadataImage { local_node: Some(1), ..Default::default() };
            let state = PartitionState {
                replicas: vec![broker_id(1, 0), broker_id(2, 0), broker_id(3, 0)],
                isr: vec![broker_id(1, 0), broker_id(2, 0), broker_id(3, 0)],
                leader,
                leader_epoch,
                partition_epoch: leader_epoch,
                adding_replicas: vec![],
                removing_replicas: vec![],
            };
            let topic = TopicMeta {
                name: "t".into(),
                id: "00".repeat(16),
                owners: vec![0],
                partitions: vec![state],
                configs: Default::default(),
            };
            image.topics.insert("t".into(), std::sync::Arc::new(topic));
            image
        };
        let me = ShardId(0);
        let leading = image_with(broker_id(1, 0), 4);
        assert!(Replication::leads_at_epoch(&leading, me, "t", 0, 4));
        assert!(!Replication::leads_at_epoch(&leading, ShardId(1), "t", 0, 4), "another shard of the node");
        assert!(!Replication::leads_at_epoch(&image_with(broker_id(2, 0), 5), me, "t", 0, 4), "deposed");
        assert!(!Replication::leads_at_epoch(&image_with(broker_id(1, 0), 6), me, "t", 0, 4), "re-elected later");
        assert!(!Replication::leads_at_epoch(&leading, me, "t", 1, 4), "no such partition");
        assert!(!Replication::leads_at_epoch(&leading, me, "gone", 0, 4), "no such topic");
        let mut single = MetadataImage::default();
        let topic = TopicMeta {
            name: "t".into(),
            id: "00".repeat(16),
            owners: vec![0],
            partitions: vec![],
            configs: Default::default(),
        };
        single.topics.insert("t".into(), std::sync::Arc::new(topic));
        assert!(Replication::leads_at_epoch(&single, me, "t", 0, 0));
    }

    #[test]
    fn fetch_epoch_check_follows_kafka() {
        use FetchEpochCheck::*;
        // No last fetched epoch: nothing to check.
        assert_eq!(fetch_epoch_check(None, -1, o(99)), Consistent);
        // Same epoch, ending at or past the fetch offset: consistent.
        assert_eq!(fetch_epoch_check(Some((3, o(20))), 3, o(20)), Consistent);
        assert_eq!(fetch_epoch_check(Some((3, o(20))), 3, o(12)), Consistent);
        // Same epoch, the fetcher has more of it than we do.
        assert_eq!(fetch_epoch_check(Some((3, o(20))), 3, o(25)), Diverging { epoch: 3, end_offset: o(20) });
        // We do not have its epoch (we answered a smaller one).
        assert_eq!(fetch_epoch_check(Some((1, o(10))), 2, o(10)), Diverging { epoch: 1, end_offset: o(10) });
        // Nothing at or below it here.
        assert_eq!(fetch_epoch_check(None, 2, o(10)), Undefined);
        assert_eq!(fetch_epoch_check(Some((-1, o(-1))), 2, o(10)), Undefined);
    }

    #[test]
    fn truncation_offset_follows_kafka() {
        let (leo, hw) = (o(18), o(8));
        // The leader knows nothing of our epoch: our high watermark.
        assert_eq!(truncation_offset(-1, -1, None, leo, hw), hw);
        assert_eq!(truncation_offset(-1, -1, None, o(5), hw), o(5), "never past the log end");
        // Same epoch on both: the smaller end.
        assert_eq!(truncation_offset(1, 10, Some((1, o(12))), leo, hw), o(10));
        assert_eq!(truncation_offset(1, 14, Some((1, o(12))), leo, hw), o(12));
        // We lack the leader's epoch: the end of our largest smaller one (KIP-279).
        assert_eq!(truncation_offset(3, 15, Some((2, o(11))), leo, hw), o(11));
        // No epoch of ours at or below it: the leader's end.
        assert_eq!(truncation_offset(3, 15, None, leo, hw), o(15));
        assert_eq!(truncation_offset(3, 40, None, leo, hw), leo);
    }

    fn settings() -> LogSettings {
        LogSettings {
            segment: SegmentSettings {
                index_interval_bytes: 256,
                preallocate_bytes: 64 * 1024,
                zero_ahead_bytes: 0,
                segment_bytes: 1 << 20,
                index_bytes_max: 10 << 20,
                flush_write_bytes_max: 8192,
            },
            roll_ms: u64::MAX / 2,
            roll_jitter_ms: 0,
            cache_bytes_max: 0,
        }
    }

    fn batch_of(first: usize, n: usize, tag: &str) -> Bytes {
        let values: Vec<Vec<u8>> = (first..first + n).map(|i| format!("{tag}-{i}").into_bytes()).collect();
        let recs: Vec<RecordRef<'_>> = values
            .iter()
            .map(|v| RecordRef { key: None, value: Some(v), headers: &[], timestamp_delta_ms: 0 })
            .collect();
        batch::build_batch(&recs, 1000, ProducerFields::default())
    }

    /// Appends `n` records as one batch written by a leader at `epoch`.
    fn lead_append(log: &SharedLog, epoch: i32, n: usize, tag: &str) {
        let first = log.borrow().log_end_offset().0 as usize;
        let b = batch_of(first, n, tag);
        let infos = batch::validate_record_set(&b, usize::MAX).unwrap();
        log.borrow_mut().append(BytesMut::from(&b[..]), &infos, Epoch(epoch));
    }

    /// What `leader` serves a follower from `offset`, appended to `follower`.
    async fn replicate(leader: &SharedLog, follower: &SharedLog, offset: Offset) {
        let r = partition::read_with(leader, offset, 1 << 20, true, ReadLimit::DurableEnd).await.unwrap();
        let mut all = BytesMut::new();
        for c in &r.chunks {
            all.extend_from_slice(c);
        }
        let (whole, infos) = partition::replica_record_set(&all.freeze(), usize::MAX).unwrap();
        follower.borrow_mut().append_replicated(&whole, &infos).unwrap();
        partition::flush(follower).await.unwrap();
    }

    async fn values(log: &SharedLog) -> Vec<(i64, i32)> {
        let r = partition::read_with(log, Offset(0), 1 << 20, true, ReadLimit::DurableEnd).await.unwrap();
        let mut out = Vec::new();
        for c in &r.chunks {
            let mut at = 0;
            while at < c.len() {
                let h = batch::BatchHeader::parse(&c[at..]).unwrap();
                for off in h.base_offset().0..=h.last_offset().0 {
                    out.push((off, h.leader_epoch().0));
                }
                at += h.size_bytes();
            }
        }
        out
    }

    /// A fetch answer applies only while the partition still follows the
    /// leader and epoch it was asked under.
    #[test]
    fn fetch_answers_apply_only_to_the_leader_and_epoch_asked() {
        let root = crate::test_dir("replication-follows");
        crate::run_on_executor(move || async move {
            let log = PartitionLog::open(Rc::from("t"), PartitionId(0), root.join("f"), settings()).await.unwrap();
            let me = Replication::new(broker_id(3, 0), None, Duration::from_secs(30));
            let key: PartitionKey = ("t".into(), 0);
            assert!(!me.follows(&key, broker_id(1, 0), 4), "not a follower at all");
            let following = |leader: i32, leader_epoch: i32| Following {
                log: log.clone(),
                leader,
                leader_epoch,
                truncation_checked: Rc::new(Cell::new(false)),
            };
            me.following.borrow_mut().insert(key.clone(), following(broker_id(1, 0), 4));
            assert!(me.follows(&key, broker_id(1, 0), 4));
            // Leadership moved while a fetch to broker 1000 was out.
            me.following.borrow_mut().insert(key.clone(), following(broker_id(2, 0), 5));
            assert!(!me.follows(&key, broker_id(1, 0), 4), "the old leader's answer");
            assert!(me.follows(&key, broker_id(2, 0), 5));
            // Led again by broker 1000, at a later epoch: the old answer is still stale.
            me.following.borrow_mut().insert(key.clone(), following(broker_id(1, 0), 6));
            assert!(!me.follows(&key, broker_id(1, 0), 4));
            assert!(!me.follows(&("t".into(), 1), broker_id(1, 0), 6), "another partition");
            drop((log, me));
            std::fs::remove_dir_all(&root).unwrap();
        });
    }

    /// A deposed leader's tail (epoch 2, offsets 10..18) that the new leader
    /// (epoch 3 from offset 10) never had: the new leader answers its fetch
    /// with the diverging epoch, the follower truncates there, fixes its
    /// epoch cache, fetches again and ends up with the leader's log.
    #[test]
    fn diverging_epoch_truncates_the_follower_to_the_leader() {
        let root = crate::test_dir("replication-diverging");
        crate::run_on_executor(move || async move {
            let open = |name: &str| {
                let dir = root.join(name);
                async move { PartitionLog::open(Rc::from("t"), PartitionId(0), dir, settings()).await.unwrap() }
            };
            let leader = open("leader").await;
            let follower = open("follower").await;
            lead_append(&leader, 1, 10, "a");
            partition::flush(&leader).await.unwrap();
            replicate(&leader, &follower, Offset(0)).await;
            // The follower led epoch 2 for a moment, alone.
            lead_append(&follower, 2, 8, "lost");
            partition::flush(&follower).await.unwrap();
            // The new leader at epoch 3 wrote other records there.
            lead_append(&leader, 3, 6, "b");
            lead_append(&leader, 3, 4, "c");
            partition::flush(&leader).await.unwrap();
            assert_eq!(epoch_end_offset(&leader, 3), Some((3, o(20))));
            assert_eq!(epoch_end_offset(&leader, 2), Some((1, o(10))), "epoch 2 is unknown to the leader");
            assert_eq!(epoch_end_offset(&leader, 7), Some((3, o(20))), "newer than its latest: the latest");

            // The follower's fetch: from its end, with its last epoch.
            let (fetch_offset, last_epoch) =
                (follower.borrow().log_end_offset(), log_api::latest_epoch(&follower).unwrap());
            assert_eq!((fetch_offset, last_epoch), (o(18), 2));
            let check = check_fetch_epoch(&leader, last_epoch, fetch_offset);
            assert_eq!(check, FetchEpochCheck::Diverging { epoch: 1, end_offset: o(10) });
            let FetchEpochCheck::Diverging { epoch, end_offset } = check else { unreachable!() };
            let (leo, hw) = (follower.borrow().log_end_offset(), follower.borrow().high_watermark);
            let target = truncation_offset(epoch, end_offset.0, log_api::epoch_end_for(&follower, epoch), leo, hw);
            assert_eq!(target, o(10));
            log_api::truncate_to(&follower, target).await.unwrap();
            assert_eq!(log_api::latest_epoch(&follower), Some(1), "epoch 2 left the cache with its records");

            // Fetch again: consistent now, and the leader's records follow.
            let fetch_offset = follower.borrow().log_end_offset();
            assert_eq!(check_fetch_epoch(&leader, 1, fetch_offset), FetchEpochCheck::Consistent);
            replicate(&leader, &follower, fetch_offset).await;
            assert_eq!(values(&follower).await, values(&leader).await);
            assert_eq!(log_api::latest_epoch(&follower), Some(3));
            assert_eq!(check_fetch_epoch(&leader, 3, o(20)), FetchEpochCheck::Consistent);
            // A consumer-like check past the leader's end of its epoch.
            assert_eq!(
                check_fetch_epoch(&leader, 3, o(21)),
                FetchEpochCheck::Diverging { epoch: 3, end_offset: o(20) }
            );
            // An epoch older than every entry ends where the first one starts.
            assert_eq!(check_fetch_epoch(&leader, 0, o(4)), FetchEpochCheck::Diverging { epoch: 0, end_offset: o(0) });
            drop((leader, follower));
            std::fs::remove_dir_all(&root).unwrap();
        });
    }
}
