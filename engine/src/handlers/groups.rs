//! Consumer group APIs: FindCoordinator, JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup, OffsetCommit, OffsetFetch, ListGroups, DescribeGroups,
//! DeleteGroups, OffsetDelete.
//!
//! Runs on the shard that received the request. Every group request is
//! answered by the group's coordinator shard (see `groups`): another shard
//! answers NOT_COORDINATOR, and the client asks FindCoordinator again. The
//! group state lives in the shard's `Coordinator`; no `RefCell` borrow is
//! held across an `.await` (joins and syncs wait on oneshot receivers, commits
//! on the high watermark of `__consumer_offsets`).

use std::collections::HashSet;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use tidelog_protocol::messages::delete_groups_response::DeletableGroupResult;
use tidelog_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use tidelog_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use tidelog_protocol::messages::join_group_response::JoinGroupResponseMember;
use tidelog_protocol::messages::leave_group_response::MemberResponse;
use tidelog_protocol::messages::list_groups_response::ListedGroup;
use tidelog_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
use tidelog_protocol::messages::offset_delete_response::{OffsetDeleteResponsePartition, OffsetDeleteResponseTopic};
use tidelog_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions, OffsetFetchResponseTopic,
    OffsetFetchResponseTopics,
};
use tidelog_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use tidelog_protocol::messages::{
    ApiKey, BrokerId, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    FindCoordinatorRequest, FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName, TxnOffsetCommitRequest,
    TxnOffsetCommitResponse,
};
use tidelog_protocol::{ErrorCode, StrBytes};

use super::{encode, str_bytes, Response};
use crate::groups::group::{Group, GroupState, JoinOutcome, JoinRequest, Reply, SyncOutcome};
use crate::groups::records::{self, OffsetValue};
use crate::groups::{append_and_wait, now_ms, Coordinator};
use crate::shard::Shard;

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;
/// Kafka's "no operations known" for authorized_operations.
const AUTHORIZED_OPERATIONS_UNKNOWN: i32 = i32::MIN;

fn opt(s: &Option<StrBytes>) -> Option<String> {
    s.as_ref().map(|s| s.to_string())
}

pub fn find_coordinator(shard: &Rc<Shard>, version: i16, cid: i32, req: FindCoordinatorRequest) -> Response {
    let keys: Vec<String> = if version >= 4 {
        req.coordinator_keys.iter().map(|k| k.to_string()).collect()
    } else {
        vec![req.key.to_string()]
    };
    let image = shard.image();
    let lookup = |key: &str| -> Result<(i32, String, i32), (ErrorCode, String)> {
        match req.key_type {
            KEY_TYPE_GROUP => Coordinator::coordinator_broker(shard, key)
                .and_then(|id| image.broker_endpoint(&shard.config, shard.num_shards, id))
                .map(|b| (b.id, b.host, b.port))
                .ok_or_else(|| {
                    (
                        ErrorCode::CoordinatorNotAvailable,
                        "__consumer_offsets is not created yet, or its partition has no live leader; retry".to_string(),
                    )
                }),
            KEY_TYPE_TRANSACTION => crate::txn::coordinator_broker(shard, key)
                .and_then(|id| image.broker_endpoint(&shard.config, shard.num_shards, id))
                .map(|b| (b.id, b.host, b.port))
                .ok_or_else(|| {
                    (
                        ErrorCode::CoordinatorNotAvailable,
                        "__transaction_state is not created yet, or its partition has no live leader; retry"
                            .to_string(),
                    )
                }),
            other => Err((ErrorCode::InvalidRequest, format!("unknown coordinator key type {other}"))),
        }
    };
    let mut resp = FindCoordinatorResponse::default();
    let mut coordinators = Vec::with_capacity(keys.len());
    for key in &keys {
        let (code, msg, node, host, port) = match lookup(key) {
            Ok((node, host, port)) => (ErrorCode::None, None, node, host, port),
            Err((code, msg)) => {
                log::debug!("FindCoordinator {key:?} (type {}): {} ({msg})", req.key_type, code.name());
                (code, Some(msg), -1, String::new(), -1)
            }
        };
        let h = host.as_str();
        if version >= 4 {
            coordinators.push(
                CoordinatorEntry::default()
                    .with_key(str_bytes(key))
                    .with_node_id(BrokerId(node))
                    .with_host(str_bytes(h))
                    .with_port(port)
                    .with_error_code(code.code())
                    .with_error_message(msg.as_deref().map(str_bytes)),
            );
        } else {
            resp =
                resp.with_error_code(code.code()).with_node_id(BrokerId(node)).with_host(str_bytes(h)).with_port(port);
            if version >= 1 {
                resp = resp.with_error_message(msg.as_deref().map(str_bytes));
            }
        }
    }
    if version >= 4 {
        resp = resp.with_coordinators(coordinators);
    }
    encode(ApiKey::FindCoordinator, version, cid, &resp)
}

fn join_response(version: i16, o: JoinOutcome) -> JoinGroupResponse {
    let members = o
        .members
        .into_iter()
        .map(|(id, instance, metadata)| {
            let m = JoinGroupResponseMember::default().with_member_id(str_bytes(&id)).with_metadata(metadata);
            if version >= 5 {
                m.with_group_instance_id(instance.as_deref().map(str_bytes))
            } else {
                m
            }
        })
        .collect();
    let mut r = JoinGroupResponse::default()
        .with_error_code(o.error.code())
        .with_generation_id(o.generation)
        .with_leader(str_bytes(&o.leader))
        .with_member_id(str_bytes(&o.member_id))
        .with_members(members);
    r = if version >= 7 {
        r.with_protocol_type(o.protocol_type.as_deref().map(str_bytes))
            .with_protocol_name(o.protocol_name.as_deref().map(str_bytes))
    } else {
        r.with_protocol_name(Some(str_bytes(o.protocol_name.as_deref().unwrap_or(""))))
    };
    if version >= 9 {
        r = r.with_skip_assignment(o.skip_assignment);
    }
    r
}

pub async fn join_group(
    shard: Rc<Shard>,
    version: i16,
    cid: i32,
    req: JoinGroupRequest,
    client_id: String,
    client_host: String,
) -> Response {
    let gid = req.group_id.0.to_string();
    let coord = &shard.groups;
    let member_id = req.member_id.to_string();
    if let Err(code) = coord.check(&shard, &gid) {
        return encode(ApiKey::JoinGroup, version, cid, &join_response(version, JoinOutcome::error(code, &member_id)));
    }
    let jr = JoinRequest {
        member_id: member_id.clone(),
        instance_id: if version >= 5 { opt(&req.group_instance_id) } else { None },
        client_id,
        client_host,
        session_timeout_ms: req.session_timeout_ms,
        rebalance_timeout_ms: if version >= 1 { req.rebalance_timeout_ms } else { req.session_timeout_ms },
        protocol_type: req.protocol_type.to_string(),
        protocols: req.protocols.iter().map(|p| (p.name.to_string(), p.metadata.clone())).collect(),
        require_known_member_id: version >= 4,
        supports_skip_assignment: version >= 9,
    };
    let before = coord.mark(&gid);
    let reply = {
        let now = Instant::now();
        let mut groups = coord.groups.borrow_mut();
        let g = groups.entry(gid.clone()).or_insert_with(|| Group::new(&gid, now));
        g.join(jr, now, &coord.settings.limits)
    };
    coord.persist_if_changed(&shard, &gid, before);
    let outcome = match reply {
        Reply::Now(o) => o,
        Reply::Wait(rx) => {
            rx.await.unwrap_or_else(|_| JoinOutcome::error(ErrorCode::CoordinatorNotAvailable, &member_id))
        }
    };
    let outcome = match coord.wait_persisted(&shard, &gid).await {
        Ok(()) => outcome,
        Err(code) => JoinOutcome::error(code, &member_id),
    };
    if outcome.error != ErrorCode::None && outcome.error != ErrorCode::MemberIdRequired {
        log::info!("JoinGroup {gid} member {member_id:?}: {}", outcome.error.name());
    }
    encode(ApiKey::JoinGroup, version, cid, &join_response(version, outcome))
}

pub async fn sync_group(shard: Rc<Shard>, version: i16, cid: i32, req: SyncGroupRequest) -> Response {
    let gid = req.group_id.0.to_string();
    let coord = &shard.groups;
    let outcome = match coord.check(&shard, &gid) {
        Err(code) => SyncOutcome::error(code),
        Ok(()) => {
            let before = coord.mark(&gid);
            let reply = {
                let mut groups = coord.groups.borrow_mut();
                match groups.get_mut(&gid) {
                    None => Reply::Now(SyncOutcome::error(ErrorCode::UnknownMemberId)),
                    Some(g) => g.sync(
                        req.member_id.as_str(),
                        if version >= 3 { req.group_instance_id.as_deref() } else { None },
                        req.generation_id,
                        if version >= 5 { req.protocol_type.as_deref() } else { None },
                        if version >= 5 { req.protocol_name.as_deref() } else { None },
                        req.assignments.iter().map(|a| (a.member_id.to_string(), a.assignment.clone())).collect(),
                        Instant::now(),
                    ),
                }
            };
            coord.persist_if_changed(&shard, &gid, before);
            let outcome = match reply {
                Reply::Now(o) => o,
                Reply::Wait(rx) => rx.await.unwrap_or_else(|_| SyncOutcome::error(ErrorCode::CoordinatorNotAvailable)),
            };
            // The assignment goes out only once the group's record holding it is durable.
            match coord.wait_persisted(&shard, &gid).await {
                Ok(()) => outcome,
                Err(code) => SyncOutcome::error(code),
            }
        }
    };
    let mut r = SyncGroupResponse::default().with_error_code(outcome.error.code()).with_assignment(outcome.assignment);
    if version >= 5 {
        r = r
            .with_protocol_type(outcome.protocol_type.as_deref().map(str_bytes))
            .with_protocol_name(outcome.protocol_name.as_deref().map(str_bytes));
    }
    encode(ApiKey::SyncGroup, version, cid, &r)
}

pub fn heartbeat(shard: &Rc<Shard>, version: i16, cid: i32, req: HeartbeatRequest) -> Response {
    let gid = req.group_id.0.to_string();
    let coord = &shard.groups;
    let code = match coord.check(shard, &gid) {
        Err(code) => code,
        Ok(()) => match coord.groups.borrow_mut().get_mut(&gid) {
            None => ErrorCode::UnknownMemberId,
            Some(g) => g.heartbeat(
                req.member_id.as_str(),
                if version >= 3 { req.group_instance_id.as_deref() } else { None },
                req.generation_id,
                Instant::now(),
            ),
        },
    };
    encode(ApiKey::Heartbeat, version, cid, &HeartbeatResponse::default().with_error_code(code.code()))
}

pub async fn leave_group(shard: Rc<Shard>, version: i16, cid: i32, req: LeaveGroupRequest) -> Response {
    let shard = &shard;
    let gid = req.group_id.0.to_string();
    let coord = &shard.groups;
    let identities: Vec<(String, Option<String>)> = if version >= 3 {
        req.members.iter().map(|m| (m.member_id.to_string(), opt(&m.group_instance_id))).collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let (top, results) = match coord.check(shard, &gid) {
        Err(code) => (code, Vec::new()),
        Ok(()) => {
            let before = coord.mark(&gid);
            let now = Instant::now();
            let results: Vec<ErrorCode> = {
                let mut groups = coord.groups.borrow_mut();
                identities
                    .iter()
                    .map(|(m, i)| match groups.get_mut(&gid) {
                        None => ErrorCode::UnknownMemberId,
                        Some(g) => g.leave(m, i.as_deref(), now, &coord.settings.limits),
                    })
                    .collect()
            };
            coord.persist_if_changed(shard, &gid, before);
            // A departure that emptied the group is answered once that is durable.
            match coord.wait_persisted(shard, &gid).await {
                Ok(()) => {
                    let top = if version >= 3 {
                        ErrorCode::None
                    } else {
                        results.first().copied().unwrap_or(ErrorCode::None)
                    };
                    (top, results)
                }
                Err(code) => (code, Vec::new()),
            }
        }
    };
    let mut r = LeaveGroupResponse::default().with_error_code(top.code());
    if version >= 3 {
        r = r.with_members(
            identities
                .iter()
                .zip(results)
                .map(|((m, i), code)| {
                    MemberResponse::default()
                        .with_member_id(str_bytes(m))
                        .with_group_instance_id(i.as_deref().map(str_bytes))
                        .with_error_code(code.code())
                })
                .collect(),
        );
    }
    encode(ApiKey::LeaveGroup, version, cid, &r)
}

/// Kafka's checks before a commit is written (`validateOffsetCommit`).
fn validate_commit(
    coord: &Coordinator,
    gid: &str,
    member_id: &str,
    instance_id: Option<&str>,
    generation: i32,
) -> Result<(), ErrorCode> {
    let now = Instant::now();
    let mut groups = coord.groups.borrow_mut();
    let Some(g) = groups.get_mut(gid) else {
        if generation < 0 {
            groups.insert(gid.to_string(), Group::new(gid, now));
            return Ok(());
        }
        return Err(ErrorCode::IllegalGeneration);
    };
    if g.state == GroupState::Dead {
        return Err(ErrorCode::CoordinatorNotAvailable);
    }
    if generation >= 0 || !member_id.is_empty() || instance_id.is_some() {
        g.check_member(member_id, instance_id, generation)?;
        if g.state == GroupState::CompletingRebalance {
            return Err(ErrorCode::RebalanceInProgress);
        }
        g.touch(member_id, now);
        Ok(())
    } else if g.state != GroupState::Empty {
        // A commit from outside the group while it has members.
        Err(ErrorCode::UnknownMemberId)
    } else {
        Ok(())
    }
}

pub async fn offset_commit(shard: Rc<Shard>, version: i16, cid: i32, req: OffsetCommitRequest) -> Response {
    let gid = req.group_id.0.to_string();
    let coord = &shard.groups;
    let image = shard.image();
    let instance = if version >= 7 { req.group_instance_id.as_deref() } else { None };
    let group_error = coord.check(&shard, &gid).and_then(|_| {
        validate_commit(coord, &gid, req.member_id.as_str(), instance, req.generation_id_or_member_epoch)
    });
    let now = now_ms();
    let max_meta = coord.settings.metadata_max_bytes;
    // Per partition: its error, or the value to write.
    let mut codes: Vec<Vec<ErrorCode>> = Vec::with_capacity(req.topics.len());
    let mut commits: Vec<(String, i32, OffsetValue)> = Vec::new();
    for t in &req.topics {
        let topic = t.name.0.to_string();
        let meta = image.topics.get(&topic);
        let mut tc = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let metadata = p.committed_metadata.as_ref().map(|m| m.to_string()).unwrap_or_default();
            let code = if let Err(e) = group_error {
                e
            } else if meta.is_none_or(|m| p.partition_index < 0 || p.partition_index as usize >= m.owners.len()) {
                ErrorCode::UnknownTopicOrPartition
            } else if metadata.len() > max_meta {
                ErrorCode::OffsetMetadataTooLarge
            } else {
                commits.push((
                    topic.clone(),
                    p.partition_index,
                    OffsetValue {
                        offset: p.committed_offset,
                        leader_epoch: if version >= 6 { p.committed_leader_epoch } else { -1 },
                        metadata,
                        commit_timestamp_ms: now,
                    },
                ));
                ErrorCode::None
            };
            tc.push(code);
        }
        codes.push(tc);
    }
    if let Err(e) = group_error {
        log::info!("OffsetCommit {gid} member {:?}: {}", req.member_id.as_str(), e.name());
    }
    if !commits.is_empty() {
        let recs: Vec<(Bytes, Option<Bytes>)> = commits
            .iter()
            .map(|(t, p, v)| (records::offset_key(&gid, t, *p), Some(records::offset_value(v))))
            .collect();
        match append_and_wait(&shard, &gid, &recs).await {
            Ok(at) => coord.apply_commits(&gid, commits, at),
            Err(e) => {
                log::warn!("OffsetCommit {gid}: cannot write __consumer_offsets: {}", e.name());
                fail_written(&mut codes, e);
            }
        }
    }
    let topics = req
        .topics
        .iter()
        .zip(codes)
        .map(|(t, tc)| {
            OffsetCommitResponseTopic::default().with_name(t.name.clone()).with_partitions(
                t.partitions
                    .iter()
                    .zip(tc)
                    .map(|(p, c)| {
                        OffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(c.code())
                    })
                    .collect(),
            )
        })
        .collect();
    encode(ApiKey::OffsetCommit, version, cid, &OffsetCommitResponse::default().with_topics(topics))
}

/// The commit's write failed: every partition that was to be written gets `e`.
fn fail_written(codes: &mut [Vec<ErrorCode>], e: ErrorCode) {
    for c in codes.iter_mut().flatten() {
        if *c == ErrorCode::None {
            *c = e;
        }
    }
}

/// One group's committed offsets for the wanted topics (`None`: all).
/// Returns (topic, [(partition, offset, leader epoch, metadata)]).
type FetchedTopic = (String, Vec<(i32, i64, i32, String)>);

fn fetch_offsets(coord: &Coordinator, gid: &str, wanted: Option<Vec<(String, Vec<i32>)>>) -> Vec<FetchedTopic> {
    let offsets = coord.offsets.borrow();
    let committed = offsets.get(gid);
    match wanted {
        Some(topics) => topics
            .into_iter()
            .map(|(t, parts)| {
                let ps = parts
                    .into_iter()
                    .map(|p| match committed.and_then(|c| c.get(&(t.clone(), p))) {
                        Some(c) => (p, c.value.offset, c.value.leader_epoch, c.value.metadata.clone()),
                        None => (p, -1, -1, String::new()),
                    })
                    .collect();
                (t, ps)
            })
            .collect(),
        None => {
            let mut out: Vec<FetchedTopic> = Vec::new();
            for ((t, p), c) in committed.into_iter().flatten() {
                if out.last().is_none_or(|(lt, _)| lt != t) {
                    out.push((t.clone(), Vec::new()));
                }
                if let Some(last) = out.last_mut() {
                    last.1.push((*p, c.value.offset, c.value.leader_epoch, c.value.metadata.clone()));
                }
            }
            out
        }
    }
}

pub fn offset_fetch(shard: &Rc<Shard>, version: i16, cid: i32, req: OffsetFetchRequest) -> Response {
    let coord = &shard.groups;
    if version >= 8 {
        let groups = req
            .groups
            .iter()
            .map(|g| {
                let gid = g.group_id.0.to_string();
                let out = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
                if let Err(code) = coord.check(shard, &gid) {
                    return out.with_error_code(code.code());
                }
                let wanted = g.topics.as_ref().map(|ts| {
                    ts.iter().map(|t| (t.name.0.to_string(), t.partition_indexes.clone())).collect::<Vec<_>>()
                });
                let topics = fetch_offsets(coord, &gid, wanted)
                    .into_iter()
                    .map(|(t, ps)| {
                        OffsetFetchResponseTopics::default().with_name(TopicName(str_bytes(&t))).with_partitions(
                            ps.into_iter()
                                .map(|(p, o, e, m)| {
                                    let r = OffsetFetchResponsePartitions::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(o)
                                        .with_committed_leader_epoch(e)
                                        .with_metadata(Some(str_bytes(&m)));
                                    // KIP-447: a transaction's offset is still pending.
                                    if req.require_stable && coord.has_pending_txn_offset(&gid, &t, p) {
                                        r.with_error_code(ErrorCode::UnstableOffsetCommit.code())
                                    } else {
                                        r
                                    }
                                })
                                .collect(),
                        )
                    })
                    .collect();
                out.with_topics(topics)
            })
            .collect();
        return encode(ApiKey::OffsetFetch, version, cid, &OffsetFetchResponse::default().with_groups(groups));
    }
    let gid = req.group_id.0.to_string();
    let wanted =
        req.topics.as_ref().map(|ts| ts.iter().map(|t| (t.name.0.to_string(), t.partition_indexes.clone())).collect());
    let partition = |p: i32, o: i64, e: i32, m: &str, code: ErrorCode| {
        let r = OffsetFetchResponsePartition::default()
            .with_partition_index(p)
            .with_committed_offset(o)
            .with_metadata(Some(str_bytes(m)))
            .with_error_code(code.code());
        if version >= 5 {
            r.with_committed_leader_epoch(e)
        } else {
            r
        }
    };
    let resp = match coord.check(shard, &gid) {
        Err(code) if version >= 2 => OffsetFetchResponse::default().with_error_code(code.code()),
        Err(code) => {
            // v1 has no group-level error: every partition carries it.
            let topics = req
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    OffsetFetchResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(t.partition_indexes.iter().map(|p| partition(*p, -1, -1, "", code)).collect())
                })
                .collect();
            OffsetFetchResponse::default().with_topics(topics)
        }
        Ok(()) => {
            let topics = fetch_offsets(coord, &gid, wanted)
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopic::default().with_name(TopicName(str_bytes(&t))).with_partitions(
                        ps.into_iter()
                            .map(|(p, o, e, m)| {
                                let unstable =
                                    version >= 7 && req.require_stable && coord.has_pending_txn_offset(&gid, &t, p);
                                let code = if unstable { ErrorCode::UnstableOffsetCommit } else { ErrorCode::None };
                                partition(p, o, e, &m, code)
                            })
                            .collect(),
                    )
                })
                .collect();
            OffsetFetchResponse::default().with_topics(topics)
        }
    };
    encode(ApiKey::OffsetFetch, version, cid, &resp)
}

pub fn list_groups(shard: &Rc<Shard>, version: i16, cid: i32, req: ListGroupsRequest) -> Response {
    let coord = &shard.groups;
    if !coord.is_loaded() {
        let r = ListGroupsResponse::default().with_error_code(ErrorCode::CoordinatorLoadInProgress.code());
        return encode(ApiKey::ListGroups, version, cid, &r);
    }
    let states: HashSet<String> =
        if version >= 4 { req.states_filter.iter().map(|s| s.to_lowercase()).collect() } else { HashSet::new() };
    let types: HashSet<String> =
        if version >= 5 { req.types_filter.iter().map(|s| s.to_lowercase()).collect() } else { HashSet::new() };
    let mut listed: Vec<ListedGroup> = coord
        .groups
        .borrow()
        .values()
        .filter(|g| g.state != GroupState::Dead)
        .filter(|g| states.is_empty() || states.contains(&g.state.name().to_lowercase()))
        .filter(|_| types.is_empty() || types.contains("classic"))
        .map(|g| {
            let mut l = ListedGroup::default()
                .with_group_id(GroupId(str_bytes(&g.id)))
                .with_protocol_type(str_bytes(g.protocol_type.as_deref().unwrap_or("")));
            if version >= 4 {
                l = l.with_group_state(str_bytes(g.state.name()));
            }
            if version >= 5 {
                l = l.with_group_type(str_bytes("classic"));
            }
            l
        })
        .collect();
    listed.sort_by(|a, b| a.group_id.0.cmp(&b.group_id.0));
    encode(ApiKey::ListGroups, version, cid, &ListGroupsResponse::default().with_groups(listed))
}

pub fn describe_groups(shard: &Rc<Shard>, version: i16, cid: i32, req: DescribeGroupsRequest) -> Response {
    let coord = &shard.groups;
    let described = req
        .groups
        .iter()
        .map(|gid| {
            let mut out = DescribedGroup::default().with_group_id(gid.clone());
            if version >= 3 {
                out = out.with_authorized_operations(AUTHORIZED_OPERATIONS_UNKNOWN);
            }
            if let Err(code) = coord.check(shard, gid.0.as_str()) {
                return out.with_error_code(code.code());
            }
            let groups = coord.groups.borrow();
            let Some(g) = groups.get(gid.0.as_str()) else {
                return out.with_group_state(str_bytes(GroupState::Dead.name()));
            };
            let protocol = g.protocol.clone().unwrap_or_default();
            let members = g
                .members_in_order()
                .map(|m| {
                    let d = DescribedGroupMember::default()
                        .with_member_id(str_bytes(&m.id))
                        .with_client_id(str_bytes(&m.client_id))
                        .with_client_host(str_bytes(&m.client_host))
                        .with_member_metadata(m.metadata(&protocol))
                        .with_member_assignment(m.assignment.clone());
                    if version >= 4 {
                        d.with_group_instance_id(m.instance_id.as_deref().map(str_bytes))
                    } else {
                        d
                    }
                })
                .collect();
            out.with_group_state(str_bytes(g.state.name()))
                .with_protocol_type(str_bytes(g.protocol_type.as_deref().unwrap_or("")))
                .with_protocol_data(str_bytes(&protocol))
                .with_members(members)
        })
        .collect();
    encode(ApiKey::DescribeGroups, version, cid, &DescribeGroupsResponse::default().with_groups(described))
}

pub async fn delete_groups(shard: Rc<Shard>, version: i16, cid: i32, req: DeleteGroupsRequest) -> Response {
    let coord = &shard.groups;
    let mut results = Vec::with_capacity(req.groups_names.len());
    for gid in &req.groups_names {
        let id = gid.0.to_string();
        let code = match coord.check(&shard, &id) {
            Err(code) => code,
            Ok(()) => {
                let state = coord.groups.borrow().get(&id).map(|g| g.state);
                match state {
                    None | Some(GroupState::Dead) => ErrorCode::GroupIdNotFound,
                    Some(GroupState::Empty) => match coord.delete_group(&shard, &id).await {
                        Ok(()) => {
                            log::info!("group {id} deleted");
                            ErrorCode::None
                        }
                        Err(e) => e,
                    },
                    Some(_) => ErrorCode::NonEmptyGroup,
                }
            }
        };
        results.push(DeletableGroupResult::default().with_group_id(gid.clone()).with_error_code(code.code()));
    }
    encode(ApiKey::DeleteGroups, version, cid, &DeleteGroupsResponse::default().with_results(results))
}

pub async fn offset_delete(shard: Rc<Shard>, version: i16, cid: i32, req: OffsetDeleteRequest) -> Response {
    let gid = req.group_id.0.to_string();
    let coord = &shard.groups;
    let image = shard.image();
    let group_error = coord.check(&shard, &gid).and_then(|_| {
        let groups = coord.groups.borrow();
        let g = groups.get(&gid).ok_or(ErrorCode::GroupIdNotFound)?;
        match g.state {
            GroupState::Dead => Err(ErrorCode::GroupIdNotFound),
            GroupState::Empty => Ok(Vec::new()),
            _ if g.protocol_type.as_deref() == Some("consumer") => {
                g.subscribed_topics().ok_or(ErrorCode::NonEmptyGroup)
            }
            _ => Err(ErrorCode::NonEmptyGroup),
        }
    });
    let mut resp = OffsetDeleteResponse::default();
    let subscribed = match group_error {
        Err(e) => {
            resp.error_code = e.code();
            return encode(ApiKey::OffsetDelete, version, cid, &resp);
        }
        Ok(s) => s,
    };
    let mut tombstones: Vec<(Bytes, Option<Bytes>)> = Vec::new();
    let mut deleted: Vec<(String, i32)> = Vec::new();
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let name = t.name.0.to_string();
        let meta = image.topics.get(&name);
        let parts = t
            .partitions
            .iter()
            .map(|p| {
                let i = p.partition_index;
                let code = if meta.is_none_or(|m| i < 0 || i as usize >= m.owners.len()) {
                    ErrorCode::UnknownTopicOrPartition
                } else if subscribed.contains(&name) {
                    ErrorCode::GroupSubscribedToTopic
                } else {
                    if coord.offsets.borrow().get(&gid).is_some_and(|o| o.contains_key(&(name.clone(), i))) {
                        tombstones.push((records::offset_key(&gid, &name, i), None));
                        deleted.push((name.clone(), i));
                    }
                    ErrorCode::None
                };
                OffsetDeleteResponsePartition::default().with_partition_index(i).with_error_code(code.code())
            })
            .collect();
        topics.push(OffsetDeleteResponseTopic::default().with_name(t.name.clone()).with_partitions(parts));
    }
    if !tombstones.is_empty() {
        match append_and_wait(&shard, &gid, &tombstones).await {
            Ok(_) => {
                if let Some(o) = coord.offsets.borrow_mut().get_mut(&gid) {
                    for k in &deleted {
                        o.remove(k);
                    }
                }
            }
            Err(e) => resp.error_code = e.code(),
        }
    }
    encode(ApiKey::OffsetDelete, version, cid, &resp.with_topics(topics))
}

/// TxnOffsetCommit (KIP-98, KIP-447): offsets written to the group's
/// `__consumer_offsets` partition as part of the producer's transaction.
/// They become the group's committed offsets only when the transaction
/// commits (its marker reaches that partition: `Coordinator::complete_txn`).
/// The transaction coordinator is asked first whether the group's partition
/// is in the producer's open transaction (KIP-890's verification), so a
/// producer that did not call AddOffsetsToTxn, or was fenced, writes
/// nothing.
pub async fn txn_offset_commit(shard: Rc<Shard>, version: i16, cid: i32, req: TxnOffsetCommitRequest) -> Response {
    let gid = req.group_id.0.to_string();
    let tid = req.transactional_id.0.to_string();
    let coord = &shard.groups;
    let image = shard.image();
    let pid = req.producer_id.0;
    let epoch = req.producer_epoch;
    let mut group_error = coord.check(&shard, &gid);
    if group_error.is_ok() && version >= 3 {
        let instance = req.group_instance_id.as_deref();
        group_error = validate_commit(coord, &gid, req.member_id.as_str(), instance, req.generation_id);
    }
    if group_error.is_ok() {
        group_error = match crate::txn::offsets_partition(&shard, &gid) {
            None => Err(ErrorCode::CoordinatorNotAvailable),
            Some(part) => crate::txn::verify_partition(&shard, &tid, pid, epoch, part).await,
        };
        if let Err(e) = group_error {
            log::info!(
                "TxnOffsetCommit {gid} from transactional id {tid:?} producer {pid} epoch {epoch}: {}",
                e.name()
            );
        }
    }
    // As Kafka's verification answers a fenced producer's write (its
    // AddPartitionsToTxnManager): INVALID_PRODUCER_EPOCH, at every version.
    let group_error = group_error.map_err(|e| match e {
        ErrorCode::ProducerFenced => ErrorCode::InvalidProducerEpoch,
        e => e,
    });
    let now = now_ms();
    let max_meta = coord.settings.metadata_max_bytes;
    let mut codes: Vec<Vec<ErrorCode>> = Vec::with_capacity(req.topics.len());
    let mut commits: Vec<(String, i32, OffsetValue)> = Vec::new();
    for t in &req.topics {
        let topic = t.name.0.to_string();
        let meta = image.topics.get(&topic);
        let tc = t
            .partitions
            .iter()
            .map(|p| {
                let metadata = p.committed_metadata.as_ref().map(|m| m.to_string()).unwrap_or_default();
                if let Err(e) = group_error {
                    e
                } else if meta.is_none_or(|m| p.partition_index < 0 || p.partition_index as usize >= m.owners.len()) {
                    ErrorCode::UnknownTopicOrPartition
                } else if metadata.len() > max_meta {
                    ErrorCode::OffsetMetadataTooLarge
                } else {
                    commits.push((
                        topic.clone(),
                        p.partition_index,
                        OffsetValue {
                            offset: p.committed_offset,
                            leader_epoch: if version >= 2 { p.committed_leader_epoch } else { -1 },
                            metadata,
                            commit_timestamp_ms: now,
                        },
                    ));
                    ErrorCode::None
                }
            })
            .collect();
        codes.push(tc);
    }
    if !commits.is_empty() {
        let recs: Vec<(Bytes, Option<Bytes>)> = commits
            .iter()
            .map(|(t, p, v)| (records::offset_key(&gid, t, *p), Some(records::offset_value(v))))
            .collect();
        let written = match (
            Coordinator::partition_of(&shard, &gid),
            crate::groups::records::build_transactional(&recs, now, pid, epoch),
        ) {
            (Some((p, _)), batch) => match shard.log(crate::groups::OFFSETS_TOPIC, p) {
                Some(log) => crate::groups::append_batch_and_wait(&shard, &log, &batch).await,
                None => Err(ErrorCode::NotCoordinator),
            },
            (None, _) => Err(ErrorCode::CoordinatorNotAvailable),
        };
        match written {
            Ok(_) => coord.add_pending_txn(pid, &gid, commits),
            Err(e) => {
                log::warn!("TxnOffsetCommit {gid}: cannot write __consumer_offsets: {}", e.name());
                fail_written(&mut codes, e);
            }
        }
    }
    let topics = req
        .topics
        .iter()
        .zip(codes)
        .map(|(t, tc)| {
            TxnOffsetCommitResponseTopic::default().with_name(t.name.clone()).with_partitions(
                t.partitions
                    .iter()
                    .zip(tc)
                    .map(|(p, code)| {
                        TxnOffsetCommitResponsePartition::default()
                            .with_partition_index(p.partition_index)
                            .with_error_code(code.code())
                    })
                    .collect(),
            )
        })
        .collect();
    encode(ApiKey::TxnOffsetCommit, version, cid, &TxnOffsetCommitResponse::default().with_topics(topics))
}
