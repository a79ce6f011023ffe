//! Fetch: sessionless, long-polling reads of durable data.
//!
//! Limits as Kafka applies them: `partition_max_bytes` per partition,
//! `max_bytes` for the response, and at least one whole batch from the first
//! partition that has data even if it is larger than both (KIP-74), so a
//! client always makes progress. Waits up to `max_wait_ms` for `min_bytes`,
//! woken whenever a high watermark on this shard moves.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tidelog_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use tidelog_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
use tidelog_protocol::ErrorCode;

use super::{encode, Response};
use crate::shard::Shard;
use crate::storage::partition;

pub async fn fetch(shard: Rc<Shard>, version: i16, cid: i32, req: FetchRequest) -> Response {
    let max_wait = Duration::from_millis(req.max_wait_ms.max(0) as u64)
        .min(Duration::from_millis(shard.config.fetch_max_wait_ms_max));
    let deadline = Instant::now() + max_wait;
    let min_bytes = req.min_bytes.max(0) as usize;
    let max_bytes = if req.max_bytes <= 0 { i32::MAX as usize } else { req.max_bytes as usize };
    loop {
        let notified = shard.hw_notify.notified();
        let (resp, bytes, any_error) = collect(&shard, version, &req, max_bytes).await;
        let now = Instant::now();
        if bytes >= min_bytes || any_error || now >= deadline || bytes >= max_bytes {
            return encode(ApiKey::Fetch, version, cid, &resp);
        }
        let _ = glommio::timer::timeout(deadline - now, async {
            notified.await;
            Ok(())
        })
        .await;
    }
}

async fn collect(
    shard: &Rc<Shard>,
    version: i16,
    req: &FetchRequest,
    max_bytes: usize,
) -> (FetchResponse, usize, bool) {
    let image = shard.image();
    let mut total = 0usize;
    let mut any_error = false;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let name: &str = &t.topic.0;
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let mut out = PartitionData::default().with_partition_index(p.partition).with_records(Some(Bytes::new()));
            let code = match image.owner(name, p.partition) {
                None => Some(ErrorCode::UnknownTopicOrPartition),
                Some(owner) if owner != shard.id => Some(ErrorCode::NotLeaderOrFollower),
                Some(_) => None,
            };
            let log = if code.is_none() { shard.log(name, p.partition) } else { None };
            let Some(log) = log else {
                any_error = true;
                parts.push(
                    out.with_error_code(code.unwrap_or(ErrorCode::LeaderNotAvailable).code()).with_high_watermark(-1),
                );
                continue;
            };
            let (hw, leo, start) = {
                let l = log.borrow();
                (l.high_watermark, l.log_end_offset(), l.log_start_offset)
            };
            out = out.with_high_watermark(hw.0).with_last_stable_offset(hw.0);
            if version >= 5 {
                out = out.with_log_start_offset(start.0);
            }
            let offset = tidelog_protocol::Offset(p.fetch_offset);
            if offset < start || offset > leo {
                log::info!("fetch {name}-{}: offset {} out of range [{}, {}]", p.partition, offset.0, start.0, leo.0);
                any_error = true;
                parts.push(out.with_error_code(ErrorCode::OffsetOutOfRange.code()));
                continue;
            }
            let budget = (p.partition_max_bytes.max(0) as usize).min(max_bytes.saturating_sub(total));
            let at_least_one = total == 0;
            if budget == 0 && !at_least_one {
                parts.push(out);
                continue;
            }
            match partition::read(&log, offset, budget, at_least_one).await {
                Ok(r) => {
                    total += r.bytes;
                    let records = match r.chunks.len() {
                        0 => Bytes::new(),
                        1 => r.chunks.into_iter().next().unwrap_or_default(),
                        _ => {
                            let mut b = BytesMut::with_capacity(r.bytes);
                            for c in &r.chunks {
                                b.extend_from_slice(c);
                            }
                            b.freeze()
                        }
                    };
                    parts.push(out.with_records(Some(records)));
                }
                Err(e) => {
                    log::error!("fetch {name}-{} at offset {}: read failed: {e}", p.partition, offset.0);
                    any_error = true;
                    parts.push(out.with_error_code(ErrorCode::KafkaStorageError.code()));
                }
            }
        }
        topics.push(
            FetchableTopicResponse::default()
                .with_topic(t.topic.clone())
                .with_topic_id(t.topic_id)
                .with_partitions(parts),
        );
    }
    (FetchResponse::default().with_session_id(0).with_responses(topics), total, any_error)
}
