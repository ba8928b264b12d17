//! The admin HTTP endpoint: `/metrics`, `/live`, `/ready`, and routes a daemon adds.
//!
//! Deliberately small: one request per connection (`Connection: close`), a request head of at most
//! [`MAX_HEAD`] bytes, a body of at most [`AdminConfig::max_body`] bytes, and a time limit for
//! reading the request, so a slow or hostile client costs one task for a bounded time.
//!
//! A daemon adds routes either synchronously ([`Routes`], for answers computed on the spot) or
//! asynchronously ([`Handler`], for answers that need a database or another task).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{Encoder, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;

/// Whether the daemon is ready for traffic; `/ready` answers 200 when set, 503 otherwise.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Reads the flag.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, query string included.
    pub path: String,
    /// The headers, names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first header called `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// An `application/json` response.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

/// Extra routes: return `None` for a path the daemon does not serve (404).
pub type Routes = Arc<dyn Fn(&Request) -> Option<Response> + Send + Sync>;

/// The future an asynchronous [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Option<Response>> + Send>>;

/// Extra routes answered asynchronously (consulted after [`Routes`]): return `None` for a path
/// the daemon does not serve (404). Each request runs on its own connection task, so a slow
/// answer holds up nobody else.
pub type Handler = Arc<dyn Fn(Request) -> HandlerFuture + Send + Sync>;

/// Settings of the admin endpoint.
#[derive(Clone)]
pub struct AdminConfig {
    /// The metrics served on `/metrics`.
    pub registry: Registry,
    /// The flag behind `/ready`.
    pub readiness: Readiness,
    /// Daemon-specific routes, consulted before the 404.
    pub routes: Option<Routes>,
    /// Daemon-specific asynchronous routes, consulted after `routes` and before the 404.
    pub handler: Option<Handler>,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Time allowed to read a whole request.
    pub read_timeout: Duration,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("max_body", &self.max_body)
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
}

impl AdminConfig {
    /// Defaults: no extra routes, 1 MiB bodies, 10 s to read a request.
    pub fn new(registry: Registry, readiness: Readiness) -> Self {
        Self {
            registry,
            readiness,
            routes: None,
            handler: None,
            max_body: 1 << 20,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, config: AdminConfig, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let config = config.clone();
                tasks.spawn(async move {
                    if let Err(e) = handle(stream, &config).await {
                        tracing::debug!(%peer, error = %e, "admin request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tasks.close();
}

/// Binds `addr` and reports the bound address (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let local = l.local_addr()?;
    Ok((l, local))
}

/// The time a health check allows for connecting, asking and reading the status line.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks a running daemon's admin endpoint for `path` (`/live`, `/ready`) and returns the HTTP
/// status. This is what `gateway health` and `core-stub health` run as a container healthcheck:
/// a scratch image has no shell and no curl.
pub async fn check(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    crate::client::get(addr, path, timeout)
        .await
        .map(|answer| answer.status)
        .map_err(std::io::Error::from)
}

/// The `health` subcommand of both daemons (their container healthcheck): asks the admin endpoint
/// bound to `listen` (see [`local_admin_addr`]) for `path`, prints one line such as
/// `http://127.0.0.1:9465/ready: 200`, and tells whether the answer was 200.
pub fn health_command(listen: SocketAddr, path: &str, timeout: Duration) -> bool {
    let addr = local_admin_addr(listen);
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| rt.block_on(check(addr, path, timeout)));
    match outcome {
        Ok(status) => {
            println!("http://{addr}{path}: {status}");
            status == 200
        }
        Err(e) => {
            println!("http://{addr}{path}: {e}");
            false
        }
    }
}

/// The address a health check on this host should use for an admin endpoint bound to `listen`:
/// the loopback address in place of an unspecified one (`0.0.0.0:9465` → `127.0.0.1:9465`).
pub fn local_admin_addr(listen: SocketAddr) -> SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out reading the request")]
    Timeout,
    #[error("bad request: {0}")]
    Bad(&'static str),
}

async fn handle(mut stream: TcpStream, config: &AdminConfig) -> Result<(), AdminError> {
    let request = tokio::time::timeout(
        config.read_timeout,
        read_request(&mut stream, config.max_body),
    )
    .await
    .map_err(|_| AdminError::Timeout)?;
    let response = match request {
        Ok(req) => route(req, config).await,
        Err(AdminError::Bad(why)) => Response::text(400, format!("bad request: {why}\n")),
        Err(e) => return Err(e),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&response.body).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn route(req: Request, config: &AdminConfig) -> Response {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", "/metrics") => {
            let encoder = TextEncoder::new();
            let mut body = Vec::new();
            match encoder.encode(&config.registry.gather(), &mut body) {
                Ok(()) => Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body,
                },
                Err(e) => Response::text(500, format!("metrics encoding failed: {e}\n")),
            }
        }
        ("GET", "/live") => Response::text(200, "live\n"),
        ("GET", "/ready") => {
            if config.readiness.get() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready\n")
            }
        }
        _ => {
            if let Some(response) = config.routes.as_ref().and_then(|r| r(&req)) {
                return response;
            }
            match &config.handler {
                Some(handler) => handler(req).await,
                None => None,
            }
            .unwrap_or_else(|| Response::text(404, "not found\n"))
        }
    }
}

async fn read_request(stream: &mut TcpStream, max_body: usize) -> Result<Request, AdminError> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(AdminError::Bad("request head too large"));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(AdminError::Bad("connection closed mid-request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| AdminError::Bad("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let method = request_line
        .next()
        .filter(|m| !m.is_empty())
        .ok_or(AdminError::Bad("no method"))?;
    let path = request_line
        .next()
        .filter(|p| p.starts_with('/'))
        .ok_or(AdminError::Bad("no path"))?;
    let mut content_length = 0usize;
    let mut headers = Vec::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value
                    .trim()
                    .parse()
                    .map_err(|_| AdminError::Bad("content-length"))?;
            }
        }
    }
    if content_length > max_body {
        return Err(AdminError::Bad("body too large"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() > content_length {
        return Err(AdminError::Bad("body longer than content-length"));
    }
    let already = body.len();
    body.resize(content_length, 0);
    stream.read_exact(&mut body[already..]).await?;
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("test");
        s.write_all(raw).await.expect("test");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("test");
        out
    }

    #[tokio::test]
    async fn serves_metrics_live_ready_and_refuses_junk() {
        let registry = Registry::new();
        crate::build_info(&registry, "test", "1.2.3").expect("test");
        let ready = Readiness::new();
        let (l, addr) = bind("127.0.0.1:0".parse().expect("test"))
            .await
            .expect("test");
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            l,
            AdminConfig::new(registry, ready.clone()),
            stop.clone(),
        ));

        let m = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("test_build_info{version=\"1.2.3\"} 1"), "{m}");
        assert!(get(addr, b"GET /live HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(addr, b"GET /ready HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get(addr, b"GET /ready HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(addr, b"GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"\x00\x01garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        let huge = vec![b'a'; MAX_HEAD * 2];
        assert!(get(addr, &huge).await.starts_with("HTTP/1.1 400"));
        stop.cancel();
        task.await.expect("test");
    }

    #[tokio::test]
    async fn async_handler_sees_headers_and_body_and_falls_through_to_404() {
        let (l, addr) = bind("127.0.0.1:0".parse().expect("test"))
            .await
            .expect("test");
        let stop = CancellationToken::new();
        let mut config = AdminConfig::new(Registry::new(), Readiness::new());
        config.handler = Some(Arc::new(|req: Request| {
            Box::pin(async move {
                if !req.path.starts_with("/v1/") {
                    return None;
                }
                tokio::task::yield_now().await;
                let auth = req.header("Authorization").unwrap_or("-").to_owned();
                let body = format!("{} {} {auth} {}", req.method, req.path, req.body.len());
                Some(Response::json(200, body))
            }) as HandlerFuture
        }));
        let task = tokio::spawn(serve(l, config, stop.clone()));
        let r = get(
            addr,
            b"POST /v1/x?y=1 HTTP/1.1\r\nauthorization:  Bearer t \r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("POST /v1/x?y=1 Bearer t 3"), "{r}");
        assert!(get(addr, b"GET /other HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        // Built-in routes still come first.
        assert!(get(addr, b"GET /live HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        stop.cancel();
        task.await.expect("test");
    }

    #[tokio::test]
    async fn health_check_reports_the_status() {
        let ready = Readiness::new();
        let (l, addr) = bind("127.0.0.1:0".parse().expect("test"))
            .await
            .expect("test");
        let stop = CancellationToken::new();
        let config = AdminConfig::new(Registry::new(), ready.clone());
        let task = tokio::spawn(serve(l, config, stop.clone()));
        let wait = Duration::from_secs(5);
        assert_eq!(check(addr, "/live", wait).await.expect("test"), 200);
        assert_eq!(check(addr, "/ready", wait).await.expect("test"), 503);
        ready.set(true);
        assert_eq!(check(addr, "/ready", wait).await.expect("test"), 200);
        stop.cancel();
        task.await.expect("test");
        // Nobody listening any more: an error, not a status.
        assert!(check(addr, "/live", wait).await.is_err());

        // A listener that accepts and never answers: the time limit.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("test");
        let silent_addr = silent.local_addr().expect("test");
        let e = check(silent_addr, "/live", Duration::from_millis(200))
            .await
            .expect_err("timed out");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);

        assert_eq!(
            local_admin_addr("0.0.0.0:9465".parse().expect("test")),
            "127.0.0.1:9465".parse().expect("test")
        );
        assert_eq!(
            local_admin_addr("[::]:9464".parse().expect("test")),
            "[::1]:9464".parse().expect("test")
        );
        assert_eq!(
            local_admin_addr("10.0.0.5:9464".parse().expect("test")),
            "10.0.0.5:9464".parse().expect("test")
        );
    }
}
