//! CreatePartitions, DeleteRecords, DescribeCluster, DescribeLogDirs and
//! OffsetForLeaderEpoch.
//!
//! CreatePartitions and DescribeCluster are answered by any shard (the first
//! through the controller on shard 0, like CreateTopics). DeleteRecords and
//! OffsetForLeaderEpoch are per partition and answered by the owning shard
//! only (NOT_LEADER_OR_FOLLOWER otherwise, as for Produce). DescribeLogDirs
//! reports the partitions of the shard (broker) asked, with real sizes.

use std::rc::Rc;

use tidelog_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use tidelog_protocol::messages::delete_records_response::{DeleteRecordsPartitionResult, DeleteRecordsTopicResult};
use tidelog_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use tidelog_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use tidelog_protocol::messages::offset_for_leader_epoch_response::{EpochEndOffset, OffsetForLeaderTopicResult};
use tidelog_protocol::messages::{
    ApiKey, BrokerId, CreatePartitionsRequest, CreatePartitionsResponse, DeleteRecordsRequest, DeleteRecordsResponse,
    DescribeClusterRequest, DescribeClusterResponse, DescribeLogDirsRequest, DescribeLogDirsResponse,
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, TopicName,
};
use tidelog_protocol::{ErrorCode, Offset};

use super::{encode, str_bytes, Response};
use crate::shard::Shard;
use crate::storage::checkpoint;
use crate::storage::partition::SharedLog;

/// The owned, open log of `topic`-`partition`, or the error code to answer.
fn owned_log(shard: &Shard, topic: &str, partition: i32) -> Result<SharedLog, ErrorCode> {
    match shard.image().owner(topic, partition) {
        None => Err(ErrorCode::UnknownTopicOrPartition),
        Some(o) if o != shard.id => Err(ErrorCode::NotLeaderOrFollower),
        Some(_) => shard.log(topic, partition).ok_or(ErrorCode::LeaderNotAvailable),
    }
}

pub async fn create_partitions(shard: Rc<Shard>, version: i16, cid: i32, req: CreatePartitionsRequest) -> Response {
    let image = shard.image();
    let mut results: Vec<(String, Option<(ErrorCode, String)>)> = Vec::with_capacity(req.topics.len());
    let mut to_grow = Vec::new();
    for t in &req.topics {
        let name = t.name.0.to_string();
        let error = match image.topics.get(&name) {
            None => Some((ErrorCode::UnknownTopicOrPartition, format!("topic '{name}' does not exist"))),
            Some(_) if t.assignments.is_some() => Some((
                ErrorCode::InvalidReplicaAssignment,
                "manual replica assignment is not supported; give only the new count".into(),
            )),
            Some(meta) if t.count <= meta.owners.len() as i32 => Some((
                ErrorCode::InvalidPartitions,
                format!(
                    "topic '{name}' has {} partitions; the new count {} must be larger",
                    meta.owners.len(),
                    t.count
                ),
            )),
            Some(_) if t.count > 100_000 => {
                Some((ErrorCode::InvalidPartitions, format!("{} partitions is more than the limit of 100000", t.count)))
            }
            Some(_) => None,
        };
        if error.is_none() && !req.validate_only {
            to_grow.push((name.clone(), t.count));
        }
        results.push((name, error));
    }
    if !to_grow.is_empty() {
        for (name, outcome) in shard.create_partitions(to_grow).await {
            if let (Some(r), Err(e)) = (results.iter_mut().find(|(n, _)| *n == name), outcome) {
                r.1 = Some(e);
            }
        }
    }
    let results = results
        .into_iter()
        .map(|(name, err)| {
            let r = CreatePartitionsTopicResult::default().with_name(TopicName(str_bytes(&name)));
            match err {
                None => r,
                Some((code, msg)) => {
                    log::warn!("create partitions {name}: {} ({msg})", code.name());
                    shard.metrics.error(ApiKey::CreatePartitions, code.code());
                    r.with_error_code(code.code()).with_error_message(Some(str_bytes(&msg)))
                }
            }
        })
        .collect();
    encode(ApiKey::CreatePartitions, version, cid, &CreatePartitionsResponse::default().with_results(results))
}

pub async fn delete_records(shard: Rc<Shard>, version: i16, cid: i32, req: DeleteRecordsRequest) -> Response {
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let name: &str = &t.name.0;
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let out = DeleteRecordsPartitionResult::default().with_partition_index(p.partition_index);
            let fail = |out: DeleteRecordsPartitionResult, code: ErrorCode| {
                shard.metrics.error(ApiKey::DeleteRecords, code.code());
                out.with_error_code(code.code()).with_low_watermark(-1)
            };
            let log = match owned_log(&shard, name, p.partition_index) {
                Ok(l) => l,
                Err(code) => {
                    parts.push(fail(out, code));
                    continue;
                }
            };
            let (start, hw) = {
                let l = log.borrow();
                (l.log_start_offset, l.high_watermark)
            };
            // -1 means "up to the high watermark" (Kafka's DeleteRecords contract).
            let target = if p.offset == -1 { hw } else { Offset(p.offset) };
            if target < Offset(0) || target > hw {
                log::warn!(
                    "delete records {name}-{}: offset {} outside [{}, {}]",
                    p.partition_index,
                    p.offset,
                    start.0,
                    hw.0
                );
                parts.push(fail(out, ErrorCode::OffsetOutOfRange));
                continue;
            }
            match checkpoint::truncate_prefix(&log, target, "DeleteRecords").await {
                Ok(done) => {
                    shard.metrics.cleaner_add(|c| c.delete_records_segments_deleted += done.segments_deleted);
                    parts.push(out.with_low_watermark(done.log_start_offset.0));
                }
                Err(e) => {
                    log::error!("delete records {name}-{} to {}: {e}", p.partition_index, target.0);
                    parts.push(fail(out, ErrorCode::KafkaStorageError));
                }
            }
        }
        topics.push(DeleteRecordsTopicResult::default().with_name(t.name.clone()).with_partitions(parts));
    }
    encode(ApiKey::DeleteRecords, version, cid, &DeleteRecordsResponse::default().with_topics(topics))
}

pub fn describe_cluster(shard: &Rc<Shard>, version: i16, cid: i32, req: DescribeClusterRequest) -> Response {
    let image = shard.image();
    let mut resp = DescribeClusterResponse::default()
        .with_cluster_id(str_bytes(&image.cluster_id))
        .with_controller_id(BrokerId(image.controller_broker()))
        .with_brokers(
            image
                .brokers(&shard.config, shard.num_shards)
                .into_iter()
                .map(|b| {
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(b.id))
                        .with_host(str_bytes(&b.host))
                        .with_port(b.port)
                        .with_rack(b.rack.as_deref().map(str_bytes))
                })
                .collect(),
        );
    // Endpoint type 1 = brokers; 2 (controllers) is not served separately.
    if version >= 1 && req.endpoint_type != 1 {
        resp.error_code = ErrorCode::UnsupportedVersion.code();
        resp.error_message = Some(str_bytes("only endpoint type 1 (brokers) is served"));
        resp.endpoint_type = req.endpoint_type;
        resp.brokers.clear();
    }
    encode(ApiKey::DescribeCluster, version, cid, &resp)
}

/// One result per `log.dirs` entry, with this shard's partitions in it. A
/// directory that is not online carries KAFKA_STORAGE_ERROR, as Kafka
/// reports an offline log dir.
pub async fn describe_log_dirs(shard: Rc<Shard>, version: i16, cid: i32, req: DescribeLogDirsRequest) -> Response {
    use crate::storage::log_dirs::{self, DirState};
    type Topics = std::collections::BTreeMap<String, Vec<DescribeLogDirsPartition>>;
    let mut per_dir: Vec<Topics> = vec![Topics::new(); shard.log_dirs.len()];
    for (topic, partition, log) in shard.all_logs() {
        if let Some(wanted) = &req.topics {
            let asked = wanted.iter().any(|t| *t.topic.0 == *topic && t.partitions.contains(&partition));
            if !asked {
                continue;
            }
        }
        let (size, dir) = {
            let l = log.borrow();
            (l.stats().bytes as i64, shard.log_dirs.index_of(&l.dir).unwrap_or(0))
        };
        per_dir[dir].entry(topic).or_default().push(
            DescribeLogDirsPartition::default()
                .with_partition_index(partition)
                .with_partition_size(size)
                .with_offset_lag(0),
        );
    }
    let mut results = Vec::with_capacity(per_dir.len());
    for (i, topics) in per_dir.into_iter().enumerate() {
        let path = shard.log_dirs.path(i).to_path_buf();
        let dir = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let mut result =
            DescribeLogDirsResult::default().with_log_dir(str_bytes(&dir.display().to_string())).with_topics(
                topics
                    .into_iter()
                    .map(|(t, mut parts)| {
                        parts.sort_by_key(|p| p.partition_index);
                        DescribeLogDirsTopic::default().with_name(TopicName(str_bytes(&t))).with_partitions(parts)
                    })
                    .collect(),
            );
        if shard.log_dirs.state(i) != DirState::Online {
            result.error_code = ErrorCode::KafkaStorageError.code();
        }
        if version >= 4 {
            let space = glommio::executor().spawn_blocking(move || log_dirs::space(&path)).await;
            let (usable, total) = space.map(|(f, t)| (f as i64, t as i64)).unwrap_or((-1, -1));
            result.total_bytes = total;
            result.usable_bytes = usable;
        }
        results.push(result);
    }
    encode(ApiKey::DescribeLogDirs, version, cid, &DescribeLogDirsResponse::default().with_results(results))
}

pub fn offset_for_leader_epoch(
    shard: &Rc<Shard>,
    version: i16,
    cid: i32,
    req: OffsetForLeaderEpochRequest,
) -> Response {
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let parts = t
                .partitions
                .iter()
                .map(|p| {
                    let out = EpochEndOffset::default().with_partition(p.partition);
                    // Single node: every partition is at epoch 0.
                    let current = shard.image().leader_epoch(&t.topic.0, p.partition).max(0);
                    let code = match owned_log(shard, &t.topic.0, p.partition) {
                        Err(code) => Err(code.code()),
                        Ok(_) if p.current_leader_epoch > current => Err(ErrorCode::UnknownLeaderEpoch.code()),
                        Ok(_) if p.current_leader_epoch >= 0 && p.current_leader_epoch < current => {
                            Err(ErrorCode::FencedLeaderEpoch.code())
                        }
                        Ok(log) => Ok(log),
                    };
                    match code {
                        Err(c) => {
                            shard.metrics.error(ApiKey::OffsetForLeaderEpoch, c);
                            out.with_error_code(c).with_leader_epoch(-1).with_end_offset(-1)
                        }
                        // Asking for an epoch newer than ours: undefined (-1, -1), as Kafka answers.
                        Ok(_) if p.leader_epoch > current => out.with_leader_epoch(-1).with_end_offset(-1),
                        Ok(log) if p.leader_epoch == current => {
                            let end = log.borrow().log_end_offset().0;
                            out.with_leader_epoch(current).with_end_offset(end)
                        }
                        // An older epoch: where it ended on this log (the
                        // largest epoch at or below it, up to the next one's
                        // start), which is where a follower must truncate.
                        Ok(log) => match crate::replication::epoch_end_offset(&log, p.leader_epoch) {
                            Some((epoch, end)) => out.with_leader_epoch(epoch).with_end_offset(end.0),
                            None => out.with_leader_epoch(-1).with_end_offset(-1),
                        },
                    }
                })
                .collect();
            OffsetForLeaderTopicResult::default().with_topic(t.topic.clone()).with_partitions(parts)
        })
        .collect();
    encode(ApiKey::OffsetForLeaderEpoch, version, cid, &OffsetForLeaderEpochResponse::default().with_topics(topics))
}
