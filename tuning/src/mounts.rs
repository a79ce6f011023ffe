//! Which mount and which block device hold a path, from
//! `/proc/self/mountinfo` and `/sys/block`.
//!
//! The data dir is matched against mount points by longest prefix on path
//! components; the mount's `major:minor` is then looked up among whole disks
//! (`/sys/block/<disk>/dev`) and their partitions
//! (`/sys/block/<disk>/<part>/dev`), so a partition maps to the disk whose
//! queue settings apply to it.

use crate::host::Host;
use std::path::Path;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the filesystem's device (`0:N` when there is none).
    pub dev: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// Per-mount options (`rw,noatime`).
    pub mount_options: String,
    /// Filesystem type (`xfs`).
    pub fs_type: String,
    /// Mount source (`/dev/nvme0n1p1`).
    pub source: String,
    /// Superblock options (`rw,inode64,logbufs=8`).
    pub super_options: String,
}

impl Mount {
    /// Per-mount and superblock options together.
    pub fn options(&self) -> Vec<String> {
        self.mount_options
            .split(',')
            .chain(self.super_options.split(','))
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok().and_then(|d| u8::from_str_radix(d, 8).ok());
            if let Some(v) = octal {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 3 {
            continue;
        }
        mounts.push(Mount {
            dev: fields[2].to_string(),
            mount_point: unescape(fields[4]),
            mount_options: fields[5].to_string(),
            fs_type: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]),
            super_options: fields.get(sep + 3).unwrap_or(&"").to_string(),
        });
    }
    mounts
}

/// The mount holding `path`: the longest mount point that is a
/// path-component prefix of it. Later lines win ties (they are mounted on top).
pub fn mount_for<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let mut best: Option<&Mount> = None;
    for m in mounts {
        if path.starts_with(Path::new(&m.mount_point)) {
            let longer = best.is_none_or(|b| m.mount_point.len() >= b.mount_point.len());
            if longer {
                best = Some(m);
            }
        }
    }
    best
}

/// The block device behind a mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Whole disk whose queue settings apply (`nvme0n1`).
    pub disk: String,
    /// The partition, when the filesystem sits on one (`nvme0n1p1`).
    pub partition: Option<String>,
}

/// Finds the disk for a `major:minor`; `None` for `0:N` (no device) or when
/// sysfs does not list it.
pub fn block_device(host: &Host, dev: &str) -> Option<BlockDevice> {
    if dev.starts_with("0:") {
        return None;
    }
    for disk in host.list_dir("/sys/block") {
        if host.read(&format!("/sys/block/{disk}/dev")).as_deref() == Some(dev) {
            return Some(BlockDevice { disk, partition: None });
        }
        for part in host.list_dir(&format!("/sys/block/{disk}")) {
            if !part.starts_with(disk.as_str()) {
                continue;
            }
            if host.read(&format!("/sys/block/{disk}/{part}/dev")).as_deref() == Some(dev) {
                return Some(BlockDevice { disk, partition: Some(part) });
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
40 22 259:2 / /var/lib/tidelog rw,noatime shared:2 - xfs /dev/nvme1n1 rw,inode64,logbufs=8
41 22 0:45 / /var/lib/tidelog-old rw - tmpfs tmpfs rw,size=10g
42 22 0:46 / /mnt/my\\040disk rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1],
            Mount {
                dev: "259:2".into(),
                mount_point: "/var/lib/tidelog".into(),
                mount_options: "rw,noatime".into(),
                fs_type: "xfs".into(),
                source: "/dev/nvme1n1".into(),
                super_options: "rw,inode64,logbufs=8".into(),
            }
        );
        assert_eq!(m[3].mount_point, "/mnt/my disk");
        assert_eq!(m[1].options(), vec!["rw", "noatime", "rw", "inode64", "logbufs=8"]);
    }

    #[test]
    fn longest_component_prefix_wins() {
        let m = parse_mountinfo(MOUNTINFO);
        let hit = |p: &str| mount_for(&m, Path::new(p)).map(|m| m.mount_point.clone());
        assert_eq!(hit("/var/lib/tidelog/topic-0"), Some("/var/lib/tidelog".into()));
        assert_eq!(hit("/var/lib/tidelog"), Some("/var/lib/tidelog".into()));
        assert_eq!(hit("/var/lib/tidelog-old/x"), Some("/var/lib/tidelog-old".into()));
        assert_eq!(hit("/var/lib/tidelogx"), Some("/".into()));
        assert_eq!(hit("/mnt/my disk/a"), Some("/mnt/my disk".into()));
    }
}
