//! What the daemon reads from the machine for the core: the configuration file, and the facts a
//! configuration defaults to (the DNS domain and resolvers of /etc/resolv.conf, the host name).

use std::path::Path;
use std::sync::OnceLock;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use hubnat_core::config::{resolv_conf_domain, resolv_conf_nameservers, ConfigError, Machine};
use hubnat_core::config::{Config, RawConfig};

/// Reads the machine's facts now (each validation reads them again, so a changed resolv.conf
/// is seen at the next reload).
pub fn read_machine() -> Machine {
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let domain = resolv_conf_domain(&resolv).or_else(|| {
        // Else the part after the first dot of the host name.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
        let (_, domain) = host.trim().split_once('.')?;
        (!domain.is_empty()).then(|| domain.to_owned())
    });
    Machine {
        domain,
        nameservers: resolv_conf_nameservers(&resolv),
        socket_budget: SOCKET_BUDGET.get().copied(),
    }
}

/// Set once at start by `raise_open_files`.
static SOCKET_BUDGET: OnceLock<usize> = OnceLock::new();

/// Descriptors kept for hubnat itself, not for sessions: the control socket and its
/// connections, the metrics endpoint, logs, the lease and configuration files, and per thread
/// its TAP queue, poll, waker and rings.
pub fn fd_reserve(threads: usize) -> usize {
    96 + 8 * threads
}

/// Raises the soft limit of open files to the hard limit (a NAT holds a socket per session;
/// the usual soft limit of 1024 would let one guest's flows use them all), and records how many
/// of them sessions may use: the limit less `fd_reserve(threads)`. Returns (limit, budget).
pub fn raise_open_files(threads: usize) -> (u64, usize) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let limit = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let budget = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(fd_reserve(threads));
    let _ = SOCKET_BUDGET.set(budget);
    (limit, budget)
}

/// Reads a configuration file without validating it (`validate` does that).
pub fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    RawConfig::from_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Validates `raw` on this machine.
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigError> {
    Config::from_raw_on(raw, &read_machine())
}
