//! `killswitch up`

use std::{path::Path, process::ExitCode, time::Instant};

use clap::ValueEnum;

use crate::{
    backend::{nftables, Backend},
    ebpf::{self, MapEntries},
    error::{Error, Result},
    interfaces,
    policy::{Policy, ServerAddress},
    scope::Scope,
    servers::ResolvedServers,
};

/// `--backend`: which one enforces the scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(super) enum Choice {
    /// eBPF, or nftables (with one warning line saying why) where eBPF cannot enforce it
    #[default]
    Auto,
    /// eBPF programs on the scope's cgroup (pinned in bpffs)
    Ebpf,
    /// An nftables table in this network namespace
    Nftables,
}

/// What `up` put in force, for its summary line.
struct Enforced {
    backend: Backend,
    /// Tunnels in force (eBPF: with ifindex) or their patterns (nftables: matched by name).
    tunnels: Vec<String>,
    servers: usize,
    /// Where the state lives: the pin directory, or the nft table.
    held_in: String,
}

pub(super) fn run(config: &Path, cgroup: Option<&Path>, choice: Choice) -> Result<ExitCode> {
    let scope = match Scope::from_arg(cgroup) {
        Ok(scope) => scope,
        // No cgroup2 at all: the whole machine can still be held by nftables.
        Err(e) if cgroup.is_none() && choice != Choice::Ebpf => {
            tracing::debug!("{e}");
            Scope::without_cgroup2()
        }
        Err(e) => return Err(e),
    };
    let privileged = super::require_privileges().is_ok();
    if privileged && choice != Choice::Nftables {
        ebpf::warm_up();
    }
    let policy = match Policy::load(config) {
        Ok(policy) => policy,
        // At boot a typo must not leave the machine open: lockdown, unless already enforced.
        Err(e) if privileged => return Err(lock_down(choice, &scope, e.into())),
        Err(e) => return Err(e.into()),
    };
    super::require_privileges()?;
    let started = Instant::now();
    let (servers, unresolved) = ResolvedServers::resolve_now(&policy.servers);
    for rule in &policy.servers {
        if let (ServerAddress::Host(host), None) = (&rule.address, rule.port) {
            tracing::warn!("server {host} has no port: every port of every address it resolves to is open outside the tunnel");
        }
    }
    let updating = !Backend::holding(&scope).is_empty();
    let enforced = match choice {
        Choice::Ebpf => with_ebpf(&scope, &policy, servers, true),
        Choice::Nftables => with_nftables(&scope, &policy, &servers),
        Choice::Auto => match with_ebpf(&scope, &policy, servers.clone(), false) {
            // The kernel (or the machine) refused eBPF; a bad config would fail the same anywhere.
            Err(refused) if refused.exit_code() == 1 => {
                tracing::warn!("eBPF cannot enforce here ({refused}); using nftables instead");
                with_nftables(&scope, &policy, &servers).map_err(|also| {
                    let both = Error::Runtime(format!(
                        "neither backend can enforce {}: eBPF: {refused}; nftables: {also}",
                        scope.display_cgroup()
                    ));
                    lock_down(Choice::Auto, &scope, both)
                })
            }
            other => other,
        },
    }?;
    // The new backend holds the scope now: the other lets go (never a moment without either).
    for other in Backend::ALL.into_iter().filter(|b| *b != enforced.backend) {
        if other.holds(&scope) && other.remove(&scope)? {
            tracing::info!(
                "{} moved from {} to {}",
                scope.display_cgroup(),
                other.name(),
                enforced.backend.name()
            );
        }
    }
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

fn with_ebpf(
    scope: &Scope,
    policy: &Policy,
    mut servers: ResolvedServers,
    lockdown: bool,
) -> Result<Enforced> {
    // The interfaces are listed under the scope's lock, so a racing daemon's newer list wins.
    let build = || {
        // A name that does not resolve now keeps the addresses the scope holds for it.
        servers.keep_known_in(&scope.pin_dir);
        crate::servers::note_replaced_command_list(&scope.pin_dir);
        let list = interfaces::list()?;
        for odd in interfaces::not_tunnel_like(&list, &policy.tunnels) {
            tracing::warn!("`tunnels` matches {odd}, which does not look like a VPN tunnel: everything may leave through it in the clear");
        }
        let mut entries = MapEntries::new(
            policy,
            &list,
            interfaces::netns_cookie()?,
            &servers.endpoints(),
        );
        entries.server_names = servers.record_of_names();
        Ok(entries)
    };
    let entries = ebpf::apply_with(scope, build, lockdown)?;
    Ok(Enforced {
        backend: Backend::Ebpf,
        tunnels: entries
            .tunnels
            .iter()
            .map(|(k, name)| format!("{name} (ifindex {})", k.ifindex))
            .collect(),
        servers: entries.servers.len(),
        held_in: format!("pinned in {}", scope.pin_dir.display()),
    })
}

fn with_nftables(scope: &Scope, policy: &Policy, servers: &ResolvedServers) -> Result<Enforced> {
    nftables::available()?;
    let endpoints = servers.endpoints();
    let fresh = !nftables::holds(scope);
    if let Err(e) = nftables::apply(scope, policy, &endpoints) {
        // Nothing enforced this scope before: never leave it open.
        return Err(if fresh && Backend::holding(scope).is_empty() {
            nftables::lock_down(scope, e)
        } else {
            e
        });
    }
    let list = interfaces::list().unwrap_or_default();
    Ok(Enforced {
        backend: Backend::Nftables,
        tunnels: interfaces::matching(&list, &policy.tunnels)
            .into_iter()
            .map(|i| i.name)
            .collect(),
        servers: endpoints.len(),
        held_in: format!("table inet {}", nftables::table(scope)?),
    })
}

/// Holds the scope in lockdown because the policy cannot be read, unless some backend already
/// enforces it (then what is in force stays untouched).
fn lock_down(choice: Choice, scope: &Scope, cause: Error) -> Error {
    if !Backend::holding(scope).is_empty() {
        return cause;
    }
    match choice {
        Choice::Ebpf => ebpf::lock_down(scope, cause),
        Choice::Nftables => nftables::lock_down(scope, cause),
        Choice::Auto => match ebpf::lock_down(scope, cause) {
            held @ Error::Lockdown(_) => held,
            refused => nftables::lock_down(scope, refused),
        },
    }
}
