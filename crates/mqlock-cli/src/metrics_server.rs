//! `--metrics-addr`: the client's metrics in the Prometheus text format over HTTP.
//!
//! A deliberately small HTTP/1.1 responder on tokio: one request per connection, `GET /metrics`
//! (or `HEAD`), 404 for other paths, 405 for other methods. The exposition is encoded by
//! `prometheus-client` from a collector that reads the client's live counters at scrape time.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mqlock::LockClient;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest request head read; longer requests get 431.
const MAX_HEAD: usize = 8 * 1024;
/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The metrics endpoint option shared by `exec`, `elect` and `mount`.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve this client's metrics for Prometheus at http://HOST:PORT/metrics (requests, grants,
    /// releases, timeouts, losses by reason, held locks, wait and hold time histograms, and for
    /// elect the mqlock_is_leader{election="NAME"} gauge, 1 while leading; names start with
    /// mqlock_). It listens before any lock is requested, so waits can be watched.
    /// Example: --metrics-addr 127.0.0.1:9464 (0.0.0.0:9464 for every interface).
    #[arg(long, env = "MQLOCK_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

impl MetricsArgs {
    /// Binds `--metrics-addr` (if given) and serves `client`'s metrics there in the background
    /// until the process exits. Fails if the address cannot be bound.
    pub async fn serve(&self, client: &LockClient) -> std::io::Result<()> {
        let Some(addr) = &self.metrics_addr else {
            return Ok(());
        };
        let listener = TcpListener::bind(addr.as_str()).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on --metrics-addr {addr}: {e}"),
            )
        })?;
        let mut registry = Registry::default();
        mqlock::prometheus::register(client, &mut registry);
        tracing::info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
        tokio::spawn(accept_loop(listener, Arc::new(registry)));
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &registry).await {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it; the connection is closed afterwards.
async fn respond(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut head))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out")
        })??;
    if !complete {
        return write(
            &mut stream,
            "431 Request Header Fields Too Large",
            "text/plain",
            b"",
            true,
        )
        .await;
    }
    let request_line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = request_line.split_ascii_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return write(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET or HEAD only\n",
            true,
        )
        .await;
    }
    if path != "/metrics" {
        return write(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"try /metrics\n",
            with_body,
        )
        .await;
    }
    let mut body = String::new();
    if prometheus_text::encode(&mut body, registry).is_err() {
        return write(
            &mut stream,
            "500 Internal Server Error",
            "text/plain",
            b"encoding failed\n",
            with_body,
        )
        .await;
    }
    write(
        &mut stream,
        "200 OK",
        prometheus_text::CONTENT_TYPE,
        body.as_bytes(),
        with_body,
    )
    .await
}

/// Reads until the end of the request head; false if it is longer than [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(true);
        }
        if head.len() > MAX_HEAD {
            return Ok(false);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // Closed early: answer what we have if the request line is there.
            return Ok(head.contains(&b'\n'));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

async fn write(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}
