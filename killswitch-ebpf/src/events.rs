//! Drop events: one record per dropped packet through a ring buffer, rate-limited per CPU so a
//! flood costs at most a fixed number of events a second. What the limit holds back is counted.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_cgroup_id},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::SkBuffContext,
};
use killswitch_common::{
    ipv4_mapped, Direction, DropEvent, EventLimit, Reason, Settings, RECENT_DROPS_PER_CPU,
};

use crate::packet::{Frame, Packet, ETH_P_IP, ETH_P_IPV6};

#[map]
static EVENTS: RingBuf = RingBuf::pinned(killswitch_common::EVENT_RING_BYTES, 0);
#[map]
static EVENT_LIMIT: PerCpuArray<EventLimit> = PerCpuArray::pinned(1, 0);
/// The last few events of each CPU, for `status`: the ring buffer has one reader, which
/// `status --follow` may be.
#[map]
static RECENT_DROPS: PerCpuArray<DropEvent> = PerCpuArray::pinned(RECENT_DROPS_PER_CPU, 0);

/// Sends a drop event for the current packet, unless this CPU is over its budget.
#[inline(always)]
pub fn report(
    ctx: &SkBuffContext,
    // Asked only for an event that is sent: most drops of a flood are only counted.
    netns: impl FnOnce() -> u64,
    direction: Direction,
    reason: Reason,
    settings: &Settings,
) {
    let Some(limit) = EVENT_LIMIT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
    let limit = unsafe { &mut *limit };
    // The coarse clock (CLOCK_MONOTONIC_COARSE, one tick) is enough for a budget of events a
    // second, and costs a fraction of the precise one on every drop.
    // SAFETY: the helper takes no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // GCRA: each event moves `next_ns` one interval on; a burst may run it ahead of `now`.
    let next = if limit.next_ns > now {
        limit.next_ns
    } else {
        now
    };
    if next - now > settings.event_burst_ns {
        limit.suppressed += 1;
        limit.suppressed_total += 1;
        return;
    }
    limit.next_ns = next + settings.event_interval_ns;
    let mut event = describe(ctx, netns(), direction, reason);
    event.timestamp_ns = now;
    event.suppressed = limit.suppressed;
    let slot = (limit.reported % RECENT_DROPS_PER_CPU as u64) as u32;
    limit.reported += 1;
    if let Some(recent) = RECENT_DROPS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, as above.
        unsafe { *recent = event };
    }
    if EVENTS.output::<DropEvent>(&event, 0).is_ok() {
        limit.suppressed = 0;
    } else {
        // The ring buffer is full: nobody is reading, or not fast enough.
        limit.suppressed += 1;
        limit.suppressed_total += 1;
    }
}

/// The packet's addresses, ports, interface and cgroup (for drop events and `trace`).
#[inline(always)]
pub(crate) fn describe(
    ctx: &SkBuffContext,
    netns: u64,
    direction: Direction,
    reason: Reason,
) -> DropEvent {
    let mut event = DropEvent {
        reason: reason as u8,
        direction: direction as u8,
        ifindex: crate::ifindex(ctx),
        netns_cookie: netns,
        // SAFETY: the helper only reads the context it is given.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        ..DropEvent::default()
    };
    match ctx.skb.protocol() {
        ETH_P_IP => {
            if let (Ok(source), Ok(destination)) =
                (ctx.load::<[u8; 4]>(12), ctx.load::<[u8; 4]>(16))
            {
                event.family = 4;
                event.source = ipv4_mapped(source);
                event.destination = ipv4_mapped(destination);
            }
        }
        ETH_P_IPV6 => {
            if let (Ok(source), Ok(destination)) =
                (ctx.load::<[u8; 16]>(8), ctx.load::<[u8; 16]>(24))
            {
                event.family = 6;
                event.source = source;
                event.destination = destination;
            }
        }
        _ => {}
    }
    if let Some(packet) = Packet::parse(&Frame::network(&ctx.skb), Direction::Egress) {
        event.protocol = packet.protocol;
        // Parsed as egress: "local" is the source, "remote" the destination.
        if let Some(ports) = packet.ports() {
            event.ports_known = 1;
            event.source_port = ports.local;
            event.destination_port = ports.remote;
        }
    }
    event
}
