//! The policy: the validated, normalized form of the configuration file and the one source of
//! truth that the kernel maps (and later the rendered rulesets) are derived from.

mod config;
mod resolve;

use std::{fmt, net::IpAddr};

pub use config::{ConfigError, DEFAULT_CONFIG_PATH};
pub use resolve::{lookup, resolve_servers, Lookup, RETRY};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Interfaces whose traffic is the VPN's: everything through them is allowed.
    pub tunnels: Vec<InterfacePattern>,
    /// When set, the exceptions (servers, ...) leave only through these interfaces.
    pub uplinks: Option<Vec<InterfacePattern>>,
    /// The only endpoints reachable outside the tunnel.
    pub servers: Vec<ServerRule>,
    pub lan: Lan,
    /// DHCPv4 / DHCPv6 client traffic allowed on the uplinks.
    pub dhcp: bool,
    /// UDP 123 outside the tunnel to these.
    pub ntp_servers: Vec<IpAddr>,
    /// Port 53/853 outside the tunnel to these.
    pub dns_servers: Vec<IpAddr>,
    pub ipv6: Ipv6Mode,
    /// Unsolicited inbound TCP accepted through the tunnel.
    pub inbound: Vec<Inbound>,
    /// When set, the server exception holds only for the VPN client's packets.
    pub vpn_client: Option<VpnClient>,
    /// `[guard] enabled` as written; unset, the scope decides ([`Policy::for_scope`]).
    pub guard: Option<bool>,
}

impl Policy {
    /// The policy as a scope enforces it: `[guard]` defaults to on for the system-wide scope
    /// (the cgroup2 root) and off for any other.
    pub fn for_scope(mut self, system_wide: bool) -> Policy {
        self.guard = Some(self.guard.unwrap_or(system_wide));
        self
    }

    /// The policy with no guard, whatever the config says: `killswitch run`'s scopes hold one
    /// command, and a guard holds every frame on the uplinks, whoever sent it.
    pub fn without_guard(mut self) -> Policy {
        self.guard = Some(false);
        self
    }

    /// Whether the uplink guard runs (see [`Policy::for_scope`]).
    pub fn guarded(&self) -> bool {
        self.guard == Some(true)
    }

    /// Names this policy as a scope enforces it, for the scope to record (never 0, which
    /// records none): the daemon writes under its policy only while the one in force has the
    /// same fingerprint. Stable within one build; another build's only costs a reload.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{DefaultHasher, Hasher};
        let mut hasher = DefaultHasher::new();
        hasher.write(format!("{self:?}").as_bytes());
        hasher.finish().max(1)
    }
}

/// `[vpn_client]`: who may talk to the servers outside the tunnel. Set with neither key, only
/// the cgroups `killswitch run --vpn-client` registers may.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VpnClient {
    /// A cgroup relative to the cgroup2 root (no leading `/`); its sub-cgroups count too.
    pub cgroup: Option<String>,
    /// Packets carrying this skb mark (never 0).
    pub mark: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lan {
    pub networks: Vec<Prefix>,
    /// DNS (53/853) to LAN addresses; off by default because a LAN resolver is a DNS leak.
    pub dns: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// IPv6 only through the tunnel, plus neighbour discovery and configured v6 exceptions.
    #[default]
    Tunnel,
    /// Every IPv6 packet except loopback is dropped.
    Block,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    pub port: u16,
    /// Empty: any source.
    pub sources: Vec<IpAddr>,
}

/// An address prefix (`192.168.77.0/24`, `2001:db8::/32`) with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Whether `ip` is in the prefix; an IPv6 address is never in an IPv4 prefix, even when it
    /// is IPv4-mapped.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Policy {
    /// Parses and validates a configuration text; `file` names it in error messages.
    pub fn from_toml(text: &str, file: &std::path::Path) -> Result<Policy, ConfigError> {
        config::parse(text, file)
    }

    /// Reads, checks ownership and permissions of, and parses a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Policy, ConfigError> {
        config::load(path)
    }
}

/// An interface name, or a prefix when it ends in `*` (`wg*`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfacePattern(String);

impl InterfacePattern {
    /// The pattern that matches `name` alone (a name the config already checked, or one of
    /// ours).
    pub fn exact(name: &str) -> InterfacePattern {
        InterfacePattern(name.to_owned())
    }

    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.0,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InterfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Udp => killswitch_common::IPPROTO_UDP,
            Protocol::Tcp => killswitch_common::IPPROTO_TCP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerAddress {
    Ip(IpAddr),
    /// Resolved at `up` (and re-resolved by the daemon).
    Host(String),
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddress::Ip(ip) => ip.fmt(f),
            ServerAddress::Host(host) => f.write_str(host),
        }
    }
}

/// A `[[server]]` entry as configured.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerRule {
    pub address: ServerAddress,
    /// `None`: any port.
    pub port: Option<u16>,
    /// `None`: TCP and UDP.
    pub protocol: Option<Protocol>,
}

/// A server with a concrete address: what goes into the kernel map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerEndpoint {
    pub address: IpAddr,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
}

impl fmt::Display for ServerEndpoint {
    /// The `ADDR[:PORT][/udp|tcp]` form of the command line, IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.address, self.port) {
            (IpAddr::V6(v6), Some(_)) => write!(f, "[{v6}]")?,
            (IpAddr::V6(v6), None) if ends_like_a_port(&v6.to_string()) => write!(f, "[{v6}]")?,
            (address, _) => write!(f, "{address}")?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        if let Some(protocol) = self.protocol {
            write!(f, "/{}", protocol.name())?;
        }
        Ok(())
    }
}

/// An unbracketed IPv6 text whose last group could also be read as a port after an address.
fn ends_like_a_port(text: &str) -> bool {
    text.rsplit_once(':').is_some_and(|(address, port)| {
        address.parse::<std::net::Ipv6Addr>().is_ok() && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// Why `ip` cannot be a VPN server or other remote peer, if it cannot: the unspecified
/// address, broadcast, multicast, loopback (always allowed anyway) and link-local addresses
/// (meaningless without an interface). One rule for the config, `servers` and DNS answers.
pub fn not_a_peer(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        Some("the broadcast address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_loopback() {
        Some("a loopback address (loopback is always allowed)")
    } else if link_local {
        Some("a link-local address")
    } else {
        None
    }
}

impl std::str::FromStr for ServerEndpoint {
    type Err = String;

    /// `ADDR[:PORT][/udp|tcp]`; IPv6 in brackets when a port follows (`[2001:db8::1]:443/tcp`).
    fn from_str(text: &str) -> Result<Self, String> {
        let (rest, protocol) = match text.rsplit_once('/') {
            Some((rest, "udp")) => (rest, Some(Protocol::Udp)),
            Some((rest, "tcp")) => (rest, Some(Protocol::Tcp)),
            Some((_, other)) => return Err(format!("unknown protocol {other:?}: use udp or tcp")),
            None => (text, None),
        };
        let (address, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (address, after) = inner
                .split_once(']')
                .ok_or("an IPv6 address in brackets needs its closing ']'")?;
            match after.strip_prefix(':') {
                Some(port) => (address, Some(port)),
                None if after.is_empty() => (address, None),
                None => return Err("expected :PORT after ']'".into()),
            }
        } else if rest.matches(':').count() == 1 {
            let (address, port) = rest.split_once(':').expect("one colon");
            (address, Some(port))
        } else if ends_like_a_port(rest) {
            // `2001:db8::1:443` is an address, or an address and a port: refuse to guess.
            return Err(format!(
                "{rest:?} is ambiguous: write [{rest}] for the address, or [ADDRESS]:PORT"
            ));
        } else {
            (rest, None)
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        if let Some(problem) = not_a_peer(address) {
            return Err(format!("{address} cannot be a server: it is {problem}"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("{p:?} is not a port (1-65535)")),
                Ok(port) => Some(port),
            },
        };
        Ok(ServerEndpoint {
            address: address.to_canonical(),
            port,
            protocol,
        })
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_the_same() {
        for text in [
            "198.51.100.1",
            "198.51.100.1:1194",
            "198.51.100.1:1194/udp",
            "198.51.100.1/tcp",
            "2001:db8::1",
            "[2001:db8::1]:443/tcp",
            "2001:db8::1/udp",
            "[2001:db8::1:443]",
            "[2001:db8::1:443]/tcp",
        ] {
            let endpoint: ServerEndpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), text);
        }
    }

    #[test]
    fn bad_endpoints_say_what_is_wrong() {
        for (text, message) in [
            ("198.51.100.1:0", "\"0\" is not a port (1-65535)"),
            (
                "198.51.100.1/icmp",
                "unknown protocol \"icmp\": use udp or tcp",
            ),
            ("vpn.example", "\"vpn.example\" is not an IP address"),
            (
                "[2001:db8::1",
                "an IPv6 address in brackets needs its closing ']'",
            ),
            (
                "2001:db8::1:443",
                "\"2001:db8::1:443\" is ambiguous: write [2001:db8::1:443] for the address, or [ADDRESS]:PORT",
            ),
            (
                "0.0.0.0:1194",
                "0.0.0.0 cannot be a server: it is the unspecified address",
            ),
            (
                "255.255.255.255",
                "255.255.255.255 cannot be a server: it is the broadcast address",
            ),
            (
                "[ff02::1]:443",
                "ff02::1 cannot be a server: it is a multicast address",
            ),
            ("[::]", ":: cannot be a server: it is the unspecified address"),
        ] {
            assert_eq!(text.parse::<ServerEndpoint>().unwrap_err(), message);
        }
    }
}
