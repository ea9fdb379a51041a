//! `killswitch daemon`

use std::{path::Path, process::ExitCode};

use crate::{error::Result, scope::Scope};

pub(super) fn run(config: &Path, cgroup: Option<&Path>) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = Scope::from_arg(cgroup)?;
    crate::daemon::run(config, scope)?;
    Ok(ExitCode::SUCCESS)
}
