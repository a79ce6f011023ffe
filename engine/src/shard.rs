//! A shard: one pinned core's partitions, its flusher (the accumulator's
//! group commit), and its side of the metadata coordination.
//!
//! Lives on shard `id`'s thread only (`Rc`, `RefCell`, `Cell`): nothing here
//! is shared with another core. Other cores are reached only through the
//! bounded controller channels (`coordination` below); a full channel makes
//! the sender wait (back-pressure), it never drops.
//!
//! # The life of a produce request (acks=-1)
//! 1. The connection task decodes the request and calls `PartitionLog::append`
//!    synchronously, so offsets follow request order. The frame was read
//!    from the socket into memory the handler owns alone (`frames`), so the
//!    base offset is written in place and the batch, a slice of the frame,
//!    is queued on the active segment with no copy.
//! 2. The log is put on the shard's dirty list and the flusher is woken.
//! 3. The flusher gives the log a flush task unless one is running. The task
//!    turns all pending batches into 4 KiB-aligned O_DIRECT writes (one
//!    buffer chain per segment, starting at the in-memory partial tail
//!    page), submits them together and fdatasyncs the file: one group commit
//!    per round for everything that arrived while the previous round was on
//!    disk. Logs do not wait for each other's rounds.
//! 4. Only then does the log's high watermark move; waiting produces are
//!    answered and long-polling fetches woken right after that round. A
//!    consumer can never read what a crash could take back.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use tidelog_protocol::{ErrorCode, PartitionId, ShardId};

use crate::config::Config;
use crate::metadata::{MetadataImage, TopicMeta};
use crate::notify::Notify;
use crate::storage::log_dirs::{DirState, LogDirs};
use crate::storage::partition::{self, LogSettings, PartitionLog, SharedLog};
use crate::storage::segment::{SegmentSettings, Unflushed};

/// A topic to create, as validated by the shard that received CreateTopics.
#[derive(Clone, Debug)]
pub struct NewTopic {
    pub name: String,
    pub partitions: i32,
    /// Replicas per partition (1 on a single node).
    pub replication_factor: i16,
    /// Explicit replica assignment (broker ids per partition), or empty.
    pub assignments: Vec<Vec<i32>>,
    pub configs: BTreeMap<String, String>,
}

/// A per-topic outcome of a controller operation.
pub type TopicResult = (String, Result<Arc<TopicMeta>, (ErrorCode, String)>);

/// Messages to the controller (shard 0).
pub enum ToController {
    CreateTopics {
        from: usize,
        req_id: u64,
        topics: Vec<NewTopic>,
    },
    DeleteTopics {
        from: usize,
        req_id: u64,
        names: Vec<String>,
    },
    /// Topic or broker config changes; one result per change, in order.
    AlterConfigs {
        from: usize,
        req_id: u64,
        changes: Vec<crate::topic_config::ConfigChange>,
    },
    /// Grow topics to the given partition counts.
    CreatePartitions {
        from: usize,
        req_id: u64,
        topics: Vec<(String, i32)>,
    },
    Applied {
        from: usize,
        version: u64,
    },
}

/// Messages from the controller to a shard.
pub enum FromController {
    Apply(Arc<MetadataImage>),
    Done {
        req_id: u64,
        results: Vec<TopicResult>,
    },
    /// A metrics scrape: answer with this shard's snapshot.
    Scrape(futures::channel::oneshot::Sender<crate::metrics::ShardSnapshot>),
}

/// Where Fetch record bytes came from on this shard (shard-local counters).
#[derive(Default)]
pub struct FetchStats {
    /// Sent from the recent-batch cache as `Bytes` slices.
    pub memory_bytes: Cell<u64>,
    /// Sent from segment files with sendfile.
    pub file_bytes: Cell<u64>,
    /// Bytes read through user space (O_DIRECT) to locate the first batch of
    /// a cold read: batch headers near the index position, never the data sent.
    pub located_bytes: Cell<u64>,
}

pub struct Shard {
    pub id: ShardId,
    pub fetch_stats: FetchStats,
    /// Where cold Fetch responses are sent from (see `sendpool`).
    pub send_pool: crate::sendpool::SendPool,
    /// Bound of the recent-batch cache of every log on this shard.
    pub cache_budget: Rc<partition::CacheBudget>,
    pub num_shards: usize,
    pub config: Arc<Config>,
    pub image: RefCell<Arc<MetadataImage>>,
    /// Topic names by topic id in `image` (Fetch v13+ names topics by id),
    /// rebuilt whenever the image is replaced.
    topic_ids: RefCell<HashMap<uuid::Uuid, Rc<str>>>,
    /// Logs this shard owns: topic -> partition index -> log.
    logs: RefCell<HashMap<String, Vec<Option<SharedLog>>>>,
    dirty: RefCell<Vec<SharedLog>>,
    dirty_queued: RefCell<std::collections::HashSet<(Rc<str>, i32)>>,
    /// Logs whose flush task is running (see `run_flusher`), by identity: a
    /// partition deleted and created again is a new log with the same name.
    flushing: RefCell<std::collections::HashSet<*const RefCell<PartitionLog>>>,
    dirty_notify: Notify,
    /// Woken whenever any high watermark on this shard moves.
    pub hw_notify: Notify,
    to_controller: ConnectedSender<ToController>,
    replies: RefCell<HashMap<u64, Option<Vec<TopicResult>>>>,
    reply_notify: Notify,
    next_req_id: Cell<u64>,
    pub connections: Cell<usize>,
    /// This shard's counters and histograms (see `metrics`).
    pub metrics: crate::metrics::ShardMetrics,
    /// Set once every owned log is open and the listener is up.
    pub stopping: Cell<bool>,
    /// The consumer group coordinator of this shard (see `groups`).
    pub groups: crate::groups::Coordinator,
    /// The transaction coordinator of this shard (`crate::txn`).
    pub txns: crate::txn::Coordinator,
    /// This shard's producer id range (see `storage::producer_state`).
    pub producer_ids: crate::storage::producer_state::PidAllocator,
    /// Leader and follower state of this shard's replicas (see `replication`).
    pub replication: crate::replication::Replication,
    /// Woken after each metadata image this shard applied.
    pub image_notify: Notify,
    /// `log.dirs` and their health, shared by all shards.
    pub log_dirs: Arc<LogDirs>,
    /// This shard's share of `queued.max.request.bytes` (see `server`).
    pub request_memory: Option<RequestMemory>,
    /// This shard's share of `queued.max.requests` (see `server`).
    pub request_queue: RequestQueue,
    /// Record bytes appended and not yet written, per data directory (the
    /// index of `log_dirs`): the accumulator, which `log.unflushed.max.bytes`
    /// bounds (`wait_for_unflushed_room`).
    pub unflushed: Vec<Rc<Unflushed>>,
    /// Produce requests (and replica fetches) that waited for that bound.
    pub unflushed_waits: Cell<u64>,
}

/// Requests read (or being read) and not yet dispatched, bounded by the
/// shard's share of `queued.max.requests`.
pub struct RequestQueue {
    pub slots: Rc<glommio::sync::Semaphore>,
    pub capacity: u64,
    /// Frames whose connection had to wait for a slot.
    pub waits: Cell<u64>,
}

/// The bytes of request frames a shard holds while reading and dispatching
/// them, at most (Kafka's memory pool, `queued.max.request.bytes`).
pub struct RequestMemory {
    pub budget: Rc<glommio::sync::Semaphore>,
    pub capacity: u64,
    /// Frames that had to wait for room.
    pub waits: Cell<u64>,
}

impl Shard {
    pub fn new(
        id: ShardId,
        config: Arc<Config>,
        image: Arc<MetadataImage>,
        to_controller: ConnectedSender<ToController>,
        send_pool: crate::sendpool::SendPool,
        quorum: Option<tidelog_quorum::QuorumHandle>,
        log_dirs: Arc<LogDirs>,
    ) -> Rc<Shard> {
        let replication = crate::replication::Replication::new(
            crate::metadata::broker_id(config.node_id, id.0),
            quorum,
            Duration::from_millis(config.replica_lag_time_max_ms),
        );
        let groups = crate::groups::Coordinator::new(&config);
        let txns = crate::txn::Coordinator::new(&config);
        // Producer ids carry the broker id (node.id x 1000 + shard) in their
        // top bits, so no two shards of a cluster ever hand out the same one.
        let pid_space = ShardId(crate::metadata::broker_id(config.node_id, id.0) as u32);
        let producer_ids = crate::storage::producer_state::PidAllocator::new(pid_space, &config.log_dir);
        let request_memory = config.queued_max_request_bytes.map(|total| {
            let capacity = (total / config.num_shards.max(1) as u64).max(65536);
            RequestMemory { budget: Rc::new(glommio::sync::Semaphore::new(capacity)), capacity, waits: Cell::new(0) }
        });
        let request_queue = {
            let capacity = (config.queued_max_requests / config.num_shards.max(1) as u64).max(1);
            RequestQueue { slots: Rc::new(glommio::sync::Semaphore::new(capacity)), capacity, waits: Cell::new(0) }
        };
        Rc::new(Shard {
            id,
            fetch_stats: FetchStats::default(),
            send_pool,
            cache_budget: partition::CacheBudget::new(cache_limit_bytes(&config, config.num_shards)),
            num_shards: config.num_shards,
            config,
            topic_ids: RefCell::new(topic_ids(&image)),
            image: RefCell::new(image),
            logs: RefCell::new(HashMap::new()),
            dirty: RefCell::new(Vec::new()),
            dirty_queued: RefCell::new(Default::default()),
            flushing: RefCell::new(Default::default()),
            dirty_notify: Notify::default(),
            hw_notify: Notify::default(),
            to_controller,
            replies: RefCell::new(HashMap::new()),
            reply_notify: Notify::default(),
            next_req_id: Cell::new(1),
            connections: Cell::new(0),
            metrics: Default::default(),
            stopping: Cell::new(false),
            groups,
            txns,
            producer_ids,
            replication,
            image_notify: Notify::default(),
            unflushed: (0..log_dirs.len()).map(|_| Rc::new(Unflushed::default())).collect(),
            unflushed_waits: Cell::new(0),
            log_dirs,
            request_memory,
            request_queue,
        })
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.image.borrow().clone()
    }

    /// The name of the topic with id `id` in the current image.
    pub fn topic_name_by_id(&self, id: &uuid::Uuid) -> Option<Rc<str>> {
        self.topic_ids.borrow().get(id).cloned()
    }

    pub fn log(&self, topic: &str, partition: i32) -> Option<SharedLog> {
        let logs = self.logs.borrow();
        let p = usize::try_from(partition).ok()?;
        logs.get(topic)?.get(p)?.clone()
    }

    /// Queues `log` for flushing (see `run_flusher`).
    pub fn mark_dirty(&self, log: &SharedLog) {
        let key = {
            let l = log.borrow();
            (l.topic.clone(), l.partition.0)
        };
        if self.dirty_queued.borrow_mut().insert(key) {
            self.dirty.borrow_mut().push(log.clone());
            self.dirty_notify.notify_all();
        }
    }

    /// Log settings of a topic: broker defaults (static, then dynamic) with
    /// topic overrides (see `topic_config`).
    pub fn log_settings(&self, topic: &TopicMeta) -> LogSettings {
        let c = &self.config;
        let image = self.image();
        let get = |k: &str, d: u64| {
            u64::try_from(crate::topic_config::topic_i64(&self.config, &image, topic, k))
                .ok()
                .filter(|v| *v > 0)
                .unwrap_or(d)
        };
        let preallocate = crate::topic_config::topic_bool(c, &image, topic, "preallocate");
        let segment_ms = get("segment.ms", c.roll_ms);
        // KIP-354: a compacted log's active segment rolls by
        // max.compaction.lag.ms too, so the cleaner can reach its records.
        let roll_ms = if crate::topic_config::policy_has(c, &image, topic, "compact") {
            segment_ms.min(get("max.compaction.lag.ms", u64::MAX))
        } else {
            segment_ms
        };
        LogSettings {
            segment: SegmentSettings {
                index_interval_bytes: get("index.interval.bytes", c.index_interval_bytes),
                preallocate_bytes: if preallocate { c.preallocate_bytes } else { 0 },
                zero_ahead_bytes: c.zero_ahead_bytes,
                segment_bytes: get("segment.bytes", c.segment_bytes),
                index_bytes_max: get("segment.index.bytes", 10 << 20),
                flush_write_bytes_max: c.flush_write_bytes_max,
            },
            roll_ms,
            roll_jitter_ms: u64::try_from(crate::topic_config::topic_i64(c, &image, topic, "segment.jitter.ms"))
                .unwrap_or(0),
            cache_bytes_max: self.cache_budget.limit_bytes,
        }
    }

    /// Opens every log this shard owns in `image` that is not open yet, and
    /// drops (and deletes from disk) logs of topics that are gone.
    pub async fn apply_image(self: &Rc<Self>, image: Arc<MetadataImage>) {
        let old = self.image.replace(image.clone());
        *self.topic_ids.borrow_mut() = topic_ids(&image);
        // Topics deleted, or recreated with a new id.
        let gone: Vec<Arc<TopicMeta>> =
            old.topics.values().filter(|t| image.topics.get(&t.name).is_none_or(|n| n.id != t.id)).cloned().collect();
        for t in gone {
            self.metrics.forget_topic(&t.name);
            let removed = self.logs.borrow_mut().remove(&t.name);
            if let Some(parts) = removed {
                for (p, log) in parts.into_iter().enumerate() {
                    if log.is_some() {
                        self.delete_partition_dir(&t, p as i32).await;
                    }
                }
            }
        }
        let moved_away = self.close_moved_away(&image);
        for t in image.topics.values() {
            for (p, owner) in t.owners.iter().enumerate() {
                if *owner as usize != self.id.0 as usize || self.log(&t.name, p as i32).is_some() {
                    continue;
                }
                let name = partition::partition_dir_name(&t.name, PartitionId(p as i32));
                let Some(dir) = self.log_dirs.place(&name) else {
                    log::error!(
                        "shard {}: {name}: no data directory is online ({}); the partition stays offline until one is",
                        self.id.0,
                        self.describe_offline_dirs()
                    );
                    continue;
                };
                match PartitionLog::open(Rc::from(t.name.as_str()), PartitionId(p as i32), dir, self.log_settings(t))
                    .await
                {
                    Ok(log) => {
                        log.borrow_mut().cache_budget = Some(self.cache_budget.clone());
                        let dir_index = self.log_dirs.index_of(&log.borrow().dir);
                        log.borrow_mut().unflushed = dir_index.and_then(|i| self.unflushed.get(i).cloned());
                        log.borrow_mut().writes_inflight_max = self.config.flush_writes_inflight_max;
                        if let Err(e) = crate::storage::checkpoint::restore(&log).await {
                            log::error!(
                                "shard {}: {}-{p}: cannot restore the log start offset checkpoint: {e}",
                                self.id.0,
                                t.name
                            );
                        }
                        let mut logs = self.logs.borrow_mut();
                        let parts = logs.entry(t.name.clone()).or_default();
                        if parts.len() < t.owners.len() {
                            parts.resize(t.owners.len(), None);
                        }
                        parts[p] = Some(log);
                    }
                    Err(e) => log::error!(
                        "shard {}: cannot open {}-{p}: {e}; the partition stays offline (check the data dir)",
                        self.id.0,
                        t.name
                    ),
                }
            }
        }
        // Config changes apply live: every open log takes its topic's settings.
        for (topic, _, log) in self.all_logs() {
            if let Some(t) = image.topics.get(&topic) {
                let settings = self.log_settings(t);
                log.borrow_mut().settings = settings;
            }
        }
        crate::replication::Replication::reconcile(self, &image);
        // Only now that replication let go of them.
        for (t, p) in moved_away {
            self.delete_partition_dir(&t, p).await;
        }
        self.image_notify.notify_all();
    }

    /// Closes the logs of partitions whose replica left this shard while
    /// the topic stayed (a reassignment removed it), so the next image that
    /// brings it back opens a fresh log. Their directories are deleted by
    /// the caller once replication stopped using them.
    fn close_moved_away(&self, image: &MetadataImage) -> Vec<(Arc<TopicMeta>, i32)> {
        let mut out = Vec::new();
        let mut logs = self.logs.borrow_mut();
        for (name, parts) in logs.iter_mut() {
            let Some(t) = image.topics.get(name) else { continue };
            for (p, slot) in parts.iter_mut().enumerate() {
                if slot.is_some() && t.owners.get(p).copied() != Some(self.id.0) {
                    log::info!("shard {}: {name}-{p}: no longer a replica here; deleting the local copy", self.id.0);
                    *slot = None;
                    out.push((t.clone(), p as i32));
                }
            }
        }
        out
    }

    async fn delete_partition_dir(&self, t: &TopicMeta, p: i32) {
        let name = partition::partition_dir_name(&t.name, PartitionId(p));
        let Some(i) = self.log_dirs.find(&name) else { return };
        let root = self.log_dirs.path(i).to_path_buf();
        self.log_dirs.removed(i);
        let dir = root.join(&name);
        let trash = root.join(format!("{}-{p}.{}-delete", t.name, t.id));
        let shard = self.id.0;
        let result = glommio::executor()
            .spawn_blocking(move || -> std::io::Result<()> {
                std::fs::rename(&dir, &trash)?;
                std::fs::remove_dir_all(&trash)
            })
            .await;
        match result {
            Ok(()) => log::info!("shard {shard}: deleted {}-{p}", t.name),
            Err(e) => log::warn!("shard {shard}: deleting {}-{p}: {e}", t.name),
        }
    }

    /// Sends a request to the controller and waits for its answer.
    async fn ask_controller(&self, make: impl FnOnce(u64) -> ToController) -> Vec<TopicResult> {
        let req_id = self.next_req_id.get();
        self.next_req_id.set(req_id + 1);
        self.replies.borrow_mut().insert(req_id, None);
        if self.to_controller.send(make(req_id)).await.is_err() {
            self.replies.borrow_mut().remove(&req_id);
            return Vec::new();
        }
        loop {
            let notified = self.reply_notify.notified();
            if let Some(Some(done)) = self.replies.borrow_mut().remove(&req_id) {
                return done;
            }
            self.replies.borrow_mut().entry(req_id).or_insert(None);
            notified.await;
        }
    }

    pub async fn create_topics(&self, topics: Vec<NewTopic>) -> Vec<TopicResult> {
        let from = self.id.0 as usize;
        self.ask_controller(|req_id| ToController::CreateTopics { from, req_id, topics }).await
    }

    pub async fn alter_configs(&self, changes: Vec<crate::topic_config::ConfigChange>) -> Vec<TopicResult> {
        let from = self.id.0 as usize;
        self.ask_controller(|req_id| ToController::AlterConfigs { from, req_id, changes }).await
    }

    pub async fn create_partitions(&self, topics: Vec<(String, i32)>) -> Vec<TopicResult> {
        let from = self.id.0 as usize;
        self.ask_controller(|req_id| ToController::CreatePartitions { from, req_id, topics }).await
    }

    pub async fn delete_topics(&self, names: Vec<String>) -> Vec<TopicResult> {
        let from = self.id.0 as usize;
        self.ask_controller(|req_id| ToController::DeleteTopics { from, req_id, names }).await
    }

    /// This shard's end of the controller channel: applies images, completes
    /// replies.
    pub async fn run_follower(self: Rc<Self>, from_controller: ConnectedReceiver<FromController>) {
        while let Some(msg) = from_controller.recv().await {
            match msg {
                FromController::Apply(image) => {
                    let version = image.version;
                    self.apply_image(image).await;
                    let from = self.id.0 as usize;
                    let _ = self.to_controller.send(ToController::Applied { from, version }).await;
                }
                FromController::Scrape(reply) => {
                    let _ = reply.send(self.metrics_snapshot());
                }
                FromController::Done { req_id, results } => {
                    if let Some(slot) = self.replies.borrow_mut().get_mut(&req_id) {
                        *slot = Some(results);
                    }
                    self.reply_notify.notify_all();
                }
            }
        }
    }

    /// The accumulator's flush loop. Every dirty log gets its own flush task
    /// at once: partitions are separate files with their own fdatasync, so
    /// no log waits for another's writes (there is no shared cycle to wait
    /// for). A log whose task is still running is left to it: the task keeps
    /// flushing until nothing is pending, and each round it completes wakes
    /// the produces and fetches waiting on that log's high watermark.
    pub async fn run_flusher(self: Rc<Self>) {
        loop {
            let batch: Vec<SharedLog> = std::mem::take(&mut *self.dirty.borrow_mut());
            if batch.is_empty() {
                if self.stopping.get() {
                    return;
                }
                self.dirty_notify.notified().await;
                continue;
            }
            for log in batch {
                let key = {
                    let l = log.borrow();
                    (l.topic.clone(), l.partition.0)
                };
                self.dirty_queued.borrow_mut().remove(&key);
                // The task holds `log`, so its address is not reused while it is in the set.
                if !self.flushing.borrow_mut().insert(Rc::as_ptr(&log)) {
                    continue;
                }
                glommio::spawn_local(self.clone().flush_log(log)).detach();
            }
        }
    }

    /// One log's flush task (see `run_flusher`).
    async fn flush_log(self: Rc<Self>, log: SharedLog) {
        let on_durable = |bytes: u64, took: Duration| {
            if bytes > 0 {
                self.metrics.flushed(bytes, took);
                self.send_pool.note_write();
            }
            self.hw_notify.notify_all();
        };
        let result = partition::flush_notifying(&log, &on_durable).await;
        let mut retry = result.is_err();
        if let Err(e) = &result {
            retry = self.flush_failed(&log, e).await;
        }
        // No await between the flush's last "nothing pending" and here, so
        // nothing appended since can be missed.
        self.flushing.borrow_mut().remove(&Rc::as_ptr(&log));
        if retry {
            // Retried only while the log is still this shard's: a partition
            // deleted or moved away meanwhile has nothing left to keep.
            let current = {
                let l = log.borrow();
                self.log(&l.topic, l.partition.0).is_some_and(|now| Rc::ptr_eq(&now, &log))
            };
            if current {
                self.mark_dirty(&log);
            }
        }
        self.hw_notify.notify_all();
    }

    /// A flush of `log` failed with `e`: takes its data directory offline
    /// (Full on ENOSPC, Failed on any other error) and, for a full one,
    /// waits until the filesystem has room again. Returns whether to retry
    /// the flush: yes once a full directory is back, never for a failed one
    /// (its unflushed records were never acknowledged with acks=all, and
    /// Kafka too keeps a failed directory offline until restart).
    async fn flush_failed(&self, log: &SharedLog, e: &std::io::Error) -> bool {
        let (topic, partition, end, hw, dir) = {
            let l = log.borrow();
            (l.topic.clone(), l.partition.0, l.log_end_offset().0, l.high_watermark.0, l.dir.clone())
        };
        let Some(i) = self.log_dirs.index_of(&dir) else {
            log::error!(
                "shard {}: flush of {topic}-{partition} failed at offset {end} (high watermark {hw}): {e}; retrying",
                self.id.0
            );
            glommio::timer::sleep(Duration::from_millis(100)).await;
            return true;
        };
        let root = self.log_dirs.path(i).display().to_string();
        match self.log_dirs.write_failed(i, e) {
            Some(DirState::Full) => log::error!(
                "shard {}: log dir {root} is full: flush of {topic}-{partition} failed at offset {end} \
                 (high watermark {hw}): {e}; produces to its partitions get KAFKA_STORAGE_ERROR until space \
                 is freed (delete data, lower retention.bytes/retention.ms, or grow the filesystem); records \
                 above offset {hw} wait in memory and are written then",
                self.id.0
            ),
            Some(DirState::Failed) => log::error!(
                "shard {}: log dir {root} failed: flush of {topic}-{partition} failed at offset {end} \
                 (high watermark {hw}): {e}; it is offline until the broker restarts (check dmesg and the \
                 disk); records above offset {hw} that were not acknowledged are not written",
                self.id.0
            ),
            _ => {}
        }
        // Produces waiting on this log answer now (see `handlers::produce`).
        self.hw_notify.notify_all();
        loop {
            match self.log_dirs.state(i) {
                DirState::Failed => return false,
                DirState::Online => return true,
                DirState::Full => {
                    for back in self.log_dirs.recheck_full() {
                        log::info!(
                            "shard {}: log dir {} has room again; it is back online and waiting flushes resume",
                            self.id.0,
                            self.log_dirs.path(back).display()
                        );
                    }
                    if self.log_dirs.state(i) == DirState::Full {
                        glommio::timer::sleep(DIR_RECHECK_INTERVAL).await;
                    }
                }
            }
        }
    }

    /// The data directory state of `log` (Online for a path outside `log.dirs`).
    pub fn dir_state(&self, log: &SharedLog) -> DirState {
        let l = log.borrow();
        self.log_dirs.index_of(&l.dir).map(|i| self.log_dirs.state(i)).unwrap_or(DirState::Online)
    }

    /// Record bytes appended and not yet written in this shard's online data
    /// directories. A full or failed directory's records wait there without
    /// holding up the others.
    pub fn unflushed_bytes(&self) -> u64 {
        self.unflushed
            .iter()
            .enumerate()
            .filter(|(i, _)| self.log_dirs.state(*i) == DirState::Online)
            .map(|(_, u)| u.bytes() as u64)
            .sum()
    }

    /// Waits while this shard holds more unflushed record bytes than
    /// `log.unflushed.max.bytes`: called before a Produce is dispatched (and
    /// before a replica fetch), so a disk slower than the network stops the
    /// connection's reads instead of growing the accumulator. Requests keep
    /// their order: the connection dispatches nothing else meanwhile.
    pub async fn wait_for_unflushed_room(&self) {
        let Some(limit) = self.config.unflushed_max_bytes else { return };
        if self.unflushed_bytes() <= limit {
            return;
        }
        self.unflushed_waits.set(self.unflushed_waits.get() + 1);
        log::debug!(
            "shard {}: {} unflushed bytes is over log.unflushed.max.bytes={limit}; produce waits for the flusher",
            self.id.0,
            self.unflushed_bytes()
        );
        loop {
            let notified = self.hw_notify.notified();
            if self.unflushed_bytes() <= limit || self.stopping.get() {
                return;
            }
            let _ = glommio::timer::timeout(Duration::from_millis(20), async {
                notified.await;
                Ok(())
            })
            .await;
        }
    }

    /// "path (state: reason), ..." for the directories that are not online.
    pub fn describe_offline_dirs(&self) -> String {
        self.log_dirs
            .offline()
            .into_iter()
            .map(|(p, s, why)| format!("{} {}: {why}", p.display(), s.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every log this shard owns, as (topic, partition, log).
    pub fn all_logs(&self) -> Vec<(String, i32, SharedLog)> {
        let logs = self.logs.borrow();
        let mut out = Vec::new();
        for (t, parts) in logs.iter() {
            for (p, l) in parts.iter().enumerate() {
                if let Some(l) = l {
                    out.push((t.clone(), p as i32, l.clone()));
                }
            }
        }
        out
    }

    /// This shard's metrics: counters plus every owned log's gauges.
    pub fn metrics_snapshot(&self) -> crate::metrics::ShardSnapshot {
        let mut snap = self.metrics.snapshot(self.id.0);
        snap.connections = self.connections.get() as u64;
        snap.fetch_memory_bytes = self.fetch_stats.memory_bytes.get();
        snap.fetch_file_bytes = self.fetch_stats.file_bytes.get();
        snap.fetch_located_bytes = self.fetch_stats.located_bytes.get();
        snap.cold_sends = self.send_pool.in_flight();
        snap.cold_throttle_seconds = self.send_pool.throttled_seconds();
        snap.cold_limit_bytes_per_second = self.send_pool.limit_bytes_per_second();
        if let Some(m) = &self.request_memory {
            snap.request_memory_bytes = m.capacity.saturating_sub(m.budget.available());
            snap.request_memory_waits = m.waits.get();
        }
        {
            let q = &self.request_queue;
            snap.queued_requests = q.capacity.saturating_sub(q.slots.available());
            snap.queued_requests_waits = q.waits.get();
        }
        snap.unflushed_bytes = self.unflushed_bytes();
        snap.unflushed_waits = self.unflushed_waits.get();
        snap.txn_ongoing = self.txns.ongoing() as u64;
        (snap.txn_committed, snap.txn_aborted) = self.txns.completed();
        snap.log_dirs = (0..self.log_dirs.len())
            .map(|i| {
                let path = self.log_dirs.path(i);
                let (usable, total) =
                    crate::storage::log_dirs::space(path).map(|(f, t)| (f as i64, t as i64)).unwrap_or((-1, -1));
                crate::metrics::LogDirSnapshot {
                    path: path.display().to_string(),
                    state: match self.log_dirs.state(i) {
                        DirState::Online => 0,
                        DirState::Full => 1,
                        DirState::Failed => 2,
                    },
                    usable_bytes: usable,
                    total_bytes: total,
                }
            })
            .collect();
        for (topic, partition, log) in self.all_logs() {
            let l = log.borrow();
            let stats = l.stats();
            snap.memory_bytes += stats.cache_bytes + stats.pending_bytes;
            snap.set_partition_gauges(crate::metrics::PartitionSnapshot {
                topic,
                partition,
                high_watermark: l.high_watermark.0,
                last_stable_offset: l.last_stable_offset().0,
                ongoing_txns: l.ongoing_txns() as u64,
                log_start_offset: l.log_start_offset.0,
                log_end_offset: l.log_end_offset().0,
                segments: stats.segments,
                segment_bytes: stats.bytes,
                ..Default::default()
            });
        }
        snap.partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        snap
    }

    /// Waits until every pending write is durable (used on shutdown).
    pub async fn drain(&self) {
        loop {
            // A log in a directory that is not online cannot flush: its
            // unflushed records were never acknowledged with acks=all.
            let pending = self
                .logs
                .borrow()
                .values()
                .flatten()
                .flatten()
                .any(|l| l.borrow().needs_flush() && self.dir_state(l) == DirState::Online);
            if !pending {
                for (topic, partition, log) in self.all_logs() {
                    let l = log.borrow();
                    if l.needs_flush() {
                        log::warn!(
                            "shard {}: {topic}-{partition}: records from offset {} up to the log end {} are not written: \
                             its log dir is offline ({}); none was acknowledged with acks=all",
                            self.id.0,
                            l.durable_end.0,
                            l.log_end_offset().0,
                            self.describe_offline_dirs()
                        );
                    }
                }
                return;
            }
            let _ = glommio::timer::timeout(Duration::from_millis(50), async {
                self.hw_notify.notified().await;
                Ok(())
            })
            .await;
        }
    }
}

/// How often a shard waiting on a full data directory checks for free space.
const DIR_RECHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Topic names by topic id in `image` (topics with the nil id left out).
fn topic_ids(image: &MetadataImage) -> HashMap<uuid::Uuid, Rc<str>> {
    image.topics.values().filter(|t| !t.uuid().is_nil()).map(|t| (t.uuid(), Rc::from(t.name.as_str()))).collect()
}

/// `fetch.cache.max.bytes`, or 1/8 of physical memory per shard (at most 1 GiB).
fn cache_limit_bytes(config: &Config, num_shards: usize) -> usize {
    if config.fetch_cache_max_bytes > 0 {
        return config.fetch_cache_max_bytes;
    }
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let memory = if pages > 0 && page > 0 { pages as usize * page as usize } else { 1 << 30 };
    (memory / num_shards.max(1) / 8).min(1 << 30)
}
