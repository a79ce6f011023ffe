//! Start-up checks of the data dir, run on the main thread before any shard
//! starts: filesystem type (O_DIRECT required), a real O_DIRECT write, and the
//! lock file that stops two brokers from sharing one dir.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A one-block file kept in the data dir (see `storage::prime_io_probe`).
pub const IO_PROBE_FILE: &str = ".io_probe";

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const NFS_MAGIC: i64 = 0x6969;
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;
const XFS_MAGIC: i64 = 0x5846_5342;
const EXT4_MAGIC: i64 = 0xEF53;
const BTRFS_MAGIC: i64 = 0x9123_683E;

/// The filesystem a path lives on, as far as tidelog cares.
pub fn filesystem_name(path: &Path) -> io::Result<&'static str> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match st.f_type as i64 {
        TMPFS_MAGIC => "tmpfs",
        RAMFS_MAGIC => "ramfs",
        NFS_MAGIC => "nfs",
        OVERLAYFS_MAGIC => "overlay",
        XFS_MAGIC => "xfs",
        EXT4_MAGIC => "ext4",
        BTRFS_MAGIC => "btrfs",
        _ => "other",
    })
}

/// Creates the data dir if needed and checks it can hold segments.
pub fn check_data_dir(dir: &Path) -> Result<&'static str, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create log.dirs {}: {e}; check the path and permissions", dir.display()))?;
    let fs = filesystem_name(dir).map_err(|e| format!("cannot statfs log.dirs {}: {e}", dir.display()))?;
    if fs == "tmpfs" || fs == "ramfs" {
        return Err(format!(
            "log.dirs {} is on {fs}, which has no O_DIRECT; tidelog writes segments with O_DIRECT and requires \
             a disk filesystem. Put log.dirs on XFS (recommended) or ext4, e.g. --log.dirs=/var/lib/tidelog",
            dir.display()
        ));
    }
    probe_o_direct(dir).map_err(|e| {
        format!(
            "log.dirs {} ({fs}) does not support O_DIRECT writes: {e}. tidelog requires O_DIRECT: use XFS \
             (recommended) or ext4 (see linux-only.md)",
            dir.display()
        )
    })?;
    if fs != "xfs" && fs != "ext4" {
        log::warn!("log.dirs {} is on {fs}; XFS is recommended, ext4 is supported", dir.display());
    }
    Ok(fs)
}

/// Writes and syncs one aligned block with O_DIRECT, then removes the file.
fn probe_o_direct(dir: &Path) -> io::Result<()> {
    let path = dir.join(".o_direct_probe");
    let result = (|| {
        let f = OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(&path)?;
        let layout = std::alloc::Layout::from_size_align(4096, 4096).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: layout is non-zero sized; the buffer is freed below on every path.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        if buf.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "probe buffer"));
        }
        // SAFETY: buf is a valid 4096-byte, 4096-aligned allocation.
        let rc = unsafe { libc::pwrite(f.as_raw_fd(), buf as *const libc::c_void, 4096, 0) };
        let err = io::Error::last_os_error();
        // SAFETY: allocated above with the same layout.
        unsafe { std::alloc::dealloc(buf, layout) };
        if rc != 4096 {
            return Err(err);
        }
        f.sync_data()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Holds an exclusive `flock` on `<dir>/.lock` for the life of the process.
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

pub fn lock_data_dir(dir: &Path) -> Result<DirLock, String> {
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    // SAFETY: flock on a valid fd we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!(
                "log.dirs {} is in use by another tidelog process (lock {} is held); stop it or use another log.dirs",
                dir.display(),
                path.display()
            )
        } else {
            format!("cannot lock {}: {e}", path.display())
        });
    }
    let _ = file.set_len(0);
    let _ = std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes());
    Ok(DirLock { _file: file, path })
}

/// Raises RLIMIT_MEMLOCK to at least `needed_bytes` if the hard limit allows.
/// Returns the soft limit in force afterwards.
pub fn ensure_memlock(needed_bytes: u64) -> Result<u64, String> {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(format!("getrlimit(RLIMIT_MEMLOCK): {}", io::Error::last_os_error()));
    }
    if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= needed_bytes {
        return Ok(lim.rlim_cur);
    }
    let want = libc::rlimit {
        rlim_cur: needed_bytes,
        rlim_max: if lim.rlim_max == libc::RLIM_INFINITY { lim.rlim_max } else { lim.rlim_max.max(needed_bytes) },
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) } == 0 {
        return Ok(needed_bytes);
    }
    Err(format!(
        "RLIMIT_MEMLOCK is {} bytes but the shards need {needed_bytes} (num.shards x (io.memory.bytes + 512 KiB)), \
         and raising it failed: {}. Fix: `ulimit -l unlimited` (or LimitMEMLOCK=infinity in the systemd unit, \
         --ulimit memlock=-1 in docker), or lower io.memory.bytes / num.shards",
        lim.rlim_cur,
        io::Error::last_os_error()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_a_clear_message() {
        let dir = crate::test_dir("lock");
        let first = lock_data_dir(&dir).unwrap();
        let err = lock_data_dir(&dir).err().unwrap();
        assert!(err.contains("in use by another tidelog process"), "{err}");
        drop(first);
        assert!(lock_data_dir(&dir).is_ok());
    }

    #[test]
    fn test_dir_supports_o_direct() {
        let dir = crate::test_dir("odirect");
        let fs = check_data_dir(&dir).unwrap();
        assert!(["xfs", "ext4", "btrfs", "other"].contains(&fs), "{fs}");
    }
}
