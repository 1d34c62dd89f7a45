//! The VMM's seccomp filter (`--seccomp true|false|log`, as Cloud Hypervisor spells it).
//!
//! One allow-list for the whole process, installed on every thread (TSYNC) before the VMM creates a VM or
//! serves its API, and inherited by every thread started later (vCPUs, device workers, API connections).
//! It names what a VMM does at run time (KVM, guest memory, files, Unix sockets, threads, eventfds,
//! userfaultfd) and leaves out what it never needs once started: exec, fork, ptrace, mount, namespaces,
//! module and key management, credentials, raw and inet stream sockets. `ioctl` is limited to the
//! request types the VMM uses. A blocked call raises SIGSYS; the handler names the syscall and ends the
//! process, because a VMM that reaches one has been subverted or has a bug, and either way must stop.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// Blocked syscalls end the process (`true`, the default).
    Enforce,
    /// Blocked syscalls are allowed and logged by the kernel (`log`, for finding what a setup needs).
    Log,
    /// No filter (`false`).
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("--seccomp takes true, false or log, not '{0}'")]
    BadMode(String),
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

pub fn parse_mode(raw: &str) -> Result<SeccompMode, SeccompError> {
    match raw {
        "true" | "on" => Ok(SeccompMode::Enforce),
        "log" => Ok(SeccompMode::Log),
        "false" | "off" => Ok(SeccompMode::Off),
        other => Err(SeccompError::BadMode(other.to_string())),
    }
}

/// Syscalls allowed with any arguments.
const ALLOWED: &[libc::c_long] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    // Threads, signals, time.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_prlimit64,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // Files (images, disks, templates, logs, sockets' paths).
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_close,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fadvise64,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    // Event loops.
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Unix sockets (API, vsock, consoles); socket() itself is checked below.
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
];

/// `ioctl` request types (bits 8..16 of the request) the VMM issues: KVM, userfaultfd, 'T' (terminals,
/// tun/tap, FIONBIO/FIOCLEX), block devices (size, discard) and the socket ioctls that configure a tap.
const IOCTL_TYPES: &[u64] = &[0xAE, 0xAA, 0x54, 0x12, 0x89];

fn build(mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let condition = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(err)
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let mut ioctl = Vec::new();
    for &kind in IOCTL_TYPES {
        ioctl.push(
            SeccompRule::new(vec![condition(
                1,
                SeccompCmpOp::MaskedEq(0xff00),
                kind << 8,
            )?])
            .map_err(err)?,
        );
    }
    rules.insert(libc::SYS_ioctl, ioctl);
    // Threads name themselves (std's Builder::name); nothing else of prctl is needed after start.
    let prctl = [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .into_iter()
        .map(|option| {
            SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, option as u64)?]).map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_prctl, prctl);
    // The memory reaper lowers its own priority; setting any other value (raising one) stays refused.
    let setpriority = vec![SeccompRule::new(vec![
        condition(0, SeccompCmpOp::Eq, libc::PRIO_PROCESS as u64)?,
        condition(
            2,
            SeccompCmpOp::Eq,
            memory_template::detach::REAPER_NICE as u64,
        )?,
    ])
    .map_err(err)?];
    rules.insert(libc::SYS_setpriority, setpriority);
    // An inet stream socket would let a subverted VMM reach the network: AF_INET passes only as a datagram
    // socket (the type's low bits; SOCK_CLOEXEC/SOCK_NONBLOCK may be or-ed in).
    let socket = vec![
        SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])
            .map_err(err)?,
        SeccompRule::new(vec![
            condition(0, SeccompCmpOp::Eq, libc::AF_INET as u64)?,
            condition(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_DGRAM as u64)?,
        ])
        .map_err(err)?,
    ];
    rules.insert(libc::SYS_socket, socket);
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        rules,
        mismatch,
        SeccompAction::Allow,
        std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))?,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// Writes `text` to stderr with nothing but write(2), which is all a signal handler may use.
fn write_stderr(text: &[u8]) {
    // SAFETY: writes bytes we own to fd 2; a failed write has nowhere to be reported.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SIGSYS from seccomp carries the syscall number in si_syscall (offset 24 of siginfo on x86_64: after
    // si_signo, si_errno, si_code and padding, si_call_addr occupies 8 bytes, then si_syscall).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let number = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut digits = [0u8; 10];
    let mut n = number.unsigned_abs();
    let mut first = digits.len();
    loop {
        first -= 1;
        digits[first] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || first == 0 {
            break;
        }
    }
    write_stderr(b"trenv: seccomp blocked syscall ");
    write_stderr(&digits[first..]);
    write_stderr(b"; stopping (run with --seccomp log to investigate)\n");
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(159) };
}

/// Installs the filter on every thread of the process (and so on every thread started later).
pub fn install(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install_program(&build(mode)?)
}

fn install_program(program: &BpfProgram) -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only uses async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    seccompiler::apply_filter_all_threads(program).map_err(|e| SeccompError::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_cloud_hypervisor_spells_them() {
        assert_eq!(parse_mode("true").unwrap(), SeccompMode::Enforce);
        assert_eq!(parse_mode("false").unwrap(), SeccompMode::Off);
        assert_eq!(parse_mode("log").unwrap(), SeccompMode::Log);
        assert!(parse_mode("yes please").is_err());
    }

    #[test]
    fn the_filter_compiles_for_both_modes() {
        assert!(!build(SeccompMode::Enforce).unwrap().is_empty());
        assert!(!build(SeccompMode::Log).unwrap().is_empty());
    }

    /// In a child process (the filter cannot be removed): allowed calls work, execve and an inet stream
    /// socket end the process with the handler's status.
    #[test]
    fn the_installed_filter_blocks_exec_and_inet_streams_and_allows_the_rest() {
        // Built before forking: the child of a multi-threaded test process must not allocate.
        let program = build(SeccompMode::Enforce).unwrap();
        for (case, expect_blocked) in [
            ("allowed", false),
            ("udp", false),
            ("exec", true),
            ("tcp", true),
        ] {
            // SAFETY: the child installs the prebuilt filter and makes raw syscalls only, then _exits.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let code = match install_program(&program) {
                    Err(_) => 3,
                    Ok(()) => unsafe {
                        match case {
                            "allowed" => {
                                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                                let efd = libc::eventfd(0, 0);
                                if fd >= 0 && efd >= 0 && libc::getpid() > 0 {
                                    0
                                } else {
                                    4
                                }
                            }
                            "udp" => {
                                if libc::socket(
                                    libc::AF_INET,
                                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                                    0,
                                ) >= 0
                                {
                                    0
                                } else {
                                    7
                                }
                            }
                            "exec" => {
                                let path = c"/bin/true";
                                let argv = [path.as_ptr(), std::ptr::null()];
                                libc::execv(path.as_ptr(), argv.as_ptr());
                                5
                            }
                            _ => {
                                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                                6
                            }
                        }
                    },
                };
                unsafe { libc::_exit(code) };
            }
            let mut status = 0;
            // SAFETY: waits for the child we forked.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "{case}: {status:#x}");
            let code = libc::WEXITSTATUS(status);
            if expect_blocked {
                assert_eq!(code, 159, "{case} must be blocked");
            } else {
                assert_eq!(code, 0, "{case} must be allowed");
            }
        }
    }
}
