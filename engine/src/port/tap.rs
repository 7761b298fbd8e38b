//! The TAP port: a Linux TAP device whose far side is the guests' segment.
//!
//! hubnat creates (or attaches to) the device, optionally inside another network namespace (as
//! slirp4netns does), and reads and writes whole Ethernet frames on it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device name `{0}` is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot create or attach TAP device `{name}`: {source}")]
    Attach { name: String, source: io::Error },
    #[error("cannot bring TAP device `{name}` up: {source}")]
    Up { name: String, source: io::Error },
    #[error("cannot set the MTU of TAP device `{name}` to {mtu}: {source}")]
    Mtu {
        name: String,
        mtu: u32,
        source: io::Error,
    },
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
}

/// `ifreq` as the TUN/TAP and interface ioctls take it: a name and a union we use as flags or MTU.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    _pad: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: IfReqData { _pad: [0; 24] },
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open TAP device, non-blocking.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates the TAP device `name` in the current network namespace, or attaches to it if it
    /// exists, and brings it up. `mtu` sets the device MTU when given.
    pub fn open(name: &str, mtu: Option<u32>) -> Result<Tap, TapError> {
        Ok(Tap::open_queues(name, mtu, 1)?.remove(0))
    }

    /// Like `open`, with `queues` queues: more than one makes a multiqueue device
    /// (IFF_MULTI_QUEUE), one fd per queue, among which the kernel steers flows.
    pub fn open_queues(name: &str, mtu: Option<u32>, queues: usize) -> Result<Vec<Tap>, TapError> {
        let mut taps = Vec::with_capacity(queues.max(1));
        for _ in 0..queues.max(1) {
            taps.push(Tap::attach(name, queues > 1)?);
        }
        if let Some(mtu) = mtu {
            taps[0].set_mtu(mtu)?;
        }
        taps[0].bring_up()?;
        Ok(taps)
    }

    fn attach(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(TapError::BadName(name.to_owned()));
        }
        let path = CString::new("/dev/net/tun").expect("no NUL");
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked below.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        req.data.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out; `req` outlives the call.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) })
            .map_err(|source| TapError::Attach {
                name: name.to_owned(),
                source,
            })?;
        Ok(Tap {
            fd,
            name: name.to_owned(),
        })
    }

    /// Like `open`, but creates the device inside the network namespace at `netns` (a path such
    /// as /proc/PID/ns/net or /run/netns/NAME). The calling thread returns to its own namespace;
    /// the device's fd stays bound to the one it was created in.
    pub fn open_in_netns(name: &str, mtu: Option<u32>, netns: &Path) -> Result<Tap, TapError> {
        Ok(Tap::open_queues_in_netns(name, mtu, 1, netns)?.remove(0))
    }

    /// `open_queues` inside the network namespace at `netns` (see `open_in_netns`).
    pub fn open_queues_in_netns(
        name: &str,
        mtu: Option<u32>,
        queues: usize,
        netns: &Path,
    ) -> Result<Vec<Tap>, TapError> {
        let target = File::open(netns).map_err(|source| TapError::OpenNetns {
            path: netns.to_owned(),
            source,
        })?;
        let own_path = Path::new("/proc/thread-self/ns/net");
        let own = File::open(own_path).map_err(|source| TapError::OpenNetns {
            path: own_path.to_owned(),
            source,
        })?;
        setns(target.as_fd()).map_err(|source| TapError::EnterNetns {
            path: netns.to_owned(),
            source,
        })?;
        let result = Tap::open_queues(name, mtu, queues);
        if let Err(source) = setns(own.as_fd()) {
            // Staying in the guest's namespace would send host traffic into it: refuse to go on.
            return Err(TapError::EnterNetns {
                path: own_path.to_owned(),
                source,
            });
        }
        result
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ifreq_ioctl(&self, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
        // SAFETY: an AF_INET datagram socket is only used as a handle for interface ioctls.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` was just created and is owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: the SIOC*IF* requests used here take an `ifreq`, laid out by `IfReq`.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut IfReq) })
    }

    fn bring_up(&self) -> Result<(), TapError> {
        let err = |source| TapError::Up {
            name: self.name.clone(),
            source,
        };
        let mut req = IfReq::new(&self.name);
        self.ifreq_ioctl(libc::SIOCGIFFLAGS, &mut req)
            .map_err(err)?;
        // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
        let flags = unsafe { req.data.flags };
        req.data.flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ifreq_ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(err)
    }

    fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let mut req = IfReq::new(&self.name);
        req.data.mtu = mtu as libc::c_int;
        self.ifreq_ioctl(libc::SIOCSIFMTU, &mut req)
            .map_err(|source| TapError::Mtu {
                name: self.name.clone(),
                mtu,
                source,
            })
    }

    /// Reads one frame; `Err(WouldBlock)` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the duration of the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace fd; setns only changes this thread's namespace.
    check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })
}

/// Resolves `--netns`: a path, a PID (its /proc/PID/ns/net), or a name made by `ip netns add`.
pub fn netns_path(spec: &str) -> PathBuf {
    if spec.bytes().all(|b| b.is_ascii_digit()) && !spec.is_empty() {
        PathBuf::from(format!("/proc/{spec}/ns/net"))
    } else if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from(format!("/run/netns/{spec}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_specs() {
        assert_eq!(netns_path("1234"), PathBuf::from("/proc/1234/ns/net"));
        assert_eq!(netns_path("guest"), PathBuf::from("/run/netns/guest"));
        assert_eq!(netns_path("/run/netns/x"), PathBuf::from("/run/netns/x"));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(Tap::open("", None), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long", None),
            Err(TapError::BadName(_))
        ));
    }
}
