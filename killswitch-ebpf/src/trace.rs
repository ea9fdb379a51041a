//! `killswitch trace`: one aya-log record per verdict. The loader sets aya-log's level to off
//! in the programs that enforce, so the verifier removes this code from them (it reads a
//! frozen constant): tracing costs nothing per packet until `trace` swaps in a copy loaded
//! with the level at info. The record is numbers only; user space names them.

use aya_ebpf::programs::SkBuffContext;
use aya_log_ebpf::{
    info,
    macro_support::{level_enabled, Level},
};
use killswitch_common::{Direction, Reason};

#[inline(always)]
pub fn verdict(
    ctx: &SkBuffContext,
    netns: impl FnOnce() -> u64,
    direction: Direction,
    reason: Reason,
) {
    // Before anything is read: the record's fields are only worked out for a traced copy.
    if !level_enabled(Level::Info) {
        return;
    }
    let e = crate::events::describe(ctx, netns(), direction, reason);
    // Few arguments: each takes stack, and the ICMP-error program's stack is shared with the
    // ingress program that tail-calls it (the kernel allows 256 bytes in all).
    let kind = u64::from(e.direction)
        | u64::from(e.reason) << 8
        | u64::from(e.family) << 16
        | u64::from(e.protocol) << 24
        | u64::from(e.ports_known) << 32;
    let ports = u32::from(e.source_port) << 16 | u32::from(e.destination_port);
    info!(
        ctx,
        "verdict {} {:i} {:i} {} {} {} {}",
        kind,
        e.source,
        e.destination,
        ports,
        e.ifindex,
        e.netns_cookie,
        e.cgroup_id
    );
}
