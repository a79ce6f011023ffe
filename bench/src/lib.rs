//! tidelog-bench: a Kafka-protocol load generator with latency percentile
//! reports and plots. It speaks the Kafka protocol to any compatible broker
//! through its own client on `tidelog-protocol` (no librdkafka), one pinned
//! thread per producer and consumer.
//!
//! Modules, bottom up: `murmur2` (Kafka's partitioner), `records` (batch
//! encode/decode, compression), `client` (connections, setup calls),
//! `group` (consumer-group membership and assignment), `stats` (histograms,
//! pacing), `producer`/`consumer` (worker threads), `run` (orchestration),
//! `report`/`svg` (outputs), `txn` (transactional against idempotent
//! produce, its own runner and report), `baseline`/`host` (what a result is a ratio of),
//! `efficiency` (the broker's CPU time and bytes written per byte produced).

pub mod baseline;
pub mod client;
pub mod consumer;
pub mod efficiency;
pub mod group;
pub mod hiccup;
pub mod host;
pub mod murmur2;
pub mod producer;
pub mod records;
pub mod report;
pub mod run;
pub mod stats;
pub mod svg;
pub mod txn;
pub mod util;
pub mod workload;
