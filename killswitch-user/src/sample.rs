//! Packets aimed at a policy: random wire facts, steered half the time at the policy's
//! exceptions and at the edges of its lists, so that every verdict step is reached. The property
//! tests and `killswitch verify` draw from here; the model says what each must get.

use std::net::IpAddr;

use crate::{
    model::{self, Direction, Interface},
    packets::{Rng, ICMP, ICMPV6, TCP, UDP},
    policy::Policy,
};

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
            crate::policy::ServerAddress::Ip(ip) => Some((ip, s.port, s.protocol)),
            crate::policy::ServerAddress::Host(_) => None,
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
            // Now and then an ICMP error from a router about a packet to the server (path-MTU
            // discovery): it is allowed only by what it quotes.
            if rng.below(4) == 0 {
                let ipv6 = ip.is_ipv6();
                let icmp = if ipv6 { ICMPV6 } else { ICMP };
                p.quoted = Some(model::Quoted {
                    remote: ip,
                    protocol: p.protocol,
                    local_port: p.local_port,
                    remote_port: p.remote_port,
                    icmp_type: 0,
                });
                p.remote = if ipv6 { pick(rng, v6) } else { pick(rng, v4) };
                (p.direction, p.interface) = (Direction::Ingress, Interface::Uplink);
                p.protocol = icmp;
                p.icmp_type = if ipv6 {
                    pick(rng, &[1, 2, 3])
                } else {
                    pick(rng, &[3, 11])
                };
                (p.fragment, p.source_route, p.extension_headers) = (false, false, 0);
                return p;
            }
            // Under [vpn_client], often a plain packet leaving by an uplink: who sent it decides.
            if let Some(client) = &policy.vpn_client {
                if rng.below(2) == 0 {
                    p.direction = Direction::Egress;
                    p.interface = Interface::Uplink;
                    (p.fragment, p.source_route, p.extension_headers) = (false, false, 0);
                }
                // The policy's own mark (and a near miss), whatever it is.
                if let Some(mark) = client.mark.filter(|_| rng.below(2) == 0) {
                    p.mark = pick(rng, &[mark, mark ^ 1]);
                }
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
        if let crate::policy::ServerAddress::Ip(ip) = server.address {
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
