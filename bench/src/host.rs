//! Host facts every report records: CPU model, core count, kernel, and the
//! filesystem that holds a data directory. Read from /proc; never fails (an
//! unreadable fact is "unknown").

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub hostname: String,
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_bytes: u64,
    pub data_dir: String,
    pub filesystem: String,
    pub device: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// The mount (device, fs type) with the longest mount point that contains `dir`.
pub fn filesystem_of(dir: &Path) -> (String, String) {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = Path::new(f[1]);
        if dir.starts_with(mp) && best.as_ref().map(|b| f[1].len() > b.0).unwrap_or(true) {
            best = Some((f[1].len(), f[0].to_string(), f[2].to_string()));
        }
    }
    best.map(|b| (b.1, b.2)).unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

pub fn host_info(data_dir: &Path) -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model") || l.starts_with("cpu model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let (device, filesystem) = filesystem_of(data_dir);
    HostInfo {
        hostname: read("/proc/sys/kernel/hostname"),
        cpu_model,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        kernel: read("/proc/sys/kernel/osrelease"),
        memory_bytes,
        data_dir: data_dir.display().to_string(),
        filesystem,
        device,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let h = host_info(Path::new("/"));
        assert!(h.cores >= 1);
        assert_ne!(h.kernel, "unknown");
        assert_ne!(h.filesystem, "unknown");
    }
}
