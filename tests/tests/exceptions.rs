//! Real packets through the exceptions after the servers: LAN (with DNS to the LAN refused),
//! DNS and NTP servers, and IPv6 block mode, in private namespaces on a child cgroup.

use std::net::SocketAddr;

use testbed::{
    echo::EchoServer,
    net::{TestNet, OTHER_V4, OTHER_V6, SERVER_V4, TUNNEL_PEER_V4, TUNNEL_PEER_V6},
    process::{killswitch_ok, output_in},
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
    _echo: EchoServer,
}

impl Setup {
    fn new(config: &str) -> Setup {
        let net = TestNet::new();
        let echo = EchoServer::start(
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
        );
        let dir = std::env::temp_dir().join(testbed::unique_name("kstest"));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("killswitch.toml");
        std::fs::write(&path, config).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let setup = Setup {
            net,
            cgroup: Cgroup::new(),
            pins: PinRoot::new(),
            dir,
            _echo: echo,
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
        let target = socket(addr, port).to_string();
        output_in(
            &self.net.client,
            Some(&self.cgroup),
            PROBE,
            &[kind, &target],
        )
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
