//! Reading the parts of a packet the policy looks at. Every read goes through
//! `bpf_skb_load_bytes`, which checks bounds at run time; anything unreadable is `None`.

use aya_ebpf::{cty::c_long, programs::sk_buff::SkBuff};
use killswitch_common::{
    Direction, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_EXTENSION_HEADERS,
};

/// `skb->protocol` values, stored in network byte order.
pub const ETH_P_IP: u32 = 0x0800u16.to_be() as u32;
pub const ETH_P_IPV6: u32 = 0x86ddu16.to_be() as u32;

/// Protocol value for "the IPv6 header chain could not be followed to its end".
pub const PROTOCOL_UNKNOWN: u8 = 255;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DESTINATION_OPTIONS: u8 = 60;

/// Headers that carry (or hide) another protocol after them and are not walked: ESP, AH, and
/// for IPv6 the other extension headers (Mobility, HIP, Shim6, the experimental 253/254), and
/// any extension header after a fragment header. The
/// transport behind them cannot be read, so it counts as unknown: a rule that needs a port
/// cannot allow it (UDP/53 behind AH is not "not DNS").
#[inline(always)]
fn hides_transport(protocol: u8, ipv6: bool) -> bool {
    matches!(protocol, 50 | 51)
        || ipv6
            && matches!(
                protocol,
                // The walked ones too: after a fragment header they are not walked.
                HOP_BY_HOP | ROUTING | FRAGMENT | DESTINATION_OPTIONS | 135 | 139 | 140 | 253 | 254
            )
}

/// The protocol as the filter may trust it.
#[inline(always)]
fn upper_layer(protocol: u8, ipv6: bool) -> u8 {
    if hides_transport(protocol, ipv6) {
        PROTOCOL_UNKNOWN
    } else {
        protocol
    }
}

/// Where a packet's bytes are read: a socket buffer whose IP header starts `base` bytes in (0 in
/// a cgroup program; the link-layer header's length on a device the guard watches), and the
/// ethertype of what starts there.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    skb: &'a SkBuff,
    base: usize,
    pub protocol: u32,
}

impl<'a> Frame<'a> {
    /// A cgroup program's packet: the IP header is at the start.
    #[inline(always)]
    pub fn network(skb: &'a SkBuff) -> Frame<'a> {
        Frame {
            skb,
            base: 0,
            protocol: skb.protocol(),
        }
    }

    /// A frame whose IP header (of ethertype `protocol`, network order) starts at `base`.
    #[inline(always)]
    pub fn at(skb: &'a SkBuff, base: usize, protocol: u32) -> Frame<'a> {
        Frame {
            skb,
            base,
            protocol,
        }
    }

    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        self.skb.load(self.base + offset)
    }
}

/// ICMP and ICMPv6 error types whose quoted packet decides their verdict.
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_TIME: u8 = 11;
const ICMPV6_UNREACHABLE: u8 = 1;
const ICMPV6_TOO_BIG: u8 = 2;
const ICMPV6_TIME: u8 = 3;

/// An IPv6 address (an IPv4 one IPv4-mapped, as the maps hold it): its 16 bytes in network
/// order, held as four words so that it is copied and compared a word at a time (as `[u8; 16]`
/// it is a byte at a time, and a comparison is a call to a byte loop).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Address(pub [u32; 4]);

/// The third word of every IPv4-mapped address, `::ffff:0:0/96`.
const MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Address {
    pub const fn from_bytes(bytes: [u8; 16]) -> Address {
        // SAFETY: any 16 bytes are four valid words.
        Address(unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(bytes) })
    }

    /// ::ffff:a.b.c.d from the IPv4 address's four bytes as they lie in the header.
    pub const fn mapped(v4: u32) -> Address {
        Address([0, 0, MAPPED, v4])
    }

    pub const fn bytes(self) -> [u8; 16] {
        // SAFETY: any four words are 16 valid bytes.
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.0) }
    }

    pub fn is_v4_mapped(self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == MAPPED
    }

    /// The first two bytes.
    pub fn prefix16(self) -> [u8; 2] {
        let first = self.0[0].to_ne_bytes();
        [first[0], first[1]]
    }
}

#[derive(Clone, Copy)]
pub struct Ports {
    pub local: u16,
    pub remote: u16,
}

/// The far end of a packet (destination on egress, source on ingress) and its transport.
///
/// Plain fields with explicit "known" flags instead of `Option`s: LLVM copies the undefined
/// payload of a `None`, and the verifier refuses reads of uninitialised registers.
pub struct Packet {
    pub ipv6: bool,
    /// IPv4 header options (a source route among them), or an IPv6 routing header with
    /// segments left: a second destination past the first hop. The transport is not read then.
    pub source_route: bool,
    /// Upper-layer protocol, or [`PROTOCOL_UNKNOWN`].
    pub protocol: u8,
    pub remote: Address,
    /// TCP/UDP ports were readable (not a non-first fragment, not behind an IPv6 fragment
    /// header, not truncated).
    ports_known: bool,
    local_port: u16,
    remote_port: u16,
    icmp_known: bool,
    icmp_type: u8,
    transport_offset: usize,
}

// Multi-byte fields are words as they lie in the header (network order): aligned, they are read
// a word at a time.

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    flags_fragment: u16,
    ttl: u8,
    protocol: u8,
    checksum: u16,
    src: u32,
    dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: Address,
    dst: Address,
}

/// A fixed header and the 4 bytes after it (the ports, the ICMP type, or the first extension
/// header), read with one helper call where two were made; a packet too short for it is read
/// as before, header first.
#[repr(C)]
#[derive(Clone, Copy)]
struct Start<H> {
    header: H,
    next: [u8; 4],
}

/// The 4 bytes after the fixed header when they were read with it. A plain flag, not an
/// `Option`, for the verifier's sake (see [`Packet`]).
#[derive(Clone, Copy)]
struct Next {
    known: bool,
    bytes: [u8; 4],
}

impl Next {
    const UNKNOWN: Next = Next {
        known: false,
        bytes: [0; 4],
    };
}

/// The header at `offset` and the 4 bytes after it when the packet has them.
#[inline(always)]
fn load_start<H: Copy>(frame: &Frame, offset: usize) -> Option<(H, Next)> {
    match frame.load::<Start<H>>(offset) {
        Ok(start) => Some((
            start.header,
            Next {
                known: true,
                bytes: start.next,
            },
        )),
        Err(_) => Some((frame.load::<H>(offset).ok()?, Next::UNKNOWN)),
    }
}

impl Packet {
    /// An IPv6 packet whose remote address is IPv4-mapped (::ffff:a.b.c.d). Such addresses
    /// belong to the socket API, not the wire; the maps hold IPv4 entries in that form, so these
    /// packets must never match an address entry.
    #[inline(always)]
    pub fn remote_is_v4_mapped(&self) -> bool {
        self.ipv6 && self.remote.is_v4_mapped()
    }

    /// Everything but the transport's offset as three numbers, for a call of the global
    /// function of steps 4-9 (which takes numbers only).
    #[inline(always)]
    pub fn to_words(&self) -> [u64; 3] {
        let pair = |a: u32, b: u32| u64::from(a) | u64::from(b) << 32;
        let Address([a, b, c, d]) = self.remote;
        [
            pair(a, b),
            pair(c, d),
            u64::from(self.ipv6)
                | u64::from(self.source_route) << 1
                | u64::from(self.ports_known) << 2
                | u64::from(self.icmp_known) << 3
                | u64::from(self.protocol) << 8
                | u64::from(self.icmp_type) << 16
                | u64::from(self.local_port) << 24
                | u64::from(self.remote_port) << 40,
        ]
    }

    /// The packet [`Packet::to_words`] gave, at transport offset 0: steps 4-9 read nothing more
    /// of the frame, and the global function has none to read.
    #[inline(always)]
    pub fn from_words([high, low, transport]: [u64; 3]) -> Packet {
        let bit = |n: u32| transport >> n & 1 != 0;
        Packet {
            ipv6: bit(0),
            source_route: bit(1),
            protocol: (transport >> 8) as u8,
            remote: Address([
                high as u32,
                (high >> 32) as u32,
                low as u32,
                (low >> 32) as u32,
            ]),
            ports_known: bit(2),
            local_port: (transport >> 24) as u16,
            remote_port: (transport >> 40) as u16,
            icmp_known: bit(3),
            icmp_type: (transport >> 16) as u8,
            transport_offset: 0,
        }
    }

    /// `None` when the IP header itself is unreadable or inconsistent.
    #[inline(always)]
    pub fn parse(frame: &Frame, direction: Direction) -> Option<Packet> {
        match frame.protocol {
            ETH_P_IP => Self::parse_v4(frame, 0, direction),
            ETH_P_IPV6 => Self::parse_v6(frame, 0, direction),
            _ => None,
        }
    }

    /// An ICMP/ICMPv6 error (destination unreachable, packet too big, time exceeded) of the
    /// packet's own family: its verdict depends on the packet it quotes.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        let Some(icmp_type) = self.icmp_type() else {
            return false;
        };
        if self.ipv6 {
            self.protocol == IPPROTO_ICMPV6
                && matches!(icmp_type, ICMPV6_UNREACHABLE | ICMPV6_TOO_BIG | ICMPV6_TIME)
        } else {
            self.protocol == IPPROTO_ICMP && matches!(icmp_type, ICMP_UNREACHABLE | ICMP_TIME)
        }
    }

    /// The packet an ICMP error quotes, as this host sent it; `None` for anything else.
    #[inline(always)]
    pub fn quoted(&self, frame: &Frame) -> Option<Packet> {
        if !self.is_icmp_error() {
            return None;
        }
        // The quoted packet follows the 8-byte ICMP header and has the outer packet's family.
        let offset = self.transport_offset + 8;
        if self.ipv6 {
            Self::parse_v6(frame, offset, Direction::Egress)
        } else {
            Self::parse_v4(frame, offset, Direction::Egress)
        }
    }

    /// What the IP header says; the transport is filled in by `read_transport`.
    #[inline(always)]
    fn network(ipv6: bool, protocol: u8, remote: Address, transport_offset: usize) -> Packet {
        Packet {
            ipv6,
            source_route: false,
            protocol,
            remote,
            ports_known: false,
            local_port: 0,
            remote_port: 0,
            icmp_known: false,
            icmp_type: 0,
            transport_offset,
        }
    }

    #[inline(always)]
    fn parse_v4(frame: &Frame, offset: usize, direction: Direction) -> Option<Packet> {
        let (ip, next) = load_start::<Ipv4Header>(frame, offset)?;
        let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
        if ip.version_ihl >> 4 != 4 || header_len < 20 {
            return None;
        }
        let remote = match direction {
            Direction::Egress => ip.dst,
            Direction::Ingress => ip.src,
        };
        let first_fragment = u16::from_be(ip.flags_fragment) & 0x1fff == 0;
        let protocol = upper_layer(ip.protocol, false);
        let mut packet = Packet::network(
            false,
            protocol,
            Address::mapped(remote),
            offset + header_len,
        );
        // Options are all but unused; loose and strict source routes are among them. Returning
        // at once keeps the verifier from carrying the flag through the rest of the parse.
        if header_len > 20 {
            packet.source_route = true;
            return Some(packet);
        }
        if first_fragment {
            packet.read_transport(frame, direction, next);
        }
        Some(packet)
    }

    #[inline(always)]
    fn parse_v6(frame: &Frame, offset: usize, direction: Direction) -> Option<Packet> {
        let (ip, mut next_bytes) = load_start::<Ipv6Header>(frame, offset)?;
        if ip.version_class_flow[0] >> 4 != 6 {
            return None;
        }
        let remote = match direction {
            Direction::Egress => ip.dst,
            Direction::Ingress => ip.src,
        };
        let mut packet = Packet::network(true, PROTOCOL_UNKNOWN, remote, offset + 40);
        let mut next = ip.next_header;
        for _ in 0..MAX_EXTENSION_HEADERS {
            match next {
                HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS => {
                    let header = if next_bytes.known {
                        next_bytes.bytes
                    } else {
                        let Ok(header) = frame.load::<[u8; 4]>(packet.transport_offset) else {
                            return Some(packet);
                        };
                        header
                    };
                    // What follows this header is read when it is needed.
                    next_bytes = Next::UNKNOWN;
                    // A routing header with segments left names another destination.
                    if next == ROUTING && header[3] != 0 {
                        packet.source_route = true;
                        return Some(packet);
                    }
                    next = header[0];
                    packet.transport_offset += (usize::from(header[1]) + 1) * 8;
                }
                FRAGMENT => {
                    // Any fragment: the protocol is known, the ports are not dependable.
                    if next_bytes.known {
                        packet.protocol = upper_layer(next_bytes.bytes[0], true);
                    } else if let Ok(header) = frame.load::<[u8; 2]>(packet.transport_offset) {
                        packet.protocol = upper_layer(header[0], true);
                    }
                    return Some(packet);
                }
                _ => break,
            }
        }
        if matches!(next, HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS | FRAGMENT) {
            // More extension headers than the bound: the transport stays unknown.
            return Some(packet);
        }
        packet.protocol = upper_layer(next, true);
        packet.read_transport(frame, direction, next_bytes);
        Some(packet)
    }

    #[inline(always)]
    /// `next`: the transport's first 4 bytes, when they were read with the IP header.
    fn read_transport(&mut self, frame: &Frame, direction: Direction, next: Next) {
        match self.protocol {
            IPPROTO_TCP | IPPROTO_UDP => {
                let ports = if next.known {
                    Ok(next.bytes)
                } else {
                    frame.load::<[u8; 4]>(self.transport_offset)
                };
                if let Ok(ports) = ports {
                    let src = u16::from_be_bytes([ports[0], ports[1]]);
                    let dst = u16::from_be_bytes([ports[2], ports[3]]);
                    (self.local_port, self.remote_port) = match direction {
                        Direction::Egress => (src, dst),
                        Direction::Ingress => (dst, src),
                    };
                    self.ports_known = true;
                }
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let icmp_type = if next.known {
                    Ok(next.bytes[0])
                } else {
                    frame.load::<u8>(self.transport_offset)
                };
                if let Ok(icmp_type) = icmp_type {
                    self.icmp_type = icmp_type;
                    self.icmp_known = true;
                }
            }
            _ => {}
        }
    }

    /// TCP/UDP ports, when readable.
    #[inline(always)]
    pub fn ports(&self) -> Option<Ports> {
        self.ports_known.then_some(Ports {
            local: self.local_port,
            remote: self.remote_port,
        })
    }

    /// UDP ports, when this is UDP with a readable header.
    #[inline(always)]
    pub fn udp_ports(&self) -> Option<Ports> {
        if self.protocol == IPPROTO_UDP {
            self.ports()
        } else {
            None
        }
    }

    /// The ICMP/ICMPv6 type, when readable.
    #[inline(always)]
    pub fn icmp_type(&self) -> Option<u8> {
        self.icmp_known.then_some(self.icmp_type)
    }

    /// TCP, UDP, or a transport we could not identify: something that may have ports.
    #[inline(always)]
    pub fn may_carry_ports(&self) -> bool {
        matches!(self.protocol, IPPROTO_TCP | IPPROTO_UDP | PROTOCOL_UNKNOWN)
    }

    #[inline(always)]
    pub fn may_be_tcp(&self) -> bool {
        matches!(self.protocol, IPPROTO_TCP | PROTOCOL_UNKNOWN)
    }

    /// The TCP flags byte, when this is TCP with a readable header.
    #[inline(always)]
    pub fn tcp_flags(&self, frame: &Frame) -> Option<u8> {
        if self.protocol != IPPROTO_TCP || !self.ports_known {
            return None;
        }
        frame.load::<u8>(self.transport_offset + 13).ok()
    }
}
