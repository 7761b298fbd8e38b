//! hubnat-runtime: the threads that drive hubnat's sans-IO core with real I/O.
//!
//! The control thread (`control`) reads the frame port, keeps the control plane (ARP, DHCP,
//! the DNS relay, ICMP to the virtual host, fragments, timers) and serves the operator; the
//! workers (`worker`) each own the NAT flows the router (`worker::Router`) hashes to them, with
//! their own host-socket driver (`sock`). Frames reach the segment through a port (`port`).

pub mod control;
pub mod events;
pub mod limits;
pub mod operator;
pub mod port;
pub mod sock;
pub mod tx;
pub mod worker;

pub use control::{bind_control, Exit, Options, Runtime};
