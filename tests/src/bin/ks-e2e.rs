//! `ks-e2e`, run by `cargo xtask e2e` (and `cargo xtask test`): the kill switch against real
//! OpenVPN in a bed of namespaces, scenario after scenario, with both backends. The oracle is a
//! capture on the router's side of the client's cable: whatever the client's own firewall
//! claims, a packet it sends in the clear is seen there. Each scenario prints what it sent,
//! what the oracle saw and `LEAKED=N`; a control run with the kill switch down must leak.
//!
//! ```text
//!  client c0 192.168.77.2 2001:db8:77::2 ── rc router (192.168.77.1: LAN peer, DNS) ── vpn 198.51.100.1 (OpenVPN, NAT)
//!   tun0 (OpenVPN, v4 + v6)                                                        ── web 203.0.113.80 2001:db8:203::80
//!                                                                                     NTP 203.0.113.123, DNS 203.0.113.53
//! ```
//!
//! The system-wide scope is a child cgroup standing in for the root (the machine's root is never
//! touched); the traffic generators run inside it, and so does OpenVPN, in a child cgroup as
//! `openvpn.service` is under the root. Exit status 0 when every scenario held.
//! `ks-e2e NAME` runs only the scenarios whose short name contains NAME (see [`SCENARIOS`]).

use std::{
    path::PathBuf,
    process::{ExitCode, Output},
    time::{Duration, Instant},
};

use testbed::{
    capture::Capture,
    echo::EchoServer,
    lab::{
        Lab, CLIENT_V4, CLIENT_V6, DNS_HOST, NTP_HOST, ROUTER_V4, VPN_PORT, VPN_SERVER, WEB_HOST,
        WEB_HOST_V6,
    },
    process::{command_in, killswitch_bin, killswitch_command, output_in, Background},
    story::probe_bin,
    Cgroup, PinRoot,
};

const APP_PORT: u16 = 80;
const OTHER_PORT: u16 = 81;
const LAN_PORT: u16 = 8080;
/// The local port of an app that sends to the VPN server's address itself.
const IMPOSTOR_PORT: &str = "40404";
const CHURNS: usize = 50;

/// Everything the client may send on its cable whatever the scenario: the tunnel's own packets
/// (and the kernel's ICMP errors to the server about them), ARP, and link-scope IPv6 (neighbour
/// discovery, multicast listener reports behind a hop-by-hop header), which no router forwards.
const ALWAYS: &str = "arp or (dst host 198.51.100.1 and (udp port 1194 or icmp)) \
                      or (ip6 and (src net fe80::/10 or dst net ff02::/16))";

fn config(extra: &str) -> String {
    format!(
        "tunnels = [\"tun0\"]\n\n[[server]]\naddress = \"{VPN_SERVER}\"\nport = {VPN_PORT}\nprotocol = \"udp\"\n\n\
         [lan]\nnetworks = [\"192.168.77.0/24\"]\n\n[ntp]\nservers = [\"{NTP_HOST}\"]\n{extra}"
    )
}

struct Bed {
    lab: Lab,
    backend: &'static str,
    /// Where OpenVPN runs: inside the scope, as `openvpn.service` is under the machine's root;
    /// the `[vpn_client]` scenario names it. Declared first so it is removed before the scope.
    vpn_cgroup: Cgroup,
    scope: Cgroup,
    pins: PinRoot,
    config: PathBuf,
    daemon: Option<Background>,
    _lan_peer: EchoServer,
}

/// One scenario's line of the table.
struct Row {
    scenario: &'static str,
    backend: &'static str,
    sent: String,
    seen: String,
    /// What the oracle caught that the scenario does not allow, one line per packet.
    leaked: Vec<String>,
    /// The control run must leak; every other scenario must not, and must see what it expects.
    held: bool,
}

impl Bed {
    fn new(backend: &'static str) -> Bed {
        let lab = Lab::dual_stack(&[APP_PORT, OTHER_PORT, 123, 53]);
        let lan_peer = EchoServer::start(
            &lab.router,
            &[format!("{ROUTER_V4}:{LAN_PORT}").parse().unwrap()],
        );
        let config = lab.dir().join("killswitch.toml");
        testbed::write_config(&config, &self::config(""));
        let scope = Cgroup::new();
        Bed {
            lab,
            backend,
            vpn_cgroup: scope.child("openvpn.service"),
            scope,
            pins: PinRoot::new(),
            config,
            daemon: None,
            _lan_peer: lan_peer,
        }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cgroup", &self.scope.relative]);
        all
    }

    fn ks(&self, args: &[&str]) -> Output {
        killswitch_command(&self.lab.client, &self.pins, &self.args(args))
            .output()
            .expect("killswitch runs")
    }

    fn up(&self) -> Output {
        self.ks(&["up", "--backend", self.backend])
    }

    fn enforced(&self) -> bool {
        self.ks(&["status"]).status.success()
    }

    /// Starts `killswitch daemon` and waits (bounded) until the scope is enforced.
    fn start_daemon(&mut self) {
        // Not `killswitch_command`: that one is killed after 20 s.
        let mut command = std::process::Command::new("nsenter");
        command
            .arg(format!("--net={}", self.lab.client.path().display()))
            .args(["--", "timeout", "600"])
            .arg(killswitch_bin())
            .args(self.args(&["daemon", "--backend", self.backend]))
            .env("KILLSWITCH_PIN_ROOT", &self.pins.path)
            .env("KILLSWITCH_STATE_DIR", &self.pins.state)
            .env_remove("KILLSWITCH_LOG");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.dir().join("daemon.log"))
            .unwrap();
        command.stderr(log);
        self.daemon = Some(Background::start(command));
        let started = Instant::now();
        while !self.enforced() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the daemon (its process group).
    fn kill_daemon(&mut self) {
        self.daemon = None;
    }

    /// SIGHUP to the daemon (`timeout`'s child, in the process group the bed started).
    fn reload(&self) {
        if let Some(daemon) = &self.daemon {
            let _ = std::process::Command::new("pkill")
                .args(["-HUP", "-x", "killswitch", "-g"])
                .arg(daemon.pid().to_string())
                .status();
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The scope's egress drops so far, from `status --json` (every reason).
    fn egress_drops(&self) -> Option<u64> {
        let out = self.ks(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let counters = status["scopes"][0]["counters"].as_array()?;
        Some(
            counters
                .iter()
                .filter(|c| c["verdict"] == "drop" && c["direction"] == "egress")
                .filter_map(|c| c["packets"].as_u64())
                .sum(),
        )
    }

    /// A TCP request from inside the scope.
    fn request(&self, host: &str, port: u16) -> bool {
        let target = target(host, port);
        output_in(
            &self.lab.client,
            Some(&self.scope),
            &probe_bin(),
            &["tcp", &target, "1000"],
        )
        .status
        .success()
    }

    /// Waits (bounded) until a request through the tunnel works again.
    fn tunnel_works(&self) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if self.request(WEB_HOST, APP_PORT) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// One UDP datagram a millisecond to `host:port` from inside the scope, for `millis`.
    fn flood(&self, host: &str, port: u16, millis: u64) -> Background {
        Background::start(command_in(
            &self.lab.client,
            Some(&self.scope),
            &probe_bin(),
            &["flood", &target(host, port), &millis.to_string()],
        ))
    }

    /// Packets the oracle saw that neither [`ALWAYS`] nor `allowed` (a tcpdump filter) covers.
    fn leaks(&mut self, allowed: &str) -> Vec<String> {
        let filter = if allowed.is_empty() {
            format!("not ({ALWAYS})")
        } else {
            format!("not ({ALWAYS}) and not ({allowed})")
        };
        self.lab.stop_capture(&filter)
    }

    fn reconnect(&mut self) {
        self.lab.reap_vpn_client();
        self.connect();
    }

    /// Starts OpenVPN in its cgroup inside the scope and waits until the tunnel carries traffic.
    fn connect(&mut self) {
        self.connect_with("client.conf");
    }

    fn connect_with(&mut self, config: &str) {
        self.lab.connect_with(config, Some(&self.vpn_cgroup));
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.daemon = None;
        let _ = self.ks(&["down"]);
    }
}

fn target(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// "N sent, M refused" from a finished flood.
fn flooded(flood: &Background) -> String {
    match flood.line(Duration::from_secs(15)) {
        Some(line) => {
            let mut numbers = line.split_whitespace();
            format!(
                "{} datagrams, {} refused",
                numbers.next().unwrap_or("?"),
                numbers.next().unwrap_or("?")
            )
        }
        None => "flood did not report".into(),
    }
}

/// Whether a flood's report says it sent something.
/// The (sent, refused) pairs of the floods in a report ("N datagrams, M refused ...").
fn floods(report: &str) -> Vec<(u64, u64)> {
    let words: Vec<&str> = report.split_whitespace().collect();
    words
        .windows(4)
        .filter(|w| w[1].starts_with("datagrams"))
        .filter_map(|w| Some((w[0].parse().ok()?, w[2].parse().ok()?)))
        .collect()
}

/// Every flood sent, and the kill switch refused some of it (the tunnel went away meanwhile).
fn refused_some(report: &str) -> bool {
    let floods = floods(report);
    !floods.is_empty()
        && floods
            .iter()
            .all(|&(sent, refused)| sent > 0 && refused > 0)
}

/// Every flood sent, and the kill switch refused all of it.
fn refused_all(report: &str) -> bool {
    let floods = floods(report);
    !floods.is_empty()
        && floods
            .iter()
            .all(|&(sent, refused)| sent > 0 && refused == sent)
}

/// Every flood sent, and nothing of it was refused (it all went through the tunnel).
fn refused_none(report: &str) -> bool {
    let floods = floods(report);
    !floods.is_empty()
        && floods
            .iter()
            .all(|&(sent, refused)| sent > 0 && refused == 0)
}

fn row(
    scenario: &'static str,
    bed: &Bed,
    sent: String,
    seen: String,
    leaked: Vec<String>,
    held: bool,
) -> Row {
    let row = Row {
        scenario,
        backend: bed.backend,
        sent,
        seen,
        leaked,
        held,
    };
    println!(
        "e2e: {:<34} {:<9} sent: {}; oracle: {}; LEAKED={} {}",
        row.scenario,
        row.backend,
        row.sent,
        row.seen,
        row.leaked.len(),
        if row.held { "ok" } else { "FAILED" }
    );
    if !row.held {
        for packet in row.leaked.iter().take(5) {
            println!("e2e:   leaked: {packet}");
        }
    }
    row
}

/// The healthy tunnel: requests from the scope reach the web host from the VPN server's
/// addresses, and nothing leaves the cable in the clear.
fn healthy(bed: &mut Bed) -> Row {
    let web_side = Capture::start(&bed.lab.web, "w0", bed.lab.dir().join("web.pcap"));
    bed.lab.start_capture();
    let v4 = bed.request(WEB_HOST, APP_PORT);
    let v6 = bed.request(WEB_HOST_V6, APP_PORT);
    let leaked = bed.leaks("");
    let mut web_side = web_side;
    web_side.stop();
    let from_vpn =
        web_side.packets("tcp dst port 80 and (src host 198.51.100.1 or src host 2001:db8:100::1)");
    let from_client = web_side.packets(&format!("src host {CLIENT_V4} or src host {CLIENT_V6}"));
    let held = v4 && v6 && !from_vpn.is_empty() && from_client.is_empty() && leaked.is_empty();
    row(
        "healthy tunnel",
        bed,
        "TCP to the web host, IPv4 and IPv6".into(),
        format!(
            "v4 {}, v6 {}; the web host saw {} packets from the VPN server's addresses, {} from the client's",
            ok(v4),
            ok(v6),
            from_vpn.len(),
            from_client.len()
        ),
        leaked.clone(),
        held,
    )
}

fn ok(done: bool) -> &'static str {
    if done {
        "answered"
    } else {
        "NOT answered"
    }
}

/// Datagrams to the web host (v4 and v6) while `event` happens to the tunnel; then the tunnel
/// comes back (the daemon follows it).
fn tunnel_event(bed: &mut Bed, scenario: &'static str, event: impl FnOnce(&mut Bed)) -> Row {
    bed.lab.start_capture();
    let flood4 = bed.flood(WEB_HOST, APP_PORT, 1500);
    let flood6 = bed.flood(WEB_HOST_V6, APP_PORT, 1500);
    std::thread::sleep(Duration::from_millis(300));
    event(bed);
    let sent = format!("{} (v4) and {} (v6)", flooded(&flood4), flooded(&flood6));
    let leaked = bed.leaks("");
    bed.reconnect();
    let back = bed.tunnel_works();
    row(
        scenario,
        bed,
        sent.clone(),
        format!(
            "after reconnecting: {}",
            if back {
                "tunnel carries traffic"
            } else {
                "tunnel NOT back"
            }
        ),
        leaked.clone(),
        leaked.is_empty() && back && refused_some(&sent),
    )
}

/// Reconnects under the daemon: a new tun0 with a new ifindex, followed without `up`.
fn reconnect(bed: &mut Bed) -> Row {
    let before = bed.lab.tunnel_ifindex();
    bed.lab.start_capture();
    let flood = bed.flood(WEB_HOST, APP_PORT, 3000);
    bed.lab.kill_vpn_client();
    std::thread::sleep(Duration::from_millis(200));
    bed.connect();
    let after = bed.lab.tunnel_ifindex();
    let back = bed.tunnel_works();
    let sent = flooded(&flood);
    let leaked = bed.leaks("");
    row(
        "reconnect, new ifindex, daemon",
        bed,
        sent.clone(),
        format!(
            "tun0 ifindex {:?} -> {:?}; through the new tunnel: {}",
            before,
            after,
            ok(back)
        ),
        leaked.clone(),
        leaked.is_empty() && back && before != after && refused_some(&sent),
    )
}

/// The daemon SIGKILLed, then the tunnel dies: the pinned programs hold alone.
fn daemon_killed(bed: &mut Bed) -> Row {
    bed.kill_daemon();
    bed.lab.start_capture();
    let flood = bed.flood(WEB_HOST, APP_PORT, 1500);
    std::thread::sleep(Duration::from_millis(300));
    bed.lab.kill_vpn_client();
    let sent = flooded(&flood);
    let leaked = bed.leaks("");
    let enforced = bed.enforced();
    bed.connect();
    bed.start_daemon();
    let back = bed.tunnel_works();
    row(
        "daemon SIGKILL, then tunnel death",
        bed,
        sent.clone(),
        format!("scope still enforced: {enforced}; daemon restarted, tunnel back: {back}"),
        leaked.clone(),
        leaked.is_empty() && enforced && back && refused_some(&sent),
    )
}

/// The server list rotated twice under load: the tunnel never misses its server.
fn rotation(bed: &mut Bed) -> Row {
    let drops_before = bed.egress_drops();
    bed.lab.start_capture();
    let flood = bed.flood(WEB_HOST, APP_PORT, 2000);
    let server = format!("{VPN_SERVER}:{VPN_PORT}/udp");
    let mut rotated = 0;
    for list in [
        vec![server.as_str(), "198.51.100.9:1194/udp"],
        vec!["198.51.100.9:1194/udp", server.as_str()],
        vec![server.as_str()],
    ] {
        let mut args = vec!["servers", "set"];
        args.extend(list);
        rotated += usize::from(bed.ks(&args).status.success());
    }
    let sent = flooded(&flood);
    let leaked = bed.leaks("");
    // OpenVPN is in the scope: a moment without its server would be an egress drop.
    let dropped = bed.egress_drops().zip(drops_before).map(|(a, b)| a - b);
    let alive = bed.request(WEB_HOST, APP_PORT);
    // The config's list again, and the daemon its owner.
    let _ = bed.up();
    row(
        "server list rotated under load",
        bed,
        sent.clone(),
        format!(
            "{rotated} of 3 `servers set` done; egress drops in the scope meanwhile: {}; the tunnel still carries traffic: {alive}",
            dropped.map_or("unknown".into(), |d| d.to_string())
        ),
        leaked.clone(),
        leaked.is_empty() && rotated == 3 && alive && dropped == Some(0) && refused_none(&sent),
    )
}

/// A VPN that carries IPv4 only: IPv6 falls back to the uplink's route and must not leave.
fn ipv4_only(bed: &mut Bed) -> Row {
    bed.lab.kill_vpn_client();
    bed.connect_with("client4.conf");
    bed.lab.start_capture();
    let flood = bed.flood(WEB_HOST_V6, APP_PORT, 800);
    let sent = flooded(&flood);
    let v4 = bed.tunnel_works();
    let leaked = bed.leaks("");
    bed.lab.kill_vpn_client();
    bed.connect();
    row(
        "VPN carrying IPv4 only",
        bed,
        format!("{sent} to the web host's IPv6 address"),
        format!("IPv4 through the tunnel: {}", ok(v4)),
        leaked.clone(),
        leaked.is_empty() && v4 && refused_all(&sent),
    )
}

/// With the tunnel down, the exceptions and only they: NTP to the configured server, the LAN
/// peer and a DHCP discover leave; DNS to the LAN router (lan.dns = false) and NTP to another
/// host do not.
fn exceptions(bed: &mut Bed) -> Row {
    bed.lab.kill_vpn_client();
    bed.lab.start_capture();
    let probe = |target: String, local: &str| {
        output_in(
            &bed.lab.client,
            Some(&bed.scope),
            &probe_bin(),
            &["udp", &target, "500", local],
        )
        .status
        .success()
    };
    let ntp = probe(target(NTP_HOST, 123), "0");
    let lan = bed.request(ROUTER_V4, LAN_PORT);
    let _ = probe("255.255.255.255:67".into(), "68");
    let dns_router = probe(target(ROUTER_V4, 53), "0");
    let dns_host = probe(target(DNS_HOST, 53), "0");
    let ntp_other = probe(target(WEB_HOST, 123), "0");
    let allowed = format!(
        "(dst host {NTP_HOST} and udp dst port 123) or (dst host {ROUTER_V4} and tcp dst port {LAN_PORT}) \
         or (udp src port 68 and udp dst port 67)"
    );
    let dhcp = bed
        .lab
        .captured("udp src port 68 and udp dst port 67")
        .len();
    let leaked = bed.leaks(&allowed);
    bed.connect();
    let held = ntp && lan && dhcp > 0 && !dns_router && !dns_host && !ntp_other;
    row(
        "NTP, DHCP, LAN, DNS with tunnel down",
        bed,
        "NTP to the NTP server and to the web host, TCP to the LAN peer, a DHCP discover, DNS to the router and to a DNS host".into(),
        format!(
            "NTP {}, LAN peer {}, {dhcp} DHCP discover seen; DNS to the router {}, to the DNS host {}, NTP elsewhere {}",
            ok(ntp),
            ok(lan),
            ok(dns_router),
            ok(dns_host),
            ok(ntp_other)
        ),
        leaked.clone(),
        held && leaked.is_empty(),
    )
}

/// A flow answered before the kill switch, with another ruleset accepting `ct state
/// established` on output: once `up` runs, nothing of it leaves the cable.
fn conntrack(bed: &mut Bed) -> Row {
    bed.kill_daemon();
    let _ = bed.ks(&["down"]);
    bed.lab.kill_vpn_client();
    let other = "table inet other_firewall {\n\
        chain output { type filter hook output priority -10; policy accept; ct state established,related accept; }\n\
        chain input { type filter hook input priority -10; policy accept; ct state established,related accept; }\n}\n";
    let file = bed.lab.dir().join("conntrack.nft");
    std::fs::write(&file, other).unwrap();
    let loaded = output_in(
        &bed.lab.client,
        None,
        "nft",
        &["-f", file.to_str().unwrap()],
    );
    let stream = Background::start(command_in(
        &bed.lab.client,
        Some(&bed.scope),
        &probe_bin(),
        &["stream", &target(WEB_HOST, APP_PORT), "3000"],
    ));
    let established = stream.line(Duration::from_secs(5)).as_deref() == Some("established");
    let up = bed.up().status.success();
    bed.lab.start_capture();
    std::thread::sleep(Duration::from_millis(800));
    let leaked = bed.leaks("");
    let sent = stream
        .line(Duration::from_secs(10))
        .unwrap_or_else(|| "?".into());
    // The flow went on after `up` (so the oracle watched it) and was refused there.
    let counts: Vec<u64> = sent
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let went_on = matches!(counts.as_slice(), [attempts, refused] if *attempts > 0 && *refused > 0);
    let _ = output_in(
        &bed.lab.client,
        None,
        "nft",
        &["delete", "table", "inet", "other_firewall"],
    );
    bed.connect();
    bed.start_daemon();
    row(
        "flow opened before, conntrack",
        bed,
        format!("a UDP flow answered before `up` ({sent} datagrams, refused)"),
        format!(
            "other ruleset loaded: {}; flow established: {established}; up: {up}",
            loaded.status.success()
        ),
        leaked.clone(),
        leaked.is_empty() && established && up && loaded.status.success() && went_on,
    )
}

/// A config that cannot be used at the first `up`: lockdown, nothing leaves.
fn lockdown(bed: &mut Bed) -> Row {
    bed.kill_daemon();
    let _ = bed.ks(&["down"]);
    // No tunnel: what lockdown let out would leave the uplink in the clear, before the oracle.
    bed.lab.kill_vpn_client();
    testbed::write_config(&bed.config, "tunnels = [\"tun0\"\n[[server]\n");
    let up = bed.up();
    bed.lab.start_capture();
    let flood = bed.flood(WEB_HOST, APP_PORT, 500);
    let sent = flooded(&flood);
    let leaked = bed.leaks("");
    let status = String::from_utf8_lossy(&bed.ks(&["status"]).stdout).into_owned();
    testbed::write_config(&bed.config, &config(""));
    bed.start_daemon();
    bed.connect();
    let back = bed.tunnel_works();
    let locked = status.to_lowercase().contains("lockdown");
    row(
        "bad config at first up",
        bed,
        sent.clone(),
        format!(
            "`up` exited {:?}; status says lockdown: {locked}; fixed config, daemon, tunnel back: {back}",
            up.status.code()
        ),
        leaked.clone(),
        leaked.is_empty() && up.status.code() == Some(2) && locked && back && refused_all(&sent),
    )
}

/// `killswitch run` holds one app while the tunnel is dead; a process outside any scope is the
/// contrast the oracle must see.
fn per_app(bed: &mut Bed) -> Row {
    bed.lab.kill_vpn_client();
    bed.lab.start_capture();
    let config = bed.config.to_str().unwrap().to_owned();
    let probe = probe_bin();
    let app_target = target(WEB_HOST, APP_PORT);
    let run = killswitch_command(
        &bed.lab.client,
        &bed.pins,
        &[
            "--config",
            &config,
            "run",
            "--name",
            "e2e-app",
            "--backend",
            bed.backend,
            "--",
            &probe,
            "flood",
            &app_target,
            "500",
        ],
    )
    .output()
    .expect("killswitch run");
    let outside = output_in(
        &bed.lab.client,
        None,
        &probe,
        &["flood", &target(WEB_HOST, OTHER_PORT), "300"],
    );
    let contrast = bed
        .lab
        .captured(&format!(
            "dst host {WEB_HOST} and udp dst port {OTHER_PORT}"
        ))
        .len();
    let app_leaked = bed
        .lab
        .stop_capture(&format!("dst host {WEB_HOST} and udp dst port {APP_PORT}"));
    bed.connect();
    row(
        "per-app scope vs the rest",
        bed,
        format!(
            "the app under `killswitch run`: {}; a process outside: {}",
            String::from_utf8_lossy(&run.stdout).trim(),
            String::from_utf8_lossy(&outside.stdout).trim()
        ),
        format!("{contrast} packets of the process outside (unprotected, as documented)"),
        app_leaked.clone(),
        app_leaked.is_empty() && run.status.success() && contrast > 0,
    )
}

/// With `[vpn_client]`, an app in the scope sending to the VPN server's address itself is
/// dropped, while OpenVPN (in its own cgroup) keeps the tunnel.
fn impostor(bed: &mut Bed) -> Row {
    testbed::write_config(
        &bed.config,
        &config(&format!(
            "\n[vpn_client]\ncgroup = \"{}\"\n",
            bed.vpn_cgroup.relative
        )),
    );
    bed.lab.kill_vpn_client();
    bed.reload();
    bed.connect();
    let tunnel = bed.tunnel_works();
    bed.lab.start_capture();
    let server = target(VPN_SERVER, VPN_PORT);
    for _ in 0..3 {
        let _ = output_in(
            &bed.lab.client,
            Some(&bed.scope),
            &probe_bin(),
            &["udp", &server, "200", IMPOSTOR_PORT],
        );
    }
    let leaked = bed
        .lab
        .stop_capture(&format!("udp and src port {IMPOSTOR_PORT}"));
    testbed::write_config(&bed.config, &config(""));
    bed.lab.kill_vpn_client();
    bed.reload();
    bed.connect();
    let back = bed.tunnel_works();
    row(
        "another app to the server, [vpn_client]",
        bed,
        format!("3 UDP datagrams to {server} from local port {IMPOSTOR_PORT}"),
        format!("OpenVPN in its cgroup kept the tunnel: {tunnel}; plain config again: {back}"),
        leaked.clone(),
        leaked.is_empty() && tunnel && back,
    )
}

/// Tunnel interfaces coming and going 50 times under the daemon while traffic flows through
/// the real tunnel; `verify` agrees with the maps afterwards.
fn churn(bed: &mut Bed) -> Row {
    testbed::write_config(
        &bed.config,
        &config("").replace("[\"tun0\"]", "[\"tun0\", \"tun9\"]"),
    );
    bed.reload();
    bed.lab.start_capture();
    let flood = bed.flood(WEB_HOST, APP_PORT, 2000);
    let mut done = 0;
    for _ in 0..CHURNS {
        let added = output_in(
            &bed.lab.client,
            None,
            "ip",
            &["tuntap", "add", "dev", "tun9", "mode", "tun"],
        );
        let _ = output_in(&bed.lab.client, None, "ip", &["link", "set", "tun9", "up"]);
        let deleted = output_in(&bed.lab.client, None, "ip", &["link", "del", "tun9"]);
        done += usize::from(added.status.success() && deleted.status.success());
    }
    let sent = flooded(&flood);
    std::thread::sleep(Duration::from_millis(300));
    // The oracle also watches verify's probes: refused, they never reach the cable.
    let verify = bed.ks(&["verify"]);
    let verified = verify.status.success();
    if !verified {
        print!("{}", String::from_utf8_lossy(&verify.stdout));
    }
    let leaked = bed.leaks("");
    testbed::write_config(&bed.config, &config(""));
    bed.reload();
    let alive = bed.tunnel_works();
    row(
        "50 tunnel churns",
        bed,
        sent.clone(),
        format!(
            "{done} of {CHURNS} churns; then `verify`: {}; tunnel: {}",
            if verified { "passed" } else { "FAILED" },
            ok(alive)
        ),
        leaked.clone(),
        leaked.is_empty() && done == CHURNS && verified && alive && refused_none(&sent),
    )
}

/// The control: the kill switch down, the tunnel dies, the oracle must catch the leak.
fn control(bed: &mut Bed) -> Row {
    bed.kill_daemon();
    let _ = bed.ks(&["down"]);
    bed.lab.start_capture();
    let flood4 = bed.flood(WEB_HOST, APP_PORT, 1000);
    let flood6 = bed.flood(WEB_HOST_V6, APP_PORT, 1000);
    std::thread::sleep(Duration::from_millis(200));
    bed.lab.kill_vpn_client();
    let sent = format!("{} (v4) and {} (v6)", flooded(&flood4), flooded(&flood6));
    let leaked = bed.leaks("");
    let v4 = leaked
        .iter()
        .filter(|l| l.contains(&format!("> {WEB_HOST}.")))
        .count();
    let v6 = leaked
        .iter()
        .filter(|l| l.contains(&format!("> {WEB_HOST_V6}.")))
        .count();
    row(
        "control: kill switch down",
        bed,
        sent,
        format!("the oracle must catch the leak: {v4} IPv4 and {v6} IPv6 packets to the web host"),
        leaked,
        v4 > 0 && v6 > 0,
    )
}

/// A scenario: its name (for `ks-e2e NAME`) and what runs it.
type Scenario = (&'static str, fn(&mut Bed) -> Row);

const SCENARIOS: &[Scenario] = &[
    ("healthy", healthy),
    ("sigkill", |b| {
        tunnel_event(b, "VPN client SIGKILL", |b| b.lab.kill_vpn_client())
    }),
    ("stop", |b| {
        tunnel_event(b, "graceful stop", |b| b.lab.stop_vpn_client())
    }),
    ("deleted", |b| {
        tunnel_event(b, "tunnel deleted", |b| {
            let _ = b.lab.client.ip(&["link", "del", "tun0"]);
        })
    }),
    ("reconnect", reconnect),
    ("daemon-killed", daemon_killed),
    ("rotation", rotation),
    ("ipv4-only", ipv4_only),
    ("exceptions", exceptions),
    ("vpn-client", impostor),
    ("churn", churn),
    ("per-app", per_app),
    ("conntrack", conntrack),
    ("lockdown", lockdown),
    ("control", control),
];

/// Runs the scenarios whose short name contains `only` (all without it) with `backend`.
fn scenarios(backend: &'static str, only: Option<&str>, rows: &mut Vec<Row>) {
    let mut bed = Bed::new(backend);
    bed.connect();
    bed.start_daemon();
    assert!(bed.enforced(), "the daemon did not enforce the scope");
    for (name, scenario) in SCENARIOS {
        if only.is_none_or(|only| name.contains(only)) {
            rows.push(scenario(&mut bed));
        }
    }
}

fn main() -> ExitCode {
    if !testbed::privileged() {
        eprintln!("ks-e2e: needs root (namespaces, cgroups, BPF)");
        return ExitCode::from(2);
    }
    let only = std::env::args().nth(1);
    let started = Instant::now();
    let mut rows = Vec::new();
    for backend in ["ebpf", "nftables"] {
        println!("e2e: {backend}: building the bed (OpenVPN server, router, web host)");
        scenarios(backend, only.as_deref(), &mut rows);
    }
    println!();
    println!(
        "{:<40} {:<9} {:>7}  result",
        "scenario", "backend", "LEAKED"
    );
    for r in &rows {
        println!(
            "{:<40} {:<9} {:>7}  {}",
            r.scenario,
            r.backend,
            r.leaked.len(),
            if r.held { "ok" } else { "FAILED" }
        );
    }
    let failed = rows.iter().filter(|r| !r.held).count();
    println!(
        "e2e: {} scenarios, {failed} failed, in {:.0} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
