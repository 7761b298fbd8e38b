//! ARP for the virtual host: answers for its own address, learns guests' MAC/IP pairs from ARP
//! and IP traffic, announces itself (gratuitous ARP) when it comes up.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{
    ArpHardware, ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol,
    ETHERNET_HEADER_LEN,
};

use crate::config::Mac;
use crate::output::FrameBatch;
use crate::stats::DropReason;
use crate::time::Instant;
use crate::wire::{eth, mac};

/// Bound on learned neighbours: a segment with more hosts than this is not one SecureNAT serves,
/// and a flood of forged ARP must not grow memory.
pub(crate) const MAX_NEIGHBOURS: usize = 4096;
/// A neighbour not heard from for this long is forgotten.
pub(crate) const NEIGHBOUR_TTL: Duration = Duration::from_secs(3600);

const ARP_LEN: usize = 28;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Neighbour {
    mac: Mac,
    seen: Instant,
}

/// Guests' IPv4 → MAC, learned from what they send.
#[derive(Default)]
pub(crate) struct ArpCache {
    table: HashMap<Ipv4Addr, Neighbour>,
    /// When a claim of the virtual host's address was last logged.
    claim_warned: Option<Instant>,
}

impl ArpCache {
    pub(crate) fn lookup(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.table.get(&ip).map(|n| n.mac)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Records that `ip` is at `mac`. Multicast/broadcast MACs and 0.0.0.0 are never learned.
    pub(crate) fn learn(&mut self, now: Instant, ip: Ipv4Addr, mac: Mac) {
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || mac.0[0] & 1 != 0 {
            return;
        }
        if let Some(n) = self.table.get_mut(&ip) {
            n.mac = mac;
            n.seen = now;
            return;
        }
        if self.table.len() >= MAX_NEIGHBOURS {
            self.expire(now);
            if self.table.len() >= MAX_NEIGHBOURS {
                let oldest = self
                    .table
                    .iter()
                    .min_by_key(|(_, n)| n.seen)
                    .map(|(ip, _)| *ip);
                if let Some(ip) = oldest {
                    self.table.remove(&ip);
                }
            }
        }
        self.table.insert(ip, Neighbour { mac, seen: now });
    }

    pub(crate) fn expire(&mut self, now: Instant) {
        self.table
            .retain(|_, n| now.saturating_since(n.seen) < NEIGHBOUR_TTL);
    }
}

fn push_arp(out: &mut FrameBatch, eth_dst: Mac, repr: &ArpRepr) {
    let ArpRepr::EthernetIpv4 {
        source_hardware_addr,
        ..
    } = *repr
    else {
        return;
    };
    out.push_with(ETHERNET_HEADER_LEN + ARP_LEN, |frame| {
        let mut f = EthernetFrame::new_unchecked(frame);
        f.set_dst_addr(eth(eth_dst));
        f.set_src_addr(source_hardware_addr);
        f.set_ethertype(EthernetProtocol::Arp);
        repr.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    });
}

/// The gratuitous ARP a host sends when its address comes up (a request for its own address).
pub(crate) fn push_gratuitous(out: &mut FrameBatch, host_mac: Mac, host_ip: Ipv4Addr) {
    push_request(out, host_mac, host_ip, host_ip);
}

/// An ARP request for `target` (when the core must reach a guest whose MAC it does not know).
pub(crate) fn push_request(
    out: &mut FrameBatch,
    host_mac: Mac,
    host_ip: Ipv4Addr,
    target: Ipv4Addr,
) {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: eth(host_mac),
        source_protocol_addr: host_ip,
        target_hardware_addr: eth(Mac([0; 6])),
        target_protocol_addr: target,
    };
    push_arp(out, Mac::BROADCAST, &repr);
}

/// Which of the virtual network's addresses the virtual host answers ARP for.
pub(crate) struct ArpIdentity {
    pub(crate) mac: Mac,
    pub(crate) ip: Ipv4Addr,
    /// Extra addresses answered with the same MAC: the host-loopback alias and the DNS
    /// address, each when set.
    pub(crate) aliases: [Option<Ipv4Addr>; 2],
}

/// Handles an ARP packet (the Ethernet payload). Learns the sender when it is on our subnet and
/// answers requests for the virtual host's addresses.
/// How often a claim of the virtual host's own address is logged (each is counted).
const CLAIM_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) fn handle(
    now: Instant,
    me: &ArpIdentity,
    mut may_learn: impl FnMut(Ipv4Addr, Mac) -> Option<bool>,
    cache: &mut ArpCache,
    payload: &[u8],
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    let packet = ArpPacket::new_checked(payload).map_err(|_| DropReason::Malformed)?;
    let repr = ArpRepr::parse(&packet).map_err(|_| DropReason::Unsupported)?;
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = repr
    else {
        return Err(DropReason::Unsupported);
    };
    if packet.hardware_type() != ArpHardware::Ethernet {
        return Err(DropReason::Unsupported);
    }
    let sender = mac(source_hardware_addr);
    if sender == me.mac {
        return Err(DropReason::Foreign);
    }
    let mut refused = false;
    if source_protocol_addr == me.ip {
        // Once a minute at most: a guest repeating the claim must not flood the log.
        if cache
            .claim_warned
            .is_none_or(|t| now.saturating_since(t) >= CLAIM_WARN_EVERY)
        {
            cache.claim_warned = Some(now);
            tracing::warn!(
                "another host ({}) claims the virtual host's address {}",
                sender,
                me.ip
            );
        }
        refused = true;
    } else {
        match may_learn(source_protocol_addr, sender) {
            Some(true) => cache.learn(now, source_protocol_addr, sender),
            Some(false) => refused = true,
            None => {}
        }
    }
    let ours = target_protocol_addr == me.ip || me.aliases.contains(&Some(target_protocol_addr));
    if operation == ArpOperation::Request && ours && source_protocol_addr != target_protocol_addr {
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: eth(me.mac),
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        push_arp(out, sender, &reply);
    }
    if refused {
        return Err(DropReason::Spoofed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Mac = Mac([0, 0xac, 1, 2, 3, 4]);
    const GUEST: Mac = Mac([2, 0, 0, 0, 0, 7]);
    const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
    const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);

    fn me() -> ArpIdentity {
        ArpIdentity {
            mac: HOST,
            ip: HOST_IP,
            aliases: [None, None],
        }
    }

    fn subnet(ip: Ipv4Addr, _: Mac) -> Option<bool> {
        (ip.octets()[..3] == [192, 168, 30]).then_some(true)
    }

    fn request(from: Mac, from_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut out = FrameBatch::new();
        push_request(&mut out, from, from_ip, target);
        out.get(0).unwrap()[ETHERNET_HEADER_LEN..].to_vec()
    }

    #[test]
    fn answers_for_own_ip_and_learns_sender() {
        let mut cache = ArpCache::default();
        let mut out = FrameBatch::new();
        let req = request(GUEST, GUEST_IP, HOST_IP);
        handle(Instant::ZERO, &me(), subnet, &mut cache, &req, &mut out).unwrap();
        assert_eq!(cache.lookup(GUEST_IP), Some(GUEST));
        assert_eq!(out.len(), 1);
        let f = EthernetFrame::new_checked(out.get(0).unwrap()).unwrap();
        assert_eq!(f.dst_addr(), eth(GUEST));
        let r = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap();
        assert_eq!(
            r,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: eth(HOST),
                source_protocol_addr: HOST_IP,
                target_hardware_addr: eth(GUEST),
                target_protocol_addr: GUEST_IP,
            }
        );
    }

    #[test]
    fn ignores_requests_for_others_and_foreign_senders() {
        let mut cache = ArpCache::default();
        let mut out = FrameBatch::new();
        let req = request(GUEST, GUEST_IP, Ipv4Addr::new(192, 168, 30, 99));
        handle(Instant::ZERO, &me(), subnet, &mut cache, &req, &mut out).unwrap();
        assert!(out.is_empty());
        // A sender outside the subnet is not learned.
        let req = request(GUEST, Ipv4Addr::new(10, 0, 0, 1), HOST_IP);
        handle(Instant::ZERO, &me(), subnet, &mut cache, &req, &mut out).unwrap();
        assert_eq!(cache.lookup(Ipv4Addr::new(10, 0, 0, 1)), None);
        // Our own frames reflected back are not ours to answer.
        let req = request(HOST, HOST_IP, HOST_IP);
        assert_eq!(
            handle(Instant::ZERO, &me(), subnet, &mut cache, &req, &mut out),
            Err(DropReason::Foreign)
        );
    }

    #[test]
    fn answers_for_each_alias_with_the_same_mac() {
        let (loopback, dns) = (
            Ipv4Addr::new(192, 168, 30, 2),
            Ipv4Addr::new(192, 168, 30, 3),
        );
        let mut cache = ArpCache::default();
        for aliases in [[Some(loopback), Some(dns)], [None, Some(dns)]] {
            let me = ArpIdentity { aliases, ..me() };
            let mut out = FrameBatch::new();
            let req = request(GUEST, GUEST_IP, dns);
            handle(Instant::ZERO, &me, subnet, &mut cache, &req, &mut out).unwrap();
            assert_eq!(out.len(), 1);
            let f = EthernetFrame::new_checked(out.get(0).unwrap()).unwrap();
            let r = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap();
            let ArpRepr::EthernetIpv4 {
                source_hardware_addr,
                source_protocol_addr,
                ..
            } = r
            else {
                panic!("{r:?}")
            };
            assert_eq!(
                (source_hardware_addr, source_protocol_addr),
                (eth(HOST), dns)
            );
        }
        // Without the DNS address, nobody answers for it.
        let me = ArpIdentity {
            aliases: [Some(loopback), None],
            ..me()
        };
        let mut out = FrameBatch::new();
        let req = request(GUEST, GUEST_IP, dns);
        handle(Instant::ZERO, &me, subnet, &mut cache, &req, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_is_counted_not_answered() {
        let mut cache = ArpCache::default();
        let mut out = FrameBatch::new();
        let req = request(GUEST, GUEST_IP, HOST_IP);
        assert_eq!(
            handle(
                Instant::ZERO,
                &me(),
                subnet,
                &mut cache,
                &req[..10],
                &mut out
            ),
            Err(DropReason::Malformed)
        );
        let mut bad = req.clone();
        bad[4] = 8; // hardware address length 8: not Ethernet/IPv4
        assert!(handle(Instant::ZERO, &me(), subnet, &mut cache, &bad, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn gratuitous_arp_names_own_address() {
        let mut out = FrameBatch::new();
        push_gratuitous(&mut out, HOST, HOST_IP);
        let f = EthernetFrame::new_checked(out.get(0).unwrap()).unwrap();
        assert_eq!(f.dst_addr(), eth(Mac::BROADCAST));
        let r = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap();
        let ArpRepr::EthernetIpv4 {
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = r
        else {
            panic!()
        };
        assert_eq!(
            (source_protocol_addr, target_protocol_addr),
            (HOST_IP, HOST_IP)
        );
    }

    #[test]
    fn cache_is_bounded() {
        let mut cache = ArpCache::default();
        for i in 0..(MAX_NEIGHBOURS as u32 + 100) {
            cache.learn(
                Instant::from_micros(i as u64),
                Ipv4Addr::from(0x0a00_0000 + i),
                GUEST,
            );
        }
        assert_eq!(cache.len(), MAX_NEIGHBOURS);
        assert_eq!(cache.lookup(Ipv4Addr::from(0x0a00_0000)), None);
        cache.expire(Instant::from_secs(100_000));
        assert!(cache.is_empty());
    }
}
