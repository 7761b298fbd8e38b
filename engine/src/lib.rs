//! hubnat-engine: a user-mode virtual NAT and virtual DHCP server for a virtual Ethernet segment
//! (SoftEther's SecureNAT, reimplemented).
//!
//! The protocol logic is sans-IO: [`Engine`] takes frames, host-socket events and time, and
//! returns frames (in a [`FrameBatch`]) while performing socket operations through a [`HostIo`]
//! the caller provides. The port and socket drivers that do real I/O live in `port` and `sock`.

pub mod config;
pub mod control;
mod engine;
pub mod host;
pub mod hostio;
pub mod nat;
pub mod output;
pub mod port;
pub mod replay;
pub mod runtime;
pub mod sim;
pub mod sock;
pub mod stats;
pub mod time;
pub mod wire;

pub use config::{Config, Mac};
pub use engine::{Ctx, Engine, Reassembly, SharedLimits};
pub use hostio::{HostEvent, HostIo, SockId};
pub use output::FrameBatch;
pub use stats::Stats;
pub use time::Instant;
