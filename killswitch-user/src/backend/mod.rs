//! Where a scope's policy is enforced: the eBPF programs on its cgroup (`crate::ebpf`), or an
//! nftables table in the network namespace ([`nftables`]). `up` picks one; `down` and `status`
//! look at both, so a scope moved from one to the other is never left half-held.

mod nft_tables;
pub mod nftables;

use serde::Serialize;

use crate::{
    ebpf::pins,
    ebpf::{self, MapEntries},
    error::{Error, Result},
    interfaces,
    policy::Policy,
    scope::Scope,
    servers::ResolvedServers,
};

/// `--backend`: which one enforces the scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// eBPF, or nftables (with one warning line saying why) where eBPF cannot enforce it
    #[default]
    Auto,
    /// eBPF programs on the scope's cgroup (pinned in bpffs)
    Ebpf,
    /// An nftables table in this network namespace
    Nftables,
}

/// What an apply put in force.
pub struct Applied {
    pub backend: Backend,
    /// eBPF: the tunnels in its map (with ifindex); nftables: the interfaces its names match now.
    pub tunnels: Vec<String>,
    /// eBPF: the map's tunnel entries, for the daemon's log lines.
    pub entries: Option<MapEntries>,
    pub servers: usize,
    /// Where the state lives: the pin directory, or the nft table.
    pub held_in: String,
}

/// Puts `policy` with `servers` in force on the scope with the backend `choice` names (`auto`:
/// eBPF, else nftables with one warning line), then lets the other backend go if it held the
/// scope (no moment without either). A scope nothing held is left in lockdown if this fails.
/// For eBPF, `servers` keeps the addresses the scope holds for names that do not resolve now.
pub fn apply(
    choice: Choice,
    scope: &Scope,
    policy: &Policy,
    servers: &mut ResolvedServers,
) -> Result<Applied> {
    // `[guard]` unset means the scope's default (callers that loaded the policy for the scope
    // have resolved it already).
    let resolved;
    let policy = if policy.guard.is_none() {
        resolved = policy.clone().for_scope(scope.is_system_wide());
        &resolved
    } else {
        policy
    };
    let applied = match choice {
        Choice::Ebpf => with_ebpf(scope, policy, servers, true),
        Choice::Nftables => with_nftables(scope, policy, servers),
        // Already held by eBPF: an error now is not the kernel refusing eBPF; it stays.
        Choice::Auto if ebpf::is_pinned(scope) => with_ebpf(scope, policy, servers, true),
        Choice::Auto => {
            let before = servers.clone();
            match with_ebpf(scope, policy, servers, false) {
                // The kernel (or the machine) refused eBPF; a bad config fails the same anywhere.
                Err(refused) if refused.exit_code() == 1 => {
                    tracing::warn!("eBPF cannot enforce here ({refused}); using nftables instead");
                    *servers = before;
                    with_nftables(scope, policy, servers).map_err(|also| {
                        let both = Error::Runtime(format!(
                            "neither backend can enforce {}: eBPF: {refused}; nftables: {also}",
                            scope.display_cgroup()
                        ));
                        lock_down(Choice::Auto, scope, both)
                    })
                }
                other => other,
            }
        }
    }?;
    for other in Backend::ALL.into_iter().filter(|b| *b != applied.backend) {
        if other.holds(scope) && other.remove(scope)? {
            tracing::info!(
                "{} moved from {} to {}",
                scope.display_cgroup(),
                other.name(),
                applied.backend.name()
            );
        }
    }
    Ok(applied)
}

fn with_ebpf(
    scope: &Scope,
    policy: &Policy,
    servers: &mut ResolvedServers,
    lockdown: bool,
) -> Result<Applied> {
    // The interfaces are listed under the scope's lock, so a racing daemon's newer list wins.
    let build = || {
        // A name that does not resolve now keeps the addresses the scope holds for it.
        servers.keep_known_in(&pins::pin_dir(scope));
        crate::servers::note_replaced_command_list(&pins::pin_dir(scope));
        let list = interfaces::list()?;
        for odd in interfaces::not_tunnel_like(&list, &policy.tunnels) {
            tracing::warn!("`tunnels` matches {odd}, which does not look like a VPN tunnel: everything may leave through it in the clear");
        }
        let mut entries = MapEntries::new(
            policy,
            &list,
            interfaces::netns_cookie()?,
            &servers.endpoints(),
            &crate::vpn_client::current(policy),
            interfaces::guarded(&list, policy),
        );
        entries.server_names = servers.record_of_names();
        Ok(entries)
    };
    let entries = ebpf::apply_with(scope, build, lockdown)?;
    Ok(Applied {
        backend: Backend::Ebpf,
        tunnels: entries
            .interfaces
            .tunnels
            .iter()
            .map(|(k, name)| format!("{name} (ifindex {})", k.ifindex))
            .collect(),
        servers: entries.servers.len(),
        entries: Some(entries),
        held_in: format!("pinned in {}", pins::pin_dir(scope).display()),
    })
}

fn with_nftables(scope: &Scope, policy: &Policy, servers: &ResolvedServers) -> Result<Applied> {
    nftables::available()?;
    let _lock = nftables::lock(scope)?;
    let endpoints = servers.endpoints();
    let fresh = !nftables::holds(scope);
    crate::servers::note_replaced_command_list_in_table(scope);
    if let Err(e) = nftables::apply(scope, policy, &endpoints) {
        // Nothing enforced this scope before: never leave it open.
        return Err(if fresh && Backend::holding(scope).is_empty() {
            nftables::lock_down(scope, e)
        } else {
            e
        });
    }
    let list = interfaces::list().unwrap_or_default();
    Ok(Applied {
        backend: Backend::Nftables,
        tunnels: interfaces::matching(&list, &policy.tunnels)
            .into_iter()
            .map(|i| i.name)
            .collect(),
        entries: None,
        servers: endpoints.len(),
        held_in: format!("table inet {}", nftables::table(scope)?),
    })
}

/// Holds the scope in lockdown because the policy cannot be put in force (`cause`), unless some
/// backend already enforces it (then what is in force stays untouched). Returns the error to
/// report.
pub fn lock_down(choice: Choice, scope: &Scope, cause: Error) -> Error {
    if !Backend::holding(scope).is_empty() {
        return cause;
    }
    let nftables_lock_down = |cause: Error| match nftables::lock(scope) {
        Ok(_lock) => nftables::lock_down(scope, cause),
        Err(also) => Error::Runtime(format!("{cause}; lockdown failed too ({also})")),
    };
    match choice {
        Choice::Ebpf => ebpf::lock_down(scope, cause),
        Choice::Nftables => nftables_lock_down(cause),
        Choice::Auto => match ebpf::try_lock_down(scope, cause) {
            Ok(report) => report,
            Err(failed) => {
                let (cause, refused) = *failed;
                tracing::debug!("eBPF cannot hold the lockdown ({refused}); nftables will");
                nftables_lock_down(cause)
            }
        },
    }
}

/// Every scope either backend holds now, once each, by path.
pub fn scopes() -> Result<Vec<Scope>> {
    let mut all = pins::scopes()?;
    all.extend(nftables::scopes());
    all.sort_by(|a, b| a.relative.cmp(&b.relative));
    all.dedup_by(|a, b| a.relative == b.relative);
    Ok(all)
}

/// A backend that holds scopes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ebpf,
    Nftables,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Ebpf, Backend::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ebpf => "ebpf",
            Backend::Nftables => "nftables",
        }
    }

    /// Whether this backend enforces something on the scope now.
    pub fn holds(self, scope: &Scope) -> bool {
        match self {
            Backend::Ebpf => crate::ebpf::is_pinned(scope),
            Backend::Nftables => nftables::holds(scope),
        }
    }

    /// Removes what this backend enforces on the scope; false when it held nothing.
    pub fn remove(self, scope: &Scope) -> Result<bool> {
        match self {
            Backend::Ebpf => crate::ebpf::remove(scope),
            Backend::Nftables => nftables::remove(scope),
        }
    }

    /// The backends holding the scope now (two while a move between them is under way).
    pub fn holding(scope: &Scope) -> Vec<Backend> {
        Backend::ALL
            .into_iter()
            .filter(|b| b.holds(scope))
            .collect()
    }
}
