//! The TAP port: a Linux TAP device whose far side is the guests' segment.
//!
//! hubnat creates (or attaches to) the device, optionally inside another network namespace (as
//! slirp4netns does), and reads and writes whole Ethernet frames on it.
//!
//! A frame written to a TAP is received by the kernel inside the write: the guest's whole
//! receive path runs in hubnat's thread, one frame at a time. With NAPI (`IFF_NAPI`) the kernel
//! instead queues the frame for a NAPI poll; when that poll runs in a kernel thread of its own
//! (`NapiThreading`), it takes the queued frames in batches, overlapped with hubnat's next
//! writes, and the guest's GRO can merge consecutive segments of a flow. That is how a NIC
//! driver delivers frames; hubnat's frames stay MTU-sized.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::port::vnet;
use crate::sock::uring::restrict_and_enable;

/// Why a TAP could not be had. Each message says the system's reason itself; the reason is not
/// also the error's `source`, which `{:#}` would print a second time.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device name `{0}` is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {}{}", .0, tun_hint(.0))]
    OpenTun(io::Error),
    #[error("cannot create or attach TAP device `{name}`: {error}")]
    Attach { name: String, error: io::Error },
    #[error("cannot bring TAP device `{name}` up: {error}")]
    Up { name: String, error: io::Error },
    #[error("cannot set the MTU of TAP device `{name}` to {mtu}: {error}")]
    Mtu {
        name: String,
        mtu: u32,
        error: io::Error,
    },
    #[error("cannot open network namespace {path}: {error}")]
    OpenNetns { path: PathBuf, error: io::Error },
    #[error("cannot enter network namespace {path}: {error}")]
    EnterNetns { path: PathBuf, error: io::Error },
    #[error("cannot move TAP device `{name}`'s NAPI polls to threads: {error}")]
    Napi { name: String, error: io::Error },
    #[error("cannot open the user namespace {}: {error}", ns_name(.path))]
    OpenUserns { path: PathBuf, error: io::Error },
    #[error("cannot join the user namespace {}: {error}{}", ns_name(.path), join_hint(.error))]
    EnterUserns { path: PathBuf, error: io::Error },
    #[error("user namespace {}: name the network namespace to make the TAP in too (--netns)", ns_name(.path))]
    UsernsWithoutNetns { path: PathBuf },
    #[error("cannot start the process that joins the guest's namespaces: {0}")]
    HelperStart(io::Error),
    #[error("the process that opens TAP device `{name}` in the guest's namespaces {what}")]
    Helper { name: String, what: String },
    #[error("descriptor {fd} is not a TAP device: {why}")]
    NotTap { fd: RawFd, why: String },
    #[error("cannot set up TAP device `{name}` in the guest's namespace ({what}): {error}")]
    Configure {
        name: String,
        what: String,
        error: io::Error,
    },
}

/// The guest's side of a TAP, as slirp4netns's `--configure` leaves it: the device up with an
/// IPv4 address, a default route through the virtual host, and the namespace's loopback up. For
/// a guest namespace whose user has no DHCP client to run (a container's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSetup {
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    /// The default route's gateway (None: no default route).
    pub gateway: Option<Ipv4Addr>,
    /// The device's MAC address (None: the kernel's random one).
    pub mac: Option<[u8; 6]>,
}

/// A namespace file as an operator named it: "of PID N" for /proc/N/ns/..., else its path.
fn ns_name(path: &Path) -> String {
    let pid = path
        .strip_prefix("/proc")
        .ok()
        .and_then(|rest| rest.iter().next())
        .and_then(|p| p.to_str())
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match pid {
        Some(pid) => format!("of PID {pid}"),
        None => format!("at {}", path.display()),
    }
}

/// Why an ordinary user may be refused /dev/net/tun.
fn tun_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EACCES) => " (an unprivileged user needs it readable and writable: mode 0666)",
        _ => "",
    }
}

/// What an operator can do about a refused join.
fn join_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM) => " (run hubnat as the user that made the namespace, or as root)",
        _ => "",
    }
}

/// `ifreq` as the TUN/TAP and interface ioctls take it: a name and a union we use as flags or MTU.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
#[derive(Clone, Copy)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    /// The transmit queue's length (SIOCGIFTXQLEN, SIOCSIFTXQLEN), or the index SIOCGIFINDEX
    /// gives.
    qlen: libc::c_int,
    /// An address (SIOCSIFADDR, SIOCSIFNETMASK) or a hardware address (SIOCSIFHWADDR).
    addr: libc::sockaddr,
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

    /// SIOCSIFADDR's or SIOCSIFNETMASK's request for `name`.
    fn with_ipv4(name: &str, ip: Ipv4Addr) -> IfReq {
        let mut req = IfReq::new(name);
        req.data.addr = sockaddr_v4(ip);
        req
    }
}

/// `ip` as the `sockaddr` the interface and route ioctls take.
fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads a
    // sockaddr_in wherever the family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// A socket of the calling thread's network namespace, only a handle for interface ioctls.
fn interface_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(sock) })
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
    /// Its frames carry a virtio-net header (`IFF_VNET_HDR`, see `port::vnet`).
    vnet_hdr: bool,
    /// The kernel took UDP segmentation among the offloads (`offer_offloads`): it knows UDP
    /// super-frames, both ways.
    uso: bool,
    /// Datagrams cut from a UDP super-frame that `recv` has not handed out yet, and how many
    /// (read without the lock).
    cut: Mutex<CutQueue>,
    cut_len: AtomicUsize,
}

/// Datagrams cut from a guest's UDP super-frame, waiting for `Tap::recv`, and the buffers of
/// those handed out, kept for the next cut (no allocation per datagram once warm).
#[derive(Default)]
struct CutQueue {
    ready: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

impl CutQueue {
    /// Moves the next datagram into `buf`; its length.
    fn pop_into(&mut self, buf: &mut [u8]) -> Option<usize> {
        let d = self.ready.pop_front()?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        self.spare.push(d);
        Some(n)
    }
}

/// How each queue of a TAP is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueFlags {
    /// Written frames are delivered through a NAPI poll (`IFF_NAPI`, see the module comment).
    pub napi: bool,
    /// Frames carry a virtio-net header (`IFF_VNET_HDR`), which offloads need.
    pub vnet_hdr: bool,
}

/// The offloads hubnat offers the guest (`TUNSETOFFLOAD`): checksums and TCP segmentation
/// over IPv4 and IPv6 (with ECN), which it takes as they come (`port::vnet`), and UDP
/// segmentation (USO, Linux 6.2) where the kernel has it.
const OFFLOADS: libc::c_uint = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
const USO: libc::c_uint = TUN_F_USO4 | TUN_F_USO6;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

impl Tap {
    /// Creates the TAP device `name` in the current network namespace, or attaches to it if it
    /// exists, and brings it up. `mtu` sets the device MTU when given.
    pub fn open(name: &str, mtu: Option<u32>) -> Result<Tap, TapError> {
        Ok(Tap::open_queues(name, mtu, 1, QueueFlags::default())?.remove(0))
    }

    /// Like `open`, with `queues` queues: more than one makes a multiqueue device
    /// (IFF_MULTI_QUEUE), one fd per queue, among which the kernel steers flows; each attached
    /// as `flags` says.
    pub fn open_queues(
        name: &str,
        mtu: Option<u32>,
        queues: usize,
        flags: QueueFlags,
    ) -> Result<Vec<Tap>, TapError> {
        let mut taps = Vec::with_capacity(queues.max(1));
        for _ in 0..queues.max(1) {
            taps.push(Tap::attach(name, queues > 1, flags)?);
        }
        if let Some(mtu) = mtu {
            taps[0].set_mtu(mtu)?;
        }
        taps[0].lengthen_queue();
        taps[0].bring_up()?;
        Ok(taps)
    }

    fn attach(name: &str, multi_queue: bool, flags: QueueFlags) -> Result<Tap, TapError> {
        check_name(name)?;
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
        req.data.flags = tap_flags(multi_queue, flags);
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out; `req` outlives the call.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) })
            .map_err(|error| TapError::Attach {
                name: name.to_owned(),
                error,
            })?;
        Ok(Tap {
            fd,
            name: name.to_owned(),
            vnet_hdr: flags.vnet_hdr,
            uso: false,
            cut: Mutex::default(),
            cut_len: AtomicUsize::new(0),
        })
    }

    /// Like `open`, but creates the device inside the network namespace at `netns` (a path such
    /// as /proc/PID/ns/net or /run/netns/NAME). The calling thread returns to its own namespace;
    /// the device's fd stays bound to the one it was created in.
    pub fn open_in_netns(name: &str, mtu: Option<u32>, netns: &Path) -> Result<Tap, TapError> {
        Ok(Tap::open_queues_in_netns(name, mtu, 1, QueueFlags::default(), netns)?.remove(0))
    }

    /// `open_queues` inside the network namespace at `netns` (see `open_in_netns`).
    pub fn open_queues_in_netns(
        name: &str,
        mtu: Option<u32>,
        queues: usize,
        flags: QueueFlags,
        netns: &Path,
    ) -> Result<Vec<Tap>, TapError> {
        let target = File::open(netns).map_err(|error| TapError::OpenNetns {
            path: netns.to_owned(),
            error,
        })?;
        let own_path = Path::new("/proc/thread-self/ns/net");
        let own = File::open(own_path).map_err(|error| TapError::OpenNetns {
            path: own_path.to_owned(),
            error,
        })?;
        setns(target.as_fd()).map_err(|error| TapError::EnterNetns {
            path: netns.to_owned(),
            error,
        })?;
        let result = Tap::open_queues(name, mtu, queues, flags);
        if let Err(error) = setns(own.as_fd()) {
            // Staying in the guest's namespace would send host traffic into it: refuse to go on.
            return Err(TapError::EnterNetns {
                path: own_path.to_owned(),
                error,
            });
        }
        result
    }

    /// `open_queues` inside the user namespace at `userns` and the network namespace at
    /// `netns` (without `userns`, as `open_queues_in_netns`), as slirp4netns does for rootless
    /// containers: where hubnat is not root, only a process inside the user namespace that owns
    /// the guest's network namespace may create a device there. A multithreaded process cannot
    /// join a user namespace and no process can leave one, so a forked child joins both, opens
    /// the queues, sets the MTU, brings the link up and sends the queues' descriptors back;
    /// hubnat itself, and its host sockets, stay where they are.
    pub fn open_queues_in_namespaces(
        name: &str,
        mtu: Option<u32>,
        queues: usize,
        flags: QueueFlags,
        userns: Option<&Path>,
        netns: &Path,
    ) -> Result<Vec<Tap>, TapError> {
        let Some(userns) = userns else {
            return Tap::open_queues_in_netns(name, mtu, queues, flags, netns);
        };
        check_name(name)?;
        let user = File::open(userns).map_err(|error| TapError::OpenUserns {
            path: userns.to_owned(),
            error,
        })?;
        let net = File::open(netns).map_err(|error| TapError::OpenNetns {
            path: netns.to_owned(),
            error,
        })?;
        // The kernel refuses to join the user namespace one is already in (a root hubnat
        // named its own, say): there is nothing to join then.
        let join_user = !same_file(&user, Path::new("/proc/self/ns/user"));
        let queues = queues.max(1);
        let mut attach = IfReq::new(name);
        attach.data.flags = tap_flags(queues > 1, flags);
        let set_mtu = mtu.map(|mtu| {
            let mut req = IfReq::new(name);
            req.data.mtu = mtu as libc::c_int;
            req
        });
        let plan = HelperPlan {
            userns: join_user.then(|| user.as_raw_fd()),
            netns: Some(net.as_raw_fd()),
            attach,
            mtu: set_mtu,
            link: IfReq::new(name),
            guest: None,
        };
        let fds = run_helper(&plan, queues).map_err(|failure| {
            let os_error = |errno| io::Error::from_raw_os_error(errno);
            match failure {
                HelperFailure::Step(Step::JoinUser, errno) => TapError::EnterUserns {
                    path: userns.to_owned(),
                    error: os_error(errno),
                },
                HelperFailure::Step(Step::JoinNet, errno) => TapError::EnterNetns {
                    path: netns.to_owned(),
                    error: os_error(errno),
                },
                HelperFailure::Step(Step::OpenTun, errno) => TapError::OpenTun(os_error(errno)),
                HelperFailure::Step(Step::Attach, errno) => TapError::Attach {
                    name: name.to_owned(),
                    error: os_error(errno),
                },
                HelperFailure::Step(Step::Mtu, errno) => TapError::Mtu {
                    name: name.to_owned(),
                    mtu: mtu.unwrap_or_default(),
                    error: os_error(errno),
                },
                HelperFailure::Step(Step::Control | Step::Up, errno) => TapError::Up {
                    name: name.to_owned(),
                    error: os_error(errno),
                },
                HelperFailure::Step(Step::Send, errno) => TapError::Helper {
                    name: name.to_owned(),
                    what: format!("could not send the queues back: {}", os_error(errno)),
                },
                HelperFailure::Step(
                    step @ (Step::Queues
                    | Step::Done
                    | Step::HwAddr
                    | Step::Address
                    | Step::Netmask
                    | Step::Route
                    | Step::Loopback),
                    _,
                ) => TapError::Helper {
                    name: name.to_owned(),
                    what: format!("answered out of turn ({step:?})"),
                },
                HelperFailure::Start(e) => TapError::HelperStart(e),
                HelperFailure::Other(what) => TapError::Helper {
                    name: name.to_owned(),
                    what,
                },
            }
        })?;
        Ok(fds
            .into_iter()
            .map(|fd| Tap {
                fd,
                name: name.to_owned(),
                vnet_hdr: flags.vnet_hdr,
                uso: false,
                cut: Mutex::default(),
                cut_len: AtomicUsize::new(0),
            })
            .collect())
    }

    /// Sets up the guest's side of the existing device `name` as `setup` says (see
    /// `GuestSetup`), from inside the user namespace at `userns` (None: hubnat's own) and the
    /// network namespace at `netns` (None: hubnat's own). As in `open_queues_in_namespaces`, a
    /// forked child joins them, so the calling thread never leaves its own.
    pub fn configure_in_namespaces(
        name: &str,
        userns: Option<&Path>,
        netns: Option<&Path>,
        setup: &GuestSetup,
    ) -> Result<(), TapError> {
        check_name(name)?;
        let user = match userns {
            Some(path) => Some(File::open(path).map_err(|error| TapError::OpenUserns {
                path: path.to_owned(),
                error,
            })?),
            None => None,
        };
        let net = match netns {
            Some(path) => Some(File::open(path).map_err(|error| TapError::OpenNetns {
                path: path.to_owned(),
                error,
            })?),
            None => None,
        };
        let join_user = user
            .as_ref()
            .filter(|u| !same_file(u, Path::new("/proc/self/ns/user")));
        let plan = HelperPlan {
            userns: join_user.map(|u| u.as_raw_fd()),
            netns: net.as_ref().map(|n| n.as_raw_fd()),
            attach: IfReq::new(name),
            mtu: None,
            link: IfReq::new(name),
            guest: Some(GuestPlan::new(name, setup)),
        };
        let configure = |what: String, errno: i32| TapError::Configure {
            name: name.to_owned(),
            what,
            error: io::Error::from_raw_os_error(errno),
        };
        match run_helper(&plan, 0) {
            Ok(_) => Ok(()),
            Err(HelperFailure::Step(Step::JoinUser, errno)) => Err(TapError::EnterUserns {
                path: userns.map(Path::to_owned).unwrap_or_default(),
                error: io::Error::from_raw_os_error(errno),
            }),
            Err(HelperFailure::Step(Step::JoinNet, errno)) => Err(TapError::EnterNetns {
                path: netns.map(Path::to_owned).unwrap_or_default(),
                error: io::Error::from_raw_os_error(errno),
            }),
            Err(HelperFailure::Step(step, errno)) => {
                let what = match step {
                    Step::HwAddr => format!("MAC address {}", mac_text(setup.mac)),
                    Step::Address => format!("address {}", setup.address),
                    Step::Netmask => format!("netmask {}", setup.netmask),
                    Step::Route => format!(
                        "default route via {}",
                        setup.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)
                    ),
                    Step::Loopback => "loopback up".to_owned(),
                    Step::Control | Step::Up => "link up".to_owned(),
                    other => format!("{other:?}"),
                };
                Err(configure(what, errno))
            }
            Err(HelperFailure::Start(e)) => Err(TapError::HelperStart(e)),
            Err(HelperFailure::Other(what)) => Err(TapError::Helper {
                name: name.to_owned(),
                what,
            }),
        }
    }

    /// A TAP queue opened by someone else and handed over as a descriptor (a launcher that
    /// made the device, as libvirt or a container runtime does). It must be a TUN/TAP
    /// character device attached to a TAP (Ethernet frames, without packet-information or
    /// virtio-net headers); its name is the kernel's (TUNGETIFF). The descriptor is made
    /// non-blocking, which the launcher's copies of it see too.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        use std::os::unix::fs::FileTypeExt;
        let raw = fd.as_raw_fd();
        let not_tap = |why: String| TapError::NotTap { fd: raw, why };
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| not_tap(format!("cannot look at it: {e}")))?;
        if !meta.file_type().is_char_device() {
            return Err(not_tap("not a character device".into()));
        }
        let fd = OwnedFd::from(file);
        let mut req = IfReq::new("");
        // SAFETY: TUNGETIFF writes an `ifreq`, which `IfReq` lays out; `req` outlives the call.
        if let Err(e) = check(unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req as *mut IfReq) })
        {
            return Err(not_tap(match e.raw_os_error() {
                Some(libc::EBADFD) => "a TUN/TAP descriptor with no device attached".into(),
                Some(libc::ENOTTY | libc::EINVAL) => "not a TUN/TAP descriptor".into(),
                _ => format!("cannot ask for its device: {e}"),
            }));
        }
        // SAFETY: TUNGETIFF filled the `flags` member of the union.
        let flags = libc::c_int::from(unsafe { req.data.flags });
        if flags & libc::IFF_TAP == 0 {
            return Err(not_tap("a TUN device (IP packets), not a TAP".into()));
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(not_tap(
                "its frames carry packet-information headers (no IFF_NO_PI)".into(),
            ));
        }
        if flags & libc::IFF_VNET_HDR != 0 {
            return Err(not_tap("its frames carry virtio-net headers".into()));
        }
        let len = req
            .name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(req.name.len());
        let bytes: Vec<u8> = req.name[..len].iter().map(|&c| c as u8).collect();
        let name = String::from_utf8(bytes)
            .ok()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| not_tap("its device has no readable name".into()))?;
        // SAFETY: F_GETFL and F_SETFL on a descriptor owned here; results are checked.
        let mode = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if mode < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, mode | libc::O_NONBLOCK) } < 0 {
            let e = io::Error::last_os_error();
            return Err(not_tap(format!("cannot make it non-blocking: {e}")));
        }
        Ok(Tap {
            fd,
            name,
            vnet_hdr: false,
            uso: false,
            cut: Mutex::default(),
            cut_len: AtomicUsize::new(0),
        })
    }

    /// Whether its frames carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Offers the guest checksum offload and TCP segmentation (`OFFLOADS`), and UDP
    /// segmentation where the kernel has it (`uso` then says so); the device's queues must
    /// carry virtio-net headers. Where the kernel refuses, the guest's frames stay plain (their
    /// headers say so) and the error is returned for the log.
    pub fn offer_offloads(&mut self) -> io::Result<()> {
        let set = |flags: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a TAP queue.
            check(unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    libc::c_ulong::from(flags),
                )
            })
        };
        // A kernel without USO refuses the whole set (EINVAL): then without it.
        self.uso = set(OFFLOADS | USO).is_ok();
        if self.uso {
            return Ok(());
        }
        set(OFFLOADS)
    }

    /// Whether the guest may send UDP super-frames and be sent them (`offer_offloads`).
    pub fn uso(&self) -> bool {
        self.uso
    }

    /// Whether the device outlives its last descriptor (made persistent, as `ip tuntap add`
    /// does): what hubnat sets on it then stays for the device's next user.
    pub fn persistent(&self) -> bool {
        let mut req = IfReq::new("");
        // SAFETY: TUNGETIFF writes an `ifreq`, which `IfReq` lays out; `req` outlives the call.
        let asked = check(unsafe {
            libc::ioctl(self.as_raw_fd(), libc::TUNGETIFF, &mut req as *mut IfReq)
        });
        // SAFETY: TUNGETIFF filled the `flags` member of the union.
        asked.is_ok() && libc::c_int::from(unsafe { req.data.flags }) & libc::IFF_PERSIST != 0
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ifreq_ioctl(&self, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
        let sock = interface_socket()?;
        // SAFETY: the SIOC*IF* requests used here take an `ifreq`, laid out by `IfReq`.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut IfReq) })
    }

    fn bring_up(&self) -> Result<(), TapError> {
        let err = |error| TapError::Up {
            name: self.name.clone(),
            error,
        };
        let mut req = IfReq::new(&self.name);
        self.ifreq_ioctl(libc::SIOCGIFFLAGS, &mut req)
            .map_err(err)?;
        // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
        let flags = unsafe { req.data.flags };
        req.data.flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ifreq_ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(err)
    }

    /// Best effort: the device keeps the kernel's queue where it cannot be lengthened.
    fn lengthen_queue(&self) {
        let lengthened =
            interface_socket().and_then(|s| lengthen_queue(s.as_raw_fd(), IfReq::new(&self.name)));
        if let Err(e) = lengthened {
            tracing::debug!(
                "{}: the queue toward hubnat keeps its length ({e})",
                self.name
            );
        }
    }

    fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let mut req = IfReq::new(&self.name);
        req.data.mtu = mtu as libc::c_int;
        self.ifreq_ioctl(libc::SIOCSIFMTU, &mut req)
            .map_err(|error| TapError::Mtu {
                name: self.name.clone(),
                mtu,
                error,
            })
    }

    /// Reads one frame; `Err(WouldBlock)` when none is waiting. A frame's virtio-net header
    /// is read apart and acted on (`vnet::complete`); a frame whose header is refused reads as
    /// empty (the engine drops it as malformed).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cut_len.load(Ordering::Relaxed) > 0 {
            let mut cut = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
            let n = cut.pop_into(buf);
            self.cut_len.store(cut.ready.len(), Ordering::Relaxed);
            if let Some(n) = n {
                return Ok(n);
            }
        }
        if !self.vnet_hdr {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            return if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            };
        }
        let mut hdr = [0u8; vnet::HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        // SAFETY: both iovecs point at buffers valid for writes of their lengths for the call.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = (n as usize).saturating_sub(vnet::HDR_LEN);
        match vnet::complete(&hdr, &mut buf[..len]) {
            Ok(None) if n as usize >= vnet::HDR_LEN => Ok(len),
            Ok(Some(size)) => Ok(self.cut_udp(buf, len, size)),
            _ => Ok(0),
        }
    }

    /// Cuts the UDP super-frame `buf[..len]` into its datagrams: the first is left in `buf`
    /// (its length returned; 0 for a frame that is no such thing), the others wait in `cut`
    /// for the reads that follow. (Only a read that found `cut` empty reads the device, so
    /// nothing waits before them.)
    #[cold]
    fn cut_udp(&self, buf: &mut [u8], len: usize, size: u16) -> usize {
        let mut guard = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        let cut = &mut *guard;
        let whole = vnet::cut_udp(&buf[..len], size, |d| {
            let mut b = cut.spare.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(d);
            cut.ready.push_back(b);
        });
        let n = if whole { cut.pop_into(buf) } else { None };
        self.cut_len.store(cut.ready.len(), Ordering::Relaxed);
        n.unwrap_or(0)
    }

    /// Writes one frame (after an empty virtio-net header, where the device wants one).
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let n = if self.vnet_hdr {
            let iov = vnet_iov(&vnet::EMPTY, frame);
            // SAFETY: both iovecs point at memory valid for reads of their lengths for the call.
            unsafe { libc::writev(fd, iov.as_ptr(), 2) }
        } else {
            // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the call.
            unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) }
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok((n as usize).saturating_sub(if self.vnet_hdr { vnet::HDR_LEN } else { 0 }))
        }
    }
}

/// Frames per io_uring submission (a bigger batch is written in several).
const WRITE_RING_ENTRIES: u32 = 256;

/// Writes a batch of frames to a TAP with one system call: a TAP takes one frame per write(2),
/// so without a ring every frame pays a kernel entry and exit of its own. Each thread that
/// writes has its own writer (a ring accepts submissions from its creator only). Where the
/// kernel refuses io_uring, frames go out one write(2) each.
pub struct TapWriter {
    ring: Option<io_uring::IoUring>,
    /// The TAP fd. Not registered with the ring: a registered file is only let go when the
    /// kernel tears the ring down, in the background after the process exits, and until then
    /// the device would outlive hubnat.
    fd: RawFd,
    submissions: u64,
    /// Frames go out after an empty virtio-net header (`Tap::vnet_hdr`).
    vnet_hdr: bool,
    /// Each queued frame's iovecs (header, frame), while its write is in flight, and the
    /// headers of its super-frames. Made with room for a submission's worth: never moved while
    /// the kernel may read them.
    iovs: Vec<[libc::iovec; 2]>,
    gso_hdrs: Vec<[u8; vnet::HDR_LEN]>,
}

impl TapWriter {
    /// A writer for `tap`, made on (and used only by) the calling thread.
    pub fn new(tap: &Tap) -> TapWriter {
        let fd = tap.as_raw_fd();
        // Restricted to writes (see `restrict_and_enable`).
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_r_disabled()
            .build(WRITE_RING_ENTRIES)
            .and_then(|r| {
                restrict_and_enable(
                    &r,
                    &[
                        io_uring::opcode::Write::CODE,
                        io_uring::opcode::Writev::CODE,
                    ],
                    0,
                    &[],
                )?;
                Ok(r)
            });
        let ring = match ring {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("TAP writes one frame per write(2): io_uring unavailable ({e})");
                None
            }
        };
        TapWriter {
            ring,
            fd,
            submissions: 0,
            vnet_hdr: tap.vnet_hdr,
            iovs: Vec::with_capacity(if tap.vnet_hdr {
                WRITE_RING_ENTRIES as usize
            } else {
                0
            }),
            gso_hdrs: Vec::with_capacity(if tap.vnet_hdr {
                WRITE_RING_ENTRIES as usize
            } else {
                0
            }),
        }
    }

    /// Whether frames go out in batches (io_uring) or one write(2) each.
    pub fn batched(&self) -> bool {
        self.ring.is_some()
    }

    /// System calls made for frames so far (one per batch with a ring, one per frame without).
    pub fn submissions(&self) -> u64 {
        self.submissions
    }

    fn write_each(&mut self, frames: &mut dyn Iterator<Item = (&[u8], u16)>) -> usize {
        let mut failed = 0;
        for (f, gso) in frames {
            self.submissions += 1;
            let n = if self.vnet_hdr {
                let hdr = (gso > 0).then(|| vnet::gso_header(f, gso));
                let iov = vnet_iov(hdr.as_ref().unwrap_or(&vnet::EMPTY), f);
                // SAFETY: both iovecs point at memory valid for reads of their lengths.
                unsafe { libc::writev(self.fd, iov.as_ptr(), 2) }
            } else {
                // SAFETY: `f` is valid for reads of `f.len()` bytes for the duration of the call.
                unsafe { libc::write(self.fd, f.as_ptr().cast(), f.len()) }
            };
            if n < 0 {
                failed += 1;
            }
        }
        failed
    }

    /// Writes every frame of `frames` to the TAP this writer was made for; returns how many the
    /// device refused (queue full, link down), which the caller counts as drops.
    pub fn send_all<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        self.send_all_gso(frames.map(|f| (f, 0)))
    }

    /// `send_all` of frames with their segment sizes (`FrameBatch::iter_gso`): a super-frame
    /// goes out with the header that has the guest's side cut it (a device with virtio-net
    /// headers only; elsewhere every size is 0).
    pub fn send_all_gso<'a>(&mut self, mut frames: impl Iterator<Item = (&'a [u8], u16)>) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return self.write_each(&mut frames);
        };
        let mut failed = 0;
        let mut frames = frames.peekable();
        while frames.peek().is_some() {
            let mut queued = 0usize;
            self.iovs.clear();
            self.gso_hdrs.clear();
            {
                let mut sq = ring.submission();
                while queued < WRITE_RING_ENTRIES as usize {
                    let Some((f, gso)) = frames.next() else { break };
                    let fd = io_uring::types::Fd(self.fd);
                    let sqe = if self.vnet_hdr {
                        // Within the capacities reserved: what is already queued stays put.
                        let hdr = if gso > 0 {
                            self.gso_hdrs.push(vnet::gso_header(f, gso));
                            self.gso_hdrs.last().expect("just pushed")
                        } else {
                            &vnet::EMPTY
                        };
                        self.iovs.push(vnet_iov(hdr, f));
                        let iov = self.iovs.last().expect("just pushed");
                        io_uring::opcode::Writev::new(fd, iov.as_ptr(), 2)
                            .offset(u64::MAX)
                            .build()
                    } else {
                        let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
                        io_uring::opcode::Write::new(fd, f.as_ptr(), len)
                            .offset(u64::MAX)
                            .build()
                    };
                    // SAFETY: the frame's bytes (and its iovecs in `iovs`, not moved before
                    // the next submission) stay borrowed until every completion of this
                    // submission has been reaped below, before `send_all` returns.
                    if unsafe { sq.push(&sqe) }.is_err() {
                        failed += 1;
                        continue;
                    }
                    queued += 1;
                }
            }
            if queued == 0 {
                continue;
            }
            self.submissions += 1;
            // Writes to a TAP complete inline; waiting for all of them keeps the borrow sound.
            let mut done = 0usize;
            while done < queued {
                match ring.submit_and_wait(queued - done) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        // The kernel took none of the entries (it reports an error only then).
                        // Dropping the ring discards them unsubmitted; later batches go out
                        // one write(2) each.
                        tracing::warn!("TAP writes fall back to write(2): io_uring failed: {e}");
                        failed += queued - done;
                        self.ring = None;
                        return failed + self.write_each(&mut frames);
                    }
                }
                for cqe in ring.completion() {
                    done += 1;
                    if cqe.result() < 0 {
                        failed += 1;
                    }
                }
            }
        }
        failed
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(TapError::BadName(name.to_owned()));
    }
    Ok(())
}

/// TUNSETIFF's flags for one queue of a TAP device.
fn tap_flags(multi_queue: bool, queue: QueueFlags) -> libc::c_short {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    if queue.napi {
        flags |= libc::IFF_NAPI;
    }
    if queue.vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    flags as libc::c_short
}

/// A virtio-net header, then `frame`: what a write to a device with headers takes.
fn vnet_iov(hdr: &[u8; vnet::HDR_LEN], frame: &[u8]) -> [libc::iovec; 2] {
    [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: vnet::HDR_LEN,
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ]
}

/// Whether `file` is the file at `path` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// What the namespace helper process (`Tap::open_queues_in_namespaces`) is to do, all of it
/// prepared before the fork.
struct HelperPlan {
    /// The user namespace to join first (None: hubnat is in it already).
    userns: Option<RawFd>,
    /// The network namespace to join (None: hubnat's own).
    netns: Option<RawFd>,
    /// TUNSETIFF's request for each queue.
    attach: IfReq,
    /// SIOCSIFMTU's request, when an MTU is to be set.
    mtu: Option<IfReq>,
    /// The device's name, for SIOCGIFFLAGS and SIOCSIFFLAGS.
    link: IfReq,
    /// The guest's side to set up once the link is up.
    guest: Option<GuestPlan>,
}

/// `GuestSetup` as the helper's ioctls take it, prepared before the fork.
struct GuestPlan {
    hwaddr: Option<IfReq>,
    address: IfReq,
    netmask: IfReq,
    route: Option<libc::rtentry>,
    /// The device's name, NUL-terminated, for the route's `rt_dev`.
    dev: [libc::c_char; libc::IFNAMSIZ],
    loopback: IfReq,
}

impl GuestPlan {
    fn new(name: &str, setup: &GuestSetup) -> GuestPlan {
        let hwaddr = setup.mac.map(|mac| {
            let mut req = IfReq::new(name);
            // SAFETY: sockaddr is plain data; all-zero is a valid value, filled in below.
            let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
            sa.sa_family = libc::ARPHRD_ETHER;
            for (dst, src) in sa.sa_data.iter_mut().zip(mac) {
                *dst = src as libc::c_char;
            }
            req.data.addr = sa;
            req
        });
        let route = setup.gateway.map(|gw| {
            // SAFETY: rtentry is plain data (its one pointer null); all-zero is a valid value.
            let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
            rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
            rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
            rt.rt_gateway = sockaddr_v4(gw);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            rt
        });
        GuestPlan {
            hwaddr,
            address: IfReq::with_ipv4(name, setup.address),
            netmask: IfReq::with_ipv4(name, setup.netmask),
            route,
            dev: IfReq::new(name).name,
            loopback: IfReq::new("lo"),
        }
    }
}

fn mac_text(mac: Option<[u8; 6]>) -> String {
    mac.map(|m| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
    .unwrap_or_default()
}

/// How many frames the device holds for hubnat to read, per queue, at least. The kernel's 1,000
/// drops what a guest sends beyond it while hubnat is busy: a resolver with 1,000 queries in
/// flight (they leave in one burst at its start) lost a few every other run. Each slot holds one
/// frame, at most a GSO frame of 64 KiB where offloads are on.
const MIN_QUEUE_LEN: libc::c_int = 2048;

/// Raises the transmit queue of the device `req` names (which the TAP's queues are read from)
/// to `MIN_QUEUE_LEN`, unless it is that long already; `control` is an interface socket of the
/// device's namespace. The length is set over rtnetlink: the ioctl for it wants CAP_NET_ADMIN
/// in the first user namespace, where rtnetlink takes it in the namespace's own (a rootless
/// container's). Allocates nothing: the namespace helper calls it.
fn lengthen_queue(control: RawFd, mut req: IfReq) -> io::Result<()> {
    // SAFETY: SIOCGIFTXQLEN writes the `qlen` member of an `ifreq`, which `IfReq` lays out.
    check(unsafe { libc::ioctl(control, libc::SIOCGIFTXQLEN, &mut req as *mut IfReq) })?;
    // SAFETY: SIOCGIFTXQLEN filled `qlen`.
    if unsafe { req.data.qlen } >= MIN_QUEUE_LEN {
        return Ok(());
    }
    // SAFETY: SIOCGIFINDEX writes the index (an int, where `qlen` lies) of an `ifreq`.
    check(unsafe { libc::ioctl(control, libc::SIOCGIFINDEX, &mut req as *mut IfReq) })?;
    // SAFETY: SIOCGIFINDEX filled the int member.
    let index = unsafe { req.data.qlen };
    set_queue_len(index, MIN_QUEUE_LEN as u32)
}

/// `RTM_NEWLINK` for interface `index` with only `IFLA_TXQLEN` = `len`, and the kernel's
/// acknowledgement of it.
fn set_queue_len(index: libc::c_int, len: u32) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16 bytes), ifinfomsg (16), one rtattr (4) and its u32 (4).
    const LEN: usize = 40;
    let mut msg = [0u8; LEN];
    msg[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    msg[6..8].copy_from_slice(&flags.to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, type 0, then the index; flags and change 0.
    msg[20..24].copy_from_slice(&index.to_ne_bytes());
    msg[32..34].copy_from_slice(&8u16.to_ne_bytes());
    msg[34..36].copy_from_slice(&libc::IFLA_TXQLEN.to_ne_bytes());
    msg[36..40].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: `msg` is valid for reads of its length during the call.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), LEN, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The acknowledgement: an NLMSG_ERROR whose error is 0, or minus the errno of a refusal.
    let mut ack = [0u8; 64];
    // SAFETY: `ack` is valid for writes of its length during the call.
    let got = unsafe { libc::recv(fd.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let kind = u16::from_ne_bytes([ack[4], ack[5]]);
    if got < 20 || kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::from_raw_os_error(libc::EPROTO));
    }
    match i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// The helper's steps, as its reports name them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
enum Step {
    /// A report carrying queue descriptors.
    Queues = 1,
    /// Every queue sent: the last report of a helper that succeeded.
    Done,
    JoinUser,
    JoinNet,
    OpenTun,
    Attach,
    /// The socket interface ioctls go through.
    Control,
    Mtu,
    Up,
    /// Sending the descriptors back.
    Send,
    /// The guest's side (`GuestSetup`), one step per ioctl.
    HwAddr,
    Address,
    Netmask,
    Route,
    Loopback,
}

impl Step {
    fn from_u32(n: u32) -> Option<Step> {
        [
            Step::Queues,
            Step::Done,
            Step::JoinUser,
            Step::JoinNet,
            Step::OpenTun,
            Step::Attach,
            Step::Control,
            Step::Mtu,
            Step::Up,
            Step::Send,
            Step::HwAddr,
            Step::Address,
            Step::Netmask,
            Step::Route,
            Step::Loopback,
        ]
        .into_iter()
        .find(|s| *s as u32 == n)
    }
}

/// One message from the helper: a step and, for a failed one, its errno.
const REPORT_LEN: usize = 8;

fn report_bytes(step: Step, errno: i32) -> [u8; REPORT_LEN] {
    let mut b = [0u8; REPORT_LEN];
    b[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    b[4..].copy_from_slice(&errno.to_ne_bytes());
    b
}

/// Descriptors per message: below the kernel's SCM_MAX_FD (253), and a TAP has at most 256
/// queues.
const FDS_PER_MESSAGE: usize = 64;
// SAFETY: CMSG_SPACE only computes a size.
const CMSG_BUF_LEN: usize =
    unsafe { libc::CMSG_SPACE((FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) } as usize;

/// Control-message room for `FDS_PER_MESSAGE` descriptors, aligned as `cmsghdr` must be.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

/// How long the helper may take: its work is a few system calls, so only a helper stuck in
/// the kernel takes longer.
const HELPER_TIMEOUT_SECS: libc::time_t = 10;

enum HelperFailure {
    Start(io::Error),
    Step(Step, i32),
    Other(String),
}

/// Forks the namespace helper, which carries out `plan` for `queues` queues; returns their
/// descriptors, or why there are none. The helper is always waited for.
fn run_helper(plan: &HelperPlan, queues: usize) -> Result<Vec<OwnedFd>, HelperFailure> {
    let mut pair = [-1; 2];
    // SAFETY: `pair` has room for the two descriptors socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    })
    .map_err(HelperFailure::Start)?;
    // SAFETY: socketpair succeeded: both descriptors are new and owned here.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let timeout = libc::timeval {
        tv_sec: HELPER_TIMEOUT_SECS,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads a `timeval` of the given size, which outlives the call.
    check(unsafe {
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map_err(HelperFailure::Start)?;
    // The helper fills these in: it may not allocate.
    let mut slots = vec![-1 as RawFd; queues];
    // SAFETY: the child runs only `helper_main`, which makes raw system calls on memory
    // prepared here and ends with _exit: nothing that another thread of this process could
    // have left locked at the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(HelperFailure::Start(io::Error::last_os_error()));
    }
    if pid == 0 {
        helper_main(plan, &mut slots, theirs.as_raw_fd());
    }
    // Only the helper may hold its end: its exit is then seen here as the end of the stream.
    drop(theirs);
    let mut fds = Vec::with_capacity(queues);
    let answer = loop {
        match recv_report(&ours, &mut fds) {
            Ok(Some((Some(Step::Queues), _))) => continue,
            other => break other,
        }
    };
    if answer.is_err() {
        // Stuck or babbling: it is ours to end.
        // SAFETY: `pid` is the helper forked above and not yet waited for.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = reap(pid);
    match answer {
        Ok(Some((Some(Step::Done), _))) if fds.len() == queues => Ok(fds),
        Ok(Some((Some(Step::Done), _))) => Err(HelperFailure::Other(format!(
            "sent {} descriptors for {queues} queues",
            fds.len()
        ))),
        Ok(Some((Some(step), errno))) => Err(HelperFailure::Step(step, errno)),
        Ok(Some((None, _))) => Err(HelperFailure::Other("sent an unknown report".into())),
        Ok(None) => Err(HelperFailure::Other(format!(
            "ended without an answer ({status})"
        ))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(HelperFailure::Other(format!(
            "did not answer within {HELPER_TIMEOUT_SECS} s"
        ))),
        Err(e) => Err(HelperFailure::Other(format!("could not be heard: {e}"))),
    }
}

/// Waits for process `pid` to end; says how it ended.
fn reap(pid: libc::pid_t) -> String {
    loop {
        let mut status = 0;
        // SAFETY: `status` is valid for the write; `pid` is a child of this process.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return if libc::WIFEXITED(status) {
                format!("exit status {}", libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("wait status {status}")
            };
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return format!("not waited for: {e}");
        }
    }
}

/// Receives one report (None at the end of the stream) and appends the descriptors it
/// carries to `fds` (close-on-exec).
#[allow(clippy::type_complexity)]
fn recv_report(sock: &OwnedFd, fds: &mut Vec<OwnedFd>) -> io::Result<Option<(Option<Step>, i32)>> {
    let mut bytes = [0u8; REPORT_LEN];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: REPORT_LEN,
    };
    let mut control = CmsgBuf([0; CMSG_BUF_LEN]);
    // SAFETY: msghdr is plain data; all-zero is an empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF_LEN as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` and `control`, which outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Every descriptor that arrived is owned (and so closed) before anything else can fail.
    // SAFETY: `msg` was filled in by recvmsg; the CMSG_* walk stays within `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header inside `control`, as CMSG_FIRSTHDR/CMSG_NXTHDR give them.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN only computes a size.
            let (data, header) = unsafe { (libc::CMSG_DATA(cmsg), libc::CMSG_LEN(0) as usize) };
            // `cmsg_len` is a usize with glibc, a u32 with musl.
            #[allow(clippy::unnecessary_cast)]
            let count = (len as usize).saturating_sub(header) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` descriptors after the header; each is new
                // to this process and owned by nothing else.
                fds.push(unsafe {
                    OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.cast::<RawFd>().add(i)))
                });
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off"));
    }
    if n == 0 {
        return Ok(None);
    }
    if n as usize != REPORT_LEN {
        return Err(io::Error::other(format!("a report of {n} bytes")));
    }
    let step = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let errno = i32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    Ok(Some((Step::from_u32(step), errno)))
}

/// The namespace helper's whole life, in the child of a fork made by a possibly multithreaded
/// process: raw system calls on memory prepared before the fork only (no allocation, no
/// locks, no unwinding), and _exit.
fn helper_main(plan: &HelperPlan, slots: &mut [RawFd], sock: RawFd) -> ! {
    let (step, errno) = match helper_steps(plan, slots, sock) {
        Ok(()) => (Step::Done, 0),
        Err(failed) => failed,
    };
    // A lost report is seen by the parent as an exit without an answer.
    let _ = send_report(sock, step, errno, &[]);
    // SAFETY: ends this forked copy at once, running none of the parent's exit handlers.
    unsafe { libc::_exit(if step == Step::Done { 0 } else { 1 }) }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn helper_steps(plan: &HelperPlan, slots: &mut [RawFd], sock: RawFd) -> Result<(), (Step, i32)> {
    let fail = |step| (step, last_errno());
    if let Some(userns) = plan.userns {
        // SAFETY: setns on a namespace descriptor changes only this (single-threaded) process.
        if unsafe { libc::setns(userns, libc::CLONE_NEWUSER) } < 0 {
            return Err(fail(Step::JoinUser));
        }
    }
    if let Some(netns) = plan.netns {
        // SAFETY: as above.
        if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } < 0 {
            return Err(fail(Step::JoinNet));
        }
    }
    for slot in slots.iter_mut() {
        // SAFETY: a constant NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail(Step::OpenTun));
        }
        *slot = fd;
        let mut req = plan.attach;
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(fail(Step::Attach));
        }
    }
    // Made here, so that it is a socket of the guest's network namespace.
    // SAFETY: plain socket creation; the result is checked.
    let control = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if control < 0 {
        return Err(fail(Step::Control));
    }
    if let Some(mut req) = plan.mtu {
        // SAFETY: SIOCSIFMTU reads an `ifreq`.
        if unsafe { libc::ioctl(control, libc::SIOCSIFMTU, &mut req as *mut IfReq) } < 0 {
            return Err(fail(Step::Mtu));
        }
    }
    // Best effort, as in `Tap::open_queues` (nothing here may allocate, so nothing is said).
    let _ = lengthen_queue(control, plan.link);
    let mut req = plan.link;
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write an `ifreq`.
    if unsafe { libc::ioctl(control, libc::SIOCGIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(fail(Step::Up));
    }
    // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
    let flags = unsafe { req.data.flags };
    req.data.flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(control, libc::SIOCSIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(fail(Step::Up));
    }
    if let Some(guest) = &plan.guest {
        guest_steps(control, guest)?;
    }
    for chunk in slots.chunks(FDS_PER_MESSAGE) {
        if let Err(e) = send_report(sock, Step::Queues, 0, chunk) {
            return Err((Step::Send, e));
        }
    }
    Ok(())
}

/// The guest's side, in the helper (raw system calls on the prepared plan only), in the order
/// slirp4netns's `--configure` takes: hardware address, IPv4 address then netmask (the prefix
/// route follows them), the default route (which needs the link up and the address's subnet),
/// the loopback.
fn guest_steps(control: RawFd, guest: &GuestPlan) -> Result<(), (Step, i32)> {
    let fail = |step| (step, last_errno());
    if let Some(mut req) = guest.hwaddr {
        // SAFETY: SIOCSIFHWADDR reads an `ifreq` holding a hardware address.
        if unsafe { libc::ioctl(control, libc::SIOCSIFHWADDR, &mut req as *mut IfReq) } < 0 {
            return Err(fail(Step::HwAddr));
        }
    }
    for (step, request, plan) in [
        (Step::Address, libc::SIOCSIFADDR, &guest.address),
        (Step::Netmask, libc::SIOCSIFNETMASK, &guest.netmask),
    ] {
        let mut req = *plan;
        // SAFETY: SIOCSIFADDR and SIOCSIFNETMASK read an `ifreq` holding an AF_INET address.
        if unsafe { libc::ioctl(control, request, &mut req as *mut IfReq) } < 0 {
            return Err(fail(step));
        }
    }
    if let Some(mut route) = guest.route {
        route.rt_dev = guest.dev.as_ptr() as *mut libc::c_char;
        // SAFETY: SIOCADDRT reads an `rtentry`; its `rt_dev` points at the plan's NUL-terminated
        // name, which outlives the call. The kernel only reads the name.
        if unsafe { libc::ioctl(control, libc::SIOCADDRT, &mut route as *mut libc::rtentry) } < 0 {
            let errno = last_errno();
            // The same route made by an earlier run is the route asked for.
            if errno != libc::EEXIST {
                return Err((Step::Route, errno));
            }
        }
    }
    let mut req = guest.loopback;
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write an `ifreq`.
    if unsafe { libc::ioctl(control, libc::SIOCGIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(fail(Step::Loopback));
    }
    // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
    let flags = unsafe { req.data.flags };
    req.data.flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(control, libc::SIOCSIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(fail(Step::Loopback));
    }
    Ok(())
}

/// Sends one report with `fds` attached (at most `FDS_PER_MESSAGE`); the errno on failure.
/// Safe to call in the helper: no allocation.
fn send_report(sock: RawFd, step: Step, errno: i32, fds: &[RawFd]) -> Result<(), i32> {
    let bytes = report_bytes(step, errno);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: REPORT_LEN,
    };
    let mut control = CmsgBuf([0; CMSG_BUF_LEN]);
    // SAFETY: msghdr is plain data; all-zero is an empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let fds = &fds[..fds.len().min(FDS_PER_MESSAGE)];
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size, at most CMSG_BUF_LEN here.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
        // SAFETY: `msg_control` holds room for one header and `payload` bytes of data, as
        // CMSG_SPACE computed; CMSG_FIRSTHDR is then non-null and CMSG_DATA within it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
        }
    }
    // SAFETY: `msg` points at `iov`, `bytes` and `control`, which outlive the call.
    if unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(last_errno());
    }
    Ok(())
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace fd; setns only changes this thread's namespace.
    check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })
}

/// The switch between a TAP device's NAPI polls running in softirq context, inside each write
/// (a frame reaches the guest at once: the least latency), and in kernel threads of their own
/// (frames are taken in batches while hubnat goes on: the most throughput). It is the device's
/// `threaded` attribute in sysfs, which needs at least one queue opened with NAPI.
pub struct NapiThreading {
    file: File,
}

impl NapiThreading {
    /// Opens the switch of device `name`, in the network namespace at `netns` (None: this
    /// thread's), and sets it to softirq polls. The sysfs mounted in this process may show
    /// another namespace's devices, so a short-lived thread mounts a sysfs of its own, in a mount
    /// namespace of its own that goes away with it; the open file keeps working after. Without
    /// the privilege to mount, the process's /sys is used if it shows this very device.
    pub fn open(name: &str, netns: Option<&Path>) -> io::Result<NapiThreading> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad device name",
            ));
        }
        let attr = format!("/sys/class/net/{name}/threaded");
        let own_mount = {
            let attr = attr.clone();
            Self::in_own_sysfs(netns, move || {
                OpenOptions::new().read(true).write(true).open(&attr)
            })
        };
        let file = match own_mount {
            Ok(f) => f,
            Err(e) if netns.is_none() && Self::sysfs_shows(name) => {
                tracing::debug!(
                    "NAPI switch through the process's /sys ({e} with a sysfs of its own)"
                );
                OpenOptions::new().read(true).write(true).open(&attr)?
            }
            Err(e) => return Err(e),
        };
        let t = NapiThreading { file };
        t.set(false)?;
        Ok(t)
    }

    /// Whether `open` can reach the switches of the network namespace at `netns` at all (join
    /// it, mount a sysfs of its own), asked before a device is made: a device made with NAPI
    /// whose switch cannot be had is closed and made anew without it, and would vanish for a
    /// moment under the guest's side (a DHCP client started when it appeared would fail).
    pub fn probe(netns: &Path) -> io::Result<()> {
        Self::in_own_sysfs(Some(netns), || Ok(()))
    }

    /// Runs `f` on a short-lived thread that has joined the network namespace at `netns` (None:
    /// this thread's) and mounted a sysfs of its own over /sys, in a mount namespace of its own
    /// that goes away with the thread (files opened there keep working after).
    fn in_own_sysfs<T: Send + 'static>(
        netns: Option<&Path>,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let netns = netns.map(Path::to_owned);
        std::thread::spawn(move || -> io::Result<T> {
            if let Some(p) = netns {
                setns(File::open(p)?.as_fd())?;
            }
            // SAFETY: unshare only gives this (short-lived, spawned here) thread a mount
            // namespace of its own.
            check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
            // Nothing mounted here may propagate back to the host's mount namespace.
            // SAFETY: constant NUL-terminated strings; the flags only change propagation.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: constant NUL-terminated strings; a sysfs over /sys in this thread's
            // private mount namespace only.
            check(unsafe {
                libc::mount(
                    c"sysfs".as_ptr(),
                    c"/sys".as_ptr(),
                    c"sysfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                )
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("sysfs thread panicked")))
    }

    /// Whether /sys/class/net/NAME is this namespace's device NAME (same interface index).
    fn sysfs_shows(name: &str) -> bool {
        let Ok(c) = CString::new(name) else {
            return false;
        };
        // SAFETY: `c` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        let shown = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"));
        index != 0 && shown.is_ok_and(|s| s.trim().parse() == Ok(index))
    }

    /// Whether the polls run in kernel threads.
    pub fn get(&self) -> io::Result<bool> {
        let mut buf = [0u8; 16];
        let n = self.file.read_at(&mut buf, 0)?;
        Ok(buf[..n].first().is_some_and(|&b| b != b'0'))
    }

    /// Polls in kernel threads (`true`) or in softirq context (`false`).
    pub fn set(&self, threaded: bool) -> io::Result<()> {
        self.file
            .write_at(if threaded { b"1" } else { b"0" }, 0)
            .map(|_| ())
    }
}

/// Resolves `--netns`: a path, a PID (its /proc/PID/ns/net), or a name made by `ip netns add`.
pub fn netns_path(spec: &str) -> PathBuf {
    ns_path(spec, "net").unwrap_or_else(|| PathBuf::from(format!("/run/netns/{spec}")))
}

/// Resolves `--userns`: a path, or a PID (its /proc/PID/ns/user).
pub fn userns_path(spec: &str) -> PathBuf {
    ns_path(spec, "user").unwrap_or_else(|| PathBuf::from(spec))
}

/// The network namespace of the process `--userns` names (by PID or as /proc/PID/ns/user), for
/// `--userns` without `--netns`; None where it names no process.
pub fn userns_netns(spec: &str) -> Option<PathBuf> {
    let path = userns_path(spec);
    let pid = path
        .to_str()?
        .strip_prefix("/proc/")?
        .strip_suffix("/ns/user")?;
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        .then(|| PathBuf::from(format!("/proc/{pid}/ns/net")))
}

/// A PID's namespace of `kind` (/proc/PID/ns/KIND), or a path; None for anything else.
fn ns_path(spec: &str, kind: &str) -> Option<PathBuf> {
    if spec.bytes().all(|b| b.is_ascii_digit()) && !spec.is_empty() {
        Some(PathBuf::from(format!("/proc/{spec}/ns/{kind}")))
    } else if spec.contains('/') {
        Some(PathBuf::from(spec))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::af_packet::{Direction, PacketSocket};

    #[test]
    fn netns_specs() {
        assert_eq!(netns_path("1234"), PathBuf::from("/proc/1234/ns/net"));
        assert_eq!(netns_path("guest"), PathBuf::from("/run/netns/guest"));
        assert_eq!(netns_path("/run/netns/x"), PathBuf::from("/run/netns/x"));
    }

    /// Every frame of a batch bigger than the ring reaches the device's kernel side, intact and
    /// in order, in one submission per ring-full.
    #[test]
    fn a_batch_reaches_the_device_in_order() {
        test_support::with_tap_and_capture("hnbatch0", false, |tap, capture| {
            let mut writer = TapWriter::new(&tap);
            let count = WRITE_RING_ENTRIES as usize + 44;
            let frames: Vec<Vec<u8>> = (0..count)
                .map(|i| test_support::frame(i as u32, 100 + i % 50))
                .collect();
            assert_eq!(writer.send_all(frames.iter().map(|f| f.as_slice())), 0);
            if writer.batched() {
                assert_eq!(writer.submissions(), 2);
            } else {
                assert_eq!(writer.submissions(), count as u64);
            }
            let got = capture(count);
            assert_eq!(got.len(), count);
            assert!(got == frames, "frames differ or were reordered");
        });
    }

    /// The queue a guest's frames wait in for hubnat holds a burst of 1,000 and more.
    #[test]
    fn the_device_queue_is_lengthened() {
        test_support::in_fresh_netns(|| {
            let tap = Tap::open_queues("hnqlen0", None, 2, QueueFlags::default())
                .expect("TAP in a fresh namespace")
                .remove(0);
            let mut req = IfReq::new("hnqlen0");
            tap.ifreq_ioctl(libc::SIOCGIFTXQLEN, &mut req).unwrap();
            // SAFETY: SIOCGIFTXQLEN filled `qlen`.
            assert_eq!(unsafe { req.data.qlen }, MIN_QUEUE_LEN);
            // A longer queue an operator chose stays as it is.
            req.data.qlen = 5000;
            tap.ifreq_ioctl(libc::SIOCSIFTXQLEN, &mut req).unwrap();
            tap.lengthen_queue();
            tap.ifreq_ioctl(libc::SIOCGIFTXQLEN, &mut req).unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { req.data.qlen }, 5000);
        });
    }

    /// A device hubnat made goes with its descriptors; one made persistent says so (hubnat
    /// then leaves no steering program on it).
    #[test]
    fn a_persistent_device_is_told_apart() {
        test_support::in_fresh_netns(|| {
            let flags = QueueFlags {
                napi: false,
                vnet_hdr: false,
            };
            let tap = Tap::open_queues("hnpers0", None, 1, flags)
                .expect("TAP in a fresh namespace")
                .remove(0);
            assert!(!tap.persistent());
            // SAFETY: TUNSETPERSIST takes its argument by value.
            assert_eq!(
                unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETPERSIST, 1) },
                0
            );
            assert!(tap.persistent());
            // SAFETY: as above; the device then goes with this descriptor.
            assert_eq!(
                unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETPERSIST, 0) },
                0
            );
        });
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(Tap::open("", None), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long", None),
            Err(TapError::BadName(_))
        ));
    }

    #[test]
    fn userns_specs() {
        assert_eq!(userns_path("1234"), PathBuf::from("/proc/1234/ns/user"));
        assert_eq!(userns_path("/run/user/ns"), PathBuf::from("/run/user/ns"));
        assert_eq!(
            userns_netns("1234"),
            Some(PathBuf::from("/proc/1234/ns/net"))
        );
        assert_eq!(
            userns_netns("/proc/77/ns/user"),
            Some(PathBuf::from("/proc/77/ns/net"))
        );
        assert_eq!(userns_netns("/run/user/ns"), None);
        assert_eq!(userns_netns("/proc/self/ns/user"), None);
    }

    #[test]
    fn namespaces_are_named_as_operators_give_them() {
        assert_eq!(ns_name(Path::new("/proc/1234/ns/user")), "of PID 1234");
        assert_eq!(ns_name(Path::new("/run/netns/g")), "at /run/netns/g");
        let e = TapError::EnterUserns {
            path: "/proc/1234/ns/user".into(),
            error: io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("cannot join the user namespace of PID 1234: ")
                && text.contains("as the user that made the namespace"),
            "{text}"
        );
    }

    /// The helper's failure to join comes back as the step that failed, with its errno
    /// (a file that is not a namespace: refused to anyone, so this runs unprivileged too).
    #[test]
    fn the_helper_reports_the_step_that_failed() {
        let not_a_namespace = Path::new("/proc/self/status");
        let own_net = Path::new("/proc/self/ns/net");
        match Tap::open_queues_in_namespaces(
            "hnfail0",
            None,
            1,
            QueueFlags::default(),
            Some(not_a_namespace),
            own_net,
        ) {
            Err(TapError::EnterUserns { path, error }) => {
                assert_eq!(path, not_a_namespace);
                assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("joined a file that is not a namespace"),
        }
        // Its own user namespace is not joined again: the next step is the one that fails.
        let own_user = Path::new("/proc/self/ns/user");
        match Tap::open_queues_in_namespaces(
            "hnfail0",
            None,
            1,
            QueueFlags::default(),
            Some(own_user),
            not_a_namespace,
        ) {
            Err(TapError::EnterNetns { path, error }) => {
                assert_eq!(path, not_a_namespace);
                assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("joined a file that is not a namespace"),
        }
        assert!(matches!(
            Tap::open_queues_in_namespaces(
                "hnfail0",
                None,
                1,
                QueueFlags::default(),
                Some(Path::new("/nonexistent/ns")),
                own_net
            ),
            Err(TapError::OpenUserns { .. })
        ));
    }

    /// A process in a user and network namespace of its own (a rootless container's), ended
    /// by PID when dropped.
    struct Container(std::process::Child);

    impl Container {
        /// None where `unshare` cannot make one here.
        fn start() -> Option<Container> {
            let child = std::process::Command::new("unshare")
                .args(["--user", "--map-root-user", "--net", "sleep", "60"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let c = Container(child);
            let pid = c.0.id();
            for _ in 0..250 {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                if comm.trim() == "sleep" {
                    return Some(c);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            None
        }

        fn ns(&self, kind: &str) -> PathBuf {
            PathBuf::from(format!("/proc/{}/ns/{kind}", self.0.id()))
        }
    }

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Through the helper, a multiqueue TAP with more queues than one message carries is made
    /// in a container's namespaces, with its MTU, up; every queue is a working descriptor of
    /// it there. Needs root (to open /dev/net/tun and watch the device); skipped without.
    #[test]
    fn a_tap_is_made_inside_a_containers_namespaces() {
        if !running_as_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let Some(container) = Container::start() else {
            eprintln!("skipped: no user namespaces here");
            return;
        };
        let queues = FDS_PER_MESSAGE + 6;
        let (user, net) = (container.ns("user"), container.ns("net"));
        let taps = Tap::open_queues_in_namespaces(
            "hnuser0",
            Some(1280),
            queues,
            QueueFlags::default(),
            Some(&user),
            &net,
        )
        .expect("TAP in the container's namespaces");
        assert_eq!(taps.len(), queues);
        let mut raw: Vec<RawFd> = taps.iter().map(|t| t.as_raw_fd()).collect();
        raw.sort_unstable();
        raw.dedup();
        assert_eq!(raw.len(), queues, "descriptors repeat");
        for t in &taps {
            // SAFETY: F_GETFD on a descriptor `t` owns.
            let fd_flags = unsafe { libc::fcntl(t.as_raw_fd(), libc::F_GETFD) };
            assert!(fd_flags >= 0 && fd_flags & libc::FD_CLOEXEC != 0);
        }
        let capture =
            PacketSocket::open_in_netns("hnuser0", &net, std::time::Duration::from_secs(2))
                .expect("packet socket in the container's namespace");
        let frame = test_support::frame(7, 200);
        taps[queues - 1]
            .send(&frame)
            .expect("write to the last queue");
        let mut buf = vec![0u8; 2048];
        let got = loop {
            match capture.recv(&mut buf).expect("capture") {
                Some((n, Direction::Incoming)) if buf[12..14] == [0x88, 0xb5] => {
                    break buf[..n].to_vec()
                }
                Some(_) => {}
                None => panic!("the frame did not reach the container's device"),
            }
        };
        assert_eq!(got, frame);
        // MTU and state as the helper set them, in the container's namespace only.
        let show = std::process::Command::new("nsenter")
            .arg(format!("--net={}", net.display()))
            .args(["ip", "-o", "link", "show", "hnuser0"])
            .output()
            .expect("nsenter");
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(text.contains("mtu 1280") && text.contains(",UP"), "{text}");
        // SAFETY: a constant NUL-terminated name.
        assert_eq!(unsafe { libc::if_nametoindex(c"hnuser0".as_ptr()) }, 0);
    }

    /// slirp4netns's `--configure` through the helper, in a container's namespaces: the TAP's
    /// MAC, address and default route, and the loopback up. A second run finds the route made.
    #[test]
    fn the_guests_side_is_set_up_inside_a_containers_namespaces() {
        if !running_as_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let Some(container) = Container::start() else {
            eprintln!("skipped: no user namespaces here");
            return;
        };
        let (user, net) = (container.ns("user"), container.ns("net"));
        let _taps = Tap::open_queues_in_namespaces(
            "hnguest0",
            None,
            1,
            QueueFlags::default(),
            Some(&user),
            &net,
        )
        .expect("TAP in the container's namespaces");
        let setup = GuestSetup {
            address: Ipv4Addr::new(10, 0, 2, 100),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            mac: Some([0x02, 0, 0, 0, 0x2a, 0x01]),
        };
        for _ in 0..2 {
            Tap::configure_in_namespaces("hnguest0", Some(&user), Some(&net), &setup)
                .expect("the guest's side");
        }
        let inside = |args: &[&str]| {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={}", net.display()))
                .args(args)
                .output()
                .expect("nsenter");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let addr = inside(&["ip", "-o", "-4", "addr", "show", "hnguest0"]);
        assert!(addr.contains("inet 10.0.2.100/24"), "{addr}");
        let link = inside(&["ip", "-o", "link", "show", "hnguest0"]);
        assert!(link.contains("02:00:00:00:2a:01"), "{link}");
        let route = inside(&["ip", "-4", "route", "show", "default"]);
        assert!(route.contains("via 10.0.2.2 dev hnguest0"), "{route}");
        let lo = inside(&["ip", "-o", "link", "show", "lo"]);
        assert!(lo.contains(",UP"), "{lo}");
        // A device that is not there is named in the error.
        let e = Tap::configure_in_namespaces("hnnone0", Some(&user), Some(&net), &setup)
            .expect_err("no such device");
        assert!(e.to_string().contains("hnnone0"), "{e}");
    }

    fn running_as_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A duplicate of a TAP queue's descriptor, handed over as a launcher would, is a TAP
    /// again: same name, and frames written to it reach the device.
    #[test]
    fn a_tap_is_taken_from_an_inherited_descriptor() {
        test_support::with_tap_and_capture("hnfd0", false, |tap, capture| {
            let dup = tap.fd.try_clone().expect("dup");
            drop(tap);
            let tap = Tap::from_fd(dup).expect("a TAP from its descriptor");
            assert_eq!(tap.name(), "hnfd0");
            let frame = test_support::frame(3, 120);
            tap.send(&frame).expect("write");
            assert_eq!(capture(1), vec![frame]);
        });
    }

    #[test]
    fn descriptors_that_are_not_taps_are_refused() {
        let pipe = File::open("/proc/self/status").expect("a regular file");
        match Tap::from_fd(pipe.into()) {
            Err(TapError::NotTap { why, .. }) => assert!(why.contains("character device"), "{why}"),
            other => panic!("accepted a regular file: {:?}", other.map(|t| t.name)),
        }
        let null = File::open("/dev/null").expect("/dev/null");
        match Tap::from_fd(null.into()) {
            Err(TapError::NotTap { why, .. }) => assert!(why.contains("not a TUN/TAP"), "{why}"),
            other => panic!("accepted /dev/null: {:?}", other.map(|t| t.name)),
        }
        // /dev/net/tun before TUNSETIFF: no device yet (where this user may open it).
        if let Ok(tun) = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            match Tap::from_fd(tun.into()) {
                Err(TapError::NotTap { why, .. }) => assert!(why.contains("no device"), "{why}"),
                other => panic!("accepted a bare /dev/net/tun: {:?}", other.map(|t| t.name)),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::port::af_packet::{Direction, PacketSocket};

    /// A test frame numbered `i`, `len` bytes long (at least 18), to a unicast MAC that is not
    /// the device's, so the kernel drops it after its packet taps have seen it.
    pub fn frame(i: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 9, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5];
        f.extend_from_slice(&i.to_be_bytes());
        f.extend((18..len.max(18)).map(|b| (b as u32 + i) as u8));
        f
    }

    /// The number `frame` gave a frame.
    pub fn number(f: &[u8]) -> u32 {
        u32::from_be_bytes([f[14], f[15], f[16], f[17]])
    }

    /// Runs `test` on a thread of its own in a new network namespace, and waits for it; skipped
    /// (with a line saying so) without CAP_NET_ADMIN (CI runs as root).
    pub fn in_fresh_netns(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(|| {
            // SAFETY: unshare only moves this (test-owned) thread into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no CAP_NET_ADMIN ({})", io::Error::last_os_error());
                return;
            }
            test();
        })
        .join()
        .expect("test thread");
    }

    /// Runs `test` with a TAP named `name` (with NAPI if `napi`) in a network namespace of a
    /// thread of its own, and a
    /// capture of what is written to it: `capture(n)` returns the test frames seen, up to `n`,
    /// waiting at most 2 s for each. Needs CAP_NET_ADMIN (CI runs as root); skipped without.
    pub fn with_tap_and_capture(
        name: &'static str,
        napi: bool,
        test: impl FnOnce(Tap, &mut dyn FnMut(usize) -> Vec<Vec<u8>>) + Send + 'static,
    ) {
        in_fresh_netns(move || {
            let flags = QueueFlags {
                napi,
                vnet_hdr: false,
            };
            let tap = Tap::open_queues(name, None, 1, flags)
                .expect("TAP in a fresh namespace")
                .remove(0);
            let capture =
                PacketSocket::open(name, std::time::Duration::from_secs(2)).expect("packet socket");
            // Room for every test's frames: the capture is read only after they were written.
            crate::sock::driver::setsockopt_int(
                capture.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                8 << 20,
            )
            .expect("SO_RCVBUFFORCE");
            let mut read = |count: usize| {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while got.len() < count {
                    match capture.recv(&mut buf).expect("capture") {
                        Some((n, Direction::Incoming)) if buf[12..14] == [0x88, 0xb5] => {
                            got.push(buf[..n].to_vec())
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                got
            };
            test(tap, &mut read);
        });
    }
}
