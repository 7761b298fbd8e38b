//! the user-mode TCP endpoint. PLACEHOLDER.

use smoltcp::wire::Ipv4Packet;

use crate::config::Config;
use crate::hostio::{HostEvent, HostIo};
use crate::nat::SessionInfo;
use crate::output::FrameBatch;
use crate::stats::Drop;
use crate::time::Instant;
use crate::Ctx;

pub struct TcpNat {}

impl TcpNat {
    pub fn new(_cfg: &Config) -> TcpNat {
        TcpNat {}
    }

    pub fn handle(
        &mut self,
        _now: Instant,
        _ctx: &mut Ctx,
        _ip: &Ipv4Packet<&[u8]>,
        _io: &mut impl HostIo,
        _out: &mut FrameBatch,
    ) -> Result<(), Drop> {
        Err(Drop::Unsupported)
    }

    /// Handles `ev` if one of this protocol's sessions owns its socket; else gives it back.
    pub fn handle_host_event(
        &mut self,
        _now: Instant,
        _ctx: &mut Ctx,
        ev: HostEvent,
        _io: &mut impl HostIo,
        _out: &mut FrameBatch,
    ) -> Option<HostEvent> {
        Some(ev)
    }

    pub fn sessions(&self, _into: &mut Vec<SessionInfo>) {}

    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    pub fn handle_timeout(
        &mut self,
        _now: Instant,
        _ctx: &mut Ctx,
        _io: &mut impl HostIo,
        _out: &mut FrameBatch,
    ) {
    }
}
