//! An AF_PACKET raw socket on one interface: sees every frame the interface sends and receives,
//! with its direction. `hubnat-pcap record` uses it on the guest side of hubnat's TAP to capture
//! both directions of hubnat's port without touching hubnat itself.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// Which way a captured frame went, as the interface's own host saw it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// Sent by this host onto the interface (on a guest's TAP: guest → hubnat).
    Outgoing,
    /// Received by this host (on a guest's TAP: hubnat → guest).
    Incoming,
}

pub struct PacketSocket {
    fd: OwnedFd,
}

pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace fd; setns only changes this thread's network namespace.
    check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

pub(crate) const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

impl PacketSocket {
    /// Opens a socket bound to interface `iface` of the calling thread's namespace, with reads
    /// that give up after `timeout` (so a capture loop can notice it should stop).
    pub fn open(iface: &str, timeout: Duration) -> io::Result<PacketSocket> {
        let name = std::ffi::CString::new(iface)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                ETH_P_ALL_BE as libc::c_int,
            )
        })?;
        // SAFETY: `raw` is a socket fd we just opened and own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL_BE;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a properly initialised sockaddr_ll and the length passed is its size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket { fd })
    }

    /// Like `open`, on an interface of the network namespace at `netns`; the calling thread
    /// returns to its own namespace, the socket stays in the one it was opened in.
    pub fn open_in_netns(iface: &str, netns: &Path, timeout: Duration) -> io::Result<PacketSocket> {
        let target = File::open(netns)?;
        let own = File::open("/proc/thread-self/ns/net")?;
        setns(target.as_fd())?;
        let result = PacketSocket::open(iface, timeout);
        // Staying in the other namespace would be wrong for everything the caller does next.
        setns(own.as_fd())?;
        result
    }

    /// Receives one frame into `buf`: its length (cut to `buf`) and direction; `Ok(None)` when
    /// the read timed out. Frames of other kinds (loopback copies) are reported as incoming.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, Direction)>> {
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes; `sll`/`len` describe a
        // writable sockaddr_ll of the size given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let dir = if sll.sll_pkttype == libc::PACKET_OUTGOING {
            Direction::Outgoing
        } else {
            Direction::Incoming
        };
        Ok(Some((n as usize, dir)))
    }
}

impl PacketSocket {
    /// Sends one whole Ethernet frame out of the interface the socket is bound to.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the duration of the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        check(n as libc::c_int).map(drop)
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// The socket itself, for a port that takes an inherited one over (`PacketPort::from_fd`).
impl From<PacketSocket> for OwnedFd {
    fn from(sock: PacketSocket) -> OwnedFd {
        sock.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_interfaces_and_namespaces_are_errors() {
        assert!(PacketSocket::open("no-such-if0", Duration::from_millis(10)).is_err());
        assert!(PacketSocket::open("bad\0name", Duration::from_millis(10)).is_err());
        assert!(PacketSocket::open_in_netns(
            "lo",
            Path::new("/nonexistent/netns"),
            Duration::from_millis(10)
        )
        .is_err());
    }

    #[test]
    fn loopback_capture_sees_both_directions_when_privileged() {
        let Ok(sock) = PacketSocket::open("lo", Duration::from_millis(200)) else {
            eprintln!("skipped: AF_PACKET needs CAP_NET_RAW");
            return;
        };
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = udp.local_addr().unwrap();
        udp.send_to(b"hubnat-af-packet-probe", to).unwrap();
        let mut buf = [0u8; 2048];
        let mut seen = Vec::new();
        for _ in 0..50 {
            match sock.recv(&mut buf).unwrap() {
                Some((n, dir)) if buf[..n].windows(22).any(|w| w == b"hubnat-af-packet-probe") => {
                    seen.push(dir)
                }
                Some(_) => {}
                None => break,
            }
            if seen.len() == 2 {
                break;
            }
        }
        assert!(seen.contains(&Direction::Outgoing), "{seen:?}");
    }
}
