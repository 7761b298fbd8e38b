//! The virtual host: the one machine hubnat is on the segment (ARP, ICMP, DHCP and DHCPv6
//! servers, DNS relay).

pub(crate) mod arp;
pub mod bindings;
pub mod dhcp;
pub mod dhcp6;
pub(crate) mod dns;
pub(crate) mod icmp;
pub mod names;
