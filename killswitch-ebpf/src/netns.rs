//! The packet's network namespace, as the cookie `SO_NETNS_COOKIE` gives user space. Interfaces
//! are keyed by (cookie, ifindex), so a container's `eth0` never passes for the host's tunnel.
//!
//! Two sources, chosen by the loader from what the kernel offers:
//! - `Helper`: `bpf_get_netns_cookie(skb)`, which cgroup_skb programs may call from Linux 6.17.
//! - `Socket`: older kernels (Debian 12's 6.1, 13's 6.12). A cgroup_skb program always runs for
//!   a full socket, and that socket lives in the namespace whose routes and devices carry the
//!   packet, so its `sk->__sk_common.skc_net.net->net_cookie` is the same cookie. The two field
//!   offsets come from the kernel's BTF at load time; the reads go through
//!   `bpf_probe_read_kernel`. Any failure gives cookie 0, which no interface entry has: the
//!   packet is treated as on an unknown interface (fail closed).

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_netns_cookie, bpf_probe_read_kernel},
    programs::SkBuffContext,
};

pub trait NetnsSource {
    /// This source's ICMP-error program in `ICMP_ERRORS` (the loader puts it there).
    const ICMP_ERROR_SLOT: u32;
    fn cookie(ctx: &SkBuffContext) -> u64;
}

pub struct Helper;

impl NetnsSource for Helper {
    const ICMP_ERROR_SLOT: u32 = 0;
    #[inline(always)]
    fn cookie(ctx: &SkBuffContext) -> u64 {
        // SAFETY: the helper only reads the context it is given.
        unsafe { bpf_get_netns_cookie(ctx.skb.skb as *mut c_void) }
    }
}

pub struct Socket;

/// Byte offset of `skc_net.net` in `struct sock` (set by the loader from BTF).
#[no_mangle]
static SOCK_NET_OFFSET: u32 = 0;
/// Byte offset of `net_cookie` in `struct net` (set by the loader from BTF).
#[no_mangle]
static NET_COOKIE_OFFSET: u32 = 0;

impl NetnsSource for Socket {
    const ICMP_ERROR_SLOT: u32 = 1;
    #[inline(always)]
    fn cookie(ctx: &SkBuffContext) -> u64 {
        // SAFETY: reading a field of the context.
        let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
        // The verifier allows no arithmetic on a socket pointer, but a privileged program may
        // copy one: reading it back from this program's own stack gives a plain number. (A
        // per-CPU map slot would race with a softirq running these programs on this CPU.)
        let holder = sk as u64;
        // SAFETY: reads 8 bytes of this program's stack.
        let address = unsafe { bpf_probe_read_kernel(&holder as *const u64).unwrap_or(0) };
        if address == 0 {
            return 0;
        }
        // SAFETY: globals written by the loader before the program was verified.
        let (net_offset, cookie_offset) = unsafe {
            (
                core::ptr::read_volatile(&SOCK_NET_OFFSET),
                core::ptr::read_volatile(&NET_COOKIE_OFFSET),
            )
        };
        // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
        let net = unsafe {
            bpf_probe_read_kernel((address + net_offset as u64) as *const u64).unwrap_or(0)
        };
        if net == 0 {
            return 0;
        }
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel((net + cookie_offset as u64) as *const u64).unwrap_or(0) }
    }
}
