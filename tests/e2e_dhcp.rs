//! End-to-end: real DHCP clients (ISC dhclient, busybox udhcpc) and ping against hubnat on a TAP.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{ctl, ctl_json, must, wait_until, Lab, Lease, Proc, TempDir};

const HOST_IP: &str = "192.168.30.1";

fn in_default_range(ip: &str) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().expect("an IPv4 address");
    let o = ip.octets();
    o[..3] == [192, 168, 30] && (10..=200).contains(&o[3])
}

/// The hook script for dhclient (which runs it with an environment of its own, so the test's
/// directory is written into the script: `@DIR@`): records the variables of each run in `dhclient.REASON` and
/// configures the interface itself (the system's hooks, which rewrite resolv.conf, never run).
const DHCLIENT_SCRIPT: &str = r#"#!/bin/sh
env | grep -E '^(reason|interface|new_|old_)' > "@DIR@/dhclient.$reason.tmp"
case "$reason" in
  PREINIT) ip link set "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    ip -4 addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    if [ -n "$new_routers" ]; then ip route replace default via "${new_routers%% *}" dev "$interface"; fi ;;
  RELEASE|EXPIRE|STOP|FAIL) ip -4 addr flush dev "$interface" ;;
esac
# The record appears whole, and only once the interface is configured as it says.
mv "@DIR@/dhclient.$reason.tmp" "@DIR@/dhclient.$reason"
exit 0
"#;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
{ echo "event=$1"; echo "ip=$ip"; echo "subnet=$subnet"; echo "mask=$mask"; echo "router=$router";
  echo "dns=$dns"; echo "domain=$domain"; echo "lease=$lease"; echo "serverid=$serverid"; } > "@DIR@/udhcpc.$1"
case "$1" in
  deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi ;;
esac
exit 0
"#;

struct Dhclient<'a> {
    lab: &'a Lab,
    script: PathBuf,
    conf: PathBuf,
}

impl<'a> Dhclient<'a> {
    fn new(lab: &'a Lab) -> Dhclient<'a> {
        let script = lab.write_script("dhclient-script", DHCLIENT_SCRIPT);
        let conf = lab.dir.join("dhclient.conf");
        std::fs::write(
            &conf,
            "timeout 20;\nretry 1;\nsend host-name \"e2e-guest\";\n\
             request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers;\n",
        )
        .unwrap();
        Dhclient { lab, script, conf }
    }

    /// A client that also asks for `more` (dhclient's option names, comma-separated).
    fn requesting(lab: &'a Lab, more: &str) -> Dhclient<'a> {
        let c = Dhclient::new(lab);
        let conf = common::read(&c.conf).replace(
            "domain-name-servers;",
            &format!("domain-name-servers, {more};"),
        );
        std::fs::write(&c.conf, conf).unwrap();
        c
    }

    fn cmd(&self, extra: &[&str]) -> Command {
        let (script, conf) = (self.script.to_str().unwrap(), self.conf.to_str().unwrap());
        let lf = self.lab.dir.join("dhclient.leases");
        let pf = self.lab.dir.join("dhclient.pid");
        let mut args = vec!["dhclient", "-v", "-sf", script, "-cf", conf];
        args.extend_from_slice(&["-lf", lf.to_str().unwrap(), "-pf", pf.to_str().unwrap()]);
        args.extend_from_slice(extra);
        args.push(&self.lab.tap);
        self.lab.guest.cmd(&args)
    }

    /// Runs dhclient in the foreground until it is bound; returns the process and the lease.
    fn bind(&self) -> (Proc, Lease) {
        let bound = self.lab.dir.join("dhclient.BOUND");
        let _ = std::fs::remove_file(&bound);
        let p = Proc::spawn(
            "dhclient",
            self.cmd(&["-d"]),
            Some(self.lab.dir.join("dhclient.log")),
        );
        let lease = wait_until(Duration::from_secs(30), || {
            let text = common::read(&bound);
            text.contains("new_ip_address").then(|| Lease::parse(&text))
        });
        let lease = lease.unwrap_or_else(|| {
            panic!(
                "dhclient got no lease.\ndhclient: {}\nhubnat: {}",
                p.log(),
                self.lab.hubnat_log()
            )
        });
        (p, lease)
    }

    /// The lease file once it holds a whole lease: dhclient writes it after it runs the script
    /// that said it was bound, so right after `bind` it may still be empty.
    fn lease_file(&self) -> String {
        let path = self.lab.dir.join("dhclient.leases");
        let whole = wait_until(Duration::from_secs(10), || {
            let text = common::read(&path);
            let start = text.find("lease {")?;
            text[start..].contains("\n}").then_some(text)
        });
        whole.unwrap_or_else(|| {
            panic!(
                "no whole lease in dhclient's lease file:\n{}",
                common::read(&path)
            )
        })
    }

    /// Releases the lease (dhclient -r also ends the running client through its pid file).
    fn release(&self) {
        let out = common::sh(&mut self.cmd(&["-r"]));
        assert!(out.status.success(), "dhclient -r failed: {out:?}");
    }
}

fn udhcpc(lab: &Lab, extra: &[&str]) -> (std::process::Output, Lease) {
    let script = lab.write_script("udhcpc-script", UDHCPC_SCRIPT);
    let mut args = vec!["busybox", "udhcpc", "-i", &lab.tap, "-f", "-q", "-n"];
    args.extend_from_slice(&["-t", "4", "-T", "1", "-A", "1", "-x", "hostname:e2e-udhcpc"]);
    args.extend_from_slice(&["-s", script.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let out = lab.guest.cmd(&args).output().expect("busybox udhcpc runs");
    let lease = Lease::parse(&common::read(&lab.dir.join("udhcpc.bound")));
    (out, lease)
}

fn ping_host(lab: &Lab) -> bool {
    lab.guest
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", HOST_IP])
        .status
        .success()
}

const FULL_CONFIG: &str = r#"
[dhcp]
domain = "hubnat.test"
dns = ["192.168.30.1", "192.168.30.2"]
routes = ["10.77.0.0/16 via 192.168.30.1"]
"#;

#[test]
fn dhclient_gets_a_full_lease_and_pings_the_virtual_host() {
    require_root!();
    let lab = Lab::start(FULL_CONFIG);
    let client = Dhclient::new(&lab);
    let (_p, lease) = client.bind();
    let ip = lease.get("new_ip_address").unwrap();
    assert!(in_default_range(ip), "address {ip} outside the range");
    assert_eq!(lease.get("new_subnet_mask"), Some("255.255.255.0"));
    assert_eq!(lease.get("new_routers"), Some(HOST_IP));
    assert_eq!(
        lease.get("new_domain_name_servers"),
        Some("192.168.30.1 192.168.30.2")
    );
    assert_eq!(lease.get("new_domain_name"), Some("hubnat.test"));
    assert_eq!(lease.get("new_dhcp_lease_time"), Some("7200"));
    assert_eq!(lab.guest.addrs(&lab.tap), vec![format!("{ip}/24")]);
    assert!(ping_host(&lab), "the virtual host does not answer ping");
    let log = lab.hubnat_log();
    let want = format!("IP address: {ip}, host name: e2e-guest, expiration date: 7200 seconds");
    assert!(
        log.contains("SecureNAT: The DHCP entry 1 was created. MAC address: ")
            && log.contains(&want),
        "log line missing:\n{log}"
    );
}

#[test]
fn udhcpc_gets_a_full_lease() {
    require_root!();
    let lab = Lab::start(FULL_CONFIG);
    let (out, lease) = udhcpc(&lab, &[]);
    assert!(
        out.status.success(),
        "udhcpc failed: {out:?}\n{}",
        lab.hubnat_log()
    );
    let ip = lease.get("ip").expect("udhcpc bound");
    assert!(in_default_range(ip));
    assert_eq!(lease.get("subnet"), Some("255.255.255.0"));
    assert_eq!(lease.get("router"), Some(HOST_IP));
    assert_eq!(lease.get("dns"), Some("192.168.30.1 192.168.30.2"));
    assert_eq!(lease.get("domain"), Some("hubnat.test"));
    assert_eq!(lease.get("serverid"), Some(HOST_IP));
    assert_eq!(lab.guest.addrs(&lab.tap), vec![format!("{ip}/24")]);
    assert!(ping_host(&lab));
}

#[test]
fn a_released_client_comes_back_to_the_same_address() {
    require_root!();
    let lab = Lab::start("");
    let client = Dhclient::new(&lab);
    let (mut p, first) = client.bind();
    client.release();
    p.stop(Duration::from_secs(3));
    assert!(
        lab.guest.addrs(&lab.tap).is_empty(),
        "release left the address"
    );
    let (_p2, second) = client.bind();
    assert_eq!(first.get("new_ip_address"), second.get("new_ip_address"));
    // udhcpc, releasing on exit (-R), also comes back to its own address.
    let lab2 = Lab::start("");
    let (out, a) = udhcpc(&lab2, &["-R"]);
    assert!(out.status.success());
    let (out, b) = udhcpc(&lab2, &["-R"]);
    assert!(out.status.success());
    assert_eq!(a.get("ip"), b.get("ip"));
}

#[test]
fn blank_gateway_and_dns_are_left_out() {
    require_root!();
    let lab = Lab::start("[dhcp]\ngateway = \"\"\ndns = []\ndomain = \"\"\n");
    let (out, lease) = udhcpc(&lab, &[]);
    assert!(out.status.success(), "udhcpc failed: {out:?}");
    assert!(lease.get("ip").is_some_and(in_default_range));
    assert_eq!(lease.get("router"), None);
    assert_eq!(lease.get("dns"), None);
    assert_eq!(lease.get("domain"), None);
    let client = Dhclient::new(&lab);
    let (_p, lease) = client.bind();
    assert_eq!(lease.get("new_routers"), None);
    assert_eq!(lease.get("new_domain_name_servers"), None);
}

#[test]
fn with_dhcp_disabled_no_offer_comes() {
    require_root!();
    let lab = Lab::start("[dhcp]\nenabled = false\n");
    let (out, lease) = udhcpc(&lab, &[]);
    assert!(
        !out.status.success(),
        "udhcpc got a lease from a disabled server"
    );
    assert!(lease.get("ip").is_none());
    // The virtual host itself still answers.
    lab.guest
        .exec_ok(&["ip", "addr", "add", "192.168.30.77/24", "dev", &lab.tap]);
    assert!(ping_host(&lab));
}

/// A lab whose hubnat has a control socket (`ctl.sock` in the returned directory, which the
/// unprivileged hubnat may write) beside `config`.
fn lab_with_control(config: &str) -> (Lab, TempDir) {
    let ops = TempDir::new();
    must(Command::new("chmod").arg("777").arg(&ops.0));
    let config = format!(
        "[control]\nsocket = \"{}\"\n{config}",
        ops.join("ctl.sock").display()
    );
    let lab = Lab::start(&config);
    wait_until(Duration::from_secs(10), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
    (lab, ops)
}

fn set_guest_mac(lab: &Lab, mac: &str) {
    lab.guest
        .exec_ok(&["ip", "link", "set", "dev", &lab.tap, "address", mac]);
}

#[test]
fn dhclient_gets_the_mtu_search_list_and_ntp_servers() {
    require_root!();
    let lab = Lab::start(
        "[nat]\nmtu = 1400\n[dhcp]\ndomain = \"hubnat.test\"\n\
         search = [\"a.test\", \"b.a.test\"]\nntp = [\"192.168.30.1\"]\n",
    );
    let client = Dhclient::requesting(&lab, "interface-mtu, domain-search, ntp-servers");
    let (_p, lease) = client.bind();
    assert_eq!(lease.get("new_interface_mtu"), Some("1400"));
    assert_eq!(lease.get("new_ntp_servers"), Some("192.168.30.1"));
    let leases = client.lease_file();
    assert!(
        leases.contains("option interface-mtu 1400;"),
        "lease file:\n{leases}"
    );
    // dhclient writes each name of the list back whole: the compression was undone.
    assert!(
        leases.contains(r#"option domain-search "a.test.", "b.a.test.";"#),
        "lease file:\n{leases}"
    );
    assert!(
        leases.contains("option ntp-servers 192.168.30.1;"),
        "{leases}"
    );
    assert!(
        leases.contains(r#"option domain-name "hubnat.test";"#),
        "{leases}"
    );

    // Without `search`, the list is the domain.
    let lab = Lab::start("[dhcp]\ndomain = \"hubnat.test\"\n");
    let client = Dhclient::requesting(&lab, "interface-mtu, domain-search");
    let (_p, _) = client.bind();
    let leases = client.lease_file();
    assert!(leases.contains("option interface-mtu 1500;"), "{leases}");
    assert!(
        leases.contains(r#"option domain-search "hubnat.test.";"#),
        "{leases}"
    );
}

const RESERVED_MAC: &str = "02:00:00:00:00:42";

#[test]
fn a_reserved_mac_gets_its_address_outside_the_range() {
    require_root!();
    let (lab, ops) = lab_with_control(&format!(
        "[[dhcp.reservation]]\nmac = \"{RESERVED_MAC}\"\nip = \"192.168.30.250\"\nname = \"vm1\"\n"
    ));
    set_guest_mac(&lab, RESERVED_MAC);
    let client = Dhclient::new(&lab);
    let (_p, lease) = client.bind();
    assert_eq!(lease.get("new_ip_address"), Some("192.168.30.250"));
    assert_eq!(lab.guest.addrs(&lab.tap), vec!["192.168.30.250/24"]);
    assert!(ping_host(&lab), "the virtual host does not answer ping");
    let table = ctl_json(&ops.0, &["dhcp-table"]);
    let row = &table[0];
    assert_eq!(row["ip"], "192.168.30.250", "{table}");
    assert_eq!(row["mac"], "02-00-00-00-00-42");
    assert_eq!(row["reserved"], true);
    // The client sent a host name of its own, which the lease keeps.
    assert_eq!(row["host_name"], "e2e-guest");
    let text = ctl(&ops.0, &["dhcp-table"]);
    assert!(text.contains("Reserved") && text.contains("yes"), "{text}");
}

#[test]
fn a_reservation_added_at_run_time_applies_to_the_next_client() {
    require_root!();
    let (lab, ops) = lab_with_control("");
    let out = ctl(
        &ops.0,
        &[
            "dhcp",
            "reserve",
            "add",
            RESERVED_MAC,
            "192.168.30.77",
            "vm2",
        ],
    );
    assert!(out.contains("dhcp.reservation"), "{out}");
    // Refused with the field named, nothing changed.
    let bad = Command::new(common::hubnat_bin())
        .arg("--control")
        .arg(ops.join("ctl.sock"))
        .args([
            "dhcp",
            "reserve",
            "add",
            "02:00:00:00:00:43",
            "192.168.31.9",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("dhcp.reservation[1].ip"), "{err}");

    set_guest_mac(&lab, RESERVED_MAC);
    let (out, lease) = udhcpc(&lab, &[]);
    assert!(
        out.status.success(),
        "udhcpc failed: {out:?}\n{}",
        lab.hubnat_log()
    );
    assert_eq!(lease.get("ip"), Some("192.168.30.77"));
    let list = ctl_json(&ops.0, &["dhcp", "reserve", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["mac"], RESERVED_MAC);
    assert_eq!(list[0]["name"], "vm2");
    assert_eq!(list[0]["leased"], "192.168.30.77");
    let table = ctl_json(&ops.0, &["dhcp-table"]);
    assert_eq!(table[0]["reserved"], true, "{table}");

    // Removed at run time: gone from the list, the lease kept (it is in the range).
    ctl(&ops.0, &["dhcp", "reserve", "remove", RESERVED_MAC]);
    let list = ctl_json(&ops.0, &["dhcp", "reserve", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    let table = ctl_json(&ops.0, &["dhcp-table"]);
    assert_eq!(table[0]["ip"], "192.168.30.77");
    assert_eq!(table[0]["reserved"], false);
}

/// Many bindings through a journal made small, so that it fills and is compacted (snapshot,
/// then the journal restarted or made larger) again and again while leases are granted; the
/// leases held at the end survive kill -9.
#[test]
fn leases_granted_while_the_journal_is_compacted_survive_kill_9() {
    require_root!();
    let mut lab = Lab::start("");
    if let Some(mut p) = lab.hubnat.take() {
        p.stop(Duration::from_secs(5));
    }
    lab.start_hubnat_args("", &["--lease-journal-kib", "4"]);
    let load = PathBuf::from(env!("CARGO_BIN_EXE_hubnat-load"));
    let run = |args: &[&str]| {
        let mut all = vec![
            load.to_str().unwrap(),
            "dhcp",
            "--iface",
            &lab.tap,
            "--json",
        ];
        all.extend_from_slice(args);
        let out = lab.guest.exec(&all);
        assert!(
            out.status.success(),
            "hubnat-load {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.hubnat_log()
        );
    };
    // Churn: every exchange a new binding, released at once.
    run(&["--clients", "100", "--serial", "50", "--exchanges", "1500"]);
    // Then 100 other clients keep theirs.
    run(&[
        "--clients",
        "100",
        "--serial",
        "100",
        "--exchanges",
        "100",
        "--outstanding",
        "16",
        "--no-release",
        "--mac-tag",
        "77",
    ]);
    let state = lab.dir.join("state");
    let snapshot: serde_json::Value =
        serde_json::from_str(&common::read(&state.join("leases.json"))).unwrap();
    assert!(
        snapshot["epoch"].as_u64().unwrap() >= 3,
        "the journal was never compacted: {snapshot}"
    );

    lab.kill_hubnat();
    lab.start_hubnat("");
    let restored = wait_until(Duration::from_secs(10), || {
        lab.hubnat_log()
            .contains("restored 100 of 100 leases")
            .then_some(())
    });
    assert!(restored.is_some(), "{}", lab.hubnat_log());
}
