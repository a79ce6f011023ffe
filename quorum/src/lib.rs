//! tidelog-quorum: the controller quorum (KRaft's role) on openraft.
//!
//! CONTRACT (written before the implementation; the engine codes against it):
//!
//! - `Quorum::start` spawns one thread named `controller` running a tokio
//!   current-thread runtime. It is off the data path: shards never wait on it
//!   except for metadata changes. On a voter (`controller_listen` is Some) it
//!   runs the openraft node (log + vote durable under `dir`, fsync'd before
//!   acknowledging) and serves the controller listener (raft RPCs between
//!   voters, and client RPCs from any node). On a broker-only node it only
//!   runs the client side (talks to the voters over TCP).
//! - `QuorumHandle` is `Clone + Send + Sync`; its futures are runtime-agnostic
//!   (built on channels, not on tokio's reactor) so glommio shard threads can
//!   await them.
//! - `submit` commits one command through the current leader (forwarding from
//!   any node) and resolves once the entry is committed AND the local image
//!   (`image()` / `watch()`) has applied it, with the apply result.
//!   Without a leader reachable within `request_timeout_ms` it fails with
//!   `QuorumError::NoQuorum` and a message naming the unreachable voters; a
//!   minority never commits anything.
//! - `register` registers this node (refused with `DuplicateNode` when another
//!   live incarnation holds the node id) and then heartbeats to the leader
//!   every `heartbeat_interval_ms` in the background. The leader fences a node
//!   whose heartbeats stop for `session_timeout_ms` (FenceNode moves its
//!   leaderships) and unfences it when they resume.
//! - `controlled_shutdown` fences this node through the log (leaderships move
//!   away) and stops heartbeating; used on SIGTERM before the shards stop.
//!
//! IMPLEMENTATION: a dedicated `controller` thread with openraft's tokio
//! runtime rather than shard 0 on glommio: openraft is written for tokio
//! (timers, spawn, channels), the controller is off the data path and sees a
//! few requests a second, and a thread of its own keeps fsyncs of the
//! metadata log and Raft timers away from the shards' latency.
//!
//! | file         | owns                                                      |
//! |--------------|-----------------------------------------------------------|
//! | `image.rs`   | the cluster image and `ClusterImage::apply` (pure data)   |
//! | `store.rs`   | the durable log, vote and snapshot; the state machine     |
//! | `network.rs` | framing, wire messages, openraft's voter-to-voter clients |
//! | `node.rs`    | the controller thread: listener, leader duties, clients   |
//! | `lib.rs`     | `Quorum` (the thread) and `QuorumHandle` (channels to it) |

pub mod image;
mod network;
mod node;
mod store;

pub use network::FRAME_BYTES_MAX;
pub use store::{scan_metadata_log, MetadataLogScan};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use image::*;
use rand::Rng;
use tokio::sync::{mpsc, watch};

use node::Command;

/// How to run this node's part of the quorum.
#[derive(Clone, Debug)]
pub struct QuorumConfig {
    pub node_id: u32,
    /// `controller.quorum.voters`: node id -> controller listener address.
    pub voters: BTreeMap<u32, SocketAddr>,
    /// This node's controller listener when it is a voter
    /// (`process.roles` contains `controller`).
    pub controller_listen: Option<SocketAddr>,
    /// Metadata log directory, `<log.dirs>/__cluster_metadata-0`.
    pub dir: PathBuf,
    /// Raft election timeout (randomised in [this, 2 x this]).
    pub election_timeout_ms: u64,
    /// Raft leader heartbeat interval.
    pub raft_heartbeat_interval_ms: u64,
    /// How long `submit` waits for a leader and a commit.
    pub request_timeout_ms: u64,
    /// Broker heartbeat interval (`broker.heartbeat.interval.ms`).
    pub heartbeat_interval_ms: u64,
    /// A node with no heartbeat for this long is fenced (`broker.session.timeout.ms`).
    pub session_timeout_ms: u64,
    /// Static `unclean.leader.election.enable` of this node's config: used
    /// while it leads the quorum, below topic configs and the dynamic
    /// cluster default in the image.
    pub unclean_leader_election_enable: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QuorumError {
    #[error("controller quorum unavailable: {0}")]
    NoQuorum(String),
    #[error("{0}")]
    DuplicateNode(String),
    #[error("controller stopped")]
    Stopped,
    #[error("{0}")]
    Other(String),
}

/// What this node knows of the quorum, for logs, /metrics and /health.
#[derive(Clone, Debug, Default)]
pub struct QuorumStatus {
    pub is_voter: bool,
    pub leader: Option<u32>,
    pub term: u64,
    pub last_applied: u64,
}

/// A running controller: the `controller` thread. Dropping it stops the
/// thread like `stop`.
pub struct Quorum {
    handle: QuorumHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Quorum {
    /// Spawns the `controller` thread and returns once it serves: on a voter
    /// the stored log is loaded (and the committed part re-applied to the
    /// image) and the controller listener is bound. The error says what is
    /// wrong and what to do (port in use, directory not writable, corrupt
    /// log file, inconsistent settings).
    pub fn start(config: QuorumConfig) -> Result<Quorum, String> {
        Self::start_tuned(config, node::Tuning::default())
    }

    pub(crate) fn start_tuned(config: QuorumConfig, tuning: node::Tuning) -> Result<Quorum, String> {
        let (images_tx, images_rx) = watch::channel(Arc::new(ClusterImage::default()));
        let images_tx = Arc::new(images_tx);
        let status = Arc::new(Mutex::new(QuorumStatus {
            is_voter: config.controller_listen.is_some(),
            ..QuorumStatus::default()
        }));
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_status = status.clone();
        let thread = std::thread::Builder::new()
            .name("controller".to_string())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the controller runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(node::run(config, tuning, images_tx, thread_status, commands_rx, stop_rx, ready_tx));
                // Dropping the runtime ends the remaining tasks and closes their sockets.
            })
            .map_err(|e| format!("cannot spawn the controller thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Quorum {
                handle: QuorumHandle {
                    inner: Arc::new(HandleInner { commands: commands_tx, images: images_rx, status }),
                },
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(message)) => {
                let _ = thread.join();
                Err(message)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the controller thread stopped while starting (see the log lines above)".to_string())
            }
        }
    }

    pub fn handle(&self) -> QuorumHandle {
        self.handle.clone()
    }

    /// Stops the controller thread (after `controlled_shutdown` on SIGTERM).
    pub fn stop(self) {}
}

impl Drop for Quorum {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("controller: the controller thread panicked");
            }
        }
    }
}

struct HandleInner {
    commands: mpsc::UnboundedSender<Command>,
    images: watch::Receiver<Arc<ClusterImage>>,
    status: Arc<Mutex<QuorumStatus>>,
}

/// A cheap, cloneable way to talk to the controller thread from any thread.
/// Its futures need no runtime (they wait on channels).
#[derive(Clone)]
pub struct QuorumHandle {
    inner: Arc<HandleInner>,
}

impl QuorumHandle {
    /// Commits `command` through the leader and resolves once this node's
    /// image has applied it: (log index, per-topic result). `NoQuorum` when
    /// no leader could commit it within `request_timeout_ms`.
    pub async fn submit(&self, command: MetadataCommand) -> Result<(u64, ApplyResult), QuorumError> {
        let (reply, answer) = futures::channel::oneshot::channel();
        self.send(Command::Submit { command, reply })?;
        answer.await.unwrap_or(Err(QuorumError::Stopped))
    }

    /// The current image of this node.
    pub fn image(&self) -> Arc<ClusterImage> {
        self.inner.images.borrow().clone()
    }

    /// Changes to this node's image (works outside tokio).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Arc<ClusterImage>> {
        self.inner.images.clone()
    }

    /// Registers this node (unfenced) and then heartbeats in the background.
    pub async fn register(&self, registration: NodeRegistration) -> Result<(), QuorumError> {
        let (reply, answer) = futures::channel::oneshot::channel();
        self.send(Command::Register { registration, reply })?;
        answer.await.unwrap_or(Err(QuorumError::Stopped))
    }

    /// Stops heartbeating and fences this node through the log, so its
    /// leaderships move to other in-sync replicas.
    pub async fn controlled_shutdown(&self) -> Result<(), QuorumError> {
        let (reply, answer) = futures::channel::oneshot::channel();
        self.send(Command::ControlledShutdown { reply })?;
        answer.await.unwrap_or(Err(QuorumError::Stopped))
    }

    pub fn status(&self) -> QuorumStatus {
        self.inner.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn send(&self, command: Command) -> Result<(), QuorumError> {
        self.inner.commands.send(command).map_err(|_| QuorumError::Stopped)
    }
}

const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn random_chars(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len).map(|_| ID_ALPHABET[rng.gen_range(0..ID_ALPHABET.len())] as char).collect()
}

/// A new Kafka-style cluster id: 22 base64url characters.
pub fn new_cluster_id() -> String {
    random_chars(22)
}

/// A new incarnation id for `NodeRegistration::incarnation` (one per process run).
pub fn new_incarnation() -> String {
    random_chars(22)
}

/// A new topic id for `CreateTopic::id`: 32 hex digits (a random UUID's bits).
pub fn new_topic_id() -> String {
    let bits: u128 = rand::thread_rng().gen();
    format!("{bits:032x}")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures::executor::block_on;

    use super::*;
    use crate::store::tests::test_dir;

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn config(node: u32, voters: &BTreeMap<u32, SocketAddr>, dir: &std::path::Path) -> QuorumConfig {
        QuorumConfig {
            node_id: node,
            voters: voters.clone(),
            controller_listen: Some(voters[&node]),
            dir: dir.join(format!("node-{node}")),
            election_timeout_ms: 800,
            raft_heartbeat_interval_ms: 150,
            request_timeout_ms: 10_000,
            heartbeat_interval_ms: 200,
            session_timeout_ms: 30_000,
            unclean_leader_election_enable: false,
        }
    }

    /// Snapshots every 10 entries and keeps no log behind them, so a voter
    /// that was down must be sent the snapshot.
    const TUNING: node::Tuning = node::Tuning { snapshot_every_entries: 10, entries_kept_behind_snapshot: 0 };

    #[test]
    fn snapshots_purge_the_log_and_catch_up_a_voter_that_was_down() {
        let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Info).try_init();
        let dir = test_dir("snapshot-cluster");
        let voters: BTreeMap<u32, SocketAddr> = (1..=3)
            .map(|id| {
                let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                (id, SocketAddr::from(([127, 0, 0, 1], port)))
            })
            .collect();
        let mut running: BTreeMap<u32, Quorum> =
            (1..=3).map(|id| (id, Quorum::start_tuned(config(id, &voters, &dir), TUNING).unwrap())).collect();
        let mut leader = 0;
        wait_until("a leader", || {
            let seen: Vec<Option<u32>> = running.values().map(|q| q.handle().status().leader).collect();
            leader = seen[0].unwrap_or(0);
            leader != 0 && seen.iter().all(|s| *s == Some(leader))
        });
        let lagging = (1..=3).find(|&id| id != leader).unwrap();
        running.remove(&lagging).unwrap().stop();

        let handle = running[&leader].handle();
        let mut last = 0;
        for i in 0..35 {
            let configs = BTreeMap::from([("round".to_string(), i.to_string())]);
            let (index, _) = block_on(handle.submit(MetadataCommand::SetBrokerConfigs(configs))).unwrap();
            last = index;
        }
        let leader_dir = dir.join(format!("node-{leader}"));
        assert!(leader_dir.join("snapshot.json").exists(), "the leader took a snapshot");
        wait_until("the leader to purge its log", || leader_dir.join("purged.json").exists());

        running.insert(lagging, Quorum::start_tuned(config(lagging, &voters, &dir), TUNING).unwrap());
        let lagging_handle = running[&lagging].handle();
        wait_until("the lagging voter to catch up", || lagging_handle.image().version >= last);
        assert_eq!(lagging_handle.image().broker_configs["round"], "34");
        assert_eq!(lagging_handle.image().topics, handle.image().topics);
        assert!(dir.join(format!("node-{lagging}/snapshot.json")).exists(), "the snapshot was installed");

        // Alone after a restart, it rebuilds the image from snapshot + log.
        let expected = lagging_handle.image();
        drop(running);
        let alone = Quorum::start_tuned(config(lagging, &voters, &dir), TUNING).unwrap();
        let image = alone.handle().image();
        assert!(image.version >= last);
        assert_eq!(image.broker_configs, expected.broker_configs);
        assert_eq!(image.cluster_id, expected.cluster_id);
    }

    #[test]
    fn handles_and_their_futures_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<QuorumHandle>();
        send_sync::<Quorum>();
        let (commands, _) = mpsc::unbounded_channel();
        let (_, images) = watch::channel(Arc::new(ClusterImage::default()));
        let handle = QuorumHandle { inner: Arc::new(HandleInner { commands, images, status: Arc::default() }) };
        send(&handle.submit(MetadataCommand::DeleteTopics(Vec::new())));
        send(&handle.register(crate::NodeRegistration {
            node_id: 0,
            incarnation: String::new(),
            host: String::new(),
            port: 0,
            num_shards: 1,
            rack: None,
            fenced: false,
            broker_epoch: -1,
        }));
        send(&handle.controlled_shutdown());
        // The controller is gone: every call says so instead of hanging.
        assert!(matches!(block_on(handle.controlled_shutdown()), Err(QuorumError::Stopped)));
    }

    /// A client speaking the wire protocol directly, as another node would.
    fn raw(addr: SocketAddr, request: network::ClientRequest) -> network::ClientReply {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut stream = network::connect(addr).await.unwrap();
            let reply = network::exchange(&mut stream, &network::Request::Client(request), Duration::from_secs(20))
                .await
                .unwrap();
            match reply {
                network::Reply::Client(reply) => reply,
                _ => panic!("not a client reply"),
            }
        })
    }

    fn single_voter(name: &str, session_timeout_ms: u64) -> (Quorum, SocketAddr) {
        let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Info).try_init();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let voters = BTreeMap::from([(1, addr)]);
        let config = QuorumConfig { session_timeout_ms, ..config(1, &voters, &test_dir(name)) };
        let quorum = Quorum::start(config).unwrap();
        let handle = quorum.handle();
        wait_until("the single voter to lead", || handle.status().leader == Some(1));
        (quorum, addr)
    }

    #[test]
    fn heartbeats_fence_unfence_and_controlled_shutdown() {
        use network::{ClientReply, ClientRequest};
        let (quorum, addr) = single_voter("heartbeats", 1_000);
        let handle = quorum.handle();
        let registration = crate::NodeRegistration {
            node_id: 9,
            incarnation: "nine".to_string(),
            host: "127.0.0.1".to_string(),
            port: 9092,
            num_shards: 2,
            rack: None,
            fenced: false,
            broker_epoch: -1,
        };
        let reply = raw(addr, ClientRequest::Register(registration.clone()));
        assert!(matches!(reply, ClientReply::Applied { .. }), "{reply:?}");
        let beat = |incarnation: &str| {
            raw(addr, ClientRequest::Heartbeat { node_id: 9, incarnation: incarnation.to_string() })
        };

        // Silent past the session timeout: fenced.
        wait_until("node 9 to be fenced", || handle.image().nodes[&9].fenced);
        // Heartbeats of the same incarnation resume: unfenced.
        assert!(matches!(beat("nine"), ClientReply::HeartbeatOk));
        wait_until("node 9 to be unfenced", || !handle.image().nodes[&9].fenced);
        // Another incarnation must register first.
        assert!(matches!(beat("ten"), ClientReply::UnknownIncarnation));
        assert!(matches!(
            raw(addr, ClientRequest::Heartbeat { node_id: 77, incarnation: "x".into() }),
            ClientReply::UnknownIncarnation
        ));

        // Controlled shutdown fences at once; a late heartbeat does not unfence.
        let reply = raw(addr, ClientRequest::ControlledShutdown { node_id: 9, incarnation: "nine".into() });
        assert!(matches!(reply, ClientReply::Applied { .. }), "{reply:?}");
        assert!(handle.image().nodes[&9].fenced);
        assert!(matches!(beat("nine"), ClientReply::HeartbeatOk));
        std::thread::sleep(Duration::from_millis(600));
        assert!(handle.image().nodes[&9].fenced, "a shut-down incarnation stays fenced");

        // A fenced node id may be taken by a new incarnation at once.
        let reply =
            raw(addr, ClientRequest::Register(crate::NodeRegistration { incarnation: "new".into(), ..registration }));
        assert!(matches!(reply, ClientReply::Applied { .. }), "{reply:?}");
        assert!(!handle.image().nodes[&9].fenced);
    }

    #[test]
    fn malformed_frames_close_the_connection_and_nothing_else() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (quorum, addr) = single_voter("malformed", 30_000);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let too_long = ((network::FRAME_BYTES_MAX as u32) + 1).to_be_bytes().to_vec();
            let mut garbage = 7u32.to_be_bytes().to_vec();
            garbage.extend_from_slice(b"garbage");
            for bytes in [too_long, garbage, u32::MAX.to_be_bytes().to_vec()] {
                let mut stream = network::connect(addr).await.unwrap();
                stream.write_all(&bytes).await.unwrap();
                let mut buf = [0u8; 16];
                let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await.unwrap();
                assert!(matches!(read, Ok(0) | Err(_)), "the voter closes the connection: {read:?}");
            }
        });
        let (_, result) = block_on(quorum.handle().submit(MetadataCommand::SetBrokerConfigs(BTreeMap::new()))).unwrap();
        assert_eq!(result, vec![(String::new(), Ok(()))]);
    }

    #[test]
    fn ids_have_the_kafka_shapes() {
        let id = new_cluster_id();
        assert_eq!(id.len(), 22);
        assert!(id.bytes().all(|b| ID_ALPHABET.contains(&b)));
        assert_ne!(new_cluster_id(), id);
        let topic = new_topic_id();
        assert_eq!(topic.len(), 32);
        assert!(topic.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
