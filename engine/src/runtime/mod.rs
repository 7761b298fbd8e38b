//! The event loop that drives the core: frames from the port, readiness from the host sockets,
//! and timers, all on one thread with mio (epoll).
//!
//! Each wake-up reads the port until it would block and handles the whole batch before writing
//! the frames it produced, so a burst costs one write pass rather than one per frame.

use std::io;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::hostio::HostEvent;
use crate::output::FrameBatch;
use crate::port::tap::Tap;
use crate::sock::mio::{MioHost, FIRST_RESERVED_TOKEN};
use crate::stats::Drop;
use crate::time::Instant;
use crate::Engine;

const PORT: Token = Token(FIRST_RESERVED_TOKEN);
const STOP: Token = Token(FIRST_RESERVED_TOKEN + 1);

/// Frames read from the port per wake-up before the batch is flushed (bounds latency and the
/// size of the output batch).
const MAX_FRAMES_PER_BATCH: usize = 256;
/// Largest frame the port delivers: the largest MTU plus the Ethernet header and a VLAN tag.
const MAX_FRAME: usize = crate::config::MAX_MTU as usize + 18;

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The stop descriptor became readable (a signal arrived).
    Stopped,
}

/// A monotonic clock mapped onto the core's `Instant`.
pub struct Clock(std::time::Instant);

impl Default for Clock {
    fn default() -> Clock {
        Clock(std::time::Instant::now())
    }
}

impl Clock {
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

pub struct Runtime {
    pub engine: Engine,
    pub host: MioHost,
    poll: Poll,
    tap: Tap,
    stop: UnixStream,
    clock: Clock,
    out: FrameBatch,
    host_events: Vec<HostEvent>,
}

impl Runtime {
    /// `stop` becomes readable when the loop should end (the read end of a signal pipe).
    pub fn new(engine: Engine, tap: Tap, stop: UnixStream) -> io::Result<Runtime> {
        stop.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let host = MioHost::new(poll.registry().try_clone()?);
        poll.registry()
            .register(&mut SourceFd(&tap.as_raw_fd()), PORT, Interest::READABLE)?;
        poll.registry()
            .register(&mut SourceFd(&stop.as_raw_fd()), STOP, Interest::READABLE)?;
        Ok(Runtime {
            engine,
            host,
            poll,
            tap,
            stop,
            clock: Clock::default(),
            out: FrameBatch::new(),
            host_events: Vec::new(),
        })
    }

    /// Runs until the stop descriptor is readable.
    pub fn run(&mut self) -> io::Result<Exit> {
        let mut events = Events::with_capacity(1024);
        let mut frame = vec![0u8; MAX_FRAME];
        self.engine.start(self.clock.now(), &mut self.out);
        self.flush();
        loop {
            let timeout = self.engine.poll_timeout().map(|t| {
                let now = self.clock.now();
                t.saturating_since(now) + Duration::from_micros(if t > now { 100 } else { 0 })
            });
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = self.clock.now();
            let mut stop = false;
            for event in events.iter() {
                match event.token() {
                    PORT => self.read_port(now, &mut frame)?,
                    STOP => stop = true,
                    _ => {
                        self.host_events.clear();
                        self.host.events(event, &mut self.host_events);
                        for ev in self.host_events.drain(..) {
                            self.engine
                                .handle_host_event(now, ev, &mut self.host, &mut self.out);
                        }
                    }
                }
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine
                    .handle_timeout(now, &mut self.host, &mut self.out);
            }
            self.flush();
            if stop {
                self.drain_stop();
                return Ok(Exit::Stopped);
            }
        }
    }

    fn read_port(&mut self, now: crate::Instant, frame: &mut [u8]) -> io::Result<()> {
        // Edge-triggered: read until the device would block, flushing every batch.
        loop {
            for _ in 0..MAX_FRAMES_PER_BATCH {
                match self.tap.recv(frame) {
                    Ok(n) => {
                        self.engine
                            .handle_frame(now, &frame[..n], &mut self.host, &mut self.out)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.flush();
        }
    }

    fn flush(&mut self) {
        for f in self.out.iter() {
            if let Err(e) = self.tap.send(f) {
                // The device's queue is full or the link is down: drop, count, go on.
                self.engine.ctx.stats.drop(Drop::QueueFull);
                tracing::trace!("TAP write failed: {e}");
            }
        }
        self.out.clear();
    }

    fn drain_stop(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.stop).read(&mut buf), Ok(n) if n > 0) {}
    }
}
