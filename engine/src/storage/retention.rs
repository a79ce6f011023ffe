//! Retention: a background task per shard that deletes whole sealed
//! segments past `retention.ms` or beyond `retention.bytes` for topics whose
//! `cleanup.policy` includes `delete`.
//!
//! Shard-local: spawned on every shard after it starts, it only looks at the
//! logs that shard owns. Every `log.retention.check.interval.ms` it snapshots
//! each log's inactive segments (no borrow is held across an await), picks
//! the prefix to drop (`select`), and moves the log start offset with
//! `checkpoint::truncate_prefix`, which persists it and deletes the files on
//! the blocking pool. The active segment is never touched; offsets of the
//! remaining records never change. Pace: at most
//! `log.retention.segments.per.check.max` segments per shard per check, and
//! the task yields between partitions so produce and fetch keep running.

use std::rc::Rc;
use std::time::Duration;

use tidelog_protocol::Offset;

use super::checkpoint;
use super::partition::SegmentInfo;
use crate::shard::Shard;
use crate::topic_config;

/// How many leading segments of `segments` (inactive, oldest first) retention
/// deletes, and the new log start offset (time: newest record older than
/// `retention_ms`; size: as Kafka, only while the log stays at or above
/// `retention_bytes` without the segment). `total_bytes` is the whole log's
/// size including the active segment. Only sealed segments are eligible, and
/// deletion stops at the first one that is kept (the log stays contiguous).
pub fn select(
    segments: &[SegmentInfo],
    total_bytes: u64,
    now_ms: i64,
    retention_ms: i64,
    retention_bytes: i64,
    max_segments: usize,
) -> Option<(usize, Offset)> {
    let mut n = 0;
    let mut remaining = total_bytes;
    for s in segments.iter().take(max_segments) {
        if !s.sealed {
            break;
        }
        let too_old =
            retention_ms >= 0 && s.max_timestamp_ms >= 0 && now_ms.saturating_sub(s.max_timestamp_ms) > retention_ms;
        // Kafka's rule: drop a segment only if the log is still at least
        // retention.bytes without it.
        let too_big = retention_bytes >= 0 && remaining >= s.bytes && remaining - s.bytes >= retention_bytes as u64;
        if !(too_old || too_big) {
            break;
        }
        remaining -= s.bytes;
        n += 1;
    }
    if n == 0 {
        return None;
    }
    Some((n, segments[n - 1].next_offset))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One retention pass over every log of `shard`.
pub async fn check(shard: &Rc<Shard>) {
    let image = shard.image();
    let mut budget = shard.config.retention_segments_per_check_max;
    for (topic, partition, log) in shard.all_logs() {
        if budget == 0 {
            break;
        }
        let Some(meta) = image.topics.get(&topic) else { continue };
        if !topic_config::policy_has(&shard.config, &image, meta, "delete") {
            continue;
        }
        let retention_ms = topic_config::topic_i64(&shard.config, &image, meta, "retention.ms");
        let retention_bytes = topic_config::topic_i64(&shard.config, &image, meta, "retention.bytes");
        let picked = {
            let l = log.borrow();
            select(&l.inactive_segments(), l.stats().bytes, now_ms(), retention_ms, retention_bytes, budget)
        };
        let Some((n, new_start)) = picked else { continue };
        let why = format!("retention (retention.ms={retention_ms}, retention.bytes={retention_bytes})");
        match checkpoint::truncate_prefix(&log, new_start, &why).await {
            Ok(done) => {
                budget = budget.saturating_sub(n);
                shard.metrics.cleaner_add(|c| {
                    c.retention_segments_deleted += done.segments_deleted;
                    c.retention_bytes_deleted += done.bytes_deleted;
                });
            }
            Err(e) => log::error!(
                "shard {}: retention of {topic}-{partition} to offset {}: {e}; will retry next check",
                shard.id.0,
                new_start.0
            ),
        }
        glommio::yield_if_needed().await;
    }
}

/// The per-shard retention task; runs until the shard stops.
pub async fn run(shard: Rc<Shard>) {
    let interval = Duration::from_millis(shard.config.retention_check_interval_ms);
    loop {
        glommio::timer::sleep(interval).await;
        if shard.stopping.get() {
            return;
        }
        check(&shard).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: i64, next: i64, bytes: u64, ts: i64) -> SegmentInfo {
        SegmentInfo {
            base_offset: Offset(base),
            next_offset: Offset(next),
            bytes,
            max_timestamp_ms: ts,
            first_timestamp_ms: -1,
            sealed: true,
        }
    }

    #[test]
    fn time_retention_deletes_old_prefix_only() {
        let segs = [seg(0, 10, 100, 1_000), seg(10, 20, 100, 2_000), seg(20, 30, 100, 9_000)];
        // now 10_000, retention 5_000: segments with newest record before 5_000 go.
        assert_eq!(select(&segs, 400, 10_000, 5_000, -1, 100), Some((2, Offset(20))));
        // A newer segment stops the prefix even if a later one is old.
        let mixed = [seg(0, 10, 100, 9_000), seg(10, 20, 100, 1_000)];
        assert_eq!(select(&mixed, 300, 10_000, 5_000, -1, 100), None);
        // -1 keeps forever.
        assert_eq!(select(&segs, 400, 10_000, -1, -1, 100), None);
    }

    #[test]
    fn size_retention_keeps_the_log_at_or_under_the_limit() {
        let segs = [seg(0, 10, 100, 1), seg(10, 20, 100, 1), seg(20, 30, 100, 1)];
        // As Kafka: a segment goes only if the log stays at least at the
        // limit without it. 400 bytes in all (100 active).
        assert_eq!(select(&segs, 400, 0, -1, 250, 100), Some((1, Offset(10))));
        assert_eq!(select(&segs, 400, 0, -1, 300, 100), Some((1, Offset(10))));
        assert_eq!(select(&segs, 400, 0, -1, 200, 100), Some((2, Offset(20))));
        assert_eq!(select(&segs, 400, 0, -1, 400, 100), None);
        // Pace limit.
        assert_eq!(select(&segs, 400, 0, -1, 0, 1), Some((1, Offset(10))));
    }

    #[test]
    fn unsealed_segments_are_never_selected() {
        let mut segs = [seg(0, 10, 100, 1), seg(10, 20, 100, 1)];
        segs[0].sealed = false;
        assert_eq!(select(&segs, 300, 1_000_000, 1, 0, 100), None);
    }
}
