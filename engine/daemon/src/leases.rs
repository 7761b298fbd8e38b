//! The lease table on disk, so that a restart (or a crash) loses no lease and never gives an
//! address twice.
//!
//! Two files in the state directory:
//! - `leases.json`, the snapshot: the whole table as JSON with wall-clock times (milliseconds
//!   since the Unix epoch), written through `state::write_atomically` (temporary file, fsync,
//!   rename, fsync of the directory): a crash leaves the old table or the new one.
//! - `leases.journal`, the changes since that snapshot: one frame per save, each holding one
//!   record per lease created, renewed or removed (its whole new state, or its removal), with a
//!   CRC and the snapshot's epoch. The file is made at its full size and filled with zeros
//!   once, so an append overwrites blocks that already exist and one `fdatasync` makes it
//!   durable without a metadata flush (the size never changes). A zero length word ends the
//!   frames: every append writes it after its frame.
//!
//! The runtime saves whatever changed before the frames of that batch (the DHCP ACK among
//! them) go out, so a client never holds a lease the files do not. Saving is one frame
//! appended and one `fdatasync` per batch, for every binding of the batch; when the journal is
//! full, or more changed than the DHCP server remembers, the table is compacted: a new snapshot
//! (with the next epoch), then the journal restarted at that epoch. A crash between the two
//! leaves a journal of the older epoch, which the snapshot already holds and loading ignores.
//!
//! The DHCPv6 leases (IA_NA) are kept in the same two files: the snapshot's `leases6` (left out
//! while there are none, so a table without them is written as before, and a file without it
//! loads as an empty one) and records of their own kinds in the journal. One save, one
//! `fdatasync`, whichever family changed.
//!
//! Loading is the snapshot, then the journal's frames of the snapshot's epoch replayed in
//! order. A frame that does not check (a save cut short by a crash; its ACK never left) ends
//! the replay. A file that cannot be read is not emptied: it is renamed aside
//! (`leases.json.corrupt-SECONDS`, `leases.journal.corrupt-SECONDS`) and reported; a journal is
//! set aside with its snapshot, since its records are changes to that table, and so is a
//! journal whose frames go on after one that does not check (damage, not a crash).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::write_atomically;
use hubnat_core::config::Mac;
use hubnat_core::time::Instant;
use hubnat_core::vhost::dhcp::Lease;
use hubnat_core::vhost::dhcp6::Lease6;

pub const LEASE_FILE: &str = "leases.json";
const VERSION: u32 = 1;

/// The journal's size when made, and the least it is made with later.
pub const JOURNAL_BYTES: u64 = 1 << 20;
/// The journal grows (at a compaction) to four times the snapshot, up to this, so that a large
/// table is not compacted after every few appends.
const JOURNAL_MAX_BYTES: u64 = 64 << 20;
const JOURNAL_MAGIC: &[u8; 8] = b"HNLEASEJ";
const JOURNAL_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const FRAME_HEAD: usize = 16;
/// The zero length word that ends the frames.
const END_MARK: [u8; 4] = [0; 4];
const PUT: u8 = 1;
const REMOVE: u8 = 2;
const PUT6: u8 = 3;
const REMOVE6: u8 = 4;
/// The longest DUID a record holds (RFC 8415 11.1).
const MAX_DUID: usize = 130;

/// Maps the core's `Instant`s onto the wall clock: `Instant::ZERO` is `origin`.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    pub origin: SystemTime,
}

impl WallClock {
    pub fn wall(&self, t: Instant) -> SystemTime {
        self.origin + Duration::from_micros(t.as_micros())
    }

    /// The `Instant` of a wall-clock time (times before the origin become the origin).
    pub fn instant(&self, w: SystemTime) -> Instant {
        let d = w.duration_since(self.origin).unwrap_or_default();
        Instant::ZERO + d
    }

    fn millis(&self, t: Instant) -> u64 {
        unix_millis(self.wall(t))
    }

    fn at(&self, ms: u64) -> Instant {
        self.instant(UNIX_EPOCH + Duration::from_millis(ms))
    }
}

pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    version: u32,
    saved_at: u64,
    /// The journal whose frames apply on top of this table is the one of this epoch (files
    /// written before the journal existed have none: 0).
    #[serde(default)]
    epoch: u64,
    leases: Vec<SavedLease>,
    /// The DHCPv6 leases (absent from files written before them, and while there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    leases6: Vec<SavedLease6>,
}

#[derive(Serialize, Deserialize)]
struct SavedLease6 {
    id: u32,
    mac: String,
    ip: Ipv6Addr,
    /// Hex.
    duid: String,
    iaid: u32,
    /// Unix milliseconds.
    leased_at: u64,
    expires_at: u64,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2 * MAX_DUID || s.len() < 4 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Serialize, Deserialize)]
struct SavedLease {
    id: u32,
    mac: String,
    ip: Ipv4Addr,
    host_name: String,
    /// Unix milliseconds.
    leased_at: u64,
    expires_at: u64,
}

/// The snapshot's bytes for a lease table (IPv4 and DHCPv6 leases).
pub fn encode<'a, 'b>(
    leases: impl Iterator<Item = &'a Lease>,
    leases6: impl Iterator<Item = &'b Lease6>,
    clock: &WallClock,
    epoch: u64,
) -> Vec<u8> {
    let file = LeaseFile {
        version: VERSION,
        saved_at: unix_millis(SystemTime::now()),
        epoch,
        leases: leases
            .map(|l| SavedLease {
                id: l.id,
                mac: l.mac.to_string(),
                ip: l.ip,
                host_name: l.host_name.clone(),
                leased_at: clock.millis(l.leased_at),
                expires_at: clock.millis(l.expires_at),
            })
            .collect(),
        leases6: leases6
            .map(|l| SavedLease6 {
                id: l.id,
                mac: l.mac.to_string(),
                ip: l.ip,
                duid: l.duid_hex(),
                iaid: l.iaid,
                leased_at: clock.millis(l.leased_at),
                expires_at: clock.millis(l.expires_at),
            })
            .collect(),
    };
    let mut v = serde_json::to_vec_pretty(&file).expect("a lease table serializes");
    v.push(b'\n');
    v
}

/// The leases a snapshot holds.
pub struct Decoded {
    pub leases: Vec<Lease>,
    pub leases6: Vec<Lease6>,
    pub epoch: u64,
}

/// Parses the snapshot's bytes into its leases and epoch; the error says what is wrong.
pub fn decode(bytes: &[u8], clock: &WallClock) -> Result<Decoded, String> {
    let file: LeaseFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != VERSION {
        return Err(format!("unknown version {}", file.version));
    }
    let leases = file
        .leases
        .into_iter()
        .map(|s| {
            let mac: Mac = s
                .mac
                .parse()
                .map_err(|_| format!("lease {}: `{}` is not a MAC address", s.id, s.mac))?;
            Ok(Lease {
                id: s.id,
                leased_at: clock.at(s.leased_at),
                expires_at: clock.at(s.expires_at),
                mac,
                ip: s.ip,
                host_name: s.host_name,
            })
        })
        .collect::<Result<Vec<Lease>, String>>()?;
    let leases6 =
        file.leases6
            .into_iter()
            .map(|s| {
                let mac: Mac = s.mac.parse().map_err(|_| {
                    format!("DHCPv6 lease {}: `{}` is not a MAC address", s.id, s.mac)
                })?;
                let duid = unhex(&s.duid)
                    .ok_or_else(|| format!("DHCPv6 lease {}: `{}` is not a DUID", s.id, s.duid))?;
                Ok(Lease6 {
                    id: s.id,
                    leased_at: clock.at(s.leased_at),
                    expires_at: clock.at(s.expires_at),
                    mac,
                    ip: s.ip,
                    duid,
                    iaid: s.iaid,
                })
            })
            .collect::<Result<Vec<Lease6>, String>>()?;
    Ok(Decoded {
        leases,
        leases6,
        epoch: file.epoch,
    })
}

/// One change of the table, as a journal record holds it.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// The lease as it is now (created, renewed, or moved to its id).
    Put(&'a Lease),
    /// Lease `id` is gone.
    Remove(u32),
    /// A DHCPv6 lease as it is now.
    Put6(&'a Lease6),
    /// DHCPv6 lease `id` is gone.
    Remove6(u32),
}

fn encode_record(c: Change<'_>, clock: &WallClock, out: &mut Vec<u8>) {
    match c {
        Change::Put(l) => {
            out.push(PUT);
            out.extend_from_slice(&l.id.to_le_bytes());
            out.extend_from_slice(&l.mac.0);
            out.extend_from_slice(&l.ip.octets());
            out.extend_from_slice(&clock.millis(l.leased_at).to_le_bytes());
            out.extend_from_slice(&clock.millis(l.expires_at).to_le_bytes());
            // Host names come from DHCP option 12 (at most 255 bytes); a longer one is cut so
            // that the record stays self-describing.
            let name = &l.host_name.as_bytes()[..l.host_name.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name);
        }
        Change::Remove(id) => {
            out.push(REMOVE);
            out.extend_from_slice(&id.to_le_bytes());
        }
        Change::Put6(l) => {
            out.push(PUT6);
            out.extend_from_slice(&l.id.to_le_bytes());
            out.extend_from_slice(&l.mac.0);
            out.extend_from_slice(&l.ip.octets());
            out.extend_from_slice(&clock.millis(l.leased_at).to_le_bytes());
            out.extend_from_slice(&clock.millis(l.expires_at).to_le_bytes());
            out.extend_from_slice(&l.iaid.to_le_bytes());
            // The core bounds DUIDs to 130 bytes; the cut only keeps the record well formed.
            let duid = &l.duid[..l.duid.len().min(MAX_DUID)];
            out.push(duid.len() as u8);
            out.extend_from_slice(duid);
        }
        Change::Remove6(id) => {
            out.push(REMOVE6);
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
}

/// A record read back.
enum Record {
    Put(Lease),
    Remove(u32),
    Put6(Lease6),
    Remove6(u32),
}

/// Parses a frame's records; the error says which record is bad.
fn parse_records(mut p: &[u8], clock: &WallClock) -> Result<Vec<Record>, String> {
    fn take<'b>(p: &mut &'b [u8], n: usize) -> Result<&'b [u8], String> {
        if p.len() < n {
            return Err("a record is cut short".into());
        }
        let (a, b) = p.split_at(n);
        *p = b;
        Ok(a)
    }
    let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let u64_of = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    };
    let mut recs = Vec::new();
    while !p.is_empty() {
        let tag = take(&mut p, 1)?[0];
        match tag {
            PUT => {
                let fixed = take(&mut p, 4 + 6 + 4 + 8 + 8 + 2)?;
                let id = u32_of(&fixed[0..4]);
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&fixed[4..10]);
                let ip = Ipv4Addr::new(fixed[10], fixed[11], fixed[12], fixed[13]);
                let leased_at = clock.at(u64_of(&fixed[14..22]));
                let expires_at = clock.at(u64_of(&fixed[22..30]));
                let name_len = u16::from_le_bytes([fixed[30], fixed[31]]) as usize;
                let name = take(&mut p, name_len)?;
                let host_name = std::str::from_utf8(name)
                    .map_err(|_| format!("lease {id}: the host name is not UTF-8"))?
                    .to_owned();
                recs.push(Record::Put(Lease {
                    id,
                    leased_at,
                    expires_at,
                    mac: Mac(mac),
                    ip,
                    host_name,
                }));
            }
            REMOVE => recs.push(Record::Remove(u32_of(take(&mut p, 4)?))),
            PUT6 => {
                let fixed = take(&mut p, 4 + 6 + 16 + 8 + 8 + 4 + 1)?;
                let id = u32_of(&fixed[0..4]);
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&fixed[4..10]);
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&fixed[10..26]);
                let duid = take(&mut p, usize::from(fixed[46]))?.to_vec();
                recs.push(Record::Put6(Lease6 {
                    id,
                    leased_at: clock.at(u64_of(&fixed[26..34])),
                    expires_at: clock.at(u64_of(&fixed[34..42])),
                    mac: Mac(mac),
                    ip: Ipv6Addr::from(ip),
                    duid,
                    iaid: u32_of(&fixed[42..46]),
                }));
            }
            REMOVE6 => recs.push(Record::Remove6(u32_of(take(&mut p, 4)?))),
            t => return Err(format!("unknown record kind {t}")),
        }
    }
    Ok(recs)
}

fn header(epoch: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The journal's epoch, or what is wrong with its header.
fn parse_header(b: &[u8]) -> Result<u64, String> {
    if b.len() < HEADER_LEN + END_MARK.len() {
        return Err("shorter than its header".into());
    }
    if &b[0..8] != JOURNAL_MAGIC {
        return Err("not a lease journal".into());
    }
    let crc = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    if crc != crc32fast::hash(&b[0..24]) {
        return Err("its header does not check".into());
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version != JOURNAL_VERSION {
        return Err(format!("unknown version {version}"));
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&b[16..24]);
    Ok(u64::from_le_bytes(e))
}

fn frame_crc(epoch: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The frame at `off` of `epoch`: its payload, or None when none checks there.
fn frame_at(b: &[u8], off: usize, epoch: u64) -> Option<&[u8]> {
    let head = b.get(off..off.checked_add(FRAME_HEAD)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let mut e = [0u8; 8];
    e.copy_from_slice(&head[8..16]);
    let start = off + FRAME_HEAD;
    let payload = b.get(start..start.checked_add(len)?)?;
    (len > 0 && u64::from_le_bytes(e) == epoch && crc == frame_crc(epoch, payload))
        .then_some(payload)
}

/// What replaying a journal found.
#[derive(Debug, PartialEq, Eq)]
enum Replay {
    /// Every frame checked, up to the end mark.
    Clean { frames: usize, records: usize },
    /// The last frame did not check (a save a crash cut short): ignored.
    Torn { frames: usize, records: usize },
    /// A frame did not check and another follows it, or a frame's records do not parse: the
    /// frames before it were applied.
    Damaged { frames: usize, reason: String },
}

/// The lease tables being loaded, by id.
#[derive(Default)]
struct Tables {
    v4: BTreeMap<u32, Lease>,
    v6: BTreeMap<u32, Lease6>,
}

/// Applies the frames of journal bytes `b` (epoch `epoch`, header checked) to `table`.
fn replay(b: &[u8], epoch: u64, clock: &WallClock, table: &mut Tables) -> Replay {
    let (mut off, mut frames, mut records) = (HEADER_LEN, 0, 0);
    loop {
        if b.get(off..off + END_MARK.len())
            .is_none_or(|m| m == END_MARK)
        {
            return Replay::Clean { frames, records };
        }
        let Some(payload) = frame_at(b, off, epoch) else {
            // Damage rather than a crash if the frame its length points past does check: a
            // save is written (and synced) only after the one before it.
            let len = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]) as usize;
            let next = off.saturating_add(FRAME_HEAD).saturating_add(len);
            if frame_at(b, next, epoch).is_some() {
                return Replay::Damaged {
                    frames,
                    reason: format!("the frame at byte {off} does not check, and one follows it"),
                };
            }
            return Replay::Torn { frames, records };
        };
        // Applied only whole: a frame is one save.
        match parse_records(payload, clock) {
            Ok(recs) => {
                records += recs.len();
                frames += 1;
                for r in recs {
                    match r {
                        Record::Put(l) => {
                            table.v4.insert(l.id, l);
                        }
                        Record::Remove(id) => {
                            table.v4.remove(&id);
                        }
                        Record::Put6(l) => {
                            table.v6.insert(l.id, l);
                        }
                        Record::Remove6(id) => {
                            table.v6.remove(&id);
                        }
                    }
                }
            }
            Err(reason) => {
                return Replay::Damaged {
                    frames,
                    reason: format!("the frame at byte {off}: {reason}"),
                }
            }
        }
        off += FRAME_HEAD + payload.len();
    }
}

/// What the snapshot was at start.
#[derive(Debug)]
pub enum Snapshot {
    /// No file yet.
    Missing,
    /// Read: this many leases.
    Read(usize),
    /// Unreadable as a lease table; moved to `moved_to`.
    Corrupt { reason: String, moved_to: PathBuf },
}

/// What the journal was at start.
#[derive(Debug)]
pub enum Journal {
    Missing,
    /// Of an older epoch than the snapshot (a compaction's snapshot was written, its journal
    /// not yet restarted): the snapshot holds all of it.
    Folded,
    /// Replayed; `torn`: its last frame, cut short by a crash, was ignored.
    Replayed {
        frames: usize,
        records: usize,
        torn: bool,
    },
    /// Moved to `moved_to`. `applied` frames were replayed before the damage (none when the
    /// header was bad or the snapshot was set aside).
    SetAside {
        reason: String,
        moved_to: PathBuf,
        applied: usize,
    },
}

/// The table found at start, and what each file held.
#[derive(Debug)]
pub struct Loaded {
    pub leases: Vec<Lease>,
    pub leases6: Vec<Lease6>,
    pub snapshot: Snapshot,
    pub journal: Journal,
}

/// Renames `path` aside as `PATH.corrupt-SECONDS` (a suffix added if that exists already).
fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let secs = unix_millis(SystemTime::now()) / 1000;
    let mut n = 0;
    loop {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".corrupt-{secs}"));
        if n > 0 {
            name.push(format!(".{n}"));
        }
        let to = PathBuf::from(name);
        if !to.exists() {
            std::fs::rename(path, &to)?;
            return Ok(to);
        }
        n += 1;
    }
}

/// Reads a whole file, refusing one larger than `max` (None when it does not exist).
fn read_bounded(path: &Path, max: u64) -> io::Result<Option<Result<Vec<u8>, String>>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut b = Vec::new();
    f.take(max + 1).read_to_end(&mut b)?;
    if b.len() as u64 > max {
        return Ok(Some(Err(format!("larger than {max} bytes"))));
    }
    Ok(Some(Ok(b)))
}

/// The lease files of one state directory: loads them at start, then saves each batch's
/// changes (`append`) and compacts (`compact`).
pub struct LeaseStore {
    snapshot: PathBuf,
    journal_path: PathBuf,
    /// Open once the journal was made by this process; None until then, or after a write
    /// failed (the next compaction makes a new one).
    journal: Option<File>,
    epoch: u64,
    /// Where the next frame goes.
    end: u64,
    capacity: u64,
    /// The frame being built (kept for its allocation).
    buf: Vec<u8>,
    /// The least capacity a new journal is made with.
    min_capacity: u64,
}

impl LeaseStore {
    /// The store whose snapshot is `snapshot` (the journal is beside it, `.journal`).
    pub fn new(snapshot: PathBuf) -> LeaseStore {
        LeaseStore {
            journal_path: snapshot.with_extension("journal"),
            snapshot,
            journal: None,
            epoch: 0,
            end: 0,
            capacity: 0,
            buf: Vec::new(),
            min_capacity: JOURNAL_BYTES,
        }
    }

    /// A store whose journals are made with `bytes` (tests: to fill one quickly).
    pub fn with_journal_bytes(snapshot: PathBuf, bytes: u64) -> LeaseStore {
        let mut s = LeaseStore::new(snapshot);
        s.min_capacity = bytes.max((HEADER_LEN + END_MARK.len()) as u64 + 64);
        s
    }

    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot
    }

    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    /// Reads the snapshot and replays the journal onto it; files that cannot be read are set
    /// aside (see the module's comment). Call `compact` next: the journal is not written to
    /// until then.
    pub fn load(&mut self, clock: &WallClock) -> io::Result<Loaded> {
        let (mut table, snap_epoch, snapshot) =
            match read_bounded(&self.snapshot, JOURNAL_MAX_BYTES * 4)? {
                None => (Tables::default(), Some(0), Snapshot::Missing),
                Some(bytes) => match bytes.and_then(|b| decode(&b, clock)) {
                    Ok(d) => {
                        let n = d.leases.len() + d.leases6.len();
                        let t = Tables {
                            v4: d.leases.into_iter().map(|l| (l.id, l)).collect(),
                            v6: d.leases6.into_iter().map(|l| (l.id, l)).collect(),
                        };
                        (t, Some(d.epoch), Snapshot::Read(n))
                    }
                    Err(reason) => {
                        let moved_to = set_aside(&self.snapshot)?;
                        (
                            Tables::default(),
                            None,
                            Snapshot::Corrupt { reason, moved_to },
                        )
                    }
                },
            };
        self.epoch = snap_epoch.unwrap_or(0);
        let journal = match read_bounded(&self.journal_path, JOURNAL_MAX_BYTES)? {
            None => Journal::Missing,
            Some(bytes) => {
                let parsed = bytes.and_then(|b| parse_header(&b).map(|e| (b, e)));
                match (parsed, snap_epoch) {
                    (Err(reason), _) => Journal::SetAside {
                        reason,
                        moved_to: set_aside(&self.journal_path)?,
                        applied: 0,
                    },
                    (Ok((_, e)), None) => {
                        self.epoch = self.epoch.max(e);
                        Journal::SetAside {
                            reason: "its snapshot was set aside".into(),
                            moved_to: set_aside(&self.journal_path)?,
                            applied: 0,
                        }
                    }
                    (Ok((_, e)), Some(s)) if e != s => {
                        self.epoch = self.epoch.max(e);
                        Journal::Folded
                    }
                    (Ok((b, e)), Some(_)) => match replay(&b, e, clock, &mut table) {
                        Replay::Clean { frames, records } => Journal::Replayed {
                            frames,
                            records,
                            torn: false,
                        },
                        Replay::Torn { frames, records } => Journal::Replayed {
                            frames,
                            records,
                            torn: true,
                        },
                        Replay::Damaged { frames, reason } => Journal::SetAside {
                            reason,
                            moved_to: set_aside(&self.journal_path)?,
                            applied: frames,
                        },
                    },
                }
            }
        };
        Ok(Loaded {
            leases: table.v4.into_values().collect(),
            leases6: table.v6.into_values().collect(),
            snapshot,
            journal,
        })
    }

    /// `compact_all` of a table without DHCPv6 leases.
    pub fn compact<'a>(
        &mut self,
        leases: impl Iterator<Item = &'a Lease>,
        clock: &WallClock,
    ) -> io::Result<()> {
        self.compact_all(leases, std::iter::empty(), clock)
    }

    /// Writes the whole table as a new snapshot (the next epoch), then restarts the journal at
    /// that epoch: in place when it is open and large enough, else as a new file.
    pub fn compact_all<'a, 'b>(
        &mut self,
        leases: impl Iterator<Item = &'a Lease>,
        leases6: impl Iterator<Item = &'b Lease6>,
        clock: &WallClock,
    ) -> io::Result<()> {
        let epoch = self.epoch + 1;
        let bytes = encode(leases, leases6, clock, epoch);
        write_atomically(&self.snapshot, &bytes)?;
        self.epoch = epoch;
        let want = (bytes.len() as u64)
            .saturating_mul(4)
            .next_power_of_two()
            .clamp(self.min_capacity, JOURNAL_MAX_BYTES.max(self.min_capacity));
        let restarted = match &self.journal {
            Some(f) if self.capacity >= want || self.capacity >= JOURNAL_MAX_BYTES => {
                let mut start = header(epoch).to_vec();
                start.extend_from_slice(&END_MARK);
                f.write_all_at(&start, 0).and_then(|()| f.sync_data())
            }
            _ => self.make_journal(epoch, want),
        };
        if let Err(e) = restarted {
            self.journal = None;
            return Err(e);
        }
        self.end = HEADER_LEN as u64;
        Ok(())
    }

    /// Makes the frames appended without a sync durable.
    pub fn sync(&mut self) -> io::Result<()> {
        let Some(f) = &self.journal else {
            return Ok(());
        };
        let r = f.sync_data();
        if r.is_err() {
            self.journal = None;
        }
        r
    }

    /// A new journal of `capacity` bytes, zero-filled and synced, renamed into place.
    fn make_journal(&mut self, epoch: u64, capacity: u64) -> io::Result<()> {
        self.journal = None;
        let tmp = self.journal_path.with_extension("journal.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&header(epoch))?;
        let zeros = vec![0u8; 64 << 10];
        let mut left = capacity - HEADER_LEN as u64;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.journal_path)?;
        let dir = self.journal_path.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()?;
        self.journal = Some(f);
        self.capacity = capacity;
        Ok(())
    }

    /// Appends one frame of `changes`, and syncs it (and every frame before it) when `sync`.
    /// `Ok(false)`: it does not fit (or there is no journal): compact instead. After an error
    /// the journal is dropped; compact.
    pub fn append<'a>(
        &mut self,
        changes: impl Iterator<Item = Change<'a>>,
        clock: &WallClock,
        sync: bool,
    ) -> io::Result<bool> {
        let Some(f) = &self.journal else {
            return Ok(false);
        };
        self.buf.clear();
        self.buf.resize(FRAME_HEAD, 0);
        for c in changes {
            encode_record(c, clock, &mut self.buf);
        }
        let len = self.buf.len() - FRAME_HEAD;
        if len == 0 {
            return if sync {
                self.sync().map(|()| true)
            } else {
                Ok(true)
            };
        }
        let total = (self.buf.len() + END_MARK.len()) as u64;
        if len > u32::MAX as usize || self.end + total > self.capacity {
            return Ok(false);
        }
        let crc = frame_crc(self.epoch, &self.buf[FRAME_HEAD..]);
        self.buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.buf[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        self.buf.extend_from_slice(&END_MARK);
        let written =
            f.write_all_at(&self.buf, self.end)
                .and_then(|()| if sync { f.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            self.journal = None;
            return Err(e);
        }
        self.end += total - END_MARK.len() as u64;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: u32, ip: [u8; 4], secs: u64) -> Lease {
        Lease {
            id,
            leased_at: Instant::from_secs(secs),
            expires_at: Instant::from_secs(secs + 7200),
            mac: Mac([0x02, 0, 0, 0, 0, id as u8]),
            ip: Ipv4Addr::from(ip),
            host_name: format!("guest-{id}"),
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hubnat-leases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn clock() -> WallClock {
        WallClock {
            origin: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    /// The table a fresh store finds in `path`, and what it found.
    fn reload(path: &Path) -> (Vec<Lease>, Loaded) {
        let l = LeaseStore::new(path.to_owned()).load(&clock()).unwrap();
        (l.leases.clone(), l)
    }

    fn ids(leases: &[Lease]) -> Vec<u32> {
        leases.iter().map(|l| l.id).collect()
    }

    fn aside(d: &Path, prefix: &str) -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{prefix}.corrupt-"))
            })
            .collect()
    }

    #[test]
    fn a_table_survives_a_restart_at_a_later_origin() {
        let first = clock();
        let leases = [
            lease(1, [192, 168, 30, 10], 5),
            lease(7, [192, 168, 30, 11], 100),
        ];
        let d = dir("restart");
        let path = d.join(LEASE_FILE);
        let mut store = LeaseStore::new(path.clone());
        store.compact(leases.iter(), &first).unwrap();
        // The next run started 50 s after the first one.
        let second = WallClock {
            origin: first.origin + Duration::from_secs(50),
        };
        let loaded = LeaseStore::new(path.clone()).load(&second).unwrap();
        assert!(matches!(loaded.snapshot, Snapshot::Read(2)), "{loaded:?}");
        let back = loaded.leases;
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].id, 7);
        assert_eq!(back[1].mac, leases[1].mac);
        assert_eq!(back[1].ip, leases[1].ip);
        assert_eq!(back[1].host_name, "guest-7");
        assert_eq!(back[1].leased_at, Instant::from_secs(50));
        assert_eq!(back[1].expires_at, Instant::from_secs(100 + 7200 - 50));
        // Before the origin: clamped to it.
        assert_eq!(back[0].leased_at, Instant::ZERO);
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn changes_are_appended_and_replayed_onto_the_snapshot() {
        let d = dir("journal");
        let path = d.join(LEASE_FILE);
        let c = clock();
        let mut store = LeaseStore::new(path.clone());
        assert!(matches!(
            store.load(&c).unwrap().snapshot,
            Snapshot::Missing
        ));
        let a = lease(1, [192, 168, 30, 10], 5);
        store.compact([a.clone()].iter(), &c).unwrap();
        let size = std::fs::metadata(store.journal_path()).unwrap().len();
        assert_eq!(size, JOURNAL_BYTES);
        let b = lease(2, [192, 168, 30, 11], 6);
        let mut a2 = a.clone();
        a2.expires_at = Instant::from_secs(9000);
        a2.host_name = "renamed".into();
        assert!(store
            .append([Change::Put(&b), Change::Put(&a2)].into_iter(), &c, true)
            .unwrap());
        let c3 = lease(3, [192, 168, 30, 12], 7);
        assert!(store
            .append([Change::Remove(2), Change::Put(&c3)].into_iter(), &c, true)
            .unwrap());
        // A removal alone is appended without a sync; it is in the file all the same (and the
        // next synced frame makes it durable with it).
        assert!(store
            .append([Change::Remove(3)].into_iter(), &c, false)
            .unwrap());
        assert!(store
            .append([Change::Put(&c3)].into_iter(), &c, true)
            .unwrap());
        // Appends overwrite the zeros made at the start: the size (metadata) never changes.
        assert_eq!(std::fs::metadata(store.journal_path()).unwrap().len(), size);
        let (back, loaded) = reload(&path);
        assert!(
            matches!(
                loaded.journal,
                Journal::Replayed {
                    frames: 4,
                    records: 6,
                    torn: false
                }
            ),
            "{loaded:?}"
        );
        assert_eq!(back, vec![a2, c3]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_last_save_is_ignored_and_damage_before_a_good_save_sets_the_journal_aside() {
        let d = dir("torn");
        let path = d.join(LEASE_FILE);
        let c = clock();
        let mut store = LeaseStore::new(path.clone());
        store.compact(std::iter::empty(), &c).unwrap();
        let (a, b) = (lease(1, [10, 0, 0, 1], 1), lease(2, [10, 0, 0, 2], 1));
        store
            .append([Change::Put(&a)].into_iter(), &c, true)
            .unwrap();
        let second = store.end as usize;
        store
            .append([Change::Put(&b)].into_iter(), &c, true)
            .unwrap();
        let end = store.end as usize;
        let good = std::fs::read(store.journal_path()).unwrap();

        // A crash in the middle of the second save: part of its frame reached the disk.
        for cut in [second + 3, second + FRAME_HEAD + 5, end - 1] {
            let mut torn = good.clone();
            torn[cut..end + END_MARK.len()].fill(0);
            torn[second..cut].copy_from_slice(&good[second..cut]);
            std::fs::write(store.journal_path(), &torn).unwrap();
            let (back, loaded) = reload(&path);
            assert_eq!(ids(&back), [1], "cut at {cut}: {loaded:?}");
            assert!(
                matches!(
                    loaded.journal,
                    Journal::Replayed {
                        frames: 1,
                        torn: true,
                        ..
                    }
                ),
                "{loaded:?}"
            );
        }

        // Damage to the first save while the second is whole: not a crash.
        let mut bad = good.clone();
        bad[HEADER_LEN + FRAME_HEAD + 2] ^= 0xff;
        std::fs::write(store.journal_path(), &bad).unwrap();
        let (back, loaded) = reload(&path);
        assert!(back.is_empty());
        assert!(
            matches!(loaded.journal, Journal::SetAside { applied: 0, .. }),
            "{loaded:?}"
        );
        let moved = aside(&d, "leases.journal");
        assert_eq!(moved.len(), 1);
        assert_eq!(std::fs::read(&moved[0]).unwrap(), bad, "kept as it was");
        assert!(!store.journal_path().exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_full_journal_asks_for_a_compaction_which_restarts_it_in_place() {
        let d = dir("compact");
        let path = d.join(LEASE_FILE);
        let c = clock();
        let mut store = LeaseStore::with_journal_bytes(path.clone(), 4096);
        store.compact(std::iter::empty(), &c).unwrap();
        let mut table: BTreeMap<u32, Lease> = BTreeMap::new();
        let mut compactions = 0;
        for i in 1..=200u32 {
            let l = lease(i, [10, 0, (i >> 8) as u8, i as u8], u64::from(i));
            // A table that stays small: its journal is restarted in place, not made larger.
            table.insert(i, l.clone());
            if i > 1 {
                table.remove(&(i - 1));
            }
            let changes: Vec<Change<'_>> = if i > 1 {
                vec![Change::Put(&l), Change::Remove(i - 1)]
            } else {
                vec![Change::Put(&l)]
            };
            if !store.append(changes.into_iter(), &c, true).unwrap() {
                store.compact(table.values(), &c).unwrap();
                compactions += 1;
            }
            // After every save, what a restart finds is the table.
            if i % 37 == 0 || i == 200 {
                let (back, _) = reload(&path);
                assert_eq!(back, table.values().cloned().collect::<Vec<_>>(), "at {i}");
            }
        }
        assert!(compactions >= 3, "{compactions}");
        let (_, loaded) = reload(&path);
        assert!(matches!(loaded.journal, Journal::Replayed { .. }));

        // A crash after a compaction's snapshot, before its journal restarted: the old journal
        // (its changes all in the snapshot) is ignored, not replayed twice.
        let old = std::fs::read(store.journal_path()).unwrap();
        let before = store.epoch;
        store.compact(table.values(), &c).unwrap();
        assert_eq!(store.epoch, before + 1);
        std::fs::write(store.journal_path(), &old).unwrap();
        let (back, loaded) = reload(&path);
        assert!(matches!(loaded.journal, Journal::Folded), "{loaded:?}");
        assert_eq!(back, table.values().cloned().collect::<Vec<_>>());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_journal_grows_with_the_table() {
        let d = dir("grow");
        let path = d.join(LEASE_FILE);
        let c = clock();
        let mut store = LeaseStore::new(path.clone());
        let many: Vec<Lease> = (1..=5000u32)
            .map(|i| lease(i, [10, 1, (i >> 8) as u8, i as u8], 1))
            .collect();
        store.compact(many.iter(), &c).unwrap();
        let snap = std::fs::metadata(&path).unwrap().len();
        let journal = std::fs::metadata(store.journal_path()).unwrap().len();
        assert!(
            journal >= 4 * snap && journal <= JOURNAL_MAX_BYTES,
            "{snap} {journal}"
        );
        assert_eq!(reload(&path).0.len(), 5000);
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn lease6(id: u32, last: u16, secs: u64) -> Lease6 {
        Lease6 {
            id,
            leased_at: Instant::from_secs(secs),
            expires_at: Instant::from_secs(secs + 7200),
            mac: Mac([0x02, 0, 0, 0, 6, id as u8]),
            ip: Ipv6Addr::new(0xfd68, 0x7562, 0x6e61, 0x1e, 0, 0, 0, 0x1000 + last),
            duid: vec![0, 3, 0, 1, 2, 0, 0, 0, 6, id as u8],
            iaid: id * 10,
        }
    }

    #[test]
    fn dhcpv6_leases_share_the_files() {
        let d = dir("v6");
        let path = d.join(LEASE_FILE);
        let c = clock();
        let mut store = LeaseStore::new(path.clone());
        let a = lease(1, [192, 168, 30, 10], 5);
        let x = lease6(1, 0, 5);
        store
            .compact_all([a.clone()].iter(), [x.clone()].iter(), &c)
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"leases6\"") && text.contains(&x.duid_hex()),
            "{text}"
        );
        let loaded = LeaseStore::new(path.clone()).load(&c).unwrap();
        assert_eq!(loaded.leases, vec![a.clone()]);
        assert_eq!(loaded.leases6, vec![x.clone()]);
        assert!(matches!(loaded.snapshot, Snapshot::Read(2)), "{loaded:?}");

        // Journal records of both families, in one frame and apart.
        let y = lease6(2, 1, 6);
        let mut x2 = x.clone();
        x2.expires_at = Instant::from_secs(9000);
        let b = lease(2, [192, 168, 30, 11], 6);
        assert!(store
            .append(
                [Change::Put6(&y), Change::Put(&b), Change::Put6(&x2)].into_iter(),
                &c,
                true
            )
            .unwrap());
        assert!(store
            .append(
                [Change::Remove6(2), Change::Remove(1)].into_iter(),
                &c,
                true
            )
            .unwrap());
        let loaded = LeaseStore::new(path.clone()).load(&c).unwrap();
        assert_eq!(loaded.leases, vec![b.clone()]);
        assert_eq!(loaded.leases6, vec![x2.clone()]);
        assert!(
            matches!(
                loaded.journal,
                Journal::Replayed {
                    frames: 2,
                    records: 5,
                    torn: false
                }
            ),
            "{loaded:?}"
        );
        // A table with no DHCPv6 lease is written as before it had them.
        store.compact(loaded.leases.iter(), &c).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("leases6"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_from_before_dhcpv6_loads_and_bad_v6_entries_are_refused() {
        let d = dir("v6old");
        let path = d.join(LEASE_FILE);
        let c = clock();
        let old = br#"{"version": 1, "saved_at": 0, "epoch": 3, "leases": [{"id": 4, "mac": "02:00:00:00:00:04", "ip": "192.168.30.14", "host_name": "old", "leased_at": 1700000000000, "expires_at": 1700007200000}]}"#;
        std::fs::write(&path, old).unwrap();
        let loaded = LeaseStore::new(path.clone()).load(&c).unwrap();
        assert_eq!(ids(&loaded.leases), [4]);
        assert!(loaded.leases6.is_empty());
        assert!(matches!(loaded.snapshot, Snapshot::Read(1)), "{loaded:?}");
        for bad in [r#""duid": "zz03""#, r#""duid": "0""#, r#""duid": """#] {
            let text = format!(
                r#"{{"version": 1, "saved_at": 0, "leases": [], "leases6": [{{"id": 1, "mac": "02:00:00:00:00:04", "ip": "fd00::1", {bad}, "iaid": 1, "leased_at": 0, "expires_at": 0}}]}}"#
            );
            assert!(decode(text.as_bytes(), &c).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_and_corrupt_files() {
        let c = clock();
        let d = dir("corrupt");
        let path = d.join(LEASE_FILE);
        for bad in [
            &b"{ not json"[..],
            br#"{"version": 9, "saved_at": 0, "leases": []}"#,
            br#"{"version": 1, "saved_at": 0, "leases": [{"id": 1, "mac": "zz", "ip": "192.168.30.10", "host_name": "", "leased_at": 0, "expires_at": 0}]}"#,
            b"",
        ] {
            let mut store = LeaseStore::new(path.clone());
            store.compact([lease(1, [10, 0, 0, 1], 1)].iter(), &c).unwrap();
            store
                .append([Change::Put(&lease(2, [10, 0, 0, 2], 1))].into_iter(), &c, true)
                .unwrap();
            std::fs::write(&path, bad).unwrap();
            let loaded = store.load(&c).unwrap();
            match loaded.snapshot {
                Snapshot::Corrupt { reason, moved_to } => {
                    assert!(!reason.is_empty());
                    assert!(!path.exists(), "the corrupt file is moved aside");
                    assert_eq!(std::fs::read(&moved_to).unwrap(), bad, "and kept as it was");
                    std::fs::remove_file(moved_to).unwrap();
                }
                other => panic!("{other:?}"),
            }
            // The journal's changes were to the table set aside: kept with it, not applied.
            assert!(loaded.leases.is_empty());
            assert!(matches!(loaded.journal, Journal::SetAside { .. }));
            for p in aside(&d, "leases.journal") {
                std::fs::remove_file(p).unwrap();
            }
            // The next compaction starts both files afresh.
            store.compact(std::iter::empty(), &c).unwrap();
            assert!(reload(&path).0.is_empty());
        }
        // A journal that is not one is set aside; the snapshot stands.
        std::fs::write(
            path.with_extension("journal"),
            b"garbage, long enough to be a header..",
        )
        .unwrap();
        let (back, loaded) = reload(&path);
        assert!(back.is_empty());
        assert!(matches!(
            loaded.journal,
            Journal::SetAside { applied: 0, .. }
        ));
        assert_eq!(aside(&d, "leases.journal").len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
