//! The pool's HTTP/1.1 front on a Unix socket: `POST /invoke/{function}` (body: the payload line) and
//! `GET /status`. One request per connection (`Connection: close`), with strict size limits.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{InvokeError, Pool, MAX_PAYLOAD};

const MAX_HEAD: usize = 8192;
const MAX_CONNECTIONS: usize = 64;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request: head up to [`MAX_HEAD`] bytes, body up to [`MAX_PAYLOAD`] (by Content-Length).
pub fn read_request(stream: &mut impl Read) -> Result<Request, (u16, &'static str)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_HEAD {
            return Err((431, "request head too large"));
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err((400, "incomplete request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| (400, "head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(path), Some(version), None) = (method, path, version, parts.next())
    else {
        return Err((400, "bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((505, "HTTP/1.x only"));
    }
    let mut length = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or((400, "bad header"))?;
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| (400, "bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err((501, "no Transfer-Encoding support"));
        }
    }
    if length > MAX_PAYLOAD + 2 {
        return Err((413, "payload too large"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() > length {
        return Err((400, "more body than Content-Length"));
    }
    let have = body.len();
    body.resize(length, 0);
    stream
        .read_exact(&mut body[have..])
        .map_err(|_| (400, "incomplete body"))?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })
}

fn respond(stream: &mut UnixStream, status: u16, headers: &[(&str, String)], body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut text = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let _ = stream.write_all(text.as_bytes());
}

fn handle(pool: &Pool, mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let request = match read_request(&mut stream) {
        Ok(r) => r,
        Err((status, why)) => return respond(&mut stream, status, &[], &format!("{why}\n")),
    };
    if request.method == "GET" && request.path == "/status" {
        let body = pool.status().to_string();
        return respond(&mut stream, 200, &[], &body);
    }
    let Some(function) = request.path.strip_prefix("/invoke/") else {
        return respond(&mut stream, 404, &[], "not found\n");
    };
    if request.method != "POST" {
        return respond(&mut stream, 405, &[], "POST only\n");
    }
    let Ok(payload) = std::str::from_utf8(&request.body) else {
        return respond(&mut stream, 400, &[], "payload is not UTF-8\n");
    };
    let payload = payload.strip_suffix('\n').unwrap_or(payload);
    let payload = payload.strip_suffix('\r').unwrap_or(payload);
    match pool.invoke(function, payload) {
        Ok(done) => respond(
            &mut stream,
            200,
            &[
                ("X-Trenv-Path", done.path.as_str().to_string()),
                ("X-Trenv-Sandbox", done.sandbox.to_string()),
                ("X-Trenv-In-Place", done.in_place.to_string()),
            ],
            &format!("{}\n", done.answer),
        ),
        Err(e) => {
            let status = match e {
                InvokeError::UnknownFunction(_) => 404,
                InvokeError::BadPayload => 400,
                InvokeError::Busy { .. }
                | InvokeError::MemoryCap { .. }
                | InvokeError::ShuttingDown => 503,
                InvokeError::Sandbox { .. } => 502,
            };
            respond(&mut stream, status, &[], &format!("{e}\n"));
        }
    }
}

/// How often the accept loop looks at its stop flag while no client connects.
const STOP_CHECK_MS: libc::c_int = 100;

/// Serves until `stop` is set, then waits (up to `drain`) for requests in flight to finish, so that the
/// sandboxes they hold are back in the pool (and killed with it) before the caller drops the pool.
pub fn serve(pool: Arc<Pool>, listener: UnixListener, stop: &AtomicBool, drain: Duration) {
    let active = Arc::new(AtomicUsize::new(0));
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("cannot make the listener non-blocking: {e}");
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    respond(&mut stream, 503, &[], "too many connections\n");
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (pool, done) = (pool.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("pool-http".into())
                        .spawn(move || {
                            handle(&pool, stream);
                            done.fetch_sub(1, Ordering::Relaxed);
                        });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Block until a client connects (an invocation must not wait for a polling tick), waking
                // now and then to notice `stop`.
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: polls one descriptor we own through a pollfd on our stack.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, STOP_CHECK_MS) };
            }
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    pool.shutdown();
    let deadline = Instant::now() + drain;
    while active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_with_a_body() {
        let raw = b"POST /invoke/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n42\n";
        let r = read_request(&mut &raw[..]).unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/invoke/a");
        assert_eq!(r.body, b"42\n");
    }

    #[test]
    fn refuses_oversized_or_malformed_requests() {
        let big = format!(
            "POST /invoke/a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_PAYLOAD + 100
        );
        assert_eq!(read_request(&mut big.as_bytes()).unwrap_err().0, 413);
        let head = vec![b'a'; MAX_HEAD * 2];
        assert_eq!(read_request(&mut &head[..]).unwrap_err().0, 431);
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"POST /x HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            assert_eq!(read_request(&mut &bad[..]).unwrap_err().0, 400);
        }
        let chunked = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(read_request(&mut &chunked[..]).unwrap_err().0, 501);
    }
}
