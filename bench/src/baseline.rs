//! The hardware baseline a result is divided by: O_DIRECT sequential write
//! and read bandwidth and fdatasync latency on the data directory's
//! filesystem, and loopback TCP bandwidth. Runs on the calling thread (plus
//! reader threads for the parallel read and one receiver thread for
//! loopback); writes only a scratch file it removes.
//!
//! The reads go back over the file the write test wrote, with O_DIRECT so
//! the page cache (which still holds nothing of an O_DIRECT-written file,
//! but would after a buffered fallback) cannot flatter them. One reader at
//! a time is what a single cold catch-up stream gets from the device; four
//! at once is closer to what the broker's send threads can ask of it.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::host::{host_info, HostInfo};
use crate::stats::{new_latency_histogram, record_us, Percentiles};
use crate::util::wall_now_us;

const ALIGN_BYTES: usize = 4096;
const READ_BLOCK_BYTES: usize = 1 << 20;
/// Readers in the parallel read test.
pub const READ_PARALLEL: usize = 4;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub schema: String,
    pub dir: String,
    pub host: HostInfo,
    pub measured_at_unix_s: u64,
    /// False when the filesystem refused O_DIRECT and buffered writes plus a
    /// final fdatasync were measured instead.
    pub o_direct: bool,
    pub write_block_bytes: usize,
    pub write_total_bytes: u64,
    pub o_direct_write_mb_per_s: f64,
    /// Sequential 1 MiB reads of the written file, one at a time (queue
    /// depth 1). 0 in baselines written before reads were measured.
    #[serde(default)]
    pub o_direct_read_mb_per_s: f64,
    /// The same with `READ_PARALLEL` readers, each over its own part.
    #[serde(default)]
    pub o_direct_read_parallel_mb_per_s: f64,
    pub fdatasync_write_bytes: usize,
    pub fdatasync_latency_us: Percentiles,
    pub loopback_mb_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct BaselineOptions {
    pub dir: PathBuf,
    pub write_seconds: f64,
    pub write_bytes_max: u64,
    pub read_seconds: f64,
    pub fsync_count: usize,
    pub loopback_seconds: f64,
}

impl BaselineOptions {
    pub fn quick(dir: PathBuf) -> BaselineOptions {
        BaselineOptions {
            dir,
            write_seconds: 2.0,
            write_bytes_max: 512 << 20,
            read_seconds: 1.0,
            fsync_count: 300,
            loopback_seconds: 1.0,
        }
    }
}

/// A 4 KiB-aligned heap buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> anyhow::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len, ALIGN_BYTES)?;
        // SAFETY: layout has non-zero size (callers pass >= 4096).
        let ptr = unsafe { alloc_zeroed(layout) };
        anyhow::ensure!(!ptr.is_null(), "allocating {len} aligned bytes failed");
        Ok(AlignedBuf { ptr, layout })
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn open_scratch(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).write(true).truncate(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Opens with O_DIRECT, falling back to buffered when the filesystem
/// refuses it (tmpfs, some overlay setups).
fn open_direct_or_buffered(path: &Path) -> anyhow::Result<(File, bool)> {
    match open_scratch(path, true) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((open_scratch(path, false)?, false)),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

fn fdatasync(f: &File) -> anyhow::Result<()> {
    f.sync_data().context("fdatasync")
}

/// Sequential 1 MiB writes for `seconds` (or `bytes_max`), then fdatasync.
fn measure_write(opts: &BaselineOptions, path: &Path) -> anyhow::Result<(bool, u64, f64)> {
    let block = 1 << 20;
    let (file, mut direct) = open_direct_or_buffered(path)?;
    let mut buf = AlignedBuf::new(block)?;
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    let start = Instant::now();
    let limit = Duration::from_secs_f64(opts.write_seconds);
    let mut written: u64 = 0;
    let mut file = file;
    while start.elapsed() < limit && written < opts.write_bytes_max {
        match file.write_at(buf.as_slice(), written) {
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct && written == 0 => {
                file = open_scratch(path, false)?;
                direct = false;
            }
            Err(e) => return Err(e).context("baseline write"),
        }
    }
    fdatasync(&file)?;
    let secs = start.elapsed().as_secs_f64();
    Ok((direct, written, written as f64 / 1e6 / secs.max(1e-9)))
}

/// Reads `[start, end)` of `path` in 1 MiB blocks until `deadline`;
/// returns the bytes read. O_DIRECT when `direct` (else buffered, after
/// asking the kernel to drop the file's cached pages).
fn read_range(path: &Path, direct: bool, start: u64, end: u64, deadline: Instant) -> anyhow::Result<u64> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o.open(path).with_context(|| format!("opening {} to read", path.display()))?;
    if !direct {
        // SAFETY: plain fadvise on an open fd; failure only means a
        // flattering (cached) figure, which the report then says is buffered.
        unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    let mut buf = AlignedBuf::new(READ_BLOCK_BYTES)?;
    let mut pos = start;
    while pos < end && Instant::now() < deadline {
        let n = file.read_at(buf.as_mut_slice(), pos).context("baseline read")?;
        if n == 0 {
            break;
        }
        pos += n as u64;
    }
    Ok(pos - start)
}

/// Sequential read bandwidth over the first `len` bytes of the written
/// file: one reader, then `READ_PARALLEL` readers on equal parts.
fn measure_read(opts: &BaselineOptions, path: &Path, direct: bool, len: u64) -> anyhow::Result<(f64, f64)> {
    let block = READ_BLOCK_BYTES as u64;
    let len = len / block * block;
    if len == 0 {
        return Ok((0.0, 0.0));
    }
    let limit = Duration::from_secs_f64(opts.read_seconds);
    let t = Instant::now();
    let single = read_range(path, direct, 0, len, t + limit)?;
    let single_mbps = single as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9);

    let part = (len / READ_PARALLEL as u64) / block * block;
    if part == 0 {
        return Ok((single_mbps, 0.0));
    }
    let t = Instant::now();
    let deadline = t + limit;
    let readers: Vec<_> = (0..READ_PARALLEL as u64)
        .map(|i| {
            let path = path.to_path_buf();
            std::thread::spawn(move || read_range(&path, direct, i * part, (i + 1) * part, deadline))
        })
        .collect();
    let mut total = 0;
    for r in readers {
        total += r.join().map_err(|_| anyhow::anyhow!("baseline reader panicked"))??;
    }
    Ok((single_mbps, total as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)))
}

/// 4 KiB write + fdatasync, `count` times: the cost of one durable append.
fn measure_fdatasync(opts: &BaselineOptions, path: &Path) -> anyhow::Result<Percentiles> {
    let (mut file, mut direct) = open_direct_or_buffered(path)?;
    let buf = AlignedBuf::new(ALIGN_BYTES)?;
    let mut h = new_latency_histogram();
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..opts.fsync_count {
        let t = Instant::now();
        match file.write_at(buf.as_slice(), (i * ALIGN_BYTES) as u64) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct => {
                file = open_scratch(path, false)?;
                direct = false;
                continue;
            }
            Err(e) => return Err(e).context("baseline fdatasync write"),
        }
        fdatasync(&file)?;
        record_us(&mut h, t.elapsed().as_micros() as u64);
        if Instant::now() > deadline {
            break;
        }
    }
    Ok(Percentiles::of(&h))
}

/// One sender, one receiver thread over 127.0.0.1.
pub fn measure_loopback(seconds: f64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    while start.elapsed() < limit {
        s.write_all(&chunk)?;
    }
    drop(s);
    let total = receiver.join().map_err(|_| anyhow::anyhow!("loopback receiver panicked"))??;
    Ok(total as f64 / 1e6 / start.elapsed().as_secs_f64())
}

pub fn measure(opts: &BaselineOptions) -> anyhow::Result<Baseline> {
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let path = opts.dir.join(format!(".tidelog-bench-baseline-{}.tmp", std::process::id()));
    let result = (|| {
        let (o_direct, total, mbps) = measure_write(opts, &path)?;
        let read = measure_read(opts, &path, o_direct, total)?;
        let fsync = measure_fdatasync(opts, &path)?;
        Ok::<_, anyhow::Error>((o_direct, total, mbps, read, fsync))
    })();
    let _ = std::fs::remove_file(&path);
    let (o_direct, write_total_bytes, o_direct_write_mb_per_s, (read_1, read_n), fdatasync_latency_us) = result?;
    let loopback_mb_per_s = measure_loopback(opts.loopback_seconds)?;
    Ok(Baseline {
        schema: "tidelog-bench/baseline/v1".into(),
        dir: opts.dir.display().to_string(),
        host: host_info(&opts.dir),
        measured_at_unix_s: wall_now_us() / 1_000_000,
        o_direct,
        write_block_bytes: 1 << 20,
        write_total_bytes,
        o_direct_write_mb_per_s,
        o_direct_read_mb_per_s: read_1,
        o_direct_read_parallel_mb_per_s: read_n,
        fdatasync_write_bytes: ALIGN_BYTES,
        fdatasync_latency_us,
        loopback_mb_per_s,
    })
}

pub fn load(path: &Path) -> anyhow::Result<Baseline> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing baseline {}", path.display()))
}

/// A short human-readable rendering.
pub fn render(b: &Baseline) -> String {
    let f = &b.fdatasync_latency_us;
    format!(
        "baseline ({} on {}, {}):\n  {} sequential write : {:>9.1} MB/s ({} MiB in 1 MiB blocks)\n  {} sequential read  : {:>9.1} MB/s one reader, {:.1} MB/s {} readers\n  fdatasync (4 KiB)        : p50 {:.0} us  p90 {:.0} us  p99 {:.0} us  p99.9 {:.0} us  max {:.0} us ({} syncs)\n  loopback TCP             : {:>9.1} MB/s\n",
        b.dir,
        b.host.filesystem,
        b.host.device,
        if b.o_direct { "O_DIRECT" } else { "buffered" },
        b.o_direct_write_mb_per_s,
        b.write_total_bytes >> 20,
        if b.o_direct { "O_DIRECT" } else { "buffered" },
        b.o_direct_read_mb_per_s,
        b.o_direct_read_parallel_mb_per_s,
        READ_PARALLEL,
        f.p50,
        f.p90,
        f.p99,
        f.p999,
        f.max,
        f.count,
        b.loopback_mb_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_baseline_measures_and_roundtrips() {
        let dir = std::env::temp_dir().join(format!("tidelog-bench-baseline-test-{}", std::process::id()));
        let opts = BaselineOptions {
            dir: dir.clone(),
            write_seconds: 0.05,
            write_bytes_max: 8 << 20,
            read_seconds: 0.05,
            fsync_count: 5,
            loopback_seconds: 0.05,
        };
        let b = measure(&opts).unwrap();
        assert!(b.o_direct_write_mb_per_s > 0.0);
        assert!(b.o_direct_read_mb_per_s > 0.0);
        assert!(b.o_direct_read_parallel_mb_per_s > 0.0);
        assert_eq!(b.fdatasync_latency_us.count, 5);
        assert!(b.loopback_mb_per_s > 0.0);
        let json = serde_json::to_string(&b).unwrap();
        let back: Baseline = serde_json::from_str(&json).unwrap();
        assert_eq!(back.fdatasync_latency_us, b.fdatasync_latency_us);
        assert_eq!(back.host, b.host);
        assert!((back.o_direct_write_mb_per_s - b.o_direct_write_mb_per_s).abs() < 1e-6);
        assert!((back.o_direct_read_mb_per_s - b.o_direct_read_mb_per_s).abs() < 1e-6);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn baseline_without_read_figures_still_loads() {
        // A baseline JSON written before reads were measured.
        let mut v = serde_json::to_value(Baseline::default()).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("o_direct_read_mb_per_s");
        obj.remove("o_direct_read_parallel_mb_per_s");
        let back: Baseline = serde_json::from_value(v).unwrap();
        assert_eq!(back.o_direct_read_mb_per_s, 0.0);
    }
}
