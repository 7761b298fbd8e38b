//! What the daemon reads from the machine for the core: the configuration file, and the facts a
//! configuration defaults to (the DNS domain and resolvers of /etc/resolv.conf, the host name).

use std::path::Path;

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
    }
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
