//! The controller: the one task (on shard 0) that changes metadata, and its
//! link to the controller quorum in a cluster.
//!
//! ```text
//!   shard i ──ToController──▶ Controller (shard 0) ──FromController::Apply──▶ every shard
//!   (CreateTopics, ...)          │        ▲                (each applies the image:
//!                                │        │                 opens/deletes partition logs)
//!            single node:        │        │  cluster (process.roles set):
//!   persist tidelog-metadata.json│        │  watch() of the quorum's ClusterImage,
//!   then broadcast               ▼        │  translated for this node (`cluster`)
//!                          QuorumHandle::submit ──▶ controller thread (tidelog-quorum,
//!                                                   openraft on tokio, off the data path)
//! ```
//!
//! On a single node (no `process.roles`) the controller owns the metadata:
//! it persists each new image before broadcasting it. In a cluster the
//! metadata log of the Raft quorum owns it: the controller turns requests
//! into `MetadataCommand`s, submits them and answers once the committed
//! result has come back through the watch and every shard applied it, so a
//! client can use a topic as soon as it is told it exists. Only the watch
//! publishes images in a cluster, so shards see them in log order.
//!
//! Lives on shard 0; reached from other shards only through the bounded
//! controller channels.

pub mod cluster;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use tidelog_protocol::ErrorCode;

use crate::config::Config;
use crate::metadata::{self, MetadataImage, TopicMeta};
use crate::notify::Notify;
use crate::shard::{FromController, NewTopic, ToController, TopicResult};

/// The controller: shard 0's task that owns metadata changes.
pub struct Controller {
    pub config: Arc<Config>,
    pub image: RefCell<Arc<MetadataImage>>,
    pub to_shards: Vec<ConnectedSender<FromController>>,
    applied: RefCell<Vec<u64>>,
    applied_notify: Notify,
    /// Set in a cluster: the quorum this node's metadata comes from.
    cluster: Option<cluster::ClusterLink>,
    /// Woken when a new image has been applied by every shard.
    published_notify: Notify,
}

impl Controller {
    pub fn new(
        config: Arc<Config>,
        image: Arc<MetadataImage>,
        to_shards: Vec<ConnectedSender<FromController>>,
        cluster: Option<cluster::ClusterLink>,
    ) -> Rc<Controller> {
        let n = to_shards.len();
        Rc::new(Controller {
            config,
            image: RefCell::new(image),
            to_shards,
            applied: RefCell::new(vec![0; n]),
            applied_notify: Notify::default(),
            cluster,
            published_notify: Notify::default(),
        })
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.image.borrow().clone()
    }

    /// What this node knows of the quorum (cluster mode).
    pub fn quorum_status(&self) -> Option<tidelog_quorum::QuorumStatus> {
        self.cluster.as_ref().map(|c| c.handle.status())
    }

    /// Handles requests from every shard, one at a time.
    pub async fn run(self: Rc<Self>, inbox: Vec<ConnectedReceiver<ToController>>) {
        if self.cluster.is_some() {
            glommio::spawn_local(self.clone().follow_quorum()).detach();
        }
        let (tx, rx) = glommio::channels::local_channel::new_bounded::<ToController>(1024);
        let tx = Rc::new(tx);
        for receiver in inbox {
            let tx = tx.clone();
            let me = self.clone();
            glommio::spawn_local(async move {
                while let Some(msg) = receiver.recv().await {
                    match msg {
                        ToController::Applied { from, version } => {
                            let mut a = me.applied.borrow_mut();
                            a[from] = a[from].max(version);
                            drop(a);
                            me.applied_notify.notify_all();
                        }
                        other => {
                            if tx.send(other).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .detach();
        }
        while let Some(msg) = rx.recv().await {
            let (from, req_id, results) = match msg {
                ToController::CreateTopics { from, req_id, topics } => (from, req_id, self.create(topics).await),
                ToController::DeleteTopics { from, req_id, names } => (from, req_id, self.delete(names).await),
                ToController::AlterConfigs { from, req_id, changes } => {
                    (from, req_id, self.alter_configs(changes).await)
                }
                ToController::CreatePartitions { from, req_id, topics } => {
                    (from, req_id, self.create_partitions(topics).await)
                }
                ToController::Applied { .. } => continue,
            };
            if let Some(to) = self.to_shards.get(from) {
                let _ = to.send(FromController::Done { req_id, results }).await;
            }
        }
    }

    async fn create(&self, topics: Vec<NewTopic>) -> Vec<TopicResult> {
        if self.cluster.is_some() {
            return self.cluster_create(topics).await;
        }
        let mut image = (*self.image.borrow().clone()).clone();
        let mut results = Vec::with_capacity(topics.len());
        for t in topics {
            if image.topics.contains_key(&t.name) {
                results.push((
                    t.name.clone(),
                    Err((ErrorCode::TopicAlreadyExists, format!("topic '{}' already exists", t.name))),
                ));
                continue;
            }
            let meta = Arc::new(TopicMeta {
                partitions: Vec::new(),
                owners: crate::groups::internal_placement(&t.name, t.partitions as usize, self.to_shards.len())
                    .or_else(|| crate::txn::internal_placement(&t.name, t.partitions as usize, self.to_shards.len()))
                    .unwrap_or_else(|| {
                        metadata::place_partitions(&t.name, t.partitions as usize, self.to_shards.len())
                    }),
                id: uuid::Uuid::new_v4().simple().to_string(),
                name: t.name.clone(),
                configs: t.configs,
            });
            image.topics.insert(t.name.clone(), meta.clone());
            log::info!(
                "controller: creating topic {} with {} partition(s) on shards {:?}",
                meta.name,
                meta.owners.len(),
                meta.owners
            );
            results.push((t.name, Ok(meta)));
        }
        self.commit(image, &mut results).await;
        results
    }

    async fn delete(&self, names: Vec<String>) -> Vec<TopicResult> {
        if self.cluster.is_some() {
            return self.cluster_delete(names).await;
        }
        let mut image = (*self.image.borrow().clone()).clone();
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            match image.topics.remove(&name) {
                Some(meta) => {
                    log::info!("controller: deleting topic {name}");
                    results.push((name, Ok(meta)));
                }
                None => results.push((
                    name.clone(),
                    Err((ErrorCode::UnknownTopicOrPartition, format!("topic '{name}' does not exist"))),
                )),
            }
        }
        self.commit(image, &mut results).await;
        results
    }

    async fn alter_configs(&self, changes: Vec<crate::topic_config::ConfigChange>) -> Vec<TopicResult> {
        use crate::topic_config::{apply_ops, topic_value, ConfigResource};
        let mut image = (*self.image.borrow().clone()).clone();
        let mut results = Vec::with_capacity(changes.len());
        for change in changes {
            match &change.resource {
                ConfigResource::Topic(name) => {
                    let Some(meta) = image.topics.get(name).cloned() else {
                        results.push((
                            name.clone(),
                            Err((ErrorCode::UnknownTopicOrPartition, format!("topic '{name}' does not exist"))),
                        ));
                        continue;
                    };
                    let effective = |k: &str| topic_value(&self.config, &image, &meta, k);
                    match apply_ops(&meta.configs, &change, &effective) {
                        Ok(configs) => {
                            log::info!("controller: topic {name} configs {:?} -> {:?}", meta.configs, configs);
                            let new = Arc::new(TopicMeta { configs, ..(*meta).clone() });
                            image.topics.insert(name.clone(), new.clone());
                            results.push((name.clone(), Ok(new)));
                        }
                        Err(e) => results.push((name.clone(), Err((ErrorCode::InvalidConfig, e)))),
                    }
                }
                ConfigResource::Broker => {
                    let effective = |k: &str| {
                        crate::topic_config::broker_synonyms(&self.config, &image, k)
                            .into_iter()
                            .next()
                            .map(|r| r.value)
                            .unwrap_or_default()
                    };
                    match apply_ops(&image.broker_configs, &change, &effective) {
                        Ok(configs) => {
                            log::info!("controller: broker configs {:?} -> {:?}", image.broker_configs, configs);
                            image.broker_configs = configs;
                            let placeholder = Arc::new(TopicMeta {
                                name: String::new(),
                                id: String::new(),
                                owners: Vec::new(),
                                partitions: Vec::new(),
                                configs: BTreeMap::new(),
                            });
                            results.push((String::new(), Ok(placeholder)));
                        }
                        Err(e) => results.push((String::new(), Err((ErrorCode::InvalidConfig, e)))),
                    }
                }
            }
        }
        self.commit(image, &mut results).await;
        results
    }

    async fn create_partitions(&self, topics: Vec<(String, i32)>) -> Vec<TopicResult> {
        if self.cluster.is_some() {
            return self.cluster_create_partitions(topics).await;
        }
        let mut image = (*self.image.borrow().clone()).clone();
        let mut results = Vec::with_capacity(topics.len());
        for (name, count) in topics {
            let Some(meta) = image.topics.get(&name).cloned() else {
                results.push((
                    name.clone(),
                    Err((ErrorCode::UnknownTopicOrPartition, format!("topic '{name}' does not exist"))),
                ));
                continue;
            };
            let current = meta.owners.len() as i32;
            if count <= current || count > 100_000 {
                results.push((
                    name.clone(),
                    Err((
                        ErrorCode::InvalidPartitions,
                        format!("topic '{name}' has {current} partitions; the new count {count} must be larger (and at most 100000)"),
                    )),
                ));
                continue;
            }
            let placed = metadata::place_partitions(&name, count as usize, self.to_shards.len());
            let mut owners = meta.owners.clone();
            owners.extend_from_slice(&placed[owners.len()..]);
            log::info!("controller: topic {name}: {current} -> {count} partitions on shards {owners:?}");
            let new = Arc::new(TopicMeta { owners, ..(*meta).clone() });
            image.topics.insert(name.clone(), new.clone());
            results.push((name, Ok(new)));
        }
        self.commit(image, &mut results).await;
        results
    }

    /// Persists `image` and waits until every shard applied it. On a failed
    /// write nothing changes and every successful result becomes an error.
    async fn commit(&self, mut image: MetadataImage, results: &mut [TopicResult]) {
        if results.iter().all(|(_, r)| r.is_err()) {
            return;
        }
        if self.cluster.is_some() {
            // Only AlterConfigs reaches here in a cluster.
            self.cluster_commit_configs(image, results).await;
            return;
        }
        image.version += 1;
        let version = image.version;
        let dir = self.config.log_dir.clone();
        let to_write = image.clone();
        let persisted = glommio::executor().spawn_blocking(move || metadata::persist(&dir, &to_write)).await;
        if let Err(e) = persisted {
            log::error!("controller: cannot persist metadata version {version}: {e}");
            for (_, r) in results.iter_mut() {
                if r.is_ok() {
                    *r = Err((ErrorCode::KafkaStorageError, format!("metadata write failed: {e}")));
                }
            }
            return;
        }
        self.publish(Arc::new(image)).await;
    }

    /// Hands `image` to every shard and waits until all of them applied it.
    async fn publish(&self, image: Arc<MetadataImage>) {
        let version = image.version;
        self.image.replace(image.clone());
        for to in &self.to_shards {
            let _ = to.send(FromController::Apply(image.clone())).await;
        }
        loop {
            let notified = self.applied_notify.notified();
            if self.applied.borrow().iter().all(|v| *v >= version) {
                break;
            }
            notified.await;
        }
        self.published_notify.notify_all();
    }
}
