//! The virtual DHCPv6 server (RFC 8415; RFC 3646 for DNS), one server for one link, no relays.
//!
//! Stateless (`ipv6.dhcpv6 = "stateless"`, and in stateful mode too): Information-request →
//! Reply with the DNS servers (option 23), the search list (option 24) and the Information
//! Refresh Time. Solicit is answered with an Advertise that offers no address (NoAddrsAvail),
//! so a client that asked for one falls back to Information-request; the other address
//! messages get NoAddrsAvail or NoBinding in each IA.
//!
//! Stateful: IA_NA leases from `ipv6.range_start..=range_end` (`table`), keyed by (DUID,
//! IAID, MAC). Solicit → Advertise (nothing held: the address
//! offered is the one a Request will most likely get), or Reply when the client asked for
//! Rapid Commit; Request → Reply (the lease made); Renew and Rebind extend; Release ends;
//! Decline ends and sets the address aside; Confirm says whether the addresses are on link.
//! Lifetimes are `dhcp.lease`, T1 half of it, T2 0.8.
//!
//! A lease answers only to the MAC that made it (the frame's Ethernet source, as the IPv4
//! server holds a client to its `chaddr`): a guest that copies another's DUID is another
//! client, and can neither renew, release nor take over that one's address; a guest whose MAC
//! changed (a TAP made again) gets a new lease, and its old one expires.
//!
//! The server's DUID is a DUID-LL (type 3) of the virtual host's MAC: stable as long as the
//! MAC is, which the daemon keeps across restarts.

use std::net::Ipv6Addr;
use std::time::Duration;

use smoltcp::wire::{IpProtocol, UdpPacket};

use crate::config::{Dhcpv6Mode, Ipv6Config, Mac};
use crate::event::{Event, Events};
use crate::output::FrameBatch;
use crate::stats::DropReason;
use crate::time::Instant;
use crate::wire::{link_local, push_ipv6, upper_checksum6, verify_upper6, Ipv6Header, Ipv6View};
use crate::Ctx;

mod message;
mod table;

use self::message::{kind, opt, status, ClientMessage, Writer};
pub use self::table::Lease6;
use self::table::Table;

/// The DHCPv6 client's port.
pub const CLIENT_PORT: u16 = 546;
/// The DHCPv6 server's port.
pub const SERVER_PORT: u16 = 547;
/// All_DHCP_Relay_Agents_and_Servers (RFC 8415 7.1).
pub const ALL_DHCP_AGENTS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
/// The least Information Refresh Time (RFC 8415 21.23, IRT_MINIMUM).
const IRT_MINIMUM: u64 = 600;
/// A lifetime of all ones means infinity (RFC 8415 7.7); a finite one stays below.
const MAX_FINITE: u64 = u32::MAX as u64 - 1;

/// One IA_NA of a reply.
#[derive(Clone, Debug)]
struct IaOut {
    iaid: u32,
    t1: u32,
    t2: u32,
    /// (address, preferred, valid), in seconds.
    addrs: Vec<(Ipv6Addr, u32, u32)>,
    status: Option<(u16, &'static str)>,
}

impl IaOut {
    fn status(iaid: u32, code: u16, text: &'static str) -> IaOut {
        IaOut {
            iaid,
            t1: 0,
            t2: 0,
            addrs: Vec::new(),
            status: Some((code, text)),
        }
    }

    fn address(iaid: u32, ip: Ipv6Addr, life: Duration) -> IaOut {
        let secs = life.as_secs().min(MAX_FINITE);
        IaOut {
            iaid,
            t1: (secs / 2) as u32,
            t2: (secs * 4 / 5) as u32,
            addrs: vec![(ip, secs as u32, secs as u32)],
            status: None,
        }
    }
}

/// What a reply carries besides its IAs.
#[derive(Clone, Copy, Default)]
struct Extras {
    status: Option<(u16, &'static str)>,
    /// DNS servers and search list.
    config: bool,
    preference: bool,
    rapid_commit: bool,
    refresh: bool,
}

/// The DHCPv6 server and its lease table.
pub struct DhcpServer6 {
    table: Table,
    /// The message being built (kept for its allocation).
    scratch: Vec<u8>,
    /// Option 24's payload, and the list it was encoded from.
    search: (Vec<String>, Vec<u8>),
    last_exhausted_log: Option<Instant>,
}

/// Whether `ip` is UDP to port 547 (checked no further: `DhcpServer6::handle` does).
pub(crate) fn is_to_server_port(ip: &Ipv6View) -> bool {
    ip.proto == IpProtocol::Udp && ip.upper().get(2..4) == Some(&SERVER_PORT.to_be_bytes()[..])
}

/// The server's DUID: DUID-LL (RFC 8415 11.4), hardware type Ethernet, of `mac`.
pub fn server_duid(mac: Mac) -> [u8; 10] {
    let m = mac.0;
    [0, 3, 0, 1, m[0], m[1], m[2], m[3], m[4], m[5]]
}

impl DhcpServer6 {
    pub(crate) fn new(cfg: &Ipv6Config) -> DhcpServer6 {
        DhcpServer6 {
            table: Table::new(cfg.range_start, cfg.range_end),
            scratch: Vec::new(),
            search: (Vec::new(), Vec::new()),
            last_exhausted_log: None,
        }
    }

    /// The leases, in order of creation.
    pub fn leases(&self) -> impl Iterator<Item = &Lease6> {
        self.table.leases()
    }

    /// Lease `id`, if the table holds it.
    pub fn lease(&self, id: u32) -> Option<&Lease6> {
        self.table.lease(id)
    }

    /// Changes whenever the table does (a lease created, renewed or removed).
    pub fn generation(&self) -> u64 {
        self.table.generation()
    }

    /// Changes when a lease is created or removed, not when one is only renewed.
    pub fn binding_generation(&self) -> u64 {
        self.table.binding_generation()
    }

    /// The ids of the leases changed after `generation`, oldest first (an id may repeat);
    /// None when that is further back than the changes kept: save the whole table.
    pub fn changed_since(&self, generation: u64) -> Option<impl Iterator<Item = u32> + '_> {
        self.table.changed_since(generation)
    }

    /// Loads saved leases (skipping the expired, those outside the range and duplicates);
    /// returns how many were kept.
    pub fn restore(&mut self, now: Instant, leases: Vec<Lease6>) -> usize {
        self.table.restore(now, leases)
    }

    pub(crate) fn reconfigure(&mut self, cfg: &Ipv6Config, events: &mut Events) {
        self.table.set_range(cfg.range_start, cfg.range_end, events);
    }

    /// When `handle_timeout` has a lease or a decline to end.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.poll_timeout()
    }

    /// Ends the leases and declines due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, ctx: &mut Ctx) {
        self.table.expire(now, &mut ctx.events);
    }

    /// Handles a whole UDP datagram to port 547 (`ip` is its packet; `src_mac` the frame's
    /// Ethernet source).
    pub(crate) fn handle(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        ip: &Ipv6View,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        if ip.proto != IpProtocol::Udp {
            return Err(DropReason::Unsupported);
        }
        if !ip.is_whole() {
            // A DHCPv6 message fits any link's MTU; a fragmented one is not a client's.
            return Err(DropReason::Unsupported);
        }
        let upper = ip.upper();
        let udp = UdpPacket::new_checked(upper).map_err(|_| DropReason::Malformed)?;
        let datagram = &upper[..usize::from(udp.len())];
        // A zero checksum is not allowed over IPv6 (RFC 8200 8.1).
        if udp.checksum() == 0 || !verify_upper6(ip.src, ip.dst, 17, datagram) {
            return Err(DropReason::BadChecksum);
        }
        if udp.dst_port() != SERVER_PORT {
            return Err(DropReason::Foreign);
        }
        let unicast = !ip.dst.is_multicast();
        let mine =
            ip.dst == ALL_DHCP_AGENTS || ip.dst == ctx.cfg.ipv6.ip || ip.dst == link_local(ctx.mac);
        if !mine {
            return Err(DropReason::Foreign);
        }
        if ip.src.is_unspecified() || ip.src.is_multicast() {
            return Err(DropReason::Malformed);
        }
        let mode = ctx.cfg.ipv6.dhcpv6;
        if mode == Dhcpv6Mode::Off || !ctx.cfg.ipv6.enabled {
            return Err(DropReason::Disabled);
        }
        let msg = ClientMessage::parse(udp.payload())?;
        let ours = server_duid(ctx.mac);
        // RFC 8415 16.2 to 16.12: which identifiers each message must, may or must not carry.
        match msg.kind {
            kind::SOLICIT | kind::CONFIRM | kind::REBIND => {
                if msg.client_id.is_none() || msg.server_id.is_some() {
                    return Err(DropReason::Malformed);
                }
                if unicast {
                    // RFC 8415 16: sent to the multicast address only; a unicast one is not
                    // a client following the protocol.
                    return Err(DropReason::Unsupported);
                }
            }
            kind::REQUEST | kind::RENEW | kind::RELEASE | kind::DECLINE => {
                let (Some(_), Some(sid)) = (msg.client_id, msg.server_id) else {
                    return Err(DropReason::Malformed);
                };
                if sid != ours {
                    // For another server of the link.
                    return Err(DropReason::Foreign);
                }
            }
            _ => {
                if msg.server_id.is_some_and(|s| s != ours) {
                    return Err(DropReason::Foreign);
                }
                if !msg.ias.is_empty() {
                    return Err(DropReason::Malformed);
                }
            }
        }
        self.table.expire(now, &mut ctx.events);
        let duid = msg.client_id.unwrap_or_default();
        let stateful = mode == Dhcpv6Mode::Stateful;
        let config = Extras {
            config: true,
            ..Extras::default()
        };
        let (reply, ias, extras) = match msg.kind {
            kind::SOLICIT => {
                let commit = msg.rapid_commit && stateful;
                let ias = self.bind(now, ctx, src_mac, &msg, commit);
                let none = !ias.is_empty() && ias.iter().all(|ia| ia.addrs.is_empty());
                if commit {
                    let e = Extras {
                        rapid_commit: true,
                        ..config
                    };
                    (kind::REPLY, ias, e)
                } else {
                    let e = Extras {
                        preference: true,
                        status: none.then_some((status::NO_ADDRS_AVAIL, "no addresses available")),
                        ..config
                    };
                    (kind::ADVERTISE, ias, e)
                }
            }
            kind::REQUEST => {
                let ias = self.bind(now, ctx, src_mac, &msg, stateful);
                (kind::REPLY, ias, config)
            }
            kind::RENEW | kind::REBIND => {
                let ias = self.refresh(now, ctx, src_mac, &msg, stateful);
                (kind::REPLY, ias, config)
            }
            kind::RELEASE | kind::DECLINE => {
                let mut ias = Vec::new();
                for ia in &msg.ias {
                    match self.table.find(duid, ia.iaid, src_mac).map(|l| l.id) {
                        Some(id) if msg.kind == kind::DECLINE => {
                            self.table.decline(id, now, &mut ctx.events)
                        }
                        Some(id) => {
                            self.table.remove(id, &mut ctx.events);
                        }
                        None => ias.push(IaOut::status(
                            ia.iaid,
                            status::NO_BINDING,
                            "no binding for this IA",
                        )),
                    }
                }
                let e = Extras {
                    status: Some((status::SUCCESS, "done")),
                    ..Extras::default()
                };
                (kind::REPLY, ias, e)
            }
            kind::CONFIRM => {
                let mut addrs = msg.ias.iter().flat_map(|ia| ia.addrs.iter().map(|a| a.0));
                let mut any = false;
                let mut off_link = false;
                for a in &mut addrs {
                    any = true;
                    off_link |= !ctx.cfg.ipv6.in_prefix(a);
                }
                if !any {
                    // RFC 8415 18.3.3: nothing to confirm, no reply.
                    return Ok(());
                }
                let s = if off_link {
                    (status::NOT_ON_LINK, "not on this link")
                } else {
                    (status::SUCCESS, "on link")
                };
                let e = Extras {
                    status: Some(s),
                    ..config
                };
                (kind::REPLY, Vec::new(), e)
            }
            _ => {
                let e = Extras {
                    refresh: true,
                    ..config
                };
                (kind::REPLY, Vec::new(), e)
            }
        };
        self.send(
            ctx,
            src_mac,
            ip,
            udp.src_port(),
            reply,
            &msg,
            &ias,
            extras,
            out,
        );
        Ok(())
    }

    fn lease_time(ctx: &Ctx) -> Duration {
        ctx.cfg.dhcp.lease
    }

    /// The IAs of a Solicit or Request: each client's lease (extended when `commit`), or a
    /// new address (granted when `commit`, only offered otherwise).
    fn bind(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        commit: bool,
    ) -> Vec<IaOut> {
        let lease = Self::lease_time(ctx);
        let stateful = ctx.cfg.ipv6.dhcpv6 == Dhcpv6Mode::Stateful;
        let duid = msg.client_id.unwrap_or_default();
        let mut out = Vec::with_capacity(msg.ias.len());
        // Addresses offered to this message's other IAs (an Advertise grants nothing).
        let mut offered: Vec<Ipv6Addr> = Vec::new();
        for ia in &msg.ias {
            if !stateful {
                out.push(IaOut::status(
                    ia.iaid,
                    status::NO_ADDRS_AVAIL,
                    "addresses by SLAAC only",
                ));
                continue;
            }
            if let Some(l) = self.table.find(duid, ia.iaid, src_mac) {
                let (id, ip) = (l.id, l.ip);
                let life = if commit {
                    self.table.extend(id, now, lease);
                    lease
                } else {
                    l.expires_at.saturating_since(now)
                };
                out.push(IaOut::address(ia.iaid, ip, life));
                continue;
            }
            if self.table.leases_of(src_mac) + offered.len() >= table::PER_MAC {
                out.push(IaOut::status(
                    ia.iaid,
                    status::NO_ADDRS_AVAIL,
                    "no more addresses for this MAC",
                ));
                continue;
            }
            let hints: Vec<Ipv6Addr> = ia.addrs.iter().map(|a| a.0).collect();
            let Some(ip) = self.table.choose(&hints, &offered) else {
                self.exhausted(now, &mut ctx.events, src_mac);
                out.push(IaOut::status(
                    ia.iaid,
                    status::NO_ADDRS_AVAIL,
                    "no addresses available",
                ));
                continue;
            };
            if commit {
                let iaid = ia.iaid;
                self.table
                    .grant(now, duid, iaid, src_mac, ip, lease, &mut ctx.events);
            } else {
                offered.push(ip);
            }
            out.push(IaOut::address(ia.iaid, ip, lease));
        }
        out
    }

    /// The IAs of a Renew or Rebind (RFC 8415 18.3.4, 18.3.5): a binding is extended, and
    /// addresses the client lists that are not its binding's are returned with lifetimes 0.
    fn refresh(
        &mut self,
        now: Instant,
        ctx: &Ctx,
        src_mac: Mac,
        msg: &ClientMessage,
        stateful: bool,
    ) -> Vec<IaOut> {
        let lease = Self::lease_time(ctx);
        let duid = msg.client_id.unwrap_or_default();
        let mut out = Vec::with_capacity(msg.ias.len());
        for ia in &msg.ias {
            let found = self
                .table
                .find(duid, ia.iaid, src_mac)
                .map(|l| (l.id, l.ip));
            match found {
                Some((id, ip)) if stateful => {
                    self.table.extend(id, now, lease);
                    let mut o = IaOut::address(ia.iaid, ip, lease);
                    for &(a, _, _) in &ia.addrs {
                        if a != ip && o.addrs.len() < message::MAX_IA_ADDRS {
                            o.addrs.push((a, 0, 0));
                        }
                    }
                    out.push(o);
                }
                _ => {
                    let off_link: Vec<(Ipv6Addr, u32, u32)> = ia
                        .addrs
                        .iter()
                        .filter(|a| !ctx.cfg.ipv6.in_prefix(a.0))
                        .map(|a| (a.0, 0, 0))
                        .collect();
                    if msg.kind == kind::REBIND && !off_link.is_empty() {
                        out.push(IaOut {
                            iaid: ia.iaid,
                            t1: 0,
                            t2: 0,
                            addrs: off_link,
                            status: None,
                        });
                    } else {
                        out.push(IaOut::status(
                            ia.iaid,
                            status::NO_BINDING,
                            "no binding for this IA",
                        ));
                    }
                }
            }
        }
        out
    }

    /// Reports a range with no free address, at most once per `EXHAUSTED_LOG_INTERVAL`.
    fn exhausted(&mut self, now: Instant, events: &mut Events, mac: Mac) {
        let quiet = crate::vhost::dhcp::EXHAUSTED_LOG_INTERVAL;
        if self
            .last_exhausted_log
            .is_none_or(|t| now.saturating_since(t) >= quiet)
        {
            events.push(Event::DhcpPoolExhausted { mac });
            self.last_exhausted_log = Some(now);
        }
    }

    /// Builds the reply and sends it from the link-local address to the client's address and
    /// port, at its MAC.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        ctx: &Ctx,
        src_mac: Mac,
        ip: &Ipv6View,
        port: u16,
        reply: u8,
        msg: &ClientMessage,
        ias: &[IaOut],
        e: Extras,
        out: &mut FrameBatch,
    ) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.push(reply);
        buf.extend_from_slice(&msg.xid);
        let mut w = Writer { buf: &mut buf };
        w.opt(opt::SERVERID, &server_duid(ctx.mac));
        if let Some(c) = msg.client_id {
            w.opt(opt::CLIENTID, c);
        }
        for ia in ias {
            let at = w.begin(opt::IA_NA);
            w.buf.extend_from_slice(&ia.iaid.to_be_bytes());
            w.buf.extend_from_slice(&ia.t1.to_be_bytes());
            w.buf.extend_from_slice(&ia.t2.to_be_bytes());
            for &(a, preferred, valid) in &ia.addrs {
                let o = w.begin(opt::IAADDR);
                w.buf.extend_from_slice(&a.octets());
                w.buf.extend_from_slice(&preferred.to_be_bytes());
                w.buf.extend_from_slice(&valid.to_be_bytes());
                w.end(o);
            }
            if let Some((code, text)) = ia.status {
                w.status(code, text);
            }
            w.end(at);
        }
        if let Some((code, text)) = e.status {
            w.status(code, text);
        }
        if e.preference {
            // The only server of the link: the client need not wait for others.
            w.opt(opt::PREFERENCE, &[255]);
        }
        if e.rapid_commit {
            w.opt(opt::RAPID_COMMIT, &[]);
        }
        if e.config {
            let v6 = &ctx.cfg.ipv6;
            if !v6.dns.is_empty() {
                let at = w.begin(opt::DNS_SERVERS);
                for d in &v6.dns {
                    w.buf.extend_from_slice(&d.octets());
                }
                w.end(at);
            }
            let names: &[String] = if ctx.cfg.dhcp.search.is_empty() {
                ctx.cfg.dhcp.domain.as_slice()
            } else {
                &ctx.cfg.dhcp.search
            };
            if self.search.0 != names {
                self.search.1.clear();
                message::encode_domain_list(names, &mut self.search.1);
                self.search.0 = names.to_vec();
            }
            if !self.search.1.is_empty() {
                w.opt(opt::DOMAIN_LIST, &self.search.1);
            }
        }
        if e.refresh {
            let irt = Self::lease_time(ctx)
                .as_secs()
                .clamp(IRT_MINIMUM, MAX_FINITE) as u32;
            w.opt(opt::INFORMATION_REFRESH_TIME, &irt.to_be_bytes());
        }
        let src = link_local(ctx.mac);
        let dst = ip.src;
        let len = 8 + buf.len();
        let h = Ipv6Header::new(src, dst, IpProtocol::Udp);
        push_ipv6(out, ctx.mac, src_mac, &h, len, |p| {
            p[0..2].copy_from_slice(&SERVER_PORT.to_be_bytes());
            p[2..4].copy_from_slice(&port.to_be_bytes());
            p[4..6].copy_from_slice(&(len as u16).to_be_bytes());
            p[6..8].fill(0);
            p[8..].copy_from_slice(&buf);
            // A sum of zero is sent as all ones over IPv6, where zero means "none".
            let c = match upper_checksum6(src, dst, 17, p) {
                0 => 0xffff,
                c => c,
            };
            p[6..8].copy_from_slice(&c.to_be_bytes());
        });
        self.scratch = buf;
    }
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::{EthernetFrame, ETHERNET_HEADER_LEN};

    use super::message::{split, IaNa, OptionIter};
    use super::*;
    use crate::config::Config;
    use crate::sim::SimSockets;
    use crate::testing::{setup_with, HOST_MAC, T0};
    use crate::wire::{multicast_mac, IPV6_HEADER_LEN};
    use crate::Engine;

    const A: Mac = Mac([2, 0, 0, 0, 0, 0x0a]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 0x0b]);
    const LEASE: u64 = 7200;

    fn duid(n: u8) -> Vec<u8> {
        vec![0, 3, 0, 1, 2, 0, 0, 0, 0, n]
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn option(code: u16, data: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u16).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn ia_na(iaid: u32, addrs: &[Ipv6Addr]) -> Vec<u8> {
        let mut d = iaid.to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 8]);
        for a in addrs {
            let mut x = a.octets().to_vec();
            x.extend_from_slice(&[0; 8]);
            d.extend(option(opt::IAADDR, &x));
        }
        option(opt::IA_NA, &d)
    }

    /// A client message being built: its frame's addresses and its options.
    #[derive(Clone)]
    struct Msg {
        mac: Mac,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        body: Vec<u8>,
        bad_checksum: bool,
    }

    fn msg(kind: u8, mac: Mac) -> Msg {
        Msg {
            mac,
            src: link_local(mac),
            dst: ALL_DHCP_AGENTS,
            body: vec![kind, 0xab, 0xcd, mac.0[5]],
            bad_checksum: false,
        }
    }

    impl Msg {
        fn opt(mut self, code: u16, data: &[u8]) -> Msg {
            self.body.extend(option(code, data));
            self
        }
        fn raw(mut self, bytes: &[u8]) -> Msg {
            self.body.extend_from_slice(bytes);
            self
        }
        fn client(self, n: u8) -> Msg {
            self.opt(opt::CLIENTID, &duid(n))
        }
        fn server(self) -> Msg {
            self.opt(opt::SERVERID, &server_duid(HOST_MAC))
        }
        fn ia(mut self, iaid: u32, addrs: &[Ipv6Addr]) -> Msg {
            self.body.extend(ia_na(iaid, addrs));
            self
        }
        fn frame(&self) -> Vec<u8> {
            let udp_len = 8 + self.body.len();
            let mut udp = vec![0u8; udp_len];
            udp[0..2].copy_from_slice(&CLIENT_PORT.to_be_bytes());
            udp[2..4].copy_from_slice(&SERVER_PORT.to_be_bytes());
            udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            udp[8..].copy_from_slice(&self.body);
            let mut c = upper_checksum6(self.src, self.dst, 17, &udp);
            if self.bad_checksum {
                c ^= 1;
            }
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            let eth_dst = if self.dst.is_multicast() {
                multicast_mac(self.dst)
            } else {
                HOST_MAC
            };
            let mut f = Vec::new();
            f.extend_from_slice(&eth_dst.0);
            f.extend_from_slice(&self.mac.0);
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(udp_len as u16).to_be_bytes());
            f.extend_from_slice(&[17, 1]);
            f.extend_from_slice(&self.src.octets());
            f.extend_from_slice(&self.dst.octets());
            f.extend_from_slice(&udp);
            f
        }
    }

    /// A reply as the client reads it.
    #[derive(Debug)]
    struct Reply {
        kind: u8,
        xid: [u8; 3],
        opts: Vec<(u16, Vec<u8>)>,
        ias: Vec<IaNa>,
    }

    impl Reply {
        fn get(&self, code: u16) -> Option<&[u8]> {
            self.opts
                .iter()
                .find(|(c, _)| *c == code)
                .map(|(_, d)| d.as_slice())
        }
        fn status(&self) -> Option<u16> {
            self.get(opt::STATUS_CODE)
                .map(|d| u16::from_be_bytes([d[0], d[1]]))
        }
        fn addr(&self) -> Ipv6Addr {
            self.ias[0].addrs[0].0
        }
    }

    struct Net {
        e: Engine,
        h: SimSockets,
        out: FrameBatch,
        now: Instant,
    }

    fn net_with(f: impl FnOnce(&mut Config)) -> Net {
        let (e, h, out) = setup_with(|c| {
            c.ipv6.dhcpv6 = Dhcpv6Mode::Stateful;
            c.dhcp.search = vec!["lan.example".into(), "example".into()];
            f(c)
        });
        Net { e, h, out, now: T0 }
    }

    fn net() -> Net {
        net_with(|_| {})
    }

    impl Net {
        /// Sends `m`; returns the reply, if one came.
        fn send(&mut self, m: &Msg) -> Option<Reply> {
            self.out.clear();
            self.e
                .handle_frame(self.now, &m.frame(), &mut self.h, &mut self.out);
            let frames: Vec<Vec<u8>> = self.out.iter().map(|f| f.to_vec()).collect();
            assert!(frames.len() <= 1);
            let f = frames.first()?;
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            assert_eq!(crate::wire::mac(eth.dst_addr()), m.mac);
            assert_eq!(crate::wire::mac(eth.src_addr()), HOST_MAC);
            let ip = Ipv6View::parse(&f[ETHERNET_HEADER_LEN..]).unwrap();
            assert_eq!(ip.src, link_local(HOST_MAC));
            assert_eq!(ip.dst, m.src);
            assert_eq!(ip.proto, IpProtocol::Udp);
            let udp = ip.upper();
            assert!(verify_upper6(ip.src, ip.dst, 17, udp), "checksum");
            assert_eq!(&udp[0..4], &[2, 0x23, 2, 0x22], "547 to 546");
            assert_eq!(f.len(), ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + udp.len());
            let (kind, xid, area) = split(&udp[8..]).unwrap();
            let mut r = Reply {
                kind,
                xid,
                opts: Vec::new(),
                ias: Vec::new(),
            };
            for o in OptionIter::new(area) {
                let (code, d) = o.unwrap();
                if code == opt::IA_NA {
                    r.ias.push(IaNa::parse(d).unwrap());
                }
                r.opts.push((code, d.to_vec()));
            }
            assert_eq!(r.get(opt::SERVERID), Some(&server_duid(HOST_MAC)[..]));
            assert_eq!(r.xid, [m.body[1], m.body[2], m.body[3]]);
            Some(r)
        }

        fn dropped(&mut self, m: &Msg, why: DropReason) {
            let before = self.e.stats().drops_of(why);
            assert!(self.send(m).is_none(), "no reply");
            assert_eq!(self.e.stats().drops_of(why), before + 1, "{why:?}");
        }

        fn later(&mut self, secs: u64) {
            self.now = self.now + Duration::from_secs(secs);
        }

        fn tick(&mut self) {
            if self.e.poll_timeout().is_some_and(|t| t <= self.now) {
                self.e.handle_timeout(self.now, &mut self.h, &mut self.out);
            }
        }

        /// Solicit then Request: the address the client ends up with.
        fn lease(&mut self, mac: Mac, client: u8, iaid: u32) -> Reply {
            let adv = self
                .send(&msg(kind::SOLICIT, mac).client(client).ia(iaid, &[]))
                .unwrap();
            assert_eq!(adv.kind, kind::ADVERTISE);
            let hint: Vec<Ipv6Addr> = adv.ias[0].addrs.iter().map(|a| a.0).collect();
            self.send(
                &msg(kind::REQUEST, mac)
                    .client(client)
                    .server()
                    .ia(iaid, &hint),
            )
            .unwrap()
        }

        fn events(&mut self) -> Vec<Event> {
            std::iter::from_fn(|| self.e.poll_event()).collect()
        }
    }

    fn range(n: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(v6("fd68:7562:6e61:1e::1000")) + n)
    }

    #[test]
    fn information_request_gets_dns_search_list_and_refresh_time() {
        for mode in [Dhcpv6Mode::Stateless, Dhcpv6Mode::Stateful] {
            let mut n = net_with(|c| c.ipv6.dhcpv6 = mode);
            // A client identifier is optional here.
            for (m, client) in [
                (msg(kind::INFORMATION_REQUEST, A).client(1), Some(duid(1))),
                (msg(kind::INFORMATION_REQUEST, A), None),
                (msg(kind::INFORMATION_REQUEST, A).server(), None),
            ] {
                let r = n.send(&m).unwrap();
                assert_eq!(r.kind, kind::REPLY);
                assert_eq!(r.get(opt::CLIENTID), client.as_deref());
                assert_eq!(
                    r.get(opt::DNS_SERVERS),
                    Some(&v6("fd68:7562:6e61:1e::1").octets()[..])
                );
                assert_eq!(
                    r.get(opt::DOMAIN_LIST),
                    Some(&b"\x03lan\x07example\x00\x07example\x00"[..])
                );
                assert_eq!(
                    r.get(opt::INFORMATION_REFRESH_TIME),
                    Some(&(LEASE as u32).to_be_bytes()[..])
                );
                assert!(r.ias.is_empty());
            }
        }
        // Another server's, or with an IA: not answered.
        let mut n = net();
        let other = msg(kind::INFORMATION_REQUEST, A).opt(opt::SERVERID, &duid(9));
        n.dropped(&other, DropReason::Foreign);
        let with_ia = msg(kind::INFORMATION_REQUEST, A).client(1).ia(1, &[]);
        n.dropped(&with_ia, DropReason::Malformed);
        // Unicast to the virtual host's addresses is answered too.
        for dst in [v6("fd68:7562:6e61:1e::1"), link_local(HOST_MAC)] {
            let mut m = msg(kind::INFORMATION_REQUEST, A);
            m.dst = dst;
            assert!(n.send(&m).is_some());
        }
        // To another address of the segment: not the server's, and not carried by the NAT
        // either (the segment is reached directly).
        let mut elsewhere = msg(kind::INFORMATION_REQUEST, A);
        elsewhere.dst = v6("fd68:7562:6e61:1e::99");
        n.dropped(&elsewhere, DropReason::Loop);
    }

    #[test]
    fn solicit_advertises_and_request_leases_with_t1_t2() {
        let mut n = net();
        let adv = n
            .send(
                &msg(kind::SOLICIT, A)
                    .client(1)
                    .ia(5, &[])
                    .opt(opt::ELAPSED_TIME, &[0, 0]),
            )
            .unwrap();
        assert_eq!(adv.kind, kind::ADVERTISE);
        assert_eq!(adv.get(opt::PREFERENCE), Some(&[255][..]));
        assert_eq!(adv.get(opt::CLIENTID), Some(&duid(1)[..]));
        assert!(adv.get(opt::DNS_SERVERS).is_some());
        assert_eq!(adv.status(), None);
        let ia = &adv.ias[0];
        assert_eq!((ia.iaid, ia.t1, ia.t2), (5, 3600, 5760));
        assert_eq!(ia.addrs, vec![(range(0), 7200, 7200)]);
        // An Advertise holds nothing.
        assert_eq!(n.e.dhcp6.leases().count(), 0);
        let r = n
            .send(&msg(kind::REQUEST, A).client(1).server().ia(5, &[range(0)]))
            .unwrap();
        assert_eq!(r.kind, kind::REPLY);
        assert_eq!(r.ias[0].addrs, vec![(range(0), 7200, 7200)]);
        assert_eq!((r.ias[0].t1, r.ias[0].t2), (3600, 5760));
        assert_eq!(r.ias[0].status, None);
        let l = n.e.dhcp6.leases().next().unwrap().clone();
        assert_eq!((l.mac, l.ip, l.iaid, &l.duid), (A, range(0), 5, &duid(1)));
        assert_eq!(l.expires_at, n.now + Duration::from_secs(LEASE));
        assert_eq!(
            n.events(),
            vec![Event::Dhcp6EntryCreated {
                id: 1,
                mac: A,
                ip: range(0),
                duid: "000300010200000000".to_owned() + "01",
                iaid: 5,
                lease: Duration::from_secs(LEASE),
            }]
        );
        // The same DUID and IAID get the same lease again, whatever they hint.
        let again = n
            .send(&msg(kind::REQUEST, A).client(1).server().ia(5, &[range(7)]))
            .unwrap();
        assert_eq!(again.addr(), range(0));
        let adv = n.send(&msg(kind::SOLICIT, A).client(1).ia(5, &[])).unwrap();
        assert_eq!(adv.addr(), range(0));
        assert_eq!(n.e.dhcp6.leases().count(), 1);
        // Another IAID of the client is another lease; a free hint is honoured.
        let other = n
            .send(&msg(kind::REQUEST, A).client(1).server().ia(6, &[range(40)]))
            .unwrap();
        assert_eq!(other.addr(), range(40));
        // Two IAs of one Solicit are offered two addresses.
        let two = n
            .send(&msg(kind::SOLICIT, B).client(2).ia(1, &[]).ia(2, &[]))
            .unwrap();
        assert_eq!(two.ias.len(), 2);
        assert_ne!(two.ias[0].addrs[0].0, two.ias[1].addrs[0].0);
    }

    #[test]
    fn rapid_commit_is_honoured_with_a_reply() {
        let mut n = net();
        let r = n
            .send(
                &msg(kind::SOLICIT, A)
                    .client(1)
                    .ia(1, &[])
                    .opt(opt::RAPID_COMMIT, &[]),
            )
            .unwrap();
        assert_eq!(r.kind, kind::REPLY);
        assert_eq!(r.get(opt::RAPID_COMMIT), Some(&[][..]));
        assert_eq!(r.addr(), range(0));
        assert_eq!(n.e.dhcp6.leases().count(), 1);
        // Stateless: nothing to commit, an Advertise without addresses.
        let mut n = net_with(|c| c.ipv6.dhcpv6 = Dhcpv6Mode::Stateless);
        let r = n
            .send(
                &msg(kind::SOLICIT, A)
                    .client(1)
                    .ia(1, &[])
                    .opt(opt::RAPID_COMMIT, &[]),
            )
            .unwrap();
        assert_eq!(r.kind, kind::ADVERTISE);
        assert_eq!(r.status(), Some(status::NO_ADDRS_AVAIL));
    }

    #[test]
    fn stateless_mode_offers_no_addresses_and_off_mode_drops() {
        let mut n = net_with(|c| c.ipv6.dhcpv6 = Dhcpv6Mode::Stateless);
        let adv = n.send(&msg(kind::SOLICIT, A).client(1).ia(1, &[])).unwrap();
        assert_eq!(adv.kind, kind::ADVERTISE);
        assert_eq!(adv.status(), Some(status::NO_ADDRS_AVAIL));
        assert_eq!(adv.ias[0].status, Some(status::NO_ADDRS_AVAIL));
        assert!(adv.ias[0].addrs.is_empty());
        assert!(adv.get(opt::DNS_SERVERS).is_some());
        let r = n
            .send(&msg(kind::REQUEST, A).client(1).server().ia(1, &[]))
            .unwrap();
        assert_eq!(r.ias[0].status, Some(status::NO_ADDRS_AVAIL));
        let r = n
            .send(&msg(kind::RENEW, A).client(1).server().ia(1, &[range(0)]))
            .unwrap();
        assert_eq!(r.ias[0].status, Some(status::NO_BINDING));
        assert_eq!(n.e.dhcp6.leases().count(), 0);

        let mut n = net_with(|c| c.ipv6.dhcpv6 = Dhcpv6Mode::Off);
        n.dropped(
            &msg(kind::INFORMATION_REQUEST, A).client(1),
            DropReason::Disabled,
        );
        n.dropped(
            &msg(kind::SOLICIT, A).client(1).ia(1, &[]),
            DropReason::Disabled,
        );
    }

    #[test]
    fn one_mac_holds_at_most_its_share_of_leases() {
        let mut n = net();
        for c in 0..table::PER_MAC as u8 {
            let r = n.lease(A, c, 1);
            assert_eq!(r.ias[0].status, None, "lease {c}");
        }
        // New DUIDs from the same MAC get nothing more.
        let r = n.lease(A, 50, 1);
        assert_eq!(r.ias[0].status, Some(status::NO_ADDRS_AVAIL));
        assert!(r.ias[0].addrs.is_empty());
        let adv = n
            .send(&msg(kind::SOLICIT, A).client(51).ia(1, &[]))
            .unwrap();
        assert_eq!(adv.status(), Some(status::NO_ADDRS_AVAIL));
        // Four IAs in one Solicit count against the bound before any is granted.
        let adv = n
            .send(
                &msg(kind::SOLICIT, B)
                    .client(9)
                    .ia(1, &[])
                    .ia(2, &[])
                    .ia(3, &[])
                    .ia(4, &[])
                    .ia(5, &[]),
            )
            .unwrap();
        let got = adv.ias.iter().filter(|i| !i.addrs.is_empty()).count();
        assert_eq!(got, table::PER_MAC);
        assert_eq!(adv.ias[4].status, Some(status::NO_ADDRS_AVAIL));
        // Another MAC is served.
        assert_eq!(n.lease(B, 60, 1).ias[0].status, None);
    }

    #[test]
    fn an_exhausted_range_answers_no_addrs_avail_and_reports_once() {
        let mut n = net_with(|c| c.ipv6.range_end = range(1));
        let macs: Vec<Mac> = (1..=4).map(|i| Mac([2, 0, 0, 0, 1, i])).collect();
        assert_eq!(n.lease(macs[0], 1, 1).addr(), range(0));
        assert_eq!(n.lease(macs[1], 2, 1).addr(), range(1));
        n.events();
        for (i, &m) in macs[2..].iter().enumerate() {
            let r = n.lease(m, 3 + i as u8, 1);
            assert_eq!(r.ias[0].status, Some(status::NO_ADDRS_AVAIL));
        }
        let ev = n.events();
        assert_eq!(ev, vec![Event::DhcpPoolExhausted { mac: macs[2] }]);
        assert_eq!(n.e.dhcp6.leases().count(), 2);
    }

    #[test]
    fn renew_and_rebind_extend_and_unknown_bindings_are_told_so() {
        let mut n = net();
        let ip = n.lease(A, 1, 1).addr();
        n.later(3000);
        let r = n
            .send(
                &msg(kind::RENEW, A)
                    .client(1)
                    .server()
                    .ia(1, &[ip, range(99)]),
            )
            .unwrap();
        assert_eq!(r.kind, kind::REPLY);
        assert_eq!(r.ias[0].addrs, vec![(ip, 7200, 7200), (range(99), 0, 0)]);
        let l = n.e.dhcp6.leases().next().unwrap();
        assert_eq!(l.expires_at, n.now + Duration::from_secs(LEASE));
        n.later(3000);
        let r = n
            .send(&msg(kind::REBIND, A).client(1).ia(1, &[ip]))
            .unwrap();
        assert_eq!(r.ias[0].addrs, vec![(ip, 7200, 7200)]);
        let l = n.e.dhcp6.leases().next().unwrap();
        assert_eq!(l.expires_at, n.now + Duration::from_secs(LEASE));
        // No binding: NoBinding; a Rebind of addresses off the link: lifetimes 0.
        let r = n
            .send(&msg(kind::RENEW, A).client(1).server().ia(9, &[ip]))
            .unwrap();
        assert_eq!(r.ias[0].status, Some(status::NO_BINDING));
        let r = n
            .send(&msg(kind::REBIND, A).client(1).ia(9, &[v6("2001:db8::1")]))
            .unwrap();
        assert_eq!(r.ias[0].addrs, vec![(v6("2001:db8::1"), 0, 0)]);
        let r = n
            .send(&msg(kind::REBIND, A).client(1).ia(9, &[ip]))
            .unwrap();
        assert_eq!(r.ias[0].status, Some(status::NO_BINDING));
        // A Rebind names no server; a Renew must name this one.
        n.dropped(
            &msg(kind::REBIND, A).client(1).server().ia(1, &[ip]),
            DropReason::Malformed,
        );
        n.dropped(
            &msg(kind::RENEW, A).client(1).ia(1, &[ip]),
            DropReason::Malformed,
        );
    }

    #[test]
    fn release_ends_and_decline_sets_the_address_aside() {
        let mut n = net();
        let ip = n.lease(A, 1, 1).addr();
        n.events();
        let r = n
            .send(
                &msg(kind::RELEASE, A)
                    .client(1)
                    .server()
                    .ia(1, &[ip])
                    .ia(2, &[]),
            )
            .unwrap();
        assert_eq!(r.kind, kind::REPLY);
        assert_eq!(r.status(), Some(status::SUCCESS));
        assert_eq!(r.ias.len(), 1);
        assert_eq!(
            (r.ias[0].iaid, r.ias[0].status),
            (2, Some(status::NO_BINDING))
        );
        assert!(r.get(opt::DNS_SERVERS).is_none());
        assert_eq!(n.e.dhcp6.leases().count(), 0);
        assert_eq!(
            n.events(),
            vec![Event::Dhcp6EntryDeleted { id: 1, mac: A, ip }]
        );
        // Released, the address is free again.
        let r = n
            .send(&msg(kind::REQUEST, B).client(2).server().ia(1, &[ip]))
            .unwrap();
        assert_eq!(r.addr(), ip);
        let r = n
            .send(&msg(kind::DECLINE, B).client(2).server().ia(1, &[ip]))
            .unwrap();
        assert_eq!(r.status(), Some(status::SUCCESS));
        assert_eq!(n.e.dhcp6.leases().count(), 0);
        // Declined: nobody gets it, even when asking for it, until the hold ends.
        let other = n.lease(A, 3, 1).addr();
        assert_ne!(other, ip);
        let r = n
            .send(&msg(kind::REQUEST, B).client(4).server().ia(1, &[ip]))
            .unwrap();
        assert_ne!(r.addr(), ip);
        n.later(table::DECLINE_HOLD.as_secs());
        n.tick();
        let r = n
            .send(&msg(kind::REQUEST, B).client(5).server().ia(1, &[ip]))
            .unwrap();
        assert_eq!(r.addr(), ip);
    }

    #[test]
    fn another_macs_lease_cannot_be_touched() {
        let mut n = net();
        let ip = n.lease(A, 1, 1).addr();
        // The same DUID and IAID from another MAC are another client.
        for m in [
            msg(kind::RELEASE, B).client(1).server().ia(1, &[ip]),
            msg(kind::DECLINE, B).client(1).server().ia(1, &[ip]),
            msg(kind::RENEW, B).client(1).server().ia(1, &[ip]),
        ] {
            let r = n.send(&m).unwrap();
            assert_eq!(r.ias[0].status, Some(status::NO_BINDING));
        }
        let r = n
            .send(&msg(kind::REQUEST, B).client(1).server().ia(1, &[ip]))
            .unwrap();
        assert_ne!(r.addr(), ip);
        let mine: Vec<(Mac, Ipv6Addr)> = n.e.dhcp6.leases().map(|l| (l.mac, l.ip)).collect();
        assert_eq!(mine, vec![(A, ip), (B, r.addr())]);
    }

    #[test]
    fn leases_expire_on_the_engines_timer() {
        let mut n = net();
        let ip = n.lease(A, 1, 1).addr();
        n.events();
        let due = n.e.poll_timeout().unwrap();
        assert!(due <= n.now + Duration::from_secs(LEASE));
        n.later(LEASE - 1);
        n.tick();
        assert_eq!(n.e.dhcp6.leases().count(), 1);
        n.later(1);
        n.tick();
        assert_eq!(n.e.dhcp6.leases().count(), 0);
        assert_eq!(
            n.events(),
            vec![Event::Dhcp6EntryDeleted { id: 1, mac: A, ip }]
        );
        let r = n
            .send(&msg(kind::RENEW, A).client(1).server().ia(1, &[ip]))
            .unwrap();
        assert_eq!(r.ias[0].status, Some(status::NO_BINDING));
    }

    #[test]
    fn confirm_says_whether_addresses_are_on_link() {
        let mut n = net();
        let r = n
            .send(&msg(kind::CONFIRM, A).client(1).ia(1, &[range(3)]))
            .unwrap();
        assert_eq!(r.status(), Some(status::SUCCESS));
        let r = n
            .send(
                &msg(kind::CONFIRM, A)
                    .client(1)
                    .ia(1, &[range(3), v6("2001:db8::5")]),
            )
            .unwrap();
        assert_eq!(r.status(), Some(status::NOT_ON_LINK));
        // Nothing to confirm: no reply, and nothing counted against it.
        let before = n.e.stats().drops;
        assert!(n
            .send(&msg(kind::CONFIRM, A).client(1).ia(1, &[]))
            .is_none());
        assert_eq!(n.e.stats().drops, before);
    }

    #[test]
    fn malformed_and_misaddressed_messages_are_dropped() {
        let mut n = net();
        let ok = msg(kind::SOLICIT, A).client(1).ia(1, &[]);
        assert!(n.send(&ok).is_some());
        let mut bad_sum = ok.clone();
        bad_sum.bad_checksum = true;
        let mut unicast = ok.clone();
        unicast.dst = v6("fd68:7562:6e61:1e::1");
        let mut ia_short = ia_na(1, &[range(1)]);
        ia_short[3] = 11; // IA_NA length 11: shorter than its fixed part.
        let mut ia_over = ia_na(1, &[range(1)]);
        ia_over[3] += 1; // IA_NA longer than the message.
        let mut addr_over = ia_na(1, &[range(1)]);
        addr_over[4 + 12 + 3] = 200; // IAADDR longer than its IA_NA.
        let cases: Vec<(Msg, DropReason)> = vec![
            (msg(kind::SOLICIT, A).ia(1, &[]), DropReason::Malformed),
            (ok.clone().server(), DropReason::Malformed),
            (ok.clone().raw(&[0, 1, 0]), DropReason::Malformed),
            (ok.clone().raw(&[0, 8, 0, 2, 0]), DropReason::Malformed),
            (ok.clone().raw(&[0, 99, 0xff, 0xff]), DropReason::Malformed),
            (
                msg(kind::SOLICIT, A).client(1).raw(&ia_short),
                DropReason::Malformed,
            ),
            (
                msg(kind::SOLICIT, A).client(1).raw(&ia_over),
                DropReason::Malformed,
            ),
            (
                msg(kind::SOLICIT, A).client(1).raw(&addr_over),
                DropReason::Malformed,
            ),
            (ok.clone().ia(1, &[]), DropReason::Malformed),
            (
                ok.clone().opt(opt::CLIENTID, &duid(2)),
                DropReason::Malformed,
            ),
            (
                msg(kind::SOLICIT, A).opt(opt::CLIENTID, &[0]),
                DropReason::Malformed,
            ),
            (
                msg(kind::REQUEST, A).client(1).ia(1, &[]),
                DropReason::Malformed,
            ),
            (
                msg(kind::RELEASE, A).server().ia(1, &[]),
                DropReason::Malformed,
            ),
            (
                msg(kind::REQUEST, A).client(1).opt(opt::SERVERID, &duid(7)),
                DropReason::Foreign,
            ),
            (
                msg(kind::ADVERTISE, A).client(1).server(),
                DropReason::Unsupported,
            ),
            (msg(12, A).client(1), DropReason::Unsupported),
            (
                msg(kind::REPLY, A).client(1).server(),
                DropReason::Unsupported,
            ),
            (unicast, DropReason::Unsupported),
            (bad_sum, DropReason::BadChecksum),
        ];
        for (m, why) in cases {
            n.dropped(&m, why);
        }
        // A message cut anywhere is dropped without a panic.
        let full = msg(kind::REQUEST, A)
            .client(1)
            .server()
            .ia(1, &[range(0)])
            .opt(opt::ELAPSED_TIME, &[0, 0]);
        for cut in 0..full.body.len() {
            let mut m = full.clone();
            m.body.truncate(cut);
            n.send(&m);
        }
        // Only the cut at the last option's start leaves a whole Request.
        assert_eq!(n.e.dhcp6.leases().count(), 1);
        // Truncated UDP: its length past the packet.
        let mut f = ok.frame();
        let udp_at = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN;
        f[udp_at + 5] = f[udp_at + 5].wrapping_add(4);
        let before = n.e.stats().drops_of(DropReason::Malformed);
        n.out.clear();
        n.e.handle_frame(n.now, &f, &mut n.h, &mut n.out);
        assert!(n.out.is_empty());
        assert_eq!(n.e.stats().drops_of(DropReason::Malformed), before + 1);
    }

    #[test]
    fn the_change_log_names_each_change_and_a_restore_keeps_what_fits() {
        let mut n = net();
        let g0 = n.e.dhcp6.generation();
        let a = n.lease(A, 1, 1).addr();
        let b = n.lease(B, 2, 1).addr();
        n.send(&msg(kind::RENEW, A).client(1).server().ia(1, &[a]));
        n.send(&msg(kind::RELEASE, B).client(2).server().ia(1, &[b]));
        let changed: Vec<u32> = n.e.dhcp6.changed_since(g0).unwrap().collect();
        assert_eq!(changed, vec![1, 2, 1, 2]);
        assert!(n.e.dhcp6.binding_generation() < n.e.dhcp6.generation());
        assert!(n
            .e
            .dhcp6
            .changed_since(n.e.dhcp6.generation() + 1)
            .is_none());

        let saved: Vec<Lease6> = n.e.dhcp6.leases().cloned().collect();
        let mut m = net();
        let mut more = saved.clone();
        let mut expired = saved[0].clone();
        expired.id = 8;
        expired.ip = range(5);
        expired.iaid = 2;
        expired.expires_at = T0;
        let mut outside = saved[0].clone();
        outside.id = 9;
        outside.ip = v6("fd68:7562:6e61:1e::5");
        outside.iaid = 3;
        more.push(expired);
        more.push(outside);
        more.push(saved[0].clone());
        assert_eq!(m.e.dhcp6.restore(m.now, more), 1);
        assert_eq!(m.e.dhcp6.leases().cloned().collect::<Vec<_>>(), saved);
        // The restored client keeps its address; new ids follow the restored ones.
        let r = m
            .send(&msg(kind::RENEW, A).client(1).server().ia(1, &[a]))
            .unwrap();
        assert_eq!(r.addr(), a);
        m.lease(B, 2, 1);
        assert_eq!(m.e.dhcp6.leases().last().unwrap().id, 2);
    }
}
