//! Request and response headers.
//!
//! Request header v0–v2 (v2 adds tagged fields for flexible versions);
//! response header v0–v1. ApiVersions responses always use header v0, even
//! for flexible versions, so a client that does not know our versions yet can
//! still read the correlation id.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};
use thiserror::Error;

use crate::frame::LENGTH_PREFIX_BYTES;

/// The fixed start of every request header, readable for any api key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestPrefix {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("request of {0} bytes is shorter than a request header")]
    Truncated(usize),
    #[error("unknown api key {api_key} (correlation id {correlation_id})")]
    UnknownApiKey { api_key: i16, correlation_id: i32 },
    #[error("malformed request header for api key {api_key} v{api_version}: {reason}")]
    Malformed { api_key: i16, api_version: i16, reason: String },
}

/// Reads api key, version and correlation id without decoding the rest.
pub fn request_prefix(frame: &[u8]) -> Result<RequestPrefix, HeaderError> {
    if frame.len() < 8 {
        return Err(HeaderError::Truncated(frame.len()));
    }
    Ok(RequestPrefix {
        api_key: i16::from_be_bytes([frame[0], frame[1]]),
        api_version: i16::from_be_bytes([frame[2], frame[3]]),
        correlation_id: i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
    })
}

/// Decodes the request header at the front of `frame`, leaving `frame` at the
/// start of the request body.
///
/// The header owns its bytes (the client id and any tagged fields are
/// copied): it must not keep the frame's buffer shared, so that a produce
/// handler can take the frame back as the only owner and assign offsets in
/// place.
pub fn decode_request_header(frame: &mut Bytes) -> Result<(ApiKey, RequestHeader), HeaderError> {
    let prefix = request_prefix(frame)?;
    let key = ApiKey::try_from(prefix.api_key)
        .map_err(|_| HeaderError::UnknownApiKey { api_key: prefix.api_key, correlation_id: prefix.correlation_id })?;
    let header_version = key.request_header_version(prefix.api_version);
    let mut header = RequestHeader::decode(frame, header_version).map_err(|e| HeaderError::Malformed {
        api_key: prefix.api_key,
        api_version: prefix.api_version,
        reason: e.to_string(),
    })?;
    header.client_id = header.client_id.map(|c| kafka_protocol::protocol::StrBytes::from_string(c.to_string()));
    for value in header.unknown_tagged_fields.values_mut() {
        *value = Bytes::copy_from_slice(value);
    }
    Ok((key, header))
}

/// The response header version for `key` at `version`.
pub fn response_header_version(key: ApiKey, version: i16) -> i16 {
    if key == ApiKey::ApiVersions {
        0
    } else {
        key.response_header_version(version)
    }
}

/// Encodes a whole response frame: length prefix, header, body.
///
/// `body_version` is the version the body is encoded in; for the KIP-511
/// fallback it differs from the version the client asked for.
pub fn encode_response<M: Encodable>(
    key: ApiKey,
    header_for_version: i16,
    correlation_id: i32,
    body: &M,
    body_version: i16,
) -> Result<BytesMut, EncodeError> {
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let header_version = response_header_version(key, header_for_version);
    let size_bytes = header.compute_size(header_version).map_err(EncodeError::from_any)?
        + body.compute_size(body_version).map_err(EncodeError::from_any)?;
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX_BYTES + size_bytes);
    buf.put_i32(size_bytes as i32);
    header.encode(&mut buf, header_version).map_err(EncodeError::from_any)?;
    body.encode(&mut buf, body_version).map_err(EncodeError::from_any)?;
    debug_assert_eq!(buf.len(), LENGTH_PREFIX_BYTES + size_bytes);
    Ok(buf)
}

/// Encodes a request frame (used by the bench client and tests).
pub fn encode_request<M: Encodable>(header: &RequestHeader, body: &M) -> Result<BytesMut, EncodeError> {
    let key = ApiKey::try_from(header.request_api_key)
        .map_err(|_| EncodeError(format!("unknown api key {}", header.request_api_key)))?;
    let version = header.request_api_version;
    let header_version = key.request_header_version(version);
    let size_bytes = header.compute_size(header_version).map_err(EncodeError::from_any)?
        + body.compute_size(version).map_err(EncodeError::from_any)?;
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX_BYTES + size_bytes);
    buf.put_i32(size_bytes as i32);
    header.encode(&mut buf, header_version).map_err(EncodeError::from_any)?;
    body.encode(&mut buf, version).map_err(EncodeError::from_any)?;
    Ok(buf)
}

/// Decodes a response frame body (without length prefix) for `key`/`version`:
/// returns the correlation id and the body.
pub fn decode_response<M: Decodable>(key: ApiKey, version: i16, frame: &mut Bytes) -> Result<(i32, M), EncodeError> {
    let header = ResponseHeader::decode(frame, response_header_version(key, version)).map_err(EncodeError::from_any)?;
    let body = M::decode(frame, version).map_err(EncodeError::from_any)?;
    Ok((header.correlation_id, body))
}

#[derive(Debug, Error)]
#[error("encode/decode failed: {0}")]
pub struct EncodeError(pub String);

impl EncodeError {
    fn from_any<E: std::fmt::Display>(e: E) -> Self {
        EncodeError(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api;
    use kafka_protocol::messages::ApiVersionsResponse;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn decoded_header_does_not_share_the_frame() {
        // The produce path takes the frame back as its only owner.
        let header = RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(9)
            .with_client_id(Some(StrBytes::from_static_str("a-client")));
        let body = kafka_protocol::messages::ProduceRequest::default();
        let mut frame = encode_request(&header, &body).expect("encode").freeze();
        let _ = bytes::Buf::get_i32(&mut frame);
        let (_, h) = decode_request_header(&mut frame).expect("decode");
        assert_eq!(h.client_id.as_deref(), Some("a-client"));
        assert!(frame.try_into_mut().is_ok(), "the decoded header still references the frame");
    }

    #[test]
    fn request_header_roundtrip_v1_and_v2() {
        for (key, version) in [(ApiKey::Metadata, 1i16), (ApiKey::Metadata, 12), (ApiKey::Produce, 9)] {
            let header = RequestHeader::default()
                .with_request_api_key(key as i16)
                .with_request_api_version(version)
                .with_correlation_id(77)
                .with_client_id(Some(StrBytes::from_static_str("t")));
            let body = kafka_protocol::messages::MetadataRequest::default();
            let mut frame = encode_request(&header, &body).expect("encode").freeze();
            let _ = bytes::Buf::get_i32(&mut frame);
            let (k, h) = decode_request_header(&mut frame).expect("decode");
            assert_eq!(k, key);
            assert_eq!(h.correlation_id, 77);
            assert_eq!(h.request_api_version, version);
            assert_eq!(h.client_id.as_deref(), Some("t"));
        }
    }

    #[test]
    fn unknown_api_key_reports_correlation_id() {
        let mut frame = Bytes::from_static(&[0x03, 0xe7, 0, 0, 0, 0, 0, 9, 0xff, 0xff]);
        match decode_request_header(&mut frame) {
            Err(HeaderError::UnknownApiKey { api_key: 999, correlation_id: 9 }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn api_versions_response_has_header_v0_even_when_flexible() {
        let body = api::api_versions_response();
        let buf = encode_response(ApiKey::ApiVersions, 3, 5, &body, 3).expect("encode");
        // length, correlation id, then the body's error code right away: no tagged fields byte.
        assert_eq!(&buf[4..8], &5i32.to_be_bytes());
        assert_eq!(&buf[8..10], &0i16.to_be_bytes());
        let mut frame = buf.freeze().slice(4..);
        let (cid, decoded): (i32, ApiVersionsResponse) =
            decode_response(ApiKey::ApiVersions, 3, &mut frame).expect("decode");
        assert_eq!(cid, 5);
        assert_eq!(decoded.api_keys.len(), api::SUPPORTED_APIS.len());
    }
}

#[cfg(test)]
mod hostile_input_tests {
    use super::*;
    use kafka_protocol::messages::MetadataRequest;

    /// A request whose array count claims 2^31-1 elements in a few bytes must
    /// fail to decode, not reserve gigabytes (see third_party/README.md).
    #[test]
    fn lying_array_count_fails_without_allocating() {
        let mut body = Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff, 0x00, 0x01, b'a', 0x01]);
        assert!(MetadataRequest::decode(&mut body, 4).is_err());
        let mut compact = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x07, 0x02, b'a', 0x00]);
        assert!(MetadataRequest::decode(&mut compact, 12).is_err());
    }
}
