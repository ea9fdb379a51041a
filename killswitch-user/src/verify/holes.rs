//! The usual holes around a kill switch, as warnings with the fix: a tunnel that is not there,
//! IPv6 the tunnel does not carry, a resolver the policy cannot reach, names with no daemon to
//! follow them, another firewall's `ct state established` accept, and forwarding bridges whose
//! traffic no cgroup program sees.

use std::{net::IpAddr, path::Path};

use super::Check;
use crate::{
    interfaces,
    model::{self, Packet},
    policy::{Ipv6Mode, Policy, ServerAddress},
    scope::Scope,
};

pub(super) fn checks(scope: &Scope, policy: &Policy) -> Vec<Check> {
    vec![
        tunnel(policy),
        ipv6(policy),
        resolver(
            policy,
            Path::new("/etc/resolv.conf"),
            Path::new(RESOLVED_UPSTREAMS),
            route_interface,
        ),
        daemon(scope, policy),
        other_firewalls(),
        forwarding(policy),
    ]
}

/// `tunnel`: an interface matching `tunnels` exists.
fn tunnel(policy: &Policy) -> Check {
    let list = interfaces::list().unwrap_or_default();
    let found = interfaces::matching(&list, &policy.tunnels);
    let patterns: Vec<&str> = policy.tunnels.iter().map(|p| p.as_str()).collect();
    if found.is_empty() {
        Check::warn(
            "tunnel",
            format!(
                "no interface matches tunnels = [{}]: only loopback and the exceptions get through",
                patterns.join(", ")
            ),
            "start the VPN; if it is up, set `tunnels` to its interface name",
        )
    } else {
        let names: Vec<String> = found
            .iter()
            .map(|i| format!("{} (ifindex {})", i.name, i.index))
            .collect();
        Check::pass("tunnel", format!("{} up", names.join(", ")))
    }
}

/// Global IPv6 addresses per interface name, from /proc/net/if_inet6.
fn global_ipv6() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Fields: address, ifindex, prefix length, scope (00 = global), flags, name.
            (f.len() == 6 && f[3] == "00").then(|| {
                let hex = f[0];
                let groups: Vec<&str> = (0..8).map(|i| &hex[i * 4..i * 4 + 4]).collect();
                let address = groups
                    .join(":")
                    .parse::<std::net::Ipv6Addr>()
                    .map_or(hex.to_owned(), |a| a.to_string());
                (f[5].to_owned(), address)
            })
        })
        .collect()
}

/// `ipv6`: an uplink with IPv6 while no tunnel carries it.
fn ipv6(policy: &Policy) -> Check {
    if policy.ipv6 == Ipv6Mode::Block {
        return Check::pass(
            "ipv6",
            "ipv6.mode = \"block\": all IPv6 but loopback is dropped",
        );
    }
    let list = interfaces::list().unwrap_or_default();
    let tunnels: Vec<String> = interfaces::matching(&list, &policy.tunnels)
        .into_iter()
        .map(|i| i.name)
        .collect();
    let global = global_ipv6();
    let (on_tunnel, on_uplinks): (Vec<_>, Vec<_>) =
        global.iter().partition(|(name, _)| tunnels.contains(name));
    if on_uplinks.is_empty() || !on_tunnel.is_empty() {
        return Check::pass(
            "ipv6",
            if on_uplinks.is_empty() {
                "no uplink has a global IPv6 address".to_owned()
            } else {
                format!(
                    "the tunnel carries IPv6 ({})",
                    on_tunnel
                        .iter()
                        .map(|(n, a)| format!("{n} {a}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
    }
    let exceptions = policy
        .servers
        .iter()
        .filter(|s| matches!(s.address, ServerAddress::Ip(IpAddr::V6(_))))
        .count()
        + policy.ntp_servers.iter().filter(|a| a.is_ipv6()).count()
        + policy.dns_servers.iter().filter(|a| a.is_ipv6()).count()
        + policy
            .lan
            .networks
            .iter()
            .filter(|p| p.addr.is_ipv6())
            .count();
    let uplinks: Vec<String> = on_uplinks.iter().map(|(n, a)| format!("{n} {a}")).collect();
    Check::warn(
        "ipv6",
        format!(
            "IPv6 is on for {} but no tunnel carries IPv6: IPv6 connections are dropped (not leaked) and apps wait before trying IPv4{}",
            uplinks.join(", "),
            if exceptions > 0 {
                format!("; {exceptions} IPv6 exceptions of the policy leave through the uplink in the clear")
            } else {
                String::new()
            }
        ),
        "set ipv6.mode = \"block\" to fail fast, or have the VPN carry IPv6 (OpenVPN: redirect-gateway ipv6)",
    )
}

/// The interface the kernel would send a packet to `ip` through (a connected UDP socket sends
/// nothing; its local address names the interface).
fn route_interface(ip: IpAddr) -> Option<String> {
    let any: std::net::SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .ok()?;
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect((ip, 53)).ok()?;
    let local = socket.local_addr().ok()?.ip();
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        let address = a.address?;
        let found = match local {
            IpAddr::V4(v4) => address.as_sockaddr_in().map(|s| s.ip() == v4),
            IpAddr::V6(v6) => address.as_sockaddr_in6().map(|s| s.ip() == v6),
        };
        found.unwrap_or(false).then_some(a.interface_name)
    })
}

/// Where systemd-resolved lists the upstream servers behind its local stub (127.0.0.53).
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// The nameservers a resolv.conf names.
fn nameservers(path: &Path) -> Vec<IpAddr> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse().ok())
        .collect()
}

/// `resolver`: where /etc/resolv.conf sends name lookups, and what the policy does with them;
/// behind a local stub, the upstreams systemd-resolved lists in `upstreams` are judged too.
/// `route` names the interface a packet to an address leaves through.
fn resolver(
    policy: &Policy,
    path: &Path,
    upstreams: &Path,
    route: impl Fn(IpAddr) -> Option<String>,
) -> Check {
    let mut servers = nameservers(path);
    if servers.is_empty() {
        return Check::pass("resolver", format!("no nameserver in {}", path.display()));
    }
    if servers.iter().any(IpAddr::is_loopback) {
        servers.extend(
            nameservers(upstreams)
                .into_iter()
                .filter(|s| !s.is_loopback()),
        );
    }
    let mut blocked = Vec::new();
    let mut clear = Vec::new();
    let mut local = Vec::new();
    for &server in &servers {
        if server.is_loopback() {
            local.push(server.to_string());
            continue;
        }
        let through = route(server);
        let tunnel = through
            .as_deref()
            .is_some_and(|name| policy.tunnels.iter().any(|p| p.matches(name)));
        if tunnel {
            continue;
        }
        let lookup = Packet::leaving_uplink(server, 17, 53);
        let (verdict, reason) = model::verdict(policy, &lookup);
        let via = through.map_or(String::new(), |name| format!(" via {name}"));
        match verdict {
            model::Verdict::Allow => clear.push(format!("{server}{via} ({})", reason.name())),
            model::Verdict::Drop => {
                blocked.push(format!("{server}{via} (dropped as {})", reason.name()))
            }
        }
    }
    if !blocked.is_empty() {
        return Check::warn(
            "resolver",
            format!(
                "{} in {} is reached outside the tunnel, where the policy does not let DNS go: name lookups through it fail, they do not leak (lan.dns = {})",
                blocked.join(", "),
                path.display(),
                policy.lan.dns
            ),
            "use the VPN's resolver (OpenVPN: dhcp-option DNS with update-resolv-conf or resolved), or list it in [dns] servers if the router may see every name",
        );
    }
    let mut said = vec![format!(
        "nameservers {}",
        servers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )];
    if !clear.is_empty() {
        said.push(format!(
            "outside the tunnel as configured: {}",
            clear.join(", ")
        ));
    }
    if !local.is_empty() {
        said.push("a local resolver forwards the rest (its own upstreams decide; a per-app scope does not hold it)".into());
    }
    Check::pass("resolver", said.join("; "))
}

/// `daemon`: a `killswitch daemon` for this scope, needed when servers are given by name.
fn daemon(scope: &Scope, policy: &Policy) -> Check {
    let hosts: Vec<&str> = policy
        .servers
        .iter()
        .filter_map(|s| match &s.address {
            ServerAddress::Host(h) => Some(h.as_str()),
            ServerAddress::Ip(_) => None,
        })
        .collect();
    match daemon_pid(scope) {
        Some(pid) => Check::pass("daemon", format!("killswitch daemon running (pid {pid})")),
        // nftables matches tunnels by name; the eBPF maps hold ifindexes.
        None if hosts.is_empty() && crate::backend::Backend::Nftables.holds(scope) => Check::pass(
            "daemon",
            "no daemon; none needed for names, and the table follows tunnels by name",
        ),
        None if hosts.is_empty() => Check::pass(
            "daemon",
            "no daemon; none needed for names (without it, a tunnel that comes back with a new ifindex stays blocked until `killswitch up`)",
        ),
        None => Check::warn(
            "daemon",
            format!(
                "no killswitch daemon for this scope while servers are given by name ({}): their addresses are not followed when they change",
                hosts.join(", ")
            ),
            "enable killswitch-daemon.service, or run `killswitch daemon`",
        ),
    }
}

/// The pid of a `killswitch daemon` running for `scope`, read from /proc.
fn daemon_pid(scope: &Scope) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_killswitch = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "killswitch"));
        if !is_killswitch || subcommand(&args) != Some("daemon") {
            continue;
        }
        let cgroup = args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix("--cgroup=").map(str::to_owned).or_else(|| {
                (a == "--cgroup")
                    .then(|| args.get(i + 1).cloned())
                    .flatten()
            })
        });
        let theirs = Scope::from_arg(cgroup.as_deref().map(Path::new));
        if theirs.is_ok_and(|s| s.name == scope.name) {
            return Some(pid);
        }
    }
    None
}

/// The subcommand in a `killswitch` command line: the first word that is neither an option nor
/// the value of `--config` (`killswitch run -- daemon` runs an app, it is no daemon).
fn subcommand(args: &[String]) -> Option<&str> {
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--config" {
            rest.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

/// `firewall`: another ruleset accepting `ct state established` on output: an nftables table
/// (iptables-nft rules are among them) in a chain that an output or postrouting hook reaches
/// (jumps, gotos and verdict maps followed), or legacy iptables.
fn other_firewalls() -> Check {
    let output = std::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Some(output) = output.ok().filter(|o| o.status.success()) else {
        return Check::skip("firewall", "nft is not available to list other rulesets");
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
        return Check::skip("firewall", "nft printed unreadable JSON");
    };
    let mut found = established_accepts(&json);
    found.extend(legacy_established_accepts());
    if found.is_empty() {
        Check::pass(
            "firewall",
            "no other ruleset accepts `ct state established` on output",
        )
    } else {
        Check::warn(
            "firewall",
            format!(
                "{} accepts `ct state established` on output: on its own that lets flows opened before the VPN keep going around it (killswitch still drops them in its scope)",
                found.join(", ")
            ),
            "if that was an old kill-switch script, remove it: `nft list ruleset` (or `iptables-legacy-save`) shows it",
        )
    }
}

/// The chains of other tables in `nft -j list ruleset` that accept established flows and that
/// an output or postrouting hook reaches.
fn established_accepts(json: &serde_json::Value) -> Vec<String> {
    type Chain = (String, String, String);
    let items = json["nftables"].as_array().cloned().unwrap_or_default();
    let key = |v: &serde_json::Value, name: &str| -> Chain {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        (s("family"), s("table"), s(name))
    };
    let mut reached: Vec<Chain> = items
        .iter()
        .filter_map(|i| i.get("chain"))
        .filter(|c| c["hook"] == "output" || c["hook"] == "postrouting")
        .map(|c| key(c, "name"))
        .filter(|(_, table, _)| !table.starts_with("killswitch"))
        .collect();
    let rules: Vec<(Chain, String)> = items
        .iter()
        .filter_map(|i| i.get("rule"))
        .map(|r| (key(r, "chain"), r["expr"].to_string()))
        .collect();
    // Chains reached by jump or goto (also from verdict maps) from a reached chain.
    let mut next = 0;
    while next < reached.len() {
        let from = reached[next].clone();
        for (chain, exprs) in rules.iter().filter(|(c, _)| *c == from) {
            for target in jump_targets(exprs) {
                let to = (chain.0.clone(), chain.1.clone(), target);
                if !reached.contains(&to) {
                    reached.push(to);
                }
            }
        }
        next += 1;
    }
    let mut found = Vec::new();
    for (chain, exprs) in &rules {
        let established =
            exprs.contains(r#"{"ct":{"key":"state"}}"#) && exprs.contains("established");
        let line = format!("table {} {} chain {}", chain.0, chain.1, chain.2);
        if reached.contains(chain)
            && established
            && exprs.contains(r#""accept""#)
            && !found.contains(&line)
        {
            found.push(line);
        }
    }
    found
}

/// The targets of `jump` and `goto` verdicts anywhere in a rule's expressions (JSON text).
fn jump_targets(exprs: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for verdict in [r#""jump":{"target":""#, r#""goto":{"target":""#] {
        for (at, _) in exprs.match_indices(verdict) {
            let rest = &exprs[at + verdict.len()..];
            if let Some(end) = rest.find('"') {
                targets.push(rest[..end].to_owned());
            }
        }
    }
    targets
}

/// Legacy (x_tables) iptables chains reached from OUTPUT or POSTROUTING that accept
/// ESTABLISHED: invisible to `nft`.
fn legacy_established_accepts() -> Vec<String> {
    let mut found = Vec::new();
    for (tables, save) in [
        ("/proc/net/ip_tables_names", "iptables-legacy-save"),
        ("/proc/net/ip6_tables_names", "ip6tables-legacy-save"),
    ] {
        if std::fs::read_to_string(tables)
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            continue;
        }
        let Ok(output) = std::process::Command::new(save)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
        else {
            continue;
        };
        found.extend(legacy_in(save, &String::from_utf8_lossy(&output.stdout)));
    }
    found
}

/// [`legacy_established_accepts`] on the text of one `*-save`.
fn legacy_in(save: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut table = "";
    let mut rules: Vec<(&str, &str)> = Vec::new();
    let flush = |table: &str, rules: &mut Vec<(&str, &str)>, found: &mut Vec<String>| {
        let mut reached = vec!["OUTPUT".to_owned(), "POSTROUTING".to_owned()];
        let mut next = 0;
        while next < reached.len() {
            let from = reached[next].clone();
            for (_, rule) in rules.iter().filter(|(c, _)| *c == from) {
                let words: Vec<&str> = rule.split_whitespace().collect();
                for pair in words.windows(2) {
                    if (pair[0] == "-j" || pair[0] == "-g") && !reached.iter().any(|r| r == pair[1])
                    {
                        reached.push(pair[1].to_owned());
                    }
                }
            }
            next += 1;
        }
        for (chain, rule) in rules.drain(..) {
            let line = format!("{save}: table {table} chain {chain}");
            if reached.iter().any(|r| r == chain)
                && rule.contains("ESTABLISHED")
                && rule.contains("-j ACCEPT")
                && !found.contains(&line)
            {
                found.push(line);
            }
        }
    };
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            flush(table, &mut rules, &mut found);
            table = name;
        } else if let Some(rule) = line.strip_prefix("-A ") {
            if let Some((chain, rest)) = rule.split_once(' ') {
                rules.push((chain, rest));
            }
        }
    }
    flush(table, &mut rules, &mut found);
    found
}

/// `forwarding`: this host forwards, and interfaces of guests (containers, VMs) are there:
/// bridges, and veth, tap and macvtap interfaces that are neither a tunnel nor where the
/// default routes go (routed setups: Calico, nspawn, libvirt routed).
fn forwarding(policy: &Policy) -> Check {
    let on = |path: &str| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1");
    let forwards =
        on("/proc/sys/net/ipv4/ip_forward") || on("/proc/sys/net/ipv6/conf/all/forwarding");
    let defaults: Vec<String> = ["198.51.100.254", "2001:db8:ffff::9"]
        .iter()
        .filter_map(|a| route_interface(a.parse().ok()?))
        .collect();
    let guests: Vec<String> = interfaces::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !policy.tunnels.iter().any(|p| p.matches(&i.name)))
        .filter_map(|i| {
            let driver = interfaces::driver(&i.name)?;
            let guest = driver == "bridge"
                || (["veth", "tun", "macvtap"].contains(&driver.as_str())
                    && !defaults.contains(&i.name));
            guest.then(|| format!("{} ({driver})", i.name))
        })
        .collect();
    match (forwards, guests.is_empty()) {
        (true, false) if policy.guarded() => Check::pass(
            "forwarding",
            format!(
                "this host forwards packets and has interfaces of guests: {}; the uplink guard holds what it forwards to the policy (docs/guard.md)",
                guests.join(", ")
            ),
        ),
        (true, false) => Check::warn(
            "forwarding",
            format!(
                "this host forwards packets and has interfaces of guests: {}; containers and VMs behind them are forwarded, which cgroup programs never see, so they can leave through the uplink in the clear when the tunnel is down",
                guests.join(", ")
            ),
            "turn the uplink guard on (`[guard] enabled = true`, the default system-wide), stop forwarding (sysctl net.ipv4.ip_forward=0) while it matters, or give those guests a kill switch of their own (docs/guard.md)",
        ),
        (true, true) => Check::pass(
            "forwarding",
            "this host forwards packets but has no interface for containers or VMs",
        ),
        (false, _) => Check::pass("forwarding", "this host does not forward packets"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lan_resolver_with_lan_dns_off_is_a_warning_that_says_it_does_not_leak() {
        let dir = std::env::temp_dir().join(format!("ks-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nnameserver 192.168.1.1\nnameserver 10.8.0.1\n",
        )
        .unwrap();
        let policy = Policy::from_toml(
            "tunnels = [\"tun0\"]\n[lan]\nnetworks = [\"192.168.1.0/24\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        // The router's address leaves by the uplink, the VPN's resolver by the tunnel.
        let route = |ip: IpAddr| {
            Some(
                if ip.to_string() == "10.8.0.1" {
                    "tun0"
                } else {
                    "eth0"
                }
                .to_owned(),
            )
        };
        let none = dir.join("none");
        let check = resolver(&policy, &path, &none, route);
        assert_eq!(check.result, super::super::Outcome::Warn, "{check:?}");
        assert!(
            check
                .evidence
                .contains("192.168.1.1 via eth0 (dropped as lan-dns)"),
            "{check:?}"
        );
        assert!(!check.evidence.contains("10.8.0.1"), "{check:?}");
        assert!(check.evidence.contains("do not leak"), "{check:?}");
        let with_dns = Policy::from_toml(
            "tunnels = [\"tun0\"]\n[lan]\nnetworks = [\"192.168.1.0/24\"]\ndns = true\n",
            Path::new("t.toml"),
        )
        .unwrap();
        std::fs::write(&path, "nameserver 192.168.1.1\n").unwrap();
        let check = resolver(&with_dns, &path, &none, route);
        assert_eq!(check.result, super::super::Outcome::Pass, "{check:?}");
        // Behind systemd-resolved's stub, its upstream on the LAN is judged.
        std::fs::write(&path, "nameserver 127.0.0.53\n").unwrap();
        let upstreams = dir.join("upstreams");
        std::fs::write(&upstreams, "nameserver 192.168.1.1\n").unwrap();
        let check = resolver(&policy, &path, &upstreams, route);
        assert_eq!(check.result, super::super::Outcome::Warn, "{check:?}");
        assert!(check.evidence.contains("192.168.1.1"), "{check:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn established_accepts_are_found_where_output_reaches_them() {
        let rule = |chain: &str, expr: serde_json::Value| serde_json::json!({"rule": {"family": "inet", "table": "vpn", "chain": chain, "expr": expr}});
        let established = serde_json::json!([
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": null}
        ]);
        let json = serde_json::json!({"nftables": [
            {"chain": {"family": "inet", "table": "vpn", "name": "out", "hook": "output"}},
            {"chain": {"family": "inet", "table": "vpn", "name": "in", "hook": "input"}},
            {"chain": {"family": "inet", "table": "vpn", "name": "helper"}},
            {"chain": {"family": "inet", "table": "vpn", "name": "unused"}},
            rule("out", serde_json::json!([{"jump": {"target": "helper"}}])),
            rule("helper", established.clone()),
            rule("in", established.clone()),
            rule("unused", established),
        ]});
        assert_eq!(
            established_accepts(&json),
            vec!["table inet vpn chain helper"]
        );
        let save = "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -o tun0 -j ACCEPT\n-A OUTPUT -j KS\n\
                    -A KS -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                    -A INPUT -m state --state ESTABLISHED -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            legacy_in("iptables-legacy-save", save),
            vec!["iptables-legacy-save: table filter chain KS"]
        );
    }
}
