//! The kill switch's kernel side: one `cgroup_skb` program per direction.
//!
//! Each packet walks the SPEC's verdict order; the first step that matches decides, and exactly
//! one per-CPU counter (direction × reason) is incremented. A step is a small function over one
//! map. Everything not allowed by a step is dropped.
#![no_std]
#![no_main]

use aya_ebpf::{
    cty::c_void,
    helpers::bpf_get_netns_cookie,
    macros::{cgroup_skb, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::SkBuffContext,
};
use killswitch_common::{
    ipv4_mapped, Direction, InterfaceKey, Reason, ServerKey, Settings, ANY_PORT, ANY_PROTOCOL,
    COUNTER_ENTRIES, IPPROTO_TCP, IPPROTO_UDP, LOOPBACK_IFINDEX, MAX_INTERFACES, MAX_SERVERS,
};

const ALLOW: i32 = 1;
const DROP: i32 = 0;
/// `BPF_F_NO_PREALLOC`: the server map is large and usually almost empty.
const NO_PREALLOC: u32 = 1;
/// `skb->protocol` values, stored in network byte order.
const ETH_P_IP: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6: u32 = 0x86ddu16.to_be() as u32;

#[map]
static TUNNELS: HashMap<InterfaceKey, u8> = HashMap::pinned(MAX_INTERFACES, 0);
#[map]
static UPLINKS: HashMap<InterfaceKey, u8> = HashMap::pinned(MAX_INTERFACES, 0);
#[map]
static SERVERS: HashMap<ServerKey, u8> = HashMap::pinned(MAX_SERVERS, NO_PREALLOC);
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);

#[cgroup_skb]
pub fn egress(ctx: SkBuffContext) -> i32 {
    filter(&ctx, Direction::Egress)
}

#[cgroup_skb]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    filter(&ctx, Direction::Ingress)
}

#[inline(always)]
fn filter(ctx: &SkBuffContext, direction: Direction) -> i32 {
    let reason = classify(ctx, direction);
    count(direction, reason);
    if reason.allows() {
        ALLOW
    } else {
        DROP
    }
}

/// The verdict order of the SPEC; the first matching step wins.
#[inline(always)]
fn classify(ctx: &SkBuffContext, direction: Direction) -> Reason {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == LOOPBACK_IFINDEX {
        return Reason::Loopback;
    }
    let interface = InterfaceKey::new(netns_cookie(ctx), ifindex);
    if is_listed(&TUNNELS, &interface) {
        return Reason::Tunnel;
    }
    if uplinks_restricted() && !is_listed(&UPLINKS, &interface) {
        return Reason::NotUplink;
    }
    let Some(remote) = Remote::parse(ctx, direction) else {
        return Reason::Malformed;
    };
    if is_server(&remote) {
        return Reason::Server;
    }
    Reason::Default
}

/// The far end of a packet: destination on egress, source on ingress.
struct Remote {
    addr: [u8; 16],
    protocol: u8,
    /// `None` when the transport header cannot be read (non-first fragment, truncated, other
    /// protocol): only rules that need no port can then match.
    port: Option<u16>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    flags_fragment: [u8; 2],
    ttl: u8,
    protocol: u8,
    checksum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

impl Remote {
    #[inline(always)]
    fn parse(ctx: &SkBuffContext, direction: Direction) -> Option<Remote> {
        match ctx.skb.protocol() {
            ETH_P_IP => Self::parse_v4(ctx, direction),
            ETH_P_IPV6 => Self::parse_v6(ctx, direction),
            _ => None,
        }
    }

    #[inline(always)]
    fn parse_v4(ctx: &SkBuffContext, direction: Direction) -> Option<Remote> {
        let ip: Ipv4Header = ctx.load(0).ok()?;
        let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
        if ip.version_ihl >> 4 != 4 || header_len < 20 {
            return None;
        }
        let fragment_offset = u16::from_be_bytes(ip.flags_fragment) & 0x1fff;
        let addr = match direction {
            Direction::Egress => ip.dst,
            Direction::Ingress => ip.src,
        };
        let port = if fragment_offset == 0 {
            transport_port(ctx, header_len, ip.protocol, direction)
        } else {
            None
        };
        Some(Remote {
            addr: ipv4_mapped(addr),
            protocol: ip.protocol,
            port,
        })
    }

    #[inline(always)]
    fn parse_v6(ctx: &SkBuffContext, direction: Direction) -> Option<Remote> {
        let ip: Ipv6Header = ctx.load(0).ok()?;
        if ip.version_class_flow[0] >> 4 != 6 {
            return None;
        }
        let addr = match direction {
            Direction::Egress => ip.dst,
            Direction::Ingress => ip.src,
        };
        let port = transport_port(ctx, 40, ip.next_header, direction);
        Some(Remote {
            addr,
            protocol: ip.next_header,
            port,
        })
    }
}

/// The remote port of a TCP or UDP header at `offset`, if it is there.
#[inline(always)]
fn transport_port(
    ctx: &SkBuffContext,
    offset: usize,
    protocol: u8,
    direction: Direction,
) -> Option<u16> {
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let ports: [u8; 4] = ctx.load(offset).ok()?;
    Some(match direction {
        Direction::Egress => u16::from_be_bytes([ports[2], ports[3]]),
        Direction::Ingress => u16::from_be_bytes([ports[0], ports[1]]),
    })
}

/// Step 4: a server endpoint matches on address, then port (or any), then protocol (or any).
#[inline(always)]
fn is_server(remote: &Remote) -> bool {
    if remote.protocol != IPPROTO_TCP && remote.protocol != IPPROTO_UDP {
        return false;
    }
    if let Some(port) = remote.port {
        if server_listed(remote.addr, port, remote.protocol)
            || server_listed(remote.addr, port, ANY_PROTOCOL)
        {
            return true;
        }
    }
    server_listed(remote.addr, ANY_PORT, remote.protocol)
        || server_listed(remote.addr, ANY_PORT, ANY_PROTOCOL)
}

#[inline(always)]
fn server_listed(addr: [u8; 16], port: u16, protocol: u8) -> bool {
    SERVERS
        .get_ptr(ServerKey::new(addr, port, protocol))
        .is_some()
}

#[inline(always)]
fn is_listed(map: &HashMap<InterfaceKey, u8>, interface: &InterfaceKey) -> bool {
    map.get_ptr(interface).is_some()
}

#[inline(always)]
fn uplinks_restricted() -> bool {
    // SAFETY: array lookups of index 0 of a one-entry array always return a valid pointer.
    SETTINGS
        .get(0)
        .is_some_and(|settings| settings.uplinks_restricted != 0)
}

#[inline(always)]
fn netns_cookie(ctx: &SkBuffContext) -> u64 {
    // SAFETY: the helper only reads the context it is given.
    unsafe { bpf_get_netns_cookie(ctx.skb.skb as *mut c_void) }
}

#[inline(always)]
fn count(direction: Direction, reason: Reason) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason.counter_index(direction)) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
