//! hubnat-daemon: the operator's side of `hubnat run`: the core's events in the seed's words,
//! the security-log writer and the reverse lookups it names hosts with.

pub mod events;
pub mod reverse;
pub mod seclog;
