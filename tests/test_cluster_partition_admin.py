"""Replica administration on a 3-node cluster (tests/cluster.py), through
real clients: ElectLeaders (confluent-kafka's AdminClient), partition
reassignments and DescribeTopicPartitions (kafka-python's KafkaAdminClient),
and unclean leader election with `unclean.leader.election.enable`.

What a user does: move leadership back to the preferred replica after a
restart; grow a partition from 2 to 3 replicas and shrink it from 3 to 2
while producing, then read everything from the new replica set with an old
replica dead; watch a reassignment in progress and cancel one; page through
DescribeTopicPartitions; lose every in-sync replica and choose (or not) to
let an out-of-sync one lead.
"""

import os
import signal
import time

import pytest
from confluent_kafka import ElectionType, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import TopicPartition as KTP
from kafka.admin import KafkaAdminClient

from cluster import (  # noqa: F401 - fixtures
    NODE_IDS,
    broker_id,
    cluster,
    cluster_factory,
    create_topic,
    node_of,
    topic_partitions,
    wait_until,
)
from clients import check_contiguous, check_roundtrip, consume_confluent, make_records, produce_confluent, watermarks
from conftest import create_topic as create_single_node_topic
from conftest import unique_topic

UNKNOWN_TOPIC_OR_PARTITION = 3
INVALID_REPLICA_ASSIGNMENT = 39
PREFERRED_LEADER_NOT_AVAILABLE = 80
ELECTION_NOT_NEEDED = 84
NO_REASSIGNMENT_IN_PROGRESS = 85


def kadmin(c, nodes=None):
    return KafkaAdminClient(bootstrap_servers=c.bootstrap_of(nodes or c.live), request_timeout_ms=60000)


def partitions_of(c, topic, via):
    """{partition: MetadataPartition} from node `via`."""
    parts = topic_partitions(c.metadata(via, topics=[topic]), topic)
    assert parts is not None, "topic %s unknown to node %d" % (topic, via)
    return parts


def agreed_partition(c, topic, p, check, via=None, timeout=45):
    """Waits until every node in `via` (default: running ones) shows
    partition `p` of `topic` alike and `check(partition)` holds; returns it."""
    via = list(via or c.live)

    def seen():
        views = [partitions_of(c, topic, n)[p] for n in via]
        shapes = {(v.leader, v.leader_epoch, tuple(v.replicas), tuple(sorted(v.isr))) for v in views}
        return views[0] if len(shapes) == 1 and check(views[0]) else None

    return wait_until("%s-%d as wanted on nodes %r" % (topic, p, via), seen, timeout=timeout)


def ends_of(target, topic, partitions):
    wm = watermarks(target, topic, range(partitions))
    assert all(lo == 0 for lo, _ in wm.values()), wm
    return {p: hi for p, (lo, hi) in wm.items()}


def elect(c, election, partitions, nodes=None):
    """confluent elect_leaders: {(topic, partition): error code or 0}."""
    a = c.admin(nodes)  # keep the handle alive until the future resolves
    # confluent-kafka 2.16's elect_leaders rejects its timeout keywords (a binding bug).
    result = a.elect_leaders(election, partitions).result(timeout=90)
    return {(tp.topic, tp.partition): (err.code() if err is not None else 0) for tp, err in result.items()}


def reassign(c, changes, nodes=None):
    """kafka-python alter_partition_reassignments: {(topic, partition): error code or 0}."""
    a = kadmin(c, nodes)
    try:
        result = a.alter_partition_reassignments({KTP(t, p): r for (t, p), r in changes.items()})
    finally:
        a.close()
    return {(tp.topic, tp.partition): (err.errno if err is not None else 0) for tp, err in result.items()}


def ongoing(c, topic=None, nodes=None):
    """kafka-python list_partition_reassignments: {(topic, partition): (replicas, adding, removing)}."""
    a = kadmin(c, nodes)
    try:
        result = a.list_partition_reassignments({topic: [0]} if topic else None)
    finally:
        a.close()
    return {
        (tp.topic, tp.partition): (r["replicas"], r["adding_replicas"], r["removing_replicas"])
        for tp, r in result.items()
    }


def partition_dir(c, node, topic, p):
    return os.path.join(c.node(node).log_dirs, "%s-%d" % (topic, p))


# --------------------------------------------------------------------------
# ElectLeaders: preferred


def test_preferred_election_moves_leadership_back_after_a_restart(cluster):
    c = cluster
    topic = unique_topic("prefer")
    create_topic(c, topic, 3, 3)
    before = c.wait_topic(topic, 3)
    assert all(p.leader == p.replicas[0] for p in before.values()), before
    records = make_records(600, keys=30)
    acked = produce_confluent(c, topic, records[:300])

    victim = node_of(before[0].leader)
    led = sorted(i for i, p in before.items() if node_of(p.leader) == victim)
    survivors = [n for n in NODE_IDS if n != victim]
    c.stop(victim)
    c.wait_topic(topic, 3, via=survivors, led_by=survivors)
    c.start(victim)
    # Back in every ISR, but the others keep leading what they took over.
    for p in led:
        moved = agreed_partition(c, topic, p, lambda x: len(x.isr) == 3)
        assert node_of(moved.leader) != victim, moved

    assert elect(c, ElectionType.PREFERRED, [TopicPartition(topic, p) for p in led]) == {(topic, p): 0 for p in led}
    for p in led:
        back = agreed_partition(c, topic, p, lambda x: x.leader == x.replicas[0])
        assert back.leader == before[p].leader
        assert back.leader_epoch == before[p].leader_epoch + 2, "one epoch to move away, one to come back"
        assert sorted(back.isr) == sorted(back.replicas)

    again = elect(c, ElectionType.PREFERRED, [TopicPartition(topic, p) for p in range(3)] + [TopicPartition(topic, 7)])
    assert again == {**{(topic, p): ELECTION_NOT_NEEDED for p in range(3)}, (topic, 7): UNKNOWN_TOPIC_OR_PARTITION}
    # All partitions (null): leaders already preferred are left out of the answer.
    wait_until("nothing left to elect", lambda: elect(c, ElectionType.PREFERRED, None) == {}, timeout=60)

    acked += produce_confluent(c, topic, records[300:])
    ends = ends_of(c, topic, 3)
    check_roundtrip(records, acked, consume_confluent(c, topic, ends, timeout=60))


# --------------------------------------------------------------------------
# AlterPartitionReassignments / ListPartitionReassignments


def two_replica_topic(c):
    """A 1-partition topic on nodes 1 and 2 (node 1 leads); node 3 holds nothing."""
    topic = unique_topic("move")
    admin = c.admin()
    fut = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replica_assignment=[[broker_id(1), broker_id(2)]])],
        operation_timeout=30,
        request_timeout=30,
    )[topic]
    fut.result(timeout=40)
    p = c.wait_topic(topic, 1)[0]
    assert (p.leader, p.replicas) == (broker_id(1), [broker_id(1), broker_id(2)]), p
    return topic


def test_reassign_two_to_three_to_two_replicas_keeps_every_record(cluster):
    c = cluster
    b1, b2, b3 = (broker_id(n) for n in NODE_IDS)
    topic = two_replica_topic(c)
    records = make_records(900, keys=20)
    acked = produce_confluent(c, topic, records[:300])
    assert not os.path.exists(partition_dir(c, 3, topic, 0))

    # Node 3 is down: the reassignment waits for it, in progress.
    c.stop(3)
    c.controller()  # clients send reassignments to a live controller
    assert reassign(c, {(topic, 0): [b1, b2, b3]}) == {(topic, 0): 0}
    assert ongoing(c) == {(topic, 0): ([b1, b2, b3], [b3], [])}
    assert ongoing(c, topic) == {(topic, 0): ([b1, b2, b3], [b3], [])}
    p = agreed_partition(c, topic, 0, lambda x: x.replicas == [b1, b2, b3])
    assert (p.leader, sorted(p.isr)) == (b1, [b1, b2]), p
    acked += produce_confluent(c, topic, records[300:600])

    # Node 3 comes back, creates the replica, catches up, joins the ISR: done.
    c.start(3)
    p = agreed_partition(c, topic, 0, lambda x: sorted(x.isr) == [b1, b2, b3])
    assert (p.leader, p.replicas) == (b1, [b1, b2, b3]), p
    wait_until("no reassignment in progress", lambda: ongoing(c) == {}, timeout=30)
    assert os.path.isdir(partition_dir(c, 3, topic, 0))

    # 3 -> 2 without node 1, the leader: all in sync, so it completes at once
    # and leadership moves to the new first replica.
    assert reassign(c, {(topic, 0): [b3, b2]}) == {(topic, 0): 0}
    assert ongoing(c) == {}
    p = agreed_partition(c, topic, 0, lambda x: x.replicas == [b3, b2])
    assert (p.leader, sorted(p.isr)) == (b3, [b2, b3]), p
    wait_until("node 1 deleted its replica", lambda: not os.path.exists(partition_dir(c, 1, topic, 0)), timeout=30)
    acked += produce_confluent(c, topic, records[600:])

    # The old replicas are gone or dead: node 3 alone serves every record.
    c.kill9(2)
    survivors = [1, 3]
    agreed_partition(c, topic, 0, lambda x: x.isr == [b3], via=survivors)
    ends = ends_of(c.node(3), topic, 1)
    assert ends == {0: 900}
    check_roundtrip(records, acked, consume_confluent(c.node(3), topic, ends, timeout=60))

    c.start(2)
    agreed_partition(c, topic, 0, lambda x: sorted(x.isr) == [b2, b3])


def test_cancel_reassignment_and_refusals(cluster):
    c = cluster
    b1, b2, b3 = (broker_id(n) for n in NODE_IDS)
    topic = two_replica_topic(c)
    records = make_records(200, keys=10)
    acked = produce_confluent(c, topic, records)

    refused = reassign(
        c,
        {
            (topic, 0): [b1, b1],
            (topic, 5): [b1, b2],
        },
    )
    assert refused == {(topic, 0): INVALID_REPLICA_ASSIGNMENT, (topic, 5): UNKNOWN_TOPIC_OR_PARTITION}
    assert reassign(c, {(topic, 0): [b1, 9000]}) == {(topic, 0): INVALID_REPLICA_ASSIGNMENT}
    assert reassign(c, {(topic, 0): [b1, b2 + 1]}) == {(topic, 0): INVALID_REPLICA_ASSIGNMENT}, "node 2 has 1 shard"
    assert reassign(c, {("no-such-topic", 0): [b1]}) == {("no-such-topic", 0): UNKNOWN_TOPIC_OR_PARTITION}
    assert reassign(c, {(topic, 0): None}) == {(topic, 0): NO_REASSIGNMENT_IN_PROGRESS}

    c.stop(3)
    c.controller()
    assert reassign(c, {(topic, 0): [b3, b2]}) == {(topic, 0): 0}
    assert ongoing(c, topic) == {(topic, 0): ([b3, b2, b1], [b3], [b1])}
    p = agreed_partition(c, topic, 0, lambda x: x.replicas == [b3, b2, b1])
    assert p.leader == b1, "the leader stays until the target is in sync"

    assert reassign(c, {(topic, 0): None}) == {(topic, 0): 0}
    assert ongoing(c) == {}
    # As KRaft reverts: the current replicas less the adding ones, in their current order.
    p = agreed_partition(c, topic, 0, lambda x: x.replicas == [b2, b1])
    assert (p.leader, sorted(p.isr)) == (b1, [b1, b2])
    assert reassign(c, {(topic, 0): None}) == {(topic, 0): NO_REASSIGNMENT_IN_PROGRESS}

    c.start(3)
    assert not os.path.exists(partition_dir(c, 3, topic, 0))
    ends = ends_of(c, topic, 1)
    check_roundtrip(records, acked, consume_confluent(c, topic, ends, timeout=60))


# --------------------------------------------------------------------------
# DescribeTopicPartitions


def test_describe_topic_partitions_pages_like_kafka(cluster):
    c = cluster
    a, b = sorted([unique_topic("dtp-a"), unique_topic("dtp-b")])
    create_topic(c, a, 5, 2)
    create_topic(c, b, 3, 3)
    md = {t: c.wait_topic(t, n) for t, n in ((a, 5), (b, 3))}

    ka = kadmin(c)
    try:

        def page(topics, limit, cursor=None):
            r = ka.describe_topic_partitions(topics, response_partition_limit=limit, cursor=cursor)
            got = []
            for t in r["topics"]:
                assert t["error_code"] == 0, t
                for p in t["partitions"]:
                    assert p["error_code"] == 0, p
                    m = md[t["name"]][p["partition_index"]]
                    assert (p["leader_id"], p["leader_epoch"], p["replica_nodes"], sorted(p["isr_nodes"])) == (
                        m.leader,
                        m.leader_epoch,
                        m.replicas,
                        sorted(m.isr),
                    ), (t["name"], p, m)
                    assert p["offline_replicas"] == []
                    got.append((t["name"], p["partition_index"]))
            nc = r["next_cursor"]
            return got, (nc["topic_name"], nc["partition_index"]) if nc else None

        assert page([b, a], 2000) == ([(a, i) for i in range(5)] + [(b, i) for i in range(3)], None)
        first, cursor = page([a, b], 3)
        assert (first, cursor) == ([(a, 0), (a, 1), (a, 2)], (a, 3))
        second, cursor = page([a, b], 3, {"topic_name": cursor[0], "partition_index": cursor[1]})
        assert (second, cursor) == ([(a, 3), (a, 4), (b, 0)], (b, 1))
        third, cursor = page([a, b], 3, {"topic_name": cursor[0], "partition_index": cursor[1]})
        assert (third, cursor) == ([(b, 1), (b, 2)], None)
        # The limit used up exactly at a topic's end: the cursor names the next topic.
        assert page([a, b], 5) == ([(a, i) for i in range(5)], (b, 0))

        r = ka.describe_topic_partitions([a, "no-such-topic"])
        by_name = {t["name"]: t for t in r["topics"]}
        assert by_name["no-such-topic"]["error_code"] == UNKNOWN_TOPIC_OR_PARTITION
        assert by_name["no-such-topic"]["partitions"] == []
        assert len(by_name[a]["partitions"]) == 5
    finally:
        ka.close()

    # confluent's describe_topics (librdkafka uses DescribeTopicPartitions when offered).
    admin = c.admin()  # keep the handle alive until the future resolves
    d = admin.describe_topics(TopicCollection([a]), request_timeout=30)[a].result(timeout=40)
    assert [(p.id, p.leader.id, [r.id for r in p.replicas], sorted(i.id for i in p.isr)) for p in d.partitions] == [
        (i, md[a][i].leader, md[a][i].replicas, sorted(md[a][i].isr)) for i in range(5)
    ]


# --------------------------------------------------------------------------
# Unclean leader election


def test_unclean_election_only_when_enabled_or_asked(cluster):
    c = cluster
    b1, b2 = broker_id(1), broker_id(2)
    enabled, disabled = unique_topic("unclean-on"), unique_topic("unclean-off")
    admin = c.admin()
    futs = admin.create_topics(
        [
            NewTopic(enabled, num_partitions=1, replica_assignment=[[b1, b2]], config={"unclean.leader.election.enable": "true"}),
            NewTopic(disabled, num_partitions=1, replica_assignment=[[b1, b2]]),
        ],
        operation_timeout=30,
        request_timeout=30,
    )
    for f in futs.values():
        f.result(timeout=40)
    for t in (enabled, disabled):
        c.wait_topic(t, 1)
    both = make_records(100, keys=10)
    for t in (enabled, disabled):
        produce_confluent(c, t, both)

    # Node 2 stops answering: fenced, out of every ISR; node 1 alone takes more.
    os.kill(c.node(2).proc.pid, signal.SIGSTOP)
    try:
        for t in (enabled, disabled):
            agreed_partition(c, t, 0, lambda x: x.isr == [b1], via=[1, 3])
        only_node_1 = [(b"lost-%d" % i, b"only-on-node-1-%d" % i) for i in range(50)]
        for t in (enabled, disabled):
            produce_confluent(c.node(1), t, only_node_1, **{"message.timeout.ms": 20000})
        # The last in-sync replica dies; node 2 comes back out of sync.
        c.kill9(1)
    finally:
        os.kill(c.node(2).proc.pid, signal.SIGCONT)
    survivors = [2, 3]

    # Enabled: the controller elects node 2 by itself, and says what it risks.
    p = agreed_partition(c, enabled, 0, lambda x: x.leader == b2, via=survivors, timeout=60)
    assert p.isr == [b2]
    assert any(
        "unclean leader election for %s-0" % enabled in c.node(n).log_text() for n in survivors
    ), "no warning naming the partition"
    # Disabled: still leaderless (the controller passed it over on the same rounds).
    p = partitions_of(c, disabled, 2)[0]
    assert (p.leader, p.isr) == (-1, [b1]), p
    assert elect(c, ElectionType.PREFERRED, [TopicPartition(disabled, 0)], nodes=survivors) == {
        (disabled, 0): PREFERRED_LEADER_NOT_AVAILABLE
    }
    # An operator may still ask for it explicitly.
    assert elect(c, ElectionType.UNCLEAN, [TopicPartition(disabled, 0)], nodes=survivors) == {(disabled, 0): 0}
    p = agreed_partition(c, disabled, 0, lambda x: x.leader == b2, via=survivors)
    assert p.isr == [b2]
    assert elect(c, ElectionType.UNCLEAN, [TopicPartition(disabled, 0)], nodes=survivors) == {
        (disabled, 0): ELECTION_NOT_NEEDED
    }

    # What node 2 had is what there is: the records only node 1 took are lost.
    for t in (enabled, disabled):
        ends = ends_of(c.node(2), t, 1)
        assert ends == {0: len(both)}, (t, ends)
        consumed = consume_confluent(c.node(2), t, ends, timeout=60)
        check_contiguous(consumed)
        assert sorted((k, v) for _, k, v in consumed[0]) == sorted(both), t

    # Node 1 returns, drops its divergent tail and follows.
    c.start(1)
    for t in (enabled, disabled):
        agreed_partition(c, t, 0, lambda x: sorted(x.isr) == [b1, b2])
    more = [(b"after-%d" % i, b"after-%d" % i) for i in range(30)]
    produce_confluent(c, enabled, more)
    c.kill9(2)
    agreed_partition(c, enabled, 0, lambda x: x.leader == b1, via=[1, 3])
    ends = ends_of(c.node(1), enabled, 1)
    assert ends == {0: len(both) + len(more)}
    consumed = consume_confluent(c.node(1), enabled, ends, timeout=60)
    check_contiguous(consumed)
    assert sorted((k, v) for _, k, v in consumed[0]) == sorted(both + more)
    c.start(2)


# --------------------------------------------------------------------------
# A single node: one replica per partition, nothing to elect or move


def test_single_node_answers(broker_factory):
    b = broker_factory(shards=2)
    topic = unique_topic("single")
    create_single_node_topic(b, topic, 2)
    a = AdminClient({"bootstrap.servers": b.bootstrap, "log_level": 3})
    result = a.elect_leaders(ElectionType.PREFERRED, [TopicPartition(topic, 0)]).result(timeout=40)
    assert {(tp.topic, tp.partition): e.code() for tp, e in result.items()} == {(topic, 0): ELECTION_NOT_NEEDED}
    ka = KafkaAdminClient(bootstrap_servers=b.bootstrap)
    try:
        md = ka.describe_topic_partitions([topic])
        parts = md["topics"][0]["partitions"]
        assert [(p["partition_index"], p["replica_nodes"], p["isr_nodes"]) for p in parts] == [
            (p["partition_index"], [p["leader_id"]], [p["leader_id"]]) for p in parts
        ]
        assert len(parts) == 2
        owner = parts[0]["leader_id"]
        r = ka.alter_partition_reassignments({KTP(topic, 0): [owner], KTP(topic, 1): [owner + 7]})
        assert {tp.partition: (e.errno if e else 0) for tp, e in r.items()} == {0: 0, 1: INVALID_REPLICA_ASSIGNMENT}
        r = ka.alter_partition_reassignments({KTP(topic, 0): None})
        assert {tp.partition: e.errno for tp, e in r.items()} == {0: NO_REASSIGNMENT_IN_PROGRESS}
        assert ka.list_partition_reassignments() == {}
    finally:
        ka.close()


# --------------------------------------------------------------------------
# Replication throttles (reassignment quotas)


def set_configs(c, resource_type, name, configs):
    """IncrementalAlterConfigs SET (value) or DELETE (None) through confluent's admin."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    entries = [
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET if v is not None else AlterConfigOpType.DELETE)
        for k, v in configs.items()
    ]
    res = ConfigResource(resource_type, name, incremental_configs=entries)
    a = c.admin()  # keep the handle alive until the future resolves
    a.incremental_alter_configs([res])[res].result(30)


def replica_bytes(c, node, topic):
    d = partition_dir(c, node, topic, 0)
    if not os.path.isdir(d):
        return 0
    # Segment files are preallocated: count what the log holds, from the
    # stored batches' lengths, not the file sizes.
    import struct

    total = 0
    for name in sorted(os.listdir(d)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack_from(">i", data, at + 8)
            if length <= 0:
                break
            at += 12 + length
        total += at
    return total


@pytest.mark.parametrize("side", ["follower", "leader"])
def test_replication_throttle_slows_a_reassignment_catch_up(cluster, side):
    """<side>.replication.throttled.rate=200 kB/s on the replica being added
    (follower side: follower.replication.throttled.replicas=0:<node 3>;
    leader side: leader.replication.throttled.replicas=0:<node 1>, the
    leader): it copies the 8 MB log at that pace, while the in-sync replica
    on node 2 is never throttled (Kafka's rule); with the rate lifted it
    catches up and joins the ISR, every record in place."""
    from confluent_kafka.admin import ConfigResource

    c = cluster
    b1, b2, b3 = (broker_id(n) for n in NODE_IDS)
    throttled = b3 if side == "follower" else b1
    topic = two_replica_topic(c)
    records = [(k, v + b"x" * 1000) for k, v in make_records(4000, keys=20)]
    acked = produce_confluent(c, topic, records, **{"linger.ms": 5})
    rate = 200_000
    set_configs(c, ConfigResource.Type.BROKER, str(b1), {"%s.replication.throttled.rate" % side: str(rate)})
    set_configs(c, ConfigResource.Type.TOPIC, topic, {"%s.replication.throttled.replicas" % side: "0:%d" % throttled})
    # The in-sync replica is not throttled: 4.4 MB of acks=all writes, which
    # at the throttled rate would take over 20 s, go on at full speed.
    more = [(k, v + b"y" * 1000) for k, v in make_records(4000, keys=20)]
    t0 = time.monotonic()
    acked += produce_confluent(c, topic, more, **{"linger.ms": 5, "acks": "all"})
    assert time.monotonic() - t0 < 12, "acks=all took %.1f s: the in-sync replica was throttled" % (
        time.monotonic() - t0)
    records += more
    total = replica_bytes(c, 1, topic)
    assert total > 8_000_000, total

    started = time.monotonic()
    assert reassign(c, {(topic, 0): [b1, b2, b3]}) == {(topic, 0): 0}
    wait_until("node 3 started copying", lambda: replica_bytes(c, 3, topic) > 0, timeout=30)
    time.sleep(3)
    copied, elapsed = replica_bytes(c, 3, topic), time.monotonic() - started
    # One second of the rate may be banked, plus one fetch (1 MiB per
    # partition) in flight when the bucket empties.
    assert copied <= rate * (elapsed + 1) + (1 << 20), (copied, elapsed)
    assert copied < total, (copied, total)
    assert sorted(partitions_of(c, topic, 1)[0].isr) == [b1, b2], "joined the ISR before copying everything"

    set_configs(c, ConfigResource.Type.BROKER, str(b1), {"%s.replication.throttled.rate" % side: None})
    p = agreed_partition(c, topic, 0, lambda x: sorted(x.isr) == [b1, b2, b3], timeout=60)
    assert p.replicas == [b1, b2, b3]
    assert replica_bytes(c, 3, topic) == replica_bytes(c, 1, topic)
    check_roundtrip(records, acked, consume_confluent(c, topic, {0: len(records)}, timeout=60))
