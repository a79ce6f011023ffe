//! Access to the host's `/proc`, `/sys` and `/etc` through a root prefix.
//!
//! Every check and tuner reads and writes host files through [`Host`], so the
//! same code runs against the live system (`--root /`) and against fixture
//! trees in tests (`--root tests/fixtures/nvme-xfs`). Paths handed to `Host`
//! are always the absolute paths an operator would type (`/proc/sys/vm/swappiness`);
//! `Host` maps them under the root. Things that only exist on the live system
//! (syscalls such as `getrlimit` or an io_uring probe) check [`Host::is_live`].
//!
//! Also holds the small parsers for kernel list formats (`0-3,8` CPU lists,
//! `ff,00000000` CPU masks, `[mq-deadline] none` selections).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A view of a host's pseudo-filesystems under a root prefix.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Host {
    /// A host rooted at `root` (`/` for the live system).
    pub fn new(root: impl Into<PathBuf>) -> Host {
        Host { root: root.into() }
    }

    /// The root prefix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when the root is `/`: syscalls describe this host and may be used.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// Maps an absolute host path under the root.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// The file's content with surrounding whitespace trimmed, or `None` if
    /// it cannot be read (absent, no permission, not a file).
    pub fn read(&self, host_path: &str) -> Option<String> {
        self.read_raw(host_path).map(|s| s.trim().to_string())
    }

    /// The file's content as is.
    pub fn read_raw(&self, host_path: &str) -> Option<String> {
        fs::read_to_string(self.path(host_path)).ok()
    }

    /// The file parsed as an unsigned integer.
    pub fn read_u64(&self, host_path: &str) -> Option<u64> {
        self.read(host_path).and_then(|s| s.parse().ok())
    }

    /// True if the path exists under the root (a symlink counts even when
    /// its target does not, as sysfs `device` links in fixtures).
    pub fn exists(&self, host_path: &str) -> bool {
        fs::symlink_metadata(self.path(host_path)).is_ok()
    }

    /// Writes `value` followed by a newline, as `echo value > path` would.
    pub fn write(&self, host_path: &str, value: &str) -> io::Result<()> {
        fs::write(self.path(host_path), format!("{value}\n"))
    }

    /// Sorted names of the entries of a directory; empty if unreadable.
    pub fn list_dir(&self, host_path: &str) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(self.path(host_path)) {
            Ok(entries) => {
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            }
            Err(_) => Vec::new(),
        };
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    /// The last component of a symlink's target (`/sys/block/vda/device` ->
    /// `virtio1`), or `None` if the path is not a symlink.
    pub fn link_basename(&self, host_path: &str) -> Option<String> {
        let target = fs::read_link(self.path(host_path)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }
}

/// Orders `rx-2` before `rx-10` and `cpu9` before `cpu10`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(s: &str) -> (&str, Option<u64>) {
        let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (head, tail) = s.split_at(s.len() - digits);
        (head, tail.parse().ok())
    }
    let (ha, na) = split(a);
    let (hb, nb) = split(b);
    ha.cmp(hb).then(na.cmp(&nb)).then(a.cmp(b))
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    let s = s.trim();
    if s.is_empty() {
        return Some(cpus);
    }
    for part in s.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((lo, hi)) => {
                let lo: usize = lo.parse().ok()?;
                let hi: usize = hi.parse().ok()?;
                if hi < lo || hi - lo > 65_536 {
                    return None;
                }
                cpus.extend(lo..=hi);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Formats CPUs as a kernel CPU list (`0-3,8`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if start == end {
            parts.push(start.to_string());
        } else {
            parts.push(format!("{start}-{end}"));
        }
        i += 1;
    }
    parts.join(",")
}

/// Parses a kernel CPU bitmask such as `ff` or `00000001,00000000`.
pub fn parse_cpu_mask(s: &str) -> Option<Vec<usize>> {
    let hex: String = s.trim().chars().filter(|c| *c != ',').collect();
    let mut cpus = Vec::new();
    for (i, c) in hex.chars().rev().enumerate() {
        let nibble = c.to_digit(16)? as usize;
        for bit in 0..4 {
            if nibble & (1 << bit) != 0 {
                cpus.push(i * 4 + bit);
            }
        }
    }
    cpus.sort_unstable();
    Some(cpus)
}

/// Formats CPUs as a kernel CPU bitmask: hex, 32-bit groups separated by
/// commas, no leading zero groups (`f`, `1,00000000`).
pub fn format_cpu_mask(cpus: &[usize]) -> String {
    let words = cpus.iter().max().map_or(1, |m| m / 32 + 1);
    let mut bits = vec![0u32; words];
    for &c in cpus {
        bits[c / 32] |= 1 << (c % 32);
    }
    let mut out = String::new();
    for (i, w) in bits.iter().rev().enumerate() {
        if i == 0 {
            out.push_str(&format!("{w:x}"));
        } else {
            out.push_str(&format!(",{w:08x}"));
        }
    }
    out
}

/// The selected entry of a sysfs choice file: `[mq-deadline] kyber none`
/// gives `mq-deadline`; a file holding one bare word gives that word.
pub fn selected_choice(s: &str) -> Option<String> {
    let s = s.trim();
    if let Some(start) = s.find('[') {
        let rest = &s[start + 1..];
        let end = rest.find(']')?;
        return Some(rest[..end].to_string());
    }
    let mut words = s.split_whitespace();
    match (words.next(), words.next()) {
        (Some(w), None) => Some(w.to_string()),
        _ => None,
    }
}

/// All entries of a sysfs choice file, brackets removed.
pub fn available_choices(s: &str) -> Vec<String> {
    s.split_whitespace().map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string()).collect()
}

/// Bytes as a short human string (`8.0 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
    }

    #[test]
    fn cpu_masks_round_trip() {
        assert_eq!(parse_cpu_mask("f"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_mask("00000001,00000000"), Some(vec![32]));
        assert_eq!(parse_cpu_mask("0"), Some(vec![]));
        assert_eq!(parse_cpu_mask("zz"), None);
        assert_eq!(format_cpu_mask(&[0, 1, 2, 3]), "f");
        assert_eq!(format_cpu_mask(&[32]), "1,00000000");
        assert_eq!(format_cpu_mask(&[]), "0");
    }

    #[test]
    fn choices() {
        assert_eq!(selected_choice("[mq-deadline] kyber bfq none"), Some("mq-deadline".to_string()));
        assert_eq!(selected_choice("none"), Some("none".to_string()));
        assert_eq!(selected_choice("a b"), None);
        assert_eq!(available_choices("always [madvise] never"), vec!["always", "madvise", "never"]);
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["rx-10", "rx-2", "rx-1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, vec!["rx-1", "rx-2", "rx-10"]);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(8 * 1024 * 1024), "8.0 MiB");
    }
}
