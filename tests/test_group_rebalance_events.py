"""Rebalance events as real clients see them (issue 16, the group part):
every member's on_assign / on_revoke calls are counted and compared with
what Apache Kafka's classic group coordinator gives (KIP-345 static
membership, KIP-429 cooperative rebalancing), and synchronous commits made
while a rebalance is under way complete.

Counting rule (librdkafka): an eager member gets one revoke (its whole
assignment) and one assign per rebalance it takes part in; a cooperative
member gets exactly one assign per rebalance (possibly an empty list) and a
revoke only for partitions that move away from it. So "exactly one more
assign and no revoke" on a remaining member means exactly one rebalance
that took nothing from it. The broker's log line per generation is checked
too, so a rebalance no client reported would still count.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from conftest import create_topic, unique_topic

SESSION_MS = 6000  # group.min.session.timeout.ms, Kafka's default
HEARTBEAT_MS = 500
QUIET_S = 2.5  # five heartbeat intervals: a follow-up rebalance would show in it


def group_name(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def parts(topic, n):
    return frozenset((topic, p) for p in range(n))


class Member:
    """A confluent-kafka group member whose rebalance callbacks are recorded."""

    def __init__(self, broker, group, topics, name, strategy="range", instance=None, **extra):
        self.name = name
        self.events = []  # ("assign" | "revoke", frozenset((topic, partition)))
        self.records = []  # (topic, partition, offset, value)
        self.on_revoke_hook = None
        conf = {
            "bootstrap.servers": broker.bootstrap,
            "group.id": group,
            "session.timeout.ms": SESSION_MS,
            "heartbeat.interval.ms": HEARTBEAT_MS,
            "partition.assignment.strategy": strategy,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "log_level": 3,
        }
        if instance:
            conf["group.instance.id"] = instance
        conf.update(extra)
        self.c = Consumer(conf)
        self.closed = False
        self.subscribe(topics)

    def subscribe(self, topics):
        self.c.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _on_assign(self, consumer, partitions):
        self.events.append(("assign", frozenset((p.topic, p.partition) for p in partitions)))

    def _on_revoke(self, consumer, partitions):
        self.events.append(("revoke", frozenset((p.topic, p.partition) for p in partitions)))
        if self.on_revoke_hook:
            self.on_revoke_hook(consumer, partitions)

    def count(self, kind):
        return sum(1 for k, _ in self.events if k == kind)

    def counts(self):
        return (self.count("assign"), self.count("revoke"))

    def owned(self):
        return frozenset((p.topic, p.partition) for p in self.c.assignment())

    def poll(self, timeout=0.05):
        m = self.c.poll(timeout)
        if m is not None and m.error() is None:
            self.records.append((m.topic(), m.partition(), m.offset(), m.value().decode()))

    def close(self):
        if not self.closed:
            self.c.close()
            self.closed = True

    def __repr__(self):
        return "%s(events=%r)" % (self.name, [(k, sorted(p for _, p in s)) for k, s in self.events])


class Crasher:
    """A cooperative-sticky librdkafka member in its own process, to SIGKILL."""

    SCRIPT = r"""
import json, sys
from confluent_kafka import Consumer
bootstrap, group, topic, out, session, heartbeat = sys.argv[1:7]
f = open(out, "a", buffering=1)
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": int(session),
              "heartbeat.interval.ms": int(heartbeat), "partition.assignment.strategy": "cooperative-sticky",
              "enable.auto.commit": False, "log_level": 3})
def ev(kind):
    return lambda consumer, ps: f.write(json.dumps([kind, [[p.topic, p.partition] for p in ps]]) + "\n")
c.subscribe([topic], on_assign=ev("assign"), on_revoke=ev("revoke"))
while True:
    c.poll(0.1)
"""

    def __init__(self, tmp_path, broker, group, topic, name):
        self.name = name
        self.out = str(tmp_path / ("%s.jsonl" % name))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, broker.bootstrap, group, topic, self.out, str(SESSION_MS), str(HEARTBEAT_MS)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.out + ".err", "w"),
        )
        self.closed = False

    @property
    def events(self):
        try:
            with open(self.out) as f:
                lines = [json.loads(line) for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []
        return [(kind, frozenset(tuple(p) for p in ps)) for kind, ps in lines]

    def counts(self):
        kinds = [k for k, _ in self.events]
        return (kinds.count("assign"), kinds.count("revoke"))

    def owned(self):
        got = frozenset()
        for kind, ps in self.events:
            got = got | ps if kind == "assign" else got - ps
        return got

    def poll(self, timeout=0.05):
        assert self.proc.poll() is None, "%s exited: %s" % (self.name, open(self.out + ".err").read())
        time.sleep(timeout)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.closed = True

    def __repr__(self):
        return "%s(owned=%r)" % (self.name, sorted(self.owned()))


def poll_until(members, cond, what, timeout=30):
    """Polls every open member (their callbacks run in poll) until `cond()`."""
    deadline = time.monotonic() + timeout
    while True:
        for m in members:
            if not m.closed:
                m.poll()
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError("%s: not reached in %ss: %r" % (what, timeout, members))


def keep_polling(members, seconds):
    """Polls every open member for `seconds` (a window for unexpected events)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for m in members:
            if not m.closed:
                m.poll()


def split_is(members, everything):
    """The members' current assignments split `everything` exactly once, none empty."""
    owned = [m.owned() for m in members]
    return all(owned) and sum(len(o) for o in owned) == len(everything) and frozenset().union(*owned) == everything


def settle(members, everything, timeout=60):
    """Until the split holds and a quiet window passes with no callback at all."""
    deadline = time.monotonic() + timeout
    while True:
        poll_until(members, lambda: split_is(members, everything), "initial split", timeout=timeout)
        before = [len(m.events) for m in members]
        keep_polling(members, QUIET_S)
        if [len(m.events) for m in members] == before and split_is(members, everything):
            return
        if time.monotonic() > deadline:
            raise AssertionError("group never settled: %r" % members)


def generation(broker, group):
    """The group's latest generation as the broker logged it."""
    gens = [int(g) for g in re.findall(r"group %s: generation (\d+) with" % re.escape(group), broker.log_text())]
    return max(gens) if gens else 0


def describe(broker, group):
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    return admin.describe_consumer_groups([group])[group].result(30)


def state_is(broker, group, name):
    return str(describe(broker, group).state).endswith(name)


def produce(broker, topic, partitions, per_partition, prefix):
    p = Producer(broker.producer_config(**{"linger.ms": 5}))
    acked = []

    def done(err, msg):
        assert err is None, err
        acked.append(msg.value().decode())

    for part in range(partitions):
        for i in range(per_partition):
            p.produce(topic, value=("%s-%d-%d" % (prefix, part, i)).encode(), partition=part, on_delivery=done)
    assert p.flush(60) == 0
    assert len(acked) == partitions * per_partition
    return set(acked)


# --------------------------------------------------------------------------
# 1. static membership (KIP-345)


def test_static_members_session_expiry_and_leaves_rebalance_exactly_once(broker):
    """Four static members (librdkafka, eager range) on 6 partitions.
    A: s4 closes (a static member sends no LeaveGroup): the group keeps it
    for session.timeout.ms, then its expiry is one rebalance: each of the
    three others exactly one revoke and one assign.
    B: s3 unsubscribes (librdkafka's LeaveGroup by member id): one rebalance
    at once for s1 and s2.
    C: s2 closes and an admin removes it by group.instance.id (kafka-python's
    remove_group_members, LeaveGroup v3+ with the member identity): one
    rebalance for s1, and nothing more when s2's session would have expired."""
    from kafka.admin import KafkaAdminClient, MemberToRemove

    topic, group = unique_topic("static"), group_name("gst")
    create_topic(broker, topic, 6)
    everything = parts(topic, 6)
    s = [Member(broker, group, [topic], "s%d" % i, instance="inst-%d" % i) for i in range(1, 5)]
    settle(s, everything)
    gen = generation(broker, group)
    assert gen >= 1

    # A: s4 goes away without a word.
    before = {m.name: m.counts() for m in s[:3]}
    s4_member = s[3].c.memberid()
    s[3].close()
    # Within its session the group still holds it, Stable, no rebalance.
    desc = describe(broker, group)
    assert str(desc.state).endswith("STABLE"), desc.state
    assert sorted(m.group_instance_id for m in desc.members) == ["inst-1", "inst-2", "inst-3", "inst-4"]
    remaining = s[:3]
    poll_until(
        remaining,
        lambda: all(m.counts() == (before[m.name][0] + 1, before[m.name][1] + 1) for m in remaining)
        and split_is(remaining, everything),
        "one rebalance after s4's session expired",
        timeout=SESSION_MS / 1000 + 20,
    )
    keep_polling(remaining, QUIET_S)
    for m in remaining:
        assert m.counts() == (before[m.name][0] + 1, before[m.name][1] + 1), m
    assert split_is(remaining, everything)
    assert generation(broker, group) == gen + 1
    log = broker.log_text()
    assert re.search(r"group %s: member %s session expired" % (re.escape(group), re.escape(s4_member)), log)
    assert not re.search(r"member %s left" % re.escape(s4_member), log)
    gen += 1

    # B: s3 unsubscribes: librdkafka sends LeaveGroup (v1, by member id).
    before = {m.name: m.counts() for m in s[:2]}
    s3_member = s[2].c.memberid()
    s[2].c.unsubscribe()
    remaining = s[:2]
    poll_until(
        s[:3],
        lambda: all(m.counts() == (before[m.name][0] + 1, before[m.name][1] + 1) for m in remaining)
        and split_is(remaining, everything),
        "one rebalance after s3's LeaveGroup",
        timeout=SESSION_MS / 1000 - 1,  # sooner than its session could have expired
    )
    keep_polling(s[:3], QUIET_S)
    for m in remaining:
        assert m.counts() == (before[m.name][0] + 1, before[m.name][1] + 1), m
    assert generation(broker, group) == gen + 1
    assert re.search(r"group %s: member %s left" % (re.escape(group), re.escape(s3_member)), broker.log_text())
    s[2].close()
    gen += 1

    # C: s2 closes (no LeaveGroup), then is removed by its instance id.
    before = s[0].counts()
    s[1].close()
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        res = admin.remove_group_members(
            group, [MemberToRemove(group_instance_id="inst-2"), MemberToRemove(group_instance_id="inst-zz")]
        )
    finally:
        admin.close()
    assert {k: v.errno for k, v in res.items()} == {"inst-2": 0, "inst-zz": 25}  # UNKNOWN_MEMBER_ID
    closed_at = time.monotonic()
    poll_until(
        [s[0]],
        lambda: s[0].counts() == (before[0] + 1, before[1] + 1) and s[0].owned() == everything,
        "one rebalance after the admin removal",
        timeout=SESSION_MS / 1000 - 1,
    )
    # Past the moment s2's session would have expired: no second rebalance.
    keep_polling([s[0]], max(QUIET_S, SESSION_MS / 1000 + 2 - (time.monotonic() - closed_at)))
    assert s[0].counts() == (before[0] + 1, before[1] + 1), s[0]
    assert s[0].owned() == everything
    assert generation(broker, group) == gen + 1
    desc = describe(broker, group)
    assert [m.group_instance_id for m in desc.members] == ["inst-1"]
    s[0].close()


def test_static_cooperative_member_restart_is_no_rebalance(broker):
    """Static members with cooperative-sticky: the restarted process joins
    with other subscription metadata than its last JoinGroup (no owned
    partitions, no generation), which Kafka does not count as a reason to
    rebalance a Stable group (only a change of the group's protocol is):
    the new process gets its old partitions in one assign, the other member
    sees nothing, and no generation is added."""
    topic, group = unique_topic("stc"), group_name("gsc")
    create_topic(broker, topic, 6)
    everything = parts(topic, 6)
    # s1 first and alone, then s2: s1's last JoinGroup before the restart
    # names the partitions it owned then (the cooperative protocol's
    # owned partitions), which the restarted process cannot.
    s1 = Member(broker, group, [topic], "s1", strategy="cooperative-sticky", instance="inst-1")
    settle([s1], everything)
    s2 = Member(broker, group, [topic], "s2", strategy="cooperative-sticky", instance="inst-2")
    settle([s1, s2], everything)
    assert s1.count("revoke") == 1, s1  # it gave partitions to s2 in a second, cooperative round
    gen = generation(broker, group)
    had, s2_events = s1.owned(), list(s2.events)
    since = broker.log_size()
    s1.close()
    s1 = Member(broker, group, [topic], "s1-again", strategy="cooperative-sticky", instance="inst-1")
    poll_until([s1, s2], lambda: s1.owned() == had, "the restarted member gets its partitions back")
    keep_polling([s1, s2], QUIET_S)
    assert s1.events == [("assign", had)], s1
    assert s2.events == s2_events, s2
    assert generation(broker, group) == gen
    assert broker.wait_log(r"group %s: static member .*inst-1.* rejoined" % re.escape(group), since=since, timeout=0)
    s1.close()
    s2.close()


# --------------------------------------------------------------------------
# 2. cooperative-sticky (KIP-429)


def test_cooperative_sticky_changes_are_one_incremental_assign_without_revokes(broker, tmp_path):
    """Five cooperative-sticky members on 6 partitions (one in its own
    process). Each change is one rebalance: every remaining member gets
    exactly one incremental assign, no revoke, and keeps what it had:
    1. c4 closes (LeaveGroup); 2. the k5 process is SIGKILLed (session
    expiry); 3. c3 changes its subscription to another topic (it revokes
    exactly its old partitions, gets the new topic's); 4. c2 unsubscribes."""
    t1, t2, group = unique_topic("coop"), unique_topic("coop2"), group_name("gco")
    create_topic(broker, t1, 6)
    create_topic(broker, t2, 2)
    everything = parts(t1, 6)
    c = [Member(broker, group, [t1], "c%d" % i, strategy="cooperative-sticky") for i in range(1, 5)]
    k5 = Crasher(tmp_path, broker, group, t1, "k5")
    try:
        members = c + [k5]
        settle(members, everything)

        def change(remaining, act, what, expect_split, timeout=20, extra_polled=()):
            gen = generation(broker, group)
            before = {m.name: (m.counts(), m.owned()) for m in remaining}
            act()
            polled = list(remaining) + list(extra_polled)

            def done():
                return all(m.counts()[0] == before[m.name][0][0] + 1 for m in remaining) and expect_split()

            poll_until(polled, done, what, timeout=timeout)
            keep_polling(polled, QUIET_S)
            for m in remaining:
                (assigns, revokes), kept = before[m.name]
                assert m.counts() == (assigns + 1, revokes), "%s: %r" % (what, m)
                assert kept <= m.owned(), "%s: %s lost %r" % (what, m.name, sorted(kept - m.owned()))
                # The one assign handed over exactly what is new to it.
                assert m.events[-1] == ("assign", m.owned() - kept), "%s: %r" % (what, m)
            assert expect_split(), "%s: %r" % (what, polled)
            assert generation(broker, group) == gen + 1, "%s: more than one rebalance" % what

        # 1. a member closes (k5, in its process, is polled by itself and only checked for its share)
        change(c[:3] + [k5], c[3].close, "c4 closed", lambda: split_is(c[:3] + [k5], everything))
        # 2. a member crashes: its session expires
        change(c[:3], k5.kill, "k5 killed", lambda: split_is(c[:3], everything), timeout=SESSION_MS / 1000 + 20)

        # 3. a subscription change: c3 moves to t2
        c3_had = c[2].owned()
        c3_counts = c[2].counts()

        def c3_split():
            return split_is(c[:2], everything) and c[2].owned() == parts(t2, 2)

        # c3's client must know t2 already: when librdkafka (2.15/2.16) has to
        # fetch the new topic's metadata first, it later revokes the old
        # partitions as "lost" with no rejoin and never sends a JoinGroup
        # (a client bug no broker can answer; seen with debug=cgrp: "ASSIGNDONE
        # ... rebalance rejoin=false", then heartbeats only).
        assert t2 in c[2].c.list_topics(t2, timeout=10).topics
        change(c[:2], lambda: c[2].subscribe([t2]), "c3 subscribed to t2", c3_split, extra_polled=[c[2]])
        # c3 itself: one revoke of exactly its old partitions, one assign of t2's.
        assert c[2].counts() == (c3_counts[0] + 1, c3_counts[1] + 1), c[2]
        assert [e for e in c[2].events[-2:]] == [("revoke", c3_had), ("assign", parts(t2, 2))], c[2]

        # 4. an unsubscribe: c2 leaves; c1 takes its partitions, c3 (t2) gets an empty assign.
        c2_had = c[1].owned()
        change(
            [c[0], c[2]],
            c[1].c.unsubscribe,
            "c2 unsubscribed",
            lambda: c[0].owned() == everything and c[2].owned() == parts(t2, 2),
            extra_polled=[c[1]],
        )
        assert c[2].events[-1] == ("assign", frozenset())
        assert c[1].events[-1] == ("revoke", c2_had), c[1]
        assert not c[1].owned()
    finally:
        if not k5.closed:
            k5.kill()
        for m in c:
            m.close()


# --------------------------------------------------------------------------
# 3. synchronous commits during a rebalance


def committed_offsets(broker, group, topic, n):
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "log_level": 3})
    try:
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(n)], timeout=30)}
    finally:
        c.close()


def consume_all(members, expected, what, timeout=30):
    poll_until(members, lambda: {r[3] for m in members for r in m.records} >= expected, what, timeout=timeout)


def test_sync_commit_while_the_group_prepares_a_rebalance(broker):
    """a (librdkafka, eager range) has read all 600 records; b joins, so the
    group prepares a rebalance that waits for a. a's synchronous commit now,
    with its current generation, succeeds as in Kafka (commits are accepted
    in PreparingRebalance), at once. After the rebalance neither member reads
    a committed record again; then a commits inside on_revoke while c joins
    (the usual pattern), which also succeeds and is where c starts."""
    topic, group = unique_topic("cmt"), group_name("gcm")
    create_topic(broker, topic, 6)
    first = produce(broker, topic, 6, 100, "a")
    a = Member(broker, group, [topic], "a", **{"socket.timeout.ms": 20000})
    consume_all([a], first, "a reads everything")
    assert a.owned() == parts(topic, 6)

    b = Member(broker, group, [topic], "b")
    deadline = time.monotonic() + 20
    while not state_is(broker, group, "PREPARING_REBALANCING"):
        b.poll()
        assert time.monotonic() < deadline, "b's join never started a rebalance"
    gen = generation(broker, group)
    result = a.c.commit(asynchronous=False)
    assert sorted((tp.partition, tp.offset, tp.error) for tp in result) == [(p, 100, None) for p in range(6)]
    assert state_is(broker, group, "PREPARING_REBALANCING")  # it was answered during the rebalance
    assert committed_offsets(broker, group, topic, 6) == {p: 100 for p in range(6)}

    poll_until([a, b], lambda: split_is([a, b], parts(topic, 6)), "a and b split the partitions")
    assert generation(broker, group) == gen + 1
    assert a.counts() == (2, 1) and b.counts() == (1, 0), (a, b)
    a.records.clear()
    second = produce(broker, topic, 6, 10, "b")
    consume_all([a, b], second, "the second batch")
    # Nothing from the first batch again: the commit made during the rebalance holds.
    assert sorted(r[3] for m in (a, b) for r in m.records) == sorted(second)

    # a and b commit inside on_revoke (eager: before they join again) when c joins.
    outcomes = []

    def commit_on_revoke(consumer, partitions):
        try:
            res = consumer.commit(asynchronous=False)
            outcomes.append(("ok", sorted((tp.partition, tp.offset) for tp in res if tp.error is None)))
        except KafkaException as e:
            outcomes.append(("error", e.args[0].name()))

    a.on_revoke_hook = commit_on_revoke
    b.on_revoke_hook = commit_on_revoke
    expected = {tp.partition: tp.offset for m in (a, b) for tp in m.c.position(list(m.c.assignment()))}
    assert expected == {p: 110 for p in range(6)}
    c = Member(broker, group, [topic], "c")
    poll_until([a, b, c], lambda: split_is([a, b, c], parts(topic, 6)), "a, b and c split the partitions")
    assert sorted(o[0] for o in outcomes) == ["ok", "ok"], outcomes
    assert sorted(p for o in outcomes for p in o[1]) == sorted(expected.items())
    assert committed_offsets(broker, group, topic, 6) == expected
    for m in (a, b):
        m.records.clear()
    third = produce(broker, topic, 6, 5, "c")
    consume_all([a, b, c], third, "the third batch")
    assert sorted(r[3] for m in (a, b, c) for r in m.records) == sorted(third)
    for m in (a, b, c):
        m.close()


def test_sync_commit_behind_a_pending_join_completes(broker):
    """The commit that waits: a (librdkafka, eager range) has joined the next
    rebalance, which waits for a kafka-python member that is not polling, and
    now commits synchronously (its JoinGroup still open on the same
    connection). The commit must come back once the rebalance completes:
    committed (tidelog handles it on arrival, during PreparingRebalance, at
    a's generation) or with Kafka's answer for a commit handled after the
    join (ILLEGAL_GENERATION / REBALANCE_IN_PROGRESS); never a timeout. A
    retry after the rebalance is committed and read back."""
    from kafka import KafkaConsumer
    from kafka.coordinator.assignors.range import RangePartitionAssignor

    topic, group = unique_topic("cmtj"), group_name("gcj")
    create_topic(broker, topic, 4)
    produce(broker, topic, 4, 50, "x")
    a = Member(broker, group, [topic], "a", **{"socket.timeout.ms": 30000})
    poll_until([a], lambda: a.owned() == parts(topic, 4), "a owns all")

    k_state = {"paused": False, "stop": False, "assigned": set(), "error": None}
    k = KafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        partition_assignment_strategy=[RangePartitionAssignor],
    )
    k.subscribe([topic])

    def run_k():
        try:
            while not k_state["stop"]:
                if k_state["paused"]:
                    time.sleep(0.05)
                    continue
                k.poll(timeout_ms=100)
                k_state["assigned"] = {(tp.topic, tp.partition) for tp in k.assignment()}
        except Exception as e:  # noqa: BLE001 - reported by the test
            k_state["error"] = repr(e)

    kt = threading.Thread(target=run_k, daemon=True)
    kt.start()
    try:

        def a_k_split():
            return a.owned() and k_state["assigned"] and a.owned() | k_state["assigned"] == parts(topic, 4) and not (
                a.owned() & k_state["assigned"]
            )

        poll_until([a], a_k_split, "a and the kafka-python member split the partitions")
        keep_polling([a], 1.0)
        k_state["paused"] = True
        time.sleep(0.3)  # let k's thread finish the poll it is in (it only pauses between polls)
        gen = generation(broker, group)
        revokes = a.count("revoke")
        b = Member(broker, group, [topic], "b")
        # a serves its revoke and joins again; k does not: the rebalance waits.
        poll_until([a, b], lambda: a.count("revoke") == revokes + 1, "a revoked for the rebalance")
        a_partitions = sorted(p for _, p in a.events[-1][1])
        keep_polling([a, b], 1.0)
        assert state_is(broker, group, "PREPARING_REBALANCING")
        assert generation(broker, group) == gen

        threading.Timer(2.0, lambda: k_state.update(paused=False)).start()
        offsets = [TopicPartition(topic, p, 7) for p in a_partitions]
        try:
            res = a.c.commit(offsets=offsets, asynchronous=False)
            outcome = ("ok", sorted((tp.partition, tp.offset, tp.error) for tp in res))
        except KafkaException as e:
            outcome = ("error", e.args[0].name())
        assert outcome in (
            ("ok", [(p, 7, None) for p in a_partitions]),
            ("error", "ILLEGAL_GENERATION"),
            ("error", "REBALANCE_IN_PROGRESS"),
        ), outcome
        assert not k_state["paused"], "the commit came back before the rebalance could complete"
        print("commit behind the pending JoinGroup: %r" % (outcome,))
        if outcome[0] == "ok":
            assert {p: committed_offsets(broker, group, topic, 4)[p] for p in a_partitions} == {
                p: 7 for p in a_partitions
            }

        def three_way():
            owned = [a.owned(), b.owned(), frozenset(k_state["assigned"])]
            return all(owned) and sum(map(len, owned)) == 4 and frozenset().union(*owned) == parts(topic, 4)

        poll_until([a, b], three_way, "a, b and k split the partitions")
        assert generation(broker, group) == gen + 1
        # The retry, in the new generation, is committed.
        mine = sorted(p for _, p in a.owned())
        res = a.c.commit(offsets=[TopicPartition(topic, p, 9) for p in mine], asynchronous=False)
        assert sorted((tp.partition, tp.offset, tp.error) for tp in res) == [(p, 9, None) for p in mine]
        assert {p: committed_offsets(broker, group, topic, 4)[p] for p in mine} == {p: 9 for p in mine}
        assert k_state["error"] is None, k_state["error"]
        b.close()
    finally:
        k_state["stop"] = True
        kt.join(10)
        k.close()
        a.close()
