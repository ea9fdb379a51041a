//! What the running kernel offers the programs, probed once per load: how they learn a packet's
//! network namespace (see `killswitch-ebpf/src/netns.rs`). `check` and `status` report it.

use std::path::Path;

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use btf_rs::{Btf, Type};
use killswitch_common::Direction;
use serde::Serialize;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// How the programs learn a packet's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mechanism", rename_all = "kebab-case")]
pub enum NetnsSource {
    /// `bpf_get_netns_cookie` on the packet (Linux 6.17 and later).
    Helper,
    /// The packet's socket's namespace, read at offsets from the kernel's BTF (older kernels).
    Socket {
        sock_net_offset: u32,
        net_cookie_offset: u32,
    },
}

impl NetnsSource {
    pub fn describe(self) -> String {
        match self {
            NetnsSource::Helper => "bpf_get_netns_cookie on the packet".into(),
            NetnsSource::Socket {
                sock_net_offset,
                net_cookie_offset,
            } => format!(
                "the packet's socket, read at BTF offsets {sock_net_offset} (sock) and \
                 {net_cookie_offset} (net)"
            ),
        }
    }
}

/// The pair of programs in the object that a scope runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pair {
    /// The whole policy, learning the namespace from `NetnsSource`.
    Policy(NetnsSource),
    /// Loopback and DHCP only: held when the policy cannot be enforced.
    Lockdown,
}

impl Pair {
    /// Program names in the object (the kernel keeps 15 characters).
    pub fn program_name(self, direction: Direction) -> &'static str {
        use Direction::*;
        match (self, direction) {
            (Pair::Policy(NetnsSource::Helper), Egress) => "egress",
            (Pair::Policy(NetnsSource::Helper), Ingress) => "ingress",
            (Pair::Policy(NetnsSource::Socket { .. }), Egress) => "egress_sock",
            (Pair::Policy(NetnsSource::Socket { .. }), Ingress) => "ingress_sock",
            (Pair::Lockdown, Egress) => "egress_locked",
            (Pair::Lockdown, Ingress) => "ingress_locked",
        }
    }

    /// The pair's ICMP-error program and its slot in `ICMP_ERRORS` (the kernel side's
    /// `NetnsSource::ICMP_ERROR_SLOT`); lockdown has none.
    pub fn icmp_error_program(self) -> Option<(&'static str, u32)> {
        match self {
            Pair::Policy(NetnsSource::Helper) => Some(("icmp_error", 0)),
            Pair::Policy(NetnsSource::Socket { .. }) => Some(("icmp_error_sock", 1)),
            Pair::Lockdown => None,
        }
    }

    /// What a program of that name enforces, for `status` (kernels keep the name).
    pub fn of_program_name(name: &str) -> Option<&'static str> {
        match name {
            "egress" | "ingress" => Some("policy"),
            "egress_sock" | "ingress_sock" => Some("policy"),
            "egress_locked" | "ingress_locked" => Some("lockdown"),
            _ => None,
        }
    }
}

/// The kernel's answer: the source the programs will use, or why none is available.
pub fn netns_source() -> Result<NetnsSource, String> {
    // The probes load test programs: a pending signal would make the verifier give up.
    let _signals = super::SignalsHeld::new();
    let cookie = BpfHelper::BPF_FUNC_get_netns_cookie;
    if helper_supported(cookie)? {
        return Ok(NetnsSource::Helper);
    }
    if !helper_supported(BpfHelper::BPF_FUNC_probe_read_kernel)? {
        return Err(
            "the kernel lets cgroup_skb programs use neither bpf_get_netns_cookie (Linux 6.17) \
             nor bpf_probe_read_kernel (is kernel lockdown in confidentiality mode?)"
                .into(),
        );
    }
    socket_offsets(Path::new(VMLINUX_BTF))
}

fn helper_supported(helper: BpfHelper) -> Result<bool, String> {
    is_helper_supported(ProgramType::CgroupSkb, helper).map_err(|e| {
        let why = crate::error::chain(&e);
        format!("cannot probe the kernel for {helper:?}: {why}")
    })
}

/// `skc_net.net` in `struct sock` and `net_cookie` in `struct net`, from the kernel's BTF. Each
/// path must end in a field of the right kind (a pointer; an 8-byte integer), or no offset is
/// given and the socket pair is not used.
pub fn socket_offsets(vmlinux: &Path) -> Result<NetnsSource, String> {
    let btf = Btf::from_file(vmlinux).map_err(|e| {
        format!(
            "{} is unreadable ({e}); a kernel before Linux 6.17 needs BTF (CONFIG_DEBUG_INFO_BTF)",
            vmlinux.display()
        )
    })?;
    let sock_net = member_offset(
        &btf,
        "sock",
        &["__sk_common", "skc_net", "net"],
        Leaf::Pointer,
    )?;
    let net_cookie = member_offset(&btf, "net", &["net_cookie"], Leaf::U64)?;
    Ok(NetnsSource::Socket {
        sock_net_offset: sock_net,
        net_cookie_offset: net_cookie,
    })
}

/// What the last field of a path must be.
#[derive(Clone, Copy)]
enum Leaf {
    Pointer,
    U64,
}

impl Leaf {
    fn matches(self, ty: &Type) -> bool {
        match (self, ty) {
            (Leaf::Pointer, Type::Ptr(_)) => true,
            (Leaf::U64, Type::Int(int)) => int.size() == 8,
            _ => false,
        }
    }
}

/// Byte offset of `path` (member names, anonymous members searched through) in the struct
/// called `name`; every struct of that name is tried.
fn member_offset(btf: &Btf, name: &str, path: &[&str], leaf: Leaf) -> Result<u32, String> {
    btf.resolve_types_by_name(name)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| match t {
            Type::Struct(s) => walk(btf, s, path, leaf),
            _ => None,
        })
        .next()
        .ok_or_else(|| {
            format!(
                "the kernel's BTF has no struct {name} with a {} {}",
                match leaf {
                    Leaf::Pointer => "pointer",
                    Leaf::U64 => "64-bit",
                },
                path.join(".")
            )
        })
}

fn walk(btf: &Btf, root: btf_rs::Struct, path: &[&str], leaf: Leaf) -> Option<u32> {
    let mut offset = 0;
    let mut current = root;
    for (i, field) in path.iter().enumerate() {
        let (bits, ty) = find_member(btf, &current, field)?;
        if bits % 8 != 0 {
            return None;
        }
        offset += bits / 8;
        let ty = resolve(btf, ty)?;
        if i + 1 == path.len() {
            return leaf.matches(&ty).then_some(offset);
        }
        current = match ty {
            Type::Struct(s) | Type::Union(s) => s,
            _ => return None,
        };
    }
    None
}

/// The member called `field`, looking inside anonymous structs and unions; its bit offset and
/// type. Members whose type cannot be resolved are skipped.
fn find_member(btf: &Btf, parent: &btf_rs::Struct, field: &str) -> Option<(u32, Type)> {
    for member in &parent.members {
        let Ok(ty) = btf.resolve_chained_type(member) else {
            continue;
        };
        let name = btf.resolve_name(member).unwrap_or_default();
        if name == field && member.bitfield_size().unwrap_or(0) == 0 {
            return Some((member.bit_offset(), ty));
        }
        if name.is_empty() {
            if let Some(Type::Struct(inner) | Type::Union(inner)) = resolve(btf, ty) {
                if let Some((bits, ty)) = find_member(btf, &inner, field) {
                    return Some((member.bit_offset() + bits, ty));
                }
            }
        }
    }
    None
}

/// Follows typedefs and qualifiers to the type they name.
fn resolve(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match ty {
            Type::Typedef(t) => btf.resolve_chained_type(&t).ok()?,
            Type::Const(t) => btf.resolve_chained_type(&t).ok()?,
            Type::Volatile(t) => btf.resolve_chained_type(&t).ok()?,
            Type::Restrict(t) => btf.resolve_chained_type(&t).ok()?,
            Type::TypeTag(t) => btf.resolve_chained_type(&t).ok()?,
            other => return Some(other),
        };
    }
    None
}
