//! The replay benchmark's input: `flows` TCP uploads carrying `bytes` of payload in all, in
//! segments of mixed sizes, interleaved round-robin, each opened and closed properly. Guests'
//! ACKs are written against an ISN of 0 and rebased to the core's by the driver, so the file
//! needs no interaction to be valid. Replay it under [`SCRIPT`].

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use smoltcp::wire::IpProtocol;

use super::craft::{ethernet, guest_mac, ipv4, tcp, ACK, EPOCH, FIN, PSH, SYN};
use super::script::REPLAY_MAC;

/// The script the generated capture is replayed under: every destination a sink.
pub const SCRIPT: &str =
    "[host]\ntcp = \"sink\"\n[engine]\nnat = { max_sessions_per_guest = 65536 }\n";

/// Payload sizes, cycled: mostly full segments, some small and medium ones.
pub const SIZES: [usize; 8] = [1448, 1448, 1448, 536, 1448, 100, 1448, 1000];

/// Time between two frames of the capture.
const GAP: Duration = Duration::from_micros(5);

/// Writes the capture frame by frame to `sink`; returns the number of frames.
pub fn generate(flows: u32, bytes: u64, mut sink: impl FnMut(Duration, &[u8])) -> u64 {
    let flows = flows.max(1);
    let per_flow = bytes / flows as u64;
    let mut t = EPOCH;
    let mut n = 0u64;
    let mut emit = |frame: &[u8], t: &mut Duration| {
        sink(*t, frame);
        *t += GAP;
        n += 1;
    };
    struct F {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        mac: hubnat_core::config::Mac,
        seq: u32,
        left: u64,
    }
    let mut fl: Vec<F> = (0..flows)
        .map(|i| F {
            // many guests, many ports: a realistic spread for the flow hash
            src: SocketAddrV4::new(
                Ipv4Addr::new(192, 168, 30, 10 + (i % 180) as u8),
                20000 + (i / 180) as u16,
            ),
            dst: SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 5001 + (i % 8) as u16),
            mac: guest_mac((i % 180) as u8 + 10),
            seq: 1_000 + i * 7919,
            left: per_flow,
        })
        .collect();
    let frame = |f: &F, flags: u8, ack: u32, opts: &[u8], payload: &[u8]| {
        let seg = tcp(f.src, f.dst, flags, f.seq, ack, 65535, opts, payload);
        let ip = ipv4(
            *f.src.ip(),
            *f.dst.ip(),
            IpProtocol::Tcp,
            0,
            (0, false),
            &seg,
        );
        ethernet(REPLAY_MAC, f.mac, 0x0800, &ip)
    };
    let payload = vec![0x5au8; 1448];
    for f in fl.iter_mut() {
        emit(
            &frame(f, SYN, 0, &[2, 4, 5, 0xb4, 1, 3, 3, 7, 4, 2], &[]),
            &mut t,
        );
        f.seq += 1;
    }
    for f in fl.iter_mut() {
        emit(&frame(f, ACK, 1, &[], &[]), &mut t);
    }
    let mut k = 0usize;
    loop {
        let mut any = false;
        for f in fl.iter_mut() {
            if f.left == 0 {
                continue;
            }
            any = true;
            let len = (SIZES[k % SIZES.len()] as u64).min(f.left) as usize;
            k += 1;
            emit(&frame(f, ACK | PSH, 1, &[], &payload[..len]), &mut t);
            f.seq = f.seq.wrapping_add(len as u32);
            f.left -= len as u64;
        }
        if !any {
            break;
        }
    }
    for f in fl.iter_mut() {
        emit(&frame(f, FIN | ACK, 1, &[], &[]), &mut t);
        f.seq = f.seq.wrapping_add(1);
    }
    for f in fl.iter_mut() {
        emit(&frame(f, ACK, 2, &[], &[]), &mut t);
    }
    n
}
