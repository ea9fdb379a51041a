//! `killswitch render`

use std::{path::Path, process::ExitCode};

use clap::{Args, ValueEnum};

use crate::{
    error::Result,
    policy::Policy,
    render::{self, CgroupMatch, Ruleset},
    servers::ResolvedServers,
};

#[derive(Debug, Args)]
pub(super) struct RenderArgs {
    /// Which ruleset: an nft script, or an iptables-restore file for IPv4 or for IPv6
    #[arg(value_enum)]
    format: Format,

    /// Render for this cgroup's sockets only (relative to the cgroup2 mount, or absolute).
    /// Default: every socket of the network namespace, i.e. the whole machine
    #[arg(long, value_name = "PATH")]
    cgroup: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Nft,
    Iptables,
    Ip6tables,
}

pub(super) fn run(config: &Path, args: &RenderArgs) -> Result<ExitCode> {
    let policy = Policy::load(config)?;
    let cgroup = match &args.cgroup {
        Some(path) => {
            let scope = crate::scope::Scope::from_arg(Some(path))?;
            CgroupMatch::new(&scope.relative)?
        }
        None => None,
    };
    // As `up` would put it in force: `[guard]` defaults to on for the whole machine.
    let policy = policy.for_scope(cgroup.is_none());
    let (servers, unresolved) = ResolvedServers::resolve_now(&policy.servers);
    let ruleset = Ruleset {
        policy: &policy,
        servers: &servers.endpoints(),
        cgroup,
        lockdown: None,
        clients: &crate::vpn_client::current(&policy),
        // As `up` would list them on this machine now.
        guarded: &crate::backend::nftables::guarded(&policy)?,
    };
    let text = match args.format {
        Format::Nft => render::nft(&ruleset)?,
        Format::Iptables => render::iptables(&ruleset, false)?,
        Format::Ip6tables => render::iptables(&ruleset, true)?,
    };
    print!("{text}");
    // Printed without them: a name that does not resolve has no address to allow.
    for e in &unresolved {
        tracing::error!("{e}; the ruleset above leaves its server out");
    }
    Ok(if unresolved.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
