//! Real packets through the exceptions after the servers: LAN (with DNS to the LAN refused),
//! DNS and NTP servers, and IPv6 block mode, in private namespaces on a child cgroup.

use std::{net::SocketAddr, time::Duration};

use testbed::{
    echo::EchoServer,
    net::{TestNet, OTHER_V4, OTHER_V6, SERVER_V4, TUNNEL_PEER_V4, TUNNEL_PEER_V6},
    process::{command_in, killswitch_ok, output_in, Background},
    require_root, Cgroup, PinRoot,
};

const PROBE: &str = env!("CARGO_BIN_EXE_ks-probe");
/// The "LAN router": the internet namespace's side of the uplink.
const LAN_ROUTER: &str = "192.0.2.1";

fn socket(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

struct Setup {
    net: TestNet,
    cgroup: Cgroup,
    pins: PinRoot,
    dir: std::path::PathBuf,
    echo: EchoServer,
}

impl Setup {
    fn new(config: &str) -> Setup {
        Setup::with_echo(config, |net| {
            EchoServer::start(
                &net.internet,
                &[
                    socket(LAN_ROUTER, 53),
                    socket(LAN_ROUTER, 8080),
                    socket(OTHER_V4, 53),
                    socket(OTHER_V4, 8080),
                    socket(SERVER_V4, 123),
                    socket(SERVER_V4, 124),
                    socket(TUNNEL_PEER_V4, 8080),
                    socket(TUNNEL_PEER_V6, 8080),
                    socket(OTHER_V6, 8080),
                ],
            )
        })
    }

    fn with_echo(config: &str, echo: impl FnOnce(&TestNet) -> EchoServer) -> Setup {
        let net = TestNet::new();
        let echo = echo(&net);
        let dir = testbed::private_dir("kstest");
        let path = dir.join("killswitch.toml");
        testbed::write_config(&path, config);
        let setup = Setup {
            net,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            dir,
            echo,
        };
        killswitch_ok(
            &setup.net.client,
            &setup.pins,
            &[
                "--config",
                path.to_str().unwrap(),
                "up",
                "--cgroup",
                &setup.cgroup.relative,
            ],
        );
        setup
    }

    fn reaches(&self, kind: &str, addr: &str, port: u16) -> bool {
        self.probe(&[kind, &socket(addr, port).to_string()])
    }

    /// Runs ks-probe with `args` inside the scope; true when the echo came back.
    fn probe(&self, args: &[&str]) -> bool {
        output_in(&self.net.client, Some(&self.cgroup), PROBE, args)
            .status
            .success()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn lan_dns_and_ntp_exceptions_with_real_traffic() {
    require_root!();
    let s = Setup::new(&format!(
        "tunnels = []\n[lan]\nnetworks = [\"192.0.2.0/24\"]\n[dns]\nservers = [\"{OTHER_V4}\"]\n\
         [ntp]\nservers = [\"{SERVER_V4}\"]\n"
    ));
    let mut wrong = Vec::new();
    for (kind, addr, port, expected, why) in [
        ("tcp", LAN_ROUTER, 8080, true, "LAN"),
        ("udp", LAN_ROUTER, 8080, true, "LAN"),
        (
            "udp",
            LAN_ROUTER,
            53,
            false,
            "DNS to the LAN router is a DNS leak",
        ),
        (
            "tcp",
            LAN_ROUTER,
            53,
            false,
            "DNS over TCP to the LAN router",
        ),
        ("udp", OTHER_V4, 53, true, "configured DNS server"),
        ("tcp", OTHER_V4, 53, true, "configured DNS server over TCP"),
        (
            "tcp",
            OTHER_V4,
            8080,
            false,
            "a DNS server is not reachable on other ports",
        ),
        ("udp", SERVER_V4, 123, true, "configured NTP server"),
        ("udp", SERVER_V4, 124, false, "an NTP server only on 123"),
        ("tcp", TUNNEL_PEER_V4, 8080, false, "no tunnel configured"),
    ] {
        if s.reaches(kind, addr, port) != expected {
            wrong.push(format!(
                "{kind} {addr}:{port} should {}: {why}",
                if expected { "pass" } else { "be dropped" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn ipv6_block_mode_drops_ipv6_even_through_the_tunnel() {
    require_root!();
    let s = Setup::new("tunnels = [\"tun0\"]\n[ipv6]\nmode = \"block\"\n");
    assert!(
        s.reaches("tcp", TUNNEL_PEER_V4, 8080),
        "IPv4 through the tunnel must pass"
    );
    assert!(
        !s.reaches("tcp", TUNNEL_PEER_V6, 8080),
        "IPv6 through the tunnel must be dropped"
    );
    assert!(
        !s.reaches("udp", TUNNEL_PEER_V6, 8080),
        "IPv6 through the tunnel must be dropped"
    );
    assert!(!s.reaches("tcp", OTHER_V6, 8080));
}

#[test]
fn ipv6_tunnel_mode_passes_ipv6_through_the_tunnel_only() {
    require_root!();
    let s = Setup::new("tunnels = [\"tun0\"]\n");
    assert!(s.reaches("tcp", TUNNEL_PEER_V6, 8080));
    assert!(
        !s.reaches("tcp", OTHER_V6, 8080),
        "IPv6 on the uplink must be dropped"
    );
}

/// DHCP servers on the router side: v4 on 0.0.0.0:67 (broadcasts reach it), v6 on [::]:547 in
/// the All_DHCP_Relay_Agents_and_Servers group.
fn dhcp_servers(net: &TestNet) -> EchoServer {
    EchoServer::start_in_groups(
        &net.internet,
        &[socket("0.0.0.0", 67), socket("::", 547)],
        &[("ff02::1:2".parse().unwrap(), "up0")],
    )
}

/// A DHCP client's UDP exchanges: broadcast DISCOVER from port 68 (answered by unicast), and a
/// DHCPv6 SOLICIT from port 546 to ff02::1:2 (answered from the server's link-local address).
const DISCOVER: [&str; 4] = ["udp", "255.255.255.255:67", "1000", "68"];
const SOLICIT: [&str; 4] = ["udp", "[ff02::1:2%up0]:547", "1000", "546"];

#[test]
fn dhcp_exchanges_pass_when_enabled() {
    require_root!();
    let s = Setup::with_echo("tunnels = [\"tun0\"]\n", dhcp_servers);
    assert!(s.probe(&DISCOVER), "DHCPv4 from 68 to 67 must pass");
    assert!(
        s.probe(&SOLICIT),
        "DHCPv6 from 546 to ff02::1:2:547 must pass"
    );
    let before = s.echo.received();
    assert!(
        !s.probe(&["udp", "255.255.255.255:67", "500", "6800"]),
        "only the DHCP client port may reach the server port"
    );
    assert!(
        !s.probe(&["udp", "192.0.2.1:67", "500", "6800"]),
        "only the DHCP client port may reach the server port"
    );
    assert_eq!(s.echo.received(), before, "nothing else reached the router");
}

#[test]
fn dhcp_exchanges_are_dropped_when_disabled() {
    require_root!();
    let s = Setup::with_echo(
        "tunnels = [\"tun0\"]\n[dhcp]\nenabled = false\n",
        dhcp_servers,
    );
    assert!(!s.probe(&DISCOVER));
    assert!(!s.probe(&SOLICIT));
    assert_eq!(
        s.echo.received(),
        0,
        "the router saw DHCP it should not have"
    );
}

#[test]
fn inbound_connections_through_the_tunnel_only_to_listed_ports() {
    require_root!();
    let s = Setup::with_echo(
        &format!(
            "tunnels = [\"tun0\"]\n[[inbound]]\nport = 51234\n\
             [[inbound]]\nport = 2222\nsources = [\"{TUNNEL_PEER_V4}\"]\n"
        ),
        |net| EchoServer::start(&net.internet, &[]),
    );
    let servers: Vec<Background> = ["51234", "2222", "8081"]
        .iter()
        .map(|port| {
            let server = Background::start(command_in(
                &s.net.client,
                Some(&s.cgroup),
                PROBE,
                &["serve", port, "15000"],
            ));
            assert_eq!(
                server.line(Duration::from_secs(5)).as_deref(),
                Some("ready"),
                "listener on {port}"
            );
            server
        })
        .collect();
    let from_internet = |addr: &str, port: u16| {
        let target = socket(addr, port).to_string();
        output_in(&s.net.internet, None, PROBE, &["tcp", &target, "700"])
            .status
            .success()
    };
    let mut wrong = Vec::new();
    for (addr, port, expected, why) in [
        ("198.18.0.2", 51234, true, "listed port, any source"),
        ("2001:db8:18::2", 51234, true, "listed port over IPv6"),
        (
            "198.18.0.2",
            2222,
            true,
            "listed port from its listed source",
        ),
        (
            "2001:db8:18::2",
            2222,
            false,
            "listed port from another source",
        ),
        ("198.18.0.2", 8081, false, "port not listed"),
        (
            "192.0.2.2",
            51234,
            false,
            "inbound is for the tunnel, not the uplink",
        ),
    ] {
        if from_internet(addr, port) != expected {
            wrong.push(format!(
                "{addr}:{port} should {}: {why}",
                if expected { "connect" } else { "be refused" }
            ));
        }
    }
    drop(servers);
    assert!(wrong.is_empty(), "{wrong:#?}");
}
