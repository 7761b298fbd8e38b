//! What the daemon reads from the machine for the core: the configuration file, and the facts a
//! configuration defaults to (the DNS domain and resolvers of /etc/resolv.conf, the host name).

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use hubnat_core::config::{resolv_conf_domain, resolv_conf_nameservers, ConfigError, Machine};
use hubnat_core::config::{Config, RawConfig};

/// Reads the machine's facts now (each validation reads them again, so a changed resolv.conf
/// is seen at the next reload).
pub fn read_machine() -> Machine {
    let resolv = std::fs::read_to_string(crate::resolv::RESOLV_CONF).unwrap_or_default();
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
        hosts_file: Vec::new(),
    }
}

/// Set once at start by `raise_open_files`.
static SOCKET_BUDGET: OnceLock<usize> = OnceLock::new();

/// Descriptors kept for hubnat itself, not for sessions: the control socket and its
/// connections, the metrics endpoint, logs, the lease and configuration files, and per thread
/// its TAP queue, poll, waker and rings, and its socket driver's spare TCP sockets.
pub fn fd_reserve(threads: usize) -> usize {
    96 + (8 + 2 * hubnat_runtime::sock::driver::SPARE_TCP) * threads
}

/// Raises the soft limit of open files to the hard limit (a NAT holds a socket per session;
/// the usual soft limit of 1024 would let one guest's flows use them all), and records how many
/// of them sessions may use: the limit less `fd_reserve(threads)`. Returns (limit, budget).
pub fn raise_open_files(threads: usize) -> (u64, usize) {
    let limit = raise_open_files_limit();
    let budget = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(fd_reserve(threads));
    let _ = SOCKET_BUDGET.set(budget);
    (limit, budget)
}

/// Raises the soft limit of open files to the hard limit where it is lower; the soft limit in
/// force afterwards (1024 if it cannot be read).
pub fn raise_open_files_limit() -> u64 {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    }
}

/// Reads a configuration file without validating it (`validate` does that).
pub fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    RawConfig::from_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Validates `raw` on this machine (its hosts file read now).
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigError> {
    let mut machine = read_machine();
    if let Some(path) = raw.dns.hosts_file.as_deref().map(str::trim) {
        if !path.is_empty() {
            machine.hosts_file = hosts_file(Path::new(path))?;
        }
    }
    Config::from_raw_on(raw, &machine)
}

/// The largest hosts file read: a file far beyond `MAX_HOSTS` lines is a mistake, and would
/// otherwise be read whole into memory.
pub const MAX_HOSTS_FILE: u64 = 4 << 20;

/// The last hosts file read successfully. Validation runs from several places (start, reload,
/// the control socket), and the one before a failing read is what a reload keeps.
static LAST_HOSTS: Mutex<Option<(PathBuf, HostNames)>> = Mutex::new(None);

/// A hosts file's names, in its order.
pub type HostNames = Vec<(String, Ipv4Addr)>;

/// The names of the hosts file `path`. A file that cannot be read is an error, unless the same
/// file was read before: then (a reload) the names read last time are kept, with a warning.
fn hosts_file(path: &Path) -> Result<HostNames, ConfigError> {
    let mut last = LAST_HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    match read_hosts_file(path) {
        Ok(names) => {
            *last = Some((path.to_owned(), names.clone()));
            Ok(names)
        }
        Err(e) => match &*last {
            Some((p, names)) if p == path => {
                tracing::warn!("{e}; keeping the {} names read before", names.len());
                Ok(names.clone())
            }
            _ => Err(e),
        },
    }
}

/// Reads and parses a hosts file; every error names it.
pub fn read_hosts_file(path: &Path) -> Result<HostNames, ConfigError> {
    let failed = |message: String| ConfigError::Field {
        field: "dns.hosts_file",
        message: format!("{}: {message}", path.display()),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_HOSTS_FILE + 1).read_to_string(&mut text))
        .map_err(|e| failed(e.to_string()))?;
    if text.len() as u64 > MAX_HOSTS_FILE {
        return Err(failed(format!("larger than {MAX_HOSTS_FILE} bytes")));
    }
    parse_hosts(&text).map_err(failed)
}

/// hosts(5): an address, then one or more names, per line; `#` starts a comment. IPv6 lines and
/// names that are no host names are skipped (a system's file has both), at most
/// `MAX_HOSTS` names are taken.
pub fn parse_hosts(text: &str) -> Result<HostNames, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<Ipv4Addr>) else {
            continue;
        };
        for name in words.filter_map(hubnat_core::vhost::names::normalize) {
            if out.len() == hubnat_core::vhost::names::MAX_HOSTS {
                return Err(format!(
                    "more than {} names",
                    hubnat_core::vhost::names::MAX_HOSTS
                ));
            }
            out.push((name, ip));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_parse_ipv4_lines_only() {
        let text = "# the machine's names\n\
                    127.0.0.1\tlocalhost\n\
                    ::1 localhost ip6-localhost\n\
                    192.168.30.40  printer.lan printer  # the one upstairs\n\
                    192.168.30.41 bad_name nas.\n\
                    300.1.1.1 broken\n\
                    \n\
                    10.0.0.1\n";
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            parse_hosts(text).unwrap(),
            vec![
                ("localhost".into(), ip("127.0.0.1")),
                ("printer.lan".into(), ip("192.168.30.40")),
                ("printer".into(), ip("192.168.30.40")),
                ("nas".into(), ip("192.168.30.41")),
            ]
        );
        let many = "10.0.0.1 a\n".repeat(hubnat_core::vhost::names::MAX_HOSTS + 1);
        assert!(parse_hosts(&many).unwrap_err().contains("more than"));
    }

    #[test]
    fn an_unreadable_hosts_file_is_an_error_then_a_warning() {
        let dir = std::env::temp_dir().join(format!("hubnat-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        let mut raw = RawConfig::default();
        raw.dns.hosts_file = Some(path.display().to_string());
        // Never read: an error that names the file.
        let e = validate(&raw).unwrap_err().to_string();
        assert!(
            e.contains("dns.hosts_file") && e.contains(&*path.to_string_lossy()),
            "{e}"
        );
        std::fs::write(&path, "192.168.30.40 printer\n").unwrap();
        let c = validate(&raw).unwrap();
        let want = vec![("printer".to_owned(), Ipv4Addr::new(192, 168, 30, 40))];
        assert_eq!(c.dns.hosts_from_file, want);
        // Gone at a reload: the names read before are kept.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(validate(&raw).unwrap().dns.hosts_from_file, want);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
