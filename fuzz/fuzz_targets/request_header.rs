//! The request header: length prefix check, then the header decoder the
//! connection loop runs on every frame (`header::decode_request_header`).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidelog_protocol::{frame, header};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let prefix = [data[0], data[1], data[2], data[3]];
        if let Ok(len) = frame::frame_len(prefix, 100 << 20) {
            assert!((frame::REQUEST_BYTES_MIN..=100 << 20).contains(&len));
        }
    }
    let _ = header::request_prefix(data);
    let mut frame = Bytes::copy_from_slice(data);
    if let Ok((key, h)) = header::decode_request_header(&mut frame) {
        assert_eq!(key as i16, h.request_api_key);
        assert!(frame.len() <= data.len());
    }
});
