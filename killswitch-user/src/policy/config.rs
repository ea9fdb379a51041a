//! The TOML configuration file: safety checks on the file, parsing, and validation into a Policy.
//! Every error names the file, the line and the key.

use std::{
    collections::BTreeMap,
    fmt,
    io::Read,
    net::IpAddr,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use killswitch_common::{MAX_ADDRESSES, MAX_PREFIXES, MAX_SERVERS};
use serde::Deserialize;
use toml::Spanned;

use super::{
    Inbound, InterfacePattern, Ipv6Mode, Lan, Policy, Prefix, Protocol, ServerAddress, ServerRule,
    VpnClient,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/killswitch/killswitch.toml";

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Largest configuration read: 10,000 servers take about 600 KB.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads the file after checking that only root can change it. The file is opened once (not
/// blocking, so a FIFO cannot hang a reload) and every check is made on what was opened: its
/// owner and mode, and each directory above it, where someone else could swap a name.
pub(super) fn load(path: &Path) -> Result<Policy, ConfigError> {
    let error = |message: String| ConfigError {
        file: path.to_owned(),
        line: None,
        key: None,
        message,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| error(format!("cannot read the configuration: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| error(format!("cannot read the configuration: {e}")))?;
    if !meta.is_file() {
        return Err(error("not a regular file".into()));
    }
    // A kill switch that anyone can edit protects nothing.
    if meta.uid() != 0 {
        return Err(error(format!(
            "refusing a configuration owned by uid {} instead of root; run `chown root: {}`",
            meta.uid(),
            path.display()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(error(format!(
            "refusing a configuration that group or others can write (mode {:04o}); run `chmod go-w {}`",
            meta.mode() & 0o7777,
            path.display()
        )));
    }
    // Where the opened file really is, and where the given name led: no directory on either
    // way may let anyone but root replace a name in it.
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| error(format!("cannot tell where the configuration is: {e}")))?;
    let given = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    for dir in real.ancestors().skip(1).chain(given.ancestors().skip(1)) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let dir_meta = std::fs::metadata(dir)
            .map_err(|e| error(format!("cannot inspect {}: {e}", dir.display())))?;
        if dir_meta.uid() != 0 || dir_meta.mode() & 0o022 != 0 {
            return Err(error(format!(
                "refusing a configuration in {}, which {} (mode {:04o}, uid {}): someone else \
                 could replace the file; keep it in a directory only root can write, like /etc/killswitch",
                dir.display(),
                if dir_meta.uid() != 0 { "root does not own" } else { "group or others can write" },
                dir_meta.mode() & 0o7777,
                dir_meta.uid()
            )));
        }
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| error(format!("cannot read the configuration: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(error(format!(
            "larger than {} MiB; that is not a configuration",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| error("not UTF-8 text".into()))?;
    parse(&text, path)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tunnels: Option<Spanned<Vec<Spanned<String>>>>,
    uplinks: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    server: Vec<Spanned<RawServer>>,
    lan: Option<RawLan>,
    dhcp: Option<RawDhcp>,
    ntp: Option<RawServerList>,
    dns: Option<RawServerList>,
    ipv6: Option<RawIpv6>,
    #[serde(default)]
    inbound: Vec<Spanned<RawInbound>>,
    vpn_client: Option<RawVpnClient>,
    guard: Option<RawGuard>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVpnClient {
    cgroup: Option<Spanned<String>>,
    mark: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLan {
    #[serde(default)]
    networks: Vec<Spanned<String>>,
    dns: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerList {
    #[serde(default)]
    servers: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpv6 {
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    port: Option<Spanned<i64>>,
    #[serde(default)]
    sources: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    address: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    protocol: Option<Spanned<String>>,
}

/// Locates spans in the text so errors can name lines.
struct Source<'a> {
    file: &'a Path,
    /// Byte offset of every newline, so that a line number is a binary search, not a scan.
    newlines: Vec<usize>,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    fn error<T>(&self, at: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_of(at.span().start)),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }
}

pub(super) fn parse(text: &str, file: &Path) -> Result<Policy, ConfigError> {
    let source = Source {
        file,
        newlines: text.match_indices('\n').map(|(i, _)| i).collect(),
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: e.span().map(|span| source.line_of(span.start)),
        key: None,
        // One line: toml's messages sometimes span several.
        message: e.message().trim().replace('\n', "; "),
    })?;

    let Some(tunnel_list) = &raw.tunnels else {
        return Err(ConfigError {
            file: file.to_owned(),
            line: None,
            key: Some("tunnels".into()),
            message: "missing; list the VPN's interfaces, e.g. tunnels = [\"tun0\"]".into(),
        });
    };
    let tunnels = interface_list(&source, tunnel_list, "tunnels")?;
    let uplinks = match &raw.uplinks {
        Some(list) => Some(interface_list(&source, list, "uplinks")?),
        None => None,
    };
    if let (Some(uplink_list), Some(uplinks)) = (&raw.uplinks, &uplinks) {
        for (name, pattern) in uplink_list.get_ref().iter().zip(uplinks) {
            if let Some(tunnel) = tunnels.iter().find(|t| overlaps(t, pattern)) {
                return Err(source.error(
                    name,
                    "uplinks",
                    format!("`{pattern}` overlaps the tunnel `{tunnel}`; an interface is either the tunnel or an uplink"),
                ));
            }
        }
    }

    let mut servers = Vec::new();
    let mut seen: BTreeMap<ServerRule, usize> = BTreeMap::new();
    // What the rules may put in the kernel's server map: one entry per address, up to
    // MAX_ADDRESSES_PER_NAME per hostname.
    let mut server_entries = 0usize;
    for entry in &raw.server {
        let rule = server_rule(&source, entry)?;
        server_entries += match rule.address {
            ServerAddress::Ip(_) => 1,
            ServerAddress::Host(_) => super::resolve::MAX_ADDRESSES_PER_NAME,
        };
        if server_entries > MAX_SERVERS as usize {
            return Err(source.error(
                entry,
                "server",
                format!(
                    "too many servers: the kernel map holds {MAX_SERVERS} entries (a hostname \
                     counts {})",
                    super::resolve::MAX_ADDRESSES_PER_NAME
                ),
            ));
        }
        let line = source.line_of(entry.span().start);
        if let Some(first) = seen.insert(rule.clone(), line) {
            return Err(source.error(
                entry,
                "server",
                format!("duplicate of the server on line {first}"),
            ));
        }
        servers.push(rule);
    }

    let ipv6 = match raw.ipv6.as_ref().and_then(|i| i.mode.as_ref()) {
        None => Ipv6Mode::Tunnel,
        Some(mode) => match mode.get_ref().as_str() {
            "tunnel" => Ipv6Mode::Tunnel,
            "block" => Ipv6Mode::Block,
            other => {
                return Err(source.error(
                    mode,
                    "ipv6.mode",
                    format!("`{other}` is not \"tunnel\" or \"block\""),
                ))
            }
        },
    };
    // An IPv6 exception under mode = "block" could never be used: say so instead.
    let reject_v6 = |at: &Spanned<String>, key: &str, ip: IpAddr| {
        if ipv6 == Ipv6Mode::Block && ip.is_ipv6() {
            Err(source.error(
                at,
                key,
                format!("`{ip}` is IPv6, but [ipv6] mode = \"block\" drops every IPv6 packet"),
            ))
        } else {
            Ok(())
        }
    };
    for (entry, rule) in raw.server.iter().zip(&servers) {
        if let (ServerAddress::Ip(ip), Some(address)) = (&rule.address, &entry.get_ref().address) {
            reject_v6(address, "server.address", *ip)?;
        }
    }

    let mut lan = Lan::default();
    if let Some(raw_lan) = &raw.lan {
        let mut listed = std::collections::BTreeSet::new();
        for text in &raw_lan.networks {
            if listed.len() == MAX_PREFIXES as usize {
                return Err(source.error(
                    text,
                    "lan.networks",
                    format!(
                        "more than {MAX_PREFIXES} prefixes; the kernel map holds {MAX_PREFIXES}"
                    ),
                ));
            }
            let prefix =
                prefix(text.get_ref()).map_err(|m| source.error(text, "lan.networks", m))?;
            reject_v6(text, "lan.networks", prefix.addr)?;
            lan_sized(&prefix).map_err(|m| source.error(text, "lan.networks", m))?;
            if !listed.insert(prefix) {
                return Err(source.error(
                    text,
                    "lan.networks",
                    format!("`{prefix}` is listed twice"),
                ));
            }
            lan.networks.push(prefix);
        }
        lan.dns = raw_lan.dns.unwrap_or(false);
    }
    let address_list =
        |list: Option<&RawServerList>, key: &str| -> Result<Vec<IpAddr>, ConfigError> {
            let mut out: Vec<IpAddr> = Vec::new();
            let mut listed = std::collections::BTreeSet::new();
            for text in list.map(|l| l.servers.as_slice()).unwrap_or_default() {
                if out.len() == MAX_ADDRESSES as usize {
                    return Err(source.error(
                        text,
                        key,
                        format!(
                        "more than {MAX_ADDRESSES} addresses; the kernel map holds {MAX_ADDRESSES}"
                    ),
                    ));
                }
                let ip = plain_address(text.get_ref()).map_err(|m| source.error(text, key, m))?;
                reject_v6(text, key, ip)?;
                if !listed.insert(ip) {
                    return Err(source.error(text, key, format!("`{ip}` is listed twice")));
                }
                out.push(ip);
            }
            Ok(out)
        };
    let ntp_servers = address_list(raw.ntp.as_ref(), "ntp.servers")?;
    let dns_servers = address_list(raw.dns.as_ref(), "dns.servers")?;

    let mut inbound: Vec<Inbound> = Vec::new();
    let mut inbound_ports = std::collections::BTreeSet::new();
    // Each (source, port) pair, or the port alone, is one entry of the kernel's inbound map.
    let mut inbound_entries = 0usize;
    for entry in &raw.inbound {
        inbound_entries += entry.get_ref().sources.len().max(1);
        if inbound_entries > MAX_ADDRESSES as usize {
            return Err(source.error(
                entry,
                "inbound",
                format!("too many inbound entries; the kernel map holds {MAX_ADDRESSES}"),
            ));
        }
        let Some(port_value) = &entry.get_ref().port else {
            return Err(source.error(
                entry,
                "inbound.port",
                "missing; every [[inbound]] needs a port",
            ));
        };
        let port =
            port_number(port_value).map_err(|m| source.error(port_value, "inbound.port", m))?;
        if !inbound_ports.insert(port) {
            return Err(source.error(
                port_value,
                "inbound.port",
                format!("port {port} is listed twice"),
            ));
        }
        let mut sources = Vec::new();
        for text in &entry.get_ref().sources {
            let ip = plain_address(text.get_ref())
                .map_err(|m| source.error(text, "inbound.sources", m))?;
            reject_v6(text, "inbound.sources", ip)?;
            sources.push(ip);
        }
        inbound.push(Inbound { port, sources });
    }

    let vpn_client = match &raw.vpn_client {
        None => None,
        Some(raw) => Some(VpnClient {
            cgroup: match &raw.cgroup {
                Some(text) => Some(
                    client_cgroup(text.get_ref())
                        .map_err(|m| source.error(text, "vpn_client.cgroup", m))?,
                ),
                None => None,
            },
            mark: match &raw.mark {
                Some(value) => Some(match u32::try_from(*value.get_ref()) {
                    Ok(0) => {
                        return Err(source.error(
                            value,
                            "vpn_client.mark",
                            "0 is the mark of every unmarked packet; use the VPN's own fwmark",
                        ))
                    }
                    Ok(mark) => mark,
                    Err(_) => {
                        return Err(source.error(
                            value,
                            "vpn_client.mark",
                            format!("{} is not a mark (1-0xffffffff)", value.get_ref()),
                        ))
                    }
                }),
                None => None,
            },
        }),
    };

    Ok(Policy {
        tunnels,
        uplinks,
        servers,
        lan,
        dhcp: raw.dhcp.and_then(|d| d.enabled).unwrap_or(true),
        ntp_servers,
        dns_servers,
        ipv6,
        inbound,
        vpn_client,
        guard: raw.guard.and_then(|g| g.enabled),
    })
}

/// A `vpn_client.cgroup`: a path below the cgroup2 root (a leading `/` is allowed), never the
/// root itself (that would be every process) and never climbing out with `..`.
fn client_cgroup(text: &str) -> Result<String, String> {
    let path = text.trim_start_matches('/').trim_end_matches('/');
    if path.is_empty() {
        return Err("the cgroup2 root holds every process; name the VPN client's own cgroup, e.g. \"system.slice/openvpn-client@work.service\"".into());
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(format!(
            "`{text}` must be a plain path below the cgroup2 root (no `//`, `.` or `..`)"
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(format!("`{}` has control characters", text.escape_debug()));
    }
    if parts.len() > killswitch_common::MAX_VPN_CLIENT_LEVEL as usize {
        return Err(format!(
            "`{text}` is deeper than {} levels",
            killswitch_common::MAX_VPN_CLIENT_LEVEL
        ));
    }
    Ok(path.to_owned())
}

fn port_number(port: &Spanned<i64>) -> Result<u16, String> {
    match u16::try_from(*port.get_ref()) {
        Ok(value) if value != 0 => Ok(value),
        _ => Err(format!("{} is not a port (1-65535)", port.get_ref())),
    }
}

/// An IP address usable as a peer: not unspecified, multicast or broadcast.
fn plain_address(text: &str) -> Result<IpAddr, String> {
    let ip = text
        .parse::<IpAddr>()
        .map_err(|_| format!("`{text}` is not an IP address"))?
        .to_canonical();
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err(format!("`{text}` cannot be a peer address"));
    }
    Ok(ip)
}

/// A LAN prefix must stay a LAN. Short prefixes only inside the private and link-local ranges
/// (IPv4 /8 to /15 within 10/8, 100.64/10, 172.16/12, 192.168/16, 169.254/16; IPv6 /7 to /31
/// within fc00::/7 or fe80::/10); anywhere else at least a /16 (IPv4) or a /32 (IPv6), the
/// most a site holds. Never over the IPv4-mapped range ::ffff:0:0/96, where the kernel keeps
/// IPv4 entries (a v6 prefix covering it would match every IPv4 address).
fn lan_sized(prefix: &Prefix) -> Result<(), String> {
    let within = |ranges: &[&str]| {
        ranges.iter().any(|range| {
            let range = self::prefix(range).expect("a valid range");
            range.len <= prefix.len && range.contains(prefix.addr)
        })
    };
    match prefix.addr {
        IpAddr::V4(_) if prefix.len < 8 => Err(format!(
            "`{prefix}` is wider than a /8: that is the internet, not a LAN"
        )),
        IpAddr::V4(_)
            if prefix.len < 16
                && !within(&[
                    "10.0.0.0/8",
                    "100.64.0.0/10",
                    "172.16.0.0/12",
                    "192.168.0.0/16",
                    "169.254.0.0/16",
                ]) =>
        {
            Err(format!(
                "`{prefix}` is public and wider than a /16: that is part of the internet, not a LAN"
            ))
        }
        IpAddr::V6(_) if prefix.len < 7 => Err(format!(
            "`{prefix}` is wider than a /7: that is the internet, not a LAN"
        )),
        IpAddr::V6(_)
            if prefix.contains(IpAddr::V6(std::net::Ipv6Addr::new(
                0, 0, 0, 0, 0, 0xffff, 0, 0,
            ))) =>
        {
            Err(format!(
                "`{prefix}` covers the IPv4-mapped range ::ffff:0:0/96 and would match every \
                 IPv4 address; list IPv4 LANs as IPv4 prefixes"
            ))
        }
        IpAddr::V6(_) if prefix.len < 32 && !within(&["fc00::/7", "fe80::/10"]) => Err(format!(
            "`{prefix}` is public and wider than a /32: that is part of the internet, not a LAN"
        )),
        _ => Ok(()),
    }
}

/// `ADDR/LEN` (or a bare address, meaning one host) with no host bits set.
fn prefix(text: &str) -> Result<Prefix, String> {
    let (addr_text, len_text) = text.split_once('/').unwrap_or((text, ""));
    let addr = addr_text
        .parse::<IpAddr>()
        .map_err(|_| format!("`{text}` is not an address prefix like 192.168.1.0/24"))?
        .to_canonical();
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = if len_text.is_empty() {
        max
    } else {
        len_text
            .parse::<u8>()
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| format!("`{text}`: the prefix length must be 0-{max}"))?
    };
    let network = match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    if network != addr {
        return Err(format!(
            "`{text}` has host bits set; did you mean {network}/{len}?"
        ));
    }
    Ok(Prefix { addr, len })
}

fn interface_list(
    source: &Source<'_>,
    list: &Spanned<Vec<Spanned<String>>>,
    key: &str,
) -> Result<Vec<InterfacePattern>, ConfigError> {
    let mut patterns: Vec<InterfacePattern> = Vec::new();
    for name in list.get_ref() {
        let pattern = interface_pattern(name.get_ref())
            .map_err(|message| source.error(name, key, message))?;
        if patterns.contains(&pattern) {
            return Err(source.error(name, key, format!("`{pattern}` is listed twice")));
        }
        patterns.push(pattern);
    }
    Ok(patterns)
}

fn interface_pattern(name: &str) -> Result<InterfacePattern, String> {
    let literal = name.strip_suffix('*').unwrap_or(name);
    if name == "*" {
        return Err("`*` alone matches every interface; name the interfaces".into());
    }
    if literal.is_empty() {
        return Err("an interface name cannot be empty".into());
    }
    if literal.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "`{name}` is longer than the {MAX_INTERFACE_NAME} bytes an interface name can have"
        ));
    }
    let bad = |c: char| c == '/' || c == ':' || c == '*' || c.is_whitespace() || c.is_control();
    if literal.contains(bad) || literal == "." || literal == ".." {
        return Err(format!(
            "`{name}` is not an interface name (a trailing `*` is the only wildcard)"
        ));
    }
    Ok(InterfacePattern(name.to_owned()))
}

/// Whether some interface name could match both patterns.
fn overlaps(a: &InterfacePattern, b: &InterfacePattern) -> bool {
    let literal = |p: &InterfacePattern| p.0.trim_end_matches('*').to_owned();
    a.matches(&literal(b)) || b.matches(&literal(a)) || a == b
}

fn server_rule(source: &Source<'_>, entry: &Spanned<RawServer>) -> Result<ServerRule, ConfigError> {
    let raw = entry.get_ref();
    let Some(address) = &raw.address else {
        return Err(source.error(
            entry,
            "server.address",
            "missing; every [[server]] needs an address",
        ));
    };
    let address_value = server_address(address.get_ref())
        .map_err(|message| source.error(address, "server.address", message))?;
    let port = match &raw.port {
        None => None,
        Some(port) => Some(port_number(port).map_err(|m| source.error(port, "server.port", m))?),
    };
    let protocol = match &raw.protocol {
        None => None,
        Some(protocol) => Some(match protocol.get_ref().as_str() {
            "udp" => Protocol::Udp,
            "tcp" => Protocol::Tcp,
            other => {
                return Err(source.error(
                    protocol,
                    "server.protocol",
                    format!("`{other}` is not \"udp\" or \"tcp\" (leave it out for both)"),
                ))
            }
        }),
    };
    Ok(ServerRule {
        address: address_value,
        port,
        protocol,
    })
}

fn server_address(text: &str) -> Result<ServerAddress, String> {
    if text.contains('/') {
        return Err(format!(
            "`{text}` is a prefix; a server is one address or hostname"
        ));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        if let Some(problem) = super::not_a_peer(ip) {
            return Err(format!(
                "`{text}` cannot be a server address: it is {problem}"
            ));
        }
        return Ok(ServerAddress::Ip(ip.to_canonical()));
    }
    if is_hostname(text) {
        return Ok(ServerAddress::Host(
            text.trim_end_matches('.').to_ascii_lowercase(),
        ));
    }
    Err(format!("`{text}` is neither an IP address nor a hostname"))
}

/// RFC 1123 host names; an all-numeric last label is rejected so a mistyped IPv4 address
/// (`198.51.100.300`) is not taken for a name.
fn is_hostname(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |label: &&str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    labels.iter().all(label_ok)
        && !labels
            .last()
            .is_some_and(|last| last.chars().all(|c| c.is_ascii_digit()))
}
