"""`queued.max.request.bytes`: the request frames a shard holds while reading
and dispatching them are bounded, and a connection whose next frame does not
fit waits before reading it (issue 20, bounded memory)."""

import socket
import struct
import time
import urllib.request

import kafka_wire as kw
from conftest import create_topic, pick_ports, unique_topic


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


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
    deadline = time.time() + 10
    while "tidelog_request_memory_bytes{shard=\"0\"} %d" % budget not in scrape(metrics_port):
        assert time.time() < deadline, scrape(metrics_port)
        time.sleep(0.1)

    # Another connection's small request waits: it is not read, so not answered.
    with kw.Conn(b.port, timeout=10) as c:
        corr = c.send_request(kw.API_VERSIONS, 0, kw.api_versions_v0_body())
        c.sock.settimeout(1.5)
        try:
            c.sock.recv(1)
            raise AssertionError("answered while the shard's request memory was full")
        except socket.timeout:
            pass
        assert 'tidelog_request_memory_waits_total{shard="0"} 1' in scrape(metrics_port)

        # The hog finishes its frame (garbage: the broker closes it) and the
        # waiting request goes through.
        hog.sendall(b"\x00" * (budget // 2))
        c.sock.settimeout(10)
        r = c.recv_response(corr)
        error, table, _ = kw.parse_api_versions_v0(r)
        assert error == 0 and kw.PRODUCE in table
    hog.close()
    deadline = time.time() + 10
    while 'tidelog_request_memory_bytes{shard="0"} 0' not in scrape(metrics_port):
        assert time.time() < deadline, scrape(metrics_port)
        time.sleep(0.1)

    # Ordinary clients are unaffected once there is room.
    topic = unique_topic("mem")
    create_topic(b, topic, 1)
    from confluent_kafka import Producer

    p = Producer(b.producer_config(acks="all"))
    for i in range(200):
        p.produce(topic, value=b"x" * 4000)
    assert p.flush(30) == 0


def test_bad_queued_max_request_bytes_is_refused(broker_factory):
    b = broker_factory(start=False, args=["--queued.max.request.bytes=100"])
    import subprocess

    r = subprocess.run(b.command(), capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "queued.max.request.bytes" in r.stdout + r.stderr
