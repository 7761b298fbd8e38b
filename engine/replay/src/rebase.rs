//! Sequence rebasing: a capture's guest acknowledges the ISN (and echoes the TCP timestamps) of
//! the hubnat that was running when it was recorded, not those of the replayed core. Per
//! connection, the first ACK the guest sends after the replayed core's SYN-ACK tells the offset
//! (guest's ack − 1 against the core's ISN, guest's TSecr against the core's TSval); every later
//! segment of the guest on that connection gets its ACK, SACK blocks and TSecr moved by it, and
//! its checksum recomputed. Captures made against the replayed core itself have offset zero.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
};

/// Connections tracked at once; the oldest are forgotten past it.
pub const MAX_FLOWS: usize = 1 << 16;

/// guest address, guest port, destination address, destination port.
type Key = (Ipv4Addr, u16, Ipv4Addr, u16);

#[derive(Clone, Copy, Default)]
struct Flow {
    /// The core's ISN and TSval in its SYN-ACK.
    core_isn: Option<u32>,
    core_ts: Option<u32>,
    /// Added to the guest's ACK/SACK and TSecr once known.
    seq_delta: Option<u32>,
    ts_delta: Option<u32>,
}

#[derive(Default)]
pub struct Rebaser {
    flows: HashMap<Key, Flow>,
}

fn tcp_of(frame: &[u8]) -> Option<(usize, Ipv4Addr, Ipv4Addr)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let off = 14 + ip.header_len() as usize;
    let end = 14 + ip.total_len() as usize;
    if end > frame.len() || off >= end {
        return None;
    }
    TcpPacket::new_checked(&frame[off..end]).ok()?;
    Some((off, ip.src_addr(), ip.dst_addr()))
}

/// The TSval/TSecr option's offset in the TCP header, if present.
fn ts_option(tcp: &[u8]) -> Option<usize> {
    let hl = ((tcp[12] >> 4) as usize * 4).min(tcp.len());
    let mut i = 20;
    while i < hl {
        match tcp[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = *tcp.get(i + 1)? as usize;
                if len < 2 || i + len > hl {
                    return None;
                }
                if kind == 8 && len == 10 {
                    return Some(i);
                }
                i += len;
            }
        }
    }
    None
}

fn sack_blocks(tcp: &[u8]) -> Vec<usize> {
    let hl = ((tcp[12] >> 4) as usize * 4).min(tcp.len());
    let mut v = Vec::new();
    let mut i = 20;
    while i < hl {
        match tcp[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else { break };
                let len = len as usize;
                if len < 2 || i + len > hl {
                    break;
                }
                if kind == 5 {
                    let mut j = i + 2;
                    while j + 8 <= i + len {
                        v.push(j);
                        v.push(j + 4);
                        j += 8;
                    }
                }
                i += len;
            }
        }
    }
    v
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn add32(b: &mut [u8], at: usize, d: u32) {
    let v = get32(b, at).wrapping_add(d);
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

impl Rebaser {
    /// Notes a frame the core sent toward a guest (its SYN-ACKs matter).
    pub fn on_output(&mut self, frame: &[u8]) {
        let Some((off, src, dst)) = tcp_of(frame) else {
            return;
        };
        let t = &frame[off..];
        let flags = t[13];
        if flags & 0x12 != 0x12 {
            return;
        }
        let key = (
            dst,
            u16::from_be_bytes([t[2], t[3]]),
            src,
            u16::from_be_bytes([t[0], t[1]]),
        );
        if let Some(f) = self.flows.get_mut(&key) {
            if f.core_isn.is_none() {
                f.core_isn = Some(get32(t, 4));
                f.core_ts = ts_option(t).map(|o| get32(t, o + 2));
            }
        }
    }

    /// Rewrites a guest's frame into `scratch` when its connection needs it; returns whether it did.
    pub fn on_input(&mut self, frame: &[u8], scratch: &mut Vec<u8>) -> bool {
        let Some((off, src, dst)) = tcp_of(frame) else {
            return false;
        };
        let t = &frame[off..];
        let key = (
            src,
            u16::from_be_bytes([t[0], t[1]]),
            dst,
            u16::from_be_bytes([t[2], t[3]]),
        );
        let flags = t[13];
        if flags & 0x12 == 0x02 {
            // A new connection (or a SYN retransmission, which keeps what was learned).
            if !self.flows.contains_key(&key) && self.flows.len() >= MAX_FLOWS {
                let k = *self.flows.keys().min().expect("not empty");
                self.flows.remove(&k);
            }
            let f = self.flows.entry(key).or_default();
            if f.seq_delta.is_some() {
                *f = Flow::default();
            }
            return false;
        }
        let Some(f) = self.flows.get_mut(&key) else {
            return false;
        };
        if flags & 0x10 == 0 {
            return false;
        }
        if f.seq_delta.is_none() {
            let Some(isn) = f.core_isn else {
                return false;
            };
            f.seq_delta = Some(isn.wrapping_add(1).wrapping_sub(get32(t, 8)));
            let ts = ts_option(t);
            f.ts_delta = match (f.core_ts, ts) {
                (Some(core), Some(o)) => Some(core.wrapping_sub(get32(t, o + 6))),
                _ => Some(0),
            };
        }
        let (sd, td) = (f.seq_delta.unwrap_or(0), f.ts_delta.unwrap_or(0));
        if sd == 0 && td == 0 {
            return false;
        }
        let end = 14 + Ipv4Packet::new_unchecked(&frame[14..]).total_len() as usize;
        let whole = TcpPacket::new_unchecked(&frame[off..end]);
        if !whole.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)) {
            // A damaged segment stays damaged: the core must see it as the guest sent it.
            return false;
        }
        scratch.clear();
        scratch.extend_from_slice(frame);
        let t = &mut scratch[off..];
        add32(t, 8, sd);
        for at in sack_blocks(t) {
            add32(t, at, sd);
        }
        if let Some(o) = ts_option(t) {
            add32(t, o + 6, td);
        }
        let mut tcp = TcpPacket::new_unchecked(&mut scratch[off..end]);
        tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
        true
    }
}
