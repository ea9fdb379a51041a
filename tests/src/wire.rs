//! Real packets through a filter, for the differential tests.
//!
//! A client namespace has `tun0`, `up0` and `other0`: veths with ARP off, each wired to a peer
//! (`tun0p`, ...) in a far namespace. Egress: a raw socket in the client sends the IP packet out
//! of the chosen interface, and a packet socket on the peer sees whether it arrived. Ingress: a
//! packet socket on the peer sends the frame in, and raw sockets in the client (one per
//! protocol) see whether it reached a socket. Every packet carries a tag after its transport
//! header, so a batch is sent at once and sorted out afterwards.

use std::{
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
};

use killswitch::{
    model::{Direction, Packet},
    verify::wire::{self, exchange, send_frame, send_ip},
};

use crate::{
    random::{ME4, ME6},
    Cgroup, Netns,
};

/// The interfaces a packet can use, as the policy names them.
pub const LINKS: [&str; 3] = ["tun0", "up0", "other0"];
/// Protocols a raw socket listens for, per family.
const PROTOCOLS: [i32; 7] = [1, 6, 17, 47, 50, 51, 135];
const PROTOCOLS6: [i32; 7] = [58, 6, 17, 47, 50, 51, 135];

struct Link {
    client_ifindex: u32,
    client_mac: [u8; 6],
    peer_ifindex: i32,
    /// On the peer: sees what left the client, sends what enters it.
    peer_socket: OwnedFd,
    send4: OwnedFd,
    send6: OwnedFd,
    /// The same, made in the VPN client's cgroup (or where the others are, without one).
    client4: OwnedFd,
    client6: OwnedFd,
}

/// A client namespace, its far side, and the sockets on both.
pub struct World {
    links: Vec<Link>,
    receivers: Vec<OwnedFd>,
    pub client: Netns,
    pub far: Netns,
}

impl World {
    /// A new pair of namespaces; the client's sockets are created inside `cgroup` when given
    /// (a cgroup program judges a socket by the cgroup it was created in), and a second set of
    /// senders inside `vpn_client` (the packets whose `vpn_client` is true leave from those).
    pub fn new(cgroup: Option<&Cgroup>, vpn_client: Option<&Cgroup>) -> World {
        let client = Netns::new("wc");
        let far = Netns::new("wf");
        for link in LINKS {
            let peer = format!("{link}p");
            client.veth(link, &far, &peer);
            client.ip(&["link", "set", link, "arp", "off"]);
        }
        client.addr("up0", &format!("{ME4}/32"));
        client.addr("up0", &format!("{ME6}/128"));
        for (metric, link) in LINKS.iter().enumerate() {
            let metric = (metric + 1).to_string();
            client.ip(&["route", "add", "default", "dev", link, "metric", &metric]);
            client.ip(&[
                "-6", "route", "add", "default", "dev", link, "metric", &metric,
            ]);
        }
        // No router solicitations or MLD reports of our own in the captures.
        for key in [
            "net.ipv6.conf.all.router_solicitations",
            "net.ipv6.conf.default.router_solicitations",
        ] {
            client.sysctl(key, "0");
        }
        let sockets = || {
            let mut receivers = Vec::new();
            for p in PROTOCOLS {
                receivers.push(socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    p,
                ));
            }
            for p in PROTOCOLS6 {
                receivers.push(socket(
                    libc::AF_INET6,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    p,
                ));
            }
            let senders: Vec<(OwnedFd, OwnedFd)> = LINKS
                .iter()
                .map(|link| {
                    let send4 = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
                    let send6 = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW);
                    for fd in [&send4, &send6] {
                        set_option(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, link.as_bytes());
                        set_option(
                            fd,
                            libc::SOL_SOCKET,
                            libc::SO_BROADCAST,
                            &1i32.to_ne_bytes(),
                        );
                    }
                    (send4, send6)
                })
                .collect();
            (receivers, senders)
        };
        let (receivers, senders) = in_netns(&client, || match cgroup {
            Some(cgroup) => in_cgroup(cgroup, sockets),
            None => sockets(),
        });
        let (_, client_senders) = in_netns(&client, || match vpn_client.or(cgroup) {
            Some(cgroup) => in_cgroup(cgroup, sockets),
            None => sockets(),
        });
        let links = LINKS
            .iter()
            .zip(senders.into_iter().zip(client_senders))
            .map(|(link, ((send4, send6), (client4, client6)))| {
                let peer = format!("{link}p");
                let peer_ifindex = far.ifindex(&peer) as i32;
                let peer_socket = in_netns(&far, || {
                    let fd = socket(
                        libc::AF_PACKET,
                        libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                        i32::from((libc::ETH_P_ALL as u16).to_be()),
                    );
                    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    addr.sll_family = libc::AF_PACKET as u16;
                    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                    addr.sll_ifindex = peer_ifindex;
                    // SAFETY: a valid sockaddr_ll of the size given.
                    let rc = unsafe {
                        libc::bind(
                            fd.as_raw_fd(),
                            &addr as *const _ as *const libc::sockaddr,
                            std::mem::size_of::<libc::sockaddr_ll>() as u32,
                        )
                    };
                    assert_eq!(
                        rc,
                        0,
                        "bind packet socket: {}",
                        std::io::Error::last_os_error()
                    );
                    set_option(
                        &fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUF,
                        &(8i32 << 20).to_ne_bytes(),
                    );
                    fd
                });
                Link {
                    client_ifindex: client.ifindex(link),
                    client_mac: mac(&client, link),
                    peer_ifindex,
                    peer_socket,
                    send4,
                    send6,
                    client4,
                    client6,
                }
            })
            .collect();
        for fd in &receivers {
            set_option(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &(8i32 << 20).to_ne_bytes(),
            );
        }
        World {
            links,
            receivers,
            client,
            far,
        }
    }

    /// Sends every packet (loopback ones excluded: they never leave) and returns, per packet,
    /// whether it arrived: on the far side (egress) or at a client socket (ingress; an ICMP
    /// error the client sends back quotes the tag too). `nonce` keeps batches apart.
    pub fn deliver(&self, packets: &[Packet], nonce: u16) -> Vec<bool> {
        let client = self.receivers.iter().map(|fd| (fd, Direction::Ingress));
        let far = self
            .links
            .iter()
            .map(|l| (&l.peer_socket, Direction::Egress));
        let sources: Vec<_> = client.chain(far).collect();
        let arrived = exchange(packets, nonce, &sources, |link, p, ip, ethertype| {
            let link = &self.links[link];
            match p.direction {
                // From the VPN client's sockets or the others', with the packet's mark.
                Direction::Egress if p.vpn_client => {
                    send_ip([&link.client4, &link.client6], link.client_ifindex, ip, p)
                }
                Direction::Egress => {
                    send_ip([&link.send4, &link.send6], link.client_ifindex, ip, p)
                }
                Direction::Ingress => send_frame(
                    &link.peer_socket,
                    link.peer_ifindex,
                    link.client_mac,
                    ip,
                    ethertype,
                ),
            }
        })
        .expect("a batch of packets");
        arrived.into_iter().map(|a| a.unwrap_or(false)).collect()
    }
}

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    wire::socket(domain, kind, protocol).expect("a socket")
}

fn set_option(fd: &OwnedFd, level: i32, name: i32, value: &[u8]) {
    wire::set_option(fd, level, name, value).expect("a socket option");
}

fn mac(netns: &Netns, dev: &str) -> [u8; 6] {
    let out = netns.ip(&["-o", "link", "show", "dev", dev]);
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a MAC address");
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(hex, 16).expect("hex");
    }
    mac
}

/// Runs `f` on this thread inside `netns`, then returns to the thread's own namespace.
pub fn in_netns<T>(netns: &Netns, f: impl FnOnce() -> T) -> T {
    let home = File::open("/proc/thread-self/ns/net").expect("own netns");
    let there = File::open(netns.path()).expect("open netns");
    nix::sched::setns(there, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    nix::sched::setns(home, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns back");
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `f` with this whole process inside `cgroup`, then moves it back where it was.
/// Runs `f` with this whole process in `cgroup` (sockets made there belong to it).
pub fn in_cgroup<T>(cgroup: &Cgroup, f: impl FnOnce() -> T) -> T {
    // The whole process moves: two tests of one binary must not do it at once.
    static MOVED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _moved = MOVED.lock().unwrap_or_else(|e| e.into_inner());
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let home = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .trim_start_matches('/')
        .to_owned();
    let home = crate::cgroup::killswitch_cgroup2_mount()
        .join(home)
        .join("cgroup.procs");
    let pid = std::process::id().to_string();
    std::fs::write(cgroup.procs(), &pid).expect("join the test cgroup");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::fs::write(&home, &pid).expect("back to the original cgroup");
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}
