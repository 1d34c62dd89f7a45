//! On-demand restore: anonymous guest RAM whose missing pages are filled from a region image by a
//! userfaultfd handler thread, through raw syscalls and ioctls (the kernel uapi layout is defined here,
//! so no bindgen/libclang is needed).
//!
//! The handler registers each range for MISSING faults (anonymous private memory only: the kernel
//! refuses MISSING on private file mappings), then loops: pending faults first (UFFDIO_COPY of the page
//! from the image, or UFFDIO_ZEROPAGE when the image page is zero/a hole), otherwise a small batch of the
//! prefetch list, then optionally of every remaining data page ("background fill").
//!
//! Keep the server alive as long as the guest may touch pages it has not populated: once the userfaultfd
//! is closed, unpopulated pages read as zero. After a background fill completes (`stats().complete`),
//! every data page is populated and the remaining holes are zero anyway, so the server may be dropped.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Serialize;

use crate::util;

// ioctl numbers from include/uapi/linux/userfaultfd.h (type 0xAA) with the asm-generic _IOC encoding.
const UFFDIO: u64 = 0xAA;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x04,
    std::mem::size_of::<UffdioZeropage>(),
);
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Bits of `UffdioRegister::ioctls` that must be available on the range: COPY and ZEROPAGE.
const NEEDED_RANGE_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04);
const UFFD_MSG_SIZE: usize = 32;
/// Prefetch/fill pages done between checks for pending faults, so faults never wait long.
const PREFETCH_BATCH: usize = 16;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(#[source] io::Error),
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    #[error("cannot register {len} bytes at {host:#x} for missing faults (must be anonymous private memory)")]
    Register {
        host: usize,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("the kernel cannot UFFDIO_COPY/ZEROPAGE into the range at {0:#x}")]
    MissingIoctls(usize),
    #[error("range at {host:#x} ({len} bytes) is not page aligned")]
    Unaligned { host: usize, len: usize },
    #[error("cannot start the fault handler thread")]
    Thread(#[source] io::Error),
    #[error("cannot create the stop eventfd")]
    EventFd(#[source] io::Error),
}

/// One range to serve: `len` bytes at `host` come from `file` at `file_offset`. `guest_addr` is the key
/// under which prefetch entries name pages of this range.
#[derive(Debug, Clone)]
pub struct OnDemandSource {
    pub file: Arc<File>,
    pub host: *mut u8,
    pub len: usize,
    pub file_offset: u64,
    pub guest_addr: u64,
}

/// Options for `OnDemandServer::start_sources`.
#[derive(Debug, Clone)]
pub struct OnDemandOptions {
    /// Pages (keys in the `guest_addr` space of the sources) to populate first.
    pub prefetch: Option<Vec<u64>>,
    /// After the prefetch, populate every remaining data page of the images in the background.
    pub background_fill: bool,
    /// A fault populates up to this many pages from the faulting one onwards (stopping at the range's end
    /// or at a page already present): a fault round trip costs ~45 us here, so sequential access gains
    /// almost this factor. 1 = exactly the faulting page.
    pub fault_around_pages: usize,
}

/// Default `fault_around_pages`: 64 KiB, like the kernel's own fault-around for file mappings.
pub const DEFAULT_FAULT_AROUND_PAGES: usize = 16;

impl Default for OnDemandOptions {
    fn default() -> Self {
        OnDemandOptions {
            prefetch: None,
            background_fill: false,
            fault_around_pages: DEFAULT_FAULT_AROUND_PAGES,
        }
    }
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OnDemandStats {
    /// Faults resolved (UFFDIO_COPY or UFFDIO_ZEROPAGE on behalf of a faulting thread).
    pub faults_served: u64,
    /// Of those, faults resolved with a zero page.
    pub zero_faults: u64,
    pub pages_prefetched: u64,
    pub pages_filled: u64,
    /// Every data page is populated (background fill finished).
    pub complete: bool,
}

#[derive(Default)]
struct Counters {
    faults_served: AtomicU64,
    zero_faults: AtomicU64,
    pages_prefetched: AtomicU64,
    pages_filled: AtomicU64,
    complete: AtomicBool,
}

/// A userfaultfd handler thread serving guest RAM from region images. Stops and joins on drop.
pub struct OnDemandServer {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for OnDemandServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemandServer")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A range as the handler thread sees it (addresses as integers so the state is Send).
struct Range {
    file: Arc<File>,
    host: usize,
    len: usize,
    file_offset: u64,
    key: u64,
}

fn create_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: plain syscall with flags; returns a new fd or -1. Deliberately without
    // UFFD_USER_MODE_ONLY: KVM's own accesses to guest memory must fault into the handler too.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: a fresh fd we now own.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let syscall_err = io::Error::last_os_error();
    // Where the syscall is restricted (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE), the device
    // node hands out userfaultfds to whoever may open it.
    let dev = match std::fs::File::open("/dev/userfaultfd") {
        Ok(d) => d,
        Err(_) => return Err(UffdError::Create(syscall_err)),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::Create(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl<T>(fd: i32, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the matching repr(C) struct `T`.
    let rc = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl OnDemandServer {
    /// Serves `regions` (host address, length, offset in `file`) from one image file. Prefetch entries are
    /// byte offsets in `file`.
    pub fn start(
        file: File,
        regions: Vec<(*mut u8, usize, u64)>,
        prefetch: Option<Vec<u64>>,
    ) -> Result<Self, UffdError> {
        let file = Arc::new(file);
        let sources = regions
            .into_iter()
            .map(|(host, len, file_offset)| OnDemandSource {
                file: Arc::clone(&file),
                host,
                len,
                file_offset,
                guest_addr: file_offset,
            })
            .collect();
        Self::start_sources(
            sources,
            OnDemandOptions {
                prefetch,
                ..Default::default()
            },
        )
    }

    /// Serves ranges backed by possibly different files (one image per guest RAM region); prefetch
    /// entries are guest physical addresses.
    pub fn start_sources(
        sources: Vec<OnDemandSource>,
        options: OnDemandOptions,
    ) -> Result<Self, UffdError> {
        let page = util::host_page_size();
        let uffd = create_uffd()?;
        let fd = uffd.as_raw_fd();
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        ioctl(fd, UFFDIO_API, &mut api).map_err(UffdError::Api)?;

        let mut ranges = Vec::with_capacity(sources.len());
        for s in sources {
            let host = s.host as usize;
            if s.len == 0 || !host.is_multiple_of(page) || s.len % page != 0 {
                return Err(UffdError::Unaligned { host, len: s.len });
            }
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host as u64,
                    len: s.len as u64,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            ioctl(fd, UFFDIO_REGISTER, &mut reg).map_err(|source| UffdError::Register {
                host,
                len: s.len,
                source,
            })?;
            if reg.ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
                return Err(UffdError::MissingIoctls(host));
            }
            ranges.push(Range {
                file: s.file,
                host,
                len: s.len,
                file_offset: s.file_offset,
                key: s.guest_addr,
            });
        }

        // SAFETY: plain syscall; returns a new fd or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(UffdError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we now own.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_fd = stop.try_clone().map_err(UffdError::EventFd)?;
        let counters = Arc::new(Counters::default());
        let mut handler = Handler {
            uffd,
            stop: stop_fd,
            ranges,
            page,
            window: options.fault_around_pages.clamp(1, 512),
            buf: PageBuf::new(page * options.fault_around_pages.clamp(1, 512))
                .map_err(UffdError::Thread)?,
            counters: Arc::clone(&counters),
        };
        let thread = std::thread::Builder::new()
            .name("trenv-uffd".into())
            .spawn(move || handler.run(options))
            .map_err(UffdError::Thread)?;
        Ok(OnDemandServer {
            stop,
            thread: Some(thread),
            counters,
        })
    }

    pub fn stats(&self) -> OnDemandStats {
        let c = &self.counters;
        OnDemandStats {
            faults_served: c.faults_served.load(Ordering::Relaxed),
            zero_faults: c.zero_faults.load(Ordering::Relaxed),
            pages_prefetched: c.pages_prefetched.load(Ordering::Relaxed),
            pages_filled: c.pages_filled.load(Ordering::Relaxed),
            complete: c.complete.load(Ordering::Acquire),
        }
    }
}

impl Drop for OnDemandServer {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), &one as *const u64 as *const _, 8) };
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("userfaultfd handler thread panicked");
            }
        }
    }
}

/// A page-aligned bounce buffer (UFFDIO_COPY's source), owned by the handler thread.
struct PageBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is a private anonymous mapping used only by the thread that owns the PageBuf.
unsafe impl Send for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: fresh anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(PageBuf {
            ptr: ptr as *mut u8,
            len,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is ours, `len` bytes, and this borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer borrowed.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

enum Populated {
    Copied,
    Zero,
    /// Already present (another fault, prefetch, or the guest itself raced us).
    Exists,
}

struct Handler {
    uffd: OwnedFd,
    stop: OwnedFd,
    ranges: Vec<Range>,
    page: usize,
    /// Pages populated per fault (fault-around).
    window: usize,
    buf: PageBuf,
    counters: Arc<Counters>,
}

impl Handler {
    fn run(&mut self, options: OnDemandOptions) {
        let fill = options.background_fill;
        let mut background = self.background_work(options);
        let mut next = 0usize;
        let mut drained = false;
        let mut msgs = [0u8; UFFD_MSG_SIZE * 16];
        loop {
            let idle = next >= background.len();
            if idle && !drained {
                drained = true;
                background = Vec::new();
                next = 0;
                if fill {
                    self.counters.complete.store(true, Ordering::Release);
                }
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = if idle { -1 } else { 0 };
            // SAFETY: polls two fds we own, described by a local array.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("userfaultfd poll failed, handler stops: {err}");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                if !self.serve_faults(&mut msgs) {
                    return;
                }
                continue;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                log::error!("userfaultfd reported an error, handler stops");
                return;
            }
            let end = (next + PREFETCH_BATCH).min(background.len());
            for &(host, prefetch) in &background[next..end] {
                match self.populate(host, 1) {
                    Ok(Populated::Copied) | Ok(Populated::Zero) => {
                        let counter = if prefetch {
                            &self.counters.pages_prefetched
                        } else {
                            &self.counters.pages_filled
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Populated::Exists) => {}
                    Err(e) => {
                        // The memory went away (VM torn down) or the image is unreadable: the
                        // prefetch is only an optimisation, faults still get served or reported.
                        log::warn!("on-demand prefetch stopped at {host:#x}: {e}");
                        next = background.len();
                        break;
                    }
                }
            }
            next = next.max(end);
        }
    }

    /// Host page addresses to populate without a fault: the prefetch list first (flag true), then, for a
    /// background fill, every data page of every range.
    fn background_work(&self, options: OnDemandOptions) -> Vec<(usize, bool)> {
        let mut work = Vec::new();
        for key in options.prefetch.unwrap_or_default() {
            let found = self
                .ranges
                .iter()
                .find(|r| key >= r.key && key - r.key < r.len as u64);
            if let Some(r) = found {
                let off = (key - r.key) as usize / self.page * self.page;
                work.push((r.host + off, true));
            }
        }
        if options.background_fill {
            for r in &self.ranges {
                let Ok(segments) = data_segments_at(&r.file, r.file_offset, r.len as u64) else {
                    continue;
                };
                for (start, end) in segments {
                    let mut off = start as usize / self.page * self.page;
                    while off < end as usize {
                        work.push((r.host + off, false));
                        off += self.page;
                    }
                }
            }
        }
        work
    }

    /// Reads and resolves every queued message. Returns false when the handler must stop.
    fn serve_faults(&mut self, msgs: &mut [u8]) -> bool {
        loop {
            // SAFETY: reads into our local buffer, at most its length.
            let n = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msgs.as_mut_ptr() as *mut libc::c_void,
                    msgs.len(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => true,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        log::error!("reading userfaultfd failed, handler stops: {err}");
                        false
                    }
                };
            }
            if n == 0 {
                return false;
            }
            let count = n as usize / UFFD_MSG_SIZE;
            for i in 0..count {
                let msg = &msgs[i * UFFD_MSG_SIZE..(i + 1) * UFFD_MSG_SIZE];
                if msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap_or_default()) as usize;
                let page = addr / self.page * self.page;
                match self.populate(page, self.window) {
                    Ok(kind) => {
                        self.counters.faults_served.fetch_add(1, Ordering::Relaxed);
                        if matches!(kind, Populated::Zero) {
                            self.counters.zero_faults.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        log::error!("cannot serve the fault at {addr:#x}: {e}");
                        if e.raw_os_error() == Some(libc::ESRCH) {
                            return false; // the faulting process is gone
                        }
                    }
                }
            }
        }
    }

    /// Fills up to `pages` pages from host address `page` onwards (within its range) from the image, or
    /// with zero pages when they are all zero, waking any faulting thread. The first page is always
    /// resolved; the others only up to the first page already present.
    fn populate(&mut self, page: usize, pages: usize) -> io::Result<Populated> {
        let Some(range) = self
            .ranges
            .iter()
            .find(|r| page >= r.host && page < r.host + r.len)
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "address outside the served ranges",
            ));
        };
        let len = (pages * self.page).min(range.host + range.len - page);
        let offset = range.file_offset + (page - range.host) as u64;
        let buf = &mut self.buf.as_mut_slice()[..len];
        range.file.read_exact_at(buf, offset)?;
        let zero = util::is_zero(buf);
        let fd = self.uffd.as_raw_fd();
        for _ in 0..64 {
            // Bytes populated (from `page` on) when the ioctl fails part-way.
            let (result, done) = if zero {
                let mut z = UffdioZeropage {
                    range: UffdioRange {
                        start: page as u64,
                        len: len as u64,
                    },
                    ..Default::default()
                };
                let r = ioctl(fd, UFFDIO_ZEROPAGE, &mut z);
                (r, z.zeropage)
            } else {
                let mut c = UffdioCopy {
                    dst: page as u64,
                    src: self.buf.ptr as u64,
                    len: len as u64,
                    ..Default::default()
                };
                let r = ioctl(fd, UFFDIO_COPY, &mut c);
                (r, c.copy)
            };
            let kind = if zero {
                Populated::Zero
            } else {
                Populated::Copied
            };
            match result {
                Ok(()) => return Ok(kind),
                // A partial fill (it stopped at a page already present) covered `page` and woke it.
                Err(_) if done >= self.page as i64 => return Ok(kind),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A failed fill does not wake waiters; someone may be blocked on this page.
                    let mut range = UffdioRange {
                        start: page as u64,
                        len: self.page as u64,
                    };
                    ioctl(fd, UFFDIO_WAKE, &mut range)?;
                    return Ok(Populated::Exists);
                }
                // The address space changed under us (e.g. mremap/fork): retry.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }
}

/// Data segments of `[offset, offset + len)` of `file`, relative to `offset`.
fn data_segments_at(file: &File, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    Ok(util::data_segments(file, offset + len)?
        .into_iter()
        .filter(|&(_, e)| e > offset)
        .map(|(s, e)| (s.max(offset) - offset, e - offset))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{anon_region, scratch_dir};
    use std::time::{Duration, Instant};

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    const LEN: usize = 2 << 20;

    fn image() -> (File, Vec<u8>) {
        let dir = scratch_dir("uffd");
        let path = dir.join("mem-0.img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(LEN as u64).unwrap();
        let mut expect = vec![0u8; LEN];
        for page in (0..LEN / 4096).step_by(2) {
            let bytes = format!("image page {page}");
            file.write_all_at(bytes.as_bytes(), (page * 4096) as u64)
                .unwrap();
            expect[page * 4096..page * 4096 + bytes.len()].copy_from_slice(bytes.as_bytes());
        }
        (file, expect)
    }

    fn wait_for(server: &OnDemandServer, done: impl Fn(&OnDemandStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&server.stats()) {
            assert!(Instant::now() < deadline, "timed out: {:?}", server.stats());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn serve(file: File, mem: &crate::test_util::AnonRegion, window: usize) -> OnDemandServer {
        OnDemandServer::start_sources(
            vec![OnDemandSource {
                file: Arc::new(file),
                host: mem.ptr,
                len: mem.len,
                file_offset: 0,
                guest_addr: 0,
            }],
            OnDemandOptions {
                fault_around_pages: window,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn faults_are_served_from_the_image() {
        let (file, expect) = image();
        let mem = anon_region(LEN);
        let server = serve(file, &mem, 1);
        let addr = mem.ptr as usize;
        // Touch from a thread other than the handler (and from this one, below).
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined before `mem` drops).
            let s = unsafe { std::slice::from_raw_parts(addr as *const u8, LEN) };
            s[..LEN / 2].to_vec()
        });
        let first = reader.join().unwrap();
        assert_eq!(&first[..], &expect[..LEN / 2]);
        // SAFETY: as above.
        let s = unsafe { std::slice::from_raw_parts(mem.ptr, LEN) };
        assert_eq!(s, &expect[..]);
        // The counters are bumped just after the faulting thread is woken.
        wait_for(&server, |s| s.faults_served == (LEN / 4096) as u64);
        let stats = server.stats();
        // Every odd page is a hole in the image: served as a zero page.
        assert_eq!(stats.zero_faults, (LEN / 4096 / 2) as u64);
        // Writes after population are ordinary private memory.
        mem.write(4096, b"private");
        // SAFETY: as above.
        assert_eq!(unsafe { *mem.ptr.add(4096) }, b'p');
        drop(server);
    }

    #[test]
    fn fault_around_populates_following_pages() {
        let (file, expect) = image();
        let mem = anon_region(LEN);
        // Page 5 first, so a later window starting at page 0 stops early at it (partial fill).
        mem.write(5 * 4096, b"guest");
        let server = serve(file, &mem, DEFAULT_FAULT_AROUND_PAGES);
        // SAFETY: the mapping lives until the end of the test.
        let s = unsafe { std::slice::from_raw_parts(mem.ptr, LEN) };
        let mut want = expect.clone();
        want[5 * 4096..5 * 4096 + 5].copy_from_slice(b"guest");
        want[5 * 4096 + 5..6 * 4096].fill(0);
        // Page 5 was written before registration: it keeps the guest's bytes, never the image's.
        assert_eq!(&s[..5 * 4096], &want[..5 * 4096]);
        assert_eq!(&s[5 * 4096..6 * 4096], &want[5 * 4096..6 * 4096]);
        assert_eq!(&s[6 * 4096..], &want[6 * 4096..]);
        wait_for(&server, |st| st.faults_served > 0);
        let pages = (LEN / 4096) as u64;
        // Page 0 (window stops at 5), page 6 (window of 16), then one fault per 16 pages.
        let expected = 2 + (pages - 6 - 16).div_ceil(16);
        wait_for(&server, |st| st.faults_served >= expected);
        assert_eq!(server.stats().faults_served, expected);
    }

    #[test]
    fn prefetch_and_background_fill() {
        let (file, expect) = image();
        let file = Arc::new(file);
        let mem = anon_region(LEN);
        let source = OnDemandSource {
            file,
            host: mem.ptr,
            len: LEN,
            file_offset: 0,
            guest_addr: 0x4000_0000,
        };
        let prefetch = vec![0x4000_0000, 0x4000_2000, 0x4000_2010, 0x5000_0000];
        let server = OnDemandServer::start_sources(
            vec![source],
            OnDemandOptions {
                prefetch: Some(prefetch),
                background_fill: true,
                fault_around_pages: 1,
            },
        )
        .unwrap();
        wait_for(&server, |s| s.complete);
        let stats = server.stats();
        // Two distinct in-range pages (one listed twice), one out-of-range entry ignored.
        assert_eq!(stats.pages_prefetched, 2);
        // The fill covers the remaining data pages (every even page) except the prefetched ones.
        assert_eq!(stats.pages_filled, (LEN / 4096 / 2) as u64 - 2);
        // SAFETY: the mapping is alive until `mem` drops at the end.
        let s = unsafe { std::slice::from_raw_parts(mem.ptr, LEN) };
        assert_eq!(s, &expect[..]);
        // Only hole pages faulted.
        wait_for(&server, |s| s.faults_served >= (LEN / 4096 / 2) as u64);
        assert_eq!(server.stats().faults_served, (LEN / 4096 / 2) as u64);
    }

    #[test]
    fn file_mappings_are_refused() {
        let (file, _) = image();
        // SAFETY: fresh mapping, unmapped below.
        let p = unsafe { crate::image::map_cow(&file, LEN, None) }.unwrap();
        let err = OnDemandServer::start(file, vec![(p, LEN, 0)], None).unwrap_err();
        assert!(matches!(err, UffdError::Register { .. }), "{err}");
        // SAFETY: created above.
        unsafe { libc::munmap(p as *mut libc::c_void, LEN) };
    }
}
