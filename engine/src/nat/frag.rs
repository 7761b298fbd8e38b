//! IPv4 reassembly of guests' fragments. PLACEHOLDER.

use smoltcp::wire::Ipv4Packet;

use crate::stats::Drop;
use crate::time::Instant;
use crate::Ctx;

#[derive(Default)]
pub struct Reassembler {}

impl Reassembler {
    /// Adds a fragment; returns the whole datagram (IPv4 header + payload) once complete.
    pub fn add(&mut self, _now: Instant, _ip: &Ipv4Packet<&[u8]>) -> Result<Option<&[u8]>, Drop> {
        Err(Drop::Unsupported)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    pub fn handle_timeout(&mut self, _now: Instant, _ctx: &mut Ctx) {}
}
