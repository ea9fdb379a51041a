//! `killswitch check`

use std::{path::Path, process::ExitCode};

use crate::{
    error::Result,
    policy::{resolve_servers, Policy, ServerAddress},
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
    match &policy.uplinks {
        Some(uplinks) if !uplinks.is_empty() => println!("uplinks  {}", join(uplinks)),
        Some(_) => println!("uplinks  none: nothing leaves outside the tunnel"),
        None => println!("uplinks  any non-tunnel interface"),
    }
    if policy.servers.is_empty() {
        println!("servers  none: nothing is reachable outside the tunnel");
    }
    for (i, rule) in policy.servers.iter().enumerate() {
        let label = if i == 0 { "servers" } else { "" };
        let endpoints = resolve_servers(std::slice::from_ref(rule))?;
        let shown: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        match &rule.address {
            ServerAddress::Ip(_) => println!("{label:8} {}", shown.join(", ")),
            ServerAddress::Host(host) => println!("{label:8} {host} -> {}", shown.join(", ")),
        }
    }
    Ok(ExitCode::SUCCESS)
}
