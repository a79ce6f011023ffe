"""A group consumer run as its own process by test_groups.py, so a test can
SIGKILL it like a crashed client.

usage: group_worker.py ck|kp BOOTSTRAP GROUP TOPIC OUT_FILE [INSTANCE_ID]

Writes JSON lines to OUT_FILE: {"assign": [partitions]} whenever its
assignment changes, {"p": partition, "o": offset, "v": value} per record
(before its offset is committed synchronously), and {"closed": true} after a
clean close on SIGTERM.
"""

import json
import signal
import sys

stop = False


def on_term(*_):
    global stop
    stop = True


def main():
    kind, bootstrap, group, topic, out_path = sys.argv[1:6]
    instance = sys.argv[6] if len(sys.argv) > 6 else None
    signal.signal(signal.SIGTERM, on_term)
    out = open(out_path, "a", buffering=1)

    def emit(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if kind == "ck":
        from confluent_kafka import Consumer

        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "partition.assignment.strategy": "range",
            "log_level": 3,
        }
        if instance:
            conf["group.instance.id"] = instance
        c = Consumer(conf)

        def on_assign(consumer, parts):
            emit({"assign": sorted(p.partition for p in parts)})

        def on_revoke(consumer, parts):
            emit({"assign": []})

        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        while not stop:
            msgs = c.consume(100, 0.2)
            good = [m for m in msgs if m.error() is None]
            for m in good:
                emit({"p": m.partition(), "o": m.offset(), "v": m.value().decode()})
            if good:
                try:
                    c.commit(asynchronous=False)
                except Exception as e:  # noqa: BLE001 - a rebalance; the records come again
                    emit({"commit_error": str(e)})
        c.close()
    else:
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        c = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=6000,
            heartbeat_interval_ms=500,
            partition_assignment_strategy=[RangePartitionAssignor],
        )

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                emit({"assign": []})

            def on_partitions_assigned(self, assigned):
                emit({"assign": sorted(p.partition for p in assigned)})

        c.subscribe([topic], listener=Listener())
        while not stop:
            batch = c.poll(timeout_ms=200)
            recs = [r for rs in batch.values() for r in rs]
            for r in recs:
                emit({"p": r.partition, "o": r.offset, "v": r.value.decode()})
            if recs:
                try:
                    c.commit()
                except Exception as e:  # noqa: BLE001 - a rebalance; the records come again
                    emit({"commit_error": str(e)})
        c.close()
    emit({"closed": True})


if __name__ == "__main__":
    main()
