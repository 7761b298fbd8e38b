//! The virtual DHCP server (seed 3.7.5, 3.7.6; RFC 2131, RFC 2132, RFC 3442).
//!
//! One server for one segment, with no relays: DISCOVER → OFFER, REQUEST → ACK/NAK (selecting,
//! init-reboot, renewing and rebinding), RELEASE, DECLINE and INFORM. The lease table is keyed by
//! the client's hardware address (`chaddr`), one lease per client, and bounded by the size of the
//! range and the reservations (every lease holds a distinct address of them).
//!
//! Address choice, in order: the client's current lease; the address just offered to it; the
//! address it asks for (option 50) when free; the address it had last time (remembered after the
//! lease ended, as long as nobody else took it); else the first free address of the range, taking
//! addresses that some other client may come back for only when nothing else is left. An offer
//! holds its address for [`OFFER_HOLD`] so that two DISCOVERs never get the same one; a DECLINEd
//! address is kept out of use for [`DECLINE_HOLD`] (only a client that holds an address can
//! decline it). When nothing is free the server stays silent.
//!
//! Replies follow RFC 2131 4.1: a NAK is always broadcast (the RFC says so "in all cases" when
//! giaddr is zero); otherwise a client with ciaddr set gets a unicast there (at the Ethernet
//! source), a client that set the broadcast flag gets a broadcast, and any other gets a unicast
//! to yiaddr at chaddr. Relayed messages (giaddr set) are not served: one segment, no relays.
//!
//! Static reservations (`reservation`) come first in the address choice: a reserved MAC is
//! given its address, and no other MAC ever is; a reserved MAC renewing another address while its
//! own is free, or another MAC renewing a reserved address, is NAKed and its lease ends.
//!
//! This file handles the messages and builds the replies; the address choice and the lease table
//! are in `pool`. The message view is `smoltcp::wire::DhcpPacket`; the options area is
//! `wire::dhcp_options`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{
    ArpHardware, DhcpFlags, DhcpMessageType, DhcpOpCode, DhcpPacket, Ipv4Packet, UdpPacket,
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
};

use crate::config::{DhcpConfig, Mac};
use crate::event::{Event, Events};
use crate::output::FrameBatch;
use crate::stats::DropReason;
use crate::time::Instant;
use crate::wire::dhcp_options::{
    encode_classless_routes, encode_search_list, ipv4_option, opt, OptionIter, OptionWriter,
    FILE_FIELD, MAGIC_COOKIE, MIN_BOOTP_LEN, OPTIONS_OFFSET, SNAME_FIELD,
};
use crate::wire::eth;
use crate::Ctx;

mod pool;
pub(crate) mod reservation;

pub use self::pool::Lease;
use self::pool::Pool;
#[cfg(test)]
pub(crate) use self::pool::{DECLINE_HOLD, OFFER_HOLD};
pub use self::reservation::{RawReservation, Reservation};

/// Host names (option 12) are kept to this many characters.
pub(crate) const MAX_HOST_NAME: usize = 64;
/// At most one "pool exhausted" log line per this interval (a flood of DISCOVERs must not flood
/// the log); every silenced DISCOVER is still counted as a `limit` drop.
pub(crate) const EXHAUSTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The largest message every client accepts (RFC 2131 2: 576-byte IP datagrams).
const MIN_MAX_MESSAGE: usize = 576;
const IP_UDP_HEADERS: usize = 28;

/// What a client's message means to the server (the parsed `Repr` of a BOOTREQUEST).
#[derive(Clone, Copy, Debug)]
struct ClientMessage<'a> {
    kind: DhcpMessageType,
    xid: u32,
    broadcast: bool,
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: Mac,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    host_name: &'a [u8],
    /// Option 55; None when the client sent none.
    params: Option<&'a [u8]>,
    max_message: Option<u16>,
}

impl<'a> ClientMessage<'a> {
    fn parse(bytes: &'a [u8]) -> Result<ClientMessage<'a>, DropReason> {
        let p = DhcpPacket::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
        if p.opcode() != DhcpOpCode::Request {
            return Err(DropReason::Malformed);
        }
        if p.hardware_type() != ArpHardware::Ethernet || p.hardware_len() != 6 {
            return Err(DropReason::Malformed);
        }
        if p.magic_number() != MAGIC_COOKIE {
            return Err(DropReason::Malformed);
        }
        let mut m = ClientMessage {
            kind: DhcpMessageType::Unknown(0),
            xid: p.transaction_id(),
            broadcast: p.flags().contains(DhcpFlags::BROADCAST),
            ciaddr: p.client_ip(),
            giaddr: p.relay_agent_ip(),
            chaddr: Mac(p.client_hardware_address().0),
            requested_ip: None,
            server_id: None,
            host_name: &[],
            params: None,
            max_message: None,
        };
        let mut kind = None;
        let overload = m.read_options(&bytes[OPTIONS_OFFSET..], &mut kind, true)?;
        // RFC 2132 9.3: options may continue in `file` (1), `sname` (2) or both (3), in that order.
        if overload & 1 != 0 {
            m.read_options(&bytes[FILE_FIELD], &mut kind, false)?;
        }
        if overload & 2 != 0 {
            m.read_options(&bytes[SNAME_FIELD], &mut kind, false)?;
        }
        m.kind = kind.ok_or(DropReason::Malformed)?;
        Ok(m)
    }

    /// Reads one options area; returns the option-overload value when `main`.
    fn read_options(
        &mut self,
        area: &'a [u8],
        kind: &mut Option<DhcpMessageType>,
        main: bool,
    ) -> Result<u8, DropReason> {
        let mut overload = 0;
        for o in OptionIter::new(area) {
            let (code, data) = o?;
            match code {
                opt::MESSAGE_TYPE => {
                    let &[t] = data else {
                        return Err(DropReason::Malformed);
                    };
                    *kind = Some(DhcpMessageType::from(t));
                }
                opt::REQUESTED_IP => self.requested_ip = Some(ipv4_option(data)?),
                opt::SERVER_ID => self.server_id = Some(ipv4_option(data)?),
                opt::HOST_NAME => self.host_name = data,
                opt::PARAMETER_LIST => self.params = Some(data),
                opt::MAX_MESSAGE_SIZE => {
                    let b: [u8; 2] = data.try_into().map_err(|_| DropReason::Malformed)?;
                    self.max_message = Some(u16::from_be_bytes(b));
                }
                opt::OVERLOAD if main => {
                    let &[v @ 1..=3] = data else {
                        return Err(DropReason::Malformed);
                    };
                    overload = v;
                }
                _ => {}
            }
        }
        Ok(overload)
    }
}

/// Option 12 as the lease table and the log show it: printable ASCII without spaces or commas
/// (the log line is comma-separated), trailing NULs dropped, at most [`MAX_HOST_NAME`] chars.
pub(crate) fn sanitize_host_name(raw: &[u8]) -> String {
    let end = raw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    raw[..end]
        .iter()
        .take(MAX_HOST_NAME)
        .map(|&b| match b {
            b',' => '_',
            0x21..=0x7e => b as char,
            _ => '_',
        })
        .collect()
}

/// What a reply carries beyond the message type.
#[derive(Clone, Copy)]
struct ReplySpec {
    kind: DhcpMessageType,
    ciaddr: Ipv4Addr,
    yiaddr: Ipv4Addr,
    /// Options 51/58/59 (OFFER and ACK of a lease, not ACK of an INFORM, not NAK).
    lease: bool,
    /// The configured options (mask, router, DNS, domain, routes); not in a NAK.
    config: bool,
}

/// A lease must be this old before its address can be taken back for another client.
const RECLAIM_AGE: Duration = Duration::from_secs(10);
/// How long an ARP probe of a lease's address waits for an answer.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// Probes sent for one request of a client the full pool could not serve.
const PROBES_AT_ONCE: usize = 4;

/// The virtual DHCP server: answers the guests' DHCP messages and keeps the lease table.
pub struct DhcpServer {
    pool: Pool,
    /// Addresses probed by ARP before being taken back (`reclaim`), and when.
    probes: HashMap<Ipv4Addr, Instant>,
    last_exhausted_log: Option<Instant>,
    /// The reply being built (kept, so building allocates nothing once warm).
    scratch: Vec<u8>,
    routes_buf: Vec<u8>,
    /// Option 119 of the configuration in force, encoded once.
    search: Vec<u8>,
}

impl DhcpServer {
    pub(crate) fn new(cfg: &DhcpConfig) -> DhcpServer {
        DhcpServer {
            pool: Pool::new(cfg),
            probes: HashMap::new(),
            last_exhausted_log: None,
            scratch: Vec::with_capacity(MIN_MAX_MESSAGE),
            routes_buf: Vec::new(),
            search: Self::encode_search(cfg),
        }
    }

    fn encode_search(cfg: &DhcpConfig) -> Vec<u8> {
        let mut b = Vec::new();
        encode_search_list(&cfg.search, &mut b);
        b
    }

    /// The static reservations in force.
    pub fn reservations(&self) -> &[Reservation] {
        &self.pool.config().reservations
    }

    /// The MAC `ip` is reserved for, if any.
    pub fn reserved_for(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.pool.reserved_for(ip)
    }

    /// A counter that changes whenever the lease table does (created, renewed, removed).
    pub fn generation(&self) -> u64 {
        self.pool.generation()
    }

    /// A counter that changes when a lease is created, moved or removed, but not when one is
    /// only renewed: what must reach the lease file before the client hears of it.
    pub fn binding_generation(&self) -> u64 {
        self.pool.binding_generation()
    }

    /// The pool is full: takes back an address whose lease has shown no sign of use since it
    /// was granted (no frame from it, not even the ARP every client sends for its router), once
    /// an ARP probe for it went unanswered for `PROBE_WAIT`. Until then, probes the likeliest
    /// candidates and returns None: the client asks again in a few seconds. So made-up clients
    /// that drained the pool cannot keep a real one out, and a quiet real client answers the
    /// probe and keeps its address.
    fn reclaim(&mut self, now: Instant, ctx: &mut Ctx, out: &mut FrameBatch) -> Option<Ipv4Addr> {
        let unused = |ctx: &Ctx, ip: Ipv4Addr, granted: Instant| {
            ctx.sources.last_seen(ip).is_none_or(|seen| seen <= granted)
        };
        let old_enough = Instant::from_micros(
            now.as_micros()
                .saturating_sub(RECLAIM_AGE.as_micros() as u64),
        );
        let candidates: Vec<(u32, Ipv4Addr, Instant)> =
            self.pool.granted_before(old_enough).collect();
        self.probes
            .retain(|ip, _| candidates.iter().any(|(_, c, _)| c == ip));
        for &(id, ip, granted) in &candidates {
            if let Some(&probed) = self.probes.get(&ip) {
                if now.saturating_since(probed) >= PROBE_WAIT && unused(ctx, ip, granted) {
                    self.probes.remove(&ip);
                    self.pool.take_back(id, &mut ctx.events);
                    return Some(ip);
                }
            }
        }
        let mut sent = 0;
        for &(_, ip, granted) in &candidates {
            if sent == PROBES_AT_ONCE {
                break;
            }
            if !self.probes.contains_key(&ip) && unused(ctx, ip, granted) {
                self.probes.insert(ip, now);
                crate::vhost::arp::push_request(out, ctx.mac, ctx.cfg.host.ip, ip);
                sent += 1;
            }
        }
        None
    }

    /// The lease table, in order of creation.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.pool.leases()
    }

    /// Lease `id`, if the table holds it.
    pub fn lease(&self, id: u32) -> Option<&Lease> {
        self.pool.lease(id)
    }

    /// The ids of the leases created, renewed or removed after `generation`, oldest change
    /// first (an id may repeat), so that a journal can append only those. None when that is
    /// further back than the changes kept (`CHANGES_KEPT`): the whole table must be saved.
    pub fn changed_since(&self, generation: u64) -> Option<impl Iterator<Item = u32> + '_> {
        self.pool.changed_since(generation)
    }

    #[cfg(test)]
    pub(crate) fn lease_of(&self, mac: Mac) -> Option<&Lease> {
        self.pool.lease_of(mac)
    }

    #[cfg(test)]
    pub(crate) fn config(&self) -> &DhcpConfig {
        self.pool.config()
    }

    /// Loads a saved lease table. Entries that are expired, outside the range, or that repeat an
    /// id, address or MAC already in the table are skipped. Returns how many were kept.
    pub fn restore(&mut self, now: Instant, leases: Vec<Lease>) -> usize {
        self.pool.restore(now, leases)
    }

    /// Applies a new DHCP configuration: leases, offers, declines and remembered addresses that
    /// are no longer in the range (or now collide with the gateway or a DNS server) are dropped.
    pub(crate) fn reconfigure(&mut self, cfg: &DhcpConfig, events: &mut Events) {
        self.pool.reconfigure(cfg, events);
        self.search = Self::encode_search(cfg);
    }

    /// Handles a datagram to UDP port 67 (`ip` is its whole IPv4 packet, not fragmented).
    pub(crate) fn handle(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        ip: &Ipv4Packet<&[u8]>,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| DropReason::Malformed)?;
        if udp.checksum() != 0 && !udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
        {
            return Err(DropReason::BadChecksum);
        }
        let msg = ClientMessage::parse(udp.payload())?;
        if msg.chaddr.0[0] & 1 != 0 || msg.chaddr == Mac::default() {
            return Err(DropReason::Malformed);
        }
        if msg.chaddr != src_mac {
            // A client speaks for itself only: another MAC's RELEASE or DECLINE would take
            // that client's address away, and made-up clients would drain the pool.
            if self.pool.config().check_chaddr {
                return Err(DropReason::Spoofed);
            }
            tracing::debug!(chaddr = %msg.chaddr, src = %src_mac, "DHCP chaddr differs from the Ethernet source");
        }
        if !msg.giaddr.is_unspecified() {
            // One segment, no relays: a relayed message is not for this server.
            return Err(DropReason::Unsupported);
        }
        self.pool.expire(now, &mut ctx.events);
        match msg.kind {
            DhcpMessageType::Discover => self.discover(now, ctx, src_mac, &msg, out),
            DhcpMessageType::Request => self.request(now, ctx, src_mac, &msg, out),
            DhcpMessageType::Decline => self.decline(now, ctx, &msg),
            DhcpMessageType::Release => self.release(ctx, &msg),
            DhcpMessageType::Inform => self.inform(now, ctx, src_mac, &msg, out),
            _ => Err(DropReason::Unsupported),
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.pool.poll_timeout()
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant, ctx: &mut Ctx) {
        self.pool.handle_timeout(now, &mut ctx.events);
    }

    fn discover(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let mac = msg.chaddr;
        let chosen = self
            .pool
            .choose(now, ctx.cfg.host.ip, mac, msg.requested_ip);
        let Some(ip) = chosen.or_else(|| self.reclaim(now, ctx, out)) else {
            if self
                .last_exhausted_log
                .is_none_or(|t| now.saturating_since(t) >= EXHAUSTED_LOG_INTERVAL)
            {
                ctx.events.push(Event::DhcpPoolExhausted { mac });
                self.last_exhausted_log = Some(now);
            }
            return Err(DropReason::Limit);
        };
        if !self.pool.is_leased(ip) {
            self.pool.reserve(now, mac, ip);
        }
        let spec = ReplySpec {
            kind: DhcpMessageType::Offer,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: ip,
            lease: true,
            config: true,
        };
        self.reply(now, ctx, src_mac, msg, spec, out);
        Ok(())
    }

    fn request(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let host_ip = ctx.cfg.host.ip;
        let ciaddr = (!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr);
        let ip = match (msg.server_id, msg.requested_ip) {
            // SELECTING, and the client chose another server: our offer is void.
            (Some(sid), _) if sid != host_ip => {
                self.pool.cancel_offer_mac(msg.chaddr);
                return Err(DropReason::Foreign);
            }
            // SELECTING (option 50 is a MUST there; tolerate a client that put it in ciaddr).
            (Some(_), Some(ip)) => ip,
            (Some(_), None) => ciaddr.ok_or(DropReason::Malformed)?,
            // INIT-REBOOT.
            (None, Some(ip)) => ip,
            // RENEWING (unicast) or REBINDING (broadcast).
            (None, None) => ciaddr.ok_or(DropReason::Malformed)?,
        };
        let mac = msg.chaddr;
        let moves = self.pool.reserved_elsewhere(mac, ip, now, host_ip);
        let spec = if moves.is_none() && self.pool.free_for(mac, ip, now, host_ip) {
            let mut name = sanitize_host_name(msg.host_name);
            if name.is_empty() {
                // The operator's name for the machine, so that forwards and the table show it.
                name = (self.pool.reservation_of(mac))
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default();
            }
            self.pool.commit(now, mac, ip, name, &mut ctx.events);
            ReplySpec {
                kind: DhcpMessageType::Ack,
                ciaddr: msg.ciaddr,
                yiaddr: ip,
                lease: true,
                config: true,
            }
        } else {
            if let Some(r) = moves {
                tracing::info!("DHCP: {mac} is moved from {ip} to its reserved address {r} (NAK)");
            } else if let Some(owner) = self.pool.reserved_for(ip).filter(|&o| o != mac) {
                tracing::info!("DHCP: {mac} may not keep {ip}, reserved for {owner} (NAK)");
            } else {
                tracing::debug!(client = %mac, %ip, "DHCP REQUEST refused (NAK)");
            }
            // The client now knows it has no lease of `ip`: the table says so too, and the
            // address is free for whom it is meant.
            self.pool.release(mac, ip, &mut ctx.events);
            ReplySpec {
                kind: DhcpMessageType::Nak,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                yiaddr: Ipv4Addr::UNSPECIFIED,
                lease: false,
                config: false,
            }
        };
        self.reply(now, ctx, src_mac, msg, spec, out);
        Ok(())
    }

    fn decline(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        msg: &ClientMessage,
    ) -> Result<(), DropReason> {
        if msg.server_id.is_some_and(|s| s != ctx.cfg.host.ip) {
            return Err(DropReason::Foreign);
        }
        let ip = msg.requested_ip.ok_or(DropReason::Malformed)?;
        if !self.pool.holds(msg.chaddr, ip) {
            tracing::debug!(client = %msg.chaddr, %ip, "DHCP DECLINE of an address the client does not hold ignored");
            return Ok(());
        }
        tracing::warn!(client = %msg.chaddr, %ip, "DHCP client declined an address: it is in use on the segment");
        self.pool.decline(now, msg.chaddr, ip, &mut ctx.events);
        Ok(())
    }

    fn release(&mut self, ctx: &mut Ctx, msg: &ClientMessage) -> Result<(), DropReason> {
        if msg.server_id.is_some_and(|s| s != ctx.cfg.host.ip) {
            return Err(DropReason::Foreign);
        }
        self.pool.release(msg.chaddr, msg.ciaddr, &mut ctx.events);
        Ok(())
    }

    fn inform(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        if msg.ciaddr.is_unspecified() {
            return Err(DropReason::Malformed);
        }
        // The answer goes to ciaddr, and the neighbour entry it needs would be the client's:
        // only a guest's own address of the virtual network qualifies.
        if !ctx.cfg.in_subnet(msg.ciaddr) || ctx.is_host_address(msg.ciaddr) {
            return Err(DropReason::Foreign);
        }
        if !ctx.source_ok(now, src_mac, msg.ciaddr) {
            return Err(DropReason::Spoofed);
        }
        let spec = ReplySpec {
            kind: DhcpMessageType::Ack,
            ciaddr: msg.ciaddr,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            lease: false,
            config: true,
        };
        self.reply(now, ctx, src_mac, msg, spec, out);
        Ok(())
    }

    // ---- replies ----

    /// Builds the reply in `scratch` and sends it as RFC 2131 4.1 says.
    fn reply(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        spec: ReplySpec,
        out: &mut FrameBatch,
    ) {
        let host_ip = ctx.cfg.host.ip;
        let limit = (msg.max_message.map_or(0, usize::from).max(MIN_MAX_MESSAGE))
            .min(usize::from(ctx.cfg.nat.mtu))
            - IP_UDP_HEADERS;
        let cfg = self.pool.config();
        let buf = &mut self.scratch;
        buf.clear();
        buf.resize(OPTIONS_OFFSET, 0);
        {
            let mut p = DhcpPacket::new_unchecked(&mut buf[..]);
            p.set_opcode(DhcpOpCode::Reply);
            p.set_hardware_type(ArpHardware::Ethernet);
            p.set_hardware_len(6);
            p.set_hops(0);
            p.set_transaction_id(msg.xid);
            p.set_secs(0);
            p.set_flags(if msg.broadcast {
                DhcpFlags::BROADCAST
            } else {
                DhcpFlags::empty()
            });
            p.set_client_ip(spec.ciaddr);
            p.set_your_ip(spec.yiaddr);
            p.set_server_ip(Ipv4Addr::UNSPECIFIED);
            p.set_relay_agent_ip(Ipv4Addr::UNSPECIFIED);
            p.set_client_hardware_address(eth(msg.chaddr));
            p.set_magic_number(MAGIC_COOKIE);
        }
        let mut w = OptionWriter { buf, limit };
        w.put(opt::MESSAGE_TYPE, &[u8::from(spec.kind)]);
        w.put(opt::SERVER_ID, &host_ip.octets());
        if spec.lease {
            let secs = cfg.lease.as_secs().min(u64::from(u32::MAX - 1)) as u32;
            w.put(opt::LEASE_TIME, &secs.to_be_bytes());
            w.put(opt::RENEWAL_TIME, &(secs / 2).to_be_bytes());
            w.put(
                opt::REBINDING_TIME,
                &((u64::from(secs) * 7 / 8) as u32).to_be_bytes(),
            );
        }
        if spec.kind == DhcpMessageType::Nak {
            w.put(opt::MESSAGE, b"requested address not available");
        }
        if spec.config {
            w.put(opt::SUBNET_MASK, &cfg.mask.octets());
            if let Some(gw) = cfg.gateway {
                w.put(opt::ROUTER, &gw.octets());
            }
            if !cfg.dns.is_empty() {
                let mut dns = [0u8; 8];
                let n = cfg.dns.len().min(2);
                for (i, s) in cfg.dns.iter().take(2).enumerate() {
                    dns[i * 4..i * 4 + 4].copy_from_slice(&s.octets());
                }
                w.put(opt::DNS_SERVERS, &dns[..n * 4]);
            }
            if let Some(d) = &cfg.domain {
                let d = d.as_bytes();
                w.put(opt::DOMAIN_NAME, &d[..d.len().min(255)]);
            }
            // The options SecureNAT never sent go to a client that asks for them, or that
            // asks for nothing in particular (no option 55): one that lists what it wants
            // and leaves them out would not use them, and they would take the room of what it
            // asked for in a small reply.
            let asked = |code: u8| msg.params.is_none_or(|p| p.contains(&code));
            if asked(opt::INTERFACE_MTU) {
                // Sent even at 1500: the segment's MTU is not necessarily what the guest's
                // interface starts with (a TAP or virtio device set otherwise, a jumbo
                // segment), and only this tells it.
                w.put(opt::INTERFACE_MTU, &ctx.cfg.nat.mtu.to_be_bytes());
            }
            if !cfg.ntp.is_empty() && asked(opt::NTP_SERVERS) {
                let mut ntp = [0u8; 4 * 63];
                let n = cfg.ntp.len().min(63);
                for (i, s) in cfg.ntp.iter().take(n).enumerate() {
                    ntp[i * 4..i * 4 + 4].copy_from_slice(&s.octets());
                }
                w.put(opt::NTP_SERVERS, &ntp[..n * 4]);
            }
            if !cfg.routes.is_empty() {
                self.routes_buf.clear();
                encode_classless_routes(&cfg.routes, cfg.gateway, &mut self.routes_buf);
                w.put_long(opt::CLASSLESS_ROUTES, &self.routes_buf);
                if msg
                    .params
                    .is_some_and(|p| p.contains(&opt::MS_CLASSLESS_ROUTES))
                {
                    w.put_long(opt::MS_CLASSLESS_ROUTES, &self.routes_buf);
                }
            }
            // Last, being the longest and the least needed to reach anything: a reply too
            // small for it still carries the routes. It goes whole or not at all, as its
            // compression pointers span the parts.
            if !self.search.is_empty() && asked(opt::DOMAIN_SEARCH) {
                w.put_long(opt::DOMAIN_SEARCH, &self.search);
            }
        }
        buf.push(opt::END);
        if buf.len() < MIN_BOOTP_LEN {
            buf.resize(MIN_BOOTP_LEN, 0);
        }

        let (dst_ip, dst_mac) = if spec.kind == DhcpMessageType::Nak {
            // RFC 2131 4.1: with giaddr zero, a NAK is always broadcast.
            (Ipv4Addr::BROADCAST, Mac::BROADCAST)
        } else if !msg.ciaddr.is_unspecified() {
            (msg.ciaddr, src_mac)
        } else if msg.broadcast || spec.yiaddr.is_unspecified() {
            (Ipv4Addr::BROADCAST, Mac::BROADCAST)
        } else {
            (spec.yiaddr, msg.chaddr)
        };
        if dst_mac != Mac::BROADCAST {
            ctx.arp.learn(now, dst_ip, dst_mac);
        }
        let ident = ctx.next_ident();
        crate::wire::push_udp(
            out,
            ctx.mac,
            dst_mac,
            host_ip,
            DHCP_SERVER_PORT,
            dst_ip,
            DHCP_CLIENT_PORT,
            ident,
            &self.scratch,
        );
    }
}

#[cfg(test)]
/// The message-path tests, and the test network that the pool's tests share.
mod tests {
    use smoltcp::wire::{EthernetFrame, ETHERNET_HEADER_LEN};

    use super::*;
    use crate::config::{Config, StaticRoute};
    use crate::sim::SimSockets;
    use crate::Engine;

    pub(super) const HOST_MAC: Mac = Mac([0x00, 0xac, 1, 2, 3, 4]);
    /// The client of the seed's log line.
    pub(super) const A: Mac = Mac([0x00, 0xAC, 0x85, 0x40, 0xB5, 0x50]);
    pub(super) const B: Mac = Mac([0x02, 0, 0, 0, 0, 0x0b]);
    pub(super) const C: Mac = Mac([0x02, 0, 0, 0, 0, 0x0c]);
    pub(super) const D: Mac = Mac([0x02, 0, 0, 0, 0, 0x0d]);
    pub(super) const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
    pub(super) const ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    pub(super) fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 30, last)
    }

    pub(super) const DISCOVER: u8 = 1;
    pub(super) const REQUEST: u8 = 3;
    pub(super) const DECLINE: u8 = 4;
    pub(super) const RELEASE: u8 = 7;
    pub(super) const INFORM: u8 = 8;
    pub(super) const OFFER: u8 = 2;
    pub(super) const ACK: u8 = 5;
    pub(super) const NAK: u8 = 6;

    // ---- a client message, built field by field ----

    #[derive(Clone)]
    pub(super) struct Msg {
        mac: Mac,
        eth_dst: Mac,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        op: u8,
        htype: u8,
        hlen: u8,
        xid: u32,
        flags: u16,
        ciaddr: Ipv4Addr,
        giaddr: Ipv4Addr,
        chaddr: Mac,
        cookie: u32,
        options: Vec<u8>,
    }

    pub(super) fn msg(kind: u8, mac: Mac) -> Msg {
        Msg {
            mac,
            eth_dst: Mac::BROADCAST,
            src: ANY,
            dst: Ipv4Addr::BROADCAST,
            op: 1,
            htype: 1,
            hlen: 6,
            xid: 0x1234_0000 | u32::from(mac.0[5]),
            flags: 0,
            ciaddr: ANY,
            giaddr: ANY,
            chaddr: mac,
            cookie: MAGIC_COOKIE,
            options: vec![opt::MESSAGE_TYPE, 1, kind],
        }
    }

    impl Msg {
        pub(super) fn opt(mut self, code: u8, data: &[u8]) -> Msg {
            self.options.push(code);
            self.options.push(data.len() as u8);
            self.options.extend_from_slice(data);
            self
        }
        pub(super) fn requested(self, a: Ipv4Addr) -> Msg {
            self.opt(opt::REQUESTED_IP, &a.octets())
        }
        pub(super) fn server(self, a: Ipv4Addr) -> Msg {
            self.opt(opt::SERVER_ID, &a.octets())
        }
        pub(super) fn host_name(self, n: &str) -> Msg {
            self.opt(opt::HOST_NAME, n.as_bytes())
        }
        /// A unicast from a configured client (renewing, INFORM).
        pub(super) fn configured_at(mut self, a: Ipv4Addr) -> Msg {
            self.ciaddr = a;
            self.src = a;
            self.dst = HOST_IP;
            self.eth_dst = HOST_MAC;
            self
        }
        pub(super) fn broadcast_flag(mut self) -> Msg {
            self.flags = 0x8000;
            self
        }
        pub(super) fn bootp(&self, end: bool) -> Vec<u8> {
            let mut b = vec![0u8; OPTIONS_OFFSET];
            b[0] = self.op;
            b[1] = self.htype;
            b[2] = self.hlen;
            b[4..8].copy_from_slice(&self.xid.to_be_bytes());
            b[10..12].copy_from_slice(&self.flags.to_be_bytes());
            b[12..16].copy_from_slice(&self.ciaddr.octets());
            b[24..28].copy_from_slice(&self.giaddr.octets());
            b[28..34].copy_from_slice(&self.chaddr.0);
            b[236..240].copy_from_slice(&self.cookie.to_be_bytes());
            b.extend_from_slice(&self.options);
            if end {
                b.push(opt::END);
            }
            b
        }
        pub(super) fn frame_of(&self, payload: &[u8]) -> Vec<u8> {
            let mut out = FrameBatch::new();
            crate::wire::push_udp(
                &mut out,
                self.mac,
                self.eth_dst,
                self.src,
                DHCP_CLIENT_PORT,
                self.dst,
                DHCP_SERVER_PORT,
                7,
                payload,
            );
            out.get(0).unwrap().to_vec()
        }
        pub(super) fn frame(&self) -> Vec<u8> {
            self.frame_of(&self.bootp(true))
        }
    }

    // ---- a reply, parsed (checksums verified) ----

    #[derive(Debug)]
    pub(super) struct Reply {
        eth_dst: Mac,
        eth_src: Mac,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        pub(super) kind: u8,
        xid: u32,
        flags: u16,
        ciaddr: Ipv4Addr,
        yiaddr: Ipv4Addr,
        chaddr: Mac,
        len: usize,
        options: Vec<(u8, Vec<u8>)>,
        raw_options: Vec<u8>,
    }

    impl Reply {
        pub(super) fn opt(&self, code: u8) -> Option<&[u8]> {
            self.options
                .iter()
                .find(|(c, _)| *c == code)
                .map(|(_, d)| d.as_slice())
        }
        pub(super) fn opt_u32(&self, code: u8) -> Option<u32> {
            self.opt(code)
                .map(|d| u32::from_be_bytes(d.try_into().unwrap()))
        }
    }

    pub(super) fn parse_reply(frame: &[u8]) -> Reply {
        let e = EthernetFrame::new_checked(frame).unwrap();
        let ipp = Ipv4Packet::new_checked(e.payload()).unwrap();
        assert!(ipp.verify_checksum());
        let udp = UdpPacket::new_checked(ipp.payload()).unwrap();
        assert!(udp.verify_checksum(&ipp.src_addr().into(), &ipp.dst_addr().into()));
        let b = udp.payload();
        let p = DhcpPacket::new_checked(b).unwrap();
        assert_eq!(p.opcode(), DhcpOpCode::Reply);
        assert_eq!(p.magic_number(), MAGIC_COOKIE);
        let mut options = Vec::new();
        for o in OptionIter::new(&b[OPTIONS_OFFSET..]) {
            let (c, d) = o.unwrap();
            options.push((c, d.to_vec()));
        }
        // The options end with END (and only padding after it).
        let area = &b[OPTIONS_OFFSET..];
        let mut i = 0;
        while area[i] != opt::END {
            i += if area[i] == opt::PAD {
                1
            } else {
                2 + area[i + 1] as usize
            };
        }
        assert!(area[i + 1..].iter().all(|&x| x == 0));
        let kind = options
            .iter()
            .find(|(c, _)| *c == opt::MESSAGE_TYPE)
            .unwrap()
            .1[0];
        Reply {
            eth_dst: Mac(e.dst_addr().0),
            eth_src: Mac(e.src_addr().0),
            src: ipp.src_addr(),
            dst: ipp.dst_addr(),
            sport: udp.src_port(),
            dport: udp.dst_port(),
            kind,
            xid: p.transaction_id(),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: p.client_ip(),
            yiaddr: p.your_ip(),
            chaddr: Mac(p.client_hardware_address().0),
            len: b.len(),
            options,
            raw_options: area[..i].to_vec(),
        }
    }

    // ---- the whole engine ----

    pub(super) struct Net {
        pub(super) engine: Engine,
        host: SimSockets,
        pub(super) now: Instant,
        /// Every event the engine reported, drained after each step.
        events: Vec<Event>,
        /// ARP probes the server sent.
        pub(super) probes: usize,
    }

    pub(super) fn config() -> Config {
        let mut c = Config::defaults();
        c.dhcp.domain = Some("example.test".into());
        c
    }

    impl Net {
        pub(super) fn new(cfg: Config) -> Net {
            Net {
                engine: Engine::new(cfg, HOST_MAC, 1),
                host: SimSockets::default(),
                now: Instant::from_secs(1000),
                events: Vec::new(),
                probes: 0,
            }
        }
        pub(super) fn frame(&mut self, frame: &[u8]) -> Vec<Reply> {
            let mut out = FrameBatch::new();
            self.engine
                .handle_frame(self.now, frame, &mut self.host, &mut out);
            self.drain();
            // ARP probes of addresses to take back (`reclaim`) are counted, not parsed.
            self.probes += out
                .iter()
                .filter(|f| f.get(12..14) == Some(&[8, 6]) && f.get(20..22) == Some(&[0, 1]))
                .count();
            out.iter()
                .filter(|f| f.get(12..14) != Some(&[8, 6]))
                .map(parse_reply)
                .collect()
        }
        pub(super) fn send(&mut self, m: &Msg) -> Vec<Reply> {
            self.frame(&m.frame())
        }
        pub(super) fn one(&mut self, m: &Msg) -> Reply {
            let mut r = self.send(m);
            assert_eq!(r.len(), 1, "expected one reply");
            r.pop().unwrap()
        }
        pub(super) fn silent(&mut self, m: &Msg) {
            assert!(self.send(m).is_empty(), "expected no reply");
        }
        pub(super) fn advance(&mut self, d: Duration) {
            self.now = self.now + d;
            let mut out = FrameBatch::new();
            self.engine
                .handle_timeout(self.now, &mut self.host, &mut out);
            self.drain();
            assert!(out.is_empty());
        }
        pub(super) fn offer(&mut self, mac: Mac) -> Ipv4Addr {
            let r = self.one(&msg(DISCOVER, mac));
            assert_eq!(r.kind, OFFER);
            r.yiaddr
        }
        /// DISCOVER, OFFER, REQUEST, ACK: the address the client ends with.
        pub(super) fn dora(&mut self, mac: Mac) -> Ipv4Addr {
            let offered = self.offer(mac);
            let r = self.one(&msg(REQUEST, mac).server(HOST_IP).requested(offered));
            assert_eq!((r.kind, r.yiaddr), (ACK, offered));
            offered
        }
        pub(super) fn drops(&self, why: DropReason) -> u64 {
            self.engine.stats().drops_of(why)
        }
        pub(super) fn drain(&mut self) {
            while let Some(e) = self.engine.poll_event() {
                self.events.push(e);
            }
        }
        pub(super) fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
            self.events.iter().filter(|e| f(e)).count()
        }
        pub(super) fn created(&self) -> usize {
            self.count(|e| matches!(e, Event::DhcpEntryCreated { .. }))
        }
        pub(super) fn deleted(&self, id: u32) -> usize {
            self.count(|e| matches!(e, Event::DhcpEntryDeleted { id: i, .. } if *i == id))
        }
        pub(super) fn leases(&self) -> Vec<Lease> {
            self.engine.dhcp.leases().cloned().collect()
        }
    }

    // ---- the message paths ----

    /// A forward's guest, named by its DHCP host name (any case), its MAC or its address, is
    /// found through its lease; a name nobody leased is nobody.
    #[test]
    fn forwards_find_guests_by_name_mac_and_address() {
        use crate::forward::GuestRef;
        let mut n = Net::new(config());
        let offered = n.offer(B);
        let r = n.one(
            &msg(REQUEST, B)
                .server(HOST_IP)
                .requested(offered)
                .host_name("Web-1"),
        );
        assert_eq!(r.kind, ACK);
        let e = &n.engine;
        let found = Some((offered, B));
        assert_eq!(e.find_guest(&GuestRef::Name("web-1".into())), found);
        assert_eq!(e.find_guest(&GuestRef::Mac(B)), found);
        assert_eq!(e.find_guest(&GuestRef::Ip(offered)), found);
        assert_eq!(e.find_guest(&GuestRef::Name("web-2".into())), None);
        assert_eq!(e.find_guest(&GuestRef::Mac(C)), None);
        assert_eq!(e.find_guest(&GuestRef::Ip(ip(99))), None);
    }

    #[test]
    fn discover_offer_request_ack_and_the_seeds_log_line() {
        let mut n = Net::new(config());
        let r = n.one(&msg(DISCOVER, A).host_name("NT4"));
        assert_eq!(r.kind, OFFER);
        assert_eq!(r.yiaddr, ip(10));
        assert_eq!(r.ciaddr, ANY);
        assert_eq!(r.xid, msg(DISCOVER, A).xid);
        assert_eq!(r.chaddr, A);
        // Unicast to the offered address at chaddr, from the virtual host's port 67 to 68.
        assert_eq!((r.eth_dst, r.eth_src), (A, HOST_MAC));
        assert_eq!((r.src, r.dst, r.sport, r.dport), (HOST_IP, ip(10), 67, 68));
        assert!(r.len >= MIN_BOOTP_LEN);
        assert_eq!(r.opt(opt::SERVER_ID), Some(&HOST_IP.octets()[..]));
        assert_eq!(r.opt_u32(opt::LEASE_TIME), Some(7200));
        assert_eq!(r.opt_u32(opt::RENEWAL_TIME), Some(3600));
        assert_eq!(r.opt_u32(opt::REBINDING_TIME), Some(6300));
        assert_eq!(r.opt(opt::SUBNET_MASK), Some(&[255, 255, 255, 0][..]));
        assert_eq!(r.opt(opt::ROUTER), Some(&HOST_IP.octets()[..]));
        assert_eq!(r.opt(opt::DNS_SERVERS), Some(&HOST_IP.octets()[..]));
        assert_eq!(r.opt(opt::DOMAIN_NAME), Some(&b"example.test"[..]));
        assert_eq!(r.opt(opt::CLASSLESS_ROUTES), None);
        // The first options are the message type and the server identifier.
        assert_eq!(r.raw_options[..3], [opt::MESSAGE_TYPE, 1, OFFER]);
        assert!(n.leases().is_empty(), "an offer is not a lease");

        let r = n.one(
            &msg(REQUEST, A)
                .server(HOST_IP)
                .requested(ip(10))
                .host_name("NT4"),
        );
        assert_eq!(
            (r.kind, r.yiaddr, r.dst, r.eth_dst),
            (ACK, ip(10), ip(10), A)
        );
        assert_eq!(r.opt_u32(opt::LEASE_TIME), Some(7200));
        let leases = n.leases();
        assert_eq!(leases.len(), 1);
        let l = &leases[0];
        assert_eq!(
            (l.id, l.mac, l.ip, l.host_name.as_str()),
            (1, A, ip(10), "NT4")
        );
        assert_eq!(l.leased_at, n.now);
        assert_eq!(l.expires_at, n.now + Duration::from_secs(7200));
        assert_eq!(
            n.events,
            vec![Event::DhcpEntryCreated {
                id: 1,
                mac: A,
                ip: ip(10),
                host_name: "NT4".into(),
                lease: Duration::from_secs(7200),
            }]
        );
        // The unicast taught the neighbour table where the client is.
        assert_eq!(n.engine.ctx.arp.lookup(ip(10)), Some(A));
        // The next timer is the offer sweep; the lease's expiry follows.
        assert_eq!(n.engine.dhcp.poll_timeout(), Some(n.now + OFFER_HOLD));
    }

    #[test]
    fn two_discovers_get_different_addresses_and_requested_address_is_honoured() {
        let mut n = Net::new(config());
        assert_eq!(n.offer(A), ip(10));
        assert_eq!(n.offer(B), ip(11));
        // The same client asking again gets the same offer.
        assert_eq!(n.offer(A), ip(10));
        let r = n.one(&msg(DISCOVER, C).requested(ip(77)));
        assert_eq!(r.yiaddr, ip(77));
        // A requested address that is offered to another client is not given.
        let r = n.one(&msg(DISCOVER, D).requested(ip(77)));
        assert_eq!(r.yiaddr, ip(12));
        // Nor one outside the range.
        let r = n.one(&msg(DISCOVER, Mac([2, 0, 0, 0, 0, 0xe])).requested(ip(250)));
        assert_eq!(r.yiaddr, ip(13));
    }

    #[test]
    fn request_for_an_address_not_ours_is_naked() {
        let mut n = Net::new(config());
        n.dora(A);
        let cases = [
            // INIT-REBOOT for another network.
            msg(REQUEST, B).requested(Ipv4Addr::new(10, 0, 0, 5)),
            // INIT-REBOOT in our subnet but outside the range.
            msg(REQUEST, B).requested(ip(250)),
            // SELECTING an address leased to someone else.
            msg(REQUEST, B).server(HOST_IP).requested(ip(10)),
            // INIT-REBOOT of the virtual host's own address.
            msg(REQUEST, B).requested(HOST_IP),
            // RENEWING an address of another network: the NAK is still broadcast.
            msg(REQUEST, B).configured_at(Ipv4Addr::new(10, 0, 0, 5)),
        ];
        for m in cases {
            let r = n.one(&m);
            assert_eq!(r.kind, NAK);
            assert_eq!((r.yiaddr, r.ciaddr), (ANY, ANY));
            assert_eq!((r.eth_dst, r.dst), (Mac::BROADCAST, Ipv4Addr::BROADCAST));
            assert_eq!(r.opt(opt::SERVER_ID), Some(&HOST_IP.octets()[..]));
            for o in [
                opt::LEASE_TIME,
                opt::SUBNET_MASK,
                opt::ROUTER,
                opt::DNS_SERVERS,
            ] {
                assert_eq!(r.opt(o), None);
            }
        }
        assert_eq!(n.leases().len(), 1);
        assert_eq!(n.leases()[0].mac, A);
    }

    #[test]
    fn init_reboot_of_a_free_address_in_range_is_acked() {
        let mut n = Net::new(config());
        let r = n.one(&msg(REQUEST, B).requested(ip(42)));
        assert_eq!((r.kind, r.yiaddr), (ACK, ip(42)));
        assert_eq!(n.leases()[0].ip, ip(42));
    }

    #[test]
    fn request_to_another_server_is_ignored_and_frees_the_offer() {
        let mut n = Net::new(config());
        assert_eq!(n.offer(B), ip(10));
        n.silent(&msg(REQUEST, B).server(ip(99)).requested(ip(10)));
        assert_eq!(n.drops(DropReason::Foreign), 1);
        assert!(n.leases().is_empty());
        // The address held for B is free again.
        assert_eq!(n.offer(C), ip(10));
    }

    #[test]
    fn release_then_discover_gives_the_same_address() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(A), ip(10));
        n.silent(&msg(RELEASE, A).configured_at(ip(10)).server(HOST_IP));
        assert!(n.leases().is_empty());
        let gone = Event::DhcpEntryDeleted {
            id: 1,
            mac: A,
            ip: ip(10),
        };
        assert_eq!(n.count(|e| *e == gone), 1);
        // Another client is kept off the address A may come back for.
        assert_eq!(n.dora(B), ip(11));
        assert_eq!(n.dora(A), ip(10));
        assert_eq!(n.leases()[1].id, 3, "a new entry after a release");
        // A RELEASE naming another server, or an address the client does not hold, does nothing.
        n.silent(&msg(RELEASE, A).configured_at(ip(10)).server(ip(99)));
        n.silent(&msg(RELEASE, A).configured_at(ip(11)).server(HOST_IP));
        assert_eq!(n.leases().len(), 2);
    }

    #[test]
    fn declined_address_is_not_offered_for_a_while() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(A), ip(10));
        n.silent(&msg(DECLINE, A).requested(ip(10)).server(HOST_IP));
        assert!(n.leases().is_empty());
        assert_eq!(n.deleted(1), 1);
        assert_eq!(n.offer(A), ip(11));
        assert_eq!(n.offer(B), ip(12));
        // Nor given on request.
        assert_eq!(n.one(&msg(REQUEST, C).requested(ip(10))).kind, NAK);
        n.advance(DECLINE_HOLD);
        assert_eq!(n.offer(C), ip(10));
        // A client cannot decline an address it does not hold.
        let b = n.dora(B);
        let d = n.offer(D);
        n.silent(&msg(DECLINE, D).requested(b).server(HOST_IP));
        n.silent(&msg(DECLINE, D).requested(b));
        let r = n.one(&msg(REQUEST, B).configured_at(b));
        assert_eq!((r.kind, r.yiaddr), (ACK, b));
        assert_eq!(n.offer(D), d);
        // Declining an offered address works as well.
        n.silent(&msg(DECLINE, D).requested(d).server(HOST_IP));
        assert_ne!(n.offer(D), d);
        // A DECLINE without the address is malformed.
        n.silent(&msg(DECLINE, A).server(HOST_IP));
        assert_eq!(n.drops(DropReason::Malformed), 1);
    }

    #[test]
    fn inform_is_acked_without_address_or_lease() {
        let mut n = Net::new(config());
        let r = n.one(&msg(INFORM, D).configured_at(ip(50)));
        assert_eq!(r.kind, ACK);
        assert_eq!((r.yiaddr, r.ciaddr), (ANY, ip(50)));
        assert_eq!((r.dst, r.eth_dst), (ip(50), D));
        for o in [opt::LEASE_TIME, opt::RENEWAL_TIME, opt::REBINDING_TIME] {
            assert_eq!(r.opt(o), None);
        }
        assert_eq!(r.opt(opt::SUBNET_MASK), Some(&[255, 255, 255, 0][..]));
        assert_eq!(r.opt(opt::ROUTER), Some(&HOST_IP.octets()[..]));
        assert_eq!(r.opt(opt::DNS_SERVERS), Some(&HOST_IP.octets()[..]));
        assert!(n.leases().is_empty());
        assert!(n.events.is_empty());
        // An INFORM without ciaddr is malformed.
        n.silent(&msg(INFORM, D));
        assert_eq!(n.drops(DropReason::Malformed), 1);
    }

    #[test]
    fn renewal_and_rebinding_extend_the_same_entry() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(A), ip(10));
        n.advance(Duration::from_secs(3600));
        let r = n.one(&msg(REQUEST, A).configured_at(ip(10)));
        assert_eq!((r.kind, r.yiaddr, r.ciaddr), (ACK, ip(10), ip(10)));
        assert_eq!((r.dst, r.eth_dst), (ip(10), A));
        let l = n.leases()[0].clone();
        assert_eq!(l.id, 1);
        assert_eq!(l.expires_at, n.now + Duration::from_secs(7200));
        assert_eq!(l.leased_at, Instant::from_secs(1000));
        // REBINDING: broadcast, ciaddr set; the answer is still unicast to ciaddr.
        n.advance(Duration::from_secs(6400));
        let mut m = msg(REQUEST, A);
        m.ciaddr = ip(10);
        m.src = ip(10);
        let r = n.one(&m);
        assert_eq!((r.kind, r.dst, r.eth_dst), (ACK, ip(10), A));
        assert_eq!(n.leases()[0].id, 1);
        assert_eq!(n.created(), 1);
        assert_eq!(n.count(|e| matches!(e, Event::DhcpEntryDeleted { .. })), 0);
        assert_eq!(n.leases().len(), 1);
    }

    #[test]
    fn lease_expires_through_handle_timeout() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(A), ip(10));
        let expiry = n.leases()[0].expires_at;
        n.advance(OFFER_HOLD);
        assert_eq!(n.engine.dhcp.poll_timeout(), Some(expiry));
        assert_eq!(n.engine.poll_timeout(), Some(expiry));
        n.advance(Duration::from_secs(7199) - OFFER_HOLD);
        assert_eq!(n.leases().len(), 1);
        n.advance(Duration::from_secs(1));
        assert!(n.leases().is_empty());
        let gone = Event::DhcpEntryDeleted {
            id: 1,
            mac: A,
            ip: ip(10),
        };
        assert_eq!(n.count(|e| *e == gone), 1);
        // The address stays A's while nobody else takes it.
        assert_eq!(n.dora(B), ip(11));
        assert_eq!(n.dora(A), ip(10));
        n.advance(Duration::from_secs(7200));
        assert!(n.leases().is_empty());
        assert_eq!(n.engine.dhcp.poll_timeout(), None);
    }

    #[test]
    fn pool_exhaustion_is_silent_and_never_duplicates() {
        let mut cfg = config();
        cfg.dhcp.range_start = ip(10);
        cfg.dhcp.range_end = ip(11);
        let mut n = Net::new(cfg);
        // Offers alone hold the addresses.
        assert_eq!(n.offer(A), ip(10));
        assert_eq!(n.offer(B), ip(11));
        n.silent(&msg(DISCOVER, C));
        assert_eq!(n.drops(DropReason::Limit), 1);
        assert_eq!(n.events, vec![Event::DhcpPoolExhausted { mac: C }]);
        // Once the offers lapse, the third client is served.
        n.advance(OFFER_HOLD);
        assert_eq!(n.offer(C), ip(10));
        // With both addresses leased, nothing is left for a third.
        let mut cfg = config();
        cfg.dhcp.range_start = ip(10);
        cfg.dhcp.range_end = ip(11);
        let mut n = Net::new(cfg);
        assert_eq!(n.dora(A), ip(10));
        assert_eq!(n.dora(B), ip(11));
        n.silent(&msg(DISCOVER, C));
        n.silent(&msg(DISCOVER, D));
        assert_eq!(n.drops(DropReason::Limit), 2);
        assert_eq!(
            n.count(|e| matches!(e, Event::DhcpPoolExhausted { .. })),
            1,
            "the report is rate-limited"
        );
        assert_eq!(n.one(&msg(REQUEST, C).requested(ip(11))).kind, NAK);
        assert_eq!(n.leases().len(), 2);
    }

    #[test]
    fn the_host_gateway_and_dns_addresses_are_never_given() {
        let mut cfg = config();
        cfg.dhcp.range_start = ip(1);
        cfg.dhcp.range_end = ip(4);
        cfg.dhcp.gateway = Some(ip(2));
        cfg.dhcp.dns = vec![ip(3)];
        let mut n = Net::new(cfg);
        assert_eq!(n.dora(A), ip(4));
        n.silent(&msg(DISCOVER, B));
        assert_eq!(n.one(&msg(REQUEST, B).requested(ip(2))).kind, NAK);
    }

    #[test]
    fn blank_gateway_dns_domain_leave_their_options_out() {
        let mut cfg = config();
        cfg.dhcp.gateway = None;
        cfg.dhcp.dns = vec![];
        cfg.dhcp.domain = None;
        let mut n = Net::new(cfg);
        let r = n.one(&msg(DISCOVER, A));
        for o in [
            opt::ROUTER,
            opt::DNS_SERVERS,
            opt::DOMAIN_NAME,
            opt::CLASSLESS_ROUTES,
        ] {
            assert_eq!(r.opt(o), None, "option {o}");
        }
        assert!(r.opt(opt::SUBNET_MASK).is_some() && r.opt(opt::LEASE_TIME).is_some());
        assert_eq!(
            r.len, MIN_BOOTP_LEN,
            "short replies are padded to 300 bytes"
        );
    }

    #[test]
    fn two_dns_servers_make_an_eight_byte_option() {
        let mut cfg = config();
        cfg.dhcp.dns = vec![ip(1), Ipv4Addr::new(192, 168, 30, 2)];
        let mut n = Net::new(cfg);
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(
            r.opt(opt::DNS_SERVERS),
            Some(&[192, 168, 30, 1, 192, 168, 30, 2][..])
        );
    }

    #[test]
    fn the_dns_address_is_offered_as_the_dns_server() {
        let raw = crate::config::RawConfig::from_toml("[dns]\naddress = \"192.168.30.3\"").unwrap();
        let mut n = Net::new(Config::from_raw(&raw).unwrap());
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(r.opt(opt::DNS_SERVERS), Some(&[192, 168, 30, 3][..]));
    }

    #[test]
    fn static_routes_are_sent_as_option_121_with_the_default_route() {
        let mut cfg = config();
        cfg.dhcp.routes = vec![
            StaticRoute {
                dest: Ipv4Addr::new(10, 1, 0, 0),
                prefix_len: 16,
                gateway: ip(254),
            },
            StaticRoute {
                dest: Ipv4Addr::new(172, 16, 5, 128),
                prefix_len: 25,
                gateway: ip(253),
            },
            StaticRoute {
                dest: Ipv4Addr::new(10, 9, 9, 9),
                prefix_len: 32,
                gateway: ip(252),
            },
        ];
        let mut n = Net::new(cfg.clone());
        let r = n.one(&msg(DISCOVER, A));
        let expected: &[u8] = &[
            16, 10, 1, 192, 168, 30, 254, //
            25, 172, 16, 5, 128, 192, 168, 30, 253, //
            32, 10, 9, 9, 9, 192, 168, 30, 252, //
            0, 192, 168, 30, 1,
        ];
        assert_eq!(r.opt(opt::CLASSLESS_ROUTES), Some(expected));
        assert_eq!(r.opt(opt::ROUTER), Some(&HOST_IP.octets()[..]));
        assert_eq!(r.opt(opt::MS_CLASSLESS_ROUTES), None);
        // Option 249 only for a client that asks for it.
        let r = n.one(&msg(DISCOVER, B).opt(opt::PARAMETER_LIST, &[1, 3, 121, 249]));
        assert_eq!(r.opt(opt::MS_CLASSLESS_ROUTES), Some(expected));
        // Without a gateway there is no default route to add.
        cfg.dhcp.gateway = None;
        let mut n = Net::new(cfg);
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(
            r.opt(opt::CLASSLESS_ROUTES),
            Some(&expected[..expected.len() - 5])
        );
        assert_eq!(r.opt(opt::ROUTER), None);
    }

    #[test]
    fn many_routes_are_split_and_bounded_by_the_message_size() {
        let mut cfg = config();
        cfg.dhcp.routes = (0..40)
            .map(|i| StaticRoute {
                dest: Ipv4Addr::new(10, i, 0, 0),
                prefix_len: 32,
                gateway: ip(254),
            })
            .collect();
        let mut n = Net::new(cfg);
        // 40 × 9 + 5 = 365 bytes: does not fit the 576-byte default.
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(r.opt(opt::CLASSLESS_ROUTES), None);
        assert!(r.len <= 576 - 28);
        // A client that takes 1500-byte messages gets it in two parts (RFC 3396).
        let r = n.one(&msg(DISCOVER, B).opt(opt::MAX_MESSAGE_SIZE, &1500u16.to_be_bytes()));
        let parts: Vec<&Vec<u8>> = r
            .options
            .iter()
            .filter(|(c, _)| *c == opt::CLASSLESS_ROUTES)
            .map(|(_, d)| d)
            .collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len() + parts[1].len(), 365);
    }

    #[test]
    fn broadcast_flag_makes_replies_broadcast() {
        let mut n = Net::new(config());
        let r = n.one(&msg(DISCOVER, A).broadcast_flag());
        assert_eq!((r.eth_dst, r.dst), (Mac::BROADCAST, Ipv4Addr::BROADCAST));
        assert_eq!(r.flags, 0x8000);
        let r = n.one(
            &msg(REQUEST, A)
                .broadcast_flag()
                .server(HOST_IP)
                .requested(r.yiaddr),
        );
        assert_eq!(
            (r.kind, r.eth_dst, r.dst),
            (ACK, Mac::BROADCAST, Ipv4Addr::BROADCAST)
        );
        // Broadcast replies teach the neighbour table nothing.
        assert_eq!(n.engine.ctx.arp.lookup(ip(10)), None);
    }

    #[test]
    fn a_full_pool_takes_back_an_unused_lease_after_an_unanswered_probe() {
        let mut cfg = config();
        cfg.dhcp.range_start = ip(10);
        cfg.dhcp.range_end = ip(12);
        let mut n = Net::new(cfg);
        // Made-up clients, each from its own MAC, take every address and are never heard of
        // again; one real client (C) uses its address.
        let fakes = [Mac([2, 0x5a, 0, 0, 0, 1]), Mac([2, 0x5a, 0, 0, 0, 2])];
        for f in fakes {
            n.dora(f);
        }
        let c_ip = n.dora(C);
        n.advance(Duration::from_secs(11));
        // C sends an ARP for its router: it is in use.
        n.frame(&arp_request_from(C, c_ip, HOST_IP));
        // A newcomer: the full pool probes the unused addresses first, answering nothing.
        n.silent(&msg(DISCOVER, D));
        assert_eq!(n.probes, 2, "only the unused leases are probed");
        n.advance(Duration::from_secs(2));
        let r = n.one(&msg(DISCOVER, D));
        assert_eq!(r.kind, OFFER);
        assert_ne!(r.yiaddr, c_ip, "the used address is kept");
        assert!(n.leases().iter().any(|l| l.mac == C && l.ip == c_ip));
    }

    fn arp_request_from(mac: Mac, from: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress};
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(mac.0),
            source_protocol_addr: from,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let mut f = vec![0u8; 14 + repr.buffer_len()];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac.0);
        f[12..14].copy_from_slice(&[8, 6]);
        repr.emit(&mut ArpPacket::new_unchecked(&mut f[14..]));
        f
    }

    #[test]
    fn a_message_for_another_client_is_refused() {
        let mut n = Net::new(config());
        let a = n.dora(A);
        // B asks in A's name: to release A's lease, or to take addresses as made-up clients.
        let mut m = msg(RELEASE, A).configured_at(a).server(HOST_IP);
        m.mac = B;
        n.silent(&m);
        let mut m = msg(DISCOVER, C);
        m.mac = B;
        n.silent(&m);
        assert_eq!(n.drops(DropReason::Spoofed), 2);
        assert_eq!(n.leases().len(), 1, "A keeps its lease");
        assert_eq!(n.leases()[0].mac, A);
    }

    #[test]
    fn without_the_chaddr_check_another_client_is_served_at_chaddr() {
        let mut cfg = config();
        cfg.dhcp.check_chaddr = false;
        let mut n = Net::new(cfg);
        let mut m = msg(DISCOVER, A);
        m.chaddr = B;
        let r = n.one(&m);
        assert_eq!((r.chaddr, r.eth_dst), (B, B));
        assert_eq!(n.offer(B), r.yiaddr, "the offer is B's");
    }

    #[test]
    fn host_names_are_sanitized() {
        assert_eq!(sanitize_host_name(b"NT4"), "NT4");
        assert_eq!(sanitize_host_name(b"a b\x01,c\xff\0\0"), "a_b__c_");
        assert_eq!(sanitize_host_name(&[b'x'; 300]).len(), MAX_HOST_NAME);
        let mut n = Net::new(config());
        let o = n.offer(A);
        n.one(
            &msg(REQUEST, A)
                .server(HOST_IP)
                .requested(o)
                .opt(opt::HOST_NAME, b"bad, name\n"),
        );
        assert_eq!(n.leases()[0].host_name, "bad__name_");
    }

    #[test]
    fn client_moving_to_another_address_gets_a_new_entry() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(A), ip(10));
        let r = n.one(&msg(REQUEST, A).requested(ip(60)));
        assert_eq!((r.kind, r.yiaddr), (ACK, ip(60)));
        let l = n.leases();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].id, l[0].ip), (2, ip(60)));
        assert_eq!(n.deleted(1), 1);
        assert_eq!(
            n.count(|e| matches!(e, Event::DhcpEntryCreated { id: 2, .. })),
            1
        );
        // .10 is free again for others.
        assert_eq!(n.one(&msg(REQUEST, B).requested(ip(10))).kind, ACK);
    }

    #[test]
    fn option_overload_is_read_from_file_and_sname() {
        let mut n = Net::new(config());
        let m = msg(DISCOVER, A).opt(opt::OVERLOAD, &[3]);
        let mut b = m.bootp(true);
        // Option 50 in `file`, option 12 in `sname`.
        b[108..114].copy_from_slice(&[opt::REQUESTED_IP, 4, 192, 168, 30, 99]);
        b[114] = opt::END;
        b[44..49].copy_from_slice(&[opt::HOST_NAME, 2, b'h', b'n', opt::END]);
        let r = n.frame(&m.frame_of(&b));
        assert_eq!(r[0].yiaddr, ip(99));
    }

    #[test]
    fn disabled_dhcp_does_not_answer() {
        let mut cfg = config();
        cfg.dhcp.enabled = false;
        let mut n = Net::new(cfg);
        n.silent(&msg(DISCOVER, A));
        assert_eq!(n.drops(DropReason::Disabled), 1);
    }

    // ---- options 26, 42, 119 ----

    impl Reply {
        /// Every instance of `code`, joined (RFC 3396).
        pub(super) fn joined(&self, code: u8) -> Option<Vec<u8>> {
            let parts: Vec<&Vec<u8>> = self
                .options
                .iter()
                .filter(|(c, _)| *c == code)
                .map(|(_, d)| d)
                .collect();
            (!parts.is_empty()).then(|| parts.into_iter().flatten().copied().collect())
        }
        fn search(&self) -> Option<Vec<String>> {
            self.joined(opt::DOMAIN_SEARCH)
                .map(|d| crate::wire::dhcp_options::decode_search_list(&d).unwrap())
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mtu_ntp_and_search_list_go_to_clients_that_ask() {
        let mut cfg = config();
        cfg.nat.mtu = 9000;
        cfg.dhcp.ntp = vec![ip(1), Ipv4Addr::new(10, 0, 0, 123)];
        cfg.dhcp.search = strings(&["a.test", "b.test"]);
        let mut n = Net::new(cfg);
        let all = [1, 3, 6, 15, 26, 42, 119];
        let r = n.one(&msg(DISCOVER, A).opt(opt::PARAMETER_LIST, &all));
        assert_eq!(r.opt(opt::INTERFACE_MTU), Some(&9000u16.to_be_bytes()[..]));
        assert_eq!(
            r.opt(opt::NTP_SERVERS),
            Some(&[192, 168, 30, 1, 10, 0, 0, 123][..])
        );
        assert_eq!(r.search(), Some(strings(&["a.test", "b.test"])));
        // Compressed: `b.test` points at `test` of `a.test`.
        assert_eq!(r.opt(opt::DOMAIN_SEARCH).unwrap().len(), 12);
        // The ACK carries them too, and so does the answer to an INFORM.
        let r = n.one(
            &msg(REQUEST, A)
                .server(HOST_IP)
                .requested(r.yiaddr)
                .opt(opt::PARAMETER_LIST, &all),
        );
        assert_eq!(r.kind, ACK);
        assert!(r.opt(opt::INTERFACE_MTU).is_some() && r.search().is_some());
        let r = n.one(&msg(INFORM, D).configured_at(ip(50)));
        assert!(r.opt(opt::NTP_SERVERS).is_some() && r.search().is_some());
        // A client that lists what it wants without them does not get them.
        let r = n.one(&msg(DISCOVER, B).opt(opt::PARAMETER_LIST, &[1, 3, 6, 15]));
        for o in [opt::INTERFACE_MTU, opt::NTP_SERVERS, opt::DOMAIN_SEARCH] {
            assert_eq!(r.opt(o), None, "option {o}");
        }
        let r = n.one(&msg(DISCOVER, C).opt(opt::PARAMETER_LIST, &[26]));
        assert!(r.opt(opt::INTERFACE_MTU).is_some());
        assert_eq!((r.opt(opt::NTP_SERVERS), r.search()), (None, None));
        // One that sends no list gets everything that is configured.
        let r = n.one(&msg(DISCOVER, D));
        assert!(r.opt(opt::INTERFACE_MTU).is_some() && r.opt(opt::NTP_SERVERS).is_some());
        assert!(r.search().is_some());
        // Nothing of it in a NAK.
        let r = n.one(&msg(REQUEST, B).requested(ip(250)));
        assert_eq!(r.kind, NAK);
        for o in [opt::INTERFACE_MTU, opt::NTP_SERVERS, opt::DOMAIN_SEARCH] {
            assert_eq!(r.opt(o), None, "option {o}");
        }
    }

    #[test]
    fn the_search_list_defaults_to_the_domain_and_the_mtu_is_sent_at_1500() {
        let mut n = Net::new(
            Config::from_raw(
                &crate::RawConfig::from_toml("[dhcp]\ndomain = \"example.test\"\n").unwrap(),
            )
            .unwrap(),
        );
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(r.search(), Some(strings(&["example.test"])));
        assert_eq!(r.opt(opt::INTERFACE_MTU), Some(&1500u16.to_be_bytes()[..]));
        assert_eq!(r.opt(opt::NTP_SERVERS), None, "no NTP server configured");
        // `search = []` leaves it out, the domain stays.
        let raw = "[dhcp]\ndomain = \"example.test\"\nsearch = []\n";
        let mut n = Net::new(Config::from_raw(&crate::RawConfig::from_toml(raw).unwrap()).unwrap());
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(r.search(), None);
        assert_eq!(r.opt(opt::DOMAIN_NAME), Some(&b"example.test"[..]));
    }

    #[test]
    fn a_long_search_list_is_split_or_left_out_whole_by_the_message_size() {
        let mut cfg = config();
        let list: Vec<String> = (0..8)
            .map(|i| format!("{}{i}.example.test", "s".repeat(40)))
            .collect();
        cfg.dhcp.search = list.clone();
        cfg.dhcp.routes = vec![StaticRoute {
            dest: Ipv4Addr::new(10, 1, 0, 0),
            prefix_len: 16,
            gateway: ip(254),
        }];
        let mut n = Net::new(cfg);
        // 8 × 43 + 14 bytes: more than a 576-byte reply has room for; the routes still go.
        let r = n.one(&msg(DISCOVER, A));
        assert_eq!(r.search(), None);
        assert!(r.opt(opt::CLASSLESS_ROUTES).is_some());
        assert!(r.len <= 576 - 28);
        let r = n.one(&msg(DISCOVER, B).opt(opt::MAX_MESSAGE_SIZE, &1500u16.to_be_bytes()));
        let parts = r
            .options
            .iter()
            .filter(|(c, _)| *c == opt::DOMAIN_SEARCH)
            .count();
        assert_eq!(parts, 2, "RFC 3396: cut into parts of 255 bytes at most");
        assert_eq!(r.search(), Some(list));
    }

    // ---- static reservations ----

    fn reserve(cfg: &mut Config, mac: Mac, at: Ipv4Addr, name: Option<&str>) {
        cfg.dhcp.reservations.push(Reservation {
            mac,
            ip: at,
            name: name.map(str::to_owned),
        });
    }

    #[test]
    fn a_reserved_mac_gets_its_address_and_no_other_mac_does() {
        let mut cfg = config();
        reserve(&mut cfg, A, ip(10), Some("vm1"));
        let mut n = Net::new(cfg);
        // The first free address of the range would be .10: B gets .11.
        assert_eq!(n.dora(B), ip(11));
        // A gets .10, whatever it asks for.
        let r = n.one(&msg(DISCOVER, A).requested(ip(77)));
        assert_eq!(r.yiaddr, ip(10));
        let r = n.one(&msg(REQUEST, A).server(HOST_IP).requested(ip(10)));
        assert_eq!((r.kind, r.yiaddr), (ACK, ip(10)));
        // Without a host name of its own, the lease has the reservation's.
        assert_eq!(n.engine.dhcp.lease_of(A).unwrap().host_name, "vm1");
        assert_eq!(n.engine.dhcp.reserved_for(ip(10)), Some(A));
        // A released reservation is still nobody else's.
        n.silent(&msg(RELEASE, A).configured_at(ip(10)).server(HOST_IP));
        assert_eq!(n.offer(C), ip(12));
        assert_eq!(n.one(&msg(DISCOVER, D).requested(ip(10))).yiaddr, ip(13));
        assert_eq!(n.one(&msg(REQUEST, D).requested(ip(10))).kind, NAK);
        assert_eq!(
            n.one(&msg(REQUEST, D).server(HOST_IP).requested(ip(10)))
                .kind,
            NAK
        );
        // A client's own host name wins over the reservation's.
        let r = n.one(
            &msg(REQUEST, A)
                .server(HOST_IP)
                .requested(ip(10))
                .host_name("own"),
        );
        assert_eq!(r.kind, ACK);
        assert_eq!(n.engine.dhcp.lease_of(A).unwrap().host_name, "own");
    }

    #[test]
    fn a_reservation_outside_the_range_is_given_and_kept() {
        let mut cfg = config();
        reserve(&mut cfg, A, ip(250), None);
        let mut n = Net::new(cfg);
        assert_eq!(n.dora(A), ip(250));
        assert_eq!(n.leases()[0].host_name, "");
        // Renewed, rebound and declined like any lease.
        let r = n.one(&msg(REQUEST, A).configured_at(ip(250)));
        assert_eq!((r.kind, r.yiaddr), (ACK, ip(250)));
        n.silent(&msg(DECLINE, A).requested(ip(250)).server(HOST_IP));
        assert!(n.leases().is_empty(), "A held it, so A may decline it");
        // While it is declined, A is served from the range.
        assert_eq!(n.offer(A), ip(10));
        // Others never get it, even asked by name.
        n.advance(DECLINE_HOLD);
        assert_eq!(n.one(&msg(REQUEST, B).requested(ip(250))).kind, NAK);
        assert_eq!(n.offer(A), ip(250));
    }

    #[test]
    fn a_reservation_made_at_run_time_moves_both_clients_at_their_renewal() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(B), ip(10));
        assert_eq!(n.dora(A), ip(11));
        // The operator reserves B's address for A.
        let mut cfg = n.engine.dhcp.config().clone();
        cfg.reservations.push(Reservation {
            mac: A,
            ip: ip(10),
            name: None,
        });
        n.engine.dhcp.reconfigure(&cfg, &mut n.engine.ctx.events);
        n.drain();
        assert_eq!(n.leases().len(), 2, "B keeps its lease until it renews");
        // A renews .11 while .10 is still B's: it keeps .11.
        let r = n.one(&msg(REQUEST, A).configured_at(ip(11)));
        assert_eq!((r.kind, r.yiaddr), (ACK, ip(11)));
        // B renews: refused, and its lease ends.
        let r = n.one(&msg(REQUEST, B).configured_at(ip(10)));
        assert_eq!(r.kind, NAK);
        assert_eq!(n.deleted(1), 1);
        assert!(n.engine.dhcp.lease_of(B).is_none());
        // B starts again elsewhere.
        let b = n.dora(B);
        assert!(b != ip(10) && b != ip(11));
        // A renews .11 now that .10 is free: refused too, so that it moves.
        let r = n.one(&msg(REQUEST, A).configured_at(ip(11)));
        assert_eq!(r.kind, NAK);
        assert_eq!(n.dora(A), ip(10));
        assert_eq!(n.leases().len(), 2);
    }

    #[test]
    fn a_full_pool_never_takes_back_a_reserved_address() {
        let mut cfg = config();
        cfg.dhcp.range_start = ip(10);
        cfg.dhcp.range_end = ip(11);
        reserve(&mut cfg, A, ip(11), None);
        let mut n = Net::new(cfg);
        assert_eq!(n.dora(B), ip(10));
        n.silent(&msg(DISCOVER, C));
        assert_eq!(n.dora(A), ip(11));
        n.advance(Duration::from_secs(11));
        // Neither A nor B has been heard of since: only B's address is probed and taken back.
        n.silent(&msg(DISCOVER, D));
        assert_eq!(n.probes, 1);
        n.advance(Duration::from_secs(2));
        assert_eq!(n.offer(D), ip(10));
        assert!(n.leases().iter().any(|l| l.mac == A && l.ip == ip(11)));
    }

    #[test]
    fn forwards_find_a_reserved_guest_by_its_name_and_mac() {
        use crate::forward::GuestRef;
        let mut cfg = config();
        reserve(&mut cfg, A, ip(250), Some("vm1"));
        let mut n = Net::new(cfg);
        // Before it has a lease: its reserved address.
        let e = &n.engine;
        assert_eq!(
            e.find_guest(&GuestRef::Name("vm1".into())),
            Some((ip(250), A))
        );
        assert_eq!(e.find_guest(&GuestRef::Mac(A)), Some((ip(250), A)));
        // Another guest calling itself vm1 does not take the name.
        let o = n.offer(B);
        n.one(
            &msg(REQUEST, B)
                .server(HOST_IP)
                .requested(o)
                .host_name("vm1"),
        );
        assert_eq!(n.dora(A), ip(250));
        let e = &n.engine;
        assert_eq!(
            e.find_guest(&GuestRef::Name("VM1".into())),
            Some((ip(250), A))
        );
        assert_eq!(e.find_guest(&GuestRef::Mac(B)), Some((o, B)));
    }

    // ---- malformed input ----

    #[test]
    fn malformed_messages_are_dropped_and_counted() {
        let mut n = Net::new(config());
        let good = msg(DISCOVER, A);
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        // Shorter than the fixed BOOTP header.
        cases.push(("truncated", good.frame_of(&good.bootp(true)[..200])));
        cases.push(("no cookie room", good.frame_of(&good.bootp(true)[..238])));
        let mut m = good.clone();
        m.op = 2;
        cases.push(("BOOTREPLY", m.frame()));
        let mut m = good.clone();
        m.cookie = 0x6382_5364;
        cases.push(("bad cookie", m.frame()));
        let mut m = good.clone();
        m.htype = 6;
        cases.push(("htype", m.frame()));
        let mut m = good.clone();
        m.hlen = 16;
        cases.push(("hlen", m.frame()));
        let mut m = good.clone();
        m.options.clear();
        cases.push(("no message type", m.frame()));
        let mut m = good.clone().host_name("x");
        m.options.truncate(m.options.len() - 1);
        m.options.extend_from_slice(&[opt::HOST_NAME, 9, b'a']);
        cases.push(("option past end", m.frame_of(&m.bootp(false))));
        let mut m = good.clone();
        m.options.push(opt::HOST_NAME);
        cases.push(("option without length", m.frame_of(&m.bootp(false))));
        cases.push((
            "option 50 of 3 bytes",
            good.clone().opt(opt::REQUESTED_IP, &[1, 2, 3]).frame(),
        ));
        cases.push((
            "option 53 of 2 bytes",
            msg(DISCOVER, A).opt(opt::MESSAGE_TYPE, &[1, 1]).frame(),
        ));
        cases.push((
            "option 57 of 1 byte",
            good.clone().opt(opt::MAX_MESSAGE_SIZE, &[5]).frame(),
        ));
        cases.push(("overload 4", good.clone().opt(opt::OVERLOAD, &[4]).frame()));
        let mut m = good.clone();
        m.chaddr = Mac([1, 0, 0x5e, 0, 0, 1]);
        cases.push(("multicast chaddr", m.frame()));
        cases.push((
            "request without address",
            msg(REQUEST, A).server(HOST_IP).frame(),
        ));
        cases.push(("renewal without ciaddr", msg(REQUEST, A).frame()));
        let total = cases.len() as u64;
        for (name, f) in &cases {
            let before = n.drops(DropReason::Malformed);
            assert!(n.frame(f).is_empty(), "{name}: answered");
            assert_eq!(
                n.drops(DropReason::Malformed),
                before + 1,
                "{name}: not counted as malformed"
            );
        }
        assert_eq!(n.drops(DropReason::Malformed), total);
        assert!(n.leases().is_empty());
        assert!(n.engine.dhcp.pool.no_offers());

        // A UDP length that cuts the message short (checksum left out, so that it is the DHCP
        // parser that refuses it).
        let mut f = good.frame();
        let udp = ETHERNET_HEADER_LEN + 20;
        f[udp + 4..udp + 6].copy_from_slice(&(8u16 + 100).to_be_bytes());
        f[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
        assert!(n.frame(&f).is_empty());
        assert_eq!(n.drops(DropReason::Malformed), total + 1);
        // A UDP length past the datagram: the engine does not take it for DHCP at all.
        let dropped: u64 = n.engine.stats().drops.iter().sum();
        let mut f = good.frame();
        f[udp + 4..udp + 6].copy_from_slice(&2000u16.to_be_bytes());
        assert!(n.frame(&f).is_empty());
        assert_eq!(n.engine.stats().drops.iter().sum::<u64>(), dropped + 1);

        // A wrong UDP checksum (but a zero one is accepted).
        let mut f = good.frame();
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(n.frame(&f).is_empty());
        assert_eq!(n.drops(DropReason::BadChecksum), 1);
        let mut f = good.frame();
        let ck = ETHERNET_HEADER_LEN + 20 + 6;
        f[ck..ck + 2].copy_from_slice(&[0, 0]);
        assert_eq!(n.frame(&f).len(), 1);

        // Valid, but not for us: server message types, unknown types, relayed messages.
        for kind in [OFFER, ACK, NAK, 9, 200] {
            n.silent(&msg(kind, A));
        }
        let mut m = good.clone();
        m.giaddr = Ipv4Addr::new(10, 0, 0, 1);
        n.silent(&m);
        assert_eq!(n.drops(DropReason::Unsupported), 6);
        // A message without END but otherwise whole is accepted.
        let r = n.frame(&good.frame_of(&good.bootp(false)));
        assert_eq!(r.len(), 1);
    }
}
