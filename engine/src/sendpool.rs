//! Send threads: where a shard writes the Fetch responses that read segment
//! files (the cold path) to their sockets.
//!
//! Each shard starts its own pool of `fetch.sendfile.threads` plain OS
//! threads at start-up and is the only one that submits to it; the threads
//! share nothing but the job queue and exit when the shard drops the pool.
//!
//! Why threads, and not io_uring splice or the shard itself: a cold region
//! is data written with O_DIRECT, so it is not in the page cache and
//! `sendfile` reads the disk. A shard thread must never wait on that. glommio
//! 0.9 exposes neither splice nor its ring, and `readahead(2)` only starts
//! the I/O (a following sendfile still blocks if it has not finished). A
//! ring of our own would not buy speed either: `tidelog-cold-send` (bench/)
//! sends a 2 GiB O_DIRECT-written file cold over loopback both ways, and on
//! the reference VM (disk 1.24 GB/s) sendfile on a thread with one 128 KiB
//! chunk read ahead did 1.11-1.22 GB/s, io_uring splice from one thread
//! (file -> pipe -> socket, 1 or 3 chunks ahead) 1.08-1.16 GB/s, and the
//! submitting thread spent up to 0.16-0.47 ms inside a single
//! `io_uring_enter` submit, time a shard would lose. So a cold response goes
//! whole to one send thread, which
//!
//! 1. asks the kernel to read ahead (`posix_fadvise(WILLNEED)`, in 128 KiB
//!    requests) at most `fetch.readahead.bytes` of file data ahead of what it
//!    sends, across the response's partitions, so the next reads are in
//!    flight while the current ones go out, and the reads a catch-up
//!    consumer queues in front of the shards' writes and fdatasyncs stay
//!    few and small: at most threads x window per shard. The files' own
//!    kernel readahead is off (`segment::open_reader`);
//! 2. writes the response in order: inline header pieces with `sendmsg`,
//!    file regions with `sendfile` (page cache to socket, no copy through
//!    user space), waiting for socket room with `poll`;
//!
//! The threads run at `fetch.sendfile.priority` (default `idle`: SCHED_IDLE,
//! so catch-up sends use only CPU time the shards leave over, and the idle
//! I/O class, so an I/O scheduler that knows priorities, mq-deadline or bfq,
//! dispatches the shards' writes before catch-up reads; with `none`, usual
//! on NVMe, only the readahead window below bounds them). On the reference
//! VM (mq-deadline) the idle class, against the lowest best-effort level,
//! took a 20 MB/s tail's end-to-end p99 under a cold catch-up from 5.0-5.9
//! to 4.1-4.4 ms and the catch-up from 650-740 to 720-910 MB/s. mq-deadline
//! still serves an idle read after `prio_aging_expire` (10 s) of writes;
//! `low` is the setting for hosts that write at the disk's limit for long.
//!
//! The send threads are not glommio's blocking pool on purpose: segment
//! rolls, checkpoints and compaction run there, and a consumer that stops
//! reading must not make a producer wait for a thread.
//!
//! At most `fetch.sendfile.threads` responses per shard are handed over at
//! once; more wait on the shard (a semaphore), costing nothing while idle.
//!
//! One `SendBudget` paces the file bytes all send threads of the broker
//! together send: it is shared by every shard's pool, since the shards share
//! the data directory's disk. Threads pay for what they sent after each
//! `sendfile` and sleep off any debt before the next one, so readahead (which
//! stays one window ahead of the sends) is paced with them. It has two rates:
//! - `fetch.sendfile.writing.max.bytes.per.second` (default 200 MB/s) applies
//!   only while the log is being written, that is while some shard flushed
//!   produced data within `WRITING_WINDOW`. The flushers stamp an atomic, so
//!   this costs a shard one store per flush. A catch-up read then leaves the
//!   disk to the writes. When nothing is written, it runs at the disk's speed.
//! - `fetch.sendfile.max.bytes.per.second` (default 0, none) applies always.
//!
//! On the reference VM, a 20 MB/s tail (end-to-end p99 1.5-1.8 ms alone) ran
//! next to a cold catch-up reader at SCHED_IDLE (`bench/scripts/
//! tail-vs-catch-up.sh --repeat 3`), with the tail's p99 given as a multiple
//! of its value alone:
//! - no limit: catch-up 660-950 MB/s, p99 1.44-1.51x;
//! - 200 MB/s at all times: 1.00-1.09x;
//! - the default writing limit: 0.96-1.32x over 8 pairs, median 1.07, 6 of
//!   8 at most 1.2x. The pairs over 1.2x had a 20-88 ms flush stall with no
//!   host hiccup beside it.
//!
//! A catch-up on a quiet broker with the default writing limit is not slowed
//! at all (cold, 706-802 MB/s). Earlier single runs, warm (page cache): no
//! limit, 1.6-3.4 GB/s and 2.2-3.1x; 200 MB/s, 1.1-1.4x in 2 of 3 runs. A
//! 512 KiB readahead window instead of 128 KiB: 820-1050 MB/s cold, but
//! 4.2-4.8x.
//!
//! Measured on the reference VM (2 vCPU, virtio disk reading 1.2 GB/s, 4 GB
//! backlog, tidelog-bench catch-up consumers on the same cores): the old
//! path (glommio's blocking pool, fadvise of whole regions, kernel
//! readahead on) read cold data at 950 MB/s but pushed a 20 MB/s tail
//! consumer's end-to-end p99 from 1.7 ms to 320-800 ms, because fdatasync
//! queued behind megabytes of reads. 4 MiB windows: 1.4 GB/s, p99 800+ ms.
//! 128 KiB requests, 128 KiB window (the default): 640-700 MB/s, p99 4-6 ms.
//! The window is the knob between catch-up speed and produce latency.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::SendPriority;

/// How long a send may wait on a client that does not read, per wait.
pub const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// iovecs per `sendmsg` (well under IOV_MAX).
const IOVECS_MAX: usize = 64;
/// Largest single `sendfile` call and largest readahead request. Small disk
/// reads interleave with the shards' O_DIRECT writes and fdatasyncs instead
/// of queueing in front of them: on the reference VM, fdatasync p99 under a
/// back-to-back reader went from 0.30 ms alone to 1.75 ms with 1 MiB reads
/// but 0.37-0.53 ms with 128 KiB reads, at the same read bandwidth.
const READ_CHUNK_BYTES: u64 = 128 << 10;
const SENDFILE_CHUNK_BYTES: u64 = READ_CHUNK_BYTES;

/// One piece of a response, owned so it can cross to a send thread.
pub enum Piece {
    /// Header pieces and cached batches.
    Inline(Bytes),
    /// `len` bytes of `file` from `position`.
    File { file: Arc<File>, position: u64, len: u64 },
}

/// The broker-wide byte budget of the send threads (a token bucket that may
/// go into debt: a send is never split to fit, the next one waits longer).
///
/// Two rates: `max` always applies, `writing` only while the log is being
/// written (a shard flushed produced data within `WRITING_WINDOW`), so a
/// catch-up read runs at the disk's speed when nothing else needs the disk
/// and yields to the writes when something does.
pub struct SendBudget {
    /// Bytes per second; infinite for no limit.
    max: f64,
    writing: f64,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last flush, plus one (0 = never).
    last_write_ns: AtomicU64,
    state: Mutex<BudgetState>,
}

/// How long after a flush the log counts as being written.
pub const WRITING_WINDOW: Duration = Duration::from_millis(100);

struct BudgetState {
    tokens: f64,
    at: Instant,
}

/// Seconds of budget the bucket can hold: how far a burst may run ahead.
const BUDGET_BURST_SECONDS: f64 = 0.01;

fn rate_of(bytes_per_second: u64) -> f64 {
    if bytes_per_second == 0 {
        f64::INFINITY
    } else {
        bytes_per_second as f64
    }
}

impl SendBudget {
    /// `max_bytes_per_second` always, `writing_bytes_per_second` while the
    /// log is being written; 0 = no limit. `None` when neither limits.
    pub fn new(max_bytes_per_second: u64, writing_bytes_per_second: u64) -> Option<Arc<SendBudget>> {
        if max_bytes_per_second == 0 && writing_bytes_per_second == 0 {
            return None;
        }
        let max = rate_of(max_bytes_per_second);
        let writing = rate_of(writing_bytes_per_second).min(max);
        let epoch = Instant::now();
        Some(Arc::new(SendBudget {
            max,
            writing,
            epoch,
            last_write_ns: AtomicU64::new(0),
            state: Mutex::new(BudgetState { tokens: burst_of(writing), at: epoch }),
        }))
    }

    /// A shard flushed produced data (called by the flushers, any thread).
    pub fn note_write(&self) {
        let ns = Instant::now().saturating_duration_since(self.epoch).as_nanos() as u64;
        self.last_write_ns.store(ns.saturating_add(1), Ordering::Relaxed);
    }

    fn writing_at(&self, now: Instant) -> bool {
        let last = self.last_write_ns.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let at = self.epoch + Duration::from_nanos(last - 1);
        now.saturating_duration_since(at) < WRITING_WINDOW
    }

    /// The rate in force at `now`, in bytes per second; infinite for none.
    pub fn rate_at(&self, now: Instant) -> f64 {
        if self.writing_at(now) {
            self.writing
        } else {
            self.max
        }
    }

    /// Pays for `bytes` sent at `now`; returns how long the payer must wait
    /// before it sends again.
    fn pay(&self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate_at(now);
        // Poisoning only means a send thread panicked mid-update of two floats.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if rate.is_infinite() {
            // No limit now: start the next limited stretch with a full bucket
            // and no debt.
            s.tokens = burst_of(self.writing);
            s.at = now.max(s.at);
            return Duration::ZERO;
        }
        let refill = now.saturating_duration_since(s.at).as_secs_f64() * rate;
        s.tokens = (s.tokens + refill).min(burst_of(rate)) - bytes as f64;
        s.at = now.max(s.at);
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / rate)
        }
    }
}

/// Bytes a bucket at `rate` may hold: `BUDGET_BURST_SECONDS` of it, at least
/// one send.
fn burst_of(rate: f64) -> f64 {
    if rate.is_infinite() {
        SENDFILE_CHUNK_BYTES as f64
    } else {
        (rate * BUDGET_BURST_SECONDS).max(SENDFILE_CHUNK_BYTES as f64)
    }
}

/// What a pool's threads share with the shard besides the queue.
struct Pacing {
    budget: Option<Arc<SendBudget>>,
    /// Nanoseconds this pool's threads slept on the budget.
    throttled_ns: AtomicU64,
}

impl Pacing {
    /// Pays for `bytes` and sleeps off any debt.
    fn pay(&self, bytes: u64) {
        let Some(budget) = &self.budget else { return };
        let wait = budget.pay(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
            self.throttled_ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

struct Job {
    socket: Arc<OwnedFd>,
    pieces: Vec<Piece>,
    done: futures::channel::oneshot::Sender<io::Result<()>>,
}

/// A shard's send threads (shard-local handle).
pub struct SendPool {
    jobs: mpsc::Sender<Job>,
    permits: glommio::sync::Semaphore,
    threads: u64,
    pacing: Arc<Pacing>,
}

impl SendPool {
    /// Starts `threads` send threads named `shard-<shard>-send-<k>`, paced by
    /// `budget` (shared with the other shards' pools) when there is one.
    pub fn start(
        shard: u32,
        threads: usize,
        priority: SendPriority,
        readahead_bytes: u64,
        budget: Option<Arc<SendBudget>>,
    ) -> io::Result<SendPool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let pacing = Arc::new(Pacing { budget, throttled_ns: AtomicU64::new(0) });
        for k in 0..threads {
            let rx = rx.clone();
            let pacing = pacing.clone();
            std::thread::Builder::new().name(format!("shard-{shard}-send-{k}")).spawn(move || {
                if let Err(e) = apply_priority(priority) {
                    log::warn!(
                        "shard {shard}: send thread {k}: cannot set fetch.sendfile.priority={priority:?}: {e}; \
                         cold sends run at normal priority"
                    );
                }
                loop {
                    // Poisoning only means another send thread panicked; the queue is intact.
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return, // the shard dropped the pool
                    };
                    let result = send_pieces(job.socket.as_raw_fd(), &job.pieces, readahead_bytes, &pacing);
                    drop(job.pieces);
                    let _ = job.done.send(result);
                }
            })?;
        }
        Ok(SendPool {
            jobs: tx,
            permits: glommio::sync::Semaphore::new(threads as u64),
            threads: threads as u64,
            pacing,
        })
    }

    /// Seconds this pool's threads have slept on the budget.
    pub fn throttled_seconds(&self) -> f64 {
        self.pacing.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Tells the broker-wide budget that this shard just flushed produced
    /// data, so cold sends yield to the writes for `WRITING_WINDOW`.
    pub fn note_write(&self) {
        if let Some(b) = &self.pacing.budget {
            b.note_write();
        }
    }

    /// The cold-send limit in force now, bytes per second (0 = none).
    pub fn limit_bytes_per_second(&self) -> u64 {
        let rate = self.pacing.budget.as_ref().map_or(f64::INFINITY, |b| b.rate_at(Instant::now()));
        if rate.is_finite() {
            rate as u64
        } else {
            0
        }
    }

    /// Responses handed to the send threads and not finished yet.
    pub fn in_flight(&self) -> u64 {
        self.threads.saturating_sub(self.permits.available())
    }

    /// Sends `pieces` to `socket` in order on a send thread; returns when all
    /// of it is in the socket (or the send failed).
    pub async fn send(&self, socket: Arc<OwnedFd>, pieces: Vec<Piece>) -> io::Result<()> {
        let _permit =
            self.permits.acquire_permit(1).await.map_err(|e| io::Error::other(format!("send pool closed: {e}")))?;
        let (done, result) = futures::channel::oneshot::channel();
        self.jobs.send(Job { socket, pieces, done }).map_err(|_| io::Error::other("send threads exited"))?;
        result.await.unwrap_or_else(|_| Err(io::Error::other("send thread exited mid-send")))
    }
}

/// How long one blocking `sendfile` may wait for socket room before it
/// returns, so a stalled client is noticed (`SEND_STALL_TIMEOUT`).
const SOCKET_SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// A second fd for a connection's socket, so a send thread never writes to
/// an fd number the connection closed and the kernel reused. Also sets the
/// socket's SO_SNDTIMEO: accepted sockets are blocking, and `sendfile` has
/// no non-blocking flag; glommio's own sends are unaffected (io_uring never
/// blocks in the socket).
pub fn dup_socket(fd: RawFd) -> io::Result<Arc<OwnedFd>> {
    let tv = libc::timeval { tv_sec: 0, tv_usec: SOCKET_SEND_TIMEOUT.as_micros() as libc::suseconds_t };
    // SAFETY: setsockopt with a timeval that outlives the call, on an fd the caller keeps open.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on an fd the caller keeps open; the result is a new fd we own.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh fd owned by nothing else.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(dup) }))
}

const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
const IOPRIO_CLASS_BE: libc::c_int = 2;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
/// Lowest best-effort I/O level.
const IOPRIO_BE_LOWEST: libc::c_int = 7;
/// Niceness of `low` send threads.
const LOW_NICE: libc::c_int = 10;

/// Sets the calling thread's CPU and I/O priority.
fn apply_priority(priority: SendPriority) -> io::Result<()> {
    let check = |rc: libc::c_long| if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    let prio = match priority {
        SendPriority::Normal => return Ok(()),
        SendPriority::Idle => {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; param is valid for the call.
            check(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } as libc::c_long)?;
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT
        }
        SendPriority::Low => {
            // SAFETY: gettid/setpriority on the calling thread only.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            check(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, LOW_NICE) } as libc::c_long)?;
            (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | IOPRIO_BE_LOWEST
        }
    };
    // SAFETY: ioprio_set on the calling thread (who 0) with a valid value.
    check(unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, prio) })
}

/// The file regions of a response and how far readahead has been asked for.
struct Readahead {
    regions: Vec<(RawFd, u64, u64)>,
    window_bytes: u64,
    /// Region being advised and bytes of it advised so far.
    next: usize,
    next_done: u64,
    /// File bytes of the response advised so far.
    advised: u64,
}

impl Readahead {
    fn new(pieces: &[Piece], window_bytes: u64) -> Readahead {
        let regions = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::File { file, position, len } => Some((file.as_raw_fd(), *position, *len)),
                Piece::Inline(_) => None,
            })
            .collect();
        Readahead { regions, window_bytes, next: 0, next_done: 0, advised: 0 }
    }

    /// Asks for readahead up to `window_bytes` past `sent` file bytes.
    fn advance(&mut self, sent: u64) {
        let target = sent + self.window_bytes;
        while self.advised < target && self.next < self.regions.len() {
            let (fd, position, len) = self.regions[self.next];
            let take = (len - self.next_done).min(target - self.advised).min(READ_CHUNK_BYTES);
            advise(fd, position + self.next_done, take);
            self.next_done += take;
            self.advised += take;
            if self.next_done == len {
                self.next += 1;
                self.next_done = 0;
            }
        }
    }
}

fn advise(fd: RawFd, position: u64, len: u64) {
    // SAFETY: advisory call on an fd the job keeps open.
    unsafe { libc::posix_fadvise(fd, position as libc::off_t, len as libc::off_t, libc::POSIX_FADV_WILLNEED) };
}

/// Writes every piece in order to the blocking-capable socket `fd`.
fn send_pieces(fd: RawFd, pieces: &[Piece], readahead_bytes: u64, pacing: &Pacing) -> io::Result<()> {
    let mut ahead = Readahead::new(pieces, readahead_bytes);
    let mut file_sent = 0u64;
    ahead.advance(0);
    let mut i = 0;
    while i < pieces.len() {
        match &pieces[i] {
            Piece::Inline(_) => {
                let run_end =
                    pieces[i..].iter().position(|p| matches!(p, Piece::File { .. })).map_or(pieces.len(), |n| i + n);
                let run: Vec<Bytes> = pieces[i..run_end]
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Inline(b) if !b.is_empty() => Some(b.clone()),
                        _ => None,
                    })
                    .collect();
                send_all(fd, run)?;
                i = run_end;
            }
            Piece::File { file, position, len, .. } => {
                sendfile_all(fd, file.as_raw_fd(), *position, *len, pacing, |sent| ahead.advance(file_sent + sent))?;
                file_sent += len;
                i += 1;
            }
        }
    }
    Ok(())
}

/// What of `run` is left after `sent` bytes went out.
pub fn remaining(run: Vec<Bytes>, mut sent: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(run.len());
    for b in run {
        if sent >= b.len() {
            sent -= b.len();
        } else {
            out.push(b.slice(sent..));
            sent = 0;
        }
    }
    out
}

/// One non-blocking vectored send; returns the bytes accepted (0 if full).
pub fn sendmsg_nowait(fd: RawFd, bufs: &[Bytes]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in bufs.chunks(IOVECS_MAX) {
        let iov: Vec<libc::iovec> =
            chunk.iter().map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() }).collect();
        let want: usize = chunk.iter().map(|b| b.len()).sum();
        // SAFETY: iov points into `bufs`, alive for the call; msghdr is zeroed then filled.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(sent),
                io::ErrorKind::Interrupted => return Ok(sent),
                _ => return Err(e),
            }
        }
        sent += n as usize;
        if (n as usize) < want {
            return Ok(sent);
        }
    }
    Ok(sent)
}

/// Waits until `fd` is writable, or fails after `SEND_STALL_TIMEOUT`.
fn wait_writable(fd: RawFd, since: Instant) -> io::Result<()> {
    loop {
        let left = SEND_STALL_TIMEOUT.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading the response"));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one pollfd we own.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 1000) as i32) };
        if rc > 0 {
            if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && pfd.revents & libc::POLLOUT == 0 {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "client closed the connection"));
            }
            return Ok(());
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Sends all of `rest`, waiting for socket room.
fn send_all(fd: RawFd, mut rest: Vec<Bytes>) -> io::Result<()> {
    let mut since = Instant::now();
    while !rest.is_empty() {
        let n = sendmsg_nowait(fd, &rest)?;
        if n == 0 {
            wait_writable(fd, since)?;
            continue;
        }
        since = Instant::now();
        rest = remaining(rest, n);
    }
    Ok(())
}

/// Sends `len` bytes of `file_fd` from `position` with sendfile, paying
/// `pacing` for each call and calling `progress` with the bytes of this
/// region sent so far after every call.
fn sendfile_all(
    fd: RawFd,
    file_fd: RawFd,
    position: u64,
    len: u64,
    pacing: &Pacing,
    mut progress: impl FnMut(u64),
) -> io::Result<()> {
    let mut offset = position as libc::off_t;
    let end = (position + len) as libc::off_t;
    let mut since = Instant::now();
    while offset < end {
        let chunk = ((end - offset) as u64).min(SENDFILE_CHUNK_BYTES) as usize;
        // SAFETY: both fds are open for the duration; offset is ours.
        let n = unsafe { libc::sendfile(fd, file_fd, &mut offset, chunk) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => wait_writable(fd, since)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "segment file shorter than the fetch region"));
        }
        progress(offset as u64 - position);
        pacing.pay(n as u64);
        // After the pacing sleep: a wait on the budget is not a stalled client.
        since = Instant::now();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A socket pair over loopback: (the send side's fd owner, the reader).
    fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// A scratch file of `len` patterned bytes: (its dir, the bytes, the file).
    fn scratch_segment(name: &str, len: u32) -> (std::path::PathBuf, Vec<u8>, Arc<File>) {
        let dir = std::env::temp_dir().join(format!("tidelog-sendpool-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("segment");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        (dir, data, file)
    }

    /// Reads `rx` to its end on another thread.
    fn read_to_end_in_background(mut rx: TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).unwrap();
            got
        })
    }

    #[test]
    fn pieces_arrive_in_order_with_file_regions_between_inline_bytes() {
        let (dir, data, file) = scratch_segment("order", 3_000_000);
        let (tx, rx) = socket_pair();
        let pieces = vec![
            Piece::Inline(Bytes::from_static(b"head")),
            Piece::File { file: file.clone(), position: 10, len: 2_500_000 },
            Piece::Inline(Bytes::from_static(b"mid")),
            Piece::Inline(Bytes::new()),
            Piece::File { file, position: 0, len: 7 },
            Piece::Inline(Bytes::from_static(b"tail")),
        ];
        let reader = read_to_end_in_background(rx);
        // A small readahead window so it slides across both regions.
        send_pieces(tx.as_raw_fd(), &pieces, 65536, &unpaced()).unwrap();
        drop(tx);
        let got = reader.join().unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data[10..2_500_010]);
        want.extend_from_slice(b"mid");
        want.extend_from_slice(&data[0..7]);
        want.extend_from_slice(b"tail");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_region_past_the_end_of_the_file_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("tidelog-sendpool-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("segment");
        std::fs::File::create(&path).unwrap().write_all(&[7u8; 100]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let (tx, _rx) = socket_pair();
        let pieces = vec![Piece::File { file, position: 50, len: 100 }];
        let err = send_pieces(tx.as_raw_fd(), &pieces, 4096, &unpaced()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn unpaced() -> Pacing {
        Pacing { budget: None, throttled_ns: AtomicU64::new(0) }
    }

    #[test]
    fn the_budget_lets_a_burst_through_then_charges_each_byte_at_the_rate() {
        // 10 MB/s: the bucket holds max(100 KB, one 128 KiB chunk).
        let b = SendBudget::new(10_000_000, 0).unwrap();
        let t0 = Instant::now();
        assert_eq!(b.pay(SENDFILE_CHUNK_BYTES, t0), Duration::ZERO);
        // 1 MB more at the same instant: 1 MB of debt = 100 ms.
        let wait = b.pay(1_000_000, t0);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // 40 ms later 400 KB of the debt is repaid; 1 byte more waits 60 ms.
        let wait = b.pay(1, t0 + Duration::from_millis(40));
        assert!((wait.as_secs_f64() - 0.06).abs() < 1e-6, "{wait:?}");
        // Idle for a second: the bucket refills only to its burst, not 10 MB.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(b.pay(SENDFILE_CHUNK_BYTES, t1), Duration::ZERO);
        assert!(b.pay(SENDFILE_CHUNK_BYTES, t1) > Duration::ZERO);
        assert!(SendBudget::new(0, 0).is_none());
    }

    #[test]
    fn the_writing_rate_applies_only_just_after_a_flush() {
        // No limit, except 10 MB/s while writing.
        let b = SendBudget::new(0, 10_000_000).unwrap();
        let t0 = Instant::now();
        assert!(b.rate_at(t0).is_infinite());
        assert_eq!(b.pay(50_000_000, t0), Duration::ZERO, "nothing written: no limit");
        b.note_write();
        let now = Instant::now();
        assert_eq!(b.rate_at(now), 10e6);
        // A full bucket first (no debt carried over from the unlimited
        // stretch), then 1 MB more costs 100 ms.
        assert_eq!(b.pay(SENDFILE_CHUNK_BYTES, now), Duration::ZERO);
        let wait = b.pay(1_000_000, now);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // The window closes WRITING_WINDOW after the flush.
        let later = now + WRITING_WINDOW + Duration::from_millis(1);
        assert!(b.rate_at(later).is_infinite());
        assert_eq!(b.pay(50_000_000, later), Duration::ZERO);
        // The writing rate never exceeds the overall one.
        let b = SendBudget::new(5_000_000, 10_000_000).unwrap();
        b.note_write();
        assert_eq!(b.rate_at(Instant::now()), 5e6);
    }

    #[test]
    fn a_paced_send_takes_as_long_as_the_budget_says() {
        let (dir, data, file) = scratch_segment("paced", 1_500_000);
        let (tx, rx) = socket_pair();
        let reader = read_to_end_in_background(rx);
        // 5 MB/s for 1.5 MB, of which at most one burst (128 KiB) is free:
        // at least (1.5 MB - 128 KiB - one last unslept chunk) / 5 MB/s.
        let pacing = Pacing { budget: SendBudget::new(5_000_000, 0), throttled_ns: AtomicU64::new(0) };
        let t = Instant::now();
        send_pieces(tx.as_raw_fd(), &[Piece::File { file, position: 0, len: 1_500_000 }], 1 << 20, &pacing).unwrap();
        let took = t.elapsed().as_secs_f64();
        drop(tx);
        assert!(reader.join().unwrap() == data, "bytes differ");
        let floor = (1_500_000.0 - 2.0 * SENDFILE_CHUNK_BYTES as f64) / 5e6;
        assert!(took >= floor, "paced send of 1.5 MB at 5 MB/s took {took:.3} s, under {floor:.3} s");
        let slept = pacing.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9;
        assert!(slept > 0.0 && slept <= took + 1e-3, "slept {slept} of {took}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn remaining_drops_what_was_sent() {
        let run = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg"), Bytes::from_static(b"h")];
        let rest = remaining(run, 5);
        assert_eq!(rest, vec![Bytes::from_static(b"fg"), Bytes::from_static(b"h")]);
    }
}
