//! Sending a transaction's commit/abort markers to its partitions' leaders.
//!
//! The coordinator sends WriteTxnMarkers to each leader broker's Kafka port,
//! on this node or another, as Kafka's coordinator does: no cross-core
//! channel, and the leader appends the marker on the shard that owns the
//! partition. Leaders answer once the marker is durable on the ISR.
//! Partitions whose leader moved or is unknown are retried until every one
//! has its marker (or the coordinator no longer leads the id's partition:
//! the new coordinator completes it); deleted partitions are skipped.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tidelog_protocol::messages::write_txn_markers_request::{WritableTxnMarker, WritableTxnMarkerTopic};
use tidelog_protocol::messages::{ApiKey, ProducerId, TopicName, WriteTxnMarkersRequest, WriteTxnMarkersResponse};
use tidelog_protocol::ErrorCode;

use crate::handlers::str_bytes;
use crate::replication::wire::Conn;
use crate::shard::Shard;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A leader answers once the marker is replicated and durable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Idle connections kept per leader broker.
const IDLE_PER_BROKER: usize = 4;

/// Idle connections to leader brokers, by broker id.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<i32, Vec<Conn>>>,
}

impl Pool {
    async fn take(&self, shard: &Shard, broker: i32) -> std::io::Result<Conn> {
        if let Some(c) = self.idle.borrow_mut().get_mut(&broker).and_then(Vec::pop) {
            return Ok(c);
        }
        let image = shard.image();
        let endpoint = image.broker_endpoint(&shard.config, shard.num_shards, broker).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("broker {broker} is not registered"))
        })?;
        let addr = crate::config::resolve_addr(&endpoint.host, endpoint.port as u16)?;
        Conn::connect(addr, &format!("tidelog-txn-coordinator-{}", shard.id.0), CONNECT_TIMEOUT).await
    }

    fn give_back(&self, broker: i32, conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        let v = idle.entry(broker).or_default();
        if v.len() < IDLE_PER_BROKER {
            v.push(conn);
        }
    }
}

/// Writes the marker of producer `pid`/`epoch` (commit or abort) to every
/// partition of `partitions`. Returns true when all are written, false when
/// this shard stopped coordinating the id's partition `p` (or is stopping).
#[allow(clippy::too_many_arguments)]
pub async fn write_all(
    shard: &Rc<Shard>,
    id: &str,
    p: i32,
    pid: i64,
    epoch: i16,
    commit: bool,
    coordinator_epoch: i32,
    partitions: &BTreeSet<(String, i32)>,
) -> bool {
    let mut left: BTreeSet<(String, i32)> = partitions.clone();
    let started = Instant::now();
    let mut rounds = 0u32;
    let mut last_warn: Option<Instant> = None;
    while !left.is_empty() {
        if shard.stopping.get() || !shard.txns.serving_partition(p) {
            return false;
        }
        rounds += 1;
        let image = shard.image();
        let mut by_leader: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
        let mut problems: Vec<String> = Vec::new();
        left.retain(|(t, q)| {
            let Some(meta) = image.topics.get(t) else {
                log::info!("transactional id {id}: {t}-{q} was deleted; no marker written there");
                return false;
            };
            if *q < 0 || *q as usize >= meta.owners.len() {
                return false;
            }
            match image.partition_state(meta, *q as usize).map(|s| s.leader) {
                Some(leader) if leader >= 0 => by_leader.entry(leader).or_default().push((t.clone(), *q)),
                _ => problems.push(format!("{t}-{q}: no leader")),
            }
            true
        });
        let tasks: Vec<_> = by_leader
            .into_iter()
            .map(|(leader, parts)| {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let r = send(&shard, leader, pid, epoch, commit, coordinator_epoch, &parts).await;
                    (leader, parts, r)
                })
            })
            .collect();
        for task in tasks {
            let (leader, parts, result) = task.await;
            match result {
                Ok(codes) => {
                    for ((t, q), code) in parts.into_iter().zip(codes) {
                        match code {
                            ErrorCode::None => {
                                left.remove(&(t, q));
                            }
                            ErrorCode::UnknownTopicOrPartition if !image.topics.contains_key(&t) => {
                                left.remove(&(t, q));
                            }
                            // The partition knows a newer epoch of this
                            // producer or coordinator: retrying cannot help
                            // (Kafka gives up on such a partition too).
                            ErrorCode::InvalidProducerEpoch | ErrorCode::TransactionCoordinatorFenced => {
                                log::warn!(
                                    "transactional id {id}: {t}-{q} refused the marker of producer {pid} epoch {epoch}: {}; not retried",
                                    code.name()
                                );
                                left.remove(&(t, q));
                            }
                            code => problems.push(format!("{t}-{q}: {} from broker {leader}", code.name())),
                        }
                    }
                }
                Err(e) => problems.push(format!("broker {leader}: {e}")),
            }
        }
        if left.is_empty() {
            break;
        }
        if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_warn = Some(Instant::now());
            log::warn!(
                "transactional id {id}: {} marker of producer {pid} epoch {epoch}: {} partition(s) left after {rounds} round(s) ({:?}): {}; retrying",
                if commit { "commit" } else { "abort" },
                left.len(),
                started.elapsed(),
                problems.join("; ")
            );
        }
        glommio::timer::sleep(RETRY_BACKOFF).await;
    }
    true
}

/// One WriteTxnMarkers to `leader`; the error of each partition, in order.
async fn send(
    shard: &Rc<Shard>,
    leader: i32,
    pid: i64,
    epoch: i16,
    commit: bool,
    coordinator_epoch: i32,
    parts: &[(String, i32)],
) -> std::io::Result<Vec<ErrorCode>> {
    let mut topics: Vec<WritableTxnMarkerTopic> = Vec::new();
    for (t, q) in parts {
        match topics.last_mut() {
            Some(last) if last.name.0.as_str() == t => last.partition_indexes.push(*q),
            _ => topics.push(
                WritableTxnMarkerTopic::default().with_name(TopicName(str_bytes(t))).with_partition_indexes(vec![*q]),
            ),
        }
    }
    let req = WriteTxnMarkersRequest::default().with_markers(vec![WritableTxnMarker::default()
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch)
        .with_transaction_result(commit)
        .with_coordinator_epoch(coordinator_epoch)
        .with_topics(topics)]);
    let mut conn = shard.txns.conns.take(shard, leader).await?;
    let resp: WriteTxnMarkersResponse =
        conn.call(ApiKey::WriteTxnMarkers, 1, &req, RESPONSE_BYTES_MAX, REQUEST_TIMEOUT).await?;
    shard.txns.conns.give_back(leader, conn);
    let mut codes: HashMap<(String, i32), ErrorCode> = HashMap::new();
    for m in &resp.markers {
        for t in &m.topics {
            for p in &t.partitions {
                codes.insert((t.name.0.to_string(), p.partition_index), ErrorCode::from_code(p.error_code));
            }
        }
    }
    Ok(parts.iter().map(|x| codes.get(x).copied().unwrap_or(ErrorCode::UnknownServerError)).collect())
}

/// AddPartitionsToTxn v4 with `verify_only` to the coordinator `broker` of
/// `id`: whether each of `parts` is in the open transaction.
pub async fn verify_remote(
    shard: &Rc<Shard>,
    broker: i32,
    id: &str,
    pid: i64,
    epoch: i16,
    parts: &[(String, i32)],
) -> Result<Vec<bool>, ErrorCode> {
    use tidelog_protocol::messages::add_partitions_to_txn_request::{
        AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction,
    };
    use tidelog_protocol::messages::{AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, TransactionalId};
    let topics = parts
        .iter()
        .map(|(t, q)| AddPartitionsToTxnTopic::default().with_name(TopicName(str_bytes(t))).with_partitions(vec![*q]))
        .collect();
    let req = AddPartitionsToTxnRequest::default().with_transactions(vec![AddPartitionsToTxnTransaction::default()
        .with_transactional_id(TransactionalId(str_bytes(id)))
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch)
        .with_verify_only(true)
        .with_topics(topics)]);
    let call = async {
        let mut conn = shard.txns.conns.take(shard, broker).await?;
        let resp: AddPartitionsToTxnResponse =
            conn.call(ApiKey::AddPartitionsToTxn, 4, &req, RESPONSE_BYTES_MAX, REQUEST_TIMEOUT).await?;
        shard.txns.conns.give_back(broker, conn);
        Ok::<_, std::io::Error>(resp)
    };
    let resp = call.await.map_err(|e| {
        log::warn!("transactional id {id}: verifying with coordinator broker {broker} failed: {e}");
        ErrorCode::CoordinatorNotAvailable
    })?;
    if resp.error_code != 0 {
        return Err(ErrorCode::from_code(resp.error_code));
    }
    let mut out = Vec::with_capacity(parts.len());
    for (t, q) in parts {
        let code = resp
            .results_by_transaction
            .iter()
            .flat_map(|r| r.topic_results.iter())
            .filter(|r| r.name.0.as_str() == t)
            .flat_map(|r| r.results_by_partition.iter())
            .find(|r| r.partition_index == *q)
            .map(|r| ErrorCode::from_code(r.partition_error_code))
            .unwrap_or(ErrorCode::UnknownServerError);
        match code {
            ErrorCode::None => out.push(true),
            ErrorCode::InvalidTxnState => out.push(false),
            other => return Err(other),
        }
    }
    Ok(out)
}
