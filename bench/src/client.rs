//! A small Kafka client on `tidelog-protocol`: one TCP connection per broker,
//! ApiVersions negotiation, blocking calls for setup (metadata, topic
//! creation, offsets) and a non-blocking, pipelined mode for the data path
//! (frames queued into a write buffer, responses matched by correlation id in
//! order, as Kafka guarantees per connection).
//!
//! A `Conn` belongs to exactly one thread; nothing here is shared.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use tidelog_protocol::header::{decode_response, encode_request};
use tidelog_protocol::messages::{
    create_topics_request::CreatableTopic, list_offsets_request::ListOffsetsPartition,
    list_offsets_request::ListOffsetsTopic, metadata_request::MetadataRequestTopic, ApiKey, ApiVersionsRequest,
    ApiVersionsResponse, BrokerId, CreateTopicsRequest, CreateTopicsResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, RequestHeader, TopicName,
};
use tidelog_protocol::{Decodable, Encodable, StrBytes};

pub const CLIENT_SOFTWARE_NAME: &str = "tidelog-bench";
pub const CLIENT_SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Read timeout of blocking calls; a JoinGroup may wait a whole rebalance
/// timeout for its answer, so that must stay below this.
pub const BLOCKING_CALL_TIMEOUT_MS: u64 = 60_000;
/// Largest response frame accepted (a fetch is bounded by fetch_max_bytes).
pub const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Versions this client implements, inclusive. Produce and Fetch stop at 12:
/// later versions address topics by id.
pub const CLIENT_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    // Classic consumer groups (consumer.mode = "group").
    (ApiKey::FindCoordinator, 1, 4),
    (ApiKey::JoinGroup, 1, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    // Idempotent and transactional producers (`run --transactions`).
    // AddPartitionsToTxn stops at 3, the client form (4+ batches several
    // transactional ids, broker to broker); EndTxn at 4: 5 makes the
    // coordinator bump the epoch at every commit (KIP-890).
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::EndTxn, 0, 4),
];

/// Kafka error codes the bench treats as transient.
pub fn is_retriable(code: i16) -> bool {
    matches!(code, 3 | 5 | 6 | 7 | 13 | 14 | 15 | 19 | 20 | 56)
}

/// Per-API versions agreed with one broker: `min(broker max, our max)`.
#[derive(Clone, Debug, Default)]
pub struct Versions {
    pub broker: BTreeMap<i16, (i16, i16)>,
    pub chosen: HashMap<i16, i16>,
}

impl Versions {
    pub fn negotiate(broker: BTreeMap<i16, (i16, i16)>) -> Versions {
        let mut chosen = HashMap::new();
        for &(key, ours_min, ours_max) in CLIENT_APIS {
            if let Some(&(b_min, b_max)) = broker.get(&(key as i16)) {
                let v = ours_max.min(b_max);
                if v >= ours_min.max(b_min) {
                    chosen.insert(key as i16, v);
                }
            }
        }
        Versions { broker, chosen }
    }

    pub fn get(&self, key: ApiKey) -> anyhow::Result<i16> {
        self.chosen.get(&(key as i16)).copied().ok_or_else(|| {
            let ours = CLIENT_APIS.iter().find(|a| a.0 == key).map(|a| (a.1, a.2));
            anyhow!(
                "broker does not support {key:?} in a version this client speaks (broker: {:?}, client: {:?})",
                self.broker.get(&(key as i16)),
                ours
            )
        })
    }

    pub fn broker_supports(&self, key: ApiKey) -> bool {
        self.broker.contains_key(&(key as i16))
    }
}

/// One connection to one broker.
pub struct Conn {
    stream: TcpStream,
    pub addr: String,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_correlation_id: i32,
    pub versions: Versions,
    client_id: StrBytes,
    nonblocking: bool,
}

impl Conn {
    /// Connects and negotiates API versions (blocking mode).
    pub fn connect(addr: &str, client_id: &str) -> anyhow::Result<Conn> {
        let sock = addr
            .to_socket_addrs()
            .with_context(|| format!("resolving {addr}"))?
            .next()
            .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
        let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(BLOCKING_CALL_TIMEOUT_MS)))?;
        let mut conn = Conn {
            stream,
            addr: addr.to_string(),
            rbuf: BytesMut::with_capacity(1 << 20),
            wbuf: BytesMut::with_capacity(1 << 20),
            next_correlation_id: 1,
            versions: Versions::default(),
            client_id: StrBytes::from_string(client_id.to_string()),
            nonblocking: false,
        };
        conn.negotiate().with_context(|| format!("ApiVersions with {addr}"))?;
        Ok(conn)
    }

    fn negotiate(&mut self) -> anyhow::Result<()> {
        let mut version = 3i16;
        for _ in 0..3 {
            let req = ApiVersionsRequest::default()
                .with_client_software_name(StrBytes::from_static_str(CLIENT_SOFTWARE_NAME))
                .with_client_software_version(StrBytes::from_static_str(CLIENT_SOFTWARE_VERSION));
            let cid = self.queue(ApiKey::ApiVersions, version, &req)?;
            self.flush_blocking()?;
            let frame = self.read_frame_blocking()?;
            // KIP-511: a broker that does not know our version answers in v0.
            let mut f = frame.clone();
            let resp = match decode_response::<ApiVersionsResponse>(ApiKey::ApiVersions, version, &mut f) {
                Ok((c, r)) if r.error_code == 0 => (c, r),
                _ => {
                    let mut f = frame;
                    decode_response::<ApiVersionsResponse>(ApiKey::ApiVersions, 0, &mut f)?
                }
            };
            anyhow::ensure!(resp.0 == cid, "ApiVersions correlation id {} != {cid}", resp.0);
            let body = resp.1;
            let broker: BTreeMap<i16, (i16, i16)> =
                body.api_keys.iter().map(|a| (a.api_key, (a.min_version, a.max_version))).collect();
            if body.error_code == 35 {
                let max = broker.get(&(ApiKey::ApiVersions as i16)).map(|v| v.1).unwrap_or(0);
                version = max.min(3);
                continue;
            }
            anyhow::ensure!(body.error_code == 0, "ApiVersions error code {}", body.error_code);
            self.versions = Versions::negotiate(broker);
            return Ok(());
        }
        bail!("ApiVersions did not settle on a version")
    }

    /// Appends a request frame to the write buffer; returns its correlation id.
    pub fn queue<M: Encodable>(&mut self, key: ApiKey, version: i16, body: &M) -> anyhow::Result<i32> {
        let cid = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(cid)
            .with_client_id(Some(self.client_id.clone()));
        let frame = encode_request(&header, body).map_err(|e| anyhow!("{key:?} v{version}: {e}"))?;
        self.wbuf.extend_from_slice(&frame);
        Ok(cid)
    }

    /// Blocking request/response, for setup calls outside the data path.
    pub fn call<Req: Encodable, Resp: Decodable>(&mut self, key: ApiKey, body: &Req) -> anyhow::Result<Resp> {
        let version = self.versions.get(key)?;
        let cid = self.queue(key, version, body)?;
        self.flush_blocking()?;
        let mut frame = self.read_frame_blocking()?;
        let (rcid, resp) = decode_response::<Resp>(key, version, &mut frame).map_err(|e| anyhow!("{key:?}: {e}"))?;
        anyhow::ensure!(rcid == cid, "{key:?}: correlation id {rcid} != {cid}");
        Ok(resp)
    }

    fn flush_blocking(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.wbuf).with_context(|| format!("writing to {}", self.addr))?;
        self.wbuf.clear();
        Ok(())
    }

    fn read_frame_blocking(&mut self) -> anyhow::Result<Bytes> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(f);
            }
            self.read_some()?;
        }
    }

    /// Switches to the non-blocking data-path mode.
    pub fn set_nonblocking(&mut self) -> anyhow::Result<()> {
        self.stream.set_nonblocking(true)?;
        self.nonblocking = true;
        Ok(())
    }

    pub fn raw_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    pub fn wants_write(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// What to poll this connection for: input always, output while a
    /// request waits to be written.
    pub fn pollfd(&self) -> libc::pollfd {
        libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN | if self.wants_write() { libc::POLLOUT } else { 0 },
            revents: 0,
        }
    }

    /// Writes what the socket takes now; true when the buffer is empty.
    pub fn flush(&mut self) -> anyhow::Result<bool> {
        while !self.wbuf.is_empty() {
            match self.stream.write(&self.wbuf) {
                Ok(0) => bail!("{}: connection closed while writing", self.addr),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("writing to {}", self.addr)),
            }
        }
        Ok(true)
    }

    /// Reads once (blocking mode) or until it would block (non-blocking).
    /// Returns the number of bytes read.
    pub fn read_some(&mut self) -> anyhow::Result<usize> {
        let mut total = 0;
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < 64 * 1024 {
                self.rbuf.reserve(256 * 1024);
            }
            let spare = self.rbuf.spare_capacity_mut();
            // SAFETY: `read` only writes initialized bytes into the slice and
            // we only extend `len` by the count it reports.
            let buf = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut u8, spare.len()) };
            match self.stream.read(buf) {
                Ok(0) => bail!("{}: connection closed by the broker", self.addr),
                Ok(n) => {
                    // SAFETY: n bytes were just written by read.
                    unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
                    total += n;
                    if n < buf.len() || !self.nonblocking {
                        return Ok(total);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(total),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading from {}", self.addr)),
            }
        }
    }

    /// Splits off one complete response frame (without its length prefix).
    pub fn next_frame(&mut self) -> anyhow::Result<Option<Bytes>> {
        if self.rbuf.len() < 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]);
        if len < 4 || len as usize > RESPONSE_BYTES_MAX {
            bail!("{}: response frame length {len} is invalid", self.addr);
        }
        let len = len as usize;
        if self.rbuf.len() < 4 + len {
            self.rbuf.reserve(4 + len - self.rbuf.len());
            return Ok(None);
        }
        self.rbuf.advance(4);
        Ok(Some(self.rbuf.split_to(len).freeze()))
    }
}

/// Reads the correlation id at the front of a response frame.
pub fn frame_correlation_id(frame: &[u8]) -> Option<i32> {
    (frame.len() >= 4).then(|| i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]))
}

/// Waits until one of `fds` is readable (or writable, where asked) or the
/// timeout passes.
pub fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> anyhow::Result<()> {
    // ppoll, not poll: poll's millisecond timeout turns every sub-millisecond
    // wait of a paced producer (a 1 KiB record every 50 us at 20 MB/s) into a
    // busy loop that steals the core from whatever else runs there (on a small
    // host, the broker under test).
    let timeout = timeout.min(Duration::from_secs(1));
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: fds is a valid slice of pollfd for the duration of the call; ts outlives it.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e).context("poll");
        }
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionMeta {
    pub index: i32,
    pub leader: i32,
}

/// The part of the cluster metadata the bench needs.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// node id -> "host:port"
    pub brokers: BTreeMap<i32, String>,
    pub controller: i32,
    pub partitions: Vec<PartitionMeta>,
    pub cluster_id: Option<String>,
}

impl Cluster {
    pub fn broker_addr(&self, node: i32) -> anyhow::Result<&str> {
        self.brokers.get(&node).map(|s| s.as_str()).ok_or_else(|| anyhow!("leader node {node} not in metadata"))
    }
}

/// Fetches metadata for `topic`. Returns `Ok(None)` when the topic does not
/// exist (yet), or some partition has no leader.
pub fn fetch_metadata(conn: &mut Conn, topic: &str) -> anyhow::Result<(Cluster, Option<i16>)> {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(TopicName(StrBytes::from_string(topic.to_string()))))
        ]))
        .with_allow_auto_topic_creation(false);
    let resp: MetadataResponse = conn.call(ApiKey::Metadata, &req)?;
    let mut cluster = Cluster {
        brokers: resp.brokers.iter().map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port))).collect(),
        controller: resp.controller_id.0,
        partitions: Vec::new(),
        cluster_id: resp.cluster_id.as_ref().map(|s| s.to_string()),
    };
    let Some(t) = resp.topics.iter().find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic)) else {
        return Ok((cluster, Some(3)));
    };
    if t.error_code != 0 {
        return Ok((cluster, Some(t.error_code)));
    }
    let mut parts: Vec<PartitionMeta> =
        t.partitions.iter().map(|p| PartitionMeta { index: p.partition_index, leader: p.leader_id.0 }).collect();
    parts.sort_by_key(|p| p.index);
    if parts.iter().any(|p| p.leader < 0) || parts.is_empty() {
        return Ok((cluster, Some(5)));
    }
    cluster.partitions = parts;
    Ok((cluster, None))
}

/// Makes sure `topic` exists with leaders for every partition, creating it
/// when asked. Returns the metadata.
pub fn ensure_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    replication_factor: i16,
    create: bool,
) -> anyhow::Result<(Cluster, Versions)> {
    let mut conn = Conn::connect(bootstrap, "tidelog-bench-admin")?;
    let versions = conn.versions.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut created = false;
    loop {
        let (cluster, err) = fetch_metadata(&mut conn, topic)?;
        match err {
            None => {
                // Only worth a word when the run meant to make the topic.
                if create && cluster.partitions.len() as i32 != partitions {
                    eprintln!(
                        "warning: topic {topic} exists with {} partitions (workload asks for {partitions}); using it as is",
                        cluster.partitions.len()
                    );
                }
                return Ok((cluster, versions));
            }
            Some(3) if create && !created => {
                let req = CreateTopicsRequest::default()
                    .with_topics(vec![CreatableTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                        .with_num_partitions(partitions)
                        .with_replication_factor(replication_factor)])
                    .with_timeout_ms(30_000);
                let mut admin = match cluster.brokers.get(&cluster.controller) {
                    Some(addr) if cluster.controller >= 0 => Conn::connect(addr, "tidelog-bench-admin")?,
                    _ => Conn::connect(bootstrap, "tidelog-bench-admin")?,
                };
                let resp: CreateTopicsResponse = admin.call(ApiKey::CreateTopics, &req)?;
                for t in &resp.topics {
                    // 36 = TOPIC_ALREADY_EXISTS: someone else won the race.
                    if t.error_code != 0 && t.error_code != 36 {
                        bail!(
                            "CreateTopics {topic}: error {} {}",
                            t.error_code,
                            t.error_message.as_ref().map(|m| m.as_str()).unwrap_or("")
                        );
                    }
                }
                created = true;
            }
            Some(3) if !create => bail!("topic {topic} does not exist and topic.create is false"),
            Some(code) => {
                if Instant::now() > deadline {
                    bail!("topic {topic} not ready after 30 s (error code {code})");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if Instant::now() > deadline {
            bail!("topic {topic} not ready after 30 s");
        }
    }
}

/// ListOffsets for every partition: `timestamp` -1 = latest, -2 = earliest.
/// Returns offsets indexed by partition. Retries transient errors for up to
/// 10 s.
pub fn list_offsets(cluster: &Cluster, topic: &str, timestamp: i64) -> anyhow::Result<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match list_offsets_once(cluster, topic, timestamp) {
            Err(ListOffsetsError::Retriable(msg)) if Instant::now() < deadline => {
                let _ = msg;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(ListOffsetsError::Retriable(msg)) => bail!("{msg}"),
            Err(ListOffsetsError::Other(e)) => return Err(e),
            Ok(v) => return Ok(v),
        }
    }
}

enum ListOffsetsError {
    Retriable(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for ListOffsetsError {
    fn from(e: anyhow::Error) -> Self {
        ListOffsetsError::Other(e)
    }
}

fn list_offsets_once(cluster: &Cluster, topic: &str, timestamp: i64) -> Result<Vec<i64>, ListOffsetsError> {
    let n = cluster.partitions.iter().map(|p| p.index).max().map(|m| m + 1).unwrap_or(0) as usize;
    let mut out = vec![-1i64; n];
    let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in &cluster.partitions {
        by_leader.entry(p.leader).or_default().push(p.index);
    }
    for (leader, parts) in by_leader {
        let mut conn = Conn::connect(cluster.broker_addr(leader)?, "tidelog-bench-admin")?;
        let req =
            ListOffsetsRequest::default().with_replica_id(BrokerId(-1)).with_topics(vec![ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(
                    parts
                        .iter()
                        .map(|&p| ListOffsetsPartition::default().with_partition_index(p).with_timestamp(timestamp))
                        .collect(),
                )]);
        let resp: ListOffsetsResponse = conn.call(ApiKey::ListOffsets, &req)?;
        for t in &resp.topics {
            for p in &t.partitions {
                if p.error_code != 0 {
                    let msg = format!("ListOffsets {topic}-{}: error {}", p.partition_index, p.error_code);
                    return Err(if is_retriable(p.error_code) {
                        ListOffsetsError::Retriable(msg)
                    } else {
                        ListOffsetsError::Other(anyhow!(msg))
                    });
                }
                if let Some(slot) = out.get_mut(p.partition_index as usize) {
                    *slot = p.offset;
                }
            }
        }
    }
    if out.iter().any(|&o| o < 0) {
        return Err(ListOffsetsError::Other(anyhow!("ListOffsets did not answer for every partition of {topic}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_min_of_maxima_and_drops_unsupported() {
        let mut broker = BTreeMap::new();
        broker.insert(ApiKey::Produce as i16, (3, 9));
        broker.insert(ApiKey::Fetch as i16, (13, 17));
        broker.insert(ApiKey::Metadata as i16, (0, 12));
        let v = Versions::negotiate(broker);
        assert_eq!(v.get(ApiKey::Produce).unwrap(), 9);
        assert_eq!(v.get(ApiKey::Metadata).unwrap(), 12);
        assert!(v.get(ApiKey::Fetch).is_err(), "no overlap: broker min 13 > our max 12");
        assert!(v.get(ApiKey::ListOffsets).is_err());
    }
}
