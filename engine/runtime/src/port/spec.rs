//! A port as the operator names it (`hubnat run --port`, `hubnat port add`), and how it is
//! opened.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::port::link::{Link, TapLink};
use crate::port::packet_link::PacketPort;
use crate::port::tap::Tap;
use crate::port::unix::{DgramPort, StreamPort};

/// Where a port is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// `tap:NAME`: a TAP device hubnat creates (or attaches to).
    Tap(String),
    /// `stream:PATH`: a unix stream socket hubnat listens on, for QEMU's `-netdev stream`.
    Stream(PathBuf),
    /// `dgram:PATH[,PEER]`: a unix datagram socket hubnat binds, for QEMU's `-netdev dgram`;
    /// the peer's address is learned from what it sends unless given.
    Dgram(PathBuf, Option<PathBuf>),
    /// `packet:IFACE`: an existing interface, joined by AF_PACKET.
    Packet(String),
    /// `fd:N`: a descriptor inherited from the launcher (a TAP, a connected QEMU socket, an
    /// AF_PACKET socket), its kind found out from the descriptor itself.
    Fd(RawFd),
}

/// Why a port could not be named or opened.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The text is not a port.
    #[error("port {0:?}: {1}")]
    Syntax(String, &'static str),
    /// Opening it failed.
    #[error("port {0}: {1}")]
    Open(String, String),
}

impl FromStr for PortSpec {
    type Err = PortError;

    fn from_str(s: &str) -> Result<PortSpec, PortError> {
        const FORMS: &str =
            "expected tap:NAME, stream:PATH, dgram:PATH[,PEER], packet:IFACE or fd:N";
        let bad = |why| PortError::Syntax(s.to_owned(), why);
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad(FORMS))?;
        if rest.is_empty() {
            return Err(bad(FORMS));
        }
        let iface = |name: &str| {
            if name.len() > 15 || name.contains(['/', ' ', '\0']) {
                Err(bad(
                    "an interface name is 1 to 15 bytes, without '/' or spaces",
                ))
            } else {
                Ok(name.to_owned())
            }
        };
        match kind {
            "tap" => Ok(PortSpec::Tap(iface(rest)?)),
            "stream" => Ok(PortSpec::Stream(PathBuf::from(rest))),
            "dgram" => Ok(match rest.split_once(',') {
                Some((path, peer)) if !path.is_empty() && !peer.is_empty() => {
                    PortSpec::Dgram(path.into(), Some(peer.into()))
                }
                Some(_) => return Err(bad(FORMS)),
                None => PortSpec::Dgram(rest.into(), None),
            }),
            "packet" | "attach" => Ok(PortSpec::Packet(iface(rest)?)),
            "fd" => rest
                .parse::<RawFd>()
                .ok()
                .filter(|&n| n >= 0)
                .map(PortSpec::Fd)
                .ok_or_else(|| bad("a descriptor number")),
            _ => Err(bad(FORMS)),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Tap(n) => write!(f, "tap:{n}"),
            PortSpec::Stream(p) => write!(f, "stream:{}", p.display()),
            PortSpec::Dgram(p, None) => write!(f, "dgram:{}", p.display()),
            PortSpec::Dgram(p, Some(q)) => write!(f, "dgram:{},{}", p.display(), q.display()),
            PortSpec::Packet(i) => write!(f, "packet:{i}"),
            PortSpec::Fd(n) => write!(f, "fd:{n}"),
        }
    }
}

/// What an inherited descriptor turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdKind {
    Tap,
    Stream,
    Dgram,
    Packet,
}

/// Looks at descriptor `fd`: a character device is taken for a TAP, a socket by its family and
/// type.
fn fd_kind(fd: RawFd) -> Result<FdKind, String> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(format!(
            "descriptor {fd} is not open: {}",
            std::io::Error::last_os_error()
        ));
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFCHR => return Ok(FdKind::Tap),
        libc::S_IFSOCK => {}
        _ => return Err(format!("descriptor {fd} is neither a TAP nor a socket")),
    }
    let opt = |name| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes and `len` is `v`'s size.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(format!(
                "descriptor {fd}: {}",
                std::io::Error::last_os_error()
            ))
        } else {
            Ok(v)
        }
    };
    match (opt(libc::SO_DOMAIN)?, opt(libc::SO_TYPE)?) {
        (libc::AF_UNIX, libc::SOCK_STREAM) => Ok(FdKind::Stream),
        (libc::AF_UNIX, libc::SOCK_DGRAM) => Ok(FdKind::Dgram),
        (libc::AF_PACKET, libc::SOCK_RAW) => Ok(FdKind::Packet),
        (d, t) => Err(format!(
            "descriptor {fd} is a socket of family {d} and type {t}; a port takes a unix stream \
             or datagram socket, an AF_PACKET raw socket or a TAP"
        )),
    }
}

impl PortSpec {
    /// Opens the port, for frames of up to `mtu` bytes of payload, in the calling thread's
    /// namespaces. An `fd:` descriptor is taken over (closed with the port).
    pub fn open(&self, mtu: u16) -> Result<Arc<dyn Link>, PortError> {
        let max_frame = usize::from(mtu) + 18;
        let fail = |e: &dyn fmt::Display| PortError::Open(self.to_string(), e.to_string());
        Ok(match self {
            PortSpec::Tap(name) => {
                let tap = Tap::open(name, Some(u32::from(mtu))).map_err(|e| fail(&e))?;
                Arc::new(TapLink::new(Arc::new(tap)))
            }
            PortSpec::Stream(path) => {
                Arc::new(StreamPort::listen(path, max_frame).map_err(|e| fail(&e))?)
            }
            PortSpec::Dgram(path, peer) => {
                Arc::new(DgramPort::bind(path, peer.as_deref(), max_frame).map_err(|e| fail(&e))?)
            }
            PortSpec::Packet(iface) => {
                Arc::new(PacketPort::attach(iface, max_frame).map_err(|e| fail(&e))?)
            }
            PortSpec::Fd(n) => {
                let kind = fd_kind(*n).map_err(|e| fail(&e))?;
                // SAFETY: the operator handed this descriptor to hubnat for this port; nothing
                // else in the process owns it, and fd_kind showed it is open.
                let fd = unsafe { OwnedFd::from_raw_fd(*n) };
                set_cloexec(&fd);
                match kind {
                    FdKind::Tap => {
                        let tap = Tap::from_fd(fd).map_err(|e| fail(&e))?;
                        Arc::new(TapLink::new(Arc::new(tap)))
                    }
                    FdKind::Stream => {
                        Arc::new(StreamPort::from_fd(fd, max_frame).map_err(|e| fail(&e))?)
                    }
                    FdKind::Dgram => {
                        Arc::new(DgramPort::from_fd(fd, max_frame).map_err(|e| fail(&e))?)
                    }
                    FdKind::Packet => {
                        Arc::new(PacketPort::from_fd(fd, max_frame).map_err(|e| fail(&e))?)
                    }
                }
            }
        })
    }
}

/// An inherited descriptor is not passed on to anything hubnat might start.
fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on an open descriptor we own; only its close-on-exec flag changes.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in [
            "tap:hubnat0",
            "stream:/run/hubnat/vm1.sock",
            "dgram:/tmp/h.sock",
            "dgram:/tmp/h.sock,/tmp/q.sock",
            "packet:veth0",
            "fd:5",
        ] {
            let spec: PortSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "attach:br0".parse::<PortSpec>().unwrap(),
            PortSpec::Packet("br0".into())
        );
        for bad in [
            "",
            "tap",
            "tap:",
            "vde:/x",
            "fd:-1",
            "fd:x",
            "tap:a-name-that-is-too-long",
            "dgram:,/x",
            "packet:a/b",
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn descriptors_are_told_apart() {
        use std::os::unix::net::{UnixDatagram, UnixStream};
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(fd_kind(a.as_raw_fd()), Ok(FdKind::Stream));
        let (c, _d) = UnixDatagram::pair().unwrap();
        assert_eq!(fd_kind(c.as_raw_fd()), Ok(FdKind::Dgram));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(fd_kind(f.as_raw_fd()), Ok(FdKind::Tap));
        let t = std::fs::File::open("/proc/self/status").unwrap();
        assert!(fd_kind(t.as_raw_fd()).is_err());
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(fd_kind(u.as_raw_fd()).unwrap_err().contains("family"));
        assert!(fd_kind(9999).is_err());
    }
}
