//! `killswitch servers list|set|add|remove`: change the server list of a running scope.

use std::{collections::BTreeSet, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    backend::nftables,
    ebpf::pins::ScopeLock,
    ebpf::{
        self,
        entries::{server_endpoint, server_key},
        PinnedMaps,
    },
    error::{Error, Result},
    policy::Protocol,
    policy::ServerEndpoint,
    scope::Scope,
};

#[derive(Debug, Args)]
pub(super) struct ServersArgs {
    #[command(subcommand)]
    action: Action,

    /// The scope to change (absolute, or relative to the cgroup2 mount). Default: system-wide
    #[arg(long, global = true, value_name = "PATH")]
    cgroup: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Print the server endpoints the kernel holds now, one per line
    List,
    /// Replace the whole list; endpoints in both the old and the new list are never dropped
    Set {
        /// ADDR[:PORT][/udp|tcp], IPv6 always in brackets ([2001:db8::1]:443/tcp)
        #[arg(value_name = "ENDPOINT", required_unless_present = "none")]
        endpoints: Vec<ServerEndpoint>,
        /// Empty the list: no server is reachable outside the tunnel until one is added
        #[arg(long, conflicts_with = "endpoints")]
        none: bool,
    },
    /// Add endpoints to the list
    Add {
        #[arg(value_name = "ENDPOINT", required = true)]
        endpoints: Vec<ServerEndpoint>,
    },
    /// Remove endpoints; traffic to them is refused once the command returns
    Remove {
        #[arg(value_name = "ENDPOINT", required = true)]
        endpoints: Vec<ServerEndpoint>,
    },
}

pub(super) fn run(args: &ServersArgs) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = match Scope::from_arg(args.cgroup.as_deref()) {
        Ok(scope) => scope,
        Err(_) if args.cgroup.is_none() => Scope::without_cgroup2(),
        Err(e) => return Err(e),
    };
    // The pin first: asking nft lists the whole ruleset (57 ms beside a table of 10,000
    // servers), which an eBPF scope does not need.
    if !ebpf::is_pinned(&scope) && nftables::holds(&scope) {
        return with_nftables(&scope, &args.action);
    }
    let lock = ScopeLock::existing(&scope)?;
    if lock.is_none() || !ebpf::is_pinned(&scope) {
        return Err(Error::Runtime(format!(
            "{} is not enforced; run `killswitch up` first",
            scope.display_cgroup()
        )));
    }
    if ebpf::mode(&scope) == Some("lockdown") {
        return Err(Error::Runtime(format!(
            "{} is in lockdown, not enforcing a policy; fix what `killswitch status` shows and \
             run `killswitch up`",
            scope.display_cgroup()
        )));
    }
    let mut maps = PinnedMaps::open(&crate::ebpf::pins::pin_dir(&scope))?;
    let keys = |endpoints: &[ServerEndpoint]| -> BTreeSet<_> {
        endpoints.iter().map(server_key).collect()
    };
    if let Action::List = &args.action {
        for key in maps.servers()? {
            println!("{}", server_endpoint(&key));
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The list is the command's from now until `up` or a reload installs the config's again.
    // Marked first: a change without the mark could be undone by the daemon's next lookup.
    maps.mark_server_names(crate::servers::COMMAND_OWNS_THE_LIST)?;
    let (verb, changed) = match &args.action {
        Action::List => unreachable!("listed above"),
        Action::Set { endpoints, .. } => ("set", maps.set_servers(&keys(endpoints))?),
        Action::Add { endpoints } => ("added", maps.add_servers(&keys(endpoints))?),
        Action::Remove { endpoints } => ("removed", maps.remove_servers(&keys(endpoints))?),
    };
    tracing::info!(scope = %scope.name, endpoints = changed, "servers {verb}");
    println!(
        "killswitch: {verb} {changed} server endpoint{} of {}",
        if changed == 1 { "" } else { "s" },
        scope.display_cgroup(),
    );
    Ok(ExitCode::SUCCESS)
}

/// The same verbs on an nftables table: the list read back, changed, and written in one
/// transaction.
fn with_nftables(scope: &Scope, action: &Action) -> Result<ExitCode> {
    let _lock = nftables::lock(scope)?;
    let table = nftables::read(scope)?;
    if table.comment.starts_with(crate::render::COMMENT_LOCKDOWN) {
        return Err(Error::Runtime(format!(
            "{} is in lockdown, not enforcing a policy; fix what `killswitch status` shows and \
             run `killswitch up`",
            scope.display_cgroup()
        )));
    }
    let before: BTreeSet<ServerEndpoint> = table.servers().into_iter().collect();
    // A server for TCP and UDP is held as one entry per protocol.
    let split = |endpoints: &[ServerEndpoint]| -> BTreeSet<ServerEndpoint> {
        endpoints
            .iter()
            .flat_map(|e| match e.protocol {
                Some(_) => vec![*e],
                None => [Protocol::Tcp, Protocol::Udp]
                    .map(|p| ServerEndpoint {
                        protocol: Some(p),
                        ..*e
                    })
                    .to_vec(),
            })
            .collect()
    };
    let (verb, after): (&str, BTreeSet<ServerEndpoint>) = match action {
        Action::List => {
            for endpoint in &before {
                println!("{endpoint}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Action::Set { endpoints, .. } => ("set", split(endpoints)),
        Action::Add { endpoints } => ("added", before.union(&split(endpoints)).copied().collect()),
        Action::Remove { endpoints } => (
            "removed",
            before.difference(&split(endpoints)).copied().collect(),
        ),
    };
    let changed = match action {
        Action::Set { .. } => after.len(),
        _ => before.symmetric_difference(&after).count(),
    };
    nftables::set_servers(scope, &after.into_iter().collect::<Vec<_>>())?;
    tracing::info!(scope = %scope.name, endpoints = changed, "servers {verb}");
    println!(
        "killswitch: {verb} {changed} server endpoint{} of {} (nftables)",
        if changed == 1 { "" } else { "s" },
        scope.display_cgroup(),
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    #[test]
    fn an_empty_server_list_must_be_asked_for() {
        assert!(Cli::try_parse_from(["killswitch", "servers", "set"]).is_err());
        assert!(Cli::try_parse_from(["killswitch", "servers", "set", "--none"]).is_ok());
        assert!(
            Cli::try_parse_from(["killswitch", "servers", "set", "--none", "198.51.100.1"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["killswitch", "servers", "add", "0.0.0.0"]).is_err());
    }
}
