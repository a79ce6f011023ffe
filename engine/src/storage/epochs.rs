//! The leader epoch cache of one partition (Kafka's `LeaderEpochFileCache`):
//! for every leader epoch that wrote to the log, the offset of its first
//! batch. It answers OffsetForLeaderEpoch ("where does my epoch end in your
//! log?"), which a follower asks a new leader before truncating its
//! diverged tail.
//!
//! Shard-local: a `LeaderEpochCache` is a field of its `PartitionLog`, on the
//! owning shard. The file functions here are blocking and run on the
//! blocking pool (`PartitionLog::open`, `partition::persist_epochs`).
//!
//! On disk, `<partition dir>/leader-epoch-checkpoint`, Kafka's text format:
//! ```text
//! 0                  version
//! 2                  number of entries
//! 3 0                epoch start offset, epochs and offsets increasing
//! 5 1200
//! ```
//! Replaced atomically (temp file, fdatasync, rename, fsync dir). It is
//! written when the cache changed, before the flush that makes the new
//! epoch's first batch visible, so a visible record's epoch is always on
//! disk. An entry may be written before its batch is durable: on open the
//! entries at or after the recovered log end are dropped
//! (`truncate_from_end`), as Kafka does.

use std::io;
use std::path::{Path, PathBuf};

use tidelog_protocol::{Epoch, Offset};

pub const CHECKPOINT_FILE: &str = "leader-epoch-checkpoint";
const VERSION: u32 = 0;
/// Entries a checkpoint may declare at most (a bound on what a damaged file
/// can make us allocate; one partition sees far fewer leader changes).
pub const ENTRIES_MAX: usize = 1 << 20;

/// The first offset written by a leader epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochEntry {
    pub epoch: Epoch,
    pub start_offset: Offset,
}

/// Epoch entries, epochs and start offsets strictly increasing.
#[derive(Debug, Default)]
pub struct LeaderEpochCache {
    entries: Vec<EpochEntry>,
    /// Changed since the checkpoint was last written.
    pub dirty: bool,
}

impl LeaderEpochCache {
    /// A cache of `entries`, which must be strictly increasing in both epoch
    /// and start offset (what `decode` returns).
    pub fn from_entries(entries: Vec<EpochEntry>) -> LeaderEpochCache {
        assert!(
            entries.windows(2).all(|w| w[0].epoch < w[1].epoch && w[0].start_offset < w[1].start_offset),
            "leader epoch entries not increasing: {entries:?}"
        );
        LeaderEpochCache { entries, dirty: false }
    }

    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    pub fn latest(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    pub fn latest_epoch(&self) -> Option<Epoch> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Whether `epoch` is newer than every epoch recorded (a leader's first
    /// batch in it starts a new entry).
    pub fn is_newer(&self, epoch: Epoch) -> bool {
        match self.entries.last() {
            Some(last) => epoch > last.epoch,
            None => true,
        }
    }

    /// Records that `epoch` wrote its first batch at `start_offset`. A no-op
    /// when it is already the latest entry with the same or a lower start.
    /// Entries with an epoch >= `epoch` or a start >= `start_offset` are
    /// dropped first, so the cache stays monotonic (Kafka's
    /// `maybeTruncateNonMonotonicEntries`; with appends in order this only
    /// happens after a truncation the cache was not told about). Negative
    /// epochs and offsets (batches from before epochs were recorded) are
    /// ignored. Returns whether the cache changed.
    pub fn assign(&mut self, epoch: Epoch, start_offset: Offset) -> bool {
        if epoch.0 < 0 || start_offset.0 < 0 {
            return false;
        }
        if let Some(last) = self.entries.last() {
            if last.epoch == epoch && last.start_offset <= start_offset {
                return false;
            }
        }
        let keep = self.entries.partition_point(|e| e.epoch < epoch && e.start_offset < start_offset);
        if keep < self.entries.len() {
            log::warn!(
                "leader epoch cache: epoch {epoch} at offset {start_offset} replaces later or equal entries {:?}",
                &self.entries[keep..]
            );
            self.entries.truncate(keep);
        }
        self.entries.push(EpochEntry { epoch, start_offset });
        self.dirty = true;
        true
    }

    /// OffsetForLeaderEpoch, Kafka's semantics (`endOffsetFor`): the largest
    /// epoch <= `epoch` and the offset where it ends, which is the start of
    /// the next epoch, or `log_end_offset` when `epoch` is the latest. An
    /// epoch older than every entry answers `(epoch, first start offset)`.
    /// `None` (UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET on the wire) for a
    /// negative epoch, an epoch newer than the latest, or an empty cache.
    pub fn end_offset_for(&self, epoch: Epoch, log_end_offset: Offset) -> Option<(Epoch, Offset)> {
        if epoch.0 < 0 {
            return None;
        }
        let latest = self.entries.last()?;
        if latest.epoch == epoch {
            return Some((epoch, log_end_offset));
        }
        // First entry with an epoch above the requested one.
        let higher = self.entries.partition_point(|e| e.epoch <= epoch);
        let next = self.entries.get(higher)?;
        match higher.checked_sub(1).map(|i| self.entries[i]) {
            Some(floor) => Some((floor.epoch, next.start_offset)),
            None => Some((epoch, next.start_offset)),
        }
    }

    /// Drops the entries starting at or after `end_offset` (the log was
    /// truncated to end there). Returns whether the cache changed.
    pub fn truncate_from_end(&mut self, end_offset: Offset) -> bool {
        let keep = self.entries.partition_point(|e| e.start_offset < end_offset);
        if keep == self.entries.len() {
            return false;
        }
        self.entries.truncate(keep);
        self.dirty = true;
        true
    }

    /// The log now starts at `start_offset`: entries wholly below it go, and
    /// the last of them is kept, moved up to start there (Kafka's
    /// `truncateFromStart`). Returns whether the cache changed.
    pub fn truncate_from_start(&mut self, start_offset: Offset) -> bool {
        let below = self.entries.partition_point(|e| e.start_offset <= start_offset);
        if below == 0 || (below == 1 && self.entries[0].start_offset == start_offset) {
            return false;
        }
        let epoch = self.entries[below - 1].epoch;
        self.entries.drain(..below - 1);
        self.entries[0] = EpochEntry { epoch, start_offset };
        self.dirty = true;
        true
    }

    /// Forgets every entry (the log was emptied). Returns whether it changed.
    pub fn clear(&mut self) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        self.entries.clear();
        self.dirty = true;
        true
    }

    /// The checkpoint file's contents.
    pub fn encode(&self) -> String {
        encode(&self.entries)
    }
}

pub fn encode(entries: &[EpochEntry]) -> String {
    let mut out = format!("{VERSION}\n{}\n", entries.len());
    for e in entries {
        out.push_str(&format!("{} {}\n", e.epoch.0, e.start_offset.0));
    }
    out
}

/// Parses a checkpoint; `Err` says what is wrong with it.
pub fn decode(text: &str) -> Result<Vec<EpochEntry>, String> {
    let mut lines = text.lines();
    let version = lines.next().ok_or("empty file")?.trim();
    if version != VERSION.to_string() {
        return Err(format!("unknown version {version:?}"));
    }
    let count_line = lines.next().ok_or("no entry count")?.trim();
    let count: usize = count_line.parse().map_err(|_| format!("bad entry count {count_line:?}"))?;
    if count > ENTRIES_MAX {
        return Err(format!("{count} entries, more than {ENTRIES_MAX}"));
    }
    // Reserved for the entries the text can hold ("e o\n" is at least 4
    // bytes), not the count it claims: a 10-byte file claiming ENTRIES_MAX
    // entries must not reserve 16 MiB.
    let mut entries: Vec<EpochEntry> = Vec::with_capacity(count.min(text.len() / 4));
    for i in 0..count {
        let line = lines.next().ok_or_else(|| format!("{count} entries declared, {i} present"))?;
        let mut fields = line.split_whitespace();
        let (Some(epoch), Some(offset), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!("entry {i}: {line:?} is not \"epoch offset\""));
        };
        let epoch = epoch.parse::<i32>().map_err(|_| format!("entry {i}: bad epoch {epoch:?}"))?;
        let offset = offset.parse::<i64>().map_err(|_| format!("entry {i}: bad offset {offset:?}"))?;
        if epoch < 0 || offset < 0 {
            return Err(format!("entry {i}: negative epoch or offset in {line:?}"));
        }
        let e = EpochEntry { epoch: Epoch(epoch), start_offset: Offset(offset) };
        if let Some(last) = entries.last() {
            if e.epoch <= last.epoch || e.start_offset <= last.start_offset {
                return Err(format!("entry {i}: {line:?} does not follow {} {}", last.epoch, last.start_offset));
            }
        }
        entries.push(e);
    }
    if let Some(extra) = lines.find(|l| !l.trim().is_empty()) {
        return Err(format!("unexpected line {extra:?} after {count} entries"));
    }
    Ok(entries)
}

pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// Reads the checkpoint (blocking): `Ok(None)` when there is none,
/// `Ok(Some(Err(why)))` when it is malformed.
pub fn read(dir: &Path) -> io::Result<Option<Result<Vec<EpochEntry>, String>>> {
    match std::fs::read(checkpoint_path(dir)) {
        Ok(bytes) => Ok(Some(match std::str::from_utf8(&bytes) {
            Ok(text) => decode(text),
            Err(_) => Err("not UTF-8".to_string()),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the checkpoint durably (blocking): temp file, fdatasync,
/// rename, fsync dir.
pub fn write(dir: &Path, entries: &[EpochEntry]) -> io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(encode(entries).as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, checkpoint_path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: i32, offset: i64) -> EpochEntry {
        EpochEntry { epoch: Epoch(epoch), start_offset: Offset(offset) }
    }

    fn cache(entries: &[(i32, i64)]) -> LeaderEpochCache {
        LeaderEpochCache::from_entries(entries.iter().map(|&(ep, o)| e(ep, o)).collect())
    }

    #[test]
    fn assign_appends_new_epochs_and_ignores_repeats() {
        let mut c = LeaderEpochCache::default();
        assert!(c.assign(Epoch(0), Offset(0)));
        assert!(c.dirty);
        c.dirty = false;
        assert!(!c.assign(Epoch(0), Offset(10)), "same epoch, later offset: nothing new");
        assert!(!c.assign(Epoch(-1), Offset(10)), "no epoch");
        assert!(!c.dirty);
        assert!(c.assign(Epoch(3), Offset(10)));
        assert!(c.assign(Epoch(5), Offset(25)));
        assert_eq!(c.entries(), &[e(0, 0), e(3, 10), e(5, 25)]);
        assert_eq!(c.latest(), Some(e(5, 25)));
        assert_eq!(c.latest_epoch(), Some(Epoch(5)));
        assert!(c.is_newer(Epoch(6)) && !c.is_newer(Epoch(5)) && !c.is_newer(Epoch(1)));
        assert!(LeaderEpochCache::default().is_newer(Epoch(0)));
    }

    #[test]
    fn assign_keeps_the_cache_monotonic() {
        // An older epoch than the latest: the later entries go.
        let mut c = cache(&[(0, 0), (3, 10), (5, 25)]);
        assert!(c.assign(Epoch(4), Offset(30)));
        assert_eq!(c.entries(), &[e(0, 0), e(3, 10), e(4, 30)]);
        // The latest epoch again at a lower offset: it moves down.
        assert!(c.assign(Epoch(4), Offset(20)));
        assert_eq!(c.entries(), &[e(0, 0), e(3, 10), e(4, 20)]);
        // A new epoch at an offset below earlier entries' starts.
        assert!(c.assign(Epoch(6), Offset(5)));
        assert_eq!(c.entries(), &[e(0, 0), e(6, 5)]);
    }

    #[test]
    fn end_offset_for_follows_kafka() {
        let c = cache(&[(1, 0), (3, 10), (5, 25)]);
        let leo = Offset(40);
        // The latest epoch ends at the log end.
        assert_eq!(c.end_offset_for(Epoch(5), leo), Some((Epoch(5), leo)));
        // A known epoch ends where the next one starts.
        assert_eq!(c.end_offset_for(Epoch(1), leo), Some((Epoch(1), Offset(10))));
        assert_eq!(c.end_offset_for(Epoch(3), leo), Some((Epoch(3), Offset(25))));
        // An unknown epoch between two: the largest epoch below it, and its end.
        assert_eq!(c.end_offset_for(Epoch(2), leo), Some((Epoch(1), Offset(10))));
        assert_eq!(c.end_offset_for(Epoch(4), leo), Some((Epoch(3), Offset(25))));
        // Older than every entry: the requested epoch, ending at the first start.
        assert_eq!(c.end_offset_for(Epoch(0), leo), Some((Epoch(0), Offset(0))));
        // Newer than the latest, negative, or nothing known: undefined.
        assert_eq!(c.end_offset_for(Epoch(6), leo), None);
        assert_eq!(c.end_offset_for(Epoch(-1), leo), None);
        assert_eq!(LeaderEpochCache::default().end_offset_for(Epoch(0), leo), None);
    }

    #[test]
    fn truncate_from_end_drops_entries_at_or_after_the_offset() {
        let mut c = cache(&[(1, 0), (3, 10), (5, 25)]);
        assert!(!c.truncate_from_end(Offset(26)), "the latest starts before the new end");
        assert!(!c.dirty);
        assert!(c.truncate_from_end(Offset(25)));
        assert_eq!(c.entries(), &[e(1, 0), e(3, 10)]);
        assert!(c.dirty);
        assert!(c.truncate_from_end(Offset(5)));
        assert_eq!(c.entries(), &[e(1, 0)]);
        assert!(c.truncate_from_end(Offset(0)));
        assert!(c.entries().is_empty());
        let mut c = cache(&[(1, 0), (3, 10)]);
        c.dirty = false;
        assert!(c.clear() && c.dirty && c.entries().is_empty());
        assert!(!c.clear());
    }

    #[test]
    fn truncate_from_start_keeps_the_epoch_covering_the_new_start() {
        let mut c = cache(&[(1, 0), (3, 10), (5, 25)]);
        assert!(!c.truncate_from_start(Offset(0)));
        assert!(c.truncate_from_start(Offset(4)));
        assert_eq!(c.entries(), &[e(1, 4), e(3, 10), e(5, 25)]);
        assert!(c.truncate_from_start(Offset(10)));
        assert_eq!(c.entries(), &[e(3, 10), e(5, 25)]);
        assert!(!c.truncate_from_start(Offset(10)));
        assert!(c.truncate_from_start(Offset(30)));
        assert_eq!(c.entries(), &[e(5, 30)]);
        let mut empty = LeaderEpochCache::default();
        assert!(!empty.truncate_from_start(Offset(7)));
    }

    #[test]
    fn checkpoint_text_roundtrip_and_malformed_files() {
        let c = cache(&[(0, 0), (3, 10), (5, 1_200)]);
        let text = c.encode();
        assert_eq!(text, "0\n3\n0 0\n3 10\n5 1200\n");
        assert_eq!(decode(&text).unwrap(), c.entries());
        assert_eq!(decode("0\n0\n").unwrap(), vec![]);
        assert_eq!(decode("0\r\n1\r\n2 7\r\n").unwrap(), vec![e(2, 7)], "CRLF and no trailing newline");
        for bad in [
            "",
            "1\n0\n",
            "0\n",
            "0\nx\n",
            "0\n2\n1 0\n",
            "0\n1\n1\n",
            "0\n1\n1 2 3\n",
            "0\n1\na 2\n",
            "0\n2\n3 10\n1 20\n",
            "0\n2\n1 10\n3 10\n",
            "0\n1\n-1 0\n",
            "0\n1\n1 0\n2 5\n",
            "0\n99999999999\n",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} must be refused");
        }
    }

    /// A short file claiming the most entries allowed is refused, and the
    /// reservation follows the text's length, not the claim (fuzz/README.md:
    /// every length is checked against the bytes left before allocating).
    #[test]
    fn a_count_the_text_cannot_hold_is_refused() {
        let text = format!("0\n{ENTRIES_MAX}\n0 0\n");
        assert_eq!(decode(&text), Err(format!("{ENTRIES_MAX} entries declared, 1 present")));
    }

    #[test]
    fn checkpoint_file_roundtrip_missing_and_damaged() {
        let dir = crate::test_dir("epochs-checkpoint");
        assert!(read(&dir).unwrap().is_none());
        write(&dir, &[e(0, 0), e(2, 50)]).unwrap();
        assert_eq!(read(&dir).unwrap().unwrap().unwrap(), vec![e(0, 0), e(2, 50)]);
        assert!(!dir.join(format!("{CHECKPOINT_FILE}.tmp")).exists());
        write(&dir, &[]).unwrap();
        assert_eq!(read(&dir).unwrap().unwrap().unwrap(), vec![]);
        std::fs::write(checkpoint_path(&dir), b"0\n2\n0 0\n").unwrap();
        assert!(read(&dir).unwrap().unwrap().is_err());
        std::fs::write(checkpoint_path(&dir), [0xffu8, 0xfe]).unwrap();
        assert!(read(&dir).unwrap().unwrap().is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
