//! systemd's readiness protocol (sd_notify), for a `Type=notify` unit.
//!
//! systemd names a unix datagram socket in `$NOTIFY_SOCKET` and counts the service as started
//! (and starts what is ordered after it) only once the service sends `READY=1` there; a path
//! starting with '@' is a name in the abstract namespace. `STOPPING=1` tells it the service is
//! shutting down of its own accord (a signal), so the stop is not mistaken for a crash.
//!
//! The socket is connected when hubnat starts, while it is still root and unconfined: once in
//! the sandbox it may not reach systemd's socket by path (Landlock), and a connected socket
//! needs nothing but `sendto`, which the system-call filter allows.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why the notification socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{NOTIFY_SOCKET}={0}: neither a socket path nor an abstract name (@NAME)")]
    Unsupported(String),
    #[error("{NOTIFY_SOCKET}={addr}: {error}")]
    Io { addr: String, error: io::Error },
}

/// A datagram socket connected to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: String,
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names, connected; None when it is unset or empty (hubnat was
    /// not started by a `Type=notify` unit).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::connect(&v.to_string_lossy()).map(Some),
        }
    }

    /// Connects to `addr`: a path, or `@NAME` for an abstract socket.
    pub fn connect(addr: &str) -> Result<Notifier, NotifyError> {
        let io_err = |error| NotifyError::Io {
            addr: addr.to_owned(),
            error,
        };
        let target = match addr.as_bytes() {
            [b'/', ..] => SocketAddr::from_pathname(addr).map_err(io_err)?,
            [b'@', name @ ..] => SocketAddr::from_abstract_name(name).map_err(io_err)?,
            // systemd also knows vsock addresses (a VM's manager); hubnat has no use for them.
            _ => return Err(NotifyError::Unsupported(addr.to_owned())),
        };
        let sock = UnixDatagram::unbound().map_err(io_err)?;
        sock.connect_addr(&target).map_err(io_err)?;
        Ok(Notifier {
            sock,
            addr: addr.to_owned(),
        })
    }

    /// Sends one message of newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let n = self.sock.send(state.as_bytes())?;
        if n != state.len() {
            return Err(io::Error::other("notification truncated"));
        }
        Ok(())
    }

    /// `READY=1` with a one-line status shown by `systemctl status`; a failure is logged, not
    /// fatal (systemd then times the start out, which says more than hubnat could).
    pub fn ready(&self, status: &str) {
        self.send_logged(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STOPPING=1`: shutting down on request.
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1\nSTATUS=stopping");
    }

    fn send_logged(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!("cannot notify systemd at {}: {e}", self.addr);
        }
    }

    /// Where the notifications go, as `$NOTIFY_SOCKET` said.
    pub fn address(&self) -> &str {
        &self.addr
    }
}

/// A STATUS value must not break the message's lines.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// A directory removed when the test ends, passed or not.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_path_socket_gets_ready_and_stopping() {
        let dir =
            TempDir(std::env::temp_dir().join(format!("hubnat-notify-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("notify");
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.ready("serving tap0\nand more");
        assert_eq!(receive(&systemd), "READY=1\nSTATUS=serving tap0 and more");
        n.stopping();
        assert_eq!(receive(&systemd), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn an_abstract_name_starts_with_at() {
        let name = format!("hubnat-notify-test-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.send("READY=1").unwrap();
        assert_eq!(receive(&systemd), "READY=1");
    }

    #[test]
    fn other_addresses_are_refused_with_the_variable_named() {
        let e = Notifier::connect("vsock:2:1234").unwrap_err();
        assert!(e.to_string().contains("NOTIFY_SOCKET=vsock:2:1234"), "{e}");
        let e = Notifier::connect("/nonexistent/hubnat/notify").unwrap_err();
        assert!(
            e.to_string().starts_with("NOTIFY_SOCKET=/nonexistent"),
            "{e}"
        );
    }
}
