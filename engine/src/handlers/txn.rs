//! The transaction APIs on the wire: InitProducerId with a transactional
//! id, AddPartitionsToTxn, AddOffsetsToTxn, EndTxn, DescribeTransactions,
//! ListTransactions (coordinator side, `crate::txn`), and WriteTxnMarkers
//! (partition leader side).
//!
//! Error codes follow Kafka's versions: PRODUCER_FENCED is answered only to
//! versions that know it (KIP-588), INVALID_PRODUCER_EPOCH before.

use std::rc::Rc;
use std::time::{Duration, Instant};

use tidelog_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResult, AddPartitionsToTxnTopicResult,
};
use tidelog_protocol::messages::describe_transactions_response::{self as dtr, TopicData};
use tidelog_protocol::messages::list_transactions_response as ltr;
use tidelog_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use tidelog_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest, AddPartitionsToTxnResponse, ApiKey,
    DescribeTransactionsRequest, DescribeTransactionsResponse, EndTxnRequest, EndTxnResponse, InitProducerIdResponse,
    ListTransactionsRequest, ListTransactionsResponse, ProducerId, TopicName, TransactionalId, WriteTxnMarkersRequest,
    WriteTxnMarkersResponse,
};
use tidelog_protocol::ErrorCode;

use super::{encode, str_bytes, Response};
use crate::shard::Shard;
use crate::storage::log_dirs::DirState;
use crate::txn::{self, TxnState};

/// PRODUCER_FENCED for the versions that know it, INVALID_PRODUCER_EPOCH before.
fn fenced_for(code: ErrorCode, version: i16, knows_fenced_from: i16) -> ErrorCode {
    if code == ErrorCode::ProducerFenced && version < knows_fenced_from {
        ErrorCode::InvalidProducerEpoch
    } else {
        code
    }
}

/// InitProducerId with a transactional id (see `producer_id` for the rest).
pub async fn init_producer_id_transactional(
    shard: Rc<Shard>,
    version: i16,
    cid: i32,
    id: String,
    timeout_ms: i32,
    expected: Option<(i64, i16)>,
) -> Response {
    let resp = InitProducerIdResponse::default().with_producer_id(ProducerId(-1)).with_producer_epoch(-1);
    let resp = match shard.txns.init_producer_id(&shard, &id, timeout_ms, expected).await {
        Ok((pid, epoch)) => resp.with_producer_id(ProducerId(pid)).with_producer_epoch(epoch),
        Err(code) => {
            log::debug!("InitProducerId {id:?}: {}", code.name());
            resp.with_error_code(fenced_for(code, version, 4).code())
        }
    };
    encode(ApiKey::InitProducerId, version, cid, &resp)
}

/// Checks the partitions a transaction names: UNKNOWN_TOPIC_OR_PARTITION
/// for those that do not exist.
fn unknown_partitions(shard: &Shard, parts: &[(String, i32)]) -> Vec<bool> {
    let image = shard.image();
    parts.iter().map(|(t, p)| image.topics.get(t).is_none_or(|m| *p < 0 || *p as usize >= m.owners.len())).collect()
}

/// One transaction of an AddPartitionsToTxn: id, producer id, epoch,
/// verify_only, and its partitions by topic.
type TxnPartitions = (String, i64, i16, bool, Vec<(String, Vec<i32>)>);

pub async fn add_partitions_to_txn(
    shard: Rc<Shard>,
    version: i16,
    cid: i32,
    req: AddPartitionsToTxnRequest,
) -> Response {
    let txns: Vec<TxnPartitions> = if version >= 4 {
        req.transactions
            .iter()
            .map(|t| {
                let topics = t.topics.iter().map(|x| (x.name.0.to_string(), x.partitions.clone())).collect();
                (t.transactional_id.0.to_string(), t.producer_id.0, t.producer_epoch, t.verify_only, topics)
            })
            .collect()
    } else {
        let topics = req.v3_and_below_topics.iter().map(|x| (x.name.0.to_string(), x.partitions.clone())).collect();
        vec![(
            req.v3_and_below_transactional_id.0.to_string(),
            req.v3_and_below_producer_id.0,
            req.v3_and_below_producer_epoch,
            false,
            topics,
        )]
    };
    let mut results = Vec::with_capacity(txns.len());
    for (id, pid, epoch, verify_only, topics) in txns {
        let parts: Vec<(String, i32)> =
            topics.iter().flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p))).collect();
        let codes: Vec<ErrorCode> = if verify_only {
            match shard.txns.verify(&shard, &id, pid, epoch, &parts) {
                Ok(included) => included
                    .into_iter()
                    .map(|ok| if ok { ErrorCode::None } else { ErrorCode::InvalidTxnState })
                    .collect(),
                Err(code) => vec![code; parts.len()],
            }
        } else {
            let unknown = unknown_partitions(&shard, &parts);
            if unknown.iter().any(|u| *u) {
                unknown
                    .iter()
                    .map(|u| if *u { ErrorCode::UnknownTopicOrPartition } else { ErrorCode::OperationNotAttempted })
                    .collect()
            } else {
                let code = match shard.txns.add_partitions(&shard, &id, pid, epoch, &parts).await {
                    Ok(()) => ErrorCode::None,
                    Err(code) => {
                        log::debug!("AddPartitionsToTxn {id:?} producer {pid} epoch {epoch}: {}", code.name());
                        fenced_for(code, version, 2)
                    }
                };
                vec![code; parts.len()]
            }
        };
        let mut at = 0;
        let topic_results = topics
            .iter()
            .map(|(t, ps)| {
                let r = ps
                    .iter()
                    .map(|p| {
                        let code = codes.get(at).copied().unwrap_or(ErrorCode::UnknownServerError);
                        at += 1;
                        AddPartitionsToTxnPartitionResult::default()
                            .with_partition_index(*p)
                            .with_partition_error_code(code.code())
                    })
                    .collect();
                AddPartitionsToTxnTopicResult::default().with_name(TopicName(str_bytes(t))).with_results_by_partition(r)
            })
            .collect::<Vec<_>>();
        results.push((id, topic_results));
    }
    let resp = if version >= 4 {
        AddPartitionsToTxnResponse::default().with_results_by_transaction(
            results
                .into_iter()
                .map(|(id, r)| {
                    AddPartitionsToTxnResult::default()
                        .with_transactional_id(TransactionalId(str_bytes(&id)))
                        .with_topic_results(r)
                })
                .collect(),
        )
    } else {
        AddPartitionsToTxnResponse::default()
            .with_results_by_topic_v3_and_below(results.into_iter().next().map(|(_, r)| r).unwrap_or_default())
    };
    encode(ApiKey::AddPartitionsToTxn, version, cid, &resp)
}

pub async fn add_offsets_to_txn(shard: Rc<Shard>, version: i16, cid: i32, req: AddOffsetsToTxnRequest) -> Response {
    let id = req.transactional_id.0.to_string();
    let group = req.group_id.0.to_string();
    let code = match txn::offsets_partition(&shard, &group) {
        None => ErrorCode::CoordinatorNotAvailable,
        Some(part) => {
            match shard.txns.add_partitions(&shard, &id, req.producer_id.0, req.producer_epoch, &[part]).await {
                Ok(()) => ErrorCode::None,
                Err(code) => fenced_for(code, version, 2),
            }
        }
    };
    if code != ErrorCode::None {
        log::debug!("AddOffsetsToTxn {id:?} group {group:?}: {}", code.name());
    }
    encode(ApiKey::AddOffsetsToTxn, version, cid, &AddOffsetsToTxnResponse::default().with_error_code(code.code()))
}

pub async fn end_txn(shard: Rc<Shard>, version: i16, cid: i32, req: EndTxnRequest) -> Response {
    let id = req.transactional_id.0.to_string();
    let started = Instant::now();
    let code = match shard.txns.end_txn(&shard, &id, req.producer_id.0, req.producer_epoch, req.committed).await {
        Ok(()) => ErrorCode::None,
        Err(code) => {
            log::debug!(
                "EndTxn {id:?} producer {} epoch {} ({}): {}",
                req.producer_id.0,
                req.producer_epoch,
                if req.committed { "commit" } else { "abort" },
                code.name()
            );
            fenced_for(code, version, 2)
        }
    };
    log::trace!("EndTxn {id:?} answered in {:?}", started.elapsed());
    encode(ApiKey::EndTxn, version, cid, &EndTxnResponse::default().with_error_code(code.code()))
}

pub fn describe_transactions(shard: &Rc<Shard>, version: i16, cid: i32, req: DescribeTransactionsRequest) -> Response {
    let states =
        req.transactional_ids
            .iter()
            .map(|tid| {
                let id = tid.0.to_string();
                let out = dtr::TransactionState::default()
                    .with_transactional_id(tid.clone())
                    .with_transaction_state(str_bytes(""))
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1)
                    .with_transaction_start_time_ms(-1);
                if let Err(code) = shard.txns.check(shard, &id) {
                    return out.with_error_code(code.code());
                }
                let Some(m) = shard.txns.get(&id) else {
                    return out.with_error_code(ErrorCode::TransactionalIdNotFound.code());
                };
                let mut topics: Vec<TopicData> = Vec::new();
                for (t, p) in &m.partitions {
                    match topics.last_mut() {
                        Some(last) if last.topic.0.as_str() == t => last.partitions.push(*p),
                        _ => topics
                            .push(TopicData::default().with_topic(TopicName(str_bytes(t))).with_partitions(vec![*p])),
                    }
                }
                out.with_transaction_state(str_bytes(m.state.name()))
                    .with_transaction_timeout_ms(m.timeout_ms)
                    .with_transaction_start_time_ms(if m.state == TxnState::Ongoing { m.start_ms } else { -1 })
                    .with_producer_id(ProducerId(m.producer_id))
                    .with_producer_epoch(m.producer_epoch)
                    .with_topics(topics)
            })
            .collect();
    encode(
        ApiKey::DescribeTransactions,
        version,
        cid,
        &DescribeTransactionsResponse::default().with_transaction_states(states),
    )
}

/// Every broker answers for the ids it coordinates (a client asks them all).
pub fn list_transactions(shard: &Rc<Shard>, version: i16, cid: i32, req: ListTransactionsRequest) -> Response {
    const STATES: [&str; 8] = [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
        "Dead",
        "PrepareEpochFence",
    ];
    let filters: Vec<String> = req.state_filters.iter().map(|s| s.to_string()).collect();
    let unknown: Vec<_> = filters.iter().filter(|f| !STATES.contains(&f.as_str())).map(|f| str_bytes(f)).collect();
    let now = crate::groups::now_ms();
    let states = shard
        .txns
        .all()
        .into_iter()
        .filter(|(_, m)| filters.is_empty() || filters.iter().any(|f| f == m.state.name()))
        .filter(|(_, m)| {
            req.producer_id_filters.is_empty() || req.producer_id_filters.iter().any(|p| p.0 == m.producer_id)
        })
        // v1 (KIP-994): only transactions started longer ago than the
        // filter (Kafka compares the start timestamp whatever the state).
        .filter(|(_, m)| version < 1 || req.duration_filter < 0 || now.saturating_sub(m.start_ms) > req.duration_filter)
        .map(|(id, m)| {
            ltr::TransactionState::default()
                .with_transactional_id(TransactionalId(str_bytes(&id)))
                .with_producer_id(ProducerId(m.producer_id))
                .with_transaction_state(str_bytes(m.state.name()))
        })
        .collect();
    let code = if shard.image().topics.contains_key(txn::TXN_TOPIC) {
        ErrorCode::None
    } else {
        ErrorCode::CoordinatorNotAvailable
    };
    let resp = ListTransactionsResponse::default()
        .with_error_code(code.code())
        .with_unknown_state_filters(unknown)
        .with_transaction_states(states);
    encode(ApiKey::ListTransactions, version, cid, &resp)
}

/// How long a WriteTxnMarkers waits for its markers to become durable.
const MARKER_WAIT: Duration = Duration::from_secs(30);

/// WriteTxnMarkers (from a transaction coordinator): appends each marker
/// to each partition this shard leads and answers once they are durable
/// (on the ISR); on `__consumer_offsets` partitions the group coordinator
/// then applies or drops the transaction's offsets.
pub async fn write_txn_markers(shard: Rc<Shard>, version: i16, cid: i32, req: WriteTxnMarkersRequest) -> Response {
    let image = shard.image();
    // (marker index, topic, partition, log + marker offset or error)
    let mut written = Vec::new();
    let mut codes: Vec<Vec<Vec<ErrorCode>>> = Vec::with_capacity(req.markers.len());
    for m in &req.markers {
        let mut mc = Vec::with_capacity(m.topics.len());
        for t in &m.topics {
            let name = t.name.0.as_str();
            let mut tc = Vec::with_capacity(t.partition_indexes.len());
            for &p in &t.partition_indexes {
                let code = match (image.owner(name, p), shard.log(name, p)) {
                    (None, _) => ErrorCode::UnknownTopicOrPartition,
                    (Some(owner), Some(log)) if owner == shard.id => {
                        if shard.dir_state(&log) != DirState::Online {
                            ErrorCode::KafkaStorageError
                        } else {
                            let epoch = tidelog_protocol::Epoch(image.leader_epoch(name, p).max(0));
                            let r = log.borrow_mut().append_txn_marker(
                                tidelog_protocol::ProducerId(m.producer_id.0),
                                m.producer_epoch,
                                m.transaction_result,
                                m.coordinator_epoch,
                                epoch,
                            );
                            match r {
                                Ok(offset) => {
                                    shard.mark_dirty(&log);
                                    written.push((
                                        log,
                                        offset,
                                        name.to_string(),
                                        p,
                                        m.producer_id.0,
                                        m.transaction_result,
                                    ));
                                    ErrorCode::None
                                }
                                Err(code) => {
                                    log::warn!(
                                        "{name}-{p}: {} marker of producer {} epoch {} refused: {}",
                                        if m.transaction_result { "commit" } else { "abort" },
                                        m.producer_id.0,
                                        m.producer_epoch,
                                        code.name()
                                    );
                                    code
                                }
                            }
                        }
                    }
                    _ => ErrorCode::NotLeaderOrFollower,
                };
                tc.push(code);
            }
            mc.push(tc);
        }
        codes.push(mc);
    }
    // Wait for every written marker to be durable (replicated to the ISR).
    let deadline = Instant::now() + MARKER_WAIT;
    let mut failed: Vec<(String, i32)> = Vec::new();
    for (log, offset, topic, p, pid, commit) in &written {
        let wait = crate::groups::wait_durable(&shard, log, *offset);
        let r =
            glommio::timer::timeout(deadline.saturating_duration_since(Instant::now()), async { Ok(wait.await) }).await;
        match r {
            Ok(Ok(_)) => {
                if topic == crate::groups::OFFSETS_TOPIC {
                    let partitions = image.topics.get(topic).map(|t| t.owners.len()).unwrap_or(1);
                    shard.groups.complete_txn(*p, partitions, *pid, *commit, offset.0);
                }
            }
            _ => failed.push((topic.clone(), *p)),
        }
    }
    let markers = req
        .markers
        .iter()
        .zip(codes)
        .map(|(m, mc)| {
            WritableTxnMarkerResult::default().with_producer_id(m.producer_id).with_topics(
                m.topics
                    .iter()
                    .zip(mc)
                    .map(|(t, tc)| {
                        WritableTxnMarkerTopicResult::default().with_name(t.name.clone()).with_partitions(
                            t.partition_indexes
                                .iter()
                                .zip(tc)
                                .map(|(p, code)| {
                                    let code = if code == ErrorCode::None
                                        && failed.iter().any(|(ft, fp)| ft == t.name.0.as_str() && fp == p)
                                    {
                                        ErrorCode::RequestTimedOut
                                    } else {
                                        code
                                    };
                                    WritableTxnMarkerPartitionResult::default()
                                        .with_partition_index(*p)
                                        .with_error_code(code.code())
                                })
                                .collect(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    encode(ApiKey::WriteTxnMarkers, version, cid, &WriteTxnMarkersResponse::default().with_markers(markers))
}
