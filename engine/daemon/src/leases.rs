//! The lease table on disk, so that a restart (or a crash) loses no lease and never gives an
//! address twice.
//!
//! The file is JSON with wall-clock times (milliseconds since the Unix epoch), written through
//! `state::write_atomically` (temporary file, fsync, rename, fsync of the directory): a crash
//! leaves the old table or the new one, never half of one. The runtime saves it whenever the
//! table changed, before the frames of that batch (the DHCP ACK among them) go out, so a client
//! never holds a lease the file does not. A file that cannot be read as a lease table is not
//! emptied: it is renamed aside (`leases.json.corrupt-SECONDS`) and reported.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::write_atomically;
use hubnat_core::config::Mac;
use hubnat_core::time::Instant;
use hubnat_core::vhost::dhcp::Lease;

pub const LEASE_FILE: &str = "leases.json";
const VERSION: u32 = 1;

/// Maps the core's `Instant`s onto the wall clock: `Instant::ZERO` is `origin`.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    pub origin: SystemTime,
}

impl WallClock {
    pub fn wall(&self, t: Instant) -> SystemTime {
        self.origin + Duration::from_micros(t.as_micros())
    }

    /// The `Instant` of a wall-clock time (times before the origin become the origin).
    pub fn instant(&self, w: SystemTime) -> Instant {
        let d = w.duration_since(self.origin).unwrap_or_default();
        Instant::ZERO + d
    }
}

pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    saved_at: u64,
    leases: Vec<SavedLease>,
}

#[derive(Serialize, Deserialize)]
struct SavedLease {
    id: u32,
    mac: String,
    ip: Ipv4Addr,
    host_name: String,
    /// Unix milliseconds.
    leased_at: u64,
    expires_at: u64,
}

/// The file's bytes for a lease table.
pub fn encode<'a>(leases: impl Iterator<Item = &'a Lease>, clock: &WallClock) -> Vec<u8> {
    let file = LeaseFile {
        version: VERSION,
        saved_at: unix_millis(SystemTime::now()),
        leases: leases
            .map(|l| SavedLease {
                id: l.id,
                mac: l.mac.to_string(),
                ip: l.ip,
                host_name: l.host_name.clone(),
                leased_at: unix_millis(clock.wall(l.leased_at)),
                expires_at: unix_millis(clock.wall(l.expires_at)),
            })
            .collect(),
    };
    let mut v = serde_json::to_vec_pretty(&file).expect("a lease table serializes");
    v.push(b'\n');
    v
}

/// Parses the file's bytes; the error says what is wrong.
pub fn decode(bytes: &[u8], clock: &WallClock) -> Result<Vec<Lease>, String> {
    let file: LeaseFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != VERSION {
        return Err(format!("unknown version {}", file.version));
    }
    file.leases
        .into_iter()
        .map(|s| {
            let mac: Mac = s
                .mac
                .parse()
                .map_err(|_| format!("lease {}: `{}` is not a MAC address", s.id, s.mac))?;
            let at = |ms: u64| clock.instant(UNIX_EPOCH + Duration::from_millis(ms));
            Ok(Lease {
                id: s.id,
                leased_at: at(s.leased_at),
                expires_at: at(s.expires_at),
                mac,
                ip: s.ip,
                host_name: s.host_name,
            })
        })
        .collect()
}

pub fn save<'a>(
    path: &Path,
    leases: impl Iterator<Item = &'a Lease>,
    clock: &WallClock,
) -> io::Result<()> {
    write_atomically(path, &encode(leases, clock))
}

/// What was found at start.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet.
    Missing,
    Leases(Vec<Lease>),
    /// The file was unreadable as a lease table; it was moved to `moved_to`.
    Corrupt {
        reason: String,
        moved_to: PathBuf,
    },
}

pub fn load(path: &Path, clock: &WallClock) -> io::Result<Loaded> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    match decode(&bytes, clock) {
        Ok(leases) => Ok(Loaded::Leases(leases)),
        Err(reason) => {
            let secs = unix_millis(SystemTime::now()) / 1000;
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".corrupt-{secs}"));
            let moved_to = PathBuf::from(name);
            std::fs::rename(path, &moved_to)?;
            Ok(Loaded::Corrupt { reason, moved_to })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: u32, ip: [u8; 4], secs: u64) -> Lease {
        Lease {
            id,
            leased_at: Instant::from_secs(secs),
            expires_at: Instant::from_secs(secs + 7200),
            mac: Mac([0x02, 0, 0, 0, 0, id as u8]),
            ip: Ipv4Addr::from(ip),
            host_name: format!("guest-{id}"),
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hubnat-leases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_table_survives_a_restart_at_a_later_origin() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let first = WallClock { origin: t0 };
        let leases = [
            lease(1, [192, 168, 30, 10], 5),
            lease(7, [192, 168, 30, 11], 100),
        ];
        let d = dir("restart");
        let path = d.join(LEASE_FILE);
        save(&path, leases.iter(), &first).unwrap();
        // The next run started 50 s after the first one.
        let second = WallClock {
            origin: t0 + Duration::from_secs(50),
        };
        let Loaded::Leases(back) = load(&path, &second).unwrap() else {
            panic!("expected leases")
        };
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].id, 7);
        assert_eq!(back[1].mac, leases[1].mac);
        assert_eq!(back[1].ip, leases[1].ip);
        assert_eq!(back[1].host_name, "guest-7");
        assert_eq!(back[1].leased_at, Instant::from_secs(50));
        assert_eq!(back[1].expires_at, Instant::from_secs(100 + 7200 - 50));
        // Before the origin: clamped to it.
        assert_eq!(back[0].leased_at, Instant::ZERO);
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_and_corrupt_files() {
        let clock = WallClock {
            origin: SystemTime::now(),
        };
        let d = dir("corrupt");
        let path = d.join(LEASE_FILE);
        assert!(matches!(load(&path, &clock).unwrap(), Loaded::Missing));
        std::fs::create_dir_all(&d).unwrap();
        for bad in [
            &b"{ not json"[..],
            br#"{"version": 9, "saved_at": 0, "leases": []}"#,
            br#"{"version": 1, "saved_at": 0, "leases": [{"id": 1, "mac": "zz", "ip": "192.168.30.10", "host_name": "", "leased_at": 0, "expires_at": 0}]}"#,
            b"",
        ] {
            std::fs::write(&path, bad).unwrap();
            match load(&path, &clock).unwrap() {
                Loaded::Corrupt { reason, moved_to } => {
                    assert!(!reason.is_empty());
                    assert!(!path.exists(), "the corrupt file is moved aside");
                    assert_eq!(std::fs::read(&moved_to).unwrap(), bad, "and kept as it was");
                    std::fs::remove_file(moved_to).unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
