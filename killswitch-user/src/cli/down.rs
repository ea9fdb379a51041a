//! `killswitch down`

use std::{path::Path, process::ExitCode};

use crate::{backend::Backend, error::Result, scope::Scope};

pub(super) fn run(cgroup: Option<&Path>) -> Result<ExitCode> {
    super::require_privileges()?;
    let scope = match Scope::from_arg(cgroup) {
        Ok(scope) => scope,
        Err(_) if cgroup.is_none() => Scope::without_cgroup2(),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for backend in Backend::ALL {
        if backend.remove(&scope)? {
            removed.push(backend.name());
        }
    }
    if removed.is_empty() {
        println!(
            "killswitch: {} was not enforced; nothing to remove",
            scope.display_cgroup()
        );
    } else {
        tracing::info!(scope = %scope.name, backend = removed.join(","), "removed enforcement");
        println!(
            "killswitch: removed the enforcement of {} ({})",
            scope.display_cgroup(),
            removed.join(" and ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
