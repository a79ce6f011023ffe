//! Fetch response framing without the record data.
//!
//! The broker sends a Fetch response as: one length prefix computed up front,
//! then inline header bytes, then each partition's records straight from
//! memory (`Bytes` slices) or from a segment file (sendfile), interleaved.
//! This module encodes everything but the records (versions 4–12, the ones
//! tidelog advertises; the only tagged field sent is v12's
//! `diverging_epoch`) and says where each partition's records go; the
//! records are never copied into the encoding.

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
    /// (epoch, end offset); sent as tagged field 0 in v12, ignored before.
    pub diverging_epoch: Option<(i32, i64)>,
}

#[derive(Clone, Debug, Default)]
pub struct TopicHeader {
    pub name: String,
    pub partitions: Vec<PartitionHeader>,
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

/// Encodes a Fetch response of `version` (4..=12) for `correlation_id`.
pub fn encode_fetch_frame(version: i16, correlation_id: i32, session_id: i32, topics: &[TopicHeader]) -> FetchFrame {
    debug_assert!((4..=12).contains(&version), "fetch v{version} framing");
    let flexible = version >= 12;
    let mut inline = Vec::new();
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // length, patched below
    buf.put_i32(correlation_id);
    if flexible {
        put_uvarint(&mut buf, 0); // response header tagged fields
    }
    buf.put_i32(0); // throttle_time_ms
    if version >= 7 {
        buf.put_i16(0);
        buf.put_i32(session_id);
    }
    put_array_len(&mut buf, flexible, topics.len());
    let mut records_total = 0usize;
    for t in topics {
        if flexible {
            put_uvarint(&mut buf, t.name.len() as u64 + 1);
        } else {
            buf.put_i16(t.name.len() as i16);
        }
        buf.put_slice(t.name.as_bytes());
        put_array_len(&mut buf, flexible, t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            buf.put_i32(p.partition_index);
            buf.put_i16(p.error_code);
            buf.put_i64(p.high_watermark);
            buf.put_i64(p.last_stable_offset);
            if version >= 5 {
                buf.put_i64(p.log_start_offset);
            }
            put_array_len(&mut buf, flexible, 0); // aborted transactions: none
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
                match p.diverging_epoch {
                    // One tagged field: tag 0, then the EpochEndOffset struct
                    // (epoch, end offset, its own empty tagged fields).
                    Some((epoch, end_offset)) => {
                        put_uvarint(&mut buf, 1);
                        put_uvarint(&mut buf, 0);
                        put_uvarint(&mut buf, 4 + 8 + 1);
                        buf.put_i32(epoch);
                        buf.put_i64(end_offset);
                        put_uvarint(&mut buf, 0);
                    }
                    None => put_uvarint(&mut buf, 0), // partition tagged fields
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
    if flexible {
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
                    },
                ],
            },
            TopicHeader {
                name: "b".into(),
                partitions: vec![PartitionHeader {
                    partition_index: 1,
                    high_watermark: 99,
                    last_stable_offset: 99,
                    log_start_offset: 5,
                    records_bytes: 300,
                    ..Default::default()
                }],
            },
            TopicHeader { name: "empty".into(), partitions: vec![] },
        ];
        (topics, records)
    }

    #[test]
    fn decodes_with_kafka_protocol_in_every_version() {
        let (topics, records) = sample();
        for version in 4..=12i16 {
            let frame = encode_fetch_frame(version, 42, 0, &topics);
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
            let (cid, resp): (i32, FetchResponse) = decode_response(ApiKey::Fetch, version, &mut body).expect("decode");
            assert!(body.is_empty(), "v{version}: {} trailing bytes", body.len());
            assert_eq!(cid, 42);
            assert_eq!(resp.responses.len(), 3);
            assert_eq!(&*resp.responses[0].topic.0, "alpha");
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
            let p0_diverging = (p0.diverging_epoch.epoch, p0.diverging_epoch.end_offset);
            assert_eq!(p0_diverging, (-1, -1), "v{version}: none unless set");
            assert_eq!(p1.records.as_deref(), Some(&b""[..]));
            let b = &resp.responses[1].partitions[0];
            assert_eq!(b.records.as_ref().map(|r| r.len()), Some(300));
            if version >= 5 {
                assert_eq!(b.log_start_offset, 5);
            }
            assert!(resp.responses[2].partitions.is_empty());
        }
    }
}
