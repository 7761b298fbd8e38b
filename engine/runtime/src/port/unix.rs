//! QEMU's socket transports as ports.
//!
//! - `StreamPort`: `-netdev stream`, a stream socket on which each frame follows its length as
//!   4 bytes big-endian. hubnat listens on a unix socket and serves one client (QEMU) at a time,
//!   taking the next one when it goes (QEMU restarted); or it is handed one connection (`--fd`),
//!   and the port ends with it.
//! - `DgramPort`: `-netdev dgram`, one frame per datagram. hubnat binds a unix socket and answers
//!   the latest sender (or a peer it was given); or it is handed a socket (`--fd`).
//!
//! Both are read by the control thread only and written by any thread.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::port::link::{Link, LinkStatus};

/// The shortest frame either framing carries: an Ethernet header.
const ETHERNET_HEADER: usize = 14;
/// A stream frame's length prefix.
const LENGTH_PREFIX: usize = 4;
/// The largest `max_frame` a port takes: above QEMU's own limit (64 KiB frames and some), and
/// small enough that a whole frame always fits in a stream port's pending writes.
pub const MAX_FRAME_LIMIT: usize = 128 * 1024;
/// Bytes a stream client has not taken yet that the port holds for it. Past this the port drops
/// frames, as a NIC with a full queue would, rather than let a stalled guest grow hubnat.
const PENDING_LIMIT: usize = 512 * 1024;
/// A stream port's receive buffer holds this many largest frames (at least `STREAM_RX_MIN`
/// bytes), so one read takes many small frames and a partial one always has room to complete.
const STREAM_RX_FRAMES: usize = 4;
/// See `STREAM_RX_FRAMES`.
const STREAM_RX_MIN: usize = 64 * 1024;
/// Datagrams one recvmmsg takes at most, within `DGRAM_BATCH_BYTES` of buffers.
const DGRAM_BATCH: usize = 32;
/// See `DGRAM_BATCH`.
const DGRAM_BATCH_BYTES: usize = 128 * 1024;
/// A `sockaddr_storage`: room for any socket's address.
const ADDR_MAX: usize = std::mem::size_of::<libc::sockaddr_storage>();

/// Every update made under these locks leaves the state whole, so a panic elsewhere while one
/// was held is no reason to stop the port.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `e`, saying which path it is about.
fn at_path(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn check_max_frame(max_frame: usize) -> io::Result<()> {
    if (ETHERNET_HEADER..=MAX_FRAME_LIMIT).contains(&max_frame) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a port's largest frame must be {ETHERNET_HEADER} to {MAX_FRAME_LIMIT} bytes, not {max_frame}"
            ),
        ))
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The port counters of `LinkStatus`.
#[derive(Default)]
struct Counters {
    malformed: AtomicU64,
    disconnects: AtomicU64,
    connects: AtomicU64,
    send_failed: AtomicU64,
}

impl Counters {
    fn status(&self, connected: bool, peer: Option<String>) -> LinkStatus {
        LinkStatus {
            connected,
            peer,
            malformed: self.malformed.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            send_failed: self.send_failed.load(Ordering::Relaxed),
        }
    }
}

/// Makes way for a socket at `path`. A socket file nobody is bound to is left over from an
/// earlier run (a socket file outlives its socket) and is removed; a live socket, or a file of
/// another kind, is someone else's and an error.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(at_path(path, "cannot inspect", e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    // A datagram connect never waits (a stream one may, on a busy listener), and it tells a live
    // socket of either type (connected, or the wrong type) from a dead one (refused).
    let probe = UnixDatagram::unbound()?;
    match probe.connect(path) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Ok(()) => return Err(in_use(path)),
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => return Err(in_use(path)),
        Err(e) => return Err(at_path(path, "cannot probe the socket at", e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(at_path(path, "cannot remove the stale socket", e)),
    }
}

fn in_use(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{} is a socket in use by another process", path.display()),
    )
}

/// The socket file a port bound, removed when the port goes, unless another socket has taken
/// the path since.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn of(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| at_path(path, "cannot stat", e))?;
        Ok(SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn socket_type(fd: RawFd) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals describing a c_int-sized buffer.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

fn type_name(t: libc::c_int) -> &'static str {
    match t {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        libc::SOCK_RAW => "raw",
        _ => "unknown",
    }
}

fn expect_socket_type(fd: RawFd, want: libc::c_int) -> io::Result<()> {
    let got = socket_type(fd)
        .map_err(|e| io::Error::new(e.kind(), format!("fd {fd} is not a socket: {e}")))?;
    if got == want {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fd {fd} is a {} socket, not a {} one",
                type_name(got),
                type_name(want)
            ),
        ))
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: F_SETFL with an int of flags only changes the descriptor's status flags.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// A port of an inherited socket (`--fd`): a stream or a datagram port, by the socket's type.
pub fn link_from_fd(fd: OwnedFd, max_frame: usize) -> io::Result<Arc<dyn Link>> {
    let raw = fd.as_raw_fd();
    match socket_type(raw)
        .map_err(|e| io::Error::new(e.kind(), format!("fd {raw} is not a socket: {e}")))?
    {
        libc::SOCK_STREAM => Ok(Arc::new(StreamPort::from_fd(fd, max_frame)?)),
        libc::SOCK_DGRAM => Ok(Arc::new(DgramPort::from_fd(fd, max_frame)?)),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fd {raw} is a {} socket: a port takes a stream or a datagram one",
                type_name(other)
            ),
        )),
    }
}

/// Deregisters `fd`, where it was registered at all.
fn deregister_fd(registry: &Registry, fd: RawFd) -> io::Result<()> {
    match registry.deregister(&mut SourceFd(&fd)) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Stream

/// Writes both slices with one sendmsg, as much of them as the socket takes now. MSG_NOSIGNAL:
/// a peer gone must be an error here, not a SIGPIPE for the whole process.
fn send_parts(fd: RawFd, parts: [&[u8]; 2]) -> io::Result<usize> {
    let mut iov = parts.map(|p| libc::iovec {
        iov_base: p.as_ptr().cast_mut().cast(),
        iov_len: p.len(),
    });
    // SAFETY: an all-zero msghdr is a valid empty message (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: `msg` points at `iov`, whose entries describe the slices of `parts`, live and
        // unchanged for the call; the kernel only reads them.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes the pending bytes, as far as the socket takes them now.
fn flush_pending(fd: RawFd, pending: &mut VecDeque<u8>) -> io::Result<()> {
    while !pending.is_empty() {
        let (a, b) = pending.as_slices();
        match send_parts(fd, [a, b]) {
            Ok(0) => return Ok(()),
            Ok(n) => drop(pending.drain(..n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends what the socket has not taken of a frame: all but its first `written` bytes
/// (counting its length prefix). The caller has checked that it fits under `PENDING_LIMIT`.
fn queue_rest(
    pending: &mut VecDeque<u8>,
    prefix: &[u8; LENGTH_PREFIX],
    frame: &[u8],
    written: usize,
) {
    if pending.capacity() < PENDING_LIMIT {
        // Once, and to the limit: the buffer never grows (or reallocates) after.
        pending.reserve_exact(PENDING_LIMIT - pending.len());
    }
    if written < LENGTH_PREFIX {
        pending.extend(&prefix[written..]);
        pending.extend(frame);
    } else {
        pending.extend(&frame[written - LENGTH_PREFIX..]);
    }
}

/// Who a stream client is, as far as the socket tells: its bound path, or its process.
fn describe_client(stream: &UnixStream) -> Option<String> {
    if let Some(path) = stream
        .peer_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned))
    {
        return Some(path.display().to_string());
    }
    // SAFETY: an all-zero ucred is a valid value of this plain C struct.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals describing a ucred-sized buffer.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (ret == 0 && cred.pid > 0).then(|| format!("pid {}", cred.pid))
}

/// Why a stream client was let go.
enum Ending {
    /// It closed the connection between frames.
    Closed,
    /// It closed the connection with this many bytes of a frame sent.
    Truncated(usize),
    /// It sent this frame length.
    BadLength(usize),
    /// Reading failed.
    ReadFailed(io::Error),
    /// Writing failed (the error is kept with the write side).
    WriteFailed,
}

/// A stream port's read side: the control thread's.
struct StreamRx {
    client: Option<Arc<UnixStream>>,
    /// Bytes read and not yet returned as frames: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// An inherited connection ended: the port has nothing more to give.
    finished: bool,
}

/// A stream port's write side, shared by every sending thread.
struct StreamTx {
    client: Option<Arc<UnixStream>>,
    peer: Option<String>,
    /// Bytes of whole frames the socket did not take yet; flushed before any new frame.
    pending: VecDeque<u8>,
    /// A write failed for good: frames are refused until `recv` lets the client go.
    broken: Option<io::Error>,
}

/// A QEMU `-netdev stream` port (see the module comment).
pub struct StreamPort {
    kind: &'static str,
    address: String,
    max_frame: usize,
    /// None: an inherited connection, after which there is none.
    listener: Option<UnixListener>,
    rx: Mutex<StreamRx>,
    tx: Mutex<StreamTx>,
    registration: Mutex<Option<(Registry, Token)>>,
    counters: Counters,
    /// Last: the file goes after the listener is closed.
    _file: Option<SocketFile>,
}

impl StreamPort {
    /// Listens on a unix stream socket at `path` for QEMU (`-netdev
    /// stream,server=off,addr.type=unix,addr.path=PATH`), replacing a stale socket file there.
    /// `max_frame`: the longest frame taken or sent, in bytes (the MTU plus the Ethernet
    /// header, and 4 more for a VLAN tag).
    pub fn listen(path: &Path, max_frame: usize) -> io::Result<StreamPort> {
        check_max_frame(max_frame)?;
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|e| at_path(path, "cannot bind", e))?;
        let file = SocketFile::of(path)?;
        listener.set_nonblocking(true)?;
        Ok(StreamPort::new(
            "stream",
            path.display().to_string(),
            max_frame,
            Some(listener),
            Some(file),
            None,
        ))
    }

    /// A port of a connected stream socket handed over by a launcher; when its peer goes,
    /// `recv` fails and the port is finished.
    pub fn from_fd(fd: OwnedFd, max_frame: usize) -> io::Result<StreamPort> {
        check_max_frame(max_frame)?;
        let raw = fd.as_raw_fd();
        expect_socket_type(raw, libc::SOCK_STREAM)?;
        set_nonblocking(raw)?;
        // Only read(2) and sendmsg(2) are used on it, so any stream socket (TCP too) will do.
        let stream = UnixStream::from(fd);
        Ok(StreamPort::new(
            "fd",
            format!("fd:{raw}"),
            max_frame,
            None,
            None,
            Some(stream),
        ))
    }

    fn new(
        kind: &'static str,
        address: String,
        max_frame: usize,
        listener: Option<UnixListener>,
        file: Option<SocketFile>,
        client: Option<UnixStream>,
    ) -> StreamPort {
        let rx_size = ((max_frame + LENGTH_PREFIX) * STREAM_RX_FRAMES).max(STREAM_RX_MIN);
        let peer = client.as_ref().and_then(describe_client);
        let client = client.map(Arc::new);
        let counters = Counters::default();
        if client.is_some() {
            bump(&counters.connects);
        }
        StreamPort {
            kind,
            address,
            max_frame,
            listener,
            rx: Mutex::new(StreamRx {
                client: client.clone(),
                buf: vec![0; rx_size].into_boxed_slice(),
                start: 0,
                end: 0,
                finished: false,
            }),
            tx: Mutex::new(StreamTx {
                client,
                peer,
                pending: VecDeque::new(),
                broken: None,
            }),
            registration: Mutex::new(None),
            counters,
            _file: file,
        }
    }

    /// The next whole frame of the client, into `buf`; `Ok(None)` once the socket has nothing
    /// more; `Err`: the client is to be let go.
    fn read_frame(&self, rx: &mut StreamRx, buf: &mut [u8]) -> Result<Option<usize>, Ending> {
        loop {
            let held = rx.end - rx.start;
            if held >= LENGTH_PREFIX {
                let s = rx.start;
                let len =
                    u32::from_be_bytes([rx.buf[s], rx.buf[s + 1], rx.buf[s + 2], rx.buf[s + 3]])
                        as usize;
                if !(ETHERNET_HEADER..=self.max_frame).contains(&len) {
                    bump(&self.counters.malformed);
                    return Err(Ending::BadLength(len));
                }
                if held >= LENGTH_PREFIX + len {
                    let frame = s + LENGTH_PREFIX..s + LENGTH_PREFIX + len;
                    rx.start = frame.end;
                    if rx.start == rx.end {
                        rx.start = 0;
                        rx.end = 0;
                    }
                    match buf.get_mut(..len) {
                        Some(out) => {
                            out.copy_from_slice(&rx.buf[frame]);
                            return Ok(Some(len));
                        }
                        None => {
                            // The caller's buffer is smaller than the frames the port takes;
                            // the framing is intact, so only this frame is lost.
                            bump(&self.counters.malformed);
                            continue;
                        }
                    }
                }
            }
            if rx.start > 0 {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
            }
            let Some(client) = rx.client.as_deref() else {
                return Ok(None);
            };
            // A partial frame is at most `max_frame + 4` bytes, well under the buffer's size,
            // so there is always room to read into (an empty read would look like EOF).
            debug_assert!(rx.end < rx.buf.len());
            let mut reader: &UnixStream = client;
            match reader.read(&mut rx.buf[rx.end..]) {
                Ok(0) if held > 0 => {
                    bump(&self.counters.malformed);
                    return Err(Ending::Truncated(held));
                }
                Ok(0) => return Err(Ending::Closed),
                Ok(n) => rx.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if held > 0 {
                        bump(&self.counters.malformed);
                    }
                    return Err(Ending::ReadFailed(e));
                }
            }
        }
    }

    /// Lets the client go. `Err` for an inherited connection: the port is finished.
    fn end_client(&self, rx: &mut StreamRx, ending: Ending) -> io::Result<()> {
        let client = rx.client.take();
        rx.start = 0;
        rx.end = 0;
        let write_error = {
            let mut tx = lock(&self.tx);
            tx.client = None;
            tx.peer = None;
            // Freed: a port without a client should not hold half a megabyte.
            tx.pending = VecDeque::new();
            tx.broken.take()
        };
        if let (Some(c), Some((registry, _))) = (&client, lock(&self.registration).as_ref()) {
            let _ = deregister_fd(registry, c.as_raw_fd());
        }
        drop(client);
        bump(&self.counters.disconnects);
        let (kind, address, max) = (self.kind, &self.address, self.max_frame);
        let reason = match ending {
            Ending::Closed => {
                tracing::info!("{kind} port {address}: the client closed the connection");
                "the client closed the connection".to_owned()
            }
            Ending::Truncated(held) => {
                let r = format!("the client closed the connection in the middle of a frame ({held} bytes of it came)");
                tracing::warn!("{kind} port {address}: {r}: disconnected");
                r
            }
            Ending::BadLength(len) => {
                let r = format!(
                    "the client sent a frame length of {len} bytes (frames are {ETHERNET_HEADER} to {max} bytes)"
                );
                tracing::warn!("{kind} port {address}: {r}: disconnected");
                r
            }
            Ending::ReadFailed(e) => {
                let r = format!("reading from the client failed: {e}");
                tracing::warn!("{kind} port {address}: {r}: disconnected");
                r
            }
            Ending::WriteFailed => {
                let r = match write_error {
                    Some(e) => format!("writing to the client failed: {e}"),
                    None => "writing to the client failed".to_owned(),
                };
                tracing::warn!("{kind} port {address}: {r}: disconnected");
                r
            }
        };
        if self.listener.is_none() {
            rx.finished = true;
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("{kind} port {address}: {reason}; the port is finished"),
            ));
        }
        Ok(())
    }

    /// Accepts waiting clients: the first becomes the port's client if it has none (true), the
    /// others are closed at once.
    fn accept(&self, rx: &mut StreamRx) -> io::Result<bool> {
        let Some(listener) = &self.listener else {
            return Ok(false);
        };
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                {
                    continue
                }
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(
                        "{} port {}: cannot accept a client now: {e}",
                        self.kind,
                        self.address
                    );
                    return Ok(false);
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{} port {}: accept failed: {e}", self.kind, self.address),
                    ))
                }
            };
            if rx.client.is_some() {
                tracing::warn!(
                    "{} port {}: refused a second client: one is connected already",
                    self.kind,
                    self.address
                );
                continue;
            }
            match self.adopt(rx, stream) {
                Ok(()) => return Ok(true),
                Err(e) => tracing::warn!(
                    "{} port {}: cannot take a client: {e}",
                    self.kind,
                    self.address
                ),
            }
        }
    }

    fn adopt(&self, rx: &mut StreamRx, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        if let Some((registry, token)) = lock(&self.registration).as_ref() {
            registry.register(
                &mut SourceFd(&stream.as_raw_fd()),
                *token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        let peer = describe_client(&stream);
        let client = Arc::new(stream);
        {
            let mut tx = lock(&self.tx);
            tx.client = Some(Arc::clone(&client));
            tx.peer.clone_from(&peer);
            tx.pending = VecDeque::new();
            tx.broken = None;
        }
        rx.client = Some(client);
        rx.start = 0;
        rx.end = 0;
        bump(&self.counters.connects);
        tracing::info!(
            "{} port {}: a client connected ({})",
            self.kind,
            self.address,
            peer.as_deref().unwrap_or("unnamed")
        );
        Ok(())
    }

    /// Writes what the client has not taken yet; false when the connection broke for writing.
    fn flush(&self) -> bool {
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        if tx.broken.is_some() {
            return false;
        }
        let Some(client) = &tx.client else {
            return true;
        };
        match flush_pending(client.as_raw_fd(), &mut tx.pending) {
            Ok(()) => true,
            Err(e) => {
                tx.broken = Some(e);
                false
            }
        }
    }

    fn write_frame(&self, frame: &[u8]) -> bool {
        let mut tx = lock(&self.tx);
        let tx = &mut *tx;
        if tx.broken.is_some() {
            return false;
        }
        let Some(client) = &tx.client else {
            return false;
        };
        let fd = client.as_raw_fd();
        // `frame` is at most `max_frame` long, which fits in the prefix.
        let prefix = (frame.len() as u32).to_be_bytes();
        let whole = LENGTH_PREFIX + frame.len();
        if !tx.pending.is_empty() {
            if let Err(e) = flush_pending(fd, &mut tx.pending) {
                tx.broken = Some(e);
                return false;
            }
            if !tx.pending.is_empty() {
                if PENDING_LIMIT - tx.pending.len() < whole {
                    return false;
                }
                queue_rest(&mut tx.pending, &prefix, frame, 0);
                return true;
            }
        }
        // Nothing pending: a whole frame fits, as `max_frame` is under `PENDING_LIMIT`.
        match send_parts(fd, [&prefix, frame]) {
            Ok(n) if n >= whole => true,
            Ok(n) => {
                queue_rest(&mut tx.pending, &prefix, frame, n);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                queue_rest(&mut tx.pending, &prefix, frame, 0);
                true
            }
            Err(e) => {
                tx.broken = Some(e);
                false
            }
        }
    }
}

impl Link for StreamPort {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        let rx = lock(&self.rx);
        let mut registration = lock(&self.registration);
        let own = registry.try_clone()?;
        if let Some(listener) = &self.listener {
            registry.register(
                &mut SourceFd(&listener.as_raw_fd()),
                token,
                Interest::READABLE,
            )?;
        }
        if let Some(client) = &rx.client {
            registry.register(
                &mut SourceFd(&client.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        *registration = Some((own, token));
        Ok(())
    }

    fn deregister(&self, registry: &Registry) -> io::Result<()> {
        let rx = lock(&self.rx);
        lock(&self.registration).take();
        let listener = match &self.listener {
            Some(l) => deregister_fd(registry, l.as_raw_fd()),
            None => Ok(()),
        };
        let client = match &rx.client {
            Some(c) => deregister_fd(registry, c.as_raw_fd()),
            None => Ok(()),
        };
        listener.and(client)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        if rx.finished {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "{} port {}: the connection has ended",
                    self.kind, self.address
                ),
            ));
        }
        // The event may be the socket taking more of what is pending.
        if rx.client.is_some() && !self.flush() {
            self.end_client(rx, Ending::WriteFailed)?;
        }
        loop {
            if rx.client.is_some() {
                match self.read_frame(rx, buf) {
                    Ok(Some(n)) => return Ok(Some(n)),
                    Ok(None) => {}
                    Err(ending) => self.end_client(rx, ending)?,
                }
            }
            if !self.accept(rx)? {
                return Ok(None);
            }
        }
    }

    fn send(&self, frame: &[u8]) -> bool {
        let sent =
            (ETHERNET_HEADER..=self.max_frame).contains(&frame.len()) && self.write_frame(frame);
        if !sent {
            bump(&self.counters.send_failed);
        }
        sent
    }

    fn status(&self) -> LinkStatus {
        let tx = lock(&self.tx);
        self.counters
            .status(tx.client.is_some() && tx.broken.is_none(), tx.peer.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Datagram

/// A socket address as the kernel gives and takes it (any family).
#[derive(Clone, Copy)]
struct SockAddr {
    bytes: [u8; ADDR_MAX],
    len: usize,
}

impl SockAddr {
    const EMPTY: SockAddr = SockAddr {
        bytes: [0; ADDR_MAX],
        len: 0,
    };

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len.min(ADDR_MAX)]
    }

    /// The address of a unix socket bound at `path`.
    fn unix(path: &Path) -> io::Result<SockAddr> {
        let name = path.as_os_str().as_bytes();
        // sun_path holds the path and its NUL.
        let room =
            std::mem::size_of::<libc::sockaddr_un>() - std::mem::size_of::<libc::sa_family_t>();
        if name.is_empty() || name.len() >= room || name.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: a unix socket path must be 1 to {} bytes without NUL",
                    path.display(),
                    room - 1
                ),
            ));
        }
        let mut addr = SockAddr::EMPTY;
        addr.bytes[..2].copy_from_slice(&(libc::AF_UNIX as libc::sa_family_t).to_ne_bytes());
        addr.bytes[2..2 + name.len()].copy_from_slice(name);
        addr.len = 2 + name.len() + 1;
        Ok(addr)
    }

    /// Whether nothing can be sent to it: a unix socket that was never bound.
    fn is_unnamed(&self) -> bool {
        self.len <= std::mem::size_of::<libc::sa_family_t>()
    }
}

impl PartialEq for SockAddr {
    fn eq(&self, other: &SockAddr) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for SockAddr {}

impl fmt::Display for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.as_bytes();
        if self.is_unnamed() {
            return f.write_str("(unnamed)");
        }
        let port = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
        match libc::c_int::from(u16::from_ne_bytes([b[0], b[1]])) {
            libc::AF_UNIX => {
                let path = &b[2..];
                if path[0] == 0 {
                    write!(f, "@{}", String::from_utf8_lossy(&path[1..]))
                } else {
                    let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                    f.write_str(&String::from_utf8_lossy(&path[..end]))
                }
            }
            libc::AF_INET if b.len() >= 8 => {
                let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
                write!(f, "{}", SocketAddrV4::new(ip, port(2)))
            }
            libc::AF_INET6 if b.len() >= 24 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&b[8..24]);
                let scope = match b.get(24..28) {
                    Some(s) => u32::from_ne_bytes([s[0], s[1], s[2], s[3]]),
                    None => 0,
                };
                write!(
                    f,
                    "{}",
                    SocketAddrV6::new(Ipv6Addr::from(ip), port(2), 0, scope)
                )
            }
            family => write!(f, "(an address of family {family})"),
        }
    }
}

fn peer_name(fd: RawFd) -> io::Result<SockAddr> {
    let mut addr = SockAddr::EMPTY;
    let mut len = ADDR_MAX as libc::socklen_t;
    // SAFETY: `addr.bytes` is a live buffer of `len` bytes; the kernel writes at most that.
    cvt(unsafe { libc::getpeername(fd, addr.bytes.as_mut_ptr().cast(), &mut len) })?;
    addr.len = len as usize;
    Ok(addr)
}

/// Datagrams a peer has not read yet count against the sender's send buffer, so its size is
/// the burst a slow peer absorbs before frames to it are dropped. The default (about 90 frames)
/// loses frames under TCP's bursts.
const DGRAM_SEND_BUFFER: libc::c_int = 2 << 20;

/// Raises the socket's send buffer to `DGRAM_SEND_BUFFER`: past the system's limit where hubnat
/// has CAP_NET_ADMIN, else up to that limit. Best effort: the default only drops more.
fn grow_send_buffer(fd: RawFd) {
    use crate::sock::driver::setsockopt_int;
    if setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        DGRAM_SEND_BUFFER,
    )
    .is_err()
    {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, DGRAM_SEND_BUFFER);
    }
}

/// Where a datagram port sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Nobody has sent yet.
    Unknown,
    /// The socket is connected: send(2) reaches its peer.
    Connected,
    /// The latest sender had no address and cannot be answered.
    Unnamed,
    At(SockAddr),
}

/// One datagram of a batch.
#[derive(Clone, Copy)]
struct Datagram {
    /// Its whole length, even where longer than its slot.
    len: usize,
    truncated: bool,
    from: SockAddr,
}

/// A datagram port's read side: the control thread's.
struct DgramRx {
    /// One slot of `slot` bytes per datagram of a batch.
    slots: Box<[u8]>,
    slot: usize,
    got: Box<[Datagram]>,
    /// `got[next..count]` are still to be returned.
    next: usize,
    count: usize,
}

/// A QEMU `-netdev dgram` port (see the module comment).
pub struct DgramPort {
    kind: &'static str,
    address: String,
    max_frame: usize,
    fd: OwnedFd,
    peer: Mutex<Peer>,
    /// The peer was given or the socket is connected: senders do not change it.
    fixed_peer: bool,
    /// A connected socket's peer, for `status`.
    connected_peer: Option<String>,
    rx: Mutex<DgramRx>,
    counters: Counters,
    /// Whether an unanswerable sender was logged (it is, once).
    unnamed_logged: AtomicBool,
    /// The peer's socket refused us once (its file's permissions); said once.
    denied_logged: AtomicBool,
    _file: Option<SocketFile>,
}

impl DgramPort {
    /// Binds a unix datagram socket at `path` (replacing a stale socket file there) for QEMU
    /// (`-netdev dgram,local.type=unix,local.path=QEMU_PATH,remote.type=unix,remote.path=PATH`).
    /// Frames go to `peer` when given, else to whoever sent the latest frame. `max_frame`: as
    /// for `StreamPort::listen`.
    pub fn bind(path: &Path, peer: Option<&Path>, max_frame: usize) -> io::Result<DgramPort> {
        check_max_frame(max_frame)?;
        let peer = peer.map(SockAddr::unix).transpose()?;
        clear_stale_socket(path)?;
        let socket = UnixDatagram::bind(path).map_err(|e| at_path(path, "cannot bind", e))?;
        let file = SocketFile::of(path)?;
        socket.set_nonblocking(true)?;
        Ok(DgramPort::new(
            "dgram",
            path.display().to_string(),
            max_frame,
            OwnedFd::from(socket),
            peer.map_or(Peer::Unknown, Peer::At),
            peer.is_some(),
            None,
            Some(file),
        ))
    }

    /// A port of an inherited datagram socket (of any family): a connected one sends to its
    /// peer, an unconnected one to whoever sent the latest frame.
    pub fn from_fd(fd: OwnedFd, max_frame: usize) -> io::Result<DgramPort> {
        check_max_frame(max_frame)?;
        let raw = fd.as_raw_fd();
        expect_socket_type(raw, libc::SOCK_DGRAM)?;
        set_nonblocking(raw)?;
        let (peer, connected_peer) = match peer_name(raw) {
            Ok(addr) => (Peer::Connected, Some(addr.to_string())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => (Peer::Unknown, None),
            Err(e) => return Err(io::Error::new(e.kind(), format!("fd {raw}: {e}"))),
        };
        Ok(DgramPort::new(
            "fd",
            format!("fd:{raw}"),
            max_frame,
            fd,
            peer,
            peer == Peer::Connected,
            connected_peer,
            None,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: &'static str,
        address: String,
        max_frame: usize,
        fd: OwnedFd,
        peer: Peer,
        fixed_peer: bool,
        connected_peer: Option<String>,
        file: Option<SocketFile>,
    ) -> DgramPort {
        grow_send_buffer(fd.as_raw_fd());
        let batch = (DGRAM_BATCH_BYTES / max_frame).clamp(1, DGRAM_BATCH);
        let empty = Datagram {
            len: 0,
            truncated: false,
            from: SockAddr::EMPTY,
        };
        DgramPort {
            kind,
            address,
            max_frame,
            fd,
            peer: Mutex::new(peer),
            fixed_peer,
            connected_peer,
            rx: Mutex::new(DgramRx {
                slots: vec![0; batch * max_frame].into_boxed_slice(),
                slot: max_frame,
                got: vec![empty; batch].into_boxed_slice(),
                next: 0,
                count: 0,
            }),
            counters: Counters::default(),
            unnamed_logged: AtomicBool::new(false),
            denied_logged: AtomicBool::new(false),
            _file: file,
        }
    }

    /// Receives what the socket holds, up to a batch; the count.
    fn receive_batch(&self, rx: &mut DgramRx) -> io::Result<usize> {
        let batch = rx.got.len();
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; DGRAM_BATCH];
        // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; DGRAM_BATCH] = unsafe { std::mem::zeroed() };
        let slots = rx.slots.chunks_exact_mut(rx.slot);
        for (((slot, d), iov), m) in slots.zip(rx.got.iter_mut()).zip(&mut iovs).zip(&mut msgs) {
            iov.iov_base = slot.as_mut_ptr().cast();
            iov.iov_len = slot.len();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = d.from.bytes.as_mut_ptr().cast();
            m.msg_hdr.msg_namelen = ADDR_MAX as libc::socklen_t;
        }
        // SAFETY: each of the first `batch` entries of `msgs` describes one slot of `rx.slots`
        // (through its iovec) and the address buffer of one entry of `rx.got`, all live and
        // not otherwise used during the call; the kernel writes at most their lengths.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        for (d, m) in rx.got.iter_mut().zip(&msgs).take(n) {
            // MSG_TRUNC asked: the length is the datagram's, even past the slot.
            d.len = m.msg_len as usize;
            d.truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || d.len > rx.slot;
            d.from.len = (m.msg_hdr.msg_namelen as usize).min(ADDR_MAX);
        }
        Ok(n)
    }

    /// Makes `from` the peer, unless the peer is fixed.
    fn learn(&self, from: &SockAddr) {
        if self.fixed_peer {
            return;
        }
        let now = if from.is_unnamed() {
            Peer::Unnamed
        } else {
            Peer::At(*from)
        };
        let before = {
            let mut peer = lock(&self.peer);
            if *peer == now {
                return;
            }
            std::mem::replace(&mut *peer, now)
        };
        match now {
            Peer::Unnamed => {
                if !self.unnamed_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{} port {}: frames come from a socket with no address, which cannot be \
                         answered (QEMU needs local.type=unix,local.path=...)",
                        self.kind,
                        self.address
                    );
                }
            }
            Peer::At(addr) if before == Peer::Unknown => {
                tracing::info!("{} port {}: the peer is {addr}", self.kind, self.address)
            }
            Peer::At(addr) => {
                tracing::debug!(
                    "{} port {}: the peer is now {addr}",
                    self.kind,
                    self.address
                )
            }
            Peer::Unknown | Peer::Connected => {}
        }
    }

    fn send_to_peer(&self, frame: &[u8]) -> bool {
        let peer = *lock(&self.peer);
        let (addr, addr_len) = match &peer {
            Peer::Unknown | Peer::Unnamed => return false,
            Peer::Connected => (std::ptr::null(), 0),
            Peer::At(a) => (a.bytes.as_ptr().cast(), a.len as libc::socklen_t),
        };
        loop {
            // SAFETY: `frame` is live for reads of its length; `addr` is null with a zero length
            // or points at `peer`'s address bytes (a live local) of `addr_len` bytes.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    addr,
                    addr_len,
                )
            };
            if n >= 0 {
                return true;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return false,
                io::ErrorKind::PermissionDenied => {
                    if !self.denied_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "{} port {}: may not send to the peer's socket ({e}): it must be \
                             writable by the user hubnat runs as (uid {})",
                            self.kind,
                            self.address,
                            // SAFETY: getuid cannot fail and touches no memory.
                            unsafe { libc::getuid() }
                        );
                    }
                    return false;
                }
                _ => {
                    tracing::debug!("{} port {}: send failed: {e}", self.kind, self.address);
                    return false;
                }
            }
        }
    }
}

impl Link for DgramPort {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.fd.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    fn deregister(&self, registry: &Registry) -> io::Result<()> {
        deregister_fd(registry, self.fd.as_raw_fd())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        loop {
            while rx.next < rx.count {
                let i = rx.next;
                rx.next += 1;
                let d = &rx.got[i];
                let len = d.len;
                if d.truncated || !(ETHERNET_HEADER..=self.max_frame).contains(&len) {
                    bump(&self.counters.malformed);
                    tracing::debug!(
                        "{} port {}: dropped a datagram of {len} bytes (frames are {ETHERNET_HEADER} to {} bytes)",
                        self.kind,
                        self.address,
                        self.max_frame
                    );
                    continue;
                }
                let Some(out) = buf.get_mut(..len) else {
                    bump(&self.counters.malformed);
                    continue;
                };
                let start = i * rx.slot;
                out.copy_from_slice(&rx.slots[start..start + len]);
                self.learn(&rx.got[i].from);
                return Ok(Some(len));
            }
            rx.next = 0;
            rx.count = 0;
            match self.receive_batch(rx) {
                Ok(0) => return Ok(None),
                Ok(n) => rx.count = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A connected inet socket reports its peer's ICMP errors here; reading them
                // clears them.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc::ECONNREFUSED
                                | libc::ECONNRESET
                                | libc::EHOSTUNREACH
                                | libc::ENETUNREACH
                                | libc::ENOBUFS
                                | libc::ENOMEM
                        )
                    ) =>
                {
                    tracing::debug!("{} port {}: receive: {e}", self.kind, self.address);
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{} port {}: receive failed: {e}", self.kind, self.address),
                    ))
                }
            }
        }
    }

    fn send(&self, frame: &[u8]) -> bool {
        let sent =
            (ETHERNET_HEADER..=self.max_frame).contains(&frame.len()) && self.send_to_peer(frame);
        if !sent {
            bump(&self.counters.send_failed);
        }
        sent
    }

    fn status(&self) -> LinkStatus {
        let peer = *lock(&self.peer);
        let (connected, name) = match peer {
            Peer::Unknown => (false, None),
            Peer::Connected => (true, self.connected_peer.clone()),
            Peer::Unnamed => (false, Some("(unnamed)".to_owned())),
            Peer::At(a) => (true, Some(a.to_string())),
        };
        self.counters.status(connected, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use mio::{Events, Poll};

    const TOKEN: Token = Token(7);
    const MAX: usize = 1518;
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A directory of its own per test, for socket files; removed after.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("hubnat-unix-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A test frame numbered `n`, `len` bytes long, its body derived from `n`.
    fn frame(n: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 9, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5];
        f.extend_from_slice(&n.to_be_bytes());
        f.extend((18..len.max(18)).map(|i| (i as u32).wrapping_mul(31).wrapping_add(n) as u8));
        f
    }

    /// The number of a frame made by `frame`, checking its body.
    fn number(f: &[u8]) -> u32 {
        let n = u32::from_be_bytes([f[14], f[15], f[16], f[17]]);
        assert_eq!(f, frame(n, f.len()), "frame {n} is damaged");
        n
    }

    /// The control thread's side: a poll with the port registered, as the runtime does it.
    struct Control<L: Link> {
        poll: Poll,
        port: Arc<L>,
        buf: Vec<u8>,
    }

    impl<L: Link> Control<L> {
        fn new(port: L) -> Control<L> {
            let poll = Poll::new().expect("poll");
            port.register(poll.registry(), TOKEN).expect("register");
            Control {
                poll,
                port: Arc::new(port),
                buf: vec![0; 65536],
            }
        }

        /// Waits up to `wait` for the port's events and reads every frame they bring.
        fn pump(&mut self, wait: Duration) -> io::Result<Vec<Vec<u8>>> {
            let mut events = Events::with_capacity(16);
            self.poll.poll(&mut events, Some(wait))?;
            let mut frames = Vec::new();
            for event in events.iter() {
                assert_eq!(event.token(), TOKEN);
                while let Some(n) = self.port.recv(&mut self.buf)? {
                    frames.push(self.buf[..n].to_vec());
                }
            }
            Ok(frames)
        }

        /// Pumps until `count` frames came.
        fn frames(&mut self, count: usize) -> Vec<Vec<u8>> {
            let deadline = Instant::now() + PATIENCE;
            let mut got = Vec::new();
            while got.len() < count {
                assert!(
                    Instant::now() < deadline,
                    "{} of {count} frames came",
                    got.len()
                );
                got.extend(self.pump(Duration::from_millis(20)).expect("recv"));
            }
            got
        }

        /// Pumps until the port's status satisfies `ready`; the frames that came meanwhile.
        fn until(&mut self, ready: impl Fn(&LinkStatus) -> bool) -> Vec<Vec<u8>> {
            let deadline = Instant::now() + PATIENCE;
            let mut got = Vec::new();
            while !ready(&self.port.status()) {
                assert!(
                    Instant::now() < deadline,
                    "status never came: {:?}",
                    self.port.status()
                );
                got.extend(self.pump(Duration::from_millis(20)).expect("recv"));
            }
            got
        }
    }

    /// A fake QEMU on a stream socket.
    fn client(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        s
    }

    fn write_framed(s: &mut UnixStream, f: &[u8]) {
        s.write_all(&(f.len() as u32).to_be_bytes()).expect("write");
        s.write_all(f).expect("write");
    }

    fn read_framed(s: &mut UnixStream) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut f = vec![0; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f)?;
        Ok(f)
    }

    /// Whether the port closed `s`: end of file (or a reset, when it left bytes unread).
    fn closed(s: &mut UnixStream) -> bool {
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == io::ErrorKind::ConnectionReset,
            }
        }
    }

    fn listen(dir: &TempDir) -> (PathBuf, Control<StreamPort>) {
        let path = dir.path("port.sock");
        let port = StreamPort::listen(&path, MAX).expect("listen");
        (path, Control::new(port))
    }

    #[test]
    fn stream_frames_go_both_ways() {
        let dir = TempDir::new("both");
        let (path, mut ctl) = listen(&dir);
        assert_eq!(ctl.port.kind(), "stream");
        assert_eq!(ctl.port.address(), path.display().to_string());
        assert!(!ctl.port.status().connected);
        assert!(!ctl.port.send(&frame(0, 60)), "no client yet");
        let mut qemu = client(&path);
        for (n, len) in [(1, 60), (2, MAX), (3, 14)] {
            write_framed(&mut qemu, &frame(n, len));
        }
        let got = ctl.frames(3);
        assert_eq!(got.iter().map(|f| number(f)).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(got[1].len(), MAX);
        let status = ctl.port.status();
        assert!(status.connected);
        assert_eq!(status.connects, 1);
        assert!(status.peer.is_some_and(|p| p.starts_with("pid ")));
        for n in 10..20 {
            assert!(ctl.port.send(&frame(n, 100 + n as usize)));
        }
        for n in 10..20 {
            assert_eq!(number(&read_framed(&mut qemu).expect("frame")), n);
        }
        assert_eq!(ctl.port.status().send_failed, 1);
        assert_eq!(ctl.port.status().malformed, 0);
    }

    #[test]
    fn frames_split_across_writes_arrive_whole() {
        let dir = TempDir::new("split");
        let (path, mut ctl) = listen(&dir);
        let mut qemu = client(&path);
        let mut bytes = Vec::new();
        for n in 0..20u32 {
            let f = frame(n, 14 + (n as usize * 97) % (MAX - 14));
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&f);
        }
        let mut got = Vec::new();
        // Pieces of every size from 1 byte, so that prefixes and bodies are cut everywhere.
        let mut at = 0;
        let mut piece = 1;
        while at < bytes.len() {
            let end = (at + piece).min(bytes.len());
            qemu.write_all(&bytes[at..end]).expect("write");
            at = end;
            piece = piece % 700 + 13;
            got.extend(ctl.pump(Duration::from_millis(1)).expect("recv"));
        }
        got.extend(ctl.frames(20 - got.len()));
        assert_eq!(
            got.iter().map(|f| number(f)).collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>()
        );
        assert_eq!(ctl.port.status().malformed, 0);
    }

    #[test]
    fn a_bad_length_drops_the_client_and_the_next_is_served() {
        let dir = TempDir::new("badlen");
        let (path, mut ctl) = listen(&dir);
        for (i, bad) in [0u32, 13, MAX as u32 + 1, u32::MAX].into_iter().enumerate() {
            let mut qemu = client(&path);
            write_framed(&mut qemu, &frame(1, 60));
            qemu.write_all(&bad.to_be_bytes()).expect("write");
            qemu.write_all(&[0; 40]).expect("write");
            let got = ctl.until(|s| s.disconnects == i as u64 + 1);
            assert_eq!(got.len(), 1, "the good frame before the bad length");
            assert!(closed(&mut qemu));
            let status = ctl.port.status();
            assert_eq!(status.malformed, i as u64 + 1);
            assert!(!status.connected);
        }
        let mut qemu = client(&path);
        write_framed(&mut qemu, &frame(9, 64));
        assert_eq!(number(&ctl.frames(1)[0]), 9);
        assert!(ctl.port.send(&frame(10, 64)));
        assert_eq!(number(&read_framed(&mut qemu).expect("frame")), 10);
        assert_eq!(ctl.port.status().connects, 5);
    }

    #[test]
    fn a_frame_cut_by_the_end_of_the_connection_is_malformed() {
        let dir = TempDir::new("trunc");
        let (path, mut ctl) = listen(&dir);
        let mut qemu = client(&path);
        write_framed(&mut qemu, &frame(1, 60));
        qemu.write_all(&100u32.to_be_bytes()).expect("write");
        qemu.write_all(&frame(2, 100)[..50]).expect("write");
        drop(qemu);
        let got = ctl.until(|s| s.disconnects == 1);
        assert_eq!(got.len(), 1);
        assert_eq!(ctl.port.status().malformed, 1);
        // A clean end is no error.
        let mut qemu = client(&path);
        write_framed(&mut qemu, &frame(3, 60));
        drop(qemu);
        let got = ctl.until(|s| s.disconnects == 2);
        assert_eq!(got.len(), 1);
        assert_eq!(ctl.port.status().malformed, 1);
    }

    #[test]
    fn a_second_client_is_refused_while_the_first_goes_on() {
        let dir = TempDir::new("second");
        let (path, mut ctl) = listen(&dir);
        let mut first = client(&path);
        ctl.until(|s| s.connected);
        let mut second = client(&path);
        write_framed(&mut first, &frame(1, 60));
        assert_eq!(number(&ctl.frames(1)[0]), 1);
        // The second is closed once the port sees it.
        let _ = second.write_all(&60u32.to_be_bytes());
        ctl.pump(Duration::from_millis(50)).expect("recv");
        assert!(closed(&mut second));
        write_framed(&mut first, &frame(2, 60));
        assert_eq!(number(&ctl.frames(1)[0]), 2);
        assert!(ctl.port.send(&frame(3, 60)));
        assert_eq!(number(&read_framed(&mut first).expect("frame")), 3);
        let status = ctl.port.status();
        assert_eq!((status.connects, status.disconnects), (1, 0));
    }

    #[test]
    fn a_restarted_client_is_served() {
        let dir = TempDir::new("reconnect");
        let (path, mut ctl) = listen(&dir);
        for round in 0..3u32 {
            let mut qemu = client(&path);
            write_framed(&mut qemu, &frame(round, 60));
            assert_eq!(number(&ctl.frames(1)[0]), round);
            assert!(ctl.port.send(&frame(round + 100, 80)));
            assert_eq!(number(&read_framed(&mut qemu).expect("frame")), round + 100);
            drop(qemu);
            ctl.until(|s| !s.connected);
            assert!(!ctl.port.send(&frame(0, 60)));
        }
        let status = ctl.port.status();
        assert_eq!(
            (status.connects, status.disconnects, status.send_failed),
            (3, 3, 3)
        );
    }

    #[test]
    fn concurrent_sends_stay_whole_and_in_order() {
        const THREADS: u32 = 4;
        const EACH: u32 = 3000;
        let dir = TempDir::new("concurrent");
        let (path, mut ctl) = listen(&dir);
        let mut qemu = client(&path);
        ctl.until(|s| s.connected);
        let port = Arc::clone(&ctl.port);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Ok(f) = read_framed(&mut qemu) {
                got.push(number(&f));
            }
            got
        });
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let port = Arc::clone(&port);
                std::thread::spawn(move || {
                    let mut sent = Vec::new();
                    for i in 0..EACH {
                        let n = t << 24 | i;
                        if port.send(&frame(n, 14 + (i as usize * 37) % (MAX - 14))) {
                            sent.push(n);
                        }
                    }
                    sent
                })
            })
            .collect();
        // The control thread flushes what the workers left pending.
        while !senders.iter().all(|s| s.is_finished()) {
            ctl.pump(Duration::from_millis(5)).expect("recv");
        }
        let sent: Vec<Vec<u32>> = senders
            .into_iter()
            .map(|s| s.join().expect("sender"))
            .collect();
        let deadline = Instant::now() + PATIENCE;
        while !lock(&port.tx).pending.is_empty() {
            assert!(Instant::now() < deadline, "pending never drained");
            ctl.pump(Duration::from_millis(5)).expect("recv");
        }
        drop(ctl);
        // The last reference closes the connection: the reader sees the end.
        drop(port);
        let got = reader.join().expect("reader");
        let total: usize = sent.iter().map(Vec::len).sum();
        assert_eq!(got.len(), total);
        for (t, sent) in sent.iter().enumerate() {
            let mine: Vec<u32> = got
                .iter()
                .copied()
                .filter(|n| n >> 24 == t as u32)
                .collect();
            assert_eq!(&mine, sent, "thread {t}'s frames");
        }
    }

    #[test]
    fn pending_writes_are_bounded_and_drain() {
        let dir = TempDir::new("pending");
        let (path, mut ctl) = listen(&dir);
        let mut qemu = client(&path);
        ctl.until(|s| s.connected);
        // The client reads nothing: the socket fills, then the pending buffer.
        let mut accepted = Vec::new();
        let mut n = 0u32;
        while ctl.port.send(&frame(n, 1000)) {
            accepted.push(n);
            n += 1;
            assert!(n < 100_000, "sends never failed");
        }
        {
            let tx = lock(&ctl.port.tx);
            assert!(tx.pending.len() <= PENDING_LIMIT);
            assert!(
                tx.pending.len() > PENDING_LIMIT - 2000,
                "the buffer was used"
            );
            assert!(tx.pending.capacity() < 2 * PENDING_LIMIT);
        }
        for i in 0..10 {
            assert!(!ctl.port.send(&frame(n + i, 1000)));
        }
        assert_eq!(ctl.port.status().send_failed, 11);
        assert!(ctl.port.status().connected, "a slow client is not dropped");
        let expected = accepted.len();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Ok(f) = read_framed(&mut qemu) {
                got.push(number(&f));
            }
            got
        });
        let drain = |ctl: &mut Control<StreamPort>| {
            let deadline = Instant::now() + PATIENCE;
            while !lock(&ctl.port.tx).pending.is_empty() {
                assert!(Instant::now() < deadline, "pending never drained");
                ctl.pump(Duration::from_millis(5)).expect("recv");
            }
        };
        drain(&mut ctl);
        // Frames flow again.
        for i in 0..10 {
            assert!(ctl.port.send(&frame(1_000_000 + i, 1000)));
            accepted.push(1_000_000 + i);
        }
        drain(&mut ctl);
        drop(ctl);
        let got = reader.join().expect("reader");
        assert!(got.len() > expected);
        assert_eq!(got, accepted);
    }

    #[test]
    fn an_inherited_stream_ends_the_port_with_it() {
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        theirs.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut ctl = Control::new(StreamPort::from_fd(OwnedFd::from(ours), MAX).expect("port"));
        assert_eq!(ctl.port.kind(), "fd");
        assert!(ctl.port.address().starts_with("fd:"));
        assert!(ctl.port.status().connected);
        write_framed(&mut theirs, &frame(1, 60));
        assert_eq!(number(&ctl.frames(1)[0]), 1);
        assert!(ctl.port.send(&frame(2, 60)));
        assert_eq!(number(&read_framed(&mut theirs).expect("frame")), 2);
        drop(theirs);
        let deadline = Instant::now() + PATIENCE;
        let err = loop {
            assert!(Instant::now() < deadline, "the end never came");
            if let Err(e) = ctl.pump(Duration::from_millis(20)) {
                break e;
            }
        };
        assert!(err.to_string().contains("finished"), "{err}");
        assert!(ctl.port.recv(&mut [0; 2000]).is_err());
        assert!(!ctl.port.send(&frame(3, 60)));
        assert!(!ctl.port.status().connected);
        assert_eq!(ctl.port.status().disconnects, 1);
        let (a, _b) = UnixDatagram::pair().expect("pair");
        assert!(StreamPort::from_fd(OwnedFd::from(a), MAX).is_err());
    }

    #[test]
    fn socket_files_stale_live_and_foreign() {
        let dir = TempDir::new("files");
        let path = dir.path("s.sock");
        // Stale: bound and closed, the file stays.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let port = StreamPort::listen(&path, MAX).expect("a stale socket is replaced");
        // Live: refused, naming the path.
        let err = StreamPort::listen(&path, MAX).err().expect("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        let err = DgramPort::bind(&path, None, MAX).err().expect("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(port);
        assert!(!path.exists(), "the port removes its socket file");
        let live = UnixDatagram::bind(&path).expect("bind");
        assert!(
            StreamPort::listen(&path, MAX).is_err(),
            "a live datagram socket"
        );
        drop(live);
        let port = DgramPort::bind(&path, None, MAX).expect("a stale socket is replaced");
        drop(port);
        assert!(!path.exists());
        // Another kind of file is never removed.
        std::fs::write(&path, b"not a socket").expect("write");
        let err = StreamPort::listen(&path, MAX)
            .err()
            .expect("a regular file");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(path.exists());
        // A port leaves a socket file that replaced its own alone.
        let other = dir.path("other.sock");
        let port = StreamPort::listen(&other, MAX).expect("listen");
        std::fs::remove_file(&other).expect("remove");
        let _newer = UnixListener::bind(&other).expect("bind");
        drop(port);
        assert!(other.exists());
        assert!(StreamPort::listen(&dir.path("x"), 13).is_err());
        assert!(StreamPort::listen(&dir.path("x"), MAX_FRAME_LIMIT + 1).is_err());
    }

    fn qemu_dgram(dir: &TempDir, name: &str) -> (PathBuf, UnixDatagram) {
        let path = dir.path(name);
        let s = UnixDatagram::bind(&path).expect("bind");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        (path, s)
    }

    fn recv_dgram(s: &UnixDatagram) -> Vec<u8> {
        let mut buf = vec![0; 65536];
        let n = s.recv(&mut buf).expect("datagram");
        buf.truncate(n);
        buf
    }

    #[test]
    fn dgram_learns_its_peer_from_the_latest_sender() {
        let dir = TempDir::new("dlearn");
        let path = dir.path("port.sock");
        let mut ctl = Control::new(DgramPort::bind(&path, None, MAX).expect("bind"));
        assert_eq!(ctl.port.kind(), "dgram");
        assert!(!ctl.port.status().connected);
        assert!(!ctl.port.send(&frame(0, 60)), "no peer yet");
        let (a_path, a) = qemu_dgram(&dir, "a.sock");
        a.send_to(&frame(1, 60), &path).expect("send");
        assert_eq!(number(&ctl.frames(1)[0]), 1);
        let status = ctl.port.status();
        assert!(status.connected);
        assert_eq!(status.peer.as_deref(), Some(&*a_path.to_string_lossy()));
        assert!(ctl.port.send(&frame(2, MAX)));
        assert_eq!(number(&recv_dgram(&a)), 2);
        let (b_path, b) = qemu_dgram(&dir, "b.sock");
        b.send_to(&frame(3, 60), &path).expect("send");
        assert_eq!(number(&ctl.frames(1)[0]), 3);
        assert_eq!(
            ctl.port.status().peer.as_deref(),
            Some(&*b_path.to_string_lossy())
        );
        assert!(ctl.port.send(&frame(4, 60)));
        assert_eq!(number(&recv_dgram(&b)), 4);
        assert_eq!(ctl.port.status().send_failed, 1);
    }

    #[test]
    fn dgram_sends_to_a_given_peer_at_once() {
        let dir = TempDir::new("dgiven");
        let path = dir.path("port.sock");
        let (a_path, a) = qemu_dgram(&dir, "a.sock");
        let mut ctl = Control::new(DgramPort::bind(&path, Some(&a_path), MAX).expect("bind"));
        assert!(ctl.port.status().connected);
        assert!(ctl.port.send(&frame(1, 60)));
        assert_eq!(number(&recv_dgram(&a)), 1);
        // Another sender is heard but does not take the peer's place.
        let (_b_path, b) = qemu_dgram(&dir, "b.sock");
        b.send_to(&frame(2, 60), &path).expect("send");
        assert_eq!(number(&ctl.frames(1)[0]), 2);
        assert!(ctl.port.send(&frame(3, 60)));
        assert_eq!(number(&recv_dgram(&a)), 3);
        assert!(DgramPort::bind(&dir.path("x"), Some(&dir.path(&"p".repeat(200))), MAX).is_err());
    }

    #[test]
    fn dgram_drops_short_and_oversize_datagrams() {
        let dir = TempDir::new("dsize");
        let path = dir.path("port.sock");
        let mut ctl = Control::new(DgramPort::bind(&path, None, MAX).expect("bind"));
        let (a_path, a) = qemu_dgram(&dir, "a.sock");
        let (_b_path, b) = qemu_dgram(&dir, "b.sock");
        a.send_to(&frame(1, 60), &path).expect("send");
        b.send_to(&frame(2, MAX + 1), &path).expect("send");
        b.send_to(&frame(3, 9000), &path).expect("send");
        b.send_to(&[0; 13], &path).expect("send");
        b.send_to(&[], &path).expect("send");
        a.send_to(&frame(4, 14), &path).expect("send");
        let got = ctl.frames(2);
        assert_eq!(got.iter().map(|f| number(f)).collect::<Vec<_>>(), [1, 4]);
        ctl.until(|s| s.malformed == 4);
        // Bad datagrams do not make their sender the peer.
        assert_eq!(
            ctl.port.status().peer.as_deref(),
            Some(&*a_path.to_string_lossy())
        );
        assert!(!ctl.port.send(&frame(5, MAX + 1)));
        assert!(!ctl.port.send(&[0; 10]));
    }

    #[test]
    fn dgram_cannot_answer_an_unbound_sender() {
        let dir = TempDir::new("dunnamed");
        let path = dir.path("port.sock");
        let mut ctl = Control::new(DgramPort::bind(&path, None, MAX).expect("bind"));
        let anonymous = UnixDatagram::unbound().expect("socket");
        anonymous.send_to(&frame(1, 60), &path).expect("send");
        anonymous.send_to(&frame(2, 60), &path).expect("send");
        assert_eq!(ctl.frames(2).len(), 2);
        assert!(!ctl.port.send(&frame(3, 60)));
        let status = ctl.port.status();
        assert!(!status.connected);
        assert_eq!(status.send_failed, 1);
        assert!(ctl.port.unnamed_logged.load(Ordering::Relaxed));
        // A bound sender makes things right.
        let (_a_path, a) = qemu_dgram(&dir, "a.sock");
        a.send_to(&frame(4, 60), &path).expect("send");
        ctl.frames(1);
        assert!(ctl.port.send(&frame(5, 60)));
        assert_eq!(number(&recv_dgram(&a)), 5);
    }

    #[test]
    fn dgram_takes_bursts_in_batches_in_order() {
        const COUNT: u32 = 500;
        let dir = TempDir::new("dbatch");
        let path = dir.path("port.sock");
        let mut ctl = Control::new(DgramPort::bind(&path, None, MAX).expect("bind"));
        let (_a_path, a) = qemu_dgram(&dir, "a.sock");
        let sender = {
            let path = path.clone();
            std::thread::spawn(move || {
                for n in 0..COUNT {
                    // Blocks while the port's queue is full: nothing is lost.
                    a.send_to(&frame(n, 60 + n as usize % 1400), &path)
                        .expect("send");
                }
            })
        };
        let got = ctl.frames(COUNT as usize);
        sender.join().expect("sender");
        assert_eq!(
            got.iter().map(|f| number(f)).collect::<Vec<_>>(),
            (0..COUNT).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_inherited_connected_datagram_socket_talks_to_its_peer() {
        let (ours, theirs) = UnixDatagram::pair().expect("pair");
        theirs.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut ctl = Control::new(DgramPort::from_fd(OwnedFd::from(ours), MAX).expect("port"));
        assert_eq!(ctl.port.kind(), "fd");
        assert!(ctl.port.status().connected);
        theirs.send(&frame(1, 60)).expect("send");
        assert_eq!(number(&ctl.frames(1)[0]), 1);
        assert!(ctl.port.send(&frame(2, 60)));
        assert_eq!(number(&recv_dgram(&theirs)), 2);
        // Of the inet family too, unconnected: the peer is learned.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let port_addr = udp.local_addr().expect("addr");
        let mut ctl = Control::new(DgramPort::from_fd(OwnedFd::from(udp), MAX).expect("port"));
        assert!(!ctl.port.status().connected);
        let guest = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        guest.set_read_timeout(Some(PATIENCE)).expect("timeout");
        guest.send_to(&frame(3, 60), port_addr).expect("send");
        assert_eq!(number(&ctl.frames(1)[0]), 3);
        let status = ctl.port.status();
        assert_eq!(
            status.peer,
            Some(guest.local_addr().expect("addr").to_string())
        );
        assert!(ctl.port.send(&frame(4, 60)));
        let mut buf = [0; 2000];
        let n = guest.recv(&mut buf).expect("datagram");
        assert_eq!(number(&buf[..n]), 4);
        let (s, _t) = UnixStream::pair().expect("pair");
        assert!(DgramPort::from_fd(OwnedFd::from(s), MAX).is_err());
        assert!(
            link_from_fd(OwnedFd::from(UnixStream::pair().expect("pair").0), MAX)
                .is_ok_and(|l| l.kind() == "fd")
        );
    }
}
