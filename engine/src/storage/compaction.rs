//! Log compaction for `cleanup.policy=compact` (and `compact,delete`): a
//! background cleaner per shard that rewrites sealed segments keeping only
//! the latest record of each key, and merges small cleaned segments.
//!
//! Shard-local: spawned on every shard next to retention, it only looks at
//! the logs that shard owns. Every `log.cleaner.backoff.ms` it looks at each
//! compacted log; file reading, filtering and writing run on the blocking
//! pool, never on the shard thread, and no `RefCell` borrow is held across an
//! `.await`. Pace: `log.cleaner.io.max.bytes.per.second` (the task sleeps
//! after each step for the bytes it read and wrote). Memory: the key map of
//! one pass stays under the shard's share of `log.cleaner.dedupe.buffer.size`
//! (the broker's total divided by the number of shards).
//!
//! What is cleaned: the *cleanable* segments are the leading sealed segments
//! whose newest record is older than `min.compaction.lag.ms`; the last of
//! them only once the active segment holds durable data (so a rewrite never
//! becomes the last file on disk, whose end recovery takes from its last
//! batch). The
//! active segment is never touched. A pass runs when the never-cleaned
//! ("dirty") bytes are at least `log.cleaner.min.cleanable.ratio` (default
//! 0.5, Kafka's `min.cleanable.dirty.ratio`) of the cleanable bytes, or when
//! tombstones are due to expire.
//!
//! A pass is one or more *steps*. A step: (1) the key -> latest offset map
//! is built from the log's records in offset order, from where the previous
//! step's map stopped (the first step: the log start), through the active
//! segment's durable end, or until the map is full (`KeyMap`: key bytes plus
//! an honest per-entry overhead, never more than the bound); a key whose
//! latest record is newer than the cleanable range (in the active segment or
//! a segment still inside the lag) loses all its cleanable records; (2) every
//! cleanable segment that starts before the map's end is rewritten, oldest
//! first, keeping a record only if no newer record of its key is in the map.
//! A record past the map's end is always kept (its tombstone too), so a
//! partial map only keeps more; the next step carries on from there and
//! rewrites the segments again with the next part's keys. After the last
//! step the log is exactly what one step with an unbounded map gives (Kafka's
//! cleaner does the same, one map-full of dirty segments per round).
//!
//! Merging (Kafka's `groupSegmentsBySize`): consecutive cleanable segments
//! are rewritten into ONE file, named by the first one's base offset, while
//! their cleaned bytes together stay under the topic's `segment.bytes`
//! (and 2 GiB, as positions are 32-bit), their index entries under
//! `INDEX_BYTES_MAX`, and their offset span under 2^31 (relative offsets are
//! 32-bit). The group's size is known only once written: the segment that
//! overflows it is cut off the file again and starts the next group. So a
//! compacted log keeps about one file (and one open fd) per `segment.bytes`
//! of live data, not one per roll.
//!
//! Offsets never change: a rewritten batch keeps
//! its header (base offset, last offset delta, producer id/epoch/sequence,
//! timestamps) with only the kept records inside, and a new CRC. A batch
//! left empty is dropped, unless it carries a producer id and no later batch
//! of that producer is in the map: then its bare header stays, as Kafka
//! keeps it, because producer state is rebuilt at open by replaying batch
//! headers (`producer_state::rebuild`) and this header holds the producer's
//! last epoch and sequence. Earlier emptied batches of the producer carry
//! nothing the later one does not, and go (as in Kafka; we keep the last
//! header even for a producer whose state expired, which Kafka drops).
//! Compressed batches are read
//! whole (decompressed per batch, into the key map like any other) and, when
//! a record goes, rewritten with the same codec and attributes and only the
//! records section recompressed; should recompression fail, the batch is
//! written uncompressed with the codec bits cleared. Kept as they are, and
//! left out of the key map: control batches, transactional batches and
//! batches with an unknown codec. For transactions this is the simplest
//! correct rule: a record of an aborted transaction never becomes a key's
//! "latest value" (so never removes an older committed one), and a
//! committed transactional record only keeps older values of its key
//! around, which read_committed and read_uncommitted consumers both read
//! past in order. Markers stay, so producer state and the aborted list
//! rebuild the same after a clean. Nothing at or above the last stable
//! offset is cleaned. Records without a key are kept.
//!
//! Tombstones (null value) are kept until `delete.retention.ms` after their
//! segment was first cleaned, then dropped — but never while the part of the
//! log the pass has mapped so far holds a batch the cleaner cannot see into
//! (transactional or unknown codec), since an older value of the key might
//! hide there; and only inside the step's map range (a tombstone before
//! it had its chance in an earlier step, together with the removal of the
//! older values of its key). "First cleaned at" and the
//! tombstones left per segment are in `<partition dir>/cleaner-checkpoint`
//! (replaced atomically). A merged segment takes the latest "first cleaned
//! at" of its parts (tombstones are kept longer, never shorter).
//!
//! Crash safety, per group of segments `<b0>.log` .. `<bk>.log` (k >= 0)
//! that ends at offset `E` (the next segment's base):
//! 1. write `<b0>.log.cleaned`, fdatasync;
//! 2. rename it to `<b0>-<E>.swap` (both 20 digits), fsync the dir: the
//!    commit point;
//! 3. delete `<b0>`'s index files, and the index files then the log of every
//!    segment with a base in `(b0, E)`, fsync the dir;
//! 4. rename `<b0>-<E>.swap` over `<b0>.log`, fsync the dir (`<b0>` now
//!    reads as "not sealed cleanly": recovery would rescan its log);
//! 5. write `.timeindex` then `.index` (each synced), fsync the dir.
//!
//! On open, `recover_dir` deletes any `.log.cleaned` (never committed) and
//! redoes steps 3-4 for any `.swap` (all idempotent), so a crash before 2
//! leaves the old segments and after 2 the new one, never a mix; the
//! rescanned segment is sealed again by the next flush. Across groups a
//! crash leaves some rewritten and some not, each a valid compaction of the
//! same data (older values go before their tombstone, as groups are
//! processed oldest first).
//!
//! In memory the group is swapped in one borrow after step 5: the first
//! segment takes the new file, index and size, the others leave the log
//! (their files close once no fetch holds them). A fetch that already holds
//! an old file keeps reading the old (unlinked) inode; before step 2 every
//! segment of the group is given a read fd of its old file so no fetch opens
//! the new file by path with positions found in an old one. The swap runs
//! under the log's `cleaner_lock`, which truncations and prefix deletions
//! (retention, DeleteRecords) also take, so the group cannot change under it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};
use tidelog_protocol::batch::{self, BatchHeader, Compression, BATCH_HEADER_BYTES, BATCH_LOG_OVERHEAD_BYTES};
use tidelog_protocol::Offset;

use super::index::{IndexEntry, SegmentIndex, TimeEntry};
use super::partition::{SegmentInfo, SharedLog};
use crate::shard::Shard;
use crate::topic_config;

pub const CHECKPOINT_FILE: &str = "cleaner-checkpoint";
/// Suffix of a segment's rewrite before it is renamed over the segment.
pub const CLEANED_SUFFIX: &str = ".log.cleaned";
/// Suffix of a committed group rewrite, `<base>-<end>.swap`, until it is
/// renamed over the group's first segment.
pub const SWAP_SUFFIX: &str = ".swap";
const READ_BUFFER_BYTES: usize = 1 << 20;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn cleaned_path(log: &Path) -> PathBuf {
    log.with_extension("log.cleaned")
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The committed rewrite of the group of segments from `base` up to `end`
/// (exclusive): `<base>-<end>.swap`.
pub fn swap_path(dir: &Path, base: Offset, end: Offset) -> PathBuf {
    dir.join(format!("{:020}-{:020}{SWAP_SUFFIX}", base.0, end.0))
}

/// `(base, end)` of a swap file's name, if it is one.
fn parse_swap_name(name: &str) -> Option<(Offset, Offset)> {
    let (b, e) = name.strip_suffix(SWAP_SUFFIX)?.split_once('-')?;
    if b.len() != 20 || e.len() != 20 {
        return None;
    }
    let (b, e) = (b.parse::<i64>().ok()?, e.parse::<i64>().ok()?);
    (0 <= b && b < e).then_some((Offset(b), Offset(e)))
}

/// Base offsets of the segment logs in `dir` (blocking).
fn segment_bases(dir: &Path) -> io::Result<Vec<Offset>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log").filter(|s| s.len() == 20) {
            if let Ok(b) = stem.parse::<i64>() {
                out.push(Offset(b));
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// On open (blocking, before segments are listed): deletes stray
/// `.log.cleaned` files (never committed) and finishes every committed
/// `.swap` (steps 3-5 of the swap protocol but the index files, which the
/// rescan of the log rebuilds). Returns how many files it dealt with.
pub fn recover_dir(dir: &Path) -> io::Result<usize> {
    let mut handled = 0;
    let mut swaps = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(CLEANED_SUFFIX) {
            log::warn!("{}: removing an interrupted compaction rewrite", entry.path().display());
            remove_if_exists(&entry.path())?;
            handled += 1;
        } else if let Some(range) = parse_swap_name(&name) {
            swaps.push(range);
        }
    }
    swaps.sort_unstable();
    for (base, end) in swaps {
        log::warn!(
            "{}: finishing an interrupted compaction swap of offsets {}..{}",
            swap_path(dir, base, end).display(),
            base.0,
            end.0
        );
        finish_swap(dir, base, end, SwapStep::Renamed)?;
        handled += 1;
    }
    if handled > 0 {
        sync_dir(dir)?;
    }
    Ok(handled)
}

// ---------------------------------------------------------------------------
// Checkpoint

/// What the cleaner remembers of a segment it has cleaned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanedSegment {
    pub first_cleaned_at_ms: i64,
    pub tombstones: u64,
}

type Checkpoint = BTreeMap<i64, CleanedSegment>;

const CHECKPOINT_HEADER: &str = "# tidelog cleaner checkpoint v1: base offset, first cleaned at (ms), tombstones kept";

/// Reads the checkpoint (blocking). A missing or unreadable one means
/// "nothing cleaned yet": everything is dirty again and tombstones are kept
/// longer, never shorter.
pub fn read_checkpoint(dir: &Path) -> Checkpoint {
    let path = dir.join(CHECKPOINT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Checkpoint::new(),
        Err(e) => {
            log::warn!("{}: {e}; treating every segment as dirty", path.display());
            return Checkpoint::new();
        }
    };
    let mut out = Checkpoint::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let f: Vec<Option<i64>> = line.split_whitespace().map(|x| x.parse().ok()).collect();
        match f.as_slice() {
            [Some(base), Some(at), Some(t)] if *t >= 0 => {
                out.insert(*base, CleanedSegment { first_cleaned_at_ms: *at, tombstones: *t as u64 });
            }
            _ => {
                log::warn!("{}: malformed line {line:?}; treating every segment as dirty", path.display());
                return Checkpoint::new();
            }
        }
    }
    out
}

/// Writes the checkpoint durably (blocking): temp file, fdatasync, rename, fsync dir.
pub fn write_checkpoint(dir: &Path, cp: &Checkpoint) -> io::Result<()> {
    let mut text = String::from(CHECKPOINT_HEADER);
    text.push('\n');
    for (base, c) in cp {
        text.push_str(&format!("{base} {} {}\n", c.first_cleaned_at_ms, c.tombstones));
    }
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    sync_dir(dir)
}

// ---------------------------------------------------------------------------
// Records

/// Attribute bits of the compression codec.
const CODEC_MASK: i16 = 0x07;

/// One record of an uncompressed batch (or of a compressed batch's
/// [`plain_view`]).
#[derive(Debug)]
pub struct Record<'a> {
    /// The record as stored: length varint through its last header.
    pub raw: &'a [u8],
    pub offset: Offset,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

fn field_varint(body: &[u8], at: &mut usize) -> Option<i64> {
    let (v, n) = batch::get_varint(body.get(*at..)?)?;
    *at += n;
    Some(v)
}

fn field_bytes<'a>(body: &'a [u8], at: &mut usize) -> Option<Option<&'a [u8]>> {
    let len = field_varint(body, at)?;
    if len < 0 {
        return Some(None);
    }
    let len = usize::try_from(len).ok()?;
    let v = body.get(*at..at.checked_add(len)?)?;
    *at += len;
    Some(Some(v))
}

/// The records of an uncompressed batch (CRC already checked). Unlike
/// produce validation, offset deltas may have gaps (a compacted batch).
pub fn parse_records(b: &[u8]) -> Result<Vec<Record<'_>>, &'static str> {
    let h = BatchHeader::parse(b).map_err(|_| "bad batch header")?;
    let end = h.size_bytes();
    if end > b.len() {
        return Err("batch truncated");
    }
    let count = usize::try_from(h.record_count()).map_err(|_| "negative record count")?;
    let mut out = Vec::with_capacity(count.min(end / 7));
    let mut at = BATCH_HEADER_BYTES;
    for _ in 0..count {
        let mut p = at;
        let len = field_varint(&b[..end], &mut p).ok_or("bad record length")?;
        let len = usize::try_from(len).map_err(|_| "negative record length")?;
        let body_end = p.checked_add(len).filter(|e| *e <= end).ok_or("record runs past the batch")?;
        let body = &b[p..body_end];
        let mut r = 1; // attributes
        field_varint(body, &mut r).ok_or("bad timestamp delta")?;
        let delta = field_varint(body, &mut r).ok_or("bad offset delta")?;
        let key = field_bytes(body, &mut r).ok_or("bad key")?;
        let value = field_bytes(body, &mut r).ok_or("bad value")?;
        out.push(Record { raw: &b[at..body_end], offset: Offset(h.base_offset().0 + delta), key, value });
        at = body_end;
    }
    if at != end {
        return Err("bytes after the last record");
    }
    Ok(out)
}

/// The records section of a compressed batch, decompressed (at most
/// `codec::DECOMPRESSED_MAX_BYTES`).
pub(crate) fn decompress_records(b: &[u8], codec: Compression) -> Result<Vec<u8>, String> {
    super::codec::decompress(&b[BATCH_HEADER_BYTES..], codec, super::codec::DECOMPRESSED_MAX_BYTES)
}

/// `records` compressed with `codec` (`None` for an unknown codec).
fn compress_records(records: &[u8], codec: Compression) -> Result<BytesMut, String> {
    let mut out = BytesMut::with_capacity(records.len() / 2 + 64);
    let fill = |buf: &mut BytesMut| {
        buf.extend_from_slice(records);
        Ok(())
    };
    let done = match codec {
        Compression::None => {
            out.extend_from_slice(records);
            Ok(())
        }
        Compression::Gzip => Gzip::compress(&mut out, fill),
        Compression::Snappy => Snappy::compress(&mut out, fill),
        Compression::Lz4 => Lz4::compress(&mut out, fill),
        Compression::Zstd => Zstd::compress(&mut out, fill),
        Compression::Unknown(n) => return Err(format!("unknown compression codec {n}")),
    };
    done.map(|()| out).map_err(|e| format!("cannot compress with {codec:?}: {e:#}"))
}

/// The batch `b` (CRC already checked) as an uncompressed batch that
/// [`parse_records`] reads: `b` itself, or for a compressed batch its header
/// (length fixed, CRC and codec bits left stale) followed by the
/// decompressed records. One allocation per batch, never per record.
pub fn plain_view(b: &[u8]) -> Result<Cow<'_, [u8]>, String> {
    let h = BatchHeader::parse(b).map_err(|e| e.to_string())?;
    let end = h.size_bytes();
    if end > b.len() {
        return Err("batch truncated".into());
    }
    if h.compression() == Compression::None {
        return Ok(Cow::Borrowed(&b[..end]));
    }
    let records = decompress_records(&b[..end], h.compression())?;
    let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + records.len());
    out.extend_from_slice(&b[..BATCH_HEADER_BYTES]);
    out.extend_from_slice(&records);
    let len = i32::try_from(out.len() - BATCH_LOG_OVERHEAD_BYTES).map_err(|_| "decompressed batch too large")?;
    out[8..12].copy_from_slice(&len.to_be_bytes());
    Ok(Cow::Owned(out))
}

/// The batch `original` with only `kept` records inside: same header
/// (attributes, base offset, last offset delta, producer fields,
/// timestamps), new length, record count and CRC. A compressed `original`
/// gets its records recompressed with the same codec, or, if that fails,
/// stored uncompressed with the codec bits cleared. An emptied batch is a
/// bare header with the codec bits cleared, as Kafka writes it.
pub fn rebuild_batch(original: &[u8], kept: &[&[u8]]) -> Vec<u8> {
    let body: usize = kept.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + body);
    out.extend_from_slice(&original[..BATCH_HEADER_BYTES]);
    for r in kept {
        out.extend_from_slice(r);
    }
    let codec = BatchHeader::parse(original).map(|h| h.compression()).unwrap_or(Compression::None);
    if codec != Compression::None {
        let recompressed = if kept.is_empty() {
            None
        } else {
            compress_records(&out[BATCH_HEADER_BYTES..], codec)
                .map_err(|e| log::warn!("compaction: {e}; writing the batch uncompressed"))
                .ok()
        };
        match recompressed {
            Some(records) => {
                out.truncate(BATCH_HEADER_BYTES);
                out.extend_from_slice(&records);
            }
            None => {
                let attributes = i16::from_be_bytes([out[21], out[22]]) & !CODEC_MASK;
                out[21..23].copy_from_slice(&attributes.to_be_bytes());
            }
        }
    }
    let len = (out.len() - BATCH_LOG_OVERHEAD_BYTES) as i32;
    out[8..12].copy_from_slice(&len.to_be_bytes());
    out[57..61].copy_from_slice(&(kept.len() as i32).to_be_bytes());
    let crc = crc32c::crc32c(&out[21..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Whether the cleaner can see into a batch's records (decompressing them
/// if need be).
fn is_readable(h: &BatchHeader<'_>) -> bool {
    !h.is_control() && !h.is_transactional() && !matches!(h.compression(), Compression::Unknown(_))
}

/// Calls `f` with every batch of the first `limit_bytes` of `path`, each
/// CRC-checked (blocking), until `f` returns `false`. Returns the bytes
/// read. A bad batch is an error: the cleaner never rewrites what it cannot
/// read whole.
fn for_each_batch(path: &Path, limit_bytes: u64, mut f: impl FnMut(&[u8]) -> io::Result<bool>) -> io::Result<u64> {
    let file = std::fs::File::open(path)?;
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, file.take(limit_bytes));
    let mut buf = Vec::new();
    let mut pos = 0u64;
    while pos < limit_bytes {
        let mut head = [0u8; BATCH_LOG_OVERHEAD_BYTES];
        r.read_exact(&mut head).map_err(|e| invalid(format!("{}: batch at position {pos}: {e}", path.display())))?;
        let len = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        if len < (BATCH_HEADER_BYTES - BATCH_LOG_OVERHEAD_BYTES) as i32 {
            return Err(invalid(format!("{}: batch at position {pos}: bad length {len}", path.display())));
        }
        let size = len as usize + BATCH_LOG_OVERHEAD_BYTES;
        buf.clear();
        buf.extend_from_slice(&head);
        buf.resize(size, 0);
        r.read_exact(&mut buf[BATCH_LOG_OVERHEAD_BYTES..])
            .map_err(|e| invalid(format!("{}: batch at position {pos}: {e}", path.display())))?;
        batch::validate(&buf, usize::MAX)
            .map_err(|e| invalid(format!("{}: batch at position {pos}: {e}", path.display())))?;
        pos += size as u64;
        if !f(&buf)? {
            break;
        }
    }
    Ok(pos)
}

// ---------------------------------------------------------------------------
// Key map

/// Charged per key on top of its bytes: the allocator's header and rounding
/// of the key's own allocation.
const KEY_ALLOCATION_OVERHEAD_BYTES: usize = 16;

/// Bytes of the table of a std `HashMap<K, V>` (hashbrown) of `capacity`:
/// its buckets, each a `(K, V)` slot and a control byte, plus one group of
/// trailing control bytes. The bucket count is hashbrown's for that
/// capacity (7/8 load, a power of two, at least 4).
fn table_bytes<K, V>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = match capacity {
        0..4 => 4,
        4..8 => 8,
        n => n.saturating_mul(8).div_ceil(7).next_power_of_two(),
    };
    buckets * (std::mem::size_of::<(K, V)>() + 1) + 16
}

/// Makes room for one more entry in `table` if that keeps `other_bytes` +
/// `entry_bytes` + the table (old and new together while it grows) within
/// `limit_bytes`. Grows the table by doubling, so its size is known ahead.
fn reserve_one<K: std::hash::Hash + Eq, V>(
    table: &mut HashMap<K, V>,
    other_bytes: usize,
    entry_bytes: usize,
    limit_bytes: usize,
) -> bool {
    let (len, capacity) = (table.len(), table.capacity());
    let now = table_bytes::<K, V>(capacity);
    if len < capacity {
        return other_bytes.saturating_add(entry_bytes).saturating_add(now) <= limit_bytes;
    }
    let target = (capacity * 2).max(4);
    let peak = other_bytes.saturating_add(entry_bytes).saturating_add(now).saturating_add(table_bytes::<K, V>(target));
    if peak > limit_bytes {
        return false;
    }
    table.try_reserve(target - len).is_ok()
}

/// Key -> offset of its latest record, over the records the cleaner can
/// see in the part of the log it covers (`from` up to `covered_to`), in at
/// most `limit_bytes` (`memory_bytes`).
#[derive(Debug)]
pub struct KeyMap {
    pub latest: HashMap<Vec<u8>, Offset>,
    /// Producer id -> base offset of its newest batch in the covered part:
    /// an emptied batch of the producer below it is dropped.
    pub producer_last: HashMap<i64, Offset>,
    /// Batches kept unread (transactional or of an unknown codec): while
    /// there are any, tombstones are never dropped.
    pub opaque_batches: u64,
    /// The first offset the map covers.
    pub from: Offset,
    /// The first record that did not fit (`None`: all from `from` did).
    pub covered_to: Option<Offset>,
    key_bytes: usize,
    limit_bytes: usize,
}

impl Default for KeyMap {
    fn default() -> KeyMap {
        KeyMap::new(Offset(0), usize::MAX)
    }
}

impl KeyMap {
    pub fn new(from: Offset, limit_bytes: usize) -> KeyMap {
        KeyMap {
            latest: HashMap::new(),
            producer_last: HashMap::new(),
            opaque_batches: 0,
            from,
            covered_to: None,
            key_bytes: 0,
            limit_bytes,
        }
    }

    /// Memory held: key bytes with their allocation overhead, and both tables.
    pub fn memory_bytes(&self) -> usize {
        self.key_bytes
            + table_bytes::<Vec<u8>, Offset>(self.latest.capacity())
            + table_bytes::<i64, Offset>(self.producer_last.capacity())
    }

    fn is_full(&self) -> bool {
        self.covered_to.is_some()
    }

    /// Adds the records of `b` at offsets `>= from`, until the map is full
    /// (then `covered_to` is the first record left out). Control batches
    /// and opaque batches only count their producer.
    pub fn add_batch(&mut self, b: &[u8]) -> Result<(), String> {
        if self.is_full() {
            return Ok(());
        }
        let h = BatchHeader::parse(b).map_err(|e| e.to_string())?;
        if h.last_offset() < self.from {
            return Ok(());
        }
        let pid = h.producer_id().0;
        if pid >= 0 {
            let base = h.base_offset();
            if let Some(o) = self.producer_last.get_mut(&pid) {
                *o = (*o).max(base);
            } else {
                let other = self.key_bytes + table_bytes::<Vec<u8>, Offset>(self.latest.capacity());
                if !reserve_one(&mut self.producer_last, other, 0, self.limit_bytes) {
                    self.covered_to = Some(base.max(self.from));
                    return Ok(());
                }
                self.producer_last.insert(pid, base);
            }
        }
        if h.is_control() {
            return Ok(());
        }
        if !is_readable(&h) {
            self.opaque_batches += 1;
            return Ok(());
        }
        let plain = plain_view(b)?;
        for r in parse_records(&plain)? {
            let Some(key) = r.key else { continue };
            if r.offset < self.from {
                continue;
            }
            if let Some(o) = self.latest.get_mut(key) {
                *o = (*o).max(r.offset);
                continue;
            }
            let entry_bytes = key.len() + KEY_ALLOCATION_OVERHEAD_BYTES;
            let other = self.key_bytes + table_bytes::<i64, Offset>(self.producer_last.capacity());
            if !reserve_one(&mut self.latest, other, entry_bytes, self.limit_bytes) {
                self.covered_to = Some(r.offset);
                return Ok(());
            }
            self.key_bytes += entry_bytes;
            self.latest.insert(key.to_vec(), r.offset);
        }
        Ok(())
    }

    /// Whether `r` stays: keyless records and the latest of each key do,
    /// tombstones only while `keep_tombstones` or outside the map's range.
    /// (A tombstone before the range was up for dropping in an earlier step,
    /// whose rewrite also removed the older values of its key; dropping it
    /// now could bring back one that rewrite failed to remove.)
    fn keeps(&self, r: &Record<'_>, keep_tombstones: bool) -> bool {
        let Some(key) = r.key else { return true };
        let latest = self.latest.get(key).is_none_or(|o| *o <= r.offset);
        let mapped = r.offset >= self.from && self.covered_to.is_none_or(|end| r.offset < end);
        latest && (r.value.is_some() || keep_tombstones || !mapped)
    }

    /// Whether a batch of `producer_id` at `base` left without records may
    /// go: it has no producer, or a later batch of its producer holds its state.
    fn drops_empty(&self, producer_id: i64, base: Offset) -> bool {
        producer_id < 0 || self.producer_last.get(&producer_id).is_some_and(|last| *last > base)
    }
}

/// Builds the key map from `sources` (path, bytes to read), in offset
/// order, from offset `from`, in at most `limit_bytes` (blocking). Returns
/// it with the bytes read.
pub fn build_key_map(sources: &[(PathBuf, u64)], from: Offset, limit_bytes: usize) -> io::Result<(KeyMap, u64)> {
    let mut map = KeyMap::new(from, limit_bytes);
    let mut read = 0;
    for (path, bytes) in sources {
        read += for_each_batch(path, *bytes, |b| {
            map.add_batch(b).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            Ok(!map.is_full())
        })?;
        if map.is_full() {
            break;
        }
    }
    debug_assert!(
        map.memory_bytes() <= limit_bytes,
        "key map {} bytes over its bound {limit_bytes}",
        map.memory_bytes()
    );
    Ok((map, read))
}

// ---------------------------------------------------------------------------
// Segment rewrite

/// Kafka's `segment.index.bytes` default: a merged segment's offset index
/// (8 bytes an entry) and time index (12) each stay under it.
pub const INDEX_BYTES_MAX: u64 = 10 << 20;
const OFFSET_ENTRY_BYTES: u64 = 8;
const TIME_ENTRY_BYTES: u64 = 12;

/// How large a group of merged segments may grow.
#[derive(Clone, Copy, Debug)]
pub struct GroupLimits {
    /// The topic's `segment.bytes`, at most `i32::MAX` (positions are 32-bit).
    pub bytes_max: u64,
    pub index_bytes_max: u64,
}

impl GroupLimits {
    pub fn for_segment_bytes(segment_bytes: u64) -> GroupLimits {
        GroupLimits { bytes_max: segment_bytes.min(i32::MAX as u64), index_bytes_max: INDEX_BYTES_MAX }
    }
}

/// A cleanable segment as the rewrite sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub base: Offset,
    pub next_offset: Offset,
    pub bytes: u64,
    pub keep_tombstones: bool,
}

/// The outcome of rewriting a group of segments into the first one's `.log.cleaned`.
#[derive(Debug, Default)]
pub struct Rewritten {
    /// Whether the file differs from the group's (else no `.log.cleaned`
    /// is left behind): records or batches removed, or segments merged.
    pub changed: bool,
    /// Segments of the group (the leading members that fit).
    pub segments: usize,
    /// The next offset after the group (its last segment's next offset).
    pub end: Offset,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_before: u64,
    pub records_removed: u64,
    /// Batches left without records and dropped.
    pub batches_dropped: u64,
    pub tombstones_kept: u64,
    pub batches_after: u64,
    pub index: SegmentIndex,
    pub max_timestamp_ms: i64,
}

/// What a member added to a `Rewritten`, to take it back.
struct Mark {
    bytes_before: u64,
    bytes_after: u64,
    records_before: u64,
    records_removed: u64,
    batches_dropped: u64,
    tombstones_kept: u64,
    batches_after: u64,
    offsets: usize,
    times: usize,
    max_timestamp_ms: i64,
    since_index: u64,
}

struct GroupWriter {
    base: Offset,
    w: BufWriter<std::fs::File>,
    out: Rewritten,
    since_index: u64,
    index_interval_bytes: u64,
}

impl GroupWriter {
    fn emit(&mut self, b: &[u8]) -> io::Result<()> {
        let h = BatchHeader::parse(b).map_err(|e| invalid(e.to_string()))?;
        let relative = u32::try_from(h.base_offset().0 - self.base.0)
            .map_err(|_| invalid(format!("batch at offset {} too far from base {}", h.base_offset().0, self.base.0)))?;
        let position = u32::try_from(self.out.bytes_after)
            .map_err(|_| invalid(format!("segment {} would pass 4 GiB", self.base.0)))?;
        if self.since_index >= self.index_interval_bytes {
            self.out.index.offsets.push(IndexEntry { relative_offset: relative, position });
            self.since_index = 0;
        }
        if h.max_timestamp_ms() > self.out.max_timestamp_ms {
            self.out.max_timestamp_ms = h.max_timestamp_ms();
            self.out.index.times.push(TimeEntry { timestamp_ms: h.max_timestamp_ms(), relative_offset: relative });
        }
        self.since_index += b.len() as u64;
        self.out.bytes_after += b.len() as u64;
        self.out.batches_after += 1;
        self.w.write_all(b)
    }

    fn mark(&self) -> Mark {
        let o = &self.out;
        Mark {
            bytes_before: o.bytes_before,
            bytes_after: o.bytes_after,
            records_before: o.records_before,
            records_removed: o.records_removed,
            batches_dropped: o.batches_dropped,
            tombstones_kept: o.tombstones_kept,
            batches_after: o.batches_after,
            offsets: o.index.offsets.len(),
            times: o.index.times.len(),
            max_timestamp_ms: o.max_timestamp_ms,
            since_index: self.since_index,
        }
    }

    /// Cuts what was written since `m` off the file and the figures.
    fn rollback(&mut self, m: Mark) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.w.flush()?;
        self.w.get_mut().set_len(m.bytes_after)?;
        self.w.seek(SeekFrom::Start(m.bytes_after))?;
        let o = &mut self.out;
        o.bytes_before = m.bytes_before;
        o.bytes_after = m.bytes_after;
        o.records_before = m.records_before;
        o.records_removed = m.records_removed;
        o.batches_dropped = m.batches_dropped;
        o.tombstones_kept = m.tombstones_kept;
        o.batches_after = m.batches_after;
        o.index.offsets.truncate(m.offsets);
        o.index.times.truncate(m.times);
        o.max_timestamp_ms = m.max_timestamp_ms;
        self.since_index = m.since_index;
        Ok(())
    }

    /// Appends the records of `m`'s segment that `map` keeps.
    fn add_segment(&mut self, path: &Path, m: &Member, map: &KeyMap) -> io::Result<()> {
        let read = for_each_batch(path, m.bytes, |b| {
            let h = BatchHeader::parse(b).map_err(|e| invalid(e.to_string()))?;
            self.out.records_before += h.record_count().max(0) as u64;
            if !is_readable(&h) {
                return self.emit(b).map(|()| true);
            }
            let plain = plain_view(b).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            let records = parse_records(&plain).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            let kept: Vec<&Record<'_>> = records.iter().filter(|r| map.keeps(r, m.keep_tombstones)).collect();
            self.out.tombstones_kept += kept.iter().filter(|r| r.value.is_none()).count() as u64;
            self.out.records_removed += (records.len() - kept.len()) as u64;
            if kept.is_empty() && map.drops_empty(h.producer_id().0, h.base_offset()) {
                self.out.batches_dropped += 1;
                Ok(true)
            } else if kept.len() == records.len() {
                self.emit(b).map(|()| true)
            } else {
                let raw: Vec<&[u8]> = kept.iter().map(|r| r.raw).collect();
                self.emit(&rebuild_batch(b, &raw)).map(|()| true)
            }
        })?;
        self.out.bytes_before += read;
        Ok(())
    }

    fn index_fits(&self, limits: &GroupLimits) -> bool {
        let index = &self.out.index;
        index.offsets.len() as u64 * OFFSET_ENTRY_BYTES <= limits.index_bytes_max
            && index.times.len() as u64 * TIME_ENTRY_BYTES <= limits.index_bytes_max
    }
}

/// Writes `<first member>.log.cleaned` in `dir` with the records of the
/// leading `members` that `map` keeps, merged while they fit `limits` (the
/// first always goes in), synced, and builds its index (blocking). When the
/// group is one segment and nothing would be removed, the file is not kept.
pub fn rewrite_group(
    dir: &Path,
    members: &[Member],
    map: &KeyMap,
    index_interval_bytes: u64,
    limits: GroupLimits,
) -> io::Result<Rewritten> {
    let Some(first) = members.first() else { return Err(invalid("an empty group to rewrite".into())) };
    let cleaned = cleaned_path(&super::segment::log_path(dir, first.base));
    let file = std::fs::File::create(&cleaned)?;
    let mut g = GroupWriter {
        base: first.base,
        w: BufWriter::with_capacity(READ_BUFFER_BYTES, file),
        out: Rewritten { max_timestamp_ms: -1, ..Default::default() },
        since_index: u64::MAX,
        index_interval_bytes,
    };
    for (i, m) in members.iter().enumerate() {
        if i > 0 && m.next_offset.0 - first.base.0 > i32::MAX as i64 {
            break;
        }
        let mark = g.mark();
        g.add_segment(&super::segment::log_path(dir, m.base), m, map)?;
        if i > 0 && (g.out.bytes_after > limits.bytes_max || !g.index_fits(&limits)) {
            g.rollback(mark)?;
            break;
        }
        g.out.segments = i + 1;
        g.out.end = m.next_offset;
    }
    let mut out = g.out;
    out.changed = out.records_removed > 0 || out.batches_dropped > 0 || out.segments > 1;
    let file = g.w.into_inner().map_err(|e| e.into_error())?;
    if out.changed {
        file.sync_data()?;
    } else {
        drop(file);
        remove_if_exists(&cleaned)?;
    }
    Ok(out)
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_data()
}

/// Steps of the swap after `.log.cleaned` is written; public for the
/// crash tests, which stop after each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SwapStep {
    /// Renamed to `.swap`: the commit point.
    Committed,
    /// The group's old files deleted.
    Replaced,
    /// `.swap` renamed over the first segment's log.
    Renamed,
    /// Its index files written.
    Indexed,
}

/// Steps 2-5 of the swap protocol for the group from `base` to `end`
/// (blocking), up to and including `until`; `index` is written in step 5.
pub fn install_cleaned(dir: &Path, base: Offset, end: Offset, index: &SegmentIndex, until: SwapStep) -> io::Result<()> {
    let log = super::segment::log_path(dir, base);
    std::fs::rename(cleaned_path(&log), swap_path(dir, base, end))?;
    sync_dir(dir)?;
    if until == SwapStep::Committed {
        return Ok(());
    }
    finish_swap(dir, base, end, until)?;
    if until < SwapStep::Indexed {
        return Ok(());
    }
    let [ip, tp] = super::segment::index_files(&log);
    write_synced(&tp, &index.encode_times())?;
    write_synced(&ip, &index.encode_offsets())?;
    sync_dir(dir)
}

/// Steps 3-4 for a committed `<base>-<end>.swap` (blocking, idempotent),
/// up to `until` (`Replaced` or `Renamed`): deletes the old files of the
/// group, then renames the swap file over `<base>.log`.
fn finish_swap(dir: &Path, base: Offset, end: Offset, until: SwapStep) -> io::Result<()> {
    let log = super::segment::log_path(dir, base);
    for p in super::segment::index_files(&log) {
        remove_if_exists(&p)?;
    }
    for b in segment_bases(dir)?.into_iter().filter(|b| *b > base && *b < end) {
        let old = super::segment::log_path(dir, b);
        for p in super::segment::index_files(&old) {
            remove_if_exists(&p)?;
        }
        remove_if_exists(&old)?;
    }
    sync_dir(dir)?;
    if until == SwapStep::Replaced {
        return Ok(());
    }
    std::fs::rename(swap_path(dir, base, end), &log)?;
    sync_dir(dir)
}

// ---------------------------------------------------------------------------
// A pass over one log

/// Inputs of one pass that come from the topic and broker config.
#[derive(Clone, Copy, Debug)]
pub struct CleanParams {
    pub now_ms: i64,
    pub min_compaction_lag_ms: i64,
    pub delete_retention_ms: i64,
    pub io_max_bytes_per_second: u64,
    /// `min.cleanable.dirty.ratio`: dirty share of the cleanable bytes that starts a pass.
    pub min_cleanable_ratio: f64,
    /// `max.compaction.lag.ms`: a dirty segment whose first batch is older
    /// than this starts a pass whatever the ratio.
    pub max_compaction_lag_ms: i64,
    /// The shard's share of `log.cleaner.dedupe.buffer.size`: the key map's bound.
    pub dedupe_buffer_bytes: usize,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanStats {
    /// Steps (key maps built): more than one when the keys did not fit.
    pub steps: u64,
    /// Segments rewritten (each merged one counts).
    pub segments_cleaned: u64,
    /// Segment files that went away into a merged one.
    pub segments_merged: u64,
    pub records_removed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_reclaimed: u64,
}

/// The leading segments a pass may rewrite (see the module doc).
pub fn cleanable(inactive: &[SegmentInfo], active: &SegmentInfo, now_ms: i64, min_lag_ms: i64) -> Vec<SegmentInfo> {
    let mut out = Vec::new();
    for (i, s) in inactive.iter().enumerate() {
        let too_young = s.max_timestamp_ms >= 0 && now_ms.saturating_sub(s.max_timestamp_ms) < min_lag_ms;
        // Only the last sealed segment waits for its successor (the active
        // one) to hold durable data; an emptied sealed successor is still a file.
        let last_without_successor = i + 1 == inactive.len() && active.bytes == 0;
        if !s.sealed || too_young || last_without_successor {
            break;
        }
        out.push(*s);
    }
    out
}

fn tombstones_due(c: &CleanedSegment, p: &CleanParams) -> bool {
    p.now_ms.saturating_sub(c.first_cleaned_at_ms) > p.delete_retention_ms
}

/// Whether a pass is worth running: enough dirty bytes, a dirty record
/// past `max.compaction.lag.ms` (KIP-354), or tombstones due.
pub fn worth_cleaning(segments: &[SegmentInfo], cp: &Checkpoint, p: &CleanParams) -> bool {
    let total: u64 = segments.iter().map(|s| s.bytes).sum();
    let dirty_segments = || segments.iter().filter(|s| !cp.contains_key(&s.base_offset.0));
    let dirty: u64 = dirty_segments().map(|s| s.bytes).sum();
    let lagging = dirty_segments().any(|s| {
        let first = if s.first_timestamp_ms >= 0 { s.first_timestamp_ms } else { s.max_timestamp_ms };
        first >= 0 && p.now_ms.saturating_sub(first) > p.max_compaction_lag_ms
    });
    let due =
        segments.iter().filter_map(|s| cp.get(&s.base_offset.0)).any(|c| c.tombstones > 0 && tombstones_due(c, p));
    (dirty > 0 && dirty as f64 >= p.min_cleanable_ratio * total as f64) || lagging || due
}

async fn pace(bytes: u64, bytes_per_second: u64) {
    if bytes_per_second > 0 && bytes > 0 {
        let us = (bytes as u128 * 1_000_000 / bytes_per_second as u128).min(60_000_000) as u64;
        glommio::timer::sleep(Duration::from_micros(us)).await;
    }
}

/// What a step needs of the log, read in one borrow.
struct LogView {
    name: String,
    dir: PathBuf,
    index_interval_bytes: u64,
    limits: GroupLimits,
    inactive: Vec<SegmentInfo>,
    active: SegmentInfo,
    /// Where cleaning stops: the last stable offset (the high watermark
    /// without open transactions).
    last_stable_offset: Offset,
    truncations: u64,
}

impl LogView {
    fn of(log: &SharedLog) -> LogView {
        let l = log.borrow();
        LogView {
            name: format!("{}-{}", l.topic, l.partition.0),
            dir: l.dir.clone(),
            index_interval_bytes: l.settings.segment.index_interval_bytes,
            limits: GroupLimits::for_segment_bytes(l.settings.segment.segment_bytes),
            inactive: l.inactive_segments(),
            active: l.active_segment_info(),
            last_stable_offset: l.last_stable_offset(),
            truncations: l.truncations,
        }
    }

    /// The segments this pass may rewrite: cleanable and, as in Kafka, below
    /// the last stable offset (a replicated log's tail may still be
    /// truncated, and an open transaction's outcome is unknown). Segments
    /// from there on keep their batch positions, which producer state holds
    /// for the first batch of each unstable transaction.
    fn cleanable(&self, p: &CleanParams) -> Vec<SegmentInfo> {
        let mut segments = cleanable(&self.inactive, &self.active, p.now_ms, p.min_compaction_lag_ms);
        segments.retain(|s| s.next_offset <= self.last_stable_offset);
        segments
    }

    /// Every segment with its file and size known, from `from` on: the
    /// sealed ones, then the active one's durable part. A segment still
    /// waiting for its flush and seal ends the list (missing newer keys
    /// only means keeping more).
    fn sources(&self, from: Offset) -> Vec<(PathBuf, u64)> {
        let sealed = self.inactive.iter().take_while(|s| s.sealed);
        let mut out: Vec<(PathBuf, u64)> = sealed
            .filter(|s| s.next_offset > from)
            .map(|s| (super::segment::log_path(&self.dir, s.base_offset), s.bytes))
            .collect();
        let all_sealed = self.inactive.iter().all(|s| s.sealed);
        if self.active.bytes > 0 && all_sealed && self.active.next_offset > from {
            out.push((super::segment::log_path(&self.dir, self.active.base_offset), self.active.bytes));
        }
        out
    }
}

/// One compaction pass over `log`, if it is worth it: steps until the key
/// map has covered the log. `stopping` is checked between groups.
/// `Ok(None)` when there was nothing to do.
pub async fn clean_log(
    log: &SharedLog,
    p: &CleanParams,
    stopping: &dyn Fn() -> bool,
) -> io::Result<Option<CleanStats>> {
    let view = LogView::of(log);
    let segments = view.cleanable(p);
    if segments.is_empty() {
        return Ok(None);
    }
    let d = view.dir.clone();
    let mut cp = glommio::executor().spawn_blocking(move || read_checkpoint(&d)).await;
    // Segments deleted by retention or DeleteRecords are forgotten.
    cp.retain(|base, _| view.inactive.iter().any(|s| s.base_offset.0 == *base));
    if !worth_cleaning(&segments, &cp, p) {
        return Ok(None);
    }
    let first = segments.first().map(|s| s.base_offset.0).unwrap_or(0);
    let end = segments.last().map(|s| s.next_offset.0).unwrap_or(0);
    log::info!(
        "{}: compaction started: offsets {first}..{end} in {} segment(s) ({} bytes)",
        view.name,
        segments.len(),
        segments.iter().map(|s| s.bytes).sum::<u64>()
    );
    let mut stats = CleanStats::default();
    let mut step = Step { from: view.inactive.first().map(|s| s.base_offset).unwrap_or(Offset(0)), opaque_batches: 0 };
    while clean_step(log, p, &mut cp, &mut step, &mut stats, stopping).await? {
        log::info!(
            "{}: compaction: the key map is full (log.cleaner.dedupe.buffer.size); next step from offset {}",
            view.name,
            step.from.0
        );
    }
    Ok(Some(stats))
}

/// Where the next step's key map starts, and the opaque batches seen so far.
struct Step {
    from: Offset,
    opaque_batches: u64,
}

/// One step (see the module doc). `true` when another step must follow.
async fn clean_step(
    log: &SharedLog,
    p: &CleanParams,
    cp: &mut Checkpoint,
    step: &mut Step,
    stats: &mut CleanStats,
    stopping: &dyn Fn() -> bool,
) -> io::Result<bool> {
    let view = LogView::of(log);
    let segments = view.cleanable(p);
    cp.retain(|base, _| view.inactive.iter().any(|s| s.base_offset.0 == *base));
    if segments.is_empty() || stopping() {
        return Ok(false);
    }
    let (sources, from, limit) = (view.sources(step.from), step.from, p.dedupe_buffer_bytes);
    let (map, read) = glommio::executor().spawn_blocking(move || build_key_map(&sources, from, limit)).await?;
    if map.covered_to == Some(from) {
        return Err(invalid(format!(
            "{}: the key map's bound ({limit} bytes: log.cleaner.dedupe.buffer.size / shards) cannot hold the \
             record at offset {}",
            view.name, from.0
        )));
    }
    stats.steps += 1;
    stats.bytes_read += read;
    pace(read, p.io_max_bytes_per_second).await;
    step.opaque_batches += map.opaque_batches;
    let tombstones_expirable = step.opaque_batches == 0;
    let covered_to = map.covered_to;
    let map = Arc::new(map);
    let targets: Vec<Member> = segments
        .iter()
        .take_while(|s| covered_to.is_none_or(|end| s.base_offset < end))
        .map(|s| {
            let previous = cp.get(&s.base_offset.0);
            Member {
                base: s.base_offset,
                next_offset: s.next_offset,
                bytes: s.bytes,
                keep_tombstones: !(tombstones_expirable && previous.is_some_and(|c| tombstones_due(c, p))),
            }
        })
        .collect();
    let mut i = 0;
    while i < targets.len() && !stopping() {
        let (m, group, dir, interval, limits) =
            (map.clone(), targets[i..].to_vec(), view.dir.clone(), view.index_interval_bytes, view.limits);
        let r = glommio::executor().spawn_blocking(move || rewrite_group(&dir, &group, &m, interval, limits)).await?;
        let group = &targets[i..i + r.segments.max(1)];
        i += group.len();
        stats.bytes_read += r.bytes_before;
        pace(r.bytes_before + if r.changed { r.bytes_after } else { 0 }, p.io_max_bytes_per_second).await;
        if r.changed {
            if !install(log, &view.dir, group, &r, view.truncations).await? {
                continue;
            }
            stats.segments_cleaned += group.len() as u64;
            stats.segments_merged += group.len() as u64 - 1;
            stats.records_removed += r.records_removed;
            stats.bytes_written += r.bytes_after;
            stats.bytes_reclaimed += r.bytes_before.saturating_sub(r.bytes_after);
            log::info!(
                "{}: compacted segment {} (offsets {}..{}, from {} segment(s)): {} -> {} bytes, {} of {} records \
                 removed, {} tombstone(s) kept",
                view.name,
                group[0].base.0,
                group[0].base.0,
                r.end.0,
                group.len(),
                r.bytes_before,
                r.bytes_after,
                r.records_removed,
                r.records_before,
                r.tombstones_kept
            );
        }
        let mut first_cleaned_at_ms = i64::MIN;
        for m in group {
            let at = cp.remove(&m.base.0).map(|c| c.first_cleaned_at_ms).unwrap_or(p.now_ms);
            first_cleaned_at_ms = first_cleaned_at_ms.max(at);
        }
        cp.insert(group[0].base.0, CleanedSegment { first_cleaned_at_ms, tombstones: r.tombstones_kept });
        glommio::yield_if_needed().await;
    }
    let (d, c) = (view.dir.clone(), cp.clone());
    glommio::executor().spawn_blocking(move || write_checkpoint(&d, &c)).await?;
    match covered_to {
        Some(end) if !stopping() => {
            step.from = end;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Swaps the segments of `group` for their written `.log.cleaned`, on disk
/// then in memory. `false` (and nothing left behind) when a segment of the
/// group went away, or when the log was truncated since the pass started
/// (`truncations` was its count then): the key map may hold records the
/// truncation removed. Holds the log's cleaner lock, so no truncation or
/// prefix deletion runs meanwhile.
async fn install(log: &SharedLog, dir: &Path, group: &[Member], r: &Rewritten, truncations: u64) -> io::Result<bool> {
    let base = group[0].base;
    let path = super::segment::log_path(dir, base);
    let cleaned = cleaned_path(&path);
    let lock = log.borrow().cleaner_lock.clone();
    let _cleaner = lock.lock().await;
    // Fetches must keep reading the old inodes: pin a read fd to each first.
    for m in group {
        let p = super::segment::log_path(dir, m.base);
        let old = glommio::executor().spawn_blocking(move || super::segment::open_reader(&p)).await?;
        log.borrow_mut().set_reader_if_none(m.base, Arc::new(old));
    }
    let bases: Vec<Offset> = group.iter().map(|m| m.base).collect();
    if !log.borrow().has_sealed_segments(&bases, r.end) || log.borrow().truncations != truncations {
        glommio::executor().spawn_blocking(move || remove_if_exists(&cleaned)).await?;
        return Ok(false);
    }
    let (d, end, index) =
        (dir.to_path_buf(), r.end, SegmentIndex { offsets: r.index.offsets.clone(), times: r.index.times.clone() });
    glommio::executor().spawn_blocking(move || install_cleaned(&d, base, end, &index, SwapStep::Indexed)).await?;
    let file = Rc::new(super::segment::open_rw(&path, false).await?);
    let index = SegmentIndex { offsets: r.index.offsets.clone(), times: r.index.times.clone() };
    if !log.borrow_mut().swap_cleaned_segments(base, r.end, file, r.bytes_after, index, r.max_timestamp_ms) {
        // Cannot happen under the cleaner lock. Reads go on from the old
        // segments' open files; the next open finds the merged one on disk.
        debug_assert!(false, "{}: segments {bases:?} went away under the cleaner lock", path.display());
        return Err(invalid(format!("{}: segments {bases:?} went away during their swap", path.display())));
    }
    Ok(true)
}

/// One cleaner pass over every compacted log of `shard`.
pub async fn check(shard: &Rc<Shard>) {
    let image = shard.image();
    for (topic, partition, log) in shard.all_logs() {
        if shard.stopping.get() {
            return;
        }
        let Some(meta) = image.topics.get(&topic) else { continue };
        if !topic_config::policy_has(&shard.config, &image, meta, "compact") {
            continue;
        }
        // A rewrite needs room and a healthy disk; an offline dir gets neither.
        if shard.dir_state(&log) != super::log_dirs::DirState::Online {
            continue;
        }
        let params = CleanParams {
            now_ms: now_ms(),
            min_compaction_lag_ms: topic_config::topic_i64(&shard.config, &image, meta, "min.compaction.lag.ms"),
            delete_retention_ms: topic_config::topic_i64(&shard.config, &image, meta, "delete.retention.ms"),
            io_max_bytes_per_second: shard.config.cleaner_io_max_bytes_per_second,
            min_cleanable_ratio: topic_config::topic_f64(&shard.config, &image, meta, "min.cleanable.dirty.ratio"),
            max_compaction_lag_ms: topic_config::topic_i64(&shard.config, &image, meta, "max.compaction.lag.ms"),
            dedupe_buffer_bytes: shard.config.cleaner_dedupe_buffer_bytes / shard.num_shards.max(1),
        };
        let stopping = || shard.stopping.get();
        match clean_log(&log, &params, &stopping).await {
            Ok(Some(done)) => shard.metrics.cleaner_add(|c| {
                c.compaction_runs += 1;
                c.compaction_segments_cleaned += done.segments_cleaned;
                c.compaction_records_removed += done.records_removed;
                c.compaction_bytes_read += done.bytes_read;
                c.compaction_bytes_written += done.bytes_written;
                c.compaction_bytes_reclaimed += done.bytes_reclaimed;
            }),
            Ok(None) => {}
            Err(e) => log::error!("shard {}: compaction of {topic}-{partition}: {e}; will retry", shard.id.0),
        }
        glommio::yield_if_needed().await;
    }
}

/// The per-shard cleaner task; runs until the shard stops.
pub async fn run(shard: Rc<Shard>) {
    let backoff = Duration::from_millis(shard.config.cleaner_backoff_ms);
    loop {
        glommio::timer::sleep(backoff).await;
        if shard.stopping.get() {
            return;
        }
        check(&shard).await;
    }
}

#[cfg(test)]
mod tests;
