//! Broker configuration: one table of settings, Kafka's names where Kafka has
//! one. Sources, later wins: built-in default, `--config FILE`
//! (server.properties style), environment (`TIDELOG_` + name upper-cased,
//! `.` as `_`), command-line flags (`--name=value` or `--name value`).
//!
//! Read once by the main thread before the shards start; each shard gets an
//! `Arc<Config>` (shared read-only).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

/// One setting: its one definition, used for parsing, defaults and `--help`.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// Every setting tidelog reads.
pub const SETTINGS: &[Setting] = &[
    Setting { name: "log.dirs", default: "./tidelog-data", doc: "Data directories, comma-separated (one per disk; each must support O_DIRECT: XFS recommended, ext4 accepted, tmpfs is refused). A new partition goes to the directory with the fewest partitions; the first also holds broker metadata. A directory that runs out of space refuses produces with KAFKA_STORAGE_ERROR until space is freed; one that returns an I/O error stays offline until restart, and the others keep working." },
    Setting { name: "listeners", default: "PLAINTEXT://127.0.0.1:9092", doc: "Client listener (PLAINTEXT://host:port): shard i listens on the same host at port + i. In a cluster, also the controller listener named by controller.listener.names, e.g. PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9192." },
    Setting { name: "advertised.listeners", default: "", doc: "Address advertised to clients in Metadata (shard i at port + i). Empty: same as listeners." },
    Setting { name: "num.shards", default: "0", doc: "Number of shards (pinned cores). 0 = one per CPU in the process affinity mask." },
    Setting { name: "num.partitions", default: "1", doc: "Partitions of an auto-created topic, and of CreateTopics with num_partitions = -1." },
    Setting { name: "default.replication.factor", default: "1", doc: "Replication factor of topics created without one (auto-created, or CreateTopics with -1). At most the number of nodes in the cluster; 1 on a single node." },
    Setting { name: "node.id", default: "0", doc: "This node's id in a cluster (0..=999). Each shard is a Kafka broker to clients with broker id node.id x 1000 + shard, so a single node keeps broker ids 0..num.shards." },
    Setting { name: "process.roles", default: "", doc: "Empty: a single node with embedded metadata, as without a cluster. Otherwise broker, controller or broker,controller (KRaft's roles): controllers form the Raft metadata quorum (controller.quorum.voters); brokers serve clients." },
    Setting { name: "controller.quorum.voters", default: "", doc: "The controller quorum: id@host:port of every voter, comma separated (e.g. 1@127.0.0.1:9192,2@127.0.0.1:9193,3@127.0.0.1:9194). The same on every node. Required when process.roles is set." },
    Setting { name: "controller.quorum.bootstrap.servers", default: "", doc: "Accepted for KRaft compatibility: host:port of controllers; tidelog takes the voters from controller.quorum.voters, which must be set too." },
    Setting { name: "controller.listener.names", default: "CONTROLLER", doc: "Name of the listener in listeners that controllers serve the quorum on (Raft between voters, and registration, heartbeats and metadata for brokers)." },
    Setting { name: "controller.quorum.election.timeout.ms", default: "1000", doc: "A voter that hears no leader for a random time between this and twice this starts an election." },
    Setting { name: "controller.quorum.request.timeout.ms", default: "5000", doc: "How long a metadata change (CreateTopics, ...) waits for the quorum to commit it before failing with REQUEST_TIMED_OUT: a quorum that lost its majority refuses changes instead of splitting." },
    Setting { name: "broker.heartbeat.interval.ms", default: "2000", doc: "How often a node heartbeats to the controller leader." },
    Setting { name: "broker.session.timeout.ms", default: "9000", doc: "A node with no heartbeat for this long is fenced: it leaves Metadata and its partition leaderships move to in-sync replicas on other nodes." },
    Setting { name: "broker.rack", default: "", doc: "Rack of this node, advertised in Metadata. Replicas of one partition are always placed on distinct nodes." },
    Setting { name: "min.insync.replicas", default: "1", doc: "Default min.insync.replicas of topics: acks=all produce fails with NOT_ENOUGH_REPLICAS while the ISR is smaller." },
    Setting { name: "leader.replication.throttled.rate", default: "9223372036854775807", doc: "Bytes per second a leader broker (shard) sends to followers of the replicas listed in topics' leader.replication.throttled.replicas (reassignment throttle; dynamic, cluster-wide)." },
    Setting { name: "follower.replication.throttled.rate", default: "9223372036854775807", doc: "Bytes per second a follower broker (shard) fetches for the replicas listed in topics' follower.replication.throttled.replicas (reassignment throttle; dynamic, cluster-wide)." },
    Setting { name: "replica.lag.time.max.ms", default: "30000", doc: "A follower that has not caught up with the leader's log end for this long leaves the ISR." },
    Setting { name: "replica.high.watermark.checkpoint.interval.ms", default: "5000", doc: "How often each replicated partition's high watermark is written to replication-offset-checkpoint in its directory (and at clean shutdown); a restarted replica starts from it, not from its log end." },
    Setting { name: "unclean.leader.election.enable", default: "false", doc: "Default unclean.leader.election.enable: let a replica outside the ISR lead when no in-sync replica is alive (may lose acknowledged records)." },
    Setting { name: "offsets.topic.replication.factor", default: "3", doc: "Replication factor of __consumer_offsets in a cluster (capped at the nodes alive when it is created); 1 on a single node." },
    Setting { name: "auto.create.topics.enable", default: "true", doc: "Create a topic when Metadata or Produce names one that does not exist." },
    Setting { name: "log.segment.bytes", default: "1073741824", doc: "Roll the active segment when it would grow past this size." },
    Setting { name: "log.roll.ms", default: "604800000", doc: "Roll the active segment when its first record is older than this." },
    Setting { name: "log.index.interval.bytes", default: "4096", doc: "Bytes of log between two entries of the sparse offset and time indexes." },
    Setting { name: "log.preallocate.bytes", default: "33554432", doc: "Segment files are preallocated (fallocate) this far ahead of the write position." },
    Setting { name: "log.zero.ahead.bytes", default: "1048576", doc: "Small flush rounds (new bytes under a sixteenth of this) also write zeros up to this far past the log end, so the next rounds overwrite blocks the file system already wrote. A write into a preallocated (unwritten) extent needs an extent conversion, which ext4 and XFS will not do without blocking, so io_uring hands the write to an io-wq worker thread: at 20 MB/s that was every segment write, with outliers up to 15 ms; with zero-ahead none are, and the slowest write was 1-3 ms (bench/README.md). Costs up to one extra device write per byte at low rates (write amplification 1.19x -> 2.19x at 20 MB/s, 1.006x -> 1.06x unpaced). 0: off (for devices where wear matters more than the tail)." },
    Setting { name: "message.max.bytes", default: "1048588", doc: "Largest record batch a producer may send; larger gets MESSAGE_TOO_LARGE." },
    Setting { name: "socket.request.max.bytes", default: "104857600", doc: "Largest request frame; a larger length prefix closes the connection before anything is allocated." },
    Setting { name: "queued.max.request.bytes", default: "536870912", doc: "Bytes of request frames the broker holds while reading and dispatching them, split evenly across shards (Kafka's memory pool). A connection whose next frame does not fit waits before reading it, which pushes back on the client through TCP; a frame larger than a shard's share waits for all of it. -1: no limit." },
    Setting { name: "queued.max.requests", default: "500", doc: "Requests the broker holds read and not yet dispatched, split evenly across shards (at least 1 each), as Kafka's request queue: a frame is held from its length prefix until its handler starts (a Produce also waits there for log.unflushed.max.bytes). A connection whose next frame finds the shard's share full waits before reading it, which pushes back on the client through TCP." },
    Setting { name: "log.unflushed.max.bytes", default: "134217728", doc: "Record bytes a shard holds appended but not yet written to disk, per data directory (the accumulator). When a shard's online directories hold more, its connections wait before dispatching the next Produce, which pushes back on producers through TCP instead of growing memory when the disk is slower than the network. A directory that is offline (full) does not hold up the others. -1: no limit." },
    Setting { name: "max.connections", default: "10000", doc: "Connections accepted per shard; more are closed at accept with a log line." },
    Setting { name: "max.inflight.requests.per.connection", default: "64", doc: "Requests read ahead of their responses on one connection; the reader waits (back-pressure) beyond this." },
        Setting {
        name: "flush.writes.inflight.max",
        default: "32",
        doc: "Most O_DIRECT writes of one segment on the device at once in a flush (overridden by io-properties best_queue_depth).",
    },
    Setting {
        name: "fetch.cache.max.bytes",
        default: "0",
        doc: "Recent durable batches kept in memory per shard for tail fetches (oldest evicted first). 0 = 1/8 of memory per shard, at most 1 GiB.",
    },
    Setting {
        name: "fetch.sendfile.threads",
        default: "4",
        doc: "Send threads per shard for Fetch responses that read segment files (sendfile), so a page-cache miss never stalls a shard; also the most such responses a shard sends at once (more wait their turn). Separate from the threads that roll segments, so a consumer that stops reading never delays producers.",
    },
    Setting {
        name: "fetch.sendfile.priority",
        default: "idle",
        doc: "CPU and I/O priority of the send threads. idle: SCHED_IDLE and the idle I/O class, so catch-up reads use only CPU and disk time the shards (produce, acks, tail fetches) leave over; the I/O class takes effect under mq-deadline or bfq, not the none scheduler; low: nice 10, lowest best-effort I/O level (for disks written at their limit for long, where idle reads could wait seconds); normal: same as the shards.",
    },
    Setting {
        name: "fetch.sendfile.max.bytes.per.second",
        default: "0",
        doc: "Segment-file bytes all send threads of the broker together send per second, at most (one budget for every shard, as they share the disk): caps catch-up reads so produce and tail-fetch latency stay steady while a consumer reads a backlog. Responses served wholly from memory (tail reads) are never slowed; in a response that mixes both, only the file bytes count. 0 = no limit; else at least 1048576.",
    },
    Setting {
        name: "fetch.sendfile.writing.max.bytes.per.second",
        default: "200000000",
        doc: "While the log is being written (any shard flushed produced data in the last 100 ms), all send threads together send at most this many segment-file bytes per second, so a catch-up consumer leaves the disk to the writes and produce and tail latency stay where they are; when nothing is written, only fetch.sendfile.max.bytes.per.second applies and catch-up runs at the disk's speed. Raise it on disks that read much faster than the log is written (NVMe); 0 = no separate limit; else at least 1048576.",
    },
    Setting {
        name: "fetch.readahead.bytes",
        default: "131072",
        doc: "Cold bytes each send thread asks the kernel to read ahead of its sendfile (posix_fadvise WILLNEED in 128 KiB requests over the response's next file regions, across partitions). Bounds the disk reads a catch-up consumer keeps queued in front of the shards' writes and fdatasyncs to fetch.sendfile.threads x this per shard; larger reads faster from slow disks, smaller keeps produce latency steadier.",
    },
Setting { name: "fetch.max.wait.ms.max", default: "30000", doc: "Upper bound on a Fetch's max_wait_ms." },
    Setting { name: "flush.write.bytes.max", default: "1048576", doc: "Largest single O_DIRECT write the accumulator issues (overridden by io-properties best_write_block_bytes)." },
    Setting { name: "io.properties.file", default: "", doc: "io-properties.json written by `tidelog-tune iotune`. Empty: <log.dirs>/io-properties.json if present." },
    Setting { name: "io.memory.bytes", default: "2097152", doc: "Locked DMA memory per shard for glommio (min 524288). RLIMIT_MEMLOCK must cover num.shards x (this + 512 KiB)." },
    Setting { name: "log.level", default: "info", doc: "Log level: error, warn, info, debug, trace (RUST_LOG overrides)." },
    Setting { name: "metrics.listeners", default: "127.0.0.1:9644", doc: "host:port of the HTTP endpoint serving /metrics (Prometheus text) and /health, on shard 0. Empty disables it. If the port cannot be bound the broker logs an error and runs without it." },
    Setting { name: "log.retention.ms", default: "604800000", doc: "Default retention.ms: delete sealed segments whose newest record is older than this. -1 = keep forever." },
    Setting { name: "log.retention.bytes", default: "-1", doc: "Default retention.bytes: delete the oldest sealed segments while a partition is larger than this. -1 = no size limit." },
    Setting { name: "log.cleanup.policy", default: "delete", doc: "Default cleanup.policy: delete, compact, or compact,delete." },
    Setting { name: "log.message.timestamp.before.max.ms", default: "9223372036854775807", doc: "Default message.timestamp.before.max.ms: with CreateTime, a record whose timestamp is further than this in the past is refused (INVALID_TIMESTAMP, naming the record)." },
    Setting { name: "log.message.timestamp.after.max.ms", default: "3600000", doc: "Default message.timestamp.after.max.ms: with CreateTime, a record whose timestamp is further than this in the future is refused (INVALID_TIMESTAMP, naming the record). Kafka 4's default, one hour." },
    Setting { name: "log.message.timestamp.type", default: "CreateTime", doc: "Default message.timestamp.type: CreateTime (producer's) or LogAppendTime (broker's clock at append)." },
    Setting { name: "log.retention.check.interval.ms", default: "300000", doc: "How often each shard's retention task looks for segments to delete." },
    Setting { name: "log.retention.segments.per.check.max", default: "256", doc: "Pace of retention: segments a shard deletes per check at most; the rest wait for the next check." },
    Setting { name: "log.cleaner.backoff.ms", default: "15000", doc: "How often each shard's compaction task looks for compact topics with sealed segments to clean." },
    Setting { name: "log.cleaner.io.max.bytes.per.second", default: "104857600", doc: "Pace of compaction: bytes a shard's cleaner reads and writes per second at most." },
    Setting { name: "log.cleaner.min.cleanable.ratio", default: "0.5", doc: "Compaction starts on a log once its never-cleaned sealed bytes are at least this fraction of its cleanable bytes (Kafka's min.cleanable.dirty.ratio)." },
    Setting { name: "log.cleaner.dedupe.buffer.size", default: "134217728", doc: "Memory for compaction's key maps, for the whole broker (Kafka's setting): each shard's cleaner gets this divided by the number of shards, counted as key bytes plus per-entry overhead (hash table slot, allocation). A log whose keys do not fit is cleaned in several steps, each mapping as many records as fit; the result is the same." },
    Setting { name: "log.cleaner.delete.retention.ms", default: "86400000", doc: "Default delete.retention.ms: how long compaction keeps tombstones." },
    Setting { name: "log.cleaner.min.compaction.lag.ms", default: "0", doc: "Default min.compaction.lag.ms: records younger than this are never compacted." },
    Setting { name: "group.min.session.timeout.ms", default: "6000", doc: "Smallest session.timeout.ms a group member may ask for; smaller gets INVALID_SESSION_TIMEOUT." },
    Setting { name: "group.max.session.timeout.ms", default: "1800000", doc: "Largest session.timeout.ms a group member may ask for; larger gets INVALID_SESSION_TIMEOUT." },
    Setting { name: "group.initial.rebalance.delay.ms", default: "0", doc: "How long the first rebalance of an empty group waits for more members to join (Kafka's default is 3000; 0 answers the first member at once)." },
    Setting { name: "group.max.size", default: "1000", doc: "Members a consumer group may have; one more gets GROUP_MAX_SIZE_REACHED." },
    Setting { name: "offsets.retention.minutes", default: "10080", doc: "Committed offsets of a group that has been empty this long are deleted (with the group)." },
    Setting { name: "offset.metadata.max.bytes", default: "4096", doc: "Largest metadata string of a committed offset; larger gets OFFSET_METADATA_TOO_LARGE." },
    Setting { name: "producer.id.expiration.ms", default: "86400000", doc: "Idempotent producer state of a partition is dropped when the producer has not written to it for this long." },
    Setting { name: "transaction.max.timeout.ms", default: "900000", doc: "Largest transaction.timeout.ms a transactional producer may ask for; larger gets INVALID_TRANSACTION_TIMEOUT from InitProducerId." },
    Setting { name: "transaction.abort.timed.out.transaction.cleanup.interval.ms", default: "10000", doc: "How often each transaction coordinator aborts transactions open for longer than their timeout (their producer is fenced) and forgets idle transactional ids." },
    Setting { name: "transaction.partition.verification.enable", default: "true", doc: "KIP-890: before a transactional producer's first batch on a partition is appended, the partition leader asks the transaction coordinator (AddPartitionsToTxn verify_only) whether the partition is in that producer's open transaction, and refuses the batch (INVALID_TXN_STATE) when it is not, so a late or stray write cannot open a transaction no coordinator will ever end (a hanging transaction holds the last stable offset, and read_committed consumers, back forever)." },
    Setting { name: "transactional.id.expiration.ms", default: "604800000", doc: "A transactional id with no open transaction and no request for this long is forgotten (its state record is deleted)." },
    Setting { name: "transaction.state.log.replication.factor", default: "3", doc: "Replicas of each __transaction_state partition in a cluster (capped by the number of controller voters); the topic is created once that many nodes are alive. A single node uses 1." },
];

/// `log.dirs`: comma-separated, none empty, no duplicates, none inside another.
fn parse_log_dirs(value: &str) -> Result<Vec<PathBuf>, ConfigError> {
    let dirs: Vec<PathBuf> = value.split(',').map(|d| PathBuf::from(d.trim())).collect();
    if dirs.iter().any(|d| d.as_os_str().is_empty()) {
        return Err(ConfigError(format!(
            "log.dirs={value:?}: an entry is empty (give one or more paths, comma-separated)"
        )));
    }
    for (i, a) in dirs.iter().enumerate() {
        for b in &dirs[i + 1..] {
            if a == b || a.starts_with(b) || b.starts_with(a) {
                return Err(ConfigError(format!(
                    "log.dirs={value:?}: {} and {} overlap; each data directory must be separate",
                    a.display(),
                    b.display()
                )));
            }
        }
    }
    Ok(dirs)
}

/// A parse or validation failure, with what to do about it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The parsed configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The first of `log.dirs`: partitions, plus the broker's own metadata.
    pub log_dir: PathBuf,
    /// Every `log.dirs` entry, in order (`log_dir` is the first).
    pub log_dirs: Vec<PathBuf>,
    pub listen_addr: SocketAddr,
    pub advertised_host: String,
    pub advertised_port: u16,
    pub num_shards: usize,
    pub num_partitions: i32,
    pub default_replication_factor: i16,
    /// `node.id`.
    pub node_id: u32,
    /// Set when `process.roles` is: this node is part of a multi-node cluster.
    pub cluster: Option<ClusterConfig>,
    pub min_insync_replicas: i32,
    pub replica_lag_time_max_ms: u64,
    pub replica_high_watermark_checkpoint_interval_ms: u64,
    pub unclean_leader_election: bool,
    pub offsets_topic_replication_factor: i16,
    pub auto_create_topics: bool,
    pub segment_bytes: u64,
    pub roll_ms: u64,
    pub index_interval_bytes: u64,
    pub preallocate_bytes: u64,
    pub zero_ahead_bytes: u64,
    pub message_max_bytes: usize,
    pub request_max_bytes: usize,
    /// `queued.max.request.bytes`; `None` for -1 (no limit).
    pub queued_max_request_bytes: Option<u64>,
    /// `queued.max.requests`, for the whole broker.
    pub queued_max_requests: u64,
    /// `log.unflushed.max.bytes`; `None` for -1 (no limit).
    pub unflushed_max_bytes: Option<u64>,
    pub max_connections: usize,
    pub max_inflight_requests: usize,
    pub fetch_max_wait_ms_max: u64,
    pub fetch_cache_max_bytes: usize,
    pub flush_writes_inflight_max: usize,
    pub fetch_sendfile_threads: usize,
    pub fetch_sendfile_priority: SendPriority,
    pub fetch_readahead_bytes: u64,
    /// 0 = no limit.
    pub fetch_sendfile_max_bytes_per_second: u64,
    /// While the log is being written; 0 = no separate limit.
    pub fetch_sendfile_writing_max_bytes_per_second: u64,
    pub flush_write_bytes_max: usize,
    pub io_properties_file: Option<PathBuf>,
    pub io_memory_bytes: usize,
    pub log_level: String,
    /// `metrics.listeners`; `None` when disabled.
    pub metrics_addr: Option<SocketAddr>,
    pub retention_check_interval_ms: u64,
    pub retention_segments_per_check_max: usize,
    pub cleaner_backoff_ms: u64,
    pub cleaner_io_max_bytes_per_second: u64,
    pub cleaner_min_cleanable_ratio: f64,
    /// `log.cleaner.dedupe.buffer.size`: the broker's total; a shard's cleaner gets its share.
    pub cleaner_dedupe_buffer_bytes: usize,
    /// Every setting's final value and where it came from, for DescribeConfigs.
    pub values: BTreeMap<&'static str, (String, Source)>,
}

/// A node's part in a cluster (`process.roles` set).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub broker: bool,
    pub controller: bool,
    /// `controller.quorum.voters`: node id -> controller address.
    pub voters: BTreeMap<u32, SocketAddr>,
    /// This node's controller listener (a voter's).
    pub controller_listen: Option<SocketAddr>,
    pub election_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub session_timeout_ms: u64,
    pub rack: Option<String>,
}

/// Where a setting's value came from (DescribeConfigs reports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// What the command line asked for.
pub enum Command {
    Run(Box<Config>),
    Help,
    Version,
}

pub fn help_text() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "tidelog {} — Kafka-API streaming storage engine\n", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "USAGE: tidelog [--config FILE] [--SETTING=VALUE | --SETTING VALUE]...\n");
    let _ = writeln!(s, "Settings are read, later wins, from: defaults, --config FILE (server.properties");
    let _ = writeln!(s, "style: name=value lines, # comments), environment TIDELOG_<NAME> (upper case,");
    let _ = writeln!(s, "'.' as '_', e.g. TIDELOG_LOG_DIRS), then flags.\n");
    let _ = writeln!(s, "FLAGS:");
    let _ = writeln!(s, "  --config FILE    read settings from a server.properties-style file");
    let _ = writeln!(s, "  -h, --help       print this help");
    let _ = writeln!(s, "  -V, --version    print the version\n");
    let _ = writeln!(s, "SETTINGS (default in brackets):");
    for setting in SETTINGS {
        let _ = writeln!(s, "  --{} [{}]", setting.name, setting.default);
        let _ = writeln!(s, "      {}", setting.doc);
    }
    s
}

/// `fetch.sendfile.priority`: how the send threads yield to the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPriority {
    Idle,
    Low,
    Normal,
}

impl SendPriority {
    fn parse(v: &str) -> Result<SendPriority, ConfigError> {
        match v.trim() {
            "idle" => Ok(SendPriority::Idle),
            "low" => Ok(SendPriority::Low),
            "normal" => Ok(SendPriority::Normal),
            other => Err(ConfigError(format!("fetch.sendfile.priority={other:?}: expected idle, low or normal"))),
        }
    }
}

fn env_name(name: &str) -> String {
    format!("TIDELOG_{}", name.replace('.', "_").to_uppercase())
}

fn known(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Parses `name=value` lines; `#` and `!` start comments.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some((k, v)) = line.split_once(['=', ':']) else {
            return Err(ConfigError(format!("line {}: expected name=value, got {line:?}", i + 1)));
        };
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// Parses the command line (without `argv[0]`) and the environment.
pub fn from_args(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, ConfigError> {
    let mut values: BTreeMap<&'static str, (String, Source)> =
        SETTINGS.iter().map(|s| (s.name, (s.default.to_string(), Source::Default))).collect();
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut config_file: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(ConfigError(format!(
                "unexpected argument {arg:?}; settings are given as --name=value (see --help)"
            )));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                i += 1;
                let Some(v) = args.get(i) else {
                    return Err(ConfigError(format!("--{flag} needs a value (see --help)")));
                };
                (flag.to_string(), v.clone())
            }
        };
        if name == "config" {
            config_file = Some(value);
        } else {
            flags.push((name, value));
        }
        i += 1;
    }
    if let Some(path) = config_file {
        let text =
            std::fs::read_to_string(&path).map_err(|e| ConfigError(format!("cannot read --config {path}: {e}")))?;
        for (name, value) in parse_properties(&text)? {
            let setting = known(&name).ok_or_else(|| {
                ConfigError(format!("{path}: unknown setting {name:?} (tidelog --help lists every setting)"))
            })?;
            values.insert(setting.name, (value, Source::File));
        }
    }
    for setting in SETTINGS {
        if let Some(v) = env(&env_name(setting.name)) {
            values.insert(setting.name, (v, Source::Env));
        }
    }
    for (name, value) in flags {
        let setting = known(&name)
            .ok_or_else(|| ConfigError(format!("unknown setting --{name} (tidelog --help lists every setting)")))?;
        values.insert(setting.name, (value, Source::Flag));
    }
    Config::from_values(values).map(|c| Command::Run(Box::new(c)))
}

fn get<'a>(values: &'a BTreeMap<&'static str, (String, Source)>, name: &str) -> &'a str {
    values.get(name).map(|(v, _)| v.as_str()).unwrap_or("")
}

fn num<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    values: &BTreeMap<&'static str, (String, Source)>,
    name: &str,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let raw = get(values, name);
    let v: T = raw.trim().parse().map_err(|_| ConfigError(format!("{name}={raw:?} is not a valid number")))?;
    if v < min || v > max {
        return Err(ConfigError(format!("{name}={raw} is out of range [{min}, {max}]")));
    }
    Ok(v)
}

/// A cold-send rate (`fetch.sendfile.max.bytes.per.second`,
/// `fetch.sendfile.writing.max.bytes.per.second`): 0, or a rate at which one
/// 128 KiB send does not outlast the client stall timeout.
fn sendfile_rate(values: &BTreeMap<&'static str, (String, Source)>, name: &str) -> Result<u64, ConfigError> {
    let v = num(values, name, 0u64, 1 << 40)?;
    if v != 0 && v < SENDFILE_RATE_MIN {
        return Err(ConfigError(format!(
            "{name}={v} is too low: use 0 for no limit, or at least {SENDFILE_RATE_MIN} (1 MiB/s)"
        )));
    }
    Ok(v)
}

const SENDFILE_RATE_MIN: u64 = 1 << 20;

fn boolean(values: &BTreeMap<&'static str, (String, Source)>, name: &str) -> Result<bool, ConfigError> {
    match get(values, name).trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ConfigError(format!("{name}={other:?} must be true or false"))),
    }
}

/// One `NAME://host:port` entry of `listeners` (a bare `host:port` is PLAINTEXT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// Parses a comma-separated `listeners` value. Every entry is PLAINTEXT or
/// the controller listener (`controller_name`); at most one of each.
pub fn parse_listeners(name: &str, raw: &str, controller_name: &str) -> Result<Vec<Listener>, ConfigError> {
    let mut out: Vec<Listener> = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (proto, addr) = match entry.split_once("://") {
            Some((proto, rest)) => (proto.to_ascii_uppercase(), rest),
            None => ("PLAINTEXT".to_string(), entry),
        };
        if proto != "PLAINTEXT" && !proto.eq_ignore_ascii_case(controller_name) {
            return Err(ConfigError(format!(
                "{name}: only PLAINTEXT listeners (and the controller listener {controller_name}) are supported, got {proto}"
            )));
        }
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(ConfigError(format!("{name}={raw:?}: expected PLAINTEXT://host:port")));
        };
        let port: u16 = port.parse().map_err(|_| ConfigError(format!("{name}={raw:?}: bad port in {entry:?}")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        if out.iter().any(|l| l.name == proto) {
            return Err(ConfigError(format!("{name}={raw:?}: listener {proto} is given twice")));
        }
        out.push(Listener { name: proto, host: host.to_string(), port });
    }
    Ok(out)
}

/// Parses `PLAINTEXT://host:port` (or `host:port`): the client listener of a
/// `listeners` value.
pub fn parse_listener(name: &str, raw: &str) -> Result<(String, u16), ConfigError> {
    let all = parse_listeners(name, raw, "CONTROLLER")?;
    all.into_iter()
        .find(|l| l.name == "PLAINTEXT")
        .map(|l| (l.host, l.port))
        .ok_or_else(|| ConfigError(format!("{name}={raw:?}: no PLAINTEXT://host:port listener for clients")))
}

fn resolve(name: &str, host: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    format!("{host}:{port}")
        .parse()
        .or_else(|_| std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok().and_then(|mut a| a.next()).ok_or(()))
        .map_err(|_| ConfigError(format!("{name}: cannot resolve host {host:?}")))
}

/// Resolves a broker's advertised `host:port` (replica fetchers, at run time).
pub fn resolve_addr(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    resolve("broker endpoint", host, port).map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.0))
}

/// `controller.quorum.voters`: `id@host:port,...`.
pub fn parse_voters(raw: &str) -> Result<BTreeMap<u32, SocketAddr>, ConfigError> {
    let mut voters = BTreeMap::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || {
            ConfigError(format!(
                "controller.quorum.voters: {entry:?} is not id@host:port (e.g. 1@127.0.0.1:9192,2@127.0.0.1:9193,3@127.0.0.1:9194)"
            ))
        };
        let (id, addr) = entry.split_once('@').ok_or_else(bad)?;
        let id: u32 = id.trim().parse().map_err(|_| bad())?;
        if id > NODE_ID_MAX {
            return Err(ConfigError(format!("controller.quorum.voters: node id {id} is above {NODE_ID_MAX}")));
        }
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let addr = resolve("controller.quorum.voters", host.trim_start_matches('[').trim_end_matches(']'), port)?;
        if voters.insert(id, addr).is_some() {
            return Err(ConfigError(format!("controller.quorum.voters: node id {id} is listed twice")));
        }
    }
    Ok(voters)
}

/// Largest `node.id`: broker ids are node.id x 1000 + shard and must fit Kafka's int32.
pub const NODE_ID_MAX: u32 = 999;

fn cluster_config(
    values: &BTreeMap<&'static str, (String, Source)>,
    node_id: u32,
    listeners: &[Listener],
    controller_name: &str,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let roles_raw = get(values, "process.roles").trim().to_ascii_lowercase();
    let voters_raw = get(values, "controller.quorum.voters");
    if roles_raw.is_empty() {
        if !voters_raw.trim().is_empty() {
            return Err(ConfigError(
                "controller.quorum.voters is set but process.roles is not: set process.roles=broker,controller (or broker) to join a cluster, or drop the voters for a single node".into(),
            ));
        }
        return Ok(None);
    }
    let (mut broker, mut controller) = (false, false);
    for role in roles_raw.split(',').map(str::trim) {
        match role {
            "broker" => broker = true,
            "controller" => controller = true,
            other => {
                return Err(ConfigError(format!(
                    "process.roles: unknown role {other:?}; expected broker, controller or broker,controller"
                )))
            }
        }
    }
    let voters = parse_voters(voters_raw)?;
    if voters.is_empty() {
        return Err(ConfigError(
            "process.roles is set but controller.quorum.voters is empty: list every controller as id@host:port".into(),
        ));
    }
    let controller_listen = match listeners.iter().find(|l| l.name.eq_ignore_ascii_case(controller_name)) {
        Some(l) => Some(resolve("listeners", &l.host, l.port)?),
        None => None,
    };
    if controller {
        if !voters.contains_key(&node_id) {
            return Err(ConfigError(format!(
                "node.id={node_id} has the controller role but is not in controller.quorum.voters ({}): add it, or drop controller from process.roles",
                voters.keys().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        if controller_listen.is_none() {
            return Err(ConfigError(format!(
                "process.roles has controller but listeners has no {controller_name}://host:port entry (controller.listener.names={controller_name})"
            )));
        }
    }
    let rack = get(values, "broker.rack").trim();
    Ok(Some(ClusterConfig {
        broker,
        controller,
        voters,
        controller_listen: if controller { controller_listen } else { None },
        election_timeout_ms: num(values, "controller.quorum.election.timeout.ms", 100u64, 600_000)?,
        request_timeout_ms: num(values, "controller.quorum.request.timeout.ms", 100u64, 600_000)?,
        heartbeat_interval_ms: num(values, "broker.heartbeat.interval.ms", 10u64, 600_000)?,
        session_timeout_ms: num(values, "broker.session.timeout.ms", 100u64, 3_600_000)?,
        rack: if rack.is_empty() { None } else { Some(rack.to_string()) },
    }))
}

/// `metrics.listeners`: empty disables; `host:port` or `http://host:port`.
fn parse_metrics_addr(raw: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    let addr = raw.strip_prefix("http://").unwrap_or(raw).trim_end_matches('/');
    std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut a| a.next())
        .map(Some)
        .ok_or_else(|| ConfigError(format!("metrics.listeners={raw:?}: expected host:port, or empty to disable")))
}

impl Config {
    fn from_values(values: BTreeMap<&'static str, (String, Source)>) -> Result<Config, ConfigError> {
        let controller_name = get(&values, "controller.listener.names").trim().to_ascii_uppercase();
        if controller_name.is_empty() || controller_name.contains(',') || controller_name == "PLAINTEXT" {
            return Err(ConfigError(format!(
                "controller.listener.names={controller_name:?}: give one listener name other than PLAINTEXT (e.g. CONTROLLER)"
            )));
        }
        let listeners = parse_listeners("listeners", get(&values, "listeners"), &controller_name)?;
        let (host, port) = listeners
            .iter()
            .find(|l| l.name == "PLAINTEXT")
            .map(|l| (l.host.clone(), l.port))
            .ok_or_else(|| ConfigError("listeners: no PLAINTEXT://host:port listener for clients".into()))?;
        let listen_addr = resolve("listeners", &host, port)?;
        let advertised = get(&values, "advertised.listeners");
        let (advertised_host, advertised_port) = if advertised.trim().is_empty() {
            let h = if listen_addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { host.clone() };
            (h, port)
        } else {
            let all = parse_listeners("advertised.listeners", advertised, &controller_name)?;
            all.into_iter().find(|l| l.name == "PLAINTEXT").map(|l| (l.host, l.port)).ok_or_else(|| {
                ConfigError(format!("advertised.listeners={advertised:?}: no PLAINTEXT://host:port entry"))
            })?
        };
        let node_id = num(&values, "node.id", 0u32, NODE_ID_MAX)?;
        let cluster = cluster_config(&values, node_id, &listeners, &controller_name)?;
        let default_replication_factor = num(&values, "default.replication.factor", 1i16, 32)?;
        if cluster.is_none() && default_replication_factor != 1 {
            return Err(ConfigError(format!(
                "default.replication.factor={default_replication_factor} needs a cluster: a single node (no process.roles) has one replica of each partition"
            )));
        }
        // The broker defaults of topic configs (log.retention.ms, ...) are
        // checked as a topic's own value would be, so a typo is a start-up
        // error rather than a silent fall-back to the built-in default.
        for def in crate::topic_config::TOPIC_CONFIGS.iter().filter(|d| !d.broker.is_empty()) {
            if let Some((value, source)) = values.get(def.broker) {
                if *source != Source::Default {
                    crate::topic_config::validate_value(def, def.broker, value).map_err(ConfigError)?;
                }
            }
        }
        // Read where they are used (`txn::Settings`); checked here so a bad
        // value is a start-up error.
        num(&values, "transaction.max.timeout.ms", 1i64, i32::MAX as i64)?;
        num(&values, "transaction.abort.timed.out.transaction.cleanup.interval.ms", 1i64, i32::MAX as i64)?;
        num(&values, "transactional.id.expiration.ms", 1i64, i32::MAX as i64)?;
        num(&values, "transaction.state.log.replication.factor", 1i16, 32)?;
        boolean(&values, "transaction.partition.verification.enable")?;
        let log_dirs = parse_log_dirs(get(&values, "log.dirs"))?;
        let io_properties = get(&values, "io.properties.file").trim();
        let cfg = Config {
            log_dir: log_dirs[0].clone(),
            log_dirs,
            listen_addr,
            advertised_host,
            advertised_port,
            num_shards: num(&values, "num.shards", 0usize, 1024)?,
            num_partitions: num(&values, "num.partitions", 1i32, 100_000)?,
            default_replication_factor,
            node_id,
            cluster,
            min_insync_replicas: num(&values, "min.insync.replicas", 1i32, 32)?,
            replica_lag_time_max_ms: num(&values, "replica.lag.time.max.ms", 100u64, 3_600_000)?,
            replica_high_watermark_checkpoint_interval_ms: num(
                &values,
                "replica.high.watermark.checkpoint.interval.ms",
                10u64,
                86_400_000,
            )?,
            unclean_leader_election: boolean(&values, "unclean.leader.election.enable")?,
            offsets_topic_replication_factor: num(&values, "offsets.topic.replication.factor", 1i16, 32)?,
            auto_create_topics: boolean(&values, "auto.create.topics.enable")?,
            segment_bytes: num(&values, "log.segment.bytes", 14u64, 1 << 40)?,
            roll_ms: num(&values, "log.roll.ms", 1u64, u64::MAX / 2)?,
            index_interval_bytes: num(&values, "log.index.interval.bytes", 0u64, 1 << 30)?,
            preallocate_bytes: num(&values, "log.preallocate.bytes", 0u64, 1 << 34)?,
            zero_ahead_bytes: num(&values, "log.zero.ahead.bytes", 0u64, 1 << 30)?,
            message_max_bytes: num(&values, "message.max.bytes", 61usize, 1 << 30)?,
            request_max_bytes: num(&values, "socket.request.max.bytes", 1024usize, i32::MAX as usize)?,
            queued_max_requests: num(&values, "queued.max.requests", 1u64, 1 << 30)?,
            queued_max_request_bytes: match num(&values, "queued.max.request.bytes", -1i64, 1 << 50)? {
                -1 => None,
                n if n >= 65536 => Some(n as u64),
                n => {
                    return Err(ConfigError(format!(
                        "queued.max.request.bytes={n}: give -1 (no limit) or at least 65536"
                    )))
                }
            },
            unflushed_max_bytes: match num(&values, "log.unflushed.max.bytes", -1i64, 1 << 50)? {
                -1 => None,
                n if n >= 65536 => Some(n as u64),
                n => {
                    return Err(ConfigError(format!(
                        "log.unflushed.max.bytes={n}: give -1 (no limit) or at least 65536"
                    )))
                }
            },
            max_connections: num(&values, "max.connections", 1usize, 1 << 20)?,
            max_inflight_requests: num(&values, "max.inflight.requests.per.connection", 1usize, 4096)?,
            fetch_max_wait_ms_max: num(&values, "fetch.max.wait.ms.max", 0u64, 3_600_000)?,
            fetch_cache_max_bytes: num(&values, "fetch.cache.max.bytes", 0usize, 1 << 40)?,
            flush_writes_inflight_max: num(&values, "flush.writes.inflight.max", 1usize, 4096)?,
            fetch_sendfile_threads: num(&values, "fetch.sendfile.threads", 1usize, 256)?,
            fetch_sendfile_priority: SendPriority::parse(get(&values, "fetch.sendfile.priority"))?,
            fetch_readahead_bytes: num(&values, "fetch.readahead.bytes", 4096u64, 1 << 30)?,
            fetch_sendfile_max_bytes_per_second: sendfile_rate(&values, "fetch.sendfile.max.bytes.per.second")?,
            fetch_sendfile_writing_max_bytes_per_second: sendfile_rate(
                &values,
                "fetch.sendfile.writing.max.bytes.per.second",
            )?,
            flush_write_bytes_max: num(&values, "flush.write.bytes.max", 4096usize, 64 << 20)?,
            io_properties_file: if io_properties.is_empty() { None } else { Some(PathBuf::from(io_properties)) },
            io_memory_bytes: num(&values, "io.memory.bytes", 512 * 1024usize, 1 << 30)?,
            log_level: get(&values, "log.level").to_string(),
            metrics_addr: parse_metrics_addr(get(&values, "metrics.listeners"))?,
            retention_check_interval_ms: num(&values, "log.retention.check.interval.ms", 1u64, 86_400_000)?,
            retention_segments_per_check_max: num(&values, "log.retention.segments.per.check.max", 1usize, 1 << 20)?,
            cleaner_backoff_ms: num(&values, "log.cleaner.backoff.ms", 1u64, 86_400_000)?,
            cleaner_io_max_bytes_per_second: num(&values, "log.cleaner.io.max.bytes.per.second", 4096u64, 1 << 40)?,
            cleaner_min_cleanable_ratio: num(&values, "log.cleaner.min.cleanable.ratio", 0.0f64, 1.0)?,
            cleaner_dedupe_buffer_bytes: num(&values, "log.cleaner.dedupe.buffer.size", 65536usize, 1 << 40)?,
            values,
        };
        Ok(cfg)
    }

    /// Shard `i`'s listen address.
    pub fn shard_listen_addr(&self, shard: usize) -> Result<SocketAddr, ConfigError> {
        let port = self.listen_addr.port() as usize + shard;
        let port = u16::try_from(port).map_err(|_| {
            ConfigError(format!("listeners port + shard {shard} exceeds 65535: lower the port or num.shards"))
        })?;
        Ok(SocketAddr::new(self.listen_addr.ip(), port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match from_args(&args, &|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))? {
            Command::Run(c) => Ok(*c),
            _ => panic!("not a run"),
        }
    }

    #[test]
    fn defaults_work_out_of_the_box() {
        let c = run(&[], &[]).unwrap();
        assert_eq!(c.log_dir, PathBuf::from("./tidelog-data"));
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:9092");
        assert_eq!((c.advertised_host.as_str(), c.advertised_port), ("127.0.0.1", 9092));
        assert!(c.auto_create_topics);
        assert_eq!(c.message_max_bytes, 1048588);
        assert_eq!(c.values["log.dirs"].1, Source::Default);
    }

    #[test]
    fn sendfile_rate_is_off_or_at_least_a_mebibyte_a_second() {
        assert_eq!(run(&[], &[]).unwrap().fetch_sendfile_max_bytes_per_second, 0);
        let set = |v: &str| run(&[&format!("--fetch.sendfile.max.bytes.per.second={v}")], &[]);
        assert_eq!(set("104857600").unwrap().fetch_sendfile_max_bytes_per_second, 104857600);
        assert_eq!(set("0").unwrap().fetch_sendfile_max_bytes_per_second, 0);
        let e = set("1000").unwrap_err().0;
        assert!(e.contains("too low") && e.contains("0 for no limit"), "{e}");
        assert!(set("-5").is_err());
        // The writing limit: on by default, same rules.
        assert_eq!(run(&[], &[]).unwrap().fetch_sendfile_writing_max_bytes_per_second, 200_000_000);
        let set = |v: &str| run(&[&format!("--fetch.sendfile.writing.max.bytes.per.second={v}")], &[]);
        assert_eq!(set("0").unwrap().fetch_sendfile_writing_max_bytes_per_second, 0);
        let e = set("1000").unwrap_err().0;
        assert!(e.contains("fetch.sendfile.writing.max.bytes.per.second=1000 is too low"), "{e}");
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = std::env::temp_dir().join(format!("tidelog-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.properties");
        std::fs::write(&file, "# comment\nnum.partitions=3\nlog.segment.bytes = 1000\nmessage.max.bytes=5000\n")
            .unwrap();
        let c = run(
            &["--config", file.to_str().unwrap(), "--num.partitions=7", "--listeners", "PLAINTEXT://0.0.0.0:19092"],
            &[("TIDELOG_NUM_PARTITIONS", "5"), ("TIDELOG_LOG_SEGMENT_BYTES", "2000")],
        )
        .unwrap();
        assert_eq!(c.num_partitions, 7);
        assert_eq!(c.segment_bytes, 2000);
        assert_eq!(c.message_max_bytes, 5000);
        assert_eq!(c.values["message.max.bytes"].1, Source::File);
        assert_eq!(c.values["log.segment.bytes"].1, Source::Env);
        assert_eq!(c.listen_addr.port(), 19092);
        assert_eq!(c.advertised_host, "127.0.0.1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(run(&["--nope=1"], &[]).unwrap_err().0.contains("unknown setting --nope"));
        assert!(run(&["--num.partitions=x"], &[]).unwrap_err().0.contains("num.partitions"));
        assert!(run(&["--num.partitions"], &[]).unwrap_err().0.contains("needs a value"));
        assert!(run(&["--listeners=SSL://a:1"], &[]).unwrap_err().0.contains("PLAINTEXT"));
        assert!(run(&["--default.replication.factor=3"], &[]).unwrap_err().0.contains("needs a cluster"));
    }

    const VOTERS: &str = "--controller.quorum.voters=1@127.0.0.1:9192,2@127.0.0.1:9193,3@127.0.0.1:9194";

    #[test]
    fn cluster_roles_voters_and_listeners() {
        // No process.roles: a single node, as always.
        let c = run(&[], &[]).unwrap();
        assert!(c.cluster.is_none());
        assert_eq!(c.node_id, 0);
        let c = run(
            &[
                "--process.roles=broker,controller",
                "--node.id=2",
                VOTERS,
                "--listeners=PLAINTEXT://127.0.0.1:9093,CONTROLLER://127.0.0.1:9193",
                "--default.replication.factor=3",
            ],
            &[],
        )
        .unwrap();
        let cluster = c.cluster.as_ref().unwrap();
        assert!(cluster.broker && cluster.controller);
        assert_eq!(cluster.voters.len(), 3);
        assert_eq!(cluster.voters[&3].to_string(), "127.0.0.1:9194");
        assert_eq!(cluster.controller_listen.unwrap().to_string(), "127.0.0.1:9193");
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:9093");
        assert_eq!(c.default_replication_factor, 3);
        // A broker-only node needs no controller listener.
        let c = run(&["--process.roles=broker", "--node.id=7", VOTERS], &[]).unwrap();
        assert!(c.cluster.as_ref().is_some_and(|c| c.broker && !c.controller && c.controller_listen.is_none()));
    }

    #[test]
    fn cluster_config_errors_say_what_to_do() {
        let err = |args: &[&str]| run(args, &[]).unwrap_err().0;
        assert!(err(&[
            "--process.roles=broker,controller",
            "--node.id=4",
            VOTERS,
            "--listeners=PLAINTEXT://127.0.0.1:1,CONTROLLER://127.0.0.1:2"
        ])
        .contains("not in controller.quorum.voters"));
        assert!(err(&["--process.roles=controller", "--node.id=1", VOTERS]).contains("no CONTROLLER://"));
        assert!(err(&["--process.roles=broker"]).contains("controller.quorum.voters is empty"));
        assert!(err(&["--process.roles=leader", VOTERS]).contains("unknown role"));
        assert!(err(&[VOTERS]).contains("process.roles is not"));
        assert!(err(&["--process.roles=broker", "--controller.quorum.voters=1@x"]).contains("id@host:port"));
        assert!(err(&["--process.roles=broker", "--controller.quorum.voters=1@127.0.0.1:1,1@127.0.0.1:2"])
            .contains("listed twice"));
        assert!(err(&["--node.id=1000"]).contains("node.id"));
    }

    #[test]
    fn help_lists_every_setting_with_default() {
        let h = help_text();
        for s in SETTINGS {
            assert!(h.contains(&format!("--{} [{}]", s.name, s.default)), "{}", s.name);
        }
    }
}
