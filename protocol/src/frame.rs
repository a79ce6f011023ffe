//! Request framing: a 4-byte big-endian length prefix, then the request.
//!
//! The length is checked against the configured limit before anything is
//! allocated, so a hostile or corrupt prefix costs four bytes, not a buffer.

use thiserror::Error;

/// Bytes in the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// The smallest possible request: api key, api version, correlation id and a
/// null client id.
pub const REQUEST_BYTES_MIN: usize = 2 + 2 + 4 + 2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size_bytes} bytes exceeds socket.request.max.bytes={limit_bytes}")]
    TooLarge { size_bytes: i64, limit_bytes: usize },
    #[error("frame of {size_bytes} bytes is too small to hold a request header")]
    TooSmall { size_bytes: i64 },
}

/// Reads a frame's length prefix and checks it against `limit_bytes`.
pub fn frame_len(prefix: [u8; LENGTH_PREFIX_BYTES], limit_bytes: usize) -> Result<usize, FrameError> {
    let size_bytes = i32::from_be_bytes(prefix) as i64;
    if size_bytes < REQUEST_BYTES_MIN as i64 {
        return Err(FrameError::TooSmall { size_bytes });
    }
    if size_bytes as u64 > limit_bytes as u64 {
        return Err(FrameError::TooLarge { size_bytes, limit_bytes });
    }
    Ok(size_bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_within_limit() {
        assert_eq!(frame_len(100i32.to_be_bytes(), 100), Ok(100));
        assert_eq!(frame_len(10i32.to_be_bytes(), 100), Ok(10));
    }

    #[test]
    fn rejects_oversized_and_negative() {
        assert_eq!(
            frame_len(101i32.to_be_bytes(), 100),
            Err(FrameError::TooLarge { size_bytes: 101, limit_bytes: 100 })
        );
        assert_eq!(frame_len((-5i32).to_be_bytes(), 100), Err(FrameError::TooSmall { size_bytes: -5 }));
        assert_eq!(frame_len(3i32.to_be_bytes(), 100), Err(FrameError::TooSmall { size_bytes: 3 }));
    }
}
