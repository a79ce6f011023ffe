//! The API version table: exactly what tidelog implements, nothing more.
//!
//! Clients pick `min(their max, our max)` per API, so advertising a version
//! means every field of it is honoured. Kafka 4.x dropped Produce < 3,
//! Fetch < 4, ListOffsets v0, OffsetCommit < 2 and OffsetFetch v0; tidelog
//! keeps them for clients that cannot
//! ask ApiVersions (librdkafka `broker.version.fallback=0.9.0`, kafka-python
//! `api_version=(0, 10)`), reading them through `legacy` and converting
//! their magic 0/1 messages to and from v2 batches. Produce stops at 12 because later versions
//! address topics by id only; Fetch goes to 16 (topics by id from 13,
//! KIP-903's replica state from 15, KIP-951's leader endpoints in 16).

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use crate::ErrorCode;

/// One implemented API and its version range, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiSupport {
    pub key: ApiKey,
    pub min_version: i16,
    pub max_version: i16,
}

const fn api(key: ApiKey, min_version: i16, max_version: i16) -> ApiSupport {
    ApiSupport { key, min_version, max_version }
}

/// Every API tidelog answers, with the versions it implements.
pub const SUPPORTED_APIS: &[ApiSupport] = &[
    api(ApiKey::Produce, 0, 12),
    api(ApiKey::Fetch, 0, 16),
    api(ApiKey::ListOffsets, 0, 7),
    api(ApiKey::Metadata, 0, 12),
    api(ApiKey::ApiVersions, 0, 4),
    api(ApiKey::CreateTopics, 2, 7),
    api(ApiKey::DeleteTopics, 1, 5),
    api(ApiKey::DescribeConfigs, 1, 4),
    api(ApiKey::OffsetCommit, 0, 9),
    api(ApiKey::OffsetFetch, 0, 9),
    api(ApiKey::FindCoordinator, 0, 4),
    api(ApiKey::JoinGroup, 0, 9),
    api(ApiKey::Heartbeat, 0, 4),
    api(ApiKey::LeaveGroup, 0, 5),
    api(ApiKey::SyncGroup, 0, 5),
    api(ApiKey::DescribeGroups, 0, 5),
    api(ApiKey::ListGroups, 0, 5),
    api(ApiKey::InitProducerId, 0, 5),
    api(ApiKey::DeleteGroups, 0, 2),
    api(ApiKey::OffsetDelete, 0, 0),
    api(ApiKey::AlterConfigs, 0, 2),
    api(ApiKey::IncrementalAlterConfigs, 0, 1),
    api(ApiKey::CreatePartitions, 0, 3),
    api(ApiKey::DeleteRecords, 0, 2),
    api(ApiKey::DescribeCluster, 0, 1),
    api(ApiKey::DescribeLogDirs, 1, 4),
    api(ApiKey::OffsetForLeaderEpoch, 2, 4),
    api(ApiKey::ElectLeaders, 0, 2),
    api(ApiKey::AlterPartitionReassignments, 0, 1),
    api(ApiKey::ListPartitionReassignments, 0, 0),
    api(ApiKey::DescribeTopicPartitions, 0, 0),
    // Transactions (KIP-98). Versions 5+ of AddPartitionsToTxn/EndTxn and
    // the TV2 forms (KIP-890 part 2: an epoch bump per transaction) are not
    // implemented; AddPartitionsToTxn v4 is the broker-to-broker batched
    // form with `verify_only`.
    api(ApiKey::AddPartitionsToTxn, 0, 4),
    api(ApiKey::AddOffsetsToTxn, 0, 4),
    api(ApiKey::EndTxn, 0, 4),
    api(ApiKey::WriteTxnMarkers, 1, 1),
    api(ApiKey::TxnOffsetCommit, 0, 4),
    api(ApiKey::DescribeTransactions, 0, 0),
    api(ApiKey::ListTransactions, 0, 1),
];

/// The implemented version range of `api_key`, or `None` when the API is not
/// implemented (or not a Kafka API at all).
pub fn supported(api_key: i16) -> Option<ApiSupport> {
    SUPPORTED_APIS.iter().copied().find(|a| a.key as i16 == api_key)
}

/// Whether `version` of `api_key` is implemented.
pub fn is_supported(api_key: i16, version: i16) -> bool {
    supported(api_key).is_some_and(|a| (a.min_version..=a.max_version).contains(&version))
}

fn api_list() -> Vec<ApiVersion> {
    SUPPORTED_APIS
        .iter()
        .map(|a| {
            ApiVersion::default()
                .with_api_key(a.key as i16)
                .with_min_version(a.min_version)
                .with_max_version(a.max_version)
        })
        .collect()
}

/// The ApiVersions answer to a request this broker can decode.
pub fn api_versions_response() -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_error_code(ErrorCode::None.code()).with_api_keys(api_list())
}

/// KIP-511: a client asking with a newer ApiVersions version than we know gets
/// UNSUPPORTED_VERSION in the v0 format, with our list, and retries with the
/// highest version in it.
pub fn api_versions_unsupported_response() -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_error_code(ErrorCode::UnsupportedVersion.code()).with_api_keys(api_list())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_within_what_kafka_protocol_can_encode() {
        for a in SUPPORTED_APIS {
            let range = a.key.valid_versions();
            let min =
                crate::legacy::first_modern_version(a.key).map_or(a.min_version, |_| a.min_version.max(range.min));
            assert!(min >= range.min && a.max_version <= range.max, "{a:?} outside {range:?}");
            assert!(a.min_version <= a.max_version);
        }
    }

    #[test]
    fn lookups() {
        assert!(is_supported(0, 3));
        assert!(is_supported(0, 0));
        assert!(!is_supported(0, -1));
        assert!(!is_supported(0, 13));
        assert!(!is_supported(999, 0));
        assert_eq!(supported(18).map(|a| a.max_version), Some(4));
    }
}
