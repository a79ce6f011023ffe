//! `tidelog-tune apply` against fixture trees: the exact writes (path, old,
//! new) a dry run prints, that a dry run changes nothing, the files after
//! `--yes`, that a second run has nothing left to do, and `--persist`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

/// (path, old, new, item) of every write apply proposes on the SATA host.
const SATA_WRITES: [(&str, &str, &str, &str); 25] = [
    ("/sys/block/sda/queue/scheduler", "bfq", "mq-deadline", "disk.scheduler"),
    ("/sys/block/sda/queue/nomerges", "2", "0", "disk.nomerges"),
    ("/sys/block/sda/queue/read_ahead_kb", "8192", "128", "disk.read_ahead_kb"),
    ("/sys/block/sda/queue/nr_requests", "16", "64", "disk.nr_requests"),
    ("/proc/irq/32/smp_affinity_list", "0", "1", "irq.net.eth0"),
    ("/proc/irq/33/smp_affinity_list", "0-3", "2", "irq.net.eth0"),
    ("/sys/class/net/eth0/queues/rx-0/rps_cpus", "0", "f", "net.eth0.rps"),
    ("/sys/class/net/eth0/queues/rx-1/rps_cpus", "0", "f", "net.eth0.rps"),
    ("/sys/class/net/eth0/queues/tx-0/xps_cpus", "0", "5", "net.eth0.xps"),
    ("/sys/class/net/eth0/queues/tx-1/xps_cpus", "0", "a", "net.eth0.xps"),
    ("/proc/sys/net/core/somaxconn", "128", "4096", "sysctl.net.core.somaxconn"),
    ("/proc/sys/net/ipv4/tcp_max_syn_backlog", "512", "4096", "sysctl.net.ipv4.tcp_max_syn_backlog"),
    ("/proc/sys/net/core/rmem_max", "212992", "16777216", "sysctl.net.core.rmem_max"),
    ("/proc/sys/net/core/wmem_max", "212992", "16777216", "sysctl.net.core.wmem_max"),
    ("/proc/sys/vm/swappiness", "60", "1", "sysctl.vm.swappiness"),
    ("/proc/sys/vm/dirty_ratio", "40", "10", "sysctl.vm.dirty_ratio"),
    ("/proc/sys/vm/dirty_background_ratio", "20", "5", "sysctl.vm.dirty_background_ratio"),
    ("/proc/sys/net/core/busy_poll", "50", "0", "sysctl.net.core.busy_poll"),
    ("/sys/kernel/mm/transparent_hugepage/enabled", "always", "madvise", "thp.enabled"),
    ("/sys/kernel/mm/transparent_hugepage/defrag", "always", "madvise", "thp.defrag"),
    ("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "powersave", "performance", "cpu.governor"),
    ("/sys/devices/system/cpu/cpu1/cpufreq/scaling_governor", "powersave", "performance", "cpu.governor"),
    ("/sys/devices/system/cpu/cpu2/cpufreq/scaling_governor", "powersave", "performance", "cpu.governor"),
    ("/sys/devices/system/cpu/cpu3/cpufreq/scaling_governor", "powersave", "performance", "cpu.governor"),
    ("/sys/devices/system/clocksource/clocksource0/current_clocksource", "hpet", "tsc", "clocksource"),
];

const SATA_MANUAL: [&str; 8] = [
    "manual: kernel.version is 5.10.0-28-amd64; recommended >= 5.15",
    "manual: rlimit.memlock is soft 65536 bytes (64.0 KiB), hard 65536 bytes (64.0 KiB); recommended >= 10485760 bytes (10.0 MiB) or unlimited",
    "manual: fs.type is ext4 (/dev/sda1 on /); recommended xfs",
    "manual: mount.atime is relatime; recommended noatime",
    "manual: mount.discard is discard; recommended nodiscard + fstrim.timer",
    "manual: disk.type is sda (partition sda1, rotational); recommended nvme",
    "manual: disk.rotational is 1; recommended 0",
    "manual: cpu.smt is shard cores share physical cores: 0+1 2+3; recommended one shard per physical core",
];

fn header(t: &Tree) -> String {
    format!(
        "tidelog-tune: root {}, data dir /var/lib/tidelog, 4 shards, io.memory.bytes 2097152, memlock needed 10485760 bytes",
        t.root().display()
    )
}

fn expected_report(t: &Tree, verb: &str, dry_run: bool) -> Vec<String> {
    let mut lines = vec![header(t)];
    if dry_run {
        lines.push("dry run: nothing is written; pass --yes to make these writes".into());
    }
    for (path, old, new, item) in SATA_WRITES {
        lines.push(format!("{verb} {path}: {old} -> {new}  ({item})"));
    }
    lines.extend(SATA_MANUAL.iter().map(|s| s.to_string()));
    lines
}

#[test]
fn dry_run_prints_every_write_and_changes_nothing() {
    let t = sata_ext4_host();
    let root = t.root().to_str().unwrap();
    let before: Vec<String> = SATA_WRITES.iter().map(|(p, ..)| t.read(p)).collect();
    // Dry run is the default, and --dry-run says the same thing.
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["apply", "--root", root, "--dir", "/var/lib/tidelog"];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let got: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
        assert_eq!(got, expected_report(&t, "would write", true));
    }
    let after: Vec<String> = SATA_WRITES.iter().map(|(p, ..)| t.read(p)).collect();
    assert_eq!(before, after);
    assert_eq!(t.read("/proc/sys/vm/swappiness"), "60\n");
    assert_eq!(t.read("/sys/block/sda/queue/scheduler"), "mq-deadline kyber [bfq] none\n");
}

#[test]
fn yes_writes_through_root_then_nothing_is_left() {
    let t = sata_ext4_host();
    let root = t.root().to_str().unwrap();
    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(got, expected_report(&t, "wrote", false));
    for (path, _, new, _) in SATA_WRITES {
        assert_eq!(t.read(path), format!("{new}\n"), "{path}");
    }
    // Files apply had no reason to touch are as they were.
    assert_eq!(t.read("/proc/irq/31/smp_affinity_list"), "0\n");
    assert_eq!(t.read("/sys/block/sda/queue/write_cache"), "write back\n");

    // A second run finds nothing to change, and the audit now passes those items.
    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--yes"]);
    let mut want = vec![header(&t), "nothing to change".to_string()];
    want.extend(SATA_MANUAL.iter().map(|s| s.to_string()));
    assert_eq!(stdout(&out).lines().map(str::to_string).collect::<Vec<_>>(), want);
    let (code, rows, _) = check_json(t.root(), &["--dir", "/var/lib/tidelog"]);
    assert_eq!(code, 1, "memlock still fails");
    let tuned: Vec<&str> = SATA_WRITES.iter().map(|w| w.3).collect();
    for (item, verdict, current) in &rows {
        if tuned.contains(&item.as_str()) {
            assert_eq!(verdict, "pass", "{item} is {current}");
        }
    }
}

#[test]
fn persist_writes_sysctl_udev_and_unit_files() {
    let t = sata_ext4_host();
    let root = t.root().to_str().unwrap();
    let dir = TempDir::new("persist");
    let persist = dir.path().join("out");
    let persist_s = persist.to_str().unwrap();

    // Without --yes the files are shown, not written.
    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--persist", persist_s]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains(&format!("persist: would write {persist_s}/60-tidelog.conf\n")));
    assert!(!persist.exists());

    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--persist", persist_s, "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for name in ["60-tidelog.conf", "60-tidelog.rules", "tidelog-tune.service"] {
        assert!(text.contains(&format!("persist: wrote {persist_s}/{name}\n")), "{text}");
    }
    let header = "# Written by `tidelog-tune apply --persist`; see tuning/ in the tidelog repository.\n";
    assert_eq!(
        std::fs::read_to_string(persist.join("60-tidelog.conf")).unwrap(),
        format!(
            "{header}net.core.somaxconn = 4096\nnet.ipv4.tcp_max_syn_backlog = 4096\nnet.core.rmem_max = 16777216\n\
             net.core.wmem_max = 16777216\nvm.swappiness = 1\nvm.dirty_ratio = 10\nvm.dirty_background_ratio = 5\n\
             net.core.busy_poll = 0\n"
        )
    );
    assert_eq!(
        std::fs::read_to_string(persist.join("60-tidelog.rules")).unwrap(),
        format!(
            "{header}ACTION==\"add|change\", SUBSYSTEM==\"block\", KERNEL==\"sda\", ATTR{{queue/scheduler}}=\"mq-deadline\", \
             ATTR{{queue/nomerges}}=\"0\", ATTR{{queue/read_ahead_kb}}=\"128\", ATTR{{queue/nr_requests}}=\"64\"\n"
        )
    );
    let execs: String = SATA_WRITES
        .iter()
        .filter(|w| !w.0.starts_with("/proc/sys/") && !w.0.starts_with("/sys/block/"))
        .map(|(path, _, new, _)| format!("ExecStart=/bin/sh -c 'echo {new} > {path}'\n"))
        .collect();
    assert_eq!(
        std::fs::read_to_string(persist.join("tidelog-tune.service")).unwrap(),
        format!(
            "{header}[Unit]\nDescription=tidelog host tuning (IRQ affinity, RPS/XPS, THP, CPU governor, clocksource)\n\
             After=network.target systemd-udev-settle.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n{execs}\n\
             [Install]\nWantedBy=multi-user.target\n"
        )
    );
}

#[test]
fn well_tuned_nvme_host_needs_nothing() {
    let t = nvme_xfs_host();
    let root = t.root().to_str().unwrap();
    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--yes"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!(
            "tidelog-tune: root {root}, data dir /var/lib/tidelog, 4 shards, io.memory.bytes 2097152, memlock needed 10485760 bytes\n\
             nothing to change\n"
        )
    );
}

#[test]
fn container_gets_io_uring_reenabled_and_the_rest_is_manual() {
    let t = container_host();
    let root = t.root().to_str().unwrap();
    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--shards", "2", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "tidelog-tune: root {root}, data dir /var/lib/tidelog, 2 shards, io.memory.bytes 2097152, memlock needed 5242880 bytes\n\
             wrote /proc/sys/kernel/io_uring_disabled: 2 -> 0  (kernel.io_uring_disabled)\n\
             manual: seccomp is 2 (filter); recommended 0, or a filter that allows io_uring_setup/enter/register\n\
             manual: container is docker (/.dockerenv); recommended bare metal or VM\n\
             manual: fs.type is overlay (overlay on /); recommended xfs\n\
             manual: mount.atime is relatime; recommended noatime\n"
        )
    );
    assert_eq!(t.read("/proc/sys/kernel/io_uring_disabled"), "0\n");
}

#[test]
fn a_failed_write_is_reported_and_exits_1() {
    let t = sata_ext4_host();
    let root = t.root().to_str().unwrap();
    // The kernel's own read-only sysctl: readable, numeric (65536 > 10, so
    // vm.swappiness warns) and refused for writing even to root.
    let swappiness = t.root().join("proc/sys/vm/swappiness");
    std::fs::remove_file(&swappiness).unwrap();
    std::os::unix::fs::symlink("/proc/sys/kernel/ngroups_max", &swappiness).unwrap();
    let out = run(&["apply", "--root", root, "--dir", "/var/lib/tidelog", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAILED ")).collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(
        failed[0].starts_with("FAILED /proc/sys/vm/swappiness: 65536 -> 1  (sysctl.vm.swappiness): "),
        "{}",
        failed[0]
    );
    assert_eq!(text.lines().filter(|l| l.starts_with("wrote ")).count(), SATA_WRITES.len() - 1);
    assert!(text.ends_with("1 write(s) failed\n"), "{text}");
}
