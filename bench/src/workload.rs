//! Workload definition: what to run, from a TOML file and/or command-line
//! flags (flags win). Plain data, validated once before any thread starts.
//!
//! ```toml
//! name = "fixed-rate-latency"
//! [topic]      name, partitions, replication_factor, create
//! [producer]   count, rate_records_per_s | rate_mb_per_s, record_size_bytes
//!              or record_size = { dist = "uniform", min_bytes, max_bytes },
//!              keys = "none" | "random" | "round-robin", key_count,
//!              acks = "all" | -1 | 1 | 0 (a number or a string),
//!              linger_ms, batch_size_bytes, compression, max_in_flight
//! [consumer]   count, groups, mode = "assigned" | "group", start, fetch_*,
//!              group mode: assignor = "range" | "roundrobin", group_id_prefix,
//!              session_timeout_ms, rebalance_timeout_ms, heartbeat_interval_ms,
//!              commit_interval_ms
//! [run]        duration_s | records, warmup_s, catch_up
//! ```

use serde::{Deserialize, Serialize};

use crate::util::Rng;

/// Bytes at the front of every value: send time (µs since the Unix epoch),
/// producer index, per-producer sequence. Records are never smaller.
pub const PAYLOAD_HEADER_BYTES: usize = 8 + 4 + 8;

/// The header of a value: `ts_us` (µs since the Unix epoch), `producer`,
/// `seq`, big-endian.
pub fn payload_header(ts_us: u64, producer: u32, seq: u64) -> [u8; PAYLOAD_HEADER_BYTES] {
    let mut header = [0u8; PAYLOAD_HEADER_BYTES];
    header[0..8].copy_from_slice(&ts_us.to_be_bytes());
    header[8..12].copy_from_slice(&producer.to_be_bytes());
    header[12..20].copy_from_slice(&seq.to_be_bytes());
    header
}

/// Random bytes the rest of every value is cut from: room for the largest
/// value `dist` draws at any of the 4096 offsets `payload_tail` uses.
pub fn payload_filler(dist: SizeDist, rng: &mut Rng) -> Vec<u8> {
    let mut filler = vec![0u8; dist.max_bytes() + 4096];
    rng.fill(&mut filler);
    filler
}

/// What follows the header in a `value_len`-byte value: `filler` from an
/// offset that moves with `n`, so consecutive values differ.
pub fn payload_tail(filler: &[u8], n: u64, value_len: usize) -> &[u8] {
    let offset = (n as usize * 7) % 4096;
    &filler[offset..offset + value_len - PAYLOAD_HEADER_BYTES]
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub name: String,
    pub description: String,
    pub topic: TopicSpec,
    pub producer: ProducerSpec,
    pub consumer: ConsumerSpec,
    pub run: RunSpec,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            name: "adhoc".into(),
            description: String::new(),
            topic: TopicSpec::default(),
            producer: ProducerSpec::default(),
            consumer: ConsumerSpec::default(),
            run: RunSpec::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSpec {
    /// Topic name; empty means `tidelog-bench-<workload name>`.
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i16,
    /// Create the topic with CreateTopics when it does not exist.
    pub create: bool,
}

impl Default for TopicSpec {
    fn default() -> Self {
        TopicSpec { name: String::new(), partitions: 6, replication_factor: 1, create: true }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KeyMode {
    /// No key: sticky partitioning.
    None,
    /// A uniformly random key out of `key_count`.
    Random,
    /// Keys 0, 1, ..., key_count-1, 0, ... per producer.
    RoundRobin,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    /// The attributes bits of a record batch.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum SizeDist {
    Fixed {
        bytes: usize,
    },
    Uniform {
        min_bytes: usize,
        max_bytes: usize,
    },
    /// Normal around `mean_bytes`, clamped to `[min_bytes, max_bytes]`.
    Normal {
        mean_bytes: usize,
        stddev_bytes: usize,
        min_bytes: usize,
        max_bytes: usize,
    },
}

impl SizeDist {
    /// The largest value length this draws.
    pub fn max_bytes(&self) -> usize {
        match *self {
            SizeDist::Fixed { bytes } => bytes,
            SizeDist::Uniform { max_bytes, .. } | SizeDist::Normal { max_bytes, .. } => max_bytes,
        }
    }

    /// Draws one value length.
    pub fn draw(&self, rng: &mut Rng) -> usize {
        match *self {
            SizeDist::Fixed { bytes } => bytes,
            SizeDist::Uniform { min_bytes, max_bytes } => {
                min_bytes + rng.below((max_bytes - min_bytes + 1) as u64) as usize
            }
            SizeDist::Normal { mean_bytes, stddev_bytes, min_bytes, max_bytes } => {
                let v = mean_bytes as f64 + rng.normal() * stddev_bytes as f64;
                (v.round().max(0.0) as usize).clamp(min_bytes, max_bytes)
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSpec {
    pub count: usize,
    /// Total target rate over all producers; 0 = as fast as possible.
    pub rate_records_per_s: f64,
    /// Total target rate in MB/s (10^6 bytes of value); 0 = unused.
    pub rate_mb_per_s: f64,
    pub record_size_bytes: usize,
    /// Overrides `record_size_bytes` with a distribution.
    pub record_size: Option<SizeDist>,
    pub keys: KeyMode,
    pub key_count: u64,
    /// -1 (all), 1 or 0; files may also write "all", "-1", "1", "0".
    #[serde(deserialize_with = "deserialize_acks")]
    pub acks: i16,
    pub linger_ms: u64,
    pub batch_size_bytes: usize,
    pub compression: Codec,
    pub max_in_flight: usize,
    /// Bytes a producer may hold in batches not yet acknowledged.
    pub buffer_memory_bytes: usize,
    pub request_timeout_ms: i32,
    pub retries: u32,
}

impl Default for ProducerSpec {
    fn default() -> Self {
        ProducerSpec {
            count: 1,
            rate_records_per_s: 0.0,
            rate_mb_per_s: 0.0,
            record_size_bytes: 1024,
            record_size: None,
            keys: KeyMode::None,
            key_count: 1000,
            acks: -1,
            linger_ms: 5,
            batch_size_bytes: 128 * 1024,
            compression: Codec::None,
            max_in_flight: 5,
            buffer_memory_bytes: 32 * 1024 * 1024,
            request_timeout_ms: 30_000,
            retries: 5,
        }
    }
}

/// acks as Kafka users write it: "all" or -1 (every in-sync replica), 1
/// (the leader), 0 (no response).
pub fn parse_acks(s: &str) -> Result<i16, String> {
    match s.trim() {
        v if v.eq_ignore_ascii_case("all") => Ok(-1),
        "-1" => Ok(-1),
        "1" => Ok(1),
        "0" => Ok(0),
        v => Err(format!("acks {v:?}: expected all, -1, 1 or 0")),
    }
}

/// `parse_acks` for workload files: a number or a string.
fn deserialize_acks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i16, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Acks {
        Number(i64),
        Text(String),
    }
    let text = match Acks::deserialize(d)? {
        Acks::Number(n) => n.to_string(),
        Acks::Text(t) => t,
    };
    parse_acks(&text).map_err(serde::de::Error::custom)
}

impl ProducerSpec {
    pub fn size_dist(&self) -> SizeDist {
        self.record_size.unwrap_or(SizeDist::Fixed { bytes: self.record_size_bytes })
    }

    /// Mean value size, for converting MB/s into records/s.
    pub fn mean_record_bytes(&self) -> f64 {
        match self.size_dist() {
            SizeDist::Fixed { bytes } => bytes as f64,
            SizeDist::Uniform { min_bytes, max_bytes } => (min_bytes + max_bytes) as f64 / 2.0,
            SizeDist::Normal { mean_bytes, .. } => mean_bytes as f64,
        }
    }

    /// Target records per second over all producers; 0 = unpaced.
    pub fn total_rate_records_per_s(&self) -> f64 {
        if self.rate_records_per_s > 0.0 {
            self.rate_records_per_s
        } else if self.rate_mb_per_s > 0.0 {
            self.rate_mb_per_s * 1e6 / self.mean_record_bytes().max(1.0)
        } else {
            0.0
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerMode {
    /// Partitions are split statically among a group's consumers.
    Assigned,
    /// Kafka consumer groups (FindCoordinator/JoinGroup/SyncGroup).
    Group,
}

/// How a group's leader spreads partitions over members (Kafka's
/// `partition.assignment.strategy`, classic protocol).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Assignor {
    /// Contiguous runs per member, the first `partitions % members` get one more.
    Range,
    /// Partitions dealt out one by one in member-id order.
    RoundRobin,
}

impl Assignor {
    /// The protocol name in JoinGroup, as Kafka's assignors call themselves.
    pub fn protocol_name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
        }
    }

    pub fn from_protocol_name(name: &str) -> Option<Assignor> {
        match name {
            "range" => Some(Assignor::Range),
            "roundrobin" => Some(Assignor::RoundRobin),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    Earliest,
    Latest,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerSpec {
    /// Consumers per group.
    pub count: usize,
    /// Independent groups, each reading every record (fan-out).
    pub groups: usize,
    pub mode: ConsumerMode,
    pub start: StartAt,
    pub fetch_max_wait_ms: i32,
    pub fetch_min_bytes: i32,
    pub fetch_max_bytes: i32,
    pub partition_max_bytes: i32,
    /// Check CRCs of fetched batches.
    pub check_crc: bool,
    /// Group mode: partition assignment strategy the leader uses.
    pub assignor: Assignor,
    /// Group mode: group ids are `<prefix>-<group index>`; empty means
    /// `tidelog-bench-<workload name>-<unix time>` (fresh groups, no old commits).
    pub group_id_prefix: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub heartbeat_interval_ms: u64,
    /// Group mode: how often positions are committed (auto.commit.interval.ms);
    /// they are also committed before every rebalance and at the end.
    pub commit_interval_ms: u64,
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        ConsumerSpec {
            count: 1,
            groups: 1,
            mode: ConsumerMode::Assigned,
            start: StartAt::Latest,
            fetch_max_wait_ms: 500,
            fetch_min_bytes: 1,
            fetch_max_bytes: 50 * 1024 * 1024,
            partition_max_bytes: 4 * 1024 * 1024,
            check_crc: true,
            assignor: Assignor::Range,
            group_id_prefix: String::new(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            heartbeat_interval_ms: 1_000,
            commit_interval_ms: 1_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Length of the measured run after warm-up; ignored when `records` > 0.
    pub duration_s: f64,
    /// Total records over all producers; 0 = run for `duration_s`.
    pub records: u64,
    /// Results during the first seconds are not recorded in histograms.
    pub warmup_s: f64,
    /// Produce everything first, then start consumers from the earliest offset.
    pub catch_up: bool,
    /// Give consumers this long after producers stop to drain the topic.
    pub drain_timeout_s: f64,
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec { duration_s: 30.0, records: 0, warmup_s: 5.0, catch_up: false, drain_timeout_s: 30.0 }
    }
}

impl Workload {
    pub fn from_toml(text: &str) -> anyhow::Result<Workload> {
        let w: Workload = toml::from_str(text)?;
        Ok(w)
    }

    pub fn topic_name(&self) -> String {
        if self.topic.name.is_empty() {
            format!("tidelog-bench-{}", self.name)
        } else {
            self.topic.name.clone()
        }
    }

    pub fn is_paced(&self) -> bool {
        self.producer.total_rate_records_per_s() > 0.0
    }

    /// Rejects workloads that cannot run, with a reason a user can act on.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.producer;
        anyhow::ensure!(self.topic.partitions > 0, "topic.partitions must be > 0");
        anyhow::ensure!(p.max_in_flight >= 1, "producer.max_in_flight must be >= 1");
        anyhow::ensure!(p.batch_size_bytes >= 1024, "producer.batch_size_bytes must be >= 1024");
        anyhow::ensure!(matches!(p.acks, -1..=1), "producer.acks must be -1, 0 or 1");
        anyhow::ensure!(p.key_count > 0 || p.keys == KeyMode::None, "producer.key_count must be > 0");
        let min = match p.size_dist() {
            SizeDist::Fixed { bytes } => bytes,
            SizeDist::Uniform { min_bytes, max_bytes } => {
                anyhow::ensure!(min_bytes <= max_bytes, "record_size.min_bytes > max_bytes");
                min_bytes
            }
            SizeDist::Normal { min_bytes, max_bytes, .. } => {
                anyhow::ensure!(min_bytes <= max_bytes, "record_size.min_bytes > max_bytes");
                min_bytes
            }
        };
        anyhow::ensure!(
            min >= PAYLOAD_HEADER_BYTES,
            "records must be at least {PAYLOAD_HEADER_BYTES} bytes (timestamp, producer, sequence)"
        );
        anyhow::ensure!(self.run.records > 0 || self.run.duration_s > 0.0, "set run.duration_s or run.records");
        anyhow::ensure!(self.producer.count > 0 || self.consumer.count > 0, "nothing to run");
        let c = &self.consumer;
        if c.mode == ConsumerMode::Group {
            anyhow::ensure!(
                c.heartbeat_interval_ms > 0 && (c.heartbeat_interval_ms as i64) < c.session_timeout_ms as i64,
                "consumer.heartbeat_interval_ms must be > 0 and below session_timeout_ms"
            );
            anyhow::ensure!(
                (1..=crate::client::BLOCKING_CALL_TIMEOUT_MS - 10_000).contains(&(c.rebalance_timeout_ms as u64)),
                "consumer.rebalance_timeout_ms must be 1..={} (a JoinGroup waits that long)",
                crate::client::BLOCKING_CALL_TIMEOUT_MS - 10_000
            );
            anyhow::ensure!(c.commit_interval_ms > 0, "consumer.commit_interval_ms must be > 0");
        }
        anyhow::ensure!(
            !(self.run.catch_up && self.producer.count == 0),
            "catch_up needs producers to fill the topic first"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_workloads_parse_and_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let w = Workload::from_toml(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            w.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(n >= 5, "expected the five shipped workloads, found {n}");
    }

    #[test]
    fn acks_take_every_kafka_spelling() {
        for (text, want) in [("all", -1), ("ALL", -1), ("-1", -1), ("1", 1), ("0", 0), (" all ", -1)] {
            assert_eq!(parse_acks(text), Ok(want), "{text:?}");
        }
        for bad in ["2", "-2", "leader", "", "1.0"] {
            let e = parse_acks(bad).unwrap_err();
            assert!(e.contains("expected all, -1, 1 or 0"), "{bad:?}: {e}");
        }
        // Workload files: numbers and strings alike.
        for (toml_value, want) in [("-1", -1), ("1", 1), ("0", 0), ("\"all\"", -1), ("\"-1\"", -1), ("\"0\"", 0)] {
            let w = Workload::from_toml(&format!("[producer]\nacks = {toml_value}\n")).unwrap();
            assert_eq!(w.producer.acks, want, "acks = {toml_value}");
        }
        let e = Workload::from_toml("[producer]\nacks = 2\n").unwrap_err();
        assert!(format!("{e:#}").contains("expected all, -1, 1 or 0"), "{e:#}");
        assert_eq!(Workload::from_toml("[producer]\ncount = 2\n").unwrap().producer.acks, -1, "default");
    }

    #[test]
    fn rate_in_mb_converts_to_records() {
        let mut w = Workload::default();
        w.producer.rate_mb_per_s = 20.0;
        w.producer.record_size_bytes = 1000;
        assert_eq!(w.producer.total_rate_records_per_s(), 20_000.0);
        assert!(w.is_paced());
    }

    #[test]
    fn size_distribution_parses() {
        let w = Workload::from_toml(
            "[producer]\nrecord_size = { dist = \"uniform\", min_bytes = 100, max_bytes = 300 }\nkeys = \"round-robin\"\n",
        )
        .unwrap();
        assert_eq!(w.producer.size_dist(), SizeDist::Uniform { min_bytes: 100, max_bytes: 300 });
        assert_eq!(w.producer.keys, KeyMode::RoundRobin);
        assert!(Workload::from_toml("[producer]\nbogus = 1\n").is_err());
    }
}
