//! Request bodies: the one place a request body is decoded.
//!
//! `decode_request` turns the bytes after the request header into the typed
//! request of every API in the version table (`api::SUPPORTED_APIS`), and
//! refuses the rest. The broker's dispatch calls it, and so does the fuzzer
//! (fuzz/), so what is fuzzed is exactly what a client's bytes go through.
//! Pure: no I/O, and every length read from the body is checked against the
//! bytes left before anything is allocated (see third_party/README.md for
//! the vendored decoder's fixes).

use bytes::Bytes;
use kafka_protocol::messages::{self, ApiKey};
use kafka_protocol::protocol::Decodable;
use thiserror::Error;

use crate::{api, legacy};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// The API or this version of it is not in the version table.
    #[error("{key:?} v{version} is not supported")]
    Unsupported { key: ApiKey, version: i16 },
    /// The body does not decode as the request it claims to be.
    #[error("malformed {key:?} v{version} request: {reason}")]
    Malformed { key: ApiKey, version: i16, reason: String },
}

macro_rules! requests {
    ($($key:ident => $ty:ident),* $(,)?) => {
        /// A decoded request body of one of the APIs tidelog implements.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Request {
            $($key(messages::$ty),)*
        }

        /// Decodes the body of a `key` v`version` request (the frame after
        /// its header). Unsupported APIs and versions are refused before a
        /// byte of the body is read.
        pub fn decode_request(key: ApiKey, version: i16, body: &mut Bytes) -> Result<Request, RequestError> {
            if !api::is_supported(key as i16, version) {
                return Err(RequestError::Unsupported { key, version });
            }
            // Old versions (Produce v0-2, Fetch v0-3, ListOffsets v0) are
            // rewritten into the first version the decoder reads.
            let mut upgraded;
            let (body, version) = match legacy::upgrade_request(key, version, body) {
                None => (body, version),
                Some(Ok((v, b))) => {
                    upgraded = b;
                    (&mut upgraded, v)
                }
                Some(Err(reason)) => return Err(RequestError::Malformed { key, version, reason }),
            };
            match key {
                $(ApiKey::$key => messages::$ty::decode(body, version).map(Request::$key).map_err(|e| malformed(key, version, e)),)*
                _ => Err(RequestError::Unsupported { key, version }),
            }
        }
    };
}

fn malformed<E: std::fmt::Display>(key: ApiKey, version: i16, e: E) -> RequestError {
    RequestError::Malformed { key, version, reason: e.to_string() }
}

requests! {
    Produce => ProduceRequest,
    Fetch => FetchRequest,
    ListOffsets => ListOffsetsRequest,
    Metadata => MetadataRequest,
    ApiVersions => ApiVersionsRequest,
    CreateTopics => CreateTopicsRequest,
    DeleteTopics => DeleteTopicsRequest,
    DescribeConfigs => DescribeConfigsRequest,
    OffsetCommit => OffsetCommitRequest,
    OffsetFetch => OffsetFetchRequest,
    FindCoordinator => FindCoordinatorRequest,
    JoinGroup => JoinGroupRequest,
    Heartbeat => HeartbeatRequest,
    LeaveGroup => LeaveGroupRequest,
    SyncGroup => SyncGroupRequest,
    DescribeGroups => DescribeGroupsRequest,
    ListGroups => ListGroupsRequest,
    InitProducerId => InitProducerIdRequest,
    DeleteGroups => DeleteGroupsRequest,
    OffsetDelete => OffsetDeleteRequest,
    AlterConfigs => AlterConfigsRequest,
    IncrementalAlterConfigs => IncrementalAlterConfigsRequest,
    CreatePartitions => CreatePartitionsRequest,
    DeleteRecords => DeleteRecordsRequest,
    DescribeCluster => DescribeClusterRequest,
    DescribeLogDirs => DescribeLogDirsRequest,
    OffsetForLeaderEpoch => OffsetForLeaderEpochRequest,
    ElectLeaders => ElectLeadersRequest,
    AlterPartitionReassignments => AlterPartitionReassignmentsRequest,
    ListPartitionReassignments => ListPartitionReassignmentsRequest,
    DescribeTopicPartitions => DescribeTopicPartitionsRequest,
    AddPartitionsToTxn => AddPartitionsToTxnRequest,
    AddOffsetsToTxn => AddOffsetsToTxnRequest,
    EndTxn => EndTxnRequest,
    WriteTxnMarkers => WriteTxnMarkersRequest,
    TxnOffsetCommit => TxnOffsetCommitRequest,
    DescribeTransactions => DescribeTransactionsRequest,
    ListTransactions => ListTransactionsRequest,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Encodable;
    use bytes::BytesMut;

    #[test]
    fn every_supported_api_decodes_its_default_body_at_every_version() {
        for a in api::SUPPORTED_APIS {
            for version in a.min_version..=a.max_version {
                if legacy::is_legacy(a.key, version) {
                    continue; // legacy::tests
                }
                let mut buf = BytesMut::new();
                let body = default_body(a.key);
                encode_any(&body, &mut buf, version);
                let mut bytes = buf.freeze();
                let decoded = decode_request(a.key, version, &mut bytes)
                    .unwrap_or_else(|e| panic!("{:?} v{version}: {e}", a.key));
                assert_eq!(decoded, body, "{:?} v{version}", a.key);
                assert!(bytes.is_empty(), "{:?} v{version} left {} bytes", a.key, bytes.len());
            }
        }
    }

    #[test]
    fn unsupported_versions_and_apis_are_refused_unread() {
        let mut body = Bytes::from_static(&[0xff; 8]);
        assert_eq!(
            decode_request(ApiKey::Produce, 13, &mut body),
            Err(RequestError::Unsupported { key: ApiKey::Produce, version: 13 })
        );
        assert_eq!(
            decode_request(ApiKey::SaslHandshake, 1, &mut body),
            Err(RequestError::Unsupported { key: ApiKey::SaslHandshake, version: 1 })
        );
        assert_eq!(body.len(), 8);
    }

    #[test]
    fn truncated_body_is_malformed() {
        let mut body = Bytes::from_static(&[0, 0, 0, 5, 0]);
        assert!(matches!(decode_request(ApiKey::Metadata, 4, &mut body), Err(RequestError::Malformed { .. })));
    }

    fn default_body(key: ApiKey) -> Request {
        for_key_default(key)
    }

    macro_rules! defaults {
        ($($key:ident),* $(,)?) => {
            fn for_key_default(key: ApiKey) -> Request {
                match key {
                    $(ApiKey::$key => Request::$key(Default::default()),)*
                    other => panic!("{other:?} is not in the table"),
                }
            }
            fn encode_any(r: &Request, buf: &mut BytesMut, version: i16) {
                match r {
                    $(Request::$key(m) => m.encode(buf, version).expect("encode"),)*
                }
            }
        };
    }

    defaults! {
        Produce, Fetch, ListOffsets, Metadata, ApiVersions, CreateTopics, DeleteTopics, DescribeConfigs,
        OffsetCommit, OffsetFetch, FindCoordinator, JoinGroup, Heartbeat, LeaveGroup, SyncGroup, DescribeGroups,
        ListGroups, InitProducerId, DeleteGroups, OffsetDelete, AlterConfigs, IncrementalAlterConfigs,
        CreatePartitions, DeleteRecords, DescribeCluster, DescribeLogDirs, OffsetForLeaderEpoch, ElectLeaders,
        AlterPartitionReassignments, ListPartitionReassignments, DescribeTopicPartitions, AddPartitionsToTxn,
        AddOffsetsToTxn, EndTxn, WriteTxnMarkers, TxnOffsetCommit, DescribeTransactions, ListTransactions,
    }
}
