//! One segment of a partition log: a file of record batches plus its sparse
//! indexes, and the accumulator state that writes it with O_DIRECT.
//!
//! ```text
//!  <dir>/<base offset, 20 digits>.log
//!  +-----------+-----------+-----+-----------+--------------------------+
//!  | batch v2  | batch v2  | ... | batch v2  | zeros (preallocated)     |
//!  +-----------+-----------+-----+-----------+--------------------------+
//!  0                                durable_bytes ........ end_bytes
//!                                  |<- tail page ->|
//!                            align_down(durable_bytes)
//! ```
//!
//! Batches are stored exactly as received, with the broker's base offset and
//! leader epoch written in. Appends only queue `Bytes` (`pending`); the
//! shard's flusher turns them into 4 KiB-aligned DMA writes starting at the
//! last partial page (kept in `tail_page`, so it is rewritten from memory and
//! never read back), then fdatasyncs. Only then do `durable_bytes` and
//! `durable_next_offset` move, and with them the partition's high watermark.
//!
//! Sealing (after a roll) truncates the preallocated tail, syncs, and only then
//! writes `.index`/`.timeindex`, so an index file on disk means "sealed".

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use tidelog_protocol::batch::{self, BatchHeader, BatchInfo, BATCH_HEADER_BYTES, BATCH_LOG_OVERHEAD_BYTES};
use tidelog_protocol::Offset;

use super::index::{IndexEntry, SegmentIndex, TimeEntry};
use super::{align_down, align_up, PAGE_BYTES};

/// Bytes read per step when scanning a segment on recovery.
const RECOVERY_READ_BYTES: usize = 4 << 20;

pub fn log_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.log", base.0))
}

fn index_path(log: &Path) -> PathBuf {
    log.with_extension("index")
}

fn time_index_path(log: &Path) -> PathBuf {
    log.with_extension("timeindex")
}

/// The index files of the segment whose log is `log`, in the order to
/// delete them: before the log, so a log file is never left with a stale
/// index that says "sealed".
pub fn index_files(log: &Path) -> [PathBuf; 2] {
    [index_path(log), time_index_path(log)]
}

/// A batch appended but not yet durable.
pub struct PendingBatch {
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub bytes: Bytes,
    /// Its bytes counted against the shard's unflushed bound until the batch
    /// is dropped (written and handed to the cache, or cut).
    pub charge: Option<Charge>,
}

/// Record bytes appended and not yet written, over the logs of one shard in
/// one data directory: the accumulator's memory, which the shard bounds by
/// `log.unflushed.max.bytes` (produce waits beyond it). Every pending batch
/// holds a `Charge` against it, so whatever drops the batch (a completed
/// flush, a truncation, a deleted partition) gives its bytes back.
#[derive(Debug, Default)]
pub struct Unflushed {
    bytes: std::cell::Cell<usize>,
}

impl Unflushed {
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    pub fn charge(self: &Rc<Self>, bytes: usize) -> Charge {
        self.bytes.set(self.bytes.get() + bytes);
        Charge { owner: self.clone(), bytes }
    }
}

/// `bytes` counted in `owner` for as long as this lives.
#[derive(Debug)]
pub struct Charge {
    owner: Rc<Unflushed>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.owner.bytes.set(self.owner.bytes.get().saturating_sub(self.bytes));
    }
}

/// Tunables a segment needs, from the broker and topic config.
#[derive(Clone, Copy, Debug)]
pub struct SegmentSettings {
    pub index_interval_bytes: u64,
    pub preallocate_bytes: u64,
    /// `log.zero.ahead.bytes`: how far past the log end small flush rounds
    /// keep the file written with zeros (see `Segment::plan_flush`).
    pub zero_ahead_bytes: u64,
    pub segment_bytes: u64,
    /// `segment.index.bytes`: the offset index's bound (8 bytes an entry);
    /// a segment whose index is full rolls, as in Kafka.
    pub index_bytes_max: u64,
    pub flush_write_bytes_max: usize,
}

pub struct Segment {
    pub base_offset: Offset,
    pub path: PathBuf,
    pub file: Option<Rc<DmaFile>>,
    /// The same file opened `O_DSYNC`, for flush rounds of one write: that
    /// write is then durable when it completes, one io_uring operation
    /// instead of a write and an fdatasync (see `partition::flush`). Opened
    /// on first use, closed when the segment is sealed.
    pub dsync_file: Option<Rc<DmaFile>>,
    /// A buffered read-only fd for zero-copy (sendfile) fetches, opened on first use.
    pub reader: Option<Arc<std::fs::File>>,
    /// Bytes appended, durable or not.
    pub end_bytes: u64,
    pub durable_bytes: u64,
    pub next_offset: Offset,
    pub durable_next_offset: Offset,
    /// Bytes `[align_down(durable_bytes), durable_bytes)`: the partial last page.
    tail_page: Vec<u8>,
    pub pending: VecDeque<PendingBatch>,
    pub index: SegmentIndex,
    bytes_since_index: u64,
    pub max_timestamp_ms: i64,
    pub created_at_ms: i64,
    preallocated_bytes: u64,
    /// File bytes `[0, zeroed_bytes)` are written blocks (data or zeros),
    /// as far as this segment knows: where the next zero-ahead write starts.
    /// Only a hint: zeros are never written below the log's end, so a wrong
    /// value costs a redundant or a skipped zero write, never data.
    zeroed_bytes: u64,
    pub seal_requested: bool,
    pub sealed: bool,
}

/// The writes of one flush of one segment, prepared while borrowed and
/// executed without holding any borrow.
pub struct FlushPlan {
    pub file: Rc<DmaFile>,
    pub writes: Vec<(u64, DmaBuffer)>,
    pub preallocate_to: Option<u64>,
    /// Zeros to write past the data, `(position, buffer)`, beside the data
    /// writes: the next rounds then overwrite written blocks.
    pub zero: Option<(u64, Rc<DmaBuffer>)>,
    /// Where the zeros ended, set by the flusher once they are written.
    pub zeroed_to: Option<u64>,
    pub end_bytes: u64,
    pub next_offset: Offset,
    pub batches: usize,
    pub new_tail_page: Vec<u8>,
}

/// What recovery found in a segment.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub batches: usize,
    pub valid_bytes: u64,
    pub file_bytes: u64,
    /// Non-zero bytes after the last valid batch (a torn or corrupt tail).
    pub damaged_tail: bool,
}

/// Opens the buffered read fd that cold fetches `sendfile` from (blocking:
/// call it on a blocking thread). Kernel readahead is turned off on it
/// (POSIX_FADV_RANDOM): the send threads ask for exactly the readahead they
/// want (`fetch.readahead.bytes`), so the disk reads a catch-up consumer
/// queues in front of the shards' writes and fdatasyncs stay bounded, where
/// the kernel's own sequential readahead would grow to `read_ahead_kb` per
/// stream on its own.
///
/// Opened with O_NOATIME where the file system allows it (the broker owns its
/// files, so it does): under `relatime`, the first read after a write (every
/// cold read of an active segment) would otherwise update atime, a journal
/// transaction started from a low-priority send thread that the shards'
/// fdatasyncs could end up waiting for.
pub fn open_reader(path: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOATIME).open(path) {
        Ok(f) => f,
        // EPERM: the file belongs to another user (a data dir copied in as root).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => std::fs::File::open(path)?,
        Err(e) => return Err(e),
    };
    // SAFETY: advisory call on the fd we just opened.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    Ok(f)
}

pub async fn open_rw(path: &Path, create: bool) -> io::Result<DmaFile> {
    OpenOptions::new().read(true).write(true).create(create).dma_open(path).await.map_err(io::Error::from)
}

/// Opens an existing segment file for `O_DIRECT | O_DSYNC` writes: each
/// write returns once its data, and the metadata needed to read it back,
/// are on stable storage (what write + fdatasync gives).
pub async fn open_dsync(path: &Path) -> io::Result<DmaFile> {
    OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).dma_open(path).await.map_err(io::Error::from)
}

impl Segment {
    /// A new, empty segment; its file is created by the flusher on first write.
    pub fn new(dir: &Path, base_offset: Offset, now_ms: i64) -> Segment {
        Segment {
            base_offset,
            path: log_path(dir, base_offset),
            file: None,
            dsync_file: None,
            reader: None,
            end_bytes: 0,
            durable_bytes: 0,
            next_offset: base_offset,
            durable_next_offset: base_offset,
            tail_page: Vec::new(),
            pending: VecDeque::new(),
            index: SegmentIndex::default(),
            bytes_since_index: u64::MAX,
            max_timestamp_ms: -1,
            created_at_ms: now_ms,
            preallocated_bytes: 0,
            zeroed_bytes: 0,
            seal_requested: false,
            sealed: false,
        }
    }

    /// Queues a batch whose offsets are already assigned.
    pub fn append(&mut self, bytes: Bytes, info: &BatchInfo, settings: &SegmentSettings, charge: Option<Charge>) {
        debug_assert!(!self.seal_requested, "append to sealing segment {}", self.path.display());
        let base = self.next_offset;
        let last = Offset(base.0 + info.last_offset_delta as i64);
        let position = self.end_bytes;
        let relative = (base.0 - self.base_offset.0) as u32;
        if self.bytes_since_index >= settings.index_interval_bytes {
            self.index.offsets.push(IndexEntry { relative_offset: relative, position: position as u32 });
            self.bytes_since_index = 0;
        }
        if info.max_timestamp_ms > self.max_timestamp_ms {
            self.max_timestamp_ms = info.max_timestamp_ms;
            self.index.times.push(TimeEntry { timestamp_ms: info.max_timestamp_ms, relative_offset: relative });
        }
        self.bytes_since_index += info.size_bytes as u64;
        self.end_bytes += info.size_bytes as u64;
        self.next_offset = last.next();
        self.pending.push_back(PendingBatch { base_offset: base, last_offset: last, bytes, charge });
    }

    /// Whether a batch of `size_bytes` would push this segment past its size
    /// limit (an empty segment always takes it).
    pub fn is_full_for(&self, size_bytes: usize, settings: &SegmentSettings) -> bool {
        let index_full = (self.index.offsets.len() as u64 + 1) * 8 > settings.index_bytes_max;
        self.end_bytes > 0 && (self.end_bytes + size_bytes as u64 > settings.segment_bytes || index_full)
    }

    pub fn needs_flush(&self) -> bool {
        !self.pending.is_empty() || (self.seal_requested && !self.sealed)
    }

    /// Builds the DMA writes for everything pending: the tail page, then each
    /// pending batch, copied once into aligned buffers of at most
    /// `flush_write_bytes_max`, the last one zero-padded to a page.
    pub fn plan_flush(&self, file: Rc<DmaFile>, settings: &SegmentSettings) -> Option<FlushPlan> {
        if self.pending.is_empty() {
            return None;
        }
        let start = align_down(self.durable_bytes);
        let end = self.end_bytes;
        let total = align_up(end) - start;
        let chunk_max = align_down(settings.flush_write_bytes_max.max(PAGE_BYTES as usize) as u64).max(PAGE_BYTES);
        let mut writes = Vec::with_capacity((total / chunk_max + 1) as usize);
        let mut pieces = std::iter::once(self.tail_page.as_slice())
            .chain(self.pending.iter().map(|p| p.bytes.as_ref()))
            .filter(|s| !s.is_empty());
        let mut current: &[u8] = pieces.next().unwrap_or(&[]);
        let mut pos = start;
        while pos < start + total {
            let len = chunk_max.min(start + total - pos) as usize;
            let mut buf = file.alloc_dma_buffer(len);
            let dst = buf.as_bytes_mut();
            let mut filled = 0;
            while filled < len {
                if current.is_empty() {
                    match pieces.next() {
                        Some(next) => current = next,
                        None => break,
                    }
                }
                let n = current.len().min(len - filled);
                dst[filled..filled + n].copy_from_slice(&current[..n]);
                current = &current[n..];
                filled += n;
            }
            dst[filled..].fill(0);
            writes.push((pos, buf));
            pos += len as u64;
        }
        let new_tail_start = align_down(end);
        let mut new_tail_page = Vec::with_capacity((end - new_tail_start) as usize);
        if end > new_tail_start {
            // The new tail page is the start of the last write buffer.
            if let Some((last_pos, last_buf)) = writes.last() {
                let from = (new_tail_start - last_pos) as usize;
                new_tail_page.extend_from_slice(&last_buf.as_bytes()[from..from + (end - new_tail_start) as usize]);
            }
        }
        let preallocate_to = if settings.preallocate_bytes > 0 && align_up(end) > self.preallocated_bytes {
            Some(align_up(end + settings.preallocate_bytes).min(align_up(settings.segment_bytes.max(end))))
        } else {
            None
        };
        let zero = self.plan_zero_ahead(&file, start + total, end - self.durable_bytes, settings);
        Some(FlushPlan {
            file,
            writes,
            preallocate_to,
            zero,
            zeroed_to: None,
            end_bytes: end,
            next_offset: self.next_offset,
            batches: self.pending.len(),
            new_tail_page,
        })
    }

    /// Zero-ahead: a small round (new bytes under a sixteenth of
    /// `zero_ahead_bytes`, the latency-bound case) that finds fewer than
    /// half of `zero_ahead_bytes` written past its data also writes the next
    /// half of `zero_ahead_bytes` with zeros. An O_DIRECT write into a
    /// preallocated (unwritten) extent needs the extent converted at
    /// completion, which ext4 and XFS refuse to do under io_uring's
    /// non-blocking attempt, so the write goes to an io-wq worker thread
    /// (and the O_DSYNC/fdatasync after it commits the journal); into
    /// written blocks it is a plain overwrite, issued inline. Large rounds
    /// (bandwidth-bound) skip it: the zeros would cost device bandwidth for
    /// a hop that is small next to their writes. The zeros start at or past
    /// `data_end`, the page after this round's data, so they never cover a
    /// byte of the log, and they need no sync: the conversion they cause is
    /// metadata the next round's O_DSYNC write or fdatasync makes durable
    /// with its data, as it must for any data it reads back. Every write is
    /// the same size, so the shard writes them all from one shared zeroed
    /// buffer (`shared_zeros`) instead of filling a new one each time.
    fn plan_zero_ahead(
        &self,
        file: &DmaFile,
        data_end: u64,
        round_bytes: u64,
        settings: &SegmentSettings,
    ) -> Option<(u64, Rc<DmaBuffer>)> {
        let ahead = align_up(settings.zero_ahead_bytes);
        if ahead == 0 || round_bytes >= ahead / 16 {
            return None;
        }
        let from = self.zeroed_bytes.max(data_end);
        let chunk = align_up(ahead / 2);
        if from - data_end >= chunk {
            return None;
        }
        let to = (from + chunk).min(align_up(settings.segment_bytes.max(data_end)));
        if to <= from {
            return None;
        }
        let len = (to - from) as usize;
        Some((from, shared_zeros(file, len, len as u64 == chunk)))
    }

    /// Records a completed flush; returns the batches that became durable.
    pub fn complete_flush(&mut self, plan: FlushPlan) -> Vec<PendingBatch> {
        debug_assert!(plan.end_bytes >= self.durable_bytes && plan.end_bytes <= self.end_bytes);
        self.zeroed_bytes = self.zeroed_bytes.max(align_up(plan.end_bytes));
        if let Some(to) = plan.zeroed_to {
            self.zeroed_bytes = self.zeroed_bytes.max(to);
        }
        self.durable_bytes = plan.end_bytes;
        self.durable_next_offset = plan.next_offset;
        self.tail_page = plan.new_tail_page;
        if let Some(p) = plan.preallocate_to {
            self.preallocated_bytes = self.preallocated_bytes.max(p);
        }
        self.pending.drain(..plan.batches).collect()
    }

    /// Truncation, in memory: forgets everything from byte `position` on (a
    /// batch boundary, or the end), after which the log ends at
    /// `next_offset`; the segment becomes active and unsealed again. When
    /// the cut is inside the durable part, `tail_page` holds the file's bytes
    /// `[align_down(position), position)`; otherwise it is ignored. The
    /// caller then cuts the file at the new `durable_bytes`, which also
    /// drops anything a failed flush wrote past it.
    pub fn cut(&mut self, position: u64, next_offset: Offset, tail_page: Vec<u8>) {
        assert!(
            position <= self.end_bytes && next_offset >= self.base_offset,
            "{}: cut at position {position} offset {} outside {} bytes from offset {}",
            self.path.display(),
            next_offset.0,
            self.end_bytes,
            self.base_offset.0
        );
        if position < self.durable_bytes {
            assert_eq!(
                tail_page.len() as u64,
                position - align_down(position),
                "{}: tail page for a cut at {position}",
                self.path.display()
            );
            self.pending.clear();
            self.durable_bytes = position;
            self.tail_page = tail_page;
        } else {
            let mut at = self.durable_bytes;
            let keep = self
                .pending
                .iter()
                .take_while(|p| {
                    at += p.bytes.len() as u64;
                    at <= position
                })
                .count();
            self.pending.truncate(keep);
        }
        self.end_bytes = position;
        self.next_offset = next_offset;
        self.durable_next_offset = self.durable_next_offset.min(next_offset);
        self.preallocated_bytes = self.durable_bytes;
        self.zeroed_bytes = align_down(self.durable_bytes);
        let relative = (next_offset.0 - self.base_offset.0).clamp(0, u32::MAX as i64) as u32;
        self.index.truncate(relative, position);
        self.max_timestamp_ms = self.index.times.last().map(|t| t.timestamp_ms).unwrap_or(-1);
        // The next append starts a new index entry, at `position`.
        self.bytes_since_index = u64::MAX;
        self.seal_requested = false;
        self.sealed = false;
    }

    /// Truncates away preallocation, syncs, then writes the index files.
    pub async fn seal(&mut self) -> io::Result<()> {
        if let Some(f) = self.dsync_file.take() {
            drop(f);
        }
        if let Some(file) = &self.file {
            file.truncate(self.durable_bytes).await.map_err(io::Error::from)?;
            file.fdatasync().await.map_err(io::Error::from)?;
        }
        let offsets = self.index.encode_offsets();
        let times = self.index.encode_times();
        let (ip, tp) = (index_path(&self.path), time_index_path(&self.path));
        glommio::executor()
            .spawn_blocking(move || -> io::Result<()> {
                write_synced(&tp, &times)?;
                write_synced(&ip, &offsets)
            })
            .await?;
        self.sealed = true;
        Ok(())
    }

    /// Opens an existing segment. A sealed segment that is not the last is
    /// trusted up to its file size (its successor's base offset gives its
    /// end); anything else is scanned batch by batch, CRC checked, and
    /// truncated after the last valid batch.
    pub async fn open(
        path: &Path,
        base_offset: Offset,
        next_base: Option<Offset>,
        settings: &SegmentSettings,
        now_ms: i64,
    ) -> io::Result<(Segment, RecoveryReport)> {
        let file = open_rw(path, false).await?;
        let file_bytes = file.file_size().await.map_err(io::Error::from)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut seg = Segment::new(dir, base_offset, now_ms);
        seg.path = path.to_path_buf();
        let mut report = RecoveryReport { file_bytes, ..Default::default() };
        if let Some(next_base) = next_base {
            if let Some(index) = load_index(path, file_bytes).await {
                seg.end_bytes = file_bytes;
                seg.durable_bytes = file_bytes;
                seg.next_offset = next_base;
                seg.durable_next_offset = next_base;
                seg.max_timestamp_ms = index.times.last().map(|t| t.timestamp_ms).unwrap_or(-1);
                seg.index = index;
                seg.sealed = true;
                seg.seal_requested = true;
                seg.file = Some(Rc::new(file));
                report.valid_bytes = file_bytes;
                return Ok((seg, report));
            }
        }
        // Reopened as active (or unsealed): its index files would go stale.
        let (ip, tp) = (index_path(path), time_index_path(path));
        glommio::executor()
            .spawn_blocking(move || {
                let _ = std::fs::remove_file(ip);
                let _ = std::fs::remove_file(tp);
            })
            .await;
        scan(&file, file_bytes, settings.index_interval_bytes, &mut seg, &mut report).await?;
        if report.valid_bytes < file_bytes {
            file.truncate(report.valid_bytes).await.map_err(io::Error::from)?;
            file.fdatasync().await.map_err(io::Error::from)?;
        }
        let tail_start = align_down(report.valid_bytes);
        if report.valid_bytes > tail_start {
            let r =
                file.read_at(tail_start, (report.valid_bytes - tail_start) as usize).await.map_err(io::Error::from)?;
            seg.tail_page = r.to_vec();
        }
        seg.file = Some(Rc::new(file));
        if next_base.is_some() {
            seg.seal_requested = true;
        }
        Ok((seg, report))
    }
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_data()
}

async fn load_index(log: &Path, log_bytes: u64) -> Option<SegmentIndex> {
    let (ip, tp) = (index_path(log), time_index_path(log));
    glommio::executor()
        .spawn_blocking(move || {
            let offsets = std::fs::read(ip).ok()?;
            let times = std::fs::read(tp).ok()?;
            SegmentIndex::decode(&offsets, &times, log_bytes)
        })
        .await
}

/// Consumes the whole valid batches at the start of `avail` (file position
/// `position` onwards) into `seg` and `report`; pure, the core of `scan`.
/// Returns the bytes consumed and whether the next batch is cut off by the
/// end of `avail` (more must be read) rather than invalid (the scan ends).
fn consume_batches(
    avail: &[u8],
    mut position: u64,
    index_interval_bytes: u64,
    seg: &mut Segment,
    report: &mut RecoveryReport,
) -> (usize, bool) {
    let mut cursor = 0;
    loop {
        let avail = &avail[cursor..];
        if avail.len() < BATCH_LOG_OVERHEAD_BYTES {
            return (cursor, true);
        }
        let batch_length = i32::from_be_bytes([avail[8], avail[9], avail[10], avail[11]]);
        if batch_length < (BATCH_HEADER_BYTES - BATCH_LOG_OVERHEAD_BYTES) as i32 {
            return (cursor, false);
        }
        let size = batch_length as usize + BATCH_LOG_OVERHEAD_BYTES;
        if size > avail.len() {
            return (cursor, true);
        }
        let Ok(info) = batch::validate(&avail[..size], usize::MAX) else { return (cursor, false) };
        let Ok(header) = BatchHeader::parse(avail) else { return (cursor, false) };
        let base = header.base_offset();
        if base < seg.next_offset {
            return (cursor, false); // offsets must increase; anything else is garbage
        }
        // A batch whose offsets run past i64::MAX is garbage too (it
        // overflowed here before: fuzz/storage_files).
        let Some(next_offset) = base.0.checked_add(info.last_offset_delta as i64 + 1) else { return (cursor, false) };
        let relative = (base.0 - seg.base_offset.0) as u32;
        if seg.bytes_since_index >= index_interval_bytes {
            seg.index.offsets.push(IndexEntry { relative_offset: relative, position: position as u32 });
            seg.bytes_since_index = 0;
        }
        if info.max_timestamp_ms > seg.max_timestamp_ms {
            seg.max_timestamp_ms = info.max_timestamp_ms;
            seg.index.times.push(TimeEntry { timestamp_ms: info.max_timestamp_ms, relative_offset: relative });
        }
        seg.bytes_since_index += size as u64;
        seg.next_offset = Offset(next_offset);
        cursor += size;
        position += size as u64;
        report.batches += 1;
    }
}

/// Recovery's scan of a whole segment image held in memory (`scan` reads
/// the file in chunks through the same `consume_batches`): the report, the
/// next offset and the index it would rebuild. For the fuzzer (fuzz/).
pub fn scan_image(
    bytes: &[u8],
    base_offset: Offset,
    index_interval_bytes: u64,
) -> (RecoveryReport, Offset, SegmentIndex) {
    let mut seg = Segment::new(Path::new("."), base_offset, 0);
    let mut report = RecoveryReport { file_bytes: bytes.len() as u64, ..Default::default() };
    let (consumed, _) = consume_batches(bytes, 0, index_interval_bytes, &mut seg, &mut report);
    report.valid_bytes = consumed as u64;
    report.damaged_tail = bytes[consumed..].iter().any(|b| *b != 0);
    (report, seg.next_offset, seg.index)
}

/// Scans `file` from the start, filling `seg`'s offsets and index from every
/// valid batch, and stops at the first torn, zeroed or corrupt one.
async fn scan(
    file: &DmaFile,
    file_bytes: u64,
    index_interval_bytes: u64,
    seg: &mut Segment,
    report: &mut RecoveryReport,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_pos: u64 = 0; // file position of buf[0]
    let mut cursor: usize = 0;
    let mut read_pos: u64 = 0;
    loop {
        // Consume every whole batch in the buffer.
        let (consumed, need_more) =
            consume_batches(&buf[cursor..], buf_pos + cursor as u64, index_interval_bytes, seg, report);
        cursor += consumed;
        let valid_end = buf_pos + cursor as u64;
        if !need_more || read_pos >= file_bytes {
            report.valid_bytes = valid_end;
            report.damaged_tail = buf[cursor..].iter().any(|b| *b != 0);
            break;
        }
        // Drop consumed bytes and read the next chunk.
        buf.drain(..cursor);
        buf_pos += cursor as u64;
        cursor = 0;
        let len = RECOVERY_READ_BYTES.min((file_bytes - read_pos) as usize);
        let r = file.read_at(read_pos, len).await.map_err(io::Error::from)?;
        if r.is_empty() {
            read_pos = file_bytes;
            continue;
        }
        buf.extend_from_slice(&r);
        read_pos += r.len() as u64;
    }
    seg.end_bytes = report.valid_bytes;
    seg.durable_bytes = report.valid_bytes;
    seg.durable_next_offset = seg.next_offset;
    seg.preallocated_bytes = report.valid_bytes;
    seg.zeroed_bytes = align_up(report.valid_bytes);
    Ok(())
}

thread_local! {
    /// This shard's zeroed buffer for zero-ahead writes: written from, never
    /// into, so any number of writes in flight share it.
    static ZEROS: std::cell::RefCell<Option<Rc<DmaBuffer>>> = const { std::cell::RefCell::new(None) };
}

/// A zeroed DMA buffer of `len` bytes. The shard keeps the one of the usual
/// size (`usual`: every zero-ahead write but a segment's last) and hands it
/// out again; another size is allocated for the one write.
fn shared_zeros(file: &DmaFile, len: usize, usual: bool) -> Rc<DmaBuffer> {
    let fresh = || {
        let mut buf = file.alloc_dma_buffer(len);
        buf.as_bytes_mut().fill(0);
        Rc::new(buf)
    };
    ZEROS.with(|z| {
        let mut z = z.borrow_mut();
        match z.as_ref() {
            Some(buf) if buf.len() == len => buf.clone(),
            _ if usual => z.insert(fresh()).clone(),
            _ => fresh(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn reading_through_open_reader_leaves_atime_alone() {
        let dir = std::env::temp_dir().join(format!("tidelog-segment-atime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("00000000000000000000.log");
        std::fs::write(&path, vec![5u8; 8192]).unwrap();
        // atime a day before mtime: under relatime (or strictatime) a plain
        // read would move it to now.
        let old = libc::timespec { tv_sec: std::fs::metadata(&path).unwrap().mtime() - 86_400, tv_nsec: 0 };
        let keep = libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid path and two timespecs for the call.
        assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [old, keep].as_ptr(), 0) }, 0);
        let mut buf = Vec::new();
        open_reader(&path).unwrap().read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 8192);
        assert_eq!(std::fs::metadata(&path).unwrap().atime(), old.tv_sec, "open_reader must not update atime");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn batch_at(base: i64, records: usize) -> Vec<u8> {
        let recs: Vec<batch::RecordRef<'_>> = (0..records)
            .map(|_| batch::RecordRef { key: None, value: Some(b"v"), headers: &[], timestamp_delta_ms: 0 })
            .collect();
        let mut b = batch::build_batch(&recs, 1_000, batch::ProducerFields::default()).to_vec();
        b[..8].copy_from_slice(&base.to_be_bytes());
        b
    }

    #[test]
    fn scan_image_reads_batches_and_stops_at_garbage() {
        let mut image = batch_at(100, 3);
        let first = image.len();
        image.extend_from_slice(&batch_at(103, 2));
        let valid = image.len();
        image.extend_from_slice(&[0u8; 100]);
        let (report, next, index) = scan_image(&image, Offset(100), 0);
        assert_eq!((report.batches, report.valid_bytes, report.damaged_tail), (2, valid as u64, false));
        assert_eq!(next, Offset(105));
        assert_eq!(
            index.offsets,
            vec![
                IndexEntry { relative_offset: 0, position: 0 },
                IndexEntry { relative_offset: 3, position: first as u32 }
            ]
        );
        image[valid] = 1;
        assert!(scan_image(&image, Offset(100), 0).0.damaged_tail);
    }

    /// Every pending batch's bytes count in the shard's `Unflushed` until the
    /// batch is dropped, whichever way: flushed (drained), or cut off.
    #[test]
    fn pending_batches_charge_unflushed_until_dropped() {
        let unflushed = Rc::new(Unflushed::default());
        let settings = SegmentSettings {
            index_interval_bytes: 4096,
            preallocate_bytes: 0,
            zero_ahead_bytes: 0,
            segment_bytes: 1 << 20,
            index_bytes_max: 10 << 20,
            flush_write_bytes_max: 1 << 20,
        };
        let mut seg = Segment::new(Path::new("/nonexistent"), Offset(0), 0);
        let mut sizes = Vec::new();
        for records in [3, 5, 2] {
            let bytes = Bytes::from(batch_at(0, records));
            let info = batch::validate(&bytes, usize::MAX).unwrap();
            sizes.push(bytes.len());
            seg.append(bytes.clone(), &info, &settings, Some(unflushed.charge(bytes.len())));
        }
        assert_eq!(unflushed.bytes(), sizes.iter().sum::<usize>());
        // A truncation inside the pending tail gives back what it cuts.
        seg.cut((sizes[0] + sizes[1]) as u64, Offset(8), Vec::new());
        assert_eq!(unflushed.bytes(), sizes[0] + sizes[1]);
        // A flush hands the first batch on (as complete_flush drains it): its
        // bytes are no longer unflushed once it is dropped.
        let flushed: Vec<PendingBatch> = seg.pending.drain(..1).collect();
        assert_eq!(unflushed.bytes(), sizes[0] + sizes[1], "still held by the flushed batch");
        drop(flushed);
        assert_eq!(unflushed.bytes(), sizes[1]);
        drop(seg);
        assert_eq!(unflushed.bytes(), 0);
    }

    /// Regression (fuzz/storage_files): a batch whose last offset is past
    /// i64::MAX overflowed `last_offset().next()`; it ends the scan instead.
    #[test]
    fn scan_image_stops_at_a_batch_whose_offsets_overflow() {
        let mut image = batch_at(0, 1);
        let valid = image.len();
        image.extend_from_slice(&batch_at(i64::MAX - 1, 3));
        let (report, next, _) = scan_image(&image, Offset(0), 4096);
        assert_eq!((report.batches, report.valid_bytes, report.damaged_tail), (1, valid as u64, true));
        assert_eq!(next, Offset(1));
    }
}
