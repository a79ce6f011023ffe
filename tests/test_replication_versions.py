"""Replication from a leader that speaks older Fetch versions (a rolling
upgrade: followers on this build, the leader still on an older one).

A follower asks its leader for its API versions (ApiVersions) on each
connection and fetches with the highest Fetch version both speak: v15 with
KIP-903 replica state, v13+ by topic id, v12 with KIP-320's diverging
epoch, down to v4. Here node 1 is advertised behind `OldLeaderProxy`, which
answers ApiVersions as an older leader would (Fetch capped) and closes the
connection on any Fetch above the cap, as such a leader would refuse it.
A topic with min.insync.replicas=3 then acknowledges acks=all writes on
node 1's partitions only if both followers replicate through the proxy at
a version it accepts.
"""

import socket
import struct
import threading

import pytest
from confluent_kafka import Producer

import kafka_wire as kw
from clients import consume_confluent
from cluster import broker_id, cluster_factory, create_topic  # noqa: F401 - fixture
from conftest import pick_ports, unique_topic

API_FETCH = 1
API_VERSIONS = 18


def uvarint(data, at):
    """(value, next position) of the unsigned varint at `at`."""
    value, shift = 0, 0
    while True:
        b = data[at]
        at += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, at
        shift += 7


def cap_api_versions(body, request_version, key, cap):
    """The ApiVersions response `body` with `key`'s max version lowered to
    `cap` (entries keep their size, so the frame length stays)."""
    out = bytearray(body)
    at = 2  # error_code
    if request_version >= 3:
        count, at = uvarint(out, at)
        count -= 1  # compact array: N + 1
    else:
        (count,) = struct.unpack_from(">i", out, at)
        at += 4
    for _ in range(count):
        api, lo, hi = struct.unpack_from(">hhh", out, at)
        if api == key and hi > cap:
            struct.pack_into(">h", out, at + 4, max(cap, lo))
        at += 6
        if request_version >= 3:
            tags, at = uvarint(out, at)
            for _ in range(tags):
                _tag, at = uvarint(out, at)
                size, at = uvarint(out, at)
                at += size
    return bytes(out)


class OldLeaderProxy:
    """Forwards `listen_port` to `target_port`, answering ApiVersions with
    Fetch capped at `fetch_max` and closing any connection that sends a
    Fetch above it. Keeps (client id, Fetch version) of every Fetch seen."""

    def __init__(self, listen_port, target_port, fetch_max):
        self.target_port = target_port
        self.fetch_max = fetch_max
        self.fetches = []
        self.refused = []
        self.lock = threading.Lock()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(64)
        self.open = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, upstream]
            asked = {}  # correlation id -> ApiVersions request version
            threading.Thread(target=self._requests, args=(client, upstream, asked), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, asked), daemon=True).start()

    def _requests(self, client, upstream, asked):
        try:
            while True:
                frame = kw.recv_frame_raw(client)
                if frame is None:
                    break
                api, version, cid, id_len = struct.unpack_from(">hhih", frame, 0)
                client_id = frame[10 : 10 + id_len].decode() if id_len >= 0 else None
                if api == API_VERSIONS:
                    asked[cid] = version
                if api == API_FETCH:
                    with self.lock:
                        self.fetches.append((client_id, version))
                        if version > self.fetch_max:
                            self.refused.append((client_id, version))
                    if version > self.fetch_max:
                        break
                upstream.sendall(struct.pack(">i", len(frame)) + frame)
        except OSError:
            pass
        close_both(client, upstream)

    def _responses(self, upstream, client, asked):
        try:
            while True:
                frame = kw.recv_frame_raw(upstream)
                if frame is None:
                    break
                (cid,) = struct.unpack_from(">i", frame, 0)
                if cid in asked:
                    # ApiVersions answers always have header v0 (the id only).
                    frame = frame[:4] + cap_api_versions(frame[4:], asked.pop(cid), API_FETCH, self.fetch_max)
                client.sendall(struct.pack(">i", len(frame)) + frame)
        except OSError:
            pass
        close_both(client, upstream)

    def replica_fetch_versions(self):
        """{broker id: set of Fetch versions} of the replica fetchers seen."""
        out = {}
        with self.lock:
            for client_id, version in self.fetches:
                if client_id and client_id.startswith("tidelog-replica-"):
                    out.setdefault(int(client_id.rsplit("-", 1)[1]), set()).add(version)
        return out

    def close(self):
        self.stopped = True
        self.server.close()
        with self.lock:
            for s in self.open:
                close_quietly(s)


def close_both(a, b):
    close_quietly(a)
    close_quietly(b)


def close_quietly(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def test_cap_api_versions_rewrites_only_the_capped_key():
    flexible = struct.pack(">h", 0) + bytes([3]) + struct.pack(">hhh", 0, 3, 12) + b"\0"
    flexible += struct.pack(">hhh", 1, 4, 16) + b"\0" + struct.pack(">i", 0) + b"\0"
    out = cap_api_versions(flexible, 3, API_FETCH, 12)
    assert struct.unpack_from(">hhh", out, 3) == (0, 3, 12)
    assert struct.unpack_from(">hhh", out, 10) == (1, 4, 12)
    assert len(out) == len(flexible)
    classic = struct.pack(">hi", 0, 1) + struct.pack(">hhh", 1, 4, 16) + struct.pack(">i", 0)
    assert struct.unpack_from(">hhh", cap_api_versions(classic, 2, API_FETCH, 8), 6) == (1, 4, 8)


@pytest.mark.parametrize("fetch_max", [12, 8])
def test_followers_replicate_from_a_leader_with_older_fetch_versions(cluster_factory, fetch_max):
    """v12: names instead of topic ids, no replica state; v8: also no
    leader epoch in the request and no diverging epoch in the answer."""
    c = cluster_factory(start=False)
    proxy_port = pick_ports(1)
    c.node(1).advertised_port = proxy_port
    proxy = OldLeaderProxy(proxy_port, c.node(1).port, fetch_max)
    try:
        c.start()
        topic = unique_topic("oldleader")
        parts = create_topic(c, topic, 6, 3, config={"min.insync.replicas": "3"})
        led = sorted(p for p, m in parts.items() if m.leader == broker_id(1))
        assert led, "node 1 leads none of %s's partitions: %r" % (topic, parts)

        # acks=all needs all 3 replicas: both followers must fetch from node 1
        # through the proxy at a version it accepts.
        producer = Producer(c.producer_config(**{"acks": "all", "message.timeout.ms": 60000}))
        errors, acked = [], []

        def delivered(err, msg):
            (errors if err else acked).append(err or (msg.partition(), msg.offset(), msg.value()))

        sent = {p: [b"old-%d-%d" % (p, i) for i in range(200)] for p in led}
        for p in led:
            for v in sent[p]:
                producer.produce(topic, value=v, partition=p, on_delivery=delivered)
        assert producer.flush(90) == 0, "records unacknowledged after 90 s; errors %r" % errors[:3]
        assert errors == []
        for p in led:
            got = sorted((o, v) for q, o, v in acked if q == p)
            assert [v for _, v in got] == sent[p]
            assert [o for o, _ in got] == list(range(200))

        seen = proxy.replica_fetch_versions()
        assert set(seen) == {broker_id(2), broker_id(3)}, seen
        for broker, versions in seen.items():
            assert versions == {fetch_max}, "broker %d fetched with %r through a v%d leader" % (
                broker, versions, fetch_max)
        assert proxy.refused == [], proxy.refused

        # A consumer reads them back through the same leader.
        records = consume_confluent(c, topic, {p: 200 for p in led}, timeout=60)
        for p in led:
            assert [(o, v) for o, _k, v in records[p]] == list(enumerate(sent[p]))
    finally:
        proxy.close()
