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

/// Option codes (RFC 2132, RFC 3442).
pub(crate) mod opt {
    pub(crate) const PAD: u8 = 0;
    pub(crate) const SUBNET_MASK: u8 = 1;
    pub(crate) const ROUTER: u8 = 3;
    pub(crate) const DNS_SERVERS: u8 = 6;
    pub(crate) const HOST_NAME: u8 = 12;
    pub(crate) const DOMAIN_NAME: u8 = 15;
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
}
