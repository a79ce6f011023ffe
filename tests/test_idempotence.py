"""Idempotent producer against the real binary: a proxy that cuts the
connection right after forwarding produce requests (so the broker wrote the
batch but the client never hears back and retries it), and kill -9 + restart
of the broker mid-run. No duplicates, no gaps, order kept per partition."""

import socket
import struct
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import pick_ports

import kafka_wire as kw

PARTITIONS = 3
PRODUCE = 0


class CuttingProxy:
    """One listener per shard port (base+i -> broker port+i). After every
    `cut_every`-th Produce request it forwards, it waits a little (so the
    broker has appended it) and closes both sockets before the response can
    reach the client."""

    def __init__(self, base, broker_port, shards, cut_every):
        self.base = base
        self.broker_port = broker_port
        self.cut_every = cut_every
        self.produces = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.stopped = False
        self.listeners = []
        for i in range(shards):
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.base + i))
            ls.listen(64)
            self.listeners.append(ls)
            threading.Thread(target=self._accept, args=(ls, broker_port + i), daemon=True).start()

    def close(self):
        self.stopped = True
        for ls in self.listeners:
            ls.close()

    def _accept(self, ls, target):
        while not self.stopped:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pump_requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump_requests(self, client, upstream):
        try:
            while True:
                body = kw.recv_frame_raw(client)
                if body is None:
                    raise OSError("eof")
                upstream.sendall(struct.pack(">i", len(body)) + body)
                (api_key,) = struct.unpack(">h", body[:2])
                if api_key != PRODUCE:
                    continue
                with self.lock:
                    self.produces += 1
                    cut = self.produces % self.cut_every == 0
                    if cut:
                        self.cuts += 1
                if cut:
                    time.sleep(0.05)
                    raise OSError("cut")
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass


def consume_all(bootstrap, topic, expected, timeout=60):
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "check-%s" % uuid.uuid4().hex[:6],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out = {p: [] for p in range(PARTITIONS)}
    n = 0
    deadline = time.monotonic() + timeout
    while n < expected and time.monotonic() < deadline:
        for m in c.consume(1000, 0.5):
            if m.error() is None:
                out[m.partition()].append((m.offset(), m.value().decode()))
                n += 1
    # Anything beyond `expected` would be a duplicate: read a little longer.
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        for m in c.consume(1000, 0.3):
            if m.error() is None:
                out[m.partition()].append((m.offset(), m.value().decode()))
    c.close()
    return out


def check_exactly_once_in_order(consumed, sent_per_partition):
    for p, sent in sent_per_partition.items():
        got = [v for _, v in consumed[p]]
        assert len(got) == len(set(got)), "partition %d: %d duplicates" % (p, len(got) - len(set(got)))
        assert got == sent, "partition %d: %d records, expected %d; first difference at %r" % (
            p,
            len(got),
            len(sent),
            next((i for i, (a, b) in enumerate(zip(got, sent)) if a != b), min(len(got), len(sent))),
        )
        offsets = [o for o, _ in consumed[p]]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True


def test_retries_after_cut_connections_are_not_duplicated(broker_factory):
    base = pick_ports(2)
    broker = broker_factory(args=["--advertised.listeners=PLAINTEXT://127.0.0.1:%d" % base], start=False)
    proxy = CuttingProxy(base, broker.port, broker.shards, cut_every=7)
    try:
        broker.start()
        bootstrap = "127.0.0.1:%d" % base
        topic = "idem-%s" % uuid.uuid4().hex[:6]
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
        p = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 2,
                "batch.num.messages": 50,
                "message.timeout.ms": 120000,
                "retry.backoff.ms": 50,
                "log_level": 0,
            }
        )
        sent = {q: [] for q in range(PARTITIONS)}
        failed = []

        def done(err, msg):
            if err is not None:
                failed.append(err)
            else:
                sent[msg.partition()].append(msg.value().decode())

        for i in range(6000):
            p.produce(topic, value=("m-%06d" % i).encode(), partition=i % PARTITIONS, on_delivery=done)
            if i % 500 == 0:
                p.poll(0)
        assert p.flush(120) == 0
        assert not failed, failed[:3]
        assert proxy.cuts >= 3, "the proxy cut only %d connections" % proxy.cuts
        # Per partition, the producer's order is i ascending.
        for q in range(PARTITIONS):
            assert sent[q] == sorted(sent[q])
            assert len(sent[q]) == 2000
        consumed = consume_all(broker.bootstrap, topic, 6000)
        check_exactly_once_in_order(consumed, sent)
        assert "is a retry of offsets" in broker.log_text() or proxy.cuts > 0
    finally:
        proxy.close()


def test_kill9_mid_run_no_duplicates_or_gaps(broker):
    topic = "idem9-%s" % uuid.uuid4().hex[:6]
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    p = Producer(
        {
            "bootstrap.servers": broker.bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 120000,
            "retry.backoff.ms": 100,
            "reconnect.backoff.max.ms": 500,
            "log_level": 0,
        }
    )
    sent = {q: [] for q in range(PARTITIONS)}
    failed = []

    def done(err, msg):
        if err is not None:
            failed.append(err)
        else:
            sent[msg.partition()].append(msg.value().decode())

    stop = threading.Event()

    def run():
        i = 0
        while not stop.is_set() and i < 40000:
            try:
                p.produce(topic, value=("k-%06d" % i).encode(), partition=i % PARTITIONS, on_delivery=done)
                i += 1
            except BufferError:
                p.poll(0.05)
            if i % 200 == 0:
                p.poll(0)
                time.sleep(0.01)

    t = threading.Thread(target=run)
    t.start()
    for _ in range(2):
        time.sleep(1.5)
        broker.kill9()
        time.sleep(0.3)
        broker.start()
    time.sleep(1)
    stop.set()
    t.join(60)
    assert p.flush(120) == 0
    assert not failed, failed[:3]
    total = sum(len(v) for v in sent.values())
    assert total > 1000
    for q in range(PARTITIONS):
        assert sent[q] == sorted(sent[q])
    consumed = consume_all(broker.bootstrap, topic, total)
    check_exactly_once_in_order(consumed, sent)
