//! `tidelog-tune iotune`: measures a data dir the way the broker uses it and
//! writes an io-properties file the broker reads to size its accumulator
//! flushes and in-flight writes.
//!
//! Measurements, all on one preallocated temp file opened with O_DIRECT:
//! 1. sequential writes at 4 KiB .. 1 MiB blocks and queue depths 1, 4, 16,
//!    submitted through **io_uring** (the `io-uring` crate, one ring, one
//!    aligned buffer per in-flight slot), each run closed by an fdatasync
//!    that is counted in its time so a volatile disk cache cannot flatter it;
//! 2. fdatasync latency after a 4 KiB write (plain `pwrite` + `fdatasync`,
//!    as the accumulator's group commit does once per cycle);
//! 3. random 4 KiB O_DIRECT reads over the written region, at queue depth 1
//!    for latency and 16 for IOPS (io_uring).
//!
//! The time budget (`--duration-s`) is split 60 % / 20 % / 20 % over the
//! three. The temp file is removed on every exit path. Runs single-threaded
//! in the CLI process; it never runs inside the broker.

use crate::host::{human_bytes, Host};
use crate::live;
use crate::mounts;
use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Block sizes measured for sequential writes.
pub const BLOCK_SIZES_BYTES: [usize; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
/// Queue depths measured for sequential writes.
pub const QUEUE_DEPTHS: [usize; 3] = [1, 4, 16];
/// Default total measuring time.
pub const DEFAULT_DURATION_S: u64 = 12;
/// Largest temp file iotune makes.
const FILE_MAX_BYTES: u64 = 1 << 30;
/// O_DIRECT alignment used for buffers and offsets.
const ALIGN_BYTES: usize = 4096;
/// A block/depth pair reaching this share of the best bandwidth counts as
/// good enough; the smallest such pair is recommended (less latency, less memory).
const GOOD_ENOUGH_SHARE: f64 = 0.9;

/// fdatasync latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest sample.
    pub max: u64,
}

/// One measured run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// `seq_write`, `fdatasync` or `rand_read`.
    pub kind: String,
    /// Bytes per operation.
    pub block_bytes: u64,
    /// Operations kept in flight.
    pub queue_depth: u64,
    /// Operations completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time of the run, closing fdatasync included for writes.
    pub duration_us: u64,
    /// Throughput.
    pub bytes_per_s: u64,
    /// Operations per second.
    pub iops: u64,
    /// Per-operation latency, submission to completion.
    pub latency_us_p50: u64,
    /// Per-operation latency, 99th percentile.
    pub latency_us_p99: u64,
    /// Slowest operation.
    pub latency_us_max: u64,
}

/// The io-properties file. Field order is the file's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoProperties {
    /// Format version, 1.
    pub version: u32,
    /// The measured directory.
    pub dir: String,
    /// Its filesystem type.
    pub filesystem: String,
    /// When, in seconds since the epoch.
    pub measured_at_unix_s: u64,
    /// Best sequential O_DIRECT write bandwidth.
    pub write_bandwidth_bytes_per_s: u64,
    /// Smallest block size reaching 90 % of the best bandwidth.
    pub best_write_block_bytes: u64,
    /// Queue depth of that run.
    pub best_queue_depth: u64,
    /// fdatasync after a 4 KiB write.
    pub fdatasync_latency_us: Percentiles,
    /// Random 4 KiB reads per second at queue depth 16.
    pub read_4k_iops: u64,
    /// 99th percentile random 4 KiB read latency at queue depth 1.
    pub read_4k_latency_us_p99: u64,
    /// Every run.
    pub results: Vec<RunResult>,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct IotuneOptions {
    /// Directory to measure (the data dir).
    pub dir: PathBuf,
    /// Total measuring time.
    pub duration: Duration,
}

/// A heap buffer aligned for O_DIRECT, freed on drop.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize, seed: u64) -> Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN_BYTES)?;
        // SAFETY: layout has non-zero size (len >= 4096 by construction).
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            bail!("out of memory allocating {len} bytes");
        }
        let mut buf = AlignedBuf { ptr, layout };
        // Incompressible content, so a compressing or deduplicating SSD
        // cannot make the numbers look better than log data would.
        let mut x = seed | 1;
        for chunk in buf.as_mut_slice().chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(buf)
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The temp file; closed and unlinked on drop.
struct TempFile {
    fd: libc::c_int,
    path: PathBuf,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // SAFETY: fd is ours and closed once.
        unsafe { libc::close(self.fd) };
        let _ = std::fs::remove_file(&self.path);
    }
}

fn cvt(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Percentile (0..=1) of sorted samples.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn percentiles(samples: &mut [u64]) -> Percentiles {
    samples.sort_unstable();
    Percentiles {
        p50: percentile(samples, 0.50),
        p90: percentile(samples, 0.90),
        p99: percentile(samples, 0.99),
        p999: percentile(samples, 0.999),
        max: samples.last().copied().unwrap_or(0),
    }
}

fn run_result(kind: &str, block: usize, qd: usize, latencies_us: &mut [u64], elapsed: Duration) -> RunResult {
    let ops = latencies_us.len() as u64;
    let bytes = ops * block as u64;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let p = percentiles(latencies_us);
    RunResult {
        kind: kind.to_string(),
        block_bytes: block as u64,
        queue_depth: qd as u64,
        ops,
        bytes,
        duration_us: elapsed.as_micros() as u64,
        bytes_per_s: (bytes as f64 / secs) as u64,
        iops: (ops as f64 / secs) as u64,
        latency_us_p50: p.p50,
        latency_us_p99: p.p99,
        latency_us_max: p.max,
    }
}

/// The filesystem type holding `dir`, from this host's mountinfo.
fn filesystem_of(dir: &Path) -> String {
    let host = Host::new("/");
    let mounts = host.read_raw("/proc/self/mountinfo").map(|t| mounts::parse_mountinfo(&t)).unwrap_or_default();
    mounts::mount_for(&mounts, dir).map_or_else(|| "unknown".to_string(), |m| m.fs_type.clone())
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain data; zeroed is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid path, st is ours.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("statvfs {}", dir.display()));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn open_direct(dir: &Path, fs_type: &str) -> Result<TempFile> {
    let path = dir.join(format!(".tidelog-iotune-{}.tmp", std::process::id()));
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_DIRECT | libc::O_CLOEXEC, 0o600)
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            bail!(
                "{} ({fs_type}) refuses O_DIRECT (EINVAL): tidelog writes segments with O_DIRECT; use XFS or ext4",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("creating {}", path.display()));
    }
    Ok(TempFile { fd, path })
}

/// Sequential O_DIRECT writes through io_uring; returns per-write latencies.
struct SeqWriter<'a> {
    ring: &'a mut io_uring::IoUring,
    fd: libc::c_int,
    file_bytes: u64,
    cursor: u64,
    written_high: u64,
}

impl SeqWriter<'_> {
    fn run(&mut self, block: usize, qd: usize, budget: Duration) -> Result<(Vec<u64>, Duration)> {
        let mut bufs = Vec::with_capacity(qd);
        for i in 0..qd {
            bufs.push(AlignedBuf::new(block, 0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * block as u64))?);
        }
        let mut started = vec![Instant::now(); qd];
        let mut latencies = Vec::new();
        let start = Instant::now();
        let deadline = start + budget;
        let mut in_flight = 0usize;
        for (slot, buf) in bufs.iter_mut().enumerate() {
            self.submit_write(buf, slot, &mut started)?;
            in_flight += 1;
        }
        while in_flight > 0 {
            self.ring.submit_and_wait(1).context("io_uring_enter")?;
            let done: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (slot, result) in done {
                let slot = slot as usize;
                in_flight -= 1;
                if result < 0 {
                    return Err(io::Error::from_raw_os_error(-result)).context("O_DIRECT write");
                }
                if result as usize != block {
                    bail!("short O_DIRECT write: {result} of {block} bytes");
                }
                latencies.push(started[slot].elapsed().as_micros() as u64);
                if Instant::now() < deadline {
                    self.submit_write(&mut bufs[slot], slot, &mut started)?;
                    in_flight += 1;
                }
            }
        }
        // SAFETY: fd is a valid open file.
        cvt(unsafe { libc::fdatasync(self.fd) } as libc::c_long).context("fdatasync")?;
        Ok((latencies, start.elapsed()))
    }

    fn submit_write(&mut self, buf: &mut AlignedBuf, slot: usize, started: &mut [Instant]) -> Result<()> {
        let len = buf.len() as u64;
        if self.cursor + len > self.file_bytes {
            self.cursor = 0;
        }
        let sqe = io_uring::opcode::Write::new(io_uring::types::Fd(self.fd), buf.ptr, buf.len() as u32)
            .offset(self.cursor)
            .build()
            .user_data(slot as u64);
        self.cursor += len;
        self.written_high = self.written_high.max(self.cursor);
        started[slot] = Instant::now();
        // SAFETY: the buffer outlives the operation: run() waits for every
        // in-flight completion before its buffers are dropped.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| anyhow!("io_uring submission queue full"))?;
        Ok(())
    }
}

/// Random 4 KiB reads over `[0, region_bytes)` through io_uring.
fn random_reads(
    ring: &mut io_uring::IoUring,
    fd: libc::c_int,
    region_bytes: u64,
    qd: usize,
    budget: Duration,
) -> Result<(Vec<u64>, Duration)> {
    let mut bufs = Vec::with_capacity(qd);
    for i in 0..qd {
        bufs.push(AlignedBuf::new(ALIGN_BYTES, i as u64 + 7)?);
    }
    let blocks = (region_bytes / ALIGN_BYTES as u64).max(1);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next_offset = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * ALIGN_BYTES as u64
    };
    let mut started = vec![Instant::now(); qd];
    let mut latencies = Vec::new();
    let start = Instant::now();
    let deadline = start + budget;
    let mut submit =
        |ring: &mut io_uring::IoUring, buf: &mut AlignedBuf, slot: usize, started: &mut [Instant]| -> Result<()> {
            let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(fd), buf.ptr, ALIGN_BYTES as u32)
                .offset(next_offset())
                .build()
                .user_data(slot as u64);
            started[slot] = Instant::now();
            // SAFETY: buffers outlive their reads; we drain every completion below.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow!("io_uring submission queue full"))?;
            Ok(())
        };
    let mut in_flight = 0;
    for (slot, buf) in bufs.iter_mut().enumerate() {
        submit(ring, buf, slot, &mut started)?;
        in_flight += 1;
    }
    while in_flight > 0 {
        ring.submit_and_wait(1).context("io_uring_enter")?;
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (slot, result) in done {
            let slot = slot as usize;
            in_flight -= 1;
            if result < 0 {
                return Err(io::Error::from_raw_os_error(-result)).context("O_DIRECT read");
            }
            latencies.push(started[slot].elapsed().as_micros() as u64);
            if Instant::now() < deadline {
                submit(ring, &mut bufs[slot], slot, &mut started)?;
                in_flight += 1;
            }
        }
    }
    Ok((latencies, start.elapsed()))
}

fn fdatasync_latencies(fd: libc::c_int, file_bytes: u64, budget: Duration) -> Result<(Vec<u64>, Duration)> {
    let buf = AlignedBuf::new(ALIGN_BYTES, 99)?;
    let mut latencies = Vec::new();
    let mut offset = 0u64;
    let start = Instant::now();
    while start.elapsed() < budget || latencies.len() < 10 {
        // SAFETY: buf is a live aligned buffer of ALIGN_BYTES bytes.
        let n = cvt(unsafe { libc::pwrite(fd, buf.ptr.cast(), ALIGN_BYTES, offset as libc::off_t) } as libc::c_long)
            .context("O_DIRECT pwrite")?;
        if n as usize != ALIGN_BYTES {
            bail!("short O_DIRECT pwrite: {n} of {ALIGN_BYTES} bytes");
        }
        let t = Instant::now();
        // SAFETY: fd is a valid open file.
        cvt(unsafe { libc::fdatasync(fd) } as libc::c_long).context("fdatasync")?;
        latencies.push(t.elapsed().as_micros() as u64);
        offset = (offset + ALIGN_BYTES as u64) % file_bytes;
        if latencies.len() >= 100_000 {
            break;
        }
    }
    Ok((latencies, start.elapsed()))
}

/// The run to recommend: the one with the fewest bytes in flight (then the
/// smallest block) among runs reaching 90 % of the best bandwidth.
pub fn choose_best(results: &[RunResult]) -> Option<&RunResult> {
    let writes: Vec<&RunResult> = results.iter().filter(|r| r.kind == "seq_write").collect();
    let max = writes.iter().map(|r| r.bytes_per_s).max()?;
    writes
        .into_iter()
        .filter(|r| r.bytes_per_s as f64 >= GOOD_ENOUGH_SHARE * max as f64)
        .min_by_key(|r| (r.block_bytes * r.queue_depth, r.block_bytes))
}

/// Measures `options.dir`; `progress` receives one line per step.
pub fn run(options: &IotuneOptions, mut progress: impl FnMut(&str)) -> Result<IoProperties> {
    let dir = options.dir.canonicalize().with_context(|| format!("data dir {}", options.dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let fs_type = filesystem_of(&dir);
    if live::fs_magic(&dir).ok() == Some(live::TMPFS_MAGIC) || fs_type == "tmpfs" {
        bail!("{} is on tmpfs: tmpfs has no O_DIRECT; use XFS or ext4", dir.display());
    }
    let free = free_bytes(&dir)?;
    let file_bytes = (free / 4).min(FILE_MAX_BYTES) / (1 << 20) * (1 << 20);
    if file_bytes < 16 << 20 {
        bail!("{} has {} free; iotune needs at least 64 MiB", dir.display(), human_bytes(free));
    }
    let file = open_direct(&dir, &fs_type)?;
    // SAFETY: file.fd is open; preallocation mirrors the broker's segments.
    let rc = unsafe { libc::fallocate(file.fd, 0, 0, file_bytes as libc::off_t) };
    if rc != 0 {
        // SAFETY: as above; fall back to a sparse file.
        cvt(unsafe { libc::ftruncate(file.fd, file_bytes as libc::off_t) } as libc::c_long).context("ftruncate")?;
    }
    let mut ring = io_uring::IoUring::new(32).map_err(|e| {
        anyhow!(
            "io_uring unavailable ({}); iotune measures through io_uring like the broker (see linux-only.md)",
            live::describe_errno(&e)
        )
    })?;

    let total = options.duration.as_secs_f64().max(0.5);
    let steps = BLOCK_SIZES_BYTES.len() * QUEUE_DEPTHS.len() + 3;
    let seq_slice = Duration::from_secs_f64((total * 0.6 / (steps - 3) as f64).max(0.02));
    let mut results = Vec::new();
    let mut step = 0;
    let mut writer = SeqWriter { ring: &mut ring, fd: file.fd, file_bytes, cursor: 0, written_high: 0 };
    for &block in &BLOCK_SIZES_BYTES {
        for &qd in &QUEUE_DEPTHS {
            step += 1;
            let (mut lat, elapsed) = writer.run(block, qd, seq_slice)?;
            let r = run_result("seq_write", block, qd, &mut lat, elapsed);
            progress(&format!(
                "iotune: [{step:>2}/{steps}] seq write {:>8} qd {qd:>2}: {:>10}/s  p99 {} us",
                human_bytes(block as u64),
                human_bytes(r.bytes_per_s),
                r.latency_us_p99
            ));
            results.push(r);
        }
    }
    let region = writer.written_high.max(ALIGN_BYTES as u64);

    step += 1;
    let (mut sync_lat, elapsed) = fdatasync_latencies(file.fd, file_bytes, Duration::from_secs_f64(total * 0.2))?;
    let mut sync_copy = sync_lat.clone();
    let sync = percentiles(&mut sync_copy);
    results.push(run_result("fdatasync", ALIGN_BYTES, 1, &mut sync_lat, elapsed));
    progress(&format!(
        "iotune: [{step:>2}/{steps}] fdatasync after 4 KiB write: p50 {} us p99 {} us max {} us",
        sync.p50, sync.p99, sync.max
    ));

    step += 1;
    let (mut lat, elapsed) = random_reads(&mut ring, file.fd, region, 1, Duration::from_secs_f64(total * 0.1))?;
    let qd1 = run_result("rand_read", ALIGN_BYTES, 1, &mut lat, elapsed);
    progress(&format!(
        "iotune: [{step:>2}/{steps}] random 4 KiB read qd  1: {} IOPS  p99 {} us",
        qd1.iops, qd1.latency_us_p99
    ));
    step += 1;
    let (mut lat, elapsed) = random_reads(&mut ring, file.fd, region, 16, Duration::from_secs_f64(total * 0.1))?;
    let qd16 = run_result("rand_read", ALIGN_BYTES, 16, &mut lat, elapsed);
    progress(&format!(
        "iotune: [{step:>2}/{steps}] random 4 KiB read qd 16: {} IOPS  p99 {} us",
        qd16.iops, qd16.latency_us_p99
    ));
    let read_4k_latency_us_p99 = qd1.latency_us_p99;
    let read_4k_iops = qd16.iops.max(qd1.iops);
    results.push(qd1);
    results.push(qd16);
    drop(file);

    let best = choose_best(&results).cloned().ok_or_else(|| anyhow!("no sequential write completed"))?;
    let write_bandwidth_bytes_per_s =
        results.iter().filter(|r| r.kind == "seq_write").map(|r| r.bytes_per_s).max().unwrap_or(0);
    let measured_at_unix_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(IoProperties {
        version: 1,
        dir: dir.display().to_string(),
        filesystem: fs_type,
        measured_at_unix_s,
        write_bandwidth_bytes_per_s,
        best_write_block_bytes: best.block_bytes,
        best_queue_depth: best.queue_depth,
        fdatasync_latency_us: sync,
        read_4k_iops,
        read_4k_latency_us_p99,
        results,
    })
}

/// Writes the properties as pretty JSON, atomically (temp file + rename).
pub fn write_properties(path: &Path, props: &IoProperties) -> Result<()> {
    let mut json = serde_json::to_string_pretty(props)?;
    json.push('\n');
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn seq(block: u64, qd: u64, bw: u64) -> RunResult {
        RunResult {
            kind: "seq_write".into(),
            block_bytes: block,
            queue_depth: qd,
            ops: 1,
            bytes: block,
            duration_us: 1,
            bytes_per_s: bw,
            iops: 1,
            latency_us_p50: 1,
            latency_us_p99: 1,
            latency_us_max: 1,
        }
    }

    #[test]
    fn best_is_the_smallest_near_peak() {
        let results = vec![seq(4096, 1, 10), seq(65536, 1, 95), seq(65536, 16, 100), seq(1 << 20, 1, 99)];
        let best = choose_best(&results).unwrap();
        assert_eq!((best.block_bytes, best.queue_depth), (65536, 1));
        assert!(choose_best(&[]).is_none());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        assert_eq!(percentiles(&mut v), Percentiles { p50: 500, p90: 900, p99: 990, p999: 999, max: 1000 });
        assert_eq!(percentiles(&mut []), Percentiles::default());
    }

    #[test]
    fn properties_field_order() {
        let props = IoProperties {
            version: 1,
            dir: "/d".into(),
            filesystem: "xfs".into(),
            measured_at_unix_s: 5,
            write_bandwidth_bytes_per_s: 6,
            best_write_block_bytes: 7,
            best_queue_depth: 8,
            fdatasync_latency_us: Percentiles { p50: 1, p90: 2, p99: 3, p999: 4, max: 5 },
            read_4k_iops: 9,
            read_4k_latency_us_p99: 10,
            results: vec![],
        };
        assert_eq!(
            serde_json::to_string(&props).unwrap(),
            "{\"version\":1,\"dir\":\"/d\",\"filesystem\":\"xfs\",\"measured_at_unix_s\":5,\"write_bandwidth_bytes_per_s\":6,\"best_write_block_bytes\":7,\"best_queue_depth\":8,\"fdatasync_latency_us\":{\"p50\":1,\"p90\":2,\"p99\":3,\"p999\":4,\"max\":5},\"read_4k_iops\":9,\"read_4k_latency_us_p99\":10,\"results\":[]}"
        );
    }
}
