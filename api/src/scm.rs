//! Sending and receiving bytes with file descriptors attached (SCM_RIGHTS) on a Unix stream socket.

use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The most fds one `recvmsg` accepts; more than that sets MSG_CTRUNC and the request is refused.
pub const MAX_FDS_PER_MESSAGE: usize = 64;

/// What one `recvmsg` brought.
pub struct Received {
    pub bytes: usize,
    /// The kernel had more fds than fit: the request they came with cannot be trusted to be complete.
    pub fds_truncated: bool,
}

fn cmsg_space(fd_count: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fd_count * mem::size_of::<RawFd>()) as u32) as usize }
}

/// Receives into `buf`, appending any fds that came along to `fds` (with close-on-exec set). Blocks
/// subject to the socket's receive timeout; EINTR is retried.
pub fn recv_with_fds(
    socket: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    // u64 elements give the control buffer the alignment cmsghdr needs.
    let mut control = vec![0u64; cmsg_space(MAX_FDS_PER_MESSAGE).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let bytes = loop {
        // SAFETY: msg points at iov and control, which outlive the call and have the lengths given.
        let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: msg was filled by recvmsg; the CMSG macros walk its control buffer within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / mem::size_of::<RawFd>() {
                    // Each fd was installed in our table by the kernel and is owned by nobody else.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sends `data` with `fds` attached to its first byte. Returns how many bytes went out; the caller sends
/// the rest with plain writes. MSG_NOSIGNAL: a peer that went away is an error, not a SIGPIPE.
pub fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_MESSAGE} fds can be sent with one request"),
        ));
    }
    let mut control = vec![0u64; cmsg_space(fds.len().max(1)).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len());
        // SAFETY: the control buffer holds CMSG_SPACE(fds) bytes, enough for one header and the fds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as u32) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(*fd);
            }
        }
    }
    loop {
        // SAFETY: msg points at iov and control, which outlive the call.
        let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes all of `data`, without SIGPIPE, subject to the socket's send timeout.
pub fn send_all(socket: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: data is a valid slice for the length given.
        let n = unsafe { libc::send(socket, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_travel_with_the_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut p1, p2) = UnixStream::pair().unwrap();
        let sent =
            send_with_fds(a.as_raw_fd(), b"hello", &[p2.as_raw_fd(), p2.as_raw_fd()]).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let r = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..r.bytes], b"hello");
        assert!(!r.fds_truncated);
        assert_eq!(fds.len(), 2);
        // The received fd is the other end of p1: writing to it reaches p1.
        let got = UnixStream::from(fds.pop().unwrap());
        send_all(got.as_raw_fd(), b"x").unwrap();
        let mut one = [0u8; 1];
        p1.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        // SAFETY: F_GETFD only reads the fd's flags.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
    }

    #[test]
    fn too_many_fds_are_refused_by_the_sender() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fds = vec![a.as_raw_fd(); MAX_FDS_PER_MESSAGE + 1];
        assert!(send_with_fds(a.as_raw_fd(), b"x", &fds).is_err());
    }
}
