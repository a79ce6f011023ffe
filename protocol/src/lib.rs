//! Kafka wire protocol for tidelog.
//!
//! Pure functions over `bytes`: framing, request/response headers, the API
//! version table, Kafka error codes and the record batch v2 view, validator and
//! builder. No I/O and no runtime, so every shard (and the bench client) uses
//! the same code, and everything here is unit-tested without a broker.
//!
//! Message bodies use the `kafka-protocol` crate (generated from Kafka's JSON
//! schemas), re-exported as [`messages`]. Record batches are never decoded into
//! records on the broker: they stay opaque `Bytes` whose header is read in place.

#[cfg(not(target_os = "linux"))]
compile_error!("tidelog is Linux-only (io_uring, O_DIRECT): see linux-only.md");

pub mod api;
pub mod batch;
pub mod error;
pub mod fetch;
pub mod frame;
pub mod header;
pub mod legacy;
pub mod request;
pub mod types;

pub use kafka_protocol::messages;
pub use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

pub use error::ErrorCode;
pub use types::{Epoch, NodeId, Offset, PartitionId, ProducerId, ShardId};
