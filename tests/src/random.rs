//! Random policies and packets for the property tests: every policy the config accepts, with
//! addresses from a few small ranges so that entries and packets meet, and the wire form of each
//! packet as the filter in its direction sees it.

use std::net::IpAddr;

use killswitch::{
    model::{self, Direction, Interface},
    policy::Policy,
};

use crate::packets::*;

/// This host's addresses in the packets.
pub const ME4: &str = "192.0.2.2";
pub const ME6: &str = "2001:db8:2::2";

/// Adds a loose source route option (through 192.0.2.77) to an IPv4 packet built by `ipv4`.
pub fn with_loose_source_route(packet: &mut Vec<u8>) {
    packet[0] = 0x47;
    let total = u16::from_be_bytes([packet[2], packet[3]]) + 8;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet.splice(20..20, [0x83, 7, 4, 192, 0, 2, 77, 0]);
}

pub const V4: &[&str] = &[
    "198.51.100.1",
    "198.51.100.2",
    "203.0.113.123",
    "203.0.113.53",
    "203.0.113.7",
    "192.168.77.1",
    "192.168.77.200",
    "192.168.78.1",
    "255.255.255.255",
    "203.0.113.9",
];
pub const V6: &[&str] = &[
    "2001:db8:100::1",
    "2001:db8:123::1",
    "2001:db8::53",
    "2001:db8:77::5",
    "2001:db8:78::5",
    "fe80::1",
    "ff02::1:2",
    "ff02::1:ff00:1",
    "ff02::2",
    "2001:db8:203::9",
    "2001:db8:203::7",
    // IPv4-mapped: never an IPv4 entry (server, LAN, NTP, DNS, inbound source).
    "::ffff:198.51.100.1",
    "::ffff:192.168.77.1",
    "::ffff:203.0.113.123",
    "::ffff:203.0.113.53",
    "::ffff:203.0.113.7",
];
pub const PORTS: &[u16] = &[
    53, 853, 67, 68, 123, 546, 547, 1194, 1195, 443, 22, 51234, 80,
];
pub const ICMP_TYPES: &[u8] = &[1, 2, 3, 3, 11, 8, 128, 133, 134, 135, 136, 137, 138];
pub const TCP_FLAGS: &[u8] = &[0x02, 0x12, 0x10, 0x11];

pub fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

/// The fixed address lists, parsed.
pub fn fixed() -> (Vec<IpAddr>, Vec<IpAddr>) {
    let parse = |list: &[&str]| list.iter().map(|a| a.parse().unwrap()).collect();
    (parse(V4), parse(V6))
}

pub fn random_packet(rng: &mut Rng, v4: &[IpAddr], v6: &[IpAddr]) -> model::Packet {
    let ipv6 = rng.below(2) == 0;
    let remote = if ipv6 { pick(rng, v6) } else { pick(rng, v4) };
    let icmp = if ipv6 { ICMPV6 } else { ICMP };
    let port = |rng: &mut Rng| {
        if rng.below(4) == 0 {
            1024 + rng.below(60000) as u16
        } else {
            pick(rng, PORTS)
        }
    };
    model::Packet {
        direction: if rng.below(2) == 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        interface: pick(
            rng,
            &[
                Interface::Loopback,
                Interface::Tunnel,
                Interface::Uplink,
                Interface::Other,
            ],
        ),
        remote,
        // 47 GRE; 50 ESP, 51 AH and 135 Mobility hide what follows them.
        protocol: pick(rng, &[TCP, UDP, TCP, UDP, icmp, icmp, 47, 50, 51, 135]),
        local_port: port(rng),
        remote_port: port(rng),
        tcp_flags: pick(rng, TCP_FLAGS),
        icmp_type: pick(rng, ICMP_TYPES),
        fragment: rng.below(6) == 0,
        extension_headers: if ipv6 {
            pick(rng, &[0, 0, 0, 1, 2, 5, 6, 7, 8])
        } else {
            0
        },
        source_route: rng.below(12) == 0,
        quoted: (rng.below(3) != 0).then(|| random_quoted(rng, ipv6, v4, v6)),
        vpn_client: rng.below(2) == 0,
        mark: pick(rng, &[0, 0, CLIENT_MARK, CLIENT_MARK + 1]),
    }
}

/// The `vpn_client.mark` random policies use.
pub const CLIENT_MARK: u32 = 0xca6c;

/// [`random_packet`] steered half the time at one of `policy`'s exceptions: a server's address
/// with its port and protocol, an NTP or DNS server on its port, a DHCP exchange, neighbour
/// discovery, an `[[inbound]]` port. Everything else stays random (direction, interface,
/// fragments, extension headers), so a packet aimed at an exception may still miss it.
pub fn steered_packet(
    rng: &mut Rng,
    policy: &Policy,
    v4: &[IpAddr],
    v6: &[IpAddr],
) -> model::Packet {
    let mut p = random_packet(rng, v4, v6);
    if rng.below(2) == 0 {
        return p;
    }
    let servers: Vec<_> = policy
        .servers
        .iter()
        .filter_map(|s| match s.address {
            killswitch::policy::ServerAddress::Ip(ip) => Some((ip, s.port, s.protocol)),
            killswitch::policy::ServerAddress::Host(_) => None,
        })
        .collect();
    let udp_or_tcp = |rng: &mut Rng| pick(rng, &[UDP, TCP]);
    match rng.below(6) {
        0 if !servers.is_empty() => {
            let (ip, port, protocol) = pick(rng, &servers);
            p.remote = ip;
            p.protocol = protocol.map_or_else(|| udp_or_tcp(rng), |p| p.number());
            if let Some(port) = port {
                p.remote_port = port;
            }
            // Under [vpn_client], often a plain packet leaving by an uplink: who sent it decides.
            if policy.vpn_client.is_some() && rng.below(2) == 0 {
                p.direction = Direction::Egress;
                p.interface = Interface::Uplink;
                (p.fragment, p.source_route, p.extension_headers) = (false, false, 0);
            }
        }
        1 if !policy.ntp_servers.is_empty() => {
            p.remote = pick(rng, &policy.ntp_servers);
            p.protocol = UDP;
            p.remote_port = 123;
        }
        2 if !policy.dns_servers.is_empty() => {
            p.remote = pick(rng, &policy.dns_servers);
            p.protocol = udp_or_tcp(rng);
            p.remote_port = pick(rng, &[53, 853]);
        }
        3 => {
            p.protocol = UDP;
            let ipv6 = p.remote.is_ipv6();
            (p.local_port, p.remote_port) = if ipv6 { (546, 547) } else { (68, 67) };
            if p.direction == Direction::Egress {
                p.remote = if ipv6 {
                    pick(rng, &["ff02::1:2", "fe80::1"]).parse().unwrap()
                } else {
                    "255.255.255.255".parse().unwrap()
                };
            }
        }
        4 => {
            p.remote = pick(rng, &["fe80::1", "ff02::1:ff00:1", "ff02::2"])
                .parse()
                .unwrap();
            p.protocol = ICMPV6;
            p.icmp_type = pick(rng, &[133, 134, 135, 136, 137]);
        }
        _ if !policy.inbound.is_empty() => {
            let rule = &policy.inbound[rng.below(policy.inbound.len() as u64) as usize];
            p.direction = Direction::Ingress;
            p.interface = Interface::Tunnel;
            p.protocol = TCP;
            p.tcp_flags = 0x02;
            p.local_port = rule.port;
            if !rule.sources.is_empty() && rng.below(2) == 0 {
                p.remote = pick(rng, &rule.sources);
            }
        }
        _ => {}
    }
    if p.remote.is_ipv4() {
        p.extension_headers = 0;
    }
    p
}

/// What an ICMP error quotes; now and then of the other family, which must not count.
pub fn random_quoted(rng: &mut Rng, ipv6: bool, v4: &[IpAddr], v6: &[IpAddr]) -> model::Quoted {
    let ipv6 = if rng.below(10) == 0 { !ipv6 } else { ipv6 };
    let remote = if ipv6 { pick(rng, v6) } else { pick(rng, v4) };
    let icmp = if ipv6 { ICMPV6 } else { ICMP };
    model::Quoted {
        remote,
        protocol: pick(rng, &[TCP, UDP, TCP, UDP, icmp, 47]),
        local_port: pick(rng, PORTS),
        remote_port: pick(rng, PORTS),
        icmp_type: pick(rng, ICMP_TYPES),
    }
}

/// An IP packet this host sent to `q.remote` (egress view), as an ICMP error quotes it.
pub fn quoted_frame(q: &model::Quoted) -> Vec<u8> {
    let l4 = match q.protocol {
        TCP | UDP => transport(q.protocol, q.local_port, q.remote_port),
        ICMP | ICMPV6 => vec![q.icmp_type, 0, 0, 0, 0, 0, 0, 0],
        _ => vec![0; 8],
    };
    match q.remote {
        IpAddr::V4(remote) => ipv4(q.protocol, ME4.parse().unwrap(), remote, 0, &l4),
        IpAddr::V6(remote) => ipv6(q.protocol, ME6.parse().unwrap(), remote, &l4),
    }
}

/// The wire form of a model packet, as the program in `packet.direction` sees it.
pub fn frame(p: &model::Packet) -> Vec<u8> {
    frame_with(p, &[])
}

/// [`frame`] with `trailer` after the transport header (and after the quoted packet of an ICMP
/// error): a tag that tells real packets apart without changing any verdict.
pub fn frame_with(p: &model::Packet, trailer: &[u8]) -> Vec<u8> {
    let (src_port, dst_port) = match p.direction {
        Direction::Egress => (p.local_port, p.remote_port),
        Direction::Ingress => (p.remote_port, p.local_port),
    };
    let l4 = match p.protocol {
        TCP => {
            let mut h = transport(TCP, src_port, dst_port);
            h[13] = p.tcp_flags;
            h
        }
        UDP => transport(UDP, src_port, dst_port),
        ICMP | ICMPV6 => {
            let mut h = vec![p.icmp_type, 0, 0, 0, 0, 0, 0, 0];
            h.extend(p.quoted.as_ref().map(quoted_frame).unwrap_or_default());
            h
        }
        _ => vec![0; 8],
    };
    let l4 = [l4.as_slice(), trailer].concat();
    match p.remote {
        IpAddr::V4(remote) => {
            let me = ME4.parse().unwrap();
            let (src, dst) = match p.direction {
                Direction::Egress => (me, remote),
                Direction::Ingress => (remote, me),
            };
            let offset = if p.fragment { 185 } else { 0 };
            let mut packet = ipv4(p.protocol, src, dst, offset, &l4);
            if p.source_route {
                with_loose_source_route(&mut packet);
            }
            ethernet(ETH_P_IP, &packet)
        }
        IpAddr::V6(remote) => {
            let me = ME6.parse().unwrap();
            let (src, dst) = match p.direction {
                Direction::Egress => (me, remote),
                Direction::Ingress => (remote, me),
            };
            // Destination-options headers, then the fragment header if any, then L4.
            // A routing header with one segment left first, when the packet has one.
            let mut chain: Vec<u8> = if p.source_route { vec![43] } else { vec![] };
            chain.extend((0..p.extension_headers).map(|_| 60));
            if p.fragment {
                chain.push(44);
            }
            chain.push(p.protocol);
            let mut payload = Vec::new();
            for pair in chain.windows(2) {
                if pair[0] == 44 {
                    payload.extend_from_slice(&[pair[1], 0, 0, 0, 0, 0, 0, 1]);
                } else if pair[0] == 43 {
                    payload.extend_from_slice(&[pair[1], 0, 4, 1, 0, 0, 0, 0]);
                } else {
                    payload.extend_from_slice(&[pair[1], 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            payload.extend_from_slice(&l4);
            ethernet(ETH_P_IPV6, &ipv6(chain[0], src, dst, &payload))
        }
    }
}

pub fn seed() -> u64 {
    std::env::var("KILLSWITCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) ^ 0xfeed)
}

/// A random policy the config accepts: uplinks or not, 0-4 servers with and without port and
/// protocol, 0-4 LAN prefixes of every accepted length (overlapping now and then), NTP and
/// DNS servers, inbound rules with and without sources, every setting. Addresses come from
/// a few small ranges so entries and packets meet.
///
/// One policy in three has a `[vpn_client]`: the mark [`CLIENT_MARK`], the cgroup `client`
/// (when given), or both.
pub fn random_policy(rng: &mut Rng, client: Option<&str>) -> String {
    let block = rng.below(5) == 0;
    // IPv6 entries are errors in block mode.
    let address = |rng: &mut Rng| {
        let ipv6 = !block && rng.below(2) == 0;
        random_address(rng, ipv6)
    };
    let prefix = |rng: &mut Rng| {
        let ipv6 = !block && rng.below(2) == 0;
        random_prefix(rng, ipv6)
    };
    let mut text = String::from("tunnels = [\"tun0\"]\n");
    if rng.below(2) == 0 {
        text.push_str("uplinks = [\"up0\"]\n");
    }
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..rng.below(5) {
        // A server may not be link-local (fe80::/10).
        let address = match address(rng) {
            IpAddr::V6(v6) if v6.segments()[0] == 0xfe80 => {
                IpAddr::V6((u128::from(v6) ^ 0xfe80u128 << 112 | 0x2001_0db8u128 << 96).into())
            }
            other => other,
        };
        let port = (rng.below(2) == 0).then(|| pick(rng, PORTS));
        let protocol = pick(rng, &[None, Some("udp"), Some("tcp")]);
        if servers.insert((address, port, protocol)) {
            text.push_str(&format!("[[server]]\naddress = \"{address}\"\n"));
            if let Some(port) = port {
                text.push_str(&format!("port = {port}\n"));
            }
            if let Some(protocol) = protocol {
                text.push_str(&format!("protocol = \"{protocol}\"\n"));
            }
        }
    }
    let mut lan = std::collections::BTreeSet::new();
    for _ in 0..rng.below(5) {
        lan.insert(prefix(rng));
    }
    let quoted = |items: Vec<String>| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    text.push_str(&format!(
        "[lan]\nnetworks = [{}]\ndns = {}\n",
        quoted(lan.into_iter().collect()),
        rng.below(2) == 0
    ));
    text.push_str(&format!("[dhcp]\nenabled = {}\n", rng.below(3) != 0));
    for section in ["ntp", "dns"] {
        let addresses: std::collections::BTreeSet<String> = (0..rng.below(3))
            .map(|_| address(rng).to_string())
            .collect();
        text.push_str(&format!(
            "[{section}]\nservers = [{}]\n",
            quoted(addresses.into_iter().collect())
        ));
    }
    text.push_str(&format!(
        "[ipv6]\nmode = \"{}\"\n",
        if block { "block" } else { "tunnel" }
    ));
    let mut ports = std::collections::BTreeSet::new();
    for _ in 0..rng.below(3) {
        let port = pick(rng, &[22, 51234, 443, 80]);
        if !ports.insert(port) {
            continue;
        }
        text.push_str(&format!("[[inbound]]\nport = {port}\n"));
        if rng.below(2) == 0 {
            let source = address(rng);
            text.push_str(&format!("sources = [\"{source}\"]\n"));
        }
    }
    if rng.below(3) == 0 {
        text.push_str("[vpn_client]\n");
        match (client, rng.below(3)) {
            (Some(cgroup), 0) => text.push_str(&format!("cgroup = \"{cgroup}\"\n")),
            (Some(cgroup), 1) => {
                text.push_str(&format!("cgroup = \"{cgroup}\"\nmark = {CLIENT_MARK:#x}\n"))
            }
            _ => text.push_str(&format!("mark = {CLIENT_MARK:#x}\n")),
        }
    }
    text
}

/// An address in one of a few small ranges (so that entries overlap and packets hit them).
pub fn random_address(rng: &mut Rng, ipv6: bool) -> IpAddr {
    if ipv6 {
        let base: u128 = pick(
            rng,
            &[
                0x2001_0db8_0000_0000_0000_0000_0000_0000,
                0x2001_0db8_0077_0000_0000_0000_0000_0000,
                0xfd00_0000_0000_0000_0000_0000_0000_0000,
                0xfe80_0000_0000_0000_0000_0000_0000_0000,
            ],
        );
        IpAddr::V6((base | u128::from(rng.below(4)) << 64 | u128::from(rng.below(8))).into())
    } else {
        let base: u32 = pick(rng, &[0xc633_6400, 0xcb00_7100, 0xc0a8_4d00, 0x0a00_0000]);
        IpAddr::V4((base | rng.below(8) as u32 | (rng.below(2) as u32) << 16).into())
    }
}

/// A prefix the config accepts: IPv4 /8-/32 in 10/8, /16-/32 elsewhere; IPv6
/// /7-/128 in fc00::/7, /10-/128 in fe80::/10, /32-/128 elsewhere.
pub fn random_prefix(rng: &mut Rng, ipv6: bool) -> String {
    let address = random_address(rng, ipv6);
    match address {
        IpAddr::V4(v4) => {
            // 10/8 may be a LAN whole; every other base range allows a /16 at most.
            let shortest = if v4.octets()[0] == 10 { 8 } else { 16 };
            let len = shortest + rng.below(33 - u64::from(shortest)) as u32;
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let shortest = match v6.segments()[0] {
                0xfd00 => 7,
                0xfe80 => 10,
                _ => 32,
            };
            let len = shortest + rng.below(129 - u64::from(shortest)) as u32;
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// Addresses aimed at and around every entry of `policy`: each address and its neighbours,
/// each prefix's first and last address and the ones just outside, the IPv4-mapped form of
/// IPv4 entries, and the fixed lists.
pub fn aimed(policy: &Policy) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let (mut v4, mut v6) = fixed();
    let mut add = |ip: IpAddr| match ip {
        IpAddr::V4(a) => {
            v4.push(ip);
            v6.push(IpAddr::V6(a.to_ipv6_mapped()));
        }
        IpAddr::V6(_) => v6.push(ip),
    };
    let around = |ip: IpAddr, delta: i128| -> IpAddr {
        match ip {
            IpAddr::V4(a) => {
                IpAddr::V4(((i128::from(u32::from(a)) + delta).rem_euclid(1 << 32) as u32).into())
            }
            IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(delta as u128)).into()),
        }
    };
    let mut singles: Vec<IpAddr> = policy.ntp_servers.clone();
    singles.extend(&policy.dns_servers);
    for server in &policy.servers {
        if let killswitch::policy::ServerAddress::Ip(ip) = server.address {
            singles.push(ip);
        }
    }
    for rule in &policy.inbound {
        singles.extend(&rule.sources);
    }
    for ip in singles {
        for delta in [-1, 0, 1] {
            add(around(ip, delta));
        }
    }
    for prefix in &policy.lan.networks {
        let bits = if prefix.addr.is_ipv4() { 32 } else { 128 };
        let size: i128 = if bits - u32::from(prefix.len) >= 127 {
            i128::MAX
        } else {
            1i128 << (bits - u32::from(prefix.len))
        };
        for delta in [-1, 0, 1, size / 2, size - 1, size] {
            add(around(prefix.addr, delta));
        }
    }
    (v4, v6)
}
