"""Leader epochs in the fetch path and the high watermark checkpoint, on the
3-node cluster of tests/cluster.py:

- KIP-320: a Fetch v12 carrying `last_fetched_epoch` whose epoch the leader
  does not have, or that ends on the leader before the fetch offset, is
  answered with `diverging_epoch` (the leader's largest epoch at or below it
  and where it ends), error NONE and no records; a consistent one is served.
- replication-offset-checkpoint: a replica that restarts holding records one
  in-sync replica does not have starts from its checkpointed high watermark,
  not from its log end, so after it leads again consumers do not see those
  records until every in-sync replica has them.
"""

import os
import signal
import time

from confluent_kafka import Producer

import kafka_wire as kw
from cluster import (  # noqa: F401 - fixtures
    cluster,
    cluster_factory,
    create_topic,
    node_of,
    topic_partitions,
    wait_until,
)
from clients import consume_confluent
from conftest import unique_topic

FETCH = 1
OFFSET_OUT_OF_RANGE = 1


def _uvarint(r):
    shift, value = 0, 0
    while True:
        b = r._take(1)[0]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value
        shift += 7


def fetch_v12(port, topic, partition, offset, last_fetched_epoch, replica_id, current_leader_epoch=-1):
    """One-partition Fetch v12 (flexible, KIP-320 fields) to `port`: a dict
    with error, high_watermark, log_start_offset, records (bytes) and
    diverging ((epoch, end offset) or None when the tagged field is absent)."""
    body = (
        kw.i32(replica_id) + kw.i32(0) + kw.i32(0) + kw.i32(1 << 20) + kw.i8(0) + kw.i32(0) + kw.i32(-1)
        + kw.uvarint(2) + kw.compact_string(topic)
        + kw.uvarint(2) + kw.i32(partition) + kw.i32(current_leader_epoch) + kw.i64(offset)
        + kw.i32(last_fetched_epoch) + kw.i64(-1) + kw.i32(1 << 20) + b"\x00"  # partition tagged fields
        + b"\x00"  # topic tagged fields
        + kw.uvarint(1)  # forgotten_topics_data: none
        + kw.compact_string("")  # rack_id
        + b"\x00"
    )
    with kw.Conn(port) as conn:
        corr = conn.send_request(FETCH, 12, body, header_version=2)
        r = conn.recv_response(corr, header_version=1)
        r.i32()  # throttle_time_ms
        assert r.i16() == 0, "top-level error"
        r.i32()  # session_id
        assert _uvarint(r) == 2, "one topic"
        name = r._take(_uvarint(r) - 1).decode()
        assert name == topic
        assert _uvarint(r) == 2, "one partition"
        assert r.i32() == partition
        out = {"error": r.i16(), "high_watermark": r.i64()}
        r.i64()  # last_stable_offset
        out["log_start_offset"] = r.i64()
        aborted = _uvarint(r)
        assert aborted <= 1, "no aborted transactions"
        r.i32()  # preferred_read_replica
        n = _uvarint(r)
        out["records"] = r._take(n - 1) if n > 0 else b""
        out["diverging"] = None
        for _ in range(_uvarint(r)):
            tag, size = _uvarint(r), _uvarint(r)
            data = kw.Reader(r._take(size))
            if tag == 0:
                out["diverging"] = (data.i32(), data.i64())
        return out


def record_count(records):
    """Records in the whole batches of a fetched record set."""
    count, at = 0, 0
    while at + 61 <= len(records):
        size = 12 + int.from_bytes(records[at + 8:at + 12], "big")
        if at + size > len(records):
            break
        last_offset_delta = int.from_bytes(records[at + 23:at + 27], "big")
        count += last_offset_delta + 1
        at += size
    return count


def partition_view(c, topic, via, partition=0):
    md = c.metadata(via, topics=[topic], timeout=5)
    parts = topic_partitions(md, topic)
    return parts.get(partition) if parts else None


def test_fetch_with_a_diverging_last_fetched_epoch(cluster):
    """Raw Fetch v12 from a follower's broker id (and from a consumer) with
    `last_fetched_epoch`: consistent ones are served; an epoch the leader
    never wrote, or a fetch offset past where the epoch ends on the leader,
    gets `diverging_epoch` (epoch, end offset), error NONE, no records."""
    c = cluster
    topic = unique_topic("diverge")
    create_topic(c, topic, 1, 3)
    parts = c.wait_topic(topic, 1)
    p0 = parts[0]
    leader, epoch = p0.leader, p0.leader_epoch
    follower = next(r for r in p0.replicas if r != leader)
    producer = Producer(c.producer_config(**{"acks": "all"}))
    for i in range(10):
        producer.produce(topic, value=b"e%d" % i, partition=0)
    assert producer.flush(30) == 0
    port = c.node(node_of(leader)).port
    wait_until("high watermark 10",
               lambda: fetch_v12(port, topic, 0, 0, -1, -1)["high_watermark"] == 10, timeout=30)
    # Nothing moved the leadership: the records were written in `epoch`.
    assert partition_view(c, topic, node_of(leader)).leader_epoch == epoch

    # Consistent: same epoch, at its end or inside it.
    at_end = fetch_v12(port, topic, 0, 10, epoch, follower)
    assert (at_end["error"], at_end["diverging"], at_end["records"]) == (0, None, b""), at_end
    inside = fetch_v12(port, topic, 0, 4, epoch, follower)
    assert inside["error"] == 0 and inside["diverging"] is None, inside
    assert record_count(inside["records"]) >= 6, inside

    # The follower says its log ends in an epoch the leader never wrote.
    newer = fetch_v12(port, topic, 0, 10, epoch + 1, follower)
    assert newer["error"] == 0, newer
    assert newer["diverging"] == (epoch, 10), newer
    assert newer["records"] == b"", "a diverging answer carries no records"
    assert newer["high_watermark"] == 10 and newer["log_start_offset"] == 0, newer

    # Same epoch, but the follower has more of it than the leader: told where
    # the epoch ends, not OFFSET_OUT_OF_RANGE as without the epoch.
    past = fetch_v12(port, topic, 0, 14, epoch, follower)
    assert (past["error"], past["diverging"], past["records"]) == (0, (epoch, 10), b""), past
    far = fetch_v12(port, topic, 0, 1000, epoch, follower)
    assert (far["error"], far["diverging"]) == (0, (epoch, 10)), far
    without_epoch = fetch_v12(port, topic, 0, 14, -1, follower)
    assert (without_epoch["error"], without_epoch["diverging"]) == (OFFSET_OUT_OF_RANGE, None), without_epoch

    # A consumer's fetch is checked the same way.
    consumer = fetch_v12(port, topic, 0, 12, epoch, -1)
    assert (consumer["error"], consumer["diverging"], consumer["records"]) == (0, (epoch, 10), b""), consumer
    consumer_ok = fetch_v12(port, topic, 0, 0, epoch, -1)
    assert consumer_ok["diverging"] is None and record_count(consumer_ok["records"]) == 10, consumer_ok

    # The replicas are untouched by all this: a real consumer reads the 10.
    got = consume_confluent(c.node(node_of(leader)), topic, {0: 10}, timeout=60)
    assert [(o, v) for o, _, v in got[0]] == [(i, b"e%d" % i) for i in range(10)]


def test_restarted_replica_keeps_its_checkpointed_high_watermark(cluster_factory):
    """RF 3, replicas [A, G, F] of one partition, G the controller quorum's
    leader (so pausing F and restarting A never leaves the quorum without
    its leader). With F paused, A (leader) takes acks=1 records that G
    copies and F cannot: A's high watermark stays at what F has. A restarts
    (SIGTERM: controlled shutdown, G leads meanwhile, A's high watermark
    checkpoint is written at shutdown), rejoins the ISR and is elected
    leader again while F is still paused. A consumer of A must still see
    only what F has: with the old rule (high watermark = log end after a
    restart) it would see the records F lacks, which a later leader F would
    not have. After F resumes and catches up, everything is visible, once,
    in order."""
    from confluent_kafka import ElectionType, TopicPartition

    # F stays paused for a while: neither fenced nor dropped from the ISR meanwhile.
    c = cluster_factory(args=("--broker.session.timeout.ms=60000", "--replica.lag.time.max.ms=60000",
                              "--replica.high.watermark.checkpoint.interval.ms=1000"))
    topic = unique_topic("hwckpt")
    create_topic(c, topic, 3, 3)
    parts = c.wait_topic(topic, 3)
    quorum_leader = node_of(c.controller())
    # Partitions start on consecutive nodes: exactly one has the quorum leader second.
    part = next(i for i, p in parts.items() if node_of(p.replicas[1]) == quorum_leader)
    p0 = parts[part]
    a, g, f = (node_of(r) for r in p0.replicas)
    assert p0.leader == p0.replicas[0], p0
    a_port = c.node(a).port

    def consumer_hw():
        return fetch_v12(a_port, topic, part, 0, -1, -1)["high_watermark"]

    def values(n0, n1, tag):
        return [b"%s-%d" % (tag, i) for i in range(n0, n1)]

    everyone = Producer(c.producer_config(**{"acks": "all"}))
    for v in values(0, 200, b"all"):
        everyone.produce(topic, value=v, partition=part)
    assert everyone.flush(30) == 0
    wait_until("A's high watermark at 200", lambda: consumer_hw() == 200, timeout=30)

    f_pid = c.node(f).proc.pid
    os.kill(f_pid, signal.SIGSTOP)
    try:
        acked = []
        only_two = Producer(c.producer_config(**{"acks": "1"}))
        for v in values(200, 500, b"two"):
            only_two.produce(topic, value=v, partition=part,
                             on_delivery=lambda err, m: acked.append((err, m.offset())))
        assert only_two.flush(30) == 0
        assert all(err is None for err, _ in acked) and max(o for _, o in acked) == 499, acked[:3]
        time.sleep(1.5)  # a checkpoint interval: nothing may move it
        assert consumer_hw() == 200, "A's high watermark must wait for F"

        # A restarts: G leads meanwhile (F, paused, comes after it in the replica list).
        a_node = c.node(a)
        assert a_node.stop() == 0
        a_node.spawn()
        a_node.wait_ready()

        def view(n):
            md = c.metadata(n, topics=[topic], timeout=5)
            return (topic_partitions(md, topic) or {}).get(part)

        # A is back in the ISR (following G), then the preferred leader again.
        wait_until("A back in the ISR", lambda: (lambda p: p and p0.replicas[0] in p.isr)(view(g)), timeout=60)
        admin = c.admin([a, g])
        result = admin.elect_leaders(ElectionType.PREFERRED, [TopicPartition(topic, part)]).result(timeout=90)
        assert all(err is None for err in result.values()), result
        wait_until("A leads again", lambda: (lambda p: p and p.leader == p0.replicas[0])(view(a)), timeout=60)
        # F has 0..200 only and is still in the ISR: nothing past 200 is visible.
        assert p0.replicas[2] in view(a).isr
        for _ in range(10):
            hw = consumer_hw()
            assert hw <= 200, "A restarted and serves offsets up to %d; F has only 200" % hw
            time.sleep(0.3)
        seen = fetch_v12(a_port, topic, part, 0, -1, -1)
        assert record_count(seen["records"]) <= 200, seen["high_watermark"]
    finally:
        os.kill(f_pid, signal.SIGCONT)

    wait_until("everything replicated and visible", lambda: consumer_hw() == 500, timeout=60)
    got = consume_confluent(c.node(a), topic, {part: 500}, timeout=60)
    assert [(o, v) for o, _, v in got[part]] == list(enumerate(values(0, 200, b"all") + values(200, 500, b"two")))
    # The checkpoint file sits in the partition directory, next to the leader epoch checkpoint.
    ckpt = os.path.join(c.node(a).log_dirs, "%s-%d" % (topic, part), "replication-offset-checkpoint")
    wait_until("A's checkpoint reaches 500", lambda: open(ckpt).read().strip() == "500", timeout=30)
