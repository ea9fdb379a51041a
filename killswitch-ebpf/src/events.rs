//! Drop events: one record per dropped packet through a ring buffer, rate-limited per CPU so a
//! flood costs at most a fixed number of events a second. What the limit holds back is counted.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::SkBuffContext,
};
use killswitch_common::{Direction, DropEvent, EventLimit, Reason, Settings, RECENT_DROPS_PER_CPU};

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
    let slot = (limit.reported % RECENT_DROPS_PER_CPU as u64) as u32;
    let Some(recent) = RECENT_DROPS.get_ptr_mut(slot) else {
        // Never (the slot is in range), but counted like any event not sent.
        limit.suppressed += 1;
        limit.suppressed_total += 1;
        return;
    };
    limit.reported += 1;
    // Written in place and sent from there: a copy of the event is a byte loop the verifier
    // walks once for every way of reaching a drop.
    // SAFETY: per-CPU slot, as above.
    let event = unsafe { &mut *recent };
    describe_into(event, ctx, netns(), direction, reason);
    event.timestamp_ns = now;
    event.suppressed = limit.suppressed;
    if EVENTS.output::<DropEvent>(event, 0).is_ok() {
        limit.suppressed = 0;
    } else {
        // The ring buffer is full: nobody is reading, or not fast enough.
        limit.suppressed += 1;
        limit.suppressed_total += 1;
    }
}

/// The packet's addresses, ports, interface and cgroup (for `trace`).
#[inline(always)]
pub(crate) fn describe(
    ctx: &SkBuffContext,
    netns: u64,
    direction: Direction,
    reason: Reason,
) -> DropEvent {
    let mut event = DropEvent::default();
    describe_into(&mut event, ctx, netns, direction, reason);
    event
}

/// Writes every field of `event` but the time and the suppressed count: the packet's
/// addresses, ports, interface and cgroup.
#[inline(always)]
fn describe_into(
    event: &mut DropEvent,
    ctx: &SkBuffContext,
    netns: u64,
    direction: Direction,
    reason: Reason,
) {
    event.reason = reason as u8;
    event.direction = direction as u8;
    event.ifindex = crate::ifindex(ctx);
    event.netns_cookie = netns;
    // SAFETY: the helper only reads the context it is given.
    event.cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    event.family = 0;
    event.source = [0; 16];
    event.destination = [0; 16];
    event.protocol = 0;
    event.ports_known = 0;
    event.source_port = 0;
    event.destination_port = 0;
    event._pad = [0; 11];
    // Read straight into the event: copies through the stack would not fit beside the rest.
    let (family, read) = match ctx.skb.protocol() {
        ETH_P_IP => {
            event.source[10..12].copy_from_slice(&[0xff, 0xff]);
            event.destination[10..12].copy_from_slice(&[0xff, 0xff]);
            let read = load_into(ctx, 12, &mut event.source[12..])
                && load_into(ctx, 16, &mut event.destination[12..]);
            (4, read)
        }
        ETH_P_IPV6 => (
            6,
            load_into(ctx, 8, &mut event.source) && load_into(ctx, 24, &mut event.destination),
        ),
        _ => (0, false),
    };
    if read {
        event.family = family;
    } else {
        event.source = [0; 16];
        event.destination = [0; 16];
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
}

/// Reads `dst.len()` bytes of the packet at `offset` into `dst`; false (and `dst` unspecified)
/// when the packet is shorter.
#[inline(always)]
fn load_into(ctx: &SkBuffContext, offset: u32, dst: &mut [u8]) -> bool {
    // SAFETY: the helper writes exactly `dst.len()` bytes into `dst`, or fails.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            dst.as_mut_ptr().cast(),
            dst.len() as u32,
        ) == 0
    }
}
