//! The policy as a netfilter ruleset: one nft script, or iptables-restore files per family, for
//! machines where the eBPF programs cannot run. Pure text from (policy, resolved servers, scope);
//! the same verdict order as the programs, with no connection tracking anywhere.
//!
//! Where netfilter cannot state a SPEC step the way the programs do, the ruleset is stricter,
//! never looser, and [`crate::model::Filter::Netfilter`] says exactly how (docs/backends.md).

mod iptables;
mod nft;

use std::{collections::BTreeSet, net::IpAddr};

pub use iptables::iptables;
pub use nft::{
    delete_script, nft, servers_script, table_name, COMMENT_LOCKDOWN, COMMENT_POLICY,
    FRAMES_VPN_CLIENT, FRAME_CHAINS, INBOUND, SERVER_SETS, SET_BY_COMMAND,
};

use crate::{
    error::{Error, Result},
    model::{Direction, Reason},
    policy::{InterfacePattern, Policy, Prefix, Protocol, ServerEndpoint},
    vpn_client::ClientCgroup,
};

/// IPv6 next-header values after which the transport is not where netfilter's port matches
/// would read it: the extension headers, ESP and AH, and the ones the programs do not walk.
pub const HIDDEN_NEXT_HEADERS: [u8; 11] = [0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254];

/// What a ruleset is made from.
pub struct Ruleset<'a> {
    pub policy: &'a Policy,
    /// Every server with a concrete address (hostnames resolved).
    pub servers: &'a [ServerEndpoint],
    /// `None`: everything in the network namespace (system-wide).
    pub cgroup: Option<CgroupMatch>,
    /// Why the scope is held in lockdown instead of its policy (nft: in the table's comment).
    pub lockdown: Option<String>,
    /// The `[vpn_client]` cgroups that exist now (see [`crate::vpn_client::current`]).
    pub clients: &'a [ClientCgroup],
    /// The devices the uplink guard holds the frames of, as [`crate::interfaces::guarded`]
    /// lists them (nft: a netdev egress chain on each; empty: none).
    pub guarded: &'a [(crate::interfaces::Interface, u8)],
}

/// A scope's cgroup as netfilter matches a socket's: its path below the cgroup2 root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMatch {
    /// Relative to the cgroup2 mount, without leading or trailing `/`.
    pub path: String,
    /// Its depth: `a/b` is level 2.
    pub level: usize,
    /// The cgroup's id (its directory's inode) when it exists: a rule matches that id, so a
    /// cgroup removed and made again is not the one the table holds.
    pub id: Option<u64>,
}

impl CgroupMatch {
    /// The match for a scope's path relative to the cgroup2 mount; `None` for the root.
    pub fn new(relative: &std::path::Path) -> Result<Option<CgroupMatch>> {
        let Some(text) = relative.to_str() else {
            return Err(Error::Usage(format!(
                "the cgroup path {} is not UTF-8 and cannot be written in a ruleset",
                relative.display()
            )));
        };
        let path = text.trim_matches('/');
        if path.is_empty() {
            return Ok(None);
        }
        // systemd escapes characters in unit names as `\xNN`: nft takes a backslash as it is
        // and iptables-restore as `\\` (see `iptables`).
        if !path.chars().all(|c| quotable(c) || c == '\\') {
            return Err(Error::Usage(format!(
                "the cgroup path {path:?} has characters a ruleset cannot quote; use a plainer name"
            )));
        }
        Ok(Some(CgroupMatch {
            path: path.to_owned(),
            level: path.split('/').filter(|c| !c.is_empty()).count(),
            id: None,
        }))
    }
}

/// The client cgroups as netfilter matches them (path and level), refused when a path cannot
/// be quoted.
fn client_matches(clients: &[ClientCgroup]) -> Result<Vec<(String, u32)>> {
    clients
        .iter()
        .map(|c| match CgroupMatch::new(std::path::Path::new(&c.path))? {
            Some(m) => Ok((m.path, c.level)),
            None => Err(Error::Usage(
                "a VPN client cannot be the cgroup2 root".into(),
            )),
        })
        .collect()
}

/// One client cgroup as netfilter matches it; `None` when its path cannot be quoted.
pub fn client_rule(client: &ClientCgroup) -> Option<(String, u32)> {
    client_matches(std::slice::from_ref(client)).ok()?.pop()
}

/// Characters that are the same inside nft's and iptables' double quotes.
fn quotable(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '\'' | '`' | '$' | '#' | ';' | '!')
}

/// The configured interface names, refused when netfilter would read one differently
/// (`+` is iptables' wildcard, quotes and backslashes do not survive).
fn interface_names(patterns: &[InterfacePattern]) -> Result<Vec<(String, bool)>> {
    patterns
        .iter()
        .map(|p| {
            let text = p.as_str();
            let (literal, wildcard) = match text.strip_suffix('*') {
                Some(prefix) => (prefix, true),
                None => (text, false),
            };
            // iptables reads `+` as its wildcard and a leading `-` as an option.
            if literal.chars().all(|c| quotable(c) && c != '+') && !literal.starts_with('-') {
                Ok((literal.to_owned(), wildcard))
            } else {
                Err(Error::Usage(format!(
                    "the interface name {text:?} cannot be written in a netfilter ruleset; \
                     rename the interface or use the eBPF backend"
                )))
            }
        })
        .collect()
}

/// The counter (nft) or comment (iptables) name of a reason in a direction.
pub fn counter_name(direction: Direction, reason: Reason) -> String {
    format!("{}_{}", direction.name(), reason.name()).replace('-', "_")
}

/// A text naming the SPEC step a rule implements, for rule comments.
pub fn step(reason: Reason) -> &'static str {
    match reason {
        Reason::Loopback => "1 loopback",
        Reason::OtherNamespace => "1 another namespace",
        Reason::LinkControl => "9 link control (ARP, EAPOL)",
        Reason::NotIp => "10 not IP",
        Reason::Tunnel => "2 tunnel",
        Reason::Ipv6Blocked => "ipv6.mode block",
        Reason::NotUplink => "3 not an uplink",
        Reason::SourceRoute => "source route or IPv4 options",
        Reason::Server => "4 server",
        Reason::NotVpnClient => "4 server, not the VPN client",
        Reason::Dhcp => "5 DHCP",
        Reason::Ntp => "6 NTP",
        Reason::Dns => "7 DNS",
        Reason::Lan => "8 LAN",
        Reason::LanDns => "8 DNS to the LAN",
        Reason::NeighbourDiscovery => "9 neighbour discovery",
        Reason::InboundRefused => "unsolicited inbound on the tunnel",
        Reason::Default | Reason::Malformed | Reason::IcmpError => "10 default drop",
    }
}

/// The drop reasons a ruleset can reach, each with a chain (or rules) that logs and counts.
const DROPS: [Reason; 7] = [
    Reason::Ipv6Blocked,
    Reason::NotUplink,
    Reason::NotVpnClient,
    Reason::SourceRoute,
    Reason::LanDns,
    Reason::InboundRefused,
    Reason::Default,
];

/// Whether a ruleset for `policy` can drop for `reason` in `direction`: only what leaves is held
/// to the VPN client.
fn drops_for(policy: &Policy, direction: Direction, reason: Reason) -> bool {
    reason != Reason::NotVpnClient
        || (direction == Direction::Egress && policy.vpn_client.is_some())
}

/// The policy's lists split by family, in the forms both rulesets use.
struct Lists {
    /// (address, protocol, port) for servers with a port; one entry per protocol.
    servers_port: Vec<(IpAddr, Protocol, u16)>,
    /// (address, protocol) for servers without a port.
    servers_any: Vec<(IpAddr, Protocol)>,
    lan: Vec<Prefix>,
    ntp: Vec<IpAddr>,
    dns: Vec<IpAddr>,
}

/// The programs never match an IPv4-mapped IPv6 address: such entries are left out.
fn real(ip: &IpAddr) -> bool {
    !matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

impl Lists {
    /// Only the servers (the other lists empty).
    fn of_servers(servers: &[ServerEndpoint]) -> Lists {
        let (servers_port, servers_any) = split_servers(servers);
        Lists {
            servers_port,
            servers_any,
            lan: Vec::new(),
            ntp: Vec::new(),
            dns: Vec::new(),
        }
    }

    fn new(ruleset: &Ruleset) -> Lists {
        let policy = ruleset.policy;
        let (servers_port, servers_any) = split_servers(ruleset.servers);
        let unique = |list: &[IpAddr]| -> Vec<IpAddr> {
            list.iter()
                .filter(|ip| real(ip))
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        Lists {
            servers_port,
            servers_any,
            lan: outermost(&policy.lan.networks),
            ntp: unique(&policy.ntp_servers),
            dns: unique(&policy.dns_servers),
        }
    }
}

/// Servers with a port, one entry per protocol; and servers without one.
type ServerLists = (Vec<(IpAddr, Protocol, u16)>, Vec<(IpAddr, Protocol)>);

fn split_servers(servers: &[ServerEndpoint]) -> ServerLists {
    {
        let mut servers_port = BTreeSet::new();
        let mut servers_any = BTreeSet::new();
        for s in servers.iter().filter(|s| real(&s.address)) {
            let protocols = match s.protocol {
                Some(p) => vec![p],
                None => vec![Protocol::Tcp, Protocol::Udp],
            };
            for protocol in protocols {
                match s.port {
                    Some(port) => servers_port.insert((s.address, protocol, port)),
                    None => servers_any.insert((s.address, protocol)),
                };
            }
        }
        (
            servers_port.into_iter().collect(),
            servers_any.into_iter().collect(),
        )
    }
}

/// The prefixes not inside another one: an interval set refuses overlapping elements, and a
/// prefix inside another adds nothing.
fn outermost(prefixes: &[Prefix]) -> Vec<Prefix> {
    let all: BTreeSet<Prefix> = prefixes.iter().copied().collect();
    all.iter()
        .filter(|p| {
            !all.iter()
                .any(|q| q != *p && q.len < p.len && q.contains(p.addr))
        })
        .copied()
        .collect()
}

fn v4(ip: &IpAddr) -> bool {
    ip.is_ipv4()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_prefixes_leave_the_outer_one() {
        let p = |s: &str| {
            let (a, l) = s.split_once('/').unwrap();
            Prefix {
                addr: a.parse().unwrap(),
                len: l.parse().unwrap(),
            }
        };
        let got = outermost(&[
            p("10.0.0.0/8"),
            p("10.1.0.0/16"),
            p("192.168.1.0/24"),
            p("192.168.1.0/24"),
            p("192.168.2.0/25"),
            p("192.168.2.128/25"),
        ]);
        assert_eq!(
            got,
            vec![
                p("10.0.0.0/8"),
                p("192.168.1.0/24"),
                p("192.168.2.0/25"),
                p("192.168.2.128/25")
            ]
        );
    }

    #[test]
    fn names_netfilter_would_misread_are_refused() {
        let pattern = |s: &str| -> Vec<InterfacePattern> {
            let policy = Policy::from_toml(
                &format!("tunnels = [{s:?}]\n"),
                std::path::Path::new("t.toml"),
            )
            .unwrap();
            policy.tunnels
        };
        assert!(interface_names(&pattern("tun0")).is_ok());
        assert_eq!(
            interface_names(&pattern("wg*")).unwrap(),
            vec![("wg".to_owned(), true)]
        );
        for bad in ["a+", "a\"b", "a\\b", "é0", "!", "-x"] {
            assert!(interface_names(&pattern(bad)).is_err(), "{bad}");
        }
    }
}
