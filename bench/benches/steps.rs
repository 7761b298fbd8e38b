//! criterion micro-benchmarks of the per-frame steps:
//!   cargo bench -p hubnat-bench --bench steps
//! parse (Ethernet/IPv4/TCP views), flow hash (the runtime's router), dispatch (a UDP datagram of an
//! existing session through the whole core), TCP segment in (a data segment on an established
//! connection to a sink, ACK out), TCP segment out (host data → one MSS segment to the guest),
//! DHCP exchange (DISCOVER → OFFER, REQUEST → ACK).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hubnat_bench::{parse_only, Shards};
use hubnat_core::{FrameBatch, Instant, SockEvent};
use hubnat_replay::craft::{self, GuestConn, Session, ACK, PSH};
use hubnat_replay::{Driver, Script};

fn steps(c: &mut Criterion) {
    let m = craft::guest_mac(1);
    let g = SocketAddrV4::new(craft::GUEST_IP, 40000);
    let srv = SocketAddrV4::new(craft::SERVER_IP, 7);
    let frame = craft::udp_frame(m, g, srv, 1, &[0u8; 1000]);
    c.bench_function("parse", |b| b.iter(|| parse_only(black_box(&frame))));
    let shards = Shards::new(2);
    c.bench_function("flow hash", |b| b.iter(|| shards.owner(black_box(&frame))));

    // dispatch: a UDP datagram of an existing session (the destination is silent).
    let script = Script::parse("[host]\nudp = \"silent\"\n").unwrap();
    let mut d = Driver::new(script);
    let mut t = Duration::from_secs(1);
    d.frame(t, &frame, &mut |_, _| {});
    c.bench_function("dispatch (UDP datagram, existing session)", |b| {
        b.iter(|| {
            t += Duration::from_micros(1);
            d.frame(t, black_box(&frame), &mut |_, _| {});
        })
    });

    // TCP segment in: data to an established connection with a sink behind it.
    let script = Script::parse("[host]\ntcp = \"sink\"\n").unwrap();
    let mut s = Session::new(&script);
    let mut conn = GuestConn::new(m, g, SocketAddrV4::new(craft::SERVER_IP, 5001), 1000);
    conn.connect(&mut s);
    let payload = vec![0x5a; 1448];
    c.bench_function("TCP segment in (1448 B, sink)", |b| {
        b.iter(|| {
            s.wait_ms(0);
            let f = conn.build(&s, ACK | PSH, &payload);
            conn.seq = conn.seq.wrapping_add(1448);
            s.driver.frame(craft::EPOCH + s.t, &f, &mut |_, _| {});
        })
    });

    // TCP segment out: the destination sends 1448 bytes, the core cuts one segment toward the
    // guest (which acknowledges everything at once every 64 segments, outside the timing).
    let script = Script::parse("[host]\ntcp = \"sink\"\n").unwrap();
    let mut s = Session::new(&script);
    let mut conn = GuestConn::new(m, g, SocketAddrV4::new(craft::SERVER_IP, 5002), 1000);
    conn.connect(&mut s);
    let id = *s.driver.host.sockets.keys().max().unwrap();
    let mut out = FrameBatch::new();
    let mut sent = 0u32;
    let now = Instant::from_secs(1);
    c.bench_function("TCP segment out (1448 B)", |b| {
        b.iter(|| {
            s.driver.host.deliver_tcp(id, &payload);
            s.driver.host.events.clear();
            out.clear();
            s.driver.engine.handle_host_event(
                now,
                SockEvent::Readable(id),
                &mut s.driver.host,
                &mut out,
            );
            sent += 1;
            if sent.is_multiple_of(64) {
                conn.ack = conn.ack.wrapping_add(64 * 1448);
                let f = conn.build(&s, ACK, &[]);
                s.driver.frame(craft::EPOCH + s.t, &f, &mut |_, _| {});
            }
            black_box(out.len())
        })
    });

    // DHCP: DISCOVER → OFFER, REQUEST → ACK for the same client, over and over.
    let mut d = Driver::new(Script::default());
    let mut t = Duration::from_secs(1);
    let disc = craft::dhcp(m, 7, Ipv4Addr::UNSPECIFIED, 1, &[]);
    let disc = craft::dhcp_frame(m, Ipv4Addr::UNSPECIFIED, false, &disc, 1);
    let req = craft::dhcp(
        m,
        7,
        Ipv4Addr::UNSPECIFIED,
        3,
        &[(50, vec![192, 168, 30, 10]), (54, vec![192, 168, 30, 1])],
    );
    let req = craft::dhcp_frame(m, Ipv4Addr::UNSPECIFIED, false, &req, 2);
    c.bench_function("DHCP exchange (DISCOVER+REQUEST)", |b| {
        b.iter(|| {
            t += Duration::from_micros(1);
            let mut n = 0;
            d.frame(t, &disc, &mut |_, _| n += 1);
            d.frame(t, &req, &mut |_, _| n += 1);
            black_box(n)
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = steps
}
criterion_main!(benches);
