//! The log start offset of a partition: its durable checkpoint and the one
//! operation that moves it (`truncate_prefix`), shared by DeleteRecords and
//! retention.
//!
//! Shard-local: runs on the shard that owns the log. The checkpoint is one
//! file per partition, `<partition dir>/log-start-offset`, holding the offset
//! in decimal; it is replaced atomically (write temp, fdatasync, rename,
//! fsync dir) on the blocking pool, never on the shard thread.
//!
//! Order of a prefix truncation, so that a crash at any point is safe:
//! 1. the new log start offset is set in memory (reads below it now get
//!    OFFSET_OUT_OF_RANGE) and written to the checkpoint, durably;
//! 2. the segments wholly below it are dropped from the log;
//! 3. their files are deleted.
//!
//! A crash after 1 leaves old segment files behind: on open, `restore` reads
//! the checkpoint and runs 2-3 again. A crash before 1 completes leaves the
//! old start offset, as if the request never happened (it was not answered).
//! Without a checkpoint the log starts at its first segment's base offset.

use std::io;
use std::path::{Path, PathBuf};

use tidelog_protocol::Offset;

use super::partition::SharedLog;

pub const CHECKPOINT_FILE: &str = "log-start-offset";

fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// Reads the checkpoint (blocking). `None` when there is none.
pub fn read(dir: &Path) -> io::Result<Option<Offset>> {
    match std::fs::read_to_string(checkpoint_path(dir)) {
        Ok(s) => s.trim().parse::<i64>().map(|o| Some(Offset(o))).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", checkpoint_path(dir).display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the checkpoint durably (blocking).
pub fn write(dir: &Path, offset: Offset) -> io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{}\n", offset.0).as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, checkpoint_path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

/// What a prefix truncation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Truncated {
    pub log_start_offset: Offset,
    pub segments_deleted: u64,
    pub bytes_deleted: u64,
}

/// Moves the log start offset of `log` to `offset` (clamped to the high
/// watermark; never backwards), persists it, and deletes the segments wholly
/// below it. `why` names the caller in the log line.
pub async fn truncate_prefix(log: &SharedLog, offset: Offset, why: &str) -> io::Result<Truncated> {
    let (dir, before, after, name) = {
        let mut l = log.borrow_mut();
        let before = l.log_start_offset;
        let after = l.advance_log_start(offset);
        (l.dir.clone(), before, after, format!("{}-{}", l.topic, l.partition.0))
    };
    if after > before {
        let d = dir.clone();
        glommio::executor().spawn_blocking(move || write(&d, after)).await?;
        // The leader epoch cache moved its first entry up with the start.
        super::partition::persist_epochs(log).await?;
    }
    let removed = log.borrow_mut().remove_segments_below(after);
    let mut out = Truncated { log_start_offset: after, ..Default::default() };
    if removed.is_empty() {
        if after > before {
            log::info!("{name}: {why}: log start offset {} -> {}", before.0, after.0);
        }
        return Ok(out);
    }
    out.segments_deleted = removed.len() as u64;
    out.bytes_deleted = removed.iter().map(|(_, b)| *b).sum();
    let first = removed.first().map(|(p, _)| p.display().to_string()).unwrap_or_default();
    let paths: Vec<PathBuf> = removed.into_iter().map(|(p, _)| p).collect();
    glommio::executor()
        .spawn_blocking(move || -> io::Result<()> {
            for p in &paths {
                for ext in ["index", "timeindex"] {
                    match std::fs::remove_file(p.with_extension(ext)) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                match std::fs::remove_file(p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await?;
    log::info!(
        "{name}: {why}: log start offset {} -> {}, deleted {} segment(s) ({} bytes) from {first}",
        before.0,
        after.0,
        out.segments_deleted,
        out.bytes_deleted
    );
    Ok(out)
}

/// On open: applies the checkpointed log start offset and finishes any
/// segment deletion a crash interrupted.
pub async fn restore(log: &SharedLog) -> io::Result<()> {
    let dir = log.borrow().dir.clone();
    let saved = glommio::executor().spawn_blocking(move || read(&dir)).await?;
    if let Some(offset) = saved {
        truncate_prefix(log, offset, "restored checkpoint").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_roundtrip_and_missing() {
        let dir = crate::test_dir("checkpoint");
        assert_eq!(read(&dir).unwrap(), None);
        write(&dir, Offset(42)).unwrap();
        assert_eq!(read(&dir).unwrap(), Some(Offset(42)));
        write(&dir, Offset(7_000_000_000)).unwrap();
        assert_eq!(read(&dir).unwrap(), Some(Offset(7_000_000_000)));
        std::fs::write(checkpoint_path(&dir), "garbage").unwrap();
        assert!(read(&dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
