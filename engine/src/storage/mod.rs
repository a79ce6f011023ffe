//! Storage: partition logs made of segments, written with O_DIRECT through the
//! shard's accumulator, plus the checks that the data dir can hold them.
//!
//! Everything here is shard-local: a partition log is owned by exactly one
//! shard and touched only from its thread.

pub mod checkpoint;
pub mod codec;
pub mod compaction;
pub mod dirfs;
pub mod epochs;
pub mod index;
pub mod legacy;
pub mod log_dirs;
pub mod partition;
pub mod producer_state;
pub mod recompress;
pub mod retention;
pub mod segment;
pub mod timestamps;

/// O_DIRECT alignment. 4 KiB covers every NVMe/SATA logical block size we
/// target (512 and 4096) on XFS and ext4.
pub const PAGE_BYTES: u64 = 4096;

thread_local! {
    /// Bytes this shard's logs handed to O_DIRECT segment writes: whole
    /// aligned pages, so a tail page rewritten by each small flush counts
    /// every time. A thread-local is the shard's counter (a shard is one
    /// thread) without storage knowing about metrics.
    static SEGMENT_BYTES_WRITTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one completed segment write of `bytes` on this shard.
pub fn note_segment_write(bytes: u64) {
    SEGMENT_BYTES_WRITTEN.with(|c| c.set(c.get() + bytes));
}

/// Segment bytes written by this shard since it started (see `note_segment_write`).
pub fn segment_bytes_written() -> u64 {
    SEGMENT_BYTES_WRITTEN.with(|c| c.get())
}

pub fn align_down(v: u64) -> u64 {
    v & !(PAGE_BYTES - 1)
}

pub fn align_up(v: u64) -> u64 {
    (v + PAGE_BYTES - 1) & !(PAGE_BYTES - 1)
}

/// Primes glommio's per-device io_uring IOPOLL probe with a file that has
/// data. Glommio probes a device the first time a `DmaFile` on it is opened,
/// by reading one block at offset 0: on an empty file (a brand-new segment)
/// that read "succeeds" and the device is wrongly marked pollable, after which
/// every read of a segment fails with EOPNOTSUPP. Opening a file with a real
/// block first makes the probe meaningful. Call once per shard before any
/// segment is opened.
pub async fn prime_io_probe(dir: &std::path::Path) -> std::io::Result<()> {
    let path = dir.join(dirfs::IO_PROBE_FILE);
    let p = path.clone();
    glommio::executor()
        .spawn_blocking(move || -> std::io::Result<()> {
            let ok = std::fs::metadata(&p).map(|m| m.len() >= PAGE_BYTES).unwrap_or(false);
            if !ok {
                std::fs::write(&p, vec![0u8; PAGE_BYTES as usize])?;
                std::fs::File::open(&p)?.sync_all()?;
            }
            Ok(())
        })
        .await?;
    let f = glommio::io::DmaFile::open(&path).await.map_err(std::io::Error::from)?;
    let _ = f.read_at(0, PAGE_BYTES as usize).await;
    f.close().await.map_err(std::io::Error::from)
}
