//! A small HTTP/1.1 client for the API socket that sends requests the way ch-remote does: one connection
//! per request, `Content-Length` always, `Content-Type` only with a body, fds by SCM_RIGHTS with the head.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::scm;
use crate::CH_API_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket I/O failed")]
    Io(#[from] io::Error),
    #[error("malformed response from the API server: {0}")]
    BadResponse(String),
    #[error("the API server did not become ready within {0:?}")]
    NotReady(Duration),
}

/// The largest response we read; the server's replies are far smaller.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

pub struct ApiClient {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// Gives up on a request whose reply takes longer than `timeout` (none by default: boot and restore
    /// can take a while).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `method /api/v1/<endpoint>` with an optional JSON body and fds; returns the status and the
    /// body (empty for 204).
    pub fn request(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
        fds: &[RawFd],
    ) -> Result<(u16, String), ClientError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        stream.set_read_timeout(self.timeout)?;
        stream.set_write_timeout(self.timeout)?;
        let endpoint = endpoint.trim_start_matches('/');
        let mut head =
            format!("{method} /api/{CH_API_VERSION}/{endpoint} HTTP/1.1\r\nHost: localhost\r\n");
        let body = body.unwrap_or("");
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut message = head.into_bytes();
        message.extend_from_slice(body.as_bytes());
        let sent = scm::send_with_fds(stream.as_raw_fd(), &message, fds)?;
        scm::send_all(stream.as_raw_fd(), &message[sent..])?;
        read_response(&stream)
    }

    /// `request` for an endpoint that must answer 2xx: the body on success, the server's error chain
    /// joined by ": " otherwise.
    pub fn call(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
        fds: &[RawFd],
    ) -> Result<Result<String, (u16, String)>, ClientError> {
        let (status, text) = self.request(method, endpoint, body, fds)?;
        if (200..300).contains(&status) {
            Ok(Ok(text))
        } else {
            Ok(Err((status, error_message(&text))))
        }
    }

    /// Polls `vmm.ping` every 10 ms until it answers 200, as Kata does after starting the VMM.
    pub fn wait_until_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        let probe = ApiClient::new(self.socket.clone()).with_timeout(Duration::from_secs(1));
        loop {
            if let Ok((200, _)) = probe.request("GET", "vmm.ping", None, &[]) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::NotReady(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Turns an error body (a JSON array of strings, outermost first) into one line; other bodies are
/// returned as they are.
pub fn error_message(body: &str) -> String {
    match serde_json::from_str::<Vec<String>>(body) {
        Ok(chain) if !chain.is_empty() => chain.join(": "),
        _ => body.trim().to_string(),
    }
}

fn read_response(stream: &UnixStream) -> Result<(u16, String), ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut fds = Vec::new();
    loop {
        let (status, head_len, length) = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(0);
                    let length = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map(|h| {
                            std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .ok_or_else(|| {
                                    ClientError::BadResponse("bad Content-Length".into())
                                })
                        })
                        .transpose()?;
                    (Some(status), len, length)
                }
                Ok(httparse::Status::Partial) => (None, 0, None),
                Err(e) => return Err(ClientError::BadResponse(e.to_string())),
            }
        };
        if let Some(status) = status {
            // 1xx are interim; the real response follows.
            if (100..200).contains(&status) {
                buf.drain(..head_len);
                continue;
            }
            let complete = match length {
                _ if status == 204 || status == 304 => Some(head_len),
                Some(n) => (buf.len() >= head_len + n).then_some(head_len + n),
                None => None,
            };
            if let Some(end) = complete {
                let body = String::from_utf8_lossy(&buf[head_len..end]).into_owned();
                return Ok((status, body));
            }
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::BadResponse("response too large".into()));
        }
        let got = scm::recv_with_fds(stream.as_raw_fd(), &mut chunk, &mut fds)?;
        if got.bytes == 0 {
            // Without a Content-Length the body runs to the end of the stream.
            return match status {
                Some(status) => Ok((
                    status,
                    String::from_utf8_lossy(&buf[head_len..]).into_owned(),
                )),
                None => Err(ClientError::BadResponse(
                    "connection closed before a complete response".into(),
                )),
            };
        }
        buf.extend_from_slice(&chunk[..got.bytes]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        assert_eq!(error_message(r#"["a","b"]"#), "a: b");
        assert_eq!(error_message("plain\n"), "plain");
        assert_eq!(error_message("[]"), "[]");
    }

    #[test]
    fn connect_errors_name_the_socket() {
        let c = ApiClient::new("/nonexistent/trenv.sock");
        let e = c.request("GET", "vmm.ping", None, &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/trenv.sock"));
        assert!(matches!(
            c.wait_until_ready(Duration::from_millis(30)),
            Err(ClientError::NotReady(_))
        ));
    }
}
