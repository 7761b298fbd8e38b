//! The virtual host: the one machine hubnat is on the segment (ARP, ICMP, DHCP server, DNS
//! relay; on IPv6 neighbour discovery, router advertisements, echo and the DHCPv6 server).

pub(crate) mod arp;
pub mod bindings;
pub mod dhcp;
pub mod dhcp6;
pub(crate) mod dns;
pub(crate) mod icmp;
pub mod names;
pub(crate) mod ndp;
