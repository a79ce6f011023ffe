//! One consumer thread: fetches its partitions from their leaders (one
//! Fetch in flight per leader connection, as the Java consumer does), walks
//! the returned batches, and records end-to-end latency from each record's
//! intended send time (carried in the value) to when it was read.
//!
//! Its partitions are either fixed (`consumer.mode = "assigned"`) or come
//! from a Kafka consumer group (`"group"`, see `group`): then it heartbeats
//! and commits between fetches, and on a rebalance commits, drops its fetch
//! connections and takes over whatever the new assignment gives it, from
//! the committed offsets.
//!
//! With verification on, it also checks what a user relies on: offsets only
//! move forward, each producer's records stay in order within a partition,
//! every keyed record sits on the partition Kafka's default partitioner
//! picks for its key, and (per group, after the run) the position ranges
//! the members read neither overlap nor leave holes.
//!
//! Runs on its own pinned thread and shares only the live counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tidelog_protocol::header::decode_response;
use tidelog_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use tidelog_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use tidelog_protocol::StrBytes;

use crate::client::{frame_correlation_id, poll_fds, Cluster, Conn};
use crate::group::{GroupMember, GroupSettings, Health};
use crate::murmur2::partition_for_key;
use crate::records::{for_each_fetched_record, records_from};
use crate::run::{Live, RunClock};
use crate::stats::{record_us, ThreadStats};
use crate::util::wall_now_us;
use crate::workload::{ConsumerSpec, PAYLOAD_HEADER_BYTES};

/// Where a consumer's partitions come from.
#[derive(Clone, Debug)]
pub enum Membership {
    /// A fixed split of the partitions (consumer.mode = "assigned").
    Assigned(Vec<i32>),
    /// A Kafka consumer group (consumer.mode = "group").
    Group { bootstrap: String, settings: GroupSettings },
}

pub struct ConsumerConfig {
    pub group: usize,
    pub index: usize,
    pub spec: ConsumerSpec,
    pub topic: String,
    pub cluster: Cluster,
    pub membership: Membership,
    /// Offset to start from, per partition index (in group mode: where a
    /// partition without a committed offset starts).
    pub start_offsets: Vec<i64>,
    /// Set by the main thread once the producers are done (or, reading a
    /// backlog, at the start): the offset after the last record to read, per
    /// partition. The consumer stops there.
    pub end_offsets: Arc<OnceLock<Vec<i64>>>,
    /// Records read before this are counted but not measured (warm-up).
    pub measure_from: Instant,
    /// Stop once this consumer's group has read this many records (0: no
    /// such limit).
    pub group_records_max: u64,
    /// Record end-to-end latency. Off when reading a backlog some earlier
    /// run wrote: its send times say how old the data is, not how fast it came.
    pub record_e2e: bool,
    pub clock: RunClock,
    pub live: Arc<Live>,
    pub verify: bool,
}

/// What verification found.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyStats {
    pub records: u64,
    pub keyed_records: u64,
    pub key_partition_mismatches: u64,
    pub producer_order_violations: u64,
    pub offset_regressions: u64,
    pub malformed_values: u64,
    /// Offsets some group read more than once (over all its members).
    #[serde(default)]
    pub duplicate_offsets: u64,
    /// Offsets between a group's start and end offsets that no member read.
    #[serde(default)]
    pub missing_offsets: u64,
    pub first_problem: Option<String>,
    /// (partition, from, to): the positions one consumer read while it
    /// owned a partition; `run` checks them per group.
    #[serde(skip)]
    pub ranges: Vec<(i32, i64, i64)>,
}

impl VerifyStats {
    pub fn merge(&mut self, o: &VerifyStats) {
        self.records += o.records;
        self.keyed_records += o.keyed_records;
        self.key_partition_mismatches += o.key_partition_mismatches;
        self.producer_order_violations += o.producer_order_violations;
        self.offset_regressions += o.offset_regressions;
        self.malformed_values += o.malformed_values;
        self.duplicate_offsets += o.duplicate_offsets;
        self.missing_offsets += o.missing_offsets;
        self.ranges.extend_from_slice(&o.ranges);
        if self.first_problem.is_none() {
            self.first_problem.clone_from(&o.first_problem);
        }
    }

    pub fn problems(&self) -> u64 {
        self.key_partition_mismatches
            + self.producer_order_violations
            + self.offset_regressions
            + self.malformed_values
            + self.duplicate_offsets
            + self.missing_offsets
    }

    pub fn problem(&mut self, what: String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what);
        }
    }

    /// Checks one group's read ranges: every offset of partition `p` in
    /// `start[p]..end[p]` read exactly once. Without `end`, only overlaps
    /// and holes between ranges count (a read stopped by a record budget).
    pub fn check_coverage(&mut self, group: usize, start: &[i64], end: Option<&[i64]>) {
        let mut by_partition: HashMap<i32, Vec<(i64, i64)>> = HashMap::new();
        for &(p, from, to) in &self.ranges {
            if to > from {
                by_partition.entry(p).or_default().push((from, to));
            }
        }
        let partitions = start.len().max(end.map_or(0, |e| e.len()));
        for p in 0..partitions as i32 {
            let mut ranges = by_partition.remove(&p).unwrap_or_default();
            ranges.sort_unstable();
            let first = start.get(p as usize).copied().unwrap_or(0);
            let mut covered = first;
            for (from, to) in ranges {
                if from > covered {
                    self.missing_offsets += (from - covered) as u64;
                    self.problem(format!("group {group}: partition {p} offsets {covered}..{from} never read"));
                } else if from < covered {
                    self.duplicate_offsets += (to.min(covered) - from) as u64;
                    self.problem(format!(
                        "group {group}: partition {p} offsets {from}..{} read twice",
                        to.min(covered)
                    ));
                }
                covered = covered.max(to);
            }
            if let Some(last) = end.and_then(|e| e.get(p as usize)).copied() {
                if covered < last {
                    self.missing_offsets += (last - covered) as u64;
                    self.problem(format!("group {group}: partition {p} offsets {covered}..{last} never read"));
                }
            }
        }
    }
}

pub struct ConsumerResult {
    pub group: usize,
    pub stats: ThreadStats,
    pub verify: VerifyStats,
}

struct Leader {
    conn: Conn,
    fetch_version: i16,
    partitions: Vec<i32>,
    in_flight: Option<i32>,
    /// When the fetch in flight was written.
    sent_at: Instant,
    /// No fetch before this after an error answer (retry.backoff.ms).
    backoff_until: Option<Instant>,
}

/// The partitions a consumer owns right now, their positions and the fetch
/// connections to their leaders.
struct Owned {
    partitions: Vec<i32>,
    leaders: Vec<Leader>,
    next_offset: HashMap<i32, i64>,
    /// Position each partition was taken over at (for the coverage check).
    taken_at: HashMap<i32, i64>,
}

impl Owned {
    fn new(cfg: &ConsumerConfig, partitions: Vec<i32>, positions: HashMap<i32, i64>) -> anyhow::Result<Owned> {
        let mut leaders: Vec<Leader> = Vec::new();
        for &p in &partitions {
            let node = cfg
                .cluster
                .partitions
                .iter()
                .find(|m| m.index == p)
                .map(|m| m.leader)
                .ok_or_else(|| anyhow!("partition {p} not in metadata"))?;
            let addr = cfg.cluster.broker_addr(node)?.to_string();
            match leaders.iter_mut().find(|l| l.conn.addr == addr) {
                Some(l) => l.partitions.push(p),
                None => {
                    let mut conn =
                        Conn::connect(&addr, &format!("tidelog-bench-consumer-{}-{}", cfg.group, cfg.index))?;
                    conn.set_nonblocking()?;
                    let fetch_version = conn.versions.get(ApiKey::Fetch)?;
                    leaders.push(Leader {
                        conn,
                        fetch_version,
                        partitions: vec![p],
                        in_flight: None,
                        sent_at: Instant::now(),
                        backoff_until: None,
                    });
                }
            }
        }
        Ok(Owned { partitions, leaders, taken_at: positions.clone(), next_offset: positions })
    }

    fn none() -> Owned {
        Owned { partitions: Vec::new(), leaders: Vec::new(), next_offset: HashMap::new(), taken_at: HashMap::new() }
    }

    fn position(&self, p: i32) -> i64 {
        self.next_offset.get(&p).copied().unwrap_or(0)
    }

    fn positions(&self) -> Vec<(i32, i64)> {
        self.partitions.iter().map(|&p| (p, self.position(p))).collect()
    }

    fn done(&self, ends: &[i64]) -> bool {
        self.partitions.iter().all(|&p| self.position(p) >= ends.get(p as usize).copied().unwrap_or(0))
    }

    /// Gives the partitions up; their read ranges go to `verify`.
    fn release(self, verify: &mut VerifyStats) {
        for &p in &self.partitions {
            let from = self.taken_at.get(&p).copied().unwrap_or(0);
            verify.ranges.push((p, from, self.position(p)));
        }
    }
}

/// Takes up to `want` records out of a group's budget of `max`; returns
/// how many were granted.
fn claim(consumed: &AtomicU64, max: u64, want: u64) -> u64 {
    match consumed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
        (cur < max && want > 0).then(|| cur + want.min(max - cur))
    }) {
        Ok(before) => want.min(max - before),
        Err(_) => 0,
    }
}

fn start_offset(cfg: &ConsumerConfig, p: i32) -> i64 {
    cfg.start_offsets.get(p as usize).copied().unwrap_or(0)
}

/// Joins (or rejoins) the group and takes over the assignment from the
/// committed offsets.
fn take_over(cfg: &ConsumerConfig, member: &mut GroupMember) -> anyhow::Result<Owned> {
    let parts = member.join()?;
    let committed = if parts.is_empty() { HashMap::new() } else { member.committed(&parts)? };
    let positions = parts.iter().map(|&p| (p, committed.get(&p).copied().unwrap_or_else(|| start_offset(cfg, p))));
    let positions = positions.collect();
    Owned::new(cfg, parts, positions)
}

pub fn run_consumer(cfg: ConsumerConfig) -> anyhow::Result<ConsumerResult> {
    let topic_name = TopicName(StrBytes::from_string(cfg.topic.clone()));
    let mut stats = ThreadStats::default();
    let mut verify = VerifyStats::default();
    let mut member = match &cfg.membership {
        Membership::Assigned(_) => None,
        Membership::Group { bootstrap, settings } => {
            let all: Vec<i32> = cfg.cluster.partitions.iter().map(|p| p.index).collect();
            Some(GroupMember::connect(bootstrap, settings.clone(), &cfg.topic, &all)?)
        }
    };
    let mut owned = match (&cfg.membership, member.as_mut()) {
        (_, Some(m)) => take_over(&cfg, m)?,
        (Membership::Assigned(parts), None) => {
            Owned::new(&cfg, parts.clone(), parts.iter().map(|&p| (p, start_offset(&cfg, p))).collect())?
        }
        (Membership::Group { .. }, None) => unreachable!("a group consumer has a member"),
    };
    let mut last_seq: HashMap<(u32, i32), u64> = HashMap::new();
    let partitions_total = cfg.cluster.partitions.len() as i32;
    let mut interval = crate::stats::new_latency_histogram();
    let mut last_publish = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    let group_consumed = cfg.live.consumed_per_group.get(cfg.group);

    loop {
        if cfg.live.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(ends) = cfg.end_offsets.get() {
            let deadline = *drain_deadline
                .get_or_insert_with(|| Instant::now() + Duration::from_secs_f64(cfg.clock.drain_timeout_s));
            if owned.done(ends) {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("consumer {}/{}: drain timeout, stopping before the end offsets", cfg.group, cfg.index);
                break;
            }
        }
        if cfg.group_records_max > 0
            && group_consumed.is_some_and(|c| c.load(Ordering::Relaxed) >= cfg.group_records_max)
        {
            break;
        }
        if let Some(m) = member.as_mut() {
            let now = Instant::now();
            let mut health = Health::Stable;
            if now >= m.next_commit {
                health = m.commit(&owned.positions())?;
            }
            if health == Health::Stable && now >= m.next_heartbeat {
                health = m.heartbeat()?;
            }
            if health == Health::Rejoin {
                // Eager rebalance: commit what was read, give it all up
                // (fetches in flight are dropped with their connections),
                // rejoin, and start the new assignment at its commits.
                m.commit(&owned.positions())?;
                std::mem::replace(&mut owned, Owned::none()).release(&mut verify);
                owned = take_over(&cfg, m)?;
                continue;
            }
        }
        let tick = Instant::now();
        for l in owned.leaders.iter_mut().filter(|l| l.in_flight.is_none() && l.backoff_until.is_none_or(|t| tick >= t))
        {
            let req = FetchRequest::default()
                .with_max_wait_ms(cfg.spec.fetch_max_wait_ms)
                .with_min_bytes(cfg.spec.fetch_min_bytes)
                .with_max_bytes(cfg.spec.fetch_max_bytes)
                .with_topics(vec![FetchTopic::default().with_topic(topic_name.clone()).with_partitions(
                    l.partitions
                        .iter()
                        .map(|p| {
                            FetchPartition::default()
                                .with_partition(*p)
                                .with_fetch_offset(owned.next_offset.get(p).copied().unwrap_or(0))
                                .with_partition_max_bytes(cfg.spec.partition_max_bytes)
                        })
                        .collect(),
                )]);
            l.in_flight = Some(l.conn.queue(ApiKey::Fetch, l.fetch_version, &req)?);
            l.sent_at = Instant::now();
            l.conn.flush()?;
            stats.requests += 1;
        }
        let mut wait = Duration::from_millis(100);
        if let Some(m) = &member {
            wait = wait.min(m.next_heartbeat.min(m.next_commit).saturating_duration_since(Instant::now()));
        }
        let mut fds: Vec<libc::pollfd> = owned.leaders.iter().map(|l| l.conn.pollfd()).collect();
        if fds.is_empty() {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            continue;
        }
        poll_fds(&mut fds, wait)?;
        for (li, fd) in fds.iter().enumerate() {
            let l = &mut owned.leaders[li];
            if fd.revents & libc::POLLOUT != 0 {
                l.conn.flush()?;
            }
            if fd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) == 0 {
                continue;
            }
            l.conn.read_some()?;
            while let Some(mut frame) = l.conn.next_frame()? {
                let cid = frame_correlation_id(&frame).ok_or_else(|| anyhow!("short fetch response"))?;
                anyhow::ensure!(Some(cid) == l.in_flight, "fetch response {cid}, expected {:?}", l.in_flight);
                l.in_flight = None;
                let (_, resp) = decode_response::<FetchResponse>(ApiKey::Fetch, l.fetch_version, &mut frame)
                    .map_err(|e| anyhow!("{e}"))
                    .context("decoding FetchResponse")?;
                if resp.error_code != 0 {
                    stats.count_error(resp.error_code);
                    cfg.live.errors.fetch_add(1, Ordering::Relaxed);
                    l.backoff_until = Some(Instant::now() + Duration::from_millis(100));
                    continue;
                }
                let now = Instant::now();
                let now_us = wall_now_us();
                let measuring = now >= cfg.measure_from;
                let second = now.saturating_duration_since(cfg.clock.start).as_secs() as usize;
                let fetch_us = now.saturating_duration_since(l.sent_at).as_micros() as u64;
                let mut fetched_records = 0u64;
                for t in &resp.responses {
                    for p in &t.partitions {
                        if p.error_code != 0 {
                            stats.count_error(p.error_code);
                            cfg.live.errors.fetch_add(1, Ordering::Relaxed);
                            l.backoff_until = Some(now + Duration::from_millis(100));
                            continue;
                        }
                        let Some(records) = &p.records else { continue };
                        let partition = p.partition_index;
                        let fetch_offset = owned.next_offset.get(&partition).copied().unwrap_or(0);
                        // With a record budget, claim what this answer may
                        // consume before reading it, so the group stops at
                        // exactly the budget.
                        let allowed = match (cfg.group_records_max, group_consumed) {
                            (max, Some(c)) if max > 0 => claim(c, max, records_from(records, fetch_offset)?),
                            _ => u64::MAX,
                        };
                        let mut last_offset = fetch_offset - 1;
                        let (mut n, mut bytes) = (0u64, 0u64);
                        let mut truncated = false;
                        let next = for_each_fetched_record(records, cfg.spec.check_crc, |r| {
                            if r.offset < fetch_offset || truncated {
                                return; // earlier records of the first batch, or over budget
                            }
                            if n == allowed {
                                truncated = true;
                                return;
                            }
                            let value = r.value.unwrap_or(&[]);
                            n += 1;
                            bytes += value.len() as u64;
                            if cfg.record_e2e && measuring && value.len() >= PAYLOAD_HEADER_BYTES {
                                let mut ts = [0u8; 8];
                                ts.copy_from_slice(&value[0..8]);
                                let e2e = now_us.saturating_sub(u64::from_be_bytes(ts));
                                record_us(&mut stats.end_to_end_us, e2e);
                                record_us(&mut interval, e2e);
                            }
                            if cfg.verify {
                                check_record(&mut verify, &mut last_seq, partition, partitions_total, last_offset, &r);
                            }
                            last_offset = r.offset;
                        })
                        .with_context(|| format!("{}-{partition} at offset {fetch_offset}", cfg.topic))?;
                        let next = if truncated { Some(last_offset + 1) } else { next };
                        if let Some(next) = next {
                            if next > fetch_offset {
                                owned.next_offset.insert(partition, next);
                            }
                        }
                        fetched_records += n;
                        stats.consumed.add(second, n, bytes);
                        if measuring {
                            stats.consumed_records += n;
                            stats.consumed_bytes += bytes;
                        }
                        cfg.live.consumed_records.fetch_add(n, Ordering::Relaxed);
                        cfg.live.consumed_bytes.fetch_add(bytes, Ordering::Relaxed);
                        if let Some(c) = group_consumed {
                            if allowed == u64::MAX {
                                c.fetch_add(n, Ordering::Relaxed);
                            } else if allowed > n {
                                c.fetch_sub(allowed - n, Ordering::Relaxed); // claimed more than was there
                            }
                        }
                    }
                }
                // Round trips that brought records: long-poll waits that
                // timed out empty say nothing about how fast data comes.
                if measuring && fetched_records > 0 {
                    record_us(&mut stats.fetch_us, fetch_us);
                }
            }
        }
        if last_publish.elapsed() >= Duration::from_millis(500) {
            cfg.live.merge_e2e(&interval);
            interval.reset();
            last_publish = Instant::now();
        }
    }
    cfg.live.merge_e2e(&interval);
    if let Some(m) = member.as_mut() {
        // Leave a clean group behind: final positions committed, then out.
        if m.commit(&owned.positions())? == Health::Rejoin {
            eprintln!(
                "consumer {}/{}: final commit refused (group rebalancing or member fenced)",
                cfg.group, cfg.index
            );
        }
        m.leave()?;
        stats.group_generations += m.counters.generations;
        stats.group_commits += m.counters.commits;
        for (k, v) in &m.counters.error_codes {
            *stats.group_error_codes.entry(*k).or_default() += v;
        }
    }
    owned.release(&mut verify);
    Ok(ConsumerResult { group: cfg.group, stats, verify })
}

fn check_record(
    v: &mut VerifyStats,
    last_seq: &mut HashMap<(u32, i32), u64>,
    partition: i32,
    partitions_total: i32,
    last_offset: i64,
    r: &crate::records::RecordView<'_>,
) {
    v.records += 1;
    if r.offset <= last_offset {
        v.offset_regressions += 1;
        v.problem(format!("partition {partition}: offset {} after {last_offset}", r.offset));
    }
    if let Some(key) = r.key {
        v.keyed_records += 1;
        let want = partition_for_key(key, partitions_total);
        if want != partition {
            v.key_partition_mismatches += 1;
            v.problem(format!("key {:?} on partition {partition}, murmur2 says {want}", String::from_utf8_lossy(key)));
        }
    }
    let Some(value) = r.value.filter(|v| v.len() >= PAYLOAD_HEADER_BYTES) else {
        v.malformed_values += 1;
        v.problem(format!("partition {partition} offset {}: value shorter than the bench header", r.offset));
        return;
    };
    let producer = u32::from_be_bytes([value[8], value[9], value[10], value[11]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&value[12..20]);
    let seq = u64::from_be_bytes(s);
    if let Some(prev) = last_seq.insert((producer, partition), seq) {
        if seq <= prev {
            v.producer_order_violations += 1;
            v.problem(format!("partition {partition}: producer {producer} sequence {seq} after {prev}"));
        }
    }
}
