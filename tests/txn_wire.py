"""Raw frames for the transaction APIs (KIP-98, KIP-447, KIP-664), for the
cases no client sends on purpose: an unknown transactional id, a stale epoch,
another producer's id, a request to a broker that is not the coordinator.

Encoding and decoding are kafka-python's generated message classes (built
from Kafka's own JSON schemas, flexible versions included), so the bytes are
Kafka's; only the socket is ours (`kafka_wire.Conn`).
"""

import socket
import struct

from kafka.protocol.admin.transactions import (
    DescribeTransactionsRequest,
    DescribeTransactionsResponse,
    ListTransactionsRequest,
    ListTransactionsResponse,
)
from kafka.protocol.producer.transaction import (
    AddOffsetsToTxnRequest,
    AddOffsetsToTxnResponse,
    AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse,
    EndTxnRequest,
    EndTxnResponse,
    InitProducerIdRequest,
    InitProducerIdResponse,
    TxnOffsetCommitRequest,
    TxnOffsetCommitResponse,
)

import kafka_wire as kw

# Kafka error codes (org.apache.kafka.common.protocol.Errors)
NONE = 0
COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
INVALID_PRODUCER_EPOCH = 47
INVALID_TXN_STATE = 48
INVALID_PRODUCER_ID_MAPPING = 49
INVALID_TRANSACTION_TIMEOUT = 50
CONCURRENT_TRANSACTIONS = 51
UNSTABLE_OFFSET_COMMIT = 88
PRODUCER_FENCED = 90
TRANSACTIONAL_ID_NOT_FOUND = 105

FIND_COORDINATOR = 10
OFFSET_FETCH = 9
LIST_OFFSETS = 2

RESPONSES = {
    InitProducerIdRequest: InitProducerIdResponse,
    AddPartitionsToTxnRequest: AddPartitionsToTxnResponse,
    AddOffsetsToTxnRequest: AddOffsetsToTxnResponse,
    EndTxnRequest: EndTxnResponse,
    TxnOffsetCommitRequest: TxnOffsetCommitResponse,
    DescribeTransactionsRequest: DescribeTransactionsResponse,
    ListTransactionsRequest: ListTransactionsResponse,
}


def call(port, request_cls, version, **fields):
    """Sends one request built from kafka-python's class for `request_cls` at
    `version` with `fields` (snake_case schema names) and returns the decoded
    response object."""
    req = request_cls[version](**fields)
    with kw.Conn(port) as conn:
        corr = conn.next_correlation_id
        conn.next_correlation_id += 1
        req.with_header(correlation_id=corr, client_id="tidelog-tests")
        conn.send_raw(bytes(req.encode(header=True, framed=True)))
        data = conn.recv_frame()
    resp = RESPONSES[request_cls].decode(data, version=version, header=True)
    assert resp.header.correlation_id == corr, (resp.header.correlation_id, corr)
    return resp


# --------------------------------------------------------------------------
# FindCoordinator v1 (non-flexible: key, key_type)


def find_coordinator(port, key, key_type):
    """(error_code, node_id, host, port) for a group (key_type 0) or a
    transactional id (key_type 1)."""
    with kw.Conn(port) as conn:
        r = conn.request(FIND_COORDINATOR, 1, kw.string(key) + kw.i8(key_type))
        r.i32()  # throttle
        err = r.i16()
        r.string()  # error message
        node = r.i32()
        host = r.string()
        cport = r.i32()
    return err, node, host, cport


def txn_coordinator_port(broker, transactional_id):
    err, _, _, port = find_coordinator(broker.port, transactional_id, 1)
    assert err == NONE, "FindCoordinator(transaction, %r) error %d" % (transactional_id, err)
    assert port in broker.ports, (port, broker.ports)
    return port


def other_port(broker, port):
    return [p for p in broker.ports if p != port][0]


# --------------------------------------------------------------------------
# the transaction APIs


def init_producer_id(port, transactional_id, timeout_ms=60000, version=3):
    fields = dict(transactional_id=transactional_id, transaction_timeout_ms=timeout_ms)
    if version >= 3:
        fields.update(producer_id=-1, producer_epoch=-1)
    r = call(port, InitProducerIdRequest, version, **fields)
    return r.error_code, r.producer_id, r.producer_epoch


def add_partitions(port, transactional_id, producer_id, epoch, topic, partitions, version=3):
    """{partition: error_code} of AddPartitionsToTxn v0-3 (the client versions)."""
    assert version <= 3
    T = AddPartitionsToTxnRequest.AddPartitionsToTxnTopic
    r = call(
        port,
        AddPartitionsToTxnRequest,
        version,
        v3_and_below_transactional_id=transactional_id,
        v3_and_below_producer_id=producer_id,
        v3_and_below_producer_epoch=epoch,
        v3_and_below_topics=[T(name=topic, partitions=list(partitions))],
    )
    out = {}
    for t in r.results_by_topic_v3_and_below:
        assert t.name == topic, t
        for p in t.results_by_partition:
            out[p.partition_index] = p.partition_error_code
    return out


def add_offsets(port, transactional_id, producer_id, epoch, group, version=3):
    r = call(
        port,
        AddOffsetsToTxnRequest,
        version,
        transactional_id=transactional_id,
        producer_id=producer_id,
        producer_epoch=epoch,
        group_id=group,
    )
    return r.error_code


def end_txn(port, transactional_id, producer_id, epoch, commit, version=3):
    r = call(
        port,
        EndTxnRequest,
        version,
        transactional_id=transactional_id,
        producer_id=producer_id,
        producer_epoch=epoch,
        committed=commit,
    )
    return r.error_code


def txn_offset_commit(port, transactional_id, group, producer_id, epoch, topic, offsets, version=3):
    """{partition: error_code}; `offsets` is {partition: offset}. Version 3
    carries generation -1 / member "" (a commit outside a live generation)."""
    T = TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic
    P = T.TxnOffsetCommitRequestPartition
    fields = dict(
        transactional_id=transactional_id,
        group_id=group,
        producer_id=producer_id,
        producer_epoch=epoch,
        topics=[
            T(
                name=topic,
                partitions=[
                    P(partition_index=p, committed_offset=o, committed_leader_epoch=-1, committed_metadata="")
                    for p, o in sorted(offsets.items())
                ],
            )
        ],
    )
    if version >= 3:
        fields.update(generation_id=-1, member_id="", group_instance_id=None)
    r = call(port, TxnOffsetCommitRequest, version, **fields)
    out = {}
    for t in r.topics:
        assert t.name == topic, t
        for p in t.partitions:
            out[p.partition_index] = p.error_code
    return out


def describe_transactions(port, transactional_ids):
    """{transactional_id: state object} (error_code, transaction_state,
    transaction_timeout_ms, producer_id, producer_epoch, topics)."""
    r = call(port, DescribeTransactionsRequest, 0, transactional_ids=list(transactional_ids))
    return {s.transactional_id: s for s in r.transaction_states}


def list_transactions(port, state_filters=(), producer_id_filters=(), version=0):
    """(error_code, {transactional_id: (producer_id, state)})."""
    r = call(
        port,
        ListTransactionsRequest,
        version,
        state_filters=list(state_filters),
        producer_id_filters=list(producer_id_filters),
    )
    return r.error_code, {s.transactional_id: (s.producer_id, s.transaction_state) for s in r.transaction_states}


def partitions_of(state):
    """{topic: sorted partitions} of a DescribeTransactions state."""
    return {t.topic: sorted(t.partitions) for t in state.topics}


# --------------------------------------------------------------------------
# OffsetFetch v1 and v7 (require_stable), ListOffsets v2 (isolation level)


def offset_fetch(port, group, topic, partitions, version=1, require_stable=False):
    """{partition: (offset, error_code)}. v7 adds require_stable (KIP-447)."""
    assert version in (1, 7)
    body = kw.string(group) + kw.array([topic], lambda t: kw.string(t) + kw.array(partitions, kw.i32))
    if version == 7:
        # v6+ is flexible: compact strings/arrays and tagged fields
        body = (
            kw.compact_string(group)
            + kw.uvarint(2)
            + kw.compact_string(topic)
            + kw.uvarint(len(partitions) + 1)
            + b"".join(kw.i32(p) for p in partitions)
            + b"\x00"  # topic tags
            + kw.i8(1 if require_stable else 0)
            + b"\x00"  # request tags
        )
        with kw.Conn(port) as conn:
            corr = conn.send_request(OFFSET_FETCH, 7, body, header_version=2)
            r = conn.recv_response(corr, header_version=1)
            r.i32()  # throttle
            out = {}
            for _ in range(_uvarint(r) - 1):
                _compact_string(r)
                for _ in range(_uvarint(r) - 1):
                    p = r.i32()
                    off = r.i64()
                    r.i32()  # leader epoch
                    _compact_string(r)  # metadata
                    err = r.i16()
                    _skip_tags(r)
                    out[p] = (off, err)
                _skip_tags(r)
            top_err = r.i16()
            return out, top_err
    with kw.Conn(port) as conn:
        r = conn.request(OFFSET_FETCH, 1, body)
        out = {}
        for _, ps in r.array(lambda rr: (rr.string(), rr.array(lambda x: (x.i32(), x.i64(), x.string(), x.i16())))):
            for p, o, _, e in ps:
                out[p] = (o, e)
        return out, NONE


def _uvarint(r):
    shift = n = 0
    while True:
        b = r.i8() & 0xFF
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n
        shift += 7


def _compact_string(r):
    n = _uvarint(r)
    return None if n == 0 else r._take(n - 1).decode()


def _skip_tags(r):
    for _ in range(_uvarint(r)):
        _uvarint(r)
        r._take(_uvarint(r))


def list_offsets_latest(port, topic, partitions, isolation_level):
    """{partition: (error_code, offset)} of ListOffsets v2 timestamp -1
    (latest): the high watermark for isolation 0, the last stable offset for
    isolation 1."""
    body = kw.i32(-1) + kw.i8(isolation_level)
    body += kw.array([topic], lambda t: kw.string(t) + kw.array(partitions, lambda p: kw.i32(p) + kw.i64(-1)))
    with kw.Conn(port) as conn:
        r = conn.request(LIST_OFFSETS, 2, body)
        r.i32()  # throttle
        out = {}
        for _, ps in r.array(lambda rr: (rr.string(), rr.array(lambda x: (x.i32(), x.i16(), x.i64(), x.i64())))):
            for p, e, _, o in ps:
                out[p] = (e, o)
        return out


def leader_ports(broker, topic, partitions):
    """{partition: port of its leader shard} from raw Metadata v5."""
    with kw.Conn(broker.port) as conn:
        md = kw.metadata(conn, 5, [topic])
    port_of = {b[0]: b[2] for b in md["brokers"]}
    (t,) = md["topics"]
    return {p.index: port_of[p.leader] for p in t.partitions if p.index in partitions}


def fetch_aborted(port, topic, partition, isolation_level, offset=0):
    """Fetch v4 of one partition from `offset`: (error_code, high watermark,
    last stable offset, aborted_transactions as [(producer_id, first_offset)]
    or None)."""
    body = kw.fetch_body_v4([(topic, [(partition, offset, 8 << 20)])], max_wait_ms=100, isolation_level=isolation_level)
    with kw.Conn(port) as conn:
        r = conn.request(kw.FETCH, 4, body)
        r.i32()  # throttle
        out = None
        for _ in range(r.i32()):
            assert r.string() == topic
            for _ in range(r.i32()):
                p = r.i32()
                err = r.i16()
                hw = r.i64()
                lso = r.i64()
                aborted = r.array(lambda x: (x.i64(), x.i64()))
                r.kbytes()  # records
                if p == partition:
                    out = (err, hw, lso, aborted)
        return out


def txn_batch(producer_id, epoch, base_sequence, values):
    """A transactional v2 record batch of `values` (bytes), base offset 0."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=True,
        producer_id=producer_id,
        producer_epoch=epoch,
        base_sequence=base_sequence,
        batch_size=1 << 30,
    )
    for i, v in enumerate(values):
        assert b.append(i, timestamp=None, key=None, value=v, headers=[]) is not None
    return bytes(b.build())


def txn_produce(port, transactional_id, topic, partition, batch, version=8):
    """One transactional Produce (acks=-1) of `batch` to `topic`-`partition`:
    its PartitionProduceResponse."""
    body = kw.produce_body(topic, partition, batch, transactional_id=transactional_id)
    with kw.Conn(port) as conn:
        r = conn.request(kw.PRODUCE, version, body)
    topics, _ = kw.parse_produce_response(r, version)
    ((_, (part,)),) = topics
    return part
