"""The broker reads the io-properties file `tidelog-tune iotune` writes and
sizes its accumulator flushes from it (issue 6, point 3)."""

import json
import os
import re

from clients import check_contiguous, consume_confluent, make_records, produce_confluent
from conftest import create_topic, unique_topic


def test_io_properties_size_the_flushes(broker_factory):
    b = broker_factory(start=False)
    os.makedirs(b.log_dirs, exist_ok=True)
    props = {
        "version": 1,
        "dir": b.log_dirs,
        "filesystem": "ext4",
        "write_bandwidth_bytes_per_s": 123456789,
        "best_write_block_bytes": 8192,
        "best_queue_depth": 2,
    }
    with open(os.path.join(b.log_dirs, "io-properties.json"), "w") as f:
        json.dump(props, f)
    b.start()
    line = b.wait_log(r"using io-properties .*io-properties\.json: flush writes up to (\d+) bytes, (\d+) in flight")
    m = re.search(r"flush writes up to (\d+) bytes, (\d+) in flight", line)
    assert (int(m.group(1)), int(m.group(2))) == (8192, 2), line
    # Flushes now go out as many 8 KiB writes, two at a time: data must be intact.
    topic = unique_topic("iop")
    create_topic(b, topic, 2)
    records = make_records(5000)
    acked = produce_confluent(b, topic, records, **{"batch.size": 512 * 1024})
    ends = {p: 1 + max(o for (pp, o, _, _) in acked if pp == p) for p in (0, 1)}
    got = consume_confluent(b, topic, ends)
    check_contiguous(got, ends)
    assert sorted(v for recs in got.values() for (_, _, v) in recs) == sorted(v for _, v in records)


def test_without_io_properties_the_log_says_how_to_make_one(broker):
    assert re.search(r"no io-properties file at .* \(run `tidelog-tune iotune --dir ", broker.log_text())
