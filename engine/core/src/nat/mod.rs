//! The virtual NAT: guests' TCP, UDP and ICMP carried through sock-side sockets.
//!
//! `Nat` routes a guest's IPv4 packet to its protocol (after reassembling fragments) and routes
//! socket events back to the session that owns the socket. The protocols keep their own
//! session tables; `Engine::sessions` joins them, with the DNS relay's queries, into the seed's
//! NAT table. A UDP query to the virtual host's DNS port is not carried: it comes back to the
//! engine as a `DnsQuery` for the virtual host's relay.

pub(crate) mod frag;
pub mod icmp;
pub(crate) mod icmp_error;
pub(crate) mod inbound;
pub(crate) mod policy;
pub(crate) mod rate;
pub(crate) mod session;
pub(crate) mod tcp;
#[cfg(test)]
mod tests6;
pub(crate) mod udp;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use smoltcp::wire::{IpProtocol, Ipv4Packet};

use crate::config::Config;
use crate::output::FrameBatch;
use crate::sockio::{SockEvent, SockId, SockIo};
use crate::stats::DropReason;
use crate::time::{earliest, Instant};
use crate::Ctx;

pub use inbound::{InboundRefused, InboundTarget};
pub use session::{Direction, Proto, SessionInfo};

/// A guest's IP packet as the NAT sees it, of either family: its addresses, TTL (hop limit),
/// upper-layer protocol and bytes, and the packet as the guest sent it (quoted by ICMP errors).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GuestIp<'a> {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) ttl: u8,
    pub(crate) proto: IpProtocol,
    /// The upper-layer bytes (after the IPv4 options or IPv6 extension headers).
    pub(crate) upper: &'a [u8],
    /// The whole packet, trimmed to its length.
    pub(crate) packet: &'a [u8],
}

impl<'a> GuestIp<'a> {
    /// A checked IPv4 packet, trimmed to its total length.
    pub(crate) fn v4(ip: &Ipv4Packet<&'a [u8]>) -> GuestIp<'a> {
        let packet: &'a [u8] = ip.clone().into_inner();
        GuestIp {
            src: ip.src_addr().into(),
            dst: ip.dst_addr().into(),
            ttl: ip.hop_limit(),
            proto: ip.next_header(),
            upper: &packet[usize::from(ip.header_len())..],
            packet,
        }
    }

    /// A whole IPv6 packet (`Ipv6View::is_whole`).
    pub(crate) fn v6(ip: &crate::wire::Ipv6View<'a>) -> GuestIp<'a> {
        GuestIp {
            src: ip.src.into(),
            dst: ip.dst.into(),
            ttl: ip.hop_limit,
            proto: ip.proto,
            upper: ip.upper(),
            packet: ip.packet,
        }
    }

    pub(crate) fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// ICMP of its family (ICMPv6 for IPv6).
    pub(crate) fn icmp_proto(&self) -> IpProtocol {
        if self.is_v6() {
            IpProtocol::Icmpv6
        } else {
            IpProtocol::Icmp
        }
    }
}

/// A guest's query to the virtual host's DNS port, which the NAT does not carry: the engine
/// gives it to the virtual host's relay (`vhost::dns`).
pub(crate) struct DnsQuery<'a> {
    /// The guest's address and port, where the answer goes.
    pub(crate) guest: SocketAddr,
    /// The virtual host's address and port the guest sent it to (its own or the DNS
    /// address), where the answer comes from.
    pub(crate) server: SocketAddr,
    /// The UDP payload (the DNS message).
    pub(crate) query: &'a [u8],
}

/// The user-mode NAT: the guests' flows to other hosts, carried through the sock side.
pub struct Nat {
    /// Reassembly of the guests' fragmented IPv4 datagrams.
    pub frag: frag::Reassembler,
    /// The UDP sessions.
    pub udp: udp::UdpNat,
    /// The TCP connections.
    pub tcp: tcp::TcpNat,
    pub(crate) icmp: icmp::IcmpNat,
}

/// Where a guest's flow of `proto` from `guest` to `dst` really goes on the sock side, or why it
/// may not.
///
/// The host-loopback alias (when configured) stands for 127.0.0.1: the one documented door to
/// the host's loopback. Addresses of the virtual network itself are never sent out: the segment
/// is reached directly, not through the NAT, and a packet for them on the sock side could only
/// come back in (seed 3.7.4, loops). Everything else passes the egress policy (`policy`); a
/// refusal is reported as an event (the log's rate limit keeps a scan from flooding it).
pub(crate) fn sock_destination(
    ctx: &mut Ctx,
    proto: Proto,
    guest: SocketAddr,
    dst: SocketAddr,
) -> Result<SocketAddr, DropReason> {
    let ip = dst.ip();
    if let IpAddr::V4(v4) = ip {
        if Some(v4) == ctx.cfg.nat.host_loopback {
            return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port()));
        }
    }
    // Multicast is refused silently: no ICMP error may answer a packet to a group (RFC 1122).
    if !is_routable(&ctx.cfg, ip) {
        return Err(DropReason::Loop);
    }
    if !policy::permits(&ctx.cfg.nat.egress, proto, ip, dst.port()) {
        ctx.events.push(crate::event::Event::EgressRefused {
            proto,
            src: guest,
            dst,
        });
        return Err(DropReason::Policy);
    }
    Ok(dst)
}

/// Whether the NAT could carry a packet to `ip` at all: not unspecified, broadcast or
/// multicast, and not on the segment itself (its IPv4 subnet, its IPv6 prefix or link-local
/// addresses), which is reached directly, never through the NAT.
pub(crate) fn is_routable(cfg: &Config, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || cfg.in_subnet(ip))
        }
        IpAddr::V6(ip) => {
            !(ip.is_unspecified()
                || ip.is_multicast()
                || crate::wire::is_link_local(ip)
                || cfg.ipv6.in_prefix(ip))
        }
    }
}

/// Whether `ip` can be a guest's own address (the NAT answers only those): in the IPv4 subnet
/// or the IPv6 prefix (or link-local), and not the virtual host's.
pub(crate) fn is_guest_address(ctx: &Ctx, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ctx.cfg.in_subnet(ip) && !ctx.is_host_address(ip),
        IpAddr::V6(ip) => ctx.is_guest_address6(ip),
    }
}

/// Whether the virtual host itself answers at `ip` (its IPv4 addresses, its IPv6 ones).
pub(crate) fn is_host_ip(ctx: &Ctx, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ctx.is_host_address(ip),
        IpAddr::V6(ip) => ctx.is_host_address6(ip),
    }
}

/// The virtual host's address of `ip`'s family, the source of what it says itself.
pub(crate) fn host_ip_for(ctx: &Ctx, ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ctx.host_ip().into(),
        IpAddr::V6(ip) => ctx.host_source6(ip).into(),
    }
}

impl Nat {
    pub(crate) fn new(cfg: &Config) -> Nat {
        Nat {
            frag: frag::Reassembler::default(),
            udp: udp::UdpNat::new(cfg),
            tcp: tcp::TcpNat::new(cfg),
            icmp: icmp::IcmpNat::new(cfg),
        }
    }

    /// Handles an IPv4 packet from a guest that is neither DHCP nor ICMP to the virtual host.
    /// A DNS query to the virtual host comes back for the engine to relay.
    pub(crate) fn handle_ipv4<'a>(
        &'a mut self,
        now: Instant,
        ctx: &mut Ctx,
        ip: &Ipv4Packet<&'a [u8]>,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<Option<DnsQuery<'a>>, DropReason> {
        if ip.more_frags() || ip.frag_offset() != 0 {
            // The reassembled datagram is lent by `frag`; the protocols are separate fields, so
            // it is handed on without a copy.
            let Some(whole) = self.frag.add(now, ip)? else {
                return Ok(None);
            };
            let packet = Ipv4Packet::new_checked(whole).map_err(|_| DropReason::Malformed)?;
            let protos = (&mut self.udp, &mut self.tcp, &mut self.icmp);
            return Self::handle_whole(protos, now, ctx, &GuestIp::v4(&packet), io, out);
        }
        let protos = (&mut self.udp, &mut self.tcp, &mut self.icmp);
        Self::handle_whole(protos, now, ctx, &GuestIp::v4(ip), io, out)
    }

    /// Handles a whole IPv6 packet from a guest that is not for the virtual host's own
    /// services (neighbour discovery, DHCPv6, echo); a DNS query to it comes back to relay.
    pub(crate) fn handle_ipv6<'a>(
        &'a mut self,
        now: Instant,
        ctx: &mut Ctx,
        ip: &crate::wire::Ipv6View<'a>,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<Option<DnsQuery<'a>>, DropReason> {
        if !ip.is_whole() {
            let Some(whole) = self.frag.add6(now, ip)? else {
                return Ok(None);
            };
            let packet = crate::wire::Ipv6View::parse(whole)?;
            if !packet.is_whole() {
                // A fragment inside a fragment.
                return Err(DropReason::Malformed);
            }
            let protos = (&mut self.udp, &mut self.tcp, &mut self.icmp);
            return Self::handle_whole(protos, now, ctx, &GuestIp::v6(&packet), io, out);
        }
        let protos = (&mut self.udp, &mut self.tcp, &mut self.icmp);
        Self::handle_whole(protos, now, ctx, &GuestIp::v6(ip), io, out)
    }

    /// Handles a whole datagram that reassembly (possibly another engine's, `Engine::reassemble`)
    /// produced, as `handle_ipv4` does once its fragments are in.
    pub(crate) fn handle_reassembled<'a>(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ip: &Ipv4Packet<&'a [u8]>,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<Option<DnsQuery<'a>>, DropReason> {
        let protos = (&mut self.udp, &mut self.tcp, &mut self.icmp);
        Self::handle_whole(protos, now, ctx, &GuestIp::v4(ip), io, out)
    }

    fn handle_whole<'a>(
        (udp, tcp, icmp): (&mut udp::UdpNat, &mut tcp::TcpNat, &mut icmp::IcmpNat),
        now: Instant,
        ctx: &mut Ctx,
        ip: &GuestIp<'a>,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<Option<DnsQuery<'a>>, DropReason> {
        let for_host = is_host_ip(ctx, ip.dst) && ip.proto == ip.icmp_proto();
        if !ctx.cfg.nat.enabled && !for_host {
            // Nothing is relayed (DNS included) while NAT is off; the virtual host still answers
            // pings, reassembled ones too.
            return Err(DropReason::Disabled);
        }
        if ip.ttl <= 1 && icmp_error::time_exceeded(ctx, ip, out) {
            return Err(DropReason::TtlExceeded);
        }
        match ip.proto {
            IpProtocol::Udp => udp.handle(now, ctx, ip, io, out),
            IpProtocol::Tcp => tcp.handle(now, ctx, ip, io, out).map(|()| None),
            IpProtocol::Icmp | IpProtocol::Icmpv6 if ip.proto == ip.icmp_proto() => {
                icmp.handle(now, ctx, ip, io, out).map(|()| None)
            }
            _ => Err(DropReason::Unsupported),
        }
    }

    /// Opens the guest side of a TCP connection a forward accepted (`Engine::tcp_inbound`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tcp_inbound(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        client: SocketAddrV4,
        target: InboundTarget,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), InboundRefused> {
        let shown = inbound::admit(now, ctx, client, &target)?;
        self.tcp
            .inbound(now, ctx, sock, shown.into(), target, io, out)
    }

    /// Opens (or finds) the UDP session of a forward's datagram (`Engine::udp_inbound`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn udp_inbound(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        client: SocketAddrV4,
        target: InboundTarget,
        payload: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), InboundRefused> {
        let shown = inbound::admit(now, ctx, client, &target)?;
        self.udp
            .inbound(now, ctx, sock, (client, shown), target, payload, io, out)
    }

    pub(crate) fn handle_host_event(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ev: SockEvent,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let ev = match self.tcp.handle_host_event(now, ctx, ev, io, out) {
            Some(ev) => ev,
            None => return,
        };
        let ev = match self.udp.handle_host_event(now, ctx, ev, io, out) {
            Some(ev) => ev,
            None => return,
        };
        if self.icmp.handle_host_event(now, ctx, ev, io, out).is_some() {
            tracing::debug!("event for a socket no session owns: {ev:?}");
        }
    }

    /// The NAT's rows of the seed's NAT table (`Engine::sessions` adds the DNS relay's), in no
    /// particular order.
    pub(crate) fn sessions(&self, into: &mut Vec<SessionInfo>) {
        self.tcp.sessions(into);
        self.udp.sessions(into);
        self.icmp.sessions(into);
    }

    /// How many rows `sessions` adds, per protocol (indexed by `Proto::index`; none of
    /// `Proto::Dns`, the DNS relay's), without building the list.
    pub(crate) fn session_counts(&self) -> [usize; 4] {
        let mut n = [0; 4];
        n[Proto::Tcp.index()] = self.tcp.len();
        n[Proto::Udp.index()] = self.udp.len();
        n[Proto::Icmp.index()] = self.icmp.len();
        n
    }

    /// NAT sessions (TCP, UDP, ICMP) of IPv6 guests.
    pub(crate) fn ipv6_sessions(&self) -> usize {
        self.tcp.ipv6_len() + self.udp.ipv6_len() + self.icmp.ipv6_len()
    }

    /// Ends the flows of forward `forward` (it was removed): how many.
    pub(crate) fn close_forward(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        forward: u32,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> usize {
        self.tcp.close_forward(now, ctx, forward, io, out)
            + self.udp.close_forward(ctx, forward, io)
    }

    /// Shutdown: resets every guest's TCP connection and closes every sock-side socket.
    pub(crate) fn close_all(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        self.tcp.close_all(now, ctx, io, out);
        self.udp.close_all(ctx, io);
        self.icmp.close_all(ctx, io);
    }

    /// With `on`, sessions are no longer expired for idleness by `handle_timeout` (nor does
    /// `poll_timeout` wake for it): `expire_sessions` does it when the caller says (a worker of
    /// a multi-worker runtime, on the control thread's tick). TCP's protocol timers stay.
    pub(crate) fn set_external_expiry(&mut self, on: bool, ctx: &Ctx) {
        self.udp.external_idle = on;
        self.icmp.external_idle = on;
        self.tcp.set_external_idle(on, ctx);
    }

    /// Applies changed session timeouts to the sessions already open.
    pub(crate) fn timeouts_changed(&mut self, ctx: &Ctx) {
        self.udp.reschedule_all(ctx);
        self.tcp.reschedule_all(ctx);
    }

    /// Ends the TCP, UDP and ICMP sessions idle past their timeouts at `now`.
    pub(crate) fn expire_sessions(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        self.tcp.expire_idle(now, ctx, io, out);
        self.udp.expire_idle(now, ctx, io);
        self.icmp.expire_idle(now, ctx, io);
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let t = earliest(self.tcp.poll_timeout(), self.udp.poll_timeout());
        let t = earliest(t, self.icmp.poll_timeout());
        earliest(t, self.frag.poll_timeout())
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        self.frag.handle_timeout(now, ctx);
        self.tcp.handle_timeout(now, ctx, io, out);
        self.udp.handle_timeout(now, ctx, io, out);
        self.icmp.handle_timeout(now, ctx, io, out);
    }
}
