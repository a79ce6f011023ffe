//! Two ways to send cold file bytes to a socket with no copy through user
//! space, side by side, on the data directory's disk: what the broker's send
//! threads do (`sendfile` on a plain thread, `posix_fadvise(WILLNEED)` a
//! window ahead) and io_uring splice (file -> pipe -> socket, a few chunks'
//! reads in flight, the socket splices in order) submitted from one thread,
//! as a shard would.
//!
//! For each way: MB/s over loopback to a reader that checks a CRC of every
//! byte against the file, and for splice how long the submitting thread spent
//! inside `io_uring_enter` while submitting (waiting for completions is
//! timed apart): a page-cache miss the kernel handles inline there would
//! stall a shard, one it hands to io-wq workers would not.
//!
//! The file is written with O_DIRECT (like a segment, so nothing of it is in
//! the page cache), read cold by each way in turn (evicted before each), and
//! removed.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use io_uring::{opcode, squeue, types, IoUring};

#[derive(Parser, Debug)]
#[command(
    name = "tidelog-cold-send",
    about = "Compare sendfile on a thread with io_uring splice for cold file -> socket sends (zero-copy both)",
    long_about = "Writes a scratch file with O_DIRECT under --dir (put it on the broker's data disk), then sends it \
                  cold over loopback TCP twice: with sendfile on a thread that reads ahead with fadvise (what \
                  tidelog's send threads do) and with io_uring splice submitted from one thread (what a shard \
                  could do). Prints MB/s, a CRC check of every byte received, and for splice the time the \
                  submitting thread spent inside io_uring_enter submitting. Removes the file at the end."
)]
struct Args {
    /// Directory for the scratch file (on the filesystem to measure; not tmpfs: O_DIRECT).
    #[arg(long)]
    dir: PathBuf,
    /// Size of the scratch file in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Bytes per sendfile call / per splice, in KiB (tidelog's send threads use 128).
    #[arg(long, default_value_t = 128)]
    chunk_kib: u64,
    /// Chunks read ahead of the one being sent (tidelog's default window: 1 chunk).
    #[arg(long, default_value_t = 1)]
    ahead: u64,
    /// Force every splice to io-wq (IOSQE_ASYNC) instead of letting the kernel try it inline first.
    #[arg(long)]
    force_async: bool,
}

const ALIGN: usize = 4096;

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("tidelog-cold-send: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> anyhow::Result<()> {
    let chunk = a.chunk_kib.max(4) << 10;
    let path = a.dir.join(format!(".tidelog-cold-send-{}.tmp", std::process::id()));
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let result = (|| {
        eprintln!("writing {} MiB with O_DIRECT to {}", a.mib, path.display());
        let crc = write_scratch(&path, a.mib << 20)?;
        let file = File::open(&path)?;
        let len = a.mib << 20;

        evict(&file)?;
        let (mbps, got) = measure(|sock| send_with_sendfile(sock, &file, len, chunk, a.ahead))?;
        check(got, crc, "sendfile")?;
        println!("sendfile on a thread, {}-KiB chunks, {} ahead : {mbps:>8.1} MB/s, CRC ok", chunk >> 10, a.ahead);

        evict(&file)?;
        let mut submit = SubmitTimes::default();
        let (mbps, got) =
            measure(|sock| send_with_splice(sock, &file, len, chunk, a.ahead, a.force_async, &mut submit))?;
        check(got, crc, "splice")?;
        println!(
            "io_uring splice, {}-KiB chunks, {} ahead{}: {mbps:>8.1} MB/s, CRC ok; submitting thread inside \
             io_uring_enter to submit: {} calls, max {:.3} ms, total {:.1} ms",
            chunk >> 10,
            a.ahead,
            if a.force_async { " (IOSQE_ASYNC)" } else { "" },
            submit.calls,
            submit.max.as_secs_f64() * 1e3,
            submit.total.as_secs_f64() * 1e3
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Writes `len` patterned bytes with O_DIRECT and fdatasync; returns their CRC32C.
fn write_scratch(path: &std::path::Path, len: u64) -> anyhow::Result<u32> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT (tmpfs cannot; use a disk)", path.display()))?;
    let block = 1usize << 20;
    let layout = Layout::from_size_align(block, ALIGN)?;
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { alloc_zeroed(layout) };
    if ptr.is_null() {
        bail!("allocating the write buffer failed");
    }
    // SAFETY: ptr is valid for `block` bytes until dealloc.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, block) };
    let mut crc = 0u32;
    let mut at = 0u64;
    let mut result = Ok(());
    while at < len {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((at as usize + i) % 251) as u8;
        }
        if let Err(e) = f.write_all_at(buf, at) {
            result = Err(e);
            break;
        }
        crc = crc32c::crc32c_append(crc, buf);
        at += block as u64;
    }
    // SAFETY: allocated above with this layout.
    unsafe { dealloc(ptr, layout) };
    result.context("writing the scratch file")?;
    f.sync_data()?;
    Ok(crc)
}

fn evict(f: &File) -> io::Result<()> {
    // SAFETY: advisory call on an open fd.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn check(got: (u64, u32), want_crc: u32, what: &str) -> anyhow::Result<()> {
    if got.1 != want_crc {
        bail!("{what}: the reader's CRC {:08x} over {} bytes is not the file's {want_crc:08x}", got.1, got.0);
    }
    Ok(())
}

/// Runs `send` against a loopback reader; returns MB/s and (bytes, CRC32C) read.
fn measure(send: impl FnOnce(&TcpStream) -> anyhow::Result<()>) -> anyhow::Result<(f64, (u64, u32))> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> io::Result<(u64, u32)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut crc) = (0u64, 0u32);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((total, crc));
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            total += n as u64;
        }
    });
    let sock = TcpStream::connect(addr)?;
    let t = Instant::now();
    send(&sock)?;
    drop(sock);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok((got.0 as f64 / 1e6 / t.elapsed().as_secs_f64(), got))
}

/// tidelog's send-thread way: fadvise `ahead` chunks past what was sent, then sendfile.
fn send_with_sendfile(sock: &TcpStream, file: &File, len: u64, chunk: u64, ahead: u64) -> anyhow::Result<()> {
    let (sfd, ffd) = (sock.as_raw_fd(), file.as_raw_fd());
    let mut advised = 0u64;
    let mut offset: libc::off_t = 0;
    while (offset as u64) < len {
        let want = (offset as u64 + (ahead + 1) * chunk).min(len);
        while advised < want {
            let n = chunk.min(want - advised);
            // SAFETY: advisory call on an open fd.
            unsafe { libc::posix_fadvise(ffd, advised as libc::off_t, n as libc::off_t, libc::POSIX_FADV_WILLNEED) };
            advised += n;
        }
        let n = chunk.min(len - offset as u64) as usize;
        // SAFETY: both fds open; offset is ours.
        let rc = unsafe { libc::sendfile(sfd, ffd, &mut offset, n) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("sendfile");
        }
        if rc == 0 {
            bail!("sendfile: file shorter than expected");
        }
    }
    Ok(())
}

#[derive(Default)]
struct SubmitTimes {
    calls: u64,
    max: Duration,
    total: Duration,
}

fn pipe_pair(size: u64) -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a pipe we own.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) } < 0 {
        return Err(io::Error::last_os_error()).context("F_SETPIPE_SZ (raise /proc/sys/fs/pipe-max-size?)");
    }
    Ok((r, w))
}

/// The io_uring way, from one thread: `ahead + 1` pipes; chunk `c` is
/// spliced from the file into pipe `c % pipes` as soon as that pipe is free,
/// and the socket splices drain the pipes in file order, one at a time.
fn send_with_splice(
    sock: &TcpStream,
    file: &File,
    len: u64,
    chunk: u64,
    ahead: u64,
    force_async: bool,
    times: &mut SubmitTimes,
) -> anyhow::Result<()> {
    let slots = (ahead + 1) as usize;
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..slots).map(|_| pipe_pair(chunk)).collect::<anyhow::Result<_>>()?;
    let mut ring = IoUring::new(64).context("io_uring_setup")?;
    let (sfd, ffd) = (types::Fd(sock.as_raw_fd()), types::Fd(file.as_raw_fd()));
    let flags = if force_async { squeue::Flags::ASYNC } else { squeue::Flags::empty() };
    let chunks = len.div_ceil(chunk);
    let chunk_len = |c: u64| chunk.min(len - c * chunk);
    #[derive(Clone, Copy, PartialEq)]
    enum Slot {
        Free,
        /// Holds chunk .0; a read is to be submitted.
        ToRead(u64),
        Reading(u64),
        /// Chunk .0 has .1 bytes left in the pipe.
        Full(u64, u64),
        Sending(u64, u64),
    }
    let mut slot = vec![Slot::Free; slots];
    let (mut next_read, mut next_send) = (0u64, 0u64);
    // user_data: slot * 2, +1 for the socket side.
    while next_send < chunks {
        while next_read < chunks && slot[(next_read % slots as u64) as usize] == Slot::Free {
            slot[(next_read % slots as u64) as usize] = Slot::ToRead(next_read);
            next_read += 1;
        }
        let mut sq = Vec::new();
        for (s, st) in slot.iter_mut().enumerate() {
            if let Slot::ToRead(c) = *st {
                let e = opcode::Splice::new(
                    ffd,
                    (c * chunk) as i64,
                    types::Fd(pipes[s].1.as_raw_fd()),
                    -1,
                    chunk_len(c) as u32,
                );
                sq.push(e.build().flags(flags).user_data((s * 2) as u64));
                *st = Slot::Reading(c);
            }
        }
        let s = (next_send % slots as u64) as usize;
        if let Slot::Full(c, left) = slot[s] {
            let e = opcode::Splice::new(types::Fd(pipes[s].0.as_raw_fd()), -1, sfd, -1, left as u32);
            sq.push(e.build().flags(flags).user_data((s * 2 + 1) as u64));
            slot[s] = Slot::Sending(c, left);
        }
        for e in &sq {
            // SAFETY: the fds outlive the ring's use of them: every operation
            // completes before this function returns (or the process exits).
            unsafe { ring.submission().push(e).map_err(|_| anyhow::anyhow!("submission queue full"))? };
        }
        let t = Instant::now();
        ring.submit().context("io_uring_enter (submit)")?;
        let took = t.elapsed();
        times.calls += 1;
        times.total += took;
        times.max = times.max.max(took);
        ring.submit_and_wait(1).context("io_uring_enter (wait)")?;
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            let s = (ud / 2) as usize;
            let again = res == -libc::EAGAIN || res == -libc::EINTR;
            slot[s] = match (slot[s], ud % 2 == 1) {
                (Slot::Reading(c), false) if again => Slot::ToRead(c),
                (Slot::Reading(c), false) if res >= 0 => {
                    if res as u64 != chunk_len(c) {
                        bail!("short splice from the file: {res} of {} bytes at chunk {c}", chunk_len(c));
                    }
                    Slot::Full(c, res as u64)
                }
                (Slot::Sending(c, left), true) if again => Slot::Full(c, left),
                (Slot::Sending(c, left), true) if res >= 0 => {
                    if res as u64 == left {
                        next_send += 1;
                        Slot::Free
                    } else {
                        Slot::Full(c, left - res as u64)
                    }
                }
                (_, side) => {
                    let what = if side { "splice pipe -> socket" } else { "splice file -> pipe" };
                    return Err(io::Error::from_raw_os_error(-res)).context(what);
                }
            };
        }
    }
    Ok(())
}
