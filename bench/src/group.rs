//! Classic Kafka consumer-group membership for one consumer thread:
//! FindCoordinator, JoinGroup (with KIP-394's MEMBER_ID_REQUIRED round
//! trip), the leader's assignment ("range" or "roundrobin" over Kafka's
//! ConsumerProtocol v0 byte encoding), SyncGroup, Heartbeat, OffsetCommit,
//! OffsetFetch and LeaveGroup.
//!
//! Rebalancing is eager, as Kafka's classic protocol: before it rejoins, a
//! member commits the positions of everything it owns and gives all of it
//! up. The broker's join barrier holds every rejoin until all members are
//! in, so a partition's next owner reads the committed offset its last
//! owner wrote and every record is consumed once per group.
//!
//! Lives on its consumer's thread and owns one blocking connection to the
//! coordinator; the fetch connections stay non-blocking and separate.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tidelog_protocol::messages::{
    join_group_request::JoinGroupRequestProtocol,
    leave_group_request::MemberIdentity,
    offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic},
    offset_fetch_request::{OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics},
    sync_group_request::SyncGroupRequestAssignment,
    ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, HeartbeatRequest, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use tidelog_protocol::StrBytes;

use crate::client::Conn;
use crate::workload::Assignor;

/// The protocol type of Kafka's consumer groups.
pub const PROTOCOL_TYPE: &str = "consumer";
/// Version of the ConsumerProtocol subscription and assignment we write.
const CONSUMER_PROTOCOL_VERSION: i16 = 0;
/// How long setup calls (find, join, sync, offset fetch) keep retrying
/// transient errors before the consumer gives up.
const SETUP_RETRY_MAX: Duration = Duration::from_secs(60);
/// Back-off between retries of a transient group error.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

// Kafka error codes the membership reacts to.
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const NOT_COORDINATOR: i16 = 16;
const ILLEGAL_GENERATION: i16 = 22;
const UNKNOWN_MEMBER_ID: i16 = 25;
const REBALANCE_IN_PROGRESS: i16 = 27;
const MEMBER_ID_REQUIRED: i16 = 79;
const UNSTABLE_OFFSET_COMMIT: i16 = 88;

fn coordinator_moved(code: i16) -> bool {
    matches!(code, COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE | NOT_COORDINATOR)
}

// ---------------------------------------------------------------------------
// ConsumerProtocol encoding (non-flexible, big-endian, as Kafka's
// ConsumerProtocolSubscription / ConsumerProtocolAssignment):
//
//   subscription v0: i16 version | i32 n | n x (i16 len, topic) | i32 user_data len (-1 = null) | bytes
//   assignment   v0: i16 version | i32 n | n x (i16 len, topic, i32 m, m x i32 partition) | user_data
//
// Later versions only append fields, so a v0 reader reads the front of any.
// ---------------------------------------------------------------------------

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len() as i16);
    b.put_slice(s.as_bytes());
}

fn get_i16(b: &mut &[u8]) -> Option<i16> {
    (b.remaining() >= 2).then(|| b.get_i16())
}

fn get_i32(b: &mut &[u8]) -> Option<i32> {
    (b.remaining() >= 4).then(|| b.get_i32())
}

fn get_str(b: &mut &[u8]) -> Option<String> {
    let n = get_i16(b)?;
    let n = usize::try_from(n).ok()?;
    if b.remaining() < n {
        return None;
    }
    let s = String::from_utf8(b[..n].to_vec()).ok()?;
    b.advance(n);
    Some(s)
}

/// An array length that cannot claim more elements than bytes remain.
fn get_len(b: &mut &[u8], element_bytes_min: usize) -> Option<usize> {
    let n = usize::try_from(get_i32(b)?).ok()?;
    (n.saturating_mul(element_bytes_min) <= b.remaining()).then_some(n)
}

/// ConsumerProtocolSubscription v0 for `topics`, no user data.
pub fn encode_subscription(topics: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(CONSUMER_PROTOCOL_VERSION);
    b.put_i32(topics.len() as i32);
    for t in topics {
        put_str(&mut b, t);
    }
    b.put_i32(-1);
    b.freeze()
}

/// The topics of a subscription of any version; `None` when malformed.
pub fn decode_subscription(mut b: &[u8]) -> Option<Vec<String>> {
    let b = &mut b;
    let _version = get_i16(b)?;
    let n = get_len(b, 2)?;
    (0..n).map(|_| get_str(b)).collect()
}

/// ConsumerProtocolAssignment v0 giving `partitions` of `topic`.
pub fn encode_assignment(topic: &str, partitions: &[i32]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(CONSUMER_PROTOCOL_VERSION);
    if partitions.is_empty() {
        b.put_i32(0);
    } else {
        b.put_i32(1);
        put_str(&mut b, topic);
        b.put_i32(partitions.len() as i32);
        for &p in partitions {
            b.put_i32(p);
        }
    }
    b.put_i32(-1);
    b.freeze()
}

/// Partitions per topic of an assignment of any version. Empty bytes are
/// an empty assignment (what a broker sends a member the leader left out).
pub fn decode_assignment(mut b: &[u8]) -> Option<BTreeMap<String, Vec<i32>>> {
    let mut out = BTreeMap::new();
    if b.is_empty() {
        return Some(out);
    }
    let b = &mut b;
    let _version = get_i16(b)?;
    let n = get_len(b, 6)?;
    for _ in 0..n {
        let topic = get_str(b)?;
        let m = get_len(b, 4)?;
        let parts: Option<Vec<i32>> = (0..m).map(|_| get_i32(b)).collect();
        out.entry(topic).or_insert_with(Vec::new).extend(parts?);
    }
    Some(out)
}

/// The leader's assignment of `topic`'s `partitions` over the members
/// subscribed to it, as Kafka's RangeAssignor / RoundRobinAssignor compute
/// it for a single topic: members in member-id order; range gives each a
/// contiguous run (the first `n % m` one extra), round-robin deals them out.
/// Every member appears in the result, possibly with nothing.
pub fn assign(
    assignor: Assignor,
    members: &[(String, Vec<String>)],
    topic: &str,
    partitions: &[i32],
) -> BTreeMap<String, Vec<i32>> {
    let mut out: BTreeMap<String, Vec<i32>> = members.iter().map(|(id, _)| (id.clone(), Vec::new())).collect();
    let mut subscribed: Vec<&str> =
        members.iter().filter(|(_, topics)| topics.iter().any(|t| t == topic)).map(|(id, _)| id.as_str()).collect();
    subscribed.sort_unstable();
    subscribed.dedup();
    if subscribed.is_empty() {
        return out;
    }
    let mut parts = partitions.to_vec();
    parts.sort_unstable();
    let m = subscribed.len();
    match assignor {
        Assignor::Range => {
            let (per, extra) = (parts.len() / m, parts.len() % m);
            for (i, id) in subscribed.iter().enumerate() {
                let start = i * per + i.min(extra);
                let len = per + usize::from(i < extra);
                if let Some(v) = out.get_mut(*id) {
                    v.extend_from_slice(&parts[start..start + len]);
                }
            }
        }
        Assignor::RoundRobin => {
            for (i, p) in parts.iter().enumerate() {
                if let Some(v) = out.get_mut(subscribed[i % m]) {
                    v.push(*p);
                }
            }
        }
    }
    out
}

/// Timeouts and cadence of one member, from the workload.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    pub group_id: String,
    pub client_id: String,
    pub assignor: Assignor,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub heartbeat_interval_ms: u64,
    pub commit_interval_ms: u64,
}

/// What a heartbeat or commit says about our membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Stable,
    /// Give everything up and rejoin (a rebalance, or we were fenced).
    Rejoin,
}

/// Counters a consumer folds into its stats.
#[derive(Clone, Debug, Default)]
pub struct GroupCounters {
    /// Generations joined (assignments received).
    pub generations: u64,
    pub commits: u64,
    pub heartbeats: u64,
    /// Error codes seen on group calls, including the expected ones
    /// (MEMBER_ID_REQUIRED, REBALANCE_IN_PROGRESS).
    pub error_codes: BTreeMap<i16, u64>,
}

pub struct GroupMember {
    bootstrap: String,
    s: GroupSettings,
    topic: String,
    partitions: Vec<i32>,
    conn: Conn,
    member_id: String,
    generation: i32,
    pub next_heartbeat: Instant,
    pub next_commit: Instant,
    pub counters: GroupCounters,
}

/// FindCoordinator for `group_id` through `bootstrap`; returns "host:port".
pub fn find_coordinator(bootstrap: &str, group_id: &str, client_id: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + SETUP_RETRY_MAX;
    let mut conn = Conn::connect(bootstrap, client_id)?;
    let version =
        conn.versions.get(ApiKey::FindCoordinator).context("consumer.mode = \"group\" needs FindCoordinator")?;
    loop {
        let mut req = FindCoordinatorRequest::default().with_key_type(0);
        if version >= 4 {
            req = req.with_coordinator_keys(vec![StrBytes::from_string(group_id.to_string())]);
        } else {
            req = req.with_key(StrBytes::from_string(group_id.to_string()));
        }
        let resp: FindCoordinatorResponse = conn.call(ApiKey::FindCoordinator, &req)?;
        let (code, host, port) = if version >= 4 {
            let c = resp.coordinators.first().ok_or_else(|| anyhow!("FindCoordinator: empty coordinators"))?;
            (c.error_code, c.host.to_string(), c.port)
        } else {
            (resp.error_code, resp.host.to_string(), resp.port)
        };
        match code {
            0 => return Ok(format!("{host}:{port}")),
            c if coordinator_moved(c) && Instant::now() < deadline => std::thread::sleep(RETRY_BACKOFF),
            c => bail!("FindCoordinator {group_id}: error {c}"),
        }
    }
}

impl GroupMember {
    /// Finds the coordinator; `join` makes this a member.
    pub fn connect(bootstrap: &str, s: GroupSettings, topic: &str, partitions: &[i32]) -> anyhow::Result<GroupMember> {
        let addr = find_coordinator(bootstrap, &s.group_id, &s.client_id)?;
        let conn = Conn::connect(&addr, &s.client_id).with_context(|| format!("group coordinator {addr}"))?;
        for key in [
            ApiKey::JoinGroup,
            ApiKey::SyncGroup,
            ApiKey::Heartbeat,
            ApiKey::LeaveGroup,
            ApiKey::OffsetCommit,
            ApiKey::OffsetFetch,
        ] {
            conn.versions.get(key).context("consumer.mode = \"group\" needs the classic group APIs")?;
        }
        let now = Instant::now();
        Ok(GroupMember {
            bootstrap: bootstrap.to_string(),
            s,
            topic: topic.to_string(),
            partitions: partitions.to_vec(),
            conn,
            member_id: String::new(),
            generation: -1,
            next_heartbeat: now,
            next_commit: now,
            counters: GroupCounters::default(),
        })
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    fn count(&mut self, code: i16) {
        if code != 0 {
            *self.counters.error_codes.entry(code).or_insert(0) += 1;
        }
    }

    fn group_id(&self) -> GroupId {
        GroupId(StrBytes::from_string(self.s.group_id.clone()))
    }

    fn topic_name(&self) -> TopicName {
        TopicName(StrBytes::from_string(self.topic.clone()))
    }

    fn refind_coordinator(&mut self) -> anyhow::Result<()> {
        let addr = find_coordinator(&self.bootstrap, &self.s.group_id, &self.s.client_id)?;
        self.conn = Conn::connect(&addr, &self.s.client_id).with_context(|| format!("group coordinator {addr}"))?;
        Ok(())
    }

    /// Joins (or rejoins) the group and returns this member's partitions.
    /// Blocks through the broker's join barrier and the leader's sync.
    pub fn join(&mut self) -> anyhow::Result<Vec<i32>> {
        let deadline = Instant::now() + SETUP_RETRY_MAX + Duration::from_millis(self.s.rebalance_timeout_ms as u64);
        loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "group {}: no stable generation within {:?}",
                self.s.group_id,
                SETUP_RETRY_MAX
            );
            let metadata = encode_subscription(&[&self.topic]);
            // Our assignor first: the broker picks the first one every member lists.
            let names = match self.s.assignor {
                Assignor::Range => [Assignor::Range, Assignor::RoundRobin],
                Assignor::RoundRobin => [Assignor::RoundRobin, Assignor::Range],
            };
            let req = JoinGroupRequest::default()
                .with_group_id(self.group_id())
                .with_session_timeout_ms(self.s.session_timeout_ms)
                .with_rebalance_timeout_ms(self.s.rebalance_timeout_ms)
                .with_member_id(StrBytes::from_string(self.member_id.clone()))
                .with_protocol_type(StrBytes::from_static_str(PROTOCOL_TYPE))
                .with_protocols(
                    names
                        .iter()
                        .map(|a| {
                            JoinGroupRequestProtocol::default()
                                .with_name(StrBytes::from_static_str(a.protocol_name()))
                                .with_metadata(metadata.clone())
                        })
                        .collect(),
                );
            let resp: JoinGroupResponse = self.conn.call(ApiKey::JoinGroup, &req)?;
            self.count(resp.error_code);
            match resp.error_code {
                0 => {}
                MEMBER_ID_REQUIRED => {
                    // KIP-394: the broker names us; join again with that id.
                    self.member_id = resp.member_id.to_string();
                    continue;
                }
                UNKNOWN_MEMBER_ID => {
                    self.member_id.clear();
                    continue;
                }
                REBALANCE_IN_PROGRESS | ILLEGAL_GENERATION => {
                    std::thread::sleep(RETRY_BACKOFF);
                    continue;
                }
                c if coordinator_moved(c) => {
                    std::thread::sleep(RETRY_BACKOFF);
                    self.refind_coordinator()?;
                    continue;
                }
                c => bail!("JoinGroup {}: error {c}", self.s.group_id),
            }
            self.member_id = resp.member_id.to_string();
            self.generation = resp.generation_id;
            let protocol = resp.protocol_name.as_ref().map(|p| p.to_string()).unwrap_or_default();
            let assignor = Assignor::from_protocol_name(&protocol)
                .ok_or_else(|| anyhow!("group {}: broker chose unknown assignor {protocol:?}", self.s.group_id))?;
            let assignments = if resp.leader.as_str() == self.member_id {
                let mut members = Vec::with_capacity(resp.members.len());
                for m in &resp.members {
                    let topics = decode_subscription(&m.metadata).ok_or_else(|| {
                        anyhow!(
                            "group {}: member {} sent a malformed subscription",
                            self.s.group_id,
                            m.member_id.as_str()
                        )
                    })?;
                    members.push((m.member_id.to_string(), topics));
                }
                assign(assignor, &members, &self.topic, &self.partitions)
                    .into_iter()
                    .map(|(id, parts)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(StrBytes::from_string(id))
                            .with_assignment(encode_assignment(&self.topic, &parts))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let version = self.conn.versions.get(ApiKey::SyncGroup)?;
            let mut sync = SyncGroupRequest::default()
                .with_group_id(self.group_id())
                .with_generation_id(self.generation)
                .with_member_id(StrBytes::from_string(self.member_id.clone()))
                .with_assignments(assignments);
            if version >= 5 {
                sync = sync
                    .with_protocol_type(Some(StrBytes::from_static_str(PROTOCOL_TYPE)))
                    .with_protocol_name(Some(StrBytes::from_string(protocol)));
            }
            let resp: SyncGroupResponse = self.conn.call(ApiKey::SyncGroup, &sync)?;
            self.count(resp.error_code);
            match resp.error_code {
                0 => {}
                REBALANCE_IN_PROGRESS | ILLEGAL_GENERATION => continue,
                UNKNOWN_MEMBER_ID => {
                    self.member_id.clear();
                    continue;
                }
                c if coordinator_moved(c) => {
                    std::thread::sleep(RETRY_BACKOFF);
                    self.refind_coordinator()?;
                    continue;
                }
                c => bail!("SyncGroup {}: error {c}", self.s.group_id),
            }
            let mut given = decode_assignment(&resp.assignment)
                .ok_or_else(|| anyhow!("group {}: malformed assignment", self.s.group_id))?;
            let mut mine = given.remove(&self.topic).unwrap_or_default();
            mine.sort_unstable();
            self.counters.generations += 1;
            let now = Instant::now();
            self.next_heartbeat = now + Duration::from_millis(self.s.heartbeat_interval_ms);
            self.next_commit = now + Duration::from_millis(self.s.commit_interval_ms);
            return Ok(mine);
        }
    }

    /// One heartbeat; schedules the next.
    pub fn heartbeat(&mut self) -> anyhow::Result<Health> {
        self.counters.heartbeats += 1;
        self.next_heartbeat = Instant::now() + Duration::from_millis(self.s.heartbeat_interval_ms);
        let req = HeartbeatRequest::default()
            .with_group_id(self.group_id())
            .with_generation_id(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()));
        let resp: HeartbeatResponse = self.conn.call(ApiKey::Heartbeat, &req)?;
        self.count(resp.error_code);
        self.health(resp.error_code, "Heartbeat")
    }

    fn health(&mut self, code: i16, what: &str) -> anyhow::Result<Health> {
        match code {
            0 => Ok(Health::Stable),
            REBALANCE_IN_PROGRESS | ILLEGAL_GENERATION => Ok(Health::Rejoin),
            UNKNOWN_MEMBER_ID => {
                self.member_id.clear();
                Ok(Health::Rejoin)
            }
            c if coordinator_moved(c) => {
                self.refind_coordinator()?;
                Ok(Health::Rejoin)
            }
            c => bail!("{what} {}: error {c}", self.s.group_id),
        }
    }

    /// Commits `positions` (partition, next offset to read); schedules the
    /// next periodic commit.
    pub fn commit(&mut self, positions: &[(i32, i64)]) -> anyhow::Result<Health> {
        self.next_commit = Instant::now() + Duration::from_millis(self.s.commit_interval_ms);
        if positions.is_empty() {
            return Ok(Health::Stable);
        }
        self.counters.commits += 1;
        let req = OffsetCommitRequest::default()
            .with_group_id(self.group_id())
            .with_generation_id_or_member_epoch(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()))
            .with_topics(vec![OffsetCommitRequestTopic::default().with_name(self.topic_name()).with_partitions(
                positions
                    .iter()
                    .map(|&(p, o)| {
                        OffsetCommitRequestPartition::default().with_partition_index(p).with_committed_offset(o)
                    })
                    .collect(),
            )]);
        let resp: OffsetCommitResponse = self.conn.call(ApiKey::OffsetCommit, &req)?;
        let mut worst = 0i16;
        for t in &resp.topics {
            for p in &t.partitions {
                self.count(p.error_code);
                if p.error_code != 0 {
                    worst = p.error_code;
                }
            }
        }
        self.health(worst, "OffsetCommit")
    }

    /// Committed offsets of `partitions`; partitions without one are absent.
    pub fn committed(&mut self, partitions: &[i32]) -> anyhow::Result<HashMap<i32, i64>> {
        let deadline = Instant::now() + SETUP_RETRY_MAX;
        let version = self.conn.versions.get(ApiKey::OffsetFetch)?;
        loop {
            let mut req = OffsetFetchRequest::default();
            if version >= 8 {
                req = req.with_groups(vec![OffsetFetchRequestGroup::default()
                    .with_group_id(self.group_id())
                    .with_topics(Some(vec![OffsetFetchRequestTopics::default()
                        .with_name(self.topic_name())
                        .with_partition_indexes(partitions.to_vec())]))]);
            } else {
                req = req.with_group_id(self.group_id()).with_topics(Some(vec![OffsetFetchRequestTopic::default()
                    .with_name(self.topic_name())
                    .with_partition_indexes(partitions.to_vec())]));
            }
            let resp: OffsetFetchResponse = self.conn.call(ApiKey::OffsetFetch, &req)?;
            let mut out = HashMap::new();
            let mut codes = Vec::new();
            if version >= 8 {
                for g in &resp.groups {
                    codes.push(g.error_code);
                    for t in &g.topics {
                        for p in &t.partitions {
                            codes.push(p.error_code);
                            if p.error_code == 0 && p.committed_offset >= 0 {
                                out.insert(p.partition_index, p.committed_offset);
                            }
                        }
                    }
                }
            } else {
                codes.push(resp.error_code);
                for t in &resp.topics {
                    for p in &t.partitions {
                        codes.push(p.error_code);
                        if p.error_code == 0 && p.committed_offset >= 0 {
                            out.insert(p.partition_index, p.committed_offset);
                        }
                    }
                }
            }
            if let Some(c) = codes.into_iter().find(|&c| c != 0) {
                self.count(c);
                if (coordinator_moved(c) || c == UNSTABLE_OFFSET_COMMIT) && Instant::now() < deadline {
                    std::thread::sleep(RETRY_BACKOFF);
                    if c != UNSTABLE_OFFSET_COMMIT {
                        self.refind_coordinator()?;
                    }
                    continue;
                }
                bail!("OffsetFetch {}: error {c}", self.s.group_id);
            }
            return Ok(out);
        }
    }

    /// Leaves the group (best effort: the session would expire anyway).
    pub fn leave(&mut self) -> anyhow::Result<()> {
        if self.member_id.is_empty() {
            return Ok(());
        }
        let version = self.conn.versions.get(ApiKey::LeaveGroup)?;
        let mut req = LeaveGroupRequest::default().with_group_id(self.group_id());
        if version >= 3 {
            let mut m = MemberIdentity::default().with_member_id(StrBytes::from_string(self.member_id.clone()));
            if version >= 5 {
                m = m.with_reason(Some(StrBytes::from_static_str("tidelog-bench consumer done")));
            }
            req = req.with_members(vec![m]);
        } else {
            req = req.with_member_id(StrBytes::from_string(self.member_id.clone()));
        }
        let resp: LeaveGroupResponse = self.conn.call(ApiKey::LeaveGroup, &req)?;
        self.count(resp.error_code);
        for m in &resp.members {
            self.count(m.error_code);
        }
        self.member_id.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Vec<(String, Vec<String>)> {
        ids.iter().map(|id| (id.to_string(), vec!["t".to_string()])).collect()
    }

    #[test]
    fn range_gives_contiguous_runs_extra_to_the_first() {
        let a = assign(Assignor::Range, &members(&["c", "a", "b"]), "t", &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(a["a"], vec![0, 1, 2]);
        assert_eq!(a["b"], vec![3, 4, 5]);
        assert_eq!(a["c"], vec![6, 7]);
    }

    #[test]
    fn round_robin_deals_in_member_order() {
        let a = assign(Assignor::RoundRobin, &members(&["m2", "m1"]), "t", &[4, 0, 1, 2, 3]);
        assert_eq!(a["m1"], vec![0, 2, 4]);
        assert_eq!(a["m2"], vec![1, 3]);
    }

    #[test]
    fn more_members_than_partitions_and_unsubscribed_members() {
        let mut m = members(&["a", "b", "c"]);
        m.push(("z".into(), vec!["other".into()]));
        for assignor in [Assignor::Range, Assignor::RoundRobin] {
            let a = assign(assignor, &m, "t", &[0, 1]);
            assert_eq!(a.len(), 4, "every member gets an answer");
            assert_eq!(a["a"], vec![0]);
            assert_eq!(a["b"], vec![1]);
            assert!(a["c"].is_empty());
            assert!(a["z"].is_empty());
            let mut all: Vec<i32> = a.values().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, vec![0, 1]);
        }
    }

    #[test]
    fn subscription_bytes_match_kafka_v0() {
        let b = encode_subscription(&["ab"]);
        // version 0 | 1 topic | "ab" | null user data
        assert_eq!(&b[..], &[0, 0, 0, 0, 0, 1, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(decode_subscription(&b), Some(vec!["ab".to_string()]));
        // A v1 subscription (owned partitions appended) still reads.
        let mut v1 = BytesMut::from(&b[..]);
        v1[1] = 1;
        v1.put_i32(0);
        assert_eq!(decode_subscription(&v1), Some(vec!["ab".to_string()]));
        assert_eq!(decode_subscription(&b[..7]), None, "truncated topic name");
        assert_eq!(decode_subscription(&[0, 0, 0x7f, 0xff, 0xff, 0xff]), None, "count beyond the bytes");
    }

    #[test]
    fn assignment_bytes_match_kafka_v0_and_roundtrip() {
        let b = encode_assignment("t", &[2, 5]);
        assert_eq!(&b[..], &[0, 0, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff]);
        let d = decode_assignment(&b).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d["t"], vec![2, 5]);
        assert!(decode_assignment(&encode_assignment("t", &[])).unwrap().is_empty());
        assert!(decode_assignment(&[]).unwrap().is_empty(), "empty bytes: nothing assigned");
        assert_eq!(decode_assignment(&b[..15]), None, "truncated partition list");
    }
}
