//! The operator's HTTP endpoint (`metrics.listeners`): `GET /metrics`
//! (Prometheus text format) and `GET /health`.
//!
//! Runs on shard 0 only, next to the controller. A scrape sends
//! `FromController::Scrape` to every shard (shard 0 included) over the
//! bounded controller channels; each shard builds its snapshot on its own
//! thread and answers through a oneshot, so nothing on a shard's hot path
//! takes a lock or waits for a scrape. A shard that does not answer within
//! `SCRAPE_TIMEOUT` is left out of `/metrics` (`tidelog_shards` shows how many
//! answered) and makes `/health` answer 503.
//!
//! HTTP/1.1 subset: one request per connection (`Connection: close`),
//! request head limited to `REQUEST_HEAD_BYTES_MAX`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::controller::Controller;
use crate::metrics::{self, ShardSnapshot};
use crate::shard::FromController;

/// Longest a scrape waits for a shard.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest HTTP request head accepted.
const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// Concurrent HTTP connections served; more wait in the accept queue.
const CONNECTIONS_MAX: usize = 16;

/// Asks every shard for its snapshot. Returns the answers and how many shards were asked.
pub async fn gather(controller: &Controller) -> (Vec<ShardSnapshot>, usize) {
    let asked = controller.to_shards.len();
    let mut waiting = Vec::with_capacity(asked);
    for to in &controller.to_shards {
        let (tx, rx) = futures::channel::oneshot::channel();
        if to.send(FromController::Scrape(tx)).await.is_ok() {
            waiting.push(rx);
        }
    }
    let all = futures::future::join_all(waiting.into_iter().map(|rx| async move {
        let timeout = glommio::timer::sleep(SCRAPE_TIMEOUT);
        match futures::future::select(rx, Box::pin(timeout)).await {
            futures::future::Either::Left((Ok(snap), _)) => Some(snap),
            _ => None,
        }
    }))
    .await;
    let mut snaps: Vec<ShardSnapshot> = all.into_iter().flatten().collect();
    snaps.sort_by_key(|s| s.shard);
    (snaps, asked)
}

pub async fn serve(listener: TcpListener, controller: Rc<Controller>, started: Instant) {
    let active = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics listener: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while active.get() >= CONNECTIONS_MAX {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        active.set(active.get() + 1);
        let (c, a) = (controller.clone(), active.clone());
        glommio::spawn_local(async move {
            if let Err(e) = handle(stream, &c, started).await {
                log::debug!("metrics listener: {e}");
            }
            a.set(a.get() - 1);
        })
        .detach();
    }
}

async fn read_head(stream: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the request head ended".into());
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(String::from_utf8_lossy(&head).into_owned());
        }
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            return Err(format!("request head longer than {REQUEST_HEAD_BYTES_MAX} bytes"));
        }
    }
}

async fn handle(mut stream: TcpStream, controller: &Controller, started: Instant) -> Result<(), String> {
    let head = match read_head(&mut stream).await {
        Ok(h) => h,
        Err(e) => {
            let _ = respond(&mut stream, 400, "text/plain", &format!("{e}\n")).await;
            return Err(e);
        }
    };
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET is supported\n").await;
    }
    match path {
        "/metrics" => {
            let (snaps, _) = gather(controller).await;
            let process = metrics::ProcessInfo {
                resident_memory_bytes: metrics::resident_memory_bytes(),
                uptime_s: started.elapsed().as_secs_f64(),
                cpu_seconds: metrics::process_cpu_seconds(),
            };
            let mut body = metrics::render(&snaps, process);
            if let Some(status) = controller.quorum_status() {
                metrics::render_quorum(&mut body, &status, &controller.image());
            }
            respond(&mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        "/health" => {
            let (snaps, asked) = gather(controller).await;
            if snaps.len() == asked {
                respond(&mut stream, 200, "text/plain", &format!("ok: {asked} of {asked} shards answering\n")).await
            } else {
                let body = format!("unhealthy: {} of {asked} shards answering\n", snaps.len());
                respond(&mut stream, 503, "text/plain", &body).await
            }
        }
        _ => respond(&mut stream, 404, "text/plain", "not found: try /metrics or /health\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> Result<(), String> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    stream.write_all(body.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    stream.close().await.map_err(|e| format!("close: {e}"))
}
