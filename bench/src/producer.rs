//! One producer thread: generates records (paced or as fast as possible),
//! partitions them (murmur2 for keys, sticky for unkeyed), accumulates them
//! per partition (batch.size + linger.ms), and pipelines Produce requests to
//! each partition leader with at most `max_in_flight` outstanding per
//! connection.
//!
//! Life of a record: due by the pacer (its intended send time is its
//! timestamp) -> appended to its partition's open batch -> batch closed when
//! full or lingered -> ready queue of the leader -> Produce request ->
//! response: ack latency per record from the intended time, per batch from
//! the write of the request.
//!
//! Runs on its own pinned thread and shares only the live counters.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use tidelog_protocol::header::decode_response;
use tidelog_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use tidelog_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName, TransactionalId};
use tidelog_protocol::StrBytes;

use crate::client::{frame_correlation_id, is_retriable, poll_fds, Cluster, Conn};
use crate::murmur2::partition_for_key;
use crate::records::BatchBuilder;
use crate::run::{Live, RunClock};
use crate::stats::{keep_slowest, record_us, record_us_n, Pacer, Slow, ThreadStats, SLOW_US};
use crate::util::{wall_now_us, Rng};
use crate::workload::{payload_filler, payload_header, payload_tail, KeyMode, ProducerSpec};

/// Largest Produce request the producers build (Kafka's max.request.size).
const REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// Most records generated per loop turn, so responses are read in between.
const RECORDS_PER_TURN_MAX: usize = 4096;

pub struct ProducerConfig {
    pub index: u32,
    pub spec: ProducerSpec,
    pub topic: String,
    pub cluster: Cluster,
    /// This producer's share of the rate; 0 = unpaced.
    pub rate_per_s: f64,
    /// This producer's share of the records; `None` = until `clock.end`.
    pub records_max: Option<u64>,
    pub clock: RunClock,
    pub live: Arc<Live>,
    pub seed: u64,
}

struct OpenBatch {
    builder: BatchBuilder,
    created: Instant,
    intended: Vec<Instant>,
    value_bytes: u64,
}

struct ReadyBatch {
    partition: i32,
    bytes: Bytes,
    records: u32,
    value_bytes: u64,
    intended: Vec<Instant>,
    attempts: u32,
}

/// A batch that waits for, or travels in, a Produce request.
pub(crate) trait QueuedBatch {
    fn partition(&self) -> i32;
    fn bytes(&self) -> &Bytes;
}

impl QueuedBatch for ReadyBatch {
    fn partition(&self) -> i32 {
        self.partition
    }

    fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// A Produce request written and not yet answered.
pub(crate) struct InFlight<B> {
    pub(crate) correlation_id: i32,
    pub(crate) sent: Instant,
    pub(crate) batches: Vec<B>,
}

/// One connection to a partition leader with its queue of ready batches
/// and its requests in flight.
pub(crate) struct Leader<B> {
    pub(crate) conn: Conn,
    pub(crate) ready: VecDeque<B>,
    pub(crate) in_flight: VecDeque<InFlight<B>>,
    /// retry.backoff.ms: no new request before this after a retriable error.
    pub(crate) backoff_until: Option<Instant>,
}

/// Connects (non-blocking), once per broker, to the leader of every
/// partition in `cluster`. Returns the connections and, per partition, the
/// index of its leader's.
pub(crate) fn connect_leaders<B>(
    cluster: &Cluster,
    topic: &str,
    client_id: &str,
) -> anyhow::Result<(Vec<Leader<B>>, Vec<usize>)> {
    let mut leaders: Vec<Leader<B>> = Vec::new();
    let mut node_to_leader = std::collections::BTreeMap::new();
    let n = cluster.partitions.iter().map(|p| p.index + 1).max().unwrap_or(0) as usize;
    let mut leader_of = vec![usize::MAX; n];
    for p in &cluster.partitions {
        let idx = match node_to_leader.get(&p.leader) {
            Some(&i) => i,
            None => {
                let mut conn = Conn::connect(cluster.broker_addr(p.leader)?, client_id)?;
                conn.set_nonblocking()?;
                leaders.push(Leader { conn, ready: VecDeque::new(), in_flight: VecDeque::new(), backoff_until: None });
                node_to_leader.insert(p.leader, leaders.len() - 1);
                leaders.len() - 1
            }
        };
        leader_of[p.index as usize] = idx;
    }
    anyhow::ensure!(!leaders.is_empty(), "topic {topic} has no partitions");
    anyhow::ensure!(leader_of.iter().all(|&l| l != usize::MAX), "topic {topic} has gaps in its partitions");
    Ok((leaders, leader_of))
}

impl<B: QueuedBatch> Leader<B> {
    /// The batches of this leader's next Produce request, or `None` while
    /// it backs off after a retriable error, has `max_in_flight` requests
    /// out (no cap when `None`), or has nothing ready. One batch per
    /// partition, in queue order, up to REQUEST_BYTES_MAX; the rest stays
    /// queued in its order. `in_order`: once a partition's batch is passed
    /// over, none of its later ones goes in this request either (they would
    /// overtake it).
    pub(crate) fn next_request(&mut self, max_in_flight: Option<usize>, in_order: bool) -> Option<Vec<B>> {
        if let Some(t) = self.backoff_until {
            if Instant::now() < t {
                return None;
            }
            self.backoff_until = None;
        }
        if self.ready.is_empty() || max_in_flight.is_some_and(|max| self.in_flight.len() >= max) {
            return None;
        }
        let mut batches: Vec<B> = Vec::new();
        let mut skipped: VecDeque<B> = VecDeque::new();
        let mut size = 0;
        while let Some(b) = self.ready.pop_front() {
            let blocked = batches.iter().any(|x| x.partition() == b.partition())
                || (in_order && skipped.iter().any(|x| x.partition() == b.partition()));
            if blocked || (!batches.is_empty() && size + b.bytes().len() > REQUEST_BYTES_MAX) {
                skipped.push_back(b);
                if size + 100 > REQUEST_BYTES_MAX {
                    break;
                }
                continue;
            }
            size += b.bytes().len();
            batches.push(b);
        }
        while let Some(b) = skipped.pop_back() {
            self.ready.push_front(b);
        }
        Some(batches)
    }

    /// Reads the next Produce response, if a whole one has arrived, with
    /// the request it answers and each partition's error code.
    pub(crate) fn next_produce_response(
        &mut self,
        version: i16,
    ) -> anyhow::Result<Option<(Instant, InFlight<B>, PartitionCodes)>> {
        let Some(mut frame) = self.conn.next_frame()? else { return Ok(None) };
        let now = Instant::now();
        let cid = frame_correlation_id(&frame).ok_or_else(|| anyhow!("short response frame"))?;
        let inflight = self.in_flight.pop_front().ok_or_else(|| anyhow!("response {cid} with no request in flight"))?;
        anyhow::ensure!(
            inflight.correlation_id == cid,
            "{}: response correlation id {cid}, expected {}",
            self.conn.addr,
            inflight.correlation_id
        );
        let (_, resp) = decode_response::<ProduceResponse>(ApiKey::Produce, version, &mut frame)
            .map_err(|e| anyhow!("{e}"))
            .context("decoding ProduceResponse")?;
        let codes =
            resp.responses.iter().flat_map(|t| t.partition_responses.iter().map(|p| (p.index, p.error_code))).collect();
        Ok(Some((now, inflight, PartitionCodes(codes))))
    }
}

/// The error code per partition of a Produce response.
pub(crate) struct PartitionCodes(Vec<(i32, i16)>);

impl PartitionCodes {
    /// -1 (UNKNOWN_SERVER_ERROR) for a partition the response left out.
    pub(crate) fn get(&self, partition: i32) -> i16 {
        self.0.iter().find(|c| c.0 == partition).map(|c| c.1).unwrap_or(-1)
    }
}

/// A Produce request for `batches` of `topic`.
pub(crate) fn produce_request<B: QueuedBatch>(
    topic: &TopicName,
    acks: i16,
    timeout_ms: i32,
    transactional_id: Option<TransactionalId>,
    batches: &[B],
) -> ProduceRequest {
    ProduceRequest::default()
        .with_transactional_id(transactional_id)
        .with_acks(acks)
        .with_timeout_ms(timeout_ms)
        .with_topic_data(vec![TopicProduceData::default().with_name(topic.clone()).with_partition_data(
            batches
                .iter()
                .map(|b| {
                    PartitionProduceData::default().with_index(b.partition()).with_records(Some(b.bytes().clone()))
                })
                .collect(),
        )])
}

/// Polls the leaders' connections for up to `timeout`, writes what waits
/// on the writable ones and reads the readable ones (or those that hung
/// up). Returns the indexes of the latter, whose responses are to handle.
pub(crate) fn poll_leaders<B>(leaders: &mut [Leader<B>], timeout: Duration) -> anyhow::Result<Vec<usize>> {
    let mut fds: Vec<libc::pollfd> = leaders.iter().map(|l| l.conn.pollfd()).collect();
    poll_fds(&mut fds, timeout)?;
    let mut readable = Vec::new();
    for (li, fd) in fds.iter().enumerate() {
        if fd.revents & libc::POLLOUT != 0 {
            leaders[li].conn.flush()?;
        }
        if fd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
            leaders[li].conn.read_some()?;
            readable.push(li);
        }
    }
    Ok(readable)
}

/// Kafka's retry.backoff.ms default.
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(100);

pub fn run_producer(cfg: ProducerConfig) -> anyhow::Result<ThreadStats> {
    let mut p = Producer::new(cfg)?;
    p.run()?;
    Ok(p.stats)
}

struct Producer {
    cfg: ProducerConfig,
    version: i16,
    /// leader index per partition (into `leaders`)
    leader_of: Vec<usize>,
    leaders: Vec<Leader<ReadyBatch>>,
    open: Vec<Option<OpenBatch>>,
    sticky: i32,
    rng: Rng,
    filler: Vec<u8>,
    key_buf: Vec<u8>,
    seq: u64,
    round_robin_key: u64,
    pacer: Pacer,
    buffered_bytes: usize,
    stats: ThreadStats,
    topic_name: TopicName,
    wall_start_us: u64,
    next_linger_check: Instant,
}

impl Producer {
    fn new(cfg: ProducerConfig) -> anyhow::Result<Producer> {
        let (leaders, leader_of) =
            connect_leaders(&cfg.cluster, &cfg.topic, &format!("tidelog-bench-producer-{}", cfg.index))?;
        let n = leader_of.len();
        let version = leaders[0].conn.versions.get(ApiKey::Produce)?;
        let mut rng = Rng::new(cfg.seed);
        let filler = payload_filler(cfg.spec.size_dist(), &mut rng);
        let sticky = rng.below(n as u64) as i32;
        Ok(Producer {
            pacer: Pacer::new(cfg.clock.start, cfg.rate_per_s),
            topic_name: TopicName(StrBytes::from_string(cfg.topic.clone())),
            wall_start_us: cfg.clock.wall_start_us,
            next_linger_check: cfg.clock.start,
            cfg,
            version,
            leader_of,
            leaders,
            open: (0..n).map(|_| None).collect(),
            sticky,
            rng,
            filler,
            key_buf: Vec::with_capacity(32),
            seq: 0,
            round_robin_key: 0,
            buffered_bytes: 0,
            stats: ThreadStats::default(),
        })
    }

    fn partitions(&self) -> i32 {
        self.open.len() as i32
    }

    fn generating(&self, now: Instant) -> bool {
        if self.cfg.live.stop.load(Ordering::Relaxed) {
            return false;
        }
        match self.cfg.records_max {
            Some(max) => self.pacer.taken() < max,
            None => now < self.cfg.clock.end,
        }
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let linger = Duration::from_millis(self.cfg.spec.linger_ms);
        // Every thread starts on the same tick.
        std::thread::sleep(self.cfg.clock.start.saturating_duration_since(Instant::now()));
        let mut last_publish = Instant::now();
        let mut interval = crate::stats::new_latency_histogram();
        loop {
            let now = Instant::now();
            let generating = self.generating(now);
            if generating {
                self.generate(now)?;
            }
            // Close lingered (or, at the end, all) batches.
            if !generating || now >= self.next_linger_check {
                self.close_lingered(now, linger, !generating)?;
            }
            self.send_ready()?;
            if !generating && self.idle() {
                break;
            }
            self.wait_and_read(now, generating, &mut interval)?;
            if last_publish.elapsed() >= Duration::from_millis(500) {
                self.cfg.live.merge_latency(&interval);
                interval.reset();
                last_publish = Instant::now();
            }
        }
        self.cfg.live.merge_latency(&interval);
        Ok(())
    }

    fn idle(&self) -> bool {
        self.open.iter().all(|o| o.is_none())
            && self.leaders.iter().all(|l| l.ready.is_empty() && l.in_flight.is_empty() && !l.conn.wants_write())
    }

    fn buffer_full(&self) -> bool {
        self.buffered_bytes >= self.cfg.spec.buffer_memory_bytes
    }

    /// Generates every record that is due (bounded per turn).
    fn generate(&mut self, now: Instant) -> anyhow::Result<()> {
        for _ in 0..RECORDS_PER_TURN_MAX {
            if self.buffer_full() {
                return Ok(());
            }
            if let Some(max) = self.cfg.records_max {
                if self.pacer.taken() >= max {
                    return Ok(());
                }
            }
            let Some(intended) = self.pacer.take_due(now) else { return Ok(()) };
            self.append_record(intended)?;
        }
        Ok(())
    }

    fn append_record(&mut self, intended: Instant) -> anyhow::Result<()> {
        let ts_us = self.wall_start_us + intended.saturating_duration_since(self.cfg.clock.start).as_micros() as u64;
        let ts_ms = (ts_us / 1000) as i64;
        let value_len = self.cfg.spec.size_dist().draw(&mut self.rng);
        let keyed = match self.cfg.spec.keys {
            KeyMode::None => None,
            KeyMode::Random => Some(self.rng.below(self.cfg.spec.key_count)),
            KeyMode::RoundRobin => {
                let k = self.round_robin_key % self.cfg.spec.key_count;
                self.round_robin_key += 1;
                Some(k)
            }
        };
        self.key_buf.clear();
        let partition = match keyed {
            Some(k) => {
                use std::io::Write;
                let _ = write!(self.key_buf, "key-{k}");
                partition_for_key(&self.key_buf, self.partitions())
            }
            None => self.sticky,
        };
        let header = payload_header(ts_us, self.cfg.index, self.seq);
        self.seq += 1;
        let key = if keyed.is_some() { Some(self.key_buf.as_slice()) } else { None };
        let slot = partition as usize;
        let batch_max = self.cfg.spec.batch_size_bytes;
        // Close the open batch first if this record would overflow it.
        let overflow = match &self.open[slot] {
            Some(ob) => {
                ob.builder.count() > 0
                    && ob.builder.size_bytes() + ob.builder.record_size_bytes(ts_ms, key, value_len) > batch_max
            }
            None => false,
        };
        if overflow {
            self.close(slot)?;
        }
        let opened = self.open[slot].is_none();
        let ob = self.open[slot].get_or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(ts_ms, batch_max),
            created: intended,
            intended: Vec::with_capacity(64),
            value_bytes: 0,
        });
        // A new batch's header counts too: `close` takes off the whole
        // uncompressed size.
        let before = if opened { 0 } else { ob.builder.size_bytes() };
        let tail = payload_tail(&self.filler, self.seq, value_len);
        ob.builder.append(ts_ms, if keyed.is_some() { Some(self.key_buf.as_slice()) } else { None }, &header, tail);
        ob.intended.push(intended);
        ob.value_bytes += value_len as u64;
        self.buffered_bytes += ob.builder.size_bytes() - before;
        let full = ob.builder.size_bytes() >= batch_max;
        if full {
            self.close(slot)?;
        }
        Ok(())
    }

    /// Moves the open batch of `slot` to its leader's ready queue.
    fn close(&mut self, slot: usize) -> anyhow::Result<()> {
        let Some(ob) = self.open[slot].take() else { return Ok(()) };
        let uncompressed = ob.builder.size_bytes();
        let records = ob.builder.count() as u32;
        let bytes = ob.builder.finish(self.cfg.spec.compression)?;
        self.buffered_bytes = self.buffered_bytes + bytes.len() - uncompressed;
        self.leaders[self.leader_of[slot]].ready.push_back(ReadyBatch {
            partition: slot as i32,
            bytes,
            records,
            value_bytes: ob.value_bytes,
            intended: ob.intended,
            attempts: 0,
        });
        // KIP-480 sticky partitioning: a new partition once the batch is done.
        if slot as i32 == self.sticky && self.partitions() > 1 {
            let mut next = self.rng.below(self.partitions() as u64 - 1) as i32;
            if next >= self.sticky {
                next += 1;
            }
            self.sticky = next;
        }
        Ok(())
    }

    fn close_lingered(&mut self, now: Instant, linger: Duration, all: bool) -> anyhow::Result<()> {
        let mut next_check = now + linger.max(Duration::from_millis(1));
        for slot in 0..self.open.len() {
            let Some(ob) = &self.open[slot] else { continue };
            let due = ob.created + linger;
            if all || due <= now {
                self.close(slot)?;
            } else {
                next_check = next_check.min(due);
            }
        }
        self.next_linger_check = next_check;
        Ok(())
    }

    fn send_ready(&mut self) -> anyhow::Result<()> {
        let max_in_flight = self.cfg.spec.max_in_flight;
        let acks = self.cfg.spec.acks;
        for li in 0..self.leaders.len() {
            // acks=0: no response comes, nothing stays in flight.
            while let Some(batches) = self.leaders[li].next_request((acks != 0).then_some(max_in_flight), false) {
                let req = produce_request(&self.topic_name, acks, self.cfg.spec.request_timeout_ms, None, &batches);
                let leader = &mut self.leaders[li];
                let cid = leader.conn.queue(ApiKey::Produce, self.version, &req)?;
                leader.conn.flush()?;
                let now = Instant::now();
                self.stats.requests += 1;
                if acks == 0 {
                    // No response will come: count as acknowledged when written.
                    for b in batches {
                        self.acked(&b, now, now);
                    }
                } else {
                    self.leaders[li].in_flight.push_back(InFlight { correlation_id: cid, sent: now, batches });
                }
            }
        }
        Ok(())
    }

    fn acked(&mut self, b: &ReadyBatch, sent: Instant, now: Instant) {
        self.buffered_bytes = self.buffered_bytes.saturating_sub(b.bytes.len());
        let clock = &self.cfg.clock;
        if now >= clock.warmup_end {
            let us = now.saturating_duration_since(sent).as_micros() as u64;
            record_us(&mut self.stats.ack_batch_us, us);
            if us >= SLOW_US {
                keep_slowest(&mut self.stats.slowest_batch_acks, Slow { at_unix_ms: wall_now_us() / 1000, us });
            }
            // Intended times are non-decreasing within a batch, so runs of
            // equal latency (same ms bucket) are rare; record each.
            for &t in &b.intended {
                record_us_n(&mut self.stats.ack_record_us, now.saturating_duration_since(t).as_micros() as u64, 1);
            }
            self.stats.produced_records += b.records as u64;
            self.stats.produced_bytes += b.value_bytes;
        }
        let second = now.saturating_duration_since(clock.start).as_secs() as usize;
        self.stats.produced.add(second, b.records as u64, b.value_bytes);
        self.cfg.live.produced_records.fetch_add(b.records as u64, Ordering::Relaxed);
        self.cfg.live.produced_bytes.fetch_add(b.value_bytes, Ordering::Relaxed);
        self.cfg.live.produced_batch_bytes.fetch_add(b.bytes.len() as u64, Ordering::Relaxed);
        self.cfg.live.acked_total.fetch_add(b.records as u64, Ordering::Relaxed);
    }

    fn wait_and_read(
        &mut self,
        now: Instant,
        generating: bool,
        interval: &mut hdrhistogram::Histogram<u64>,
    ) -> anyhow::Result<()> {
        // Sleep until the next record is due, a batch lingers out, or a
        // socket is ready; never past 100 ms so the stop flag is seen.
        let mut until = now + Duration::from_millis(100);
        let has_open = self.open.iter().any(|o| o.is_some());
        if generating && !self.buffer_full() {
            until = until.min(self.pacer.next_due());
        }
        if has_open {
            until = until.min(self.next_linger_check);
        }
        let timeout = until.saturating_duration_since(now);
        let any_waiting = self.leaders.iter().any(|l| !l.in_flight.is_empty() || l.conn.wants_write());
        if any_waiting || !timeout.is_zero() {
            for li in poll_leaders(&mut self.leaders, timeout)? {
                self.handle_responses(li, interval)?;
            }
        }
        Ok(())
    }

    fn handle_responses(&mut self, li: usize, interval: &mut hdrhistogram::Histogram<u64>) -> anyhow::Result<()> {
        while let Some((now, inflight, codes)) = self.leaders[li].next_produce_response(self.version)? {
            for b in inflight.batches {
                let code = codes.get(b.partition);
                if code == 0 {
                    if now >= self.cfg.clock.warmup_end {
                        for &t in &b.intended {
                            record_us(interval, now.saturating_duration_since(t).as_micros() as u64);
                        }
                    }
                    self.acked(&b, inflight.sent, now);
                } else {
                    self.stats.count_error(code);
                    self.cfg.live.errors.fetch_add(1, Ordering::Relaxed);
                    if is_retriable(code) && b.attempts < self.cfg.spec.retries {
                        self.stats.retries += 1;
                        let mut b = b;
                        b.attempts += 1;
                        self.leaders[li].ready.push_front(b);
                        self.leaders[li].backoff_until = Some(now + RETRY_BACKOFF);
                    } else {
                        self.stats.failed_records += b.records as u64;
                        self.buffered_bytes = self.buffered_bytes.saturating_sub(b.bytes.len());
                    }
                }
            }
        }
        Ok(())
    }
}
