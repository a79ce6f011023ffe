//! Produce: validate each partition's record set, append it on this shard,
//! answer per partition; acks=-1 waits for the high watermark.

use std::rc::Rc;
use std::time::{Duration, Instant};

use tidelog_protocol::batch::{self, BatchError};
use tidelog_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use tidelog_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse};
use tidelog_protocol::{Epoch, ErrorCode, Offset};

use super::{encode, ready, str_bytes, Pending};
use crate::shard::Shard;
use crate::storage::partition::SharedLog;
use crate::storage::producer_state::{self, BatchMeta, Check};

struct Waiting {
    topic: usize,
    partition: usize,
    log: SharedLog,
    last: Offset,
}

fn error_for(e: &BatchError) -> ErrorCode {
    match e {
        BatchError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        BatchError::BadMagic(_) => ErrorCode::UnsupportedForMessageFormat,
        _ => ErrorCode::CorruptMessage,
    }
}

pub fn produce(shard: &Rc<Shard>, version: i16, cid: i32, req: ProduceRequest) -> Pending {
    let acks = req.acks;
    let image = shard.image();
    let mut responses = Vec::with_capacity(req.topic_data.len());
    let mut waiting = Vec::new();
    for (ti, topic) in req.topic_data.into_iter().enumerate() {
        let name: &str = &topic.name.0;
        let topic_meta = image.topics.get(name);
        let max_bytes = topic_meta
            .and_then(|t| {
                usize::try_from(crate::topic_config::topic_i64(&shard.config, &image, t, "max.message.bytes")).ok()
            })
            .unwrap_or(shard.config.message_max_bytes);
        let mut parts = Vec::with_capacity(topic.partition_data.len());
        for (pi, p) in topic.partition_data.into_iter().enumerate() {
            let mut r = PartitionProduceResponse::default().with_index(p.index);
            let fail = |r: PartitionProduceResponse, code: ErrorCode, msg: String| {
                log::warn!("produce {name}-{}: {} ({msg})", p.index, code.name());
                shard.metrics.error(ApiKey::Produce, code.code());
                let r = r.with_error_code(code.code()).with_base_offset(-1);
                if version >= 8 {
                    r.with_error_message(Some(str_bytes(&msg)))
                } else {
                    r
                }
            };
            if !(acks == 0 || acks == 1 || acks == -1) {
                parts.push(fail(r, ErrorCode::InvalidRequiredAcks, format!("acks={acks} must be 0, 1 or -1")));
                continue;
            }
            if req.transactional_id.is_some() {
                parts.push(fail(r, ErrorCode::InvalidRequest, "transactions are not supported yet".into()));
                continue;
            }
            let owner = image.owner(name, p.index);
            match owner {
                None => {
                    let code = if topic_meta.is_none() && crate::metadata::validate_topic_name(name).is_err() {
                        ErrorCode::InvalidTopicException
                    } else {
                        ErrorCode::UnknownTopicOrPartition
                    };
                    parts.push(fail(r, code, format!("no partition {name}-{}", p.index)));
                    continue;
                }
                Some(o) if o != shard.id => {
                    shard.metrics.error(ApiKey::Produce, ErrorCode::NotLeaderOrFollower.code());
                    r = r.with_error_code(ErrorCode::NotLeaderOrFollower.code()).with_base_offset(-1);
                    parts.push(r);
                    continue;
                }
                Some(_) => {}
            }
            let Some(log) = shard.log(name, p.index) else {
                parts.push(fail(r, ErrorCode::LeaderNotAvailable, "partition is not open yet".into()));
                continue;
            };
            if acks == -1 {
                if let Err(msg) = crate::replication::Replication::check_min_isr(shard, &image, name, p.index) {
                    // Not `fail`: a producer retries this for as long as the
                    // ISR is short, so one warning per request would flood the log.
                    log::debug!("produce {msg}: NOT_ENOUGH_REPLICAS");
                    shard.metrics.error(ApiKey::Produce, ErrorCode::NotEnoughReplicas.code());
                    r = r.with_error_code(ErrorCode::NotEnoughReplicas.code()).with_base_offset(-1);
                    if version >= 8 {
                        r = r.with_error_message(Some(str_bytes(&msg)));
                    }
                    parts.push(r);
                    continue;
                }
            }
            let records = p.records.unwrap_or_default();
            let mut infos = match batch::validate_record_set(&records, max_bytes) {
                Ok(infos) => infos,
                Err(e) => {
                    parts.push(fail(r, error_for(&e), e.to_string()));
                    continue;
                }
            };
            if let Some(info) = infos.iter().find(|i| i.record_count == 0) {
                parts.push(fail(
                    r,
                    ErrorCode::CorruptMessage,
                    format!("empty record batch of {} bytes", info.size_bytes),
                ));
                continue;
            }
            // LogAppendTime topics: the broker's clock goes into each batch (and the response).
            let log_append_time = topic_meta.is_some_and(|t| {
                crate::topic_config::topic_value(&shard.config, &image, t, "message.timestamp.type") == "LogAppendTime"
            });
            let records = if log_append_time {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                let mut stamped = bytes::BytesMut::from(&records[..]);
                crate::storage::timestamps::stamp_log_append_time(&mut stamped, &mut infos, now_ms);
                r = r.with_log_append_time_ms(now_ms);
                stamped.freeze()
            } else {
                records
            };
            // Idempotent producers: Kafka's epoch and sequence checks before the append.
            let producer = match producer_state::idempotent_batch(&records, &infos) {
                Ok(p) => p,
                Err(msg) => {
                    parts.push(fail(r, ErrorCode::InvalidRecord, msg));
                    continue;
                }
            };
            if let Some(b) = &producer {
                let check = log.borrow().producers.check(b.pid, b.epoch, b.first_seq, b.count);
                match check {
                    Check::Append => {}
                    Check::Duplicate { base_offset, last_offset } => {
                        log::debug!(
                            "produce {name}-{}: producer {} seq {} is a retry of offsets {}..={}",
                            p.index,
                            b.pid.0,
                            b.first_seq,
                            base_offset.0,
                            last_offset.0
                        );
                        r = r.with_base_offset(base_offset.0);
                        if version >= 5 {
                            r = r.with_log_start_offset(log.borrow().log_start_offset.0);
                        }
                        if acks == -1 {
                            waiting.push(Waiting { topic: ti, partition: pi, log: log.clone(), last: last_offset });
                        }
                        parts.push(r);
                        continue;
                    }
                    Check::Reject(code) => {
                        let msg = format!("producer {} epoch {} sequence {}", b.pid.0, b.epoch, b.first_seq);
                        parts.push(fail(r, code, msg));
                        continue;
                    }
                }
            }
            let (first, last) = {
                let mut l = log.borrow_mut();
                let (first, last) = l.append(&records, &infos, Epoch(image.leader_epoch(name, p.index).max(0)));
                if let Some(b) = &producer {
                    let meta = BatchMeta {
                        first_seq: b.first_seq,
                        last_seq: producer_state::seq_add(b.first_seq, b.count - 1),
                        base_offset: first,
                        last_offset: last,
                    };
                    l.producers.record(b.pid, b.epoch, meta, b.max_timestamp_ms);
                }
                r = r.with_base_offset(first.0);
                if version >= 5 {
                    r = r.with_log_start_offset(l.log_start_offset.0);
                }
                (first, last)
            };
            // Counted once appended: rejected batches and retried duplicates are not "in".
            shard.metrics.produced(
                name,
                p.index,
                records.len() as u64,
                infos.iter().map(|i| i.record_count.max(0) as u64).sum(),
            );
            log::trace!("produce {name}-{}: offsets {}..={}", p.index, first.0, last.0);
            shard.mark_dirty(&log);
            if acks == -1 {
                waiting.push(Waiting { topic: ti, partition: pi, log, last });
            }
            parts.push(r);
        }
        responses.push(TopicProduceResponse::default().with_name(topic.name).with_partition_responses(parts));
    }
    if acks == 0 {
        return ready(Ok(None));
    }
    let resp = ProduceResponse::default().with_responses(responses);
    if waiting.is_empty() {
        return ready(encode(ApiKey::Produce, version, cid, &resp));
    }
    let timeout = Duration::from_millis(req.timeout_ms.max(0) as u64);
    let shard = shard.clone();
    Box::pin(async move {
        let mut resp = resp;
        let deadline = Instant::now() + timeout;
        loop {
            let notified = shard.hw_notify.notified();
            if waiting.iter().all(|w| w.log.borrow().high_watermark > w.last) {
                // Kafka: replicated to the ISR, but the ISR shrank below
                // min.insync.replicas meanwhile.
                let image = shard.image();
                for w in &waiting {
                    let short = {
                        let t = &resp.responses[w.topic];
                        let index = t.partition_responses[w.partition].index;
                        crate::replication::Replication::check_min_isr(&shard, &image, &t.name.0, index).err()
                    };
                    if let Some(msg) = short {
                        let p = &mut resp.responses[w.topic].partition_responses[w.partition];
                        p.error_code = ErrorCode::NotEnoughReplicasAfterAppend.code();
                        if version >= 8 {
                            p.error_message = Some(str_bytes(&msg));
                        }
                    }
                }
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                for w in waiting.iter().filter(|w| w.log.borrow().high_watermark <= w.last) {
                    let p = &mut resp.responses[w.topic].partition_responses[w.partition];
                    p.error_code = ErrorCode::RequestTimedOut.code();
                    if version >= 8 {
                        p.error_message =
                            Some(str_bytes("not durable within timeout_ms; the write will still complete"));
                    }
                }
                break;
            }
            let _ = glommio::timer::timeout(deadline - now, async {
                notified.await;
                Ok(())
            })
            .await;
        }
        encode(ApiKey::Produce, version, cid, &resp)
    })
}
