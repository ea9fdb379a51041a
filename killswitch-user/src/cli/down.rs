//! `killswitch down`

use std::{path::Path, process::ExitCode};

use crate::{ebpf, error::Result};

pub(super) fn run(cgroup: Option<&Path>) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = crate::scope::Scope::from_arg(cgroup)?;
    if ebpf::remove(&scope)? {
        tracing::info!(scope = %scope.name, "removed enforcement");
        println!(
            "killswitch: removed the enforcement of {}",
            scope.display_cgroup()
        );
    } else {
        println!(
            "killswitch: {} was not enforced; nothing to remove",
            scope.display_cgroup()
        );
    }
    Ok(ExitCode::SUCCESS)
}
