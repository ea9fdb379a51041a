//! Real packets through a ruleset in the scratch namespace (the nftables backend's `decisions`).
//! Egress: a raw socket bound to `tun0`, `up0` or `other0` sends the IP packet, and a packet
//! socket on the veth peer (`tun0p`, ...) sees whether it left. Ingress: the peer's packet
//! socket sends the frame in, and raw sockets per protocol see whether it reached a socket.
//! Every packet carries a tag after its transport header, so a batch is sent at once.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use super::scratch::{Scratch, OTHER, TUNNEL, UPLINK};
use crate::{
    error::{Error, Result},
    model::{Direction, Interface, Packet},
    packets::{frame_with, ME4, ME6},
};

/// Protocols a raw socket listens for, per family.
const PROTOCOLS4: [i32; 7] = [1, 6, 17, 47, 50, 51, 135];
const PROTOCOLS6: [i32; 7] = [58, 6, 17, 47, 50, 51, 135];
pub const MAGIC: [u8; 2] = [0x6b, 0x73];

struct Link {
    ifindex: u32,
    mac: [u8; 6],
    peer_ifindex: i32,
    /// On the peer: sees what left, sends what enters.
    peer: OwnedFd,
    send4: OwnedFd,
    send6: OwnedFd,
}

/// The scratch namespace's links and sockets. Make it on the scratch thread.
pub struct Wire {
    links: Vec<Link>,
    receivers: Vec<OwnedFd>,
    nonce: u16,
}

impl Wire {
    pub fn new(net: &Scratch) -> Result<Wire> {
        for (key, value) in [
            ("ipv4/conf/all/rp_filter", "0"),
            ("ipv4/conf/default/rp_filter", "0"),
            ("ipv6/conf/all/router_solicitations", "0"),
        ] {
            let path = format!("/proc/sys/net/{key}");
            std::fs::write(&path, value).map_err(|e| Error::io("cannot set", &path, e))?;
        }
        for name in [TUNNEL, UPLINK, OTHER] {
            ip(&["link", "set", name, "arp", "off"])?;
        }
        ip(&["addr", "add", &format!("{ME4}/32"), "dev", UPLINK])?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ME6}/128"),
            "dev",
            UPLINK,
            "nodad",
        ])?;
        for (metric, name) in [TUNNEL, UPLINK, OTHER].iter().enumerate() {
            let metric = (metric + 1).to_string();
            ip(&["route", "add", "default", "dev", name, "metric", &metric])?;
            ip(&[
                "-6", "route", "add", "default", "dev", name, "metric", &metric,
            ])?;
        }
        let mut receivers = Vec::new();
        for protocol in PROTOCOLS4 {
            receivers.push(socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                protocol,
            )?);
        }
        for protocol in PROTOCOLS6 {
            receivers.push(socket(
                libc::AF_INET6,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                protocol,
            )?);
        }
        for fd in &receivers {
            set_option(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &(8i32 << 20).to_ne_bytes(),
            )?;
        }
        let mut links = Vec::new();
        for (name, ifindex) in [
            (TUNNEL, net.tunnel),
            (UPLINK, net.uplink),
            (OTHER, net.other),
        ] {
            let peer_name = format!("{name}p");
            let peer_ifindex = nix::net::if_::if_nametoindex(peer_name.as_str())
                .map_err(|e| Error::kernel("no scratch peer interface", e))?
                as i32;
            let send4 = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
            let send6 = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
            for fd in [&send4, &send6] {
                set_option(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, name.as_bytes())?;
                set_option(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_BROADCAST,
                    &1i32.to_ne_bytes(),
                )?;
            }
            let peer = socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )?;
            // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make the bind.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = peer_ifindex;
            // SAFETY: a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    peer.as_raw_fd(),
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(Error::kernel(
                    "cannot bind a packet socket",
                    std::io::Error::last_os_error(),
                ));
            }
            set_option(
                &peer,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &(8i32 << 20).to_ne_bytes(),
            )?;
            links.push(Link {
                ifindex,
                mac: crate::interfaces::mac(name)
                    .ok_or_else(|| Error::Runtime(format!("no MAC address on {name}")))?,
                peer_ifindex,
                peer,
                send4,
                send6,
            });
        }
        Ok(Wire {
            links,
            receivers,
            nonce: 0,
        })
    }

    /// Sends every packet (loopback ones are not: they never leave) and returns, per packet,
    /// whether it arrived: on the far side (egress) or at a socket (ingress); `None` for
    /// loopback.
    pub fn deliver(&mut self, packets: &[Packet]) -> Result<Vec<Option<bool>>> {
        self.nonce = self.nonce.wrapping_add(1);
        let sources: Vec<_> = self.sources().collect();
        exchange(packets, self.nonce, &sources, |link, p, ip, ethertype| {
            let link = &self.links[link];
            match p.direction {
                Direction::Egress => send_ip([&link.send4, &link.send6], link.ifindex, ip, p),
                Direction::Ingress => {
                    send_frame(&link.peer, link.peer_ifindex, link.mac, ip, ethertype)
                }
            }
        })
    }

    fn sources(&self) -> impl Iterator<Item = (&OwnedFd, Direction)> {
        let local = self.receivers.iter().map(|fd| (fd, Direction::Ingress));
        local.chain(self.links.iter().map(|l| (&l.peer, Direction::Egress)))
    }
}

/// The link a packet uses: 0 the tunnel, 1 the uplink (the scope's or another namespace's), 2
/// another interface; `None` for loopback, whose packets never leave.
fn link_of(interface: Interface) -> Option<usize> {
    match interface {
        Interface::Tunnel => Some(0),
        Interface::Uplink | Interface::OtherNamespace => Some(1),
        Interface::Other => Some(2),
        Interface::Loopback => None,
    }
}

/// One batch through a filter: drains `sources`, hands every packet that uses a link to
/// `send(link, packet, ip, ethertype)` (an ingress one with its checksums fixed), then reads
/// `sources` until nothing more comes for 40 ms (at most 2 s). Returns, per packet, whether it
/// arrived at a source of its direction (`None` for loopback). Packets are told apart by the
/// tag after their transport header, so the batch is sent at once.
pub fn exchange(
    packets: &[Packet],
    nonce: u16,
    sources: &[(&OwnedFd, Direction)],
    mut send: impl FnMut(usize, &Packet, &[u8], [u8; 2]) -> Result<()>,
) -> Result<Vec<Option<bool>>> {
    for (fd, _) in sources {
        while receive(fd).is_some() {}
    }
    for (i, p) in packets.iter().enumerate() {
        let Some(link) = link_of(p.interface) else {
            continue;
        };
        let frame = frame_with(p, &tag(nonce, i as u32));
        let mut ip = frame[14..].to_vec();
        if p.direction == Direction::Ingress {
            fix_checksums(&mut ip);
        }
        send(link, p, &ip, [frame[12], frame[13]])?;
    }
    let mut arrived = BTreeSet::new();
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(40)
        && started.elapsed() < Duration::from_secs(2)
    {
        let mut got = false;
        for &(fd, direction) in sources {
            while let Some(data) = receive(fd) {
                let index = tagged(&data, nonce).map(|i| i as usize);
                if let Some(i) =
                    index.filter(|i| packets.get(*i).is_some_and(|p| p.direction == direction))
                {
                    arrived.insert(i);
                }
                got = true;
            }
        }
        if got {
            quiet_since = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(packets
        .iter()
        .enumerate()
        .map(|(i, p)| link_of(p.interface).map(|_| arrived.contains(&i)))
        .collect())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::kernel("cannot run ip", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Runtime(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

pub fn tag(nonce: u16, i: u32) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[..2].copy_from_slice(&MAGIC);
    t[2..4].copy_from_slice(&nonce.to_be_bytes());
    t[4..].copy_from_slice(&i.to_be_bytes());
    t
}

/// The packet index of a received packet that ends in a tag of this batch.
pub fn tagged(data: &[u8], nonce: u16) -> Option<u32> {
    let end = ip_end(data);
    let t = data.get(end.checked_sub(8)?..end)?;
    (t[..2] == MAGIC && t[2..4] == nonce.to_be_bytes())
        .then(|| u32::from_be_bytes([t[4], t[5], t[6], t[7]]))
}

/// Where the IP packet in `data` ends (a raw IPv6 socket gives the payload only: its end).
pub fn ip_end(data: &[u8]) -> usize {
    match data.first().map(|b| b >> 4) {
        Some(4) if data.len() >= 20 => {
            usize::from(u16::from_be_bytes([data[2], data[3]])).min(data.len())
        }
        Some(6) if data.len() >= 40 => {
            (40 + usize::from(u16::from_be_bytes([data[4], data[5]]))).min(data.len())
        }
        _ => data.len(),
    }
}

pub fn socket(domain: i32, kind: i32, protocol: i32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(Error::kernel(
            "cannot open a scratch socket",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn set_option(fd: &OwnedFd, level: i32, name: i32, value: &[u8]) -> Result<()> {
    // SAFETY: value points to value.len() readable bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::kernel(
            format!("setsockopt {level}/{name}"),
            std::io::Error::last_os_error(),
        ))
    }
}

/// The next packet a socket has; on a packet socket, what it saw leave is skipped.
pub fn receive(fd: &OwnedFd) -> Option<Vec<u8>> {
    loop {
        let mut buf = vec![0u8; 4096];
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buf has buf.len() writable bytes, from has len.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            return None;
        }
        if i32::from(from.sll_family) == libc::AF_PACKET
            && from.sll_pkttype == libc::PACKET_OUTGOING
        {
            continue;
        }
        buf.truncate(n as usize);
        return Some(buf);
    }
}

/// Sends `ip` from a raw socket of its family (`[v4, v6]`, bound to the link whose ifindex is
/// given) with the packet's mark; a refusal by the filter is expected.
pub fn send_ip(senders: [&OwnedFd; 2], ifindex: u32, ip: &[u8], p: &Packet) -> Result<()> {
    // SAFETY: all-zero is a valid sockaddr_storage; the family-specific part is written below.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (fd, len) = match p.remote {
        IpAddr::V4(v4) => {
            // SAFETY: all-zero is a valid sockaddr_in.
            let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            a.sin_family = libc::AF_INET as u16;
            a.sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, a) };
            (senders[0], std::mem::size_of::<libc::sockaddr_in>())
        }
        IpAddr::V6(v6) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            a.sin6_family = libc::AF_INET6 as u16;
            a.sin6_addr.s6_addr = v6.octets();
            if v6.segments()[0] & 0xffc0 == 0xfe80 || v6.segments()[0] == 0xff02 {
                a.sin6_scope_id = ifindex;
            }
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, a) };
            (senders[1], std::mem::size_of::<libc::sockaddr_in6>())
        }
    };
    set_option(fd, libc::SOL_SOCKET, libc::SO_MARK, &p.mark.to_ne_bytes())?;
    // SAFETY: storage is initialised for len bytes, ip is readable. A refusal is a verdict.
    unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            ip.as_ptr().cast(),
            ip.len(),
            0,
            &storage as *const _ as *const libc::sockaddr,
            len as u32,
        );
    }
    Ok(())
}

/// Sends an IP packet from a packet socket on the link's peer (its ifindex given) to the MAC
/// address of the filtered side.
pub fn send_frame(
    peer: &OwnedFd,
    peer_ifindex: i32,
    mac: [u8; 6],
    ip: &[u8],
    ethertype: [u8; 2],
) -> Result<()> {
    // SAFETY: all-zero is a valid sockaddr_ll; the fields set below address the frame.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = peer_ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&mac);
    // The DGRAM socket adds the link header itself: give it the IP packet only.
    addr.sll_protocol = u16::from_be_bytes(ethertype).to_be();
    // SAFETY: addr is a valid sockaddr_ll, ip is readable.
    let rc = unsafe {
        libc::sendto(
            peer.as_raw_fd(),
            ip.as_ptr().cast(),
            ip.len(),
            0,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(Error::kernel(
            format!("cannot send {} bytes into the filtered namespace", ip.len()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The IPv4 header checksum, and the ICMPv6 checksum (a raw ICMPv6 socket checks it); the
/// others are not read before a raw socket gets the packet.
pub fn fix_checksums(ip: &mut [u8]) {
    match ip[0] >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&ip[..ihl], 0);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        6 => {
            let mut next = ip[6];
            let mut at = 40;
            while matches!(next, 0 | 43 | 44 | 60) && at + 8 <= ip.len() {
                let len = if next == 44 {
                    8
                } else {
                    (usize::from(ip[at + 1]) + 1) * 8
                };
                next = ip[at];
                at += len;
            }
            if next == 58 && at + 4 <= ip.len() {
                ip[at + 2..at + 4].copy_from_slice(&[0, 0]);
                let mut pseudo: Vec<u8> = ip[8..40].to_vec();
                pseudo.extend_from_slice(&((ip.len() - at) as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 58]);
                let partial = sum_words(&pseudo, 0);
                let sum = checksum(&ip[at..], partial);
                ip[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
            }
        }
        _ => {}
    }
}

pub fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

pub fn checksum(data: &[u8], start: u32) -> u16 {
    let mut sum = sum_words(data, start);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
