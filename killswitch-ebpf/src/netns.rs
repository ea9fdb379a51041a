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
    macros::map,
    maps::PerCpuArray,
    programs::SkBuffContext,
};

pub trait NetnsSource {
    fn cookie(ctx: &SkBuffContext) -> u64;
}

pub struct Helper;

impl NetnsSource for Helper {
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

/// One slot to turn the socket pointer into a plain number: the verifier allows no arithmetic
/// on socket pointers, but a privileged program may store one and read it back as a scalar.
#[map]
static SOCKET_ADDRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

impl NetnsSource for Socket {
    #[inline(always)]
    fn cookie(ctx: &SkBuffContext) -> u64 {
        // SAFETY: reading a field of the context.
        let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
        let Some(slot) = SOCKET_ADDRESS.get_ptr_mut(0) else {
            return 0;
        };
        // Volatile, so the compiler keeps the store and the load the trick needs.
        // SAFETY: a per-CPU slot of this map, valid for the program run.
        let address = unsafe {
            core::ptr::write_volatile(slot, sk as u64);
            core::ptr::read_volatile(slot)
        };
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
