//! The wire form of packets for BPF_PROG_TEST_RUN and raw sockets: Ethernet + IPv4/IPv6 +
//! TCP/UDP/ICMP headers, and the frame of a [`model::Packet`] as the program in its direction
//! sees it. Checksums are left zero: the programs never look at them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{self, Direction};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// An Ethernet frame carrying `payload` with `ethertype`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 packet; `fragment_offset` in 8-byte units.
pub fn ipv4(
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    fragment_offset: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&(fragment_offset & 0x1fff).to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

pub fn ipv6(next_header: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP (20 bytes) or UDP (8 bytes) header.
pub fn transport(protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    if protocol == TCP {
        h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        h.extend_from_slice(&[0, 8, 0, 0]);
    }
    h
}

/// An ICMP / ICMPv6 echo request.
pub fn echo_request() -> Vec<u8> {
    vec![8, 0, 0, 0, 0, 1, 0, 1]
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// The `__sk_buff` context for BPF_PROG_TEST_RUN, up to and including `ifindex` (the kernel
/// attaches the device with that ifindex in the caller's network namespace).
pub fn skb_context(ifindex: u32) -> Vec<u8> {
    skb_context_marked(ifindex, 0)
}

/// [`skb_context`] for a packet carrying the skb mark `mark`.
pub fn skb_context_marked(ifindex: u32, mark: u32) -> Vec<u8> {
    let mut ctx = [0u32; 11];
    ctx[2] = mark;
    ctx[10] = ifindex;
    ctx.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// How an uplink may carry an IP packet: the uplink guard reads it behind each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    Plain,
    /// One 802.1Q tag.
    Vlan,
    /// A PPPoE session (DSL).
    Pppoe,
    /// Both (PPPoE on a VLAN, as some DSL lines have it).
    VlanPppoe,
}

impl Carried {
    pub const ALL: [Carried; 4] = [
        Carried::Plain,
        Carried::Vlan,
        Carried::Pppoe,
        Carried::VlanPppoe,
    ];
}

const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_PPPOE_SESSION: u16 = 0x8864;

/// The Ethernet frame `frame` (as [`frame`] makes it) carried as `how` says.
pub fn carried(frame: &[u8], how: Carried) -> Vec<u8> {
    let (addresses, ethertype, payload) = (&frame[..12], &frame[12..14], &frame[14..]);
    let mut out = addresses.to_vec();
    if matches!(how, Carried::Vlan | Carried::VlanPppoe) {
        out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        out.extend_from_slice(&[0, 7]);
    }
    if matches!(how, Carried::Pppoe | Carried::VlanPppoe) {
        let ppp: u16 = if ethertype == ETH_P_IP.to_be_bytes() {
            0x0021
        } else {
            0x0057
        };
        out.extend_from_slice(&ETH_P_PPPOE_SESSION.to_be_bytes());
        out.extend_from_slice(&pppoe(ppp, payload));
    } else {
        out.extend_from_slice(ethertype);
        out.extend_from_slice(payload);
    }
    out
}

/// A PPPoE session header and PPP protocol `ppp`, then `payload`.
pub fn pppoe(ppp: u16, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() + 2) as u16;
    let mut out = vec![0x11, 0, 0x12, 0x34];
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&ppp.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A small deterministic generator (xorshift64*), so random tests are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

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
