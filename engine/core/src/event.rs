//! What the core reports to the operator, as values: DHCP entries and NAT sessions coming and
//! going (the seed's security log, SoftEther manual 3.7.8, without its words).
//!
//! The core queues them in its context; the caller drains them with `Engine::poll_event` and
//! decides what they become (the daemon writes the seed's lines). The queue is bounded so that
//! a caller that never drains cannot make the core grow: past `QUEUE` events the newest are
//! dropped and counted (`Engine::events_lost`).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::Mac;
use crate::nat::Proto;

/// Events the core holds until they are drained.
pub(crate) const QUEUE: usize = 4096;

/// One thing that happened, with what the security log says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The DHCP server created lease `id` (a new entry, not a renewal).
    DhcpEntryCreated {
        /// The lease's id, in order of creation.
        id: u32,
        /// The client's hardware address.
        mac: Mac,
        /// The address leased.
        ip: Ipv4Addr,
        /// The client's host name, sanitised (empty when it sent none).
        host_name: String,
        /// The lease time granted.
        lease: Duration,
    },
    /// Lease `id` ended (expired, released, or outside a new range).
    DhcpEntryDeleted {
        /// The lease's id.
        id: u32,
        /// The client's hardware address.
        mac: Mac,
        /// The address it had.
        ip: Ipv4Addr,
    },
    /// The DHCPv6 server created IA_NA lease `id` (its own sequence of ids).
    Dhcp6EntryCreated {
        /// The lease's id, in order of creation.
        id: u32,
        /// The Ethernet source of the client's message.
        mac: Mac,
        /// The address leased.
        ip: Ipv6Addr,
        /// The client's DUID, as hex.
        duid: String,
        /// The identity association the address is for.
        iaid: u32,
        /// The valid lifetime granted.
        lease: Duration,
    },
    /// DHCPv6 lease `id` ended (expired, released, declined, or outside a new range).
    Dhcp6EntryDeleted {
        /// The lease's id.
        id: u32,
        /// The client's MAC.
        mac: Mac,
        /// The address it had.
        ip: Ipv6Addr,
    },
    /// A client asked for an address and none was free (reported at most once a minute).
    DhcpPoolExhausted {
        /// The client's hardware address.
        mac: Mac,
    },
    /// A NAT session opened. Queries of the DNS relay are sessions of `Proto::Dns`, which the
    /// seed's log calls UDP sessions.
    SessionCreated {
        /// The session's protocol.
        proto: Proto,
        /// The session id (one sequence for every protocol).
        id: u32,
        /// The guest's end (for ICMP, the guest's address and echo ident).
        src: SocketAddr,
        /// The destination as the guest addressed it (for ICMP, port 0).
        dst: SocketAddr,
    },
    /// A NAT session opened from the sock side: a client reached a guest through a forward.
    /// The seed's log has the same words for it as for `SessionCreated`, with the client as
    /// the source; the variant says the direction without changing what `SessionCreated`
    /// carries.
    InboundSessionCreated {
        /// The session's protocol (TCP or UDP).
        proto: Proto,
        /// The session id (the same sequence as every other session's).
        id: u32,
        /// The client, as the guest sees it (`Engine::inbound_source`).
        src: SocketAddr,
        /// The guest's end.
        dst: SocketAddr,
    },
    /// A NAT session ended.
    SessionDeleted {
        /// The session's protocol.
        proto: Proto,
        /// The session id.
        id: u32,
    },
    /// The connection of TCP session `id` to its destination succeeded. The destination is an
    /// address; naming it (a reverse lookup) is the operator side's business. For an inbound
    /// session the destination is the guest, which answered the SYN.
    TcpConnected {
        /// The session id.
        id: u32,
        /// The address connected to (on the sock side; the guest's for an inbound session).
        ip: std::net::IpAddr,
        /// The port connected to.
        port: u16,
    },
    /// The egress policy refused a guest's flow (no session was made).
    EgressRefused {
        /// The flow's protocol.
        proto: Proto,
        /// The guest's end.
        src: SocketAddr,
        /// The destination as the guest addressed it (port 0 for ICMP).
        dst: SocketAddr,
    },
    /// The connection of TCP session `id` to its destination failed (for an inbound session:
    /// the guest reset it, or never answered).
    TcpConnectFailed {
        /// The session id.
        id: u32,
        /// The address tried (on the sock side; the guest's for an inbound session).
        ip: std::net::IpAddr,
        /// The port tried.
        port: u16,
        /// Why, as the sock side put it ("timed out" when no answer came in time).
        reason: String,
    },
}

/// The bounded queue of events waiting to be drained.
#[derive(Debug, Default)]
pub(crate) struct Events {
    queue: VecDeque<Event>,
    lost: u64,
}

impl Events {
    /// Queues `e`, or drops and counts it when `QUEUE` events are waiting.
    pub(crate) fn push(&mut self, e: Event) {
        if self.queue.len() >= QUEUE {
            self.lost += 1;
            return;
        }
        self.queue.push_back(e);
    }

    pub(crate) fn pop(&mut self) -> Option<Event> {
        self.queue.pop_front()
    }

    /// Events dropped because the queue was full.
    #[cfg(test)]
    pub(crate) fn lost(&self) -> u64 {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_the_new_events_and_counts_them() {
        let mut q = Events::default();
        for id in 0..QUEUE as u32 + 3 {
            q.push(Event::SessionDeleted {
                proto: Proto::Udp,
                id,
            });
        }
        assert_eq!(q.lost(), 3);
        assert_eq!(
            q.pop(),
            Some(Event::SessionDeleted {
                proto: Proto::Udp,
                id: 0
            })
        );
        let mut n = 1;
        while q.pop().is_some() {
            n += 1;
        }
        assert_eq!(n, QUEUE);
    }
}
