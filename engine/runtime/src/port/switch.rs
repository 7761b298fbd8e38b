//! The segment's switch: every port hubnat serves (a TAP, QEMU sockets, interfaces joined by
//! AF_PACKET) is a port of one learning Ethernet switch, and the virtual host sits on it too.
//! Guests on different ports reach each other directly; frames for the virtual host, and
//! broadcasts, go to the engine.
//!
//! A segment with one port (the common case) does no switching at all: the runtime reads and
//! writes that port as before and only asks `several()` (one relaxed load) per batch. With more,
//! each frame read from a port is learned and forwarded here (`ingress`), and each frame the
//! engine emits is sent to the port its destination was learned on (`egress`), flooded where
//! it is a broadcast or not yet learned.
//!
//! The TAP that the runtime's threads write with their own batched writers (io_uring) is the
//! switch's *batched* port: `egress` leaves its frames in the thread's batch rather than sending
//! them one by one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::port::link::{Link, LinkStatus};
use hubnat_core::FastHashMap;

/// A port's number on the switch, never reused while hubnat runs. The first port is 0.
pub type PortId = u32;

/// The number of a segment's first TAP (the runtime adds it first): the port the threads
/// read and write themselves.
pub const FIRST_TAP: PortId = 0;

/// Ports one switch holds at most (each is polled by the control thread).
pub const MAX_PORTS: usize = 64;
/// Guest MAC addresses one port may have: a guest that sends from made-up source addresses
/// fills its own port's share and no more. Frames from an address beyond it are dropped (a
/// port cannot multiply itself into more guests, each with the per-guest shares of sessions
/// and memory, than this).
pub const MAX_MACS_PER_PORT: usize = 1024;
/// Learned addresses in all: every port's share fits, so no port can take another's.
pub const MAX_MACS: usize = MAX_PORTS * MAX_MACS_PER_PORT;
/// How long a learned address is kept without a frame from it (a Linux bridge's default).
pub const MAC_AGEING: Duration = Duration::from_secs(300);

/// Why a port could not be added or removed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwitchError {
    /// The switch holds `MAX_PORTS` ports.
    #[error("the segment has {MAX_PORTS} ports, the most it can have")]
    Full,
    /// No such port.
    #[error("no port {0}")]
    NoSuchPort(PortId),
    /// The port the threads write with their own writers cannot go while they hold it.
    #[error("port {0} is the segment's first TAP, read and written by every thread; it cannot be removed while hubnat runs")]
    Batched(PortId),
}

/// A port's frame counters (frames in: read from the port; out: sent to it).
#[derive(Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    /// Frames for this port it did not take (its `send` failed).
    tx_dropped: AtomicU64,
    /// Frames from this port the switch dropped: sent from the virtual host's own MAC, or to a
    /// guest on the same port (a switch does not send a frame back where it came from).
    rx_filtered: AtomicU64,
}

struct Port {
    id: PortId,
    link: Arc<dyn Link>,
    counters: Counters,
    /// Addresses learned on this port.
    macs: AtomicU32,
}

/// A row of `Switch::ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortView {
    /// Its number.
    pub id: PortId,
    /// Its kind (`tap`, `stream`, ...).
    pub kind: &'static str,
    /// Where it is.
    pub address: String,
    /// Frames and bytes read from it.
    pub rx_frames: u64,
    /// See `rx_frames`.
    pub rx_bytes: u64,
    /// Frames and bytes sent to it.
    pub tx_frames: u64,
    /// See `tx_frames`.
    pub tx_bytes: u64,
    /// Frames for it that it did not take.
    pub tx_dropped: u64,
    /// Frames from it the switch dropped (see `Counters::rx_filtered`).
    pub rx_filtered: u64,
    /// Guest addresses learned on it.
    pub macs: u32,
    /// The port's own view (connected, peer, framing errors).
    pub link: LinkStatus,
}

struct Learned {
    port: PortId,
    /// Seconds after the switch's start the address last sent a frame.
    seen: AtomicU32,
}

/// The segment's ports and the addresses learned on them. Shared by every thread.
pub struct Switch {
    vhost: [u8; 6],
    ports: RwLock<Vec<Arc<Port>>>,
    /// More than one port: frames need switching.
    several: AtomicBool,
    /// The port whose frames the threads write themselves (`u32::MAX`: none).
    batched: AtomicU32,
    next_id: AtomicU32,
    macs: RwLock<FastHashMap<[u8; 6], Learned>>,
    start: Instant,
    /// Addresses not learned because a table was full.
    mac_table_full: AtomicU64,
    /// Addresses that moved from one port to another.
    mac_moves: AtomicU64,
}

fn is_multicast(mac: &[u8]) -> bool {
    mac[0] & 1 == 1
}

impl Switch {
    /// A switch with no port yet; `vhost` is the virtual host's MAC (frames to it go to the
    /// engine; frames from it, sent by a guest, are dropped).
    pub fn new(vhost: [u8; 6]) -> Switch {
        Switch {
            vhost,
            ports: RwLock::new(Vec::new()),
            several: AtomicBool::new(false),
            batched: AtomicU32::new(u32::MAX),
            next_id: AtomicU32::new(0),
            macs: RwLock::new(FastHashMap::default()),
            start: Instant::now(),
            mac_table_full: AtomicU64::new(0),
            mac_moves: AtomicU64::new(0),
        }
    }

    /// Adds a port; it is switched at once.
    pub fn add(&self, link: Arc<dyn Link>) -> Result<PortId, SwitchError> {
        let mut ports = self.ports.write().unwrap_or_else(|p| p.into_inner());
        if ports.len() >= MAX_PORTS {
            return Err(SwitchError::Full);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        ports.push(Arc::new(Port {
            id,
            link,
            counters: Counters::default(),
            macs: AtomicU32::new(0),
        }));
        self.several.store(ports.len() > 1, Ordering::Release);
        Ok(id)
    }

    /// Makes `id` the port whose frames `egress` leaves to the caller's own writer.
    pub fn set_batched(&self, id: PortId) {
        self.batched.store(id, Ordering::Relaxed);
    }

    /// Removes a port and forgets the addresses learned on it. Frames being sent to it by
    /// another thread at this moment still reach it (the caller holds the last reference).
    pub fn remove(&self, id: PortId) -> Result<Arc<dyn Link>, SwitchError> {
        if self.batched.load(Ordering::Relaxed) == id {
            return Err(SwitchError::Batched(id));
        }
        let mut ports = self.ports.write().unwrap_or_else(|p| p.into_inner());
        let at = ports
            .iter()
            .position(|p| p.id == id)
            .ok_or(SwitchError::NoSuchPort(id))?;
        let port = ports.remove(at);
        self.several.store(ports.len() > 1, Ordering::Release);
        drop(ports);
        self.macs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, l| l.port != id);
        Ok(Arc::clone(&port.link))
    }

    /// The port `id`'s link.
    pub fn link(&self, id: PortId) -> Option<Arc<dyn Link>> {
        self.read_ports()
            .iter()
            .find(|p| p.id == id)
            .map(|p| Arc::clone(&p.link))
    }

    /// Whether the segment has more than one port (and frames need switching).
    pub fn several(&self) -> bool {
        self.several.load(Ordering::Acquire)
    }

    /// Counts frames read from `id` that did not pass through `ingress` (a single port's batch).
    pub fn count_rx(&self, id: PortId, frames: u64, bytes: u64) {
        if let Some(p) = self.read_ports().iter().find(|p| p.id == id) {
            p.counters.rx_frames.fetch_add(frames, Ordering::Relaxed);
            p.counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts frames written to the batched port by a thread's own writer (`failed` of them
    /// refused).
    pub fn count_batched_tx(&self, frames: u64, bytes: u64, failed: u64) {
        let id = self.batched.load(Ordering::Relaxed);
        if let Some(p) = self.read_ports().iter().find(|p| p.id == id) {
            p.counters.tx_frames.fetch_add(frames, Ordering::Relaxed);
            p.counters.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
            p.counters.tx_dropped.fetch_add(failed, Ordering::Relaxed);
        }
    }

    fn read_ports(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Port>>> {
        self.ports.read().unwrap_or_else(|p| p.into_inner())
    }

    fn now_secs(&self) -> u32 {
        self.start.elapsed().as_secs() as u32
    }

    /// A frame read from port `from`: learns its source, forwards it to the ports it is for,
    /// and says whether the engine (the virtual host) should have it too.
    pub fn ingress(&self, from: PortId, frame: &[u8]) -> bool {
        let ports = self.read_ports();
        let Some(port) = ports.iter().find(|p| p.id == from) else {
            return false;
        };
        port.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        port.counters
            .rx_bytes
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        if frame.len() < 14 {
            // The engine counts it as malformed.
            return true;
        }
        let (dst, src) = (&frame[0..6], &frame[6..12]);
        if src == self.vhost {
            port.counters.rx_filtered.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if !is_multicast(src) && !self.learn(src, port, &ports) {
            port.counters.rx_filtered.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if dst == self.vhost {
            return true;
        }
        if is_multicast(dst) {
            self.flood(&ports, Some(from), frame, true);
            return true;
        }
        match self.lookup(dst) {
            Some(to) if to == from => {
                port.counters.rx_filtered.fetch_add(1, Ordering::Relaxed);
            }
            Some(to) => match ports.iter().find(|p| p.id == to) {
                Some(p) => Self::send_to(p, frame),
                None => {
                    self.flood(&ports, Some(from), frame, true);
                }
            },
            None => {
                self.flood(&ports, Some(from), frame, true);
            }
        }
        false
    }

    /// A frame the engine emitted: sent to the port its destination is on (every port for a
    /// broadcast or an address not learned yet). True: one of its ports is the batched one,
    /// and the caller writes it there itself. A super-frame (`gso`: its segment size, see
    /// `FrameBatch::iter_gso`) reaches the other ports cut into the frames it stands for:
    /// only the batched TAP takes it whole.
    pub fn egress(&self, frame: &[u8], gso: u16) -> bool {
        if gso == 0 {
            return self.egress_one(frame);
        }
        let batched = self.batched.load(Ordering::Relaxed);
        let whole = frame.len() >= 14
            && !is_multicast(&frame[0..6])
            && self.lookup(&frame[0..6]) == Some(batched);
        if whole {
            return true;
        }
        let mut to_batched = false;
        // Not a super-frame after all: nothing is sent (the core never makes one of those).
        let _ = hubnat_core::wire::gso::cut(frame, gso, |f| to_batched |= self.egress_one(f));
        to_batched
    }

    fn egress_one(&self, frame: &[u8]) -> bool {
        let batched = self.batched.load(Ordering::Relaxed);
        let ports = self.read_ports();
        let to = if frame.len() < 14 || is_multicast(&frame[0..6]) {
            None
        } else {
            self.lookup(&frame[0..6])
        };
        match to {
            Some(to) if to == batched => true,
            Some(to) => {
                match ports.iter().find(|p| p.id == to) {
                    Some(p) => Self::send_to(p, frame),
                    None => return self.flood(&ports, None, frame, false),
                }
                false
            }
            None => self.flood(&ports, None, frame, false),
        }
    }

    /// Sends `frame` to every port but `except`. The batched port is sent to directly when
    /// `direct_to_batched` (a frame from another port, forwarded by whichever thread read it);
    /// otherwise the return says the caller should write it there.
    fn flood(
        &self,
        ports: &[Arc<Port>],
        except: Option<PortId>,
        frame: &[u8],
        direct_to_batched: bool,
    ) -> bool {
        let batched = self.batched.load(Ordering::Relaxed);
        let mut to_batched = false;
        for p in ports.iter().filter(|p| Some(p.id) != except) {
            if p.id == batched && !direct_to_batched {
                to_batched = true;
            } else {
                Self::send_to(p, frame);
            }
        }
        to_batched
    }

    fn send_to(p: &Port, frame: &[u8]) {
        if p.link.send(frame) {
            p.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            p.counters
                .tx_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
        } else {
            p.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lookup(&self, mac: &[u8]) -> Option<PortId> {
        let key: [u8; 6] = mac.try_into().ok()?;
        let macs = self.macs.read().unwrap_or_else(|p| p.into_inner());
        macs.get(&key).map(|l| l.port)
    }

    /// Learns that `mac` is on `port`; false when the port's share of the table is full and
    /// `mac` is not in it. `ports` is the caller's read of the port list (taken again here, a
    /// waiting writer would deadlock the two reads).
    fn learn(&self, mac: &[u8], port: &Port, ports: &[Arc<Port>]) -> bool {
        let Ok(key) = <[u8; 6]>::try_from(mac) else {
            return false;
        };
        let now = self.now_secs();
        {
            let macs = self.macs.read().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = macs.get(&key) {
                if l.port == port.id {
                    // Written only when the second changes: no shared cache line is dirtied
                    // per frame.
                    if l.seen.load(Ordering::Relaxed) != now {
                        l.seen.store(now, Ordering::Relaxed);
                    }
                    return true;
                }
            }
        }
        let mut macs = self.macs.write().unwrap_or_else(|p| p.into_inner());
        let moved = macs.get(&key).map(|l| l.port);
        if moved.is_none()
            && (macs.len() >= MAX_MACS
                || port.macs.load(Ordering::Relaxed) as usize >= MAX_MACS_PER_PORT)
        {
            self.mac_table_full.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if let Some(old) = moved {
            if old == port.id {
                return true;
            }
            self.mac_moves.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = ports.iter().find(|p| p.id == old) {
                p.macs.fetch_sub(1, Ordering::Relaxed);
            }
            tracing::debug!(
                "switch: {} moved from port {old} to port {}",
                fmt_mac(&key),
                port.id
            );
        }
        port.macs.fetch_add(1, Ordering::Relaxed);
        macs.insert(
            key,
            Learned {
                port: port.id,
                seen: AtomicU32::new(now),
            },
        );
        true
    }

    /// Forgets addresses silent for `MAC_AGEING` (the control thread calls it now and then).
    pub fn age(&self) {
        let now = self.now_secs();
        let limit = MAC_AGEING.as_secs() as u32;
        let ports = self.read_ports();
        let mut macs = self.macs.write().unwrap_or_else(|p| p.into_inner());
        macs.retain(|_, l| {
            let keep = now.saturating_sub(l.seen.load(Ordering::Relaxed)) < limit;
            if !keep {
                if let Some(p) = ports.iter().find(|p| p.id == l.port) {
                    p.macs.fetch_sub(1, Ordering::Relaxed);
                }
            }
            keep
        });
    }

    /// Every port with its counters.
    pub fn ports(&self) -> Vec<PortView> {
        self.read_ports()
            .iter()
            .map(|p| {
                let c = &p.counters;
                PortView {
                    id: p.id,
                    kind: p.link.kind(),
                    address: p.link.address(),
                    rx_frames: c.rx_frames.load(Ordering::Relaxed),
                    rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
                    tx_frames: c.tx_frames.load(Ordering::Relaxed),
                    tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
                    tx_dropped: c.tx_dropped.load(Ordering::Relaxed),
                    rx_filtered: c.rx_filtered.load(Ordering::Relaxed),
                    macs: p.macs.load(Ordering::Relaxed),
                    link: p.link.status(),
                }
            })
            .collect()
    }

    /// Addresses learned now; addresses refused because a table was full; moves between ports.
    pub fn mac_stats(&self) -> (usize, u64, u64) {
        let n = self.macs.read().unwrap_or_else(|p| p.into_inner()).len();
        (
            n,
            self.mac_table_full.load(Ordering::Relaxed),
            self.mac_moves.load(Ordering::Relaxed),
        )
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    let m = mac;
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;

    use mio::{Registry, Token};

    /// A port that records what it is sent.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<Vec<u8>>>,
        refuse: AtomicBool,
    }

    impl Recorder {
        fn take(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut self.sent.lock().unwrap())
        }
    }

    impl Link for Recorder {
        fn kind(&self) -> &'static str {
            "test"
        }
        fn address(&self) -> String {
            "recorder".into()
        }
        fn register(&self, _: &Registry, _: Token) -> io::Result<()> {
            Ok(())
        }
        fn deregister(&self, _: &Registry) -> io::Result<()> {
            Ok(())
        }
        fn recv(&self, _: &mut [u8]) -> io::Result<Option<usize>> {
            Ok(None)
        }
        fn send(&self, frame: &[u8]) -> bool {
            if self.refuse.load(Ordering::Relaxed) {
                return false;
            }
            self.sent.lock().unwrap().push(frame.to_vec());
            true
        }
        fn status(&self) -> LinkStatus {
            LinkStatus {
                connected: true,
                ..LinkStatus::default()
            }
        }
    }

    const VHOST: [u8; 6] = [0x5e, 0, 0, 0, 0, 1];
    const BCAST: [u8; 6] = [0xff; 6];

    fn mac(n: u8) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, n]
    }

    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00, tag]);
        f
    }

    fn switch_of(n: usize) -> (Switch, Vec<Arc<Recorder>>, Vec<PortId>) {
        let sw = Switch::new(VHOST);
        let recs: Vec<Arc<Recorder>> = (0..n).map(|_| Arc::new(Recorder::default())).collect();
        let ids = recs
            .iter()
            .map(|r| sw.add(Arc::clone(r) as Arc<dyn Link>).unwrap())
            .collect();
        (sw, recs, ids)
    }

    #[test]
    fn one_port_needs_no_switching() {
        let (sw, _, ids) = switch_of(1);
        assert!(!sw.several());
        assert_eq!(ids, vec![0]);
    }

    /// Unknown destinations and broadcasts are flooded to every other port; once both ends are
    /// learned, frames go only to their port; frames to the virtual host go to the engine only.
    #[test]
    fn learning_flooding_and_forwarding() {
        let (sw, recs, ids) = switch_of(3);
        assert!(sw.several());
        // A broadcast from guest 1 on port 0: flooded to 1 and 2, and the engine has it.
        let b = frame(BCAST, mac(1), 1);
        assert!(sw.ingress(ids[0], &b));
        assert!(recs[0].take().is_empty());
        assert_eq!(recs[1].take(), vec![b.clone()]);
        assert_eq!(recs[2].take(), vec![b]);
        // Guest 2 on port 1 answers guest 1: learned, so only port 0 gets it, not the engine.
        let r = frame(mac(1), mac(2), 2);
        assert!(!sw.ingress(ids[1], &r));
        assert_eq!(recs[0].take(), vec![r]);
        assert!(recs[2].take().is_empty());
        // To a guest nobody has heard of: flooded, not the engine's.
        let u = frame(mac(9), mac(1), 3);
        assert!(!sw.ingress(ids[0], &u));
        assert_eq!(recs[1].take().len(), 1);
        assert_eq!(recs[2].take().len(), 1);
        // To the virtual host: the engine only.
        let v = frame(VHOST, mac(2), 4);
        assert!(sw.ingress(ids[1], &v));
        assert!(recs.iter().all(|r| r.take().is_empty()));
        // The engine's reply to guest 2 goes to port 1 only.
        let e = frame(mac(2), VHOST, 5);
        assert!(!sw.egress(&e, 0));
        assert_eq!(recs[1].take(), vec![e]);
        assert!(recs[0].take().is_empty() && recs[2].take().is_empty());
        let view = sw.ports();
        assert_eq!(view[0].rx_frames, 2);
        assert_eq!(view[1].tx_frames, 3);
        assert_eq!(view[0].macs, 1);
        assert_eq!(view[1].macs, 1);
    }

    /// A frame to a guest on the port it came from is not sent back; a guest forging the
    /// virtual host's MAC is dropped; a port that refuses a frame counts it.
    #[test]
    fn filtering_and_refusals_are_counted() {
        let (sw, recs, ids) = switch_of(2);
        sw.ingress(ids[0], &frame(BCAST, mac(1), 0));
        sw.ingress(ids[0], &frame(BCAST, mac(3), 0));
        recs[1].take();
        assert!(!sw.ingress(ids[0], &frame(mac(3), mac(1), 1)));
        assert!(recs[1].take().is_empty());
        assert!(!sw.ingress(ids[1], &frame(BCAST, VHOST, 2)));
        assert!(recs[0].take().is_empty());
        let view = sw.ports();
        assert_eq!(view[0].rx_filtered, 1);
        assert_eq!(view[1].rx_filtered, 1);
        recs[0].refuse.store(true, Ordering::Relaxed);
        sw.egress(&frame(mac(1), VHOST, 3), 0);
        assert_eq!(sw.ports()[0].tx_dropped, 1);
    }

    /// The batched port's frames from the engine are left to the caller; forwarded frames
    /// from other ports are sent to it directly.
    #[test]
    fn the_batched_port() {
        let (sw, recs, ids) = switch_of(2);
        sw.set_batched(ids[0]);
        // Unknown and broadcast: flooded to port 1, and the caller writes port 0.
        assert!(sw.egress(&frame(BCAST, VHOST, 0), 0));
        assert_eq!(recs[1].take().len(), 1);
        assert!(recs[0].take().is_empty());
        sw.ingress(ids[0], &frame(BCAST, mac(1), 1));
        recs[1].take();
        assert!(sw.egress(&frame(mac(1), VHOST, 2), 0));
        assert!(recs[1].take().is_empty());
        // From port 1 to guest 1 behind the batched port: sent through the link.
        assert!(!sw.ingress(ids[1], &frame(mac(1), mac(2), 3)));
        assert_eq!(recs[0].take().len(), 1);
        assert_eq!(sw.remove(ids[0]).err(), Some(SwitchError::Batched(ids[0])));
    }

    /// A super-frame reaches the batched TAP whole (its writer hands the cut to the guest's
    /// side) and any other port cut into its datagrams, each a frame that port can carry.
    #[test]
    fn super_frames_are_cut_for_the_ports_that_take_none() {
        let (sw, recs, ids) = switch_of(2);
        sw.set_batched(ids[0]);
        sw.ingress(ids[0], &frame(BCAST, mac(1), 0));
        sw.ingress(ids[1], &frame(BCAST, mac(2), 0));
        recs.iter().for_each(|r| drop(r.take()));
        // 3 datagrams of 100 bytes as one UDP super-frame, its checksum field the pseudo sum.
        let super_frame = |dst: [u8; 6]| {
            let mut f = frame(dst, VHOST, 0);
            f.truncate(14);
            let mut ip = vec![
                0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
            ];
            ip[2..4].copy_from_slice(&(20u16 + 8 + 300).to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&[0, 53, 0x9c, 0x40]);
            f.extend_from_slice(&308u16.to_be_bytes());
            f.extend_from_slice(&[0, 0]);
            f.extend_from_slice(&[7u8; 300]);
            f
        };
        assert!(sw.egress(&super_frame(mac(1)), 100), "the TAP's: whole");
        assert!(recs[1].take().is_empty());
        assert!(!sw.egress(&super_frame(mac(2)), 100));
        let got = recs[1].take();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|f| f.len() == 14 + 20 + 8 + 100));
    }

    /// Removing a port forgets its addresses (their frames are flooded again); a moved guest
    /// is found on its new port; the per-port share of the table holds.
    #[test]
    fn removal_moves_and_bounds() {
        let (sw, recs, ids) = switch_of(3);
        sw.ingress(ids[2], &frame(BCAST, mac(7), 0));
        recs.iter().for_each(|r| drop(r.take()));
        sw.remove(ids[2]).unwrap();
        assert_eq!(
            sw.remove(ids[2]).err(),
            Some(SwitchError::NoSuchPort(ids[2]))
        );
        assert_eq!(sw.mac_stats().0, 0);
        assert!(!sw.ingress(ids[0], &frame(mac(7), mac(1), 1)));
        assert_eq!(recs[1].take().len(), 1, "flooded: no longer learned");
        // Guest 1 moves from port 0 to port 1.
        sw.ingress(ids[1], &frame(BCAST, mac(1), 2));
        recs[0].take();
        sw.egress(&frame(mac(1), VHOST, 3), 0);
        assert_eq!(recs[1].take().len(), 1);
        assert!(recs[0].take().is_empty());
        assert_eq!(sw.mac_stats().2, 1);
        let v = sw.ports();
        assert_eq!((v[0].macs, v[1].macs), (0, 1));
        // A guest that makes up source addresses fills its port's share and no more: beyond
        // it, its frames reach neither the engine nor the other ports.
        recs[1].take();
        for i in 0..(MAX_MACS_PER_PORT as u32 + 50) {
            let b = i.to_be_bytes();
            let m = [0x02, 1, b[0], b[1], b[2], b[3]];
            let to_engine = sw.ingress(ids[0], &frame(BCAST, m, 0));
            assert_eq!(to_engine, (i as usize) < MAX_MACS_PER_PORT, "{i}");
        }
        assert_eq!(sw.ports()[0].macs as usize, MAX_MACS_PER_PORT);
        assert_eq!(sw.mac_stats().1, 50);
        assert_eq!(recs[1].take().len(), MAX_MACS_PER_PORT);
        assert_eq!(sw.ports()[0].rx_filtered, 50);
        // Port 1's guests are still learned.
        sw.ingress(ids[1], &frame(BCAST, mac(2), 0));
        assert_eq!(sw.ports()[1].macs, 2);
    }

    #[test]
    fn the_number_of_ports_is_bounded() {
        let sw = Switch::new(VHOST);
        for _ in 0..MAX_PORTS {
            sw.add(Arc::new(Recorder::default())).unwrap();
        }
        assert_eq!(
            sw.add(Arc::new(Recorder::default())).err(),
            Some(SwitchError::Full)
        );
    }
}
