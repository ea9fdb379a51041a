//! The kill switch's kernel side: one `cgroup_skb` program per direction.
//!
//! Each packet walks the SPEC's verdict order; the first step that matches decides, and exactly
//! one per-CPU counter (direction × reason) is incremented. A step is a small function over one
//! map. Everything not allowed by a step is dropped.
#![no_std]
#![no_main]

mod events;
mod guard;
mod netns;
mod packet;
mod trace;

use aya_ebpf::{
    macros::{cgroup_skb, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, ProgramArray},
    programs::{sk_buff::SkBuff, SkBuffContext},
};
use killswitch_common::{
    lists, tunnel_bit, Direction, InboundKey, InterfaceKey, NamedServerKey, Reason, ServerKey,
    Settings, ANY_PORT, ANY_PROTOCOL, COUNTER_ENTRIES, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    LOCKDOWN_REASON_BYTES, LOOPBACK_IFINDEX, MAX_ADDRESSES, MAX_INTERFACES, MAX_PREFIXES,
    MAX_SERVERS, MAX_VPN_CLIENTS, MAX_VPN_CLIENT_LEVEL,
};
use netns::{Helper, NetnsSource, Socket};
use packet::{Address, Frame, Packet, Ports, ETH_P_IPV6};

const ALLOW: i32 = 1;
const DROP: i32 = 0;
/// `BPF_F_NO_PREALLOC`: the server maps are large and usually almost empty.
const NO_PREALLOC: u32 = 1;

#[map]
static TUNNELS: HashMap<InterfaceKey, u8> = HashMap::pinned(MAX_INTERFACES, 0);
#[map]
static UPLINKS: HashMap<InterfaceKey, u8> = HashMap::pinned(MAX_INTERFACES, 0);
#[map]
static SERVERS: HashMap<ServerKey, u8> = HashMap::pinned(MAX_SERVERS, NO_PREALLOC);
#[map]
static NTP_SERVERS: HashMap<Address, u8> = HashMap::pinned(MAX_ADDRESSES, 0);
#[map]
static DNS_SERVERS: HashMap<Address, u8> = HashMap::pinned(MAX_ADDRESSES, 0);
/// Keyed by 128-bit prefixes: an IPv4 prefix is IPv4-mapped (`/96 + len`).
#[map]
static LAN: LpmTrie<Address, u8> = LpmTrie::pinned(MAX_PREFIXES, 0);
#[map]
static INBOUND: HashMap<InboundKey, u8> = HashMap::pinned(MAX_ADDRESSES, 0);
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);
/// Which hostname put which server entry there, for `up` and the daemon; the programs never
/// read it. One entry more than `SERVERS`: the `servers` command's mark always fits.
#[map]
static SERVER_NAMES: HashMap<NamedServerKey, u8> = HashMap::pinned(MAX_SERVERS + 1, NO_PREALLOC);
/// The ICMP-error programs by [`NetnsSource::ICMP_ERROR_SLOT`], reached by tail call (see
/// [`judge_icmp_error`]).
#[map]
static ICMP_ERRORS: ProgramArray = ProgramArray::pinned(2, 0);
/// The `[vpn_client]`'s cgroups by id: with `Settings::vpn_client`, only their sockets (and
/// their descendants') get the server exception.
#[map]
static VPN_CLIENTS: HashMap<u64, u8> = HashMap::pinned(MAX_VPN_CLIENTS, 0);
/// Why the scope is in lockdown, for `status`; the programs never read it.
#[map]
static LOCKDOWN: Array<[u8; LOCKDOWN_REASON_BYTES]> = Array::pinned(1, 0);
/// When the tunnel entries last changed (`CLOCK_REALTIME` ns), for `status`; the programs
/// never read it.
#[map]
static TUNNELS_CHANGED: Array<u64> = Array::pinned(1, 0);
/// The fingerprint of the policy the maps were last written from (`up`, a reload), so that the
/// daemon writes under its own only while it is the one in force; the programs never read it.
#[map]
static POLICY: Array<u64> = Array::pinned(1, 0);

// One pair per way of learning the packet's network namespace (see netns.rs); the loader
// loads the pair the kernel supports. Names stay within the kernel's 15 characters.

#[cgroup_skb]
pub fn egress(ctx: SkBuffContext) -> i32 {
    filter::<Helper>(&ctx, Direction::Egress)
}

#[cgroup_skb]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    filter::<Helper>(&ctx, Direction::Ingress)
}

#[cgroup_skb]
pub fn egress_sock(ctx: SkBuffContext) -> i32 {
    filter::<Socket>(&ctx, Direction::Egress)
}

#[cgroup_skb]
pub fn ingress_sock(ctx: SkBuffContext) -> i32 {
    filter::<Socket>(&ctx, Direction::Ingress)
}

// An ICMP error on an uplink that no exception allows is judged by the packet it quotes. That
// second parse, inlined in `ingress`, made the verifier's work four times larger (it walks it
// for every way the first one can end); in a program of its own, reached by tail call, it is
// verified once, and beside the others. An empty slot makes the tail call fall through: drop.

#[cgroup_skb]
pub fn icmp_error(ctx: SkBuffContext) -> i32 {
    judge_icmp_error::<Helper>(&ctx)
}

#[cgroup_skb]
pub fn icmp_error_sock(ctx: SkBuffContext) -> i32 {
    judge_icmp_error::<Socket>(&ctx)
}

/// Reached only from `ingress` for an ICMP error on an uplink that no exception allowed: it
/// passes when the packet it quotes is one egress lets out (path-MTU discovery towards a
/// server); a source-routed one never is.
#[inline(always)]
fn judge_icmp_error<N: NetnsSource>(ctx: &SkBuffContext) -> i32 {
    let settings = settings();
    let own_netns = N::cookie(ctx) == settings.netns_cookie;
    let frame = Frame::network(&ctx.skb);
    let quoted = Packet::parse(&frame, Direction::Ingress).and_then(|packet| packet.quoted(&frame));
    let reason = match quoted {
        Some(quoted)
            if !quoted.source_route
                && exception_once(&quoted, Direction::Egress, &settings, own_netns, true)
                    .allows() =>
        {
            Reason::IcmpError
        }
        _ => Reason::Default,
    };
    verdict::<N>(ctx, Direction::Ingress, reason, &settings)
}

/// The benchmark's floor, never attached by killswitch: it only counts and allows, the least a
/// cgroup_skb program that keeps counters does. Every path's cost is reported against it.
#[cgroup_skb]
pub fn floor(_ctx: SkBuffContext) -> i32 {
    count(Direction::Egress, Reason::Tunnel);
    ALLOW
}

/// The benchmark's hook alone, never attached by killswitch: it allows and does nothing else,
/// so it shows what the kernel's cgroup_skb hook costs before any program's work.
#[cgroup_skb]
pub fn empty(_ctx: SkBuffContext) -> i32 {
    ALLOW
}

// Lockdown: what a scope gets when its policy cannot be enforced (the kernel refused the
// programs at a first `up`): loopback and DHCP only, with nothing a kernel might lack.

#[cgroup_skb]
pub fn egress_locked(ctx: SkBuffContext) -> i32 {
    lockdown(&ctx, Direction::Egress)
}

#[cgroup_skb]
pub fn ingress_locked(ctx: SkBuffContext) -> i32 {
    lockdown(&ctx, Direction::Ingress)
}

/// Lockdown's DHCP is narrower than the policy's: v4 requests only to the broadcast address
/// (v6: ff02::1:2 or link-local), so nothing bound to port 68 can talk to an internet host. A
/// lease is then renewed by rebinding (broadcast) instead of unicast renewal.
#[inline(always)]
fn lockdown(ctx: &SkBuffContext, direction: Direction) -> i32 {
    let reason = if ifindex(ctx) == LOOPBACK_IFINDEX {
        Reason::Loopback
    } else {
        match Packet::parse(&Frame::network(&ctx.skb), direction) {
            // Lockdown has no LAN: its v4 requests go to the broadcast address only.
            Some(packet)
                if is_dhcp(&packet, direction)
                    && (direction == Direction::Ingress
                        || packet.ipv6
                        || packet.remote == BROADCAST) =>
            {
                Reason::Dhcp
            }
            _ => Reason::Default,
        }
    };
    count(direction, reason);
    if reason.allows() {
        ALLOW
    } else {
        DROP
    }
}

#[inline(always)]
fn filter<N: NetnsSource>(ctx: &SkBuffContext, direction: Direction) -> i32 {
    let settings = settings();
    let reason = match classify::<N>(ctx, direction, &settings) {
        Some(reason) => reason,
        None => {
            // SAFETY: the context is this program's; on success the call does not return.
            unsafe { ICMP_ERRORS.tail_call(ctx, N::ICMP_ERROR_SLOT) };
            Reason::Default
        }
    };
    verdict::<N>(ctx, direction, reason, &settings)
}

/// Counts the packet under its reason and reports a drop.
#[inline(always)]
fn verdict<N: NetnsSource>(
    ctx: &SkBuffContext,
    direction: Direction,
    reason: Reason,
    settings: &Settings,
) -> i32 {
    count(direction, reason);
    trace::verdict(ctx, || N::cookie(ctx), direction, reason);
    if reason.allows() {
        ALLOW
    } else {
        events::report(ctx, || N::cookie(ctx), direction, reason, settings);
        DROP
    }
}

/// The verdict order of the SPEC; the first matching step wins. `None`: an ICMP error on an
/// uplink that only the packet it quotes can allow (judged by `judge_icmp_error`).
#[inline(always)]
fn classify<N: NetnsSource>(
    ctx: &SkBuffContext,
    direction: Direction,
    settings: &Settings,
) -> Option<Reason> {
    let ifindex = ifindex(ctx);
    if ifindex == LOOPBACK_IFINDEX {
        return Some(Reason::Loopback);
    }
    if settings.ipv6_block != 0 && ctx.skb.protocol() == ETH_P_IPV6 {
        return Some(Reason::Ipv6Blocked);
    }
    // Only packets that are not on loopback pay for learning the namespace.
    let interface = InterfaceKey::new(N::cookie(ctx), ifindex);
    // A container's own interfaces lead only to the host, which forwards what they send
    // through the tunnel or past the guard on an uplink. Cookie 0 (unknown) is never another
    // namespace.
    if settings.guard != 0
        && interface.netns_cookie != settings.netns_cookie
        && interface.netns_cookie != 0
    {
        return Some(Reason::OtherNamespace);
    }
    // Most packets leave by an uplink: its ifindex's bit says no tunnel could match.
    if settings.tunnel_free & tunnel_bit(ifindex) == 0 && TUNNELS.get_ptr(&interface).is_some() {
        return Some(match direction {
            Direction::Egress => Reason::Tunnel,
            Direction::Ingress => tunnel_ingress(
                &Frame::network(&ctx.skb),
                settings.empty_lists & lists::INBOUND == 0,
            ),
        });
    }
    if settings.uplinks_restricted != 0 && UPLINKS.get_ptr(&interface).is_none() {
        return Some(Reason::NotUplink);
    }
    // Only what leaves is held to the VPN client: a reply to anyone else is never answered.
    // Asked before the parse, so the verifier walks its loop for a handful of states rather
    // than once for every way of parsing a packet (on 6.18: 28,000 processed instructions for
    // egress instead of 59,000).
    let client = direction == Direction::Ingress
        || settings.vpn_client == 0
        || is_vpn_client(&ctx.skb, settings);
    let Some(packet) = Packet::parse(&Frame::network(&ctx.skb), direction) else {
        return Some(Reason::Malformed);
    };
    if packet.source_route {
        return Some(Reason::SourceRoute);
    }
    // DHCP only on the scope's own namespace's interfaces, never on a container's.
    let own_netns = interface.netns_cookie == settings.netns_cookie;
    let reason = exception_once(&packet, direction, settings, own_netns, client);
    if reason != Reason::Default || direction == Direction::Egress || !packet.is_icmp_error() {
        return Some(reason);
    }
    None
}

/// Steps 4-9: the exceptions that let a packet use an uplink. `asked.client`: whether the
/// packet may use the server exception.
#[inline(always)]
fn exception(packet: &Packet, asked: Asked) -> Reason {
    if packet.remote_is_v4_mapped() {
        return Reason::Default;
    }
    let server = is_server(packet, asked.empty_lists);
    if server && asked.client {
        return Reason::Server;
    }
    let reason = later_exception(packet, asked);
    if server && reason == Reason::Default {
        return Reason::NotVpnClient;
    }
    reason
}

/// What steps 4-9 read besides the packet: three of the settings, the direction, whether the
/// interface is the scope's own namespace's (DHCP) and whether the socket may use the server
/// exception. All of it fits in one number for [`killswitch_exception`].
#[derive(Clone, Copy)]
struct Asked {
    empty_lists: u32,
    dhcp: bool,
    lan_dns: bool,
    direction: Direction,
    own_netns: bool,
    client: bool,
}

impl Asked {
    #[inline(always)]
    fn to_word(self) -> u64 {
        u64::from(self.empty_lists)
            | u64::from(self.dhcp) << 32
            | u64::from(self.lan_dns) << 33
            | u64::from(self.direction == Direction::Ingress) << 34
            | u64::from(self.own_netns) << 35
            | u64::from(self.client) << 36
    }

    #[inline(always)]
    fn from_word(word: u64) -> Asked {
        let bit = |n: u32| word >> n & 1 != 0;
        Asked {
            empty_lists: word as u32,
            dhcp: bit(32),
            lan_dns: bit(33),
            direction: if bit(34) {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            own_netns: bit(35),
            client: bit(36),
        }
    }
}

/// [`exception`] through [`killswitch_exception`], which the verifier checks once for any
/// packet rather than once for every way a parse can end.
#[inline(always)]
fn exception_once(
    packet: &Packet,
    direction: Direction,
    settings: &Settings,
    own_netns: bool,
    client: bool,
) -> Reason {
    let asked = Asked {
        empty_lists: settings.empty_lists,
        dhcp: settings.dhcp != 0,
        lan_dns: settings.lan_dns != 0,
        direction,
        own_netns,
        client,
    };
    let [remote_high, remote_low, transport] = packet.to_words();
    let reason = killswitch_exception(remote_high, remote_low, transport, asked.to_word());
    // Read back through memory, so that LLVM, which sees the function's body, cannot drop the
    // check below: root can replace a global function (freplace), so its answers may be any.
    // SAFETY: a local read once.
    let reason = unsafe { core::ptr::read_volatile(&reason) };
    Reason::from_value(reason).unwrap_or(Reason::Default)
}

/// Steps 4-9 as a global BPF function (exported: global linkage in the object's BTF). Numbers
/// only: no pointer the verifier would hold to a caller's stack or let be null, and no context,
/// so no need for the kernel's BTF.
#[no_mangle]
#[inline(never)]
pub extern "C" fn killswitch_exception(
    remote_high: u64,
    remote_low: u64,
    transport: u64,
    asked: u64,
) -> u32 {
    let packet = Packet::from_words([remote_high, remote_low, transport]);
    exception(&packet, Asked::from_word(asked)) as u32
}

/// Step 4's condition under `[vpn_client]`: the packet carries the client's mark, or its
/// socket's cgroup is a client's or below one.
#[inline(always)]
fn is_vpn_client(skb: &SkBuff, settings: &Settings) -> bool {
    // SAFETY: the context pointer is valid for the whole program run.
    let mark = unsafe { (*skb.skb).mark };
    if settings.vpn_client_mark != 0 && mark == settings.vpn_client_mark {
        return true;
    }
    settings.vpn_client_levels != 0 && vpn_client_ancestor(skb.skb, settings.vpn_client_levels)
}

/// Whether one of the socket's cgroup's ancestors at `levels` (bit n: level n) is a VPN client.
/// A BPF subprogram, not inlined: inlined, each way out of the loop went on through the rest
/// of the program as a verifier state of its own; a subprogram hands back only its answer
/// (egress on 6.18: 26,037 processed instructions, 18,122 this way). Not a global function,
/// which would be checked once but needs the kernel's BTF to take the context as an argument.
#[inline(never)]
fn vpn_client_ancestor(skb: *mut aya_ebpf::bindings::__sk_buff, levels: u32) -> bool {
    let mut level = 1;
    while level <= MAX_VPN_CLIENT_LEVEL {
        // Every packet that leaves by an uplink comes here: stop after the deepest level.
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) != 0 {
            // SAFETY: a helper call on this program's own context; 0 when there is no socket.
            let id = unsafe { aya_ebpf::helpers::bpf_skb_ancestor_cgroup_id(skb, level as i32) };
            if id != 0 && VPN_CLIENTS.get_ptr(&id).is_some() {
                return true;
            }
        }
        level += 1;
    }
    false
}

/// Steps 5-9.
#[inline(always)]
fn later_exception(packet: &Packet, asked: Asked) -> Reason {
    if asked.dhcp && asked.own_netns && is_dhcp(packet, asked.direction) {
        return Reason::Dhcp;
    }
    if asked.empty_lists & lists::NTP == 0 && is_ntp(packet) {
        return Reason::Ntp;
    }
    if asked.empty_lists & lists::DNS == 0 && is_dns_server(packet) {
        return Reason::Dns;
    }
    if asked.empty_lists & lists::LAN == 0 {
        if let Some(reason) = lan(packet, asked.lan_dns) {
            return reason;
        }
    }
    if is_neighbour_discovery(packet) {
        return Reason::NeighbourDiscovery;
    }
    Reason::Default
}

/// On the tunnel, unsolicited TCP (SYN without ACK) is accepted only for `[[inbound]]` ports.
#[inline(always)]
fn tunnel_ingress(frame: &Frame, inbound_listed: bool) -> Reason {
    let Some(packet) = Packet::parse(frame, Direction::Ingress) else {
        return Reason::Tunnel;
    };
    if !packet.may_be_tcp() {
        return Reason::Tunnel;
    }
    // A TCP packet whose header cannot be read could be a SYN: it cannot be allowed by port.
    let Some(ports) = packet.ports() else {
        return Reason::InboundRefused;
    };
    match packet.tcp_flags(frame) {
        Some(flags) if flags & (TCP_SYN | TCP_ACK) != TCP_SYN => Reason::Tunnel,
        Some(_) if inbound_listed && inbound_allowed(&packet, ports.local) => Reason::Tunnel,
        _ => Reason::InboundRefused,
    }
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn inbound_allowed(packet: &Packet, port: u16) -> bool {
    // An IPv4-mapped IPv6 source must not pass for the IPv4 source an entry names.
    (!packet.remote_is_v4_mapped()
        && INBOUND
            .get_ptr(InboundKey::new(packet.remote.bytes(), port))
            .is_some())
        || INBOUND
            .get_ptr(InboundKey::new(InboundKey::ANY_SOURCE, port))
            .is_some()
}

/// Step 4: a server endpoint matches on address, then port (or any), then protocol (or any).
/// Only the kinds of key the list holds (not in `empty`) are looked up.
#[inline(always)]
fn is_server(packet: &Packet, empty: u32) -> bool {
    if empty & lists::SERVERS == lists::SERVERS
        || (packet.protocol != IPPROTO_TCP && packet.protocol != IPPROTO_UDP)
    {
        return false;
    }
    let kind = |bit: u32, port: u16, protocol: u8| {
        empty & bit == 0 && server_listed(packet.remote, port, protocol)
    };
    if let Some(ports) = packet.ports() {
        if kind(lists::SERVER_PORT_PROTOCOL, ports.remote, packet.protocol)
            || kind(lists::SERVER_PORT, ports.remote, ANY_PROTOCOL)
        {
            return true;
        }
    }
    kind(lists::SERVER_PROTOCOL, ANY_PORT, packet.protocol)
        || kind(lists::SERVER_ADDRESS, ANY_PORT, ANY_PROTOCOL)
}

#[inline(always)]
fn server_listed(addr: Address, port: u16, protocol: u8) -> bool {
    SERVERS
        .get_ptr(ServerKey::new(addr.bytes(), port, protocol))
        .is_some()
}

const DHCP_V4_CLIENT: u16 = 68;
const DHCP_V4_SERVER: u16 = 67;
const DHCP_V6_CLIENT: u16 = 546;
const DHCP_V6_SERVER: u16 = 547;
/// ff02::1:2, All_DHCP_Relay_Agents_and_Servers.
const DHCP_V6_SERVERS: Address =
    Address::from_bytes([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2]);
/// 255.255.255.255, IPv4-mapped.
const BROADCAST: Address = Address::mapped(u32::MAX);

/// Step 5: DHCPv4 68<->67, DHCPv6 546<->547. A request goes only where a DHCP server can be:
/// v4 to the broadcast address or a LAN address (a unicast renewal to an on-link server), v6 to
/// ff02::1:2 or a link-local address. Anything bound to port 68 could otherwise talk to any
/// internet host.
#[inline(always)]
fn is_dhcp(packet: &Packet, direction: Direction) -> bool {
    let Some(Ports { local, remote }) = packet.udp_ports() else {
        return false;
    };
    let (ports, reachable) = if packet.ipv6 {
        (
            local == DHCP_V6_CLIENT && remote == DHCP_V6_SERVER,
            packet.remote == DHCP_V6_SERVERS || is_link_local(packet.remote),
        )
    } else {
        (
            local == DHCP_V4_CLIENT && remote == DHCP_V4_SERVER,
            packet.remote == BROADCAST || in_lan(packet.remote),
        )
    };
    ports && (direction == Direction::Ingress || reachable)
}

#[inline(always)]
fn is_link_local(address: Address) -> bool {
    let [first, second] = address.prefix16();
    first == 0xfe && second & 0xc0 == 0x80
}

#[inline(always)]
fn in_lan(address: Address) -> bool {
    LAN.get(Key::new(128, address)).is_some()
}

/// Step 6: UDP 123 with an NTP server.
#[inline(always)]
fn is_ntp(packet: &Packet) -> bool {
    packet.udp_ports().is_some_and(|p| p.remote == 123)
        && NTP_SERVERS.get_ptr(&packet.remote).is_some()
}

/// Step 7: DNS (53, DNS over TLS 853; UDP or TCP) with a DNS server.
#[inline(always)]
fn is_dns_server(packet: &Packet) -> bool {
    packet.ports().is_some_and(|p| is_dns_port(p.remote))
        && DNS_SERVERS.get_ptr(&packet.remote).is_some()
}

#[inline(always)]
fn is_dns_port(port: u16) -> bool {
    port == 53 || port == 853
}

/// Step 8: LAN prefixes, except DNS unless `lan.dns` (a LAN resolver is a DNS leak).
#[inline(always)]
fn lan(packet: &Packet, lan_dns: bool) -> Option<Reason> {
    in_lan(packet.remote).then_some(())?;
    if lan_dns || !packet.may_carry_ports() {
        return Some(Reason::Lan);
    }
    match packet.ports() {
        Some(ports) if is_dns_port(ports.remote) => Some(Reason::LanDns),
        Some(_) => Some(Reason::Lan),
        // No readable port: it could be DNS, so the LAN rule cannot allow it.
        None => None,
    }
}

/// Step 9: IPv6 neighbour discovery (router/neighbour solicitation and advertisement, redirect)
/// with a link-local or link-scope multicast address.
#[inline(always)]
fn is_neighbour_discovery(packet: &Packet) -> bool {
    if !packet.ipv6 || packet.protocol != IPPROTO_ICMPV6 {
        return false;
    }
    let link_local = is_link_local(packet.remote);
    let link_multicast = packet.remote.prefix16() == [0xff, 0x02];
    packet.icmp_type().is_some_and(|t| (133..=137).contains(&t)) && (link_local || link_multicast)
}

#[inline(always)]
fn settings() -> Settings {
    SETTINGS.get(0).copied().unwrap_or(Settings {
        // No settings entry: behave as the strictest policy.
        uplinks_restricted: 1,
        dhcp: 0,
        lan_dns: 0,
        ipv6_block: 1,
        vpn_client: 1,
        vpn_client_mark: 0,
        vpn_client_levels: 0,
        // Every lookup.
        empty_lists: 0,
        guard: 0,
        _pad: 0,
        tunnel_free: 0,
        netns_cookie: 0,
        event_interval_ns: killswitch_common::EVENT_INTERVAL_NS,
        event_burst_ns: killswitch_common::EVENT_BURST_NS,
    })
}

#[inline(always)]
pub(crate) fn ifindex(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
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
