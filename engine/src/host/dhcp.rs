//! The virtual DHCP server (seed 3.7.5, 3.7.6). PLACEHOLDER: being written.

use smoltcp::wire::Ipv4Packet;

use crate::config::{DhcpConfig, Mac};
use crate::output::FrameBatch;
use crate::stats::Drop;
use crate::time::Instant;
use crate::Ctx;

pub struct DhcpServer {}

impl DhcpServer {
    pub fn new(_cfg: &DhcpConfig) -> DhcpServer {
        DhcpServer {}
    }

    /// Handles a datagram to UDP port 67 (`ip` is its whole IPv4 packet, not fragmented).
    pub fn handle(
        &mut self,
        _now: Instant,
        _ctx: &mut Ctx,
        _src_mac: Mac,
        _ip: &Ipv4Packet<&[u8]>,
        _out: &mut FrameBatch,
    ) -> Result<(), Drop> {
        Err(Drop::Unsupported)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    pub fn handle_timeout(&mut self, _now: Instant, _ctx: &mut Ctx) {}
}
