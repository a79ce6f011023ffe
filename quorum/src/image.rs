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
    /// The broker epoch (KRaft's): the metadata log index at which this
    /// incarnation registered, set by the image (what a registration
    /// request carries is ignored). Followers send it in Fetch v15+
    /// (KIP-903) and a leader takes a replica back into the ISR only when
    /// it matches, so fetches from an earlier run of the node do not count.
    #[serde(default = "no_broker_epoch")]
    pub broker_epoch: i64,
}

fn no_broker_epoch() -> i64 {
    -1
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
    /// A reassignment in progress (KRaft's addingReplicas): replicas joining
    /// `replicas`; they enter the ISR through AlterPartition once caught up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adding_replicas: Vec<i32>,
    /// A reassignment in progress (KRaft's removingReplicas): replicas that
    /// leave `replicas` (and the ISR) once every target replica is in sync.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removing_replicas: Vec<i32>,
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
    InitCluster {
        cluster_id: String,
    },
    /// A node (re)starts: replaces its registration, unfenced. A new
    /// incarnation replacing an unfenced one is a restart the session did
    /// not notice: the old incarnation is fenced first (its leaderships move,
    /// epochs bump), exactly as if its session had expired. Like
    /// UnfenceNode, it then leads the leaderless partitions in whose ISR it is.
    RegisterNode(NodeRegistration),
    /// The node missed heartbeats (or shut down): fence it and move every
    /// leadership it held to another in-sync replica on an unfenced node
    /// (leader -1 when there is none; it stays in the ISR so it can lead
    /// again when it comes back, as Kafka's last-replica-standing rule).
    FenceNode {
        node_id: u32,
    },
    /// Heartbeats resumed from the same incarnation.
    UnfenceNode {
        node_id: u32,
    },
    CreateTopics(Vec<CreateTopic>),
    DeleteTopics(Vec<String>),
    /// Grow a topic to `count` partitions (placed like CreateTopics).
    CreatePartitions {
        topic: String,
        count: i32,
    },
    /// Replace a topic's config overrides.
    SetTopicConfigs {
        topic: String,
        configs: BTreeMap<String, String>,
    },
    /// Replace the dynamic broker config defaults.
    SetBrokerConfigs(BTreeMap<String, String>),
    /// A partition leader changes its ISR (Kafka's AlterPartition). Refused
    /// unless `leader_epoch` and `partition_epoch` match the image.
    AlterPartition {
        topic: String,
        partition: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: Vec<i32>,
    },
    /// ElectLeaders, from a client or from the controller itself (unclean
    /// elections when `unclean.leader.election.enable` is true). One result
    /// per partition, in command order, named by its topic.
    ElectLeaders {
        election: Election,
        partitions: Vec<(String, i32)>,
    },
    /// AlterPartitionReassignments: start, replace or (target None) cancel a
    /// reassignment per partition. One result per entry, in command order,
    /// named by its topic.
    AlterReassignments(Vec<Reassignment>),
}

/// The kind of leader election (ElectLeaders' election_type).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Election {
    /// Move leadership to the first replica when it is alive and in sync.
    Preferred,
    /// Only for a partition without a leader: a live in-sync replica if there
    /// is one, else any live replica, whose log becomes the truth (the ISR
    /// shrinks to it; records only the old ISR had are lost).
    Unclean,
}

/// One partition's reassignment: the replica set it should end with
/// (preferred leader first), or None to cancel a reassignment in progress.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reassignment {
    pub topic: String,
    pub partition: i32,
    pub target: Option<Vec<i32>>,
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

// ---------------------------------------------------------------------------
// Applying commands
// ---------------------------------------------------------------------------

/// Kafka error codes a refusal carries.
pub mod error_codes {
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    pub const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
    pub const INVALID_REQUEST: i16 = 42;
    pub const FENCED_LEADER_EPOCH: i16 = 74;
    pub const INVALID_UPDATE_VERSION: i16 = 96;
    pub const PREFERRED_LEADER_NOT_AVAILABLE: i16 = 80;
    pub const ELIGIBLE_LEADERS_NOT_AVAILABLE: i16 = 83;
    pub const ELECTION_NOT_NEEDED: i16 = 84;
    pub const NO_REASSIGNMENT_IN_PROGRESS: i16 = 85;
    pub const INELIGIBLE_REPLICA: i16 = 107;
}

/// The topic / broker config that lets the controller elect a replica from
/// outside the ISR when no in-sync replica is alive.
pub const UNCLEAN_LEADER_ELECTION_ENABLE: &str = "unclean.leader.election.enable";

/// Most partitions one topic may have (CreateTopics, CreatePartitions).
pub const PARTITIONS_PER_TOPIC_MAX: i32 = 100_000;

/// Most shards a node may register: its broker ids must stay inside its
/// `BROKER_IDS_PER_NODE` block.
pub const SHARDS_PER_NODE_MAX: u32 = BROKER_IDS_PER_NODE as u32;

/// Highest `node.id` (broker ids of node 999 end at 999_999).
pub const NODE_ID_MAX: u32 = 999;

use error_codes::*;

impl Refusal {
    pub fn new(code: i16, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into() }
    }
}

/// The placement hash of a topic name: `h = h * 31 + byte`, wrapping u32.
pub fn placement_hash(name: &str) -> u32 {
    name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
}

impl PartitionImage {
    fn leader_node(&self) -> Option<u32> {
        (self.leader >= 0).then(|| split_broker_id(self.leader).0)
    }
}

/// The node of a broker id, None for a negative id.
fn node_of(broker: i32) -> Option<u32> {
    (broker >= 0).then(|| split_broker_id(broker).0)
}

impl ClusterImage {
    /// Applies one committed command at log `index`. Deterministic: the same
    /// image and command give the same result and image on every node.
    pub fn apply(&mut self, index: u64, cmd: &MetadataCommand) -> ApplyResult {
        self.version = index;
        match cmd {
            MetadataCommand::InitCluster { cluster_id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id.clone();
                }
                vec![(String::new(), Ok(()))]
            }
            MetadataCommand::RegisterNode(registration) => {
                vec![(String::new(), self.register_node(index, registration))]
            }
            MetadataCommand::FenceNode { node_id } => {
                self.fence_node(*node_id);
                vec![(String::new(), Ok(()))]
            }
            MetadataCommand::UnfenceNode { node_id } => {
                self.unfence_node(*node_id);
                vec![(String::new(), Ok(()))]
            }
            MetadataCommand::CreateTopics(topics) => {
                topics.iter().map(|t| (t.name.clone(), self.create_topic(t))).collect()
            }
            MetadataCommand::DeleteTopics(names) => names
                .iter()
                .map(|name| {
                    let result = match self.topics.remove(name) {
                        Some(_) => Ok(()),
                        None => Err(unknown_topic(name)),
                    };
                    (name.clone(), result)
                })
                .collect(),
            MetadataCommand::CreatePartitions { topic, count } => {
                vec![(topic.clone(), self.create_partitions(topic, *count))]
            }
            MetadataCommand::SetTopicConfigs { topic, configs } => {
                let result = match self.topics.get_mut(topic) {
                    Some(t) => {
                        t.configs = configs.clone();
                        Ok(())
                    }
                    None => Err(unknown_topic(topic)),
                };
                vec![(topic.clone(), result)]
            }
            MetadataCommand::SetBrokerConfigs(configs) => {
                self.broker_configs = configs.clone();
                vec![(String::new(), Ok(()))]
            }
            MetadataCommand::AlterPartition { topic, partition, leader_epoch, partition_epoch, isr } => {
                let result = self.alter_partition(topic, *partition, *leader_epoch, *partition_epoch, isr);
                vec![(topic.clone(), result)]
            }
            MetadataCommand::ElectLeaders { election, partitions } => partitions
                .iter()
                .map(|(topic, partition)| (topic.clone(), self.elect_leader(topic, *partition, *election)))
                .collect(),
            MetadataCommand::AlterReassignments(entries) => {
                entries.iter().map(|r| (r.topic.clone(), self.reassign(r))).collect()
            }
        }
    }

    /// Whether `node` is registered and not fenced.
    pub fn is_node_unfenced(&self, node: u32) -> bool {
        self.nodes.get(&node).is_some_and(|n| !n.fenced)
    }

    fn register_node(&mut self, index: u64, registration: &NodeRegistration) -> Result<(), Refusal> {
        if registration.node_id > NODE_ID_MAX {
            return Err(Refusal::new(
                INVALID_REQUEST,
                format!("node.id {} is out of range 0..={NODE_ID_MAX}", registration.node_id),
            ));
        }
        if registration.num_shards == 0 || registration.num_shards > SHARDS_PER_NODE_MAX {
            return Err(Refusal::new(
                INVALID_REQUEST,
                format!(
                    "node {} registers {} shards; a node has 1..={SHARDS_PER_NODE_MAX}",
                    registration.node_id, registration.num_shards
                ),
            ));
        }
        let node = registration.node_id;
        let restarted_unnoticed =
            self.nodes.get(&node).is_some_and(|old| !old.fenced && old.incarnation != registration.incarnation);
        if restarted_unnoticed {
            self.fence_node(node);
        }
        let mut registration = registration.clone();
        registration.fenced = true;
        // The same incarnation registering again (a retried request) keeps
        // its epoch; a new run of the node gets a new one.
        registration.broker_epoch = match self.nodes.get(&node) {
            Some(old) if old.incarnation == registration.incarnation && old.broker_epoch >= 0 => old.broker_epoch,
            _ => i64::try_from(index).unwrap_or(i64::MAX),
        };
        self.nodes.insert(node, registration);
        self.unfence_node(node);
        Ok(())
    }

    fn fence_node(&mut self, node: u32) {
        let Some(registration) = self.nodes.get_mut(&node) else { return };
        registration.fenced = true;
        let nodes = &self.nodes;
        for topic in self.topics.values_mut() {
            for p in &mut topic.partitions {
                let mut changed = false;
                if p.leader_node() == Some(node) {
                    let new_leader = p
                        .replicas
                        .iter()
                        .copied()
                        .find(|&r| {
                            p.isr.contains(&r)
                                && node_of(r).is_some_and(|n| n != node && nodes.get(&n).is_some_and(|x| !x.fenced))
                        })
                        .unwrap_or(-1);
                    p.leader = new_leader;
                    p.leader_epoch += 1;
                    changed = true;
                }
                let remaining: Vec<i32> = p.isr.iter().copied().filter(|&r| node_of(r) != Some(node)).collect();
                if !remaining.is_empty() && remaining.len() != p.isr.len() {
                    p.isr = remaining;
                    changed = true;
                }
                if changed {
                    p.partition_epoch += 1;
                }
            }
        }
    }

    fn unfence_node(&mut self, node: u32) {
        let Some(registration) = self.nodes.get_mut(&node) else { return };
        registration.fenced = false;
        for topic in self.topics.values_mut() {
            for p in &mut topic.partitions {
                if p.leader != -1 {
                    continue;
                }
                let candidate = p.replicas.iter().copied().find(|&r| p.isr.contains(&r) && node_of(r) == Some(node));
                if let Some(broker) = candidate {
                    p.leader = broker;
                    p.leader_epoch += 1;
                    p.partition_epoch += 1;
                }
            }
        }
    }

    /// Unfenced nodes able to host replicas, by node id.
    fn placement_nodes(&self) -> Vec<&NodeRegistration> {
        self.nodes.values().filter(|n| !n.fenced && n.num_shards > 0).collect()
    }

    /// Replicas of partitions `from..to` of topic `name` with `rf` replicas
    /// each: partition p starts at node `(h(name) + p) % n` and takes the next
    /// `rf` nodes, each on shard `(h(name) + p) % num_shards` of that node.
    fn place(&self, name: &str, from: i32, to: i32, rf: i32) -> Result<Vec<Vec<i32>>, Refusal> {
        let nodes = self.placement_nodes();
        let n = nodes.len();
        if rf < 1 {
            return Err(Refusal::new(
                INVALID_REPLICATION_FACTOR,
                format!("replication factor {rf} must be at least 1"),
            ));
        }
        if rf as usize > n {
            let ids: Vec<u32> = nodes.iter().map(|x| x.node_id).collect();
            return Err(Refusal::new(
                INVALID_REPLICATION_FACTOR,
                format!("replication factor {rf} is larger than the {n} available brokers (nodes {ids:?} unfenced)"),
            ));
        }
        let start = u64::from(placement_hash(name)) % n as u64;
        let mut placed = Vec::with_capacity((to - from).max(0) as usize);
        for p in from..to {
            let base = start + p as u64;
            let replicas = (0..rf as u64)
                .map(|k| {
                    let node = nodes[((base + k) % n as u64) as usize];
                    let shard = (base % u64::from(node.num_shards)) as u32;
                    broker_id(node.node_id, shard)
                })
                .collect();
            placed.push(replicas);
        }
        Ok(placed)
    }

    fn check_assignments(&self, assignments: &[Vec<i32>]) -> Result<(), Refusal> {
        let bad = |message: String| Err(Refusal::new(INVALID_REPLICA_ASSIGNMENT, message));
        if assignments.len() > PARTITIONS_PER_TOPIC_MAX as usize {
            return Err(Refusal::new(
                INVALID_PARTITIONS,
                format!("{} partitions is more than the {PARTITIONS_PER_TOPIC_MAX} allowed", assignments.len()),
            ));
        }
        let size = assignments.first().map_or(0, Vec::len);
        for (p, replicas) in assignments.iter().enumerate() {
            if replicas.is_empty() {
                return bad(format!("partition {p} has no replicas"));
            }
            if replicas.len() != size {
                return bad(format!(
                    "partition {p} has {} replicas but partition 0 has {size}; all partitions need the same number",
                    replicas.len()
                ));
            }
            let mut seen_nodes = Vec::with_capacity(replicas.len());
            for &broker in replicas {
                let Some(node) = node_of(broker) else {
                    return bad(format!("partition {p}: broker id {broker} is not valid"));
                };
                let shard = split_broker_id(broker).1;
                match self.nodes.get(&node) {
                    None => {
                        return bad(format!(
                            "partition {p}: broker {broker} is on node {node}, which is not registered"
                        ))
                    }
                    Some(reg) if shard >= reg.num_shards => {
                        return bad(format!(
                            "partition {p}: broker {broker} is shard {shard} of node {node}, which has {} shards",
                            reg.num_shards
                        ))
                    }
                    Some(_) => {}
                }
                if seen_nodes.contains(&node) {
                    return bad(format!(
                        "partition {p} has two replicas on node {node}; replicas must be on distinct nodes"
                    ));
                }
                seen_nodes.push(node);
            }
        }
        Ok(())
    }

    fn create_topic(&mut self, topic: &CreateTopic) -> Result<(), Refusal> {
        if self.topics.contains_key(&topic.name) {
            return Err(Refusal::new(TOPIC_ALREADY_EXISTS, format!("topic '{}' already exists", topic.name)));
        }
        let partitions: Vec<PartitionImage> = if !topic.assignments.is_empty() {
            self.check_assignments(&topic.assignments)?;
            topic
                .assignments
                .iter()
                .map(|replicas| {
                    let leader = replicas
                        .iter()
                        .copied()
                        .find(|&r| node_of(r).is_some_and(|n| self.is_node_unfenced(n)))
                        .unwrap_or(-1);
                    PartitionImage { leader, ..new_partition(replicas.clone()) }
                })
                .collect()
        } else {
            if topic.partitions < 1 || topic.partitions > PARTITIONS_PER_TOPIC_MAX {
                return Err(Refusal::new(
                    INVALID_PARTITIONS,
                    format!("number of partitions {} is not in 1..={PARTITIONS_PER_TOPIC_MAX}", topic.partitions),
                ));
            }
            self.place(&topic.name, 0, topic.partitions, i32::from(topic.replication_factor))?
                .into_iter()
                .map(new_partition)
                .collect()
        };
        self.topics.insert(
            topic.name.clone(),
            TopicImage { name: topic.name.clone(), id: topic.id.clone(), partitions, configs: topic.configs.clone() },
        );
        Ok(())
    }

    fn create_partitions(&mut self, name: &str, count: i32) -> Result<(), Refusal> {
        let Some(topic) = self.topics.get(name) else { return Err(unknown_topic(name)) };
        let current = topic.partitions.len() as i32;
        if count <= current || count > PARTITIONS_PER_TOPIC_MAX {
            return Err(Refusal::new(
                INVALID_PARTITIONS,
                format!(
                    "topic '{name}' has {current} partitions; the new count {count} must be in {}..={PARTITIONS_PER_TOPIC_MAX}",
                    current + 1
                ),
            ));
        }
        let rf = topic.partitions.first().map_or(1, |p| p.target_replicas().count() as i32);
        let placed = self.place(name, current, count, rf)?;
        if let Some(topic) = self.topics.get_mut(name) {
            topic.partitions.extend(placed.into_iter().map(new_partition));
        }
        Ok(())
    }

    fn alter_partition(
        &mut self,
        topic: &str,
        partition: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: &[i32],
    ) -> Result<(), Refusal> {
        let nodes = &self.nodes;
        let Some(t) = self.topics.get_mut(topic) else { return Err(unknown_topic(topic)) };
        let Some(p) = usize::try_from(partition).ok().and_then(|i| t.partitions.get_mut(i)) else {
            return Err(Refusal::new(
                UNKNOWN_TOPIC_OR_PARTITION,
                format!("topic '{topic}' has no partition {partition}"),
            ));
        };
        if leader_epoch != p.leader_epoch {
            return Err(Refusal::new(
                FENCED_LEADER_EPOCH,
                format!("{topic}-{partition}: leader epoch {leader_epoch} is not the current {}", p.leader_epoch),
            ));
        }
        if partition_epoch != p.partition_epoch {
            return Err(Refusal::new(
                INVALID_UPDATE_VERSION,
                format!(
                    "{topic}-{partition}: partition epoch {partition_epoch} is not the current {}",
                    p.partition_epoch
                ),
            ));
        }
        let invalid = |why: String| Err(Refusal::new(INVALID_REQUEST, format!("{topic}-{partition}: {why}")));
        if isr.is_empty() {
            return invalid("the ISR may not be empty".to_string());
        }
        for (i, r) in isr.iter().enumerate() {
            if !p.replicas.contains(r) {
                return invalid(format!("ISR member {r} is not a replica ({:?})", p.replicas));
            }
            if isr[..i].contains(r) {
                return invalid(format!("ISR member {r} is listed twice"));
            }
        }
        if !isr.contains(&p.leader) {
            return invalid(format!("the ISR {isr:?} does not contain the leader {}", p.leader));
        }
        for &r in isr {
            if !p.isr.contains(&r) {
                let eligible = node_of(r).is_some_and(|n| nodes.get(&n).is_some_and(|x| !x.fenced));
                if !eligible {
                    return Err(Refusal::new(
                        INELIGIBLE_REPLICA,
                        format!("{topic}-{partition}: replica {r} is on a fenced node and cannot join the ISR"),
                    ));
                }
            }
        }
        p.isr = isr.to_vec();
        p.partition_epoch += 1;
        let live = |r: i32| node_of(r).is_some_and(|n| nodes.get(&n).is_some_and(|x| !x.fenced));
        p.complete_reassignment(live);
        Ok(())
    }

    /// ElectLeaders for one partition (see `Election`).
    fn elect_leader(&mut self, topic: &str, partition: i32, election: Election) -> Result<(), Refusal> {
        let nodes = &self.nodes;
        let live = |r: i32| node_of(r).is_some_and(|n| nodes.get(&n).is_some_and(|x| !x.fenced));
        let p = partition_mut(&mut self.topics, topic, partition)?;
        let new_leader = match election {
            Election::Preferred => {
                let preferred = p.replicas.first().copied().unwrap_or(-1);
                if p.leader == preferred {
                    return Err(Refusal::new(
                        ELECTION_NOT_NEEDED,
                        format!("{topic}-{partition}: the preferred replica {preferred} already leads"),
                    ));
                }
                if !live(preferred) {
                    return Err(Refusal::new(
                        PREFERRED_LEADER_NOT_AVAILABLE,
                        format!("{topic}-{partition}: the preferred replica {preferred} is on a fenced or unregistered node"),
                    ));
                }
                if !p.isr.contains(&preferred) {
                    return Err(Refusal::new(
                        PREFERRED_LEADER_NOT_AVAILABLE,
                        format!("{topic}-{partition}: the preferred replica {preferred} is not in the ISR {:?}", p.isr),
                    ));
                }
                preferred
            }
            Election::Unclean => {
                if p.leader >= 0 {
                    return Err(Refusal::new(
                        ELECTION_NOT_NEEDED,
                        format!(
                            "{topic}-{partition}: broker {} leads; an unclean election needs a leaderless partition",
                            p.leader
                        ),
                    ));
                }
                // A live in-sync replica first (then nothing is lost), else any
                // live replica that is not still being added (it may have nothing).
                let clean = p.replicas.iter().copied().find(|&r| p.isr.contains(&r) && live(r));
                let unclean = || p.replicas.iter().copied().find(|&r| live(r) && !p.adding_replicas.contains(&r));
                match clean {
                    Some(r) => r,
                    None => match unclean() {
                        Some(r) => {
                            p.isr = vec![r];
                            r
                        }
                        None => {
                            return Err(Refusal::new(
                                ELIGIBLE_LEADERS_NOT_AVAILABLE,
                                format!("{topic}-{partition}: no replica of {:?} is on a live node", p.replicas),
                            ))
                        }
                    },
                }
            }
        };
        p.leader = new_leader;
        p.leader_epoch += 1;
        p.partition_epoch += 1;
        Ok(())
    }

    /// AlterPartitionReassignments for one partition, as KRaft does it:
    /// replicas become target + (current not in target) with adding and
    /// removing sets; the reassignment completes (here, or when an
    /// AlterPartition later brings every target replica into the ISR).
    fn reassign(&mut self, r: &Reassignment) -> Result<(), Refusal> {
        let (topic, partition) = (r.topic.as_str(), r.partition);
        if let Some(target) = &r.target {
            let current = partition_mut(&mut self.topics, topic, partition)?.clone();
            self.check_target(topic, partition, &current, target)?;
        }
        let nodes = &self.nodes;
        let live = |b: i32| node_of(b).is_some_and(|n| nodes.get(&n).is_some_and(|x| !x.fenced));
        let p = partition_mut(&mut self.topics, topic, partition)?;
        let in_progress = !p.adding_replicas.is_empty() || !p.removing_replicas.is_empty();
        let original: Vec<i32> = p.replicas.iter().copied().filter(|b| !p.adding_replicas.contains(b)).collect();
        let target = match &r.target {
            None if !in_progress => {
                return Err(Refusal::new(
                    NO_REASSIGNMENT_IN_PROGRESS,
                    format!("{topic}-{partition}: no reassignment is in progress"),
                ))
            }
            // Cancel: back to the replicas before the reassignment.
            None => original.clone(),
            Some(target) => target.clone(),
        };
        if target == original && !in_progress {
            return Ok(());
        }
        if target == original {
            p.reshape(original, Vec::new(), Vec::new(), live);
            return Ok(());
        }
        let adding: Vec<i32> = target.iter().copied().filter(|b| !original.contains(b)).collect();
        let removing: Vec<i32> = original.iter().copied().filter(|b| !target.contains(b)).collect();
        let mut replicas = target;
        replicas.extend_from_slice(&removing);
        p.reshape(replicas, adding, removing, live);
        p.complete_reassignment(live);
        Ok(())
    }

    /// INVALID_REPLICA_ASSIGNMENT unless `target` is a non-empty list of
    /// distinct brokers of registered nodes, one per node, and no target
    /// replica sits on another shard of a node that holds a current replica.
    fn check_target(
        &self,
        topic: &str,
        partition: i32,
        current: &PartitionImage,
        target: &[i32],
    ) -> Result<(), Refusal> {
        let bad = |why: String| Err(Refusal::new(INVALID_REPLICA_ASSIGNMENT, format!("{topic}-{partition}: {why}")));
        if target.is_empty() {
            return bad("the target replica list is empty".to_string());
        }
        for (i, &broker) in target.iter().enumerate() {
            if target[..i].contains(&broker) {
                return bad(format!("broker {broker} is listed twice in {target:?}"));
            }
            let Some(node) = node_of(broker) else { return bad(format!("broker id {broker} is not valid")) };
            let shard = split_broker_id(broker).1;
            match self.nodes.get(&node) {
                None => return bad(format!("broker {broker} is on node {node}, which is not registered")),
                Some(reg) if shard >= reg.num_shards => {
                    return bad(format!(
                        "broker {broker} is shard {shard} of node {node}, which has {} shards",
                        reg.num_shards
                    ))
                }
                Some(_) => {}
            }
            if target[..i].iter().any(|&b| node_of(b) == Some(node)) {
                return bad(format!("two target replicas are on node {node}; replicas must be on distinct nodes"));
            }
            if let Some(&other) = current.replicas.iter().find(|&&b| node_of(b) == Some(node) && b != broker) {
                return bad(format!(
                    "broker {broker} is on node {node}, which holds replica {other}: moving a replica between shards of one node is not supported"
                ));
            }
        }
        Ok(())
    }

    /// Leaderless partitions the controller should give an unclean leader:
    /// `unclean.leader.election.enable` is true for them (topic config, else
    /// dynamic broker default, else `static_default`) and a replica outside
    /// the ISR is alive. In topic and partition order.
    pub fn unclean_election_candidates(&self, static_default: bool) -> Vec<(String, i32)> {
        let enabled = |v: Option<&String>| v.map(|v| v.trim().eq_ignore_ascii_case("true"));
        let cluster_default =
            enabled(self.broker_configs.get(UNCLEAN_LEADER_ELECTION_ENABLE)).unwrap_or(static_default);
        let mut out = Vec::new();
        for t in self.topics.values() {
            if !enabled(t.configs.get(UNCLEAN_LEADER_ELECTION_ENABLE)).unwrap_or(cluster_default) {
                continue;
            }
            for (i, p) in t.partitions.iter().enumerate() {
                let electable = p.leader < 0
                    && p.replicas.iter().any(|&r| {
                        !p.adding_replicas.contains(&r) && node_of(r).is_some_and(|n| self.is_node_unfenced(n))
                    });
                if electable {
                    out.push((t.name.clone(), i as i32));
                }
            }
        }
        out
    }
}

fn partition_mut<'a>(
    topics: &'a mut BTreeMap<String, TopicImage>,
    topic: &str,
    partition: i32,
) -> Result<&'a mut PartitionImage, Refusal> {
    let Some(t) = topics.get_mut(topic) else { return Err(unknown_topic(topic)) };
    usize::try_from(partition).ok().and_then(|i| t.partitions.get_mut(i)).ok_or_else(|| {
        Refusal::new(UNKNOWN_TOPIC_OR_PARTITION, format!("topic '{topic}' has no partition {partition}"))
    })
}

impl PartitionImage {
    /// The replicas this partition ends with once its reassignment (if
    /// any) completes: `replicas` without `removing_replicas`.
    pub fn target_replicas(&self) -> impl Iterator<Item = i32> + '_ {
        self.replicas.iter().copied().filter(|r| !self.removing_replicas.contains(r))
    }

    /// Whether a reassignment is in progress.
    pub fn reassigning(&self) -> bool {
        !self.adding_replicas.is_empty() || !self.removing_replicas.is_empty()
    }

    /// Sets the replica set: the ISR keeps only replicas still in it (never
    /// empty: if none is left, the first live non-adding replica, else the
    /// first one); a leader that left, or is not in the ISR, hands over to
    /// the first live ISR member in target order (-1 if none), with a new
    /// leader epoch. Bumps the partition epoch.
    fn reshape(&mut self, replicas: Vec<i32>, adding: Vec<i32>, removing: Vec<i32>, live: impl Fn(i32) -> bool) {
        self.replicas = replicas;
        self.adding_replicas = adding;
        self.removing_replicas = removing;
        let isr: Vec<i32> = self.isr.iter().copied().filter(|r| self.replicas.contains(r)).collect();
        self.isr = if isr.is_empty() {
            let keep = self
                .replicas
                .iter()
                .copied()
                .find(|&r| live(r) && !self.adding_replicas.contains(&r))
                .or_else(|| self.replicas.first().copied());
            keep.into_iter().collect()
        } else {
            isr
        };
        self.move_leader_into_isr(&live);
        self.partition_epoch += 1;
    }

    /// A leader outside the ISR (or none) gives way to the first live ISR
    /// member, target replicas first; the leader epoch bumps on a change.
    fn move_leader_into_isr(&mut self, live: &impl Fn(i32) -> bool) {
        if self.leader >= 0 && self.isr.contains(&self.leader) {
            return;
        }
        let new_leader = self
            .target_replicas()
            .chain(self.removing_replicas.iter().copied())
            .find(|&r| self.isr.contains(&r) && live(r))
            .unwrap_or(-1);
        if new_leader != self.leader {
            self.leader = new_leader;
            self.leader_epoch += 1;
        }
    }

    /// Completes a reassignment once every target replica is in the ISR:
    /// replicas = target, removed replicas leave the ISR, a removed leader
    /// hands over to a target ISR member. Returns whether it completed.
    fn complete_reassignment(&mut self, live: impl Fn(i32) -> bool) -> bool {
        if !self.reassigning() {
            return false;
        }
        let target: Vec<i32> = self.target_replicas().collect();
        if !target.iter().all(|r| self.isr.contains(r)) {
            return false;
        }
        self.isr.retain(|r| target.contains(r));
        self.replicas = target;
        self.adding_replicas.clear();
        self.removing_replicas.clear();
        self.move_leader_into_isr(&live);
        true
    }
}

fn new_partition(replicas: Vec<i32>) -> PartitionImage {
    let leader = replicas.first().copied().unwrap_or(-1);
    PartitionImage {
        leader,
        isr: replicas.clone(),
        replicas,
        leader_epoch: 0,
        partition_epoch: 0,
        adding_replicas: Vec::new(),
        removing_replicas: Vec::new(),
    }
}

fn unknown_topic(name: &str) -> Refusal {
    Refusal::new(UNKNOWN_TOPIC_OR_PARTITION, format!("topic '{name}' does not exist"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(node: u32, shards: u32) -> NodeRegistration {
        NodeRegistration {
            node_id: node,
            incarnation: format!("inc-{node}"),
            host: "127.0.0.1".to_string(),
            port: 9092 + node as u16 * 10,
            num_shards: shards,
            rack: None,
            fenced: false,
            broker_epoch: -1,
        }
    }

    fn topic(name: &str, partitions: i32, rf: i16) -> CreateTopic {
        CreateTopic {
            name: name.to_string(),
            id: format!("{:032x}", placement_hash(name)),
            partitions,
            replication_factor: rf,
            assignments: Vec::new(),
            configs: BTreeMap::new(),
        }
    }

    fn assigned(name: &str, assignments: Vec<Vec<i32>>) -> CreateTopic {
        CreateTopic { assignments, ..topic(name, 0, 0) }
    }

    /// Nodes 1, 2, 3 with 2, 3 and 4 shards.
    fn three_nodes() -> (ClusterImage, u64) {
        let mut image = ClusterImage::default();
        let mut index = 0;
        for (node, shards) in [(1, 2), (2, 3), (3, 4)] {
            index += 1;
            assert_eq!(image.apply(index, &MetadataCommand::RegisterNode(reg(node, shards))), ok(""));
        }
        (image, index)
    }

    fn ok(name: &str) -> ApplyResult {
        vec![(name.to_string(), Ok(()))]
    }

    fn refused(result: &ApplyResult) -> &Refusal {
        match &result[0].1 {
            Err(r) => r,
            Ok(()) => panic!("expected a refusal, got {result:?}"),
        }
    }

    fn partition<'a>(image: &'a ClusterImage, name: &str, p: usize) -> &'a PartitionImage {
        &image.topics[name].partitions[p]
    }

    #[test]
    fn placement_hash_folds_bytes_times_31() {
        assert_eq!(placement_hash(""), 0);
        assert_eq!(placement_hash("a"), 97);
        assert_eq!(placement_hash("ab"), 97 * 31 + 98);
        // Wraps instead of overflowing.
        let long = "z".repeat(100);
        let expected = long.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        assert_eq!(placement_hash(&long), expected);
    }

    #[test]
    fn create_topics_places_replicas_on_distinct_nodes_round_robin() {
        let (mut image, index) = three_nodes();
        let result = image.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("orders", 6, 3)]));
        assert_eq!(result, ok("orders"));
        assert_eq!(image.version, index + 1);
        let t = &image.topics["orders"];
        assert_eq!(t.partitions.len(), 6);
        assert_eq!(t.id, format!("{:032x}", placement_hash("orders")));
        let nodes = [(1u32, 2u32), (2, 3), (3, 4)];
        let start = placement_hash("orders") as usize % 3;
        let mut leaders_per_node = BTreeMap::new();
        for (p, part) in t.partitions.iter().enumerate() {
            let expected: Vec<i32> = (0..3)
                .map(|k| {
                    let (node, shards) = nodes[(start + p + k) % 3];
                    broker_id(node, ((start + p) % shards as usize) as u32)
                })
                .collect();
            assert_eq!(part.replicas, expected, "partition {p}");
            let mut replica_nodes: Vec<u32> = part.replicas.iter().map(|&r| split_broker_id(r).0).collect();
            replica_nodes.sort_unstable();
            assert_eq!(replica_nodes, vec![1, 2, 3], "partition {p} must have one replica per node");
            assert_eq!(part.leader, part.replicas[0]);
            assert_eq!(part.isr, part.replicas);
            assert_eq!((part.leader_epoch, part.partition_epoch), (0, 0));
            *leaders_per_node.entry(split_broker_id(part.leader).0).or_insert(0) += 1;
        }
        assert_eq!(leaders_per_node, BTreeMap::from([(1, 2), (2, 2), (3, 2)]), "leaders spread evenly");
    }

    #[test]
    fn create_topics_with_rf_one_uses_every_node_and_shards() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("t", 12, 1)]));
        let brokers: std::collections::BTreeSet<i32> =
            image.topics["t"].partitions.iter().map(|p| p.replicas[0]).collect();
        let nodes: std::collections::BTreeSet<u32> = brokers.iter().map(|&b| split_broker_id(b).0).collect();
        assert_eq!(nodes.len(), 3);
        for b in brokers {
            let (node, shard) = split_broker_id(b);
            assert!(shard < image.nodes[&node].num_shards, "broker {b} beyond node {node}'s shards");
        }
    }

    #[test]
    fn create_topics_refusals() {
        let (mut image, mut index) = three_nodes();
        index += 1;
        image.apply(index, &MetadataCommand::CreateTopics(vec![topic("a", 1, 1)]));
        index += 1;
        let result = image.apply(
            index,
            &MetadataCommand::CreateTopics(vec![
                topic("a", 1, 1),
                topic("b", 0, 1),
                topic("c", 100_001, 1),
                topic("d", 1, 4),
                topic("e", 1, 0),
                topic("f", 2, 2),
            ]),
        );
        assert_eq!(image.version, index);
        let codes: Vec<(String, Option<i16>)> =
            result.iter().map(|(n, r)| (n.clone(), r.as_ref().err().map(|e| e.code))).collect();
        assert_eq!(
            codes,
            vec![
                ("a".to_string(), Some(TOPIC_ALREADY_EXISTS)),
                ("b".to_string(), Some(INVALID_PARTITIONS)),
                ("c".to_string(), Some(INVALID_PARTITIONS)),
                ("d".to_string(), Some(INVALID_REPLICATION_FACTOR)),
                ("e".to_string(), Some(INVALID_REPLICATION_FACTOR)),
                ("f".to_string(), None),
            ]
        );
        let rf_message = &result[3].1.as_ref().unwrap_err().message;
        assert_eq!(
            rf_message,
            "replication factor 4 is larger than the 3 available brokers (nodes [1, 2, 3] unfenced)"
        );
        assert_eq!(image.topics.keys().collect::<Vec<_>>(), vec!["a", "f"]);
        assert_eq!(image.topics["a"].partitions.len(), 1, "the refused duplicate left the topic alone");
    }

    #[test]
    fn placement_skips_fenced_nodes() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::FenceNode { node_id: 2 });
        let result = image.apply(index + 2, &MetadataCommand::CreateTopics(vec![topic("t", 4, 3)]));
        let r = refused(&result);
        assert_eq!(r.code, INVALID_REPLICATION_FACTOR);
        assert!(r.message.contains("2 available brokers (nodes [1, 3] unfenced)"), "{}", r.message);
        image.apply(index + 3, &MetadataCommand::CreateTopics(vec![topic("t", 4, 2)]));
        for p in &image.topics["t"].partitions {
            assert!(p.replicas.iter().all(|&r| split_broker_id(r).0 != 2), "{p:?}");
        }
    }

    #[test]
    fn create_topics_with_assignments() {
        let (mut image, index) = three_nodes();
        let good = assigned("good", vec![vec![1001, 2002], vec![3003, 1000]]);
        let cases = vec![
            assigned("unregistered", vec![vec![1000, 4000]]),
            assigned("shard", vec![vec![1002, 2000]]),
            assigned("same-node", vec![vec![1000, 1001]]),
            assigned("sizes", vec![vec![1000, 2000], vec![3000]]),
            assigned("negative", vec![vec![-1, 2000]]),
            assigned("empty", vec![vec![]]),
        ];
        let mut all = vec![good];
        all.extend(cases);
        let result = image.apply(index + 1, &MetadataCommand::CreateTopics(all));
        assert_eq!(result[0], ("good".to_string(), Ok(())));
        for (name, r) in &result[1..] {
            let r = r.as_ref().unwrap_err();
            assert_eq!(r.code, INVALID_REPLICA_ASSIGNMENT, "{name}: {}", r.message);
            assert!(!r.message.is_empty());
        }
        let t = &image.topics["good"];
        assert_eq!(t.partitions[0].replicas, vec![1001, 2002]);
        assert_eq!(t.partitions[0].leader, 1001);
        assert_eq!(t.partitions[1].isr, vec![3003, 1000]);
        assert_eq!(image.topics.len(), 1);
    }

    #[test]
    fn assignment_leader_skips_fenced_nodes() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::FenceNode { node_id: 1 });
        image.apply(index + 2, &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000]])]));
        assert_eq!(partition(&image, "t", 0).leader, 2000);
    }

    #[test]
    fn delete_topics() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("a", 1, 1), topic("b", 1, 1)]));
        let result = image.apply(index + 2, &MetadataCommand::DeleteTopics(vec!["a".into(), "zz".into()]));
        assert_eq!(result[0], ("a".to_string(), Ok(())));
        assert_eq!(result[1].0, "zz");
        assert_eq!(result[1].1.as_ref().unwrap_err().code, UNKNOWN_TOPIC_OR_PARTITION);
        assert_eq!(image.topics.keys().collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn create_partitions_places_like_create_topics() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("t", 2, 2)]));
        let mut reference = image.clone();
        reference.topics.clear();
        reference.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("t", 5, 2)]));

        let result = image.apply(index + 2, &MetadataCommand::CreatePartitions { topic: "t".into(), count: 5 });
        assert_eq!(result, ok("t"));
        assert_eq!(image.topics["t"].partitions, reference.topics["t"].partitions);

        for count in [5, 3, 100_001] {
            let result = image.apply(index + 3, &MetadataCommand::CreatePartitions { topic: "t".into(), count });
            assert_eq!(refused(&result).code, INVALID_PARTITIONS, "count {count}");
        }
        let result = image.apply(index + 4, &MetadataCommand::CreatePartitions { topic: "nope".into(), count: 9 });
        assert_eq!(refused(&result).code, UNKNOWN_TOPIC_OR_PARTITION);

        image.apply(index + 5, &MetadataCommand::FenceNode { node_id: 1 });
        image.apply(index + 6, &MetadataCommand::FenceNode { node_id: 2 });
        let result = image.apply(index + 7, &MetadataCommand::CreatePartitions { topic: "t".into(), count: 6 });
        assert_eq!(refused(&result).code, INVALID_REPLICATION_FACTOR);
        assert_eq!(image.topics["t"].partitions.len(), 5);
    }

    #[test]
    fn configs() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("t", 1, 1)]));
        let configs = BTreeMap::from([("retention.ms".to_string(), "1000".to_string())]);
        let result =
            image.apply(index + 2, &MetadataCommand::SetTopicConfigs { topic: "t".into(), configs: configs.clone() });
        assert_eq!(result, ok("t"));
        assert_eq!(image.topics["t"].configs, configs);
        let result =
            image.apply(index + 3, &MetadataCommand::SetTopicConfigs { topic: "x".into(), configs: configs.clone() });
        assert_eq!(refused(&result).code, UNKNOWN_TOPIC_OR_PARTITION);
        assert_eq!(image.apply(index + 4, &MetadataCommand::SetBrokerConfigs(configs.clone())), ok(""));
        assert_eq!(image.broker_configs, configs);
        assert_eq!(image.version, index + 4);
    }

    #[test]
    fn init_cluster_sets_the_id_once() {
        let mut image = ClusterImage::default();
        image.apply(1, &MetadataCommand::InitCluster { cluster_id: "first".into() });
        image.apply(2, &MetadataCommand::InitCluster { cluster_id: "second".into() });
        assert_eq!(image.cluster_id, "first");
        assert_eq!(image.version, 2);
    }

    #[test]
    fn register_node_replaces_and_unfences() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::FenceNode { node_id: 2 });
        assert!(image.nodes[&2].fenced);
        let mut again = reg(2, 3);
        again.incarnation = "new".into();
        again.fenced = true; // ignored: registering unfences
        assert_eq!(image.apply(index + 2, &MetadataCommand::RegisterNode(again)), ok(""));
        assert!(!image.nodes[&2].fenced);
        assert_eq!(image.nodes[&2].incarnation, "new");
        assert_eq!(image.nodes[&2].broker_epoch, (index + 2) as i64, "a new incarnation: a new broker epoch");
        let mut retried = image.nodes[&2].clone();
        retried.broker_epoch = 77; // ignored: the image sets it
        image.apply(index + 3, &MetadataCommand::RegisterNode(retried));
        assert_eq!(image.nodes[&2].broker_epoch, (index + 2) as i64, "the same incarnation keeps its epoch");

        for bad in [reg(5, 0), reg(5, 1001), reg(1000, 1)] {
            let before = image.clone();
            let result = image.apply(index + 3, &MetadataCommand::RegisterNode(bad));
            assert_eq!(refused(&result).code, INVALID_REQUEST);
            assert_eq!(image.nodes, before.nodes);
        }
        assert!(!image.nodes.contains_key(&5));
    }

    #[test]
    fn a_new_incarnation_of_a_live_node_fences_the_old_one_first() {
        let (mut image, index) = three_nodes();
        image.apply(
            index + 1,
            &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000], vec![2001, 1001]])]),
        );
        // Same incarnation again: nothing moves.
        image.apply(index + 2, &MetadataCommand::RegisterNode(reg(1, 2)));
        assert_eq!(partition(&image, "t", 0).leader_epoch, 0);

        let mut restarted = reg(1, 2);
        restarted.incarnation = "restarted".into();
        assert_eq!(image.apply(index + 3, &MetadataCommand::RegisterNode(restarted)), ok(""));
        assert!(!image.nodes[&1].fenced);
        assert_eq!(image.nodes[&1].incarnation, "restarted");
        let p0 = partition(&image, "t", 0);
        assert_eq!((p0.leader, p0.leader_epoch, p0.partition_epoch, p0.isr.clone()), (2000, 1, 1, vec![2000]));
        let p1 = partition(&image, "t", 1);
        assert_eq!((p1.leader, p1.leader_epoch, p1.partition_epoch, p1.isr.clone()), (2001, 0, 1, vec![2001]));
    }

    #[test]
    fn registering_again_after_a_fence_takes_back_leaderless_partitions() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000]])]));
        image.apply(index + 2, &MetadataCommand::FenceNode { node_id: 2 });
        image.apply(index + 3, &MetadataCommand::FenceNode { node_id: 1 });
        let p = partition(&image, "t", 0);
        assert_eq!((p.leader, p.isr.clone()), (-1, vec![1000]));
        let mut restarted = reg(1, 2);
        restarted.incarnation = "restarted".into();
        image.apply(index + 4, &MetadataCommand::RegisterNode(restarted));
        let p = partition(&image, "t", 0);
        assert_eq!((p.leader, p.leader_epoch), (1000, 2), "the last ISR member leads again, in a new epoch");
    }

    #[test]
    fn fence_moves_leaderships_to_isr_members_and_shrinks_isr() {
        let (mut image, index) = three_nodes();
        image.apply(
            index + 1,
            &MetadataCommand::CreateTopics(vec![assigned(
                "t",
                vec![
                    vec![1000, 2000, 3000], // led by node 1
                    vec![2001, 1001, 3001], // node 1 follows
                    vec![1000, 2002, 3002], // led by node 1, the only ISR member
                ],
            )]),
        );
        assert_eq!(image.topics["t"].partitions.len(), 3);
        // Partition 2: node 1 is its last ISR member.
        image.apply(
            index + 2,
            &MetadataCommand::AlterPartition {
                topic: "t".into(),
                partition: 2,
                leader_epoch: 0,
                partition_epoch: 0,
                isr: vec![1000],
            },
        );
        image.apply(index + 3, &MetadataCommand::FenceNode { node_id: 1 });
        assert!(image.nodes[&1].fenced);

        let p0 = partition(&image, "t", 0);
        assert_eq!((p0.leader, p0.leader_epoch, p0.partition_epoch), (2000, 1, 1));
        assert_eq!(p0.isr, vec![2000, 3000]);

        let p1 = partition(&image, "t", 1);
        assert_eq!((p1.leader, p1.leader_epoch, p1.partition_epoch), (2001, 0, 1), "only the ISR changed");
        assert_eq!(p1.isr, vec![2001, 3001]);

        let p2 = partition(&image, "t", 2);
        assert_eq!((p2.leader, p2.leader_epoch, p2.partition_epoch), (-1, 1, 2), "no other ISR member: leaderless");
        assert_eq!(p2.isr, vec![1000], "the ISR never shrinks to empty");

        // Unfencing node 1 gives it back the leaderless partition only.
        image.apply(index + 4, &MetadataCommand::UnfenceNode { node_id: 1 });
        assert!(!image.nodes[&1].fenced);
        let p2 = partition(&image, "t", 2);
        assert_eq!((p2.leader, p2.leader_epoch, p2.partition_epoch), (1000, 2, 3));
        let p0 = partition(&image, "t", 0);
        assert_eq!((p0.leader, p0.leader_epoch, p0.partition_epoch), (2000, 1, 1), "led elsewhere: unchanged");
    }

    #[test]
    fn fence_skips_isr_members_on_other_fenced_nodes() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000, 3000]])]));
        image.apply(index + 2, &MetadataCommand::FenceNode { node_id: 2 });
        // Node 2 was a follower: dropped from the ISR.
        assert_eq!(partition(&image, "t", 0).isr, vec![1000, 3000]);
        image.apply(index + 3, &MetadataCommand::FenceNode { node_id: 1 });
        let p = partition(&image, "t", 0);
        assert_eq!((p.leader, p.leader_epoch), (3000, 1));
        assert_eq!(p.isr, vec![3000]);
        image.apply(index + 4, &MetadataCommand::FenceNode { node_id: 3 });
        let p = partition(&image, "t", 0);
        assert_eq!((p.leader, p.leader_epoch, p.isr.clone()), (-1, 2, vec![3000]));
        // Node 1 comes back but is not in the ISR: it may not lead.
        image.apply(index + 5, &MetadataCommand::UnfenceNode { node_id: 1 });
        assert_eq!(partition(&image, "t", 0).leader, -1);
        image.apply(index + 6, &MetadataCommand::UnfenceNode { node_id: 3 });
        let p = partition(&image, "t", 0);
        assert_eq!((p.leader, p.leader_epoch), (3000, 3));
    }

    #[test]
    fn fence_and_unfence_of_unknown_nodes_change_nothing() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![topic("t", 3, 3)]));
        let before = image.clone();
        image.apply(index + 2, &MetadataCommand::FenceNode { node_id: 0 });
        image.apply(index + 3, &MetadataCommand::UnfenceNode { node_id: 0 });
        assert_eq!(image.topics, before.topics);
        assert_eq!(image.nodes, before.nodes);
    }

    #[test]
    fn alter_partition_refusals_and_success() {
        let (mut image, index) = three_nodes();
        image.apply(index + 1, &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000, 3000]])]));
        let alter = |leader_epoch, partition_epoch, isr: Vec<i32>| MetadataCommand::AlterPartition {
            topic: "t".into(),
            partition: 0,
            leader_epoch,
            partition_epoch,
            isr,
        };
        let code = |image: &mut ClusterImage, cmd: MetadataCommand| {
            let result = image.apply(index + 2, &cmd);
            result[0].1.as_ref().err().map(|r| r.code)
        };
        let unknown_topic = MetadataCommand::AlterPartition {
            topic: "x".into(),
            partition: 0,
            leader_epoch: 0,
            partition_epoch: 0,
            isr: vec![1000],
        };
        assert_eq!(code(&mut image, unknown_topic), Some(UNKNOWN_TOPIC_OR_PARTITION));
        let unknown_partition = MetadataCommand::AlterPartition {
            topic: "t".into(),
            partition: 1,
            leader_epoch: 0,
            partition_epoch: 0,
            isr: vec![1000],
        };
        assert_eq!(code(&mut image, unknown_partition), Some(UNKNOWN_TOPIC_OR_PARTITION));
        assert_eq!(code(&mut image, alter(1, 0, vec![1000])), Some(FENCED_LEADER_EPOCH));
        assert_eq!(code(&mut image, alter(0, 7, vec![1000])), Some(INVALID_UPDATE_VERSION));
        assert_eq!(code(&mut image, alter(0, 0, vec![])), Some(INVALID_REQUEST));
        assert_eq!(code(&mut image, alter(0, 0, vec![1000, 4000])), Some(INVALID_REQUEST));
        assert_eq!(code(&mut image, alter(0, 0, vec![2000, 3000])), Some(INVALID_REQUEST), "leader missing");
        assert_eq!(code(&mut image, alter(0, 0, vec![1000, 1000])), Some(INVALID_REQUEST));
        assert_eq!(partition(&image, "t", 0).partition_epoch, 0, "refusals change nothing");

        assert_eq!(code(&mut image, alter(0, 0, vec![1000])), None);
        let p = partition(&image, "t", 0);
        assert_eq!((p.isr.clone(), p.leader_epoch, p.partition_epoch), (vec![1000], 0, 1));

        // Node 3 is fenced: its replica may not rejoin; node 2's may.
        image.apply(index + 3, &MetadataCommand::FenceNode { node_id: 3 });
        assert_eq!(partition(&image, "t", 0).partition_epoch, 1, "node 3 was not in the ISR");
        assert_eq!(code(&mut image, alter(0, 1, vec![1000, 3000])), Some(INELIGIBLE_REPLICA));
        assert_eq!(code(&mut image, alter(0, 1, vec![1000, 2000])), None);
        let p = partition(&image, "t", 0);
        assert_eq!((p.isr.clone(), p.partition_epoch), (vec![1000, 2000], 2));
    }

    fn alter(topic: &str, partition: i32, image: &ClusterImage, isr: Vec<i32>) -> MetadataCommand {
        let p = partition_of(image, topic, partition);
        MetadataCommand::AlterPartition {
            topic: topic.into(),
            partition,
            leader_epoch: p.leader_epoch,
            partition_epoch: p.partition_epoch,
            isr,
        }
    }

    fn partition_of<'a>(image: &'a ClusterImage, name: &str, p: i32) -> &'a PartitionImage {
        &image.topics[name].partitions[p as usize]
    }

    fn elect(election: Election, topic: &str, partition: i32) -> MetadataCommand {
        MetadataCommand::ElectLeaders { election, partitions: vec![(topic.to_string(), partition)] }
    }

    fn reassign(topic: &str, partition: i32, target: Option<Vec<i32>>) -> MetadataCommand {
        MetadataCommand::AlterReassignments(vec![Reassignment { topic: topic.into(), partition, target }])
    }

    fn code(result: &ApplyResult) -> Option<i16> {
        result[0].1.as_ref().err().map(|r| r.code)
    }

    /// (replicas, isr, leader, leader epoch, adding, removing)
    #[allow(clippy::type_complexity)]
    fn shape(image: &ClusterImage, topic: &str, p: i32) -> (Vec<i32>, Vec<i32>, i32, i32, Vec<i32>, Vec<i32>) {
        let p = partition_of(image, topic, p);
        (
            p.replicas.clone(),
            p.isr.clone(),
            p.leader,
            p.leader_epoch,
            p.adding_replicas.clone(),
            p.removing_replicas.clone(),
        )
    }

    #[test]
    fn preferred_election_moves_leadership_back_to_the_first_replica() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000, 3000]])]));
        assert_eq!(code(&image.apply(next(), &elect(Election::Preferred, "t", 0))), Some(ELECTION_NOT_NEEDED));
        image.apply(next(), &MetadataCommand::FenceNode { node_id: 1 });
        assert_eq!(shape(&image, "t", 0).2, 2000);
        let r = image.apply(next(), &elect(Election::Preferred, "t", 0));
        assert_eq!(code(&r), Some(PREFERRED_LEADER_NOT_AVAILABLE), "fenced: {r:?}");
        image.apply(next(), &MetadataCommand::UnfenceNode { node_id: 1 });
        let r = image.apply(next(), &elect(Election::Preferred, "t", 0));
        assert_eq!(code(&r), Some(PREFERRED_LEADER_NOT_AVAILABLE), "not in the ISR: {r:?}");
        assert_eq!(shape(&image, "t", 0).3, 1, "refusals change nothing");

        // The leader takes it back into the ISR once it caught up.
        let cmd = alter("t", 0, &image, vec![2000, 3000, 1000]);
        assert_eq!(image.apply(next(), &cmd), ok("t"));
        let epoch = partition_of(&image, "t", 0).partition_epoch;
        assert_eq!(image.apply(next(), &elect(Election::Preferred, "t", 0)), ok("t"));
        let p = partition_of(&image, "t", 0);
        assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (1000, 2, epoch + 1));
        assert_eq!(p.isr, vec![2000, 3000, 1000], "the ISR is unchanged");

        let r = image.apply(
            next(),
            &MetadataCommand::ElectLeaders {
                election: Election::Preferred,
                partitions: vec![("t".into(), 0), ("t".into(), 1), ("nope".into(), 0), ("t".into(), -1)],
            },
        );
        let codes: Vec<Option<i16>> = r.iter().map(|(_, r)| r.as_ref().err().map(|e| e.code)).collect();
        assert_eq!(
            codes,
            vec![
                Some(ELECTION_NOT_NEEDED),
                Some(UNKNOWN_TOPIC_OR_PARTITION),
                Some(UNKNOWN_TOPIC_OR_PARTITION),
                Some(UNKNOWN_TOPIC_OR_PARTITION)
            ]
        );
        assert_eq!(r.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["t", "t", "nope", "t"]);
    }

    #[test]
    fn unclean_election_only_for_leaderless_partitions() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000, 3000]])]));
        assert_eq!(code(&image.apply(next(), &elect(Election::Unclean, "t", 0))), Some(ELECTION_NOT_NEEDED));
        // Only the leader is in sync, then its node dies.
        let cmd = alter("t", 0, &image, vec![1000]);
        image.apply(next(), &cmd);
        image.apply(next(), &MetadataCommand::FenceNode { node_id: 1 });
        assert_eq!(shape(&image, "t", 0), (vec![1000, 2000, 3000], vec![1000], -1, 1, vec![], vec![]));
        assert_eq!(
            code(&image.apply(next(), &elect(Election::Preferred, "t", 0))),
            Some(PREFERRED_LEADER_NOT_AVAILABLE)
        );

        image.apply(next(), &MetadataCommand::FenceNode { node_id: 2 });
        assert_eq!(image.apply(next(), &elect(Election::Unclean, "t", 0)), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![1000, 2000, 3000], vec![3000], 3000, 2, vec![], vec![]));

        image.apply(next(), &MetadataCommand::FenceNode { node_id: 3 });
        assert_eq!(shape(&image, "t", 0).2, -1);
        let r = image.apply(next(), &elect(Election::Unclean, "t", 0));
        assert_eq!(code(&r), Some(ELIGIBLE_LEADERS_NOT_AVAILABLE), "{r:?}");
        // Node 2 comes back: out of sync, but it is all there is.
        image.apply(next(), &MetadataCommand::UnfenceNode { node_id: 2 });
        assert_eq!(shape(&image, "t", 0).2, -1, "unfencing alone never elects outside the ISR");
        assert_eq!(image.apply(next(), &elect(Election::Unclean, "t", 0)), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![1000, 2000, 3000], vec![2000], 2000, 4, vec![], vec![]));
    }

    #[test]
    fn unclean_candidates_follow_topic_then_dynamic_then_static_config() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        let two = vec![vec![1000, 2000]];
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("a", two.clone()), assigned("b", two)]));
        for t in ["a", "b"] {
            let cmd = alter(t, 0, &image, vec![1000]);
            image.apply(next(), &cmd);
        }
        assert!(image.unclean_election_candidates(true).is_empty(), "led partitions are no candidates");
        image.apply(next(), &MetadataCommand::FenceNode { node_id: 1 });
        let both = vec![("a".to_string(), 0), ("b".to_string(), 0)];
        assert_eq!(image.unclean_election_candidates(false), vec![]);
        assert_eq!(image.unclean_election_candidates(true), both);
        let on = BTreeMap::from([(UNCLEAN_LEADER_ELECTION_ENABLE.to_string(), "true".to_string())]);
        let off = BTreeMap::from([(UNCLEAN_LEADER_ELECTION_ENABLE.to_string(), "false".to_string())]);
        image.apply(next(), &MetadataCommand::SetTopicConfigs { topic: "a".into(), configs: on.clone() });
        assert_eq!(image.unclean_election_candidates(false), vec![("a".to_string(), 0)]);
        image.apply(next(), &MetadataCommand::SetBrokerConfigs(on));
        image.apply(next(), &MetadataCommand::SetTopicConfigs { topic: "b".into(), configs: off.clone() });
        assert_eq!(image.unclean_election_candidates(false), vec![("a".to_string(), 0)]);
        image.apply(next(), &MetadataCommand::SetBrokerConfigs(off));
        image.apply(next(), &MetadataCommand::SetTopicConfigs { topic: "b".into(), configs: BTreeMap::new() });
        assert_eq!(image.unclean_election_candidates(true), vec![("a".to_string(), 0)], "dynamic beats static");
        image.apply(next(), &MetadataCommand::FenceNode { node_id: 2 });
        assert!(image.unclean_election_candidates(true).is_empty(), "no live replica: nothing to elect");
    }

    #[test]
    fn reassignment_adds_a_replica_and_completes_when_it_is_in_sync() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000]])]));
        assert_eq!(image.apply(next(), &reassign("t", 0, Some(vec![1000, 2000, 3001]))), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![1000, 2000, 3001], vec![1000, 2000], 1000, 0, vec![3001], vec![]));
        assert_eq!(partition_of(&image, "t", 0).partition_epoch, 1);
        assert!(partition_of(&image, "t", 0).reassigning());
        // The same target again changes nothing but the epoch.
        assert_eq!(image.apply(next(), &reassign("t", 0, Some(vec![1000, 2000, 3001]))), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![1000, 2000, 3001], vec![1000, 2000], 1000, 0, vec![3001], vec![]));

        // The leader's ISR expansion completes it.
        let cmd = alter("t", 0, &image, vec![1000, 2000, 3001]);
        assert_eq!(image.apply(next(), &cmd), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![1000, 2000, 3001], vec![1000, 2000, 3001], 1000, 0, vec![], vec![]));
        assert!(!partition_of(&image, "t", 0).reassigning());
        assert_eq!(code(&image.apply(next(), &reassign("t", 0, None))), Some(NO_REASSIGNMENT_IN_PROGRESS));
    }

    #[test]
    fn reassignment_that_removes_the_leader_moves_leadership_at_completion() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000]])]));
        // Replace node 1 with node 3, node 3 preferred.
        assert_eq!(image.apply(next(), &reassign("t", 0, Some(vec![3000, 2000]))), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![3000, 2000, 1000], vec![1000, 2000], 1000, 0, vec![3000], vec![1000]));
        // ISR shrink of a target replica: still in progress.
        let cmd = alter("t", 0, &image, vec![1000]);
        image.apply(next(), &cmd);
        let cmd = alter("t", 0, &image, vec![1000, 3000]);
        image.apply(next(), &cmd);
        assert!(partition_of(&image, "t", 0).reassigning(), "2000 is out of sync");
        let cmd = alter("t", 0, &image, vec![1000, 3000, 2000]);
        assert_eq!(image.apply(next(), &cmd), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![3000, 2000], vec![3000, 2000], 3000, 1, vec![], vec![]));
    }

    #[test]
    fn reassignment_to_fewer_in_sync_replicas_completes_at_once() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000, 3000]])]));
        assert_eq!(image.apply(next(), &reassign("t", 0, Some(vec![2000, 3000]))), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![2000, 3000], vec![2000, 3000], 2000, 1, vec![], vec![]));
        // New partitions take partition 0's replica count, as in Kafka.
        image.apply(next(), &MetadataCommand::CreatePartitions { topic: "t".into(), count: 2 });
        assert_eq!(partition_of(&image, "t", 1).replicas.len(), 2);
    }

    #[test]
    fn cancel_and_replace_a_reassignment() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000]])]));
        let before = partition_of(&image, "t", 0).clone();
        image.apply(next(), &reassign("t", 0, Some(vec![1000, 2000, 3000])));
        // Replaced: the new target is taken from the original replicas.
        assert_eq!(image.apply(next(), &reassign("t", 0, Some(vec![1000, 3000]))), ok("t"));
        assert_eq!(shape(&image, "t", 0), (vec![1000, 3000, 2000], vec![1000, 2000], 1000, 0, vec![3000], vec![2000]));
        assert_eq!(image.apply(next(), &reassign("t", 0, None)), ok("t"));
        let p = partition_of(&image, "t", 0);
        assert_eq!(shape(&image, "t", 0), (before.replicas.clone(), before.isr.clone(), 1000, 0, vec![], vec![]));
        assert_eq!(p.partition_epoch, 3);
        assert_eq!(code(&image.apply(next(), &reassign("t", 0, None))), Some(NO_REASSIGNMENT_IN_PROGRESS));
        // Asking for what already is: nothing to do.
        let same = partition_of(&image, "t", 0).clone();
        assert_eq!(image.apply(next(), &reassign("t", 0, Some(vec![1000, 2000]))), ok("t"));
        assert_eq!(partition_of(&image, "t", 0), &same);
    }

    #[test]
    fn reassignment_refusals() {
        let (mut image, mut i) = three_nodes();
        let mut next = || {
            i += 1;
            i
        };
        image.apply(next(), &MetadataCommand::CreateTopics(vec![assigned("t", vec![vec![1000, 2000]])]));
        let before = image.topics.clone();
        for target in [
            vec![],
            vec![1000, 1000],
            vec![1000, 4000],
            vec![1000, 1002],
            vec![1000, 2005],
            vec![1000, -1],
            vec![2000, 3000, 3001],
            vec![1001, 2000],
        ] {
            let r = image.apply(next(), &reassign("t", 0, Some(target.clone())));
            assert_eq!(code(&r), Some(INVALID_REPLICA_ASSIGNMENT), "{target:?}: {r:?}");
            assert!(!refused(&r).message.is_empty());
        }
        let r = image.apply(next(), &reassign("t", 1, Some(vec![1000])));
        assert_eq!(code(&r), Some(UNKNOWN_TOPIC_OR_PARTITION));
        let r = image.apply(next(), &reassign("u", 0, None));
        assert_eq!(code(&r), Some(UNKNOWN_TOPIC_OR_PARTITION));
        assert_eq!(image.topics, before, "refusals change nothing");
    }

    #[test]
    fn partitions_without_reassignment_serialize_as_before() {
        let p = new_partition(vec![1000, 2000]);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("adding_replicas") && !json.contains("removing_replicas"), "{json}");
        let old = r#"{"replicas":[1000],"isr":[1000],"leader":1000,"leader_epoch":2,"partition_epoch":3}"#;
        let parsed: PartitionImage = serde_json::from_str(old).unwrap();
        assert!(!parsed.reassigning());
        assert_eq!(parsed.leader_epoch, 2);
    }

    #[test]
    fn apply_is_deterministic() {
        let commands = vec![
            MetadataCommand::InitCluster { cluster_id: "abc".into() },
            MetadataCommand::RegisterNode(reg(1, 2)),
            MetadataCommand::RegisterNode(reg(2, 2)),
            MetadataCommand::RegisterNode(reg(3, 2)),
            MetadataCommand::CreateTopics(vec![topic("x", 7, 2), topic("y", 3, 3)]),
            MetadataCommand::FenceNode { node_id: 2 },
            MetadataCommand::CreatePartitions { topic: "x".into(), count: 9 },
            MetadataCommand::UnfenceNode { node_id: 2 },
            MetadataCommand::DeleteTopics(vec!["y".into()]),
            MetadataCommand::AlterReassignments(vec![Reassignment {
                topic: "x".into(),
                partition: 0,
                target: Some(vec![1000, 2000, 3000]),
            }]),
            MetadataCommand::ElectLeaders { election: Election::Preferred, partitions: vec![("x".into(), 1)] },
        ];
        let run = || {
            let mut image = ClusterImage::default();
            let results: Vec<ApplyResult> =
                commands.iter().enumerate().map(|(i, c)| image.apply(i as u64 + 1, c)).collect();
            (image, results)
        };
        let (a, ra) = run();
        let (b, rb) = run();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert_eq!(a.version, commands.len() as u64);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<ClusterImage>(&json).unwrap(), a);
    }
}
