//! The runtime's clock (monotonic, mapped onto the core's `Instant`) and how its threads wait
//! for work.

use std::io;
use std::time::Duration;

use mio::{Events, Poll};

use hubnat_core::time::Instant;

/// A monotonic clock mapped onto the core's `Instant`.
#[derive(Clone, Copy)]
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

/// How long a thread keeps polling without sleeping after it last had something to do. 150 µs
/// covers the gap between a guest's answer and its next request through a namespace on this
/// kind of machine; at 50 µs the worker slept in enough of those gaps to double the p99.9 of
/// request/response round trips, at 400 µs the spin took CPU from the peers (PERF.md).
pub(crate) const SPIN: Duration = Duration::from_micros(150);

/// For this long after its last work a spinning thread only polls; after it, each turn of the
/// spin also offers the CPU to any other thread ready to run on it (`sched_yield`, which
/// returns at once on an idle CPU). The first answer of a request/response exchange comes
/// within this time and is caught as before; a longer spin on a busy machine would take the
/// time the guests' and the servers' threads need: with it, a guest's connect-exchange-close
/// rate rose by a third (PERF.md, "The spin before sleeping").
const SPIN_ALONE: Duration = Duration::from_micros(30);

/// A `sched_yield` that returns later than this gave the CPU to another thread: the CPU is
/// wanted by others, and spinning on would take their time (and delay this thread's own
/// wake-up no less than sleeping would). On a CPU nobody else wants it returns in about a
/// microsecond. Ending the spin there took a tenth off the DNS relay's CPU per query
/// (PERF.md, "The spin before sleeping").
const YIELD_LATE: Duration = Duration::from_micros(5);

/// One turn of a spin that ends at `spin_until` (`SPIN` after the thread's last work). False
/// when the spin should end now: its turn offered the CPU and another thread took it.
pub(crate) fn spin_turn(spin_until: std::time::Instant) -> bool {
    let now = std::time::Instant::now();
    let left = spin_until.saturating_duration_since(now);
    if SPIN.saturating_sub(left) < SPIN_ALONE {
        std::hint::spin_loop();
        return true;
    }
    std::thread::yield_now();
    now.elapsed() < YIELD_LATE
}

/// Waits like `Poll::poll`, but for `SPIN` after the thread last had work it polls without
/// sleeping first. On a VM a sleeping vCPU takes tens of microseconds to be woken, most of a
/// request/response round trip through hubnat; the answer a short spin catches is usually
/// already on its way. Under load there is always work, so the spin never runs; idle, it ends
/// `SPIN` after the last event.
pub(crate) fn wait(
    poll: &mut Poll,
    events: &mut Events,
    timeout: Option<Duration>,
    last_work: &mut std::time::Instant,
) -> io::Result<()> {
    let start = std::time::Instant::now();
    let spin_until = *last_work + SPIN;
    if timeout != Some(Duration::ZERO) {
        while std::time::Instant::now() < spin_until {
            poll.poll(events, Some(Duration::ZERO))?;
            if !events.is_empty() {
                *last_work = std::time::Instant::now();
                return Ok(());
            }
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                return Ok(());
            }
            if !spin_turn(spin_until) {
                break;
            }
        }
    }
    let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
    poll.poll(events, left)?;
    if !events.is_empty() {
        *last_work = std::time::Instant::now();
    }
    Ok(())
}
