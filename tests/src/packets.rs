//! Crafted frames for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 + TCP/UDP/ICMP headers.
//! Checksums are left zero: the programs never look at them.

use std::net::{Ipv4Addr, Ipv6Addr};

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
