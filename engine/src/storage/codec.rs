//! Decompression of record batches with a bound on what comes out.
//!
//! A batch is at most `message.max.bytes` compressed, but a hostile one can
//! expand a thousandfold (gzip of zeros), and a snappy block header can
//! claim 4 GiB in five bytes. Every decoder here reads at most
//! `DECOMPRESSED_MAX_BYTES` and refuses the batch beyond it, before that
//! memory is allocated: clients' batches are far below it (librdkafka's and
//! Java's `batch.size` count uncompressed bytes, 1 MiB at most by default).

use std::io::Read;

use tidelog_protocol::batch::Compression;

/// The most a batch's records may decompress to.
pub const DECOMPRESSED_MAX_BYTES: usize = 64 << 20;

/// Kafka's (xerial) snappy framing header.
const SNAPPY_XERIAL_MAGIC: &[u8; 16] = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01";

/// `data` decompressed with `codec`, at most `limit` bytes (an error past it).
pub fn decompress(data: &[u8], codec: Compression, limit: usize) -> Result<Vec<u8>, String> {
    let too_big = || format!("a {codec:?} batch decompresses to more than {limit} bytes; refused");
    let read_capped = |mut r: Box<dyn Read + '_>| -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
        let n = (&mut r)
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot decompress a {codec:?} batch: {e}"))?;
        if n > limit {
            return Err(too_big());
        }
        Ok(out)
    };
    match codec {
        Compression::None => Ok(data.to_vec()),
        Compression::Gzip => read_capped(Box::new(flate2::read::GzDecoder::new(data))),
        Compression::Lz4 => {
            let d = lz4::Decoder::new(data).map_err(|e| format!("cannot decompress a Lz4 batch: {e}"))?;
            read_capped(Box::new(d))
        }
        Compression::Zstd => {
            let d =
                zstd::stream::read::Decoder::new(data).map_err(|e| format!("cannot decompress a Zstd batch: {e}"))?;
            read_capped(Box::new(d))
        }
        Compression::Snappy => snappy(data, limit).map_err(|e| e.unwrap_or_else(too_big)),
        Compression::Unknown(n) => Err(format!("unknown compression codec {n}")),
    }
}

/// Snappy as Kafka's clients write it: xerial-framed blocks, or one raw
/// block (as the Java client reads it too). Each block's claimed length is
/// checked against what is left of `limit` before anything is allocated.
/// Err(None): over the limit.
fn snappy(data: &[u8], limit: usize) -> Result<Vec<u8>, Option<String>> {
    let fail = |e: String| Some(format!("cannot decompress a Snappy batch: {e}"));
    let mut out = Vec::new();
    let block = |b: &[u8], out: &mut Vec<u8>| -> Result<(), Option<String>> {
        let len = snap::raw::decompress_len(b).map_err(|e| fail(e.to_string()))?;
        if len > limit - out.len() {
            return Err(None);
        }
        let at = out.len();
        out.resize(at + len, 0);
        snap::raw::Decoder::new().decompress(b, &mut out[at..]).map_err(|e| fail(e.to_string()))?;
        Ok(())
    };
    let Some(mut rest) = data.strip_prefix(&SNAPPY_XERIAL_MAGIC[..]) else {
        block(data, &mut out)?;
        return Ok(out);
    };
    while !rest.is_empty() {
        let (head, tail) = rest.split_at_checked(4).ok_or_else(|| fail("truncated block length".into()))?;
        let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let b = tail.get(..size).ok_or_else(|| fail(format!("block of {size} bytes past the end")))?;
        block(b, &mut out)?;
        rest = &tail[size..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_a_bomb_is_refused_before_it_expands() {
        let plain: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_be_bytes()).collect();
        for codec in [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            let packed = super::super::recompress::compress(&plain, codec, None).unwrap();
            assert_eq!(decompress(&packed, codec, plain.len()).unwrap(), plain, "{codec:?}");
            let err = decompress(&packed, codec, plain.len() - 1).unwrap_err();
            assert!(err.contains("more than"), "{codec:?}: {err}");
        }
        // A raw snappy header claiming ~4 GiB in five bytes.
        let claim = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        assert!(decompress(&claim, Compression::Snappy, DECOMPRESSED_MAX_BYTES).unwrap_err().contains("more than"));
        // Garbage is an error, never a panic.
        for codec in [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            assert!(decompress(b"\x82SNAPPY\x00garbage", codec, 1 << 20).is_err());
        }
    }
}
