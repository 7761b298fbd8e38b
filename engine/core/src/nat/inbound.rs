//! Inbound flows: port forwarding into guests with the client's address preserved.
//!
//! The runtime owns the forwards' listeners. It accepts a client's connection (or takes a
//! client's datagram), resolves which guest the forward leads to, adopts the host socket into
//! its socket driver and hands the flow to the engine (`Engine::tcp_inbound`,
//! `Engine::udp_inbound`). The engine then opens the guest side *from the client's address*:
//! hubnat is the guest's router, so it may originate the segments of any off-link address,
//! and the guest's server sees the real client. The guest's answers, addressed to the client,
//! come back to hubnat (its default route) and meet the session by its key (guest, client),
//! in the same tables as the guests' own flows.
//!
//! What the guest is shown as the client (`inbound_source`): the client's own address and
//! port, except for a client on the host's loopback, which no guest could answer; it is shown
//! as `nat.host_loopback` when the configuration has that alias (it stands for the host's
//! loopback), else as the virtual host's address. Both are on the guest's own network, so
//! its answers reach hubnat directly. A client whose address the guest would take for one of
//! its own network, or for a group, cannot be answered and is refused.
//!
//! The operator opened the forward, so the egress policy does not apply to its flows; the
//! session limits do, counted against the guest: an inbound session is one of its sessions,
//! a SYN it has not answered one of its half-open connections, and a new session one of its
//! new sessions per second.

use std::fmt;
use std::net::SocketAddrV4;

use crate::config::{Config, Mac};
use crate::stats::DropReason;
use crate::time::Instant;
use crate::Ctx;

/// Where an inbound flow goes, as the runtime resolved it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct InboundTarget {
    /// The guest's address and the port its server listens on.
    pub guest: SocketAddrV4,
    /// The guest's MAC: the destination of every frame of the flow toward the guest.
    pub guest_mac: Mac,
    /// The forward it came through (the runtime's number for it): removing the forward ends
    /// its flows (`Engine::close_forward`).
    pub forward: u32,
}

/// Why an inbound flow was not opened. The engine has already aborted (TCP) and closed the
/// socket it was given, and counted the drop (`DropReason`, see `drop_reason`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InboundRefused {
    /// SecureNAT, or its NAT, is disabled.
    NatDisabled,
    /// A session limit of the guest (or of all guests), its share of half-open TCP
    /// connections, or its rate of new sessions.
    Limit,
    /// The source bindings would refuse the guest's answers from its MAC: its address is held
    /// by another MAC now, or (`nat.source_check = "lease"`) by no lease.
    GuestGone,
    /// No guest of the virtual network can have this address or MAC: outside the network,
    /// the virtual host's own address (or its loopback alias), the network's or broadcast
    /// address, port 0, a group MAC or the virtual host's own.
    BadTarget,
    /// The guest could not answer this client: an unspecified, broadcast or multicast address,
    /// one of the guest's own network, or port 0.
    BadClient,
    /// The engine already has a TCP connection between this guest and this client (a guest's
    /// own outbound one, or an earlier inbound one not closed yet).
    InUse,
}

impl InboundRefused {
    /// The drop counter it is counted under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            InboundRefused::NatDisabled => DropReason::Disabled,
            InboundRefused::Limit | InboundRefused::InUse => DropReason::Limit,
            InboundRefused::GuestGone => DropReason::NoArp,
            InboundRefused::BadTarget => DropReason::Foreign,
            // The same set of addresses the NAT refuses as destinations (`sock_destination`).
            InboundRefused::BadClient => DropReason::Loop,
        }
    }
}

impl fmt::Display for InboundRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InboundRefused::NatDisabled => "the NAT is disabled",
            InboundRefused::Limit => "a session limit of the guest is reached",
            InboundRefused::GuestGone => "the guest no longer holds its address",
            InboundRefused::BadTarget => "no guest can have that address",
            InboundRefused::BadClient => "the guest could not answer that client",
            InboundRefused::InUse => "the guest already has a connection with that client",
        })
    }
}

impl std::error::Error for InboundRefused {}

/// The client as the guest is shown it (see the module's documentation), or why it cannot be.
pub(crate) fn inbound_source(
    cfg: &Config,
    client: SocketAddrV4,
) -> Result<SocketAddrV4, InboundRefused> {
    let ip = *client.ip();
    if client.port() == 0 {
        return Err(InboundRefused::BadClient);
    }
    if ip.is_loopback() {
        let shown = cfg.nat.host_loopback.unwrap_or(cfg.host.ip);
        return Ok(SocketAddrV4::new(shown, client.port()));
    }
    // An address of its own network the guest would look for on the segment, not through
    // its router: the answers would never come back here.
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || cfg.in_subnet(ip) {
        return Err(InboundRefused::BadClient);
    }
    Ok(client)
}

/// Checks that an inbound flow may be opened at all (before any table is asked): the NAT is
/// on, the target is a possible guest that holds its address, and the client can be shown to
/// it. Returns the client as the guest is shown it.
pub(crate) fn admit(
    now: Instant,
    ctx: &mut Ctx,
    client: SocketAddrV4,
    target: &InboundTarget,
) -> Result<SocketAddrV4, InboundRefused> {
    let cfg = &ctx.cfg;
    if !cfg.enabled || !cfg.nat.enabled {
        return Err(InboundRefused::NatDisabled);
    }
    let ip = *target.guest.ip();
    let hosts = !u32::from(cfg.host.mask);
    let host_bits = u32::from(ip) & hosts;
    // A /31 or /32 has no network or broadcast address to keep out.
    let network_or_broadcast = hosts >= 3 && (host_bits == 0 || host_bits == hosts);
    let possible = cfg.in_subnet(ip)
        && !ctx.is_host_address(ip)
        && Some(ip) != cfg.nat.host_loopback
        && !network_or_broadcast
        && target.guest.port() != 0
        && target.guest_mac.0[0] & 1 == 0
        && target.guest_mac != ctx.mac
        && target.guest_mac != Mac([0; 6]);
    if !possible {
        return Err(InboundRefused::BadTarget);
    }
    let shown = inbound_source(cfg, client)?;
    let mode = cfg.nat.source_check;
    if !ctx.sources.would_accept(mode, now, target.guest_mac, ip) {
        return Err(InboundRefused::GuestGone);
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimSockets;
    use crate::testing::*;
    use crate::vhost::bindings::SourceCheck;
    use std::net::Ipv4Addr;

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 40000);
    const REMOTE_IP_PORT: SocketAddrV4 = SocketAddrV4::new(REMOTE_IP, 7);

    fn target(ip: Ipv4Addr, port: u16) -> InboundTarget {
        InboundTarget {
            guest: SocketAddrV4::new(ip, port),
            guest_mac: GUEST_MAC,
            forward: 1,
        }
    }

    /// Offers one TCP and one UDP flow; both must be refused for `why`, their sockets reset
    /// (TCP) and closed, and counted.
    fn refused(
        e: &mut crate::Engine,
        h: &mut SimSockets,
        client: SocketAddrV4,
        to: InboundTarget,
        why: InboundRefused,
    ) {
        let mut out = crate::FrameBatch::new();
        let drops = e.stats().drops_of(why.drop_reason());
        let tcp = h.adopt_tcp(std::net::SocketAddr::from(client));
        assert_eq!(e.tcp_inbound(T0, tcp, client, to, h, &mut out), Err(why));
        let udp = h.adopt_udp(std::net::SocketAddr::from(client));
        let r = e.udp_inbound(T0, udp, client, to, b"x", h, &mut out);
        assert_eq!(r, Err(why));
        assert!(h.aborted.contains(&tcp) && h.closed.ends_with(&[tcp, udp]));
        assert!(out.is_empty() && e.sessions().is_empty());
        assert_eq!(e.stats().drops_of(why.drop_reason()), drops + 2);
        assert_eq!(e.poll_event(), None);
    }

    #[test]
    fn nat_or_securenat_disabled_refuses() {
        let (mut e, mut h, _) = setup_with(|c| c.nat.enabled = false);
        let to = target(GUEST_IP, 80);
        refused(&mut e, &mut h, CLIENT, to, InboundRefused::NatDisabled);
        assert_eq!(e.stats().drops_of(DropReason::Disabled), 2);
        let (mut e, mut h, _) = setup_with(|c| c.enabled = false);
        refused(&mut e, &mut h, CLIENT, to, InboundRefused::NatDisabled);
    }

    #[test]
    fn targets_no_guest_can_have_are_refused() {
        let (mut e, mut h, _) =
            setup_with(|c| c.nat.host_loopback = Some(Ipv4Addr::new(192, 168, 30, 2)));
        let bad = InboundRefused::BadTarget;
        for ip in [
            REMOTE_IP,
            HOST_IP,
            Ipv4Addr::new(192, 168, 30, 2),
            Ipv4Addr::new(192, 168, 30, 0),
            Ipv4Addr::new(192, 168, 30, 255),
        ] {
            refused(&mut e, &mut h, CLIENT, target(ip, 80), bad);
        }
        refused(&mut e, &mut h, CLIENT, target(GUEST_IP, 0), bad);
        for mac in [
            HOST_MAC,
            crate::Mac::BROADCAST,
            crate::Mac([1, 0, 0x5e, 0, 0, 1]),
            crate::Mac([0; 6]),
        ] {
            let to = InboundTarget {
                guest_mac: mac,
                ..target(GUEST_IP, 80)
            };
            refused(&mut e, &mut h, CLIENT, to, bad);
        }
    }

    #[test]
    fn clients_the_guest_could_not_answer_are_refused() {
        let (mut e, mut h, _) = setup();
        let to = target(GUEST_IP, 80);
        for client in [
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 1),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 1),
            SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 1), 1),
            SocketAddrV4::new(GUEST2_IP, 1),
            SocketAddrV4::new(*CLIENT.ip(), 0),
        ] {
            refused(&mut e, &mut h, client, to, InboundRefused::BadClient);
            assert_eq!(e.inbound_source(client), Err(InboundRefused::BadClient));
        }
    }

    #[test]
    fn a_guest_that_no_longer_holds_its_address_is_refused() {
        // Lease mode, and no lease: the guest's answers would be dropped as spoofed.
        let (mut e, mut h, _) = setup_with(|c| c.nat.source_check = SourceCheck::Lease);
        let to = target(GUEST_IP, 80);
        refused(&mut e, &mut h, CLIENT, to, InboundRefused::GuestGone);
        // Learn mode: another MAC took the address since (its first frame from it).
        let (mut e, mut h, mut out) = setup();
        let mut frame = udp_frame(SocketAddrV4::new(GUEST_IP, 1), REMOTE_IP_PORT, b"x");
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
        e.handle_frame(T0, &frame, &mut h, &mut out);
        assert_eq!(e.sessions().len(), 1, "the other MAC holds the address");
        let tcp = h.adopt_tcp(std::net::SocketAddr::from(CLIENT));
        let r = e.tcp_inbound(T0, tcp, CLIENT, to, &mut h, &mut out);
        assert_eq!(r, Err(InboundRefused::GuestGone));
        assert!(h.aborted.contains(&tcp) && h.closed.contains(&tcp));
        assert_eq!(e.stats().drops_of(DropReason::NoArp), 1);
        assert_eq!(e.sessions().len(), 1);
    }

    #[test]
    fn loopback_clients_are_shown_as_the_alias_or_the_virtual_host() {
        let local = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5000);
        let (e, _, _) = setup();
        assert_eq!(
            e.inbound_source(local),
            Ok(SocketAddrV4::new(HOST_IP, 5000))
        );
        assert_eq!(e.inbound_source(CLIENT), Ok(CLIENT));
        let alias = Ipv4Addr::new(192, 168, 30, 2);
        let (e, _, _) = setup_with(|c| c.nat.host_loopback = Some(alias));
        let other = SocketAddrV4::new(Ipv4Addr::new(127, 1, 2, 3), 5000);
        assert_eq!(e.inbound_source(other), Ok(SocketAddrV4::new(alias, 5000)));
    }

    #[test]
    fn refusals_read_as_words() {
        assert_eq!(
            InboundRefused::Limit.to_string(),
            "a session limit of the guest is reached"
        );
        assert_eq!(InboundRefused::InUse.drop_reason(), DropReason::Limit);
    }
}
