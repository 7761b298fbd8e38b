//! Reverse lookups (address → host name) off the data path.
//!
//! `getnameinfo` blocks for as long as the system's resolver takes, so it runs on a thread of its
//! own fed through a bounded queue: a caller never waits, and when the queue is full it is told
//! so at once and goes on without the name. Answers (names and failures alike) are cached for a
//! while, in a table of bounded size.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// How long an answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(600);
/// Most answers kept; the cache is emptied when it is full (simple, and bounded).
pub const CACHE_MAX: usize = 4096;

/// The host name registered for `ip` in the system's resolver (hosts file, DNS, ...), or `None`
/// when it has none. Blocks.
pub fn reverse_lookup(ip: IpAddr) -> Option<String> {
    // NI_NUMERICSERV: the port (0) is not looked up in the services database.
    let flags = libc::NI_NAMEREQD | libc::NI_NUMERICSERV;
    let (host, _service) = dns_lookup::getnameinfo(&SocketAddr::new(ip, 0), flags).ok()?;
    (!host.is_empty()).then_some(host)
}

/// A background thread answering lookups; each answer goes to the callback given at spawn with
/// the token that came with the request.
pub struct Resolver<T> {
    tx: SyncSender<(IpAddr, T)>,
}

impl<T: Send + 'static> Resolver<T> {
    /// `queue` bounds the requests waiting; `lookup` is `reverse_lookup` (tests pass their own).
    pub fn spawn(
        queue: usize,
        lookup: fn(IpAddr) -> Option<String>,
        mut done: impl FnMut(IpAddr, Option<String>, T) + Send + 'static,
    ) -> io::Result<Resolver<T>> {
        let (tx, rx) = sync_channel::<(IpAddr, T)>(queue);
        std::thread::Builder::new()
            .name("hubnat-resolve".into())
            .spawn(move || {
                let mut cache: HashMap<IpAddr, (Option<String>, Instant)> = HashMap::new();
                for (ip, token) in rx {
                    let now = Instant::now();
                    let name = match cache.get(&ip) {
                        Some((name, at)) if now.duration_since(*at) < CACHE_TTL => name.clone(),
                        _ => {
                            let name = lookup(ip);
                            if cache.len() >= CACHE_MAX {
                                cache.clear();
                            }
                            cache.insert(ip, (name.clone(), Instant::now()));
                            name
                        }
                    };
                    done(ip, name, token);
                }
            })?;
        Ok(Resolver { tx })
    }

    /// Queues a lookup; gives the token back at once when the queue is full or the thread gone.
    pub fn submit(&self, ip: IpAddr, token: T) -> Result<(), T> {
        match self.tx.try_send((ip, token)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full((_, t))) | Err(TrySendError::Disconnected((_, t))) => Err(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::mpsc::channel;

    fn fake(ip: IpAddr) -> Option<String> {
        if ip == IpAddr::from([10, 0, 0, 9]) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let last = match ip {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(v6) => v6.octets()[15],
        };
        (last != 0).then(|| format!("host-{last}"))
    }

    #[test]
    fn loopback_has_a_name() {
        // /etc/hosts names 127.0.0.1 on every system the tests run on; no DNS is asked.
        assert!(reverse_lookup(Ipv4Addr::LOCALHOST.into()).is_some());
    }

    #[test]
    fn answers_come_back_with_their_token_and_a_full_queue_refuses_at_once() {
        let (tx, rx) = channel();
        let r = Resolver::spawn(1, fake, move |ip, name, tok: u32| {
            tx.send((ip, name, tok)).unwrap();
        })
        .unwrap();
        r.submit(Ipv4Addr::new(10, 0, 0, 9).into(), 1).unwrap(); // slow: the thread is busy with it
        std::thread::sleep(Duration::from_millis(50));
        r.submit(Ipv4Addr::new(10, 0, 0, 0).into(), 2).unwrap(); // fills the queue of one
        let start = Instant::now();
        assert_eq!(r.submit(Ipv4Addr::new(10, 0, 0, 3).into(), 3), Err(3));
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "submit must not wait"
        );
        let a = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!(a, (IpAddr::from([10, 0, 0, 9]), Some("host-9".into()), 1));
        let b = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!(b, (IpAddr::from([10, 0, 0, 0]), None, 2));
        // Cached: the slow address answers at once the second time.
        r.submit(Ipv4Addr::new(10, 0, 0, 9).into(), 4).unwrap();
        let c = rx.recv_timeout(Duration::from_millis(100)).unwrap();
        assert_eq!(c.2, 4);
    }
}
