"""Topic and broker configs through confluent-kafka and kafka-python admin
clients: describe with sources, alter (full and incremental), validation,
validate_only, persistence across restart, and the change taking effect."""

import glob
import os
import time

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from clients import produce_confluent


def admin(broker):
    return AdminClient({"bootstrap.servers": broker.bootstrap})


def create(a, name, partitions=1, config=None):
    fs = a.create_topics([NewTopic(name, partitions, 1, config=config or {})])
    fs[name].result(30)


def describe(a, name):
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    return a.describe_configs([res])[res].result(30)


def incremental(a, name, entries, validate_only=False):
    res = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries)
    return a.incremental_alter_configs([res], validate_only=validate_only)[res].result(30)


def test_describe_alter_validate_persist(broker):
    a = admin(broker)
    create(a, "cfg", config={"retention.ms": "100000"})
    d = describe(a, "cfg")
    assert d["retention.ms"].value == "100000"
    assert d["retention.ms"].source == ConfigResource.Type.TOPIC or d["retention.ms"].source == 1
    assert d["segment.bytes"].value == "1073741824" and d["segment.bytes"].source == 5
    assert d["cleanup.policy"].value == "delete"

    # SET + APPEND, then DELETE.
    incremental(
        a,
        "cfg",
        [
            ConfigEntry("segment.bytes", "8192", incremental_operation=AlterConfigOpType.SET),
            ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.APPEND),
            ConfigEntry("retention.ms", None, incremental_operation=AlterConfigOpType.DELETE),
        ],
    )
    d = describe(a, "cfg")
    assert d["segment.bytes"].value == "8192" and d["segment.bytes"].source == 1
    assert d["cleanup.policy"].value == "delete,compact"
    assert d["retention.ms"].value == "604800000" and d["retention.ms"].source == 5

    # Invalid values and unknown keys: INVALID_CONFIG, nothing changes.
    for entry in [
        ConfigEntry("segment.bytes", "10", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("no.such.config", "1", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("message.timestamp.type", "Now", incremental_operation=AlterConfigOpType.SET),
    ]:
        with pytest.raises(Exception) as e:
            incremental(a, "cfg", [entry])
        assert "INVALID_CONFIG" in str(e.value) or "InvalidConfig" in str(e.value) or e.value.args[0].code() == 40
    # validate_only: accepted, not applied.
    incremental(a, "cfg", [ConfigEntry("retention.bytes", "5000", incremental_operation=AlterConfigOpType.SET)], validate_only=True)
    assert describe(a, "cfg")["retention.bytes"].value == "-1"

    # Persisted across restart.
    broker.restart()
    d = describe(admin(broker), "cfg")
    assert d["segment.bytes"].value == "8192"
    assert d["cleanup.policy"].value == "delete,compact"


def test_kafka_python_describe_and_alter(broker):
    from kafka.admin import ConfigResource as KCR, ConfigResourceType, KafkaAdminClient, NewTopic as KNT

    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    a.create_topics([KNT("kp-cfg", 1, 1)])
    a.alter_configs([KCR(ConfigResourceType.TOPIC, "kp-cfg", configs={"retention.ms": "12345"})])
    try:
        res = a.describe_configs([KCR(ConfigResourceType.TOPIC, "kp-cfg")], config_filter="all")
    except TypeError:
        res = a.describe_configs([KCR(ConfigResourceType.TOPIC, "kp-cfg")])
    text = repr(res)
    assert "12345" in text
    broker_res = a.describe_configs([KCR(ConfigResourceType.BROKER, "0")], **({"config_filter": "all"} if "config_filter" in KafkaAdminClient.describe_configs.__code__.co_varnames else {}))
    assert "log.dirs" in repr(broker_res)
    a.close()


def test_smaller_segment_bytes_rolls_segments(broker):
    a = admin(broker)
    create(a, "roll")
    produce_confluent(broker, "roll", [(b"k", b"x" * 200) for _ in range(50)])
    pdir = os.path.join(broker.log_dirs, "roll-0")
    assert len(glob.glob(os.path.join(pdir, "*.log"))) == 1
    incremental(a, "roll", [ConfigEntry("segment.bytes", "4096", incremental_operation=AlterConfigOpType.SET)])
    produce_confluent(broker, "roll", [(b"k", b"y" * 200) for _ in range(200)], **{"linger.ms": 0, "batch.size": 1000})
    logs = glob.glob(os.path.join(pdir, "*.log"))
    assert len(logs) >= 5, logs


def test_log_append_time(broker):
    a = admin(broker)
    create(a, "lat", config={"message.timestamp.type": "LogAppendTime"})
    old_ts = 1_000_000_000_000
    from confluent_kafka import Producer

    p = Producer(broker.producer_config())
    p.produce("lat", key=b"k", value=b"v", timestamp=old_ts)
    p.flush(30)
    before = int(time.time() * 1000)
    c = Consumer(broker.consumer_config(**{"group.id": "lat"}))
    c.assign([TopicPartition("lat", 0, 0)])
    msgs = []
    deadline = time.time() + 30
    while not msgs and time.time() < deadline:
        msgs = [m for m in c.consume(10, 1.0) if m.error() is None]
    c.close()
    ts_type, ts = msgs[0].timestamp()
    assert ts_type == 2  # TIMESTAMP_LOG_APPEND_TIME
    assert abs(ts - before) < 120_000 and ts != old_ts


def test_create_partitions_and_delete_records(broker):
    a = admin(broker)
    create(a, "grow", partitions=2)
    a.create_partitions([NewPartitions("grow", 5)])["grow"].result(30)
    md = a.list_topics("grow", timeout=10)
    assert sorted(md.topics["grow"].partitions) == [0, 1, 2, 3, 4]
    with pytest.raises(Exception):
        a.create_partitions([NewPartitions("grow", 3)])["grow"].result(30)
    acked = produce_confluent(broker, "grow", [(b"key%d" % i, b"v%d" % i) for i in range(500)])
    assert {p for p, _, _, _ in acked} - {0, 1} , "new partitions receive keyed records"
