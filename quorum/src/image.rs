//! The cluster image: what the metadata log says the cluster is, and the
//! records that change it.
//!
//! Plain data, no I/O. Every node's state machine holds one `ClusterImage`
//! and applies committed `MetadataCommand`s to it with `ClusterImage::apply`,
//! which must be deterministic (no clocks, no randomness: ids and incarnations
//! come inside the command) so every replica of the log ends in the same
//! image.
//!
//! Ids: a node is one tidelog process (`node.id`, 0..=999). Each of its
//! shards is a Kafka broker to clients with broker id
//! `node.id * 1000 + shard` (`broker_id`), so a single node with node.id 0
//! keeps broker ids 0..num.shards as before, and node 2's shard 0 is broker 2000.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Broker ids of one node are `node_id * BROKER_IDS_PER_NODE + shard`.
pub const BROKER_IDS_PER_NODE: i32 = 1000;

/// The broker id of `shard` on `node`.
pub fn broker_id(node: u32, shard: u32) -> i32 {
    node as i32 * BROKER_IDS_PER_NODE + shard as i32
}

/// (node, shard) of a broker id.
pub fn split_broker_id(broker: i32) -> (u32, u32) {
    ((broker / BROKER_IDS_PER_NODE) as u32, (broker % BROKER_IDS_PER_NODE) as u32)
}

/// A registered node (all of its shards).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRegistration {
    pub node_id: u32,
    /// Random id of this process run; a restart registers a new one.
    pub incarnation: String,
    /// Advertised client host; shard i listens on `port + i`.
    pub host: String,
    pub port: u16,
    pub num_shards: u32,
    /// `broker.rack`, or None (then the node is its own rack).
    pub rack: Option<String>,
    /// Fenced: missed heartbeats or shut down. A fenced node leads nothing
    /// and is not advertised to clients.
    pub fenced: bool,
}

/// One partition's replication state (KRaft's PartitionRecord).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionImage {
    /// Broker ids, preferred leader first. Never two shards of one node.
    pub replicas: Vec<i32>,
    /// In-sync replicas (broker ids), a subset of `replicas`.
    pub isr: Vec<i32>,
    /// Leader broker id, -1 when no replica may lead.
    pub leader: i32,
    /// Bumped on every leader change.
    pub leader_epoch: i32,
    /// Bumped on every change to this partition (ISR, replicas, leader).
    pub partition_epoch: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicImage {
    pub name: String,
    /// Kafka topic id, 32 hex digits.
    pub id: String,
    pub partitions: Vec<PartitionImage>,
    /// Topic config overrides (Kafka names).
    pub configs: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterImage {
    /// Index of the last log entry applied (0 = nothing yet).
    pub version: u64,
    /// Set by the first `InitCluster`; never changes after.
    pub cluster_id: String,
    pub nodes: BTreeMap<u32, NodeRegistration>,
    pub topics: BTreeMap<String, TopicImage>,
    /// Dynamic cluster-wide broker config defaults.
    pub broker_configs: BTreeMap<String, String>,
}

/// A topic to create. `id` is chosen by the proposer (a random UUID) so
/// that applying is deterministic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateTopic {
    pub name: String,
    pub id: String,
    pub partitions: i32,
    pub replication_factor: i16,
    /// Explicit replica assignment (broker ids per partition); when not
    /// empty, `partitions` and `replication_factor` are taken from it.
    pub assignments: Vec<Vec<i32>>,
    pub configs: BTreeMap<String, String>,
}

/// Commands written to the metadata log. Applied in log order on every node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MetadataCommand {
    /// First command of a new cluster; ignored when the id is already set.
    InitCluster { cluster_id: String },
    /// A node (re)starts: replaces its registration, unfenced.
    RegisterNode(NodeRegistration),
    /// The node missed heartbeats (or shut down): fence it and move every
    /// leadership it held to another in-sync replica on an unfenced node
    /// (leader -1 when there is none; it stays in the ISR so it can lead
    /// again when it comes back, as Kafka's last-replica-standing rule).
    FenceNode { node_id: u32 },
    /// Heartbeats resumed from the same incarnation.
    UnfenceNode { node_id: u32 },
    CreateTopics(Vec<CreateTopic>),
    DeleteTopics(Vec<String>),
    /// Grow a topic to `count` partitions (placed like CreateTopics).
    CreatePartitions { topic: String, count: i32 },
    /// Replace a topic's config overrides.
    SetTopicConfigs { topic: String, configs: BTreeMap<String, String> },
    /// Replace the dynamic broker config defaults.
    SetBrokerConfigs(BTreeMap<String, String>),
    /// A partition leader changes its ISR (Kafka's AlterPartition). Refused
    /// unless `leader_epoch` and `partition_epoch` match the image.
    AlterPartition { topic: String, partition: i32, leader_epoch: i32, partition_epoch: i32, isr: Vec<i32> },
}

/// Why a command (or one topic of it) was refused: a Kafka error code and a
/// message for the client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub code: i16,
    pub message: String,
}

/// The outcome of applying one command: one entry per topic it names (in
/// command order; the empty name for commands without topics).
pub type ApplyResult = Vec<(String, Result<(), Refusal>)>;
