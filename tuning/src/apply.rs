//! `tidelog-tune apply`: makes the writes the audit proposes, and persists
//! them as a sysctl.d file, a udev rule and a systemd unit.
//!
//! The writes come from [`crate::check::run_all`]: every non-passing
//! finding that can be fixed at run time carries them. A dry run (the
//! default) prints each write as `path: old -> new`; `--yes` performs them
//! through the root prefix and prints the same list. Runs once in the CLI
//! process.

use crate::check::{Finding, Persist, Verdict, Write};
use crate::host::Host;
use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Name of the sysctl.d file `--persist` writes.
pub const SYSCTL_FILE: &str = "60-tidelog.conf";
/// Name of the udev rules file `--persist` writes.
pub const UDEV_FILE: &str = "60-tidelog.rules";
/// Name of the systemd unit `--persist` writes.
pub const UNIT_FILE: &str = "tidelog-tune.service";

/// A write with the item that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The finding's item name.
    pub item: String,
    /// The write.
    pub write: Write,
}

/// Every write the findings propose, in report order.
pub fn plan(findings: &[Finding]) -> Vec<Planned> {
    findings.iter().flat_map(|f| f.writes.iter().map(|w| Planned { item: f.item.clone(), write: w.clone() })).collect()
}

/// Items that are not passing and have no run-time fix.
pub fn manual_items(findings: &[Finding]) -> Vec<&Finding> {
    findings.iter().filter(|f| matches!(f.verdict, Verdict::Warn | Verdict::Fail) && f.writes.is_empty()).collect()
}

/// Performs (when `yes`) or describes the writes; returns the report text
/// and how many writes failed.
pub fn execute(host: &Host, planned: &[Planned], yes: bool) -> (String, usize) {
    let mut out = String::new();
    let mut failed = 0;
    if planned.is_empty() {
        out.push_str("nothing to change\n");
        return (out, 0);
    }
    for p in planned {
        let w = &p.write;
        if !yes {
            let _ = writeln!(out, "would write {}: {} -> {}  ({})", w.path, w.old, w.new, p.item);
            continue;
        }
        match host.write(&w.path, &w.new) {
            Ok(()) => {
                let _ = writeln!(out, "wrote {}: {} -> {}  ({})", w.path, w.old, w.new, p.item);
            }
            Err(e) => {
                failed += 1;
                let _ = writeln!(out, "FAILED {}: {} -> {}  ({}): {e}", w.path, w.old, w.new, p.item);
            }
        }
    }
    (out, failed)
}

/// The three persistence files and their contents; a file is left out when
/// nothing goes in it.
pub fn persist_files(planned: &[Planned]) -> Vec<(&'static str, String)> {
    let header = "# Written by `tidelog-tune apply --persist`; see tuning/ in the tidelog repository.\n";
    let mut sysctl = String::new();
    let mut udev: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut unit_lines = String::new();
    for p in planned {
        let w = &p.write;
        match &w.persist {
            Persist::Sysctl { key } => {
                let _ = writeln!(sysctl, "{key} = {}", w.new);
            }
            Persist::Udev { disk, attr } => udev.entry(disk.clone()).or_default().push((attr.clone(), w.new.clone())),
            Persist::Unit => {
                let _ = writeln!(unit_lines, "ExecStart=/bin/sh -c 'echo {} > {}'", w.new, w.path);
            }
        }
    }
    let mut files = Vec::new();
    if !sysctl.is_empty() {
        files.push((SYSCTL_FILE, format!("{header}{sysctl}")));
    }
    if !udev.is_empty() {
        let mut rules = String::from(header);
        for (disk, attrs) in &udev {
            let sets: Vec<String> = attrs.iter().map(|(a, v)| format!("ATTR{{{a}}}=\"{v}\"")).collect();
            let _ = writeln!(
                rules,
                "ACTION==\"add|change\", SUBSYSTEM==\"block\", KERNEL==\"{disk}\", {}",
                sets.join(", ")
            );
        }
        files.push((UDEV_FILE, rules));
    }
    if !unit_lines.is_empty() {
        let unit = format!(
            "{header}[Unit]\nDescription=tidelog host tuning (IRQ affinity, RPS/XPS, THP, CPU governor, clocksource)\nAfter=network.target systemd-udev-settle.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n{unit_lines}\n[Install]\nWantedBy=multi-user.target\n"
        );
        files.push((UNIT_FILE, unit));
    }
    files
}

/// Writes (when `yes`) or shows the persistence files in `dir`.
pub fn persist(dir: &Path, planned: &[Planned], yes: bool) -> Result<String> {
    let mut out = String::new();
    let files = persist_files(planned);
    if files.is_empty() {
        out.push_str("persist: nothing to persist\n");
        return Ok(out);
    }
    if yes {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for (name, content) in &files {
        let path: PathBuf = dir.join(name);
        if yes {
            std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
            let _ = writeln!(out, "persist: wrote {}", path.display());
        } else {
            let _ = writeln!(out, "persist: would write {}", path.display());
        }
        for line in content.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    let _ = writeln!(out, "persist: install with:");
    for (name, _) in &files {
        let p = dir.join(name);
        let hint = match *name {
            SYSCTL_FILE => format!("cp {} /etc/sysctl.d/ && sysctl --system", p.display()),
            UDEV_FILE => {
                format!("cp {} /etc/udev/rules.d/ && udevadm control --reload && udevadm trigger -s block", p.display())
            }
            _ => format!("cp {} /etc/systemd/system/ && systemctl enable --now {UNIT_FILE}", p.display()),
        };
        let _ = writeln!(out, "    {hint}");
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn planned(item: &str, path: &str, old: &str, new: &str, persist: Persist) -> Planned {
        Planned { item: item.into(), write: Write { path: path.into(), old: old.into(), new: new.into(), persist } }
    }

    #[test]
    fn persistence_files_group_by_kind() {
        let p = vec![
            planned(
                "sysctl.vm.swappiness",
                "/proc/sys/vm/swappiness",
                "60",
                "1",
                Persist::Sysctl { key: "vm.swappiness".into() },
            ),
            planned(
                "disk.scheduler",
                "/sys/block/sda/queue/scheduler",
                "bfq",
                "mq-deadline",
                Persist::Udev { disk: "sda".into(), attr: "queue/scheduler".into() },
            ),
            planned(
                "disk.nomerges",
                "/sys/block/sda/queue/nomerges",
                "2",
                "0",
                Persist::Udev { disk: "sda".into(), attr: "queue/nomerges".into() },
            ),
            planned("thp.enabled", "/sys/kernel/mm/transparent_hugepage/enabled", "always", "madvise", Persist::Unit),
        ];
        let files = persist_files(&p);
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec![SYSCTL_FILE, UDEV_FILE, UNIT_FILE]);
        assert!(files[0].1.ends_with("\nvm.swappiness = 1\n"));
        assert!(files[1].1.ends_with(
            "\nACTION==\"add|change\", SUBSYSTEM==\"block\", KERNEL==\"sda\", ATTR{queue/scheduler}=\"mq-deadline\", ATTR{queue/nomerges}=\"0\"\n"
        ));
        assert!(files[2]
            .1
            .contains("\nExecStart=/bin/sh -c 'echo madvise > /sys/kernel/mm/transparent_hugepage/enabled'\n"));
        assert!(persist_files(&[]).is_empty());
    }
}
