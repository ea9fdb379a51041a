//! `killswitch run`

use std::{path::Path, process::ExitCode};

use clap::Args;

use crate::{backend::Choice, error::Result, run};

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// The cgroup's name under `killswitch/` (letters, digits, `_`, `-`, `.`); runs with the
    /// same name share one cgroup and scope. Default: the command's name and killswitch's pid
    /// (with --vpn-client: the command's name, under `killswitch-vpn-client/`)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Start the VPN client: scopes with [vpn_client] let this cgroup reach the servers
    #[arg(long)]
    vpn_client: bool,

    /// What enforces the app's scope (as for `up`)
    #[arg(long, value_enum, default_value_t = Choice::Auto)]
    backend: Choice,

    /// The command and its arguments, after `--`
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

pub(super) fn run(config: &Path, args: &RunArgs) -> Result<ExitCode> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => run::default_name(&args.command[0], args.vpn_client),
    };
    run::check_name(&name)?;
    super::require_privileges()?;
    let code = run::run(&run::Run {
        config,
        name,
        vpn_client: args.vpn_client,
        choice: args.backend,
        command: &args.command,
    })?;
    Ok(ExitCode::from(code))
}
