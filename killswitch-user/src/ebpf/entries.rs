//! Policy -> the exact entries the kernel maps must hold. Pure: no kernel access here.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use killswitch_common::{
    ipv4_mapped, lists, tunnel_bit, InboundKey, InterfaceKey, NamedServerKey, ServerKey, Settings,
    ANY_PORT, ANY_PROTOCOL, EVENT_BURST_NS, EVENT_INTERVAL_NS, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    interfaces::{self, Interface},
    policy::{Ipv6Mode, Policy, Prefix, Protocol, ServerEndpoint},
    vpn_client::ClientCgroup,
};

/// Everything one scope's maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    pub settings: Settings,
    pub interfaces: InterfaceEntries,
    pub servers: BTreeSet<ServerKey>,
    /// Which hostname gave which of `servers` (empty unless the caller records names).
    pub server_names: BTreeSet<NamedServerKey>,
    pub ntp_servers: BTreeSet<[u8; 16]>,
    pub dns_servers: BTreeSet<[u8; 16]>,
    /// (prefix length in the 128-bit key space, key).
    pub lan: BTreeSet<(u32, [u8; 16])>,
    pub inbound: BTreeSet<InboundKey>,
    /// Cgroup ids of the `[vpn_client]`.
    pub vpn_clients: BTreeSet<u64>,
    /// The policy's [`Policy::fingerprint`]; 0: none recorded (an older build's scope).
    pub policy: u64,
}

/// What the interface maps hold: all that a link appearing or going away can change, built
/// without the lists (a link event must not wait for 10,000 server keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceEntries {
    /// Interface key -> name, for messages.
    pub tunnels: BTreeMap<InterfaceKey, String>,
    pub uplinks: BTreeMap<InterfaceKey, String>,
    /// The devices the uplink guard watches ([`interfaces::guarded`]).
    pub guarded: super::guard::Guarded,
}

impl InterfaceEntries {
    /// The [`Settings::tunnel_free`] bits for these tunnels: every bit no tunnel's ifindex has.
    pub fn tunnel_free(&self) -> u64 {
        self.tunnels
            .keys()
            .fold(u64::MAX, |free, key| free & !tunnel_bit(key.ifindex))
    }

    /// The tunnels and uplinks of `policy` among `interfaces`, in the namespace whose cookie
    /// is `netns_cookie`, and the devices the guard is to watch now (`guarded`, from
    /// [`interfaces::guarded`]; none without the guard). Asked for, so that no caller forgets
    /// them: a device missing from the guard's map passes nothing.
    pub fn new(
        policy: &Policy,
        interfaces: &[Interface],
        netns_cookie: u64,
        guarded: Vec<(Interface, u8)>,
    ) -> InterfaceEntries {
        let keyed = |found: Vec<Interface>| {
            found
                .into_iter()
                .map(|i| (InterfaceKey::new(netns_cookie, i.index), i.name))
                .collect()
        };
        InterfaceEntries {
            tunnels: keyed(interfaces::matching(interfaces, &policy.tunnels)),
            uplinks: keyed(
                policy
                    .uplinks
                    .as_deref()
                    .map(|u| interfaces::matching(interfaces, u))
                    .unwrap_or_default(),
            ),
            guarded: guarded
                .into_iter()
                .map(|(i, header)| (i.index, (i.name, header)))
                .collect(),
        }
    }
}

impl MapEntries {
    /// The entries for `policy` given the interfaces that exist now in the namespace whose
    /// cookie is `netns_cookie`, the resolved server endpoints, the VPN client cgroups that
    /// exist now and the devices the guard is to watch (see [`InterfaceEntries::new`]).
    pub fn new(
        policy: &Policy,
        interfaces: &[Interface],
        netns_cookie: u64,
        servers: &[ServerEndpoint],
        clients: &[ClientCgroup],
        guarded: Vec<(Interface, u8)>,
    ) -> MapEntries {
        let mut entries = MapEntries {
            settings: Settings {
                uplinks_restricted: u32::from(policy.uplinks.is_some()),
                dhcp: u32::from(policy.dhcp),
                lan_dns: u32::from(policy.lan.dns),
                ipv6_block: u32::from(policy.ipv6 == Ipv6Mode::Block),
                vpn_client: u32::from(policy.vpn_client.is_some()),
                vpn_client_mark: policy.vpn_client.as_ref().and_then(|c| c.mark).unwrap_or(0),
                vpn_client_levels: clients.iter().fold(0, |levels, c| levels | 1 << c.level),
                empty_lists: 0,
                guard: u32::from(policy.guarded()),
                _pad: 0,
                tunnel_free: 0,
                netns_cookie,
                event_interval_ns: EVENT_INTERVAL_NS,
                event_burst_ns: EVENT_BURST_NS,
            },
            interfaces: InterfaceEntries::new(policy, interfaces, netns_cookie, guarded),
            servers: servers.iter().map(server_key).collect(),
            server_names: BTreeSet::new(),
            ntp_servers: policy
                .ntp_servers
                .iter()
                .map(|&ip| address_key(ip))
                .collect(),
            dns_servers: policy
                .dns_servers
                .iter()
                .map(|&ip| address_key(ip))
                .collect(),
            lan: policy.lan.networks.iter().map(lan_key).collect(),
            inbound: policy
                .inbound
                .iter()
                .flat_map(|rule| {
                    let sources: Vec<[u8; 16]> = if rule.sources.is_empty() {
                        vec![InboundKey::ANY_SOURCE]
                    } else {
                        rule.sources.iter().map(|&ip| address_key(ip)).collect()
                    };
                    sources
                        .into_iter()
                        .map(move |source| InboundKey::new(source, rule.port))
                })
                .collect(),
            vpn_clients: clients.iter().map(|c| c.id).collect(),
            policy: policy.fingerprint(),
        };
        entries.settings.empty_lists = entries.empty_lists();
        entries.settings.tunnel_free = entries.interfaces.tunnel_free();
        entries
    }

    /// The [`Settings::empty_lists`] bits for these entries: which lists, and which kinds of
    /// server key, hold nothing.
    pub fn empty_lists(&self) -> u32 {
        lists::ALL & !self.lists()
    }

    /// Which lists, and which kinds of server key, hold something.
    fn lists(&self) -> u32 {
        let servers = crate::ebpf::maps::server_kinds(self.servers.iter());
        let bit = |present: bool, bit: u32| if present { bit } else { 0 };
        servers
            | bit(!self.ntp_servers.is_empty(), lists::NTP)
            | bit(!self.dns_servers.is_empty(), lists::DNS)
            | bit(!self.lan.is_empty(), lists::LAN)
            | bit(!self.inbound.is_empty(), lists::INBOUND)
    }
}

/// The 16-byte key form of an address (IPv4 mapped into IPv6).
pub fn address_key(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A LAN prefix in the LPM trie's 128-bit key space: IPv4 sits under ::ffff:0:0/96.
pub fn lan_key(prefix: &Prefix) -> (u32, [u8; 16]) {
    let offset = if prefix.addr.is_ipv4() { 96 } else { 0 };
    (offset + u32::from(prefix.len), address_key(prefix.addr))
}

/// The address an [`address_key`] stands for.
pub fn key_address(key: [u8; 16]) -> IpAddr {
    IpAddr::from(key).to_canonical()
}

/// The prefix a [`lan_key`] stands for.
pub fn lan_prefix(len: u32, key: [u8; 16]) -> Prefix {
    let addr = key_address(key);
    let offset = if addr.is_ipv4() { 96 } else { 0 };
    Prefix {
        addr,
        len: len.saturating_sub(offset) as u8,
    }
}

pub fn server_key(endpoint: &ServerEndpoint) -> ServerKey {
    ServerKey::new(
        address_key(endpoint.address),
        endpoint.port.unwrap_or(ANY_PORT),
        endpoint.protocol.map_or(ANY_PROTOCOL, Protocol::number),
    )
}

pub fn server_endpoint(key: &ServerKey) -> ServerEndpoint {
    ServerEndpoint {
        address: IpAddr::from(key.addr).to_canonical(),
        port: (key.port != ANY_PORT).then_some(key.port),
        protocol: match key.protocol {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_keys_round_trip_for_both_families() {
        for text in ["198.51.100.1", "2001:db8::1"] {
            for port in [None, Some(1194)] {
                for protocol in [None, Some(Protocol::Udp), Some(Protocol::Tcp)] {
                    let endpoint = ServerEndpoint {
                        address: text.parse().unwrap(),
                        port,
                        protocol,
                    };
                    assert_eq!(server_endpoint(&server_key(&endpoint)), endpoint);
                }
            }
        }
    }

    #[test]
    fn lan_keys_round_trip_for_both_families() {
        for (addr, len) in [("192.168.77.0", 24), ("0.0.0.0", 0), ("2001:db8:77::", 64)] {
            let prefix = Prefix {
                addr: addr.parse().unwrap(),
                len,
            };
            let (key_len, key) = lan_key(&prefix);
            assert_eq!(lan_prefix(key_len, key), prefix);
        }
    }

    #[test]
    fn ipv4_is_stored_mapped() {
        let endpoint = ServerEndpoint {
            address: "198.51.100.1".parse().unwrap(),
            port: None,
            protocol: None,
        };
        let key = server_key(&endpoint);
        assert_eq!(&key.addr[10..], &[0xff, 0xff, 198, 51, 100, 1]);
        assert_eq!((key.port, key.protocol), (ANY_PORT, ANY_PROTOCOL));
    }

    #[test]
    fn a_tunnels_ifindex_is_never_free() {
        // 3 and 67 share a bit; 64 wraps to bit 0; the second namespace's tunnel counts too.
        let tunnels = [(1, 3), (1, 67), (1, 64), (2, 130)];
        let entries = InterfaceEntries {
            tunnels: tunnels
                .iter()
                .map(|&(cookie, ifindex)| (InterfaceKey::new(cookie, ifindex), String::new()))
                .collect(),
            ..Default::default()
        };
        let free = entries.tunnel_free();
        for (_, ifindex) in tunnels {
            assert_eq!(free & tunnel_bit(ifindex), 0, "ifindex {ifindex}");
        }
        assert_eq!(free, !0b1101);
        assert_eq!(InterfaceEntries::default().tunnel_free(), u64::MAX);
    }
}
