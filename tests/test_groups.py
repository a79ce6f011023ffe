"""Consumer groups against the real binary with real clients: rebalances as
members leave, join and crash; committed offsets surviving a broker restart;
static membership; DescribeGroups/ListGroups/OffsetFetch matching what the
clients see; Kafka's errors for bad commits and heartbeats."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import kafka_wire as kw

HERE = os.path.dirname(os.path.abspath(__file__))
PARTITIONS = 6
ALL = set(range(PARTITIONS))


def create_topic(broker, name, partitions=PARTITIONS):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)


def produce(broker, topic, values):
    """Values keyed round-robin over partitions; returns {value: partition}."""
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5, "log_level": 3})
    where = {}

    def done(err, msg):
        assert err is None, err
        where[msg.value().decode()] = msg.partition()

    for i, v in enumerate(values):
        p.produce(topic, value=v.encode(), partition=i % PARTITIONS, on_delivery=done)
    assert p.flush(60) == 0
    assert len(where) == len(values)
    return where


class Worker:
    def __init__(self, tmp_path, broker, kind, group, topic, name, instance=None):
        self.name = name
        self.out = str(tmp_path / ("%s.jsonl" % name))
        args = [sys.executable, os.path.join(HERE, "group_worker.py"), kind, broker.bootstrap, group, topic, self.out]
        if instance:
            args.append(instance)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.out + ".err", "w"))

    def lines(self):
        try:
            with open(self.out) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def assignment(self):
        a = [ln["assign"] for ln in self.lines() if "assign" in ln]
        return set(a[-1]) if a else None

    def values(self):
        return [ln["v"] for ln in self.lines() if "v" in ln]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        assert any("closed" in ln for ln in self.lines()), open(self.out + ".err").read()

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


def wait_partitioned(workers, timeout=60):
    """Until the workers' current assignments split all partitions exactly
    once among them (nothing orphaned, nothing doubled). Returns the split."""
    deadline = time.monotonic() + timeout
    while True:
        a = {w.name: w.assignment() for w in workers}
        sets = [s for s in a.values() if s is not None]
        if len(sets) == len(workers):
            union = set().union(*sets)
            if union == ALL and sum(len(s) for s in sets) == PARTITIONS and all(sets):
                return a
        for w in workers:
            assert w.proc.poll() is None, "%s exited: %s" % (w.name, open(w.out + ".err").read())
        if time.monotonic() > deadline:
            raise AssertionError("assignments never partitioned %s: %r" % (sorted(ALL), a))
        time.sleep(0.2)


def wait_consumed(workers, expected, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        seen = set()
        for w in workers:
            seen.update(w.values())
        missing = expected - seen
        if not missing:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError("%d of %d records never consumed, e.g. %r" % (len(missing), len(expected), sorted(missing)[:5]))
        time.sleep(0.2)


def committed(broker, group, topic):
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "log_level": 3})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def test_group_rebalances_and_resumes_after_restart(broker, tmp_path):
    topic, group = "grp-%s" % uuid.uuid4().hex[:6], "g-%s" % uuid.uuid4().hex[:6]
    create_topic(broker, topic)
    first = ["a-%d" % i for i in range(600)]
    produce(broker, topic, first)
    a = Worker(tmp_path, broker, "ck", group, topic, "a")
    b = Worker(tmp_path, broker, "kp", group, topic, "b")
    c = Worker(tmp_path, broker, "ck", group, topic, "c")
    split = wait_partitioned([a, b, c])
    assert all(len(s) == 2 for s in split.values()), split
    wait_consumed([a, b, c], set(first))

    # A leaves cleanly: b and c take its partitions.
    t0 = time.monotonic()
    a.stop()
    wait_partitioned([b, c], timeout=30)
    # D joins.
    d = Worker(tmp_path, broker, "kp", group, topic, "d")
    wait_partitioned([b, c, d], timeout=30)
    # C crashes: within the session timeout (6 s) plus a rebalance, b and d own everything.
    c.kill()
    wait_partitioned([b, d], timeout=30)
    rebalance_s = time.monotonic() - t0
    second = ["b-%d" % i for i in range(600)]
    produce(broker, topic, second)
    wait_consumed([b, d], set(second))
    b.stop()
    d.stop()
    everything = [v for w in (a, b, c, d) for v in w.values()]
    assert set(everything) == set(first) | set(second)
    # Redelivery is bounded by what was never committed: at most the crashed
    # member's last uncommitted poll plus revocation races, never whole partitions.
    assert len(everything) - len(set(everything)) < 300, len(everything) - len(set(everything))

    before = committed(broker, group, topic)
    ends = {p: 200 for p in range(PARTITIONS)}
    assert before == ends, before
    broker.restart()
    assert committed(broker, group, topic) == ends

    third = ["c-%d" % i for i in range(120)]
    produce(broker, topic, third)
    e = Worker(tmp_path, broker, "ck", group, topic, "e")
    wait_partitioned([e])
    wait_consumed([e], set(third))
    time.sleep(1)
    e.stop()
    got = [ln for ln in e.lines() if "v" in ln]
    # Exactly the new records, from the committed offsets on.
    assert sorted(ln["v"] for ln in got) == sorted(third)
    assert {ln["p"]: min(x["o"] for x in got if x["p"] == ln["p"]) for ln in got} == ends
    print("rebalance sequence (leave, join, crash) took %.1fs" % rebalance_s)


def test_static_member_returns_without_rebalance(broker):
    topic, group = "st-%s" % uuid.uuid4().hex[:6], "gs-%s" % uuid.uuid4().hex[:6]
    create_topic(broker, topic)

    events = {}  # instance -> [("assign" | "revoke", partitions)], one list per process

    def member(instance):
        c = Consumer(
            {
                "bootstrap.servers": broker.bootstrap,
                "group.id": group,
                "group.instance.id": instance,
                "session.timeout.ms": 15000,
                "partition.assignment.strategy": "range",
                "log_level": 3,
            }
        )
        seen = events[instance] = []
        c.subscribe(
            [topic],
            on_assign=lambda _, ps: seen.append(("assign", {tp.partition for tp in ps})),
            on_revoke=lambda _, ps: seen.append(("revoke", {tp.partition for tp in ps})),
        )
        return c

    def wait_assigned(cs, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in cs:
                c.poll(0.1)
            got = [set(tp.partition for tp in c.assignment()) for c in cs]
            if set().union(*got) == ALL and sum(map(len, got)) == PARTITIONS and all(got):
                return got
        raise AssertionError("not assigned: %r" % [c.assignment() for c in cs])

    s1, s2 = member("inst-1"), member("inst-2")
    first = wait_assigned([s1, s2])
    gens_before = broker.log_text().count("group %s: generation" % group)
    s2_seen = list(events["inst-2"])
    s1.close()  # static members do not leave the group on close (KIP-345)
    s1 = member("inst-1")
    again = wait_assigned([s1, s2])
    assert again == first
    # The returning process gets its old partitions in one assign; the other
    # member sees no rebalance at all (no revoke, no assign).
    assert events["inst-1"] == [("assign", first[0])], events["inst-1"]
    deadline = time.monotonic() + 2.5  # five heartbeats: a late rebalance would show
    while time.monotonic() < deadline:
        s1.poll(0.1)
        s2.poll(0.1)
    assert events["inst-2"] == s2_seen, events["inst-2"]
    assert events["inst-1"] == [("assign", first[0])], events["inst-1"]
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    desc = admin.describe_consumer_groups([group])[group].result(30)
    assert str(desc.state).endswith("STABLE"), desc.state
    assert sorted(m.group_instance_id for m in desc.members) == ["inst-1", "inst-2"]
    # No new generation: the group did not rebalance.
    assert broker.log_text().count("group %s: generation" % group) == gens_before
    s1.close()
    s2.close()


def test_describe_list_and_lag(broker):
    topic, group = "ds-%s" % uuid.uuid4().hex[:6], "gd-%s" % uuid.uuid4().hex[:6]
    create_topic(broker, topic)
    produce(broker, topic, ["v%d" % i for i in range(60)])
    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": group,
            "client.id": "describe-me",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "partition.assignment.strategy": "roundrobin",
            "log_level": 3,
        }
    )
    c.subscribe([topic])
    n = 0
    deadline = time.monotonic() + 30
    while n < 30 and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            n += 1
    c.commit(asynchronous=False)
    pos = {tp.partition: tp.offset for tp in c.position(c.assignment())}
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    listed = admin.list_consumer_groups().result(30)
    assert group in [g.group_id for g in listed.valid]
    desc = admin.describe_consumer_groups([group])[group].result(30)
    assert str(desc.state).endswith("STABLE")
    assert desc.partition_assignor == "roundrobin"
    assert len(desc.members) == 1
    (mem,) = desc.members
    assert mem.client_id == "describe-me"
    assert sorted(tp.partition for tp in mem.assignment.topic_partitions) == sorted(ALL)
    assert {tp.partition for tp in c.assignment()} == ALL
    # Lag = end offset - committed offset, from ListOffsets and OffsetFetch.
    from confluent_kafka import ConsumerGroupTopicPartitions

    offs = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result(30)
    got = {tp.partition: tp.offset for tp in offs.topic_partitions if tp.topic == topic}
    assert got == {p: o for p, o in pos.items() if o >= 0} or got == pos
    lag = 0
    for p in range(PARTITIONS):
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        assert hi == 10
        lag += hi - got.get(p, 0)
    assert lag == 60 - n
    c.close()
    # After the member left, the group is Empty and can be deleted.
    desc = admin.describe_consumer_groups([group])[group].result(30)
    assert str(desc.state).endswith("EMPTY")
    admin.delete_consumer_groups([group])[group].result(30)
    assert group not in [g.group_id for g in admin.list_consumer_groups().result(30).valid]


# --------------------------------------------------------------------------
# raw frames for the bad-input cases

FIND_COORDINATOR, OFFSET_COMMIT, OFFSET_FETCH, HEARTBEAT = 10, 8, 9, 12


def coordinator_port(broker, group):
    with kw.Conn(broker.port) as conn:
        r = conn.request(FIND_COORDINATOR, 1, kw.string(group) + kw.i8(0))
        r.i32()  # throttle
        assert r.i16() == 0
        r.string()  # error message (nullable: None)
        r.i32()
        r.string()
        return r.i32()


def offset_commit_v2(conn, group, generation, member, topics):
    body = kw.string(group) + kw.i32(generation) + kw.string(member) + kw.i64(-1)
    body += kw.array(
        topics,
        lambda t: kw.string(t[0]) + kw.array(t[1], lambda p: kw.i32(p[0]) + kw.i64(p[1]) + kw.string(p[2])),
    )
    r = conn.request(OFFSET_COMMIT, 2, body)
    return {
        (t, p): e for t, ps in r.array(lambda rr: (rr.string(), rr.array(lambda x: (x.i32(), x.i16())))) for p, e in ps
    }


def heartbeat_v0(conn, group, generation, member):
    r = conn.request(HEARTBEAT, 0, kw.string(group) + kw.i32(generation) + kw.string(member))
    return r.i16()


def offset_fetch_v1(conn, group, topic, partitions):
    body = kw.string(group) + kw.array([topic], lambda t: kw.string(t) + kw.array(partitions, kw.i32))
    r = conn.request(OFFSET_FETCH, 1, body)
    out = {}
    for t, ps in r.array(lambda rr: (rr.string(), rr.array(lambda x: (x.i32(), x.i64(), x.string(), x.i16())))):
        for p, o, meta, e in ps:
            out[(t, p)] = (o, meta, e)
    return out


def test_bad_commits_and_heartbeats(broker):
    topic, group = "bad-%s" % uuid.uuid4().hex[:6], "gb-%s" % uuid.uuid4().hex[:6]
    create_topic(broker, topic)
    port = coordinator_port(broker, group)
    assert port in broker.ports
    other = [p for p in broker.ports if p != port][0]
    with kw.Conn(other) as conn:
        res = offset_commit_v2(conn, group, -1, "", [(topic, [(0, 5, "")])])
        assert res == {(topic, 0): 16}  # NOT_COORDINATOR
    with kw.Conn(port) as conn:
        res = offset_commit_v2(
            conn,
            group,
            -1,
            "",
            [(topic, [(0, 5, "ok"), (99, 1, ""), (1, 7, "x" * 5000)]), ("no-such-topic-x", [(0, 1, "")])],
        )
        assert res == {(topic, 0): 0, (topic, 99): 3, (topic, 1): 12, ("no-such-topic-x", 0): 3}
        fetched = offset_fetch_v1(conn, group, topic, [0, 1])
        # Only the valid commit was written.
        assert fetched == {(topic, 0): (5, "ok", 0), (topic, 1): (-1, "", 0)}
        # Unknown member / wrong generation while the group is empty.
        assert heartbeat_v0(conn, group, 1, "nobody") == 25  # UNKNOWN_MEMBER_ID
        res = offset_commit_v2(conn, group, 3, "nobody", [(topic, [(0, 9, "")])])
        assert res == {(topic, 0): 25}

    # A live member: wrong generation gets ILLEGAL_GENERATION.
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "log_level": 3, "session.timeout.ms": 6000})
    c.subscribe([topic])
    deadline = time.monotonic() + 30
    while not c.assignment() and time.monotonic() < deadline:
        c.poll(0.2)
    member = c.memberid()
    assert member
    with kw.Conn(port) as conn:
        assert heartbeat_v0(conn, group, 999, member) == 22  # ILLEGAL_GENERATION
        assert offset_commit_v2(conn, group, 999, member, [(topic, [(0, 9, "")])]) == {(topic, 0): 22}
        assert offset_commit_v2(conn, group, -1, "", [(topic, [(0, 9, "")])]) == {(topic, 0): 25}
        assert heartbeat_v0(conn, group, 1, "bogus") == 25
        # Nothing was written by the refused commits.
        assert offset_fetch_v1(conn, group, topic, [0])[(topic, 0)][0] == 5
    c.close()
