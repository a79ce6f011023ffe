//! Broker efficiency over a run's measured window: broker CPU-seconds per GB
//! ingested and write amplification (bytes the broker wrote / record-batch
//! bytes produced), plus the data directory's device counters as a
//! device-wide second figure.
//!
//! Sources, in order: `--broker-pid` (read /proc/<pid>/stat and
//! /proc/<pid>/io), `--metrics-url` (scrape `process_cpu_seconds_total` and
//! `tidelog_storage_bytes_written_total` from a Prometheus endpoint), or
//! automatically the local processes listening on the brokers' ports (found
//! through /proc/net/tcp{,6} and /proc/*/fd). Several pids or URLs (a local
//! cluster) are summed, and reported per pid as well. Whatever is missing is
//! reported as unavailable with the reason, never as a zero.
//!
//! Runs on the bench's main thread: one reading when the measured window
//! opens and one when it closes.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Bytes in the GB of "CPU-seconds per GB".
const GB: f64 = 1e9;
/// Linux block-layer sectors are always 512 bytes in /sys/block/*/stat.
const SECTOR_BYTES: u64 = 512;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Cap on a scrape's response; a tidelog scrape is tens of KiB.
const SCRAPE_BYTES_MAX: u64 = 64 << 20;

/// Where the broker's counters come from, as asked on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Source {
    /// Local processes listening on the brokers' ports, if any.
    #[default]
    Auto,
    Pids(Vec<u32>),
    MetricsUrls(Vec<String>),
    Off,
}

/// One pid's share of the figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PidFigures {
    pub pid: u32,
    /// The process name (/proc/<pid>/comm).
    pub name: String,
    pub cpu_s: f64,
    /// write_bytes of /proc/<pid>/io: bytes the process caused to be sent
    /// to the storage layer (O_DIRECT writes when issued, buffered writes
    /// when dirtied); `None` when /proc/<pid>/io is not readable.
    pub bytes_written: Option<u64>,
}

/// The efficiency figures of one run (`results.efficiency` in summary.json).
/// A figure that could not be measured is `None`, with the reason beside it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Efficiency {
    /// "proc", "prometheus" or "none".
    pub source: String,
    /// Which pids or URLs, and how they were found.
    pub source_detail: String,
    /// From the reading at the start of the measured window to the one at its end.
    pub window_s: f64,
    /// Record-batch bytes acknowledged in the window: what the broker
    /// received and has to store (values plus keys, headers and batch framing).
    pub produced_batch_bytes: u64,
    /// Record value bytes acknowledged in the window (what "produce MB/s" counts).
    pub produced_value_bytes: u64,
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU time / GB (10^9 bytes) of record batches produced. All the
    /// broker's CPU in the window counts, serving the run's consumers too.
    pub broker_cpu_s_per_gb: Option<f64>,
    pub broker_bytes_written: Option<u64>,
    /// Broker bytes written / record-batch bytes produced. About 1 for one
    /// replica whose log writes only what it receives; summed over the
    /// nodes of a local cluster, about the replication factor.
    pub write_amplification: Option<f64>,
    /// Why a figure above is `None`.
    pub cpu_unavailable: Option<String>,
    pub write_unavailable: Option<String>,
    pub per_pid: Vec<PidFigures>,
    /// The block device holding the data directory, e.g. "vda (253:0)".
    pub device: Option<String>,
    /// Bytes written to that whole device in the window, by every writer on
    /// the host (filesystem journal and metadata included).
    pub device_bytes_written: Option<u64>,
    pub device_write_amplification: Option<f64>,
    pub device_unavailable: Option<String>,
}

/// Counters at one instant; each figure, or why it cannot be read.
#[derive(Clone, Debug)]
struct Reading {
    cpu_s: Result<f64, String>,
    bytes_written: Result<u64, String>,
    per_pid: Vec<PidFigures>,
}

#[derive(Clone, Debug)]
enum Resolved {
    Proc(Vec<u32>),
    Metrics(Vec<String>),
    None(String),
}

/// Bytes produced so far (batch, value), as the run counts them.
pub type Produced = (u64, u64);

struct Start {
    at: Instant,
    reading: Result<Reading, String>,
    device_sectors: Result<u64, String>,
    produced: Produced,
}

/// Takes the window's two readings.
pub struct Probe {
    resolved: Resolved,
    detail: String,
    device: Result<DeviceStat, String>,
    start: Option<Start>,
}

impl Probe {
    /// Decides the source once: explicit pids or URLs, else the local
    /// listeners of `broker_addrs` (host:port of every broker of the cluster).
    pub fn new(source: &Source, broker_addrs: &[String], data_dir: &Path) -> Probe {
        let (resolved, detail) = match source {
            Source::Off => (Resolved::None("turned off (--broker-pid 0)".into()), String::new()),
            Source::Pids(pids) => (Resolved::Proc(pids.clone()), format!("--broker-pid {}", join(pids))),
            Source::MetricsUrls(urls) => (Resolved::Metrics(urls.clone()), urls.join(", ")),
            Source::Auto => match find_listening_pids(broker_addrs) {
                Ok((pids, how)) if !pids.is_empty() => (Resolved::Proc(pids), format!("auto: {how}")),
                Ok(_) => (
                    Resolved::None(format!(
                        "no local process listens on {} (remote broker? pass --metrics-url or --broker-pid)",
                        broker_addrs.join(", ")
                    )),
                    String::new(),
                ),
                Err(e) => (Resolved::None(format!("finding the broker's pid: {e}")), String::new()),
            },
        };
        Probe { resolved, detail, device: DeviceStat::of(data_dir), start: None }
    }

    /// The pids read, when the source is /proc.
    pub fn pids(&self) -> &[u32] {
        match &self.resolved {
            Resolved::Proc(p) => p,
            _ => &[],
        }
    }

    /// Opens the measured window.
    pub fn start(&mut self, produced: Produced) {
        self.start = Some(Start {
            at: Instant::now(),
            reading: self.read(),
            device_sectors: self.device.as_ref().map_err(Clone::clone).and_then(DeviceStat::sectors_written),
            produced,
        });
    }

    pub fn started(&self) -> bool {
        self.start.is_some()
    }

    /// Closes the window and computes the figures. Without a `start` (the
    /// run ended before its window opened) every figure is unavailable.
    pub fn finish(&self, produced: Produced) -> Efficiency {
        let source = match &self.resolved {
            Resolved::Proc(_) => "proc",
            Resolved::Metrics(_) => "prometheus",
            Resolved::None(_) => "none",
        };
        let mut e = Efficiency { source: source.into(), source_detail: self.detail.clone(), ..Default::default() };
        e.device = self.device.as_ref().ok().map(|d| d.name.clone());
        let Some(start) = &self.start else {
            let why = "the run ended before its measured window opened (inside the warm-up)".to_string();
            e.cpu_unavailable = Some(why.clone());
            e.write_unavailable = Some(why.clone());
            e.device_unavailable = Some(why);
            return e;
        };
        let end = self.read();
        let end_sectors = self.device.as_ref().map_err(Clone::clone).and_then(DeviceStat::sectors_written);
        e.window_s = start.at.elapsed().as_secs_f64();
        e.produced_batch_bytes = produced.0.saturating_sub(start.produced.0);
        e.produced_value_bytes = produced.1.saturating_sub(start.produced.1);
        let produced_bytes = e.produced_batch_bytes;
        let per_byte = |v: f64| (produced_bytes > 0).then(|| v / produced_bytes as f64);
        let nothing_produced = || "no record batches were acknowledged in the window".to_string();
        match (&start.reading, &end) {
            (Ok(a), Ok(b)) => {
                match (&a.cpu_s, &b.cpu_s) {
                    (Ok(x), Ok(y)) => {
                        let cpu = (y - x).max(0.0);
                        e.broker_cpu_s = Some(cpu);
                        e.broker_cpu_s_per_gb = per_byte(cpu * GB);
                        if e.broker_cpu_s_per_gb.is_none() {
                            e.cpu_unavailable = Some(format!("per GB: {}", nothing_produced()));
                        }
                    }
                    (Err(w), _) | (_, Err(w)) => e.cpu_unavailable = Some(w.clone()),
                }
                match (&a.bytes_written, &b.bytes_written) {
                    (Ok(x), Ok(y)) => {
                        let written = y.saturating_sub(*x);
                        e.broker_bytes_written = Some(written);
                        e.write_amplification = per_byte(written as f64);
                        if e.write_amplification.is_none() {
                            e.write_unavailable = Some(nothing_produced());
                        }
                    }
                    (Err(w), _) | (_, Err(w)) => e.write_unavailable = Some(w.clone()),
                }
                e.per_pid = b
                    .per_pid
                    .iter()
                    .map(|p| {
                        let before = a.per_pid.iter().find(|q| q.pid == p.pid);
                        PidFigures {
                            pid: p.pid,
                            name: p.name.clone(),
                            cpu_s: (p.cpu_s - before.map(|q| q.cpu_s).unwrap_or(0.0)).max(0.0),
                            bytes_written: p
                                .bytes_written
                                .zip(before.and_then(|q| q.bytes_written))
                                .map(|(y, x)| y.saturating_sub(x)),
                        }
                    })
                    .collect();
            }
            (Err(w), _) | (_, Err(w)) => {
                e.cpu_unavailable = Some(w.clone());
                e.write_unavailable = Some(w.clone());
            }
        }
        match (&start.device_sectors, &end_sectors) {
            (Ok(x), Ok(y)) => {
                let bytes = y.saturating_sub(*x) * SECTOR_BYTES;
                e.device_bytes_written = Some(bytes);
                e.device_write_amplification = per_byte(bytes as f64);
                if e.device_write_amplification.is_none() {
                    e.device_unavailable = Some(nothing_produced());
                }
            }
            (Err(w), _) | (_, Err(w)) => e.device_unavailable = Some(w.clone()),
        }
        e
    }

    fn read(&self) -> Result<Reading, String> {
        match &self.resolved {
            Resolved::None(why) => Err(why.clone()),
            Resolved::Proc(pids) => read_pids(pids),
            Resolved::Metrics(urls) => read_metrics(urls),
        }
    }
}

fn join(pids: &[u32]) -> String {
    pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime (clock ticks) from a /proc/<pid>/stat line. The command
/// name sits in parentheses and may contain spaces and parentheses, so the
/// fields are counted after the last `)`: utime and stime are fields 14, 15.
pub fn cpu_ticks_of_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `write_bytes` of a /proc/<pid>/io file.
pub fn write_bytes_of_io(io: &str) -> Option<u64> {
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

fn read_pid(pid: u32, ticks_per_s: f64) -> Result<PidFigures, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("pid {pid}: /proc/{pid}/stat: {e} (did the broker exit?)"))?;
    let ticks = cpu_ticks_of_stat(&stat).ok_or_else(|| format!("pid {pid}: unparsable /proc/{pid}/stat"))?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_default();
    let bytes_written = std::fs::read_to_string(format!("/proc/{pid}/io")).ok().and_then(|s| write_bytes_of_io(&s));
    Ok(PidFigures { pid, name, cpu_s: ticks as f64 / ticks_per_s, bytes_written })
}

fn read_pids(pids: &[u32]) -> Result<Reading, String> {
    let ticks_per_s = clock_ticks_per_s();
    let per_pid = pids.iter().map(|&p| read_pid(p, ticks_per_s)).collect::<Result<Vec<_>, _>>()?;
    let cpu_s = per_pid.iter().map(|p| p.cpu_s).sum();
    let bytes_written = match per_pid.iter().find(|p| p.bytes_written.is_none()) {
        Some(p) => Err(format!("/proc/{}/io is not readable (another user's process? run as its user or root)", p.pid)),
        None => Ok(per_pid.iter().filter_map(|p| p.bytes_written).sum()),
    };
    Ok(Reading { cpu_s: Ok(cpu_s), bytes_written, per_pid })
}

/// Sums of a Prometheus text scrape: `process_cpu_seconds_total` and every
/// `tidelog_storage_bytes_written_total` sample (one per shard).
pub fn parse_scrape(text: &str) -> (Option<f64>, Option<u64>) {
    let (mut cpu, mut written) = (None::<f64>, None::<u64>);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
        let name = name_labels.split('{').next().unwrap_or("").trim();
        match name {
            "process_cpu_seconds_total" => {
                if let Ok(v) = value.trim().parse::<f64>() {
                    cpu = Some(cpu.unwrap_or(0.0) + v);
                }
            }
            "tidelog_storage_bytes_written_total" => {
                if let Ok(v) = value.trim().parse::<f64>() {
                    written = Some(written.unwrap_or(0) + v.max(0.0) as u64);
                }
            }
            _ => {}
        }
    }
    (cpu, written)
}

fn read_metrics(urls: &[String]) -> Result<Reading, String> {
    let (mut cpu, mut written) = (Ok(0.0), Ok(0u64));
    for url in urls {
        let body = http_get(url).map_err(|e| format!("scraping {url}: {e}"))?;
        let (c, w) = parse_scrape(&body);
        cpu = match (cpu, c) {
            (Ok(sum), Some(v)) => Ok(sum + v),
            (Ok(_), None) => Err(format!("{url} has no process_cpu_seconds_total")),
            (e, _) => e,
        };
        written = match (written, w) {
            (Ok(sum), Some(v)) => Ok(sum + v),
            (Ok(_), None) => Err(format!("{url} has no tidelog_storage_bytes_written_total")),
            (e, _) => e,
        };
    }
    Ok(Reading { cpu_s: cpu, bytes_written: written, per_pid: Vec::new() })
}

/// A plain HTTP/1.0 GET of `http://host:port/path`; the body of a 200.
fn http_get(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("resolving {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.take(SCRAPE_BYTES_MAX).read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header in the response")?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    Ok(body.to_string())
}

/// Listening TCP sockets of /proc/net/tcp or tcp6 text: (address, port, inode).
pub fn listening_sockets(text: &str) -> Vec<(IpAddr, u16, u64)> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != LISTEN {
            continue;
        }
        let Some((ip_hex, port_hex)) = f[1].split_once(':') else { continue };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port_hex, 16), f[9].parse::<u64>()) else { continue };
        if let Some(ip) = parse_proc_ip(ip_hex) {
            out.push((ip, port, inode));
        }
    }
    out
}

/// /proc/net addresses are 32-bit words in host byte order (little-endian here).
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()).collect::<Option<_>>()?;
    match words.as_slice() {
        [w] => Some(IpAddr::from(w.to_le_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            Some(IpAddr::from(bytes))
        }
        _ => None,
    }
}

/// Whether a listener on `listen` accepts connections to `target`.
fn listener_serves(listen: IpAddr, target: IpAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let (listen, target) = (canon(listen), canon(target));
    listen == target || listen.is_unspecified()
}

/// Whether `ip` is one of this host's addresses (binding to it works).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Pids of local processes listening on any of `broker_addrs`, with a
/// description of what was found. Remote brokers are skipped.
fn find_listening_pids(broker_addrs: &[String]) -> Result<(Vec<u32>, String), String> {
    let mut sockets = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            sockets.extend(listening_sockets(&text));
        }
    }
    let mut wanted: Vec<(u64, String)> = Vec::new();
    for a in broker_addrs {
        let Ok(addrs) = a.to_socket_addrs() else { continue };
        for sa in addrs.filter(|sa| is_local(sa.ip())) {
            for (ip, port, inode) in &sockets {
                if *port == sa.port() && listener_serves(*ip, sa.ip()) && !wanted.iter().any(|w| w.0 == *inode) {
                    wanted.push((*inode, a.clone()));
                }
            }
        }
    }
    if wanted.is_empty() {
        return Ok((Vec::new(), String::new()));
    }
    let mut found: Vec<(u32, String)> = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let inodes: BTreeSet<u64> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .collect();
        for (inode, addr) in &wanted {
            if inodes.contains(inode) && !found.iter().any(|f| f.0 == pid) {
                found.push((pid, addr.clone()));
            }
        }
    }
    found.sort();
    let how = found
        .iter()
        .map(|(pid, addr)| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({}) listens on {addr}", name.trim())
        })
        .collect::<Vec<_>>()
        .join("; ");
    if found.is_empty() {
        return Err(format!(
            "{} listen(s) locally but no readable /proc/*/fd holds it (another user's process? pass --broker-pid)",
            wanted.iter().map(|w| w.1.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok((found.into_iter().map(|f| f.0).collect(), how))
}

/// The block device of a directory, for its sectors-written counter.
#[derive(Clone, Debug)]
struct DeviceStat {
    name: String,
    stat_path: String,
}

impl DeviceStat {
    /// From the directory's st_dev: /sys/dev/block/MAJ:MIN (partitions and
    /// device-mapper devices included). Filesystems without a block device
    /// (tmpfs, overlay, NFS) have none.
    fn of(dir: &Path) -> Result<DeviceStat, String> {
        let dev = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?.dev();
        let (major, minor) = dev_major_minor(dev);
        let sys = format!("/sys/dev/block/{major}:{minor}");
        let stat_path = format!("{sys}/stat");
        if !Path::new(&stat_path).exists() {
            return Err(format!("{} is on device {major}:{minor}, which is not a block device", dir.display()));
        }
        let name = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into());
        Ok(DeviceStat { name: format!("{name} ({major}:{minor})"), stat_path })
    }

    fn sectors_written(&self) -> Result<u64, String> {
        let text = std::fs::read_to_string(&self.stat_path).map_err(|e| format!("{}: {e}", self.stat_path))?;
        sectors_written_of_stat(&text).ok_or_else(|| format!("unparsable {}", self.stat_path))
    }
}

/// Field 7 (sectors written) of a /sys/block/<dev>/stat line.
pub fn sectors_written_of_stat(text: &str) -> Option<u64> {
    text.split_whitespace().nth(6)?.parse().ok()
}

/// glibc's major()/minor() of a dev_t.
fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// "2.41" or "n/a (why)", for the terminal table.
pub fn or_na(v: Option<String>, why: Option<&str>) -> String {
    match (v, why) {
        (Some(v), _) => v,
        (None, Some(w)) => format!("n/a ({w})"),
        (None, None) => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (tide log) x) S 1 4242 4242 0 -1 4194560 1200 0 3 0 250 75 0 0 20 0 9 0 100 123456 789";
        assert_eq!(cpu_ticks_of_stat(stat), Some(325));
        assert_eq!(cpu_ticks_of_stat("12 (x) S 1 2"), None);
        assert_eq!(cpu_ticks_of_stat("no parenthesis"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks_of_stat(&own).is_some(), "{own}");
    }

    #[test]
    fn io_write_bytes() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 81920\ncancelled_write_bytes: 0\n";
        assert_eq!(write_bytes_of_io(io), Some(81920));
        assert_eq!(write_bytes_of_io("rchar: 1\n"), None);
        assert_eq!(write_bytes_of_io("write_bytes: lots\n"), None);
    }

    #[test]
    fn sectors_written_is_field_7() {
        let s = "  123456     1000  9876543   2000   654321    3000  7654321   4000 0 5000 6000 0 0 0 0 10 20\n";
        assert_eq!(sectors_written_of_stat(s), Some(7654321));
        assert_eq!(sectors_written_of_stat("1 2 3"), None);
        assert_eq!(dev_major_minor(0xfd00), (253, 0));
        assert_eq!(dev_major_minor(0x801), (8, 1));
    }

    #[test]
    fn proc_net_tcp_listeners() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:2384 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0\n   \
            1: 0100007F:2384 0100007F:D6D8 01 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 20 4 30 10 -1\n   \
            2: 00000000:25A4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n";
        let want: Vec<(IpAddr, u16, u64)> =
            vec![("127.0.0.1".parse().unwrap(), 9092, 31337), ("0.0.0.0".parse().unwrap(), 9636, 4242)];
        assert_eq!(listening_sockets(v4), want, "established sockets are skipped");
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000000000000000000001000000:2384 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n";
        let want: Vec<(IpAddr, u16, u64)> = vec![("::1".parse().unwrap(), 9092, 777)];
        assert_eq!(listening_sockets(v6), want);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(listener_serves("0.0.0.0".parse().unwrap(), lo));
        assert!(listener_serves("::ffff:127.0.0.1".parse().unwrap(), lo));
        assert!(!listener_serves("127.0.0.2".parse().unwrap(), lo));
    }

    #[test]
    fn finds_this_process_listening() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (pids, how) = find_listening_pids(std::slice::from_ref(&addr)).unwrap();
        assert_eq!(pids, vec![std::process::id()], "{how}");
        assert!(how.contains(&addr), "{how}");
        // A port nobody listens on finds nothing.
        drop(l);
        assert_eq!(find_listening_pids(&[addr]).unwrap().0, Vec::<u32>::new());
    }

    #[test]
    fn scrape_sums_shards_and_nodes() {
        let text = "# HELP process_cpu_seconds_total x\n# TYPE process_cpu_seconds_total counter\n\
            process_cpu_seconds_total 12.5\n\
            tidelog_storage_bytes_written_total{shard=\"0\"} 4096\n\
            tidelog_storage_bytes_written_total{shard=\"1\"} 8192\n\
            tidelog_flush_bytes_total{shard=\"0\"} 100\n";
        assert_eq!(parse_scrape(text), (Some(12.5), Some(12288)));
        assert_eq!(parse_scrape("other_metric 1\n"), (None, None));
    }

    #[test]
    fn figures_over_a_window_of_this_process() {
        let dir = std::env::temp_dir();
        let mut p = Probe::new(&Source::Pids(vec![std::process::id()]), &[], &dir);
        assert_eq!(p.pids(), &[std::process::id()]);
        p.start((0, 0));
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert_ne!(x, 1);
        let e = p.finish((1_000_000_000, 900_000_000));
        assert_eq!(e.source, "proc");
        assert_eq!(e.produced_batch_bytes, 1_000_000_000);
        let cpu = e.broker_cpu_s.unwrap();
        assert!(cpu > 0.1 && cpu < 5.0, "{cpu}");
        assert!((e.broker_cpu_s_per_gb.unwrap() - cpu).abs() < 1e-9, "1 GB produced: {e:?}");
        assert_eq!(e.per_pid.len(), 1);
        assert!(e.write_amplification.is_some(), "{e:?}");

        // No window: everything unavailable, with the reason.
        let p = Probe::new(&Source::Pids(vec![std::process::id()]), &[], &dir);
        let e = p.finish((10, 10));
        assert!(e.broker_cpu_s.is_none() && e.cpu_unavailable.unwrap().contains("warm-up"));

        // Nothing produced: CPU is measured, per GB is not.
        let mut p = Probe::new(&Source::Pids(vec![std::process::id()]), &[], &dir);
        p.start((5, 5));
        let e = p.finish((5, 5));
        assert!(e.broker_cpu_s.is_some() && e.broker_cpu_s_per_gb.is_none());
        assert!(e.cpu_unavailable.unwrap().contains("no record batches"));

        // A source that is not there says why.
        let mut p = Probe::new(&Source::MetricsUrls(vec!["http://127.0.0.1:1/metrics".into()]), &[], &dir);
        p.start((0, 0));
        let e = p.finish((10, 10));
        assert!(e.cpu_unavailable.unwrap().contains("scraping http://127.0.0.1:1/metrics"));
    }
}
