//! One terminated TCP connection: the guest's peer on one side, a sock-side socket on the other.
//!
//! Guest → sock side, in-order payload is written straight to the socket and only what the socket
//! took is acknowledged; what it refused, and what arrived out of order, waits in the bounded
//! reassembly ring (`RecvRing`) inside the advertised window (nothing beyond it is ever
//! accepted). Sock side → guest, data stays in the socket until the guest acknowledges it:
//! segments are peeked from the socket at `seq - snd_una` straight into the outgoing frame,
//! retransmissions re-peek, and an ACK consumes. Congestion control is NewReno (RFC 5681/6582)
//! with SACK-guided hole retransmission (RFC 2018, a simplified RFC 6675); RTO per RFC 6298.
//!
//! Memory: `size_of::<TcpConn>()` (600 bytes on x86-64, its addresses being of either family; a test asserts at most 640) plus the
//! reassembly ring of `rcv_buf` bytes (256 KiB by default), held only while data waits in it
//! (out of order, refused by a full socket, or, with batching, until the batch's write) and
//! otherwise back in the per-thread pool (`reassembly::POOLED_RINGS`): an idle connection holds
//! none.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use super::reassembly::{RecvRing, RingBudget};
use super::segment::{self, Hdr, Seg, TS_OPTION_LEN};
use super::seq::Seq;
use crate::config::Mac;
use crate::event::Event;
use crate::nat::icmp_error::{self, Quote};
use crate::nat::Direction;
use crate::output::FrameBatch;
use crate::sockio::{SockId, SockIo, Unreachable};
use crate::time::{earliest, Instant};
use crate::Ctx;

/// RFC 6298 bounds (2.4 allows a smaller minimum than 1 s; Linux uses 200 ms).
pub(crate) const MIN_RTO: Duration = Duration::from_millis(200);
pub(crate) const MAX_RTO: Duration = Duration::from_secs(60);
pub(crate) const INITIAL_RTO: Duration = Duration::from_secs(1);
/// Retransmissions of one segment before the connection is given up (reset both ways).
pub(crate) const MAX_BACKOFFS: u8 = 8;
/// Retransmissions of our SYN to a guest before an inbound connection is given up: sent at
/// 0, 1 and 3 s, given up at 7 s. The client is connected already and waits; a guest that
/// does not answer in that time is not listening (or not there).
pub(crate) const SYN_RETRIES: u8 = 2;
/// How long a closed connection's tombstone answers retransmitted FINs (shortened TIME-WAIT; the
/// sock-side socket is already closed).
pub(crate) const TIME_WAIT: Duration = Duration::from_secs(5);
/// RFC 9293 default MSS when the guest sends none.
const DEFAULT_MSS: usize = 536;
/// Initial congestion window, in segments (RFC 6928).
const INITIAL_WINDOW: usize = 10;
/// SACK scoreboard size.
const SACK_SLOTS: usize = 4;

/// How long the ACK of a lone small segment, or of the guest's FIN, waits for data or our FIN
/// to carry it. A request's answer, or the server's close after the guest's, usually follows
/// within tens of microseconds on the host's side; carried, the ACK costs the guest no frame of
/// its own (a TAP write, and the guest's receive path, each): a short connection's frames
/// toward the guest go from five to three (PERF.md, "Delayed ACKs"). A guest that waits for it
/// (Nagle's algorithm holding a second small write) waits this long, far below the 40 ms a
/// Linux receiver's delayed ACK can take. Full-sized segments and anything out of order are
/// acknowledged at the batch's end as before.
pub(crate) const DELAYED_ACK: Duration = Duration::from_micros(500);

/// With batching, a connection writes at once (not at the batch's end) once this much waits:
/// the size of one GSO packet on the sock side.
const FLUSH_AT: usize = 64 * 1024;

/// With batching, an in-order segment at least this large (a guest's TSO super-segment) is
/// written at once from the frame even within a batch, when nothing waits before it: copying
/// it into the ring first would cost a pass over its bytes to save a write it is worth alone.
const WRITE_AT_ONCE: usize = 16 * 1024;

/// The most unacknowledged data toward the guest, in bytes (at least `MIN_FLIGHT_SEGMENTS`).
/// Unacknowledged data stays in the sock-side socket and every peek at an offset makes the kernel
/// walk the socket's queue from its head to that offset, a buffer at a time: with the guest's
/// multi-megabyte windows that walk took a fifth of the download's CPU. A virtual segment's
/// round trip is tens of microseconds, so 256 KiB still covers its bandwidth-delay product many
/// times over.
const MAX_FLIGHT: usize = 256 * 1024;
const MIN_FLIGHT_SEGMENTS: usize = 16;

/// What the caller of an event handler must do with the connection afterwards.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Next {
    Keep,
    /// The connection is over: close its socket (already aborted if it had to be) and forget it.
    Delete,
    /// Both sides closed: close the socket, keep the tombstone until `TIME_WAIT` has passed.
    TimeWait,
    /// A new SYN hit a tombstone: forget it and handle the SYN as a new connection.
    Reopen,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum State {
    /// The sock-side connect is in progress (we have the guest's SYN, sent nothing yet).
    Connecting,
    /// Inbound: our SYN is sent to the guest, its SYN-ACK awaited (the sock-side socket is a
    /// client's, already connected).
    SynSent,
    /// SYN-ACK sent, waiting for the guest's ACK.
    SynReceived,
    /// Synchronized; FIN progress is in `shut_wr` / `fin_seq`.
    Open,
    /// Tombstone: no socket, answers retransmitted FINs.
    TimeWait,
}

/// One handling of a TCP connection (a segment from the guest, a socket event, a timer): what
/// every handler of `TcpConn` works with. Not the engine-wide `Ctx`, which it borrows.
pub(crate) struct Handling<'a, H: SockIo> {
    pub(crate) now: Instant,
    pub(crate) ctx: &'a mut Ctx,
    pub(crate) io: &'a mut H,
    pub(crate) out: &'a mut FrameBatch,
    pub(crate) peek: &'a mut PeekCache,
}

impl<'a, H: SockIo> Handling<'a, H> {
    pub(crate) fn new(
        now: Instant,
        ctx: &'a mut Ctx,
        io: &'a mut H,
        out: &'a mut FrameBatch,
        peek: &'a mut PeekCache,
    ) -> Handling<'a, H> {
        Handling {
            now,
            ctx,
            io,
            out,
            peek,
        }
    }
}

/// Most a connection peeks from its socket in one call when it has room for several segments.
const PEEK_MAX: usize = 64 * 1024;

/// Bytes peeked from one socket in one call, cut into segments by one `transmit`.
///
/// Peeking per segment costs a syscall per MSS, and the kernel walks its receive queue from
/// the front to the peek offset on every call; one large peek per `transmit` does both once.
/// The bytes are copied once more (cache → frame), which costs far less than the syscalls.
#[derive(Default)]
pub(crate) struct PeekCache {
    buf: Vec<u8>,
    /// Whose bytes these are, and the sequence number of the first.
    owner: Option<(SockId, Seq)>,
    len: usize,
    /// The peek got less than it asked for: these are all the bytes the socket held.
    whole: bool,
}

impl PeekCache {
    /// The cached bytes from `seq` on, if this socket's cache covers `seq`, and whether they
    /// are all the socket held when peeked. An empty cache that was the whole socket is an
    /// answer too (nothing to send, or the FIN its peek saw); the end of cached bytes is not:
    /// a FIN behind data shows only to a peek at the data's end.
    fn get(&self, sock: SockId, seq: Seq) -> Option<(&[u8], bool)> {
        let (s, start) = self.owner?;
        if s != sock || seq < start {
            return None;
        }
        let off = seq.since(start);
        let empty_whole = self.len == 0 && off == 0 && self.whole;
        (off < self.len || empty_whole).then(|| (&self.buf[off..self.len], self.whole))
    }

    fn clear(&mut self) {
        self.owner = None;
        self.len = 0;
        self.whole = false;
    }
}

/// The parameters a new connection takes from the configuration and the randomness.
pub(crate) struct Params {
    pub(crate) rcv_buf: usize,
    /// The ring storage the connections of this thread may hold.
    pub(crate) rings: RingBudget,
    pub(crate) mtu: usize,
    pub(crate) iss: Seq,
    pub(crate) ts_offset: u32,
    pub(crate) connect_timeout: Duration,
}

/// A socket operation failed: reset both ways.
struct Broken;

pub(crate) struct TcpConn {
    pub(crate) id: u32,
    pub(crate) sock: Option<SockId>,
    /// Batching (see `Engine::set_batching`): in-order payload waits in the ring for
    /// `flush_writes`, so a batch's segments reach the socket in one write.
    pub(crate) defer_writes: bool,
    /// Payload waits for `flush_writes`.
    pub(crate) flush_pending: bool,
    /// On the table's list of connections to flush.
    pub(crate) in_dirty: bool,
    pub(crate) guest: SocketAddr,
    /// The destination as the guest sees it (source of our segments).
    pub(crate) dst: SocketAddr,
    /// Where the sock-side socket connects (differs from `dst` for the host loopback alias and DNS).
    pub(crate) target: SocketAddr,
    guest_mac: Mac,
    /// Who opened it: the guest (its SYN) or a forward (our SYN to the guest).
    pub(crate) direction: Direction,
    /// The guest's SYN, as an ICMP error about its connect quotes it; boxed, and dropped once
    /// connected, to keep the connection small.
    pub(crate) syn: Option<Box<Quote>>,
    /// The forward an inbound connection came through.
    pub(crate) forward: Option<u32>,
    pub(crate) state: State,
    pub(crate) created: Instant,
    pub(crate) last_used: Instant,
    /// The earliest deadline this connection has in the timer heap.
    pub(crate) scheduled: Option<Instant>,
    connect_deadline: Option<Instant>,
    tw_deadline: Option<Instant>,
    rto_deadline: Option<Instant>,
    persist_deadline: Option<Instant>,
    ack_deadline: Option<Instant>,

    // Negotiated options.
    ts_enabled: bool,
    ts_recent: u32,
    ts_offset: u32,
    sack_ok: bool,
    /// The guest offered window scaling (so we answer with ours and both shifts apply).
    ws_ok: bool,
    /// The guest's window shift (applies to windows it sends).
    snd_shift: u8,
    /// Our window shift (applies to windows we send).
    rcv_shift: u8,
    /// Payload bytes per segment toward the guest (its MSS, our MTU, minus options).
    mss: usize,
    /// The MSS we offer (largest payload the guest may send us).
    our_mss: u16,

    // Receive side (guest → sock side).
    irs: Seq,
    pub(crate) rcv_nxt: Seq,
    rcv_wnd: usize,
    ring: RecvRing,
    /// Sequence number of the guest's FIN, once seen (processed when `rcv_nxt` reaches it).
    guest_fin: Option<Seq>,
    /// The guest's FIN was consumed and the sock-side socket shut for writing.
    shut_wr: bool,
    guest_closed_first: bool,
    /// In-order segments written but not acknowledged yet.
    ack_owed: u8,
    /// What is owed is one segment smaller than `mss`, or the guest's FIN: its ACK may wait
    /// `DELAYED_ACK` for a segment of ours to carry it.
    ack_may_wait: bool,
    /// The socket refused bytes; `Writable` will drain the ring.
    write_blocked: bool,
    /// A peek for new data found nothing (and no end of stream), and no `Readable` came since:
    /// another peek would only fail (a wasted syscall for every ACK of an upload). Data or a
    /// FIN arriving later always brings a `Readable`, which clears it.
    host_drained: bool,

    // Send side (sock side → guest).
    iss: Seq,
    snd_una: Seq,
    pub(crate) snd_nxt: Seq,
    snd_max: Seq,
    snd_wnd: usize,
    snd_wl1: Seq,
    snd_wl2: Seq,
    /// Our FIN's sequence number, once the destination's EOF was seen.
    fin_seq: Option<Seq>,
    cwnd: usize,
    ssthresh: usize,
    dupacks: u8,
    /// In fast recovery until `snd_una` reaches this.
    recover: Option<Seq>,
    /// Next sequence number the hole-retransmission may start from.
    rtx_next: Seq,
    sacked: [(Seq, Seq); SACK_SLOTS],
    n_sacked: u8,
    srtt_us: Option<u64>,
    rttvar_us: u64,
    rto: Duration,
    backoffs: u8,
    /// One timed segment when timestamps are off (Karn: cleared on retransmission).
    timing: Option<(Seq, Instant)>,
    persist_backoffs: u8,

    pub(crate) bytes_to_host: u64,
    pub(crate) bytes_to_guest: u64,
    pub(crate) packets_to_host: u64,
    pub(crate) packets_to_guest: u64,
}

/// The shift that lets a 16-bit window field cover `cap` bytes.
fn window_shift(cap: usize) -> u8 {
    let mut s = 0u8;
    while (cap >> s) > 65535 && s < 14 {
        s += 1;
    }
    s
}

fn ts_clock(now: Instant, offset: u32) -> u32 {
    ((now.as_micros() / 1000) as u32).wrapping_add(offset)
}

/// `WouldBlock` is "nothing now", anything else breaks the connection.
fn soft<T: Default>(r: io::Result<T>) -> Result<T, Broken> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(T::default()),
        Err(_) => Err(Broken),
    }
}

impl TcpConn {
    /// A connection for the guest's SYN `syn`, in `Connecting` state.
    pub(crate) fn new(
        id: u32,
        guest: SocketAddr,
        dst: SocketAddr,
        guest_mac: Mac,
        syn: &Seg,
        now: Instant,
        p: &Params,
    ) -> TcpConn {
        let mut c = TcpConn::blank(id, guest, dst, guest_mac, now, p);
        c.negotiate(syn);
        c.connect_deadline = Some(now + p.connect_timeout);
        c.packets_to_host = 1; // the SYN
        c
    }

    /// A connection a forward accepted from `client`, opened toward `guest` by our SYN
    /// (`start_active`), in `SynSent` state. The SYN offers every option; the guest's SYN-ACK
    /// says which are used.
    pub(crate) fn new_active(
        id: u32,
        guest: SocketAddr,
        client: SocketAddr,
        guest_mac: Mac,
        forward: u32,
        now: Instant,
        p: &Params,
    ) -> TcpConn {
        let mut c = TcpConn::blank(id, guest, client, guest_mac, now, p);
        c.state = State::SynSent;
        c.direction = Direction::In;
        c.forward = Some(forward);
        c.ts_enabled = true;
        c.sack_ok = true;
        c.ws_ok = true;
        c.rcv_shift = window_shift(c.ring.cap());
        c.rcv_wnd = ((c.ring.cap() >> c.rcv_shift).min(65535)) << c.rcv_shift;
        c
    }

    /// A connection with nothing negotiated yet: no options, the default MSS, the state
    /// `Connecting`.
    fn blank(
        id: u32,
        guest: SocketAddr,
        dst: SocketAddr,
        guest_mac: Mac,
        now: Instant,
        p: &Params,
    ) -> TcpConn {
        let headers = crate::wire::ip_header_len(guest.ip()) + segment::TCP_HEADER_LEN;
        let our_mss = p.mtu.saturating_sub(headers).clamp(64, 65535);
        let mss = DEFAULT_MSS.min(our_mss);
        let ring = RecvRing::new(p.rcv_buf.max(4096), guest.ip(), p.rings);
        let rcv_wnd = ring.cap().min(65535);
        TcpConn {
            id,
            sock: None,
            defer_writes: false,
            flush_pending: false,
            in_dirty: false,
            guest,
            dst,
            target: dst,
            guest_mac,
            direction: Direction::Out,
            syn: None,
            forward: None,
            state: State::Connecting,
            created: now,
            last_used: now,
            scheduled: None,
            connect_deadline: None,
            tw_deadline: None,
            rto_deadline: None,
            persist_deadline: None,
            ack_deadline: None,
            ts_enabled: false,
            ts_recent: 0,
            ts_offset: p.ts_offset,
            sack_ok: false,
            ws_ok: false,
            snd_shift: 0,
            rcv_shift: 0,
            mss,
            our_mss: our_mss as u16,
            irs: Seq(0),
            rcv_nxt: Seq(0),
            rcv_wnd,
            ring,
            guest_fin: None,
            shut_wr: false,
            guest_closed_first: false,
            ack_owed: 0,
            ack_may_wait: false,
            write_blocked: false,
            host_drained: false,
            iss: p.iss,
            snd_una: p.iss,
            snd_nxt: p.iss,
            snd_max: p.iss,
            snd_wnd: 0,
            snd_wl1: Seq(0),
            snd_wl2: p.iss,
            fin_seq: None,
            cwnd: INITIAL_WINDOW * mss,
            ssthresh: usize::MAX,
            dupacks: 0,
            recover: None,
            rtx_next: p.iss,
            sacked: [(Seq(0), Seq(0)); SACK_SLOTS],
            n_sacked: 0,
            srtt_us: None,
            rttvar_us: 0,
            rto: INITIAL_RTO,
            backoffs: 0,
            timing: None,
            persist_backoffs: 0,
            bytes_to_host: 0,
            bytes_to_guest: 0,
            packets_to_host: 0,
            packets_to_guest: 0,
        }
    }

    /// Takes the guest's side of the handshake from its SYN (passive open) or SYN-ACK (active
    /// open, where we offered every option, so what the guest sends back is what both use).
    fn negotiate(&mut self, syn: &Seg) {
        self.ts_enabled = syn.timestamp.is_some();
        self.ts_recent = syn.timestamp.map_or(0, |t| t.0);
        self.sack_ok = syn.sack_permitted;
        self.ws_ok = syn.window_scale.is_some();
        let cap = self.ring.cap();
        (self.snd_shift, self.rcv_shift) = match syn.window_scale {
            Some(ws) => (ws, window_shift(cap)),
            None => (0, 0),
        };
        self.rcv_wnd = ((cap >> self.rcv_shift).min(65535)) << self.rcv_shift;
        let our_mss = usize::from(self.our_mss);
        let guest_mss = syn.mss.map_or(DEFAULT_MSS, usize::from).max(64);
        let opt = if self.ts_enabled { TS_OPTION_LEN } else { 0 };
        self.mss = guest_mss.min(our_mss) - opt;
        self.cwnd = INITIAL_WINDOW * self.mss;
        self.irs = syn.seq;
        self.rcv_nxt = syn.seq + 1;
        // The window of a SYN is never scaled (RFC 7323 2.2).
        self.snd_wnd = syn.window as usize;
        self.snd_wl1 = syn.seq;
    }

    /// The state's name for the session table.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.state {
            State::Connecting | State::SynSent => "SYN_SENT",
            State::SynReceived => "SYN_RECEIVED",
            State::TimeWait => "TIME_WAIT",
            State::Open => {
                let fin_sent = self.fin_seq.is_some_and(|f| self.snd_max > f);
                match (self.shut_wr, fin_sent) {
                    (false, false) => "ESTABLISHED",
                    (true, false) => "CLOSE_WAIT",
                    (false, true) => "FIN_WAIT",
                    (true, true) => "LAST_ACK",
                }
            }
        }
    }

    /// When this connection next needs `on_timer`.
    pub(crate) fn deadline(&self, idle: Duration) -> Option<Instant> {
        if self.state == State::TimeWait {
            return self.tw_deadline;
        }
        let mut t = Some(self.last_used + idle);
        for d in [
            self.connect_deadline,
            self.rto_deadline,
            self.persist_deadline,
            self.ack_deadline,
        ] {
            t = earliest(t, d);
        }
        t
    }

    /// Bytes of heap this connection holds (the reassembly ring, once used).
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ring.allocated()
    }

    /// Guest bytes waiting in the ring (out of order, or refused by the socket).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.ring.len()
    }

    // ---- building segments ----------------------------------------------------------------

    fn max_flight(&self) -> usize {
        MAX_FLIGHT.max(MIN_FLIGHT_SEGMENTS * self.mss)
    }

    fn window_field(&self) -> u16 {
        (self.rcv_wnd >> self.rcv_shift).min(65535) as u16
    }

    fn hdr(&self, now: Instant, seq: Seq) -> Hdr {
        let mut h = Hdr::new(self.dst, self.guest, seq);
        h.ack = Some(self.rcv_nxt);
        h.window = self.window_field();
        h.timestamp = self
            .ts_enabled
            .then(|| (ts_clock(now, self.ts_offset), self.ts_recent));
        h
    }

    fn push_hdr<H: SockIo>(&mut self, cx: &mut Handling<H>, hdr: Hdr) {
        let ident = cx.ctx.next_ident();
        segment::push(
            cx.out,
            cx.ctx.mac,
            self.guest_mac,
            ident,
            hdr,
            0,
            None,
            |_, _| 0,
        );
        self.packets_to_guest += 1;
    }

    /// A pure ACK (with SACK blocks for what waits out of order).
    fn send_ack<H: SockIo>(&mut self, cx: &mut Handling<H>) {
        let mut h = self.hdr(cx.now, self.snd_nxt);
        if self.sack_ok {
            h.sack = self.ring.sack_blocks(self.rcv_nxt);
        }
        self.push_hdr(cx, h);
        self.ack_sent();
    }

    fn ack_sent(&mut self) {
        self.ack_owed = 0;
        self.ack_may_wait = false;
        self.ack_deadline = None;
    }

    /// The ACK owed waits up to `DELAYED_ACK` (from when it first waited) for data or our FIN.
    fn delay_ack(&mut self, now: Instant) {
        self.ack_owed = 1;
        self.ack_may_wait = true;
        self.ack_deadline.get_or_insert(now + DELAYED_ACK);
    }

    /// RST|ACK toward the guest at our current position.
    fn send_rst<H: SockIo>(&mut self, cx: &mut Handling<H>) {
        if self.state == State::SynSent {
            // Nothing of the guest's is known to acknowledge. A guest whose SYN-ACK is under
            // way (SYN-RECEIVED) takes a RST at the sequence number after our SYN, the one its
            // window starts at (RFC 9293 3.10.7.4).
            let mut h = Hdr::new(self.dst, self.guest, self.iss + 1);
            h.rst = true;
            self.push_hdr(cx, h);
            return;
        }
        let mut h = self.hdr(cx.now, self.snd_nxt);
        h.rst = true;
        h.timestamp = None;
        if self.state == State::Connecting {
            h.seq = Seq(0);
        }
        self.push_hdr(cx, h);
    }

    fn send_syn_ack<H: SockIo>(&mut self, cx: &mut Handling<H>) {
        let mut h = self.hdr(cx.now, self.iss);
        h.syn = true;
        h.window = self.rcv_wnd.min(65535) as u16;
        h.mss = Some(self.our_mss);
        h.window_scale = self.ws_ok.then_some(self.rcv_shift);
        h.sack_permitted = self.sack_ok;
        self.push_hdr(cx, h);
    }

    /// Our SYN toward the guest (active open), with every option we can use.
    fn send_syn<H: SockIo>(&mut self, cx: &mut Handling<H>) {
        let mut h = self.hdr(cx.now, self.iss);
        h.ack = None;
        h.syn = true;
        h.window = self.rcv_wnd.min(65535) as u16;
        h.mss = Some(self.our_mss);
        h.window_scale = Some(self.rcv_shift);
        h.sack_permitted = true;
        self.push_hdr(cx, h);
    }

    /// Opens an inbound connection: the first SYN to the guest, and its retransmission timer.
    pub(crate) fn start_active<H: SockIo>(&mut self, cx: &mut Handling<H>) {
        self.snd_nxt = self.iss + 1;
        self.snd_max = self.snd_nxt;
        self.send_syn(cx);
        self.rto_deadline = Some(cx.now + self.rto);
        self.timing = Some((self.snd_nxt, cx.now));
    }

    // ---- socket events ---------------------------------------------------------------------

    pub(crate) fn on_connected<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        if self.state != State::Connecting {
            return Next::Keep;
        }
        self.state = State::SynReceived;
        self.connect_deadline = None;
        self.syn = None;
        // Nothing peeked yet, but the socket is watched from its creation: whatever the
        // destination sends brings a `Readable`, so the guest's ACK need not peek first.
        self.host_drained = true;
        self.snd_nxt = self.iss + 1;
        self.snd_max = self.snd_nxt;
        self.send_syn_ack(cx);
        self.rto_deadline = Some(cx.now + self.rto);
        self.timing = Some((self.snd_nxt, cx.now));
        Next::Keep
    }

    /// The connect failed or timed out: the guest sees "connection refused".
    pub(crate) fn refuse<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        self.send_rst(cx);
        Next::Delete
    }

    /// The connect failed for want of a way to the destination: the guest hears it as from a
    /// router, destination unreachable (a reset when there is no SYN to quote).
    pub(crate) fn unreachable<H: SockIo>(
        &mut self,
        cx: &mut Handling<H>,
        why: Unreachable,
    ) -> Next {
        let Some(syn) = self.syn.take().filter(|_| self.state == State::Connecting) else {
            return self.refuse(cx);
        };
        let mac = Some(self.guest_mac);
        if let Err(drop) = icmp_error::unreachable(cx.ctx, cx.out, why, syn.bytes(), mac) {
            cx.ctx.stats.drop(drop);
        }
        Next::Delete
    }

    /// The sock-side socket failed (reset by the destination): reset the guest.
    pub(crate) fn on_failed<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        if self.state == State::Connecting {
            return self.refuse(cx);
        }
        self.send_rst(cx);
        Next::Delete
    }

    pub(crate) fn on_readable<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        self.last_used = cx.now;
        self.host_drained = false;
        self.output(cx, false)
    }

    pub(crate) fn on_writable<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        if self.state != State::Open {
            return Next::Keep;
        }
        let was_blocked = self.write_blocked;
        self.write_blocked = false;
        let before = self.rcv_nxt;
        if self.drain(cx).is_err() {
            return self.reset_both(cx);
        }
        if self.process_fin(cx).is_err() {
            return self.reset_both(cx);
        }
        if self.rcv_nxt != before || (was_blocked && !self.write_blocked) {
            // Window update: the guest may resume.
            self.ack_owed = 2;
        }
        self.output(cx, false)
    }

    fn reset_both<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        self.send_rst(cx);
        if let Some(s) = self.sock {
            cx.io.tcp_abort(s);
        }
        Next::Delete
    }

    // ---- timers ---------------------------------------------------------------------------

    pub(crate) fn on_timer<H: SockIo>(&mut self, cx: &mut Handling<H>, idle: Duration) -> Next {
        let now = cx.now;
        let due = |d: Option<Instant>| d.is_some_and(|d| d <= now);
        match self.state {
            State::TimeWait => {
                return if due(self.tw_deadline) {
                    Next::Delete
                } else {
                    Next::Keep
                };
            }
            State::Connecting if due(self.connect_deadline) => return self.refuse(cx),
            _ => {}
        }
        if self.last_used + idle <= now {
            return self.reset_both(cx);
        }
        if due(self.ack_deadline) {
            self.send_ack(cx);
        }
        if due(self.rto_deadline) {
            if let Next::Delete = self.on_rto(cx) {
                return Next::Delete;
            }
        }
        if due(self.persist_deadline) {
            self.persist_deadline = None;
            if self.state == State::Open && self.snd_wnd == 0 {
                // Window probe (RFC 9293 3.8.6.1): an out-of-window ACK makes the guest answer
                // with its current window.
                let h = self.hdr(now, self.snd_una - 1);
                self.push_hdr(cx, h);
                self.persist_backoffs = (self.persist_backoffs + 1).min(MAX_BACKOFFS);
                let wait = (self.rto * (1 << self.persist_backoffs)).min(MAX_RTO);
                self.persist_deadline = Some(now + wait);
            }
        }
        Next::Keep
    }

    fn on_rto<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        self.rto_deadline = None;
        let limit = if self.state == State::SynSent {
            SYN_RETRIES
        } else {
            MAX_BACKOFFS
        };
        if self.backoffs >= limit {
            if self.state == State::SynSent {
                self.report_failed(cx, "timed out");
            }
            return self.reset_both(cx);
        }
        self.backoffs += 1;
        self.rto = (self.rto * 2).min(MAX_RTO);
        self.timing = None;
        match self.state {
            State::SynReceived => {
                self.send_syn_ack(cx);
                self.rto_deadline = Some(cx.now + self.rto);
                Next::Keep
            }
            State::SynSent => {
                self.send_syn(cx);
                self.rto_deadline = Some(cx.now + self.rto);
                Next::Keep
            }
            State::Open if self.snd_una < self.snd_max => {
                // RFC 5681 3.1 and 6298 5.5: collapse the window, go back to the first unacked byte.
                let flight = self.snd_max.since(self.snd_una);
                self.ssthresh = (flight / 2).max(2 * self.mss);
                self.cwnd = self.mss;
                self.recover = None;
                self.dupacks = 0;
                self.n_sacked = 0;
                self.snd_nxt = self.snd_una;
                let next = self.output(cx, false);
                if self.rto_deadline.is_none() {
                    self.rto_deadline = Some(cx.now + self.rto);
                }
                next
            }
            _ => Next::Keep,
        }
    }

    fn rtt_sample(&mut self, rtt_us: u64) {
        match self.srtt_us {
            None => {
                self.srtt_us = Some(rtt_us);
                self.rttvar_us = rtt_us / 2;
            }
            Some(srtt) => {
                self.rttvar_us = (3 * self.rttvar_us + srtt.abs_diff(rtt_us)) / 4;
                self.srtt_us = Some((7 * srtt + rtt_us) / 8);
            }
        }
        let rto = self.srtt_us.unwrap_or(0) + (4 * self.rttvar_us).max(1000);
        self.rto = Duration::from_micros(rto).clamp(MIN_RTO, MAX_RTO);
    }
}

impl TcpConn {
    /// Handles a segment from the guest for this connection.
    pub(crate) fn on_segment<H: SockIo>(&mut self, cx: &mut Handling<H>, seg: &Seg) -> Next {
        self.packets_to_host += 1;
        match self.state {
            State::Connecting => {
                if seg.rst && seg.seq == self.rcv_nxt {
                    if let Some(s) = self.sock {
                        cx.io.tcp_abort(s);
                    }
                    return Next::Delete;
                }
                // A retransmitted SYN is absorbed: the SYN-ACK follows the connect.
                return Next::Keep;
            }
            State::SynSent => return self.on_syn_sent(cx, seg),
            State::TimeWait => {
                if seg.rst {
                    return Next::Delete;
                }
                if seg.syn && seg.ack.is_none() {
                    return Next::Reopen;
                }
                self.send_ack(cx);
                return Next::Keep;
            }
            State::SynReceived | State::Open => {}
        }
        self.last_used = cx.now;
        if seg.syn {
            if self.state == State::SynReceived && seg.seq == self.irs && seg.ack.is_none() {
                // Our SYN-ACK was lost.
                self.send_syn_ack(cx);
            } else {
                // RFC 5961 4.2: challenge ACK.
                self.send_ack(cx);
            }
            return Next::Keep;
        }
        // RFC 9293 3.10.7.4, first: the sequence number.
        if !self.acceptable(seg) {
            if !seg.rst {
                self.send_ack(cx);
            }
            return Next::Keep;
        }
        // Second: RST, only at exactly RCV.NXT (RFC 5961 3.2), else challenge ACK.
        if seg.rst {
            if seg.seq == self.rcv_nxt {
                if let Some(s) = self.sock {
                    cx.io.tcp_abort(s);
                }
                return Next::Delete;
            }
            self.send_ack(cx);
            return Next::Keep;
        }
        let Some(ack) = seg.ack else {
            return Next::Keep;
        };
        if let (true, Some((tsval, _))) = (self.ts_enabled, seg.timestamp) {
            if seg.seq <= self.rcv_nxt {
                self.ts_recent = tsval;
            }
        }
        if self.state == State::SynReceived {
            if ack != self.iss + 1 {
                let mut h = Hdr::new(self.dst, self.guest, ack);
                h.rst = true;
                self.push_hdr(cx, h);
                return Next::Keep;
            }
            self.state = State::Open;
            self.snd_una = ack;
            self.rtx_next = ack;
            self.snd_wnd = (seg.window as usize) << self.snd_shift;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            self.rto_deadline = None;
            if self.backoffs == 0 {
                if let Some((_, t)) = self.timing {
                    self.rtt_sample(cx.now.saturating_since(t).as_micros() as u64);
                }
            }
            self.backoffs = 0;
            self.timing = None;
        } else if let Err(next) = self.on_ack(cx, seg, ack) {
            return next;
        }
        let mut dup = false;
        if !self.shut_wr && (!seg.payload.is_empty() || seg.fin) {
            match self.receive(cx, seg) {
                Ok(d) => dup = d,
                Err(Broken) => return self.reset_both(cx),
            }
        }
        if self.process_fin(cx).is_err() {
            return self.reset_both(cx);
        }
        self.output(cx, dup)
    }

    /// A segment from the guest while our SYN waits for its answer (RFC 9293 3.10.7.3).
    fn on_syn_sent<H: SockIo>(&mut self, cx: &mut Handling<H>, seg: &Seg) -> Next {
        let acked = match seg.ack {
            // Only the SYN has been sent: an ACK must be for exactly it.
            Some(ack) if ack != self.iss + 1 => {
                if !seg.rst {
                    let mut h = Hdr::new(self.dst, self.guest, ack);
                    h.rst = true;
                    self.push_hdr(cx, h);
                }
                return Next::Keep;
            }
            Some(_) => true,
            None => false,
        };
        if seg.rst {
            // Only a RST that acknowledges our SYN is the guest's answer to it; any other
            // could be anyone's (RFC 9293 3.10.7.3).
            if !acked {
                return Next::Keep;
            }
            self.report_failed(cx, "connection refused");
            if let Some(s) = self.sock {
                cx.io.tcp_abort(s);
            }
            return Next::Delete;
        }
        // A SYN without ACK (simultaneous open) or a segment without SYN is dropped; our SYN's
        // retransmission goes on.
        if !seg.syn || !acked {
            return Next::Keep;
        }
        self.negotiate(seg);
        self.state = State::Open;
        self.last_used = cx.now;
        let ack = self.iss + 1;
        self.snd_una = ack;
        self.rtx_next = ack;
        self.snd_wl2 = ack;
        self.rto_deadline = None;
        if self.backoffs == 0 {
            if let Some((_, t)) = self.timing {
                self.rtt_sample(cx.now.saturating_since(t).as_micros() as u64);
            }
        }
        self.backoffs = 0;
        self.timing = None;
        cx.ctx.events.push(Event::TcpConnected {
            id: self.id,
            ip: self.guest.ip(),
            port: self.guest.port(),
        });
        // Data or a FIN riding on the SYN-ACK is not taken (the guest sends it again once
        // acknowledged); the client's data that waited in the socket goes out now, carrying
        // the handshake's ACK, or a pure ACK does.
        self.ack_owed = 2;
        self.output(cx, false)
    }

    /// Reports that an inbound connection's guest refused or never answered.
    fn report_failed<H: SockIo>(&self, cx: &mut Handling<H>, reason: &str) {
        cx.ctx.events.push(Event::TcpConnectFailed {
            id: self.id,
            ip: self.guest.ip(),
            port: self.guest.port(),
            reason: reason.into(),
        });
    }

    /// RFC 9293 3.10.7.4's acceptability test against our receive window.
    fn acceptable(&self, seg: &Seg) -> bool {
        let len = seg.payload.len() + seg.fin as usize;
        let end = self.rcv_nxt + self.rcv_wnd;
        if len == 0 {
            if self.rcv_wnd == 0 {
                seg.seq == self.rcv_nxt
            } else {
                seg.seq.in_range(self.rcv_nxt, end)
            }
        } else {
            self.rcv_wnd > 0
                && (seg.seq.in_range(self.rcv_nxt, end)
                    || (seg.seq + (len - 1)).in_range(self.rcv_nxt, end))
        }
    }

    /// The ACK field of a segment in a synchronized state. `Err` ends handling of the segment.
    fn on_ack<H: SockIo>(&mut self, cx: &mut Handling<H>, seg: &Seg, ack: Seq) -> Result<(), Next> {
        let now = cx.now;
        if ack > self.snd_max {
            // Acknowledges something not yet sent.
            self.send_ack(cx);
            return Err(Next::Keep);
        }
        let old_wnd = self.snd_wnd;
        if self.snd_wl1 < seg.seq || (self.snd_wl1 == seg.seq && self.snd_wl2 <= ack) {
            self.snd_wnd = (seg.window as usize) << self.snd_shift;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            if self.snd_wnd > 0 {
                self.persist_deadline = None;
                self.persist_backoffs = 0;
            }
        }
        if self.sack_ok {
            for &(a, b) in seg.sack.iter().flatten() {
                self.add_sack(Seq(a), Seq(b));
            }
        }
        let mss = self.mss;
        if ack > self.snd_una {
            let acked = ack.since(self.snd_una);
            let mut data = acked;
            if let Some(f) = self.fin_seq {
                if f >= self.snd_una && f < ack {
                    data -= 1;
                }
            }
            if data > 0 {
                if let Some(s) = self.sock {
                    if soft(cx.io.tcp_consume(s, data)).is_err() {
                        return Err(self.reset_both(cx));
                    }
                }
            }
            if self.ts_enabled {
                if let Some((_, tsecr)) = seg.timestamp.filter(|t| t.1 != 0) {
                    let ms = ts_clock(now, self.ts_offset).wrapping_sub(tsecr);
                    if ms < 60_000 {
                        self.rtt_sample(ms as u64 * 1000);
                    }
                }
            } else if let Some((s, t)) = self.timing {
                if ack >= s {
                    self.rtt_sample(now.saturating_since(t).as_micros() as u64);
                    self.timing = None;
                }
            }
            self.snd_una = ack;
            self.snd_nxt = self.snd_nxt.max(ack);
            self.rtx_next = self.rtx_next.max(ack);
            self.prune_sacks();
            self.backoffs = 0;
            match self.recover {
                Some(r) if ack < r => {
                    // Partial ACK (RFC 6582 3.2): deflate, retransmit the next hole.
                    self.cwnd = self.cwnd.saturating_sub(acked) + mss;
                    if self.retransmit_hole(cx).is_err() {
                        return Err(self.reset_both(cx));
                    }
                }
                Some(_) => {
                    let flight = self.snd_max.since(self.snd_una);
                    self.cwnd = self.ssthresh.min(flight + mss).max(mss);
                    self.recover = None;
                    self.dupacks = 0;
                }
                None => {
                    self.dupacks = 0;
                    if self.cwnd < self.ssthresh {
                        self.cwnd += acked.min(mss);
                    } else {
                        self.cwnd += (mss * mss / self.cwnd.max(1)).max(1);
                    }
                    self.cwnd = self.cwnd.min(self.max_flight());
                }
            }
            self.rto_deadline = (self.snd_una < self.snd_max).then(|| now + self.rto);
        } else if ack == self.snd_una
            && self.snd_una < self.snd_max
            && seg.payload.is_empty()
            && !seg.fin
            && old_wnd == self.snd_wnd
        {
            self.dupacks = self.dupacks.saturating_add(1);
            if self.recover.is_none() && self.dupacks == 3 {
                // Fast retransmit (RFC 5681 3.2).
                let flight = self.snd_max.since(self.snd_una);
                self.ssthresh = (flight / 2).max(2 * mss);
                self.cwnd = self.ssthresh + 3 * mss;
                self.recover = Some(self.snd_max);
                self.rtx_next = self.snd_una;
                self.timing = None;
                if self.retransmit_hole(cx).is_err() {
                    return Err(self.reset_both(cx));
                }
            } else if self.recover.is_some() {
                self.cwnd += mss;
                if self.retransmit_hole(cx).is_err() {
                    return Err(self.reset_both(cx));
                }
            }
        }
        Ok(())
    }

    fn sacked_bytes(&self) -> usize {
        self.sacked[..self.n_sacked as usize]
            .iter()
            .map(|(a, b)| b.since(*a))
            .sum()
    }

    /// Adds a SACK block to the scoreboard (kept sorted and merged; the highest is dropped when
    /// it is full). Blocks outside `(snd_una, snd_max]` are ignored (RFC 2018 is advisory).
    fn add_sack(&mut self, a: Seq, b: Seq) {
        if !(a < b && a >= self.snd_una && b <= self.snd_max) {
            return;
        }
        let n = self.n_sacked as usize;
        let mut v = [(Seq(0), Seq(0)); SACK_SLOTS + 1];
        v[..n].copy_from_slice(&self.sacked[..n]);
        v[n] = (a, b);
        let v = &mut v[..n + 1];
        // Insertion sort by start (at most five entries).
        for i in 1..v.len() {
            let mut j = i;
            while j > 0 && v[j].0 < v[j - 1].0 {
                v.swap(j, j - 1);
                j -= 1;
            }
        }
        let mut m = 0;
        for i in 0..v.len() {
            if m > 0 && v[i].0 <= v[m - 1].1 {
                v[m - 1].1 = v[m - 1].1.max(v[i].1);
            } else {
                v[m] = v[i];
                m += 1;
            }
        }
        let m = m.min(SACK_SLOTS);
        self.sacked[..m].copy_from_slice(&v[..m]);
        self.n_sacked = m as u8;
    }

    fn prune_sacks(&mut self) {
        let una = self.snd_una;
        let mut m = 0;
        for i in 0..self.n_sacked as usize {
            let (a, b) = self.sacked[i];
            if b > una {
                self.sacked[m] = (a.max(una), b);
                m += 1;
            }
        }
        self.n_sacked = m as u8;
    }

    /// Retransmits the next hole of the scoreboard from `rtx_next` on (or, with no SACK
    /// information, the first unacknowledged segment once).
    fn retransmit_hole<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Result<(), Broken> {
        let mut s = self.rtx_next.max(self.snd_una);
        let mut end = None;
        for &(a, b) in &self.sacked[..self.n_sacked as usize] {
            if s.in_range(a, b) {
                s = b;
            } else if a > s {
                end = Some(a);
                break;
            }
        }
        let end = match end {
            Some(e) => e,
            None if self.n_sacked == 0 && s == self.snd_una => self.snd_una + self.mss,
            None => return Ok(()),
        }
        .min(self.snd_max);
        if s >= end {
            return Ok(());
        }
        let used = self.send_segment(cx, s, end.since(s).min(self.mss))?;
        self.rtx_next = s + used;
        self.timing = None;
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(cx.now + self.rto);
        }
        Ok(())
    }

    /// Sends one segment at `seq` with up to `want` payload bytes peeked from the socket (and
    /// our FIN when it falls right after them). Returns the sequence space used (0: nothing).
    fn send_segment<H: SockIo>(
        &mut self,
        cx: &mut Handling<H>,
        seq: Seq,
        want: usize,
    ) -> Result<usize, Broken> {
        let Some(sock) = self.sock else {
            return Ok(0);
        };
        let fin_seq = self.fin_seq;
        let mut want = want;
        if let Some(f) = fin_seq {
            if seq > f {
                return Ok(0);
            }
            want = want.min(f.since(seq));
        }
        let mut hdr = self.hdr(cx.now, seq);
        if want == 0 {
            if fin_seq != Some(seq) {
                return Ok(0);
            }
            hdr.fin = true;
        }
        let off = seq.since(self.snd_una);
        let gso = self.gso(cx).then_some(self.mss as u16);
        let ident = cx.ctx.next_ident();
        let mac = cx.ctx.mac;
        let io = &mut *cx.io;
        let cached = cx.peek.get(sock, seq);
        let mut broken = false;
        let (n, h) = segment::push(
            cx.out,
            mac,
            self.guest_mac,
            ident,
            hdr,
            want,
            gso,
            |buf, h| {
                let n = match cached {
                    Some((c, _)) if c.len() >= buf.len() => {
                        buf.copy_from_slice(&c[..buf.len()]);
                        buf.len()
                    }
                    // All the socket held when the cache was filled: peeking again would give
                    // the same bytes (any that came since raised a readiness event of their
                    // own), so the segment takes them as they are.
                    Some((c, true)) => {
                        buf[..c.len()].copy_from_slice(c);
                        c.len()
                    }
                    _ => match soft(io.tcp_peek(sock, off, buf)) {
                        Ok(n) => n.min(buf.len()),
                        Err(Broken) => {
                            broken = true;
                            return 0;
                        }
                    },
                };
                let drained = n < buf.len();
                h.fin = match fin_seq {
                    Some(f) => seq + n == f,
                    None => drained && io.tcp_peer_closed(sock),
                };
                h.psh = drained && n > 0;
                n
            },
        );
        if broken {
            return Err(Broken);
        }
        if h.fin && self.fin_seq.is_none() {
            self.fin_seq = Some(seq + n);
        }
        let used = n + h.fin as usize;
        if used > 0 {
            self.packets_to_guest += 1;
            self.ack_sent();
        }
        Ok(used)
    }

    /// Sends new data (and our FIN) as far as the guest's window and the congestion window go.
    /// Returns the number of segments sent.
    fn transmit<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Result<usize, Broken> {
        if self.state != State::Open || self.sock.is_none() || self.nothing_new() {
            return Ok(0);
        }
        let now = cx.now;
        self.fill_peek_cache(cx)?;
        let r = self.transmit_segments(cx, now);
        cx.peek.clear();
        r
    }

    /// Whether this connection sends super-frames: the port cuts them (TCP over IPv4 and
    /// IPv6 alike).
    fn gso<H: SockIo>(&self, cx: &Handling<H>) -> bool {
        cx.ctx.tcp_gso
    }

    /// The most payload one frame toward the guest carries: a segment, or where the port
    /// takes super-frames (`Ctx::tcp_gso`) as many whole segments as fit a 64 KiB packet.
    fn frame_payload<H: SockIo>(&self, cx: &Handling<H>) -> usize {
        if !self.gso(cx) {
            return self.mss;
        }
        // An IPv4 packet's 64 KiB, less its header and the largest TCP header.
        const ROOM: usize = 65535 - 20 - 60;
        (ROOM / self.mss.max(1) * self.mss).max(self.mss)
    }

    /// Whether the next segment would be new data that the sock-side socket is known not to hold.
    fn nothing_new(&self) -> bool {
        self.host_drained && self.snd_nxt >= self.snd_max && self.fin_seq.is_none()
    }

    /// Peeks what `transmit` may send in one call, when that is more than one segment and
    /// each frame holds one segment. Super-frames are peeked into directly, one call each: a
    /// call per 64 KiB costs less than copying every byte a second time out of the cache (the
    /// copy was a twentieth of a download's worker time).
    fn fill_peek_cache<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Result<(), Broken> {
        let Some(sock) = self.sock else {
            return Ok(());
        };
        if self.fin_seq.is_some() || self.gso(cx) {
            return Ok(());
        }
        let wnd_room = (self.snd_una + self.snd_wnd).since(self.snd_nxt);
        let pipe = self
            .snd_nxt
            .since(self.snd_una)
            .saturating_sub(self.sacked_bytes());
        let room = wnd_room.min(self.cwnd.saturating_sub(pipe)).min(PEEK_MAX);
        if room < 2 * self.mss {
            return Ok(());
        }
        let p = &mut *cx.peek;
        if p.buf.len() < PEEK_MAX {
            p.buf.resize(PEEK_MAX, 0);
        }
        let off = self.snd_nxt.since(self.snd_una);
        let n = soft(cx.io.tcp_peek(sock, off, &mut p.buf[..room]))?.min(room);
        p.owner = Some((sock, self.snd_nxt));
        p.len = n;
        p.whole = n < room;
        Ok(())
    }

    fn transmit_segments<H: SockIo>(
        &mut self,
        cx: &mut Handling<H>,
        now: Instant,
    ) -> Result<usize, Broken> {
        let mut segs = 0;
        loop {
            if self.fin_seq.is_some_and(|f| self.snd_nxt > f) {
                break;
            }
            let wnd_room = (self.snd_una + self.snd_wnd).since(self.snd_nxt);
            let pipe = self
                .snd_nxt
                .since(self.snd_una)
                .saturating_sub(self.sacked_bytes());
            let cwnd_room = self.cwnd.saturating_sub(pipe);
            let fin_next = self.fin_seq == Some(self.snd_nxt);
            let want = self.frame_payload(cx).min(wnd_room).min(cwnd_room);
            if want == 0 && !fin_next {
                if wnd_room == 0 && self.snd_una == self.snd_max && self.persist_deadline.is_none()
                {
                    self.persist_deadline = Some(now + self.rto);
                }
                break;
            }
            // Congestion-limited with data in flight: wait for room for a full segment.
            if !fin_next && want < self.mss && want == cwnd_room && pipe > 0 {
                break;
            }
            let seq = self.snd_nxt;
            // Past what the peek cache holds, a drained socket has nothing more.
            if self.nothing_new() && self.sock.is_some_and(|s| cx.peek.get(s, seq).is_none()) {
                break;
            }
            let fresh = seq >= self.snd_max;
            let used = self.send_segment(cx, seq, want)?;
            if used == 0 {
                // Nothing past `snd_max`, and no FIN either (it would have gone out): only a
                // peek that found nothing says so, since the end of the stream shows only there.
                self.host_drained |= fresh;
                break;
            }
            segs += 1;
            self.snd_nxt = seq + used;
            if self.snd_nxt > self.snd_max {
                let new = self.snd_nxt.since(self.snd_max);
                let fin_new = self
                    .fin_seq
                    .is_some_and(|f| f >= self.snd_max && f < self.snd_nxt);
                self.bytes_to_guest += (new - fin_new as usize) as u64;
                if self.timing.is_none() && !self.ts_enabled && self.backoffs == 0 {
                    self.timing = Some((self.snd_nxt, now));
                }
                self.snd_max = self.snd_nxt;
            }
            if self.rto_deadline.is_none() {
                self.rto_deadline = Some(now + self.rto);
            }
            if used < want {
                break;
            }
        }
        Ok(segs)
    }

    /// Takes the payload (and FIN) of an acceptable segment. Returns whether a duplicate ACK is
    /// due at once (data beyond a hole).
    fn receive<H: SockIo>(&mut self, cx: &mut Handling<H>, seg: &Seg) -> Result<bool, Broken> {
        let Some(sock) = self.sock else {
            return Ok(false);
        };
        let mut seq = seg.seq;
        let mut data = seg.payload;
        let fin_at = seg.seq + seg.payload.len();
        if seq < self.rcv_nxt {
            let skip = self.rcv_nxt.since(seq).min(data.len());
            data = &data[skip..];
            seq = seq + skip;
        }
        let right = self.rcv_nxt + self.rcv_wnd;
        let mut fin = seg.fin;
        if seq + data.len() > right {
            data = &data[..right.since(seq).min(data.len())];
            fin = false;
        }
        if fin && fin_at >= self.rcv_nxt {
            self.guest_fin = Some(fin_at);
        }
        if data.is_empty() {
            if !seg.payload.is_empty() {
                // All old: acknowledge at once (the guest may have missed our ACK).
                self.ack_owed = 2;
            }
            return Ok(false);
        }
        let queued = self.ring.contiguous(self.rcv_nxt);
        let in_order = seq == self.rcv_nxt && queued == 0 && !self.write_blocked;
        // The first in-order segment of a batch goes to the socket at once, so a connection
        // that sends one segment at a time (interactive, or idle but for a keep-alive) never
        // needs a ring; the rest of a batch waits and is written together at its end.
        let at_once = in_order && data.len() >= WRITE_AT_ONCE;
        if self.defer_writes && (self.flush_pending || !in_order) && !at_once {
            let hole = seq > self.rcv_nxt + queued;
            self.ring.insert(self.rcv_nxt, seq, data);
            if !hole && !self.write_blocked {
                if self.ring.contiguous(self.rcv_nxt) >= FLUSH_AT {
                    // Enough for a large write: do not wait for the end of the batch.
                    self.drain(cx)?;
                } else {
                    self.flush_pending = true;
                }
            }
            return Ok(hole);
        }
        if in_order {
            let n = soft(cx.io.tcp_send(sock, data))?.min(data.len());
            self.rcv_nxt = self.rcv_nxt + n;
            self.bytes_to_host += n as u64;
            self.ring.advance(self.rcv_nxt);
            if n > 0 {
                // Only a segment the socket took whole: the rest of a partial write waits in
                // the ring, and the guest should learn at once how far we got.
                self.ack_may_wait = self.ack_owed == 0 && n == data.len() && n < self.mss;
                self.ack_owed = self.ack_owed.saturating_add(1);
                // The batch has begun: what follows waits for its end, and so does the ACK.
                self.flush_pending |= self.defer_writes;
            }
            if n < data.len() {
                self.write_blocked = true;
                // Kept (not acknowledged) until the socket takes it; if the ring cannot hold
                // it, the guest retransmits.
                self.ring.insert(self.rcv_nxt, self.rcv_nxt, &data[n..]);
            } else if !self.ring.is_empty() {
                // Filled a hole: hand over what waited, acknowledge at once.
                self.drain(cx)?;
                self.ack_owed = 2;
            }
            return Ok(false);
        }
        let hole = seq > self.rcv_nxt + queued;
        self.ring.insert(self.rcv_nxt, seq, data);
        if !hole && !self.write_blocked {
            self.drain(cx)?;
        }
        Ok(hole)
    }

    /// Ends a batch (see `defer_writes`): writes what waited, consumes a FIN behind it, and
    /// sends the ACK that is owed.
    pub(crate) fn flush_writes<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Next {
        self.flush_pending = false;
        if self.write_blocked {
            // `on_writable` drains once the socket has room.
            return Next::Keep;
        }
        if self.drain(cx).is_err() || self.process_fin(cx).is_err() {
            return self.reset_both(cx);
        }
        if self.ack_owed == 1 && !self.ack_may_wait {
            // The batch is over: whatever it wrote is acknowledged now (a lone small segment's
            // ACK may still wait, in `output`).
            self.ack_owed = 2;
        }
        self.output(cx, false)
    }

    /// Writes what waits in the ring from `rcv_nxt` on to the socket, as far as it takes.
    fn drain<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Result<(), Broken> {
        let Some(sock) = self.sock else {
            return Ok(());
        };
        loop {
            let n = self.ring.contiguous(self.rcv_nxt);
            if n == 0 {
                break;
            }
            let (a, b) = self.ring.slices(self.rcv_nxt, n);
            let mut w = soft(cx.io.tcp_send(sock, a))?.min(a.len());
            if w == a.len() && !b.is_empty() {
                w += soft(cx.io.tcp_send(sock, b))?.min(b.len());
            }
            self.rcv_nxt = self.rcv_nxt + w;
            self.bytes_to_host += w as u64;
            self.ring.advance(self.rcv_nxt);
            if w > 0 {
                self.ack_owed = 2;
            }
            if w < n {
                self.write_blocked = true;
                break;
            }
        }
        self.ring.release_if_empty();
        Ok(())
    }

    /// Consumes the guest's FIN once everything before it reached the socket.
    fn process_fin<H: SockIo>(&mut self, cx: &mut Handling<H>) -> Result<(), Broken> {
        if self.shut_wr || self.guest_fin != Some(self.rcv_nxt) || self.write_blocked {
            return Ok(());
        }
        if let Some(s) = self.sock {
            soft(cx.io.tcp_shutdown_write(s))?;
        }
        self.shut_wr = true;
        self.rcv_nxt = self.rcv_nxt + 1;
        self.guest_closed_first = !self.fin_seq.is_some_and(|f| self.snd_max > f);
        if self.fin_seq.is_none() && (self.ack_owed == 0 || self.ack_may_wait) {
            // Our FIN (the host side's close) usually follows and carries the ACK.
            self.delay_ack(cx.now);
        } else {
            self.ack_owed = 2;
        }
        Ok(())
    }

    /// Sends what may be sent and the ACK that is owed; decides whether the connection is over.
    fn output<H: SockIo>(&mut self, cx: &mut Handling<H>, dup_ack: bool) -> Next {
        if dup_ack {
            self.send_ack(cx);
        }
        let sent = match self.transmit(cx) {
            Ok(n) => n,
            Err(Broken) => return self.reset_both(cx),
        };
        if sent == 0 && !matches!(self.state, State::Connecting | State::SynSent) {
            if self.ack_owed >= 2 {
                self.send_ack(cx);
            } else if self.ack_owed == 1 && !self.flush_pending {
                if self.ack_may_wait {
                    self.delay_ack(cx.now);
                } else {
                    // Coalesce with the next segment of this batch; flushed at the batch's end.
                    self.ack_deadline = Some(cx.now);
                }
            }
        }
        if self.state == State::Open
            && self.shut_wr
            && self.fin_seq.is_some_and(|f| self.snd_una > f)
        {
            if self.guest_closed_first {
                return Next::Delete;
            }
            self.state = State::TimeWait;
            self.tw_deadline = Some(cx.now + TIME_WAIT);
            self.rto_deadline = None;
            self.persist_deadline = None;
            self.ack_deadline = None;
            self.ring = RecvRing::new(self.ring.cap(), self.guest.ip(), self.ring.budget());
            return Next::TimeWait;
        }
        Next::Keep
    }
}
