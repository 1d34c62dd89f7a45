//! The API server: HTTP/1.1 on a Unix stream socket, one thread per connection (capped; threads are
//! reused for later connections and end after a minute idle), each request routed and handed to the VMM
//! as an [`ApiCall`], the VMM woken through an eventfd, and its reply written back. A stalled or
//! misbehaving client only ever holds its own thread, and only until its timeout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

pub use crate::http::Limits;
use crate::http::{format_response, Connection, ReadError, Request};
use crate::router::{self, ApiRequest, ApiResponse};
use crate::scm;

/// Work that must wait until a reply is written back to its client (see [`ApiReplier::answer_then`]).
pub type AfterReply = Box<dyn FnOnce() + Send>;

/// One request for the VMM, with the channel its answer goes back on.
#[derive(Debug)]
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: ApiReplier,
}

/// Where the answer to one [`ApiCall`] goes.
pub struct ApiReplier(Sender<(ApiResponse, Option<AfterReply>)>);

impl std::fmt::Debug for ApiReplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiReplier")
    }
}

impl ApiReplier {
    /// Answers the call.
    pub fn answer(self, response: ApiResponse) {
        let _ = self.0.send((response, None));
    }

    /// Answers the call; `after` runs on the connection's thread once the reply is written to the client
    /// (or could not be), so that what the reply must not wait for, such as a resumed guest taking a CPU,
    /// starts only then.
    pub fn answer_then(self, response: ApiResponse, after: AfterReply) {
        if let Err(unsent) = self.0.send((response, Some(after))) {
            // The connection is gone: nobody waits for a reply, so the work runs now.
            if let (_, Some(after)) = unsent.0 {
                after();
            }
        }
    }
}

/// Where `--api-socket` says to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSocketSpec {
    Path(PathBuf),
    /// An already bound and listening socket inherited from the parent.
    Fd(RawFd),
}

/// Parses `--api-socket` values: `PATH`, `path=PATH`, `fd=N`.
pub fn parse_api_socket(s: &str) -> Result<ApiSocketSpec, String> {
    // Cloud Hypervisor reads this as a k=v list: a comma would mean a second (conflicting) option.
    if s.contains(',') {
        return Err(format!(
            "--api-socket '{s}': give one of PATH, path=PATH or fd=N"
        ));
    }
    if let Some(path) = s.strip_prefix("path=") {
        if path.is_empty() {
            return Err("--api-socket path= needs a path".into());
        }
        return Ok(ApiSocketSpec::Path(path.into()));
    }
    if let Some(fd) = s.strip_prefix("fd=") {
        return match fd.parse::<RawFd>() {
            Ok(n) if n >= 0 => Ok(ApiSocketSpec::Fd(n)),
            _ => Err(format!(
                "--api-socket fd={fd}: expected a file descriptor number"
            )),
        };
    }
    if s.is_empty() {
        return Err("--api-socket needs a path, path=PATH or fd=N".into());
    }
    if s.contains('=') && !s.contains('/') {
        return Err(format!(
            "--api-socket '{s}': expected PATH, path=PATH or fd=N"
        ));
    }
    Ok(ApiSocketSpec::Path(s.into()))
}

/// Binds (or adopts) the listening socket. A socket file left behind by a dead process is removed first;
/// one that still answers, or a path that is not a socket, is refused rather than taken over.
pub fn bind(spec: &ApiSocketSpec) -> io::Result<UnixListener> {
    match spec {
        ApiSocketSpec::Path(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another process is serving {}", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            UnixListener::bind(path)
        }
        ApiSocketSpec::Fd(fd) => {
            // SAFETY: fstat writes into the zeroed struct we own; the fd is only inspected.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(*fd, &mut st) } != 0 {
                return Err(io::Error::last_os_error());
            }
            if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("fd {fd} is not a socket"),
                ));
            }
            // SAFETY: the caller handed this fd to us on the command line for exactly this use; it is
            // a socket (checked above) and nothing else in the process owns it.
            let listener = unsafe { UnixListener::from_raw_fd(*fd) };
            // Keep it out of children we spawn (the flag is per fd, not per socket).
            // SAFETY: F_SETFD on an fd we now own.
            unsafe { libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok(listener)
        }
    }
}

/// Starts the server thread with the default [`Limits`].
pub fn start(
    listener: UnixListener,
    calls: Sender<ApiCall>,
    wake: EventFd,
) -> io::Result<JoinHandle<()>> {
    start_with_limits(listener, calls, wake, Limits::default())
}

/// Starts the server thread: each request is routed, sent to the VMM as an [`ApiCall`] on `calls`, the VMM
/// is woken through `wake`, and the reply is written back.
pub fn start_with_limits(
    listener: UnixListener,
    calls: Sender<ApiCall>,
    wake: EventFd,
    limits: Limits,
) -> io::Result<JoinHandle<()>> {
    let shared = Arc::new(Shared {
        calls,
        wake,
        limits,
        active: AtomicUsize::new(0),
        idle_threads: AtomicUsize::new(0),
    });
    thread::Builder::new()
        .name("api-server".into())
        .spawn(move || accept_loop(listener, shared))
}

struct Shared {
    calls: Sender<ApiCall>,
    wake: EventFd,
    limits: Limits,
    active: AtomicUsize,
    /// Connection threads waiting for a connection, not yet claimed for one.
    idle_threads: AtomicUsize,
}

/// Frees a connection slot however the connection thread ends.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let (handoff, waiting) = channel::<Accepted>();
    let waiting = Arc::new(Mutex::new(waiting));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of fds or memory: back off instead of spinning, and keep serving.
                log::warn!("API socket accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.limits.max_connections {
            let slot = Slot(shared.clone());
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let body = ApiResponse::message(503, "too many API connections; retry later").body();
            let _ = scm::send_all(
                stream.as_raw_fd(),
                &format_response(503, body.as_deref(), None, false),
            );
            drop(slot);
            continue;
        }
        let connection = (stream, Slot(shared.clone()));
        // An idle connection thread takes it if there is one (claimed here, so that it cannot time out
        // in the meantime); else a new thread. Clients such as ch-remote open a connection per request,
        // and starting a thread for each costs about as much as the request itself.
        if claim_idle_thread(&shared) {
            if handoff.send(connection).is_err() {
                log::warn!("API connection threads are gone: connection dropped");
            }
            continue;
        }
        let (shared, waiting) = (shared.clone(), waiting.clone());
        let spawned = thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || connection_thread(connection, &shared, &waiting));
        if let Err(e) = spawned {
            log::warn!("cannot start an API connection thread: {e}");
        }
    }
}

/// An accepted connection and its slot.
type Accepted = (UnixStream, Slot);

/// How long a connection thread waits for another connection before it ends.
const IDLE_THREAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes one idle connection thread for a connection about to be handed over; false if none is idle.
fn claim_idle_thread(shared: &Shared) -> bool {
    shared
        .idle_threads
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Serves connections: the one it was started for, then those handed over while it is idle.
fn connection_thread(first: Accepted, shared: &Shared, waiting: &Mutex<Receiver<Accepted>>) {
    let mut next = first;
    loop {
        let (stream, slot) = next;
        serve_connection(stream, slot);
        shared.idle_threads.fetch_add(1, Ordering::SeqCst);
        let waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
        next = match waiting.recv_timeout(IDLE_THREAD_TIMEOUT) {
            Ok(connection) => connection,
            // Ends unless the accept loop claimed it meanwhile: then a connection is on its way.
            Err(RecvTimeoutError::Timeout) if claim_idle_thread(shared) => return,
            Err(RecvTimeoutError::Timeout) => match waiting.recv() {
                Ok(connection) => connection,
                Err(_) => return,
            },
            Err(RecvTimeoutError::Disconnected) => return,
        };
    }
}

/// Replies the VMM has produced that are not yet written back to their clients.
static REPLIES_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits (at most `timeout`) until every reply the VMM has handed back has been written to its client, so
/// that a VMM exiting after `vmm.shutdown` does not cut off its own 204.
pub fn wait_for_replies(timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while REPLIES_IN_FLIGHT.load(std::sync::atomic::Ordering::Acquire) > 0
        && std::time::Instant::now() < deadline
    {
        thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn serve_connection(stream: UnixStream, slot: Slot) {
    let shared = &slot.0;
    let _ = stream.set_write_timeout(Some(shared.limits.request_timeout));
    let mut conn = Connection::new(stream, shared.limits);
    loop {
        match conn.read_request() {
            Ok(request) => {
                let keep_alive = request.keep_alive;
                let target = request.target.clone();
                REPLIES_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let (response, after_reply) = dispatch(shared, request);
                let allow = (response.status() == 405)
                    .then(|| router::allowed_methods(&target))
                    .flatten();
                let bytes = format_response(
                    response.status(),
                    response.body().as_deref(),
                    allow.as_deref(),
                    keep_alive,
                );
                let sent = scm::send_all(conn.stream().as_raw_fd(), &bytes);
                if let Some(after) = after_reply {
                    after();
                }
                REPLIES_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                if sent.is_err() || !keep_alive {
                    return;
                }
            }
            Err(ReadError::Reply(status, message)) => {
                log::debug!("API request refused with {status}: {message}");
                let body = ApiResponse::message(status, message).body();
                let _ = scm::send_all(
                    conn.stream().as_raw_fd(),
                    &format_response(status, body.as_deref(), None, false),
                );
                return;
            }
            Err(ReadError::Closed) | Err(ReadError::Idle) => return,
            Err(ReadError::Io(e)) => {
                log::debug!("API connection dropped: {e}");
                return;
            }
        }
    }
}

fn dispatch(shared: &Shared, request: Request) -> (ApiResponse, Option<AfterReply>) {
    let api_request =
        match router::route(&request.method, &request.target, &request.body, request.fds) {
            Ok(r) => r,
            Err(response) => return (response, None),
        };
    let endpoint = api_request.endpoint();
    let (reply, answer) = channel();
    let call = ApiCall {
        request: api_request,
        reply: ApiReplier(reply),
    };
    if shared.calls.send(call).is_err() {
        let response = ApiResponse::message(503, "the VMM is no longer accepting requests");
        return (response, None);
    }
    if let Err(e) = shared.wake.write(1) {
        log::warn!("cannot wake the VMM for {endpoint}: {e}");
    }
    answer.recv().unwrap_or_else(|_| {
        let response = ApiResponse::message(500, format!("the VMM dropped the {endpoint} request"));
        (response, None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_socket_specs() {
        assert_eq!(
            parse_api_socket("/run/x.sock").unwrap(),
            ApiSocketSpec::Path("/run/x.sock".into())
        );
        assert_eq!(
            parse_api_socket("x.sock").unwrap(),
            ApiSocketSpec::Path("x.sock".into())
        );
        assert_eq!(
            parse_api_socket("path=/run/x.sock").unwrap(),
            ApiSocketSpec::Path("/run/x.sock".into())
        );
        assert_eq!(parse_api_socket("fd=3").unwrap(), ApiSocketSpec::Fd(3));
        for bad in [
            "",
            "fd=",
            "fd=-1",
            "fd=x",
            "path=",
            "socket=3",
            "path=/a,fd=3",
        ] {
            assert!(parse_api_socket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bind_replaces_stale_sockets_only() {
        let dir = std::env::temp_dir().join(format!("trenv-api-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let spec = ApiSocketSpec::Path(path.clone());
        let live = bind(&spec).unwrap();
        // Someone is listening: refuse.
        assert_eq!(bind(&spec).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live);
        // The file is left behind by a listener that is gone: replace it.
        let again = bind(&spec).unwrap();
        drop(again);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"data").unwrap();
        assert!(bind(&spec).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bind_adopts_an_inherited_fd() {
        let dir = std::env::temp_dir().join(format!("trenv-api-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(listener);
        let adopted = bind(&ApiSocketSpec::Fd(fd)).unwrap();
        assert_eq!(adopted.as_raw_fd(), fd);
        UnixStream::connect(&path).unwrap();
        assert!(adopted.accept().is_ok());
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(bind(&ApiSocketSpec::Fd(file.as_raw_fd())).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
