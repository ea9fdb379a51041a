//! Map keys, values and reason codes shared by the kernel programs and user space.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel programs and the loader must agree on
//! the byte layout of every map entry, so this crate is the single place that defines it.
#![cfg_attr(not(feature = "user"), no_std)]

/// `lo` has this ifindex in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// IP protocol numbers the policy distinguishes.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Capacity of the tunnel and uplink interface maps.
pub const MAX_INTERFACES: u32 = 256;
/// Capacity of the server map (address, port, protocol entries).
pub const MAX_SERVERS: u32 = 262_144;
/// Capacity of the LAN prefix trie and of the NTP / DNS server and inbound-port maps.
pub const MAX_PREFIXES: u32 = 4096;
pub const MAX_ADDRESSES: u32 = 4096;
/// IPv6 extension headers walked before the transport header counts as unreadable.
pub const MAX_EXTENSION_HEADERS: u32 = 6;
/// Capacity of the `VPN_CLIENTS` map (cgroup ids whose sockets may reach the servers).
pub const MAX_VPN_CLIENTS: u32 = 64;
/// Deepest cgroup level a VPN client's cgroup may sit at (`a/b` is level 2).
pub const MAX_VPN_CLIENT_LEVEL: u32 = 31;
/// Bytes of the `LOCKDOWN` map's one value: why the scope is in lockdown (UTF-8, NUL-padded;
/// all NUL while the policy is in force).
pub const LOCKDOWN_REASON_BYTES: usize = 512;
/// Drop events each CPU keeps in `RECENT_DROPS` for `status` (the newest overwrite the oldest).
pub const RECENT_DROPS_PER_CPU: u32 = 4;

/// `GUARDED` values besides a link-layer header length: a device the guard watches that is not
/// an uplink (`uplinks` does not name it: nothing passes), and one whose frames it cannot read
/// (nothing passes either).
pub const GUARD_NOT_AN_UPLINK: u8 = 254;
pub const GUARD_UNREADABLE: u8 = 255;

/// An interface the policy trusts, named by ifindex *and* network namespace: ifindexes are only
/// unique inside one namespace, and a scope's programs also see its processes in other namespaces.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceKey {
    /// `bpf_get_netns_cookie` / `SO_NETNS_COOKIE` of the interface's namespace.
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

impl InterfaceKey {
    pub const fn new(netns_cookie: u64, ifindex: u32) -> Self {
        Self {
            netns_cookie,
            ifindex,
            _pad: 0,
        }
    }
}

/// Port value meaning "any port" in a [`ServerKey`].
pub const ANY_PORT: u16 = 0;
/// Protocol value meaning "TCP or UDP" in a [`ServerKey`].
pub const ANY_PROTOCOL: u8 = 0;

/// One VPN server endpoint. IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so one map
/// serves both families.
// Word-aligned (same size, same layout): the programs build the key a word at a time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerKey {
    pub addr: [u8; 16],
    /// Host byte order; [`ANY_PORT`] for every port.
    pub port: u16,
    /// [`IPPROTO_TCP`], [`IPPROTO_UDP`] or [`ANY_PROTOCOL`].
    pub protocol: u8,
    pub _pad: u8,
}

impl ServerKey {
    pub const fn new(addr: [u8; 16], port: u16, protocol: u8) -> Self {
        Self {
            addr,
            port,
            protocol,
            _pad: 0,
        }
    }
}

/// Which hostname put a server endpoint in `SERVERS` (`SERVER_NAMES`, never read by the
/// programs): a name that fails to resolve later keeps the addresses it had, across `up` runs
/// and daemon restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedServerKey {
    /// A stable hash of the hostname (FNV-1a, 64 bits).
    pub name: u64,
    pub server: ServerKey,
    pub _pad: u32,
}

/// Scope-wide switches, one entry in the `SETTINGS` array map. The switches are 0 or 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `uplinks` is configured: exceptions leave only through the `UPLINKS` map.
    pub uplinks_restricted: u32,
    /// `[dhcp] enabled`.
    pub dhcp: u32,
    /// `[lan] dns`: DNS to LAN addresses is allowed.
    pub lan_dns: u32,
    /// `[ipv6] mode = "block"`: every IPv6 packet except loopback is dropped.
    pub ipv6_block: u32,
    /// `[vpn_client]` is set: the server exception holds only for sockets of the VPN client's
    /// cgroups (`VPN_CLIENTS`) or packets carrying `vpn_client_mark`.
    pub vpn_client: u32,
    /// The skb mark that identifies the VPN client's packets; 0: none (a mark of 0 is what
    /// every unmarked packet carries, so the config refuses it).
    pub vpn_client_mark: u32,
    /// Bit `n` set: some cgroup in `VPN_CLIENTS` is at level `n` (its ancestor id at that level
    /// is looked up, so a client's child cgroups are the client too).
    pub vpn_client_levels: u32,
    /// Which lists hold no entry ([`lists`] bits), written with the maps: the programs skip the
    /// lookups no entry can answer. Set means empty, so that 0 (a zeroed value, or one written
    /// by an older build whose field this was padding) looks everything up. A bit missing for an
    /// empty list costs a lookup; a bit set for a list with entries would drop what they allow,
    /// so writers clear bits before adding entries and set them after removing.
    pub empty_lists: u32,
    /// `[guard]` is on: the uplink guard judges every frame on the uplinks, so a packet of a
    /// socket in another network namespace (a container's) is passed here and judged there,
    /// once the host forwards it.
    pub guard: u32,
    pub _pad: u32,
    /// Bit [`tunnel_bit`]`(ifindex)` set: no `TUNNELS` entry has an ifindex with that bit, so
    /// the programs skip the lookup (most packets leave by an uplink, not a tunnel). Set means
    /// free, so that 0 looks everything up. A bit set where a tunnel is held would judge the
    /// tunnel's packets as an uplink's, so writers clear bits before adding tunnels and set
    /// them after removing. The field made Settings grow from 64 to 72 bytes, which matters:
    /// an older build (one that would add a tunnel without clearing its bit) cannot open a map
    /// of another value size.
    pub tunnel_free: u64,
    /// The scope's own network namespace (where `up` ran): DHCP is allowed only on its
    /// interfaces, never on a container's.
    pub netns_cookie: u64,
    /// Drop events: at most one per this many nanoseconds per CPU on average...
    pub event_interval_ns: u64,
    /// ...with bursts of up to this many nanoseconds' worth of events (`burst × interval`).
    pub event_burst_ns: u64,
}

// Older builds' Settings are 64 bytes: they must not be able to open this map (see
// `tunnel_free`).
const _: () = assert!(core::mem::size_of::<Settings>() == 72);

/// The bit of [`Settings::tunnel_free`] an interface with this ifindex shares.
pub const fn tunnel_bit(ifindex: u32) -> u64 {
    1 << (ifindex % 64)
}

/// Bits of [`Settings::empty_lists`]: lists (and kinds of server key).
pub mod lists {
    /// A server key with a port and a protocol.
    pub const SERVER_PORT_PROTOCOL: u32 = 1 << 0;
    /// A server key with a port and [`super::ANY_PROTOCOL`].
    pub const SERVER_PORT: u32 = 1 << 1;
    /// A server key with [`super::ANY_PORT`] and a protocol.
    pub const SERVER_PROTOCOL: u32 = 1 << 2;
    /// A server key with neither.
    pub const SERVER_ADDRESS: u32 = 1 << 3;
    pub const NTP: u32 = 1 << 4;
    pub const DNS: u32 = 1 << 5;
    pub const LAN: u32 = 1 << 6;
    pub const INBOUND: u32 = 1 << 7;
    pub const SERVERS: u32 = SERVER_PORT_PROTOCOL | SERVER_PORT | SERVER_PROTOCOL | SERVER_ADDRESS;
    pub const ALL: u32 = SERVERS | NTP | DNS | LAN | INBOUND;

    /// The bit of a server key's kind.
    pub const fn server_kind(key: &super::ServerKey) -> u32 {
        match (
            key.port == super::ANY_PORT,
            key.protocol == super::ANY_PROTOCOL,
        ) {
            (false, false) => SERVER_PORT_PROTOCOL,
            (false, true) => SERVER_PORT,
            (true, false) => SERVER_PROTOCOL,
            (true, true) => SERVER_ADDRESS,
        }
    }
}

/// Default drop-event budget per CPU: 100 events a second, bursts of 20.
pub const EVENT_INTERVAL_NS: u64 = 10_000_000;
pub const EVENT_BURST_NS: u64 = 20 * EVENT_INTERVAL_NS;
/// Size of the drop-event ring buffer (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// Per-CPU state of the drop-event rate limiter (one entry in `EVENT_LIMIT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventLimit {
    /// When the bucket is next empty (GCRA theoretical arrival time), `bpf_ktime_get_coarse_ns`
    /// clock.
    pub next_ns: u64,
    /// Events not sent since this CPU's last sent event.
    pub suppressed: u64,
    /// Events not sent since the scope was set up (rate limit or full ring buffer).
    pub suppressed_total: u64,
    /// Events this CPU reported (sent or not, past the rate limit): the next `RECENT_DROPS`
    /// slot is this modulo [`RECENT_DROPS_PER_CPU`].
    pub reported: u64,
}

/// One dropped packet, as the kernel reports it through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_coarse_ns` (monotonic, one tick) when the packet was dropped.
    pub timestamp_ns: u64,
    /// The cgroup (v2) of the packet's socket; 0 when unknown.
    pub cgroup_id: u64,
    /// Events this CPU did not send since its previous one.
    pub suppressed: u64,
    /// Network namespace of the interface (`SO_NETNS_COOKIE` form).
    pub netns_cookie: u64,
    /// IPv4 addresses are IPv4-mapped.
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub ifindex: u32,
    /// Host byte order; meaningful only when `ports_known` is 1.
    pub source_port: u16,
    pub destination_port: u16,
    /// A [`Reason`] value.
    pub reason: u8,
    /// A [`Direction`] value.
    pub direction: u8,
    /// 4 or 6; 0 when the IP header could not be read.
    pub family: u8,
    /// Upper-layer protocol; 255 when the IPv6 header chain was not followed to its end.
    pub protocol: u8,
    pub ports_known: u8,
    /// To the struct's 8-byte alignment, so no byte of it is undefined (it is `Pod`).
    pub _pad: [u8; 11],
}

const _: () = assert!(core::mem::size_of::<DropEvent>() == 88);
const _: () = assert!(core::mem::size_of::<EventLimit>() == 32);

/// An `[[inbound]]` entry: TCP port on the tunnel, and a source (all zero = any source).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundKey {
    pub source: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

impl InboundKey {
    pub const ANY_SOURCE: [u8; 16] = [0; 16];

    pub const fn new(source: [u8; 16], port: u16) -> Self {
        Self {
            source,
            port,
            _pad: 0,
        }
    }
}

/// Which program saw the packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Egress = 0,
    Ingress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Egress, Direction::Ingress];

    pub const fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

/// Why a packet got its verdict. Every packet increments exactly one counter:
/// `COUNTERS[direction * REASON_SLOTS + reason]`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Allowed: loopback interface.
    Loopback = 0,
    /// Allowed: a tunnel interface.
    Tunnel = 1,
    /// Allowed: a VPN server endpoint.
    Server = 2,
    /// Dropped: `uplinks` is set and the interface is neither a tunnel nor an uplink.
    NotUplink = 3,
    /// Dropped: nothing in the policy allows it.
    Default = 4,
    /// Dropped: the IP header could not be read.
    Malformed = 5,
    /// Allowed: DHCPv4 / DHCPv6 client-server exchange.
    Dhcp = 6,
    /// Allowed: UDP 123 with a configured NTP server.
    Ntp = 7,
    /// Allowed: port 53/853 with a configured DNS server.
    Dns = 8,
    /// Allowed: an address in a configured LAN prefix.
    Lan = 9,
    /// Allowed: IPv6 neighbour discovery (ICMPv6 133-137, link-local or ff02::/16).
    NeighbourDiscovery = 10,
    /// Dropped: DNS to a LAN address while `lan.dns = false` (a DNS leak).
    LanDns = 11,
    /// Dropped: IPv6 while `ipv6.mode = "block"`.
    Ipv6Blocked = 12,
    /// Dropped: unsolicited inbound TCP on the tunnel to a port not in `[[inbound]]`.
    InboundRefused = 13,
    /// Allowed: an ICMP/ICMPv6 error on an uplink about a packet the egress policy allows
    /// (path-MTU discovery towards a server).
    IcmpError = 14,
    /// Dropped: outside the tunnel, an IPv4 packet with header options (source routes among
    /// them) or an IPv6 packet whose routing header still has segments to visit.
    SourceRoute = 15,
    /// Dropped: to a VPN server, from a socket that is not the `[vpn_client]`'s.
    NotVpnClient = 16,
    /// Allowed (with `[guard]`): a packet of another network namespace's socket; if the host
    /// forwards it to an uplink, the guard judges it there.
    OtherNamespace = 17,
    /// Allowed by the guard: ARP or EAPOL (802.1X, WPA keys), which carry no IP.
    LinkControl = 18,
    /// Dropped by the guard: a frame of another non-IP protocol.
    NotIp = 19,
}

/// Counter slots reserved per direction; more than the reasons so new ones keep the map layout.
pub const REASON_SLOTS: u32 = 32;
/// Entries in the `COUNTERS` per-CPU array.
pub const COUNTER_ENTRIES: u32 = REASON_SLOTS * 2;

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::Loopback,
        Reason::OtherNamespace,
        Reason::Tunnel,
        Reason::Server,
        Reason::Dhcp,
        Reason::Ntp,
        Reason::Dns,
        Reason::Lan,
        Reason::NeighbourDiscovery,
        Reason::IcmpError,
        Reason::LinkControl,
        Reason::NotUplink,
        Reason::NotVpnClient,
        Reason::LanDns,
        Reason::Ipv6Blocked,
        Reason::InboundRefused,
        Reason::Default,
        Reason::Malformed,
        Reason::SourceRoute,
        Reason::NotIp,
    ];

    /// The verdict this reason carries: `true` = allow.
    pub const fn allows(self) -> bool {
        matches!(
            self,
            Reason::Loopback
                | Reason::Tunnel
                | Reason::Server
                | Reason::Dhcp
                | Reason::Ntp
                | Reason::Dns
                | Reason::Lan
                | Reason::NeighbourDiscovery
                | Reason::IcmpError
                | Reason::OtherNamespace
                | Reason::LinkControl
        )
    }

    /// Whether the uplink guard can give this reason (it never sees loopback, the tunnel or a
    /// socket's namespace).
    pub const fn guard_gives(self) -> bool {
        !matches!(
            self,
            Reason::Loopback | Reason::Tunnel | Reason::InboundRefused | Reason::OtherNamespace
        )
    }

    /// Stable name used by `status`, logs and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Loopback => "loopback",
            Reason::Tunnel => "tunnel",
            Reason::Server => "server",
            Reason::NotUplink => "not-uplink",
            Reason::Default => "default-drop",
            Reason::Malformed => "malformed",
            Reason::SourceRoute => "source-route",
            Reason::NotVpnClient => "not-vpn-client",
            Reason::Dhcp => "dhcp",
            Reason::Ntp => "ntp",
            Reason::Dns => "dns",
            Reason::Lan => "lan",
            Reason::NeighbourDiscovery => "neighbour-discovery",
            Reason::LanDns => "lan-dns",
            Reason::Ipv6Blocked => "ipv6-blocked",
            Reason::InboundRefused => "inbound-refused",
            Reason::IcmpError => "icmp-error",
            Reason::OtherNamespace => "other-namespace",
            Reason::LinkControl => "link-control",
            Reason::NotIp => "not-ip",
        }
    }

    /// The step of the SPEC's verdict order that gave this verdict (1-10; the checks of a
    /// step's packet, such as the tunnel's inbound ports, carry its number).
    pub const fn step(self) -> u8 {
        match self {
            Reason::Loopback | Reason::OtherNamespace => 1,
            Reason::Tunnel | Reason::Ipv6Blocked | Reason::InboundRefused => 2,
            Reason::NotUplink => 3,
            Reason::Server | Reason::NotVpnClient => 4,
            Reason::Dhcp => 5,
            Reason::Ntp => 6,
            Reason::Dns => 7,
            Reason::Lan | Reason::LanDns => 8,
            Reason::NeighbourDiscovery | Reason::IcmpError | Reason::LinkControl => 9,
            Reason::Default | Reason::Malformed | Reason::SourceRoute | Reason::NotIp => 10,
        }
    }

    /// The reason with this numeric value, as carried by a [`DropEvent`] or returned by the
    /// programs' global function. A match, not a search: in a BPF program it is one range check.
    pub const fn from_value(value: u32) -> Option<Reason> {
        Some(match value {
            0 => Reason::Loopback,
            1 => Reason::Tunnel,
            2 => Reason::Server,
            3 => Reason::NotUplink,
            4 => Reason::Default,
            5 => Reason::Malformed,
            6 => Reason::Dhcp,
            7 => Reason::Ntp,
            8 => Reason::Dns,
            9 => Reason::Lan,
            10 => Reason::NeighbourDiscovery,
            11 => Reason::LanDns,
            12 => Reason::Ipv6Blocked,
            13 => Reason::InboundRefused,
            14 => Reason::IcmpError,
            15 => Reason::SourceRoute,
            16 => Reason::NotVpnClient,
            17 => Reason::OtherNamespace,
            18 => Reason::LinkControl,
            19 => Reason::NotIp,
            _ => return None,
        })
    }

    pub const fn counter_index(self, direction: Direction) -> u32 {
        direction as u32 * REASON_SLOTS + self as u32
    }
}

// The map entries' sizes are the kernel's key and value sizes: a change is a new map shape.
const _: () = assert!(core::mem::size_of::<ServerKey>() == 20);
const _: () = assert!(core::mem::size_of::<InboundKey>() == 20);
const _: () = assert!(core::mem::size_of::<NamedServerKey>() == 32);
const _: () = assert!(core::mem::size_of::<InterfaceKey>() == 16);

/// Returns an IPv4 address as its IPv4-mapped IPv6 form, the key form of every address map.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data with explicit padding fields and no invalid bit patterns.
    unsafe impl aya::Pod for super::InterfaceKey {}
    unsafe impl aya::Pod for super::ServerKey {}
    unsafe impl aya::Pod for super::NamedServerKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::EventLimit {}
    unsafe impl aya::Pod for super::DropEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_comes_back_from_its_value() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_value(reason as u32), Some(reason));
        }
        let known = (0..REASON_SLOTS)
            .filter(|&v| Reason::from_value(v).is_some())
            .count();
        assert_eq!(known, Reason::ALL.len());
        assert_eq!(Reason::from_value(u32::MAX), None);
    }
}
