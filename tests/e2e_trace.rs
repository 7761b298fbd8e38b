//! traceroute through hubnat: a guest traces a server one real router beyond hubnat's
//! namespace, in UDP mode and in ICMP mode, and sees hubnat's virtual host as hop 1, the
//! router as hop 2 and the server last (time exceeded from hubnat itself, then the router's
//! time exceeded and the server's answer relayed from where they came). A destination hubnat's
//! host has no route to is told to the guest as unreachable at once.

#[macro_use]
mod common;

use common::{traceroute_hops, Lab, ROUTED_SERVER_IP, ROUTER_NEAR_IP};

/// The virtual host's address: the guests' gateway.
const GATEWAY: &str = "192.168.30.1";

/// Traces the server from the guest with `mode` (extra traceroute flags) and checks the path.
fn trace(lab: &Lab, mode: &[&str]) {
    // traceroute's defaults: three probes per hop, sixteen in flight at once (each answer
    // must find its probe), up to 30 hops.
    let mut args = vec!["traceroute", "-n"];
    args.extend_from_slice(mode);
    args.push(ROUTED_SERVER_IP);
    let mut last = String::new();
    for _ in 0..3 {
        let out = lab.guest.exec(&args);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if traceroute_hops(&last) == [GATEWAY, ROUTER_NEAR_IP, ROUTED_SERVER_IP] {
            eprintln!("{last}");
            return;
        }
    }
    panic!(
        "traceroute {mode:?} did not show hubnat, the router and the server:\n{last}\n{}",
        lab.hubnat_log()
    );
}

#[test]
fn traceroute_shows_hubnat_the_router_and_the_server() {
    require_root!();
    let (lab, _router) = Lab::start_with_router("[nat]\nicmp = \"real\"\n", &[]);
    // UDP probes (traceroute's default), then ICMP echo probes.
    trace(&lab, &[]);
    trace(&lab, &["-I"]);
}

#[test]
fn a_destination_without_a_route_is_unreachable_at_once() {
    require_root!();
    let (lab, _router) = Lab::start_with_router("", &[]);
    // hubnat's namespace routes only to the test's links: 10.99.0.1 is nowhere.
    // A connect: ICMP net unreachable from the virtual host, not a reset ("refused").
    let started = std::time::Instant::now();
    let out = lab
        .guest
        .exec(&["busybox", "nc", "-w", "10", "10.99.0.1", "8080"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Network is unreachable"),
        "{err}\n{}",
        lab.hubnat_log()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{err}"
    );
    // UDP likewise: traceroute's first probe past hubnat comes back "network unreachable" (!N).
    let out = lab.guest.exec(&[
        "traceroute",
        "-n",
        "-q",
        "1",
        "-N",
        "1",
        "-w",
        "2",
        "-m",
        "3",
        "10.99.0.1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("!N"), "{text}\n{}", lab.hubnat_log());
}
