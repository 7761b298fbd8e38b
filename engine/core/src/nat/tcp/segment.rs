//! One TCP segment: parsed from a guest's packet, or built into a frame toward a guest.
//!
//! Parsing uses smoltcp's checked `TcpPacket` view and its option parser; building writes the
//! header in place around a payload region that the caller fills directly (from a sock-side socket's
//! peek), so payload bytes are copied once, socket to frame.

use std::net::SocketAddr;

use smoltcp::wire::{IpProtocol, TcpOption, TcpPacket, TcpSeqNumber, ETHERNET_HEADER_LEN};

use super::seq::Seq;
use crate::config::Mac;
use crate::nat::GuestIp;
use crate::output::FrameBatch;
use crate::stats::DropReason;
use crate::wire::{emit_ip_headers, IpHeader};

pub(crate) const TCP_HEADER_LEN: usize = 20;
/// Bytes the timestamp option takes in every segment once negotiated (with its two NOPs).
pub(crate) const TS_OPTION_LEN: usize = 12;

/// A guest's segment, checked and parsed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg<'a> {
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) seq: Seq,
    pub(crate) ack: Option<Seq>,
    pub(crate) syn: bool,
    pub(crate) fin: bool,
    pub(crate) rst: bool,
    pub(crate) window: u16,
    pub(crate) mss: Option<u16>,
    pub(crate) window_scale: Option<u8>,
    pub(crate) sack_permitted: bool,
    pub(crate) sack: [Option<(u32, u32)>; 3],
    /// (TSval, TSecr)
    pub(crate) timestamp: Option<(u32, u32)>,
    pub(crate) payload: &'a [u8],
}

impl Seg<'_> {
    /// Sequence space the segment occupies (payload, SYN and FIN).
    pub(crate) fn len(&self) -> usize {
        self.payload.len() + self.syn as usize + self.fin as usize
    }
}

/// Checks and parses the TCP segment of `ip`: a truncated header, a data offset below 5 or past
/// the end, a bad option, port 0 or an impossible flag combination is `Malformed`; a checksum
/// that does not verify is `BadChecksum` (unless the guest left it to the port:
/// `checksum_left`, see `Engine::handle_frame_checksum_left`).
pub(crate) fn parse<'a>(ip: &GuestIp<'a>, checksum_left: bool) -> Result<Seg<'a>, DropReason> {
    let bytes: &'a [u8] = ip.upper;
    let tcp = TcpPacket::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
    if !checksum_left && !tcp.verify_checksum(&ip.src.into(), &ip.dst.into()) {
        return Err(DropReason::BadChecksum);
    }
    if tcp.src_port() == 0 || tcp.dst_port() == 0 {
        return Err(DropReason::Malformed);
    }
    let (syn, fin, rst) = (tcp.syn(), tcp.fin(), tcp.rst());
    if (syn && (fin || rst)) || (fin && rst) {
        return Err(DropReason::Malformed);
    }
    let mut seg = Seg {
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        seq: Seq(tcp.seq_number().0 as u32),
        ack: tcp.ack().then(|| Seq(tcp.ack_number().0 as u32)),
        syn,
        fin,
        rst,
        window: tcp.window_len(),
        mss: None,
        window_scale: None,
        sack_permitted: false,
        sack: [None; 3],
        timestamp: None,
        payload: &bytes[tcp.header_len() as usize..],
    };
    let mut options = &bytes[TCP_HEADER_LEN..tcp.header_len() as usize];
    while !options.is_empty() {
        let (rest, option) = TcpOption::parse(options).map_err(|_| DropReason::Malformed)?;
        match option {
            TcpOption::EndOfList => break,
            TcpOption::MaxSegmentSize(v) => seg.mss = Some(v),
            TcpOption::WindowScale(v) => seg.window_scale = Some(v.min(14)),
            TcpOption::SackPermitted => seg.sack_permitted = true,
            TcpOption::SackRange(r) => seg.sack = r,
            TcpOption::TimeStamp { tsval, tsecr } => seg.timestamp = Some((tsval, tsecr)),
            TcpOption::NoOperation | TcpOption::Unknown { .. } => {}
        }
        options = rest;
    }
    Ok(seg)
}

/// The header of a segment toward a guest.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hdr {
    /// The guest's peer as the guest sees it (the source of our segments).
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pub(crate) seq: Seq,
    pub(crate) ack: Option<Seq>,
    pub(crate) syn: bool,
    pub(crate) fin: bool,
    pub(crate) rst: bool,
    pub(crate) psh: bool,
    pub(crate) window: u16,
    pub(crate) mss: Option<u16>,
    pub(crate) window_scale: Option<u8>,
    pub(crate) sack_permitted: bool,
    pub(crate) timestamp: Option<(u32, u32)>,
    pub(crate) sack: [Option<(u32, u32)>; 3],
}

impl Hdr {
    /// A header with no flags, no ACK and no options.
    pub(crate) fn new(src: SocketAddr, dst: SocketAddr, seq: Seq) -> Hdr {
        Hdr {
            src,
            dst,
            seq,
            ack: None,
            syn: false,
            fin: false,
            rst: false,
            psh: false,
            window: 0,
            mss: None,
            window_scale: None,
            sack_permitted: false,
            timestamp: None,
            sack: [None; 3],
        }
    }

    /// Header length with options, padded to 4 bytes.
    pub(crate) fn len(&self) -> usize {
        let mut n = TCP_HEADER_LEN;
        n += self.mss.map_or(0, |_| 4);
        n += self.window_scale.map_or(0, |_| 4); // NOP + 3
        n += if self.sack_permitted { 4 } else { 0 }; // 2 NOPs + 2 (or padded)
        n += self.timestamp.map_or(0, |_| TS_OPTION_LEN);
        let blocks = self.sack.iter().flatten().count();
        if blocks > 0 {
            n += 4 + 8 * blocks; // 2 NOPs + kind + len + blocks
        }
        n
    }

    /// Writes the header (not the checksum) into `buf`, which holds header and payload.
    fn emit(&self, buf: &mut [u8]) {
        let len = self.len();
        let mut p = TcpPacket::new_unchecked(&mut *buf);
        p.set_src_port(self.src.port());
        p.set_dst_port(self.dst.port());
        p.set_seq_number(TcpSeqNumber(self.seq.0 as i32));
        p.set_ack_number(TcpSeqNumber(self.ack.map_or(0, |a| a.0) as i32));
        p.set_header_len(len as u8);
        p.clear_flags();
        p.set_syn(self.syn);
        p.set_fin(self.fin);
        p.set_rst(self.rst);
        p.set_psh(self.psh);
        p.set_ack(self.ack.is_some());
        p.set_window_len(self.window);
        p.set_urgent_at(0);
        p.set_checksum(0);
        let mut o = &mut buf[TCP_HEADER_LEN..len];
        if let Some(mss) = self.mss {
            o = TcpOption::MaxSegmentSize(mss).emit(o);
        }
        if let Some(ws) = self.window_scale {
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::WindowScale(ws).emit(o);
        }
        if self.sack_permitted {
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::SackPermitted.emit(o);
        }
        if let Some((tsval, tsecr)) = self.timestamp {
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::TimeStamp { tsval, tsecr }.emit(o);
        }
        if self.sack.iter().any(Option::is_some) {
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::NoOperation.emit(o);
            o = TcpOption::SackRange(self.sack).emit(o);
        }
        debug_assert!(o.is_empty());
    }
}

/// Appends one segment toward a guest. `fill` writes up to `max_payload` bytes of payload
/// straight into the frame and returns how many it wrote; it may also set flags (FIN) in the
/// header. A segment with no payload and no SYN/FIN/RST is only emitted when `max_payload`
/// is zero (a pure ACK); otherwise an empty fill takes the frame back. Returns the payload
/// length and the header as sent.
///
/// With `gso` (the connection's MSS, where the port takes super-frames), a payload longer
/// than one segment makes a super-frame: its TCP checksum field holds only the pseudo-header's
/// sum and the frame is marked with the segment size (`FrameBatch::set_gso_last`), for the
/// guest's side of the port to cut and checksum, as a NIC's TSO does. A frame of one segment
/// with data is marked and left partial the same way (the device only sums it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn push(
    out: &mut FrameBatch,
    src_mac: Mac,
    dst_mac: Mac,
    ident: u16,
    hdr: Hdr,
    max_payload: usize,
    gso: Option<u16>,
    fill: impl FnOnce(&mut [u8], &mut Hdr) -> usize,
) -> (usize, Hdr) {
    let mut hdr = hdr;
    let hl = hdr.len();
    let ip = IpHeader::new(hdr.src.ip(), hdr.dst.ip(), IpProtocol::Tcp, ident);
    let l4 = ETHERNET_HEADER_LEN + ip.len();
    let size = l4 + hl + max_payload;
    // Every byte kept is written below: the headers in full, the payload by `fill`.
    let n = out.push_with_written(size, |frame| {
        let n = if max_payload > 0 {
            fill(&mut frame[l4 + hl..], &mut hdr).min(max_payload)
        } else {
            0
        };
        if n == 0 && max_payload > 0 && !(hdr.fin || hdr.syn || hdr.rst) {
            return None;
        }
        emit_ip_headers(frame, src_mac, dst_mac, &ip, hl + n);
        let tcp = &mut frame[l4..l4 + hl + n];
        hdr.emit(tcp);
        match gso {
            // Left to the guest's side of the port: to cut a super-frame, and to sum any
            // segment with data (a pass over up to 64 KiB saved; the guest's kernel takes a
            // checksum its device leaves partial as good).
            Some(_) if n > 0 => {
                let sum = ip.pseudo_sum(hl + n);
                tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            }
            _ => TcpPacket::new_unchecked(tcp).fill_checksum(&ip.src.into(), &ip.dst.into()),
        }
        Some(n)
    });
    match n {
        None => {
            out.pop();
            (0, hdr)
        }
        Some(n) => {
            if n < max_payload {
                out.truncate_last(size - (max_payload - n));
            }
            if let Some(mss) = gso.filter(|_| n > 0) {
                out.set_gso_last(mss);
            }
            (n, hdr)
        }
    }
}

/// The reset RFC 9293 (3.10.7.1) answers a segment with when no connection owns it.
pub(crate) fn reset_for(seg: &Seg, guest: SocketAddr, peer: SocketAddr) -> Hdr {
    let mut h = Hdr::new(peer, guest, Seq(0));
    h.rst = true;
    match seg.ack {
        Some(ack) => h.seq = ack,
        None => h.ack = Some(seg.seq + seg.len()),
    }
    h
}

/// Socket addresses of a packet's source and destination with the segment's ports.
pub(crate) fn endpoints(ip: &GuestIp, seg: &Seg) -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(ip.src, seg.src_port),
        SocketAddr::new(ip.dst, seg.dst_port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mac;

    /// A frame built into a buffer left dirty by an earlier, larger one is the same, byte for
    /// byte, as one built into a fresh buffer: `push_with_written` does not clear, so every
    /// byte kept must be written (both families, options, a payload cut short).
    #[test]
    fn a_segment_built_over_a_dirty_buffer_is_the_same_as_over_a_clean_one() {
        let v4: (SocketAddr, SocketAddr) = (
            "10.77.0.2:80".parse().unwrap(),
            "192.168.30.50:41000".parse().unwrap(),
        );
        let v6: (SocketAddr, SocketAddr) = (
            "[2001:db8::5]:80".parse().unwrap(),
            "[fd00::50]:41000".parse().unwrap(),
        );
        for (src, dst) in [v4, v6] {
            let mut h = Hdr::new(src, dst, Seq(7));
            h.ack = Some(Seq(9));
            h.psh = true;
            h.window = 512;
            h.timestamp = Some((1, 2));
            h.sack = [Some((3, 4)), None, None];
            let build = |out: &mut FrameBatch| {
                push(out, Mac([2; 6]), Mac([4; 6]), 5, h, 3000, None, |buf, _| {
                    buf[..1000].fill(0x5a);
                    1000
                })
            };
            let mut clean = FrameBatch::new();
            build(&mut clean);
            let mut dirty = FrameBatch::new();
            dirty.push(&[0xff; 9000]);
            dirty.clear();
            build(&mut dirty);
            assert_eq!(dirty.iter().next(), clean.iter().next(), "{src}");
        }
    }
}
