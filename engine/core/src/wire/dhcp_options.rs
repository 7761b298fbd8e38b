//! The DHCP message's options area and the fields around it (RFC 2131, RFC 2132, RFC 3396,
//! RFC 3442): what `smoltcp::wire::DhcpPacket` and its `DhcpRepr` do not cover. The walk over
//! the options is strict where smoltcp's iterator silently stops at a truncated option.

use std::net::Ipv4Addr;

use crate::config::StaticRoute;
use crate::stats::DropReason;

/// The smallest BOOTP message (RFC 1542 2.1): replies are padded to it.
pub(crate) const MIN_BOOTP_LEN: usize = 300;
pub(crate) const OPTIONS_OFFSET: usize = 240;
pub(crate) const MAGIC_COOKIE: u32 = 0x6382_5363;
/// `sname` and `file` of a BOOTP message (smoltcp keeps its field table private, and its
/// `sname` range starts inside `chaddr`).
pub(crate) const SNAME_FIELD: std::ops::Range<usize> = 44..108;
pub(crate) const FILE_FIELD: std::ops::Range<usize> = 108..236;

/// Option codes (RFC 2132, RFC 3397, RFC 3442).
pub(crate) mod opt {
    pub(crate) const PAD: u8 = 0;
    pub(crate) const SUBNET_MASK: u8 = 1;
    pub(crate) const ROUTER: u8 = 3;
    pub(crate) const DNS_SERVERS: u8 = 6;
    pub(crate) const HOST_NAME: u8 = 12;
    pub(crate) const DOMAIN_NAME: u8 = 15;
    pub(crate) const INTERFACE_MTU: u8 = 26;
    pub(crate) const NTP_SERVERS: u8 = 42;
    pub(crate) const REQUESTED_IP: u8 = 50;
    pub(crate) const LEASE_TIME: u8 = 51;
    pub(crate) const OVERLOAD: u8 = 52;
    pub(crate) const MESSAGE_TYPE: u8 = 53;
    pub(crate) const SERVER_ID: u8 = 54;
    pub(crate) const PARAMETER_LIST: u8 = 55;
    pub(crate) const MESSAGE: u8 = 56;
    pub(crate) const MAX_MESSAGE_SIZE: u8 = 57;
    pub(crate) const RENEWAL_TIME: u8 = 58;
    pub(crate) const REBINDING_TIME: u8 = 59;
    /// RFC 3397.
    pub(crate) const DOMAIN_SEARCH: u8 = 119;
    pub(crate) const CLASSLESS_ROUTES: u8 = 121;
    /// Microsoft's pre-standard copy of option 121, sent only to clients that ask for it.
    pub(crate) const MS_CLASSLESS_ROUTES: u8 = 249;
    pub(crate) const END: u8 = 255;
}

/// A strict walk over a DHCP options area: pads are skipped, END stops it; an option whose
/// length runs past the area is an error. An area that ends without END is accepted.
pub(crate) struct OptionIter<'a> {
    buf: &'a [u8],
}

impl<'a> OptionIter<'a> {
    pub(crate) fn new(area: &'a [u8]) -> OptionIter<'a> {
        OptionIter { buf: area }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<(u8, &'a [u8]), DropReason>;

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
                        return Some(Err(DropReason::Malformed));
                    };
                    if rest.len() < len as usize {
                        self.buf = &[];
                        return Some(Err(DropReason::Malformed));
                    }
                    let (data, rest) = rest.split_at(len as usize);
                    self.buf = rest;
                    return Some(Ok((code, data)));
                }
            }
        }
    }
}

/// An option holding one IPv4 address.
pub(crate) fn ipv4_option(data: &[u8]) -> Result<Ipv4Addr, DropReason> {
    let b: [u8; 4] = data.try_into().map_err(|_| DropReason::Malformed)?;
    Ok(Ipv4Addr::from(b))
}

/// RFC 3442 option 121 payload for `routes` (plus the default route through `gateway`).
pub(crate) fn encode_classless_routes(
    routes: &[StaticRoute],
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

/// A domain name as option 119 and a resolver take it: labels of letters, digits and `-`, 1 to 63
/// bytes each, 253 in all (without a trailing dot).
pub(crate) fn is_domain_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// RFC 3397 option 119 payload for `names`: each name in DNS wire form, a suffix already
/// written replaced by a pointer to it (offsets count from the payload's start, across the
/// RFC 3396 parts it may be cut into). A name that is not a domain name is skipped rather than
/// written half-formed, since a client decodes the list as a whole.
pub(crate) fn encode_search_list(names: &[String], into: &mut Vec<u8>) {
    let start = into.len();
    // Every suffix written so far, with its offset: few names, so a scan beats a map.
    let mut written: Vec<(&str, u16)> = Vec::new();
    for name in names {
        let name = name.strip_suffix('.').unwrap_or(name);
        if !is_domain_name(name) {
            continue;
        }
        let mut rest = name;
        loop {
            if let Some(&(_, at)) = written.iter().find(|(s, _)| *s == rest) {
                into.extend_from_slice(&(0xC000 | at).to_be_bytes());
                break;
            }
            // A pointer holds 14 bits: a suffix written later than that is not pointed to.
            if let Ok(at @ 0..=0x3FFF) = u16::try_from(into.len() - start) {
                written.push((rest, at));
            }
            let (label, tail) = rest.split_once('.').unwrap_or((rest, ""));
            into.push(label.len() as u8);
            into.extend_from_slice(label.as_bytes());
            if tail.is_empty() {
                into.push(0);
                break;
            }
            rest = tail;
        }
    }
}

/// Decodes an option 119 payload (the RFC 3396 parts joined): None when it is malformed
/// (a pointer forward or into itself, a label past the end).
#[cfg(test)]
pub(crate) fn decode_search_list(data: &[u8]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let mut labels: Vec<String> = Vec::new();
        let (mut at, mut jumped) = (i, false);
        loop {
            let len = *data.get(at)?;
            if len & 0xC0 == 0xC0 {
                let to = usize::from(u16::from_be_bytes([len, *data.get(at + 1)?]) & 0x3FFF);
                if !jumped {
                    i = at + 2;
                }
                // Only backwards: a pointer loop cannot form.
                if to >= at {
                    return None;
                }
                (at, jumped) = (to, true);
            } else if len == 0 {
                if !jumped {
                    i = at + 1;
                }
                break;
            } else {
                let l = data.get(at + 1..at + 1 + usize::from(len))?;
                labels.push(String::from_utf8(l.to_vec()).ok()?);
                at += 1 + usize::from(len);
            }
        }
        names.push(labels.join("."));
    }
    Some(names)
}

/// Appends options to a reply, leaving room for END within `limit` bytes of message.
pub(crate) struct OptionWriter<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
    pub(crate) limit: usize,
}

impl OptionWriter<'_> {
    fn fits(&self, n: usize) -> bool {
        self.buf.len() + n < self.limit
    }

    pub(crate) fn put(&mut self, code: u8, data: &[u8]) {
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
    pub(crate) fn put_long(&mut self, code: u8, data: &[u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_iter_is_strict() {
        let items: Vec<_> = OptionIter::new(&[0, 0, 53, 1, 1, 0, 12, 0, 255, 7, 7]).collect();
        assert_eq!(items, vec![Ok((53, &[1u8][..])), Ok((12, &[][..]))]);
        let items: Vec<_> = OptionIter::new(&[53, 1, 1, 12, 5, 1]).collect();
        assert_eq!(
            items,
            vec![Ok((53, &[1u8][..])), Err(DropReason::Malformed)]
        );
        let items: Vec<_> = OptionIter::new(&[53]).collect();
        assert_eq!(items, vec![Err(DropReason::Malformed)]);
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn search_list_is_compressed_as_rfc_3397_shows() {
        // RFC 3397 section 3's example.
        let mut b = Vec::new();
        encode_search_list(&names(&["eng.apple.com.", "marketing.apple.com."]), &mut b);
        let mut want = vec![3];
        want.extend_from_slice(b"eng");
        want.push(5);
        want.extend_from_slice(b"apple");
        want.push(3);
        want.extend_from_slice(b"com");
        want.push(0);
        want.push(9);
        want.extend_from_slice(b"marketing");
        want.extend_from_slice(&[0xC0, 4]);
        assert_eq!(b, want);
        assert_eq!(
            decode_search_list(&b),
            Some(names(&["eng.apple.com", "marketing.apple.com"]))
        );
    }

    #[test]
    fn search_list_round_trips_and_skips_what_is_not_a_name() {
        let list = names(&[
            "a.test",
            "b.test",
            "a.test",
            "test",
            "x.y.b.test",
            "bad..name",
            "c",
        ]);
        let mut b = vec![0xEE];
        encode_search_list(&list, &mut b);
        // Offsets count from the payload, not from what was in the buffer before it.
        assert_eq!(b[0], 0xEE);
        let got = decode_search_list(&b[1..]).unwrap();
        assert_eq!(
            got,
            names(&["a.test", "b.test", "a.test", "test", "x.y.b.test", "c"])
        );
        // `a.test` again and `test` are one pointer each.
        assert_eq!(&b[1 + 12..1 + 16], &[0xC0, 0, 0xC0, 2]);
        assert!(b.len() - 1 < 30);
    }

    #[test]
    fn long_search_lists_point_back_only_within_reach() {
        let mut list: Vec<String> = (0..200)
            .map(|i| format!("{}.{}.n{i}.example", "l".repeat(60), "m".repeat(60)))
            .collect();
        // Written past the 14 bits a pointer holds: it is written again, whole.
        list.push(list[199].clone());
        let mut b = Vec::new();
        encode_search_list(&list, &mut b);
        assert!(b.len() > 0x3FFF);
        assert_eq!(decode_search_list(&b), Some(list));
    }

    #[test]
    fn malformed_search_lists_do_not_decode() {
        assert_eq!(decode_search_list(&[1, b'a']), None);
        assert_eq!(decode_search_list(&[0xC0, 0]), None, "a pointer to itself");
        assert_eq!(
            decode_search_list(&[1, b'a', 0xC0, 5]),
            None,
            "a pointer forward"
        );
        assert_eq!(decode_search_list(&[]), Some(vec![]));
    }

    #[test]
    fn domain_names() {
        assert!(is_domain_name("a-1.example.test"));
        assert!(!is_domain_name(""));
        assert!(!is_domain_name("a..b"));
        assert!(!is_domain_name("a.b."));
        assert!(!is_domain_name("a_b.test"));
        assert!(!is_domain_name(&"x".repeat(64)));
        assert!(!is_domain_name(&vec!["x".repeat(63); 4].join(".")));
    }
}
