//! The server over a real Unix socket, with a stand-in VMM thread answering the calls.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use api::client::ApiClient;
use api::models::{VmState, VmmPingResponse};
use api::router::{ApiRequest, ApiResponse};
use api::server::{self, ApiCall, ApiSocketSpec, Limits};
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

static NEXT: AtomicUsize = AtomicUsize::new(0);
/// Set by the fake VMM's work after a vm.resume reply.
static RESUMED: AtomicUsize = AtomicUsize::new(0);
/// Set by the test once it has the vm.resume reply: the work waits for it.
static RESUME_ALLOWED: AtomicUsize = AtomicUsize::new(0);

struct TestServer {
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The stand-in VMM: waits on the eventfd like the real one, then answers every queued call.
fn fake_vmm(calls: Receiver<ApiCall>, wake: EventFd) {
    let mut state: Option<VmState> = None;
    loop {
        if wake.read().is_err() {
            return;
        }
        while let Ok(call) = calls.try_recv() {
            if matches!(call.request, ApiRequest::VmmShutdown) {
                call.reply.answer(ApiResponse::Empty);
                // The real VMM exits the process here, once the reply is out.
                server::wait_for_replies(Duration::from_secs(1));
                return;
            }
            let response = match call.request {
                ApiRequest::VmmPing => ApiResponse::json(&VmmPingResponse {
                    build_version: "test".into(),
                    version: api::CH_COMPAT_VERSION.into(),
                    pid: std::process::id() as i64,
                    features: vec![],
                }),
                ApiRequest::VmCreate(_) => {
                    state = Some(VmState::Created);
                    ApiResponse::Empty
                }
                ApiRequest::VmInfo => match state {
                    Some(s) => ApiResponse::Json(json!({ "state": s })),
                    None => ApiResponse::message(404, "VM is not created"),
                },
                ApiRequest::VmAddNet(config, fds) => {
                    // Prove the fds are live descriptors of this process: write through each.
                    for fd in &fds {
                        let mut file = std::fs::File::from(fd.try_clone().unwrap());
                        file.write_all(b"tap!").unwrap();
                    }
                    ApiResponse::Json(json!({ "id": config.id, "fds": fds.len() }))
                }
                ApiRequest::VmBoot => ApiResponse::not_available("booting in this fake"),
                ApiRequest::VmResume => {
                    // Like the real VMM: the guest may run only once the reply is written. The work
                    // holds on until the test has seen the reply, so a reply written after the work
                    // would never arrive.
                    let after = Box::new(|| {
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while RESUME_ALLOWED.load(Ordering::SeqCst) == 0
                            && Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        RESUMED.store(1, Ordering::SeqCst);
                    });
                    call.reply.answer_then(ApiResponse::Empty, after);
                    continue;
                }
                _ => ApiResponse::Empty,
            };
            call.reply.answer(response);
        }
    }
}

fn serve(limits: Limits) -> TestServer {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("trenv-api-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let listener = server::bind(&ApiSocketSpec::Path(socket.clone())).unwrap();
    let (tx, rx) = channel();
    let wake = EventFd::new(0).unwrap();
    let vmm_wake = wake.try_clone().unwrap();
    std::thread::spawn(move || fake_vmm(rx, vmm_wake));
    server::start_with_limits(listener, tx, wake, limits).unwrap();
    TestServer { dir, socket }
}

fn quick_limits() -> Limits {
    Limits {
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one response off `stream` (leaving anything after it unread in `pending`).
fn read_response(stream: &mut UnixStream, pending: &mut Vec<u8>) -> Response {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = resp.parse(pending) {
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let status = resp.code.unwrap();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            if pending.len() >= len + length {
                let body = String::from_utf8(pending[len..len + length].to_vec()).unwrap();
                pending.drain(..len + length);
                return Response {
                    status,
                    headers,
                    body,
                };
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("response");
        assert!(n > 0, "connection closed before a full response");
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn exchange(stream: &mut UnixStream, raw: &[u8]) -> Response {
    stream.write_all(raw).unwrap();
    read_response(stream, &mut Vec::new())
}

fn assert_closed(stream: &mut UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("the server closes");
    assert!(rest.is_empty(), "unexpected bytes {rest:?}");
}

fn connect(s: &TestServer) -> UnixStream {
    UnixStream::connect(&s.socket).unwrap()
}

#[test]
fn requests_need_no_content_type() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(&mut c, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let ping: VmmPingResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(ping.version, api::CH_COMPAT_VERSION);
    let body = br#"{"payload":{"kernel":"/k"}}"#;
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let r = exchange(&mut c, &[head.as_bytes(), body].concat());
    assert_eq!(r.status, 204);
    assert_eq!(r.body, "");
    assert_eq!(r.header("content-length"), None);
}

#[test]
fn work_after_a_reply_runs_once_the_reply_is_written() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    // The work waits for this test to see the reply: had it to run before the write, no reply would come.
    let r = exchange(&mut c, b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 204);
    assert_eq!(
        RESUMED.load(Ordering::SeqCst),
        0,
        "the work ran before the reply"
    );
    RESUME_ALLOWED.store(1, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while RESUMED.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the work after the reply never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn keep_alive_serves_three_requests_on_one_connection() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(
        &mut c,
        b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.body, r#"["VM is not created"]"#);
    let body = br#"{"payload":{"kernel":"/k"},"memory":{"size":268435456}}"#;
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    assert_eq!(
        exchange(&mut c, &[head.as_bytes(), body].concat()).status,
        204
    );
    let r = exchange(
        &mut c,
        b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, r#"{"state":"Created"}"#);
    assert_eq!(r.header("connection"), None);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    c.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\nGET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut c, &mut pending).status, 404);
    assert_eq!(read_response(&mut c, &mut pending).status, 200);
}

#[test]
fn connection_close_is_honoured() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(
        &mut c,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed(&mut c);
    // HTTP/1.0 closes unless asked to keep alive.
    let mut c = connect(&s);
    assert_eq!(
        exchange(&mut c, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n").status,
        200
    );
    assert_closed(&mut c);
}

#[test]
fn oversized_header_is_431() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let mut raw = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Filler: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 17 << 10));
    raw.extend_from_slice(b"\r\n\r\n");
    // The server may answer and close before taking all of it.
    let _ = c.write_all(&raw);
    let r = read_response(&mut c, &mut Vec::new());
    assert_eq!(r.status, 431);
    assert!(r.body.starts_with("[\""));
    // Many small headers are refused the same way.
    let mut c = connect(&s);
    let mut raw = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        raw.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    assert_eq!(exchange(&mut c, &raw).status, 431);
}

#[test]
fn oversized_body_is_413_before_it_is_sent() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(
        &mut c,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n",
    );
    assert_eq!(r.status, 413);
    assert_closed(&mut c);
}

#[test]
fn chunked_bodies_are_411() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(
        &mut c,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 411);
    assert!(r.body.contains("Content-Length"));
}

#[test]
fn conflicting_content_lengths_are_400() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(
        &mut c,
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
    );
    assert_eq!(r.status, 400);
}

#[test]
fn expect_100_continue_is_answered() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let body = br#"{"payload":{"kernel":"/k"}}"#;
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut c, &mut pending).status, 100);
    c.write_all(body).unwrap();
    assert_eq!(read_response(&mut c, &mut pending).status, 204);
}

#[test]
fn a_stalled_client_does_not_block_others_and_is_dropped() {
    let s = serve(Limits {
        request_timeout: Duration::from_millis(1500),
        idle_timeout: Duration::from_millis(1500),
        ..Limits::default()
    });
    let mut stalled = connect(&s);
    stalled.write_all(b"PUT /api/v1/vm.crea").unwrap();
    let mut silent = connect(&s);
    let start = Instant::now();
    let mut other = connect(&s);
    assert_eq!(
        exchange(&mut other, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n").status,
        200
    );
    // Served well before the stalled clients' timeouts run out.
    assert!(start.elapsed() < Duration::from_millis(1000));
    // Mid-request: 408, then closed. Silent since connecting: closed without a word.
    let r = read_response(&mut stalled, &mut Vec::new());
    assert_eq!(r.status, 408);
    assert_closed(&mut stalled);
    assert_closed(&mut silent);
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_slow_body_times_out() {
    let s = serve(quick_limits());
    let mut c = connect(&s);
    c.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    assert_eq!(read_response(&mut c, &mut Vec::new()).status, 408);
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let s = serve(quick_limits());
    let mut c = connect(&s);
    assert_eq!(
        exchange(&mut c, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n").status,
        200
    );
    assert_closed(&mut c);
}

#[test]
fn fds_passed_with_scm_rights_reach_the_request() {
    let s = serve(Limits::default());
    let (mut r1, w1) = UnixStream::pair().unwrap();
    let (mut r2, w2) = UnixStream::pair().unwrap();
    let client = ApiClient::new(&s.socket);
    let (status, body) = client
        .request(
            "PUT",
            "vm.add-net",
            Some(r#"{"id":"net0","tap":"tap0"}"#),
            &[w1.as_raw_fd(), w2.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"fds":2,"id":"net0"}"#);
    drop((w1, w2));
    for r in [&mut r1, &mut r2] {
        let mut got = [0u8; 4];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"tap!");
    }
}

#[test]
fn fds_on_other_requests_are_closed() {
    let s = serve(Limits::default());
    let (mut r, w) = UnixStream::pair().unwrap();
    let client = ApiClient::new(&s.socket);
    let (status, _) = client
        .request("GET", "vmm.ping", None, &[w.as_raw_fd()])
        .unwrap();
    assert_eq!(status, 200);
    drop(w);
    // The server closed its copy, so the pair reports end of stream.
    r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(r.read_to_end(&mut buf).unwrap(), 0);
}

#[test]
fn garbage_is_400_and_the_server_keeps_serving() {
    let s = serve(Limits::default());
    for garbage in [
        &b"\x00\x01\x02\xff\r\n\r\n"[..],
        b"HELLO\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nBad Header\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ] {
        let mut c = connect(&s);
        let r = exchange(&mut c, garbage);
        assert_eq!(r.status, 400, "{garbage:?}");
        assert_closed(&mut c);
    }
    let client = ApiClient::new(&s.socket);
    assert_eq!(client.request("GET", "vmm.ping", None, &[]).unwrap().0, 200);
}

#[test]
fn route_errors_keep_the_connection() {
    let s = serve(Limits::default());
    let mut c = connect(&s);
    let r = exchange(&mut c, b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("PUT"));
    let r = exchange(&mut c, b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 404);
    let r = exchange(
        &mut c,
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(r.status, 400);
    let r = exchange(
        &mut c,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\n{oops",
    );
    assert_eq!(r.status, 400);
    let chain: Vec<String> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(chain[0], "invalid request body for vm.create");
    let r = exchange(&mut c, b"PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 501);
    assert_eq!(
        exchange(&mut c, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n").status,
        200
    );
}

#[test]
fn connections_over_the_cap_get_503() {
    let s = serve(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let mut a = connect(&s);
    let mut b = connect(&s);
    // Make sure both are being served before the third arrives.
    for c in [&mut a, &mut b] {
        assert_eq!(
            exchange(c, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n").status,
            200
        );
    }
    let mut third = connect(&s);
    assert_eq!(read_response(&mut third, &mut Vec::new()).status, 503);
    drop((a, b));
    // Slots free up when connections end.
    let client = ApiClient::new(&s.socket);
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.request("GET", "vmm.ping", None, &[]).unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "slots were not released");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn vmm_shutdown_is_answered_before_the_vmm_goes() {
    let s = serve(Limits::default());
    let client = ApiClient::new(&s.socket);
    let reply = client.request("PUT", "vmm.shutdown", None, &[]).unwrap();
    assert_eq!(reply, (204, String::new()));
    // The stand-in VMM has returned: the server now says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.request("GET", "vmm.ping", None, &[]).unwrap().0 != 503 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_vmm_that_is_gone_gives_503() {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("trenv-api-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let listener = server::bind(&ApiSocketSpec::Path(socket.clone())).unwrap();
    let (tx, rx) = channel();
    drop(rx);
    server::start(listener, tx, EventFd::new(0).unwrap()).unwrap();
    let client = ApiClient::new(&socket);
    let (status, body) = client.request("GET", "vmm.ping", None, &[]).unwrap();
    assert_eq!(status, 503);
    assert!(api::client::error_message(&body).contains("VMM"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn client_waits_until_ready() {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("trenv-api-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let late = socket.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let listener = server::bind(&ApiSocketSpec::Path(late)).unwrap();
        let (tx, rx) = channel();
        let wake = EventFd::new(0).unwrap();
        let vmm_wake = wake.try_clone().unwrap();
        std::thread::spawn(move || fake_vmm(rx, vmm_wake));
        server::start(listener, tx, wake).unwrap();
    });
    let client = ApiClient::new(&socket);
    client.wait_until_ready(Duration::from_secs(5)).unwrap();
    starter.join().unwrap();
    let result = client.call("PUT", "vm.boot", None, &[]).unwrap();
    assert_eq!(
        result,
        Err((
            501,
            "booting in this fake is not available in this version of trenv".to_string()
        ))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
