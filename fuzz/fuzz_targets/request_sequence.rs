//! Structure-aware: a sequence of whole, well-formed requests (Produce with
//! real record batches, idempotent or not, Fetch, Metadata, JoinGroup with a
//! consumer subscription, OffsetCommit, CreateTopics, ApiVersions, raw
//! bodies), built from `arbitrary` choices, encoded as a client would, then
//! optionally damaged (bytes flipped, the frame cut short) and fed, in
//! order, through the same path as `request`: length prefix, header,
//! `decode_request`, Produce's validation layer with producer state carried
//! across the sequence (so retries, sequence gaps and epoch bumps are
//! exercised). An undamaged frame must decode to exactly the request built.
//!
//! Not covered: the handlers' effects on a live shard (logs, groups,
//! replication, responses); see README.md for why there is no in-process
//! broker here.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use kafka_protocol::messages::{
    create_topics_request, fetch_request, join_group_request, metadata_request, offset_commit_request, produce_request,
    ApiKey, ApiVersionsRequest, BrokerId, CreateTopicsRequest, FetchRequest, GroupId, JoinGroupRequest,
    MetadataRequest, OffsetCommitRequest, ProduceRequest, RequestHeader, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use libfuzzer_sys::fuzz_target;
use tidelog_engine::storage::producer_state::ProducerStateTable;
use tidelog_protocol::batch::{self, ProducerFields, RecordRef};
use tidelog_protocol::request::Request;
use tidelog_protocol::{api, frame, header};

const TOPICS: &[&str] = &["orders", "t", "__consumer_offsets", "", "a.b_c-d"];

fn topic(i: u8) -> StrBytes {
    StrBytes::from_static_str(TOPICS[i as usize % TOPICS.len()])
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

type Configs = Vec<(String, Option<String>)>;
type RecordHeaders<'a> = Vec<(&'a [u8], Option<&'a [u8]>)>;

#[derive(Arbitrary, Debug)]
struct Record {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    timestamp_delta_ms: i8,
}

#[derive(Arbitrary, Debug)]
struct BatchSpec {
    records: Vec<Record>,
    base_timestamp_ms: i64,
    /// pid (small, so sequences collide), epoch, base sequence.
    producer: Option<(u8, i16, i32)>,
    /// Compression bits 0..7 written into the attributes (CRC kept valid).
    compression: u8,
    /// Flip byte `at` (mod the batch length) with `xor`; refresh the CRC after when `fix_crc`.
    damage: Option<(u16, u8, bool)>,
}

#[derive(Arbitrary, Debug)]
struct Partition {
    index: i32,
    batches: Option<Vec<BatchSpec>>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Produce {
        acks: i8,
        transactional: bool,
        timeout_ms: i32,
        topics: Vec<(u8, Vec<Partition>)>,
    },
    Fetch {
        max_wait_ms: i32,
        min_bytes: i32,
        replica_id: i32,
        partitions: Vec<(u8, i32, i64, i32, i32)>,
    },
    Metadata {
        topics: Option<Vec<u8>>,
        auto_create: bool,
    },
    JoinGroup {
        group: String,
        member: String,
        session_timeout_ms: i32,
        subscriptions: Vec<(String, Vec<u8>)>,
    },
    OffsetCommit {
        group: String,
        generation: i32,
        member: String,
        offsets: Vec<(u8, i32, i64, Option<String>)>,
    },
    CreateTopics {
        /// topic, partitions, replication factor, configs
        topics: Vec<(u8, i32, i16, Configs)>,
        validate_only: bool,
    },
    ApiVersions,
    /// Any supported API (by table index) with an arbitrary body.
    Raw {
        api: u8,
        body: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Framed {
    step: Step,
    /// Picks the version within the API's supported range.
    version: u8,
    correlation_id: i32,
    client_id: Option<String>,
    /// Bytes flipped in the encoded frame (position mod its length, xor).
    flips: Vec<(u16, u8)>,
    cut_to: Option<u16>,
}

fn build_batch(spec: &BatchSpec) -> Vec<u8> {
    let headers: Vec<RecordHeaders<'_>> =
        spec.records.iter().map(|r| r.headers.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect()).collect();
    let refs: Vec<RecordRef<'_>> = spec
        .records
        .iter()
        .zip(&headers)
        .map(|(r, h)| RecordRef {
            key: r.key.as_deref(),
            value: r.value.as_deref(),
            headers: h,
            timestamp_delta_ms: r.timestamp_delta_ms as i64,
        })
        .collect();
    let producer = match spec.producer {
        Some((pid, epoch, seq)) => {
            ProducerFields { producer_id: pid as i64, producer_epoch: epoch, base_sequence: seq }
        }
        None => ProducerFields::default(),
    };
    let mut b = batch::build_batch(&refs, spec.base_timestamp_ms, producer).to_vec();
    let fix_crc = |b: &mut Vec<u8>| {
        let crc = crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    };
    if spec.compression & 7 != 0 {
        b[22] = (b[22] & !7) | (spec.compression & 7);
        fix_crc(&mut b);
    }
    if let Some((at, xor, refresh)) = spec.damage {
        let at = at as usize % b.len();
        b[at] ^= xor;
        if refresh && b.len() > 21 {
            fix_crc(&mut b);
        }
    }
    b
}

fn crc32c(bytes: &[u8]) -> u32 {
    // CRC-32C (Castagnoli), bitwise: the fuzz crate needs no extra dependency.
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// The request and its API key; `None` when the step cannot be encoded.
fn build(step: &Step) -> Option<(ApiKey, Request)> {
    Some(match step {
        Step::Produce { acks, transactional, timeout_ms, topics } => {
            let topic_data = topics
                .iter()
                .take(8)
                .map(|(t, parts)| {
                    produce_request::TopicProduceData::default().with_name(TopicName(topic(*t))).with_partition_data(
                        parts
                            .iter()
                            .take(8)
                            .map(|p| {
                                let records = p.batches.as_ref().map(|bs| {
                                    Bytes::from(bs.iter().take(4).flat_map(build_batch).collect::<Vec<u8>>())
                                });
                                produce_request::PartitionProduceData::default()
                                    .with_index(p.index)
                                    .with_records(records)
                            })
                            .collect(),
                    )
                })
                .collect();
            let req = ProduceRequest::default()
                .with_acks(*acks as i16)
                .with_timeout_ms(*timeout_ms)
                .with_transactional_id(transactional.then(|| s("tx")).map(Into::into))
                .with_topic_data(topic_data);
            (ApiKey::Produce, Request::Produce(req))
        }
        Step::Fetch { max_wait_ms, min_bytes, replica_id, partitions } => {
            let topics = partitions
                .iter()
                .take(16)
                .map(|(t, p, offset, epoch, max_bytes)| {
                    fetch_request::FetchTopic::default().with_topic(TopicName(topic(*t))).with_partitions(vec![
                        fetch_request::FetchPartition::default()
                            .with_partition(*p)
                            .with_fetch_offset(*offset)
                            .with_current_leader_epoch(*epoch)
                            .with_partition_max_bytes(*max_bytes),
                    ])
                })
                .collect();
            let req = FetchRequest::default()
                .with_replica_id(BrokerId(*replica_id))
                .with_max_wait_ms(*max_wait_ms)
                .with_min_bytes(*min_bytes)
                .with_topics(topics);
            (ApiKey::Fetch, Request::Fetch(req))
        }
        Step::Metadata { topics, auto_create } => {
            let topics = topics.as_ref().map(|ts| {
                ts.iter()
                    .take(16)
                    .map(|t| metadata_request::MetadataRequestTopic::default().with_name(Some(TopicName(topic(*t)))))
                    .collect()
            });
            let req = MetadataRequest::default().with_topics(topics).with_allow_auto_topic_creation(*auto_create);
            (ApiKey::Metadata, Request::Metadata(req))
        }
        Step::JoinGroup { group, member, session_timeout_ms, subscriptions } => {
            let protocols = subscriptions
                .iter()
                .take(4)
                .map(|(name, topics)| {
                    // ConsumerProtocolSubscription v0: version, topics, user data.
                    let mut meta = Vec::new();
                    meta.extend_from_slice(&0i16.to_be_bytes());
                    meta.extend_from_slice(&(topics.len() as i32).to_be_bytes());
                    for t in topics {
                        let t = TOPICS[*t as usize % TOPICS.len()];
                        meta.extend_from_slice(&(t.len() as i16).to_be_bytes());
                        meta.extend_from_slice(t.as_bytes());
                    }
                    meta.extend_from_slice(&(-1i32).to_be_bytes());
                    join_group_request::JoinGroupRequestProtocol::default()
                        .with_name(s(name))
                        .with_metadata(Bytes::from(meta))
                })
                .collect();
            let req = JoinGroupRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_member_id(s(member))
                .with_session_timeout_ms(*session_timeout_ms)
                .with_protocol_type(s("consumer"))
                .with_protocols(protocols);
            (ApiKey::JoinGroup, Request::JoinGroup(req))
        }
        Step::OffsetCommit { group, generation, member, offsets } => {
            let topics = offsets
                .iter()
                .take(16)
                .map(|(t, p, offset, meta)| {
                    offset_commit_request::OffsetCommitRequestTopic::default()
                        .with_name(TopicName(topic(*t)))
                        .with_partitions(vec![offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(*p)
                            .with_committed_offset(*offset)
                            .with_committed_metadata(meta.as_deref().map(s))])
                })
                .collect();
            let req = OffsetCommitRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_generation_id_or_member_epoch(*generation)
                .with_member_id(s(member))
                .with_topics(topics);
            (ApiKey::OffsetCommit, Request::OffsetCommit(req))
        }
        Step::CreateTopics { topics, validate_only } => {
            let topics = topics
                .iter()
                .take(8)
                .map(|(t, partitions, rf, configs)| {
                    create_topics_request::CreatableTopic::default()
                        .with_name(TopicName(topic(*t)))
                        .with_num_partitions(*partitions)
                        .with_replication_factor(*rf)
                        .with_configs(
                            configs
                                .iter()
                                .take(8)
                                .map(|(k, v)| {
                                    create_topics_request::CreatableTopicConfig::default()
                                        .with_name(s(k))
                                        .with_value(v.as_deref().map(s))
                                })
                                .collect(),
                        )
                })
                .collect();
            let req = CreateTopicsRequest::default().with_topics(topics).with_validate_only(*validate_only);
            (ApiKey::CreateTopics, Request::CreateTopics(req))
        }
        Step::ApiVersions => (ApiKey::ApiVersions, Request::ApiVersions(ApiVersionsRequest::default())),
        Step::Raw { .. } => return None,
    })
}

fn encode_body(req: &Request, version: i16, out: &mut bytes::BytesMut) -> bool {
    match req {
        Request::Produce(r) => r.encode(out, version).is_ok(),
        Request::Fetch(r) => r.encode(out, version).is_ok(),
        Request::Metadata(r) => r.encode(out, version).is_ok(),
        Request::JoinGroup(r) => r.encode(out, version).is_ok(),
        Request::OffsetCommit(r) => r.encode(out, version).is_ok(),
        Request::CreateTopics(r) => r.encode(out, version).is_ok(),
        Request::ApiVersions(r) => r.encode(out, version).is_ok(),
        _ => false,
    }
}

fuzz_target!(|steps: Vec<Framed>| {
    let mut producers = ProducerStateTable::default();
    for f in steps.iter().take(16) {
        let (key, built) = match (&f.step, build(&f.step)) {
            (_, Some((key, req))) => (key, Some(req)),
            (Step::Raw { api: i, .. }, None) => {
                (api::SUPPORTED_APIS[*i as usize % api::SUPPORTED_APIS.len()].key, None)
            }
            _ => continue,
        };
        let Some(support) = api::supported(key as i16) else { continue };
        let span = (support.max_version - support.min_version + 1) as u8;
        let version = support.min_version + (f.version % span) as i16;
        let req_header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(f.correlation_id)
            .with_client_id(f.client_id.as_deref().map(s));
        let mut frame = bytes::BytesMut::new();
        frame.extend_from_slice(&[0; 4]);
        if req_header.encode(&mut frame, key.request_header_version(version)).is_err() {
            continue;
        }
        match (&built, &f.step) {
            (Some(req), _) => {
                if !encode_body(req, version, &mut frame) {
                    continue;
                }
            }
            (None, Step::Raw { body, .. }) => frame.extend_from_slice(body),
            _ => continue,
        }
        let len = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let mut frame = frame.to_vec();
        let whole_bytes = frame.len();
        for (at, xor) in f.flips.iter().take(8) {
            let at = *at as usize % frame.len();
            frame[at] ^= xor;
        }
        if let Some(cut) = f.cut_to {
            frame.truncate(cut as usize);
        }
        let damaged = f.flips.iter().take(8).any(|(_, x)| *x != 0) || frame.len() < whole_bytes;
        if frame.len() < 4 {
            continue;
        }
        let prefix = [frame[0], frame[1], frame[2], frame[3]];
        let Ok(n) = frame::frame_len(prefix, 100 << 20) else { continue };
        let Some(body) = frame.get(4..4 + n) else { continue };
        let decoded = tidelog_fuzz::request_frame(body, &mut producers);
        if let (false, Some(req)) = (damaged, &built) {
            let decoded =
                decoded.unwrap_or_else(|e| panic!("{key:?} v{version}: a well-formed frame was refused: {e}"));
            // Compared encoded: fields a version does not carry are dropped on the wire.
            let (mut a, mut b) = (bytes::BytesMut::new(), bytes::BytesMut::new());
            assert!(encode_body(&decoded, version, &mut a), "{key:?} v{version}: decoded request does not encode");
            assert!(encode_body(req, version, &mut b));
            assert_eq!(a, b, "{key:?} v{version} did not decode to what was encoded");
        }
        let _ = header::request_prefix(body);
    }
});
