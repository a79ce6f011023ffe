//! The Kafka listener of one shard and its connections.
//!
//! Each connection has a reader (frames, headers, dispatch) and a writer that
//! sends responses strictly in request order, as Kafka requires. Requests are
//! pipelined up to `max.inflight.requests.per.connection`; beyond that the
//! reader waits, which pushes back on the client through TCP. Across the
//! shard's connections, the frames being read and dispatched are at most the
//! shard's share of `queued.max.requests` and hold at most its share of
//! `queued.max.request.bytes`: a connection whose next frame finds no slot
//! or does not fit waits before reading it, the same push-back.
//!
//! Bad input never panics: an oversized or garbage frame, an unknown API or
//! an unsupported version is logged with the peer and closes the connection;
//! other connections and the shard carry on.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::Task;
use tidelog_protocol::frame::{self, LENGTH_PREFIX_BYTES};
use tidelog_protocol::header::{self, HeaderError};

use crate::handlers::{self, OutPart, Outgoing, Response};
use crate::sendpool;
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
    let writer_shard = shard.clone();
    let writer_task = glommio::spawn_local(async move {
        // The socket's second fd for the send threads, made on first use.
        let mut socket: Option<Arc<OwnedFd>> = None;
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
                    if let Err(e) = send_parts(&writer_shard, fd, &mut socket, &mut writer, parts).await {
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
        let len = match read_frame_len(&mut reader, shard.config.request_max_bytes).await {
            Ok(Some(len)) => len,
            Ok(None) => break,
            Err(reason) => {
                log::warn!("shard {}: {peer}: {reason}; closing connection", shard.id.0);
                break;
            }
        };
        // A slot in the shard's request queue, then room for the frame,
        // before reading it; both are held until it is dispatched
        // (by then a produce's records belong to the log, and every other
        // request is decoded): when the shard is full, this connection stops
        // reading and TCP pushes back on the client.
        let slot = {
            let q = &shard.request_queue;
            match q.slots.try_acquire_static_permit(1) {
                Ok(p) => p,
                Err(_) => {
                    q.waits.set(q.waits.get() + 1);
                    log::debug!(
                        "shard {}: {peer}: a request waits for a slot under queued.max.requests ({} per shard)",
                        shard.id.0,
                        q.capacity
                    );
                    match q.slots.acquire_static_permit(1).await {
                        Ok(p) => p,
                        Err(_) => break,
                    }
                }
            }
        };
        let permit = match &shard.request_memory {
            None => None,
            Some(m) => {
                let units = (len as u64).min(m.capacity);
                match m.budget.try_acquire_static_permit(units) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        m.waits.set(m.waits.get() + 1);
                        log::debug!(
                            "shard {}: {peer}: a {len}-byte frame waits for room under queued.max.request.bytes",
                            shard.id.0
                        );
                        match m.budget.acquire_static_permit(units).await {
                            Ok(p) => Some(p),
                            Err(_) => break,
                        }
                    }
                }
            }
        };
        let frame = match crate::frames::read_exact_uninit(&mut reader, len).await {
            Ok(buf) => buf.freeze(),
            Err(e) => {
                log::warn!("shard {}: {peer}: read of a {len}-byte frame failed: {e}; closing connection", shard.id.0);
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
        if key == tidelog_protocol::messages::ApiKey::Produce {
            // The accumulator's bound (log.unflushed.max.bytes): while the
            // disk is behind, this connection dispatches nothing and reads
            // nothing more, and TCP pushes back on the producer.
            shard.wait_for_unflushed_room().await;
        }
        let dispatched = handlers::dispatch(&shard, peer, key, &req_header, frame);
        drop(permit);
        drop(slot);
        match dispatched {
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

/// Reads the next frame's length prefix and checks it against
/// `limit_bytes`; `Ok(None)` on a clean end of stream.
async fn read_frame_len<R: futures_lite::AsyncRead + Unpin>(
    reader: &mut R,
    limit_bytes: usize,
) -> Result<Option<usize>, String> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    match reader.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("read failed: {e}")),
    }
    frame::frame_len(prefix, limit_bytes).map(Some).map_err(|e| e.to_string())
}

/// Sends a Fetch response. With a file region in it, the whole response goes
/// to the shard's send threads (see `sendpool` for why). Memory-only
/// responses (the hot path) stay on the shard: one vectored
/// `sendmsg(MSG_DONTWAIT)` of header pieces and cached `Bytes` (no copy in
/// user space); what the socket cannot take at once goes through glommio's
/// writer, so a tail consumer never waits behind catch-up sends.
async fn send_parts<W: futures_lite::AsyncWrite + Unpin>(
    shard: &Shard,
    fd: RawFd,
    socket: &mut Option<Arc<OwnedFd>>,
    writer: &mut W,
    parts: Vec<OutPart>,
) -> io::Result<()> {
    if parts.iter().any(|p| matches!(p, OutPart::File { .. })) {
        let socket = match socket {
            Some(s) => s.clone(),
            None => socket.insert(sendpool::dup_socket(fd)?).clone(),
        };
        return shard.send_pool.send(socket, parts).await;
    }
    let run: Vec<Bytes> = parts
        .into_iter()
        .filter_map(|p| match p {
            OutPart::Inline(b) if !b.is_empty() => Some(b),
            _ => None,
        })
        .collect();
    let sent = sendpool::sendmsg_nowait(fd, &run)?;
    for b in sendpool::remaining(run, sent) {
        writer.write_all(&b).await?;
    }
    Ok(())
}
