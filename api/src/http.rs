//! HTTP/1.1 framing for the API server: reading one request (head parsed by `httparse`, body framed by
//! Content-Length) with the fds that arrived alongside it, and writing one response.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::scm;

/// Limits on what one connection may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus headers; more is answered 431.
    pub max_header_bytes: usize,
    /// Content-Length above this is answered 413.
    pub max_body_bytes: usize,
    /// Once a request has started, all of it must arrive within this time (else 408 and close).
    pub request_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// File descriptors one request may carry.
    pub max_fds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 << 10,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(5),
            // Go's client keeps idle connections for 90 s; closing ours earlier is allowed and frees the
            // thread, and the client notices the close before reusing the connection.
            idle_timeout: Duration::from_secs(30),
            max_connections: 64,
            max_fds: scm::MAX_FDS_PER_MESSAGE,
        }
    }
}

/// How many headers a request may have; more is answered 431.
const MAX_HEADERS: usize = 64;

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    pub keep_alive: bool,
}

/// Why no request could be read. `Closed` and `Idle` end the connection quietly; the others are answered
/// with their status and then end it, since the stream can no longer be framed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("connection idle")]
    Idle,
    #[error("{1}")]
    Reply(u16, String),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

fn reply(status: u16, message: impl Into<String>) -> ReadError {
    ReadError::Reply(status, message.into())
}

/// Reads requests off one connection, keeping bytes that arrived past the end of a request.
pub struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
    limits: Limits,
}

/// The head's facts, copied out so the buffer can be consumed.
struct Head {
    len: usize,
    method: String,
    target: String,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, limits: Limits) -> Self {
        Connection {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
            fds_truncated: false,
            limits,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Receives once, waiting at most `timeout`. Ok(false) on end of stream.
    fn fill(&mut self, timeout: Duration) -> Result<bool, ReadError> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 8192];
        let received = match scm::recv_with_fds(self.stream.as_raw_fd(), &mut chunk, &mut self.fds)
        {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::Idle)
            }
            Err(e) => return Err(e.into()),
        };
        self.fds_truncated |= received.fds_truncated;
        self.buf.extend_from_slice(&chunk[..received.bytes]);
        Ok(received.bytes > 0)
    }

    /// Reads the next request. Waits up to the idle timeout for it to begin, then up to the request
    /// timeout for all of it.
    pub fn read_request(&mut self) -> Result<Request, ReadError> {
        if self.buf.is_empty() && !self.fill(self.limits.idle_timeout)? {
            return Err(ReadError::Closed);
        }
        let deadline = Instant::now() + self.limits.request_timeout;
        let stalled = || reply(408, "the request did not arrive in time");
        let head = loop {
            if let Some(head) = self.parse_head()? {
                break head;
            }
            if self.buf.len() > self.limits.max_header_bytes {
                return Err(reply(431, "request header block is too large"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(left) {
                Ok(true) => {}
                Ok(false) => return Err(ReadError::Closed),
                Err(ReadError::Idle) => return Err(stalled()),
                Err(e) => return Err(e),
            }
        };
        if head.content_length > self.limits.max_body_bytes {
            return Err(reply(
                413,
                format!(
                    "request body of {} bytes is larger than the limit of {} bytes",
                    head.content_length, self.limits.max_body_bytes
                ),
            ));
        }
        let end = head.len + head.content_length;
        if head.expect_continue && self.buf.len() < end {
            scm::send_all(self.stream.as_raw_fd(), b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        while self.buf.len() < end {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(left) {
                Ok(true) => {}
                Ok(false) => return Err(ReadError::Closed),
                Err(ReadError::Idle) => return Err(stalled()),
                Err(e) => return Err(e),
            }
        }
        if self.fds_truncated || self.fds.len() > self.limits.max_fds {
            return Err(reply(
                400,
                format!(
                    "too many file descriptors with one request (at most {})",
                    self.limits.max_fds
                ),
            ));
        }
        let body = self.buf[head.len..end].to_vec();
        self.buf.drain(..end);
        Ok(Request {
            method: head.method,
            target: head.target,
            body,
            fds: std::mem::take(&mut self.fds),
            keep_alive: head.keep_alive,
        })
    }

    fn parse_head(&self) -> Result<Option<Head>, ReadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(reply(
                    431,
                    format!("more than {MAX_HEADERS} request headers"),
                ))
            }
            Err(e) => return Err(reply(400, format!("malformed HTTP request: {e}"))),
        };
        if len > self.limits.max_header_bytes {
            return Err(reply(431, "request header block is too large"));
        }
        let version = req.version.unwrap_or(1);
        let mut content_length: Option<usize> = None;
        let mut keep_alive = version >= 1;
        let mut expect_continue = false;
        for h in req.headers.iter() {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| reply(400, format!("header {} is not UTF-8", h.name)))?
                .trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n: usize = value
                    .parse()
                    .map_err(|_| reply(400, format!("bad Content-Length '{value}'")))?;
                // Differing lengths are a request-smuggling pattern (RFC 9112 6.3).
                if content_length.is_some_and(|old| old != n) {
                    return Err(reply(400, "conflicting Content-Length headers"));
                }
                content_length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(reply(
                    411,
                    format!(
                        "Transfer-Encoding '{value}' is not supported; send the body with a Content-Length"
                    ),
                ));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("expect") {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            }
        }
        let method = req.method.unwrap_or_default().to_string();
        let mut target = req.path.unwrap_or_default();
        // Absolute form (`http://localhost/api/v1/vm.info`), which proxies and some clients send.
        if let Some(rest) = target
            .strip_prefix("http://")
            .or_else(|| target.strip_prefix("https://"))
        {
            target = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
        }
        Ok(Some(Head {
            len,
            method,
            target: target.to_string(),
            content_length: content_length.unwrap_or(0),
            keep_alive,
            expect_continue,
        }))
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Serializes a response. `body` is JSON; a 204 carries none (RFC 9110 15.3.5: no Content-Length either).
pub fn format_response(
    status: u16,
    body: Option<&str>,
    allow: Option<&str>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: trenv\r\n",
        reason_phrase(status)
    );
    if let Some(allow) = allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    if status == 204 {
        out.push_str("\r\n");
    } else {
        let body = body.unwrap_or("");
        if !body.is_empty() {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::net::Shutdown;

    fn quick() -> Limits {
        Limits {
            request_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(200),
            ..Limits::default()
        }
    }

    /// Feeds `bytes` to a connection (then end of stream) and reads requests until it gives up.
    fn read_all(bytes: &[u8]) -> (Vec<Request>, ReadError) {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(bytes).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut conn = Connection::new(server, quick());
        let mut requests = Vec::new();
        loop {
            match conn.read_request() {
                Ok(r) => requests.push(r),
                Err(e) => return (requests, e),
            }
        }
    }

    #[test]
    fn reads_pipelined_requests_and_bodies() {
        let (reqs, end) = read_all(
            b"PUT /api/v1/vm.create HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}GET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(matches!(end, ReadError::Closed));
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            (reqs[0].method.as_str(), reqs[0].body.as_slice()),
            ("PUT", &b"{}"[..])
        );
        assert!(reqs[0].keep_alive);
        assert_eq!(reqs[1].target, "/api/v1/vm.info");
        assert!(!reqs[1].keep_alive);
    }

    #[test]
    fn absolute_form_targets_are_reduced_to_the_path() {
        let (reqs, _) = read_all(b"GET http://localhost/api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert_eq!(reqs[0].target, "/api/v1/vm.info");
    }

    #[test]
    fn truncated_requests_end_quietly() {
        let (reqs, end) =
            read_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
        assert!(reqs.is_empty());
        assert!(matches!(end, ReadError::Closed));
    }

    #[test]
    fn responses_are_framed() {
        let r = String::from_utf8(format_response(204, None, None, true)).unwrap();
        assert_eq!(r, "HTTP/1.1 204 No Content\r\nServer: trenv\r\n\r\n");
        let r =
            String::from_utf8(format_response(405, Some("[\"x\"]"), Some("PUT"), false)).unwrap();
        assert!(r.contains("Allow: PUT\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("Content-Length: 5\r\n\r\n[\"x\"]"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let (_, end) = read_all(&bytes);
            if let ReadError::Reply(status, _) = end {
                prop_assert!([400, 408, 411, 413, 431].contains(&status), "{}", status);
            }
        }

        #[test]
        fn mangled_requests_never_panic(
            head in "(GET|PUT|POST) /api/v1/[a-z.-]{0,12} HTTP/1\\.[01]\r\n",
            headers in prop::collection::vec("[A-Za-z-]{1,16}: [ -~]{0,24}\r\n", 0..6),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = head.into_bytes();
            for h in headers {
                bytes.extend_from_slice(h.as_bytes());
            }
            bytes.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            bytes.extend_from_slice(&body);
            let (reqs, _) = read_all(&bytes);
            for r in reqs {
                prop_assert!(r.body.len() <= body.len());
            }
        }
    }
}
