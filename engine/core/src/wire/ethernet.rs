//! Ethernet: the MAC address conversions and the header of the frames the core emits.

use smoltcp::wire::{EthernetAddress, EthernetFrame, EthernetProtocol};

use crate::config::Mac;

pub(crate) fn eth(mac: Mac) -> EthernetAddress {
    EthernetAddress(mac.0)
}

/// The `Mac` of a smoltcp Ethernet address.
pub fn mac(addr: EthernetAddress) -> Mac {
    Mac(addr.0)
}

/// Writes the Ethernet header of an IPv4 frame.
pub(crate) fn emit_ethernet(frame: &mut [u8], src: Mac, dst: Mac) {
    emit_ethernet_type(frame, src, dst, EthernetProtocol::Ipv4);
}

/// Writes the Ethernet header of a frame of `ethertype`.
pub(crate) fn emit_ethernet_type(
    frame: &mut [u8],
    src: Mac,
    dst: Mac,
    ethertype: EthernetProtocol,
) {
    let mut eth_frame = EthernetFrame::new_unchecked(frame);
    eth_frame.set_src_addr(eth(src));
    eth_frame.set_dst_addr(eth(dst));
    eth_frame.set_ethertype(ethertype);
}
