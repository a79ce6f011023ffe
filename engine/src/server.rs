//! The Kafka listener of one shard and its connections.
//!
//! Each connection has a reader (frames, headers, dispatch) and a writer that
//! sends responses strictly in request order, as Kafka requires. Requests are
//! pipelined up to `max.inflight.requests.per.connection`; beyond that the
//! reader waits, which pushes back on the client through TCP.
//!
//! Bad input never panics: an oversized or garbage frame, an unknown API or
//! an unsupported version is logged with the peer and closes the connection;
//! other connections and the shard carry on.

use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::Task;
use tidelog_protocol::frame::{self, LENGTH_PREFIX_BYTES};
use tidelog_protocol::header::{self, HeaderError};

use crate::handlers::{self, OutPart, Outgoing, Response};
use crate::shard::Shard;

pub async fn serve(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("shard {}: accept failed: {e}", shard.id.0);
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if shard.connections.get() >= shard.config.max_connections {
            log::warn!(
                "shard {}: refusing {peer}: max.connections={} reached",
                shard.id.0,
                shard.config.max_connections
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        shard.connections.set(shard.connections.get() + 1);
        let s = shard.clone();
        glommio::spawn_local(async move {
            connection(s.clone(), stream, peer).await;
            s.connections.set(s.connections.get() - 1);
        })
        .detach();
    }
}

async fn connection(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr) {
    let fd = stream.as_raw_fd();
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let (tx, rx) = glommio::channels::local_channel::new_bounded::<Task<Response>>(shard.config.max_inflight_requests);
    let shard_id = shard.id.0;
    let writer_task = glommio::spawn_local(async move {
        while let Some(task) = rx.recv().await {
            match task.await {
                Ok(Some(Outgoing::Frame(frame))) => {
                    if let Err(e) = writer.write_all(&frame).await {
                        log::debug!("shard {shard_id}: {peer}: write failed: {e}");
                        return;
                    }
                }
                Ok(Some(Outgoing::Parts(parts))) => {
                    // Everything before this response went out through `writer`
                    // and completed: the raw-fd writes below keep the order.
                    if let Err(e) = send_parts(fd, parts).await {
                        log::debug!("shard {shard_id}: {peer}: fetch response send failed: {e}");
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    log::error!("shard {shard_id}: {peer}: {e}; closing connection");
                    return;
                }
            }
        }
        let _ = writer.close().await;
    });
    loop {
        let frame = match read_frame(&mut reader, shard.config.request_max_bytes).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(reason) => {
                log::warn!("shard {}: {peer}: {reason}; closing connection", shard.id.0);
                break;
            }
        };
        let mut frame = frame;
        let (key, req_header) = match header::decode_request_header(&mut frame) {
            Ok(h) => h,
            Err(e @ HeaderError::UnknownApiKey { .. }) => {
                log::warn!("shard {}: {peer}: {e}; closing connection", shard.id.0);
                break;
            }
            Err(e) => {
                log::warn!("shard {}: {peer}: {e}; closing connection", shard.id.0);
                break;
            }
        };
        match handlers::dispatch(&shard, peer, key, &req_header, frame) {
            Ok(pending) => {
                if tx.send(glommio::spawn_local(pending)).await.is_err() {
                    break;
                }
            }
            Err(reject) => {
                log::warn!(
                    "shard {}: {peer}: {} (correlation id {}, client {:?}); closing connection",
                    shard.id.0,
                    reject.0,
                    req_header.correlation_id,
                    req_header.client_id.as_deref().unwrap_or("")
                );
                break;
            }
        }
    }
    drop(tx);
    writer_task.await;
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
async fn read_frame<R: futures_lite::AsyncRead + Unpin>(
    reader: &mut R,
    limit_bytes: usize,
) -> Result<Option<Bytes>, String> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    match reader.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("read failed: {e}")),
    }
    let len = frame::frame_len(prefix, limit_bytes).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::zeroed(len);
    reader.read_exact(&mut buf).await.map_err(|e| format!("read of a {len}-byte frame failed: {e}"))?;
    Ok(Some(buf.freeze()))
}

/// Niceness of the blocking-pool threads that run cold sends: the copy from
/// page cache to socket is kernel CPU work, and on a busy host it must lose
/// the CPU to the shard threads (acks and tail fetches), not compete with them.
const SEND_POOL_NICE: libc::c_int = 10;

thread_local! {
    static DEMOTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Lowers the calling (blocking-pool) thread's priority once.
fn demote_pool_thread() {
    DEMOTED.with(|d| {
        if !d.get() {
            d.set(true);
            // SAFETY: gettid/setpriority on the calling thread only.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, SEND_POOL_NICE);
            }
        }
    });
}

/// How long a response may wait on a client that does not read, per part.
const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// iovecs per `sendmsg` (well under IOV_MAX).
const IOVECS_MAX: usize = 64;

/// Sends a Fetch response: runs of inline pieces and cached batches go out
/// with one vectored `sendmsg(MSG_DONTWAIT)` each from the shard thread (the
/// socket usually has room, so this is one syscall and no copy); whatever does
/// not fit, and every file region, is handed to the shard's blocking pool.
///
/// File regions use `sendfile` from a buffered fd: the data goes from the
/// page cache to the socket without entering user space. Segment data is
/// written with O_DIRECT, so a cold region is usually not cached and sendfile
/// reads the disk: that is why it runs on the blocking pool (a shard thread
/// must never wait on a page-cache miss), after `posix_fadvise(WILLNEED)` on
/// every region of the response so the disk reads of many partitions overlap
/// instead of running one after another. We chose the pool over io_uring
/// splice because glommio exposes neither splice nor its ring, and over
/// `readahead(2)` + sendfile on the shard because readahead only starts the
/// I/O and sendfile would still block if it had not finished.
pub async fn send_parts(fd: RawFd, parts: Vec<OutPart>) -> io::Result<()> {
    let regions: Vec<(RawFd, u64, u64)> = parts
        .iter()
        .filter_map(|p| match p {
            OutPart::File { file, position, len } => Some((file.as_raw_fd(), *position, *len)),
            OutPart::Inline(_) => None,
        })
        .collect();
    if !regions.is_empty() {
        glommio::executor()
            .spawn_blocking(move || {
                demote_pool_thread();
                for (file_fd, position, len) in regions {
                    // SAFETY: advisory call on an fd kept open by `parts` until this completes.
                    unsafe { libc::posix_fadvise(file_fd, position as i64, len as i64, libc::POSIX_FADV_WILLNEED) };
                }
            })
            .await;
    }
    let mut i = 0;
    while i < parts.len() {
        match &parts[i] {
            OutPart::Inline(_) => {
                let run_end =
                    parts[i..].iter().position(|p| matches!(p, OutPart::File { .. })).map_or(parts.len(), |n| i + n);
                let run: Vec<bytes::Bytes> = parts[i..run_end]
                    .iter()
                    .filter_map(|p| match p {
                        OutPart::Inline(b) if !b.is_empty() => Some(b.clone()),
                        _ => None,
                    })
                    .collect();
                let sent = sendmsg_nowait(fd, &run)?;
                let total: usize = run.iter().map(|b| b.len()).sum();
                if sent < total {
                    let rest = remaining(run, sent);
                    glommio::executor().spawn_blocking(move || send_all_blocking(fd, rest)).await?;
                }
                i = run_end;
            }
            OutPart::File { file, position, len } => {
                let (file_fd, position, len) = (file.as_raw_fd(), *position, *len);
                // `parts` (and so the file) stays alive until this returns.
                glommio::executor().spawn_blocking(move || sendfile_all(fd, file_fd, position, len)).await?;
                i += 1;
            }
        }
    }
    Ok(())
}

fn remaining(run: Vec<bytes::Bytes>, mut sent: usize) -> Vec<bytes::Bytes> {
    let mut out = Vec::with_capacity(run.len());
    for b in run {
        if sent >= b.len() {
            sent -= b.len();
        } else {
            out.push(b.slice(sent..));
            sent = 0;
        }
    }
    out
}

/// One non-blocking vectored send; returns the bytes accepted (0 if full).
fn sendmsg_nowait(fd: RawFd, bufs: &[bytes::Bytes]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in bufs.chunks(IOVECS_MAX) {
        let iov: Vec<libc::iovec> =
            chunk.iter().map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() }).collect();
        let want: usize = chunk.iter().map(|b| b.len()).sum();
        // SAFETY: iov points into `bufs`, alive for the call; msghdr is zeroed then filled.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(sent);
            }
            return Err(e);
        }
        sent += n as usize;
        if (n as usize) < want {
            return Ok(sent);
        }
    }
    Ok(sent)
}

/// Waits until `fd` is writable, or fails after `SEND_STALL_TIMEOUT`.
fn wait_writable(fd: RawFd, since: Instant) -> io::Result<()> {
    loop {
        let left = SEND_STALL_TIMEOUT.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading the response"));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one pollfd we own.
        let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Blocking-pool side of `sendmsg_nowait`: sends everything, waiting for room.
fn send_all_blocking(fd: RawFd, mut rest: Vec<bytes::Bytes>) -> io::Result<()> {
    demote_pool_thread();
    let mut since = Instant::now();
    while !rest.is_empty() {
        let n = sendmsg_nowait(fd, &rest)?;
        if n == 0 {
            wait_writable(fd, since)?;
            continue;
        }
        since = Instant::now();
        rest = remaining(rest, n);
    }
    Ok(())
}

/// Sends `len` bytes of `file_fd` from `position` to the socket with sendfile.
fn sendfile_all(fd: RawFd, file_fd: RawFd, position: u64, len: u64) -> io::Result<()> {
    demote_pool_thread();
    let mut offset = position as libc::off_t;
    let end = (position + len) as libc::off_t;
    let mut since = Instant::now();
    while offset < end {
        let chunk = ((end - offset) as usize).min(1 << 20);
        // SAFETY: both fds are open for the duration; offset is ours.
        let n = unsafe { libc::sendfile(fd, file_fd, &mut offset, chunk) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => wait_writable(fd, since)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "segment file shorter than the fetch region"));
        }
        since = Instant::now();
    }
    Ok(())
}
