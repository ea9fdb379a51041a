//! The uplink guard: tc programs on each uplink that hold every frame crossing it to the
//! uplink part of the policy, whatever sent it: a forwarded container or VM, a raw packet
//! socket, another namespace. The cgroup programs see only local sockets; this sees the wire.
//!
//! The verdict is the cgroup programs' steps 4-9 on the same pinned maps, after the link layer:
//! ARP, EAPOL and PPPoE's and PPP's negotiation pass (they carry no user data, and a network
//! without them is down); IP is read behind one VLAN tag and a PPPoE session header; any other
//! frame is dropped. A tunnel never has a guard: its path pays nothing.

use aya_ebpf::{
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use killswitch_common::{
    Direction, Reason, Settings, COUNTER_ENTRIES, GUARD_NOT_AN_UPLINK, MAX_INTERFACES,
};

use crate::packet::{Frame, Packet, ETH_P_IPV6};

/// The devices the guard watches, by ifindex (the host namespace's): the length of their
/// link-layer header (14 for Ethernet, 0 for a device that carries bare IP). A device missing
/// here has a guard left from before and is no uplink now: nothing passes it.
#[map]
static GUARDED: HashMap<u32, u8> = HashMap::pinned(MAX_INTERFACES, 0);
/// The guard's verdicts, laid out as `COUNTERS`.
#[map]
static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);

/// "Go on": the next tc program, or the stack. A guard that said "pass" here would skip the
/// programs after it, which are someone else's.
const TC_NEXT: i32 = -1;
const TC_SHOT: i32 = 2;

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_OFFSET: usize = 12;
const VLAN_TAG: usize = 4;
const ETH_IP: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_ARP: u16 = 0x0806;
/// 802.1X / WPA key exchange, and its pre-authentication.
const ETH_EAPOL: u16 = 0x888e;
const ETH_PREAUTH: u16 = 0x88c7;
const ETH_VLAN: u16 = 0x8100;
const ETH_QINQ: u16 = 0x88a8;
/// PPPoE (DSL): discovery, and sessions, whose PPP header names what they carry.
const ETH_PPPOE_DISCOVERY: u16 = 0x8863;
const ETH_PPPOE_SESSION: u16 = 0x8864;
const PPPOE_HEADER: usize = 6;
const PPP_PROTOCOL: usize = 2;
const PPP_IP: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;
/// PPP protocols from here up negotiate the link (LCP, authentication, IPCP, ...): no user data.
const PPP_CONTROL: u16 = 0x8000;

#[classifier]
pub fn guard_egress(ctx: TcContext) -> i32 {
    guard(&ctx, Direction::Egress)
}

#[classifier]
pub fn guard_ingress(ctx: TcContext) -> i32 {
    guard(&ctx, Direction::Ingress)
}

#[inline(always)]
fn guard(ctx: &TcContext, direction: Direction) -> i32 {
    let settings = crate::settings();
    let reason = judge(ctx, direction, &settings);
    if let Some(counter) = GUARD_COUNTERS.get_ptr_mut(reason.counter_index(direction)) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
    if reason.allows() {
        TC_NEXT
    } else {
        TC_SHOT
    }
}

#[inline(always)]
fn judge(ctx: &TcContext, direction: Direction, settings: &Settings) -> Reason {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(&header) = (unsafe { GUARDED.get(&ifindex) }) else {
        return Reason::NotUplink;
    };
    if header == GUARD_NOT_AN_UPLINK {
        return Reason::NotUplink;
    }
    let Some(frame) = ip_frame(ctx, header as usize) else {
        return Reason::NotIp;
    };
    if frame.protocol == 0 {
        return Reason::LinkControl;
    }
    if settings.ipv6_block != 0 && frame.protocol == ETH_P_IPV6 {
        return Reason::Ipv6Blocked;
    }
    // Forwarded frames have no socket: only the VPN client's own ones pass for it.
    let client = direction == Direction::Ingress
        || settings.vpn_client == 0
        || crate::is_vpn_client(&ctx.skb, settings);
    let Some(packet) = Packet::parse(&frame, direction) else {
        return Reason::Malformed;
    };
    if packet.source_route {
        return Reason::SourceRoute;
    }
    let reason = crate::exception_once(&packet, direction, settings, true, client);
    if reason != Reason::Default || direction == Direction::Egress {
        return reason;
    }
    match packet.quoted(&frame) {
        Some(quoted)
            if !quoted.source_route
                && crate::exception_once(&quoted, Direction::Egress, settings, true, true)
                    .allows() =>
        {
            Reason::IcmpError
        }
        _ => Reason::Default,
    }
}

/// Where the frame's IP header is, behind a link-layer header of `header` bytes, at most one
/// VLAN tag and a PPPoE session header. `protocol` 0: ARP, EAPOL, PPPoE discovery or PPP's own
/// negotiation. `None`: another protocol.
#[inline(always)]
fn ip_frame(ctx: &TcContext, header: usize) -> Option<Frame<'_>> {
    if header == 0 {
        // Bare IP: what the receiver reads is the version in the first byte (a raw socket
        // may send any `skb->protocol`, 0 included).
        let version = ctx.skb.load::<u8>(0).ok()? >> 4;
        let protocol = match version {
            4 => ETH_IP,
            6 => ETH_IPV6,
            _ => return None,
        };
        return Some(Frame::at(&ctx.skb, 0, u32::from(protocol.to_be())));
    }
    if header != ETHERNET_HEADER {
        return None;
    }
    let mut base = ETHERNET_HEADER;
    let mut ethertype = read_ethertype(ctx, ETHERTYPE_OFFSET)?;
    if ethertype == ETH_VLAN || ethertype == ETH_QINQ {
        ethertype = read_ethertype(ctx, ETHERTYPE_OFFSET + VLAN_TAG)?;
        base += VLAN_TAG;
    }
    if ethertype == ETH_PPPOE_SESSION {
        let ppp = read_ethertype(ctx, base + PPPOE_HEADER)?;
        base += PPPOE_HEADER + PPP_PROTOCOL;
        ethertype = match ppp {
            PPP_IP => ETH_IP,
            PPP_IPV6 => ETH_IPV6,
            control if control >= PPP_CONTROL => ETH_PPPOE_DISCOVERY,
            _ => return None,
        };
    }
    match ethertype {
        ETH_IP | ETH_IPV6 => Some(Frame::at(&ctx.skb, base, u32::from(ethertype.to_be()))),
        ETH_ARP | ETH_EAPOL | ETH_PREAUTH | ETH_PPPOE_DISCOVERY => {
            Some(Frame::at(&ctx.skb, base, 0))
        }
        _ => None,
    }
}

#[inline(always)]
fn read_ethertype(ctx: &TcContext, offset: usize) -> Option<u16> {
    ctx.skb.load::<[u8; 2]>(offset).ok().map(u16::from_be_bytes)
}
