//! The configuration file: valid inputs normalize as expected; each kind of bad input gives its
//! exact one-line message naming file, line and key.

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use killswitch::policy::{Policy, Protocol, ServerAddress, ServerRule};

fn parse(text: &str) -> Result<Policy, String> {
    Policy::from_toml(text, Path::new("/etc/killswitch/killswitch.toml")).map_err(|e| e.to_string())
}

fn error(text: &str) -> String {
    parse(text).expect_err("should be rejected")
}

/// Every input is rejected with exactly its message; all mismatches are reported together.
fn check_errors(cases: &[(&str, String)]) {
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let got = error(text);
        if &got != expected {
            wrong.push(format!("input {text:?}\n  got:  {got}\n  want: {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn full_valid_config_normalizes() {
    let policy = parse(
        r#"
tunnels = ["tun0", "wg*"]
uplinks = ["eth0"]

[[server]]
address = "198.51.100.1"
port = 1194
protocol = "udp"

[[server]]
address = "2001:db8::7"

[[server]]
address = "VPN.Example.NET."
port = 443
protocol = "tcp"

[[server]]
address = "::ffff:198.51.100.9"
"#,
    )
    .unwrap();
    let names: Vec<_> = policy.tunnels.iter().map(|t| t.as_str()).collect();
    assert_eq!(names, ["tun0", "wg*"]);
    assert!(policy.tunnels[1].matches("wg0") && !policy.tunnels[1].matches("eth0"));
    assert!(policy.tunnels[0].matches("tun0") && !policy.tunnels[0].matches("tun01"));
    assert_eq!(policy.uplinks.as_ref().unwrap()[0].as_str(), "eth0");
    let ip = |s: &str| ServerAddress::Ip(s.parse::<IpAddr>().unwrap());
    assert_eq!(
        policy.servers,
        vec![
            ServerRule {
                address: ip("198.51.100.1"),
                port: Some(1194),
                protocol: Some(Protocol::Udp)
            },
            ServerRule {
                address: ip("2001:db8::7"),
                port: None,
                protocol: None
            },
            ServerRule {
                address: ServerAddress::Host("vpn.example.net".into()),
                port: Some(443),
                protocol: Some(Protocol::Tcp)
            },
            // IPv4-mapped IPv6 is the IPv4 address.
            ServerRule {
                address: ip("198.51.100.9"),
                port: None,
                protocol: None
            },
        ]
    );
}

#[test]
fn minimal_config_has_no_uplink_restriction_and_no_servers() {
    let policy = parse("tunnels = []\n").unwrap();
    assert!(policy.tunnels.is_empty() && policy.uplinks.is_none() && policy.servers.is_empty());
}

#[test]
fn each_kind_of_bad_input_has_its_message() {
    let f = "/etc/killswitch/killswitch.toml";
    let cases: &[(&str, String)] = &[
        ("", format!("{f}: tunnels: missing; list the VPN's interfaces, e.g. tunnels = [\"tun0\"]")),
        (
            "tunnels = [\"tun0\"]\nkill = true\n",
            format!("{f}:2: unknown field `kill`, expected one of `tunnels`, `uplinks`, `server`, `lan`, `dhcp`, `ntp`, `dns`, `ipv6`, `inbound`, `vpn_client`, `guard`"),
        ),
        (
            "tunnels = [\"tun0\"]\n\n[vpn_client]\nmark = 0\n",
            format!("{f}:4: vpn_client.mark: 0 is the mark of every unmarked packet; use the VPN's own fwmark"),
        ),
        (
            "tunnels = [\"tun0\"]\n\n[vpn_client]\nmark = 4294967296\n",
            format!("{f}:4: vpn_client.mark: 4294967296 is not a mark (1-0xffffffff)"),
        ),
        (
            "tunnels = [\"tun0\"]\n\n[vpn_client]\ncgroup = \"/\"\n",
            format!("{f}:4: vpn_client.cgroup: the cgroup2 root holds every process; name the VPN client's own cgroup, e.g. \"system.slice/openvpn-client@work.service\""),
        ),
        (
            "tunnels = [\"tun0\"]\n\n[vpn_client]\ncgroup = \"system.slice/../user.slice\"\n",
            format!("{f}:4: vpn_client.cgroup: `system.slice/../user.slice` must be a plain path below the cgroup2 root (no `//`, `.` or `..`)"),
        ),
        (
            "tunnels = [\"tun0\"]\n\n[vpn_client]\nuser = \"nobody\"\n",
            format!("{f}:4: unknown field `user`, expected `cgroup` or `mark`"),
        ),
        ("tunnels = \"tun0\"\n", format!("{f}:1: invalid type: string \"tun0\", expected a sequence")),
        ("tunnels = [\"tun0\"\n", format!("{f}:1: unclosed array, expected `]`")),
        ("tunnels = [\"*\"]\n", format!("{f}:1: tunnels: `*` alone matches every interface; name the interfaces")),
        ("tunnels = [\"t*n\"]\n", format!("{f}:1: tunnels: `t*n` is not an interface name (a trailing `*` is the only wildcard)")),
        ("tunnels = [\"a/b\"]\n", format!("{f}:1: tunnels: `a/b` is not an interface name (a trailing `*` is the only wildcard)")),
        ("tunnels = [\"\"]\n", format!("{f}:1: tunnels: an interface name cannot be empty")),
        (
            "tunnels = [\"averyveryverylongname\"]\n",
            format!("{f}:1: tunnels: `averyveryverylongname` is longer than the 15 bytes an interface name can have"),
        ),
        ("tunnels = [\"tun0\", \"tun0\"]\n", format!("{f}:1: tunnels: `tun0` is listed twice")),
        (
            "tunnels = [\"tun*\"]\nuplinks = [\"eth0\", \"tun0\"]\n",
            format!("{f}:2: uplinks: `tun0` overlaps the tunnel `tun*`; an interface is either the tunnel or an uplink"),
        ),
        (
            "tunnels = []\n[[server]]\nport = 1194\n",
            format!("{f}:2: server.address: missing; every [[server]] needs an address"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.300\"\n",
            format!("{f}:3: server.address: `198.51.100.300` is neither an IP address nor a hostname"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.0/24\"\n",
            format!("{f}:3: server.address: `198.51.100.0/24` is a prefix; a server is one address or hostname"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"0.0.0.0\"\n",
            format!("{f}:3: server.address: `0.0.0.0` cannot be a server address: it is the unspecified address"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"127.0.0.1\"\n",
            format!("{f}:3: server.address: `127.0.0.1` cannot be a server address: it is a loopback address (loopback is always allowed)"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"fe80::1\"\n",
            format!("{f}:3: server.address: `fe80::1` cannot be a server address: it is a link-local address"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"224.0.0.251\"\n",
            format!("{f}:3: server.address: `224.0.0.251` cannot be a server address: it is a multicast address"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"bad_host!\"\n",
            format!("{f}:3: server.address: `bad_host!` is neither an IP address nor a hostname"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.1\"\nport = 70000\n",
            format!("{f}:4: server.port: 70000 is not a port (1-65535)"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.1\"\nport = 0\n",
            format!("{f}:4: server.port: 0 is not a port (1-65535)"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.1\"\nprotocol = \"icmp\"\n",
            format!("{f}:4: server.protocol: `icmp` is not \"udp\" or \"tcp\" (leave it out for both)"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.1\"\nprot = \"udp\"\n",
            format!("{f}:4: unknown field `prot`, expected one of `address`, `port`, `protocol`"),
        ),
        (
            "tunnels = []\n[[server]]\naddress = \"198.51.100.1\"\n[[server]]\naddress = \"198.51.100.1\"\n",
            format!("{f}:4: server: duplicate of the server on line 2"),
        ),
    ];
    check_errors(cases);
}

/// A private directory under /run (root's, mode 0700), removed on drop: the loader refuses a
/// config in a directory others can write, and /tmp is one.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(name: &str) -> PrivateDir {
        use std::os::unix::fs::DirBuilderExt;
        let path = PathBuf::from(format!("/run/kstest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap();
        PrivateDir(path)
    }

    fn file(&self, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(format!("killswitch-{mode:o}.toml"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn files_anyone_can_edit_are_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to create root-owned files");
        return;
    }
    let dir = PrivateDir::new("files");
    let ok = dir.file("tunnels = [\"tun0\"]\n", 0o644);
    assert!(Policy::load(&ok).is_ok());

    let writable = dir.file("tunnels = [\"tun0\"]\n", 0o664);
    let message = Policy::load(&writable).unwrap_err().to_string();
    assert_eq!(
        message,
        format!(
            "{0}: refusing a configuration that group or others can write (mode 0664); run `chmod go-w {0}`",
            writable.display()
        )
    );

    let foreign = dir.file("tunnels = [\"tun0\"]\n", 0o600);
    nix::unistd::chown(&foreign, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let message = Policy::load(&foreign).unwrap_err().to_string();
    assert!(
        message.contains("owned by uid 65534 instead of root; run `chown root:"),
        "{message}"
    );

    // A directory someone else owns or can write: they could swap the file under our feet.
    let shared = PrivateDir::new("shared");
    let inside = shared.file("tunnels = [\"tun0\"]\n", 0o600);
    std::fs::set_permissions(&shared.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let message = Policy::load(&inside).unwrap_err().to_string();
    assert!(
        message.contains("group or others can write (mode 0777"),
        "{message}"
    );
    std::fs::set_permissions(&shared.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&shared.0, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let message = Policy::load(&inside).unwrap_err().to_string();
    assert!(message.contains("root does not own"), "{message}");
    // The same file reached through a symlink in that directory.
    let link = dir.0.join("link.toml");
    std::os::unix::fs::symlink(&inside, &link).unwrap();
    let message = Policy::load(&link).unwrap_err().to_string();
    assert!(message.contains("root does not own"), "{message}");
    let in_tmp = std::env::temp_dir().join(format!("kstest-tmp-{}.toml", std::process::id()));
    std::fs::write(&in_tmp, "tunnels = [\"tun0\"]\n").unwrap();
    let message = Policy::load(&in_tmp).unwrap_err().to_string();
    let _ = std::fs::remove_file(&in_tmp);
    assert!(
        message.contains("group or others can write (mode 1777"),
        "{message}"
    );

    // A FIFO does not hang the loader; a huge file is not read whole.
    let fifo = dir.0.join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let message = Policy::load(&fifo).unwrap_err().to_string();
    assert!(message.ends_with("not a regular file"), "{message}");
    let big = PrivateDir::new("huge");
    let huge = big.file(&"#".repeat(17 << 20), 0o600);
    let message = Policy::load(&huge).unwrap_err().to_string();
    assert!(message.contains("larger than 16 MiB"), "{message}");

    let missing = Policy::load(Path::new("/nonexistent/killswitch.toml"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        missing,
        "/nonexistent/killswitch.toml: cannot read the configuration: No such file or directory (os error 2)"
    );
}

#[test]
fn every_section_of_the_spec_parses() {
    use killswitch::policy::{Inbound, Ipv6Mode, Prefix};
    let policy = parse(
        r#"
tunnels = ["tun0"]
[lan]
networks = ["192.168.77.0/24", "2001:db8:77::/64", "192.168.78.5"]
dns = true
[dhcp]
enabled = false
[ntp]
servers = ["203.0.113.123"]
[dns]
servers = ["203.0.113.53", "2001:db8::53"]
[ipv6]
mode = "tunnel"
[[inbound]]
port = 51234
sources = ["203.0.113.7"]
[[inbound]]
port = 22
"#,
    )
    .unwrap();
    let prefix = |a: &str, len| Prefix {
        addr: a.parse().unwrap(),
        len,
    };
    assert_eq!(
        policy.lan.networks,
        vec![
            prefix("192.168.77.0", 24),
            prefix("2001:db8:77::", 64),
            prefix("192.168.78.5", 32)
        ]
    );
    assert!(policy.lan.dns && !policy.dhcp);
    assert_eq!(
        policy.ntp_servers,
        vec!["203.0.113.123".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(policy.dns_servers.len(), 2);
    assert_eq!(policy.ipv6, Ipv6Mode::Tunnel);
    assert_eq!(
        policy.inbound,
        vec![
            Inbound {
                port: 51234,
                sources: vec!["203.0.113.7".parse().unwrap()]
            },
            Inbound {
                port: 22,
                sources: vec![]
            }
        ]
    );
    assert!(policy.lan.networks[0].contains("192.168.77.200".parse().unwrap()));
    assert!(!policy.lan.networks[0].contains("192.168.78.1".parse().unwrap()));

    let defaults = parse("tunnels = []\n").unwrap();
    assert!(defaults.dhcp && !defaults.lan.dns && defaults.ipv6 == Ipv6Mode::Tunnel);
}

#[test]
fn bad_sections_have_their_messages() {
    let f = "/etc/killswitch/killswitch.toml";
    let cases: &[(&str, String)] = &[
        (
            "tunnels = []\n[lan]\nnetworks = [\"192.168.77.1/24\"]\n",
            format!("{f}:3: lan.networks: `192.168.77.1/24` has host bits set; did you mean 192.168.77.0/24?"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"192.168.77.0/33\"]\n",
            format!("{f}:3: lan.networks: `192.168.77.0/33`: the prefix length must be 0-32"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"lan\"]\n",
            format!("{f}:3: lan.networks: `lan` is not an address prefix like 192.168.1.0/24"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n",
            format!("{f}:3: lan.networks: `10.0.0.0/8` is listed twice"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"0.0.0.0/0\"]\n",
            format!("{f}:3: lan.networks: `0.0.0.0/0` is wider than a /8: that is the internet, not a LAN"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"8.0.0.0/7\"]\n",
            format!("{f}:3: lan.networks: `8.0.0.0/7` is wider than a /8: that is the internet, not a LAN"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"8.0.0.0/8\"]\n",
            format!("{f}:3: lan.networks: `8.0.0.0/8` is public and wider than a /16: that is part of the internet, not a LAN"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"2000::/7\"]\n",
            format!("{f}:3: lan.networks: `2000::/7` is public and wider than a /32: that is part of the internet, not a LAN"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"::/0\"]\n",
            format!("{f}:3: lan.networks: `::/0` is wider than a /7: that is the internet, not a LAN"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"::/64\"]\n",
            format!("{f}:3: lan.networks: `::/64` covers the IPv4-mapped range ::ffff:0:0/96 and would match every IPv4 address; list IPv4 LANs as IPv4 prefixes"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"::/8\"]\n",
            format!("{f}:3: lan.networks: `::/8` covers the IPv4-mapped range ::ffff:0:0/96 and would match every IPv4 address; list IPv4 LANs as IPv4 prefixes"),
        ),
        (
            "tunnels = []\n[lan]\nnetworks = [\"::ffff:0:0/96\"]\n",
            format!("{f}:3: lan.networks: `::ffff:0:0/96`: the prefix length must be 0-32"),
        ),
        ("tunnels = []\n[lan]\ndns = \"yes\"\n", format!("{f}:3: invalid type: string \"yes\", expected a boolean")),
        (
            "tunnels = []\n[ntp]\nservers = [\"pool.ntp.org\"]\n",
            format!("{f}:3: ntp.servers: `pool.ntp.org` is not an IP address"),
        ),
        (
            "tunnels = []\n[dns]\nservers = [\"203.0.113.53\", \"203.0.113.53\"]\n",
            format!("{f}:3: dns.servers: `203.0.113.53` is listed twice"),
        ),
        (
            "tunnels = []\n[ipv6]\nmode = \"off\"\n",
            format!("{f}:3: ipv6.mode: `off` is not \"tunnel\" or \"block\""),
        ),
        (
            "tunnels = []\n[ipv6]\nmode = \"block\"\n[dns]\nservers = [\"2001:db8::53\"]\n",
            format!("{f}:5: dns.servers: `2001:db8::53` is IPv6, but [ipv6] mode = \"block\" drops every IPv6 packet"),
        ),
        (
            "tunnels = []\n[ipv6]\nmode = \"block\"\n[[server]]\naddress = \"2001:db8::1\"\n",
            format!("{f}:5: server.address: `2001:db8::1` is IPv6, but [ipv6] mode = \"block\" drops every IPv6 packet"),
        ),
        ("tunnels = []\n[[inbound]]\nsources = []\n", format!("{f}:2: inbound.port: missing; every [[inbound]] needs a port")),
        (
            "tunnels = []\n[[inbound]]\nport = 22\n[[inbound]]\nport = 22\n",
            format!("{f}:5: inbound.port: port 22 is listed twice"),
        ),
        (
            "tunnels = []\n[[inbound]]\nport = 22\nsources = [\"any\"]\n",
            format!("{f}:4: inbound.sources: `any` is not an IP address"),
        ),
        ("tunnels = []\n[dhcp]\nenable = true\n", format!("{f}:3: unknown field `enable`, expected `enabled`")),
    ];
    check_errors(cases);
}

#[test]
fn the_widest_private_ranges_are_still_lans() {
    let policy = parse(
        "tunnels = []\n[lan]\nnetworks = [\"10.0.0.0/8\", \"fc00::/7\", \"fe80::/10\", \"2001:db8::/32\"]\n",
    )
    .expect("private and link-local ranges are LANs");
    assert_eq!(policy.lan.networks.len(), 4);
    // An IPv4 prefix never holds an IPv6 address, not even an IPv4-mapped one.
    assert!(!policy.lan.networks[0].contains("::ffff:10.0.0.1".parse().unwrap()));
}

#[test]
fn more_entries_than_the_kernel_maps_hold_are_refused_at_check() {
    let f = "/etc/killswitch/killswitch.toml";
    let prefixes: Vec<String> = (0..5000u32)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let text = format!(
        "tunnels = []\n[lan]\nnetworks = [\n{}\n]\n",
        prefixes.join(",\n")
    );
    assert_eq!(
        error(&text),
        format!("{f}:4100: lan.networks: more than 4096 prefixes; the kernel map holds 4096")
    );
    let ntp: Vec<String> = (0..4097u32)
        .map(|i| format!("\"198.18.{}.{}\"", i / 256, i % 256))
        .collect();
    let text = format!("tunnels = []\n[ntp]\nservers = [\n{}\n]\n", ntp.join(",\n"));
    assert_eq!(
        error(&text),
        format!("{f}:4100: ntp.servers: more than 4096 addresses; the kernel map holds 4096")
    );
    // 10,000 servers are fine, and checked in linear time (no per-entry scans).
    let servers: String = (0..10_000u32)
        .map(|i| {
            format!(
                "[[server]]\naddress = \"198.18.{}.{}\"\nport = 1194\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let policy = parse(&format!("tunnels = [\"tun0\"]\n{servers}")).unwrap();
    assert_eq!(policy.servers.len(), 10_000);
    eprintln!("10,000 servers checked in {:?}", started.elapsed());
}

/// 100,000 mutations of a valid config (bytes flipped, inserted and deleted; lines dropped,
/// doubled and swapped; values replaced by odd ones): none panics, and every rejection is one
/// line naming the file, with the exit status of a configuration error.
#[test]
fn mutated_configs_never_panic_and_fail_in_one_line() {
    const VALID: &str = r#"tunnels = ["tun0", "wg*"]
uplinks = ["eth0"]
[[server]]
address = "198.51.100.1"
port = 1194
protocol = "udp"
[[server]]
address = "vpn.example.test"
port = 443
[lan]
networks = ["192.168.77.0/24", "2001:db8:77::/64"]
dns = false
[dhcp]
enabled = true
[ntp]
servers = ["203.0.113.123"]
[dns]
servers = ["203.0.113.53"]
[ipv6]
mode = "tunnel"
[[inbound]]
port = 22
sources = ["203.0.113.7"]
"#;
    const ODD: &[&str] = &[
        "",
        "0",
        "-1",
        "65536",
        "1e9",
        "\"\"",
        "[]",
        "{}",
        "true",
        "\"::\"",
        "\"0.0.0.0/0\"",
        "\"::/64\"",
        "\"a\\u0000b\"",
        "\"\\uD800\"",
        "[\"x\", 1]",
        "\"\u{fffd}\"",
        "inf",
        "nan",
        "\"255.255.255.255\"",
        "\"ff02::1\"",
        "\"fe80::1%eth0\"",
        "\"1.2.3.4:5\"",
        "'''",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..100_000 {
        let mut text = VALID.as_bytes().to_vec();
        for _ in 0..1 + next(4) {
            match next(7) {
                0 if !text.is_empty() => {
                    let at = next(text.len());
                    text[at] = next(256) as u8;
                }
                1 => {
                    let at = next(text.len() + 1);
                    text.insert(at, b"=[]\"'#\n.,{}0:/*"[next(15)]);
                }
                2 if !text.is_empty() => {
                    let at = next(text.len());
                    text.remove(at);
                }
                _ => {
                    let mut lines: Vec<String> = String::from_utf8_lossy(&text)
                        .lines()
                        .map(str::to_owned)
                        .collect();
                    if lines.is_empty() {
                        continue;
                    }
                    let at = next(lines.len());
                    match next(4) {
                        0 => {
                            lines.remove(at);
                        }
                        1 => lines.insert(at, lines[at].clone()),
                        2 => {
                            let other = next(lines.len());
                            lines.swap(at, other);
                        }
                        _ => {
                            if let Some((key, _)) = lines[at].split_once(" = ") {
                                lines[at] = format!("{key} = {}", ODD[next(ODD.len())]);
                            }
                        }
                    }
                    text = (lines.join("\n") + "\n").into_bytes();
                }
            }
        }
        let text = String::from_utf8_lossy(&text);
        match Policy::from_toml(&text, Path::new("/etc/killswitch/killswitch.toml")) {
            Ok(_) => accepted += 1,
            Err(e) => {
                rejected += 1;
                let line = e.to_string();
                assert!(
                    !line.contains('\n') && line.starts_with("/etc/killswitch/killswitch.toml"),
                    "input {i}: {line:?}\n{text}"
                );
                assert_eq!(killswitch::error::Error::from(e).exit_code(), 2);
            }
        }
    }
    eprintln!("100,000 mutated configs: {accepted} accepted, {rejected} rejected in one line");
    assert!(
        rejected > 50_000 && accepted > 1_000,
        "{accepted} / {rejected}"
    );
}

/// The commented configs in `examples/` a user starts from are valid and mean what their
/// comments say.
#[test]
fn every_example_config_is_valid_and_says_what_its_comment_says() {
    use killswitch::policy::Ipv6Mode;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let load = |name: &str| {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        Policy::from_toml(&text, &path).unwrap_or_else(|e| panic!("{e}"))
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "from-a-script.toml",
            "inbound-port.toml",
            "ipv6-block.toml",
            "lan-and-ntp.toml",
            "lan-with-dns.toml",
            "openvpn-one-server.toml",
            "per-app-scope.toml",
            "servers-by-hostname.toml",
            "vpn-client.toml",
        ]
    );
    // The script it replaces allowed the LAN wholesale; the config keeps DNS to it refused.
    let script = load("from-a-script.toml");
    assert_eq!(
        (
            script.servers.len(),
            script.lan.networks.len(),
            script.lan.dns
        ),
        (1, 1, false)
    );
    assert_eq!(script.ipv6, Ipv6Mode::Tunnel);
    let one = load("openvpn-one-server.toml");
    assert_eq!(
        (one.servers.len(), one.dhcp, one.lan.networks.len()),
        (1, true, 0)
    );
    let named = load("servers-by-hostname.toml");
    assert!(named
        .servers
        .iter()
        .all(|s| matches!(s.address, ServerAddress::Host(_))));
    assert_eq!(named.dns_servers.len(), 1);
    let lan = load("lan-and-ntp.toml");
    assert!(!lan.lan.dns && lan.lan.networks.len() == 2 && lan.ntp_servers.len() == 1);
    assert_eq!(lan.uplinks.as_ref().map(Vec::len), Some(2));
    assert!(load("lan-with-dns.toml").lan.dns);
    assert_eq!(load("ipv6-block.toml").ipv6, Ipv6Mode::Block);
    let inbound = load("inbound-port.toml");
    assert_eq!(inbound.inbound.len(), 1);
    assert!(!load("per-app-scope.toml").dhcp);
    assert_eq!(
        load("vpn-client.toml").vpn_client,
        Some(killswitch::policy::VpnClient {
            cgroup: Some(
                r"system.slice/system-openvpn\x2dclient.slice/openvpn-client@work.service".into()
            ),
            mark: Some(0xca6c),
        })
    );
}
