//! The controller wire: framing, the messages on the controller listener, and
//! openraft's network (voter -> voter RPC clients).
//!
//! Runs on the `controller` thread (tokio current-thread runtime).
//!
//! ```text
//! frame:  +--------------------+------------------------------+
//!         | len: u32 big-endian| serde_json of Request/Reply  |
//!         +--------------------+------------------------------+
//! ```
//!
//! A connection carries one request at a time: the client writes a `Request`
//! frame and reads one `Reply` frame, then may send the next. Raft RPCs
//! (voter -> voter) and client RPCs (any node -> a voter) share the listener.
//! A frame longer than `FRAME_BYTES_MAX` closes the connection with a log
//! line; the body is read as it arrives, so a lying length never makes us
//! allocate more than the bytes actually sent.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, OptionalSend, Snapshot, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::image::{ApplyResult, ClusterImage, MetadataCommand, NodeRegistration};
use crate::store::{NodeId, TypeConfig};

/// Largest frame either side accepts.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// How long a connect to a voter may take: a dead voter costs at most this.
pub const CONNECT_TIMEOUT_MS: u64 = 300;
/// After a frame header, its body must arrive within this.
pub const FRAME_BODY_TIMEOUT_MS: u64 = 10_000;

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {} bytes exceeds the {FRAME_BYTES_MAX}-byte cap", body.len()),
        ));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; Ok(None) on a clean end of stream before a header.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> io::Result<Option<T>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {FRAME_BYTES_MAX}-byte cap"),
        ));
    }
    let mut body = Vec::new();
    let mut limited = (&mut *r).take(len as u64);
    tokio::time::timeout(Duration::from_millis(FRAME_BODY_TIMEOUT_MS), limited.read_to_end(&mut body))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "frame body did not arrive in time"))??;
    if body.len() != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame"));
    }
    serde_json::from_slice(&body).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A request on the controller listener.
#[derive(Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    /// A whole snapshot in one frame (the image is small next to the cap).
    Snapshot {
        vote: Vote<NodeId>,
        meta: SnapshotMeta<NodeId, BasicNode>,
        image: ClusterImage,
    },
    Client(ClientRequest),
}

/// Requests any node sends to a voter (the leader for all but `FetchImage`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    Submit(MetadataCommand),
    /// Long poll: answered with the image once it is newer than
    /// `have_version`, or with None after about a second.
    FetchImage {
        have_version: u64,
    },
    Register(NodeRegistration),
    Heartbeat {
        node_id: u32,
        incarnation: String,
    },
    ControlledShutdown {
        node_id: u32,
        incarnation: String,
    },
}

impl ClientRequest {
    /// Whether sending it twice does no harm (so it may be retried after the
    /// connection broke with the request possibly delivered).
    pub fn idempotent(&self) -> bool {
        !matches!(self, ClientRequest::Submit(_))
    }
}

#[derive(Serialize, Deserialize)]
pub enum Reply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    Client(ClientReply),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientReply {
    /// Committed at `index` and applied on the leader.
    Applied {
        index: u64,
        result: ApplyResult,
    },
    /// Ask `leader` (id and controller address) instead; None while no
    /// leader is known.
    NotLeader {
        leader: Option<(u32, String)>,
    },
    Image(Option<Arc<ClusterImage>>),
    HeartbeatOk,
    /// The leader does not know this incarnation: register again.
    UnknownIncarnation,
    DuplicateNode(String),
    /// The leader took the command but could not commit it in time.
    NotCommitted(String),
    Error(String),
}

// ---------------------------------------------------------------------------
// Reachability of the voters, for log lines and NoQuorum messages
// ---------------------------------------------------------------------------

/// Last outcome of talking to each voter, shared by the Raft clients and the
/// client-request path of this node.
#[derive(Default)]
pub struct Peers {
    state: Mutex<BTreeMap<u32, PeerState>>,
}

#[derive(Clone, Debug, Default)]
struct PeerState {
    /// When the voter last answered.
    answered: Option<Instant>,
    /// Why the last attempt failed; None once it answers again.
    failure: Option<String>,
}

/// What is known of one voter (`Peers::status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerStatus {
    /// Never talked to.
    NotTried,
    /// The last attempt failed.
    Unreachable(String),
    /// Its last answer came this long ago. A call that is abandoned rather
    /// than failed (openraft drops a replication call at its heartbeat
    /// interval, a silent network partition never fails a connect within
    /// that) leaves no failure behind: only the answer's age tells that a
    /// voter has gone silent.
    Answered(Duration),
}

impl Peers {
    /// Records that `voter` answered; logs when it was unreachable before.
    pub fn mark_up(&self, me: u32, voter: u32) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let entry = state.entry(voter).or_default();
        entry.answered = Some(Instant::now());
        if entry.failure.take().is_some() {
            log::info!("controller: node {me}: voter {voter} is reachable again");
        }
    }

    /// Records that `voter` could not be reached; logs on the first failure.
    pub fn mark_down(&self, me: u32, voter: u32, addr: &SocketAddr, why: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let entry = state.entry(voter).or_default();
        if entry.failure.replace(why.to_string()).is_none() {
            log::warn!("controller: node {me}: voter {voter} at {addr} is unreachable: {why}");
        }
    }

    pub fn status(&self, voter: u32) -> PeerStatus {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.get(&voter) {
            Some(PeerState { failure: Some(why), .. }) => PeerStatus::Unreachable(why.clone()),
            Some(PeerState { answered: Some(at), .. }) => PeerStatus::Answered(at.elapsed()),
            _ => PeerStatus::NotTried,
        }
    }
}

/// Connects to `addr` within `CONNECT_TIMEOUT_MS`.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream =
        tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), TcpStream::connect(addr)).await.map_err(
            |_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {CONNECT_TIMEOUT_MS} ms")),
        )??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request/reply exchange on `stream` within `timeout`.
pub async fn exchange(stream: &mut TcpStream, request: &Request, timeout: Duration) -> io::Result<Reply> {
    let round_trip = async {
        write_frame(stream, request).await?;
        read_frame::<_, Reply>(stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the reply"))
    };
    tokio::time::timeout(timeout, round_trip)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no reply within {} ms", timeout.as_millis())))?
}

// ---------------------------------------------------------------------------
// openraft's network
// ---------------------------------------------------------------------------

/// Creates one `VoterClient` per (openraft stream, target voter).
pub struct RaftClients {
    pub me: u32,
    pub voters: BTreeMap<u32, SocketAddr>,
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for RaftClients {
    type Network = VoterClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> VoterClient {
        let addr =
            u32::try_from(target).ok().and_then(|t| self.voters.get(&t).copied()).or_else(|| node.addr.parse().ok());
        VoterClient { me: self.me, target, addr, stream: None, peers: self.peers.clone() }
    }
}

/// A connection to one voter, opened lazily and reopened after any failure.
pub struct VoterClient {
    me: u32,
    target: NodeId,
    addr: Option<SocketAddr>,
    stream: Option<TcpStream>,
    peers: Arc<Peers>,
}

/// How an exchange with a voter failed, before openraft's error types.
enum CallError {
    /// Could not connect: back off before retrying.
    Unreachable(io::Error),
    /// Connected but the exchange broke: retry at once on a new connection.
    Broken(io::Error),
    Timeout,
}

impl VoterClient {
    async fn call(&mut self, request: &Request, timeout: Duration) -> Result<Reply, CallError> {
        let target = self.target as u32;
        let Some(addr) = self.addr else {
            let e = io::Error::new(io::ErrorKind::NotFound, format!("voter {target} has no known address"));
            return Err(CallError::Unreachable(e));
        };
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    self.peers.mark_down(self.me, target, &addr, &e.to_string());
                    return Err(CallError::Unreachable(e));
                }
            },
        };
        match exchange(&mut stream, request, timeout).await {
            Ok(reply) => {
                self.peers.mark_up(self.me, target);
                self.stream = Some(stream);
                Ok(reply)
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(CallError::Timeout),
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    log::warn!("controller: node {}: closing the connection to voter {target}: {e}", self.me);
                }
                self.peers.mark_down(self.me, target, &addr, &e.to_string());
                Err(CallError::Broken(e))
            }
        }
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
        action: RPCTypes,
        timeout: Duration,
    ) -> RPCError<NodeId, BasicNode, E> {
        match e {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Broken(e) => RPCError::Network(NetworkError::new(&e)),
            CallError::Timeout => {
                RPCError::Timeout(Timeout { action, id: u64::from(self.me), target: self.target, timeout })
            }
        }
    }
}

fn unexpected_reply() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "reply does not match the request")
}

impl RaftNetwork<TypeConfig> for VoterClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let timeout = option.hard_ttl();
        match self.call(&Request::AppendEntries(rpc), timeout).await {
            Ok(Reply::AppendEntries(Ok(resp))) => Ok(resp),
            Ok(Reply::AppendEntries(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&unexpected_reply()))),
            Err(e) => Err(self.rpc_error(e, RPCTypes::AppendEntries, timeout)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let timeout = option.hard_ttl();
        match self.call(&Request::Vote(rpc), timeout).await {
            Ok(Reply::Vote(Ok(resp))) => Ok(resp),
            Ok(Reply::Vote(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&unexpected_reply()))),
            Err(e) => Err(self.rpc_error(e, RPCTypes::Vote, timeout)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let timeout = option.hard_ttl();
        let request = Request::Snapshot { vote, meta: snapshot.meta, image: *snapshot.snapshot };
        match self.call(&request, timeout).await {
            Ok(Reply::Snapshot(Ok(resp))) => Ok(resp),
            Ok(Reply::Snapshot(Err(e))) => Err(StreamingError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(StreamingError::Network(NetworkError::new(&unexpected_reply()))),
            Err(CallError::Unreachable(e)) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
            Err(CallError::Broken(e)) => Err(StreamingError::Network(NetworkError::new(&e))),
            Err(CallError::Timeout) => Err(StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: u64::from(self.me),
                target: self.target,
                timeout,
            })),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(250)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A voter that went silent without a failed call (an abandoned one)
    /// shows by the age of its last answer; a failure shows until it answers.
    #[test]
    fn peer_status_tells_silence_and_failure() {
        let peers = Peers::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(peers.status(2), PeerStatus::NotTried);
        peers.mark_up(1, 2);
        assert!(matches!(peers.status(2), PeerStatus::Answered(age) if age < Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(peers.status(2), PeerStatus::Answered(age) if age >= Duration::from_millis(20)));
        peers.mark_down(1, 2, &addr, "connect timed out after 300 ms");
        assert_eq!(peers.status(2), PeerStatus::Unreachable("connect timed out after 300 ms".into()));
        peers.mark_up(1, 2);
        assert!(matches!(peers.status(2), PeerStatus::Answered(age) if age < Duration::from_millis(20)));
        assert_eq!(peers.status(3), PeerStatus::NotTried);
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msg = ClientRequest::FetchImage { have_version: 42 };
        write_frame(&mut a, &msg).await.unwrap();
        drop(a);
        let back: ClientRequest = read_frame(&mut b).await.unwrap().unwrap();
        assert!(matches!(back, ClientRequest::FetchImage { have_version: 42 }));
        assert!(read_frame::<_, ClientRequest>(&mut b).await.unwrap().is_none(), "clean end of stream");
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_without_allocating() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&(FRAME_BYTES_MAX as u32 + 1).to_be_bytes()).await.unwrap();
        let err = read_frame::<_, ClientRequest>(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[tokio::test]
    async fn frame_cut_short_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&100u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{\"Fetch").await.unwrap();
        drop(a);
        let err = read_frame::<_, ClientRequest>(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn garbage_frame_is_invalid_data() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"hello").await.unwrap();
        let err = read_frame::<_, ClientRequest>(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
