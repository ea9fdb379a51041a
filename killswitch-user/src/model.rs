//! The executable specification: the SPEC's verdict order in plain Rust, over a packet described
//! by its wire facts. The kernel programs are tested against it packet by packet, and the
//! rendered rulesets will be too. It is never used to filter traffic.

use std::net::IpAddr;

pub use killswitch_common::{Direction, Reason};
use killswitch_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_EXTENSION_HEADERS,
};

use crate::policy::{Ipv6Mode, Policy, ServerAddress};

/// Protocol value for a transport the IPv6 header chain did not reveal.
pub const PROTOCOL_UNKNOWN: u8 = 255;

/// Which kind of interface the packet is on, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    Loopback,
    Tunnel,
    /// Listed in `uplinks` (any non-tunnel interface when `uplinks` is absent).
    Uplink,
    /// Neither a tunnel nor listed in `uplinks`.
    Other,
    /// An interface of another network namespace (a container's): never a tunnel or a listed
    /// uplink; when `uplinks` is absent it is an uplink without DHCP. With `[guard]` the
    /// cgroup programs pass it: the guard judges it on the uplink if the host forwards it there.
    OtherNamespace,
}

/// A packet as it is on the wire, from the point of view of one program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub direction: Direction,
    pub interface: Interface,
    /// Destination on egress, source on ingress; the family is the packet's.
    pub remote: IpAddr,
    /// The upper-layer protocol the sender put there.
    pub protocol: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// IPv4: a non-first fragment; IPv6: the packet has a fragment header.
    pub fragment: bool,
    /// IPv6 extension headers (destination options) before the transport header.
    pub extension_headers: u32,
    /// IPv4: the header carries options (a source route among them). IPv6: a routing header
    /// with segments left comes first in the chain. Either way the transport is not read.
    pub source_route: bool,
    /// For an ICMP/ICMPv6 error: the packet it quotes (which this host sent).
    pub quoted: Option<Quoted>,
    /// The packet's socket is in one of the `[vpn_client]`'s cgroups (or below one).
    pub vpn_client: bool,
    /// The packet's skb mark (0: unmarked).
    pub mark: u32,
}

/// The packet an ICMP error quotes: a plain (unfragmented, no extension headers) packet this host
/// sent, so its remote end is the quoted destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub remote: IpAddr,
    pub protocol: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub icmp_type: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Drop,
}

/// What the filter can know of the transport: the protocol, and the header when readable.
struct Transport {
    protocol: u8,
    readable: bool,
}

impl Packet {
    /// A plain packet a local socket (not the VPN client's) sends out of an uplink to
    /// `remote`:`remote_port` (a SYN for TCP): what `verify` asks the policy about.
    pub fn leaving_uplink(remote: IpAddr, protocol: u8, remote_port: u16) -> Packet {
        Packet {
            direction: Direction::Egress,
            interface: Interface::Uplink,
            remote,
            protocol,
            local_port: 40000,
            remote_port,
            tcp_flags: 0x02,
            icmp_type: 0,
            fragment: false,
            extension_headers: 0,
            source_route: false,
            quoted: None,
            vpn_client: false,
            mark: 0,
        }
    }

    fn transport(&self) -> Transport {
        let ipv6 = self.remote.is_ipv6();
        // A fragment header is one more extension header on the walk.
        let chain = self.extension_headers + u32::from(self.fragment);
        // ESP and AH, and IPv6's other extension headers, hide the transport behind them.
        let hidden = matches!(self.protocol, 50 | 51)
            || ipv6
                && matches!(
                    self.protocol,
                    0 | 43 | 44 | 60 | 135 | 139 | 140 | 253 | 254
                );
        if ipv6 && (chain > MAX_EXTENSION_HEADERS || self.source_route) || hidden {
            return Transport {
                protocol: PROTOCOL_UNKNOWN,
                readable: false,
            };
        }
        Transport {
            protocol: self.protocol,
            readable: !self.fragment && !self.source_route,
        }
    }

    fn ports(&self) -> Option<(u16, u16)> {
        let t = self.transport();
        (t.readable && matches!(t.protocol, IPPROTO_TCP | IPPROTO_UDP))
            .then_some((self.local_port, self.remote_port))
    }

    fn udp_ports(&self) -> Option<(u16, u16)> {
        (self.transport().protocol == IPPROTO_UDP)
            .then(|| self.ports())
            .flatten()
    }

    fn icmp_type(&self) -> Option<u8> {
        let t = self.transport();
        (t.readable && matches!(t.protocol, IPPROTO_ICMP | IPPROTO_ICMPV6))
            .then_some(self.icmp_type)
    }

    /// Destination unreachable, packet too big (IPv6) or time exceeded, with the ICMP of the
    /// packet's own family.
    fn is_icmp_error(&self) -> bool {
        let family_icmp = if self.remote.is_ipv6() {
            IPPROTO_ICMPV6
        } else {
            IPPROTO_ICMP
        };
        let error_types: &[u8] = if self.remote.is_ipv6() {
            &[1, 2, 3]
        } else {
            &[3, 11]
        };
        self.transport().protocol == family_icmp
            && self.icmp_type().is_some_and(|t| error_types.contains(&t))
    }

    /// The quoted packet as the egress program would have seen it leave.
    fn quoted_packet(&self) -> Option<Packet> {
        let q = self.quoted?;
        (q.remote.is_ipv6() == self.remote.is_ipv6()).then_some(Packet {
            direction: Direction::Egress,
            interface: self.interface,
            remote: q.remote,
            protocol: q.protocol,
            local_port: q.local_port,
            remote_port: q.remote_port,
            tcp_flags: 0,
            icmp_type: q.icmp_type,
            fragment: false,
            extension_headers: 0,
            source_route: false,
            quoted: None,
            vpn_client: true,
            mark: 0,
        })
    }
}

/// The verdict and the reason the SPEC gives `packet` under `policy`. Servers given by hostname
/// are not considered: resolution happens before the policy reaches the kernel.
pub fn verdict(policy: &Policy, packet: &Packet) -> (Verdict, Reason) {
    let reason = reason(policy, packet);
    (
        if reason.allows() {
            Verdict::Allow
        } else {
            Verdict::Drop
        },
        reason,
    )
}

fn reason(policy: &Policy, p: &Packet) -> Reason {
    let ipv6 = p.remote.is_ipv6();
    if p.interface == Interface::Loopback {
        return Reason::Loopback;
    }
    if ipv6 && policy.ipv6 == Ipv6Mode::Block {
        return Reason::Ipv6Blocked;
    }
    if p.interface == Interface::OtherNamespace && policy.guarded() {
        return Reason::OtherNamespace;
    }
    if p.interface == Interface::Tunnel {
        return match p.direction {
            Direction::Egress => Reason::Tunnel,
            Direction::Ingress => tunnel_ingress(policy, p),
        };
    }
    if policy.uplinks.is_some() && p.interface != Interface::Uplink {
        return Reason::NotUplink;
    }
    // A second destination past the first hop: never outside the tunnel.
    if p.source_route {
        return Reason::SourceRoute;
    }
    let reason = exception(policy, p);
    if reason != Reason::Default || p.direction == Direction::Egress {
        return reason;
    }
    // An ICMP error about a packet the egress policy allows (path-MTU discovery to a server);
    // whose socket sent the quoted packet is not known, so `[vpn_client]` is not asked.
    let quoted = p.is_icmp_error().then(|| p.quoted_packet()).flatten();
    match quoted {
        Some(q) if exception(policy, &q).allows() => Reason::IcmpError,
        _ => Reason::Default,
    }
}

/// An IPv6 address in ::ffff:0:0/96: the socket API's spelling of an IPv4 address, never a
/// real IPv6 peer. An IPv6 packet with such a remote address matches no address entry.
fn is_v4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// Steps 4-9: the exceptions that let a packet use an uplink.
fn exception(policy: &Policy, p: &Packet) -> Reason {
    if is_v4_mapped(p.remote) {
        return Reason::Default;
    }
    let protocol = p.transport().protocol;
    let remote = p.remote;
    let tcp_or_udp = matches!(protocol, IPPROTO_TCP | IPPROTO_UDP);

    // 4. servers
    let is_server = tcp_or_udp
        && policy.servers.iter().any(|s| {
            s.address == ServerAddress::Ip(remote)
                && s.protocol.is_none_or(|proto| proto.number() == protocol)
                && s.port
                    .is_none_or(|port| p.ports().is_some_and(|(_, r)| r == port))
        });
    // ...and under [vpn_client], only what the VPN client sends (egress: a reply to anyone
    // else is never answered)
    let client = match &policy.vpn_client {
        None => true,
        Some(c) => {
            p.direction == Direction::Ingress
                || p.vpn_client
                || c.mark.is_some_and(|mark| mark == p.mark)
        }
    };
    if is_server && client {
        return Reason::Server;
    }
    let reason = later_exception(policy, p);
    if is_server && reason == Reason::Default {
        return Reason::NotVpnClient;
    }
    reason
}

/// Steps 5-9.
fn later_exception(policy: &Policy, p: &Packet) -> Reason {
    let protocol = p.transport().protocol;
    let remote = p.remote;
    let tcp_or_udp = matches!(protocol, IPPROTO_TCP | IPPROTO_UDP);
    // 5. DHCP: requests only to where a server can be (broadcast or LAN; ff02::1:2 or
    // link-local), answers from anywhere; only in the scope's own namespace
    let in_lan = policy.lan.networks.iter().any(|n| n.contains(remote));
    if policy.dhcp && p.interface != Interface::OtherNamespace {
        if let Some((local, remote_port)) = p.udp_ports() {
            let (ports, reachable) = match remote {
                IpAddr::V6(v6) => (
                    (local, remote_port) == (546, 547),
                    v6 == "ff02::1:2".parse::<std::net::Ipv6Addr>().unwrap()
                        || v6.octets()[0] == 0xfe && v6.octets()[1] & 0xc0 == 0x80,
                ),
                IpAddr::V4(v4) => (
                    (local, remote_port) == (68, 67),
                    v4 == std::net::Ipv4Addr::BROADCAST || in_lan,
                ),
            };
            if ports && (p.direction == Direction::Ingress || reachable) {
                return Reason::Dhcp;
            }
        }
    }
    // 6. NTP
    if p.udp_ports().is_some_and(|(_, r)| r == 123) && policy.ntp_servers.contains(&remote) {
        return Reason::Ntp;
    }
    // 7. DNS servers
    let dns_port = |port: u16| port == 53 || port == 853;
    if p.ports().is_some_and(|(_, r)| dns_port(r)) && policy.dns_servers.contains(&remote) {
        return Reason::Dns;
    }
    // 8. LAN, except DNS unless lan.dns; an unreadable port could be DNS
    if in_lan {
        let may_carry_ports = tcp_or_udp || protocol == PROTOCOL_UNKNOWN;
        if policy.lan.dns || !may_carry_ports {
            return Reason::Lan;
        }
        match p.ports() {
            Some((_, r)) if dns_port(r) => return Reason::LanDns,
            Some(_) => return Reason::Lan,
            None => {}
        }
    }
    // 9. neighbour discovery
    if let (true, IpAddr::V6(v6)) = (protocol == IPPROTO_ICMPV6, remote) {
        let octets = v6.octets();
        let link_local = octets[0] == 0xfe && octets[1] & 0xc0 == 0x80;
        let link_multicast = octets[0] == 0xff && octets[1] == 0x02;
        if p.icmp_type().is_some_and(|t| (133..=137).contains(&t)) && (link_local || link_multicast)
        {
            return Reason::NeighbourDiscovery;
        }
    }
    Reason::Default
}

/// On the tunnel, unsolicited inbound TCP (SYN without ACK) only for `[[inbound]]`.
fn tunnel_ingress(policy: &Policy, p: &Packet) -> Reason {
    let protocol = p.transport().protocol;
    if protocol != IPPROTO_TCP && protocol != PROTOCOL_UNKNOWN {
        return Reason::Tunnel;
    }
    let Some((local, _)) = p.ports() else {
        return Reason::InboundRefused;
    };
    if p.tcp_flags & 0x12 != 0x02 {
        return Reason::Tunnel;
    }
    let allowed = policy.inbound.iter().any(|rule| {
        rule.port == local
            && (rule.sources.is_empty()
                || (!is_v4_mapped(p.remote) && rule.sources.contains(&p.remote)))
    });
    if allowed {
        Reason::Tunnel
    } else {
        Reason::InboundRefused
    }
}

/// What comes over an uplink, as the uplink guard sees it: its link layer, and the IP packet
/// when it is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// An IP packet (behind an Ethernet header, or bare on a device without one), with or
    /// without one VLAN tag.
    Ip(Packet),
    /// ARP, EAPOL (802.1X, WPA keys) or its pre-authentication.
    LinkControl,
    /// Any other ethertype (after at most one VLAN tag).
    Other,
}

/// The uplink guard's verdict: the uplink part of the policy for every frame on an uplink,
/// whoever sent it (a forwarded container or VM, a raw socket). An IP packet gets the verdict
/// the cgroup programs give it on an uplink of the scope's own namespace.
pub fn guard_verdict(policy: &Policy, frame: &Frame) -> (Verdict, Reason) {
    match frame {
        Frame::Ip(packet) => verdict(
            policy,
            &Packet {
                interface: Interface::Uplink,
                ..*packet
            },
        ),
        Frame::LinkControl => (Verdict::Allow, Reason::LinkControl),
        Frame::Other => (Verdict::Drop, Reason::NotIp),
    }
}

/// [`guard_verdict`] as `filter` gives it. Netfilter's guard (a netdev egress chain) holds
/// the server exception to a VPN client known by its mark alone (the packet's mark; and no
/// cgroup registered by `run --vpn-client`, which the model does not see); one known by a
/// cgroup cannot be asked for in a netdev hook, and the host's own sockets and what it
/// routes were held to it before (docs/guard.md). It reads only untagged frames: IP behind a
/// VLAN tag or in a PPPoE session is [`Frame::Other`] to it.
pub fn guard_verdict_of(filter: Filter, policy: &Policy, frame: &Frame) -> (Verdict, Reason) {
    match (filter, frame) {
        (Filter::Netfilter, Frame::Ip(packet)) => {
            let vpn_client = match &policy.vpn_client {
                Some(client) if client.cgroup.is_none() && client.mark.is_some() => {
                    client.mark == Some(packet.mark)
                }
                _ => true,
            };
            verdict_of(
                filter,
                policy,
                &Packet {
                    interface: Interface::Uplink,
                    vpn_client,
                    ..*packet
                },
            )
        }
        _ => guard_verdict(policy, frame),
    }
}

/// Whose reading of a packet: the eBPF programs', or netfilter's, which is stricter where it
/// cannot state a step the way the programs do (docs/backends.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Programs,
    /// The nft and iptables rulesets: an IPv6 packet with any extension header (a fragment
    /// header included) has a transport that is not read, and an ICMP error is never judged
    /// by the packet it quotes.
    Netfilter,
}

/// [`verdict`] as `filter` gives it.
pub fn verdict_of(filter: Filter, policy: &Policy, packet: &Packet) -> (Verdict, Reason) {
    match filter {
        Filter::Programs => verdict(policy, packet),
        Filter::Netfilter => {
            let mut p = *packet;
            if p.remote.is_ipv6() && (p.extension_headers > 0 || p.fragment) {
                // Destination options: a header that hides the transport behind it.
                p.protocol = 60;
            }
            p.quoted = None;
            verdict(policy, &p)
        }
    }
}
