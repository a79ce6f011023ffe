//! One consumer group's state machine: the classic rebalance protocol
//! (JoinGroup / SyncGroup / Heartbeat / LeaveGroup), as Kafka's
//! `GroupCoordinator` runs it.
//!
//! Pure and synchronous: every call takes `now` and returns at once. A
//! JoinGroup or SyncGroup that must wait for the rest of the group gets a
//! oneshot receiver; the group completes it when the rebalance step is done.
//! Lives on the group's coordinator shard only (owned by its `Coordinator`).
//!
//! ```text
//!   Empty ──join──▶ PreparingRebalance ──all joined / rebalance timeout──▶ CompletingRebalance
//!     ▲                 ▲        │                                           │ leader's SyncGroup
//!     │ last member     │        └──no member left──▶ Empty                  ▼
//!     └─── leaves ──────┴──────── join (new member / changed metadata), leave, session expiry ── Stable
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use tidelog_protocol::ErrorCode;

/// Kafka's group states, with their names as DescribeGroups/ListGroups spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

/// Limits that apply to every group of a coordinator.
#[derive(Clone, Copy, Debug)]
pub struct GroupLimits {
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    pub initial_rebalance_delay_ms: u64,
    pub max_size: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            min_session_timeout_ms: 6000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 0,
            max_size: 1000,
        }
    }
}

/// What a JoinGroup gets back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinOutcome {
    pub error: ErrorCode,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// The members and their metadata for the chosen protocol: the leader's only.
    pub members: Vec<(String, Option<String>, Bytes)>,
    pub skip_assignment: bool,
}

impl JoinOutcome {
    pub fn error(error: ErrorCode, member_id: &str) -> JoinOutcome {
        JoinOutcome {
            error,
            generation: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: member_id.to_string(),
            members: Vec::new(),
            skip_assignment: false,
        }
    }
}

/// What a SyncGroup gets back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOutcome {
    pub error: ErrorCode,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncOutcome {
    pub fn error(error: ErrorCode) -> SyncOutcome {
        SyncOutcome { error, protocol_type: None, protocol_name: None, assignment: Bytes::new() }
    }
}

/// An answer now, or one to wait for.
pub enum Reply<T> {
    Now(T),
    Wait(oneshot::Receiver<T>),
}

/// A JoinGroup as the state machine needs it.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// KIP-394: v4+ clients must join again with the member id we give them.
    pub require_known_member_id: bool,
    /// JoinGroup v9+ (KIP-814): a static leader that rejoins a stable group
    /// can be told it leads but must not run the assignor.
    pub supports_skip_assignment: bool,
}

pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    heartbeat_deadline: Instant,
    join_waiter: Option<oneshot::Sender<JoinOutcome>>,
    sync_waiter: Option<oneshot::Sender<SyncOutcome>>,
}

impl Member {
    /// Metadata for `protocol`, empty when the member does not support it.
    pub fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols.iter().find(|(n, _)| n == protocol).map(|(_, m)| m.clone()).unwrap_or_default()
    }

    fn touch(&mut self, now: Instant) {
        self.heartbeat_deadline = now + Duration::from_millis(self.session_timeout_ms.max(0) as u64);
    }

    fn same_protocols(&self, protocols: &[(String, Bytes)]) -> bool {
        self.protocols == protocols
    }
}

/// A member as persisted in a group metadata record and restored at load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub subscription: Bytes,
    pub assignment: Bytes,
}

/// The persisted form of a group (Kafka's GroupMetadataValue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub state_timestamp_ms: i64,
    pub members: Vec<MemberSnapshot>,
}

pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    /// Members by id; `order` keeps join order (the first one leads).
    pub members: HashMap<String, Member>,
    order: Vec<String>,
    /// Static membership: group.instance.id -> current member id.
    static_members: HashMap<String, String>,
    /// KIP-394: ids handed out with MEMBER_ID_REQUIRED, until they join.
    pending: HashMap<String, Instant>,
    rebalance_deadline: Option<Instant>,
    initial_delay_until: Option<Instant>,
    /// When the group last became Empty (offset retention counts from it).
    pub empty_since: Option<Instant>,
    next_member: u64,
}

impl Group {
    pub fn new(id: &str, now: Instant) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: HashMap::new(),
            order: Vec::new(),
            static_members: HashMap::new(),
            pending: HashMap::new(),
            rebalance_deadline: None,
            initial_delay_until: None,
            empty_since: Some(now),
            next_member: 0,
        }
    }

    /// Members in join order.
    pub fn members_in_order(&self) -> impl Iterator<Item = &Member> {
        self.order.iter().filter_map(|id| self.members.get(id))
    }

    fn new_member_id(&mut self, client_id: &str, instance_id: Option<&str>) -> String {
        self.next_member += 1;
        let prefix = instance_id.unwrap_or(client_id);
        // Kafka's form: <client.id or instance id>-<uuid>.
        format!("{prefix}-{}", uuid::Uuid::new_v4())
    }

    fn set_state(&mut self, state: GroupState, now: Instant) {
        self.state = state;
        self.empty_since = if state == GroupState::Empty { Some(now) } else { None };
    }

    /// The protocols every member supports.
    fn candidate_protocols(&self) -> Vec<String> {
        let mut members = self.members_in_order();
        let Some(first) = members.next() else { return Vec::new() };
        let mut out: Vec<String> = first.protocols.iter().map(|(n, _)| n.clone()).collect();
        for m in members {
            out.retain(|p| m.protocols.iter().any(|(n, _)| n == p));
        }
        out
    }

    /// Whether a member with these protocols can be in this group.
    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        let candidates = self.candidate_protocols();
        protocols.iter().any(|(n, _)| candidates.contains(n))
    }

    /// Kafka's vote: each member votes for its most preferred candidate; most votes wins
    /// (ties go to the candidate first in the first member's list).
    fn select_protocol(&self) -> Option<String> {
        let candidates = self.candidate_protocols();
        let mut votes: BTreeMap<usize, usize> = BTreeMap::new();
        for m in self.members_in_order() {
            if let Some(i) = m.protocols.iter().find_map(|(n, _)| candidates.iter().position(|c| c == n)) {
                *votes.entry(i).or_default() += 1;
            }
        }
        let best = votes.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))?;
        candidates.get(*best.0).cloned()
    }

    fn add_member(&mut self, req: &JoinRequest, id: String, now: Instant) -> oneshot::Receiver<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        if self.members.is_empty() {
            self.protocol_type = Some(req.protocol_type.clone());
        }
        if let Some(instance) = &req.instance_id {
            self.static_members.insert(instance.clone(), id.clone());
        }
        let mut m = Member {
            id: id.clone(),
            instance_id: req.instance_id.clone(),
            client_id: req.client_id.clone(),
            client_host: req.client_host.clone(),
            session_timeout_ms: req.session_timeout_ms,
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            protocols: req.protocols.clone(),
            assignment: Bytes::new(),
            heartbeat_deadline: now,
            join_waiter: Some(tx),
            sync_waiter: None,
        };
        m.touch(now);
        self.members.insert(id.clone(), m);
        self.order.push(id);
        rx
    }

    fn remove_member(&mut self, id: &str) -> Option<Member> {
        let m = self.members.remove(id)?;
        self.order.retain(|o| o != id);
        if let Some(instance) = &m.instance_id {
            if self.static_members.get(instance).map(String::as_str) == Some(id) {
                self.static_members.remove(instance);
            }
        }
        if self.leader.as_deref() == Some(id) {
            self.leader = self.order.first().cloned();
        }
        Some(m)
    }

    fn max_rebalance_timeout(&self) -> Duration {
        let ms = self.members.values().map(|m| m.rebalance_timeout_ms.max(0) as u64).max().unwrap_or(0);
        Duration::from_millis(ms)
    }

    /// Starts (or continues) a rebalance: every member must join again.
    fn prepare_rebalance(&mut self, now: Instant, limits: &GroupLimits) {
        if self.state == GroupState::CompletingRebalance {
            for m in self.members.values_mut() {
                m.assignment = Bytes::new();
                if let Some(w) = m.sync_waiter.take() {
                    let _ = w.send(SyncOutcome::error(ErrorCode::RebalanceInProgress));
                }
            }
        }
        if self.state == GroupState::Empty && limits.initial_rebalance_delay_ms > 0 {
            let delay = Duration::from_millis(limits.initial_rebalance_delay_ms).min(self.max_rebalance_timeout());
            self.initial_delay_until = Some(now + delay);
        }
        if self.state != GroupState::PreparingRebalance {
            self.rebalance_deadline = Some(now + self.max_rebalance_timeout());
            self.set_state(GroupState::PreparingRebalance, now);
        }
    }

    /// Kafka's `hasAllMembersJoined`: every member waits in a JoinGroup and
    /// no member id handed out with MEMBER_ID_REQUIRED is still to come back
    /// (it would otherwise start the next rebalance right after this one).
    fn all_joined(&self) -> bool {
        self.pending.is_empty() && self.members.values().all(|m| m.join_waiter.is_some())
    }

    /// Completes the join phase if every member is in (or `force`, at the
    /// rebalance timeout: members that did not join again are removed).
    fn maybe_complete_join(&mut self, now: Instant, force: bool) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        if !force {
            if !self.all_joined() {
                return;
            }
            if self.initial_delay_until.is_some_and(|t| now < t) {
                return;
            }
        }
        // As Kafka's `onCompleteJoin`: dynamic members that did not join
        // again are removed; static ones stay in the group (with their last
        // metadata, for the leader to assign to) until their session
        // expires, so a static member that restarts slowly keeps its place.
        let laggards: Vec<String> = self
            .members
            .values()
            .filter(|m| m.join_waiter.is_none() && m.instance_id.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in laggards {
            log::info!("group {}: member {id} did not join the rebalance in time; removed", self.id);
            self.remove_member(&id);
        }
        // Kafka's `maybeElectNewJoinedLeader`: the leader must be a member
        // that joined; when none did (only static members that are away),
        // wait another rebalance timeout for their sessions to expire.
        if !self.members.is_empty() {
            let leader_joined =
                self.leader.as_ref().and_then(|l| self.members.get(l)).is_some_and(|m| m.join_waiter.is_some());
            if !leader_joined {
                let joined = self.members_in_order().find(|m| m.join_waiter.is_some()).map(|m| m.id.clone());
                match joined {
                    Some(id) => self.leader = Some(id),
                    None => {
                        log::info!("group {}: no member joined the rebalance; waiting for their sessions", self.id);
                        self.rebalance_deadline = Some(now + self.max_rebalance_timeout());
                        return;
                    }
                }
            }
        }
        self.initial_delay_until = None;
        self.rebalance_deadline = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.protocol = None;
            self.protocol_type = None;
            self.leader = None;
            self.set_state(GroupState::Empty, now);
            log::info!("group {}: generation {} with no members (Empty)", self.id, self.generation);
            return;
        }
        self.protocol = self.select_protocol();
        self.set_state(GroupState::CompletingRebalance, now);
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let member_list: Vec<(String, Option<String>, Bytes)> =
            self.members_in_order().map(|m| (m.id.clone(), m.instance_id.clone(), m.metadata(&protocol))).collect();
        log::info!(
            "group {}: generation {} with {} member(s), protocol {protocol}, leader {leader}",
            self.id,
            self.generation,
            member_list.len()
        );
        let (generation, protocol_type) = (self.generation, self.protocol_type.clone());
        for m in self.members.values_mut() {
            m.touch(now);
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(JoinOutcome {
                    error: ErrorCode::None,
                    generation,
                    protocol_type: protocol_type.clone(),
                    protocol_name: Some(protocol.clone()),
                    leader: leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == leader { member_list.clone() } else { Vec::new() },
                    skip_assignment: false,
                });
            }
        }
    }

    /// The current generation's answer for a member that needs no rebalance.
    fn current_join(&self, member_id: &str, skip_assignment: bool) -> JoinOutcome {
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let members = if member_id == leader {
            self.members_in_order().map(|m| (m.id.clone(), m.instance_id.clone(), m.metadata(&protocol))).collect()
        } else {
            Vec::new()
        };
        JoinOutcome {
            error: ErrorCode::None,
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol.clone(),
            leader,
            member_id: member_id.to_string(),
            members,
            skip_assignment,
        }
    }

    pub fn join(&mut self, req: JoinRequest, now: Instant, limits: &GroupLimits) -> Reply<JoinOutcome> {
        let fail = |code| Reply::Now(JoinOutcome::error(code, &req.member_id));
        if self.state == GroupState::Dead {
            return fail(ErrorCode::CoordinatorNotAvailable);
        }
        if req.session_timeout_ms < limits.min_session_timeout_ms
            || req.session_timeout_ms > limits.max_session_timeout_ms
        {
            return fail(ErrorCode::InvalidSessionTimeout);
        }
        if !self.supports(&req.protocol_type, &req.protocols) {
            return fail(ErrorCode::InconsistentGroupProtocol);
        }
        let known = !req.member_id.is_empty() && self.members.contains_key(&req.member_id);
        let is_new = !known;
        if is_new
            && self.members.len() + self.pending.len() >= limits.max_size
            && !self.pending.contains_key(&req.member_id)
        {
            return fail(ErrorCode::GroupMaxSizeReached);
        }
        if req.member_id.is_empty() {
            if let Some(instance) = req.instance_id.clone() {
                if let Some(old) = self.static_members.get(&instance).cloned() {
                    return self.rejoin_static(req, &old, now, limits);
                }
                let id = self.new_member_id(&req.client_id, Some(&instance));
                return self.join_new(req, id, now, limits);
            }
            let id = self.new_member_id(&req.client_id, None);
            if req.require_known_member_id {
                let deadline = now + Duration::from_millis(req.session_timeout_ms.max(0) as u64);
                self.pending.insert(id.clone(), deadline);
                return Reply::Now(JoinOutcome::error(ErrorCode::MemberIdRequired, &id));
            }
            return self.join_new(req, id, now, limits);
        }
        if let Some(instance) = &req.instance_id {
            if self.static_members.get(instance).is_some_and(|cur| *cur != req.member_id) {
                return fail(ErrorCode::FencedInstanceId);
            }
        }
        if self.pending.remove(&req.member_id).is_some() {
            let id = req.member_id.clone();
            return self.join_new(req, id, now, limits);
        }
        if !known {
            return fail(ErrorCode::UnknownMemberId);
        }
        self.join_existing(req, now, limits)
    }

    fn join_new(&mut self, req: JoinRequest, id: String, now: Instant, limits: &GroupLimits) -> Reply<JoinOutcome> {
        let rx = self.add_member(&req, id, now);
        self.prepare_rebalance(now, limits);
        self.maybe_complete_join(now, false);
        Reply::Wait(rx)
    }

    fn join_existing(&mut self, req: JoinRequest, now: Instant, limits: &GroupLimits) -> Reply<JoinOutcome> {
        let id = req.member_id.clone();
        let is_leader = self.leader.as_deref() == Some(id.as_str());
        let Some(m) = self.members.get_mut(&id) else {
            return Reply::Now(JoinOutcome::error(ErrorCode::UnknownMemberId, &id));
        };
        let same = m.same_protocols(&req.protocols);
        match self.state {
            GroupState::CompletingRebalance | GroupState::Stable
                if same && !(self.state == GroupState::Stable && is_leader) =>
            {
                m.touch(now);
                return Reply::Now(self.current_join(&id, false));
            }
            _ => {}
        }
        m.protocols = req.protocols;
        m.session_timeout_ms = req.session_timeout_ms;
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.client_id = req.client_id;
        m.client_host = req.client_host;
        self.await_rebalance(&id, now, limits)
    }

    /// Member `id` waits in a JoinGroup for the (started or continued) rebalance.
    fn await_rebalance(&mut self, id: &str, now: Instant, limits: &GroupLimits) -> Reply<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        let Some(m) = self.members.get_mut(id) else {
            return Reply::Now(JoinOutcome::error(ErrorCode::UnknownMemberId, id));
        };
        if let Some(old) = m.join_waiter.replace(tx) {
            let _ = old.send(JoinOutcome::error(ErrorCode::RebalanceInProgress, id));
        }
        m.touch(now);
        self.prepare_rebalance(now, limits);
        self.maybe_complete_join(now, false);
        Reply::Wait(rx)
    }

    /// KIP-345: a static member comes back with a new process. It takes a new
    /// member id (fencing the old one) and keeps its assignment; a stable
    /// group does not rebalance unless its protocols changed.
    fn rejoin_static(&mut self, req: JoinRequest, old: &str, now: Instant, limits: &GroupLimits) -> Reply<JoinOutcome> {
        let Some(mut m) = self.members.remove(old) else {
            self.static_members.remove(req.instance_id.as_deref().unwrap_or_default());
            let id = self.new_member_id(&req.client_id, req.instance_id.as_deref());
            return self.join_new(req, id, now, limits);
        };
        let new_id = self.new_member_id(&req.client_id, req.instance_id.as_deref());
        let leader_before = self.leader.clone().unwrap_or_default();
        log::info!("group {}: static member {:?} rejoined: {old} -> {new_id}", self.id, req.instance_id);
        if let Some(w) = m.join_waiter.take() {
            let _ = w.send(JoinOutcome::error(ErrorCode::FencedInstanceId, old));
        }
        if let Some(w) = m.sync_waiter.take() {
            let _ = w.send(SyncOutcome::error(ErrorCode::FencedInstanceId));
        }
        m.id = new_id.clone();
        m.client_id = req.client_id.clone();
        m.client_host = req.client_host.clone();
        m.session_timeout_ms = req.session_timeout_ms;
        m.rebalance_timeout_ms = req.rebalance_timeout_ms;
        m.protocols = req.protocols.clone();
        m.touch(now);
        self.members.insert(new_id.clone(), m);
        for o in self.order.iter_mut() {
            if o == old {
                *o = new_id.clone();
            }
        }
        if self.leader.as_deref() == Some(old) {
            self.leader = Some(new_id.clone());
        }
        if let Some(instance) = &req.instance_id {
            self.static_members.insert(instance.clone(), new_id.clone());
        }
        // Kafka's `updateStaticMemberAndRebalance`.
        match self.state {
            // Stable: no rebalance unless the group's protocol would change
            // (new subscription metadata alone does not start one: the
            // member keeps its assignment).
            GroupState::Stable if self.select_protocol() == self.protocol => {
                let is_leader = self.leader.as_deref() == Some(new_id.as_str());
                if req.supports_skip_assignment {
                    // v9+: the leader learns it leads but skips the assignor.
                    Reply::Now(self.current_join(&new_id, is_leader))
                } else {
                    // Before v9: the leader id as it was before this join, so
                    // a rejoining leader does not assign (a stable group
                    // would ignore its SyncGroup assignments anyway).
                    let mut out = self.current_join(&new_id, false);
                    out.leader = leader_before;
                    out.members = Vec::new();
                    Reply::Now(out)
                }
            }
            // CompletingRebalance: the leader may be assigning to the old
            // member id, so a new rebalance starts. PreparingRebalance: the
            // member joins the one under way.
            _ => self.await_rebalance(&new_id, now, limits),
        }
    }

    /// Checks member id, instance id and generation, as Kafka does for
    /// SyncGroup, Heartbeat and OffsetCommit.
    pub fn check_member(&self, member_id: &str, instance_id: Option<&str>, generation: i32) -> Result<(), ErrorCode> {
        if self.state == GroupState::Dead {
            return Err(ErrorCode::CoordinatorNotAvailable);
        }
        // Kafka's `validateCurrentMember`: an instance id must map to this member id.
        if let Some(instance) = instance_id {
            match self.static_members.get(instance) {
                Some(cur) if cur != member_id => return Err(ErrorCode::FencedInstanceId),
                Some(_) => {}
                None => return Err(ErrorCode::UnknownMemberId),
            }
        }
        if !self.members.contains_key(member_id) {
            return Err(ErrorCode::UnknownMemberId);
        }
        if generation != self.generation {
            return Err(ErrorCode::IllegalGeneration);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> Reply<SyncOutcome> {
        if let Err(e) = self.check_member(member_id, instance_id, generation) {
            return Reply::Now(SyncOutcome::error(e));
        }
        if protocol_type.is_some_and(|t| Some(t) != self.protocol_type.as_deref())
            || protocol_name.is_some_and(|n| Some(n) != self.protocol.as_deref())
        {
            return Reply::Now(SyncOutcome::error(ErrorCode::InconsistentGroupProtocol));
        }
        let ok = |g: &Group, assignment: Bytes| SyncOutcome {
            error: ErrorCode::None,
            protocol_type: g.protocol_type.clone(),
            protocol_name: g.protocol.clone(),
            assignment,
        };
        match self.state {
            GroupState::Empty | GroupState::Dead => Reply::Now(SyncOutcome::error(ErrorCode::UnknownMemberId)),
            GroupState::PreparingRebalance => Reply::Now(SyncOutcome::error(ErrorCode::RebalanceInProgress)),
            GroupState::Stable => {
                let assignment = self.members.get(member_id).map(|m| m.assignment.clone()).unwrap_or_default();
                if let Some(m) = self.members.get_mut(member_id) {
                    m.touch(now);
                }
                Reply::Now(ok(self, assignment))
            }
            GroupState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                if let Some(m) = self.members.get_mut(member_id) {
                    m.touch(now);
                    if let Some(old) = m.sync_waiter.replace(tx) {
                        let _ = old.send(SyncOutcome::error(ErrorCode::RebalanceInProgress));
                    }
                }
                if self.leader.as_deref() == Some(member_id) {
                    let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                    for m in self.members.values_mut() {
                        m.assignment = given.remove(&m.id).unwrap_or_default();
                    }
                    self.set_state(GroupState::Stable, now);
                    log::info!("group {}: generation {} is stable", self.id, self.generation);
                    let (pt, pn) = (self.protocol_type.clone(), self.protocol.clone());
                    for m in self.members.values_mut() {
                        if let Some(w) = m.sync_waiter.take() {
                            let _ = w.send(SyncOutcome {
                                error: ErrorCode::None,
                                protocol_type: pt.clone(),
                                protocol_name: pn.clone(),
                                assignment: m.assignment.clone(),
                            });
                        }
                    }
                }
                Reply::Wait(rx)
            }
        }
    }

    pub fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: Instant,
    ) -> ErrorCode {
        if self.state == GroupState::Empty {
            return ErrorCode::UnknownMemberId;
        }
        if let Err(e) = self.check_member(member_id, instance_id, generation) {
            return e;
        }
        if let Some(m) = self.members.get_mut(member_id) {
            m.touch(now);
        }
        match self.state {
            GroupState::PreparingRebalance => ErrorCode::RebalanceInProgress,
            _ => ErrorCode::None,
        }
    }

    /// Refreshes a member's session (a valid offset commit counts as a heartbeat).
    pub fn touch(&mut self, member_id: &str, now: Instant) {
        if let Some(m) = self.members.get_mut(member_id) {
            m.touch(now);
        }
    }

    /// LeaveGroup for one member identity (v3+ batches call this per member).
    pub fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
        limits: &GroupLimits,
    ) -> ErrorCode {
        if self.state == GroupState::Dead {
            return ErrorCode::CoordinatorNotAvailable;
        }
        if self.pending.remove(member_id).is_some() {
            return ErrorCode::None;
        }
        let id = match instance_id {
            Some(instance) => match self.static_members.get(instance) {
                Some(cur) if member_id.is_empty() || cur == member_id => cur.clone(),
                Some(_) => return ErrorCode::FencedInstanceId,
                None => return ErrorCode::UnknownMemberId,
            },
            None => member_id.to_string(),
        };
        let Some(m) = self.remove_member(&id) else { return ErrorCode::UnknownMemberId };
        log::info!("group {}: member {id} left", self.id);
        if let Some(w) = m.join_waiter {
            let _ = w.send(JoinOutcome::error(ErrorCode::UnknownMemberId, &id));
        }
        if let Some(w) = m.sync_waiter {
            let _ = w.send(SyncOutcome::error(ErrorCode::UnknownMemberId));
        }
        self.member_gone(now, limits);
        ErrorCode::None
    }

    fn member_gone(&mut self, now: Instant, limits: &GroupLimits) {
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => self.prepare_rebalance(now, limits),
            _ => {}
        }
        self.maybe_complete_join(now, false);
    }

    /// Expires sessions, pending member ids and rebalance timeouts.
    pub fn tick(&mut self, now: Instant, limits: &GroupLimits) {
        self.pending.retain(|_, deadline| *deadline > now);
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.join_waiter.is_none() && m.sync_waiter.is_none() && m.heartbeat_deadline <= now)
            .map(|m| m.id.clone())
            .collect();
        // As Kafka: a member that neither heartbeats nor waits in a join or
        // sync is gone, also in the middle of a rebalance.
        for id in expired {
            log::info!("group {}: member {id} session expired", self.id);
            self.remove_member(&id);
            self.member_gone(now, limits);
        }
        if self.state == GroupState::PreparingRebalance {
            if self.rebalance_deadline.is_some_and(|d| d <= now) {
                self.maybe_complete_join(now, true);
            } else {
                self.maybe_complete_join(now, false);
            }
        }
    }

    /// Topics the members subscribed to (consumer protocol), `None` when some
    /// member's metadata cannot be read.
    pub fn subscribed_topics(&self) -> Option<Vec<String>> {
        if self.protocol_type.as_deref() != Some("consumer") {
            return Some(Vec::new());
        }
        let protocol = self.protocol.clone()?;
        let mut out = Vec::new();
        for m in self.members.values() {
            out.extend(super::records::subscription_topics(&m.metadata(&protocol))?);
        }
        Some(out)
    }

    pub fn snapshot(&self, now_ms: i64) -> GroupSnapshot {
        let protocol = self.protocol.clone().unwrap_or_default();
        GroupSnapshot {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            generation: self.generation,
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            state_timestamp_ms: now_ms,
            members: self
                .members_in_order()
                .map(|m| MemberSnapshot {
                    id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: m.session_timeout_ms,
                    subscription: m.metadata(&protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        }
    }

    /// Rebuilds a group from its last metadata record: Stable with the
    /// persisted members, whose sessions start now (or Empty without members).
    pub fn restore(id: &str, s: GroupSnapshot, now: Instant) -> Group {
        let mut g = Group::new(id, now);
        g.generation = s.generation;
        if s.members.is_empty() {
            return g;
        }
        g.protocol_type = Some(s.protocol_type);
        g.protocol = s.protocol.clone();
        g.leader = s.leader;
        let protocol = s.protocol.unwrap_or_default();
        for ms in s.members {
            let mut m = Member {
                id: ms.id.clone(),
                instance_id: ms.instance_id.clone(),
                client_id: ms.client_id,
                client_host: ms.client_host,
                session_timeout_ms: ms.session_timeout_ms,
                rebalance_timeout_ms: ms.rebalance_timeout_ms,
                protocols: vec![(protocol.clone(), ms.subscription)],
                assignment: ms.assignment,
                heartbeat_deadline: now,
                join_waiter: None,
                sync_waiter: None,
            };
            m.touch(now);
            if let Some(instance) = ms.instance_id {
                g.static_members.insert(instance, ms.id.clone());
            }
            g.order.push(ms.id.clone());
            g.members.insert(ms.id, m);
        }
        g.set_state(GroupState::Stable, now);
        g
    }

    /// Marks the group deleted: every waiter is told, nothing more is accepted.
    pub fn kill(&mut self, now: Instant) {
        for m in self.members.values_mut() {
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(JoinOutcome::error(ErrorCode::CoordinatorNotAvailable, &m.id));
            }
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(SyncOutcome::error(ErrorCode::CoordinatorNotAvailable));
            }
        }
        self.set_state(GroupState::Dead, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(member: &str, protocols: &[(&str, &str)]) -> JoinRequest {
        JoinRequest {
            member_id: member.into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            protocol_type: "consumer".into(),
            protocols: protocols.iter().map(|(n, m)| (n.to_string(), Bytes::from(m.to_string()))).collect(),
            require_known_member_id: true,
            supports_skip_assignment: false,
        }
    }

    fn now_join(r: Reply<JoinOutcome>) -> JoinOutcome {
        match r {
            Reply::Now(o) => o,
            Reply::Wait(_) => panic!("expected an immediate answer"),
        }
    }

    fn waited<T>(mut rx: oneshot::Receiver<T>) -> T {
        rx.try_recv().expect("not cancelled").expect("answered")
    }

    fn wait_rx<T>(r: Reply<T>) -> oneshot::Receiver<T> {
        match r {
            Reply::Wait(rx) => rx,
            Reply::Now(_) => panic!("expected to wait"),
        }
    }

    /// KIP-394 first join, then the real join.
    fn join_two_step(g: &mut Group, r: JoinRequest, now: Instant, l: &GroupLimits) -> (String, Reply<JoinOutcome>) {
        let first = now_join(g.join(r.clone(), now, l));
        assert_eq!(first.error, ErrorCode::MemberIdRequired);
        let id = first.member_id.clone();
        assert!(!id.is_empty());
        (id.clone(), g.join(JoinRequest { member_id: id, ..r }, now, l))
    }

    #[test]
    fn two_members_rebalance_sync_and_heartbeat() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, ra) = join_two_step(&mut g, req("", &[("range", "A"), ("roundrobin", "a")]), t, &l);
        // One member: the join completes at once.
        let ja = waited(wait_rx(ra));
        assert_eq!((ja.error, ja.generation, ja.leader.as_str()), (ErrorCode::None, 1, a.as_str()));
        assert_eq!(ja.members.len(), 1);
        let sa = g.sync(&a, None, 1, None, None, vec![(a.clone(), Bytes::from_static(b"all"))], t);
        assert_eq!(waited(wait_rx(sa)).assignment, Bytes::from_static(b"all"));
        assert_eq!(g.state, GroupState::Stable);
        // A second member joins: rebalance; the first learns by heartbeat.
        let (b, rb) = join_two_step(&mut g, req("", &[("roundrobin", "B"), ("range", "b")]), t, &l);
        let rb = wait_rx(rb);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.heartbeat(&a, None, 1, t), ErrorCode::RebalanceInProgress);
        let ra = wait_rx(g.join(req(&a, &[("range", "A"), ("roundrobin", "a")]), t, &l));
        let (ja, jb) = (waited(ra), waited(rb));
        assert_eq!((ja.generation, jb.generation), (2, 2));
        // Votes tie (range vs roundrobin): the first member's preference wins.
        assert_eq!(ja.protocol_name.as_deref(), Some("range"));
        assert_eq!(ja.leader, a);
        assert_eq!(ja.members.iter().map(|m| m.0.clone()).collect::<Vec<_>>(), vec![a.clone(), b.clone()]);
        assert_eq!(ja.members[1].2, Bytes::from_static(b"b"));
        assert!(jb.members.is_empty());
        // Follower syncs first and waits for the leader.
        let sb = wait_rx(g.sync(&b, None, 2, Some("consumer"), Some("range"), vec![], t));
        assert_eq!(g.heartbeat(&b, None, 1, t), ErrorCode::IllegalGeneration);
        let sa = wait_rx(g.sync(
            &a,
            None,
            2,
            None,
            None,
            vec![(a.clone(), Bytes::from_static(b"p0")), (b.clone(), Bytes::from_static(b"p1"))],
            t,
        ));
        assert_eq!(waited(sa).assignment, Bytes::from_static(b"p0"));
        assert_eq!(waited(sb).assignment, Bytes::from_static(b"p1"));
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(g.heartbeat(&b, None, 2, t), ErrorCode::None);
        assert_eq!(g.heartbeat("nobody", None, 2, t), ErrorCode::UnknownMemberId);
    }

    #[test]
    fn leave_session_expiry_and_rebalance_timeout() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, ra) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        waited(wait_rx(ra));
        let _ = g.sync(&a, None, 1, None, None, vec![], t);
        let (b, rb) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        let rb = wait_rx(rb);
        // a never rejoins: after the rebalance timeout it is removed.
        g.tick(t + Duration::from_secs(31), &l);
        let jb = waited(rb);
        assert_eq!((jb.generation, jb.leader.as_str()), (2, b.as_str()));
        assert!(!g.members.contains_key(&a));
        let _ = g.sync(&b, None, 2, None, None, vec![], t);
        assert_eq!(g.state, GroupState::Stable);
        // b stops heartbeating: session expiry empties the group.
        g.tick(t + Duration::from_secs(31 + 11), &l);
        assert_eq!(g.state, GroupState::Empty);
        assert_eq!(g.generation, 3);
        assert!(g.members.is_empty());
        // Leave of an unknown member.
        assert_eq!(g.leave("x", None, t, &l), ErrorCode::UnknownMemberId);
    }

    #[test]
    fn leave_triggers_rebalance_for_the_rest() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, ra) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        let (b, rb) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        let _ = g.join(req(&a, &[("range", "")]), t, &l);
        drop((ra, rb));
        assert_eq!(g.leave(&b, None, t, &l), ErrorCode::None);
        assert_eq!(g.members.len(), 1);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.leave(&a, None, t, &l), ErrorCode::None);
        assert_eq!(g.state, GroupState::Empty);
    }

    #[test]
    fn validation_errors() {
        let l = GroupLimits { max_size: 1, ..GroupLimits::default() };
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let mut bad = req("", &[("range", "")]);
        bad.session_timeout_ms = 10;
        assert_eq!(now_join(g.join(bad, t, &l)).error, ErrorCode::InvalidSessionTimeout);
        assert_eq!(now_join(g.join(req("", &[]), t, &l)).error, ErrorCode::InconsistentGroupProtocol);
        assert_eq!(now_join(g.join(req("ghost", &[("range", "")]), t, &l)).error, ErrorCode::UnknownMemberId);
        let (a, ra) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        waited(wait_rx(ra));
        assert_eq!(now_join(g.join(req("", &[("other", "")]), t, &l)).error, ErrorCode::InconsistentGroupProtocol);
        let mut other_type = req("", &[("range", "")]);
        other_type.protocol_type = "connect".into();
        assert_eq!(now_join(g.join(other_type, t, &l)).error, ErrorCode::InconsistentGroupProtocol);
        assert_eq!(now_join(g.join(req("", &[("range", "")]), t, &l)).error, ErrorCode::GroupMaxSizeReached);
        assert!(matches!(g.check_member(&a, None, 7), Err(ErrorCode::IllegalGeneration)));
        assert!(matches!(g.check_member("zz", None, 1), Err(ErrorCode::UnknownMemberId)));
    }

    #[test]
    fn static_member_rejoins_without_rebalance_and_fences_the_old_id() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let mut r = req("", &[("range", "m")]);
        r.instance_id = Some("i-1".into());
        let j = waited(wait_rx(g.join(r.clone(), t, &l)));
        let old = j.member_id.clone();
        let _ = g.sync(&old, Some("i-1"), 1, None, None, vec![(old.clone(), Bytes::from_static(b"p0,p1"))], t);
        assert_eq!(g.state, GroupState::Stable);
        // Same instance id, new process: same generation, new member id, same assignment.
        let j2 = now_join(g.join(r.clone(), t, &l));
        assert_eq!((j2.error, j2.generation), (ErrorCode::None, 1));
        assert_ne!(j2.member_id, old);
        assert_eq!(g.state, GroupState::Stable);
        let s = match g.sync(&j2.member_id, Some("i-1"), 1, None, None, vec![], t) {
            Reply::Now(s) => s,
            Reply::Wait(_) => panic!("stable group answers at once"),
        };
        assert_eq!(s.assignment, Bytes::from_static(b"p0,p1"));
        assert_eq!(g.heartbeat(&old, Some("i-1"), 1, t), ErrorCode::FencedInstanceId);
        let mut stale = req(&old, &[("range", "m")]);
        stale.instance_id = Some("i-1".into());
        assert_eq!(now_join(g.join(stale, t, &l)).error, ErrorCode::FencedInstanceId);
        assert_eq!(g.leave("", Some("i-1"), t, &l), ErrorCode::None);
        assert_eq!(g.state, GroupState::Empty);
    }

    #[test]
    fn snapshot_restores_members_and_generation() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, ra) = join_two_step(&mut g, req("", &[("range", "sub")]), t, &l);
        waited(wait_rx(ra));
        let _ = g.sync(&a, None, 1, None, None, vec![(a.clone(), Bytes::from_static(b"asg"))], t);
        let snap = g.snapshot(5);
        let back = Group::restore("g", snap.clone(), t);
        assert_eq!(back.state, GroupState::Stable);
        assert_eq!(back.generation, 1);
        assert_eq!(back.members[&a].assignment, Bytes::from_static(b"asg"));
        assert_eq!(back.snapshot(5), snap);
    }

    fn static_req(instance: &str, member: &str, meta: &str) -> JoinRequest {
        let mut r = req(member, &[("range", meta)]);
        r.instance_id = Some(instance.into());
        r
    }

    fn now_sync(r: Reply<SyncOutcome>) -> SyncOutcome {
        match r {
            Reply::Now(s) => s,
            Reply::Wait(_) => panic!("expected an immediate answer"),
        }
    }

    /// Two static members, stable at generation 1 with `a` leading and
    /// assignments "pa" / "pb". Returns (a, b).
    fn stable_static_pair(g: &mut Group, t: Instant, l: &GroupLimits) -> (String, String) {
        let ra = wait_rx(g.join(static_req("i-a", "", "m"), t, l));
        let a = waited(ra).member_id;
        let _ = g.sync(&a, Some("i-a"), 1, None, None, vec![], t);
        let rb = wait_rx(g.join(static_req("i-b", "", "m"), t, l));
        let ra = wait_rx(g.join(static_req("i-a", &a, "m"), t, l));
        let (ja, jb) = (waited(ra), waited(rb));
        assert_eq!((ja.generation, ja.leader.as_str()), (2, a.as_str()));
        let b = jb.member_id;
        let sb = wait_rx(g.sync(&b, Some("i-b"), 2, None, None, vec![], t));
        let assignments = vec![(a.clone(), Bytes::from_static(b"pa")), (b.clone(), Bytes::from_static(b"pb"))];
        assert_eq!(waited(wait_rx(g.sync(&a, Some("i-a"), 2, None, None, assignments, t))).assignment, "pa");
        assert_eq!(waited(sb).assignment, "pb");
        assert_eq!(g.state, GroupState::Stable);
        (a, b)
    }

    #[test]
    fn static_leader_rejoin_keeps_the_old_leader_id_and_changed_metadata_does_not_rebalance() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, b) = stable_static_pair(&mut g, t, &l);
        // The leader restarts with other subscription metadata (a cooperative
        // member's owned partitions are gone after a restart): as Kafka, the
        // group stays Stable at generation 2, and before JoinGroup v9 the answer
        // names the old leader id so that the new process does not assign.
        let j = now_join(g.join(static_req("i-a", "", "other"), t, &l));
        assert_eq!((j.error, j.generation), (ErrorCode::None, 2));
        assert_ne!(j.member_id, a);
        assert_eq!(j.leader, a);
        assert!(j.members.is_empty());
        assert!(!j.skip_assignment);
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(g.leader.as_deref(), Some(j.member_id.as_str()));
        let s = now_sync(g.sync(&j.member_id, Some("i-a"), 2, None, None, vec![], t));
        assert_eq!(s.assignment, "pa");
        // v9+: told it leads, with the members, but to skip the assignment.
        let mut r = static_req("i-a", "", "other");
        r.supports_skip_assignment = true;
        let j9 = now_join(g.join(r, t, &l));
        assert_eq!((j9.generation, j9.leader.as_str(), j9.skip_assignment), (2, j9.member_id.as_str(), true));
        assert_eq!(j9.members.len(), 2);
        // A follower's restart answers with the current leader.
        let jb = now_join(g.join(static_req("i-b", "", "m"), t, &l));
        assert_eq!((jb.generation, jb.leader.as_str()), (2, j9.member_id.as_str()));
        assert!(jb.members.is_empty());
        assert_ne!(jb.member_id, b);
        assert_eq!(g.state, GroupState::Stable);
    }

    #[test]
    fn static_rejoin_while_completing_rebalance_starts_a_new_one() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, b) = stable_static_pair(&mut g, t, &l);
        // b's metadata changes: generation 3 completes, nobody synced yet.
        let rb = wait_rx(g.join(static_req("i-b", &b, "m2"), t, &l));
        let ra = wait_rx(g.join(static_req("i-a", &a, "m"), t, &l));
        assert_eq!((waited(ra).generation, waited(rb).generation), (3, 3));
        assert_eq!(g.state, GroupState::CompletingRebalance);
        // b restarts now: the leader may hand its assignment to the old id,
        // so (as Kafka) a new rebalance starts and the new id waits in it.
        let rb2 = wait_rx(g.join(static_req("i-b", "", "m2"), t, &l));
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(now_sync(g.sync(&a, Some("i-a"), 3, None, None, vec![], t)).error, ErrorCode::RebalanceInProgress);
        let ra = wait_rx(g.join(static_req("i-a", &a, "m"), t, &l));
        let (ja, jb) = (waited(ra), waited(rb2));
        assert_eq!((ja.generation, jb.generation), (4, 4));
        assert_eq!(ja.members.len(), 2);
        assert!(ja.members.iter().any(|m| m.0 == jb.member_id));
    }

    #[test]
    fn a_pending_member_holds_the_rebalance_until_it_joins() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, ra) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        assert_eq!(waited(wait_rx(ra)).generation, 1);
        let _ = g.sync(&a, None, 1, None, None, vec![], t);
        let (c, rc) = join_two_step(&mut g, req("", &[("range", "")]), t, &l);
        let rc = wait_rx(rc);
        // b asks for its member id while the rebalance for c is under way.
        let first = now_join(g.join(req("", &[("range", "")]), t, &l));
        assert_eq!(first.error, ErrorCode::MemberIdRequired);
        let ra = wait_rx(g.join(req(&a, &[("range", "")]), t, &l));
        // Everyone known joined, but b is still to come: Kafka waits for it.
        assert_eq!(g.state, GroupState::PreparingRebalance);
        let rb = wait_rx(g.join(req(&first.member_id, &[("range", "")]), t, &l));
        let (ja, jb, jc) = (waited(ra), waited(rb), waited(rc));
        assert_eq!((ja.generation, jb.generation, jc.generation), (2, 2, 2));
        assert_eq!(ja.members.len(), 3);
        assert!(ja.members.iter().any(|m| m.0 == c));
        // A member id that never comes back holds it only until its session timeout.
        let _ = g.sync(&a, None, 2, None, None, vec![], t);
        assert_eq!(g.leave(&c, None, t, &l), ErrorCode::None);
        assert_eq!(now_join(g.join(req("", &[("range", "")]), t, &l)).error, ErrorCode::MemberIdRequired);
        let ra = wait_rx(g.join(req(&a, &[("range", "")]), t, &l));
        let rb = wait_rx(g.join(req(&first.member_id, &[("range", "")]), t, &l));
        g.tick(t + Duration::from_secs(5), &l);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        g.tick(t + Duration::from_secs(11), &l);
        assert_eq!((waited(ra).generation, waited(rb).generation), (3, 3));
    }

    #[test]
    fn rebalance_timeout_keeps_static_members_and_elects_a_joined_leader() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, b) = stable_static_pair(&mut g, t, &l);
        // A dynamic member joins; b rejoins; the leader a is away (its
        // session, 10 s, is kept alive by heartbeats; the rebalance
        // timeout is 30 s).
        let (d, rd) = join_two_step(&mut g, req("", &[("range", "m")]), t, &l);
        let rd = wait_rx(rd);
        let rb = wait_rx(g.join(static_req("i-b", &b, "m"), t, &l));
        for s in 1..=30 {
            assert_eq!(g.heartbeat(&a, Some("i-a"), 2, t + Duration::from_secs(s)), ErrorCode::RebalanceInProgress);
        }
        g.tick(t + Duration::from_secs(31), &l);
        let (jb, jd) = (waited(rb), waited(rd));
        assert_eq!((jb.generation, jd.generation), (3, 3));
        // a stays a member (static), b leads now, and the leader sees all three.
        assert!(g.members.contains_key(&a));
        assert_eq!(jb.leader, b);
        assert_eq!(jb.members.len(), 3);
        assert!(jd.members.is_empty());
        assert_eq!(g.heartbeat(&a, Some("i-a"), 2, t + Duration::from_secs(31)), ErrorCode::IllegalGeneration);
        // Wrong or unknown instance ids, as Kafka's validateCurrentMember.
        assert!(matches!(g.check_member(&d, Some("i-zz"), 3), Err(ErrorCode::UnknownMemberId)));
        assert!(matches!(g.check_member(&d, Some("i-a"), 3), Err(ErrorCode::FencedInstanceId)));
    }

    #[test]
    fn rebalance_timeout_with_nobody_joined_waits_for_sessions() {
        let l = GroupLimits::default();
        let t = Instant::now();
        let mut g = Group::new("g", t);
        let (a, b) = stable_static_pair(&mut g, t, &l);
        // A new dynamic member joins and then leaves; neither static member
        // joins before the rebalance timeout.
        let (d, rd) = join_two_step(&mut g, req("", &[("range", "m")]), t, &l);
        assert_eq!(g.leave(&d, None, t, &l), ErrorCode::None);
        assert_eq!(waited(wait_rx(rd)).error, ErrorCode::UnknownMemberId);
        for s in 1..=31 {
            let at = t + Duration::from_secs(s);
            assert_eq!(g.heartbeat(&a, Some("i-a"), 2, at), ErrorCode::RebalanceInProgress);
            assert_eq!(g.heartbeat(&b, Some("i-b"), 2, at), ErrorCode::RebalanceInProgress);
            g.tick(at, &l);
        }
        // No generation without a joined member: still preparing, same generation.
        assert_eq!((g.state, g.generation), (GroupState::PreparingRebalance, 2));
        let rb = wait_rx(g.join(static_req("i-b", &b, "m"), t + Duration::from_secs(31), &l));
        g.tick(t + Duration::from_secs(62), &l);
        let jb = waited(rb);
        assert_eq!((jb.generation, jb.leader.as_str()), (3, b.as_str()));
    }
}
