//! Real packets through the real kernel programs: `killswitch up --cgroup` on a child cgroup in
//! private namespaces, probed from inside and outside the cgroup.

use std::{net::SocketAddr, process::Output};

use testbed::{
    echo::EchoServer,
    net::{TestNet, OTHER_V4, OTHER_V6, SERVER_V4, SERVER_V6, TUNNEL_PEER_V4, TUNNEL_PEER_V6},
    process::{killswitch, killswitch_ok, output_in},
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");
const SERVER_PORT: u16 = 1194;
const OTHER_PORT: u16 = 8080;

#[derive(Clone, Copy, Debug)]
enum Probe {
    Tcp(&'static str, u16),
    Udp(&'static str, u16),
    Ping(&'static str),
}

/// Whether `probe` succeeds from the client namespace, inside `cgroup` or outside any test cgroup.
fn reaches(net: &TestNet, cgroup: Option<&Cgroup>, probe: Probe) -> bool {
    let out: Output = match probe {
        Probe::Tcp(addr, port) => output_in(
            &net.client,
            cgroup,
            PROBE,
            &["tcp", &socket(addr, port).to_string()],
        ),
        Probe::Udp(addr, port) => output_in(
            &net.client,
            cgroup,
            PROBE,
            &["udp", &socket(addr, port).to_string()],
        ),
        Probe::Ping(addr) => output_in(&net.client, cgroup, "ping", &["-c1", "-W1", "-q", addr]),
    };
    assert_ne!(out.status.code(), Some(125), "could not join the cgroup");
    out.status.success()
}

fn socket(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

/// The config: the tunnel, one v4 server on any protocol, one v6 server on UDP only.
fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("killswitch.toml");
    let text = format!(
        r#"tunnels = ["tun0"]

[[server]]
address = "{SERVER_V4}"
port = {SERVER_PORT}

[[server]]
address = "{SERVER_V6}"
port = {SERVER_PORT}
protocol = "udp"
"#
    );
    testbed::write_config(&path, &text);
    path
}

struct Fixture {
    net: TestNet,
    cgroup: Cgroup,
    pins: PinRoot,
    config: std::path::PathBuf,
    _servers: EchoServer,
    _loopback: EchoServer,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let net = TestNet::new();
        let servers = EchoServer::start(
            &net.internet,
            &[
                socket(SERVER_V4, SERVER_PORT),
                socket(SERVER_V4, SERVER_PORT + 1),
                socket(SERVER_V6, SERVER_PORT),
                socket(OTHER_V4, OTHER_PORT),
                socket(OTHER_V6, OTHER_PORT),
                socket(TUNNEL_PEER_V4, OTHER_PORT),
                socket(TUNNEL_PEER_V6, OTHER_PORT),
            ],
        );
        let loopback = EchoServer::start(&net.client, &[socket("127.0.0.1", 7), socket("::1", 7)]);
        let dir = TempDir::new();
        let config = write_config(&dir.0);
        Fixture {
            net,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            config,
            _servers: servers,
            _loopback: loopback,
            _dir: dir,
        }
    }

    fn killswitch(&self, args: &[&str]) -> Output {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        killswitch(&self.net.client, &self.pins, &all)
    }

    fn killswitch_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        killswitch_ok(&self.net.client, &self.pins, &all)
    }

    fn up(&self) {
        self.killswitch_ok(&["up", "--cgroup", &self.cgroup.relative]);
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.killswitch(&["status", "--json", "--cgroup", &self.cgroup.relative]);
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path = testbed::private_dir("kstest");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ALLOWED: &[Probe] = &[
    Probe::Tcp(SERVER_V4, SERVER_PORT),
    Probe::Udp(SERVER_V4, SERVER_PORT),
    Probe::Udp(SERVER_V6, SERVER_PORT),
    Probe::Tcp("127.0.0.1", 7),
    Probe::Udp("::1", 7),
    Probe::Ping("127.0.0.1"),
    Probe::Tcp(TUNNEL_PEER_V4, OTHER_PORT),
    Probe::Udp(TUNNEL_PEER_V6, OTHER_PORT),
    Probe::Ping(TUNNEL_PEER_V4),
    Probe::Ping(TUNNEL_PEER_V6),
];

const BLOCKED: &[Probe] = &[
    Probe::Tcp(OTHER_V4, OTHER_PORT),
    Probe::Udp(OTHER_V4, OTHER_PORT),
    Probe::Tcp(OTHER_V6, OTHER_PORT),
    Probe::Udp(OTHER_V6, OTHER_PORT),
    Probe::Ping(OTHER_V4),
    Probe::Ping(OTHER_V6),
    // The server, but the wrong port, protocol or ICMP.
    Probe::Tcp(SERVER_V4, SERVER_PORT + 1),
    Probe::Udp(SERVER_V4, SERVER_PORT + 1),
    Probe::Tcp(SERVER_V6, SERVER_PORT),
    Probe::Ping(SERVER_V4),
    Probe::Ping(SERVER_V6),
];

fn check_all(fixture: &Fixture, cgroup: Option<&Cgroup>, expect_blocked: bool) {
    let mut wrong = Vec::new();
    for &probe in ALLOWED {
        if !reaches(&fixture.net, cgroup, probe) {
            wrong.push(format!("{probe:?} should pass"));
        }
    }
    for &probe in BLOCKED {
        if reaches(&fixture.net, cgroup, probe) == expect_blocked {
            wrong.push(format!(
                "{probe:?} should {}",
                if expect_blocked { "be dropped" } else { "pass" }
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "wrong verdicts (cgroup: {}): {wrong:#?}",
        cgroup.is_some()
    );
}

fn counter(status: &serde_json::Value, direction: &str, reason: &str) -> u64 {
    status["scopes"][0]["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["direction"] == direction && c["reason"] == reason)
        .and_then(|c| c["packets"].as_u64())
        .unwrap()
}

#[test]
fn scope_allows_only_tunnel_loopback_and_servers_and_outlives_the_loader() {
    require_root!();
    let f = Fixture::new();

    // Baseline: the network works, so a blocked probe below means the kill switch dropped it.
    check_all(&f, Some(&f.cgroup), false);

    f.up();
    // `up` has exited: what follows is enforced by pinned programs alone.
    check_all(&f, Some(&f.cgroup), true);
    // Same namespace, outside the scope: untouched.
    check_all(&f, None, false);

    let status = f.status_json();
    let scope = &status["scopes"][0];
    assert_eq!(scope["enforced"], true, "{status:#}");
    assert_eq!(scope["tunnels"][0]["name"], "tun0");
    assert!(counter(&status, "egress", "default-drop") > 0);
    assert!(counter(&status, "egress", "server") > 0);
    assert!(counter(&status, "ingress", "server") > 0);
    assert!(counter(&status, "egress", "tunnel") > 0);
    assert!(counter(&status, "ingress", "loopback") > 0);

    let out = f.killswitch_ok(&["down", "--cgroup", &f.cgroup.relative]);
    assert!(out.contains("removed"), "{out}");
    check_all(&f, Some(&f.cgroup), false);
    let leftovers: Vec<_> = std::fs::read_dir(&f.pins.path).unwrap().collect();
    assert!(leftovers.is_empty(), "down left pins behind: {leftovers:?}");
    let attached = testbed::run(
        "bpftool",
        &["cgroup", "show", f.cgroup.path.to_str().unwrap()],
    );
    assert!(
        !attached.contains("cgroup_inet"),
        "programs still attached: {attached}"
    );
}

#[test]
fn rerunning_up_follows_a_new_tunnel_ifindex() {
    require_root!();
    let f = Fixture::new();
    f.up();
    let through_tunnel = Probe::Tcp(TUNNEL_PEER_V4, OTHER_PORT);
    assert!(reaches(&f.net, Some(&f.cgroup), through_tunnel));

    f.net.remove_tunnel();
    f.net.add_tunnel();
    // The old ifindex is gone; the new tun0 is not trusted until the policy is re-applied.
    assert!(
        !reaches(&f.net, Some(&f.cgroup), through_tunnel),
        "new tunnel trusted blindly"
    );
    let out = f.killswitch_ok(&["up", "--cgroup", &f.cgroup.relative]);
    assert!(out.contains("updated"), "{out}");
    assert!(reaches(&f.net, Some(&f.cgroup), through_tunnel));
    assert!(!reaches(
        &f.net,
        Some(&f.cgroup),
        Probe::Tcp(OTHER_V4, OTHER_PORT)
    ));
}

#[test]
fn rerunning_up_never_leaves_the_scope_unfiltered() {
    require_root!();
    let f = Fixture::new();
    let oracle = EchoServer::start(&f.net.internet, &[socket(OTHER_V4, 9999)]);
    f.up();
    // One datagram per millisecond towards a blocked address while `up` is re-applied 20 times.
    let flood = testbed::process::command_in(
        &f.net.client,
        Some(&f.cgroup),
        PROBE,
        &["flood", &socket(OTHER_V4, 9999).to_string(), "4000"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    for _ in 0..20 {
        f.up();
    }
    let sent = flood.wait_with_output().unwrap();
    let attempts: u64 = String::from_utf8_lossy(&sent.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    assert!(attempts > 500, "the flood did not run: {attempts}");
    assert_eq!(
        oracle.received(),
        0,
        "datagrams leaked during re-application"
    );
}

#[test]
fn bad_config_leaves_the_enforcement_in_place() {
    require_root!();
    let f = Fixture::new();
    f.up();
    std::fs::write(&f.config, "tunnels = [\"tun0\"]\nbogus = 1\n").unwrap();
    let out = f.killswitch(&["up", "--cgroup", &f.cgroup.relative]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert!(stderr.contains("killswitch.toml:2"), "{stderr}");
    assert!(!reaches(
        &f.net,
        Some(&f.cgroup),
        Probe::Tcp(OTHER_V4, OTHER_PORT)
    ));
    assert!(reaches(
        &f.net,
        Some(&f.cgroup),
        Probe::Tcp(SERVER_V4, SERVER_PORT)
    ));
}

/// A first `up` that the kernel refuses holds the scope in lockdown: loopback (and DHCP) only,
/// the servers and the tunnel included in what is refused. The running kernel accepts the
/// programs, so `tests/tests/kernels.rs` runs this test in a VM booted from Debian 12's kernel
/// with `lockdown=confidentiality`, which refuses `bpf_probe_read_kernel` to every program.
#[test]
#[ignore = "needs a kernel that refuses the programs: tests/tests/kernels.rs runs it in a VM"]
fn a_first_up_the_kernel_refuses_holds_the_scope_in_lockdown() {
    require_root!();
    let f = Fixture::new();
    check_all(&f, Some(&f.cgroup), false);

    // The eBPF backend's own lockdown (`auto` would try nftables next; tests/tests/nftables.rs).
    let out = f.killswitch(&["up", "--backend", "ebpf", "--cgroup", &f.cgroup.relative]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert!(stderr.contains("lockdown"), "{stderr}");
    assert!(
        stderr.contains("bpf_probe_read_kernel"),
        "names the feature: {stderr}"
    );

    only_loopback_reachable(&f);
    check_all(&f, None, false);

    let status = f.status_json();
    let scope = &status["scopes"][0];
    assert_eq!(scope["enforced"], true, "{status:#}");
    assert_eq!(scope["mode"], "lockdown", "{status:#}");

    f.killswitch_ok(&["down", "--cgroup", &f.cgroup.relative]);
    check_all(&f, Some(&f.cgroup), false);
}

/// Only loopback answers from the scope: what lockdown allows (DHCP aside).
fn only_loopback_reachable(f: &Fixture) {
    let mut wrong = Vec::new();
    for &probe in ALLOWED.iter().chain(BLOCKED) {
        let loopback = matches!(
            probe,
            Probe::Tcp("127.0.0.1", _) | Probe::Udp("::1", _) | Probe::Ping("127.0.0.1")
        );
        if reaches(&f.net, Some(&f.cgroup), probe) != loopback {
            wrong.push(probe);
        }
    }
    assert!(
        wrong.is_empty(),
        "in lockdown, only loopback is reachable: {wrong:?}"
    );
}

#[test]
fn a_bad_config_at_the_first_up_holds_the_scope_in_lockdown() {
    require_root!();
    let f = Fixture::new();
    check_all(&f, Some(&f.cgroup), false);
    let valid = std::fs::read_to_string(&f.config).unwrap();

    testbed::write_config(&f.config, "tunnels = [\"tun0\"]\nbogus = 1\n");
    let out = f.killswitch(&["up", "--cgroup", &f.cgroup.relative]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert!(
        stderr.contains("killswitch.toml:2") && stderr.contains("lockdown"),
        "{stderr}"
    );
    only_loopback_reachable(&f);
    check_all(&f, None, false);
    let status = f.status_json();
    let scope = &status["scopes"][0];
    assert_eq!(scope["mode"], "lockdown", "{status:#}");
    assert!(
        scope["lockdown_reason"]
            .as_str()
            .is_some_and(|r| r.contains("killswitch.toml:2")),
        "{status:#}"
    );
    // A second bad `up` changes nothing; `servers` refuses to edit a locked scope.
    let out = f.killswitch(&["up", "--cgroup", &f.cgroup.relative]);
    assert_eq!(out.status.code(), Some(2));
    let out = f.killswitch(&[
        "servers",
        "add",
        "203.0.113.9:8080",
        "--cgroup",
        &f.cgroup.relative,
    ]);
    assert_eq!(out.status.code(), Some(1));
    only_loopback_reachable(&f);

    // A missing file is a bad config too; the lockdown stays.
    let missing = f.config.with_file_name("missing.toml");
    let out = killswitch(
        &f.net.client,
        &f.pins,
        &[
            "--config",
            missing.to_str().unwrap(),
            "up",
            "--cgroup",
            &f.cgroup.relative,
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    only_loopback_reachable(&f);

    // A valid config replaces the lockdown with the policy.
    testbed::write_config(&f.config, &valid);
    f.up();
    check_all(&f, Some(&f.cgroup), true);
    let status = f.status_json();
    assert_eq!(status["scopes"][0]["mode"], "policy", "{status:#}");
    assert!(
        status["scopes"][0]["lockdown_reason"].is_null(),
        "{status:#}"
    );
}

/// A process of the scope in another network namespace (a container) whose interface has the
/// host tunnel's ifindex: the programs key interfaces by namespace too, so it is not the tunnel.
/// Sends one UDP datagram in an Ethernet frame on the client's uplink through an `AF_PACKET`
/// socket; whether the device took it (a tc drop fails the send with ENOBUFS).
fn raw_frame_sent(f: &Fixture, source: &str, destination: &str) -> bool {
    let out = output_in(
        &f.net.client,
        None,
        PROBE,
        &["raw", "up0", source, destination],
    );
    out.status.success()
}

#[test]
fn the_uplink_guard_drops_raw_frames_but_not_a_raw_dhcp_discovery() {
    require_root!();
    let f = Fixture::new();
    let text = std::fs::read_to_string(&f.config).unwrap();
    testbed::write_config(
        &f.config,
        &format!("uplinks = [\"up0\"]\n{text}\n[guard]\nenabled = true\n"),
    );
    let other = format!("{OTHER_V4}:{OTHER_PORT}");
    assert!(
        raw_frame_sent(&f, "192.0.2.2:40000", &other),
        "a raw frame was refused before `up`"
    );
    f.up();
    assert!(
        !raw_frame_sent(&f, "192.0.2.2:40000", &other),
        "the guard let a raw frame to an internet host leave"
    );
    assert!(
        raw_frame_sent(&f, "0.0.0.0:68", "255.255.255.255:67"),
        "the guard refused a raw DHCP discovery"
    );
    let status = f.status_json();
    let guard = &status["scopes"][0]["guard"];
    assert_eq!(guard["devices"][0]["name"], "up0", "{guard:#}");
    assert_eq!(guard["devices"][0]["attached"], true, "{guard:#}");
    let guard_counter = |reason: &str| {
        guard["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["direction"] == "egress" && c["reason"] == reason)
            .and_then(|c| c["packets"].as_u64())
            .unwrap()
    };
    assert!(guard_counter("default-drop") >= 1, "{guard:#}");
    assert!(guard_counter("dhcp") >= 1, "{guard:#}");
    // `up` again puts its programs in the guard's place (a link update, or the filter
    // replaced in place before TCX), with no gap and no second guard.
    f.up();
    assert!(
        !raw_frame_sent(&f, "192.0.2.2:40000", &other),
        "after a second `up` a raw frame left"
    );
    // The scope's own sockets still get through the guard where the policy allows them.
    assert!(reaches(
        &f.net,
        Some(&f.cgroup),
        Probe::Udp(SERVER_V4, SERVER_PORT)
    ));
    assert!(!reaches(&f.net, None, Probe::Tcp(OTHER_V4, OTHER_PORT)));
    f.killswitch_ok(&["down", "--cgroup", &f.cgroup.relative]);
    assert!(
        raw_frame_sent(&f, "192.0.2.2:40000", &other),
        "`down` left the guard on the uplink"
    );
    assert!(reaches(&f.net, None, Probe::Tcp(OTHER_V4, OTHER_PORT)));
}

#[test]
fn an_interface_of_another_namespace_with_the_tunnels_ifindex_is_not_the_tunnel() {
    require_root!();
    let f = Fixture::new();
    let tunnel = f.net.client.ifindex("tun0");
    let container = testbed::Netns::new("k");
    let beyond = testbed::Netns::new("b");
    let index = tunnel.to_string();
    container.ip(&[
        "link",
        "add",
        "eth9",
        "index",
        &index,
        "type",
        "veth",
        "peer",
        "name",
        "eth9p",
        "netns",
        &beyond.name,
    ]);
    container.ip(&["link", "set", "eth9", "up"]);
    beyond.ip(&["link", "set", "eth9p", "up"]);
    container.addr("eth9", "198.18.9.2/24");
    beyond.addr("eth9p", "198.18.9.1/24");
    assert_eq!(container.ifindex("eth9"), tunnel);
    let _echo = EchoServer::start(&beyond, &[socket("198.18.9.1", OTHER_PORT)]);
    let probe = |kind: &str| {
        let out = output_in(
            &container,
            Some(&f.cgroup),
            PROBE,
            &[kind, &socket("198.18.9.1", OTHER_PORT).to_string()],
        );
        assert_ne!(out.status.code(), Some(125), "could not join the cgroup");
        out.status.success()
    };
    assert!(
        probe("tcp") && probe("udp"),
        "baseline: the container's network works"
    );

    f.up();
    assert!(
        !probe("tcp"),
        "TCP from another namespace passed as the tunnel"
    );
    assert!(
        !probe("udp"),
        "UDP from another namespace passed as the tunnel"
    );
    // The host's own tunnel still carries the scope's traffic.
    assert!(reaches(
        &f.net,
        Some(&f.cgroup),
        Probe::Tcp(TUNNEL_PEER_V4, OTHER_PORT)
    ));
}

/// `check` names every interface that `tunnels` matches but that is no VPN tunnel.
#[test]
fn check_warns_when_tunnels_matches_an_ordinary_interface() {
    require_root!();
    let netns = testbed::Netns::new("w");
    for (dev, peer) in [("tun0", "tun0p"), ("eth7", "eth7p")] {
        netns.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer]);
    }
    netns.ip(&["tuntap", "add", "dev", "tap7", "mode", "tap"]);
    let dir = testbed::private_dir("kswarn");
    let config = dir.join("killswitch.toml");
    testbed::write_config(&config, "tunnels = [\"tun0\", \"eth*\", \"tap*\"]\n");
    let pins = PinRoot::new();
    let out = killswitch(
        &netns,
        &pins,
        &["--config", config.to_str().unwrap(), "check"],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("WARNING")).collect();
    assert_eq!(warnings.len(), 2, "{stdout}");
    assert!(warnings.iter().all(|w| w.contains("eth7")), "{stdout}");
}
