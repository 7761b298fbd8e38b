//! End-to-end: IPv6 on the segment, with the Linux kernel's own IPv6 in the guest namespace.
//!
//! The guest takes its address from the virtual host's router advertisement (SLAAC) and its
//! default route with it; it pings the virtual host, fetches a page with curl and moves bytes
//! both ways over TCP and UDP to a server namespace that has only an IPv6 address on its link
//! (hubnat's namespace routes IPv6 to it, and nowhere else); it resolves an AAAA name through
//! the DNS relay at the virtual host's IPv6 address, the relay itself asking an upstream over
//! IPv6, and the AAAA of its own name (its DHCP host name) and the name of its address (the
//! PTR of its ip6.arpa name); `traceroute -6` shows the virtual host, then the server. With
//! `ipv6.dhcpv6 = "stateful"`, ISC dhclient -6 leases an address from the range.

#[macro_use]
mod common;

use std::time::Duration;

use common::{
    control_config, ctl_json, open_dir, traceroute_hops, udhcpc_lease, wait_until, Lab, Netns,
};

/// hubnat's namespace's IPv6 address on the link to the server, and the server's (a
/// documentation prefix: no route leads anywhere else).
const NAT6: &str = "2001:db8:77::1";
const SERVER6: &str = "2001:db8:77::2";
/// The virtual host's IPv6 address with the default prefix.
const HOST6: &str = "fd68:7562:6e61:1e::1";
const PREFIX: &str = "fd68:7562:6e61:1e:";

/// The name of the one veth device of `ns`.
fn veth(ns: &Netns) -> String {
    let out = ns.exec_ok(&["ip", "-o", "link", "show", "type", "veth"]);
    let name = out.split(':').nth(1).expect("a veth").trim();
    name.split('@').next().unwrap().to_owned()
}

/// A lab whose server namespace is reached over IPv6 only (its IPv4 address is left, unused).
fn lab6() -> Lab {
    let lab = Lab::bare_with_server();
    let (nat_dev, srv_dev) = (veth(&lab.nat), veth(lab.server()));
    lab.nat.exec_ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{NAT6}/64"),
        "dev",
        &nat_dev,
        "nodad",
    ]);
    lab.server().exec_ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{SERVER6}/64"),
        "dev",
        &srv_dev,
        "nodad",
    ]);
    lab.server().exec_ok(&["ip", "link", "set", "lo", "up"]);
    lab
}

/// The guest's global IPv6 address on its TAP once SLAAC has made it and DAD has passed.
fn slaac_address(lab: &Lab) -> String {
    let found = wait_until(Duration::from_secs(30), || {
        let out = lab.guest.exec_ok(&[
            "ip", "-6", "-o", "addr", "show", "dev", &lab.tap, "scope", "global",
        ]);
        out.lines()
            .find(|l| l.contains(PREFIX) && !l.contains("tentative"))
            .and_then(|l| l.split_whitespace().nth(3))
            .map(|a| a.split('/').next().unwrap().to_owned())
    });
    found.unwrap_or_else(|| {
        panic!(
            "no SLAAC address on the guest:\n{}\n{}",
            lab.guest.exec_ok(&["ip", "-6", "addr"]),
            lab.hubnat_log()
        )
    })
}

#[test]
fn slaac_then_ping_curl_tcp_udp_and_dns_over_ipv6() {
    require_root!();
    let mut lab = lab6();
    let dns = lab.dnsmasq(lab.server(), SERVER6, &["six.example,2001:db8:99::6"]);
    let ops = open_dir(&lab, "ops");
    lab.start_hubnat(&format!(
        "[dhcp]\ndomain = \"e2e.test\"\n[dns]\nupstream = [\"[{SERVER6}]:53\"]\n{}",
        control_config(&ops)
    ));
    lab.guest.exec_ok(&["ip", "link", "set", &lab.tap, "up"]);
    let addr = slaac_address(&lab);
    assert!(addr.starts_with(PREFIX), "{addr}");
    // The router advertisement made the virtual host the default router.
    let route = lab.guest.exec_ok(&["ip", "-6", "route", "show", "default"]);
    assert!(route.contains("via fe80::"), "no default route: {route}");

    let ping = lab.guest.exec(&["ping", "-6", "-c", "2", "-W", "2", HOST6]);
    assert!(
        ping.status.success(),
        "ping -6 to the virtual host:\n{}",
        lab.hubnat_log()
    );

    let page = "hello over IPv6\n";
    let _httpd = lab.httpd(lab.server(), Some(&format!("[{SERVER6}]:8080")), page);
    let url = format!("http://[{SERVER6}]:8080/index.html");
    let curl = lab
        .guest
        .exec(&["curl", "-6", "-sS", "--max-time", "10", &url]);
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        page,
        "curl: {}\n{}",
        String::from_utf8_lossy(&curl.stderr),
        lab.hubnat_log()
    );

    let sink = format!("[{SERVER6}]:5001");
    let source = format!("[{SERVER6}]:5002");
    let _sink = lab.serve(&["tcp-sink", "--listen", "[::]:5001"]);
    let _source = lab.serve(&["tcp-source", "--listen", "[::]:5002", "--bytes", "16777216"]);
    let up = lab.client(&["put", "--connect", &sink, "--bytes", "16777216"]);
    assert!(
        up.status.success(),
        "upload: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let down = lab.client(&["get", "--connect", &source, "--bytes", "16777216"]);
    assert!(
        down.status.success(),
        "download: {}",
        String::from_utf8_lossy(&down.stderr)
    );

    let _echo = lab.serve(&["udp-echo", "--listen", "[::]:7007"]);
    let udp = lab.client(&[
        "udp-ping",
        "--connect",
        &format!("[{SERVER6}]:7007"),
        "--count",
        "50",
        "--size",
        "1200",
    ]);
    assert!(
        udp.status.success(),
        "udp: {}",
        String::from_utf8_lossy(&udp.stderr)
    );
    // Larger than the MTU: the answer comes back to the guest in IPv6 fragments.
    let big = lab.client(&[
        "udp-ping",
        "--connect",
        &format!("[{SERVER6}]:7007"),
        "--count",
        "3",
        "--size",
        "4000",
    ]);
    assert!(
        big.status.success(),
        "udp 4000: {}",
        String::from_utf8_lossy(&big.stderr)
    );

    // Echo requests to the server are carried (real ICMPv6 echo from hubnat's namespace).
    let ping = lab
        .guest
        .exec(&["ping", "-6", "-c", "2", "-W", "2", SERVER6]);
    assert!(
        ping.status.success(),
        "ping -6 to the server:\n{}",
        lab.hubnat_log()
    );

    let aaaa = lab.guest.exec(&[
        "dig",
        &format!("@{HOST6}"),
        "+short",
        "+tries=2",
        "+time=2",
        "AAAA",
        "six.example",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&aaaa.stdout).trim(),
        "2001:db8:99::6",
        "dig AAAA: {}\n{}",
        String::from_utf8_lossy(&aaaa.stderr),
        lab.hubnat_log()
    );
    drop(dns);

    // The guest's name (its DHCPv4 lease's) has its IPv6 address too.
    udhcpc_lease(&lab, &lab.guest, &lab.tap, &["-x", "hostname:vm6"]);
    let aaaa = lab.guest.exec(&[
        "dig",
        &format!("@{HOST6}"),
        "+short",
        "+tries=2",
        "+time=2",
        "AAAA",
        "vm6.e2e.test",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&aaaa.stdout).trim(),
        addr,
        "dig AAAA vm6: {}",
        String::from_utf8_lossy(&aaaa.stderr)
    );

    // And that address's reverse name (ip6.arpa) gives the name back.
    let ptr = lab.guest.exec(&[
        "dig",
        &format!("@{HOST6}"),
        "+short",
        "+tries=2",
        "+time=2",
        "-x",
        &addr,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&ptr.stdout).trim(),
        "vm6.e2e.test.",
        "dig -x {addr}: {}",
        String::from_utf8_lossy(&ptr.stderr)
    );

    // traceroute -6: the virtual host is the first hop, then the server itself. Its probes
    // leave at once, one socket each, and a probe nothing answered shows as `*`: as in
    // e2e_trace, a trace may be taken again (up to three times), and a retried one is printed.
    let mut text = String::new();
    for attempt in 1..=3 {
        let trace = lab.guest.exec(&[
            "traceroute",
            "-6",
            "-n",
            "-q",
            "1",
            "-w",
            "2",
            "-m",
            "4",
            SERVER6,
        ]);
        text = format!(
            "{}{}",
            String::from_utf8_lossy(&trace.stdout),
            String::from_utf8_lossy(&trace.stderr)
        );
        if traceroute_hops(&text) == [HOST6, SERVER6] {
            break;
        }
        eprintln!(
            "traceroute -6, attempt {attempt}:\n{text}drops: {}",
            ctl_json(&ops, &["status"])["drops"]
        );
    }
    assert_eq!(
        traceroute_hops(&text),
        [HOST6, SERVER6],
        "traceroute -6:\n{text}\n{}",
        lab.hubnat_log()
    );

    // The NAT table shows the guest's IPv6 sessions (read again if a busy worker's rows came
    // too late for one reading).
    common::wait_until(Duration::from_secs(5), || {
        ctl_json(&ops, &["nat-table"])
            .to_string()
            .contains(SERVER6)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no IPv6 session listed: {}", ctl_json(&ops, &["nat-table"])));
}

#[test]
fn loopback_and_the_segments_own_prefix_are_not_reached_over_ipv6() {
    require_root!();
    let mut lab = lab6();
    lab.nat.exec_ok(&["ip", "link", "set", "lo", "up"]);
    // A server on hubnat's own loopback, which no guest may reach by default.
    let nat_srv = {
        let bin = common::testsrv_bin();
        common::Proc::spawn(
            "hubnat-testsrv",
            lab.nat
                .cmd(&[bin.to_str().unwrap(), "udp-echo", "--listen", "[::1]:7008"]),
            None,
        )
    };
    lab.start_hubnat("");
    lab.guest.exec_ok(&["ip", "link", "set", &lab.tap, "up"]);
    slaac_address(&lab);
    for target in ["[::1]:7008", "[::ffff:127.0.0.1]:7008"] {
        let out = lab.client(&["udp-ping", "--connect", target, "--count", "1"]);
        assert!(!out.status.success(), "{target} was reached");
    }
    drop(nat_srv);
}

#[test]
fn dhclient_leases_an_address_by_stateful_dhcpv6() {
    require_root!();
    let mut lab = lab6();
    lab.start_hubnat("[ipv6]\ndhcpv6 = \"stateful\"\n");
    lab.guest.exec_ok(&["ip", "link", "set", &lab.tap, "up"]);
    // dhclient -6 needs the link-local address past DAD.
    wait_until(Duration::from_secs(10), || {
        let out = lab.guest.exec_ok(&[
            "ip", "-6", "-o", "addr", "show", "dev", &lab.tap, "scope", "link",
        ]);
        (out.contains("fe80::") && !out.contains("tentative")).then_some(())
    })
    .expect("no link-local address");
    let leases = lab.dir.join("dhclient6.leases");
    let pid = lab.dir.join("dhclient6.pid");
    // The script does nothing: the lease file says what was leased, and the machine's
    // resolv.conf is never touched.
    let script = lab.write_script("dhclient-script", "#!/bin/sh\nexit 0\n");
    let out = lab.guest.exec(&[
        "timeout",
        "30",
        "dhclient",
        "-6",
        "-1",
        "-v",
        "-lf",
        leases.to_str().unwrap(),
        "-pf",
        pid.to_str().unwrap(),
        "-sf",
        script.to_str().unwrap(),
        &lab.tap,
    ]);
    // dhclient daemonizes once it has a lease; end it by its pid file, which the daemon may
    // write a moment after its parent returned (read at once, it was missing, and the daemon
    // outlived the test).
    let daemon = if out.status.success() {
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&pid)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
        })
    } else {
        None
    };
    if let Some(p) = daemon {
        let _ = std::process::Command::new("kill")
            .arg(p.to_string())
            .status();
    }
    let text = std::fs::read_to_string(&leases).unwrap_or_default();
    assert!(
        out.status.success() && text.contains("iaaddr fd68:7562:6e61:1e::1"),
        "no stateful lease: {}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.hubnat_log()
    );
}
