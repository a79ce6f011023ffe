//! Black-box tests of the controller quorum: three in-process voters (each on
//! its own `controller` thread) on loopback ports with their logs under
//! target/, plus broker-only nodes. The handles' futures are driven with
//! `futures::executor::block_on`, outside any tokio runtime, as a glommio
//! shard would.
//!
//! Timeouts are generous (the CI box has two slow cores); the assertions are
//! about what happens, not how fast.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use tidelog_quorum::{
    broker_id, ClusterImage, CreateTopic, MetadataCommand, NodeRegistration, Quorum, QuorumConfig, QuorumError,
    QuorumHandle,
};

const WAIT: Duration = Duration::from_secs(30);

fn init_logging() {
    let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Info).try_init();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn test_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("quorum-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out after {WAIT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn registration(node: u32, shards: u32, incarnation: &str) -> NodeRegistration {
    NodeRegistration {
        node_id: node,
        incarnation: incarnation.to_string(),
        host: "127.0.0.1".to_string(),
        port: 19092 + node as u16 * 100,
        num_shards: shards,
        rack: None,
        fenced: false,
        broker_epoch: -1,
    }
}

fn topic(name: &str, partitions: i32, rf: i16) -> CreateTopic {
    CreateTopic {
        name: name.to_string(),
        id: tidelog_quorum::new_topic_id(),
        partitions,
        replication_factor: rf,
        assignments: Vec::new(),
        configs: BTreeMap::new(),
    }
}

fn assigned(name: &str, assignments: Vec<Vec<i32>>) -> CreateTopic {
    CreateTopic { assignments, ..topic(name, 0, 0) }
}

/// Three voters (ids 1, 2, 3) and any broker-only nodes the test adds.
struct Cluster {
    name: String,
    voters: BTreeMap<u32, SocketAddr>,
    dirs: BTreeMap<u32, PathBuf>,
    running: BTreeMap<u32, Quorum>,
    request_timeout_ms: u64,
    session_timeout_ms: u64,
}

impl Cluster {
    fn new(name: &str, request_timeout_ms: u64, session_timeout_ms: u64) -> Cluster {
        init_logging();
        let voters = (1..=3).map(|id| (id, SocketAddr::from(([127, 0, 0, 1], free_port())))).collect();
        let base = test_dir(name);
        let dirs = (1..=3).map(|id| (id, base.join(format!("node-{id}")))).collect();
        Cluster {
            name: name.to_string(),
            voters,
            dirs,
            running: BTreeMap::new(),
            request_timeout_ms,
            session_timeout_ms,
        }
    }

    fn config(&self, node: u32) -> QuorumConfig {
        let voter = self.voters.contains_key(&node);
        QuorumConfig {
            node_id: node,
            voters: self.voters.clone(),
            controller_listen: if voter { Some(self.voters[&node]) } else { None },
            dir: self.dirs.get(&node).cloned().unwrap_or_else(|| test_dir(&format!("{}-broker-{node}", self.name))),
            election_timeout_ms: 800,
            raft_heartbeat_interval_ms: 150,
            request_timeout_ms: self.request_timeout_ms,
            heartbeat_interval_ms: 200,
            session_timeout_ms: self.session_timeout_ms,
            unclean_leader_election_enable: false,
        }
    }

    fn start(&mut self, node: u32) -> QuorumHandle {
        let quorum = Quorum::start(self.config(node)).unwrap_or_else(|e| panic!("node {node} did not start: {e}"));
        let handle = quorum.handle();
        self.running.insert(node, quorum);
        handle
    }

    fn start_voters(&mut self) {
        for id in 1..=3 {
            self.start(id);
        }
    }

    fn stop(&mut self, node: u32) {
        self.running.remove(&node).expect("node is running").stop();
    }

    fn handle(&self, node: u32) -> QuorumHandle {
        self.running[&node].handle()
    }

    fn running_voters(&self) -> Vec<u32> {
        self.running.keys().copied().filter(|id| self.voters.contains_key(id)).collect()
    }

    /// Waits until every running voter names the same running leader.
    fn leader(&self) -> u32 {
        let mut leader = 0;
        wait_until("one leader all running voters agree on", || {
            let seen: Vec<Option<u32>> =
                self.running_voters().iter().map(|&id| self.handle(id).status().leader).collect();
            match seen.first() {
                Some(&Some(l)) if seen.iter().all(|s| *s == Some(l)) && self.running.contains_key(&l) => {
                    leader = l;
                    true
                }
                _ => false,
            }
        });
        leader
    }

    fn follower(&self) -> u32 {
        let leader = self.leader();
        self.running_voters().into_iter().find(|&id| id != leader).expect("a running follower")
    }

    fn register_voters_as_brokers(&self) {
        for id in self.running_voters() {
            block_on(self.handle(id).register(registration(id, 2, &format!("voter-{id}"))))
                .unwrap_or_else(|e| panic!("node {id} did not register: {e}"));
        }
    }

    fn wait_all_images(&self, what: &str, mut check: impl FnMut(&ClusterImage) -> bool) {
        wait_until(what, || self.running.values().all(|q| check(&q.handle().image())));
    }
}

#[test]
fn topics_created_through_a_follower_reach_every_image() {
    let mut cluster = Cluster::new("create", 10_000, 30_000);
    cluster.start_voters();
    let leader = cluster.leader();
    cluster.wait_all_images("a cluster id", |image| image.cluster_id.len() == 22);
    let cluster_id = cluster.handle(leader).image().cluster_id.clone();
    cluster.wait_all_images("the same cluster id", |image| image.cluster_id == cluster_id);
    cluster.register_voters_as_brokers();

    let follower = cluster.follower();
    let handle = cluster.handle(follower);
    let (index, result) =
        block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic("orders", 6, 3), topic("audit", 2, 1)])))
            .unwrap();
    assert_eq!(result, vec![("orders".to_string(), Ok(())), ("audit".to_string(), Ok(()))]);
    // Resolved only once this node's own image has the entry.
    let image = handle.image();
    assert!(image.version >= index, "image version {} < entry index {index}", image.version);
    let orders = &image.topics["orders"];
    assert_eq!(orders.partitions.len(), 6);
    for p in &orders.partitions {
        let mut nodes: Vec<u32> = p.replicas.iter().map(|&r| tidelog_quorum::split_broker_id(r).0).collect();
        nodes.sort_unstable();
        assert_eq!(nodes, vec![1, 2, 3], "one replica per node: {p:?}");
        assert_eq!(p.leader, p.replicas[0]);
    }

    cluster.wait_all_images("the topics on every voter", |i| i.version >= index);
    let images: Vec<Arc<ClusterImage>> = cluster.running.values().map(|q| q.handle().image()).collect();
    for other in &images[1..] {
        assert_eq!(other.topics, images[0].topics);
        assert_eq!(other.nodes, images[0].nodes);
    }

    // A refused command is committed too, with its refusal.
    let (_, result) = block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic("orders", 1, 1)]))).unwrap();
    assert_eq!(result[0].1.as_ref().unwrap_err().code, 36);

    // A broker-only node follows the image and submits through the leader.
    let broker = cluster.start(7);
    wait_until("the broker-only node to see the topics", || broker.image().topics.contains_key("orders"));
    assert_eq!(broker.image().cluster_id, cluster_id);
    let mut watch = broker.watch();
    watch.mark_unchanged();
    let (index, result) =
        block_on(broker.submit(MetadataCommand::CreateTopics(vec![topic("from-broker", 3, 2)]))).unwrap();
    assert_eq!(result, vec![("from-broker".to_string(), Ok(()))]);
    assert!(broker.image().version >= index);
    assert_eq!(broker.image().topics["from-broker"].partitions.len(), 3);
    assert!(watch.has_changed().unwrap(), "watchers see the change");
    let status = broker.status();
    assert!(!status.is_voter);
    assert!(status.last_applied >= index);
    let status = cluster.handle(leader).status();
    assert!(status.is_voter && status.term >= 1 && status.leader == Some(leader));
}

#[test]
fn a_new_leader_takes_over_when_the_leader_stops() {
    let mut cluster = Cluster::new("failover", 10_000, 30_000);
    cluster.start_voters();
    cluster.register_voters_as_brokers();
    let old_leader = cluster.leader();
    let (before, _) =
        block_on(cluster.handle(old_leader).submit(MetadataCommand::CreateTopics(vec![topic("before", 3, 1)])))
            .unwrap();

    cluster.stop(old_leader);
    let new_leader = cluster.leader();
    assert_ne!(new_leader, old_leader);
    let survivor = cluster.running_voters().into_iter().find(|&id| id != new_leader).unwrap();
    for (i, via) in [survivor, new_leader].into_iter().enumerate() {
        let name = format!("after-{i}");
        let (index, result) =
            block_on(cluster.handle(via).submit(MetadataCommand::CreateTopics(vec![topic(&name, 2, 1)]))).unwrap();
        assert_eq!(result, vec![(name.clone(), Ok(()))]);
        assert!(index > before);
    }
    cluster.wait_all_images("both topics on the two survivors", |image| {
        ["before", "after-0", "after-1"].iter().all(|t| image.topics.contains_key(*t))
    });

    // The old leader comes back on its directory and catches up.
    cluster.start(old_leader);
    cluster.wait_all_images("all three topics everywhere", |image| image.topics.contains_key("after-1"));
}

#[test]
fn a_minority_commits_nothing_and_says_which_voters_are_missing() {
    let request_timeout_ms = 3_000;
    let mut cluster = Cluster::new("minority", request_timeout_ms, 30_000);
    cluster.start_voters();
    cluster.register_voters_as_brokers();
    let leader = cluster.leader();
    let survivor = cluster.follower();
    let other = cluster.running_voters().into_iter().find(|&id| id != leader && id != survivor).unwrap();
    cluster.stop(leader);
    cluster.stop(other);

    let handle = cluster.handle(survivor);
    let before = handle.image();
    let started = Instant::now();
    let err = block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic("lost", 1, 1)]))).unwrap_err();
    let elapsed = started.elapsed();
    let QuorumError::NoQuorum(message) = &err else { panic!("expected NoQuorum, got {err:?}") };
    assert!(message.contains(&format!("within {request_timeout_ms} ms")), "{message}");
    for stopped in [leader, other] {
        let named = format!("{stopped}@{}", cluster.voters[&stopped]);
        assert!(message.contains(&named), "{message} should name {named}");
    }
    assert!(message.contains("unreachable"), "{message}");
    assert!(elapsed < Duration::from_millis(request_timeout_ms) + Duration::from_secs(10), "gave up after {elapsed:?}");
    let after = handle.image();
    assert!(!after.topics.contains_key("lost"));
    assert_eq!(after.topics, before.topics, "nothing applied without a majority");

    // With a majority back, commits resume; the refused command never happened.
    cluster.start(other);
    let (_, result) = block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic("found", 1, 1)]))).unwrap();
    assert_eq!(result, vec![("found".to_string(), Ok(()))]);
    assert!(!handle.image().topics.contains_key("lost"));
}

#[test]
fn a_leader_left_alone_commits_nothing() {
    let request_timeout_ms = 3_000;
    let mut cluster = Cluster::new("alone", request_timeout_ms, 30_000);
    cluster.start_voters();
    cluster.register_voters_as_brokers();
    let leader = cluster.leader();
    for id in cluster.running_voters() {
        if id != leader {
            cluster.stop(id);
        }
    }
    let handle = cluster.handle(leader);
    let before = handle.image();
    let err = block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic("orphan", 1, 1)]))).unwrap_err();
    let QuorumError::NoQuorum(message) = &err else { panic!("expected NoQuorum, got {err:?}") };
    assert!(message.contains("could not commit"), "{message}");
    assert!(message.contains("voters: "), "{message}");
    let after = handle.image();
    assert!(!after.topics.contains_key("orphan"));
    assert_eq!(after.topics, before.topics);
}

#[test]
fn restarted_voters_rebuild_the_same_image_from_their_logs() {
    let mut cluster = Cluster::new("restart", 10_000, 30_000);
    cluster.start_voters();
    cluster.register_voters_as_brokers();
    let leader = cluster.leader();
    let handle = cluster.handle(leader);
    for i in 0..5 {
        block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic(&format!("t{i}"), 2, 2)]))).unwrap();
    }
    let configs = BTreeMap::from([("retention.ms".to_string(), "60000".to_string())]);
    let (last, _) =
        block_on(handle.submit(MetadataCommand::SetTopicConfigs { topic: "t3".to_string(), configs })).unwrap();
    cluster.wait_all_images("the last entry everywhere", |image| image.version >= last);

    // One follower down while the others move on, then back.
    let follower = cluster.follower();
    cluster.stop(follower);
    let (later, _) = block_on(handle.submit(MetadataCommand::DeleteTopics(vec!["t0".to_string()]))).unwrap();
    cluster.start(follower);
    cluster.wait_all_images("the restarted follower to catch up", |image| image.version >= later);

    // Everyone down; each voter's own disk gives back the image it had.
    cluster.wait_all_images("a quiet cluster", |image| image.version >= later && !image.cluster_id.is_empty());
    let handles: BTreeMap<u32, QuorumHandle> = (1..=3).map(|id| (id, cluster.handle(id))).collect();
    for id in 1..=3 {
        cluster.stop(id);
    }
    // Read after the stop: the last image each node applied.
    let images: BTreeMap<u32, Arc<ClusterImage>> = handles.iter().map(|(&id, h)| (id, h.image())).collect();
    for id in 1..=3 {
        // Alone, with no leader to learn from: the image comes from the log on disk.
        let restarted = cluster.start(id).image();
        assert!(restarted.version >= images[&id].version, "node {id} restarted at version {}", restarted.version);
        assert_eq!(restarted.topics, images[&id].topics, "node {id}");
        assert_eq!(restarted.nodes, images[&id].nodes, "node {id}");
        assert_eq!(restarted.cluster_id, images[&id].cluster_id, "node {id}");
        assert!(!restarted.topics.contains_key("t0"));
        assert_eq!(restarted.topics["t3"].configs["retention.ms"], "60000");
    }
    let leader = cluster.leader();
    let (_, result) =
        block_on(cluster.handle(leader).submit(MetadataCommand::CreateTopics(vec![topic("t9", 1, 1)]))).unwrap();
    assert_eq!(result, vec![("t9".to_string(), Ok(()))]);
}

#[test]
fn a_second_live_registration_of_a_node_id_is_refused() {
    // register() keeps trying for a session timeout before it gives up.
    let mut cluster = Cluster::new("duplicate", 10_000, 3_000);
    cluster.start_voters();
    cluster.register_voters_as_brokers();
    let first = cluster.start(8);
    block_on(first.register(registration(8, 2, "first"))).unwrap();

    // A second process with the same node.id (here: another broker-only node 8).
    let config = cluster.config(8);
    let second = Quorum::start(config).unwrap();
    let started = Instant::now();
    let err = block_on(second.handle().register(registration(8, 2, "second"))).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(3_000), "refused only after a whole session timeout");
    let QuorumError::DuplicateNode(message) = &err else { panic!("expected DuplicateNode, got {err:?}") };
    assert!(message.starts_with("node.id 8 is already registered by a running broker (incarnation first"), "{message}");
    assert!(message.contains("stop it or give this broker another node.id"), "{message}");
    let image = first.image();
    assert_eq!(image.nodes[&8].incarnation, "first");
    assert!(!image.nodes[&8].fenced);

    // Controlled shutdown of the first fences it and moves its leaderships.
    let (_, result) = block_on(first.submit(MetadataCommand::CreateTopics(vec![assigned(
        "led-by-8",
        vec![vec![broker_id(8, 0), broker_id(1, 0)], vec![broker_id(8, 1), broker_id(2, 1)]],
    )])))
    .unwrap();
    assert_eq!(result, vec![("led-by-8".to_string(), Ok(()))]);
    block_on(first.controlled_shutdown()).unwrap();
    let image = first.image();
    assert!(image.nodes[&8].fenced);
    let partitions = &image.topics["led-by-8"].partitions;
    assert_eq!(partitions[0].leader, broker_id(1, 0));
    assert_eq!(partitions[1].leader, broker_id(2, 1));
    assert!(partitions.iter().all(|p| p.leader_epoch == 1 && p.isr.len() == 1), "{partitions:?}");

    // Now the node id is free for the new incarnation.
    block_on(second.handle().register(registration(8, 2, "second"))).unwrap();
    let image = second.handle().image();
    assert_eq!(image.nodes[&8].incarnation, "second");
    assert!(!image.nodes[&8].fenced);
    second.stop();
}

#[test]
fn a_silent_node_is_fenced_and_its_leaderships_move() {
    let mut cluster = Cluster::new("fence", 10_000, 2_000);
    cluster.start_voters();
    cluster.register_voters_as_brokers();
    let broker = cluster.start(9);
    block_on(broker.register(registration(9, 2, "nine"))).unwrap();
    let (index, result) = block_on(broker.submit(MetadataCommand::CreateTopics(vec![assigned(
        "led-by-9",
        vec![
            vec![broker_id(9, 0), broker_id(1, 0)],
            vec![broker_id(9, 1), broker_id(3, 1)],
            vec![broker_id(2, 0), broker_id(9, 0)],
        ],
    )])))
    .unwrap();
    assert_eq!(result, vec![("led-by-9".to_string(), Ok(()))]);

    // Heartbeating keeps it unfenced well past the session timeout.
    std::thread::sleep(Duration::from_millis(3_000));
    let leader = cluster.leader();
    assert!(!cluster.handle(leader).image().nodes[&9].fenced, "a heartbeating node stays unfenced");

    cluster.stop(9);
    let leader_handle = cluster.handle(cluster.leader());
    wait_until("node 9 to be fenced", || leader_handle.image().nodes.get(&9).is_some_and(|n| n.fenced));
    let image = leader_handle.image();
    assert!(image.version > index);
    let partitions = &image.topics["led-by-9"].partitions;
    assert_eq!((partitions[0].leader, partitions[0].leader_epoch), (broker_id(1, 0), 1));
    assert_eq!((partitions[1].leader, partitions[1].leader_epoch), (broker_id(3, 1), 1));
    assert_eq!((partitions[2].leader, partitions[2].leader_epoch), (broker_id(2, 0), 0), "led elsewhere");
    for p in partitions {
        assert!(!p.isr.contains(&broker_id(9, 0)) && !p.isr.contains(&broker_id(9, 1)), "{p:?}");
        assert_eq!(p.partition_epoch, 1, "{p:?}");
    }
    // The voters, which heartbeat, were never fenced.
    assert!((1..=3).all(|id| !image.nodes[&id].fenced));

    // The same incarnation coming back registers and is unfenced.
    let broker = cluster.start(9);
    block_on(broker.register(registration(9, 2, "nine"))).unwrap();
    assert!(!broker.image().nodes[&9].fenced);

    // Killed and restarted at once: the new incarnation waits out the old
    // session instead of failing as a duplicate.
    cluster.stop(9);
    let broker = cluster.start(9);
    block_on(broker.register(registration(9, 2, "nine-restarted"))).unwrap();
    let image = broker.image();
    assert_eq!(image.nodes[&9].incarnation, "nine-restarted");
    assert!(!image.nodes[&9].fenced);
}

#[test]
fn start_errors_say_what_to_do() {
    init_logging();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let config = QuorumConfig {
        node_id: 1,
        voters: BTreeMap::from([(1, addr)]),
        controller_listen: Some(addr),
        dir: test_dir("errors"),
        election_timeout_ms: 800,
        raft_heartbeat_interval_ms: 150,
        request_timeout_ms: 2_000,
        heartbeat_interval_ms: 200,
        session_timeout_ms: 2_000,
        unclean_leader_election_enable: false,
    };
    let err = Quorum::start(config.clone()).err().unwrap();
    assert!(err.contains("already in use"), "{err}");

    let err =
        Quorum::start(QuorumConfig { dir: PathBuf::from("/proc/no-such-place/meta"), ..config.clone() }).err().unwrap();
    assert!(err.contains("cannot create the metadata log directory"), "{err}");

    let err = Quorum::start(QuorumConfig { node_id: 2, ..config.clone() }).err().unwrap();
    assert!(err.contains("not in controller.quorum.voters"), "{err}");

    // A single voter is a working quorum of one.
    drop(busy);
    let quorum = Quorum::start(config).unwrap();
    let handle = quorum.handle();
    block_on(handle.register(registration(1, 1, "solo"))).unwrap();
    let (_, result) = block_on(handle.submit(MetadataCommand::CreateTopics(vec![topic("solo", 2, 1)]))).unwrap();
    assert_eq!(result, vec![("solo".to_string(), Ok(()))]);
    quorum.stop();
    assert!(matches!(block_on(handle.submit(MetadataCommand::DeleteTopics(vec![]))), Err(QuorumError::Stopped)));
}
