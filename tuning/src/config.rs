//! The broker settings tidelog-tune needs, read from a Kafka
//! `server.properties`-style file: `log.dirs` (first entry), `num.shards`
//! and `io.memory.bytes`. Everything else in the file is ignored.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};

/// glommio refuses to start an executor with less io_memory than this.
pub const IO_MEMORY_MIN_BYTES: u64 = 512 * 1024;
/// The broker's default `io.memory.bytes` per shard.
pub const IO_MEMORY_DEFAULT_BYTES: u64 = 2 * 1024 * 1024;
/// Locked memory a shard needs beyond its io_memory (rings and glommio's
/// own registered buffers).
pub const SHARD_OVERHEAD_BYTES: u64 = 512 * 1024;

/// Broker settings that size what the host must provide.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerSettings {
    /// First entry of `log.dirs`.
    pub log_dir: Option<PathBuf>,
    /// `num.shards`.
    pub shard_count: Option<usize>,
    /// `io.memory.bytes`.
    pub io_memory_bytes: Option<u64>,
}

/// Reads the settings from a properties file.
pub fn load(path: &Path) -> Result<BrokerSettings> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    parse(&text).with_context(|| format!("parsing config {}", path.display()))
}

/// Parses `key=value` / `key: value` lines; `#` and `!` start comments.
pub fn parse(text: &str) -> Result<BrokerSettings> {
    let mut settings = BrokerSettings::default();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some(split) = line.find(['=', ':']) else {
            continue;
        };
        let key = line[..split].trim();
        let value = line[split + 1..].trim();
        match key {
            "log.dirs" | "log.dir" => {
                let first = value.split(',').map(str::trim).find(|d| !d.is_empty());
                if let Some(dir) = first {
                    if key == "log.dirs" || settings.log_dir.is_none() {
                        settings.log_dir = Some(PathBuf::from(dir));
                    }
                }
            }
            // 0 is the broker's "one shard per CPU".
            "num.shards" => match value.parse::<usize>() {
                Ok(0) => settings.shard_count = None,
                Ok(n) => settings.shard_count = Some(n),
                _ => bail!("line {}: num.shards must be a non-negative integer, got {value:?}", number + 1),
            },
            "io.memory.bytes" => match value.parse::<u64>() {
                Ok(n) => settings.io_memory_bytes = Some(n),
                Err(_) => bail!("line {}: io.memory.bytes must be an integer, got {value:?}", number + 1),
            },
            _ => {}
        }
    }
    Ok(settings)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_keys() {
        let text = "# broker\nbroker.id=0\nlog.dirs = /data/a, /data/b\nnum.shards: 4\nio.memory.bytes=1048576\n";
        let s = parse(text).unwrap();
        assert_eq!(
            s,
            BrokerSettings {
                log_dir: Some(PathBuf::from("/data/a")),
                shard_count: Some(4),
                io_memory_bytes: Some(1_048_576),
            }
        );
    }

    #[test]
    fn log_dirs_wins_over_log_dir() {
        let s = parse("log.dirs=/x\nlog.dir=/y\n").unwrap();
        assert_eq!(s.log_dir, Some(PathBuf::from("/x")));
        let s = parse("log.dir=/y\n").unwrap();
        assert_eq!(s.log_dir, Some(PathBuf::from("/y")));
    }

    #[test]
    fn rejects_bad_numbers() {
        let err = parse("num.shards=zero\n").unwrap_err();
        assert_eq!(err.to_string(), "line 1: num.shards must be a non-negative integer, got \"zero\"");
        assert!(parse("io.memory.bytes=-1\n").is_err());
        assert_eq!(parse("num.shards=0\n").unwrap().shard_count, None);
    }
}
