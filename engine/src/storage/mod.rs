//! Storage: partition logs made of segments, written with O_DIRECT through the
//! shard's accumulator, plus the checks that the data dir can hold them.
//!
//! Everything here is shard-local: a partition log is owned by exactly one
//! shard and touched only from its thread.

pub mod dirfs;
pub mod index;
pub mod partition;
pub mod segment;

/// O_DIRECT alignment. 4 KiB covers every NVMe/SATA logical block size we
/// target (512 and 4096) on XFS and ext4.
pub const PAGE_BYTES: u64 = 4096;

pub fn align_down(v: u64) -> u64 {
    v & !(PAGE_BYTES - 1)
}

pub fn align_up(v: u64) -> u64 {
    (v + PAGE_BYTES - 1) & !(PAGE_BYTES - 1)
}
