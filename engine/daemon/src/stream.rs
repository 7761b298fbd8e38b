//! The control socket's event stream (`{"cmd":"events"}`, `hubnat events`): every event the
//! security log records, and every configuration change, as one JSON object per line to each
//! client that asked for them.
//!
//! Events happen on every thread; the streams are connections of the control thread. The data
//! path's part is `EventHub::publish`: one relaxed load while no one streams, otherwise the
//! event and its time pushed into a bounded lock-free queue (a full queue drops the event and
//! counts it), and one byte to wake the control thread when the queue was idle since its last
//! look. The control thread drains the queue each loop turn, renders each event once, and
//! appends the line to every stream's bounded buffer (`Subscription`). A client that does not
//! read loses lines, which are counted and reported by a `lost` line once it has room again:
//! no client slows hubnat or makes its memory grow.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, Local, Utc};
use crossbeam_queue::ArrayQueue;
use serde_json::{Map, Value};

use hubnat_core::event::Event;
use hubnat_runtime::events::EventSink;

use crate::{events, seclog};

/// Events waiting for the control thread.
pub const QUEUE: usize = 4096;
/// Streams open at once (each also takes one of the control socket's connection slots).
pub const MAX_STREAMS: usize = 8;
/// Bytes a stream may have waiting for its client; past that, lines are lost until the client
/// has read half of them (then the count of lost lines is written, and lines again).
pub const MAX_BUFFERED: usize = 256 << 10;

/// What a line is about.
enum What {
    Event(Event),
    /// A configuration change (`source` as the log says it: "control socket", ...).
    Change {
        source: &'static str,
        change: String,
    },
}

/// One published thing and when it happened.
struct Record {
    time: SystemTime,
    what: What,
}

/// Where the threads publish and the control thread collects (see the module's comment).
pub struct EventHub {
    streams: AtomicUsize,
    queue: ArrayQueue<Record>,
    /// Published while the queue was full (every stream lost them).
    dropped: AtomicU64,
    /// Something was published since the control thread last drained: a publisher that sets it
    /// writes the wake-up byte, so there is one per drain, not one per event.
    armed: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl EventHub {
    /// A hub with its wake-up pair (register `wake_fd` with the control thread's poll).
    pub fn new() -> io::Result<Arc<EventHub>> {
        EventHub::with_capacity(QUEUE)
    }

    fn with_capacity(capacity: usize) -> io::Result<Arc<EventHub>> {
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        wake_tx.set_nonblocking(true)?;
        Ok(Arc::new(EventHub {
            streams: AtomicUsize::new(0),
            queue: ArrayQueue::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            wake_tx,
            wake_rx,
        }))
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Any thread: `e` for the streams, if there are any.
    pub fn publish(&self, e: &Event) {
        if self.streams() == 0 {
            return;
        }
        self.push(|| What::Event(e.clone()));
    }

    /// The control thread: a configuration change (as the log line says it) for the streams.
    pub fn publish_change(&self, source: &'static str, change: &str) {
        if self.streams() == 0 {
            return;
        }
        self.push(|| What::Change {
            source,
            change: change.to_owned(),
        });
    }

    fn push(&self, what: impl FnOnce() -> What) {
        // Checked first so that a flood against a full queue costs no copy of each event.
        if self.queue.is_full() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let r = Record {
            time: SystemTime::now(),
            what: what(),
        };
        if self.queue.push(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // AcqRel: the control thread's swap that reads this makes the push above visible.
        if !self.armed.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    fn wake(&self) {
        // A full socket means a wake-up is pending already.
        let _ = (&self.wake_tx).write(&[1]);
    }

    /// The descriptor that is readable when something was published.
    pub fn wake_fd(&self) -> RawFd {
        self.wake_rx.as_raw_fd()
    }

    /// Empties the wake-up socket (its poll is edge-triggered: read until it would block).
    pub fn clear_wake(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut b), Ok(n) if n > 0) {}
    }

    /// The control thread: appends the lines published since the last call to `lines` (at most
    /// the queue's capacity; the rest wake the next turn) and returns how many were dropped at
    /// a full queue meanwhile. Without streams, what is left is dropped unrendered.
    pub fn drain(&self, lines: &mut Vec<String>) -> u64 {
        if !self.armed.load(Ordering::Relaxed) || !self.armed.swap(false, Ordering::AcqRel) {
            return 0;
        }
        let render = self.streams() > 0;
        for _ in 0..self.queue.capacity() {
            match self.queue.pop() {
                Some(r) if render => lines.push(render_record(&r)),
                Some(_) => {}
                None => break,
            }
        }
        if !self.queue.is_empty() {
            self.armed.store(true, Ordering::Release);
            self.wake();
        }
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// A new stream, unless `MAX_STREAMS` are open. Only the control thread subscribes, so the
    /// check and the count cannot race.
    pub fn subscribe(self: &Arc<Self>) -> Option<Subscription> {
        if self.streams() >= MAX_STREAMS {
            return None;
        }
        self.streams.fetch_add(1, Ordering::Relaxed);
        Some(Subscription {
            hub: self.clone(),
            lost: 0,
        })
    }
}

/// The runtime's sink while events are streamed: each event goes to the security log's sink
/// (rate-limited there, for the log's sake) and to the hub (bounded there, for the streams').
pub struct TeeSink<S> {
    log: S,
    hub: Option<Arc<EventHub>>,
}

impl<S: EventSink> TeeSink<S> {
    pub fn new(log: S, hub: Option<Arc<EventHub>>) -> TeeSink<S> {
        TeeSink { log, hub }
    }
}

impl<S: EventSink> EventSink for TeeSink<S> {
    fn event(&self, e: &Event) {
        self.log.event(e);
        if let Some(h) = &self.hub {
            h.publish(e);
        }
    }
}

/// One stream on the control thread: the lines its client lost. Dropping it (the connection
/// closed) frees its place among the `MAX_STREAMS`.
pub struct Subscription {
    hub: Arc<EventHub>,
    lost: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Subscription {
    /// Lines lost and not yet reported.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Counts `n` more lines lost (they never reached this stream).
    pub fn lose(&mut self, n: u64) {
        self.lost += n;
    }

    /// Whether `line` would be taken now into `out`, of which the first `sent` bytes are
    /// written already.
    pub fn fits(&self, out: &[u8], sent: usize, line: &str) -> bool {
        self.lost == 0 && out.len() - sent + line.len() <= MAX_BUFFERED
    }

    /// Appends `line` to `out` (the connection's output, of which `sent` bytes are written), or
    /// counts it lost when the client is too far behind. Once lines were lost, the client must
    /// catch up (read half the buffer) before the `lost` line and then lines are written
    /// again: it never sees a gap without its count, nor a count per line when it reads a
    /// little slower than events come.
    pub fn offer(&mut self, out: &mut Vec<u8>, sent: &mut usize, line: &str) {
        self.catch_up(out, sent);
        if !self.fits(out, *sent, line) {
            self.lost += 1;
            return;
        }
        compact(out, sent);
        out.extend_from_slice(line.as_bytes());
    }

    /// Appends the `lost` line when lines were lost and the client has caught up.
    pub fn catch_up(&mut self, out: &mut Vec<u8>, sent: &mut usize) {
        if self.lost == 0 || out.len() - *sent > MAX_BUFFERED / 2 {
            return;
        }
        let note = render_lost(self.lost, SystemTime::now());
        compact(out, sent);
        out.extend_from_slice(note.as_bytes());
        self.lost = 0;
    }
}

/// Drops the written part of `out`, so that a client that keeps up only partly holds at most
/// what it has not read, not everything since its buffer was last empty.
fn compact(out: &mut Vec<u8>, sent: &mut usize) {
    if *sent > 0 {
        out.drain(..*sent);
        *sent = 0;
    }
}

/// The snake_case name of `e`'s variant: a line's `kind`.
pub fn kind(e: &Event) -> &'static str {
    match e {
        Event::DhcpEntryCreated { .. } => "dhcp_entry_created",
        Event::DhcpEntryDeleted { .. } => "dhcp_entry_deleted",
        Event::Dhcp6EntryCreated { .. } => "dhcp6_entry_created",
        Event::Dhcp6EntryDeleted { .. } => "dhcp6_entry_deleted",
        Event::DhcpPoolExhausted { .. } => "dhcp_pool_exhausted",
        Event::SessionCreated { .. } => "session_created",
        Event::InboundSessionCreated { .. } => "inbound_session_created",
        Event::SessionDeleted { .. } => "session_deleted",
        Event::TcpConnected { .. } => "tcp_connected",
        Event::EgressRefused { .. } => "egress_refused",
        Event::TcpConnectFailed { .. } => "tcp_connect_failed",
    }
}

/// `e`'s own fields. Session ids are `session` (the name the security log's "connection
/// successful" event gives them); MACs are written as the seed and `dhcp-table` write them.
fn event_fields(e: &Event, m: &mut Map<String, Value>) {
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    match e {
        Event::DhcpEntryCreated {
            id,
            mac,
            ip,
            host_name,
            lease,
        } => {
            put("id", (*id).into());
            put("mac", mac.dashed().into());
            put("ip", ip.to_string().into());
            put("host_name", host_name.as_str().into());
            put("lease_secs", lease.as_secs().into());
        }
        Event::DhcpEntryDeleted { id, mac, ip } => {
            put("id", (*id).into());
            put("mac", mac.dashed().into());
            put("ip", ip.to_string().into());
        }
        Event::Dhcp6EntryCreated {
            id,
            mac,
            ip,
            duid,
            iaid,
            lease,
        } => {
            put("id", (*id).into());
            put("mac", mac.dashed().into());
            put("ip", ip.to_string().into());
            put("duid", duid.as_str().into());
            put("iaid", (*iaid).into());
            put("lease_secs", lease.as_secs().into());
        }
        Event::Dhcp6EntryDeleted { id, mac, ip } => {
            put("id", (*id).into());
            put("mac", mac.dashed().into());
            put("ip", ip.to_string().into());
        }
        Event::DhcpPoolExhausted { mac } => put("mac", mac.dashed().into()),
        Event::SessionCreated {
            proto,
            id,
            src,
            dst,
        }
        | Event::InboundSessionCreated {
            proto,
            id,
            src,
            dst,
        } => {
            put("proto", proto.name().into());
            put("session", (*id).into());
            put("src", src.to_string().into());
            put("dst", dst.to_string().into());
        }
        Event::SessionDeleted { proto, id } => {
            put("proto", proto.name().into());
            put("session", (*id).into());
        }
        Event::TcpConnected { id, ip, port } => {
            put("session", (*id).into());
            put("ip", ip.to_string().into());
            put("port", (*port).into());
        }
        Event::EgressRefused { proto, src, dst } => {
            put("proto", proto.name().into());
            put("src", src.to_string().into());
            put("dst", dst.to_string().into());
        }
        Event::TcpConnectFailed {
            id,
            ip,
            port,
            reason,
        } => {
            put("session", (*id).into());
            put("ip", ip.to_string().into());
            put("port", (*port).into());
            put("reason", reason.as_str().into());
        }
    }
}

/// A record as its line (with the newline): the security log's JSON fields (time in UTC),
/// `kind`, then the event's own.
fn render_record(r: &Record) -> String {
    let time: DateTime<Utc> = r.time.into();
    let m = match &r.what {
        What::Event(e) => {
            let text = events::seed_text(e);
            let mut m = seclog::json_fields(&time, events::level(e), &text, events::event_field(e));
            m.insert("kind".into(), kind(e).into());
            event_fields(e, &mut m);
            m
        }
        What::Change { source, change } => {
            let text = format!("configuration changed ({source}): {change}");
            let mut m = seclog::json_fields(&time, tracing::Level::INFO, &text, None);
            m.insert("kind".into(), "config_changed".into());
            m.insert("source".into(), (*source).into());
            m.insert("change".into(), change.as_str().into());
            m
        }
    };
    line(m)
}

/// The line that says `count` lines were lost.
fn render_lost(count: u64, time: SystemTime) -> String {
    let time: DateTime<Utc> = time.into();
    let text = format!("SecureNAT: {count} events were lost (the stream's reader fell behind).");
    let mut m = seclog::json_fields(&time, tracing::Level::WARN, &text, Some("lost"));
    m.insert("kind".into(), "lost".into());
    m.insert("count".into(), count.into());
    line(m)
}

fn line(m: Map<String, Value>) -> String {
    let mut s = Value::Object(m).to_string();
    s.push('\n');
    s
}

/// Whether a line of `kind` is wanted by `--kinds` (`wanted`; empty: all). A word names every
/// kind that has it as one of its words (`session`: created, deleted and inbound; `dhcp`,
/// `tcp`, `config`, ...), or one kind whole. `lost` lines are always wanted: they say what the
/// others are missing.
pub fn kind_wanted(kind: &str, wanted: &[String]) -> bool {
    wanted.is_empty()
        || kind == "lost"
        || wanted
            .iter()
            .any(|w| kind == w || kind.split('_').any(|part| part == w))
}

/// A line as a person reads it: the local time as the security log's text writes it, then the
/// message (the seed's words); a line without a message is shown whole.
pub fn readable(v: &Value) -> String {
    let time = v["time"].as_str().unwrap_or("-");
    let local = DateTime::parse_from_rfc3339(time)
        .map(|t| {
            t.with_timezone(&Local)
                .format(seclog::TEXT_TIME)
                .to_string()
        })
        .unwrap_or_else(|_| time.to_owned());
    match v["message"].as_str() {
        Some(m) => format!("{local} {m}"),
        None => format!("{local} {v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_core::nat::Proto;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Duration;

    fn deleted(id: u32) -> Event {
        Event::SessionDeleted {
            proto: Proto::Udp,
            id,
        }
    }

    fn wake_bytes(hub: &EventHub) -> usize {
        let mut b = [0u8; 64];
        let mut n = 0;
        while let Ok(k) = (&hub.wake_rx).read(&mut b) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    }

    fn parse(lines: &[String]) -> Vec<Value> {
        lines
            .iter()
            .map(|l| {
                assert!(l.ends_with('\n'));
                serde_json::from_str(l).unwrap()
            })
            .collect()
    }

    #[test]
    fn without_a_stream_nothing_is_queued_and_no_one_is_woken() {
        let hub = EventHub::new().unwrap();
        for id in 0..100 {
            hub.publish(&deleted(id));
        }
        hub.publish_change("control socket", "nat.enabled: true -> false");
        assert!(hub.queue.is_empty());
        assert_eq!(wake_bytes(&hub), 0);
        let mut lines = Vec::new();
        assert_eq!(hub.drain(&mut lines), 0);
        assert!(lines.is_empty());
    }

    #[test]
    fn a_burst_wakes_the_control_thread_once_and_is_drained_in_order() {
        let hub = EventHub::new().unwrap();
        let sub = hub.subscribe().unwrap();
        for id in 0..50 {
            hub.publish(&deleted(id));
        }
        assert_eq!(wake_bytes(&hub), 1, "one wake-up per drain, not per event");
        let mut lines = Vec::new();
        assert_eq!(hub.drain(&mut lines), 0);
        let v = parse(&lines);
        assert_eq!(v.len(), 50);
        assert!(v.iter().enumerate().all(|(i, l)| l["session"] == i as u64));
        // Drained: the next event wakes again.
        hub.publish(&deleted(50));
        assert_eq!(wake_bytes(&hub), 1);
        drop(sub);
        assert_eq!(hub.streams(), 0);
        // Published before the last stream closed: drained without being rendered.
        lines.clear();
        hub.drain(&mut lines);
        assert!(lines.is_empty() && hub.queue.is_empty());
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_leftovers_wake_the_next_turn() {
        let hub = EventHub::with_capacity(4).unwrap();
        let _sub = hub.subscribe().unwrap();
        for id in 0..10 {
            hub.publish(&deleted(id));
        }
        let mut lines = Vec::new();
        assert_eq!(hub.drain(&mut lines), 6);
        assert_eq!(lines.len(), 4);
        assert_eq!(hub.drain(&mut Vec::new()), 0, "the count was taken");
    }

    #[test]
    fn no_more_than_max_streams() {
        let hub = EventHub::new().unwrap();
        let subs: Vec<_> = (0..MAX_STREAMS).map(|_| hub.subscribe().unwrap()).collect();
        assert!(hub.subscribe().is_none());
        drop(subs);
        assert_eq!(hub.streams(), 0);
        assert!(hub.subscribe().is_some());
    }

    #[test]
    fn a_client_that_does_not_read_loses_lines_then_hears_how_many() {
        let hub = EventHub::new().unwrap();
        let mut sub = hub.subscribe().unwrap();
        let line = format!("{{\"kind\":\"x\",\"pad\":\"{}\"}}\n", "p".repeat(1000));
        let (mut out, mut sent) = (Vec::new(), 0);
        let mut taken = 0;
        for _ in 0..1000 {
            let before = out.len();
            sub.offer(&mut out, &mut sent, &line);
            taken += usize::from(out.len() > before);
        }
        assert!(out.len() <= MAX_BUFFERED, "{}", out.len());
        assert_eq!(taken, MAX_BUFFERED / line.len());
        assert_eq!(sub.lost(), (1000 - taken) as u64);
        // A little read is not catching up: still lost, no count yet.
        sent = line.len() * 2;
        sub.offer(&mut out, &mut sent, &line);
        assert_eq!(sub.lost(), (1001 - taken) as u64);
        // Half read: the next line is preceded by the count, and the written part is given
        // back.
        sent = out.len() / 2;
        sub.offer(&mut out, &mut sent, &line);
        assert_eq!(sent, 0);
        let tail = String::from_utf8_lossy(&out);
        let notes: Vec<Value> = tail
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "lost")
            .collect();
        assert_eq!(notes.len(), 1, "{tail}");
        assert_eq!(notes[0]["count"], (1001 - taken) as u64);
        assert_eq!(notes[0]["event"], "lost");
        assert!(out.ends_with(line.as_bytes()));
        assert_eq!(sub.lost(), 0);
    }

    #[test]
    fn the_count_waits_for_room_and_no_line_passes_it() {
        let hub = EventHub::new().unwrap();
        let mut sub = hub.subscribe().unwrap();
        let big = format!("{}\n", "b".repeat(MAX_BUFFERED - 100));
        let (mut out, mut sent) = (Vec::new(), 0);
        sub.offer(&mut out, &mut sent, &big);
        sub.offer(
            &mut out,
            &mut sent,
            &format!("{{\"pad\":\"{}\"}}\n", "y".repeat(100)),
        );
        assert_eq!(sub.lost(), 1);
        // A small line that would fit is lost too: it would pass the count.
        sub.offer(&mut out, &mut sent, "{}\n");
        assert_eq!(sub.lost(), 2);
        // All written: the note goes alone (catch_up, as a writable socket calls it).
        sent = out.len();
        sub.catch_up(&mut out, &mut sent);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["kind"], "lost");
        assert_eq!(v["count"], 2);
    }

    #[test]
    fn lines_carry_the_security_logs_fields_the_kind_and_the_events_own() {
        let hub = EventHub::new().unwrap();
        let _sub = hub.subscribe().unwrap();
        let mac: hubnat_core::Mac = "00-AC-85-40-B5-50".parse().unwrap();
        let c = Ipv4Addr::new(192, 168, 30, 10);
        let far = Ipv4Addr::new(207, 46, 0, 166);
        let src = SocketAddrV4::new(c, 1079);
        let dst = SocketAddrV4::new(far, 1863);
        let all = [
            Event::DhcpEntryCreated {
                id: 1,
                mac,
                ip: c,
                host_name: "NT4".into(),
                lease: Duration::from_secs(7200),
            },
            Event::SessionCreated {
                proto: Proto::Tcp,
                id: 7,
                src: std::net::SocketAddr::from(src),
                dst: std::net::SocketAddr::from(dst),
            },
            Event::TcpConnected {
                id: 7,
                ip: std::net::IpAddr::from(far),
                port: 1863,
            },
            Event::SessionDeleted {
                proto: Proto::Tcp,
                id: 7,
            },
            Event::EgressRefused {
                proto: Proto::Udp,
                src: std::net::SocketAddr::from(src),
                dst: std::net::SocketAddr::from(dst),
            },
            Event::InboundSessionCreated {
                proto: Proto::Tcp,
                id: 8,
                src: std::net::SocketAddr::from(dst),
                dst: std::net::SocketAddr::from(src),
            },
            Event::TcpConnectFailed {
                id: 9,
                ip: std::net::IpAddr::from(far),
                port: 80,
                reason: "timed out".into(),
            },
            Event::DhcpEntryDeleted { id: 1, mac, ip: c },
            Event::DhcpPoolExhausted { mac },
            Event::Dhcp6EntryDeleted {
                id: 2,
                mac,
                ip: "fd68:7562:6e61:1e::1000".parse().unwrap(),
            },
        ];
        for e in &all {
            hub.publish(e);
        }
        hub.publish_change("control socket", "nat.enabled: true -> false");
        let mut lines = Vec::new();
        hub.drain(&mut lines);
        let v = parse(&lines);
        assert_eq!(v.len(), all.len() + 1);
        for (l, e) in v.iter().zip(&all) {
            assert_eq!(l["kind"], kind(e));
            assert_eq!(l["message"], events::seed_text(e));
            assert_eq!(l["level"], events::level(e).as_str());
            let t = l["time"].as_str().unwrap();
            let parsed = DateTime::parse_from_rfc3339(t).unwrap();
            assert_eq!(parsed.offset().local_minus_utc(), 0, "{t}");
            assert_eq!(t.len(), "2012-12-06T15:44:52.557+00:00".len(), "{t}");
        }
        let d = &v[0];
        assert_eq!(d["id"], 1);
        assert_eq!(d["mac"], "00-AC-85-40-B5-50");
        assert_eq!(d["ip"], "192.168.30.10");
        assert_eq!(d["host_name"], "NT4");
        assert_eq!(d["lease_secs"], 7200);
        assert_eq!(v[1]["proto"], "TCP");
        assert_eq!(v[1]["session"], 7);
        assert_eq!(v[1]["src"], "192.168.30.10:1079");
        assert_eq!(v[1]["dst"], "207.46.0.166:1863");
        assert_eq!(v[2]["session"], 7);
        assert_eq!(v[2]["ip"], "207.46.0.166");
        assert_eq!(v[2]["port"], 1863);
        assert_eq!(v[2]["event"], events::TCP_CONNECTED);
        assert_eq!(v[3]["session"], 7);
        assert_eq!(v[4]["level"], "WARN");
        assert_eq!(v[5]["event"], events::INBOUND_SESSION);
        assert_eq!(v[6]["reason"], "timed out");
        let c = &v[all.len()];
        assert_eq!(c["kind"], "config_changed");
        assert_eq!(c["source"], "control socket");
        assert_eq!(c["change"], "nat.enabled: true -> false");
        assert_eq!(
            c["message"],
            "configuration changed (control socket): nat.enabled: true -> false"
        );
    }

    #[test]
    fn the_sink_feeds_the_log_and_the_hub() {
        use std::sync::atomic::AtomicUsize;
        struct Count(AtomicUsize);
        impl EventSink for Count {
            fn event(&self, _: &Event) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let hub = EventHub::new().unwrap();
        let sink = TeeSink::new(Count(AtomicUsize::new(0)), Some(hub.clone()));
        sink.event(&deleted(1));
        let _sub = hub.subscribe().unwrap();
        sink.event(&deleted(2));
        assert_eq!(sink.log.0.load(Ordering::Relaxed), 2);
        let mut lines = Vec::new();
        hub.drain(&mut lines);
        assert_eq!(parse(&lines)[0]["session"], 2);
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn kinds_are_chosen_by_word_or_whole() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(kind_wanted("session_created", &[]));
        assert!(kind_wanted("session_created", &w(&["session"])));
        assert!(kind_wanted("inbound_session_created", &w(&["session"])));
        assert!(kind_wanted("dhcp_entry_deleted", &w(&["tcp", "dhcp"])));
        assert!(kind_wanted("tcp_connected", &w(&["tcp_connected"])));
        assert!(!kind_wanted("tcp_connected", &w(&["dhcp", "session"])));
        assert!(!kind_wanted("session_created", &w(&["sess"])));
        assert!(kind_wanted("lost", &w(&["dhcp"])));
    }

    #[test]
    fn a_readable_line_is_the_local_time_and_the_message() {
        let v: Value = serde_json::from_str(
            r#"{"time":"2012-12-06T15:44:52.557+00:00","kind":"session_deleted","message":"SecureNAT: The TCP session 1 was deleted."}"#,
        )
        .unwrap();
        let t = DateTime::parse_from_rfc3339("2012-12-06T15:44:52.557+00:00")
            .unwrap()
            .with_timezone(&Local)
            .format(seclog::TEXT_TIME)
            .to_string();
        assert_eq!(
            readable(&v),
            format!("{t} SecureNAT: The TCP session 1 was deleted.")
        );
        let bare: Value = serde_json::from_str(r#"{"kind":"x"}"#).unwrap();
        assert_eq!(readable(&bare), r#"- {"kind":"x"}"#);
    }
}
