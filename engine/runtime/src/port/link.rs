//! `Link`: one port's frames, whatever carries them (a TAP, a QEMU socket, an interface joined
//! by AF_PACKET, an inherited descriptor). The switch (`port::switch`) holds every port of the
//! segment as a `Link`; a TAP that is the segment's only port keeps its own faster path (queues
//! read by the workers, writes batched in io_uring) and is a `Link` only for the switch.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::port::tap::Tap;

/// What a port reports about itself beside the switch's frame counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Whether a peer is there to take frames (a TAP or an interface: always; a stream socket:
    /// while a client is connected; a datagram socket: once its peer's address is known).
    pub connected: bool,
    /// The peer, where the port has one to name (a datagram peer's path, a stream client's).
    pub peer: Option<String>,
    /// Frames refused as malformed at the port's framing (a length over the MTU, a truncated
    /// frame, a datagram too short to be Ethernet).
    pub malformed: u64,
    /// Peers dropped for bad framing or a failed read or write (stream sockets).
    pub disconnects: u64,
    /// Peers that connected (stream sockets).
    pub connects: u64,
    /// Frames the port could not send (peer absent, its buffer full).
    pub send_failed: u64,
}

/// One port of the segment. Every method takes `&self`: a port is read by one thread (the
/// control thread's poll owns its token) but written by every thread that has frames for a
/// guest behind it, so a kind that needs state for writing keeps it behind its own lock.
pub trait Link: Send + Sync {
    /// The kind, as `hubnat port add` spells it: `tap`, `stream`, `dgram`, `packet`, `fd`.
    fn kind(&self) -> &'static str;

    /// Where the port is, for logs and `port list` (a device name, a socket's path).
    fn address(&self) -> String;

    /// Registers every descriptor the port reads from with `registry` under `token`,
    /// edge-triggered readable (and writable where the port buffers writes). A port whose
    /// descriptors change (a stream socket's next client) keeps a clone of the registry and
    /// registers the new one itself.
    fn register(&self, registry: &Registry, token: Token) -> io::Result<()>;

    /// Deregisters everything `register` (or the port itself since) registered.
    fn deregister(&self, registry: &Registry) -> io::Result<()>;

    /// The next frame, read into `buf` (at least the largest MTU plus 18 bytes). `Ok(None)`:
    /// nothing more until the port's token is ready again. It does whatever the port's
    /// descriptors need on the way (accepting a client, flushing buffered writes, dropping a
    /// peer that broke the framing), so the caller only calls it until `Ok(None)` after every
    /// event of its token. `Err`: the port is broken for good (the caller removes it).
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Sends one whole frame to the port's peer. False: not sent (no peer, or its buffer is
    /// full); the port counts it in `send_failed`, and the caller counts it as a drop.
    fn send(&self, frame: &[u8]) -> bool;

    /// The port's own view of its state.
    fn status(&self) -> LinkStatus;
}

/// A TAP device as a port of the switch: the segment's first TAP when other ports share the
/// segment (the threads still read and write it their own way; the switch sends it what other
/// ports forward), or a further TAP (`--port tap:NAME`), read by the control thread.
pub struct TapLink {
    tap: Arc<Tap>,
    send_failed: AtomicU64,
}

impl TapLink {
    /// `tap` as a port.
    pub fn new(tap: Arc<Tap>) -> TapLink {
        TapLink {
            tap,
            send_failed: AtomicU64::new(0),
        }
    }
}

impl Link for TapLink {
    fn kind(&self) -> &'static str {
        "tap"
    }

    fn address(&self) -> String {
        self.tap.name().to_owned()
    }

    fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.tap.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    fn deregister(&self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut SourceFd(&self.tap.as_raw_fd()))
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.tap.recv(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&self, frame: &[u8]) -> bool {
        // A TAP takes a frame whole or not at all (EIO while the guest's side is down).
        let sent = self.tap.send(frame).is_ok();
        if !sent {
            self.send_failed.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    fn status(&self) -> LinkStatus {
        LinkStatus {
            connected: true,
            send_failed: self.send_failed.load(Ordering::Relaxed),
            ..LinkStatus::default()
        }
    }
}
