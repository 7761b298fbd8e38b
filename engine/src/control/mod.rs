//! The operator's side: the security log lines (and, later, the management API).

pub mod log;
pub mod seclog;
pub mod state;
