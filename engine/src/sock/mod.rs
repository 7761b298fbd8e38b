//! Host-socket drivers: real sockets behind the core's `HostIo`.

pub mod mio;
pub mod resolve;
