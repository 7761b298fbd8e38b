//! The virtual host: the one machine hubnat is on the segment (ARP, ICMP, DHCP server, DNS relay).

pub mod arp;
pub mod bindings;
pub mod dhcp;
pub mod dns;
pub mod icmp;
