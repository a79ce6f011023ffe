"""The tests' own hand-built frames and parsers, checked against kafka-python's
generated encoders. No broker needed: if these fail, the bug is in tests/."""

import os
import struct

import pytest
from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse
from kafka.protocol.producer import ProduceRequest, ProduceResponse
from kafka.record.default_records import DefaultRecordBatch

import kafka_wire as kw


@pytest.mark.parametrize("version", range(3, 9))
def test_produce_request_matches_kafka_python(version):
    records = kw.build_batch([(b"k", b"v"), (None, b"w")])
    req = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=1234,
        topic_data=[
            ProduceRequest.TopicProduceData(
                name="topic-a",
                partition_data=[ProduceRequest.TopicProduceData.PartitionProduceData(index=3, records=records)],
            )
        ],
    )
    req.API_VERSION = version
    req.with_header(correlation_id=42, client_id="tidelog-tests")
    theirs = bytes(req.encode(version=version, header=True, framed=True))
    ours = kw.frame(
        kw.request_header_v1(kw.PRODUCE, version, 42) + kw.produce_body("topic-a", 3, records, -1, 1234)
    )
    assert ours == theirs


@pytest.mark.parametrize("version", range(3, 9))
def test_produce_response_parser(version):
    P = ProduceResponse.TopicProduceResponse.PartitionProduceResponse
    kwargs = dict(index=2, error_code=2, base_offset=77, log_append_time_ms=-1)
    if version >= 5:
        kwargs["log_start_offset"] = 5
    if version >= 8:
        kwargs["record_errors"] = []
        kwargs["error_message"] = "bad crc"
    resp = ProduceResponse(
        responses=[ProduceResponse.TopicProduceResponse(name="t", partition_responses=[P(**kwargs)])],
        throttle_time_ms=9,
    )
    body = bytes(resp.encode(version=version))
    r = kw.Reader(body)
    topics, throttle = kw.parse_produce_response(r, version)
    assert r.remaining() == 0
    assert throttle == 9
    assert topics[0][0] == "t"
    p = topics[0][1][0]
    assert (p.index, p.error_code, p.base_offset, p.log_append_time_ms) == (2, 2, 77, -1)
    if version >= 5:
        assert p.log_start_offset == 5
    if version >= 8:
        assert p.error_message == "bad crc"


@pytest.mark.parametrize("version", range(4, 9))
def test_metadata_request_matches_kafka_python(version):
    req = MetadataRequest(
        topics=[MetadataRequest.MetadataRequestTopic(name="bad/name")],
        allow_auto_topic_creation=True,
        include_cluster_authorized_operations=False,
        include_topic_authorized_operations=False,
    )
    req.API_VERSION = version
    req.with_header(correlation_id=5, client_id="tidelog-tests")
    theirs = bytes(req.encode(version=version, header=True, framed=True))
    ours = kw.frame(kw.request_header_v1(kw.METADATA, version, 5) + kw.metadata_body(version, ["bad/name"], True))
    assert ours == theirs


@pytest.mark.parametrize("version", range(4, 9))
def test_metadata_response_parser(version):
    B = MetadataResponse.MetadataResponseBroker
    T = MetadataResponse.MetadataResponseTopic
    P = T.MetadataResponsePartition
    resp = MetadataResponse(
        throttle_time_ms=0,
        brokers=[B(node_id=0, host="127.0.0.1", port=9092, rack=None), B(node_id=1, host="127.0.0.1", port=9093, rack=None)],
        cluster_id="c",
        controller_id=0,
        topics=[
            T(
                error_code=17,
                name="bad/name",
                is_internal=False,
                partitions=[
                    P(error_code=0, partition_index=0, leader_id=1, leader_epoch=0, replica_nodes=[1], isr_nodes=[1], offline_replicas=[])
                ],
            )
        ],
    )
    body = bytes(resp.encode(version=version))
    r = kw.Reader(body)
    md = kw.parse_metadata_response(r, version)
    assert r.remaining() == 0
    assert md["brokers"] == [(0, "127.0.0.1", 9092, None), (1, "127.0.0.1", 9093, None)]
    t = md["topics"][0]
    assert (t.error_code, t.name) == (17, "bad/name")
    assert (t.partitions[0].index, t.partitions[0].leader, t.partitions[0].replicas) == (0, 1, [1])


def test_api_versions_v0_roundtrip():
    req = ApiVersionsRequest()
    req.API_VERSION = 0
    req.with_header(correlation_id=1, client_id="tidelog-tests")
    assert bytes(req.encode(version=0, header=True, framed=True)) == kw.frame(
        kw.request_header_v1(kw.API_VERSIONS, 0, 1)
    )
    A = ApiVersionsResponse.ApiVersion
    resp = ApiVersionsResponse(
        error_code=35, api_keys=[A(api_key=0, min_version=3, max_version=9), A(api_key=18, min_version=0, max_version=3)]
    )
    r = kw.Reader(bytes(resp.encode(version=0)))
    err, table, raw = kw.parse_api_versions_v0(r)
    assert r.remaining() == 0
    assert err == 35 and table == {0: (3, 9), 18: (0, 3)} and len(raw) == 2


def test_record_batch_builder_and_crc():
    recs = [(b"key-%d" % i, b"value-%d" % i) for i in range(10)]
    batch = kw.build_batch(recs)
    assert batch[16] == 2  # magic
    assert kw.batch_crc_ok(batch)
    assert kw.decode_batch(batch) == [(i, k, v) for i, (k, v) in enumerate(recs)]
    bad = bytearray(batch)
    bad[-3] ^= 0x01
    assert not kw.batch_crc_ok(bad)
    assert not DefaultRecordBatch(bytes(bad)).validate_crc()
    # The CRC does not cover base offset or leader epoch: rewriting them keeps it valid.
    moved = bytearray(batch)
    struct.pack_into(">q", moved, 0, 12345)
    struct.pack_into(">i", moved, 12, 7)
    assert kw.batch_crc_ok(moved)


def _write_segment(path, batches, tail=b""):
    with open(path, "wb") as f:
        off = 0
        for recs in batches:
            b = bytearray(kw.build_batch(recs))
            struct.pack_into(">q", b, 0, off)
            off += len(recs)
            f.write(b)
        f.write(tail)


def test_parse_segment_stops_at_zero_tail_and_torn_batch(tmp_path):
    batches = [[(b"k%d" % j, b"v%d-%d" % (i, j)) for j in range(3)] for i in range(4)]
    p = str(tmp_path / ("%020d.log" % 0))
    _write_segment(p, batches, tail=b"\0" * 4096)
    parsed, tail = kw.parse_segment(p)
    assert [b.base_offset for b in parsed] == [0, 3, 6, 9]
    assert all(b.crc_ok and b.magic == 2 and b.record_count == 3 and b.last_offset_delta == 2 for b in parsed)
    assert set(tail) == {0}
    assert parsed[0].position == 0 and parsed[1].position == parsed[0].end
    # torn: cut in the middle of the last batch
    os.truncate(p, parsed[-1].position + parsed[-1].size // 2)
    parsed2, tail2 = kw.parse_segment(p)
    assert [b.base_offset for b in parsed2] == [0, 3, 6]
    assert len(tail2) == parsed[-1].size // 2
    assert kw.segment_files(str(tmp_path)) == [(0, p)]
