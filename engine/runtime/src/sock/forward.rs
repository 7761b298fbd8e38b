//! The listeners of port forwards, on the control thread: a TCP listener, or a UDP socket, for
//! every port of every forward in the configuration. What they accept leaves here as an
//! `Inbound`: the control thread finds the guest and hands the connection to the thread that
//! owns its flow, which adopts the socket into its driver and opens the guest's side.
//!
//! UDP: the forward's socket (SO_REUSEPORT) receives a new client's first datagram; a socket of
//! the client's own is then bound to the same address and connected to the client, and the
//! kernel delivers that client's later datagrams to it (a connected socket is the better match),
//! so each client is a session with a socket of its own, on the thread that owns its flow.

use std::io;
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use hubnat_core::forward::{Forward, ForwardProto, GuestRef};
use hubnat_core::FastHashMap;

use crate::sock::driver::setsockopt_int;

/// Datagrams read from one forward's socket per readiness event (the rest wait for the next
/// turn of the loop, so one busy forward does not hold the control thread).
const DATAGRAMS_PER_TURN: usize = 64;
/// Connections accepted per readiness event.
const ACCEPTS_PER_TURN: usize = 64;
/// Largest datagram read from a client.
const MAX_DATAGRAM: usize = 65_535;

/// A connection or first datagram a forward received.
pub struct Inbound {
    /// The forward's id.
    pub forward: u32,
    /// Its client.
    pub client: SocketAddrV4,
    /// The host address and port it arrived at.
    pub listen: SocketAddrV4,
    /// The guest it is for, and the guest's port.
    pub guest: GuestRef,
    /// See `guest`.
    pub guest_port: u16,
    /// The host side.
    pub conn: InboundConn,
}

/// The host side of an `Inbound`.
pub enum InboundConn {
    /// An accepted connection.
    Tcp(TcpStream),
    /// A socket connected to the client (bound to the forward's address), and the datagram
    /// that came first.
    Udp(UdpSocket, Vec<u8>),
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listener {
    fn fd(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Udp(s) => s.as_raw_fd(),
        }
    }
}

struct Port {
    listener: Listener,
    token: Token,
    addr: SocketAddrV4,
    guest_port: u16,
}

struct Active {
    id: u32,
    fwd: Forward,
    ports: Vec<Port>,
    accepted: u64,
    refused: u64,
}

/// A forward as `forward list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardView {
    /// Its number, kept while it exists.
    pub id: u32,
    /// What it is.
    pub forward: Forward,
    /// Connections (TCP) or new clients (UDP) taken, and refused (no such guest now, limits).
    pub accepted: u64,
    /// See `accepted`.
    pub refused: u64,
}

/// Every forward's listeners.
pub struct Forwards {
    active: Vec<Active>,
    by_token: FastHashMap<usize, (u32, usize)>,
    next_id: u32,
    next_token: usize,
    first_token: usize,
    buf: Vec<u8>,
}

impl Forwards {
    /// No forwards yet; their tokens are numbered from `first_token`.
    pub fn new(first_token: usize) -> Forwards {
        Forwards {
            active: Vec::new(),
            by_token: FastHashMap::default(),
            next_id: 1,
            next_token: first_token,
            first_token,
            buf: Vec::new(),
        }
    }

    /// Whether `token` is one of the forwards' (including one just closed).
    pub fn owns(&self, token: usize) -> bool {
        token >= self.first_token && token < self.first_token + (1 << 22)
    }

    /// Makes the listeners what `wanted` says: new forwards are opened (all their ports, or
    /// none), forwards no longer wanted are closed, the others are kept as they are. Returns
    /// the ids of the forwards closed, and the forwards that could not be opened with why.
    pub fn sync(
        &mut self,
        wanted: &[Forward],
        registry: &Registry,
    ) -> (Vec<u32>, Vec<(Forward, io::Error)>) {
        let mut closed = Vec::new();
        let mut kept = Vec::new();
        for a in std::mem::take(&mut self.active) {
            if wanted.contains(&a.fwd) {
                kept.push(a);
            } else {
                for p in &a.ports {
                    let _ = registry.deregister(&mut SourceFd(&p.listener.fd()));
                    self.by_token.remove(&p.token.0);
                }
                tracing::info!("forward {} ({}) closed", a.id, a.fwd);
                closed.push(a.id);
            }
        }
        self.active = kept;
        let mut failed = Vec::new();
        for f in wanted {
            if self.active.iter().any(|a| a.fwd == *f) {
                continue;
            }
            match self.open(f, registry) {
                Ok(id) => tracing::info!("forward {id} ({f}) listening"),
                Err(e) => {
                    tracing::warn!("forward {f}: {e}");
                    failed.push((f.clone(), e));
                }
            }
        }
        (closed, failed)
    }

    fn open(&mut self, f: &Forward, registry: &Registry) -> io::Result<u32> {
        let id = self.next_id;
        let mut ports = Vec::new();
        for (addr, guest_port) in f.ports() {
            let listener = match f.proto {
                ForwardProto::Tcp => {
                    let l = TcpListener::bind(addr).map_err(|e| with_addr(e, "tcp", addr))?;
                    l.set_nonblocking(true)?;
                    Listener::Tcp(l)
                }
                ForwardProto::Udp => {
                    Listener::Udp(udp_socket(addr, None).map_err(|e| with_addr(e, "udp", addr))?)
                }
            };
            let token = Token(self.next_token);
            self.next_token += 1;
            ports.push(Port {
                listener,
                token,
                addr,
                guest_port,
            });
        }
        for (i, p) in ports.iter().enumerate() {
            if let Err(e) =
                registry.register(&mut SourceFd(&p.listener.fd()), p.token, Interest::READABLE)
            {
                for q in &ports[..i] {
                    let _ = registry.deregister(&mut SourceFd(&q.listener.fd()));
                }
                return Err(e);
            }
        }
        for (i, p) in ports.iter().enumerate() {
            self.by_token.insert(p.token.0, (id, i));
        }
        self.next_id += 1;
        self.active.push(Active {
            id,
            fwd: f.clone(),
            ports,
            accepted: 0,
            refused: 0,
        });
        Ok(id)
    }

    /// Takes what the listener of `token` has (a turn's worth), into `into`.
    pub fn ready(&mut self, token: usize, into: &mut Vec<Inbound>) {
        let Some(&(id, i)) = self.by_token.get(&token) else {
            return;
        };
        let Some(a) = self.active.iter_mut().find(|a| a.id == id) else {
            return;
        };
        let port = &a.ports[i];
        match &port.listener {
            Listener::Tcp(l) => {
                for _ in 0..ACCEPTS_PER_TURN {
                    match l.accept() {
                        Ok((stream, std::net::SocketAddr::V4(client))) => into.push(Inbound {
                            forward: id,
                            client,
                            listen: port.addr,
                            guest: a.fwd.guest.clone(),
                            guest_port: port.guest_port,
                            conn: InboundConn::Tcp(stream),
                        }),
                        Ok((stream, _)) => refuse_tcp(stream),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // Out of descriptors and the like: the connection waits in the
                            // backlog for the next turn.
                            tracing::debug!("forward {id}: accept: {e}");
                            break;
                        }
                    }
                }
            }
            Listener::Udp(s) => {
                self.buf.resize(MAX_DATAGRAM, 0);
                for _ in 0..DATAGRAMS_PER_TURN {
                    match s.recv_from(&mut self.buf) {
                        Ok((n, std::net::SocketAddr::V4(client))) => {
                            match udp_socket(port.addr, Some(client)) {
                                Ok(sock) => into.push(Inbound {
                                    forward: id,
                                    client,
                                    listen: port.addr,
                                    guest: a.fwd.guest.clone(),
                                    guest_port: port.guest_port,
                                    conn: InboundConn::Udp(sock, self.buf[..n].to_vec()),
                                }),
                                Err(e) => {
                                    a.refused += 1;
                                    tracing::debug!("forward {id}: a socket for {client}: {e}");
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::debug!("forward {id}: receive: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Whether forward `id` is (still) open.
    pub fn exists(&self, id: u32) -> bool {
        self.active.iter().any(|a| a.id == id)
    }

    /// Counts what became of an `Inbound` of forward `id`.
    pub fn count(&mut self, id: u32, accepted: bool) {
        if let Some(a) = self.active.iter_mut().find(|a| a.id == id) {
            if accepted {
                a.accepted += 1;
            } else {
                a.refused += 1;
            }
        }
    }

    /// Every forward, in the configuration's order.
    pub fn views(&self) -> Vec<ForwardView> {
        self.active
            .iter()
            .map(|a| ForwardView {
                id: a.id,
                forward: a.fwd.clone(),
                accepted: a.accepted,
                refused: a.refused,
            })
            .collect()
    }
}

fn with_addr(e: io::Error, proto: &str, addr: SocketAddrV4) -> io::Error {
    let hint = if e.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        " (a port below 1024 needs CAP_NET_BIND_SERVICE, which hubnat keeps only when its \
         configuration file has such a forward at start)"
    } else {
        ""
    };
    io::Error::new(
        e.kind(),
        format!("cannot listen on {proto} {addr}: {e}{hint}"),
    )
}

/// A UDP socket bound to `addr` beside the forward's own (SO_REUSEPORT), connected to `peer`
/// if given.
fn udp_socket(addr: SocketAddrV4, peer: Option<SocketAddrV4>) -> io::Result<UdpSocket> {
    // SAFETY: plain socket creation; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let sock = UdpSocket::from(fd);
    bind(&sock, addr)?;
    if let Some(p) = peer {
        sock.connect(p)?;
    }
    Ok(sock)
}

fn bind(sock: &UdpSocket, addr: SocketAddrV4) -> io::Result<()> {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in and its size is passed.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Closes an accepted connection with a reset (the client sees a refusal at once, not a hang).
pub fn refuse_tcp(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct and its size is passed; the kernel only reads it.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// An `Inbound` whose guest was found, on its way to the thread that owns its flow.
pub struct InboundJob {
    /// What the forward received.
    pub inbound: Inbound,
    /// The guest, as found now.
    pub target: hubnat_core::InboundTarget,
}

/// Opens `job`'s flow on the calling thread: its socket adopted into `sock`, its guest side
/// opened by `engine` (which refuses, and closes the socket, past the guest's limits).
pub fn open_inbound(
    job: InboundJob,
    now: hubnat_core::Instant,
    engine: &mut hubnat_core::Engine,
    sock: &mut crate::sock::driver::SockDriver,
    out: &mut hubnat_core::FrameBatch,
) {
    let Inbound {
        forward,
        client,
        conn,
        ..
    } = job.inbound;
    let opened = match conn {
        InboundConn::Tcp(stream) => sock
            .adopt_tcp(stream)
            .map(|id| engine.tcp_inbound(now, id, client, job.target, sock, out)),
        InboundConn::Udp(socket, payload) => sock
            .adopt_udp(socket)
            .map(|id| engine.udp_inbound(now, id, client, job.target, &payload, sock, out)),
    };
    match opened {
        Ok(Ok(())) => {}
        Ok(Err(why)) => tracing::debug!("forward {forward}: {client} refused: {why}"),
        Err(e) => tracing::warn!("forward {forward}: cannot take {client}'s socket: {e}"),
    }
}
