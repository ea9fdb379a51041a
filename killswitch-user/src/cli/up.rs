//! `killswitch up`

use std::{path::Path, process::ExitCode, time::Instant};

use crate::{
    backend::{self, Backend, Choice},
    ebpf,
    error::Result,
    policy::{Policy, ServerAddress},
    scope::Scope,
    servers::ResolvedServers,
};

pub(super) fn run(config: &Path, cgroup: Option<&Path>, choice: Choice) -> Result<ExitCode> {
    let (scope, cgroup2) = match Scope::from_arg(cgroup) {
        Ok(scope) => (scope, true),
        // No cgroup2 at all: the whole machine can still be held by nftables.
        Err(e) if cgroup.is_none() && choice != Choice::Ebpf => {
            tracing::debug!("{e}");
            (Scope::without_cgroup2(), false)
        }
        Err(e) => return Err(e),
    };
    let privileged = super::require_privileges().is_ok();
    let _warming =
        (privileged && cgroup2 && choice != Choice::Nftables).then(|| ebpf::warm_up_for(&scope));
    let policy = match Policy::load(config) {
        Ok(policy) => policy.for_scope(scope.is_system_wide()),
        // At boot a typo must not leave the machine open: lockdown, unless already enforced.
        Err(e) if privileged => return Err(backend::lock_down(choice, &scope, e.into())),
        Err(e) => return Err(e.into()),
    };
    super::require_privileges()?;
    let started = Instant::now();
    let (mut servers, unresolved) = ResolvedServers::resolve_now(&policy.servers);
    for rule in &policy.servers {
        if let (ServerAddress::Host(host), None) = (&rule.address, rule.port) {
            tracing::warn!("server {host} has no port: every port of every address it resolves to is open outside the tunnel");
        }
    }
    let updating = !Backend::holding(&scope).is_empty();
    let enforced = backend::apply(choice, &scope, &policy, &mut servers)?;
    if enforced.tunnels.is_empty() {
        let patterns: Vec<_> = policy.tunnels.iter().map(|p| p.as_str()).collect();
        tracing::warn!(
            "no interface matches tunnels = {patterns:?} yet: only the servers are reachable \
             until it exists and `killswitch up` runs again"
        );
    }
    tracing::info!(
        scope = %scope.name,
        backend = enforced.backend.name(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "{} enforcement", if updating { "updated" } else { "started" }
    );
    println!(
        "killswitch: {} {} with {}: tunnels {}; {} server entr{}; {}",
        if updating { "updated" } else { "enforcing" },
        scope.display_cgroup(),
        enforced.backend.name(),
        if enforced.tunnels.is_empty() {
            "none yet".into()
        } else {
            enforced.tunnels.join(", ")
        },
        enforced.servers,
        if enforced.servers == 1 { "y" } else { "ies" },
        enforced.held_in,
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
