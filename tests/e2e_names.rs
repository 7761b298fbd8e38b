//! End-to-end: the DNS relay answers the guests' names itself, and follows resolv.conf.
//!
//! Two guests lease addresses by busybox udhcpc, guest A sending the host name vm1; guest B
//! resolves `vm1.DOMAIN` (and back) through the virtual host with dig. hubnat runs under `ip
//! netns exec`, which shows the namespace's /etc/netns/NAME/resolv.conf as /etc/resolv.conf:
//! rewriting that file moves the relay from one dnsmasq of the server namespace to another,
//! which answer one name differently, within a second and without a reload. Over TCP the names
//! are answered alike.

#[macro_use]
mod common;

use common::udhcpc_lease;

use std::time::Duration;

use common::{wait_until, Lab, Netns, SERVER_IP};

const DOMAIN: &str = "e2e.test";
/// A second resolver of the server namespace, beside SERVER_IP.
const SERVER_IP2: &str = "10.77.0.3";

/// `dig` in `ns` at the virtual host: its whole output.
fn dig(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["dig", "@192.168.30.1", "+tries=1", "+time=2"];
    all.extend_from_slice(args);
    let out = ns.exec(&all);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer section's data alone (`dig +short`).
fn short(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    dig(ns, &all).trim().to_owned()
}

#[test]
fn guests_names_resolve_and_upstreams_follow_resolv_conf() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let server = lab.server();
    server.exec_ok(&["ip", "link", "set", "lo", "up"]);
    // The server answers ARP for an address of its loopback on its veth too (arp_ignore 0).
    server.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{SERVER_IP2}/32"),
        "dev",
        "lo",
    ]);
    let _dns1 = lab.dnsmasq(server, SERVER_IP, &["probe.example,10.1.1.1"]);
    let _dns2 = lab.dnsmasq(server, SERVER_IP2, &["probe.example,10.2.2.2"]);
    // hubnat reads this file as its /etc/resolv.conf (no `[dns] upstream` below).
    let resolv = std::path::PathBuf::from("/etc/netns")
        .join(&lab.nat.name)
        .join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {SERVER_IP}\n")).unwrap();
    lab.start_hubnat(&format!(
        "[dhcp]\ndomain = \"{DOMAIN}\"\n[dns]\nhosts = {{ \"printer.{DOMAIN}\" = \"192.168.30.40\" }}\n"
    ));
    let (a, b) = lab.two_guests();
    let a_ip = udhcpc_lease(&lab, &a, "eth0", &["-x", "hostname:vm1"]);
    let b_ip = udhcpc_lease(&lab, &b, "eth0", &[]);
    assert_ne!(a_ip, b_ip);

    // Guest B finds guest A by name, and the name by its address.
    assert_eq!(short(&b, &[&format!("vm1.{DOMAIN}")]), a_ip);
    assert_eq!(short(&b, &["VM1"]), a_ip, "the bare name, any case");
    assert_eq!(short(&b, &["-x", &a_ip]), format!("vm1.{DOMAIN}."));
    assert_eq!(short(&b, &[&format!("printer.{DOMAIN}")]), "192.168.30.40");
    let aaaa = dig(&b, &[&format!("vm1.{DOMAIN}"), "AAAA"]);
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    let nx = dig(&b, &[&format!("nobody.{DOMAIN}")]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // Other names go to the upstream resolv.conf names.
    assert_eq!(short(&b, &["probe.example"]), "10.1.1.1");
    // Over TCP alike: the local names answered here, the rest by the upstream, also on one
    // connection that asks for both.
    assert_eq!(short(&b, &["+tcp", &format!("vm1.{DOMAIN}")]), a_ip);
    assert_eq!(short(&b, &["+tcp", "-x", &a_ip]), format!("vm1.{DOMAIN}."));
    assert_eq!(short(&b, &["+tcp", "probe.example"]), "10.1.1.1");
    let both = short(
        &b,
        &[
            "+tcp",
            "+keepopen",
            &format!("vm1.{DOMAIN}"),
            "probe.example",
        ],
    );
    assert_eq!(
        both.lines().collect::<Vec<_>>(),
        [a_ip.as_str(), "10.1.1.1"]
    );

    // Rewritten in place (the bind mount shows hubnat this inode): inotify tells hubnat at
    // once; 3 s leave a loaded machine room.
    std::fs::write(&resolv, format!("nameserver {SERVER_IP2}\n")).unwrap();
    let line =
        format!("DNS upstreams changed (resolv.conf): [{SERVER_IP}:53] -> [{SERVER_IP2}:53]");
    wait_until(Duration::from_secs(3), || {
        lab.hubnat_log().contains(&line).then_some(())
    })
    .unwrap_or_else(|| panic!("no `{line}` within 3 s:\n{}", lab.hubnat_log()));
    assert_eq!(short(&b, &["probe.example"]), "10.2.2.2");
    // The local names never went upstream.
    assert_eq!(short(&a, &[&format!("vm1.{DOMAIN}")]), a_ip);
}
