"""Transactions on the 3-node cluster (tests/cluster.py), with confluent-kafka.

`__transaction_state` is replicated like `__consumer_offsets`; a
transactional id's coordinator is the leader of its partition, and the
commit/abort markers go to each data partition's leader on whichever node
it is, over the Kafka port. Killing the coordinator's node (kill -9) moves
the coordinator to a survivor that loads the id's state from its replica:
the same producer carries on (it finds the new coordinator itself), and a
read_committed consumer sees every committed transaction's records exactly
once and no aborted one.
"""

import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from cluster import (  # noqa: F401 - fixtures
    NODE_IDS,
    cluster,
    cluster_factory,
    create_topic,
    node_of,
    topic_partitions,
    wait_until,
)
from conftest import unique_topic

PARTITIONS = 3
TXN_TOPIC = "__transaction_state"


def java_hash(s):
    """Java's String.hashCode (ASCII ids here: one UTF-16 unit each)."""
    h = 0
    for c in s:
        h = (31 * h + ord(c)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= (1 << 31) else h


def coordinator_node(c, txn_id):
    """The node leading txn_id's __transaction_state partition."""
    md = c.metadata(c.live[0], topics=[TXN_TOPIC], timeout=5)
    parts = topic_partitions(md, TXN_TOPIC)
    assert parts, "no %s in metadata" % TXN_TOPIC
    h = java_hash(txn_id)
    p = (0 if h == -(1 << 31) else abs(h)) % len(parts)
    leader = parts[p].leader
    assert leader >= 0, parts[p]
    return node_of(leader)


def run_transactions(producer, topic, first, count, abort_every, committed, aborted):
    """`count` transactions numbered from `first`, 9 records each over the
    partitions; every `abort_every`-th is aborted. A transaction the client
    must abort (a retriable failure across the kill) is aborted and counted
    as such."""
    for t in range(first, first + count):
        want_abort = t % abort_every == 0
        values = ["%s-%d-%d" % ("a" if want_abort else "c", t, j) for j in range(9)]
        deadline = time.monotonic() + 120
        while True:
            try:
                producer.begin_transaction()
                for j, v in enumerate(values):
                    producer.produce(topic, value=v.encode(), partition=j % PARTITIONS)
                if want_abort:
                    producer.abort_transaction(60)
                    aborted.update(values)
                else:
                    producer.commit_transaction(60)
                    committed.update(values)
                break
            except KafkaException as e:
                err = e.args[0]
                assert not err.fatal(), "fatal error in transaction %d: %s" % (t, err)
                assert time.monotonic() < deadline, "transaction %d kept failing: %s" % (t, err)
                if err.txn_requires_abort():
                    producer.abort_transaction(60)
                    aborted.update(values)
                    # Retried under new values so the check stays exact.
                    values = ["r" + v for v in values]
                elif not err.retriable():
                    raise
                time.sleep(0.2)


def read_committed(c, topic, nodes, expected_count, timeout=90):
    consumer = Consumer({
        **c.consumer_config(),
        "bootstrap.servers": c.bootstrap_of(nodes),
        "group.id": "verify-" + topic,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    })
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    got = []
    deadline = time.monotonic() + timeout
    idle_since = None
    while time.monotonic() < deadline:
        m = consumer.poll(0.5)
        if m is None:
            if len(got) >= expected_count:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 3:
                    break
            continue
        if m.error():
            continue
        idle_since = None
        got.append(m.value().decode())
    consumer.close()
    return got


def test_transactions_survive_killing_the_coordinator_node(cluster):
    c = cluster
    topic = unique_topic("ctx")
    create_topic(c, topic, PARTITIONS, 3)
    c.wait_topic(topic, PARTITIONS)
    wait_until(TXN_TOPIC + " created", lambda: topic_partitions(c.metadata(c.live[0], topics=[TXN_TOPIC], timeout=5),
                                                                 TXN_TOPIC), timeout=60)
    txn_id = "ctx-" + topic
    producer = Producer(c.producer_config(**{"transactional.id": txn_id, "enable.idempotence": True,
                                             "transaction.timeout.ms": 120000, "message.timeout.ms": 120000}))
    producer.init_transactions(60)
    committed, aborted = set(), set()
    run_transactions(producer, topic, 0, 12, 4, committed, aborted)

    victim = coordinator_node(c, txn_id)
    c.kill9(victim)
    killed_at = time.monotonic()
    survivors = [n for n in NODE_IDS if n != victim]
    # The coordinator moves to a survivor holding a replica of its partition.
    wait_until("a new coordinator", lambda: coordinator_node(c, txn_id) in survivors, timeout=90)
    run_transactions(producer, topic, 12, 12, 4, committed, aborted)
    producer.flush(30)
    print("coordinator node %d killed; 12 more transactions done %.1f s later; %d records committed, %d aborted"
          % (victim, time.monotonic() - killed_at, len(committed), len(aborted)))

    got = read_committed(c, topic, survivors, len(committed))
    dupes = sorted(v for v in set(got) if got.count(v) > 1)
    assert not dupes, "records read twice: %s" % dupes[:10]
    assert not (set(got) & aborted), "aborted records visible: %s" % sorted(set(got) & aborted)[:10]
    assert set(got) == committed, "missing %s, unexpected %s" % (
        sorted(committed - set(got))[:10], sorted(set(got) - committed)[:10])
    # Per partition, the order of transactions is kept.
    for p in range(PARTITIONS):
        seq = [int(v.split("-")[1]) for v in got if int(v.split("-")[2]) % PARTITIONS == p]
        assert seq == sorted(seq), "partition %d out of order: %s" % (p, seq[:20])

    c.start(victim)
    got_all = read_committed(c, topic, NODE_IDS, len(committed))
    assert sorted(got_all) == sorted(committed)
