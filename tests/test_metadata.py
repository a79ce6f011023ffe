"""Cluster shape as clients see it: one broker per shard, partitions spread
over shards and owned by exactly one, topic admin, offsets and configs."""

import time

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

import kafka_wire as kw
from clients import check_roundtrip, consume_confluent, make_records, produce_confluent, watermarks
from conftest import create_topic, unique_topic, wait_topic


def admin(broker, port=None):
    return AdminClient({"bootstrap.servers": "127.0.0.1:%d" % (port or broker.port), "log_level": 3})


def test_metadata_lists_one_broker_per_shard(broker):
    for port in broker.ports:
        md = admin(broker, port).list_topics(timeout=10)
        got = sorted((b.id, b.host, b.port) for b in md.brokers.values())
        assert got == [(0, "127.0.0.1", broker.port), (1, "127.0.0.1", broker.port + 1)], got
    # The same through kafka-python.
    from kafka.admin import KafkaAdminClient

    ka = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        # DescribeCluster is not implemented: kafka-python falls back to Metadata.
        nodes = sorted((n.get("node_id", n.get("broker_id")), n["host"], n["port"]) for n in ka.describe_cluster()["brokers"])
        assert nodes == [(0, "127.0.0.1", broker.port), (1, "127.0.0.1", broker.port + 1)], nodes
    finally:
        ka.close()


def test_partitions_spread_over_shards(broker):
    topic = unique_topic("spread")
    create_topic(broker, topic, 6)
    views = []
    for port in broker.ports:
        t = admin(broker, port).list_topics(topic=topic, timeout=10).topics[topic]
        assert t.error is None
        views.append({p.id: (p.leader, list(p.replicas), list(p.isrs)) for p in t.partitions.values()})
    assert views[0] == views[1], "shards disagree on the owners: %r" % views
    assert sorted(views[0]) == list(range(6))
    leaders = [views[0][p][0] for p in range(6)]
    assert sorted(set(leaders)) == [0, 1], leaders
    assert leaders.count(0) == 3 and leaders.count(1) == 3, "6 partitions over 2 shards not balanced: %r" % leaders
    for p, (leader, replicas, isr) in views[0].items():
        assert replicas == [leader] and isr == [leader], (p, leader, replicas, isr)


def test_partition_on_other_shard_is_not_leader(broker):
    topic = unique_topic("owner")
    create_topic(broker, topic, 2)
    md = admin(broker).list_topics(topic=topic, timeout=10)
    for p in (0, 1):
        owner = md.topics[topic].partitions[p].leader
        wrong_port = broker.port + (1 - owner)
        with kw.Conn(wrong_port) as c:
            v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
            r = kw.produce(c, v, topic, p, kw.build_batch([(b"k", b"v")]))
            assert r.error_code == kw.NOT_LEADER_OR_FOLLOWER, r
        with kw.Conn(broker.port + owner) as c:
            v = kw.pick_version(kw.api_versions(c), kw.PRODUCE, 3, 8)
            r = kw.produce(c, v, topic, p, kw.build_batch([(b"k", b"v%d" % p)]))
            assert (r.error_code, r.base_offset) == (0, 0), r
    assert watermarks(broker, topic, [0, 1]) == {0: (0, 1), 1: (0, 1)}
    assert consume_confluent(broker, topic, {0: 1, 1: 1}) == {0: [(0, b"k", b"v0")], 1: [(0, b"k", b"v1")]}


def test_replication_factor_above_one_rejected(broker):
    topic = unique_topic("rf3")
    a = admin(broker)  # keep the client alive until its future resolves
    fut = a.create_topics([NewTopic(topic, num_partitions=1, replication_factor=3)], request_timeout=15)[topic]
    with pytest.raises(Exception) as ei:
        fut.result(timeout=30)
    err = ei.value.args[0]
    assert err.code() == KafkaError.INVALID_REPLICATION_FACTOR, err
    generic = KafkaError(KafkaError.INVALID_REPLICATION_FACTOR).str()
    assert err.str() and err.str() != generic, "no message saying why, only %r" % err.str()
    assert topic not in admin(broker).list_topics(timeout=10).topics


def test_create_existing_topic_and_delete(broker):
    topic = unique_topic("dup")
    create_topic(broker, topic, 2)
    a = admin(broker)  # keep the client alive until its future resolves
    fut = a.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)], request_timeout=15)[topic]
    with pytest.raises(Exception) as ei:
        fut.result(timeout=30)
    assert ei.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS, ei.value.args[0]

    produce_confluent(broker, topic, [(b"k%d" % i, b"v%d" % i) for i in range(20)])
    a.delete_topics([topic], request_timeout=15)[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while any(topic in admin(broker, p).list_topics(timeout=10).topics for p in broker.ports):
        assert time.monotonic() < deadline, "deleted topic still listed"
        time.sleep(0.2)
    # Re-created under the same name, it starts empty.
    create_topic(broker, topic, 1)
    assert watermarks(broker, topic, [0]) == {0: (0, 0)}
    acked = produce_confluent(broker, topic, [(b"k", b"fresh")])
    assert acked == [(0, 0, b"k", b"fresh")]


def test_topic_deleted_under_load_and_recreated_at_once(broker):
    """Each partition has its own flush task: a topic deleted while acks=all
    produces stream into it and created again under the same name at once is
    a new log, whose writes must not wait on (or be mistaken for) the old
    log's flush. Every record produced to the new topic is acknowledged,
    promptly, and it holds exactly those records."""
    import threading

    topic = unique_topic("churn")
    create_topic(broker, topic, 2)
    stop = threading.Event()

    def stream():
        p = Producer(broker.producer_config(**{"linger.ms": 0, "acks": "all", "message.timeout.ms": 5000}))
        i = 0
        while not stop.is_set():
            try:
                p.produce(topic, key=b"old", value=b"old-%d" % i)
            except BufferError:
                p.poll(0.05)
            p.poll(0)
            i += 1
        p.flush(10)

    t = threading.Thread(target=stream)
    t.start()
    try:
        time.sleep(1.0)
        a = admin(broker)
        a.delete_topics([topic], request_timeout=15)[topic].result(timeout=30)
        # Created again at once: by us, or first by the streaming producer
        # (auto.create.topics.enable is on by default, as in Kafka).
        deadline = time.monotonic() + 30
        while True:
            try:
                create_topic(broker, topic, 2)
                break
            except Exception as e:
                if "already exists" in str(e):
                    break
                assert time.monotonic() < deadline, "could not create %s again: %s" % (topic, e)
                time.sleep(0.05)
        time.sleep(1.0)  # the stream goes on into the new log for a while
    finally:
        stop.set()
        t.join()
    partitions = sorted(admin(broker).list_topics(topic, timeout=10).topics[topic].partitions)
    wait_topic(broker, topic, len(partitions))
    # The stream's records that went into the new topic, counted first.
    before = watermarks(broker, topic, partitions)
    records = [(b"new-%d" % i, b"fresh-%d" % i) for i in range(2000)]
    started = time.monotonic()
    acked = produce_confluent(broker, topic, records, flush_timeout=60, **{"linger.ms": 0, "acks": "all"})
    took = time.monotonic() - started
    assert len(acked) == 2000
    assert took < 30, "acks=all produce to the new topic took %.1f s" % took
    ends = watermarks(broker, topic, partitions)
    got = consume_confluent(broker, topic, {p: ends[p][1] for p in ends})
    fresh = sorted(v for msgs in got.values() for (_, k, v) in msgs if k.startswith(b"new-"))
    assert fresh == sorted(v for _, v in records)
    old = sum(1 for msgs in got.values() for (_, k, _) in msgs if k == b"old")
    assert old == sum(before[p][1] for p in before), (old, before)


def test_metadata_auto_creates_topics(broker_factory):
    b = broker_factory(args=["--num.partitions=3", "--auto.create.topics.enable=true"])
    topic = unique_topic("auto")
    recs = make_records(3000)
    acked = produce_confluent(b, topic, recs)  # librdkafka asks Metadata for the unknown topic
    wait_topic(b, topic, 3)
    ends = {p: hi for p, (_, hi) in watermarks(b, topic, range(3)).items()}
    check_roundtrip(recs, acked, consume_confluent(b, topic, ends))


def test_auto_create_disabled(broker_factory):
    b = broker_factory(args=["--auto.create.topics.enable=false"])
    topic = unique_topic("noauto")
    with kw.Conn(b.port) as c:
        v = kw.pick_version(kw.api_versions(c), kw.METADATA, 4, 8)
        md = kw.metadata(c, v, [topic], allow_auto_topic_creation=True)
        assert [(t.name, t.error_code) for t in md["topics"]] == [(topic, kw.UNKNOWN_TOPIC_OR_PARTITION)]
    assert topic not in admin(b).list_topics(timeout=10).topics


def test_list_offsets_by_timestamp(broker):
    topic = unique_topic("ts")
    create_topic(broker, topic, 1)
    base = 1_700_000_000_000
    p = Producer(broker.producer_config(**{"linger.ms": 0}))
    acked = []
    for i in range(50):
        p.produce(topic, key=b"k", value=b"v%d" % i, timestamp=base + i * 1000, partition=0,
                  on_delivery=lambda e, m: acked.append((e, m.offset())))
        p.flush(30)  # one batch per record, so every timestamp is indexed
    assert [e for e, _ in acked] == [None] * 50 and [o for _, o in acked] == list(range(50))
    c = Consumer(broker.consumer_config())
    try:
        for ts, want in [(base, 0), (base + 1, 1), (base + 20_000, 20), (base + 20_500, 21), (base + 49_000, 49), (base + 60_000, -1)]:
            got = c.offsets_for_times([TopicPartition(topic, 0, ts)], timeout=15)[0]
            assert got.error is None and got.offset == want, "timestamp %d: offset %r, want %d" % (ts, got.offset, want)
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=15, cached=False)
        assert (lo, hi) == (0, 50)
    finally:
        c.close()
    got = consume_confluent(broker, topic, {0: 50})[0]
    assert [v for _, _, v in got] == [b"v%d" % i for i in range(50)]


def test_describe_configs(broker_factory):
    b = broker_factory(args=["--message.max.bytes=123456"])
    topic = unique_topic("cfg")
    a = admin(b)
    a.create_topics([NewTopic(topic, 1, 1, config={"retention.ms": "3600000"})], request_timeout=15)[topic].result(30)
    wait_topic(b, topic, 1)
    res = a.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)], request_timeout=15)
    cfg = list(res.values())[0].result(30)
    assert cfg["retention.ms"].value == "3600000", {k: v.value for k, v in cfg.items()}
    res = a.describe_configs([ConfigResource(ConfigResource.Type.BROKER, "0")], request_timeout=15)
    cfg = list(res.values())[0].result(30)
    assert cfg["message.max.bytes"].value == "123456", {k: v.value for k, v in cfg.items()}
