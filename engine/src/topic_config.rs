//! Topic and dynamic broker configs: their one definition (name, broker
//! synonym, default, validation), how a value is resolved, and how Alter /
//! IncrementalAlterConfigs operations change a config map.
//!
//! Pure functions over the metadata image and the static `Config`, shared
//! read-only by every shard. The values themselves live in the image
//! (`TopicMeta.configs`, `MetadataImage.broker_configs`), which only the
//! controller on shard 0 changes, persists, and broadcasts; shards apply a
//! new image live (`Shard::apply_image` refreshes every log's settings).
//!
//! Resolution order, as Kafka reports it in DescribeConfigs synonyms:
//! ```text
//!  topic override (DYNAMIC_TOPIC_CONFIG)
//!   > dynamic broker default set by AlterConfigs on a broker (DYNAMIC_DEFAULT_BROKER_CONFIG)
//!   > static broker setting from file/env/flag (STATIC_BROKER_CONFIG)
//!   > built-in default (DEFAULT_CONFIG)
//! ```

use std::collections::BTreeMap;

use crate::config::{Config, Source};
use crate::metadata::{MetadataImage, TopicMeta};

/// DescribeConfigs config_source values.
pub const SOURCE_DYNAMIC_TOPIC: i8 = 1;
pub const SOURCE_DYNAMIC_BROKER: i8 = 2;
pub const SOURCE_DYNAMIC_DEFAULT_BROKER: i8 = 3;
pub const SOURCE_STATIC_BROKER: i8 = 4;
pub const SOURCE_DEFAULT: i8 = 5;

/// DescribeConfigs v3+ config_type values.
pub const TYPE_BOOLEAN: i8 = 1;
pub const TYPE_STRING: i8 = 2;
pub const TYPE_INT: i8 = 3;
pub const TYPE_LONG: i8 = 5;
pub const TYPE_DOUBLE: i8 = 6;
pub const TYPE_LIST: i8 = 7;

/// What values a config takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Long {
        min: i64,
    },
    Int {
        min: i64,
    },
    CleanupPolicy,
    TimestampType,
    Boolean,
    /// A ratio in [min, max].
    Double {
        min: f64,
        max: f64,
    },
    /// `producer`, `uncompressed`, `gzip`, `snappy`, `lz4` or `zstd`.
    CompressionType,
    /// An integer in [min, max], or `-1` where `default_allowed` (gzip's
    /// "the codec's default").
    Level {
        min: i64,
        max: i64,
        default_allowed: bool,
    },
    /// Kafka's throttled-replica list: empty, `*`, or `partition:broker,...`.
    ReplicaList,
    /// A boolean that can only be false here (`remote.storage.enable`:
    /// tidelog has no tiered storage).
    FalseOnly,
}

impl Kind {
    pub fn config_type(self) -> i8 {
        match self {
            Kind::Long { .. } => TYPE_LONG,
            Kind::Int { .. } => TYPE_INT,
            Kind::CleanupPolicy => TYPE_LIST,
            Kind::TimestampType | Kind::CompressionType => TYPE_STRING,
            Kind::Boolean | Kind::FalseOnly => TYPE_BOOLEAN,
            Kind::Double { .. } => TYPE_DOUBLE,
            Kind::Level { .. } => TYPE_INT,
            Kind::ReplicaList => TYPE_LIST,
        }
    }
}

/// One topic config: its Kafka name, the broker setting that gives its
/// default (empty when there is none), the built-in default, its kind.
pub struct TopicConfigDef {
    pub name: &'static str,
    pub broker: &'static str,
    pub default: &'static str,
    pub kind: Kind,
    pub doc: &'static str,
}

/// Every topic config tidelog understands.
pub const TOPIC_CONFIGS: &[TopicConfigDef] = &[
    TopicConfigDef {
        name: "cleanup.policy",
        broker: "log.cleanup.policy",
        default: "delete",
        kind: Kind::CleanupPolicy,
        doc: "delete, compact, or compact,delete.",
    },
    TopicConfigDef {
        name: "retention.ms",
        broker: "log.retention.ms",
        default: "604800000",
        kind: Kind::Long { min: -1 },
        doc: "Delete sealed segments whose newest record is older than this; -1 keeps forever.",
    },
    TopicConfigDef {
        name: "retention.bytes",
        broker: "log.retention.bytes",
        default: "-1",
        kind: Kind::Long { min: -1 },
        doc: "Delete the oldest sealed segments while the partition is larger; -1 = no limit.",
    },
    TopicConfigDef {
        name: "segment.bytes",
        broker: "log.segment.bytes",
        default: "1073741824",
        kind: Kind::Int { min: 14 },
        doc: "Roll the active segment at this size.",
    },
    TopicConfigDef {
        name: "segment.ms",
        broker: "log.roll.ms",
        default: "604800000",
        kind: Kind::Long { min: 1 },
        doc: "Roll the active segment when its first record is this old.",
    },
    TopicConfigDef {
        name: "max.message.bytes",
        broker: "message.max.bytes",
        default: "1048588",
        kind: Kind::Int { min: 0 },
        doc: "Largest record batch accepted.",
    },
    TopicConfigDef {
        name: "message.timestamp.type",
        broker: "log.message.timestamp.type",
        default: "CreateTime",
        kind: Kind::TimestampType,
        doc: "CreateTime or LogAppendTime.",
    },
    TopicConfigDef {
        name: "message.timestamp.before.max.ms",
        broker: "log.message.timestamp.before.max.ms",
        default: "9223372036854775807",
        kind: Kind::Long { min: 0 },
        doc: "With CreateTime: refuse records whose timestamp is further than this behind the broker's clock.",
    },
    TopicConfigDef {
        name: "message.timestamp.after.max.ms",
        broker: "log.message.timestamp.after.max.ms",
        default: "3600000",
        kind: Kind::Long { min: 0 },
        doc: "With CreateTime: refuse records whose timestamp is further than this ahead of the broker's clock.",
    },
    TopicConfigDef {
        name: "index.interval.bytes",
        broker: "log.index.interval.bytes",
        default: "4096",
        kind: Kind::Int { min: 0 },
        doc: "Bytes between sparse index entries.",
    },
    TopicConfigDef {
        name: "min.compaction.lag.ms",
        broker: "log.cleaner.min.compaction.lag.ms",
        default: "0",
        kind: Kind::Long { min: 0 },
        doc: "Records younger than this are never compacted.",
    },
    TopicConfigDef {
        name: "delete.retention.ms",
        broker: "log.cleaner.delete.retention.ms",
        default: "86400000",
        kind: Kind::Long { min: 0 },
        doc: "How long compaction keeps tombstones.",
    },
    // tidelog always fdatasyncs before data becomes visible (group commit), so
    // these can only be as strict as it already is: accepted, reported, and
    // the durability policy stays "sync before visible" whatever they say.
    TopicConfigDef {
        name: "flush.messages",
        broker: "",
        default: "1",
        kind: Kind::Long { min: 1 },
        doc: "Accepted for compatibility; tidelog syncs every group commit before data is visible.",
    },
    TopicConfigDef {
        name: "flush.ms",
        broker: "",
        default: "0",
        kind: Kind::Long { min: 0 },
        doc: "Accepted for compatibility; tidelog syncs every group commit before data is visible.",
    },
    TopicConfigDef {
        name: "min.insync.replicas",
        broker: "min.insync.replicas",
        default: "1",
        kind: Kind::Int { min: 1 },
        doc: "acks=all produce fails with NOT_ENOUGH_REPLICAS while fewer replicas than this are in sync (a single node has one).",
    },
    TopicConfigDef {
        name: "unclean.leader.election.enable",
        broker: "unclean.leader.election.enable",
        default: "false",
        kind: Kind::Boolean,
        doc: "When no in-sync replica is alive, the controller lets a live out-of-sync replica lead (records only the old ISR had may be lost).",
    },
    TopicConfigDef {
        name: "max.compaction.lag.ms",
        broker: "log.cleaner.max.compaction.lag.ms",
        default: "9223372036854775807",
        kind: Kind::Long { min: 1 },
        doc: "A compacted log whose oldest uncleaned record is older than this is cleaned whatever its dirty ratio, and its active segment rolls at this age.",
    },
    TopicConfigDef {
        name: "min.cleanable.dirty.ratio",
        broker: "log.cleaner.min.cleanable.ratio",
        default: "0.5",
        kind: Kind::Double { min: 0.0, max: 1.0 },
        doc: "Compaction starts when uncleaned bytes are at least this share of the cleanable bytes (or max.compaction.lag.ms is due).",
    },
    TopicConfigDef {
        name: "segment.jitter.ms",
        broker: "log.roll.jitter.ms",
        default: "0",
        kind: Kind::Long { min: 0 },
        doc: "Up to this much is taken off segment.ms for each segment (a fixed share per segment), so that partitions do not all roll at once.",
    },
    TopicConfigDef {
        name: "segment.index.bytes",
        broker: "log.index.size.max.bytes",
        default: "10485760",
        kind: Kind::Int { min: 4 },
        doc: "Largest offset index of a segment (8 bytes an entry); the segment rolls when it is full.",
    },
    TopicConfigDef {
        name: "preallocate",
        broker: "log.preallocate",
        default: "true",
        kind: Kind::Boolean,
        doc: "Preallocate segment files ahead of the data (fallocate, log.preallocate.bytes at a time). On by default in tidelog (Kafka: false): O_DIRECT appends into allocated blocks need no block allocation on the write path.",
    },
    TopicConfigDef {
        name: "file.delete.delay.ms",
        broker: "log.segment.delete.delay.ms",
        default: "60000",
        kind: Kind::Long { min: 0 },
        doc: "Accepted for compatibility. tidelog unlinks a removed segment at once: a fetch still reading it keeps its open file (Linux frees an unlinked file's blocks only when its last descriptor closes), which is what Kafka's delay protects.",
    },
    TopicConfigDef {
        name: "compression.type",
        broker: "compression.type",
        default: "producer",
        kind: Kind::CompressionType,
        doc: "producer keeps each batch as the producer compressed it; uncompressed, gzip, snappy, lz4 or zstd rewrite batches that arrive under another codec (records unchanged, at the codec's level below) before they are stored.",
    },
    TopicConfigDef {
        name: "compression.gzip.level",
        broker: "compression.gzip.level",
        default: "-1",
        kind: Kind::Level { min: 1, max: 9, default_allowed: true },
        doc: "gzip level when compression.type=gzip recompresses (-1: the codec's default).",
    },
    TopicConfigDef {
        name: "compression.lz4.level",
        broker: "compression.lz4.level",
        default: "9",
        kind: Kind::Level { min: 1, max: 17, default_allowed: false },
        doc: "lz4 level when compression.type=lz4 recompresses.",
    },
    TopicConfigDef {
        name: "compression.zstd.level",
        broker: "compression.zstd.level",
        default: "3",
        kind: Kind::Level { min: -131072, max: 22, default_allowed: false },
        doc: "zstd level when compression.type=zstd recompresses.",
    },
    TopicConfigDef {
        name: "leader.replication.throttled.replicas",
        broker: "",
        default: "",
        kind: Kind::ReplicaList,
        doc: "Replicas (partition:broker, or *) whose leader-side replication traffic is throttled to leader.replication.throttled.rate: a leader sends them nothing more in a second once that rate is spent.",
    },
    TopicConfigDef {
        name: "follower.replication.throttled.replicas",
        broker: "",
        default: "",
        kind: Kind::ReplicaList,
        doc: "Replicas (partition:broker, or *) whose follower-side replication traffic is throttled to follower.replication.throttled.rate: a follower leaves them out of its fetches once that rate is spent.",
    },
    TopicConfigDef {
        name: "remote.storage.enable",
        broker: "",
        default: "false",
        kind: Kind::FalseOnly,
        doc: "Tiered storage (KIP-405). tidelog keeps every segment on local disk: only false is accepted.",
    },
    TopicConfigDef {
        name: "local.retention.ms",
        broker: "log.local.retention.ms",
        default: "-2",
        kind: Kind::Long { min: -2 },
        doc: "Tiered storage only (-2: retention.ms). Without tiered storage all data is local and retention.ms applies.",
    },
    TopicConfigDef {
        name: "local.retention.bytes",
        broker: "log.local.retention.bytes",
        default: "-2",
        kind: Kind::Long { min: -2 },
        doc: "Tiered storage only (-2: retention.bytes). Without tiered storage all data is local and retention.bytes applies.",
    },
    TopicConfigDef {
        name: "remote.log.copy.disable",
        broker: "",
        default: "false",
        kind: Kind::Boolean,
        doc: "Tiered storage only; accepted, no effect without remote.storage.enable.",
    },
    TopicConfigDef {
        name: "remote.log.delete.on.disable",
        broker: "",
        default: "false",
        kind: Kind::Boolean,
        doc: "Tiered storage only; accepted, no effect without remote.storage.enable.",
    },
];

pub fn topic_def(name: &str) -> Option<&'static TopicConfigDef> {
    TOPIC_CONFIGS.iter().find(|d| d.name == name)
}

/// Broker settings that AlterConfigs may change at run time (cluster-wide
/// defaults of the topic configs above). Everything else is read-only.
pub fn broker_dynamic_def(name: &str) -> Option<&'static TopicConfigDef> {
    TOPIC_CONFIGS.iter().chain(BROKER_ONLY_DYNAMIC).find(|d| !d.broker.is_empty() && d.broker == name)
}

/// Broker settings that AlterConfigs may change at run time and that are
/// no topic config's default (`name` is empty).
const BROKER_ONLY_DYNAMIC: &[TopicConfigDef] = &[
    TopicConfigDef {
        name: "",
        broker: "leader.replication.throttled.rate",
        default: "9223372036854775807",
        kind: Kind::Long { min: 1 },
        doc: "",
    },
    TopicConfigDef {
        name: "",
        broker: "follower.replication.throttled.rate",
        default: "9223372036854775807",
        kind: Kind::Long { min: 1 },
        doc: "",
    },
];

/// The effective value of broker setting `name`: its dynamic value, else
/// the static one (file, environment, flag or built-in default).
pub fn broker_value(config: &Config, image: &MetadataImage, name: &str) -> Option<String> {
    broker_synonyms(config, image, name).into_iter().next().map(|r| r.value)
}

/// Checks `value` for config `def`.
pub fn validate_value(def: &TopicConfigDef, name: &str, value: &str) -> Result<(), String> {
    let int = |min: i64, max: i64| match value.trim().parse::<i64>() {
        Ok(v) if v >= min && v <= max => Ok(()),
        _ => Err(format!("invalid value {value:?} for {name}: must be an integer in [{min}, {max}]")),
    };
    match def.kind {
        Kind::Long { min } => int(min, i64::MAX),
        Kind::Int { min } => int(min, i32::MAX as i64),
        Kind::CleanupPolicy => {
            let items: Vec<&str> = value.split(',').map(str::trim).collect();
            if !items.is_empty() && items.iter().all(|i| *i == "delete" || *i == "compact") {
                Ok(())
            } else {
                Err(format!("invalid value {value:?} for {name}: must be delete, compact or compact,delete"))
            }
        }
        Kind::Boolean => match value.trim().to_ascii_lowercase().as_str() {
            "true" | "false" => Ok(()),
            _ => Err(format!("invalid value {value:?} for {name}: must be true or false")),
        },
        Kind::TimestampType => match value {
            "CreateTime" | "LogAppendTime" => Ok(()),
            _ => Err(format!("invalid value {value:?} for {name}: must be CreateTime or LogAppendTime")),
        },
        Kind::Double { min, max } => match value.trim().parse::<f64>() {
            Ok(v) if v >= min && v <= max => Ok(()),
            _ => Err(format!("invalid value {value:?} for {name}: must be a number in [{min}, {max}]")),
        },
        Kind::CompressionType => match value.trim() {
            "producer" | "uncompressed" | "gzip" | "snappy" | "lz4" | "zstd" => Ok(()),
            _ => Err(format!(
                "invalid value {value:?} for {name}: must be producer, uncompressed, gzip, snappy, lz4 or zstd"
            )),
        },
        Kind::Level { min, max, default_allowed } => match value.trim().parse::<i64>() {
            Ok(v) if (v >= min && v <= max) || (default_allowed && v == -1) => Ok(()),
            _ if default_allowed => Err(format!("invalid value {value:?} for {name}: must be -1 or in [{min}, {max}]")),
            _ => Err(format!("invalid value {value:?} for {name}: must be an integer in [{min}, {max}]")),
        },
        Kind::ReplicaList => {
            let v = value.trim();
            let pair = |item: &str| {
                let (p, b) = item.trim().split_once(':')?;
                (p.trim().parse::<i32>().ok()? >= 0 && b.trim().parse::<i32>().ok()? >= 0).then_some(())
            };
            if v.is_empty() || v == "*" || v.split(',').all(|item| pair(item).is_some()) {
                Ok(())
            } else {
                Err(format!(
                    "invalid value {value:?} for {name}: must be empty, * or a list of partition:broker (e.g. 0:1001,1:2001)"
                ))
            }
        }
        Kind::FalseOnly => match value.trim().to_ascii_lowercase().as_str() {
            "false" => Ok(()),
            "true" => Err(format!("{name}=true: tidelog has no tiered storage; every segment stays on local disk")),
            _ => Err(format!("invalid value {value:?} for {name}: must be false")),
        },
    }
}

/// Checks a topic config name and value.
pub fn validate_topic_config(name: &str, value: &str) -> Result<(), String> {
    let def = topic_def(name).ok_or_else(|| format!("unknown topic config {name:?}"))?;
    validate_value(def, name, value)
}

/// Checks a broker config change.
pub fn validate_broker_config(name: &str, value: &str) -> Result<(), String> {
    match broker_dynamic_def(name) {
        Some(def) => validate_value(def, name, value),
        None if crate::config::SETTINGS.iter().any(|s| s.name == name) => {
            Err(format!("broker config {name} is read-only at run time; change it in the config file and restart"))
        }
        None => Err(format!("unknown broker config {name:?}")),
    }
}

/// One resolved value and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    pub value: String,
    pub source: i8,
}

/// The static value of broker setting `broker` with its source.
fn static_broker(config: &Config, broker: &str) -> Option<Resolved> {
    let (v, src) = config.values.get(broker)?;
    let source = if *src == Source::Default { SOURCE_DEFAULT } else { SOURCE_STATIC_BROKER };
    Some(Resolved { name: broker.to_string(), value: v.clone(), source })
}

/// The value chain of a broker setting, highest precedence first.
pub fn broker_synonyms(config: &Config, image: &MetadataImage, broker: &str) -> Vec<Resolved> {
    let mut out = Vec::new();
    if let Some(v) = image.broker_configs.get(broker) {
        out.push(Resolved { name: broker.to_string(), value: v.clone(), source: SOURCE_DYNAMIC_DEFAULT_BROKER });
    }
    if let Some(r) = static_broker(config, broker) {
        if r.source == SOURCE_STATIC_BROKER {
            out.push(r.clone());
        }
        if let Some(s) = crate::config::SETTINGS.iter().find(|s| s.name == broker) {
            out.push(Resolved { name: broker.to_string(), value: s.default.to_string(), source: SOURCE_DEFAULT });
        }
    }
    out
}

/// The value chain of topic config `def` for `topic`, highest precedence
/// first; the first entry is the effective value.
pub fn topic_synonyms(
    config: &Config,
    image: &MetadataImage,
    topic: &TopicMeta,
    def: &TopicConfigDef,
) -> Vec<Resolved> {
    let mut out = Vec::new();
    if let Some(v) = topic.configs.get(def.name) {
        out.push(Resolved { name: def.name.to_string(), value: v.clone(), source: SOURCE_DYNAMIC_TOPIC });
    }
    if def.broker.is_empty() {
        out.push(Resolved { name: def.name.to_string(), value: def.default.to_string(), source: SOURCE_DEFAULT });
    } else {
        out.extend(broker_synonyms(config, image, def.broker));
        if out.is_empty() {
            out.push(Resolved { name: def.broker.to_string(), value: def.default.to_string(), source: SOURCE_DEFAULT });
        }
    }
    out
}

/// The effective value of topic config `name` for `topic`.
pub fn topic_value(config: &Config, image: &MetadataImage, topic: &TopicMeta, name: &str) -> String {
    match topic_def(name) {
        Some(def) => topic_synonyms(config, image, topic, def).into_iter().next().map(|r| r.value).unwrap_or_default(),
        None => topic.configs.get(name).cloned().unwrap_or_default(),
    }
}

/// `topic_value` parsed as an integer (the definition's default if the
/// stored value does not parse, which validation prevents).
pub fn topic_i64(config: &Config, image: &MetadataImage, topic: &TopicMeta, name: &str) -> i64 {
    let v = topic_value(config, image, topic, name);
    v.trim().parse().ok().or_else(|| topic_def(name).and_then(|d| d.default.parse().ok())).unwrap_or(0)
}

/// `topic_value` parsed as a number (the definition's default if the
/// stored value does not parse, which validation prevents).
pub fn topic_f64(config: &Config, image: &MetadataImage, topic: &TopicMeta, name: &str) -> f64 {
    let v = topic_value(config, image, topic, name);
    v.trim().parse().ok().or_else(|| topic_def(name).and_then(|d| d.default.parse().ok())).unwrap_or(0.0)
}

/// `topic_value` as a boolean.
pub fn topic_bool(config: &Config, image: &MetadataImage, topic: &TopicMeta, name: &str) -> bool {
    topic_value(config, image, topic, name).trim().eq_ignore_ascii_case("true")
}

/// Whether `cleanup.policy` contains `what` (delete or compact).
pub fn policy_has(config: &Config, image: &MetadataImage, topic: &TopicMeta, what: &str) -> bool {
    topic_value(config, image, topic, "cleanup.policy").split(',').any(|p| p.trim() == what)
}

/// IncrementalAlterConfigs operations (and AlterConfigs as "replace all").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigOp {
    Set(String, String),
    Delete(String),
    Append(String, String),
    Subtract(String, String),
}

impl ConfigOp {
    pub fn from_wire(op: i8, name: String, value: Option<String>) -> Result<ConfigOp, String> {
        let v = || value.clone().ok_or_else(|| format!("config {name}: operation {op} needs a value"));
        Ok(match op {
            0 => ConfigOp::Set(name.clone(), v()?),
            1 => ConfigOp::Delete(name),
            2 => ConfigOp::Append(name.clone(), v()?),
            3 => ConfigOp::Subtract(name.clone(), v()?),
            other => return Err(format!("config {name}: unknown operation {other}")),
        })
    }

    fn name(&self) -> &str {
        match self {
            ConfigOp::Set(n, _) | ConfigOp::Delete(n) | ConfigOp::Append(n, _) | ConfigOp::Subtract(n, _) => n,
        }
    }
}

/// A config change for one resource, as sent to the controller.
#[derive(Clone, Debug)]
pub struct ConfigChange {
    pub resource: ConfigResource,
    /// AlterConfigs: the ops are the complete new set (everything else is removed).
    pub replace: bool,
    pub ops: Vec<ConfigOp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigResource {
    Topic(String),
    /// Cluster-wide dynamic broker defaults.
    Broker,
}

/// Applies `ops` to `current` (the resource's dynamic configs), validating
/// every name and value. `effective` gives the current effective value of a
/// list config for APPEND/SUBTRACT on a config with no override yet.
pub fn apply_ops(
    current: &BTreeMap<String, String>,
    change: &ConfigChange,
    effective: &dyn Fn(&str) -> String,
) -> Result<BTreeMap<String, String>, String> {
    let validate = |name: &str, value: &str| match change.resource {
        ConfigResource::Topic(_) => validate_topic_config(name, value),
        ConfigResource::Broker => validate_broker_config(name, value),
    };
    let def_of = |name: &str| match change.resource {
        ConfigResource::Topic(_) => topic_def(name),
        ConfigResource::Broker => broker_dynamic_def(name),
    };
    let mut out = if change.replace { BTreeMap::new() } else { current.clone() };
    for op in &change.ops {
        let name = op.name();
        let Some(def) = def_of(name) else {
            // Kafka lets DELETE of an unknown key pass silently; we do too.
            if let ConfigOp::Delete(_) = op {
                continue;
            }
            return Err(validate(name, "").err().unwrap_or_else(|| format!("unknown config {name:?}")));
        };
        match op {
            ConfigOp::Set(n, v) => {
                validate(n, v)?;
                out.insert(n.clone(), v.trim().to_string());
            }
            ConfigOp::Delete(n) => {
                out.remove(n);
            }
            ConfigOp::Append(n, v) | ConfigOp::Subtract(n, v) => {
                if def.kind != Kind::CleanupPolicy {
                    return Err(format!("config {n} is not a list: APPEND and SUBTRACT apply to list configs only"));
                }
                let base = out.get(n).cloned().unwrap_or_else(|| effective(n));
                let mut items: Vec<String> =
                    base.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if matches!(op, ConfigOp::Append(..)) {
                        if !items.iter().any(|i| i == item) {
                            items.push(item.to_string());
                        }
                    } else {
                        items.retain(|i| i != item);
                    }
                }
                let joined = items.join(",");
                validate(n, &joined)?;
                out.insert(n.clone(), joined);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic_change(ops: Vec<ConfigOp>) -> ConfigChange {
        ConfigChange { resource: ConfigResource::Topic("t".into()), replace: false, ops }
    }

    #[test]
    fn ops_set_delete_append_subtract() {
        let mut cur = BTreeMap::new();
        cur.insert("retention.ms".to_string(), "1000".to_string());
        let eff = |_: &str| "delete".to_string();
        let out = apply_ops(
            &cur,
            &topic_change(vec![
                ConfigOp::Set("segment.bytes".into(), "4096".into()),
                ConfigOp::Delete("retention.ms".into()),
                ConfigOp::Append("cleanup.policy".into(), "compact".into()),
            ]),
            &eff,
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out["segment.bytes"], "4096");
        assert_eq!(out["cleanup.policy"], "delete,compact");
        let out2 =
            apply_ops(&out, &topic_change(vec![ConfigOp::Subtract("cleanup.policy".into(), "delete".into())]), &eff)
                .unwrap();
        assert_eq!(out2["cleanup.policy"], "compact");
        // Removing the last item leaves an invalid empty list.
        assert!(apply_ops(
            &out2,
            &topic_change(vec![ConfigOp::Subtract("cleanup.policy".into(), "compact".into())]),
            &eff
        )
        .is_err());
    }

    #[test]
    fn ops_reject_bad_names_values_and_list_ops_on_scalars() {
        let cur = BTreeMap::new();
        let eff = |_: &str| String::new();
        let err = |ops| apply_ops(&cur, &topic_change(ops), &eff).unwrap_err();
        assert!(err(vec![ConfigOp::Set("nope".into(), "1".into())]).contains("unknown"));
        assert!(err(vec![ConfigOp::Set("segment.bytes".into(), "10".into())]).contains("segment.bytes"));
        assert!(err(vec![ConfigOp::Set("retention.ms".into(), "abc".into())]).contains("retention.ms"));
        assert!(err(vec![ConfigOp::Set("message.timestamp.type".into(), "Now".into())]).contains("LogAppendTime"));
        assert!(err(vec![ConfigOp::Append("retention.ms".into(), "1".into())]).contains("not a list"));
        // DELETE of an unknown key is not an error (as in Kafka).
        assert!(apply_ops(&cur, &topic_change(vec![ConfigOp::Delete("nope".into())]), &eff).unwrap().is_empty());
    }

    #[test]
    fn replace_drops_unnamed_overrides_and_broker_configs_are_limited() {
        let mut cur = BTreeMap::new();
        cur.insert("retention.ms".to_string(), "1000".to_string());
        let change = ConfigChange {
            resource: ConfigResource::Topic("t".into()),
            replace: true,
            ops: vec![ConfigOp::Set("segment.ms".into(), "5000".into())],
        };
        let out = apply_ops(&cur, &change, &|_| String::new()).unwrap();
        assert_eq!(out.into_iter().collect::<Vec<_>>(), vec![("segment.ms".to_string(), "5000".to_string())]);
        let broker = |ops| ConfigChange { resource: ConfigResource::Broker, replace: false, ops };
        assert!(apply_ops(
            &cur,
            &broker(vec![ConfigOp::Set("log.retention.ms".into(), "5".into())]),
            &|_| String::new()
        )
        .is_ok());
        let e = apply_ops(&cur, &broker(vec![ConfigOp::Set("log.dirs".into(), "/x".into())]), &|_| String::new())
            .unwrap_err();
        assert!(e.contains("read-only"), "{e}");
    }

    #[test]
    fn resolution_follows_topic_then_dynamic_then_static_then_default() {
        let config = match crate::config::from_args(&["--log.segment.bytes=2048".to_string()], &|_| None) {
            Ok(crate::config::Command::Run(c)) => *c,
            _ => panic!("config"),
        };
        let mut image = MetadataImage::default();
        let mut topic = TopicMeta {
            name: "t".into(),
            id: String::new(),
            owners: vec![0],
            partitions: Vec::new(),
            configs: BTreeMap::new(),
        };
        let def = topic_def("segment.bytes").unwrap();
        let chain = topic_synonyms(&config, &image, &topic, def);
        assert_eq!(chain.iter().map(|r| r.source).collect::<Vec<_>>(), vec![SOURCE_STATIC_BROKER, SOURCE_DEFAULT]);
        assert_eq!(chain[0].value, "2048");
        assert_eq!(chain[0].name, "log.segment.bytes");
        image.broker_configs.insert("log.segment.bytes".into(), "4096".into());
        assert_eq!(topic_value(&config, &image, &topic, "segment.bytes"), "4096");
        topic.configs.insert("segment.bytes".into(), "8192".into());
        let chain = topic_synonyms(&config, &image, &topic, def);
        assert_eq!(
            chain.iter().map(|r| (r.source, r.value.as_str())).collect::<Vec<_>>(),
            vec![
                (SOURCE_DYNAMIC_TOPIC, "8192"),
                (SOURCE_DYNAMIC_DEFAULT_BROKER, "4096"),
                (SOURCE_STATIC_BROKER, "2048"),
                (SOURCE_DEFAULT, "1073741824")
            ]
        );
        assert_eq!(topic_value(&config, &image, &topic, "flush.messages"), "1");
        assert!(policy_has(&config, &image, &topic, "delete"));
        assert!(!policy_has(&config, &image, &topic, "compact"));
    }
}
