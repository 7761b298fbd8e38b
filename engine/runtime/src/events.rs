//! Where the core's events go: each thread drains its engine's queue after every batch and
//! hands the events to the sink the runtime was given (the daemon's security log).

use hubnat_core::event::Event;
use hubnat_core::Engine;

/// Takes the core's events (DHCP entries, NAT sessions) off the data path's threads. Called on
/// the thread that drove the engine, right after its batch: it must not block.
pub trait EventSink: Send + Sync {
    /// One event, in the order the engine reported it.
    fn event(&self, e: &Event);
}

/// Hands every event `engine` has queued to `sink`. Without a sink they are still drained, so
/// that the engine's queue never fills.
pub fn drain(engine: &mut Engine, sink: Option<&dyn EventSink>) {
    while let Some(e) = engine.poll_event() {
        if let Some(s) = sink {
            s.event(&e);
        }
    }
}
