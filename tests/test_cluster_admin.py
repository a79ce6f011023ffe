"""Cluster-level administration through real clients and raw frames:
DescribeCluster (one node per shard, stable cluster id), DescribeLogDirs
(sizes equal to the bytes of the segment files), and dynamic broker configs
(IncrementalAlterConfigs on the cluster default: validate_only, sources and
synonyms, inheritance by topics, the change taking effect, read-only and
invalid configs refused with a message, persistence across restart)."""

import os

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

import kafka_wire as kw
from clients import produce_confluent
from conftest import create_topic, unique_topic

DESCRIBE_CONFIGS = 32
INCREMENTAL_ALTER_CONFIGS = 44
RESOURCE_TOPIC, RESOURCE_BROKER = 2, 4
OP_SET, OP_DELETE = 0, 1
INVALID_CONFIG = 40
DYNAMIC_TOPIC, DYNAMIC_BROKER, DYNAMIC_DEFAULT_BROKER, STATIC_BROKER, DEFAULT = 1, 2, 3, 4, 5


def admin(broker):
    return AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})


# --------------------------------------------------------------------------
# DescribeCluster


def test_describe_cluster(broker_factory):
    from kafka.admin import KafkaAdminClient

    b = broker_factory(shards=3)

    def describe():
        a = admin(b)  # keep the handle alive until the future resolves
        r = a.describe_cluster(request_timeout=30).result(30)
        nodes = [(n.id, n.host, n.port) for n in r.nodes]
        return r.cluster_id, (r.controller.id, r.controller.host, r.controller.port), nodes

    cluster_id, controller, nodes = describe()
    assert nodes == [(i, "127.0.0.1", b.port + i) for i in range(3)]
    assert controller == nodes[0]
    assert cluster_id and len(cluster_id) >= 16, cluster_id
    md = admin(b).list_topics(timeout=10)
    assert md.cluster_id == cluster_id and md.controller_id == 0

    ka = KafkaAdminClient(bootstrap_servers=b.bootstrap)
    try:
        d = ka.describe_cluster()
    finally:
        ka.close()
    assert d["cluster_id"] == cluster_id and d["controller_id"] == 0
    assert [(x["broker_id"], x["host"], x["port"]) for x in d["brokers"]] == nodes

    b.restart()
    assert describe() == (cluster_id, controller, nodes)
    b.kill9()
    b.start()
    assert describe() == (cluster_id, controller, nodes)


# --------------------------------------------------------------------------
# DescribeLogDirs


def disk_bytes(broker, topic, partition):
    """(bytes of batches in the segment files, [(file size, batch bytes, is last)])."""
    pdir = os.path.join(broker.log_dirs, "%s-%d" % (topic, partition))
    files = kw.segment_files(pdir)
    rows = []
    for i, (_, path) in enumerate(files):
        batches, _ = kw.parse_segment(path)
        rows.append((os.path.getsize(path), sum(x.size for x in batches), i == len(files) - 1))
    return sum(r[1] for r in rows), rows


def log_dirs(broker, topic_partitions=None):
    """{broker id: (log dir entries)} and {(topic, partition): (broker id, size)}
    from kafka-python's DescribeLogDirs to every broker."""
    from kafka.admin import KafkaAdminClient

    ka = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        res = ka.describe_log_dirs(topic_partitions)
    finally:
        ka.close()
    dirs, sizes = {}, {}
    for entry in res:
        dirs[entry["broker"]] = entry["log_dirs"]
        for d in entry["log_dirs"]:
            for t in d["topics"]:
                for p in t["partitions"]:
                    key = (t["name"], p["partition_index"])
                    assert key not in sizes, "%r reported twice" % (key,)
                    assert p["offset_lag"] == 0
                    sizes[key] = (entry["broker"], p["partition_size"])
    return dirs, sizes


def test_describe_log_dirs_sizes_match_segment_files(broker):
    small, big = unique_topic("ld"), unique_topic("ldb")
    create_topic(broker, small, 3, config={"segment.bytes": "4096"})
    create_topic(broker, big, 1)
    produce_confluent(broker, small, [(b"k%d" % i, b"x" * (100 + i % 50)) for i in range(1500)],
                      **{"linger.ms": 0, "batch.size": 1000})
    produce_confluent(broker, big, [(b"k%d" % i, b"y" * 80) for i in range(500)])
    md = admin(broker).list_topics(timeout=10)
    owner = {(t, p): pm.leader for t in (small, big) for p, pm in md.topics[t].partitions.items()}

    def check(when):
        dirs, sizes = log_dirs(broker)
        assert sorted(dirs) == list(range(broker.shards)), when
        for bid, ds in dirs.items():
            assert len(ds) == 1 and ds[0]["error_code"] == 0, (when, ds)
            assert ds[0]["log_dir"] == os.path.realpath(broker.log_dirs), (when, ds[0]["log_dir"])
            assert 0 < ds[0]["usable_bytes"] <= ds[0]["total_bytes"], (when, ds[0])
        mine = {k: v for k, v in sizes.items() if k[0] in (small, big)}
        assert sorted(mine) == sorted(owner), when
        for key, (bid, size) in mine.items():
            assert bid == owner[key], (when, key, bid, owner[key])
            data, rows = disk_bytes(broker, *key)
            # The documented relation: the reported size is the bytes of record
            # batches in the partition's segments; sealed files hold exactly
            # that, the active one is preallocated past it.
            assert size == data, (when, key, size, rows)
            for fsize, batch_bytes, last in rows:
                assert fsize == batch_bytes if not last else fsize >= batch_bytes, (when, key, rows)
        assert len(disk_bytes(broker, small, 0)[1]) >= 5, "the small topic should have rolled"
        return mine

    first = check("after produce")
    # Only what was asked for.
    _, sizes = log_dirs(broker, {small: [1]})
    assert list(sizes) == [(small, 1)] and sizes[(small, 1)] == first[(small, 1)]

    # DeleteRecords shrinks the reported size by exactly the deleted files.
    rows_before = disk_bytes(broker, small, 0)[1]
    a = admin(broker)
    lo = a.delete_records([TopicPartition(small, 0, 150)], request_timeout=30)
    assert list(lo.values())[0].result(30).low_watermark == 150
    after = check("after DeleteRecords")
    assert after[(small, 0)][1] < first[(small, 0)][1]
    removed = first[(small, 0)][1] - after[(small, 0)][1]
    assert removed == sum(r[1] for r in rows_before[: len(rows_before) - len(disk_bytes(broker, small, 0)[1])])
    assert {k: v for k, v in after.items() if k != (small, 0)} == {k: v for k, v in first.items() if k != (small, 0)}

    broker.restart()
    assert check("after restart") == after


# --------------------------------------------------------------------------
# Dynamic broker configs (the cluster default, resource name "")


def describe_raw(port, resource_type, name, keys=None):
    """DescribeConfigs v1 with synonyms: (error, message,
    {config: (value, read_only, source, [(name, value, source)])})."""
    keys_enc = kw.i32(-1) if keys is None else kw.array(keys, kw.string)
    body = kw.array([(resource_type, name)], lambda r: kw.i8(r[0]) + kw.string(r[1]) + keys_enc) + kw.i8(1)
    with kw.Conn(port) as conn:
        r = conn.request(DESCRIBE_CONFIGS, 1, body)
        r.i32()
        results = r.array(
            lambda rr: (
                rr.i16(),
                rr.string(),
                rr.i8(),
                rr.string(),
                rr.array(
                    lambda c: (
                        c.string(),
                        c.string(),
                        c.boolean(),
                        c.i8(),
                        c.boolean(),
                        c.array(lambda s: (s.string(), s.string(), s.i8())),
                    )
                ),
            )
        )
        assert r.remaining() == 0
    assert len(results) == 1
    err, msg, rtype, rname, configs = results[0]
    assert (rtype, rname) == (resource_type, name)
    return err, msg, {n: (v, ro, src, syn) for n, v, ro, src, _sens, syn in configs or []}


def alter_raw(port, name, ops, validate_only=False, resource_type=RESOURCE_BROKER):
    """IncrementalAlterConfigs v0 on one resource: ops [(config, op, value)] -> (error, message)."""
    body = kw.array(
        [name],
        lambda n: kw.i8(resource_type)
        + kw.string(n)
        + kw.array(ops, lambda o: kw.string(o[0]) + kw.i8(o[1]) + kw.nullable_string(o[2])),
    ) + kw.i8(1 if validate_only else 0)
    with kw.Conn(port) as conn:
        r = conn.request(INCREMENTAL_ALTER_CONFIGS, 0, body)
        r.i32()
        res = r.array(lambda rr: (rr.i16(), rr.string(), rr.i8(), rr.string()))
        assert r.remaining() == 0
    assert [(t, n) for _, _, t, n in res] == [(resource_type, name)]
    err, msg = res[0][0], res[0][1]
    # Success carries no message: Kafka sends null, the generated default is "".
    return (err, None) if err == 0 and msg in (None, "") else (err, msg)


def broker_cfg(broker, key, name=""):
    err, msg, cfgs = describe_raw(broker.port, RESOURCE_BROKER, name, [key])
    assert err == 0, msg
    return cfgs[key]


def topic_cfg(broker, topic, key):
    err, msg, cfgs = describe_raw(broker.port, RESOURCE_TOPIC, topic, [key])
    assert err == 0, msg
    return cfgs[key]


SEG_DEFAULT = "1073741824"


def test_broker_dynamic_default_config(broker):
    plain, overridden = unique_topic("dyn"), unique_topic("dyno")
    create_topic(broker, plain, 1)
    create_topic(broker, overridden, 1, config={"segment.bytes": "1000000"})

    assert broker_cfg(broker, "log.segment.bytes") == (SEG_DEFAULT, False, DEFAULT, [("log.segment.bytes", SEG_DEFAULT, DEFAULT)])
    assert topic_cfg(broker, plain, "segment.bytes") == (
        SEG_DEFAULT, False, DEFAULT, [("log.segment.bytes", SEG_DEFAULT, DEFAULT)]
    )

    # validate_only: accepted, nothing changes, nothing rolls.
    assert alter_raw(broker.port, "", [("log.segment.bytes", OP_SET, "4096")], validate_only=True) == (0, None)
    assert broker_cfg(broker, "log.segment.bytes")[:3] == (SEG_DEFAULT, False, DEFAULT)
    assert topic_cfg(broker, plain, "segment.bytes")[:3] == (SEG_DEFAULT, False, DEFAULT)
    produce_confluent(broker, plain, [(b"k", b"a" * 300) for _ in range(40)], **{"linger.ms": 0, "batch.size": 1000})
    assert len(kw.segment_files(os.path.join(broker.log_dirs, "%s-0" % plain))) == 1

    # For real, on the second shard: the change is cluster-wide.
    assert alter_raw(broker.ports[1], "", [("log.segment.bytes", OP_SET, "4096")]) == (0, None)
    chain_default = [("log.segment.bytes", "4096", DYNAMIC_DEFAULT_BROKER), ("log.segment.bytes", SEG_DEFAULT, DEFAULT)]
    for port in broker.ports:
        _, _, cfgs = describe_raw(port, RESOURCE_BROKER, "", ["log.segment.bytes"])
        assert cfgs["log.segment.bytes"] == ("4096", False, DYNAMIC_DEFAULT_BROKER, chain_default), port
    assert topic_cfg(broker, plain, "segment.bytes") == ("4096", False, DYNAMIC_DEFAULT_BROKER, chain_default)
    assert topic_cfg(broker, overridden, "segment.bytes") == (
        "1000000", False, DYNAMIC_TOPIC, [("segment.bytes", "1000000", DYNAMIC_TOPIC)] + chain_default
    )

    # It takes effect without restart: the inheriting topic rolls at 4096,
    # the overriding one does not.
    produce_confluent(broker, plain, [(b"k", b"b" * 300) for _ in range(60)], **{"linger.ms": 0, "batch.size": 1000})
    produce_confluent(broker, overridden, [(b"k", b"c" * 300) for _ in range(100)], **{"linger.ms": 0, "batch.size": 1000})
    segs = kw.segment_files(os.path.join(broker.log_dirs, "%s-0" % plain))
    assert len(segs) >= 4, segs
    for _, path in segs[1:-1]:
        assert os.path.getsize(path) <= 4096, (path, os.path.getsize(path))
    assert len(kw.segment_files(os.path.join(broker.log_dirs, "%s-0" % overridden))) == 1

    # Read-only and unknown broker configs, bad values: INVALID_CONFIG with a
    # message naming the config; nothing of the resource's change is applied.
    for ops, words in [
        ([("log.dirs", OP_SET, "/elsewhere")], ["log.dirs", "read-only"]),
        ([("num.shards", OP_SET, "7")], ["num.shards", "read-only"]),
        ([("no.such.broker.config", OP_SET, "1")], ["no.such.broker.config"]),
        ([("log.segment.bytes", OP_SET, "10")], ["log.segment.bytes", "10"]),
        ([("log.retention.ms", OP_SET, "3600000"), ("log.dirs", OP_SET, "/x")], ["log.dirs", "read-only"]),
    ]:
        err, msg = alter_raw(broker.port, "", ops)
        assert err == INVALID_CONFIG, (ops, err, msg)
        assert msg and all(w in msg for w in words), (ops, msg)
        err, msg = alter_raw(broker.port, "", ops, validate_only=True)
        assert err == INVALID_CONFIG and all(w in msg for w in words), (ops, err, msg)
    assert broker_cfg(broker, "log.retention.ms")[:3] == ("604800000", False, DEFAULT)
    assert broker_cfg(broker, "log.dirs")[:3] == (broker.log_dirs, True, STATIC_BROKER)
    assert broker_cfg(broker, "log.segment.bytes")[:3] == ("4096", False, DYNAMIC_DEFAULT_BROKER)

    # Persisted in the metadata log.
    broker.restart()
    assert broker_cfg(broker, "log.segment.bytes") == ("4096", False, DYNAMIC_DEFAULT_BROKER, chain_default)
    assert topic_cfg(broker, plain, "segment.bytes")[:3] == ("4096", False, DYNAMIC_DEFAULT_BROKER)

    # DELETE: back to the built-in default for the broker and the topic.
    assert alter_raw(broker.port, "", [("log.segment.bytes", OP_DELETE, None)]) == (0, None)
    assert broker_cfg(broker, "log.segment.bytes") == (SEG_DEFAULT, False, DEFAULT, [("log.segment.bytes", SEG_DEFAULT, DEFAULT)])
    assert topic_cfg(broker, plain, "segment.bytes")[:3] == (SEG_DEFAULT, False, DEFAULT)


def test_broker_config_through_confluent(broker):
    """librdkafka can only name a broker id: its change and describe go
    through resource "0"."""
    topic = unique_topic("dync")
    create_topic(broker, topic, 1)
    a = admin(broker)
    res = ConfigResource(
        ConfigResource.Type.BROKER,
        "0",
        incremental_configs=[ConfigEntry("log.retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET)],
    )
    a.incremental_alter_configs([res], validate_only=True)[res].result(30)
    d = a.describe_configs([ConfigResource(ConfigResource.Type.BROKER, "0")])
    assert list(d.values())[0].result(30)["log.retention.ms"].value == "604800000"
    a.incremental_alter_configs([res])[res].result(30)
    d = list(a.describe_configs([ConfigResource(ConfigResource.Type.BROKER, "0")]).values())[0].result(30)
    e = d["log.retention.ms"]
    assert (e.value, e.is_read_only) == ("3600000", False)
    assert d["log.dirs"].is_read_only and d["log.dirs"].value == broker.log_dirs
    t = list(a.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values())[0].result(30)
    assert t["retention.ms"].value == "3600000"

    bad = ConfigResource(
        ConfigResource.Type.BROKER,
        "0",
        incremental_configs=[ConfigEntry("listeners", "PLAINTEXT://0.0.0.0:1", incremental_operation=AlterConfigOpType.SET)],
    )
    with pytest.raises(Exception) as e:
        a.incremental_alter_configs([bad])[bad].result(30)
    err = e.value.args[0]
    assert err.code() == INVALID_CONFIG and "listeners" in err.str() and "read-only" in err.str(), err


def test_cluster_default_seen_from_a_broker_id(broker):
    assert alter_raw(broker.port, "", [("log.retention.ms", OP_SET, "3600000")]) == (0, None)
    for bid in range(broker.shards):
        v = broker_cfg(broker, "log.retention.ms", name=str(bid))
        assert v == (
            "3600000",
            False,
            DYNAMIC_DEFAULT_BROKER,
            [("log.retention.ms", "3600000", DYNAMIC_DEFAULT_BROKER), ("log.retention.ms", "604800000", DEFAULT)],
        ), (bid, v)
