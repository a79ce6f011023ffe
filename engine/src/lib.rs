//! tidelog-engine: the broker.
//!
//! Layers depend downward only: `storage` (segments, partition logs, no
//! connections) <- `shard` (flusher, coordination) <- `handlers` (Kafka APIs)
//! <- `server` (connections) <- `broker` (process start-up).

#[cfg(not(target_os = "linux"))]
compile_error!("tidelog is Linux-only (io_uring, O_DIRECT): see linux-only.md");

pub mod broker;
pub mod config;
pub mod controller;
pub mod frames;
pub mod groups;
pub mod handlers;
pub mod http;
pub mod metadata;
pub mod metrics;
pub mod notify;
pub mod replication;
pub mod sendpool;
pub mod server;
pub mod shard;
pub mod storage;
pub mod topic_config;
pub mod txn;

/// A scratch dir for tests: `$TIDELOG_TEST_DIR` (e.g. an XFS mount) or
/// `target/test-data`, never tmpfs (no O_DIRECT).
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> std::path::PathBuf {
    let root = std::env::var_os("TIDELOG_TEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-data"));
    let dir = root.join(format!("{name}-{}-{}", std::process::id(), rand_suffix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Runs `f` in a glommio executor the way a shard does (small io_memory, the
/// IOPOLL probe primed first), and panics if it panics.
#[cfg(test)]
pub(crate) fn run_on_executor<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    let probe_dir = test_dir("probe");
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(1 << 20)
        .spawn(move || async move {
            crate::storage::prime_io_probe(&probe_dir).await.expect("prime io probe");
            f().await
        })
        .expect("spawn executor")
        .join()
        .expect("executor");
}

#[cfg(test)]
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
