//! `killswitch daemon`

use std::{path::Path, process::ExitCode};

use crate::{backend::Choice, error::Result, scope::Scope};

pub(super) fn run(config: &Path, cgroup: Option<&Path>, choice: Choice) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = match Scope::from_arg(cgroup) {
        Ok(scope) => scope,
        // No cgroup2 at all: the whole machine can still be held by nftables.
        Err(_) if cgroup.is_none() && choice != Choice::Ebpf => Scope::without_cgroup2(),
        Err(e) => return Err(e),
    };
    crate::daemon::run(config, scope, choice)?;
    Ok(ExitCode::SUCCESS)
}
