//! DHCPv6 messages on the wire (RFC 8415 8 and 21): the client messages the server reads, and
//! the option writer its replies are built with.
//!
//! Every length a client wrote is checked against what is there before anything is read; a
//! message whose options do not add up is `Malformed` as a whole, since a client that got one
//! length wrong cannot be trusted about the rest.

use std::net::Ipv6Addr;

use crate::stats::DropReason;

/// Message types (RFC 8415 7.3).
pub(crate) mod kind {
    pub(crate) const SOLICIT: u8 = 1;
    pub(crate) const ADVERTISE: u8 = 2;
    pub(crate) const REQUEST: u8 = 3;
    pub(crate) const CONFIRM: u8 = 4;
    pub(crate) const RENEW: u8 = 5;
    pub(crate) const REBIND: u8 = 6;
    pub(crate) const REPLY: u8 = 7;
    pub(crate) const RELEASE: u8 = 8;
    pub(crate) const DECLINE: u8 = 9;
    pub(crate) const INFORMATION_REQUEST: u8 = 11;
}

/// Option codes (RFC 8415 21, RFC 3646).
pub(crate) mod opt {
    pub(crate) const CLIENTID: u16 = 1;
    pub(crate) const SERVERID: u16 = 2;
    pub(crate) const IA_NA: u16 = 3;
    pub(crate) const IAADDR: u16 = 5;
    pub(crate) const ORO: u16 = 6;
    pub(crate) const PREFERENCE: u16 = 7;
    pub(crate) const ELAPSED_TIME: u16 = 8;
    pub(crate) const STATUS_CODE: u16 = 13;
    pub(crate) const RAPID_COMMIT: u16 = 14;
    pub(crate) const DNS_SERVERS: u16 = 23;
    pub(crate) const DOMAIN_LIST: u16 = 24;
    pub(crate) const INFORMATION_REFRESH_TIME: u16 = 32;
}

/// Status codes (RFC 8415 21.13).
pub(crate) mod status {
    pub(crate) const SUCCESS: u16 = 0;
    pub(crate) const NO_ADDRS_AVAIL: u16 = 2;
    pub(crate) const NO_BINDING: u16 = 3;
    pub(crate) const NOT_ON_LINK: u16 = 4;
}

/// The longest DUID (RFC 8415 11.1: 128 octets and the 2-octet type).
pub(crate) const MAX_DUID: usize = 130;
/// The shortest DUID worth the name: its type and at least one octet.
const MIN_DUID: usize = 3;
/// IA_NAs one message may carry. Real clients send one per interface; a bound keeps the work
/// and the reply of one message small.
pub(crate) const MAX_IAS: usize = 8;
/// Addresses one IA_NA may list (hints, or the addresses renewed or released).
pub(crate) const MAX_IA_ADDRS: usize = 8;
const IA_NA_FIXED: usize = 12;
const IAADDR_FIXED: usize = 24;

/// The options of an options area, in order: `Err(Malformed)` (once, then nothing) where an
/// option's header or data would run past the area.
pub(crate) struct OptionIter<'a> {
    rest: &'a [u8],
}

impl<'a> OptionIter<'a> {
    pub(crate) fn new(area: &'a [u8]) -> OptionIter<'a> {
        OptionIter { rest: area }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<(u16, &'a [u8]), DropReason>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let head = self.rest.get(..4)?;
            let code = u16::from_be_bytes([head[0], head[1]]);
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let data = self.rest.get(4..4 + len)?;
            Some((code, data, 4 + len))
        })();
        match parsed {
            Some((code, data, used)) => {
                self.rest = &self.rest[used..];
                Some(Ok((code, data)))
            }
            None => {
                self.rest = &[];
                Some(Err(DropReason::Malformed))
            }
        }
    }
}

/// One IA_NA as a client sent it (RFC 8415 21.4), or as a reply carries it (tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IaNa {
    pub(crate) iaid: u32,
    pub(crate) t1: u32,
    pub(crate) t2: u32,
    /// IAADDR options: (address, preferred lifetime, valid lifetime).
    pub(crate) addrs: Vec<(Ipv6Addr, u32, u32)>,
    /// A Status Code option inside the IA, if any.
    pub(crate) status: Option<u16>,
}

impl IaNa {
    pub(crate) fn parse(data: &[u8]) -> Result<IaNa, DropReason> {
        if data.len() < IA_NA_FIXED {
            return Err(DropReason::Malformed);
        }
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut ia = IaNa {
            iaid: be32(&data[0..4]),
            t1: be32(&data[4..8]),
            t2: be32(&data[8..12]),
            addrs: Vec::new(),
            status: None,
        };
        for o in OptionIter::new(&data[IA_NA_FIXED..]) {
            let (code, d) = o?;
            match code {
                opt::IAADDR => {
                    if d.len() < IAADDR_FIXED {
                        return Err(DropReason::Malformed);
                    }
                    // Its own options (a status code) are only checked to be well formed.
                    for inner in OptionIter::new(&d[IAADDR_FIXED..]) {
                        inner?;
                    }
                    if ia.addrs.len() == MAX_IA_ADDRS {
                        return Err(DropReason::Malformed);
                    }
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&d[..16]);
                    ia.addrs
                        .push((Ipv6Addr::from(a), be32(&d[16..20]), be32(&d[20..24])));
                }
                opt::STATUS_CODE => {
                    let c = d.get(..2).ok_or(DropReason::Malformed)?;
                    ia.status = Some(u16::from_be_bytes([c[0], c[1]]));
                }
                _ => {}
            }
        }
        Ok(ia)
    }
}

/// A client's message, checked (RFC 8415 16: the per-type rules are the server's).
#[derive(Clone, Debug)]
pub(crate) struct ClientMessage<'a> {
    pub(crate) kind: u8,
    pub(crate) xid: [u8; 3],
    pub(crate) client_id: Option<&'a [u8]>,
    pub(crate) server_id: Option<&'a [u8]>,
    pub(crate) ias: Vec<IaNa>,
    pub(crate) rapid_commit: bool,
}

/// The type, transaction id and options area of any DHCPv6 message (not a relay message).
pub(crate) fn split(bytes: &[u8]) -> Result<(u8, [u8; 3], &[u8]), DropReason> {
    if bytes.len() < 4 {
        return Err(DropReason::Malformed);
    }
    Ok((bytes[0], [bytes[1], bytes[2], bytes[3]], &bytes[4..]))
}

impl<'a> ClientMessage<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<ClientMessage<'a>, DropReason> {
        let (kind, xid, area) = split(bytes)?;
        match kind {
            kind::SOLICIT
            | kind::REQUEST
            | kind::CONFIRM
            | kind::RENEW
            | kind::REBIND
            | kind::RELEASE
            | kind::DECLINE
            | kind::INFORMATION_REQUEST => {}
            // A server's or a relay's message, or one this server has no use for
            // (Reconfigure, leasequery, ...).
            _ => return Err(DropReason::Unsupported),
        }
        let mut m = ClientMessage {
            kind,
            xid,
            client_id: None,
            server_id: None,
            ias: Vec::new(),
            rapid_commit: false,
        };
        let duid = |d: &'a [u8]| {
            if (MIN_DUID..=MAX_DUID).contains(&d.len()) {
                Ok(d)
            } else {
                Err(DropReason::Malformed)
            }
        };
        for o in OptionIter::new(area) {
            let (code, d) = o?;
            match code {
                // RFC 8415 21.2, 21.3: each at most once.
                opt::CLIENTID if m.client_id.is_none() => m.client_id = Some(duid(d)?),
                opt::SERVERID if m.server_id.is_none() => m.server_id = Some(duid(d)?),
                opt::CLIENTID | opt::SERVERID => return Err(DropReason::Malformed),
                opt::IA_NA => {
                    let ia = IaNa::parse(d)?;
                    if m.ias.len() == MAX_IAS || m.ias.iter().any(|o| o.iaid == ia.iaid) {
                        return Err(DropReason::Malformed);
                    }
                    m.ias.push(ia);
                }
                opt::RAPID_COMMIT if d.is_empty() => m.rapid_commit = true,
                opt::ELAPSED_TIME if d.len() == 2 => {}
                opt::ORO if d.len() % 2 == 0 => {}
                opt::RAPID_COMMIT | opt::ELAPSED_TIME | opt::ORO => {
                    return Err(DropReason::Malformed)
                }
                // IA_TA, IA_PD, vendor options, FQDN...: not served, not an error.
                _ => {}
            }
        }
        Ok(m)
    }
}

/// Writes options into a message; an option with options inside it is opened with `begin` and
/// its length filled in by `end`.
pub(crate) struct Writer<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub(crate) fn opt(&mut self, code: u16, data: &[u8]) {
        self.buf.extend_from_slice(&code.to_be_bytes());
        self.buf
            .extend_from_slice(&(data.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(data);
    }

    pub(crate) fn begin(&mut self, code: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&code.to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        at
    }

    pub(crate) fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at - 4) as u16;
        self.buf[at + 2..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub(crate) fn status(&mut self, code: u16, message: &str) {
        let at = self.begin(opt::STATUS_CODE);
        self.buf.extend_from_slice(&code.to_be_bytes());
        self.buf.extend_from_slice(message.as_bytes());
        self.end(at);
    }
}

/// Option 24's payload (RFC 8415 10: names uncompressed, unlike DHCPv4's option 119). A name
/// that is not a domain name is left out rather than written half-formed.
pub(crate) fn encode_domain_list(names: &[String], into: &mut Vec<u8>) {
    for name in names {
        let name = name.strip_suffix('.').unwrap_or(name);
        if !crate::wire::dhcp_options::is_domain_name(name) {
            continue;
        }
        for label in name.split('.') {
            into.push(label.len() as u8);
            into.extend_from_slice(label.as_bytes());
        }
        into.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(code: u16, data: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u16).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn options_past_the_end_are_malformed() {
        let mut area = option(opt::CLIENTID, &[0, 3, 0, 1, 2, 0, 0, 0, 0, 1]);
        assert_eq!(OptionIter::new(&area).count(), 1);
        // A header cut short.
        area.extend_from_slice(&[0, 8, 0]);
        let all: Vec<_> = OptionIter::new(&area).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], Err(DropReason::Malformed));
        // A length past the end.
        let bad = [0u8, 1, 0, 9, 1, 2, 3];
        assert_eq!(
            OptionIter::new(&bad).next(),
            Some(Err(DropReason::Malformed))
        );
    }

    #[test]
    fn an_ia_na_and_its_addresses_are_bounded() {
        let mut ia = vec![0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(IaNa::parse(&ia).unwrap().iaid, 7);
        assert_eq!(IaNa::parse(&ia[..11]), Err(DropReason::Malformed));
        let mut addr = [0u8; 24].to_vec();
        addr[0] = 0xfd;
        ia.extend(option(opt::IAADDR, &addr));
        assert_eq!(IaNa::parse(&ia).unwrap().addrs.len(), 1);
        let mut short = ia[..IA_NA_FIXED].to_vec();
        short.extend(option(opt::IAADDR, &addr[..23]));
        assert_eq!(IaNa::parse(&short), Err(DropReason::Malformed));
        // An IAADDR whose own options overrun it.
        let mut inner = addr.clone();
        inner.extend_from_slice(&[0, 13, 0, 5, 0]);
        let mut bad = ia[..IA_NA_FIXED].to_vec();
        bad.extend(option(opt::IAADDR, &inner));
        assert_eq!(IaNa::parse(&bad), Err(DropReason::Malformed));
        let mut many = ia[..IA_NA_FIXED].to_vec();
        for _ in 0..=MAX_IA_ADDRS {
            many.extend(option(opt::IAADDR, &addr));
        }
        assert_eq!(IaNa::parse(&many), Err(DropReason::Malformed));
    }

    #[test]
    fn client_messages() {
        let duid = [0u8, 3, 0, 1, 2, 0, 0, 0, 0, 1];
        let mut m = vec![kind::SOLICIT, 1, 2, 3];
        m.extend(option(opt::CLIENTID, &duid));
        m.extend(option(opt::RAPID_COMMIT, &[]));
        m.extend(option(opt::ELAPSED_TIME, &[0, 0]));
        m.extend(option(opt::ORO, &[0, 23, 0, 24]));
        m.extend(option(999, &[1, 2, 3]));
        let p = ClientMessage::parse(&m).unwrap();
        assert_eq!(p.client_id, Some(&duid[..]));
        assert!(p.rapid_commit);
        assert_eq!(p.xid, [1, 2, 3]);
        for (code, data) in [
            (opt::CLIENTID, &duid[..]),
            (opt::RAPID_COMMIT, &[0][..]),
            (opt::ELAPSED_TIME, &[0][..]),
            (opt::ORO, &[0][..]),
            (opt::SERVERID, &[0, 1][..]),
            (opt::SERVERID, &[7; MAX_DUID + 1][..]),
        ] {
            let mut bad = m.clone();
            bad.extend(option(code, data));
            assert_eq!(
                ClientMessage::parse(&bad).unwrap_err(),
                DropReason::Malformed,
                "{code}"
            );
        }
        for k in [kind::ADVERTISE, kind::REPLY, 10, 12, 13, 200] {
            let mut other = m.clone();
            other[0] = k;
            assert_eq!(
                ClientMessage::parse(&other).unwrap_err(),
                DropReason::Unsupported
            );
        }
        assert_eq!(
            ClientMessage::parse(&m[..3]).unwrap_err(),
            DropReason::Malformed
        );
    }

    #[test]
    fn domain_lists_are_uncompressed() {
        let mut b = Vec::new();
        encode_domain_list(
            &["a.example".into(), "example.".into(), "bad name".into()],
            &mut b,
        );
        assert_eq!(b, b"\x01a\x07example\x00\x07example\x00");
    }
}
