//! The partition-log operations replication uses, in one place, so the
//! rest of this module reads in replication's terms.

use std::io;

use bytes::Bytes;
use tidelog_protocol::batch::BatchInfo;
use tidelog_protocol::{Epoch, Offset};

use crate::storage::partition::{self, Located, ReadLimit, SharedLog};

/// End of the fdatasync'd log: what a follower reports as replicated.
pub fn durable_end(log: &SharedLog) -> Offset {
    log.borrow().durable_end
}

pub fn set_bound(log: &SharedLog, bound: Option<Offset>) {
    log.borrow_mut().set_replication_bound(bound);
}

pub fn append_replicated(log: &SharedLog, records: &Bytes, infos: &[BatchInfo]) -> Result<(Offset, Offset), String> {
    log.borrow_mut().append_replicated(records, infos).map_err(|e| e.to_string())
}

pub async fn truncate_to(log: &SharedLog, offset: Offset) -> io::Result<()> {
    partition::truncate_to(log, offset).await
}

/// Empties the log and restarts it at `start` (the leader's log start is
/// past everything this follower has).
pub async fn restart_at(log: &SharedLog, start: Offset) -> io::Result<()> {
    partition::truncate_fully(log, start).await
}

pub fn latest_epoch(log: &SharedLog) -> Option<i32> {
    log.borrow().epochs.latest_epoch().map(|e| e.0)
}

/// Where `epoch` (or the largest epoch below it) ends on this log (Kafka's
/// `endOffsetForEpoch`: `None` for an epoch newer than the latest).
pub fn epoch_end_for(log: &SharedLog, epoch: i32) -> Option<(i32, Offset)> {
    log.borrow().end_offset_for_epoch(Epoch(epoch)).map(|(e, o)| (e.0, o))
}

/// `epoch_end_for` as a leader answers it: an epoch newer than the latest
/// entry gets the latest, ending at the log end.
pub fn leader_epoch_end_for(log: &SharedLog, epoch: i32) -> Option<(i32, Offset)> {
    let latest = log.borrow().epochs.latest_epoch();
    match latest {
        Some(latest) if epoch >= 0 && latest.0 < epoch => Some((latest.0, log.borrow().log_end_offset())),
        _ => epoch_end_for(log, epoch),
    }
}

pub async fn locate_for_replica(log: &SharedLog, offset: Offset) -> io::Result<Located> {
    partition::locate_with(log, offset, ReadLimit::DurableEnd).await
}

/// Validated whole batches of a fetched record set (a cut-off last batch
/// is left for the next fetch; compacted batches are accepted).
pub fn replica_batches(records: &Bytes) -> Result<(Bytes, Vec<BatchInfo>), String> {
    partition::replica_record_set(records, usize::MAX).map_err(|e| e.to_string())
}
