//! The partition-log operations replication uses, in one place.
//!
//! TEMPORARY: the storage primitives (follower append, truncation, epoch
//! cache, replication bound) are being added to `storage::partition`; until
//! they land these answer "unsupported" so the rest of the tree builds.

use std::io;

use bytes::Bytes;
use tidelog_protocol::batch::BatchInfo;
use tidelog_protocol::Offset;

use crate::storage::partition::SharedLog;

pub fn durable_end(log: &SharedLog) -> Offset {
    log.borrow().high_watermark
}

pub fn set_bound(_log: &SharedLog, _bound: Option<Offset>) {}

pub fn append_replicated(_log: &SharedLog, _records: &Bytes, _infos: &[BatchInfo]) -> Result<(Offset, Offset), String> {
    Err("follower append is not available yet".into())
}

pub async fn truncate_to(_log: &SharedLog, _offset: Offset) -> io::Result<()> {
    Err(io::Error::other("truncation is not available yet"))
}

pub fn latest_epoch(_log: &SharedLog) -> Option<i32> {
    None
}

pub fn epoch_end(_log: &SharedLog, _epoch: i32) -> Option<Offset> {
    None
}

pub async fn locate_for_replica(log: &SharedLog, offset: Offset) -> io::Result<crate::storage::partition::Located> {
    crate::storage::partition::locate(log, offset).await
}

pub fn epoch_end_for(_log: &SharedLog, _epoch: i32) -> Option<(i32, Offset)> {
    None
}
