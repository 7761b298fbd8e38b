//! The security log lines, in the seed's words (SoftEther manual 3.7.8).
//!
//! Every line goes through `tracing` with target `securenat`, so the runtime can route them to a
//! log file with the seed's timestamps. Their texts live here and nowhere else.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use crate::config::Mac;

pub const TARGET: &str = "securenat";

pub fn dhcp_entry_created(id: u32, mac: Mac, ip: Ipv4Addr, host_name: &str, lease: Duration) {
    tracing::info!(
        target: TARGET,
        "SecureNAT: The DHCP entry {id} was created. MAC address: {}, IP address: {ip}, host name: {host_name}, expiration date: {} seconds",
        mac.dashed(),
        lease.as_secs()
    );
}

pub fn dhcp_entry_deleted(id: u32, mac: Mac, ip: Ipv4Addr) {
    tracing::info!(
        target: TARGET,
        "SecureNAT: The DHCP entry {id} was deleted. MAC address: {}, IP address: {ip}",
        mac.dashed()
    );
}

pub fn dhcp_pool_exhausted(mac: Mac) {
    tracing::warn!(
        target: TARGET,
        "SecureNAT: The DHCP server has no free address for the client {}.",
        mac.dashed()
    );
}

/// `proto` is "TCP" or "UDP" (and "ICMP", "DNS" for the sessions the NAT table also shows).
pub fn session_created(proto: &str, id: u32, src: SocketAddrV4, dst: SocketAddrV4) {
    tracing::info!(
        target: TARGET,
        "SecureNAT: The {proto} session {id} was created. Connection source {src}, Connection destination {dst}"
    );
}

pub fn session_deleted(proto: &str, id: u32) {
    tracing::info!(target: TARGET, "SecureNAT: The {proto} session {id} was deleted.");
}

/// The NAT passes the address as `host_name`; the security log (`control::seclog`) replaces it
/// with the name a reverse lookup finds, off the data path, using the fields `session`, `ip`,
/// `port` and `host_name` of this event.
pub fn tcp_connected(id: u32, host_name: &str, ip: Ipv4Addr, port: u16) {
    tracing::info!(
        target: TARGET,
        event = TCP_CONNECTED,
        session = id,
        ip = %ip,
        port = port,
        host_name = host_name,
        "{}",
        tcp_connected_text(id, host_name, ip, port)
    );
}

/// The `event` field of `tcp_connected`.
pub const TCP_CONNECTED: &str = "tcp_connected";

pub fn tcp_connected_text(id: u32, host_name: &str, ip: Ipv4Addr, port: u16) -> String {
    format!("SecureNAT: The connection to TCP session {id}: Host \"{host_name} ({ip})\", Port {port} was successful.")
}

pub fn tcp_connect_failed(id: u32, ip: Ipv4Addr, port: u16, why: &str) {
    tracing::info!(
        target: TARGET,
        "SecureNAT: The connection to TCP session {id}: Host \"{ip}\", Port {port} failed: {why}."
    );
}
