//! Process start-up and shutdown: checks the host and data dir, loads
//! metadata, starts one pinned glommio executor per shard, wires the
//! controller channels, and on SIGTERM/SIGINT drains every shard's
//! accumulator before exiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use tidelog_protocol::ShardId;

use crate::config::Config;
use crate::controller::Controller;
use crate::metadata::MetadataImage;
use crate::shard::{FromController, Shard, ToController};
use crate::storage::dirfs;

/// Set by SIGTERM/SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);
/// Tells the shards to drain and exit; set after a cluster node's controlled
/// shutdown moved its leaderships away (at once on a single node).
static SHARDS_STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Glommio's rings and registered buffers need locked memory beyond io_memory.
const RING_MEMLOCK_BYTES: u64 = 512 * 1024;
/// How long start-up waits for every shard (log recovery included).
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound of every cross-core channel: a full channel is back-pressure.
const CONTROLLER_CHANNEL_DEPTH: usize = 1024;
/// Threads of each shard's glommio blocking pool: file opens, segment rolls,
/// checkpoints, retention deletes, compaction rewrites. Fetch sends have their
/// own threads (`sendpool`), so a stalled consumer never holds these.
const BLOCKING_POOL_THREADS: usize = 4;

fn affinity_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect();
    }
    (0..libc::CPU_SETSIZE as usize).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) }).collect()
}

/// Applies `io-properties.json` from `tidelog-tune iotune` if there is one.
fn apply_io_properties(config: &mut Config) {
    let path = config.io_properties_file.clone().unwrap_or_else(|| config.log_dir.join("io-properties.json"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(_) if config.io_properties_file.is_none() => {
            log::info!(
                "no io-properties file at {} (run `tidelog-tune iotune --dir {}`); using defaults",
                path.display(),
                config.log_dir.display()
            );
            return;
        }
        Err(e) => {
            log::warn!("io.properties.file {}: {e}; using defaults", path.display());
            return;
        }
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => {
            if let Some(block) = v.get("best_write_block_bytes").and_then(|b| b.as_u64()) {
                let block = (block as usize).clamp(4096, 64 << 20);
                config.flush_write_bytes_max = block;
            }
            if let Some(depth) = v.get("best_queue_depth").and_then(|d| d.as_u64()) {
                config.flush_writes_inflight_max = (depth as usize).clamp(1, 4096);
            }
            log::info!(
                "using io-properties {}: flush writes up to {} bytes, {} in flight (measured write bandwidth {} B/s)",
                path.display(),
                config.flush_write_bytes_max,
                config.flush_writes_inflight_max,
                v.get("write_bandwidth_bytes_per_s").and_then(|b| b.as_u64()).unwrap_or(0)
            );
        }
        Err(e) => log::warn!("io-properties {} is not valid JSON ({e}); using defaults", path.display()),
    }
}

fn remove_deleted_dirs(config: &Config) {
    for dir in &config.log_dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with("-delete") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

fn install_signal_handlers() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Runs the broker until SIGTERM/SIGINT. Returns a message on start-up failure.
pub fn run(mut config: Config) -> Result<(), String> {
    let mut fs = Vec::with_capacity(config.log_dirs.len());
    let mut locks = Vec::with_capacity(config.log_dirs.len());
    for dir in &config.log_dirs {
        fs.push(dirfs::check_data_dir(dir)?);
        locks.push(dirfs::lock_data_dir(dir)?);
    }
    let fs = fs.join(", ");
    let cpus = affinity_cpus();
    let num_shards = if config.num_shards == 0 { cpus.len().max(1) } else { config.num_shards };
    config.num_shards = num_shards;
    if num_shards > cpus.len() {
        log::warn!(
            "num.shards={num_shards} exceeds the {} CPUs in the affinity mask; shards will share cores",
            cpus.len()
        );
    }
    let memlock_needed = num_shards as u64 * (config.io_memory_bytes as u64 + RING_MEMLOCK_BYTES);
    dirfs::ensure_memlock(memlock_needed)?;
    apply_io_properties(&mut config);
    remove_deleted_dirs(&config);
    let quorum = match &config.cluster {
        Some(cluster) => Some(start_quorum(&config, cluster, num_shards)?),
        None => None,
    };
    if config.cluster.as_ref().is_some_and(|c| !c.broker) {
        install_signal_handlers();
        log::info!(
            "node {}: controller only (process.roles=controller): serving the quorum, no client listener",
            config.node_id
        );
        while !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(q) = quorum {
            q.stop();
        }
        drop(locks);
        log::info!("tidelog stopped");
        return Ok(());
    }
    install_signal_handlers();
    // A cluster node registers before its shards start: a process whose
    // node.id is held by a live node never serves a partition, and the
    // shards take their roles from metadata that already counts this node.
    if let Some(q) = &quorum {
        match register(&config, num_shards, &q.handle()) {
            Ok(true) => {}
            // SIGTERM while waiting for a quorum: a clean stop, nothing served yet.
            Ok(false) => {
                drop(quorum);
                drop(locks);
                log::info!("tidelog stopped before it registered");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    let image = match &quorum {
        // A cluster node learns its metadata from the quorum once it is up.
        Some(_) => {
            if config.log_dir.join(crate::metadata::METADATA_FILE).exists() {
                log::warn!(
                    "{} holds single-node metadata; in a cluster the metadata log is used and it is ignored",
                    config.log_dir.join(crate::metadata::METADATA_FILE).display()
                );
            }
            Arc::new(MetadataImage { local_node: Some(config.node_id), ..Default::default() })
        }
        None => Arc::new(MetadataImage::load(&config.log_dir, num_shards)?),
    };
    let cluster_link = quorum.as_ref().map(|q| crate::controller::cluster::ClusterLink {
        handle: q.handle(),
        node_id: config.node_id,
        num_shards,
    });
    log::info!(
        "tidelog {} starting: {num_shards} shard(s), log.dirs={} ({fs}), {} topic(s), lock {}",
        env!("CARGO_PKG_VERSION"),
        config.log_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(","),
        image.topics.len(),
        locks[0].path.display()
    );
    install_signal_handlers();
    let config = Arc::new(config);
    let log_dirs = Arc::new(crate::storage::log_dirs::LogDirs::new(&config.log_dirs));
    // Channels: shard i -> controller (on shard 0), controller -> shard i.
    let mut to_ctrl_tx = Vec::new();
    let mut to_ctrl_rx = Vec::new();
    let mut from_ctrl_tx = Vec::new();
    let mut from_ctrl_rx = Vec::new();
    for _ in 0..num_shards {
        let (tx, rx) = shared_channel::new_bounded::<ToController>(CONTROLLER_CHANNEL_DEPTH);
        to_ctrl_tx.push(Some(tx));
        to_ctrl_rx.push(rx);
        let (tx, rx) = shared_channel::new_bounded::<FromController>(CONTROLLER_CHANNEL_DEPTH);
        from_ctrl_tx.push(tx);
        from_ctrl_rx.push(Some(rx));
    }
    let mut controller_parts = Some((to_ctrl_rx, from_ctrl_tx));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let mut handles = Vec::with_capacity(num_shards);
    let send_budget = crate::sendpool::SendBudget::new(
        config.fetch_sendfile_max_bytes_per_second,
        config.fetch_sendfile_writing_max_bytes_per_second,
    );
    for i in 0..num_shards {
        let send_budget = send_budget.clone();
        let log_dirs = log_dirs.clone();
        let cpu = cpus[i % cpus.len()];
        let config = config.clone();
        let image = image.clone();
        let to_ctrl = to_ctrl_tx[i].take();
        let from_ctrl = from_ctrl_rx[i].take();
        let ctrl = if i == 0 { controller_parts.take() } else { None };
        let cluster_link = if i == 0 { cluster_link.clone() } else { None };
        let quorum_handle = quorum.as_ref().map(|q| q.handle());
        let ready = ready_tx.clone();
        let listen = config.shard_listen_addr(i).map_err(|e| e.0)?;
        let builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{i}"))
            .io_memory(config.io_memory_bytes)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(BLOCKING_POOL_THREADS));
        let spawned = builder.spawn(move || async move {
            let (Some(to_ctrl), Some(from_ctrl)) = (to_ctrl, from_ctrl) else { return };
            // `connect` waits for the other end, so every endpoint of this
            // shard (including the controller's, on shard 0) connects at once.
            let controller_ends = async move {
                let (inbox, outbox) = ctrl?;
                let receivers = futures::future::join_all(inbox.into_iter().map(|r| r.connect())).await;
                let senders = futures::future::join_all(outbox.into_iter().map(|s| s.connect())).await;
                Some((receivers, senders))
            };
            let (to_ctrl, from_ctrl, controller_ends) =
                futures::join!(to_ctrl.connect(), from_ctrl.connect(), controller_ends);
            log::debug!("shard {i}: controller channels connected");
            if let Some((receivers, senders)) = controller_ends {
                let controller = Controller::new(config.clone(), image.clone(), senders, cluster_link);
                glommio::spawn_local(controller.clone().run(receivers)).detach();
                if let Some(addr) = config.metrics_addr {
                    match bind_exclusive(addr) {
                        Ok(l) => {
                            log::info!("metrics: serving /metrics and /health on http://{addr}");
                            glommio::spawn_local(crate::http::serve(l, controller, std::time::Instant::now())).detach();
                        }
                        Err(e) => log::error!(
                            "metrics: cannot listen on {addr}: {e}; running without /metrics and /health \
                             (change metrics.listeners, or set it empty to disable)"
                        ),
                    }
                }
            }
            for dir in &config.log_dirs {
                if let Err(e) = crate::storage::prime_io_probe(dir).await {
                    let _ = ready.send(Err(format!("shard {i}: cannot read from log.dirs {}: {e}", dir.display())));
                    return;
                }
            }
            let send_pool = match crate::sendpool::SendPool::start(
                i as u32,
                config.fetch_sendfile_threads,
                config.fetch_sendfile_priority,
                config.fetch_readahead_bytes,
                send_budget,
            ) {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready.send(Err(format!(
                        "shard {i}: cannot start {} send threads: {e} (lower fetch.sendfile.threads or raise the \
                         process/thread limit)",
                        config.fetch_sendfile_threads
                    )));
                    return;
                }
            };
            let shard = Shard::new(
                ShardId(i as u32),
                config.clone(),
                Arc::new(MetadataImage::default()),
                to_ctrl,
                send_pool,
                quorum_handle,
                log_dirs,
            );
            shard.apply_image(image).await;
            log::debug!("shard {i}: owned partitions opened");
            glommio::spawn_local(shard.clone().run_flusher()).detach();
            if i == 0 {
                glommio::spawn_local(crate::groups::ensure_offsets_topic(shard.clone())).detach();
                glommio::spawn_local(crate::txn::ensure_topic(shard.clone())).detach();
            }
            glommio::spawn_local(crate::groups::run(shard.clone())).detach();
            glommio::spawn_local(crate::txn::run(shard.clone())).detach();
            glommio::spawn_local(crate::handlers::producer_id::run_snapshots(shard.clone())).detach();
            glommio::spawn_local(shard.clone().run_follower(from_ctrl)).detach();
            glommio::spawn_local(crate::storage::retention::run(shard.clone())).detach();
            glommio::spawn_local(crate::storage::compaction::run(shard.clone())).detach();
            if config.cluster.is_some() {
                glommio::spawn_local(crate::replication::Replication::run_isr_checks(shard.clone())).detach();
                glommio::spawn_local(crate::replication::Replication::run_hw_checkpoints(shard.clone())).detach();
            }
            let listener = match bind_exclusive(listen) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready.send(Err(format!(
                        "shard {i}: cannot listen on {listen}: {e}; is another broker running? change `listeners`"
                    )));
                    return;
                }
            };
            log::info!(
                "shard {i} on cpu {cpu}: listening on {listen}, advertised as broker {}",
                crate::metadata::broker_id(config.node_id, i as u32)
            );
            let server = glommio::spawn_local(crate::server::serve(shard.clone(), listener));
            let _ = ready.send(Ok(i));
            while !SHARDS_STOP.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            let _ = server.cancel().await;
            shard.stopping.set(true);
            shard.drain().await;
            crate::replication::Replication::checkpoint_high_watermarks(&shard).await;
            crate::handlers::producer_id::snapshot_all(&shard).await;
            let stats = &shard.fetch_stats;
            log::info!(
                "shard {i}: stopped, all appended data durable; fetch bytes in responses: {} from memory, {} by \
                 sendfile, {} read to locate batches",
                stats.memory_bytes.get(),
                stats.file_bytes.get(),
                stats.located_bytes.get()
            );
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                return Err(format!(
                    "cannot start shard {i} (io_uring executor): {e}. io_uring must be available \
                     (kernel >= 5.8, kernel.io_uring_disabled=0, not blocked by seccomp) and RLIMIT_MEMLOCK must cover \
                     num.shards x (io.memory.bytes + 512 KiB); see linux-only.md"
                ))
            }
        }
    }
    drop(ready_tx);
    let mut ready = vec![false; num_shards];
    let started = std::time::Instant::now();
    while ready.iter().any(|r| !r) {
        let waiting: Vec<usize> = (0..num_shards).filter(|i| !ready[*i]).collect();
        let failure = match ready_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(i)) => {
                ready[i] = true;
                continue;
            }
            Ok(Err(e)) => e,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                "a shard exited during start-up (see the log above)".to_string()
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if STOP.load(Ordering::Relaxed) => {
                format!("stopped by a signal during start-up; shard(s) {waiting:?} were still starting")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if started.elapsed() > SHARD_START_TIMEOUT => format!(
                "shard(s) {waiting:?} did not start within {} s (recovering a large log? see the log above)",
                SHARD_START_TIMEOUT.as_secs()
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
        };
        // Shards that came up drain and exit on SHARDS_STOP; one stuck in
        // start-up cannot be joined, and the process exit ends it.
        STOP.store(true, Ordering::Relaxed);
        SHARDS_STOP.store(true, Ordering::Relaxed);
        for (i, h) in handles.into_iter().enumerate() {
            if ready[i] {
                let _ = h.join();
            }
        }
        return Err(failure);
    }
    log::info!(
        "tidelog ready: {num_shards} shard(s), bootstrap {}:{} (shard i on port {} + i)",
        config.advertised_host,
        config.advertised_port,
        config.advertised_port
    );
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if let (Some(q), Some(cluster)) = (&quorum, &config.cluster) {
        controlled_shutdown(&q.handle(), config.node_id, cluster.request_timeout_ms);
    }
    SHARDS_STOP.store(true, Ordering::Relaxed);
    for h in handles {
        if let Err(e) = h.join() {
            log::error!("shard exited with error: {e}");
        }
    }
    if let Some(q) = quorum {
        q.stop();
    }
    drop(locks);
    log::info!("tidelog stopped");
    Ok(())
}

/// Starts this node's part of the controller quorum (see `tidelog_quorum`).
fn start_quorum(
    config: &Config,
    cluster: &crate::config::ClusterConfig,
    num_shards: usize,
) -> Result<tidelog_quorum::Quorum, String> {
    if num_shards >= tidelog_quorum::BROKER_IDS_PER_NODE as usize {
        return Err(format!(
            "num.shards={num_shards}: a cluster node has at most {} shards (broker id = node.id x {} + shard)",
            tidelog_quorum::BROKER_IDS_PER_NODE - 1,
            tidelog_quorum::BROKER_IDS_PER_NODE
        ));
    }
    let quorum_config = tidelog_quorum::QuorumConfig {
        node_id: config.node_id,
        voters: cluster.voters.clone(),
        controller_listen: cluster.controller_listen,
        dir: config.log_dir.join("__cluster_metadata-0"),
        election_timeout_ms: cluster.election_timeout_ms,
        raft_heartbeat_interval_ms: (cluster.election_timeout_ms / 5).max(20),
        request_timeout_ms: cluster.request_timeout_ms,
        heartbeat_interval_ms: cluster.heartbeat_interval_ms,
        session_timeout_ms: cluster.session_timeout_ms,
        unclean_leader_election_enable: config.unclean_leader_election,
    };
    log::info!(
        "node {}: roles {}{}, controller quorum voters {:?}",
        config.node_id,
        if cluster.broker { "broker" } else { "" },
        if cluster.controller {
            if cluster.broker {
                ",controller"
            } else {
                "controller"
            }
        } else {
            ""
        },
        cluster.voters
    );
    tidelog_quorum::Quorum::start(quorum_config)
        .map_err(|e| format!("node {}: cannot start the controller quorum: {e}", config.node_id))
}

/// Registers this node with the quorum, waiting (with a log line every few
/// seconds) while the quorum has no majority. A node id held by another live
/// process is a start-up failure. `Ok(false)`: stopped by a signal first.
fn register(config: &Config, num_shards: usize, handle: &tidelog_quorum::QuorumHandle) -> Result<bool, String> {
    let registration = tidelog_quorum::NodeRegistration {
        node_id: config.node_id,
        incarnation: uuid::Uuid::new_v4().simple().to_string(),
        host: config.advertised_host.clone(),
        port: config.advertised_port,
        num_shards: num_shards as u32,
        rack: config.cluster.as_ref().and_then(|c| c.rack.clone()),
        fenced: false,
        broker_epoch: -1,
    };
    let started = std::time::Instant::now();
    let mut last_note = std::time::Instant::now();
    loop {
        match futures::executor::block_on(handle.register(registration.clone())) {
            Ok(()) => {
                log::info!(
                    "node {}: registered with the controller quorum as brokers {}..={} (incarnation {})",
                    config.node_id,
                    crate::metadata::broker_id(config.node_id, 0),
                    crate::metadata::broker_id(config.node_id, num_shards as u32 - 1),
                    registration.incarnation
                );
                return Ok(true);
            }
            Err(tidelog_quorum::QuorumError::DuplicateNode(m)) => return Err(m),
            Err(e) => {
                if last_note.elapsed() >= Duration::from_secs(5) || started.elapsed() < Duration::from_secs(1) {
                    log::warn!(
                        "node {}: waiting for the controller quorum to register ({e}); start the other voters",
                        config.node_id
                    );
                    last_note = std::time::Instant::now();
                }
            }
        }
        if STOP.load(Ordering::Relaxed) {
            log::info!("node {}: stopped by a signal while waiting for the controller quorum", config.node_id);
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// SIGTERM in a cluster: fence this node through the metadata log so its
/// leaderships move to other in-sync replicas before the shards stop.
fn controlled_shutdown(handle: &tidelog_quorum::QuorumHandle, node_id: u32, timeout_ms: u64) {
    log::info!("node {node_id}: controlled shutdown: moving leaderships away");
    let result = futures::executor::block_on(handle.controlled_shutdown());
    match result {
        Ok(()) => log::info!("node {node_id}: controlled shutdown done"),
        Err(e) => log::warn!(
            "node {node_id}: controlled shutdown failed ({e}); stopping anyway, the controller fences this node after \
             broker.session.timeout.ms (quorum request timeout {timeout_ms} ms)"
        ),
    }
}

/// Binds `addr` without SO_REUSEPORT. glommio's own `TcpListener::bind` sets
/// SO_REUSEPORT, which lets a second broker (or anything else) bind the same
/// port and silently receive a share of the connections; a plain bind fails
/// with "address in use" instead.
fn bind_exclusive(addr: std::net::SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let std_listener = std::net::TcpListener::bind(addr)?;
    // SAFETY: the fd is a bound, listening TCP socket whose ownership moves here.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(std_listener.into_raw_fd()) })
}
