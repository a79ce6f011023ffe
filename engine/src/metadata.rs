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

pub const METADATA_FILE: &str = "tidelog-metadata.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicMeta {
    pub name: String,
    /// Kafka topic id (UUID), as 32 hex digits.
    pub id: String,
    /// Owning shard of each partition, by partition index.
    pub owners: Vec<u32>,
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
}

impl MetadataImage {
    pub fn owner(&self, topic: &str, partition: i32) -> Option<ShardId> {
        let t = self.topics.get(topic)?;
        let p = usize::try_from(partition).ok()?;
        t.owners.get(p).map(|s| ShardId(*s))
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
                configs: BTreeMap::new(),
            }),
        );
        persist(&dir, &image).unwrap();
        let back = MetadataImage::load(&dir, 2).unwrap();
        assert_eq!(back.cluster_id, image.cluster_id);
        assert_eq!(back.topics["a"].owners, vec![0, 1, 0, 1]);
    }
}
