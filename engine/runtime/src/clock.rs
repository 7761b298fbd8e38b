//! The runtime's clock (monotonic, mapped onto the core's `Instant`) and how its threads wait
//! for work.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
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

/// While other threads wait for a CPU this share of the time or more (the kernel's pressure
/// stall information, "some"), a thread does not spin before sleeping: every microsecond of
/// spin is then taken from a thread that has work. A DNS relay load (a guest resolver, its
/// upstream and hubnat on two cores) stalls about 40 % of the time, a connect-exchange-close
/// load a quarter to a third, request/response a few percent (PERF.md, "The spin before
/// sleeping").
const CONTENDED_PERCENT: u64 = 33;

/// How often a thread looks at the CPU pressure again; its verdict stands meanwhile.
const PRESSURE_EVERY: Duration = Duration::from_millis(50);

/// `/proc/pressure/cpu`, opened by `watch_cpu_pressure` (before the sandbox hides /proc).
static CPU_PRESSURE: OnceLock<Option<File>> = OnceLock::new();

thread_local! {
    /// When this thread last read the pressure, the stall total it read then (µs), and the
    /// verdict.
    static PRESSURE_SEEN: Cell<(Option<std::time::Instant>, u64, bool)> =
        const { Cell::new((None, 0, false)) };
}

/// Opens the kernel's CPU pressure file for `spin_until` to consult; without it (a kernel
/// without PSI, or with it off) the threads always spin.
pub fn watch_cpu_pressure() {
    CPU_PRESSURE.get_or_init(|| File::open("/proc/pressure/cpu").ok());
}

/// The "some" stall total (µs) of a pressure file's text.
fn some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Whether threads that waited `stalled_us` for a CPU within `elapsed` waited
/// `CONTENDED_PERCENT` of it.
fn contended(stalled_us: u64, elapsed: Duration) -> bool {
    let elapsed_us = elapsed.as_micros().max(1) as u64;
    stalled_us.saturating_mul(100) >= elapsed_us.saturating_mul(CONTENDED_PERCENT)
}

/// Whether threads waited for a CPU `CONTENDED_PERCENT` of the time since this thread last
/// looked (at most every `PRESSURE_EVERY`).
fn cpu_contended(now: std::time::Instant) -> bool {
    let Some(Some(file)) = CPU_PRESSURE.get() else {
        return false;
    };
    let (at, total, verdict) = PRESSURE_SEEN.get();
    if at.is_some_and(|t| now.saturating_duration_since(t) < PRESSURE_EVERY) {
        return verdict;
    }
    let mut buf = [0u8; 256];
    let Some(stalled) = file
        .read_at(&mut buf, 0)
        .ok()
        .and_then(|n| some_total(std::str::from_utf8(&buf[..n]).ok()?))
    else {
        return false;
    };
    let verdict = at.is_some_and(|t| {
        contended(
            stalled.saturating_sub(total),
            now.saturating_duration_since(t),
        )
    });
    PRESSURE_SEEN.set((Some(now), stalled, verdict));
    verdict
}

/// Until when a thread whose last work was at `last_work` spins before it sleeps: `SPIN`
/// after it, or not at all while the CPUs are contended.
pub(crate) fn spin_until(last_work: std::time::Instant) -> std::time::Instant {
    let now = std::time::Instant::now();
    if now < last_work + SPIN && cpu_contended(now) {
        return last_work;
    }
    last_work + SPIN
}

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
    let spin_until = spin_until(*last_work);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stall_total_is_read_from_the_some_line() {
        let text = "some avg10=5.74 avg60=7.87 avg300=12.85 total=16645788251\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n";
        assert_eq!(some_total(text), Some(16_645_788_251));
        assert_eq!(some_total("full avg10=0.00 total=7\n"), None);
        assert_eq!(some_total("some avg10=0.00\n"), None);
        assert_eq!(some_total("some total=x\n"), None);
    }

    #[test]
    fn contention_is_the_share_of_time_threads_waited() {
        let window = Duration::from_millis(50);
        // 40 % (a relay load) is contended; 23 % (connection churn's median), 9 % and nothing
        // are not.
        assert!(contended(20_000, window));
        assert!(contended(16_500, window));
        assert!(!contended(11_500, window));
        assert!(!contended(4_500, window));
        assert!(!contended(0, window));
        // Several threads can wait at once: more stall than time passed is still contended.
        assert!(contended(120_000, window));
        assert!(!contended(0, Duration::ZERO));
    }

    /// Without the pressure file (never opened here) threads spin as always.
    #[test]
    fn without_pressure_information_the_spin_stays() {
        let last = std::time::Instant::now();
        assert_eq!(spin_until(last), last + SPIN);
    }
}
