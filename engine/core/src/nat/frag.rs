//! Reassembly of guests' fragments, IPv4 (RFC 791) and IPv6 (RFC 8200 4.5), with RFC 5722's
//! rule for overlaps.
//!
//! Datagrams in progress are keyed by (source, destination, protocol, identification). Memory is
//! bounded three ways: at most `MAX_DATAGRAMS` in progress (`MAX_DATAGRAMS_PER_SOURCE` from one
//! source), none larger than 65535 bytes, and all
//! of them together within `BUDGET` bytes; time is bounded by `TIMEOUT` from the first fragment.
//! A fragment that overlaps one already received (even an exact duplicate: its bytes could
//! differ), that runs past 65535 bytes, or that contradicts the known end drops the whole datagram
//! (`DropReason::Malformed`), as overlapping fragments are how filters are evaded. An incomplete datagram
//! that times out is counted as `DropReason::Malformed` too.
//!
//! Toward the guest the NAT never needs "fragmentation needed": what it sends comes out of sock-side
//! sockets as whole datagrams, and datagrams larger than the MTU are cut into fragments
//! (`crate::wire::push_ip_fragments`, DF cleared) rather than refused.

use std::net::IpAddr;
use std::time::Duration;

use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::stats::DropReason;
use crate::time::Instant;
use crate::wire::{Ipv6View, IPV4_HEADER_LEN, IPV6_HEADER_LEN};
use crate::Ctx;

/// Datagrams being reassembled at once.
pub(crate) const MAX_DATAGRAMS: usize = 64;
/// Datagrams in progress from one source: a guest's fragments cannot take every slot.
pub(crate) const MAX_DATAGRAMS_PER_SOURCE: usize = MAX_DATAGRAMS / 4;
/// Bytes held by all datagrams in progress together.
pub(crate) const BUDGET: usize = 1 << 20;
/// How long a datagram may take to arrive whole (RFC 791 suggests 15 s as a lower bound).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);
/// Received ranges tracked per datagram: more pieces than this is an attack, not a datagram.
const MAX_PIECES: usize = 256;
const MAX_DATAGRAM: usize = 65535;

/// A datagram's identity: IPv4's (source, destination, protocol, 16-bit identification) or
/// IPv6's (source, destination, the fragment header's next header, 32-bit identification).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ident: u32,
}

impl Key {
    /// Bytes of the header the reassembled datagram starts with (20 for IPv4: options are
    /// dropped; 40 for IPv6: the fixed header, whose next header is the fragment header's).
    fn header_len(&self) -> usize {
        if self.src.is_ipv6() {
            IPV6_HEADER_LEN
        } else {
            IPV4_HEADER_LEN
        }
    }
}

struct Entry {
    key: Key,
    deadline: Instant,
    /// The datagram's header followed by the payload bytes received so far, at their offsets
    /// (gaps are zero until filled).
    buf: Vec<u8>,
    /// Payload ranges received, [start, end).
    pieces: Vec<(usize, usize)>,
    received: usize,
    /// Payload length, once the last fragment has been seen.
    total: Option<usize>,
    have_first: bool,
}

/// One fragment as both families give it.
struct Piece<'a> {
    key: Key,
    /// The fixed header of the packet it came in (copied for the first fragment).
    header: &'a [u8],
    start: usize,
    more: bool,
    payload: &'a [u8],
}

/// Reassembles the guests' fragmented datagrams, IPv4 and IPv6 alike.
#[derive(Default)]
pub struct Reassembler {
    entries: Vec<Entry>,
    /// Buffers of finished or dropped datagrams, kept for reuse.
    spare: Vec<Vec<u8>>,
    /// The last datagram completed (what `add` lends out).
    done: Vec<u8>,
    held: usize,
}

impl Reassembler {
    /// Datagrams in progress.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds an IPv4 fragment; returns the whole datagram (IPv4 header + payload) once
    /// complete. The datagram is lent until the next call.
    pub(crate) fn add(
        &mut self,
        now: Instant,
        ip: &Ipv4Packet<&[u8]>,
    ) -> Result<Option<&[u8]>, DropReason> {
        let piece = Piece {
            key: Key {
                src: ip.src_addr().into(),
                dst: ip.dst_addr().into(),
                proto: ip.next_header().into(),
                ident: u32::from(ip.ident()),
            },
            header: &ip.as_ref()[..IPV4_HEADER_LEN],
            start: ip.frag_offset() as usize,
            more: ip.more_frags(),
            payload: ip.payload(),
        };
        self.add_piece(now, piece)
    }

    /// Adds an IPv6 fragment (a packet with a fragment header); returns the whole datagram
    /// once complete: a fixed IPv6 header whose next header is what followed the fragment
    /// header, then the fragmentable part (RFC 8200 4.5). Lent until the next call.
    pub(crate) fn add6(
        &mut self,
        now: Instant,
        ip: &Ipv6View,
    ) -> Result<Option<&[u8]>, DropReason> {
        let Some(f) = ip.fragment else {
            return Err(DropReason::Malformed);
        };
        let piece = Piece {
            key: Key {
                src: ip.src.into(),
                dst: ip.dst.into(),
                proto: f.next,
                ident: f.ident,
            },
            header: &ip.packet[..IPV6_HEADER_LEN],
            start: f.offset,
            more: f.more,
            payload: &ip.packet[f.data_at..],
        };
        self.add_piece(now, piece)
    }

    fn add_piece(&mut self, now: Instant, p: Piece) -> Result<Option<&[u8]>, DropReason> {
        let Piece {
            key,
            header,
            start,
            more,
            payload,
        } = p;
        let hl = key.header_len();
        let end = start + payload.len();
        let idx = match self.entries.iter().position(|e| e.key == key) {
            Some(i) => i,
            None => {
                if self.entries.len() >= MAX_DATAGRAMS
                    || self.entries.iter().filter(|e| e.key.src == key.src).count()
                        >= MAX_DATAGRAMS_PER_SOURCE
                {
                    return Err(DropReason::Limit);
                }
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.clear();
                buf.resize(hl, 0);
                self.entries.push(Entry {
                    key,
                    deadline: now + TIMEOUT,
                    buf,
                    pieces: Vec::new(),
                    received: 0,
                    total: None,
                    have_first: false,
                });
                self.entries.len() - 1
            }
        };
        // IPv4 counts the header in its 65535; IPv6's payload length excludes the fixed one.
        let limit = if key.src.is_ipv6() {
            MAX_DATAGRAM
        } else {
            MAX_DATAGRAM - IPV4_HEADER_LEN
        };
        let bad = (more && (payload.is_empty() || payload.len() & 7 != 0)) || end > limit;
        if bad {
            self.discard(idx);
            return Err(DropReason::Malformed);
        }
        let e = &mut self.entries[idx];
        let contradicts = match e.total {
            Some(t) => end > t || (more && end == t) || (!more && end != t),
            None => !more && e.pieces.iter().any(|&(_, pe)| pe > end),
        };
        let overlaps = e.pieces.iter().any(|&(s, pe)| start < pe && s < end);
        if contradicts || overlaps {
            self.discard(idx);
            return Err(DropReason::Malformed);
        }
        if e.pieces.len() >= MAX_PIECES {
            self.discard(idx);
            return Err(DropReason::Limit);
        }
        let need = hl + end;
        if need > e.buf.len() {
            let grow = need - e.buf.len();
            if self.held + grow > BUDGET {
                self.discard(idx);
                return Err(DropReason::Limit);
            }
            self.held += grow;
            e.buf.resize(need, 0);
        }
        e.buf[hl + start..need].copy_from_slice(payload);
        e.pieces.push((start, end));
        e.received += payload.len();
        if !more {
            e.total = Some(end);
        }
        if start == 0 {
            e.have_first = true;
            e.buf[..hl].copy_from_slice(&header[..hl]);
        }
        match e.total {
            Some(t) if e.have_first && e.received == t => {}
            _ => return Ok(None),
        }
        let mut e = self.entries.swap_remove(idx);
        self.held -= e.buf.len() - hl;
        let total_len = e.buf.len();
        if key.src.is_ipv6() {
            let mut h = Ipv6Packet::new_unchecked(&mut e.buf[..]);
            h.set_payload_len((total_len - IPV6_HEADER_LEN) as u16);
            h.set_next_header(IpProtocol::from(key.proto));
        } else {
            let mut h = Ipv4Packet::new_unchecked(&mut e.buf[..]);
            h.set_header_len(IPV4_HEADER_LEN as u8);
            h.set_total_len(total_len as u16);
            h.set_more_frags(false);
            h.set_frag_offset(0);
            h.fill_checksum();
        }
        let old = std::mem::replace(&mut self.done, e.buf);
        self.spare.push(old);
        self.spare.truncate(4);
        Ok(Some(&self.done))
    }

    fn discard(&mut self, idx: usize) {
        let e = self.entries.swap_remove(idx);
        self.held -= e.buf.len() - e.key.header_len();
        if self.spare.len() < 4 {
            self.spare.push(e.buf);
        }
    }

    /// The earliest deadline of a datagram in progress (at most `MAX_DATAGRAMS` to look at).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.deadline).min()
    }

    /// Drops the datagrams whose time is up, counting each as malformed (it never came whole).
    pub(crate) fn handle_timeout(&mut self, now: Instant, ctx: &mut Ctx) {
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].deadline <= now {
                self.discard(i);
                ctx.stats.drop(DropReason::Malformed);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimSockets;
    use crate::testing::*;
    use smoltcp::wire::UdpPacket;
    use std::net::Ipv4Addr;

    /// A UDP datagram from the guest, cut into IPv4 fragments of `per` payload bytes.
    fn fragments(ident: u16, payload: &[u8], per: usize) -> Vec<Vec<u8>> {
        fragments_from(GUEST_IP, ident, payload, per)
    }

    fn fragments_from(src: Ipv4Addr, ident: u16, payload: &[u8], per: usize) -> Vec<Vec<u8>> {
        let mut udp = vec![0u8; 8 + payload.len()];
        crate::wire::emit_udp(&mut udp, src, 5000, REMOTE_IP, 7, payload);
        udp.chunks(per)
            .enumerate()
            .map(|(i, c)| {
                let more = (i + 1) * per < udp.len();
                ipv4_frame(src, REMOTE_IP, IpProtocol::Udp, ident, i * per, more, c)
            })
            .collect()
    }

    fn sent(h: &mut SimSockets) -> Vec<Vec<u8>> {
        let ids = h.ids(|s| matches!(s, crate::sim::SimSocket::Udp(_)));
        ids.iter()
            .flat_map(|id| h.udp(*id).unwrap().sent.clone())
            .collect()
    }

    #[test]
    fn in_order_and_out_of_order_reassemble() {
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        for order in [[0usize, 1, 2, 3], [3, 1, 0, 2]] {
            let (mut e, mut h, mut out) = setup();
            let frags = fragments(1, &data, 1000);
            assert_eq!(frags.len(), 4);
            for i in order {
                e.handle_frame(T0, &frags[i], &mut h, &mut out);
            }
            assert_eq!(sent(&mut h), vec![data.clone()]);
            assert!(e.nat.frag.is_empty());
            assert_eq!(e.nat.frag.held, 0);
        }
    }

    #[test]
    fn overlapping_fragment_drops_the_datagram() {
        let (mut e, mut h, mut out) = setup();
        let data = vec![7u8; 2000];
        let frags = fragments(2, &data, 1000);
        e.handle_frame(T0, &frags[0], &mut h, &mut out);
        // The same first fragment again overlaps itself.
        e.handle_frame(T0, &frags[0], &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 1);
        assert!(e.nat.frag.is_empty());
        e.handle_frame(T0, &frags[1], &mut h, &mut out);
        e.handle_frame(T0, &frags[2], &mut h, &mut out);
        assert!(sent(&mut h).is_empty());
        // A partial overlap: bytes 8.. of the first 1000.
        let (mut e, mut h, mut out) = setup();
        e.handle_frame(T0, &frags[0], &mut h, &mut out);
        let udp = &frags[1][34..];
        let f = ipv4_frame(
            GUEST_IP,
            REMOTE_IP,
            IpProtocol::Udp,
            2,
            992,
            true,
            &udp[..8],
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 1);
        assert!(e.nat.frag.is_empty());
    }

    #[test]
    fn too_big_and_bad_sizes_are_malformed() {
        let (mut e, mut h, mut out) = setup();
        // Offset 65528 + 16 bytes runs past 65535.
        let f = ipv4_frame(
            GUEST_IP,
            REMOTE_IP,
            IpProtocol::Udp,
            3,
            65528,
            false,
            &[0; 16],
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 1);
        // A middle fragment that is not a multiple of 8 bytes.
        let f = ipv4_frame(GUEST_IP, REMOTE_IP, IpProtocol::Udp, 4, 0, true, &[0; 12]);
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 2);
        // A last fragment that ends before data already received.
        let f = ipv4_frame(GUEST_IP, REMOTE_IP, IpProtocol::Udp, 5, 800, true, &[0; 16]);
        e.handle_frame(T0, &f, &mut h, &mut out);
        let f = ipv4_frame(
            GUEST_IP,
            REMOTE_IP,
            IpProtocol::Udp,
            5,
            400,
            false,
            &[0; 16],
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 3);
        assert!(e.nat.frag.is_empty());
        assert!(sent(&mut h).is_empty());
    }

    #[test]
    fn incomplete_datagram_times_out_and_table_is_bounded() {
        // Several sources from one test MAC: no source binding in the way.
        let (mut e, mut h, mut out) =
            setup_with(|c| c.nat.source_check = crate::vhost::bindings::SourceCheck::Subnet);
        let data = vec![1u8; 2000];
        // One source fills its share only...
        for ident in 0..MAX_DATAGRAMS_PER_SOURCE as u16 + 1 {
            let frags = fragments(100 + ident, &data, 1000);
            e.handle_frame(T0, &frags[0], &mut h, &mut out);
        }
        assert_eq!(e.nat.frag.len(), MAX_DATAGRAMS_PER_SOURCE);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 1);
        // ...and the sources together the table.
        let per = MAX_DATAGRAMS / MAX_DATAGRAMS_PER_SOURCE;
        for n in 1..=per as u8 {
            let src = Ipv4Addr::new(192, 168, 30, 10 + n);
            for ident in 0..MAX_DATAGRAMS_PER_SOURCE as u16 {
                let frags = fragments_from(src, 100 + ident, &data, 1000);
                e.handle_frame(T0, &frags[0], &mut h, &mut out);
            }
        }
        assert_eq!(e.nat.frag.len(), MAX_DATAGRAMS);
        assert_eq!(
            e.stats().drops_of(DropReason::Limit),
            1 + MAX_DATAGRAMS_PER_SOURCE as u64
        );
        assert_eq!(e.poll_timeout(), Some(T0 + TIMEOUT));
        e.handle_timeout(T0 + TIMEOUT, &mut h, &mut out);
        assert!(e.nat.frag.is_empty());
        assert_eq!(
            e.stats().drops_of(DropReason::Malformed),
            MAX_DATAGRAMS as u64
        );
        assert_eq!(e.nat.frag.held, 0);
        // The rest of a timed-out datagram starts a new one that never completes.
        let frags = fragments(100, &data, 1000);
        e.handle_frame(T0 + TIMEOUT, &frags[1], &mut h, &mut out);
        assert_eq!(e.nat.frag.len(), 1);
        assert!(sent(&mut h).is_empty());
    }

    #[test]
    fn reassembled_header_is_whole() {
        let mut r = Reassembler::default();
        let data = vec![9u8; 1500];
        let frags = fragments(6, &data, 1000);
        let p0 = Ipv4Packet::new_checked(&frags[0][14..]).unwrap();
        assert!(r.add(T0, &p0).unwrap().is_none());
        let p1 = Ipv4Packet::new_checked(&frags[1][14..]).unwrap();
        let whole = r.add(T0, &p1).unwrap().unwrap();
        let ip = Ipv4Packet::new_checked(whole).unwrap();
        assert!(ip.verify_checksum());
        assert!(!ip.more_frags());
        assert_eq!(ip.frag_offset(), 0);
        assert_eq!(ip.total_len() as usize, 20 + 8 + 1500);
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&GUEST_IP.into(), &REMOTE_IP.into()));
    }
}
