//! The one HTTP client of the project, for the admin endpoints: `core-stub devices …`,
//! `core-stub claim`, `activate`, `profiles` and `audit`, both daemons' `health` subcommands, `device-sim bench` and the end-to-end
//! tests. One HTTP/1.1 request per connection over a tokio `TcpStream`, with a time limit and a
//! bounded response size.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response accepted (head and body).
pub const MAX_RESPONSE: usize = 4 << 20;

/// Why no answer came back. The peer's refusals are not errors: they are answers with a status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, writing or reading failed.
    #[error("{addr}: {source}")]
    Io {
        /// The admin address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No complete answer within the time limit.
    #[error("{0}: no answer in time")]
    Timeout(SocketAddr),
    /// The answer is not HTTP, or too large.
    #[error("{addr}: bad response: {why}")]
    BadResponse {
        /// The admin address.
        addr: SocketAddr,
        /// What is wrong.
        why: &'static str,
    },
}

impl From<ClientError> for std::io::Error {
    fn from(e: ClientError) -> Self {
        let kind = match &e {
            ClientError::Io { source, .. } => source.kind(),
            ClientError::Timeout(_) => std::io::ErrorKind::TimedOut,
            ClientError::BadResponse { .. } => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e.to_string())
    }
}

/// An answer: the status and the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// A request body and its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Body<'a> {
    /// `Content-Type` (`application/json`, `text/csv`, …).
    pub content_type: &'a str,
    /// The bytes.
    pub bytes: &'a [u8],
}

impl<'a> Body<'a> {
    /// A JSON body.
    pub fn json(bytes: &'a [u8]) -> Self {
        Self {
            content_type: "application/json",
            bytes,
        }
    }

    /// A CSV body (manifests, activation plans).
    pub fn csv(bytes: &'a [u8]) -> Self {
        Self {
            content_type: "text/csv",
            bytes,
        }
    }
}

/// `GET path` without credentials.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Answer, ClientError> {
    request(addr, "GET", path, None, None, timeout).await
}

/// Sends `method path` (with `Authorization: Bearer token` when given, and `body` when given)
/// and reads the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Body<'_>>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(io)?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let (content_type, bytes) = match body {
            Some(b) => (format!("Content-Type: {}\r\n", b.content_type), b.bytes),
            None => (String::new(), &[][..]),
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n",
            bytes.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(bytes).await.map_err(io)?;
        let mut raw = Vec::with_capacity(4096);
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                break;
            }
            if raw.len() + n > MAX_RESPONSE {
                return Err(ClientError::BadResponse {
                    addr,
                    why: "response too large",
                });
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        parse_response(&raw).ok_or(ClientError::BadResponse {
            addr,
            why: "not an HTTP/1.1 response",
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(addr))?
}

/// Status line, headers, then the body (the server closes the connection after it).
fn parse_response(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()?;
    Some(Answer {
        status,
        body: raw[end + 4..].to_vec(),
    })
}

impl Answer {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response() {
        let a =
            parse_response(b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\n\r\n{}").expect("parse");
        assert_eq!((a.status, a.body.as_slice()), (409, &b"{}"[..]));
        assert!(parse_response(b"garbage\r\n\r\n").is_none());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_none());
    }

    #[tokio::test]
    async fn sends_the_body_with_its_type_and_length() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while !got.ends_with(b"a,b\n1,2\n") {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed early");
                got.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("write");
            String::from_utf8(got).expect("utf-8")
        });
        let a = request(
            addr,
            "POST",
            "/v1/plans",
            Some("t"),
            Some(Body::csv(b"a,b\n1,2\n")),
            Duration::from_secs(5),
        )
        .await
        .expect("answer");
        assert_eq!((a.status, a.text().as_str()), (200, "ok"));
        let head = server.await.expect("server");
        assert!(head.contains("Content-Type: text/csv\r\n"), "{head}");
        assert!(head.contains("Content-Length: 8\r\n"), "{head}");
        assert!(head.contains("Authorization: Bearer t\r\n"), "{head}");
    }
}
