//! Durable Raft storage of a voter: the metadata log, the vote, the committed
//! pointer, and the state machine (the `ClusterImage`) with its snapshot.
//!
//! Runs on the `controller` thread only (openraft calls it from its core task
//! on the current-thread runtime). File I/O is plain blocking `std::fs`: the
//! metadata log sees a handful of writes a second and the controller thread
//! does nothing else worth overlapping with an fsync.
//!
//! Files under `QuorumConfig::dir`:
//!
//! ```text
//! raft.log        append-only frames, one log entry each, oldest first:
//!                 +------------+--------------+---------------------------+
//!                 | len: u32 BE| crc32c: u32 BE| entry: serde_json, len bytes|
//!                 +------------+--------------+---------------------------+
//!                 appended and fdatasync'd before openraft hears "flushed";
//!                 a truncation (conflicting suffix) is set_len + fsync; a
//!                 purge (prefix covered by the snapshot) rewrites the file
//!                 atomically (raft.log.tmp, fsync, rename, fsync dir).
//! vote.json       the last vote            } each written atomically:
//! purged.json     the last purged log id   } tmp file, fsync, rename,
//!                                            fsync dir
//! committed.json  the last committed log id: tmp file and rename, no fsync
//!                 (written on every commit; it is only a lower bound that
//!                 lets a restart re-apply without a leader, so a stale or
//!                 unreadable one after a crash is ignored)
//! snapshot.json   {meta, image}: the ClusterImage at meta.last_log_id
//! ```
//!
//! On open, a tail frame that is short, fails its CRC or does not decode is
//! cut (with a log line): it was being written when the process stopped, so
//! it was never acknowledged. A bad frame followed by good ones, a gap in the
//! indexes, or a cut that would lose committed entries is corruption, and
//! `open` refuses with a message saying what to do.
//!
//! The state machine is the image in memory, rebuilt on start from
//! `snapshot.json` plus openraft re-applying the committed log; every apply
//! publishes the new image on the `watch` channel the handles read.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::image::{ApplyResult, ClusterImage, MetadataCommand};

openraft::declare_raft_types!(
    /// openraft's types for the metadata log.
    pub TypeConfig:
        D = MetadataCommand,
        R = ApplyResult,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = ClusterImage,
);

pub type NodeId = u64;
pub type RaftEntry = Entry<TypeConfig>;
type StoreResult<T> = Result<T, StorageError<NodeId>>;

const LOG_FILE: &str = "raft.log";
const VOTE_FILE: &str = "vote.json";
const COMMITTED_FILE: &str = "committed.json";
const PURGED_FILE: &str = "purged.json";
const SNAPSHOT_FILE: &str = "snapshot.json";

/// Frame header: length and CRC32C of the payload, both big-endian u32.
const FRAME_HEADER_BYTES: usize = 8;
/// Largest log entry accepted when reading the file back (a metadata command
/// is far smaller; a larger length is garbage from a torn write).
const ENTRY_BYTES_MAX: usize = 64 << 20;

/// Writes `bytes` to `dir/name` so that after a crash the file holds either
/// the old or the new content: tmp file, fsync, rename, fsync of the dir.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Replaces `dir/name` by rename, without fsync: after a crash the file may
/// hold the old content, the new, or nothing readable.
fn write_replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, dir.join(name))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a JSON file written by `write_atomic`; None when absent.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "corrupt metadata file {}: {e}. It is written atomically, so this is damage on disk: restore the \
                 directory from a backup, or (only while the other controller voters are healthy) remove it to \
                 rejoin the quorum from the leader",
                path.display()
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}; check the permissions of the metadata directory", path.display())),
    }
}

fn encode_frame(entry: &RaftEntry, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let payload = serde_json::to_vec(entry)?;
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Why the frame at some offset could not be read.
#[derive(Debug, PartialEq, Eq)]
enum FrameError {
    /// The file ends inside the frame.
    Short,
    /// The declared length is beyond any entry we write.
    TooLong(usize),
    BadCrc,
    Undecodable(String),
}

/// Decodes the frame at `bytes[pos..]`: the entry and the frame's length.
fn decode_frame(bytes: &[u8], pos: usize) -> Result<(RaftEntry, usize), FrameError> {
    let rest = &bytes[pos..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Short);
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len > ENTRY_BYTES_MAX {
        return Err(FrameError::TooLong(len));
    }
    let Some(payload) = rest.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
        return Err(FrameError::Short);
    };
    if crc32c::crc32c(payload) != crc {
        return Err(FrameError::BadCrc);
    }
    let entry = serde_json::from_slice(payload).map_err(|e| FrameError::Undecodable(e.to_string()))?;
    Ok((entry, FRAME_HEADER_BYTES + len))
}

/// Whether `bytes[pos..]` starts with at least one well-formed frame.
fn good_frame_at(bytes: &[u8], pos: usize) -> bool {
    pos < bytes.len() && decode_frame(bytes, pos).is_ok()
}

/// What `scan_log` read back from raft.log.
struct LogScan {
    /// index -> (entry, byte offset of its frame).
    entries: BTreeMap<u64, (RaftEntry, u64)>,
    /// Where the good frames end: the file is cut here when `torn_tail`.
    end_bytes: usize,
    /// Why the frame at `end_bytes` was not read (a torn append).
    torn_tail: Option<String>,
}

/// Reads the frames of raft.log (pure: the file's bytes in, no I/O). A bad
/// frame at the end is a torn tail (`LogScan::torn_tail`); a bad frame with
/// a good one after it, or a gap in the indexes, is corruption:
/// `Err((byte offset, why))`.
fn scan_log(bytes: &[u8]) -> Result<LogScan, (usize, String)> {
    let mut entries = BTreeMap::new();
    let mut pos = 0usize;
    let mut prev_index: Option<u64> = None;
    while pos < bytes.len() {
        match decode_frame(bytes, pos) {
            Ok((entry, len)) => {
                let index = entry.log_id.index;
                if let Some(prev) = prev_index {
                    if prev.checked_add(1) != Some(index) {
                        return Err((pos, format!("entry {index} follows entry {prev}")));
                    }
                }
                prev_index = Some(index);
                entries.insert(index, (entry, pos as u64));
                pos += len;
            }
            Err(why) => {
                // A bad frame with good frames after it is damage, not a torn append.
                let next = match &why {
                    FrameError::BadCrc | FrameError::Undecodable(_) => {
                        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
                        Some(pos + FRAME_HEADER_BYTES + len as usize)
                    }
                    FrameError::Short | FrameError::TooLong(_) => None,
                };
                if next.is_some_and(|n| good_frame_at(bytes, n)) {
                    return Err((pos, format!("{why:?} in the middle of the log")));
                }
                return Ok(LogScan { entries, end_bytes: pos, torn_tail: Some(format!("{why:?}")) });
            }
        }
    }
    Ok(LogScan { entries, end_bytes: pos.min(bytes.len()), torn_tail: None })
}

/// What the metadata log scanner made of a raft.log image: entries read,
/// where the good frames end, whether a torn tail would be cut. For the
/// fuzzer (fuzz/) and tools; `LogStore::open` runs the same scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataLogScan {
    pub entries: usize,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    pub end_bytes: usize,
    pub torn_tail: bool,
}

/// Scans a raft.log image as `LogStore::open` does; `Err` says why the log
/// would be refused as corrupt.
pub fn scan_metadata_log(bytes: &[u8]) -> Result<MetadataLogScan, String> {
    let scan = scan_log(bytes).map_err(|(pos, why)| format!("at byte {pos}: {why}"))?;
    Ok(MetadataLogScan {
        entries: scan.entries.len(),
        first_index: scan.entries.keys().next().copied(),
        last_index: scan.entries.keys().next_back().copied(),
        end_bytes: scan.end_bytes,
        torn_tail: scan.torn_tail.is_some(),
    })
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

// ---------------------------------------------------------------------------
// The log
// ---------------------------------------------------------------------------

struct LogInner {
    node_id: u32,
    dir: PathBuf,
    file: File,
    /// index -> (entry, byte offset of its frame in raft.log).
    entries: BTreeMap<u64, (RaftEntry, u64)>,
    /// Length of raft.log (the offset of the next frame).
    end_offset: u64,
    /// Purged as openraft sees it (entries up to here are gone from `entries`).
    last_purged: Option<LogId<NodeId>>,
    /// Purged on disk: purged.json and raft.log agree up to here.
    purged_on_disk: Option<u64>,
    /// 1 + the index of the snapshot on disk (0: none), set by the state
    /// machine once snapshot.json is durable. The log is purged on disk only
    /// up to it, so a crash between a purge and the snapshot write that
    /// covers it never leaves entries that exist nowhere.
    snapshot_on_disk: Arc<AtomicU64>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

/// The durable metadata log and vote. Cheap to clone (openraft's log readers
/// are clones).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// Opens (creating when absent) the log under `dir` and reads it back.
    /// The error says what is wrong and what to do.
    /// `snapshot_on_disk` is shared with the `StateMachine` (see `LogInner`).
    pub fn open(dir: &Path, node_id: u32, snapshot_on_disk: Arc<AtomicU64>) -> Result<LogStore, String> {
        fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create the metadata log directory {}: {e}; check log.dirs and the permissions of its parent",
                dir.display()
            )
        })?;
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(|e| {
            format!("cannot open {} for writing: {e}; the metadata log directory must be writable", path.display())
        })?;
        let last_purged: Option<LogId<NodeId>> = read_json(&dir.join(PURGED_FILE))?;
        let vote: Option<Vote<NodeId>> = read_json(&dir.join(VOTE_FILE))?;
        let committed: Option<LogId<NodeId>> = read_json(&dir.join(COMMITTED_FILE)).unwrap_or_else(|e| {
            log::warn!("controller: node {node_id}: ignoring the committed pointer: {e}");
            None
        });
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;

        let LogScan { mut entries, end_bytes, torn_tail } =
            scan_log(&bytes).map_err(|(pos, why)| corrupt(&path, pos, &why))?;
        let mut cut = false;
        if let Some(why) = torn_tail {
            log::warn!(
                "controller: node {node_id}: cutting the torn tail of {} at byte {end_bytes} of {} ({why}) after \
                 entry {}; it was never acknowledged",
                path.display(),
                bytes.len(),
                entries.keys().next_back().map_or("none".to_string(), |i| i.to_string()),
            );
            file.set_len(end_bytes as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot cut the torn tail of {}: {e}", path.display()))?;
            cut = true;
        }
        let end_offset = end_bytes as u64;

        // Entries the snapshot covers may survive a crash between writing
        // purged.json and rewriting the log; they are dropped here.
        if let Some(purged) = &last_purged {
            entries.retain(|&index, _| index > purged.index);
        }
        let mut committed = committed;
        if let Some(c) = committed {
            let last = entries.values().next_back().map(|(e, _)| e.log_id).or(last_purged);
            let behind = match last {
                Some(last) => last.index < c.index,
                None => true,
            };
            if behind && !cut {
                // Saved while a leader's snapshot was being installed, which a
                // crash interrupted: the snapshot was never acknowledged, and
                // a lower committed pointer is always safe.
                log::warn!(
                    "controller: node {node_id}: committed index {} is past the stored log ({:?}); an interrupted \
                     snapshot install, starting from the log",
                    c.index,
                    last.map(|l| l.index)
                );
                committed = last;
            } else if behind {
                return Err(format!(
                    "corrupt metadata log {}: it ends at entry {last:?} but entry {} was committed; restore the \
                     directory from a backup, or (only while the other controller voters are healthy) remove it to \
                     rejoin the quorum from the leader",
                    path.display(),
                    c.index
                ));
            }
        }
        log::info!(
            "controller: node {node_id}: opened metadata log {} with {} entries ({:?}..={:?}), purged up to {:?}, \
             committed {:?}",
            path.display(),
            entries.len(),
            entries.keys().next(),
            entries.keys().next_back(),
            last_purged.as_ref().map(|p| p.index),
            committed.as_ref().map(|c| c.index),
        );
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                node_id,
                dir: dir.to_path_buf(),
                file,
                entries,
                end_offset,
                purged_on_disk: last_purged.map(|p| p.index),
                last_purged,
                snapshot_on_disk,
                vote,
                committed,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding this lock leaves nothing half-written that
        // the data below does not already describe; keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn corrupt(path: &Path, pos: usize, why: &str) -> String {
    format!(
        "corrupt metadata log {} at byte {pos}: {why}; restore the directory from a backup, or (only while the \
         other controller voters are healthy) remove it to rejoin the quorum from the leader",
        path.display()
    )
}

impl LogInner {
    /// Appends `entries` and fdatasyncs them; they are readable on return.
    #[allow(clippy::result_large_err)] // openraft's error type
    fn append(&mut self, entries: Vec<RaftEntry>) -> StoreResult<()> {
        self.purge_on_disk()?;
        let mut buf = Vec::new();
        let mut staged = Vec::with_capacity(entries.len());
        for entry in entries {
            let offset = self.end_offset + buf.len() as u64;
            encode_frame(&entry, &mut buf).map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            staged.push((entry, offset));
        }
        let (Some(first), Some(last)) = (staged.first(), staged.last()) else { return Ok(()) };
        let (first, last) = (first.0.log_id.index, last.0.log_id.index);
        let expected = self.entries.keys().next_back().copied().or(self.last_purged.map(|p| p.index)).map(|i| i + 1);
        if expected.is_some_and(|e| e != first) || last + 1 - first != staged.len() as u64 {
            // A hole would make the file unreadable at the next start.
            log::error!(
                "controller: node {}: refusing to append entries {first}..={last} ({} of them) after entry {:?}",
                self.node_id,
                staged.len(),
                expected.map(|e| e - 1)
            );
            let e = io::Error::other(format!("append of {first}..={last} would leave a hole after {expected:?}"));
            return Err(StorageIOError::write_logs(&e).into());
        }
        let written = self.file.write_all(&buf).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            log::error!(
                "controller: node {}: cannot append entries {first}..={last} to the metadata log: {e}",
                self.node_id
            );
            // Drop a partial frame so that a later append does not follow garbage.
            let _ = self.file.set_len(self.end_offset);
            return Err(StorageIOError::write_logs(&e).into());
        }
        self.end_offset += buf.len() as u64;
        for (entry, offset) in staged {
            self.entries.insert(entry.log_id.index, (entry, offset));
        }
        Ok(())
    }

    /// Makes the purge openraft asked for durable, as far as the snapshot on
    /// disk covers it: purged.json first, then the log rewritten without
    /// the purged prefix.
    #[allow(clippy::result_large_err)] // openraft's error type
    fn purge_on_disk(&mut self) -> StoreResult<()> {
        let Some(purged) = self.last_purged else { return Ok(()) };
        let covered = self.snapshot_on_disk.load(Ordering::Acquire);
        if self.purged_on_disk.is_some_and(|p| p >= purged.index) || covered <= purged.index {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&purged).map_err(|e| StorageIOError::write(&e))?;
        let result = write_atomic(&self.dir, PURGED_FILE, &bytes).and_then(|()| self.rewrite());
        if let Err(e) = result {
            log::error!("controller: node {}: cannot purge the metadata log up to {}: {e}", self.node_id, purged.index);
            return Err(StorageIOError::write_logs(&e).into());
        }
        self.purged_on_disk = Some(purged.index);
        log::info!(
            "controller: node {}: purged the metadata log up to index {} ({} entries left)",
            self.node_id,
            purged.index,
            self.entries.len()
        );
        Ok(())
    }

    fn rewrite(&mut self) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut offsets = Vec::with_capacity(self.entries.len());
        for (index, (entry, _)) in &self.entries {
            offsets.push((*index, buf.len() as u64));
            encode_frame(entry, &mut buf).map_err(io_err)?;
        }
        write_atomic(&self.dir, LOG_FILE, &buf)?;
        self.file = OpenOptions::new().read(true).append(true).open(self.dir.join(LOG_FILE))?;
        for (index, offset) in offsets {
            if let Some(slot) = self.entries.get_mut(&index) {
                slot.1 = offset;
            }
        }
        self.end_offset = buf.len() as u64;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<RaftEntry>> {
        Ok(self.lock().entries.range(range).map(|(_, (e, _))| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let inner = self.lock();
        let last = inner.entries.values().next_back().map(|(e, _)| e.log_id).or(inner.last_purged);
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let mut inner = self.lock();
        let bytes = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        write_atomic(&inner.dir, VOTE_FILE, &bytes).map_err(|e| {
            log::error!("controller: node {}: cannot save the vote {vote}: {e}", inner.node_id);
            StorageIOError::write_vote(&e)
        })?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        let mut inner = self.lock();
        if inner.committed == committed {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&e))?;
        write_replace(&inner.dir, COMMITTED_FILE, &bytes).map_err(|e| {
            log::error!("controller: node {}: cannot save the committed log id: {e}", inner.node_id);
            StorageIOError::write(&e)
        })?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        self.lock().append(entries.into_iter().collect())?;
        // Called only once the entries are on disk (sync_data returned).
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let mut inner = self.lock();
        let Some(&(_, offset)) = inner.entries.get(&log_id.index) else {
            return Ok(());
        };
        log::info!(
            "controller: node {}: truncating the metadata log from index {} (conflicting suffix, {} entries)",
            inner.node_id,
            log_id.index,
            inner.entries.range(log_id.index..).count()
        );
        let cut = inner.file.set_len(offset).and_then(|()| inner.file.sync_all());
        if let Err(e) = cut {
            log::error!("controller: node {}: cannot truncate the metadata log: {e}", inner.node_id);
            return Err(StorageIOError::write_logs(&e).into());
        }
        inner.end_offset = offset;
        inner.entries.retain(|&index, _| index < log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let mut inner = self.lock();
        if inner.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        inner.last_purged = Some(log_id);
        inner.entries.retain(|&index, _| index > log_id.index);
        inner.purge_on_disk()
    }
}

// ---------------------------------------------------------------------------
// The state machine
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    image: ClusterImage,
}

struct SmInner {
    node_id: u32,
    dir: PathBuf,
    image: Arc<ClusterImage>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Arc<ClusterImage>)>,
    /// Snapshots built by this process, for unique snapshot ids.
    snapshots_built: u64,
    /// Shared with the `LogStore`: 1 + the index of the snapshot on disk.
    snapshot_on_disk: Arc<AtomicU64>,
}

/// The state machine: the cluster image, published on `images` after every
/// applied batch. Cheap to clone (the snapshot builder is a clone).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
    images: Arc<watch::Sender<Arc<ClusterImage>>>,
}

impl StateMachine {
    /// Loads the snapshot under `dir` (when there is one) and publishes its
    /// image; openraft then re-applies the committed log after it.
    pub fn open(
        dir: &Path,
        node_id: u32,
        images: Arc<watch::Sender<Arc<ClusterImage>>>,
        snapshot_on_disk: Arc<AtomicU64>,
    ) -> Result<Self, String> {
        let snapshot: Option<SnapshotFile> = read_json(&dir.join(SNAPSHOT_FILE))?;
        let (image, last_applied, membership, snapshot) = match snapshot {
            Some(s) => {
                let image = Arc::new(s.image);
                log::info!(
                    "controller: node {node_id}: loaded snapshot at index {:?} ({} topics, {} nodes)",
                    s.meta.last_log_id.map(|l| l.index),
                    image.topics.len(),
                    image.nodes.len()
                );
                (image.clone(), s.meta.last_log_id, s.meta.last_membership.clone(), Some((s.meta, image)))
            }
            None => (Arc::new(ClusterImage::default()), None, StoredMembership::default(), None),
        };
        if let Some(index) = last_applied.map(|l| l.index) {
            snapshot_on_disk.fetch_max(index + 1, Ordering::AcqRel);
        }
        images.send_replace(image.clone());
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(SmInner {
                node_id,
                dir: dir.to_path_buf(),
                image,
                last_applied,
                membership,
                snapshot,
                snapshots_built: 0,
                snapshot_on_disk,
            })),
            images,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SmInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[allow(clippy::result_large_err)] // openraft's error type
    fn save_snapshot(inner: &SmInner, meta: &SnapshotMeta<NodeId, BasicNode>, image: &ClusterImage) -> StoreResult<()> {
        let file = SnapshotFile { meta: meta.clone(), image: image.clone() };
        let bytes =
            serde_json::to_vec(&file).map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        write_atomic(&inner.dir, SNAPSHOT_FILE, &bytes).map_err(|e| {
            log::error!("controller: node {}: cannot write the snapshot {}: {e}", inner.node_id, meta.snapshot_id);
            StorageIOError::write_snapshot(Some(meta.signature()), &e)
        })?;
        if let Some(last) = meta.last_log_id {
            inner.snapshot_on_disk.fetch_max(last.index + 1, Ordering::AcqRel);
        }
        Ok(())
    }
}

fn describe(cmd: &MetadataCommand) -> String {
    match cmd {
        MetadataCommand::InitCluster { cluster_id } => format!("InitCluster {cluster_id}"),
        MetadataCommand::RegisterNode(r) => format!("RegisterNode {} (incarnation {})", r.node_id, r.incarnation),
        MetadataCommand::FenceNode { node_id } => format!("FenceNode {node_id}"),
        MetadataCommand::UnfenceNode { node_id } => format!("UnfenceNode {node_id}"),
        MetadataCommand::CreateTopics(t) => {
            format!("CreateTopics {:?}", t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>())
        }
        MetadataCommand::DeleteTopics(names) => format!("DeleteTopics {names:?}"),
        MetadataCommand::CreatePartitions { topic, count } => format!("CreatePartitions {topic} to {count}"),
        MetadataCommand::SetTopicConfigs { topic, .. } => format!("SetTopicConfigs {topic}"),
        MetadataCommand::SetBrokerConfigs(_) => "SetBrokerConfigs".to_string(),
        MetadataCommand::AlterPartition { topic, partition, isr, .. } => {
            format!("AlterPartition {topic}-{partition} isr {isr:?}")
        }
        MetadataCommand::ElectLeaders { election, partitions } => format!("ElectLeaders {election:?} {partitions:?}"),
        MetadataCommand::AlterReassignments(entries) => format!(
            "AlterReassignments {:?}",
            entries.iter().map(|r| (r.topic.as_str(), r.partition, r.target.as_deref())).collect::<Vec<_>>()
        ),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let mut inner = self.lock();
        inner.snapshots_built += 1;
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
            None => format!("--{}", inner.snapshots_built),
        };
        let meta =
            SnapshotMeta { last_log_id: inner.last_applied, last_membership: inner.membership.clone(), snapshot_id };
        let image = inner.image.clone();
        Self::save_snapshot(&inner, &meta, &image)?;
        log::info!(
            "controller: node {}: snapshot at index {:?} written",
            inner.node_id,
            meta.last_log_id.map(|l| l.index)
        );
        inner.snapshot = Some((meta.clone(), image.clone()));
        Ok(Snapshot { meta, snapshot: Box::new((*image).clone()) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.lock();
        let node_id = inner.node_id;
        let mut image = inner.image.as_ref().clone();
        let mut results = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {
                    image.version = index;
                    results.push(Vec::new());
                }
                EntryPayload::Normal(cmd) => {
                    let result = image.apply(index, &cmd);
                    let refused: Vec<_> = result.iter().filter(|(_, r)| r.is_err()).collect();
                    if matches!(cmd, MetadataCommand::AlterPartition { .. }) {
                        log::debug!("controller: node {node_id} applied index {index}: {} {refused:?}", describe(&cmd));
                    } else {
                        log::info!("controller: node {node_id} applied index {index}: {} {refused:?}", describe(&cmd));
                    }
                    results.push(result);
                }
                EntryPayload::Membership(m) => {
                    image.version = index;
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    results.push(Vec::new());
                }
            }
        }
        let image = Arc::new(image);
        inner.image = image.clone();
        drop(inner);
        self.images.send_replace(image);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<ClusterImage>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<ClusterImage>,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        let image = Arc::new(*snapshot);
        Self::save_snapshot(&inner, meta, &image)?;
        log::info!(
            "controller: node {}: installed the leader's snapshot at index {:?}",
            inner.node_id,
            meta.last_log_id.map(|l| l.index)
        );
        inner.image = image.clone();
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), image.clone()));
        drop(inner);
        self.images.send_replace(image);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let inner = self.lock();
        Ok(inner
            .snapshot
            .as_ref()
            .map(|(meta, image)| Snapshot { meta: meta.clone(), snapshot: Box::new((**image).clone()) }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    /// A fresh directory on disk (not tmpfs) for one test, under the
    /// workspace's target/test-data/quorum (or `TIDELOG_TEST_DIR`), as the
    /// engine's tests do: `cargo clean` removes them, nothing is left in /var/tmp.
    pub(crate) fn test_dir(name: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let root = std::env::var_os("TIDELOG_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-data"));
        let dir = root.join("quorum").join(format!("{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64) -> RaftEntry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(MetadataCommand::DeleteTopics(vec![format!("t{index}")])),
        }
    }

    fn append(store: &LogStore, range: std::ops::RangeInclusive<u64>) {
        store.lock().append(range.map(|i| entry(1, i)).collect()).unwrap();
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        store.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id.index).collect()
    }

    fn frame_offsets(dir: &Path) -> Vec<usize> {
        let bytes = fs::read(dir.join(LOG_FILE)).unwrap();
        let mut offsets = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            offsets.push(pos);
            let (_, len) = decode_frame(&bytes, pos).unwrap();
            pos += len;
        }
        offsets
    }

    #[tokio::test]
    async fn entries_and_vote_survive_reopen() {
        let dir = test_dir("reopen");
        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        append(&store, 1..=5);
        let vote = Vote::new(3, 2);
        store.save_vote(&vote).await.unwrap();
        store.save_committed(Some(log_id(1, 4))).await.unwrap();
        drop(store);

        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert_eq!(indexes(&mut store).await, vec![1, 2, 3, 4, 5]);
        let entries = store.try_get_log_entries(2..4).await.unwrap();
        assert_eq!(entries, vec![entry(1, 2), entry(1, 3)]);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 4)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (None, Some(log_id(1, 5))));
    }

    #[tokio::test]
    async fn torn_tail_is_cut_and_appends_continue() {
        let dir = test_dir("torn");
        let store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        append(&store, 1..=3);
        drop(store);
        let good_len = fs::metadata(dir.join(LOG_FILE)).unwrap().len();
        // A frame header announcing 100 bytes followed by only 10 of them.
        let mut f = OpenOptions::new().append(true).open(dir.join(LOG_FILE)).unwrap();
        f.write_all(&100u32.to_be_bytes()).unwrap();
        f.write_all(&0u32.to_be_bytes()).unwrap();
        f.write_all(b"{\"log_id\":").unwrap();
        drop(f);

        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert_eq!(indexes(&mut store).await, vec![1, 2, 3]);
        assert_eq!(fs::metadata(dir.join(LOG_FILE)).unwrap().len(), good_len, "the torn bytes are gone from disk");
        append(&store, 4..=4);
        drop(store);
        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert_eq!(indexes(&mut store).await, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn crc_bad_last_entry_is_cut() {
        let dir = test_dir("crc-tail");
        let store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        append(&store, 1..=3);
        drop(store);
        let last = *frame_offsets(&dir).last().unwrap();
        let mut bytes = fs::read(dir.join(LOG_FILE)).unwrap();
        bytes[last + FRAME_HEADER_BYTES + 3] ^= 0x55;
        fs::write(dir.join(LOG_FILE), &bytes).unwrap();

        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert_eq!(indexes(&mut store).await, vec![1, 2]);
        assert_eq!(fs::metadata(dir.join(LOG_FILE)).unwrap().len(), last as u64);
    }

    #[tokio::test]
    async fn crc_bad_entry_in_the_middle_is_corruption() {
        let dir = test_dir("crc-middle");
        let store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        append(&store, 1..=3);
        drop(store);
        let second = frame_offsets(&dir)[1];
        let mut bytes = fs::read(dir.join(LOG_FILE)).unwrap();
        bytes[second + FRAME_HEADER_BYTES + 3] ^= 0x55;
        fs::write(dir.join(LOG_FILE), &bytes).unwrap();

        let err = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).err().unwrap();
        assert!(err.contains("corrupt metadata log"), "{err}");
        assert!(err.contains("remove it to rejoin"), "{err}");
        assert_eq!(fs::read(dir.join(LOG_FILE)).unwrap(), bytes, "a corrupt log is left as it is");
    }

    #[tokio::test]
    async fn truncate_and_purge_are_durable() {
        let dir = test_dir("truncate-purge");
        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        append(&store, 1..=10);
        store.truncate(log_id(1, 7)).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![1, 2, 3, 4, 5, 6]);
        drop(store);

        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert_eq!(indexes(&mut store).await, vec![1, 2, 3, 4, 5, 6]);
        store.purge(log_id(1, 3)).await.unwrap();
        append(&store, 7..=7);
        drop(store);

        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert_eq!(indexes(&mut store).await, vec![4, 5, 6, 7]);
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(1, 3)), Some(log_id(1, 7))));
        // Everything purged: the log state still knows where it ended.
        store.purge(log_id(1, 7)).await.unwrap();
        drop(store);
        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        assert!(indexes(&mut store).await.is_empty());
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(1, 7)), Some(log_id(1, 7))));
    }

    #[tokio::test]
    async fn losing_committed_entries_is_corruption() {
        let dir = test_dir("lost-committed");
        let mut store = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).unwrap();
        append(&store, 1..=5);
        store.save_committed(Some(log_id(1, 5))).await.unwrap();
        drop(store);
        let fourth = frame_offsets(&dir)[3];
        let f = OpenOptions::new().write(true).open(dir.join(LOG_FILE)).unwrap();
        f.set_len(fourth as u64 + 3).unwrap();
        let err = LogStore::open(&dir, 1, Arc::new(AtomicU64::new(u64::MAX))).err().unwrap();
        assert!(err.contains("was committed"), "{err}");
    }

    #[tokio::test]
    async fn purge_reaches_disk_only_once_a_snapshot_covers_it() {
        let dir = test_dir("deferred-purge");
        let snapshot_on_disk = Arc::new(AtomicU64::new(0));
        let mut store = LogStore::open(&dir, 1, snapshot_on_disk.clone()).unwrap();
        append(&store, 1..=10);
        store.purge(log_id(1, 5)).await.unwrap();
        assert_eq!(indexes(&mut store).await, vec![6, 7, 8, 9, 10], "openraft sees the purge at once");
        assert_eq!(store.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(1, 5)));
        assert!(!dir.join(PURGED_FILE).exists(), "no snapshot on disk yet: the entries stay on disk");
        let mut reopened = LogStore::open(&dir, 1, Arc::default()).unwrap();
        assert_eq!(indexes(&mut reopened).await, (1..=10).collect::<Vec<_>>());
        drop(reopened);

        // The snapshot at index 5 is durable: the next write purges the disk too.
        snapshot_on_disk.store(6, Ordering::Release);
        append(&store, 11..=11);
        drop(store);
        let mut store = LogStore::open(&dir, 1, Arc::default()).unwrap();
        assert_eq!(indexes(&mut store).await, vec![6, 7, 8, 9, 10, 11]);
        assert_eq!(store.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(1, 5)));
    }

    #[tokio::test]
    async fn committed_past_an_intact_log_is_lowered() {
        let dir = test_dir("committed-ahead");
        let store = LogStore::open(&dir, 1, Arc::default()).unwrap();
        append(&store, 1..=3);
        drop(store);
        // As left by a crash while installing a leader's snapshot at index 9.
        write_atomic(&dir, COMMITTED_FILE, &serde_json::to_vec(&Some(log_id(2, 9))).unwrap()).unwrap();
        let mut store = LogStore::open(&dir, 1, Arc::default()).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 3)));
        assert_eq!(indexes(&mut store).await, vec![1, 2, 3]);
    }

    #[test]
    fn unwritable_directory_is_reported() {
        let err = LogStore::open(Path::new("/proc/tidelog-quorum-test"), 1, Arc::default()).err().unwrap();
        assert!(err.contains("cannot create the metadata log directory"), "{err}");
    }

    #[tokio::test]
    async fn state_machine_snapshot_survives_reopen() {
        let dir = test_dir("snapshot");
        let (tx, rx) = watch::channel(Arc::new(ClusterImage::default()));
        let tx = Arc::new(tx);
        let mut sm = StateMachine::open(&dir, 1, tx.clone(), Arc::default()).unwrap();
        let register = |i: u64| Entry {
            log_id: log_id(1, i),
            payload: EntryPayload::Normal(MetadataCommand::InitCluster { cluster_id: format!("c{i}") }),
        };
        let results = sm
            .apply(vec![register(1), register(2), Entry { log_id: log_id(1, 3), payload: EntryPayload::Blank }])
            .await
            .unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!(rx.borrow().version, 3);
        assert_eq!(rx.borrow().cluster_id, "c1");
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 3)));
        drop(sm);

        let (tx2, rx2) = watch::channel(Arc::new(ClusterImage::default()));
        let mut sm = StateMachine::open(&dir, 1, Arc::new(tx2), Arc::default()).unwrap();
        assert_eq!(rx2.borrow().version, 3, "the image is published at open");
        assert_eq!(rx2.borrow().cluster_id, "c1");
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 3)));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 3)));
        assert_eq!(current.snapshot.cluster_id, "c1");
    }

    /// Regression (fuzz/metadata_log): an entry after one with index
    /// u64::MAX overflowed `prev + 1` (a panic in debug builds) instead of
    /// being refused as a gap.
    #[test]
    fn index_after_u64_max_is_a_gap_not_an_overflow() {
        let mut bytes = Vec::new();
        encode_frame(&entry(1, u64::MAX), &mut bytes).unwrap();
        let second = bytes.len();
        encode_frame(&entry(1, 0), &mut bytes).unwrap();
        let (pos, why) = scan_log(&bytes).err().expect("a gap");
        assert_eq!(pos, second);
        assert!(why.contains("follows"), "{why}");
    }

    #[test]
    fn scan_reports_a_torn_tail_and_where_good_frames_end() {
        let mut bytes = Vec::new();
        encode_frame(&entry(1, 1), &mut bytes).unwrap();
        let good = bytes.len();
        encode_frame(&entry(1, 2), &mut bytes).unwrap();
        bytes.truncate(bytes.len() - 3);
        let scan = scan_metadata_log(&bytes).unwrap();
        assert_eq!(
            scan,
            MetadataLogScan { entries: 1, first_index: Some(1), last_index: Some(1), end_bytes: good, torn_tail: true }
        );
        assert_eq!(scan_metadata_log(&[]).unwrap().entries, 0);
    }
}
