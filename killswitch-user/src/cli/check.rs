//! `killswitch check`

use std::{path::Path, process::ExitCode};

use crate::{
    ebpf::kernel,
    error::Result,
    policy::{resolve_servers, Ipv6Mode, Policy, ServerAddress},
};

pub(super) fn run(config: &Path) -> Result<ExitCode> {
    let policy = Policy::load(config)?;
    println!("{}: valid", config.display());
    let join = |patterns: &[crate::policy::InterfacePattern]| {
        patterns
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("tunnels  {}", join(&policy.tunnels));
    if let Ok(all) = crate::interfaces::list() {
        for odd in crate::interfaces::not_tunnel_like(&all, &policy.tunnels) {
            println!("         WARNING: matches {odd}, which does not look like a VPN tunnel");
        }
    }
    match &policy.uplinks {
        Some(uplinks) if !uplinks.is_empty() => println!("uplinks  {}", join(uplinks)),
        Some(_) => println!("uplinks  none: nothing leaves outside the tunnel"),
        None => println!("uplinks  any non-tunnel interface"),
    }
    if policy.servers.is_empty() {
        println!("servers  none");
    }
    for (i, rule) in policy.servers.iter().enumerate() {
        let label = if i == 0 { "servers" } else { "" };
        match &rule.address {
            ServerAddress::Ip(address) => {
                let endpoint = crate::policy::ServerEndpoint {
                    address: *address,
                    port: rule.port,
                    protocol: rule.protocol,
                };
                println!("{label:8} {endpoint}");
            }
            ServerAddress::Host(host) => {
                let (endpoints, mut unresolved) = resolve_servers(std::slice::from_ref(rule));
                if let Some(e) = unresolved.pop() {
                    return Err(e);
                }
                let shown: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
                println!("{label:8} {host} -> {}", shown.join(", "));
                if rule.port.is_none() {
                    println!(
                        "         WARNING: {host} has no port: every port of every address it \
                         resolves to is open outside the tunnel"
                    );
                }
            }
        }
    }
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let lan: Vec<String> = policy
        .lan
        .networks
        .iter()
        .map(ToString::to_string)
        .collect();
    println!(
        "lan      {}{}",
        list(lan),
        if policy.lan.dns {
            " (DNS to the LAN allowed)"
        } else {
            " (no DNS to the LAN)"
        }
    );
    println!(
        "dhcp     {}",
        if policy.dhcp {
            "allowed on uplinks"
        } else {
            "off"
        }
    );
    println!(
        "ntp      {}",
        list(policy.ntp_servers.iter().map(ToString::to_string).collect())
    );
    println!(
        "dns      {}",
        list(policy.dns_servers.iter().map(ToString::to_string).collect())
    );
    println!(
        "ipv6     {}",
        match policy.ipv6 {
            Ipv6Mode::Tunnel =>
                "through the tunnel only, plus neighbour discovery and v6 exceptions",
            Ipv6Mode::Block => "blocked (loopback only)",
        }
    );
    let inbound: Vec<String> = policy
        .inbound
        .iter()
        .map(|rule| {
            let from = rule
                .sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>();
            format!(
                "tcp/{} from {}",
                rule.port,
                if from.is_empty() {
                    "anyone".into()
                } else {
                    from.join(" ")
                }
            )
        })
        .collect();
    println!("inbound  {}", list(inbound));
    println!(
        "guard    {}",
        match policy.guard {
            Some(true) => "on: forwarded and raw-socket frames held on the uplinks",
            Some(false) => "off",
            None => "on for the system-wide scope, off for others (the default)",
        }
    );
    Ok(if print_kernel() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the running kernel offers the programs, in one short block. False when it cannot run
/// the policy (`up` would hold the scope in lockdown).
fn print_kernel() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel   Linux {}", release.trim());
    if !nix::unistd::geteuid().is_root() {
        println!("         features not probed: probing loads a test program, which needs root");
        return true;
    }
    match kernel::netns_source() {
        Ok(source) => {
            println!("         eBPF programs: full policy");
            println!("         namespace: {}", source.describe());
            true
        }
        Err(reason) => {
            println!("         eBPF programs: CANNOT ENFORCE THE POLICY: {reason}");
            println!("         a first `up` holds the scope in lockdown (loopback and DHCP only)");
            false
        }
    }
}
