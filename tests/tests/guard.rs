//! The uplink guard end to end over a real OpenVPN tunnel: a container-like namespace routed
//! through the client (forwarding on, masquerade as Docker sets it up) and frames sent on a raw
//! packet socket, with the leak oracle on the router outside the client.

use std::time::{Duration, Instant};

use testbed::{
    capture::Capture,
    lab::{Lab, VPN_PORT, VPN_SERVER, WEB_HOST},
    process::{killswitch, killswitch_command, nft_in, output_in, Background},
    require_root, write_config, Cgroup, Netns, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");
const WEB_PORT: u16 = 80;
/// The container's network, behind the client (198.18.0.0/15 is the tunnel's too: another /24).
const CONTAINER: &str = "198.19.9.2";
const CONTAINER_GATEWAY: &str = "198.19.9.1";

/// What leaves the client for the web host in the clear (the tunnel carries it otherwise).
fn to_web_host() -> String {
    format!("dst host {WEB_HOST}")
}

struct Bed {
    lab: Lab,
    container: Netns,
    /// The scope (standing in for the cgroup2 root); the container's processes run in it, as a
    /// container's do under the system-wide scope.
    cgroup: Cgroup,
    pins: PinRoot,
    config: std::path::PathBuf,
    backend: &'static str,
}

impl Bed {
    fn new(backend: &'static str) -> Bed {
        let lab = Lab::new(&[WEB_PORT]);
        let container = Netns::new("ct");
        container.veth("eth0", &lab.client, "vc0");
        container.addr("eth0", &format!("{CONTAINER}/24"));
        lab.client.addr("vc0", &format!("{CONTAINER_GATEWAY}/24"));
        container.ip(&["route", "add", "default", "via", CONTAINER_GATEWAY]);
        lab.client.sysctl("net.ipv4.ip_forward", "1");
        // As Docker does: whatever leaves by another interface than the bridge is masqueraded.
        let nat = nft_in(
            &lab.client,
            &["add table ip ctnat; \
                 add chain ip ctnat post { type nat hook postrouting priority 100; }; \
                 add rule ip ctnat post ip saddr 198.19.9.0/24 oifname != \"vc0\" masquerade"],
        );
        assert!(
            nat.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&nat.stderr)
        );
        let config = lab.dir().join("killswitch.toml");
        // The uplink is a veth here, which the guard skips unless `uplinks` names it.
        write_config(
            &config,
            &format!(
                "tunnels = [\"tun0\"]\nuplinks = [\"c0\"]\n\n[[server]]\naddress = \"{VPN_SERVER}\"\n\
                 port = {VPN_PORT}\nprotocol = \"udp\"\n\n[guard]\nenabled = true\n"
            ),
        );
        Bed {
            lab,
            container,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            config,
            backend,
        }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", &self.cgroup.relative]);
        all
    }

    fn killswitch(&self, args: &[&str]) -> std::process::Output {
        killswitch(&self.lab.client, &self.pins, &self.args(args))
    }

    fn daemon(&self) -> Background {
        let args = self.args(&["daemon", "--backend", self.backend]);
        let mut command = killswitch_command(&self.lab.client, &self.pins, &args);
        let log = std::fs::File::create(self.lab.dir().join("daemon.log")).unwrap();
        command.stderr(log);
        let daemon = Background::start(command);
        let started = Instant::now();
        while !self.killswitch(&["status"]).status.success() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon did not enforce the scope: {}",
                self.lab.log("daemon.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// A TCP request from the container to the web host.
    fn container_request(&self) -> bool {
        let target = format!("{WEB_HOST}:{WEB_PORT}");
        output_in(
            &self.container,
            Some(&self.cgroup),
            PROBE,
            &["tcp", &target, "700"],
        )
        .status
        .success()
    }

    /// [`Bed::container_request`] until one succeeds, at most `limit`.
    fn container_reaches(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.container_request() {
                return true;
            }
        }
        false
    }

    /// A UDP datagram from the client on a raw packet socket on its uplink.
    fn raw(&self, source: &str, destination: &str) -> bool {
        self.raw_on("c0", source, destination)
    }

    /// [`Bed::raw`] on `device`.
    fn raw_on(&self, device: &str, source: &str, destination: &str) -> bool {
        output_in(
            &self.lab.client,
            None,
            PROBE,
            &["raw", device, source, destination],
        )
        .status
        .success()
    }

    /// Whether the guard is attached to `device` now, as `status --json` says (before Linux
    /// 6.6 a clsact filter has no pin: there "attached" is the device's being there).
    fn guards(&self, device: &str) -> bool {
        let status: serde_json::Value =
            serde_json::from_slice(&self.killswitch(&["status", "--json"]).stdout).unwrap();
        status["scopes"][0]["guard"]["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["name"] == device && d["attached"] == true)
    }
}

fn guard_holds_forwarded_and_raw_traffic(backend: &'static str) {
    let mut bed = Bed::new(backend);
    bed.lab.connect();
    let daemon = bed.daemon();
    let status = String::from_utf8_lossy(&bed.killswitch(&["status"]).stdout).into_owned();
    assert!(status.contains("guard    on c0"), "{status}");
    assert!(
        bed.container_reaches(Duration::from_secs(5)),
        "the container did not reach the web host through the tunnel"
    );
    // A device appears while the config file has a typo: the reload is refused and the policy
    // in force stays (SPEC), and since that is the daemon's own it goes on following devices:
    // the new one gets its guard (a macvlan is wired, and one `uplinks` does not name: nothing
    // may leave by it), and the container goes on passing.
    let valid = std::fs::read_to_string(&bed.config).unwrap();
    write_config(&bed.config, &format!("bogus = 1\n{valid}"));
    bed.lab
        .client
        .ip(&["link", "add", "mv0", "link", "c0", "type", "macvlan"]);
    let started = Instant::now();
    let hooked = || match backend {
        "nftables" => {
            let chains = nft_in(&bed.lab.client, &["list chains netdev"]);
            String::from_utf8_lossy(&chains.stdout).contains("mv0")
        }
        _ => bed.guards("mv0"),
    };
    while !hooked() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the daemon did not guard the new device: {}",
            bed.lab.log("daemon.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        bed.lab.log("daemon.log").matches("reload refused").count(),
        1,
        "{}",
        bed.lab.log("daemon.log")
    );
    assert!(
        bed.container_reaches(Duration::from_secs(5)),
        "the container lost the tunnel to a typo: {}",
        bed.lab.log("daemon.log")
    );
    write_config(&bed.config, &valid);

    // The tunnel dies: the container's traffic now routes to the uplink.
    bed.lab.start_capture();
    bed.lab.kill_vpn_client();
    let mut reached = 0;
    for _ in 0..5 {
        reached += usize::from(bed.container_request());
    }
    // A sender no cgroup hook sees (a VM's traffic comes from a tap device, not a socket).
    let target = format!("{WEB_HOST}:{WEB_PORT}");
    let unscoped = output_in(&bed.container, None, PROBE, &["tcp", &target, "700"]);
    let web = format!("{WEB_HOST}:{WEB_PORT}");
    let container_udp = output_in(
        &bed.container,
        Some(&bed.cgroup),
        PROBE,
        &["udp", &format!("{WEB_HOST}:53"), "300"],
    );
    let raw_sent = bed.raw("192.168.77.2:40000", &web);
    let dhcp_sent = bed.raw("0.0.0.0:68", "255.255.255.255:67");
    std::thread::sleep(Duration::from_millis(300));
    let leaked = bed.lab.stop_capture(&format!(
        "{} and not (udp dst port {WEB_PORT})",
        to_web_host()
    ));
    // The raw frames are the UDP ones to the web port.
    let raw_leaked = bed
        .lab
        .captured(&format!("{} and udp dst port {WEB_PORT}", to_web_host()));
    let dhcp_seen = bed.lab.captured("udp and dst port 67");
    assert_eq!(
        reached, 0,
        "the container reached the web host with the tunnel dead"
    );
    assert!(!container_udp.status.success());
    assert!(
        !unscoped.status.success(),
        "a sender outside the scope got out"
    );
    assert!(leaked.is_empty(), "leaked in the clear: {leaked:#?}");
    assert!(raw_leaked.is_empty(), "raw frames leaked: {raw_leaked:#?}");
    assert!(!raw_sent, "the guard let a raw frame to the web host leave");
    assert!(dhcp_sent, "a DHCP discovery on a packet socket was refused");
    assert!(
        !dhcp_seen.is_empty(),
        "the DHCP discovery did not reach the router"
    );
    {
        let status = String::from_utf8_lossy(&bed.killswitch(&["status"]).stdout).into_owned();
        let dropped = status
            .lines()
            .skip_while(|l| !l.starts_with("frames"))
            .find(|l| l.contains("default-drop"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            dropped.split_whitespace().nth(2).is_some_and(|n| n != "0"),
            "the guard counted no drop:\n{status}"
        );
    }

    // A reconnect under the daemon: the container is back through the new tunnel.
    bed.lab.connect();
    assert!(
        bed.container_reaches(Duration::from_secs(10)),
        "the container did not come back through the new tunnel: {}",
        bed.lab.log("daemon.log")
    );
    let verify = bed.killswitch(&["verify"]);
    let report = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(verify.status.success(), "verify failed:\n{report}");
    assert!(
        report
            .lines()
            .any(|l| l.contains("guard") && l.contains("c0")),
        "{report}"
    );
    drop(daemon);
    if backend == "nftables" {
        // A rule slipped into the guard's netdev table is seen.
        let tables = nft_in(&bed.lab.client, &["list tables netdev"]);
        let table = String::from_utf8_lossy(&tables.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("table netdev "))
            .expect("the guard's netdev table")
            .trim()
            .to_owned();
        let edit = nft_in(
            &bed.lab.client,
            &[&format!("insert rule netdev {table} frames_uplink accept")],
        );
        assert!(edit.status.success());
        let verify = bed.killswitch(&["verify"]);
        let report = String::from_utf8_lossy(&verify.stdout).into_owned();
        assert!(
            !verify.status.success() && report.contains("FAIL  table"),
            "verify missed an edit of the netdev table:\n{report}"
        );
    }

    // Without the kill switch the same traffic leaks: the oracle sees it, and `down` took the
    // guard away with the rest.
    let down = bed.killswitch(&["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    bed.lab.start_capture();
    bed.lab.kill_vpn_client();
    let reached_unguarded = bed.container_reaches(Duration::from_secs(5));
    let raw_unguarded = bed.raw("192.168.77.2:40000", &web);
    std::thread::sleep(Duration::from_millis(300));
    let clear = bed.lab.stop_capture(&to_web_host());
    assert!(
        reached_unguarded,
        "without the kill switch the container did not get out"
    );
    assert!(raw_unguarded);
    assert!(
        !clear.is_empty(),
        "the leak oracle saw nothing without the kill switch"
    );
}

#[test]
fn the_guard_holds_a_containers_and_raw_frames_with_ebpf() {
    require_root!();
    guard_holds_forwarded_and_raw_traffic("ebpf");
}

/// `up` applied a policy the daemon did not read, and then its file got a typo: the daemon
/// cannot follow devices under either policy. A new wired device (a macvlan on a second link
/// to the router, which is a veth no policy here guards) gets a guard that passes nothing, so
/// a VM's frame cannot leave by it unjudged, and containers stop passing; a valid file is
/// applied at the next event. The daemon's own policy names no `uplinks`: had it written that
/// one, the macvlan would be an uplink, and a frame to the VPN server would pass.
#[test]
fn a_new_uplink_under_a_policy_the_daemon_did_not_read_passes_nothing() {
    require_root!();
    let mut bed = Bed::new("ebpf");
    let valid = std::fs::read_to_string(&bed.config).unwrap();
    let own = valid.replace("uplinks = [\"c0\"]\n", "");
    let applied = valid.replace("uplinks = [\"c0\"]", "uplinks = [\"c0\", \"c9\"]");
    assert!(own != valid && applied != valid);
    write_config(&bed.config, &own);
    bed.lab.connect();
    let daemon = bed.daemon();
    assert!(bed.container_reaches(Duration::from_secs(5)));
    write_config(&bed.config, &applied);
    assert!(bed.killswitch(&["up"]).status.success());
    write_config(&bed.config, &format!("bogus = 1\n{applied}"));
    assert!(
        !bed.lab.log("daemon.log").contains("reload applied"),
        "the daemon read the applied file before the typo: nothing left to test"
    );

    bed.lab.client.veth("c1", &bed.lab.router, "rc1");
    bed.lab
        .client
        .ip(&["link", "add", "mv1", "link", "c1", "type", "macvlan"]);
    bed.lab.client.ip(&["link", "set", "mv1", "up"]);
    let started = Instant::now();
    while !bed.guards("mv1") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new uplink got no guard: {}",
            bed.lab.log("daemon.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!bed.guards("c1"), "a veth got a guard");
    let web = format!("{WEB_HOST}:{WEB_PORT}");
    let server = format!("{VPN_SERVER}:{VPN_PORT}");
    let mut oracle = Capture::start(&bed.lab.router, "rc1", bed.lab.dir().join("rc1.pcap"));
    let sent = bed.raw_on("mv1", "192.168.78.2:40000", &web);
    let sent_to_server = bed.raw_on("mv1", "192.168.78.2:40001", &server);
    // The oracle sees such a frame when nothing holds it (c1 has no guard).
    let unguarded = bed.raw_on("c1", "192.168.78.3:40000", &web);
    oracle.stop();
    let leaked = oracle.packets("src host 192.168.78.2");
    assert!(!sent, "the new uplink's guard let a raw frame leave");
    assert!(!sent_to_server, "the new uplink was guarded as an uplink");
    assert!(leaked.is_empty(), "leaked by the new uplink: {leaked:#?}");
    assert!(
        !bed.container_request(),
        "containers still pass under a policy the daemon did not read"
    );
    assert!(unguarded);
    assert!(!oracle
        .packets(&format!("{} and src host 192.168.78.3", to_web_host()))
        .is_empty());

    // Valid again: the next event applies it (mv1 is wired and not in `uplinks`: its guard
    // still passes nothing, now as that policy's).
    write_config(&bed.config, &valid);
    bed.lab.client.ip(&["link", "set", "c1", "mtu", "1400"]);
    assert!(
        (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            bed.lab.log("daemon.log").contains("reload applied")
        }),
        "the valid file was not applied: {}",
        bed.lab.log("daemon.log")
    );
    assert!(bed.guards("mv1") && bed.guards("c0"));
    drop(daemon);
}

/// nftables: the forward chain holds what the host forwards, a netdev egress chain on the
/// uplink the raw frames.
#[test]
fn the_guard_holds_a_containers_and_raw_frames_with_nftables() {
    require_root!();
    guard_holds_forwarded_and_raw_traffic("nftables");
}

/// A whole DHCP exchange by a real client on packet sockets (busybox udhcpc: discover and
/// request on a raw socket, offer and ack read from one) with a real server on the router
/// (busybox udhcpd): it gets its lease through the guard while the policy allows DHCP, and
/// nothing of it reaches the router when the policy does not (without the kill switch the
/// same exchange works: the test can fail).
fn dhcp_exchange_through_the_guard(backend: &'static str) {
    let mut lab = Lab::new(&[]);
    let cgroup = Cgroup::new();
    let pins = PinRoot::new();
    let dir = lab.dir().to_owned();
    std::fs::write(
        dir.join("udhcpd.conf"),
        format!(
            "start 192.168.77.100\nend 192.168.77.150\ninterface rc\n\
             lease_file {leases}\npidfile {pid}\noption subnet 255.255.255.0\n",
            leases = dir.join("udhcpd.leases").display(),
            pid = dir.join("udhcpd.pid").display(),
        ),
    )
    .unwrap();
    std::fs::write(dir.join("udhcpd.leases"), "").unwrap();
    let conf = dir.join("udhcpd.conf");
    let _server = Background::start(testbed::process::command_in(
        &lab.router,
        None,
        "busybox",
        &["udhcpd", "-f", conf.to_str().unwrap()],
    ));
    let config = dir.join("killswitch.toml");
    let write = |dhcp: bool| {
        write_config(
            &config,
            &format!(
                "tunnels = [\"tun0\"]\nuplinks = [\"c0\"]\n\n[dhcp]\nenabled = {dhcp}\n\n[[server]]\n\
                 address = \"{VPN_SERVER}\"\nport = {VPN_PORT}\nprotocol = \"udp\"\n\n\
                 [guard]\nenabled = true\n"
            ),
        )
    };
    let ks = |lab: &Lab, args: &[&str]| {
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", &cgroup.relative]);
        let out = killswitch(&lab.client, &pins, &all);
        assert!(
            out.status.success(),
            "killswitch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    write(true);
    ks(&lab, &["up", "--backend", backend]);
    assert!(
        lease(&lab, LEASE_TRIES),
        "no lease through the guard with DHCP allowed"
    );

    write(false);
    ks(&lab, &["up", "--backend", backend]);
    lab.start_capture();
    let refused = !lease(&lab, 2);
    let seen = lab.stop_capture("udp and port 67");
    assert!(refused, "a lease with DHCP not allowed");
    assert!(seen.is_empty(), "DHCP reached the router: {seen:#?}");

    ks(&lab, &["down"]);
    assert!(
        lease(&lab, LEASE_TRIES),
        "no lease without the kill switch: the test proves nothing"
    );
}

/// Tries of a DHCP client that should get its lease: udhcpd starts in the background, and under
/// CI's load two tries a second apart once came too early.
const LEASE_TRIES: u32 = 5;

/// A DHCP exchange by busybox udhcpc on the client's uplink: discover and request at most
/// `tries` times each, a second apart; no script, so c0 keeps its address.
fn lease(lab: &Lab, tries: u32) -> bool {
    let tries = tries.to_string();
    output_in(
        &lab.client,
        None,
        "busybox",
        &[
            "udhcpc",
            "-i",
            "c0",
            "-f",
            "-q",
            "-n",
            "-t",
            &tries,
            "-T",
            "1",
            "-s",
            "/bin/true",
        ],
    )
    .status
    .success()
}

#[test]
fn a_dhcp_client_on_packet_sockets_gets_its_lease_through_the_guard_with_ebpf() {
    require_root!();
    dhcp_exchange_through_the_guard("ebpf");
}

#[test]
fn a_dhcp_client_on_packet_sockets_gets_its_lease_through_the_guard_with_nftables() {
    require_root!();
    dhcp_exchange_through_the_guard("nftables");
}

/// With `uplinks` naming a bridge, the devices that carry its frames (its ports) are guarded
/// as uplinks, not as devices nothing may leave by; a wired device beside it is.
#[test]
fn a_listed_bridges_ports_are_guarded_as_uplinks() {
    require_root!();
    let net = Netns::new("br");
    let far = Netns::new("bf");
    net.veth("p0", &far, "p1");
    for args in [
        &[
            "link", "add", "link", "p0", "name", "nic0", "type", "macvlan",
        ][..],
        &[
            "link", "add", "link", "p0", "name", "nic1", "type", "macvlan",
        ],
        &["link", "add", "br0", "type", "bridge"],
        &["link", "set", "nic0", "master", "br0"],
    ] {
        net.ip(args);
    }
    let dir = testbed::private_dir("ksbridge");
    let config = dir.join("killswitch.toml");
    write_config(
        &config,
        "tunnels = [\"tun0\"]\nuplinks = [\"br0\"]\n\n[guard]\nenabled = true\n",
    );
    let pins = PinRoot::new();
    let rendered = killswitch(
        &net,
        &pins,
        &["--config", config.to_str().unwrap(), "render", "nft"],
    );
    let script = String::from_utf8_lossy(&rendered.stdout).into_owned();
    let hooked = |chain: &str| {
        script
            .split(&format!("chain {chain} {{"))
            .nth(1)
            .and_then(|rest| rest.lines().nth(1))
            .unwrap_or_default()
            .to_owned()
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        hooked("frames_ethernet").contains("\"nic0\"")
            && hooked("frames_ethernet").contains("\"br0\""),
        "{script}"
    );
    assert!(hooked("frames_not_uplink").contains("\"nic1\""), "{script}");
}
