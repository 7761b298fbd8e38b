//! Host-socket drivers: real sockets behind the core's `SockIo`.

pub(crate) mod addr;
pub(crate) mod dns_tcp;
pub mod driver;
pub mod forward;
pub mod uring;

use std::str::FromStr;

/// Where the host-socket driver gets readiness from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// One io_uring per worker thread (multishot polls, batched submission).
    Uring,
    /// epoll through mio.
    Epoll,
}

/// `--socket-backend`: a backend, or `auto` (io_uring where the kernel allows it, else mio).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BackendChoice {
    Uring,
    Epoll,
    Auto,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<BackendChoice, String> {
        match s {
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            "mio" | "epoll" => Ok(BackendChoice::Epoll),
            "auto" => Ok(BackendChoice::Auto),
            _ => Err(format!("`{s}`: choose uring, mio or auto")),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "mio (epoll)",
        }
    }

    /// Decides the backend: `uring` must work; `auto` takes io_uring if a ring can be set up
    /// and knows the operations used, else mio, with the reason.
    pub fn choose(choice: BackendChoice) -> Result<(Backend, Option<String>), String> {
        match choice {
            BackendChoice::Epoll => Ok((Backend::Epoll, None)),
            BackendChoice::Uring => match uring::probe() {
                Ok(()) => Ok((Backend::Uring, None)),
                Err(e) => Err(format!("io_uring is not available here: {e}")),
            },
            BackendChoice::Auto => match uring::probe() {
                Ok(()) => Ok((Backend::Uring, None)),
                Err(e) => Ok((Backend::Epoll, Some(format!("io_uring unavailable ({e})")))),
            },
        }
    }
}
