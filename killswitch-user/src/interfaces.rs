//! Network interfaces of the current network namespace, and the namespace's cookie (the value
//! `bpf_get_netns_cookie` returns for its packets).

use std::os::fd::AsRawFd;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::{
    error::{Error, Result},
    policy::InterfacePattern,
};

/// `SO_NETNS_COOKIE` (linux/socket.h), not yet exported by libc for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// Every interface of the current network namespace.
pub fn list() -> Result<Vec<Interface>> {
    let interfaces = nix::net::if_::if_nameindex()
        .map_err(|e| Error::kernel("cannot list network interfaces", e))?;
    let mut list: Vec<Interface> = interfaces
        .iter()
        .map(|i| Interface {
            index: i.index(),
            name: i.name().to_string_lossy().into_owned(),
        })
        .collect();
    list.sort();
    Ok(list)
}

/// The interfaces matching any of `patterns`.
pub fn matching(all: &[Interface], patterns: &[InterfacePattern]) -> Vec<Interface> {
    all.iter()
        .filter(|i| patterns.iter().any(|p| p.matches(&i.name)))
        .cloned()
        .collect()
}

/// Interfaces that `tunnels` matches but that do not look like a VPN's: an Ethernet-type
/// device (a physical NIC, a bridge, a container's veth) whose driver is neither tun (also
/// OpenVPN's tap mode) nor wireguard. A veth counts as a tunnel only when named exactly (test
/// beds stand one in for `tun0`). Trusting such an interface as the tunnel would let
/// everything out through it in the clear.
pub fn not_tunnel_like(all: &[Interface], patterns: &[InterfacePattern]) -> Vec<String> {
    all.iter()
        .filter_map(|i| {
            let pattern = patterns.iter().find(|p| p.matches(&i.name))?;
            let ethernet = device_type(&i.name) == Some(libc::ARPHRD_ETHER);
            let driver = driver(&i.name).unwrap_or_default();
            let exact_veth = driver == "veth" && patterns.iter().any(|p| p.as_str() == i.name);
            let tunnel_like =
                !ethernet || matches!(driver.as_str(), "tun" | "wireguard") || exact_veth;
            (!tunnel_like).then(|| {
                format!(
                    "{} (driver {}, matched by `{pattern}`)",
                    i.name,
                    if driver.is_empty() {
                        "unknown"
                    } else {
                        &driver
                    }
                )
            })
        })
        .collect()
}

/// Kinds of devices (driver names, and `ip -d link`'s kinds) that lead back into this host or
/// into a tunnel, never onto a wire: the guard watches the device their frames leave by
/// instead (or a tunnel carries them). The last five are IP-in-IP tunnels, found here by their
/// device type ([`TUNNEL_TYPES`]); nft matches them by kind.
pub const INTERNAL_KINDS: [&str; 13] = [
    "veth",
    "bridge",
    "tun",
    "openvswitch",
    "dummy",
    "vxlan",
    "geneve",
    "wireguard",
    "ipip",
    "sit",
    "gre",
    "ip6tnl",
    "ip6gre",
];

/// ARPHRD types of IP-in-IP tunnels (ipip, ip6tnl, sit, gre, ip6gre): what they carry leaves
/// encapsulated, by a device the guard watches.
const TUNNEL_TYPES: [u16; 5] = [768, 769, 776, 778, 823];
const ARPHRD_RAWIP: u16 = 519;

/// What the guard gets for a device it cannot read: every frame dropped.
pub const UNREADABLE_HEADER: u8 = killswitch_common::GUARD_UNREADABLE;

/// Whether `device` may lead out of the host: not loopback, and none of the internal kinds
/// (veth, bridge, tun/tap, IP tunnels, ...), whose frames leave, if at all, by such a device.
pub fn wired(device: &Interface) -> bool {
    let internal = driver(&device.name).is_some_and(|d| INTERNAL_KINDS.contains(&d.as_str()))
        || device_type(&device.name).is_some_and(|t| TUNNEL_TYPES.contains(&t));
    device.index != killswitch_common::LOOPBACK_IFINDEX && !internal
}

/// The devices the uplink guard watches, each with the length of its link-layer header: every
/// interface but loopback, the tunnels and the internal kinds (veth, bridge, tun/tap, IP
/// tunnels, ...), and the ones `uplinks` names. With `uplinks` set, a device it does not name
/// gets a guard that passes nothing ([`killswitch_common::GUARD_NOT_AN_UPLINK`]): what the host
/// forwards must not leave by a device the policy's exceptions may not use.
pub fn guarded(all: &[Interface], policy: &crate::policy::Policy) -> Vec<(Interface, u8)> {
    if !policy.guarded() {
        return Vec::new();
    }
    let tunnels = matching(all, &policy.tunnels);
    let listed = policy.uplinks.as_deref().map(|u| matching(all, u));
    let wired = all.iter().filter(|i| wired(i));
    let mut candidates: Vec<Interface> = wired.chain(listed.iter().flatten()).cloned().collect();
    candidates.sort();
    candidates.dedup();
    // What a listed bridge, bond, VLAN or macvlan sends leaves through the devices below it.
    let carriers = listed.as_ref().map(|listed| carriers_of(listed));
    candidates
        .into_iter()
        .filter(|i| !tunnels.contains(i))
        .map(|i| {
            let uplink = match (&listed, &carriers) {
                (Some(listed), Some(carriers)) => {
                    listed.contains(&i) || carriers.contains(&i.index)
                }
                _ => true,
            };
            if !uplink {
                return (i, killswitch_common::GUARD_NOT_AN_UPLINK);
            }
            let header = match device_type(&i.name) {
                Some(libc::ARPHRD_ETHER) => 14,
                Some(libc::ARPHRD_NONE | libc::ARPHRD_PPP | ARPHRD_RAWIP) => 0,
                Some(t) if TUNNEL_TYPES.contains(&t) => 0,
                other => {
                    tracing::warn!(
                        "the uplink guard cannot read frames of {} (device type {other:?}): it drops them all",
                        i.name
                    );
                    UNREADABLE_HEADER
                }
            };
            (i, header)
        })
        .collect()
}

/// The devices below `listed` ones, by index, as deep as devices stack: the ports of a listed
/// bridge or bond (their controller is it), and the device a listed VLAN or macvlan sends
/// through (its link). Empty when the kernel cannot be asked (the guard then drops their
/// frames: it fails closed).
fn carriers_of(listed: &[Interface]) -> Vec<u32> {
    let stacking = match stacking() {
        Ok(stacking) => stacking,
        Err(e) => {
            tracing::warn!("cannot read which devices carry the listed uplinks: {e}");
            return Vec::new();
        }
    };
    let mut above: Vec<u32> = listed.iter().map(|i| i.index).collect();
    let mut carriers: Vec<u32> = Vec::new();
    // Each round goes one layer down (a VLAN on a bond on two NICs is three rounds).
    for _ in 0..8 {
        let below: Vec<u32> = stacking
            .iter()
            .filter(|(index, controller, _)| {
                !carriers.contains(index)
                    && !above.contains(index)
                    && controller.is_some_and(|c| above.contains(&c))
            })
            .map(|(index, _, _)| *index)
            .chain(stacking.iter().filter_map(|(index, _, link)| {
                link.filter(|l| above.contains(index) && *l != *index && !carriers.contains(l))
            }))
            .collect();
        if below.is_empty() {
            break;
        }
        carriers.extend(&below);
        above = below;
    }
    carriers
}

/// A device's index, its controller (`IFLA_MASTER`) and its link (`IFLA_LINK`, in this
/// namespace).
type Stacked = (u32, Option<u32>, Option<u32>);

/// Every device as [`Stacked`], from one RTM_GETLINK dump of the current network namespace.
fn stacking() -> std::io::Result<Vec<Stacked>> {
    use rtnetlink::{
        packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST},
        packet_route::{
            link::{LinkAttribute, LinkMessage},
            RouteNetlinkMessage,
        },
        sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
    };
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let bad = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let mut out = Vec::new();
    // A dump of a few thousand devices is a few hundred datagrams.
    for _ in 0..100_000 {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = &datagram[..];
        while rest.len() >= 16 {
            // Each message says its length first; aligned to 4 bytes.
            let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let length = length.div_ceil(4).saturating_mul(4).clamp(16, rest.len());
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..length]);
            rest = &rest[length..];
            // A device whose message this crate cannot read is left out (it stays what
            // `uplinks` says it is), not the whole list.
            let Ok(message) = parsed else {
                continue;
            };
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(bad(&format!("{e:?}"))),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let mut controller = None;
                    let mut lower = None;
                    let mut elsewhere = false;
                    for attribute in &link.attributes {
                        match attribute {
                            LinkAttribute::Controller(c) => controller = Some(*c),
                            LinkAttribute::Link(l) => lower = Some(*l),
                            // A veth's peer in another namespace: its index means nothing here.
                            LinkAttribute::LinkNetNsId(_) => elsewhere = true,
                            _ => {}
                        }
                    }
                    out.push((link.header.index, controller, lower.filter(|_| !elsewhere)));
                }
                _ => {}
            }
        }
    }
    Err(bad(&"the device dump did not end"))
}

/// `struct ifreq` with room for the union the two requests below use.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IF_NAMESIZE],
    data: [u8; 24],
}

fn ifreq(name: &str) -> Option<IfReq> {
    let mut req = IfReq {
        name: [0; libc::IF_NAMESIZE],
        data: [0; 24],
    };
    if name.len() >= libc::IF_NAMESIZE {
        return None;
    }
    for (slot, byte) in req.name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Some(req)
}

fn ioctl(request: libc::c_ulong, req: &mut IfReq) -> bool {
    let Ok(sock) = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    // SAFETY: the request reads the name and writes within the ifreq it is given.
    unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut IfReq) == 0 }
}

/// The device's ARPHRD type (SIOCGIFHWADDR: the hardware address's family).
fn device_type(name: &str) -> Option<u16> {
    let mut req = ifreq(name)?;
    ioctl(libc::SIOCGIFHWADDR, &mut req).then(|| u16::from_ne_bytes([req.data[0], req.data[1]]))
}

/// The interface's hardware address (SIOCGIFHWADDR), for an Ethernet-like device.
pub fn mac(name: &str) -> Option<[u8; 6]> {
    let mut req = ifreq(name)?;
    ioctl(libc::SIOCGIFHWADDR, &mut req).then(|| {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&req.data[2..8]);
        mac
    })
}

/// Whether the interface is up and has a carrier (SIOCGIFFLAGS: IFF_UP and IFF_RUNNING). Asked
/// of the current network namespace, unlike /sys/class/net.
pub fn is_up(name: &str) -> bool {
    let Some(mut req) = ifreq(name) else {
        return false;
    };
    let wanted = (libc::IFF_UP | libc::IFF_RUNNING) as u16;
    ioctl(libc::SIOCGIFFLAGS, &mut req)
        && u16::from_ne_bytes([req.data[0], req.data[1]]) & wanted == wanted
}

/// The device's driver name (ethtool's GDRVINFO), when it has one ("bridge" for a bridge).
pub fn driver(name: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32], ... (196 bytes in all).
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let mut req = ifreq(name)?;
    let pointer = (info.as_mut_ptr() as usize).to_ne_bytes();
    req.data[..pointer.len()].copy_from_slice(&pointer);
    if !ioctl(libc::SIOCETHTOOL, &mut req) {
        return None;
    }
    let driver = &info[4..36];
    let end = driver.iter().position(|&b| b == 0).unwrap_or(driver.len());
    Some(String::from_utf8_lossy(&driver[..end]).into_owned())
}

/// Name of `index` in the current namespace, if it exists.
pub fn name_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The cookie of the current network namespace.
pub fn netns_cookie() -> Result<u64> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::kernel("cannot open a socket", e))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the kernel to write a u64.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::kernel(
            "cannot read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}
