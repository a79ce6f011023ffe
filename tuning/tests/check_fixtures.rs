//! `tidelog-tune check` against fixture trees: the exact verdict and current
//! value of every item on four kinds of host, and the exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

#[test]
fn nvme_host_on_xfs_passes_everything() {
    let t = nvme_xfs_host();
    let (code, got, _) = check_json(t.root(), &["--dir", "/var/lib/tidelog/data"]);
    let want = rows(&[
        ("kernel.version", "pass", "6.1.0-18-amd64"),
        ("kernel.io_uring_disabled", "pass", "0"),
        ("io_uring.probe", "skip", "not probed (fixture root)"),
        ("seccomp", "pass", "0 (disabled)"),
        ("container", "pass", "none detected"),
        ("shards", "pass", "4 shards on CPUs 0-3 of 0-3"),
        ("rlimit.memlock", "pass", "unlimited"),
        ("fs.type", "pass", "xfs (/dev/nvme0n1p2 on /var/lib/tidelog)"),
        ("mount.atime", "pass", "noatime"),
        ("mount.discard", "pass", "nodiscard"),
        ("mount.barrier", "pass", "barrier"),
        ("disk.type", "pass", "nvme0n1 (partition nvme0n1p2, nvme)"),
        ("disk.rotational", "pass", "0"),
        ("disk.scheduler", "pass", "none"),
        ("disk.nomerges", "pass", "2"),
        ("disk.read_ahead_kb", "pass", "128"),
        ("disk.write_cache", "pass", "write through"),
        ("disk.nr_requests", "pass", "1023"),
        ("irq.disk", "pass", "41:0 42:1 43:2 44:3"),
        ("irq.net.eth0", "pass", "60:0 61:1 62:2 63:3"),
        ("net.eth0.rps", "pass", "rx-0=0 rx-1=0 rx-2=0 rx-3=0"),
        ("net.eth0.xps", "pass", "tx-0=1 tx-1=2 tx-2=4 tx-3=8"),
        ("net.eth0.rings", "skip", "not readable without ethtool ioctl (fixture root)"),
        ("sysctl.net.core.somaxconn", "pass", "4096"),
        ("sysctl.net.ipv4.tcp_max_syn_backlog", "pass", "8192"),
        ("sysctl.net.core.rmem_max", "pass", "16777216"),
        ("sysctl.net.core.wmem_max", "pass", "16777216"),
        ("sysctl.vm.swappiness", "pass", "1"),
        ("sysctl.vm.dirty_ratio", "pass", "10"),
        ("sysctl.vm.dirty_background_ratio", "pass", "5"),
        ("sysctl.net.core.busy_poll", "pass", "0"),
        ("thp.enabled", "pass", "madvise"),
        ("thp.defrag", "pass", "madvise"),
        ("cpu.governor", "pass", "performance on cpu 0-3"),
        ("clocksource", "pass", "tsc"),
        ("cpu.smt", "pass", "no two shard cores are SMT siblings"),
    ]);
    assert_eq!(got, want);
    assert_eq!(code, 0);
}

#[test]
fn sata_host_on_ext4_warns_and_fails_memlock() {
    let t = sata_ext4_host();
    let (code, got, json) = check_json(t.root(), &["--dir", "/var/lib/tidelog"]);
    let want = rows(&[
        ("kernel.version", "warn", "5.10.0-28-amd64"),
        ("kernel.io_uring_disabled", "pass", "absent (kernel < 6.6)"),
        ("io_uring.probe", "skip", "not probed (fixture root)"),
        ("seccomp", "pass", "0 (disabled)"),
        ("container", "pass", "none detected"),
        ("shards", "pass", "4 shards on CPUs 0-3 of 0-3"),
        ("rlimit.memlock", "fail", "soft 65536 bytes (64.0 KiB), hard 65536 bytes (64.0 KiB)"),
        ("fs.type", "warn", "ext4 (/dev/sda1 on /)"),
        ("mount.atime", "warn", "relatime"),
        ("mount.discard", "warn", "discard"),
        ("mount.barrier", "pass", "barrier"),
        ("disk.type", "warn", "sda (partition sda1, rotational)"),
        ("disk.rotational", "warn", "1"),
        ("disk.scheduler", "warn", "bfq"),
        ("disk.nomerges", "warn", "2"),
        ("disk.read_ahead_kb", "warn", "8192"),
        ("disk.write_cache", "pass", "write back"),
        ("disk.nr_requests", "warn", "16"),
        ("irq.disk", "skip", "no queue IRQs found for sda"),
        ("irq.net.eth0", "warn", "31:0 32:0 33:0-3"),
        ("net.eth0.rps", "warn", "rx-0=0 rx-1=0"),
        ("net.eth0.xps", "warn", "tx-0=0 tx-1=0"),
        ("net.eth0.rings", "skip", "not readable without ethtool ioctl (fixture root)"),
        ("sysctl.net.core.somaxconn", "warn", "128"),
        ("sysctl.net.ipv4.tcp_max_syn_backlog", "warn", "512"),
        ("sysctl.net.core.rmem_max", "warn", "212992"),
        ("sysctl.net.core.wmem_max", "warn", "212992"),
        ("sysctl.vm.swappiness", "warn", "60"),
        ("sysctl.vm.dirty_ratio", "warn", "40"),
        ("sysctl.vm.dirty_background_ratio", "warn", "20"),
        ("sysctl.net.core.busy_poll", "warn", "50"),
        ("thp.enabled", "warn", "always"),
        ("thp.defrag", "warn", "always"),
        ("cpu.governor", "warn", "powersave on cpu 0-3"),
        ("clocksource", "warn", "hpet"),
        ("cpu.smt", "warn", "shard cores share physical cores: 0+1 2+3"),
    ]);
    assert_eq!(got, want);
    assert_eq!(code, 1);
    // The memlock finding names exactly what the shards need.
    let memlock = json.as_array().unwrap().iter().find(|f| f["item"] == "rlimit.memlock").unwrap();
    assert_eq!(memlock["recommended"], ">= 10485760 bytes (10.0 MiB) or unlimited");
    assert_eq!(
        memlock["why"],
        "4 shards x (io.memory.bytes 2097152 + 524288 ring/buffers) are registered as locked memory; \
         raise it (ulimit -l, LimitMEMLOCK= in systemd, docker --ulimit memlock=-1) or lower io.memory.bytes/num.shards"
    );
    // Every finding carries all five fields.
    for f in json.as_array().unwrap() {
        let keys: Vec<&String> = f.as_object().unwrap().keys().collect();
        assert_eq!(keys, vec!["current", "item", "recommended", "verdict", "why"]);
    }
}

#[test]
fn container_without_io_uring_fails() {
    let t = container_host();
    let (code, got, json) = check_json(t.root(), &["--dir", "/var/lib/tidelog", "--shards", "2"]);
    let want = rows(&[
        ("kernel.version", "pass", "6.8.0-35-generic"),
        ("kernel.io_uring_disabled", "fail", "2"),
        ("io_uring.probe", "skip", "not probed (fixture root)"),
        ("seccomp", "warn", "2 (filter)"),
        ("container", "warn", "docker (/.dockerenv)"),
        ("shards", "pass", "2 shards on CPUs 0-1 of 0-1"),
        ("rlimit.memlock", "pass", "8388608 bytes (8.0 MiB)"),
        ("fs.type", "fail", "overlay (overlay on /)"),
        ("mount.atime", "warn", "relatime"),
        ("mount.discard", "pass", "nodiscard"),
        ("mount.barrier", "pass", "barrier"),
        ("disk.type", "skip", "no block device (0:52 overlay)"),
        ("net", "skip", "no physical network interface in /sys/class/net"),
        ("sysctl.net.core.somaxconn", "pass", "4096"),
        ("sysctl.net.ipv4.tcp_max_syn_backlog", "pass", "4096"),
        ("sysctl.net.core.rmem_max", "skip", "absent"),
        ("sysctl.net.core.wmem_max", "skip", "absent"),
        ("sysctl.vm.swappiness", "skip", "absent"),
        ("sysctl.vm.dirty_ratio", "skip", "absent"),
        ("sysctl.vm.dirty_background_ratio", "skip", "absent"),
        ("sysctl.net.core.busy_poll", "skip", "absent"),
        ("thp.enabled", "skip", "absent"),
        ("thp.defrag", "skip", "absent"),
        ("cpu.governor", "skip", "no cpufreq on the shard cores"),
        ("clocksource", "skip", "absent"),
        ("cpu.smt", "skip", "no CPU topology"),
    ]);
    assert_eq!(got, want);
    assert_eq!(code, 1);
    let seccomp = json.as_array().unwrap().iter().find(|f| f["item"] == "seccomp").unwrap();
    assert_eq!(
        seccomp["why"],
        "a seccomp filter is active; Docker's default profile blocks io_uring_setup (EPERM): run with a profile that allows io_uring_*"
    );
}

#[test]
fn tmpfs_data_dir_from_config_fails() {
    let t = tmpfs_host();
    let cfg = t.root().join("server.properties");
    std::fs::write(
        &cfg,
        "# tidelog\nlog.dirs=/run/tidelog/data, /var/lib/tidelog\nnum.shards=2\nio.memory.bytes=1048576\n",
    )
    .unwrap();
    let (code, got, json) = check_json(t.root(), &["--config", cfg.to_str().unwrap()]);
    let want = rows(&[
        ("kernel.version", "pass", "6.1.0-18-amd64"),
        ("kernel.io_uring_disabled", "pass", "0"),
        ("io_uring.probe", "skip", "not probed (fixture root)"),
        ("seccomp", "pass", "0 (disabled)"),
        ("container", "pass", "none detected"),
        ("shards", "pass", "2 shards on CPUs 0-1 of 0-3"),
        ("rlimit.memlock", "pass", "unlimited"),
        ("fs.type", "fail", "tmpfs (tmpfs on /run/tidelog)"),
        ("mount.atime", "warn", "relatime"),
        ("mount.discard", "pass", "nodiscard"),
        ("mount.barrier", "pass", "barrier"),
        ("disk.type", "skip", "no block device (0:25 tmpfs)"),
        ("irq.net.eth0", "pass", "60:0 61:1 62:2 63:3"),
        ("net.eth0.rps", "pass", "rx-0=0 rx-1=0 rx-2=0 rx-3=0"),
        ("net.eth0.xps", "pass", "tx-0=1 tx-1=2 tx-2=4 tx-3=8"),
        ("net.eth0.rings", "skip", "not readable without ethtool ioctl (fixture root)"),
        ("sysctl.net.core.somaxconn", "pass", "4096"),
        ("sysctl.net.ipv4.tcp_max_syn_backlog", "pass", "8192"),
        ("sysctl.net.core.rmem_max", "pass", "16777216"),
        ("sysctl.net.core.wmem_max", "pass", "16777216"),
        ("sysctl.vm.swappiness", "pass", "1"),
        ("sysctl.vm.dirty_ratio", "pass", "10"),
        ("sysctl.vm.dirty_background_ratio", "pass", "5"),
        ("sysctl.net.core.busy_poll", "pass", "0"),
        ("thp.enabled", "pass", "madvise"),
        ("thp.defrag", "pass", "madvise"),
        ("cpu.governor", "pass", "performance on cpu 0-1"),
        ("clocksource", "pass", "tsc"),
        ("cpu.smt", "pass", "no two shard cores are SMT siblings"),
    ]);
    assert_eq!(got, want);
    assert_eq!(code, 1);
    let fs = json.as_array().unwrap().iter().find(|f| f["item"] == "fs.type").unwrap();
    assert_eq!(
        fs["why"],
        "tmpfs has no O_DIRECT (kernels >= 6.6 only emulate it) and loses every acked record on reboot; put log.dirs on XFS or ext4"
    );
}

#[test]
fn text_report_has_one_line_per_item() {
    let t = nvme_xfs_host();
    let out = run(&["check", "--root", t.root().to_str().unwrap(), "--dir", "/var/lib/tidelog"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 36 + 1);
    assert_eq!(
        lines[0],
        format!(
            "tidelog-tune: root {}, data dir /var/lib/tidelog, 4 shards, io.memory.bytes 2097152, memlock needed 10485760 bytes",
            t.root().display()
        )
    );
    assert_eq!(
        lines[8],
        "PASS  fs.type                      current: xfs (/dev/nvme0n1p2 on /var/lib/tidelog); recommended: xfs -- \
         XFS: O_DIRECT with concurrent aligned writes, fast preallocation, the filesystem tidelog is tuned for"
    );
    assert_eq!(lines[37], "summary: 34 pass, 0 warn, 0 fail, 2 skip");
}

#[test]
fn memlock_below_soft_but_within_hard_passes() {
    let t = nvme_xfs_host();
    t.file(
        "/proc/self/limits",
        "Limit                     Soft Limit           Hard Limit           Units\n\
         Max locked memory         65536                unlimited            bytes",
    );
    let (_, _, json) = check_json(t.root(), &["--shards", "2"]);
    let memlock = json.as_array().unwrap().iter().find(|f| f["item"] == "rlimit.memlock").unwrap();
    assert_eq!(memlock["verdict"], "pass");
    assert_eq!(memlock["current"], "soft 65536 bytes (64.0 KiB), hard unlimited");
    assert_eq!(
        memlock["why"],
        "2 shards x (io.memory.bytes 2097152 + 524288 ring/buffers) are registered as locked memory; \
         the broker raises its soft limit up to the hard limit at start"
    );
}
