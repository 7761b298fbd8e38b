//! `hubnat-testsrv`: the servers and clients the end-to-end tests run on both sides of the NAT.
//!
//! Every payload is a deterministic stream (from a seed), so each side can check what it got by
//! SHA-256 without the test having to ship the data.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hubnat_core::Mac;
use hubnat_runtime::port::af_packet::PacketSocket;
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    name = "hubnat-testsrv",
    about = "Test servers and clients for hubnat's end-to-end suite"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every UDP datagram back to its sender.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
        /// Take runs of datagrams as one (UDP_GRO) and echo each run in one send the kernel
        /// cuts (UDP_SEGMENT), as a QUIC server does.
        #[arg(long)]
        runs: bool,
    },
    /// Answer every DNS query with NOERROR and the A record 10.9.9.9, from a socket whose receive
    /// buffer (4 MiB, forced) holds a burst of thousands: an upstream that never drops, so that
    /// what a relay in front of it loses is its own.
    DnsAnswer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Echo each TCP connection's bytes back until it closes its side, then close.
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Read each connection to EOF, then answer with the SHA-256 (hex) of what arrived.
    TcpSink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send BYTES of the seeded stream on each connection, then close.
    TcpSource {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Upload BYTES to a tcp-sink and check the digest it answers with (after our FIN).
    Put {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Download from a tcp-source and check the bytes against the seeded stream.
    Get {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Send COUNT datagrams of SIZE bytes to a udp-echo and check every answer.
    UdpPing {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// Source port to bind (0: any).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Send ROUNDS runs of BATCH datagrams of SIZE bytes to a udp-echo, each run in one send
    /// the kernel cuts (UDP_SEGMENT), and check that every datagram comes back whole.
    UdpGsoPing {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        #[arg(long, default_value_t = 32)]
        batch: u32,
        #[arg(long, default_value_t = 1000)]
        size: usize,
    },
    /// Write crafted frames onto an interface (a misbehaving guest): floods and spoofs that the
    /// fair-share tests throw at hubnat. Runs where the interface is (the guest's namespace).
    Inject {
        /// The interface to write to (the guest's side of the segment).
        #[arg(long)]
        iface: String,
        /// Ethernet source of every frame.
        #[arg(long)]
        src_mac: String,
        /// Ethernet destination of unicast frames (the virtual host's MAC).
        #[arg(long, default_value = "ff:ff:ff:ff:ff:ff")]
        dst_mac: String,
        /// IPv4 source.
        #[arg(long, default_value = "0.0.0.0")]
        src_ip: std::net::Ipv4Addr,
        /// IPv4 destination.
        #[arg(long, default_value = "192.168.30.1")]
        dst_ip: std::net::Ipv4Addr,
        /// Destination ports, cycled (`LO-HI` or one port).
        #[arg(long, default_value = "1-65535")]
        ports: String,
        /// Frames to write.
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// What to write: `syn` (TCP SYNs), `udp` (a datagram per port), `dns` (queries to the
        /// destination's port 53), `frag` (first fragments never completed), `dhcp-starve`
        /// (INIT-REBOOT requests for the range's addresses, each with a made-up chaddr),
        /// `dhcp-release` / `dhcp-decline` (for `--client-mac` and `--src-ip`).
        #[arg(long)]
        kind: String,
        /// The client a DHCP release or decline names (chaddr).
        #[arg(long)]
        client_mac: Option<String>,
    },
    /// Open CONNS connections to a tcp-echo at once, send BYTES on each, check the echoes.
    Multi {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 200)]
        conns: u32,
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// Stand in for a QEMU guest of a hubnat socket port: make a TAP in a network namespace and
    /// relay its frames to and from hubnat's socket (QEMU's `-netdev stream` or `-netdev dgram`
    /// framing) until hubnat closes the connection (exit 0) or something fails (exit 1).
    SocketGuest {
        /// The guest's network namespace: a name made by `ip netns add`, a PID or a path.
        #[arg(long)]
        netns: String,
        /// The TAP device to make there.
        #[arg(long)]
        tap: String,
        /// The TAP device's MTU.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// hubnat's stream socket (`stream:PATH`) to connect to.
        #[arg(long, required_unless_present_any = ["dgram", "stream_stdin"], conflicts_with_all = ["dgram", "local", "stream_stdin"])]
        stream: Option<std::path::PathBuf>,
        /// The stream is this process's standard input: one end of a connected pair whose other
        /// end a launcher gave hubnat (`hubnat run --fd N`).
        #[arg(long, conflicts_with_all = ["dgram", "local"])]
        stream_stdin: bool,
        /// hubnat's datagram socket (`dgram:PATH`) to send to.
        #[arg(long, requires = "local")]
        dgram: Option<std::path::PathBuf>,
        /// The datagram socket to bind, where hubnat sends (with --dgram).
        #[arg(long, requires = "dgram")]
        local: Option<std::path::PathBuf>,
    },
}

/// The sequence number `udp-ping` writes at the start of each datagram.
fn seq_of(datagram: &[u8]) -> u32 {
    u32::from_be_bytes([datagram[0], datagram[1], datagram[2], datagram[3]])
}

/// The seeded byte stream (xorshift64*), generated in blocks.
struct Stream(u64);

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` of the stream (and hashes them).
fn send_stream(s: &mut TcpStream, bytes: u64, seed: u64) -> io::Result<String> {
    let mut st = Stream::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        st.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(hex(&h.finalize()))
}

fn digest_to_eof(s: &mut TcpStream) -> io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hex(&h.finalize())));
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
}

fn serve_tcp(
    listen: SocketAddr,
    handle: impl Fn(TcpStream) -> io::Result<()> + Send + Sync + Copy + 'static,
) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    eprintln!("listening on {listen}");
    for s in l.incoming() {
        let s = s?;
        std::thread::spawn(move || {
            if let Err(e) = handle(s) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}

/// The frames of `inject`, one per call of the returned closure (`i` counts from 0).
fn injected(
    kind: &str,
    src_mac: Mac,
    dst_mac: Mac,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    ports: (u16, u16),
    client_mac: Option<Mac>,
) -> Result<Box<dyn Fn(u32) -> Vec<u8>>> {
    use hubnat_replay::craft::{dhcp, ethernet, ipv4, tcp, udp, SYN};
    use smoltcp::wire::IpProtocol;
    let span = u32::from(ports.1 - ports.0) + 1;
    let port = move |i: u32| ports.0 + (i % span) as u16;
    let sport = |i: u32| 1024 + (i % 60000) as u16;
    let ip_frame = move |proto, ident: u32, frag, l4: &[u8]| {
        ethernet(
            dst_mac,
            src_mac,
            0x0800,
            &ipv4(src_ip, dst_ip, proto, ident as u16, frag, l4),
        )
    };
    // DHCP travels broadcast from 0.0.0.0:68 (or from the client's address when it has one).
    let dhcp_frame = move |msg: &[u8]| {
        let d = udp(
            SocketAddrV4::new(src_ip, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            msg,
        );
        let ip = ipv4(
            src_ip,
            Ipv4Addr::BROADCAST,
            IpProtocol::Udp,
            1,
            (0, false),
            &d,
        );
        ethernet(Mac::BROADCAST, src_mac, 0x0800, &ip)
    };
    Ok(match kind {
        "syn" => Box::new(move |i| {
            let seg = tcp(
                SocketAddrV4::new(src_ip, sport(i)),
                SocketAddrV4::new(dst_ip, port(i)),
                SYN,
                i.wrapping_mul(2_654_435_761),
                0,
                65535,
                &[2, 4, 5, 180],
                &[],
            );
            ip_frame(IpProtocol::Tcp, i, (0, false), &seg)
        }),
        "udp" => Box::new(move |i| {
            let d = udp(
                SocketAddrV4::new(src_ip, sport(i)),
                SocketAddrV4::new(dst_ip, port(i)),
                b"sweep",
            );
            ip_frame(IpProtocol::Udp, i, (0, false), &d)
        }),
        "dns" => Box::new(move |i| {
            let q = hubnat_replay::craft::dns_query(i as u16, &format!("n{i}.flood.test"), 1);
            let d = udp(
                SocketAddrV4::new(src_ip, sport(i)),
                SocketAddrV4::new(dst_ip, 53),
                &q,
            );
            ip_frame(IpProtocol::Udp, i, (0, false), &d)
        }),
        "frag" => Box::new(move |i| {
            // The first 1 KiB of a 4 KiB datagram; the rest never comes.
            let d = udp(
                SocketAddrV4::new(src_ip, sport(i)),
                SocketAddrV4::new(dst_ip, port(i)),
                &[0x55; 4000],
            );
            ip_frame(IpProtocol::Udp, i, (0, true), &d[..1024])
        }),
        "dhcp-starve" => Box::new(move |i| {
            // A made-up client per frame, each asking for the next address of the default
            // range without an OFFER first (INIT-REBOOT: no server identifier).
            let chaddr = Mac([0x02, 0x5a, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let want = Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 30, 10)) + i % 191);
            let msg = dhcp(
                chaddr,
                i,
                Ipv4Addr::UNSPECIFIED,
                3,
                &[(50, want.octets().to_vec())],
            );
            dhcp_frame(&msg)
        }),
        "dhcp-release" | "dhcp-decline" => {
            let Some(client) = client_mac else {
                bail!("--kind {kind} needs --client-mac");
            };
            let release = kind == "dhcp-release";
            Box::new(move |i| {
                let server = (54u8, dst_ip.octets().to_vec());
                let msg = if release {
                    dhcp(client, i, src_ip, 7, &[server])
                } else {
                    dhcp(
                        client,
                        i,
                        Ipv4Addr::UNSPECIFIED,
                        4,
                        &[server, (50, src_ip.octets().to_vec())],
                    )
                };
                dhcp_frame(&msg)
            })
        }
        other => bail!(
            "--kind {other}: choose syn, udp, dns, frag, dhcp-starve, dhcp-release or dhcp-decline"
        ),
    })
}

fn parse_mac(s: &str) -> Result<Mac> {
    s.parse::<Mac>()
        .map_err(|_| anyhow::anyhow!("`{s}` is not a MAC address"))
}

fn parse_ports(s: &str) -> Result<(u16, u16)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let (lo, hi): (u16, u16) = (lo.parse()?, hi.parse()?);
    if lo == 0 || hi < lo {
        bail!("--ports {s}: give LO-HI with 1 <= LO <= HI");
    }
    Ok((lo, hi))
}

/// Turns the query in `buf[..n]` into its answer in place: the header flagged as a response
/// (RD kept, RA set, NOERROR), the question kept, one A record for it. `None`: not a query.
fn dns_answer(buf: &mut [u8], n: usize) -> Option<usize> {
    if n < 12 || buf[2] & 0x80 != 0 || buf[4..6] != [0, 1] {
        return None;
    }
    let mut end = 12;
    while buf[end] != 0 {
        end += 1 + usize::from(buf[end]);
        if end >= n {
            return None;
        }
    }
    end += 5;
    let rr = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 9, 9];
    if end > n || end + rr.len() > buf.len() {
        return None;
    }
    buf[2] = 0x80 | (buf[2] & 0x79);
    buf[3] = 0x80;
    buf[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    buf[end..end + rr.len()].copy_from_slice(&rr);
    Some(end + rr.len())
}

/// `udp-echo --runs`: every receive (a run of datagrams the kernel kept whole, or one) is sent
/// back in one send, cut as it came.
fn udp_echo_runs(listen: SocketAddr) -> Result<()> {
    use nix::sys::socket::{
        recvmsg, sendmsg, setsockopt, sockopt::UdpGroSegment, ControlMessage, ControlMessageOwned,
        MsgFlags, SockaddrStorage,
    };
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    let s = UdpSocket::bind(listen)?;
    setsockopt(&s, UdpGroSegment, &true).context("UDP_GRO")?;
    eprintln!("listening on {listen} (runs)");
    let mut buf = vec![0u8; 65536];
    let mut control = nix::cmsg_space!(i32);
    loop {
        let (n, segment, from) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let m = recvmsg::<SockaddrStorage>(
                s.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::empty(),
            )?;
            let segment = m.cmsgs()?.find_map(|c| match c {
                ControlMessageOwned::UdpGroSegments(g) => u16::try_from(g).ok(),
                _ => None,
            });
            (m.bytes, segment, m.address.context("no sender")?)
        };
        let iov = [IoSlice::new(&buf[..n])];
        let sent = match segment {
            Some(g) if usize::from(g) < n => {
                let cmsg = [ControlMessage::UdpGsoSegments(&g)];
                sendmsg(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&from))
            }
            _ => sendmsg(s.as_raw_fd(), &iov, &[], MsgFlags::empty(), Some(&from)),
        };
        sent.context("echo")?;
    }
}

/// `udp-gso-ping`: every round's datagrams are numbered (round, index) and filled from the
/// seeded stream; a round is sent again (up to 3 times) when its echoes do not all come back.
fn udp_gso_ping(connect: SocketAddr, rounds: u32, batch: u32, size: usize) -> Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::UdpGsoSegment};
    let size = size.max(8);
    let any: std::net::IpAddr = if connect.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let s = UdpSocket::bind((any, 0))?;
    s.connect(connect)?;
    setsockopt(&s, UdpGsoSegment, &(size as i32)).context("UDP_SEGMENT")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut back = vec![0u8; 65536];
    for round in 0..rounds {
        let mut run = vec![0u8; size * batch as usize];
        let mut st = Stream::new(u64::from(round) + 1);
        st.fill(&mut run);
        for (i, d) in run.chunks_mut(size).enumerate() {
            d[..4].copy_from_slice(&round.to_be_bytes());
            d[4..8].copy_from_slice(&(i as u32).to_be_bytes());
        }
        let mut tries = 0;
        'send: loop {
            s.send(&run).context("send a run")?;
            let mut seen = vec![false; batch as usize];
            while seen.iter().any(|s| !s) {
                match s.recv(&mut back) {
                    Ok(n) if n == size && seq_of(&back) == round => {
                        let i = seq_of(&back[4..]) as usize;
                        let want = run.chunks(size).nth(i);
                        if want != Some(&back[..n]) {
                            bail!("round {round}: datagram {i} came back changed");
                        }
                        seen[i] = true;
                    }
                    // A late echo of an earlier round that was sent again.
                    Ok(n) if n == size && seq_of(&back) < round => {}
                    Ok(n) => bail!("round {round}: an echo of {n} bytes (datagrams are {size})"),
                    Err(e) if tries < 3 && e.kind() == io::ErrorKind::WouldBlock => {
                        tries += 1;
                        continue 'send;
                    }
                    Err(e) => bail!("round {round}: {e}"),
                }
            }
            break;
        }
    }
    println!("ok {rounds} runs of {batch} datagrams of {size} bytes");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Inject {
            iface,
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            ports,
            count,
            kind,
            client_mac,
        } => {
            let client_mac = client_mac.as_deref().map(parse_mac).transpose()?;
            let make = injected(
                &kind,
                parse_mac(&src_mac)?,
                parse_mac(&dst_mac)?,
                src_ip,
                dst_ip,
                parse_ports(&ports)?,
                client_mac,
            )?;
            let sock = PacketSocket::open(&iface, Duration::from_millis(100))
                .with_context(|| format!("AF_PACKET on {iface}"))?;
            let mut failed = 0u32;
            for i in 0..count {
                if sock.send(&make(i)).is_err() {
                    // The interface's queue is full: the next frame may go.
                    failed += 1;
                }
            }
            eprintln!("injected {} of {count} {kind} frames", count - failed);
            Ok(())
        }
        Cmd::UdpEcho { listen, runs: true } => udp_echo_runs(listen),
        Cmd::UdpEcho {
            listen,
            runs: false,
        } => {
            let s = UdpSocket::bind(listen)?;
            eprintln!("listening on {listen}");
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = s.recv_from(&mut buf)?;
                s.send_to(&buf[..n], from)?;
            }
        }
        Cmd::DnsAnswer { listen } => {
            let s = UdpSocket::bind(listen)?;
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20))
                .context("SO_RCVBUFFORCE (root)")?;
            eprintln!("listening on {listen}");
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = s.recv_from(&mut buf)?;
                if let Some(len) = dns_answer(&mut buf, n) {
                    s.send_to(&buf[..len], from)?;
                }
            }
        }
        Cmd::TcpEcho { listen } => serve_tcp(listen, |mut s| {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return s.shutdown(Shutdown::Write);
                }
                s.write_all(&buf[..n])?;
            }
        }),
        Cmd::TcpSink { listen } => serve_tcp(listen, |mut s| {
            let (n, d) = digest_to_eof(&mut s)?;
            // The answer goes out after the client's FIN: a half-closed connection must carry it.
            writeln!(s, "{n} {d}")?;
            s.shutdown(Shutdown::Write)
        }),
        Cmd::TcpSource {
            listen,
            bytes,
            seed,
        } => {
            let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
            eprintln!("listening on {listen}");
            for s in l.incoming() {
                let mut s = s?;
                std::thread::spawn(move || {
                    let _ =
                        send_stream(&mut s, bytes, seed).and_then(|_| s.shutdown(Shutdown::Write));
                });
            }
            Ok(())
        }
        Cmd::Put {
            connect,
            bytes,
            seed,
        } => {
            let mut s =
                TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
            let sent = send_stream(&mut s, bytes, seed)?;
            s.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            let want = format!("{bytes} {sent}");
            if answer.trim() != want {
                bail!("server got `{}`, sent `{want}`", answer.trim());
            }
            println!("ok {want}");
            Ok(())
        }
        Cmd::Get {
            connect,
            bytes,
            seed,
        } => {
            let mut s =
                TcpStream::connect(connect).with_context(|| format!("connect {connect}"))?;
            let (n, got) = digest_to_eof(&mut s)?;
            let mut expect = Sha256::new();
            let mut st = Stream::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                st.fill(&mut buf[..k]);
                expect.update(&buf[..k]);
                left -= k as u64;
            }
            let want = hex(&expect.finalize());
            if n != bytes || got != want {
                bail!("received {n} bytes with digest {got}, expected {bytes} with {want}");
            }
            println!("ok {n} {got}");
            Ok(())
        }
        Cmd::UdpPing {
            connect,
            count,
            size,
            port,
        } => {
            let any: std::net::IpAddr = if connect.is_ipv6() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            let s = UdpSocket::bind((any, port))?;
            s.connect(connect)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut st = Stream::new(count as u64);
            let mut out = vec![0u8; size.max(4)];
            let mut back = vec![0u8; 65536];
            for i in 0..count {
                st.fill(&mut out);
                out[..4].copy_from_slice(&i.to_be_bytes());
                let mut tries = 0;
                'send: loop {
                    s.send(&out)?;
                    loop {
                        match s.recv(&mut back) {
                            Ok(n) if back[..n] == out[..] => break 'send,
                            // A late answer to an earlier datagram that was sent again after
                            // its wait ran out (a loaded machine): both copies come back.
                            Ok(n) if n == out.len() && seq_of(&back) < i => continue,
                            Ok(n) => bail!("datagram {i}: answer of {n} bytes differs"),
                            Err(e) if tries < 3 && e.kind() == io::ErrorKind::WouldBlock => {
                                tries += 1;
                                continue 'send;
                            }
                            Err(e) => bail!("datagram {i}: {e}"),
                        }
                    }
                }
            }
            println!("ok {count} datagrams of {size} bytes");
            Ok(())
        }
        Cmd::UdpGsoPing {
            connect,
            rounds,
            batch,
            size,
        } => udp_gso_ping(connect, rounds, batch, size),
        Cmd::Multi {
            connect,
            conns,
            bytes,
        } => {
            let handles: Vec<_> = (0..conns)
                .map(|i| {
                    std::thread::spawn(move || -> Result<()> {
                        let mut s = TcpStream::connect(connect)?;
                        let mut r = s.try_clone()?;
                        let reader = std::thread::spawn(move || digest_to_eof(&mut r));
                        let sent = send_stream(&mut s, bytes, i as u64 + 1)?;
                        s.shutdown(Shutdown::Write)?;
                        let (n, got) = reader.join().expect("reader")?;
                        if n != bytes || got != sent {
                            bail!("connection {i}: echo of {n} bytes differs");
                        }
                        Ok(())
                    })
                })
                .collect();
            let mut failed = 0;
            for h in handles {
                if let Err(e) = h.join().expect("thread") {
                    eprintln!("{e:#}");
                    failed += 1;
                }
            }
            if failed > 0 {
                bail!("{failed} of {conns} connections failed");
            }
            println!("ok {conns} connections of {bytes} bytes");
            Ok(())
        }
        Cmd::SocketGuest {
            netns,
            tap,
            mtu,
            stream,
            stream_stdin,
            dgram,
            local,
        } => {
            let transport = match (stream, dgram, local) {
                (None, None, None) if stream_stdin => socket_guest::Transport::StreamStdin,
                (Some(path), None, None) => socket_guest::Transport::Stream(path),
                (None, Some(remote), Some(local)) => {
                    socket_guest::Transport::Dgram { remote, local }
                }
                _ => bail!("give --stream PATH, or --dgram PATH with --local PATH"),
            };
            socket_guest::run(&netns, &tap, mtu, transport)
        }
    }
}

/// `socket-guest`: what QEMU does with a guest's NIC on a socket netdev, with a TAP in a network
/// namespace as the NIC, so that a kernel's TCP/IP stack can be a guest of a hubnat socket port.
/// One thread polls both descriptors (edge-triggered), reads each until it has nothing more, and
/// moves frames in batches: a stream's bytes in large reads and writes, the TAP's writes through
/// a `TapWriter` (io_uring). Buffers are made once.
mod socket_guest {
    use std::io::{self, Read, Write};
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::path::{Path, PathBuf};

    use anyhow::{bail, Context, Result};
    use hubnat_runtime::port::tap::{netns_path, Tap, TapWriter};
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};

    /// How the guest reaches hubnat.
    pub enum Transport {
        /// Connect to hubnat's stream socket.
        Stream(PathBuf),
        /// The stream is standard input (connected already).
        StreamStdin,
        /// Bind `local` and exchange datagrams with hubnat's socket at `remote`.
        Dgram { remote: PathBuf, local: PathBuf },
    }

    const TAP: Token = Token(0);
    const SOCKET: Token = Token(1);
    /// Stream bytes held each way: many frames per read and write.
    const STREAM_BUFFER: usize = 256 * 1024;
    /// Datagrams read before they go to the TAP together.
    const DGRAM_BATCH: usize = 64;
    /// The Ethernet header (and the shortest frame).
    const ETHERNET_HEADER: usize = 14;
    /// A frame's length prefix on a stream.
    const LENGTH_PREFIX: usize = 4;

    pub fn run(netns: &str, tap_name: &str, mtu: u32, transport: Transport) -> Result<()> {
        let netns = netns_path(netns);
        let tap = Tap::open_in_netns(tap_name, Some(mtu), &netns)
            .with_context(|| format!("TAP {tap_name} in {}", netns.display()))?;
        // The Ethernet header and a VLAN tag on top of the MTU.
        let max_frame = mtu as usize + 18;
        let ended = match transport {
            Transport::Stream(path) => {
                let socket = UnixStream::connect(&path)
                    .with_context(|| format!("connect to {}", path.display()))?;
                socket.set_nonblocking(true)?;
                eprintln!("relaying {tap_name} to {}", path.display());
                relay_stream(&tap, &socket, max_frame)?
            }
            Transport::StreamStdin => {
                let fd = io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("standard input")?;
                let socket = UnixStream::from(fd);
                socket.set_nonblocking(true)?;
                eprintln!("relaying {tap_name} to the stream on standard input");
                relay_stream(&tap, &socket, max_frame)?
            }
            Transport::Dgram { remote, local } => {
                let bound = BoundPath::bind(&local)?;
                let socket = &bound.socket;
                socket
                    .connect(&remote)
                    .with_context(|| format!("connect to {}", remote.display()))?;
                socket.set_nonblocking(true)?;
                eprintln!(
                    "relaying {tap_name} to {} from {}",
                    remote.display(),
                    local.display()
                );
                relay_dgram(&tap, socket, max_frame)?
            }
        };
        eprintln!("{ended}");
        Ok(())
    }

    /// The datagram socket bound at `--local`, whose file goes with it.
    struct BoundPath {
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl BoundPath {
        fn bind(path: &Path) -> Result<BoundPath> {
            // A socket file left by an earlier run would make the bind fail.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    bail!("{} exists and is not a socket", path.display());
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("remove the old socket {}", path.display()))?;
            }
            let socket =
                UnixDatagram::bind(path).with_context(|| format!("bind {}", path.display()))?;
            // hubnat sends to this path as the unprivileged user its sandbox became, and
            // sending to a unix socket needs write permission on its file.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                .with_context(|| format!("chmod {}", path.display()))?;
            Ok(BoundPath {
                path: path.to_owned(),
                socket,
            })
        }
    }

    impl Drop for BoundPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// What the descriptors may give or take without blocking, as edge-triggered events say:
    /// set by an event, cleared by a WouldBlock.
    struct Ready {
        tap: bool,
        readable: bool,
        writable: bool,
    }

    impl Ready {
        /// Waits for events and notes them.
        fn wait(&mut self, poll: &mut Poll, events: &mut Events) -> Result<()> {
            match poll.poll(events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
                Err(e) => return Err(e).context("poll"),
            }
            for event in events.iter() {
                if event.token() == TAP {
                    self.tap = true;
                } else {
                    // Errors and hang-ups show in the next read or write.
                    self.readable |=
                        event.is_readable() || event.is_read_closed() || event.is_error();
                    self.writable |=
                        event.is_writable() || event.is_write_closed() || event.is_error();
                }
            }
            Ok(())
        }
    }

    fn poll_both(tap: &Tap, socket: RawFd) -> Result<(Poll, Events, Ready)> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut SourceFd(&tap.as_raw_fd()), TAP, Interest::READABLE)?;
        poll.registry().register(
            &mut SourceFd(&socket),
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let ready = Ready {
            tap: true,
            readable: true,
            writable: true,
        };
        Ok((poll, Events::with_capacity(8), ready))
    }

    /// Whether a socket error means hubnat went away.
    fn hubnat_gone(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::NotFound
        )
    }

    /// The whole frames at the start of `bytes` (each after its length): where they end.
    fn whole_frames(bytes: &[u8], max_frame: usize) -> Result<usize> {
        let mut at = 0;
        while let Some(prefix) = bytes.get(at..at + LENGTH_PREFIX) {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if !(ETHERNET_HEADER..=max_frame).contains(&len) {
                bail!("hubnat sent a frame length of {len} (frames are {ETHERNET_HEADER} to {max_frame} bytes)");
            }
            if bytes.len() - at < LENGTH_PREFIX + len {
                break;
            }
            at += LENGTH_PREFIX + len;
        }
        Ok(at)
    }

    /// The frames of bytes `whole_frames` accepted.
    fn frames(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
        std::iter::from_fn(move || {
            let prefix = bytes.get(..LENGTH_PREFIX)?;
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            let frame = bytes.get(LENGTH_PREFIX..LENGTH_PREFIX + len)?;
            bytes = &bytes[LENGTH_PREFIX + len..];
            Some(frame)
        })
    }

    /// Moves `buf[start..end]` to the front.
    fn compact(buf: &mut [u8], start: &mut usize, end: &mut usize) {
        if *start > 0 {
            buf.copy_within(*start..*end, 0);
            *end -= *start;
            *start = 0;
        }
    }

    /// Relays until hubnat closes the stream; why it ended.
    fn relay_stream(tap: &Tap, socket: &UnixStream, max_frame: usize) -> Result<&'static str> {
        let (mut poll, mut events, mut ready) = poll_both(tap, socket.as_raw_fd())?;
        let mut writer = TapWriter::new(tap);
        let mut socket = socket;
        // Towards hubnat: length-prefixed frames read from the TAP, `out[out_start..out_end]`.
        let mut out = vec![0u8; STREAM_BUFFER];
        let (mut out_start, mut out_end) = (0, 0);
        // From hubnat: `inb[in_start..in_end]`, whole frames and the start of the next.
        let mut inb = vec![0u8; STREAM_BUFFER];
        let (mut in_start, mut in_end) = (0, 0);
        loop {
            let mut progress = true;
            while progress {
                progress = false;
                if ready.tap {
                    if out.len() - out_end < LENGTH_PREFIX + max_frame {
                        compact(&mut out, &mut out_start, &mut out_end);
                    }
                    while out.len() - out_end >= LENGTH_PREFIX + max_frame {
                        let body = out_end + LENGTH_PREFIX;
                        match tap.recv(&mut out[body..body + max_frame]) {
                            Ok(n) => {
                                out[out_end..body].copy_from_slice(&(n as u32).to_be_bytes());
                                out_end = body + n;
                                progress = true;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                ready.tap = false;
                                break;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e).context("read the TAP"),
                        }
                    }
                }
                if ready.writable && out_end > out_start {
                    match socket.write(&out[out_start..out_end]) {
                        Ok(n) => {
                            out_start += n;
                            if out_start == out_end {
                                (out_start, out_end) = (0, 0);
                            }
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if hubnat_gone(&e) => return Ok("hubnat closed the connection"),
                        Err(e) => return Err(e).context("write to hubnat"),
                    }
                }
                if ready.readable {
                    compact(&mut inb, &mut in_start, &mut in_end);
                    match socket.read(&mut inb[in_end..]) {
                        Ok(0) => {
                            let whole = whole_frames(&inb[in_start..in_end], max_frame)?;
                            writer.send_all(frames(&inb[in_start..in_start + whole]));
                            return Ok("hubnat closed the connection");
                        }
                        Ok(n) => {
                            in_end += n;
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.readable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if hubnat_gone(&e) => return Ok("hubnat closed the connection"),
                        Err(e) => return Err(e).context("read from hubnat"),
                    }
                }
                let whole = whole_frames(&inb[in_start..in_end], max_frame)?;
                if whole > 0 {
                    // A full TAP drops frames, as a wire would: TCP above recovers.
                    writer.send_all(frames(&inb[in_start..in_start + whole]));
                    in_start += whole;
                    if in_start == in_end {
                        (in_start, in_end) = (0, 0);
                    }
                }
            }
            ready.wait(&mut poll, &mut events)?;
        }
    }

    /// Relays until hubnat's socket is gone; why it ended.
    fn relay_dgram(tap: &Tap, socket: &UnixDatagram, max_frame: usize) -> Result<&'static str> {
        let (mut poll, mut events, mut ready) = poll_both(tap, socket.as_raw_fd())?;
        let mut writer = TapWriter::new(tap);
        // From hubnat: a batch of datagrams, each in a slot one byte longer than a frame can
        // be, so that one too long shows.
        let slot = max_frame + 1;
        let mut slots = vec![0u8; DGRAM_BATCH * slot];
        let mut lens = [0usize; DGRAM_BATCH];
        // Towards hubnat: the frame read from the TAP that the socket has not taken yet.
        let mut held = vec![0u8; max_frame];
        let mut held_len = None;
        let mut bad = 0u64;
        loop {
            let mut progress = true;
            while progress {
                progress = false;
                while ready.writable && (held_len.is_some() || ready.tap) {
                    let n = match held_len {
                        Some(n) => n,
                        None => match tap.recv(&mut held) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                ready.tap = false;
                                break;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e).context("read the TAP"),
                        },
                    };
                    held_len = Some(n);
                    match socket.send(&held[..n]) {
                        Ok(_) => {
                            held_len = None;
                            progress = true;
                        }
                        // hubnat's queue is full: the frame waits for room.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if hubnat_gone(&e) => return Ok("hubnat's socket is gone"),
                        Err(e) => return Err(e).context("send to hubnat"),
                    }
                }
                let mut count = 0;
                while ready.readable && count < DGRAM_BATCH {
                    match socket.recv(&mut slots[count * slot..(count + 1) * slot]) {
                        Ok(n) if (ETHERNET_HEADER..=max_frame).contains(&n) => {
                            lens[count] = n;
                            count += 1;
                        }
                        Ok(n) => {
                            bad += 1;
                            eprintln!("dropped a datagram of {n} bytes from hubnat ({bad} so far)");
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.readable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if hubnat_gone(&e) => return Ok("hubnat's socket is gone"),
                        Err(e) => return Err(e).context("receive from hubnat"),
                    }
                }
                if count > 0 {
                    let batch = (0..count).map(|i| &slots[i * slot..i * slot + lens[i]]);
                    writer.send_all(batch);
                    progress = true;
                }
            }
            ready.wait(&mut poll, &mut events)?;
        }
    }
}
