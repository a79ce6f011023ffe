//! Log compaction for `cleanup.policy=compact` (and `compact,delete`): a
//! background cleaner per shard that rewrites sealed segments keeping only
//! the latest record of each key.
//!
//! Shard-local: spawned on every shard next to retention, it only looks at
//! the logs that shard owns. Every `log.cleaner.backoff.ms` it looks at each
//! compacted log; file reading, filtering and writing run on the blocking
//! pool, never on the shard thread, and no `RefCell` borrow is held across an
//! `.await`. Pace: `log.cleaner.io.max.bytes.per.second` (the task sleeps
//! after each step for the bytes it read and wrote).
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
//! A pass: (1) the key -> latest offset map is built from every segment of
//! the log, the active one up to its durable end included, so a key whose
//! latest record is newer than the cleanable range (in the active segment or
//! a segment still inside the lag) loses all its cleanable records; (2) each
//! cleanable segment is rewritten, oldest first, keeping a record only if it
//! is the latest of its key. Offsets never change: a rewritten batch keeps
//! its header (base offset, last offset delta, producer id/epoch/sequence,
//! timestamps) with only the kept records inside, and a new CRC; a batch left
//! empty is dropped unless it carries a producer id (its header keeps the
//! producer's sequence state, as Kafka does). Compressed batches are read
//! whole (decompressed per batch, into the key map like any other) and, when
//! a record goes, rewritten with the same codec and attributes and only the
//! records section recompressed; should recompression fail, the batch is
//! written uncompressed with the codec bits cleared. Kept as they are, and
//! left out of the key map: control batches, transactional batches (simplest
//! correct rule for open and aborted transactions) and batches with an
//! unknown codec. Records without a key are kept.
//!
//! Tombstones (null value) are kept until `delete.retention.ms` after their
//! segment was first cleaned, then dropped — but never while the log holds a
//! batch the cleaner cannot see into (transactional or unknown codec), since
//! an older value of the key might hide there. "First cleaned at" and the tombstones left per segment are in
//! `<partition dir>/cleaner-checkpoint` (replaced atomically).
//!
//! Crash safety, per segment `<base>.log`:
//! 1. write `<base>.log.cleaned`, fdatasync;
//! 2. delete `<base>.index` and `<base>.timeindex`, fsync the dir (the
//!    segment now reads as "not sealed cleanly": recovery rescans its log);
//! 3. rename `<base>.log.cleaned` over `<base>.log` (atomic), fsync the dir:
//!    the commit point;
//! 4. write `.timeindex` then `.index` (each synced), fsync the dir.
//!
//! A crash before 3 leaves the old log (rescanned if 2 happened); after 3,
//! the new one (rescanned if 4 did not finish). On open, `recover_dir`
//! deletes any stray `.log.cleaned`: it is always either uncommitted or
//! already renamed. Either the old or the new segment survives, never a mix.
//! Across segments a crash leaves some rewritten and some not, each a valid
//! compaction of the same data (older values go before their tombstone, as
//! segments are processed oldest first).
//!
//! In memory the segment's file handle, index and size are swapped in one
//! borrow after step 4. A fetch that already holds the old file keeps
//! reading the old (unlinked) inode; before step 3 the segment is given a
//! read fd of the old file so no fetch opens the new file by path with
//! positions found in the old one.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::compression::{Compressor, Decompressor, Gzip, Lz4, Snappy, Zstd};
use tidelog_protocol::batch::{self, BatchHeader, Compression, BATCH_HEADER_BYTES, BATCH_LOG_OVERHEAD_BYTES};
use tidelog_protocol::Offset;

use super::index::{IndexEntry, SegmentIndex, TimeEntry};
use super::partition::{SegmentInfo, SharedLog};
use crate::shard::Shard;
use crate::topic_config;

pub const CHECKPOINT_FILE: &str = "cleaner-checkpoint";
/// Suffix of a segment's rewrite before it is renamed over the segment.
pub const CLEANED_SUFFIX: &str = ".log.cleaned";
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

/// On open (blocking, before segments are listed): deletes stray
/// `.log.cleaned` files. Under the swap protocol they are never needed: a
/// committed rewrite has already been renamed over its segment.
pub fn recover_dir(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(CLEANED_SUFFIX) {
            log::warn!("{}: removing an interrupted compaction rewrite", entry.path().display());
            remove_if_exists(&entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
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

/// The records section of a compressed batch, decompressed.
pub(crate) fn decompress_records(b: &[u8], codec: Compression) -> Result<Vec<u8>, String> {
    let mut src = Bytes::copy_from_slice(&b[BATCH_HEADER_BYTES..]);
    let take = |r: &mut Bytes| Ok(r.to_vec());
    let out = match codec {
        Compression::None => return Ok(src.to_vec()),
        Compression::Gzip => Gzip::decompress(&mut src, take),
        Compression::Snappy => Snappy::decompress(&mut src, take),
        Compression::Lz4 => Lz4::decompress(&mut src, take),
        Compression::Zstd => Zstd::decompress(&mut src, take),
        Compression::Unknown(n) => return Err(format!("unknown compression codec {n}")),
    };
    out.map_err(|e| format!("cannot decompress a {codec:?} batch: {e:#}"))
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
/// CRC-checked (blocking). Returns the bytes read. A bad batch is an error:
/// the cleaner never rewrites what it cannot read whole.
fn for_each_batch(path: &Path, limit_bytes: u64, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
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
        f(&buf)?;
        pos += size as u64;
    }
    Ok(pos)
}

// ---------------------------------------------------------------------------
// Key map

/// Key -> offset of its latest record, over the records the cleaner can see.
#[derive(Debug, Default)]
pub struct KeyMap {
    pub latest: HashMap<Vec<u8>, Offset>,
    /// Batches kept unread (transactional or of an unknown codec): while
    /// there are any, tombstones are never dropped.
    pub opaque_batches: u64,
}

impl KeyMap {
    pub fn add_batch(&mut self, b: &[u8]) -> Result<(), String> {
        let h = BatchHeader::parse(b).map_err(|e| e.to_string())?;
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
            match self.latest.get_mut(key) {
                Some(o) => *o = (*o).max(r.offset),
                None => {
                    self.latest.insert(key.to_vec(), r.offset);
                }
            }
        }
        Ok(())
    }

    /// Whether `r` stays: keyless records and the latest of each key do,
    /// tombstones only while `keep_tombstones`.
    fn keeps(&self, r: &Record<'_>, keep_tombstones: bool) -> bool {
        let Some(key) = r.key else { return true };
        let latest = self.latest.get(key).is_none_or(|o| *o <= r.offset);
        latest && (r.value.is_some() || keep_tombstones)
    }
}

/// Builds the key map from `sources` (path, bytes to read), in offset order (blocking).
pub fn build_key_map(sources: &[(PathBuf, u64)]) -> io::Result<(KeyMap, u64)> {
    let mut map = KeyMap::default();
    let mut read = 0;
    for (path, bytes) in sources {
        read += for_each_batch(path, *bytes, |b| {
            map.add_batch(b).map_err(|e| invalid(format!("{}: {e}", path.display())))
        })?;
    }
    Ok((map, read))
}

// ---------------------------------------------------------------------------
// Segment rewrite

/// The outcome of rewriting one segment into its `.log.cleaned`.
#[derive(Debug, Default)]
pub struct Rewritten {
    /// Whether anything was removed (else no `.log.cleaned` is left behind).
    pub changed: bool,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_before: u64,
    pub records_removed: u64,
    pub tombstones_kept: u64,
    pub batches_after: u64,
    pub index: SegmentIndex,
    pub max_timestamp_ms: i64,
}

/// Writes `<path>.cleaned` with the records of the segment at `path`
/// (`base`, first `bytes`) that `map` keeps, synced, and builds its index
/// (blocking). When nothing would be removed the file is not kept.
pub fn rewrite_segment(
    path: &Path,
    base: Offset,
    bytes: u64,
    map: &KeyMap,
    keep_tombstones: bool,
    index_interval_bytes: u64,
) -> io::Result<Rewritten> {
    let cleaned = cleaned_path(path);
    let file = std::fs::File::create(&cleaned)?;
    let mut w = BufWriter::with_capacity(READ_BUFFER_BYTES, file);
    let mut out = Rewritten { max_timestamp_ms: -1, ..Default::default() };
    let mut since_index = u64::MAX;
    let mut emit = |b: &[u8], out: &mut Rewritten, w: &mut BufWriter<std::fs::File>| -> io::Result<()> {
        let h = BatchHeader::parse(b).map_err(|e| invalid(e.to_string()))?;
        let relative = (h.base_offset().0 - base.0) as u32;
        if since_index >= index_interval_bytes {
            out.index.offsets.push(IndexEntry { relative_offset: relative, position: out.bytes_after as u32 });
            since_index = 0;
        }
        if h.max_timestamp_ms() > out.max_timestamp_ms {
            out.max_timestamp_ms = h.max_timestamp_ms();
            out.index.times.push(TimeEntry { timestamp_ms: h.max_timestamp_ms(), relative_offset: relative });
        }
        since_index += b.len() as u64;
        out.bytes_after += b.len() as u64;
        out.batches_after += 1;
        w.write_all(b)
    };
    out.bytes_before = for_each_batch(path, bytes, |b| {
        let h = BatchHeader::parse(b).map_err(|e| invalid(e.to_string()))?;
        let count = h.record_count().max(0) as u64;
        out.records_before += count;
        if !is_readable(&h) {
            return emit(b, &mut out, &mut w);
        }
        let plain = plain_view(b).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let records = parse_records(&plain).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let kept: Vec<&[u8]> = records.iter().filter(|r| map.keeps(r, keep_tombstones)).map(|r| r.raw).collect();
        out.tombstones_kept +=
            records.iter().filter(|r| r.value.is_none() && map.keeps(r, keep_tombstones)).count() as u64;
        let removed = (records.len() - kept.len()) as u64;
        out.records_removed += removed;
        if removed == 0 {
            emit(b, &mut out, &mut w)
        } else if kept.is_empty() && h.producer_id().0 < 0 {
            Ok(())
        } else {
            emit(&rebuild_batch(b, &kept), &mut out, &mut w)
        }
    })?;
    out.changed = out.records_removed > 0;
    let file = w.into_inner().map_err(|e| e.into_error())?;
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
    IndexRemoved,
    Renamed,
    Indexed,
}

/// Steps 2-4 of the swap protocol (blocking), up to and including `until`.
pub fn install_cleaned(path: &Path, index: &SegmentIndex, until: SwapStep) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let (ip, tp) = (path.with_extension("index"), path.with_extension("timeindex"));
    remove_if_exists(&ip)?;
    remove_if_exists(&tp)?;
    sync_dir(dir)?;
    if until == SwapStep::IndexRemoved {
        return Ok(());
    }
    std::fs::rename(cleaned_path(path), path)?;
    sync_dir(dir)?;
    if until == SwapStep::Renamed {
        return Ok(());
    }
    write_synced(&tp, &index.encode_times())?;
    write_synced(&ip, &index.encode_offsets())?;
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
    /// `log.cleaner.min.cleanable.ratio`: dirty share of the cleanable bytes that starts a pass.
    pub min_cleanable_ratio: f64,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanStats {
    pub segments_cleaned: u64,
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

/// Whether a pass is worth running: enough dirty bytes, or tombstones due.
pub fn worth_cleaning(segments: &[SegmentInfo], cp: &Checkpoint, p: &CleanParams) -> bool {
    let total: u64 = segments.iter().map(|s| s.bytes).sum();
    let dirty: u64 = segments.iter().filter(|s| !cp.contains_key(&s.base_offset.0)).map(|s| s.bytes).sum();
    let due =
        segments.iter().filter_map(|s| cp.get(&s.base_offset.0)).any(|c| c.tombstones > 0 && tombstones_due(c, p));
    (dirty > 0 && dirty as f64 >= p.min_cleanable_ratio * total as f64) || due
}

async fn pace(bytes: u64, bytes_per_second: u64) {
    if bytes_per_second > 0 && bytes > 0 {
        let us = (bytes as u128 * 1_000_000 / bytes_per_second as u128).min(60_000_000) as u64;
        glommio::timer::sleep(Duration::from_micros(us)).await;
    }
}

fn segment_present(log: &SharedLog, base: Offset) -> bool {
    log.borrow().inactive_segments().iter().any(|s| s.base_offset == base && s.sealed)
}

/// One compaction pass over `log`, if it is worth it. `stopping` is checked
/// between segments. `Ok(None)` when there was nothing to do.
pub async fn clean_log(
    log: &SharedLog,
    p: &CleanParams,
    stopping: &dyn Fn() -> bool,
) -> io::Result<Option<CleanStats>> {
    let (name, dir, index_interval_bytes, inactive, active, high_watermark, truncations) = {
        let l = log.borrow();
        (
            format!("{}-{}", l.topic, l.partition.0),
            l.dir.clone(),
            l.settings.segment.index_interval_bytes,
            l.inactive_segments(),
            l.active_segment_info(),
            l.high_watermark,
            l.truncations,
        )
    };
    // As Kafka: nothing at or above the high watermark is cleaned (a
    // replicated log's tail may still be truncated).
    let mut segments = cleanable(&inactive, &active, p.now_ms, p.min_compaction_lag_ms);
    segments.retain(|s| s.next_offset <= high_watermark);
    if segments.is_empty() {
        return Ok(None);
    }
    let d = dir.clone();
    let mut cp = glommio::executor().spawn_blocking(move || read_checkpoint(&d)).await;
    // Segments deleted by retention or DeleteRecords are forgotten.
    cp.retain(|base, _| inactive.iter().any(|s| s.base_offset.0 == *base));
    if !worth_cleaning(&segments, &cp, p) {
        return Ok(None);
    }
    let first = segments.first().map(|s| s.base_offset.0).unwrap_or(0);
    let end = segments.last().map(|s| s.next_offset.0).unwrap_or(0);
    log::info!(
        "{name}: compaction started: offsets {first}..{end} in {} segment(s) ({} bytes)",
        segments.len(),
        segments.iter().map(|s| s.bytes).sum::<u64>()
    );
    // Every segment with its file and size known: the sealed ones, then the
    // active one's durable part. A segment still waiting for its flush and
    // seal ends the list (missing newer keys only means keeping more).
    let sealed = inactive.iter().take_while(|s| s.sealed);
    let mut sources: Vec<(PathBuf, u64)> =
        sealed.map(|s| (super::segment::log_path(&dir, s.base_offset), s.bytes)).collect();
    if active.bytes > 0 && sources.len() == inactive.len() {
        sources.push((super::segment::log_path(&dir, active.base_offset), active.bytes));
    }
    let (map, read) = glommio::executor().spawn_blocking(move || build_key_map(&sources)).await?;
    let map = Arc::new(map);
    let mut stats = CleanStats { bytes_read: read, ..Default::default() };
    pace(read, p.io_max_bytes_per_second).await;
    let tombstones_expirable = map.opaque_batches == 0;
    for s in &segments {
        if stopping() {
            break;
        }
        let base = s.base_offset;
        let path = super::segment::log_path(&dir, base);
        let previous = cp.get(&base.0).copied();
        let keep_tombstones = !(tombstones_expirable && previous.is_some_and(|c| tombstones_due(&c, p)));
        let (m, pth, bytes) = (map.clone(), path.clone(), s.bytes);
        let r = glommio::executor()
            .spawn_blocking(move || rewrite_segment(&pth, base, bytes, &m, keep_tombstones, index_interval_bytes))
            .await?;
        stats.bytes_read += r.bytes_before;
        pace(r.bytes_before + if r.changed { r.bytes_after } else { 0 }, p.io_max_bytes_per_second).await;
        if r.changed {
            if !install(log, &path, base, &r, truncations).await? {
                continue;
            }
            stats.segments_cleaned += 1;
            stats.records_removed += r.records_removed;
            stats.bytes_written += r.bytes_after;
            stats.bytes_reclaimed += r.bytes_before.saturating_sub(r.bytes_after);
            log::info!(
                "{name}: compacted segment {} (offsets {}..{}): {} -> {} bytes, {} of {} records removed, \
                 {} tombstone(s) kept",
                base.0,
                base.0,
                s.next_offset.0,
                r.bytes_before,
                r.bytes_after,
                r.records_removed,
                r.records_before,
                r.tombstones_kept
            );
        }
        let first_cleaned_at_ms = previous.map(|c| c.first_cleaned_at_ms).unwrap_or(p.now_ms);
        cp.insert(base.0, CleanedSegment { first_cleaned_at_ms, tombstones: r.tombstones_kept });
        glommio::yield_if_needed().await;
    }
    let d = dir.clone();
    glommio::executor().spawn_blocking(move || write_checkpoint(&d, &cp)).await?;
    Ok(Some(stats))
}

/// Swaps the segment at `base` for its written `.log.cleaned`, on disk then
/// in memory. `false` (and nothing left behind) when the segment went away,
/// or when the log was truncated since the pass started (`truncations` was
/// its count then): the key map may hold records the truncation removed.
/// Holds the log's cleaner lock, so no truncation runs meanwhile.
async fn install(log: &SharedLog, path: &Path, base: Offset, r: &Rewritten, truncations: u64) -> io::Result<bool> {
    let cleaned = cleaned_path(path);
    let lock = log.borrow().cleaner_lock.clone();
    let _cleaner = lock.lock().await;
    // Fetches must keep reading the old inode: pin a read fd to it first.
    let p = path.to_path_buf();
    let old = glommio::executor().spawn_blocking(move || super::segment::open_reader(&p)).await?;
    log.borrow_mut().set_reader_if_none(base, Arc::new(old));
    if !segment_present(log, base) || log.borrow().truncations != truncations {
        glommio::executor().spawn_blocking(move || remove_if_exists(&cleaned)).await?;
        return Ok(false);
    }
    let (p, index) =
        (path.to_path_buf(), SegmentIndex { offsets: r.index.offsets.clone(), times: r.index.times.clone() });
    glommio::executor().spawn_blocking(move || install_cleaned(&p, &index, SwapStep::Indexed)).await?;
    let file = Rc::new(super::segment::open_rw(path, false).await?);
    let index = SegmentIndex { offsets: r.index.offsets.clone(), times: r.index.times.clone() };
    if !log.borrow_mut().swap_cleaned_segment(base, file, r.bytes_after, index, r.max_timestamp_ms) {
        // Deleted (retention, DeleteRecords) while we renamed: do not resurrect it.
        let p = path.to_path_buf();
        glommio::executor()
            .spawn_blocking(move || -> io::Result<()> {
                remove_if_exists(&p.with_extension("index"))?;
                remove_if_exists(&p.with_extension("timeindex"))?;
                remove_if_exists(&p)
            })
            .await?;
        return Ok(false);
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
            min_cleanable_ratio: shard.config.cleaner_min_cleanable_ratio,
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
