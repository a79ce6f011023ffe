//! Fetch response framing without the record data.
//!
//! The broker sends a Fetch response as: one length prefix computed up front,
//! then inline header bytes, then each partition's records straight from
//! memory (`Bytes` slices) or from a segment file (sendfile), interleaved.
//! This module encodes everything but the records (versions 0–16, the ones
//! tidelog advertises; v0–v3 for legacy clients: topics by id from v13, the partition tagged fields
//! `diverging_epoch` (KIP-320) and `current_leader` (v12+), v16's
//! top-level `node_endpoints` (KIP-951), and each partition's aborted
//! transactions for read_committed fetches (KIP-98)) and says where each partition's
//! records go; the records are never copied into the encoding.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::LENGTH_PREFIX_BYTES;

/// One partition's header fields and the length of its records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionHeader {
    pub partition_index: i32,
    pub error_code: i16,
    pub high_watermark: i64,
    pub last_stable_offset: i64,
    pub log_start_offset: i64,
    pub records_bytes: usize,
    /// KIP-320: where the fetcher's log diverged from this one, as
    /// (epoch, end offset); sent as tagged field 0 from v12, ignored before.
    pub diverging_epoch: Option<(i32, i64)>,
    /// The partition's leader as (broker id, leader epoch), for a fetcher
    /// that asked the wrong broker; tagged field 1 from v12 (KIP-951 uses
    /// it with v16's `node_endpoints`), ignored before.
    pub current_leader: Option<(i32, i32)>,
    /// KIP-98: the aborted transactions overlapping the records, as
    /// (producer id, first offset), for a read_committed fetch; empty
    /// otherwise (sent as an empty array, as before).
    pub aborted_transactions: Vec<(i64, i64)>,
}

/// A topic of the response: by name up to v12, by id from v13 (KIP-516).
#[derive(Clone, Debug, Default)]
pub struct TopicHeader {
    pub name: std::rc::Rc<str>,
    pub id: [u8; 16],
    pub partitions: Vec<PartitionHeader>,
}

/// A broker named in `current_leader`, sent from v16 so the client need not
/// ask Metadata where it is (KIP-951).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeEndpoint {
    pub node_id: i32,
    pub host: String,
    pub port: i32,
    pub rack: Option<String>,
}

/// The encoded response minus records: `inline[0]`, records of partition 0,
/// `inline[1]`, records of partition 1, ..., `inline[n]` (partitions in
/// request order across topics). `inline.len() == partitions + 1`.
#[derive(Debug)]
pub struct FetchFrame {
    pub inline: Vec<Bytes>,
    pub frame_bytes: usize,
}

fn put_uvarint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn put_array_len(buf: &mut BytesMut, flexible: bool, n: usize) {
    if flexible {
        put_uvarint(buf, n as u64 + 1);
    } else {
        buf.put_i32(n as i32);
    }
}

fn put_compact_str(buf: &mut BytesMut, s: &str) {
    put_uvarint(buf, s.len() as u64 + 1);
    buf.put_slice(s.as_bytes());
}

/// Encodes a Fetch response of `version` (0..=16; v0–v3 are the legacy
/// shapes: no throttle time in v0, no last stable offset or aborted
/// transactions before v4) for `correlation_id`;
/// `node_endpoints` go out from v16 only.
pub fn encode_fetch_frame(
    version: i16,
    correlation_id: i32,
    session_id: i32,
    topics: &[TopicHeader],
    node_endpoints: &[NodeEndpoint],
) -> FetchFrame {
    debug_assert!((0..=16).contains(&version), "fetch v{version} framing");
    let flexible = version >= 12;
    let mut inline = Vec::new();
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // length, patched below
    buf.put_i32(correlation_id);
    if flexible {
        put_uvarint(&mut buf, 0); // response header tagged fields
    }
    if version >= 1 {
        buf.put_i32(0); // throttle_time_ms
    }
    if version >= 7 {
        buf.put_i16(0);
        buf.put_i32(session_id);
    }
    put_array_len(&mut buf, flexible, topics.len());
    let mut records_total = 0usize;
    for t in topics {
        if version >= 13 {
            buf.put_slice(&t.id);
        } else if flexible {
            put_compact_str(&mut buf, &t.name);
        } else {
            buf.put_i16(t.name.len() as i16);
            buf.put_slice(t.name.as_bytes());
        }
        put_array_len(&mut buf, flexible, t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            buf.put_i32(p.partition_index);
            buf.put_i16(p.error_code);
            buf.put_i64(p.high_watermark);
            if version >= 4 {
                buf.put_i64(p.last_stable_offset);
            }
            if version >= 5 {
                buf.put_i64(p.log_start_offset);
            }
            if version >= 4 {
                put_array_len(&mut buf, flexible, p.aborted_transactions.len());
            }
            for (producer_id, first_offset) in p.aborted_transactions.iter().filter(|_| version >= 4) {
                buf.put_i64(*producer_id);
                buf.put_i64(*first_offset);
                if flexible {
                    put_uvarint(&mut buf, 0); // the AbortedTransaction's tagged fields
                }
            }
            if version >= 11 {
                buf.put_i32(-1); // preferred read replica
            }
            if flexible {
                put_uvarint(&mut buf, p.records_bytes as u64 + 1);
            } else {
                buf.put_i32(p.records_bytes as i32);
            }
            inline.push(buf.split().freeze());
            records_total += p.records_bytes;
            if flexible {
                // The partition's tagged fields, by ascending tag: 0 the
                // EpochEndOffset (epoch, end offset), 1 the LeaderIdAndEpoch;
                // each struct ends with its own empty tagged fields.
                let count = p.diverging_epoch.is_some() as u64 + p.current_leader.is_some() as u64;
                put_uvarint(&mut buf, count);
                if let Some((epoch, end_offset)) = p.diverging_epoch {
                    put_uvarint(&mut buf, 0);
                    put_uvarint(&mut buf, 4 + 8 + 1);
                    buf.put_i32(epoch);
                    buf.put_i64(end_offset);
                    put_uvarint(&mut buf, 0);
                }
                if let Some((leader_id, leader_epoch)) = p.current_leader {
                    put_uvarint(&mut buf, 1);
                    put_uvarint(&mut buf, 4 + 4 + 1);
                    buf.put_i32(leader_id);
                    buf.put_i32(leader_epoch);
                    put_uvarint(&mut buf, 0);
                }
            }
            let last_partition = pi + 1 == t.partitions.len();
            if flexible && last_partition {
                put_uvarint(&mut buf, 0); // topic tagged fields
            }
        }
        if flexible && t.partitions.is_empty() {
            put_uvarint(&mut buf, 0);
        }
    }
    if version >= 16 && !node_endpoints.is_empty() {
        // Top-level tagged field 0: the NodeEndpoints array.
        let mut field = BytesMut::with_capacity(32 * node_endpoints.len());
        put_uvarint(&mut field, node_endpoints.len() as u64 + 1);
        for n in node_endpoints {
            field.put_i32(n.node_id);
            put_compact_str(&mut field, &n.host);
            field.put_i32(n.port);
            match &n.rack {
                Some(rack) => put_compact_str(&mut field, rack),
                None => put_uvarint(&mut field, 0),
            }
            put_uvarint(&mut field, 0);
        }
        put_uvarint(&mut buf, 1);
        put_uvarint(&mut buf, 0);
        put_uvarint(&mut buf, field.len() as u64);
        buf.put_slice(&field);
    } else if flexible {
        put_uvarint(&mut buf, 0); // top-level tagged fields
    }
    inline.push(buf.split().freeze());
    let inline_bytes: usize = inline.iter().map(|b| b.len()).sum();
    let frame_bytes = inline_bytes + records_total;
    // Patch the length prefix (first 4 bytes of the first inline chunk).
    let mut first = BytesMut::from(&inline[0][..]);
    first[..LENGTH_PREFIX_BYTES].copy_from_slice(&((frame_bytes - LENGTH_PREFIX_BYTES) as i32).to_be_bytes());
    inline[0] = first.freeze();
    FetchFrame { inline, frame_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::decode_response;
    use kafka_protocol::messages::{ApiKey, FetchResponse};

    fn sample() -> (Vec<TopicHeader>, Vec<Bytes>) {
        let records: Vec<Bytes> =
            vec![Bytes::from_static(b"first-partition-records"), Bytes::new(), Bytes::from(vec![7u8; 300])];
        let topics = vec![
            TopicHeader {
                name: "alpha".into(),
                id: [0xa1; 16],
                partitions: vec![
                    PartitionHeader {
                        partition_index: 0,
                        high_watermark: 10,
                        last_stable_offset: 10,
                        log_start_offset: 0,
                        records_bytes: records[0].len(),
                        ..Default::default()
                    },
                    PartitionHeader {
                        partition_index: 3,
                        error_code: 6,
                        high_watermark: -1,
                        last_stable_offset: -1,
                        log_start_offset: -1,
                        records_bytes: 0,
                        diverging_epoch: Some((4, 17)),
                        current_leader: Some((2001, 9)),
                        aborted_transactions: Vec::new(),
                    },
                ],
            },
            TopicHeader {
                name: "b".into(),
                id: [0xb2; 16],
                partitions: vec![PartitionHeader {
                    partition_index: 1,
                    high_watermark: 99,
                    last_stable_offset: 80,
                    log_start_offset: 5,
                    records_bytes: 300,
                    aborted_transactions: vec![(7, 12), (1 << 40, 60)],
                    ..Default::default()
                }],
            },
            TopicHeader { name: "empty".into(), id: [0xe3; 16], partitions: vec![] },
        ];
        (topics, records)
    }

    /// v0–v3 (legacy clients) are below what kafka-protocol decodes: read
    /// by hand, as Kafka 0.10 lays them out.
    #[test]
    fn legacy_versions_have_the_old_shape() {
        let (topics, records) = sample();
        for version in 0..=3i16 {
            let frame = encode_fetch_frame(version, 42, 0, &topics, &[]);
            let mut whole = Vec::new();
            for (i, chunk) in frame.inline.iter().enumerate() {
                whole.extend_from_slice(chunk);
                if let Some(r) = records.get(i) {
                    whole.extend_from_slice(r);
                }
            }
            assert_eq!(whole.len(), frame.frame_bytes, "v{version}");
            let mut at = 0usize;
            let mut take = |n: usize| {
                let s = whole[at..at + n].to_vec();
                at += n;
                s
            };
            let int = |b: Vec<u8>| b.iter().fold(0i64, |acc, x| (acc << 8) | i64::from(*x));
            assert_eq!(int(take(4)) as usize + 4, frame.frame_bytes, "v{version} length");
            assert_eq!(int(take(4)), 42);
            if version >= 1 {
                assert_eq!(int(take(4)), 0, "throttle");
            }
            assert_eq!(int(take(4)), 3, "topics");
            let mut got = Vec::new();
            for _ in 0..3 {
                let n = int(take(2)) as usize;
                let name = String::from_utf8(take(n)).expect("utf8");
                let parts = int(take(4));
                for _ in 0..parts {
                    let (index, error, hw) = (int(take(4)), int(take(2)), int(take(8)));
                    let len = int(take(4)) as usize;
                    got.push((name.clone(), index, error, hw, take(len).len()));
                }
            }
            assert_eq!(at, whole.len(), "v{version}: trailing bytes");
            assert_eq!(
                got,
                vec![
                    ("alpha".to_string(), 0, 0, 10, 23),
                    ("alpha".to_string(), 3, 6, -1, 0),
                    ("b".to_string(), 1, 0, 99, 300)
                ],
                "v{version}"
            );
        }
    }

    #[test]
    fn decodes_with_kafka_protocol_in_every_version() {
        let (topics, records) = sample();
        let endpoints = vec![
            NodeEndpoint { node_id: 2001, host: "h2".into(), port: 9093, rack: Some("r2".into()) },
            NodeEndpoint { node_id: 3000, host: "host-three".into(), port: 9094, rack: None },
        ];
        for version in 4..=16i16 {
            let frame = encode_fetch_frame(version, 42, 0, &topics, &endpoints);
            assert_eq!(frame.inline.len(), 4);
            let mut whole = BytesMut::new();
            for (i, chunk) in frame.inline.iter().enumerate() {
                whole.extend_from_slice(chunk);
                if let Some(r) = records.get(i) {
                    whole.extend_from_slice(r);
                }
            }
            assert_eq!(whole.len(), frame.frame_bytes, "v{version}");
            let declared = i32::from_be_bytes([whole[0], whole[1], whole[2], whole[3]]) as usize;
            assert_eq!(declared + 4, whole.len(), "v{version} length prefix");
            let mut body = whole.freeze().slice(4..);
            let (cid, resp): (i32, FetchResponse) =
                decode_response(ApiKey::Fetch, version, &mut body).unwrap_or_else(|e| panic!("v{version}: {e:?}"));
            assert!(body.is_empty(), "v{version}: {} trailing bytes", body.len());
            assert_eq!(cid, 42);
            assert_eq!(resp.responses.len(), 3);
            if version >= 13 {
                assert_eq!(resp.responses[0].topic_id.as_bytes(), &[0xa1; 16], "v{version}: topic by id");
                assert_eq!(resp.responses[1].topic_id.as_bytes(), &[0xb2; 16]);
                assert_eq!(&*resp.responses[0].topic.0, "", "v{version}: no topic name");
            } else {
                assert_eq!(&*resp.responses[0].topic.0, "alpha");
                assert_eq!(&*resp.responses[1].topic.0, "b");
            }
            let p0 = &resp.responses[0].partitions[0];
            assert_eq!((p0.partition_index, p0.high_watermark), (0, 10));
            assert_eq!(p0.records.as_deref(), Some(&b"first-partition-records"[..]));
            let p1 = &resp.responses[0].partitions[1];
            assert_eq!((p1.partition_index, p1.error_code), (3, 6));
            let diverging = (p1.diverging_epoch.epoch, p1.diverging_epoch.end_offset);
            if version >= 12 {
                assert_eq!(diverging, (4, 17), "v{version}: diverging epoch as tagged field 0");
            } else {
                assert_eq!(diverging, (-1, -1), "v{version} has no diverging epoch");
            }
            let leader = (p1.current_leader.leader_id.0, p1.current_leader.leader_epoch);
            assert_eq!(leader, if version >= 12 { (2001, 9) } else { (-1, -1) }, "v{version}: current leader");
            assert_eq!(p0.current_leader.leader_id.0, -1, "v{version}: no leader unless set");
            if version >= 16 {
                let got: Vec<(i32, &str, i32, Option<&str>)> =
                    resp.node_endpoints.iter().map(|n| (n.node_id.0, &*n.host, n.port, n.rack.as_deref())).collect();
                assert_eq!(got, vec![(2001, "h2", 9093, Some("r2")), (3000, "host-three", 9094, None)]);
            } else {
                assert!(resp.node_endpoints.is_empty(), "v{version} has no node endpoints");
            }
            let p0_diverging = (p0.diverging_epoch.epoch, p0.diverging_epoch.end_offset);
            assert_eq!(p0_diverging, (-1, -1), "v{version}: none unless set");
            assert_eq!(p1.records.as_deref(), Some(&b""[..]));
            let b = &resp.responses[1].partitions[0];
            assert_eq!(b.records.as_ref().map(|r| r.len()), Some(300));
            if version >= 5 {
                assert_eq!(b.log_start_offset, 5);
            }
            assert_eq!(b.last_stable_offset, 80);
            let aborted: Vec<(i64, i64)> =
                b.aborted_transactions.iter().flatten().map(|a| (a.producer_id.0, a.first_offset)).collect();
            assert_eq!(aborted, vec![(7, 12), (1 << 40, 60)], "v{version}: aborted transactions");
            assert_eq!(p0.aborted_transactions.as_ref().map(|a| a.len()), Some(0), "v{version}: empty, not null");
            assert!(resp.responses[2].partitions.is_empty());
        }
    }
}
