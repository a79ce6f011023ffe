//! What the integration tests that run the real tidelog broker share:
//! finding the binary, free ports, and a broker on a scratch directory that
//! is killed and removed on drop.

// Each test crate compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The broker binary: TIDELOG_BIN, or ../target/release/tidelog; `None`
/// when it is not there.
pub fn broker_bin() -> Option<PathBuf> {
    let p = std::env::var_os("TIDELOG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tidelog"));
    p.exists().then_some(p)
}

/// Two consecutive free ports (shard i listens on port + i).
pub fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

/// A broker from `start_broker`, or `None` (said on stderr, so the test
/// can pass as skipped) when the binary is not built.
pub fn start_broker_or_skip(dir_prefix: &str) -> Option<Broker> {
    let Some(bin) = broker_bin() else {
        eprintln!(
            "SKIPPED: tidelog broker binary not found (set TIDELOG_BIN or run `cargo build --release -p tidelog-engine`)"
        );
        return None;
    };
    Some(start_broker(&bin, dir_prefix))
}

pub struct Broker {
    pub child: Child,
    pub dir: PathBuf,
    pub port: u16,
    /// The broker's /metrics endpoint (Prometheus text).
    pub metrics_port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a 2-shard broker with its data in ../target/`dir_prefix`-<pid>-<port>
/// and waits (up to 60 s) for it to log that it is ready.
pub fn start_broker(bin: &Path, dir_prefix: &str) -> Broker {
    let port = free_port_pair();
    let metrics_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Not tmpfs: the broker needs O_DIRECT.
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/{dir_prefix}-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(bin)
        .arg(format!("--log.dirs={}", dir.display()))
        .arg(format!("--listeners=PLAINTEXT://127.0.0.1:{port}"))
        .arg("--num.shards=2")
        .arg(format!("--metrics.listeners=127.0.0.1:{metrics_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tidelog");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("tidelog ready") {
                let _ = tx.send(Ok(()));
            }
            log.push(line);
            if log.len() > 200 {
                log.remove(0);
            }
        }
        let _ = tx.send(Err(log.join("\n")));
    });
    let broker = Broker { child, dir, port, metrics_port };
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => broker,
        Ok(Err(log)) => panic!("tidelog exited before it was ready:\n{log}"),
        Err(_) => panic!("tidelog did not log 'tidelog ready' within 60 s"),
    }
}
