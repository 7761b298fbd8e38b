//! hubnat-runtime: the threads that drive hubnat's sans-IO core with real I/O.
//!
//! - `control_thread`: the control thread's loop (the port, the control plane, timers, the operator);
//! - `worker`: a worker thread's loop (the NAT flows hashed to it);
//! - `router`: which thread owns a frame (the symmetric flow hash);
//! - `queues`, `pool`: the bounded lock-free queues between threads and their frame buffers;
//! - `tx`: frames out to the TAP, with its NAPI polls switched by load;
//! - `sock`: the host-socket drivers (io_uring readiness and completions, or epoll);
//! - `port`: the frame ports (TAP, AF_PACKET);
//! - `operator`: the hook through which the daemon serves operators on the control thread;
//! - `capture`: the segment's frames written to a pcap file, off the data path;
//! - `events`: where each thread drains its engine's events; `limits`: the session ids and
//!   limits the engines of one runtime share.

pub mod capture;
mod clock;
pub mod control_thread;
pub mod events;
pub mod limits;
pub mod operator;
pub mod placement;
pub mod pool;
pub mod port;
pub mod queues;
pub mod router;
pub mod sock;
pub mod tokens;
pub mod tx;
pub mod worker;

pub use clock::watch_cpu_pressure;
pub use control_thread::{Exit, Options, Runtime};

/// Starts a thread named `name` and returns once it runs. Every thread must be running before
/// the system-call filter is installed on all of them: one still in its start-up then (the C
/// library registers it with `rseq` from inside it, which the filter refuses) aborts the whole
/// process.
pub fn spawn_running<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let (running_tx, running) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = running_tx.send(());
            f()
        })?;
    running
        .recv()
        .map_err(|_| std::io::Error::other(format!("thread {name} ended at start")))?;
    Ok(thread)
}
pub use operator::{Operator, Plane};
pub use worker::WorkerReport;
