//! A tap device (/dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): opened by name (the kernel creates
//! the interface if it does not exist, as Cloud Hypervisor relies on) or taken over from a file
//! descriptor passed in by the API client. Non-blocking; frames are read and written whole.

use std::io::IoSlice;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// struct virtio_net_hdr_v1 without mergeable buffers' field being optional: always 12 bytes with
/// VIRTIO_F_VERSION_1 (§5.1.6).
pub const VNET_HDR_LEN: usize = 12;
pub const IFNAMSIZ: usize = 16;

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name '{0}' (1-15 bytes, no '/', whitespace or NUL)")]
    Name(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach tap {name}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the file descriptor is not a tap device")]
    NotTap(#[source] std::io::Error),
    #[error("the file descriptor is a tun (layer 3) device, not a tap")]
    NotLayer2,
    #[error("cannot configure tap {name}: {what}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// struct ifreq: the name, then a 24-byte union (flags, or a sockaddr).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// The union as a struct sockaddr_in.
    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

/// # Safety
/// `req` must be the argument type `request` expects.
unsafe fn ioctl<T>(fd: RawFd, request: libc::c_ulong, req: *mut T) -> std::io::Result<()> {
    if libc::ioctl(fd, request as _, req) < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Frames carry a virtio_net_hdr (always, for taps this module opens).
    vnet_hdr: bool,
}

impl Tap {
    /// Opens (creating if needed) tap `name` with a 12-byte vnet header and no offloads.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let path = c"/dev/net/tun";
        // SAFETY: a valid NUL-terminated path; the result is checked.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(name);
        req.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF takes a struct ifreq.
        unsafe { ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) }.map_err(|source| {
            TapError::SetIff {
                name: name.to_string(),
                source,
            }
        })?;
        let tap = Tap {
            fd,
            name: req.name(),
            vnet_hdr: true,
        };
        tap.configure_vnet()?;
        Ok(tap)
    }

    /// Takes over a tap fd opened by someone else (API `add-net` fds). It must be a tap (layer 2); a vnet
    /// header is used if the fd was opened with IFF_VNET_HDR.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let mut req = IfReq::new("");
        // SAFETY: TUNGETIFF fills a struct ifreq.
        unsafe { ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) }.map_err(TapError::NotTap)?;
        let flags = req.flags();
        if flags & IFF_TAP == 0 {
            return Err(TapError::NotLayer2);
        }
        let tap = Tap {
            fd,
            name: req.name(),
            vnet_hdr: flags & IFF_VNET_HDR != 0,
        };
        // SAFETY: plain fcntl on an fd we own.
        let ok = unsafe {
            let fl = libc::fcntl(tap.fd.as_raw_fd(), libc::F_GETFL);
            fl >= 0 && libc::fcntl(tap.fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
        };
        if !ok {
            return Err(tap.configure_error("O_NONBLOCK"));
        }
        if tap.vnet_hdr {
            tap.configure_vnet()?;
        }
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: std::io::Error::last_os_error(),
        }
    }

    /// 12-byte headers (VERSION_1 layout) and no offloads: the guest negotiates none, so the kernel must
    /// hand over complete, checksummed frames.
    fn configure_vnet(&self) -> Result<(), TapError> {
        let mut size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes an int.
        unsafe { ioctl(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut size) }
            .map_err(|_| self.configure_error("TUNSETVNETHDRSZ"))?;
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
            return Err(self.configure_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Brings the interface up and, if given, sets its IPv4 address and netmask (`--net ip=..,mask=..`).
    pub fn configure_host(
        &self,
        ip: Option<Ipv4Addr>,
        mask: Option<Ipv4Addr>,
    ) -> Result<(), TapError> {
        // SAFETY: a plain socket for interface ioctls; closed by OwnedFd.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(self.configure_error("socket"));
        }
        // SAFETY: just created, owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = sock.as_raw_fd();
        if let Some(ip) = ip {
            let mut req = IfReq::new(&self.name);
            req.set_ipv4(ip);
            // SAFETY: SIOCSIFADDR takes a struct ifreq holding a sockaddr_in.
            unsafe { ioctl(s, libc::SIOCSIFADDR, &mut req) }
                .map_err(|_| self.configure_error("SIOCSIFADDR"))?;
        }
        if let Some(mask) = mask {
            let mut req = IfReq::new(&self.name);
            req.set_ipv4(mask);
            // SAFETY: as above.
            unsafe { ioctl(s, libc::SIOCSIFNETMASK, &mut req) }
                .map_err(|_| self.configure_error("SIOCSIFNETMASK"))?;
        }
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS take a struct ifreq.
        unsafe { ioctl(s, libc::SIOCGIFFLAGS, &mut req) }
            .map_err(|_| self.configure_error("SIOCGIFFLAGS"))?;
        req.set_flags(req.flags() | libc::IFF_UP as i16);
        // SAFETY: as above.
        unsafe { ioctl(s, libc::SIOCSIFFLAGS, &mut req) }
            .map_err(|_| self.configure_error("SIOCSIFFLAGS"))?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            fd: self.fd.try_clone()?,
            name: self.name.clone(),
            vnet_hdr: self.vnet_hdr,
        })
    }

    /// Reads one frame (with its vnet header if the tap has them).
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame given as pieces (the first being the vnet header if the tap has them).
    pub fn write_vectored(&self, parts: &[IoSlice<'_>]) -> std::io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with struct iovec; the slices outlive the call.
        let n = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                parts.as_ptr().cast(),
                parts.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
impl Tap {
    /// A stand-in over one end of a datagram socket pair (frame boundaries kept), for unit tests.
    pub(crate) fn from_socket(fd: OwnedFd, vnet_hdr: bool) -> Tap {
        Tap {
            fd,
            name: "test".into(),
            vnet_hdr,
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "with space", "sixteen-bytes-xx", "a:b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad}");
        }
    }

    #[test]
    fn non_tap_fds_are_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(file)),
            Err(TapError::NotTap(_))
        ));
    }

    #[test]
    fn opens_a_tap_and_takes_over_its_fd() {
        let name = format!("trtu{}", std::process::id() % 100_000);
        // Needs root (CAP_NET_ADMIN) and /dev/net/tun, as CI has: fails rather than skips without them.
        let tap =
            Tap::open(&name).unwrap_or_else(|e| panic!("cannot create a tap ({e}): run as root"));
        assert_eq!(tap.name(), name);
        assert!(tap.has_vnet_hdr());
        tap.configure_host(None, None).unwrap();
        // Nothing to read yet: non-blocking.
        let mut buf = [0u8; 2048];
        let err = tap.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        let dup = Tap::from_fd(tap.fd.try_clone().unwrap()).unwrap();
        assert_eq!(dup.name(), name);
        assert!(dup.has_vnet_hdr());
    }
}
