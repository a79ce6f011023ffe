"""Hand-built Kafka wire frames for the tests that must send what no client sends.

Real clients never send an oversized frame, garbage, a batch with a bad CRC or
an unknown API key, so the bad-input tests speak the protocol here, byte by
byte, with `struct`. Only non-flexible request versions are encoded (header v1,
classic strings and arrays), which every Kafka broker still accepts for the
APIs used here. `test_wire_selfcheck.py` checks these encoders against
kafka-python's generated ones, so a failing broker test is not a test bug.

Also here: a parser for segment files (`<base offset>.log`), the on-disk
contract, and record-batch helpers built on kafka-python's record classes.
"""

import os
import socket
import struct
import time
from dataclasses import dataclass, field

from kafka.record._crc32c import crc as crc32c
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

# API keys
PRODUCE = 0
FETCH = 1
LIST_OFFSETS = 2
METADATA = 3
API_VERSIONS = 18
CREATE_TOPICS = 19

# Error codes
NONE = 0
CORRUPT_MESSAGE = 2
UNKNOWN_TOPIC_OR_PARTITION = 3
NOT_LEADER_OR_FOLLOWER = 6
MESSAGE_TOO_LARGE = 10
INVALID_TOPIC_EXCEPTION = 17
UNSUPPORTED_VERSION = 35
INVALID_REPLICATION_FACTOR = 38

# Record batch v2 header layout (all big-endian):
#   baseOffset int64 | batchLength int32 | partitionLeaderEpoch int32 | magic int8
#   | crc uint32 | attributes int16 | lastOffsetDelta int32 | baseTimestamp int64
#   | maxTimestamp int64 | producerId int64 | producerEpoch int16
#   | baseSequence int32 | recordCount int32 | records...
BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
BATCH_HEADER_SIZE = BATCH_HEADER.size  # 61
LOG_OVERHEAD = 12  # baseOffset + batchLength
CRC_OFFSET = 17  # the CRC covers bytes [21, end)
ATTRIBUTES_OFFSET = 21


# --------------------------------------------------------------------------
# primitive encoders


def i8(v):
    return struct.pack(">b", v)


def i16(v):
    return struct.pack(">h", v)


def i32(v):
    return struct.pack(">i", v)


def i64(v):
    return struct.pack(">q", v)


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return i16(len(b)) + b


def nullable_string(s):
    if s is None:
        return i16(-1)
    return string(s)


def kbytes(b):
    if b is None:
        return i32(-1)
    return i32(len(b)) + bytes(b)


def array(items, enc):
    if items is None:
        return i32(-1)
    return i32(len(items)) + b"".join(enc(x) for x in items)


def uvarint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def compact_string(s):
    b = s.encode() if isinstance(s, str) else s
    return uvarint(len(b) + 1) + b


def request_header_v1(api_key, api_version, correlation_id, client_id="tidelog-tests"):
    return i16(api_key) + i16(api_version) + i32(correlation_id) + nullable_string(client_id)


def request_header_v2(api_key, api_version, correlation_id, client_id="tidelog-tests"):
    # v1 plus an empty tagged-field section; client_id stays a classic string.
    return request_header_v1(api_key, api_version, correlation_id, client_id) + b"\x00"


def frame(payload):
    return i32(len(payload)) + payload


# --------------------------------------------------------------------------
# primitive decoder



def recv_exact(sock, n):
    """Exactly `n` bytes from a raw socket, or None at end of stream (for
    test proxies that relay frames; `Conn` has its own reader)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_frame_raw(sock):
    """One size-prefixed Kafka frame from a raw socket, without the prefix,
    or None at end of stream."""
    head = recv_exact(sock, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">i", head)
    return recv_exact(sock, size)

class Reader:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def _take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(
                "short response: need %d bytes at %d, have %d" % (n, self.pos, len(self.data))
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def i8(self):
        return struct.unpack(">b", self._take(1))[0]

    def i16(self):
        return struct.unpack(">h", self._take(2))[0]

    def i32(self):
        return struct.unpack(">i", self._take(4))[0]

    def i64(self):
        return struct.unpack(">q", self._take(8))[0]

    def boolean(self):
        return self._take(1) != b"\x00"

    def string(self):
        n = self.i16()
        if n < 0:
            return None
        return self._take(n).decode()

    def kbytes(self):
        n = self.i32()
        if n < 0:
            return None
        return self._take(n)

    def array(self, dec):
        n = self.i32()
        if n < 0:
            return None
        return [dec(self) for _ in range(n)]

    def remaining(self):
        return len(self.data) - self.pos


# --------------------------------------------------------------------------
# connection


class ConnectionClosed(Exception):
    pass


class Conn:
    """One TCP connection speaking raw frames."""

    def __init__(self, port, host="127.0.0.1", timeout=15.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.next_correlation_id = 1

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_request(self, api_key, api_version, body, header_version=1):
        corr = self.next_correlation_id
        self.next_correlation_id += 1
        hdr = (request_header_v2 if header_version == 2 else request_header_v1)(
            api_key, api_version, corr
        )
        self.send_raw(frame(hdr + body))
        return corr

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError as e:
                raise ConnectionClosed("connection reset: %s" % e) from e
            if not chunk:
                raise ConnectionClosed("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def recv_frame(self):
        (n,) = struct.unpack(">i", self._recv_exact(4))
        if n < 4:
            raise ValueError("response frame of %d bytes" % n)
        return self._recv_exact(n)

    def recv_response(self, correlation_id, header_version=0):
        """Returns a Reader positioned at the response body."""
        r = Reader(self.recv_frame())
        got = r.i32()
        if got != correlation_id:
            raise AssertionError("correlation id %d, expected %d" % (got, correlation_id))
        if header_version == 1:
            r._take(1)  # empty tagged fields
        return r

    def request(self, api_key, api_version, body, header_version=1):
        corr = self.send_request(api_key, api_version, body, header_version)
        return self.recv_response(corr)

    def wait_closed(self, timeout=15.0):
        """True when the peer closes (EOF or RST) within `timeout`; any bytes
        the broker sends first are returned too, for diagnostics."""
        deadline = time.monotonic() + timeout
        received = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, bytes(received)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False, bytes(received)
            except (ConnectionResetError, BrokenPipeError):
                return True, bytes(received)
            if not chunk:
                return True, bytes(received)
            received += chunk


# --------------------------------------------------------------------------
# ApiVersions


def api_versions_v0_body():
    return b""


def parse_api_versions_v0(r):
    """ApiVersions response v0: error_code, [api_key, min, max]."""
    error = r.i16()
    apis = r.array(lambda rr: (rr.i16(), rr.i16(), rr.i16()))
    return error, {k: (lo, hi) for k, lo, hi in apis}, apis


def api_versions(conn):
    r = conn.request(API_VERSIONS, 0, api_versions_v0_body())
    error, table, _ = parse_api_versions_v0(r)
    if error != NONE:
        raise AssertionError("ApiVersions v0 error %d" % error)
    return table


def pick_version(table, api_key, lo, hi):
    """Highest version in [lo, hi] the broker supports."""
    if api_key not in table:
        raise AssertionError("broker does not advertise api key %d: %r" % (api_key, table))
    bmin, bmax = table[api_key]
    v = min(hi, bmax)
    if v < max(lo, bmin):
        raise AssertionError(
            "no common version for api %d: broker %d..%d, tests %d..%d" % (api_key, bmin, bmax, lo, hi)
        )
    return v


# --------------------------------------------------------------------------
# Produce v3..v8 (all non-flexible, same request layout)


def produce_body(topic, partition, records, acks=-1, timeout_ms=30000, transactional_id=None):
    part = i32(partition) + kbytes(records)
    topic_data = string(topic) + array([part], lambda p: p)
    return nullable_string(transactional_id) + i16(acks) + i32(timeout_ms) + array([topic_data], lambda t: t)


@dataclass
class PartitionProduceResponse:
    index: int
    error_code: int
    base_offset: int
    log_append_time_ms: int
    log_start_offset: int = -1
    record_errors: list = field(default_factory=list)
    error_message: str = None


def parse_produce_response(r, version):
    def part(rr):
        p = PartitionProduceResponse(rr.i32(), rr.i16(), rr.i64(), rr.i64())
        if version >= 5:
            p.log_start_offset = rr.i64()
        if version >= 8:
            p.record_errors = rr.array(lambda x: (x.i32(), x.string()))
            p.error_message = rr.string()
        return p

    topics = r.array(lambda rr: (rr.string(), rr.array(part)))
    throttle = r.i32()
    return topics, throttle


def produce(conn, version, topic, partition, records, acks=-1, timeout_ms=30000):
    """Sends one Produce for one partition, returns its PartitionProduceResponse."""
    assert 3 <= version <= 8, version
    r = conn.request(PRODUCE, version, produce_body(topic, partition, records, acks, timeout_ms))
    topics, _ = parse_produce_response(r, version)
    assert len(topics) == 1 and topics[0][0] == topic, topics
    parts = topics[0][1]
    assert len(parts) == 1 and parts[0].index == partition, parts
    return parts[0]


# --------------------------------------------------------------------------
# Metadata v4..v8 (non-flexible)


def metadata_body(version, topics, allow_auto_topic_creation=True):
    body = array(topics, lambda t: string(t)) if topics is not None else i32(-1)
    body += i8(1 if allow_auto_topic_creation else 0)
    if version >= 8:
        body += i8(0) + i8(0)  # include cluster/topic authorized operations
    return body


@dataclass
class MetadataPartition:
    error_code: int
    index: int
    leader: int
    leader_epoch: int
    replicas: list
    isr: list
    offline: list


@dataclass
class MetadataTopic:
    error_code: int
    name: str
    is_internal: bool
    partitions: list


def parse_metadata_response(r, version):
    throttle = r.i32()
    brokers = r.array(lambda rr: (rr.i32(), rr.string(), rr.i32(), rr.string()))
    cluster_id = r.string()
    controller = r.i32()

    def part(rr):
        err = rr.i16()
        idx = rr.i32()
        leader = rr.i32()
        epoch = rr.i32() if version >= 7 else -1
        replicas = rr.array(lambda x: x.i32())
        isr = rr.array(lambda x: x.i32())
        offline = rr.array(lambda x: x.i32()) if version >= 5 else []
        return MetadataPartition(err, idx, leader, epoch, replicas, isr, offline)

    def topic(rr):
        t = MetadataTopic(rr.i16(), rr.string(), rr.boolean(), rr.array(part))
        if version >= 8:
            rr.i32()  # topic authorized operations
        return t

    topics = r.array(topic)
    if version >= 8:
        r.i32()  # cluster authorized operations
    return {
        "throttle": throttle,
        "brokers": brokers,
        "cluster_id": cluster_id,
        "controller": controller,
        "topics": topics,
    }


def metadata(conn, version, topics, allow_auto_topic_creation=True):
    assert 4 <= version <= 8, version
    r = conn.request(METADATA, version, metadata_body(version, topics, allow_auto_topic_creation))
    return parse_metadata_response(r, version)


# --------------------------------------------------------------------------
# Fetch v4 (non-flexible, no sessions)


def fetch_body_v4(topics, max_wait_ms=500, min_bytes=1, max_bytes=52428800, isolation_level=0, replica_id=-1):
    """Fetch v4 request body; `topics` is [(name, [(partition, fetch_offset,
    partition_max_bytes)])]. replica_id -1 is a consumer; a broker id makes
    it a follower's fetch."""

    def part(p):
        partition, fetch_offset, partition_max_bytes = p
        return i32(partition) + i64(fetch_offset) + i32(partition_max_bytes)

    def topic(t):
        name, parts = t
        return string(name) + array(parts, part)

    return i32(replica_id) + i32(max_wait_ms) + i32(min_bytes) + i32(max_bytes) + i8(isolation_level) + array(topics, topic)


# --------------------------------------------------------------------------
# record batches


def build_batch(records, compression=0, timestamp_ms=None):
    """A v2 record batch (bytes) of (key, value) pairs, or (key, value,
    timestamp ms) triples, base offset 0."""
    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 30,
    )
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    for i, (k, v, *own) in enumerate(records):
        assert b.append(i, timestamp=own[0] if own else ts, key=k, value=v, headers=[]) is not None
    return bytes(b.build())


def batch_crc_ok(batch):
    (stored,) = struct.unpack_from(">I", batch, CRC_OFFSET)
    return stored == crc32c(bytes(batch[ATTRIBUTES_OFFSET:]))


def decode_batch(batch):
    """[(offset, key, value)] of a v2 batch, checking its CRC."""
    b = DefaultRecordBatch(bytes(batch))
    assert b.validate_crc(), "bad CRC"
    return [(rec.offset, rec.key, rec.value) for rec in b]


# --------------------------------------------------------------------------
# segment files


@dataclass
class DiskBatch:
    position: int  # file position of baseOffset
    base_offset: int
    batch_length: int  # bytes after the batchLength field
    magic: int
    crc_ok: bool
    last_offset_delta: int
    record_count: int
    raw: bytes

    @property
    def size(self):
        return LOG_OVERHEAD + self.batch_length

    @property
    def end(self):
        return self.position + self.size

    @property
    def next_offset(self):
        return self.base_offset + self.last_offset_delta + 1


def parse_segment(path):
    """Batches of a `.log` file, back to back from position 0, stopping at EOF,
    when fewer than 12 bytes remain, when batchLength is 0 (zeroed preallocated
    tail) or when a batch runs past EOF (returned as `torn` tail length)."""
    with open(path, "rb") as f:
        data = f.read()
    batches = []
    pos = 0
    while len(data) - pos >= LOG_OVERHEAD:
        base_offset, batch_length = struct.unpack_from(">qi", data, pos)
        if batch_length == 0:
            break
        if batch_length < BATCH_HEADER_SIZE - LOG_OVERHEAD or pos + LOG_OVERHEAD + batch_length > len(data):
            break
        raw = data[pos : pos + LOG_OVERHEAD + batch_length]
        h = BATCH_HEADER.unpack_from(raw, 0)
        batches.append(
            DiskBatch(
                position=pos,
                base_offset=base_offset,
                batch_length=batch_length,
                magic=h[3],
                crc_ok=batch_crc_ok(raw),
                last_offset_delta=h[6],
                record_count=h[12],
                raw=raw,
            )
        )
        pos += LOG_OVERHEAD + batch_length
    tail = data[pos:]
    return batches, tail


def segment_files(partition_dir):
    """[(base_offset, path)] of the `.log` files, sorted by base offset."""
    out = []
    for name in os.listdir(partition_dir):
        if name.endswith(".log"):
            stem = name[: -len(".log")]
            assert len(stem) == 20 and stem.isdigit(), "bad segment name %r" % name
            out.append((int(stem), os.path.join(partition_dir, name)))
    return sorted(out)
