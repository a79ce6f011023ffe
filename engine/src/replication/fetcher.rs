//! The replica fetcher: one task per (shard, leader broker), on the shard
//! that owns the follower replicas, fetching every partition it follows from
//! that leader over one connection to the leader shard's own port.
//!
//! A round: (after a leader change) check the tail against the leader with
//! OffsetForLeaderEpoch and truncate what diverged; Fetch (replica id = our
//! broker id) from each log's end, with the epoch it ends in (KIP-320: a
//! `diverging_epoch` answer truncates there and the next round fetches
//! again); append what came with the leader's
//! offsets and epochs unchanged; wait until it is on disk; take the leader's
//! high watermark as the cap of ours. The next Fetch's offsets are therefore
//! durable, which is what the leader counts as replicated.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidelog_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ReplicaState};
use tidelog_protocol::messages::offset_for_leader_epoch_request::{OffsetForLeaderPartition, OffsetForLeaderTopic};
use tidelog_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, TopicName,
};
use tidelog_protocol::{ErrorCode, Offset, StrBytes};

use uuid::Uuid;

use super::wire::Conn;
use super::{Following, PartitionKey};
use crate::metadata::split_broker_id;
use crate::notify::Notify;
use crate::shard::Shard;
use crate::storage::partition;

/// Fetch versions the follower speaks, negotiated with the leader on each
/// connection (ApiVersions), highest first:
/// - v15: our broker epoch in `replica_state` (KIP-903);
/// - v13+: topics by id (KIP-516, so a topic deleted and created again
///   under the same name is not mixed up with the old one);
/// - v12+: `last_fetched_epoch`, answered with `diverging_epoch` (KIP-320);
/// - down to v4 (the oldest tidelog leader): the OffsetForLeaderEpoch check
///   after each leader change still truncates what diverged.
const FETCH_VERSIONS: std::ops::RangeInclusive<i16> = 4..=15;
const OFFSET_FOR_LEADER_EPOCH_VERSIONS: std::ops::RangeInclusive<i16> = 2..=3;
const FETCH_MAX_WAIT_MS: i32 = 500;
const PARTITION_MAX_BYTES: i32 = 1 << 20;
const FETCH_MAX_BYTES: i32 = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an error before trying again (connection, leader moved).
const BACKOFF: Duration = Duration::from_millis(200);

pub(super) async fn run(shard: Rc<Shard>, leader: i32, wake: Rc<Notify>) {
    let me = shard.replication.my_broker();
    let client_id = format!("tidelog-replica-{me}");
    let mut conn: Option<Conn> = None;
    let mut last_error_log: Option<Instant> = None;
    log::info!("shard {}: replica fetcher for leader broker {leader} started", shard.id.0);
    while !shard.stopping.get() {
        let parts = shard.replication.following_from(leader);
        if parts.is_empty() {
            break;
        }
        let image = shard.image();
        let Some(endpoint) = image.broker_endpoint(&shard.config, shard.num_shards, leader) else {
            // The leader is fenced or unknown: wait for the next image.
            wait(&wake, BACKOFF * 5).await;
            continue;
        };
        let result = async {
            if conn.is_none() {
                let addr = crate::config::resolve_addr(&endpoint.host, endpoint.port as u16)?;
                conn = Some(Conn::connect(addr, &client_id, CONNECT_TIMEOUT).await?);
            }
            let Some(c) = conn.as_mut() else { return Ok(()) };
            truncate_diverged(&shard, c, &parts).await?;
            // A follower's appends count against log.unflushed.max.bytes too.
            shard.wait_for_unflushed_room().await;
            if !fetch_round(&shard, c, leader, &parts).await? {
                // Every partition still waits for its truncation check (the
                // leader did not answer it yet): do not spin.
                wait(&wake, BACKOFF).await;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            conn = None;
            if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                log::warn!(
                    "shard {}: replica fetcher for leader broker {leader} at {}:{}: {e}; retrying",
                    shard.id.0,
                    endpoint.host,
                    endpoint.port
                );
                last_error_log = Some(Instant::now());
            }
            wait(&wake, BACKOFF).await;
        }
    }
    shard.replication.fetcher_stopped(leader);
    log::info!("shard {}: replica fetcher for leader broker {leader} stopped", shard.id.0);
}

async fn wait(wake: &Notify, at_most: Duration) {
    let notified = wake.notified();
    let _ = glommio::timer::timeout(at_most, async {
        notified.await;
        Ok(())
    })
    .await;
}

/// After a leader change, cuts the tail of each log that the new leader does
/// not have (KIP-101/279): ask the leader where our latest epoch ends on its
/// log and truncate there (or to our own end of the epoch it answers with).
async fn truncate_diverged(
    shard: &Rc<Shard>,
    conn: &mut Conn,
    parts: &[(PartitionKey, Following)],
) -> std::io::Result<()> {
    let unchecked: Vec<&(PartitionKey, Following)> =
        parts.iter().filter(|(_, f)| !f.truncation_checked.get()).collect();
    if unchecked.is_empty() {
        return Ok(());
    }
    let mut topics: Vec<OffsetForLeaderTopic> = Vec::new();
    for ((topic, p), f) in &unchecked {
        let latest = super::log_api::latest_epoch(&f.log);
        let Some(latest) = latest else {
            // An empty log (or no epoch yet) has nothing to diverge.
            f.truncation_checked.set(true);
            continue;
        };
        let entry = OffsetForLeaderPartition::default()
            .with_partition(*p)
            .with_current_leader_epoch(f.leader_epoch)
            .with_leader_epoch(latest);
        match topics.iter_mut().find(|t| *t.topic.0 == **topic) {
            Some(t) => t.partitions.push(entry),
            None => topics.push(
                OffsetForLeaderTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partitions(vec![entry]),
            ),
        }
    }
    if topics.is_empty() {
        return Ok(());
    }
    let request = OffsetForLeaderEpochRequest::default()
        .with_replica_id(BrokerId(shard.replication.my_broker()))
        .with_topics(topics);
    let version = conn.version(ApiKey::OffsetForLeaderEpoch, OFFSET_FOR_LEADER_EPOCH_VERSIONS)?;
    let response: OffsetForLeaderEpochResponse =
        conn.call(ApiKey::OffsetForLeaderEpoch, version, &request, 1 << 20, REQUEST_TIMEOUT).await?;
    for t in response.topics {
        for r in t.partitions {
            let key: PartitionKey = (t.topic.0.to_string(), r.partition);
            let Some((_, f)) = unchecked.iter().find(|(k, _)| *k == key) else { continue };
            if !shard.replication.follows(&key, f.leader, f.leader_epoch) {
                // It follows another leader or epoch now: that one decides.
                continue;
            }
            if r.error_code != 0 {
                log::debug!(
                    "{}-{}: OffsetForLeaderEpoch from the leader: {}",
                    key.0,
                    key.1,
                    ErrorCode::from_code(r.error_code).name()
                );
                continue;
            }
            let (leo, hw) = {
                let l = f.log.borrow();
                (l.log_end_offset(), l.high_watermark)
            };
            let own = if r.leader_epoch >= 0 { super::log_api::epoch_end_for(&f.log, r.leader_epoch) } else { None };
            let target = super::truncation_offset(r.leader_epoch, r.end_offset, own, leo, hw);
            if target < leo {
                log::warn!(
                    "shard {}: {}-{}: truncating diverged tail {} -> {} (leader's epoch {} ends at {})",
                    shard.id.0,
                    key.0,
                    key.1,
                    leo.0,
                    target.0,
                    r.leader_epoch,
                    r.end_offset
                );
                super::log_api::truncate_to(&f.log, target).await?;
            }
            f.truncation_checked.set(true);
        }
    }
    Ok(())
}

async fn fetch_round(
    shard: &Rc<Shard>,
    conn: &mut Conn,
    leader: i32,
    parts: &[(PartitionKey, Following)],
) -> std::io::Result<bool> {
    let image = shard.image();
    let version = conn.version(ApiKey::Fetch, FETCH_VERSIONS)?;
    let Some((request, names)) = fetch_request(shard, &image, version, parts) else { return Ok(false) };
    let response: FetchResponse =
        conn.call(ApiKey::Fetch, version, &request, FETCH_MAX_BYTES as usize + (1 << 20), REQUEST_TIMEOUT).await?;
    let mut appended: Vec<(partition::SharedLog, Offset)> = Vec::new();
    let mut backoff = false;
    let mut stale: Vec<PartitionKey> = Vec::new();
    for t in response.responses {
        // By id from v13, by name before.
        let found = if version >= 13 {
            names.iter().find(|(id, _)| *id == t.topic_id)
        } else {
            names.iter().find(|(_, name)| *name == &*t.topic.0)
        };
        let Some(&(_, name)) = found else { continue };
        for r in t.partitions {
            let key: PartitionKey = (name.to_string(), r.partition_index);
            let Some((_, f)) = parts.iter().find(|(k, _)| *k == key) else { continue };
            // The partition's leader or epoch changed while this request was
            // out (a deposed leader, still alive, answered it): none of it
            // applies, neither its records nor its high watermark.
            if !shard.replication.follows(&key, leader, f.leader_epoch) {
                stale.push(key);
                continue;
            }
            match ErrorCode::from_code(r.error_code) {
                ErrorCode::None if r.diverging_epoch.epoch >= 0 => {
                    let d = &r.diverging_epoch;
                    truncate_to_diverging(shard, &key, f, leader, d.epoch, d.end_offset).await?;
                    continue;
                }
                ErrorCode::None => {}
                ErrorCode::OffsetOutOfRange => {
                    let leo = f.log.borrow().log_end_offset();
                    let (leader_start, leader_hw) =
                        (Offset(r.log_start_offset.max(0)), Offset(r.high_watermark.max(0)));
                    if leo < leader_start {
                        // Everything we have is below the leader's log start
                        // (retention or DeleteRecords there): start over at it.
                        log::warn!(
                            "shard {}: {}-{}: log end {} is below leader broker {leader}'s log start {}; restarting the replica there",
                            shard.id.0, key.0, key.1, leo.0, leader_start.0
                        );
                        super::log_api::restart_at(&f.log, leader_start).await?;
                    } else {
                        // Our end is past the leader's (it lost records we
                        // have, or truncated): keep what both have for sure.
                        log::warn!(
                            "shard {}: {}-{}: log end {} is past leader broker {leader}'s log; truncating to its high watermark {}",
                            shard.id.0, key.0, key.1, leo.0, leader_hw.0
                        );
                        super::log_api::truncate_to(&f.log, leader_hw.min(leo)).await?;
                    }
                    continue;
                }
                code => {
                    log::debug!("{}-{}: fetch from leader broker {leader}: {}", key.0, key.1, code.name());
                    backoff = true;
                    continue;
                }
            }
            if let Some(records) = r.records.filter(|b| !b.is_empty()) {
                if let Some(rate) = image.topics.get(name).and_then(|meta| {
                    let side = super::throttle::Side::Follower;
                    super::throttle::rate_for(
                        shard,
                        &image,
                        meta,
                        r.partition_index,
                        side,
                        shard.replication.my_broker(),
                    )
                }) {
                    shard.replication.follower_throttle.take(records.len(), rate, std::time::Instant::now());
                }
                match append(shard, &key, &f.log, records) {
                    Ok(Some(last)) => appended.push((f.log.clone(), last)),
                    Ok(None) => {}
                    Err(e) => {
                        log::error!("shard {}: {}-{}: replicated batches refused: {e}", shard.id.0, key.0, key.1);
                        backoff = true;
                    }
                }
            }
            let bound = Offset(r.high_watermark.max(0));
            super::log_api::set_bound(&f.log, Some(bound));
        }
    }
    if !stale.is_empty() {
        log::info!(
            "shard {}: ignored leader broker {leader}'s answer for {} partition(s) that changed leader or epoch \
             while it was in flight: {:?}",
            shard.id.0,
            stale.len(),
            stale
        );
    }
    // The next fetch offset must be on disk: wait for the flusher.
    loop {
        let notified = shard.hw_notify.notified();
        if appended.iter().all(|(log, last)| super::log_api::durable_end(log) > *last) || shard.stopping.get() {
            break;
        }
        let _ = glommio::timer::timeout(Duration::from_secs(1), async {
            notified.await;
            Ok(())
        })
        .await;
    }
    shard.hw_notify.notify_all();
    if backoff {
        glommio::timer::sleep(BACKOFF).await;
    }
    Ok(true)
}

/// This round's Fetch at `version`, from each log's end, with the topics'
/// ids and names to read the answer; None when no partition is ready to
/// fetch (waiting for its truncation check, or its data dir offline).
fn fetch_request<'a>(
    shard: &Shard,
    image: &crate::metadata::MetadataImage,
    version: i16,
    parts: &'a [(PartitionKey, Following)],
) -> Option<(FetchRequest, Vec<(Uuid, &'a str)>)> {
    let mut topics: Vec<FetchTopic> = Vec::new();
    let mut names: Vec<(Uuid, &str)> = Vec::new();
    for ((topic, p), f) in parts {
        if !f.truncation_checked.get() {
            continue;
        }
        // A replica in a full or failed data dir stops fetching (its log
        // could not take the records; it leaves the ISR after
        // replica.lag.time.max.ms, as Kafka's offline replicas do) and
        // resumes once the dir is back.
        if shard.dir_state(&f.log) != crate::storage::log_dirs::DirState::Online {
            continue;
        }
        let (leo, start) = {
            let l = f.log.borrow();
            (l.log_end_offset(), l.log_start_offset)
        };
        // KIP-320: the epoch our log ends in, so the leader can tell us in
        // the answer where we diverged from it (`diverging_epoch`).
        let last_fetched_epoch = if version >= 12 { super::log_api::latest_epoch(&f.log).unwrap_or(-1) } else { -1 };
        let entry = FetchPartition::default()
            .with_partition(*p)
            .with_current_leader_epoch(f.leader_epoch)
            .with_fetch_offset(leo.0)
            .with_last_fetched_epoch(last_fetched_epoch)
            .with_log_start_offset(start.0)
            .with_partition_max_bytes(PARTITION_MAX_BYTES);
        let Some(meta) = image.topics.get(topic) else { continue };
        // A throttled replica (reassignment) waits while this shard's
        // follower.replication.throttled.rate is spent.
        let me = shard.replication.my_broker();
        if super::throttle::rate_for(shard, image, meta, *p, super::throttle::Side::Follower, me)
            .is_some_and(|rate| shard.replication.follower_throttle.spent(rate, std::time::Instant::now()))
        {
            continue;
        }
        let id = meta.uuid();
        match names.iter().position(|(i, _)| *i == id) {
            Some(at) => topics[at].partitions.push(entry),
            None => {
                names.push((id, topic.as_str()));
                let t = if version >= 13 {
                    FetchTopic::default().with_topic_id(id)
                } else {
                    FetchTopic::default().with_topic(TopicName(StrBytes::from_string(topic.clone())))
                };
                topics.push(t.with_partitions(vec![entry]));
            }
        }
    }
    if topics.is_empty() {
        return None;
    }
    let me = shard.replication.my_broker();
    let request = FetchRequest::default()
        .with_max_wait_ms(FETCH_MAX_WAIT_MS)
        .with_min_bytes(1)
        .with_max_bytes(FETCH_MAX_BYTES)
        .with_isolation_level(0)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(topics);
    let request = if version >= 15 {
        let broker_epoch = image.nodes.get(&split_broker_id(me).0).map(|n| n.broker_epoch).unwrap_or(-1);
        request
            .with_replica_state(ReplicaState::default().with_replica_id(BrokerId(me)).with_replica_epoch(broker_epoch))
    } else {
        request.with_replica_id(BrokerId(me))
    };
    Some((request, names))
}

/// The leader answered our fetch with `diverging_epoch` (its epoch
/// `epoch`, ending at `end_offset`): our log ends in an epoch it does not
/// have, or has records past where that epoch ends on the leader. Cut there
/// (and the epoch cache with it); the next round fetches from the new end.
async fn truncate_to_diverging(
    shard: &Rc<Shard>,
    key: &PartitionKey,
    f: &Following,
    leader: i32,
    epoch: i32,
    end_offset: i64,
) -> std::io::Result<()> {
    let (leo, hw) = {
        let l = f.log.borrow();
        (l.log_end_offset(), l.high_watermark)
    };
    let own = super::log_api::epoch_end_for(&f.log, epoch);
    let target = super::truncation_offset(epoch, end_offset, own, leo, hw);
    log::warn!(
        "shard {}: {}-{}: leader broker {leader} says our log diverged: its epoch {epoch} ends at {end_offset}, ours {}; \
         truncating {} -> {}",
        shard.id.0,
        key.0,
        key.1,
        own.map(|(e, o)| format!("(epoch {e}) at {}", o.0)).unwrap_or_else(|| "unknown".to_string()),
        leo.0,
        target.0
    );
    if target < leo {
        super::log_api::truncate_to(&f.log, target).await?;
    }
    Ok(())
}

/// Appends the whole batches of `records` (a cut-off last batch is left for
/// the next fetch) with the leader's offsets. Returns the last offset appended.
fn append(
    shard: &Rc<Shard>,
    key: &PartitionKey,
    log: &partition::SharedLog,
    records: Bytes,
) -> Result<Option<Offset>, String> {
    let (whole, infos) = super::log_api::replica_batches(&records)?;
    if infos.is_empty() {
        return Ok(None);
    }
    let (first, last) = super::log_api::append_replicated(log, &whole, &infos)?;
    log::trace!("{}-{}: replicated offsets {}..={}", key.0, key.1, first.0, last.0);
    shard.mark_dirty(log);
    Ok(Some(last))
}
