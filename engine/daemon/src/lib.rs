//! hubnat-daemon: the operator's side of `hubnat run`.
//!
//! - `server`: the runtime's `Operator`: control socket, metrics endpoint, SIGHUP, lease file;
//! - `api`: the management API (requests, answers, applying a configuration change);
//! - `metrics`: the Prometheus text;
//! - `events`: the core's events in the seed's words, logged (`TracingSink`);
//! - `leases`, `state`: the lease file and the state directory (atomic writes);
//! - `seclog`, `reverse`: the security-log writer and the reverse lookups it names hosts with;
//! - `stream`: the events streamed to control-socket clients (`hubnat events`);
//! - `sandbox`: least privilege once started (user, capabilities, Landlock, seccomp);
//! - `machine`: the configuration file and the machine facts it defaults to (hosts file too);
//! - `resolv`: resolv.conf watched, for the DNS relay's upstreams;
//! - `notify`: readiness for systemd (`Type=notify`).

pub mod api;
pub mod events;
pub mod leases;
pub mod machine;
pub mod metrics;
pub mod notify;
pub mod resolv;
pub mod reverse;
pub mod sandbox;
pub mod seclog;
pub mod server;
pub mod state;
pub mod stream;
