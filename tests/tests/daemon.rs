//! The daemon with real packets: tunnel churn followed over rtnetlink, SIGHUP reload, SIGTERM and
//! SIGKILL leaving the scope enforced, live server changes under traffic, and racing writers.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use testbed::{
    echo::EchoServer,
    net::{TestNet, OTHER_V4, SERVER_V4, TUNNEL_PEER_V4},
    process::{
        command_in, killswitch, killswitch_command, killswitch_in_cgroup, output_in, Background,
    },
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");

struct Setup {
    net: TestNet,
    cgroup: Cgroup,
    pins: PinRoot,
    dir: PathBuf,
    config: PathBuf,
    echo: EchoServer,
    /// The daemon's `--backend`, when the test names one.
    backend: Option<&'static str>,
}

impl Setup {
    fn new(config: &str) -> Setup {
        let net = TestNet::new();
        let echo = EchoServer::start(
            &net.internet,
            &[
                format!("{OTHER_V4}:8080").parse().unwrap(),
                format!("{SERVER_V4}:123").parse().unwrap(),
                format!("{SERVER_V4}:124").parse().unwrap(),
            ],
        );
        let dir = testbed::private_dir("kstest");
        let s = Setup {
            net,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            config: dir.join("killswitch.toml"),
            dir,
            echo,
            backend: None,
        };
        s.write_config(config);
        s
    }

    /// [`Setup::new`] with the daemon started with `--backend BACKEND`.
    fn with_backend(config: &str, backend: Option<&'static str>) -> Setup {
        let mut s = Setup::new(config);
        s.backend = backend;
        s
    }

    /// `daemon`, with the test's backend.
    fn daemon_command(&self) -> Vec<&str> {
        match self.backend {
            Some(backend) => vec!["daemon", "--backend", backend],
            None => vec!["daemon"],
        }
    }

    fn write_config(&self, text: &str) {
        testbed::write_config(&self.config, text);
    }

    /// `killswitch --config C ARGS --cgroup G` in the client namespace.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend(["--cgroup", &self.cgroup.relative]);
        all
    }

    fn killswitch(&self, args: &[&str]) -> std::process::Output {
        killswitch(&self.net.client, &self.pins, &self.args(args))
    }

    /// Starts the daemon and waits (bounded) until the scope is enforced.
    fn daemon(&self) -> Background {
        self.start_daemon(killswitch_command(
            &self.net.client,
            &self.pins,
            &self.args(&self.daemon_command()),
        ))
    }

    /// The daemon inside the scope it enforces, with `resolv_conf` as its /etc/resolv.conf.
    fn daemon_in_scope(&self, resolv_conf: &Path) -> Background {
        self.start_daemon(killswitch_in_cgroup(
            &self.net.client,
            &self.pins,
            &self.cgroup,
            resolv_conf,
            &self.args(&self.daemon_command()),
        ))
    }

    fn start_daemon(&self, mut command: std::process::Command) -> Background {
        // Its log (one line per drop event, too) goes to a file, shown when a test fails.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        command.stderr(log);
        let daemon = Background::start(command);
        assert!(
            wait_until(Duration::from_secs(10), || self.enforced()),
            "the daemon did not enforce the scope"
        );
        daemon
    }

    /// The test DNS server on OTHER:53, answering from `zone` (see `testbed::dns`).
    fn dns_server(&self, zone: &Path) -> Background {
        // Longer-lived than `command_in` allows: the TTL tests take two refresh periods.
        let mut command = std::process::Command::new("nsenter");
        command
            .arg(format!("--net={}", self.net.internet.path().display()))
            .args([
                "--",
                "timeout",
                "90",
                PROBE,
                "dns",
                &format!("{OTHER_V4}:53"),
            ])
            .arg(zone)
            .arg("80000");
        let dns = Background::start(command);
        assert_eq!(dns.line(Duration::from_secs(5)).as_deref(), Some("ready"));
        dns
    }

    /// A resolv.conf naming the test DNS server (one try, 1 s), for commands run in the scope.
    fn resolv_conf(&self) -> PathBuf {
        let path = self.dir.join("resolv.conf");
        std::fs::write(&path, RESOLV_CONF).unwrap();
        path
    }

    /// The zone (vpn.example.test is SERVER, TTL 1 s), its DNS server, and the daemon inside the
    /// scope using it.
    fn dns_and_daemon(&self) -> (PathBuf, Background, Background) {
        let zone = self.dir.join("zone");
        std::fs::write(&zone, "vpn.example.test 1 198.51.100.1\n").unwrap();
        let dns = self.dns_server(&zone);
        let daemon = self.daemon_in_scope(&self.resolv_conf());
        (zone, dns, daemon)
    }

    /// [`Setup::dns_and_daemon`] with the tunnel gone: the daemon reaches the resolver only
    /// through the `dns.servers` exception. The name has resolved when this returns.
    fn resolving_without_tunnel(&self) -> (PathBuf, Background, Background) {
        self.net.remove_tunnel();
        let running = self.dns_and_daemon();
        assert_eq!(
            self.servers(),
            "198.51.100.1:124/udp\n",
            "resolved at start"
        );
        running
    }

    fn servers(&self) -> String {
        String::from_utf8(self.killswitch(&["servers", "list"]).stdout).unwrap()
    }

    fn enforced(&self) -> bool {
        self.killswitch(&["status"]).status.success()
    }

    /// One UDP datagram a millisecond from inside the scope, in the background.
    fn flood(&self, target: &str, millis: &str) -> Background {
        Background::start(command_in(
            &self.net.client,
            Some(&self.cgroup),
            PROBE,
            &["flood", target, millis],
        ))
    }

    /// How many of its datagrams a flood sent and how many the kernel refused, once it ends.
    fn flood_result(flood: &Background) -> (u64, u64) {
        let line = flood
            .line(Duration::from_secs(30))
            .expect("the flood reports when it ends");
        let mut numbers = line.split_whitespace().map(|n| n.parse().unwrap());
        (numbers.next().unwrap(), numbers.next().unwrap())
    }

    /// Routes OTHER through the tunnel (again after the tunnel came back).
    fn route_other_through_tunnel(&self) {
        self.net.client.ip(&[
            "route",
            "replace",
            &format!("{OTHER_V4}/32"),
            "via",
            TUNNEL_PEER_V4,
        ]);
    }

    /// How many tunnel interfaces the scope trusts (`status --json`).
    fn tunnels_held(&self) -> usize {
        let out = self.killswitch(&["status", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["scopes"][0]["tunnels"].as_array().unwrap().len()
    }

    /// How many times the daemon has logged `text` so far.
    fn logged(&self, text: &str) -> usize {
        std::fs::read_to_string(self.dir.join("daemon.log"))
            .unwrap_or_default()
            .matches(text)
            .count()
    }

    fn reaches(&self, kind: &str, target: &str, timeout_ms: &str) -> bool {
        output_in(
            &self.net.client,
            Some(&self.cgroup),
            PROBE,
            &[kind, target, timeout_ms],
        )
        .status
        .success()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains(" drop ")).collect();
            eprintln!("daemon log without drop events:\n{}", tail.join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Signals the daemon itself: `timeout`, its parent, relays only the first signal it gets.
fn signal(daemon: &Background, signal: nix::sys::signal::Signal) {
    let children = format!("/proc/{0}/task/{0}/children", daemon.pid());
    let pid: i32 = std::fs::read_to_string(children)
        .unwrap()
        .split_whitespace()
        .next()
        .expect("the daemon runs under timeout")
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

const TUNNEL_CONFIG: &str = "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.1\"\nport = 123\nprotocol = \"udp\"\n";

/// A packet counter on the router side of the client's uplink for everything addressed to
/// OTHER: traffic that should only ever go through the tunnel.
fn uplink_oracle(net: &TestNet) -> impl Fn() -> u64 + '_ {
    let nft = |script: &str| {
        testbed::run(
            "nsenter",
            &[
                &format!("--net={}", net.internet.path().display()),
                "nft",
                script,
            ],
        )
    };
    nft("add table inet oracle");
    nft("add chain inet oracle in { type filter hook prerouting priority -300; }");
    nft(&format!(
        "add rule inet oracle in iifname \"up0\" ip daddr {OTHER_V4} counter"
    ));
    move || {
        let out = nft("list chain inet oracle in");
        out.split("packets ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next()?.parse().ok())
            .expect("the oracle's counter")
    }
}

#[test]
fn the_daemon_follows_tunnel_churn_without_leaking() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    let leaked = uplink_oracle(&s.net);
    let daemon = s.daemon();
    s.route_other_through_tunnel();
    let target = format!("{OTHER_V4}:8080");
    assert!(
        s.reaches("udp", &target, "1000"),
        "traffic through the first tunnel"
    );
    // A flood for the whole churn: whenever the tunnel is gone it falls back to the uplink.
    let flood = s.flood(&target, "19000");
    let mut slowest = Duration::ZERO;
    for round in 0..50 {
        s.net.remove_tunnel();
        std::thread::sleep(Duration::from_millis(20));
        s.net.add_tunnel();
        s.route_other_through_tunnel();
        let started = Instant::now();
        let works = wait_until(Duration::from_secs(1), || s.reaches("udp", &target, "100"));
        assert!(
            works,
            "round {round}: the new tunnel did not carry traffic within 1 s"
        );
        slowest = slowest.max(started.elapsed());
    }
    drop(flood);
    eprintln!("50 tunnel re-creations; slowest until traffic flowed: {slowest:?}");
    assert_eq!(
        leaked(),
        0,
        "packets for OTHER reached the router through the uplink"
    );
    assert!(s.enforced());
    assert_eq!(
        s.logged("reading it again"),
        0,
        "the daemon took the policy it applied itself for another"
    );
    drop(daemon);
}

#[test]
fn a_renamed_tunnel_and_a_reused_ifindex_are_not_trusted() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    let daemon = s.daemon();
    let client = &s.net.client;
    let route = |dev: &str| {
        client.ip(&[
            "route",
            "replace",
            &format!("{OTHER_V4}/32"),
            "via",
            TUNNEL_PEER_V4,
            "dev",
            dev,
        ])
    };
    let target = format!("{OTHER_V4}:8080");
    route("tun0");
    assert!(s.reaches("udp", &target, "1000"), "through tun0");

    // Renamed away from the `tunnels` pattern: no longer a tunnel.
    let rename = |from: &str, to: &str| {
        client.ip(&["link", "set", from, "down"]);
        client.ip(&["link", "set", from, "name", to]);
        client.ip(&["link", "set", to, "up"]);
        route(to);
    };
    rename("tun0", "wan9");
    assert!(
        wait_until(Duration::from_secs(1), || !s.reaches("udp", &target, "100")),
        "the renamed interface is still trusted"
    );
    rename("wan9", "tun0");
    assert!(
        wait_until(Duration::from_secs(1), || s.reaches("udp", &target, "100")),
        "renamed back, it is a tunnel again"
    );

    // Deleted, then its ifindex taken by an interface that is not a tunnel.
    let index = tunnel_ifindex(&s);
    client.ip(&["link", "del", "tun0"]);
    client.ip(&[
        "link",
        "add",
        "wan9",
        "index",
        &index,
        "type",
        "veth",
        "peer",
        "name",
        "wan9p",
        "netns",
        &s.net.internet.name,
    ]);
    client.ip(&["addr", "add", "198.18.0.2/24", "dev", "wan9"]);
    client.ip(&["link", "set", "wan9", "up"]);
    s.net.internet.ip(&[
        "addr",
        "add",
        &format!("{TUNNEL_PEER_V4}/24"),
        "dev",
        "wan9p",
    ]);
    s.net.internet.ip(&["link", "set", "wan9p", "up"]);
    route("wan9");
    std::thread::sleep(Duration::from_millis(300));
    let before = s.echo.received();
    assert!(
        !s.reaches("udp", &target, "500"),
        "an interface reusing the tunnel's ifindex {index} is trusted"
    );
    assert_eq!(s.echo.received(), before);
    drop(daemon);
}

/// tun0's ifindex in the client namespace.
fn tunnel_ifindex(s: &Setup) -> String {
    s.net
        .client
        .ip(&["-o", "link", "show", "tun0"])
        .split(':')
        .next()
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn sigterm_and_sigkill_leave_the_scope_enforced() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    s.net.remove_tunnel();
    let target = format!("{OTHER_V4}:8080");
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let daemon = s.daemon();
        signal(&daemon, sig);
        assert!(wait_until(Duration::from_secs(5), || {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.pid() as i32), None).is_err()
                || std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid()))
                    .is_ok_and(|s| s.contains(") Z "))
        }));
        drop(daemon);
        assert!(s.enforced(), "{sig:?}: the scope is no longer enforced");
        assert!(!s.reaches("tcp", &target, "500"), "{sig:?}: traffic leaks");
        assert!(
            s.reaches("udp", &format!("{SERVER_V4}:123"), "1000"),
            "{sig:?}: the server"
        );
    }
    assert_eq!(s.echo.received(), 2, "only the server probes arrived");
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid() {
    require_root!();
    sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid_with(None);
}

/// [`sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid`] with the nftables backend.
#[test]
fn with_nftables_sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid() {
    require_root!();
    sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid_with(Some("nftables"));
}

fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid_with(
    backend: Option<&'static str>,
) {
    let s = Setup::with_backend(TUNNEL_CONFIG, backend);
    s.net.remove_tunnel();
    let daemon = s.daemon();
    let ntp = format!("{SERVER_V4}:123");
    let other_port = format!("{SERVER_V4}:124");
    assert!(s.reaches("udp", &ntp, "1000"));
    assert!(!s.reaches("udp", &other_port, "300"));

    s.write_config("tunnels = [\"tun0\"]\nthis is not toml\n");
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.enforced());
    assert!(
        s.reaches("udp", &ntp, "1000"),
        "an invalid reload must keep the old policy"
    );
    assert!(!s.reaches("udp", &other_port, "300"));

    s.write_config(
        "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.1\"\nport = 124\nprotocol = \"udp\"\n",
    );
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || s.reaches(
            "udp",
            &other_port,
            "200"
        )),
        "a valid reload applies the new server"
    );
    assert!(!s.reaches("udp", &ntp, "300"), "the old server is gone");
    drop(daemon);
}

#[test]
fn a_daemon_started_with_a_bad_config_holds_lockdown_until_a_valid_reload() {
    require_root!();
    let s = Setup::new("tunnels = [\"tun0\"]\nbogus = 1\n");
    s.net.remove_tunnel();
    let daemon = s.daemon();
    let ntp = format!("{SERVER_V4}:123");
    assert!(!s.reaches("udp", &ntp, "300"), "lockdown lets nothing out");
    let status = |s: &Setup| -> serde_json::Value {
        serde_json::from_slice(&s.killswitch(&["status", "--json"]).stdout).unwrap()
    };
    assert_eq!(status(&s)["scopes"][0]["mode"], "lockdown");
    assert!(s.logged("waiting for SIGHUP") >= 1);

    s.write_config(TUNNEL_CONFIG);
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || s.reaches("udp", &ntp, "200")),
        "a valid reload starts the daemon with the real policy"
    );
    assert_eq!(status(&s)["scopes"][0]["mode"], "policy");
    drop(daemon);
}

/// Enough reloads that a policy swap with a gap (clear, then fill) is caught every time.
const RELOADS: usize = 100;

#[test]
fn reloads_under_traffic_neither_leak_nor_drop_a_kept_server() {
    require_root!();
    let both = "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.1\"\nport = 123\nprotocol = \"udp\"\n[[server]]\naddress = \"198.51.100.1\"\nport = 124\nprotocol = \"udp\"\n";
    // A provider-sized list, so that a swap with a gap (clear, then fill) would be a wide one.
    let kept_only = (1..=200).fold(
        "tunnels = [\"tun0\"]\n[[server]]\naddress = \"198.51.100.1\"\nport = 124\nprotocol = \"udp\"\n[ntp]\nservers = [\"198.18.0.2\"]\n".to_owned(),
        |config, n| config + &format!("[[server]]\naddress = \"198.18.1.{n}\"\n"),
    );
    let s = Setup::new(both);
    let leaked = uplink_oracle(&s.net);
    s.net.remove_tunnel();
    let daemon = s.daemon();
    // Never allowed (no tunnel): the oracle on the router side must not see one of these.
    let blocked = s.flood(&format!("{OTHER_V4}:8080"), "8000");
    // Allowed by both configs: the kernel must not refuse one of these.
    let kept = s.flood(&format!("{SERVER_V4}:124"), "8000");
    let started = Instant::now();
    for round in 0..RELOADS {
        s.write_config(if round % 2 == 0 { &kept_only } else { both });
        signal(&daemon, nix::sys::signal::Signal::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(5), || s.logged("reload applied")
                > round),
            "reload {round} was not applied"
        );
    }
    let reloading = started.elapsed();
    assert!(
        reloading < Duration::from_secs(7),
        "the reloads outlasted the floods: {reloading:?}"
    );
    let (kept_sent, kept_refused) = Setup::flood_result(&kept);
    let (blocked_sent, _) = Setup::flood_result(&blocked);
    eprintln!(
        "{RELOADS} reloads in {reloading:?}: kept server {kept_sent} sent, {kept_refused} refused; blocked flood {blocked_sent} sent"
    );
    assert!(kept_sent > 1000 && blocked_sent > 1000, "the floods ran");
    assert_eq!(kept_refused, 0, "a server in both configs lost packets");
    assert_eq!(
        leaked(),
        0,
        "packets for OTHER left the uplink during a reload"
    );
    // The last config was `both`; one more reload to `kept_only` removes port 123.
    s.write_config(&kept_only);
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || s
        .logged("reload applied")
        > RELOADS));
    assert!(!s.reaches("udp", &format!("{SERVER_V4}:123"), "300"));
    drop(daemon);
}

#[test]
fn a_server_kept_across_a_thousand_changes_never_drops_a_packet() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    s.net.remove_tunnel();
    let kept = format!("{SERVER_V4}:124/udp");
    let out = s.killswitch(&["up"]);
    assert!(out.status.success());
    let out = s.killswitch(&["servers", "set", &kept]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flood = s.flood(&format!("{SERVER_V4}:124"), "60000");
    for i in 0..1000u32 {
        let other = format!("198.18.{}.{}:1194/udp", 1 + i / 250, 1 + i % 250);
        let out = s.killswitch(&["servers", "set", &kept, &other]);
        assert!(
            out.status.success(),
            "change {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(flood);
    let status: serde_json::Value =
        serde_json::from_slice(&s.killswitch(&["status", "--json"]).stdout).unwrap();
    let dropped: u64 = status["scopes"][0]["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "drop" && c["direction"] == "egress")
        .map(|c| c["packets"].as_u64().unwrap())
        .sum();
    let sent = s.echo.received();
    eprintln!(
        "1000 server-list changes; {sent} datagrams reached the kept server, {dropped} dropped"
    );
    assert!(sent > 100, "the flood ran during the changes");
    assert_eq!(dropped, 0, "a kept server lost packets during a change");

    let out = s.killswitch(&["servers", "set", "198.18.9.9:1194/udp"]);
    assert!(out.status.success());
    assert!(
        !s.reaches("udp", &format!("{SERVER_V4}:124"), "300"),
        "a removed server is refused once the command returns"
    );
    let list = s.killswitch(&["servers", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "198.18.9.9:1194/udp\n"
    );
}

#[test]
fn racing_ups_and_server_changes_end_in_a_consistent_scope() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    let daemon = s.daemon();
    let children: Vec<_> = [
        s.args(&["up"]),
        s.args(&["up"]),
        s.args(&["servers", "set", "198.18.7.7:1194/udp"]),
    ]
    .iter()
    .map(|args| {
        killswitch_command(&s.net.client, &s.pins, args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    })
    .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert!(s.enforced(), "both programs attached to the scope");
    let list = String::from_utf8(s.killswitch(&["servers", "list"]).stdout).unwrap();
    assert!(
        list == "198.51.100.1:123/udp\n" || list == "198.18.7.7:1194/udp\n",
        "the server list is one writer's, not a mix: {list:?}"
    );
    drop(daemon);
}

/// The programs look up only the kinds of server key the list holds (`Settings::lists`): each
/// kind the `servers` command writes is reachable once it returns, and gone once removed.
#[test]
fn servers_of_every_kind_are_reachable_once_the_command_returns() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    s.net.remove_tunnel();
    assert!(s.killswitch(&["up"]).status.success());
    let target = format!("{SERVER_V4}:124");
    assert!(!s.reaches("udp", &target, "300"), "not a server yet");
    for endpoint in [
        format!("{SERVER_V4}:124/udp"),
        format!("{SERVER_V4}:124"),
        format!("{SERVER_V4}/udp"),
        SERVER_V4.to_string(),
    ] {
        let out = s.killswitch(&["servers", "add", &endpoint]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(s.reaches("udp", &target, "1000"), "added {endpoint}");
        let out = s.killswitch(&["servers", "remove", &endpoint]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!s.reaches("udp", &target, "300"), "removed {endpoint}");
        let out = s.killswitch(&["servers", "set", &endpoint]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(s.reaches("udp", &target, "1000"), "set {endpoint}");
        let out = s.killswitch(&["servers", "set", "198.18.9.9:1194/tcp"]);
        assert!(out.status.success());
        assert!(!s.reaches("udp", &target, "300"), "replaced {endpoint}");
    }
}

#[test]
fn one_scope_held_locked_does_not_hold_up_another() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    assert!(s.killswitch(&["up"]).status.success());
    let pin_dir = std::fs::read_dir(&s.pins.path)
        .unwrap()
        .next()
        .expect("the scope's pin directory")
        .unwrap()
        .path();
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(&pin_dir).unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .unwrap();
    let mut waiting = Background::start(killswitch_command(
        &s.net.client,
        &s.pins,
        &s.args(&["servers", "add", "198.18.7.7"]),
    ));
    let other = Cgroup::new();
    let config = s.config.to_str().unwrap();
    let other_up = killswitch(
        &s.net.client,
        &s.pins,
        &["--config", config, "up", "--cgroup", &other.relative],
    );
    assert!(
        other_up.status.success(),
        "another scope comes up while this one is locked: {}",
        String::from_utf8_lossy(&other_up.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.exited().is_none(),
        "`servers add` waits for its scope's lock"
    );
    drop(held);
    let mut status = None;
    assert!(wait_until(Duration::from_secs(10), || {
        status = waiting.exited();
        status.is_some()
    }));
    assert!(status.unwrap().success());
    let list = String::from_utf8(s.killswitch(&["servers", "list"]).stdout).unwrap();
    assert!(list.contains("198.18.7.7\n"), "{list:?}");
}

/// A VPN server by name, port 124/udp; the test DNS server answers for it.
const NAMED_SERVER: &str = "tunnels = [\"tun0\"]\n[[server]]\naddress = \"vpn.example.test\"\nport = 124\nprotocol = \"udp\"\n";
const RESOLV_CONF: &str = "nameserver 203.0.113.9\noptions timeout:1 attempts:1\n";

/// [`NAMED_SERVER`] with the test DNS server reachable outside the tunnel.
fn named_server_behind_dns_exception() -> String {
    format!("{NAMED_SERVER}[dns]\nservers = [\"{OTHER_V4}\"]\n")
}

/// Skips what the DNS server printed so far; then waits (bounded) for its next query.
fn next_query(dns: &Background, limit: Duration) -> bool {
    while dns.line(Duration::ZERO).is_some() {}
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(line) = dns.line(Duration::from_millis(200)) {
            if line.starts_with("query vpn.example.test") {
                return true;
            }
        }
    }
    false
}

#[test]
fn a_hostname_follows_its_ttl_through_a_dns_exception_and_survives_a_failing_resolver() {
    require_root!();
    a_hostname_follows_its_ttl_through_a_dns_exception_and_survives_a_failing_resolver_with(None);
}

/// [`a_hostname_follows_its_ttl_through_a_dns_exception_and_survives_a_failing_resolver`] with the nftables backend.
#[test]
fn with_nftables_a_hostname_follows_its_ttl_and_survives_a_failing_resolver() {
    require_root!();
    a_hostname_follows_its_ttl_through_a_dns_exception_and_survives_a_failing_resolver_with(Some(
        "nftables",
    ));
}

fn a_hostname_follows_its_ttl_through_a_dns_exception_and_survives_a_failing_resolver_with(
    backend: Option<&'static str>,
) {
    let s = Setup::with_backend(&named_server_behind_dns_exception(), backend);
    let (zone, dns, daemon) = s.resolving_without_tunnel();
    assert!(s.reaches("udp", &format!("{SERVER_V4}:124"), "1000"));

    // The record changes. Its TTL (1 s, held to the 10 s minimum) brings the new address long
    // before a fixed period of a minute would.
    std::fs::write(&zone, "vpn.example.test 1 198.18.5.5\n").unwrap();
    let changed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(25), || s.servers()
            == "198.18.5.5:124/udp\n"),
        "the new address did not arrive: {}",
        s.servers()
    );
    eprintln!(
        "new address in the map {:?} after the record changed",
        changed.elapsed()
    );
    assert!(
        !s.reaches("udp", &format!("{SERVER_V4}:124"), "300"),
        "the stale address is refused"
    );

    // The resolver breaks (SERVFAIL): the last known address stays.
    std::fs::remove_file(&zone).unwrap();
    assert!(next_query(&dns, Duration::from_secs(25)), "no retry");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.servers(), "198.18.5.5:124/udp\n");
    assert_eq!(s.logged("keeping its 1 last known addresses"), 1);
    drop(daemon);
}

#[test]
fn a_hostname_resolves_through_the_tunnel_and_dns_never_leaves_in_the_clear() {
    require_root!();
    let s = Setup::new(NAMED_SERVER);
    let leaked = uplink_oracle(&s.net);
    s.route_other_through_tunnel();
    let (zone, dns, daemon) = s.dns_and_daemon();
    assert_eq!(
        s.servers(),
        "198.51.100.1:124/udp\n",
        "resolved through the tunnel"
    );

    // The tunnel goes: the resolver's route now leads to the uplink, where DNS is not allowed.
    std::fs::write(&zone, "vpn.example.test 1 198.18.5.5\n").unwrap();
    s.net.remove_tunnel();
    while dns.line(Duration::ZERO).is_some() {}
    assert!(
        wait_until(Duration::from_secs(25), || s
            .logged("keeping its 1 last known addresses")
            == 1),
        "the daemon did not try again"
    );
    assert_eq!(s.servers(), "198.51.100.1:124/udp\n", "kept");
    assert_eq!(leaked(), 0, "DNS left through the uplink");
    assert!(
        dns.line(Duration::ZERO).is_none(),
        "the resolver heard from the client without a tunnel"
    );
    drop(daemon);
}

#[test]
fn up_enforces_even_when_a_hostname_does_not_resolve() {
    require_root!();
    // At boot the network may not be up: `up` must enforce anyway, and say that a server is missing.
    let s = Setup::new(NAMED_SERVER);
    let resolv = s.resolv_conf();
    let out = killswitch_in_cgroup(&s.net.client, &s.pins, &s.cgroup, &resolv, &s.args(&["up"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot resolve server vpn.example.test"),
        "{stderr}"
    );
    assert!(s.enforced(), "the policy is in force");
    assert_eq!(s.servers(), "", "no address for the name");
    s.net.remove_tunnel();
    assert!(!s.reaches("udp", &format!("{OTHER_V4}:8080"), "300"));
}

/// Issue 11 item 7: a VPN client that must reconnect while DNS is down still can. A name that
/// fails at the next `up` or daemon start keeps the addresses the scope holds for it; a name
/// taken out of the config does not.
#[test]
fn a_failing_name_keeps_the_scopes_addresses_across_up_and_daemon_restarts() {
    require_root!();
    let s = Setup::new(&named_server_behind_dns_exception());
    s.net.remove_tunnel();
    let zone = s.dir.join("zone");
    std::fs::write(&zone, "vpn.example.test 300 198.51.100.1\n").unwrap();
    let _dns = s.dns_server(&zone);
    let resolv = s.resolv_conf();
    let up = || {
        killswitch_in_cgroup(&s.net.client, &s.pins, &s.cgroup, &resolv, &s.args(&["up"]))
            .output()
            .unwrap()
    };
    assert!(up().status.success());
    assert_eq!(s.servers(), "198.51.100.1:124/udp\n", "resolved");

    // The resolver breaks (SERVFAIL for every name).
    std::fs::remove_file(&zone).unwrap();
    let again = up();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("keeping the 1 addresses"), "{stderr}");
    assert_eq!(s.servers(), "198.51.100.1:124/udp\n", "kept by `up`");
    assert!(s.reaches("udp", &format!("{SERVER_V4}:124"), "1000"));

    let daemon = s.daemon_in_scope(&resolv);
    assert!(
        wait_until(Duration::from_secs(20), || s.logged("daemon started") == 1),
        "the daemon did not start"
    );
    assert_eq!(s.logged("keeping the 1 addresses"), 1);
    assert_eq!(s.servers(), "198.51.100.1:124/udp\n", "kept by the daemon");
    drop(daemon);

    // Out of the config, the name's addresses go.
    s.write_config("tunnels = [\"tun0\"]\n");
    assert!(up().status.success());
    assert_eq!(s.servers(), "");
    assert!(!s.reaches("udp", &format!("{SERVER_V4}:124"), "300"));
}

/// Issue 11 item 18: `up` and the daemon list the interfaces under the scope's lock, so neither
/// can write a tunnel list older than the other's. In each of 40 rounds tun0 goes away at a
/// different moment of a running `up`; the scope must end trusting no tunnel, and the new tun0
/// once it is back: never the ifindex of a tunnel that is gone.
#[test]
fn racing_ups_and_tunnel_churn_end_with_only_the_tunnel_that_exists() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    let daemon = s.daemon();
    let tunnels = || -> Vec<u64> {
        let out = s.killswitch(&["status", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["scopes"][0]["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["ifindex"].as_u64().unwrap())
            .collect()
    };
    for round in 0..40u64 {
        let mut up = killswitch_command(&s.net.client, &s.pins, &s.args(&["up"]))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(round % 20 * 3));
        s.net.remove_tunnel();
        up.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(3), || tunnels().is_empty()),
            "round {round}: a tunnel that is gone is still trusted: {:?}",
            tunnels()
        );
        s.net.add_tunnel();
        let now: u64 = tunnel_ifindex(&s).parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(3), || tunnels() == [now]),
            "round {round}: the tunnel that exists is not the one trusted: {:?} (tun0 is {now})",
            tunnels()
        );
    }
    drop(daemon);
}

/// The server list in force has one owner at a time: `servers set` takes it over, and then the
/// daemon's lookups change nothing; a reload gives it back to the config and says so.
#[test]
fn a_list_set_with_servers_is_kept_from_the_resolver_until_a_reload() {
    require_root!();
    a_list_set_with_servers_is_kept_from_the_resolver_until_a_reload_with(None);
}

/// [`a_list_set_with_servers_is_kept_from_the_resolver_until_a_reload`] with the nftables backend.
#[test]
fn with_nftables_a_list_set_with_servers_is_kept_from_the_resolver_until_a_reload() {
    require_root!();
    a_list_set_with_servers_is_kept_from_the_resolver_until_a_reload_with(Some("nftables"));
}

fn a_list_set_with_servers_is_kept_from_the_resolver_until_a_reload_with(
    backend: Option<&'static str>,
) {
    let s = Setup::with_backend(&named_server_behind_dns_exception(), backend);
    let (zone, dns, daemon) = s.resolving_without_tunnel();
    assert!(s
        .killswitch(&["servers", "set", "198.18.7.7:1194/udp"])
        .status
        .success());

    // The record changes: the daemon learns it, and leaves the command's list alone.
    std::fs::write(&zone, "vpn.example.test 1 198.18.5.5\n").unwrap();
    assert!(next_query(&dns, Duration::from_secs(25)), "no lookup");
    assert!(
        wait_until(Duration::from_secs(5), || s
            .logged("it stays until a reload")
            == 1),
        "the daemon did not say it left the list alone"
    );
    assert_eq!(s.servers(), "198.18.7.7:1194/udp\n", "the command's list");
    let set_by_command = || {
        let out = s.killswitch(&["status", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["scopes"][0]["servers_set_by_command"].as_bool()
    };
    assert_eq!(set_by_command(), Some(true));

    // A reload installs the config's list, with the name's new address, and says so.
    signal(&daemon, nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || s.servers()
            == "198.18.5.5:124/udp\n"),
        "the reload did not install the config's list: {}",
        s.servers()
    );
    assert_eq!(
        s.logged("the config's servers replace the list set with"),
        1
    );
    drop(daemon);
}

/// `up` with an edited config while the daemon runs: the daemon must not put back, at its next
/// link event, a tunnel only the older config trusted. It sees the file changed and reads it
/// again before it writes anything.
#[test]
fn the_daemon_follows_a_config_that_up_applied_instead_of_writing_its_older_one() {
    require_root!();
    let s = Setup::new(TUNNEL_CONFIG);
    let daemon = s.daemon();
    let tunnels = || s.tunnels_held();
    assert_eq!(tunnels(), 1, "tun0 trusted at start");
    s.write_config(&TUNNEL_CONFIG.replace("\"tun0\"", "\"tun9\""));
    assert!(s.killswitch(&["up"]).status.success());
    assert_eq!(tunnels(), 0, "up applied the new config");

    // A link event: tun0 comes back with a new ifindex.
    s.net.remove_tunnel();
    s.net.add_tunnel();
    assert!(
        wait_until(Duration::from_secs(5), || s
            .logged("changed since it was read")
            == 1),
        "the daemon did not notice the config changed"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tunnels(),
        0,
        "the daemon put back a tunnel only the old config trusted"
    );
    drop(daemon);
}

/// `up` applied an edited config, and the file got a typo before the daemon read it: the
/// daemon refuses the file, and must not write under its older policy at a later event either
/// (it would trust a tunnel only that policy names). eBPF records the policy in force in a map
/// and its event is a link event; nftables records it in the state directory, and its event
/// is the table removed behind its back (a `flush ruleset`), which it puts back.
#[test]
fn a_typo_after_up_never_lets_the_daemon_write_its_older_policy() {
    a_typo_after_up_never_lets_the_daemon_write_its_older_policy_with(None);
}

#[test]
fn with_nftables_a_typo_after_up_never_lets_the_daemon_write_its_older_policy() {
    a_typo_after_up_never_lets_the_daemon_write_its_older_policy_with(Some("nftables"));
}

fn a_typo_after_up_never_lets_the_daemon_write_its_older_policy_with(
    backend: Option<&'static str>,
) {
    require_root!();
    let s = Setup::with_backend(TUNNEL_CONFIG, backend);
    let daemon = s.daemon();
    let target = format!("{OTHER_V4}:8080");
    let through_tunnel = || {
        s.route_other_through_tunnel();
        s.reaches("udp", &target, "300")
    };
    let event = || match backend {
        // tun0 comes back with a new ifindex.
        None => {
            s.net.remove_tunnel();
            s.net.add_tunnel();
        }
        Some(_) => {
            let flushed = output_in(&s.net.client, None, "nft", &["flush", "ruleset"]);
            assert!(flushed.status.success());
        }
    };
    assert!(through_tunnel(), "tun0 carries traffic at start");
    let applied = TUNNEL_CONFIG.replace("\"tun0\"", "\"tun9\"");
    s.write_config(&applied);
    let mut up = s.args(&["up"]);
    up.extend(backend.map(|b| ["--backend", b]).iter().flatten());
    assert!(killswitch(&s.net.client, &s.pins, &up).status.success());
    assert!(
        !through_tunnel(),
        "up applied the config that does not trust tun0"
    );
    s.write_config(&format!("{applied}\nthis is not toml"));
    assert_eq!(
        s.logged("reload applied"),
        0,
        "the daemon read the applied file before the typo: nothing left to test"
    );

    for event_number in 1..=2 {
        let refused = s.logged("reload refused");
        let held = s.logged("held in lockdown");
        event();
        // The first event reads the file and refuses it; the second finds nothing new to read.
        if event_number == 1 {
            assert!(
                wait_until(Duration::from_secs(5), || s.logged("reload refused")
                    > refused),
                "the daemon did not read the file again"
            );
        }
        // A flushed table leaves the scope open until the daemon notices (within a second).
        if backend.is_some() {
            assert!(
                wait_until(Duration::from_secs(5), || s.logged("held in lockdown") > held),
                "event {event_number}: the scope was not put back in lockdown (its own older policy instead?)"
            );
        }
        assert!(
            !wait_until(Duration::from_secs(2), through_tunnel),
            "event {event_number}: the daemon wrote the policy it read before `up` applied another"
        );
    }
    assert_eq!(
        s.logged("reload refused"),
        1,
        "a refused file was read again though neither it nor the policy in force changed"
    );
    // Fixed, the file is applied at the next event.
    s.write_config(TUNNEL_CONFIG);
    event();
    assert!(
        wait_until(Duration::from_secs(5), through_tunnel),
        "the fixed config was not applied"
    );
    drop(daemon);
}
