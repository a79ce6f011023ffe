"""Consume-transform-produce loop for test_transactions.py, run as its own
process so the test can kill it (-9) with the broker and start a fresh one.

    txn_pipeline.py BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP TRANSACTIONAL_ID TOTAL PROGRESS_FILE [PAUSE_S]

A read_committed consumer in GROUP (subscribed to IN_TOPIC) and a
transactional producer: every input record becomes one output record
"out-" + value on the same partition index of OUT_TOPIC; after each batch of
at most 50 records the consumer's positions go into the transaction
(send_offsets_to_transaction) and the transaction commits. Each commit
appends {"committed": sum of committed positions} to PROGRESS_FILE. Exits 0
once the committed positions cover TOTAL records; on any client error it
exits 3 (the test starts a new process: the same transactional id fences
this one and aborts its open transaction, the group resumes from the
committed offsets).
"""

import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

BATCH = 50


def main():
    bootstrap, in_topic, out_topic, group, txn_id, total, progress = sys.argv[1:8]
    total = int(total)
    # Optional pause between writing a batch and committing it, so that the
    # test's kills land mid-run (and mostly inside a transaction whose records
    # are in the log) rather than after a fast pipeline has finished.
    pause = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
    log = open(progress, "a")

    def note(**kv):
        kv["t"] = time.time()
        log.write(json.dumps(kv) + "\n")
        log.flush()

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "log_level": 3,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": txn_id,
            "linger.ms": 5,
            "transaction.timeout.ms": 30000,
            "log_level": 3,
        }
    )
    delivery_errors = []

    def on_delivery(err, msg):
        if err is not None:
            delivery_errors.append(str(err))

    try:
        producer.init_transactions(60)
        note(event="init")
        consumer.subscribe([in_topic])
        producer.begin_transaction()
        pending = 0
        idle_since = time.monotonic()
        while True:
            msgs = consumer.consume(BATCH, 0.5)
            for m in msgs:
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(m.error())
                producer.produce(
                    out_topic,
                    key=m.key(),
                    value=b"out-" + m.value(),
                    partition=m.partition(),
                    on_delivery=on_delivery,
                )
                pending += 1
            assignment = consumer.assignment()
            if pending and pause:
                # the batch's records reach the log, uncommitted, for a while
                producer.flush(30)
                time.sleep(pause)
            if pending:
                positions = consumer.position(assignment)
                producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata(), 30)
                producer.commit_transaction(30)
                if delivery_errors:
                    raise RuntimeError("delivery failed in a committed transaction: %r" % delivery_errors[:3])
                # Partitions not consumed yet by this process have no
                # position: their committed offset (from an earlier process)
                # counts instead.
                committed = sum(tp.offset for tp in positions if tp.offset >= 0)
                unread = [tp for tp in positions if tp.offset < 0]
                if unread:
                    committed += sum(tp.offset for tp in consumer.committed(unread, 30) if tp.offset >= 0)
                note(event="commit", committed=committed, records=pending)
                pending = 0
                idle_since = time.monotonic()
                producer.begin_transaction()
                if committed >= total:
                    note(event="done", committed=committed)
                    break
            elif assignment and time.monotonic() - idle_since > 2:
                idle_since = time.monotonic()
                stored = consumer.committed(assignment, 30)
                committed = sum(tp.offset for tp in stored if tp.offset >= 0)
                if committed >= total:
                    # Everything was committed by an earlier process.
                    note(event="done", committed=committed)
                    break
        producer.abort_transaction(30)
    except (KafkaException, RuntimeError) as e:
        note(event="error", error=str(e))
        print("pipeline error: %s" % e, file=sys.stderr)
        sys.exit(3)
    consumer.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
