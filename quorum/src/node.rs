//! The controller thread: everything the quorum does at run time.
//!
//! Runs on the one OS thread named `controller`, inside a tokio
//! current-thread runtime that also runs openraft's own tasks. The data path
//! never waits on it; handles talk to it over channels (see `lib.rs`).
//!
//! Who does what:
//!
//! ```text
//!   QuorumHandle --Command--> run() ──spawns one task per command──┐
//!                                                                   v
//!   any node:      call_leader(): ClientRequest to the leader over TCP (or to
//!                  itself when it is the leader), following NotLeader answers
//!   voter only:    serve(): the controller listener; Raft RPCs go to openraft,
//!                  client RPCs to client_request()
//!                  leader_duties(): every 200 ms on the leader: InitCluster on
//!                  an empty cluster id, FenceNode for silent nodes, unclean
//!                  ElectLeaders where unclean.leader.election.enable allows
//!                  track_status(): openraft metrics -> QuorumStatus
//!   broker only:   follow_image(): long-polls FetchImage and publishes the image
//!   registered:    heartbeat(): Heartbeat to the leader every interval
//! ```
//!
//! Liveness (last heartbeat per node) lives only in the leader's memory: a new
//! leader starts every node's clock when it takes over, so nobody is fenced
//! for the silence of the election.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::image::{ApplyResult, ClusterImage, Election, MetadataCommand, NodeRegistration};
use crate::network::{
    connect, exchange, read_frame, write_frame, ClientReply, ClientRequest, PeerStatus, Peers, RaftClients, Reply,
    Request,
};
use crate::store::{LogStore, StateMachine, TypeConfig};
use crate::{QuorumConfig, QuorumError, QuorumStatus};

/// Most connections the controller listener serves at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// How long a FetchImage long poll waits for a newer image.
pub const FETCH_WAIT_MS: u64 = 1000;
/// The leader checks broker sessions this often.
pub const LIVENESS_TICK_MS: u64 = 200;
/// Take a snapshot (and purge the log before it) every this many entries.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 1000;
/// Pause between rounds of asking voters for the leader.
const RETRY_PAUSE_MS: u64 = 50;

/// Internal knobs with fixed production values (tests lower them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// Snapshot every this many entries.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot (for slow followers).
    pub entries_kept_behind_snapshot: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning { snapshot_every_entries: SNAPSHOT_EVERY_ENTRIES, entries_kept_behind_snapshot: SNAPSHOT_EVERY_ENTRIES }
    }
}

/// A request from a handle.
pub(crate) enum Command {
    Submit {
        command: MetadataCommand,
        reply: futures::channel::oneshot::Sender<Result<(u64, ApplyResult), QuorumError>>,
    },
    Register {
        registration: NodeRegistration,
        reply: futures::channel::oneshot::Sender<Result<(), QuorumError>>,
    },
    ControlledShutdown {
        reply: futures::channel::oneshot::Sender<Result<(), QuorumError>>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Pending {
    InitCluster,
    Fence(u32),
    Unfence(u32),
    UncleanElection,
}

/// The leader's view of broker sessions (memory only, never in the log).
#[derive(Default)]
struct Liveness {
    /// Term in which this node last took over as leader.
    term: Option<u64>,
    last_heartbeat: HashMap<u32, Instant>,
    /// Nodes this leader has really heard from (a heartbeat or a
    /// registration) in its term; the others' clocks only started at the
    /// term's start, so they cannot prove a duplicate node.id is alive.
    heard: HashSet<u32>,
    /// Nodes that asked for a controlled shutdown, with that incarnation:
    /// a late heartbeat from it must not unfence it.
    shut_down: HashMap<u32, String>,
    pending: HashSet<Pending>,
}

pub(crate) struct Ctx {
    config: QuorumConfig,
    raft: Option<Raft<TypeConfig>>,
    images_tx: Arc<watch::Sender<Arc<ClusterImage>>>,
    images: watch::Receiver<Arc<ClusterImage>>,
    status: Arc<Mutex<QuorumStatus>>,
    peers: Arc<Peers>,
    leader_hint: Mutex<Option<u32>>,
    liveness: Mutex<Liveness>,
    /// This node's registration while it heartbeats.
    me: Mutex<Option<NodeRegistration>>,
    /// Bumped to stop the running heartbeat task.
    heartbeat_generation: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Ctx {
    fn me(&self) -> u32 {
        self.config.node_id
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.config.session_timeout_ms)
    }

    fn addr_of(&self, voter: u32) -> Option<SocketAddr> {
        self.config.voters.get(&voter).copied()
    }

    fn image(&self) -> Arc<ClusterImage> {
        self.images.borrow().clone()
    }

    /// The voter to ask first: openraft's leader on a voter, else the last
    /// leader that answered.
    fn leader_hint(&self) -> Option<u32> {
        if let Some(raft) = &self.raft {
            let leader = raft.metrics().borrow().current_leader;
            if let Some(l) = leader.and_then(|l| u32::try_from(l).ok()) {
                return Some(l);
            }
        }
        *lock(&self.leader_hint)
    }

    fn set_leader_hint(&self, leader: Option<u32>) {
        *lock(&self.leader_hint) = leader;
        if self.raft.is_none() {
            lock(&self.status).leader = leader;
        }
    }

    fn leader_answer(&self, leader: Option<u64>) -> ClientReply {
        let leader = leader.and_then(|l| u32::try_from(l).ok());
        ClientReply::NotLeader {
            leader: leader.map(|l| (l, self.addr_of(l).map_or_else(|| "?".to_string(), |a| a.to_string()))),
        }
    }

    /// The raft handle when this node is the leader and has applied its own
    /// term's first entry (so its image is current), else the answer to give.
    fn ready_leader(&self) -> Result<(&Raft<TypeConfig>, u64), ClientReply> {
        let Some(raft) = &self.raft else { return Err(self.leader_answer(self.leader_hint().map(u64::from))) };
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let me = u64::from(self.me());
        if m.current_leader != Some(me) || !m.state.is_leader() {
            return Err(self.leader_answer(m.current_leader));
        }
        let applied_term = m.last_applied.map(|l| l.leader_id.term);
        if applied_term != Some(m.current_term) {
            // Elected but its image may still miss entries of earlier terms.
            return Err(ClientReply::NotLeader { leader: None });
        }
        Ok((raft, m.current_term))
    }

    fn voters_summary(&self, outcomes: &BTreeMap<u32, String>) -> String {
        let parts: Vec<String> = self
            .config
            .voters
            .iter()
            .map(|(id, addr)| {
                let state = match outcomes.get(id) {
                    Some(o) => o.clone(),
                    None if *id == self.me() && self.raft.is_some() => "this node".to_string(),
                    None => match self.peers.status(*id) {
                        PeerStatus::Unreachable(why) => format!("unreachable: {why}"),
                        // Within an election timeout: as fresh as Raft itself needs.
                        PeerStatus::Answered(age) if age.as_millis() <= u128::from(self.config.election_timeout_ms) => {
                            "reachable".to_string()
                        }
                        PeerStatus::Answered(age) => format!("last answered {} ms ago", age.as_millis()),
                        PeerStatus::NotTried => "not tried".to_string(),
                    },
                };
                format!("{id}@{addr} ({state})")
            })
            .collect();
        parts.join(", ")
    }
}

/// Runs the controller until `stop` fires (or its sender is dropped).
pub(crate) async fn run(
    config: QuorumConfig,
    tuning: Tuning,
    images_tx: Arc<watch::Sender<Arc<ClusterImage>>>,
    status: Arc<Mutex<QuorumStatus>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let ctx = match start(config, tuning, images_tx, status).await {
        Ok(ctx) => ctx,
        Err(message) => {
            let _ = ready.send(Err(message));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            command = commands.recv() => match command {
                Some(command) => {
                    tokio::spawn(handle_command(ctx.clone(), command));
                }
                None => break,
            },
        }
    }
    if let Some(raft) = &ctx.raft {
        if let Err(e) = raft.shutdown().await {
            log::warn!("controller: node {}: raft shutdown: {e}", ctx.me());
        }
    }
    log::info!("controller: node {}: stopped", ctx.me());
}

fn check_config(config: &QuorumConfig) -> Result<(), String> {
    if config.voters.is_empty() {
        return Err("controller.quorum.voters is empty: name the controller voters as id@host:port,...".to_string());
    }
    if config.controller_listen.is_some() && !config.voters.contains_key(&config.node_id) {
        return Err(format!(
            "node {} has a controller listener but is not in controller.quorum.voters ({:?}): add it there or drop \
             `controller` from process.roles",
            config.node_id,
            config.voters.keys().collect::<Vec<_>>()
        ));
    }
    if config.election_timeout_ms <= config.raft_heartbeat_interval_ms {
        return Err(format!(
            "the controller election timeout ({} ms) must be larger than the raft heartbeat interval ({} ms)",
            config.election_timeout_ms, config.raft_heartbeat_interval_ms
        ));
    }
    if config.heartbeat_interval_ms == 0 || config.session_timeout_ms <= config.heartbeat_interval_ms {
        return Err(format!(
            "broker.session.timeout.ms ({}) must be larger than broker.heartbeat.interval.ms ({}), which must be > 0",
            config.session_timeout_ms, config.heartbeat_interval_ms
        ));
    }
    Ok(())
}

async fn start(
    config: QuorumConfig,
    tuning: Tuning,
    images_tx: Arc<watch::Sender<Arc<ClusterImage>>>,
    status: Arc<Mutex<QuorumStatus>>,
) -> Result<Arc<Ctx>, String> {
    check_config(&config)?;
    let me = config.node_id;
    let peers = Arc::new(Peers::default());
    let mut listener = None;
    let mut raft = None;
    if let Some(listen) = config.controller_listen {
        let snapshot_on_disk = Arc::new(AtomicU64::new(0));
        let log_store = LogStore::open(&config.dir, me, snapshot_on_disk.clone())?;
        let state_machine = StateMachine::open(&config.dir, me, images_tx.clone(), snapshot_on_disk)?;
        let bound = TcpListener::bind(listen).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "the controller listener {listen} is already in use (another tidelog or controller running on \
                     this port?): stop it or choose another port for node {me} in controller.quorum.voters"
                )
            } else {
                format!("cannot listen on the controller listener {listen}: {e}")
            }
        })?;
        let raft_config = Config {
            cluster_name: "tidelog-controller".to_string(),
            election_timeout_min: config.election_timeout_ms,
            election_timeout_max: config.election_timeout_ms * 2,
            heartbeat_interval: config.raft_heartbeat_interval_ms,
            install_snapshot_timeout: config.request_timeout_ms.max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every_entries),
            max_in_snapshot_log_to_keep: tuning.entries_kept_behind_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("invalid controller raft settings: {e}"))?;
        let network = RaftClients { me, voters: config.voters.clone(), peers: peers.clone() };
        let node = Raft::new(u64::from(me), Arc::new(raft_config), network, log_store, state_machine)
            .await
            .map_err(|e| format!("cannot start the controller raft node {me}: {e}"))?;
        let members: BTreeMap<u64, BasicNode> =
            config.voters.iter().map(|(id, addr)| (u64::from(*id), BasicNode::new(addr))).collect();
        match node.initialize(members).await {
            Ok(()) => log::info!(
                "controller: node {me}: initialized a new quorum with voters {:?}",
                config.voters.keys().collect::<Vec<_>>()
            ),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                log::info!("controller: node {me}: resuming the stored quorum state from {}", config.dir.display())
            }
            Err(e) => return Err(format!("cannot initialize the controller quorum on node {me}: {e}")),
        }
        listener = Some(bound);
        raft = Some(node);
    }
    let images = images_tx.subscribe();
    let ctx = Arc::new(Ctx {
        config,
        raft,
        images_tx,
        images,
        status,
        peers,
        leader_hint: Mutex::new(None),
        liveness: Mutex::new(Liveness::default()),
        me: Mutex::new(None),
        heartbeat_generation: AtomicU64::new(0),
    });
    if let Some(listener) = listener {
        log::info!("controller: node {me}: serving the controller listener on {:?}", listener.local_addr().ok());
        tokio::spawn(serve(ctx.clone(), listener));
        tokio::spawn(leader_duties(ctx.clone()));
        tokio::spawn(track_status(ctx.clone()));
    } else {
        log::info!(
            "controller: node {me}: broker-only; following the metadata of voters {:?}",
            ctx.config.voters.keys().collect::<Vec<_>>()
        );
        tokio::spawn(follow_image(ctx.clone()));
    }
    Ok(ctx)
}

// ---------------------------------------------------------------------------
// Commands from handles
// ---------------------------------------------------------------------------

async fn handle_command(ctx: Arc<Ctx>, command: Command) {
    match command {
        Command::Submit { command, reply } => {
            let result = submit(&ctx, command).await;
            let _ = reply.send(result);
        }
        Command::Register { registration, reply } => {
            let result = register(&ctx, registration).await;
            let _ = reply.send(result);
        }
        Command::ControlledShutdown { reply } => {
            let result = controlled_shutdown(&ctx).await;
            let _ = reply.send(result);
        }
    }
}

async fn submit(ctx: &Arc<Ctx>, command: MetadataCommand) -> Result<(u64, ApplyResult), QuorumError> {
    match call_leader(ctx, ClientRequest::Submit(command), ctx.request_timeout()).await? {
        ClientReply::Applied { index, result } => {
            wait_applied(ctx, index).await?;
            Ok((index, result))
        }
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: ClientReply) -> QuorumError {
    match reply {
        ClientReply::Error(message) => QuorumError::Other(message),
        ClientReply::DuplicateNode(message) => QuorumError::DuplicateNode(message),
        other => QuorumError::Other(format!("unexpected controller reply {other:?}")),
    }
}

/// Waits until this node's image has applied `index`.
async fn wait_applied(ctx: &Ctx, index: u64) -> Result<(), QuorumError> {
    let mut images = ctx.images.clone();
    let wait = images.wait_for(|image| image.version >= index);
    let outcome = match tokio::time::timeout(ctx.request_timeout(), wait).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(QuorumError::Stopped),
        Err(_) => Err(QuorumError::Other(format!(
            "index {index} is committed but this node's metadata image is still at version {} after {} ms",
            ctx.image().version,
            ctx.config.request_timeout_ms
        ))),
    };
    outcome
}

async fn register(ctx: &Arc<Ctx>, registration: NodeRegistration) -> Result<(), QuorumError> {
    if registration.node_id != ctx.me() {
        return Err(QuorumError::Other(format!(
            "this controller client is node {}; it cannot register node {}",
            ctx.me(),
            registration.node_id
        )));
    }
    // A node.id held by a process that just died stays "live" until its
    // session times out (as in Kafka): retry until then; a live duplicate
    // keeps heartbeating and is still refused after it.
    let started = Instant::now();
    let patience = ctx.session_timeout() + Duration::from_millis(ctx.config.heartbeat_interval_ms);
    let retry = Duration::from_millis(ctx.config.heartbeat_interval_ms.max(500));
    let reply = loop {
        match call_leader(ctx, ClientRequest::Register(registration.clone()), ctx.request_timeout()).await? {
            ClientReply::DuplicateNode(message) if started.elapsed() < patience => {
                if started.elapsed() < retry {
                    log::warn!(
                        "controller: {message}; retrying for up to {} ms in case that process is gone",
                        patience.as_millis()
                    );
                }
                tokio::time::sleep(retry).await;
            }
            reply => break reply,
        }
    };
    match reply {
        ClientReply::Applied { index, result } => {
            if let Some(refusal) = result.into_iter().find_map(|(_, r)| r.err()) {
                return Err(QuorumError::Other(format!("registration refused: {}", refusal.message)));
            }
            wait_applied(ctx, index).await?;
            log::info!(
                "controller: node {} registered (incarnation {}, index {index}); heartbeating every {} ms",
                registration.node_id,
                registration.incarnation,
                ctx.config.heartbeat_interval_ms
            );
            *lock(&ctx.me) = Some(registration);
            let generation = ctx.heartbeat_generation.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(heartbeat(ctx.clone(), generation));
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

async fn controlled_shutdown(ctx: &Arc<Ctx>) -> Result<(), QuorumError> {
    // Stop heartbeating first, so no heartbeat races the fencing.
    ctx.heartbeat_generation.fetch_add(1, Ordering::SeqCst);
    let Some(registration) = lock(&ctx.me).take() else {
        return Err(QuorumError::Other("controlled shutdown: this node has not registered".to_string()));
    };
    let request =
        ClientRequest::ControlledShutdown { node_id: registration.node_id, incarnation: registration.incarnation };
    match call_leader(ctx, request, ctx.request_timeout()).await? {
        ClientReply::Applied { index, .. } => {
            wait_applied(ctx, index).await?;
            log::info!("controller: node {} fenced for controlled shutdown at index {index}", ctx.me());
            Ok(())
        }
        // The leader knows another incarnation: there is nothing of ours to fence.
        ClientReply::UnknownIncarnation => Ok(()),
        other => Err(unexpected(other)),
    }
}

async fn heartbeat(ctx: Arc<Ctx>, generation: u64) {
    let interval = Duration::from_millis(ctx.config.heartbeat_interval_ms);
    let timeout = ctx.request_timeout().min(ctx.session_timeout() / 2).max(interval);
    // The kind of trouble last logged: a problem is logged when it starts or
    // changes, not on every beat.
    let mut trouble: Option<&'static str> = None;
    loop {
        tokio::time::sleep(interval).await;
        if ctx.heartbeat_generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let Some(registration) = lock(&ctx.me).clone() else { return };
        let me = registration.node_id;
        let request = ClientRequest::Heartbeat { node_id: me, incarnation: registration.incarnation.clone() };
        let (kind, message) = match call_leader(&ctx, request, timeout).await {
            Ok(ClientReply::HeartbeatOk) => {
                if trouble.take().is_some() {
                    log::info!("controller: node {me}: heartbeats reach the leader again");
                }
                continue;
            }
            Ok(ClientReply::UnknownIncarnation) => {
                log::warn!(
                    "controller: node {me}: the leader does not know incarnation {}; registering again",
                    registration.incarnation
                );
                match call_leader(&ctx, ClientRequest::Register(registration), timeout).await {
                    Ok(ClientReply::Applied { index, .. }) => {
                        log::info!("controller: node {me} registered again at index {index}");
                        trouble = None;
                        continue;
                    }
                    Ok(ClientReply::DuplicateNode(message)) => ("duplicate", message),
                    Ok(other) => ("register", format!("node {me}: registering again: {other:?}")),
                    Err(e) => ("register", format!("node {me}: registering again: {e}")),
                }
            }
            Ok(other) => ("answer", format!("node {me}: heartbeat answered {other:?}")),
            Err(e) => ("unreachable", format!("node {me} cannot heartbeat to the controller leader: {e}")),
        };
        if trouble != Some(kind) {
            if kind == "duplicate" {
                log::error!("controller: {message}");
            } else {
                log::warn!("controller: {message}");
            }
            trouble = Some(kind);
        }
    }
}

// ---------------------------------------------------------------------------
// Client side: finding the leader
// ---------------------------------------------------------------------------

enum CallFailure {
    /// Nothing reached the voter: safe to try another.
    NotSent(String),
    /// The request may have reached the voter.
    MaybeSent(String),
}

/// Sends `request` to the leader, following NotLeader answers and trying the
/// voters in turn, until a final answer or `timeout`.
async fn call_leader(ctx: &Arc<Ctx>, request: ClientRequest, timeout: Duration) -> Result<ClientReply, QuorumError> {
    let deadline = Instant::now() + timeout;
    let voters: Vec<u32> = ctx.config.voters.keys().copied().collect();
    let mut outcomes: BTreeMap<u32, String> = BTreeMap::new();
    let mut next = 0usize;
    let mut hops = 0usize;
    let mut redirect: Option<u32> = None;
    // Pause after each round over the voters, so a leaderless cluster is not polled in a tight loop.
    let mut pauses = 0usize;
    let mut saw_leader = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            let message = if saw_leader {
                format!(
                    "the controller leader did not commit within {} ms; voters: {}",
                    timeout.as_millis(),
                    ctx.voters_summary(&outcomes)
                )
            } else {
                format!(
                    "no controller leader reachable within {} ms; voters: {}",
                    timeout.as_millis(),
                    ctx.voters_summary(&outcomes)
                )
            };
            return Err(QuorumError::NoQuorum(message));
        }
        let target = match redirect.take().or_else(|| ctx.leader_hint().filter(|_| hops < voters.len() * 2)) {
            Some(l) => l,
            None => {
                let t = voters[next % voters.len()];
                next += 1;
                t
            }
        };
        hops += 1;
        let pause;
        match call_voter(ctx, target, &request, deadline - now).await {
            Ok(ClientReply::NotLeader { leader }) => {
                redirect = leader.as_ref().map(|(l, _)| *l).filter(|&l| l != target);
                outcomes.insert(
                    target,
                    match &leader {
                        None if target == ctx.me() => "this node, no leader elected".to_string(),
                        Some((l, _)) if *l == target => "elected, not ready yet".to_string(),
                        Some((l, _)) => format!("follower of {l}"),
                        None => "reachable, no leader elected".to_string(),
                    },
                );
                ctx.set_leader_hint(redirect);
                pause = redirect.is_none() || hops >= voters.len() * (pauses + 1);
            }
            Ok(ClientReply::NotCommitted(message)) => {
                outcomes.insert(target, "leader, cannot reach a majority".to_string());
                return Err(QuorumError::NoQuorum(format!("{message}; voters: {}", ctx.voters_summary(&outcomes))));
            }
            Ok(reply) => {
                ctx.set_leader_hint(Some(target));
                return Ok(reply);
            }
            Err(CallFailure::NotSent(why)) => {
                outcomes.insert(target, format!("unreachable: {why}"));
                ctx.set_leader_hint(None);
                pause = hops >= voters.len() * (pauses + 1);
            }
            Err(CallFailure::MaybeSent(why)) => {
                saw_leader = true;
                outcomes.insert(target, format!("no answer: {why}"));
                ctx.set_leader_hint(None);
                if !request.idempotent() {
                    return Err(QuorumError::NoQuorum(format!(
                        "controller {target} took the request but gave no answer ({why}); it may or may not be \
                         committed; voters: {}",
                        ctx.voters_summary(&outcomes)
                    )));
                }
                pause = true;
            }
        }
        if pause {
            pauses += 1;
            let wait = Duration::from_millis(RETRY_PAUSE_MS).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(wait).await;
        }
    }
}

/// One request to one voter (this node's own handler when it is the target).
async fn call_voter(
    ctx: &Arc<Ctx>,
    target: u32,
    request: &ClientRequest,
    timeout: Duration,
) -> Result<ClientReply, CallFailure> {
    if target == ctx.me() && ctx.raft.is_some() {
        return tokio::time::timeout(timeout, client_request(ctx, request.clone()))
            .await
            .map_err(|_| CallFailure::MaybeSent(format!("no answer within {} ms", timeout.as_millis())));
    }
    let Some(addr) = ctx.addr_of(target) else {
        return Err(CallFailure::NotSent(format!("voter {target} has no address")));
    };
    let mut stream: TcpStream = connect(addr).await.map_err(|e| CallFailure::NotSent(e.to_string()))?;
    match exchange(&mut stream, &Request::Client(request.clone()), timeout).await {
        Ok(Reply::Client(reply)) => Ok(reply),
        Ok(_) => Err(CallFailure::MaybeSent("reply does not match the request".to_string())),
        Err(e) => Err(CallFailure::MaybeSent(e.to_string())),
    }
}

/// Broker-only nodes: keep the local image in step with the voters.
async fn follow_image(ctx: Arc<Ctx>) {
    let voters: Vec<u32> = ctx.config.voters.keys().copied().collect();
    let mut next = 0usize;
    let mut failing = false;
    // The long polls reuse one connection while the same voter answers.
    let mut connection: Option<(u32, TcpStream)> = None;
    let poll_timeout = Duration::from_millis(FETCH_WAIT_MS * 3);
    loop {
        let have_version = ctx.image().version;
        let target = ctx.leader_hint().unwrap_or_else(|| {
            next += 1;
            voters[next % voters.len()]
        });
        let request = Request::Client(ClientRequest::FetchImage { have_version });
        let reply = match connection.take().filter(|(voter, _)| *voter == target) {
            Some((_, stream)) => Ok(stream),
            None => match ctx.addr_of(target) {
                Some(addr) => connect(addr).await.map_err(|e| e.to_string()),
                None => Err(format!("voter {target} has no address")),
            },
        };
        let reply = match reply {
            Ok(mut stream) => match exchange(&mut stream, &request, poll_timeout).await {
                Ok(reply) => {
                    connection = Some((target, stream));
                    Ok(reply)
                }
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        };
        match reply {
            Ok(Reply::Client(ClientReply::Image(image))) => {
                if failing {
                    log::info!("controller: node {}: following the metadata of voter {target} again", ctx.me());
                    failing = false;
                }
                if let Some(image) = image.filter(|i| i.version > have_version) {
                    lock(&ctx.status).last_applied = image.version;
                    ctx.images_tx.send_replace(image);
                }
            }
            other => {
                if !failing {
                    let why = match other {
                        Ok(_) => "reply does not match the request".to_string(),
                        Err(why) => why,
                    };
                    log::warn!("controller: node {}: cannot fetch metadata from voter {target}: {why}", ctx.me());
                    failing = true;
                }
                connection = None;
                ctx.set_leader_hint(None);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Voter side: the listener
// ---------------------------------------------------------------------------

async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("controller: node {}: accept on the controller listener: {e}", ctx.me());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::warn!(
                "controller: node {}: refusing a connection from {peer}: {CONNECTIONS_MAX} connections open",
                ctx.me()
            );
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            serve_connection(&ctx, stream, peer).await;
            drop(slot);
        });
    }
}

async fn serve_connection(ctx: &Arc<Ctx>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    loop {
        let request: Request = match read_frame(&mut stream).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    log::warn!("controller: node {}: closing the connection from {peer}: {e}", ctx.me());
                } else {
                    log::debug!("controller: node {}: connection from {peer}: {e}", ctx.me());
                }
                return;
            }
        };
        let reply = dispatch(ctx, request).await;
        if let Err(e) = write_frame(&mut stream, &reply).await {
            log::debug!("controller: node {}: replying to {peer}: {e}", ctx.me());
            return;
        }
    }
}

async fn dispatch(ctx: &Arc<Ctx>, request: Request) -> Reply {
    let Some(raft) = &ctx.raft else {
        return Reply::Client(ClientReply::Error(format!("node {} is not a controller voter", ctx.me())));
    };
    match request {
        Request::AppendEntries(rpc) => Reply::AppendEntries(raft.append_entries(rpc).await),
        Request::Vote(rpc) => Reply::Vote(raft.vote(rpc).await),
        Request::Snapshot { vote, meta, image } => {
            let snapshot = openraft::Snapshot { meta, snapshot: Box::new(image) };
            Reply::Snapshot(raft.install_full_snapshot(vote, snapshot).await)
        }
        Request::Client(request) => Reply::Client(client_request(ctx, request).await),
    }
}

/// Serves one client request on this voter.
async fn client_request(ctx: &Arc<Ctx>, request: ClientRequest) -> ClientReply {
    match request {
        ClientRequest::FetchImage { have_version } => fetch_image(ctx, have_version).await,
        ClientRequest::Submit(command) => match ctx.ready_leader() {
            Ok((raft, _)) => leader_write(ctx, raft, command).await,
            Err(reply) => reply,
        },
        ClientRequest::Register(registration) => register_on_leader(ctx, registration).await,
        ClientRequest::Heartbeat { node_id, incarnation } => heartbeat_on_leader(ctx, node_id, &incarnation),
        ClientRequest::ControlledShutdown { node_id, incarnation } => {
            controlled_shutdown_on_leader(ctx, node_id, incarnation).await
        }
    }
}

async fn fetch_image(ctx: &Ctx, have_version: u64) -> ClientReply {
    let mut images = ctx.images.clone();
    let newer = images.wait_for(|image| image.version > have_version);
    let image = match tokio::time::timeout(Duration::from_millis(FETCH_WAIT_MS), newer).await {
        Ok(Ok(image)) => Some(image.clone()),
        _ => None,
    };
    ClientReply::Image(image)
}

/// Proposes `command` on this (leader) node and waits for it to apply.
async fn leader_write(ctx: &Ctx, raft: &Raft<TypeConfig>, command: MetadataCommand) -> ClientReply {
    // A little under the client's own timeout, so that the client hears why.
    let commit_timeout = ctx.request_timeout() * 9 / 10;
    match tokio::time::timeout(commit_timeout, raft.client_write(command)).await {
        Ok(Ok(response)) => ClientReply::Applied { index: response.log_id.index, result: response.data },
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => ctx.leader_answer(f.leader_id),
        Ok(Err(e)) => ClientReply::Error(format!("controller node {}: {e}", ctx.me())),
        Err(_) => ClientReply::NotCommitted(format!(
            "controller leader {} could not commit within {} ms: a majority of the voters is not reachable",
            ctx.me(),
            commit_timeout.as_millis()
        )),
    }
}

async fn register_on_leader(ctx: &Ctx, mut registration: NodeRegistration) -> ClientReply {
    let raft = match ctx.ready_leader() {
        Ok((raft, _)) => raft,
        Err(reply) => return reply,
    };
    let node = registration.node_id;
    if ctx.image().cluster_id.is_empty() {
        // A new cluster: commit its id before the first node, so no broker
        // ever advertises the cluster without one (a second InitCluster is ignored).
        let cluster_id = crate::new_cluster_id();
        log::info!("controller: node {}: new cluster, id {cluster_id}", ctx.me());
        match leader_write(ctx, raft, MetadataCommand::InitCluster { cluster_id }).await {
            ClientReply::Applied { .. } => {}
            other => return other,
        }
    }
    let image = ctx.image();
    if let Some(existing) = image.nodes.get(&node) {
        if !existing.fenced && existing.incarnation != registration.incarnation {
            let now = Instant::now();
            let (last, heard) = {
                let liveness = lock(&ctx.liveness);
                (liveness.last_heartbeat.get(&node).copied().unwrap_or(now), liveness.heard.contains(&node))
            };
            let silent = now.saturating_duration_since(last);
            if silent < ctx.session_timeout() && !heard {
                // A new leader that has not heard from the old incarnation
                // yet: it may be alive (its next heartbeat tells) or gone
                // (its session runs out and it is fenced). Ask again later.
                return ClientReply::NotCommitted(format!(
                    "node.id {node} is registered by incarnation {}, not heard from since this controller took over; \
                     waiting for it to heartbeat or time out",
                    existing.incarnation
                ));
            }
            if silent < ctx.session_timeout() {
                log::warn!(
                    "controller: refusing the registration of node {node} (incarnation {}): incarnation {} is alive",
                    registration.incarnation,
                    existing.incarnation
                );
                return ClientReply::DuplicateNode(format!(
                    "node.id {node} is already registered by a running broker (incarnation {}, last heartbeat {} ms \
                     ago); stop it or give this broker another node.id",
                    existing.incarnation,
                    silent.as_millis()
                ));
            }
        }
    }
    registration.fenced = false;
    let incarnation = registration.incarnation.clone();
    let reply = leader_write(ctx, raft, MetadataCommand::RegisterNode(registration)).await;
    if let ClientReply::Applied { index, .. } = &reply {
        log::info!("controller: registered node {node} (incarnation {incarnation}) at index {index}");
        let mut liveness = lock(&ctx.liveness);
        liveness.last_heartbeat.insert(node, Instant::now());
        liveness.heard.insert(node);
        liveness.shut_down.remove(&node);
    }
    reply
}

fn heartbeat_on_leader(ctx: &Arc<Ctx>, node: u32, incarnation: &str) -> ClientReply {
    if let Err(reply) = ctx.ready_leader() {
        return reply;
    }
    let image = ctx.image();
    let Some(registration) = image.nodes.get(&node).filter(|r| r.incarnation == incarnation) else {
        return ClientReply::UnknownIncarnation;
    };
    let mut liveness = lock(&ctx.liveness);
    liveness.last_heartbeat.insert(node, Instant::now());
    liveness.heard.insert(node);
    let shut_down = liveness.shut_down.get(&node).is_some_and(|i| i == incarnation);
    if registration.fenced && !shut_down && liveness.pending.insert(Pending::Unfence(node)) {
        log::info!("controller: unfencing node {node}: heartbeats resumed (incarnation {incarnation})");
        tokio::spawn(propose(ctx.clone(), Pending::Unfence(node), MetadataCommand::UnfenceNode { node_id: node }));
    }
    ClientReply::HeartbeatOk
}

async fn controlled_shutdown_on_leader(ctx: &Ctx, node: u32, incarnation: String) -> ClientReply {
    let raft = match ctx.ready_leader() {
        Ok((raft, _)) => raft,
        Err(reply) => return reply,
    };
    let known = ctx.image().nodes.get(&node).is_some_and(|r| r.incarnation == incarnation);
    if !known {
        return ClientReply::UnknownIncarnation;
    }
    log::info!("controller: node {node} (incarnation {incarnation}) is shutting down: fencing it");
    lock(&ctx.liveness).shut_down.insert(node, incarnation);
    leader_write(ctx, raft, MetadataCommand::FenceNode { node_id: node }).await
}

/// Proposes a command the leader decided on itself (not for a client).
async fn propose(ctx: Arc<Ctx>, pending: Pending, command: MetadataCommand) {
    let reply = match ctx.ready_leader() {
        Ok((raft, _)) => leader_write(&ctx, raft, command).await,
        Err(reply) => reply,
    };
    match reply {
        ClientReply::Applied { index, .. } => log::debug!("controller: {pending:?} applied at index {index}"),
        other => log::warn!("controller: node {}: {pending:?} not committed: {other:?}", ctx.me()),
    }
    lock(&ctx.liveness).pending.remove(&pending);
}

/// The leader's periodic work: bootstrap the cluster id, fence silent nodes.
async fn leader_duties(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(LIVENESS_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let term = match ctx.ready_leader() {
            Ok((_, term)) => term,
            Err(_) => {
                let mut liveness = lock(&ctx.liveness);
                if liveness.term.take().is_some() {
                    liveness.last_heartbeat.clear();
                    liveness.shut_down.clear();
                }
                continue;
            }
        };
        let image = ctx.image();
        let now = Instant::now();
        let mut liveness = lock(&ctx.liveness);
        if liveness.term != Some(term) {
            log::info!(
                "controller: node {} leads in term {term} (image version {}); broker session clocks start now",
                ctx.me(),
                image.version
            );
            liveness.term = Some(term);
            liveness.last_heartbeat.clear();
            liveness.heard.clear();
        }
        if image.cluster_id.is_empty() && liveness.pending.insert(Pending::InitCluster) {
            let cluster_id = crate::new_cluster_id();
            log::info!("controller: node {}: new cluster, id {cluster_id}", ctx.me());
            tokio::spawn(propose(ctx.clone(), Pending::InitCluster, MetadataCommand::InitCluster { cluster_id }));
        }
        for (&node, registration) in &image.nodes {
            let last = *liveness.last_heartbeat.entry(node).or_insert(now);
            if registration.fenced {
                continue;
            }
            let silent = now.saturating_duration_since(last);
            if silent >= ctx.session_timeout() && liveness.pending.insert(Pending::Fence(node)) {
                log::warn!("controller: fencing node {node}: no heartbeat for {} ms", silent.as_millis());
                tokio::spawn(propose(ctx.clone(), Pending::Fence(node), MetadataCommand::FenceNode { node_id: node }));
            }
        }
        let unclean = image.unclean_election_candidates(ctx.config.unclean_leader_election_enable);
        if !unclean.is_empty() && liveness.pending.insert(Pending::UncleanElection) {
            for (topic, partition) in &unclean {
                log::warn!(
                    "controller: unclean leader election for {topic}-{partition}: no in-sync replica is alive and \
                     unclean.leader.election.enable is true, so a replica outside the ISR will lead; records only \
                     the old ISR had (possibly acknowledged ones) may be lost"
                );
            }
            let command = MetadataCommand::ElectLeaders { election: Election::Unclean, partitions: unclean };
            tokio::spawn(propose(ctx.clone(), Pending::UncleanElection, command));
        }
    }
}

/// Keeps `QuorumStatus` in step with openraft's metrics.
async fn track_status(ctx: Arc<Ctx>) {
    let Some(raft) = &ctx.raft else { return };
    let mut metrics = raft.metrics();
    let mut last_leader = None;
    loop {
        {
            let m = metrics.borrow_and_update();
            let leader = m.current_leader.and_then(|l| u32::try_from(l).ok());
            let mut status = lock(&ctx.status);
            status.is_voter = true;
            status.leader = leader;
            status.term = m.current_term;
            status.last_applied = m.last_applied.map_or(0, |l| l.index);
            if leader != last_leader {
                log::info!("controller: node {}: leader is now {leader:?} (term {})", ctx.me(), m.current_term);
                last_leader = leader;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
