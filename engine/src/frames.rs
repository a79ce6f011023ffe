//! Reading request and response frames off a socket without zeroing them.
//!
//! A produce frame is the record bytes on their way to disk: they land here
//! straight from `recv(2)`, the produce handler assigns offsets in place and
//! the log keeps slices of this one buffer (see `handlers::produce`), so the
//! only user-space copy before the disk is the one into the DMA buffers.
//! Zeroing the buffer first (`BytesMut::zeroed`) cost a memset of every byte
//! received, about a tenth of the broker's CPU on an unpaced produce.

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncReadExt};

/// Reads exactly `len` bytes into a new buffer whose memory is not zeroed
/// first.
pub async fn read_exact_uninit<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len);
    // SAFETY: `with_capacity` allocated `len` bytes; the slice handed to the
    // reader covers exactly them. Every `AsyncRead` used here (glommio's
    // TcpStream: `recv(2)` or a copy out of its receive buffer) only writes
    // into the slice and never reads it, and the bytes are exposed to the rest
    // of the program only once `read_exact` has filled all of them. On an
    // error the buffer is dropped without being read.
    unsafe {
        buf.set_len(len);
    }
    reader.read_exact(&mut buf).await?;
    Ok(buf)
}
