"""Replication under faults, on the 3-node cluster of tests/cluster.py, with
real clients (confluent-kafka / librdkafka), checked the way Jepsen's Kafka
workload checks a log:

- lost write: every acknowledged record is read back, at the offset its ack
  named, with its value;
- duplicate: no value is in the log twice (idempotent producer);
- inconsistent offsets: one offset holds one value, on every replica (the
  three nodes' segment files hold the same batches once healed);
- nonmonotonic poll: a consumer's offsets only go up, per partition.

The leader-kill test runs TIDELOG_FAULT_ROUNDS rounds (3 in CI; the issue's
long form is 20: `TIDELOG_FAULT_ROUNDS=20 python3 -m pytest tests/test_replication_faults.py -k leader_kill`).
"""

import os
import signal
import time

from confluent_kafka import KafkaError, Producer

import kafka_wire as kw
from clients import consume_confluent
from cluster import (  # noqa: F401 - fixtures
    NODE_IDS,
    cluster,
    cluster_factory,
    create_topic,
    node_of,
    wait_until,
)
from conftest import unique_topic
from replication_checks import (
    PARTITIONS,
    BackgroundProducer,
    check_log,
    check_replicas_identical,
    ends_via,
    leaders,
    produce_one,
    rf3_topic,
    wait_full_isr,
)

ROUNDS = int(os.environ.get("TIDELOG_FAULT_ROUNDS", "3"))


def test_leader_kill_loop_loses_no_acked_record(cluster):
    """Continuous acks=all idempotent produce to an RF 3 topic with
    min.insync.replicas=2 while, ROUNDS times, the leader of one partition is
    SIGKILLed and restarted."""
    c = cluster
    topic = rf3_topic(c, "kill", min_insync=2)
    prod = BackgroundProducer(c, topic)
    wait_until("first acks", lambda: len(prod.acked) >= 500 or prod.errors, timeout=60)
    epochs = []
    for r in range(ROUNDS):
        live = sorted(c.live)
        parts = leaders(c, topic, live[0])
        victim = node_of(parts[r % PARTITIONS].leader)
        before = len(prod.acked)
        c.kill9(victim)
        survivors = [n for n in NODE_IDS if n != victim]
        # Writes go on once the partition has a new leader on a survivor.
        wait_until("acks after killing node %d" % victim, lambda: len(prod.acked) > before + 200 or prod.errors,
                   timeout=60)
        c.start(victim)
        wait_full_isr(c, topic, survivors[0])
        epochs.append(leaders(c, topic, survivors[0])[r % PARTITIONS].leader_epoch)
        print("round %d: killed node %d, %d acks so far, leader epoch now %d" % (r, victim, len(prod.acked), epochs[-1]))
    prod.stop()
    assert not prod.errors, "%d delivery errors, first %r" % (len(prod.errors), prod.errors[:3])
    assert len(prod.acked) == prod.sent, (len(prod.acked), prod.sent)
    ends = ends_via(c, topic, 1)
    assert sum(ends.values()) == len(prod.acked), ("high watermarks %r vs %d acked" % (ends, len(prod.acked)))
    consumed = consume_confluent(c.node(1), topic, ends, timeout=120)
    problems = check_log(prod.acked, consumed)
    wait_full_isr(c, topic, 1)
    # Followers fetch until they reach the leader's end; give them a moment.
    wait_until("replicas identical", lambda: not check_replicas_identical(c, topic, ends), timeout=30)
    assert not problems, "\n".join(problems)
    assert epochs == sorted(epochs), "leader epochs went backwards: %r" % epochs




def test_losing_replicas_refuses_acks_all_but_not_acks_1(cluster):
    """One node lost (the quorum keeps a majority): it is fenced and leaves
    the ISR, so with min.insync.replicas=3 acks=all gets NOT_ENOUGH_REPLICAS
    while acks=1 succeeds. A second node lost (the quorum too, as the
    controllers run on the same nodes): nothing can change the ISR any more,
    so acks=all is never acknowledged, and acks=1 still succeeds on the
    survivor for the partitions it leads. Nothing acked before is lost."""
    c = cluster
    topic = rf3_topic(c, "minisr", min_insync=3)
    before = BackgroundProducer(c, topic)
    wait_until("acks", lambda: len(before.acked) >= 300, timeout=60)
    before.stop()
    assert not before.errors, before.errors[:3]

    first, second, survivor = 3, 2, 1
    c.kill9(first)

    def shrunk():
        parts = leaders(c, topic, survivor)
        return parts and all(p.leader >= 0 and node_of(p.leader) != first and len(p.isr) == 2 for p in parts.values())

    wait_until("node %d fenced and out of every ISR" % first, shrunk, timeout=90)
    err = produce_one(c, survivor, topic, 0, "all", 15000, retries=0)
    assert err is not None and err.code() == KafkaError.NOT_ENOUGH_REPLICAS, err
    assert produce_one(c, survivor, topic, 0, "1", 15000) is None

    c.kill9(second)
    led = [i for i, p in leaders(c, topic, survivor).items() if node_of(p.leader) == survivor]
    assert led, "node %d leads none of %s" % (survivor, topic)
    err = produce_one(c, survivor, topic, led[0], "all", 8000)
    assert err is not None, "acks=all acknowledged with two of three nodes down"
    assert produce_one(c, survivor, topic, led[0], "1", 15000) is None

    c.start()
    wait_full_isr(c, topic, survivor)
    ends = ends_via(c, topic, survivor)
    consumed = consume_confluent(c.node(survivor), topic, ends, timeout=60)
    problems = check_log(before.acked, consumed)
    assert not problems, "\n".join(problems)


def test_paused_leader_loses_no_acked_record(cluster):
    """A network partition of the leader, by SIGSTOP: it stops answering, is
    fenced, another ISR member leads; after SIGCONT it learns it was deposed,
    truncates what only it had, catches up, and no acknowledged record is lost
    or duplicated."""
    c = cluster
    topic = rf3_topic(c, "pause", min_insync=2)
    prod = BackgroundProducer(c, topic)
    wait_until("first acks", lambda: len(prod.acked) >= 500, timeout=60)
    victim = node_of(leaders(c, topic, 1)[0].leader)
    survivors = [n for n in NODE_IDS if n != victim]
    os.kill(c.node(victim).proc.pid, signal.SIGSTOP)
    try:
        def moved():
            parts = leaders(c, topic, survivors[0])
            return parts and node_of(parts[0].leader) != victim

        wait_until("partition 0 led by a survivor", moved, timeout=90)
        before = len(prod.acked)
        wait_until("acks while node %d is paused" % victim, lambda: len(prod.acked) > before + 300, timeout=60)
    finally:
        os.kill(c.node(victim).proc.pid, signal.SIGCONT)
    wait_full_isr(c, topic, survivors[0])
    prod.stop()
    assert not prod.errors, prod.errors[:3]
    ends = ends_via(c, topic, survivors[0])
    consumed = consume_confluent(c.node(survivors[0]), topic, ends, timeout=120)
    problems = check_log(prod.acked, consumed)
    wait_until("replicas identical", lambda: not check_replicas_identical(c, topic, ends), timeout=30)
    assert not problems, "\n".join(problems)


def test_group_offsets_survive_losing_a_broker(cluster):
    """A consumer group's committed offsets live in __consumer_offsets (RF 3):
    after its coordinator's node is killed, the group's new coordinator on
    another node has them, and a new member resumes exactly there."""
    from confluent_kafka import Consumer, TopicPartition

    c = cluster
    topic = unique_topic("grp")
    create_topic(c, topic, PARTITIONS, 3)
    c.wait_topic(topic, PARTITIONS)
    prod = BackgroundProducer(c, topic)
    wait_until("acks", lambda: len(prod.acked) >= 600, timeout=60)
    prod.stop()
    group = "g-" + topic
    consumer = Consumer(c.consumer_config(**{"group.id": group, "auto.offset.reset": "earliest",
                                             "enable.auto.commit": False, "enable.auto.offset.store": True,
                                             "enable.partition.eof": False}))
    consumer.subscribe([topic])
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 300 and time.monotonic() < deadline:
        m = consumer.poll(1.0)
        if m is not None and not m.error():
            seen += 1
    assert seen >= 300
    committed = {tp.partition: tp.offset for tp in consumer.commit(asynchronous=False) if tp.offset >= 0}
    consumer.close()
    assert committed and sum(committed.values()) >= seen, (committed, seen)
    # Find the coordinator and kill its node.
    admin = c.admin()
    desc = admin.describe_consumer_groups([group])[group].result(30)
    victim = node_of(desc.coordinator.id)
    c.kill9(victim)
    survivors = [n for n in NODE_IDS if n != victim]

    def fetched():
        cons = Consumer(c.node(survivors[0]).consumer_config(**{"group.id": group}))
        try:
            got = cons.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
            return {tp.partition: tp.offset for tp in got if tp.offset >= 0 and tp.partition in committed}
        finally:
            cons.close()

    got = wait_until("committed offsets from the new coordinator", lambda: fetched() == committed and fetched(),
                     timeout=90)
    # The killed node cannot answer, so these came from a coordinator on a
    # survivor that loaded the group from its replica of __consumer_offsets.
    assert got == committed
    c.start(victim)


def replica_fetch(port, topic, partition, offset, replica_id):
    """A follower's Fetch v4 (replica id set, no leader epoch in v4) to one
    broker port: (error code, high watermark, records bytes)."""
    with kw.Conn(port) as conn:
        body = kw.fetch_body_v4([(topic, [(partition, offset, 1 << 20)])], max_wait_ms=0, min_bytes=0,
                                replica_id=replica_id)
        corr = conn.send_request(1, 4, body)
        r = conn.recv_response(corr)
        r.i32()  # throttle_time_ms
        assert r.i32() == 1
        assert r.string() == topic
        assert r.i32() == 1
        assert r.i32() == partition
        error, hw = r.i16(), r.i64()
        r.i64()  # last_stable_offset
        aborted = r.i32()
        assert aborted <= 0
        records = r.kbytes()
        return error, hw, len(records or b"")


def test_replica_fetch_bad_input(cluster):
    """A follower asking for an offset past the leader's log end gets
    OFFSET_OUT_OF_RANGE (and a real follower then truncates: see the fetcher);
    a broker that is not a replica, or a replica fetch sent to a follower,
    gets NOT_LEADER_OR_FOLLOWER; a good replica fetch is served."""
    c = cluster
    topic = unique_topic("rawrepl")
    create_topic(c, topic, 1, 2)  # 2 replicas of 3 nodes: one node holds none
    parts = c.wait_topic(topic, 1)
    leader = parts[0].leader
    follower = next(r for r in parts[0].replicas if r != leader)
    outsider_node = next(n for n in NODE_IDS if all(node_of(r) != n for r in parts[0].replicas))
    p = Producer(c.producer_config(**{"acks": "all"}))
    for i in range(10):
        p.produce(topic, value=b"r%d" % i, partition=0)
    assert p.flush(30) == 0
    port = c.node(node_of(leader)).port
    wait_until("high watermark 10", lambda: replica_fetch(port, topic, 0, 0, follower)[1] == 10, timeout=30)
    error, hw, n = replica_fetch(port, topic, 0, 1000, follower)
    assert error == 1, "fetch past the log end: error %d (want OFFSET_OUT_OF_RANGE)" % error
    error, _, _ = replica_fetch(port, topic, 0, 0, outsider_node * 1000)
    assert error == 6, "fetch from a broker that is not a replica: error %d (want NOT_LEADER_OR_FOLLOWER)" % error
    error, _, _ = replica_fetch(c.node(node_of(follower)).port, topic, 0, 0, leader)
    assert error == 6, "replica fetch sent to a follower: error %d (want NOT_LEADER_OR_FOLLOWER)" % error
    error, hw, n = replica_fetch(port, topic, 0, 0, follower)
    assert error == 0 and hw == 10 and n > 0, (error, hw, n)
