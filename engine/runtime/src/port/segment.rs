//! How `hubnat run` opens its TAP port: how many queues (one per worker, or one read by the
//! control thread), whether NAPI is used, and what to fall back to when the device or the
//! kernel refuses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::port::tap::{GuestSetup, NapiThreading, QueueFlags, Tap, TapError};
use crate::tx::NapiSwitch;

/// `--tap-queues`: how the TAP is read with 2 or more workers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum QueueMode {
    /// Multiqueue where the device allows it, else one queue (the log says so).
    Auto,
    /// One queue per worker, read by that worker.
    Multi,
    /// One queue, read by the control thread.
    Single,
}

/// `--tap-napi`: where the device's NAPI polls run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NapiMode {
    /// Switched by load between kernel threads (bulk) and the writes (request/response).
    Auto,
    /// Always in kernel threads.
    Threaded,
    /// No NAPI: each write runs the guest's receive path.
    Off,
}

/// `--offload`: whether the guest may leave checksums and TCP segmentation to hubnat.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OffloadMode {
    /// Offered where the kernel takes it (the log says when it does not).
    Auto,
    /// Not offered: the guest's frames are whole and at most the MTU.
    Off,
}

/// What to open.
pub struct TapSpec<'a> {
    /// The device's name.
    pub name: &'a str,
    /// The network namespace to make it in (None: hubnat's own).
    pub netns: Option<PathBuf>,
    /// The user namespace owning `netns`, to make the device from inside it (a rootless
    /// container's: see `Tap::open_queues_in_namespaces`). Needs `netns`.
    pub userns: Option<PathBuf>,
    /// The MTU to set.
    pub mtu: u32,
    /// The runtime's worker threads.
    pub workers: usize,
    /// How its queues are read.
    pub queues: QueueMode,
    /// Where its NAPI polls run.
    pub napi: NapiMode,
    /// Whether offloads are offered.
    pub offload: OffloadMode,
    /// The guest's side to set up once the device is open (slirp4netns's `--configure`);
    /// None leaves its addressing to the guest.
    pub guest: Option<GuestSetup>,
}

/// An opened TAP port.
pub struct TapPort {
    /// Its queues: the first is the control thread's (or the only one), one per worker with a
    /// multiqueue device.
    pub queues: Vec<Tap>,
    /// The NAPI switch, when the polls are moved by load.
    pub napi: Option<Arc<NapiSwitch>>,
    /// How frames are delivered, for the log.
    pub napi_mode: &'static str,
    /// The guest may leave checksums and TCP segmentation to hubnat (and UDP segmentation,
    /// where `queues[0].uso()` says so).
    pub offloads: bool,
}

impl TapSpec<'_> {
    /// Opens the device as the spec says. A multiqueue open of an existing single-queue device
    /// falls back to one queue under `QueueMode::Auto`; NAPI is used only where its polls can
    /// be moved to threads (in softirq alone they cost more than plain writes), else hubnat
    /// writes without it and says so.
    pub fn open(&self) -> Result<TapPort, TapError> {
        let (mut queues, threading) = match self.queues {
            QueueMode::Single => self.open_napi(1)?,
            QueueMode::Multi => self.open_napi(self.workers)?,
            QueueMode::Auto if self.workers < 2 => self.open_napi(1)?,
            QueueMode::Auto => match self.open_napi(self.workers) {
                Ok(t) => t,
                Err(TapError::Attach { error, .. })
                    if error.raw_os_error() == Some(libc::EINVAL) =>
                {
                    tracing::warn!(
                        "TAP {} exists as a single-queue device: the control thread reads it and \
                         hands frames to the workers",
                        self.name
                    );
                    self.open_napi(1)?
                }
                Err(e) => return Err(e),
            },
        };
        let napi = match (threading, self.napi) {
            (None, _) => None,
            (Some(t), NapiMode::Threaded) => {
                t.set(true).map_err(|error| TapError::Napi {
                    name: self.name.to_owned(),
                    error,
                })?;
                None
            }
            (Some(t), _) => Some(Arc::new(NapiSwitch::new(t))),
        };
        let napi_mode = match (&napi, self.napi) {
            (Some(_), _) => "NAPI polls switched by load",
            (None, NapiMode::Threaded) => "NAPI polls in threads",
            (None, _) => "no NAPI",
        };
        let offloads = self.offload == OffloadMode::Auto
            && match queues[0].offer_offloads() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "TAP {}: the kernel refused its offloads ({e}); the guest's frames stay whole",
                        self.name
                    );
                    false
                }
            };
        // Last: a fallback above may have closed the device and made it anew, addresses lost.
        if let Some(guest) = &self.guest {
            Tap::configure_in_namespaces(
                self.name,
                self.userns.as_deref(),
                self.netns.as_deref(),
                guest,
            )?;
        }
        Ok(TapPort {
            queues,
            napi,
            napi_mode,
            offloads,
        })
    }

    fn open_queues(&self, queues: usize, napi: bool) -> Result<Vec<Tap>, TapError> {
        let mtu = Some(self.mtu);
        let flags = QueueFlags {
            napi,
            vnet_hdr: self.offload == OffloadMode::Auto,
        };
        match (&self.userns, &self.netns) {
            (Some(user), Some(net)) => {
                Tap::open_queues_in_namespaces(self.name, mtu, queues, flags, Some(user), net)
            }
            (Some(user), None) => Err(TapError::UsernsWithoutNetns { path: user.clone() }),
            (None, Some(path)) => Tap::open_queues_in_netns(self.name, mtu, queues, flags, path),
            (None, None) => Tap::open_queues(self.name, mtu, queues, flags),
        }
    }

    /// `queues` queues, with NAPI and its switch where both can be had.
    fn open_napi(&self, queues: usize) -> Result<(Vec<Tap>, Option<NapiThreading>), TapError> {
        if self.napi != NapiMode::Off {
            let netns = self.netns.as_deref().map(Path::new);
            // Asked before the device is made where it can be (another namespace's switch): a
            // device made with NAPI and then without would vanish for a moment.
            let refused = match netns.map(NapiThreading::probe) {
                Some(Err(e)) => e,
                _ => {
                    let taps = self.open_queues(queues, true)?;
                    match NapiThreading::open(self.name, netns) {
                        Ok(t) => return Ok((taps, Some(t))),
                        // `taps` closes here, before the device is made anew without NAPI.
                        Err(e) => e,
                    }
                }
            };
            tracing::warn!(
                "TAP {}: cannot switch its NAPI polls ({refused}); writing without NAPI",
                self.name
            );
        }
        Ok((self.open_queues(queues, false)?, None))
    }
}
