//! Cluster metadata: topics, their ids, configs and which shard owns each
//! partition.
//!
//! Owned by the controller on shard 0, which persists every change to
//! `<log.dirs>/tidelog-metadata.json` (write temp, fdatasync, rename, fsync
//! dir) before broadcasting the new immutable image to every shard. Shards
//! hold an `Arc<MetadataImage>` (shared read-only) and swap it on update.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidelog_protocol::ShardId;
pub use tidelog_quorum::{broker_id, split_broker_id, NodeRegistration, PartitionImage as PartitionState};

use crate::config::Config;

pub const METADATA_FILE: &str = "tidelog-metadata.json";

/// `TopicMeta::owners` value of a partition with no replica on this node.
pub const NO_SHARD: u32 = u32::MAX;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicMeta {
    pub name: String,
    /// Kafka topic id (UUID), as 32 hex digits.
    pub id: String,
    /// Shard of this node holding each partition's replica, by partition
    /// index (`NO_SHARD`: none here). On a single node, the owning shard.
    pub owners: Vec<u32>,
    /// Replication state of each partition, from the metadata quorum; empty
    /// on a single node, where each partition's one replica is its owner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionState>,
    /// Topic-level config overrides (Kafka names).
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
}

impl TopicMeta {
    pub fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::parse_str(&self.id).unwrap_or(uuid::Uuid::nil())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MetadataImage {
    pub version: u64,
    pub cluster_id: String,
    pub topics: BTreeMap<String, Arc<TopicMeta>>,
    /// Dynamic broker config defaults set with AlterConfigs (see `topic_config`).
    #[serde(default)]
    pub broker_configs: BTreeMap<String, String>,
    /// Cluster mode: every registered node, from the metadata quorum.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<u32, NodeRegistration>,
    /// Cluster mode: this node's id (`None` on a single node).
    #[serde(skip)]
    pub local_node: Option<u32>,
    /// Cluster mode: broker id of the controller leader's shard 0 (-1 unknown).
    #[serde(skip)]
    pub controller_id: Option<i32>,
}

/// A broker (one shard of one node) as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerEndpoint {
    pub id: i32,
    pub host: String,
    pub port: i32,
    pub rack: Option<String>,
}

impl MetadataImage {
    /// The shard of this node that serves `partition` to clients: its owner
    /// on a single node, in a cluster the shard holding the leader replica.
    /// `Some(ShardId(NO_SHARD))` when the partition exists but is led elsewhere
    /// (so handlers answer NOT_LEADER_OR_FOLLOWER), `None` when it does not exist.
    pub fn owner(&self, topic: &str, partition: i32) -> Option<ShardId> {
        let t = self.topics.get(topic)?;
        let p = usize::try_from(partition).ok()?;
        let owner = *t.owners.get(p)?;
        match (self.local_node, t.partitions.get(p)) {
            (Some(node), Some(state)) => {
                let leads = state.leader >= 0 && split_broker_id(state.leader) == (node, owner);
                Some(ShardId(if leads { owner } else { NO_SHARD }))
            }
            _ => Some(ShardId(owner)),
        }
    }

    /// Replicas, ISR, leader and epochs of a partition (synthesised on a
    /// single node: the owner shard's broker is the one replica, epoch 0).
    pub fn partition_state(&self, t: &TopicMeta, partition: usize) -> Option<PartitionState> {
        if let Some(state) = t.partitions.get(partition) {
            return Some(state.clone());
        }
        let owner = *t.owners.get(partition)?;
        let id = broker_id(self.local_node.unwrap_or(0), owner);
        Some(PartitionState {
            replicas: vec![id],
            isr: vec![id],
            leader: id,
            leader_epoch: 0,
            partition_epoch: 0,
            adding_replicas: Vec::new(),
            removing_replicas: Vec::new(),
        })
    }

    /// Leader epoch of a partition this node serves (0 on a single node).
    pub fn leader_epoch(&self, topic: &str, partition: i32) -> i32 {
        let Some(t) = self.topics.get(topic) else { return -1 };
        usize::try_from(partition).ok().and_then(|p| t.partitions.get(p)).map(|s| s.leader_epoch).unwrap_or(0)
    }

    /// Whether this is a node of a multi-node cluster.
    pub fn clustered(&self) -> bool {
        self.local_node.is_some()
    }

    /// Every broker clients may use: each shard of every unfenced node (a
    /// single node: each of its shards, at `advertised port + shard`).
    pub fn brokers(&self, config: &Config, num_shards: usize) -> Vec<BrokerEndpoint> {
        if !self.clustered() {
            return (0..num_shards)
                .map(|i| BrokerEndpoint {
                    id: i as i32,
                    host: config.advertised_host.clone(),
                    port: config.advertised_port as i32 + i as i32,
                    rack: None,
                })
                .collect();
        }
        let mut out = Vec::new();
        for n in self.nodes.values().filter(|n| !n.fenced) {
            for shard in 0..n.num_shards {
                out.push(BrokerEndpoint {
                    id: broker_id(n.node_id, shard),
                    host: n.host.clone(),
                    port: n.port as i32 + shard as i32,
                    rack: Some(n.rack.clone().unwrap_or_else(|| format!("node-{}", n.node_id))),
                });
            }
        }
        out
    }

    /// Host and port of broker `id`, if it is known and not fenced.
    pub fn broker_endpoint(&self, config: &Config, num_shards: usize, id: i32) -> Option<BrokerEndpoint> {
        self.brokers(config, num_shards).into_iter().find(|b| b.id == id)
    }

    /// The broker id clients are told is the controller: shard 0 on a single
    /// node; in a cluster the quorum leader's shard 0, -1 while none is known.
    pub fn controller_broker(&self) -> i32 {
        match (self.controller_id, self.clustered()) {
            (Some(id), _) => id,
            (None, false) => 0,
            (None, true) => -1,
        }
    }

    /// Loads the image, or a fresh one for a new data dir. Owners beyond
    /// `num_shards` (the broker restarted with fewer shards) are remapped.
    pub fn load(dir: &Path, num_shards: usize) -> Result<MetadataImage, String> {
        let path = dir.join(METADATA_FILE);
        let mut image = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<MetadataImage>(&bytes)
                .map_err(|e| format!("{} is corrupt: {e}; restore it from a backup", path.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => MetadataImage {
                version: 0,
                cluster_id: new_cluster_id(),
                topics: BTreeMap::new(),
                broker_configs: BTreeMap::new(),
                ..Default::default()
            },
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        for topic in image.topics.values_mut() {
            if topic.owners.iter().any(|o| *o as usize >= num_shards) {
                let t = Arc::make_mut(topic);
                log::warn!("topic {}: shard count changed to {num_shards}; reassigning partitions", t.name);
                for o in t.owners.iter_mut() {
                    *o %= num_shards as u32;
                }
            }
        }
        Ok(image)
    }
}

fn new_cluster_id() -> String {
    let id = uuid::Uuid::new_v4();
    // Kafka cluster ids are 22-character base64 UUIDs; any stable string works for clients.
    id.simple().to_string()[..22].to_string()
}

/// Writes the image durably: temp file, fdatasync, rename, directory fsync.
/// Blocking: call through `spawn_blocking`.
pub fn persist(dir: &Path, image: &MetadataImage) -> io::Result<()> {
    use std::io::Write;
    let tmp: PathBuf = dir.join(format!("{METADATA_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(image).map_err(io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(METADATA_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Kafka's topic name rule: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is not allowed"));
    }
    if name.len() > 249 {
        return Err(format!("topic name is {} characters; the limit is 249", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '_' || *c == '-')) {
        return Err(format!(
            "topic name {name:?} contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Spreads a new topic's partitions over the shards, starting at a shard
/// picked from the name so that many small topics do not all start at 0.
pub fn place_partitions(name: &str, partitions: usize, num_shards: usize) -> Vec<u32> {
    let start = name.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) as usize;
    (0..partitions).map(|p| ((start + p) % num_shards) as u32).collect()
}

/// Kafka's internal topics: `__consumer_offsets` and `__transaction_state`.
pub fn is_internal_topic(name: &str) -> bool {
    name == crate::groups::OFFSETS_TOPIC || name == crate::txn::TXN_TOPIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka() {
        assert!(validate_topic_name("orders.v1_x-2").is_ok());
        for bad in ["", ".", "..", "bad/name", "sp ace", "ü"] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_topic_name(&"a".repeat(249)).is_ok());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }

    #[test]
    fn placement_spreads_evenly() {
        let owners = place_partitions("t", 6, 2);
        assert_eq!(owners.iter().filter(|o| **o == 0).count(), 3);
        assert_eq!(owners.iter().filter(|o| **o == 1).count(), 3);
    }

    #[test]
    fn persist_and_load_remaps_missing_shards() {
        let dir = crate::test_dir("meta");
        let mut image = MetadataImage::load(&dir, 4).unwrap();
        image.topics.insert(
            "a".into(),
            Arc::new(TopicMeta {
                name: "a".into(),
                id: uuid::Uuid::new_v4().simple().to_string(),
                owners: vec![0, 1, 2, 3],
                partitions: Vec::new(),
                configs: BTreeMap::new(),
            }),
        );
        persist(&dir, &image).unwrap();
        let back = MetadataImage::load(&dir, 2).unwrap();
        assert_eq!(back.cluster_id, image.cluster_id);
        assert_eq!(back.topics["a"].owners, vec![0, 1, 0, 1]);
    }
}
