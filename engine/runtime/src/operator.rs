//! The operator's hook into the control thread.
//!
//! The runtime knows nothing of control sockets, metrics, configuration files or lease files:
//! the daemon plugs them in as an `Operator`. Its sources (listeners, connections, a reload
//! signal) are registered with the control thread's poll under tokens from
//! `tokens::FIRST_OPERATOR_TOKEN` up, and it is called on that thread between batches with the
//! engine at hand (`Plane`), so nothing is locked and no request races a frame.

use std::io;
use std::sync::mpsc;

use mio::{Registry, Token};

use std::sync::Arc;

use crate::control_thread::{add_port, remove_port, Workers};
use crate::port::link::Link;
use crate::port::switch::{PortId, PortView, Switch, SwitchError};
use crate::sock::driver::SockDriver;
use crate::worker::WorkerReport;
use hubnat_core::output::FrameBatch;
use hubnat_core::time::Instant;
use hubnat_core::Engine;

/// The operator's side of the control thread.
pub trait Operator: Send {
    /// Registers its event sources with the control thread's poll, with tokens at or above
    /// `tokens::FIRST_OPERATOR_TOKEN`.
    fn register(&mut self, registry: &Registry) -> io::Result<()>;
    /// Runs once before the first frame (e.g. the lease table is restored).
    fn start(&mut self, plane: &mut Plane<'_>);
    /// One of its tokens is ready.
    fn ready(&mut self, token: Token, plane: &mut Plane<'_>);
    /// Runs every loop iteration, after the batch was handled (e.g. requests waiting for the
    /// workers are answered).
    fn poll(&mut self, plane: &mut Plane<'_>);
    /// The latest time at which `poll` should run again, if any.
    fn deadline(&self) -> Option<Instant>;
    /// Runs after each batch, before its frames are written to the port: what must be durable
    /// before a guest hears of it (a DHCP ACK) is written here.
    fn before_write(&mut self, engine: &Engine, now: Instant);
    /// Runs when the runtime is dropped.
    fn stop(&mut self);
}

/// What the control thread lends the operator for one call. A change to
/// `engine.ctx.cfg` reaches the workers when the call returns.
pub struct Plane<'a> {
    /// Now, on the runtime's clock.
    pub now: Instant,
    /// The control thread's engine (with one worker: the only one).
    pub engine: &'a mut Engine,
    /// The control thread's host sockets (a reconfiguration may close some).
    pub sock: &'a mut SockDriver,
    /// Frames produced during the call (written with the next batch).
    pub out: &'a mut FrameBatch,
    /// The control thread's poll, for the operator's own sources.
    pub registry: &'a Registry,
    pub(crate) switch: &'a Arc<Switch>,
    pub(crate) forwards: &'a mut crate::sock::forward::Forwards,
    pub(crate) workers: &'a Workers,
    pub(crate) napi: Option<(bool, u64)>,
    pub(crate) capture: &'a crate::capture::Capture,
    pub(crate) writable_dirs: &'a [std::path::PathBuf],
}

impl Plane<'_> {
    /// The number of worker threads (0: the control thread carries every flow).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The counters and session counts every worker last published (no round trip).
    pub fn published(&self) -> Vec<WorkerReport> {
        self.workers.published()
    }

    /// Asks every worker for its sessions; each replies on its receiver (with its index), and
    /// the control thread goes on meanwhile.
    pub fn ask_sessions(&self) -> Vec<(usize, mpsc::Receiver<WorkerReport>)> {
        self.workers.ask_sessions()
    }

    /// Adds a port to the segment (read by the control thread, switched at once).
    pub fn add_port(&self, link: Arc<dyn Link>) -> io::Result<PortId> {
        add_port(self.switch, self.registry, link)
    }

    /// Removes a port from the segment; its descriptors close when the last frame being sent
    /// to it is done.
    pub fn remove_port(&self, id: PortId) -> Result<(), SwitchError> {
        remove_port(self.switch, self.registry, id)
    }

    /// Every forward with its counters.
    pub fn forwards(&self) -> Vec<crate::sock::forward::ForwardView> {
        self.forwards.views()
    }

    /// Makes the forwards' listeners what `wanted` says now (as the configuration would when
    /// this call returns), so that the caller hears which could not be opened before it
    /// commits to a configuration with them. The forwards that failed, with why.
    pub fn sync_forwards(
        &mut self,
        wanted: &[hubnat_core::forward::Forward],
    ) -> Vec<(hubnat_core::forward::Forward, io::Error)> {
        let (closed, failed) = self.forwards.sync(wanted, self.registry);
        crate::control_thread::end_forwards(
            &closed,
            self.now,
            self.engine,
            self.sock,
            self.out,
            self.workers,
        );
        failed
    }

    /// Every port of the segment with its counters.
    pub fn ports(&self) -> Vec<PortView> {
        self.switch.ports()
    }

    /// Learned addresses, addresses refused for a full table, and moves between ports.
    pub fn mac_stats(&self) -> (usize, u64, u64) {
        self.switch.mac_stats()
    }

    /// Where the TAP's NAPI polls run (threaded?) and how often they moved, if switched.
    pub fn napi_state(&self) -> Option<(bool, u64)> {
        self.napi
    }

    /// Starts capturing the segment's frames into `path` (made anew), up to `max_bytes`; why
    /// not, with nothing changed. `path` is the daemon's own (absolute, from the CLI).
    pub fn capture_start(
        &self,
        path: &std::path::Path,
        max_bytes: u64,
    ) -> Result<crate::capture::CaptureStatus, String> {
        if let Some(on) = self.capture.status().filter(|s| s.active) {
            return Err(format!(
                "a capture to {} is on: stop it first (hubnat capture stop)",
                on.path.display()
            ));
        }
        let file = crate::capture::open_file(path)
            .map_err(|e| crate::capture::open_error(path, &e, self.writable_dirs))?;
        self.capture
            .start(file, path, max_bytes)
            .map_err(|e| format!("capture {}: {e}", path.display()))?;
        self.capture
            .status()
            .ok_or_else(|| "the capture ended at once".to_owned())
    }

    /// Ends the capture on now (its file written and closed); None when none is on.
    pub fn capture_stop(&self) -> Option<crate::capture::CaptureStatus> {
        self.capture.stop("stopped by the operator")
    }

    /// The capture on now, else the last one.
    pub fn capture_status(&self) -> Option<crate::capture::CaptureStatus> {
        self.capture.status()
    }
}
