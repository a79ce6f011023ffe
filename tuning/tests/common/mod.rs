//! Fixture trees of `/proc` and `/sys` for the tidelog-tune black-box tests,
//! generated into a temp dir per test, and a runner for the real binary.
//!
//! Four hosts: a well-tuned NVMe host with its data dir on XFS, a SATA host
//! on ext4 with untuned sysctls, a container without io_uring, and a host
//! whose data dir is on tmpfs.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tidelog-tune-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fixture root being built.
pub struct Tree {
    pub dir: TempDir,
}

impl Tree {
    pub fn new(tag: &str) -> Tree {
        Tree { dir: TempDir::new(tag) }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `content` plus a newline at host path `path`.
    pub fn file(&self, path: &str, content: &str) -> &Tree {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{content}\n")).unwrap();
        self
    }

    pub fn symlink(&self, path: &str, target: &str) -> &Tree {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
        self
    }

    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.root().join(path.trim_start_matches('/'))).unwrap()
    }

    fn sysctl(&self, key: &str, value: &str) -> &Tree {
        self.file(&format!("/proc/sys/{}", key.replace('.', "/")), value)
    }

    fn limits(&self, memlock: &str) -> &Tree {
        self.file(
            "/proc/self/limits",
            &format!(
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max open files            1024                 1048576              files\n\
                 Max locked memory         {memlock:<20} {memlock:<20} bytes"
            ),
        )
    }

    fn irq(&self, irq: u32, affinity: &str) -> &Tree {
        self.file(&format!("/proc/irq/{irq}/smp_affinity_list"), affinity)
    }
}

/// A well-tuned NVMe host: data dir /var/lib/tidelog on XFS on the second
/// partition of nvme0n1, 4 CPUs, a 4-queue mlx5 NIC.
pub fn nvme_xfs_host() -> Tree {
    let t = Tree::new("nvme");
    t.file("/proc/sys/kernel/osrelease", "6.1.0-18-amd64")
        .sysctl("kernel.io_uring_disabled", "0")
        .file("/proc/self/status", "Name:\ttidelog-tune\nSeccomp:\t0\nSeccomp_filters:\t0")
        .limits("unlimited")
        .file("/sys/devices/system/cpu/online", "0-3")
        .file(
            "/proc/self/mountinfo",
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n\
             40 22 259:2 / /var/lib/tidelog rw,noatime shared:2 - xfs /dev/nvme0n1p2 rw,attr2,inode64,logbufs=8,logbsize=256k,noquota",
        )
        .file("/sys/block/nvme0n1/dev", "259:0")
        .file("/sys/block/nvme0n1/nvme0n1p1/dev", "259:1")
        .file("/sys/block/nvme0n1/nvme0n1p2/dev", "259:2")
        .symlink("/sys/block/nvme0n1/device", "../../nvme0")
        .file("/sys/block/nvme0n1/queue/rotational", "0")
        .file("/sys/block/nvme0n1/queue/scheduler", "[none] mq-deadline")
        .file("/sys/block/nvme0n1/queue/nomerges", "2")
        .file("/sys/block/nvme0n1/queue/read_ahead_kb", "128")
        .file("/sys/block/nvme0n1/queue/write_cache", "write through")
        .file("/sys/block/nvme0n1/queue/nr_requests", "1023")
        .file(
            "/proc/interrupts",
            "            CPU0       CPU1       CPU2       CPU3\n\
             \x2040:         12          0          0          0  IR-PCI-MSIX-0000:01:00.0    0-edge      nvme0q0\n\
             \x2041:       9000          0          0          0  IR-PCI-MSIX-0000:01:00.0    1-edge      nvme0q1\n\
             \x2042:          0       9000          0          0  IR-PCI-MSIX-0000:01:00.0    2-edge      nvme0q2\n\
             \x2043:          0          0       9000          0  IR-PCI-MSIX-0000:01:00.0    3-edge      nvme0q3\n\
             \x2044:          0          0          0       9000  IR-PCI-MSIX-0000:01:00.0    4-edge      nvme0q4\n\
             \x2060:        500          0          0          0  IR-PCI-MSIX-0000:3b:00.0    0-edge      mlx5_comp0@pci:0000:3b:00.0\n\
             \x2061:          0        500          0          0  IR-PCI-MSIX-0000:3b:00.0    1-edge      mlx5_comp1@pci:0000:3b:00.0\n\
             \x2062:          0          0        500          0  IR-PCI-MSIX-0000:3b:00.0    2-edge      mlx5_comp2@pci:0000:3b:00.0\n\
             \x2063:          0          0          0        500  IR-PCI-MSIX-0000:3b:00.0    3-edge      mlx5_comp3@pci:0000:3b:00.0\n\
             NMI:          0          0          0          0   Non-maskable interrupts",
        )
        .irq(40, "0")
        .irq(41, "0")
        .irq(42, "1")
        .irq(43, "2")
        .irq(44, "3")
        .irq(60, "0")
        .irq(61, "1")
        .irq(62, "2")
        .irq(63, "3")
        .file("/sys/class/net/lo/mtu", "65536")
        .symlink("/sys/class/net/eth0/device", "../../../0000:3b:00.0");
    for q in 0..4 {
        t.file(&format!("/sys/class/net/eth0/queues/rx-{q}/rps_cpus"), "0");
        t.file(&format!("/sys/class/net/eth0/queues/tx-{q}/xps_cpus"), &format!("{:x}", 1 << q));
    }
    t.sysctl("net.core.somaxconn", "4096")
        .sysctl("net.ipv4.tcp_max_syn_backlog", "8192")
        .sysctl("net.core.rmem_max", "16777216")
        .sysctl("net.core.wmem_max", "16777216")
        .sysctl("vm.swappiness", "1")
        .sysctl("vm.dirty_ratio", "10")
        .sysctl("vm.dirty_background_ratio", "5")
        .sysctl("net.core.busy_poll", "0")
        .file("/sys/kernel/mm/transparent_hugepage/enabled", "always [madvise] never")
        .file("/sys/kernel/mm/transparent_hugepage/defrag", "always defer defer+madvise [madvise] never")
        .file("/sys/devices/system/clocksource/clocksource0/current_clocksource", "tsc")
        .file("/sys/devices/system/clocksource/clocksource0/available_clocksource", "tsc hpet acpi_pm");
    for cpu in 0..4 {
        t.file(&format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"), "performance");
        t.file(
            &format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_available_governors"),
            "performance powersave",
        );
        t.file(
            &format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"),
            &format!("{cpu},{}", cpu + 4),
        );
    }
    t
}

/// An untuned SATA host: data dir on ext4 (relatime, discard) on a spinning
/// sda1, 4 CPUs as 2 cores x 2 threads, a 2-queue NIC with both IRQs on
/// CPU 0, a 64 KiB memlock limit, Linux 5.10.
pub fn sata_ext4_host() -> Tree {
    let t = Tree::new("sata");
    t.file("/proc/sys/kernel/osrelease", "5.10.0-28-amd64")
        .file("/proc/self/status", "Name:\ttidelog-tune\nSeccomp:\t0")
        .limits("65536")
        .file("/sys/devices/system/cpu/online", "0-3")
        .file("/proc/self/mountinfo", "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,discard,errors=remount-ro")
        .file("/sys/block/sda/dev", "8:0")
        .file("/sys/block/sda/sda1/dev", "8:1")
        .symlink("/sys/block/sda/device", "../../../0:0:0:0")
        .file("/sys/block/sda/queue/rotational", "1")
        .file("/sys/block/sda/queue/scheduler", "mq-deadline kyber [bfq] none")
        .file("/sys/block/sda/queue/nomerges", "2")
        .file("/sys/block/sda/queue/read_ahead_kb", "8192")
        .file("/sys/block/sda/queue/write_cache", "write back")
        .file("/sys/block/sda/queue/nr_requests", "16")
        .file(
            "/proc/interrupts",
            "            CPU0       CPU1       CPU2       CPU3\n\
             \x2030:       4000          0          0          0  IR-PCI-MSI 376832-edge      ahci[0000:00:17.0]\n\
             \x2031:       7000          0          0          0  IR-PCI-MSI 1048576-edge      eth0-TxRx-0\n\
             \x2032:       7000          0          0          0  IR-PCI-MSI 1048577-edge      eth0-TxRx-1\n\
             \x2033:          3          0          0          0  IR-PCI-MSI 1048578-edge      eth0",
        )
        .irq(30, "0")
        .irq(31, "0")
        .irq(32, "0")
        .irq(33, "0-3")
        .symlink("/sys/class/net/eth0/device", "../../../0000:02:00.0")
        .file("/sys/class/net/eth0/queues/rx-0/rps_cpus", "0")
        .file("/sys/class/net/eth0/queues/rx-1/rps_cpus", "0")
        .file("/sys/class/net/eth0/queues/tx-0/xps_cpus", "0")
        .file("/sys/class/net/eth0/queues/tx-1/xps_cpus", "0")
        .file("/sys/class/net/docker0/mtu", "1500")
        .sysctl("net.core.somaxconn", "128")
        .sysctl("net.ipv4.tcp_max_syn_backlog", "512")
        .sysctl("net.core.rmem_max", "212992")
        .sysctl("net.core.wmem_max", "212992")
        .sysctl("vm.swappiness", "60")
        .sysctl("vm.dirty_ratio", "40")
        .sysctl("vm.dirty_background_ratio", "20")
        .sysctl("net.core.busy_poll", "50")
        .file("/sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never")
        .file("/sys/kernel/mm/transparent_hugepage/defrag", "[always] defer defer+madvise madvise never")
        .file("/sys/devices/system/clocksource/clocksource0/current_clocksource", "hpet")
        .file("/sys/devices/system/clocksource/clocksource0/available_clocksource", "tsc hpet acpi_pm");
    for cpu in 0..4 {
        t.file(&format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"), "powersave");
        t.file(
            &format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_available_governors"),
            "performance powersave",
        );
        let siblings = if cpu < 2 { "0-1" } else { "2-3" };
        t.file(&format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"), siblings);
    }
    t
}

/// A Docker container on Linux 6.8 with io_uring disabled by sysctl and the
/// default seccomp filter; the data dir was left on the overlay root.
pub fn container_host() -> Tree {
    let t = Tree::new("container");
    t.file("/proc/sys/kernel/osrelease", "6.8.0-35-generic")
        .sysctl("kernel.io_uring_disabled", "2")
        .file("/proc/self/status", "Name:\ttidelog-tune\nSeccomp:\t2\nSeccomp_filters:\t1")
        .file("/.dockerenv", "")
        .limits("8388608")
        .file("/sys/devices/system/cpu/online", "0-1")
        .file(
            "/proc/self/mountinfo",
            "500 400 0:52 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/A,upperdir=/u,workdir=/w\n\
             501 500 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw",
        )
        .file("/sys/class/net/lo/mtu", "65536")
        .file("/sys/class/net/eth0/mtu", "1500")
        .sysctl("net.core.somaxconn", "4096")
        .sysctl("net.ipv4.tcp_max_syn_backlog", "4096");
    t
}

/// The NVMe host with `log.dirs` pointing at a tmpfs mount.
pub fn tmpfs_host() -> Tree {
    let t = nvme_xfs_host();
    let mountinfo = t.read("/proc/self/mountinfo");
    t.file(
        "/proc/self/mountinfo",
        &format!(
            "{}45 22 0:25 / /run/tidelog rw,nosuid,nodev,relatime shared:5 - tmpfs tmpfs rw,size=1048576k,mode=755",
            mountinfo
        ),
    );
    t
}

/// Runs the tidelog-tune binary.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidelog-tune")).args(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// `check --json` against a fixture: (exit code, [(item, verdict, current)]).
pub fn check_json(root: &Path, extra: &[&str]) -> (i32, Vec<(String, String, String)>, serde_json::Value) {
    let mut args = vec!["check", "--root", root.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = run(&args);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("bad json ({e}): {}\nstderr: {}", stdout(&out), stderr(&out)));
    let rows = json
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["item"].as_str().unwrap().to_string(),
                f["verdict"].as_str().unwrap().to_string(),
                f["current"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (out.status.code().unwrap(), rows, json)
}

/// Turns `[("item", "pass", "current")]` literals into owned rows.
pub fn rows(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect()
}
