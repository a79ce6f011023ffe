//! Metadata, ListOffsets, CreateTopics, DeleteTopics (config APIs: `configs`).
//!
//! Metadata and the topic admin APIs are answered by any shard; topic changes
//! go through the controller on shard 0 and return once every shard applied
//! them, so a client can produce to a new topic as soon as it is told it
//! exists.

use std::collections::BTreeMap;
use std::rc::Rc;

use tidelog_protocol::messages::create_topics_response::{CreatableTopicConfigs, CreatableTopicResult};
use tidelog_protocol::messages::delete_topics_response::DeletableTopicResult;
use tidelog_protocol::messages::list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
use tidelog_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use tidelog_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, TopicName,
};
use tidelog_protocol::{ErrorCode, Offset};

use super::{encode, str_bytes, Response};
use crate::metadata::{validate_topic_name, MetadataImage, TopicMeta};
use crate::shard::{NewTopic, Shard};
use crate::storage::partition;

fn brokers(shard: &Shard, image: &MetadataImage) -> Vec<MetadataResponseBroker> {
    image
        .brokers(&shard.config, shard.num_shards)
        .into_iter()
        .map(|b| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.id))
                .with_host(str_bytes(&b.host))
                .with_port(b.port)
                .with_rack(b.rack.as_deref().map(str_bytes))
        })
        .collect()
}

fn topic_entry(image: &MetadataImage, t: &TopicMeta, version: i16) -> MetadataResponseTopic {
    let partitions = (0..t.owners.len())
        .filter_map(|p| image.partition_state(t, p).map(|s| (p, s)))
        .map(|(p, s)| {
            let ids = |v: &[i32]| v.iter().map(|b| BrokerId(*b)).collect::<Vec<_>>();
            // Kafka: LEADER_NOT_AVAILABLE while no replica may lead.
            let code = if s.leader < 0 { ErrorCode::LeaderNotAvailable } else { ErrorCode::None };
            MetadataResponsePartition::default()
                .with_error_code(code.code())
                .with_partition_index(p as i32)
                .with_leader_id(BrokerId(s.leader))
                .with_leader_epoch(if version >= 7 { s.leader_epoch } else { -1 })
                .with_replica_nodes(ids(&s.replicas))
                .with_isr_nodes(ids(&s.isr))
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(str_bytes(&t.name))))
        .with_topic_id(if version >= 10 { t.uuid() } else { uuid::Uuid::nil() })
        .with_is_internal(version >= 1 && crate::metadata::is_internal_topic(&t.name))
        .with_partitions(partitions)
}

fn topic_error(name: &str, code: ErrorCode) -> MetadataResponseTopic {
    MetadataResponseTopic::default().with_name(Some(TopicName(str_bytes(name)))).with_error_code(code.code())
}

pub async fn metadata(shard: Rc<Shard>, version: i16, cid: i32, req: MetadataRequest) -> Response {
    let image = shard.image();
    // v0: an empty list means all topics; v1+: null means all.
    let wanted: Option<Vec<String>> = match &req.topics {
        None => None,
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(t.iter().filter_map(|t| t.name.as_ref().map(|n| n.0.to_string())).collect()),
    };
    let allow_auto = shard.config.auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    let mut image = image;
    if let (Some(names), true) = (&wanted, allow_auto) {
        let to_create: Vec<NewTopic> = names
            .iter()
            .filter(|n| !image.topics.contains_key(n.as_str()) && validate_topic_name(n).is_ok())
            .map(|n| NewTopic {
                name: n.clone(),
                partitions: shard.config.num_partitions,
                replication_factor: shard.config.default_replication_factor,
                assignments: Vec::new(),
                configs: BTreeMap::new(),
            })
            .collect();
        if !to_create.is_empty() {
            for (name, r) in shard.create_topics(to_create).await {
                match r {
                    Ok(_) => log::info!("auto-created topic {name} ({} partitions)", shard.config.num_partitions),
                    Err((code, msg)) if code != ErrorCode::TopicAlreadyExists => {
                        log::warn!("auto-create {name}: {msg}")
                    }
                    Err(_) => {}
                }
            }
            image = shard.image();
        }
    }
    let topics = match &wanted {
        None => image.topics.values().map(|t| topic_entry(&image, t, version)).collect(),
        Some(names) => names
            .iter()
            .map(|n| match image.topics.get(n.as_str()) {
                Some(t) => topic_entry(&image, t, version),
                None if validate_topic_name(n).is_err() => {
                    log::warn!("metadata: invalid topic name {n:?}");
                    topic_error(n, ErrorCode::InvalidTopicException)
                }
                None => topic_error(n, ErrorCode::UnknownTopicOrPartition),
            })
            .collect(),
    };
    let resp = MetadataResponse::default()
        .with_brokers(brokers(&shard, &image))
        .with_cluster_id(if version >= 2 { Some(str_bytes(&image.cluster_id)) } else { None })
        .with_controller_id(BrokerId(if version >= 1 { image.controller_broker() } else { -1 }))
        .with_topics(topics);
    encode(ApiKey::Metadata, version, cid, &resp)
}

pub async fn list_offsets(shard: Rc<Shard>, version: i16, cid: i32, req: ListOffsetsRequest) -> Response {
    let image = shard.image();
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name: &str = &t.name.0;
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let out = ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index);
            let log = match image.owner(name, p.partition_index) {
                None => {
                    parts.push(out.with_error_code(ErrorCode::UnknownTopicOrPartition.code()));
                    continue;
                }
                Some(o) if o != shard.id => {
                    parts.push(out.with_error_code(ErrorCode::NotLeaderOrFollower.code()));
                    continue;
                }
                Some(_) => shard.log(name, p.partition_index),
            };
            let Some(log) = log else {
                parts.push(out.with_error_code(ErrorCode::LeaderNotAvailable.code()));
                continue;
            };
            // LATEST is the high watermark, or for read_committed (isolation
            // level 1, v2+) the last stable offset, as Kafka answers.
            let (start, latest) = {
                let l = log.borrow();
                let latest = if req.isolation_level == 1 { l.last_stable_offset() } else { l.high_watermark };
                (l.log_start_offset, latest)
            };
            let found: Result<Option<(Offset, i64)>, std::io::Error> = match p.timestamp {
                -2 => Ok(Some((start, -1))),
                -1 => Ok(Some((latest, -1))),
                // Kafka answers only offsets below what the isolation level may read.
                ts if ts >= 0 => {
                    partition::offset_for_timestamp(&log, ts).await.map(|o| o.filter(|(at, _)| *at < latest))
                }
                -3 => max_timestamp(&log).await.map(|o| o.filter(|(at, _)| *at < latest)),
                other => {
                    log::warn!("list offsets {name}-{}: unsupported timestamp {other}", p.partition_index);
                    parts.push(out.with_error_code(ErrorCode::InvalidRequest.code()));
                    continue;
                }
            };
            parts.push(match found {
                Ok(Some((offset, ts))) => {
                    let epoch = image.leader_epoch(name, p.partition_index).max(0);
                    out.with_offset(offset.0).with_timestamp(ts).with_leader_epoch(if version >= 4 {
                        epoch
                    } else {
                        -1
                    })
                }
                Ok(None) => out.with_offset(-1).with_timestamp(-1),
                Err(e) => {
                    log::error!("list offsets {name}-{}: {e}", p.partition_index);
                    out.with_error_code(ErrorCode::KafkaStorageError.code())
                }
            });
        }
        topics.push(ListOffsetsTopicResponse::default().with_name(t.name).with_partitions(parts));
    }
    let resp = ListOffsetsResponse::default().with_topics(topics);
    if version == 0 {
        // v0's offsets array (librdkafka with broker.version.fallback=0.9.0,
        // kafka-python api_version=(0, 10)): the one offset found.
        return Ok(Some(super::Outgoing::Frame(tidelog_protocol::legacy::encode_list_offsets_v0(cid, &resp))));
    }
    encode(ApiKey::ListOffsets, version, cid, &resp)
}

/// KIP-734 (timestamp -3): the record with the largest timestamp.
async fn max_timestamp(log: &partition::SharedLog) -> Result<Option<(Offset, i64)>, std::io::Error> {
    let max = log.borrow().max_timestamp_ms();
    if max < 0 {
        return Ok(None);
    }
    partition::offset_for_timestamp(log, max).await
}

pub async fn create_topics(shard: Rc<Shard>, version: i16, cid: i32, req: CreateTopicsRequest) -> Response {
    let image = shard.image();
    let mut results: Vec<CreatableTopicResult> = Vec::with_capacity(req.topics.len());
    let mut to_create = Vec::new();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut r = CreatableTopicResult::default().with_name(t.name.clone());
        let partitions = if t.num_partitions == -1 { shard.config.num_partitions } else { t.num_partitions };
        let rf =
            if t.replication_factor == -1 { shard.config.default_replication_factor } else { t.replication_factor };
        let mut configs = BTreeMap::new();
        let mut config_error = None;
        for c in &t.configs {
            let (k, v) = (c.name.to_string(), c.value.as_ref().map(|v| v.to_string()).unwrap_or_default());
            if let Err(e) = crate::topic_config::validate_topic_config(&k, &v) {
                config_error = Some(e);
            }
            configs.insert(k, v);
        }
        let error = if let Err(e) = validate_topic_name(&name) {
            Some((ErrorCode::InvalidTopicException, e))
        } else if image.topics.contains_key(&name) {
            Some((ErrorCode::TopicAlreadyExists, format!("topic '{name}' already exists")))
        } else if !t.assignments.is_empty() && !image.clustered() {
            Some((
                ErrorCode::InvalidReplicaAssignment,
                "manual replica assignment needs a cluster; on a single node give num_partitions".into(),
            ))
        } else if !t.assignments.is_empty() && (t.num_partitions != -1 || t.replication_factor != -1) {
            // Kafka: assignments exclude num_partitions and replication_factor.
            Some((
                ErrorCode::InvalidRequest,
                "give either assignments or num_partitions and replication_factor, not both (set them to -1)".into(),
            ))
        } else if t.assignments.is_empty() && (partitions <= 0 || partitions > 100_000) {
            Some((ErrorCode::InvalidPartitions, format!("num_partitions {partitions} must be between 1 and 100000")))
        } else if t.assignments.is_empty() && rf != 1 && !image.clustered() {
            Some((
                ErrorCode::InvalidReplicationFactor,
                format!("replication factor {rf} is larger than the 1 broker available: this broker runs as a single node (no process.roles), use replication factor 1 or start a cluster (see README)"),
            ))
        } else if t.assignments.is_empty() && rf < 1 {
            Some((ErrorCode::InvalidReplicationFactor, format!("replication factor {rf} must be at least 1")))
        } else {
            config_error.map(|e| (ErrorCode::InvalidConfig, e))
        };
        if let Some((code, msg)) = error {
            log::warn!("create topic {name:?}: {} ({msg})", code.name());
            results.push(r.with_error_code(code.code()).with_error_message(Some(str_bytes(&msg))));
            continue;
        }
        let assignments: Vec<Vec<i32>> = {
            let mut a: Vec<_> = t
                .assignments
                .iter()
                .map(|a| (a.partition_index, a.broker_ids.iter().map(|b| b.0).collect::<Vec<i32>>()))
                .collect();
            a.sort_by_key(|(p, _)| *p);
            if a.iter().enumerate().any(|(i, (p, _))| *p != i as i32) {
                let msg = "assignments must name partitions 0..n-1 once each".to_string();
                log::warn!("create topic {name:?}: {msg}");
                results.push(
                    r.with_error_code(ErrorCode::InvalidReplicaAssignment.code())
                        .with_error_message(Some(str_bytes(&msg))),
                );
                continue;
            }
            a.into_iter().map(|(_, b)| b).collect()
        };
        let (partitions, rf) = match assignments.first() {
            Some(first) => (assignments.len() as i32, first.len() as i16),
            None => (partitions, rf),
        };
        if version >= 5 {
            r = r.with_num_partitions(partitions).with_replication_factor(rf);
        }
        if req.validate_only {
            results.push(r);
        } else {
            to_create.push(NewTopic { name, partitions, replication_factor: rf, assignments, configs });
            results.push(r);
        }
    }
    if !to_create.is_empty() {
        for (name, outcome) in shard.create_topics(to_create).await {
            let Some(r) = results.iter_mut().find(|r| *r.name.0 == *name) else { continue };
            match outcome {
                Ok(meta) if version >= 5 => {
                    if version >= 7 {
                        r.topic_id = meta.uuid();
                    }
                    r.configs = Some(
                        super::configs::describe_topic(
                            &shard,
                            &shard.image(),
                            &meta,
                            super::configs::Want { version: 1, synonyms: false, doc: false },
                        )
                        .into_iter()
                        .map(|c| {
                            CreatableTopicConfigs::default()
                                .with_name(c.name)
                                .with_value(c.value)
                                .with_config_source(c.config_source)
                                .with_read_only(false)
                        })
                        .collect(),
                    );
                }
                Ok(_) => {}
                Err((code, msg)) => {
                    r.error_code = code.code();
                    r.error_message = Some(str_bytes(&msg));
                    if version >= 5 {
                        r.num_partitions = -1;
                        r.replication_factor = -1;
                    }
                }
            }
        }
    }
    encode(ApiKey::CreateTopics, version, cid, &CreateTopicsResponse::default().with_topics(results))
}

pub async fn delete_topics(shard: Rc<Shard>, version: i16, cid: i32, req: DeleteTopicsRequest) -> Response {
    let mut names: Vec<String> = req.topic_names.iter().map(|n| n.0.to_string()).collect();
    names.extend(req.topics.iter().filter_map(|t| t.name.as_ref().map(|n| n.0.to_string())));
    let outcomes = shard.delete_topics(names.clone()).await;
    let responses = names
        .iter()
        .map(|name| {
            let r = DeletableTopicResult::default().with_name(Some(TopicName(str_bytes(name))));
            match outcomes.iter().find(|(n, _)| n == name).map(|(_, o)| o) {
                Some(Ok(_)) => r,
                Some(Err((code, msg))) => {
                    let r = r.with_error_code(code.code());
                    if version >= 5 {
                        r.with_error_message(Some(str_bytes(msg)))
                    } else {
                        r
                    }
                }
                None => r.with_error_code(ErrorCode::UnknownServerError.code()),
            }
        })
        .collect();
    encode(ApiKey::DeleteTopics, version, cid, &DeleteTopicsResponse::default().with_responses(responses))
}
