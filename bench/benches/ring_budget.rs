//! Memory of the TCP receive rings under a guest that leaves a hole in every connection:
//!   cargo bench -p hubnat-bench --bench ring_budget
//! One guest opens 4,096 connections through the core (the replay driver, a sink behind each)
//! and sends, on each, a segment 1,000 bytes past the next expected byte, so that every
//! connection would keep a 256 KiB ring until its idle timeout. The process's resident memory is
//! reported before and after, with the default per-guest budget (32 MiB) and with the budget
//! raised out of the way (4 GiB), each in a child process of its own so the figures do not mix.

use std::net::SocketAddrV4;

use hubnat_replay::craft::{self, GuestConn, Session, ACK, PSH};
use hubnat_replay::Script;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn run(per_guest_mib: u64) {
    let script = Script::parse(&format!(
        "[host]\ntcp = \"sink\"\n[engine.nat]\nreassembly_per_guest_mib = {per_guest_mib}\nreassembly_mib = {per_guest_mib}\nmax_half_open_per_guest = 4096\n"
    ))
    .expect("script");
    let mut s = Session::new(&script);
    let m = craft::guest_mac(1);
    let before = rss_kib();
    let mut conns = Vec::new();
    for i in 0..4096u16 {
        let g = SocketAddrV4::new(craft::GUEST_IP, 20000 + i);
        let mut c = GuestConn::new(m, g, SocketAddrV4::new(craft::SERVER_IP, 80), 1000);
        c.connect(&mut s);
        c.seq = c.seq.wrapping_add(1000);
        let f = c.build(&s, ACK | PSH, &[0x5a; 100]);
        s.driver.frame(craft::EPOCH + s.t, &f, &mut |_, _| {});
        conns.push(c);
    }
    let after = rss_kib();
    println!(
        "ring budget {per_guest_mib} MiB per guest: 4096 connections with a hole each, RSS {} MiB -> {} MiB (+{} MiB)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024
    );
    std::hint::black_box(conns);
}

fn main() {
    match std::env::var("HUBNAT_RING_BUDGET_MIB") {
        Ok(v) => run(v.parse().expect("a number of MiB")),
        Err(_) => {
            // Each budget in a fresh process: rings freed by one run would make the next look
            // smaller than it is.
            let exe = std::env::current_exe().expect("the bench binary");
            for mib in [32, 4096] {
                let st = std::process::Command::new(&exe)
                    .env("HUBNAT_RING_BUDGET_MIB", mib.to_string())
                    .status()
                    .expect("child run");
                assert!(st.success());
            }
        }
    }
}
