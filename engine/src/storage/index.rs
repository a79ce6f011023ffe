//! Sparse offset and time indexes of one segment.
//!
//! In memory while the segment is active; written next to the segment
//! (`.index`, `.timeindex`) when it is sealed, and loaded from there on start.
//! A sealed segment's `.index` is written only after its log is truncated and
//! synced, so "has an index file" means "sealed cleanly"; anything else is
//! rescanned on recovery.
//!
//! ```text
//! .index      entries of 8 bytes:  relative offset u32 BE | file position u32 BE
//! .timeindex  entries of 12 bytes: max timestamp so far i64 BE | relative offset u32 BE
//! ```

use tidelog_protocol::Offset;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    pub timestamp_ms: i64,
    pub relative_offset: u32,
}

#[derive(Debug, Default)]
pub struct SegmentIndex {
    pub offsets: Vec<IndexEntry>,
    pub times: Vec<TimeEntry>,
}

impl SegmentIndex {
    /// File position of the last indexed batch starting at or before `target`.
    pub fn position_for(&self, base: Offset, target: Offset) -> u64 {
        // Saturating: `target` can come from a client's fetch offset.
        let rel = target.0.saturating_sub(base.0).clamp(0, u32::MAX as i64) as u32;
        let i = self.offsets.partition_point(|e| e.relative_offset <= rel);
        if i == 0 {
            0
        } else {
            self.offsets[i - 1].position as u64
        }
    }

    /// Relative offset from which to scan for the first record with a
    /// timestamp >= `timestamp_ms` (the last entry strictly before it).
    pub fn offset_for_time(&self, timestamp_ms: i64) -> u32 {
        let i = self.times.partition_point(|e| e.timestamp_ms < timestamp_ms);
        if i == 0 {
            0
        } else {
            self.times[i - 1].relative_offset
        }
    }

    /// Forgets the batches at or after `relative_offset`, which start at
    /// file position `position` (a truncation of the segment there).
    pub fn truncate(&mut self, relative_offset: u32, position: u64) {
        let keep = self.offsets.partition_point(|e| (e.position as u64) < position);
        self.offsets.truncate(keep);
        let keep = self.times.partition_point(|e| e.relative_offset < relative_offset);
        self.times.truncate(keep);
    }

    pub fn encode_offsets(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.offsets.len() * 8);
        for e in &self.offsets {
            out.extend_from_slice(&e.relative_offset.to_be_bytes());
            out.extend_from_slice(&e.position.to_be_bytes());
        }
        out
    }

    pub fn encode_times(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.times.len() * 12);
        for e in &self.times {
            out.extend_from_slice(&e.timestamp_ms.to_be_bytes());
            out.extend_from_slice(&e.relative_offset.to_be_bytes());
        }
        out
    }

    /// Decodes index files; `None` when they are malformed (not a multiple of
    /// the entry size, not increasing, or pointing past the log), in which
    /// case the caller rebuilds by scanning.
    pub fn decode(offsets: &[u8], times: &[u8], log_bytes: u64) -> Option<SegmentIndex> {
        if !offsets.len().is_multiple_of(8) || !times.len().is_multiple_of(12) {
            return None;
        }
        let mut index = SegmentIndex::default();
        for c in offsets.chunks_exact(8) {
            let e = IndexEntry {
                relative_offset: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                position: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            };
            if let Some(last) = index.offsets.last() {
                if e.relative_offset <= last.relative_offset || e.position <= last.position {
                    return None;
                }
            }
            if e.position as u64 >= log_bytes.max(1) {
                return None;
            }
            index.offsets.push(e);
        }
        for c in times.chunks_exact(12) {
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&c[..8]);
            index.times.push(TimeEntry {
                timestamp_ms: i64::from_be_bytes(ts),
                relative_offset: u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
            });
        }
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_roundtrip() {
        let mut idx = SegmentIndex::default();
        idx.offsets.push(IndexEntry { relative_offset: 10, position: 4096 });
        idx.offsets.push(IndexEntry { relative_offset: 25, position: 9000 });
        idx.times.push(TimeEntry { timestamp_ms: 100, relative_offset: 0 });
        idx.times.push(TimeEntry { timestamp_ms: 200, relative_offset: 10 });
        let base = Offset(1000);
        assert_eq!(idx.position_for(base, Offset(1000)), 0);
        assert_eq!(idx.position_for(base, Offset(1010)), 4096);
        assert_eq!(idx.position_for(base, Offset(1024)), 4096);
        assert_eq!(idx.position_for(base, Offset(1030)), 9000);
        assert_eq!(idx.offset_for_time(150), 0);
        assert_eq!(idx.offset_for_time(250), 10);
        let back = SegmentIndex::decode(&idx.encode_offsets(), &idx.encode_times(), 10_000).unwrap();
        assert_eq!(back.offsets, idx.offsets);
        assert_eq!(back.times, idx.times);
        assert!(SegmentIndex::decode(&idx.encode_offsets(), &[], 5000).is_none(), "position past the log");
        assert!(SegmentIndex::decode(&[0u8; 7], &[], 5000).is_none());
    }

    /// Regression (fuzz/storage_files): a target far below the base
    /// overflowed `target - base`.
    #[test]
    fn position_for_extreme_offsets_does_not_overflow() {
        let mut idx = SegmentIndex::default();
        idx.offsets.push(IndexEntry { relative_offset: 10, position: 4096 });
        assert_eq!(idx.position_for(Offset(i64::MAX), Offset(i64::MIN)), 0);
        assert_eq!(idx.position_for(Offset(i64::MIN), Offset(i64::MAX)), 4096);
    }

    #[test]
    fn truncate_drops_entries_at_and_after_the_cut() {
        let mut idx = SegmentIndex::default();
        idx.offsets.push(IndexEntry { relative_offset: 0, position: 0 });
        idx.offsets.push(IndexEntry { relative_offset: 10, position: 4096 });
        idx.offsets.push(IndexEntry { relative_offset: 25, position: 9000 });
        idx.times.push(TimeEntry { timestamp_ms: 100, relative_offset: 0 });
        idx.times.push(TimeEntry { timestamp_ms: 200, relative_offset: 10 });
        idx.times.push(TimeEntry { timestamp_ms: 300, relative_offset: 25 });
        idx.truncate(25, 9000);
        assert_eq!(idx.offsets.len(), 2);
        assert_eq!(idx.times.last(), Some(&TimeEntry { timestamp_ms: 200, relative_offset: 10 }));
        idx.truncate(5, 2000);
        assert_eq!(idx.offsets, vec![IndexEntry { relative_offset: 0, position: 0 }]);
        assert_eq!(idx.times, vec![TimeEntry { timestamp_ms: 100, relative_offset: 0 }]);
        idx.truncate(0, 0);
        assert!(idx.offsets.is_empty() && idx.times.is_empty());
    }
}
