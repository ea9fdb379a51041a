//! `killswitch up`

use std::{path::Path, process::ExitCode, time::Instant};

use crate::{
    ebpf::{self, MapEntries},
    error::Result,
    interfaces,
    policy::Policy,
    servers::ResolvedServers,
};

pub(super) fn run(config: &Path, cgroup: Option<&Path>) -> Result<ExitCode> {
    let scope = crate::scope::Scope::from_arg(cgroup)?;
    if super::require_privileges().is_ok() {
        ebpf::warm_up();
    }
    let policy = match Policy::load(config) {
        Ok(policy) => policy,
        // At boot a typo must not leave the machine open: lockdown, unless already enforced.
        Err(e) if super::require_privileges().is_ok() => {
            return Err(ebpf::lock_down(&scope, e.into()))
        }
        Err(e) => return Err(e.into()),
    };
    super::require_privileges()?;
    let started = Instant::now();
    let (mut servers, unresolved) = ResolvedServers::resolve_now(&policy.servers);
    for rule in &policy.servers {
        if let (crate::policy::ServerAddress::Host(host), None) = (&rule.address, rule.port) {
            tracing::warn!("server {host} has no port: every port of every address it resolves to is open outside the tunnel");
        }
    }
    let updating = ebpf::is_pinned(&scope);
    // The interfaces are listed under the scope's lock, so a racing daemon's newer list wins.
    let entries = ebpf::apply(&scope, || {
        // A name that does not resolve now keeps the addresses the scope holds for it.
        servers.keep_known_in(&scope.pin_dir);
        crate::servers::note_replaced_command_list(&scope.pin_dir);
        let list = interfaces::list()?;
        for odd in interfaces::not_tunnel_like(&list, &policy.tunnels) {
            tracing::warn!("`tunnels` matches {odd}, which does not look like a VPN tunnel: everything may leave through it in the clear");
        }
        let mut entries = MapEntries::new(
            &policy,
            &list,
            interfaces::netns_cookie()?,
            &servers.endpoints(),
        );
        entries.server_names = servers.record_of_names();
        Ok(entries)
    })?;
    if entries.tunnels.is_empty() {
        let patterns: Vec<_> = policy.tunnels.iter().map(|p| p.as_str()).collect();
        tracing::warn!(
            "no interface matches tunnels = {patterns:?} yet: only the servers are reachable \
             until it exists and `killswitch up` runs again"
        );
    }
    let tunnels: Vec<String> = entries
        .tunnels
        .iter()
        .map(|(k, name)| format!("{name} (ifindex {})", k.ifindex))
        .collect();
    tracing::info!(
        scope = %scope.name,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "{} enforcement", if updating { "updated" } else { "started" }
    );
    println!(
        "killswitch: {} {}: tunnels {}; {} server entr{}; pinned in {}",
        if updating { "updated" } else { "enforcing" },
        scope.display_cgroup(),
        if tunnels.is_empty() {
            "none yet".into()
        } else {
            tunnels.join(", ")
        },
        entries.servers.len(),
        if entries.servers.len() == 1 {
            "y"
        } else {
            "ies"
        },
        scope.pin_dir.display(),
    );
    // Enforced either way (at boot the network may not be up yet); the exit status says that a
    // server is missing.
    for e in &unresolved {
        tracing::error!(
            "{e}; its server is reachable only at the addresses the scope already held for it, if any, until the name resolves (the daemon retries)"
        );
    }
    Ok(if unresolved.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
