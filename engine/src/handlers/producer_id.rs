//! InitProducerId for idempotent producers (transactional ones go to the
//! transaction coordinator, `handlers::txn`), and the shard task that
//! snapshots producer state.
//!
//! Runs on the shard that received the request: ids come from that shard's
//! own range (`PidAllocator`), so no other core is asked.

use std::rc::Rc;
use std::time::Duration;

use tidelog_protocol::messages::{self, ApiKey, InitProducerIdRequest, InitProducerIdResponse};
use tidelog_protocol::ErrorCode;

use super::{encode, Response};
use crate::shard::Shard;
use crate::storage::producer_state;

/// How often dirty producer state is snapshotted (bounds the log scanned
/// at recovery after a crash).
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);

pub async fn init_producer_id(shard: Rc<Shard>, version: i16, cid: i32, req: InitProducerIdRequest) -> Response {
    let resp = InitProducerIdResponse::default().with_producer_id(messages::ProducerId(-1)).with_producer_epoch(-1);
    if let Some(id) = req.transactional_id.as_ref().filter(|t| !t.0.is_empty()) {
        let expected = (version >= 3 && req.producer_id.0 >= 0).then_some((req.producer_id.0, req.producer_epoch));
        return super::txn::init_producer_id_transactional(
            shard,
            version,
            cid,
            id.0.to_string(),
            req.transaction_timeout_ms,
            expected,
        )
        .await;
    }
    // KIP-360 (v3+): an idempotent producer may ask to bump its epoch.
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        let resp = resp.with_producer_id(req.producer_id).with_producer_epoch(req.producer_epoch + 1);
        log::info!("InitProducerId: producer {} bumped to epoch {}", req.producer_id.0, req.producer_epoch + 1);
        return encode(ApiKey::InitProducerId, version, cid, &resp);
    }
    let resp = match shard.producer_ids.allocate().await {
        Ok(pid) => {
            log::debug!("InitProducerId: new producer id {} on shard {}", pid.0, shard.id.0);
            resp.with_producer_id(messages::ProducerId(pid.0)).with_producer_epoch(0)
        }
        Err(e) => {
            log::error!("InitProducerId: cannot reserve producer ids: {e}");
            resp.with_error_code(ErrorCode::KafkaStorageError.code())
        }
    };
    encode(ApiKey::InitProducerId, version, cid, &resp)
}

/// Snapshots the producer state of every log of the shard that changed and
/// is fully durable.
pub async fn snapshot_all(shard: &Rc<Shard>) {
    let expiration_ms = shard
        .config
        .values
        .get("producer.id.expiration.ms")
        .and_then(|(v, _)| v.parse::<i64>().ok())
        .unwrap_or(86_400_000);
    let now = crate::groups::now_ms();
    for (topic, p, log) in shard.all_logs() {
        log.borrow_mut().producers.expire(now, expiration_ms);
        if let Err(e) = producer_state::snapshot(&log).await {
            log::warn!("{topic}-{p}: cannot write the producer state snapshot: {e}");
        }
    }
}

pub async fn run_snapshots(shard: Rc<Shard>) {
    while !shard.stopping.get() {
        glommio::timer::sleep(SNAPSHOT_INTERVAL).await;
        snapshot_all(&shard).await;
    }
}
