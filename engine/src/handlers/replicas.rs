//! Replica administration: ElectLeaders, DescribeTopicPartitions (KIP-966),
//! AlterPartitionReassignments and ListPartitionReassignments.
//!
//! Answered by any shard. Reads come from the shard's metadata image;
//! changes in a cluster go to the controller quorum as one
//! `MetadataCommand` per request (`controller::cluster::submit_from_shard`)
//! and are answered once this shard applied the result. Nodes react to the
//! new image like to any other: a node newly holding a replica opens its log
//! and starts fetching, one that lost it stops and deletes its copy
//! (`Shard::apply_image`, `replication::Replication::reconcile`). A single
//! node has one replica per partition, which always leads: nothing to elect
//! or reassign, and the answers say so with Kafka's error codes.

use std::collections::BTreeMap;
use std::rc::Rc;

use tidelog_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use tidelog_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use tidelog_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use tidelog_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use tidelog_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ApiKey, BrokerId,
    DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, ElectLeadersRequest, ElectLeadersResponse,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse, TopicName,
};
use tidelog_protocol::ErrorCode;
use tidelog_quorum::{Election, MetadataCommand, Reassignment};

use super::{encode, str_bytes, Response};
use crate::controller::cluster::submit_from_shard;
use crate::metadata::{split_broker_id, validate_topic_name, MetadataImage, PartitionState, TopicMeta};
use crate::shard::Shard;

/// Most partitions one DescribeTopicPartitions response carries (Kafka's
/// `max.request.partition.size.limit` default); the client pages with the
/// cursor past it.
pub const DESCRIBE_PARTITIONS_MAX: i32 = 2000;

/// A per-partition outcome: error code and message (None on success).
type Outcome = (ErrorCode, Option<String>);

fn ok() -> Outcome {
    (ErrorCode::None, None)
}

fn failed(code: ErrorCode, message: impl Into<String>) -> Outcome {
    (code, Some(message.into()))
}

fn ids(v: &[i32]) -> Vec<BrokerId> {
    v.iter().map(|b| BrokerId(*b)).collect()
}

/// The partition's state, or UNKNOWN_TOPIC_OR_PARTITION.
fn state_of(image: &MetadataImage, topic: &str, partition: i32) -> Result<PartitionState, Outcome> {
    let unknown = || failed(ErrorCode::UnknownTopicOrPartition, format!("{topic}-{partition} does not exist"));
    let t = image.topics.get(topic).ok_or_else(unknown)?;
    usize::try_from(partition).ok().and_then(|p| image.partition_state(t, p)).ok_or_else(unknown)
}

/// Maps a submitted command's per-entry results (in order) to outcomes; a
/// command the quorum did not commit fails every entry alike.
fn outcomes(result: Result<tidelog_quorum::ApplyResult, (ErrorCode, String)>, count: usize) -> Vec<Outcome> {
    match result {
        Err((code, message)) => vec![failed(code, message); count],
        Ok(results) => {
            let mut out: Vec<Outcome> = results
                .into_iter()
                .map(|(_, r)| match r {
                    Ok(()) => ok(),
                    Err(refused) => failed(ErrorCode::from_code(refused.code), refused.message),
                })
                .collect();
            out.resize(count, failed(ErrorCode::UnknownServerError, "no result from the controller"));
            out
        }
    }
}

// ---------------------------------------------------------------------------
// ElectLeaders

/// Whether `election` could change anything for a partition in `state`
/// (the controller checks again when it applies the command).
fn election_needed(state: &PartitionState, election: Election) -> bool {
    match election {
        Election::Preferred => state.replicas.first().is_some_and(|p| *p != state.leader),
        Election::Unclean => state.leader < 0,
    }
}

pub async fn elect_leaders(shard: Rc<Shard>, version: i16, cid: i32, req: ElectLeadersRequest) -> Response {
    let election = match (version, req.election_type) {
        (0, _) | (_, 0) => Election::Preferred,
        (_, 1) => Election::Unclean,
        (_, other) => {
            let resp = ElectLeadersResponse::default().with_error_code(ErrorCode::InvalidRequest.code());
            log::info!("ElectLeaders: unknown election type {other}");
            return encode(ApiKey::ElectLeaders, version, cid, &resp);
        }
    };
    let image = shard.image();
    // Null: every partition, and (as Kafka) only those that needed an election are reported.
    let all = req.topic_partitions.is_none();
    let wanted: Vec<(String, i32)> = match &req.topic_partitions {
        None => {
            image.topics.values().flat_map(|t| (0..t.owners.len() as i32).map(move |p| (t.name.clone(), p))).collect()
        }
        Some(topics) => {
            topics.iter().flat_map(|t| t.partitions.iter().map(move |p| (t.topic.0.to_string(), *p))).collect()
        }
    };
    let mut results: Vec<Option<Outcome>> = vec![None; wanted.len()];
    let mut to_elect: Vec<(usize, (String, i32))> = Vec::new();
    for (i, (topic, partition)) in wanted.iter().enumerate() {
        match state_of(&image, topic, *partition) {
            Err(e) => results[i] = Some(e),
            Ok(state) if !image.clustered() || !election_needed(&state, election) => {
                let why = match election {
                    Election::Preferred => format!("{topic}-{partition}: the preferred replica already leads"),
                    Election::Unclean => format!("{topic}-{partition}: broker {} leads", state.leader),
                };
                results[i] = Some(failed(ErrorCode::ElectionNotNeeded, why));
            }
            Ok(_) => to_elect.push((i, (topic.clone(), *partition))),
        }
    }
    if !to_elect.is_empty() {
        let partitions: Vec<(String, i32)> = to_elect.iter().map(|(_, tp)| tp.clone()).collect();
        let count = partitions.len();
        let submit = submit_from_shard(&shard, MetadataCommand::ElectLeaders { election, partitions });
        // timeout_ms bounds the wait for the elections (Kafka answers the
        // partitions still pending with REQUEST_TIMED_OUT; the command may
        // still commit after). 0 or less: the quorum's own request timeout.
        let result = match u64::try_from(req.timeout_ms).ok().filter(|ms| *ms > 0) {
            Some(ms) => glommio::timer::timeout(std::time::Duration::from_millis(ms), async { Ok(submit.await) })
                .await
                .unwrap_or_else(|_| {
                    Err((
                        ErrorCode::RequestTimedOut,
                        format!("the election did not complete within timeout_ms={ms}; it may still happen"),
                    ))
                }),
            None => submit.await,
        };
        for ((i, (topic, partition)), outcome) in to_elect.into_iter().zip(outcomes(result, count)) {
            if outcome.0 == ErrorCode::None {
                let leader = state_of(&shard.image(), &topic, partition).map_or(-1, |s| s.leader);
                match election {
                    Election::Unclean => log::warn!(
                        "ElectLeaders: unclean election of {topic}-{partition}: broker {leader} leads from outside \
                         the ISR; records only the old ISR had (possibly acknowledged ones) may be lost"
                    ),
                    Election::Preferred => {
                        log::info!("ElectLeaders: preferred election of {topic}-{partition}: broker {leader} leads")
                    }
                }
            }
            results[i] = Some(outcome);
        }
    }
    let mut by_topic: BTreeMap<String, Vec<PartitionResult>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for ((topic, partition), outcome) in wanted.into_iter().zip(results) {
        let (code, message) = outcome.unwrap_or_else(|| failed(ErrorCode::UnknownServerError, "not elected"));
        if all && code == ErrorCode::ElectionNotNeeded {
            continue;
        }
        if !by_topic.contains_key(&topic) {
            order.push(topic.clone());
        }
        by_topic.entry(topic).or_default().push(
            PartitionResult::default()
                .with_partition_id(partition)
                .with_error_code(code.code())
                .with_error_message(message.as_deref().map(str_bytes)),
        );
    }
    let replica_election_results = order
        .into_iter()
        .map(|topic| {
            let partitions = by_topic.remove(&topic).unwrap_or_default();
            ReplicaElectionResult::default().with_topic(TopicName(str_bytes(&topic))).with_partition_result(partitions)
        })
        .collect();
    let resp = ElectLeadersResponse::default()
        .with_error_code(ErrorCode::None.code())
        .with_replica_election_results(replica_election_results);
    encode(ApiKey::ElectLeaders, version, cid, &resp)
}

// ---------------------------------------------------------------------------
// DescribeTopicPartitions

fn describe_partition(image: &MetadataImage, p: i32, s: &PartitionState) -> DescribeTopicPartitionsResponsePartition {
    let offline: Vec<i32> = if image.clustered() {
        s.replicas
            .iter()
            .copied()
            .filter(|b| image.nodes.get(&split_broker_id(*b).0).is_none_or(|n| n.fenced))
            .collect()
    } else {
        Vec::new()
    };
    let code = if s.leader < 0 { ErrorCode::LeaderNotAvailable } else { ErrorCode::None };
    DescribeTopicPartitionsResponsePartition::default()
        .with_error_code(code.code())
        .with_partition_index(p)
        .with_leader_id(BrokerId(s.leader))
        .with_leader_epoch(s.leader_epoch)
        .with_replica_nodes(ids(&s.replicas))
        .with_isr_nodes(ids(&s.isr))
        .with_eligible_leader_replicas(Some(Vec::new()))
        .with_last_known_elr(Some(Vec::new()))
        .with_offline_replicas(ids(&offline))
}

fn describe_topic(
    t: &TopicMeta,
    partitions: Vec<DescribeTopicPartitionsResponsePartition>,
) -> DescribeTopicPartitionsResponseTopic {
    DescribeTopicPartitionsResponseTopic::default()
        .with_error_code(ErrorCode::None.code())
        .with_name(Some(TopicName(str_bytes(&t.name))))
        .with_topic_id(t.uuid())
        .with_is_internal(crate::metadata::is_internal_topic(&t.name))
        .with_partitions(partitions)
}

fn topic_error(name: &str, code: ErrorCode) -> DescribeTopicPartitionsResponseTopic {
    DescribeTopicPartitionsResponseTopic::default()
        .with_error_code(code.code())
        .with_name(Some(TopicName(str_bytes(name))))
        .with_is_internal(crate::metadata::is_internal_topic(name))
}

/// Kafka's paging: topics in name order from the cursor's topic (its
/// partitions from the cursor's index), at most `limit` partitions; a topic
/// cut short, or the next topic when the limit is used up exactly, becomes
/// the next cursor.
pub fn describe_topic_partitions(
    shard: &Shard,
    version: i16,
    cid: i32,
    req: DescribeTopicPartitionsRequest,
) -> Response {
    let image = shard.image();
    let all = req.topics.is_empty();
    let mut names: Vec<String> = if all {
        image.topics.keys().cloned().collect()
    } else {
        req.topics.iter().map(|t| t.name.0.to_string()).collect()
    };
    names.sort();
    names.dedup();
    let cursor = req.cursor.as_ref().map(|c| (c.topic_name.0.to_string(), c.partition_index));
    if let Some((topic, index)) = &cursor {
        if (!all && !names.contains(topic)) || *index < 0 {
            log::info!("DescribeTopicPartitions: cursor {topic}-{index} is not among the topics asked for");
            let topics = names.iter().map(|n| topic_error(n, ErrorCode::InvalidRequest)).collect();
            let resp = DescribeTopicPartitionsResponse::default().with_topics(topics);
            return encode(ApiKey::DescribeTopicPartitions, version, cid, &resp);
        }
        names.retain(|n| n >= topic);
    }
    let mut remaining = req.response_partition_limit.clamp(1, DESCRIBE_PARTITIONS_MAX) as usize;
    let mut topics = Vec::new();
    let mut next_cursor = None;
    for name in names {
        if remaining == 0 {
            next_cursor = Some(Cursor::default().with_topic_name(TopicName(str_bytes(&name))).with_partition_index(0));
            break;
        }
        let Some(t) = image.topics.get(&name) else {
            if !all {
                let code = if validate_topic_name(&name).is_err() {
                    ErrorCode::InvalidTopicException
                } else {
                    ErrorCode::UnknownTopicOrPartition
                };
                topics.push(topic_error(&name, code));
            }
            continue;
        };
        let start = match &cursor {
            Some((topic, index)) if *topic == name => *index as usize,
            _ => 0,
        };
        let total = t.owners.len();
        let end = total.min(start.saturating_add(remaining));
        let partitions: Vec<_> = (start..end)
            .filter_map(|p| image.partition_state(t, p).map(|s| describe_partition(&image, p as i32, &s)))
            .collect();
        remaining -= end.saturating_sub(start);
        topics.push(describe_topic(t, partitions));
        if end < total {
            next_cursor =
                Some(Cursor::default().with_topic_name(TopicName(str_bytes(&name))).with_partition_index(end as i32));
            break;
        }
    }
    let resp = DescribeTopicPartitionsResponse::default().with_topics(topics).with_next_cursor(next_cursor);
    encode(ApiKey::DescribeTopicPartitions, version, cid, &resp)
}

// ---------------------------------------------------------------------------
// AlterPartitionReassignments / ListPartitionReassignments

pub async fn alter_partition_reassignments(
    shard: Rc<Shard>,
    version: i16,
    cid: i32,
    req: AlterPartitionReassignmentsRequest,
) -> Response {
    let image = shard.image();
    let allow_rf_change = version < 1 || req.allow_replication_factor_change;
    let wanted: Vec<(String, i32, Option<Vec<i32>>)> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(move |p| {
                let target = p.replicas.as_ref().map(|r| r.iter().map(|b| b.0).collect::<Vec<i32>>());
                (t.name.0.to_string(), p.partition_index, target)
            })
        })
        .collect();
    let mut results: Vec<Option<Outcome>> = vec![None; wanted.len()];
    let mut to_submit: Vec<(usize, Reassignment)> = Vec::new();
    for (i, (topic, partition, target)) in wanted.iter().enumerate() {
        let state = match state_of(&image, topic, *partition) {
            Ok(s) => s,
            Err(e) => {
                results[i] = Some(e);
                continue;
            }
        };
        if !image.clustered() {
            results[i] = Some(match target {
                None => failed(ErrorCode::NoReassignmentInProgress, format!("{topic}-{partition}: no reassignment is in progress")),
                Some(t) if *t == state.replicas => ok(),
                Some(t) => failed(
                    ErrorCode::InvalidReplicaAssignment,
                    format!(
                        "{topic}-{partition}: a single node keeps one replica per partition on its owning broker {:?}, not {t:?}",
                        state.replicas
                    ),
                ),
            });
            continue;
        }
        if let Some(t) = target {
            let current = state.target_replicas().count();
            if !allow_rf_change && t.len() != current {
                results[i] = Some(failed(
                    ErrorCode::InvalidReplicationFactor,
                    format!(
                        "{topic}-{partition}: the replication factor would change from {current} to {} but \
                         allow_replication_factor_change is false",
                        t.len()
                    ),
                ));
                continue;
            }
        }
        to_submit.push((i, Reassignment { topic: topic.clone(), partition: *partition, target: target.clone() }));
    }
    if !to_submit.is_empty() {
        let entries: Vec<Reassignment> = to_submit.iter().map(|(_, r)| r.clone()).collect();
        let count = entries.len();
        let result = submit_from_shard(&shard, MetadataCommand::AlterReassignments(entries)).await;
        for ((i, r), outcome) in to_submit.into_iter().zip(outcomes(result, count)) {
            match (&outcome.0, &r.target) {
                (ErrorCode::None, Some(target)) => {
                    log::info!("AlterPartitionReassignments: {}-{} to replicas {target:?}", r.topic, r.partition)
                }
                (ErrorCode::None, None) => {
                    log::info!("AlterPartitionReassignments: {}-{}: reassignment cancelled", r.topic, r.partition)
                }
                (code, _) => log::info!(
                    "AlterPartitionReassignments: {}-{} refused: {} ({})",
                    r.topic,
                    r.partition,
                    code.name(),
                    outcome.1.as_deref().unwrap_or("")
                ),
            }
            results[i] = Some(outcome);
        }
    }
    let mut responses: Vec<ReassignableTopicResponse> = Vec::new();
    for ((topic, partition, _), outcome) in wanted.into_iter().zip(results) {
        let (code, message) = outcome.unwrap_or_else(|| failed(ErrorCode::UnknownServerError, "not reassigned"));
        let entry = ReassignablePartitionResponse::default()
            .with_partition_index(partition)
            .with_error_code(code.code())
            .with_error_message(message.as_deref().map(str_bytes));
        match responses.iter_mut().find(|r| r.name.0.as_str() == topic) {
            Some(r) => r.partitions.push(entry),
            None => responses.push(
                ReassignableTopicResponse::default()
                    .with_name(TopicName(str_bytes(&topic)))
                    .with_partitions(vec![entry]),
            ),
        }
    }
    let resp = AlterPartitionReassignmentsResponse::default()
        .with_allow_replication_factor_change(allow_rf_change)
        .with_error_code(ErrorCode::None.code())
        .with_responses(responses);
    encode(ApiKey::AlterPartitionReassignments, version, cid, &resp)
}

fn ongoing(p: i32, s: &PartitionState) -> Option<OngoingPartitionReassignment> {
    s.reassigning().then(|| {
        OngoingPartitionReassignment::default()
            .with_partition_index(p)
            .with_replicas(ids(&s.replicas))
            .with_adding_replicas(ids(&s.adding_replicas))
            .with_removing_replicas(ids(&s.removing_replicas))
    })
}

/// Reassignments in progress; unknown topics and partitions, and those not
/// being reassigned, are left out (as Kafka does).
pub fn list_partition_reassignments(
    shard: &Shard,
    version: i16,
    cid: i32,
    req: ListPartitionReassignmentsRequest,
) -> Response {
    let image = shard.image();
    let mut topics = Vec::new();
    let mut add = |t: &TopicMeta, indexes: &mut dyn Iterator<Item = i32>| {
        let partitions: Vec<_> = indexes
            .filter_map(|p| {
                let s = image.partition_state(t, usize::try_from(p).ok()?)?;
                ongoing(p, &s)
            })
            .collect();
        if !partitions.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(TopicName(str_bytes(&t.name)))
                    .with_partitions(partitions),
            );
        }
    };
    match &req.topics {
        None => {
            for t in image.topics.values() {
                add(t, &mut (0..t.owners.len() as i32));
            }
        }
        Some(wanted) => {
            for w in wanted {
                if let Some(t) = image.topics.get(w.name.0.as_str()) {
                    add(t, &mut w.partition_indexes.iter().copied());
                }
            }
        }
    }
    let resp =
        ListPartitionReassignmentsResponse::default().with_error_code(ErrorCode::None.code()).with_topics(topics);
    encode(ApiKey::ListPartitionReassignments, version, cid, &resp)
}
