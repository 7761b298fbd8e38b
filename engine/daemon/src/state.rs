//! State kept across restarts in the state directory: the virtual host's chosen MAC.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hubnat_core::config::Mac;

const MAC_FILE: &str = "host-mac";

/// The default state directory: /var/lib/hubnat for root, else $XDG_STATE_HOME/hubnat or
/// ~/.local/state/hubnat.
pub fn default_state_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/hubnat");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("hubnat");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/state/hubnat")
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file: a temporary
/// file beside it, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Made at start; once sandboxed hubnat may not make directories (mkdir is not allowed).
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The MAC stored in `dir`, or a new one (00:AC + `random`) stored there for the next start.
/// Returns the MAC and whether it was newly chosen.
pub fn load_or_create_mac(dir: &Path, random: [u8; 4]) -> io::Result<(Mac, bool)> {
    let path = dir.join(MAC_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<Mac>().map(|m| (m, false)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a MAC address", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mac = Mac::random_secure_nat(random);
            write_atomically(&path, format!("{mac}\n").as_bytes())?;
            Ok((mac, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_chosen_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("hubnat-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, new_a) = load_or_create_mac(&dir, [1, 2, 3, 4]).unwrap();
        let (b, new_b) = load_or_create_mac(&dir, [9, 9, 9, 9]).unwrap();
        assert!(new_a && !new_b);
        assert_eq!(a, b);
        assert_eq!(a.0[..2], [0x00, 0xAC]);
        std::fs::write(dir.join(MAC_FILE), "garbage").unwrap();
        assert!(load_or_create_mac(&dir, [0; 4]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
