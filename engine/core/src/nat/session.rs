//! The NAT session table (the seed's NatTable): its rows, and the slot table the datagram
//! protocols keep their sessions in.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::sockio::SockId;
use crate::time::Instant;
use crate::FastHashMap;

/// The protocol of a NAT session.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    /// A TCP connection.
    Tcp,
    /// A UDP flow.
    Udp,
    /// An ICMP echo exchange.
    Icmp,
    /// A query of the virtual host's DNS relay.
    Dns,
}

impl Proto {
    /// Its position in per-protocol arrays such as `Nat::session_counts`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in the security log and the operator's session list (`TCP`, `UDP`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Icmp => "ICMP",
            Proto::Dns => "DNS",
        }
    }
}

/// Which side opened a NAT session.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Direction {
    /// A guest's flow to the sock side (the NAT's ordinary traffic).
    #[default]
    Out,
    /// A flow a forward accepted on the sock side and opened toward a guest.
    In,
}

impl Direction {
    /// Its name in the operator's session list (`out`, `in`).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// One row of the NAT table, as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Shared by all protocols, as in the seed's log (TCP 1, UDP 2, TCP 3, ...).
    pub id: u32,
    /// The session's protocol.
    pub proto: Proto,
    /// The guest's end (for ICMP, its address and echo ident).
    pub guest: SocketAddr,
    /// The guest's peer: the destination as the guest addressed it, or for an inbound session
    /// the client as the guest sees it.
    pub dst: SocketAddr,
    /// Who opened the session.
    pub direction: Direction,
    /// When the session opened.
    pub created: Instant,
    /// When it last carried something.
    pub last_used: Instant,
    /// Bytes from the guest toward the destination.
    pub bytes_to_host: u64,
    /// Bytes from the destination to the guest.
    pub bytes_to_guest: u64,
    /// Packets from the guest toward the destination.
    pub packets_to_host: u64,
    /// Packets from the destination to the guest.
    pub packets_to_guest: u64,
    /// The session's state in words (`Established`, `Echo`, `Querying`, ...).
    pub state: &'static str,
}

impl SessionInfo {
    /// The row of a session opened at `now`, nothing carried yet.
    pub(crate) fn opened(
        id: u32,
        proto: Proto,
        (guest, dst): (SocketAddr, SocketAddr),
        direction: Direction,
        now: Instant,
        state: &'static str,
    ) -> SessionInfo {
        SessionInfo {
            id,
            proto,
            guest,
            dst,
            direction,
            created: now,
            last_used: now,
            bytes_to_host: 0,
            bytes_to_guest: 0,
            packets_to_host: 0,
            packets_to_guest: 0,
            state,
        }
    }
}

/// One session of a `SessionTable`: what every datagram protocol keeps (its key, its socket,
/// its row of the NAT table) and the protocol's own state.
/// A session idle this long may be ended to make room in a full table.
pub(crate) const EVICT_IDLE: Duration = Duration::from_secs(60);

pub(crate) struct Session<K, S> {
    pub(crate) key: K,
    pub(crate) sock: SockId,
    pub(crate) info: SessionInfo,
    pub(crate) state: S,
}

/// The sessions of a datagram protocol (UDP, ICMP echo), each owning one socket, ending when
/// idle. Sessions live in slots that keep their index for a session's life, so the timers and
/// the socket map name a session by it; a closed session's slot is reused.
///
/// Idle expiry uses a min-heap with one entry per session and lazy re-arming: traffic only
/// moves `info.last_used`, and a popped deadline that turns out early is pushed again at the
/// real one, so neither traffic nor `next_deadline` ever scans the table.
pub(crate) struct SessionTable<K, S> {
    slots: Vec<Option<Session<K, S>>>,
    free: Vec<usize>,
    by_key: FastHashMap<K, usize>,
    by_sock: FastHashMap<SockId, usize>,
    per_guest: FastHashMap<IpAddr, usize>,
    /// Sessions whose guest is IPv6 (the operator's count by family).
    v6: usize,
    /// (deadline, slot, session id): one entry per live session, possibly earlier than its
    /// real deadline.
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
}

impl<K: Copy + Eq + Hash, S> SessionTable<K, S> {
    pub(crate) fn new() -> Self {
        SessionTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: FastHashMap::default(),
            by_sock: FastHashMap::default(),
            per_guest: FastHashMap::default(),
            v6: 0,
            timers: BinaryHeap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Sessions of IPv6 guests.
    pub(crate) fn ipv6_len(&self) -> usize {
        self.v6
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Whether a new session for `guest` would pass `total` sessions in all or `per_guest` for
    /// that guest.
    pub(crate) fn full(&self, guest: IpAddr, total: usize, per_guest: usize) -> bool {
        let n = self.per_guest.get(&guest).copied().unwrap_or(0);
        self.len() >= total || n >= per_guest
    }

    pub(crate) fn slot(&self, key: &K) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    pub(crate) fn slot_of_sock(&self, sock: SockId) -> Option<usize> {
        self.by_sock.get(&sock).copied()
    }

    pub(crate) fn owns(&self, sock: SockId) -> bool {
        self.by_sock.contains_key(&sock)
    }

    #[cfg(test)]
    pub(crate) fn socket_of(&self, key: &K) -> Option<SockId> {
        self.get(self.slot(key)?).map(|s| s.sock)
    }

    pub(crate) fn get(&self, slot: usize) -> Option<&Session<K, S>> {
        self.slots.get(slot)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, slot: usize) -> Option<&mut Session<K, S>> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Slots in use or free: every session's slot is below this.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Adds `s`, idle at `deadline` unless used before; returns its slot.
    pub(crate) fn insert(&mut self, s: Session<K, S>, deadline: Instant) -> usize {
        let (key, sock, id) = (s.key, s.sock, s.info.id);
        let guest = s.info.guest.ip();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(s);
                slot
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        };
        self.by_key.insert(key, slot);
        self.by_sock.insert(sock, slot);
        *self.per_guest.entry(guest).or_insert(0) += 1;
        self.v6 += usize::from(guest.is_ipv6());
        self.timers.push(Reverse((deadline, slot, id)));
        slot
    }

    /// Takes the session of `slot` out; its timer entry is left to be skipped when it pops.
    pub(crate) fn remove(&mut self, slot: usize) -> Option<Session<K, S>> {
        let s = self.slots.get_mut(slot)?.take()?;
        self.by_key.remove(&s.key);
        self.by_sock.remove(&s.sock);
        let guest = s.info.guest.ip();
        self.v6 -= usize::from(guest.is_ipv6());
        if let Some(n) = self.per_guest.get_mut(&guest) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&guest);
            }
        }
        self.free.push(slot);
        Some(s)
    }

    /// When the earliest idle deadline is (possibly early: see `next_expired`).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|r| r.0 .0)
    }

    /// The next session that has been idle for `timeout` at `now`, re-arming the timers of
    /// those that were used since. Returns the slot to close.
    pub(crate) fn next_expired(&mut self, now: Instant, timeout: Duration) -> Option<usize> {
        while let Some(&Reverse((deadline, slot, id))) = self.timers.peek() {
            if deadline > now {
                return None;
            }
            self.timers.pop();
            let Some(s) = self.get(slot).filter(|s| s.info.id == id) else {
                continue;
            };
            let real = s.info.last_used + timeout;
            if real > now {
                self.timers.push(Reverse((real, slot, id)));
            } else {
                return Some(slot);
            }
        }
        None
    }

    /// The session to end so that a new one fits a full table: the one nearest its idle
    /// deadline (the longest idle, as every session of a table has the same timeout), if it
    /// has been idle for `idle` at least. Stale timer entries on the way are dropped, and an
    /// entry that is early is put back at its real deadline (as `next_expired` does).
    pub(crate) fn idlest(
        &mut self,
        now: Instant,
        timeout: Duration,
        idle: Duration,
    ) -> Option<usize> {
        while let Some(&Reverse((deadline, slot, id))) = self.timers.peek() {
            let Some(s) = self.get(slot).filter(|s| s.info.id == id) else {
                self.timers.pop();
                continue;
            };
            let real = s.info.last_used + timeout;
            if real > deadline {
                self.timers.pop();
                self.timers.push(Reverse((real, slot, id)));
                continue;
            }
            return (now.saturating_since(s.info.last_used) >= idle).then_some(slot);
        }
        None
    }

    /// Every session's idle deadline again from `timeout` (a shorter one must not wait for the
    /// deadlines a longer one set).
    pub(crate) fn reschedule(&mut self, timeout: Duration) {
        self.timers = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let s = s.as_ref()?;
                Some(Reverse((s.info.last_used + timeout, slot, s.info.id)))
            })
            .collect();
    }

    /// The NAT table's rows of these sessions, in slot order.
    pub(crate) fn sessions(&self, into: &mut Vec<SessionInfo>) {
        into.extend(self.slots.iter().flatten().map(|s| s.info.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn session(id: u32, sock: SockId, guest: Ipv4Addr, at: Instant) -> Session<u32, ()> {
        let g = SocketAddr::new(guest.into(), 1000 + id as u16);
        Session {
            key: id,
            sock,
            info: SessionInfo::opened(id, Proto::Udp, (g, g), Direction::Out, at, ""),
            state: (),
        }
    }

    #[test]
    fn idle_sessions_expire_in_deadline_order_and_used_ones_are_rearmed() {
        let g = Ipv4Addr::new(192, 168, 30, 10);
        let t = Duration::from_secs(10);
        let t0 = Instant::from_secs(1);
        let mut tab = SessionTable::new();
        let a = tab.insert(session(1, 1, g, t0), t0 + t);
        let b = tab.insert(session(2, 2, g, t0), t0 + t);
        assert!(
            tab.full(std::net::IpAddr::from(g), 3, 2)
                && !tab.full(std::net::IpAddr::from(g), 3, 3)
                && tab.full(std::net::IpAddr::from(g), 2, 3)
        );
        tab.get_mut(a).unwrap().info.last_used = t0 + Duration::from_secs(5);
        assert_eq!(tab.next_expired(t0 + t, t), Some(b));
        tab.remove(b);
        assert_eq!(tab.next_expired(t0 + t, t), None);
        assert_eq!(tab.next_deadline(), Some(t0 + Duration::from_secs(15)));
        // The freed slot is reused; the stale timer entry of its old session is skipped.
        let c = tab.insert(session(3, 3, g, t0 + t), t0 + t + t);
        assert_eq!(c, b);
        assert_eq!(tab.slot_of_sock(3), Some(c));
        assert_eq!(tab.next_expired(t0 + t + t, t), Some(a));
        tab.remove(a);
        assert_eq!(tab.next_expired(t0 + t + t, t), Some(c));
        tab.remove(c);
        assert!(tab.is_empty() && !tab.full(std::net::IpAddr::from(g), 1, 1));
    }
}
