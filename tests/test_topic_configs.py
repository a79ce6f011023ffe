"""Every topic config of Kafka 4.x's documentation table ("Topic-Level
Configs", kafka.apache.org/40/documentation.html#topicconfigs) is accepted,
validated and described, and the ones that change storage behaviour take
effect. Names Kafka 4.0 removed (message.format.version,
message.downconversion.enable, message.timestamp.difference.max.ms) and
unknown names are INVALID_CONFIG, as in Kafka 4.x."""

import glob
import os
import time

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from clients import consume_confluent, produce_confluent
from conftest import unique_topic

# Kafka 4.x's table: name -> (a valid non-default value to set, Kafka's default).
KAFKA_4_TOPIC_CONFIGS = {
    "cleanup.policy": ("compact", "delete"),
    "compression.gzip.level": ("5", "-1"),
    "compression.lz4.level": ("12", "9"),
    "compression.type": ("producer", "producer"),
    "compression.zstd.level": ("7", "3"),
    "delete.retention.ms": ("1000", "86400000"),
    "file.delete.delay.ms": ("1000", "60000"),
    "flush.messages": ("10", "9223372036854775807"),
    "flush.ms": ("1000", "9223372036854775807"),
    "follower.replication.throttled.replicas": ("0:1000", ""),
    "index.interval.bytes": ("8192", "4096"),
    "leader.replication.throttled.replicas": ("*", ""),
    "local.retention.bytes": ("-2", "-2"),
    "local.retention.ms": ("-2", "-2"),
    "max.compaction.lag.ms": ("3600000", "9223372036854775807"),
    "max.message.bytes": ("2000000", "1048588"),
    "message.timestamp.after.max.ms": ("1000", "3600000"),
    "message.timestamp.before.max.ms": ("1000", "9223372036854775807"),
    "message.timestamp.type": ("LogAppendTime", "CreateTime"),
    "min.cleanable.dirty.ratio": ("0.25", "0.5"),
    "min.compaction.lag.ms": ("1000", "0"),
    "min.insync.replicas": ("1", "1"),
    "preallocate": ("false", "false"),
    "remote.log.copy.disable": ("false", "false"),
    "remote.log.delete.on.disable": ("false", "false"),
    "remote.storage.enable": ("false", "false"),
    "retention.bytes": ("1000000", "-1"),
    "retention.ms": ("100000", "604800000"),
    "segment.bytes": ("1048576", "1073741824"),
    "segment.index.bytes": ("4096", "10485760"),
    "segment.jitter.ms": ("1000", "0"),
    "segment.ms": ("100000", "604800000"),
    "unclean.leader.election.enable": ("true", "false"),
}

# Defaults where tidelog differs from Kafka on purpose (README "Topic configs").
DEFAULT_DIFFERENCES = {
    # Every group commit is fsync'd before it is visible: as strict as
    # flush.messages=1, whatever the setting says.
    "flush.messages": "1",
    "flush.ms": "0",
    # O_DIRECT appends into preallocated blocks allocate nothing on the write path.
    "preallocate": "true",
}

INVALID = {
    "compression.type": "brotli",
    "compression.gzip.level": "0",
    "compression.lz4.level": "18",
    "compression.zstd.level": "23",
    "min.cleanable.dirty.ratio": "1.5",
    "max.compaction.lag.ms": "0",
    "segment.index.bytes": "2",
    "segment.jitter.ms": "-1",
    "preallocate": "maybe",
    "leader.replication.throttled.replicas": "0-1000",
    "remote.storage.enable": "true",
    "local.retention.ms": "-3",
}

REMOVED_IN_KAFKA_4 = ["message.format.version", "message.downconversion.enable", "message.timestamp.difference.max.ms"]


def admin(broker):
    return AdminClient({"bootstrap.servers": broker.bootstrap})


def create(a, name, config=None, partitions=1):
    a.create_topics([NewTopic(name, partitions, 1, config=config or {})])[name].result(30)


def create_error(a, name, config):
    """The KafkaError of a CreateTopics that must fail."""
    with pytest.raises(KafkaException) as e:
        create(a, name, config)
    return e.value.args[0]


def describe(a, name):
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    return a.describe_configs([res])[res].result(30)


def test_every_kafka_4_topic_config_is_described_with_its_default(broker):
    a = admin(broker)
    name = unique_topic("cfgdefaults")
    create(a, name)
    described = describe(a, name)
    missing = sorted(set(KAFKA_4_TOPIC_CONFIGS) - set(described))
    assert missing == [], "DescribeConfigs lacks Kafka 4.x topic configs %r" % missing
    extra = sorted(set(described) - set(KAFKA_4_TOPIC_CONFIGS))
    assert extra == [], "DescribeConfigs lists configs Kafka 4.x does not have: %r" % extra
    wrong = {
        n: (described[n].value, DEFAULT_DIFFERENCES.get(n, default))
        for n, (_, default) in KAFKA_4_TOPIC_CONFIGS.items()
        if described[n].value != DEFAULT_DIFFERENCES.get(n, default)
    }
    assert wrong == {}, "defaults (got, want): %r" % wrong


def test_every_kafka_4_topic_config_can_be_set_and_is_described(broker):
    a = admin(broker)
    name = unique_topic("cfgset")
    config = {n: v for n, (v, _) in KAFKA_4_TOPIC_CONFIGS.items()}
    create(a, name, config)
    described = describe(a, name)
    got = {n: described[n].value for n in config}
    assert got == config
    assert all(described[n].source == ConfigResource.Type.TOPIC or described[n].source == 1 for n in config)


@pytest.mark.parametrize("config,value", sorted(INVALID.items()))
def test_invalid_values_are_invalid_config(broker, config, value):
    err = create_error(admin(broker), unique_topic("cfgbad"), {config: value})
    assert err.name() == "INVALID_CONFIG", err
    assert config in err.str(), err


@pytest.mark.parametrize("config", REMOVED_IN_KAFKA_4 + ["no.such.config"])
def test_removed_and_unknown_names_are_invalid_config(broker, config):
    err = create_error(admin(broker), unique_topic("cfgunknown"), {config: "1"})
    assert err.name() == "INVALID_CONFIG", err


def test_segment_index_bytes_rolls_the_segment_when_its_index_is_full(broker):
    """4 entries of 8 bytes, one entry per 4096 bytes of batches: a segment
    holds about 5 x 4 KB batches, so 100 of them need many segments, and
    every record reads back in order."""
    a = admin(broker)
    name = unique_topic("cfgindex")
    create(a, name, {"segment.index.bytes": "32"})
    records = [(b"k%d" % i, b"v%04d" % i + b"x" * 4000) for i in range(100)]
    produce_confluent(broker, name, records, **{"linger.ms": 0, "batch.size": 4200})
    logs = glob.glob(os.path.join(broker.log_dirs, "%s-0" % name, "*.log"))
    assert len(logs) >= 10, logs
    got = consume_confluent(broker, name, {0: 100})[0]
    assert [(o, k, v) for o, k, v in got] == [(i, k, v) for i, (k, v) in enumerate(records)]


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_preallocate_false_allocates_only_what_is_written(broker):
    a = admin(broker)
    on, off = unique_topic("cfgprealloc"), unique_topic("cfgnoprealloc")
    create(a, on)
    create(a, off, {"preallocate": "false"})
    for t in (on, off):
        produce_confluent(broker, t, [(b"k", b"x" * 1000) for _ in range(50)])
    (on_log,) = glob.glob(os.path.join(broker.log_dirs, "%s-0" % on, "*.log"))
    (off_log,) = glob.glob(os.path.join(broker.log_dirs, "%s-0" % off, "*.log"))
    # log.preallocate.bytes is 32 MiB by default; zero-ahead writes at most
    # 1 MiB past the data, which both have.
    assert allocated_bytes(on_log) >= 16 << 20, allocated_bytes(on_log)
    assert allocated_bytes(off_log) <= 4 << 20, allocated_bytes(off_log)


def test_max_compaction_lag_rolls_and_compacts_a_quiet_log(broker_factory):
    """KIP-354: with max.compaction.lag.ms=1500 the active segment of a
    compacted topic rolls once it is that old (segment.ms is a week), so the
    cleaner reaches and compacts its records; the same topic without it keeps
    every duplicate."""
    b = broker_factory(args=["--log.cleaner.backoff.ms=200"])
    a = admin(b)
    lag, plain = unique_topic("cfglag"), unique_topic("cfgnolag")
    create(a, lag, {"cleanup.policy": "compact", "max.compaction.lag.ms": "1500"})
    create(a, plain, {"cleanup.policy": "compact"})
    first = [(b"key-%d" % (i % 5), b"old-%d" % i) for i in range(50)]
    for t in (lag, plain):
        produce_confluent(b, t, first)
    time.sleep(2.0)
    # This append finds the active segment past the lag: it goes into a new
    # segment, and the next one gives that successor durable data.
    for t in (lag, plain):
        produce_confluent(b, t, [(b"key-0", b"new-0")])
        produce_confluent(b, t, [(b"key-1", b"new-1")])

    deadline = time.monotonic() + 30
    while True:
        lag_logs = glob.glob(os.path.join(b.log_dirs, "%s-0" % lag, "*.log"))
        values = read_values(b, lag)
        if len(values) <= 7:
            break
        assert time.monotonic() < deadline, "not compacted after 30 s: %d records, segments %r" % (len(values), lag_logs)
        time.sleep(0.5)
    # The rolled segment keeps at most one record per key: the last of each,
    # minus those the cleaner already saw written again after it (new-0 and
    # new-1, depending on which were durable when it built its key map);
    # then come the two new records.
    old = values[:-2]
    assert values[-2:] == [(b"key-0", b"new-0"), (b"key-1", b"new-1")], values
    assert len({k for k, _ in old}) == len(old) and 3 <= len(old) <= 5, values
    assert {k: v for k, v in values} == {
        b"key-0": b"new-0",
        b"key-1": b"new-1",
        b"key-2": b"old-47",
        b"key-3": b"old-48",
        b"key-4": b"old-49",
    }
    assert len(read_values(b, plain)) == 52, "the topic without max.compaction.lag.ms was compacted"
    assert len(glob.glob(os.path.join(b.log_dirs, "%s-0" % plain, "*.log"))) == 1


def read_values(broker, topic):
    """[(key, value)] of partition 0 from the log start, in offset order."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(broker.consumer_config())
    try:
        low, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        c.assign([TopicPartition(topic, 0, low)])
        out = []
        deadline = time.monotonic() + 20
        last = low - 1
        while last < high - 1:
            assert time.monotonic() < deadline, "reading %s stuck at %d of %d" % (topic, last, high)
            for m in c.consume(num_messages=1000, timeout=0.5):
                if m.error():
                    continue
                out.append((m.key(), m.value()))
                last = m.offset()
        return out
    finally:
        c.close()


def stored_codecs(broker, topic):
    """The codec of every batch in partition 0's segment files, in order
    (attributes' low 3 bits: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd)."""
    import struct

    codecs = []
    for path in sorted(glob.glob(os.path.join(broker.log_dirs, "%s-0" % topic, "*.log"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at + 61 <= len(data):
            (length,) = struct.unpack_from(">i", data, at + 8)
            if length <= 0:
                break  # preallocated zeros past the end
            (attributes,) = struct.unpack_from(">h", data, at + 21)
            codecs.append(attributes & 7)
            at += 12 + length
    return codecs


@pytest.mark.parametrize("topic_codec,code,producer_codec", [("zstd", 4, "gzip"), ("lz4", 3, "none"), ("uncompressed", 0, "snappy")])
def test_compression_type_rewrites_batches_with_the_topic_codec(broker, topic_codec, code, producer_codec):
    a = admin(broker)
    name = unique_topic("cfgcodec")
    create(a, name, {"compression.type": topic_codec, "compression.zstd.level": "10", "compression.lz4.level": "12"})
    records = [(b"k%d" % (i % 7), b"value-%05d-" % i + b"abc" * (i % 40)) for i in range(400)]
    produce_confluent(broker, name, records, **{"compression.type": producer_codec, "linger.ms": 5})
    codecs = stored_codecs(broker, name)
    assert codecs and set(codecs) == {code}, codecs
    got = consume_confluent(broker, name, {0: 400})[0]
    assert [(o, k, v) for o, k, v in got] == [(i, k, v) for i, (k, v) in enumerate(records)]


def test_compression_type_producer_keeps_the_producer_codec(broker):
    a = admin(broker)
    name = unique_topic("cfgkeep")
    create(a, name)
    produce_confluent(broker, name, [(b"k", b"v" * 100) for _ in range(100)], **{"compression.type": "gzip"})
    assert set(stored_codecs(broker, name)) == {1}
