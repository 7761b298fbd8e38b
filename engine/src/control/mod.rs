//! The operator's side: the security log lines (and, later, the management API).

pub mod api;
pub mod leases;
pub mod log;
pub mod metrics;
pub mod seclog;
pub mod state;
