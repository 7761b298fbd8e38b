//! Frame building on top of `smoltcp::wire`: one place that lays out Ethernet + IPv4 + payload,
//! so every protocol of the virtual host and the NAT emits frames the same way. One file per
//! protocol; the builders are re-exported here, so callers name them `wire::X`.

pub(crate) mod dhcp_options;
mod ethernet;
pub mod gso;
mod ip;
mod ipv4;
mod ipv6;
mod udp;

pub(crate) use self::ethernet::eth;
pub use self::ethernet::mac;
pub(crate) use self::ip::{emit_ip_headers, ip_header_len, push_ip, push_ip_fragments, IpHeader};
pub use self::ipv4::ones_sum;
pub(crate) use self::ipv4::{push_ipv4, Ipv4Header, IPV4_HEADER_LEN};
pub use self::ipv6::link_local;

/// Whether `ip` is IPv6 link-local unicast (fe80::/10).
pub fn is_link_local6(ip: std::net::Ipv6Addr) -> bool {
    ipv6::is_link_local(ip)
}
#[allow(unused_imports)]
pub(crate) use self::ipv6::{
    emit_ipv6_header, is_link_local, multicast_mac, pseudo_header_sum6, push_ipv6, solicited_node,
    upper_checksum6, verify_upper6, FragmentHeader, Ipv6Header, Ipv6View, DEFAULT_HOP_LIMIT,
    IPV6_HEADER_LEN,
};
pub use self::udp::emit_udp;
pub(crate) use self::udp::push_udp;

/// The DNS server port (UDP and TCP).
pub(crate) const DNS_PORT: u16 = 53;
