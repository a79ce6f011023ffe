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

/// The high watermark checkpoint of a replicated partition (Kafka's
/// `replication-offset-checkpoint`, kept per partition directory here like
/// the other checkpoints: each partition has exactly one writer, the shard
/// that owns it, with no cross-shard file to share). Written by
/// `replication` every `replica.high.watermark.checkpoint.interval.ms` and
/// at clean shutdown; read when the log opens.
pub const HW_CHECKPOINT_FILE: &str = "replication-offset-checkpoint";

/// Reads an offset checkpoint `name` of `dir` (blocking). `None` when
/// there is none; `InvalidData` when it does not hold one decimal offset.
pub fn read_offset_file(dir: &Path, name: &str) -> io::Result<Option<Offset>> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|s| s.trim().parse::<i64>().map_err(|e| format!("{e} in {s:?}")))
            .map(|o| Some(Offset(o)))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the offset checkpoint `name` of `dir` durably (blocking): temp
/// file, fdatasync, rename, fsync dir, so a crash leaves the old or the new.
pub fn write_offset_file(dir: &Path, name: &str, offset: Offset) -> io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{}\n", offset.0).as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the checkpoint (blocking). `None` when there is none.
pub fn read(dir: &Path) -> io::Result<Option<Offset>> {
    read_offset_file(dir, CHECKPOINT_FILE)
}

/// Writes the checkpoint durably (blocking).
pub fn write(dir: &Path, offset: Offset) -> io::Result<()> {
    write_offset_file(dir, CHECKPOINT_FILE, offset)
}

/// Reads the high watermark checkpoint (blocking). Never fails: a missing
/// file is `Ok(None)`; an unreadable or malformed one is `Err(why)`, which
/// the caller logs and treats as no checkpoint (the safe fallback).
pub fn read_high_watermark(dir: &Path) -> Result<Option<Offset>, String> {
    read_offset_file(dir, HW_CHECKPOINT_FILE).map_err(|e| e.to_string())
}

/// Writes the high watermark checkpoint durably (blocking).
pub fn write_high_watermark(dir: &Path, offset: Offset) -> io::Result<()> {
    write_offset_file(dir, HW_CHECKPOINT_FILE, offset)
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
    // Under the cleaner lock: a compaction swap never sees the segments it
    // merges go away halfway.
    let lock = log.borrow().cleaner_lock.clone();
    let _cleaner = lock.lock().await;
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
        std::fs::write(dir.join(CHECKPOINT_FILE), "garbage").unwrap();
        assert!(read(&dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn high_watermark_checkpoint_roundtrip_missing_and_damaged() {
        let dir = crate::test_dir("hw-checkpoint");
        assert_eq!(read_high_watermark(&dir), Ok(None));
        write_high_watermark(&dir, Offset(1234)).unwrap();
        assert_eq!(read_high_watermark(&dir), Ok(Some(Offset(1234))));
        assert!(!dir.join(format!("{HW_CHECKPOINT_FILE}.tmp")).exists(), "temp file renamed away");
        // The log start checkpoint is a different file.
        assert_eq!(read(&dir).unwrap(), None);
        write_high_watermark(&dir, Offset(1235)).unwrap();
        assert_eq!(read_high_watermark(&dir), Ok(Some(Offset(1235))));
        let path = dir.join(HW_CHECKPOINT_FILE);
        for damaged in [&b""[..], b"\n", b"12x4\n", b"99999999999999999999999\n", &[0xff, 0xfe, b'1'], b"1 2\n"] {
            std::fs::write(&path, damaged).unwrap();
            let why = read_high_watermark(&dir).expect_err("a damaged checkpoint is refused");
            assert!(why.contains(HW_CHECKPOINT_FILE), "{why}");
        }
        // A directory where the file should be: an I/O error, still no panic.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(read_high_watermark(&dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
