//! hubnat-core: the sans-IO core of hubnat, a user-mode virtual NAT and virtual DHCP server for a
//! virtual Ethernet segment (SoftEther VPN's SecureNAT, reimplemented).
//!
//! [`Engine`] takes frames, socket events and time, and returns frames (in a [`FrameBatch`])
//! while performing socket operations through a [`SockIo`] the caller provides. This crate does
//! no I/O of its own: no sockets, files, threads or clocks. The runtime (`hubnat-runtime`) drives
//! it with real sockets; the tests and the replay drive it with [`sim::SimSockets`].
//!
//! Two sides, two words: the *virtual host* ([`vhost`]) is the one machine hubnat plays on the
//! segment; the *sock side* ([`sockio`]) is the real machine's sockets through which the NAT
//! carries the guests' traffic.

#![warn(unreachable_pub, missing_docs)]

pub mod config;
mod engine;
pub mod event;
pub mod forward;
pub mod nat;
pub mod output;
pub mod sim;
pub mod sockio;
pub mod stats;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod vhost;
pub mod wire;

pub use config::{Config, ConfigError, Mac, RawConfig};
pub use engine::{Ctx, Engine, Reassembly, SharedSessions};
pub use event::Event;
pub use nat::{Direction, InboundRefused, InboundTarget, Proto};
pub use output::FrameBatch;
pub use sockio::{SockEvent, SockId, SockIo};
pub use stats::{DropReason, Stats};
pub use time::Instant;
pub use vhost::dns::{needs_lease_table, TcpDnsRoute};

/// The hash map of the tables looked up for every frame or socket event (connections, sessions,
/// sockets, per-guest counts). Keyed at random per process, as std's is, so a guest cannot pick
/// keys that all fall in one bucket, but several times cheaper than std's SipHash on these short
/// keys.
pub type FastHashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
