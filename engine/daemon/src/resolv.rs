//! resolv.conf watched with inotify, so that the DNS relay follows the machine's resolvers
//! (`[dns] upstream` unset) without a reload: a VPN or DHCP client on the machine changes them
//! at any time.
//!
//! Three watches, because resolv.conf changes in three ways: rewritten in place (the file's own
//! watch; it also sees a file bind-mounted over the path, as `ip netns exec` does with
//! /etc/netns/NAME/resolv.conf, whose directory is not the path's), replaced by a rename or
//! re-created (its directory's watch: the new file is a new inode the old watch does not see),
//! or a symlink whose target is replaced (the target's directory). The file's watch is made
//! again after each change, for the new inode. The descriptor is made before the system-call
//! filter is installed (`inotify_init1`); `inotify_add_watch` is allowed after it.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// The file the machine's resolvers are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Events read at most per call: a burst beyond it is one change anyway.
const MAX_READS: usize = 64;

/// resolv.conf's watches.
pub struct ResolvWatch {
    inotify: Inotify,
    path: PathBuf,
    /// Directory watches, each with the file name in it that matters.
    dirs: Vec<(WatchDescriptor, OsString)>,
    file: Option<WatchDescriptor>,
}

fn dir_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ONLYDIR
}

/// Not IN_MODIFY: a file rewritten in place is empty between its truncation and its write,
/// and the relay would be left without upstreams for that moment; it is read once closed.
fn file_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

impl ResolvWatch {
    /// Watches `path` (its directory must exist; the file need not yet).
    pub fn open(path: &Path) -> io::Result<ResolvWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut w = ResolvWatch {
            inotify,
            path: path.to_owned(),
            dirs: Vec::new(),
            file: None,
        };
        let mut targets = vec![path.to_owned()];
        if let Ok(real) = std::fs::canonicalize(path) {
            if real != path {
                targets.push(real);
            }
        }
        for t in targets {
            let (Some(dir), Some(name)) = (t.parent(), t.file_name()) else {
                continue;
            };
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let wd = w.inotify.add_watch(dir, dir_flags())?;
            w.dirs.push((wd, name.to_owned()));
        }
        w.watch_file();
        Ok(w)
    }

    /// The inotify descriptor, to be polled for reading.
    pub fn fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }

    /// The path watched.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn watch_file(&mut self) {
        // Absent for a moment while it is replaced: the directory's watch then sees it come.
        self.file = self.inotify.add_watch(&self.path, file_flags()).ok();
    }

    /// Reads the events waiting; whether any of them may have changed the file.
    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        for _ in 0..MAX_READS {
            let Ok(events) = self.inotify.read_events() else {
                break;
            };
            if events.is_empty() {
                break;
            }
            for ev in events {
                let in_dir = || {
                    self.dirs
                        .iter()
                        .any(|(wd, name)| *wd == ev.wd && ev.name.as_ref() == Some(name))
                };
                // A file just created is still empty: its IN_CLOSE_WRITE follows. A symlink
                // made (`ln -sf`) is whole at once.
                let half_made = ev.mask.contains(AddWatchFlags::IN_CREATE)
                    && std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_file());
                changed |= Some(ev.wd) == self.file
                    || ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                    || (in_dir() && !half_made);
            }
        }
        if changed {
            self.watch_file();
        }
        changed
    }

    /// The IPv4 nameservers the file names now (the relay's sockets are IPv4).
    pub fn nameservers(&self) -> Vec<SocketAddr> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        hubnat_core::config::resolv_conf_nameservers(&text)
            .into_iter()
            .filter(SocketAddr::is_ipv4)
            .collect()
    }
}

/// The log's form of an upstream list: `[10.0.0.1:53, 10.0.0.2:53]`.
pub fn show(list: &[SocketAddr]) -> String {
    let v: Vec<String> = list.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Waits (up to a second) for `w` to report a change.
    fn sees_change(w: &mut ResolvWatch) -> bool {
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if w.changed() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn replaced_rewritten_and_removed_files_are_seen() {
        let dir =
            TempDir(std::env::temp_dir().join(format!("hubnat-resolv-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.1\n").unwrap();
        let mut w = ResolvWatch::open(&path).unwrap();
        assert!(!w.changed());
        assert_eq!(show(&w.nameservers()), "[10.0.0.1:53]");

        // Replaced by a rename, as resolvconf and NetworkManager do.
        let tmp = dir.0.join("resolv.conf.new");
        std::fs::write(&tmp, "nameserver 10.0.0.2\nnameserver ::1\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(sees_change(&mut w));
        assert_eq!(show(&w.nameservers()), "[10.0.0.2:53]");

        // Rewritten in place (the new inode is watched now).
        std::fs::write(&path, "nameserver 10.0.0.3\n").unwrap();
        assert!(sees_change(&mut w));
        assert_eq!(show(&w.nameservers()), "[10.0.0.3:53]");

        // Another file of the directory is no change.
        std::fs::write(dir.0.join("other"), "x").unwrap();
        assert!(!sees_change(&mut w));

        // Removed, then made again.
        std::fs::remove_file(&path).unwrap();
        assert!(sees_change(&mut w));
        assert!(w.nameservers().is_empty());
        std::fs::write(&path, "nameserver 10.0.0.4\n").unwrap();
        assert!(sees_change(&mut w));
        assert_eq!(show(&w.nameservers()), "[10.0.0.4:53]");
    }

    #[test]
    fn a_symlinks_target_replaced_elsewhere_is_seen() {
        let dir =
            TempDir(std::env::temp_dir().join(format!("hubnat-resolvl-{}", std::process::id())));
        let (etc, run) = (dir.0.join("etc"), dir.0.join("run"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let target = run.join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 10.0.0.1\n").unwrap();
        let path = etc.join("resolv.conf");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let mut w = ResolvWatch::open(&path).unwrap();
        let tmp = run.join("stub.tmp");
        std::fs::write(&tmp, "nameserver 10.0.0.9\n").unwrap();
        std::fs::rename(&tmp, &target).unwrap();
        assert!(sees_change(&mut w));
        assert_eq!(show(&w.nameservers()), "[10.0.0.9:53]");
    }
}
