//! Truncating a log's tail: a follower whose log diverged from its new
//! leader's drops everything from the divergence point on (Kafka's
//! `UnifiedLog.truncateTo`).
//!
//! Shard-local, like the log. Runs under the log's `cleaner_lock` and
//! `io_lock`, so no flush writes and no compaction swap happen meanwhile.
//!
//! Order, so that a crash at any point leaves a valid log that is a prefix
//! of the old one (the caller repeats the truncation after a restart):
//! 1. the cut is found (batch headers read from the file) and applied in
//!    memory: reads stop below it at once;
//! 2. the segments after the cut go, newest first, each index before its
//!    log (a log never keeps a stale "sealed" index); the cut segment's
//!    index files go; the directory is fsynced;
//! 3. the cut segment's file is truncated and fdatasynced (it is now the
//!    last segment, which recovery always rescans);
//! 4. the leader epoch checkpoint and producer state follow.
//!
//! `truncate_fully` empties the log and restarts it at a given offset
//! (Kafka's `truncateFullyAndStartAt`, for a follower whose log ends below
//! the leader's log start). Order: the log start checkpoint, then every
//! segment (newest first, indexes before logs), then an empty
//! `<start>.log`, each step synced. A crash before the end leaves a prefix
//! of the old log, or an empty one starting at 0: either way the follower's
//! next fetch is out of range and it truncates again.

use std::io;
use std::path::PathBuf;

use tidelog_protocol::Offset;

use super::{find_batch, now_ms, persist_epochs_locked, Segment, SharedLog};
use crate::storage::{align_down, checkpoint, producer_state, segment};

/// Removes every record at or above `offset` from the log. The log is cut at
/// a batch boundary: the batch containing `offset` goes whole, so the new
/// log end offset is that batch's base offset (or `offset` itself when no
/// batch holds it). The high watermark and durable end come down to at most
/// the new end; the recent-batch cache, pending appends, indexes, leader
/// epochs and producer state follow. Durable when it returns. An `offset` at
/// or past the log end is a no-op; one below the first segment truncates to
/// that segment's base. Callers must not append to the log until it returns.
///
/// On an I/O error the log in memory is already truncated but the files may
/// not be: treat the log as failed (Kafka takes the log dir offline).
pub async fn truncate_to(log: &SharedLog, offset: Offset) -> io::Result<()> {
    let (cleaner_lock, io_lock) = {
        let l = log.borrow();
        (l.cleaner_lock.clone(), l.io_lock.clone())
    };
    let _cleaner = cleaner_lock.lock().await;
    let _io = io_lock.lock().await;

    // 1. Where the cut falls. Durable data is stable while we hold the io lock.
    let (base, file, scan_from, durable_bytes, durable_next, offset, old_end) = {
        let l = log.borrow();
        let old_end = l.log_end_offset();
        if offset >= old_end {
            log::debug!(
                "{}-{}: truncate to {} at or past the log end {}: nothing to do",
                l.topic,
                l.partition.0,
                offset.0,
                old_end.0
            );
            return Ok(());
        }
        let offset = offset.max(l.segments[0].base_offset);
        let i = l.segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1);
        let s = &l.segments[i];
        (
            s.base_offset,
            s.file.clone(),
            s.index.position_for(s.base_offset, offset),
            s.durable_bytes,
            s.durable_next_offset,
            offset,
            old_end,
        )
    };
    let mut disk_cut: Option<(u64, Offset, Vec<u8>)> = None;
    if offset < durable_next {
        if let Some(file) = &file {
            if let (Some(found), _) = find_batch(file, scan_from, durable_bytes, offset).await? {
                let tail_start = align_down(found.position);
                let tail = if found.position > tail_start {
                    let r = file
                        .read_at(tail_start, (found.position - tail_start) as usize)
                        .await
                        .map_err(io::Error::from)?;
                    r.to_vec()
                } else {
                    Vec::new()
                };
                disk_cut = Some((found.position, found.base_offset.min(offset), tail));
            }
        }
    }

    // Applied in memory, in one borrow.
    let (name, new_end, removed, cut_path, cut_file, hw) = {
        let mut l = log.borrow_mut();
        let name = format!("{}-{}", l.topic, l.partition.0);
        let Some(i) = l.segments.iter().position(|s| s.base_offset == base) else {
            return Err(io::Error::other(format!(
                "{name}: truncate to {}: segment {} was removed meanwhile (retention?); try again",
                offset.0, base.0
            )));
        };
        let (position, new_end, tail) = match disk_cut {
            Some(cut) => cut,
            None => {
                // In the pending (not yet durable) part, or past every batch.
                let s = &l.segments[i];
                let mut at = s.durable_bytes;
                let mut cut = (s.end_bytes, offset);
                for p in &s.pending {
                    if p.last_offset >= offset {
                        cut = (at, p.base_offset.min(offset));
                        break;
                    }
                    at += p.bytes.len() as u64;
                }
                (cut.0, cut.1, Vec::new())
            }
        };
        let removed: Vec<PathBuf> = l.segments.drain(i + 1..).map(|s| s.path).collect();
        let seg = &mut l.segments[i];
        seg.cut(position, new_end, tail);
        let cut_path = seg.path.clone();
        let cut_file = seg.file.clone().map(|f| (f, seg.durable_bytes));
        l.truncations += 1;
        l.high_watermark = l.high_watermark.min(new_end);
        l.durable_end = l.durable_end.min(new_end);
        l.above_hw.retain(|b| b.base_offset < new_end);
        if l.above_hw_coarse {
            // The coarse stand-in (see `hold_high_watermark`) now ends here,
            // or is gone; `refine_above_hw` sees the truncation and rescans.
            match l.above_hw.front_mut() {
                Some(front) => front.next_offset = front.next_offset.min(new_end),
                None => l.above_hw_coarse = false,
            }
        }
        while l.cache.back().is_some_and(|b| b.last_offset >= new_end) {
            if let Some(b) = l.cache.pop_back() {
                l.cache_bytes -= b.bytes.len();
            }
        }
        if new_end < l.log_start_offset {
            // The batch holding `offset` started below the log start: the
            // log now ends there and starts there, empty.
            l.log_start_offset = new_end;
        }
        l.epochs.truncate_from_end(new_end);
        (name, new_end, removed, cut_path, cut_file, l.high_watermark)
    };

    // 2. Files of the segments after the cut (newest first), the cut
    // segment's index files, then the directory.
    let paths = removed.clone();
    let dir = log.borrow().dir.clone();
    let cut_log = cut_path.clone();
    glommio::executor()
        .spawn_blocking(move || -> io::Result<()> {
            for p in paths.iter().rev() {
                for f in segment::index_files(p) {
                    remove_if_exists(&f)?;
                }
                remove_if_exists(p)?;
            }
            for f in segment::index_files(&cut_log) {
                remove_if_exists(&f)?;
            }
            std::fs::File::open(&dir)?.sync_all()
        })
        .await?;

    // 3. The cut segment's file, to its durable size: this also drops what
    // a failed flush may have written past it.
    if let Some((file, durable)) = cut_file {
        file.truncate(durable).await.map_err(io::Error::from)?;
        file.fdatasync().await.map_err(io::Error::from)?;
    }

    // 4. Leader epochs, producer state.
    persist_epochs_locked(log).await?;
    producer_state::rebuild(log).await?;
    let dir = log.borrow().dir.clone();
    glommio::executor().spawn_blocking(move || producer_state::discard_snapshot_past(&dir, new_end)).await?;

    log::info!(
        "{name}: truncated to offset {} (asked {}): log end offset {} -> {}, {} segment(s) deleted, {} cut, high watermark {}",
        new_end.0,
        offset.0,
        old_end.0,
        new_end.0,
        removed.len(),
        cut_path.display(),
        hw.0
    );
    Ok(())
}

fn remove_if_exists(path: &std::path::Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Empties the log and restarts it at `start`: every segment is deleted and
/// the log start offset, log end offset, durable end and high watermark all
/// become `start`; the cache, leader epochs and producer state are cleared.
/// Durable when it returns. Callers must not append until it returns.
pub async fn truncate_fully(log: &SharedLog, start: Offset) -> io::Result<()> {
    let (cleaner_lock, io_lock) = {
        let l = log.borrow();
        (l.cleaner_lock.clone(), l.io_lock.clone())
    };
    let _cleaner = cleaner_lock.lock().await;
    let _io = io_lock.lock().await;

    let (name, dir, old_start, old_end, removed) = {
        let mut l = log.borrow_mut();
        let name = format!("{}-{}", l.topic, l.partition.0);
        let (old_start, old_end) = (l.log_start_offset, l.log_end_offset());
        let removed: Vec<PathBuf> = l.segments.drain(..).map(|s| s.path).collect();
        let dir = l.dir.clone();
        l.segments.push(Segment::new(&dir, start, now_ms()));
        l.log_start_offset = start;
        l.high_watermark = start;
        l.durable_end = start;
        l.above_hw.clear();
        l.above_hw_coarse = false;
        l.cache.clear();
        l.cache_bytes = 0;
        l.epochs.clear();
        l.producers = Default::default();
        l.truncations += 1;
        (name, dir, old_start, old_end, removed)
    };
    let paths = removed.clone();
    let d = dir.clone();
    let fresh = segment::log_path(&dir, start);
    glommio::executor()
        .spawn_blocking(move || -> io::Result<()> {
            checkpoint::write(&d, start)?;
            for p in paths.iter().rev() {
                for f in segment::index_files(p) {
                    remove_if_exists(&f)?;
                }
                remove_if_exists(p)?;
            }
            remove_if_exists(&d.join(producer_state::SNAPSHOT_FILE))?;
            std::fs::File::open(&d)?.sync_all()?;
            // The empty segment says where the log starts, for the next open.
            std::fs::File::create(&fresh)?.sync_all()?;
            std::fs::File::open(&d)?.sync_all()
        })
        .await?;
    persist_epochs_locked(log).await?;
    log::info!(
        "{name}: truncated fully and restarted at offset {}: was offsets {}..{}, {} segment(s) deleted",
        start.0,
        old_start.0,
        old_end.0,
        removed.len()
    );
    Ok(())
}
