//! iptables-restore files, one per family, in the same order as the nft script.
//!
//! Each file replaces the whole `filter` table of its family. A server is one rule, so the cost
//! per packet grows with the server list (measured in `cargo xtask bench`); nft uses sets.

use std::{fmt::Write, net::IpAddr};

use super::{
    client_matches, counter_name, drops_for, interface_names, step, CgroupMatch, Lists, Ruleset,
    DROPS,
};
use crate::{
    error::Result,
    model::{Direction, Reason},
    policy::{Ipv6Mode, Policy},
};

/// `u32` test true for an IPv4 header of 20 bytes: no options.
const NO_IPV4_OPTIONS: &str = "0>>24&0xF=5";
/// `ipv6header` names of the extension headers, ESP and AH: one rule each, since `--soft`
/// matches a packet that has all the listed ones.
const EXTENSION_HEADERS: [&str; 6] = ["hop", "dst", "route", "frag", "auth", "esp"];
/// Next headers the programs do not walk; `-p` takes them as the transport, so name them.
const OPAQUE_NEXT_HEADERS: [u8; 5] = [135, 139, 140, 253, 254];

/// The iptables-restore file for IPv4 (`ipv6: false`) or for IPv6.
pub fn iptables(ruleset: &Ruleset, ipv6: bool) -> Result<String> {
    let policy = ruleset.policy;
    let tunnels = interface_names(&policy.tunnels)?;
    let uplinks = policy.uplinks.as_deref().map(interface_names).transpose()?;
    let lists = Lists::new(ruleset);
    let family = |ip: &IpAddr| ip.is_ipv6() == ipv6;
    let (tool, other) = if ipv6 {
        ("ip6tables-restore", "iptables-restore")
    } else {
        ("iptables-restore", "ip6tables-restore")
    };
    let mut f = File::default();
    writeln!(
        f.head,
        "# killswitch {}: the IPv{} rules for {}.",
        env!("CARGO_PKG_VERSION"),
        if ipv6 { 6 } else { 4 },
        match &ruleset.cgroup {
            None => "every socket of this network namespace".to_owned(),
            Some(c) => format!("sockets of cgroup {}", c.path),
        }
    )
    .unwrap();
    writeln!(
        f.head,
        "# Load with `{tool} FILE`; the other family's file is for `{other}`."
    )
    .unwrap();
    writeln!(
        f.head,
        "# It replaces the whole filter table of this family (FORWARD: only through the \
         tunnels). No connection tracking."
    )
    .unwrap();
    writeln!(f.head, "*filter").unwrap();
    let (base_policy, select) = match &ruleset.cgroup {
        None => ("DROP", String::new()),
        Some(CgroupMatch { path, .. }) => (
            "ACCEPT",
            format!("-m cgroup --path \"{}\" ", restore_quoted(path)),
        ),
    };
    writeln!(f.head, ":INPUT {base_policy} [0:0]").unwrap();
    // The file replaces the table, FORWARD included: what the machine forwards (containers, VMs)
    // goes only through the tunnels, rather than whatever FORWARD allowed before.
    writeln!(f.head, ":FORWARD DROP [0:0]").unwrap();
    writeln!(f.head, ":OUTPUT {base_policy} [0:0]").unwrap();
    for (name, wildcard) in &tunnels {
        let name = format!("{name}{}", if *wildcard { "+" } else { "" });
        for side in ["-i", "-o"] {
            f.line(
                "FORWARD",
                &format!(
                    "{side} {name} -m comment --comment \"forwarded through the tunnel\" -j ACCEPT"
                ),
            );
        }
    }
    f.line("OUTPUT", &format!("{select}-j ks-out"));
    f.line("INPUT", &format!("{select}-j ks-in"));

    for direction in Direction::ALL {
        let d = short(direction);
        let chain = format!("ks-{d}");
        f.chain(&chain);
        let iface = if direction == Direction::Egress {
            "-o"
        } else {
            "-i"
        };
        f.rule(
            &chain,
            &format!("{iface} lo"),
            Allow(direction, Reason::Loopback),
        );
        if ipv6 && policy.ipv6 == Ipv6Mode::Block {
            f.rule(&chain, "", Drop(direction, Reason::Ipv6Blocked));
        }
        for (name, wildcard) in &tunnels {
            let name = format!("{iface} {name}{}", if *wildcard { "+" } else { "" });
            match direction {
                Direction::Egress => f.rule(&chain, &name, Allow(direction, Reason::Tunnel)),
                Direction::Ingress => f.rule(&chain, &name, Jump("ks-in-tunnel", "2 tunnel")),
            }
        }
        let uplink = format!("ks-{d}-uplink");
        match &uplinks {
            Some(uplinks) => {
                for (name, wildcard) in uplinks {
                    let name = format!("{iface} {name}{}", if *wildcard { "+" } else { "" });
                    f.rule(&chain, &name, Jump(&uplink, "3 an uplink"));
                }
                f.rule(&chain, "", Drop(direction, Reason::NotUplink));
            }
            None => f.rule(
                &chain,
                "",
                Jump(&uplink, "3 every other interface is an uplink"),
            ),
        }
        uplink_rules(&mut f, direction, policy, &lists, ipv6, &family);
    }
    if let Some(client) = &policy.vpn_client {
        // Step 4's condition: a server's packet comes back from here unless the VPN client
        // sent it.
        let chain = "ks-out-vpn-client";
        f.chain(chain);
        if let Some(mark) = client.mark {
            f.rule(
                chain,
                &format!("-m mark --mark {mark:#x}"),
                Allow(Direction::Egress, Reason::Server),
            );
        }
        for (path, _) in client_matches(ruleset.clients)? {
            f.rule(
                chain,
                &format!("-m cgroup --path \"{}\"", restore_quoted(&path)),
                Allow(Direction::Egress, Reason::Server),
            );
        }
    }
    tunnel_ingress(&mut f, policy, ipv6);
    for direction in Direction::ALL {
        for reason in DROPS
            .into_iter()
            .filter(|r| drops_for(policy, direction, *r))
        {
            let chain = drop_chain(direction, reason);
            f.chain(&chain);
            let limited_log = format!(
                "-m limit --limit 10/sec --limit-burst 20 -j LOG --log-prefix \"ks {} {}: \" --log-level 6",
                short(direction),
                reason.name()
            );
            f.line(&chain, &limited_log);
            let count = format!(
                "-m comment --comment \"{}\" -j DROP",
                counter_name(direction, reason)
            );
            f.line(&chain, &count);
        }
    }
    Ok(f.text())
}

/// A path inside iptables-restore's double quotes, where a backslash escapes the next byte.
fn restore_quoted(path: &str) -> String {
    path.replace('\\', "\\\\")
}

fn short(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => "out",
        Direction::Ingress => "in",
    }
}

fn drop_chain(direction: Direction, reason: Reason) -> String {
    format!("ks-drop-{}-{}", short(direction), reason.name())
}

enum Action<'a> {
    Allow(Direction, Reason),
    Drop(Direction, Reason),
    /// Continue in another chain (and come back on RETURN), with a comment saying why.
    Jump(&'a str, &'a str),
    /// Back to the calling chain.
    Return(&'a str),
}
use Action::{Allow, Drop, Jump, Return};

/// Chain declarations first, then the rules, as iptables-restore wants them; the rules of
/// one chain together, in the order the chains were declared.
#[derive(Default)]
struct File {
    head: String,
    chains: Vec<(String, String)>,
}

impl File {
    fn chain(&mut self, name: &str) {
        writeln!(self.head, ":{name} - [0:0]").unwrap();
        self.chains.push((name.to_owned(), String::new()));
    }

    fn rules_of(&mut self, chain: &str) -> &mut String {
        match self.chains.iter().position(|(name, _)| name == chain) {
            Some(i) => &mut self.chains[i].1,
            None => {
                self.chains.push((chain.to_owned(), String::new()));
                &mut self.chains.last_mut().unwrap().1
            }
        }
    }

    fn line(&mut self, chain: &str, line: &str) {
        writeln!(self.rules_of(chain), "-A {chain} {line}").unwrap();
    }

    fn rule(&mut self, chain: &str, matches: &str, action: Action) {
        let space = if matches.is_empty() { "" } else { " " };
        let target = match action {
            Allow(d, r) => format!(
                "-m comment --comment \"{}: {}\" -j ACCEPT",
                counter_name(d, r),
                step(r)
            ),
            Drop(d, r) => format!(
                "-m comment --comment \"{}\" -j {}",
                step(r),
                drop_chain(d, r)
            ),
            Jump(to, why) => format!("-m comment --comment \"{why}\" -j {to}"),
            Return(why) => format!("-m comment --comment \"{why}\" -j RETURN"),
        };
        self.line(chain, &format!("{matches}{space}{target}"));
    }

    fn text(self) -> String {
        let rules: String = self.chains.into_iter().map(|(_, rules)| rules).collect();
        format!("{}{rules}COMMIT\n", self.head)
    }
}

/// Steps 4-10 for a packet on an uplink.
fn uplink_rules(
    f: &mut File,
    direction: Direction,
    policy: &Policy,
    lists: &Lists,
    ipv6: bool,
    family: &dyn Fn(&IpAddr) -> bool,
) {
    let d = direction;
    let ds = short(d);
    let chain = format!("ks-{ds}-uplink");
    let lan_chain = format!("ks-{ds}-lan");
    let unknown_chain = format!("ks-{ds}-unknown");
    f.chain(&chain);
    f.chain(&lan_chain);
    let (addr, port, ports) = match direction {
        Direction::Egress => ("-d", "--dport", "--dports"),
        Direction::Ingress => ("-s", "--sport", "--sports"),
    };
    let host = |ip: &IpAddr| format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 });
    if ipv6 {
        f.chain(&unknown_chain);
        f.rule(
            &chain,
            "-m rt --rt-segsleft 1:255",
            Drop(d, Reason::SourceRoute),
        );
        f.rule(
            &chain,
            &format!("{addr} ::ffff:0.0.0.0/96"),
            Drop(d, Reason::Default),
        );
        // Past an extension header the ports are not read: only a rule without ports may allow.
        for header in EXTENSION_HEADERS {
            f.rule(
                &chain,
                &format!("-m ipv6header --soft --header {header}"),
                Jump(&unknown_chain, "transport behind extension headers"),
            );
        }
        for n in OPAQUE_NEXT_HEADERS {
            f.rule(
                &chain,
                &format!("-p {n}"),
                Jump(&unknown_chain, "transport not read"),
            );
        }
    } else {
        f.rule(
            &chain,
            &format!("-m u32 ! --u32 \"{NO_IPV4_OPTIONS}\""),
            Drop(d, Reason::SourceRoute),
        );
    }
    // A later IPv4 fragment has no ports to read (iptables-nft would read its payload as ports).
    let whole = if ipv6 { "" } else { "! -f " };
    // 4. servers; under [vpn_client], what leaves for one asks ks-out-vpn-client, and falls
    // through the later steps to its own drop when that chain does not accept it.
    let servers: Vec<String> = lists
        .servers_port
        .iter()
        .filter(|s| family(&s.0))
        .map(|(ip, protocol, p)| {
            format!(
                "{whole}{addr} {} -p {} {port} {p}",
                host(ip),
                protocol.name()
            )
        })
        .chain(
            lists
                .servers_any
                .iter()
                .filter(|s| family(&s.0))
                .map(|(ip, protocol)| format!("{addr} {} -p {}", host(ip), protocol.name())),
        )
        .collect();
    let restricted = policy.vpn_client.is_some() && direction == Direction::Egress;
    for server in &servers {
        if restricted {
            f.rule(
                &chain,
                server,
                Jump("ks-out-vpn-client", "4 server, if the VPN client sent it"),
            );
        } else {
            f.rule(&chain, server, Allow(d, Reason::Server));
        }
    }
    // 5. DHCP
    if policy.dhcp {
        let (client, server, targets): (u16, u16, Vec<String>) = if ipv6 {
            (546, 547, vec!["ff02::1:2/128".into(), "fe80::/10".into()])
        } else {
            let mut t = vec!["255.255.255.255/32".to_owned()];
            t.extend(
                lists
                    .lan
                    .iter()
                    .filter(|p| p.addr.is_ipv4())
                    .map(|p| p.to_string()),
            );
            (68, 67, t)
        };
        match direction {
            Direction::Egress => {
                for target in targets {
                    f.rule(
                        &chain,
                        &format!("{whole}-d {target} -p udp --sport {client} --dport {server}"),
                        Allow(d, Reason::Dhcp),
                    );
                }
            }
            Direction::Ingress => f.rule(
                &chain,
                &format!("{whole}-p udp --sport {server} --dport {client}"),
                Allow(d, Reason::Dhcp),
            ),
        }
    }
    // 6. NTP
    for ip in lists.ntp.iter().filter(|a| family(a)) {
        f.rule(
            &chain,
            &format!("{whole}{addr} {} -p udp {port} 123", host(ip)),
            Allow(d, Reason::Ntp),
        );
    }
    // 7. DNS
    for ip in lists.dns.iter().filter(|a| family(a)) {
        for protocol in ["tcp", "udp"] {
            f.rule(
                &chain,
                &format!(
                    "{whole}{addr} {} -p {protocol} -m multiport {ports} 53,853",
                    host(ip)
                ),
                Allow(d, Reason::Dns),
            );
        }
    }
    // 8. LAN, through one chain that knows about DNS
    let lan: Vec<String> = lists
        .lan
        .iter()
        .filter(|p| family(&p.addr))
        .map(|p| p.to_string())
        .collect();
    for prefix in &lan {
        f.rule(
            &chain,
            &format!("{addr} {prefix}"),
            Jump(&lan_chain, "8 LAN"),
        );
    }
    if policy.lan.dns {
        f.rule(&lan_chain, "", Allow(d, Reason::Lan));
    } else {
        for protocol in ["tcp", "udp"] {
            if !ipv6 {
                // A fragment's port is not read: it goes on to the default drop.
                f.rule(
                    &lan_chain,
                    &format!("-p {protocol} -f"),
                    Return("port not read"),
                );
            }
            f.rule(
                &lan_chain,
                &format!("-p {protocol} -m multiport {ports} 53,853"),
                Drop(d, Reason::LanDns),
            );
        }
        if !ipv6 {
            for protocol in ["esp", "ah"] {
                f.rule(
                    &lan_chain,
                    &format!("-p {protocol}"),
                    Return("transport not read"),
                );
            }
        }
        f.rule(&lan_chain, "", Allow(d, Reason::Lan));
    }
    // 9. neighbour discovery
    if ipv6 {
        for icmp_type in 133..=137 {
            for scope in ["fe80::/10", "ff02::/16"] {
                f.rule(
                    &chain,
                    &format!("{addr} {scope} -p ipv6-icmp --icmpv6-type {icmp_type}"),
                    Allow(d, Reason::NeighbourDiscovery),
                );
            }
        }
        // A transport that is not read: the LAN allows it only when DNS to the LAN is allowed.
        if policy.lan.dns {
            for prefix in &lan {
                f.rule(
                    &unknown_chain,
                    &format!("{addr} {prefix}"),
                    Allow(d, Reason::Lan),
                );
            }
        }
        f.rule(&unknown_chain, "", Drop(d, Reason::Default));
    }
    if restricted {
        for server in &servers {
            f.rule(&chain, server, Drop(d, Reason::NotVpnClient));
        }
    }
    f.rule(&chain, "", Drop(d, Reason::Default));
}

/// Ingress on a tunnel: everything but unsolicited TCP, which only `[[inbound]]` ports get.
fn tunnel_ingress(f: &mut File, policy: &Policy, ipv6: bool) {
    let d = Direction::Ingress;
    let chain = "ks-in-tunnel";
    f.chain(chain);
    if ipv6 {
        for header in EXTENSION_HEADERS {
            f.rule(
                chain,
                &format!("-m ipv6header --soft --header {header}"),
                Drop(d, Reason::InboundRefused),
            );
        }
        for n in OPAQUE_NEXT_HEADERS {
            f.rule(chain, &format!("-p {n}"), Drop(d, Reason::InboundRefused));
        }
    } else {
        for protocol in ["esp", "ah"] {
            f.rule(
                chain,
                &format!("-p {protocol}"),
                Drop(d, Reason::InboundRefused),
            );
        }
    }
    f.rule(chain, "! -p tcp", Allow(d, Reason::Tunnel));
    if !ipv6 {
        f.rule(chain, "-f", Drop(d, Reason::InboundRefused));
        f.rule(
            chain,
            &format!("-m u32 ! --u32 \"{NO_IPV4_OPTIONS}\""),
            Drop(d, Reason::InboundRefused),
        );
    }
    f.rule(
        chain,
        "-p tcp ! --tcp-flags SYN,ACK SYN",
        Allow(d, Reason::Tunnel),
    );
    for rule in &policy.inbound {
        let sources: Vec<&IpAddr> = rule
            .sources
            .iter()
            .filter(|a| a.is_ipv6() == ipv6)
            .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()))
            .collect();
        if rule.sources.is_empty() {
            f.rule(
                chain,
                &format!("-p tcp --dport {}", rule.port),
                Allow(d, Reason::Tunnel),
            );
        }
        for source in sources {
            f.rule(
                chain,
                &format!("-s {source} -p tcp --dport {}", rule.port),
                Allow(d, Reason::Tunnel),
            );
        }
    }
    f.rule(chain, "", Drop(d, Reason::InboundRefused));
}
