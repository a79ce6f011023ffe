//! The controller's cluster side: metadata changes go to the Raft quorum as
//! `MetadataCommand`s, and committed `ClusterImage`s come back through the
//! quorum's watch, are translated into this node's `MetadataImage` and
//! published to the shards.
//!
//! Runs on shard 0, inside the `Controller`. The quorum itself runs on the
//! `controller` thread (tidelog-quorum); the handle's futures are
//! runtime-agnostic, so awaiting them here never blocks the shard.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use tidelog_protocol::ErrorCode;
use tidelog_quorum::{
    broker_id, split_broker_id, ApplyResult, ClusterImage, CreateTopic, MetadataCommand, QuorumError, QuorumHandle,
};

use super::Controller;
use crate::metadata::{MetadataImage, TopicMeta, NO_SHARD};
use crate::shard::{NewTopic, TopicResult};

/// How often `follow_quorum` looks for a new quorum leader between images.
const LEADER_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// This node's link to the quorum.
#[derive(Clone)]
pub struct ClusterLink {
    pub handle: QuorumHandle,
    pub node_id: u32,
    pub num_shards: usize,
}

/// This node's view of a cluster image: every topic, with `owners` naming
/// the local shard that holds each partition's replica (`NO_SHARD` where
/// this node holds none).
pub fn translate(cluster: &ClusterImage, node_id: u32, num_shards: usize, controller: Option<u32>) -> MetadataImage {
    let topics = cluster
        .topics
        .values()
        .map(|t| {
            let owners = t
                .partitions
                .iter()
                .map(|p| {
                    p.replicas
                        .iter()
                        .map(|b| split_broker_id(*b))
                        .find(|(node, shard)| *node == node_id && (*shard as usize) < num_shards)
                        .map(|(_, shard)| shard)
                        .unwrap_or(NO_SHARD)
                })
                .collect();
            let meta = TopicMeta {
                name: t.name.clone(),
                id: t.id.clone(),
                owners,
                partitions: t.partitions.clone(),
                configs: t.configs.clone(),
            };
            (t.name.clone(), Arc::new(meta))
        })
        .collect();
    MetadataImage {
        version: cluster.version,
        cluster_id: cluster.cluster_id.clone(),
        topics,
        broker_configs: cluster.broker_configs.clone(),
        nodes: cluster.nodes.clone(),
        local_node: Some(node_id),
        controller_id: controller.map(|n| broker_id(n, 0)),
    }
}

fn refusal(e: QuorumError) -> (ErrorCode, String) {
    match e {
        QuorumError::NoQuorum(m) => {
            // As in Kafka, a timed-out change is in doubt: a leader that took
            // it into its log commits it once a majority is back.
            (
                ErrorCode::RequestTimedOut,
                format!(
                    "metadata change not committed by the controller quorum in time ({m}); it may still be applied \
                     once a majority of the voters is back: check before retrying"
                ),
            )
        }
        QuorumError::Stopped => (ErrorCode::NotController, "the controller is stopping; retry".to_string()),
        other => (ErrorCode::UnknownServerError, other.to_string()),
    }
}

/// Submits a per-partition admin command (ElectLeaders, reassignments)
/// straight from the shard that received the request, and waits until this
/// shard applied the image that carries its result (published by the
/// controller's `follow_quorum`, like every other change), so the client's
/// next request here already sees it. Per-entry results in command order.
pub async fn submit_from_shard(
    shard: &crate::shard::Shard,
    command: MetadataCommand,
) -> Result<ApplyResult, (ErrorCode, String)> {
    let Some(quorum) = shard.replication.quorum() else {
        return Err((ErrorCode::NotController, "this node is not part of a cluster".to_string()));
    };
    let (index, result) = quorum.submit(command).await.map_err(refusal)?;
    loop {
        let applied = shard.image_notify.notified();
        if shard.image().version >= index {
            return Ok(result);
        }
        applied.await;
    }
}

impl Controller {
    fn link(&self) -> &ClusterLink {
        // Only called on the cluster paths, which check `cluster` first.
        match &self.cluster {
            Some(link) => link,
            None => unreachable!("cluster path taken on a single node"),
        }
    }

    /// Follows the quorum: publishes every newer committed image to the
    /// shards, in order. The only publisher in a cluster.
    pub(super) async fn follow_quorum(self: Rc<Self>) {
        let link = self.link().clone();
        let mut watch = link.handle.watch();
        loop {
            let cluster = watch.borrow_and_update().clone();
            let leader = link.handle.status().leader;
            let current = self.image();
            // A new quorum leader changes no image, but clients must be told
            // the controller that now answers (the old one may be gone).
            let leader_moved =
                current.controller_id != leader.map(|n| broker_id(n, 0)) && cluster.version >= current.version;
            if cluster.version > current.version || current.local_node.is_none() || leader_moved {
                let image = translate(&cluster, link.node_id, link.num_shards, leader);
                log::debug!(
                    "controller: applying metadata version {} ({} node(s), {} topic(s))",
                    image.version,
                    image.nodes.len(),
                    image.topics.len()
                );
                self.publish(Arc::new(image)).await;
            }
            let changed = Box::pin(watch.changed());
            let tick = Box::pin(glommio::timer::sleep(LEADER_CHECK_INTERVAL));
            if let futures::future::Either::Left((Err(_), _)) = futures::future::select(changed, tick).await {
                log::warn!("controller: the quorum stopped; metadata stays at version {}", self.image().version);
                return;
            }
        }
    }

    /// Submits `command` and waits until every shard applied its result.
    async fn submit(&self, command: MetadataCommand) -> Result<ApplyResult, (ErrorCode, String)> {
        let (index, result) = self.link().handle.submit(command).await.map_err(refusal)?;
        loop {
            let notified = self.published_notify.notified();
            if self.image().version >= index {
                return Ok(result);
            }
            notified.await;
        }
    }

    /// Per-name results of one submitted command, with the topics as the
    /// shards now see them.
    async fn submit_for(&self, names: &[String], command: MetadataCommand) -> Vec<TopicResult> {
        let outcome = self.submit(command).await;
        let image = self.image();
        names
            .iter()
            .map(|name| {
                let r = match &outcome {
                    Err(e) => Err(e.clone()),
                    Ok(results) => match results.iter().find(|(n, _)| n == name).map(|(_, r)| r) {
                        Some(Err(refused)) => Err((ErrorCode::from_code(refused.code), refused.message.clone())),
                        Some(Ok(())) | None => match image.topics.get(name) {
                            Some(meta) => Ok(meta.clone()),
                            None => Ok(Arc::new(TopicMeta {
                                name: name.clone(),
                                id: String::new(),
                                owners: Vec::new(),
                                partitions: Vec::new(),
                                configs: BTreeMap::new(),
                            })),
                        },
                    },
                };
                (name.clone(), r)
            })
            .collect()
    }

    pub(super) async fn cluster_create(&self, topics: Vec<NewTopic>) -> Vec<TopicResult> {
        let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
        let commands = topics
            .into_iter()
            .map(|t| CreateTopic {
                id: uuid::Uuid::new_v4().simple().to_string(),
                name: t.name,
                partitions: t.partitions,
                replication_factor: t.replication_factor,
                assignments: t.assignments,
                configs: t.configs,
            })
            .collect();
        let results = self.submit_for(&names, MetadataCommand::CreateTopics(commands)).await;
        for (name, r) in &results {
            match r {
                Ok(meta) => log::info!(
                    "controller: created topic {name}: replicas {:?}",
                    meta.partitions.iter().map(|p| &p.replicas).collect::<Vec<_>>()
                ),
                Err((code, msg)) => log::info!("controller: topic {name} not created: {} ({msg})", code.name()),
            }
        }
        results
    }

    pub(super) async fn cluster_delete(&self, names: Vec<String>) -> Vec<TopicResult> {
        let results = self.submit_for(&names, MetadataCommand::DeleteTopics(names.clone())).await;
        for (name, r) in &results {
            if r.is_ok() {
                log::info!("controller: deleted topic {name}");
            }
        }
        results
    }

    pub(super) async fn cluster_create_partitions(&self, topics: Vec<(String, i32)>) -> Vec<TopicResult> {
        let mut out = Vec::with_capacity(topics.len());
        for (topic, count) in topics {
            let names = [topic.clone()];
            out.extend(self.submit_for(&names, MetadataCommand::CreatePartitions { topic, count }).await);
        }
        out
    }

    /// AlterConfigs in a cluster: `image` holds the configs the single-node
    /// path would persist; submit what differs from the current image.
    pub(super) async fn cluster_commit_configs(&self, image: MetadataImage, results: &mut [crate::shard::TopicResult]) {
        let current = self.image();
        let mut commands: Vec<(String, MetadataCommand)> = Vec::new();
        for (name, meta) in &image.topics {
            if current.topics.get(name).is_some_and(|c| c.configs != meta.configs) {
                commands.push((
                    name.clone(),
                    MetadataCommand::SetTopicConfigs { topic: name.clone(), configs: meta.configs.clone() },
                ));
            }
        }
        if image.broker_configs != current.broker_configs {
            commands.push((String::new(), MetadataCommand::SetBrokerConfigs(image.broker_configs.clone())));
        }
        for (name, command) in commands {
            let outcome = self.submit(command).await;
            let failure = match outcome {
                Err(e) => Some(e),
                Ok(r) => r.into_iter().find_map(|(_, r)| r.err()).map(|f| (ErrorCode::from_code(f.code), f.message)),
            };
            if let Some(e) = failure {
                for (n, r) in results.iter_mut() {
                    if *n == name && r.is_ok() {
                        *r = Err(e.clone());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidelog_quorum::{NodeRegistration, PartitionImage, TopicImage};

    #[test]
    fn translate_names_the_local_replica_shard() {
        let mut cluster = ClusterImage { version: 7, cluster_id: "c".into(), ..Default::default() };
        for n in 1..=3 {
            cluster.nodes.insert(
                n,
                NodeRegistration {
                    node_id: n,
                    incarnation: "i".into(),
                    host: "h".into(),
                    port: 9000,
                    num_shards: 2,
                    rack: None,
                    fenced: false,
                    broker_epoch: -1,
                },
            );
        }
        let p = |replicas: Vec<i32>| PartitionImage {
            isr: replicas.clone(),
            leader: replicas[0],
            replicas,
            leader_epoch: 3,
            partition_epoch: 4,
            adding_replicas: Vec::new(),
            removing_replicas: Vec::new(),
        };
        cluster.topics.insert(
            "t".into(),
            TopicImage {
                name: "t".into(),
                id: "00".repeat(16),
                partitions: vec![p(vec![2001, 1000]), p(vec![3000, 1001]), p(vec![3001])],
                configs: BTreeMap::new(),
            },
        );
        let image = translate(&cluster, 2, 2, Some(1));
        let t = &image.topics["t"];
        assert_eq!(t.owners, vec![1, NO_SHARD, NO_SHARD]);
        assert_eq!(image.controller_broker(), 1000);
        // Node 2 leads partition 0 on shard 1, and nothing else.
        assert_eq!(image.owner("t", 0), Some(tidelog_protocol::ShardId(1)));
        assert_eq!(image.owner("t", 1), Some(tidelog_protocol::ShardId(NO_SHARD)));
        assert_eq!(image.leader_epoch("t", 0), 3);
        // Node 1 holds a follower replica of partition 0 but does not lead it.
        let image1 = translate(&cluster, 1, 2, Some(1));
        assert_eq!(image1.topics["t"].owners, vec![0, 1, NO_SHARD]);
        assert_eq!(image1.owner("t", 0), Some(tidelog_protocol::ShardId(NO_SHARD)));
    }
}
