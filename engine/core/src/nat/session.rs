//! One row of the NAT session table (the seed's NatTable).

use std::net::SocketAddrV4;

use crate::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Dns,
}

impl Proto {
    pub const ALL: [Proto; 4] = [Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Dns];

    /// Its position in `ALL` (and in per-protocol arrays such as `Nat::session_counts`).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Icmp => "ICMP",
            Proto::Dns => "DNS",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Shared by all protocols, as in the seed's log (TCP 1, UDP 2, TCP 3, ...).
    pub id: u32,
    pub proto: Proto,
    pub guest: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub created: Instant,
    pub last_used: Instant,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    pub packets_to_host: u64,
    pub packets_to_guest: u64,
    pub state: &'static str,
}
