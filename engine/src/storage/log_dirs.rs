//! The data directories (`log.dirs`) and their health, shared by every shard.
//!
//! ```text
//!   log.dirs = /data/a,/data/b          (the first also holds broker metadata)
//!   ┌────────────────────────┐   ┌────────────────────────┐
//!   │ /data/a   Online       │   │ /data/b   Full (ENOSPC)│
//!   │  orders-0  orders-2    │   │  orders-1  orders-3    │
//!   └────────────────────────┘   └────────────────────────┘
//!        produce: appended          produce: KAFKA_STORAGE_ERROR,
//!                                   fetch: served; back Online once the
//!                                   filesystem has room again
//! ```
//!
//! A new partition goes to the online directory holding the fewest
//! partitions (Kafka's rule); an existing one stays where it is found. A
//! directory leaves `Online` when a write in it fails: ENOSPC or EDQUOT makes
//! it `Full`, which lasts until `recheck_full` sees free space again; any
//! other I/O error makes it `Failed` until the broker restarts, as Kafka
//! does (a disk that returned EIO is not trusted again without an operator).
//! Nothing acknowledged is at risk in either state: an ack waits for the
//! flush that failed, and what was already durable stays as it is.
//!
//! The state is atomics behind an `Arc`: shards read it on every produce and
//! write it only on a transition.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A directory counts as having room again when it has at least this many
/// bytes free (or a twentieth of its size on a small filesystem): enough for
/// the flushes that waited plus a segment's preallocation.
const RESUME_FREE_BYTES: u64 = 64 << 20;

/// Health of one data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
    Online,
    /// Out of space (ENOSPC/EDQUOT): writes wait, produce is refused.
    Full,
    /// An I/O error: offline until restart.
    Failed,
}

impl DirState {
    fn from_u8(v: u8) -> DirState {
        match v {
            0 => DirState::Online,
            1 => DirState::Full,
            _ => DirState::Failed,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            DirState::Online => 0,
            DirState::Full => 1,
            DirState::Failed => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DirState::Online => "online",
            DirState::Full => "full",
            DirState::Failed => "failed",
        }
    }
}

/// What an I/O error means for the directory it happened in.
pub fn classify(e: &io::Error) -> DirState {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => DirState::Full,
        // Our own short-write error: the filesystem took part of a write,
        // which O_DIRECT on ext4/XFS does when it runs out of blocks.
        None if e.kind() == io::ErrorKind::WriteZero || e.kind() == io::ErrorKind::StorageFull => DirState::Full,
        _ => DirState::Failed,
    }
}

struct LogDir {
    path: PathBuf,
    state: AtomicU8,
    /// Partition directories in it (placement counts them).
    partitions: AtomicUsize,
    /// The error that took it offline, for logs and DescribeLogDirs.
    reason: Mutex<String>,
}

/// Every `log.dirs` entry with its state.
pub struct LogDirs {
    dirs: Vec<LogDir>,
}

/// Free and total bytes of a filesystem (statvfs), for DescribeLogDirs and
/// the resume check.
pub fn space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: statvfs writes into the struct we pass; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

/// Whether a directory entry name is a partition directory (`<topic>-<n>`).
fn is_partition_dir(name: &str) -> bool {
    match name.rsplit_once('-') {
        Some((topic, n)) => !topic.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

impl LogDirs {
    /// The directories of `log.dirs`, counting the partitions already in each.
    pub fn new(paths: &[PathBuf]) -> LogDirs {
        let dirs = paths
            .iter()
            .map(|p| {
                let count = std::fs::read_dir(p)
                    .map(|it| {
                        it.flatten()
                            .filter(|e| e.path().is_dir() && is_partition_dir(&e.file_name().to_string_lossy()))
                            .count()
                    })
                    .unwrap_or(0);
                LogDir {
                    path: p.clone(),
                    state: AtomicU8::new(DirState::Online.as_u8()),
                    partitions: AtomicUsize::new(count),
                    reason: Mutex::new(String::new()),
                }
            })
            .collect();
        LogDirs { dirs }
    }

    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.dirs[i].path
    }

    pub fn state(&self, i: usize) -> DirState {
        DirState::from_u8(self.dirs[i].state.load(Ordering::Acquire))
    }

    /// Why directory `i` is offline ("" while online).
    pub fn reason(&self, i: usize) -> String {
        self.dirs[i].reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The directory holding `partition_dir` (a path this module handed out).
    pub fn index_of(&self, partition_dir: &Path) -> Option<usize> {
        let parent = partition_dir.parent()?;
        self.dirs.iter().position(|d| d.path == parent)
    }

    /// The directory that holds partition directory `name`, if any does.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.dirs.iter().position(|d| d.path.join(name).is_dir())
    }

    /// Where partition directory `name` lives: the directory that already has
    /// it, else the online one with the fewest partitions (ties: the first).
    /// `None` when it is new and no directory is online.
    pub fn place(&self, name: &str) -> Option<PathBuf> {
        if let Some(i) = self.find(name) {
            return Some(self.dirs[i].path.join(name));
        }
        let i = (0..self.dirs.len())
            .filter(|&i| self.state(i) == DirState::Online)
            .min_by_key(|&i| self.dirs[i].partitions.load(Ordering::Relaxed))?;
        self.dirs[i].partitions.fetch_add(1, Ordering::Relaxed);
        Some(self.dirs[i].path.join(name))
    }

    /// A partition directory in `i` was deleted.
    pub fn removed(&self, i: usize) {
        let _ = self.dirs[i].partitions.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Records that a write in directory `i` failed with `e`. Returns the
    /// new state when this changed it (the caller logs the transition once);
    /// a Failed directory stays Failed.
    pub fn write_failed(&self, i: usize, e: &io::Error) -> Option<DirState> {
        let to = classify(e);
        let d = &self.dirs[i];
        let from = DirState::from_u8(d.state.load(Ordering::Acquire));
        if from == to || from == DirState::Failed {
            return None;
        }
        if let Ok(mut r) = d.reason.lock() {
            *r = e.to_string();
        }
        d.state.store(to.as_u8(), Ordering::Release);
        Some(to)
    }

    /// Moves every Full directory that has room again back to Online;
    /// returns the ones it moved.
    pub fn recheck_full(&self) -> Vec<usize> {
        let mut back = Vec::new();
        for (i, d) in self.dirs.iter().enumerate() {
            if self.state(i) != DirState::Full {
                continue;
            }
            let Ok((free, total)) = space(&d.path) else { continue };
            if free >= RESUME_FREE_BYTES.min(total / 20) {
                let moved = d
                    .state
                    .compare_exchange(
                        DirState::Full.as_u8(),
                        DirState::Online.as_u8(),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok();
                if moved {
                    if let Ok(mut r) = d.reason.lock() {
                        r.clear();
                    }
                    back.push(i);
                }
            }
        }
        back
    }

    /// Directories not online, as (path, state, reason).
    pub fn offline(&self) -> Vec<(PathBuf, DirState, String)> {
        (0..self.dirs.len())
            .filter(|&i| self.state(i) != DirState::Online)
            .map(|i| (self.dirs[i].path.clone(), self.state(i), self.reason(i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Root(PathBuf);
    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dirs(n: usize) -> (Root, LogDirs) {
        let root = crate::test_dir("log-dirs");
        let paths: Vec<PathBuf> = (0..n).map(|i| root.join(format!("d{i}"))).collect();
        for p in &paths {
            std::fs::create_dir_all(p).unwrap();
        }
        let d = LogDirs::new(&paths);
        (Root(root), d)
    }

    #[test]
    fn new_partitions_spread_over_the_least_loaded_online_dir() {
        let (_root, d) = dirs(2);
        std::fs::create_dir_all(d.path(0).join("a-0")).unwrap();
        let d = LogDirs::new(&[d.path(0).to_path_buf(), d.path(1).to_path_buf()]);
        // d0 holds one already: the next two go to d1 then either (tie -> first).
        assert_eq!(d.place("b-0").unwrap(), d.path(1).join("b-0"));
        assert_eq!(d.place("b-1").unwrap(), d.path(0).join("b-1"));
        // An existing partition stays where it is.
        assert_eq!(d.place("a-0").unwrap(), d.path(0).join("a-0"));
        // A full dir gets nothing new.
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(d.write_failed(0, &full), Some(DirState::Full));
        assert_eq!(d.place("c-0").unwrap(), d.path(1).join("c-0"));
        assert_eq!(d.place("c-1").unwrap(), d.path(1).join("c-1"));
        assert_eq!(d.index_of(&d.path(1).join("c-1")), Some(1));
        assert_eq!(d.index_of(Path::new("/elsewhere/c-1")), None);
    }

    #[test]
    fn errors_classify_and_failed_is_final() {
        let (_root, d) = dirs(1);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EDQUOT)), DirState::Full);
        assert_eq!(classify(&io::Error::new(io::ErrorKind::WriteZero, "short write")), DirState::Full);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EIO)), DirState::Failed);
        let eio = io::Error::from_raw_os_error(libc::EIO);
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(d.write_failed(0, &full), Some(DirState::Full));
        assert_eq!(d.write_failed(0, &full), None, "no second transition");
        assert_eq!(d.write_failed(0, &eio), Some(DirState::Failed));
        assert_eq!(d.write_failed(0, &full), None, "Failed stays Failed");
        assert!(d.recheck_full().is_empty());
        assert_eq!(d.state(0), DirState::Failed);
        assert_eq!(d.offline().len(), 1);
        assert!(d.place("x-0").is_none(), "nothing online");
    }

    #[test]
    fn full_dir_with_room_comes_back() {
        let (_root, d) = dirs(1);
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        d.write_failed(0, &full);
        // The temp dir's filesystem has room (the test machine is not full).
        assert_eq!(d.recheck_full(), vec![0]);
        assert_eq!(d.state(0), DirState::Online);
        assert_eq!(d.reason(0), "");
    }

    #[test]
    fn partition_dir_names() {
        assert!(is_partition_dir("orders-0"));
        assert!(is_partition_dir("my-topic-12"));
        assert!(!is_partition_dir("orders-0.abc-delete"));
        assert!(!is_partition_dir("__cluster_metadata"));
        assert!(!is_partition_dir("-1"));
    }
}
