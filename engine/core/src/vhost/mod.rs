//! The virtual host: the one machine hubnat is on the segment (ARP, ICMP, DHCP server, DNS relay; on IPv6
//! neighbour discovery, router advertisements and echo).

pub(crate) mod arp;
pub mod bindings;
pub mod dhcp;
pub(crate) mod dns;
pub(crate) mod icmp;
pub mod names;
pub(crate) mod ndp;
