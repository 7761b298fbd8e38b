//! The operator's side of the control thread: the management API, metrics, the lease file.

pub mod api;
pub mod leases;
pub mod metrics;
pub mod state;
