//! hubnat-daemon: the operator's side of `hubnat run`: the security-log writer and the reverse
//! lookups it names hosts with.

pub mod reverse;
pub mod seclog;
