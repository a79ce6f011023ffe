//! The transaction coordinator of one shard: the transactional ids whose
//! `__transaction_state` partition this shard leads, their state machine,
//! and the durable log of it.
//!
//! ```text
//!   client ──InitProducerId/AddPartitionsToTxn/AddOffsetsToTxn/EndTxn──▶ coordinator shard
//!                                                                         │ TxnMeta per id (RefCell, this shard only)
//!                                                                         │ every transition: a record in
//!                                                                         │ __transaction_state-p, durable first
//!                                                                         ▼
//!            WriteTxnMarkers (over TCP, like any broker, `markers`) ──▶ each partition's leader shard
//!                                                                         │ control batch appended (storage),
//!                                                                         │ pending TxnOffsetCommits applied (groups)
//! ```
//!
//! Placement is Kafka's: `partition = abs(java_string_hash(id)) % partitions`
//! of `__transaction_state` (one partition per broker, like
//! `__consumer_offsets`), and the coordinator is that partition's leader.
//! No cross-core calls: a transaction's markers reach other shards (and
//! other nodes) through their Kafka port, as a Kafka coordinator does.
//!
//! State machine (Kafka's `TransactionState`):
//!
//! ```text
//! Empty ──AddPartitions──▶ Ongoing ──EndTxn(commit)──▶ PrepareCommit ──markers──▶ CompleteCommit
//!   ▲                        │    └──EndTxn(abort) / timeout / fenced──▶ PrepareAbort ──markers──▶ CompleteAbort
//!   └──────InitProducerId (epoch + 1)◀──────────────────────────────────────────────────────┘
//! ```
//!
//! A transition is written to the log and becomes the id's state only once
//! durable (`transition`); meanwhile the id is `pending` and other requests
//! for it get CONCURRENT_TRANSACTIONS. The client is answered EndTxn once
//! the decision (PrepareCommit/PrepareAbort) is durable; the markers follow
//! in the background and the Complete state is written after the last one.
//!
//! Recovery: `run` replays the shard's `__transaction_state` partitions;
//! decisions whose markers were not all written are completed again
//! (markers are idempotent per producer epoch), open transactions stay open
//! until their producer ends them or they time out.

pub mod markers;
pub mod state;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidelog_protocol::ErrorCode;

use crate::config::Config;
use crate::groups::{now_ms, partition_for, OFFSETS_TOPIC};
use crate::shard::Shard;
use crate::storage::partition;
pub use state::{TxnMeta, TxnState};

/// The internal topic holding transaction state.
pub const TXN_TOPIC: &str = "__transaction_state";
/// Bytes read per step while replaying `__transaction_state`.
const LOAD_READ_BYTES: usize = 4 << 20;
/// The longest an EndTxn waits for its markers before it is answered.
const END_TXN_WAIT: Duration = Duration::from_secs(5);
/// How often leadership of `__transaction_state` partitions is followed.
const LEADERSHIP_TICK: Duration = Duration::from_millis(100);

/// Settings read from the broker config (Kafka's names).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// `transaction.max.timeout.ms`: the longest timeout a producer may ask for.
    pub max_timeout_ms: i32,
    /// `transaction.abort.timed.out.transaction.cleanup.interval.ms`.
    pub abort_interval: Duration,
    /// `transactional.id.expiration.ms`: ids idle this long are forgotten.
    pub id_expiration_ms: i64,
    /// `transaction.partition.verification.enable`: partition leaders verify
    /// a producer's first transactional batch with the coordinator.
    pub verify_partitions: bool,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        let num = |name: &str, default: i64| -> i64 {
            config.values.get(name).and_then(|(v, _)| v.trim().parse::<i64>().ok()).unwrap_or(default)
        };
        Settings {
            max_timeout_ms: num("transaction.max.timeout.ms", 900_000).clamp(1, i32::MAX as i64) as i32,
            abort_interval: Duration::from_millis(
                num("transaction.abort.timed.out.transaction.cleanup.interval.ms", 10_000).max(1) as u64,
            ),
            id_expiration_ms: num("transactional.id.expiration.ms", 604_800_000).max(1),
            verify_partitions: config
                .values
                .get("transaction.partition.verification.enable")
                .is_none_or(|(v, _)| !v.trim().eq_ignore_ascii_case("false")),
        }
    }
}

struct Entry {
    meta: TxnMeta,
    /// A transition of this id is being written.
    pending: bool,
}

pub struct Coordinator {
    pub settings: Settings,
    txns: RefCell<HashMap<String, Entry>>,
    loaded: Cell<bool>,
    /// `__transaction_state` partitions this shard leads and has loaded.
    serving: RefCell<BTreeSet<i32>>,
    /// Connections to partition leaders for WriteTxnMarkers.
    pub(crate) conns: markers::Pool,
    /// Transactions completed so far: committed, aborted.
    completed: Cell<(u64, u64)>,
}

/// What a request about a transaction answers, when it is not a success.
pub type TxnResult<T> = Result<T, ErrorCode>;

/// The `__transaction_state` partition of `id` and the shard of this node
/// leading it (`NO_SHARD` when another node does), if the topic exists.
pub fn partition_of(shard: &Shard, id: &str) -> Option<(i32, u32)> {
    crate::groups::key_partition(shard, TXN_TOPIC, id)
}

/// The broker id leading `id`'s `__transaction_state` partition.
pub fn coordinator_broker(shard: &Shard, id: &str) -> Option<i32> {
    crate::groups::key_leader(shard, TXN_TOPIC, id)
}

impl Coordinator {
    pub fn new(config: &Config) -> Coordinator {
        Coordinator {
            settings: Settings::from_config(config),
            txns: RefCell::new(HashMap::new()),
            loaded: Cell::new(false),
            serving: RefCell::new(BTreeSet::new()),
            conns: markers::Pool::default(),
            completed: Cell::new((0, 0)),
        }
    }

    /// Whether this shard coordinates `id` now; its partition if so.
    pub fn check(&self, shard: &Shard, id: &str) -> TxnResult<i32> {
        if id.is_empty() {
            return Err(ErrorCode::InvalidRequest);
        }
        let Some((p, owner)) = partition_of(shard, id) else {
            return Err(ErrorCode::CoordinatorNotAvailable);
        };
        if owner != shard.id.0 {
            return Err(ErrorCode::NotCoordinator);
        }
        if !self.loaded.get() || !self.serving.borrow().contains(&p) {
            return Err(ErrorCode::CoordinatorLoadInProgress);
        }
        Ok(p)
    }

    /// Whether this shard coordinates the ids of `__transaction_state-p` now.
    pub fn serving_partition(&self, p: i32) -> bool {
        self.serving.borrow().contains(&p)
    }

    /// A copy of `id`'s state, if known.
    pub fn get(&self, id: &str) -> Option<TxnMeta> {
        self.txns.borrow().get(id).map(|e| e.meta.clone())
    }

    /// Every known id and its state (ListTransactions).
    pub fn all(&self) -> Vec<(String, TxnMeta)> {
        let mut v: Vec<_> = self.txns.borrow().iter().map(|(k, e)| (k.clone(), e.meta.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Transactions completed so far: (committed, aborted).
    pub fn completed(&self) -> (u64, u64) {
        self.completed.get()
    }

    /// Open transactions (the `tidelog_transactions_ongoing` gauge).
    pub fn ongoing(&self) -> usize {
        self.txns.borrow().values().filter(|e| e.meta.state == TxnState::Ongoing).count()
    }

    /// Writes `new` as `id`'s state and applies it once durable. The id must
    /// not be pending (checked by the caller in the same step).
    async fn transition(&self, shard: &Rc<Shard>, id: &str, p: i32, new: TxnMeta) -> TxnResult<()> {
        // A new id is entered as pending too, so a second InitProducerId
        // for it meanwhile gets CONCURRENT_TRANSACTIONS.
        let inserted = {
            let mut txns = self.txns.borrow_mut();
            match txns.get_mut(id) {
                Some(e) => {
                    e.pending = true;
                    false
                }
                None => {
                    txns.insert(id.to_string(), Entry { meta: new.clone(), pending: true });
                    true
                }
            }
        };
        let written = append_and_wait(shard, p, &[(state::key(id), Some(state::value(&new)))]).await;
        let mut txns = self.txns.borrow_mut();
        // Leadership may have moved (and the state been dropped) meanwhile.
        let serving = self.serving.borrow().contains(&p);
        match (written, serving) {
            (Ok(_), true) => {
                txns.insert(id.to_string(), Entry { meta: new, pending: false });
                Ok(())
            }
            (Ok(_), false) => Err(ErrorCode::NotCoordinator),
            (Err(e), _) => {
                if inserted {
                    // Entered by this transition: nothing of it is durable.
                    txns.remove(id);
                } else if let Some(entry) = txns.get_mut(id) {
                    entry.pending = false;
                }
                log::warn!("transactional id {id}: cannot write {TXN_TOPIC}-{p}: {}", e.name());
                Err(e)
            }
        }
    }

    /// InitProducerId with a transactional id: a producer id and a new
    /// epoch, fencing any earlier producer of the id (KIP-98, KIP-360).
    pub async fn init_producer_id(
        &self,
        shard: &Rc<Shard>,
        id: &str,
        timeout_ms: i32,
        expected: Option<(i64, i16)>,
    ) -> TxnResult<(i64, i16)> {
        let p = self.check(shard, id)?;
        if timeout_ms <= 0 || timeout_ms > self.settings.max_timeout_ms {
            return Err(ErrorCode::InvalidTransactionTimeout);
        }
        let now = now_ms();
        let current = self.txns.borrow().get(id).map(|e| (e.meta.clone(), e.pending));
        let new = match current {
            None => {
                let pid = allocate(shard).await?;
                // Another first InitProducerId for this id may have been
                // written while we waited for the producer id: it wins, and
                // this one retries against its entry.
                if self.txns.borrow().contains_key(id) {
                    return Err(ErrorCode::ConcurrentTransactions);
                }
                TxnMeta {
                    producer_id: pid,
                    producer_epoch: 0,
                    last_producer_epoch: -1,
                    timeout_ms,
                    state: TxnState::Empty,
                    partitions: BTreeSet::new(),
                    last_update_ms: now,
                    start_ms: -1,
                }
            }
            Some((_, true)) => return Err(ErrorCode::ConcurrentTransactions),
            Some((m, false)) => {
                if let Some((pid, epoch)) = expected {
                    // KIP-360: a producer that knows its id and epoch may
                    // only bump them if they are still the current ones (or
                    // it retries the bump whose answer it lost).
                    if pid != m.producer_id {
                        return Err(ErrorCode::ProducerFenced);
                    }
                    let retried = epoch == m.last_producer_epoch && m.last_producer_epoch >= 0;
                    if retried && m.state == TxnState::Empty {
                        return Ok((m.producer_id, m.producer_epoch));
                    }
                    if epoch != m.producer_epoch && !retried {
                        return Err(ErrorCode::ProducerFenced);
                    }
                }
                match m.state {
                    TxnState::PrepareCommit | TxnState::PrepareAbort | TxnState::PrepareEpochFence => {
                        return Err(ErrorCode::ConcurrentTransactions)
                    }
                    TxnState::Ongoing => {
                        // A new producer instance: abort the old one's
                        // transaction with a bumped epoch (fencing it); the
                        // client retries and then gets its epoch.
                        log::info!(
                            "transactional id {id}: new producer instance; aborting the open transaction of producer {} epoch {}",
                            m.producer_id,
                            m.producer_epoch
                        );
                        self.abort_fenced(shard, id, p, m, true).await?;
                        return Err(ErrorCode::ConcurrentTransactions);
                    }
                    TxnState::Dead => return Err(ErrorCode::ConcurrentTransactions),
                    TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {}
                }
                let (producer_id, producer_epoch, last) = if m.producer_epoch >= i16::MAX - 1 {
                    // Epoch exhausted: a new producer id (KIP-360).
                    (allocate(shard).await?, 0, -1)
                } else {
                    (m.producer_id, m.producer_epoch + 1, m.producer_epoch)
                };
                TxnMeta {
                    producer_id,
                    producer_epoch,
                    last_producer_epoch: last,
                    timeout_ms,
                    state: TxnState::Empty,
                    partitions: BTreeSet::new(),
                    last_update_ms: now,
                    start_ms: -1,
                }
            }
        };
        let answer = (new.producer_id, new.producer_epoch);
        self.transition(shard, id, p, new).await?;
        log::info!("transactional id {id}: producer {} epoch {}", answer.0, answer.1);
        Ok(answer)
    }

    /// Checks a request's producer id and epoch against the id's state:
    /// the state and whether a transition of it is being written.
    fn producer_state(&self, id: &str, pid: i64, epoch: i16) -> TxnResult<(TxnMeta, bool)> {
        let txns = self.txns.borrow();
        let Some(e) = txns.get(id) else { return Err(ErrorCode::InvalidProducerIdMapping) };
        if e.meta.producer_id != pid {
            return Err(ErrorCode::InvalidProducerIdMapping);
        }
        if e.meta.producer_epoch != epoch {
            return Err(ErrorCode::ProducerFenced);
        }
        Ok((e.meta.clone(), e.pending))
    }

    /// `producer_state`, with CONCURRENT_TRANSACTIONS while a transition is written.
    fn check_producer(&self, id: &str, pid: i64, epoch: i16) -> TxnResult<TxnMeta> {
        match self.producer_state(id, pid, epoch)? {
            (_, true) => Err(ErrorCode::ConcurrentTransactions),
            (m, false) => Ok(m),
        }
    }

    /// AddPartitionsToTxn (and AddOffsetsToTxn's partition): the
    /// partitions join the open transaction, which starts if none is open.
    pub async fn add_partitions(
        &self,
        shard: &Rc<Shard>,
        id: &str,
        pid: i64,
        epoch: i16,
        parts: &[(String, i32)],
    ) -> TxnResult<()> {
        let p = self.check(shard, id)?;
        let m = self.check_producer(id, pid, epoch)?;
        if m.state.is_preparing() {
            return Err(ErrorCode::ConcurrentTransactions);
        }
        if m.state == TxnState::Dead {
            return Err(ErrorCode::InvalidTxnState);
        }
        if m.state == TxnState::Ongoing && parts.iter().all(|x| m.partitions.contains(x)) {
            return Ok(());
        }
        let now = now_ms();
        let mut new = m.clone();
        if m.state != TxnState::Ongoing {
            new.partitions.clear();
            new.start_ms = now;
        }
        new.state = TxnState::Ongoing;
        new.partitions.extend(parts.iter().cloned());
        new.last_update_ms = now;
        self.transition(shard, id, p, new).await
    }

    /// KIP-890 verification: whether every one of `parts` is in `id`'s open
    /// transaction of producer `pid` at `epoch` (per partition).
    pub fn verify(
        &self,
        shard: &Shard,
        id: &str,
        pid: i64,
        epoch: i16,
        parts: &[(String, i32)],
    ) -> TxnResult<Vec<bool>> {
        self.check(shard, id)?;
        let (m, _) = self.producer_state(id, pid, epoch)?;
        let open = m.state == TxnState::Ongoing;
        Ok(parts.iter().map(|x| open && m.partitions.contains(x)).collect())
    }

    /// EndTxn: writes the decision, answers once it is durable, and writes
    /// the markers in the background.
    pub async fn end_txn(&self, shard: &Rc<Shard>, id: &str, pid: i64, epoch: i16, commit: bool) -> TxnResult<()> {
        let p = self.check(shard, id)?;
        let m = self.check_producer(id, pid, epoch)?;
        match (m.state, commit) {
            (TxnState::Ongoing, _) => {}
            // A retry of an EndTxn whose answer was lost.
            (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => return Ok(()),
            (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
                return Err(ErrorCode::ConcurrentTransactions)
            }
            _ => return Err(ErrorCode::InvalidTxnState),
        }
        let mut new = m;
        new.state = if commit { TxnState::PrepareCommit } else { TxnState::PrepareAbort };
        new.last_update_ms = now_ms();
        self.transition(shard, id, p, new).await?;
        // Answered once the markers are written, so that the producer's
        // next transaction starts at once: Kafka answers at the decision
        // and the client's next AddPartitionsToTxn then gets
        // CONCURRENT_TRANSACTIONS and retries after a backoff (20-100 ms).
        // Never later than END_TXN_WAIT: the decision is durable and the
        // markers follow in the background.
        let done = spawn_completion(shard, id.to_string(), p);
        let _ = glommio::timer::timeout(END_TXN_WAIT, async { Ok(done.await) }).await;
        Ok(())
    }

    /// Aborts the open transaction of `m` with the epoch bumped, so its
    /// producer is fenced (a new instance, or a timeout). Returns once the
    /// decision is durable; the markers follow in the background.
    /// `for_init`: asked by an InitProducerId, whose retry (with the epoch
    /// it knew) then gets the next epoch.
    async fn abort_fenced(&self, shard: &Rc<Shard>, id: &str, p: i32, m: TxnMeta, for_init: bool) -> TxnResult<()> {
        let mut new = m.clone();
        if m.producer_epoch < i16::MAX - 1 {
            new.producer_epoch = m.producer_epoch + 1;
            new.last_producer_epoch = if for_init { m.producer_epoch } else { -1 };
        }
        new.state = TxnState::PrepareAbort;
        new.last_update_ms = now_ms();
        self.transition(shard, id, p, new).await?;
        drop(spawn_completion(shard, id.to_string(), p));
        Ok(())
    }

    /// Writes the markers of a PrepareCommit/PrepareAbort and then the
    /// Complete state. Runs until done or the shard stops coordinating `id`.
    async fn complete(&self, shard: &Rc<Shard>, id: &str, p: i32) {
        let Some(m) = self.get(id) else { return };
        let commit = match m.state {
            TxnState::PrepareCommit => true,
            TxnState::PrepareAbort => false,
            _ => return,
        };
        let coordinator_epoch = coordinator_epoch(shard, p);
        let started = Instant::now();
        let done =
            markers::write_all(shard, id, p, m.producer_id, m.producer_epoch, commit, coordinator_epoch, &m.partitions)
                .await;
        if !done {
            return;
        }
        loop {
            if !self.serving.borrow().contains(&p) || shard.stopping.get() {
                return;
            }
            let current = self.txns.borrow().get(id).map(|e| (e.meta.clone(), e.pending));
            let Some((now_meta, pending)) = current else { return };
            if now_meta != m && !pending {
                return;
            }
            if pending {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let mut new = m.clone();
            new.state = if commit { TxnState::CompleteCommit } else { TxnState::CompleteAbort };
            new.partitions.clear();
            new.last_update_ms = now_ms();
            match self.transition(shard, id, p, new).await {
                Ok(()) => {
                    let (c, a) = self.completed.get();
                    self.completed.set(if commit { (c + 1, a) } else { (c, a + 1) });
                    log::debug!(
                        "transactional id {id}: {} of producer {} epoch {} complete on {} partition(s) in {:?}",
                        if commit { "commit" } else { "abort" },
                        m.producer_id,
                        m.producer_epoch,
                        m.partitions.len(),
                        started.elapsed()
                    );
                    return;
                }
                Err(ErrorCode::NotCoordinator) => return,
                Err(_) => glommio::timer::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn replay(&self, key: &[u8], value: Option<&[u8]>) {
        let Some(id) = state::decode_key(key) else { return };
        match value {
            None => {
                self.txns.borrow_mut().remove(&id);
            }
            Some(v) => match state::decode_value(v) {
                Some(meta) => {
                    self.txns.borrow_mut().insert(id, Entry { meta, pending: false });
                }
                None => log::warn!("{TXN_TOPIC}: cannot decode the state of transactional id {id}; skipped"),
            },
        }
    }
}

/// Writes a decided transaction's markers and its Complete state in the
/// background; the handle resolves when that is done (or given up).
fn spawn_completion(shard: &Rc<Shard>, id: String, p: i32) -> glommio::task::JoinHandle<()> {
    let shard = shard.clone();
    glommio::spawn_local(async move { shard.txns.complete(&shard, &id, p).await }).detach()
}

/// The coordinator epoch written in markers: the leader epoch of the
/// coordinator's `__transaction_state` partition.
fn coordinator_epoch(shard: &Shard, p: i32) -> i32 {
    let image = shard.image();
    image.topics.get(TXN_TOPIC).and_then(|t| image.partition_state(t, p as usize)).map(|s| s.leader_epoch).unwrap_or(0)
}

async fn allocate(shard: &Rc<Shard>) -> TxnResult<i64> {
    shard.producer_ids.allocate().await.map(|p| p.0).map_err(|e| {
        log::error!("InitProducerId: cannot reserve producer ids: {e}");
        ErrorCode::KafkaStorageError
    })
}

/// Appends records to `__transaction_state-p` and waits until they are durable.
async fn append_and_wait(shard: &Rc<Shard>, p: i32, recs: &[(Bytes, Option<Bytes>)]) -> TxnResult<i64> {
    let log = shard.log(TXN_TOPIC, p).ok_or(ErrorCode::NotCoordinator)?;
    let batch = crate::groups::records::build(recs, now_ms());
    crate::groups::append_batch_and_wait(shard, &log, &batch).await
}

/// The `__transaction_state` partition `TxnOffsetCommit`/`AddOffsetsToTxn`
/// refer to for a group: its `__consumer_offsets` partition.
pub fn offsets_partition(shard: &Shard, group_id: &str) -> Option<(String, i32)> {
    let image = shard.image();
    let t = image.topics.get(OFFSETS_TOPIC)?;
    Some((OFFSETS_TOPIC.to_string(), partition_for(group_id, t.owners.len())))
}

/// Placement of `__transaction_state` on a single node: partition p on shard p.
pub fn internal_placement(name: &str, partitions: usize, num_shards: usize) -> Option<Vec<u32>> {
    (name == TXN_TOPIC).then(|| (0..partitions).map(|p| (p % num_shards.max(1)) as u32).collect())
}

/// Shard 0 at start-up: creates `__transaction_state` (compacted) if it
/// does not exist yet, like `__consumer_offsets` (one partition per broker,
/// `transaction.state.log.replication.factor` replicas in a cluster, once
/// that many nodes are alive).
pub async fn ensure_topic(shard: Rc<Shard>) {
    let configured = shard
        .config
        .values
        .get("transaction.state.log.replication.factor")
        .and_then(|(v, _)| v.trim().parse::<i16>().ok())
        .unwrap_or(3);
    crate::groups::ensure_internal_topic(shard, TXN_TOPIC, configured, "transactions").await
}

/// The coordinator's task on its shard: load what it leads, then follow
/// leadership, abort timed-out transactions and expire idle ids.
pub async fn run(shard: Rc<Shard>) {
    loop {
        if shard.stopping.get() {
            return;
        }
        if shard.image().topics.contains_key(TXN_TOPIC) {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    let mut last_abort_check = Instant::now();
    while !shard.stopping.get() {
        follow_leadership(&shard).await;
        shard.txns.loaded.set(true);
        if last_abort_check.elapsed() >= shard.txns.settings.abort_interval {
            last_abort_check = Instant::now();
            abort_timed_out(&shard).await;
            expire_ids(&shard).await;
        }
        glommio::timer::sleep(LEADERSHIP_TICK.min(shard.txns.settings.abort_interval)).await;
    }
}

/// Takes over the ids of partitions this shard now leads (loading them from
/// the log and completing their pending decisions) and drops those of
/// partitions led elsewhere.
async fn follow_leadership(shard: &Rc<Shard>) {
    let image = shard.image();
    let Some(t) = image.topics.get(TXN_TOPIC) else { return };
    let partitions = t.owners.len();
    let led: BTreeSet<i32> = (0..partitions as i32).filter(|p| image.owner(TXN_TOPIC, *p) == Some(shard.id)).collect();
    let serving = shard.txns.serving.borrow().clone();
    if led == serving {
        return;
    }
    let coord = &shard.txns;
    let lost: BTreeSet<i32> = serving.difference(&led).copied().collect();
    let gained: Vec<i32> = led.difference(&serving).copied().collect();
    let reset: BTreeSet<i32> = lost.iter().chain(gained.iter()).copied().collect();
    coord.txns.borrow_mut().retain(|id, _| !reset.contains(&partition_for(id, partitions)));
    for p in &lost {
        coord.serving.borrow_mut().remove(p);
        log::info!("shard {}: no longer the transaction coordinator of {TXN_TOPIC}-{p}", shard.id.0);
    }
    for p in gained {
        if shard.log(TXN_TOPIC, p).is_none() {
            continue;
        }
        let started = Instant::now();
        let records = load_partition(shard, p).await;
        if shard.image().owner(TXN_TOPIC, p) != Some(shard.id) {
            continue;
        }
        coord.serving.borrow_mut().insert(p);
        let unfinished: Vec<String> = coord
            .txns
            .borrow()
            .iter()
            .filter(|(id, e)| partition_for(id, partitions) == p && e.meta.state.is_preparing())
            .map(|(id, _)| id.clone())
            .collect();
        log::info!(
            "shard {}: transaction coordinator of {TXN_TOPIC}-{p}: loaded {records} record(s) in {:?}; completing {} decided transaction(s)",
            shard.id.0,
            started.elapsed(),
            unfinished.len()
        );
        for id in unfinished {
            drop(spawn_completion(shard, id, p));
        }
    }
}

async fn load_partition(shard: &Rc<Shard>, p: i32) -> usize {
    let Some(log) = shard.log(TXN_TOPIC, p) else { return 0 };
    let (mut offset, end) = {
        let l = log.borrow();
        (l.log_start_offset, l.durable_end)
    };
    let mut count = 0usize;
    while offset < end {
        let r = match partition::read_with(&log, offset, LOAD_READ_BYTES, true, partition::ReadLimit::DurableEnd).await
        {
            Ok(r) => r,
            Err(e) => {
                log::error!(
                    "shard {}: reading {TXN_TOPIC}-{p} at {}: {e}; stopping the load there",
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
        for chunk in &r.chunks {
            if let Some(n) = crate::groups::records::for_each_record(chunk, |k, v| {
                shard.txns.replay(k, v);
                count += 1;
            }) {
                next = tidelog_protocol::Offset(n);
            }
        }
        if next <= offset {
            break;
        }
        offset = next;
    }
    count
}

/// Aborts (with the producer fenced, as Kafka does) every open transaction
/// older than its timeout.
async fn abort_timed_out(shard: &Rc<Shard>) {
    let now = now_ms();
    let expired: Vec<(String, TxnMeta)> = shard
        .txns
        .txns
        .borrow()
        .iter()
        .filter(|(_, e)| !e.pending && e.meta.expired(now))
        .map(|(id, e)| (id.clone(), e.meta.clone()))
        .collect();
    for (id, m) in expired {
        let Ok(p) = shard.txns.check(shard, &id) else { continue };
        log::info!(
            "transactional id {id}: transaction of producer {} epoch {} open for {} ms (timeout {} ms); aborting it and fencing the producer",
            m.producer_id,
            m.producer_epoch,
            now.saturating_sub(m.start_ms),
            m.timeout_ms
        );
        // Re-checked: a request may have moved it on meanwhile.
        let still = shard.txns.txns.borrow().get(&id).is_some_and(|e| !e.pending && e.meta == m);
        if still {
            if let Err(e) = shard.txns.abort_fenced(shard, &id, p, m, false).await {
                log::warn!("transactional id {id}: aborting the timed-out transaction failed: {}", e.name());
            }
        }
    }
}

/// Forgets ids with no open transaction that have been idle for longer than
/// `transactional.id.expiration.ms` (a tombstone in the log).
async fn expire_ids(shard: &Rc<Shard>) {
    let now = now_ms();
    let limit = shard.txns.settings.id_expiration_ms;
    let idle: Vec<String> = shard
        .txns
        .txns
        .borrow()
        .iter()
        .filter(|(_, e)| {
            !e.pending
                && matches!(e.meta.state, TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort)
                && now.saturating_sub(e.meta.last_update_ms) > limit
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in idle {
        let Ok(p) = shard.txns.check(shard, &id) else { continue };
        if let Some(e) = shard.txns.txns.borrow_mut().get_mut(&id) {
            e.pending = true;
        }
        match append_and_wait(shard, p, &[(state::key(&id), None)]).await {
            Ok(_) => {
                shard.txns.txns.borrow_mut().remove(&id);
                log::info!("transactional id {id}: idle for longer than transactional.id.expiration.ms; forgotten");
            }
            Err(e) => {
                if let Some(entry) = shard.txns.txns.borrow_mut().get_mut(&id) {
                    entry.pending = false;
                }
                log::warn!("transactional id {id}: cannot expire it: {}", e.name());
            }
        }
    }
}

/// For each of `parts`, whether it is in transactional id `id`'s open
/// transaction of producer `pid` at `epoch`, asked locally when this shard
/// coordinates `id`, else with AddPartitionsToTxn v4 `verify_only` to its
/// coordinator; the coordinator's error (fenced, not coordinator, ...) when
/// it cannot say.
pub async fn verify_partitions(
    shard: &Rc<Shard>,
    id: &str,
    pid: i64,
    epoch: i16,
    parts: &[(String, i32)],
) -> TxnResult<Vec<bool>> {
    match shard.txns.check(shard, id) {
        Ok(_) => shard.txns.verify(shard, id, pid, epoch, parts),
        Err(ErrorCode::NotCoordinator) => {
            let Some(broker) = coordinator_broker(shard, id) else { return Err(ErrorCode::CoordinatorNotAvailable) };
            markers::verify_remote(shard, broker, id, pid, epoch, parts).await
        }
        Err(e) => Err(e),
    }
}

/// KIP-890 verification from another coordinator (the group coordinator for
/// TxnOffsetCommit): is `part` in transactional id `id`'s open transaction
/// of producer `pid` at `epoch`? Asked locally when this shard coordinates
/// `id`, else with AddPartitionsToTxn v4 `verify_only` to its coordinator.
/// INVALID_TXN_STATE when it is not; the coordinator's error otherwise.
pub async fn verify_partition(shard: &Rc<Shard>, id: &str, pid: i64, epoch: i16, part: (String, i32)) -> TxnResult<()> {
    let included = verify_partitions(shard, id, pid, epoch, &[part]).await?;
    if included.iter().all(|x| *x) {
        Ok(())
    } else {
        Err(ErrorCode::InvalidTxnState)
    }
}
