//! The security log: every `securenat` event written to a file as the seed writes it
//! (`2012-12-06 15:44:52.557 SecureNAT: ...`, local time) or as JSON lines.
//!
//! The layer only timestamps the event and hands it to a writer thread through a bounded queue,
//! so the data path never waits for the disk; a full queue loses the line and counts it (the
//! count is written to the log when there is room again). A "connection successful" line whose
//! host is still the bare address goes first to the reverse-lookup thread (`sock::resolve`) and is
//! written with the name it finds, stamped with the time of the event.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use chrono::{DateTime, Local};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::events;
use crate::reverse::{reverse_lookup, Resolver};
use hubnat_core::config::LogFormat;

/// Lines waiting for the writer.
pub const QUEUE: usize = 4096;
/// Lines waiting for a host name.
pub const LOOKUP_QUEUE: usize = 256;

/// One line on its way to the file.
#[derive(Debug)]
pub struct Line {
    pub time: DateTime<Local>,
    pub level: tracing::Level,
    pub event: Option<String>,
    pub message: String,
}

/// The timestamp of a text line, as the seed writes it (`2012-12-06 15:44:52.557`).
pub const TEXT_TIME: &str = "%Y-%m-%d %H:%M:%S%.3f";

impl Line {
    /// The line as the file holds it (with its newline).
    pub fn render(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Text => format!("{} {}\n", self.time.format(TEXT_TIME), self.message),
            LogFormat::Json => {
                let fields =
                    json_fields(&self.time, self.level, &self.message, self.event.as_deref());
                let mut s = serde_json::Value::Object(fields).to_string();
                s.push('\n');
                s
            }
        }
    }
}

/// The fields of a JSON line: `time` (RFC 3339 with milliseconds), `level`, `message`, and
/// `event` when the line has one. The control socket's event stream (`stream`) begins each of
/// its lines with these, so that the two name the same things alike.
pub fn json_fields<Tz: chrono::TimeZone>(
    time: &DateTime<Tz>,
    level: tracing::Level,
    message: &str,
    event: Option<&str>,
) -> serde_json::Map<String, serde_json::Value>
where
    Tz::Offset: std::fmt::Display,
{
    let mut m = serde_json::Map::new();
    m.insert(
        "time".into(),
        time.to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
            .into(),
    );
    m.insert("level".into(), level.as_str().into());
    m.insert("message".into(), message.into());
    if let Some(e) = event {
        m.insert("event".into(), e.into());
    }
    m
}

struct Pending {
    line: Line,
    session: u32,
    port: u16,
}

/// The tracing layer; `open` starts its threads.
pub struct SecurityLog {
    tx: SyncSender<Line>,
    resolver: Option<Resolver<Pending>>,
    lost: Arc<AtomicU64>,
}

impl SecurityLog {
    /// Appends to `path` (created with mode 0640 if missing), rotated to `path.1` when it
    /// would grow past `max_bytes` (None: no cap). With `reverse_lookup` the host of
    /// "connection successful" lines is looked up.
    pub fn open(
        path: &Path,
        format: LogFormat,
        reverse_lookup: bool,
        max_bytes: Option<u64>,
    ) -> io::Result<SecurityLog> {
        let file = RotatingFile::open(path, max_bytes)?;
        let lookup: fn(IpAddr) -> Option<String> = self::reverse_lookup;
        Self::with_writer(Box::new(file), format, reverse_lookup.then_some(lookup))
    }

    /// The same over any writer, and with a chosen lookup function (tests).
    pub fn with_writer(
        mut out: Box<dyn Write + Send>,
        format: LogFormat,
        lookup: Option<fn(IpAddr) -> Option<String>>,
    ) -> io::Result<SecurityLog> {
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let lost_w = lost.clone();
        std::thread::Builder::new()
            .name("hubnat-seclog".into())
            .spawn(move || {
                for line in rx {
                    let n = lost_w.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        let note = Line {
                            time: Local::now(),
                            level: tracing::Level::WARN,
                            event: Some("lost".into()),
                            message: format!("SecureNAT: {n} security log lines were lost (the log could not keep up)."),
                        };
                        let _ = out.write_all(note.render(format).as_bytes());
                    }
                    if let Err(e) = out.write_all(line.render(format).as_bytes()) {
                        eprintln!("hubnat: cannot write the security log: {e}");
                    }
                    let _ = out.flush();
                }
            })?;
        let resolver = match lookup {
            Some(f) => {
                let tx = tx.clone();
                Some(Resolver::spawn(
                    LOOKUP_QUEUE,
                    f,
                    move |ip, name, mut p: Pending| {
                        if let Some(name) = name {
                            p.line.message =
                                events::tcp_connected_text(p.session, &name, ip, p.port);
                        }
                        // Not the data path: waiting for room here is fine.
                        let _ = tx.send(p.line);
                    },
                )?)
            }
            None => None,
        };
        Ok(SecurityLog { tx, resolver, lost })
    }

    fn send(&self, line: Line) {
        if self.tx.try_send(line).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The security log's file with a size cap: at the cap it is renamed to `FILE.1` (replacing
/// the one before) and a new file is begun, so the log takes at most twice the cap on disk.
/// Where the rename or the new file is refused (the directory is not hubnat's to write), lines
/// past the cap are dropped and counted rather than let the file grow.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max: Option<u64>,
    /// Lines dropped since the cap could not be kept by rotating.
    dropped: u64,
}

impl RotatingFile {
    /// Opens `path` for appending, capped at `max` bytes.
    pub fn open(path: &Path, max: Option<u64>) -> io::Result<RotatingFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            file,
            size,
            max,
            dropped: 0,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.max.is_some_and(|m| self.size + buf.len() as u64 > m) && self.size > 0 {
            if let Err(e) = self.rotate() {
                if self.dropped == 0 {
                    eprintln!(
                        "hubnat: the security log {} reached its size cap and cannot be rotated ({e}): lines are dropped",
                        self.path.display()
                    );
                }
                self.dropped += 1;
                // Taken as written: the caller must not retry a line the cap refused.
                return Ok(buf.len());
            }
            if self.dropped > 0 {
                let note = format!(
                    "SecureNAT: {} security log lines were dropped at the size cap.\n",
                    std::mem::take(&mut self.dropped)
                );
                self.size += note.len() as u64;
                self.file.write_all(note.as_bytes())?;
            }
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// The fields of a `securenat` event.
#[derive(Default)]
struct Fields {
    message: String,
    event: Option<String>,
    session: Option<u32>,
    ip: Option<String>,
    port: Option<u16>,
    host_name: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "ip" => self.ip = Some(format!("{value:?}")),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "event" => self.event = Some(value.to_owned()),
            "host_name" => self.host_name = Some(value.to_owned()),
            "ip" => self.ip = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "session" => self.session = u32::try_from(value).ok(),
            "port" => self.port = u16::try_from(value).ok(),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }
}

impl<S: Subscriber> Layer<S> for SecurityLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if meta.target() != events::TARGET {
            return;
        }
        let time = Local::now();
        let mut f = Fields::default();
        event.record(&mut f);
        let line = Line {
            time,
            level: *meta.level(),
            event: f.event.clone(),
            message: f.message,
        };
        if let (Some(r), Some(events::TCP_CONNECTED), Some(session), Some(ip), Some(port)) = (
            &self.resolver,
            f.event.as_deref(),
            f.session,
            f.ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()),
            f.port,
        ) {
            if f.host_name.as_deref() == Some(&ip.to_string()) {
                let p = Pending {
                    line,
                    session,
                    port,
                };
                if let Err(p) = r.submit(ip, p) {
                    // Lookups are backed up: the line goes out with the address as its name.
                    self.send(p.line);
                }
                return;
            }
        }
        self.send(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_core::event::Event;
    use hubnat_runtime::events::EventSink;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
        fn wait_lines(&self, n: usize) -> String {
            for _ in 0..200 {
                let t = self.text();
                if t.lines().count() >= n {
                    return t;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("expected {n} lines, have:\n{}", self.text());
        }
    }

    fn fake_lookup(ip: IpAddr) -> Option<String> {
        (ip == IpAddr::from([207, 46, 0, 166])).then(|| "baym-sb26.msgr.hotmail.com".into())
    }

    fn emit_seed_example() {
        let mac: hubnat_core::Mac = "00-AC-85-40-B5-50".parse().unwrap();
        let c = Ipv4Addr::new(192, 168, 30, 10);
        let src = std::net::SocketAddrV4::new(c, 1079);
        let dst = std::net::SocketAddrV4::new(Ipv4Addr::new(207, 46, 0, 166), 1863);
        let tcp = hubnat_core::nat::Proto::Tcp;
        for e in [
            Event::DhcpEntryCreated {
                id: 1,
                mac,
                ip: c,
                host_name: "NT4".into(),
                lease: Duration::from_secs(7200),
            },
            Event::SessionCreated {
                proto: tcp,
                id: 1,
                src: std::net::SocketAddr::from(src),
                dst: std::net::SocketAddr::from(dst),
            },
            Event::TcpConnected {
                id: 1,
                ip: std::net::IpAddr::from(*dst.ip()),
                port: 1863,
            },
            Event::SessionDeleted { proto: tcp, id: 1 },
        ] {
            events::TracingSink::new(0).event(&e);
        }
        tracing::info!(target: "other", "not for the security log");
    }

    #[test]
    fn text_lines_have_the_seeds_form_and_the_looked_up_name() {
        let buf = Buf::default();
        let layer =
            SecurityLog::with_writer(Box::new(buf.clone()), LogFormat::Text, Some(fake_lookup))
                .unwrap();
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, emit_seed_example);
        let text = buf.wait_lines(4);
        let ts = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} SecureNAT: ";
        let want = [
            "The DHCP entry 1 was created. MAC address: 00-AC-85-40-B5-50, IP address: 192.168.30.10, host name: NT4, expiration date: 7200 seconds",
            "The TCP session 1 was created. Connection source 192.168.30.10:1079, Connection destination 207.46.0.166:1863",
            "The connection to TCP session 1: Host \"baym-sb26.msgr.hotmail.com (207.46.0.166)\", Port 1863 was successful.",
            "The TCP session 1 was deleted.",
        ];
        assert_eq!(text.lines().count(), 4, "{text}");
        for w in want {
            let line = text
                .lines()
                .find(|l| l.ends_with(w))
                .unwrap_or_else(|| panic!("no `{w}` in\n{text}"));
            let head = &line[..line.len() - w.len()];
            assert_eq!(
                head.len(),
                "2012-12-06 15:44:52.557 SecureNAT: ".len(),
                "{line}"
            );
            assert!(head.ends_with(" SecureNAT: "));
            let d = &head[..23];
            assert!(
                d.chars().enumerate().all(|(i, c)| match i {
                    4 | 7 => c == '-',
                    10 => c == ' ',
                    13 | 16 => c == ':',
                    19 => c == '.',
                    _ => c.is_ascii_digit(),
                }),
                "{line} vs {ts}"
            );
        }
    }

    #[test]
    fn json_lines_parse_and_carry_the_event() {
        let buf = Buf::default();
        let layer = SecurityLog::with_writer(Box::new(buf.clone()), LogFormat::Json, None).unwrap();
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, emit_seed_example);
        let text = buf.wait_lines(4);
        let v: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v.len(), 4);
        assert!(v[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("SecureNAT: The DHCP entry 1 was created."));
        assert!(v[0]["time"].as_str().unwrap().contains('T'));
        assert_eq!(v[2]["event"], "tcp_connected");
        // Without lookups the address stands as the name.
        assert!(v[2]["message"]
            .as_str()
            .unwrap()
            .contains("Host \"207.46.0.166 (207.46.0.166)\""));
    }

    #[test]
    fn the_file_is_rotated_at_its_cap_and_keeps_one_old_file() {
        let dir = std::env::temp_dir().join(format!("hubnat-seclog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("security.log");
        let mut f = RotatingFile::open(&path, Some(100)).unwrap();
        for i in 0..30 {
            writeln!(f, "line {i:03} of the security log").unwrap();
        }
        let cur = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("security.log.1")).unwrap();
        assert!(
            cur.len() <= 100 && old.len() <= 100,
            "{} {}",
            cur.len(),
            old.len()
        );
        assert!(cur.ends_with("line 029 of the security log\n"), "{cur}");
        assert!(old.lines().count() >= 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
