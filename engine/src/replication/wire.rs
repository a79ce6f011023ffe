//! A minimal Kafka client connection for the replica fetcher: one request
//! at a time over a glommio `TcpStream`, on the shard that owns it.
//!
//! Every length read from the peer is checked before anything is allocated
//! (a leader answering garbage costs a closed connection and a log line).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tidelog_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader};
use tidelog_protocol::{Decodable, Encodable, StrBytes};

/// ApiVersions v3: the version every tidelog build and Kafka since 2.4 answer.
const API_VERSIONS_VERSION: i16 = 3;

/// One connection to a leader broker.
pub struct Conn {
    stream: TcpStream,
    next_correlation_id: i32,
    client_id: StrBytes,
    pub peer: SocketAddr,
    /// What the peer answered to ApiVersions on connect: (api key, min, max).
    versions: Vec<(i16, i16, i16)>,
}

fn timed_out(what: &str, peer: SocketAddr, after: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} {peer}: no answer within {} ms", after.as_millis()))
}

impl Conn {
    pub async fn connect(peer: SocketAddr, client_id: &str, timeout: Duration) -> io::Result<Conn> {
        let connect = async { TcpStream::connect(peer).await.map_err(io::Error::from) };
        let stream = match glommio::timer::timeout(timeout, async { Ok(connect.await) }).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out("connect to", peer, timeout)),
        };
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            next_correlation_id: 1,
            client_id: StrBytes::from_string(client_id.to_string()),
            peer,
            versions: Vec::new(),
        };
        // Ask the peer which versions it speaks, as every Kafka client does,
        // so a follower of a newer build still replicates from an older
        // leader during a rolling upgrade.
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("tidelog-replica"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let answer: ApiVersionsResponse =
            conn.call(ApiKey::ApiVersions, API_VERSIONS_VERSION, &request, 1 << 20, timeout).await?;
        if answer.error_code != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{peer}: ApiVersions v{API_VERSIONS_VERSION} refused with error {}", answer.error_code),
            ));
        }
        conn.versions = answer.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        Ok(conn)
    }

    /// The highest version of `key` in `ours` that the peer speaks too; an
    /// error naming both ranges when there is none.
    pub fn version(&self, key: ApiKey, ours: std::ops::RangeInclusive<i16>) -> io::Result<i16> {
        negotiate(&self.versions, key, ours.clone()).ok_or_else(|| {
            let theirs = self.versions.iter().find(|(k, _, _)| *k == key as i16);
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: speaks {key:?} {}, this broker needs v{}..=v{}; upgrade the leader's broker",
                    self.peer,
                    theirs.map(|(_, lo, hi)| format!("v{lo}..=v{hi}")).unwrap_or_else(|| "not at all".to_string()),
                    ours.start(),
                    ours.end()
                ),
            )
        })
    }

    /// Sends `body` as `key` v`version` and returns the decoded response.
    pub async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        body: &Req,
        frame_bytes_max: usize,
        timeout: Duration,
    ) -> io::Result<Resp> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let mut buf = BytesMut::with_capacity(256);
        buf.put_i32(0);
        header.encode(&mut buf, key.request_header_version(version)).map_err(io::Error::other)?;
        body.encode(&mut buf, version).map_err(io::Error::other)?;
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        let peer = self.peer;
        let exchange = async {
            self.stream.write_all(&buf).await?;
            let mut prefix = [0u8; 4];
            self.stream.read_exact(&mut prefix).await?;
            let len = i32::from_be_bytes(prefix);
            if len < 4 || len as usize > frame_bytes_max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{peer}: response frame of {len} bytes (limit {frame_bytes_max})"),
                ));
            }
            // Not zeroed first; the fetched batches stay slices of this
            // buffer in the follower's log (`append_replicated`).
            Ok(crate::frames::read_exact_uninit(&mut self.stream, len as usize).await?.freeze())
        };
        let mut frame = match glommio::timer::timeout(timeout, async { Ok(exchange.await) }).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out(&format!("{key:?} to"), peer, timeout)),
        };
        let header = ResponseHeader::decode(&mut frame, key.response_header_version(version))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{peer}: bad response header: {e}")))?;
        if header.correlation_id != correlation_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{peer}: correlation id {} answers request {correlation_id}", header.correlation_id),
            ));
        }
        Resp::decode(&mut frame, version).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{peer}: bad {key:?} v{version} response: {e}"))
        })
    }
}

/// The highest version of `key` in both `ours` and the peer's `versions`.
fn negotiate(versions: &[(i16, i16, i16)], key: ApiKey, ours: std::ops::RangeInclusive<i16>) -> Option<i16> {
    let &(_, lo, hi) = versions.iter().find(|(k, _, _)| *k == key as i16)?;
    let v = hi.min(*ours.end());
    (v >= lo.max(*ours.start())).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_the_highest_common_version() {
        let fetch = ApiKey::Fetch as i16;
        assert_eq!(negotiate(&[(fetch, 4, 16)], ApiKey::Fetch, 4..=15), Some(15));
        assert_eq!(negotiate(&[(fetch, 4, 12)], ApiKey::Fetch, 4..=15), Some(12));
        assert_eq!(negotiate(&[(fetch, 0, 3)], ApiKey::Fetch, 4..=15), None);
        assert_eq!(negotiate(&[(fetch, 13, 17)], ApiKey::Fetch, 4..=12), None);
        assert_eq!(negotiate(&[], ApiKey::Fetch, 4..=15), None);
    }
}
