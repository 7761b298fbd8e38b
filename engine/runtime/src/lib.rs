//! hubnat-runtime: the threads that drive hubnat's sans-IO core with real I/O.
//!
//! - `control_thread`: the control thread's loop (the port, the control plane, timers, the operator);
//! - `worker`: a worker thread's loop (the NAT flows hashed to it);
//! - `router`: which thread owns a frame (the symmetric flow hash);
//! - `queues`, `pool`: the bounded lock-free queues between threads and their frame buffers;
//! - `tx`: frames out to the TAP, with its NAPI polls switched by load;
//! - `sock`: the host-socket drivers (io_uring readiness and completions, or epoll);
//! - `port`: the frame ports (TAP, AF_PACKET);
//! - `operator`: the hook through which the daemon serves operators on the control thread;
//! - `capture`: the segment's frames written to a pcap file, off the data path;
//! - `events`: where each thread drains its engine's events; `limits`: the session ids and
//!   limits the engines of one runtime share.

pub mod capture;
mod clock;
pub mod control_thread;
pub mod events;
pub mod limits;
pub mod operator;
pub mod pool;
pub mod port;
pub mod queues;
pub mod router;
pub mod sock;
pub mod tokens;
pub mod tx;
pub mod worker;

pub use control_thread::{Exit, Options, Runtime};
pub use operator::{Operator, Plane};
pub use worker::WorkerReport;
