//! Replication throttles, Kafka's reassignment quotas: a topic lists the
//! replicas to throttle (`leader.replication.throttled.replicas`,
//! `follower.replication.throttled.replicas`: `partition:broker,...` or
//! `*`), and each broker (here each shard, which is one broker id) spends
//! at most `leader.replication.throttled.rate` bytes a second serving them
//! to followers and `follower.replication.throttled.rate` fetching them.
//! Unlisted replicas are never slowed, so a reassignment's catch-up cannot
//! starve the ISR's own replication.
//!
//! Once a rate is spent, a follower leaves its throttled partitions out of
//! the next fetches, and a leader answers them with no records, until the
//! bucket refills (one second of the rate at most is banked).

use std::cell::Cell;
use std::time::Instant;

use crate::metadata::{MetadataImage, TopicMeta};
use crate::shard::Shard;

/// A token bucket of one rate (bytes per second), refilled on use.
#[derive(Debug)]
pub struct Bucket {
    tokens: Cell<f64>,
    at: Cell<Option<Instant>>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket { tokens: Cell::new(f64::MAX), at: Cell::new(None) }
    }
}

impl Bucket {
    fn refill(&self, rate: u64, now: Instant) {
        let cap = rate as f64;
        let tokens = match self.at.get() {
            Some(at) => (self.tokens.get() + now.saturating_duration_since(at).as_secs_f64() * cap).min(cap),
            None => cap,
        };
        self.tokens.set(tokens.min(cap));
        self.at.set(Some(now));
    }

    /// Whether the bucket is empty at `rate` (never when unlimited).
    pub fn spent(&self, rate: u64, now: Instant) -> bool {
        if rate >= i64::MAX as u64 {
            return false;
        }
        self.refill(rate, now);
        self.tokens.get() <= 0.0
    }

    /// Takes `bytes` out (it may go below zero: the next ones wait longer).
    pub fn take(&self, bytes: usize, rate: u64, now: Instant) {
        if rate >= i64::MAX as u64 || bytes == 0 {
            return;
        }
        self.refill(rate, now);
        self.tokens.set(self.tokens.get() - bytes as f64);
    }
}

/// Whether `list` (a throttled-replicas config) names `partition` on `broker`.
pub fn listed(list: &str, partition: i32, broker: i32) -> bool {
    let list = list.trim();
    list == "*"
        || list.split(',').any(|item| {
            item.split_once(':')
                .is_some_and(|(p, b)| p.trim().parse() == Ok(partition) && b.trim().parse() == Ok(broker))
        })
}

/// Which side of replication a throttle applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Leader,
    Follower,
}

impl Side {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Side::Leader => ("leader.replication.throttled.replicas", "leader.replication.throttled.rate"),
            Side::Follower => ("follower.replication.throttled.replicas", "follower.replication.throttled.rate"),
        }
    }
}

/// The rate (bytes/s) that throttles `partition` of `topic` on this shard's
/// `side` for the follower `replica`, or None when it is not throttled. As
/// in Kafka, an in-sync follower is never throttled: only replicas catching
/// up (a reassignment's new ones, a restarted node's) are.
pub fn rate_for(
    shard: &Shard,
    image: &MetadataImage,
    topic: &TopicMeta,
    partition: i32,
    side: Side,
    replica: i32,
) -> Option<u64> {
    let (list, rate) = side.names();
    // The lists are topic configs with no broker default: a topic without
    // one (the usual case) costs one map lookup on this per-fetch path.
    let replicas = topic.configs.get(list)?;
    if !listed(replicas, partition, shard.replication.my_broker()) {
        return None;
    }
    let rate = crate::topic_config::broker_value(&shard.config, image, rate)?.trim().parse::<u64>().ok()?;
    if rate >= i64::MAX as u64 {
        return None;
    }
    let in_sync = usize::try_from(partition)
        .ok()
        .and_then(|p| image.partition_state(topic, p))
        .is_some_and(|s| s.isr.contains(&replica));
    (!in_sync).then_some(rate)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lists_name_partition_broker_pairs_or_everything() {
        assert!(listed("*", 3, 1000));
        assert!(listed("0:1000, 3:1000", 3, 1000));
        assert!(!listed("0:1000,3:2000", 3, 1000));
        assert!(!listed("", 0, 1000));
    }

    #[test]
    fn a_bucket_spends_a_second_of_its_rate_then_refills() {
        let b = Bucket::default();
        let t = Instant::now();
        assert!(!b.spent(1000, t));
        b.take(600, 1000, t);
        assert!(!b.spent(1000, t));
        b.take(600, 1000, t);
        assert!(b.spent(1000, t), "1200 of 1000 taken");
        assert!(b.spent(1000, t + Duration::from_millis(150)), "-200 + 150");
        assert!(!b.spent(1000, t + Duration::from_millis(300)), "-200 + 300");
        // Idle time banks one second at most.
        assert!(!b.spent(1000, t + Duration::from_secs(60)));
        b.take(1001, 1000, t + Duration::from_secs(60));
        assert!(b.spent(1000, t + Duration::from_secs(60)));
        // Unlimited: never spent.
        b.take(1 << 40, u64::MAX, t);
        assert!(!b.spent(i64::MAX as u64, t));
    }
}
