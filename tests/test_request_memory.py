"""`queued.max.request.bytes` and `queued.max.requests`: the request frames a
shard holds while reading and dispatching them are bounded in bytes and in
number, and a connection whose next frame does not fit waits before reading
it (issue 20, bounded memory)."""

import socket
import struct
import time
import urllib.request

import kafka_wire as kw
from conftest import create_topic, pick_ports, unique_topic


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


def wait_for_metric(metrics_port, line):
    deadline = time.time() + 10
    while line not in scrape(metrics_port):
        assert time.time() < deadline, scrape(metrics_port)
        time.sleep(0.1)


def send_unanswered_api_versions(c, why):
    """Sends ApiVersions on `c` and checks that no answer comes for 1.5 s;
    returns its correlation id."""
    corr = c.send_request(kw.API_VERSIONS, 0, kw.api_versions_v0_body())
    c.sock.settimeout(1.5)
    try:
        c.sock.recv(1)
        raise AssertionError("answered while " + why)
    except socket.timeout:
        pass
    return corr


def test_a_frame_waits_for_room_and_gets_it_when_the_hog_goes(broker_factory):
    metrics_port = pick_ports(1)
    budget = 1 << 20
    b = broker_factory(
        shards=1,
        args=["--queued.max.request.bytes=%d" % budget, "--metrics.listeners=127.0.0.1:%d" % metrics_port],
    )
    # A client announces a frame as large as the whole budget and sends half:
    # while its body is being read, it holds all of it.
    hog = socket.create_connection(("127.0.0.1", b.port), timeout=10)
    hog.sendall(struct.pack(">i", budget) + b"\x00" * (budget // 2))
    wait_for_metric(metrics_port, 'tidelog_request_memory_bytes{shard="0"} %d' % budget)

    # Another connection's small request waits: it is not read, so not answered.
    with kw.Conn(b.port, timeout=10) as c:
        corr = send_unanswered_api_versions(c, "the shard's request memory was full")
        assert 'tidelog_request_memory_waits_total{shard="0"} 1' in scrape(metrics_port)

        # The hog finishes its frame (garbage: the broker closes it) and the
        # waiting request goes through.
        hog.sendall(b"\x00" * (budget // 2))
        c.sock.settimeout(10)
        r = c.recv_response(corr)
        error, table, _ = kw.parse_api_versions_v0(r)
        assert error == 0 and kw.PRODUCE in table
    hog.close()
    wait_for_metric(metrics_port, 'tidelog_request_memory_bytes{shard="0"} 0')

    # Ordinary clients are unaffected once there is room.
    topic = unique_topic("mem")
    create_topic(b, topic, 1)
    from confluent_kafka import Producer

    p = Producer(b.producer_config(acks="all"))
    for i in range(200):
        p.produce(topic, value=b"x" * 4000)
    assert p.flush(30) == 0


def test_a_request_waits_for_a_queue_slot_and_gets_it_when_one_frees(broker_factory):
    metrics_port = pick_ports(1)
    b = broker_factory(
        shards=1,
        args=["--queued.max.requests=2", "--metrics.listeners=127.0.0.1:%d" % metrics_port],
    )
    # Two clients each announce a 64 KiB frame and send part of it: each
    # holds one of the shard's two request slots while it is being read.
    hogs = []
    for _ in range(2):
        h = socket.create_connection(("127.0.0.1", b.port), timeout=10)
        h.sendall(struct.pack(">i", 65536) + b"\x00" * 1000)
        hogs.append(h)
    wait_for_metric(metrics_port, 'tidelog_queued_requests{shard="0"} 2')

    with kw.Conn(b.port, timeout=10) as c:
        corr = send_unanswered_api_versions(c, "the shard's request queue was full")
        assert 'tidelog_queued_requests_waits_total{shard="0"} 1' in scrape(metrics_port)
        # One hog goes away: its slot frees and the waiting request is read.
        hogs.pop().close()
        c.sock.settimeout(10)
        error, table, _ = kw.parse_api_versions_v0(c.recv_response(corr))
        assert error == 0 and kw.PRODUCE in table
    for h in hogs:
        h.close()
    wait_for_metric(metrics_port, 'tidelog_queued_requests{shard="0"} 0')

    # Real clients with pipelined requests still get through two slots.
    topic = unique_topic("queue")
    create_topic(b, topic, 3)
    from confluent_kafka import Consumer, Producer

    p = Producer(b.producer_config(acks="all", **{"max.in.flight.requests.per.connection": 5}))
    for i in range(3000):
        p.produce(topic, value=b"%06d" % i, partition=i % 3)
    assert p.flush(30) == 0
    c = Consumer(b.consumer_config(**{"group.id": "queue-g", "auto.offset.reset": "earliest"}))
    c.subscribe([topic])
    seen = {}
    deadline = time.time() + 30
    while sum(len(v) for v in seen.values()) < 3000 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            seen.setdefault(m.partition(), []).append(int(m.value()))
    c.close()
    for part in range(3):
        assert seen.get(part) == list(range(part, 3000, 3)), "partition %d out of order or short" % part


def test_bad_queued_max_request_bytes_is_refused(broker_factory):
    b = broker_factory(start=False, args=["--queued.max.request.bytes=100"])
    import subprocess

    r = subprocess.run(b.command(), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "queued.max.request.bytes" in r.stdout + r.stderr
    b = broker_factory(start=False, args=["--queued.max.requests=0"])
    r = subprocess.run(b.command(), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "queued.max.requests" in r.stdout + r.stderr
