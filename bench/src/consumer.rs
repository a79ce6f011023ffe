//! One consumer thread: fetches its assigned partitions from their leaders
//! (one Fetch in flight per leader connection, as the Java consumer does),
//! walks the returned batches, and records end-to-end latency from each
//! record's intended send time (carried in the value) to when it was read.
//!
//! With verification on, it also checks what a user relies on: offsets only
//! move forward, each producer's records stay in order within a partition,
//! and every keyed record sits on the partition Kafka's default partitioner
//! picks for its key.
//!
//! Runs on its own pinned thread and shares only the live counters.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tidelog_protocol::header::decode_response;
use tidelog_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use tidelog_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use tidelog_protocol::StrBytes;

use crate::client::{frame_correlation_id, poll_fds, Cluster, Conn};
use crate::murmur2::partition_for_key;
use crate::records::for_each_fetched_record;
use crate::run::{Live, RunClock};
use crate::stats::{record_us, ThreadStats};
use crate::util::wall_now_us;
use crate::workload::{ConsumerSpec, PAYLOAD_HEADER_BYTES};

pub struct ConsumerConfig {
    pub group: usize,
    pub index: usize,
    pub spec: ConsumerSpec,
    pub topic: String,
    pub cluster: Cluster,
    pub assigned: Vec<i32>,
    /// Offset to start from, per partition index.
    pub start_offsets: Vec<i64>,
    /// Set by the main thread once the producers are done: the offset after
    /// the last produced record, per partition. The consumer stops there.
    pub end_offsets: Arc<OnceLock<Vec<i64>>>,
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
    pub first_problem: Option<String>,
}

impl VerifyStats {
    pub fn merge(&mut self, o: &VerifyStats) {
        self.records += o.records;
        self.keyed_records += o.keyed_records;
        self.key_partition_mismatches += o.key_partition_mismatches;
        self.producer_order_violations += o.producer_order_violations;
        self.offset_regressions += o.offset_regressions;
        self.malformed_values += o.malformed_values;
        if self.first_problem.is_none() {
            self.first_problem.clone_from(&o.first_problem);
        }
    }

    pub fn problems(&self) -> u64 {
        self.key_partition_mismatches + self.producer_order_violations + self.offset_regressions + self.malformed_values
    }

    fn problem(&mut self, what: String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what);
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
    partitions: Vec<i32>,
    in_flight: Option<i32>,
    /// No fetch before this after an error answer (retry.backoff.ms).
    backoff_until: Option<Instant>,
}

pub fn run_consumer(cfg: ConsumerConfig) -> anyhow::Result<ConsumerResult> {
    let topic_name = TopicName(StrBytes::from_string(cfg.topic.clone()));
    let mut leaders: Vec<Leader> = Vec::new();
    for &p in &cfg.assigned {
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
                let mut conn = Conn::connect(&addr, &format!("tidelog-bench-consumer-{}-{}", cfg.group, cfg.index))?;
                conn.set_nonblocking()?;
                leaders.push(Leader { conn, partitions: vec![p], in_flight: None, backoff_until: None });
            }
        }
    }
    let version = match leaders.first() {
        Some(l) => l.conn.versions.get(ApiKey::Fetch)?,
        None => 12,
    };
    let mut next_offset: HashMap<i32, i64> =
        cfg.assigned.iter().map(|&p| (p, cfg.start_offsets.get(p as usize).copied().unwrap_or(0))).collect();
    let mut stats = ThreadStats::default();
    let mut verify = VerifyStats::default();
    let mut last_seq: HashMap<(u32, i32), u64> = HashMap::new();
    let partitions_total = cfg.cluster.partitions.len() as i32;
    let mut interval = crate::stats::new_latency_histogram();
    let mut last_publish = Instant::now();
    let mut drain_deadline: Option<Instant> = None;

    loop {
        if cfg.live.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(ends) = cfg.end_offsets.get() {
            let done = cfg
                .assigned
                .iter()
                .all(|p| next_offset.get(p).copied().unwrap_or(0) >= ends.get(*p as usize).copied().unwrap_or(0));
            let deadline = *drain_deadline
                .get_or_insert_with(|| Instant::now() + Duration::from_secs_f64(cfg.clock.drain_timeout_s));
            if done {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("consumer {}/{}: drain timeout, stopping before the end offsets", cfg.group, cfg.index);
                break;
            }
        }
        let tick = Instant::now();
        for l in leaders.iter_mut().filter(|l| l.in_flight.is_none() && l.backoff_until.is_none_or(|t| tick >= t)) {
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
                                .with_fetch_offset(next_offset.get(p).copied().unwrap_or(0))
                                .with_partition_max_bytes(cfg.spec.partition_max_bytes)
                        })
                        .collect(),
                )]);
            l.in_flight = Some(l.conn.queue(ApiKey::Fetch, version, &req)?);
            l.conn.flush()?;
            stats.requests += 1;
        }
        let mut fds: Vec<libc::pollfd> = leaders
            .iter()
            .map(|l| libc::pollfd {
                fd: l.conn.raw_fd(),
                events: libc::POLLIN | if l.conn.wants_write() { libc::POLLOUT } else { 0 },
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        poll_fds(&mut fds, Duration::from_millis(100))?;
        for (li, fd) in fds.iter().enumerate() {
            let l = &mut leaders[li];
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
                let (_, resp) = decode_response::<FetchResponse>(ApiKey::Fetch, version, &mut frame)
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
                let measuring = now >= cfg.clock.warmup_end;
                let second = now.saturating_duration_since(cfg.clock.start).as_secs() as usize;
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
                        let fetch_offset = next_offset.get(&partition).copied().unwrap_or(0);
                        let mut last_offset = fetch_offset - 1;
                        let (mut n, mut bytes) = (0u64, 0u64);
                        let next = for_each_fetched_record(records, cfg.spec.check_crc, |r| {
                            if r.offset < fetch_offset {
                                return; // earlier records of the first batch
                            }
                            let value = r.value.unwrap_or(&[]);
                            n += 1;
                            bytes += value.len() as u64;
                            if value.len() >= PAYLOAD_HEADER_BYTES {
                                let mut ts = [0u8; 8];
                                ts.copy_from_slice(&value[0..8]);
                                let ts_us = u64::from_be_bytes(ts);
                                if measuring {
                                    let e2e = now_us.saturating_sub(ts_us);
                                    record_us(&mut stats.end_to_end_us, e2e);
                                    record_us(&mut interval, e2e);
                                }
                            }
                            if cfg.verify {
                                check_record(&mut verify, &mut last_seq, partition, partitions_total, last_offset, &r);
                            }
                            last_offset = r.offset;
                        })
                        .with_context(|| format!("{}-{partition} at offset {fetch_offset}", cfg.topic))?;
                        if let Some(next) = next {
                            if next > fetch_offset {
                                next_offset.insert(partition, next);
                            }
                        }
                        stats.consumed.add(second, n, bytes);
                        if measuring {
                            stats.consumed_records += n;
                            stats.consumed_bytes += bytes;
                        }
                        cfg.live.consumed_records.fetch_add(n, Ordering::Relaxed);
                        cfg.live.consumed_bytes.fetch_add(bytes, Ordering::Relaxed);
                        if cfg.group == 0 {
                            cfg.live.consumed_group0_total.fetch_add(n, Ordering::Relaxed);
                        }
                    }
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
