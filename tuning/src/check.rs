//! The host audit behind `tidelog-tune check`, and the fixes `apply` makes.
//!
//! Each check reads the host through [`Host`] and returns [`Finding`]s: one
//! per item, with a verdict, the current value, the recommended value and
//! why. A finding that is not a pass and can be changed at run time carries
//! the [`Write`]s that would fix it; `apply` is nothing more than those
//! writes, so the audit and the tuner can never disagree.
//!
//! Runs once, single-threaded, in the CLI process; nothing here touches a
//! broker shard.

use crate::config::{self, BrokerSettings, IO_MEMORY_DEFAULT_BYTES, IO_MEMORY_MIN_BYTES, SHARD_OVERHEAD_BYTES};
use crate::host::{
    available_choices, format_cpu_list, format_cpu_mask, human_bytes, parse_cpu_list, parse_cpu_mask, selected_choice,
    Host,
};
use crate::live;
use crate::mounts::{self, BlockDevice, Mount};
use anyhow::{Context as _, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest device readahead (KiB) that does not put long reads in front of
/// the broker's writes.
const READ_AHEAD_KB_MAX: u64 = 512;

/// Oldest kernel glommio runs on.
pub const KERNEL_MIN: (u32, u32) = (5, 8);
/// Oldest kernel tidelog recommends (see linux-only.md).
pub const KERNEL_RECOMMENDED: (u32, u32) = (5, 15);

/// How an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Good as is.
    Pass,
    /// Works, but costs latency, throughput or safety margin.
    Warn,
    /// The broker will not start, or acked data is at risk.
    Fail,
    /// Could not be determined here (not present, or needs the live host).
    Skip,
}

impl Verdict {
    /// Upper-case label for the text report.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// How a write is made permanent by `apply --persist`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// A line in a sysctl.d file.
    Sysctl { key: String },
    /// A udev rule on the block device's queue attribute.
    Udev { disk: String, attr: String },
    /// A line in the systemd oneshot unit.
    Unit,
}

/// One file write a tuner makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Write {
    /// Host path (`/proc/sys/vm/swappiness`), before the root prefix.
    pub path: String,
    /// Value now.
    pub old: String,
    /// Value to write.
    pub new: String,
    /// How to make it permanent.
    #[serde(skip)]
    pub persist: Persist,
}

/// One audited item.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable item name (`sysctl.vm.swappiness`).
    pub item: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What the host has.
    pub current: String,
    /// What tidelog wants.
    pub recommended: String,
    /// Why it matters.
    pub why: String,
    /// Writes that fix it at run time; empty for a pass or when only a
    /// reboot, a remount or new hardware would.
    #[serde(skip)]
    pub writes: Vec<Write>,
}

fn finding(
    item: impl Into<String>,
    verdict: Verdict,
    current: impl Into<String>,
    recommended: impl Into<String>,
    why: impl Into<String>,
) -> Finding {
    Finding {
        item: item.into(),
        verdict,
        current: current.into(),
        recommended: recommended.into(),
        why: why.into(),
        writes: Vec::new(),
    }
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Root prefix for host files.
    pub root: PathBuf,
    /// `--dir`.
    pub data_dir: Option<PathBuf>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--shards`.
    pub shard_count: Option<usize>,
}

/// Everything the checks need, resolved once.
#[derive(Debug, Clone)]
pub struct Context {
    /// The host.
    pub host: Host,
    /// The data dir as a host path, if known.
    pub data_dir: Option<PathBuf>,
    /// Number of shards the broker will run.
    pub shard_count: usize,
    /// CPUs the shards are pinned to, shard i on `shard_cores[i]`.
    pub shard_cores: Vec<usize>,
    /// CPUs available to the broker.
    pub cpus: Vec<usize>,
    /// `io.memory.bytes` per shard.
    pub io_memory_bytes: u64,
}

impl Context {
    /// Resolves options, the config file and the host's CPUs.
    pub fn resolve(options: &Options) -> Result<Context> {
        let host = Host::new(&options.root);
        let settings = match &options.config {
            Some(path) => config::load(path)?,
            None => BrokerSettings::default(),
        };
        let data_dir = options.data_dir.clone().or(settings.log_dir);
        let data_dir = match data_dir {
            Some(dir) if host.is_live() => Some(canonical_or_nearest(&dir)?),
            other => other,
        };
        let cpus = if host.is_live() {
            live::affinity_cpus().context("sched_getaffinity")?
        } else {
            host.read("/sys/devices/system/cpu/online").and_then(|s| parse_cpu_list(&s)).unwrap_or_else(|| vec![0])
        };
        let shard_count = options.shard_count.or(settings.shard_count).unwrap_or(cpus.len()).max(1);
        let shard_cores = cpus.iter().copied().take(shard_count).collect();
        Ok(Context {
            host,
            data_dir,
            shard_count,
            shard_cores,
            cpus,
            io_memory_bytes: settings.io_memory_bytes.unwrap_or(IO_MEMORY_DEFAULT_BYTES),
        })
    }

    /// Locked memory the broker needs: every shard registers its io_memory
    /// plus its ring and buffers.
    pub fn memlock_needed_bytes(&self) -> u64 {
        self.shard_count as u64 * (self.io_memory_bytes + SHARD_OVERHEAD_BYTES)
    }
}

/// Canonical path of `dir`, or of its nearest existing ancestor joined with
/// the rest, so a data dir that does not exist yet still finds its mount.
fn canonical_or_nearest(dir: &Path) -> Result<PathBuf> {
    let absolute =
        if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir().context("current dir")?.join(dir) };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return Ok(out);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return Ok(absolute),
        }
    }
}

/// Runs every check, in report order.
pub fn run_all(ctx: &Context) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(check_kernel(ctx));
    out.push(check_io_uring_disabled(ctx));
    let probe = if ctx.host.is_live() { Some(live::probe_io_uring()) } else { None };
    out.push(check_io_uring_probe(&probe));
    out.push(check_seccomp(ctx, &probe));
    out.push(check_container(ctx));
    out.push(check_shards(ctx));
    out.push(check_memlock(ctx));
    let disk = check_data_dir(ctx, &mut out);
    check_irqs_and_nics(ctx, disk.as_ref(), &mut out);
    check_sysctls(ctx, &mut out);
    check_thp(ctx, &mut out);
    out.push(check_governor(ctx));
    out.push(check_clocksource(ctx));
    out.push(check_smt(ctx));
    out
}

/// Parses `6.1.0-13-amd64` into (6, 1).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn check_kernel(ctx: &Context) -> Finding {
    let item = "kernel.version";
    let recommended = format!(">= {}.{}", KERNEL_RECOMMENDED.0, KERNEL_RECOMMENDED.1);
    let Some(release) = ctx.host.read("/proc/sys/kernel/osrelease") else {
        return finding(
            item,
            Verdict::Skip,
            "unreadable /proc/sys/kernel/osrelease",
            recommended,
            "cannot tell the kernel version",
        );
    };
    match parse_kernel_version(&release) {
        Some(v) if v < KERNEL_MIN => finding(item, Verdict::Fail, release, recommended,
            "glommio needs io_uring features from Linux 5.8; the broker cannot start"),
        Some(v) if v < KERNEL_RECOMMENDED => finding(item, Verdict::Warn, release, recommended,
            "runs, but before 5.15 LTS io_uring lacks native io-wq workers and memcg ring accounting (5.12) and has known fixed bugs"),
        Some(_) => finding(item, Verdict::Pass, release, recommended,
            "io_uring with native workers, memcg-accounted rings, splice and the opcodes glommio uses"),
        None => finding(item, Verdict::Skip, release, recommended, "unrecognised kernel release string"),
    }
}

fn check_io_uring_disabled(ctx: &Context) -> Finding {
    let item = "kernel.io_uring_disabled";
    match ctx.host.read("/proc/sys/kernel/io_uring_disabled").as_deref() {
        None => {
            finding(item, Verdict::Pass, "absent (kernel < 6.6)", "0", "this kernel has no switch to disable io_uring")
        }
        Some("0") => finding(item, Verdict::Pass, "0", "0", "io_uring is enabled for all processes"),
        Some("1") => {
            let group = ctx.host.read("/proc/sys/kernel/io_uring_group").unwrap_or_else(|| "?".into());
            finding(item, Verdict::Warn, "1", "0",
                format!("only CAP_SYS_ADMIN and members of kernel.io_uring_group ({group}) may create rings; run the broker in that group or set 0"))
        }
        Some(v) => {
            let mut f = finding(item, Verdict::Fail, v, "0",
                "io_uring_setup returns EPERM for every process; the broker cannot start (sysctl -w kernel.io_uring_disabled=0)");
            f.writes.push(Write {
                path: "/proc/sys/kernel/io_uring_disabled".into(),
                old: v.to_string(),
                new: "0".into(),
                persist: Persist::Sysctl { key: "kernel.io_uring_disabled".into() },
            });
            f
        }
    }
}

fn check_io_uring_probe(probe: &Option<live::UringProbe>) -> Finding {
    let item = "io_uring.probe";
    match probe {
        None => finding(item, Verdict::Skip, "not probed (fixture root)", "io_uring_setup succeeds",
            "a real probe only describes the live host"),
        Some(live::UringProbe::Available { missing_ops }) if missing_ops.is_empty() => finding(item, Verdict::Pass,
            "ring created; all wanted opcodes supported", "io_uring_setup succeeds",
            "glommio and the fetch path can use io_uring"),
        Some(live::UringProbe::Available { missing_ops }) => finding(item, Verdict::Warn,
            format!("ring created; missing opcodes: {}", missing_ops.join(",")), "io_uring_setup succeeds with all opcodes",
            "the kernel is too old for some operations tidelog uses; upgrade the kernel"),
        Some(live::UringProbe::Refused(err)) => finding(item, Verdict::Fail, format!("io_uring_setup failed: {err}"),
            "io_uring_setup succeeds",
            "EPERM: kernel.io_uring_disabled or a seccomp profile blocks it; ENOSYS: kernel built without io_uring; ENOMEM: RLIMIT_MEMLOCK too low (kernels < 5.12)"),
    }
}

fn status_field(host: &Host, field: &str) -> Option<String> {
    let status = host.read_raw("/proc/self/status")?;
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == field).then(|| v.trim().to_string())
    })
}

fn check_seccomp(ctx: &Context, probe: &Option<live::UringProbe>) -> Finding {
    let item = "seccomp";
    let recommended = "0, or a filter that allows io_uring_setup/enter/register";
    match status_field(&ctx.host, "Seccomp").as_deref() {
        None => finding(item, Verdict::Skip, "no Seccomp field in /proc/self/status", recommended, "cannot tell"),
        Some("0") => finding(item, Verdict::Pass, "0 (disabled)", recommended, "no syscall filter"),
        Some("1") => finding(item, Verdict::Fail, "1 (strict)", recommended, "strict mode allows only read/write/exit; nothing else can run"),
        Some("2") => match probe {
            Some(live::UringProbe::Available { .. }) => finding(item, Verdict::Pass, "2 (filter)", recommended,
                "a filter is active but the io_uring probe passed, so it allows io_uring"),
            _ => finding(item, Verdict::Warn, "2 (filter)", recommended,
                "a seccomp filter is active; Docker's default profile blocks io_uring_setup (EPERM): run with a profile that allows io_uring_*"),
        },
        Some(v) => finding(item, Verdict::Skip, v, recommended, "unknown seccomp mode"),
    }
}

/// Names the container runtime the host looks like, if any.
pub fn detect_container(host: &Host) -> Option<String> {
    if host.exists("/.dockerenv") {
        return Some("docker (/.dockerenv)".into());
    }
    if host.exists("/run/.containerenv") {
        return Some("podman (/run/.containerenv)".into());
    }
    if let Some(kind) = host.read("/run/systemd/container") {
        if !kind.is_empty() {
            return Some(format!("{kind} (/run/systemd/container)"));
        }
    }
    if let Some(cgroup) = host.read("/proc/1/cgroup") {
        for (needle, name) in
            [("kubepods", "kubernetes"), ("docker", "docker"), ("containerd", "containerd"), ("lxc", "lxc")]
        {
            if cgroup.contains(needle) {
                return Some(format!("{name} (/proc/1/cgroup)"));
            }
        }
    }
    None
}

fn check_container(ctx: &Context) -> Finding {
    let item = "container";
    match detect_container(&ctx.host) {
        None => finding(item, Verdict::Pass, "none detected", "bare metal or VM",
            "sysctls, IRQs and CPU pinning are the host's own"),
        Some(kind) => finding(item, Verdict::Warn, kind, "bare metal or VM",
            "needs a seccomp profile allowing io_uring, --ulimit memlock, a cpuset of whole cores; host tuning must run on the host"),
    }
}

fn check_shards(ctx: &Context) -> Finding {
    let item = "shards";
    let current = format!(
        "{} shards on CPUs {} of {}",
        ctx.shard_count,
        format_cpu_list(&ctx.shard_cores),
        format_cpu_list(&ctx.cpus)
    );
    if ctx.shard_count > ctx.cpus.len() {
        finding(
            item,
            Verdict::Warn,
            current,
            format!("<= {} (one per CPU)", ctx.cpus.len()),
            "more shards than CPUs: pinned shards would share cores and poll against each other",
        )
    } else {
        finding(
            item,
            Verdict::Pass,
            current,
            format!("<= {} (one per CPU)", ctx.cpus.len()),
            "each shard gets its own core",
        )
    }
}

/// RLIMIT_MEMLOCK; `None` in a field means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemlockLimit {
    /// The limit in force.
    pub soft: Option<u64>,
    /// What an unprivileged process may raise it to.
    pub hard: Option<u64>,
}

/// `Max locked memory` from a `/proc/<pid>/limits` text.
pub fn parse_limits_memlock(text: &str) -> Option<MemlockLimit> {
    let line = text.lines().find(|l| l.starts_with("Max locked memory"))?;
    let mut fields = line.split_whitespace().skip(3);
    let mut value = || -> Option<Option<u64>> {
        match fields.next()? {
            "unlimited" => Some(None),
            v => v.parse().ok().map(Some),
        }
    };
    let soft = value()?;
    let hard = value()?;
    Some(MemlockLimit { soft, hard })
}

fn limit_text(l: Option<u64>) -> String {
    l.map_or("unlimited".to_string(), |l| format!("{l} bytes ({})", human_bytes(l)))
}

fn check_memlock(ctx: &Context) -> Finding {
    let item = "rlimit.memlock";
    let needed = ctx.memlock_needed_bytes();
    let recommended = format!(">= {needed} bytes ({}) or unlimited", human_bytes(needed));
    let why_need = format!(
        "{} shards x (io.memory.bytes {} + {} ring/buffers) are registered as locked memory",
        ctx.shard_count, ctx.io_memory_bytes, SHARD_OVERHEAD_BYTES
    );
    let limit = if ctx.host.is_live() {
        match live::memlock_bytes() {
            Ok((soft, hard)) => Some(MemlockLimit { soft, hard }),
            Err(e) => return finding(item, Verdict::Skip, format!("getrlimit failed: {e}"), recommended, why_need),
        }
    } else {
        ctx.host.read_raw("/proc/self/limits").and_then(|t| parse_limits_memlock(&t))
    };
    let Some(limit) = limit else {
        return finding(item, Verdict::Skip, "unknown", recommended, why_need);
    };
    let covers = |l: Option<u64>| l.is_none_or(|l| l >= needed);
    if ctx.io_memory_bytes < IO_MEMORY_MIN_BYTES {
        return finding(
            item,
            Verdict::Fail,
            limit_text(limit.soft),
            recommended,
            format!(
                "io.memory.bytes {} is below glommio's minimum {IO_MEMORY_MIN_BYTES}: shards refuse to start",
                ctx.io_memory_bytes
            ),
        );
    }
    if covers(limit.soft) {
        return finding(item, Verdict::Pass, limit_text(limit.soft), recommended, why_need);
    }
    if covers(limit.hard) {
        return finding(
            item,
            Verdict::Pass,
            format!("soft {}, hard {}", limit_text(limit.soft), limit_text(limit.hard)),
            recommended,
            format!("{why_need}; the broker raises its soft limit up to the hard limit at start"),
        );
    }
    finding(item, Verdict::Fail, format!("soft {}, hard {}", limit_text(limit.soft), limit_text(limit.hard)), recommended, format!(
        "{why_need}; raise it (ulimit -l, LimitMEMLOCK= in systemd, docker --ulimit memlock=-1) or lower io.memory.bytes/num.shards"))
}

/// Filesystems and how they serve tidelog: verdict and why.
fn fs_verdict(fs_type: &str) -> (Verdict, &'static str) {
    match fs_type {
        "xfs" => (Verdict::Pass, "XFS: O_DIRECT with concurrent aligned writes, fast preallocation, the filesystem tidelog is tuned for"),
        "ext4" => (Verdict::Warn, "ext4 supports O_DIRECT but serialises appending direct writes on the inode lock and converts unwritten extents more slowly; XFS is recommended"),
        "btrfs" | "zfs" | "f2fs" | "bcachefs" => (Verdict::Warn, "copy-on-write/log-structured: O_DIRECT works but adds checksum and CoW overhead; XFS is recommended"),
        "tmpfs" | "ramfs" => (Verdict::Fail, "tmpfs has no O_DIRECT (kernels >= 6.6 only emulate it) and loses every acked record on reboot; put log.dirs on XFS or ext4"),
        "nfs" | "nfs4" | "cifs" | "smb3" | "9p" | "virtiofs" | "ceph" | "glusterfs" => (Verdict::Fail, "network filesystem: O_DIRECT and fdatasync do not give local-disk durability or latency; use a local XFS disk"),
        "overlay" | "aufs" => (Verdict::Fail, "overlay (container root): no real O_DIRECT and copy-up on write; mount a volume on XFS for log.dirs"),
        t if t.starts_with("fuse") => (Verdict::Fail, "FUSE filesystems do not honour O_DIRECT reliably; use a local XFS disk"),
        _ => (Verdict::Warn, "untested filesystem; tidelog needs O_DIRECT and fdatasync that reach the disk; XFS is recommended"),
    }
}

/// Runs the data-dir items and returns the disk behind it, if any.
fn check_data_dir(ctx: &Context, out: &mut Vec<Finding>) -> Option<BlockDevice> {
    let Some(dir) = &ctx.data_dir else {
        out.push(finding(
            "fs.type",
            Verdict::Skip,
            "no --dir or --config given",
            "xfs",
            "name the data dir to audit its filesystem and disk",
        ));
        return None;
    };
    let mounts = ctx.host.read_raw("/proc/self/mountinfo").map(|t| mounts::parse_mountinfo(&t)).unwrap_or_default();
    let Some(mount) = mounts::mount_for(&mounts, dir).cloned() else {
        out.push(finding(
            "fs.type",
            Verdict::Skip,
            format!("{} not found in /proc/self/mountinfo", dir.display()),
            "xfs",
            "cannot tell the filesystem",
        ));
        return None;
    };
    let (verdict, why) = fs_verdict(&mount.fs_type);
    out.push(finding(
        "fs.type",
        verdict,
        format!("{} ({} on {})", mount.fs_type, mount.source, mount.mount_point),
        "xfs",
        why,
    ));
    check_mount_options(&mount, out);
    let disk = mounts::block_device(&ctx.host, &mount.dev);
    match &disk {
        Some(d) => check_disk(ctx, d, out),
        None if mount.dev.starts_with("0:") => out.push(finding(
            "disk.type",
            Verdict::Skip,
            format!("no block device ({} {})", mount.dev, mount.source),
            "nvme",
            "the filesystem has no local block device",
        )),
        None => out.push(finding(
            "disk.type",
            Verdict::Skip,
            format!("{} ({}) not found in /sys/block", mount.dev, mount.source),
            "nvme",
            "sysfs does not show the device (a container, or a device-mapper stack)",
        )),
    }
    disk
}

fn check_mount_options(mount: &Mount, out: &mut Vec<Finding>) {
    let options = mount.options();
    let has = |o: &str| options.iter().any(|x| x == o);
    let atime = ["noatime", "relatime", "strictatime", "lazytime"].into_iter().filter(|o| has(o)).collect::<Vec<_>>();
    let atime_current = if atime.is_empty() { "atime (default)".to_string() } else { atime.join(",") };
    if has("noatime") {
        out.push(finding("mount.atime", Verdict::Pass, atime_current, "noatime", "reads never turn into inode writes"));
    } else {
        out.push(finding(
            "mount.atime",
            Verdict::Warn,
            atime_current,
            "noatime",
            "every fetch can dirty the inode's atime and queue a metadata write; remount with noatime",
        ));
    }
    if has("discard") {
        out.push(finding("mount.discard", Verdict::Warn, "discard", "nodiscard + fstrim.timer",
            "online discard issues TRIMs inline with segment deletes and stalls writes; trim weekly with fstrim.timer instead"));
    } else {
        out.push(finding(
            "mount.discard",
            Verdict::Pass,
            "nodiscard",
            "nodiscard + fstrim.timer",
            "no inline TRIM on the write path",
        ));
    }
    if has("nobarrier") || has("barrier=0") {
        out.push(finding(
            "mount.barrier",
            Verdict::Fail,
            "nobarrier",
            "barrier (default)",
            "fdatasync no longer flushes the disk's write cache: acked records can be lost on power failure",
        ));
    } else {
        out.push(finding(
            "mount.barrier",
            Verdict::Pass,
            "barrier",
            "barrier (default)",
            "fdatasync flushes the disk's write cache",
        ));
    }
}

fn is_nvme(disk: &str) -> bool {
    disk.starts_with("nvme")
}

fn check_disk(ctx: &Context, dev: &BlockDevice, out: &mut Vec<Finding>) {
    let disk = &dev.disk;
    let q = |attr: &str| format!("/sys/block/{disk}/queue/{attr}");
    let rotational = ctx.host.read_u64(&q("rotational"));
    let kind = if is_nvme(disk) {
        "nvme"
    } else if rotational == Some(1) {
        "rotational"
    } else {
        "ssd"
    };
    let name = match &dev.partition {
        Some(p) => format!("{disk} (partition {p}, {kind})"),
        None => format!("{disk} ({kind})"),
    };
    if kind == "nvme" {
        out.push(finding(
            "disk.type",
            Verdict::Pass,
            name,
            "nvme",
            "NVMe: deep parallel queues and low fdatasync latency",
        ));
    } else {
        out.push(finding(
            "disk.type",
            Verdict::Warn,
            name,
            "nvme",
            "SATA/SAS/virtual disks have one shallow queue; produce latency is bounded by fdatasync on it",
        ));
    }
    match rotational {
        Some(0) => out.push(finding("disk.rotational", Verdict::Pass, "0", "0", "solid state")),
        Some(v) => out.push(finding(
            "disk.rotational",
            Verdict::Warn,
            v.to_string(),
            "0",
            "spinning disk: every fdatasync costs milliseconds and cold reads seek",
        )),
        None => out.push(finding("disk.rotational", Verdict::Skip, "unreadable", "0", "cannot tell")),
    }

    // Scheduler: none for NVMe, mq-deadline for spinning disks, either for other SSDs.
    if let Some(raw) = ctx.host.read(&q("scheduler")) {
        let current = selected_choice(&raw).unwrap_or_else(|| raw.clone());
        let choices = available_choices(&raw);
        let (wanted, why): (&[&str], &str) = match kind {
            "nvme" => (&["none"], "NVMe queues do their own ordering; an I/O scheduler only adds a lock and latency"),
            "rotational" => (
                &["mq-deadline"],
                "mq-deadline bounds read starvation behind long sequential writes on a spinning disk",
            ),
            _ => (&["none", "mq-deadline"], "none or mq-deadline keep the submission path short"),
        };
        let recommended = wanted.join(" or ");
        if wanted.contains(&current.as_str()) {
            out.push(finding("disk.scheduler", Verdict::Pass, current, recommended, why));
        } else {
            let mut f = finding("disk.scheduler", Verdict::Warn, current.clone(), recommended, why);
            if choices.len() <= 1 || choices.iter().any(|c| c == wanted[0]) {
                f.writes.push(Write {
                    path: q("scheduler"),
                    old: current,
                    new: wanted[0].to_string(),
                    persist: Persist::Udev { disk: disk.clone(), attr: "queue/scheduler".into() },
                });
            }
            out.push(f);
        }
    }

    if let Some(nomerges) = ctx.host.read(&q("nomerges")) {
        let wanted = match kind {
            "nvme" => Some(("2", "tidelog already submits large aligned writes; trying to merge them only costs CPU")),
            "rotational" => Some(("0", "merging adjacent requests saves seeks on a spinning disk")),
            _ => None,
        };
        match wanted {
            Some((w, why)) if nomerges != w => {
                let mut f = finding("disk.nomerges", Verdict::Warn, nomerges.clone(), w, why);
                f.writes.push(Write {
                    path: q("nomerges"),
                    old: nomerges,
                    new: w.into(),
                    persist: Persist::Udev { disk: disk.clone(), attr: "queue/nomerges".into() },
                });
                out.push(f);
            }
            Some((w, why)) => out.push(finding("disk.nomerges", Verdict::Pass, nomerges, w, why)),
            None => out.push(finding(
                "disk.nomerges",
                Verdict::Pass,
                nomerges,
                "any",
                "either setting is fine on this disk",
            )),
        }
    }

    if let Some(ra) = ctx.host.read_u64(&q("read_ahead_kb")) {
        // tidelog's own reads do not use it: writes are O_DIRECT, and cold
        // fetches turn kernel readahead off and ask for their own
        // (fetch.readahead.bytes, in 128 KiB requests). A large window still
        // hurts: any other buffered reader of the disk (a backup, a log
        // shipper, cp) then reads in requests of up to read_ahead_kb, and the
        // broker's writes and fdatasyncs wait behind them.
        let why = "other buffered readers of this disk read ahead in requests this large, and the broker's fdatasyncs wait behind them (measured on a virtio disk next to one idle-class reader: write+fdatasync p99 24.5 ms at 8192, 2.0 ms at 128); tidelog's own cold fetches do their own readahead";
        if ra <= READ_AHEAD_KB_MAX {
            out.push(finding("disk.read_ahead_kb", Verdict::Pass, ra.to_string(), "<= 512", why));
        } else {
            let mut f = finding("disk.read_ahead_kb", Verdict::Warn, ra.to_string(), "<= 512", why);
            f.writes.push(Write {
                path: q("read_ahead_kb"),
                old: ra.to_string(),
                new: "128".into(),
                persist: Persist::Udev { disk: disk.clone(), attr: "queue/read_ahead_kb".into() },
            });
            out.push(f);
        }
    }

    if let Some(wc) = ctx.host.read(&q("write_cache")) {
        let why = if wc == "write back" {
            "volatile cache: every fdatasync sends a flush, so it is durable; never force 'write through' on a disk without power-loss protection"
        } else {
            "no volatile cache (or power-loss protected): fdatasync needs no flush"
        };
        out.push(finding("disk.write_cache", Verdict::Pass, wc, "as the device reports", why));
    }

    if let Some(nr) = ctx.host.read_u64(&q("nr_requests")) {
        let why = "the accumulator keeps many writes and fetch reads in flight per shard; a shallow block queue throttles them";
        if nr >= 32 {
            out.push(finding("disk.nr_requests", Verdict::Pass, nr.to_string(), ">= 32", why));
        } else {
            let mut f = finding("disk.nr_requests", Verdict::Warn, nr.to_string(), ">= 32", why);
            f.writes.push(Write {
                path: q("nr_requests"),
                old: nr.to_string(),
                new: "64".into(),
                persist: Persist::Udev { disk: disk.clone(), attr: "queue/nr_requests".into() },
            });
            out.push(f);
        }
    }
}

/// One line of `/proc/interrupts`: IRQ number and the action name.
pub fn parse_interrupts(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let (num, rest) = line.trim_start().split_once(':')?;
            let irq = num.parse().ok()?;
            let name = rest.split_whitespace().last()?.to_string();
            Some((irq, name))
        })
        .collect()
}

/// True if an IRQ action name belongs to a device known by `token`: it
/// starts with the token and the next character is not a digit
/// (`nvme0q3` for `nvme0`, not `nvme10q3`), or, for a PCI address token,
/// contains it (`mlx5_comp3@pci:0000:3b:00.0`).
fn irq_matches(name: &str, token: &str) -> bool {
    if token.contains(':') {
        return name.contains(token);
    }
    match name.strip_prefix(token) {
        Some(rest) => !rest.starts_with(|c: char| c.is_ascii_digit()),
        None => false,
    }
}

struct QueueIrq {
    irq: u32,
    cpus: Vec<usize>,
}

fn queue_irqs(host: &Host, interrupts: &[(u32, String)], tokens: &[String]) -> Vec<QueueIrq> {
    let mut out = Vec::new();
    for (irq, name) in interrupts {
        if !tokens.iter().any(|t| irq_matches(name, t)) {
            continue;
        }
        // Control queues carry no data: virtio's config vector, NVMe's admin queue.
        if name.ends_with("-config") || tokens.iter().any(|t| name == &format!("{t}q0")) {
            continue;
        }
        let affinity = host
            .read(&format!("/proc/irq/{irq}/effective_affinity_list"))
            .or_else(|| host.read(&format!("/proc/irq/{irq}/smp_affinity_list")));
        let Some(cpus) = affinity.and_then(|a| parse_cpu_list(&a)) else {
            continue;
        };
        out.push(QueueIrq { irq: *irq, cpus });
    }
    out
}

/// Judges queue IRQ placement against the shard cores and proposes a
/// round-robin spread (queue k on shard core k mod shards) when it is bad.
fn check_irq_group(item: &str, what: &str, irqs: &[QueueIrq], shard_cores: &[usize], movable: bool) -> Finding {
    let current = irqs.iter().map(|q| format!("{}:{}", q.irq, format_cpu_list(&q.cpus))).collect::<Vec<_>>().join(" ");
    let recommended = "one queue IRQ per shard core, spread evenly (or all on non-shard cores)";
    let on_shards: Vec<&QueueIrq> = irqs.iter().filter(|q| q.cpus.iter().any(|c| shard_cores.contains(c))).collect();
    if on_shards.is_empty() {
        return finding(
            item,
            Verdict::Pass,
            current,
            recommended,
            format!("{what} interrupts land on cores no shard uses"),
        );
    }
    let mut per_core: BTreeMap<usize, usize> = BTreeMap::new();
    let mut single = true;
    for q in &on_shards {
        if q.cpus.len() == 1 {
            *per_core.entry(q.cpus[0]).or_default() += 1;
        } else {
            single = false;
        }
    }
    let fair = on_shards.len().div_ceil(shard_cores.len().max(1));
    if single && per_core.values().all(|&n| n <= fair) {
        return finding(
            item,
            Verdict::Pass,
            current,
            recommended,
            format!("{what} queue interrupts are spread across the shard cores"),
        );
    }
    let why = if movable {
        format!("{what} queue interrupts pile onto few cores (or float over many): those shards lose CPU to softirq work and tail latency grows")
    } else {
        format!("{what} queue interrupts pile onto few cores; NVMe queue IRQs are kernel-managed and cannot be moved: give the shards cores that own a queue")
    };
    let mut f = finding(item, Verdict::Warn, current, recommended, why);
    if movable && !shard_cores.is_empty() {
        for (k, q) in irqs.iter().enumerate() {
            let core = shard_cores[k % shard_cores.len()];
            if q.cpus != [core] {
                f.writes.push(Write {
                    path: format!("/proc/irq/{}/smp_affinity_list", q.irq),
                    old: format_cpu_list(&q.cpus),
                    new: core.to_string(),
                    persist: Persist::Unit,
                });
            }
        }
    }
    f
}

/// Physical NICs: entries of /sys/class/net with a backing device.
fn physical_interfaces(host: &Host) -> Vec<String> {
    host.list_dir("/sys/class/net")
        .into_iter()
        .filter(|i| i != "lo" && host.exists(&format!("/sys/class/net/{i}/device")))
        .collect()
}

fn check_irqs_and_nics(ctx: &Context, disk: Option<&BlockDevice>, out: &mut Vec<Finding>) {
    let interrupts = ctx.host.read_raw("/proc/interrupts").map(|t| parse_interrupts(&t)).unwrap_or_default();
    if let Some(d) = disk {
        let mut tokens = vec![d.disk.clone()];
        if is_nvme(&d.disk) {
            let number: String = d.disk.trim_start_matches("nvme").chars().take_while(|c| c.is_ascii_digit()).collect();
            tokens.push(format!("nvme{number}"));
        }
        if let Some(link) = ctx.host.link_basename(&format!("/sys/block/{}/device", d.disk)) {
            tokens.push(link);
        }
        let irqs = queue_irqs(&ctx.host, &interrupts, &tokens);
        if irqs.is_empty() {
            out.push(finding(
                "irq.disk",
                Verdict::Skip,
                format!("no queue IRQs found for {}", d.disk),
                "one queue IRQ per shard core",
                "the device's interrupts are not named after it",
            ));
        } else {
            out.push(check_irq_group("irq.disk", "disk", &irqs, &ctx.shard_cores, !is_nvme(&d.disk)));
        }
    }
    let interfaces = physical_interfaces(&ctx.host);
    if interfaces.is_empty() {
        out.push(finding(
            "net",
            Verdict::Skip,
            "no physical network interface in /sys/class/net",
            "",
            "nothing to audit",
        ));
    }
    for iface in interfaces {
        let mut tokens = vec![iface.clone()];
        if let Some(link) = ctx.host.link_basename(&format!("/sys/class/net/{iface}/device")) {
            tokens.push(link);
        }
        let irqs = queue_irqs(&ctx.host, &interrupts, &tokens);
        let item = format!("irq.net.{iface}");
        if irqs.is_empty() {
            out.push(finding(
                item,
                Verdict::Skip,
                "no queue IRQs found",
                "one queue IRQ per shard core",
                "the NIC's interrupts are not named after it",
            ));
        } else {
            out.push(check_irq_group(&item, &iface, &irqs, &ctx.shard_cores, true));
        }
        check_rps_xps(ctx, &iface, out);
        out.push(check_rings(ctx, &iface));
    }
}

fn check_rps_xps(ctx: &Context, iface: &str, out: &mut Vec<Finding>) {
    let base = format!("/sys/class/net/{iface}/queues");
    let queues = ctx.host.list_dir(&base);
    let rx: Vec<&String> = queues.iter().filter(|q| q.starts_with("rx-")).collect();
    let tx: Vec<&String> = queues.iter().filter(|q| q.starts_with("tx-")).collect();
    let shards = &ctx.shard_cores;

    let rps_item = format!("net.{iface}.rps");
    let rps: Vec<(String, Option<String>)> = rx
        .iter()
        .map(|q| {
            let p = format!("{base}/{q}/rps_cpus");
            let v = ctx.host.read(&p);
            (p, v)
        })
        .collect();
    let rps_current = rps
        .iter()
        .zip(&rx)
        .map(|((_, v), q)| format!("{q}={}", v.as_deref().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(" ");
    let all_cores = format_cpu_mask(shards);
    if rx.is_empty() || rps.iter().all(|(_, v)| v.is_none()) {
        out.push(finding(rps_item, Verdict::Skip, "no rx queues with rps_cpus", "", "RPS not available"));
    } else if rx.len() >= shards.len() {
        out.push(finding(
            rps_item,
            Verdict::Pass,
            rps_current,
            format!("RSS (>= {} rx queues) or rps_cpus={all_cores}", shards.len()),
            format!("{} hardware rx queues spread flows over the {} shard cores", rx.len(), shards.len()),
        ));
    } else {
        let empty = rps.iter().any(|(_, v)| v.as_deref().and_then(parse_cpu_mask).is_none_or(|c| c.is_empty()));
        let recommended = format!("rps_cpus={all_cores} (shard cores {})", format_cpu_list(shards));
        let why = format!(
            "only {} rx queue(s) for {} shards: without RPS one core does all receive processing",
            rx.len(),
            shards.len()
        );
        if empty {
            let mut f = finding(rps_item, Verdict::Warn, rps_current, recommended, why);
            for (p, v) in &rps {
                if let Some(v) = v {
                    if parse_cpu_mask(v).unwrap_or_default() != *shards {
                        f.writes.push(Write {
                            path: p.clone(),
                            old: v.clone(),
                            new: all_cores.clone(),
                            persist: Persist::Unit,
                        });
                    }
                }
            }
            out.push(f);
        } else {
            out.push(finding(rps_item, Verdict::Pass, rps_current, recommended, "RPS spreads receive processing"));
        }
    }

    let xps_item = format!("net.{iface}.xps");
    let xps: Vec<(String, Option<String>)> = tx
        .iter()
        .map(|q| {
            let p = format!("{base}/{q}/xps_cpus");
            let v = ctx.host.read(&p);
            (p, v)
        })
        .collect();
    let xps_current = xps
        .iter()
        .zip(&tx)
        .map(|((_, v), q)| format!("{q}={}", v.as_deref().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join(" ");
    if tx.len() <= 1 || xps.iter().all(|(_, v)| v.is_none()) {
        out.push(finding(
            xps_item,
            Verdict::Skip,
            if tx.is_empty() { "no tx queues".to_string() } else { xps_current },
            "",
            "XPS needs several tx queues",
        ));
        return;
    }
    // tx queue q serves shard cores whose index is q mod tx queues.
    let wanted: Vec<Vec<usize>> = (0..tx.len())
        .map(|qi| shards.iter().enumerate().filter(|(i, _)| i % tx.len() == qi).map(|(_, c)| *c).collect())
        .collect();
    let recommended = wanted
        .iter()
        .enumerate()
        .map(|(qi, c)| format!("tx-{qi}={}", format_cpu_mask(c)))
        .collect::<Vec<_>>()
        .join(" ");
    let empty = xps.iter().any(|(_, v)| v.as_deref().and_then(parse_cpu_mask).is_none_or(|c| c.is_empty()));
    if empty {
        let mut f = finding(xps_item, Verdict::Warn, xps_current, recommended,
            "without XPS a shard may transmit on a queue owned by another core, adding cache-line bouncing and lock contention");
        for ((p, v), want) in xps.iter().zip(&wanted) {
            if let Some(v) = v {
                if parse_cpu_mask(v).unwrap_or_default() != *want {
                    f.writes.push(Write {
                        path: p.clone(),
                        old: v.clone(),
                        new: format_cpu_mask(want),
                        persist: Persist::Unit,
                    });
                }
            }
        }
        out.push(f);
    } else {
        out.push(finding(xps_item, Verdict::Pass, xps_current, recommended, "every tx queue has transmit CPUs"));
    }
}

fn check_rings(ctx: &Context, iface: &str) -> Finding {
    let item = format!("net.{iface}.rings");
    if !ctx.host.is_live() {
        return finding(
            item,
            Verdict::Skip,
            "not readable without ethtool ioctl (fixture root)",
            "rx/tx at the NIC maximum",
            "ring sizes are only exposed through the ethtool ioctl",
        );
    }
    match live::ring_params(iface) {
        Ok(r) => {
            let current = format!("rx {}/{} tx {}/{}", r.rx_pending, r.rx_max_pending, r.tx_pending, r.tx_max_pending);
            let recommended = format!(
                "rx {} tx {} (ethtool -G {iface} rx {} tx {})",
                r.rx_max_pending, r.tx_max_pending, r.rx_max_pending, r.tx_max_pending
            );
            if r.rx_pending < r.rx_max_pending || r.tx_pending < r.tx_max_pending {
                finding(item, Verdict::Warn, current, recommended, "small rings drop packets during bursts of produce traffic; drops become retransmits and latency spikes")
            } else {
                finding(item, Verdict::Pass, current, recommended, "rings at the NIC maximum absorb bursts")
            }
        }
        Err(e) => finding(
            item,
            Verdict::Skip,
            format!("ETHTOOL_GRINGPARAM: {}", live::describe_errno(&e)),
            "rx/tx at the NIC maximum",
            "the driver does not report ring sizes",
        ),
    }
}

/// What a sysctl must satisfy.
#[derive(Debug, Clone, Copy)]
enum Rule {
    AtLeast(u64),
    AtMost(u64),
}

/// (key, rule, value apply writes, why)
const SYSCTLS: [(&str, Rule, u64, &str); 8] = [
    ("net.core.somaxconn", Rule::AtLeast(4096), 4096,
        "accept backlog of each listening port; every shard listens on its own port and clients reconnect in bursts after a metadata refresh"),
    ("net.ipv4.tcp_max_syn_backlog", Rule::AtLeast(4096), 4096,
        "half-open connections queued during a reconnect storm; beyond it SYNs are dropped and clients wait for a 1 s retransmit"),
    ("net.core.rmem_max", Rule::AtLeast(16_777_216), 16_777_216,
        "ceiling for socket receive buffers; large produce requests on high bandwidth-delay links need more than the ~208 KiB default"),
    ("net.core.wmem_max", Rule::AtLeast(16_777_216), 16_777_216,
        "ceiling for socket send buffers; multi-MiB fetch responses stream without stalling the shard"),
    ("vm.swappiness", Rule::AtMost(10), 1,
        "broker memory (accumulators, caches, indexes) must stay resident: a page fault on a shard thread stalls every partition on that core"),
    ("vm.dirty_ratio", Rule::AtMost(20), 10,
        "segment data bypasses the page cache (O_DIRECT); a large dirty backlog from indexes and other processes flushes in bursts that queue ahead of tidelog's fdatasync"),
    ("vm.dirty_background_ratio", Rule::AtMost(10), 5,
        "start background writeback early so it trickles instead of bursting in front of fdatasync"),
    ("net.core.busy_poll", Rule::AtMost(0), 0,
        "socket busy polling spins inside syscalls; glommio shards already poll their rings and need that CPU for other partitions"),
];

fn check_sysctls(ctx: &Context, out: &mut Vec<Finding>) {
    for (key, rule, target, why) in SYSCTLS {
        let item = format!("sysctl.{key}");
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let recommended = match rule {
            Rule::AtLeast(n) => format!(">= {n}"),
            Rule::AtMost(0) => "0".to_string(),
            Rule::AtMost(n) if n == target => format!("<= {n}"),
            Rule::AtMost(n) => format!("<= {n} (apply sets {target})"),
        };
        let Some(raw) = ctx.host.read(&path) else {
            out.push(finding(item, Verdict::Skip, "absent", recommended, why));
            continue;
        };
        let Ok(value) = raw.parse::<u64>() else {
            out.push(finding(item, Verdict::Skip, raw, recommended, why));
            continue;
        };
        let ok = match rule {
            Rule::AtLeast(n) => value >= n,
            Rule::AtMost(n) => value <= n,
        };
        if ok {
            out.push(finding(item, Verdict::Pass, raw, recommended, why));
        } else {
            let mut f = finding(item, Verdict::Warn, raw.clone(), recommended, why);
            f.writes.push(Write {
                path,
                old: raw,
                new: target.to_string(),
                persist: Persist::Sysctl { key: key.to_string() },
            });
            out.push(f);
        }
    }
}

fn check_thp(ctx: &Context, out: &mut Vec<Finding>) {
    for (attr, good, target, why) in [
        (
            "enabled",
            &["madvise", "never"][..],
            "madvise",
            "'always' lets khugepaged collapse and compact memory behind the shards' backs: multi-millisecond stalls",
        ),
        (
            "defrag",
            &["madvise", "defer", "defer+madvise", "never"][..],
            "madvise",
            "'always' makes page faults stall in direct compaction",
        ),
    ] {
        let item = format!("thp.{attr}");
        let path = format!("/sys/kernel/mm/transparent_hugepage/{attr}");
        let Some(raw) = ctx.host.read(&path) else {
            out.push(finding(
                item,
                Verdict::Skip,
                "absent",
                good.join(" or "),
                "kernel without transparent huge pages",
            ));
            continue;
        };
        let current = selected_choice(&raw).unwrap_or_else(|| raw.clone());
        if good.contains(&current.as_str()) {
            out.push(finding(item, Verdict::Pass, current, good.join(" or "), why));
        } else {
            let mut f = finding(item, Verdict::Warn, current.clone(), good.join(" or "), why);
            f.writes.push(Write { path, old: current, new: target.into(), persist: Persist::Unit });
            out.push(f);
        }
    }
}

fn check_governor(ctx: &Context) -> Finding {
    let item = "cpu.governor";
    let why = "shards poll continuously and are latency-bound; ondemand/powersave ramp the clock down between bursts";
    let mut by_governor: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut writes = Vec::new();
    for &cpu in &ctx.shard_cores {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor");
        let Some(g) = ctx.host.read(&path) else { continue };
        let available = ctx.host.read(&format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_available_governors"));
        let can = available.as_deref().is_none_or(|a| a.split_whitespace().any(|x| x == "performance"));
        if g != "performance" && can {
            writes.push(Write { path, old: g.clone(), new: "performance".into(), persist: Persist::Unit });
        }
        by_governor.entry(g).or_default().push(cpu);
    }
    if by_governor.is_empty() {
        return finding(
            item,
            Verdict::Skip,
            "no cpufreq on the shard cores",
            "performance",
            "no frequency scaling exposed (VM or fixed-frequency CPU)",
        );
    }
    let current =
        by_governor.iter().map(|(g, c)| format!("{g} on cpu {}", format_cpu_list(c))).collect::<Vec<_>>().join(", ");
    if by_governor.len() == 1 && by_governor.contains_key("performance") {
        finding(item, Verdict::Pass, current, "performance", why)
    } else {
        let mut f = finding(item, Verdict::Warn, current, "performance", why);
        f.writes = writes;
        f
    }
}

fn check_clocksource(ctx: &Context) -> Finding {
    let item = "clocksource";
    let base = "/sys/devices/system/clocksource/clocksource0";
    let Some(current) = ctx.host.read(&format!("{base}/current_clocksource")) else {
        return finding(item, Verdict::Skip, "absent", "tsc", "cannot tell");
    };
    let why = "tidelog reads the clock for every batch timestamp and latency sample; tsc/kvm-clock are read in the vDSO, hpet/acpi_pm cost a slow device read each";
    if !["hpet", "acpi_pm", "jiffies"].contains(&current.as_str()) {
        return finding(item, Verdict::Pass, current, "tsc (or kvm-clock, arch_sys_counter)", why);
    }
    let mut f = finding(item, Verdict::Warn, current.clone(), "tsc (or kvm-clock, arch_sys_counter)", why);
    let available = ctx.host.read(&format!("{base}/available_clocksource")).unwrap_or_default();
    if available.split_whitespace().any(|c| c == "tsc") {
        f.writes.push(Write {
            path: format!("{base}/current_clocksource"),
            old: current,
            new: "tsc".into(),
            persist: Persist::Unit,
        });
    }
    f
}

fn check_smt(ctx: &Context) -> Finding {
    let item = "cpu.smt";
    let recommended = "one shard per physical core";
    let mut shared = Vec::new();
    let mut seen = 0;
    for &cpu in &ctx.shard_cores {
        let Some(siblings) = ctx.host.read(&format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"))
        else {
            continue;
        };
        seen += 1;
        let siblings = parse_cpu_list(&siblings).unwrap_or_default();
        for s in siblings {
            if s > cpu && ctx.shard_cores.contains(&s) {
                shared.push(format!("{cpu}+{s}"));
            }
        }
    }
    if seen == 0 {
        return finding(item, Verdict::Skip, "no CPU topology", recommended, "cannot tell");
    }
    if shared.is_empty() {
        finding(
            item,
            Verdict::Pass,
            "no two shard cores are SMT siblings",
            recommended,
            "each shard has a physical core's execution units to itself",
        )
    } else {
        finding(item, Verdict::Warn, format!("shard cores share physical cores: {}", shared.join(" ")), recommended,
            "two polling shards on sibling threads halve each other's throughput; use --shards / a cpuset with one thread per core")
    }
}

/// True if any finding failed.
pub fn any_failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.verdict == Verdict::Fail)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn limits_memlock() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\nMax locked memory         8388608              8388608              bytes\n";
        assert_eq!(parse_limits_memlock(text), Some(MemlockLimit { soft: Some(8_388_608), hard: Some(8_388_608) }));
        let text = "Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(parse_limits_memlock(text), Some(MemlockLimit { soft: None, hard: None }));
        assert_eq!(parse_limits_memlock("nothing"), None);
    }

    #[test]
    fn interrupts_and_matching() {
        let text = "           CPU0       CPU1\n 36:          0      32491 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\nNMI:          0          0   Non-maskable interrupts\n";
        assert_eq!(parse_interrupts(text), vec![(36, "virtio1-req.0".to_string())]);
        assert!(irq_matches("nvme0q3", "nvme0"));
        assert!(!irq_matches("nvme10q3", "nvme1"));
        assert!(irq_matches("mlx5_comp3@pci:0000:3b:00.0", "0000:3b:00.0"));
        assert!(irq_matches("eth0-TxRx-0", "eth0"));
        assert!(!irq_matches("eth01-TxRx-0", "eth0"));
    }
}
