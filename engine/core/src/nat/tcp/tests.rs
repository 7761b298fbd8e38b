//! Segment-in / segment-out scripts driving the whole engine with a simulated sock side.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber, TcpTimestampRepr, ETHERNET_HEADER_LEN,
};

use super::conn::{TcpConn, DELAYED_ACK, MAX_BACKOFFS, TIME_WAIT};
use crate::config::{Config, Mac};
use crate::event::Event;
use crate::nat::{Direction, InboundRefused, InboundTarget};
use crate::output::FrameBatch;
use crate::sim::{ConnectOutcome, SimSockets};
use crate::sockio::{SockEvent, SockId};
use crate::stats::DropReason;
use crate::time::Instant;
use crate::Engine;

const HOST_MAC: Mac = Mac([0x00, 0xac, 1, 2, 3, 4]);
const GUEST_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x10]);
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);
const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GPORT: u16 = 40000;
const GISS: u32 = 1000;

/// A segment the engine sent to the guest, parsed.
#[derive(Debug, Clone)]
struct Got {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    syn: bool,
    fin: bool,
    rst: bool,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    mss: Option<u16>,
    ws: Option<u8>,
    sack_perm: bool,
    sack: Vec<(u32, u32)>,
    ts: Option<(u32, u32)>,
    payload: Vec<u8>,
}

impl Got {
    fn is_pure_ack(&self) -> bool {
        !self.syn && !self.fin && !self.rst && self.payload.is_empty() && self.ack.is_some()
    }
}

/// What the guest offers in its SYN.
#[derive(Clone, Copy)]
struct Opts {
    mss: Option<u16>,
    ws: Option<u8>,
    sack: bool,
    ts: bool,
    window: u16,
}

const ALL: Opts = Opts {
    mss: Some(1460),
    ws: Some(7),
    sack: true,
    ts: true,
    window: 65535,
};
const NONE: Opts = Opts {
    mss: None,
    ws: None,
    sack: false,
    ts: false,
    window: 65535,
};

/// A guest segment to build.
#[derive(Clone)]
struct S {
    dst: SocketAddrV4,
    sport: u16,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    opts: Option<Opts>,
    sack: [Option<(u32, u32)>; 3],
    ts: Option<(u32, u32)>,
    payload: Vec<u8>,
}

struct T {
    e: Engine,
    h: SimSockets,
    now: Instant,
    out: FrameBatch,
    /// The engine's ISN for the current connection (from its SYN-ACK).
    iss: u32,
    sock: SockId,
    dst: SocketAddrV4,
    /// The guest's port of the segments it sends.
    gport: u16,
}

fn host(f: impl FnOnce(&mut SimSockets)) -> SimSockets {
    let mut h = SimSockets::default();
    f(&mut h);
    h
}

fn cfg() -> Config {
    let mut c = Config::defaults();
    c.dns.upstream = vec!["127.0.0.1:5353".parse().unwrap()];
    c
}

impl T {
    fn new() -> T {
        T::with(cfg(), SimSockets::default())
    }

    fn with(c: Config, h: SimSockets) -> T {
        T {
            e: Engine::new(c, HOST_MAC, 7),
            h,
            now: Instant::from_secs(100),
            out: FrameBatch::new(),
            iss: 0,
            sock: 0,
            dst: SocketAddrV4::new(DST, 80),
            gport: GPORT,
        }
    }

    fn s(&self, control: TcpControl, seq: u32, ack: Option<u32>) -> S {
        S {
            dst: self.dst,
            sport: self.gport,
            control,
            seq,
            ack,
            window: 65535,
            opts: None,
            sack: [None; 3],
            ts: None,
            payload: Vec::new(),
        }
    }

    /// The guest's segment at byte `off` of its stream (after the handshake), acking `ack_off`
    /// bytes of ours.
    fn data(&self, off: usize, payload: &[u8]) -> S {
        let mut s = self.s(TcpControl::Psh, GISS + 1 + off as u32, Some(self.iss + 1));
        s.payload = payload.to_vec();
        s
    }

    fn ack(&self, ack_off: usize) -> S {
        self.s(
            TcpControl::None,
            GISS + 1,
            Some(self.iss + 1 + ack_off as u32),
        )
    }

    fn frame(&self, s: &S) -> Vec<u8> {
        let mut tcp = TcpRepr {
            src_port: s.sport,
            dst_port: s.dst.port(),
            control: s.control,
            seq_number: TcpSeqNumber(s.seq as i32),
            ack_number: s.ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: s.window,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: s.sack,
            timestamp: s.ts.map(|(v, e)| TcpTimestampRepr::new(v, e)),
            payload: &s.payload,
        };
        if let Some(o) = s.opts {
            tcp.max_seg_size = o.mss;
            tcp.window_scale = o.ws;
            tcp.sack_permitted = o.sack;
            tcp.timestamp = o.ts.then(|| TcpTimestampRepr::new(5000, 0));
            tcp.window_len = o.window;
        }
        let ip = Ipv4Repr {
            src_addr: GUEST,
            dst_addr: *s.dst.ip(),
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: crate::wire::eth(GUEST_MAC),
            dst_addr: crate::wire::eth(HOST_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; ETHERNET_HEADER_LEN + ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &GUEST.into(),
            &(*s.dst.ip()).into(),
            &caps,
        );
        buf
    }

    /// Runs socket events and due timers until nothing more happens; returns the segments out.
    fn pump(&mut self) -> Vec<Got> {
        loop {
            let evs = self.h.drain_events();
            let due = self.e.poll_timeout().is_some_and(|t| t <= self.now);
            if evs.is_empty() && !due {
                break;
            }
            for ev in evs {
                self.e
                    .handle_host_event(self.now, ev, &mut self.h, &mut self.out);
            }
            if due {
                self.e.handle_timeout(self.now, &mut self.h, &mut self.out);
            }
        }
        // As the guest sees them: a marked frame is cut (or only summed) by its side of the port.
        let mut got = Vec::new();
        for (f, mark) in self.out.iter_gso() {
            if mark == 0 {
                got.push(parse_out(f));
            } else {
                crate::wire::gso::cut(f, mark, |s| got.push(parse_out(s))).expect("cuts");
            }
        }
        self.out.clear();
        got
    }

    fn raw(&mut self, frame: &[u8]) -> Vec<Got> {
        self.e
            .handle_frame(self.now, frame, &mut self.h, &mut self.out);
        self.pump()
    }

    fn send(&mut self, s: &S) -> Vec<Got> {
        let f = self.frame(s);
        self.raw(&f)
    }

    /// Several segments in one batch (as one read of the port would deliver them).
    fn batch(&mut self, segs: &[S]) -> Vec<Got> {
        for s in segs {
            let f = self.frame(s);
            self.e
                .handle_frame(self.now, &f, &mut self.h, &mut self.out);
        }
        self.pump()
    }

    fn advance(&mut self, d: Duration) -> Vec<Got> {
        self.now = self.now + d;
        self.pump()
    }

    fn syn(&self, o: Opts) -> S {
        let mut s = self.s(TcpControl::Syn, GISS, None);
        s.opts = Some(o);
        s
    }

    /// SYN → SYN-ACK → ACK; returns the SYN-ACK.
    fn establish(&mut self, o: Opts) -> Got {
        let got = self.send(&self.syn(o));
        assert_eq!(got.len(), 1, "{got:?}");
        let sa = got[0].clone();
        assert!(sa.syn && sa.ack == Some(GISS + 1));
        self.iss = sa.seq;
        self.sock = *self
            .h
            .ids(|s| matches!(s, crate::sim::SimSocket::Tcp(_)))
            .last()
            .unwrap();
        let mut a = self.ack(0);
        a.window = o.window;
        assert!(self.send(&a).is_empty());
        assert_eq!(self.state(), "ESTABLISHED");
        sa
    }

    fn state(&self) -> &'static str {
        let s = self.e.sessions();
        s.iter()
            .find(|s| s.dst == std::net::SocketAddr::from(self.dst))
            .map_or("none", |s| s.state)
    }

    fn tcp(&mut self) -> &mut crate::sim::SimTcp {
        let id = self.sock;
        self.h.tcp(id).expect("socket open")
    }

    fn drops(&self, d: DropReason) -> u64 {
        self.e.stats().drops_of(d)
    }
}

fn parse_out(frame: &[u8]) -> Got {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(eth.dst_addr(), crate::wire::eth(GUEST_MAC));
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.total_len() as usize, eth.payload().len());
    assert!(ip.total_len() <= 1500);
    let caps = ChecksumCapabilities::default();
    let ipr = Ipv4Repr::parse(&ip, &caps).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    let r = TcpRepr::parse(&tcp, &ipr.src_addr.into(), &ipr.dst_addr.into(), &caps)
        .expect("valid TCP with a good checksum");
    Got {
        src: SocketAddrV4::new(ipr.src_addr, r.src_port),
        dst: SocketAddrV4::new(ipr.dst_addr, r.dst_port),
        syn: r.control == TcpControl::Syn,
        fin: r.control == TcpControl::Fin,
        rst: r.control == TcpControl::Rst,
        seq: r.seq_number.0 as u32,
        ack: r.ack_number.map(|a| a.0 as u32),
        window: r.window_len,
        mss: r.max_seg_size,
        ws: r.window_scale,
        sack_perm: r.sack_permitted,
        sack: r.sack_ranges.iter().flatten().copied().collect(),
        ts: r.timestamp.map(|t| (t.tsval, t.tsecr)),
        payload: r.payload.to_vec(),
    }
}

fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

// ---- handshake -------------------------------------------------------------------------------

#[test]
fn syn_ack_only_after_connected_with_options() {
    let mut t = T::with(cfg(), host(|h| h.default_connect = ConnectOutcome::Silent));
    assert!(t.send(&t.syn(ALL)).is_empty());
    assert_eq!(t.state(), "SYN_SENT");
    assert_eq!(t.e.nat.tcp.half_open(), 1);
    // A retransmitted SYN is absorbed while connecting.
    assert!(t.send(&t.syn(ALL)).is_empty());
    let id = t.h.ids(|s| matches!(s, crate::sim::SimSocket::Tcp(_)))[0];
    assert_eq!(
        t.h.tcp(id).unwrap().dst,
        std::net::SocketAddr::from(SocketAddrV4::new(DST, 80))
    );
    t.h.events.push_back(SockEvent::Connected(id));
    let got = t.pump();
    assert_eq!(got.len(), 1);
    let sa = &got[0];
    assert!(sa.syn && !sa.rst);
    assert_eq!(sa.src, SocketAddrV4::new(DST, 80));
    assert_eq!(sa.dst, SocketAddrV4::new(GUEST, GPORT));
    assert_eq!(sa.ack, Some(GISS + 1));
    assert_eq!(sa.mss, Some(1460));
    assert_eq!(sa.ws, Some(3), "256 KiB window needs a shift of 3");
    assert_eq!(sa.window, 65535, "the SYN-ACK's window is never scaled");
    assert!(sa.sack_perm);
    assert_eq!(sa.ts.unwrap().1, 5000, "echoes the guest's TSval");
    assert_eq!(t.state(), "SYN_RECEIVED");
    assert_eq!(t.e.nat.tcp.half_open(), 0);
    // The guest's SYN again (our SYN-ACK lost): the SYN-ACK again.
    let got = t.send(&t.syn(ALL));
    assert!(got.len() == 1 && got[0].syn && got[0].seq == sa.seq);
    t.iss = sa.seq;
    assert!(t.send(&t.ack(0)).is_empty());
    assert_eq!(t.state(), "ESTABLISHED");
}

#[test]
fn syn_ack_without_options_when_guest_offered_none() {
    let mut t = T::new();
    let sa = t.establish(NONE);
    assert_eq!(sa.mss, Some(1460), "our MSS is always offered");
    assert_eq!(sa.ws, None);
    assert!(!sa.sack_perm);
    assert_eq!(sa.ts, None);
}

#[test]
fn syn_ack_lost_is_retransmitted_then_given_up() {
    let mut t = T::new();
    let got = t.send(&t.syn(NONE));
    assert!(got[0].syn);
    let got = t.advance(Duration::from_secs(1));
    assert!(got.len() == 1 && got[0].syn);
    let mut total = Duration::from_secs(1);
    let mut rst = false;
    for i in 1..=MAX_BACKOFFS as u32 + 1 {
        let d = Duration::from_secs(1 << i).min(Duration::from_secs(60));
        total += d;
        let got = t.advance(d);
        if got.iter().any(|g| g.rst) {
            rst = true;
            break;
        }
        assert!(got.iter().all(|g| g.syn));
    }
    assert!(rst, "gave up after {total:?}");
    assert_eq!(t.state(), "none");
}

#[test]
fn refused_connect_is_rst_ack() {
    let mut t = T::with(cfg(), host(|h| h.default_connect = ConnectOutcome::Refuse));
    let got = t.send(&t.syn(ALL));
    assert_eq!(got.len(), 1);
    assert!(got[0].rst);
    assert_eq!(got[0].ack, Some(GISS + 1));
    assert_eq!(got[0].seq, 0);
    assert_eq!(t.state(), "none");
    assert_eq!(t.h.closed.len(), 1);
    assert_eq!(t.e.nat.tcp.half_open(), 0);
}

#[test]
fn connect_timeout_is_rst() {
    let mut t = T::with(cfg(), host(|h| h.default_connect = ConnectOutcome::Silent));
    assert!(t.send(&t.syn(NONE)).is_empty());
    assert!(t.advance(Duration::from_secs(29)).is_empty());
    let got = t.advance(Duration::from_secs(1));
    assert_eq!(got.len(), 1);
    assert!(got[0].rst && got[0].ack == Some(GISS + 1));
    assert_eq!(t.state(), "none");
    assert_eq!(t.h.closed.len(), 1);
}

// ---- guest → sock side -----------------------------------------------------------------

#[test]
fn upload_in_order_acks_every_second_segment() {
    let mut t = T::new();
    t.establish(NONE);
    let data = bytes(4000);
    // Two segments in one batch: one ACK.
    let got = t.batch(&[t.data(0, &data[..1000]), t.data(1000, &data[1000..2000])]);
    assert_eq!(got.len(), 1);
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1 + 2000));
    assert_eq!(got[0].window, 65535, "unscaled: 256 KiB capped at 65535");
    // One segment alone: acknowledged at the end of its batch.
    let got = t.send(&t.data(2000, &data[2000..3000]));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 1 + 3000));
    let got = t.send(&t.data(3000, &data[3000..]));
    assert_eq!(got[0].ack, Some(GISS + 1 + 4000));
    assert_eq!(t.tcp().written, data);
    let s = &t.e.sessions()[0];
    assert_eq!(s.bytes_to_host, 4000);
}

/// With batching (the runtime's mode), the first in-order segment of a batch is written at
/// once and the rest of the batch together at `flush`; one ACK covers the batch.
#[test]
fn batched_upload_is_one_write_and_one_ack() {
    let mut t = T::new();
    t.e.set_batching(true);
    t.establish(NONE);
    let data = bytes(5000);
    let segs: Vec<S> = (0..5)
        .map(|i| t.data(i * 1000, &data[i * 1000..][..1000]))
        .collect();
    let got = t.batch(&segs);
    assert!(
        got.is_empty(),
        "nothing is acknowledged before the batch ends: {got:?}"
    );
    assert_eq!(t.tcp().written, &data[..1000]);
    t.e.flush(t.now, &mut t.h, &mut t.out);
    let got = t.pump();
    assert_eq!(got.len(), 1);
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1 + 5000));
    assert_eq!(t.tcp().written, data);
    // The first segment, then the rest in one write (two where the ring wraps).
    assert!(t.tcp().writes <= 3, "{} writes", t.tcp().writes);
    // A lone segment (interactive traffic) is written at once and needs no ring.
    let got = t.batch(&[t.data(5000, b"x")]);
    assert!(got.is_empty());
    assert_eq!(t.tcp().written.len(), 5001);
    assert!(t.e.nat.tcp.buffer_usage().0 < 4096, "no ring held");
    t.e.flush(t.now, &mut t.h, &mut t.out);
    // Its ACK waits for an answer to carry it, and goes alone when none comes.
    assert!(t.pump().is_empty());
    assert!(t.advance(DELAYED_ACK - Duration::from_micros(1)).is_empty());
    let got = t.advance(Duration::from_micros(1));
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1 + 5001));
}

/// A request smaller than a segment is acknowledged by its answer: the guest gets one frame,
/// not an ACK and then the answer. With batching (the runtime's way) and without.
#[test]
fn a_small_requests_ack_rides_on_its_answer() {
    for batching in [true, false] {
        let mut t = T::new();
        t.e.set_batching(batching);
        t.establish(ALL);
        assert!(t.batch(&[t.data(0, b"GET")]).is_empty());
        t.e.flush(t.now, &mut t.h, &mut t.out);
        assert!(t.pump().is_empty(), "no ACK of its own");
        assert_eq!(t.tcp().written, b"GET");
        let sock = t.sock;
        t.now = t.now + DELAYED_ACK / 2;
        t.h.deliver_tcp(sock, b"200");
        let got = t.pump();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].payload, b"200");
        assert_eq!(got[0].ack, Some(GISS + 1 + 3));
        assert!(t.advance(DELAYED_ACK).is_empty(), "nothing owed is left");
    }
}

/// The delay is for a lone small segment: a second one is acknowledged at once (every second
/// segment), and so is a full-sized one.
#[test]
fn a_second_segment_or_a_full_one_is_acknowledged_at_once() {
    let mut t = T::new();
    t.establish(ALL);
    assert!(t.send(&t.data(0, b"a")).is_empty());
    let got = t.send(&t.data(1, b"b"));
    assert_eq!(got.len(), 1);
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1 + 2));
    assert!(t.advance(DELAYED_ACK).is_empty(), "nothing owed is left");
    // 1460-byte MSS offered, 12 bytes of timestamps: 1448 is a full segment.
    let full = bytes(1448);
    let got = t.send(&t.data(2, &full));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 1 + 2 + 1448));
}

/// The guest closes first: its FIN's ACK waits for the destination's FIN, and one segment
/// carries both; a destination that stays open has the FIN acknowledged alone after the delay.
#[test]
fn the_guests_fin_is_acknowledged_by_our_fin() {
    let mut t = T::new();
    t.establish(ALL);
    let fin = t.s(TcpControl::Fin, GISS + 1, Some(t.iss + 1));
    assert!(t.send(&fin).is_empty());
    assert!(t.tcp().shut_write);
    let sock = t.sock;
    t.h.tcp_fin(sock);
    let got = t.pump();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].fin);
    assert_eq!(got[0].ack, Some(GISS + 2));
    assert!(t.advance(DELAYED_ACK).is_empty());
    let mut last = t.ack(1);
    last.seq = GISS + 2;
    assert!(t.send(&last).is_empty());
    assert_eq!(t.state(), "none");

    let mut t = T::new();
    t.establish(ALL);
    assert!(t.send(&fin).is_empty());
    assert!(t.advance(DELAYED_ACK - Duration::from_micros(1)).is_empty());
    let got = t.advance(Duration::from_micros(1));
    assert_eq!(got.len(), 1);
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 2));
    assert_eq!(t.state(), "CLOSE_WAIT");
}

#[test]
fn batched_upload_writes_early_once_64k_wait() {
    let mut t = T::new();
    t.e.set_batching(true);
    t.establish(ALL);
    let data = bytes(50 * 1448);
    let segs: Vec<S> = (0..50)
        .map(|i| t.data(i * 1448, &data[i * 1448..][..1448]))
        .collect();
    let got = t.batch(&segs);
    assert!(
        t.tcp().written.len() >= 64 * 1024,
        "{}",
        t.tcp().written.len()
    );
    assert!(!got.is_empty(), "the early write is acknowledged at once");
    t.e.flush(t.now, &mut t.h, &mut t.out);
    let got = t.pump();
    assert_eq!(got.last().unwrap().ack, Some(GISS + 1 + data.len() as u32));
    assert_eq!(t.tcp().written, data);
}

/// A guest's super-segments within a batch go to the socket straight from their frames:
/// copied into the ring first, each would cost a pass over 64 KiB to save no write.
#[test]
fn batched_super_segments_are_written_from_the_frame() {
    let mut t = T::new();
    t.e.set_batching(true);
    t.establish(ALL);
    let data = bytes(3 * 30_000);
    let segs: Vec<S> = (0..3)
        .map(|i| t.data(i * 30_000, &data[i * 30_000..][..30_000]))
        .collect();
    t.batch(&segs);
    assert_eq!(t.tcp().written, data, "all written before the batch's end");
    assert_eq!(t.tcp().writes, 3);
    assert!(t.e.nat.tcp.buffer_usage().0 < 4096, "no ring held");
    t.e.flush(t.now, &mut t.h, &mut t.out);
    let got = t.pump();
    assert_eq!(got.last().unwrap().ack, Some(GISS + 1 + data.len() as u32));
}

#[test]
fn batched_fin_follows_its_data() {
    let mut t = T::new();
    t.e.set_batching(true);
    t.establish(NONE);
    let data = bytes(2000);
    let first = t.data(0, &data[..1000]);
    let mut last = t.data(1000, &data[1000..]);
    last.control = TcpControl::Fin;
    let got = t.batch(&[first, last]);
    assert!(got.is_empty());
    assert!(!t.tcp().shut_write, "the FIN waits for the data before it");
    t.e.flush(t.now, &mut t.h, &mut t.out);
    let got = t.pump();
    assert_eq!(
        got[0].ack,
        Some(GISS + 1 + 2000 + 1),
        "data and FIN acknowledged"
    );
    assert!(t.tcp().shut_write);
    assert_eq!(t.tcp().written, data);
}

#[test]
fn upload_acks_only_what_the_socket_took() {
    let mut t = T::with(cfg(), host(|h| h.tcp_send_buffer = 1500));
    t.establish(NONE);
    let data = bytes(3000);
    let got = t.batch(&[t.data(0, &data[..1000]), t.data(1000, &data[1000..2000])]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 1 + 1500));
    assert_eq!(t.tcp().written.len(), 1500);
    // More data while the socket is full: no duplicate ACKs (they would cause retransmits).
    let got = t.send(&t.data(2000, &data[2000..]));
    assert!(got.is_empty(), "{got:?}");
    // The destination reads: Writable drains what waited and updates the guest.
    let sock = t.sock;
    t.h.tcp_drain(sock, 1000);
    let got = t.pump();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 1 + 2500));
    t.h.tcp_drain(sock, 5000);
    let got = t.pump();
    assert_eq!(got[0].ack, Some(GISS + 1 + 3000));
    assert_eq!(t.tcp().written, data);
}

/// A small segment the socket takes only in part is acknowledged at once as far as it went:
/// the guest must not wait `DELAYED_ACK` to learn that the rest is still ours to take.
#[test]
fn a_small_segment_the_socket_takes_in_part_is_not_delayed() {
    let mut t = T::with(cfg(), host(|h| h.tcp_send_buffer = 100));
    t.establish(ALL);
    let data = bytes(300);
    let got = t.send(&t.data(0, &data));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1 + 100));
    let sock = t.sock;
    t.h.tcp_drain(sock, 1000);
    let got = t.pump();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].ack, Some(GISS + 1 + 300));
    assert_eq!(t.tcp().written, data);
}

#[test]
fn out_of_order_waits_then_fills() {
    let mut t = T::new();
    t.establish(ALL);
    let data = bytes(3000);
    let got = t.send(&t.data(1000, &data[1000..2000]));
    assert_eq!(got.len(), 1);
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1), "duplicate ACK");
    assert_eq!(got[0].window, 32768, "256 KiB >> 3");
    assert_eq!(got[0].sack, vec![(GISS + 1001, GISS + 2001)]);
    let got = t.send(&t.data(2000, &data[2000..]));
    assert_eq!(got[0].sack, vec![(GISS + 1001, GISS + 3001)]);
    assert!(t.tcp().written.is_empty());
    let got = t.send(&t.data(0, &data[..1000]));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 3001));
    assert!(got[0].sack.is_empty());
    assert_eq!(t.tcp().written, data);
}

#[test]
fn duplicates_and_overlaps() {
    let mut t = T::new();
    t.establish(NONE);
    let data = bytes(2000);
    t.send(&t.data(0, &data[..1000]));
    // Overlapping: only the new part is written (less than a segment: its ACK waits).
    assert!(t.send(&t.data(500, &data[500..1500])).is_empty());
    let got = t.advance(DELAYED_ACK);
    assert_eq!(got.last().unwrap().ack, Some(GISS + 1501));
    // Entirely old: ACK at once, nothing written.
    let got = t.send(&t.data(0, &data[..1000]));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 1501));
    // Out of order overlapping what is queued.
    t.send(&t.data(1700, &data[1700..2000]));
    t.send(&t.data(1600, &data[1600..1800]));
    t.send(&t.data(1500, &data[1500..1650]));
    assert_eq!(t.tcp().written, data);
}

#[test]
fn out_of_window_segment_is_acked_and_dropped() {
    let mut t = T::new();
    t.establish(NONE);
    let far = t.data(1 << 20, b"far away");
    let got = t.send(&far);
    assert_eq!(got.len(), 1);
    assert!(got[0].is_pure_ack());
    assert_eq!(got[0].ack, Some(GISS + 1));
    // Keep-alive (one before RCV.NXT): ACK.
    let mut ka = t.ack(0);
    ka.seq = GISS;
    let got = t.send(&ka);
    assert!(got.len() == 1 && got[0].ack == Some(GISS + 1));
    assert!(t.tcp().written.is_empty());
}

// ---- sock side → guest -----------------------------------------------------------------

#[test]
fn download_within_mss_and_window_consumes_on_ack() {
    let mut t = T::new();
    let mut o = NONE;
    o.mss = Some(1000);
    o.window = 3000;
    t.establish(o);
    let data = bytes(10_000);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &data);
    let got = t.pump();
    assert_eq!(got.len(), 3);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.seq, t.iss + 1 + 1000 * i as u32);
        assert_eq!(g.payload, data[1000 * i..1000 * (i + 1)]);
    }
    // Nothing consumed before the guest acknowledges.
    assert_eq!(t.tcp().recv.len(), 10_000);
    let mut a = t.ack(2000);
    a.window = 3000;
    let got = t.send(&a);
    assert_eq!(t.tcp().recv.len(), 8000);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].seq, t.iss + 1 + 3000);
    assert_eq!(got[1].payload, data[4000..5000]);
}

/// An upload's ACKs do not peek at a sock-side socket that has nothing to send (each such peek is a
/// failed syscall); data the destination sends later still goes out at once.
#[test]
fn an_upload_does_not_peek_an_empty_socket_per_ack() {
    let mut t = T::new();
    let mut o = NONE;
    o.mss = Some(1000);
    o.window = 60_000;
    t.establish(o);
    let before = t.h.peeks;
    let mut off = 0;
    for _ in 0..50 {
        t.send(&t.data(off, &bytes(1000)));
        off += 1000;
    }
    assert_eq!(t.tcp().written.len(), 50_000);
    assert!(
        t.h.peeks - before <= 2,
        "{} peeks for 50 guest segments",
        t.h.peeks - before
    );
    // The destination answers: a Readable, and the data goes out.
    let sock = t.sock;
    t.h.deliver_tcp(sock, &bytes(2500));
    let got = t.pump();
    let payload: Vec<u8> = got.iter().flat_map(|g| g.payload.clone()).collect();
    assert_eq!(payload, bytes(2500));
    // Acknowledged: the first guest segment after it finds the socket empty again; the ones
    // after that peek no more.
    let mut d = t.data(off, &bytes(1000));
    d.ack = Some(t.iss + 1 + 2500);
    t.send(&d);
    let peeks = t.h.peeks;
    for _ in 0..20 {
        off += 1000;
        let mut d = t.data(off, &bytes(1000));
        d.ack = Some(t.iss + 1 + 2500);
        t.send(&d);
    }
    assert_eq!(t.h.peeks, peeks);
    assert!(t.h.empty_peeks <= 4, "{} empty peeks", t.h.empty_peeks);
}

/// A short answer (less than the peek asked for) is peeked once: what the socket held is all
/// there is, and asking again for the segment would return the same bytes.
#[test]
fn a_short_answer_is_peeked_once() {
    let mut t = T::new();
    let mut o = NONE;
    o.mss = Some(1000);
    o.window = 60_000;
    t.establish(o);
    let sock = t.sock;
    for (i, answer) in [&b"x"[..], &bytes(1500)].into_iter().enumerate() {
        let before = t.h.peeks;
        t.h.deliver_tcp(sock, answer);
        let got = t.pump();
        let payload: Vec<u8> = got.iter().flat_map(|g| g.payload.clone()).collect();
        assert_eq!(payload, answer, "answer {i}");
        assert_eq!(t.h.peeks - before, 1, "answer {i}");
        let acked = t.tcp().recv.len();
        let total: usize = 1 + if i == 1 { 1500 } else { 0 };
        assert_eq!(acked, total, "nothing consumed before the guest's ACK");
    }
}

#[test]
fn download_honours_window_scaling() {
    let mut t = T::new();
    let mut o = ALL;
    o.ws = Some(2);
    o.mss = Some(1000);
    t.establish(o);
    // Window field 1000 << 2 = 4000 bytes.
    let mut a = t.ack(0);
    a.window = 1000;
    a.ts = Some((5001, 0));
    t.send(&a);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &bytes(20_000));
    let got = t.pump();
    let sent: usize = got.iter().map(|g| g.payload.len()).sum();
    assert_eq!(sent, 4000);
    // Timestamps take 12 bytes of each segment.
    assert!(got
        .iter()
        .all(|g| g.payload.len() <= 1000 - 12 && g.ts.is_some()));
}

#[test]
fn download_flight_is_capped_under_a_huge_window() {
    let mut t = T::new();
    let mut o = NONE;
    o.mss = Some(1460);
    o.ws = Some(10);
    t.establish(o);
    let total = 16 << 20;
    let data = bytes(total);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &data);
    let (mut acked, mut sent, mut peak) = (0usize, 0usize, 0usize);
    let mut got = t.pump();
    while acked < total {
        let end = got
            .iter()
            .map(|g| g.seq.wrapping_sub(t.iss + 1) as usize + g.payload.len())
            .max()
            .unwrap_or(sent);
        sent = sent.max(end);
        peak = peak.max(sent - acked);
        assert!(
            sent - acked <= 256 * 1024,
            "{} bytes in flight",
            sent - acked
        );
        assert_eq!(t.tcp().recv.len(), total - acked);
        // A guest that acknowledges a quarter of what is outstanding lets the flight grow.
        acked = if sent - acked > 5840 {
            acked + (sent - acked) / 4
        } else {
            sent
        };
        // The guest's window stays at 64 MiB: only the cap holds the flight back.
        let mut a = t.ack(acked);
        a.window = 65535;
        got = t.send(&a);
    }
    assert!(peak > 240 * 1024, "the flight never grew past {peak} bytes");
    assert_eq!(t.tcp().recv.len(), 0);
}

#[test]
fn loss_rto_retransmits_with_backoff_then_resets() {
    let mut t = T::new();
    t.establish(NONE);
    let sock = t.sock;
    t.h.deliver_tcp(sock, b"hello");
    let got = t.pump();
    assert_eq!(got[0].payload, b"hello");
    // The handshake measured no RTT: the RTO is the 200 ms minimum.
    assert!(t.advance(Duration::from_millis(199)).is_empty());
    let got = t.advance(Duration::from_millis(1));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, t.iss + 1);
    assert_eq!(got[0].payload, b"hello");
    // Doubling: nothing for the next 399 ms, again at 400 ms, then at 800 ms.
    assert!(t.advance(Duration::from_millis(399)).is_empty());
    assert_eq!(t.advance(Duration::from_millis(1)).len(), 1);
    assert!(t.advance(Duration::from_millis(799)).is_empty());
    assert_eq!(t.advance(Duration::from_millis(1)).len(), 1);
    let mut resets = 0;
    for _ in 0..12 {
        let got = t.advance(Duration::from_secs(60));
        resets += got.iter().filter(|g| g.rst).count();
    }
    assert_eq!(resets, 1);
    assert_eq!(t.state(), "none");
    assert!(t.h.closed.contains(&sock));
}

#[test]
fn three_duplicate_acks_fast_retransmit() {
    let mut t = T::new();
    let mut o = NONE;
    o.mss = Some(1000);
    t.establish(o);
    let data = bytes(5000);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &data);
    assert_eq!(t.pump().len(), 5);
    // Segment 2 lost: the guest acknowledges 1000 four times.
    t.send(&t.ack(1000));
    assert!(t.send(&t.ack(1000)).is_empty());
    assert!(t.send(&t.ack(1000)).is_empty());
    let got = t.send(&t.ack(1000));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, t.iss + 1 + 1000);
    assert_eq!(got[0].payload, data[1000..2000]);
    let got = t.send(&t.ack(5000));
    assert!(got.is_empty());
    assert!(t.tcp().recv.is_empty());
}

#[test]
fn sack_guides_retransmission() {
    let mut t = T::new();
    let mut o = ALL;
    o.mss = Some(1012);
    t.establish(o);
    let data = bytes(6000);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &data);
    let got = t.pump();
    assert_eq!(got.len(), 6);
    let base = t.iss + 1;
    // Segments 1 and 3 (0-based) lost; the guest SACKs 2, 4, 5.
    let dup = |t: &T, blocks: &[(u32, u32)]| {
        let mut a = t.ack(1000);
        a.ts = Some((5002, 0));
        for (i, b) in blocks.iter().enumerate() {
            a.sack[i] = Some((base + b.0, base + b.1));
        }
        a
    };
    t.send(&dup(&t, &[]));
    t.send(&dup(&t, &[(2000, 3000)]));
    assert!(t.send(&dup(&t, &[(2000, 3000), (4000, 5000)])).is_empty());
    let got = t.send(&dup(&t, &[(2000, 3000), (4000, 6000)]));
    assert_eq!(got[0].seq, base + 1000, "first hole");
    let got = t.send(&dup(&t, &[(2000, 3000), (4000, 6000)]));
    assert!(!got.is_empty());
    assert_eq!(got[0].seq, base + 3000, "second hole, not segment 2");
    assert_eq!(got[0].payload, data[3000..4000]);
}

#[test]
fn zero_window_is_probed() {
    let mut t = T::new();
    let mut o = NONE;
    o.window = 0;
    t.establish(o);
    let sock = t.sock;
    t.h.deliver_tcp(sock, b"data");
    assert!(t.pump().is_empty());
    let got = t.advance(Duration::from_secs(1));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, t.iss, "probe one below SND.UNA");
    let mut a = t.ack(0);
    a.window = 100;
    let got = t.send(&a);
    assert_eq!(got[0].payload, b"data");
}

// ---- closing ---------------------------------------------------------------------------------

#[test]
fn guest_fin_half_close_then_host_finishes() {
    let mut t = T::new();
    t.establish(NONE);
    let mut fin = t.data(0, b"bye");
    fin.control = TcpControl::Fin;
    // The ACK waits for the destination's answer (or its FIN) to carry it.
    assert!(t.send(&fin).is_empty());
    assert!(t.tcp().shut_write);
    assert_eq!(t.tcp().written, b"bye");
    assert_eq!(t.state(), "CLOSE_WAIT");
    // The destination still sends.
    let sock = t.sock;
    t.h.deliver_tcp(sock, b"response");
    let got = t.pump();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"response");
    assert_eq!(got[0].ack, Some(GISS + 1 + 4));
    assert!(t.advance(DELAYED_ACK).is_empty(), "nothing owed is left");
    t.h.tcp_fin(sock);
    let got = t.pump();
    assert_eq!(got.len(), 1);
    assert!(got[0].fin);
    assert_eq!(got[0].seq, t.iss + 1 + 8);
    assert_eq!(t.state(), "LAST_ACK");
    let mut a = t.ack(9);
    a.seq = GISS + 5;
    assert!(t.send(&a).is_empty());
    assert_eq!(t.state(), "none");
    assert!(t.h.closed.contains(&sock));
}

#[test]
fn host_fin_first_then_time_wait_tombstone() {
    let mut t = T::new();
    t.establish(NONE);
    let sock = t.sock;
    t.h.deliver_tcp(sock, b"abc");
    t.h.tcp_fin(sock);
    let got = t.pump();
    // Data and FIN together (or FIN right after).
    assert!(got.last().unwrap().fin);
    let sent: Vec<u8> = got.iter().flat_map(|g| g.payload.clone()).collect();
    assert_eq!(sent, b"abc");
    assert_eq!(t.state(), "FIN_WAIT");
    t.send(&t.ack(4));
    assert!(t.tcp().recv.is_empty());
    let fin = t.s(TcpControl::Fin, GISS + 1, Some(t.iss + 5));
    let got = t.send(&fin);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ack, Some(GISS + 2));
    assert!(t.h.closed.contains(&sock), "socket closed at once");
    assert_eq!(t.state(), "TIME_WAIT");
    // A retransmitted FIN is answered.
    let got = t.send(&fin);
    assert!(got.len() == 1 && got[0].ack == Some(GISS + 2));
    t.advance(TIME_WAIT);
    assert_eq!(t.state(), "none");
}

#[test]
fn guest_rst_aborts_and_bad_rst_is_challenged() {
    let mut t = T::new();
    t.establish(NONE);
    let mut bad = t.s(TcpControl::Rst, GISS + 100, None);
    bad.ack = None;
    let got = t.send(&bad);
    assert!(got.len() == 1 && got[0].is_pure_ack(), "challenge ACK");
    assert_eq!(t.state(), "ESTABLISHED");
    let rst = t.s(TcpControl::Rst, GISS + 1, None);
    assert!(t.send(&rst).is_empty());
    assert_eq!(t.state(), "none");
    assert!(t.h.closed.contains(&t.sock));
}

#[test]
fn syn_in_established_is_challenged() {
    let mut t = T::new();
    t.establish(NONE);
    let mut syn = t.syn(NONE);
    syn.seq = 77;
    let got = t.send(&syn);
    assert!(got.len() == 1 && got[0].is_pure_ack() && got[0].ack == Some(GISS + 1));
    assert_eq!(t.state(), "ESTABLISHED");
}

#[test]
fn host_reset_resets_guest() {
    let mut t = T::new();
    t.establish(NONE);
    let sock = t.sock;
    t.h.events
        .push_back(SockEvent::Failed(sock, std::io::ErrorKind::ConnectionReset));
    let got = t.pump();
    assert_eq!(got.len(), 1);
    assert!(got[0].rst);
    assert_eq!(got[0].seq, t.iss + 1);
    assert_eq!(t.state(), "none");
}

#[test]
fn idle_timeout_resets() {
    let mut t = T::new();
    t.establish(NONE);
    assert!(t.advance(Duration::from_secs(7199)).is_empty());
    let got = t.advance(Duration::from_secs(1));
    assert!(got.len() == 1 && got[0].rst);
    assert_eq!(t.state(), "none");
    assert!(t.tcp_aborted_or_closed());
}

#[test]
fn shutdown_resets_every_guest_and_closes_every_socket() {
    let mut t = T::new();
    t.establish(NONE);
    let sock = t.sock;
    t.e.shutdown(t.now, &mut t.h, &mut t.out);
    let got: Vec<Got> = t.out.iter().map(parse_out).collect();
    assert_eq!(got.len(), 1);
    assert!(got[0].rst);
    assert_eq!(got[0].seq, t.iss + 1);
    assert_eq!(t.state(), "none");
    assert!(t.h.closed.contains(&sock));
    assert!(t.e.sessions().is_empty());
}

impl T {
    fn tcp_aborted_or_closed(&self) -> bool {
        self.h.closed.contains(&self.sock)
    }
}

// ---- limits, strays, malformed input ---------------------------------------------------------

#[test]
fn half_open_limit() {
    let mut c = cfg();
    c.nat.max_half_open = 1;
    let mut t = T::with(c, host(|h| h.default_connect = ConnectOutcome::Silent));
    assert!(t.send(&t.syn(NONE)).is_empty());
    let mut s2 = t.syn(NONE);
    s2.sport = GPORT + 1;
    let got = t.send(&s2);
    assert!(got.len() == 1 && got[0].rst && got[0].ack == Some(GISS + 1));
    assert_eq!(t.drops(DropReason::Limit), 1);
}

#[test]
fn per_guest_limit() {
    let mut c = cfg();
    c.nat.max_sessions_per_guest = 1;
    let mut t = T::with(c, SimSockets::default());
    t.establish(NONE);
    let mut s2 = t.syn(NONE);
    s2.sport = GPORT + 1;
    let got = t.send(&s2);
    assert!(got.len() == 1 && got[0].rst);
    assert_eq!(t.drops(DropReason::Limit), 1);
    assert_eq!(t.e.sessions().len(), 1);
}

#[test]
fn segment_for_no_session_is_reset() {
    let mut t = T::new();
    t.iss = 5000;
    let got = t.send(&t.ack(10));
    assert_eq!(got.len(), 1);
    assert!(got[0].rst && got[0].ack.is_none());
    assert_eq!(got[0].seq, 5011);
    let mut s = t.s(TcpControl::Fin, 300, None);
    s.payload = b"xy".to_vec();
    let got = t.send(&s);
    assert!(got[0].rst && got[0].ack == Some(303));
    // Never an RST for an RST.
    assert!(t.send(&t.s(TcpControl::Rst, 1, None)).is_empty());
}

#[test]
fn malformed_segments_are_dropped() {
    let mut t = T::new();
    let good = t.frame(&t.syn(NONE));
    let tcp_at = ETHERNET_HEADER_LEN + 20;
    // Truncated: 10 bytes of TCP header.
    let mut f = good[..tcp_at + 10].to_vec();
    fix_ip(&mut f);
    assert!(t.raw(&f).is_empty());
    assert_eq!(t.drops(DropReason::Malformed), 1);
    // Data offset 4 (16 bytes).
    let mut f = good.clone();
    f[tcp_at + 12] = 4 << 4;
    assert!(t.raw(&f).is_empty());
    assert_eq!(t.drops(DropReason::Malformed), 2);
    // Data offset past the end.
    let mut f = good.clone();
    f[tcp_at + 12] = 15 << 4;
    assert!(t.raw(&f).is_empty());
    assert_eq!(t.drops(DropReason::Malformed), 3);
    // Bad checksum.
    let mut f = good.clone();
    f[tcp_at + 16] ^= 0xff;
    assert!(t.raw(&f).is_empty());
    assert_eq!(t.drops(DropReason::BadChecksum), 1);
    // SYN+FIN.
    let mut s = t.syn(NONE);
    s.control = TcpControl::Syn;
    let mut f = t.frame(&s);
    f[tcp_at + 13] |= 0x01;
    fix_tcp(&mut f);
    assert!(t.raw(&f).is_empty());
    assert_eq!(t.drops(DropReason::Malformed), 4);
    // Bad option length.
    let mut s = t.syn(NONE);
    s.opts = Some(Opts {
        mss: Some(1000),
        ..NONE
    });
    let mut f = t.frame(&s);
    f[tcp_at + 21] = 7; // MSS option of length 7
    fix_tcp(&mut f);
    assert!(t.raw(&f).is_empty());
    assert_eq!(t.drops(DropReason::Malformed), 5);
    assert!(t.e.sessions().is_empty());
}

fn fix_ip(f: &mut [u8]) {
    let len = f.len() - ETHERNET_HEADER_LEN;
    let mut ip = Ipv4Packet::new_unchecked(&mut f[ETHERNET_HEADER_LEN..]);
    ip.set_total_len(len as u16);
    ip.fill_checksum();
}

fn fix_tcp(f: &mut [u8]) {
    let mut ip = Ipv4Packet::new_unchecked(&mut f[ETHERNET_HEADER_LEN..]);
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&s.into(), &d.into());
}

#[test]
fn host_ip_port_80_is_reset_and_53_is_relayed() {
    let mut t = T::new();
    t.dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 1), 80);
    let got = t.send(&t.syn(NONE));
    assert!(got.len() == 1 && got[0].rst);
    assert!(t.h.sockets.is_empty());
    t.dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 1), 53);
    let sa = t.establish(NONE);
    assert_eq!(sa.src, t.dst);
    assert_eq!(t.tcp().dst, "127.0.0.1:5353".parse().unwrap());
}

/// The DNS address is the virtual host's: DNS over TCP there is relayed as at its own address
/// (answered from the DNS address), any other port is reset from it.
#[test]
fn the_dns_address_relays_port_53_and_resets_the_rest() {
    let dns = Ipv4Addr::new(192, 168, 30, 3);
    let mut c = cfg();
    c.dns.address = Some(dns);
    let mut t = T::with(c, SimSockets::default());
    t.dst = SocketAddrV4::new(dns, 80);
    let got = t.send(&t.syn(NONE));
    assert!(got.len() == 1 && got[0].rst, "{got:?}");
    assert_eq!(got[0].src, t.dst);
    assert!(t.h.sockets.is_empty());
    t.dst = SocketAddrV4::new(dns, 53);
    let sa = t.establish(NONE);
    assert_eq!(sa.src, t.dst);
    assert_eq!(t.tcp().dst, "127.0.0.1:5353".parse().unwrap());
    t.send(&t.data(0, b"\x00\x02qq"));
    assert_eq!(t.tcp().written, b"\x00\x02qq");
    let sock = t.sock;
    t.h.deliver_tcp(sock, b"\x00\x02aa");
    let got = t.pump();
    assert!(got.iter().all(|g| g.src == t.dst), "{got:?}");
    assert!(got.iter().any(|g| g.payload == b"\x00\x02aa"), "{got:?}");
    // Without it, that address is another guest's, for the segment and not the NAT.
    let mut t = T::new();
    t.dst = SocketAddrV4::new(dns, 53);
    let got = t.send(&t.syn(NONE));
    assert!(got.len() == 1 && got[0].rst && t.h.sockets.is_empty());
    assert_eq!(t.drops(DropReason::Loop), 1);
}

#[test]
fn session_row_counts_both_ways() {
    let mut t = T::new();
    t.establish(NONE);
    t.send(&t.data(0, b"ping"));
    let sock = t.sock;
    t.h.deliver_tcp(sock, b"pong!");
    t.pump();
    let s = &t.e.sessions()[0];
    assert_eq!(s.proto, crate::nat::Proto::Tcp);
    assert_eq!(
        s.guest,
        std::net::SocketAddr::from(SocketAddrV4::new(GUEST, GPORT))
    );
    assert_eq!(
        s.dst,
        std::net::SocketAddr::from(SocketAddrV4::new(DST, 80))
    );
    assert_eq!((s.bytes_to_host, s.bytes_to_guest), (4, 5));
    assert!(s.packets_to_host >= 3 && s.packets_to_guest >= 2);
}

#[test]
fn connection_state_is_small() {
    // The per-connection footprint the module doc promises (the ring is separate and lazy).
    assert!(
        std::mem::size_of::<TcpConn>() <= 640,
        "{}",
        std::mem::size_of::<TcpConn>()
    );
    let mut t = T::new();
    t.establish(NONE);
    assert_eq!(t.e.nat.tcp.buffer_usage().0, 0);
}

#[test]
fn thousands_of_connections_with_a_hole_each_stay_within_the_guests_ring_budget() {
    // One guest opens 4,096 connections and leaves a hole at the front of each, so every one
    // would hold a 256 KiB ring until its idle timeout: 1 GiB. The guest's share is 32 MiB.
    let mut t = T::new();
    let per_guest = t.e.config().nat.reassembly_per_guest_mib << 20;
    assert_eq!(per_guest, 32 << 20, "the default share");
    let before = super::reassembly::held(std::net::IpAddr::from(GUEST));
    let mut held_back = 0;
    for i in 0..4096u16 {
        let mut syn = t.syn(ALL);
        syn.sport = 20000 + i;
        let got = t.send(&syn);
        let iss = got.iter().find(|g| g.syn).expect("SYN-ACK").seq;
        let mut ack = t.s(TcpControl::None, GISS + 1, Some(iss + 1));
        ack.sport = syn.sport;
        t.send(&ack);
        let mut d = t.s(TcpControl::Psh, GISS + 1 + 1000, Some(iss + 1));
        d.sport = syn.sport;
        d.payload = vec![7; 100];
        let got = t.send(&d);
        // A segment that got a ring is SACKed; one past the budget is dropped unSACKed (the
        // guest sends it again later).
        if got.iter().all(|g| g.sack.is_empty()) {
            held_back += 1;
        }
    }
    let (_, mine) = super::reassembly::held(std::net::IpAddr::from(GUEST));
    let used = mine - before.1;
    assert!(used <= per_guest, "{used} bytes of rings held");
    assert!(
        used > per_guest - (256 << 10),
        "the share is used, not more"
    );
    assert_eq!(held_back, 4096 - per_guest / (256 << 10));
    assert_eq!(t.e.session_counts()[crate::nat::Proto::Tcp.index()], 4096);
}

#[test]
fn a_syn_from_outside_the_virtual_network_is_not_carried() {
    let mut t = T::new();
    let mut f = t.frame(&t.syn(ALL));
    // The same SYN with a source no guest of the segment can have (checksums redone).
    let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
    ip.set_src_addr(Ipv4Addr::new(8, 8, 8, 8));
    ip.fill_checksum();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
    tcp.fill_checksum(&src.into(), &dst.into());
    assert!(t.raw(&f).is_empty(), "no SYN-ACK, no RST");
    assert_eq!(t.drops(DropReason::Foreign), 1);
    assert!(t.h.sockets.is_empty(), "no socket");
}

// ---- inbound: a forward's client, opened toward the guest ---------------------------------

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 51000);
/// The guest's server port the forward leads to.
const SERVER_PORT: u16 = 80;

fn target() -> InboundTarget {
    InboundTarget {
        guest: SocketAddrV4::new(GUEST, SERVER_PORT),
        guest_mac: GUEST_MAC,
        forward: 1,
    }
}

impl T {
    /// A client connects to a forward: its accepted socket goes to the engine, and the
    /// guest's segments are those of the guest's server port to the client as shown.
    fn accept_from(&mut self, client: SocketAddrV4) -> Result<Vec<Got>, InboundRefused> {
        let sock = self.h.adopt_tcp(std::net::SocketAddr::from(client));
        self.sock = sock;
        self.dst = self.e.inbound_source(client).unwrap_or(client);
        self.gport = SERVER_PORT;
        let (now, h, out) = (self.now, &mut self.h, &mut self.out);
        self.e.tcp_inbound(now, sock, client, target(), h, out)?;
        Ok(self.pump())
    }

    /// `accept_from(CLIENT)`, which must send exactly our SYN; returns it.
    fn inbound(&mut self) -> Got {
        let got = self.accept_from(CLIENT).expect("accepted");
        assert_eq!(got.len(), 1, "{got:?}");
        let syn = got[0].clone();
        assert!(syn.syn && !syn.rst, "{syn:?}");
        self.iss = syn.seq;
        syn
    }

    /// The guest's SYN-ACK to our SYN.
    fn syn_ack(&self, o: Opts) -> S {
        let mut s = self.s(TcpControl::Syn, GISS, Some(self.iss + 1));
        s.opts = Some(o);
        s
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.e.poll_event()).collect()
    }

    fn aborted(&self, sock: SockId) -> bool {
        self.h.aborted.contains(&sock) && self.h.closed.contains(&sock)
    }
}

#[test]
fn inbound_syn_offers_every_option_and_the_client_speaks_once_the_guest_answers() {
    let mut t = T::new();
    let syn = t.inbound();
    let guest = SocketAddrV4::new(GUEST, SERVER_PORT);
    assert_eq!((syn.src, syn.dst), (CLIENT, guest), "from the real client");
    assert_eq!(syn.ack, None);
    assert_eq!(syn.mss, Some(1460), "from the MTU");
    assert_eq!(syn.ws, Some(3), "256 KiB window needs a shift of 3");
    assert_eq!(syn.window, 65535, "a SYN's window is never scaled");
    assert!(syn.sack_perm);
    let (tsval, tsecr) = syn.ts.expect("timestamps offered");
    assert_eq!(tsecr, 0);
    assert_eq!(t.state(), "SYN_SENT");
    assert_eq!(t.e.nat.tcp.half_open(), 1);
    let row = t.e.sessions()[0].clone();
    assert_eq!(
        (row.direction, row.guest, row.dst),
        (Direction::In, guest.into(), CLIENT.into())
    );

    // The client speaks first: its request waits in the socket while the guest is silent.
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let sock = t.sock;
    t.h.deliver_tcp(sock, request);
    assert!(t.pump().is_empty());

    // The guest's SYN-ACK: the request goes out at once, carrying the handshake's ACK.
    let got = t.send(&t.syn_ack(ALL));
    assert_eq!(got.len(), 1, "{got:?}");
    let d = &got[0];
    assert_eq!(d.payload, request);
    assert_eq!((d.seq, d.ack), (t.iss + 1, Some(GISS + 1)));
    let (ts, echo) = d.ts.expect("timestamps in use");
    assert_eq!(echo, 5000, "echoes the guest's TSval");
    assert!(ts >= tsval);
    assert!(d.sack.is_empty() && d.mss.is_none() && d.ws.is_none());
    assert_eq!(t.state(), "ESTABLISHED");
    assert_eq!(t.e.nat.tcp.half_open(), 0);

    // The guest answers and acknowledges the request: the answer reaches the client, the
    // request leaves the socket, and the answer is acknowledged with a scaled window.
    let answer = b"HTTP/1.0 200 OK\r\n\r\n";
    let mut a = t.data(0, answer);
    a.ack = Some(t.iss + 1 + request.len() as u32);
    assert!(t.send(&a).is_empty(), "a small segment's ACK waits");
    assert_eq!(t.tcp().written, answer);
    assert!(t.tcp().recv.is_empty(), "acknowledged bytes are consumed");
    let got = t.advance(DELAYED_ACK);
    let ack = got.last().expect("an ACK");
    assert!(ack.is_pure_ack());
    assert_eq!(ack.ack, Some(GISS + 1 + answer.len() as u32));
    assert!(ack.window < 65535, "scaled by 3: {}", ack.window);

    let id = row.id;
    assert_eq!(
        t.events(),
        vec![
            Event::InboundSessionCreated {
                proto: crate::nat::Proto::Tcp,
                id,
                src: std::net::SocketAddr::from(CLIENT),
                dst: std::net::SocketAddr::from(guest),
            },
            Event::TcpConnected {
                id,
                ip: std::net::IpAddr::from(GUEST),
                port: SERVER_PORT,
            },
        ]
    );
    let row = &t.e.sessions()[0];
    assert_eq!((row.bytes_to_host, row.bytes_to_guest), (19, 18));
}

#[test]
fn inbound_to_a_guest_without_options_uses_none() {
    let mut t = T::new();
    t.inbound();
    let got = t.send(&t.syn_ack(NONE));
    assert!(got.len() == 1 && got[0].is_pure_ack() && got[0].ack == Some(GISS + 1));
    assert_eq!(got[0].ts, None);
    assert_eq!(got[0].window, 65535, "unscaled: 256 KiB capped at 65535");
    let sock = t.sock;
    t.h.deliver_tcp(sock, &bytes(2000));
    let got = t.pump();
    let sizes: Vec<usize> = got.iter().map(|g| g.payload.len()).collect();
    assert_eq!(
        sizes,
        [536, 536, 536, 392],
        "the default MSS without the guest's"
    );
    assert!(got.iter().all(|g| g.ts.is_none() && g.sack.is_empty()));
}

#[test]
fn inbound_syn_is_retransmitted_then_given_up_and_the_client_reset() {
    let mut t = T::new();
    let syn = t.inbound();
    let sock = t.sock;
    let mut at = Duration::ZERO;
    for wait in [1, 2] {
        let wait = Duration::from_secs(wait);
        assert!(t.advance(wait - Duration::from_millis(1)).is_empty());
        let got = t.advance(Duration::from_millis(1));
        at += wait;
        assert_eq!(got.len(), 1, "at {at:?}: {got:?}");
        assert!(got[0].syn && got[0].seq == syn.seq && got[0].ack.is_none());
    }
    assert!(t.advance(Duration::from_millis(3999)).is_empty());
    assert!(!t.h.aborted.contains(&sock));
    let got = t.advance(Duration::from_millis(1));
    // Given up at 7 s: the client is reset; a guest whose SYN-ACK is under way is too.
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].rst && got[0].seq == t.iss + 1 && got[0].ack.is_none());
    assert!(t.aborted(sock));
    assert_eq!(t.state(), "none");
    assert_eq!(t.e.nat.tcp.half_open(), 0);
    let ev = t.events();
    assert!(ev.contains(&Event::TcpConnectFailed {
        id: 1,
        ip: std::net::IpAddr::from(GUEST),
        port: SERVER_PORT,
        reason: "timed out".into(),
    }));
    assert!(ev.contains(&Event::SessionDeleted {
        proto: crate::nat::Proto::Tcp,
        id: 1
    }));
    // A SYN-ACK that comes late meets no connection: reset.
    let got = t.send(&t.syn_ack(NONE));
    assert!(got.len() == 1 && got[0].rst && got[0].seq == t.iss + 1);
}

#[test]
fn inbound_guest_rst_resets_the_client() {
    let mut t = T::new();
    t.inbound();
    let sock = t.sock;
    // Without an ACK of our SYN a RST proves nothing: ignored.
    assert!(t.send(&t.s(TcpControl::Rst, GISS, None)).is_empty());
    let bad = t.s(TcpControl::Rst, 0, Some(t.iss + 9));
    assert!(t.send(&bad).is_empty(), "never a RST for a RST");
    assert_eq!(t.state(), "SYN_SENT");
    assert!(t.h.aborted.is_empty());
    // Port closed on the guest: RST|ACK of our SYN.
    assert!(t.send(&t.s(TcpControl::Rst, 0, Some(t.iss + 1))).is_empty());
    assert!(t.aborted(sock));
    assert_eq!(t.state(), "none");
    assert_eq!(t.e.nat.tcp.half_open(), 0);
    assert!(t.events().contains(&Event::TcpConnectFailed {
        id: 1,
        ip: std::net::IpAddr::from(GUEST),
        port: SERVER_PORT,
        reason: "connection refused".into(),
    }));
}

#[test]
fn inbound_bad_syn_ack_is_reset_and_strays_are_ignored() {
    let mut t = T::new();
    t.inbound();
    // An ACK of something we never sent: RST at that ACK (RFC 9293 3.10.7.3).
    let mut bad = t.syn_ack(ALL);
    bad.ack = Some(t.iss + 7);
    let got = t.send(&bad);
    assert_eq!(got.len(), 1);
    assert!(got[0].rst && got[0].seq == t.iss + 7 && got[0].ack.is_none());
    // An ACK without SYN, and a SYN without ACK (a simultaneous open): dropped.
    assert!(t.send(&t.ack(0)).is_empty());
    assert!(t.send(&t.syn(ALL)).is_empty());
    let mut data = t.data(0, b"early");
    data.ack = None;
    assert!(t.send(&data).is_empty());
    assert_eq!(t.state(), "SYN_SENT");
    assert!(t.h.aborted.is_empty());
    // The real SYN-ACK still makes the connection.
    let got = t.send(&t.syn_ack(ALL));
    assert!(got.len() == 1 && got[0].is_pure_ack());
    assert_eq!(t.state(), "ESTABLISHED");
    // A retransmitted SYN-ACK (our ACK lost) is answered as any old segment: an ACK.
    let got = t.send(&t.syn_ack(ALL));
    assert!(got.len() == 1 && got[0].is_pure_ack() && got[0].ack == Some(GISS + 1));
}

#[test]
fn inbound_limits_refuse_and_reset_the_client() {
    let mut c = cfg();
    c.nat.max_half_open = 1;
    let mut t = T::with(c, SimSockets::default());
    t.inbound();
    let other = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
    assert_eq!(t.accept_from(other).unwrap_err(), InboundRefused::Limit);
    let refused = t.sock;
    assert!(t.aborted(refused), "the client sees a reset");
    assert_eq!(t.drops(DropReason::Limit), 1);
    assert_eq!(t.e.sessions().len(), 1);
    // The same client and guest twice: the pair is taken.
    assert_eq!(t.accept_from(CLIENT).unwrap_err(), InboundRefused::InUse);
    assert!(t.aborted(t.sock));
    assert_eq!(t.drops(DropReason::Limit), 2);
    // Once the guest answered the first, its half-open slot is free again.
    assert_eq!(t.dst, CLIENT);
    let got = t.send(&t.syn_ack(NONE));
    assert!(got.len() == 1 && got[0].is_pure_ack());
    let got = t.accept_from(other).expect("a slot is free");
    assert!(got.len() == 1 && got[0].syn && got[0].src == other);
    assert_eq!(t.e.nat.tcp.half_open(), 1);
}

#[test]
fn inbound_sessions_count_against_the_guests_share() {
    let mut c = cfg();
    c.nat.max_sessions_per_guest = 1;
    let mut t = T::with(c, SimSockets::default());
    t.establish(NONE);
    assert_eq!(t.accept_from(CLIENT).unwrap_err(), InboundRefused::Limit);
    assert!(t.aborted(t.sock));
    assert_eq!(t.drops(DropReason::Limit), 1);
    assert_eq!(t.e.sessions().len(), 1);
}

#[test]
fn inbound_closes_both_ways_and_its_tombstone_gives_way() {
    let mut t = T::new();
    t.inbound();
    t.send(&t.syn_ack(NONE));
    let sock = t.sock;
    // The client closes first: our FIN to the guest.
    t.h.tcp_fin(sock);
    let got = t.pump();
    assert!(got.len() == 1 && got[0].fin && got[0].seq == t.iss + 1);
    assert_eq!(t.state(), "FIN_WAIT");
    // The guest acknowledges it and closes too: the socket is shut and closed.
    let fin = t.s(TcpControl::Fin, GISS + 1, Some(t.iss + 2));
    let got = t.send(&fin);
    assert!(got.len() == 1 && got[0].ack == Some(GISS + 2));
    assert!(t.tcp_aborted_or_closed());
    assert_eq!(t.state(), "TIME_WAIT");
    // The same client comes back before the tombstone is gone: a new connection.
    let got = t.accept_from(CLIENT).expect("the tombstone gives way");
    assert!(got.len() == 1 && got[0].syn);
    assert_eq!(t.state(), "SYN_SENT");
}

#[test]
fn inbound_host_reset_idle_timeout_and_shutdown_reset_the_guest() {
    // The client resets before the guest answered: RST after our SYN.
    let mut t = T::new();
    t.inbound();
    let sock = t.sock;
    t.h.events
        .push_back(SockEvent::Failed(sock, std::io::ErrorKind::ConnectionReset));
    let got = t.pump();
    assert!(got.len() == 1 && got[0].rst && got[0].seq == t.iss + 1);
    assert_eq!(t.state(), "none");
    assert_eq!(t.e.nat.tcp.half_open(), 0);

    // Idle: reset both ways, as an outbound connection.
    let mut t = T::new();
    t.inbound();
    t.send(&t.syn_ack(NONE));
    let sock = t.sock;
    assert!(t.advance(Duration::from_secs(7199)).is_empty());
    let got = t.advance(Duration::from_secs(1));
    assert!(got.len() == 1 && got[0].rst && got[0].seq == t.iss + 1);
    assert!(t.aborted(sock));
    assert_eq!(t.state(), "none");

    // Shutdown: the half-open connection's guest is reset too, every socket closed.
    let mut t = T::new();
    t.inbound();
    let sock = t.sock;
    t.e.shutdown(t.now, &mut t.h, &mut t.out);
    let got: Vec<Got> = t.out.iter().map(parse_out).collect();
    assert!(got.len() == 1 && got[0].rst && got[0].seq == t.iss + 1);
    assert!(t.h.closed.contains(&sock));
    assert!(t.e.sessions().is_empty());
    assert_eq!(t.e.nat.tcp.half_open(), 0);
}

#[test]
fn inbound_from_the_hosts_loopback_is_shown_as_the_virtual_host() {
    let mut t = T::new();
    let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 40123);
    let got = t.accept_from(local).unwrap();
    let shown = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 1), 40123);
    assert!(got.len() == 1 && got[0].syn && got[0].src == shown);
    t.iss = got[0].seq;
    // The guest answers the virtual host's address on its own network, and that is this flow.
    let got = t.send(&t.syn_ack(NONE));
    assert!(got.len() == 1 && got[0].is_pure_ack());
    assert_eq!(t.state(), "ESTABLISHED");
    let sock = t.sock;
    assert_eq!(t.tcp().dst, std::net::SocketAddr::from(local));
    t.send(&t.data(0, b"hi"));
    assert_eq!(t.h.tcp(sock).unwrap().written, b"hi");
}

#[test]
fn inbound_while_batching_sends_the_syn_at_once() {
    let mut t = T::new();
    t.e.set_batching(true);
    t.inbound();
    let got = t.send(&t.syn_ack(ALL));
    assert!(got.len() == 1 && got[0].is_pure_ack());
    t.e.flush(t.now, &mut t.h, &mut t.out);
    t.batch(&[t.data(0, b"ab"), t.data(2, b"cd")]);
    t.e.flush(t.now, &mut t.h, &mut t.out);
    let got = t.pump();
    assert_eq!(t.tcp().written, b"abcd");
    assert!(got.iter().any(|g| g.ack == Some(GISS + 5)), "{got:?}");
}

/// A removed forward's connections are reset both ways; another forward's stay.
#[test]
fn closing_a_forward_resets_its_connections_only() {
    let mut t = T::new();
    t.inbound();
    t.send(&t.syn_ack(NONE));
    let sock = t.sock;
    assert_eq!(t.state(), "ESTABLISHED");
    let (now, h, out) = (t.now, &mut t.h, &mut t.out);
    assert_eq!(t.e.close_forward(now, 2, h, out), 0, "another forward's");
    assert!(t.out.is_empty());
    assert_eq!(t.state(), "ESTABLISHED");
    let (now, h, out) = (t.now, &mut t.h, &mut t.out);
    assert_eq!(t.e.close_forward(now, 1, h, out), 1);
    let got: Vec<Got> = t.out.iter().map(parse_out).collect();
    assert!(got.len() == 1 && got[0].rst, "{got:?}");
    assert!(t.aborted(sock));
    assert_eq!(t.state(), "none");
}

/// The frames the engine emitted since the last pump, raw, with their segment sizes.
fn pump_gso(t: &mut T) -> Vec<(Vec<u8>, u16)> {
    let evs = t.h.drain_events();
    for ev in evs {
        t.e.handle_host_event(t.now, ev, &mut t.h, &mut t.out);
    }
    let got = t.out.iter_gso().map(|(f, g)| (f.to_vec(), g)).collect();
    t.out.clear();
    got
}

/// A super-frame's TCP checksum completed as the guest's side of the port does it (the field
/// holds the pseudo-header's sum; the rest of the segment is added), then checked as a receiver
/// would check a whole segment.
fn completed_checksum_holds(frame: &[u8]) -> bool {
    let mut f = frame.to_vec();
    let l4 = 14 + 20;
    let sum = crate::wire::ones_sum(&f[l4..]);
    f[l4 + 16..l4 + 18].copy_from_slice(&(!sum).to_be_bytes());
    let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
}

#[test]
fn toward_a_port_that_cuts_segments_a_flight_goes_out_as_one_super_frame() {
    let mut t = T::new();
    t.e.ctx.tcp_gso = true;
    let mut o = NONE;
    o.mss = Some(1000);
    t.establish(o);
    let data = bytes(30_000);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &data);
    let got = pump_gso(&mut t);
    // The initial congestion window, 10 segments, in one frame cut at 1000 bytes.
    assert_eq!(
        got.len(),
        1,
        "{:?}",
        got.iter().map(|(f, g)| (f.len(), *g)).collect::<Vec<_>>()
    );
    let (f, gso) = &got[0];
    assert_eq!(*gso, 1000);
    let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(usize::from(ip.total_len()), f.len() - 14);
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!(tcp.seq_number().0 as u32, t.iss + 1);
    assert_eq!(tcp.payload(), &data[..10_000]);
    assert!(completed_checksum_holds(f), "the field starts the checksum");
    // A segment's worth or less goes out as a plain frame with its whole checksum.
    let mut a = t.ack(10_000);
    a.window = 500;
    t.send(&a);
    let got = pump_gso(&mut t);
    assert!(got.is_empty() || got.iter().all(|(_, g)| *g == 0));
}

#[test]
fn a_loss_inside_a_super_frame_is_retransmitted_as_one_plain_segment() {
    let mut t = T::new();
    t.e.ctx.tcp_gso = true;
    let mut o = NONE;
    o.mss = Some(1000);
    t.establish(o);
    let data = bytes(10_000);
    let sock = t.sock;
    t.h.deliver_tcp(sock, &data);
    let got = pump_gso(&mut t);
    assert_eq!((got.len(), got[0].1), (1, 1000));
    // The guest got segments 1–3, lost the 4th of the super-frame and got the rest: it
    // acknowledges 3000 four times.
    t.send(&t.ack(3000));
    assert!(t.send(&t.ack(3000)).is_empty());
    assert!(t.send(&t.ack(3000)).is_empty());
    let got = t.send(&t.ack(3000));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].seq, t.iss + 1 + 3000);
    assert_eq!(got[0].payload, data[3000..4000]);
    assert!(t.send(&t.ack(10_000)).is_empty());
    assert!(t.tcp().recv.is_empty());
}

#[test]
fn a_segment_whose_checksum_was_left_to_the_port_is_taken_without_it() {
    let mut t = T::new();
    t.establish(NONE);
    let data = bytes(3000);
    // A guest with checksum offload: the field holds the pseudo-header's sum only.
    let mut f = t.frame(&t.data(0, &data));
    let l4 = 14 + 20;
    f[l4 + 16..l4 + 18].copy_from_slice(&0x1234u16.to_be_bytes());
    t.e.handle_frame(t.now, &f, &mut t.h, &mut t.out);
    t.pump();
    assert_eq!(t.drops(DropReason::BadChecksum), 1, "verified as any frame");
    assert!(t.tcp().written.is_empty());
    t.e.handle_frame_checksum_left(t.now, &f, &mut t.h, &mut t.out);
    let got = t.pump();
    assert_eq!(t.tcp().written, data);
    assert_eq!(got.last().and_then(|g| g.ack), Some(GISS + 1 + 3000));
    // The next frame is verified again.
    let mut g = t.frame(&t.data(3000, &data[..10]));
    g[l4 + 16..l4 + 18].copy_from_slice(&0x1234u16.to_be_bytes());
    t.e.handle_frame(t.now, &g, &mut t.h, &mut t.out);
    assert_eq!(t.drops(DropReason::BadChecksum), 2);
}
