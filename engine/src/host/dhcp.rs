//! The virtual DHCP server (seed 3.7.5, 3.7.6; RFC 2131, RFC 2132, RFC 3442).
//!
//! One server for one segment, with no relays: DISCOVER → OFFER, REQUEST → ACK/NAK (selecting,
//! init-reboot, renewing and rebinding), RELEASE, DECLINE and INFORM. The lease table is keyed by
//! the client's hardware address (`chaddr`), one lease per client, and bounded by the size of the
//! range (every lease holds a distinct address of it).
//!
//! Address choice, in order: the client's current lease; the address just offered to it; the
//! address it asks for (option 50) when free; the address it had last time (remembered after the
//! lease ended, as long as nobody else took it); else the first free address of the range, taking
//! addresses that some other client may come back for only when nothing else is left. An offer
//! holds its address for [`OFFER_HOLD`] so that two DISCOVERs never get the same one; a DECLINEd
//! address is kept out of use for [`DECLINE_HOLD`]. When nothing is free the server stays silent.
//!
//! The message view is `smoltcp::wire::DhcpPacket`; the options are walked with [`OptionIter`]
//! (strict where smoltcp's iterator silently stops at a truncated option) and written here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::wire::{
    ArpHardware, DhcpFlags, DhcpMessageType, DhcpOpCode, DhcpPacket, Ipv4Packet, UdpPacket,
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
};

use crate::config::{DhcpConfig, Mac};
use crate::control::log;
use crate::output::FrameBatch;
use crate::stats::Drop;
use crate::time::{earliest, Instant};
use crate::wire::eth;
use crate::Ctx;

/// How long an OFFER holds its address for the client it was made to.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long an address a client DECLINEd (it found it in use) is kept out of the pool.
pub const DECLINE_HOLD: Duration = Duration::from_secs(600);
/// Bound on remembered client → address pairs (they are also bounded by the range size: each
/// remembered address belongs to one client only).
pub const MAX_REMEMBERED: usize = 65536;
/// Host names (option 12) are kept to this many characters.
pub const MAX_HOST_NAME: usize = 64;
/// At most one "pool exhausted" log line per this interval (a flood of DISCOVERs must not flood
/// the log); every silenced DISCOVER is still counted as a `limit` drop.
pub const EXHAUSTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The smallest BOOTP message (RFC 1542 2.1): replies are padded to it.
pub const MIN_BOOTP_LEN: usize = 300;
/// The largest message every client accepts (RFC 2131 2: 576-byte IP datagrams).
const MIN_MAX_MESSAGE: usize = 576;
const IP_UDP_HEADERS: usize = 28;
const OPTIONS_OFFSET: usize = 240;
const MAGIC_COOKIE: u32 = 0x6382_5363;
const OP_BOOTREQUEST: u8 = 1;
/// `sname` and `file` of a BOOTP message (smoltcp keeps its field table private, and its
/// `sname` range starts inside `chaddr`).
const SNAME_FIELD: std::ops::Range<usize> = 44..108;
const FILE_FIELD: std::ops::Range<usize> = 108..236;

/// Option codes (RFC 2132, RFC 3442).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS_SERVERS: u8 = 6;
    pub const HOST_NAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLASSLESS_ROUTES: u8 = 121;
    /// Microsoft's pre-standard copy of option 121, sent only to clients that ask for it.
    pub const MS_CLASSLESS_ROUTES: u8 = 249;
    pub const END: u8 = 255;
}

/// One entry of the lease table (what `DhcpTable` shows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Increasing from 1: the number in the seed's "The DHCP entry N was created" line.
    pub id: u32,
    /// When the entry was created (a renewal does not change it).
    pub leased_at: Instant,
    pub expires_at: Instant,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// Option 12 of the client, printable ASCII only; empty when the client sent none.
    pub host_name: String,
}

/// A strict walk over a DHCP options area: pads are skipped, END stops it; an option whose
/// length runs past the area is an error. An area that ends without END is accepted.
pub struct OptionIter<'a> {
    buf: &'a [u8],
}

impl<'a> OptionIter<'a> {
    pub fn new(area: &'a [u8]) -> OptionIter<'a> {
        OptionIter { buf: area }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<(u8, &'a [u8]), Drop>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (&code, rest) = self.buf.split_first()?;
            match code {
                opt::PAD => self.buf = rest,
                opt::END => {
                    self.buf = &[];
                    return None;
                }
                _ => {
                    let Some((&len, rest)) = rest.split_first() else {
                        self.buf = &[];
                        return Some(Err(Drop::Malformed));
                    };
                    if rest.len() < len as usize {
                        self.buf = &[];
                        return Some(Err(Drop::Malformed));
                    }
                    let (data, rest) = rest.split_at(len as usize);
                    self.buf = rest;
                    return Some(Ok((code, data)));
                }
            }
        }
    }
}

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
    params: &'a [u8],
    max_message: Option<u16>,
}

fn ipv4_option(data: &[u8]) -> Result<Ipv4Addr, Drop> {
    let b: [u8; 4] = data.try_into().map_err(|_| Drop::Malformed)?;
    Ok(Ipv4Addr::from(b))
}

impl<'a> ClientMessage<'a> {
    fn parse(bytes: &'a [u8]) -> Result<ClientMessage<'a>, Drop> {
        let p = DhcpPacket::new_checked(bytes).map_err(|_| Drop::Malformed)?;
        if p.opcode() != DhcpOpCode::Request || bytes[0] != OP_BOOTREQUEST {
            return Err(Drop::Malformed);
        }
        if p.hardware_type() != ArpHardware::Ethernet || p.hardware_len() != 6 {
            return Err(Drop::Malformed);
        }
        if p.magic_number() != MAGIC_COOKIE {
            return Err(Drop::Malformed);
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
            params: &[],
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
        m.kind = kind.ok_or(Drop::Malformed)?;
        Ok(m)
    }

    /// Reads one options area; returns the option-overload value when `main`.
    fn read_options(
        &mut self,
        area: &'a [u8],
        kind: &mut Option<DhcpMessageType>,
        main: bool,
    ) -> Result<u8, Drop> {
        let mut overload = 0;
        for o in OptionIter::new(area) {
            let (code, data) = o?;
            match code {
                opt::MESSAGE_TYPE => {
                    let &[t] = data else {
                        return Err(Drop::Malformed);
                    };
                    *kind = Some(DhcpMessageType::from(t));
                }
                opt::REQUESTED_IP => self.requested_ip = Some(ipv4_option(data)?),
                opt::SERVER_ID => self.server_id = Some(ipv4_option(data)?),
                opt::HOST_NAME => self.host_name = data,
                opt::PARAMETER_LIST => self.params = data,
                opt::MAX_MESSAGE_SIZE => {
                    let b: [u8; 2] = data.try_into().map_err(|_| Drop::Malformed)?;
                    self.max_message = Some(u16::from_be_bytes(b));
                }
                opt::OVERLOAD if main => {
                    let &[v @ 1..=3] = data else {
                        return Err(Drop::Malformed);
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
pub fn sanitize_host_name(raw: &[u8]) -> String {
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

/// RFC 3442 option 121 payload for `routes` (plus the default route through `gateway`).
pub fn encode_classless_routes(
    routes: &[crate::config::StaticRoute],
    gateway: Option<Ipv4Addr>,
    into: &mut Vec<u8>,
) {
    for r in routes {
        let width = r.prefix_len.min(32);
        let significant = width.div_ceil(8) as usize;
        into.push(width);
        into.extend_from_slice(&r.dest.octets()[..significant]);
        into.extend_from_slice(&r.gateway.octets());
    }
    if let Some(gw) = gateway {
        into.push(0);
        into.extend_from_slice(&gw.octets());
    }
}

#[derive(Clone, Copy, Debug)]
struct Offer {
    mac: Mac,
    until: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    ip: Ipv4Addr,
    at: Instant,
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

pub struct DhcpServer {
    cfg: DhcpConfig,
    /// By id, so that listing is in creation order.
    leases: BTreeMap<u32, Lease>,
    by_ip: HashMap<Ipv4Addr, u32>,
    by_mac: HashMap<Mac, u32>,
    expiry: BTreeSet<(Instant, u32)>,
    next_id: u32,
    offers: HashMap<Ipv4Addr, Offer>,
    offer_of: HashMap<Mac, Ipv4Addr>,
    declined: HashMap<Ipv4Addr, Instant>,
    memory: HashMap<Mac, Remembered>,
    remembered_by: HashMap<Ipv4Addr, Mac>,
    /// When expired offers and declines are next swept.
    sweep_at: Option<Instant>,
    last_exhausted_log: Option<Instant>,
    /// The reply being built (kept, so building allocates nothing once warm).
    scratch: Vec<u8>,
    routes_buf: Vec<u8>,
}

impl DhcpServer {
    pub fn new(cfg: &DhcpConfig) -> DhcpServer {
        DhcpServer {
            cfg: cfg.clone(),
            leases: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_mac: HashMap::new(),
            expiry: BTreeSet::new(),
            next_id: 1,
            offers: HashMap::new(),
            offer_of: HashMap::new(),
            declined: HashMap::new(),
            memory: HashMap::new(),
            remembered_by: HashMap::new(),
            sweep_at: None,
            last_exhausted_log: None,
            scratch: Vec::with_capacity(MIN_MAX_MESSAGE),
            routes_buf: Vec::new(),
        }
    }

    /// The lease table, in order of creation.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn lease_of(&self, mac: Mac) -> Option<&Lease> {
        self.by_mac.get(&mac).and_then(|id| self.leases.get(id))
    }

    pub fn config(&self) -> &DhcpConfig {
        &self.cfg
    }

    /// Loads a saved lease table. Entries that are expired, outside the range, or that repeat an
    /// id, address or MAC already in the table are skipped. Returns how many were kept.
    pub fn restore(&mut self, now: Instant, leases: Vec<Lease>) -> usize {
        let mut kept = 0;
        for l in leases {
            let fresh = l.expires_at > now
                && l.id != 0
                && !self.leases.contains_key(&l.id)
                && !self.by_mac.contains_key(&l.mac)
                && l.mac.0[0] & 1 == 0
                && self.free_for(l.mac, l.ip, now, Ipv4Addr::UNSPECIFIED);
            if !fresh {
                tracing::debug!(id = l.id, ip = %l.ip, mac = %l.mac, "saved DHCP lease skipped");
                continue;
            }
            self.next_id = self.next_id.max(l.id.wrapping_add(1).max(1));
            self.remember(l.mac, l.ip, now);
            self.insert_lease(l);
            kept += 1;
        }
        kept
    }

    /// Applies a new DHCP configuration: leases, offers, declines and remembered addresses that
    /// are no longer in the range (or now collide with the gateway or a DNS server) are dropped.
    pub fn reconfigure(&mut self, cfg: &DhcpConfig) {
        self.cfg = cfg.clone();
        let gone: Vec<u32> = self
            .leases
            .values()
            .filter(|l| !self.assignable(l.ip, Ipv4Addr::UNSPECIFIED))
            .map(|l| l.id)
            .collect();
        for id in gone {
            self.remove_lease(id);
        }
        let cfg = &self.cfg;
        let keep = |ip: &Ipv4Addr| Self::cfg_assignable_in(cfg, *ip, Ipv4Addr::UNSPECIFIED);
        let stale_offers: Vec<Ipv4Addr> =
            self.offers.keys().filter(|ip| !keep(ip)).copied().collect();
        let stale_memory: Vec<Ipv4Addr> = self
            .remembered_by
            .keys()
            .filter(|ip| !keep(ip))
            .copied()
            .collect();
        self.declined.retain(|ip, _| keep(ip));
        for ip in stale_offers {
            self.cancel_offer_ip(ip);
        }
        for ip in stale_memory {
            if let Some(mac) = self.remembered_by.remove(&ip) {
                self.memory.remove(&mac);
            }
        }
    }

    /// Handles a datagram to UDP port 67 (`ip` is its whole IPv4 packet, not fragmented).
    pub fn handle(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        ip: &Ipv4Packet<&[u8]>,
        out: &mut FrameBatch,
    ) -> Result<(), Drop> {
        let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| Drop::Malformed)?;
        if udp.checksum() != 0 && !udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
        {
            return Err(Drop::BadChecksum);
        }
        let msg = ClientMessage::parse(udp.payload())?;
        if msg.chaddr.0[0] & 1 != 0 || msg.chaddr == Mac::default() {
            return Err(Drop::Malformed);
        }
        if msg.chaddr != src_mac {
            tracing::debug!(chaddr = %msg.chaddr, src = %src_mac, "DHCP chaddr differs from the Ethernet source");
        }
        if !msg.giaddr.is_unspecified() {
            // One segment, no relays: a relayed message is not for this server.
            return Err(Drop::Unsupported);
        }
        self.expire(now);
        match msg.kind {
            DhcpMessageType::Discover => self.discover(now, ctx, src_mac, &msg, out),
            DhcpMessageType::Request => self.request(now, ctx, src_mac, &msg, out),
            DhcpMessageType::Decline => self.decline(now, ctx, &msg),
            DhcpMessageType::Release => self.release(ctx, &msg),
            DhcpMessageType::Inform => self.inform(now, ctx, src_mac, &msg, out),
            _ => Err(Drop::Unsupported),
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest(self.expiry.first().map(|&(t, _)| t), self.sweep_at)
    }

    pub fn handle_timeout(&mut self, now: Instant, _ctx: &mut Ctx) {
        self.expire(now);
        if self.sweep_at.is_some_and(|t| t <= now) {
            self.offers.retain(|_, o| o.until > now);
            let offers = &self.offers;
            self.offer_of.retain(|_, ip| offers.contains_key(ip));
            self.declined.retain(|_, &mut t| t > now);
            self.sweep_at = self
                .offers
                .values()
                .map(|o| o.until)
                .chain(self.declined.values().copied())
                .min();
        }
    }

    fn discover(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        out: &mut FrameBatch,
    ) -> Result<(), Drop> {
        let mac = msg.chaddr;
        let Some(ip) = self.choose(now, ctx, mac, msg.requested_ip) else {
            if self
                .last_exhausted_log
                .map_or(true, |t| now.saturating_since(t) >= EXHAUSTED_LOG_INTERVAL)
            {
                log::dhcp_pool_exhausted(mac);
                self.last_exhausted_log = Some(now);
            }
            return Err(Drop::Limit);
        };
        if self.by_ip.get(&ip).is_none() {
            self.reserve(now, mac, ip);
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
    ) -> Result<(), Drop> {
        let host_ip = ctx.cfg.host.ip;
        let ciaddr = (!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr);
        let ip = match (msg.server_id, msg.requested_ip) {
            // SELECTING, and the client chose another server: our offer is void.
            (Some(sid), _) if sid != host_ip => {
                self.cancel_offer_mac(msg.chaddr);
                return Err(Drop::Foreign);
            }
            // SELECTING (option 50 is a MUST there; tolerate a client that put it in ciaddr).
            (Some(_), Some(ip)) => ip,
            (Some(_), None) => ciaddr.ok_or(Drop::Malformed)?,
            // INIT-REBOOT.
            (None, Some(ip)) => ip,
            // RENEWING (unicast) or REBINDING (broadcast).
            (None, None) => ciaddr.ok_or(Drop::Malformed)?,
        };
        let spec = if self.free_for(msg.chaddr, ip, now, host_ip) {
            let name = sanitize_host_name(msg.host_name);
            self.commit(now, msg.chaddr, ip, name);
            ReplySpec {
                kind: DhcpMessageType::Ack,
                ciaddr: msg.ciaddr,
                yiaddr: ip,
                lease: true,
                config: true,
            }
        } else {
            tracing::debug!(client = %msg.chaddr, %ip, "DHCP REQUEST refused (NAK)");
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

    fn decline(&mut self, now: Instant, ctx: &mut Ctx, msg: &ClientMessage) -> Result<(), Drop> {
        if msg.server_id.is_some_and(|s| s != ctx.cfg.host.ip) {
            return Err(Drop::Foreign);
        }
        let ip = msg.requested_ip.ok_or(Drop::Malformed)?;
        if !self.in_range(ip) {
            return Ok(());
        }
        tracing::warn!(client = %msg.chaddr, %ip, "DHCP client declined an address: it is in use on the segment");
        if let Some(&id) = self.by_mac.get(&msg.chaddr) {
            if self.leases[&id].ip == ip {
                self.remove_lease(id);
            }
        }
        self.cancel_offer_ip(ip);
        if let Some(m) = self.remembered_by.remove(&ip) {
            self.memory.remove(&m);
        }
        let until = now + DECLINE_HOLD;
        self.declined.insert(ip, until);
        self.schedule_sweep(until);
        Ok(())
    }

    fn release(&mut self, ctx: &Ctx, msg: &ClientMessage) -> Result<(), Drop> {
        if msg.server_id.is_some_and(|s| s != ctx.cfg.host.ip) {
            return Err(Drop::Foreign);
        }
        if let Some(&id) = self.by_mac.get(&msg.chaddr) {
            if self.leases[&id].ip == msg.ciaddr {
                self.remove_lease(id);
            }
        }
        Ok(())
    }

    fn inform(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        out: &mut FrameBatch,
    ) -> Result<(), Drop> {
        if msg.ciaddr.is_unspecified() {
            return Err(Drop::Malformed);
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

    // ---- the address pool ----

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.cfg.range_start)..=u32::from(self.cfg.range_end)).contains(&u32::from(ip))
    }

    fn cfg_assignable_in(cfg: &DhcpConfig, ip: Ipv4Addr, host_ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        let mask = u32::from(cfg.mask);
        let net = u32::from(cfg.range_start) & mask;
        (u32::from(cfg.range_start)..=u32::from(cfg.range_end)).contains(&n)
            && n & mask == net
            && (mask == u32::MAX || (n != net && n != net | !mask))
            && ip != host_ip
            && Some(ip) != cfg.gateway
            && !cfg.dns.contains(&ip)
    }

    fn cfg_assignable(&self, ip: Ipv4Addr, host_ip: Ipv4Addr) -> bool {
        Self::cfg_assignable_in(&self.cfg, ip, host_ip)
    }

    /// An address of the range that the server may hand out at all.
    fn assignable(&self, ip: Ipv4Addr, host_ip: Ipv4Addr) -> bool {
        self.cfg_assignable(ip, host_ip)
    }

    /// Whether `ip` may be given to `mac` now: ours to give, and not leased or offered to
    /// another client, nor declined.
    fn free_for(&self, mac: Mac, ip: Ipv4Addr, now: Instant, host_ip: Ipv4Addr) -> bool {
        self.assignable(ip, host_ip)
            && self
                .by_ip
                .get(&ip)
                .map_or(true, |id| self.leases[id].mac == mac)
            && self
                .offers
                .get(&ip)
                .map_or(true, |o| o.mac == mac || o.until <= now)
            && self.declined.get(&ip).map_or(true, |&t| t <= now)
    }

    fn choose(
        &self,
        now: Instant,
        ctx: &Ctx,
        mac: Mac,
        requested: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let host_ip = ctx.cfg.host.ip;
        let free = |ip: Ipv4Addr| self.free_for(mac, ip, now, host_ip);
        if let Some(l) = self.lease_of(mac) {
            if free(l.ip) {
                return Some(l.ip);
            }
        }
        if let Some(&ip) = self.offer_of.get(&mac) {
            if free(ip) {
                return Some(ip);
            }
        }
        if let Some(ip) = requested.filter(|&ip| free(ip)) {
            return Some(ip);
        }
        if let Some(r) = self.memory.get(&mac) {
            if free(r.ip) {
                return Some(r.ip);
            }
        }
        // A fresh address: skip any the ARP cache shows in use by another host; prefer ones no
        // other client may come back for.
        let mut fallback = None;
        for n in u32::from(self.cfg.range_start)..=u32::from(self.cfg.range_end) {
            let ip = Ipv4Addr::from(n);
            if !free(ip) || ctx.arp.lookup(ip).is_some_and(|m| m != mac) {
                continue;
            }
            match self.remembered_by.get(&ip) {
                Some(&m) if m != mac => {
                    fallback.get_or_insert(ip);
                }
                _ => return Some(ip),
            }
        }
        fallback
    }

    fn schedule_sweep(&mut self, at: Instant) {
        self.sweep_at = Some(self.sweep_at.map_or(at, |t| t.min(at)));
    }

    fn reserve(&mut self, now: Instant, mac: Mac, ip: Ipv4Addr) {
        if self.offer_of.get(&mac).is_some_and(|&old| old != ip) {
            self.cancel_offer_mac(mac);
        }
        let until = now + OFFER_HOLD;
        if let Some(prev) = self.offers.insert(ip, Offer { mac, until }) {
            if prev.mac != mac && self.offer_of.get(&prev.mac) == Some(&ip) {
                self.offer_of.remove(&prev.mac);
            }
        }
        self.offer_of.insert(mac, ip);
        self.schedule_sweep(until);
    }

    fn cancel_offer_mac(&mut self, mac: Mac) {
        if let Some(ip) = self.offer_of.remove(&mac) {
            if self.offers.get(&ip).is_some_and(|o| o.mac == mac) {
                self.offers.remove(&ip);
            }
        }
    }

    fn cancel_offer_ip(&mut self, ip: Ipv4Addr) {
        if let Some(o) = self.offers.remove(&ip) {
            if self.offer_of.get(&o.mac) == Some(&ip) {
                self.offer_of.remove(&o.mac);
            }
        }
    }

    fn remember(&mut self, mac: Mac, ip: Ipv4Addr, now: Instant) {
        if let Some(old_mac) = self.remembered_by.insert(ip, mac) {
            if old_mac != mac {
                self.memory.remove(&old_mac);
            }
        }
        if let Some(prev) = self.memory.insert(mac, Remembered { ip, at: now }) {
            if prev.ip != ip && self.remembered_by.get(&prev.ip) == Some(&mac) {
                self.remembered_by.remove(&prev.ip);
            }
        }
        if self.memory.len() > MAX_REMEMBERED {
            let oldest = self
                .memory
                .iter()
                .filter(|(m, _)| **m != mac)
                .min_by_key(|(_, r)| r.at)
                .map(|(m, r)| (*m, r.ip));
            if let Some((m, ip)) = oldest {
                self.memory.remove(&m);
                self.remembered_by.remove(&ip);
            }
        }
    }

    /// ACKs `ip` to `mac`: renews its lease, or creates one (moving the client off another).
    fn commit(&mut self, now: Instant, mac: Mac, ip: Ipv4Addr, host_name: String) {
        self.cancel_offer_mac(mac);
        self.cancel_offer_ip(ip);
        let expires_at = now + self.cfg.lease;
        if let Some(&id) = self.by_mac.get(&mac) {
            let l = self.leases.get_mut(&id).expect("by_mac points at a lease");
            if l.ip == ip {
                self.expiry.remove(&(l.expires_at, id));
                l.expires_at = expires_at;
                if !host_name.is_empty() {
                    l.host_name = host_name;
                }
                self.expiry.insert((expires_at, id));
                self.remember(mac, ip, now);
                return;
            }
            self.remove_lease(id);
        }
        let mut id = self.next_id;
        while self.leases.contains_key(&id) || id == 0 {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1).max(1);
        log::dhcp_entry_created(id, mac, ip, &host_name, self.cfg.lease);
        self.insert_lease(Lease {
            id,
            leased_at: now,
            expires_at,
            mac,
            ip,
            host_name,
        });
        self.remember(mac, ip, now);
    }

    fn insert_lease(&mut self, l: Lease) {
        self.by_ip.insert(l.ip, l.id);
        self.by_mac.insert(l.mac, l.id);
        self.expiry.insert((l.expires_at, l.id));
        self.leases.insert(l.id, l);
    }

    fn remove_lease(&mut self, id: u32) {
        if let Some(l) = self.leases.remove(&id) {
            self.by_ip.remove(&l.ip);
            self.by_mac.remove(&l.mac);
            self.expiry.remove(&(l.expires_at, id));
            log::dhcp_entry_deleted(id, l.mac, l.ip);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.expiry.first() {
            if t > now {
                break;
            }
            self.remove_lease(id);
        }
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
            let secs = self.cfg.lease.as_secs().min(u64::from(u32::MAX - 1)) as u32;
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
            w.put(opt::SUBNET_MASK, &self.cfg.mask.octets());
            if let Some(gw) = self.cfg.gateway {
                w.put(opt::ROUTER, &gw.octets());
            }
            if !self.cfg.dns.is_empty() {
                let mut dns = [0u8; 8];
                let n = self.cfg.dns.len().min(2);
                for (i, s) in self.cfg.dns.iter().take(2).enumerate() {
                    dns[i * 4..i * 4 + 4].copy_from_slice(&s.octets());
                }
                w.put(opt::DNS_SERVERS, &dns[..n * 4]);
            }
            if let Some(d) = &self.cfg.domain {
                let d = d.as_bytes();
                w.put(opt::DOMAIN_NAME, &d[..d.len().min(255)]);
            }
            if !self.cfg.routes.is_empty() {
                self.routes_buf.clear();
                encode_classless_routes(&self.cfg.routes, self.cfg.gateway, &mut self.routes_buf);
                w.put_long(opt::CLASSLESS_ROUTES, &self.routes_buf);
                if msg.params.contains(&opt::MS_CLASSLESS_ROUTES) {
                    w.put_long(opt::MS_CLASSLESS_ROUTES, &self.routes_buf);
                }
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

/// Appends options to a reply, leaving room for END within `limit` bytes of message.
struct OptionWriter<'a> {
    buf: &'a mut Vec<u8>,
    limit: usize,
}

impl OptionWriter<'_> {
    fn fits(&self, n: usize) -> bool {
        self.buf.len() + n < self.limit
    }

    fn put(&mut self, code: u8, data: &[u8]) {
        debug_assert!(data.len() <= 255);
        if !self.fits(2 + data.len()) {
            tracing::debug!(
                code,
                "DHCP option left out: the client's message size is reached"
            );
            return;
        }
        self.buf.push(code);
        self.buf.push(data.len() as u8);
        self.buf.extend_from_slice(data);
    }

    /// An option longer than 255 bytes, split into consecutive instances (RFC 3396).
    fn put_long(&mut self, code: u8, data: &[u8]) {
        let chunks = data.len().div_ceil(255).max(1);
        if !self.fits(2 * chunks + data.len()) {
            tracing::debug!(
                code,
                "DHCP option left out: the client's message size is reached"
            );
            return;
        }
        for c in data.chunks(255) {
            self.put(code, c);
        }
    }
}
