//! Request dispatch: decodes a request body and returns the future that
//! produces its encoded response.
//!
//! Runs on the shard that accepted the connection. `dispatch` itself does the
//! synchronous part of a request (for Produce: validation and the append, so
//! offsets follow request order on the connection); the returned future does
//! whatever waits (durability, long poll, the controller).

mod admin;
mod configs;
mod fetch;
mod groups;
mod partitions;
mod produce;
pub mod producer_id;
mod replicas;
mod txn;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use tidelog_protocol::header::encode_response;
use tidelog_protocol::messages::{ApiKey, RequestHeader};
use tidelog_protocol::request::{decode_request, Request};
use tidelog_protocol::{api, Encodable, StrBytes};

use crate::shard::Shard;

/// An encoded response frame, `None` for no response (acks=0), or an error
/// that closes the connection.
pub type Response = Result<Option<Outgoing>, String>;

/// A response ready to send.
pub enum Outgoing {
    /// A whole frame in one buffer.
    Frame(BytesMut),
    /// A Fetch response: inline header pieces interleaved with record data
    /// from memory or from segment files (see `fetch`).
    Parts(Vec<OutPart>),
}

/// One piece of an `Outgoing::Parts` response.
pub use crate::sendpool::Piece as OutPart;

/// Produce's validation layer without a shard, for the fuzzer (fuzz/).
pub use produce::{validate_only as produce_validate_only, Verdict as ProduceVerdict};

pub type Pending = Pin<Box<dyn Future<Output = Response>>>;

/// Why a request closes its connection instead of getting a response.
#[derive(Debug)]
pub struct Reject(pub String);

pub fn encode<M: Encodable>(key: ApiKey, version: i16, correlation_id: i32, body: &M) -> Response {
    encode_response(key, version, correlation_id, body, version)
        .map(|b| Some(Outgoing::Frame(b)))
        .map_err(|e| format!("cannot encode {key:?} v{version} response: {e}"))
}

pub fn ready(r: Response) -> Pending {
    Box::pin(std::future::ready(r))
}

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Routes one request and times it (request count and latency by API, in
/// the shard's metrics). `Err` closes the connection (after logging).
pub fn dispatch(
    shard: &Rc<Shard>,
    peer: std::net::SocketAddr,
    key: ApiKey,
    header: &RequestHeader,
    body: Bytes,
) -> Result<Pending, Reject> {
    let started = std::time::Instant::now();
    let pending = route(shard, peer, key, header, body)?;
    let shard = shard.clone();
    Ok(Box::pin(async move {
        let r = pending.await;
        shard.metrics.request(key, started.elapsed());
        r
    }))
}

fn route(
    shard: &Rc<Shard>,
    peer: std::net::SocketAddr,
    key: ApiKey,
    header: &RequestHeader,
    mut body: Bytes,
) -> Result<Pending, Reject> {
    let version = header.request_api_version;
    let cid = header.correlation_id;
    if !api::is_supported(key as i16, version) {
        if key == ApiKey::ApiVersions {
            // KIP-511: answer in v0 so the client can retry with a version we know.
            let resp = api::api_versions_unsupported_response();
            return Ok(ready(
                encode_response(key, 0, cid, &resp, 0).map(|b| Some(Outgoing::Frame(b))).map_err(|e| e.to_string()),
            ));
        }
        return Err(Reject(match api::supported(key as i16) {
            Some(s) => {
                format!("{key:?} v{version} is not supported (supported: v{}-v{})", s.min_version, s.max_version)
            }
            None => format!("{key:?} (api key {}) is not implemented", key as i16),
        }));
    }
    // Produce takes the frame back once decoded (see `produce::FrameCutter`).
    let frame = (key == ApiKey::Produce).then(|| body.clone());
    let req = decode_request(key, version, &mut body).map_err(|e| Reject(e.to_string()))?;
    drop(body);
    // OffsetCommit v0-v1 and OffsetFetch v0 are answered exactly as the
    // first version the decoder reads (see `legacy::answer_version`).
    let version = tidelog_protocol::legacy::answer_version(key, version);
    Ok(match req {
        Request::ApiVersions(_) => ready(encode(key, version, cid, &api::api_versions_response())),
        Request::Metadata(req) => Box::pin(admin::metadata(shard.clone(), version, cid, req)),
        Request::Produce(req) => {
            // The handler cuts the record sets out of the frame in place;
            // nothing else may hold on to it (see `produce::FrameCutter`).
            produce::produce(shard, version, cid, req, frame.unwrap_or_default())
        }
        Request::Fetch(req) => Box::pin(fetch::fetch(shard.clone(), version, cid, req)),
        Request::ListOffsets(req) => Box::pin(admin::list_offsets(shard.clone(), version, cid, req)),
        Request::CreateTopics(req) => Box::pin(admin::create_topics(shard.clone(), version, cid, req)),
        Request::DeleteTopics(req) => Box::pin(admin::delete_topics(shard.clone(), version, cid, req)),
        Request::DescribeConfigs(req) => ready(configs::describe_configs(shard, version, cid, req)),
        Request::AlterConfigs(req) => Box::pin(configs::alter_configs(shard.clone(), version, cid, req)),
        Request::IncrementalAlterConfigs(req) => {
            Box::pin(configs::incremental_alter_configs(shard.clone(), version, cid, req))
        }
        Request::CreatePartitions(req) => Box::pin(partitions::create_partitions(shard.clone(), version, cid, req)),
        Request::DeleteRecords(req) => Box::pin(partitions::delete_records(shard.clone(), version, cid, req)),
        Request::DescribeCluster(req) => ready(partitions::describe_cluster(shard, version, cid, req)),
        Request::DescribeLogDirs(req) => Box::pin(partitions::describe_log_dirs(shard.clone(), version, cid, req)),
        Request::OffsetForLeaderEpoch(req) => ready(partitions::offset_for_leader_epoch(shard, version, cid, req)),
        Request::FindCoordinator(req) => ready(groups::find_coordinator(shard, version, cid, req)),
        Request::JoinGroup(req) => {
            let client_id = header.client_id.as_ref().map(|c| c.to_string()).unwrap_or_default();
            // Kafka reports a member's host as "/<ip>".
            let client_host = format!("/{}", peer.ip());
            Box::pin(groups::join_group(shard.clone(), version, cid, req, client_id, client_host))
        }
        Request::SyncGroup(req) => Box::pin(groups::sync_group(shard.clone(), version, cid, req)),
        Request::Heartbeat(req) => ready(groups::heartbeat(shard, version, cid, req)),
        Request::LeaveGroup(req) => Box::pin(groups::leave_group(shard.clone(), version, cid, req)),
        Request::OffsetCommit(req) => Box::pin(groups::offset_commit(shard.clone(), version, cid, req)),
        Request::OffsetFetch(req) => ready(groups::offset_fetch(shard, version, cid, req)),
        Request::ListGroups(req) => ready(groups::list_groups(shard, version, cid, req)),
        Request::DescribeGroups(req) => ready(groups::describe_groups(shard, version, cid, req)),
        Request::DeleteGroups(req) => Box::pin(groups::delete_groups(shard.clone(), version, cid, req)),
        Request::OffsetDelete(req) => Box::pin(groups::offset_delete(shard.clone(), version, cid, req)),
        Request::InitProducerId(req) => Box::pin(producer_id::init_producer_id(shard.clone(), version, cid, req)),
        Request::ElectLeaders(req) => Box::pin(replicas::elect_leaders(shard.clone(), version, cid, req)),
        Request::DescribeTopicPartitions(req) => ready(replicas::describe_topic_partitions(shard, version, cid, req)),
        Request::AlterPartitionReassignments(req) => {
            Box::pin(replicas::alter_partition_reassignments(shard.clone(), version, cid, req))
        }
        Request::ListPartitionReassignments(req) => {
            ready(replicas::list_partition_reassignments(shard, version, cid, req))
        }
        Request::AddPartitionsToTxn(req) => Box::pin(txn::add_partitions_to_txn(shard.clone(), version, cid, req)),
        Request::AddOffsetsToTxn(req) => Box::pin(txn::add_offsets_to_txn(shard.clone(), version, cid, req)),
        Request::EndTxn(req) => Box::pin(txn::end_txn(shard.clone(), version, cid, req)),
        Request::WriteTxnMarkers(req) => Box::pin(txn::write_txn_markers(shard.clone(), version, cid, req)),
        Request::TxnOffsetCommit(req) => Box::pin(groups::txn_offset_commit(shard.clone(), version, cid, req)),
        Request::DescribeTransactions(req) => ready(txn::describe_transactions(shard, version, cid, req)),
        Request::ListTransactions(req) => ready(txn::list_transactions(shard, version, cid, req)),
    })
}
